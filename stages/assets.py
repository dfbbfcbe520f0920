"""The human-written inputs in assets/, read with a schema: a malformed line is one error naming the file, the
line and the key, before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.errors import UserError

T = TypeVar("T", bound=BaseModel)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SeedPrompt(_Record):
    id: str = Field(min_length=1)
    category: str = Field(min_length=1)
    text: str = Field(min_length=1)


class Principle(_Record):
    id: int = Field(ge=1)
    name: str = Field(min_length=1)
    definition: str = Field(min_length=1)


class Exemplar(_Record):
    id: int = Field(ge=1)
    query: str = Field(min_length=1)
    thoughts: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class PreferencePrinciple(_Record):
    """A principle the judge and the reward model read; `negation` is the opposite stated as a preference, shown
    to the reward model in its place to flip the label."""

    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    definition: str = Field(min_length=1)
    negation: str = Field(min_length=1)


class PreferenceValue(_Record):
    """One value of the preference space (Janus): `request` is how a user states it in a system message,
    `description` the judging principle that tells whether a response follows it."""

    id: str = Field(min_length=1)
    dimension: Literal["style", "background", "informativeness", "harmlessness"]
    name: str = Field(min_length=1)
    request: str = Field(min_length=1)
    description: str = Field(min_length=1)


class QuestionType(_Record):
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    description: str = Field(min_length=1)


def load_jsonl(path: Path, record: type[T]) -> list[T]:
    """Every line of `path` as a `record`; ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    rows: list[T] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(record.model_validate(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(k) for k in err["loc"]) or "(record)"
            raise UserError(f"{path}: line {number}: {key}: {err['msg'].lower()}") from None
    if not rows:
        raise UserError(f"{path}: empty; expected one JSON object per line")
    ids = [row.id for row in rows]  # type: ignore[attr-defined]
    duplicate = next((i for i in ids if ids.count(i) > 1), None)
    if duplicate is not None:
        raise UserError(f"{path}: id {duplicate!r} appears more than once")
    return rows


def pick_principles(principles: list[PreferencePrinciple], ids: list[str] | None, key: str,
                    path: Path) -> list[PreferencePrinciple]:
    """The principles params `key` names by id (all of them for None), in the order named; an unknown id is one
    line naming the key and the file."""
    if ids is None:
        return principles
    known = {p.id: p for p in principles}
    missing = [i for i in ids if i not in known]
    if missing:
        raise UserError(f"params.yaml: {key}: {missing[0]!r} is not an id in {path}; expected some of "
                        f"{', '.join(known)}")
    return [known[i] for i in ids]


def load_text(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise UserError(f"{path}: empty; expected the instruction text")
    return text


def load_template(path: Path, placeholders: tuple[str, ...]) -> str:
    """A prompt template whose `{name}` placeholders code fills in; each must appear exactly once, since a missing
    one would silently drop its text from every prompt and a repeated one would show it twice."""
    text = load_text(path)
    for name in placeholders:
        found = text.count("{" + name + "}")
        if found != 1:
            raise UserError(f"{path}: placeholder {{{name}}} must appear exactly once, found {found}")
    return text
