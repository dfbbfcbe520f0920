"""A policy's LoRA adapter folded into a running vLLM engine's weights, in place, for RL rollouts.

Served as a LoRA request, an adapter runs vLLM's LoRA kernels beside every linear layer at every decoding step;
on CPU that made sampling about 5x slower than the same weights merged (SmolLM2-135M, 8 prompts x 4 samples:
~60 vs ~310 tokens/s). An RL loop changes its adapter every iteration, so instead each iteration the engine's
workers reload the adapted modules as base + scale x B @ A, read from the base checkpoint on disk and the adapter
folder the loop saved anyway: only two paths cross the process boundary, and each worker (any tensor-parallel
shard) loads its part through vLLM's own `reload_weights`. Without an adapter the base modules are reloaded.

vLLM packs several checkpoint modules into one layer (Llama: q/k/v into qkv_proj, gate/up into gate_up_proj), and
a reload rebuilds a packed layer whole: a member not handed over comes back as uninitialised memory. So every
member of each packed group an adapted module belongs to is reloaded (the grouping read from the loaded model's
`packed_modules_mapping`), each with all its checkpoint tensors (a bias too). The sum W + scale x B @ A is made and
handed over in float32, so the only rounding is vLLM's own cast to the engine's dtype.

Only what that rule merges is accepted: `check_mergeable` runs in the calling process before any worker is asked,
and refuses (one line, naming the file and key) an adapter with anything else in it - a LoRA variant, trained
biases, embedding LoRA, saved whole modules, a module the base checkpoint lacks or of another shape.

`MergedAdapter` is mixed into vLLM's workers (`LLM(worker_extension_cls=...)`) and called through
`LLM.collective_rpc`: `load_merged_adapter` takes an adapter folder; `receive_merged_adapter` takes the factors a
trainer broadcasts over a process group the workers joined (`join_adapter_group`, align/weight_sync.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from align.errors import UserError

if TYPE_CHECKING:
    import torch

EXTENSION = "align.vllm_weights.MergedAdapter"
PEFT_PREFIX = "base_model.model."
FACTORS = (".lora_A.weight", ".lora_B.weight")  # the only adapter tensors the merge consumes
UNSUPPORTED = (  # adapter_config keys whose non-default values change the update rule or the model around it
    "use_dora", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern", "modules_to_save",
    "trainable_token_indices", "layer_replication", "target_parameters", "use_qalora", "alora_invocation_tokens",
    "monteclora_config", "use_bdlora", "arrow_config", "kasa_config",
)
FIX = "only plain LoRA factors of the base checkpoint's modules can be merged into vLLM's weights; use " \
      "rl.rollout_adapter: lora"


def check_mergeable(adapter: Path, base: Path) -> None:
    """Refuse (`UserError`) a PEFT adapter folder that `lora_updates` + `merged_weights` would not turn into
    exactly the adapted model over the checkpoint folder `base`: a config other than plain LoRA without bias, or
    any tensor other than the A and B factors of a module whose weight the checkpoint holds, in a matching shape."""
    from safetensors import safe_open

    path = adapter / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"{adapter}: no adapter_config.json; expected a PEFT LoRA adapter folder")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type: {config.get('peft_type')!r}, not 'LORA'; {FIX}")
    if config.get("bias", "none") != "none":
        raise UserError(f"{path}: bias: {config['bias']!r} (trained biases), expected 'none'; {FIX}")
    if used := next((key for key in UNSUPPORTED if config.get(key)), None):
        raise UserError(f"{path}: {used}: {config[used]!r:.60}; {FIX}")
    file = adapter / "adapter_model.safetensors"
    if not file.is_file():
        raise UserError(f"{adapter}: no adapter_model.safetensors; save the adapter with safe_serialization")
    weights = checkpoint_shapes(base)
    with safe_open(str(file), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    for key in shapes:
        suffix = next((s for s in FACTORS if key.endswith(s)), None)
        stem = key.removesuffix(suffix or "")
        if suffix is None or any(stem + s not in shapes for s in FACTORS):
            raise UserError(f"{file}: {key}: not a LoRA factor the merge uses (lora_A/lora_B pairs only); {FIX}")
        module = stem.removeprefix(PEFT_PREFIX)
        weight = weights.get(f"{module}.weight")
        if weight is None:
            raise UserError(f"{file}: {key}: {base} has no weight {module}.weight to merge it into; {FIX}")
        a, b = (shapes[stem + s] for s in FACTORS)
        if (b[0], a[-1]) != weight:
            raise UserError(f"{file}: {key}: B @ A is {[b[0], a[-1]]} but {module}.weight in {base} is "
                            f"{list(weight)}: an adapter of another base model?")


def lora_updates(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Per adapted module (checkpoint name, e.g. model.layers.0.self_attn.q_proj), its LoRA factors B and A and
    scale, from a PEFT LoRA folder that `check_mergeable` accepted: the module's weight update is scale x B @ A."""
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])
    tensors = load_file(adapter / "adapter_model.safetensors")
    return {key.removeprefix(PEFT_PREFIX).removesuffix(FACTORS[0]): (tensors[key.replace(*FACTORS)], a, scale)
            for key, a in tensors.items() if key.endswith(FACTORS[0])}


def host_copy(folder: Path) -> Path:
    """The safetensors checkpoint of a model folder (its weights and index only) copied into a new folder of this
    node's temporary space (the job's TMPDIR): what an engine's merges read their base weights from, so the shared
    filesystem holding the model is read once, at start, not at every merge."""
    import shutil
    import tempfile

    copy = Path(tempfile.mkdtemp(prefix="align-base-"))
    for file in checkpoint_files(folder) + [folder / "model.safetensors.index.json"]:
        if file.is_file():
            shutil.copy2(file, copy / file.name)
    return copy


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (one file or an index of shards)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / "model.safetensors"]


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in a safetensors checkpoint folder, read from the headers alone."""
    from safetensors import safe_open

    shapes = {}
    for file in checkpoint_files(folder):
        with safe_open(str(file), framework="pt") as handle:
            shapes |= {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    return shapes


def module_tensors(folder: Path, modules: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor (weight, bias, ...) of the checkpoint modules `modules` from a safetensors checkpoint folder."""
    from safetensors import safe_open

    for file in checkpoint_files(folder):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if name.rpartition(".")[0] in modules:
                    yield name, handle.get_tensor(name)


def with_packed_groups(modules: set[str], packed: dict[str, list[str]]) -> set[str]:
    """`modules` (checkpoint names) with every other member of each packed group one of them belongs to, from a
    vLLM model's `packed_modules_mapping` (packed layer → the checkpoint modules it holds, e.g. qkv_proj → q_proj,
    k_proj, v_proj): model.layers.0.self_attn.q_proj brings model.layers.0.self_attn.k_proj and .v_proj."""
    out = set(modules)
    for module in modules:
        parent, _, leaf = module.rpartition(".")
        for members in packed.values():
            if leaf in members:
                out |= {f"{parent}.{m}" if parent else m for m in members}
    return out


def merged_weights(base: Path, updates: dict[str, tuple[torch.Tensor, torch.Tensor, float]], modules: set[str]
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) of every tensor of the modules in `modules` and `updates`, one at a time: a weight
    with an update (`lora_updates`) as base + scale x B @ A in float32, any other tensor as the checkpoint has it."""
    for name, weight in module_tensors(base, modules | set(updates)):
        module, _, kind = name.rpartition(".")
        if kind == "weight" and (update := updates.get(module)) is not None:
            b, a, scale = update
            weight = weight.float() + scale * (b.float() @ a.float())  # not rounded back: vLLM casts it once
        yield name, weight


class MergedAdapter:
    """vLLM worker extension: `load_merged_adapter(base, adapter)` makes the worker's model base + adapter (or the
    base again with `adapter` None), reloading only the modules the adapter or the previous one touched and their
    packed groups' other members."""

    def load_merged_adapter(self, base: str, adapter: str | None) -> None:
        self.load_updates(base, lora_updates(Path(adapter)) if adapter is not None else {})

    def load_updates(self, base: str, updates: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """The worker's model made base + each update (B, A, scale by checkpoint module; none: the base)."""
        # a partial reload is the point: vLLM's warning listing every layer not reloaded would flood the job's log
        logging.getLogger("vllm.model_executor.model_loader.reload.inplace").setLevel(logging.ERROR)
        packed = getattr(self.get_model(), "packed_modules_mapping", {})  # vLLM's Worker.get_model
        modules = with_packed_groups(set(updates) | getattr(self, "_adapted_modules", set()), packed)
        weights = merged_weights(Path(base), updates, modules)  # streamed
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)  # vLLM's Worker.reload_weights
        self._adapted_modules = set(updates)

    def join_adapter_group(self, host: str, port: int, world: int, first: int, timeout_min: float) -> None:
        """This worker joins the group a trainer sends LoRA factors over (align/weight_sync.py), as rank `first` +
        its own rank in the engine (its tensor-parallel rank)."""
        from align.weight_sync import adapter_group

        self._adapter_group = adapter_group(host, port, world, first + self.rank, self._adapter_device(),
                                            timeout_min)

    def receive_merged_adapter(self, base: str, spec: list | None, scale: float) -> None:
        """The factors the trainer broadcasts over the group (`spec`: what it sends, in order; None: back to the
        base) folded into the model as `load_merged_adapter` folds a folder's."""
        from align.weight_sync import receive

        factors = {} if spec is None else receive(self._adapter_group, spec, self._adapter_device())
        self.load_updates(base, {module: (b.cpu(), a.cpu(), scale) for module, (b, a) in factors.items()})

    def _adapter_device(self) -> torch.device:
        import torch

        return torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else \
            torch.device("cpu")
