"""align/scoring.py on the tiny model: the shared-prefix batched forward gives what one plain forward pass per
text gives (next-token logits and continuation log-likelihoods), across batches and with uneven suffixes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align.errors import UserError
from align.scoring import Scorer

PREFIX = "Principles: be ethical, informative, helpful, candid and step-by-step. " * 4
SUFFIXES = ["The quick brown fox.", "1 2 3", "What is the capital of France? The capital", "def add(a, b):", "An"]


def naive_last_logits(scorer: Scorer, text: str) -> torch.Tensor:
    ids = torch.tensor([scorer.tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        return scorer.model(input_ids=ids).logits[0, -1]


def test_next_token_logits_match_one_forward_per_text(tiny_model: Path) -> None:
    scorer = Scorer(tiny_model, batch_size=2)  # 5 texts: 3 batches, the prefix cache reused across them
    choices = [scorer.token_id("a"), scorer.token_id("b"), 5]
    texts = [PREFIX + s for s in SUFFIXES]
    got = scorer.next_token_logits(texts, choices)
    assert scorer.prefix.cache is not None and len(scorer.prefix.tokens) > 20  # the shared prefix was cached
    want = torch.stack([naive_last_logits(scorer, t)[choices] for t in texts])
    assert got.shape == (5, 3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    scorer.reuse_prefix = False
    torch.testing.assert_close(scorer.next_token_logits(texts, choices), want, atol=1e-4, rtol=1e-4)


def test_continuation_logprobs_match_one_forward_per_continuation(tiny_model: Path) -> None:
    scorer = Scorer(tiny_model, batch_size=3)
    context = PREFIX + "Question: what colour is the fox? Answer:"
    continuations = [" brown", " the quick brown fox jumps", " 1 2 3 4 5", " Paris"]
    got = scorer.continuation_logprobs(context, continuations)
    context_ids = scorer.tokenizer(context)["input_ids"]
    for value, continuation in zip(got, continuations):
        cont = scorer.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logprobs = torch.log_softmax(scorer.model(input_ids=torch.tensor([context_ids + cont])).logits[0], -1)
        want = sum(logprobs[len(context_ids) - 1 + i, token].item() for i, token in enumerate(cont))
        assert value == pytest.approx(want, abs=1e-4)
    assert got[0] > got[1]  # one token is likelier than five


def test_items_after_one_preamble_run_it_once_and_score_as_alone(tiny_model: Path) -> None:
    """Benchmark items share a few-shot preamble: the second item's context runs only its own question on the
    preamble's cached keys and values (the cache cut back to what the contexts share), with the scores of a fresh
    scorer per item; a context that shares nothing starts anew."""
    scorer = Scorer(tiny_model, batch_size=4)
    tokens_run: list[int] = []
    scorer.model.get_input_embeddings().register_forward_hook(lambda _m, args, _o: tokens_run.append(args[0].numel()))
    contexts = [PREFIX + "Q: what colour is the fox?\nA:", PREFIX + "Q: where is Paris?\nA:", "Unrelated words:"]
    continuations = [" brown", " in France", " none"]
    got = [scorer.continuation_logprobs(c, continuations) for c in contexts]
    lengths = [len(scorer.tokenizer(c)["input_ids"]) for c in contexts]
    shared = next(i for i, (a, b) in enumerate(zip(*(scorer.tokenizer(c)["input_ids"] for c in contexts[:2])))
                  if a != b)
    prefix_runs = tokens_run[0::2]  # per item: its context's prefix run, then the block of continuations
    assert prefix_runs == [lengths[0] - 1, lengths[1] - 1 - shared, lengths[2] - 1]
    for context, values in zip(contexts, got):
        fresh = Scorer(tiny_model, batch_size=4).continuation_logprobs(context, continuations)
        assert values == pytest.approx(fresh, abs=1e-4)


def test_a_choice_of_several_tokens_is_refused(tiny_model: Path) -> None:
    scorer = Scorer(tiny_model)
    with pytest.raises(UserError, match=r"a choice: 'capital of France' is \d+ tokens; expected exactly one \(ids \[.*\]\)$"):
        scorer.token_id("capital of France")
