"""align/memory.py's model states against DeepSpeed's own estimators, on a counted Llama-2-7B config: full fine-tuning
(every parameter trained, fp16 weights, each rank loading the fp32 checkpoint on the host: what the estimators
assume) on several GPU, node and offload layouts, per GPU and per node's host memory, within 10%."""

from __future__ import annotations

import re

import pytest

from align.memory import Zero, model_states
from align.plan import count_model

LLAMA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                tie_word_embeddings=False)
ROW = re.compile(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.+)$")


@pytest.fixture(scope="module")
def llama_7b():  # noqa: ANN201 - a Shape
    from transformers import LlamaConfig

    return count_model(LlamaConfig(**LLAMA_7B), "all-linear")


def estimates(capsys: pytest.CaptureFixture, estimator, *args) -> dict[str, tuple[float, float]]:  # noqa: ANN001
    """{options: (GB per CPU, GB per GPU)} from the table an `*_all_cold` estimator prints."""
    capsys.readouterr()
    estimator(*args)
    rows = (ROW.match(line) for line in capsys.readouterr().out.splitlines())
    return {re.sub(r"\s+|OffloadDeviceEnum\.", "", m.group(3)): (float(m.group(1)), float(m.group(2)))
            for m in rows if m}  # options as "offload_param=cpu,..." (this Python prints the enum's class name)


def assert_close(ours: int, theirs_gb: float, what: str) -> None:
    assert abs(ours / 2**30 - theirs_gb) <= 0.1 * theirs_gb + 0.01, f"{what}: ours {ours / 2**30:.2f} GB, " \
                                                                    f"DeepSpeed's {theirs_gb:.2f} GB"


# ZeRO-2 with offload on several nodes is left out: DeepSpeed's stage-2 estimator puts the whole model's offloaded
# optimizer states (and a load per GPU of every node) on each node's host; its stage-3 one divides by the nodes.
@pytest.mark.parametrize("gpus, nodes, offload", [(1, 1, False), (4, 1, False), (8, 1, False), (8, 2, False),
                                                  (8, 4, False), (1, 1, True), (4, 1, True), (8, 1, True)])
def test_zero2_model_states_agree_with_deepspeed(llama_7b, capsys, gpus: int, nodes: int, offload: bool) -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    table = estimates(capsys, estimate_zero2_model_states_mem_needs_all_cold, llama_7b.params, gpus, nodes)
    cpu, gpu = table[f"offload_optimizer={'cpu' if offload else 'none'}"]
    ours = model_states(llama_7b.params, 0, llama_7b.largest,
                        Zero(2, weight_bytes=2, load_bytes=4, ranks_per_node=gpus, nodes=nodes,
                             offload_optimizer=offload))
    assert_close(ours.gpu, gpu, "per GPU")
    assert_close(ours.host, cpu, "host per node")


@pytest.mark.parametrize("gpus, nodes, optimizer, params", [
    (1, 1, False, False), (8, 1, False, False), (8, 2, False, False), (4, 1, True, False), (8, 2, True, False),
    (8, 1, True, True), (8, 4, True, True)])
def test_zero3_model_states_agree_with_deepspeed(llama_7b, capsys, gpus: int, nodes: int, optimizer: bool,
                                                 params: bool) -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    table = estimates(capsys, estimate_zero3_model_states_mem_needs_all_cold, llama_7b.params, llama_7b.largest,
                      gpus, nodes)
    cpu, gpu = table[f"offload_param={'cpu' if params else 'none'},offload_optimizer={'cpu' if optimizer else 'none'},"
                     f"zero_init=0"]  # the training base loads the model whole in every rank, no zero.Init
    ours = model_states(llama_7b.params, 0, llama_7b.largest,
                        Zero(3, weight_bytes=2, load_bytes=4, ranks_per_node=gpus, nodes=nodes,
                             offload_optimizer=optimizer, offload_params=params))
    assert_close(ours.gpu, gpu, "per GPU")
    assert_close(ours.host, cpu, "host per node")


def test_lora_is_the_same_formula_over_the_trainable_share(llama_7b) -> None:
    """A frozen base takes its weights alone (sharded at ZeRO-3); the adapter takes what full training takes per
    parameter."""
    lora = llama_7b.lora(16)
    for stage in (0, 1, 2, 3):
        z = Zero(stage, weight_bytes=2, load_bytes=2, ranks_per_node=4)
        both = model_states(lora, llama_7b.params, llama_7b.largest, z).gpu
        base = model_states(0, llama_7b.params, llama_7b.largest, z).gpu
        adapter = model_states(lora, 0, llama_7b.largest, z).gpu
        gathered = 4 * llama_7b.largest if stage == 3 else 0  # one module's weights and gradients, counted once
        assert both == base + adapter - gathered
        assert base == llama_7b.params * 2 // (4 if stage == 3 else 1) + gathered
