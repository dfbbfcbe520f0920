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
from pathlib import Path

from stages import cli
from stages.artifacts import input_refs, staged_out, verify_artifact
from stages.assets import PreferencePrinciple, PreferenceValue, load_jsonl, load_template, pick_principles
from stages.errors import UserError
from stages.generation import one_task
from stages.params import LabelPreferences, load_params
from stages.records import read_jsonl, write_json, write_jsonl
from stages.scoring import Scorer
from stages.sft import MODEL
from stages.system_messages import DIMENSIONS, SPACE

STAGE = "label_preferences"
OUT = Path("data/preferences")
JUDGE = Path("models/sft")
PAIRS = Path("data/pairs")
PRINCIPLES = Path("assets/preference_principles.jsonl")
TEMPLATE = Path("assets/judge_prompt.txt")
PLACEHOLDERS = ("instruction", "output_a", "output_b", "principle")


Criterion = tuple[str, str]  # (id the label is keyed by, the text the judge reads)


def principle_text(principle: PreferencePrinciple) -> str:
    return f"{principle.name}: {principle.definition}"


def criteria_of(principles: list[PreferencePrinciple]) -> list[Criterion]:
    return [(p.id, principle_text(p)) for p in principles]


def value_criteria(values: dict[str, str], space: dict[str, PreferenceValue]) -> list[Criterion]:
    """The judging principles of a system message: its values' descriptions."""
    return [(space[v].id, f"{space[v].name}: {space[v].description}") for v in values.values()]


def label(score_ab: float, score_ba: float) -> str:
    """'a' or 'b' where both orders prefer the same response, else 'tie'. `score_ab` is logit(a) - logit(b)
    with the pair shown as is; `score_ba` the same with the two responses swapped, so it favours b when > 0."""
    if score_ab > 0 and score_ba < 0:
        return "a"
    if score_ab < 0 and score_ba > 0:
        return "b"
    return "tie"


def check_choices(model: Path, choices: tuple[str, str]) -> None:
    """Each choice must be one token of the judge's tokenizer: its score is one next-token logit."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    for choice in choices:
        ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise UserError(f"params.yaml: label_preferences.choices: {choice!r} is {len(ids)} tokens for the tokenizer "
                            f"of {model}; expected a single token")


def judge(scorer: Scorer, template: str, pairs: list[dict], criteria: list[list[Criterion]],
          choices: tuple[int, int]) -> list[dict]:
    """Per pair: the scores in both orders and the labels under each of its criteria (one list per pair)."""
    rows = []
    for pair, shown in zip(pairs, criteria):
        scores: dict[str, list[float]] = {cid: [] for cid, _ in shown}
        for first, second in (("response_a", "response_b"), ("response_b", "response_a")):
            texts = [template.format(instruction=pair["prompt"], output_a=pair[first], output_b=pair[second],
                                     principle=text) for _, text in shown]
            logits = scorer.next_token_logits(texts, list(choices))
            for (cid, _), (a, b) in zip(shown, logits.tolist()):
                scores[cid].append(a - b)
        labels = {pid: label(ab, ba) for pid, (ab, ba) in scores.items()}
        rows.append({**pair, "scores": scores, "labels": labels})
    return rows


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


def job(model: Path, pairs: list[dict], cfg: LabelPreferences, params: dict, inputs: dict) -> str:
    """Runs inside the allocation: judge every pair under every principle, write preferences.jsonl + metrics."""
    principles = pick_principles(load_jsonl(PRINCIPLES, PreferencePrinciple), cfg.principles,
                                 "label_preferences.principles", PRINCIPLES)
    template = load_template(TEMPLATE, PLACEHOLDERS)
    space = {v.id: v for v in load_jsonl(SPACE, PreferenceValue)}
    scorer = Scorer(model, batch_size=cfg.batch_size)
    choices = (scorer.token_id(cfg.choices[0]), scorer.token_id(cfg.choices[1]))
    criteria = [value_criteria(p["values"], space) if "system" in p else criteria_of(principles) for p in pairs]
    rows = judge(scorer, template, pairs, criteria, choices)
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
    with staged_out(OUT, stage=STAGE, params=params, inputs=inputs) as tmp:
        write_jsonl(tmp / "preferences.jsonl", rows)
        write_json(tmp / "metrics.json", metrics)
    return verify_artifact(OUT)


def main() -> None:
    params = load_params()
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
    fn = functools.partial(job, JUDGE / MODEL, pairs, cfg, subset, inputs)
    cli.submit_stage(STAGE, OUT, fn, one_task(params.cluster.label_preferences, STAGE), params.cluster, subset,
                     inputs)


if __name__ == "__main__":
    sys.exit(cli.run(main))
