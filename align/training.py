"""The training base every learning stage builds on (SFT / principle engraving, reward model, PPO, DPO).

LoRA adapters (PEFT) on a model loaded from an HF folder, trained by a DeepSpeed engine whose config comes from
`params.training`, in 1 process or N (the submission layer exports MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK).
At ZeRO-3 the model is partitioned over the ranks while it loads (align/sharding.py).

The loop is generic: a stage supplies `batches(i)`, the i-th micro-batch of one global deterministic stream, and
`loss_fn(engine, batch)`. At step s, rank r, accumulation micro-step a, the loop takes micro-batch
`(s * accumulation + a) * world_size + r`, so the data of a step depends only on the step and the global batch
(not on how it is split over ranks), and resuming needs no replay of an iterator.

Checkpoints are DeepSpeed's (`save_checkpoint`, trainable parameters and optimizer state only) in
`ckpt_dir/step_XXXXXXXX`; the `latest` file naming the newest one is written by rank 0 with write-then-rename only
after every rank has finished writing, so whatever `latest` names is complete. A rerun resumes from it with the
same step count, data position, RNG states and loss curve. The signal SLURM sends before a time limit or at a
preemption stops the loop at the end of the step (or at a safe point inside it) with a checkpoint, and the job is
requeued (`slurm.preemption`).

Typical use, inside the job function a stage hands to `slurm.submit.submit`:

    tok = AutoTokenizer.from_pretrained(model_dir)
    batches = shuffled_batches([tokenize_pair(tok, p, r) for p, r in pairs], training.micro_batch_size, seed,
                               functools.partial(collate, pad_id=padding_id(tok)))
    result = train(model_dir, batches, sft_loss, ckpt_dir, training, max_steps, adapter_dir=out, seed=seed)
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import re
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from align.artifacts import digest, staged_out, verify_artifact
from align.devices import config_dtype, job_device, to_device
from align.errors import UserError, first_line
from align.generation import with_system
from align.losses import token_nll_sum
from align.models import padding_id, prompt_ids
from align.params import TrainingRun
from align.paths import MODEL
from align.precision import torch_dtype, training_precision
from align.records import write_json
from align.sharding import partitioned, world_size
from slurm import preemption
from slurm.submit import COLLECTIVE_TIMEOUT, free_port

LATEST = "latest"
TAG = re.compile(r"^step_(\d{8})(_[a-z]+)?$")  # a step's end, or a safe point inside it

Batch = dict[str, torch.Tensor]
Batches = Callable[[int], Batch]  # global micro-batch index -> micro-batch
# (engine or model, micro-batch) -> scalar loss, or (loss, {name: scalar}) for per-step statistics (an accuracy)
LossFn = Callable[[Any, Batch], "torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]"]
OnStep = Callable[[int, dict], None]  # (step index, {"loss", "lr", stats}) on rank 0, resumed steps replayed first


# ---------------------------------------------------------------------------------------------- configuration


def deepspeed_config(training: TrainingRun, world_size: int) -> dict:
    """The DeepSpeed config for `training` on `world_size` data-parallel ranks: its global batch
    (`training.batch_size`) split into micro-batches of `micro_batch_size` per rank, the rest accumulated.

    The optimizer is torch's AdamW (`torch_adam`): LoRA optimizer state is small, and DeepSpeed's FusedAdam /
    DeepSpeedCPUAdam are C++ ops JIT-compiled on first use (about a minute, and a compiler on every node). With
    CPU offload that also needs `zero_force_ds_cpu_optimizer: false`. Parameter offload exists only in ZeRO-3.
    On one rank without offload there is nothing to shard, so ZeRO runs as stage 0: stage 2's gradient buckets
    and flat partitions cost ~5% of an RM training step on this 2-core CPU (2.2 vs 2.3 s) and save no memory.
    """
    offload, precision = training.offload == "cpu" and training.zero_stage > 0, training_precision(training.precision)
    zero: dict[str, Any] = {"stage": training.zero_stage if world_size > 1 or offload else 0}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if training.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    config: dict[str, Any] = {
        "train_batch_size": training.batch_size,
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": training.accumulation(world_size),
        "gradient_clipping": training.max_grad_norm,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": training.learning_rate, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                       "torch_adam": True},
        },
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,  # the loop logs; DeepSpeed's own step log would be noise
        "wall_clock_breakdown": False,
    }
    if offload:
        config["zero_force_ds_cpu_optimizer"] = False
    return config


# ------------------------------------------------------------------------------------------- distributed setup


def init_distributed() -> tuple[int, int]:
    """Join the process group described by the environment (1 process where none is set); returns (rank, world).

    On a machine without CUDA, DeepSpeed must be told to use its CPU accelerator before it first looks
    (DS_ACCELERATOR), and the backend is gloo; on CUDA each task uses the GPU of its local rank, with nccl. A
    collective that waits longer than the job's `collective_timeout_min` (exported by the submission layer; else
    DeepSpeed's 10 minutes) fails the job instead of hanging it.
    """
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed's CPU backend builds its shared-memory op with the first ninja on PATH; install.sh built it with
        # the one beside this interpreter. A system ninja (before 1.12) hashes the build command differently, so
        # each switch between the two rebuilt the op (~25 s): a job or test run without the venv on PATH did.
        own = str(Path(sys.executable).parent)
        if os.environ.get("PATH", "").split(os.pathsep)[0] != own:
            os.environ["PATH"] = os.pathsep.join([own, os.environ.get("PATH", "")])
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    if cuda:
        torch.cuda.set_device(job_device())
    backend = "nccl" if cuda else "gloo"
    timeout = os.environ.get(COLLECTIVE_TIMEOUT)
    deepspeed.init_distributed(dist_backend=backend, **({"timeout": timedelta(minutes=float(timeout))} if timeout
                                                        else {}))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    print(f"rank {rank} of {world} on {job_device()} ({backend})", flush=True)  # each task's log says where it ran
    return rank, world


# ---------------------------------------------------------------------------------------------- model, engine


def lora_config(training: TrainingRun, task_type: str) -> Any:
    """PEFT's LoRA config from `training` for a "CAUSAL_LM" or "SEQ_CLS" model. `lora_targets` is PEFT's `all-linear`
    (every linear layer but the output head or the classifier: any architecture's names) or a list of module
    names; a list is passed as one, the keyword as the string PEFT looks for."""
    from peft import LoraConfig

    targets = training.lora_targets
    return LoraConfig(r=training.lora_r, lora_alpha=training.lora_alpha, lora_dropout=training.lora_dropout,
                      target_modules=targets if isinstance(targets, str) else list(targets), task_type=task_type)


def lora_model(model_dir: Path | str, training: TrainingRun, seed: int = 0, head: str = "lm") -> torch.nn.Module:
    """The HF model in `model_dir` with fresh LoRA adapters on the layers `training.lora_targets` names; only the
    adapters are trainable. Seeded so every rank (and every rerun) starts from the same adapter (and head) init.

    head "lm": the causal LM. head "reward": the same trunk with a fresh scalar head read at the last non-pad
    token (transformers' sequence-classification model, 1 label); PEFT trains and saves that head with the
    adapter (`modules_to_save`), so the adapter folder alone turns the base model into the reward model.

    Where the job trains at ZeRO-3 (`deepspeed_config`: several ranks, or offload), the model is partitioned as it
    loads (`align.sharding.partitioned`): no rank holds it whole, on the host or its GPU, at any time; the adapters
    PEFT adds are small and whole until `make_engine` partitions them too.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    dtype = torch_dtype(training.precision)
    with partitioned(deepspeed_config(training, world_size())):  # ZeRO-3: each rank loads its shard alone
        if head == "reward":
            model = reward_trunk(model_dir, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        return get_peft_model(checkpointed(model, training), lora_config(training, "SEQ_CLS" if head == "reward"
                                                                          else "CAUSAL_LM"))


def checkpointed(model: torch.nn.Module, training: TrainingRun) -> torch.nn.Module:
    """`model` keeping no decoder layer's activations for the backward pass, recomputing them there instead, with
    `training.gradient_checkpointing`: a layer's activations grow with micro-batch x sequence length, and on a
    large model they, not the LoRA weights, fill the GPU. Non-reentrant (torch's recommended form), so it needs no
    input that requires grad, which a frozen base under LoRA lacks. transformers recomputes a layer only while the
    layer itself is in training mode, so the decoder layers are put in it and nothing else: their attention and
    LoRA dropouts keep their own mode (`fit` switches everything to training mode anyway; the policy stage keeps
    dropout off)."""
    if training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in model.modules():
            if getattr(layer, "gradient_checkpointing", False) is True:
                layer.training = True  # this module alone, not its children (`train()` would set them all)
    return model


def recomputes(model: torch.nn.Module) -> bool:
    """Whether `model` (or the engine or PEFT model around it) runs gradient checkpointing now: transformers then
    drops a KV cache passed to its layers, so a forward over a cached prefix must not be used."""
    return any(getattr(m, "gradient_checkpointing", False) is True and m.training for m in model.modules())


def reward_trunk(model_dir: Path | str, dtype: torch.dtype) -> torch.nn.Module:
    """The model in `model_dir` as a 1-label sequence classifier (its LM head dropped, a scalar head added),
    told which token is padding so it reads each row's score at its last real token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pad = padding_id(AutoTokenizer.from_pretrained(model_dir))
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=dtype, pad_token_id=pad)


def lr_scheduler(training: TrainingRun, total_steps: int) -> Callable[[Any], Any]:
    """`training.lr_schedule` after a linear warm-up over `warmup_ratio` of `total_steps` (rounded up, as the HF
    Trainer does), as a callable DeepSpeed applies to its optimizer; DeepSpeed steps it at every optimizer step
    and keeps its state in checkpoints."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    warmup = math.ceil(total_steps * training.warmup_ratio)
    if training.lr_schedule == "cosine":
        return functools.partial(get_cosine_schedule_with_warmup, num_warmup_steps=warmup,
                                 num_training_steps=total_steps)
    return functools.partial(get_constant_schedule_with_warmup, num_warmup_steps=warmup)


def make_engine(model: torch.nn.Module, training: TrainingRun, world_size: int, total_steps: int | None = None) -> Any:
    """A DeepSpeed engine over the trainable parameters of `model` (call `init_distributed` first); with
    `total_steps`, the learning rate follows `training.lr_schedule`, else it stays constant."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    schedule = lr_scheduler(training, total_steps) if total_steps else None
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, lr_scheduler=schedule,
                                      config=deepspeed_config(training, world_size))
    return engine


# ------------------------------------------------------------------------------------------------ checkpoints


def latest_checkpoint(ckpt_dir: Path | str) -> str | None:
    """The tag of the newest complete checkpoint (what `latest` names), or None."""
    path = Path(ckpt_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine: Any, ckpt_dir: Path | str, state: dict, keep: int, others: dict | None = None,
                    phase: str | None = None, own: Any = None) -> None:
    """Save engine + `state` (+ every rank's RNG state) as `step_<step>`, then point `latest` at it, then drop
    all but the newest `keep` (collective: every rank calls it). `others` ({name: engine}, e.g. PPO's value
    model) are saved first under `ckpt_dir/<name>/step_<step>`, so whatever `latest` names has all of them. A
    checkpoint inside step `state["step"]` after `phase` (a safe point: `end_of_step`) is `step_<step>_<phase>` and
    also holds every rank's `own`, its part of the unfinished step (gathered to rank 0 as the RNG states are: a
    rollout is small beside the model).

    DeepSpeed's own `latest` is written by rank 0 as soon as rank 0's files are written, before the closing
    barrier, so it may name a checkpoint whose other-rank shards are still being written; it is switched off
    here and `latest` is written after `save_checkpoint` returns (its final barrier: every rank is done).
    """
    import torch.distributed as dist

    ckpt_dir = Path(ckpt_dir)
    tag = f"step_{state['step']:08d}" + (f"_{phase}" if phase else "")
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, (_rng_state(), own))
    loop = {**state, "rng": [rng for rng, _ in ranks], **({"own": [mine for _, mine in ranks]} if phase else {})}
    folders = [ckpt_dir / name for name in others or {}] + [ckpt_dir]
    if dist.get_rank() == 0:  # a folder of this name can only be a crashed attempt's: start it clean
        for folder in folders:  # (the others wait in save_checkpoint's first barrier)
            shutil.rmtree(folder / tag, ignore_errors=True)
    for name, other in (others or {}).items():
        other.save_checkpoint(str(ckpt_dir / name), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"loop": loop}, save_latest=False,
                           exclude_frozen_parameters=True)
    if dist.get_rank() == 0:
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
        kept = sorted((p.name for p in ckpt_dir.iterdir() if TAG.match(p.name) and p.name <= tag), reverse=True)[:keep]
        for folder in folders:  # older ones, and any left by an abandoned later run
            for path in folder.iterdir():
                if TAG.match(path.name) and path.name not in kept:
                    shutil.rmtree(path, ignore_errors=True)
    dist.barrier()


def load_checkpoint(engine: Any, ckpt_dir: Path | str, others: dict | None = None) -> dict | None:
    """Restore engine (and `others`, as saved by `save_checkpoint`), optimizer and this rank's RNG from the newest
    complete checkpoint; its client state or None where there is none. Frozen base weights are not in
    checkpoints (they come from the model folder). A checkpoint saved inside a step gives this rank's part of that
    step as `own`, where the job has as many ranks as the one that saved it (else the step starts over)."""
    import torch.distributed as dist

    tag = latest_checkpoint(ckpt_dir)
    if tag is None:
        return None
    for name, other in (others or {}).items():
        _load(other, Path(ckpt_dir) / name, tag)
    client_state = _load(engine, Path(ckpt_dir), tag)
    state = client_state["loop"]  # the rest of client_state is DeepSpeed's own metadata
    rngs, owns = state.pop("rng"), state.pop("own", None)
    if len(rngs) == dist.get_world_size():
        _set_rng_state(rngs[dist.get_rank()])
        if owns is not None:
            state["own"] = owns[dist.get_rank()]
    return state


def _load(engine: Any, folder: Path, tag: str) -> dict:
    """`engine`'s checkpoint `tag` from `folder`, its client state; a checkpoint DeepSpeed cannot read (a truncated
    file, one saved by another LoRA size, ZeRO stage or number of ranks) is one line naming it and the way out."""
    try:
        path, client_state = engine.load_checkpoint(str(folder), tag=tag, load_module_strict=False)
    except Exception as exc:  # noqa: BLE001 - whatever DeepSpeed or torch.load raise, the user's fix is the same
        cause = first_line(exc, 200)
    else:
        if path is not None:
            return client_state
        cause = "DeepSpeed found no checkpoint there"
    raise UserError(f"{folder / tag}: this checkpoint does not load ({cause}); it was saved by another layout (LoRA "
                    f"size, zero_stage, ranks) or is damaged: move {folder} aside to start the stage over")


def end_of_step(engine: Any, ckpt_dir: Path | str, state: dict, keep: int, every: int, last: int,
                others: dict | None = None, say: Callable[[str], None] | None = None, unit: str = "step",
                phase: str | None = None, own: Any = None) -> None:
    """After step `state["step"]` (PPO: an iteration) - or, with `phase`, at a safe point inside that step after
    `phase`, with `own` this rank's part of the unfinished step - on every rank: checkpoint every `every` steps, at
    `last`, and whenever a time-limit or preemption signal reached any rank (`slurm.preemption`; inside a step only
    then); after a signal, requeue the job, whose next allocation resumes here - unless the run is complete, or the
    signal was the SIGTERM of `scancel` or of the time limit itself (`preemption.requeue_refused`): the job then
    ends. A safe point inside a step must come before the step's first optimizer step: resumed on another number of
    ranks, the step starts over. The checkpoint's duration is kept in `state["seconds"]["checkpoint"]`."""
    import torch.distributed as dist

    signalled = preemption.stop_requested(engine.device)
    if signalled or (phase is None and (state["step"] % every == 0 or state["step"] == last)):
        started = time.perf_counter()
        save_checkpoint(engine, ckpt_dir, state, keep, others=others, phase=phase, own=own)
        state.setdefault("seconds", {})["checkpoint"] = time.perf_counter() - started  # saved with the next one
    if not signalled or (phase is None and state["step"] >= last):
        return
    refused = preemption.requeue_refused(signalled) if dist.get_rank() == 0 else None
    if say:
        where = f"{unit} {state['step']}" + (f" after its {phase}" if phase else "")
        say(f"signalled at {where}: checkpoint saved, " + (f"not requeued: {refused}" if refused else "requeueing"))
    if refused or dist.get_rank() != 0:  # rank 0 alone requeues; the others end with no result (not a failure)
        sys.exit(0)
    preemption.requeue(signalled)


# ------------------------------------------------------------------------------------------------------- loop


def resumed_steps(engine: Any, ckpt_dir: Path | str, state: dict, last: int, *, keep: int, every: int,
                  others: dict | None = None, log: Callable[[str], None] | None = print,
                  on_step: OnStep | None = None, unit: str = "step") -> Iterator[int]:
    """The loop protocol every training job shares (`fit`, PPO), as a generator of step numbers. `state` is the
    caller's loop state, fresh ("step": 0, "curves": [], anything else picklable); it is first updated in place
    from the newest checkpoint in `ckpt_dir` (with every rank's RNG), the resumed curve is replayed to `on_step`,
    and time-limit and preemption signals are deferred. Where that checkpoint was saved at a safe point inside a
    step, `state["own"]` holds this rank's part of that step (`end_of_step`), for the caller to take (pop) before
    it goes on with the step. Then, for each step until `state["step"]` reaches `last`, the caller does the step
    (calling `end_of_step` with its `phase` at the step's safe points), appends its row to `state["curves"]` and
    increments `state["step"]`; after it, `on_step` sees the row (rank 0) and `end_of_step` checkpoints and
    honours a signal (requeue)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    state.update(load_checkpoint(engine, ckpt_dir, others=others) or {})
    if log and rank == 0 and state["step"]:
        log(f"resumed from {ckpt_dir}/{latest_checkpoint(ckpt_dir)} at {unit} {state['step']}")
    preemption.defer()  # a time-limit or preemption signal from here on stops at a safe point, with a checkpoint
    if on_step and rank == 0:
        for step, row in enumerate(state["curves"]):
            on_step(step, row)
    while state["step"] < last:
        yield state["step"]
        if on_step and rank == 0:
            on_step(state["step"] - 1, state["curves"][-1])
        end_of_step(engine, ckpt_dir, state, keep, every, last, others=others, say=log if rank == 0 else None,
                    unit=unit)
    preemption.release()


def fit(engine: Any, batches: Batches, loss_fn: LossFn, ckpt_dir: Path | str, training: TrainingRun,
        max_steps: int, log: Callable[[str], None] | None = print, on_step: OnStep | None = None,
        items: Callable[[Batch], int] | None = None) -> dict:
    """Train `engine` up to optimizer step `max_steps`, resuming from `ckpt_dir` where a checkpoint exists.

    Step s takes examples s x G .. (s + 1) x G - 1 of the stream (G = `training.batch_size`), however they are cut
    into micro-batches and spread over ranks, so a run resumes after a change of micro-batch size or GPU count.
    With `items` (the loss items of a micro-batch: an SFT batch's labelled tokens), each micro-batch gets
    `batch["items_norm"]`, the step's items over its micro-batches, for a loss summed over its items and divided by
    it: the step's gradient is then the mean over every item of the global batch, not a mean of micro-batch means
    that would weigh a token by the length of its neighbours (and change with the micro-batch size).

    Checkpoints every `training.save_every_steps` steps and at `max_steps` (so a rerun with a larger `max_steps`
    continues exactly there). Returns {"losses": the per-step loss of every step 0..max_steps-1, resumed steps
    included, each the mean over the global batch; "lrs": the learning rate of each of those steps; "stats":
    per step, the means of the statistics the loss function returns; "start_step": where this run began;
    "step": where it ended}. `on_step` sees every step on rank 0 as {"loss", "lr", statistics}, the resumed ones
    first (replayed from the checkpoint), so a curve written by it is continuous across restarts.
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    accum, micro = engine.gradient_accumulation_steps(), training.micro_batch_size
    global_batch = engine.train_batch_size()
    state = {"step": 0, "curves": [], "train_batch_size": global_batch}
    ran = 0
    engine.train()
    for _ in resumed_steps(engine, ckpt_dir, state, max_steps, keep=training.keep_checkpoints,
                           every=training.save_every_steps, log=log, on_step=on_step):
        if state["train_batch_size"] != global_batch:  # the folder's key includes the batch: reused by hand
            raise UserError(f"{ckpt_dir}: its checkpoint was trained with {state['train_batch_size']} examples per "
                            f"step, this run has {global_batch}; it belongs to another run: remove {ckpt_dir} to "
                            f"start this one over")
        lr = float(engine.get_lr()[0])  # the rate this step's update uses (the scheduler moves after it)
        first = state["step"] * global_batch // micro  # the step's first micro-batch in the stream
        norm = None
        if items is not None:
            norm = sum(items(batches(first + i)) for i in range(accum * world)) / (accum * world)
        sums: dict[str, torch.Tensor] = {}  # "loss" and the loss function's statistics, summed over micro-batches
        for step_micro in range(accum):
            batch = batches(first + step_micro * world + rank)
            if norm is not None:
                batch["items_norm"] = torch.tensor(max(norm, 1e-8))
            out = loss_fn(engine, to_device(batch, engine.device))
            loss, stats = out if isinstance(out, tuple) else (out, {})
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            for name, value in {"loss": loss, **stats}.items():
                sums[name] = sums.get(name, 0) + value.detach().float()
        names = sorted(sums)
        totals = torch.stack([sums[n] for n in names])
        dist.all_reduce(totals)
        state["curves"].append({"lr": lr, **{n: t / (accum * world) for n, t in zip(names, totals.tolist())}})
        state["step"] += 1
        ran += 1
        if log and rank == 0:
            log(f"step {state['step']}/{max_steps} loss {state['curves'][-1]['loss']:.4f} lr {lr:.3g}")
    curves = state["curves"]
    return {"losses": [row["loss"] for row in curves], "lrs": [row["lr"] for row in curves],
            "stats": [{k: v for k, v in row.items() if k not in ("loss", "lr")} for row in curves],
            "start_step": state["step"] - ran, "step": state["step"]}


def save_adapter(engine: Any, out: Path | str) -> None:
    """Write the trained LoRA adapter with PEFT's `save_pretrained` (rank 0; collective under ZeRO-3).

    Under ZeRO-3 each rank holds only a shard of every parameter (the module's own tensors are empty), so
    PEFT's plain `save_pretrained` would write empty tensors; the adapter weights are gathered first and passed
    in as `state_dict`. Written beside `out` and renamed into place so `out` is never half-written.
    """
    import deepspeed
    import torch.distributed as dist

    model, out = engine.module, Path(out)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    zero3 = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None, enabled=zero3):
        if dist.get_rank() == 0:
            tmp = out.with_name(f".{out.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, state_dict={n: p.detach().cpu().clone() for n, p in named})
            sort_target_modules(tmp / "adapter_config.json")
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
    dist.barrier()


def sort_target_modules(config_file: Path) -> None:
    """PEFT writes `target_modules` from a set, in an order that changes with the interpreter's hash seed: sorted,
    the same adapter gets the same bytes (and artifact id) in every run."""
    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def train(model_dir: Path | str, batches: Batches, loss_fn: LossFn, ckpt_dir: Path | str, training: TrainingRun,
          max_steps: int, *, adapter_dir: Path | str | None = None, seed: int = 0, head: str = "lm",
          log: Callable[[str], None] | None = print, on_step: OnStep | None = None,
          items: Callable[[Batch], int] | None = None) -> dict:
    """The whole recipe in one call (every rank calls it): join the process group, LoRA-wrap the model (`head`
    as in `lora_model`), build the engine (learning-rate schedule over `max_steps`), `fit` (`items` as there), and
    save the final adapter to `adapter_dir`. Returns `fit`'s result (the same on every rank)."""
    _, world = init_distributed()
    engine = make_engine(lora_model(model_dir, training, seed, head), training, world, total_steps=max_steps)
    result = fit(engine, batches, loss_fn, ckpt_dir, training, max_steps, log, on_step, items)
    if adapter_dir is not None:
        save_adapter(engine, adapter_dir)
    return result


def sft_job(model_dir: Path | str, pairs: list[tuple[str, str]], ckpt_dir: Path | str, training: TrainingRun,
            max_steps: int, *, adapter_dir: Path | str | None = None, seed: int = 0, loss_fn: LossFn | None = None,
            max_prompt_tokens: int | None = None, max_response_tokens: int | None = None,
            log: Callable[[str], None] | None = print, on_step: OnStep | None = None) -> dict:
    """A job function for `submit` (picklable with functools.partial): LoRA-SFT on chat (prompt, response) pairs,
    response tokens only, batches shuffled from `seed`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = [tokenize_pair(tokenizer, prompt, response, max_prompt_tokens, max_response_tokens)
                for prompt, response in pairs]
    batches = shuffled_batches(examples, training.micro_batch_size, seed,
                               functools.partial(collate, pad_id=padding_id(tokenizer)))
    return train(model_dir, batches, loss_fn or sft_loss, ckpt_dir, training, max_steps, adapter_dir=adapter_dir,
                 seed=seed, log=log, on_step=on_step, items=labelled_tokens)


# ------------------------------------------------------------------------------------------------------ data


def tokenize_pair(tokenizer: Any, prompt: str, response: str, max_prompt_tokens: int | None = None,
                  max_response_tokens: int | None = None, system: str | None = None) -> dict[str, list[int]]:
    """Chat-formatted (prompt, response) as input_ids, with labels -100 on the prompt so only the response
    (through its end-of-turn token) is learned. Prompt and response are tokenized separately so the boundary is
    exact whatever the tokenizer merges across it. Over-long prompts lose their start (the template's opening
    and the question's beginning, keeping the turn header the response follows); over-long responses their end.
    `system`: a system message before the user's turn. The prompt gets the one BOS generation gives it
    (`prompt_ids`)."""
    user = with_system(tokenizer, [{"role": "user", "content": prompt}], system)
    prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise UserError(f"model.chat_template: the chat template of {getattr(tokenizer, 'name_or_path', 'the model')} "
                        f"does not render the prompt as a prefix of the whole conversation (it rewrites the turns before "
                        f"the answer), so the answer tokens cannot be told apart; set model.chat_template to one that "
                        f"does (a Jinja file) or to plain, and rerun import_model")
    query = prompt_ids(tokenizer, prompt_text)
    response_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    query = query[-max_prompt_tokens:] if max_prompt_tokens else query
    response_ids = response_ids[:max_response_tokens] if max_response_tokens else response_ids
    return {"input_ids": query + response_ids, "labels": [-100] * len(query) + response_ids}


def merge_adapter(model_dir: Path | str, adapter_dir: Path | str, out: Path | str) -> None:
    """A plain HF folder (weights + tokenizer) of the model in `model_dir` with the LoRA adapter folded in, for
    stages that load a model rather than a model plus adapter (generation with vLLM, the next training stage)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, config_dtype(model_dir)))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    generation_config = Path(model_dir) / "generation_config.json"
    if generation_config.is_file():
        shutil.copy(generation_config, Path(out) / "generation_config.json")


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> Batch:
    """Right-pad tokenized examples into input_ids / attention_mask / labels tensors (labels padded with -100)."""
    width = max(len(e["input_ids"]) for e in examples)
    batch: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        pad = width - len(e["input_ids"])
        batch["input_ids"].append(e["input_ids"] + [pad_id] * pad)
        batch["attention_mask"].append([1] * len(e["input_ids"]) + [0] * pad)
        batch["labels"].append(e["labels"] + [-100] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def _batch_at(examples: list, micro_batch_size: int, seed: int, collate_fn: Callable[[list], Batch],
              index: int) -> Batch:
    picked = []
    for position in range(index * micro_batch_size, (index + 1) * micro_batch_size):
        epoch, offset = divmod(position, len(examples))
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch))
        picked.append(examples[order[offset]])
    return collate_fn(picked)


def shuffled_batches(examples: list, micro_batch_size: int, seed: int,
                     collate_fn: Callable[[list], Batch]) -> Batches:
    """`batches` for `fit`: micro-batch i holds examples i*m .. i*m+m-1 of an endless stream that visits
    `examples` once per epoch in an order drawn from `seed + epoch`. A pure function of i (picklable)."""
    return functools.partial(_batch_at, examples, micro_batch_size, seed, collate_fn)


def grouped_order(keys: list[tuple[int, ...]], micro_batch_size: int, group: int, seed: int,
                  head: int = 0) -> list[int]:
    """One epoch's order of the examples whose padded widths are `keys`, drawn from `seed`. Shuffled; the first
    `head` left as drawn (they complete a micro-batch the previous epoch began); the rest taken `group`
    micro-batches at a time and laid out as a grid: sorted by the key's last width, cut into about sqrt(group)
    strips, each strip sorted by the first width, then cut into micro-batches, so each micro-batch holds examples
    close in both widths and pads little (a sort by one width leaves the other at random: 0.75 of the plain
    draw's padded tokens against 0.66 for the grid, on RM pairs of the HHH texts at 4 pairs a micro-batch). The
    whole micro-batches come in shuffled order, so a loss curve shows no length trend; the one short piece the
    last group may leave comes last (the next epoch's head completes it)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(keys), generator=generator).tolist()
    strip = micro_batch_size * max(1, round(math.sqrt(group)))
    ranked = []
    for start in range(head, len(order), micro_batch_size * group):
        by_last = sorted(order[start : start + micro_batch_size * group], key=lambda i: keys[i][-1])
        for cut in range(0, len(by_last), strip):
            ranked += sorted(by_last[cut : cut + strip], key=lambda i: keys[i][0])
    whole = len(ranked) - len(ranked) % micro_batch_size
    drawn = torch.randperm(whole // micro_batch_size, generator=generator).tolist()
    return order[:head] + [i for k in drawn for i in ranked[k * micro_batch_size : (k + 1) * micro_batch_size]] + \
        ranked[whole:]


class GroupedBatches:
    """`batches` for `fit` with `shuffled_batches`' contract (micro-batch i holds examples i*m .. i*m+m-1 of an
    endless stream that visits every example once per epoch; a pure function of i, picklable), each epoch in
    `grouped_order` from `seed + epoch`. An epoch's order is computed once and kept while the stream is in it
    (with the previous one, for the micro-batch that straddles them)."""

    def __init__(self, examples: list, micro_batch_size: int, seed: int, collate_fn: Callable[[list], Batch],
                 keys: list[tuple[int, ...]], group: int):
        self.examples, self.micro_batch_size, self.seed, self.collate_fn = examples, micro_batch_size, seed, collate_fn
        self.keys, self.group = keys, group
        self.orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        """Epoch `epoch`'s order; its head fills the micro-batch the stream's previous epoch left short."""
        if epoch not in self.orders:
            self.orders = {e: o for e, o in self.orders.items() if abs(e - epoch) <= 1}
            head = -epoch * len(self.examples) % self.micro_batch_size
            self.orders[epoch] = grouped_order(self.keys, self.micro_batch_size, self.group, self.seed + epoch, head)
        return self.orders[epoch]

    def __call__(self, index: int) -> Batch:
        n, m = len(self.examples), self.micro_batch_size
        return self.collate_fn([self.examples[self.order(p // n)[p % n]] for p in range(index * m, (index + 1) * m)])


def length_grouped_batches(examples: list, micro_batch_size: int, seed: int, collate_fn: Callable[[list], Batch],
                           keys: list[tuple[int, ...]], group: int) -> Batches:
    """`batches` for `fit` whose micro-batches hold examples of similar `keys` (their padded widths), so less of
    each is padding (`GroupedBatches`); `group` 1 is the plain `shuffled_batches` draw, as before there was a
    choice."""
    if group == 1:
        return shuffled_batches(examples, micro_batch_size, seed, collate_fn)
    return GroupedBatches(examples, micro_batch_size, seed, collate_fn, keys, group)


def sft_loss(model: Any, batch: Batch) -> torch.Tensor:
    """Causal-LM cross-entropy summed over the micro-batch's labelled (response) tokens, over the step's mean
    labelled tokens per micro-batch (`fit` sets `items_norm`; a lone batch is its own step): the step's gradient is
    the token mean over its whole batch (align/losses.py token_nll_sum)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, count = token_nll_sum(logits, batch["labels"])
    return total / batch.get("items_norm", count.clamp(min=1))


def labelled_tokens(batch: Batch) -> int:
    """An SFT micro-batch's loss items (`fit`'s `items`): the tokens it learns."""
    return int((batch["labels"][:, 1:] != -100).sum())


# ---------------------------------------------------------------------------------------- a training stage's run

CHECKPOINTS = Path("checkpoints")  # checkpoints/<stage>/<key>: kept until the out is in place (not a DVC out)


class LiveCurve:
    """`on_step` for the training loop: one dvclive step per optimizer step (plots/metrics/<name>.tsv in
    `folder`), restarted from step 0 on every run, which the loop replays from its checkpoint first.

    Each step appends its rows and rewrites the summary; dvclive's `next_step` is not used: it re-reads every
    curve file to build a DVC Studio update even where none is sent, so a step's cost grew with the run's length
    (3000 steps took 16 s, most of it re-reading the curves, against 1.5 s now)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.live = None

    def __call__(self, step: int, metrics: dict) -> None:
        if self.live is None:
            from dvclive import Live

            self.live = Live(str(self.folder), resume=False, save_dvc_exp=False, dvcyaml=None)
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, value)
        self.live.make_summary()


def checkpoint_dir(stage: str, key: dict) -> Path:
    """Where a stage's run keeps its checkpoints: one folder per params+inputs, so a changed run starts fresh
    and an interrupted identical run resumes."""
    return CHECKPOINTS / stage / digest(key)[:16]


def step_count(examples: int, epochs: float, training: TrainingRun) -> int:
    """Optimizer steps for `epochs` passes over `examples` at the global batch (whatever the GPU count)."""
    return max(1, math.ceil(epochs * examples / training.batch_size))


def finish_training(out: Path, *, stage: str, params: dict, inputs: dict, adapter: Path, ckpt_dir: Path,
                    base: Path | None, write: Callable[[Path], dict]) -> str | None:
    """How every training stage's job ends. Rank 0 builds the out in a temporary folder: the trained adapter, the
    merged model (`model/`) where `base` is given (the reward model keeps only its adapter), what `write(folder)`
    adds, and the metrics it returns as metrics.json; swaps it into place, removes the run's checkpoints (the out
    now holds what they were for) and returns the out's id. Every other rank returns None."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    with staged_out(out, stage=stage, params=params, inputs=inputs) as tmp:
        shutil.copytree(adapter, tmp / "adapter")
        if base is not None:
            merge_adapter(base, tmp / "adapter", tmp / MODEL)
        write_json(tmp / "metrics.json", write(tmp))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return verify_artifact(out)

