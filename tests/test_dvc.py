"""The DVC pipeline for real: `dvc repro` runs the stage through the submission layer, a second repro is a
no-op, `dvc exp run -S model.base=...` imports another model into an experiment, and an experiment costs only what
it changes: execution settings are no DVC params, and a setting the chosen algorithm does not read reruns nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from align.artifacts import read_manifest, verify_artifact
from tests.helpers import new_repo, sh
from tests.projects import TINY_RL, TINY_RL_EXECUTION, policy_repo
from tests.tiny import make_tiny_model


def test_repro_is_idempotent_and_exp_run_switches_model(tmp_path: Path, tiny_model: Path) -> None:
    repo = new_repo(tmp_path / "repo", {"model": {"base": str(tiny_model)}, "cluster": {"executor": "local"}})

    first = sh(repo, "dvc", "repro", "import_model")
    assert "Running stage 'import_model'" in first.stdout
    base_id = verify_artifact(repo / "models" / "base")
    second = sh(repo, "dvc", "repro", "import_model")
    assert "Running stage" not in second.stdout and "up to date" in second.stdout
    assert verify_artifact(repo / "models" / "base") == base_id
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "import")

    other = make_tiny_model(tmp_path / "other", seed=1)
    sh(repo, "dvc", "exp", "run", "-S", f"model.base={other}", "import_model")
    assert verify_artifact(repo / "models" / "base") != base_id
    assert read_manifest(repo / "models" / "base")["params"]["model"]["base"] == str(other)
    shown = sh(repo, "dvc", "exp", "show", "--csv").stdout
    assert str(other) in shown


def test_repro_without_a_benchmark_source_stops_at_the_first_stage_in_one_line(tmp_path: Path) -> None:
    """A clone with no ../shared beside it, offline: `dvc repro` runs `benchmarks` first and stops there, before
    any model is loaded, with one line naming the param and both ways to satisfy it."""
    repo = new_repo(tmp_path / "repo", {"cluster": {"executor": "local"}})
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(tmp_path / "hf")}
    proc = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Running stage 'benchmarks'" in proc.stdout and "Running stage 'import_model'" not in proc.stdout
    said = [line for line in proc.stderr.splitlines() if line.startswith("params.yaml:")]
    assert len(said) == 1 and said[0].startswith(
        "params.yaml: benchmarks.hhh: auto: no ../shared/benchmarks/hhh_alignment and hub:"), proc.stderr
    assert "set it to a local copy of" in said[0] and "or to hub:<dataset id>@<commit>" in said[0]
    assert not (repo / "models").exists() and not (repo / "data/benchmarks").exists()


EXECUTION_CHANGES = {"micro_batch_size": 1, "gradient_checkpointing": True, "zero_stage": 3, "offload": "cpu",
                     "tensor_parallel_size": 2, "gpu_memory_utilization": 0.9, "kv_cache_gb": None,
                     "enforce_eager": False, "score_batch_size": 2, "generate_batch_size": 4, "save_every_steps": 7}


def test_an_experiment_costs_only_what_it_changes(tmp_path: Path, tiny_model: Path) -> None:
    """After the policy stage ran: every execution setting changed in params.yaml (the fix for an out-of-memory
    error) leaves `dvc status` clean; `dpo.beta` edited under PPO reruns the stage in seconds without a job and says
    it changed nothing, naming the key; DVC records it and is clean again."""
    repo = policy_repo(tmp_path / "repo", tiny_model, rl={**TINY_RL, "iterations": 2},
                       cluster_defaults={**TINY_RL_EXECUTION, "micro_batch_size": 2})
    sh(repo, "dvc", "repro", "policy", timeout=900)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "policy")
    jobs = sorted((repo / "logs" / "policy").glob("*_0_log.out"))
    assert len(jobs) == 1
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in EXECUTION_CHANGES.items():
        params["cluster"]["defaults"][key] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        assert "up to date" in sh(repo, "dvc", "status").stdout, key

    params["dpo"]["beta"] = 0.2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "params.yaml" in sh(repo, "dvc", "status").stdout  # DVC sees a changed param of the stage
    started = time.monotonic()
    rerun = sh(repo, "dvc", "repro", "policy")
    assert time.monotonic() - started < 60
    assert "policy: warning: dpo.beta changed (0.1 -> 0.2) but policy.algorithm ppo does not read it" in rerun.stderr
    assert "up to date: made from these params, inputs and code; no job" in rerun.stdout
    assert sorted((repo / "logs" / "policy").glob("*_0_log.out")) == jobs  # no second job
    assert "up to date" in sh(repo, "dvc", "status").stdout
