"""`label_preferences`' judge (all principles of a (pair, order) in one batch over their shared prompt prefix,
computed once) vs a naive loop (one pair, one principle, one order per forward pass), same model, same pairs,
same principles; labels compared. Prints a table, writes bench/results/labeling.json.

    python bench/labeling.py [--model models/sft/model] [--pairs 8] [--batch 16]

Pairs come from data/pairs/pairs.jsonl when `sample_pairs` has run, else from the seed prompts with two exemplar
answers as the responses (realistic lengths; the timing does not depend on what the responses say).
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
from align.assets import Exemplar, PreferencePrinciple, SeedPrompt, load_jsonl, load_template  # noqa: E402
from align.records import read_jsonl  # noqa: E402
from align.scoring import Scorer  # noqa: E402
from align import judge as lp  # noqa: E402
from stages import label_preferences  # noqa: E402


def make_pairs(count: int) -> list[dict]:
    sampled = ROOT / "data" / "pairs" / "pairs.jsonl"
    if sampled.is_file():
        return read_jsonl(sampled)[:count]
    seeds = load_jsonl(ROOT / "assets" / "seed_prompts.jsonl", SeedPrompt)
    answers = [e.answer for e in load_jsonl(ROOT / "assets" / "exemplars.jsonl", Exemplar)]
    return [{"id": s.id, "prompt": s.text, "response_a": answers[i % len(answers)],
             "response_b": answers[(i + 1) % len(answers)]} for i, s in enumerate(seeds[:count])]


def naive(scorer: Scorer, template: str, pairs: list[dict], criteria: list, choices: tuple[int, int]) -> list:
    rows = []
    for pair, shown in zip(pairs, criteria):
        scores: dict[str, list[float]] = {cid: [] for cid, _ in shown}
        for first, second in (("response_a", "response_b"), ("response_b", "response_a")):
            for cid, principle in shown:
                text = template.format(instruction=pair["prompt"], output_a=pair[first], output_b=pair[second],
                                       principle=principle)
                a, b = scorer.next_token_logits([text], list(choices))[0].tolist()
                scores[cid].append(a - b)
        rows.append({"labels": {pid: lp.label(*s) for pid, s in scores.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ROOT / "models" / "sft" / "model"
    parser.add_argument("--model", type=Path, default=default if default.is_dir() else ROOT / "models" / "base")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model}: no model folder; run `dvc repro import_model` first or pass --model")

    principles = load_jsonl(ROOT / label_preferences.PRINCIPLES, PreferencePrinciple)
    template = load_template(ROOT / label_preferences.TEMPLATE, lp.PLACEHOLDERS)
    pairs = make_pairs(args.pairs)
    scorer = Scorer(args.model, batch_size=args.batch)
    choices = (scorer.token_id("a"), scorer.token_id("b"))
    scorer.next_token_logits(["Hello"], list(choices))  # warm-up

    results, labels = {}, {}
    for name, fn in (("naive: 1 prompt per forward", naive), ("batched, shared prefix once", lp.judge)):
        scorer._prefix = None
        start = time.perf_counter()
        rows = fn(scorer, template, pairs, [lp.criteria_of(principles)] * len(pairs), choices)
        seconds = time.perf_counter() - start
        prompts = len(pairs) * len(principles) * 2
        results[name] = {"seconds": seconds, "judge_prompts": prompts, "prompts_per_s": prompts / seconds}
        labels[name] = [row["labels"] for row in rows]
    (naive_name, batched_name) = results
    ratio = results[naive_name]["seconds"] / results[batched_name]["seconds"]
    same = labels[naive_name] == labels[batched_name]

    lengths = [len(scorer.tokenizer(template.format(instruction=p["prompt"], output_a=p["response_a"],
                                                    output_b=p["response_b"], principle=""))["input_ids"])
               for p in pairs]
    print(f"label_preferences judge: {len(pairs)} pairs x {len(principles)} principles x 2 orders, prompts of "
          f"~{min(lengths)}-{max(lengths)} tokens, batch {args.batch}, {args.model}")
    for name, row in results.items():
        print(f"  {name:32s} {row['seconds']:8.2f} s  {row['prompts_per_s']:7.2f} prompts/s")
    print(f"  speed-up {ratio:.1f}x; identical labels: {same}")
    out = ROOT / "bench" / "results" / "labeling.json"
    out.parent.mkdir(exist_ok=True)
    setup = {"model": str(args.model), "pairs": len(pairs), "principles": len(principles), "batch": args.batch,
             "prompt_tokens": [min(lengths), max(lengths)], "cpus": os.cpu_count()}
    out.write_text(json.dumps({"setup": setup, "runs": results, "speedup": ratio, "identical_labels": same},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
