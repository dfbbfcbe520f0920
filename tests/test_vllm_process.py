"""Where a vLLM engine runs (align/generation.py `in_process`): on a CPU with one worker, in a job with no
torch.distributed group, in the job's own process, which it leaves as it found it. Each check runs in a new
interpreter, as a job does: pytest's process holds what earlier tests left there (an inline job's group, which
DeepSpeed's cached groups keep it from ending; an engine a module fixture holds open), and with a group there an
engine rightly spawns."""

from __future__ import annotations

import gc
import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest

from align import generation as gen
from tests.helpers import engine
from tests.tiny import make_tiny_model

SAMPLED = gen.Sampling(temperature=0.8, max_new_tokens=8, seed=3)


def in_a_new_process(check: Callable[[Path], Any], tmp_path: Path) -> Any:
    """`check(tmp_path)` in a new interpreter (spawned, as a job's process starts); its exception raised here."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(check, tmp_path).result()


def test_an_engine_runs_in_process_only_on_one_cpu_worker_without_a_group(tmp_path: Path) -> None:
    in_a_new_process(where_engines_run, tmp_path)


def test_an_in_process_engine_leaves_the_process_as_it_found_it(tmp_path: Path) -> None:
    """No engine-core or worker process; gc's heap is not frozen and vLLM's environment cache is off, while it is
    open and after; afterwards the job's random generators draw what they would have drawn and the variable that
    kept it in process is gone; its seeded samples are the same in a second engine."""
    pytest.importorskip("vllm")
    in_a_new_process(engine_leaves_the_process_as_it_found_it, tmp_path)


def where_engines_run(tmp_path: Path) -> None:
    import torch.distributed as dist

    assert gen.in_process(True, 1) and not gen.in_process(True, 2) and not gen.in_process(False, 1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert not gen.in_process(True, 1)  # the job's group is not an engine's to take (and destroy)
    finally:
        dist.destroy_process_group()


def engine_leaves_the_process_as_it_found_it(tmp_path: Path) -> None:
    import numpy as np
    import psutil
    import torch
    import torch.distributed as dist
    from vllm import envs

    model = make_tiny_model(tmp_path / "model", hidden=128)  # head_dim 32: vLLM's CPU attention has no 16
    samples = []
    for _ in range(2):
        random.seed(1), np.random.seed(1), torch.manual_seed(1)
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        with gen.Generator(model, engine(backend="vllm", kv_cache_gb=1)) as generator:
            started = {p.pid for p in psutil.Process().children(recursive=True)} - before
            assert generator._impl.in_process and not started
            # while it is open too: the job's garbage stays collectable, a second engine reads its own environment
            assert gc.get_freeze_count() == 0 and not envs._is_envs_cache_enabled()
            samples.append(generator.generate(["The quick brown fox", "1 2 3"], SAMPLED))
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == pytest.approx(
            (random.Random(1).random(), np.random.RandomState(1).rand(), torch.rand(1, generator=torch.Generator().
                                                                                   manual_seed(1)).item()))
        assert gc.get_freeze_count() == 0 and not envs._is_envs_cache_enabled()
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ and not dist.is_initialized()
    assert samples[0] == samples[1]
