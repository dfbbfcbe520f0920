"""Job functions for the tests of models spread over ranks (ZeRO-3): module-level, so that submitit pickles them by
reference and each rank imports them from this repository. Each returns, on every rank, what every rank saw."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch


def held_share(params: list[torch.nn.Parameter]) -> float:
    """The share of the parameters' elements this rank holds: a ZeRO-3 partitioned parameter's own shard
    (`ds_tensor`; the parameter itself is an empty placeholder), any other parameter whole."""
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return held / sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)


def every_rank(value: Any) -> list:
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def train_both_heads(model_dir: Path, training: Any, ckpt_dir: Path, steps: int) -> dict:
    """The causal LM (SFT loss on tests.tiny.PAIRS) and the reward model (Bradley-Terry on pairs of them), each
    loaded by `lora_model` and trained `steps` steps by `fit`: per head, each rank's share of the base model's
    elements right after loading and of every element once the engine is built, and the loss curve."""
    from transformers import AutoTokenizer

    from align.reward import bt_loss, pair_batches
    from align.training import (
        collate, fit, init_distributed, lora_model, make_engine, sft_loss, shuffled_batches, tokenize_pair,
    )
    from tests.tiny import PAIRS

    init_distributed()
    tok = AutoTokenizer.from_pretrained(model_dir)
    sequences = [tokenize_pair(tok, p, r) for p, r in PAIRS]
    data = {
        "lm": (sft_loss, shuffled_batches(sequences, training.micro_batch_size, 0,
                                          functools.partial(collate, pad_id=tok.pad_token_id))),
        "reward": (bt_loss, pair_batches([{"chosen": a["input_ids"], "rejected": b["input_ids"]}
                                          for a, b in zip(sequences, sequences[1:] + sequences[:1])],
                                         training.micro_batch_size, 0, tok.pad_token_id)),
    }
    found = {}
    for head, (loss_fn, batches) in data.items():
        model = lora_model(model_dir, training, seed=0, head=head)
        loaded = held_share([p for p in model.parameters() if not p.requires_grad])
        engine = make_engine(model, training, torch.distributed.get_world_size(), total_steps=steps)
        built = held_share(list(model.parameters()))
        result = fit(engine, batches, loss_fn, ckpt_dir / head, training, steps, log=None)
        found[head] = {"loaded": every_rank(loaded), "built": every_rank(built), "losses": result["losses"]}
    return found


def score_over_ranks(base: Path, rm_dir: Path, own_rows: list[list[tuple]], shared_rows: list[tuple]) -> dict:
    """The RM spread over the job's ranks (`RewardScorer(shard=True)`): rank r scores `own_rows[r]` (ranks with
    different numbers of rows, or none), then every rank the same `shared_rows`, a share each
    (`rows_over_ranks`). Every rank's rewards, its share of the RM's elements once loaded, and whether it reuses
    prefixes."""
    from align.reward import RewardScorer
    from align.sharding import rows_over_ranks
    from align.training import init_distributed

    rank, _ = init_distributed()
    rm = RewardScorer(base, rm_dir, batch_size=2, shard=True)
    held = held_share(list(rm.model.model.parameters()))  # before a forward pass gathers the small persistent ones
    mine = own_rows[rank]
    own = rm.score([p for p, _, _ in mine], [r for _, r, _ in mine], [g for _, _, g in mine])
    shared = rows_over_ranks(rm.score)(*(list(column) for column in zip(*shared_rows)))
    return {"own": every_rank(own), "shared": shared, "held": every_rank(held),
            "reuse_prefix": rm.reuse_prefix}
