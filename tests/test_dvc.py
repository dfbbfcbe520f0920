"""The DVC pipeline for real: `dvc repro` runs the stage through the submission layer, a second repro is a
no-op, and `dvc exp run -S model.base=...` imports another model into an experiment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from align.artifacts import read_manifest, verify_artifact
from tests.conftest import ROOT
from tests.tiny import make_tiny_model

PROJECT_FILES = ["stages", "align", "slurm", "assets", "dvc.yaml", "params.yaml", ".gitignore"]


def sh(cwd: Path, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc


def new_repo(folder: Path, groups: dict[str, dict]) -> Path:
    """A copy of the project in a fresh git + DVC repository, its params groups updated with `groups`, committed."""
    folder.mkdir()
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, folder / name)
    params = yaml.safe_load((folder / "params.yaml").read_text())
    for group, values in groups.items():
        params[group].update(values)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(folder, "git", "init", "-q")
    sh(folder, "dvc", "init", "-q")
    sh(folder, "git", "add", "-A")
    sh(folder, "git", "commit", "-qm", "init")
    return folder


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
