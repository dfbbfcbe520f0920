"""Stage `label_preferences`: synthetic preferences, one per (pair, principle), judged by the SFT model itself.

For every pair, principle and order, the judge prompt (assets/judge_prompt.txt) shows the instruction, Output (a),
Output (b) and the principle, and ends where the next token is the choice; the score is logit("a") - logit("b")
there, a forward pass and no generation. Each pair is judged in both orders (a/b swapped); the label under a
principle is the preferred response only where both orders agree, a tie otherwise, which removes the judge's
position bias from the labels. All principles of one (pair, order) share the prompt up to the principle, so
they are scored as one batch over that prefix, computed once.

A system-message pair (stage `system_messages`) is judged under the descriptions of the values its message
encodes, one per dimension, instead of the principles; its labels are keyed by value id.
"""

from __future__ import annotations

import functools
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from align import paths, runner
from align.artifacts import input_refs, staged_out, verify_artifact
from align.assets import DIMENSIONS, PreferencePrinciple, PreferenceValue, load_jsonl, load_template, pick_principles
from align.errors import UserError
from align.generation import one_task
from align.judge import PLACEHOLDERS, check_choices, criteria_of, judge, value_criteria
from align.params import LabelPreferences
from align.paths import MODEL
from align.records import read_jsonl, write_json, write_jsonl
from align.scoring import Scorer

STAGE = "label_preferences"
OUT = paths.PREFERENCES
JUDGE = paths.SFT
PAIRS = paths.PAIRS
PRINCIPLES = paths.PREFERENCE_PRINCIPLES
SPACE = paths.PREFERENCE_SPACE
TEMPLATE = paths.JUDGE_PROMPT


def system_metrics(rows: list[dict]) -> dict:
    """Per dimension, over the system-message pairs: the share decided, and of those the share that prefers
    response a, the one written under the message (how often the judge sees the message followed)."""
    result: dict = {"pairs": len(rows)}
    for dimension in DIMENSIONS:
        labels = [row["labels"][row["values"][dimension]] for row in rows]
        decided = [x for x in labels if x != "tie"]
        result[dimension] = {"decided": len(decided) / len(labels),
                             "matched_preferred": decided.count("a") / len(decided) if decided else None}
    return result


@dataclass(frozen=True)
class LabelPreferencesJob:
    """The job's arguments, sent to the allocation with it."""
    judge: Path  # the judging model
    pairs: list[dict]
    cfg: LabelPreferences
    batch_size: int  # judge prompts per forward pass (cluster.label_preferences.score_batch_size)
    shard: bool  # the judge spread over the job's GPUs (cluster.label_preferences.shard_scorers)
    params: dict  # the params subset and the input refs: the manifest records both
    inputs: dict


def job(args: LabelPreferencesJob) -> str:
    """Runs inside the allocation: judge every pair under every principle, write preferences.jsonl + metrics."""
    principles = pick_principles(load_jsonl(PRINCIPLES, PreferencePrinciple), args.cfg.principles,
                                 "label_preferences.principles", PRINCIPLES)
    template = load_template(TEMPLATE, PLACEHOLDERS)
    space = {v.id: v for v in load_jsonl(SPACE, PreferenceValue)}
    scorer = Scorer(args.judge, batch_size=args.batch_size, shard=args.shard)
    choices = (scorer.token_id(args.cfg.choices[0]), scorer.token_id(args.cfg.choices[1]))
    criteria = [value_criteria(p["values"], space) if "system" in p else criteria_of(principles) for p in args.pairs]
    rows = judge(scorer, template, args.pairs, criteria, choices)
    plain = [row for row in rows if "system" not in row]
    labels = [label for row in rows for label in row["labels"].values()]
    metrics = {
        "pairs": len(rows),
        "principles": len(principles),
        "tie_rate": labels.count("tie") / len(labels),
        "agreement": {p.id: sum(row["labels"][p.id] != "tie" for row in plain) / len(plain) for p in principles}
        if plain else {},
        "position_bias": statistics.fmean(s for row in rows for both in row["scores"].values() for s in both),
    }
    if len(plain) < len(rows):
        metrics["system_messages"] = system_metrics([row for row in rows if "system" in row])
    with staged_out(OUT, stage=STAGE, params=args.params, inputs=args.inputs) as tmp:
        write_jsonl(tmp / "preferences.jsonl", rows)
        write_json(tmp / "metrics.json", metrics)
    return verify_artifact(OUT)


def main() -> None:
    params = runner.stage_params(STAGE)
    cfg = params.label_preferences
    pick_principles(load_jsonl(PRINCIPLES, PreferencePrinciple), cfg.principles, "label_preferences.principles",
                    PRINCIPLES)  # bad assets or ids fail before a job
    load_template(TEMPLATE, PLACEHOLDERS)
    space = {v.id for v in load_jsonl(SPACE, PreferenceValue)}
    check_choices(JUDGE / MODEL, cfg.choices)
    inputs = input_refs({"judge": JUDGE, "pairs": PAIRS, "principles": PRINCIPLES, "template": TEMPLATE,
                         "space": SPACE})
    pairs = read_jsonl(PAIRS / "pairs.jsonl")
    unknown = next((v for row in pairs for v in row.get("values", {}).values() if v not in space), None)
    if unknown is not None:
        raise UserError(f"{PAIRS}/pairs.jsonl: values: {unknown!r} is not an id in {SPACE}; rerun system_messages "
                        f"and sample_pairs")
    if any(not (row["response_a"].strip() and row["response_b"].strip()) for row in pairs):
        raise UserError(f"{PAIRS}/pairs.jsonl: a pair has an empty response; expected two non-empty responses")
    subset = {"label_preferences": cfg.model_dump()}
    resources = one_task(params.cluster.label_preferences, STAGE)
    fn = functools.partial(job, LabelPreferencesJob(judge=JUDGE / MODEL, pairs=pairs, cfg=cfg,
                                                    batch_size=resources.score_batch_size,
                                                    shard=resources.shard_scorers, params=subset, inputs=inputs))
    runner.submit_stage(STAGE, OUT, fn, resources, params.cluster, subset, inputs)


if __name__ == "__main__":
    sys.exit(runner.run(main))
