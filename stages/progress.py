"""Progress for the long loops (generation, scoring): tqdm, live on a terminal; in a log file (where a SLURM or
local job's stderr goes) tqdm's same status as one plain line every `LOG_INTERVAL` seconds instead of
carriage-return redraws, so `tail -f` and grep read it. A loop that ends within `DELAY` seconds shows nothing,
which keeps PPO's many small scoring calls quiet."""

from __future__ import annotations

import io
import re
import sys
from typing import Any, Iterable

from tqdm import tqdm

LOG_INTERVAL = 30.0
DELAY = 5.0


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
