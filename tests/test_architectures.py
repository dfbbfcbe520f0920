"""Any architecture: LoRA on PEFT's `all-linear` wraps every projection of a Llama- and a Gemma-shaped model and
neither head, and the real stages run end to end on CPU on both (import_model, engrave, verbose_clone,
system_messages, train_rm, two PPO iterations, evaluate): a Llama-class base model whose tokenizer adds BOS and
which has no chat template (imported with `model.chat_template: plain`), and a Gemma-shaped model whose template
writes BOS and refuses a system turn (the system message opens the user's turn instead)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import yaml

from align.artifacts import staged_out, verify_artifact
from align.records import read_jsonl, write_jsonl
from align.training import lora_model
from tests.helpers import FAST_TRAINING, stage, training_run
from tests.projects import PROMPTS, SMALL_EVALUATE, TINY_RL, TINY_RL_EXECUTION, make_project, preference_rows
from tests.tiny import PAIRS, make_gemma_model, make_llama_base

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
ARCHITECTURES: dict[str, tuple[Callable[..., Path], dict]] = {  # name: (model builder, model params)
    "llama-base": (make_llama_base, {"chat_template": "plain"}),
    "gemma": (make_gemma_model, {}),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_all_linear_lora_wraps_every_projection_and_neither_head(arch: str, tmp_path: Path) -> None:
    from peft.tuners.lora import LoraLayer

    folder = ARCHITECTURES[arch][0](tmp_path / "model")
    for head in ("lm", "reward"):
        model = lora_model(folder, training_run(), head=head)
        wrapped = {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}
        assert {name.rsplit(".", 1)[-1] for name in wrapped} == PROJECTIONS
        assert len(wrapped) == 2 * len(PROJECTIONS)  # both layers


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_pipeline_runs_on_another_architecture(arch: str, tmp_path: Path) -> None:
    make, model_params = ARCHITECTURES[arch]
    source = make(tmp_path / "source")
    cwd = make_project(
        tmp_path / "project", source, pairs=PAIRS, cluster={"executor": "inline"},
        training={**FAST_TRAINING, "batch_size": 2}, cluster_defaults={**TINY_RL_EXECUTION, "micro_batch_size": 2},
        engrave={"epochs": 1}, rm={"epochs": 1, "subsets_per_pair": 1, "eval_share": 0.34},
        system_messages={"enabled": True, "composer": "template", "train_prompts": 1, "eval_prompts": 1,
                         "eval_max_new_tokens": 4},
        rl={**TINY_RL, "iterations": 2}, evaluate=SMALL_EVALUATE,
    )
    raw = yaml.safe_load((cwd / "params.yaml").read_text())
    raw["model"].update(base=str(source), **model_params)  # (make_project's own `model` is the base out's)
    (cwd / "params.yaml").write_text(yaml.safe_dump(raw))
    shutil.rmtree(cwd / "models/base")  # what import_model writes
    with staged_out(cwd / "data/prompts", stage="prompts", params={}, inputs={}) as tmp:
        write_jsonl(tmp / "prompts.jsonl", [{"id": f"p{i}", "text": t, "source": "seed", "type": None, "topic": None}
                                            for i, t in enumerate(PROMPTS)])
    with staged_out(cwd / "data/preferences", stage="label_preferences", params={}, inputs={}) as tmp:
        write_jsonl(tmp / "preferences.jsonl", preference_rows())
    shutil.rmtree(cwd / "data/system_messages")
    # Gemma's template raises on a system turn: PPO's system-message prompt and evaluate's held-out row get through
    # only with the message folded into the user's turn
    for name in ("import_model", "engrave", "verbose_clone", "system_messages", "train_rm", "policy", "evaluate"):
        proc = stage(cwd, name)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"

    for out in ("models/base", "models/engraved", "models/sft", "models/rm", "models/policy", "data/evaluation"):
        verify_artifact(cwd / out)
    adapter = json.loads((cwd / "models/engraved/adapter/adapter_config.json").read_text())
    assert {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]} == PROJECTIONS
    assert json.loads((cwd / "models/policy/metrics.json").read_text())["iterations"] == 2
    metrics = json.loads((cwd / "data/evaluation/metrics.json").read_text())
    assert {"base", "sft", "policy"} <= set(metrics) and "system_messages" in metrics["policy"]
    (held_out,) = read_jsonl(cwd / "data/system_messages/eval.jsonl")
    assert [row["id"] for row in read_jsonl(cwd / "data/evaluation/answers/policy.system_messages.jsonl")] == \
        [held_out["id"]]
