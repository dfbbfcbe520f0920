"""Shared fixtures: the project root as working directory for stage runs, and the tiny model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from tests.tiny import make_roomy_model, make_tiny_model  # noqa: E402
from tests.slurm_fixture import slurm_cluster, slurm_two_nodes  # noqa: F401


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def roomy_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model made able to overfit a few pairs under LoRA (tests.tiny.make_roomy_model)."""
    return make_roomy_model(tiny_model, tmp_path_factory.mktemp("roomy") / "model")
