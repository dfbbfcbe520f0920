"""Benchmark loaders on the real files in ../shared/benchmarks (never copied into the project), one-line errors
for missing or malformed data, and log-likelihood choice scoring on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages import benchmarks
from stages.benchmarks import ChoiceItem, choice_logprobs, load_bigbench, load_hhh, load_truthfulqa_csv, mc_scores
from stages.errors import UserError
from stages.scoring import Scorer
from tests.conftest import ROOT

SHARED = ROOT.parent / "shared" / "benchmarks"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/benchmarks is not beside the project")


@needs_shared
def test_default_paths_resolve_beside_the_project(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert benchmarks.resolve("hhh", None).resolve() == (SHARED / "hhh_alignment").resolve()
    with pytest.raises(UserError, match=r"^params.yaml: evaluate.truthfulqa_csv: /nowhere.csv not found; set it"):
        benchmarks.resolve("truthfulqa_csv", "/nowhere.csv")


@needs_shared
def test_loaders_read_every_item() -> None:
    hhh = load_hhh(SHARED / "hhh_alignment")
    assert {i.subset for i in hhh} == {"harmless", "helpful"} and len(hhh) == 58 + 59
    assert all(len(i.choices) == 2 and len(i.correct) == 1 for i in hhh)
    assert hhh[0].context.startswith("\nHuman: ") and hhh[0].context.endswith("\nAssistant:")
    mc = load_bigbench(SHARED / "truthfulqa" / "task_mc.json", "truthfulqa")
    assert len(mc) == 299 and mc[0].context.startswith("Q: What is human life expectancy")
    rows = load_truthfulqa_csv(SHARED / "truthfulqa" / "TruthfulQA_part1.csv")
    assert len(rows) == 400 and rows[0].choices[rows[0].best] == "The watermelon seeds pass through your digestive system"
    assert all(r.best in r.correct and len(r.correct) < len(r.choices) for r in rows)


def test_malformed_bigbench_task_is_one_line(tmp_path: Path) -> None:
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"examples": [{"input": "Hi", "target_scores": {"a": 1, "b": 0}},
                                             {"input": "Hi", "target_scores": {"a": 0, "b": 0}}]}))
    with pytest.raises(UserError, match=r"task.json: examples\[2\].target_scores: no choice scored 1$"):
        load_bigbench(task, "x")
    task.write_text("{not json")
    with pytest.raises(UserError, match=r"task.json: not valid JSON \("):
        load_bigbench(task, "x")


def test_choice_scoring_and_mc_metrics(tiny_model: Path) -> None:
    scorer = Scorer(tiny_model)
    item = ChoiceItem("Q: What is the capital of France?\nA:", ("Paris.", "The quick brown fox jumps.", "1 2 3"),
                      frozenset({0}), 0, "test")
    raw = choice_logprobs(scorer, item, normalise=False)
    per_token = choice_logprobs(scorer, item, normalise=True)
    assert raw == scorer.continuation_logprobs(item.context, [" Paris.", " The quick brown fox jumps.", " 1 2 3"])
    assert all(p > r for p, r in zip(per_token, raw))  # dividing a negative sum by its token count
    scores = mc_scores([-1.0, -2.0, -3.0], item)
    assert scores["mc1"] == 1.0 and scores["mc2"] == pytest.approx(1 / (1 + 2.718281828459045**-1 + 2.718281828459045**-2))
    assert mc_scores([-3.0, -2.0, -1.0], item)["mc1"] == 0.0
