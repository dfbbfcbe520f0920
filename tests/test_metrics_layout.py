"""`dvc metrics show` and `dvc metrics diff` readable in a 160-character terminal (issue 22 part 7): every stage's
metrics as it writes them (its full metrics.json in its out, published through align/records.py, and evaluate's
headline scores through stages/evaluate.py), in the project's own dvc.yaml, printed by DVC itself. The values are
as wide as a real run's get (five significant digits, negative rewards, thousands of rows, every policy, system
messages on), so the widest table a run can print is the one checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.artifacts import MANIFEST
from align.health import VOCABULARY
from align.records import publish_metrics, write_json
from stages.evaluate import publish_scores
from tests.helpers import new_repo, sh

WIDTH = 160


def interval(x: float) -> str:
    return f"[{x - 0.123456:.3f}, {x + 0.123456:.3f}]"


def mean(name: str, x: float) -> dict:
    return {name: x, f"{name}_ci95": interval(x)}


def stage_metrics(x: float) -> dict[str, dict]:
    """Each stage's metrics.json as its job writes it (the detail included), values shifted by `x`."""
    dims = ("style", "background", "informativeness", "harmlessness")
    return {
        "benchmarks": {b: {"items": 817 + i} for i, b in enumerate(("hhh", "truthfulqa_mc", "truthfulqa_csv", "mt"))},
        "prompts": {"generated": 12345, "kept": 9876, "kept_share": 0.8000123 - x, "kept_self_instruct": 9000,
                    "kept_tgrt": 876, "total_prompts": 10051, "rejected": {"similar": 1200, "too_long": 300},
                    "rouge_l_nearest_mean": 0.4123456, "distinct_2": 0.7123456},
        "self_align": {"prompts": 10051, "kept": 9000, "kept_share": 0.8954321 - x, "rejected": {"empty": 51},
                       "answer_words_mean": 123.456789, "answer_words_p50": 120, "answer_words_p90": 240,
                       "answer_words_max": 512, "generated_tokens": 1234567, "prefix_chars": 9876},
        "engrave": {"examples": 9000, "steps": 1125, "loss_first": 2.3456789, "loss_last": 1.2345678 + x,
                    "loss_min": 1.1, "loss_last10_mean": 1.3},
        "verbose_clone": {"verbose_clone": True, "answers": 9000, "examples": 8999, "steps": 1125,
                          "loss_first": 2.3456789, "loss_last": 1.2345678 + x, "loss_min": 1.1,
                          "loss_last10_mean": 1.3},
        "system_messages": {"enabled": True, "train_prompts": 1800, "eval_prompts": 200,
                            "combinations": {"train": 200, "eval": 40, "space": 240}, "model_written_share": 0.61,
                            "model_rejected": {"empty": 3}, "message_chars_mean": 312.5},
        "sample_pairs": {"prompts": 2000, "pairs": 1987, "system_message_pairs": 1800, "dropped": {"same": 13},
                         "response_tokens_mean": 180.123456, "cut_off_share": 0.123456},
        "label_preferences": {"pairs": 1987, "principles": 8, "tie_rate": 0.3456789 + x,
                              "agreement": {f"principle_{i}": 0.5 for i in range(8)}, "position_bias": -0.123456,
                              "system_messages": {"pairs": 1800, **{d: {"decided": 0.5} for d in dims}}},
        "train_rm": {"held_out": {"accuracy": 0.7123456 + x, "examples": 200},
                     "negation": {"flip_rate": 0.91, "label_agreement": 0.9, "cases": 64},
                     "labels": {"decided_share": 0.8}, "train": {"examples": 15894, "loss_last10_mean": 0.5123456 - x,
                                                                  "steps": 993, "loss_first": 0.693}},
        "policy": {"algorithm": "ppo", "iterations": 120, "reward_raw_first": -0.6234567,
                   "reward_raw_last": -0.5123456 + x, "kl_last": 0.0123456 + x, "entropy_last": 2.1},
        "evaluate": {"scoring": "sum", **{policy: {
            "hhh": {**mean("acc", 0.5666667 + x), "items": 221},
            "truthfulqa": {**mean("mc1", 0.2666667 + x), **mean("p_true", 0.3123456 + x), "items": 817},
            "truthfulqa_csv": {**mean("mc1", 0.2466667 + x), **mean("mc2", 0.4123456 + x), "items": 817,
                               "category": {f"category_{i}": mean("mc1", 0.3) for i in range(38)}},
            "mtbench": {**mean("cut_off_share", 0.1), "judge": {**mean("win_rate", 0.5416667 + x),
                                                                **mean("position_bias", 0.3333333)},
                        "target_rm": {**mean("mean_reward", -0.123456), **mean("win_rate_vs_base", 0.7916667 + x)}},
            "system_messages": {"judge": {**mean("win_rate", 0.6123456 + x), **mean("position_bias", 0.25)},
                                "target_rm": {d: mean("win_rate", 0.55 + x) for d in (*dims, "overall")}},
        } for policy in ("base", "sft", "policy")}},
    }


def publish(repo: Path, x: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """metrics/ as the stages leave it: each stage's out (metrics.json + manifest) published, evaluate's scores."""
    monkeypatch.chdir(repo)
    for stage, metrics in stage_metrics(x).items():
        out = repo / "outs" / stage
        write_json(out / "metrics.json", metrics)
        write_json(out / MANIFEST, {"wall_seconds": 12345.6})
        publish_metrics(out, stage)
    publish_scores(stage_metrics(x)["evaluate"])


def widest(text: str) -> int:
    return max(len(line) for line in text.splitlines())


def test_metrics_show_and_diff_fit_a_160_column_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = new_repo(tmp_path / "repo", {})
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    (repo / ".gitignore").write_text("outs/\n")
    publish(repo, 0.0, monkeypatch)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "first run")
    shown = sh(repo, "dvc", "metrics", "show").stdout
    assert "metrics/evaluate/mtbench_judge.json" in shown and "metrics/train_rm.json" in shown
    columns = shown.splitlines()[0].split()[1:]  # after "Path": the stages' shared vocabulary and the policies
    assert set(columns) == {*VOCABULARY, "base", "sft", "policy"}
    assert widest(shown) <= WIDTH, shown
    publish(repo, 0.0123, monkeypatch)
    sh(repo, "git", "commit", "-qam", "second run")
    diff = sh(repo, "dvc", "metrics", "diff", "HEAD~1", "HEAD").stdout
    assert "metrics/evaluate/hhh_acc.json" in diff and "metrics/policy.json" in diff  # changed values are listed
    assert widest(diff) <= WIDTH, diff
