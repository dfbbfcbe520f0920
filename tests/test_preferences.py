"""SALMON's first two stages on the tiny model: `sample_pairs` samples two different responses per prompt not
used for SFT; `label_preferences` scores every pair under every principle in both orders, labels only where the
orders agree, and refuses bad input with one line before any job."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from align.artifacts import read_manifest, staged_out, verify_artifact
from align.assets import PreferencePrinciple, load_jsonl, load_template
from align.judge import label, principle_text
from align.records import read_jsonl, write_jsonl
from align.scoring import Scorer
from tests.helpers import stage
from tests.projects import SAMPLED_PAIRS, salmon_project

PRINCIPLE_IDS = ["concise", "honest_accurate", "specific"]


def test_label_rule() -> None:
    assert [label(1.0, -0.5), label(-1.0, 0.2), label(0.3, 0.4), label(-0.3, -0.4), label(0.0, -1.0)] == \
        ["a", "b", "tie", "tie", "tie"]


def test_sample_pairs_leaves_out_sft_prompts_and_samples_two_responses(tmp_path: Path, tiny_model: Path) -> None:
    cwd = salmon_project(tmp_path, tiny_model, sample_pairs={"max_new_tokens": 8, "max_prompts": 3})
    shutil.rmtree(cwd / "data/pairs")
    proc = stage(cwd, "sample_pairs")
    assert proc.returncode == 0, proc.stderr
    pairs = read_jsonl(cwd / "data/pairs/pairs.jsonl")
    assert len(pairs) == 3 and not {p["id"] for p in pairs} & {"p0", "p1"}  # the SFT prompts are left out
    assert all(p["response_a"] and p["response_b"] and p["response_a"] != p["response_b"] for p in pairs)
    metrics = json.loads((cwd / "data/pairs/metrics.json").read_text())
    assert metrics["prompts"] == 3 and metrics["pairs"] == 3
    assert set(read_manifest(cwd / "data/pairs")["inputs"]) == {"policy", "prompts", "sft_data", "system_messages"}


def test_label_preferences_scores_both_orders_and_labels_only_agreement(tmp_path: Path, tiny_model: Path) -> None:
    cwd = salmon_project(tmp_path, tiny_model, label_preferences={"principles": PRINCIPLE_IDS},
                         cluster={"label_preferences": {"score_batch_size": 2}})
    proc = stage(cwd, "label_preferences")
    assert proc.returncode == 0, proc.stderr
    verify_artifact(cwd / "data/preferences")
    rows = read_jsonl(cwd / "data/preferences/preferences.jsonl")
    assert [r["id"] for r in rows] == ["p1", "p2"]
    for row in rows:
        assert set(row["scores"]) == set(PRINCIPLE_IDS) and all(len(s) == 2 for s in row["scores"].values())
        assert row["labels"] == {pid: label(*s) for pid, s in row["scores"].items()}

    # one score recomputed by a plain forward pass over the full judge prompt, swapped order
    scorer = Scorer(tiny_model)
    template = load_template(cwd / "assets/judge_prompt.txt", ("instruction", "output_a", "output_b", "principle"))
    principle = {p.id: p for p in load_jsonl(cwd / "assets/preference_principles.jsonl", PreferencePrinciple)}["specific"]
    text = template.format(instruction=SAMPLED_PAIRS[1]["prompt"], output_a=SAMPLED_PAIRS[1]["response_b"],
                           output_b=SAMPLED_PAIRS[1]["response_a"], principle=principle_text(principle))
    with torch.inference_mode():
        logits = scorer.model(input_ids=torch.tensor([scorer.tokenizer(text)["input_ids"]])).logits[0, -1]
    a, b = scorer.token_id("a"), scorer.token_id("b")
    assert rows[1]["scores"]["specific"][1] == pytest.approx((logits[a] - logits[b]).item(), abs=1e-4)

    metrics = json.loads((cwd / "data/preferences/metrics.json").read_text())
    labels = [lab for r in rows for lab in r["labels"].values()]
    assert metrics["tie_rate"] == pytest.approx(labels.count("tie") / 6)
    assert metrics["position_bias"] == pytest.approx(sum(s for r in rows for v in r["scores"].values() for s in v) / 12)
    assert set(metrics["agreement"]) == set(PRINCIPLE_IDS)


@pytest.mark.parametrize("edit, expected", [
    ({"label_preferences": {"choices": ["a", "capital"]}},
     "params.yaml: label_preferences.choices (tokenizer of models/sft/model): 'capital' is {n} tokens; "
     "expected exactly one"),
    ({"label_preferences": {"principles": ["concise", "brief"]}},
     "params.yaml: label_preferences.principles: 'brief' is not an id in assets/preference_principles.jsonl; "
     "expected some of concise, "),
    ("empty_response", "data/pairs/pairs.jsonl: a pair has an empty response; expected two non-empty responses"),
])
def test_bad_input_is_one_line_before_any_job(tmp_path: Path, tiny_model: Path, edit, expected: str) -> None:  # noqa: ANN001
    cwd = salmon_project(tmp_path, tiny_model)
    if edit == "empty_response":
        with staged_out(cwd / "data/pairs", stage="sample_pairs", params={}, inputs={}) as tmp:
            write_jsonl(tmp / "pairs.jsonl", [SAMPLED_PAIRS[0], {**SAMPLED_PAIRS[1], "response_b": "  "}])
    else:
        raw = yaml.safe_load((cwd / "params.yaml").read_text())
        for group, values in edit.items():
            raw[group].update(values)
        (cwd / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = stage(cwd, "label_preferences")
    assert proc.returncode == 2, proc.stderr
    head, _, tail = expected.partition("{n}")
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith(head.split("{n}")[0]) and tail.split(", ")[0] in line
    assert not (cwd / "data/preferences").exists() and not (cwd / "logs").exists()
