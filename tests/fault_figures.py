"""The figures of the fault suite, collected while it runs and written as JSON at the end of the session.

Each test in tests/test_faults.py fills its own record (steps lost per resume, jobs seen, artifacts lost, seconds;
for a time-limit or preemption signal, which one, where the job stopped and whether it resumed there) through the
`fault_figures` fixture; whether it survived is its pytest outcome. Every row of the bad-input table
(tests/test_bad_input.py) counts as one bad input tried, answered with one line when the row passed. The file goes
to $FAULTS_JSON, else bench/results/faults.json; bench/faults.py runs both suites and prints the table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAULT_TESTS = "tests/test_faults.py::"
BAD_INPUT_ROWS = "tests/test_bad_input.py::test_bad_input_is_one_line_exit_2_and_touches_nothing["

scenarios: dict[str, dict] = {}  # test name -> its record
bad_inputs: dict[str, bool] = {}  # row id -> answered with one line, exit 2, nothing touched


def record_for(item: pytest.Item) -> dict:
    return scenarios.setdefault(item.name, {"survived": False})


def note_outcome(report: pytest.TestReport) -> None:
    """Called for every test phase: a scenario survived when its call passed; a setup or call failure sticks."""
    if report.nodeid.startswith(FAULT_TESTS) and (report.when == "call" or report.failed or report.skipped):
        record = scenarios.setdefault(report.nodeid.removeprefix(FAULT_TESTS), {"survived": False})
        record["survived"] = report.passed and report.when == "call"
        if report.skipped:
            record["skipped"] = True
    elif report.nodeid.startswith(BAD_INPUT_ROWS) and (report.when == "call" or report.failed):
        bad_inputs[report.nodeid.removeprefix(BAD_INPUT_ROWS).rstrip("]")] = report.passed


def summary() -> dict:
    ran = {name: record for name, record in scenarios.items() if "skipped" not in record}
    return {
        "scenarios_run": len(ran),
        "scenarios_survived": sum(r["survived"] for r in ran.values()),
        "steps_lost_per_resume": [lost for r in ran.values() for lost in r.get("steps_lost", [])],
        "artifacts_lost": sum(r.get("artifacts_lost", 0) for r in ran.values()),
        "duplicate_jobs": sum(r.get("duplicate_jobs", 0) for r in ran.values()),
        # time-limit and preemption signals: the job stopped at its next safe point and resumed there
        "signals_sent": [r["signal"] for r in ran.values() if "signal" in r],
        "signals_resumed_where_stopped": sum(r["survived"] and r.get("resumed_where_stopped", False)
                                             for r in ran.values()),
        "bad_inputs_tried": len(bad_inputs),
        "bad_inputs_answered_with_one_line": sum(bad_inputs.values()),
        "scenarios": ran,
        "bad_inputs": bad_inputs,
    }


def write() -> Path | None:
    if not scenarios and not bad_inputs:
        return None
    path = Path(os.environ.get("FAULTS_JSON") or ROOT / "bench" / "results" / "faults.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary(), indent=2) + "\n")
    os.replace(tmp, path)
    return path
