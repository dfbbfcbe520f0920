"""`python -m align.plan [--params FILE] [--model FOLDER] [--table]`: before any job, whether every job of the DAG
fits the GPUs and host memory its `cluster` profile gives it, role by role, from the model's config.json alone.

The model is counted on the meta device (any architecture transformers knows, LoRA targets included, in seconds
for a 70B config); align/memory.py turns the count and a layout into bytes. This module maps params and profiles
to those layouts (each job's execution settings, `cluster.<job>`, read in one place: `hardware`), names the jobs
each dvc.yaml stage runs and what each job holds
at once (`STAGES`), and reports: the table (exit 0), or one line naming the first stage and role that cannot fit,
the bytes needed and available and the one setting that helps most (exit 2).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from align import paths
from align.artifacts import MANIFEST, read_manifest
from align.errors import EXIT_USER_ERROR, UserError
from align.memory import (
    CUDA_CONTEXT, PROCESS_HOST, Engine, EngineNeed, Frozen, GiB, Need, Shape, Trained, Zero, frozen, generation,
    one_after_another, together, training, vllm,
)
from align.models import EMBEDDED, HUB_ID, embedded_gguf, hub_reachable
from align.params import ALL_LINEAR, PARAMS_FILE, Params, Resources, load_params
from align.placement import Layout
from align.precision import BYTES, planned_bytes

CHARS_PER_TOKEN = 3  # a fixed text's tokens estimated from its characters (English under a BPE tokenizer: ~4)
TOKENS_PER_WORD = 2  # an instruction's tokens from prompts.max_words (~1.3 under a BPE tokenizer)
CHOICE_TOKENS = 128  # a multiple-choice answer's tokens, scored at every position (HHH's longest: a paragraph)
TEMPLATE_TOKENS = 128  # a generation prompt's own wording around the instructions it shows (align/templates.py)


# ------------------------------------------------------------------------------------------------- the model


def folder_config(folder: Path, key: str, trust_remote_code: bool) -> Any:
    """The transformers config of a model folder: only its config.json is read."""
    if not (folder / "config.json").is_file():
        raise UserError(f"{key}: {folder} has no config.json; expected a Hugging Face model folder (config.json is "
                        f"all the plan reads)")
    return read_config(str(folder), folder / "config.json", trust_remote_code)


def read_config(source: str, where: Path | str, trust_remote_code: bool, **kwargs: Any) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except (ValueError, KeyError, OSError) as exc:
        raise UserError(f"{where}: not a config transformers can read "
                        f"({(str(exc).strip().splitlines() or [type(exc).__name__])[0]})") from None


def model_config(ref: str, key: str, trust_remote_code: bool) -> Any:
    """The config of what `model.base` (or `evaluate.judge_model`, `key`) names: the embedded GGUF's metadata, a
    local folder's config.json, or a hub model's config.json alone (from the HF cache offline)."""
    if ref == EMBEDDED:
        gguf = embedded_gguf()
        return read_config(str(gguf.parent), gguf, trust_remote_code, gguf_file=gguf.name)
    path = Path(ref).expanduser()
    if path.is_dir():
        return folder_config(path, f"params.yaml: {key}", trust_remote_code)
    if HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        from huggingface_hub import hf_hub_download

        try:
            file = hf_hub_download(ref, "config.json", local_files_only=not hub_reachable())
        except Exception as exc:  # noqa: BLE001 - hub errors come in many classes; each is one line here
            raise UserError(f"params.yaml: {key}: the config.json of hub model '{ref}' is neither reachable nor "
                            f"cached ({type(exc).__name__}); pass --model with a folder holding it") from None
        return folder_config(Path(file).parent, f"params.yaml: {key}", trust_remote_code)
    raise UserError(f"params.yaml: {key}: {ref} not found; expected 'embedded', a local HF folder or a hub id")


def base_config(params: Params, model: Path | None) -> tuple[Any, bool]:
    """(config, whether import_model converts it from GGUF): `--model`, else models/base when import_model wrote it
    from the same `model.base`, else what `model.base` names."""
    trust = params.model.trust_remote_code
    if model is not None:
        return folder_config(model, "--model", trust), False
    base = params.model.base
    imported = (paths.BASE / MANIFEST).is_file() and read_manifest(paths.BASE).get("params", {}).get("model", {})
    if imported and imported.get("base") == base:
        return folder_config(paths.BASE, str(paths.BASE), trust), base == EMBEDDED
    return model_config(base, "model.base", trust), base == EMBEDDED


def count_model(config: Any, targets: str | list[str], trust_remote_code: bool = False) -> Shape:
    """The model built on the meta device (no memory, no weights) and counted: parameters, the largest module,
    the linear layers LoRA wraps (PEFT's rule: `all-linear` is every one but the output head; a name matches a
    module named so or ending in .name) and the widths of the inputs they read (siblings of one width read one)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, ImportError) as exc:
        raise UserError(f"config.json: model_type {config.model_type!r}: no causal LM transformers can build "
                        f"({(str(exc).strip().splitlines() or [type(exc).__name__])[0]})") from None
    head = model.get_output_embeddings()
    tied = head is None or head.weight is model.get_input_embeddings().weight
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    if targets != ALL_LINEAR:
        linears = [(n, m) for n, m in linears if any(n == t or n.endswith(f".{t}") for t in targets)]
        if not linears:
            raise UserError(f"params.yaml: training.lora_targets: no linear layer of this {config.model_type} model "
                            f"is named {', '.join(targets)}")
    text = config.get_text_config()
    heads = text.num_attention_heads
    return Shape(
        params=sum(p.numel() for p in model.parameters()),
        head=0 if tied else sum(p.numel() for p in head.parameters()),
        largest=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        lora_dims=sum(m.in_features + m.out_features for _, m in linears),
        lora_layers=len(linears),
        lora_inputs=sum(width for _, width in {(n.rpartition(".")[0], m.in_features) for n, m in linears}),
        layers=text.num_hidden_layers, hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=text.vocab_size,
        context=int(getattr(text, "max_position_embeddings", None) or 2048),  # vLLM's max_model_len, as generation.py
    )


# ----------------------------------------------------------------- execution settings: each group read in one place


@dataclass(frozen=True)
class TrainingSettings:
    micro_batch_size: int
    gradient_checkpointing: bool
    zero_stage: int
    offload: bool


@dataclass(frozen=True)
class GenerationSettings:
    use_vllm: bool  # the backend: vLLM (installed, and asked for or `auto`) or transformers
    tensor_parallel_size: int
    gpu_memory_utilization: float
    kv_cache_gb: float | None
    batch_size: int  # the hf backend's prompts per generate() call


def setting_key(name: str, job: str) -> str:
    """Where a job's execution setting is written: cluster.<job> (over cluster.defaults)."""
    return f"cluster.{job}.{name}"


# ------------------------------------------------------------------------------------------------- the hardware

# One GPU's memory in GB (2^30 bytes) by SLURM GRES type, compared without case, separators and an nvidia/tesla/amd
# prefix, the longest known prefix winning (a100pcie: a100); a type naming its size (a100_80gb,
# nvidia_h100_80gb_hbm3) is read from its name. A bare a100 is the 40 GB card: set gpu_memory_gb for the 80 GB one.
GPU_MEMORY_GB = {
    "p100": 16, "v100": 16, "t4": 16, "a10": 24, "a10g": 24, "a30": 24, "l4": 24, "rtx3090": 24, "rtx4090": 24,
    "rtx6000": 24, "a40": 48, "a6000": 48, "rtxa6000": 48, "l40": 48, "l40s": 48, "rtx8000": 48, "a100": 40,
    "a800": 80, "h100": 80, "h800": 80, "gh200": 96, "h200": 141, "b200": 180, "mi210": 64, "mi250": 64,
    "mi250x": 64, "mi300x": 192,
}
SIZE_IN_NAME = re.compile(r"(?<![a-z0-9])(\d+)gi?b?(?![a-z0-9])")


def gpu_memory_gb(res: Resources, key: str) -> float:
    """A job's GPU memory: `gpu_memory_gb`, else what its `gpu_type` names."""
    if res.gpu_memory_gb is not None:
        return res.gpu_memory_gb
    if res.gpu_type is None:
        raise UserError(f"params.yaml: cluster.{key}.gpu_memory_gb: the job has {res.gpus_per_node} GPUs of no stated "
                        f"type; set gpu_memory_gb (one GPU's memory in GB) or gpu_type (one of "
                        f"{', '.join(sorted(GPU_MEMORY_GB))})")
    name = res.gpu_type.lower()
    if sized := SIZE_IN_NAME.search(name):
        return float(sized.group(1))
    plain = re.sub(r"^(nvidia|tesla|amd)", "", re.sub(r"[^a-z0-9]", "", name))
    known = max((k for k in GPU_MEMORY_GB if plain.startswith(k)), key=len, default=None)
    if known is None:
        raise UserError(f"params.yaml: cluster.{key}.gpu_type: {res.gpu_type!r} is not a GPU the plan knows; set "
                        f"cluster.{key}.gpu_memory_gb (one GPU's memory in GB)")
    return float(GPU_MEMORY_GB[known])


@dataclass(frozen=True)
class Hardware:
    """What a job's profile gives it, and how the job computes there (its execution settings)."""

    key: str  # the job's profile: cluster.<key>
    gpus_per_node: int
    nodes: int
    ranks_per_node: int  # processes per node: one per GPU for training, one for every other job
    gpu_bytes: int | None  # one GPU's memory (None on a CPU-only job)
    host_bytes: int | None  # a node's memory the job may use (None: mem_gb 0 or null, the site's or the node's)
    gpu_source: str  # where gpu_bytes comes from, for the report
    training: TrainingSettings
    generation: GenerationSettings
    score_batch: int  # rows per forward pass of a frozen scorer
    shard_scorers: bool  # frozen scorers spread over the job's GPUs (ZeRO-3 over its ranks, else a device map)

    @property
    def on_gpu(self) -> bool:
        return self.gpus_per_node > 0

    @property
    def ranks_per_gpu(self) -> int:
        return -(-self.ranks_per_node // self.gpus_per_node) if self.gpus_per_node else 1

    @property
    def ranks(self) -> int:
        return self.ranks_per_node * self.nodes


def hardware(res: Resources, key: str, one_task: bool, backend: str) -> Hardware:
    """The profile of job `key` (`one_task`: a generation or scoring job: one process on one node) with its
    execution settings; `backend` is params' generation.backend."""
    gpus = res.gpus_per_node
    gb = gpu_memory_gb(res, key) if gpus else None
    host = res.mem_gb * GiB if res.mem_gb else res.mem_per_gpu_gb * gpus * GiB if res.mem_per_gpu_gb else None
    source = (f"cluster.{key}.gpu_memory_gb: {res.gpu_memory_gb:g}" if res.gpu_memory_gb is not None else
              f"cluster.{key}.gpu_type: {res.gpu_type}")
    installed = importlib.util.find_spec("vllm") is not None  # found, not imported: importing vLLM takes seconds
    return Hardware(key, gpus, 1 if one_task else res.nodes, 1 if one_task else res.tasks,
                    None if gb is None else int(gb * GiB), host, source,
                    TrainingSettings(res.micro_batch_size, res.gradient_checkpointing, res.zero_stage,
                                     res.offload == "cpu"),
                    GenerationSettings(backend == "vllm" or (backend == "auto" and installed), res.tensor_parallel_size,
                                       res.gpu_memory_utilization, res.kv_cache_gb, res.generate_batch_size),
                    res.score_batch_size, res.shard_scorers)


# ------------------------------------------------------------------------------------ what each job's rows hold


def asset_text(file: str | Path) -> str:
    """An asset's text as far as it reads: the plan only sizes it, and the stage that reads it refuses a missing or
    broken file with its own line right after the plan."""
    try:
        return Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def text_tokens(*files: str) -> int:
    """Tokens of fixed texts (templates, principles) estimated from their characters."""
    return sum(len(asset_text(f)) for f in files) // CHARS_PER_TOKEN


def instruction_tokens(params: Params) -> int:
    return params.prompts.max_words * TOKENS_PER_WORD


def longest_definitions(file: Path, count: int) -> int:
    """Tokens of the `count` longest principle definitions of a principles file: a guide shown to the RM."""
    lengths = []
    for line in asset_text(file).splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        lengths.append(len(row.get("definition", "")) if isinstance(row, dict) else 0)
    return sum(sorted(lengths, reverse=True)[:count]) // CHARS_PER_TOKEN


def rm_tokens(params: Params) -> int:
    """An RM prompt: the template, a guide of up to rm.max_principles principles, the instruction and the response
    cut to their limits."""
    return (text_tokens("assets/rm_prompt.txt") + longest_definitions(paths.PREFERENCE_PRINCIPLES,
                                                                       params.rm.max_principles)
            + params.rm.max_prompt_tokens + params.rm.max_response_tokens)


def judge_tokens(params: Params, answer_tokens: int) -> int:
    """A judge prompt: the template, a principle, an instruction and two answers."""
    return (text_tokens(str(paths.JUDGE_PROMPT)) + longest_definitions(paths.PREFERENCE_PRINCIPLES, 1)
            + instruction_tokens(params) + 2 * answer_tokens)


# ----------------------------------------------------------------------------------------------- jobs and roles


@dataclass(frozen=True)
class Role:
    name: str
    detail: str
    need: Need
    engine: EngineNeed | None = None  # a vLLM engine: its KV cache against one full-context sequence
    tp: int = 1  # GPUs a vLLM engine spans
    gpus: int = 0  # GPUs it may span: the node's for a generation job, the rank's one in PPO
    kv_source: str = ""  # the setting its KV cache size comes from


@dataclass(frozen=True)
class Job:
    stage: str
    hardware: Hardware | None  # None: the stage runs no job
    phases: list[list[Role]]  # held one after another; the roles of a phase at once
    note: str = ""  # why there is no job
    part: str = ""  # which of a job's nodes, where they hold different roles (the policy stage split: trainers, engines)

    def totals(self) -> list[Need]:
        """Per phase, its roles with the job's process (CUDA context per GPU, the interpreter per rank)."""
        hw = self.hardware
        process = Need(gpu=CUDA_CONTEXT if hw.on_gpu else 0, host=hw.ranks_per_node * PROCESS_HOST)
        return [together([process] + [r.need for r in phase]) for phase in self.phases]

    def peak(self) -> Need:
        return one_after_another(self.totals())


@dataclass(frozen=True)
class Settings:
    hardware: dict[str, Hardware]  # by job key: its profile and execution settings


@dataclass(frozen=True)
class Context:
    """What the plan does not change while it looks for a fix: params, the models' shapes and dtypes."""

    params: Params
    shape: Shape
    judge: Shape  # evaluate's independent judge (the base model where evaluate.judge_model is null)
    judge_bytes: int  # the judge folder's dtype bytes (on a GPU)
    gguf: bool  # import_model dequantises a GGUF file

    @property
    def saved_bytes(self) -> int:
        """Every model folder of the run (base, SFT, policy) is saved in model.dtype (`auto` planned as float32:
        the import job's node may lack bf16 units)."""
        return planned_bytes(self.params.model.dtype, on_gpu=False)

    def inference_bytes(self, hw: Hardware, folder_bytes: int | None = None) -> int:
        """Inference loads a folder's dtype (`folder_bytes`; the run's own folders by default) on a GPU; on a CPU
        planned as float32, the larger of what it computes in (bf16 only on a CPU with bf16 units: align/devices.py
        `computed_dtype`)."""
        if not hw.on_gpu:
            return 4
        return self.saved_bytes if folder_bytes is None else folder_bytes


def trained(ctx: Context, s: Settings, hw: Hardware, *, rank: int, rows: int, tokens: int, logit_tokens: int,
            head: str = "lm") -> Trained:
    """A trained model's layout: DeepSpeed runs stage 0 on one rank without offload (align/training.py)."""
    t, w = hw.training, planned_bytes(ctx.params.training.precision, hw.on_gpu)
    offload = t.offload and t.zero_stage > 0
    stage = t.zero_stage if hw.ranks > 1 or offload else 0
    zero = Zero(stage, w, w, hw.ranks_per_node, hw.nodes, offload_optimizer=offload,
                offload_params=offload and stage == 3, zero_init=stage == 3)
    return Trained(zero, rank, rows * t.micro_batch_size, tokens, logit_tokens, t.gradient_checkpointing, head,
                   hw.on_gpu)


def train_role(ctx: Context, name: str, t: Trained) -> Role:
    z = t.zero
    detail = (f"LoRA r{t.lora_rank}, ZeRO-{z.stage}{' offload' if z.offload_optimizer else ''}, "
              f"{ctx.params.training.precision}, {t.rows}x{t.tokens} tok{', ckpt' if t.checkpointing else ''}")
    return Role(name, detail, training(ctx.shape, t))


def frozen_role(ctx: Context, hw: Hardware, name: str, f: Frozen, shape: Shape | None = None) -> Role:
    """A frozen scorer of a job: whole, or with `shard_scorers` spread over
    the job's ranks by ZeRO-3 where the job has a rank per GPU, else over its one process's GPUs by a device map."""
    over_ranks = hw.ranks > 1
    devices = (hw.ranks if over_ranks else hw.gpus_per_node) if hw.shard_scorers and hw.on_gpu else 1
    f = replace(f, on_gpu=hw.on_gpu, devices=devices, over_ranks=over_ranks and devices > 1)
    if f.over_ranks:
        f = replace(f, ranks_per_node=hw.ranks_per_node)  # each rank of a node loads its shard
    layout = "whole" if devices == 1 else f"ZeRO-3 over {devices}" if f.over_ranks else f"over {devices} GPUs"
    return Role(name, f"{'fp32' if f.weight_bytes == 4 else '16-bit'} {layout}, {f.rows}x{f.tokens} tok",
                frozen(shape or ctx.shape, f))


def engine_role(ctx: Context, s: Settings, hw: Hardware, prompt: int, new: int, ranks: int = 1,
                gpus: int | None = None) -> Role:
    """The generation backend of a job (of each of its `ranks` per node, spanning at most `gpus`: the node's by
    default): a vLLM engine, or transformers' generate with the model whole."""
    g, w = hw.generation, ctx.inference_bytes(hw)
    if not g.use_vllm:
        f = Frozen(w, g.batch_size, prompt, on_gpu=hw.on_gpu, ranks_per_node=ranks)
        return Role("generate", f"hf, {f.rows}x{prompt}+{new} tok", generation(ctx.shape, f, new))
    big = hw.gpu_bytes is not None and hw.gpu_bytes >= 70 * GiB  # vLLM's offline defaults by device
    batched = 16384 if big else 8192 if hw.on_gpu else max(8192, ctx.shape.context)  # generation.py on a CPU
    kv = None if g.kv_cache_gb is None else int(g.kv_cache_gb * GiB)
    device = hw.gpu_bytes if hw.on_gpu else hw.host_bytes
    e = vllm(ctx.shape, Engine(w, g.tensor_parallel_size, batched, 1024 if big else 256, kv,
                               g.gpu_memory_utilization, device, hw.on_gpu, ranks))
    tokens = max(0, e.kv) // ctx.shape.kv_per_token(w, g.tensor_parallel_size)
    source = setting_key("kv_cache_gb", hw.key) if kv is not None else \
        f"{setting_key('gpu_memory_utilization', hw.key)} {g.gpu_memory_utilization}"
    return Role("vllm", f"tp{g.tensor_parallel_size}, KV {max(0, e.kv) / GiB:.1f} GB = {tokens} tok", e.need, e,
                g.tensor_parallel_size, hw.gpus_per_node if gpus is None else gpus, source)


def merge_role(ctx: Context) -> Role:
    """Rank 0 folds the adapter into the base on the host and saves the merged folder (training.finish_training)."""
    return Role("merge", "rank 0, base in model.dtype on the host", Need(host=ctx.shape.params * ctx.saved_bytes))


def no_job(stage: str, note: str) -> list[Job]:
    return [Job(stage, None, [], note)]


# ------------------------------------------------------------------------------------------------------ stages


def plan_import(ctx: Context, s: Settings) -> list[Job]:
    """Loaded on the host (a GGUF file dequantised to float32, then copied in model.dtype) and saved."""
    hw = s.hardware["import_model"]
    per = ctx.saved_bytes + (4 if ctx.gguf else 0)
    detail = f"{ctx.params.model.dtype}{', GGUF read in float32' if ctx.gguf else ''}, each task"
    need = Need(host=hw.ranks_per_node * ctx.shape.params * per)
    return [Job("import_model", hw, [[Role("convert", detail, need)]])]


def generation_job(ctx: Context, s: Settings, stage: str, key: str, prompt: int, new: int) -> Job:
    """A job that only generates: `prompt` tokens per prompt, `new` tokens more."""
    hw = s.hardware[key]
    return Job(stage, hw, [[engine_role(ctx, s, hw, prompt, new)]])


def plan_prompts(ctx: Context, s: Settings) -> list[Job]:
    p = ctx.params.prompts
    prompt = p.shots * instruction_tokens(ctx.params) + TEMPLATE_TOKENS
    return [generation_job(ctx, s, "prompts", "prompts", prompt, p.max_new_tokens)]


def plan_self_align(ctx: Context, s: Settings) -> list[Job]:
    prompt = text_tokens("assets/principles.jsonl", "assets/exemplars.jsonl") + instruction_tokens(ctx.params)
    return [generation_job(ctx, s, "self_align", "self_align", prompt, ctx.params.self_align.max_new_tokens)]


def sft_job(ctx: Context, s: Settings, stage: str, key: str) -> Job:
    hw, e = s.hardware[key], ctx.params.engrave
    tokens = e.max_prompt_tokens + e.max_answer_tokens
    t = trained(ctx, s, hw, rank=ctx.params.training.lora_r, rows=1, tokens=tokens, logit_tokens=tokens)
    return Job(stage, hw, [[train_role(ctx, "train", t)], [merge_role(ctx)]])


def plan_engrave(ctx: Context, s: Settings) -> list[Job]:
    return [sft_job(ctx, s, "engrave", "engrave")]


def plan_verbose_clone(ctx: Context, s: Settings) -> list[Job]:
    if not ctx.params.verbose_clone.enabled:
        return no_job("verbose_clone", "disabled: links to models/engraved")
    prompt = text_tokens("assets/verbose_instruction.txt") + instruction_tokens(ctx.params)
    generate = generation_job(ctx, s, "verbose_clone", "verbose_clone.generate", prompt,
                              ctx.params.verbose_clone.max_new_tokens)
    return [generate, sft_job(ctx, s, "verbose_clone", "verbose_clone.train")]


def plan_system_messages(ctx: Context, s: Settings) -> list[Job]:
    cfg = ctx.params.system_messages
    if not cfg.enabled:
        return no_job("system_messages", "disabled: empty outs")
    prompt = text_tokens(str(paths.PREFERENCE_SPACE)) + instruction_tokens(ctx.params)
    return [generation_job(ctx, s, "system_messages", "system_messages", prompt, cfg.max_new_tokens)]


def plan_sample_pairs(ctx: Context, s: Settings) -> list[Job]:
    p = ctx.params
    prompt = p.system_messages.max_new_tokens + instruction_tokens(p)  # a system message, then the instruction
    return [generation_job(ctx, s, "sample_pairs", "sample_pairs", prompt, p.sample_pairs.max_new_tokens)]


def plan_label_preferences(ctx: Context, s: Settings) -> list[Job]:
    """The SFT model judges (align/scoring.py): the next-token logits after each judge prompt."""
    hw = s.hardware["label_preferences"]
    f = Frozen(ctx.inference_bytes(hw), hw.score_batch,
               judge_tokens(ctx.params, ctx.params.sample_pairs.max_new_tokens))
    return [Job("label_preferences", hw, [[frozen_role(ctx, hw, "judge", f)]])]


def plan_train_rm(ctx: Context, s: Settings) -> list[Job]:
    """LoRA and the scalar head on the SFT trunk, both sides of a pair per row of the micro-batch; then rank 0
    scores through RewardScorer (the trunk with the adapter folded in, in training.precision), or with
    shard_scorers every rank, the RM spread over them (`frozen_role`)."""
    hw, p, tokens = s.hardware["train_rm"], ctx.params, rm_tokens(ctx.params)
    t = trained(ctx, s, hw, rank=p.rm.lora_r, rows=2, tokens=tokens, logit_tokens=0, head="reward")
    score = Frozen(planned_bytes(p.training.precision, True) if hw.on_gpu else 4, hw.score_batch, tokens, head="reward")
    return [Job("train_rm", hw, [[train_role(ctx, "train", t)], [frozen_role(ctx, hw, "score", score)]])]


def plan_policy(ctx: Context, s: Settings) -> list[Job]:
    """ppo: per rank the policy (LoRA on the SFT model; the reference is it with the adapter off), the value model
    (the RM trunk, its own LoRA and head), the RM (merged, frozen) and the generation backend, held at once;
    grpo and rloo without the value model; on GPUs the engine sleeps through the scoring and the update. Split
    (align/placement.py): the trainer nodes hold all but the engines, the engine nodes `gpus_per_node /
    tensor_parallel_size` engines each. dpo: the policy on both sides of a pair,
    its reference the adapter off."""
    hw, p = s.hardware["policy"], ctx.params
    if p.policy.algorithm == "dpo":
        tokens = p.dpo.max_prompt_tokens + p.dpo.max_response_tokens
        t = trained(ctx, s, hw, rank=p.dpo.lora_r, rows=2, tokens=tokens, logit_tokens=tokens)
        return [Job("policy", hw, [[train_role(ctx, "dpo", t)], [merge_role(ctx)]])]
    layout = Layout.of(p.cluster.policy)
    layout.check(p.generation.backend, p.rl.rollout_adapter)  # before any figure: the nodes must split
    if layout.split:
        trainers = replace(hw, nodes=hw.nodes - layout.engine_nodes)
        engines = replace(hw, nodes=layout.engine_nodes, ranks_per_node=layout.engines_per_node)
        roles, held = rl_trainer_roles(ctx, s, trainers)
        engine = engine_role(ctx, s, engines, p.rl.max_query_tokens, p.rl.max_new_tokens, layout.engines_per_node,
                             gpus=hw.generation.tensor_parallel_size if hw.on_gpu else None)
        return [Job("policy", trainers, [roles, held + [merge_role(ctx)]], part="trainers"),
                Job("policy", engines, [[engine]], part="engines")]
    roles, held = rl_trainer_roles(ctx, s, hw)
    engine = engine_role(ctx, s, hw, p.rl.max_query_tokens, p.rl.max_new_tokens, hw.ranks_per_node,
                         gpus=max(1, hw.gpus_per_node // hw.ranks_per_node))  # over its rank's own GPUs
    merge = held + [merge_role(ctx)]  # the engine closes before the merge
    if not (hw.on_gpu and hw.generation.use_vllm):
        return [Job("policy", hw, [roles + [engine], merge])]
    # on a GPU the engine sleeps between rollouts (align/placement.py LocalEngine): the update's activations have
    # its memory, its weights wait in host memory
    asleep = Role("vllm asleep", "weights on the host", Need(host=hw.ranks_per_node * ctx.shape.params *
                                                           ctx.inference_bytes(hw)))
    return [Job("policy", hw, [roles + [asleep], held + [engine], merge])]  # the update first: the table shows its rows


def rl_trainer_roles(ctx: Context, s: Settings, hw: Hardware) -> tuple[list[Role], list[Role]]:
    """(a trainer rank's roles while it trains, the same held without their activations)."""
    p = ctx.params
    cfg = p.rl
    tokens = cfg.max_query_tokens + cfg.max_new_tokens
    roles = [train_role(ctx, "policy", trained(ctx, s, hw, rank=cfg.lora_r, rows=1, tokens=tokens,
                                                     logit_tokens=cfg.max_new_tokens + 1))]
    if p.policy.algorithm == "ppo":
        roles.append(train_role(ctx, "value", trained(ctx, s, hw, rank=cfg.lora_r, rows=1, tokens=tokens,
                                                            logit_tokens=0, head="reward")))
    w, ranks = planned_bytes(p.training.precision, True) if hw.on_gpu else 4, hw.ranks_per_node
    roles.append(frozen_role(ctx, hw, "reward", Frozen(w, hw.score_batch, rm_tokens(p), head="reward",
                                                       ranks_per_node=ranks)))
    return roles, [replace(r, need=Need(r.need.gpu, r.need.host)) for r in roles]  # activations: an upper bound


def plan_evaluate(ctx: Context, s: Settings) -> list[Job]:
    """One after another: each policy scored (log-likelihoods) and answering (the generation backend), the RM
    (RewardScorer in its base folder's inference dtype, as the scorers), the independent judge."""
    hw, p = s.hardware["evaluate"], ctx.params
    w, b = ctx.inference_bytes(hw), hw.score_batch
    answer = p.evaluate.max_new_tokens
    phases = [
        [frozen_role(ctx, hw, "scorer", Frozen(w, b, instruction_tokens(p) + CHOICE_TOKENS, keep=CHOICE_TOKENS))],
        [engine_role(ctx, s, hw, instruction_tokens(p) + answer, answer)],  # a second turn after the first answer
        [frozen_role(ctx, hw, "reward", Frozen(w, b, rm_tokens(p), head="reward"))],
        [frozen_role(ctx, hw, "judge", Frozen(ctx.inference_bytes(hw, ctx.judge_bytes), b, judge_tokens(p, answer)),
                     ctx.judge)],
    ]
    return [Job("evaluate", hw, phases)]


STAGES: dict[str, Callable[[Context, Settings], list[Job]]] = {
    "benchmarks": lambda ctx, s: no_job("benchmarks", "no model: runs on the login node"),
    "import_model": plan_import, "prompts": plan_prompts, "self_align": plan_self_align, "engrave": plan_engrave,
    "verbose_clone": plan_verbose_clone, "system_messages": plan_system_messages, "sample_pairs": plan_sample_pairs,
    "label_preferences": plan_label_preferences, "train_rm": plan_train_rm, "policy": plan_policy,
    "evaluate": plan_evaluate,
}
RANKED = {"import_model", "engrave", "verbose_clone.train", "train_rm", "policy"}  # a task per GPU (tasks_per_node);
# every other job runs one task on one node (generation.one_task)


def dvc_stages() -> list[str]:
    return list(yaml.safe_load(Path("dvc.yaml").read_text())["stages"])


# ------------------------------------------------------------------------------------------- checks and advice


@dataclass(frozen=True)
class Shortfall:
    job: Job
    role: str
    kind: str  # gpu | host | kv | gpus
    needed: float
    available: float
    source: str  # where the available figure comes from


def shortfalls(job: Job) -> list[Shortfall]:
    """What of `job` does not fit: GPUs a vLLM engine spans, its KV cache, GPU memory, host memory."""
    hw = job.hardware
    if hw is None:
        return []
    found = []
    for phase in job.phases:
        for role in (r for r in phase if r.engine is not None):
            if hw.on_gpu and role.tp > role.gpus:
                source = f"cluster.{hw.key}.gpus_per_node" if role.gpus == hw.gpus_per_node else "its rank's own"
                found.append(Shortfall(job, role.name, "gpus", role.tp, role.gpus, source))
            elif role.engine.kv < role.engine.kv_min:
                found.append(Shortfall(job, role.name, "kv", role.engine.kv_min, max(role.engine.kv, 0),
                                       role.kv_source))
    totals = job.totals()
    names = [" + ".join(r.name for r in phase) for phase in job.phases]
    worst = max(range(len(totals)), key=lambda i: (totals[i].gpu_peak, totals[i].host_peak))
    if hw.on_gpu and totals[worst].gpu_peak * hw.ranks_per_gpu > hw.gpu_bytes:
        found.append(Shortfall(job, names[worst], "gpu", totals[worst].gpu_peak * hw.ranks_per_gpu, hw.gpu_bytes,
                               hw.gpu_source))
    host = max(range(len(totals)), key=lambda i: totals[i].host_peak)
    if hw.host_bytes is not None and totals[host].host_peak > hw.host_bytes:
        found.append(Shortfall(job, names[host], "host", totals[host].host_peak, hw.host_bytes,
                               f"cluster.{hw.key}.mem_gb"))
    return found


def gb(n: float) -> str:
    return f"{n / GiB:.1f} GB"


def kv_gb(n: float) -> float:
    """A KV cache size in GB, rounded up to a tenth."""
    return math.ceil(n / GiB * 10) / 10


def changes(s: Settings, job: Job) -> list[tuple[str, Any, Settings]]:
    """The single setting changes that could shrink `job`'s GPU figure: (key, value, settings with it)."""
    hw = job.hardware
    t, g = hw.training, hw.generation
    engine = next((r.engine for phase in job.phases for r in phase if r.engine is not None), None)
    found: list[tuple[str, Any, Settings]] = []

    def with_hardware(**kw: Any) -> Settings:
        return replace(s, hardware={**s.hardware, hw.key: replace(hw, **kw)})

    def add(name: str, value: Any, **kw: Any) -> None:
        group = "training" if name in TrainingSettings.__dataclass_fields__ else "generation"
        found.append((setting_key(name, hw.key), value, with_hardware(**{group: replace(getattr(hw, group), **kw)})))

    if not t.gradient_checkpointing:
        add("gradient_checkpointing", "true", gradient_checkpointing=True)
    if t.zero_stage < 3:
        add("zero_stage", 3, zero_stage=3)
    if not t.offload:
        add("offload", "cpu", offload=True)
    if t.micro_batch_size > 1:
        add("micro_batch_size", 1, micro_batch_size=1)
    if engine is not None and (g.kv_cache_gb is None or g.kv_cache_gb > kv_gb(engine.kv_min)):
        add("kv_cache_gb", kv_gb(engine.kv_min), kv_cache_gb=kv_gb(engine.kv_min))  # one full-context sequence
    for tp in (2, 4, 8):
        if g.tensor_parallel_size < tp <= hw.gpus_per_node:
            add("tensor_parallel_size", tp, tensor_parallel_size=tp)
    if hw.score_batch > 1:
        found.append((setting_key("score_batch_size", hw.key), 1, with_hardware(score_batch=1)))
    if not hw.shard_scorers and (hw.ranks if hw.key in RANKED else hw.gpus_per_node) > 1:
        found.append((setting_key("shard_scorers", hw.key), "true", with_hardware(shard_scorers=True)))
    if hw.key in RANKED:
        for nodes in (2, 4, 8, 16):
            if nodes > hw.nodes:
                found.append((setting_key("nodes", hw.key), nodes, with_hardware(nodes=nodes)))
    return found


def advice(ctx: Context, s: Settings, short: Shortfall) -> str:
    """The one setting that helps most, with what the job then needs."""
    job, hw = short.job, short.job.hardware
    if short.kind == "host":
        return f"set cluster.{hw.key}.mem_gb: {math.ceil(short.needed / GiB)}"
    if short.kind == "gpus":
        return f"set {setting_key('tensor_parallel_size', hw.key)}: {short.available:.0f}"
    if short.kind == "kv":
        return f"set {setting_key('kv_cache_gb', hw.key)}: {kv_gb(short.needed)} (or spread it over more GPUs)"
    tried = []
    for key, value, changed in changes(s, job):
        again = next(j for j in STAGES[job.stage](ctx, changed)
                     if j.hardware and j.hardware.key == hw.key and j.part == job.part)
        after = max(t.gpu_peak for t in again.totals()) * again.hardware.ranks_per_gpu
        if after < short.needed:
            tried.append((after, key, value))
    if not tried:
        return f"no setting of the job shrinks it: a GPU with more memory ({hw.gpu_source})"
    after, key, value = min(tried, key=lambda x: x[0])
    if after <= short.available:
        return f"set {key}: {value} ({gb(after)})"
    return f"no one setting fits it; {key}: {value} helps most ({gb(after)})"


def message(ctx: Context, s: Settings, short: Shortfall) -> str:
    """The one line a layout that cannot fit stops with."""
    given = f"the profile gives {gb(short.available)} ({short.source})"
    if short.kind == "gpu":
        head = f"needs {gb(short.needed)} per GPU, {given}"
    elif short.kind == "host":
        head = f"needs {gb(short.needed)} host memory per node, {given}"
    elif short.kind == "gpus":
        head = f"needs {short.needed:.0f} GPUs (tensor parallel), it may use {short.available:.0f} ({short.source})"
    else:
        head = (f"needs a KV cache of {gb(short.needed)} per GPU for one {ctx.shape.context}-token sequence, "
                f"{short.source} gives {gb(short.available)}")
    return f"align.plan: {short.job.stage}: {short.role} {head}; {advice(ctx, s, short)}"


# ------------------------------------------------------------------------------------------------------ report


def settings_of(params: Params) -> Settings:
    backend = params.generation.backend
    return Settings({key: hardware(res, key, key not in RANKED, backend) for key, res in params.cluster.jobs().items()
                     if key != "repro"})


def context_of(params: Params, model: Path | None) -> Context:
    config, gguf = base_config(params, model)
    targets, trust = params.training.lora_targets, params.model.trust_remote_code
    shape = count_model(config, targets, trust)
    judge_ref = params.evaluate.judge_model
    if judge_ref is None:
        return Context(params, shape, shape, planned_bytes(params.model.dtype, on_gpu=False), gguf)
    judge_config = model_config(judge_ref, "evaluate.judge_model", trust)
    judge_dtype = str(getattr(judge_config, "dtype", None) or getattr(judge_config, "torch_dtype", None) or "float32")
    return Context(params, shape, count_model(judge_config, ALL_LINEAR, trust),  # the judge carries no LoRA
                   BYTES.get(judge_dtype.removeprefix("torch."), 4), gguf)


def plan(params: Params, model: Path | None = None) -> tuple[Context, Settings, list[Job]]:
    """Every dvc.yaml stage's jobs, in the DAG's order."""
    if not Path("dvc.yaml").is_file():
        raise UserError("dvc.yaml: not found; run python -m align.plan from the project root")
    ctx, s = context_of(params, model), settings_of(params)
    jobs = []
    for stage in dvc_stages():
        if stage not in STAGES:
            raise UserError(f"dvc.yaml: stage {stage}: align/plan.py has no memory plan for it")
        jobs += STAGES[stage](ctx, s)
    return ctx, s, jobs


def check_stage(params: Params, stage: str) -> None:
    """What every stage runs before it hashes its inputs or submits: its own jobs planned; the first role that
    cannot fit stops it with `message`'s one line. A model whose config cannot be read here is left to the stage,
    whose own check of `model.base` or `evaluate.judge_model` names it more plainly, right after."""
    if stage not in STAGES:
        return
    try:
        ctx = context_of(params, None)
    except UserError:
        return
    s = settings_of(params)
    for job in STAGES[stage](ctx, s):
        short = next(iter(shortfalls(job)), None)
        if short is not None:
            raise UserError(message(ctx, s, short))


def table(jobs: list[Job]) -> str:
    """One row per role and one per job with what its profile gives; GB are 2^30 bytes; fits within 160 columns."""
    rows = [f"{'stage / job':<24}{'role':<26}{'layout':<44}{'GB/GPU':>8}{'GB host':>9}  {'profile':<30}"
            f"{'peak use':>10}"]
    for job in jobs:
        hw = job.hardware
        if hw is None:
            rows.append(f"{job.stage:<24}{'-':<26}{job.note:<44}")
            continue
        shown = set()
        for role in (r for phase in job.phases for r in phase):
            if role.name not in shown:  # a role held on into the next phase: its first row only
                shown.add(role.name)
                gpu = f"{role.need.gpu_peak / GiB:.1f}" if role.need.gpu_peak else "-"
                name = f"{hw.key} {job.part}" if job.part else hw.key
                rows.append(f"{name:<24}{role.name:<26}{role.detail[:43]:<44}{gpu:>8}"
                            f"{role.need.host_peak / GiB:>9.1f}")
        peak = job.peak()
        gpus = (f"{hw.nodes}x{hw.gpus_per_node} GPU {hw.gpu_bytes / GiB:.0f} GB" if hw.on_gpu else
                f"{hw.nodes}x CPU")
        host = f", {hw.host_bytes / GiB:.0f} GB" if hw.host_bytes is not None else ", host ?"
        use = [peak.gpu_peak * hw.ranks_per_gpu / hw.gpu_bytes] if hw.on_gpu else []
        use += [peak.host_peak / hw.host_bytes] if hw.host_bytes else []
        verdict = "NO" if shortfalls(job) else f"{max(use):.0%}" if use else "?"
        gpu = f"{peak.gpu_peak * hw.ranks_per_gpu / GiB:.1f}" if hw.on_gpu else "-"
        rows.append(f"{'':<24}{'= peak (with processes)':<70}{gpu:>8}{peak.host_peak / GiB:>9.1f}  "
                    f"{(gpus + host)[:29]:<30}{verdict:>10}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m align.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file (default: params.yaml)")
    parser.add_argument("--model", type=Path, help="a folder holding the model's config.json (default: model.base)")
    parser.add_argument("--table", action="store_true", help="print the table even when a job does not fit")
    args = parser.parse_args(argv)
    try:
        ctx, s, jobs = plan(load_params(args.params), args.model)
    except UserError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USER_ERROR
    first = next((short for job in jobs for short in shortfalls(job)[:1]), None)
    if first is None or args.table:
        print(table(jobs))
    if first is not None:
        print(message(ctx, s, first), file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
