"""Stage `system_messages` (Janus): user-stated preferences as system messages, with value combinations held out.

The preference space (assets/preference_space.jsonl) has four dimensions, each with its values. Per prompt, one
value per dimension is drawn; the combination is written as the system message a user would send, by the SFT
model itself (asked to phrase the values' requests in its own words) or, where the model's text is cut off, of
implausible length or shares no content word with some value's request (so cannot be said to encode it), or with
`composer: template`, by joining the values' requests. Each row records the values it encodes.

A share of all combinations is held out of training for good: whether a combination is held out is a seeded hash
of the combination alone, so the split is by combination, not by prompt, and the same under any prompt set.
train.jsonl (prompts for pairs, the RM and the policy) draws only the other combinations; eval.jsonl (for
`evaluate`) only held-out ones. Every row also carries a mismatched message, a combination with a different
value in every dimension (from the same side of the split), to contrast against.

Out (data/system_messages): train.jsonl, eval.jsonl, metrics.json; both files empty with `enabled: false`.
"""

from __future__ import annotations

import functools
import math
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import blake3

from align import paths, runner
from align.artifacts import input_refs, staged_out, verify_artifact
from align.assets import DIMENSIONS, Space, load_space, values_by_id
from align.errors import UserError
from align.generation import Generator, Sampling, chat_prompt, one_task
from align.params import Engine, SystemMessages
from align.paths import MODEL
from align.records import read_jsonl, unused_prompts, write_json, write_jsonl

STAGE = "system_messages"
OUT = paths.SYSTEM_MESSAGES
POLICY = paths.SFT
PROMPTS = paths.PROMPTS
SFT_DATA = paths.SELF_ALIGN
SPACE = paths.PREFERENCE_SPACE
MESSAGE_CHARS = (20, 800)  # a model-written message outside these lengths falls back to the template


def combination(values: dict[str, str]) -> str:
    """The key of a value combination: its value ids in dimension order."""
    return "/".join(values[d] for d in DIMENSIONS)


def is_held_out(key: str, share: float, seed: int) -> bool:
    """Whether a combination is held out of all training: a seeded hash of the combination alone."""
    digest = blake3.blake3(f"{seed}:{key}".encode()).digest(length=8)
    return int.from_bytes(digest, "big") / 2**64 < share


def draw_values(rng: random.Random, space: Space, held_out: bool, share: float, seed: int,
                differ_from: dict[str, str] | None = None) -> dict[str, str]:
    """One value id per dimension, from the held-out combinations or from the others; with `differ_from`, a
    different value in every dimension."""
    for _ in range(10_000):
        values = {d: rng.choice([v.id for v in space[d] if differ_from is None or v.id != differ_from[d]])
                  for d in DIMENSIONS}
        if is_held_out(combination(values), share, seed) == held_out:
            return values
    raise UserError(f"{SPACE}: no {'held-out' if held_out else 'training'} combination found; change "
                    f"system_messages.held_out_share")


def template_message(values: dict[str, str], space: Space) -> str:
    """The fallback message: the values' requests, the reader's background first."""
    by_id = values_by_id(space)
    order = ("background", "style", "informativeness", "harmlessness")
    return " ".join(by_id[values[d]].request for d in order)


COMPOSER_INSTRUCTION = ("Rewrite these notes as one short message that a user sends to an AI assistant before asking "
                        "a question, saying who they are and how they want to be answered. Write it in the first "
                        "person, in two to four sentences, and keep every point.")


def composer_request(values: dict[str, str], space: Space) -> str:
    """What the model is asked, to write the message in its own words."""
    by_id = values_by_id(space)
    wants = "\n".join(f"- {by_id[values[d]].request}" for d in DIMENSIONS)
    return f"{COMPOSER_INSTRUCTION}\n\nNotes:\n{wants}\n\nWrite only the message."


GENERIC = {"please", "answer", "want", "give", "tell", "like", "would", "that", "this", "with", "what", "when",
           "your", "about", "from", "have", "know", "should", "make", "keep", "sure", "them", "they", "things", "read",
           "more", "where", "talk", "i'm"}


def _stems(text: str) -> set[str]:
    """Content words cut to their first five letters, so "detail" finds "detailed" and "engineer" "engineering"."""
    return {w[:5] for w in re.findall(r"[a-z']+", text.lower()) if len(w) >= 4 and w not in GENERIC}


def _echoes(text: str, instruction: str, n: int = 5) -> bool:
    """Whether `text` repeats n words in a row of the composer's instruction (the model copying its task)."""
    def grams(words: list[str]) -> set[tuple[str, ...]]:
        return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}

    return bool(grams(re.findall(r"[a-z']+", text.lower())) & grams(re.findall(r"[a-z']+", instruction.lower())))


def rejection(text: str, finish_reason: str, values: dict[str, str], space: Space) -> str | None:
    """Why a model-written message cannot stand for its values, or None: it was cut off, its length is
    implausible, it copies the composer's instruction, or it shares no content word with some value's request or
    name (the model wrote about something else)."""
    if finish_reason != "stop":
        return "cut_off"
    if not MESSAGE_CHARS[0] <= len(text.strip()) <= MESSAGE_CHARS[1]:
        return "length"
    if _echoes(text, COMPOSER_INSTRUCTION):
        return "echoes_the_instruction"
    by_id = values_by_id(space)
    words = _stems(text)
    if any(not (_stems(by_id[values[d]].request) | _stems(by_id[values[d]].name)) & words for d in DIMENSIONS):
        return "misses_a_value"
    return None


def plan(prompts: list[dict], space: Space, cfg: SystemMessages, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) without messages yet: eval prompts first from a seeded shuffle, train prompts after
    them (the two sets disjoint while the pool allows), each with its combination and a mismatched one."""
    order = random.Random(f"{seed}:system_messages").sample(prompts, len(prompts))
    evals = order[: cfg.eval_prompts]
    rest = order[cfg.eval_prompts :] or order
    trains = rest[: cfg.train_prompts]

    def row(prompt: dict, held_out: bool) -> dict:
        rng = random.Random(f"{seed}:{prompt['id']}:{held_out}")
        values = draw_values(rng, space, held_out, cfg.held_out_share, seed)
        other = draw_values(rng, space, held_out, cfg.held_out_share, seed, differ_from=values)
        return {"id": prompt["id"], "prompt": prompt["text"], "values": values, "combination": combination(values),
                "mismatched": {"values": other, "combination": combination(other)}}

    return [row(p, False) for p in trains], [row(p, True) for p in evals]


def compose(generator: Generator | None, sides: list[dict], space: Space, cfg: SystemMessages,
            seed: int) -> Counter:
    """Fill in `system` and `source` of every side (a row or its mismatched part): the model's text where it can
    stand for the values, else the template's. Returns why model texts were rejected, counted."""
    if generator is not None:
        texts = [chat_prompt(generator.tokenizer, [{"role": "user", "content": composer_request(s["values"], space)}])
                 for s in sides]
        written = generator.generate(texts, Sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens, seed=seed))
    else:
        written = [None] * len(sides)
    rejected: Counter = Counter()
    for side, out in zip(sides, written):
        reason = None if out is None else rejection(out.text, out.finish_reason, side["values"], space)
        if out is not None and reason is None:
            side.update(system=out.text.strip(), source="model")
        else:
            rejected.update([reason] if reason else [])
            side.update(system=template_message(side["values"], space), source="template")
    return rejected


@dataclass(frozen=True)
class SystemMessagesJob:
    """The job's arguments, sent to the allocation with it."""
    policy: Path  # the model that writes the messages
    train: list[dict]  # rows without messages yet (`plan`)
    evals: list[dict]
    space: Space
    cfg: SystemMessages
    engine: Engine
    seed: int
    params: dict  # the params subset and the input refs: the manifest records both
    inputs: dict


def job(args: SystemMessagesJob) -> str:
    """Runs inside the allocation: write every message, then train.jsonl, eval.jsonl and metrics.json."""
    rows = args.train + args.evals
    sides = rows + [r["mismatched"] for r in rows]
    if args.cfg.composer == "model":
        with Generator(args.policy, args.engine) as generator:
            rejected = compose(generator, sides, args.space, args.cfg, args.seed)
    else:
        rejected = compose(None, sides, args.space, args.cfg, args.seed)
    metrics = {
        "enabled": True, "train_prompts": len(args.train), "eval_prompts": len(args.evals),
        "combinations": {"train": len({r["combination"] for r in args.train}),
                         "eval": len({r["combination"] for r in args.evals}),
                         "space": math.prod(len(args.space[d]) for d in DIMENSIONS)},
        "model_written_share": sum(s["source"] == "model" for s in sides) / len(sides),
        "model_rejected": dict(sorted(rejected.items())),
        "message_chars_mean": sum(len(s["system"]) for s in sides) / len(sides),
    }
    with staged_out(OUT, stage=STAGE, params=args.params, inputs=args.inputs) as tmp:
        write_jsonl(tmp / "train.jsonl", args.train)
        write_jsonl(tmp / "eval.jsonl", args.evals)
        write_json(tmp / "metrics.json", metrics)
    return verify_artifact(OUT)


def main() -> None:
    params = runner.stage_params(STAGE)
    cfg = params.system_messages
    subset = {"seed": params.seed, "system_messages": cfg.model_dump(), "generation": params.generation.model_dump()}
    if not cfg.enabled:
        with staged_out(OUT, stage=STAGE, params={"system_messages": {"enabled": False}}, inputs={}) as tmp:
            write_jsonl(tmp / "train.jsonl", [])
            write_jsonl(tmp / "eval.jsonl", [])
            write_json(tmp / "metrics.json", {"enabled": False})
        runner.finish_stage(STAGE, OUT, verify_artifact(OUT), note="disabled")
        return
    space = load_space(SPACE)
    inputs = input_refs({"policy": POLICY, "prompts": PROMPTS, "sft_data": SFT_DATA, "space": SPACE})
    pool = unused_prompts(read_jsonl(PROMPTS / "prompts.jsonl"), read_jsonl(SFT_DATA / "sft.jsonl"), None,
                          params.seed)
    if len(pool) < 2:
        raise UserError(f"{PROMPTS}/prompts.jsonl: {len(pool)} prompts not used for SFT; system messages need at "
                        f"least 2 (one to train on, one to evaluate)")
    train, evals = plan(pool, space, cfg, params.seed)
    fn = functools.partial(job, SystemMessagesJob(policy=POLICY / MODEL, train=train, evals=evals, space=space, cfg=cfg,
                                                  engine=Engine.of(params.generation, params.cluster.system_messages), seed=params.seed, params=subset,
                                                  inputs=inputs))
    runner.submit_stage(STAGE, OUT, fn, one_task(params.cluster.system_messages, STAGE), params.cluster, subset, inputs)


if __name__ == "__main__":
    sys.exit(runner.run(main))
