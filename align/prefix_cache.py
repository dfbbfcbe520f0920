"""Rows that start with the same tokens (a judge template, a system prompt, a question) need that prefix's keys
and values once: the longest prefix a batch shares, and its cache, computed once and kept while consecutive
batches share it, repeated for each batch. The hf generation backend and the scorer both read batches this way.
"""

from __future__ import annotations

import copy
from typing import Any, Hashable

MIN_SHARED_PREFIX = 8  # shorter common prefixes are not worth a separate forward pass


def shared_prefix(ids: list[list[int]], limit: int | None = None) -> int:
    """Tokens every row starts with, at most `limit` and leaving each row at least one token of its own; 0 for a
    single row or fewer than MIN_SHARED_PREFIX."""
    if len(ids) < 2:
        return 0
    limit = min(len(row) for row in ids) - 1 if limit is None else min(limit, min(len(row) for row in ids) - 1)
    n = 0
    while n < limit and all(row[n] == ids[0][n] for row in ids):
        n += 1
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
    """The keys and values of the last prefix run, under a key naming everything they depend on (the prefix's
    tokens, and the adapter where one is swapped in)."""

    def __init__(self) -> None:
        self.key: Hashable = None
        self.cache: Any = None

    def for_batch(self, model: Any, key: Hashable, prefix: list[int], batch: int) -> Any:
        """A fresh cache holding `prefix` for `batch` rows (a forward pass appends to it in place)."""
        import torch

        if self.cache is None or self.key != key:
            ids = torch.tensor([prefix], device=model.device)
            self.key, self.cache = key, model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch)
        return cache

    def clear(self) -> None:
        self.key = self.cache = None
