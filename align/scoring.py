"""Forward-pass scoring of many texts that share a long token prefix, with the prefix run once: the next-token
logits a preference judge reads (which of "a" / "b" comes next) and the log-likelihood of answer choices given
a question (benchmark evaluation). transformers only: one forward pass per batch, no sampling.

Layout of a batch with n shared tokens and suffixes of different lengths, as in the hf generation backend:
    [P | pad pad | suffix_0]      attention mask [1]*n + [0]*pads + [1]*len(suffix)
    [P |     pad | suffix_1]      position ids of the suffix continue at n
P's keys and values are computed once (batch 1, kept for the next batch with the same prefix) and repeated to
the batch; pads are masked and positions are given explicitly, so every row computes what a forward pass over
its own unpadded tokens computes. Only the positions that are read go through the LM head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from align.devices import load_causal_lm
from align.errors import UserError
from align.models import padding_id, prompt_ids
from align.prefix_cache import PrefixCache, shared_prefix, suffix_block
from align.progress import progress


def choice_token_id(tokenizer: Any, text: str, what: str) -> int:
    """The one token `text` encodes to: a choice read from a single next-token logit must be one token; else one
    line starting with `what` (where the choice comes from, and whose tokenizer)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UserError(f"{what}: {text!r} is {len(ids)} tokens; expected exactly one (ids {ids})")
    return ids[0]


class Scorer:
    """A causal LM loaded for scoring (optionally with a LoRA adapter applied): on the job's device, or with `shard`
    spread over the GPUs of this process (`align.devices.placed`; the prefix cache works across them too)."""

    def __init__(self, model: Path | str, *, batch_size: int = 16, adapter: Path | None = None,
                 trust_remote_code: bool = False, shard: bool = False):
        self.name = str(model)
        self.tokenizer, self.model, self.device = load_causal_lm(model, trust_remote_code=trust_remote_code,
                                                                 shard=shard, adapter=adapter)
        self.batch_size = batch_size
        self.reuse_prefix = True  # switch for tests and benchmarks: False = every row computes its own prefix
        self.pad_id = padding_id(self.tokenizer)
        self.prefix = PrefixCache()

    def token_id(self, text: str) -> int:
        return choice_token_id(self.tokenizer, text, f"{self.name}: a choice")

    def next_token_logits(self, texts: list[str], token_ids: list[int]) -> torch.Tensor:
        """[len(texts), len(token_ids)]: the logit of each of `token_ids` as the token that follows each text
        (texts tokenized as generation tokenizes prompts: `prompt_ids`)."""
        ids = [prompt_ids(self.tokenizer, text) for text in texts]
        rows = []
        for start in progress(range(0, len(ids), self.batch_size), desc="Judged prompts", unit="batch"):
            batch = ids[start : start + self.batch_size]
            logits, _ = self._forward(batch, keep=1, max_shared=min(len(r) for r in batch) - 1)
            rows.append(logits[:, -1, token_ids].float().cpu())
        return torch.cat(rows) if rows else torch.empty(0, len(token_ids))

    def continuation_logprobs(self, context: str, continuations: list[str]) -> list[float]:
        """Sum of log-probabilities of each continuation's tokens after `context` (context and continuation
        tokenized apart and joined, so every continuation is scored after the same context tokens)."""
        context_ids = prompt_ids(self.tokenizer, context)
        ids = [context_ids + self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
        if any(len(row) == len(context_ids) for row in ids):
            raise UserError(f"{self.name}: an empty continuation cannot be scored")
        totals = []
        for start in range(0, len(ids), self.batch_size):
            batch = ids[start : start + self.batch_size]
            width = max(len(r) for r in batch) - (len(context_ids) - 1)
            logits, n = self._forward(batch, keep=width, max_shared=len(context_ids) - 1)
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            kept = logits.shape[1]  # the last `kept` columns; every row's tokens end at the last column
            for row, lp in zip(batch, logprobs):
                end = kept - (len(row) - n)  # column of position n of this row, in kept columns
                targets = torch.tensor(row[len(context_ids):], device=lp.device)
                columns = torch.arange(len(context_ids) - 1, len(row) - 1, device=lp.device) - n + end  # t-1 -> t
                totals.append(lp[columns, targets].sum().item())
        return totals

    @torch.inference_mode()
    def _forward(self, ids: list[list[int]], keep: int, max_shared: int) -> tuple[torch.Tensor, int]:
        """Logits of the last `keep` columns of the left-padded suffix block, and the shared prefix length n."""
        n = shared_prefix(ids, max(max_shared, 0)) if self.reuse_prefix else 0
        tokens, mask, positions = suffix_block(ids, n, self.pad_id)
        width = len(tokens[0])
        kwargs: dict[str, Any] = {}
        if n:
            kwargs["past_key_values"] = self.prefix.for_batch(self.model, ids[0][:n], len(ids))
        out = self.model(
            input_ids=torch.tensor(tokens, device=self.device),
            attention_mask=torch.tensor(mask, device=self.device),
            position_ids=torch.tensor(positions, device=self.device),
            use_cache=bool(n),
            logits_to_keep=min(keep, width),
            **kwargs,
        )
        return out.logits, n
