"""LoRA SFT as a stage's job, shared by `engrave` and `verbose_clone`: the number of steps from epochs, a dvclive
curve of loss and learning rate that stays continuous across restarts, checkpoints that survive a killed job,
and an out folder holding the adapter and the merged model the next stages load.

Out layout: `adapter/` (PEFT), `model/` (merged HF folder with tokenizer), `metrics.json`, MANIFEST.json.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from stages.artifacts import digest, staged_out, verify_artifact
from stages.params import Training
from stages.records import write_json
from stages.training import global_batch_size, merge_adapter, sft_job

CHECKPOINTS = Path("checkpoints")  # checkpoints/<stage>/<key>: kept until the out is in place (not a DVC out)
MODEL = "model"  # the merged HF folder inside an SFT out


class LiveCurve:
    """`on_step` for the training loop: one dvclive step per optimizer step (plots/metrics/<name>.tsv in
    `folder`), restarted from step 0 on every run, which the loop replays from its checkpoint first."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.live = None

    def __call__(self, step: int, metrics: dict) -> None:
        if self.live is None:
            from dvclive import Live

            self.live = Live(str(self.folder), resume=False, save_dvc_exp=False, dvcyaml=None)
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, value)
        self.live.next_step()


def checkpoint_dir(stage: str, key: dict) -> Path:
    """Where a stage's run keeps its checkpoints: one folder per params+inputs, so a changed run starts fresh
    and an interrupted identical run resumes."""
    return CHECKPOINTS / stage / digest(key)[:16]


def max_steps(examples: int, epochs: float, training: Training, world_size: int) -> int:
    return max(1, math.ceil(epochs * examples / global_batch_size(training, world_size)))


def job(stage: str, model: Path, pairs: list[tuple[str, str]], out: Path, live_dir: Path, ckpt_dir: Path,
        training: Training, epochs: float, max_prompt_tokens: int, max_answer_tokens: int, seed: int,
        params: dict, inputs: dict, metrics: dict) -> str | None:
    """Runs in every task of the allocation: train, then rank 0 writes the out; returns its artifact id (rank 0)."""
    steps = max_steps(len(pairs), epochs, training, int(os.environ.get("WORLD_SIZE", "1")))
    final_adapter = ckpt_dir / "adapter"
    result = sft_job(model, pairs, ckpt_dir, training, steps, adapter_dir=final_adapter, seed=seed,
                     max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_answer_tokens,
                     on_step=LiveCurve(live_dir))
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    losses = result["losses"]
    with staged_out(out, stage=stage, params=params, inputs=inputs) as tmp:
        shutil.copytree(final_adapter, tmp / "adapter")
        merge_adapter(model, tmp / "adapter", tmp / MODEL)
        write_json(tmp / "metrics.json", {
            **metrics, "examples": len(pairs), "steps": steps, "loss_first": losses[0], "loss_last": losses[-1],
            "loss_min": min(losses), "loss_last10_mean": sum(losses[-10:]) / len(losses[-10:]),
        })
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return verify_artifact(out)
