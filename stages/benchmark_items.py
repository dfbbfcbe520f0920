"""Benchmark data the project may not redistribute: where it is read from, how each format is parsed into
multiple-choice items, and how a model scores an item by log-likelihood.

Every benchmark is a params value naming a folder or file; left empty it resolves to ../shared/benchmarks (the
layout of its README) where that exists, and a missing benchmark is one line naming the param to set.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from stages.assets import read_text
from stages.errors import UserError
from stages.scoring import Scorer

SHARED = Path("../shared/benchmarks")
DEFAULTS = {"hhh": "hhh_alignment", "truthfulqa_mc": "truthfulqa/task_mc.json",
            "truthfulqa_csv": "truthfulqa/TruthfulQA_part1.csv", "mt_bench": "mt_bench/question.jsonl"}


@dataclass(frozen=True)
class ChoiceItem:
    """A context and its candidate continuations; `correct` holds the indices of the right ones, `best` the one
    MC1-style scoring compares against the wrong ones."""

    context: str
    choices: tuple[str, ...]
    correct: frozenset[int]
    best: int
    subset: str


def resolve(key: str, value: str | None, param: str | None = None) -> Path:
    """The path of benchmark `key` from its params value (`param`, by default `evaluate.<key>`), else its place
    under ../shared/benchmarks."""
    path = Path(value) if value else SHARED / DEFAULTS[key]
    if not path.exists():
        where = f"{value}" if value else f"{path} (the default)"
        raise UserError(f"params.yaml: {param or 'evaluate.' + key}: {where} not found; set it to your copy of the "
                        f"benchmark")
    return path


def _read_json(path: Path) -> dict:
    try:
        task = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(task, dict):
        raise UserError(f"{path}: expected a JSON object (a BIG-bench task), got {type(task).__name__}")
    return task


def load_bigbench(path: Path, subset: str) -> list[ChoiceItem]:
    """A BIG-bench JSON multiple-choice task: each example's input framed by the task's own prefixes, its
    `target_scores` keys as choices (score 1 = correct)."""
    task = _read_json(path)
    head = task.get("task_prefix", "")
    before, after = task.get("example_input_prefix", ""), task.get("example_output_prefix", "")
    examples = task.get("examples") or []
    if not isinstance(examples, list):
        raise UserError(f"{path}: examples: expected a list of examples, got {type(examples).__name__}")
    items = []
    for number, example in enumerate(examples, start=1):
        scores = example.get("target_scores") if isinstance(example, dict) else None
        if not isinstance(example, dict) or not isinstance(example.get("input"), str) or not isinstance(scores, dict) \
                or len(scores) < 2:
            raise UserError(f"{path}: examples[{number}]: expected an input string and >= 2 target_scores")
        choices = tuple(scores)
        correct = frozenset(i for i, c in enumerate(choices) if scores[c] == 1)
        if not correct:
            raise UserError(f"{path}: examples[{number}].target_scores: no choice scored 1")
        items.append(ChoiceItem(f"{head}{before}{example['input']}{after}", choices, correct, min(correct), subset))
    if not items:
        raise UserError(f"{path}: examples: empty; expected BIG-bench multiple-choice examples")
    return items


def load_hhh(folder: Path) -> list[ChoiceItem]:
    """Every `<subset>/task.json` under the HHH folder (harmless, helpful, honest, other: whichever exist)."""
    tasks = sorted(folder.glob("*/task.json"))
    if not tasks:
        raise UserError(f"{folder}: no <subset>/task.json inside; expected the BIG-bench hhh_alignment folder")
    return [item for task in tasks for item in load_bigbench(task, task.parent.name)]


def load_truthfulqa_csv(path: Path) -> list[ChoiceItem]:
    """The original TruthfulQA CSV: choices = correct answers then incorrect ones; `best` = the Best Answer."""
    items = []
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    for row in reader:
        number = reader.line_num  # a quoted answer may span lines: the row's last line
        try:
            fields = {key: row[key] for key in ("Correct Answers", "Incorrect Answers", "Best Answer", "Question",
                                                "Category")}
        except KeyError as exc:
            raise UserError(f"{path}: line {number}: column {exc.args[0]!r} missing") from None
        short = next((key for key, value in fields.items() if value is None), None)
        if short is not None:
            raise UserError(f"{path}: line {number}: column {short!r} missing (the row has fewer fields than the "
                            f"header)")
        correct = [a.strip() for a in fields["Correct Answers"].split(";") if a.strip()]
        wrong = [a.strip() for a in fields["Incorrect Answers"].split(";") if a.strip()]
        best, question, category = fields["Best Answer"].strip(), fields["Question"], fields["Category"]
        if not best or not wrong:
            raise UserError(f"{path}: line {number}: {'Best Answer' if not best else 'Incorrect Answers'}: empty; "
                            f"expected the best answer and ;-separated incorrect answers")
        if best not in correct:
            correct.insert(0, best)
        items.append(ChoiceItem(f"Q: {question}\nA:", tuple(correct + wrong), frozenset(range(len(correct))),
                                correct.index(best), category))
    if not items:
        raise UserError(f"{path}: no questions; expected the TruthfulQA CSV (a header row, then one row per question)")
    return items


def choice_logprobs(scorer: Scorer, item: ChoiceItem, normalise: bool) -> list[float]:
    """Log-likelihood of each choice after the context (a space joins them), per token when `normalise`."""
    continuations = [" " + c.strip() for c in item.choices]
    totals = scorer.continuation_logprobs(item.context, continuations)
    if not normalise:
        return totals
    lengths = [len(scorer.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in continuations]
    return [t / n for t, n in zip(totals, lengths)]


def mc_scores(logprobs: list[float], item: ChoiceItem) -> dict[str, float]:
    """mc1: 1 when the best choice outscores every wrong one; mc2: the probability mass on the correct choices,
    normalised over all choices (TruthfulQA's MC1/MC2; for two-choice HHH items mc1 is plain accuracy)."""
    wrong = [lp for i, lp in enumerate(logprobs) if i not in item.correct]
    top = max(logprobs)
    mass = [math.exp(lp - top) for lp in logprobs]
    return {"mc1": float(logprobs[item.best] > max(wrong)),
            "mc2": sum(m for i, m in enumerate(mass) if i in item.correct) / sum(mass)}
