"""Scorers too large for one GPU (`cluster.<stage>.shard_scorers`), on the tiny model: the reward model spread over
two gloo ranks by ZeRO-3 (as train_rm's evaluation runs it on a rank per GPU), and the judge / multiple-choice
scorer and the RM spread by a device map (as label_preferences and evaluate run them in one process), give the
numbers they give whole; evaluate holds one role at a time; a sharding setting that cannot apply is one line before
any job; and the memory plan counts what the code holds: scorers spread, ZeRO-3 training never whole on a GPU."""

from __future__ import annotations

import functools
import gc
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from align import devices
from align.artifacts import verify_artifact
from align.benchmarks import ChoiceItem
from align.memory import GiB, Zero, model_states
from align.params import parse_params
from align.records import read_jsonl
from align.plan import count_model, message, plan, shortfalls
from align.reward import CONFIG_FILE, TEMPLATE_FILE, RewardScorer
from align.scoring import Scorer
from slurm.submit import JobSpec, submit
from tests.conftest import ROOT
from tests.helpers import DEFAULTS, engine, merge_into, repo_params, resources, stage, training_run
from tests.projects import PRINCIPLES, make_project, preference_rows, rm_project
from tests.sharded_jobs import score_over_ranks

PREFIX = "Principles: be ethical, informative, helpful, candid and step-by-step. " * 4
SUFFIXES = ["The quick brown fox.", "1 2 3", "What is the capital of France? The capital", "def add(a, b):", "An"]
GUIDE = ["Be concise.", "Be honest and accurate."]
ROWS = [("What is the capital of France?", r, GUIDE) for r in ("Paris.", "It is Paris.", "Lyon", "7", "Paris, no.")]
OTHER = [("Add 1 and 2.", "3", "Answer briefly.")]


def trained_looking_rm(folder: Path, model: Path) -> Path:
    """An RM out on `model`: LoRA factors drawn at random (a fresh adapter's B is zero, which would fold in
    nothing) and a random scalar head, with the project's prompt and limits."""
    from align.training import lora_model

    rm = lora_model(model, training_run(lora_r=4, lora_alpha=8), seed=0, head="reward")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    rm.save_pretrained(folder / "adapter")
    shutil.copy(ROOT / "assets/rm_prompt.txt", folder / TEMPLATE_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps({"max_prompt_tokens": 64, "max_response_tokens": 64}))
    return folder


def columns(rows: list[tuple]) -> tuple[list, list, list]:
    return tuple(list(column) for column in zip(*rows))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------- over ranks: ZeRO-3


@pytest.mark.slow
def test_the_reward_model_over_two_ranks_scores_as_it_does_whole(tiny_model: Path, tmp_path: Path) -> None:
    """Two gloo ranks through the local executor, each holding half of the RM (loaded partitioned, its adapter
    merged layer by layer): rank 0 scores five rows and rank 1 none (it runs placeholder passes while rank 0 needs
    it), then both the same six rows, a share each; every reward is the whole model's."""
    rm_dir = trained_looking_rm(tmp_path / "rm", tiny_model)
    whole = RewardScorer(tiny_model, rm_dir, batch_size=2)
    want, want_other = whole.score(*columns(ROWS)), whole.score(*columns(OTHER))
    spec = JobSpec(stage="rm_over_ranks", fn=functools.partial(score_over_ranks, tiny_model, rm_dir, [ROWS, []],
                                                               ROWS + OTHER),
                   resources=resources(tasks_per_node=2, cpus_per_task=1, time_min=10), target=tmp_path / "out",
                   key={})
    found = submit(spec, DEFAULTS.cluster.model_copy(update={"executor": "local", "log_dir": str(tmp_path / "logs")}))
    assert all(share <= 0.55 for share in found["held"]), found["held"]
    assert found["reuse_prefix"] is False  # a prefix through the trunk alone would pair other modules' gathers
    assert found["own"][0] == pytest.approx(want, abs=1e-5) and found["own"][1] == []
    assert found["shared"] == pytest.approx(want + want_other, abs=1e-5)
    assert len(set(want)) == len(want)  # the rows tell apart: equal numbers are not a constant


@pytest.mark.slow
def test_train_rm_over_two_ranks_scores_its_evaluation_sharded(tiny_model: Path, tmp_path: Path) -> None:
    """The stage on two CPU ranks with shard_scorers: both ranks score the evaluation, a share each, through the
    RM spread over them; the negation margins it records are those the whole out gives."""
    cwd = rm_project(tmp_path, tiny_model, cluster={"train_rm": {"tasks_per_node": 2, "cpus_per_task": 1,
                                                                 "micro_batch_size": 2, "shard_scorers": True}})
    proc = stage(cwd, "train_rm")
    assert proc.returncode == 0, proc.stderr
    verify_artifact(cwd / "models/rm")
    log = "".join(p.read_text() for p in (cwd / "logs/train_rm").glob("*_log.out"))
    assert "rank 0 of 2" in log and "rank 1 of 2" in log
    rows = {row["id"]: row for row in preference_rows()}
    cases = [r for r in read_jsonl(cwd / "models/rm/eval.jsonl") if r["kind"] == "negation"]
    assert cases
    rm = RewardScorer(cwd / "models/sft/model", cwd / "models/rm")
    guides = [[PRINCIPLES[c["principle"]].definition] for c in cases]
    prompts = [rows[c["id"]]["prompt"] for c in cases]
    margins = [a - b for a, b in zip(rm.score(prompts, [rows[c["id"]]["response_a"] for c in cases], guides),
                                     rm.score(prompts, [rows[c["id"]]["response_b"] for c in cases], guides))]
    assert [c["margin_a"] for c in cases] == pytest.approx(margins, abs=1e-4)


# ------------------------------------------------------------------------------------------ in one process


def test_scorers_spread_by_a_device_map_give_the_numbers_of_one_device(tiny_model: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine has no second device, so the GPUs this process would see are described as the CPU, with room
    for three quarters of the model, and the disk: the device map puts the embeddings (and the tied head) on the
    CPU and the decoder layers on the disk, read back at every forward pass through the same accelerate hooks that
    run a second GPU's layers there. The judge's next-token logits (over a cached prefix), continuation
    log-likelihoods and the RM's rewards come out as on one device."""
    rm_dir = trained_looking_rm(tmp_path / "rm", tiny_model)
    texts = [PREFIX + s for s in SUFFIXES]
    continuations = [" brown", " the quick brown fox jumps", " 1 2 3 4 5"]
    whole = Scorer(tiny_model, batch_size=2)
    choices = [whole.token_id("a"), whole.token_id("b")]
    want = whole.next_token_logits(texts, choices), whole.continuation_logprobs(PREFIX, continuations)
    want_rm = RewardScorer(tiny_model, rm_dir, batch_size=2).score(*columns(ROWS + OTHER))

    size = sum(p.numel() * p.element_size() for p in whole.model.parameters())
    monkeypatch.setattr(devices, "gpu_budget", lambda: {"cpu": int(0.75 * size), "disk": 2**40})
    spread = Scorer(tiny_model, batch_size=2, shard=True)
    assert set(spread.model.hf_device_map.values()) == {"cpu", "disk"}
    assert spread.model.hf_device_map["model.embed_tokens"] == "cpu" and spread.device == torch.device("cpu")
    torch.testing.assert_close(spread.next_token_logits(texts, choices), want[0], atol=1e-5, rtol=1e-5)
    assert spread.prefix.cache is not None  # the prefix cache works across the map
    assert spread.continuation_logprobs(PREFIX, continuations) == pytest.approx(want[1], abs=1e-5)

    rm = RewardScorer(tiny_model, rm_dir, batch_size=2, shard=True)
    assert set(rm.model.hf_device_map.values()) == {"cpu", "disk"} and rm.reuse_prefix
    assert rm.score(*columns(ROWS + OTHER)) == pytest.approx(want_rm, abs=1e-5)


@pytest.mark.slow
def test_the_embedded_model_spread_both_ways_scores_as_it_does_whole(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The same checks on the embedded SmolLM2-135M (converted from its GGUF file, fp32): its judge logits over a
    CPU+disk device map (22 of its 30 layers on the disk), and an RM on it over two gloo ranks by ZeRO-3."""
    from align.models import import_model, resolve_model

    model = tmp_path / "smollm2"
    import_model(resolve_model("embedded"), model, "float32")
    texts = [PREFIX + s for s in SUFFIXES]
    whole = Scorer(model, batch_size=4)
    choices = [whole.token_id("a"), whole.token_id("b")]
    want = whole.next_token_logits(texts, choices)
    size = sum(p.numel() * p.element_size() for p in whole.model.parameters())
    del whole
    monkeypatch.setattr(devices, "gpu_budget", lambda: {"cpu": size // 2, "disk": 2**40})
    spread = Scorer(model, batch_size=4, shard=True)
    assert set(spread.model.hf_device_map.values()) == {"cpu", "disk"}
    torch.testing.assert_close(spread.next_token_logits(texts, choices), want, atol=1e-4, rtol=1e-4)
    del spread

    rm_dir = trained_looking_rm(tmp_path / "rm", model)
    want_rm = RewardScorer(model, rm_dir, batch_size=2).score(*columns(ROWS + OTHER))
    spec = JobSpec(stage="embedded_rm_over_ranks", fn=functools.partial(score_over_ranks, model, rm_dir,
                                                                        [ROWS, OTHER], ROWS + OTHER),
                   resources=resources(tasks_per_node=2, cpus_per_task=1, time_min=20), target=tmp_path / "out",
                   key={})
    found = submit(spec, DEFAULTS.cluster.model_copy(update={"executor": "local", "log_dir": str(tmp_path / "logs")}))
    assert all(share <= 0.55 for share in found["held"]), found["held"]
    assert found["shared"] == pytest.approx(want_rm, abs=1e-4) and found["own"][1] == pytest.approx(want_rm[-1:],
                                                                                                    abs=1e-4)


def test_a_model_the_devices_cannot_hold_stops_with_one_line(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two GPUs too small for the model: accelerate would put the rest on the disk (or the CPU), read back at every
    forward pass; refused instead (the device map is computed from the budget alone, no GPU needed)."""
    monkeypatch.setattr(devices, "gpu_budget", lambda: {0: 10_000, 1: 10_000})
    with pytest.raises(RuntimeError, match=r"^the model does not fit the 2 devices this process sees \(0, 1\): "
                                           r".* left over; give the job more or larger GPUs"):
        Scorer(tiny_model, shard=True)


def live_models(folder: Path) -> int:
    """transformers models of `folder` still referenced (garbage that a collection would free is not counted)."""
    from transformers import PreTrainedModel

    return sum(issubclass(type(o), PreTrainedModel) and o.name_or_path == str(folder) and o.base_model is not o
               for o in gc.get_objects())


def test_evaluate_loads_each_role_after_the_last_one_is_freed(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two policies through `score_and_answer` (the hf backend: its model lives in this process): when each scorer
    and each generator loads, no model of the earlier roles is still held; before, the first policy's generator was
    still referenced after its `with` block when the second policy's scorer loaded. (On a GPU `release_memory` also
    returns the allocator's cached blocks before vLLM measures free memory: tests/test_gpu.py.)"""
    from stages import evaluate

    seen: list[tuple[str, int]] = []

    def watched(cls: type, name: str):  # noqa: ANN202
        def load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            seen.append((name, live_models(tiny_model)))
            return cls(*args, **kwargs)
        return load

    monkeypatch.setattr(evaluate, "Scorer", watched(Scorer, "scorer"))
    monkeypatch.setattr(evaluate, "Generator", watched(evaluate.Generator, "generator"))
    item = ChoiceItem("Q: What is the capital of France?\nA:", ("Paris.", "Lyon."), frozenset({0}), 0, "misc")
    bench = {"hhh": [item], "truthfulqa": [item], "truthfulqa_csv": [item], "system_messages": [],
             "mt_bench": [{"question_id": 1, "category": "writing", "turns": ["Say hi."]}]}
    job = evaluate.EvaluateJob(
        policies={"base": tiny_model, "sft": tiny_model}, benchmarks=bench,
        cfg=DEFAULTS.evaluate.model_copy(update={"max_new_tokens": 4}), engine=engine(backend="hf"), guide=[],
        judge=tiny_model, judge_principles=[], system=DEFAULTS.system_messages, descriptions={}, seed=0, params={},
        inputs={})
    gc.collect()
    before = live_models(tiny_model)
    choices, answers, _ = evaluate.score_and_answer(job)
    assert set(choices) == set(answers) == {"base", "sft"}
    assert [name for name, _ in seen] == ["scorer", "generator"] * 2
    assert [live for _, live in seen] == [before] * 4, seen


# ---------------------------------------------------------------------------------------------- bad input


def test_shard_scorers_on_a_job_of_one_device_is_one_line_before_any_job(tiny_model: Path, tmp_path: Path) -> None:
    cwd = make_project(tmp_path, tiny_model, cluster={"label_preferences": {"shard_scorers": True}})
    proc = stage(cwd, "label_preferences")
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "params.yaml: cluster: label_preferences: shard_scorers: true spreads a scorer over the job's GPUs (or ranks), "
        "and this job has one device; set gpus_per_node: 2 or more, or shard_scorers: false"]
    assert not (cwd / "logs").exists()  # no job was submitted
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    ranked = parse_params(merge_into(raw, {"cluster": {"train_rm": {"tasks_per_node": 2, "shard_scorers": True}}}))
    assert ranked.cluster.train_rm.shard_scorers  # two ranks on the CPU: ZeRO-3 applies


# ------------------------------------------------------------------------------------------- the memory plan

LLAMA_2_70B = {  # meta-llama/Llama-2-70b-hf's config.json, the keys a config needs
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
    "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "torch_dtype": "float16",
}
H100_NODE = {"model": {"dtype": "bfloat16"}, "training": {"precision": "bf16", "batch_size": 8},
             "cluster": {"defaults": {"gpus_per_node": 8, "gpu_type": "h100", "mem_gb": 1800, "zero_stage": 3,
                                      "gradient_checkpointing": True}}}


def planned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict) -> tuple:
    monkeypatch.chdir(ROOT)
    folder = tmp_path / "llama-2-70b"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(LLAMA_2_70B))
    params = parse_params(merge_into(merge_into(repo_params(), H100_NODE),
                                     change))
    ctx, s, jobs = plan(params, folder)
    return ctx, s, {job.hardware.key: job for job in jobs if job.hardware is not None}


def test_the_plan_spreads_a_70b_judge_over_8_gpus_with_shard_scorers(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Llama-2-70B in bf16 (129 GB) on 8 x H100 80 GB: the judge whole does not fit one GPU and the plan's line
    names shard_scorers; with it the judge is a device map over the 8 GPUs and train_rm's scoring ZeRO-3 over its
    8 ranks, each about an eighth of the weights."""
    ctx, s, jobs = planned(tmp_path, monkeypatch, {})
    short = shortfalls(jobs["label_preferences"])[0]
    line = message(ctx, s, short)
    assert line.startswith("align.plan: label_preferences: judge needs ") and \
        "; set cluster.label_preferences.shard_scorers: true (" in line, line

    _, _, jobs = planned(tmp_path, monkeypatch, {"cluster": {"label_preferences": {"shard_scorers": True},
                                                             "train_rm": {"shard_scorers": True}}})
    judge = jobs["label_preferences"].phases[0][0]
    score = jobs["train_rm"].phases[1][0]
    weights = count_model(__import__("transformers").LlamaConfig(**LLAMA_2_70B), "all-linear").params * 2
    assert "over 8 GPUs" in judge.detail and "ZeRO-3 over 8" in score.detail
    assert weights / 8 < judge.need.gpu < 80 * GiB and weights / 8 < score.need.gpu < 80 * GiB
    assert not shortfalls(jobs["label_preferences"])


def test_zero3_training_is_never_whole_on_a_gpu_in_the_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Engrave of Llama-2-70B with ZeRO-3 + LoRA on 8 x H100: each rank holds its shard from the moment it loads,
    so the job fits (before, the plan counted the whole model on every GPU before ZeRO-3 shards it: 129 GB)."""
    _, _, jobs = planned(tmp_path, monkeypatch, {})
    train = jobs["engrave"].phases[0][0]
    assert "ZeRO-3" in train.detail and train.need.gpu_peak < 40 * GiB and not shortfalls(jobs["engrave"])


@pytest.mark.parametrize("gpus, nodes, optimizer, params", [(1, 1, False, False), (8, 1, False, False),
                                                            (8, 2, True, False), (8, 4, True, True)])
def test_zero3_model_states_with_zero_init_agree_with_deepspeed(capsys: pytest.CaptureFixture, gpus: int,
                                                                 nodes: int, optimizer: bool, params: bool) -> None:
    """The host figure of a model partitioned as it loads is DeepSpeed's zero_init=1 estimate (one module per rank
    at a time), on Llama-2-7B's counted shape; the GPU figure is as without it."""
    import re

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from transformers import LlamaConfig

    shape = count_model(LlamaConfig(**{**LLAMA_2_70B, "hidden_size": 4096, "intermediate_size": 11008,
                                       "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32}),
                        "all-linear")
    capsys.readouterr()
    estimate_zero3_model_states_mem_needs_all_cold(shape.params, shape.largest, gpus, nodes)
    rows = [re.match(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.+)$", line) for line in capsys.readouterr().out.splitlines()]
    table = {re.sub(r"\s+|OffloadDeviceEnum\.", "", m.group(3)): (float(m.group(1)), float(m.group(2)))
             for m in rows if m}
    cpu, gpu = table[f"offload_param={'cpu' if params else 'none'},offload_optimizer={'cpu' if optimizer else 'none'},"
                     f"zero_init=1"]
    ours = model_states(shape.params, 0, shape.largest, Zero(3, 2, 4, gpus, nodes, offload_optimizer=optimizer,
                                                             offload_params=params, zero_init=True))
    assert abs(ours.gpu / GiB - gpu) <= 0.1 * gpu + 0.01 and abs(ours.host / GiB - cpu) <= 0.1 * cpu + 0.01
