"""A policy's LoRA adapter folded into a running vLLM engine's weights, in place, for RL rollouts.

Served as a LoRA request, an adapter runs vLLM's LoRA kernels beside every linear layer at every decoding step;
on CPU that made sampling about 5x slower than the same weights merged (SmolLM2-135M, 8 prompts x 4 samples:
~60 vs ~310 tokens/s). An RL loop changes its adapter every iteration, so instead each iteration the engine's
workers reload the adapted layers as base + scale x B @ A, read from the base checkpoint on disk and the adapter
folder the loop saved anyway: only two paths cross the process boundary, and each worker (any tensor-parallel
shard) loads its part through vLLM's own `reload_weights`. Without an adapter the base layers are reloaded.

`MergedAdapter` is mixed into vLLM's workers (`LLM(worker_extension_cls=...)`) and called through
`LLM.collective_rpc("load_merged_adapter", ...)`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch

EXTENSION = "align.vllm_weights.MergedAdapter"
PEFT_PREFIX = "base_model.model."
UNSUPPORTED = ("use_dora", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern", "modules_to_save",
               "trainable_token_indices")  # adapter_config keys whose non-default values change the update rule


def lora_updates(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Per adapted module (checkpoint name, e.g. model.layers.0.self_attn.q_proj), its LoRA factors B and A and
    scale, from a PEFT LoRA folder: the module's weight update is scale x B @ A."""
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    used = next((key for key in UNSUPPORTED if config.get(key)), None)
    if config.get("peft_type") != "LORA" or used:
        raise ValueError(f"{adapter / 'adapter_config.json'}: {used or 'peft_type'}: only plain LoRA adapters can be "
                         f"merged into vLLM's weights; use ppo.rollout_adapter: lora")
    scale = config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])
    tensors = load_file(adapter / "adapter_model.safetensors")
    return {key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight"):
            (tensors[key.replace(".lora_A.weight", ".lora_B.weight")], a, scale)
            for key, a in tensors.items() if key.endswith(".lora_A.weight")}


def checkpoint_tensors(folder: Path, names: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of `names` from a safetensors checkpoint folder (one file or an index of shards)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        ["model.safetensors"]
    for file in files:
        with safe_open(str(folder / file), framework="pt") as handle:
            for name in handle.keys():
                if name in names:
                    yield name, handle.get_tensor(name)


def merged_weights(base: Path, updates: dict[str, tuple[torch.Tensor, torch.Tensor, float]], modules: set[str]
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, weight) of each module in `modules` and `updates`, one at a time: the base weight plus
    its update where `updates` (`lora_updates`) has one, summed in float32 and kept in the checkpoint's dtype."""
    for name, weight in checkpoint_tensors(base, {f"{m}.weight" for m in modules | set(updates)}):
        update = updates.get(name.removesuffix(".weight"))
        if update is not None:
            b, a, scale = update
            weight = (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)
        yield name, weight


class MergedAdapter:
    """vLLM worker extension: `load_merged_adapter(base, adapter)` makes the worker's model base + adapter (or the
    base again with `adapter` None), touching only the adapted layers (this adapter's and the previous one's)."""

    def load_merged_adapter(self, base: str, adapter: str | None) -> None:
        # a partial reload is the point: vLLM's warning listing every layer not reloaded would flood the job's log
        logging.getLogger("vllm.model_executor.model_loader.reload.inplace").setLevel(logging.ERROR)
        updates = lora_updates(Path(adapter)) if adapter is not None else {}
        weights = merged_weights(Path(base), updates, getattr(self, "_adapted_modules", set()))  # streamed
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)  # vLLM's Worker.reload_weights
        self._adapted_modules = set(updates)
