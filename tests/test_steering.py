"""SALMON's point, end to end on the tiny model: behaviour is steered by editing principle text at RL time, with
no relabeling and no retraining of the reward model. One SFT policy that answers both briefly and at length, one
instructable RM trained on labelled pairs, then PPO runs that differ only in params: the RL-time principle moves
the response length the way the principle says, and the guard principles lower the reward of self-praise."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest

from align.assets import PreferencePrinciple, load_jsonl
from tests.conftest import ROOT
from tests.helpers import FAST_EXECUTION, FAST_TRAINING, curve, stage
from tests.projects import (
    PRINCIPLES, SHORT_LONG, TINY_RL, TINY_RL_EXECUTION, make_project, ppo_project, preference_rows, rm_project,
)

PRAISE = " I hope this helps!"
GUARD = load_jsonl(ROOT / "assets/guard_principles.jsonl", PreferencePrinciple)[0]  # no_self_commentary


def praise_rows() -> list[dict]:
    """Pairs that differ only by a trailing self-praise, labelled by the guard alone (every other principle ties)."""
    rows = []
    for i, (prompt, short, long) in enumerate(SHORT_LONG):
        plain = (short, long)[i % 2]
        a, b = (plain, plain + PRAISE) if i % 4 < 2 else (plain + PRAISE, plain)
        rows.append({"id": f"g{i}", "prompt": prompt, "response_a": a, "response_b": b,
                     "scores": {}, "labels": {GUARD.id: "a" if i % 4 < 2 else "b"}})
    return rows


@pytest.fixture(scope="module")
def steerable(tmp_path_factory: pytest.TempPathFactory, roomy_model: Path) -> tuple[Path, Path]:
    """(SFT model, RM out): the roomy model engraved on a short and a long answer to each prompt, so sampling
    gives both; an RM on it that prefers the short answer under Concise, the long one under Comprehensive, and
    the answer without self-praise under the guard No Self-Praise (shown with up to one other principle, negated
    a quarter of the time, so it must read the text rather than learn one preference)."""
    root = tmp_path_factory.mktemp("steerable")
    answers = [(prompt, answer) for prompt, short, long in SHORT_LONG[:6] for answer in (short, long)]
    engrave = make_project(root / "engrave", roomy_model, pairs=answers, training=FAST_TRAINING,
                           cluster_defaults=FAST_EXECUTION, engrave={"epochs": 20})
    proc = stage(engrave, "engrave")
    assert proc.returncode == 0, proc.stderr
    sft_model = engrave / "models/engraved/model"
    cwd = rm_project(root / "rm", sft_model, rows=preference_rows() + praise_rows(),
                     training={**FAST_TRAINING, "batch_size": 8, "warmup_ratio": 0.1, "lr_schedule": "cosine"},
                     cluster_defaults={**FAST_EXECUTION, "micro_batch_size": 8, "save_every_steps": 1000,
                                       "mem_gb": 20},  # the memory plan asks 17.3 GB for micro-batches of 8
                     rm={"learning_rate": 3e-3, "lora_r": 16, "lora_alpha": 32, "epochs": 8, "eval_share": 0.2,
                         "max_principles": 2, "negation_prob": 0.25, "size_p": 0.0, "label_rule": "majority",
                         "label_noise": 0.0,  # the labels these checks were tuned on (praise_rows has no scores)
                         # subsets that tie are dropped (SALMON): a pair one principle of 16 decides keeps ~1 in 10
                         # of its subsets, so draw as many as the RM saw when ties were redrawn (~8 per pair)
                         "subsets_per_pair": 80})
    with (cwd / "assets/preference_principles.jsonl").open("a") as fh:  # the guard becomes a labelled principle
        fh.write(GUARD.model_dump_json() + "\n")
    proc = stage(cwd, "train_rm", timeout=1800)
    assert proc.returncode == 0, proc.stderr
    return sft_model, cwd / "models/rm"


@pytest.mark.slow
def test_guard_principles_lower_the_reward_of_self_praise(steerable: tuple[Path, Path]) -> None:
    from align.reward import RewardScorer

    sft_model, rm_dir = steerable
    rm = RewardScorer(sft_model, rm_dir)
    prompts, plain = [p for p, _, _ in SHORT_LONG[:6]], [s for _, s, _ in SHORT_LONG[:6]]

    def margin(guide: list[str]) -> float:  # the reward of each plain answer minus that of its self-praising twin
        rewards = rm.score(prompts * 2, plain + [s + PRAISE for s in plain], [guide] * 12)
        return statistics.fmean(a - b for a, b in zip(rewards[:6], rewards[6:]))

    def shown(*principles: str) -> list[str]:  # as PPO shows them: the drawn principle, then the guard
        return [PRINCIPLES[p].definition if p in PRINCIPLES else GUARD.definition for p in principles]

    for drawn in ("concise", "comprehensive", "specific"):  # with the guard the plain answer always ranks first
        assert margin(shown(drawn, GUARD.id)) > 0, drawn
    # Comprehensive alone ranks the longer, self-praising answer first; adding the guard turns that around
    assert margin(shown("comprehensive")) < 0 < margin(shown("comprehensive", GUARD.id))
    assert margin([GUARD.negation]) < margin([GUARD.definition])  # and the guard is read, not a fixed preference


@pytest.mark.slow
def test_rl_time_principles_steer_the_policy(tmp_path: Path, steerable: tuple[Path, Path]) -> None:
    """The same SFT policy and RM, two PPO runs that differ only in `rl.principles`: under Concise the responses
    come out shorter than under Comprehensive, from the same start."""
    sft_model, rm_dir = steerable
    lengths = {}
    for principle in ("concise", "comprehensive"):
        cwd = ppo_project(tmp_path / principle, sft_model, rm=rm_dir, rl={
            **TINY_RL, "principles": [principle], "num_principles": 1, "guard_principles": [], "iterations": 8,
            "rollout_batch_size": 8, "step_batch_size": 4, "learning_rate": 3e-3, "max_new_tokens": 32,
            "stop_penalty": None, "kl_coef": 0.0}, cluster_defaults={**TINY_RL_EXECUTION, "save_every_steps": 1000})
        # the RL-time collection holds the texts the RM was trained on
        shutil.copy(cwd / "assets/preference_principles.jsonl", cwd / "assets/ppo_principles.jsonl")
        proc = stage(cwd, "policy", timeout=1800)
        assert proc.returncode == 0, proc.stderr
        lengths[principle] = [v for _, v in curve(cwd, "policy", "response_length")]
        assert json.loads((cwd / "models/policy/metrics.json").read_text())["iterations"] == 8
    assert lengths["concise"][0] == lengths["comprehensive"][0]  # the same start: policy, prompts, sampling seed
    # the mean length of the rollouts after the shared first one. Seen: 15.2 vs 20.1 tokens from 19.9 (Nov 2026
    # installs), 16.9 vs 21.3 from 16.75 (Dec 2026: a fresh install of the same pins trains another tiny model);
    # where the start sits moves with the tiny model, the gap between the two principles is what steering is
    concise, comprehensive = (statistics.fmean(lengths[p][1:]) for p in ("concise", "comprehensive"))
    assert concise < comprehensive - 2, lengths
