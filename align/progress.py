"""Progress for the long loops (generation, scoring): tqdm, live on a terminal; in a log file (where a SLURM or
local job's stderr goes) tqdm's same status as one plain line every `LOG_INTERVAL` seconds instead of
carriage-return redraws, so `tail -f` and grep read it. A loop that ends within `DELAY` seconds shows nothing,
which keeps PPO's many small scoring calls quiet. `latest_progress` finds the newest such line in a log, for the
login node that waits on the job."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm

LOG_INTERVAL = 30.0
DELAY = 5.0
TAIL_BYTES = 64 * 1024  # where the newest progress line of a log is looked for: logs can be large

# tqdm's status as `progress` writes it: "[desc: ]pct%|bar| n/total [elapsed<remaining, rate...]", or without a
# total "[desc: ]n<unit> [elapsed, rate...]"; the end may be cut at the 100 columns (a long vLLM postfix)
PROGRESS_LINE = re.compile(
    r"^(?:.*: )?\s*(?:\d+%\|[^|]*\| \S+/\S+|\d[\d.]*[kMGTPEZY]?\S*) \[(?:\d+:)?\d\d:\d\d(?:[<,\]]|$)"
)


class _Lines(io.TextIOBase):
    """A stream for tqdm that writes each redraw as its own line (and a repeated one once)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.last = stream, ""

    def write(self, text: str) -> int:
        for part in re.split(r"[\r\n]", text):
            part = part.strip()
            if part and part != self.last:
                self.stream.write(part + "\n")
                self.last = part
        self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)` on stderr, as a bar on a terminal or as lines in a log file. Also fits vLLM's
    `use_tqdm=` (it passes total, desc, dynamic_ncols and postfix)."""
    stream = sys.stderr
    kwargs.setdefault("delay", DELAY)
    if stream.isatty():
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.pop("dynamic_ncols", None)
    return tqdm(iterable, file=_Lines(stream), mininterval=LOG_INTERVAL, ncols=100, **kwargs)


def latest_progress(path: Path) -> str | None:
    """The newest progress line in the last `TAIL_BYTES` of the log at `path` (never the whole file: a job's log
    can be large); None where there is none yet, or the log is missing or unreadable."""
    try:
        with open(path, "rb") as fh:
            start = max(0, fh.seek(0, io.SEEK_END) - TAIL_BYTES)
            fh.seek(start)
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    if start:
        lines = lines[1:]  # the first one was cut by the seek
    return next((line.strip() for line in reversed(lines) if PROGRESS_LINE.match(line.strip())), None)
