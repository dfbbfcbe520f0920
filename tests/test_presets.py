"""presets/: each applies over params.yaml with `python -m align.preset` into valid params, keeping params.yaml's
comments (so `git diff` shows the preset), and plans as fitting against the config of the model it names; the CPU
demo's preset is params.yaml as shipped, and takes a GPU preset back; a bad preset is one line and writes
nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from align.errors import UserError
from align.params import load_params
from tests.conftest import ROOT
from tests.model_configs import LLAMA_2_7B, LLAMA_2_70B, config_folder

PRESETS = sorted(p.name for p in (ROOT / "presets").glob("*.yaml"))
MODELS = {"7b-a100x4.yaml": LLAMA_2_7B, "70b-h100x8.yaml": LLAMA_2_70B}  # the config of the model each names


def run(module: str, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


def applied(tmp_path: Path, *presets: str) -> Path:
    """A copy of params.yaml with `presets` applied in order, each through the command a user runs."""
    params = tmp_path / "params.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "params.yaml", params)
    for name in presets:
        proc = run("align.preset", ROOT / "presets" / name, "--params", params)
        assert proc.returncode == 0, proc.stderr
    return params


def test_the_three_layouts_are_there() -> None:
    assert {"cpu-demo.yaml", "7b-a100x4.yaml", "70b-h100x8.yaml"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_preset_applies_keeping_comments_and_plans_as_fitting(tmp_path: Path, preset: str) -> None:
    params = applied(tmp_path, preset)
    loaded = load_params(params)
    text = params.read_text()
    assert "# Every knob of the pipeline" in text and "# rollout + update rounds" in text  # params.yaml's own comments
    model = [] if preset not in MODELS else ["--model", config_folder(tmp_path / "model", MODELS[preset])]
    proc = run("align.plan", "--params", params, *model)
    assert proc.returncode == 0, proc.stderr
    assert loaded.cluster.executor == ("slurm" if preset in MODELS else "auto")
    if preset == "70b-h100x8.yaml":  # PPO split: the trainer nodes and the engine node planned apart
        assert (loaded.policy.algorithm, loaded.cluster.policy.placement) == ("ppo", "split")
        assert "policy trainers" in proc.stdout and "policy engines" in proc.stdout


def test_the_cpu_demo_is_params_yaml_and_takes_a_gpu_preset_back(tmp_path: Path) -> None:
    demo = applied(tmp_path / "demo", "cpu-demo.yaml")
    assert demo.read_text() == (ROOT / "params.yaml").read_text()  # nothing to change: not even rewritten
    back = applied(tmp_path / "back", "70b-h100x8.yaml", "cpu-demo.yaml")
    assert load_params(back) == load_params(ROOT / "params.yaml")


def test_check_writes_nothing_and_a_bad_preset_is_one_line(tmp_path: Path) -> None:
    params = applied(tmp_path)
    proc = run("align.preset", ROOT / "presets" / "7b-a100x4.yaml", "--params", params, "--check")
    assert proc.returncode == 0 and "would change" in proc.stdout and "  model.base" in proc.stdout
    assert params.read_text() == (ROOT / "params.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster:\n  defaults: {gpus_per_nod: 4}\n")
    proc = run("align.preset", bad, "--params", params)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (f"{params} with {bad}: cluster.defaults.gpus_per_nod: unknown key; did you mean "
                                   f"'gpus_per_node'?")
    assert params.read_text() == (ROOT / "params.yaml").read_text()


def test_grpo_at_tensor_parallel_2_passes_validation_and_the_plan(tmp_path: Path) -> None:
    """The 7B node's policy stage as GRPO with two ranks, each sampling with a vLLM engine over its own two GPUs;
    the same GPUs split four ways at tensor parallelism 2 cannot place an engine per rank: one line."""
    from stages.ppo import check_layout

    preset = tmp_path / "grpo-tp2.yaml"
    preset.write_text("policy: {algorithm: grpo}\n"
                      "cluster:\n  policy: {tasks_per_node: 2, tensor_parallel_size: 2, micro_batch_size: 1, "
                      "gpu_memory_utilization: 0.3, kv_cache_gb: 4, score_batch_size: 4, time_min: 2880}\n")
    params = applied(tmp_path, "7b-a100x4.yaml")
    assert run("align.preset", preset, "--params", params).returncode == 0
    loaded = load_params(params)
    check_layout(loaded)
    proc = run("align.plan", "--params", params, "--model", config_folder(tmp_path / "model", LLAMA_2_7B))
    assert proc.returncode == 0, proc.stderr
    assert "tp2" in proc.stdout

    four = loaded.model_copy(update={"cluster": loaded.cluster.model_copy(update={
        "policy": loaded.cluster.policy.model_copy(update={"tasks_per_node": 4})})})
    with pytest.raises(UserError, match=r"^params.yaml: cluster.policy: each of the 4 ranks per node samples with a "
                                        r"vLLM engine over its own tensor_parallel_size: 2 GPUs, which needs "
                                        r"gpus_per_node: 8 \(it is 4\); set tasks_per_node: 2 or "
                                        r"tensor_parallel_size: 1$"):
        check_layout(four)
