"""LoRA SFT as a stage's job, shared by `engrave` and `verbose_clone`: the number of steps from epochs, a dvclive
curve of loss and learning rate that stays continuous across restarts, checkpoints that survive a killed job,
and an out folder holding the adapter and the merged model the next stages load.

Out layout: `adapter/` (PEFT), `model/` (merged HF folder with tokenizer), `metrics.json`, MANIFEST.json.
"""

from __future__ import annotations

import os
from pathlib import Path

from align.params import Training
from align.training import LiveCurve, finish_training, sft_job, step_count


def job(stage: str, model: Path, pairs: list[tuple[str, str]], out: Path, live_dir: Path, ckpt_dir: Path,
        training: Training, epochs: float, max_prompt_tokens: int, max_answer_tokens: int, seed: int,
        params: dict, inputs: dict, metrics: dict) -> str | None:
    """Runs in every task of the allocation: train, then rank 0 writes the out; returns its artifact id (rank 0)."""
    steps = step_count(len(pairs), epochs, training, int(os.environ.get("WORLD_SIZE", "1")))
    final_adapter = ckpt_dir / "adapter"
    result = sft_job(model, pairs, ckpt_dir, training, steps, adapter_dir=final_adapter, seed=seed,
                     max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_answer_tokens,
                     on_step=LiveCurve(live_dir))
    losses = result["losses"]
    return finish_training(out, stage=stage, params=params, inputs=inputs, adapter=final_adapter, ckpt_dir=ckpt_dir,
                           base=model, write=lambda _: {
        **metrics, "examples": len(pairs), "steps": steps, "loss_first": losses[0], "loss_last": losses[-1],
        "loss_min": min(losses), "loss_last10_mean": sum(losses[-10:]) / len(losses[-10:]),
    })
