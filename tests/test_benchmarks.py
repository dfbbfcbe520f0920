"""Stage `benchmarks` from local copies, from hub datasets in the HF cache's layout (offline), and with no source at
all (one line, nothing written); the loaders on the real files in ../shared/benchmarks where it is beside the
project (never copied into it), one-line errors for malformed data, and log-likelihood choice scoring on the tiny
model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from align.artifacts import read_manifest, verify_artifact
from align.benchmarks import (
    FILES, QA_PRIMER, ChoiceItem, choice_logprobs, load_bigbench, load_hhh, load_mt_bench, load_truthfulqa_csv,
    mc_scores,
)
from align.errors import UserError
from align.scoring import Scorer
from stages.benchmarks import PINNED
from tests.benchmark_files import HHH, MT_BENCH, TRUTHFULQA, hub_cache, write_published
from tests.conftest import ROOT

SHARED = ROOT.parent / "shared" / "benchmarks"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/benchmarks is not beside the project")


def project(cwd: Path, **sources: str) -> Path:
    """A project folder with the repository's params.yaml (benchmark sources from `sources`) and nothing else: the
    stage needs no model. Its parent has no shared/ folder, as on a user's machine."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["benchmarks"].update(sources)
    cwd.mkdir(parents=True)
    (cwd / "params.yaml").write_text(yaml.safe_dump(raw))
    return cwd


def run(cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.benchmarks"], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **env}, timeout=300)


def assert_small_items(out: Path) -> None:
    """The out holds the small benchmarks item for item, in the formats the loaders read."""
    hhh = load_hhh(out / FILES["hhh"])
    assert sorted({i.subset for i in hhh}) == sorted(HHH) and len(hhh) == sum(len(v) for v in HHH.values())
    assert all(i.choices[min(i.correct)] == good for i, (_, good, _) in zip(hhh, HHH["harmless"] + HHH["helpful"]))
    assert hhh[0].context == f"\nHuman: {HHH['harmless'][0][0]}\nAssistant:"
    mc = load_bigbench(out / FILES["truthfulqa_mc"], "truthfulqa")
    assert [(i.context, i.choices[i.best]) for i in mc] == [  # after the QA primer, as the harness asks
        (f"{QA_PRIMER}\n\nQ: {q}\nA: ", best) for _, q, best, _, _ in TRUTHFULQA]
    rows = load_truthfulqa_csv(out / FILES["truthfulqa_csv"])
    assert [(r.subset, r.choices[r.best], len(r.correct), len(r.choices)) for r in rows] == [
        (c, f"{best}.", 1 + len(correct), 1 + len(correct) + len(wrong)) for c, _, best, correct, wrong in TRUTHFULQA]
    assert [(q["question_id"], q["turns"]) for q in load_mt_bench(out / FILES["mt_bench"])] == [
        (i, t) for i, _, t in MT_BENCH]


def test_local_copies_become_a_versioned_out_that_lineage_walks_back(tmp_path: Path) -> None:
    copies = write_published(tmp_path / "copies")
    cwd = project(tmp_path / "project", hhh=str(copies / "hhh_alignment"),
                  truthfulqa_mc=str(copies / "truthfulqa/task_mc.json"),
                  truthfulqa_csv=str(copies / "truthfulqa/TruthfulQA_part1.csv"),
                  mt_bench=str(copies / "mt_bench/question.jsonl"))
    proc = run(cwd)
    assert proc.returncode == 0, proc.stderr
    out = cwd / "data/benchmarks"
    assert proc.stdout.strip() == f"benchmarks: data/benchmarks {verify_artifact(out)}"
    assert_small_items(out)
    assert json.loads((cwd / "data/benchmarks/metrics.json").read_text())["truthfulqa_csv"]["items"] == len(TRUTHFULQA)
    inputs = read_manifest(out)["inputs"]
    assert inputs["hhh"]["path"] == str(copies / "hhh_alignment") and len(inputs) == 4
    lineage = subprocess.run([sys.executable, "-m", "align.lineage", "data/benchmarks"], cwd=cwd, text=True,
                             capture_output=True, env={"PYTHONPATH": str(ROOT)})
    assert lineage.returncode == 0 and str(copies / "mt_bench/question.jsonl") in lineage.stdout
    (copies / "mt_bench/question.jsonl").write_text('{"question_id": 1, "turns": ["Edited?"]}\n')
    lineage = subprocess.run([sys.executable, "-m", "align.lineage", "data/benchmarks"], cwd=cwd, text=True,
                             capture_output=True, env={"PYTHONPATH": str(ROOT)})
    assert lineage.returncode == 1 and "question.jsonl: changed since it was used" in lineage.stderr


def test_auto_without_a_local_copy_reads_the_pinned_hub_datasets(tmp_path: Path) -> None:
    """The real hub path (huggingface_hub's snapshot_download, then `datasets`), offline on a cache that holds the
    pinned commits, as a login node that downloaded them before would have it."""
    cache = tmp_path / "hf"
    hub_cache(cache, PINNED)
    cwd = project(tmp_path / "project")
    proc = run(cwd, HF_HUB_CACHE=str(cache))
    assert proc.returncode == 0, proc.stderr
    assert_small_items(cwd / "data/benchmarks")
    hhh_input = read_manifest(cwd / "data/benchmarks")["inputs"]["hhh"]["path"]
    assert hhh_input.startswith(str(cache)) and hhh_input.endswith(PINNED["hhh"].split("@")[1])


def test_no_source_stops_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    cwd = project(tmp_path / "project")
    proc = run(cwd, HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("params.yaml: benchmarks.hhh: auto: no ../shared/benchmarks/hhh_alignment and "
                                  f"{PINNED['hhh']} could not be downloaded (")
    assert "set it to a local copy of a BIG-bench hhh_alignment folder" in proc.stderr
    assert sorted(p.name for p in cwd.iterdir()) == ["params.yaml"]
    copies = write_published(tmp_path / "copies")
    missing = tmp_path / "nowhere.jsonl"
    cwd = project(tmp_path / "p2", hhh=str(copies / "hhh_alignment"), mt_bench=str(missing),
                  truthfulqa_mc=str(copies / "truthfulqa/task_mc.json"),
                  truthfulqa_csv=str(copies / "truthfulqa/TruthfulQA_part1.csv"))
    proc = run(cwd)
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [
        f"params.yaml: benchmarks.mt_bench: {missing} not found; set it to a local copy of MT-Bench's "
        f"question.jsonl, or to hub:<dataset id>@<commit>"])
    assert sorted(p.name for p in cwd.iterdir()) == ["params.yaml"]


@needs_shared
def test_loaders_read_every_item() -> None:
    hhh = load_hhh(SHARED / "hhh_alignment")
    assert {i.subset for i in hhh} == {"harmless", "helpful"} and len(hhh) == 58 + 59
    assert all(len(i.choices) == 2 and len(i.correct) == 1 for i in hhh)
    assert hhh[0].context.startswith("\nHuman: ") and hhh[0].context.endswith("\nAssistant:")
    mc = load_bigbench(SHARED / "truthfulqa" / "task_mc.json", "truthfulqa")
    assert len(mc) == 299 and mc[0].context.startswith("Q: What is human life expectancy")
    rows = load_truthfulqa_csv(SHARED / "truthfulqa" / "TruthfulQA_part1.csv")
    assert len(rows) == 400
    assert rows[0].choices[rows[0].best] == "The watermelon seeds pass through your digestive system."
    assert all(r.best in r.correct and len(r.correct) < len(r.choices) for r in rows)
    assert all(c.endswith(".") and not c.endswith("..") for r in rows for c in r.choices)
    # both TruthfulQA sources are asked after the paper's QA primer: BIG-bench's task prefix is the same text
    assert mc[0].context.startswith(QA_PRIMER + "\n\nQ: ") and rows[0].context.startswith(QA_PRIMER + "\n\nQ: ")


def test_truthfulqa_csv_answers_are_closed_with_a_period(tmp_path: Path) -> None:
    """As the TruthfulQA paper's code closes every reference answer before scoring it (and lm-evaluation-harness's
    multiple_choice data has them): "." appended where an answer does not end in one, never doubled; the best
    answer matched among the correct ones after closing, so "Blue" and "Blue." are one choice."""
    csv_path = tmp_path / "truthfulqa.csv"
    csv_path.write_text("Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
                        "Adversarial,Science,What colour is the sky?,Blue,Blue.; It looks blue,Green; Red.,x\n")
    [item] = load_truthfulqa_csv(csv_path)
    assert item.choices == ("Blue.", "It looks blue.", "Green.", "Red.")
    assert (item.best, item.correct) == (0, frozenset({0, 1}))


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


def test_a_choice_follows_the_context_after_exactly_one_space(tiny_model: Path) -> None:
    """BIG-bench's TruthfulQA output prefix ends in a space ("\nA: "): the choice is scored as " Blue" after "A:",
    the way text is tokenized, never after a double space."""
    scorer = Scorer(tiny_model)
    item = ChoiceItem("\nQ: What colour is the sky?\nA: ", ("Blue", "Green"), frozenset({0}), 0, "t")
    once = scorer.continuation_logprobs("\nQ: What colour is the sky?\nA:", [" Blue", " Green"])
    assert choice_logprobs(scorer, item, normalise=False) == once
    assert once != scorer.continuation_logprobs(item.context, [" Blue", " Green"])  # the double space differs


def test_mc1_and_mc2_by_hand() -> None:
    """Two true answers (the best first) and two false ones: MC1 compares the best with the false ones only, MC2
    is the probability mass on the true ones, normalised over all four."""
    item = ChoiceItem("Q: ?\nA:", ("best", "also true", "false", "very false"), frozenset({0, 1}), 0, "t")
    scores = mc_scores([-1.0, -2.0, -0.5, -3.0], item)
    e = 2.718281828459045
    assert scores["mc1"] == 0.0  # a false answer (-0.5) beats the best one (-1.0)
    assert scores["mc2"] == pytest.approx((e**-1 + e**-2) / (e**-1 + e**-2 + e**-0.5 + e**-3))  # 0.4136...
    assert mc_scores([-1.0, -0.2, -1.5, -3.0], item) == pytest.approx(
        {"mc1": 1.0, "mc2": (e**-1 + e**-0.2) / (e**-1 + e**-0.2 + e**-1.5 + e**-3)})
    assert mc_scores([-1.0, -5.0, -1.0, -3.0], item)["mc1"] == 1.0  # a tie goes to the best: lm-eval's argmax
