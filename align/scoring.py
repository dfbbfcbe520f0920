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

import copy
from pathlib import Path
from typing import Any

import torch

from align.errors import UserError
from align.generation import MIN_SHARED_PREFIX, config_dtype
from align.models import padding_id, prompt_ids
from align.progress import progress


class Scorer:
    """A causal LM loaded for scoring (optionally with a LoRA adapter applied)."""

    def __init__(self, model: Path | str, *, batch_size: int = 16, adapter: Path | None = None,
                 trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = str(model)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = config_dtype(model) if self.device.type == "cuda" else "float32"
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype),
                                                          trust_remote_code=trust_remote_code).to(self.device).eval()
        if adapter is not None:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, str(adapter)).eval()
        self.batch_size = batch_size
        self.reuse_prefix = True  # switch for tests and benchmarks: False = every row computes its own prefix
        self.pad_id = padding_id(self.tokenizer)
        self._prefix: tuple[tuple[int, ...], Any] | None = None  # (prefix tokens, its cache for batch size 1)

    def token_id(self, text: str) -> int:
        """The one token `text` encodes to; a choice read from a single next-token logit must be one token."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise UserError(f"{self.name}: the choice {text!r} is {len(ids)} tokens {ids} in this tokenizer; "
                            f"expected exactly one")
        return ids[0]

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
                targets = torch.tensor(row[len(context_ids):])
                columns = torch.arange(len(context_ids) - 1, len(row) - 1) - n + end  # position t-1 predicts t
                totals.append(lp[columns, targets].sum().item())
        return totals

    def _shared(self, ids: list[list[int]], limit: int) -> int:
        if not self.reuse_prefix or len(ids) < 2:
            return 0
        n = 0
        while n < limit and all(row[n] == ids[0][n] for row in ids):
            n += 1
        return n if n >= MIN_SHARED_PREFIX else 0

    def _prefix_cache(self, prefix: tuple[int, ...], batch: int) -> Any:
        if self._prefix is None or self._prefix[0] != prefix:
            out = self.model(input_ids=torch.tensor([prefix], device=self.device), use_cache=True, logits_to_keep=1)
            self._prefix = (prefix, out.past_key_values)
        cache = copy.deepcopy(self._prefix[1])
        cache.batch_repeat_interleave(batch)
        return cache

    @torch.inference_mode()
    def _forward(self, ids: list[list[int]], keep: int, max_shared: int) -> tuple[torch.Tensor, int]:
        """Logits of the last `keep` columns of the left-padded suffix block, and the shared prefix length n."""
        n = self._shared(ids, max(max_shared, 0))
        width = max(len(row) - n for row in ids)
        tokens, mask, positions = [], [], []
        for row in ids:
            pad = width - (len(row) - n)
            tokens.append([self.pad_id] * pad + row[n:])
            mask.append([1] * n + [0] * pad + [1] * (len(row) - n))
            positions.append([n] * pad + list(range(n, len(row))))
        kwargs: dict[str, Any] = {}
        if n:
            kwargs["past_key_values"] = self._prefix_cache(tuple(ids[0][:n]), len(ids))
        out = self.model(
            input_ids=torch.tensor(tokens, device=self.device),
            attention_mask=torch.tensor(mask, device=self.device),
            position_ids=torch.tensor(positions, device=self.device),
            use_cache=bool(n),
            logits_to_keep=min(keep, width),
            **kwargs,
        )
        return out.logits, n
