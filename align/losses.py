"""Every loss the pipeline minimises, as pure functions of tensors, each with its formula beside it: supervised
fine-tuning, Bradley-Terry (the reward model), DPO, the clipped policy surrogate and value loss of PPO, GRPO and
RLOO, the k3 KL term, the engine's importance correction, and how per-token losses become one optimizer step's
loss (`aggregate`). The stages compute log-probabilities and rewards; what is minimised is decided here.

Normalisation is always over an optimizer step's whole batch (every micro-batch on every rank), never over one
micro-batch: a micro-batch is a memory setting (cluster.*.micro_batch_size), and a loss normalised inside it
would weigh a token by its neighbours and change with it. Callers pass the step's normaliser and the scale that
undoes DeepSpeed's averaging (1 / accumulation steps, 1 / ranks) so the accumulated gradient is exactly that of
the formula.

Shapes: `[B, T]` per response token with a 0/1 `mask` for the padding after each response; `[B]` per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------ supervised and pairs


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SFT: (sum over labelled tokens of -log p(y_t | y_<t), the number of labelled tokens); `logits` [B, L, V]
    predict the next token, `labels` [B, L] with -100 where nothing is learned (the prompt, padding).
        L_sft = (1 / N_step) sum_{labelled t} -log p(y_t)        (N_step: labelled tokens of the whole step)"""
    shifted = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), shifted.flatten(), ignore_index=-100,
                          reduction="sum")
    return nll, (shifted != -100).sum()


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per pair, the reward model's loss: -log sigmoid(r_chosen - r_rejected) (Bradley & Terry 1952)."""
    return -F.logsigmoid(chosen - rejected)


def dpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, (DPO's loss, its implicit reward margin m) from summed response log-probabilities (Rafailov et al.
    2023):  m = beta ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))),  L = -log sigmoid(m)."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin), margin


# ------------------------------------------------------------------------------------------------ policy losses


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float,
                      epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-element loss, whether the clipped term was taken) of the clipped surrogate (Schulman et al. 2017) with
    an asymmetric clip (DAPO's clip-higher, Yu et al. 2025):
        rho = exp(log_ratio),  L = max(-A rho, -A clip(rho, 1 - epsilon, 1 + epsilon_high))
    `log_ratio` is per token ([B, T]: PPO, GRPO) or per sequence ([B, 1]: GSPO's mean, RLOO's sum) and broadcasts
    against `advantages`."""
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    return torch.max(unclipped, clipped), clipped > unclipped


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float) -> torch.Tensor:
    """Per token, PPO's clipped value loss: 0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per token, Schulman's k3 estimate of KL(pi || pi_ref): exp(r) - r - 1 with r = log pi_ref - log pi; >= 0,
    unbiased for samples of pi and low-variance (GRPO's KL term, Shao et al. 2024)."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def truncated_is_weight(trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor,
                        cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, whether it was truncated) of truncated importance sampling for the engine/trainer mismatch (Yao et
    al. 2025; TRL's vllm_importance_sampling_correction): the engine sampled from pi_engine (its kernels, its
    rounding), the update's ratio assumes pi_old, so each term is weighted by
        w = min(pi_old / pi_engine, cap) = min(exp(log pi_old - log pi_engine), cap)    (detached: a constant)."""
    weight = torch.exp(trainer_logprobs - engine_logprobs).detach()
    return torch.clamp(weight, max=cap), weight > cap


def policy_terms(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 ratio: str, epsilon: float, epsilon_high: float, engine_logprobs: torch.Tensor | None = None,
                 is_cap: float = 1.0, ref_logprobs: torch.Tensor | None = None,
                 kl_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy's loss before aggregation, per token ([B, R]) or, for a per-response ratio, per response
    ([B, 1]), and the sums its statistics are made of ("<name>" over "<name>_of"):
        r_t = log pi(y_t) - log pi_old(y_t)
        token         rho_t = exp(r_t)                         PPO, GRPO
        sequence      rho = exp(mean_t r_t), one per response  GSPO (Zheng et al. 2025)
        sequence_sum  rho = exp(sum_t r_t) = pi(y) / pi_old(y) RLOO (Ahmadian et al. 2024; TRL's RLOOTrainer)
        l = clipped_surrogate(rho, A) x w  + kl_coef x k3(pi, pi_ref)   (w: `truncated_is_weight` where the
    engine's log-probs are given, per token or per response as rho is; the k3 term where `ref_logprobs` is given,
    GRPO's). `advantages` are [B, R] (PPO, GRPO) or [B, 1] (RLOO)."""
    log_ratio = (logprobs - old_logprobs) * mask
    if ratio == "sequence_sum":
        log_ratio = log_ratio.sum(1, keepdim=True)
    elif ratio == "sequence":
        log_ratio = log_ratio.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
    per_response = log_ratio.shape[1] == 1
    if per_response:
        advantages = advantages[:, :1]
    loss, clipped = clipped_surrogate(log_ratio, advantages, epsilon, epsilon_high)
    counted = torch.ones_like(loss) if per_response else mask
    stats = {"clip_fraction": (clipped.float() * counted).sum(), "clip_fraction_of": counted.sum(),
             "approx_kl": (k3_kl(old_logprobs, logprobs) * mask).sum(), "approx_kl_of": mask.sum()}
    if engine_logprobs is not None:
        old, engine = old_logprobs * mask, engine_logprobs * mask
        if per_response:
            old, engine = old.sum(1, keepdim=True), engine.sum(1, keepdim=True)
        weight, cut = truncated_is_weight(old, engine, is_cap)
        loss = loss * weight
        stats |= {"is_truncated_share": (cut.float() * counted).sum(), "is_truncated_share_of": counted.sum()}
    if ref_logprobs is not None:
        kl_term = k3_kl(logprobs, ref_logprobs) * mask
        loss = loss + kl_coef * kl_term
        stats |= {"kl_term": kl_term.sum(), "kl_term_of": mask.sum()}
    return loss, {name: x.detach() for name, x in stats.items()}  # for the curves: no graph kept alive


# ---------------------------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class StepNorm:
    """What the step's whole batch (every micro-batch on every rank) holds, for `aggregate`: its sequences, its
    response tokens, the mean response tokens of a step over the iteration's rollout (DAPO's normaliser), and the
    response length limit (Dr. GRPO's)."""

    sequences: float
    tokens: float
    rollout_tokens_per_step: float
    max_tokens: int


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, norm: StepNorm) -> torch.Tensor:
    """A micro-batch's share of its optimizer step's loss, by `loss_type` (B: the step's sequences, |o_i| a
    response's tokens, T: the step's tokens, T_bar: the rollout's tokens per step, L: max_new_tokens):
        grpo     (1 / B) sum_i (1 / |o_i|) sum_t l_it          a mean over responses of each one's token mean
        bnpo     (1 / T) sum_i sum_t l_it                      a token mean over the step
        dr_grpo  (1 / (B L)) sum_i sum_t l_it                  no length normalisation (Liu et al. 2025)
        dapo     (1 / T_bar) sum_i sum_t l_it                  every token of the iteration weighs alike (Yu et al.)
        sequence (1 / B) sum_i l_i                             one loss per response (RLOO; `per_token` [B, 1])
    Summed over a step's micro-batches this is the formula; the caller scales it for DeepSpeed's averaging."""
    if loss_type == "sequence":
        return per_token.sum() / norm.sequences
    if loss_type == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / norm.sequences
    denominator = {"bnpo": norm.tokens, "dr_grpo": norm.sequences * norm.max_tokens,
                   "dapo": norm.rollout_tokens_per_step}[loss_type]
    return (per_token * mask).sum() / max(denominator, 1.0)
