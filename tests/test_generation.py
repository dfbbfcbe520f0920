"""align/generation.py on real transformers, PEFT and vLLM (CPU build) with the tiny model.

The tiny model is built with hidden=128 (head_dim 32: vLLM's CPU attention has no kernel for the default head_dim
16) and its matrices re-drawn with std 0.2: at the default init std 0.02 a random tied-embedding model just repeats
the last prompt token, so greedy outputs would agree even if the shared-prefix cache were ignored. With std 0.2 each
continuation depends on the whole prompt.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from align.errors import UserError
from align import generation as gen
from tests.helpers import engine
from tests.tiny import make_tiny_model

SYSTEM = "An assistant answers questions helpfully, honestly and harmlessly. Principles: be ethical and candid. " * 3
QUESTIONS = ["What is the capital of France?", "1 2 3", "def add(a, b):\n    return a + b", "The quick brown fox", "Hi"]
GREEDY = gen.Sampling(max_new_tokens=24)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    folder = make_tiny_model(tmp_path_factory.mktemp("gen") / "model", hidden=128)
    lm = AutoModelForCausalLM.from_pretrained(folder)
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in lm.parameters():
            if weight.dim() == 2:
                weight.normal_(0, 0.2, generator=rng)
    lm.save_pretrained(folder)
    return folder


ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(model: Path, out: Path, seed: int, targets: tuple[str, ...] = ALL_PROJECTIONS, **config: Any
                 ) -> Path:
    """A rank-8 LoRA on `targets` with non-zero B (PEFT's default B = 0 would change nothing); `config`: other
    LoraConfig fields."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    lora = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=list(targets), **config)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model), lora).save_pretrained(out)
    return out


def merge_and_unload(model: Path, adapter: Path, out: Path) -> Path:
    """The HF folder of `model` with `adapter` merged by PEFT itself (`merge_and_unload`), tokenizer included."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), str(adapter)).merge_and_unload() \
        .save_pretrained(out)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    return make_adapter(model, folder / "a", 1), make_adapter(model, folder / "b", 2)


@pytest.fixture(scope="module")
def hf(model: Path) -> gen.Generator:
    return gen.Generator(model, engine(backend="hf", generate_batch_size=3), lora_rank=8)


@pytest.fixture(scope="module")
def prompts(hf: gen.Generator) -> list[str]:
    """Chat prompts sharing a long system prompt, with user turns of different token lengths."""
    return [gen.chat_prompt(hf.tokenizer, [{"role": "user", "content": q}], system=SYSTEM) for q in QUESTIONS]


def stop_string(text: str) -> str:
    """Two letters from the middle of a greedy output: a stop string that really occurs, not at its start."""
    match = re.search(r"[A-Za-z]{2}", text[3:])
    assert match, f"no letters to stop at in {text!r}"
    return match.group()


# ----------------------------------------------------------------------------------------------------------- hf


def test_backend_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert gen.resolve_backend("hf") == "hf"
    monkeypatch.setattr(gen, "vllm_import_error", lambda: "ImportError: libnuma.so.1: cannot open shared object file")
    assert gen.resolve_backend("auto") == "hf"
    with pytest.raises(UserError, match=r"params.yaml: generation.backend: 'vllm' but vllm does not import here "
                                         r"\(ImportError: libnuma"):
        gen.resolve_backend("vllm")


def test_chat_prompt(hf: gen.Generator) -> None:
    text = gen.chat_prompt(hf.tokenizer, [{"role": "user", "content": "Hi"}], system="Be brief.")
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_prefix_reuse_matches_plain_left_padding(hf: gen.Generator, prompts: list[str]) -> None:
    ids = hf.tokenizer(prompts)["input_ids"]
    assert len({len(row) for row in ids}) == len(ids), "suffixes of different lengths exercise the padding"
    sampled = gen.Sampling(temperature=1.0, max_new_tokens=16, seed=3)
    impl = hf._impl
    try:
        impl.reuse_prefix = True
        impl.prefix.clear()
        reused, reused_sampled = hf.generate(prompts, GREEDY), hf.generate(prompts, sampled)
        tokens, cache = impl.prefix.tokens, impl.prefix.cache
        assert cache.get_seq_length() == len(tokens) >= len(hf.tokenizer(SYSTEM)["input_ids"])  # it was used
        impl.reuse_prefix = False
        impl.prefix.clear()
        plain, plain_sampled = hf.generate(prompts, GREEDY), hf.generate(prompts, sampled)
        assert impl.prefix.cache is None
    finally:
        impl.reuse_prefix = True
    assert reused == plain  # greedy, token for token (text and count)
    assert reused_sampled == plain_sampled  # same random stream consumed the same way
    assert len({r.text for r in reused}) == len(prompts), "outputs depend on the prompt"


def test_batch_equals_one_by_one(hf: gen.Generator, prompts: list[str]) -> None:
    batched = hf.generate(prompts, GREEDY)  # batches of 3 and 2; the second reuses the first's prefix cache
    assert batched == [hf.generate([p], GREEDY)[0] for p in prompts]
    assert all(r.finish_reason == "length" and r.num_tokens == GREEDY.max_new_tokens for r in batched)


def test_stop_strings(hf: gen.Generator, prompts: list[str]) -> None:
    full = hf.generate(prompts[:2], GREEDY)
    stops = [stop_string(r.text) for r in full]
    for prompt, whole, stop in zip(prompts, full, stops):
        (cut,) = hf.generate([prompt], gen.Sampling(max_new_tokens=24, stop=(stop, "never-seen")))
        assert cut.text == whole.text[: whole.text.index(stop)]
        assert cut.finish_reason == "stop" and 0 < cut.num_tokens < GREEDY.max_new_tokens
        assert cut.text, "the stop string is not at the start"
    # in a batch, a row that stops early is padded while the other goes on; its record ignores the padding
    both = hf.generate(prompts[:2], gen.Sampling(max_new_tokens=24, stop=(stops[0],)))
    assert both[0].text == full[0].text[: full[0].text.index(stops[0])] and both[0].finish_reason == "stop"
    assert (stops[0] in full[1].text) == (both[1].finish_reason == "stop")


def test_eos_record(hf: gen.Generator) -> None:
    """An eos token ends a row: counted, not in the text; the padding after it is ignored."""
    tok = hf.tokenizer
    prompt, body = tok("Hi")["input_ids"], tok(" The quick brown fox")["input_ids"]
    row = body + [tok.eos_token_id] + [tok.pad_token_id] * 3
    assert hf._impl._record(prompt, row, ()) == gen.Completion(" The quick brown fox", len(body) + 1, "stop",
                                                               tuple(body + [tok.eos_token_id]))
    assert hf._impl._record(prompt, row, ("brown", "quick")).text == " The "
    assert hf._impl._record(prompt, body[:2], ()).finish_reason == "length"


def test_seeded_sampling(hf: gen.Generator, prompts: list[str]) -> None:
    def sample(seed: int) -> list[gen.Completion]:
        return hf.generate(prompts[:2] * 2, gen.Sampling(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=seed))

    first = sample(7)
    assert first == sample(7)
    assert first != sample(8)
    assert first[0] != first[2], "a repeated prompt gets an independent sample"


def test_adapter_swaps_without_reload(hf: gen.Generator, prompts: list[str], adapters: tuple[Path, Path],
                                      tmp_path: Path) -> None:
    import shutil

    base = hf.generate(prompts, GREEDY)
    with_a = hf.generate(prompts, GREEDY, adapter=adapters[0])
    assert with_a != base
    assert hf.generate(prompts, GREEDY) == base  # adapter disabled again
    live = tmp_path / "policy"  # one folder rewritten in place, as a PPO loop does
    shutil.copytree(adapters[0], live)
    assert hf.generate(prompts, GREEDY, adapter=live) == with_a
    shutil.copytree(adapters[1], live, dirs_exist_ok=True)
    with_b = hf.generate(prompts, GREEDY, adapter=live)
    assert with_b not in (with_a, base)
    assert with_b == gen.generate(hf.model, prompts, GREEDY, engine(backend="hf"), adapter=adapters[1])


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=pytest.mark.slow)])
def test_n_samples_per_prompt_are_the_prompt_repeated_n_times(backend: str, request: pytest.FixtureRequest,
                                                              prompts: list[str]) -> None:
    """GRPO's k samples of a prompt: vLLM answers one request with n = k (its prefix cache holds the prompt once),
    hf repeats the prompt; either way the same samples as the prompt written k times in a row, and distinct."""
    generator = request.getfixturevalue(backend)
    sampling = gen.Sampling(temperature=1.0, max_new_tokens=12, seed=5, n=3)
    got = generator.generate(prompts[:2], sampling)
    assert got == generator.generate([p for p in prompts[:2] for _ in range(3)], dataclasses.replace(sampling, n=1))
    assert len(got) == 6 and len({c.text for c in got[:3]}) == len({c.text for c in got[3:]}) == 3


def test_adapter_rank_is_checked(model: Path, adapters: tuple[Path, Path]) -> None:
    with pytest.raises(UserError, match="lora_rank=0"):
        gen.Generator(model, engine(backend="hf")).generate(["x"], GREEDY, adapter=adapters[0])


# --------------------------------------------------------------------------------------------------------- vLLM


@pytest.fixture(scope="module")
def vllm(model: Path) -> Iterator[gen.Generator]:
    """One engine for every vLLM test (each start costs ~30 s here): LoRA on, so it serves base and adapters."""
    pytest.importorskip("vllm")
    # a fixed 1 GiB KV cache: else vLLM reserves gpu_memory_utilization x RAM on CPU and profiles memory first
    generator = gen.Generator(model, engine(backend="auto", kv_cache_gb=1), lora_rank=8)
    yield generator
    generator.close()


@pytest.mark.slow
def test_vllm_is_auto_and_matches_hf_greedy(vllm: gen.Generator, hf: gen.Generator, prompts: list[str]) -> None:
    assert vllm.backend == "vllm"
    messages = [{"role": "user", "content": "Hi"}]
    assert gen.chat_prompt(vllm.tokenizer, messages, "Be.") == gen.chat_prompt(hf.tokenizer, messages, "Be.")
    assert vllm.generate(prompts, GREEDY) == hf.generate(prompts, GREEDY)


@pytest.mark.slow
def test_vllm_stop_strings_match_hf(vllm: gen.Generator, hf: gen.Generator, prompts: list[str]) -> None:
    stops = tuple(stop_string(r.text) for r in hf.generate(prompts[:2], GREEDY))
    sampling = gen.Sampling(max_new_tokens=24, stop=stops)
    got = vllm.generate(prompts, sampling)
    assert got == hf.generate(prompts, sampling)
    assert got[0].finish_reason == "stop"


@pytest.mark.slow
def test_vllm_seeded_sampling(vllm: gen.Generator, prompts: list[str]) -> None:
    def sample(seed: int) -> list[gen.Completion]:
        return vllm.generate(prompts[:2] * 2, gen.Sampling(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=seed))

    first = sample(7)
    assert first == sample(7)
    assert first != sample(8)
    assert first[0] != first[2]


@pytest.mark.slow
def test_vllm_samples_a_batch_longer_than_one_step(vllm: gen.Generator, prompts: list[str]) -> None:
    """More prompt tokens than vLLM's default step budget (4096): with chunked prefill a seeded request split over
    two steps crashed the CPU engine; each prompt still gets its own reproducible stream."""
    batch = prompts * (4096 // sum(len(vllm.tokenizer(p)["input_ids"]) for p in prompts) + 1)
    sampling = gen.Sampling(temperature=1.0, top_p=0.9, max_new_tokens=4, seed=3)
    out = vllm.generate(batch, sampling)
    assert len(out) == len(batch) and out[: len(prompts)] == vllm.generate(prompts, sampling)


@pytest.mark.slow
def test_vllm_lora_matches_hf(vllm: gen.Generator, hf: gen.Generator, prompts: list[str],
                              adapters: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    base = vllm.generate(prompts, GREEDY)
    with_a = vllm.generate(prompts, GREEDY, adapter=adapters[0])
    assert with_a != base
    assert with_a == hf.generate(prompts, GREEDY, adapter=adapters[0])
    live = tmp_path / "policy"
    shutil.copytree(adapters[0], live)
    assert vllm.generate(prompts, GREEDY, adapter=live) == with_a
    shutil.copytree(adapters[1], live, dirs_exist_ok=True)  # the policy moved: a new LoRARequest id
    assert vllm.generate(prompts, GREEDY, adapter=live) == hf.generate(prompts, GREEDY, adapter=adapters[1])
    assert vllm.generate(prompts, GREEDY) == base


def test_merged_weights_are_peft_merge_and_unload(model: Path, adapters: tuple[Path, Path]) -> None:
    """What a vLLM worker loads for `merge_adapters` is, tensor for tensor, PEFT's own merge of the adapter; without
    an adapter, the layers the previous one touched come back as the base checkpoint's."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from align.vllm_weights import lora_updates, merged_weights

    updates = lora_updates(adapters[0])
    assert len(updates) == 7 * AutoModelForCausalLM.from_pretrained(model).config.num_hidden_layers
    merged = dict(merged_weights(model, updates, set()))
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), str(adapters[0]))
    expected = expected.merge_and_unload().state_dict()
    base = AutoModelForCausalLM.from_pretrained(model).state_dict()
    assert set(merged) == {f"{m}.weight" for m in updates}
    for name, weight in merged.items():
        assert not torch.equal(weight, base[name])
        torch.testing.assert_close(weight, expected[name], rtol=1e-5, atol=1e-6)
    restored = dict(merged_weights(model, {}, set(updates)))
    assert set(restored) == set(merged) and all(torch.equal(w, base[n]) for n, w in restored.items())


@pytest.fixture(scope="module")
def merged(model: Path) -> Iterator[gen.Generator]:
    """One engine for every `merge_adapters` test: adapters folded into its weights in place."""
    pytest.importorskip("vllm")
    generator = gen.Generator(model, engine(backend="vllm", kv_cache_gb=1), merge_adapters=True)
    yield generator
    generator.close()


@pytest.mark.slow
def test_vllm_merged_adapters_match_hf(merged: gen.Generator, hf: gen.Generator, prompts: list[str],
                                       adapters: tuple[Path, Path], tmp_path: Path) -> None:
    """`merge_adapters`: the adapter folded into the engine's weights samples what HF does with the adapter, follows
    the folder when it changes (an RL loop's policy), and the base comes back without one."""
    import shutil

    base = merged.generate(prompts, GREEDY)
    live = tmp_path / "policy"
    shutil.copytree(adapters[0], live)
    assert merged.generate(prompts, GREEDY, adapter=live) == hf.generate(prompts, GREEDY, adapter=adapters[0])
    shutil.copytree(adapters[1], live, dirs_exist_ok=True)
    assert merged.generate(prompts, GREEDY, adapter=live) == hf.generate(prompts, GREEDY, adapter=adapters[1])
    assert merged.generate(prompts, GREEDY) == base == hf.generate(prompts, GREEDY)


@pytest.mark.slow
def test_vllm_merges_part_of_a_packed_group(merged: gen.Generator, model: Path, prompts: list[str],
                                           tmp_path: Path) -> None:
    """vLLM packs q/k/v into one qkv_proj and gate/up into gate_up_proj: a LoRA on q_proj and v_proj alone (PEFT's
    Llama default) must leave k_proj as it was, not reloaded as uninitialised memory. Greedy samples equal those of
    PEFT's own merge, for such an adapter, then one on other members of both groups, then the base again."""
    first = make_adapter(model, tmp_path / "qv", 3, ("q_proj", "v_proj"))
    second = make_adapter(model, tmp_path / "ku", 4, ("k_proj", "up_proj"))
    hf_backend = engine(backend="hf")
    for adapter in (first, second):
        expected = gen.generate(merge_and_unload(model, adapter, tmp_path / f"{adapter.name}-merged"), prompts,
                                GREEDY, hf_backend)
        assert merged.generate(prompts, GREEDY, adapter=adapter) == expected
    assert merged.generate(prompts, GREEDY) == gen.generate(model, prompts, GREEDY, hf_backend)


@pytest.mark.slow
def test_vllm_merge_refuses_what_it_would_drop(merged: gen.Generator, hf: gen.Generator, model: Path,
                                               prompts: list[str], tmp_path: Path) -> None:
    """An adapter the merge cannot take whole (DoRA, a LoRA on the embeddings) is refused in the calling process
    with one line naming the file and the key, before any worker is asked; the engine goes on serving."""
    dora = make_adapter(model, tmp_path / "dora", 5, ("q_proj", "v_proj"), use_dora=True)
    embedding = make_adapter(model, tmp_path / "embedding", 6, ("embed_tokens", "q_proj"))
    for adapter, where, key in ((dora, "adapter_config.json", "use_dora"),
                                (embedding, "adapter_model.safetensors", "embed_tokens")):
        with pytest.raises(UserError, match=rf"^{adapter / where}: .*{key}.*rl.rollout_adapter: lora$") as refused:
            merged.generate(prompts, GREEDY, adapter=adapter)
        assert "\n" not in str(refused.value)
    assert merged.generate(prompts, GREEDY) == hf.generate(prompts, GREEDY)


@pytest.mark.slow
def test_vllm_merge_after_an_interrupted_call(merged: gen.Generator, hf: gen.Generator, prompts: list[str],
                                              adapters: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A call interrupted mid-way (Ctrl-C, an error while it reports progress) leaves its other requests in the
    engine: vLLM's engine process may still be running them, holding KV blocks (so it could not empty its prefix
    cache after a merge), and their outputs would come back with the next call's. The next call drops them first;
    its merged weights answer from a cache of their own, with its own samples only."""
    from align.progress import progress

    class Interrupted(Exception):
        pass

    def interrupt(n: int = 1) -> None:
        raise Interrupted

    def interrupting(*args: Any, **kwargs: Any) -> Any:
        bar = progress(*args, **kwargs)
        bar.update = interrupt  # called as the first request finishes
        return bar

    merged.generate(prompts, GREEDY)  # the base, its prompts' prefixes cached
    early = gen.Sampling(max_new_tokens=24, stop=(stop_string(hf.generate(prompts[:1], GREEDY)[0].text),))
    monkeypatch.setattr(gen, "progress", interrupting)
    with pytest.raises(Interrupted):
        merged.generate(prompts, early)  # the first prompt stops early, before the others
    monkeypatch.undo()
    assert merged._impl.llm.llm_engine.has_unfinished_requests()
    assert merged.generate(prompts, GREEDY, adapter=adapters[0]) == hf.generate(prompts, GREEDY, adapter=adapters[0])


def teacher_forced(model: Path, adapter: Path | None, tokenizer: Any, prompts: list[str],
                   completions: list[gen.Completion], sampling: gen.Sampling) -> list[list[float]]:
    """Per completion, each token's log-probability from one forward pass over prompt + completion, in float32, at
    the sampling temperature (greedy: 1), with `adapter` (PEFT's LoRA) on the weights or not."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from align.models import prompt_ids

    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    lm = (lm if adapter is None else PeftModel.from_pretrained(lm, str(adapter))).eval()
    out = []
    with torch.inference_mode():
        for k, completion in enumerate(completions):
            query = prompt_ids(tokenizer, prompts[k // sampling.n])
            logits = lm(torch.tensor([query + list(completion.token_ids)])).logits[0, len(query) - 1 : -1]
            logprobs = (logits / (sampling.temperature or 1.0)).log_softmax(-1)
            out.append(logprobs.gather(-1, torch.tensor(completion.token_ids)[:, None]).squeeze(-1).tolist())
    return out


LOGPROB_SAMPLINGS = {"greedy": gen.Sampling(max_new_tokens=12, logprobs=True),
                     "sampled": gen.Sampling(temperature=0.7, max_new_tokens=12, seed=11, n=2, logprobs=True)}


@pytest.mark.parametrize("sampled", ["greedy", "sampled"])
@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "adapter"])
@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=pytest.mark.slow),
                                     pytest.param("merged", marks=pytest.mark.slow)])
def test_logprobs_are_the_sampling_distribution(backend: str, with_adapter: bool, sampled: str,
                                                request: pytest.FixtureRequest, model: Path, prompts: list[str],
                                                adapters: tuple[Path, Path]) -> None:
    """`Sampling.logprobs`: each generated token's log-probability as the engine sampled it (vLLM: its processed
    log-probs, the adapter served as a LoRA request or merged; hf: generate's scores), equal to a teacher-forced
    forward of the same weights at the same temperature: the RL loop's importance weights rest on it. Asking for
    them changes no sample; without the flag there are none."""
    import math

    generator = request.getfixturevalue(backend)
    adapter = adapters[0] if with_adapter else None
    sampling = LOGPROB_SAMPLINGS[sampled]
    got = generator.generate(prompts, sampling, adapter=adapter)
    expected = teacher_forced(model, adapter, generator.tokenizer, prompts, got, sampling)
    for completion, reference in zip(got, expected, strict=True):
        assert len(completion.logprobs) == completion.num_tokens
        assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(completion.logprobs, reference)), \
            (completion.logprobs, reference)
    plain = dataclasses.replace(sampling, logprobs=False)
    assert generator.generate(prompts, plain, adapter=adapter) == [dataclasses.replace(c, logprobs=()) for c in got]


@pytest.mark.slow
def test_vllm_tensor_parallel_2_on_cpu_answers_as_one_worker(model: Path, hf: gen.Generator,
                                                             prompts: list[str]) -> None:
    """vLLM's CPU backend splits the model over two workers (its threads bound to the job's cores split in two:
    `cpu_thread_bind`; it refuses two workers on one NUMA node otherwise) and greedy answers stay those of one."""
    pytest.importorskip("vllm")
    with gen.Generator(model, engine(backend="vllm", kv_cache_gb=1, tensor_parallel_size=2)) as split:
        assert split.generate(prompts, GREEDY) == hf.generate(prompts, GREEDY)


@pytest.mark.slow
def test_lora_factors_sent_over_a_process_group_sample_as_the_adapter_folder(
        merged: gen.Generator, model: Path, prompts: list[str], adapters: tuple[Path, Path], tmp_path: Path) -> None:
    """The trainer side broadcasts a PEFT model's LoRA factors over a gloo group of its own; the engine's worker
    merges them (base from the node-local copy made at start) and samples greedily what the same adapter's folder
    gives; then back to the base. The factors are a fraction of the weights a folder merge reads."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from align.weight_sync import Received, adapter_group, alongside, factors_key, lora_factors, send, spec_of
    from slurm.submit import free_port

    assert merged._impl.base != model and (merged._impl.base / "model.safetensors").is_file()  # the node-local copy
    port = free_port()
    group = alongside(lambda: adapter_group("127.0.0.1", port, 2, 0, torch.device("cpu")),
                      lambda: merged.join_adapter_group("127.0.0.1", port, 2, 1))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), str(adapters[1]))
    factors, scale = lora_factors(peft)
    key = factors_key(factors, scale)
    sent = alongside(lambda: send(group, factors), lambda: merged.receive_adapter(spec_of(factors), scale, key))
    weights = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(model).parameters())
    assert 0 < sent < weights / 4
    by_group = merged.generate(prompts, GREEDY, adapter=Received(key))
    assert by_group == merged.generate(prompts, GREEDY, adapter=adapters[1])  # the folder merge: the same weights
    alongside(lambda: None, lambda: merged.receive_adapter(None, 1.0, None))
    assert merged.generate(prompts, GREEDY, adapter=None) != by_group
    with pytest.raises(RuntimeError, match="does not hold the adapter"):
        merged.generate(prompts, GREEDY, adapter=Received(key))
