"""The DVC pipeline for real: `dvc repro` runs the stage through the submission layer, a second repro is a
no-op, and `dvc exp run -S model.base=...` imports another model into an experiment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from align.artifacts import read_manifest, verify_artifact
from tests.helpers import new_repo, sh
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
