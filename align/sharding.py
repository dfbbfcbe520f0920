"""A model spread over the job's ranks with DeepSpeed ZeRO-3, so that no rank ever holds all of it: for training
(align/training.py).

With transformers' `HfDeepSpeedConfig` alive, `from_pretrained` builds the model under `deepspeed.zero.Init` and
each rank keeps 1/N of every parameter as it loads (rank 0 reads each module's weights from the checkpoint, one
module gathered at a time); a model loaded without it is whole on every rank until `deepspeed.initialize`
partitions it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


def world_size() -> int:
    """Ranks of the job's process group (1 where there is none)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextlib.contextmanager
def partitioned(config: dict) -> Iterator[None]:
    """Models loaded with `from_pretrained` inside are partitioned over the ranks as they load, where `config` (a
    DeepSpeed config) runs ZeRO-3; as they are elsewhere. Kept alive only while loading: transformers reads it
    later only to make `generate` collective, which nothing here uses."""
    if config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(config)  # transformers holds a weak reference: alive while this name is
    try:
        yield
    finally:
        del keep
