"""Where a job's models and tensors live, decided in one place: the GPU of the task's local rank where CUDA is
present (the submission layer starts one task per GPU and exports LOCAL_RANK), else the CPU. Inference models are
loaded in the dtype their folder was saved in on a GPU and in float32 on a CPU, as vLLM does, so the hf backend,
the scorer and vLLM see the same numbers.
"""

from __future__ import annotations

import json
import os
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


def inference_dtype(model: Path | str, device: torch.device) -> torch.dtype:
    import torch

    return getattr(torch, config_dtype(model)) if device.type == "cuda" else torch.float32


def load_causal_lm(model: Path | str, *, trust_remote_code: bool = False) -> tuple[Any, Any, torch.device]:
    """(tokenizer, model in eval mode on the job's device in its inference dtype, that device)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = job_device()
    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=inference_dtype(model, device),
                                              trust_remote_code=trust_remote_code).to(device).eval()
    return tokenizer, lm, device
