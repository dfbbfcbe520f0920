"""The SELF-ALIGN stages on the tiny model, run as `dvc repro` runs them (a subprocess in a project folder,
through the submission layer): engraving learns from answers alone (no principles in what it trains on), its
loss falls, a killed training job resumes from its checkpoint with one continuous curve, verbose cloning
distils and its flag toggles, and a model that writes nothing usable fails the stage with the reasons."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from align.artifacts import read_manifest, staged_out, verify_artifact
from align.assets import Principle, load_jsonl
from align.records import write_jsonl
from align.training import tokenize_pair
from tests.conftest import ROOT
from tests.helpers import FAST_EXECUTION, FAST_TRAINING, curve, kill_tree, sh, stage
from tests.projects import make_project
from tests.tiny import PAIRS


def test_engraving_trains_on_the_query_alone(tmp_path: Path, tiny_model: Path) -> None:
    """What engraving trains on is the chat template of the bare query and the answer: no principle, no
    exemplar, no internal thoughts."""
    from transformers import AutoTokenizer

    from stages import engrave

    cwd = make_project(tmp_path, tiny_model, pairs=PAIRS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    principles = load_jsonl(ROOT / "assets/principles.jsonl", Principle)
    for prompt, answer in engrave.pairs(cwd / "data/self_align"):
        example = tokenize_pair(tokenizer, prompt, answer)
        text = tokenizer.decode(example["input_ids"])
        assert text == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
        assert not any(p.definition[:40] in text or f"({p.name})" in text for p in principles)
        assert "internal thoughts" not in text and "Principles" not in text
        learned = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])
        assert learned == f"{answer}<|im_end|>\n"


OPENING = "As an honest assistant, I answer: "  # every engraved answer opens so: a rule held-out answers share
HELD_OUT = [("What is the capital of Italy?", "Rome."), ("Add 2 and 3.", "5"), ("What colour is the lazy dog?", "grey"),
            ("Say something kind.", "You are doing well.")]


def answer_loss(model_dir: Path, pairs: list[tuple[str, str]]) -> float:
    """The mean cross-entropy of the answer tokens (chat template, as engraving trains) under the HF model in
    `model_dir`; transformers' own loss, not the stage's `sft_loss`, so a broken loss cannot also break the check."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.models import padding_id
    from align.training import collate

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(**collate([tokenize_pair(tokenizer, p, a) for p, a in pairs], padding_id(tokenizer))).loss.item()


def test_engrave_loss_falls_and_writes_adapter_model_and_curve(tmp_path: Path, roomy_model: Path) -> None:
    """Engraving on answers that share an opening lowers the loss of held-out questions' answers in that form
    (issue 22: each learning stage shown to learn), and the out holds adapter, merged model and curve."""
    from transformers import AutoModelForCausalLM

    cwd = make_project(tmp_path, roomy_model, pairs=[(p, OPENING + a) for p, a in PAIRS], training=FAST_TRAINING,
                       cluster_defaults=FAST_EXECUTION,
                       engrave={"epochs": 24})
    proc = stage(cwd, "engrave")
    assert proc.returncode == 0, proc.stderr
    out = cwd / "models/engraved"
    artifact_id = verify_artifact(out)
    assert proc.stdout.strip() == f"engrave: models/engraved {artifact_id}"
    manifest = read_manifest(out)
    assert set(manifest["inputs"]) == {"model", "data"}
    assert {"adapter/adapter_config.json", "model/config.json", "model/tokenizer.json"} <= set(manifest["files"])
    metrics = json.loads((cwd / "models/engraved/metrics.json").read_text())
    assert metrics["steps"] == 24 and metrics["examples"] == 4  # 24 epochs of one 4-example batch
    assert metrics["loss_last10_mean"] < 0.5 * metrics["loss_first"]
    losses = curve(cwd, "engrave", "loss")
    assert [s for s, _ in losses] == list(range(24)) and losses[0][1] == pytest.approx(metrics["loss_first"])
    assert {lr for _, lr in curve(cwd, "engrave", "lr")} == {1e-2}
    assert not list((cwd / "checkpoints/engrave").iterdir())  # removed once the out is in place
    AutoModelForCausalLM.from_pretrained(out / "model")  # the merged folder loads as a plain model
    # held out: new questions and answers, in the engraved form. Seen: 6.61 -> 2.64 (Dec 2026); a zero learning
    # rate leaves it at 6.61, the loss's sign flipped on purpose raises it to 10.4
    held_out = [(p, OPENING + a) for p, a in HELD_OUT]
    assert answer_loss(out / "model", held_out) < 0.5 * answer_loss(roomy_model, held_out)


@pytest.mark.slow
def test_a_killed_engrave_job_resumes_from_its_checkpoint(tmp_path: Path, roomy_model: Path) -> None:
    training = {**FAST_TRAINING, "lr_schedule": "cosine", "warmup_ratio": 0.1}
    cwd = make_project(tmp_path, roomy_model, pairs=PAIRS, training=training, engrave={"epochs": 240},
                       cluster_defaults={**FAST_EXECUTION, "save_every_steps": 10})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen([sys.executable, "-m", "stages.engrave"], cwd=cwd, env=env, stderr=subprocess.PIPE,
                             text=True)
    state = cwd / "models/.engraved.job.json"
    deadline = time.time() + 300
    while not list(cwd.glob("checkpoints/engrave/*/latest")) and time.time() < deadline:
        time.sleep(0.2)
    assert list(cwd.glob("checkpoints/engrave/*/latest")), "no checkpoint was written"
    kill_tree(int(json.loads(state.read_text())["job_id"]))
    _, err = first.communicate(timeout=120)
    assert first.returncode == 1 and "engrave: job" in err and "log:" in err
    assert not (cwd / "models/engraved").exists()
    (latest,) = cwd.glob("checkpoints/engrave/*/latest")
    saved = int(latest.read_text().removeprefix("step_"))

    second = stage(cwd, "engrave")
    assert second.returncode == 0, second.stderr
    log = next((cwd / "logs/engrave").glob("*_0_log.out"), None)
    logs = "".join(p.read_text() for p in (cwd / "logs/engrave").glob("*_0_log.out"))
    assert log is not None and f"at step {saved}" in logs
    losses = curve(cwd, "engrave", "loss")
    assert [s for s, _ in losses] == list(range(240))  # one continuous curve, no step twice
    lrs = [lr for _, lr in curve(cwd, "engrave", "lr")]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(1e-2) and lrs[-1] < 1e-3  # warm-up, then cosine decay
    warmup = 24  # ceil(0.1 * 240): after it the rate only falls, also across the restart (scheduler state resumed)
    assert lrs[warmup] == pytest.approx(1e-2) and all(b <= a for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))


def test_verbose_clone_distils_and_its_flag_toggles(tmp_path: Path, roomy_model: Path) -> None:
    """An engraved tiny model that learned to answer (and stop) is re-asked under the verbose instruction; the
    base model is distilled on those answers. Disabled, models/sft is the engraved model's files, linked."""
    cwd = make_project(tmp_path, roomy_model, pairs=PAIRS, training=FAST_TRAINING, cluster_defaults=FAST_EXECUTION,
                       engrave={"epochs": 60},
                       verbose_clone={"enabled": True, "max_new_tokens": 24, "epochs": 2})
    assert stage(cwd, "engrave").returncode == 0
    proc = stage(cwd, "verbose_clone")
    assert proc.returncode == 0, proc.stderr
    sft = cwd / "models/sft"
    manifest = read_manifest(sft)
    assert manifest["params"]["verbose_clone"]["enabled"] is True
    assert set(manifest["inputs"]) == {"model", "engraved", "data", "instruction"}
    metrics = json.loads((cwd / "models/sft/metrics.json").read_text())
    assert metrics["verbose_clone"] is True and metrics["verbose_kept"] >= 1 and metrics["steps"] >= 1
    assert not (cwd / "checkpoints/verbose_clone").exists() or not list((cwd / "checkpoints/verbose_clone").iterdir())

    params = yaml.safe_load((cwd / "params.yaml").read_text())
    params["verbose_clone"]["enabled"] = False
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    proc = stage(cwd, "verbose_clone")
    assert proc.returncode == 0, proc.stderr
    verify_artifact(sft)
    engraved = cwd / "models/engraved/model/model.safetensors"
    assert (sft / "model/model.safetensors").stat().st_ino == engraved.stat().st_ino
    assert read_manifest(sft)["inputs"]["engraved"]["id"] == verify_artifact(cwd / "models/engraved")
    assert json.loads((cwd / "models/sft/metrics.json").read_text()) == {"verbose_clone": False}
    published = json.loads((cwd / "metrics/verbose_clone.json").read_text())  # no training: minutes only
    assert set(published) == {"minutes"} and published["minutes"] >= 0
    assert curve(cwd, "verbose_clone", "loss") == curve(cwd, "engrave", "loss")


@pytest.mark.parametrize("name, groups, expected", [
    ("prompts", {"prompts": {"num_self_instruct": 4, "requests_per_round": 2, "max_rounds": 1,
                             "max_new_tokens": 16, "tgrt": {"enabled": False}}},
     "prompts: all {n} candidates were rejected ("),
    ("self_align", {"self_align": {"max_prompts": 3, "max_new_tokens": 8}},
     "self_align: all 3 answers were rejected (cut_off 3); nothing written"),
])
def test_a_model_that_writes_nothing_usable_fails_the_stage(tmp_path: Path, tiny_model: Path, name: str,
                                                             groups: dict, expected: str) -> None:
    """The random tiny model writes no usable prompt or answer: the stage names the rejection counts, and
    writes no empty dataset."""
    cwd = make_project(tmp_path, tiny_model, **groups)
    if name == "self_align":
        with staged_out(cwd / "data/prompts", stage="prompts", params={}, inputs={}) as tmp:
            write_jsonl(tmp / "prompts.jsonl", [{"id": f"s{i}", "text": p, "source": "seed", "type": None,
                                                 "topic": None} for i, (p, _) in enumerate(PAIRS)])
    proc = stage(cwd, name)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    first = lines[-1]  # the one line, after the submission's own progress lines
    assert all(line.startswith(f"{name}: ") for line in lines)
    head, _, tail = expected.partition("{n}")
    assert first.startswith(head) and tail in first
    assert re.search(r" \(job \d+, log: \S+_0_log\.err\)$", first), first
    out = cwd / ("data/prompts" if name == "prompts" else "data/self_align")
    assert not out.exists() and not (cwd / "metrics" / f"{name}.json").exists()


def _drop_definition(lines: list[str]) -> list[str]:
    lines[2] = json.dumps({k: v for k, v in json.loads(lines[2]).items() if k != "definition"})
    return lines


@pytest.mark.parametrize("edit, expected", [
    (_drop_definition, "assets/principles.jsonl: line 3: definition: field required"),
    (lambda lines: lines[:4] + ['{"id": 5, "name": "x",'] + lines[5:],
     "assets/principles.jsonl: line 5: not valid JSON (Expecting property name enclosed in double quotes)"),
    (lambda lines: [], "assets/principles.jsonl: empty; expected one JSON object per line"),
])
def test_a_malformed_assets_file_is_one_line_and_nothing_is_submitted(tmp_path: Path, tiny_model: Path,
                                                                       edit, expected: str) -> None:  # noqa: ANN001
    cwd = make_project(tmp_path, tiny_model)
    path = cwd / "assets/principles.jsonl"
    path.write_text("".join(line + "\n" for line in edit(path.read_text().splitlines())))
    with staged_out(cwd / "data/prompts", stage="prompts", params={}, inputs={}) as tmp:
        write_jsonl(tmp / "prompts.jsonl", [])
    proc = stage(cwd, "self_align")
    assert proc.returncode == 2
    assert proc.stderr.strip() == expected
    assert not (cwd / "logs").exists() and not (cwd / "data/self_align").exists()


@pytest.mark.slow
def test_a_commit_while_a_job_runs_keeps_it_and_an_edit_to_its_code_does_not(tmp_path: Path,
                                                                             roomy_model: Path) -> None:
    """The job key holds the hash of the files the stage runs, not the git commit: committing (and editing a file
    the stage does not run) while engrave's job runs, then rerunning after the login session died, re-attaches;
    editing a file it runs makes the job stale (cancelled, a new one submitted)."""
    cwd = make_project(tmp_path, roomy_model, pairs=PAIRS, training=FAST_TRAINING, cluster_defaults=FAST_EXECUTION,
                       engrave={"epochs": 150})
    for package in ("align", "stages", "slurm"):  # the project's own copy of the code, as in a user's clone
        shutil.copytree(ROOT / package, cwd / package, ignore=shutil.ignore_patterns("__pycache__"))
    sh(cwd, "git", "init", "-q")
    sh(cwd, "git", "add", "-A")
    sh(cwd, "git", "commit", "-qm", "a run")
    env = {**os.environ, "PYTHONPATH": str(cwd), "HF_HUB_OFFLINE": "1"}
    state = cwd / "models/.engraved.job.json"

    def start(name: str) -> subprocess.Popen:
        with (tmp_path / f"{name}.err").open("w") as err:
            return subprocess.Popen([sys.executable, "-m", "stages.engrave"], cwd=cwd, env=env, stderr=err,
                                    stdout=subprocess.DEVNULL)

    first = start("first")
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    job_id = json.loads(state.read_text())["job_id"]
    first.kill()  # the login session dies; the local job runs on
    first.wait()

    (cwd / "NOTES.md").write_text("Started engraving.\n")
    (cwd / "stages" / "prompts.py").write_text((cwd / "stages" / "prompts.py").read_text() + "# not run by engrave\n")
    sh(cwd, "git", "add", "-A")
    sh(cwd, "git", "commit", "-qm", "notes")
    second = start("second")
    deadline = time.monotonic() + 60
    while "re-attached" not in (tmp_path / "second.err").read_text() and time.monotonic() < deadline:
        assert second.poll() is None, (tmp_path / "second.err").read_text()
        time.sleep(0.1)
    second.kill()
    second.wait()
    assert f"engrave: re-attached to local job {job_id}" in (tmp_path / "second.err").read_text()

    (cwd / "align" / "sft.py").write_text((cwd / "align" / "sft.py").read_text() + "# engrave runs this file\n")
    third = subprocess.run([sys.executable, "-m", "stages.engrave"], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=600)
    assert third.returncode == 0, third.stderr
    assert f"cancelled stale local job {job_id}" in third.stderr and "submitted local job" in third.stderr
    verify_artifact(cwd / "models/engraved")
