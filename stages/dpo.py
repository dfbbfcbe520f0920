"""DPO (Rafailov et al. 2023), the alternative to PPO (`policy.algorithm: dpo`): the SFT policy + LoRA trained
directly on the labelled synthetic pairs, no reward model. Each instance is a pair under a principle subset drawn
as for the reward model (align/reward.py: some principles negated, the label by `dpo.label_rule`, a share
`dpo.label_noise` flipped), and the policy sees that subset as the system message of the chat, so the same
preferences teach it to follow stated principles. A system-message pair (stage `system_messages`) is shown under
its own system message. The reference is the SFT policy itself: the same model with the adapter disabled.

Loss: -log sigmoid(beta x ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))), summed log-probabilities of
the response tokens; chosen and rejected in one forward pass. Runs on the training base (DeepSpeed, LoRA,
checkpoints, resume, dvclive: loss, accuracy, margin). Out (models/policy): adapter/, model/, metrics.json.
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align import losses, paths, runner
from align.artifacts import input_refs
from align.assets import PreferencePrinciple, load_jsonl, value_descriptions
from align.errors import UserError
from align.models import padding_id
from align.params import Dpo, TrainingRun
from align.paths import MODEL
from align.reward import guide_text, preference_examples, principle_scales, read_preferences
from align.training import (
    Batch, LiveCurve, checkpoint_dir, collate, finish_training, length_grouped_batches, step_count,
    tokenize_pair, train,
)

STAGE = "policy"
OUT = paths.POLICY
SFT = paths.SFT
PREFERENCES = paths.PREFERENCES
PRINCIPLES = paths.PREFERENCE_PRINCIPLES
SPACE = paths.PREFERENCE_SPACE
LIVE = Path("dvclive/policy")


def sequence_logprobs(model: Any, batch: Batch) -> torch.Tensor:
    """Per row, the summed log-probability of its labelled (response) tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    picked = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def dpo_loss(beta: float, model: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss (align/losses.py `dpo`), mean over the pairs of a batch of chosen rows followed by as many
    rejected rows; the reference's log-probabilities come from the same model with the LoRA adapter disabled."""
    peft = model.module if hasattr(model, "module") else model
    with torch.no_grad(), peft.disable_adapter():
        reference = sequence_logprobs(model, batch)
    policy = sequence_logprobs(model, batch)
    half = policy.shape[0] // 2
    loss, margin = losses.dpo(policy[:half], policy[half:], reference[:half], reference[half:], beta)
    return loss.mean(), {"accuracy": (margin > 0).float().mean(), "margin": margin.mean()}


def collate_sides(examples: list[dict], pad_id: int) -> Batch:
    """Chosen rows then rejected rows in one right-padded batch."""
    return collate([e["chosen"] for e in examples] + [e["rejected"] for e in examples], pad_id)


def longer_side(example: dict) -> tuple[int]:
    """The width `collate_sides` pads a pair's two rows to, what its micro-batch is grouped by."""
    return (max(len(example["chosen"]["input_ids"]), len(example["rejected"]["input_ids"])),)


@dataclass(frozen=True)
class DpoJob:
    """The job's arguments, sent to the allocation with it."""
    model: Path  # the SFT policy: the LoRA trains on it, and it is the reference with the adapter disabled
    examples: list[dict]  # pairs under their principle subsets (`preference_examples`)
    cfg: Dpo
    training: TrainingRun  # `training` with dpo's learning rate and LoRA size, and the job's execution settings
    seed: int
    ckpt_dir: Path
    params: dict  # the params subset and the input refs: the manifest records both
    inputs: dict


def job(args: DpoJob) -> str | None:
    """Runs in every task of the allocation: DPO, then rank 0 writes the out."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    pad_id = padding_id(tokenizer)
    tokenized = [{side: tokenize_pair(tokenizer, e["prompt"], e[side], args.cfg.max_prompt_tokens,
                                      args.cfg.max_response_tokens, system=guide_text(e["guide"]))
                  for side in ("chosen", "rejected")} for e in args.examples]
    batches = length_grouped_batches(tokenized, args.training.micro_batch_size, args.seed,
                                     functools.partial(collate_sides, pad_id=pad_id),
                                     [longer_side(e) for e in tokenized], args.cfg.length_group)
    steps = step_count(len(args.examples), args.cfg.epochs, args.training)
    adapter = args.ckpt_dir / "adapter"
    result = train(args.model, batches, functools.partial(dpo_loss, args.cfg.beta), args.ckpt_dir, args.training,
                   steps, adapter_dir=adapter, seed=args.seed, on_step=LiveCurve(LIVE))
    losses, accuracy = result["losses"], [s["accuracy"] for s in result["stats"]]
    return finish_training(OUT, stage=STAGE, params=args.params, inputs=args.inputs, adapter=adapter,
                           ckpt_dir=args.ckpt_dir, base=args.model, write=lambda _: {
        "algorithm": "dpo", "examples": len(args.examples), "steps": steps, "loss_first": losses[0],
        "loss_last10_mean": statistics.fmean(losses[-10:]), "accuracy_last10_mean": statistics.fmean(accuracy[-10:]),
    })


def main() -> None:
    params = runner.stage_params(STAGE)
    cfg = params.dpo
    principles = {p.id: p for p in load_jsonl(PRINCIPLES, PreferencePrinciple)}
    descriptions = value_descriptions(SPACE)  # bad assets fail before the inputs are hashed
    inputs = input_refs({"policy": SFT, "preferences": PREFERENCES, "principles": PRINCIPLES, "space": SPACE})
    rows = read_preferences(PREFERENCES / "preferences.jsonl", set(principles) | set(descriptions))
    examples = preference_examples(rows, principles, descriptions, cfg.subsets_per_pair, cfg, principle_scales(rows),
                                   params.seed)
    if not examples:
        raise UserError(f"{PREFERENCES}/preferences.jsonl: no pair is preferred under any principle (every label is "
                        f"a tie); nothing to train DPO on")
    runner.warn_unread(STAGE, {"seed", "training", "policy", "dpo"}, "policy.algorithm dpo")
    training = TrainingRun.of(params.training, params.cluster.policy, STAGE, learning_rate=cfg.learning_rate,
                              lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha)
    subset = {"seed": params.seed, "training": params.training.model_dump(), "policy": params.policy.model_dump(),
              "dpo": cfg.model_dump()}
    ckpt_dir = checkpoint_dir("dpo", {"params": subset, "inputs": inputs})
    fn = functools.partial(job, DpoJob(model=SFT / MODEL, examples=examples, cfg=cfg, training=training,
                                       seed=params.seed, ckpt_dir=ckpt_dir, params=subset, inputs=inputs))
    runner.submit_stage(STAGE, OUT, fn, params.cluster.policy, params.cluster, subset, inputs)


if __name__ == "__main__":
    import sys

    sys.exit(runner.run(main))
