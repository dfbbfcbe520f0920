"""The prompt texts of the SELF-ALIGN stages and the parsers of what the model writes back.

Prompts are plain text completions (no chat template): the method is meant for a base model, which only
continues text, and a numbered list or a transcript is the form a base model continues most reliably.
"""

from __future__ import annotations

import re

from align.assets import Exemplar, Principle, QuestionType

THOUGHTS_TAG = "Assistant (internal thoughts):"
ANSWER_TAG = "Assistant:"
USER_TAG = "User:"
SELF_ALIGN_STOP = ("\nUser:", "\n# ")  # the model starting the next turn (or a new section) ends the answer
_ITEM = re.compile(r"^\s*(\d{1,3})[.)]\s+", re.MULTILINE)


def numbered(items: list[str], start: int = 1) -> str:
    return "\n".join(f"{n}. {' '.join(item.split())}" for n, item in enumerate(items, start))


def parse_numbered(completion: str, first: int) -> list[str]:
    """The items of a numbered list the model continued from `first.` (already in the prompt): the text up to
    the next number is item `first`, then each `n.` that follows in sequence starts the next item; the list ends
    at a blank line or at a number out of sequence."""
    text = completion.split("\n\n", 1)[0]
    items: list[str] = []
    start, expected = 0, first + 1
    for match in _ITEM.finditer(text):
        if int(match.group(1)) != expected:
            text = text[: match.start()]
            break
        items.append(text[start : match.start()])
        start, expected = match.end(), expected + 1
    items.append(text[start:])
    return [_unquote(" ".join(item.split())) for item in items]


def _unquote(item: str) -> str:
    """Drop the quotes a model sometimes puts around a whole item (or only before it)."""
    if item.startswith('"') and (item.endswith('"') or item.count('"') == 1):
        return item.strip('"').strip()
    return item


def self_instruct_prompt(examples: list[str]) -> str:
    """k example instructions as a numbered list; the model continues with item k+1 onwards."""
    return (
        "Below are diverse requests that people send to an AI assistant. Each one is self-contained: it includes "
        "any text it refers to and can be answered in writing alone. They differ in topic, form and difficulty.\n\n"
        f"{numbered(examples)}\n{len(examples) + 1}."
    )


def _describe(qtype: QuestionType) -> str:
    return f"Question type: {qtype.name.replace('_', ' ')}. {qtype.description}"


def tgrt_topics_prompt(qtype: QuestionType) -> str:
    """Ask for topics that questions of one red-teaming type could be about."""
    return (
        "We test an AI assistant with questions that are hard for it to handle well.\n"
        f"{_describe(qtype)}\n"
        "Here is a list of different topics such questions could be about, each a short phrase:\n\n1."
    )


def tgrt_questions_prompt(qtype: QuestionType, topic: str) -> str:
    """Ask for questions of one type about one topic."""
    return (
        "We test an AI assistant with questions that are hard for it to handle well.\n"
        f"{_describe(qtype)}\nTopic: {topic}\n"
        "Here is a list of different questions of this type about this topic, each written as a user would "
        "send it:\n\n1."
    )


def self_align_prefix(principles: list[Principle], exemplars: list[Exemplar]) -> str:
    """Everything before the user's query: the same for every prompt, so its KV cache is computed once."""
    rules = "\n".join(f"{p.id}. {p.name}: {' '.join(p.definition.split())}" for p in principles)
    shots = "\n\n".join(f"{USER_TAG} {e.query}\n\n{THOUGHTS_TAG} {e.thoughts}\n\n{ANSWER_TAG} {e.answer}"
                        for e in exemplars)
    return (
        "# The assistant\n\n"
        "This is a conversation log of an AI assistant that follows the principles below. Before it answers, it "
        "writes down its internal thoughts: which principles apply to the request and how it will follow them. "
        "Then it gives its answer. The user never sees the internal thoughts, so the answer stands on its own and "
        "never mentions the principles.\n\n"
        f"## Principles\n\n{rules}\n\n"
        f"## Conversations\n\n{shots}\n\n"
    )


def self_align_prompt(prefix: str, query: str) -> str:
    return f"{prefix}{USER_TAG} {query}\n\n{THOUGHTS_TAG}"


def split_thoughts(completion: str) -> tuple[str, str | None]:
    """(internal thoughts, answer) of a completion of `self_align_prompt`; answer None where the model never
    reached the `Assistant:` line."""
    head, tag, answer = completion.partition(f"\n{ANSWER_TAG}")
    if not tag:
        return completion.strip(), None
    return head.strip(), answer.strip()


def verbose_prompt(instruction: str, query: str) -> str:
    """The user turn of verbose cloning: the instruction, then the query (distilled away afterwards)."""
    return f"{instruction}\n\n{query}"
