"""Stage `sample_pairs`: two responses per prompt from the SFT policy, to be judged against the preference
principles. Prompts come from the `prompts` out, leaving out those the SFT data was made from (the policy has
seen its own answers to them); `max_prompts` of the rest are drawn at random. Both samples come from one
generation call per sample index with different seeds, at `temperature` > 0 so that they differ.

With system messages (stage `system_messages`), each of its training rows adds a pair for its prompt: response a
written under the row's system message, response b under its mismatched one (a different value in every
dimension), so the judge compares an answer meant for the stated preferences with one meant for others. Those
pairs carry `system`, `values` and `combination`; their ids start with `sys-`.
"""

from __future__ import annotations

import functools
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from align import paths, runner
from align.artifacts import input_refs, staged_out, verify_artifact
from align.errors import UserError
from align.filters import counts_text
from align.generation import Generator, Sampling, chat_prompt, one_task
from align.params import Engine, SamplePairs
from align.paths import MODEL
from align.records import read_jsonl, unused_prompts, write_json, write_jsonl

STAGE = "sample_pairs"
OUT = paths.PAIRS
POLICY = paths.SFT
PROMPTS = paths.PROMPTS
SFT_DATA = paths.SELF_ALIGN
SYSTEM = paths.SYSTEM_MESSAGES


def system_pair(row: dict) -> dict:
    """What a system-message row adds to a pair: the message its response a follows, and the values it encodes."""
    return {"system": row["system"], "values": row["values"], "combination": row["combination"],
            "mismatched_system": row["mismatched"]["system"]}


@dataclass(frozen=True)
class SamplePairsJob:
    """The job's arguments, sent to the allocation with it."""
    policy: Path  # the model that samples
    prompts: list[dict]
    system_rows: list[dict]  # the system_messages stage's training rows
    cfg: SamplePairs
    engine: Engine
    seed: int
    params: dict  # the params subset and the input refs: the manifest records both
    inputs: dict


def job(args: SamplePairsJob) -> str:
    """Runs inside the allocation: sample twice, keep the usable pairs, write pairs.jsonl + metrics.json."""
    with Generator(args.policy, args.engine) as generator:
        def text(prompt: str, system: str | None) -> str:
            return chat_prompt(generator.tokenizer, [{"role": "user", "content": prompt}], system=system)

        plain = [text(p["text"], None) for p in args.prompts]
        systems = [[text(r["prompt"], r["system"]) for r in args.system_rows],
                   [text(r["prompt"], r["mismatched"]["system"]) for r in args.system_rows]]
        samples = [generator.generate(plain + systems[k], Sampling(args.cfg.temperature, args.cfg.top_p,
                                                                   args.cfg.max_new_tokens,
                                                                   seed=args.seed * 1_000_003 + k * 500_009))
                   for k in (0, 1)]
    sources = [{"id": p["id"], "prompt": p["text"]} for p in args.prompts] + \
              [{"id": f"sys-{r['id']}", "prompt": r["prompt"], **system_pair(r)} for r in args.system_rows]
    pairs, dropped = [], Counter()
    for source, a, b in zip(sources, *samples):
        if not a.text.strip() or not b.text.strip():
            dropped["empty_response"] += 1
        elif a.text.strip() == b.text.strip():
            dropped["identical_responses"] += 1
        else:
            pairs.append({**source, "response_a": a.text.strip(), "response_b": b.text.strip(),
                          "finish_a": a.finish_reason, "finish_b": b.finish_reason})
    if not pairs:
        reasons = counts_text(dropped)
        raise UserError(f"{STAGE}: none of {len(sources)} prompts gave a usable pair ({reasons}); nothing written")
    responses = [g for sample in samples for g in sample]
    metrics = {
        "prompts": len(args.prompts),
        "pairs": len(pairs),
        "system_message_pairs": sum("system" in p for p in pairs),
        "dropped": dict(sorted(dropped.items())),
        "response_tokens_mean": statistics.fmean(g.num_tokens for g in responses),
        "cut_off_share": sum(g.finish_reason == "length" for g in responses) / len(responses),
    }
    with staged_out(OUT, stage=STAGE, params=args.params, inputs=args.inputs) as tmp:
        write_jsonl(tmp / "pairs.jsonl", pairs)
        write_json(tmp / "metrics.json", metrics)
    return verify_artifact(OUT)


def main() -> None:
    params = runner.stage_params(STAGE)
    cfg = params.sample_pairs
    inputs = input_refs({"policy": POLICY, "prompts": PROMPTS, "sft_data": SFT_DATA, "system_messages": SYSTEM})
    system_rows = read_jsonl(SYSTEM / "train.jsonl")
    prompts = unused_prompts(read_jsonl(PROMPTS / "prompts.jsonl"), read_jsonl(SFT_DATA / "sft.jsonl"),
                             cfg.max_prompts, params.seed)
    if not prompts:
        raise UserError(f"{PROMPTS}/prompts.jsonl: every prompt was used for SFT; none left to sample pairs for")
    subset = {"seed": params.seed, "sample_pairs": cfg.model_dump(), "generation": params.generation.model_dump()}
    fn = functools.partial(job, SamplePairsJob(policy=POLICY / MODEL, prompts=prompts, system_rows=system_rows, cfg=cfg,
                                               engine=Engine.of(params.generation, params.cluster.sample_pairs), seed=params.seed, params=subset,
                                               inputs=inputs))
    runner.submit_stage(STAGE, OUT, fn, one_task(params.cluster.sample_pairs, STAGE), params.cluster, subset, inputs)


if __name__ == "__main__":
    sys.exit(runner.run(main))
