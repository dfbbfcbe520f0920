"""Stage `verbose_clone`: the final SFT policy, `models/sft`.

With `verbose_clone.enabled`, the engraved model answers the SFT prompts again with the verbose-cloning
instruction in front of each query (one generation job), and the base model is LoRA-trained on (query →
that answer) without the instruction (one training job): context distillation, so the policy answers in the
detailed style unprompted. An answer cut by the token limit keeps its complete paragraphs (or sentences) when
`trim_cut_off` is on, so a long-winded model still yields targets that end cleanly. The answers are kept under checkpoints/ until the policy is written, so a rerun after
a failed training job does not generate them again.

Disabled, the SFT policy is the engraved model: models/sft holds hard links to its files (no copy) and a
manifest naming it as input. The stage depends on the flag, so toggling it and running `dvc repro` rebuilds
models/sft either way.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from align import paths, runner, sft, templates
from align.artifacts import MANIFEST, input_refs, staged_out, verify_artifact
from align.assets import load_text
from align.errors import UserError
from align.filters import all_rejected, answer_problem, trim_to_boundary
from align.generation import Generator, Sampling, chat_prompt, one_task
from align.params import Engine, Params, SelfAlign, TrainingRun, VerboseClone
from align.paths import MODEL
from align.records import read_jsonl, write_json, write_jsonl
from align.training import checkpoint_dir

STAGE = "verbose_clone"
OUT = paths.SFT
BASE = paths.BASE
ENGRAVED = paths.ENGRAVED
DATA = paths.SELF_ALIGN
INSTRUCTION = Path("assets/verbose_instruction.txt")
LIVE = Path("dvclive/verbose_clone")
ENGRAVED_LIVE = Path("dvclive/engrave")
ANSWERS_METRICS = "answers_metrics.json"


@dataclass(frozen=True)
class VerboseAnswersJob:
    """The answers job's arguments, sent to the allocation with it."""
    model: Path  # the engraved model
    instruction: str  # the verbose-cloning instruction, put in front of each query
    queries: list[str]
    cfg: VerboseClone
    filters: SelfAlign  # the answer filters' settings
    engine: Engine
    out: Path  # the answers' JSONL file, in the stage's scratch folder


def answers_job(args: VerboseAnswersJob) -> None:
    """Runs inside the allocation: the engraved model's answers under the instruction, filtered, to `args.out`,
    and their metrics beside it (written first: `args.out` existing means both are complete)."""
    sampling = Sampling(args.cfg.temperature, args.cfg.top_p, args.cfg.max_new_tokens)
    with Generator(args.model, args.engine) as generator:
        prompts = [chat_prompt(generator.tokenizer, [{"role": "user", "content": templates.verbose_prompt(
            args.instruction, query)}]) for query in args.queries]
        generations = generator.generate(prompts, sampling)
    rows, rejected, trimmed = [], Counter(), 0
    for query, generation in zip(args.queries, generations):
        answer = generation.text.strip()
        if generation.finish_reason == "length" and args.cfg.trim_cut_off and (kept := trim_to_boundary(answer)):
            answer, generation, trimmed = kept, replace(generation, finish_reason="stop"), trimmed + 1
        reason = answer_problem(generation, answer, [], args.filters)
        if reason:
            rejected[reason] += 1
        else:
            rows.append({"prompt": query, "answer": answer})
    if not rows:
        raise UserError(all_rejected(STAGE, "verbose answers", len(args.queries), rejected, "verbose_clone",
                                     args.filters))
    write_json(args.out.with_name(ANSWERS_METRICS), {
        "verbose_kept": len(rows), "verbose_trimmed": trimmed, "verbose_rejected": dict(sorted(rejected.items())),
        "verbose_answer_words_mean": statistics.fmean(len(r["answer"].split()) for r in rows)})
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    write_jsonl(tmp, rows)
    os.replace(tmp, args.out)


def link_engraved(params: dict, inputs: dict) -> str:
    """models/sft as the engraved model: hard links where the filesystem allows, copies elsewhere."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    with staged_out(OUT, stage=STAGE, params=params, inputs=inputs) as tmp:
        shutil.copytree(ENGRAVED, tmp, copy_function=link, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(MANIFEST, "metrics.json"))
        write_json(tmp / "metrics.json", {"verbose_clone": False})
    curve = LIVE / "plots" / "metrics"  # the SFT policy's training curve is the engraved model's
    shutil.rmtree(curve, ignore_errors=True)
    shutil.copytree(ENGRAVED_LIVE / "plots" / "metrics", curve)
    return verify_artifact(OUT)


def distill(params: Params, subset: dict, inputs: dict) -> None:
    """The answers job (unless a failed run left its answers), then the SFT job that writes the out: neither where
    the out is there already from the same params, inputs and code."""
    if runner.finished_already(STAGE, OUT, subset, inputs) is not None:
        return
    scratch = checkpoint_dir(STAGE, {"params": subset, "inputs": inputs})
    answers = scratch / "answers.jsonl"
    if not answers.is_file():
        fn = functools.partial(answers_job, VerboseAnswersJob(
            model=ENGRAVED / MODEL, instruction=load_text(INSTRUCTION),
            queries=[row["prompt"] for row in read_jsonl(DATA / "sft.jsonl")], cfg=params.verbose_clone,
            filters=params.self_align, engine=Engine.of(params.generation, params.cluster.verbose_clone.generate),
            out=answers,
        ))
        runner.submit_job(f"{STAGE}.generate", scratch / "answers", fn,
                          one_task(params.cluster.verbose_clone.generate, f"{STAGE}.generate"), params.cluster, subset,
                          inputs)
    fn = functools.partial(sft.job, sft.SftJob(
        stage=STAGE, model=BASE, pairs=[(r["prompt"], r["answer"]) for r in read_jsonl(answers)], out=OUT,
        live_dir=LIVE, ckpt_dir=scratch / "train",
        training=TrainingRun.of(params.training, params.cluster.verbose_clone.train, f"{STAGE}.train"),
        epochs=params.verbose_clone.epochs,
        max_prompt_tokens=params.engrave.max_prompt_tokens, max_answer_tokens=params.engrave.max_answer_tokens,
        seed=params.seed, params=subset, inputs=inputs,
        metrics={"verbose_clone": True, **json.loads((scratch / ANSWERS_METRICS).read_text())},
    ))
    runner.submit_stage(STAGE, OUT, fn, params.cluster.verbose_clone.train, params.cluster, subset, inputs)
    shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    params = runner.stage_params(STAGE)
    cfg = params.verbose_clone
    if cfg.enabled:
        load_text(INSTRUCTION)  # a missing or empty instruction fails here, before a job
        inputs = input_refs({"model": BASE, "engraved": ENGRAVED, "data": DATA, "instruction": INSTRUCTION})
        subset = {"seed": params.seed, "verbose_clone": cfg.model_dump(), "training": params.training.model_dump(),
                  "engrave": params.engrave.model_dump(), "generation": params.generation.model_dump(),
                  "self_align": {"max_repeated_ngram_share": params.self_align.max_repeated_ngram_share}}
        distill(params, subset, inputs)
    else:
        artifact_id = link_engraved({"verbose_clone": cfg.model_dump()}, input_refs({"engraved": ENGRAVED}))
        runner.finish_stage(STAGE, OUT, artifact_id)


if __name__ == "__main__":
    sys.exit(runner.run(main))
