"""The reward model shown to learn a rule with a known right answer (issue 22, part 6): on constructed pairs of a
short and a long answer made of random words, Concise prefers the short one, Comprehensive the long one, and a
negated principle the other. Stage `train_rm` holds out a quarter of the pairs (texts it never trained on) and
scores them with the scorer PPO uses; it must rank them by the principle it is shown and flip with negation.
(Engraving's held-out loss is checked in tests/test_sft_stages.py, DPO's held-out margin in tests/test_ppo.py:
those tests already pay for the trained model.)"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.helpers import FAST_TRAINING, stage
from tests.projects import PRINCIPLES, rm_project
from tests.tiny import CORPUS


def length_rows(count: int, seed: int = 0) -> list[dict]:
    """`count` labelled pairs of a 1-3 word and a 10-16 word answer to a 3-6 word question, words drawn from the
    tiny tokenizer's corpus: Concise prefers the short answer, Comprehensive the long one (both orders agree),
    the short answer `a` in even rows and `b` in odd ones."""
    words = sorted({w for line in CORPUS for w in line.split()})
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))

    rows = []
    for i in range(count):
        prompt, short, long = text(3, 6) + "?", text(1, 3), text(10, 16)
        even = i % 2 == 0
        sign = 1 if even else -1  # > 0 favours a
        rows.append({"id": f"q{i}", "prompt": prompt, "response_a": short if even else long,
                     "response_b": long if even else short,
                     "scores": {"concise": [sign, -sign], "comprehensive": [-sign, sign]},
                     "labels": {"concise": "a" if even else "b", "comprehensive": "b" if even else "a"}})
    return rows


@pytest.fixture(scope="module")
def length_rm(tmp_path_factory: pytest.TempPathFactory, roomy_model: Path) -> Path:
    """The train_rm project after the stage ran: 48 pairs (12 held out), the two principles only, one shown per
    instance and negated half the time (SALMON's rate), no label noise."""
    cwd = rm_project(tmp_path_factory.mktemp("learning") / "rm", roomy_model, rows=length_rows(48),
                     training={**FAST_TRAINING, "micro_batch_size": 8, "warmup_ratio": 0.1, "lr_schedule": "cosine",
                               "save_every": 1000},
                     rm={"learning_rate": 3e-3, "lora_r": 16, "lora_alpha": 32, "epochs": 4, "eval_share": 0.25,
                         "max_principles": 1, "negation_prob": 0.5, "label_noise": 0.0, "subsets_per_pair": 4,
                         "hhh_principles": ["concise"]})
    (cwd / "assets/preference_principles.jsonl").write_text(
        "".join(PRINCIPLES[p].model_dump_json() + "\n" for p in ("concise", "comprehensive")))
    proc = stage(cwd, "train_rm", timeout=1800)
    assert proc.returncode == 0, proc.stderr
    return cwd


@pytest.mark.slow
def test_the_reward_model_learns_a_principle_conditioned_rule(length_rm: Path) -> None:
    """Seen (Dec 2026): held-out accuracy 1.0 and flip rate 1.0 (3 epochs: 1.0 and 0.96); with the sign of
    `bt_loss` flipped on purpose, held-out accuracy 0.23."""
    metrics = json.loads((length_rm / "models/rm/metrics.json").read_text())
    assert metrics["held_out"]["examples"] == 12 * 4 and metrics["negation"]["cases"] == 12 * 2
    assert metrics["held_out"]["accuracy"] >= 0.9, metrics
    assert metrics["negation"]["flip_rate"] >= 0.9 and metrics["negation"]["label_agreement"] >= 0.9, metrics
