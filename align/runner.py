"""How every stage starts and ends: the cluster checked, its job submitted, its metrics published and its out named
on stdout; bad input is one line on stderr and exit 2, a failed job its report and exit 1."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from align.code import code_digest
from align.errors import EXIT_USER_ERROR, UserError
from align.params import Cluster, Params, Resources, load_params
from align.records import publish_metrics
from slurm.checks import check_cluster
from slurm.submit import JobFailed, JobSpec, choose_executor, submit


def submit_job(stage: str, target: Path, fn: Callable[[], Any], resources: Resources, cluster: Cluster,
               params: dict, inputs: dict, key_extra: dict | None = None) -> Any:
    """Run one job of a stage and return rank 0's result. The job is keyed by the params subset, the input ids and
    the content of the code files the stage runs (and `key_extra`): a rerun with the same key re-attaches to a
    running job; a commit, or an edit to a file the stage does not run, leaves the key as it was."""
    code = code_digest(f"stages.{stage.split('.')[0]}")  # `verbose_clone.generate` is a job of stages/verbose_clone
    key = {"params": params, "inputs": inputs, "code": code, **(key_extra or {})}
    return submit(JobSpec(stage=stage, fn=fn, resources=resources, target=target, key=key), cluster)


def submit_stage(stage: str, out: Path, fn: Callable[[], Any], resources: Resources, cluster: Cluster,
                 params: dict, inputs: dict, key_extra: dict | None = None, metrics: bool = True) -> str:
    """Run the job that writes a stage's out (`submit_job`), then end the stage (`finish_stage`)."""
    artifact_id = submit_job(stage, out, fn, resources, cluster, params, inputs, key_extra)
    finish_stage(stage, out, artifact_id, metrics=metrics)
    return artifact_id


def finish_stage(stage: str, out: Path, artifact_id: str, note: str = "", metrics: bool = True) -> None:
    """Copy the out's metrics for DVC (`metrics`: the out has a metrics.json) and print `stage: out id`, the line a
    stage ends with (and `note`, where the stage wrote its out without a job)."""
    if metrics:
        publish_metrics(out, stage)
    print(f"{stage}: {out} {artifact_id}" + (f" ({note})" if note else ""))


def stage_params() -> Params:
    """What every stage does first: params.yaml validated and, with the slurm executor, the partitions, accounts,
    qos and GPU types of every job checked against the cluster, before any hashing or job."""
    params = load_params()
    if choose_executor(params.cluster) == "slurm":
        check_cluster(params.cluster)
    return params


def run(main: Callable[[], None]) -> int:
    try:
        main()
    except UserError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USER_ERROR
    except JobFailed as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0
