"""The human-written inputs in assets/, read with a schema: a malformed line is one error naming the file, the
line and the key, before any model is loaded."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from align.errors import UserError

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


DIMENSIONS = ("style", "background", "informativeness", "harmlessness")  # Janus' preference dimensions
MIN_VALUES = 6

Space = dict[str, list[PreferenceValue]]


def read_text(path: Path) -> str:
    """The UTF-8 text of an input file; a missing file, a folder or other bytes are one line naming it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; expected a file")
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not UTF-8 text") from None


def load_jsonl(path: Path, record: type[T]) -> list[T]:
    """Every line of `path` as a `record`; ids must be unique."""
    path = Path(path)
    rows: list[T] = []
    numbers: list[int] = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        numbers.append(number)
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(value, dict):
            raise UserError(f"{path}: line {number}: expected a JSON object, got {type(value).__name__}")
        try:
            rows.append(record.model_validate(value))
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(k) for k in err["loc"]) or "(record)"
            raise UserError(f"{path}: line {number}: {key}: {err['msg'].lower()}") from None
    if not rows:
        raise UserError(f"{path}: empty; expected one JSON object per line")
    first: dict[object, int] = {}  # id -> the line it first appears on
    for number, row in zip(numbers, rows):
        key = row.id  # type: ignore[attr-defined]
        if key in first:
            raise UserError(f"{path}: line {number}: id {key!r} appears more than once (first on line {first[key]})")
        first[key] = number
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
    text = read_text(path).strip()
    if not text:
        raise UserError(f"{path}: empty; expected the instruction text")
    return text


def load_template(path: Path, placeholders: tuple[str, ...]) -> str:
    """A prompt template whose `{name}` placeholders code fills in (str.format); each must appear exactly once,
    since a missing one would silently drop its text from every prompt and a repeated one would show it twice, and
    no other may appear (a literal brace is written {{ or }})."""
    text = load_text(path)
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]
    except ValueError as exc:
        raise UserError(f"{path}: {exc} (write {{{{ or }}}} for a literal brace)") from None
    unknown = next((f for f in fields if f not in placeholders), None)
    if unknown is not None:
        raise UserError(f"{path}: placeholder {{{unknown}}} is not one of "
                        f"{', '.join('{' + p + '}' for p in placeholders)} (write {{{{ or }}}} for a literal brace)")
    for name in placeholders:
        found = fields.count(name)
        if found != 1:
            raise UserError(f"{path}: placeholder {{{name}}} must appear exactly once, found {found}")
    return text


# -------------------------------------------------------------------------------- Janus: the preference space


def load_space(path: Path) -> Space:
    """The values by dimension; each dimension needs MIN_VALUES values (one line naming the file else)."""
    space: Space = {d: [] for d in DIMENSIONS}
    for value in load_jsonl(path, PreferenceValue):
        space[value.dimension].append(value)
    short = next((d for d in DIMENSIONS if len(space[d]) < MIN_VALUES), None)
    if short is not None:
        raise UserError(f"{path}: dimension {short!r} has {len(space[short])} values; expected at least {MIN_VALUES}")
    return space


def values_by_id(space: Space) -> dict[str, PreferenceValue]:
    return {v.id: v for values in space.values() for v in values}


def value_descriptions(path: Path) -> dict[str, str]:
    """Value id -> its description: the judging principle the judge, the RM and evaluation read for it."""
    return {v.id: v.description for v in load_jsonl(path, PreferenceValue)}
