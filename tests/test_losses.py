"""align/losses.py against hand-computed cases: each loss's formula, the policy loss's ratio levels (token, GSPO's
sequence mean, RLOO's sequence sum), clip-higher, the engine's truncated importance weight, and the aggregation
family (grpo, bnpo, dr_grpo, dapo, one per response) normalised over the optimizer step, so that cutting a step
into micro-batches changes nothing."""

from __future__ import annotations

import math

import pytest
import torch

from align.losses import (
    StepNorm, aggregate, bradley_terry, clipped_surrogate, dpo, k3_kl, policy_terms, token_nll_sum,
    truncated_is_weight, value_loss,
)
from align.errors import UserError
from align.rl import ALGORITHMS, check_settings, loss_type
from tests.helpers import DEFAULTS

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # the second response has one token
NORM = StepNorm(sequences=2, tokens=4, rollout_tokens_per_step=5, max_tokens=4)


def test_supervised_and_pair_losses() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75], [0.5, 0.5]]]))  # position t predicts token t + 1
    total, count = token_nll_sum(logits, torch.tensor([[-100, 0, 1]]))  # token 1 is 0 (p 0.5), token 2 is 1 (0.75)
    assert count == 2 and total.item() == pytest.approx(-math.log(0.5) - math.log(0.75))
    assert bradley_terry(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(1 + math.e ** -1))
    loss, margin = dpo(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), 0.1)
    assert margin.item() == pytest.approx(0.1 * (0.5 - -0.5)) and loss.item() == pytest.approx(math.log(1 + math.e ** -0.1))


def test_clipped_surrogate_clips_higher_above_than_below() -> None:
    # ratios 1, e^0.3 = 1.3499, e^-0.5 = 0.6065; clip range [0.8, 1.28] (epsilon 0.2, epsilon_high 0.28)
    loss, clipped = clipped_surrogate(torch.tensor([0.0, 0.3, -0.5]), torch.tensor([1.0, 1.0, -1.0]), 0.2, 0.28)
    assert loss.tolist() == pytest.approx([-1.0, -1.28, 0.8])  # the pessimistic (larger) of the two terms
    assert clipped.tolist() == [False, True, True]
    assert value_loss(torch.tensor([2.0, 0.0]), torch.zeros(2), torch.ones(2), 0.2).tolist() == \
        pytest.approx([0.5 * 1.0, 0.5 * 1.0])  # clipped to 0.2 the first error would be 0.64: the larger counts


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere() -> None:
    # r = ref - logp: 0 -> 0; 0.5 -> e^0.5 - 1.5 = 0.148721; -0.5 -> e^-0.5 - 0.5 = 0.106531; -2 -> e^-2 + 1
    kl = k3_kl(torch.tensor([-1.0, -2.0, -0.5, -1.0]), torch.tensor([-1.0, -1.5, -1.0, -3.0]))
    assert kl.tolist() == pytest.approx([0.0, 0.148721, 0.106531, 1.135335], abs=1e-6)


def test_the_engine_weight_is_the_probability_ratio_truncated_at_the_cap() -> None:
    weight, cut = truncated_is_weight(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -0.5]), cap=1.5)
    assert weight.tolist() == pytest.approx([1.5, math.exp(-1.5)]) and cut.tolist() == [True, False]  # e^0.5 > 1.5


@pytest.mark.parametrize("kind, expected", [
    ("grpo", (6 / 3 + 4 / 1) / 2),  # each response's token mean, then the mean over the step's 2 responses
    ("bnpo", 10 / 4),  # the step's 4 tokens
    ("dr_grpo", 10 / (2 * 4)),  # 2 responses x max_new_tokens 4
    ("dapo", 10 / 5),  # the rollout's mean tokens per step
])
def test_aggregation_family_by_hand_and_alike_in_any_micro_batches(kind: str, expected: float) -> None:
    assert aggregate(PER_TOKEN, MASK, kind, NORM).item() == pytest.approx(expected)
    halves = sum(aggregate(PER_TOKEN[[i]], MASK[[i]], kind, NORM) for i in range(2))  # two micro-batches of one
    assert halves.item() == pytest.approx(expected)


def test_one_loss_per_response_is_a_mean_over_responses() -> None:
    assert aggregate(torch.tensor([[3.0], [5.0]]), MASK, "sequence", NORM).item() == pytest.approx(4.0)


def test_rloo_takes_the_ratio_of_each_response_and_a_mean_over_responses() -> None:
    """Two responses of 1 and 3 tokens, each token 0.1 more likely in log than when sampled, both advantage 1:
    RLOO's ratios are e^0.1 and e^0.3 (clipped to 1.2), one loss each, (-1.10517 - 1.2) / 2. A per-token ratio
    averaged over the 4 tokens gives -1.10517: the long response counts three times, and is not clipped."""
    old = torch.zeros(2, 3)
    new = torch.tensor([[0.1, 0.0, 0.0], [0.1, 0.1, 0.1]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = torch.ones(2, 1)
    rloo = ALGORITHMS["rloo"]
    assert rloo.ratio == "sequence_sum" and rloo.loss_types == ("sequence",) and not rloo.kl_in_loss
    terms, stats = policy_terms(new, old, advantages, mask, rloo.ratio, 0.2, 0.2)
    assert terms.shape == (2, 1) and stats["clip_fraction"].item() == 1 and stats["clip_fraction_of"].item() == 2
    assert aggregate(terms, mask, "sequence", NORM).item() == pytest.approx((-math.exp(0.1) - 1.2) / 2)
    token, _ = policy_terms(new, old, advantages.expand(2, 3), mask, "token", 0.2, 0.2)
    assert aggregate(token, mask, "bnpo", StepNorm(2, 4, 4, 3)).item() == pytest.approx(-math.exp(0.1))


def test_gspo_takes_one_length_normalised_ratio_per_response() -> None:
    new = torch.tensor([[0.3, 0.0], [0.1, 0.3]])  # mean log-ratios 0.3 (1 token) and 0.2
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    terms, _ = policy_terms(new, torch.zeros(2, 2), torch.ones(2, 2), mask, "sequence", 0.2, 0.5)
    assert terms.flatten().tolist() == pytest.approx([-math.exp(0.3), -math.exp(0.2)])


def test_engine_weights_and_the_k3_term_enter_each_token() -> None:
    new, old = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    engine = torch.tensor([[0.0, -1.0]])  # the engine gave the second token e^-1 of the trainer's probability
    ref = torch.tensor([[0.0, 0.5]])
    terms, stats = policy_terms(new, old, torch.ones(1, 2), torch.ones(1, 2), "token", 0.2, 0.2, engine, 2.0, ref,
                                kl_coef=0.1)
    k3 = math.exp(0.5) - 0.5 - 1
    assert terms.flatten().tolist() == pytest.approx([-1.0, -2.0 + 0.1 * k3])  # weight min(e^1, 2) = 2
    assert stats["is_truncated_share"].item() == 1 and stats["kl_term"].item() == pytest.approx(k3)


def test_each_algorithm_refuses_the_settings_it_cannot_run_with() -> None:
    rl = DEFAULTS.rl
    assert [loss_type(a, rl) for a in ("ppo", "grpo", "rloo")] == ["bnpo", "dapo", "sequence"]
    gspo = rl.model_copy(update={"importance_sampling_level": "sequence"})
    assert loss_type("grpo", gspo) == "grpo"  # GSPO's own: a mean over responses, not a length-weighted token sum
    check_settings("grpo", rl.model_copy(update={"loss_type": "dr_grpo", "importance_sampling_level": "sequence"}))
    with pytest.raises(UserError, match=r"^params.yaml: rl.loss_type: rloo cannot use 'dapo' \(usable: none"):
        check_settings("rloo", rl.model_copy(update={"loss_type": "dapo"}))
    with pytest.raises(UserError, match=r"^params.yaml: rl.importance_sampling_level: 'sequence' \(GSPO\) is "
                                        r"GRPO's; ppo takes 'token'$"):
        check_settings("ppo", rl.model_copy(update={"importance_sampling_level": "sequence"}))
