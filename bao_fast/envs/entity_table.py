"""Generated bestiaries (entity/attribute tables) and the yes/no question grammar of the 20-questions gym.

A table is a seeded random set of made-up creatures, each with a value for every attribute of
:data:`ATTRIBUTES` (categories, numbers and yes/no flags); no two creatures share all values, so the
hidden one can always be singled out by questions. Questions ask about one attribute::

    question := ["is"] ["the"] attribute [relation] values ["?"]
    relation := "=" | "==" | ":" | "is" | "in" | "!=" | "is not" | "not in" | "<" | "<=" | ">" | ">="
    values   := value {("," | "or") value}

    is color red?              is habitat in forest, swamp?      is color red or blue?
    is legs > 4?               is lifespan <= 20?                is nocturnal?   (flag: means "= yes")

Without a relation the values are matched for equality; several values mean "one of". Order
comparisons take one integer and apply to number attributes only.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ATTRIBUTES",
    "Attribute",
    "Entity",
    "EntityTable",
    "Question",
    "QuestionError",
    "candidate_questions",
    "generate_table",
    "parse_question",
]

Kind = Literal["category", "number", "flag"]
Value = str | int


@dataclass(frozen=True)
class Attribute:
    """One column of a table. ``values``: the allowed words (category, flag) or the numbers drawn from
    (number); ``unit`` is shown next to numbers in the schema."""

    name: str
    kind: Kind
    values: tuple[Value, ...]
    unit: str = ""

    def describe(self) -> str:
        """One schema line, e.g. ``color: red | blue | ...`` or ``lifespan: integer 1..60 (years)``."""
        if self.kind == "number":
            unit = f" ({self.unit})" if self.unit else ""
            return f"{self.name}: integer {min(self.values)}..{max(self.values)}{unit}"
        return f"{self.name}: {' | '.join(str(v) for v in self.values)}"


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("class", "category", ("mammal", "bird", "reptile", "fish", "amphibian", "insect")),
    Attribute(
        "color", "category", ("red", "orange", "yellow", "green", "blue", "purple", "brown", "black", "white", "grey")
    ),
    Attribute("size", "category", ("tiny", "small", "medium", "large", "huge")),
    Attribute("habitat", "category", ("forest", "desert", "ocean", "mountain", "swamp", "grassland", "tundra", "cave")),
    Attribute("diet", "category", ("herbivore", "carnivore", "omnivore", "insectivore")),
    Attribute("legs", "number", (0, 2, 4, 6, 8)),
    Attribute("lifespan", "number", tuple(range(1, 61)), "years"),
    Attribute("weight", "number", tuple(range(1, 501)), "kg"),
    Attribute("nocturnal", "flag", ("yes", "no")),
    Attribute("venomous", "flag", ("yes", "no")),
)
"""The columns of every generated table."""

_ALIASES = {"colour": "color", "gray": "grey", "colours": "color", "colors": "color", "lifetime": "lifespan"}
_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "r", "s", "sk", "t", "th", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ou", "y")
_CODAS = ("", "", "n", "r", "l", "k", "s", "m", "th")


@dataclass(frozen=True)
class Entity:
    """A creature: its ``name`` and one value per attribute, in :data:`ATTRIBUTES` order."""

    name: str
    values: tuple[Value, ...]

    def value(self, attribute: str) -> Value:
        """The value of ``attribute`` (a name from :data:`ATTRIBUTES`)."""
        return self.values[_attribute_index(attribute)]

    def describe(self) -> str:
        """One table row: ``Name: class=bird, color=red, ...``."""
        cells = ", ".join(f"{a.name}={v}" for a, v in zip(ATTRIBUTES, self.values, strict=True))
        return f"{self.name}: {cells}"


def _attribute_index(name: str) -> int:
    for i, attribute in enumerate(ATTRIBUTES):
        if attribute.name == name:
            return i
    raise KeyError(f"unknown attribute {name!r}")


@dataclass(frozen=True)
class EntityTable:
    """A bestiary: distinct creatures (unique names, unique value tuples)."""

    entities: tuple[Entity, ...]

    def __post_init__(self) -> None:
        if not self.entities:
            raise ValueError("entities must not be empty")
        names = [e.name.lower() for e in self.entities]
        if len(set(names)) != len(names):
            raise ValueError("entities: names must be unique (case-insensitively)")
        if len({e.values for e in self.entities}) != len(self.entities):
            raise ValueError("entities: two creatures share every attribute value")
        for e in self.entities:
            if len(e.values) != len(ATTRIBUTES):
                raise ValueError(f"entities: {e.name!r} has {len(e.values)} values, expected {len(ATTRIBUTES)}")
            for a, v in zip(ATTRIBUTES, e.values, strict=True):
                if v not in a.values:
                    raise ValueError(f"entities: {e.name!r} has {a.name}={v!r}, not one of its allowed values")

    def __len__(self) -> int:
        return len(self.entities)

    def __iter__(self) -> Iterator[Entity]:
        return iter(self.entities)

    def find(self, name: str) -> Entity | None:
        """The creature called ``name`` (case and surrounding punctuation ignored), or None."""
        key = name.strip().strip(" .!?'\"`").lower()
        return next((e for e in self.entities if e.name.lower() == key), None)

    def schema(self) -> str:
        """The attribute lines, one per attribute."""
        return "\n".join(f"- {a.describe()}" for a in ATTRIBUTES)

    def render(self, entities: Sequence[Entity] | None = None) -> str:
        """Rows of ``entities`` (default: all), one per line."""
        return "\n".join(e.describe() for e in (self.entities if entities is None else entities))


def _make_name(rng: random.Random) -> str:
    syllables = rng.choice((2, 2, 3))
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def _draw_value(attribute: Attribute, rng: random.Random) -> Value:
    if attribute.name == "weight":  # log-uniform, so light and heavy creatures are equally common
        return min(max(round(math.exp(rng.uniform(0.0, math.log(max(attribute.values))))), 1), max(attribute.values))
    return rng.choice(attribute.values)


def generate_table(num_entities: int, seed: int) -> EntityTable:
    """A seeded bestiary of ``num_entities`` (1..256) made-up creatures with independent random values."""
    if isinstance(num_entities, bool) or not isinstance(num_entities, int) or not 1 <= num_entities <= 256:
        raise ValueError(f"num_entities must be an int in 1..256, got {num_entities!r}")
    rng = random.Random(f"bestiary/{seed}/{num_entities}")
    names: set[str] = set()
    rows: set[tuple[Value, ...]] = set()
    entities = []
    while len(entities) < num_entities:
        name = _make_name(rng)
        values = tuple(_draw_value(a, rng) for a in ATTRIBUTES)
        if name.lower() in names or values in rows:
            continue
        names.add(name.lower())
        rows.add(values)
        entities.append(Entity(name, values))
    return EntityTable(tuple(entities))


# ------------------------------------------------------------------------------------------------ questions


class QuestionError(ValueError):
    """A question outside the grammar; the message says what is wrong, for the user to reply with."""


_ORDER_OPS = ("<", "<=", ">", ">=")
_RELATION = re.compile(r"^(not\s+in\b|in\b|is\s+not\b|is\b|!=|==|<=|>=|=|<|>|:)\s*")
_VALUE_SPLIT = re.compile(r"\s*(?:,|\bor\b)\s*")
_INTEGER = re.compile(r"[+-]?\d{1,9}")  # digits capped: int() rejects strings beyond its digit limit


@dataclass(frozen=True)
class Question:
    """A parsed question: ``attribute`` with ``op`` in ``in | not in | < | <= | > | >=`` and ``values``
    (the set for ``in``/``not in``, one integer for order comparisons)."""

    attribute: str
    op: str
    values: tuple[Value, ...]

    def holds(self, entity: Entity) -> bool:
        """Whether the true answer for ``entity`` is yes."""
        value = entity.value(self.attribute)
        if self.op == "in":
            return value in self.values
        if self.op == "not in":
            return value not in self.values
        limit = self.values[0]
        assert isinstance(value, int) and isinstance(limit, int)
        return {"<": value < limit, "<=": value <= limit, ">": value > limit, ">=": value >= limit}[self.op]

    def render(self) -> str:
        """Canonical text in the grammar; ``parse_question(q.render()) == q``."""
        if self.op in _ORDER_OPS:
            return f"is {self.attribute} {self.op} {self.values[0]}?"
        if self.op == "in" and self.values == ("yes",) and ATTRIBUTES[_attribute_index(self.attribute)].kind == "flag":
            return f"is {self.attribute}?"
        listed = ", ".join(str(v) for v in self.values)
        if self.op == "in":
            return f"is {self.attribute} {listed}?" if len(self.values) == 1 else f"is {self.attribute} in {listed}?"
        return f"is {self.attribute} not in {listed}?"


def _grammar_hint() -> str:
    names = ", ".join(a.name for a in ATTRIBUTES)
    return (
        "ask about one attribute, e.g. `is color red?`, `is habitat in forest, swamp?`, `is legs > 4?` or "
        f"`is nocturnal?`. Attributes: {names}"
    )


def parse_question(text: str) -> Question:
    """Parse a question of the grammar above (case-insensitive). Raises :class:`QuestionError` with a
    reason the user can reply with."""
    body = text.strip().lower()
    end = len(body)
    while end and (body[end - 1] in "?.!" or body[end - 1].isspace()):  # in one pass (a "[?.!\s]+$" regex
        end -= 1  # rescans from every space of a long reply)
    body = body[:end]
    body = re.sub(r"^(?:is\s+)?(?:the\s+|its\s+)?", "", body)
    split = re.match(r"([a-z_]*)(.*)", body, re.DOTALL)
    assert split is not None  # the pattern matches every string
    head, rest = _ALIASES.get(split.group(1), split.group(1)), split.group(2)
    attribute = next((a for a in ATTRIBUTES if a.name == head), None)
    if attribute is None:
        raise QuestionError(f"I don't understand — {_grammar_hint()}.")
    rest = rest.strip()
    match = _RELATION.match(rest)
    relation = re.sub(r"\s+", " ", match.group(1)) if match else "="
    rest = rest[match.end() :] if match else rest
    raw = [v.strip(" '\"`") for v in _VALUE_SPLIT.split(rest) if v.strip(" '\"`")]
    if not raw:
        if attribute.kind != "flag":
            raise QuestionError(f"I don't understand — which {attribute.name}? Allowed: {attribute.describe()}.")
        raw = ["yes"]
    if relation in _ORDER_OPS:
        if attribute.kind != "number":
            raise QuestionError(f"I don't understand — `{relation}` only applies to numbers, and {head} is not one.")
        if len(raw) != 1 or not _INTEGER.fullmatch(raw[0]):
            raise QuestionError(f"I don't understand — `{head} {relation}` takes one integer.")
        return Question(attribute.name, relation, (int(raw[0]),))
    values: list[Value] = []
    for word in raw:
        if attribute.kind == "number":
            if not _INTEGER.fullmatch(word):
                raise QuestionError(f"I don't understand — {head} is a number, not {word!r}.")
            values.append(int(word))
            continue
        word = _ALIASES.get(word, word)
        if word not in attribute.values:
            raise QuestionError(f"I don't understand — {word!r} is not a known {head}; {attribute.describe()}.")
        values.append(word)
    op = "not in" if relation in ("!=", "is not", "not in") else "in"
    return Question(attribute.name, op, tuple(dict.fromkeys(values)))


def candidate_questions(entities: Sequence[Entity], max_set_size: int = 3) -> Iterator[Question]:
    """Questions that split ``entities``: equality and sets of up to ``max_set_size`` values for categories,
    flags, and ``>`` thresholds between the numbers present. Used by the scripted teacher."""
    for attribute in ATTRIBUTES:
        present = sorted({e.value(attribute.name) for e in entities}, key=attribute.values.index)
        if len(present) < 2:
            continue
        if attribute.kind == "flag":
            yield Question(attribute.name, "in", ("yes",))
        elif attribute.kind == "number":
            for v in present[:-1]:
                yield Question(attribute.name, ">", (v,))
        else:
            for size in range(1, min(max_set_size, len(present) - 1) + 1):
                for combo in itertools.combinations(present, size):
                    yield Question(attribute.name, "in", combo)
