"""The bytes each model of a job takes, per GPU and per node's host memory, as pure functions of the counted model
(`Shape`) and an explicit layout: the arithmetic behind `python -m align.plan` (align/plan.py maps params and a
cluster profile to these layouts and adds the roles of each job up).

The counts follow what the pipeline's code holds:
- training (align/training.py): LoRA adapters on a frozen base under DeepSpeed ZeRO, each trained parameter's
  bytes counted as DeepSpeed's own estimators count them (tests/test_memory.py checks the two agree); at ZeRO-3 the
  model partitioned as it loads (zero.Init, align/sharding.py: no rank holds it whole, on its GPU or its host), at
  the other stages loaded whole by every rank; the activations autograd keeps for a micro-batch, with or without
  gradient checkpointing;
- a frozen model scoring or generating with transformers (align/scoring.py, align/reward.py, the hf backend):
  whole on one device, or spread over several (`shard_scorers`: a device map, or ZeRO-3 over the ranks), with its
  KV cache, one layer's working tensors and the logits read;
- vLLM (align/generation.py): its weights per tensor-parallel rank, its KV cache, one scheduled batch's
  activations and its sampler's logits.
A figure is live bytes: allocator slack on a GPU is not in it (the plan's table shows how full each GPU gets).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GiB = 2**30
HOST_BUFFER = 1.5  # host bytes of model states x this: DeepSpeed's estimators' additional_buffer_factor
CUDA_CONTEXT = 1 * GiB  # per process on a GPU: CUDA context, cuBLAS workspace, NCCL buffers
PROCESS_HOST = 2 * GiB  # per process on a node: the interpreter with torch, transformers, DeepSpeed, CUDA libraries


@dataclass(frozen=True)
class Shape:
    """A causal LM as counted from its config.json (align/plan.py `count_model`)."""

    params: int  # every parameter, a tied one once
    head: int  # the output head's own parameters (0 where it is tied to the input embedding)
    largest: int  # the most parameters one module holds itself (DeepSpeed's largest_layer_params)
    lora_dims: int  # sum of in + out features over the LoRA-targeted linear layers: an adapter of rank r has r x this
    lora_layers: int  # LoRA-targeted linear layers
    lora_inputs: int  # sum of the widths of the distinct inputs those layers read (q, k, v share one)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int  # max_position_embeddings: vLLM's default max_model_len

    @property
    def trunk(self) -> int:
        """Parameters of the reward and value models: the trunk with a 1-label scalar head instead of the LM head."""
        return self.params - self.head + self.hidden

    def lora(self, rank: int) -> int:
        return rank * self.lora_dims

    def kv_per_token(self, w: int, tp: int = 1) -> int:
        """KV cache bytes per token on one of `tp` tensor-parallel ranks: keys and values of every layer, the KV
        heads split over the ranks (each rank keeps at least one)."""
        return 2 * self.layers * max(1, self.kv_heads // tp) * self.head_dim * w


@dataclass(frozen=True)
class Need:
    """Bytes one role (or several held together) takes: per GPU and per node's host memory, while held and at
    the peak of its loading (a model is loaded on the host before it moves to its GPU)."""

    gpu: int = 0
    host: int = 0
    gpu_peak: int = 0
    host_peak: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpu_peak", max(self.gpu_peak, self.gpu))
        object.__setattr__(self, "host_peak", max(self.host_peak, self.host))


def together(needs: list[Need]) -> Need:
    """Roles loaded one after another and then held at once: each one's loading peak comes on top of what the
    roles before it hold."""
    held, peak = Need(), Need()
    for need in needs:
        peak = Need(gpu_peak=max(peak.gpu_peak, held.gpu + need.gpu_peak),
                    host_peak=max(peak.host_peak, held.host + need.host_peak))
        held = Need(held.gpu + need.gpu, held.host + need.host)
    return Need(held.gpu, held.host, peak.gpu_peak, peak.host_peak)


def one_after_another(needs: list[Need]) -> Need:
    """Roles of which only one is held at a time: the largest of each figure."""
    return Need(*(max((getattr(n, f) for n in needs), default=0) for f in ("gpu", "host", "gpu_peak", "host_peak")))


# ------------------------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class Zero:
    """How DeepSpeed holds a trained model: ZeRO stage, offload, ranks, the weights' dtype bytes and the dtype
    bytes each rank loads the checkpoint in on the host."""

    stage: int  # as DeepSpeed runs it (align/training.py runs stage 0 on one rank without offload)
    weight_bytes: int
    load_bytes: int
    ranks_per_node: int
    nodes: int = 1
    offload_optimizer: bool = False  # only at stage >= 1
    offload_params: bool = False  # only at stage 3
    zero_init: bool = False  # stage 3 partitions the model as it loads (zero.Init): no rank loads it whole

    @property
    def ranks(self) -> int:
        return self.ranks_per_node * self.nodes


@dataclass(frozen=True)
class States:
    """Model states per GPU, and per node's host memory: each rank's copy while loading, the offloaded share
    once trained."""

    gpu: int
    host_load: int
    host_held: int

    @property
    def host(self) -> int:
        """The host's peak, as DeepSpeed's `*_all_cold` estimators give it."""
        return int(max(self.host_load, self.host_held) * HOST_BUFFER)


def model_states(trainable: int, frozen: int, largest: int, z: Zero) -> States:
    """Weights, gradients and Adam states of `trainable` parameters on a frozen base of `frozen` parameters.

    Per trained parameter, as DeepSpeed's estimators count them (w: the weights' dtype bytes):
      weights w; the gradient w at stages 0-2; the fp32 gradient the optimizer steps on, 4 (at stages 0-2 only
      where w < 4: a fp32 gradient is its own copy); fp32 master weights 4 (not at stage 0 in fp32: the optimizer
      steps the weights themselves); Adam's m and v, 8.
    ZeRO-1 shards the optimizer's share (fp32 gradient, master, m, v) over the N ranks, ZeRO-2 the w gradient too,
    ZeRO-3 the weights too, gathering one module's weights and gradients at a time (2w x largest). A frozen
    parameter takes w, sharded at ZeRO-3 only. Offload moves the optimizer's share to the host (and, at ZeRO-3,
    the sharded weights); the w gradient then goes there directly (none stays on the GPU past stage 1).
    Host per node: every rank loads the whole model there first (load bytes each), the offloaded shares later;
    with `zero_init` (stage 3) a rank loads one module at a time (the largest: DeepSpeed's zero_init=1 figure).
    """
    w, n, stage = z.weight_bytes, z.ranks, z.stage
    grad = w if stage < 3 else 0
    grad32 = 4 if w < 4 or stage == 3 else 0
    master = 0 if stage == 0 and w == 4 else 4
    optimizer = grad32 + master + 8
    if z.offload_optimizer and stage >= 1:
        grad_on_gpu = grad if stage == 1 else 0
        held = trainable * 16 * z.ranks_per_node // n  # fp32 gradient, master, m, v: each rank's 1/N share
        gpu = trainable * grad_on_gpu
    else:
        held = 0
        gpu = trainable * grad // (n if stage >= 2 else 1) + trainable * optimizer // (n if stage >= 1 else 1)
    weights = (trainable + frozen) * w
    if stage == 3:
        gpu += 2 * w * largest
        if z.offload_params:
            held += weights * z.ranks_per_node // n
        else:
            gpu += weights // n
    else:
        gpu += weights
    loaded = largest if z.zero_init and stage == 3 else trainable + frozen
    return States(gpu=gpu, host_load=z.ranks_per_node * loaded * z.load_bytes, host_held=held)


def activations(shape: Shape, rows: int, tokens: int, w: int, *, checkpointing: bool, lora_rank: int,
                logit_tokens: int) -> int:
    """Bytes autograd holds at the peak of one micro-batch's step: `rows` sequences of `tokens` tokens, the loss
    read at `logit_tokens` positions of each row (0: a scalar head).

    Per token and decoder layer (attention and a gated MLP, the Llama family; within 3% of SmolLM2-135M's measured
    peak in fp32 (tests/test_plan.py) and in bf16):
      w x (heads + 2 kv_heads) x head_dim    queries, keys and values attention keeps
      w x 3 x intermediate                   the gate, the up projection and the activated gate the MLP keeps
      w x (LoRA inputs + r x LoRA layers)    what each adapter's A and B matrices read
      4 x 2 x hidden + 4 x heads             both RMSNorms' fp32 inputs, attention's log-sum-exp
    plus 4 x hidden per token for the final norm. With gradient checkpointing a layer keeps only its input
    (w x hidden) and the backward pass recomputes one layer at a time (its tensors and their gradients: 2 layers'
    worth). At the backward pass's start the loss adds 12 x vocab per logit position: the fp32 log-softmax it
    kept, its gradient and the logits' gradient."""
    layer = (w * ((shape.heads + 2 * shape.kv_heads) * shape.head_dim + 3 * shape.intermediate
                  + shape.lora_inputs // shape.layers + lora_rank * shape.lora_layers // shape.layers)
             + 8 * shape.hidden + 4 * shape.heads)
    kept = shape.layers * (w * shape.hidden if checkpointing else layer) + 4 * shape.hidden
    logits = 12 * shape.vocab * rows * logit_tokens
    recompute = 2 * layer * rows * tokens if checkpointing else 0
    return kept * rows * tokens + max(logits, recompute)


@dataclass(frozen=True)
class Trained:
    """One trained model of a job: LoRA of `lora_rank` on the causal LM (head "lm") or on the reward trunk with
    its scalar head trained whole (head "reward"), on `rows` x `tokens` per micro-batch."""

    zero: Zero
    lora_rank: int
    rows: int
    tokens: int
    logit_tokens: int
    checkpointing: bool
    head: str = "lm"
    on_gpu: bool = True


def training(shape: Shape, t: Trained) -> Need:
    """A rank's trained model: model states and activations on its GPU (at ZeRO-3 never more of the model than
    its shard and the module gathered: it is partitioned as it loads); on the host what each rank loads, then
    the offloaded states. On a CPU-only job the device is the host: one copy, the ranks' side by side. The
    process itself (CUDA context, interpreter) is the job's, counted once (align/plan.py)."""
    params = shape.params if t.head == "lm" else shape.trunk
    # a reward head trains whole: PEFT trains a copy of it (modules_to_save), the original stays in `params`, frozen
    trainable = shape.lora(t.lora_rank) + (shape.hidden if t.head == "reward" else 0)
    states = model_states(trainable, params, shape.largest, t.zero)
    acts = activations(shape, t.rows, t.tokens, t.zero.weight_bytes, checkpointing=t.checkpointing,
                       lora_rank=t.lora_rank, logit_tokens=t.logit_tokens)
    if not t.on_gpu:
        return Need(host=t.zero.ranks_per_node * (states.gpu + acts) + states.host_held)
    return Need(gpu=states.gpu + acts, host=int(states.host_held * HOST_BUFFER), host_peak=states.host)


# ----------------------------------------------------------------------------------------------------- inference


def forward_activations(shape: Shape, rows: int, tokens: int, w: int, keep: int) -> tuple[int, int, int]:
    """One forward pass without gradients over `rows` x `tokens`: (the KV cache it builds, one layer's working
    tensors at a time (w x (4 hidden + q, k, v + 3 intermediate) per token), per row the logits of `keep`
    positions with their fp32 copy and log-softmax ((w + 8) x vocab each))."""
    working = w * (4 * shape.hidden + (shape.heads + 2 * shape.kv_heads) * shape.head_dim + 3 * shape.intermediate)
    return rows * tokens * shape.kv_per_token(w), rows * tokens * working, rows * keep * (w + 8) * shape.vocab


@dataclass(frozen=True)
class Frozen:
    """A frozen model (transformers) run on `rows` x `tokens` at a time: the causal LM reading `keep` logit
    positions per row, or the reward trunk (head "reward", no logits); whole on one device, or spread over
    `devices` GPUs: by a device map in one process, or with `over_ranks` by ZeRO-3 over that many ranks."""

    weight_bytes: int
    rows: int
    tokens: int
    keep: int = 1
    head: str = "lm"
    on_gpu: bool = True
    ranks_per_node: int = 1  # ranks each holding one (PPO's reward model), or a shard of one (`over_ranks`)
    devices: int = 1
    over_ranks: bool = False


def frozen(shape: Shape, f: Frozen) -> Need:
    """Per GPU:
      whole: the weights and the forward pass (`forward_activations`), loaded on the host first;
      device map: the weights and the KV cache of 1/devices of the layers each (`align.devices.device_map` splits
        them evenly), one layer's working tensors, the logits (on the last GPU); loaded whole on the host first;
      ZeRO-3 (`over_ranks`): a 1/devices shard of the weights and the module being gathered (2 w x the largest),
        and the rank's own whole forward pass; loaded one module at a time (align/sharding.py)."""
    params = shape.params if f.head == "lm" else shape.trunk
    w = f.weight_bytes
    weights = params * w
    kv, working, logits = forward_activations(shape, f.rows, f.tokens, w, f.keep if f.head == "lm" else 0)
    if not f.on_gpu:
        return Need(host=f.ranks_per_node * (weights + kv + working + logits))
    if f.over_ranks:
        return Need(gpu=weights // f.devices + 2 * w * shape.largest + kv + working + logits,
                    host_peak=f.ranks_per_node * shape.largest * w)
    if f.devices > 1:
        return Need(gpu=(weights + kv) // f.devices + working + logits, host_peak=weights)
    return Need(gpu=weights + kv + working + logits, host_peak=f.ranks_per_node * weights)


def generation(shape: Shape, f: Frozen, new_tokens: int) -> Need:
    """transformers `generate` (the hf backend): `rows` prompts of `tokens` tokens grow by `new_tokens`, their KV
    cache kept; the prompt's forward is the largest working set, one row of logits per step."""
    return frozen(shape, replace(f, tokens=f.tokens + new_tokens, keep=1))


# ------------------------------------------------------------------------------------------------------------ vLLM


@dataclass(frozen=True)
class Engine:
    """A vLLM engine: weight dtype bytes, tensor parallelism, its KV cache (a fixed size, else what
    `utilization` x the device's memory leaves) and the tokens and sequences it schedules in one step."""

    weight_bytes: int
    tp: int
    batched_tokens: int
    max_seqs: int
    kv_cache: int | None  # bytes per GPU (generation.kv_cache_gb); None: sized from utilization
    utilization: float
    device_bytes: int | None  # one GPU's memory (on a CPU-only job: the node's, None where unknown)
    on_gpu: bool = True
    ranks_per_node: int = 1  # ranks each running one (PPO's rollouts)


@dataclass(frozen=True)
class EngineNeed:
    need: Need
    kv: int  # the KV cache it gets, per GPU
    kv_min: int  # what one sequence of the model's full context needs: vLLM refuses to start with less


def vllm(shape: Shape, e: Engine) -> EngineNeed:
    """Per GPU: weights / tp; one step's activations, batched_tokens x w x (4 hidden + (q, k, v + 3 intermediate)
    / tp); the sampler's fp32 logits, max_seqs x vocab x 4; the KV cache; the engine process's CUDA context.
    Given a fixed KV cache that is the figure; sized by `utilization`, vLLM takes utilization x the device and the
    KV cache is what the rest leaves. On the host: the engine's process (and on a CPU-only job everything)."""
    weights = shape.params * e.weight_bytes // e.tp
    acts = e.batched_tokens * e.weight_bytes * (
        4 * shape.hidden + ((shape.heads + 2 * shape.kv_heads) * shape.head_dim + 3 * shape.intermediate) // e.tp)
    acts += e.max_seqs * shape.vocab * 4
    kv_min = shape.context * shape.kv_per_token(e.weight_bytes, e.tp)
    processes = (1 + e.tp if e.tp > 1 else 1) * PROCESS_HOST  # the engine's core process (and a worker per rank)
    if not e.on_gpu:  # the host holds it all: the ranks' KV caches, or utilization x the node's memory
        kv = e.tp * e.kv_cache if e.kv_cache is not None else \
            int(e.utilization * e.device_bytes) if e.device_bytes is not None else kv_min
        host = e.ranks_per_node * (e.tp * weights + e.tp * acts + kv + processes)
        return EngineNeed(Need(host=host), kv // e.tp, kv_min)
    if e.kv_cache is not None:
        kv = e.kv_cache
        total = weights + acts + kv + CUDA_CONTEXT
    else:
        total = int(e.utilization * (e.device_bytes or 0))
        kv = total - weights - acts - CUDA_CONTEXT
    return EngineNeed(Need(gpu=total, host=e.ranks_per_node * processes), kv, kv_min)
