"""Stage `evaluate`: every policy the DAG has produced, on the same benchmarks, into flat metrics that
`dvc metrics diff` compares at a glance (`sft.hhh.acc`, `sft.truthfulqa.mc1`, `sft.mtbench.win_rate_vs_base`).

- Multiple choice (HHH alignment, TruthfulQA from BIG-bench and from the original CSV): each choice scored by the
  policy's log-likelihood after the context (summed, or per token with `evaluate.normalise`), the context run once
  per item (align/scoring.py); HHH accuracy per subset folder, TruthfulQA MC1/MC2, per category for the CSV.
- MT-Bench: each policy answers both turns of every question (the second with its own first answer in context)
  through the generation interface, greedy; answers are kept in the out. Each answer is judged against the base
  model's answer to the same turn by the instructable RM under `evaluate.judge_principles` (win / tie / loss by
  reward difference beyond `evaluate.tie_margin`; the RM scores each answer on its own, so order cannot bias it)
  and, with `evaluate.judge_model`, by that model as an a/b judge in both orders (`label_preferences`' judge).

- System messages (Janus): with `system_messages.enabled`, every policy answers each held-out row of
  data/system_messages/eval.jsonl (a value combination no training data saw) twice, greedy: under its own system
  message and under a mismatched one. The RM scores both answers per dimension under the description of the row's
  value, and overall under the whole message: the win rate of matched over mismatched (`sft.system_messages.
  style.win_rate`, …) says whether the policy follows preferences it was never trained on.

Every score is a mean over items (questions, turns, rows) and carries its 95% percentile-bootstrap interval beside it
(`sft.hhh.acc_ci95: "[0.467, 0.733]"`; `evaluate.bootstrap_resamples` draws, seeded by `seed`; align/intervals.py).

Out (data/evaluation): answers/<policy>.jsonl (+ <policy>.system_messages.jsonl), metrics.json, plot.json (one row
per policy and headline score with its interval as lo/hi, for the bar chart in dvc.yaml).
"""

from __future__ import annotations

import functools
import gc
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
from align.errors import UserError
from align.generation import Generator, Sampling, chat_prompt, one_task
from align.intervals import Bootstrap
from align.judge import PLACEHOLDERS, criteria_of, judge
from align.params import Evaluate, Generation, SystemMessages
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


def multiple_choice(scorer: Scorer, items: list[ChoiceItem], normalise: bool, by_subset: str | None,
                    boot: Bootstrap, mass: str = "mc2") -> dict:
    """mc1 (accuracy) and the normalised probability mass on the correct choices over `items` (named `mass`: mc2
    where items have several true answers, as TruthfulQA's CSV; p_true where each has one, as BIG-bench's
    TruthfulQA), each with its interval, and per subset under the key `by_subset` when given."""
    scores = [mc_scores(choice_logprobs(scorer, item, normalise), item)
              for item in progress(items, desc="Multiple-choice items", unit="item")]
    result = {**boot.mean("mc1", [s["mc1"] for s in scores]), **boot.mean(mass, [s["mc2"] for s in scores]),
              "items": len(items)}
    if by_subset:
        groups: dict[str, list[dict]] = {}
        for item, s in zip(items, scores):
            groups.setdefault(slug(item.subset), []).append(s)
        result[by_subset] = {name: {**boot.mean("mc1", [s["mc1"] for s in group]), "items": len(group)}
                             for name, group in sorted(groups.items())}
    return result


def hhh_metrics(scorer: Scorer, items: list[ChoiceItem], normalise: bool, boot: Bootstrap) -> dict:
    """Accuracy: the better reply more likely than the other; overall and per subset folder."""
    mc = multiple_choice(scorer, items, normalise, "subsets", boot)
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


def system_message_judgement(rm: RewardScorer, rows: list[dict], answers: list[dict], descriptions: dict[str, str],
                             margin: float, boot: Bootstrap) -> dict:
    """The RM's verdict on answers under the matched vs the mismatched system message: per dimension, scored
    under the description of the row's value for it; and overall, under the whole system message. Win: the
    matched answer's reward exceeds the mismatched one's by more than `margin`."""
    prompts = [row["prompt"] for row in rows]
    guides: dict[str, list] = {d: [[descriptions[row["values"][d]]] for row in rows] for d in DIMENSIONS}
    guides["overall"] = [row["system"] for row in rows]
    result: dict = {"prompts": len(rows)}
    for name, guide in guides.items():
        matched = rm.score(prompts, [a["matched"] for a in answers], guide)
        mismatched = rm.score(prompts, [a["mismatched"] for a in answers], guide)
        diffs = [m - x for m, x in zip(matched, mismatched)]
        result[name] = {**boot.mean("win_rate", [d > margin for d in diffs]),
                        **boot.mean("loss_rate", [d < -margin for d in diffs]), **boot.mean("margin", diffs)}
    return result


def conversation(row: dict, turn: int) -> str:
    """What the judge reads as the instruction of a turn: the question, after the first exchange for turn 2."""
    if turn == 0:
        return row["turns"][0]
    return f"{row['turns'][0]}\n\n[The assistant answered:]\n{row['answers'][0]}\n\n[Follow-up:]\n{row['turns'][1]}"


def turns_of(rows: list[dict]) -> list[tuple[dict, int]]:
    return [(row, t) for row in rows for t in range(len(row["answers"]))]


def outcomes(diffs: list[float], margin: float, boot: Bootstrap) -> dict:
    """Win, loss and tie rates against the base model over the judged turns, each with its interval."""
    return {**boot.mean("win_rate_vs_base", [d > margin for d in diffs]),
            **boot.mean("loss_rate_vs_base", [d < -margin for d in diffs]),
            **boot.mean("tie_rate_vs_base", [abs(d) <= margin for d in diffs]), "turns": len(diffs)}


def rm_judgement(rm: RewardScorer, answers: dict[str, list[dict]], guide: list[str], margin: float,
                 boot: Bootstrap) -> dict:
    """Per policy: mean reward of its answers and, against the base model's answer to the same turn, win/tie/loss."""
    rewards = {}
    for policy, rows in answers.items():
        turns = turns_of(rows)
        rewards[policy] = rm.score([conversation(r, t) for r, t in turns], [r["answers"][t] for r, t in turns],
                                   [guide] * len(turns))
    result = {}
    for policy, values in rewards.items():
        result[policy] = boot.mean("mean_reward", values)
        if policy != "base" and "base" in rewards:
            result[policy].update(outcomes([v - b for v, b in zip(values, rewards["base"])], margin, boot))
    return result


def model_judgement(judge_model: Path, answers: dict[str, list[dict]], principles: list[PreferencePrinciple],
                    batch_size: int, boot: Bootstrap, trust_remote_code: bool = False) -> dict:
    """A separate judge model, as `label_preferences` judges: policy answer vs base answer under each principle in
    both orders; a turn is won where more principles prefer the policy's answer than the base's."""
    scorer = Scorer(judge_model, batch_size=batch_size, trust_remote_code=trust_remote_code)
    template = load_template(JUDGE_TEMPLATE, PLACEHOLDERS)
    choices = (scorer.token_id("a"), scorer.token_id("b"))
    result = {}
    for policy, rows in answers.items():
        if policy == "base" or "base" not in answers:
            continue
        base = {r["question_id"]: r for r in answers["base"]}
        pairs = [{"prompt": conversation(r, t), "response_a": r["answers"][t],
                  "response_b": base[r["question_id"]]["answers"][t]} for r, t in turns_of(rows)]
        judged = judge(scorer, template, pairs, [criteria_of(principles)] * len(pairs), choices)
        votes = [sum({"a": 1, "b": -1}.get(v, 0) for v in row["labels"].values()) for row in judged]
        result[policy] = outcomes([float(v) for v in votes], 0.0, boot)
    return result


# ------------------------------------------------------------------------------------------------------ job


def plot_rows(metrics: dict) -> list[dict]:
    """One row per (policy, headline benchmark) for the bar chart, with its interval as numbers (lo, hi: the error
    bar); its bars are labelled "benchmark / policy", so each policy's bar stands beside the others' under the same
    benchmark (DVC's template colours by revision only: bars sharing a label would stack)."""
    heads = [("hhh", "acc"), ("truthfulqa", "mc1"), ("truthfulqa_csv", "mc1"), ("truthfulqa_csv", "mc2"),
             ("mtbench", "win_rate_vs_base")]
    heads += [("system_messages", f"{d}.win_rate") for d in (*DIMENSIONS, "overall")]
    rows = []
    for policy, values in metrics["policies"].items():
        for bench, key in heads:
            *path, name = [bench, *key.split(".")]
            group = values
            for part in path:
                group = group.get(part, {})
            if name in group:
                lo, hi = json.loads(group[f"{name}_ci95"])
                rows.append({"bar": f"{bench}.{key} / {policy}", "benchmark": f"{bench}.{key}", "policy": policy,
                             "value": group[name], "lo": lo, "hi": hi})
    return rows


@dataclass(frozen=True)
class EvaluateJob:
    """The job's arguments, sent to the allocation with it."""
    policies: dict[str, Path]  # name -> model folder
    benchmarks: dict  # the sampled items per benchmark (`load_benchmarks`) and the held-out system-message rows
    cfg: Evaluate
    generation: Generation
    guide: list[str]  # the principles the RM judges MT-Bench answers under
    judge_principles: list[PreferencePrinciple]  # the same, for `evaluate.judge_model`
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
    """Per policy: its multiple-choice results, its MT-Bench answers, its answers under the held-out system
    messages; one policy's model in memory at a time."""
    results: dict[str, dict] = {}
    answers: dict[str, list[dict]] = {}
    system_answers: dict[str, list[dict]] = {}
    bench, cfg, boot = args.benchmarks, args.cfg, args.bootstrap()
    for name, model in args.policies.items():
        scorer = Scorer(model, batch_size=cfg.batch_size)
        results[name] = {
            "hhh": hhh_metrics(scorer, bench["hhh"], cfg.normalise, boot),
            "truthfulqa": multiple_choice(scorer, bench["truthfulqa"], cfg.normalise, None, boot, mass="p_true"),
            "truthfulqa_csv": multiple_choice(scorer, bench["truthfulqa_csv"], cfg.normalise, "category", boot),
        }
        del scorer
        gc.collect()
        with Generator(model, args.generation) as generator:
            answers[name] = answer_mt_bench(generator, bench["mt_bench"], cfg.max_new_tokens, args.seed)
            system_answers[name] = answer_system_messages(generator, bench["system_messages"],
                                                          args.system.eval_max_new_tokens, args.seed)
    return results, answers, system_answers


def job(args: EvaluateJob) -> str:
    """Runs inside the allocation: score, generate and judge every policy; write the out."""
    results, answers, system_answers = score_and_answer(args)
    held_out, boot = args.benchmarks["system_messages"], args.bootstrap()
    rm = RewardScorer(RM_BASE, RM, batch_size=args.cfg.batch_size)
    for name, judged in rm_judgement(rm, answers, args.guide, args.cfg.tie_margin, boot).items():
        results[name]["mtbench"] = judged
    if held_out:
        for name, rows in system_answers.items():
            results[name]["system_messages"] = system_message_judgement(rm, held_out, rows, args.descriptions,
                                                                        args.cfg.tie_margin, boot)
    if args.cfg.judge_model:
        for name, judged in model_judgement(Path(args.cfg.judge_model), answers, args.judge_principles,
                                            args.cfg.batch_size, boot, args.trust_remote_code).items():
            results[name]["mtbench"]["judge"] = judged
    for name, rows in answers.items():
        finishes = [f for row in rows for f in row["finish"]]
        results[name]["mtbench"].update(boot.mean("cut_off_share", [f == "length" for f in finishes]))
    metrics = {"scoring": "per_token" if args.cfg.normalise else "sum", "policies": results}
    with staged_out(OUT, stage=STAGE, params=args.params, inputs=args.inputs) as tmp:
        for name, rows in answers.items():
            (tmp / "answers").mkdir(exist_ok=True)
            write_jsonl(tmp / "answers" / f"{name}.jsonl", rows)
            if held_out:
                write_jsonl(tmp / "answers" / f"{name}.system_messages.jsonl", system_answers[name])
        write_json(tmp / "metrics.json", {"scoring": metrics["scoring"], **results})
        (tmp / PLOT).write_text(json.dumps(plot_rows(metrics), indent=1) + "\n")
    return verify_artifact(OUT)


def main() -> None:
    params = runner.stage_params()
    cfg = params.evaluate
    judged = pick_principles(load_jsonl(PRINCIPLES, PreferencePrinciple), cfg.judge_principles,
                             "evaluate.judge_principles", PRINCIPLES)
    if cfg.judge_model and not Path(cfg.judge_model).is_dir():
        raise UserError(f"params.yaml: evaluate.judge_model: {cfg.judge_model} is not a folder; expected a local HF "
                        f"model folder")
    descriptions = value_descriptions(SPACE)
    policies = {name: POLICIES[name] for name in cfg.policies}
    inputs = input_refs({**{name: path.parent if path.name == MODEL else path for name, path in policies.items()},
                         "rm": RM, "principles": PRINCIPLES, "system_messages": SYSTEM, "space": SPACE,
                         "benchmarks": BENCHMARKS})
    benchmarks = load_benchmarks(cfg, params.seed)
    benchmarks["system_messages"] = read_jsonl(SYSTEM / "eval.jsonl")
    subset = {"seed": params.seed, "evaluate": cfg.model_dump(), "generation": params.generation.model_dump(),
              "system_messages": params.system_messages.model_dump()}
    fn = functools.partial(job, EvaluateJob(
        policies=policies, benchmarks=benchmarks, cfg=cfg, generation=params.generation,
        guide=[p.definition for p in judged], judge_principles=judged, system=params.system_messages,
        descriptions=descriptions, seed=params.seed, params=subset, inputs=inputs,
        trust_remote_code=params.model.trust_remote_code,
    ))
    runner.submit_stage(STAGE, OUT, fn, one_task(params.cluster.evaluate, STAGE), params.cluster, subset, inputs)
    publish_plot()


def publish_plot() -> None:
    """metrics/evaluate_plot.json: the bar chart's rows, beside the metrics (DVC reads both from the workspace)."""
    shutil.copy(OUT / PLOT, Path("metrics") / "evaluate_plot.json")


if __name__ == "__main__":
    sys.exit(runner.run(main))
