"""A policy's sampled responses as the RL update reads them, and the forward passes that read them.

A `Rollout` is one rank's batch of one iteration: each query left-padded to one width and its response
right-padded after it, so every response starts at the same column and the columns that predict response tokens
are one slice of every row; position ids count real tokens only. Beside the tokens it holds what the update needs
and must not recompute after the first optimizer step: the sampling policy's and the reference's log-probs, the
value model's values and the sequence scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import torch

from align.devices import to_device


SEQUENCE_FIELDS = ("input_ids", "attention_mask", "position_ids")  # [B, W + R]; the other 2-D fields are [B, R]


@dataclass(frozen=True)
class Rollout:
    input_ids: torch.Tensor  # [B, W + R] query (left-padded to W) then response (right-padded to R)
    attention_mask: torch.Tensor  # [B, W + R]
    position_ids: torch.Tensor  # [B, W + R]
    responses: torch.Tensor  # [B, R] the sampled response tokens
    response_mask: torch.Tensor  # [B, R] float: 1 on response tokens, 0 on their padding
    query_width: int  # W
    scores: torch.Tensor  # [B] the shaped sequence scores
    truncated: torch.Tensor  # [B] float: 1 where the response ran out of tokens before its stop token
    engine_logprobs: torch.Tensor | None = None  # [B, R] what the engine that sampled gave each sampled token
    logprobs: torch.Tensor | None = None  # [B, R] under the policy that sampled, at sampling temperature
    ref_logprobs: torch.Tensor | None = None  # [B, R] under the reference policy
    values: torch.Tensor | None = None  # [B, R] the value model's, 0 on padding
    samples: list[dict] = field(default_factory=list)  # per row: prompt, response, principles, rewards (for logs)
    stats: dict[str, float] = field(default_factory=dict)  # what making it measured: seconds per part, entropy

    def __len__(self) -> int:
        return self.responses.shape[0]

    def rows(self, index: torch.Tensor) -> Rollout:
        """The rollout restricted to the rows in `index` (a micro-batch), cut to their own widths: the query
        columns that pad every one of them and the response columns past their longest response are dropped, so a
        forward over them computes the same log-probs and values over fewer tokens (a micro-batch of one row runs
        no padding at all). Tensors indexed by response token ([B, R]) are cut alike; `response_width` cuts others."""
        picked = {f.name: getattr(self, f.name)[index] for f in fields(self)
                  if isinstance(getattr(self, f.name), torch.Tensor)}
        query = int(picked["attention_mask"][:, : self.query_width].sum(1).max())
        length = max(1, int(picked["response_mask"].sum(1).max()))
        start, stop = self.query_width - query, self.query_width + length
        for name, x in picked.items():
            if name in SEQUENCE_FIELDS:
                picked[name] = x[:, start:stop]
            elif x.dim() == 2:
                picked[name] = x[:, :length]
        return replace(self, **picked, query_width=query,
                       samples=[self.samples[i] for i in index.tolist()] if self.samples else [])

    def response_width(self, x: torch.Tensor) -> torch.Tensor:
        """`x` ([B, R'] per response token, R' >= this rollout's R) cut to this rollout's response columns."""
        return x[:, : self.responses.shape[1]]

    def chunks(self, size: int) -> list[tuple[torch.Tensor, Rollout]]:
        """(row index, rows) in chunks of `size` rows of similar length, each cut to its own widths (`rows`):
        for the forwards whose results do not depend on which rows share a batch."""
        order = torch.argsort(self.attention_mask.sum(1), stable=True).to(self.input_ids.device)
        return [(order[i : i + size], self.rows(order[i : i + size])) for i in range(0, len(order), size)]


def pack(queries: list[list[int]], responses: list[list[int]], pad_id: int, scores: list[float],
         device: torch.device | str = "cpu", samples: list[dict] | None = None, truncated: list[bool] | None = None,
         engine_logprobs: list[list[float]] | None = None) -> Rollout:
    """The token layout of a rollout on `device`, with the engine's log-probs of the sampled tokens where given,
    without the trainer's log-probs or values yet."""
    width = max(len(q) for q in queries)
    length = max(len(r) for r in responses)
    ids, mask, resp, resp_mask = [], [], [], []
    for q, r in zip(queries, responses):
        ids.append([pad_id] * (width - len(q)) + q + r + [pad_id] * (length - len(r)))
        mask.append([0] * (width - len(q)) + [1] * (len(q) + len(r)) + [0] * (length - len(r)))
        resp.append(r + [pad_id] * (length - len(r)))
        resp_mask.append([1] * len(r) + [0] * (length - len(r)))
    attention = torch.tensor(mask)
    tensors = to_device({"input_ids": torch.tensor(ids), "attention_mask": attention,
                         "position_ids": (attention.cumsum(-1) - 1).clamp(min=0), "responses": torch.tensor(resp),
                         "response_mask": torch.tensor(resp_mask, dtype=torch.float32),
                         "scores": torch.tensor(scores, dtype=torch.float32),
                         "truncated": torch.tensor(truncated or [False] * len(scores), dtype=torch.float32)}, device)
    if engine_logprobs is not None:
        tensors["engine_logprobs"] = torch.tensor([list(lp) + [0.0] * (length - len(lp)) for lp in engine_logprobs],
                                                  dtype=torch.float32, device=tensors["scores"].device)
    return Rollout(**tensors, query_width=width, samples=samples or [])


def response_slice(x: torch.Tensor, width: int, responses: int) -> torch.Tensor:
    """Columns that predict (logits) or value (values) the response tokens: query width - 1 onwards."""
    return x[:, width - 1 : width - 1 + responses]


def policy_outputs(model: Any, rollout: Rollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities of the sampled response tokens, the logits they come from), at sampling temperature,
    in float32. The LM head runs only where it predicts a response token (the response columns and the query's
    last one are the sequence's last R + 1): over the query it would be a fifth of the FLOPs of a 135M model, for
    nothing."""
    length = rollout.responses.shape[1]
    logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                   position_ids=rollout.position_ids, logits_to_keep=length + 1).logits
    logits = logits[:, :length].float() / temperature
    logprobs = logits.gather(-1, rollout.responses.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logprobs, logits


def token_values(value: Any, rollout: Rollout) -> torch.Tensor:
    """The value head at each response token, [B, R], in float32: the classifier's trunk and head called directly
    (its own forward keeps only the last token)."""
    inner = value.module.get_base_model() if hasattr(value, "module") else value.get_base_model()
    hidden = inner.model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                         position_ids=rollout.position_ids).last_hidden_state
    values = inner.score(hidden).squeeze(-1).float()
    return response_slice(values, rollout.query_width, rollout.responses.shape[1])


def by_chunks(rollout: Rollout, size: int, forward: Callable[[Rollout], list[torch.Tensor]]) -> list[torch.Tensor]:
    """`forward`'s per-response-token outputs ([rows, R'] each) over `rollout.chunks(size)`, put back in row order
    as [B, R], 0 past each chunk's responses: a whole rollout's forward in micro-batch-sized, length-sorted pieces,
    so memory stays that of one micro-batch and little of the work is padding."""
    results: list[torch.Tensor] = []
    for index, part in rollout.chunks(size):
        for k, x in enumerate(forward(part)):
            if k == len(results):
                results.append(torch.zeros(rollout.responses.shape, dtype=x.dtype, device=x.device))
            results[k][index, : x.shape[1]] = x
    return results
