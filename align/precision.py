"""`auto` precision, resolved on the node that computes: bf16 where its processor multiplies bf16 natively (a CUDA
GPU with bf16, or a CPU with AMX or AVX512-BF16 units: ~5x a float32 matmul on the developers' 2-core box), float32
elsewhere. It is resolved inside each job, not on the login node, whose CPU says nothing about a compute node's GPU.

`model.dtype: auto` is resolved once, by the import_model job, into the dtype every model folder is then saved in;
`training.precision: auto` by each training or scoring job. Both are printed in the job's log the first time they
are resolved and recorded in the manifest of every out written there (`recorded`). Inference (vLLM, the scorers)
computes in the folder's dtype where the processor has it (align/devices.py `computed_dtype`). The memory plan, run
on the login node, plans `auto` as bf16 on a GPU and as float32 on a CPU, the larger of the two a CPU node may
resolve it to.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2, "fp16": 2}
TRAINING_TO_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # as config.json names them


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether `device` multiplies bf16 natively, what says so) - the reason goes into the job's log."""
    import torch

    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        return native, f"{torch.cuda.get_device_name(device)}{'' if native else ' has no bf16'}"
    caps = torch.cpu.get_capabilities()
    units = [unit for unit in ("amx_bf16", "avx512_bf16") if caps.get(unit)]
    return bool(units), f"cpu with {', '.join(u.upper() for u in units)}" if units else "cpu without AMX or AVX512-BF16"


@functools.cache
def _auto(device_key: str) -> tuple[bool, str]:
    import torch

    return native_bf16(torch.device(device_key))


def _resolved(key: str, setting: str, bf16: str, fp32: str) -> str:
    """`setting` of params key `key`, with `auto` resolved on this job's device (said in its log)."""
    from align.devices import job_device

    if setting != "auto":
        return setting
    native, why = _auto(str(job_device()))
    resolved = bf16 if native else fp32
    print(f"{key}: auto -> {resolved} ({why})", flush=True)
    return resolved


@functools.cache
def model_dtype(setting: str) -> str:
    """`model.dtype` as this job computes it: float32, bfloat16 or float16."""
    return _resolved("model.dtype", setting, "bfloat16", "float32")


@functools.cache
def training_precision(setting: str) -> str:
    """`training.precision` as this job computes it: fp32, bf16 or fp16."""
    return _resolved("training.precision", setting, "bf16", "fp32")


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype a job trains (or scores) in for `training.precision` (`auto` resolved here)."""
    import torch

    return getattr(torch, TRAINING_TO_DTYPE[training_precision(precision)])


def planned_bytes(setting: str, on_gpu: bool) -> int:
    """Bytes per element the memory plan counts for a dtype or precision setting: `auto` as bf16 on a GPU (every
    card the presets name has it) and as float32 on a CPU (a node without bf16 units resolves it so)."""
    if setting == "auto":
        return 2 if on_gpu else 4
    return BYTES[setting]


def recorded(params: dict[str, Any]) -> dict[str, str]:
    """What an out's manifest records of its precision: each of `model.dtype` and `training.precision` that its
    params subset holds, as this job resolved it (so an `auto` run says what it ran in)."""
    found = {}
    if isinstance(params.get("model"), dict) and "dtype" in params["model"]:
        found["model.dtype"] = model_dtype(params["model"]["dtype"])
    if isinstance(params.get("training"), dict) and "precision" in params["training"]:
        found["training.precision"] = training_precision(params["training"]["precision"])
    return found
