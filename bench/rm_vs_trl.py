"""Our reward-model training (`align.training.train`, head "reward", DeepSpeed over a LoRA model, `reward.bt_loss`)
vs TRL's `RewardTrainer` (trl 1.12), same model, same LoRA, same optimizer settings, same pairs for the same
whole epochs, same CPU, in one run; each side draws its batches as it does in use. Prints a table, writes
bench/results/rm_vs_trl.json.

    python bench/rm_vs_trl.py [--model models/sft/model] [--epochs 1] [--batch 2] [--max-pairs N] [--lr 1e-4]
        [--lora-r 16] [--max-tokens 384] [--length-group G] [--repeats 1] [--out bench/results/rm_vs_trl.json]

Data: plain preference pairs (no principles) built from the responses in data/pairs/pairs.jsonl and
data/self_align/sft.jsonl: chosen = the response, rejected = its first half followed by its first sentence repeated;
each side is `prompt + "\n\n" + response`, tokenized once here (no special tokens, no chat template), cut to its
first --max-tokens tokens. 20% of the pairs (seeded) are held out; the train pairs are cut to at most --max-pairs
and to a multiple of --batch, so every step of both sides is a full batch and --epochs x pairs / batch steps are
whole epochs: each side trains on every train pair --epochs times.

Held equal: the train pairs (the same token ids, handed to TRL pre-tokenized as `chosen_ids`/`rejected_ids`; the
worker checks TRL kept them), the number of steps and pairs per step, every pair seen equally often. Not held
equal, on purpose: which pairs share a step, and in what order. Ours draws as `train_rm` does (`reward.pair_batches`
with params.yaml's `rm.length_group`, or --length-group: each epoch's pairs grouped into micro-batches of similar
shared-prefix and remainder widths, in shuffled order; 1 is the plain shuffled draw); TRL draws with its default
sampler (`train_sampling_strategy` "random": a fresh shuffle each epoch). Each side's padded tokens per step are
counted from the batches it trained on: ours runs the tokens a pair's two sides share at their start (here the
prompt and the first half of the response; in `train_rm` the principles and the instruction) once, left-padded
into [batch, P], then both remainders on top of its key/value cache, right-padded into [2 x batch, S]
(`reward.pair_rewards`: the same rewards and gradients, fewer tokens): P x batch + S x 2 x batch; TRL pads each
step's chosen and rejected rows into one [2 x batch, L] tensor: L x 2 x batch. The pad share is the part of those
that is padding.

Settings held equal: the training precision (params.yaml's `training.precision` as the job resolves it - `auto`:
bf16 on a CPU with AMX or AVX512-BF16 - and TRL's `bf16` to match); torch's plain AdamW (lr, betas 0.9/0.999, eps 1e-8, no weight decay), which is what
ours runs (TRL's default would be the fused one); a constant learning rate without warm-up; gradient clipping at
params.yaml's max_grad_norm; no gradient checkpointing (TRL's default turns it on); no dropout; no margin or
reward-centring term; no evaluation or saving during training. Our side keeps the rest of params.yaml's
`training` group (ZeRO stage, LoRA targets and alpha).

Each trainer runs in its own subprocess (`--worker`), ours first then TRL, alternating with --repeats.
pairs/s = (steps - 1) x batch / the time from the end of step 1 to the end of the last step (the first step, a
warm-up, is excluded on both sides; model loading and the final checkpoint/adapter save are outside the clock);
pairs/CPU-s divides by the worker's CPU time over the same steps instead, which moves less when other processes
share the cores.
Peak RSS is the worker's ru_maxrss right after training (model load included). Held-out accuracy: each worker
saves its adapter, and both are scored by the same code (the trained adapter on a fresh reward trunk, same ids).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from align.params import TrainingRun, load_params  # noqa: E402
from align.precision import training_precision  # noqa: E402
from align.records import write_json  # noqa: E402
from bench.common import absolute, run_worker  # noqa: E402

TRAINERS = ("ours", "trl")
HELD_OUT_SHARE = 0.2
SCORE_BATCH = 8  # held-out pairs per scoring forward
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# ------------------------------------------------------------------------------------------------------- data


def degrade(response: str) -> str:
    """The response's first half (cut at a space), then its first sentence repeated for about the other half."""
    text = response.strip()
    cut = text.rfind(" ", 0, len(text) // 2)
    head = text[: cut if cut > 0 else len(text) // 2]
    first = SENTENCE_END.split(text, maxsplit=1)[0]
    repeats = max(2, round((len(text) - len(head)) / (len(first) + 1)))
    return head + " " + " ".join([first] * repeats)


def plain_pairs() -> list[dict[str, str]]:
    """(prompt, chosen, rejected) texts, one per distinct response in the files present, in file order."""
    responses = []
    pairs_file, sft_file = ROOT / "data" / "pairs" / "pairs.jsonl", ROOT / "data" / "self_align" / "sft.jsonl"
    for path, fields in ((pairs_file, ("response_a", "response_b")), (sft_file, ("answer",))):
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            responses += [(row["prompt"], row[f]) for row in rows for f in fields if row.get(f, "").strip()]
    unique = list(dict.fromkeys(responses))
    return [{"prompt": p, "chosen": r, "rejected": degrade(r)} for p, r in unique]


def tokenized_pairs(tokenizer: Any, pairs: list[dict[str, str]], max_tokens: int) -> list[dict[str, list[int]]]:
    """Token ids of `prompt + "\\n\\n" + response` per side, cut to `max_tokens`; pairs whose cut sides are
    identical are dropped."""
    def ids(prompt: str, response: str) -> list[int]:
        return tokenizer(prompt + "\n\n" + response, add_special_tokens=False)["input_ids"][:max_tokens]

    examples = [{side: ids(p["prompt"], p[side]) for side in ("chosen", "rejected")} for p in pairs]
    return [e for e in examples if e["chosen"] != e["rejected"]]


def split(examples: list, share: float, seed: int) -> tuple[list, list]:
    """(train, held-out): `share` of the examples, drawn from `seed`, held out."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[: round(len(examples) * share)])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


# ---------------------------------------------------------------------------------------------------- workers


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all its threads)."""
    return time.perf_counter(), time.process_time()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train_ours(spec: dict, scratch: Path) -> dict:
    """Our loop, drawing as `train_rm` does; the clock reads at the end of every step (`on_step`). The batches'
    shapes are read back afterwards (the draw is a pure function of the step), outside the clock."""
    from align.reward import bt_loss, pair_batches
    from align.training import train

    ends: list[tuple[float, float]] = []
    batches = pair_batches(spec["train"], spec["batch"], spec["seed"], spec["pad_id"], spec["length_group"])
    training = TrainingRun.model_validate(spec["training"])
    result = train(spec["model"], batches, bt_loss, scratch / "ckpt", training, spec["steps"],
                   adapter_dir=scratch / "adapter", seed=spec["seed"], head="reward", log=None,
                   on_step=lambda step, _: ends.append(clock()))
    shapes = [batch_tokens(batches(step)) for step in range(spec["steps"])]
    return {"step_ends": ends, "losses": result["losses"], "peak_rss_mb": peak_rss_mb(), "batches": shapes}


def batch_tokens(batch: dict) -> tuple[int, int, int]:
    """(pairs, tokens with padding, tokens without) of a step's batch, ours (prefixes + remainders) or TRL's."""
    if "prefix_ids" in batch:
        return (len(batch["prefix_ids"]), batch["prefix_ids"].numel() + batch["input_ids"].numel(),
                int(batch["prefix_mask"].sum() + batch["attention_mask"].sum()))
    return len(batch["input_ids"]) // 2, batch["input_ids"].numel(), int(batch["attention_mask"].sum())


class CountingCollator:
    """TRL's collator, noting `batch_tokens` of every batch it builds."""

    def __init__(self, collate: Any):
        self.collate, self.batches = collate, []

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collate(features)
        self.batches.append(batch_tokens(batch))
        return batch


def train_trl(spec: dict, scratch: Path) -> dict:
    """TRL's RewardTrainer on the train pairs with its default (shuffling) sampler; the clock reads at every
    `on_step_end`."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from align.training import lora_config

    training = TrainingRun.model_validate(spec["training"])
    ends: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends.append(clock())

    dataset = Dataset.from_dict({"chosen_ids": [e["chosen"] for e in spec["train"]],
                                 "rejected_ids": [e["rejected"] for e in spec["train"]]})
    torch.manual_seed(spec["seed"])  # as our `lora_model` does before loading: the same fresh score head
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32,
                                                               pad_token_id=spec["pad_id"])
    config = RewardConfig(
        output_dir=str(scratch / "trl"), per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=training.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_grad_norm=training.max_grad_norm, use_cpu=True, bf16=training.precision == "bf16",
        gradient_checkpointing=False,
        disable_dropout=True, max_length=None, center_rewards_coefficient=None,
        logging_steps=1, eval_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, seed=spec["seed"])
    peft = lora_config(training, "SEQ_CLS")
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset,
                            processing_class=AutoTokenizer.from_pretrained(spec["model"]), peft_config=peft,
                            callbacks=[Clock()])
    if trainer.model.config.pad_token_id != spec["pad_id"] or trainer.train_dataset["chosen_ids"] != \
            dataset["chosen_ids"] or trainer.train_dataset["rejected_ids"] != dataset["rejected_ids"]:
        raise RuntimeError("TRL would not train on the token ids our side trains on")
    trainer.data_collator = counting = CountingCollator(trainer.data_collator)
    trainer.train()
    rss = peak_rss_mb()
    trainer.save_model(str(scratch / "adapter"))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"step_ends": ends, "losses": losses, "peak_rss_mb": rss, "batches": counting.batches,
            "sampler": config.train_sampling_strategy}


def held_out_accuracy(model_dir: str, adapter_dir: Path, held_out: list[dict], pad_id: int) -> float:
    """Share of held-out pairs whose chosen side gets the higher reward from the adapter on a fresh trunk."""
    import torch
    from peft import PeftModel

    from align.reward import collate_pairs, pair_rewards
    from align.training import reward_trunk

    model = PeftModel.from_pretrained(reward_trunk(model_dir, torch.float32), str(adapter_dir)).eval()
    right = 0
    with torch.inference_mode():
        for start in range(0, len(held_out), SCORE_BATCH):
            chunk = held_out[start : start + SCORE_BATCH]
            rewards = pair_rewards(model, collate_pairs(chunk, pad_id))
            right += int((rewards[0::2] > rewards[1::2]).sum())
    return right / len(held_out)


def worker(name: str, spec_path: Path, result_path: Path) -> None:
    """Train with one trainer, score its adapter on the held-out pairs, write the measurements."""
    import torch

    spec = json.loads(spec_path.read_text())
    with tempfile.TemporaryDirectory(prefix=f"rm_vs_trl_{name}_") as tmp:
        run = (train_ours if name == "ours" else train_trl)(spec, Path(tmp))
        accuracy = held_out_accuracy(spec["model"], Path(tmp) / "adapter", spec["held_out"], spec["pad_id"])
    wall, cpu = zip(*run["step_ends"])
    pairs = (len(wall) - 1) * spec["batch"]
    drawn, padded, real = (sum(column) for column in zip(*run["batches"]))
    if len(wall) != spec["steps"] or len(run["batches"]) != spec["steps"] or drawn != spec["steps"] * spec["batch"]:
        raise RuntimeError(f"{name}: {len(wall)} steps, {len(run['batches'])} batches of {drawn} pairs; expected "
                           f"{spec['steps']} of {spec['batch']}")
    result = {"trainer": name, "pairs_per_s": pairs / (wall[-1] - wall[0]),
              "padded_tokens_per_step": padded / spec["steps"], "pad_share": 1 - real / padded,
              "sampler": run.get("sampler", f"pair_batches, length_group {spec['length_group']}"),
              "pairs_per_cpu_s": pairs / (cpu[-1] - cpu[0]), "timed_seconds": wall[-1] - wall[0],
              "timed_steps": len(wall) - 1, "step_seconds": [b - a for a, b in zip(wall, wall[1:])],
              "peak_rss_mb": run["peak_rss_mb"], "held_out_accuracy": accuracy, "loss_first": run["losses"][0],
              "loss_last": run["losses"][-1], "losses": run["losses"], "torch_threads": torch.get_num_threads()}
    write_json(result_path, result)


# ----------------------------------------------------------------------------------------------------- parent


def training_config(args: argparse.Namespace, steps: int) -> TrainingRun:
    """params.yaml's `training` and `cluster.defaults` with the benchmark's batch (one micro-batch a step), learning
    rate and LoRA rank, its precision resolved here, a constant rate without warm-up, and no intermediate checkpoint. Read once here and
    handed to both workers."""
    params = load_params(ROOT / "params.yaml")
    training = params.training.model_copy(update={
        "batch_size": args.batch, "learning_rate": args.lr, "lora_r": args.lora_r,
        "precision": training_precision(params.training.precision),
        "lr_schedule": "constant", "warmup_ratio": 0.0})
    return TrainingRun.of(training, params.cluster.defaults.model_copy(update={
        "micro_batch_size": args.batch, "save_every_steps": steps + 1}), "defaults")


def summarize(runs: list[dict]) -> dict:
    """Per trainer: median throughput and RSS over its runs, mean accuracy, the first run's losses."""
    return {"pairs_per_s": statistics.median(r["pairs_per_s"] for r in runs),
            "pairs_per_cpu_s": statistics.median(r["pairs_per_cpu_s"] for r in runs),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
            "padded_tokens_per_step": statistics.median(r["padded_tokens_per_step"] for r in runs),
            "pad_share": statistics.median(r["pad_share"] for r in runs),
            "held_out_accuracy": statistics.fmean(r["held_out_accuracy"] for r in runs),
            "loss_first": runs[0]["loss_first"], "loss_last": runs[0]["loss_last"]}


def print_table(setup: dict, summary: dict, ratios: dict) -> None:
    training = setup["training"]
    print(f"reward-model training, {setup['train_pairs']} train / {setup['held_out_pairs']} held-out pairs of "
          f"{setup['tokens'][0]}-{setup['tokens'][1]} tokens per side ({setup['shared_token_share']:.0%} of them in "
          f"the start both sides share), {setup['epochs']} epoch(s) = {setup['steps']} steps x {setup['batch']} "
          f"pairs (ours: length_group {setup['length_group']}; TRL: its default sampler), "
          f"LoRA r={training['lora_r']}, lr {training['learning_rate']:g}, {setup['model']}, {setup['cpus']} CPUs, "
          f"{setup['repeats']} run(s) each")
    print("| trainer | pairs/s | pairs/CPU-s | padded tokens/step | pad share | peak RSS MB | held-out acc | "
          "loss first→last |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in summary.items():
        print(f"| {name} | {row['pairs_per_s']:.3f} | {row['pairs_per_cpu_s']:.3f} | "
              f"{row['padded_tokens_per_step']:.0f} | {row['pad_share']:.0%} | {row['peak_rss_mb']:.0f} | "
              f"{row['held_out_accuracy']:.3f} | {row['loss_first']:.4f}→{row['loss_last']:.4f} |")
    print(f"speed ours/TRL {ratios['speed']:.2f}x (per CPU-second {ratios['cpu_speed']:.2f}x); padded tokens per "
          f"step ours/TRL {ratios['padded_tokens']:.2f}x; peak RSS ours/TRL {ratios['rss']:.2f}x")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ROOT / "models" / "sft" / "model"
    parser.add_argument("--model", type=absolute, default=default if default.is_dir() else ROOT / "models" / "base")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the train pairs, on each side")
    parser.add_argument("--batch", type=int, default=2, help="pairs per step")
    parser.add_argument("--max-pairs", type=int, help="train pairs kept (default: all)")
    parser.add_argument("--length-group", type=int, default=load_params(ROOT / "params.yaml").rm.length_group,
                        help="our draw's rm.length_group (default: params.yaml's; 1: the plain shuffled draw)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=384, help="tokens kept per side")
    parser.add_argument("--repeats", type=int, default=1, help="runs per trainer, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rm_vs_trl.json")
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def make_spec(args: argparse.Namespace) -> tuple[dict, dict]:
    """(what the workers get: model, steps, training config, token ids; the setup the results record). The
    train pairs are cut to a multiple of --batch, so --epochs are whole epochs of full steps."""
    from transformers import AutoTokenizer

    from align.reward import shared_length
    from align.models import padding_id

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad_id = padding_id(tokenizer)
    train, held_out = split(tokenized_pairs(tokenizer, plain_pairs(), args.max_tokens), HELD_OUT_SHARE, args.seed)
    kept = train[: args.max_pairs]
    train = kept[: len(kept) - len(kept) % args.batch]
    steps = args.epochs * len(train) // args.batch
    if steps < 2 or not held_out:
        sys.exit(f"{len(train)} train / {len(held_out)} held-out pairs: {steps} steps of {args.batch}, too few (the "
                 f"first step is not timed); are data/pairs or data/self_align present?")
    training = training_config(args, steps).model_dump(mode="json")
    lengths = [len(e[side]) for e in train + held_out for side in ("chosen", "rejected")]
    shared = sum(2 * shared_length(e["chosen"], e["rejected"]) for e in train)  # tokens in both sides' start
    spec = {"model": str(args.model), "steps": steps, "batch": args.batch, "seed": args.seed, "pad_id": pad_id,
            "length_group": args.length_group, "training": training, "train": train, "held_out": held_out}
    setup = {"model": str(args.model), "epochs": args.epochs, "steps": steps, "batch": args.batch,
             "length_group": args.length_group, "max_tokens": args.max_tokens,
             "seed": args.seed, "repeats": args.repeats, "train_pairs": len(train), "held_out_pairs": len(held_out),
             "tokens": [min(lengths), max(lengths)], "cpus": os.cpu_count(),
             "shared_token_share": shared / sum(len(e["chosen"]) + len(e["rejected"]) for e in train),
             "timing": "first step excluded on both sides", "training": training}
    return spec, setup


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args.worker, args.spec, args.result)
        return
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model}: no model folder; run `dvc repro import_model` first or pass --model")
    os.environ["HF_HUB_OFFLINE"] = "1"
    spec, setup = make_spec(args)
    with tempfile.TemporaryDirectory(prefix="rm_vs_trl_") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        runs = [run_worker(__file__, name, spec_path, Path(tmp) / f"{name}.json", ROOT)
                for _ in range(args.repeats) for name in TRAINERS]
    summary = {name: summarize([r for r in runs if r["trainer"] == name]) for name in TRAINERS}
    ratios = {"speed": summary["ours"]["pairs_per_s"] / summary["trl"]["pairs_per_s"],
              "cpu_speed": summary["ours"]["pairs_per_cpu_s"] / summary["trl"]["pairs_per_cpu_s"],
              "padded_tokens": summary["ours"]["padded_tokens_per_step"] / summary["trl"]["padded_tokens_per_step"],
              "rss": summary["ours"]["peak_rss_mb"] / summary["trl"]["peak_rss_mb"]}
    print_table(setup, summary, ratios)
    write_json(args.out, {"setup": setup, "summary": summary, "ratios": ratios, "runs": runs})


if __name__ == "__main__":
    main()
