"""A parameter sweep as parallel SLURM jobs: `dvc exp run --queue -S rl.kl_coef=0.01,0.05` queues two
experiments, `dvc queue start -j 2` runs them in their own temporary workspaces at once, each submitting its PPO
job to the one-node test cluster, and `dvc exp show` lists both with their params and metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.helpers import SqueueWatch, sh
from tests.projects import TINY_RL, policy_repo

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def sweep_repo(folder: Path, model: Path, logs: Path) -> Path:
    """The policy stage's repository (`policy_repo`), its jobs on the test cluster's cpu partition (6 GB each: the
    memory plan asks 5.3 GB of a policy job on the roomy model; two run at once on the test node's 20 GB)."""
    return policy_repo(folder, model, rl={**TINY_RL, "iterations": 2},
                       cluster={"executor": "slurm", "log_dir": str(logs),
                                "policy": {"partition": "cpu", "cpus_per_task": 1, "mem_gb": 6, "time_min": 20}})


def test_a_queued_sweep_runs_as_parallel_slurm_jobs(slurm_cluster, tmp_path: Path, roomy_model: Path) -> None:
    logs = tmp_path / "logs"  # one log folder for both experiments: each job's files carry its own job id
    repo = sweep_repo(tmp_path / "repo", roomy_model, logs)
    queued = sh(repo, "dvc", "exp", "run", "--queue", "-S", "rl.kl_coef=0.01,0.05")
    assert queued.stdout.count("Queued experiment") == 2, queued.stdout

    with SqueueWatch("policy") as watch:
        sh(repo, "dvc", "queue", "start", "-j", "2")
        deadline = time.time() + 1200
        while time.time() < deadline:
            status = sh(repo, "dvc", "queue", "status").stdout
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(2)
    assert status.count("Success") == 2, status

    jobs = {job for snapshot in watch.snapshots for job in snapshot}
    assert len(jobs) == 2  # one SLURM job per experiment, none submitted twice
    assert any(sum(state == "RUNNING" for state in snapshot.values()) == 2 for snapshot in watch.snapshots)
    assert {p.name.split("_")[0] for p in (logs / "policy").glob("*_0_log.out")} == jobs

    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    exps = [e["data"] for rev in shown for e in rev.get("experiments") or [] for e in e.get("revs", [])]
    kl = sorted(e["params"]["params.yaml"]["data"]["rl"]["kl_coef"] for e in exps)
    assert kl == [0.01, 0.05]
    for exp in exps:
        metrics = exp["metrics"]["metrics/policy.json"]["data"]
        assert metrics["rows"] == 2 and {"reward", "kl", "minutes"} <= set(metrics)  # PPO's iterations and health
