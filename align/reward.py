"""The instructable reward model: one scalar for (guide, instruction, response), where the guide is a list of
principles or a system message written into the RM prompt (assets/rm_prompt.txt). Behaviour is steered later by
editing that text, so the same trained RM serves labeling checks, PPO rewards and evaluation.

Training data comes from the per-principle scores and labels of `label_preferences`, labelled as SALMON does: a
training instance shows a random subset of principles (few more often than many), each replaced by its negation
with some probability; the pair's label under the subset is that of its dominant principle, the shown one whose
score (mean of both orders, divided by that principle's variance over the file; 0 where the orders disagree)
is largest in size, flipped if it is negated; a share of labels is flipped as noise. The earlier rule, the
majority of the shown principles' labels, is `label_rule: majority`. A subset that ties is not used. Loss:
Bradley-Terry on the two responses' rewards, both in one forward pass.

The model is the SFT policy's trunk with a scalar head (`training.lora_model(head="reward")`); its out holds
only the LoRA adapter with the head, the prompt template and the truncation limits it was trained with.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import random
import statistics
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from align.assets import PreferencePrinciple
from align.devices import inference_dtype, job_device, placed
from align.errors import UserError
from align.losses import bradley_terry
from align.models import prompt_ids
from align.params import Subsets
from align.precision import torch_dtype
from align.prefix_cache import PrefixCache, common_length, shared_prefix, suffix_block
from align.progress import progress
from align.sharding import Lockstep, ScoreFn, inference_config, merge_lora, partitioned, world_size, zero3_inference
from align.training import Batch, Batches, length_grouped_batches, recomputes, reward_trunk

PLACEHOLDERS = ("principles", "instruction", "response")
TEMPLATE_FILE = "rm_prompt.txt"  # inside the RM out: the template it was trained with
CONFIG_FILE = "reward.json"  # inside the RM out: truncation limits

Guide = str | Sequence[str]  # a system message, or principle texts listed one per line
Shown = tuple[str, bool]  # (principle id, negated)


class PreferenceRow(BaseModel):
    """One line of data/preferences/preferences.jsonl as `label_preferences` writes it: per principle, the score
    in both orders and the label."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    response_a: str = Field(min_length=1)
    response_b: str = Field(min_length=1)
    scores: dict[str, tuple[float, float]]
    labels: dict[str, str]


def read_preferences(path: Path, principle_ids: set[str]) -> list[dict]:
    """The labelled pairs, each checked against the current format; one line naming file, line and key else."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = PreferenceRow.model_validate(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(k) for k in err["loc"]) or "(record)"
            raise UserError(f"{path}: line {number}: {key}: {err['msg'].lower()} (a file from an older format? "
                            f"rerun label_preferences)") from None
        bad = next((v for v in row.labels.values() if v not in ("a", "b", "tie")), None)
        unknown = next((p for p in row.labels if p not in principle_ids), None)
        if bad is not None:
            raise UserError(f"{path}: line {number}: labels: {bad!r}; expected a, b or tie")
        if unknown is not None:
            raise UserError(f"{path}: line {number}: labels: principle {unknown!r} is not in the preference "
                            f"principles; expected ids from assets/preference_principles.jsonl")
        rows.append(row.model_dump())
    if not rows:
        raise UserError(f"{path}: empty; expected labelled pairs")
    return rows


# ------------------------------------------------------------------------------------------------ the labels


def principle_scales(rows: list[dict]) -> dict[str, float]:
    """Per principle, the variance of its scores over `rows`, both orders, each read as favouring response a
    (score_ab and -score_ba). SALMON divides a principle's score by it (the variance, not the standard
    deviation), so a principle whose judge logits run large does not decide every subset it is shown in."""
    values: dict[str, list[float]] = {}
    for row in rows:
        for pid, (ab, ba) in row["scores"].items():
            values.setdefault(pid, []).extend((ab, -ba))
    return {pid: statistics.pvariance(v) for pid, v in values.items()}


def normalised_scores(row: dict, scales: dict[str, float]) -> dict[str, float]:
    """Per principle, the pair's score as SALMON labels with it: the mean of its two orders over the principle's
    variance where the orders agree (label a or b; > 0 favours a), 0 where they disagree (a tie) or it never
    varies."""
    result = {}
    for pid, (ab, ba) in row["scores"].items():
        decided = row["labels"].get(pid, "tie") != "tie" and scales.get(pid, 0.0) > 0
        result[pid] = (ab - ba) / 2 / scales[pid] if decided else 0.0
    return result


def dominant_label(scores: dict[str, float], subset: list[Shown]) -> str:
    """'a', 'b' or 'tie' (SALMON): the shown principle with the largest |normalised score| decides, its sign
    flipped if it is shown negated; the first in shown order where two are as large; a tie where it is 0."""
    top = max(((-1 if negated else 1) * scores.get(pid, 0.0) for pid, negated in subset), key=abs)
    return "a" if top > 0 else "b" if top < 0 else "tie"


def majority_label(labels: dict[str, str], subset: list[Shown]) -> str:
    """'a', 'b' or 'tie': the majority of the shown principles' labels, a negated principle's vote flipped."""
    votes = 0
    for pid, negated in subset:
        vote = {"a": 1, "b": -1}.get(labels.get(pid, "tie"), 0)
        votes += -vote if negated else vote
    return "a" if votes > 0 else "b" if votes < 0 else "tie"


def subset_label(row: dict, subset: list[Shown], rule: str, scales: dict[str, float]) -> str:
    """The pair's label under a shown subset by `rule` (params `label_rule`): dominant or majority."""
    if rule == "majority":
        return majority_label(row["labels"], subset)
    return dominant_label(normalised_scores(row, scales), subset)


def sample_subset(rng: random.Random, ids: list[str], max_principles: int, size_p: float,
                  negation_prob: float) -> list[Shown]:
    """Distinct principles in random order, k of them with P(k) ∝ (1 - size_p)^(k-1) for k = 1..max_principles
    (SALMON's truncated geometric: most subsets are small, so one principle often decides alone), each negated
    with probability `negation_prob`."""
    sizes = range(1, min(max_principles, len(ids)) + 1)
    size = rng.choices(sizes, weights=[(1 - size_p) ** (k - 1) for k in sizes])[0]
    return [(pid, rng.random() < negation_prob) for pid in rng.sample(ids, size)]


def labelled_draws(row: dict, ids: list[str], cfg: Subsets, scales: dict[str, float],
                   seed: int) -> Iterator[tuple[list[Shown], str, bool]]:
    """Endless (subset, its label by the rule, whether noise flips it) for one pair, seeded by the pair id, so a
    pair's draws do not depend on which other pairs are in the file."""
    rng = random.Random(f"{seed}:{row['id']}")
    while True:
        subset = sample_subset(rng, ids, cfg.max_principles, cfg.size_p, cfg.negation_prob)
        yield subset, subset_label(row, subset, cfg.label_rule, scales), rng.random() < cfg.label_noise


def guide_of(subset: list[Shown], principles: dict[str, PreferencePrinciple]) -> list[str]:
    """The texts the RM reads for a subset: each principle's definition, or its negation."""
    return [principles[pid].negation if negated else principles[pid].definition for pid, negated in subset]


def instance(row: dict, guide: Guide, subset: list[Shown], winner: str) -> dict:
    """A training instance: the pair's responses as chosen and rejected by `winner` ('a' or 'b')."""
    chosen, rejected = (row["response_a"], row["response_b"]) if winner == "a" else \
        (row["response_b"], row["response_a"])
    return {"id": row["id"], "prompt": row["prompt"], "guide": guide, "chosen": chosen, "rejected": rejected,
            "shown": subset}


def decided(row: dict, ids: list[str]) -> bool:
    """Whether some principle of `ids` prefers a response: a pair where none does gives no instance."""
    return any(row["labels"].get(pid, "tie") != "tie" for pid in ids)


def training_examples(rows: list[dict], principles: dict[str, PreferencePrinciple], per_pair: int, cfg: Subsets,
                      scales: dict[str, float], seed: int) -> list[dict]:
    """`per_pair` subsets drawn per pair, as SALMON draws them; a subset whose label ties is dropped, not redrawn,
    so a pair that few principles decide gives fewer instances than one that many decide (redrawing until
    `per_pair` were decided weighed a pair decided by one principle as much as one decided by all). Each label is
    flipped with probability `cfg.label_noise`. Each instance: prompt, guide texts, chosen, rejected, the subset
    shown and whether its label was flipped."""
    ids = list(principles)
    examples = []
    for row in rows:
        for subset, winner, flipped in itertools.islice(labelled_draws(row, ids, cfg, scales, seed), per_pair):
            if winner == "tie":
                continue
            label = {"a": "b", "b": "a"}[winner] if flipped else winner
            examples.append(instance(row, guide_of(subset, principles), subset, label) | {"flipped": flipped})
    return examples


def label_metrics(rows: list[dict], ids: list[str], per_pair: int, cfg: Subsets, scales: dict[str, float],
                  seed: int) -> dict:
    """How the rule labels the subsets training draws from (the first `per_pair` draws of each pair some
    principle decides): the share `decided` (not a tie); `one_principle_agreement`, of the one-principle subsets
    whose principle is decided, the share labelled as that principle (negation flipping it; 1 for either rule);
    `majority_agreement`, of the subsets both rules decide, the share the majority rule labels the same; the
    share of decided labels `flipped` as noise."""
    labels, one, both, flips = [], [], [], []
    for row in (r for r in rows if decided(r, ids)):
        for subset, winner, flipped in itertools.islice(labelled_draws(row, ids, cfg, scales, seed), per_pair):
            labels.append(winner)
            majority = majority_label(row["labels"], subset)
            if len(subset) == 1 and row["labels"].get(subset[0][0], "tie") != "tie":
                one.append(winner == majority)  # one shown principle: the majority rule is its own label
            if winner != "tie":
                flips.append(flipped)
                if majority != "tie":
                    both.append(winner == majority)
    return {"rule": cfg.label_rule, "subsets": len(labels), "decided": _share([w != "tie" for w in labels]),
            "one_principle_agreement": _share(one), "majority_agreement": _share(both), "flipped": _share(flips)}


def _share(flags: list[bool]) -> float | None:
    """The share of true flags, or None where there was nothing to measure."""
    return sum(flags) / len(flags) if flags else None


def system_examples(rows: list[dict], descriptions: dict[str, str], per_pair: int, seed: int) -> list[dict]:
    """Instances from system-message pairs (rows with `system`): first the pair under its system message as is,
    labelled by the majority of its values' labels; then up to `per_pair` - 1 under random subsets of the values'
    descriptions as principle lists (uniform sizes, none negated), so the RM reads a value stated either way.
    Pairs no value decides give none."""
    examples = []
    for row in rows:
        ids = list(row["values"].values())
        rng = random.Random(f"{seed}:{row['id']}")
        shown = [[(vid, False) for vid in ids]] + [sample_subset(rng, ids, len(ids), 0.0, 0.0)
                                                   for _ in range(per_pair - 1)]
        for k, subset in enumerate(shown):
            winner = majority_label(row["labels"], subset)
            if winner == "tie":
                continue
            guide: Guide = row["system"] if k == 0 else [descriptions[vid] for vid, _ in subset]
            examples.append(instance(row, guide, subset, winner) | {"system": k == 0})
    return examples


def preference_examples(rows: list[dict], principles: dict[str, PreferencePrinciple], descriptions: dict[str, str],
                        per_pair: int, cfg: Subsets, scales: dict[str, float], seed: int) -> list[dict]:
    """Instances of every labelled pair: principle pairs under principle subsets (`training_examples`), then
    system-message pairs under their message and their values' descriptions (`system_examples`)."""
    plain = training_examples([r for r in rows if "system" not in r], principles, per_pair, cfg, scales, seed)
    return plain + system_examples([r for r in rows if "system" in r], descriptions, per_pair, seed)


def negation_cases(rows: list[dict], principles: dict[str, PreferencePrinciple]) -> list[dict]:
    """(pair, principle) where that principle alone decides the pair: shown as is it prefers the label's
    response, shown negated it must prefer the other one."""
    cases = []
    for row in rows:
        for pid, winner in row["labels"].items():
            if winner != "tie" and pid in principles:
                cases.append({"id": row["id"], "principle": pid, "prompt": row["prompt"], "winner": winner,
                              "response_a": row["response_a"], "response_b": row["response_b"]})
    return cases


def split_pairs(rows: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) by pair: `share` of the pairs that some principle decides are held out (at least one
    where there are two or more), drawn from `seed`; undecided pairs teach nothing and stay in train."""
    decided = [r["id"] for r in rows if any(v != "tie" for v in r["labels"].values())]
    count = round(len(decided) * share)
    if share > 0 and len(decided) >= 2:
        count = min(max(count, 1), len(decided) - 1)
    held = set(random.Random(seed).sample(decided, count)) if count else set()
    return [r for r in rows if r["id"] not in held], [r for r in rows if r["id"] in held]


# ------------------------------------------------------------------------------------------------ the prompt


def guide_text(guide: Guide) -> str:
    """A system message as it is; principle texts one per line, as a bulleted list."""
    return guide if isinstance(guide, str) else "\n".join(f"- {text}" for text in guide)


def truncated(tokenizer: Any, text: str, max_tokens: int) -> str:
    """`text` cut to its first `max_tokens` tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def rm_ids(tokenizer: Any, template: str, guide: Guide, prompt: str, response: str, max_prompt_tokens: int,
           max_response_tokens: int) -> list[int]:
    """Token ids of the RM prompt; instruction and response are cut to their limits, the template's last line
    (where the score is read) is always whole."""
    text = template.format(principles=guide_text(guide), instruction=truncated(tokenizer, prompt, max_prompt_tokens),
                           response=truncated(tokenizer, response, max_response_tokens))
    return prompt_ids(tokenizer, text)


# ---------------------------------------------------------------------------------------------------- training


def tokenize_examples(tokenizer: Any, template: str, examples: list[dict], max_prompt_tokens: int,
                      max_response_tokens: int) -> list[dict[str, list[int]]]:
    return [{side: rm_ids(tokenizer, template, e["guide"], e["prompt"], e[side], max_prompt_tokens,
                          max_response_tokens) for side in ("chosen", "rejected")} for e in examples]


def shared_length(a: list[int], b: list[int]) -> int:
    """Tokens the two sides of a pair share at their start, leaving each at least one token of its own."""
    return max(0, min(common_length(a, b), min(len(a), len(b)) - 1))


def collate_pairs(examples: list[dict[str, list[int]]], pad_id: int) -> Batch:
    """Each pair as the prefix its two sides share (the RM prompt's principles and instruction), left-padded into
    [m, P], and the two remainders, chosen and rejected interleaved, right-padded into [2m, S]: `bt_loss` runs
    the prefix once for both sides, then both sides in one forward."""
    shared = [shared_length(e["chosen"], e["rejected"]) for e in examples]
    tails = [side[k:] for e, k in zip(examples, shared) for side in (e["chosen"], e["rejected"])]
    width, length = max(shared), max(len(t) for t in tails)
    return {
        "prefix_ids": torch.tensor([[pad_id] * (width - k) + e["chosen"][:k] for e, k in zip(examples, shared)],
                                   dtype=torch.long),
        "prefix_mask": torch.tensor([[0] * (width - k) + [1] * k for k in shared], dtype=torch.long),
        "input_ids": torch.tensor([t + [pad_id] * (length - len(t)) for t in tails]),
        "attention_mask": torch.tensor([[1] * len(t) + [0] * (length - len(t)) for t in tails]),
    }


def pair_widths(example: dict[str, list[int]]) -> tuple[int, int]:
    """What a pair needs of its `collate_pairs` micro-batch: (its shared prefix's tokens, its longer remainder's)."""
    shared = shared_length(example["chosen"], example["rejected"])
    return shared, max(len(example["chosen"]), len(example["rejected"])) - shared


def pair_batches(examples: list[dict[str, list[int]]], micro_batch_size: int, seed: int, pad_id: int,
                 length_group: int = 1) -> Batches:
    """`batches` for `fit` over tokenized pairs, `length_group` micro-batches at a time sorted by
    (prefix, remainder) width before they are cut (`training.length_grouped_batches`; 1: the plain shuffled draw),
    so a micro-batch's prefixes and remainders pad to widths close to their own."""
    return length_grouped_batches(examples, micro_batch_size, seed, functools.partial(collate_pairs, pad_id=pad_id),
                                  [pair_widths(e) for e in examples], length_group)


def pair_rewards(model: Any, batch: Batch) -> torch.Tensor:
    """[2m] rewards of a `collate_pairs` batch, chosen and rejected interleaved: the shared prefixes through the
    model once (their key/value cache, with its gradient, repeated for both sides), then the remainders on top,
    positions continuing where each prefix ends. Under gradient checkpointing, which drops a KV cache, each row
    runs whole instead: its prefix (left-padded) and remainder (right-padded) side by side, the same scores."""
    prefix_mask, mask = batch["prefix_mask"], batch["attention_mask"]
    if prefix_mask.shape[1] and recomputes(model):
        ids = torch.cat([batch["prefix_ids"].repeat_interleave(2, dim=0), batch["input_ids"]], dim=1)
        full = torch.cat([prefix_mask.repeat_interleave(2, dim=0), mask], dim=1)
        return model(input_ids=ids, attention_mask=full, position_ids=(full.cumsum(-1) - 1).clamp(min=0)).logits \
            .squeeze(-1)
    cache = None
    if prefix_mask.shape[1]:
        cache = model(input_ids=batch["prefix_ids"], attention_mask=prefix_mask, use_cache=True,
                      position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0)).past_key_values
        cache.batch_repeat_interleave(2)
    prefix_mask = prefix_mask.repeat_interleave(2, dim=0)
    positions = prefix_mask.sum(-1, keepdim=True) + (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=batch["input_ids"], attention_mask=torch.cat([prefix_mask, mask], dim=1),
                 position_ids=positions, past_key_values=cache, use_cache=cache is not None).logits.squeeze(-1)


def bt_loss(model: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected), mean over the pairs; with the share ranked right."""
    rewards = pair_rewards(model, batch)
    chosen, rejected = rewards[0::2], rewards[1::2]
    margin = chosen - rejected
    return bradley_terry(chosen, rejected).mean(), {"accuracy": (margin > 0).float().mean(), "margin": margin.mean()}


# ----------------------------------------------------------------------------------------------------- scoring


def merged_reward_model(base: Path | str, adapter: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The reward trunk of `base` with the RM's adapter (LoRA and scalar head) folded in: plain matmuls when
    scoring. Loaded under `align.sharding.partitioned`, it is partitioned as it loads and stays so, merged layer by
    layer (`merge_lora`)."""
    from peft import PeftModel

    return merge_lora(PeftModel.from_pretrained(reward_trunk(base, dtype), str(adapter)))


def both_rewards(score: ScoreFn, prompts: list[str], guides: list, firsts: list[str],
                 seconds: list[str]) -> tuple[list[float], list[float]]:
    """The rewards of two responses to each prompt under its guide (`RewardScorer.score`, or it over the ranks), in
    one call: the two share their guide and prompt, which the scorer then runs once for both (the longer part of an
    RM prompt)."""
    both = score(prompts * 2, firsts + seconds, guides * 2)
    return both[:len(prompts)], both[len(prompts):]


class RewardScorer:
    """A trained RM loaded for scoring: the base model folder it was trained on plus its out folder.

    With `shard` it is spread: where the job has several ranks, over them with ZeRO-3 (align/sharding.py; each rank
    holds 1/N of it), and then `score` is collective: every rank calls it as often as the others, each with rows of
    its own (possibly none); in a job of one process, over the GPUs it sees (`align.devices.placed`)."""

    def __init__(self, base: Path | str, rm_dir: Path | str, *, batch_size: int = 8, precision: str | None = None,
                 shard: bool = False):
        from transformers import AutoTokenizer

        rm_dir = Path(rm_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=False)  # the trunk: align/training.py
        self.ranks = shard and world_size() > 1
        # a training precision where one is given (the stage that trains against it), else as any scorer computes
        dtype = torch_dtype(precision) if precision else inference_dtype(base, job_device())
        with partitioned(inference_config(dtype)) if self.ranks else contextlib.nullcontext():
            model = merged_reward_model(base, rm_dir / "adapter", dtype).eval()
        self.pad_id = model.config.pad_token_id
        self.trunk = model.base_model  # the transformer without the scalar head: what a prefix's cache needs
        if self.ranks:
            self.device = job_device()
            self.model: Any = Lockstep(zero3_inference(model), self.device, self.pad_id)
        else:
            self.model, self.device = placed(model, shard)
        self.template = (rm_dir / TEMPLATE_FILE).read_text(encoding="utf-8")
        limits = json.loads((rm_dir / CONFIG_FILE).read_text())
        self.max_prompt_tokens, self.max_response_tokens = limits["max_prompt_tokens"], limits["max_response_tokens"]
        self.batch_size = batch_size
        # over ranks, a forward pass on the trunk alone (a prefix) on one rank while another runs the whole model would
        # pair different modules' weight gathers: every row runs whole instead (the same rewards)
        self.reuse_prefix = not self.ranks
        self.prefix = PrefixCache()

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], responses: Sequence[str], guides: Sequence[Guide]) -> list[float]:
        """The reward of each response to its prompt under its guide (principle texts or a system message; one
        per prompt). Rows that repeat a (guide, prompt) - a prompt's k samples in GRPO or RLOO - are scored a
        group at a time; the others are batched by length, so padding stays small. In every batch the RM prompt
        its rows share (the template's head; a group's principles and instruction too) runs once, as
        `label_preferences` scores a pair's principles. Results come back in input order."""
        if not len(prompts) == len(responses) == len(guides):
            raise ValueError(f"score: {len(prompts)} prompts, {len(responses)} responses, {len(guides)} guides")
        ids = [rm_ids(self.tokenizer, self.template, g, p, r, self.max_prompt_tokens, self.max_response_tokens)
               for p, r, g in zip(prompts, responses, guides)]
        groups: dict[tuple[str, str], list[int]] = {}
        for i, (prompt, guide) in enumerate(zip(prompts, guides)):
            groups.setdefault((guide_text(guide), prompt), []).append(i)
        singles = sorted((rows[0] for rows in groups.values() if len(rows) == 1), key=lambda i: len(ids[i]))
        batches = [rows[start : start + self.batch_size] for rows in [*(r for r in groups.values() if len(r) > 1),
                                                                      singles]
                   for start in range(0, len(rows), self.batch_size)]
        rewards = [0.0] * len(ids)
        for chunk in progress(batches, desc="Reward model", unit="batch"):
            for i, value in zip(chunk, self._forward([ids[i] for i in chunk])):
                rewards[i] = value
        if self.ranks:
            self.model.finish()  # until every rank has run its rows
        return rewards

    def _forward(self, ids: list[list[int]]) -> list[float]:
        """The rewards of rows: their shared prefix through the trunk once (kept while the next batch shares it),
        the rest left-padded on top, so every row's score is read at the last column."""
        n = shared_prefix(ids) if self.reuse_prefix else 0
        tokens, mask, positions = suffix_block(ids, n, self.pad_id)
        cache = self.prefix.for_batch(self.trunk, ids[0][:n], len(ids)) if n else None
        tensors = {name: torch.tensor(x, device=self.device) for name, x in
                   (("input_ids", tokens), ("attention_mask", mask), ("position_ids", positions))}
        return self.model(**tensors, past_key_values=cache, use_cache=bool(n)).logits.squeeze(-1).float().tolist()
