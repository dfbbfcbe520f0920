"""One PPO iteration (rollout + reward + update) of our PPO stage (`stages.ppo.job`: DeepSpeed engines, rollouts
through params.yaml's generation backend, the instructable RM) vs TRL's PPOTrainer (trl 1.12, `trl.experimental.ppo`), same SFT model,
same reward model, same prompts, same batch sizes, same CPU, in one run. Prints a table, writes
bench/results/ppo_vs_trl.json.

    python bench/ppo_vs_trl.py [--model models/sft/model] [--rm models/rm] [--rollout 8] [--step-batch 4]
        [--micro-batch 4] [--epochs 2] [--new-tokens 48] [--iterations 2] [--lora-r 16] [--threads 1]
        [--backend auto|vllm|hf] [--repeats 1] [--out bench/results/ppo_vs_trl.json]

Both sides run `--iterations` iterations of `--rollout` prompts; the first is a warm-up, the rest are timed and
averaged. Ours: the real stage loop (`job`) on the job `stages.ppo.build_job` would make (`bench_job`: the same
`RoleSpec`, training settings from the stage's `check_layout`), from params.yaml with the knobs above set where the
stage reads them (`rl`: iterations, rollout_batch_size, step_batch_size, epochs, max_new_tokens, lora_r;
`cluster.policy`: micro_batch_size, generate_batch_size = the whole rollout, save_every_steps = the whole run;
`generation.backend`), in a scratch working folder; its per-iteration curve (seconds_rollout / _reward / _update,
rollout_tokens) is read where the loop logs it, and the run stops at the last iteration's log call (the final
checkpoint, held-out comparison, adapter save and merged out are not part of an iteration). TRL:
`PPOTrainer.train()` over the same prompts as our timed iteration, with the
same LoRA on the policy (reference = adapter disabled), a value model built by our `value_model` (the RM trunk with
its adapter folded in, its head, a fresh LoRA: the same trainable parameters as ours; TRL would otherwise train the
whole value model), and the RM merged into a plain sequence classifier as the reward model. Its phases are timed by
wrapping the trainer module's `batch_generation` (rollout) and `get_reward` on the reward model (reward); its update
is the rest of the iteration. Iteration boundaries: our loop's log call, TRL's `on_step_end`.

Ours generates through `--backend` (params.yaml's `generation.backend` by default: auto = vLLM where installed,
the current adapter as params.yaml's `rl.rollout_adapter` says (merged into vLLM's weights, or a LoRA request);
its engine starts before the warm-up iteration, so its start is not
timed), TRL through HF `generate` as it always does: that difference is part of what is compared. Held equal:
the training precision (params.yaml's `training.precision` as the job resolves it - `auto`: bf16 on a CPU with AMX
or AVX512-BF16 - and TRL's `bf16` to match), sampling (`rl.temperature`, top-p 1, no top-k, `--new-tokens`, stop
at eos), the whole rollout in one generation call, `--micro-batch` rows per forward/backward, `--step-batch` samples
per optimizer step (TRL: per_device_train_batch_size = micro batch, num_mini_batches = rollout / step batch; TRL
counts its own optimizer steps, reported: at the defaults both sides take 4 an iteration; at step batch 8 ours took
2 and TRL still 4, its optimizer stepping at every micro-batch), epochs, clip ranges (`rl.epsilon`,
`ppo.cliprange_value`), KL coefficient (`rl.kl_coef`), `ppo.gamma`/`lam`, `rl.learning_rate`, torch's plain AdamW,
gradient checkpointing as `cluster.policy` says (off by default; TRL's default turns it on), no evaluation, no
saving. Not equal: with `rl.vllm_is_correction` (on by default) our rollouts also return each sampled token's
log-prob and our update weights each token by the truncated trainer/engine probability ratio;
PPOTrainer has no such correction. Each
side runs in its own subprocess (`--worker`), ours first then TRL, alternating with --repeats; peak RSS is the
worker's and its children's (vLLM's engine process) summed resident memory, sampled every 0.2 s up to the end of
the last iteration (model loading included). Threads: --threads torch threads
per worker, 1 by default: on a small machine shared with other jobs, more threads than free cores spin at OpenMP
barriers while another process holds a core, which slowed a forward/backward here by 5-9x and made timings erratic
(use --threads 2 on an idle 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from align.params import Engine, Params, Rl, TrainingRun, load_params, parse_params  # noqa: E402
from align.precision import training_precision  # noqa: E402
from align.records import write_json  # noqa: E402
from bench.common import absolute, run_worker  # noqa: E402

if TYPE_CHECKING:
    from stages.ppo import PpoJob

SIDES = ("ours", "trl")
TRL_PAD = "<|endoftext|>"  # TRL's pad token (see `run_trl`)


# ----------------------------------------------------------------------------------------------- configuration


def bench_params(spec: dict, algorithm: str = "ppo") -> Params:
    """params.yaml as the policy stage would read it with the benchmark's knobs: `policy.algorithm`, `rl`'s
    iteration count, batch sizes, epochs, length, LoRA rank (and `--group`, where the spec has one), our generation
    backend, and cluster.policy's micro batch, the whole rollout in one HF `generate` call and no checkpoint before
    the last iteration; validated as params.yaml is."""
    raw = load_params(ROOT / "params.yaml").model_dump()
    raw["policy"]["algorithm"] = algorithm
    raw["generation"]["backend"] = spec["backend"]
    raw["rl"].update(iterations=spec["iterations"], rollout_batch_size=spec["rollout"],
                     step_batch_size=spec["step_batch"], epochs=spec["epochs"], max_new_tokens=spec["new_tokens"],
                     lora_r=spec["lora_r"], **({"group_size": spec["group"]} if "group" in spec else {}))
    raw["cluster"]["policy"].update(micro_batch_size=spec["micro_batch"],
                                    generate_batch_size=rollout_samples(spec, algorithm),
                                    save_every_steps=optimizer_steps_per_run(spec, algorithm))
    return parse_params(raw, "params.yaml with the bench's settings")


def rollout_samples(spec: dict, algorithm: str) -> int:
    """Samples per iteration: `--rollout` prompts, x `--group` for GRPO and RLOO (as `PpoRecipe` counts them)."""
    from align.rl import ALGORITHMS

    return spec["rollout"] * (spec["group"] if ALGORITHMS[algorithm].grouped else 1)


def optimizer_steps_per_run(spec: dict, algorithm: str) -> int:
    """Our optimizer steps in the whole run: epochs x samples / step batch per iteration."""
    return spec["iterations"] * spec["epochs"] * rollout_samples(spec, algorithm) // spec["step_batch"]


def training_run(params: Params) -> TrainingRun:
    """The policy job's training settings (`rl`'s learning rate, LoRA and step batch with cluster.policy's execution
    settings), checked as the stage checks them."""
    from stages.ppo import check_layout

    return check_layout(params)


def prompt_pool(model: Path, count: int, max_query_tokens: int) -> list[dict]:
    """The first `count` prompts of data/prompts whose chat prompt fits `max_query_tokens` (the stage's filter)."""
    from transformers import AutoTokenizer

    from align.generation import chat_prompt
    from align.models import prompt_ids
    from align.records import read_jsonl

    prompts = ROOT / "data" / "prompts" / "prompts.jsonl"
    if not prompts.is_file():
        sys.exit(f"{prompts}: not found; the bench answers the pipeline's prompts: run `dvc repro prompts` first")
    tokenizer = AutoTokenizer.from_pretrained(model)
    fits = [p for p in read_jsonl(prompts)
            if len(prompt_ids(tokenizer, chat_prompt(tokenizer, [{"role": "user", "content": p["text"]}])))
            <= max_query_tokens]
    return [{"text": p["text"]} for p in fits[:count]]


def untrained_rm(model: Path, folder: Path) -> Path:
    """An RM out folder (adapter with a fresh head, template, limits) on `model`, for when models/rm is absent."""
    from align.reward import CONFIG_FILE, TEMPLATE_FILE
    from align.training import lora_model

    params = load_params(ROOT / "params.yaml")
    rm = params.rm
    training = TrainingRun.of(params.training, params.cluster.train_rm, "train_rm", lora_r=rm.lora_r,
                              lora_alpha=rm.lora_alpha)  # as stages/train_rm.py makes it
    lora_model(model, training, seed=0, head="reward").save_pretrained(folder / "adapter")
    shutil.copy(ROOT / "assets" / "rm_prompt.txt", folder / TEMPLATE_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps({"max_prompt_tokens": rm.max_prompt_tokens,
                                                  "max_response_tokens": rm.max_response_tokens}))
    return folder


class TreeRss:
    """Peak resident memory of this process plus its children (vLLM runs its engine in a child process),
    sampled every 0.2 s in a thread; never below this process's own ru_maxrss."""

    def __init__(self) -> None:
        import psutil

        self.process, self.peak = psutil.Process(), 0.0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        import psutil

        while True:
            try:
                total = sum(p.memory_info().rss for p in [self.process, *self.process.children(recursive=True)])
            except psutil.Error:  # a child ended between listing and reading
                continue
            self.peak = max(self.peak, total / 2**20)
            time.sleep(0.2)

    def mb(self) -> float:
        return max(self.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB


# --------------------------------------------------------------------------------------------------- ours


class Finished(Exception):
    """Raised from the loop's log call after the last iteration: what `job` does after its loop is not timed."""


def bench_job(params: Params, spec: dict, scratch: Path) -> PpoJob:
    """The `stages.ppo.PpoJob` that `stages.ppo.build_job` makes from `params`, on the bench's models and prompt
    pool, with its checkpoints in `scratch`; no held-out prompts (answered after the last iteration, not timed),
    no input manifests (the models need not come from the pipeline)."""
    from align.assets import PreferencePrinciple, load_jsonl, pick_principles
    from align.placement import Layout
    from align.rl import ALGORITHMS
    from align.roles import RoleSpec
    from stages import ppo

    rl, resources, algorithm = params.rl, params.cluster.policy, params.policy.algorithm
    principles = {key: pick_principles(load_jsonl(ROOT / path, PreferencePrinciple), ids, f"rl.{key}", path)
                  for key, path, ids in (("principles", ppo.COLLECTION, rl.principles),
                                         ("guard_principles", ppo.GUARDS, rl.guard_principles))}
    roles = RoleSpec(sft_dir=Path(spec["model"]), rm_dir=Path(spec["rm"]), training=training_run(params),
                     engine=Engine.of(params.generation, resources), score_batch_size=resources.score_batch_size,
                     shard_scorers=resources.shard_scorers, value_model=ALGORITHMS[algorithm].value_model,
                     merge_adapters=rl.rollout_adapter == "merged", layout=Layout.of(resources),
                     rollout_adapter=scratch / "ckpt" / "rollout_adapter",
                     timeout_min=resources.collective_timeout_min)
    return ppo.PpoJob(roles=roles, pool=spec["pool"], collection=principles["principles"],
                      guards=principles["guard_principles"], algorithm=algorithm, rl=rl, ppo=params.ppo,
                      seed=spec["seed"], ckpt_dir=scratch / "ckpt", signal_delay_s=resources.signal_delay_s,
                      params={}, inputs={})


def run_ours(spec: dict, scratch: Path, memory: TreeRss, algorithm: str = "ppo") -> dict:
    """`stages.ppo.job` (PPO, or `algorithm` grpo / rloo with the spec's group size: bench/grpo_vs_trl.py) with a
    log call that also reads the clock and the peak RSS, in the scratch folder; the whole rollout (prompts x
    samples per prompt) in one generation call."""
    from stages import ppo

    iterations: list[dict] = []
    rss: list[float] = []

    class Clock(ppo.LiveCurve):
        def __call__(self, step: int, metrics: dict) -> None:
            super().__call__(step, metrics)  # its first call imports dvclive: a start-up cost, in the warm-up
            iterations.append({"end": time.perf_counter(), "rollout_seconds": metrics["seconds_rollout"],
                               "reward_seconds": metrics["seconds_reward"],
                               "update_seconds": metrics["seconds_update"],
                               "rollout_tokens": metrics["rollout_tokens"]})
            if len(iterations) == spec["iterations"]:
                rss.append(memory.mb())
                raise Finished

    ppo.LiveCurve = Clock  # the recipe's log call (`PpoRecipe.run` reads the module's name when it starts)
    try:
        ppo.job(bench_job(bench_params(spec, algorithm), spec, scratch))
    except Finished:
        pass
    return {"iterations": iterations, "peak_rss_mb": rss[0],
            "optimizer_steps": optimizer_steps_per_run(spec, algorithm)}


# ---------------------------------------------------------------------------------------------------- TRL


def response_tokens(responses: Any, eos_id: int, pad_id: int) -> int:
    """Generated tokens in a [B, L] block of responses: up to and including each row's first eos, pads not
    counted (rows that stopped early are filled with eos by `generate`)."""
    import torch

    ended = responses == eos_id
    last = torch.where(ended.any(1), ended.int().argmax(1), responses.shape[1] - 1)
    kept = torch.arange(responses.shape[1]).unsqueeze(0) <= last.unsqueeze(1)
    return int((kept & (responses != pad_id)).sum())


def optimizer_steps(optimizer: Any) -> int:
    """The step count torch's AdamW keeps per parameter (the most any parameter took)."""
    return max(int(state["step"]) for state in optimizer.optimizer.state.values())


def run_trl(spec: dict, scratch: Path, memory: TreeRss) -> dict:
    """PPOTrainer.train() with its generation and reward-model calls timed; iterations end at `on_step_end`."""
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as module

    from align.generation import chat_prompt
    from align.models import prompt_ids
    from align.training import lora_config, reward_trunk
    from align.roles import value_model

    params, model_dir = bench_params(spec), spec["model"]
    rl, training = params.rl, training_run(params)
    # TRL treats every token equal to the pad id as padding, also inside the queries; this tokenizer pads with its
    # eos <|im_end|>, which ends every chat turn of a prompt: pad with a token the prompts do not contain.
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    tokenizer.pad_token = TRL_PAD
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    queries = [prompt_ids(tokenizer, chat_prompt(tokenizer, [{"role": "user", "content": p["text"]}]))
               for p in spec["trl_prompts"]]

    reward = PeftModel.from_pretrained(reward_trunk(model_dir, torch.float32), str(Path(spec["rm"]) / "adapter"))
    reward = reward.merge_and_unload().eval()
    value = value_model(Path(model_dir), Path(spec["rm"]), training, spec["seed"]).base_model.model
    torch.manual_seed(spec["seed"])  # as our `lora_model`: the same adapter init
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = lora_config(training, "CAUSAL_LM")

    current = {"rollout_seconds": 0.0, "reward_seconds": 0.0, "rollout_tokens": 0}
    iterations: list[dict] = []
    generate, get_reward = module.batch_generation, module.get_reward

    def timed_generation(model: Any, batch: Any, *args: Any) -> Any:
        start = time.perf_counter()
        out = generate(model, batch, *args)
        current["rollout_seconds"] += time.perf_counter() - start
        current["rollout_tokens"] += response_tokens(out[0][:, batch.shape[1]:], eos_id, pad_id)
        return out

    def timed_reward(model: Any, *args: Any) -> Any:
        start = time.perf_counter()
        out = get_reward(model, *args)
        if model is reward:  # the value model goes through get_reward too: that is update work
            current["reward_seconds"] += time.perf_counter() - start
        return out

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            iterations.append({"end": time.perf_counter(), **current})
            current.update(rollout_seconds=0.0, reward_seconds=0.0, rollout_tokens=0)

    module.batch_generation, module.get_reward = timed_generation, timed_reward
    config = PPOConfig(
        output_dir=str(scratch / "trl"), per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["rollout"] // spec["micro_batch"],
        num_mini_batches=spec["rollout"] // spec["step_batch"], num_ppo_epochs=spec["epochs"],
        total_episodes=spec["rollout"] * spec["iterations"], local_rollout_forward_batch_size=spec["rollout"],
        response_length=spec["new_tokens"], temperature=rl.temperature, stop_token="eos", kl_coef=rl.kl_coef,
        cliprange=rl.epsilon, cliprange_value=params.ppo.cliprange_value, gamma=params.ppo.gamma,
        lam=params.ppo.lam, learning_rate=rl.learning_rate, optim="adamw_torch", weight_decay=0.0,
        bf16=training_precision(training.precision) == "bf16",
        gradient_checkpointing=training.gradient_checkpointing, use_cpu=True, num_sample_generations=0,
        eval_strategy="no", save_strategy="no", report_to=[], logging_steps=1, disable_tqdm=True, seed=spec["seed"])
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=Dataset.from_dict({"input_ids": queries}), value_model=value,
                         peft_config=peft, callbacks=[Clock()])
    trainer.train()
    return {"iterations": iterations, "peak_rss_mb": memory.mb(), "optimizer_steps": optimizer_steps(trainer.optimizer)}


# ----------------------------------------------------------------------------------------------------- workers


def worker(name: str, spec_path: Path, result_path: Path) -> None:
    """Run one side in the current (scratch) folder; write its per-iteration measurements."""
    import torch

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    run = (run_ours if name == "ours" else run_trl)(spec, Path.cwd(), TreeRss())
    ends = [row["end"] for row in run["iterations"]]
    for i, row in enumerate(run["iterations"]):
        row["seconds"] = ends[i] - ends[i - 1] if i else None  # the warm-up has no start mark on either side
        if "update_seconds" not in row:  # TRL: everything in the iteration but generation and RM scoring
            row["update_seconds"] = row["seconds"] - row["rollout_seconds"] - row["reward_seconds"] if i else None
    result = {"side": name, "iterations": run["iterations"], "peak_rss_mb": run["peak_rss_mb"],
              "optimizer_steps": run["optimizer_steps"], "torch_threads": torch.get_num_threads()}
    write_json(result_path, result)


def spawn(name: str, spec_path: Path, scratch: Path) -> dict:
    """One worker in a fresh scratch folder under `scratch` (ours writes its curves and checkpoints there)."""
    folder = Path(tempfile.mkdtemp(prefix=f"{name}_", dir=scratch))
    threads = json.loads(spec_path.read_text())["threads"]
    return run_worker(__file__, name, spec_path, folder / "result.json", folder, threads)


# ------------------------------------------------------------------------------------------------------ parent


def measure(run: dict, rollout: int) -> dict:
    """Throughputs and the time split over the timed iterations (all but the first) of one worker run."""
    timed = run["iterations"][1:]
    total = {key: sum(row[key] for row in timed) for key in
             ("seconds", "rollout_seconds", "reward_seconds", "update_seconds", "rollout_tokens")}
    count = len(timed)
    return {"rollout_tokens_per_s": total["rollout_tokens"] / total["rollout_seconds"],
            "update_samples_per_s": rollout * count / total["update_seconds"],
            "seconds_per_iteration": total["seconds"] / count,
            "rollout_seconds": total["rollout_seconds"] / count, "reward_seconds": total["reward_seconds"] / count,
            "update_seconds": total["update_seconds"] / count,
            "other_seconds": (total["seconds"] - total["rollout_seconds"] - total["reward_seconds"]
                              - total["update_seconds"]) / count,
            "response_tokens": total["rollout_tokens"] / (rollout * count), "peak_rss_mb": run["peak_rss_mb"],
            "optimizer_steps_per_iteration": run["optimizer_steps"] / len(run["iterations"])}


def summarize(runs: list[dict], rollout: int) -> dict:
    """Per side: the median of each measurement over its runs."""
    measured = [measure(run, rollout) for run in runs]
    return {key: statistics.median(m[key] for m in measured) for key in measured[0]}


def print_table(setup: dict, summary: dict, ratios: dict) -> None:
    print(f"one PPO iteration, {setup['rollout']} prompts x <= {setup['new_tokens']} new tokens, step batch "
          f"{setup['step_batch']}, micro batch {setup['micro_batch']}, {setup['epochs']} PPO epochs, LoRA "
          f"r={setup['lora_r']}, our rollouts on {setup['backend']}, {setup['model']}, RM {setup['rm']}, {setup['threads']} thread(s) on {setup['cpus']} "
          f"CPUs, mean of "
          f"{setup['iterations'] - 1} timed iteration(s) after 1 warm-up, {setup['repeats']} run(s) each")
    print("| side | rollout tok/s | update samples/s | s/iteration | rollout s | reward s | update s | other s | "
          "tokens/response | optimizer steps/iteration | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, row in summary.items():
        print(f"| {name} | {row['rollout_tokens_per_s']:.1f} | {row['update_samples_per_s']:.3f} | "
              f"{row['seconds_per_iteration']:.2f} | {row['rollout_seconds']:.2f} | {row['reward_seconds']:.2f} | "
              f"{row['update_seconds']:.2f} | {row['other_seconds']:.2f} | {row['response_tokens']:.1f} | "
              f"{row['optimizer_steps_per_iteration']:g} | {row['peak_rss_mb']:.0f} |")
    print(f"end to end ours/TRL speed {ratios['speed']:.2f}x (target >= 1.5x); peak RSS ours/TRL "
          f"{ratios['rss']:.2f}x (target <= 1)")


def run_prompts(model: Path, cfg: Rl, rollout: int, iterations: int, seed: int) -> dict[str, list]:
    """{"pool": the prompt pool as the stage builds it, "trl_prompts": our timed (last) iteration's prompts, which
    TRL answers in every one of its iterations}."""
    from stages.ppo import iteration_prompts

    pool = prompt_pool(model, rollout * iterations, cfg.max_query_tokens)
    if len(pool) < rollout:
        sys.exit(f"data/prompts/prompts.jsonl: {len(pool)} prompts fit; --rollout needs {rollout}")
    _, picked = iteration_prompts(pool, cfg, seed, iterations - 1, 0, 1)  # (first place, indices) on one rank
    return {"pool": pool, "trl_prompts": [pool[i] for i in picked]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ROOT / "models" / "sft" / "model"
    parser.add_argument("--model", type=absolute, default=default if default.is_dir() else ROOT / "models" / "base")
    parser.add_argument("--rm", type=absolute, default=ROOT / "models" / "rm",
                        help="an RM out folder trained on --model (absent: an untrained one is built)")
    parser.add_argument("--rollout", type=int, default=8, help="prompts per iteration")
    parser.add_argument("--step-batch", type=int, default=4, help="samples per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per forward/backward")
    parser.add_argument("--epochs", type=int, default=2, help="PPO epochs per iteration")
    parser.add_argument("--new-tokens", type=int, default=48, help="max new tokens per response")
    parser.add_argument("--iterations", type=int, default=2, help="iterations per run; the first is a warm-up")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--backend", choices=("auto", "vllm", "hf"), default=load_params(ROOT / "params.yaml").generation.backend,
                        help="our rollouts' generation backend (params.yaml's by default); TRL generates with HF")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per worker (both sides); see the docstring")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ppo_vs_trl.json")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.spec, args.result)
        return
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model}: no model folder; run `dvc repro import_model` first or pass --model")
    if args.iterations < 2:
        sys.exit("--iterations: at least 2 (the first is not timed)")
    if args.step_batch % args.micro_batch or args.rollout % args.step_batch:
        sys.exit("--micro-batch must divide --step-batch, which must divide --rollout")
    os.environ["HF_HUB_OFFLINE"] = "1"
    spec: dict[str, Any] = {"model": str(args.model), "rollout": args.rollout, "step_batch": args.step_batch,
                            "micro_batch": args.micro_batch, "epochs": args.epochs, "new_tokens": args.new_tokens,
                            "iterations": args.iterations, "lora_r": args.lora_r, "seed": args.seed,
                            "threads": args.threads, "backend": args.backend}
    params = bench_params(spec)
    spec.update(run_prompts(args.model, params.rl, args.rollout, args.iterations, args.seed))
    with tempfile.TemporaryDirectory(prefix="ppo_vs_trl_") as tmp:
        trained = (args.rm / "adapter").is_dir()
        spec["rm"] = str(args.rm if trained else untrained_rm(args.model, Path(tmp) / "rm"))
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        runs = [spawn(name, spec_path, Path(tmp)) for _ in range(args.repeats) for name in SIDES]
    summary = {name: summarize([r for r in runs if r["side"] == name], args.rollout) for name in SIDES}
    ratios = {"speed": summary["trl"]["seconds_per_iteration"] / summary["ours"]["seconds_per_iteration"],
              "rss": summary["ours"]["peak_rss_mb"] / summary["trl"]["peak_rss_mb"]}
    setup = {key: spec[key] for key in ("model", "rollout", "step_batch", "micro_batch", "epochs", "new_tokens",
                                        "iterations", "lora_r", "seed", "threads", "backend")}
    setup.update(rm=str(args.rm) if trained else "untrained (built on --model)", repeats=args.repeats,
                 cpus=os.cpu_count(), prompts=[p["text"] for p in spec["trl_prompts"]],
                 rl=params.rl.model_dump(), ppo=params.ppo.model_dump(),
                 training=training_run(params).model_dump(),
                 engine=Engine.of(params.generation, params.cluster.policy).model_dump(),
                 trl_tokens="exact: generated ids up to and including the first eos",
                 timing="first iteration excluded on both sides; TRL update = iteration - generation - RM scoring")
    print_table(setup, summary, ratios)
    write_json(args.out, {"setup": setup, "summary": summary, "ratios": ratios, "runs": runs})


if __name__ == "__main__":
    main()
