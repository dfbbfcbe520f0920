"""assets/ is the human input of the method: it must load under its schema, and a broken line must be named."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.assets import (
    Exemplar, PreferencePrinciple, Principle, QuestionType, SeedPrompt, load_jsonl, load_template, load_text,
)
from align.errors import UserError
from tests.conftest import ROOT

ASSETS = ROOT / "assets"


def test_seed_prompts_are_many_varied_and_self_contained() -> None:
    seeds = load_jsonl(ASSETS / "seed_prompts.jsonl", SeedPrompt)
    assert 120 <= len(seeds) <= 200
    categories = {s.category for s in seeds}
    assert len(categories) >= 8 and "refusal_worthy" in categories
    assert len({s.text.lower() for s in seeds}) == len(seeds)
    for seed in seeds:
        assert not any(word in seed.text.lower() for word in ("attached image", "see the photo", "this url")), seed.id


def test_principles_exemplars_and_question_types() -> None:
    principles = load_jsonl(ASSETS / "principles.jsonl", Principle)
    assert len(principles) == 16 and len({p.name for p in principles}) == 16
    names = {p.name for p in principles}
    exemplars = load_jsonl(ASSETS / "exemplars.jsonl", Exemplar)
    assert len(exemplars) == 5
    for exemplar in exemplars:  # the internal thoughts name the principles that apply
        assert any(name in exemplar.thoughts for name in names), exemplar.id
    types = load_jsonl(ASSETS / "tgrt_question_types.jsonl", QuestionType)
    assert len(types) >= 20 and len({t.name for t in types}) == len(types)
    assert all("\n" not in t.description for t in types)
    assert len(load_text(ASSETS / "verbose_instruction.txt").split()) >= 20


@pytest.mark.parametrize(
    "name, low, high",
    [("preference_principles.jsonl", 12, 16), ("ppo_principles.jsonl", 8, 12), ("guard_principles.jsonl", 3, 3)],
)
def test_salmon_principles_each_have_a_distinct_negation(name: str, low: int, high: int) -> None:
    principles = load_jsonl(ASSETS / name, PreferencePrinciple)  # ids are unique, or this raises
    assert low <= len(principles) <= high
    assert len({p.name for p in principles}) == len(principles)
    for principle in principles:
        assert principle.negation.strip().lower() != principle.definition.strip().lower(), principle.id


def test_judge_and_reward_model_templates() -> None:
    judge = load_template(ASSETS / "judge_prompt.txt", ("instruction", "output_a", "output_b", "principle"))
    assert judge.endswith("Output (")  # the model's next token is the choice letter
    load_template(ASSETS / "rm_prompt.txt", ("principles", "instruction", "response"))


def test_principle_without_negation_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "preference_principles.jsonl"
    path.write_text('{"id": "concise", "name": "Concise", "definition": "a", "negation": "b"}\n'
                    '{"id": "specific", "name": "Specific", "definition": "c"}\n')
    with pytest.raises(UserError, match=r"preference_principles.jsonl: line 2: negation: field required$"):
        load_jsonl(path, PreferencePrinciple)


@pytest.mark.parametrize(
    "content, found",
    [("Compare {output_a} for the user.\nAnswer: Output (", 0), ("{principle} {output_a} {principle}", 2)],
)
def test_template_placeholder_missing_or_repeated_is_one_line(tmp_path: Path, content: str, found: int) -> None:
    path = tmp_path / "judge_prompt.txt"
    path.write_text(content)
    message = rf"judge_prompt.txt: placeholder {{principle}} must appear exactly once, found {found}$"
    with pytest.raises(UserError, match=message):
        load_template(path, ("principle", "output_a"))


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"id": 1, "name": "ethical", "definition": "x"}\n{"id": 2, "name": "x"\n', r"principles.jsonl: line 2: not valid JSON"),
        ('{"id": 1, "name": "ethical"}\n', r"principles.jsonl: line 1: definition: field required"),
        ('{"id": "one", "name": "a", "definition": "b"}\n', r"principles.jsonl: line 1: id: input should be a valid integer"),
        ('{"id": 1, "name": "a", "definition": "b", "extra": 1}\n', r"principles.jsonl: line 1: extra: extra inputs are not permitted"),
        ('{"id": 1, "name": "a", "definition": "b"}\n{"id": 1, "name": "c", "definition": "d"}\n', r"principles.jsonl: line 2: id 1 appears more than once \(first on line 1\)"),
        ("\n", r"principles.jsonl: empty"),
    ],
)
def test_broken_asset_is_one_line_naming_file_line_and_key(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "principles.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_jsonl(path, Principle)
