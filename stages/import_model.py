"""Stage `import_model`: bring `model.base` (the packaged SmolLM2 GGUF, a local HF folder or a hub id) into the
pipeline as an HF safetensors folder with a manifest, through the same submission path a cluster run uses. A hub
model is downloaded here, on the login node, into the HF cache the job then reads (compute nodes are often
offline)."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

from align import paths, runner
from align.artifacts import input_refs, staged_out, verify_artifact
from align.models import (
    ModelSource, chat_template, check_remote_code, has_chat_template, import_model, no_template, resolve_model,
)
from align.precision import model_dtype

STAGE = "import_model"
OUT = paths.BASE  # declared in dvc.yaml; later stages read the base model from here


@dataclass(frozen=True)
class ImportJob:
    """The job's arguments, sent to the allocation with it."""
    source: ModelSource
    dtype: str
    params: dict  # the params subset and the input refs: the manifest records both
    inputs: dict
    trust_remote_code: bool = False
    template: str | None = None  # a chat template to save with the tokenizer


def job(args: ImportJob) -> str:
    """Runs inside the allocation: convert, write the manifest, swap into place, return the artifact id."""
    with staged_out(OUT, stage=STAGE, params=args.params, inputs=args.inputs) as tmp:
        import_model(args.source, tmp, model_dtype(args.dtype), trust_remote_code=args.trust_remote_code,
                     template=args.template)
    return verify_artifact(OUT)


def main() -> None:
    params = runner.stage_params(STAGE)
    trust = params.model.trust_remote_code
    source = resolve_model(params.model.base)
    check_remote_code(source, trust)
    template = chat_template(params.model.chat_template)
    if template is None and source.kind == "folder" and not has_chat_template(source.path):
        raise no_template(source.location)
    files = {"model": source.path}  # a hub model: its snapshot, downloaded above on this (login) node
    if template is not None and params.model.chat_template != "plain":
        files["chat_template"] = Path(params.model.chat_template).expanduser()  # in the lineage with its hash
    inputs = input_refs(files)
    subset = {"model": {"base": params.model.base, "dtype": params.model.dtype,
                        **({"trust_remote_code": True} if trust else {}),  # defaults left out: ids stay as they were
                        **({"chat_template": params.model.chat_template} if template else {})}}
    fn = functools.partial(job, ImportJob(source=source, dtype=params.model.dtype, params=subset, inputs=inputs,
                                          trust_remote_code=trust, template=template))
    runner.submit_stage(STAGE, OUT, fn, params.cluster.import_model, params.cluster, subset, inputs,
                        key_extra={"source": source.location}, metrics=False)  # a model folder: no metrics


if __name__ == "__main__":
    sys.exit(runner.run(main))
