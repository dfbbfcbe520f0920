"""params.yaml: the schema every stage validates at start, and one-line errors for anything that does not fit.

The whole file is validated by every stage (a typo anywhere is caught before any job is submitted); each stage
then reads only its own groups and records them in its manifest.
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


class Resources(Strict):
    """One SLURM job. `tasks_per_node` defaults to one task per GPU (one on a CPU-only job); `partition` null is
    the cluster's default partition; anything sbatch takes that has no key here goes in `sbatch`."""

    partition: str | None = Field(None, min_length=1)
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    gpu_type: str | None = None  # typed GPUs, e.g. a100: --gpus-per-node=a100:4
    gpu_memory_gb: float | None = Field(None, gt=0)  # one GPU's memory where align/plan.py's table lacks gpu_type
    tasks_per_node: int | None = Field(None, ge=1)
    cpus_per_task: int = Field(1, ge=1)
    mem_gb: int | None = Field(None, ge=0)  # --mem per node (null: the site default; 0: all of a node's memory)
    mem_per_gpu_gb: int | None = Field(None, ge=1)  # --mem-per-gpu, where a site wants memory per GPU instead
    time_min: int = Field(60, ge=1)
    signal_delay_s: int = Field(120, ge=1)  # SIGUSR2 this long before the time limit: checkpoint and requeue
    max_requeues: int = Field(3, ge=0)  # time-limit requeues before the job is failed (preemptions do not count)
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    reservation: str | None = None
    exclude: str | None = None
    nodelist: str | None = None
    exclusive: bool = False
    mail_type: str | None = None
    mail_user: str | None = None
    wckey: str | None = None  # none by default (submitit's own default, "submitit", is refused at some sites)
    sbatch: dict[str, str | int | bool] = Field(default_factory=dict)  # other sbatch options: {gres-flags: enforce-binding}
    srun_args: list[str] = Field(default_factory=list)  # e.g. [--mpi=pmix, --container-image=nvcr.io#nvidia/pytorch:24.05-py3]
    python: list[str] = Field(default_factory=list)  # the command that runs python in the job, e.g. [apptainer, exec,
    #   --nv, /shared/img.sif, python]; empty: the interpreter running the stage on the login node
    setup: list[str] = Field(default_factory=list)  # shell lines run before the job starts: each one line, no newline

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

    generate: Resources = Field(default_factory=Resources)
    train: Resources = Field(default_factory=Resources)


STAGE_RESOURCES = ("import_model", "prompts", "self_align", "engrave", "verbose_clone", "system_messages",
                   "sample_pairs", "label_preferences", "train_rm", "policy", "evaluate")
# `python -m align.repro_job`: `dvc repro` as a job, a small long CPU one whatever `defaults` gives the stages
REPRO_BASE = {"nodes": 1, "gpus_per_node": 0, "gpu_type": None, "tasks_per_node": 1, "cpus_per_task": 1,
              "mem_gb": 4, "mem_per_gpu_gb": None, "exclusive": False, "time_min": 2880, "max_requeues": 10}


class Cluster(Strict):
    """`defaults` is every job's resources; `cluster.<stage>` (the DVC stage's name) overrides only the keys that
    differ for that stage (`verbose_clone`: keys for both of its jobs, then `generate:` / `train:` for one);
    `repro` is the job `python -m align.repro_job` runs `dvc repro` in (CPU only, unless it says otherwise)."""

    executor: Literal["auto", "slurm", "local", "inline"] = "auto"
    log_dir: str = Field("logs", min_length=1)  # a path in the job script: one line
    defaults: Resources = Field(default_factory=Resources)
    import_model: Resources = Field(default_factory=Resources)
    prompts: Resources = Field(default_factory=Resources)
    self_align: Resources = Field(default_factory=Resources)
    engrave: Resources = Field(default_factory=Resources)
    verbose_clone: VerboseCloneResources = Field(default_factory=VerboseCloneResources)
    system_messages: Resources = Field(default_factory=Resources)
    sample_pairs: Resources = Field(default_factory=Resources)
    label_preferences: Resources = Field(default_factory=Resources)
    train_rm: Resources = Field(default_factory=Resources)
    policy: Resources = Field(default_factory=Resources)
    evaluate: Resources = Field(default_factory=Resources)
    repro: Resources = Field(default_factory=lambda: Resources(**REPRO_BASE))

    @model_validator(mode="before")
    @classmethod
    def _overrides_on_defaults(cls, raw: Any) -> Any:
        """Each stage's keys laid over `defaults` before validation, so a stage's resources are complete and an
        error names the key where it was written (a bad default: under `defaults`)."""
        if not isinstance(raw, dict):
            return raw
        defaults = raw.get("defaults") or {}
        if not isinstance(defaults, dict):
            return raw
        merged = dict(raw)
        for stage in STAGE_RESOURCES:
            override = raw.get(stage) or {}
            if not isinstance(override, dict):
                continue
            if stage == "verbose_clone":
                shared = {k: v for k, v in override.items() if k not in ("generate", "train")}
                merged[stage] = {part: {**defaults, **shared, **(override.get(part) or {})}
                                 if isinstance(override.get(part) or {}, dict) else override.get(part)
                                 for part in ("generate", "train")}
            else:
                merged[stage] = {**defaults, **override}
        repro = raw.get("repro") or {}
        merged["repro"] = {**defaults, **REPRO_BASE, **repro} if isinstance(repro, dict) else repro
        return merged

    @field_validator("log_dir")
    @classmethod
    def _log_dir_one_line(cls, value: str) -> str:
        if not _one_line(value):
            raise ValueError(f"{value!r} is not one line; expected a folder path without newline, carriage return "
                             f"or NUL")
        return value

    def jobs(self) -> dict[str, Resources]:
        """Every job's resources by the key that configures it (`verbose_clone.generate`, …)."""
        found = {stage: getattr(self, stage) for stage in STAGE_RESOURCES if stage != "verbose_clone"}
        found.update({"verbose_clone.generate": self.verbose_clone.generate,
                      "verbose_clone.train": self.verbose_clone.train, "repro": self.repro})
        return found


class Model(Strict):
    base: str = Field("embedded", min_length=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False  # run the Python files a model folder ships (auto_map): only code you trust
    chat_template: str | None = None  # for a base model without one: a Jinja file, or `plain` (User:/Assistant:)


class Generation(Strict):
    backend: Literal["auto", "vllm", "hf"] = "auto"
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    kv_cache_gb: float | None = Field(None, gt=0)  # vLLM KV cache size; None: from gpu_memory_utilization
    enforce_eager: bool = True
    batch_size: int = Field(16, ge=1)


class Training(Strict):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: Literal["none", "cpu"] = "none"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    micro_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)  # gradient clipping; 0 disables
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more compute
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_targets: str | list[str] = ALL_LINEAR  # the layers PEFT wraps: every linear one but the head, or names
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # after a linear warm-up
    warmup_ratio: float = Field(0.03, ge=0, lt=1)  # share of the optimizer steps spent warming up
    save_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)

    @field_validator("lora_targets", mode="before")
    @classmethod
    def _lora_targets(cls, value: Any) -> Any:
        """`all-linear` (PEFT's keyword: any architecture) or module names; any other string would be read by PEFT
        as a regular expression, which is not what a user writing one name means."""
        names = isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value)
        if value != ALL_LINEAR and not names:
            raise ValueError(f"expected '{ALL_LINEAR}' or a list of module names, got {value!r}")
        return value


class Tgrt(Strict):
    """Topic-guided red-teaming: topics per question type, then questions per (type, topic)."""

    enabled: bool = True
    topics_per_type: int = Field(4, ge=1)
    questions_per_topic: int = Field(2, ge=1)


class Prompts(Strict):
    num_self_instruct: int = Field(200, ge=0)  # machine-written instructions to keep
    shots: int = Field(6, ge=1)  # instructions shown per request
    machine_shots: int = Field(2, ge=0)  # of which drawn from already-kept machine instructions (once there are)
    requests_per_round: int = Field(32, ge=1)
    max_rounds: int = Field(20, ge=1)  # give up (and report) after this many rounds
    rouge_threshold: float = Field(0.7, gt=0, le=1)  # keep a candidate only if ROUGE-L to every kept one is below
    min_words: int = Field(3, ge=1)
    max_words: int = Field(150, ge=1)
    max_new_tokens: int = Field(160, ge=1)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    tgrt: Tgrt = Field(default_factory=Tgrt)

    @model_validator(mode="after")
    def _consistent(self) -> Prompts:
        if self.machine_shots > self.shots:
            raise ValueError(f"machine_shots ({self.machine_shots}) must not exceed shots ({self.shots})")
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must not exceed max_words ({self.max_words})")
        return self


class SelfAlign(Strict):
    max_new_tokens: int = Field(256, ge=1)  # internal thoughts + answer
    temperature: float = Field(0.0, ge=0)  # 0 = greedy (the Dromedary recipe decodes greedily)
    top_p: float = Field(1.0, gt=0, le=1)
    max_prompts: int | None = Field(None, ge=1)  # answer N prompts drawn at random (None: all)
    max_repeated_ngram_share: float = Field(0.3, gt=0, le=1)  # degenerate: this share of 4-grams are repeats
    echo_threshold: float = Field(0.5, gt=0, le=1)  # ROUGE-L to a principle's definition that counts as an echo


class Engrave(Strict):
    epochs: float = Field(1.0, gt=0)
    max_prompt_tokens: int = Field(256, ge=1)
    max_answer_tokens: int = Field(384, ge=1)


class VerboseClone(Strict):
    enabled: bool = False
    max_new_tokens: int = Field(384, ge=1)
    trim_cut_off: bool = True  # an answer cut by the token limit keeps its complete paragraphs (else: dropped)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    epochs: float = Field(1.0, gt=0)


class SamplePairs(Strict):
    max_prompts: int = Field(64, ge=1)  # prompts drawn at random from those not used for SFT
    temperature: float = Field(0.7, gt=0)  # two samples per prompt: greedy would give the same response twice
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1)


class LabelPreferences(Strict):
    principles: list[str] | None = None  # ids from assets/preference_principles.jsonl; None: all of them
    choices: tuple[str, str] = ("a", "b")  # the tokens the judge prompt's last line expects next
    batch_size: int = Field(16, ge=1)  # judge prompts per forward pass


class Pmp(Strict):
    """Preference-model pre-training on a public preference set before the synthetic preferences."""

    dataset: str | None = None  # a hub id (e.g. Anthropic/hh-rlhf) or a local file/folder; None: no pre-training
    split: str = Field("train", min_length=1)
    max_examples: int = Field(1000, ge=1)


class Subsets(Strict):
    """How a training instance's principle subset is drawn and labelled (align/reward.py). The defaults are
    SALMON's: IBM/SALMON, training/step1_synthetic_preference_collection/
    aggregate_synthetic_preference.py (Dromedary-2)."""

    max_principles: int = Field(8, ge=1)  # a subset shows 1..this many principles (SALMON: 8)
    size_p: float = Field(0.2, ge=0, le=1)  # P(k shown) ∝ (1 - size_p)^(k-1): SALMON's geometric(0.2) cut at
    # max_principles; 0 gives uniform sizes (the earlier rule)
    negation_prob: float = Field(0.5, ge=0, le=1)  # each shown principle is negated this often (SALMON: 0.5)
    label_rule: Literal["dominant", "majority"] = "dominant"  # dominant (SALMON): the shown principle with the
    # largest variance-normalised score decides; majority: the shown principles' labels vote (the earlier rule)
    label_noise: float = Field(0.1, ge=0, lt=0.5)  # share of training labels flipped (SALMON: noisy_ratio 0.1)


class RewardModel(Subsets):
    """The instructable reward model (`train_rm`). Learning rate and LoRA size override `training`'s."""

    subsets_per_pair: int = Field(8, ge=1)  # instances drawn per labelled pair (subsets that tie are redrawn)
    eval_share: float = Field(0.2, ge=0, lt=1)  # share of the decided pairs held out for evaluation
    epochs: float = Field(1.0, gt=0)
    length_group: int = Field(32, ge=1)  # micro-batches drawn together and sorted by (prefix, remainder) width
    # before they are cut, so each pads little (align/training.py grouped_order); 1: the plain shuffled draw
    learning_rate: float = Field(3e-5, gt=0)
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    max_prompt_tokens: int = Field(256, ge=1)  # instruction tokens shown to the RM
    max_response_tokens: int = Field(384, ge=1)
    batch_size: int = Field(8, ge=1)  # rows per forward pass when scoring
    hhh_principles: list[str] = Field(default_factory=lambda: ["honest_accurate", "ethical", "follows_instruction"],
                                      min_length=1)  # the guide for HHH pairs (and pre-training)
    pmp: Pmp = Field(default_factory=Pmp)


class Ppo(Strict):
    """PPO against the instructable RM (SALMON). Learning rate and LoRA size override `training`'s; the global
    batch of an optimizer step is `step_batch_size` (training.gradient_accumulation_steps is derived from it)."""

    iterations: int = Field(8, ge=1)  # rollout + update rounds
    rollout_batch_size: int = Field(8, ge=1)  # prompts answered per iteration, over all ranks
    step_batch_size: int = Field(4, ge=1)  # samples per optimizer step, over all ranks
    ppo_epochs: int = Field(2, ge=1)  # passes over each rollout batch
    learning_rate: float = Field(2e-5, gt=0)
    lr_schedule: Literal["cosine", "constant"] = "constant"  # overrides training's: later iterations see new rollouts
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)  # must stay 1.0: see _full_distribution
    rollout_adapter: Literal["merged", "lora"] = "merged"  # how vLLM samples with the current adapter (merged into
    # its weights in place each iteration, align.vllm_weights | served as a LoRA request); the hf backend: as a LoRA
    max_query_tokens: int = Field(256, ge=1)  # prompts longer than this (chat template included) are left out
    max_new_tokens: int = Field(128, ge=1)
    max_prompts: int | None = Field(None, ge=1)  # the prompt pool: prompts not used for SFT, drawn at random
    eval_prompts: int = Field(16, ge=0)  # held out of the pool (at most half); policy vs SFT on them at the end
    principles: list[str] | None = None  # ids from assets/ppo_principles.jsonl to draw from; None: all
    num_principles: int = Field(3, ge=0, le=3)  # drawn per prompt (SALMON: at most 3)
    guard_principles: list[str] | None = None  # ids from assets/guard_principles.jsonl, always shown; None: all
    stop_penalty: float | None = -6.0  # for a response that ends without its stop token (None: none)
    stop_penalty_mode: Literal["relative", "absolute"] = "relative"  # added to its RM score (SALMON) | replaces it
    length_bonus: float = 0.0  # x min(tokens / max_new_tokens, length_bonus_cap) added to the score
    length_bonus_cap: float = Field(0.8, ge=0)
    kl_coef: float = Field(0.01, ge=0)  # per-token KL penalty to the SFT policy
    kl_target: float | None = Field(None, gt=0)  # adapt kl_coef to hold the KL per response here (None: fixed)
    kl_horizon: int = Field(10000, ge=1)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    score_batch_size: int = Field(8, ge=1)  # RM rows per forward pass
    sample_every: int = Field(1, ge=1)  # iterations between sample rows kept in samples.jsonl
    save_every: int = Field(2, ge=1)  # iterations between checkpoints

    @field_validator("top_p")
    @classmethod
    def _full_distribution(cls, value: float) -> float:
        if value < 1:
            raise ValueError(f"must be 1.0, got {value}: PPO's update takes the log-probs of the whole "
                             f"distribution, so nucleus-sampled rollouts would not come from the policy it updates")
        return value

    @model_validator(mode="after")
    def _batches(self) -> Ppo:
        if self.step_batch_size > self.rollout_batch_size:
            raise ValueError(f"step_batch_size ({self.step_batch_size}) must not exceed rollout_batch_size "
                             f"({self.rollout_batch_size})")
        if self.rollout_batch_size % self.step_batch_size:
            raise ValueError(f"step_batch_size ({self.step_batch_size}) must divide rollout_batch_size "
                             f"({self.rollout_batch_size})")
        return self


class Policy(Strict):
    algorithm: Literal["ppo", "dpo", "grpo", "rloo"] = "ppo"  # what stage `policy` runs; all write models/policy


class Rl(Strict):
    """What the critic-free algorithms (grpo, rloo) add to the RL loop they share with PPO (every other knob is
    `ppo`'s): k samples per prompt, compared within their group instead of against a value model."""

    group_size: int = Field(4, ge=2)  # samples per prompt; a baseline needs two
    scale_rewards: bool = True  # grpo: divide by the group's std (the paper); false: Dr. GRPO's plain difference


class Dpo(Subsets):
    """DPO on the labelled pairs, each under a principle subset (drawn and labelled as for the reward model)
    shown as the system message."""

    beta: float = Field(0.1, gt=0)
    epochs: float = Field(1.0, gt=0)
    length_group: int = Field(32, ge=1)  # micro-batches drawn together and sorted by length before they are cut,
    # so each pads little (align/training.py grouped_order); 1: the plain shuffled draw
    learning_rate: float = Field(5e-6, gt=0)
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    subsets_per_pair: int = Field(2, ge=1)
    max_prompt_tokens: int = Field(512, ge=1)  # system message (the principles) + instruction
    max_response_tokens: int = Field(384, ge=1)


class SystemMessages(Strict):
    """Janus: per prompt, one value per dimension of assets/preference_space.jsonl written as a system message."""

    enabled: bool = False
    held_out_share: float = Field(0.2, gt=0, lt=1)  # share of value combinations never used in training
    train_prompts: int = Field(24, ge=1)  # prompts given a system message for pairs, RM and policy
    eval_prompts: int = Field(8, ge=1)  # prompts given a held-out combination, for `evaluate`
    composer: Literal["model", "template"] = "model"  # who phrases the message (the template is the fallback)
    max_new_tokens: int = Field(96, ge=8)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    eval_max_new_tokens: int = Field(128, ge=1)  # per answer when `evaluate` compares matched and mismatched


HUB_SOURCE = re.compile(r"hub:([\w.-]+/[\w.-]+)@([0-9a-f]{40})")  # a hub dataset pinned to a commit


class Benchmarks(Strict):
    """Where each benchmark comes from: `auto` (../shared/benchmarks where it exists, else a pinned hub dataset), a
    local file or folder in the benchmark's own format, or `hub:<dataset id>@<40-hex commit>`."""

    hhh: str = "auto"
    truthfulqa_mc: str = "auto"
    truthfulqa_csv: str = "auto"
    mt_bench: str = "auto"

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

    policies: list[Literal["base", "sft", "policy"]] = Field(default_factory=lambda: ["base", "sft", "policy"],
                                                             min_length=1)  # policy: the ppo (or dpo) out
    normalise: bool = False  # multiple choice: log-likelihood per token (True) or summed over the choice (False)
    max_items: int | None = Field(None, ge=1)  # per multiple-choice benchmark, drawn at random (None: all)
    mt_bench_questions: int | None = Field(None, ge=1)  # drawn at random (None: all 80)
    max_new_tokens: int = Field(256, ge=1)  # per MT-Bench turn
    judge_principles: list[str] = Field(
        default_factory=lambda: ["follows_instruction", "honest_accurate", "ethical", "specific"], min_length=1)
    tie_margin: float = Field(0.1, ge=0)  # RM reward difference below which two answers tie
    judge_model: str | None = None  # the independent a/b judge: None = the base model; a local HF folder or a hub id
    batch_size: int = Field(16, ge=1)  # rows per forward pass when scoring
    bootstrap_resamples: int = Field(1000, ge=100)  # draws of the items behind each score's 95% interval


class Params(Strict):
    seed: int = Field(0, ge=0)
    model: Model = Field(default_factory=Model)
    generation: Generation = Field(default_factory=Generation)
    training: Training = Field(default_factory=Training)
    prompts: Prompts = Field(default_factory=Prompts)
    self_align: SelfAlign = Field(default_factory=SelfAlign)
    engrave: Engrave = Field(default_factory=Engrave)
    verbose_clone: VerboseClone = Field(default_factory=VerboseClone)
    system_messages: SystemMessages = Field(default_factory=SystemMessages)
    sample_pairs: SamplePairs = Field(default_factory=SamplePairs)
    label_preferences: LabelPreferences = Field(default_factory=LabelPreferences)
    benchmarks: Benchmarks = Field(default_factory=Benchmarks)
    rm: RewardModel = Field(default_factory=RewardModel)
    policy: Policy = Field(default_factory=Policy)
    ppo: Ppo = Field(default_factory=Ppo)
    rl: Rl = Field(default_factory=Rl)
    dpo: Dpo = Field(default_factory=Dpo)
    evaluate: Evaluate = Field(default_factory=Evaluate)
    cluster: Cluster = Field(default_factory=Cluster)


def _describe(field: Any) -> str:
    """'an integer >= 0', 'one of auto, slurm', … from a pydantic FieldInfo's annotation and constraints."""
    ann = field.annotation
    args = get_args(ann)
    if get_origin(ann) is Literal:
        return "one of " + ", ".join(str(a) for a in args)
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
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of parameter groups at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_error(exc.errors()[0], source)) from None


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
