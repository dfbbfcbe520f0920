"""The few figures per stage that `dvc metrics show` prints (metrics/<stage>.json), drawn from the stage's full metrics
(<out>/metrics.json, which stays in the out with every detail: per principle, per dimension, per category).

DVC prints one table: a row per metrics file and a column per distinct key across all of them, so each new key
widens every run's table. The stages therefore share one small vocabulary, which keeps `dvc metrics show` and
`dvc metrics diff` within a 160-character terminal (tests/test_metrics_layout.py):
- minutes: wall time of the job that wrote the out (from its manifest), every stage
- rows: the rows (prompts, answers, pairs, examples, items) the stage wrote or trained on
- kept: of what the stage generated, the share it kept (label_preferences: the share of labels decided, not a tie)
- loss: training loss at the end (last step; mean of the last 10 where the stage logs that)
- acc: preference accuracy, held out (train_rm) or over the last 10 steps (DPO)
- reward: PPO (GRPO, RLOO): the RM reward the trained policy gains over the SFT policy on held-out prompts (> 0: RL
  raised what it optimised; the last iteration's raw reward where `rl.eval_prompts` is 0)
- kl: PPO's KL to the SFT policy in the last iteration
Figures are rounded to 3 decimals (minutes to 2): the table is for reading; the out keeps the exact values.
"""

from __future__ import annotations

from typing import Callable

VOCABULARY = ("minutes", "rows", "kept", "loss", "acc", "reward", "kl")


def _policy(m: dict) -> dict:
    if m.get("algorithm") == "dpo":
        return {"rows": m["examples"], "loss": m["loss_last10_mean"], "acc": m["accuracy_last10_mean"]}
    reward = m["held_out"]["reward_gain"] if m.get("held_out") else m["reward_raw_last"]
    return {"rows": m["iterations"], "reward": reward, "kl": m["kl_last"]}


FIGURES: dict[str, Callable[[dict], dict]] = {
    "benchmarks": lambda m: {"rows": sum(b["items"] for b in m.values())},
    "prompts": lambda m: {"rows": m["total_prompts"], "kept": m["kept_share"]},
    "self_align": lambda m: {"rows": m["kept"], "kept": m["kept_share"]},
    "engrave": lambda m: {"rows": m["examples"], "loss": m["loss_last"]},
    "verbose_clone": lambda m: {"rows": m["examples"], "loss": m["loss_last"]} if m.get("verbose_clone") else {},
    "system_messages": lambda m: {"rows": m["train_prompts"] + m["eval_prompts"]} if m.get("enabled") else {},
    "sample_pairs": lambda m: {"rows": m["pairs"], "kept": m["pairs"] / m["prompts"]},
    "label_preferences": lambda m: {"rows": m["pairs"], "kept": 1 - m["tie_rate"]},  # labels not a tie
    "train_rm": lambda m: {"rows": m["train"]["examples"], "loss": m["train"]["loss_last10_mean"],
                           "acc": m["held_out"]["accuracy"]},
    "policy": _policy,
    "evaluate": lambda m: {},  # its scores: metrics/evaluate/ (stages/evaluate.py `publish_scores`)
}


def health(stage: str, metrics: dict, wall_seconds: float | None) -> dict:
    """metrics/<stage>.json's content: the stage's figures (`FIGURES`, or none for a stage not listed) and minutes."""
    figures = FIGURES.get(stage, lambda m: {})(metrics)
    rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}
    return {"minutes": None if wall_seconds is None else round(wall_seconds / 60, 2), **rounded}
