"""Shared fixtures: the project root as working directory for stage runs, the tiny model, the fault suite's
figures (tests/fault_figures.py)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ALIGN_HASH_CACHE", str(Path(tempfile.mkdtemp(prefix="align-hashes-")) / "hashes.sqlite"))
if not torch.cuda.is_available():  # DeepSpeed's CPU accelerator where no GPU is; on a GPU machine it finds CUDA
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from tests import fault_figures  # noqa: E402
from tests.tiny import make_roomy_model, make_tiny_model  # noqa: E402
from tests.slurm_fixture import slurm_cluster, slurm_two_nodes  # noqa: F401


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def roomy_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model made able to overfit a few pairs under LoRA (tests.tiny.make_roomy_model)."""
    return make_roomy_model(tiny_model, tmp_path_factory.mktemp("roomy") / "model")


@pytest.fixture
def fault_figures_record(request: pytest.FixtureRequest) -> dict:
    """This fault scenario's figures, written to faults.json at the end of the session."""
    return fault_figures.record_for(request.node)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    fault_figures.note_outcome(report)


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = fault_figures.write()
    if path is not None:
        print(f"\nfault figures: {path}")
