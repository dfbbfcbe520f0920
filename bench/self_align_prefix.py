"""The `self_align` stage's generation with the principles + exemplars prefix computed once and reused vs the same
prompts generated naively (the prefix recomputed for every prompt), on both backends: vLLM with and without
its prefix caching (the stage's default backend), and transformers with and without the shared-prefix KV cache
(plain left padding). Same model, same prompts (the stage's template over the seed prompts), greedy; the outputs
of each pair are compared. Engine start-up is not timed (a warm-up request on an unrelated prompt runs first).
Prints a table, writes bench/results/self_align_prefix.json.

    python bench/self_align_prefix.py [--model models/base] [--prompts 16] [--batch 8] [--new 48] [--backends vllm,hf]

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
from align.assets import Exemplar, Principle, SeedPrompt, load_jsonl  # noqa: E402
from align.generation import Generator, Sampling  # noqa: E402
from align import params, templates  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "base")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new", type=int, default=48, help="max new tokens per prompt")
    parser.add_argument("--backends", default="vllm,hf")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model}: no model folder; run `dvc repro import_model` first or pass --model")

    assets = ROOT / "assets"
    prefix = templates.self_align_prefix(load_jsonl(assets / "principles.jsonl", Principle),
                                         load_jsonl(assets / "exemplars.jsonl", Exemplar))
    queries = [s.text for s in load_jsonl(assets / "seed_prompts.jsonl", SeedPrompt)[: args.prompts]]
    prompts = [templates.self_align_prompt(prefix, q) for q in queries]
    sampling = Sampling(max_new_tokens=args.new, stop=templates.SELF_ALIGN_STOP)
    defaults = params.load_params(ROOT / "params.yaml")
    execution = defaults.cluster.defaults.model_copy(update={"generate_batch_size": args.batch, "kv_cache_gb": 2})

    rows, texts = {}, {}
    for backend in args.backends.split(","):
        for caching in (False, True):
            name = f"{backend}, {'prefix reused' if caching else 'naive (prefix per prompt)'}"
            with Generator(args.model, params.Engine.of(defaults.generation.model_copy(update={"backend": backend}),
                                                        execution),
                           prefix_caching=caching) as generator:
                generator.generate(["Hello"], Sampling(max_new_tokens=2))  # warm-up, shares nothing with prompts
                start = time.perf_counter()
                outputs = generator.generate(prompts, sampling)
                seconds = time.perf_counter() - start
                lengths = [len(ids) for ids in generator.tokenizer(prompts)["input_ids"]]
                prefix_tokens = len(generator.tokenizer(prefix)["input_ids"])
            tokens = sum(g.num_tokens for g in outputs)
            rows[name] = {"seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds}
            texts[name] = [g.text for g in outputs]

    print(f"self_align generation: {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens "
          f"(shared prefix {prefix_tokens}), hf batch {args.batch}, <= {args.new} new tokens, greedy, {args.model}")
    print(f"  {'':36s} {'seconds':>9s} {'tokens':>7s} {'tokens/s':>9s} {'speed-up':>9s} {'same text':>9s}")
    summary = {}
    names = list(rows)
    for naive, reused in zip(names[::2], names[1::2]):
        ratio = rows[naive]["seconds"] / rows[reused]["seconds"]
        same = sum(a == b for a, b in zip(texts[naive], texts[reused]))
        summary[reused.split(",")[0]] = {"speedup": ratio, "identical_outputs": same}
        for name in (naive, reused):
            row = rows[name]
            extra = f"{ratio:8.1f}x {same:>5d}/{len(prompts)}" if name == reused else ""
            print(f"  {name:36s} {row['seconds']:9.2f} {row['generated_tokens']:7d} {row['tokens_per_s']:9.2f} {extra}")

    out = ROOT / "bench" / "results" / "self_align_prefix.json"
    out.parent.mkdir(exist_ok=True)
    setup = {"model": str(args.model), "prompts": len(prompts), "prompt_tokens": [min(lengths), max(lengths)],
             "prefix_tokens": prefix_tokens, "hf_batch": args.batch, "max_new_tokens": args.new,
             "cpus": os.cpu_count()}
    out.write_text(json.dumps({"setup": setup, "runs": rows, "per_backend": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
