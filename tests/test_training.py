"""align/training.py on the tiny Llama: DeepSpeed config mapping, LoRA-only updates, adapter round trip, exact
resume (also after a crash), and 2-process ZeRO-2/ZeRO-3 runs through the submission layer, ZeRO-3 loading each
rank's shard alone."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from align.training import (
    collate, deepspeed_config, fit, init_distributed, latest_checkpoint, lora_model, make_engine, save_adapter,
    sft_job, sft_loss, shuffled_batches, tokenize_pair,
)
from align.errors import UserError
from slurm.submit import JobSpec, submit
from tests.helpers import DEFAULTS, TINY_TRAINING, inline, resources, training_run
from tests.sharded_jobs import train_both_heads
from tests.tiny import PAIRS


def _crash_after(calls: int, counter: list[int], model, batch: dict) -> torch.Tensor:  # noqa: ANN001
    """sft_loss that raises on its `calls`+1-th call: a job killed in the middle of a step."""
    counter[0] += 1
    if counter[0] > calls:
        raise RuntimeError("simulated crash")
    return sft_loss(model, batch)


# ------------------------------------------------------------------------------------------------ pure parts


def test_deepspeed_config_maps_params() -> None:
    cfg = deepspeed_config(training_run(micro_batch_size=3, batch_size=24, learning_rate=5e-5), 2)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) \
        == (24, 3, 4)
    assert cfg["zero_optimization"] == {"stage": 2}
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["optimizer"]["params"]["lr"] == 5e-5
    assert cfg["gradient_clipping"] == 1.0
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]

    cfg = deepspeed_config(training_run(zero_stage=3, offload="cpu", precision="bf16", max_grad_norm=0.5), 1)
    assert cfg["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                        "offload_param": {"device": "cpu"}}
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"] and cfg["gradient_clipping"] == 0.5
    assert cfg["train_batch_size"] == 1

    cfg = deepspeed_config(training_run(zero_stage=2, offload="cpu", precision="fp16", batch_size=8), 8)
    assert cfg["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}  # no param offload
    assert cfg["fp16"]["enabled"] and not cfg["bf16"]["enabled"] and cfg["train_batch_size"] == 8

    assert deepspeed_config(training_run(zero_stage=2), 1)["zero_optimization"] == {"stage": 0}  # one rank: no shards
    cfg = deepspeed_config(training_run(zero_stage=0, offload="cpu"), 1)
    assert cfg["zero_optimization"] == {"stage": 0} and "zero_force_ds_cpu_optimizer" not in cfg


def test_tokenize_pair_masks_the_prompt(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ex = tokenize_pair(tok, "Say hi.", "hi there")
    learned = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    assert tok.decode(ex["input_ids"]).endswith("<|im_start|>assistant\nhi there<|im_end|>\n")
    assert tok.decode(learned) == "hi there<|im_end|>\n"
    assert ex["labels"][: len(ex["labels"]) - len(learned)] == [-100] * (len(ex["labels"]) - len(learned))

    batch = collate([ex, tokenize_pair(tok, "Q", "A")], pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    short = batch["attention_mask"][1].sum()
    assert (batch["labels"][1, short:] == -100).all() and (batch["input_ids"][1, short:] == tok.pad_token_id).all()

    batches = shuffled_batches(list(range(5)), 2, seed=3, collate_fn=lambda xs: torch.tensor(xs))
    stream = torch.cat([batches(i) for i in range(5)]).tolist()  # two epochs of 5 examples
    assert sorted(stream[:5]) == sorted(stream[5:]) == list(range(5)) and torch.equal(batches(2), batches(2))


# --------------------------------------------------------------------------------------------- one process


def test_gradient_checkpointing_recomputes_every_layer_and_gives_the_same_loss_and_gradients(
        tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    batch = collate([tokenize_pair(tok, p, r) for p, r in PAIRS[:2]], tok.pad_token_id)
    runs, modes = {}, {}
    for recompute in (False, True):
        model = lora_model(tiny_model, training_run(lora_r=4, lora_alpha=8, gradient_checkpointing=recompute), seed=0)
        modes[recompute] = {name: m.training for name, m in model.named_modules()
                            if getattr(m, "gradient_checkpointing", None) is None}  # all but the flagged layers
        layers = model.get_base_model().model.layers
        calls = [0] * len(layers)
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        loss = sft_loss(model, batch)
        assert calls == [1] * len(layers)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        runs[recompute] = loss.detach(), grads, calls
    assert modes[True] == modes[False]  # recomputing switches no dropout (or anything else) to another mode
    assert runs[False][2] == [1] * len(runs[False][2])  # kept: no layer runs again in the backward pass
    assert runs[True][2] == [2] * len(runs[True][2])  # recomputed: every layer once more in the backward pass
    assert torch.allclose(runs[False][0], runs[True][0])
    assert runs[False][1].keys() == runs[True][1].keys()
    assert all(torch.allclose(runs[False][1][n], runs[True][1][n], atol=1e-6) for n in runs[False][1])


def test_one_process_trains_only_lora_and_adapter_round_trips(roomy_model: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    training = training_run(**{**TINY_TRAINING, "batch_size": 2}, zero_stage=2, save_every_steps=100)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded, so that what init_distributed exports is removed after the test:
        monkeypatch.delenv(name)  # a later test's subprocess would inherit this process group's port, in use
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # as a job started without the venv on PATH
    assert init_distributed() == (0, 1)  # no environment: one process on a free local port
    if not torch.cuda.is_available():  # DeepSpeed's CPU op builds with the ninja install.sh built it with
        assert os.environ["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    model = lora_model(roomy_model, training, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = make_engine(model, training, world_size=1)
    tok = AutoTokenizer.from_pretrained(roomy_model)
    # 2 pairs and a global batch of 2: every step sees the whole set, so the curve is the full-data loss
    batches = shuffled_batches([tokenize_pair(tok, p, r) for p, r in PAIRS[:2]], 1, 0,
                               functools.partial(collate, pad_id=tok.pad_token_id))
    result = fit(engine, batches, sft_loss, tmp_path / "ckpt", training, max_steps=16, log=None)
    save_adapter(engine, tmp_path / "adapter")
    targets = json.loads((tmp_path / "adapter/adapter_config.json").read_text())["target_modules"]
    assert len(targets) > 1 and targets == sorted(targets)  # PEFT writes a set: its order varies with the hash seed

    losses = result["losses"]
    assert len(losses) == 16 and result["start_step"] == 0
    assert losses[-1] < 0.4 * losses[0] and sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses  # overfits
    after = dict(engine.module.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all("lora_" in n for n in changed)
    assert {n for n, p in after.items() if p.requires_grad} == {n for n in before if "lora_" in n}
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)  # base weights untouched
    assert latest_checkpoint(tmp_path / "ckpt") == "step_00000016"  # the final step is always checkpointed

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(roomy_model), tmp_path / "adapter")
    ids = collate([tokenize_pair(tok, *PAIRS[0])], tok.pad_token_id)["input_ids"]
    engine.module.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(engine.module(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5)


def test_resume_continues_the_same_loss_curve(tiny_model: Path, tmp_path: Path) -> None:
    training = training_run(**{**TINY_TRAINING, "batch_size": 2}, save_every_steps=3, keep_checkpoints=2)
    run = functools.partial(sft_job, tiny_model, PAIRS, training=training, log=None)
    full = inline(functools.partial(run, tmp_path / "a", max_steps=10))
    first = inline(functools.partial(run, tmp_path / "b", max_steps=4))  # checkpoints at 3 and 4 (the end)
    assert sorted(p.name for p in (tmp_path / "b").glob("step_*")) == ["step_00000003", "step_00000004"]
    rest = inline(functools.partial(run, tmp_path / "b", max_steps=10, adapter_dir=tmp_path / "adapter"))

    assert first["losses"] == full["losses"][:4]
    assert rest["start_step"] == 4 and rest["step"] == 10
    # the same computation replayed from restored weights, Adam moments, data position and dropout RNG: exact
    assert rest["losses"] == pytest.approx(full["losses"], abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "b").glob("step_*")) == ["step_00000009", "step_00000010"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_crash_mid_run_loses_at_most_one_checkpoint_interval(tiny_model: Path, tmp_path: Path) -> None:
    training = training_run(**{**TINY_TRAINING, "batch_size": 2}, save_every_steps=3)
    run = functools.partial(sft_job, tiny_model, PAIRS, tmp_path / "ckpt", training, 10, log=None)
    full = inline(functools.partial(sft_job, tiny_model, PAIRS, tmp_path / "full", training, 10, log=None))
    crash_step = 8  # raises in the middle of step 8's accumulation (after one of its two micro-batches)
    with pytest.raises(RuntimeError, match="simulated crash"):
        inline(functools.partial(run, loss_fn=functools.partial(_crash_after, 7 * 2 + 1, [0])))
    assert latest_checkpoint(tmp_path / "ckpt") == "step_00000006"
    (tmp_path / "ckpt" / "step_00000009").mkdir()  # a half-written checkpoint of a crash during save: ignored
    (tmp_path / "ckpt" / "step_00000009" / "junk").write_text("partial")

    resumed = inline(run)
    assert crash_step - resumed["start_step"] <= training.save_every_steps
    assert resumed["start_step"] == 6
    assert resumed["losses"] == pytest.approx(full["losses"], abs=1e-6)
    assert not (tmp_path / "ckpt" / "step_00000009" / "junk").exists()  # re-saved clean at step 9


def test_a_checkpoint_that_does_not_load_is_one_line_naming_it(tiny_model: Path, tmp_path: Path) -> None:
    """A damaged checkpoint (here truncated, as a full disk leaves it) stops the resumed run with one line naming
    the checkpoint, DeepSpeed's reason and the way out, not a traceback from inside torch.load."""
    training = training_run(**{**TINY_TRAINING, "batch_size": 2}, save_every_steps=2)
    run = functools.partial(sft_job, tiny_model, PAIRS, tmp_path / "ckpt", training, log=None)
    inline(functools.partial(run, max_steps=2))
    states = next((tmp_path / "ckpt" / "step_00000002").glob("*model_states.pt"))
    states.write_bytes(states.read_bytes()[:100])
    folder = re.escape(str(tmp_path / "ckpt" / "step_00000002"))
    with pytest.raises(UserError, match=rf"^{folder}: this checkpoint does not load \(\w+Error: .+\); .+: move "
                                        rf"{re.escape(str(tmp_path / 'ckpt'))} aside to start the stage over$"):
        inline(functools.partial(run, max_steps=4))


def test_the_sft_loss_is_the_token_mean_of_the_step_whatever_the_micro_batch(tiny_model: Path,
                                                                              tmp_path: Path) -> None:
    """A step's loss and update are those of its whole batch: the same global batch cut into micro-batches of 1 or
    of 2 gives the same loss curve (a mean of per-micro-batch token means would weigh a token by how long its
    neighbours are: the pairs differ in length, so it would not)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert len({len(tokenize_pair(tokenizer, p, r)["labels"]) for p, r in PAIRS}) > 1  # so the two means differ
    runs = {}
    for micro in (1, 2):
        training = training_run(**{**TINY_TRAINING, "lora_dropout": 0.0, "batch_size": 2}, micro_batch_size=micro,
                                save_every_steps=100)
        runs[micro] = inline(functools.partial(sft_job, tiny_model, PAIRS, tmp_path / f"m{micro}", training, 4,
                                               log=None))["losses"]
    assert runs[1] == pytest.approx(runs[2], rel=1e-5)


def test_a_run_resumes_after_its_micro_batch_size_changed(tiny_model: Path, tmp_path: Path) -> None:
    """The micro-batch is a memory setting: a run checkpointed with micro-batches of 1 resumes with micro-batches of
    2 (an out-of-memory fix in reverse) at the step it reached, on the same examples, and ends where a run that
    never changed would."""
    setup = {**TINY_TRAINING, "lora_dropout": 0.0, "batch_size": 2}
    run = functools.partial(sft_job, tiny_model, PAIRS, log=None)
    full = inline(functools.partial(run, tmp_path / "full", training_run(**setup, micro_batch_size=2,
                                                                         save_every_steps=100), 8))
    inline(functools.partial(run, tmp_path / "ckpt", training_run(**setup, micro_batch_size=1, save_every_steps=2),
                             4))
    resumed = inline(functools.partial(run, tmp_path / "ckpt", training_run(**setup, micro_batch_size=2,
                                                                            save_every_steps=2), 8))
    assert resumed["start_step"] == 4
    assert resumed["losses"] == pytest.approx(full["losses"], rel=1e-5)


# ---------------------------------------------------------------------------------------------- two processes


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_match_one_process(tiny_model: Path, tmp_path: Path, stage: int) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the same global batch of 2: 1 rank x 2 accumulation micro-batches, or 2 ranks x 1, over the same stream;
    # no dropout: with it each rank draws its own masks, so the runs would differ by more than arithmetic order
    training = training_run(**{**TINY_TRAINING, "lora_dropout": 0.0, "batch_size": 2}, zero_stage=stage,
                            save_every_steps=3)  # 1 rank accumulates 2 micro-batches, 2 ranks take one each
    single = inline(functools.partial(sft_job, tiny_model, PAIRS, tmp_path / "ckpt1", training, 6,
                                       adapter_dir=tmp_path / "adapter1", log=None))

    def two_processes(max_steps: int) -> dict:
        spec = JobSpec(
            stage=f"train_zero{stage}",
            fn=functools.partial(sft_job, tiny_model, PAIRS, tmp_path / "ckpt2", training, max_steps,
                                 adapter_dir=tmp_path / "adapter2"),
            resources=resources(tasks_per_node=2, cpus_per_task=1, time_min=10),
            target=tmp_path / "adapter2", key={"stage": stage, "max_steps": max_steps},
        )
        start = time.monotonic()
        result = submit(spec, DEFAULTS.cluster.model_copy(update={"executor": "local",
                                                                    "log_dir": str(tmp_path / "logs")}))
        print(f"ZeRO-{stage}, 2 processes, to step {max_steps}: {time.monotonic() - start:.1f} s")
        return result

    first = two_processes(3)  # then a second job resumes from its sharded checkpoint
    tag = tmp_path / "ckpt2" / "step_00000003"
    assert latest_checkpoint(tmp_path / "ckpt2") == tag.name
    assert {p.name for p in tag.glob("*optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    result = two_processes(6)

    assert first["step"] == 3 and result["start_step"] == 3 and result["step"] == 6 and len(result["losses"]) == 6
    # Tolerance 1e-6 relative. Seen: bitwise equal (1 rank: g1/2 + g2/2 accumulated; 2 ranks: (g1 + g2)/2 by
    # all-reduce - the same in floating point for two terms); more ranks or bf16 would reorder sums.
    assert result["losses"] == pytest.approx(single["losses"], rel=1e-6)
    assert result["losses"][-1] < result["losses"][0]
    assert latest_checkpoint(tmp_path / "ckpt2") == "step_00000006"

    weights = load_file(tmp_path / "adapter2" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "adapter1" / "adapter_model.safetensors")
    assert weights.keys() == reference.keys() and all(weights[k].shape == reference[k].shape for k in weights)
    assert all(w.numel() > 0 for w in weights.values())  # ZeRO-3 shards gathered, not empty placeholders
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = collate([tokenize_pair(tok, *PAIRS[0])], tok.pad_token_id)["input_ids"]
    with torch.no_grad():
        a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "adapter1")
        b = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "adapter2")
        assert torch.allclose(a.eval()(input_ids=ids).logits, b.eval()(input_ids=ids).logits, atol=1e-5)


def test_sft_pads_with_eos_where_the_tokenizer_has_no_pad_token(tiny_model: Path, tmp_path: Path) -> None:
    """Base models often ship no pad token: batches of two pad with the eos id (masked) instead of crashing on
    pad_token_id None, and every other helper agrees on that id."""
    from transformers import AutoTokenizer

    from align.models import padding_id

    model = tmp_path / "no_pad"
    shutil.copytree(tiny_model, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    assert tokenizer.pad_token_id is None and padding_id(tokenizer) == tokenizer.eos_token_id
    training = training_run(**{**TINY_TRAINING, "batch_size": 2}, micro_batch_size=2)
    result = inline(functools.partial(sft_job, model, PAIRS, tmp_path / "ckpt", training, 3, log=None))
    assert len(result["losses"]) == 3 and all(math.isfinite(loss) for loss in result["losses"])


@pytest.mark.slow
def test_zero3_loads_each_rank_its_shard_and_trains_as_zero2(tiny_model: Path, tmp_path: Path) -> None:
    """Two gloo ranks through the local executor, the causal LM and the reward model (the scalar head, as the
    value model's trunk) each loaded by `lora_model`: at ZeRO-3 each rank holds half of the base model's elements
    from the moment it is loaded (before: the whole model on every rank until the engine partitioned it), and half
    of every element once the engine is built; a few steps give ZeRO-2's losses, where every rank holds it all."""
    training = training_run(**{**TINY_TRAINING, "lora_dropout": 0.0, "batch_size": 2}, save_every_steps=100)
    found = {}
    for stage in (2, 3):
        at_stage = training.model_copy(update={"zero_stage": stage})
        spec = JobSpec(stage=f"load_zero{stage}",
                       fn=functools.partial(train_both_heads, tiny_model, at_stage, tmp_path / f"ckpt{stage}", 3),
                       resources=resources(tasks_per_node=2, cpus_per_task=1, time_min=10),
                       target=tmp_path / f"out{stage}", key={"stage": stage})
        found[stage] = submit(spec, DEFAULTS.cluster.model_copy(update={"executor": "local",
                                                                          "log_dir": str(tmp_path / "logs")}))
    for head in ("lm", "reward"):
        zero2, zero3 = found[2][head], found[3][head]
        assert zero2["loaded"] == [1.0, 1.0] and zero2["built"] == [1.0, 1.0]
        assert all(share <= 0.55 for share in zero3["loaded"] + zero3["built"]), zero3
        assert len(zero3["losses"]) == 3 and zero3["losses"] == pytest.approx(zero2["losses"], rel=1e-5), head
