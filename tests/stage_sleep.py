"""A minimal stage for submission tests: its job sleeps, then writes a one-file out.

`python -m tests.stage_sleep EXECUTOR LOG_DIR SECONDS [PARTITION]`, run from the folder the out goes into.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

from slurm.submit import JobSpec, submit
from align import runner
from align.artifacts import staged_out
from tests.helpers import cluster_with, resources

OUT = Path("out")


def sleepy_job(seconds: float) -> str:
    time.sleep(seconds)
    with staged_out(OUT, stage="sleep", params={"seconds": seconds}, inputs={}) as tmp:
        (tmp / "done.txt").write_text(f"slept {seconds}s in pid {os.getpid()}\n")
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID", "")


def main() -> None:
    executor, log_dir, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    partition = sys.argv[4] if len(sys.argv) > 4 else "cpu"
    spec = JobSpec(
        stage="sleep", fn=functools.partial(sleepy_job, seconds),
        resources=resources(partition=partition, mem_gb=1, time_min=5), target=OUT, key={"seconds": seconds},
    )
    print(f"result: {submit(spec, cluster_with(executor=executor, log_dir=log_dir))}", flush=True)


if __name__ == "__main__":
    sys.exit(runner.run(main))
