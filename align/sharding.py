"""A model spread over the job's ranks with DeepSpeed ZeRO-3, so that no rank ever holds all of it: for training
(align/training.py) and for forward-only scoring in a job that runs a rank per GPU (the reward model of
`train_rm`'s evaluation and of the policy stage; align/reward.py). docs/memory.md says which job spreads how.

- Loading: with transformers' `HfDeepSpeedConfig` alive, `from_pretrained` builds the model under
  `deepspeed.zero.Init` and each rank keeps 1/N of every parameter as it loads (rank 0 reads each module's weights
  from the checkpoint, one module gathered at a time); a model loaded without it is whole on every rank until
  `deepspeed.initialize` partitions it.
- Scoring: every module's forward gathers its weights from all ranks, a collective, so every rank must run as many
  forward passes as the others, whatever rows it has: `Lockstep` runs a placeholder forward on a rank that has
  run out of rows until no rank has any left.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:
    import torch

ScoreFn = Callable[[Sequence[str], Sequence[str], Sequence[Any]], list[float]]


def world_size() -> int:
    """Ranks of the job's process group (1 where there is none)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextlib.contextmanager
def partitioned(config: dict) -> Iterator[None]:
    """Models loaded with `from_pretrained` inside are partitioned over the ranks as they load, where `config` (a
    DeepSpeed config) runs ZeRO-3; as they are elsewhere. Kept alive only while loading: transformers reads it
    later only to make `generate` collective, which nothing here uses."""
    if config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(config)  # transformers holds a weak reference: alive while this name is
    try:
        yield
    finally:
        del keep


def inference_config(dtype: torch.dtype) -> dict:
    """ZeRO-3 for a frozen model in `dtype` on this job's ranks: no optimizer, one row per step (a required field
    that forward passes do not read). The dtype flags also set the dtype `zero.Init` partitions in."""
    import torch

    return {
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": world_size(),
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,
    }


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether ZeRO-3 holds `model`'s weights (DeepSpeed marks each parameter it partitions with a `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def merge_lora(model: Any) -> torch.nn.Module:
    """PEFT's `merge_and_unload` for a model whose base weights may be ZeRO-3 partitioned: each adapted layer's
    weight is gathered (collective: every rank walks the layers in the same order), the LoRA product added to it on
    rank 0 and partitioned again from rank 0's copy."""
    if not is_partitioned(model):
        return model.merge_and_unload()
    import deepspeed
    from peft.tuners.lora import LoraLayer

    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        with deepspeed.zero.GatheredParameters([layer.get_base_layer().weight], modifier_rank=0):
            layer.merge()
    return model.unload()  # the merged base layers in place of the LoRA ones


def zero3_inference(model: torch.nn.Module) -> Any:
    """`model` (loaded under `partitioned`) as a DeepSpeed engine in eval mode whose forward gathers each module's
    weights from the ranks as it runs; call it as the model."""
    import deepspeed

    config = inference_config(next(model.parameters()).dtype)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # DeepSpeed's eval() returns nothing
    return engine


class Lockstep:
    """A ZeRO-3 model's forward passes kept in step across the ranks: before each one every rank says whether it
    has a pass to run (one all-reduce), and `finish` runs a one-token placeholder pass on this rank while any other
    still has passes to run. Every rank must reach `finish` once its own passes are done."""

    def __init__(self, model: Any, device: torch.device, pad_id: int):
        self.model, self.device, self.pad_id = model, device, pad_id

    def _any(self, mine: bool) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(mine)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __call__(self, **inputs: Any) -> Any:
        self._any(True)
        return self.model(**inputs)

    def finish(self) -> None:
        import torch

        one = torch.tensor([[self.pad_id]], device=self.device)
        while self._any(False):
            self.model(input_ids=one, attention_mask=torch.ones_like(one))


def rows_over_ranks(score: ScoreFn) -> ScoreFn:
    """`score`, a collective every rank calls with rows of its own, as a function every rank calls with the same
    rows: rank r scores rows r, r + N, r + 2N, ...; every rank gets every row's value, in order."""
    import torch.distributed as dist

    def shared(prompts: Sequence[str], responses: Sequence[str], guides: Sequence[Any]) -> list[float]:
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = score(prompts[rank::world], responses[rank::world], guides[rank::world])
        every: list[list[float]] = [[] for _ in range(world)]
        dist.all_gather_object(every, mine)
        values = [0.0] * len(prompts)
        for r, part in enumerate(every):
            values[r::world] = part
        return values

    return shared
