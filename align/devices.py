"""Where a job's models and tensors live, decided in one place: the GPU of the task's local rank where CUDA is
present (the submission layer starts one task per GPU and exports LOCAL_RANK), else the CPU. Inference models are
loaded in the dtype their folder was saved in on a GPU, and on a CPU in bfloat16 where the folder holds it and the
processor multiplies it natively, else in float32 (`computed_dtype`); vLLM is given the same, so the hf backend,
the scorers and vLLM see the same numbers.

A frozen scorer too large for one GPU (`cluster.<stage>.shard_scorers`) is spread over the GPUs its one process
sees, its layers split by accelerate's device map (`spread`): the jobs that score in one process (label_preferences,
evaluate) see all of the node's GPUs. Jobs with a rank per GPU spread theirs with ZeRO-3 instead (align/sharding.py).
Roles a job holds one after another release their GPU memory in between (`release_memory`).
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a function needs it: the stages' login-node side never loads it
    import torch


def job_device() -> torch.device:
    """Raises where SLURM gave the job GPUs that torch cannot use (a CPU-only venv, a driver mismatch): a job that
    asked for GPUs stops at once with one line instead of running for hours on the CPU."""
    import torch

    if not torch.cuda.is_available():
        given = os.environ.get("SLURM_GPUS_ON_NODE") or os.environ.get("SLURM_JOB_GPUS") or ""
        if given not in ("", "0"):
            raise RuntimeError(f"SLURM gave this job GPUs ({given}) but torch {torch.__version__} cannot use CUDA "
                               f"here (built for CUDA {torch.version.cuda}): check the job's python environment and "
                               f"the node's driver")
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def to_device(batch: dict, device: torch.device | str) -> dict:
    """The batch with every tensor on `device` (other values as they are): what a DeepSpeed engine's forward
    needs, since it never moves its inputs."""
    import torch

    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def config_dtype(model: Path | str) -> str:
    """The dtype the model was saved in (config.json `dtype`, `torch_dtype` before transformers 5)."""
    config = json.loads((Path(model) / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def computed_dtype(saved: str, device: torch.device) -> str:
    """The dtype an inference model saved in `saved` computes in on `device`: its own on a GPU; on a CPU bfloat16
    where the processor multiplies it natively (~5x a float32 matmul on an AVX512-BF16 box), else float32 (a CPU
    without those units, or float16: no CPU kernel of note)."""
    from align.precision import native_bf16

    if device.type == "cuda":
        return saved
    return "bfloat16" if saved == "bfloat16" and native_bf16(device)[0] else "float32"


def inference_dtype(model: Path | str, device: torch.device) -> torch.dtype:
    import torch

    return getattr(torch, computed_dtype(config_dtype(model), device))


def load_causal_lm(model: Path | str, *, trust_remote_code: bool = False, shard: bool = False,
                   adapter: Path | None = None) -> tuple[Any, Any, torch.device]:
    """(tokenizer, model in eval mode in its inference dtype, the device its inputs go to): on the job's device, or
    with `shard` spread over this process's GPUs (`placed`); `adapter`, a LoRA adapter folder, applied on the host
    before the model is placed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=inference_dtype(model, job_device()),
                                              trust_remote_code=trust_remote_code)
    if adapter is not None:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(adapter))
    lm, device = placed(lm.eval(), shard)
    return tokenizer, lm, device


# Of a GPU's free memory, the share a spread model's weights may fill: the rest is left to the forward pass (the
# batch's KV cache, one layer's working tensors, the logits read), which cluster.<stage>.score_batch_size sets.
WEIGHT_SHARE = 0.8


def gpu_budget() -> dict[int, int]:
    """Per GPU this process sees, the bytes a spread model's weights may fill on it (`WEIGHT_SHARE` of its free
    memory now); empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {i: int(torch.cuda.mem_get_info(i)[0] * WEIGHT_SHARE) for i in range(torch.cuda.device_count())}


def placed(model: Any, shard: bool) -> tuple[Any, torch.device]:
    """(`model`, loaded on the host, on the job's device; the device its inputs go to). With `shard` and more than
    one GPU in this process: spread over them (`spread`)."""
    if shard and len(budget := gpu_budget()) > 1:
        return model, spread(model, budget)
    device = job_device()
    return model.to(device), device


def device_map(model: Any, memory: dict[int | str, int]) -> dict[str, int | str]:
    """Which device each block of `model` goes to: in order, its decoder layers whole (the model's
    `_no_split_modules`), each device given an even share of the weights and one layer more (so the split comes
    out balanced, as accelerate's balanced maps do) but no more than `memory` says it may hold."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    whole = getattr(model, "_no_split_modules", None) or []
    sizes = compute_module_sizes(model)
    layer = max((sizes[name] for name, m in model.named_modules() if type(m).__name__ in whole), default=0)
    even = sizes[""] // len(memory) + layer
    return infer_auto_device_map(model, max_memory={d: min(b, even) for d, b in memory.items()},
                                 no_split_module_classes=whole)


def spread(model: Any, memory: dict[int | str, int]) -> torch.device:
    """`model` dispatched over the devices of `memory` (`device_map`): accelerate's hooks move each block's inputs
    to its device, so a forward pass runs through the devices one after another. Returns the first block's device,
    where inputs go. Raises where the devices cannot hold it (the memory plan says so before any job); a "disk"
    entry in `memory` holds weights read back at every forward pass (a CPU's stand-in for a second device)."""
    import torch
    from accelerate import dispatch_model

    placement = device_map(model, memory)
    if left := [name for name, device in placement.items() if device not in memory]:
        raise RuntimeError(f"the model does not fit the {len(memory)} devices this process sees "
                           f"({', '.join(map(str, memory))}): {', '.join(left)} left over; give the job more or larger "
                           f"GPUs (python -m align.plan says what it needs)")
    disk = "disk" in placement.values()
    dispatch_model(model, placement, offload_dir=tempfile.mkdtemp(prefix="offload-") if disk else None)
    first = next(iter(placement.values()))
    return torch.device("cuda", first) if isinstance(first, int) else torch.device("cpu")


def release_memory() -> None:
    """Free what a role that is gone held before the next one loads: its objects (reference cycles included) and,
    on a GPU, the blocks torch's allocator keeps cached for reuse, which vLLM and the next model would otherwise
    not see as free."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
