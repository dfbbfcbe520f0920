"""How every stage starts and ends: the cluster checked, its job submitted, its metrics published and its out named
on stdout; bad input is one line on stderr and exit 2, a failed job its report and exit 1."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from align.artifacts import MANIFEST, digest, read_manifest, verify_artifact
from align.code import code_digest
from align.errors import EXIT_USER_ERROR, UserError
from align.params import Cluster, Params, Resources, load_params
from align.records import publish_metrics
from slurm.checks import check_cluster
from slurm.submit import JobFailed, JobSpec, choose_executor, state_path, submit


def job_key(stage: str, params: dict, inputs: dict, key_extra: dict | None = None) -> dict:
    """What decides a job's result: the params subset, the input ids and the content of the code files the stage
    runs (and `key_extra`) - not the execution settings, a commit, or an edit to a file the stage does not run."""
    code = code_digest(f"stages.{stage.split('.')[0]}")  # `verbose_clone.generate` is a job of stages/verbose_clone
    return {"params": params, "inputs": inputs, "code": code, **(key_extra or {})}


def submit_job(stage: str, target: Path, fn: Callable[[], Any], resources: Resources, cluster: Cluster,
               params: dict, inputs: dict, key_extra: dict | None = None) -> Any:
    """Run one job of a stage and return rank 0's result; a rerun with the same `job_key` re-attaches to a running
    job."""
    key = job_key(stage, params, inputs, key_extra)
    return submit(JobSpec(stage=stage, fn=fn, resources=resources, target=target, key=key), cluster)


def up_to_date(out: Path, key: dict) -> str | None:
    """The id of `out` where a job with this very key made it and it is intact, else None: DVC reruns a stage when
    any of its dvc.yaml params changed, also those the stage does not read (`dpo.*` under PPO), and such a rerun
    then costs seconds, not a job."""
    if not (Path(out) / MANIFEST).is_file() or read_manifest(out).get("job_key") != digest(key):
        return None
    try:
        return verify_artifact(out)
    except UserError:  # altered since: rebuilt
        return None


def finished_already(stage: str, out: Path, params: dict, inputs: dict, key_extra: dict | None = None,
                     metrics: bool = True) -> str | None:
    """The out's id, the stage ended, where it is `up_to_date` for this key: nothing to run. Not while a job-state
    file names a job for the out: that job is re-attached (its result and log collected, the file removed), even
    where it has already written the out since its submitter died."""
    if state_path(out).exists():
        return None
    found = up_to_date(out, job_key(stage, params, inputs, key_extra))
    if found is not None:
        finish_stage(stage, out, found, note=f"up to date: made from these params, inputs and code; no job (delete "
                                             f"{out} to recompute it)", metrics=metrics)
    return found


def submit_stage(stage: str, out: Path, fn: Callable[[], Any], resources: Resources, cluster: Cluster,
                 params: dict, inputs: dict, key_extra: dict | None = None, metrics: bool = True) -> str:
    """Run the job that writes a stage's out (`submit_job`), unless it is `finished_already`; then end the stage
    (`finish_stage`)."""
    found = finished_already(stage, out, params, inputs, key_extra, metrics)
    if found is not None:
        return found
    artifact_id = submit_job(stage, out, fn, resources, cluster, params, inputs, key_extra)
    finish_stage(stage, out, artifact_id, metrics=metrics)
    return artifact_id


def warn_unread(stage: str, read: set[str], why: str) -> None:
    """A warning line for each setting of `stage`'s dvc.yaml params that changed since dvc.lock recorded its last
    run but that this run does not read (top-level groups or keys not in `read`): an edit to `dpo.beta` under PPO
    changes nothing, and the user should know."""
    lock, params = Path("dvc.lock"), Path("params.yaml")
    if not lock.is_file():
        return
    recorded = ((yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage, {}).get("params", {})
                .get(str(params), {}))
    now = yaml.safe_load(params.read_text()) or {}
    for key in sorted(recorded):
        if key.split(".")[0] in read:
            continue
        before, after = recorded[key], _dotted(now, key)
        for name, (old, new) in _differences(key, before, after).items():
            print(f"{stage}: warning: {name} changed ({old} -> {new}) but {why} does not read it", file=sys.stderr)


def _dotted(tree: dict, key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _differences(name: str, before: Any, after: Any) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (before, after)} of the leaves that differ."""
    if isinstance(before, dict) and isinstance(after, dict):
        found: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(before) | set(after)):
            found |= _differences(f"{name}.{key}", before.get(key), after.get(key))
        return found
    return {} if _same(before, after) else {name: (before, after)}


def _same(a: Any, b: Any) -> bool:
    """Equal as params: DVC's YAML reader records some numbers as text (5e-06 as '5e-06'), PyYAML reads them back
    as floats."""
    if a == b:
        return True
    try:
        return isinstance(a, (str, int, float)) and isinstance(b, (str, int, float)) and float(a) == float(b)
    except ValueError:
        return False


def finish_stage(stage: str, out: Path, artifact_id: str, note: str = "", metrics: bool = True) -> None:
    """Copy the out's metrics for DVC (`metrics`: the out has a metrics.json) and print `stage: out id`, the line a
    stage ends with (and `note`, where the stage wrote its out without a job)."""
    if metrics:
        publish_metrics(out, stage)
    print(f"{stage}: {out} {artifact_id}" + (f" ({note})" if note else ""))


def stage_params(stage: str | None = None) -> Params:
    """What every stage does first: params.yaml validated and, with the slurm executor, the partitions, accounts,
    qos and GPU types of every job checked against the cluster; then `stage`'s memory plan (align/plan.py): a
    layout that cannot fit is one line here, before any hashing or job."""
    params = load_params()
    if choose_executor(params.cluster) == "slurm":
        check_cluster(params.cluster)
    if stage is not None:
        from align.plan import check_stage

        check_stage(params, stage)
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
