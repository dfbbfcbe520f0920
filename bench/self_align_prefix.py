"""The `self_align` stage's generation with the principles + exemplars prefix computed once and reused (the hf
backend's shared-prefix KV cache, as the stage runs it) vs the same prompts generated naively (plain left
padding: the prefix recomputed for every prompt). Same model, same prompts (the stage's template over the
seed prompts), greedy; the outputs are compared. Prints a table, writes bench/results/self_align_prefix.json.

    python bench/self_align_prefix.py [--model models/base] [--prompts 16] [--batch 8] [--new 48]

The default model is the imported embedded SmolLM2-135M (`dvc repro import_model` first); --model takes any
HF folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stages import params, templates  # noqa: E402
from stages.assets import Exemplar, Principle, SeedPrompt, load_jsonl  # noqa: E402
from stages.generation import Generator, Sampling  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "base")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new", type=int, default=48, help="max new tokens per prompt")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model}: no model folder; run `dvc repro import_model` first or pass --model")

    assets = ROOT / "assets"
    prefix = templates.self_align_prefix(load_jsonl(assets / "principles.jsonl", Principle),
                                         load_jsonl(assets / "exemplars.jsonl", Exemplar))
    queries = [s.text for s in load_jsonl(assets / "seed_prompts.jsonl", SeedPrompt)[: args.prompts]]
    prompts = [templates.self_align_prompt(prefix, q) for q in queries]
    sampling = Sampling(max_new_tokens=args.new, stop=templates.SELF_ALIGN_STOP)
    generator = Generator(args.model, params.Generation(backend="hf", batch_size=args.batch))
    lengths = [len(ids) for ids in generator.tokenizer(prompts)["input_ids"]]
    prefix_tokens = len(generator.tokenizer(prefix)["input_ids"])

    runs = {}
    for name, reuse in (("naive (prefix recomputed per prompt)", False), ("shared prefix KV reused", True)):
        generator._impl.reuse_prefix = reuse
        generator._impl.prefix = None  # cold: the reused run pays for its one prefix forward
        start = time.perf_counter()
        outputs = generator.generate(prompts, sampling)
        seconds = time.perf_counter() - start
        tokens = sum(g.num_tokens for g in outputs)
        runs[name] = {"seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds,
                      "texts": [g.text for g in outputs]}
    naive, reused = runs.values()
    same = sum(a == b for a, b in zip(naive["texts"], reused["texts"]))
    ratio = naive["seconds"] / reused["seconds"]

    print(f"self_align generation: {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens "
          f"(shared prefix {prefix_tokens}), batch {args.batch}, <= {args.new} new tokens, greedy, {args.model}")
    print(f"  {'':40s} {'seconds':>9s} {'tokens':>7s} {'tokens/s':>9s}")
    for name, run in runs.items():
        print(f"  {name:40s} {run['seconds']:9.2f} {run['generated_tokens']:7d} {run['tokens_per_s']:9.2f}")
    print(f"  speed-up {ratio:.1f}x; identical outputs {same}/{len(prompts)}")

    out = ROOT / "bench" / "results" / "self_align_prefix.json"
    out.parent.mkdir(exist_ok=True)
    setup = {"model": str(args.model), "prompts": len(prompts), "prompt_tokens": [min(lengths), max(lengths)],
             "prefix_tokens": prefix_tokens, "batch": args.batch, "max_new_tokens": args.new, "cpus": os.cpu_count()}
    summary = {name: {k: v for k, v in run.items() if k != "texts"} for name, run in runs.items()}
    out.write_text(json.dumps({"setup": setup, "runs": summary, "speedup": ratio, "identical_outputs": same},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
