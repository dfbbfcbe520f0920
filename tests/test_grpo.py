"""The critic-free policy algorithms (GRPO, RLOO) on the tiny model: their arithmetic against hand-computed values
(group advantages, the leave-one-out baseline, the k3 KL term), k samples per prompt from either generation
backend, and the `policy` stage with `policy.algorithm: grpo | rloo`: no value model, the same out, curves and
checkpoints as PPO, and a killed run resuming from its checkpoint."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from align.artifacts import verify_artifact
from align.errors import UserError
from align.params import parse_params
from align.records import read_jsonl
from align.rl import group_advantages, leave_one_out_advantages
from stages.ppo import guide_for, iteration_prompts
from tests.conftest import ROOT
from tests.helpers import DEFAULTS, curve, kill_tree, stage
from tests.projects import TINY_RL, TINY_RL_EXECUTION, ppo_project
from tests.tiny import make_tiny_model


def test_grpo_advantages_are_each_groups_standardised_scores() -> None:
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 3.0, 6.0, 6.0])
    # groups of 2: [1, 3]: mean 2, unbiased std sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt 2 -> -+1 / (sqrt 2 + 1e-4);
    # [2, 2]: all equal -> 0, 0; [0, 3]: mean 1.5, std sqrt(2 x 1.5^2) = 1.5 sqrt 2 -> -+1.5 / (1.5 sqrt 2 + 1e-4);
    # [6, 6] -> 0, 0
    a, b = 1 / (math.sqrt(2) + 1e-4), 1.5 / (1.5 * math.sqrt(2) + 1e-4)
    assert group_advantages(scores, 2, scale=True).tolist() == pytest.approx([-a, a, 0, 0, -b, b, 0, 0])
    # groups of 4: [1, 3, 2, 2]: mean 2, std sqrt((1 + 1 + 0 + 0) / 3); [0, 3, 6, 6]: mean 3.75, deviations
    # -3.75, -0.75, 2.25, 2.25, std sqrt((14.0625 + 0.5625 + 5.0625 x 2) / 3) = sqrt(8.25)
    s1, s2 = math.sqrt(2 / 3) + 1e-4, math.sqrt(8.25) + 1e-4
    assert group_advantages(scores, 4, scale=True).tolist() == pytest.approx(
        [-1 / s1, 1 / s1, 0, 0, -3.75 / s2, -0.75 / s2, 2.25 / s2, 2.25 / s2])
    # without the std (Dr. GRPO): the plain difference to the group mean
    assert group_advantages(scores, 4, scale=False).tolist() == pytest.approx([-1, 1, 0, 0, -3.75, -0.75, 2.25, 2.25])


def test_rloo_advantage_is_the_reward_minus_the_mean_of_the_other_samples() -> None:
    scores = torch.tensor([0.0, 3.0, 6.0, 1.0, 1.0, 4.0])
    # [0, 3, 6]: baselines (3 + 6) / 2 = 4.5, (0 + 6) / 2 = 3, (0 + 3) / 2 = 1.5 -> -4.5, 0, 4.5;
    # [1, 1, 4]: baselines 2.5, 2.5, 1 -> -1.5, -1.5, 3 (= k / (k - 1) x the difference to the group mean 2)
    assert leave_one_out_advantages(scores, 3).tolist() == pytest.approx([-4.5, 0, 4.5, -1.5, -1.5, 3])
    # k = 2: each sample against the other
    assert leave_one_out_advantages(scores, 2).tolist() == pytest.approx([-3, 3, 5, -5, -3, 3])


def test_params_take_grpo_and_rloo_and_refuse_a_group_without_a_baseline() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["policy"]["algorithm"] = "grpo"  # what `dvc exp run -S` writes
    assert parse_params(raw).rl.group_size == 4
    raw["rl"]["group_size"] = 1
    with pytest.raises(UserError, match=r"^params.yaml: rl.group_size: expected an integer >= 2, got 1$"):
        parse_params(raw)
    raw["rl"]["group_size"], raw["policy"]["algorithm"] = 2, "reinforce"
    with pytest.raises(UserError, match=r"^params.yaml: policy.algorithm: expected one of ppo, dpo, grpo, rloo, got"):
        parse_params(raw)


def test_prompts_principles_and_seeds_follow_a_prompts_place_not_the_rank_layout() -> None:
    """A prompt's place in the iteration decides which prompt it is, the principles drawn for it and its samples'
    seeds: on 1, 2 or 4 ranks the same places get the same (prompt, principles), each rank a contiguous block (a
    strided split with the principle draws keyed by rank x share + k, as before, gave other draws on 2 ranks)."""
    from align.assets import PreferencePrinciple, load_jsonl

    collection = load_jsonl(ROOT / "assets/ppo_principles.jsonl", PreferencePrinciple)
    pool = [{"id": f"p{i}", "text": str(i)} for i in range(11)]
    rl = DEFAULTS.rl.model_copy(update={"rollout_batch_size": 8})
    layouts = {}
    for world in (1, 2, 4):
        places = {}
        for rank in range(world):
            first, picked = iteration_prompts(pool, rl, seed=0, iteration=3, rank=rank, world=world)
            for k, index in enumerate(picked):
                places[first + k] = (index, guide_for(rl, collection, [], 0, 3, first + k)[0])
        layouts[world] = places
    assert sorted(layouts[1]) == list(range(8)) and layouts[1] == layouts[2] == layouts[4]


def policy_curves_and_out(cwd: Path, algorithm: str, iterations: int) -> None:
    """What a finished grpo / rloo run must leave, as PPO's does: the out, one point per iteration of every
    curve, no value model's, metrics naming the algorithm, the two sample rows kept per iteration from one group."""
    verify_artifact(cwd / "models/policy")
    kl = [v for _, v in curve(cwd, "policy", "kl")]
    assert len(kl) == iterations and abs(kl[0]) < 1e-6 and abs(kl[-1]) > 1e-6  # the adapter starts as the reference
    for name in ("reward_raw", "reward_shaped", "entropy", "clip_fraction", "approx_kl", "policy_loss",
                 "response_length", "no_stop_share", "group_reward_std", "seconds_rollout", "seconds_reward",
                 "seconds_update", "rollout_tokens_per_s", "generation_share"):
        assert len(curve(cwd, "policy", name)) == iterations, name
    assert all(0 < share < 1 for _, share in curve(cwd, "policy", "generation_share"))
    assert not (cwd / "dvclive/policy/plots/metrics/value_loss.tsv").exists()
    metrics = json.loads((cwd / "models/policy/metrics.json").read_text())
    assert metrics["algorithm"] == algorithm and metrics["iterations"] == iterations
    samples = read_jsonl(cwd / "models/policy/samples.jsonl")
    assert [s["iteration"] for s in samples] == [i for i in range(iterations) for _ in range(2)]
    assert all(a["prompt"] == b["prompt"] and a["principles"] == b["principles"]  # the first two: one group
               for a, b in zip(samples[0::2], samples[1::2]))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, backend", [("rloo", "hf"), ("grpo", "vllm")])
def test_a_critic_free_run_writes_the_policy_out_from_either_backend(tmp_path: Path, tiny_model: Path,
                                                                     algorithm: str, backend: str) -> None:
    """RLOO on transformers' generate; GRPO on vLLM at tensor_parallel_size 2."""
    generation, execution = {"backend": backend}, TINY_RL_EXECUTION
    if backend == "vllm":
        pytest.importorskip("vllm")
        # vLLM's CPU attention has no kernel for the tiny model's head_dim 16: the same shape at hidden 128
        tiny_model = make_tiny_model(tmp_path / "wide", hidden=128)
        # the rank samples with an engine over two tensor-parallel workers (on a CPU: its cores split in two)
        execution = {**execution, "kv_cache_gb": 1, "tensor_parallel_size": 2}
    cwd = ppo_project(tmp_path / "project", tiny_model, policy={"algorithm": algorithm},
                      rl={**TINY_RL, "group_size": 2, "iterations": 2}, generation=generation, cluster_defaults=execution)
    proc = stage(cwd, "policy")
    assert proc.returncode == 0, proc.stderr
    policy_curves_and_out(cwd, algorithm, 2)
    assert list((cwd / "checkpoints").iterdir()) == [cwd / f"checkpoints/{algorithm}"]


@pytest.mark.slow
def test_a_killed_grpo_job_resumes_from_its_checkpoint(tmp_path: Path, tiny_model: Path) -> None:
    cwd = ppo_project(tmp_path, tiny_model, policy={"algorithm": "grpo"},
                      rl={**TINY_RL, "group_size": 2, "iterations": 6, "rollout_batch_size": 2},
                      cluster_defaults={**TINY_RL_EXECUTION, "save_every_steps": 2 * 4})  # 4 optimizer steps an iteration
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen([sys.executable, "-m", "stages.policy"], cwd=cwd, env=env, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 300
    while not list(cwd.glob("checkpoints/grpo/*/latest")) and time.time() < deadline:
        time.sleep(0.2)
    assert list(cwd.glob("checkpoints/grpo/*/latest")), "no checkpoint was written"
    kill_tree(int(json.loads((cwd / "models/.policy.job.json").read_text())["job_id"]))
    _, err = first.communicate(timeout=120)
    assert first.returncode == 1 and "policy: job" in err and not (cwd / "models/policy").exists()
    (latest,) = cwd.glob("checkpoints/grpo/*/latest")
    saved = int(latest.read_text().removeprefix("step_"))
    assert saved < 6 and not (latest.parent / "value").exists()  # no value model, so no value engine saved

    second = stage(cwd, "policy")
    assert second.returncode == 0, second.stderr
    logs = "".join(p.read_text() for p in (cwd / "logs/policy").glob("*_0_log.out"))
    assert f"at iteration {saved}" in logs
    assert [s for s, _ in curve(cwd, "policy", "kl")] == list(range(6))  # one continuous curve, none twice
    policy_curves_and_out(cwd, "grpo", 6)

