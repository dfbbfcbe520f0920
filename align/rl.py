"""The arithmetic of PPO on token sequences (Schulman et al. 2017; Ziegler et al. 2019 for language): per-token
rewards with a KL penalty to the reference policy, generalised advantage estimation, whitening, the clipped
policy and value losses, and the adaptive KL coefficient; and of the critic-free methods that replace the value
model by the other samples of the same prompt: GRPO's group-normalised advantage and k3 KL term (Shao et al.
2024), RLOO's leave-one-out baseline (Ahmadian et al. 2024). Tensors are [batch, response tokens] with a 0/1 mask
for the padding after each response; every mean is over the unmasked tokens; a group is `group_size` consecutive
rows (one prompt's samples). Every tensor a function makes is on its inputs' device.
"""

from __future__ import annotations

import torch


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


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate objective (as a loss), with the clip fraction and the approximate KL to the rollout
    policy (k3 estimator)."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    stats = {"clip_fraction": masked_mean((clipped > unclipped).float(), mask),
             "approx_kl": masked_mean(ratio - 1 - log_ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """0.5 x the larger of the plain and the clipped squared error (values kept within `clip` of the rollout's)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


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


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per token, Schulman's k3 estimate of KL(pi || pi_ref): exp(r) - r - 1 with r = log pi_ref - log pi, >= 0,
    unbiased for samples of pi and low-variance (GRPO's KL term); 0 on padding."""
    log_ratio = (ref_logprobs - logprobs) * mask
    return torch.exp(log_ratio) - log_ratio - 1
