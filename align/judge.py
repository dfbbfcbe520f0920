"""The a/b judge (SALMON's preference labelling): a model reads the judge prompt (instruction, Output (a),
Output (b), one principle) ending where the next token is the choice, and the score is logit("a") - logit("b")
there. Each pair is judged in both orders; a label is the preferred response only where both orders agree, a tie
otherwise, which cancels the judge's position bias. Used by `label_preferences` (the SFT model labels pairs) and
by `evaluate` (an independent judge compares each policy's answer with a reference answer: `verdict`)."""

from __future__ import annotations

import statistics
from pathlib import Path

from align.assets import PreferencePrinciple, PreferenceValue
from align.scoring import Scorer, choice_token_id

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
    """Each choice must be one token of the judge's tokenizer (checked on the login node, before any job)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    for choice in choices:
        choice_token_id(tokenizer, choice, f"params.yaml: label_preferences.choices (tokenizer of {model})")


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


OUTCOMES = {"a": "win", "b": "loss", "tie": "tie"}  # `label` of a pair with the answer as a, as the answer's outcome


def verdict(row: dict) -> tuple[str, bool]:
    """For a pair `judge` scored with the answer under test as response_a and the reference as response_b: the
    answer's outcome (win, loss or tie) and whether the judge picked the same position (a, or b) in both orders.
    Per order the judge's verdict is its margin, the mean logit(a) - logit(b) over the criteria shown; the answer
    wins only where both orders prefer it, loses only where both prefer the reference, and ties otherwise, as
    `label` and MT-Bench's pairwise comparison with position swap (Zheng et al. 2023) decide: a judge bound to a
    position ties every pair, however far it leans. A margin of exactly 0 picks no position."""
    shown_first = statistics.fmean(both[0] for both in row["scores"].values())  # > 0 favours the answer (it is a)
    shown_second = statistics.fmean(both[1] for both in row["scores"].values())  # swapped: > 0 favours the reference
    same = (shown_first > 0 and shown_second > 0) or (shown_first < 0 and shown_second < 0)
    return OUTCOMES[label(shown_first, shown_second)], same
