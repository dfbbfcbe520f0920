"""What `training.gradient_checkpointing` trades: the peak memory and the seconds of one LoRA training step
(forward + backward of the causal-LM loss, as `engrave` and PPO's policy take it) with the layers' activations kept
vs recomputed in the backward pass, on the same model, batch and LoRA.

    python bench/gradient_checkpointing.py [--model models/base] [--batch 4] [--tokens 512] [--steps 3]

Each side runs in its own subprocess, so its peak RSS (on a GPU: peak allocated CUDA memory) is its own; the
first step is a warm-up and not timed. Prints a table and writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from align.records import write_json  # noqa: E402


def one_side(model_dir: Path, recompute: bool, batch: int, tokens: int, steps: int) -> dict:
    """Seconds per step (after one warm-up) and peak memory of LoRA steps on random tokens."""
    import torch

    from align.params import TrainingRun, load_params
    from align.training import lora_model

    cuda = torch.cuda.is_available()
    defaults = load_params(ROOT / "params.yaml")
    training = TrainingRun.of(defaults.training, defaults.cluster.defaults.model_copy(
        update={"gradient_checkpointing": recompute}), "defaults")
    model = lora_model(model_dir, training, seed=0)
    model = model.to("cuda" if cuda else "cpu").train()
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    seconds = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"gradient_checkpointing": recompute, "seconds_per_step": sum(seconds[1:]) / steps,
            "peak_mb": peak_mb, "memory": "cuda allocated" if cuda else "process RSS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "base")
    parser.add_argument("--batch", type=int, default=4, help="rows per step (micro batch)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per row")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side, after one warm-up")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gradient_checkpointing.json")
    parser.add_argument("--side", choices=("kept", "recomputed"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model}: no model folder (config.json); run `dvc repro import_model` or pass --model")
    if args.side:
        print(json.dumps(one_side(args.model.resolve(), args.side == "recomputed", args.batch, args.tokens,
                                  args.steps)))
        return
    rows = []
    for side in ("kept", "recomputed"):
        proc = subprocess.run([sys.executable, __file__, "--side", side, "--model", str(args.model), "--batch",
                               str(args.batch), "--tokens", str(args.tokens), "--steps", str(args.steps)],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"the {side} side failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    kept, recomputed = rows
    print(f"{args.model.name}: {args.batch} x {args.tokens} tokens per step, LoRA r 16 on every linear layer")
    print(f"| activations | s/step | peak {kept['memory']} MB |\n| --- | --- | --- |")
    for row in rows:
        print(f"| {'recomputed' if row['gradient_checkpointing'] else 'kept'} | {row['seconds_per_step']:.2f} | "
              f"{row['peak_mb']:.0f} |")
    ratios = {"seconds": recomputed["seconds_per_step"] / kept["seconds_per_step"],
              "peak_memory": recomputed["peak_mb"] / kept["peak_mb"]}
    print(f"recomputed / kept: {ratios['seconds']:.2f}x the time, {ratios['peak_memory']:.2f}x the peak memory")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"model": str(args.model), "batch": args.batch, "tokens": args.tokens, "steps": args.steps,
                          "sides": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
