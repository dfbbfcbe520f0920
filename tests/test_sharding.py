"""Scorers too large for one GPU (`cluster.<stage>.shard_scorers`), on the tiny model: the reward model spread over
two gloo ranks by ZeRO-3 (as train_rm's evaluation runs it on a rank per GPU), and the judge / multiple-choice
scorer and the RM spread by a device map (as label_preferences and evaluate run them in one process), give the
numbers they give whole; evaluate holds one role at a time; a sharding setting that cannot apply is one line before
any job."""

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
from align.benchmarks import ChoiceItem
from align.params import parse_params
from align.reward import CONFIG_FILE, TEMPLATE_FILE, RewardScorer
from align.scoring import Scorer
from slurm.submit import JobSpec, submit
from tests.conftest import ROOT
from tests.helpers import DEFAULTS, engine, merge_into, resources, stage, training_run
from tests.projects import make_project
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
    merged layer by layer): rank 0 scores five rows, rank 1 one (the ranks run different numbers of forward
    passes, kept in step), then both the same six rows, a share each; every reward is the whole model's."""
    rm_dir = trained_looking_rm(tmp_path / "rm", tiny_model)
    whole = RewardScorer(tiny_model, rm_dir, batch_size=2)
    want, want_other = whole.score(*columns(ROWS)), whole.score(*columns(OTHER))
    spec = JobSpec(stage="rm_over_ranks", fn=functools.partial(score_over_ranks, tiny_model, rm_dir, [ROWS, OTHER],
                                                               ROWS + OTHER),
                   resources=resources(tasks_per_node=2, cpus_per_task=1, time_min=10), target=tmp_path / "out",
                   key={})
    found = submit(spec, DEFAULTS.cluster.model_copy(update={"executor": "local", "log_dir": str(tmp_path / "logs")}))
    assert all(share <= 0.55 for share in found["held"]), found["held"]
    assert found["reuse_prefix"] is False  # a prefix through the trunk alone would pair other modules' gathers
    assert found["own"][0] == pytest.approx(want, abs=1e-5) and found["own"][1] == pytest.approx(want_other, abs=1e-5)
    assert found["shared"] == pytest.approx(want + want_other, abs=1e-5)
    assert len(set(want)) == len(want)  # the rows tell apart: equal numbers are not a constant


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
        "params.yaml: cluster.label_preferences: shard_scorers: true spreads a scorer over the job's GPUs (or ranks), "
        "and this job has one device; set gpus_per_node: 2 or more, or shard_scorers: false"]
    assert not (cwd / "logs").exists()  # no job was submitted
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    ranked = parse_params(merge_into(raw, {"cluster": {"train_rm": {"tasks_per_node": 2, "shard_scorers": True}}}))
    assert ranked.cluster.train_rm.shard_scorers  # two ranks on the CPU: ZeRO-3 applies
