"""The models of an RL job, built in one place.

Roles: the policy (the SFT model + a trainable LoRA adapter, a DeepSpeed engine); the reference (the same model with
the adapter disabled: no second copy); PPO's value model (the RM's trunk with the RM adapter folded in, and its
scalar head, + a LoRA of its own: a second engine); the reward model (frozen, `RewardScorer`); the engine the
rollouts sample from. A recipe (stages/ppo.py) reads them from `Roles` and never builds one itself.

The trainer roles live in every trainer rank, the policy and the value model data-parallel over the ranks, the
reward model whole or spread over them (`shard_scorers`). The engine is where `cluster.policy.placement` puts it
(align/placement.py): colocated, the rank's own `Generator` (vLLM, or transformers); split, engines on nodes of their
own, reached through `RemoteEngine`. Either answers `sample(texts, sampling, adapted)` alike.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align.generation import Generator
from align.params import Engine, TrainingRun
from align.placement import Layout, LocalEngine, RemoteEngine
from align.precision import torch_dtype
from align.reward import RewardScorer
from align.training import checkpointed, lora_config, lora_model, make_engine, reward_trunk
from slurm import preemption


@dataclass(frozen=True)
class RoleSpec:
    """What the roles are built from (picklable: made on the login node, read in every rank)."""

    sft_dir: Path  # the SFT model: the policy's and the reference's base, the generation engine's weights
    rm_dir: Path  # the reward model's out: its adapter and template (and the value model's start)
    training: TrainingRun  # LoRA, learning rate, schedule and the job's execution settings for both engines
    engine: Engine  # the generation backend and its settings
    score_batch_size: int  # RM rows per forward pass
    shard_scorers: bool  # the reward model spread over the ranks (ZeRO-3): `RewardScorer.score` is collective
    value_model: bool  # PPO's critic, trained beside the policy
    merge_adapters: bool  # the engine folds the current adapter into its weights (rl.rollout_adapter: merged)
    layout: Layout  # where the engine runs
    rollout_adapter: Path  # colocated: the folder the current adapter goes to its engine through
    timeout_min: float  # split: how long a trainer waits for the engines to start (cluster.policy.collective_timeout_min)


@dataclass
class Roles:
    """The roles of one trainer rank, built by `build_roles`; closing it stops the generation engine."""

    policy: Any  # DeepSpeed engine over the SFT model + LoRA
    value: Any | None  # DeepSpeed engine over the value model, None without a critic
    reward: RewardScorer
    engine: LocalEngine | RemoteEngine

    def reference(self) -> AbstractContextManager:
        """The reference policy for a block: the policy with its adapter disabled."""
        return self.policy.module.disable_adapter()

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Roles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_roles(spec: RoleSpec, seed: int, rank: int, world: int, total_steps: int) -> Roles:
    """Every role of trainer rank `rank` (call `training.init_distributed` first): the policy and value engines over
    `world` ranks with their learning rate scheduled over `total_steps` optimizer steps, their LoRA initialised from
    `seed` (the same on every rank and every rerun); then the reward model; then the generation engine - colocated,
    started here with the memory the others left; split, joined on the engine nodes."""
    training = spec.training
    policy = make_engine(without_dropout(lora_model(spec.sft_dir, training, seed)), training, world,
                         total_steps=total_steps)
    value = make_engine(without_dropout(value_model(spec.sft_dir, spec.rm_dir, training, seed)), training, world,
                        total_steps=total_steps) if spec.value_model else None
    reward = RewardScorer(spec.sft_dir, spec.rm_dir, batch_size=spec.score_batch_size, precision=training.precision,
                          shard=spec.shard_scorers)
    if spec.layout.split:
        engine: LocalEngine | RemoteEngine = RemoteEngine(spec.sft_dir, spec.layout, rank, policy, spec.timeout_min)
    else:
        with preemption.shielded():  # vLLM's engine process would die of SLURM's signals before the next safe point
            engine = LocalEngine(Generator(spec.sft_dir, spec.engine, lora_rank=training.lora_r,
                                           merge_adapters=spec.merge_adapters, sleep_mode=True), policy,
                                 spec.rollout_adapter)
    return Roles(policy=policy, value=value, reward=reward, engine=engine)


def value_model(sft_dir: Path, rm_dir: Path, training: TrainingRun, seed: int) -> torch.nn.Module:
    """The RM with its adapter folded into the trunk, plus a fresh LoRA of its own; its head trains too."""
    from peft import PeftModel, get_peft_model

    rm = PeftModel.from_pretrained(reward_trunk(sft_dir, torch_dtype(training.precision)), str(rm_dir / "adapter"))
    torch.manual_seed(seed + 1)
    return get_peft_model(checkpointed(rm.merge_and_unload(), training), lora_config(training, "SEQ_CLS"))


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every dropout module in eval mode (the model comes from `from_pretrained` in it, but PEFT makes
    its LoRA dropouts in training mode): a sample's log-probabilities before the update, the reference's and the
    update's must come from one function, or the ratio and the KL measure dropout noise. TRL's PPOTrainer turns
    dropout off in its models for the same reason."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    return model
