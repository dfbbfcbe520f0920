"""align/vllm_weights.py without an engine: which adapters the merge refuses (in the calling process, one line
each), what a worker is handed (float32 sums, whole packed groups). The engine side is in tests/test_generation.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from align.errors import UserError
from align.vllm_weights import check_mergeable, lora_updates, merged_weights, with_packed_groups
from tests.tiny import make_tiny_model


def lora(model: Path, out: Path, targets: list[str], peft_type: str = "lora",
         save_embedding_layers: bool | str = "auto", **config: Any) -> Path:
    """A PEFT adapter of `model` saved to `out`: LoRA (non-zero B) on `targets` with `config`, or IA3; PEFT saves the
    embedding matrices beside a LoRA on them unless `save_embedding_layers` is False."""
    import torch
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    made = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets, **config) \
        if peft_type == "lora" else IA3Config(target_modules=targets, feedforward_modules=[])
    get_peft_model(AutoModelForCausalLM.from_pretrained(model), made).save_pretrained(
        out, save_embedding_layers=save_embedding_layers)
    return out


REFUSED = {  # case: (targets, LoraConfig fields, file, what the line names)
    "dora": (["q_proj", "v_proj"], {"use_dora": True}, "adapter_config.json", "use_dora"),
    "bias": (["q_proj", "v_proj"], {"bias": "lora_only"}, "adapter_config.json", "bias"),
    "modules_to_save": (["q_proj"], {"modules_to_save": ["o_proj"]}, "adapter_config.json", "modules_to_save"),
    "rank_pattern": (["q_proj", "v_proj"], {"rank_pattern": {"v_proj": 2}}, "adapter_config.json", "rank_pattern"),
    "trainable_tokens": (["q_proj"], {"trainable_token_indices": [5, 6]}, "adapter_config.json",
                         "trainable_token_indices"),
    "ia3": (["q_proj"], {"peft_type": "ia3"}, "adapter_config.json", "peft_type"),
    "embedding": (["embed_tokens", "q_proj"], {}, "adapter_model.safetensors", "embed_tokens.base_layer.weight"),
    "embedding_factors": (["embed_tokens", "q_proj"], {"save_embedding_layers": False}, "adapter_model.safetensors",
                          "lora_embedding_A"),
    "tied_lm_head": (["lm_head"], {"save_embedding_layers": False}, "adapter_model.safetensors",
                     "lm_head.lora_A.weight: [^ ]* has no weight lm_head.weight"),  # tied: not in the checkpoint
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refuses_what_the_merge_would_drop(case: str, tiny_model: Path, tmp_path: Path) -> None:
    targets, config, file, key = REFUSED[case]
    adapter = lora(tiny_model, tmp_path / case, targets, **config)
    with pytest.raises(UserError, match=rf"^{adapter / file}: [^\n]*{key}[^\n]*; use rl.rollout_adapter: lora$"):
        check_mergeable(adapter, tiny_model)


def test_refuses_an_adapter_of_another_base(tiny_model: Path, tmp_path: Path) -> None:
    wider = make_tiny_model(tmp_path / "wider", hidden=128)
    adapter = lora(wider, tmp_path / "adapter", ["q_proj", "v_proj"])
    with pytest.raises(UserError, match=rf"^{adapter / 'adapter_model.safetensors'}: [^\n]*q_proj.lora_A.weight: "
                                        rf"B @ A is \[128, 128\] but [^\n]*\[64, 64\]"):
        check_mergeable(adapter, tiny_model)


def test_accepts_plain_lora(tiny_model: Path, tmp_path: Path) -> None:
    check_mergeable(lora(tiny_model, tmp_path / "qv", ["q_proj", "v_proj"]), tiny_model)
    check_mergeable(lora(tiny_model, tmp_path / "rslora", ["q_proj", "down_proj"], use_rslora=True), tiny_model)


def test_merged_weights_are_float32_sums(tiny_model: Path, tmp_path: Path) -> None:
    """W + scale x B @ A is handed over in float32, not rounded to a bfloat16 checkpoint's dtype first (vLLM casts
    it once, to the engine's dtype); the other tensors reloaded are the checkpoint's own."""
    import torch
    from transformers import AutoModelForCausalLM

    base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(base)
    updates = lora_updates(lora(tiny_model, tmp_path / "qv", ["q_proj", "v_proj"]))
    k_proj = "model.layers.0.self_attn.k_proj"
    got = dict(merged_weights(base, updates, {k_proj}))
    weights = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).state_dict()
    assert set(got) == {f"{m}.weight" for m in updates} | {f"{k_proj}.weight"}
    for module, (b, a, scale) in updates.items():
        weight = got[f"{module}.weight"]
        assert weight.dtype == torch.float32
        torch.testing.assert_close(weight, weights[f"{module}.weight"].float() + scale * b.float() @ a.float(),
                                   rtol=0, atol=1e-6)
        assert not torch.equal(weight, weight.bfloat16().float()), "the sum kept what bfloat16 would round off"
    assert got[f"{k_proj}.weight"].dtype == torch.bfloat16 and torch.equal(got[f"{k_proj}.weight"],
                                                                           weights[f"{k_proj}.weight"])


def test_packed_groups_come_whole() -> None:
    """A module of a packed group brings the group's other members (vLLM's own Llama grouping); others stay alone."""
    pytest.importorskip("vllm")
    from vllm.model_executor.models.llama import LlamaForCausalLM

    attention, mlp = "model.layers.0.self_attn", "model.layers.1.mlp"
    got = with_packed_groups({f"{attention}.q_proj", f"{mlp}.up_proj", f"{attention}.o_proj"},
                             LlamaForCausalLM.packed_modules_mapping)
    assert got == {f"{attention}.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")} | \
        {f"{mlp}.gate_proj", f"{mlp}.up_proj"}
