"""`auto` precision (align/precision.py): each branch forced by what torch reports of the processor, the memory
plan's reading of it on a login node, and a training stage run under it on this machine, which says in its log and
its manifest what it ran in. (The import under `auto`: tests/test_import_model.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align import precision
from align.artifacts import read_manifest
from align.devices import computed_dtype
from align.errors import UserError
from align.training import deepspeed_config
from stages.ppo import check_one_dtype
from tests.helpers import FAST_EXECUTION, FAST_TRAINING, stage, training_run
from tests.projects import make_project
from tests.tiny import PAIRS


@pytest.fixture
def cpu_units(monkeypatch: pytest.MonkeyPatch):
    """Set which bf16 units torch reports for this CPU; the resolutions cached in this process are forgotten."""

    def report(**units: bool) -> None:
        caps = {**torch.cpu.get_capabilities(), "amx_bf16": False, "avx512_bf16": False, **units}
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
        for cached in (precision._auto, precision.model_dtype, precision.training_precision):
            cached.cache_clear()

    yield report
    for cached in (precision._auto, precision.model_dtype, precision.training_precision):
        cached.cache_clear()


@pytest.mark.parametrize("units, dtype, trained", [({"avx512_bf16": True}, "bfloat16", "bf16"),
                                                    ({"amx_bf16": True}, "bfloat16", "bf16"),
                                                    ({}, "float32", "fp32")])
def test_auto_follows_the_processor(cpu_units, capsys: pytest.CaptureFixture, units: dict, dtype: str,
                                    trained: str) -> None:
    cpu_units(**units)
    assert precision.model_dtype("auto") == dtype and precision.training_precision("auto") == trained
    assert precision.torch_dtype("auto") == getattr(torch, dtype)
    said = capsys.readouterr().out
    assert f"model.dtype: auto -> {dtype} (cpu " in said and f"training.precision: auto -> {trained} (cpu " in said
    config = deepspeed_config(training_run(precision="auto"), 1)
    assert config["bf16"]["enabled"] is (trained == "bf16") and config["fp16"]["enabled"] is False
    assert precision.recorded({"model": {"dtype": "auto"}, "training": {"precision": "auto"}, "seed": 0}) == {
        "model.dtype": dtype, "training.precision": trained}


def test_a_setting_is_kept_whatever_the_processor(cpu_units) -> None:
    cpu_units()
    assert precision.training_precision("bf16") == "bf16" and precision.model_dtype("float16") == "float16"
    assert precision.recorded({"rl": {}}) == {}  # an out whose params hold neither records nothing


@pytest.mark.parametrize("units, bf16_folder_computes", [({"avx512_bf16": True}, "bfloat16"), ({}, "float32")])
def test_inference_computes_a_folder_in_its_dtype_where_the_processor_has_it(cpu_units, tmp_path: Path, units: dict,
                                                                             bf16_folder_computes: str) -> None:
    """The scorers, the hf backend and vLLM load a folder in `computed_dtype`; the policy stage's one-dtype check
    reads the same on a CPU, in the job."""
    cpu_units(**units)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert computed_dtype("bfloat16", cpu) == bf16_folder_computes
    assert computed_dtype("float32", cpu) == computed_dtype("float16", cpu) == "float32"
    assert computed_dtype("float16", gpu) == "float16" and computed_dtype("bfloat16", gpu) == "bfloat16"
    folder = tmp_path / "sft"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    trained = {"bfloat16": "bf16", "float32": "fp32"}[bf16_folder_computes]
    check_one_dtype(folder, trained, cpu)
    with pytest.raises(UserError, match=f"holds bfloat16 weights, which rollouts sample in {bf16_folder_computes} on "
                                        f"this CPU"):
        check_one_dtype(folder, {"bf16": "fp32", "fp32": "bf16"}[trained], cpu)


def test_the_plan_counts_auto_as_bf16_on_a_gpu_and_float32_on_a_cpu() -> None:
    assert precision.planned_bytes("auto", on_gpu=True) == 2 and precision.planned_bytes("auto", on_gpu=False) == 4
    assert precision.planned_bytes("bf16", on_gpu=False) == 2 and precision.planned_bytes("float32", True) == 4


def test_engrave_under_auto_learns_and_says_what_it_ran_in(tmp_path: Path, roomy_model: Path) -> None:
    """The repository's default on this machine: bf16 where torch reports AMX or AVX512-BF16 (the developers' and
    CI's boxes do), float32 elsewhere. The loss falls as in float32 (tests/test_sft_stages.py's bound)."""
    expected = "bf16" if precision.native_bf16(torch.device("cpu"))[0] else "fp32"
    cwd = make_project(tmp_path, roomy_model, pairs=PAIRS, training={**FAST_TRAINING, "precision": "auto"},
                       cluster_defaults=FAST_EXECUTION, engrave={"epochs": 24})
    proc = stage(cwd, "engrave")
    assert proc.returncode == 0, proc.stderr
    out = cwd / "models/engraved"
    assert read_manifest(out)["precision"] == {"training.precision": expected}
    log = "".join(p.read_text() for p in (cwd / "logs/engrave").glob("*_0_log.out"))
    assert f"training.precision: auto -> {expected} (cpu" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["loss_last10_mean"] < 0.5 * metrics["loss_first"], metrics
