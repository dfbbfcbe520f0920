"""Progress in a job log: tqdm's status as plain lines (no carriage returns) every interval, nothing at all
from a loop that ends before the delay, and the newest such line found again in a log's tail."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from align.progress import latest_progress, progress
from align import progress as progress_module


def test_a_long_loop_logs_plain_lines_and_a_short_one_nothing(capfd: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "LOG_INTERVAL", 0.2)
    for _ in progress(range(3), desc="short", delay=1.0):
        pass
    for _ in progress(range(6), desc="long", unit="batch", delay=0.1):
        time.sleep(0.1)
    err = capfd.readouterr().err
    assert "\r" not in err and "short" not in err
    lines = err.splitlines()
    assert 2 <= len(lines) <= 6 and all(line.startswith("long:") for line in lines)
    assert lines[-1].startswith("long: 100%") and "6/6" in lines[-1] and len(set(lines)) == len(lines)
    assert all(progress_module.PROGRESS_LINE.match(line) for line in lines)  # what the waiting login node reads


def test_the_latest_progress_line_is_found_among_noise_in_the_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "0_log.err"
    assert latest_progress(log) is None  # no log yet
    log.write_text("submitit INFO (2024-01-02 12:00:00,000) - Starting with JobEnvironment\n"
                   "INFO 01-02 12:00:05 [core.py:58] Initializing an engine\nresumed from 3\n")
    assert latest_progress(log) is None
    with log.open("a") as fh:
        fh.write("Generating:   0%|          | 0/20 [00:00<?, ?it/s]\n"
                 "Generating:  40%|####      | 8/20 [00:31<00:46,  0.26it/s]\nstep 8 loss 0.512\n")
    assert latest_progress(log) == "Generating:  40%|####      | 8/20 [00:31<00:46,  0.26it/s]"
    with log.open("a") as fh:
        fh.write("Scoring: 12batch [00:40,  0.30batch/s]\nWARNING a warning [with brackets]\n")
    assert latest_progress(log) == "Scoring: 12batch [00:40,  0.30batch/s]"
    with log.open("a") as fh:
        fh.write("noise line\n" * (progress_module.TAIL_BYTES // 10))
    assert latest_progress(log) is None  # only the tail is read
