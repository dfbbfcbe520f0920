"""Stage `evaluate`: every policy the DAG has produced, on the same benchmarks; the headline scores in
metrics/evaluate/ (one file per score, one column per policy: `dvc metrics show` stays narrow), every detail in
data/evaluation/metrics.json (`sft.hhh.acc`, `sft.truthfulqa_csv.category.health.mc1`, `sft.mtbench.judge.win_rate`).

- Multiple choice (HHH alignment, TruthfulQA from BIG-bench and from the original CSV): each choice scored by the
  policy's log-likelihood after the context (summed, or per token with `evaluate.normalise`), the context run once
  per item (align/scoring.py); HHH accuracy per subset folder, TruthfulQA MC1/MC2, per category for the CSV.
- MT-Bench: each policy answers both turns of every question (the second with its own first answer in context)
  through the generation interface, greedy; answers are kept in the out. Each answer is judged against the base
  model's answer to the same turn by two judges:
  - `judge` (the headline): an independent judge, trained in no stage of the run (`evaluate.judge_model`: the base
    model by default, or a local HF folder or hub id), as `label_preferences` judges: a/b in both orders under
    each of `evaluate.judge_principles`; a win only where both orders prefer the answer, a loss only where both
    prefer the reference, a tie otherwise, as MT-Bench's pairwise judge with position swap (align/judge.py
    `verdict`); win rate (ties count half) and position bias (`judge_outcomes`);
  - `target_rm`: the instructable RM the policy was optimised against, under the same principles (win / tie / loss
    by reward difference beyond `evaluate.tie_margin`; it scores each answer on its own, so order cannot bias it):
    inflated by construction for the PPO policy, kept to show by how much.
- System messages (Janus): with `system_messages.enabled`, every policy answers each held-out row of
  data/system_messages/eval.jsonl (a value combination no training data saw) twice, greedy: under its own system
  message and under a mismatched one. The judge compares the two answers under the row's message in both orders;
  the target RM scores both per dimension under the description of the row's value, and overall under the whole
  message: the win rate of matched over mismatched says whether the policy follows preferences it never saw.

Every score is a mean over items (questions, turns, rows) and carries its 95% percentile-bootstrap interval beside it
(`sft.hhh.acc_ci95: "[0.467, 0.733]"`; `evaluate.bootstrap_resamples` draws, seeded by `seed`; align/intervals.py);
every MT-Bench score is resampled by question, its two turns together (a cluster bootstrap).

Out (data/evaluation): answers/<policy>.jsonl (+ <policy>.system_messages.jsonl), metrics.json, plot.json (one row
per policy and headline score with its interval as lo/hi, for the bar chart in dvc.yaml), outcomes.jsonl (per
policy, headline score and item: a stable item id, its cluster and its value, whose mean is the score; what
`python -m align.compare A B` pairs between two runs).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from align import paths, runner
from align.artifacts import input_refs, staged_out, verify_artifact
from align.assets import DIMENSIONS, PreferencePrinciple, load_jsonl, load_template, pick_principles, value_descriptions
from align.benchmarks import DATA as BENCHMARKS
from align.benchmarks import (
    ChoiceItem, bench_path, choice_logprobs, load_bigbench, load_hhh, load_mt_bench, load_truthfulqa_csv, mc_scores,
)
from align.devices import release_memory
from align.errors import UserError
from align.generation import Generator, Sampling, chat_prompt, one_task
from align.intervals import Bootstrap
from align.judge import PLACEHOLDERS, criteria_of, judge, verdict
from align.models import HUB_ID, hub_snapshot
from align.params import Engine, Evaluate, SystemMessages
from align.paths import MODEL
from align.progress import progress
from align.records import read_jsonl, sample_in_order, write_json, write_jsonl
from align.reward import RewardScorer
from align.scoring import Scorer

STAGE = "evaluate"
OUT = paths.EVALUATION
POLICIES = {"base": Path("models/base"), "sft": Path("models/sft") / MODEL, "policy": Path("models/policy") / MODEL}
RM = paths.RM
RM_BASE = paths.SFT / MODEL
PRINCIPLES = paths.PREFERENCE_PRINCIPLES
SYSTEM = paths.SYSTEM_MESSAGES
SPACE = paths.PREFERENCE_SPACE
JUDGE_TEMPLATE = paths.JUDGE_PROMPT
PLOT = "plot.json"
OUTCOMES = "outcomes.jsonl"  # per (policy, headline score, item): what `python -m align.compare` pairs
JUDGE = "judge"  # the independent judge's verdicts: the headline win rates
TARGET_RM = "target_rm"  # the verdicts of the RM the policy was optimised against: inflated by construction


# ---------------------------------------------------------------------------------------------- benchmark data


def load_benchmarks(cfg: Evaluate, seed: int) -> dict:
    """Every benchmark of data/benchmarks (checked when the `benchmarks` stage wrote it), sampled on the login
    node."""
    def sample(items: list) -> list:
        return sample_in_order(items, cfg.max_items, seed)

    return {
        "hhh": sample(load_hhh(bench_path("hhh"))),
        "truthfulqa": sample(load_bigbench(bench_path("truthfulqa_mc"), "truthfulqa")),
        "truthfulqa_csv": sample(load_truthfulqa_csv(bench_path("truthfulqa_csv"))),
        "mt_bench": sample_in_order(load_mt_bench(bench_path("mt_bench")), cfg.mt_bench_questions, seed),
    }


# ------------------------------------------------------------------------------------------- multiple choice


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def choice_scores(scorer: Scorer, items: list[ChoiceItem], normalise: bool) -> list[dict[str, float]]:
    """Per item its mc1 and mc2 (`mc_scores`) by the policy's log-likelihood of each choice."""
    return [mc_scores(choice_logprobs(scorer, item, normalise), item)
            for item in progress(items, desc="Multiple-choice items", unit="item")]


def multiple_choice(items: list[ChoiceItem], scores: list[dict[str, float]], by_subset: str | None,
                    boot: Bootstrap, mass: str = "mc2") -> dict:
    """mc1 (accuracy) and the normalised probability mass on the correct choices over `items` (their
    `choice_scores`; the mass named `mass`: mc2 where items have several true answers, as TruthfulQA's CSV; p_true
    where each has one, as BIG-bench's TruthfulQA), each with its interval, and per subset under the key
    `by_subset` when given."""
    result = {**boot.mean("mc1", [s["mc1"] for s in scores]), **boot.mean(mass, [s["mc2"] for s in scores]),
              "items": len(items)}
    if by_subset:
        groups: dict[str, list[dict]] = {}
        for item, s in zip(items, scores):
            groups.setdefault(slug(item.subset), []).append(s)
        result[by_subset] = {name: {**boot.mean("mc1", [s["mc1"] for s in group]), "items": len(group)}
                             for name, group in sorted(groups.items())}
    return result


def hhh_metrics(items: list[ChoiceItem], scores: list[dict[str, float]], boot: Bootstrap) -> dict:
    """Accuracy: the better reply more likely than the other; overall and per subset folder."""
    mc = multiple_choice(items, scores, "subsets", boot)
    return {"acc": mc["mc1"], "acc_ci95": mc["mc1_ci95"], "items": mc["items"],
            **{name: {"acc": group["mc1"], "acc_ci95": group["mc1_ci95"], "items": group["items"]}
               for name, group in mc["subsets"].items()}}


# ---------------------------------------------------------------------------------------------------- MT-Bench


def answer_mt_bench(generator: Generator, questions: list[dict], max_new_tokens: int, seed: int) -> list[dict]:
    """Both turns of every question, greedy; turn 2 sees turn 1's question and this policy's own answer."""
    sampling = Sampling(temperature=0.0, max_new_tokens=max_new_tokens, seed=seed)
    tok = generator.tokenizer
    first = generator.generate([chat_prompt(tok, [{"role": "user", "content": q["turns"][0]}]) for q in questions],
                               sampling)
    follow = [(q, a) for q, a in zip(questions, first) if len(q["turns"]) > 1]
    second = generator.generate([chat_prompt(tok, [{"role": "user", "content": q["turns"][0]},
                                                   {"role": "assistant", "content": a.text.strip()},
                                                   {"role": "user", "content": q["turns"][1]}])
                                 for q, a in follow], sampling) if follow else []
    later = {q["question_id"]: a for (q, _), a in zip(follow, second)}
    rows = []
    for q, a in zip(questions, first):
        answers = [a] + ([later[q["question_id"]]] if q["question_id"] in later else [])
        rows.append({"question_id": q["question_id"], "category": q["category"], "turns": q["turns"],
                     "answers": [x.text.strip() for x in answers], "finish": [x.finish_reason for x in answers]})
    return rows


def answer_system_messages(generator: Generator, rows: list[dict], max_new_tokens: int, seed: int) -> list[dict]:
    """Per held-out row, greedy answers under its own system message and under its mismatched one."""
    sampling = Sampling(temperature=0.0, max_new_tokens=max_new_tokens, seed=seed)
    texts = [chat_prompt(generator.tokenizer, [{"role": "user", "content": row["prompt"]}], system=system)
             for row in rows for system in (row["system"], row["mismatched"]["system"])]
    outs = iter(generator.generate(texts, sampling)) if texts else iter(())
    return [{"id": row["id"], "combination": row["combination"], "matched": next(outs).text.strip(),
             "mismatched": next(outs).text.strip()} for row in rows]


def system_message_diffs(rm: RewardScorer, rows: list[dict], answers: list[dict],
                         descriptions: dict[str, str]) -> dict[str, list[float]]:
    """Per guide, per held-out row: the RM's reward of the answer under the matched system message minus that of
    the answer under the mismatched one; each dimension scored under the description of the row's value for it,
    `overall` under the whole system message."""
    prompts = [row["prompt"] for row in rows]
    guides: dict[str, list] = {d: [[descriptions[row["values"][d]]] for row in rows] for d in DIMENSIONS}
    guides["overall"] = [row["system"] for row in rows]
    diffs = {}
    for name, guide in guides.items():
        matched = rm.score(prompts, [a["matched"] for a in answers], guide)
        mismatched = rm.score(prompts, [a["mismatched"] for a in answers], guide)
        diffs[name] = [m - x for m, x in zip(matched, mismatched)]
    return diffs


def wins(diffs: list[float], margin: float) -> list[float]:
    """1 where a reward difference exceeds `margin` (a win by the RM), else 0."""
    return [float(d > margin) for d in diffs]


def system_message_judgement(diffs: dict[str, list[float]], margin: float, boot: Bootstrap) -> dict:
    """The RM's verdict on answers under the matched vs the mismatched system message (`system_message_diffs`), per
    guide: win rate (the matched answer's reward beyond the mismatched one's by more than `margin`), loss rate and
    the mean margin."""
    result: dict = {"prompts": len(diffs["overall"])}
    for name, found in diffs.items():
        result[name] = {**boot.mean("win_rate", wins(found, margin)),
                        **boot.mean("loss_rate", [d < -margin for d in found]), **boot.mean("margin", found)}
    return result


def conversation(row: dict, turn: int) -> str:
    """What the judge reads as the instruction of a turn: the question, after the first exchange for turn 2."""
    if turn == 0:
        return row["turns"][0]
    return f"{row['turns'][0]}\n\n[The assistant answered:]\n{row['answers'][0]}\n\n[Follow-up:]\n{row['turns'][1]}"


def turns_of(rows: list[dict]) -> list[tuple[dict, int]]:
    return [(row, t) for row in rows for t in range(len(row["answers"]))]


def turn_ids(rows: list[dict]) -> tuple[list[str], list[str]]:
    """Per answered turn (`turns_of` order): its stable id, "<question_id>/<turn from 1>", and its question's id, the
    cluster every MT-Bench interval resamples by: a question's two turns are not independent items."""
    turns = turns_of(rows)
    return [f"{r['question_id']}/{t + 1}" for r, t in turns], [str(r["question_id"]) for r, _ in turns]


def outcomes(diffs: list[float], margin: float, boot: Bootstrap, clusters: list[str]) -> dict:
    """Win, loss and tie rates against the base model over the judged turns, each with its interval."""
    return {**boot.mean("win_rate_vs_base", wins(diffs, margin), clusters),
            **boot.mean("loss_rate_vs_base", [d < -margin for d in diffs], clusters),
            **boot.mean("tie_rate_vs_base", [abs(d) <= margin for d in diffs], clusters), "turns": len(diffs)}


def rm_rewards(rm: RewardScorer, answers: dict[str, list[dict]], guide: list[str]) -> dict[str, list[float]]:
    """Per policy: the RM's reward of each of its MT-Bench answers under `guide`, in `turns_of` order. Every policy's
    answers go in one call: the answers to a first turn share its question, which then runs once for all of them."""
    turns = [(policy, r, t) for policy, rows in answers.items() for r, t in turns_of(rows)]
    values = rm.score([conversation(r, t) for _, r, t in turns], [r["answers"][t] for _, r, t in turns],
                      [guide] * len(turns))
    rewards: dict[str, list[float]] = {policy: [] for policy in answers}
    for (policy, _, _), value in zip(turns, values):
        rewards[policy].append(value)
    return rewards


def versus_base(rewards: dict[str, list[float]], policy: str) -> list[float] | None:
    """A policy's reward minus the base model's on the same turn (both answered the same questions in the same
    order); None for the base model itself, or where base was not evaluated."""
    if policy == "base" or "base" not in rewards:
        return None
    return [v - b for v, b in zip(rewards[policy], rewards["base"])]


WIN_VALUE = {"win": 1.0, "tie": 0.5, "loss": 0.0}  # a tie counts half


def judge_values(rows: list[dict]) -> tuple[list[float], list[float]]:
    """Per pair judged with the answer under test as a and the reference as b (align/judge.py `verdict`): the
    answer's win (1), tie (0.5) or loss (0), and 1 where the judge picked the same position in both orders."""
    verdicts = [verdict(row) for row in rows]
    return [WIN_VALUE[outcome] for outcome, _ in verdicts], [float(same) for _, same in verdicts]


def judge_outcomes(rows: list[dict], boot: Bootstrap, clusters: list[str] | None = None) -> dict:
    """The independent judge's verdict over pairs judged in both orders (`judge_values`), each with its interval
    (resampled by `clusters` where given: MT-Bench's questions):
    - win_rate: the share of items the answer wins in both orders, a tie (the orders disagree) counting half: an
      answer set judged against itself, or by a judge that follows the position only, scores exactly 0.5;
    - position_bias: the share of items where the judge picks the same position (a, or b) in both orders: 0 for a
      judge whose verdict follows the answers only, 1 for one that follows the position only (0.5: a coin)."""
    won, same = judge_values(rows)
    return {**boot.mean("win_rate", won, clusters), **boot.mean("position_bias", same, clusters), "items": len(rows)}


def model_judgement(scorer: Scorer, answers: dict[str, list[dict]], system_answers: dict[str, list[dict]],
                    held_out: list[dict], principles: list[PreferencePrinciple]) -> dict[str, dict[str, list[dict]]]:
    """The independent judge (`evaluate.judge_model`, the base model by default: trained in no stage of the run) as
    `label_preferences` judges, a/b in both orders; per policy the judged pairs (align/judge.py `judge`) of
    "mtbench": each of its answers against the base model's answer to the same turn, under each of `principles`;
    and of "system_messages": its answer under the row's own message against its answer under the mismatched one,
    under the row's message."""
    template = load_template(JUDGE_TEMPLATE, PLACEHOLDERS)
    choices = (scorer.token_id("a"), scorer.token_id("b"))
    base = {r["question_id"]: r for r in answers.get("base", [])}
    result: dict = {policy: {} for policy in answers}
    for policy, rows in answers.items():
        if policy != "base" and base:
            pairs = [{"prompt": conversation(r, t), "response_a": r["answers"][t],
                      "response_b": base[r["question_id"]]["answers"][t]} for r, t in turns_of(rows)]
            result[policy]["mtbench"] = judge(scorer, template, pairs, [criteria_of(principles)] * len(pairs),
                                              choices)
        if held_out:
            pairs = [{"prompt": row["prompt"], "response_a": a["matched"], "response_b": a["mismatched"]}
                     for row, a in zip(held_out, system_answers[policy])]
            result[policy]["system_messages"] = judge(scorer, template, pairs,
                                                      [[("system", row["system"])] for row in held_out], choices)
    return result


# ------------------------------------------------------------------------------------------------------ job


# The headline, one row each in `dvc metrics show`: (file in metrics/evaluate/, key path in a policy's metrics).
# <x>_judge / <x>_target_rm: win rates by the independent judge / by the RM the policy was optimised against.
SCORES = [
    ("hhh_acc", "hhh.acc"), ("truthfulqa_mc1", "truthfulqa.mc1"), ("truthfulqa_p_true", "truthfulqa.p_true"),
    ("truthfulqa_csv_mc1", "truthfulqa_csv.mc1"), ("truthfulqa_csv_mc2", "truthfulqa_csv.mc2"),
    ("mtbench_judge", f"mtbench.{JUDGE}.win_rate"), ("mtbench_position_bias", f"mtbench.{JUDGE}.position_bias"),
    ("mtbench_target_rm", f"mtbench.{TARGET_RM}.win_rate_vs_base"),
    ("sysmsg_judge", f"system_messages.{JUDGE}.win_rate"),
    ("sysmsg_position_bias", f"system_messages.{JUDGE}.position_bias"),
    ("sysmsg_target_rm", f"system_messages.{TARGET_RM}.overall.win_rate"),
]
SCORES_DIR = Path("metrics/evaluate")


def score_of(values: dict, key: str) -> tuple[float, str] | None:
    """A policy's score at the dotted `key` and its interval text, or None where the policy has none (base has no
    win rate against itself; system messages only with `system_messages.enabled`)."""
    *path, name = key.split(".")
    for part in path:
        values = values.get(part, {})
    return (values[name], values[f"{name}_ci95"]) if name in values else None


def score_files(metrics: dict) -> dict[str, dict]:
    """metrics/evaluate/'s files: per headline score `<name>.json` {policy: score} and `<name>_ci95.json` {policy:
    "[lo, hi]"}. Policies are the columns, so the table is as wide as the policies, whatever the number of scores;
    the interval's own row sits under its score (DVC lists a folder's files by name) and `dvc metrics diff` gives
    each policy's change."""
    files: dict[str, dict] = {}
    for name, key in SCORES:
        found = {policy: score_of(values, key) for policy, values in metrics.items() if isinstance(values, dict)}
        found = {policy: score for policy, score in found.items() if score is not None}
        if found:
            files[f"{name}.json"] = {policy: value for policy, (value, _) in found.items()}
            files[f"{name}_ci95.json"] = {policy: interval for policy, (_, interval) in found.items()}
    return files


def plot_rows(metrics: dict) -> list[dict]:
    """One row per (policy, score) for the bar chart: the headline win rates and scores, and the target RM's win
    rate per system-message dimension, each with its interval as numbers (lo, hi: the error bar); its bars are
    labelled "score / policy", so each policy's bar stands beside the others' under the same score (DVC's template
    colours by revision only: bars sharing a label would stack)."""
    keys = [key for _, key in SCORES if not key.endswith("position_bias")]
    keys += [f"system_messages.{TARGET_RM}.{d}.win_rate" for d in DIMENSIONS]
    rows = []
    for policy, values in metrics.items():
        for key in keys:
            found = score_of(values, key) if isinstance(values, dict) else None
            if found is not None:
                lo, hi = json.loads(found[1])
                rows.append({"bar": f"{key} / {policy}", "benchmark": key, "policy": policy, "value": found[0],
                             "lo": lo, "hi": hi})
    return rows


@dataclass(frozen=True)
class EvaluateJob:
    """The job's arguments, sent to the allocation with it."""
    policies: dict[str, Path]  # name -> model folder
    benchmarks: dict  # the sampled items per benchmark (`load_benchmarks`) and the held-out system-message rows
    cfg: Evaluate
    engine: Engine
    guide: list[str]  # the principles the RM judges MT-Bench answers under
    judge: Path  # the independent judge's model folder (`judge_folder`)
    judge_principles: list[PreferencePrinciple]  # the same principles, for the judge
    system: SystemMessages
    descriptions: dict[str, str]  # value id -> its description, for the RM's per-dimension verdicts
    seed: int
    params: dict  # the params subset and the input refs: the manifest records both
    inputs: dict
    trust_remote_code: bool = False  # for the judge model (a user's folder); the policies are the pipeline's outs

    def bootstrap(self) -> Bootstrap:
        """One seed and draw count for every score of the run: scores over the same items are resampled alike."""
        return Bootstrap(self.seed, self.cfg.bootstrap_resamples)


def score_and_answer(args: EvaluateJob) -> tuple[dict[str, dict], dict[str, list[dict]], dict[str, list[dict]]]:
    """Per policy: its `choice_scores` per multiple-choice benchmark, its MT-Bench answers, its answers under the
    held-out system messages; one policy's model in memory at a time."""
    choices: dict[str, dict] = {}
    answers: dict[str, list[dict]] = {}
    system_answers: dict[str, list[dict]] = {}
    bench, cfg = args.benchmarks, args.cfg
    for name, model in args.policies.items():
        scorer = Scorer(model, batch_size=args.engine.score_batch_size, shard=args.engine.shard_scorers)
        choices[name] = {key: choice_scores(scorer, bench[key], cfg.normalise) for key in MULTIPLE_CHOICE}
        del scorer
        release_memory()  # before vLLM measures the GPU's free memory
        with Generator(model, args.engine) as generator:
            answers[name] = answer_mt_bench(generator, bench["mt_bench"], cfg.max_new_tokens, args.seed)
            system_answers[name] = answer_system_messages(generator, bench["system_messages"],
                                                          args.system.eval_max_new_tokens, args.seed)
        del generator  # the hf backend's model, still held by the name after its `with`
        release_memory()
    return choices, answers, system_answers


@dataclass(frozen=True)
class Evidence:
    """What one policy's scores are computed from, item by item, before any mean: `policy_metrics` and
    `item_outcomes` both read it, so each headline score is the mean of the per-item outcomes the out keeps."""
    choices: dict[str, list[dict[str, float]]]  # multiple-choice benchmark -> `choice_scores` of its items
    answers: list[dict]  # MT-Bench (`answer_mt_bench`)
    rewards: list[float]  # the target RM's reward per MT-Bench turn (`rm_rewards`)
    vs_base: list[float] | None  # those minus the base model's (`versus_base`)
    system_diffs: dict[str, list[float]]  # `system_message_diffs`; empty without system messages
    judged: dict[str, list[dict]]  # the independent judge's pairs per benchmark (`model_judgement`)


MULTIPLE_CHOICE = ("hhh", "truthfulqa", "truthfulqa_csv")
# Headline scores that are a multiple-choice value per item: name -> (benchmark, `mc_scores` key)
CHOICE_SCORES = {"hhh_acc": ("hhh", "mc1"), "truthfulqa_mc1": ("truthfulqa", "mc1"),
                 "truthfulqa_p_true": ("truthfulqa", "mc2"), "truthfulqa_csv_mc1": ("truthfulqa_csv", "mc1"),
                 "truthfulqa_csv_mc2": ("truthfulqa_csv", "mc2")}


def policy_metrics(ev: Evidence, bench: dict, margin: float, boot: Bootstrap) -> dict:
    """A policy's metrics: multiple choice, MT-Bench by the target RM (against the base model's answers, with the
    mean reward) and by the independent judge, the share of turns cut off, the system messages where evaluated;
    every MT-Bench interval resampled by question."""
    _, clusters = turn_ids(ev.answers)
    target = boot.mean("mean_reward", ev.rewards, clusters)
    if ev.vs_base is not None:
        target.update(outcomes(ev.vs_base, margin, boot, clusters))
    finishes = [f for row in ev.answers for f in row["finish"]]
    result: dict = {
        "hhh": hhh_metrics(bench["hhh"], ev.choices["hhh"], boot),
        "truthfulqa": multiple_choice(bench["truthfulqa"], ev.choices["truthfulqa"], None, boot, mass="p_true"),
        "truthfulqa_csv": multiple_choice(bench["truthfulqa_csv"], ev.choices["truthfulqa_csv"], "category", boot),
        "mtbench": {TARGET_RM: target, **boot.mean("cut_off_share", [f == "length" for f in finishes], clusters)},
    }
    if "mtbench" in ev.judged:
        result["mtbench"][JUDGE] = judge_outcomes(ev.judged["mtbench"], boot, clusters)
    if ev.system_diffs:
        result["system_messages"] = {TARGET_RM: system_message_judgement(ev.system_diffs, margin, boot)}
        result["system_messages"][JUDGE] = judge_outcomes(ev.judged["system_messages"], boot)
    return result


def item_outcomes(ev: Evidence, bench: dict, margin: float) -> dict[str, tuple[list[str], list[str], list[float]]]:
    """Per headline score (`SCORES`' names) the policy has: (item ids, their clusters, values), the mean of the
    values being the score. Ids are stable across runs (`ChoiceItem.id`; an MT-Bench turn "<question_id>/<turn>",
    its cluster the question; a held-out system-message row's id), so `align.compare` pairs two runs item by item."""
    found = {}
    for name, (key, value) in CHOICE_SCORES.items():
        ids = [item.id for item in bench[key]]
        found[name] = (ids, ids, [s[value] for s in ev.choices[key]])
    turns, clusters = turn_ids(ev.answers)
    if "mtbench" in ev.judged:
        won, same = judge_values(ev.judged["mtbench"])
        found["mtbench_judge"], found["mtbench_position_bias"] = (turns, clusters, won), (turns, clusters, same)
    if ev.vs_base is not None:
        found["mtbench_target_rm"] = (turns, clusters, wins(ev.vs_base, margin))
    if ev.system_diffs:
        rows = [str(row["id"]) for row in bench["system_messages"]]
        won, same = judge_values(ev.judged["system_messages"])
        found["sysmsg_judge"], found["sysmsg_position_bias"] = (rows, rows, won), (rows, rows, same)
        found["sysmsg_target_rm"] = (rows, rows, wins(ev.system_diffs["overall"], margin))
    return found


def outcome_rows(evidence: dict[str, Evidence], bench: dict, margin: float) -> list[dict]:
    """outcomes.jsonl: one row per (policy, headline score, item): its id, cluster and value."""
    return [{"policy": policy, "score": score, "item": item, "cluster": cluster, "value": float(value)}
            for policy, ev in evidence.items()
            for score, (ids, clusters, values) in item_outcomes(ev, bench, margin).items()
            for item, cluster, value in zip(ids, clusters, values)]


def job(args: EvaluateJob) -> str:
    """Runs inside the allocation: score, generate and judge every policy; write the out."""
    choices, answers, system_answers = score_and_answer(args)
    bench, held_out, margin, boot = args.benchmarks, args.benchmarks["system_messages"], args.cfg.tie_margin, \
        args.bootstrap()
    rm = RewardScorer(RM_BASE, RM, batch_size=args.engine.score_batch_size, shard=args.engine.shard_scorers)
    rewards = rm_rewards(rm, answers, args.guide)
    system_diffs = {name: system_message_diffs(rm, held_out, system_answers[name], args.descriptions) if held_out
                    else {} for name in answers}
    del rm
    release_memory()
    scorer = Scorer(args.judge, batch_size=args.engine.score_batch_size, trust_remote_code=args.trust_remote_code,
                    shard=args.engine.shard_scorers)
    judged = model_judgement(scorer, answers, system_answers, held_out, args.judge_principles)
    del scorer
    release_memory()
    evidence = {name: Evidence(choices[name], answers[name], rewards[name], versus_base(rewards, name),
                               system_diffs[name], judged[name]) for name in answers}
    metrics = {"scoring": "per_token" if args.cfg.normalise else "sum",
               **{name: policy_metrics(ev, bench, margin, boot) for name, ev in evidence.items()}}
    with staged_out(OUT, stage=STAGE, params=args.params, inputs=args.inputs) as tmp:
        for name, rows in answers.items():
            (tmp / "answers").mkdir(exist_ok=True)
            write_jsonl(tmp / "answers" / f"{name}.jsonl", rows)
            if held_out:
                write_jsonl(tmp / "answers" / f"{name}.system_messages.jsonl", system_answers[name])
        write_json(tmp / "metrics.json", metrics)
        write_jsonl(tmp / OUTCOMES, outcome_rows(evidence, bench, margin))
        (tmp / PLOT).write_text(json.dumps(plot_rows(metrics), indent=1) + "\n")
    return verify_artifact(OUT)


def judge_folder(judge_model: str | None) -> Path:
    """The independent judge's model folder: the imported base model (null), a local HF folder, or a hub id
    downloaded here on the login node (as `model.base` is: compute nodes are often offline)."""
    if judge_model is None:
        return paths.BASE
    path = Path(judge_model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if HUB_ID.match(judge_model) and not path.exists():
        return hub_snapshot(judge_model, key="evaluate.judge_model",
                            instead="null (the base model) or a local HF folder")
    raise UserError(f"params.yaml: evaluate.judge_model: {judge_model} is not a Hugging Face model folder (no "
                    f"config.json) nor a hub id; expected null (the base model), a local HF folder or a hub id")


def main() -> None:
    params = runner.stage_params(STAGE)
    cfg = params.evaluate
    judged = pick_principles(load_jsonl(PRINCIPLES, PreferencePrinciple), cfg.judge_principles,
                             "evaluate.judge_principles", PRINCIPLES)
    judge_model = judge_folder(cfg.judge_model)
    descriptions = value_descriptions(SPACE)
    policies = {name: POLICIES[name] for name in cfg.policies}
    inputs = input_refs({**{name: path.parent if path.name == MODEL else path for name, path in policies.items()},
                         "rm": RM, "principles": PRINCIPLES, "system_messages": SYSTEM, "space": SPACE,
                         "benchmarks": BENCHMARKS, **({"judge": judge_model} if cfg.judge_model else {})})
    benchmarks = load_benchmarks(cfg, params.seed)
    benchmarks["system_messages"] = read_jsonl(SYSTEM / "eval.jsonl")
    subset = {"seed": params.seed, "evaluate": cfg.model_dump(), "generation": params.generation.model_dump(),
              "system_messages": params.system_messages.model_dump()}
    fn = functools.partial(job, EvaluateJob(
        policies=policies, benchmarks=benchmarks, cfg=cfg, engine=Engine.of(params.generation, params.cluster.evaluate),
        guide=[p.definition for p in judged], judge=judge_model, judge_principles=judged, system=params.system_messages,
        descriptions=descriptions, seed=params.seed, params=subset, inputs=inputs,
        trust_remote_code=params.model.trust_remote_code,
    ))
    runner.submit_stage(STAGE, OUT, fn, one_task(params.cluster.evaluate, STAGE), params.cluster, subset, inputs)
    publish_scores(json.loads((OUT / "metrics.json").read_text()))
    shutil.copy(OUT / PLOT, Path("metrics") / "evaluate_plot.json")  # the bar chart's rows (dvc.yaml plots)


def publish_scores(metrics: dict) -> None:
    """metrics/evaluate/ for `dvc metrics show`: the headline scores (`score_files`), in place of the last run's."""
    shutil.rmtree(SCORES_DIR, ignore_errors=True)
    for name, content in score_files(metrics).items():
        write_json(SCORES_DIR / name, content)


if __name__ == "__main__":
    sys.exit(runner.run(main))
