"""params.yaml: the schema every stage validates at start, and one-line errors for anything that does not fit.

The whole file is validated by every stage (a typo anywhere is caught before any job is submitted), every error
at once, one line each; each stage then reads only its own groups and records them in its manifest. params.yaml
is the one set of defaults: the schema requires every key and holds no value of its own, so a deleted line is an
error naming it, never a silent change of a run.

What changes a result is a DVC param of the stages it affects (every group but `cluster`). How a stage runs on
its hardware - the SLURM job, and the execution settings the job computes with (micro-batch, ZeRO, offload,
gradient checkpointing, checkpoint cadence, the engine's tensor parallelism and memory, batch sizes) - lives in
`cluster`, `defaults` overridden per stage, outside every out's id and checkpoint key. A job gets both halves
joined: `TrainingRun` (training + the stage's execution settings), `Engine` (the generation backend + the
stage's engine settings).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from align.errors import UserError

PARAMS_FILE = Path("params.yaml")
ALL_LINEAR = "all-linear"  # PEFT's LoRA target keyword: every linear layer except the output head


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


# What a SLURM value may hold here: these strings end up in the job script, so nothing a shell or sbatch would read
# as syntax (no whitespace, quotes, ; $ ` \ or newlines). Constraints add SLURM's feature operators & | [ ] * ( ).
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.+:-]*"
_NODES = r"[A-Za-z0-9_][A-Za-z0-9_.,\[\]-]*"  # a SLURM node list: n[01-04],gpu7
_ARG = r"[A-Za-z0-9_.,:=@/+%#\[\]-]+"  # one sbatch value, srun argument or command word: paths, --opt=value, img:tag
SLURM_NAMES = {
    "partition": (re.compile(rf"{_NAME}(,{_NAME})*"), "letters, digits and _ . - + : (a list: comma-separated)"),
    "account": (re.compile(_NAME), "letters, digits and _ . - + :"),
    "qos": (re.compile(_NAME), "letters, digits and _ . - + :"),
    "constraint": (re.compile(r"[A-Za-z0-9_.+:,&|\[\]*()-]+"), "letters, digits, _ . - + : , and & | [ ] * ( )"),
    "gpu_type": (re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*"), "letters, digits and _ . - +"),
    "reservation": (re.compile(_NAME), "letters, digits and _ . - + :"),
    "exclude": (re.compile(_NODES), "a node list: letters, digits and _ . - , [ ]"),
    "nodelist": (re.compile(_NODES), "a node list: letters, digits and _ . - , [ ]"),
    "mail_type": (re.compile(r"[A-Z_]+(,[A-Z_]+)*"), "SLURM mail types, e.g. END,FAIL"),
    "mail_user": (re.compile(r"[A-Za-z0-9_.+-]+@[A-Za-z0-9.-]+"), "an e-mail address"),
    "wckey": (re.compile(_NAME), "letters, digits and _ . - + :"),
}
# sbatch options the submission layer sets itself (from the keys above, or for its own bookkeeping)
RESERVED_SBATCH = {"job-name", "output", "error", "open-mode", "signal", "array", "partition", "nodes",
                   "ntasks-per-node", "cpus-per-task", "gpus-per-node", "mem", "mem-per-gpu", "time", "account", "qos",
                   "constraint", "reservation", "exclude", "nodelist", "exclusive", "mail-type", "mail-user", "wckey"}


def _one_line(text: str) -> bool:
    return not any(c in text for c in "\n\r\0")


def _plain_args(values: list[str], what: str) -> list[str]:
    for number, value in enumerate(values, start=1):
        if not re.fullmatch(_ARG, value):
            raise ValueError(f"item {number} ({value!r}) is not a plain {what}; allowed: letters, digits and "
                             f"_ . , : = @ / + % # [ ] - (no spaces or shell syntax: one word per list item)")
    return values


class TrainingExecution(Strict):
    """How a training job computes what `training` (or the policy stage's `rl`) asks for: none of it changes the
    result beyond floating-point rounding, so none of it enters an out's id or a checkpoint's key."""

    micro_batch_size: int = Field(ge=1)  # examples per forward/backward on one rank; the rest is accumulation
    gradient_checkpointing: bool  # recompute activations in the backward pass: less memory, more compute
    zero_stage: Literal[0, 1, 2, 3]
    offload: Literal["none", "cpu"]
    save_every_steps: int = Field(ge=1)  # optimizer steps between checkpoints
    keep_checkpoints: int = Field(ge=1)


class EngineExecution(Strict):
    """How a job generates and scores: vLLM's layout and memory, and the batch sizes of the hf backend and of the
    scorers (a batch is padded to its longest row, so it changes rounding, not results)."""

    tensor_parallel_size: int = Field(ge=1)
    gpu_memory_utilization: float = Field(gt=0, le=1)  # vLLM: share of GPU memory (on CPU: of RAM) it may take
    kv_cache_gb: float | None = Field(gt=0)  # vLLM KV cache size; None: from gpu_memory_utilization
    enforce_eager: bool  # no CUDA graphs / torch.compile warm-up
    generate_batch_size: int = Field(ge=1)  # hf backend: prompts per generate() call
    score_batch_size: int = Field(ge=1)  # rows per forward pass of a scorer (judge, reward model, multiple choice)
    shard_scorers: bool  # a scorer spread over the job's GPUs (ZeRO-3 over its ranks, else a device map)
    placement: Literal["colocated", "split"]  # the policy stage's roles: every rank holds all, or the rollout
    # engines on nodes of their own (align/placement.py)
    engine_nodes: int = Field(ge=0)  # placement split: the job's last nodes, rollout engines only


class Resources(TrainingExecution, EngineExecution):
    """One stage's job: its SLURM resources and its execution settings. `tasks_per_node` null is one task per GPU
    (one on a CPU-only job); `partition` null is the cluster's default partition; anything sbatch takes that has no
    key here goes in `sbatch`."""

    partition: str | None = Field(min_length=1)
    nodes: int = Field(ge=1)
    gpus_per_node: int = Field(ge=0)
    gpu_type: str | None  # typed GPUs, e.g. a100: --gpus-per-node=a100:4
    gpu_memory_gb: float | None = Field(gt=0)  # one GPU's memory where align/plan.py's table lacks gpu_type
    tasks_per_node: int | None = Field(ge=1)
    cpus_per_task: int = Field(ge=1)
    mem_gb: int | None = Field(ge=0)  # --mem per node (null: the site default; 0: all of a node's memory)
    mem_per_gpu_gb: int | None = Field(ge=1)  # --mem-per-gpu, where a site wants memory per GPU instead
    time_min: int = Field(ge=1)
    signal_delay_s: int = Field(ge=1)  # SIGUSR2 this long before the time limit: checkpoint and requeue
    max_requeues: int = Field(ge=0)  # time-limit requeues before the job is failed (preemptions do not count)
    collective_timeout_min: int = Field(ge=1)  # a rank waiting this long in a collective (NCCL, gloo) fails the job
    account: str | None
    qos: str | None
    constraint: str | None
    reservation: str | None
    exclude: str | None
    nodelist: str | None
    exclusive: bool
    mail_type: str | None
    mail_user: str | None
    wckey: str | None  # none (submitit's own default, "submitit", is refused at some sites)
    sbatch: dict[str, str | int | bool]  # other sbatch options: {gres-flags: enforce-binding}
    srun_args: list[str]  # e.g. [--mpi=pmix, --container-image=nvcr.io#nvidia/pytorch:24.05-py3]
    python: list[str]  # the command that runs python in the job, e.g. [apptainer, exec, --nv, /shared/img.sif,
    #   python]; empty: the interpreter running the stage on the login node
    setup: list[str]  # shell lines run before the job starts: each one line, no newline

    @field_validator(*SLURM_NAMES)
    @classmethod
    def _slurm_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        pattern, allowed = SLURM_NAMES[info.field_name]
        if value is not None and not pattern.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid SLURM {info.field_name}; allowed: {allowed}")
        return value

    @field_validator("sbatch")
    @classmethod
    def _sbatch_options(cls, options: dict[str, str | int | bool]) -> dict[str, str | int | bool]:
        for key, value in options.items():
            if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
                raise ValueError(f"{key!r} is not an sbatch option name; expected its long form without dashes, "
                                 f"e.g. gres-flags")
            if key in RESERVED_SBATCH:
                raise ValueError(f"{key!r} is set from its own key (or by the submission layer); use that key")
            if isinstance(value, str) and not re.fullmatch(_ARG, value):
                raise ValueError(f"{key}: {value!r} is not a plain sbatch value; allowed: letters, digits and "
                                 f"_ . , : = @ / + % # [ ] - (no spaces or shell syntax)")
        return options

    @field_validator("srun_args")
    @classmethod
    def _srun_args(cls, values: list[str]) -> list[str]:
        return _plain_args(values, "srun argument")

    @field_validator("python")
    @classmethod
    def _python_command(cls, values: list[str]) -> list[str]:
        return _plain_args(values, "command word")

    @field_validator("setup")
    @classmethod
    def _setup_lines(cls, lines: list[str]) -> list[str]:
        for number, line in enumerate(lines, start=1):
            if not _one_line(line):
                raise ValueError(f"item {number} ({line!r}) is not one line; each setup entry must be a single shell "
                                 f"line (no newline, carriage return or NUL): split it into list items")
        return lines

    @model_validator(mode="after")
    def _consistent(self) -> Resources:
        if self.signal_delay_s >= self.time_min * 60:
            raise ValueError(f"signal_delay_s ({self.signal_delay_s}) must be shorter than time_min "
                             f"({self.time_min} min = {self.time_min * 60} s): the job would be signalled at its start")
        if self.mem_per_gpu_gb is not None and self.mem_gb is not None:
            raise ValueError("mem_gb and mem_per_gpu_gb are both set; sbatch takes one: set mem_gb: null")
        if self.mem_per_gpu_gb is not None and not self.gpus_per_node:
            raise ValueError("mem_per_gpu_gb needs gpus_per_node > 0")
        return self

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)


class VerboseCloneResources(Strict):
    """Stage `verbose_clone` runs two jobs: the verbose answers (generation), then the SFT on them (training)."""

    generate: Resources
    train: Resources


SCORING_STAGES = ("label_preferences", "train_rm", "policy", "evaluate")  # jobs that hold a frozen scorer
STAGE_RESOURCES = ("import_model", "prompts", "self_align", "engrave", "verbose_clone", "system_messages",
                   "sample_pairs", "label_preferences", "train_rm", "policy", "evaluate", "repro")


class Cluster(Strict):
    """`defaults` is every job's resources; `cluster.<stage>` (the DVC stage's name) overrides only the keys that
    differ for that stage (`verbose_clone`: keys for both of its jobs, then `generate:` / `train:` for one);
    `repro` is the job `python -m align.repro_job` runs `dvc repro` in."""

    executor: Literal["auto", "slurm", "local", "inline"]
    log_dir: str = Field(min_length=1)  # a path in the job script: one line
    defaults: Resources
    import_model: Resources
    prompts: Resources
    self_align: Resources
    engrave: Resources
    verbose_clone: VerboseCloneResources
    system_messages: Resources
    sample_pairs: Resources
    label_preferences: Resources
    train_rm: Resources
    policy: Resources
    evaluate: Resources
    repro: Resources

    @model_validator(mode="before")
    @classmethod
    def _overrides_on_defaults(cls, raw: Any) -> Any:
        """Each stage's keys laid over `defaults` before validation, so a stage's resources are complete and an
        error names the key where it was written (a bad default: under `defaults`). Each stage's entry must be
        there (`{}`: none), so deleting one is an error, not a silent move of its job to `defaults`."""
        if not isinstance(raw, dict):
            return raw
        defaults = raw.get("defaults") or {}
        if not isinstance(defaults, dict):
            return raw
        merged = dict(raw)
        for stage in STAGE_RESOURCES:
            override = raw.get(stage, None)
            if override is None and stage not in raw:
                continue  # missing: an error naming it (an override written as `{}` is none)
            override = override or {}
            if not isinstance(override, dict):
                continue
            if stage == "verbose_clone":
                shared = {k: v for k, v in override.items() if k not in ("generate", "train")}
                merged[stage] = {part: {**defaults, **shared, **(override.get(part) or {})}
                                 if isinstance(override.get(part) or {}, dict) else override.get(part)
                                 for part in ("generate", "train")}
            else:
                merged[stage] = {**defaults, **override}
        return merged

    @field_validator("log_dir")
    @classmethod
    def _log_dir_one_line(cls, value: str) -> str:
        if not _one_line(value):
            raise ValueError(f"{value!r} is not one line; expected a folder path without newline, carriage return "
                             f"or NUL")
        return value

    @model_validator(mode="after")
    def _scorers_spread(self) -> Cluster:
        """A scorer spread (`shard_scorers`) over a job of one device: in the jobs that score only, since the
        setting is usually written once under `defaults` and means nothing to the others."""
        for stage in SCORING_STAGES:
            res = getattr(self, stage)
            if res.shard_scorers and max(res.gpus_per_node, res.tasks) * res.nodes < 2:
                raise ValueError(f"{stage}: shard_scorers: true spreads a scorer over the job's GPUs (or ranks), and "
                                 f"this job has one device; set gpus_per_node: 2 or more, or shard_scorers: false")
        return self

    def jobs(self) -> dict[str, Resources]:
        """Every job's resources by the key that configures it (`verbose_clone.generate`, …)."""
        found = {stage: getattr(self, stage) for stage in STAGE_RESOURCES if stage != "verbose_clone"}
        found.update({"verbose_clone.generate": self.verbose_clone.generate,
                      "verbose_clone.train": self.verbose_clone.train, "repro": self.repro})
        return found


class Model(Strict):
    base: str = Field(min_length=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"]  # auto: bf16 where the import job's device has it
    trust_remote_code: bool  # run the Python files a model folder ships (auto_map): only code you trust
    chat_template: str | None  # for a base model without one: a Jinja file, or `plain` (User:/Assistant:)


class Generation(Strict):
    backend: Literal["auto", "vllm", "hf"]  # the two draw different random numbers: it is part of a result


class Training(Strict):
    """What the training stages learn with; how a job computes it is the stage's `TrainingExecution`."""

    precision: Literal["auto", "fp32", "bf16", "fp16"]  # auto: bf16 where each job's device has it
    batch_size: int = Field(ge=1)  # examples per optimizer step over all ranks (micro-batch x accumulation x ranks)
    learning_rate: float = Field(gt=0)
    max_grad_norm: float = Field(ge=0)  # gradient clipping; 0 disables
    lora_r: int = Field(ge=1)
    lora_alpha: int = Field(ge=1)
    lora_dropout: float = Field(ge=0, lt=1)
    lora_targets: str | list[str]  # the layers PEFT wraps: every linear one but the head, or names
    lr_schedule: Literal["cosine", "constant"]  # after a linear warm-up
    warmup_ratio: float = Field(ge=0, lt=1)  # share of the optimizer steps spent warming up

    @field_validator("lora_targets", mode="before")
    @classmethod
    def _lora_targets(cls, value: Any) -> Any:
        """`all-linear` (PEFT's keyword: any architecture) or module names; any other string would be read by PEFT
        as a regular expression, which is not what a user writing one name means."""
        names = isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value)
        if value != ALL_LINEAR and not names:
            raise ValueError(f"expected '{ALL_LINEAR}' or a list of module names, got {value!r}")
        return value


class TrainingRun(Training, TrainingExecution):
    """What a training job reads: the stage's `training` (what it learns) joined with its execution settings (how
    one rank computes it). Built on the login node by `of`, which checks that the global batch divides."""

    @classmethod
    def of(cls, training: Training, resources: Resources, key: str, ranks: int | None = None,
           **update: Any) -> TrainingRun:
        """`training` (with `update`: a stage's own learning rate, LoRA size, global batch) and the execution
        settings of `resources`, the job `cluster.<key>` describes; its global batch must split evenly into
        micro-batches on every training rank (`ranks`: every task of the job unless a placement says fewer)."""
        run = cls(**{**training.model_dump(), **update},
                  **{name: getattr(resources, name) for name in TrainingExecution.model_fields})
        ranks = ranks or resources.nodes * resources.tasks
        if run.batch_size % (run.micro_batch_size * ranks):
            where = "rl.step_batch_size" if "batch_size" in update else "training.batch_size"
            raise UserError(f"params.yaml: {where}: {run.batch_size} examples per optimizer step do not split into "
                            f"micro-batches of {run.micro_batch_size} (cluster.{key}.micro_batch_size) on {ranks} "
                            f"ranks; make it a multiple of {run.micro_batch_size * ranks}")
        return run

    def accumulation(self, world: int) -> int:
        """Micro-batches each rank accumulates per optimizer step."""
        return self.batch_size // (self.micro_batch_size * world)


class Engine(EngineExecution):
    """What a generation or scoring job reads: the backend (a result setting) and the stage's engine settings."""

    backend: Literal["auto", "vllm", "hf"]

    @classmethod
    def of(cls, generation: Generation, resources: Resources) -> Engine:
        return cls(backend=generation.backend,
                   **{name: getattr(resources, name) for name in EngineExecution.model_fields})


class Tgrt(Strict):
    """Topic-guided red-teaming: topics per question type, then questions per (type, topic)."""

    enabled: bool
    topics_per_type: int = Field(ge=1)
    questions_per_topic: int = Field(ge=1)


class Prompts(Strict):
    num_self_instruct: int = Field(ge=0)  # machine-written instructions to keep
    shots: int = Field(ge=1)  # instructions shown per request
    machine_shots: int = Field(ge=0)  # of which drawn from already-kept machine instructions (once there are)
    requests_per_round: int = Field(ge=1)
    max_rounds: int = Field(ge=1)  # give up (and report) after this many rounds
    rouge_threshold: float = Field(gt=0, le=1)  # keep a candidate only if ROUGE-L to every kept one is below
    min_words: int = Field(ge=1)
    max_words: int = Field(ge=1)
    max_new_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    tgrt: Tgrt

    @model_validator(mode="after")
    def _consistent(self) -> Prompts:
        if self.machine_shots > self.shots:
            raise ValueError(f"machine_shots ({self.machine_shots}) must not exceed shots ({self.shots})")
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must not exceed max_words ({self.max_words})")
        return self


class SelfAlign(Strict):
    max_new_tokens: int = Field(ge=1)  # internal thoughts + answer
    temperature: float = Field(ge=0)  # 0 = greedy (the Dromedary recipe decodes greedily)
    top_p: float = Field(gt=0, le=1)
    max_prompts: int | None = Field(ge=1)  # answer N prompts drawn at random (None: all)
    max_repeated_ngram_share: float = Field(gt=0, le=1)  # degenerate: this share of 4-grams are repeats
    echo_threshold: float = Field(gt=0, le=1)  # ROUGE-L to a principle's definition that counts as an echo


class Engrave(Strict):
    epochs: float = Field(gt=0)
    max_prompt_tokens: int = Field(ge=1)
    max_answer_tokens: int = Field(ge=1)


class VerboseClone(Strict):
    enabled: bool
    max_new_tokens: int = Field(ge=1)
    trim_cut_off: bool  # an answer cut by the token limit keeps its complete paragraphs (else: dropped)
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    epochs: float = Field(gt=0)


class SamplePairs(Strict):
    max_prompts: int = Field(ge=1)  # prompts drawn at random from those not used for SFT
    temperature: float = Field(gt=0)  # two samples per prompt: greedy would give the same response twice
    top_p: float = Field(gt=0, le=1)
    max_new_tokens: int = Field(ge=1)


class LabelPreferences(Strict):
    principles: list[str] | None  # ids from assets/preference_principles.jsonl; None: all of them
    choices: tuple[str, str]  # the tokens the judge prompt's last line expects next


class Pmp(Strict):
    """Preference-model pre-training on a public preference set before the synthetic preferences."""

    dataset: str | None  # a hub id (e.g. Anthropic/hh-rlhf) or a local file/folder; None: no pre-training
    split: str = Field(min_length=1)
    max_examples: int = Field(ge=1)


class Subsets(Strict):
    """How a training instance's principle subset is drawn and labelled (align/reward.py). params.yaml's values are
    SALMON's: IBM/SALMON, training/step1_synthetic_preference_collection/
    aggregate_synthetic_preference.py (Dromedary-2)."""

    max_principles: int = Field(ge=1)  # a subset shows 1..this many principles (SALMON: 8)
    size_p: float = Field(ge=0, le=1)  # P(k shown) ∝ (1 - size_p)^(k-1): SALMON's geometric(0.2) cut at
    # max_principles; 0 gives uniform sizes (the earlier rule)
    negation_prob: float = Field(ge=0, le=1)  # each shown principle is negated this often (SALMON: 0.5)
    label_rule: Literal["dominant", "majority"]  # dominant (SALMON): the shown principle with the
    # largest variance-normalised score decides; majority: the shown principles' labels vote (the earlier rule)
    label_noise: float = Field(ge=0, lt=0.5)  # share of training labels flipped (SALMON: noisy_ratio 0.1)


class RewardModel(Subsets):
    """The instructable reward model (`train_rm`). Learning rate and LoRA size override `training`'s."""

    subsets_per_pair: int = Field(ge=1)  # subsets drawn per labelled pair (SALMON); those that tie are dropped
    eval_share: float = Field(ge=0, lt=1)  # share of the decided pairs held out for evaluation
    epochs: float = Field(gt=0)
    length_group: int = Field(ge=1)  # micro-batches drawn together and sorted by (prefix, remainder) width
    # before they are cut, so each pads little (align/training.py grouped_order); 1: the plain shuffled draw
    learning_rate: float = Field(gt=0)
    lora_r: int = Field(ge=1)
    lora_alpha: int = Field(ge=1)
    max_prompt_tokens: int = Field(ge=1)  # instruction tokens shown to the RM
    max_response_tokens: int = Field(ge=1)
    hhh_principles: list[str] = Field(min_length=1)  # the guide for HHH pairs (and pre-training)
    pmp: Pmp


class Policy(Strict):
    algorithm: Literal["ppo", "dpo", "grpo", "rloo"]  # what stage `policy` runs; all write models/policy


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # how token losses become a step's loss (align/losses.py)


class Rl(Strict):
    """What PPO, GRPO and RLOO share: the loop (iterations of rollouts and updates), the reward (RL-time and guard
    principles, shaping, the KL to the SFT policy) and the policy loss (clipping, its aggregation, the engine's
    importance correction). Learning rate, LoRA size and schedule override `training`'s; an optimizer step's global
    batch is `step_batch_size` samples. Which keys an algorithm reads: align/rl.py ALGORITHMS."""

    iterations: int = Field(ge=1)  # rollout + update rounds
    rollout_batch_size: int = Field(ge=1)  # prompts answered per iteration, over all ranks
    step_batch_size: int = Field(ge=1)  # samples per optimizer step, over all ranks
    epochs: int = Field(ge=1)  # passes over each iteration's samples
    learning_rate: float = Field(gt=0)
    lr_schedule: Literal["cosine", "constant"]
    lora_r: int = Field(ge=1)
    lora_alpha: int = Field(ge=1)
    temperature: float = Field(gt=0)  # sampled at top-p 1: the update needs the whole distribution's log-probs
    rollout_adapter: Literal["merged", "lora"]  # how vLLM samples with the current adapter (merged into its
    # weights in place each iteration, align.vllm_weights | served as a LoRA request); the hf backend: as a LoRA
    max_query_tokens: int = Field(ge=1)  # prompts longer than this (chat template included) are left out
    max_new_tokens: int = Field(ge=1)
    max_prompts: int | None = Field(ge=1)  # the prompt pool: prompts not used for SFT, drawn at random
    eval_prompts: int = Field(ge=0)  # held out of the pool (at most half); policy vs SFT on them at the end
    principles: list[str] | None  # ids from assets/ppo_principles.jsonl to draw from; None: all
    num_principles: int = Field(ge=0, le=3)  # drawn per prompt (SALMON: at most 3)
    guard_principles: list[str] | None  # ids from assets/guard_principles.jsonl, always shown; None: all
    stop_penalty: float | None  # for a response that ends without its stop token (None: none)
    stop_penalty_mode: Literal["relative", "absolute"]  # added to its RM score (SALMON) | replaces it
    length_bonus: float  # x min(tokens / max_new_tokens, length_bonus_cap) added to the score
    length_bonus_cap: float = Field(ge=0)
    kl_coef: float = Field(ge=0)  # the KL to the SFT policy: reward penalty (ppo, rloo), k3 loss term (grpo)
    kl_target: float | None = Field(gt=0)  # adapt kl_coef to hold the KL per response here (None: fixed)
    kl_horizon: int = Field(ge=1)  # samples over which the adaptive coefficient moves
    epsilon: float = Field(gt=0)  # the ratio's clip range
    epsilon_high: float | None = Field(gt=0)  # clip-higher (DAPO): upper clip at 1 + epsilon_high; None: epsilon
    loss_type: Literal[LOSS_TYPES] | None  # None: the algorithm's own (align/rl.py ALGORITHMS)
    importance_sampling_level: Literal["token", "sequence"]  # sequence: GSPO's one ratio per response
    mask_truncated_completions: bool  # responses cut at max_new_tokens leave the loss
    vllm_is_correction: bool  # weight tokens by min(pi_train / pi_engine, vllm_is_cap) at sampling time
    vllm_is_cap: float = Field(ge=1)
    group_size: int = Field(ge=2)  # grpo, rloo: samples per prompt; a baseline needs two
    scale_rewards: bool  # grpo: divide by the group's std (the paper); false: the plain difference (Dr. GRPO)
    sample_every_iterations: int = Field(ge=1)  # iterations between sample rows kept in samples.jsonl

    @model_validator(mode="after")
    def _consistent(self) -> Rl:
        if self.step_batch_size > self.rollout_batch_size:
            raise ValueError(f"step_batch_size ({self.step_batch_size}) must not exceed rollout_batch_size "
                             f"({self.rollout_batch_size})")
        if self.rollout_batch_size % self.step_batch_size:
            raise ValueError(f"step_batch_size ({self.step_batch_size}) must divide rollout_batch_size "
                             f"({self.rollout_batch_size})")
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon:
            raise ValueError(f"epsilon_high ({self.epsilon_high}) must not be below epsilon ({self.epsilon}): "
                             f"clip-higher widens the upper clip only")
        return self


class Ppo(Strict):
    """What PPO adds to `rl`: a value model (the RM's trunk with its own LoRA) read at every token, and GAE."""

    gamma: float = Field(ge=0, le=1)
    lam: float = Field(ge=0, le=1)
    cliprange_value: float = Field(gt=0)


class Dpo(Subsets):
    """DPO on the labelled pairs, each under a principle subset (drawn and labelled as for the reward model)
    shown as the system message."""

    beta: float = Field(gt=0)
    epochs: float = Field(gt=0)
    length_group: int = Field(ge=1)  # micro-batches drawn together and sorted by length before they are cut,
    # so each pads little (align/training.py grouped_order); 1: the plain shuffled draw
    learning_rate: float = Field(gt=0)
    lora_r: int = Field(ge=1)
    lora_alpha: int = Field(ge=1)
    subsets_per_pair: int = Field(ge=1)
    max_prompt_tokens: int = Field(ge=1)  # system message (the principles) + instruction
    max_response_tokens: int = Field(ge=1)


class SystemMessages(Strict):
    """Janus: per prompt, one value per dimension of assets/preference_space.jsonl written as a system message."""

    enabled: bool
    held_out_share: float = Field(gt=0, lt=1)  # share of value combinations never used in training
    train_prompts: int = Field(ge=1)  # prompts given a system message for pairs, RM and policy
    eval_prompts: int = Field(ge=1)  # prompts given a held-out combination, for `evaluate`
    composer: Literal["model", "template"]  # who phrases the message (the template is the fallback)
    max_new_tokens: int = Field(ge=8)
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    eval_max_new_tokens: int = Field(ge=1)  # per answer when `evaluate` compares matched and mismatched


HUB_SOURCE = re.compile(r"hub:([\w.-]+/[\w.-]+)@([0-9a-f]{40})")  # a hub dataset pinned to a commit


class Benchmarks(Strict):
    """Where each benchmark comes from: `auto` (../shared/benchmarks where it exists, else a pinned hub dataset), a
    local file or folder in the benchmark's own format, or `hub:<dataset id>@<40-hex commit>`."""

    hhh: str
    truthfulqa_mc: str
    truthfulqa_csv: str
    mt_bench: str

    @field_validator("*")
    @classmethod
    def _source(cls, value: str) -> str:
        if not value.strip() or not _one_line(value):
            raise ValueError(f"expected auto, a path or hub:<dataset id>@<commit>, got {value!r}")
        if value.startswith("hub:") and not HUB_SOURCE.fullmatch(value):
            raise ValueError(f"expected hub:<dataset id>@<40-hex commit> (a pinned revision), got {value!r}")
        return value


class Evaluate(Strict):
    """Benchmarks (data/benchmarks) for every produced policy."""

    policies: list[Literal["base", "sft", "policy"]] = Field(min_length=1)  # policy: the RL stage's out
    normalise: bool  # multiple choice: log-likelihood per token (True) or summed over the choice (False)
    max_items: int | None = Field(ge=1)  # per multiple-choice benchmark, drawn at random (None: all)
    mt_bench_questions: int | None = Field(ge=1)  # drawn at random (None: all 80)
    max_new_tokens: int = Field(ge=1)  # per MT-Bench turn
    judge_principles: list[str] = Field(min_length=1)  # the RM's guide (and the judge's criteria) for MT-Bench
    tie_margin: float = Field(ge=0)  # RM reward difference below which two answers tie
    judge_model: str | None  # the independent a/b judge: None = the base model; a local HF folder or a hub id
    bootstrap_resamples: int = Field(ge=100)  # draws of the items behind each score's 95% interval


class Params(Strict):
    seed: int = Field(ge=0)
    model: Model
    generation: Generation
    training: Training
    prompts: Prompts
    self_align: SelfAlign
    engrave: Engrave
    verbose_clone: VerboseClone
    system_messages: SystemMessages
    sample_pairs: SamplePairs
    label_preferences: LabelPreferences
    benchmarks: Benchmarks
    rm: RewardModel
    policy: Policy
    rl: Rl
    ppo: Ppo
    dpo: Dpo
    evaluate: Evaluate
    cluster: Cluster


def _describe(field: Any) -> str:
    """'an integer >= 0', 'one of auto, slurm', … from a pydantic FieldInfo's annotation and constraints."""
    ann = field.annotation
    args = get_args(ann)
    literal = next((a for a in (ann, *args) if get_origin(a) is Literal), None)
    if literal is not None:
        return "one of " + ", ".join(str(a) for a in get_args(literal)) + (" or null" if type(None) in args else "")
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if get_origin(ann) is list:
        kind = "a list"
    else:
        kind = next((names[t] for t in (ann, *args) if t in names), "a mapping")
    bounds = []
    for meta in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "of length >=")):
            if getattr(meta, attr, None) is not None:
                bounds.append(f"{sign} {getattr(meta, attr)}")
    return " ".join([kind, *bounds])


def _field_at(model: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, Any]:
    """The model holding the last key of `loc`, and that key's FieldInfo (None where the key is unknown)."""
    for key in loc[:-1]:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None, None
        model = field.annotation
    return model, model.model_fields.get(loc[-1])


def format_error(err: dict, source: str) -> str:
    """One pydantic error as `params.yaml: a.b.c: expected …, got …`."""
    loc = tuple(k for k in err["loc"] if not (isinstance(k, str) and k.startswith(("function-", "literal["))))
    where = ".".join(str(k) for k in loc)
    parent, field = _field_at(Params, loc)
    if err["type"] == "extra_forbidden":
        known = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of {', '.join(known)}"
        return f"{source}: {where}: unknown key{hint}"
    if err["type"] == "value_error":  # a cross-field check (validator) with its own message
        return f"{source}: {where}: {err['msg'].removeprefix('Value error, ')}"
    if err["type"] == "missing":
        return f"{source}: {where}: missing required key"
    expected = _describe(field) if field is not None else err["msg"]
    return f"{source}: {where}: expected {expected}, got {err['input']!r}"


def parse_params(raw: Any, source: str = str(PARAMS_FILE)) -> Params:
    """`raw` validated; every error at once, one line each (a key missing under `cluster.defaults` once, not again
    under each stage that inherits it)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of parameter groups at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        cluster = raw.get("cluster") if isinstance(raw.get("cluster"), dict) else {}

        def inherited(err: Any) -> bool:
            """An error at a stage's key whose value the stage took from `cluster.defaults`: said there already."""
            loc = err["loc"]
            if loc[0] != "cluster" or len(loc) < 2 or loc[1] == "defaults":
                return False
            if len(loc) == 2 or (loc[1] == "verbose_clone" and len(loc) == 3):  # a check across keys: as defaults'
                return any(e["loc"] == ("cluster", "defaults") and e["msg"] == err["msg"] for e in errors)
            written = cluster.get(loc[1]) if isinstance(cluster.get(loc[1]), dict) else {}
            if loc[1] == "verbose_clone" and len(loc) > 3:
                part = written.get(loc[2]) if isinstance(written.get(loc[2]), dict) else {}
                return loc[3] not in written and loc[3] not in part
            return loc[2] not in written

        raise UserError("\n".join(dict.fromkeys(format_error(e, source) for e in errors if not inherited(e)))) from None


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found (run stages from the project root)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return parse_params(raw, str(path))
