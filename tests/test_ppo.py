"""PPO against the instructable RM on the tiny model: the arithmetic (GAE, clipped losses, KL controller), the
reward shaping (the stop-token penalty, the length bonus) and the stage itself: KL 0 at the first iteration and
growing after, curves in dvclive, a resumed run continuing from its checkpoint, a preemption inside an iteration
stopping at the next safe point and resuming there with the curves of an unsignalled run, and bad batch sizes or
principle names as one line before any job; DPO on the labelled pairs with the principles as the system message,
raising the implicit reward margin of held-out pairs."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from align.artifacts import verify_artifact
from align.errors import UserError
from align.params import load_params
from align.records import read_jsonl
from align.reward import guide_text
from align.rl import adapt_kl_coef, gae, token_rewards
from align.roles import without_dropout
from align.rollout import by_chunks, pack, policy_outputs
from align.training import tokenize_pair
from slurm.submit import JobSpec, submit
from stages.ppo import PpoJob, PpoRecipe, Samples, build_job, held_out_summary, hold_out, shaped_scores
from tests.conftest import ROOT
from tests.helpers import DEFAULTS, curve, kill_tree, stage, training_run
from tests.projects import PRINCIPLES, TINY_RL, TINY_RL_EXECUTION, ppo_project, preference_rows, rm_project
from tests.tiny import make_tiny_model


def test_gae_with_lambda_one_and_gamma_one_is_the_return_to_go_minus_value() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second response has 2 tokens
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(returns, torch.tensor([[1.0, 1.0, 1.0], [2.5, 2.0, 0.0]]))
    assert torch.allclose(advantages, (returns - values) * mask)


def test_token_rewards_put_the_score_on_the_last_token_and_penalise_kl() -> None:
    logprobs = torch.tensor([[-1.0, -1.0, 0.0], [-2.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-2.0, -3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = token_rewards(torch.tensor([3.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, 0.0], [0.0, 2.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 3.0], [0.0, -0.2 - 1.0, 0.0]]))


def test_kl_controller() -> None:
    assert adapt_kl_coef(0.1, kl=10.0, target=1.0, horizon=100, samples=10) == pytest.approx(0.1 * 1.02)
    assert adapt_kl_coef(0.1, kl=0.5, target=1.0, horizon=100, samples=10) == pytest.approx(0.1 * 0.98)
    assert adapt_kl_coef(0.1, kl=0.5, target=None, horizon=100, samples=10) == 0.1


def test_policy_log_probabilities_read_the_response_tokens_only(tiny_model: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    batch = pack([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], pad_id=0, scores=[0.0, 0.0])  # width 3, responses 3
    with torch.no_grad():
        logprobs, _ = policy_outputs(model, batch, temperature=0.5)
        expected = []
        for query, response in (([5, 6, 7], [10, 11]), ([8, 9], [12, 13, 14])):  # each alone, unpadded
            logits = model(torch.tensor([query + response])).logits[0, len(query) - 1 : -1] / 0.5
            expected.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1))
    mask = batch.response_mask.bool()
    assert torch.allclose(logprobs[0][mask[0]], expected[0], atol=1e-4)
    assert torch.allclose(logprobs[1][mask[1]], expected[1], atol=1e-4)


def test_the_policy_stage_samples_and_updates_without_dropout(tiny_model: Path) -> None:
    from align.training import lora_model

    model = lora_model(tiny_model, training_run(lora_r=4, lora_alpha=8, lora_dropout=0.5), seed=0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at 0, so the adapter (and its dropout) would not show in the logits
            torch.nn.init.normal_(p, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = [model(input_ids=ids).logits for _ in range(2)]
        assert not torch.equal(*before)  # PEFT makes its LoRA dropouts in training mode
        without_dropout(model)
        assert torch.equal(*[model(input_ids=ids).logits for _ in range(2)])


def test_micro_batches_cut_to_their_own_widths_give_the_full_width_log_probs(tiny_model: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    queries, responses = [[5, 6, 7, 8, 9], [8, 9], [3, 4, 5], [7]], [[10, 11], [12, 13, 14, 15], [16], [17, 18]]
    batch = pack(queries, responses, pad_id=0, scores=[0.0] * 4)  # width 5, responses 4
    part = batch.rows(torch.tensor([1, 3]))  # queries of 2 and 1 tokens, responses of 4 and 2
    assert part.query_width == 2 and part.input_ids.shape == (2, 2 + 4)
    assert part.input_ids.tolist() == [[8, 9, 12, 13, 14, 15], [0, 7, 17, 18, 0, 0]]
    short = batch.rows(torch.tensor([2, 3]))  # the longest response has 2 tokens: [B, R] fields cut to 2
    assert short.input_ids.shape == (2, 3 + 2) and short.response_mask.shape == (2, 2)
    assert short.response_width(torch.ones(2, 4)).shape == (2, 2)
    with torch.no_grad():
        full, _ = policy_outputs(model, batch, temperature=0.7)
        cut, _ = policy_outputs(model, part, temperature=0.7)
        chunked, = by_chunks(batch, 3, lambda rows: [policy_outputs(model, rows, temperature=0.7)[0]])
    assert torch.allclose(cut * part.response_mask, full[[1, 3]] * part.response_mask, atol=1e-5)
    assert torch.allclose(chunked * batch.response_mask, full * batch.response_mask, atol=1e-5)


def test_no_stop_token_gets_the_penalty_and_length_bonus_is_capped() -> None:
    cfg = DEFAULTS.rl.model_copy(update=dict(max_new_tokens=10, stop_penalty=-6.0, length_bonus=1.0,
                                             length_bonus_cap=0.5))
    assert cfg.stop_penalty_mode == "relative"  # SALMON's: added to the RM score
    assert shaped_scores([1.0, 7.0, 1.0], ["stop", "length", "stop"], [2, 10, 9], cfg) == \
        pytest.approx([1.0 + 0.2, 7.0 - 6.0 + 0.5, 1.0 + 0.5])
    absolute = cfg.model_copy(update={"stop_penalty_mode": "absolute"})
    assert shaped_scores([1.0, 7.0], ["stop", "length"], [2, 10], absolute) == pytest.approx([1.2, -6.0 + 0.5])
    assert shaped_scores([-9.0], ["length"], [10], absolute) == pytest.approx([-5.5])  # replacing can reward
    none = cfg.model_copy(update={"stop_penalty": None})
    assert shaped_scores([7.0], ["length"], [10], none) == pytest.approx([7.5])


def test_held_out_prompts_leave_the_training_pool_and_are_compared_per_prompt() -> None:
    pool = [{"id": f"p{i}", "text": str(i)} for i in range(10)]
    train, held = hold_out(pool, 3, seed=0)
    assert len(held) == 3 and len(train) == 7
    assert sorted(p["id"] for p in train + held) == sorted(p["id"] for p in pool)  # a split, nothing lost or doubled
    assert hold_out(pool, 3, seed=0) == (train, held) and hold_out(pool, 3, seed=1)[1] != held
    assert len(hold_out(pool, 16, seed=0)[1]) == 5 and hold_out(pool, 0, seed=0) == (pool, [])  # at most half
    # per prompt (RM score, shaped score, cut off): RM gains 0.4, -0.2, 0; shaped gains 6.4, -0.2, 0
    sft, policy = [(0.1, -5.9, True), (0.4, 0.4, False), (0.3, -5.7, True)], [(0.5, 0.5, False), (0.2, 0.2, False),
                                                                            (0.3, -5.7, True)]
    summary = held_out_summary(sft, policy, seed=0)
    assert summary["prompts"] == 3
    assert summary["reward_sft"] == pytest.approx(0.8 / 3) and summary["reward_policy"] == pytest.approx(1.0 / 3)
    assert summary["reward_gain"] == pytest.approx(0.2 / 3) and summary["shaped_gain"] == pytest.approx(6.2 / 3)
    assert summary["win_rate"] == pytest.approx(1.5 / 3)  # under the RM; a tie counts half
    assert summary["no_stop_sft"] == pytest.approx(2 / 3) and summary["no_stop_policy"] == pytest.approx(1 / 3)
    lo, hi = json.loads(summary["reward_gain_ci95"])
    assert -0.2 <= lo < summary["reward_gain"] < hi <= 0.4


@pytest.mark.slow
def test_ppo_kl_starts_at_zero_grows_and_a_killed_run_resumes(tmp_path: Path, roomy_model: Path) -> None:
    cwd = ppo_project(tmp_path, roomy_model, rl={**TINY_RL, "eval_prompts": 2})
    proc = stage(cwd, "policy")
    assert proc.returncode == 0, proc.stderr
    verify_artifact(cwd / "models/policy")
    kl = [v for _, v in curve(cwd, "policy", "kl")]
    assert len(kl) == 3 and abs(kl[0]) < 1e-6 and kl[-1] > 1e-4  # the adapter starts as the reference
    for name in ("reward_raw", "reward_shaped", "entropy", "clip_fraction", "approx_kl", "value_loss",
                 "explained_variance", "response_length", "no_stop_share"):
        assert len(curve(cwd, "policy", name)) == 3
    metrics = json.loads((cwd / "models/policy/metrics.json").read_text())
    assert metrics["iterations"] == 3 and metrics["kl_first"] == kl[0]
    held_out = metrics["held_out"]  # 2 of the pool's 5 prompts, answered by the trained and the SFT policy
    assert held_out["prompts"] == 2 and held_out["reward_gain"] == pytest.approx(
        held_out["reward_policy"] - held_out["reward_sft"])
    assert json.loads((cwd / "metrics/policy.json").read_text())["reward"] == round(held_out["reward_gain"], 3)
    samples = read_jsonl(cwd / "models/policy/samples.jsonl")
    assert {s["iteration"] for s in samples} == {0, 1, 2}
    assert all(s["principles"][:3] == ["no_self_commentary", "does_the_task", "no_needless_examples"]
               and len(s["principles"]) == 6 for s in samples)  # the guards, always, first, then 3 drawn


@pytest.mark.slow
def test_gradient_checkpointing_leaves_a_ppo_run_unchanged(tmp_path: Path, roomy_model: Path) -> None:
    runs = {}
    for recompute in (False, True):  # policy and value both recompute; the curves are the same to float noise
        cwd = ppo_project(tmp_path / str(recompute), roomy_model,
                          cluster_defaults={**TINY_RL_EXECUTION, "gradient_checkpointing": recompute})
        proc = stage(cwd, "policy")
        assert proc.returncode == 0, proc.stderr
        runs[recompute] = {name: [v for _, v in curve(cwd, "policy", name)] for name in ("kl", "value_loss")}
    assert runs[True]["kl"][-1] > 1e-4
    for name, values in runs[False].items():
        assert runs[True][name] == pytest.approx(values, rel=1e-3, abs=1e-5), name


@pytest.mark.slow
def test_a_killed_ppo_job_resumes_from_its_checkpoint(tmp_path: Path, roomy_model: Path) -> None:
    cwd = ppo_project(tmp_path, roomy_model, rl={**TINY_RL, "iterations": 10},
                      cluster_defaults={**TINY_RL_EXECUTION, "save_every_steps": 2 * 4})  # 4 optimizer steps an iteration
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen([sys.executable, "-m", "stages.ppo"], cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(cwd.glob("checkpoints/ppo/*/latest")) and time.time() < deadline:
        time.sleep(0.2)
    assert list(cwd.glob("checkpoints/ppo/*/latest")), "no checkpoint was written"
    kill_tree(int(json.loads((cwd / "models/.policy.job.json").read_text())["job_id"]))
    _, err = first.communicate(timeout=120)
    assert first.returncode == 1 and "policy: job" in err and not (cwd / "models/policy").exists()
    (latest,) = cwd.glob("checkpoints/ppo/*/latest")
    saved = int(latest.read_text().removeprefix("step_"))
    assert (latest.parent / "value" / latest.read_text()).is_dir()  # the value engine is saved with the policy

    second = stage(cwd, "policy")
    assert second.returncode == 0, second.stderr
    logs = "".join(p.read_text() for p in (cwd / "logs/policy").glob("*_0_log.out"))
    assert f"at iteration {saved}" in logs
    assert [s for s, _ in curve(cwd, "policy", "kl")] == list(range(10))  # one continuous curve, none twice
    samples = read_jsonl(cwd / "models/policy/samples.jsonl")
    assert sorted({s["iteration"] for s in samples}) == list(range(10))


def with_descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [found for child in children for found in with_descendants(int(child))]


class SignalledInRollout(PpoRecipe):
    """The policy stage's recipe, except that SIGTERM - what SLURM sends a job it preempts, to every process of the
    job step - reaches this process and the processes it started as its rollout of iteration `at` begins, in the
    job's first allocation only (a file in the working folder says it was sent)."""

    def __init__(self, job: PpoJob, at: int):
        super().__init__(job)
        self.at = at

    def rollout(self, iteration: int) -> Samples:
        sent = Path("sigterm_sent")
        if iteration == self.at and not sent.exists():
            sent.touch()
            for pid in with_descendants(os.getpid()):
                os.kill(pid, signal.SIGTERM)
        return super().rollout(iteration)


def signalled_job(job: PpoJob, at: int) -> str | None:
    return SignalledInRollout(job, at).run()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_a_preemption_during_a_rollout_stops_after_it_and_the_resumed_run_ends_as_an_unsignalled_one(
        tmp_path: Path, roomy_model: Path, monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """SIGTERM during the rollout of iteration 1 of 3 (0-based): the job checkpoints at the end of that rollout, its
    samples in the checkpoint, and requeues (the local executor starts it again); the next allocation resumes with
    the scoring of iteration 1 and ends with the curves and the out of a run nobody signalled. With vLLM the
    engine survives the signal (its own engine process would shut down on it)."""
    model, execution = roomy_model, TINY_RL_EXECUTION
    if backend == "vllm":
        pytest.importorskip("vllm")
        # vLLM's CPU attention has no kernel for the tiny model's head_dim 16: the same shape at hidden 128
        model, execution = make_tiny_model(tmp_path / "wide", hidden=128), {**execution, "kv_cache_gb": 1}
    groups = dict(generation={"backend": backend}, rl={**TINY_RL, "iterations": 3},
                  cluster_defaults={**execution, "save_every_steps": 1000},  # no periodic checkpoint
                  cluster={"policy": {"time_min": 10}})  # an engine killed by the signal hangs the job until then
    reference = ppo_project(tmp_path / "reference", model, **groups)
    proc = stage(reference, "policy")
    assert proc.returncode == 0, proc.stderr

    cwd = ppo_project(tmp_path / "signalled", model, **groups)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the job imports this module
    params = load_params()
    spec = JobSpec(stage="policy", fn=functools.partial(signalled_job, build_job(params), 1),
                   resources=params.cluster.policy, target=cwd / "models/policy", key={})
    assert submit(spec, params.cluster) == verify_artifact(cwd / "models/policy")
    log = "".join(p.read_text() for p in sorted((cwd / "logs/policy").glob("*_0_log.out")))
    assert "signalled at iteration 1 after its rollout: checkpoint saved, requeueing" in log, log[-3000:]
    assert "/step_00000001_rollout at iteration 1" in log  # the next allocation began there ("resumed from ...")
    assert log.count("iteration 1/3 ") == 1  # iteration 0 was not done again
    timed = ("seconds_", "rollout_tokens_per_s", "generation_share")  # the clock's, not the run's
    names = [p.stem for p in (reference / "dvclive/policy/plots/metrics").glob("*.tsv") if not p.stem.startswith(timed)]
    assert {"reward_raw", "kl", "value_loss", "entropy", "clip_fraction"} <= set(names)
    for name in names:
        resumed, unsignalled = curve(cwd, "policy", name), curve(reference, "policy", name)
        assert [step for step, _ in resumed] == [step for step, _ in unsignalled] == [0, 1, 2], name
        assert [v for _, v in resumed] == pytest.approx([v for _, v in unsignalled], rel=1e-5, abs=1e-6), name
    signalled, unsignalled = (json.loads((folder / "models/policy/metrics.json").read_text())
                              for folder in (cwd, reference))
    assert signalled.keys() == unsignalled.keys()
    for name, value in unsignalled.items():
        assert signalled[name] == (pytest.approx(value, rel=1e-5, abs=1e-6) if isinstance(value, float) else value)
    assert read_jsonl(cwd / "models/policy/samples.jsonl") == read_jsonl(reference / "models/policy/samples.jsonl")


@pytest.mark.parametrize("rl, message", [
    ({"rollout_batch_size": 4, "step_batch_size": 3}, "rl: step_batch_size (3) must divide rollout_batch_size (4)"),
    ({"rollout_batch_size": 4, "step_batch_size": 8}, "rl: step_batch_size (8) must not exceed rollout_batch_size"),
    ({"principles": ["concise", "nope"]}, "rl.principles: 'concise' is not an id in assets/ppo_principles.jsonl"),
    ({"guard_principles": ["nope"]}, "rl.guard_principles: 'nope' is not an id in assets/guard_principles.jsonl"),
    ({"kl_coef": -0.1}, "rl.kl_coef: expected a number >= 0, got -0.1"),
    ({"loss_type": "grpo", "importance_sampling_level": "sequence"},
     "rl.importance_sampling_level: 'sequence' (GSPO) is GRPO's; ppo takes 'token'"),
])
def test_ppo_bad_params_are_one_line_and_write_nothing(tmp_path: Path, tiny_model: Path, rl: dict,
                                                       message: str) -> None:
    cwd = ppo_project(tmp_path, tiny_model, rl={**TINY_RL, **rl})
    proc = stage(cwd, "policy")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr and not (cwd / "models/policy").exists()


def test_ppo_refuses_to_sample_in_one_dtype_and_train_in_another(tmp_path: Path, tiny_model: Path) -> None:
    """On a GPU rollouts sample in the SFT folder's dtype: refused before the job where the precision is set."""
    cwd = ppo_project(tmp_path, tiny_model, training={**DEFAULTS.training.model_dump(), "precision": "bf16"},
                      cluster={"policy": {"gpus_per_node": 1, "gpu_memory_gb": 80}})
    proc = stage(cwd, "policy")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("params.yaml: training.precision: bf16 but models/sft/model holds float32 weights")
    assert not (cwd / "models/policy").exists()


def test_ppo_without_a_reward_model_is_one_line(tmp_path: Path, tiny_model: Path) -> None:
    cwd = ppo_project(tmp_path, tiny_model)
    shutil.rmtree(cwd / "models/rm")
    proc = stage(cwd, "policy")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "models/rm" in proc.stderr
    assert not (cwd / "models/policy").exists()


HELD_OUT_SHORT_LONG = [  # (prompt, short answer, long answer), none of them in preference_rows
    ("What is the capital of Italy?", "Rome.", "The capital of Italy is Rome, and Rome is a city in Italy."),
    ("Add 2 and 3.", "5", "2 and 3 and so on: 2 3 4 5, so the answer is 5 and 5 it is."),
    ("What colour is the lazy dog?", "grey", "The lazy dog is grey, the lazy dog sleeps and it is grey."),
    ("Say something kind.", "Thank you.", "An assistant answers kindly, honestly and helpfully to every question."),
]


def response_logprobs(model_dir: Path, pairs: list[tuple[str, str]], system: str) -> torch.Tensor:
    """Per (prompt, response), the summed log-probability of the response tokens (after `system`, as DPO shows
    the principles) under the model in `model_dir`; computed here, not by the stage's code under test."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    sums = []
    with torch.no_grad():
        for prompt, response in pairs:
            row = tokenize_pair(tokenizer, prompt, response, system=system)
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(row["labels"][1:])
            picked = torch.log_softmax(logits, -1)[labels != -100].gather(-1, labels[labels != -100, None])
            sums.append(picked.sum())
    return torch.stack(sums)


@pytest.mark.slow
def test_dpo_learns_the_pairs_under_their_principles_and_writes_the_same_out(tmp_path: Path,
                                                                           roomy_model: Path) -> None:
    rows = [{**row, "labels": {**row["labels"], "comprehensive": "tie"}} for row in preference_rows()]  # concise only
    cwd = rm_project(tmp_path, roomy_model, rows=rows, policy={"algorithm": "dpo"},
                     dpo={"learning_rate": 3e-3, "lora_r": 8, "lora_alpha": 16, "epochs": 4, "beta": 0.5,
                          "negation_prob": 0.0, "label_noise": 0.0, "subsets_per_pair": 10, "max_prompt_tokens": 256})
    proc = stage(cwd, "policy")
    assert proc.returncode == 0, proc.stderr
    verify_artifact(cwd / "models/policy")
    metrics = json.loads((cwd / "models/policy/metrics.json").read_text())
    # of the 10 subsets drawn per pair, those without Concise tie and are dropped (SALMON): some of the 12 x 10 stay
    assert metrics["algorithm"] == "dpo" and 12 <= metrics["examples"] < 12 * 10
    assert metrics["steps"] == math.ceil(4 * metrics["examples"] / 4)  # 4 epochs at a global batch of 4
    losses = [loss for _, loss in curve(cwd, "policy", "loss")]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # the adapter starts as the reference: margin 0
    assert statistics.fmean(losses[-6:]) < 0.5 * losses[0]
    AutoModelForCausalLM.from_pretrained(cwd / "models/policy/model")  # the out evaluate reads, as after PPO
    # held out: new questions, each with a short and a long answer, under Concise. Before training the implicit
    # reward margin beta x ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))) is 0 (the policy is the reference);
    # after, the short answer's is above the long one's on every pair. Seen: 3.1 to 9.7, mean 5.9 (Dec 2026)
    guide = guide_text([PRINCIPLES["concise"].definition])
    sides = [(p, s) for p, s, _ in HELD_OUT_SHORT_LONG] + [(p, lg) for p, _, lg in HELD_OUT_SHORT_LONG]
    policy, reference = (response_logprobs(cwd / "models" / name / "model", sides, guide) for name in ("policy", "sft"))
    ratios = policy - reference
    margins = 0.5 * (ratios[: len(HELD_OUT_SHORT_LONG)] - ratios[len(HELD_OUT_SHORT_LONG):])  # beta 0.5
    assert (margins > 1.0).all(), margins


def test_dpo_shows_the_principles_as_the_system_message(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    from align.reward import guide_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    guide = guide_text(["The response is concise.", "The response is honest."])
    pair = tokenize_pair(tokenizer, "Add 1 and 2.", "3", system=guide)
    text = tokenizer.decode(pair["input_ids"])
    assert text.startswith("<|im_start|>system\n- The response is concise.\n- The response is honest.<|im_end|>")
    assert tokenizer.decode([t for t, label in zip(pair["input_ids"], pair["labels"]) if label != -100]) == "3<|im_end|>\n"

