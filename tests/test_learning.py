"""The reward model and PPO shown to learn with a known right answer (issue 22, part 6). On constructed pairs of a
short and a long answer made of random words, Concise prefers the short one, Comprehensive the long one, and a
negated principle the other. Stage `train_rm` holds out a quarter of the pairs (texts it never trained on) and
scores them with the scorer PPO uses; it must rank them by the principle it is shown and flip with negation.
PPO under Concise, from an SFT policy that answers both briefly and at length, must then raise that RM's reward
with its KL to the SFT policy bounded. (Engraving's held-out loss is checked in tests/test_sft_stages.py, DPO's
held-out margin in tests/test_ppo.py: those tests already pay for the trained model.)"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from tests.helpers import FAST_EXECUTION, FAST_TRAINING, curve, engine, stage
from tests.projects import PRINCIPLES, SHORT_LONG, TINY_RL, TINY_RL_EXECUTION, make_project, ppo_project, rm_project
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
def two_length_policy(tmp_path_factory: pytest.TempPathFactory, roomy_model: Path) -> Path:
    """The roomy model engraved on a short and a long answer to each of six prompts: it samples both."""
    answers = [(prompt, answer) for prompt, short, long in SHORT_LONG[:6] for answer in (short, long)]
    cwd = make_project(tmp_path_factory.mktemp("learning") / "engrave", roomy_model, pairs=answers,
                       training=FAST_TRAINING, cluster_defaults=FAST_EXECUTION, engrave={"epochs": 20})
    proc = stage(cwd, "engrave")
    assert proc.returncode == 0, proc.stderr
    return cwd / "models/engraved/model"


@pytest.fixture(scope="module")
def length_rm(tmp_path_factory: pytest.TempPathFactory, two_length_policy: Path) -> Path:
    """The train_rm project after the stage ran on the SFT policy: 48 pairs (12 held out), the two principles only,
    one shown per instance and negated half the time (SALMON's rate), no label noise."""
    cwd = rm_project(tmp_path_factory.mktemp("learning") / "rm", two_length_policy, rows=length_rows(48),
                     training={**FAST_TRAINING, "batch_size": 8, "warmup_ratio": 0.1, "lr_schedule": "cosine"},
                     cluster_defaults={**FAST_EXECUTION, "micro_batch_size": 8, "save_every_steps": 1000},
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


def sampled_reward(model: Path, sft: Path, rm: Path, samples: int = 16) -> float:
    """The RM's mean reward under Concise of `samples` answers of `model` to each of the six prompts, sampled as PPO
    samples (temperature 0.7, 32 new tokens, the chat template): 96 answers, so the mean moves little by chance."""
    from align.generation import Generator, Sampling, chat_prompt
    from align.reward import RewardScorer

    prompts = [prompt for prompt, _, _ in SHORT_LONG[:6]]
    with Generator(model, engine(backend="hf")) as generator:
        texts = [chat_prompt(generator.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
        outs = generator.generate(texts, Sampling(temperature=0.7, max_new_tokens=32, seed=1, n=samples))
    rm_scorer = RewardScorer(sft, rm)
    rewards = rm_scorer.score([p for p in prompts for _ in range(samples)], [o.text for o in outs],
                              [[PRINCIPLES["concise"].definition]] * len(outs))
    return statistics.fmean(rewards)


@pytest.mark.slow
def test_ppo_raises_the_reward_with_its_kl_bounded(tmp_path: Path, two_length_policy: Path, length_rm: Path) -> None:
    """PPO under Concise against the length RM, from an SFT policy that answers both briefly and at length: the
    trained policy's answers earn more reward than the SFT policy's (96 sampled answers each), its responses get
    shorter, and the KL per response to the SFT policy stays bounded (kl_coef 0.05; answering briefly only instead
    of both ways is worth about log 2 = 0.7 nats; 8 rollouts of garbled tiny-model text add noise: bound 5).
    Seen (Dec 2026): reward 4.74 (SFT) -> 5.85, length 16.8 -> 2.8 tokens in the last iteration, KL at most 3.7;
    with the sign of the policy loss flipped on purpose: reward 4.74 -> 4.53, length up to 31, KL up to 40."""
    rm = length_rm / "models/rm"
    cwd = ppo_project(tmp_path, two_length_policy, rm=rm, rl={
        **TINY_RL, "principles": ["concise"], "num_principles": 1, "guard_principles": [], "iterations": 8,
        "rollout_batch_size": 8, "step_batch_size": 4, "learning_rate": 3e-3, "max_new_tokens": 32,
        "stop_penalty": None, "kl_coef": 0.05}, cluster_defaults={**TINY_RL_EXECUTION, "save_every_steps": 1000})
    (cwd / "assets/ppo_principles.jsonl").write_text(PRINCIPLES["concise"].model_dump_json() + "\n")
    proc = stage(cwd, "policy", timeout=1800)
    assert proc.returncode == 0, proc.stderr
    before, after = (sampled_reward(m, two_length_policy, rm) for m in (two_length_policy, cwd / "models/policy/model"))
    lengths = [v for _, v in curve(cwd, "policy", "response_length")]
    kl = [v for _, v in curve(cwd, "policy", "kl")]
    assert after > before + 0.5, (before, after, lengths)
    assert statistics.fmean(lengths[-3:]) < lengths[0], lengths
    assert max(kl) < 5.0, kl


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_critic_free_rl_is_steered_by_the_rl_time_principle(tmp_path: Path, two_length_policy: Path,
                                                             length_rm: Path, algorithm: str) -> None:
    """GRPO and RLOO as PPO in tests/test_steering.py: two runs from the same SFT policy and RM that differ only
    in the RL-time principle; under Concise the responses come out shorter than under Comprehensive. Four samples
    per prompt, 12 iterations: with two per prompt and 8 iterations neither method moved the length (a sequence-level
    advantage is a weaker signal here than PPO's value model, which starts as the RM and scores every token).
    GRPO runs with its paper's aggregation (loss_type grpo: each response's token mean, so a 2-token answer's stop
    token weighs as much as a 20-token answer): under the token-level ones (dapo, its default as TRL's, and bnpo)
    the long answers' many tokens carry the step, their log-probs are pushed down, the entropy rises and the length
    stays (Dec 2026: dapo 20.6 vs 20.8, bnpo 20.7 vs 21.6 tokens).
    Seen (Dec 2026), mean length after the shared first iteration (19.2 tokens): grpo 16.0 vs 23.3, rloo 13.8 vs
    23.4; with the policy loss's sign flipped on purpose, grpo 16.3 vs 10.4 (fails)."""
    lengths = {}
    for principle in ("concise", "comprehensive"):
        cwd = ppo_project(tmp_path / principle, two_length_policy, rm=length_rm / "models/rm", policy={
            "algorithm": algorithm}, rl={
            **TINY_RL, "group_size": 4, "loss_type": "grpo" if algorithm == "grpo" else None, "principles": [principle], "num_principles": 1, "guard_principles": [],
            "iterations": 12, "rollout_batch_size": 8, "step_batch_size": 8, "learning_rate": 3e-3,
            "max_new_tokens": 32, "stop_penalty": None, "kl_coef": 0.05},
            cluster_defaults={**TINY_RL_EXECUTION, "save_every_steps": 1000})
        (cwd / "assets/ppo_principles.jsonl").write_text(PRINCIPLES[principle].model_dump_json() + "\n")
        proc = stage(cwd, "policy", timeout=1800)
        assert proc.returncode == 0, proc.stderr
        lengths[principle] = [v for _, v in curve(cwd, "policy", "response_length")]
    assert lengths["concise"][0] == lengths["comprehensive"][0]  # the same start
    concise, comprehensive = (statistics.fmean(lengths[p][1:]) for p in ("concise", "comprehensive"))
    assert concise < comprehensive - 2, lengths


@pytest.mark.slow
def test_the_policy_loss_does_not_change_with_the_micro_batch(tmp_path: Path, two_length_policy: Path) -> None:
    """The micro-batch is a memory setting (cluster.policy.micro_batch_size): GRPO's optimizer steps of 4 samples
    taken as micro-batches of 1 or of 2 give the same losses and KL. The policy answers both briefly and at length,
    so the samples of a step differ in length: a token mean inside each micro-batch (the earlier loss) would weigh
    a token by its neighbours' lengths, and the two runs would part."""
    curves = {}
    for micro in (1, 2):
        cwd = ppo_project(tmp_path / str(micro), two_length_policy, policy={"algorithm": "grpo"},
                          rl={**TINY_RL, "group_size": 2, "iterations": 2, "step_batch_size": 4, "max_new_tokens": 32,
                              "loss_type": "bnpo"},
                          cluster_defaults={**TINY_RL_EXECUTION, "micro_batch_size": micro})
        proc = stage(cwd, "policy")
        assert proc.returncode == 0, proc.stderr
        curves[micro] = {name: [v for _, v in curve(cwd, "policy", name)]
                         for name in ("policy_loss", "kl", "response_length", "no_stop_share")}
    assert any(0 < share < 1 for share in curves[1]["no_stop_share"])  # stopped and cut-off samples: lengths differ
    assert abs(curves[1]["kl"][-1]) > 1e-6  # the second iteration's policy moved
    for name, values in curves[1].items():
        assert curves[2][name] == pytest.approx(values, rel=2e-3, abs=1e-6), name  # padding: seen 4e-4
