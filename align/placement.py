"""Where the policy stage's roles run in its allocation, and how trainer ranks reach rollout engines that run on
nodes of their own.

Two layouts (`cluster.policy.placement`), both one SLURM allocation whose tasks (submitit's one srun step) each
learn their role from their rank:
- colocated: every task is a trainer rank holding every role, its vLLM engine over the rank's own
  `tensor_parallel_size` GPUs (gpus_per_node = tasks_per_node x tensor_parallel_size). The current adapter reaches
  the engine through a folder on the shared filesystem, merged from the engine's node-local base copy.
- split: the last `engine_nodes` nodes run rollout engines only, `gpus_per_node / tensor_parallel_size` per node
  (one per node on CPU); the other nodes run the trainer ranks, one per GPU, with the policy, the reference, PPO's
  value model and the reward model (spread over them with `shard_scorers`). The trainers alone form the job's
  torch.distributed group (DeepSpeed's collectives never wait on an engine). Engine e serves a contiguous block of
  trainer ranks: prompts go to it and samples come back through a TCP store trainer rank 0 hosts; after each update
  trainer rank 0 broadcasts the LoRA factors to every engine worker over a process group of their own
  (align/weight_sync.py), each worker merging its tensor-parallel shard. The engine reads base weights from disk
  only at start.

As the peers lay out RL: OpenRLHF puts vLLM engines and trainers in separate Ray placement groups, TRL's
`vllm-serve` runs the engine as a server on its own nodes with NCCL weight sync; here SLURM is the scheduler.
The stores' ports are the job's MASTER_PORT + 1 (requests) and + 2 (weights), on trainer rank 0's node.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from contextlib import suppress
from dataclasses import asdict, dataclass
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.errors import UserError, first_line
from align.params import Resources

if TYPE_CHECKING:  # the plan reads `Layout` on the login node without torch
    from align.generation import Completion, Generator, Sampling

REQUESTS_PORT, WEIGHTS_PORT = 1, 2  # offsets from the job's MASTER_PORT (slurm/submit.py keeps both below 32768)
FAILED = "failed"  # the store key an engine that fails writes its error under, for the trainers waiting on it
POLL = datetime.timedelta(seconds=5)  # how often a wait looks whether an engine failed


@dataclass(frozen=True)
class Layout:
    """The policy job's tasks and what each runs (from `cluster.policy`)."""

    placement: str  # colocated | split
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    tensor_parallel_size: int
    engine_nodes: int  # split: the last nodes, engines only

    @classmethod
    def of(cls, res: Resources) -> Layout:
        return cls(res.placement, res.nodes, res.tasks, res.gpus_per_node, res.tensor_parallel_size,
                   res.engine_nodes)

    @property
    def split(self) -> bool:
        return self.placement == "split"

    @property
    def trainers(self) -> int:
        """Trainer ranks: every task colocated; the tasks of the nodes before the engine nodes split."""
        return (self.nodes - (self.engine_nodes if self.split else 0)) * self.tasks_per_node

    @property
    def engines_per_node(self) -> int:
        return max(1, self.gpus_per_node // self.tensor_parallel_size)

    @property
    def engines(self) -> int:
        """Rollout engines: one per trainer rank colocated, `engines_per_node` per engine node split."""
        return self.engine_nodes * self.engines_per_node if self.split else self.trainers

    @property
    def sync_world(self) -> int:
        """The weight group: trainer rank 0, then every tensor-parallel worker of every engine."""
        return 1 + self.engines * self.tensor_parallel_size

    def role(self, rank: int) -> tuple[str, int]:
        """("trainer", its rank among the trainers), ("engine", its index) or ("idle", -1) for the task of global
        `rank` (SLURM's block distribution: a node's tasks have consecutive ranks); an engine node's tasks past its
        `engines_per_node` have nothing to run."""
        if not self.split or rank < self.trainers:
            return "trainer", rank
        node, local = divmod(rank - self.trainers, self.tasks_per_node)
        return ("engine", node * self.engines_per_node + local) if local < self.engines_per_node else ("idle", -1)

    def served_by(self, engine: int) -> list[int]:
        """The trainer ranks engine `engine` samples for: a contiguous block, so that its requests in rank order are
        the rollout's prompts in order."""
        share = self.trainers // self.engines
        return list(range(engine * share, (engine + 1) * share))

    def check(self, backend: str, rollout_adapter: str) -> None:
        """One line for a layout the allocation cannot hold, before any job."""
        where, tp, gpus, tasks = "params.yaml: cluster.policy", self.tensor_parallel_size, self.gpus_per_node, \
            self.tasks_per_node
        if not self.split:
            if self.engine_nodes:
                raise UserError(f"{where}.engine_nodes: {self.engine_nodes} but placement is colocated (engines beside "
                                f"each trainer rank); set placement: split or engine_nodes: 0")
            if gpus and backend != "hf" and gpus != tasks * tp:
                # colocated: each rank trains on one of its own tp GPUs and samples with an engine spanning them all
                raise UserError(f"{where}: each of the {tasks} ranks per node samples with a vLLM engine over its own "
                                f"tensor_parallel_size: {tp} GPUs, which needs gpus_per_node: {tasks * tp} (it is "
                                f"{gpus}); set tasks_per_node: {max(1, gpus // tp)} or tensor_parallel_size: "
                                f"{max(1, gpus // tasks)}")
            return
        if backend == "hf":
            raise UserError(f"{where}.placement: split serves rollouts from vLLM engines; generation.backend: hf has "
                            f"none (set generation.backend: vllm or auto, or placement: colocated)")
        if rollout_adapter != "merged":
            raise UserError(f"{where}.placement: split sends the adapter to the engines as LoRA factors merged into "
                            f"their weights; set rl.rollout_adapter: merged")
        if not 1 <= self.engine_nodes < self.nodes:
            raise UserError(f"{where}.engine_nodes: {self.engine_nodes} of nodes: {self.nodes}; placement: split puts "
                            f"the rollout engines on nodes of their own and the trainers on the rest: engine_nodes from "
                            f"1 to {max(1, self.nodes - 1)} (nodes: {self.engine_nodes + 1} or more)")
        if gpus and tp > gpus:
            raise UserError(f"{where}.tensor_parallel_size: {tp} spans more GPUs than an engine node has "
                            f"(gpus_per_node: {gpus})")
        if gpus and gpus % tp:
            raise UserError(f"{where}.tensor_parallel_size: {tp} does not divide gpus_per_node: {gpus}: each engine "
                            f"node holds whole engines of {tp} GPUs")
        if gpus and tasks != gpus:
            raise UserError(f"{where}.tasks_per_node: {tasks}; placement: split runs one trainer rank per GPU: set "
                            f"tasks_per_node: {gpus} (or null)")
        if self.trainers % self.engines:
            raise UserError(f"{where}: {self.engines} engines ({self.engine_nodes} nodes x {self.engines_per_node}) "
                            f"cannot serve {self.trainers} trainer ranks in equal blocks; make the trainer ranks a "
                            f"multiple of the engines")


# ---------------------------------------------------------------------------------------------- the two engines


class LocalEngine:
    """Colocated: this rank's own engine; the current adapter goes to it through `folder`. Between two calls the
    engine rests (vLLM's sleep mode on a GPU): the scoring and the update have its memory."""

    def __init__(self, generator: Generator, policy: Any, folder: Path):
        self.generator, self.policy, self.folder = generator, policy, folder

    @property
    def tokenizer(self) -> Any:
        return self.generator.tokenizer

    def sample(self, texts: list[str], sampling: Sampling, adapted: bool) -> list[Completion]:
        """`texts` answered by the policy as it is now (`adapted`) or by the SFT model; every trainer rank calls it
        at the same point (saving the adapter is collective under ZeRO-3)."""
        from align.training import save_adapter

        if adapted:
            save_adapter(self.policy, self.folder)
        outs = self.generator.generate(texts, sampling, adapter=self.folder if adapted else None) if texts else []
        self.generator.rest()
        return outs

    def close(self) -> None:
        self.generator.close()


@dataclass(frozen=True)
class Order:
    """Trainer rank 0's word to every engine for one round: stop, or the weights to sample with (`key` None: the
    SFT model) and whether they come now over the weight group (`send`)."""

    stop: bool
    key: str | None = None
    send: bool = False
    spec: list | None = None  # what is broadcast, in order (align/weight_sync.py spec_of)
    scale: float = 0.0


class RemoteEngine:
    """Split: the engines on the engine nodes, reached from each trainer rank. A round is one `sample` call on every
    trainer rank: rank 0 posts the round's order (and broadcasts the factors if they changed), each rank posts its
    prompts and waits for its samples."""

    def __init__(self, sft_dir: Path, layout: Layout, rank: int, policy: Any, timeout_min: float):
        from transformers import AutoTokenizer

        from align.weight_sync import adapter_group

        self.tokenizer = AutoTokenizer.from_pretrained(sft_dir)  # what the engines tokenize with: the same folder
        self.layout, self.rank, self.policy = layout, rank, policy
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.store = requests_store(host, port, rank == 0, timeout_min)
        # the weight group needs every engine worker: rank 0 waits here until the engines have started
        self.group = adapter_group(host, port + WEIGHTS_PORT, layout.sync_world, 0, policy.device, timeout_min) \
            if rank == 0 else None
        self.rounds = count()
        self.held: str | None = None  # what the engines hold: the SFT model at start

    def sample(self, texts: list[str], sampling: Sampling, adapted: bool) -> list[Completion]:
        """As `LocalEngine.sample`: collective over the trainer ranks (the factors are gathered under ZeRO-3)."""
        from align.weight_sync import factors_key, lora_factors, send, spec_of

        n = next(self.rounds)
        # gathered on every rank where ZeRO-3 shards them (a collective), else copied on rank 0 alone
        gather = adapted and (self.rank == 0 or self.policy.zero_optimization_stage() == 3)
        factors, scale = lora_factors(self.policy) if gather else ({}, 0.0)
        if self.rank == 0:
            key = factors_key(factors, scale) if adapted else None
            changed = key != self.held
            order = Order(False, key, changed, spec_of(factors) if adapted else None, scale)
            for engine in range(self.layout.engines):  # each engine takes (and deletes) its own copy
                post(self.store, f"round/{n}/{engine}", order)
            if changed and adapted:
                send(self.group, factors)  # returns once every engine worker has it
            self.held = key
        post(self.store, f"ask/{n}/{self.rank}", {"texts": texts, "sampling": sampling})
        return [completion(c) for c in take(self.store, f"answer/{n}/{self.rank}")]

    def close(self) -> None:
        """Rank 0 tells the engines to stop (they exit their task)."""
        if self.rank == 0:
            n = next(self.rounds)
            for engine in range(self.layout.engines):
                post(self.store, f"round/{n}/{engine}", Order(True))


def requests_store(host: str, port: int, host_it: bool, timeout_min: float) -> Any:
    """The store trainer rank 0 hosts at `port` + REQUESTS_PORT, every other task a client of it."""
    import torch.distributed as dist

    return dist.TCPStore(host, port + REQUESTS_PORT, is_master=host_it, wait_for_workers=False,
                         timeout=datetime.timedelta(minutes=timeout_min))


def post(store: Any, key: str, value: Any) -> None:
    """`value` (JSON, dataclasses as their fields) under `key`: prompts, orders and samples are text and numbers."""
    store.set(key, json.dumps(value, default=asdict))


def completion(fields: dict) -> Completion:
    """A `Completion` from its posted fields (JSON made its tuples lists)."""
    from align.generation import Completion

    return Completion(**{**fields, "token_ids": tuple(fields["token_ids"]), "logprobs": tuple(fields["logprobs"])})


def sampling(fields: dict) -> Sampling:
    """A `Sampling` from its posted fields."""
    from align.generation import Sampling

    return Sampling(**{**fields, "stop": tuple(fields["stop"])})


def take(store: Any, key: str) -> Any:
    """The value posted under `key` (then deleted from the store), waiting as long as it takes - a rollout may
    take hours - unless an engine posts its failure meanwhile."""
    while True:
        try:
            store.wait([key], POLL)
            break
        except Exception as exc:  # noqa: BLE001 - torch raises DistStoreError (a RuntimeError) on a wait's timeout
            if "timeout" not in str(exc).lower() and "timed out" not in str(exc).lower():
                raise
            if store.check([FAILED]):
                raise RuntimeError(f"a rollout engine failed: {store.get(FAILED).decode()}") from None
    value = json.loads(store.get(key))
    store.delete_key(key)
    return value


def serve(sft_dir: Path, engine_settings: Any, layout: Layout, engine: int, timeout_min: float) -> None:
    """An engine task's whole work: start the engine, join the weight group, then round after round take trainer
    rank 0's order and the prompts of the trainers it serves (in rank order, one vLLM call), and post their samples,
    until the order is stop. SLURM's signals are only recorded here: the trainers stop at their safe point and
    requeue the job, which ends this task."""
    from align.generation import Generator
    from align.weight_sync import Received
    from slurm import preemption

    preemption.defer()
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = requests_store(host, port, False, timeout_min)
    try:
        with preemption.shielded():  # vLLM's processes must outlive the signals until the trainers' safe point
            generator = Generator(sft_dir, engine_settings, merge_adapters=True)
        with generator:
            generator.join_adapter_group(host, port + WEIGHTS_PORT, layout.sync_world,
                                         1 + engine * layout.tensor_parallel_size, timeout_min)
            served = layout.served_by(engine)
            print(f"engine {engine} on {socket.gethostname()} serves trainer ranks {served[0]}-{served[-1]}",
                  flush=True)
            for n in count():
                order = Order(**take(store, f"round/{n}/{engine}"))
                if order.stop:
                    return
                if order.send:
                    generator.receive_adapter(order.spec, order.scale, order.key)
                asks = [take(store, f"ask/{n}/{r}") for r in served]
                started = time.perf_counter()
                answers = generator.generate_many([(a["texts"], sampling(a["sampling"])) for a in asks],
                                                  adapter=None if order.key is None else Received(order.key))
                for r, answer in zip(served, answers):
                    post(store, f"answer/{n}/{r}", answer)
                print(f"round {n}: {sum(len(a) for a in answers)} samples in {time.perf_counter() - started:.1f} s",
                      flush=True)
    except BaseException as exc:
        with suppress(Exception):  # the store itself may be what failed (trainer rank 0 gone)
            store.set(FAILED, f"engine {engine} on {socket.gethostname()}: {first_line(exc)}")
        raise


def engine_devices(layout: Layout, local_rank: int) -> None:
    """An engine task's GPUs: its slice of `tensor_parallel_size` of the node's devices as SLURM named them (the
    submission layer gave each task one GPU, a trainer's share, and kept the node's list)."""
    from slurm.submit import NODE_DEVICES, task_devices

    if layout.gpus_per_node:
        node = os.environ.get(NODE_DEVICES, os.environ.get("CUDA_VISIBLE_DEVICES")) or None
        os.environ["CUDA_VISIBLE_DEVICES"] = task_devices(node, local_rank, layout.engines_per_node,
                                                          layout.tensor_parallel_size)
