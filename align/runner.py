"""How every stage ends: its job submitted, its metrics published and its out named on stdout; bad input is one
line on stderr and exit 2, a failed job its report and exit 1."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from align.artifacts import code_revision
from align.errors import EXIT_USER_ERROR, UserError
from align.params import Cluster, Resources
from align.records import publish_metrics
from slurm.submit import JobFailed, JobSpec, submit


def submit_stage(stage: str, out: Path, fn: Callable[[], Any], resources: Resources, cluster: Cluster,
                 params: dict, inputs: dict) -> str:
    """Run a stage's job, keyed by the params subset, input ids and code revision it depends on (a rerun with the
    same key re-attaches to a running job); copy its metrics for DVC; print `stage: out id`."""
    key = {"params": params, "inputs": inputs, "code": code_revision()}
    artifact_id = submit(JobSpec(stage=stage, fn=fn, resources=resources, target=out, key=key), cluster)
    publish_metrics(out, stage)
    print(f"{stage}: {out} {artifact_id}")
    return artifact_id


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
