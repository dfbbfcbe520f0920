"""What the hf backend's shared-prefix KV reuse saves: B prompts = one long shared prefix (few-shot exemplars) + a
short distinct question, greedy, timed with and without reuse (best of N after a warm-up); optionally vLLM on the
same prompts. Prints a table, writes bench/results/generation.json.

    python bench/generation.py [--model FOLDER] [--prompts 16] [--prefix-tokens 400] [--new 32] [--repeats 3] [--vllm]
        [--hidden 256] [--layers 4]

Without --model it builds a tiny random Llama (tests/tiny.py, --hidden/--layers) in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from align import generation as gen  # noqa: E402
from align import params  # noqa: E402

QUESTIONS = ["What is 2 + 2?", "Name a colour.", "def add(a, b):", "The quick brown fox", "Why?", "1 2 3"]


def make_prompts(tokenizer, count: int, prefix_tokens: int) -> list[str]:  # noqa: ANN001 - any HF tokenizer
    """`count` prompts sharing a prefix of about `prefix_tokens` tokens, each with its own short question."""
    shot = "Q: What is the capital of France?\nA: The capital of France is Paris.\n"
    repeats = max(1, prefix_tokens // len(tokenizer(shot)["input_ids"]))
    return [shot * repeats + f"Q: {QUESTIONS[i % len(QUESTIONS)]} ({i})\nA:" for i in range(count)]


def best_of(fn, repeats: int) -> float:  # noqa: ANN001 - a no-argument callable
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prefix-tokens", type=int, default=400)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256, help="tiny model width (without --model)")
    parser.add_argument("--layers", type=int, default=4, help="tiny model depth (without --model)")
    parser.add_argument("--vllm", action="store_true", help="also time the vLLM backend (starts an engine)")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if model is None:
        from tests.tiny import make_tiny_model

        model = make_tiny_model(Path(tmp.name) / "model", hidden=args.hidden, layers=args.layers)
    sampling = gen.Sampling(max_new_tokens=args.new)
    defaults = params.load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    hf = gen.Generator(model, params.Engine.of(defaults.generation.model_copy(update={"backend": "hf"}),
                                               defaults.cluster.defaults.model_copy(
                                                   update={"generate_batch_size": args.prompts})))
    prompts = make_prompts(hf.tokenizer, args.prompts, args.prefix_tokens)
    lengths = [len(ids) for ids in hf.tokenizer(prompts)["input_ids"]]

    results: dict[str, float] = {}
    for reuse in (False, True):
        hf._impl.reuse_prefix = reuse

        def run() -> None:
            hf._impl.prefix = None  # time the prefix forward too: a cold batch, not the cross-batch cache
            hf.generate(prompts, sampling)

        results[f"hf, prefix reuse {'on' if reuse else 'off'}"] = best_of(run, args.repeats)
    if args.vllm:
        start = time.perf_counter()
        engine = gen.Generator(model, params.Engine.of(defaults.generation.model_copy(update={"backend": "vllm"}),
                                                       defaults.cluster.defaults.model_copy(
                                                           update={"kv_cache_gb": 1})))
        results["vllm, engine start"] = time.perf_counter() - start
        results["vllm, generate (automatic prefix caching)"] = best_of(lambda: engine.generate(prompts, sampling),
                                                                       args.repeats)
        engine.close()

    print(f"{args.prompts} prompts of {min(lengths)}-{max(lengths)} tokens, {args.new} new tokens, greedy, {model}")
    for name, seconds in results.items():
        print(f"  {name:45s} {seconds:8.3f} s")
    out = Path(__file__).resolve().parent / "results" / "generation.json"
    out.parent.mkdir(exist_ok=True)
    setup = {"prompts": args.prompts, "prompt_tokens": [min(lengths), max(lengths)], "new_tokens": args.new,
             "model": str(args.model or f"tiny hidden={args.hidden} layers={args.layers}"), "cpus": os.cpu_count()}
    out.write_text(json.dumps({"setup": setup, "seconds": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
