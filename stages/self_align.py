"""Stage `self_align`: principle-driven answers. For every prompt the base model continues the principles, the
exemplars and the query into internal thoughts and an answer; the thoughts are dropped and the answer is kept
only if it survives the filters (every dropped answer is counted under its reason).

The principles + exemplars prefix is identical for every prompt and is most of each prompt's tokens: the hf
backend computes its KV cache once and reuses it for every batch, vLLM's prefix caching does the same.
"""

from __future__ import annotations

import functools
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from align import paths, runner, templates
from align.artifacts import input_refs, staged_out, verify_artifact
from align.assets import Exemplar, Principle, load_jsonl
from align.errors import UserError
from align.filters import all_rejected, answer_problem
from align.generation import Generator, Sampling, one_task
from align.params import Engine
from align.params import SelfAlign
from align.records import read_jsonl, sample_in_order, write_json, write_jsonl

STAGE = "self_align"
OUT = paths.SELF_ALIGN
BASE = paths.BASE
PROMPTS = paths.PROMPTS
PRINCIPLES = Path("assets/principles.jsonl")
EXEMPLARS = Path("assets/exemplars.jsonl")


@dataclass(frozen=True)
class SelfAlignJob:
    """The job's arguments, sent to the allocation with it."""
    model: Path
    cfg: SelfAlign
    engine: Engine
    seed: int
    params: dict  # the params subset and the input refs: the manifest records both
    inputs: dict


def job(args: SelfAlignJob) -> str:
    """Runs inside the allocation: answer every prompt, filter, write sft.jsonl + metrics.json."""
    principles = load_jsonl(PRINCIPLES, Principle)
    exemplars = load_jsonl(EXEMPLARS, Exemplar)
    every = read_jsonl(PROMPTS / "prompts.jsonl")  # from every source
    prompts = sample_in_order(every, args.cfg.max_prompts, args.seed)
    prefix = templates.self_align_prefix(principles, exemplars)
    sampling = Sampling(args.cfg.temperature, args.cfg.top_p, args.cfg.max_new_tokens,
                        stop=templates.SELF_ALIGN_STOP)
    with Generator(args.model, args.engine) as generator:
        generations = generator.generate([templates.self_align_prompt(prefix, p["text"]) for p in prompts], sampling)
    kept, rejected = [], Counter()
    for prompt, generation in zip(prompts, generations):
        _thoughts, answer = templates.split_thoughts(generation.text)
        reason = answer_problem(generation, answer, principles, args.cfg)
        if reason:
            rejected[reason] += 1
            continue
        kept.append({"id": prompt["id"], "prompt": prompt["text"], "answer": answer, "source": prompt["source"]})
    if not kept:
        raise UserError(all_rejected(STAGE, "answers", len(prompts), rejected, "self_align", args.cfg))
    lengths = sorted(len(row["answer"].split()) for row in kept)
    metrics = {
        "prompts": len(prompts),
        "kept": len(kept),
        "kept_share": len(kept) / len(prompts),
        "rejected": dict(sorted(rejected.items())),
        "answer_words_mean": statistics.fmean(lengths),
        "answer_words_p50": lengths[len(lengths) // 2],
        "answer_words_p90": lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))],
        "answer_words_max": lengths[-1],
        "generated_tokens": sum(g.num_tokens for g in generations),
        "prefix_chars": len(prefix),
    }
    with staged_out(OUT, stage=STAGE, params=args.params, inputs=args.inputs) as tmp:
        write_jsonl(tmp / "sft.jsonl", kept)
        write_json(tmp / "metrics.json", metrics)
    return verify_artifact(OUT)


def main() -> None:
    params = runner.stage_params(STAGE)
    load_jsonl(PRINCIPLES, Principle)  # bad assets fail here, before a job
    load_jsonl(EXEMPLARS, Exemplar)
    inputs = input_refs({"model": BASE, "prompts": PROMPTS, "principles": PRINCIPLES, "exemplars": EXEMPLARS})
    subset = {"seed": params.seed, "self_align": params.self_align.model_dump(),
              "generation": params.generation.model_dump()}
    fn = functools.partial(job, SelfAlignJob(model=BASE, cfg=params.self_align, engine=Engine.of(params.generation, params.cluster.self_align),
                                             seed=params.seed, params=subset, inputs=inputs))
    runner.submit_stage(STAGE, OUT, fn, one_task(params.cluster.self_align, STAGE), params.cluster, subset, inputs)


if __name__ == "__main__":
    sys.exit(runner.run(main))
