"""Stage `prompts`: synthetic prompts from the base model, with the seed instructions and red-teaming question
types in assets/ as the only human input.

Self-instruct: each request shows `shots` instructions (seeds, and once there are some, `machine_shots` of the
kept machine-written ones) as a numbered list; the model continues the list. Topic-guided red-teaming (TGRT):
the model lists topics per question type, then questions per (type, topic). Every candidate passes the same
filters (length, unseen inputs, ROUGE-L novelty against seeds and everything kept so far) or is counted under
the reason it failed. Deterministic for a given seed and generation backend.
"""

from __future__ import annotations

import functools
import random
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from align import paths, runner, templates
from align.artifacts import input_refs, staged_out, verify_artifact
from align.assets import QuestionType, SeedPrompt, load_jsonl
from align.errors import UserError
from align.filters import RougePool, counts_text, distinct_n, prompt_problem
from align.generation import Completion, Generator, Sampling, one_task
from align.params import Engine, Prompts
from align.records import write_json, write_jsonl

STAGE = "prompts"
OUT = paths.PROMPTS
BASE = paths.BASE
SEEDS = Path("assets/seed_prompts.jsonl")
QUESTION_TYPES = Path("assets/tgrt_question_types.jsonl")
MAX_TOPIC_WORDS = 12


class _Collector:
    """Runs candidates through the filters into the kept list, counting why the others were dropped."""

    def __init__(self, cfg: Prompts, pool: RougePool):
        self.cfg, self.pool = cfg, pool
        self.kept: list[dict] = []
        self.generated = 0
        self.rejected: Counter[str] = Counter()
        self.nearest: list[float] = []  # ROUGE-L of each kept prompt to its nearest earlier one

    def offer(self, text: str, record: dict) -> bool:
        self.generated += 1
        reason = prompt_problem(text, self.cfg.min_words, self.cfg.max_words)
        if reason is None:
            kept, score = self.pool.admit(text)
            reason = None if kept else "near_duplicate"
        if reason is not None:
            self.rejected[reason] += 1
            return False
        self.nearest.append(score)
        self.kept.append({"text": text, **record})
        return True

    def candidates(self, completion: Completion, first: int) -> list[str]:
        """The list items of one completion; a last item cut by the token limit is counted, not offered."""
        items = templates.parse_numbered(completion.text, first)
        if completion.finish_reason == "length" and "\n\n" not in completion.text:
            items.pop()
            self.generated += 1
            self.rejected["cut_off"] += 1
        return items


def self_instruct(generator: Generator, cfg: Prompts, seeds: list[str], collector: _Collector, seed: int) -> None:
    rng = random.Random(seed)
    machine: list[str] = []
    for round_ in range(cfg.max_rounds):
        if len(machine) >= cfg.num_self_instruct:
            return
        requests = []
        for _ in range(cfg.requests_per_round):
            shown = rng.sample(machine, min(cfg.machine_shots, len(machine)))
            shown += rng.sample(seeds, cfg.shots - len(shown))
            rng.shuffle(shown)
            requests.append(templates.self_instruct_prompt(shown))
        sampling = Sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens, seed=seed * 100_003 + round_)
        for generation in generator.generate(requests, sampling):
            for text in collector.candidates(generation, cfg.shots + 1):
                if len(machine) < cfg.num_self_instruct and collector.offer(text, {"source": "self_instruct"}):
                    machine.append(text)


def tgrt(generator: Generator, cfg: Prompts, types: list[QuestionType], collector: _Collector, seed: int) -> None:
    sampling = Sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens, seed=seed * 100_003 + 50_000)
    pairs = []
    for qtype, completion in zip(types, generator.generate([templates.tgrt_topics_prompt(t) for t in types],
                                                           sampling)):
        topics: list[str] = []
        for topic in templates.parse_numbered(completion.text, 1):
            topic = topic.rstrip(".")
            if 0 < len(topic.split()) <= MAX_TOPIC_WORDS and topic.lower() not in (t.lower() for t in topics):
                topics.append(topic)
        pairs += [(qtype, topic) for topic in topics[: cfg.tgrt.topics_per_type]]
    requests = [templates.tgrt_questions_prompt(qtype, topic) for qtype, topic in pairs]
    sampling = Sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens, seed=seed * 100_003 + 60_000)
    for (qtype, topic), generation in zip(pairs, generator.generate(requests, sampling)):
        kept = 0
        for text in collector.candidates(generation, 1):
            if kept < cfg.tgrt.questions_per_topic:
                kept += collector.offer(text, {"source": "tgrt", "type": qtype.name, "topic": topic})


@dataclass(frozen=True)
class PromptsJob:
    """The job's arguments, sent to the allocation with it."""
    model: Path
    cfg: Prompts
    engine: Engine
    seed: int
    params: dict  # the params subset and the input refs: the manifest records both
    inputs: dict


def job(args: PromptsJob) -> str:
    """Runs inside the allocation: generate, filter, write prompts.jsonl + metrics.json, return the artifact id."""
    seeds = load_jsonl(SEEDS, SeedPrompt)
    types = load_jsonl(QUESTION_TYPES, QuestionType)
    pool = RougePool(args.cfg.rouge_threshold)
    pool.extend(s.text for s in seeds)  # a near-copy of a seed is no new prompt either
    collector = _Collector(args.cfg, pool)
    try:
        with Generator(args.model, args.engine) as generator:
            self_instruct(generator, args.cfg, [s.text for s in seeds], collector, args.seed)
            if args.cfg.tgrt.enabled:
                tgrt(generator, args.cfg, types, collector, args.seed)
    finally:
        pool.close()
    tgrt_wanted = len(types) * args.cfg.tgrt.topics_per_type * args.cfg.tgrt.questions_per_topic
    wanted = args.cfg.num_self_instruct + (tgrt_wanted if args.cfg.tgrt.enabled else 0)
    if wanted and not collector.kept:
        reasons = counts_text(collector.rejected)
        raise UserError(f"{STAGE}: all {collector.generated} candidates were rejected ({reasons or 'none parsed'}); "
                        f"nothing written")
    rows = [{"id": s.id, "text": s.text, "source": "seed", "type": None, "topic": None} for s in seeds]
    counters: Counter[str] = Counter()
    for row in collector.kept:
        counters[row["source"]] += 1
        rows.append({"id": f"{row['source']}-{counters[row['source']]:05d}", "text": row["text"],
                     "source": row["source"], "type": row.get("type"), "topic": row.get("topic")})
    machine = [row["text"] for row in collector.kept]
    metrics = {
        "generated": collector.generated,
        "kept": len(machine),
        "kept_share": len(machine) / collector.generated if collector.generated else 0.0,
        "kept_self_instruct": counters["self_instruct"],
        "kept_tgrt": counters["tgrt"],
        "total_prompts": len(rows),
        "rejected": dict(sorted(collector.rejected.items())),
        "rouge_l_nearest_mean": statistics.fmean(collector.nearest) if collector.nearest else 0.0,
        "distinct_2": distinct_n(machine, 2),
    }
    with staged_out(OUT, stage=STAGE, params=args.params, inputs=args.inputs) as tmp:
        write_jsonl(tmp / "prompts.jsonl", rows)
        write_json(tmp / "metrics.json", metrics)
    return verify_artifact(OUT)


def main() -> None:
    params = runner.stage_params(STAGE)
    load_jsonl(SEEDS, SeedPrompt)  # bad assets fail here, before a job
    load_jsonl(QUESTION_TYPES, QuestionType)
    inputs = input_refs({"model": BASE, "seeds": SEEDS, "question_types": QUESTION_TYPES})
    subset = {"seed": params.seed, "prompts": params.prompts.model_dump(), "generation": params.generation.model_dump()}
    fn = functools.partial(job, PromptsJob(model=BASE, cfg=params.prompts, engine=Engine.of(params.generation, params.cluster.prompts),
                                           seed=params.seed, params=subset, inputs=inputs))
    runner.submit_stage(STAGE, OUT, fn, one_task(params.cluster.prompts, STAGE), params.cluster, subset, inputs)


if __name__ == "__main__":
    sys.exit(runner.run(main))
