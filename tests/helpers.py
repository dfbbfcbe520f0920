"""What many test modules run things with: a command or a stage as DVC would run it, a fresh git + DVC copy of the
project, a job inline through the submission layer, the SLURM queue watched; and the training settings the tiny
model learns fast with. Shared here so that no test module imports another (tests/test_structure.py checks)."""

from __future__ import annotations

import csv
import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from align.params import Cluster, Engine, Resources, TrainingExecution, TrainingRun, parse_params
from slurm.submit import JobSpec, submit
from tests.conftest import ROOT

PROJECT_FILES = ["stages", "align", "slurm", "assets", "dvc.yaml", "params.yaml", ".gitignore"]
# The stage tests' comparisons and thresholds were measured in float32, which params.yaml's `auto` is not on a CPU
# with bf16 units: their projects pin it. tests/test_precision.py and the repositories of `new_repo` (the pipeline as
# a user runs it) keep `auto`.
FLOAT32 = {"model": {"dtype": "float32"}, "training": {"precision": "fp32"}}
FAST_TRAINING = dict(learning_rate=1e-2, lora_r=8, lora_alpha=16, batch_size=4, warmup_ratio=0.0,
                     lr_schedule="constant")
FAST_EXECUTION = dict(micro_batch_size=4, zero_stage=2)  # FAST_TRAINING's batch in one micro-batch
# dropout on, so an exact resume needs the RNG states restored
TINY_TRAINING = dict(learning_rate=1e-2, lora_r=8, lora_alpha=16, lora_dropout=0.1, batch_size=1,
                     lr_schedule="constant", warmup_ratio=0.0)  # runs of different lengths share their first steps


def merge_into(raw: dict, changes: dict) -> dict:
    """`raw` (a params mapping) with `changes` laid over it, nested mappings merged key by key: a test names only
    what it changes, the rest stays params.yaml's."""
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            merge_into(raw[key], value)
        else:
            raw[key] = value
    return raw


def repo_params() -> dict:
    """params.yaml as a mapping, pinned to float32 (FLOAT32)."""
    return merge_into(yaml.safe_load((ROOT / "params.yaml").read_text()), FLOAT32)


DEFAULTS = parse_params(repo_params(), "params.yaml")  # the one set of defaults, as the stage tests' projects hold them


def cluster_with(**values: object) -> Cluster:
    """params.yaml's `cluster` with `values` (executor, log_dir)."""
    return DEFAULTS.cluster.model_copy(update=values)


def resources(**values: object) -> Resources:
    """`cluster.defaults` of params.yaml with `values`, validated."""
    return Resources(**{**DEFAULTS.cluster.defaults.model_dump(), **values})


def training_run(**values: object) -> TrainingRun:
    """params.yaml's `training` and `cluster.defaults` execution settings with `values`, as a job gets them."""
    execution = {name: getattr(DEFAULTS.cluster.defaults, name) for name in TrainingExecution.model_fields}
    return TrainingRun(**{**DEFAULTS.training.model_dump(), **execution, **values})


def engine(**values: object) -> Engine:
    """params.yaml's generation backend and `cluster.defaults` engine settings with `values`."""
    return Engine(**{**Engine.of(DEFAULTS.generation, DEFAULTS.cluster.defaults).model_dump(), **values})


def sh(cwd: Path, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc


def new_repo(folder: Path, groups: dict[str, dict]) -> Path:
    """A copy of the project (and its .dvc/plots templates) in a fresh git + DVC repository, its params groups updated
    with `groups`, committed."""
    folder.mkdir()
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, folder / name)
    params = merge_into(yaml.safe_load((folder / "params.yaml").read_text()), groups)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(folder, "git", "init", "-q")
    sh(folder, "dvc", "init", "-q")
    shutil.copytree(ROOT / ".dvc/plots", folder / ".dvc/plots")  # the project's plot templates
    sh(folder, "git", "add", "-A")
    sh(folder, "git", "commit", "-qm", "init")
    return folder


def stage_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def stage(cwd: Path, name: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run stage `name` in the project folder `cwd` as dvc.yaml's cmd does."""
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=cwd, env=stage_env(), capture_output=True,
                          text=True, timeout=timeout)


def curve(cwd: Path, stage_name: str, metric: str) -> list[tuple[int, float]]:
    with (cwd / "dvclive" / stage_name / "plots" / "metrics" / f"{metric}.tsv").open() as fh:
        return [(int(row["step"]), float(row[metric])) for row in csv.DictReader(fh, delimiter="\t")]


def kill_tree(pid: int) -> None:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for child in children:
        kill_tree(int(child))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def inline(fn: functools.partial) -> dict:
    """Run `fn` as one process through the submission layer (it exports RANK/WORLD_SIZE/MASTER_* itself)."""
    spec = JobSpec(stage="train_test", fn=fn, resources=resources(), target=Path("unused"), key={})
    return submit(spec, cluster_with(executor="inline"))


def policy_tasks(cwd: Path, tasks_per_node: int, nodes: int, devices: list[str] | None = None,
                 timeout: float = 900) -> list[subprocess.CompletedProcess]:
    """The policy stage's job (`stages.ppo.build_job` in the project `cwd`) run as SLURM would start its tasks,
    `nodes` x `tasks_per_node` processes on this machine with RANK, LOCAL_RANK and the rest in their environment (and
    each task's CUDA_VISIBLE_DEVICES from `devices`, as a node's cgroup shows it); each task's exit status and
    output. Builds the job in `cwd` (the caller chdirs there: build_job reads the project's inputs)."""
    import pickle

    from align.params import load_params
    from slurm.submit import free_port
    from stages.ppo import build_job

    (cwd / "job.pkl").write_bytes(pickle.dumps(build_job(load_params())))
    port, world = str(free_port()), nodes * tasks_per_node
    run = "import pickle; from stages.ppo import job; job(pickle.load(open('job.pkl', 'rb')))"
    started = [subprocess.Popen(
        [sys.executable, "-c", run], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**stage_env(), "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank % tasks_per_node),
             "LOCAL_WORLD_SIZE": str(tasks_per_node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
             **({"CUDA_VISIBLE_DEVICES": devices[rank]} if devices else {})}) for rank in range(world)]
    try:
        outs = [task.communicate(timeout=timeout)[0] for task in started]
    finally:
        for task in started:
            task.kill()
    return [subprocess.CompletedProcess(task.args, task.returncode, out) for task, out in zip(started, outs)]


def squeue_jobs(name: str) -> dict[str, str]:
    """{job id: state} of the jobs called `name` that slurmctld lists (pending, running, recently ended)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%i %T"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


class SqueueWatch:
    """Polls squeue in a thread and keeps every job id it lists under `name` (as a set of snapshots)."""

    def __init__(self, name: str) -> None:
        self.name, self.snapshots, self._stop = name, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.snapshots.append(squeue_jobs(self.name))
            except (subprocess.SubprocessError, OSError):
                pass  # slurmctld busy for a moment: the next poll sees the same jobs
            time.sleep(0.2)

    def __enter__(self) -> "SqueueWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
