"""The RL algorithms of the policy stage as one table (`ALGORITHMS`: what each needs and which parts it takes),
and the arithmetic of those parts: per-token rewards with a KL penalty to the reference policy, generalised
advantage estimation and whitening (PPO: Schulman et al. 2017, Ziegler et al. 2019 for language), the adaptive KL
coefficient, GRPO's group-normalised advantage (Shao et al. 2024) and RLOO's leave-one-out baseline (Ahmadian et
al. 2024). The losses themselves are in align/losses.py. Tensors are [batch, response tokens] with a 0/1 mask for
the padding after each response; a group is `group_size` consecutive rows (one prompt's samples). Every tensor a
function makes is on its inputs' device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from align.errors import UserError
from align.params import Ppo, Rl


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std on the unmasked tokens, 0 elsewhere (mean and variance given: over every rank's batch)."""
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl): -kl_coef x (log pi - log pi_ref) at every response token, plus the sequence's score on its
    last token; kl is the per-token estimate log pi - log pi_ref (masked)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.sum(dim=1).long().clamp(min=1) - 1
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores.to(rewards)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation, backwards over each response; the value after
    the last token is 0 (the episode ends there)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the unmasked tokens: 1 = the value model predicts the
    returns, 0 = no better than their mean."""
    mean = masked_mean(returns, mask)
    var = masked_mean((returns - mean) ** 2, mask)
    err = returns - values
    err_var = masked_mean((err - masked_mean(err, mask)) ** 2, mask)
    return float(1 - err_var / var) if var > 0 else 0.0


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy of each next-token distribution, [B, R] from logits [B, R, V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def adapt_kl_coef(coef: float, kl: float, target: float | None, horizon: int, samples: int) -> float:
    """Ziegler et al.'s proportional controller: move the coefficient toward holding the KL at `target` (the
    error clipped to +-20%); a fixed coefficient without a target."""
    if target is None:
        return coef
    error = max(-0.2, min(0.2, kl / target - 1))
    return coef * (1 + error * samples / horizon)


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage of each sample, [B]: its score minus its group's mean, divided by the group's standard
    deviation (unbiased, as TRL's) + `eps` with `scale`; a group whose scores are all equal gives 0."""
    groups = scores.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantage of each sample, [B]: its reward minus the mean reward of the other k - 1 of its group."""
    groups = scores.view(-1, group_size)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(-1)


# ----------------------------------------------------------------------------------------------- the algorithms

# (scores [B], rewards [B, R] with the KL penalty, values [B, R] or None, mask, rl, ppo) -> (advantages [B, R],
# returns [B, R] or None)
Estimator = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor, Rl, Ppo],
                     "tuple[torch.Tensor, torch.Tensor | None]"]


def gae_estimator(scores: torch.Tensor, rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor,
                  rl: Rl, ppo: Ppo) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PPO: GAE over the per-token rewards (the score on the last token, the KL penalty on each) against the value
    model's values; returns are the value targets. Whitened by the caller, over every rank."""
    return gae(rewards, values, mask, ppo.gamma, ppo.lam)


def group_estimator(scores: torch.Tensor, rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor,
                    rl: Rl, ppo: Ppo) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GRPO: each sample's score against its group's (standardised with `rl.scale_rewards`), at every token; its KL
    is a loss term, not a reward."""
    return group_advantages(scores, rl.group_size, rl.scale_rewards)[:, None] * mask, None


def leave_one_out_estimator(scores: torch.Tensor, rewards: torch.Tensor, values: torch.Tensor | None,
                            mask: torch.Tensor, rl: Rl, ppo: Ppo) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RLOO: the sequence's reward (its score minus kl_coef x its KL) against the mean of the other k - 1 of its
    group, one advantage per response ([B, 1])."""
    return leave_one_out_advantages(rewards.sum(1), rl.group_size)[:, None], None


@dataclass(frozen=True)
class Algorithm:
    """What one RL algorithm takes for each part of the loop the policy stage runs."""

    value_model: bool  # a critic (the RM's trunk + its own LoRA) trained beside the policy
    grouped: bool  # `rl.group_size` samples per prompt, compared within their group
    estimator: Estimator  # the advantages (and returns)
    whiten: bool  # advantages standardised over every rank's tokens (PPO)
    kl_in_loss: bool  # the KL to the reference as a k3 term of the loss (GRPO), not a per-token reward penalty
    ratio: str  # token: one ratio per token | sequence_sum: exp of the summed log-ratio per response (RLOO)
    loss_types: tuple[str, ...]  # the aggregations it can use (align/losses.py `aggregate`); its own first


ALGORITHMS = {
    "ppo": Algorithm(value_model=True, grouped=False, estimator=gae_estimator, whiten=True, kl_in_loss=False,
                     ratio="token", loss_types=("bnpo", "dapo", "grpo", "dr_grpo")),
    "grpo": Algorithm(value_model=False, grouped=True, estimator=group_estimator, whiten=False, kl_in_loss=True,
                      ratio="token", loss_types=("dapo", "grpo", "bnpo", "dr_grpo")),
    "rloo": Algorithm(value_model=False, grouped=True, estimator=leave_one_out_estimator, whiten=False,
                      kl_in_loss=False, ratio="sequence_sum", loss_types=("sequence",)),
}


def loss_type(algorithm: str, rl: Rl) -> str:
    """The aggregation the algorithm runs with: `rl.loss_type`, or its own where that is null (GSPO's, a mean over
    responses, where GRPO takes one ratio per response: a token sum would weigh a response by its length)."""
    if rl.loss_type is None and rl.importance_sampling_level == "sequence":
        return "grpo"
    return rl.loss_type or ALGORITHMS[algorithm].loss_types[0]


def check_settings(algorithm: str, rl: Rl) -> None:
    """`rl` settings the chosen algorithm cannot run with, as one line each, before any job."""
    own = ALGORITHMS[algorithm]
    problems = []
    if rl.loss_type is not None and rl.loss_type not in own.loss_types:
        usable = ", ".join(t for t in own.loss_types if t != "sequence") or "none: its loss is one per response"
        problems.append(f"params.yaml: rl.loss_type: {algorithm} cannot use {rl.loss_type!r} (usable: {usable}); "
                        f"null takes its own")
    if rl.importance_sampling_level == "sequence" and algorithm != "grpo":
        problems.append(f"params.yaml: rl.importance_sampling_level: 'sequence' (GSPO) is GRPO's; {algorithm} "
                        f"takes 'token'" + (" (its ratio is already one per response)" if own.ratio != "token"
                                            else ""))
    if problems:
        raise UserError("\n".join(problems))
