"""System messages (Janus) on the tiny model: the preference space and its held-out split by combination, the
chat template's system role (and the fallback for templates without one), the `system_messages` stage and what
it feeds - pairs written under matched and mismatched messages, labels under the values' descriptions, none of
them from a held-out combination - `evaluate`'s per-dimension win rates on the held-out rows, and an RM trained
on constructed pairs that prefers the answer that fits the system message (a child-level vs an expert-level
answer)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest

from align.artifacts import staged_out, verify_artifact
from align.errors import UserError
from align.generation import chat_prompt, has_system_role
from align.records import read_jsonl, write_jsonl
from align.reward import RewardScorer, system_examples
from align.training import tokenize_pair
from stages import system_messages as sm
from tests.conftest import ROOT
from tests.helpers import DEFAULTS, FAST_EXECUTION, FAST_TRAINING, stage
from tests.projects import SMALL_EVALUATE, add_policy_outs, make_project, rm_project

SPACE = sm.load_space(ROOT / "assets/preference_space.jsonl")
DESCRIPTIONS = {v.id: v.description for vs in SPACE.values() for v in vs}
NO_SYSTEM_TEMPLATE = (  # like Gemma's: a system turn is an error
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
    "<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_the_preference_space_has_four_dimensions_of_six_values() -> None:
    assert set(SPACE) == {"style", "background", "informativeness", "harmlessness"}
    assert all(len(values) >= 6 for values in SPACE.values())
    assert all(v.description.startswith("The response") for vs in SPACE.values() for v in vs)


def test_a_dimension_with_too_few_values_is_one_line(tmp_path: Path) -> None:
    lines = (ROOT / "assets/preference_space.jsonl").read_text().splitlines()
    path = tmp_path / "space.jsonl"
    path.write_text("\n".join(line for line in lines if '"id": "gentle"' not in line) + "\n")
    with pytest.raises(UserError, match=r"space.jsonl: dimension 'harmlessness' has 5 values; expected at least 6"):
        sm.load_space(path)


def test_held_out_combinations_are_a_seeded_share_of_the_space_split_by_combination() -> None:
    combos = [sm.combination({"style": s.id, "background": b.id, "informativeness": i.id, "harmlessness": h.id})
              for s in SPACE["style"] for b in SPACE["background"] for i in SPACE["informativeness"]
              for h in SPACE["harmlessness"]]
    held = [c for c in combos if sm.is_held_out(c, 0.2, seed=0)]
    assert len(combos) == 6**4 and 0.17 < len(held) / len(combos) < 0.23
    assert held == [c for c in combos if sm.is_held_out(c, 0.2, seed=0)]  # the same on every call
    assert held != [c for c in combos if sm.is_held_out(c, 0.2, seed=1)]  # and another split for another seed

    prompts = [{"id": f"p{i}", "text": f"Question {i}?"} for i in range(40)]
    train, evals = sm.plan(prompts, SPACE, DEFAULTS.system_messages.model_copy(update={"train_prompts": 30, "eval_prompts": 10}), seed=0)
    assert len(train) == 30 and len(evals) == 10
    assert not {r["id"] for r in train} & {r["id"] for r in evals}
    assert not any(sm.is_held_out(r[k]["combination"] if k else r["combination"], 0.2, 0)
                   for r in train for k in ("", "mismatched"))
    assert all(sm.is_held_out(r["combination"], 0.2, 0) for r in evals)
    for row in train + evals:  # the mismatched message differs in every dimension
        assert all(row["values"][d] != row["mismatched"]["values"][d] for d in sm.DIMENSIONS)


def test_a_model_written_message_is_kept_only_where_it_states_every_value() -> None:
    values = {"style": "bullets", "background": "expert_programmer", "informativeness": "thorough",
              "harmlessness": "gentle"}
    good = ("I'm a software engineer with years of experience. Please use bullet points and be thorough, but be "
            "gentle with me.")
    assert sm.rejection(good, "stop", values, SPACE) is None
    assert sm.rejection(good, "length", values, SPACE) == "cut_off"
    assert sm.rejection("I am an engineer.", "stop", values, SPACE) == "length"
    assert sm.rejection("I am a software engineer; use bullets and be thorough.", "stop", values,
                        SPACE) == "misses_a_value"  # nothing about gentleness
    echo = "Rewrite these notes as one short message that a user sends: bullets, engineer, thorough, gentle."
    assert sm.rejection(echo, "stop", values, SPACE) == "echoes_the_instruction"
    every = [dict(zip(sm.DIMENSIONS, ids)) for ids in itertools.product(*([v.id for v in SPACE[d]]
                                                                          for d in sm.DIMENSIONS))]
    assert all(sm.rejection(sm.template_message(v, SPACE), "stop", v, SPACE) is None for v in every)


def test_the_system_role_is_used_where_the_template_has_one(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert has_system_role(tokenizer)
    text = chat_prompt(tokenizer, [{"role": "user", "content": "Hi."}], system="I am eight years old.")
    assert text == "<|im_start|>system\nI am eight years old.<|im_end|>\n<|im_start|>user\nHi.<|im_end|>\n" \
                   "<|im_start|>assistant\n"

    tokenizer.chat_template = NO_SYSTEM_TEMPLATE  # no system role: the message opens the user's turn
    assert not has_system_role(tokenizer)
    text = chat_prompt(tokenizer, [{"role": "user", "content": "Hi."}], system="I am eight years old.")
    assert text == "<start_of_turn>user\nI am eight years old.\n\nHi.<end_of_turn>\n<start_of_turn>model\n"
    pair = tokenize_pair(tokenizer, "Hi.", "Hello!", system="I am eight years old.")
    assert tokenizer.decode(pair["input_ids"]).startswith("<start_of_turn>user\nI am eight years old.\n\nHi.")


@pytest.mark.slow
def test_system_messages_feed_pairs_and_labels_and_evaluate_never_training_on_held_out(
        tmp_path: Path, tiny_model: Path) -> None:
    cwd = make_project(tmp_path, tiny_model, pairs=[("What is the capital of France?", "Paris.")],
                       system_messages={"enabled": True, "train_prompts": 6, "eval_prompts": 3, "max_new_tokens": 24,
                                        "eval_max_new_tokens": 8},
                       sample_pairs={"max_prompts": 2, "max_new_tokens": 8}, evaluate=SMALL_EVALUATE)
    add_policy_outs(cwd, tiny_model)
    with staged_out(cwd / "data/prompts", stage="prompts", params={}, inputs={}) as tmp:
        write_jsonl(tmp / "prompts.jsonl", [{"id": f"p{i}", "text": f"Tell me about the number {i}.", "source": "seed"}
                                            for i in range(12)])
    shutil.rmtree(cwd / "data/system_messages")
    for name in ("system_messages", "sample_pairs", "label_preferences"):
        proc = stage(cwd, name)
        assert proc.returncode == 0, f"{name}: {proc.stderr}"

    train = read_jsonl(cwd / "data/system_messages/train.jsonl")
    evals = read_jsonl(cwd / "data/system_messages/eval.jsonl")
    held = {r["combination"] for r in evals} | {r["mismatched"]["combination"] for r in evals}
    assert len(train) == 6 and len(evals) == 3 and all(sm.is_held_out(c, 0.2, 0) for c in held)
    assert all(r["source"] in ("model", "template") and r["system"] for r in train + evals)
    metrics = json.loads((cwd / "data/system_messages/metrics.json").read_text())
    assert metrics["combinations"]["space"] == 6**4 and 0 <= metrics["model_written_share"] <= 1

    pairs = read_jsonl(cwd / "data/pairs/pairs.jsonl")
    system_pairs = [p for p in pairs if "system" in p]
    assert system_pairs and {p["id"] for p in system_pairs} <= {f"sys-{r['id']}" for r in train}
    preferences = read_jsonl(cwd / "data/preferences/preferences.jsonl")
    for row in preferences:  # nothing a training stage reads comes from a held-out combination
        if "system" in row:
            assert row["combination"] not in held and set(row["labels"]) == set(row["values"].values())
            assert row["system"] not in {r["system"] for r in evals}
    labelled = json.loads((cwd / "data/preferences/metrics.json").read_text())
    assert labelled["system_messages"]["pairs"] == len(system_pairs)
    assert set(labelled["system_messages"]) == {"pairs", *sm.DIMENSIONS}
    examples = system_examples([r for r in preferences if "system" in r], DESCRIPTIONS, 4, seed=0)
    assert all(e["shown"][0][0] in DESCRIPTIONS for e in examples)

    proc = stage(cwd, "evaluate")
    assert proc.returncode == 0, proc.stderr
    verify_artifact(cwd / "data/evaluation")
    result = json.loads((cwd / "data/evaluation/metrics.json").read_text())
    for policy in ("base", "sft", "policy"):
        judged = result[policy]["system_messages"]  # by the RM the policy was optimised against, and by the judge
        assert judged["target_rm"]["prompts"] == 3 == judged["judge"]["items"]
        assert all(0 <= judged["target_rm"][d]["win_rate"] <= 1 for d in (*sm.DIMENSIONS, "overall"))
        assert 0 <= judged["judge"]["win_rate"] <= 1 and 0 <= judged["judge"]["position_bias"] <= 1
    answers = read_jsonl(cwd / "data/evaluation/answers/sft.system_messages.jsonl")
    assert [a["combination"] for a in answers] == [r["combination"] for r in evals]
    plot = json.loads((cwd / "metrics/evaluate_plot.json").read_text())
    row = next(r for r in plot if r["bar"] == "system_messages.target_rm.background.win_rate / sft")
    background = result["sft"]["system_messages"]["target_rm"]["background"]
    assert row["value"] == background["win_rate"] and [row["lo"], row["hi"]] == json.loads(background["win_rate_ci95"])
    headline = json.loads((cwd / "metrics/evaluate/sysmsg_judge.json").read_text())
    assert headline == {p: result[p]["system_messages"]["judge"]["win_rate"] for p in ("base", "sft", "policy")}


CHILD_EXPERT = [  # (prompt, an answer for a child, an answer for an expert programmer)
    ("What is a function?", "A function is like a little machine. You give it numbers and it gives you a number back.",
     "A function maps arguments to a return value; def add(a, b): return a + b binds parameters in a local scope."),
    ("What is a loop?", "A loop does the same thing again and again, like counting 1 2 3 4 5 until you stop.",
     "A loop iterates over an iterable; for i in range(10) evaluates the body per element until StopIteration."),
    ("Why is the sky blue?", "The sky is blue because the sun's light bounces around and blue bounces the most.",
     "Rayleigh scattering: cross-section scales as lambda^-4, so shorter wavelengths dominate the diffuse sky."),
    ("What is a number?", "A number tells you how many. 1 2 3 are numbers, and so are 7 and 10.",
     "Numbers are elements of a field such as the reals; integers are a ring, and 7 is a prime integer."),
    ("What does add do?", "Add puts things together. 1 and 2 together make 3.",
     "add is a binary operator; def add(a, b): return a + b dispatches to __add__ of a's type."),
    ("What is Paris?", "Paris is a big city in France with a tall tower you can go up.",
     "Paris is the capital of France, an administrative region (Ile-de-France) of about 2.1 million inhabitants."),
]


OTHERS = [{"style": "formal", "informativeness": "brief", "harmlessness": "honest_limits"},
          {"style": "casual", "informativeness": "examples", "harmlessness": "gentle"},
          {"style": "bullets", "informativeness": "reasons", "harmlessness": "unbiased"}]


def message(background: str, others: dict[str, str]) -> tuple[dict[str, str], str]:
    values = {**others, "background": background}
    return values, sm.template_message(values, SPACE)


def child_expert_rows() -> list[dict]:
    """Per prompt, background (child, expert programmer) and set of other values, a pair under the system message
    of those values: the answer for that reader is preferred under the background value, every other value
    ties. The child and the expert message differ only in the background, and position alternates, so only the
    background the message states tells the two answers apart."""
    rows = []
    for i, (prompt, child, expert) in enumerate(CHILD_EXPERT):
        for background, preferred in (("child", child), ("expert_programmer", expert)):
            for k, others in enumerate(OTHERS):
                values, system = message(background, others)
                a, b = (child, expert) if (i + k) % 2 == 0 else (expert, child)
                labels = {v: "tie" for v in values.values()}
                labels[background] = "a" if a == preferred else "b"
                rows.append({"id": f"sys-{i}-{background}-{k}", "prompt": prompt, "response_a": a, "response_b": b,
                             "scores": {}, "labels": labels, "system": system, "values": values,
                             "combination": sm.combination(values)})
    return rows


@pytest.mark.slow
def test_the_rm_prefers_the_answer_that_fits_the_system_message(tmp_path: Path, roomy_model: Path) -> None:
    cwd = rm_project(tmp_path, roomy_model, rows=child_expert_rows(),
                     training={**FAST_TRAINING, "batch_size": 8, "warmup_ratio": 0.1},
                     cluster_defaults={**FAST_EXECUTION, "micro_batch_size": 8, "save_every_steps": 1000,
                                       "mem_gb": 24},  # the memory plan asks 23.6 GB for micro-batches of 8
                     rm={"learning_rate": 1e-3, "lora_r": 16, "lora_alpha": 32, "epochs": 24, "eval_share": 0.2,
                         "subsets_per_pair": 2})
    proc = stage(cwd, "train_rm", timeout=1800)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((cwd / "models/rm/metrics.json").read_text())
    assert metrics["train"]["system_message_examples"] > 0 and metrics["system_messages"]["examples"] > 0

    rm = RewardScorer(cwd / "models/sft/model", cwd / "models/rm")
    prompts = [row[0] for row in CHILD_EXPERT]
    margins = {}
    for background, fits in (("child", 1), ("expert_programmer", 2)):
        guides = [message(background, OTHERS[i % len(OTHERS)])[1] for i in range(len(CHILD_EXPERT))]
        fitting = rm.score(prompts, [row[fits] for row in CHILD_EXPERT], guides)
        other = rm.score(prompts, [row[3 - fits] for row in CHILD_EXPERT], guides)
        margins[background] = [f - o for f, o in zip(fitting, other)]
    print({k: [round(m, 2) for m in v] for k, v in margins.items()})
    assert all(sum(m > 0 for m in v) >= 5 for v in margins.values()), margins  # 5 of 6 prompts or more


def test_a_pair_naming_an_unknown_value_is_one_line_and_writes_nothing(tmp_path: Path, tiny_model: Path) -> None:
    cwd = make_project(tmp_path, tiny_model)
    add_policy_outs(cwd, tiny_model)
    with staged_out(cwd / "data/pairs", stage="sample_pairs", params={}, inputs={}) as tmp:
        write_jsonl(tmp / "pairs.jsonl", [{"id": "sys-p0", "prompt": "Hi?", "response_a": "Hello.", "response_b": "Hey.",
                                           "system": "I am eight years old.", "combination": "x",
                                           "values": {"style": "formal", "background": "toddler",
                                                      "informativeness": "brief", "harmlessness": "gentle"}}])
    proc = stage(cwd, "label_preferences")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("data/pairs/pairs.jsonl: values: 'toddler' is not an id in "
                                  "assets/preference_space.jsonl")
    assert not (cwd / "data/preferences").exists()
