"""params.yaml: the schema every stage validates at start, and one-line errors for anything that does not fit.

The whole file is validated by every stage (a typo anywhere is caught before any job is submitted); each stage
then reads only its own groups and records them in its manifest.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.errors import UserError

PARAMS_FILE = Path("params.yaml")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class Resources(Strict):
    """One SLURM job: `tasks_per_node` defaults to one task per GPU (one on a CPU-only job)."""

    partition: str = Field("cpu", min_length=1)
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    tasks_per_node: int | None = Field(None, ge=1)
    cpus_per_task: int = Field(1, ge=1)
    mem_gb: int = Field(4, ge=1)
    time_min: int = Field(60, ge=1)
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: list[str] = Field(default_factory=list)

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)


class Cluster(Strict):
    executor: Literal["auto", "slurm", "local", "inline"] = "auto"
    log_dir: str = Field("logs", min_length=1)
    import_model: Resources = Field(default_factory=Resources)


class Model(Strict):
    base: str = Field("embedded", min_length=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


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
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    save_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)


class Params(Strict):
    seed: int = Field(0, ge=0)
    model: Model = Field(default_factory=Model)
    generation: Generation = Field(default_factory=Generation)
    training: Training = Field(default_factory=Training)
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
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return parse_params(raw, str(path))
