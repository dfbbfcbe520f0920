"""LoRA SFT as a stage's job, shared by `engrave` and `verbose_clone`: the number of steps from epochs, a dvclive
curve of loss and learning rate that stays continuous across restarts, checkpoints that survive a killed job,
and an out folder holding the adapter and the merged model the next stages load.

Out layout: `adapter/` (PEFT), `model/` (merged HF folder with tokenizer), `metrics.json`, MANIFEST.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from align.params import TrainingRun
from align.training import LiveCurve, finish_training, sft_job, step_count


@dataclass(frozen=True)
class SftJob:
    """The job's arguments, sent to the allocation with it."""
    stage: str
    model: Path  # the model the LoRA trains on, and the base it is merged into
    pairs: list[tuple[str, str]]  # (query, answer)
    out: Path
    live_dir: Path  # the dvclive folder of the training curve
    ckpt_dir: Path
    training: TrainingRun  # the stage's training params and its job's execution settings
    epochs: float
    max_prompt_tokens: int
    max_answer_tokens: int
    seed: int
    params: dict  # the params subset and the input refs: the manifest records both
    inputs: dict
    metrics: dict = field(default_factory=dict)  # written into metrics.json beside the training's own


def job(args: SftJob) -> str | None:
    """Runs in every task of the allocation: train, then rank 0 writes the out; returns its artifact id (rank 0)."""
    steps = step_count(len(args.pairs), args.epochs, args.training)
    final_adapter = args.ckpt_dir / "adapter"
    result = sft_job(args.model, args.pairs, args.ckpt_dir, args.training, steps, adapter_dir=final_adapter,
                     seed=args.seed, max_prompt_tokens=args.max_prompt_tokens,
                     max_response_tokens=args.max_answer_tokens, on_step=LiveCurve(args.live_dir))
    losses = result["losses"]
    return finish_training(args.out, stage=args.stage, params=args.params, inputs=args.inputs, adapter=final_adapter,
                           ckpt_dir=args.ckpt_dir, base=args.model, write=lambda _: {
        **args.metrics, "examples": len(args.pairs), "steps": steps, "loss_first": losses[0], "loss_last": losses[-1],
        "loss_min": min(losses), "loss_last10_mean": sum(losses[-10:]) / len(losses[-10:]),
    })
