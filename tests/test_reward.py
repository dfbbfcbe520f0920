"""The instructable reward model: labels under a principle subset (negation flips them, ties are dropped), the
held-out split, and the `train_rm` stage on the tiny model — the Bradley-Terry loss falls, the out's RM is the
one `RewardScorer.score` loads, the metrics hold held-out / negation / HHH results, and bad input is one line."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest

from align.artifacts import verify_artifact
from align.records import read_jsonl, write_jsonl
from align.reward import (
    RewardScorer, collate_pairs, pair_rewards, shared_length, split_pairs, subset_label, training_examples,
)
from stages.train_rm import pmp_pairs, split_transcript
from tests.helpers import curve, stage
from tests.projects import PRINCIPLES, SHORT_LONG, preference_rows, rm_project


def test_subset_label_majority_with_negation_flipping() -> None:
    labels = {"concise": "a", "specific": "b", "ethical": "tie"}
    assert subset_label(labels, [("concise", False)]) == "a"
    assert subset_label(labels, [("concise", True)]) == "b"  # negated: the vote flips
    assert subset_label(labels, [("concise", False), ("specific", False)]) == "tie"
    assert subset_label(labels, [("concise", False), ("specific", True)]) == "a"
    assert subset_label(labels, [("ethical", False), ("ethical", True)]) == "tie"
    assert subset_label(labels, [("concise", True), ("specific", False), ("ethical", False)]) == "b"


def test_training_examples_follow_the_shown_principles_and_drop_ties() -> None:
    rows = preference_rows() + [{"id": "undecided", "prompt": "p", "response_a": "x", "response_b": "y",
                                 "scores": {}, "labels": {pid: "tie" for pid in PRINCIPLES}}]
    examples = training_examples(rows, PRINCIPLES, per_pair=8, max_principles=8, negation_prob=0.5, seed=3)
    assert len(examples) == 8 * len(SHORT_LONG) and "undecided" not in {e["id"] for e in examples}
    by_id = {r["id"]: r for r in rows}
    negated_decisions = 0
    for e in examples:
        row = by_id[e["id"]]
        winner = subset_label(row["labels"], e["shown"])
        assert winner != "tie"
        assert (e["chosen"], e["rejected"]) == ((row["response_a"], row["response_b"]) if winner == "a"
                                                else (row["response_b"], row["response_a"]))
        assert e["guide"] == [PRINCIPLES[p].negation if neg else PRINCIPLES[p].definition for p, neg in e["shown"]]
        assert 1 <= len(e["shown"]) <= 8
        deciding = [(p, neg) for p, neg in e["shown"] if p in ("concise", "comprehensive")]
        if all(neg for _, neg in deciding):
            negated_decisions += 1  # decided by negated principles only: the label opposite to theirs
            short = min(row["response_a"], row["response_b"], key=len)
            assert e["chosen"] == (short if deciding[0][0] == "comprehensive" else max(
                row["response_a"], row["response_b"], key=len))
    assert negated_decisions > 0
    again = training_examples(list(reversed(rows)), PRINCIPLES, per_pair=8, max_principles=8, negation_prob=0.5, seed=3)
    assert sorted(map(json.dumps, again)) == sorted(map(json.dumps, examples))  # seeded per pair, order-free


def test_split_holds_out_decided_pairs_only() -> None:
    rows = preference_rows() + [{"id": "undecided", "prompt": "p", "response_a": "x", "response_b": "y",
                                 "scores": {}, "labels": {"concise": "tie"}}]
    train, held = split_pairs(rows, 0.25, seed=0)
    assert len(held) == 3 and "undecided" in {r["id"] for r in train}
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    assert split_pairs(rows, 0.25, seed=0) == (train, held)
    assert len(split_pairs(rows[:2], 0.01, seed=0)[1]) == 1  # two decided pairs: one is held out


def test_hh_transcripts_split_into_prompt_and_replies() -> None:
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Add 1 and 2.\n\nAssistant: 3"
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Add 1 and 2.\n\nAssistant: No."
    assert split_transcript(chosen, rejected) == (chosen[: chosen.rfind("3")].strip(), "3", "No.")
    assert split_transcript(chosen, "\n\nHuman: Other\n\nAssistant: x") is None
    assert pmp_pairs([{"chosen": chosen, "rejected": rejected}, {"prompt": "p", "chosen": "c", "rejected": "c"},
                      {"prompt": [{"role": "user", "content": "p"}], "chosen": [{"content": "c"}],
                       "rejected": [{"content": "r"}]}]) == [split_transcript(chosen, rejected), ("p", "c", "r")]


@pytest.mark.slow
def test_the_shared_prefix_runs_once_and_gives_the_rewards_and_gradients_of_whole_rows(tiny_model: Path) -> None:
    import torch

    from align.params import Training
    from align.training import lora_model

    model = lora_model(tiny_model, Training(lora_r=4, lora_alpha=8, lora_dropout=0.0), seed=0, head="reward")
    pad = model.config.pad_token_id
    pairs = [{"chosen": [5, 6, 7, 8, 9], "rejected": [5, 6, 7, 20]},  # shares 3 tokens
             {"chosen": [30, 31], "rejected": [30, 31, 32, 33]},  # one side is the other's start: 1 token each left
             {"chosen": [40, 41, 42], "rejected": [50, 41]}]  # nothing shared
    assert [shared_length(p["chosen"], p["rejected"]) for p in pairs] == [3, 1, 0]
    batch = collate_pairs(pairs, pad)
    assert batch["prefix_ids"].shape == (3, 3) and batch["input_ids"].shape == (6, 3)
    shared = pair_rewards(model, batch)
    shared[0::2].sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    whole = torch.stack([model(input_ids=torch.tensor([side])).logits[0, 0]
                         for p in pairs for side in (p["chosen"], p["rejected"])])  # each row alone, unpadded
    whole[0::2].sum().backward()
    assert torch.allclose(shared, whole, atol=1e-4)
    assert all(torch.allclose(a, p.grad, atol=1e-4) for a, p in
               zip(grads, [p for p in model.parameters() if p.requires_grad]))


def test_train_rm_loss_falls_and_score_reuses_the_trained_model(tmp_path: Path, roomy_model: Path) -> None:
    hh = tmp_path / "hh.jsonl"
    write_jsonl(hh, [{"chosen": f"\n\nHuman: {p}\n\nAssistant: {s}", "rejected": f"\n\nHuman: {p}\n\nAssistant: {lg}"}
                     for p, s, lg in SHORT_LONG[:6]])
    cwd = rm_project(tmp_path / "project", roomy_model, rm={
        "learning_rate": 3e-3, "lora_r": 8, "lora_alpha": 16, "epochs": 2, "eval_share": 0.34,
        "pmp": {"dataset": str(hh), "split": "train", "max_examples": 6}})
    proc = stage(cwd, "train_rm")
    assert proc.returncode == 0, proc.stderr
    verify_artifact(cwd / "models/rm")
    metrics = json.loads((cwd / "metrics/train_rm.json").read_text())
    assert metrics["train"]["pmp_examples"] == 6 and metrics["train"]["examples"] == 8 * 8
    assert metrics["held_out"]["examples"] == 4 * 8 and 0 <= metrics["held_out"]["accuracy"] <= 1
    assert metrics["negation"]["cases"] == 4 * 2 and 0 <= metrics["negation"]["flip_rate"] <= 1
    assert metrics["hhh"]["items"] == metrics["hhh"]["harmless"]["items"] + metrics["hhh"]["helpful"]["items"] == 6

    losses = [loss for _, loss in curve(cwd, "train_rm", "loss")]
    assert len(losses) == metrics["train"]["steps"] == 2 + 32  # pre-training: 6 pairs / 4; then 64 x 2 epochs / 4
    assert statistics.fmean(losses[-8:]) < statistics.fmean(losses[2:10])  # Bradley-Terry loss falls
    assert len(curve(cwd, "train_rm", "accuracy")) == len(losses)

    # the out is a reward model `score` loads: it reproduces the job's own held-out judgements
    rm = RewardScorer(cwd / "models/sft/model", cwd / "models/rm")
    held = [r for r in read_jsonl(cwd / "models/rm/eval.jsonl") if r["kind"] == "held_out"][:4]
    rows = {r["id"]: r for r in preference_rows()}
    guides = [[PRINCIPLES[p].negation if neg else PRINCIPLES[p].definition for p, neg in r["shown"]] for r in held]
    winners = [subset_label(rows[r["id"]]["labels"], r["shown"]) for r in held]
    chosen = [rows[r["id"]]["response_" + w] for r, w in zip(held, winners)]
    scores = rm.score([rows[r["id"]]["prompt"] for r in held], chosen, guides)
    assert scores == pytest.approx([r["chosen"] for r in held], abs=1e-4)
    # guides are per row: the same response under a different guide gets a different reward
    assert len(set(rm.score([rows[held[0]["id"]]["prompt"]] * 2, [chosen[0]] * 2,
                            [guides[0], "Answer like a pirate."]))) == 2


def test_train_rm_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, tiny_model: Path) -> None:
    old = [{k: v for k, v in r.items() if k != "scores"} | {"scores": {p: 0.5 for p in PRINCIPLES}}
           for r in preference_rows()]  # an older format: one score per principle
    cwd = rm_project(tmp_path / "old", tiny_model, rows=old)
    proc = stage(cwd, "train_rm")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "data/preferences/preferences.jsonl: line 1: scores." in proc.stderr and "older format" in proc.stderr
    assert not (cwd / "models/rm").exists()

    cwd = rm_project(tmp_path / "ties", tiny_model, rows=[{**r, "labels": {p: "tie" for p in PRINCIPLES}}
                                                         for r in preference_rows()])
    proc = stage(cwd, "train_rm")
    assert proc.returncode == 2 and "every label is a tie" in proc.stderr and not (cwd / "models/rm").exists()

    cwd = rm_project(tmp_path / "negation", tiny_model)
    lines = (cwd / "assets/preference_principles.jsonl").read_text().splitlines()
    broken = json.loads(lines[2])
    del broken["negation"]
    (cwd / "assets/preference_principles.jsonl").write_text("\n".join([*lines[:2], json.dumps(broken), *lines[3:]]))
    proc = stage(cwd, "train_rm")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "assets/preference_principles.jsonl: line 3: negation: field required" in proc.stderr

    cwd = rm_project(tmp_path / "hhh", tiny_model)
    shutil.rmtree(cwd / "data/benchmarks")  # stage `benchmarks` has not run
    proc = stage(cwd, "train_rm")
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [
        "data/benchmarks: input not found (run `dvc repro`: the stage that writes it has not run)"])


def test_pmp_from_an_unreachable_hub_is_skipped_with_one_line(capsys: pytest.CaptureFixture) -> None:
    from align.params import Pmp
    from stages.train_rm import load_pmp

    assert load_pmp(Pmp(dataset="no-such-org/no-such-preferences")) == []  # HF_HUB_OFFLINE=1 in tests
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_rm: rm.pmp: skipped, 'no-such-org/no-such-preferences'")
