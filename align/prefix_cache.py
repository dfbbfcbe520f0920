"""Rows that start with the same tokens (a judge template, a system prompt, a question) need that prefix's keys
and values once: the longest prefix a batch shares, and its cache, computed once and kept while consecutive
batches share it, repeated for each batch. The hf generation backend and the scorer both read batches this way.
"""

from __future__ import annotations

import copy
from typing import Any, Hashable

MIN_SHARED_PREFIX = 8  # shorter common prefixes are not worth a separate forward pass


def common_length(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    """How many tokens `a` and `b` start with alike."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix(ids: list[list[int]], limit: int | None = None) -> int:
    """Tokens every row starts with, at most `limit` and leaving each row at least one token of its own; 0 for a
    single row or fewer than MIN_SHARED_PREFIX."""
    if len(ids) < 2:
        return 0
    limit = min(len(row) for row in ids) - 1 if limit is None else min(limit, min(len(row) for row in ids) - 1)
    n = min(limit, *(common_length(ids[0], row) for row in ids[1:]))
    return n if n >= MIN_SHARED_PREFIX else 0


def suffix_block(ids: list[list[int]], n: int, pad_id: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """(tokens, attention mask, position ids) of the rows after their shared `n`-token prefix, left-padded to one
    width, so every row ends at the last column: the mask covers the prefix (cached) then the block, positions
    continue at n, pads are masked."""
    width = max(len(row) - n for row in ids)
    tokens, mask, positions = [], [], []
    for row in ids:
        pad = width - (len(row) - n)
        tokens.append([pad_id] * pad + row[n:])
        mask.append([1] * n + [0] * pad + [1] * (len(row) - n))
        positions.append([n] * pad + list(range(n, len(row))))
    return tokens, mask, positions


class PrefixCache:
    """The keys and values of the last prefix run: its `tokens`, and what else they depend on (`scope`: the adapter
    where one is swapped in). A prefix that starts like the last one reuses the part they share: the cache is cut
    back to it and only the rest runs. Consecutive benchmark items after one few-shot preamble run the preamble
    once; a pair judged in its second order reuses the instruction of its first."""

    def __init__(self) -> None:
        self.scope: Hashable = None
        self.tokens: tuple[int, ...] = ()
        self.cache: Any = None

    def for_batch(self, model: Any, prefix: list[int], batch: int, scope: Hashable = None) -> Any:
        """A fresh cache holding `prefix` for `batch` rows (a forward pass appends to it in place)."""
        import torch

        kept = common_length(self.tokens, prefix) if self.cache is not None and self.scope == scope else 0
        if not kept:
            self.cache = None
        elif kept < len(self.tokens):
            self.cache.crop(kept - len(self.tokens))  # a negative count: that many tokens off the end
        if kept < len(prefix):
            ids = torch.tensor([prefix[kept:]], device=model.device)
            self.cache = model(input_ids=ids, past_key_values=self.cache, use_cache=True,
                               logits_to_keep=1).past_key_values
        self.scope, self.tokens = scope, tuple(prefix)
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch)
        return cache

    def clear(self) -> None:
        self.scope, self.tokens, self.cache = None, (), None
