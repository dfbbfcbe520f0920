"""`python -m align.repro_job [TARGET ...]`: `dvc repro` itself as a small, long, requeueable CPU job, so the
login session can end while the DAG runs for days. The job runs `dvc repro` (SLURM lets a job submit jobs), which
submits each stage's job as usual; its one log holds what `dvc repro` says, every stage's progress included.

Run again while it runs, it attaches instead of starting a second one (and says where the log is); once it has
ended, it starts a new run. Killed by its time limit, the job is requeued, and the new `dvc repro` re-attaches to
the stage jobs still running. Resources: `cluster.repro` (a CPU job by default, over `cluster.defaults`).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

from align import runner
from align.errors import UserError
from slurm.submit import DIST_VARS, JobSpec, choose_executor, finished, progress_log, start, state_path

STAGE = "repro"
TARGET = Path(".dvc/tmp/repro")  # its job-state file lives beside it: .dvc/tmp/.repro.job.json
JOB_VARS = ("SLURM_", "SBATCH_", "SRUN_", "SUBMITIT_")  # this job's own settings, which sbatch and srun would read


def run_dvc_repro(targets: list[str]) -> int:
    """The job: `dvc repro TARGET...` in the project, its stderr into the one log; a failed DAG fails the job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(JOB_VARS) or k == "SLURM_CONF"}
    for name in DIST_VARS:
        env.pop(name, None)  # the stage jobs set their own
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", *targets], env=env, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"dvc repro {' '.join(targets)} exited {proc.returncode} (its output is above in this log)")
    return 0


def main(argv: list[str] | None = None) -> None:
    targets = list(sys.argv[1:] if argv is None else argv)
    params = runner.stage_params()
    if choose_executor(params.cluster) != "slurm":
        raise UserError("params.yaml: cluster.executor: a DAG run as a job needs the slurm executor (here: "
                        f"{choose_executor(params.cluster)}); without a cluster run `dvc repro` itself")
    spec = JobSpec(stage=STAGE, fn=functools.partial(run_dvc_repro, targets), resources=params.cluster.repro,
                   target=TARGET, key={})
    job = start(spec, params.cluster)
    if finished(job):  # the job a previous run left has ended: this is a new run
        state_path(TARGET).unlink(missing_ok=True)
        job = start(spec, params.cluster)
    print(f"dvc repro runs as slurm job {job.job_id}; follow it with: tail -f {progress_log(job).with_suffix('.out')}")


if __name__ == "__main__":
    sys.exit(runner.run(main))
