"""The policy's LoRA factors from the trainer rank that holds them to the workers of running vLLM engines, over
torch.distributed (gloo on CPU, NCCL on GPUs), instead of through an adapter folder on the shared filesystem.

A group of its own (`adapter_group`), made from a TCP store the sender hosts: the sender is rank 0 and each engine
worker (every tensor-parallel rank of every engine) one more rank. It needs no default process group, so it joins
processes that are in no group together otherwise: a trainer and the engine processes it spawned, or trainers and
engines on other nodes of the allocation. After each update the sender broadcasts B and A of every adapted module,
once; each worker folds them into its model as base + scale x B @ A (align/vllm_weights.py), taking its own
tensor-parallel shard through vLLM's loaders. The base weights come from a node-local copy the engine made at start,
never from the shared filesystem again.
"""

from __future__ import annotations

import datetime
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from align.vllm_weights import PEFT_PREFIX

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # checkpoint module name -> (B, A)
Spec = list[tuple[str, list[int], list[int]]]  # (module, B's shape, A's shape), in the order they are sent


def adapter_group(host: str, port: int, world: int, rank: int, device: torch.device,
                  timeout_min: float = 30) -> Any:
    """A process group of `world` ranks meeting at the store `host:port` (rank 0 hosts it): gloo for CPU tensors,
    NCCL where `device` is a GPU. Blocks until every rank has joined."""
    import torch.distributed as dist

    timeout = datetime.timedelta(minutes=timeout_min)
    store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world, options)
    return dist.ProcessGroupGloo(store, rank, world, timeout)


def broadcast(group: Any, tensor: torch.Tensor) -> None:
    """`tensor` from rank 0 into every rank's `tensor` (the same shape and dtype on each)."""
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def lora_factors(model: Any) -> tuple[Factors, float]:
    """(B and A of every adapted module by checkpoint name, the update's scale) of a PEFT LoRA model (or the
    engine around it), in float32 on the model's device; gathered whole where ZeRO-3 shards them (a collective:
    every trainer rank calls it)."""
    import deepspeed

    module = getattr(model, "module", model)
    config = module.peft_config[module.active_adapter]
    scale = config.lora_alpha / (config.r ** 0.5 if config.use_rslora else config.r)
    named = {n: p for n, p in module.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    zero3 = getattr(model, "zero_optimization_stage", lambda: 0)() == 3
    factors: dict[str, list[torch.Tensor | None]] = {}
    with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=None, enabled=zero3):
        for name, p in named.items():  # base_model.model.<module>.lora_A.<adapter name>.weight
            stem, _, rest = name.partition(".lora_")
            slot = factors.setdefault(stem.removeprefix(PEFT_PREFIX), [None, None])
            slot[0 if rest.startswith("B") else 1] = p.detach().float().clone()
    return {m: (b, a) for m, (b, a) in factors.items()}, scale  # type: ignore[misc]


def spec_of(factors: Factors) -> Spec:
    """What the receivers allocate, in the order the sender broadcasts: per module B's and A's shapes."""
    return [(module, list(b.shape), list(a.shape)) for module, (b, a) in sorted(factors.items())]


def send(group: Any, factors: Factors) -> int:
    """Broadcast every factor from rank 0, in `spec_of`'s order; the bytes sent."""
    sent = 0
    for _, (b, a) in sorted(factors.items()):
        for tensor in (b, a):
            broadcast(group, tensor.contiguous())
            sent += tensor.numel() * tensor.element_size()
    return sent


def receive(group: Any, spec: Spec, device: torch.device) -> Factors:
    """The factors rank 0 broadcasts (`send`), into float32 tensors on `device`."""
    factors = {}
    for module, b_shape, a_shape in spec:
        b, a = (torch.empty(shape, dtype=torch.float32, device=device) for shape in (b_shape, a_shape))
        broadcast(group, b)
        broadcast(group, a)
        factors[module] = (b, a)
    return factors


@dataclass(frozen=True)
class Received:
    """An adapter an engine holds because it was sent over its group (`key`: the factors' content), for
    `Generator.generate(adapter=...)` in place of a folder."""

    key: str


def factors_key(factors: Factors, scale: float) -> str:
    """The content of a set of factors, as `Received.key`."""
    import blake3

    digest = blake3.blake3(repr(scale).encode())
    for module, (b, a) in sorted(factors.items()):
        digest.update(module.encode())
        for tensor in (b, a):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def alongside(work: Callable[[], Any], other: Callable[[], Any]) -> Any:
    """`other()` in a thread while `work()` runs here; `work`'s result once both are done (an error of either is
    raised here; one of `work` at once). A process that both sends over a group and drives the engine whose workers receive must do the
    two at once: each blocks until the other side has joined or received."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            other()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    result = work()  # raised here, the other side waits for this one in vain: not joined (a daemon thread)
    thread.join()
    if failure:
        raise failure[0]
    return result
