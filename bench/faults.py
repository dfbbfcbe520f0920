"""The fault suite's figures: runs tests/test_faults.py (the eight scenarios on the one-node SLURM test cluster,
started by the tests themselves; root needed) and the bad-input table of tests/test_bad_input.py, then prints what
survived, the steps lost per resume, the time-limit and preemption signals (SIGUSR2, SIGTERM) after which the job
resumed where it stopped, the bad inputs answered with one line, and the artifacts lost and duplicate jobs (both
must be 0).

    python bench/faults.py [--out bench/results/faults.json] [-k EXPR]

The figures are collected by the tests (tests/fault_figures.py), so a CI run of the suite writes the same file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "faults.json")
    parser.add_argument("-k", default="", help="pytest -k expression, to run part of the suite")
    args = parser.parse_args()
    out = args.out.resolve()
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_faults.py",
               "tests/test_bad_input.py::test_bad_input_is_one_line_exit_2_and_touches_nothing"]
    tests = subprocess.run(command + (["-k", args.k] if args.k else []), cwd=ROOT,
                           env={**os.environ, "FAULTS_JSON": str(out)})
    if not out.exists():
        print(f"no figures written (pytest exit {tests.returncode})", file=sys.stderr)
        return 1
    figures = json.loads(out.read_text())
    print(f"\n{'scenario':<95} {'survived':>8}  figures")
    for name, record in figures["scenarios"].items():
        shown = {k: v for k, v in record.items() if k in ("signal", "stopped_after", "steps_lost", "allocations",
                                                         "seconds_to_failure", "jobs", "outcome",
                                                         "adapter_max_abs_diff", "seconds")}
        print(f"{name:<95} {str(record['survived']):>8}  {json.dumps(shown)}")
    print(f"\nscenarios survived        {figures['scenarios_survived']}/{figures['scenarios_run']}")
    print(f"steps lost per resume     {figures['steps_lost_per_resume']}")
    print(f"signals resumed in place  {figures['signals_resumed_where_stopped']}/{len(figures['signals_sent'])} "
          f"({', '.join(figures['signals_sent'])})")
    print(f"bad inputs, one line      {figures['bad_inputs_answered_with_one_line']}/{figures['bad_inputs_tried']}")
    print(f"artifacts lost            {figures['artifacts_lost']}")
    print(f"duplicate jobs            {figures['duplicate_jobs']}")
    print(f"written                   {out}")
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
