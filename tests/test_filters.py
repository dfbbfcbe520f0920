"""The SELF-ALIGN filters and parsers: ROUGE-L novelty (against rouge-score's own scorer), prompt and answer
checks, numbered-list parsing, and stripping the internal thoughts from a self-aligned completion."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from align import filters, templates
from align.assets import Principle
from align.filters import RougePool, answer_problem, distinct_n, prompt_problem, repeated_ngram_share
from align.generation import Completion
from tests.helpers import DEFAULTS

KEPT = [
    "Write a short poem about the sea at night.",
    "Explain how vaccines train the immune system.",
    "List three ways to save water at home.",
]


def test_rouge_l_equals_the_reference_scorer() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    a, b = "Write a short poem about the sea at night.", "Compose a poem about the night sea, please."
    assert filters.rouge_l(filters.tokens(a), filters.tokens(b)) == pytest.approx(scorer.score(a, b)["rougeL"].fmeasure)


def test_pool_rejects_near_duplicates_and_keeps_distinct_prompts() -> None:
    pool = RougePool(threshold=0.7)
    assert [pool.admit(text)[0] for text in KEPT] == [True, True, True]
    near, score = pool.admit("Write a short poem about the sea at night time.")
    assert not near and score >= 0.7
    assert pool.admit("write a SHORT poem, about the sea at night!")[0] is False  # case and punctuation do not count
    distinct, score = pool.admit("Describe the rules of chess to a beginner.")
    assert distinct and score < 0.7
    assert len(pool.pool) == 4  # rejected candidates never join the pool


def test_parallel_scoring_gives_the_serial_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = [f"Explain topic number {i} of the course in {i % 7 + 2} sentences for a student." for i in range(60)]
    serial = RougePool(0.7, workers=1)
    serial.extend(texts)
    parallel = RougePool(0.7, workers=2)
    parallel.extend(texts)
    monkeypatch.setattr(filters, "PARALLEL_MIN_POOL", 10)
    probe = filters.tokens("Explain topic number 5 of the course in 3 sentences.")
    try:
        assert parallel.nearest(probe) == serial.nearest(probe) > 0.7
        assert parallel._executor is not None  # the worker processes did the scoring
    finally:
        parallel.close()


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("Sing.", "too_short"),
    ("word " * 200, "too_long"),
    ("- Write a haiku about autumn leaves.", "not_an_instruction"),
    ("Describe what you see in this image of a harbour.", "needs_unseen_input"),
    ("Summarise the attached report in five bullet points.", "needs_unseen_input"),
    ("Read https://example.org and tell me what it says.", "needs_unseen_input"),
    ("What do you know about [topic 2] in history?", "placeholder"),
    ("Write a haiku about autumn leaves falling.", None),
    ("Write a Python function that checks whether a string is a palindrome.", None),
])
def test_prompt_problems(text: str, reason: str | None) -> None:
    assert prompt_problem(text, min_words=3, max_words=150) == reason


def test_parse_numbered_continues_the_list_and_stops_out_of_sequence() -> None:
    completion = ' "Write a limerick about a cat."\n8. Explain tides\n   to a child.\n9. Name a colour.\n3. stray\n10. no'
    assert templates.parse_numbered(completion, 7) == ["Write a limerick about a cat.", "Explain tides to a child.",
                                                       "Name a colour."]
    assert templates.parse_numbered(" One item.\n\n8. after a blank line", 7) == ["One item."]


def test_repetition_and_diversity_measures() -> None:
    assert repeated_ngram_share("the cat sat on the mat " * 6) > 0.7
    assert repeated_ngram_share("Each of these words appears exactly one time in this sentence here.") == 0.0
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)


PRINCIPLES = [Principle(id=1, name="candor", definition="The assistant admits what it does not know and never "
                                                        "invents facts to fill a gap in its knowledge.")]


def test_thoughts_are_stripped_from_the_answer() -> None:
    completion = (" The user asks for a fact; (candor) applies, I should say what I know.\n\n"
                  "Assistant: Paris is the capital of France.")
    thoughts, answer = templates.split_thoughts(completion)
    assert answer == "Paris is the capital of France."
    assert "candor" in thoughts and "candor" not in answer
    assert templates.split_thoughts(" thinking, never answering")[1] is None


@pytest.mark.parametrize("text, finish, reason", [
    (" I think.\n\nAssistant: Paris is the capital of France.", "stop", None),
    (" I think.\n\nAssistant: Paris is", "length", "cut_off"),
    (" I think and think", "stop", "no_answer"),
    (" I think.\n\nAssistant:   ", "stop", "empty"),
    (" I think.\n\nAssistant: " + "yes and no " * 20, "stop", "repetitive"),
    (" I think.\n\nAssistant: Following (candor), I admit I am unsure.", "stop", "echoes_principles"),
    (" I think.\n\nAssistant: My internal thoughts say Paris.", "stop", "echoes_principles"),
    (" I think.\n\nAssistant: The assistant admits what it does not know and never invents facts.", "stop",
     "echoes_principles"),
])
def test_answer_problems(text: str, finish: str, reason: str | None) -> None:
    _, answer = templates.split_thoughts(text)
    assert answer_problem(Completion(text, 10, finish), answer, PRINCIPLES, DEFAULTS.self_align) == reason


def test_a_cut_off_text_is_trimmed_to_its_last_complete_paragraph_or_sentence() -> None:
    assert filters.trim_to_boundary("First paragraph.\n\nSecond one is cut") == "First paragraph."
    assert filters.trim_to_boundary("One sentence. Two sentences! Three is cu") == "One sentence. Two sentences!"
    assert filters.trim_to_boundary("She said \"stop.\" Then the") == "She said \"stop.\""
    assert filters.trim_to_boundary("no sentence ends here") is None
