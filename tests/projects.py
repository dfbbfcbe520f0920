"""Project folders the stage tests run in: params.yaml (the repo's, with some groups changed) and the outs of the
stages before the one under test, made from the tiny model and small hand-written data. Shared here so that no
test module imports another (tests/test_structure.py checks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from align.artifacts import staged_out
from align.assets import PreferencePrinciple, load_jsonl
from align.records import write_jsonl
from align.reward import CONFIG_FILE, TEMPLATE_FILE
from align.training import lora_model
from tests.benchmark_files import add_benchmarks_out
from tests.conftest import ROOT
from tests.helpers import FAST_EXECUTION, FAST_TRAINING, merge_into, repo_params, sh, training_run

PROMPTS = ["What is the capital of France?", "Add 1 and 2.", "What colour is the quick fox?",
           "Say something helpful.", "Name a number.", "Write a function that adds two numbers."]
SAMPLED_PAIRS = [  # data/pairs of `salmon_project`
    {"id": "p1", "prompt": "What is the capital of France?", "response_a": "Paris.",
     "response_b": "The capital of France is Paris, a city on the Seine.", "finish_a": "stop", "finish_b": "stop"},
    {"id": "p2", "prompt": "Add 1 and 2.", "response_a": "3", "response_b": "1 2 3", "finish_a": "stop",
     "finish_b": "length"},
]
PRINCIPLES = {p.id: p for p in load_jsonl(ROOT / "assets/preference_principles.jsonl", PreferencePrinciple)}
SHORT_LONG = [  # (prompt, short answer, long answer)
    ("What is the capital of France?", "Paris.", "The capital of France is Paris, and Paris is a city in France."),
    ("Add 1 and 2.", "3", "1 and 2 and so on: 1 2 3, so the answer is 3 and 3 it is."),
    ("What colour is the quick fox?", "brown", "The quick brown fox is brown, the quick fox jumps and it is brown."),
    ("Say something helpful.", "Be kind.", "An assistant answers questions helpfully, honestly and harmlessly."),
    ("Name a number.", "7", "1 2 3 4 5 6 7 8 9 10 and so on, numbers and words together."),
    ("Write a function that adds two numbers.", "def add(a, b): return a + b",
     "def add(a, b):\n    return a + b\n\nThe function add takes a and b and returns a + b."),
] * 2
SMALL_EVALUATE = {"max_items": 6, "mt_bench_questions": 2, "max_new_tokens": 6}
TINY_RL = {"iterations": 3, "rollout_batch_size": 4, "step_batch_size": 2, "epochs": 2, "max_new_tokens": 8,
           "learning_rate": 1e-2, "lora_r": 4, "lora_alpha": 8,
           "eval_prompts": 0}  # the pool of 5 prompts stays whole; tests that check the held-out comparison set it
TINY_RL_EXECUTION = {"micro_batch_size": 1, "save_every_steps": 1, "score_batch_size": 4}


def make_project(cwd: Path, model: Path, *, pairs: list[tuple[str, str]] | None = None,
                 cluster_defaults: dict | None = None, **groups: dict) -> Path:
    """A project folder: params.yaml (repo defaults + `groups`, `cluster_defaults` over cluster.defaults), assets/,
    models/base from `model`, an empty system_messages out, data/benchmarks from the tests' small files, and, with
    `pairs`, a self_align out holding them. Float32 unless `groups` say otherwise (tests.helpers.FLOAT32)."""
    raw = repo_params()
    raw["generation"].update(backend="hf")
    raw["cluster"].update(executor="local", log_dir=str(cwd / "logs"))
    raw["cluster"]["policy"].pop("micro_batch_size")  # the repo's fits its rl.step_batch_size; a test's, from defaults
    merge_into(raw, {**groups, "cluster": {**groups.get("cluster", {}), "defaults": cluster_defaults or {}}})
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "params.yaml").write_text(yaml.safe_dump(raw))
    shutil.copytree(ROOT / "assets", cwd / "assets")
    with staged_out(cwd / "models/base", stage="import_model", params={}, inputs={}) as tmp:
        shutil.copytree(model, tmp, dirs_exist_ok=True)
    with staged_out(cwd / "data/system_messages", stage="system_messages", params={}, inputs={}) as tmp:
        write_jsonl(tmp / "train.jsonl", [])  # as the stage writes it when disabled
        write_jsonl(tmp / "eval.jsonl", [])
    add_benchmarks_out(cwd)
    if pairs is not None:
        with staged_out(cwd / "data/self_align", stage="self_align", params={}, inputs={}) as tmp:
            write_jsonl(tmp / "sft.jsonl", [{"id": f"p{i}", "prompt": p, "answer": a, "source": "seed"}
                                            for i, (p, a) in enumerate(pairs)])
    return cwd


def write_prompts(cwd: Path) -> None:
    """data/prompts holding PROMPTS, ids p0, p1, … (make_project's SFT rows use the same ids for the same texts)."""
    with staged_out(cwd / "data/prompts", stage="prompts", params={}, inputs={}) as tmp:
        write_jsonl(tmp / "prompts.jsonl", [{"id": f"p{i}", "text": t, "source": "seed", "type": None, "topic": None}
                                            for i, t in enumerate(PROMPTS)])


def salmon_project(tmp_path: Path, model: Path, **groups: dict) -> Path:
    """A project with models/sft (the tiny model as the SFT policy), prompts, SFT data and pairs."""
    cwd = make_project(tmp_path, model, pairs=[(PROMPTS[0], "Paris."), (PROMPTS[1], "3")], **groups)
    write_prompts(cwd)
    with staged_out(cwd / "models/sft", stage="verbose_clone", params={}, inputs={}) as tmp:
        shutil.copytree(model, tmp / "model")
    with staged_out(cwd / "data/pairs", stage="sample_pairs", params={}, inputs={}) as tmp:
        write_jsonl(tmp / "pairs.jsonl", SAMPLED_PAIRS)
    return cwd


def preference_rows() -> list[dict]:
    """Pairs where Concise prefers the short answer and Comprehensive the long one; the rest tie. The short
    answer is `a` in even rows, `b` in odd ones, so position says nothing. Scores, read as favouring the preferred
    answer in both orders: Concise (2, 1), Comprehensive (0.5, 1.5), the rest (0.5, -0.5) (the orders disagree).
    Over the file Concise's variance is 2.5 and Comprehensive's 1.25, so normalised Concise scores 1.5 / 2.5 = 0.6
    for the short answer and Comprehensive 1 / 1.25 = 0.8 for the long one: Comprehensive dominates."""
    rows = []
    for i, (prompt, short, long) in enumerate(SHORT_LONG):
        a, b = (short, long) if i % 2 == 0 else (long, short)
        short_side, long_side = ("a", "b") if i % 2 == 0 else ("b", "a")
        labels = {pid: "tie" for pid in PRINCIPLES}
        labels.update(concise=short_side, comprehensive=long_side)
        sign = 1 if i % 2 == 0 else -1  # > 0: favours a (score_ab), as the judge writes score_ba: favours b
        scores = {pid: [0.5, 0.5] for pid in PRINCIPLES}
        scores.update(concise=[sign * 2.0, -sign * 1.0], comprehensive=[-sign * 0.5, sign * 1.5])
        rows.append({"id": f"q{i}", "prompt": prompt, "response_a": a, "response_b": b, "scores": scores,
                     "labels": labels})
    return rows


def rm_project(tmp_path: Path, model: Path, rows: list[dict] | None = None, **groups: dict) -> Path:
    """A project with models/sft (the model as the SFT policy) and labelled preferences."""
    groups = {"training": FAST_TRAINING,
              "rm": {"learning_rate": 3e-3, "lora_r": 8, "lora_alpha": 16, "epochs": 2, "eval_share": 0.34},
              **groups}
    cwd = make_project(tmp_path, model, **{"cluster_defaults": {**FAST_EXECUTION, "save_every_steps": 5}, **groups})
    with staged_out(cwd / "models/sft", stage="verbose_clone", params={}, inputs={}) as tmp:
        shutil.copytree(model, tmp / "model")
    with staged_out(cwd / "data/preferences", stage="label_preferences", params={}, inputs={}) as tmp:
        write_jsonl(tmp / "preferences.jsonl", preference_rows() if rows is None else rows)
    return cwd


def add_policy_outs(cwd: Path, model: Path) -> None:
    """models/sft and models/policy (the tiny model as the SFT and the final policy) and models/rm (an
    untrained reward model on it)."""
    for out, stage_name in (("models/sft", "verbose_clone"), ("models/policy", "ppo")):
        with staged_out(cwd / out, stage=stage_name, params={}, inputs={}) as tmp:
            shutil.copytree(model, tmp / "model")
    with staged_out(cwd / "models/rm", stage="train_rm", params={}, inputs={}) as tmp:
        lora_model(model, training_run(lora_r=4, lora_alpha=8), seed=0, head="reward").save_pretrained(tmp / "adapter")
        shutil.copy(ROOT / "assets/rm_prompt.txt", tmp / TEMPLATE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps({"max_prompt_tokens": 64, "max_response_tokens": 64}))


def ppo_project(tmp_path: Path, model: Path, rm: Path | None = None, **groups: dict) -> Path:
    """A project with models/sft (`model`), models/rm (an untrained RM, or `rm`'s out), prompts and SFT data."""
    groups = {"training": FAST_TRAINING, "rl": TINY_RL, "cluster_defaults": TINY_RL_EXECUTION, **groups}
    cwd = make_project(tmp_path, model, pairs=[(PROMPTS[0], "Paris.")], **groups)
    add_policy_outs(cwd, model)
    shutil.rmtree(cwd / "models/policy")  # what the stage writes
    if rm is not None:
        shutil.rmtree(cwd / "models/rm")
        shutil.copytree(rm, cwd / "models/rm")
    write_prompts(cwd)
    return cwd


def slurm_project(tmp_path: Path, tiny_model: Path) -> Path:
    """A project folder whose params.yaml imports the tiny model through the slurm executor, in float32 (the
    fault suite sizes a full disk by the float32 folders)."""
    raw = repo_params()
    raw["model"]["base"] = str(tiny_model)
    raw["cluster"]["executor"] = "slurm"
    raw["cluster"]["log_dir"] = str(tmp_path / "logs")
    raw["cluster"]["import_model"] = {"partition": "cpu", "cpus_per_task": 1, "mem_gb": 4, "time_min": 10}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path


def policy_repo(folder: Path, model: Path, **groups: dict) -> Path:
    """A git + DVC repository holding the project code, a dvc.yaml of the `policy` stage alone and its inputs
    committed (`ppo_project`'s; a queued experiment starts from a commit: untracked inputs would not be in it)."""
    cwd = ppo_project(folder, model, **groups)
    for name in ("stages", "align", "slurm"):
        shutil.copytree(ROOT / name, cwd / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".gitignore", cwd / ".gitignore")
    policy = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["policy"]
    policy["deps"] = [d for d in policy["deps"] if (cwd / d).exists()]
    (cwd / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"policy": policy}}, sort_keys=False))
    sh(cwd, "git", "init", "-q")
    sh(cwd, "dvc", "init", "-q")
    sh(cwd, "git", "add", "-A")
    sh(cwd, "git", "add", "-f", "models", "data")  # the policy stage's inputs, as upstream stages left them
    sh(cwd, "git", "commit", "-qm", "inputs in place")
    return cwd
