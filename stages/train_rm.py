"""Stage `train_rm`: the instructable reward model (SALMON), then its evaluation.

Trains a LoRA adapter and a scalar head on the SFT policy with the Bradley-Terry loss on instances drawn from
the labelled pairs of `label_preferences` (align/reward.py: random principle subsets, some negated, labelled by
their dominant principle as SALMON does, a share flipped as noise), after an optional preference-model
pre-training pass on a public preference set (`rm.pmp`); micro-batches hold pairs of similar shared-prefix and
remainder widths (`rm.length_group`), so little of them is padding. The job then scores, with the same
`RewardScorer.score` PPO uses: accuracy on held-out pairs (their labels not flipped), the negation flip rate on
held-out pairs a single principle decides, and accuracy on the HHH pairs of the benchmark folder; the metrics also
say how the label rule labelled the training subsets (`labels`: decided share, agreement with single principles
and with the majority rule, flipped share).

Out (models/rm): adapter/ (LoRA + head), rm_prompt.txt, reward.json, eval.jsonl (every held-out judgement),
metrics.json.
"""

from __future__ import annotations

import functools
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from align import paths, runner
from align.artifacts import input_refs
from align.assets import PreferencePrinciple, load_jsonl, load_template, pick_principles, value_descriptions
from align.benchmarks import DATA as BENCHMARKS
from align.benchmarks import ChoiceItem, bench_path, load_hhh
from align.devices import release_memory
from align.errors import UserError
from align.models import padding_id
from align.params import Pmp, TrainingRun
from align.params import RewardModel as RewardParams
from align.paths import MODEL
from align.records import write_json, write_jsonl
from align.sharding import ScoreFn, rows_over_ranks
from align.reward import (
    CONFIG_FILE, PLACEHOLDERS, TEMPLATE_FILE, RewardScorer, both_rewards, bt_loss, label_metrics, negation_cases, pair_batches,
    preference_examples, principle_scales, read_preferences, split_pairs, tokenize_examples,
)
from align.training import (
    Batch, Batches, LiveCurve, checkpoint_dir, finish_training, step_count, train,
)

STAGE = "train_rm"
OUT = paths.RM
SFT = paths.SFT
PREFERENCES = paths.PREFERENCES
PRINCIPLES = paths.PREFERENCE_PRINCIPLES
SPACE = paths.PREFERENCE_SPACE
TEMPLATE = Path("assets/rm_prompt.txt")
LIVE = Path("dvclive/train_rm")


# ----------------------------------------------------------------------------------- preference pre-training


def split_transcript(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """An Anthropic HH-style pair (two whole transcripts ending in different assistant turns) as (prompt, chosen
    reply, rejected reply): the prompt is the shared dialogue up to the last "Assistant:"."""
    marker = "\n\nAssistant:"
    cut = chosen.rfind(marker)
    if cut < 0 or rejected[: cut + len(marker)] != chosen[: cut + len(marker)]:
        return None
    prompt = chosen[: cut + len(marker)].strip()
    return prompt, chosen[cut + len(marker):].strip(), rejected[cut + len(marker):].strip()


def _text(value: object) -> str | None:
    """A plain string, or the content of the last message of a conversational column."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return value[-1].get("content")
    return None


def pmp_pairs(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) from rows with prompt/chosen/rejected columns or HH transcripts; rows that fit
    neither, or have an empty side, are left out."""
    pairs = []
    for row in rows:
        chosen, rejected = _text(row.get("chosen")), _text(row.get("rejected"))
        if chosen is None or rejected is None:
            continue
        prompt = _text(row.get("prompt"))
        pair = (prompt, chosen, rejected) if prompt is not None else split_transcript(chosen, rejected)
        if pair and all(part.strip() for part in pair) and pair[1] != pair[2]:
            pairs.append(pair)
    return pairs


def load_pmp(cfg: Pmp) -> list[tuple[str, str, str]]:
    """The pre-training pairs of `rm.pmp` (at most max_examples). A local file or folder that cannot be read is
    an error; a hub dataset that cannot be reached (offline) is skipped with one line on stderr."""
    if cfg.dataset is None:
        return []
    from datasets import load_dataset

    path = Path(cfg.dataset)
    try:
        if path.is_file():
            data = load_dataset("json", data_files=str(path), split="train")
        elif path.is_dir():
            data = load_dataset(str(path), split=cfg.split)
        else:
            data = load_dataset(cfg.dataset, split=cfg.split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; all end here as one line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if path.exists():
            raise UserError(f"params.yaml: rm.pmp.dataset: {path} could not be read ({reason})") from None
        print(f"{STAGE}: rm.pmp: skipped, {cfg.dataset!r} could not be loaded ({reason})", file=sys.stderr)
        return []
    pairs = pmp_pairs([data[i] for i in range(min(len(data), cfg.max_examples * 2))])[: cfg.max_examples]
    if not pairs:
        raise UserError(f"params.yaml: rm.pmp.dataset: {cfg.dataset}: no usable pairs; expected prompt/chosen/"
                        f"rejected columns or Anthropic HH transcripts")
    return pairs


# ------------------------------------------------------------------------------------------------------ job


def _phased_batch(first: Batches, first_micro_batches: int, second: Batches, index: int) -> Batch:
    return first(index) if index < first_micro_batches else second(index - first_micro_batches)


def mean(values: list[float]) -> float | None:
    """The mean, or None where there was nothing to measure (too few held-out pairs)."""
    return statistics.fmean(values) if values else None


def hhh_accuracy(score: ScoreFn, items: list[ChoiceItem], guide: list[str]) -> dict:
    """Per subset and overall: the share of items whose best reply gets a higher reward than every wrong one."""
    prompts = [item.context.strip() for item in items for _ in item.choices]
    replies = [choice for item in items for choice in item.choices]
    rewards = iter(score(prompts, replies, [guide] * len(prompts)))
    right: dict[str, list[float]] = {}
    for item in items:
        scores = [next(rewards) for _ in item.choices]
        wrong = max(s for i, s in enumerate(scores) if i not in item.correct)
        right.setdefault(item.subset, []).append(float(scores[item.best] > wrong))
    every = [r for rs in right.values() for r in rs]
    return {"acc": statistics.fmean(every), "items": len(every),
            **{subset: {"acc": statistics.fmean(rs), "items": len(rs)} for subset, rs in sorted(right.items())}}


def evaluate(score: ScoreFn, held_out: list[dict], cases: list[dict], principles: dict[str, PreferencePrinciple],
             hhh: list[ChoiceItem], hhh_guide: list[str]) -> tuple[dict, list[dict]]:
    """Metrics and the per-judgement records of the held-out pairs, the negation cases and the HHH pairs, their
    rewards from `score` (`RewardScorer.score`, or it over the ranks)."""
    records = []
    chosen, rejected = both_rewards(score, [e["prompt"] for e in held_out], [e["guide"] for e in held_out],
                                       [e["chosen"] for e in held_out], [e["rejected"] for e in held_out])
    for example, c, r in zip(held_out, chosen, rejected):
        records.append({"kind": "held_out", "id": example["id"], "shown": example["shown"], "chosen": c,
                        "rejected": r})
    margins = []  # per case: (margin for a over b under the principle, the same under its negation)
    for text_of in (lambda p: p.definition, lambda p: p.negation):
        guides = [[text_of(principles[c["principle"]])] for c in cases]
        a, b = both_rewards(score, [c["prompt"] for c in cases], guides, [c["response_a"] for c in cases],
                               [c["response_b"] for c in cases])
        margins.append([x - y for x, y in zip(a, b)])
    flips, agrees = [], []
    for case, plain, negated in zip(cases, *margins):
        flips.append(float((plain > 0) != (negated > 0)))
        agrees.append(float((plain > 0) == (case["winner"] == "a")))
        records.append({"kind": "negation", "id": case["id"], "principle": case["principle"], "winner": case["winner"],
                        "margin_a": plain, "margin_a_negated": negated})
    right = [float(c > r) for c, r in zip(chosen, rejected)]
    system = [x for e, x in zip(held_out, right) if e.get("system")]
    metrics = {
        "held_out": {"accuracy": mean(right), "examples": len(held_out)},
        "system_messages": {"accuracy": mean(system), "examples": len(system)},
        "negation": {"flip_rate": mean(flips), "label_agreement": mean(agrees), "cases": len(cases)},
        "hhh": hhh_accuracy(score, hhh, hhh_guide),
    }
    return metrics, records


@dataclass(frozen=True)
class TrainRmJob:
    """The job's arguments, sent to the allocation with it."""
    base: Path  # the SFT policy the RM's LoRA and head train on
    train_examples: list[dict]
    pmp_examples: list[dict]  # preference-model pre-training pairs, trained on first
    held_out: list[dict]  # examples of the held-out pairs
    cases: list[dict]  # held-out pairs one principle decides, for the negation flip rate
    labels: dict  # how the label rule labelled the training subsets (`label_metrics`)
    principles: dict[str, PreferencePrinciple]
    hhh: list[ChoiceItem]
    hhh_guide: list[str]  # the principles the RM is shown for HHH and the pre-training pairs
    template: str  # the RM's prompt
    cfg: RewardParams
    training: TrainingRun  # `training` with rm's learning rate and LoRA size, and the job's execution settings
    score_batch_size: int  # rows per forward pass when evaluating (cluster.train_rm.score_batch_size)
    shard_scorers: bool  # the evaluation's RM spread over the job's ranks (cluster.train_rm.shard_scorers)
    seed: int
    ckpt_dir: Path
    params: dict  # the params subset and the input refs: the manifest records both
    inputs: dict


def write_rm_files(folder: Path, template: str, cfg: RewardParams) -> None:
    """What turns an adapter folder's parent into a reward model `RewardScorer` loads: its prompt and limits."""
    (folder / TEMPLATE_FILE).write_text(template, encoding="utf-8")
    write_json(folder / CONFIG_FILE, {"max_prompt_tokens": cfg.max_prompt_tokens,
                                      "max_response_tokens": cfg.max_response_tokens})


def score_trained(args: TrainRmJob) -> tuple[dict, list[dict]] | None:
    """`evaluate` through `RewardScorer.score`, the scorer PPO uses, on the trained adapter in the checkpoint
    folder: on rank 0, or with `shard_scorers` on every rank, the RM spread over them and each scoring a share of
    the rows (`rows_over_ranks`). None on a rank that does not score. The training engine is released first."""
    import torch.distributed as dist

    release_memory()
    if dist.get_rank() == 0:
        write_rm_files(args.ckpt_dir, args.template, args.cfg)
    dist.barrier()
    if not (args.shard_scorers or dist.get_rank() == 0):
        return None
    rm = RewardScorer(args.base, args.ckpt_dir, batch_size=args.score_batch_size, precision=args.training.precision,
                      shard=args.shard_scorers)
    found = evaluate(rows_over_ranks(rm.score) if rm.ranks else rm.score, args.held_out, args.cases, args.principles,
                     args.hhh, args.hhh_guide)
    del rm
    release_memory()
    return found


def job(args: TrainRmJob) -> str | None:
    """Runs in every task of the allocation: train (pre-training pairs first, then the synthetic instances), score
    (`score_trained`), then rank 0 writes the out."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.base, trust_remote_code=False)
    pad_id = padding_id(tokenizer)
    tokenize = functools.partial(tokenize_examples, tokenizer, args.template,
                                 max_prompt_tokens=args.cfg.max_prompt_tokens,
                                 max_response_tokens=args.cfg.max_response_tokens)
    pmp_steps = math.ceil(len(args.pmp_examples) / args.training.batch_size)  # one pass over them
    steps = pmp_steps + step_count(len(args.train_examples), args.cfg.epochs, args.training)
    draw = functools.partial(pair_batches, micro_batch_size=args.training.micro_batch_size, seed=args.seed,
                             pad_id=pad_id, length_group=args.cfg.length_group)
    synthetic = draw(tokenize(args.train_examples))
    batches = synthetic
    if pmp_steps:
        pmp = draw(tokenize(args.pmp_examples))
        micro_batches = pmp_steps * args.training.batch_size // args.training.micro_batch_size
        batches = functools.partial(_phased_batch, pmp, micro_batches, synthetic)
    adapter = args.ckpt_dir / "adapter"
    result = train(args.base, batches, bt_loss, args.ckpt_dir, args.training, steps, adapter_dir=adapter,
                   seed=args.seed, head="reward", on_step=LiveCurve(LIVE))
    losses, accuracy = result["losses"], [s["accuracy"] for s in result["stats"]]
    scored = score_trained(args)

    def write(folder: Path) -> dict:
        """The RM's prompt and limits beside its adapter, its evaluation's records and metrics."""
        write_rm_files(folder, args.template, args.cfg)
        metrics, records = scored
        tail = slice(-10, None)
        write_jsonl(folder / "eval.jsonl", records)
        return {**metrics, "labels": args.labels, "train": {
            "examples": len(args.train_examples), "pmp_examples": len(args.pmp_examples), "steps": steps,
            "system_message_examples": sum(bool(e.get("system")) for e in args.train_examples),
            "loss_first": losses[0], "loss_last10_mean": statistics.fmean(losses[tail]),
            "accuracy_last10_mean": statistics.fmean(accuracy[tail])}}

    return finish_training(OUT, stage=STAGE, params=args.params, inputs=args.inputs, adapter=adapter,
                           ckpt_dir=args.ckpt_dir, base=None, write=write)


def main() -> None:
    params = runner.stage_params(STAGE)
    cfg = params.rm
    every = load_jsonl(PRINCIPLES, PreferencePrinciple)
    principles = {p.id: p for p in every}
    hhh_guide = [p.definition for p in pick_principles(every, cfg.hhh_principles, "rm.hhh_principles", PRINCIPLES)]
    template = load_template(TEMPLATE, PLACEHOLDERS)
    descriptions = value_descriptions(SPACE)
    inputs = input_refs({"policy": SFT, "preferences": PREFERENCES, "principles": PRINCIPLES, "template": TEMPLATE,
                         "space": SPACE, "benchmarks": BENCHMARKS})
    hhh = load_hhh(bench_path("hhh"))
    rows = read_preferences(PREFERENCES / "preferences.jsonl", set(principles) | set(descriptions))
    train_rows, held_rows = split_pairs(rows, cfg.eval_share, params.seed)
    scales = principle_scales(rows)  # over the whole file, so a pair's label does not depend on the split
    draw = functools.partial(preference_examples, principles=principles, descriptions=descriptions,
                             per_pair=cfg.subsets_per_pair, scales=scales, seed=params.seed)
    train_examples = draw(train_rows, cfg=cfg)
    if not train_examples:
        raise UserError(f"{PREFERENCES}/preferences.jsonl: no training pair is preferred under any principle "
                        f"(every label is a tie); nothing to train the reward model on; the judge could not tell "
                        f"the responses apart: raise sample_pairs.temperature (more different responses), sample more "
                        f"pairs (sample_pairs.max_prompts) or judge with fewer, broader principles "
                        f"(label_preferences.principles)")
    pmp_examples = [{"id": f"pmp-{i}", "prompt": p, "guide": hhh_guide, "chosen": c, "rejected": r}
                    for i, (p, c, r) in enumerate(load_pmp(cfg.pmp))]
    resources = params.cluster.train_rm
    training = TrainingRun.of(params.training, resources, STAGE, learning_rate=cfg.learning_rate, lora_r=cfg.lora_r,
                              lora_alpha=cfg.lora_alpha)
    subset = {"seed": params.seed, "training": params.training.model_dump(), "rm": cfg.model_dump()}
    ckpt_dir = checkpoint_dir(STAGE, {"params": subset, "inputs": inputs})
    held_out = draw(held_rows, cfg=cfg.model_copy(update={"label_noise": 0.0}))  # scored on clean labels
    labels = label_metrics([r for r in train_rows if "system" not in r], list(principles), cfg.subsets_per_pair, cfg,
                           scales, params.seed)
    fn = functools.partial(job, TrainRmJob(
        base=SFT / MODEL, train_examples=train_examples, pmp_examples=pmp_examples, held_out=held_out,
        cases=negation_cases(held_rows, principles), labels=labels, principles=principles, hhh=hhh,
        hhh_guide=hhh_guide, template=template, cfg=cfg, training=training,
        score_batch_size=resources.score_batch_size, shard_scorers=resources.shard_scorers, seed=params.seed,
        ckpt_dir=ckpt_dir, params=subset, inputs=inputs,
    ))
    runner.submit_stage(STAGE, OUT, fn, resources, params.cluster, subset, inputs)


if __name__ == "__main__":
    sys.exit(runner.run(main))
