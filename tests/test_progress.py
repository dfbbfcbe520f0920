"""Progress in a job log: tqdm's status as plain lines (no carriage returns) every interval, and nothing at all
from a loop that ends before the delay."""

from __future__ import annotations

import time

import pytest

from stages import progress as progress_module
from stages.progress import progress


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
