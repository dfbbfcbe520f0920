"""The policy stage's layouts (align/placement.py): which task of an allocation trains, runs an engine or idles; a
layout the allocation cannot hold is one line before any job; a split layout at tensor parallelism 2 passes the
stage's validation and the plan, which sizes the trainer nodes and the engine nodes apart. The split layout running
(an engine on one node, the trainer on the other) is tests/test_multinode.py's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from align.errors import UserError
from align.params import load_params
from align.placement import Layout
from tests.conftest import ROOT
from tests.model_configs import LLAMA_2_7B, config_folder


def layout(**values: object) -> Layout:
    return Layout(**{"placement": "split", "nodes": 3, "tasks_per_node": 8, "gpus_per_node": 8,
                     "tensor_parallel_size": 8, "engine_nodes": 1, **values})


def test_trainers_come_first_and_each_engine_node_holds_whole_engines() -> None:
    whole_node = layout()
    assert [whole_node.role(r) for r in (0, 15, 16, 17, 23)] == \
        [("trainer", 0), ("trainer", 15), ("engine", 0), ("idle", -1), ("idle", -1)]
    assert (whole_node.trainers, whole_node.engines, whole_node.sync_world) == (16, 1, 9)
    assert whole_node.served_by(0) == list(range(16))

    tp2 = layout(tensor_parallel_size=2, nodes=4, engine_nodes=2)  # 2 trainer nodes, 2 engine nodes of 4 engines
    assert [tp2.role(r)[1] for r in range(16, 32) if tp2.role(r)[0] == "engine"] == list(range(8))
    assert [tp2.role(r)[0] for r in (19, 20, 24)] == ["engine", "idle", "engine"]
    assert [tp2.served_by(e) for e in (0, 7)] == [[0, 1], [14, 15]]
    assert sorted(r for e in range(8) for r in tp2.served_by(e)) == list(range(16))
    assert tp2.sync_world == 1 + 8 * 2

    colocated = layout(placement="colocated", engine_nodes=0, tensor_parallel_size=1)
    assert colocated.role(23) == ("trainer", 23) and colocated.trainers == colocated.engines == 24


@pytest.mark.parametrize("change, backend, adapter, message", [
    ({"nodes": 1}, "vllm", "merged",
     "params.yaml: cluster.policy.engine_nodes: 1 of nodes: 1; placement: split puts the rollout engines on nodes of "
     "their own and the trainers on the rest: engine_nodes from 1 to 1 (nodes: 2 or more)"),
    ({"engine_nodes": 0}, "vllm", "merged", "params.yaml: cluster.policy.engine_nodes: 0 of nodes: 3;"),
    ({"tensor_parallel_size": 3}, "vllm", "merged",
     "params.yaml: cluster.policy.tensor_parallel_size: 3 does not divide gpus_per_node: 8: each engine node holds "
     "whole engines of 3 GPUs"),
    ({"tensor_parallel_size": 16}, "vllm", "merged",
     "params.yaml: cluster.policy.tensor_parallel_size: 16 spans more GPUs than an engine node has (gpus_per_node: "
     "8)"),
    ({"tasks_per_node": 4, "tensor_parallel_size": 2}, "vllm", "merged",
     "params.yaml: cluster.policy.tasks_per_node: 4; placement: split runs one trainer rank per GPU: set "
     "tasks_per_node: 8 (or null)"),
    ({"tensor_parallel_size": 1, "engine_nodes": 2}, "vllm", "merged",
     "params.yaml: cluster.policy: 16 engines (2 nodes x 8) cannot serve 8 trainer ranks in equal blocks; make the "
     "trainer ranks a multiple of the engines"),
    ({}, "hf", "merged", "params.yaml: cluster.policy.placement: split serves rollouts from vLLM engines; "
                         "generation.backend: hf has none"),
    ({}, "vllm", "lora", "params.yaml: cluster.policy.placement: split sends the adapter to the engines as LoRA "
                         "factors merged into their weights; set rl.rollout_adapter: merged"),
    ({"placement": "colocated"}, "vllm", "merged",
     "params.yaml: cluster.policy.engine_nodes: 1 but placement is colocated"),
])
def test_a_layout_the_allocation_cannot_hold_is_one_line(change: dict, backend: str, adapter: str,
                                                         message: str) -> None:
    with pytest.raises(UserError) as refused:
        layout(**change).check(backend, adapter)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_engines_that_do_not_divide_the_trainers_are_refused() -> None:
    # 3 trainer nodes of 8 ranks, one engine node of 8 / 2 = 4 engines: 24 trainers over 4 engines divides; over 5
    # nodes' worth (one CPU engine per node, 3 trainers) it does not
    layout(nodes=4, tensor_parallel_size=2).check("vllm", "merged")
    with pytest.raises(UserError, match=r"^params.yaml: cluster.policy: 2 engines \(2 nodes x 1\) cannot serve 3 "
                                        r"trainer ranks in equal blocks"):
        layout(nodes=5, engine_nodes=2, tasks_per_node=1, gpus_per_node=0, tensor_parallel_size=1).check("auto",
                                                                                                        "merged")


def test_grpo_split_at_tensor_parallel_2_passes_validation_and_the_plan(tmp_path: Path) -> None:
    """The 7B preset's policy stage as GRPO on two nodes of four A100s: one node of trainers (4 ranks), one of two
    engines at tensor parallelism 2; the plan sizes each part on its own node."""
    from stages.ppo import check_layout

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    preset = tmp_path / "grpo-split.yaml"
    preset.write_text("policy: {algorithm: grpo}\n"
                      "cluster:\n  policy: {nodes: 2, placement: split, engine_nodes: 1, tensor_parallel_size: 2, "
                      "micro_batch_size: 1, score_batch_size: 4, time_min: 2880}\n")
    for applied in (ROOT / "presets/7b-a100x4.yaml", preset):
        proc = subprocess.run([sys.executable, "-m", "align.preset", str(applied), "--params", str(params)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
    check_layout(load_params(params))
    model = config_folder(tmp_path / "model", LLAMA_2_7B)
    proc = subprocess.run([sys.executable, "-m", "align.plan", "--params", str(params), "--model", str(model)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("policy")]
    assert [r.split()[2] for r in rows] == ["policy", "reward", "merge", "vllm"]  # no value model for GRPO
    assert [r.split()[1] for r in rows] == ["trainers"] * 3 + ["engines"] and "tp2" in rows[-1]


def test_the_request_store_waits_past_its_poll_and_raises_an_engines_failure() -> None:
    """`take` waits for a value posted later than one poll (a rollout takes long), reads it once, and a waiting
    trainer raises the error a failed engine posted instead of waiting for ever."""
    import threading
    import time

    from align.generation import Completion, Sampling
    from align.placement import FAILED, POLL, completion, post, requests_store, take
    from slurm.submit import free_port

    port = free_port() - 1  # the store listens on port + 1
    host = requests_store("127.0.0.1", port, True, 1)
    client = requests_store("127.0.0.1", port, False, 1)
    answer = [Completion("hi", 2, "stop", (5, 6), (-0.25, -1.5))]
    threading.Timer(POLL.total_seconds() + 1, post, (host, "answer/0/0", answer)).start()
    started = time.perf_counter()
    assert [completion(c) for c in take(client, "answer/0/0")] == answer
    assert time.perf_counter() - started > POLL.total_seconds() and not client.check(["answer/0/0"])  # deleted
    post(client, "ask/0/0", {"texts": ["a"], "sampling": Sampling(temperature=0.7, n=2, seed=3)})
    assert take(host, "ask/0/0") == {"texts": ["a"], "sampling": {"temperature": 0.7, "top_p": 1.0,
                                                                 "max_new_tokens": 128, "stop": [], "seed": 3,
                                                                 "n": 2, "logprobs": False}}
    host.set(FAILED, "engine 1 on n3: CUDA out of memory")
    with pytest.raises(RuntimeError, match="^a rollout engine failed: engine 1 on n3: CUDA out of memory$"):
        take(client, "answer/1/0")


@pytest.mark.slow
def test_two_engines_serve_two_trainers_as_two_colocated_ranks(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Four tasks started as SLURM would on four one-task nodes (two trainer ranks, two engine nodes, each engine
    serving one trainer) against two colocated ranks on one node: the same samples and curves, PPO over two
    iterations. (The two-node SLURM run of one engine is tests/test_multinode.py's.)"""
    from align.records import read_jsonl
    from tests.helpers import curve, policy_tasks
    from tests.projects import TINY_RL, TINY_RL_EXECUTION, ppo_project
    from tests.tiny import make_tiny_model

    pytest.importorskip("vllm")
    model = make_tiny_model(tmp_path / "wide", hidden=128)  # vLLM's CPU attention has no kernel for head_dim 16
    runs = {}
    for name, (nodes, tasks, layout) in {"colocated": (1, 2, {}),
                                         "split": (4, 1, {"placement": "split", "engine_nodes": 2})}.items():
        cwd = ppo_project(tmp_path / name, model, generation={"backend": "vllm"},
                          rl={**TINY_RL, "iterations": 2, "vllm_is_correction": True},
                          cluster_defaults={**TINY_RL_EXECUTION, "save_every_steps": 1000, "kv_cache_gb": 1},
                          cluster={"policy": {"nodes": nodes, "tasks_per_node": tasks, **layout}})
        monkeypatch.chdir(cwd)
        done = policy_tasks(cwd, tasks_per_node=tasks, nodes=nodes)
        assert [t.returncode for t in done] == [0] * len(done), "\n".join(t.stdout[-2000:] for t in done)
        runs[name] = (cwd, done)
    (colocated, _), (split, tasks) = runs["colocated"], runs["split"]
    assert "rank 0 of 2 on cpu (gloo)" in tasks[0].stdout
    assert ["serves trainer ranks 0-0" in tasks[2].stdout, "serves trainer ranks 1-1" in tasks[3].stdout] == [True] * 2
    assert read_jsonl(split / "models/policy/samples.jsonl") == read_jsonl(colocated / "models/policy/samples.jsonl")
    for metric in ("reward_raw", "kl", "policy_loss", "value_loss"):
        assert [v for _, v in curve(split, "policy", metric)] == \
            pytest.approx([v for _, v in curve(colocated, "policy", metric)], rel=1e-5, abs=1e-6), metric


def test_an_engine_task_takes_its_slice_of_the_nodes_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """The submission layer gives each task one GPU of the node's list and keeps the list (NODE_DEVICES): engine 1 of
    a node of 4 at tensor parallelism 2 takes SLURM's third and fourth device, not its trainer-sized share."""
    from align.placement import engine_devices
    from slurm.submit import NODE_DEVICES

    tp2 = layout(nodes=2, tasks_per_node=4, gpus_per_node=4, tensor_parallel_size=2)
    monkeypatch.setenv(NODE_DEVICES, "4,5,6,7")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    engine_devices(tp2, local_rank=1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"
    monkeypatch.delenv(NODE_DEVICES)  # started by hand (tests.helpers.policy_tasks): the task's own list is the node's
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    engine_devices(tp2, local_rank=0)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
