"""The GPU suite: the training stages, PPO, scoring and generation on one CUDA device in bf16, asserting what
their CPU tests assert (the loss falls, curves are written, a checkpoint resumes), plus where the work ran: each
job's log names its device, and the in-process parts leave their tensors on the GPU; a released scorer's memory is
free again. With two CUDA devices (skipped otherwise): scorers spread over both (a device map, and ZeRO-3 over two
ranks), vLLM with tensor parallelism 2, and the policy stage's split layout (the trainer on one GPU, the rollout
engine on the other, the LoRA factors over NCCL).

Skipped, with the reason, where torch sees no CUDA device; `bash bench/gpu_check.sh` runs it on a GPU machine.
ALIGN_GPU_SUITE_ON_CPU=1 runs it on the CPU instead, which checks the tests' own logic on a machine without one.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
from pathlib import Path

import pytest
import torch

from align.artifacts import verify_artifact
from align.devices import job_device
from align.training import sft_job
from tests.helpers import FAST_EXECUTION, FAST_TRAINING, TINY_TRAINING, curve, engine, inline, stage, training_run
from tests.projects import TINY_RL, make_project, ppo_project, rm_project
from tests.tiny import PAIRS

ON_CPU = os.environ.get("ALIGN_GPU_SUITE_ON_CPU") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() and not ON_CPU, reason="no CUDA device (torch.cuda.is_available())"),
]
DEVICE = "cpu" if ON_CPU else "cuda:0"
BF16 = {**FAST_TRAINING, "precision": "bf16"}


def job_log(cwd: Path, stage_name: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((cwd / "logs" / stage_name).glob("*_0_log.out")))


def ran_here(cwd: Path, stage_name: str) -> bool:
    return f"rank 0 of 1 on {DEVICE}" in job_log(cwd, stage_name)


@pytest.fixture(scope="module")
def bf16_model(roomy_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The roomy tiny model saved in bf16, as a real checkpoint is: inference loads it in its own dtype on a GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("bf16") / "model"
    AutoModelForCausalLM.from_pretrained(roomy_model, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(roomy_model).save_pretrained(out)
    return out


def test_sft_steps_in_bf16_fall_and_resume_on_the_gpu(bf16_model: Path, tmp_path: Path) -> None:
    training = training_run(**{**TINY_TRAINING, "precision": "bf16"}, save_every_steps=3)
    job = functools.partial(sft_job, bf16_model, PAIRS, tmp_path / "ckpt", training, log=None)
    first = inline(functools.partial(job, max_steps=3))
    rest = inline(functools.partial(job, max_steps=12))
    assert rest["start_step"] == 3 and len(rest["losses"]) == 12 and rest["losses"][:3] == first["losses"]
    assert statistics.fmean(rest["losses"][-3:]) < statistics.fmean(rest["losses"][:3])
    if not ON_CPU:
        assert torch.cuda.max_memory_allocated() > 0


def test_engrave_stage_in_bf16_runs_on_the_gpu(bf16_model: Path, tmp_path: Path) -> None:
    cwd = make_project(tmp_path, bf16_model, pairs=PAIRS, training=BF16, cluster_defaults=FAST_EXECUTION,
                       engrave={"epochs": 6})
    proc = stage(cwd, "engrave")
    assert proc.returncode == 0, proc.stderr
    verify_artifact(cwd / "models/engraved")
    assert ran_here(cwd, "engrave"), job_log(cwd, "engrave")
    losses = [loss for _, loss in curve(cwd, "engrave", "loss")]
    assert statistics.fmean(losses[-3:]) < statistics.fmean(losses[:3])


def test_reward_model_and_dpo_steps_in_bf16_on_the_gpu(bf16_model: Path, tmp_path: Path) -> None:
    from align.reward import RewardScorer

    cwd = rm_project(tmp_path / "rm", bf16_model, training=BF16)
    proc = stage(cwd, "train_rm")
    assert proc.returncode == 0, proc.stderr
    assert ran_here(cwd, "train_rm"), job_log(cwd, "train_rm")
    losses = [loss for _, loss in curve(cwd, "train_rm", "loss")]
    assert statistics.fmean(losses[-8:]) < statistics.fmean(losses[:8])
    rm = RewardScorer(cwd / "models/sft/model", cwd / "models/rm", precision="bf16")
    assert next(rm.model.parameters()).device == job_device()
    scores = rm.score(["Name a number."] * 2, ["7", "1 2 3 4 5 6 7 8 9 10 and so on."], [["Be concise."]] * 2)
    assert all(map(torch.isfinite, torch.tensor(scores)))

    cwd = rm_project(tmp_path / "dpo", bf16_model, training=BF16,
                     policy={"algorithm": "dpo"},
                     dpo={"learning_rate": 1e-3, "lora_r": 8, "lora_alpha": 16, "epochs": 4, "beta": 0.5,
                          "negation_prob": 0.0, "subsets_per_pair": 2, "max_prompt_tokens": 256})
    proc = stage(cwd, "policy")
    assert proc.returncode == 0, proc.stderr
    assert ran_here(cwd, "policy"), job_log(cwd, "policy")
    losses = [loss for _, loss in curve(cwd, "policy", "loss")]
    assert losses[0] == pytest.approx(0.6931, abs=2e-2)  # the adapter starts as the reference (bf16 rounding)
    assert statistics.fmean(losses[-6:]) < statistics.fmean(losses[:6]), losses  # falls (bf16: noisier than fp32)


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_two_ppo_iterations_in_bf16_on_the_gpu(backend: str, bf16_model: Path, tmp_path: Path) -> None:
    if backend == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed here")
        if ON_CPU:
            pytest.skip("vLLM's CPU attention has no kernel for the tiny model's head size (16)")
    cwd = ppo_project(tmp_path, bf16_model, training=BF16, rl={**TINY_RL, "iterations": 2},
                      generation={"backend": backend})
    proc = stage(cwd, "policy")
    assert proc.returncode == 0, proc.stderr
    verify_artifact(cwd / "models/policy")
    assert ran_here(cwd, "policy"), job_log(cwd, "policy")
    kl = [v for _, v in curve(cwd, "policy", "kl")]
    assert len(kl) == 2 and abs(kl[0]) < 1e-3  # the adapter starts as the reference
    for name in ("reward_raw", "entropy", "value_loss", "response_length"):
        values = [v for _, v in curve(cwd, "policy", name)]
        assert len(values) == 2 and all(map(torch.isfinite, torch.tensor(values)))
    assert json.loads((cwd / "models/policy/metrics.json").read_text())["iterations"] == 2
    if backend == "vllm":  # the colocated engine slept through each iteration's scoring and update
        assert job_log(cwd, "policy").count("Sleep mode freed") == 2, job_log(cwd, "policy")[-3000:]


def test_scoring_and_generation_in_bf16_on_the_gpu(bf16_model: Path) -> None:
    from align.generation import Generator, Sampling, chat_prompt
    from align.scoring import Scorer

    scorer = Scorer(bf16_model, batch_size=4)
    assert scorer.device == job_device() and next(scorer.model.parameters()).dtype == \
        (torch.float32 if ON_CPU else torch.bfloat16)
    context = "Question: What is the capital of France?\nAnswer:"
    shared = scorer.continuation_logprobs(context, [" Paris", " Lyon", " Marseille"])
    scorer.reuse_prefix = False
    alone = scorer.continuation_logprobs(context, [" Paris", " Lyon", " Marseille"])
    assert shared == pytest.approx(alone, abs=0.1)  # the shared prefix computes what each row alone computes

    with Generator(str(bf16_model), engine(backend="hf", generate_batch_size=4)) as generator:
        prompts = [chat_prompt(generator.tokenizer, [{"role": "user", "content": q}]) for q in ("Hi?", "Why?")]
        sampling = Sampling(temperature=0.7, top_p=1.0, max_new_tokens=8, seed=5)
        first = generator.generate(prompts, sampling)
        again = generator.generate(prompts, sampling)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]  # same seed, same samples
    assert all(0 < o.num_tokens <= 8 and o.finish_reason in ("stop", "length") for o in first)


def test_a_released_scorer_gives_its_gpu_memory_back(bf16_model: Path) -> None:
    """`release_memory` between roles: what the scorer held, cached blocks included, is free again for the next
    role (vLLM measures free memory before it starts); a garbage collection alone leaves the blocks cached."""
    from align.devices import release_memory
    from align.scoring import Scorer

    if ON_CPU:
        pytest.skip("the CPU has no allocator cache to return")
    release_memory()
    before = torch.cuda.memory_reserved()
    scorer = Scorer(bf16_model, batch_size=4)
    scorer.continuation_logprobs("Question: What is the capital of France?\nAnswer:", [" Paris", " Lyon"])
    assert torch.cuda.memory_reserved() > before
    del scorer
    release_memory()
    assert torch.cuda.memory_reserved() <= before


# ------------------------------------------------------------------------------------------------- two GPUs

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@two_gpus
def test_scorers_spread_over_two_gpus_give_the_numbers_of_one(bf16_model: Path, tmp_path: Path) -> None:
    """A device map over the two GPUs this process sees (the tiny model split in halves: an even share each), and
    the RM over two ranks by ZeRO-3 (nccl, one GPU per rank through the local executor): the numbers of one GPU."""
    from align.reward import RewardScorer
    from align.scoring import Scorer
    from slurm.submit import JobSpec, submit
    from tests.helpers import DEFAULTS, resources
    from tests.sharded_jobs import score_over_ranks

    texts = ["Principles: be helpful. " * 8 + s for s in ("Output (", "The answer is", "1 2 3")]
    whole = Scorer(bf16_model, batch_size=2)
    choices = [whole.token_id("a"), whole.token_id("b")]
    want = whole.next_token_logits(texts, choices), whole.continuation_logprobs(texts[0], [" brown", " 1 2 3"])
    del whole
    spread = Scorer(bf16_model, batch_size=2, shard=True)
    assert set(spread.model.hf_device_map.values()) == {0, 1}
    torch.testing.assert_close(spread.next_token_logits(texts, choices), want[0], atol=0.05, rtol=0.02)
    assert spread.continuation_logprobs(texts[0], [" brown", " 1 2 3"]) == pytest.approx(want[1], abs=0.1)
    del spread

    cwd = rm_project(tmp_path / "rm", bf16_model, training=BF16)
    assert stage(cwd, "train_rm").returncode == 0
    rows = [("Name a number.", r, ["Be concise."]) for r in ("7", "1 2 3 4 5 6 7 8 9 10 and so on.", "3")]
    rm_whole = RewardScorer(cwd / "models/sft/model", cwd / "models/rm", batch_size=2)  # fp32, as score_over_ranks
    want_rm = rm_whole.score(*(list(c) for c in zip(*rows)))
    del rm_whole
    spec = JobSpec(stage="rm_over_gpus", fn=functools.partial(score_over_ranks, cwd / "models/sft/model",
                                                              cwd / "models/rm", [rows, rows[:1]], rows),
                   resources=resources(tasks_per_node=2, gpus_per_node=2, cpus_per_task=1, time_min=10),
                   target=tmp_path / "out", key={})
    found = submit(spec, DEFAULTS.cluster.model_copy(update={"executor": "local", "log_dir": str(tmp_path / "logs")}))
    assert all(share <= 0.55 for share in found["held"])
    assert found["shared"] == pytest.approx(want_rm, abs=1e-3) and found["own"][1] == pytest.approx(want_rm[:1],
                                                                                                    abs=1e-3)


@two_gpus
def test_vllm_generates_with_tensor_parallelism_over_two_gpus(bf16_model: Path) -> None:
    """tensor_parallel_size 2: one engine over both GPUs; greedy answers start as one GPU's do (bf16: sums split
    over two GPUs may round a later near-tie the other way)."""
    pytest.importorskip("vllm", reason="vLLM is not installed here")
    from align.generation import Generator, Sampling, chat_prompt

    sampling = Sampling(temperature=0.0, max_new_tokens=8)
    found = {}
    for tp in (1, 2):
        with Generator(str(bf16_model), engine(backend="vllm", tensor_parallel_size=tp)) as generator:
            prompts = [chat_prompt(generator.tokenizer, [{"role": "user", "content": q}])
                       for q in ("What is the capital of France?", "Add 1 and 2.", "Say something helpful.")]
            found[tp] = [o.token_ids for o in generator.generate(prompts, sampling)]
    assert all(found[1]) and all(found[2]) and [t[0] for t in found[2]] == [t[0] for t in found[1]]


@two_gpus
def test_the_split_layout_trains_on_one_gpu_and_samples_on_the_other(bf16_model: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two tasks as SLURM would start a split policy job over two one-GPU nodes (rank 0 the trainer, rank 1 the
    engine, each shown its own GPU): two PPO iterations, the factors sent to the engine over NCCL."""
    from tests.helpers import policy_tasks

    pytest.importorskip("vllm", reason="vLLM is not installed here")
    split = {"nodes": 2, "tasks_per_node": 1, "gpus_per_node": 1, "gpu_memory_gb": 16, "placement": "split",
             "engine_nodes": 1, "kv_cache_gb": 1}
    cwd = ppo_project(tmp_path, bf16_model, training=BF16, rl={**TINY_RL, "iterations": 2},
                      generation={"backend": "vllm"}, cluster={"policy": split})
    monkeypatch.chdir(cwd)
    trainer, engine = policy_tasks(cwd, tasks_per_node=1, nodes=2, devices=["0", "1"])
    assert (trainer.returncode, engine.returncode) == (0, 0), trainer.stdout[-3000:] + engine.stdout[-3000:]
    assert "rank 0 of 1 on cuda:0 (nccl)" in trainer.stdout
    assert "engine 0 on " in engine.stdout and "round 1: " in engine.stdout
    verify_artifact(cwd / "models/policy")
    kl = [v for _, v in curve(cwd, "policy", "kl")]
    assert len(kl) == 2 and abs(kl[0]) < 1e-3 and kl[1] != 0  # the adapter starts as the reference, then moves
