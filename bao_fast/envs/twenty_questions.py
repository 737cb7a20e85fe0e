"""The 20-questions gym: a rule-based user thinks of one creature of a generated bestiary.

Choices (the question grammar is in :mod:`bao_fast.envs.entity_table`):

- ``action`` ``<question>``: a yes/no question about one attribute; the user replies ``Yes.``, ``No.`` or
  ``I don't understand — …`` with the grammar and the attribute names. Never user-involved, reward 0.
- ``search`` ``<query>``: looks the bestiary up (public knowledge, not the user): empty / ``all`` lists the
  attributes and every creature; a creature's name shows its row; conditions in the question grammar
  joined by ``;`` or ``and`` (``legs > 4; color in red, blue``) list the creatures that satisfy all.
- ``answer`` ``<name>``: user-involved; reward 1 and the episode ends when it names the hidden creature,
  otherwise reward 0 and the game goes on.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bao_fast.envs.base import Gym, Outcome, ToolCall, build_system_prompt
from bao_fast.envs.entity_table import Entity, EntityTable, QuestionError, generate_table, parse_question

__all__ = [
    "LEVEL_SIZES",
    "TwentyQuestionsGym",
    "TwentyQuestionsTask",
    "generate_tasks",
    "twenty_questions_tasks",
]

LEVEL_SIZES: dict[int, int] = {1: 8, 2: 16, 3: 24, 4: 32, 5: 48}
"""Difficulty level -> number of creatures in the task's bestiary."""

_ALL = ("", "all", "*", "bestiary", "table", "everything")
_CONDITION_SPLIT = re.compile(r"\s*(?:;|\band\b)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class TwentyQuestionsTask:
    """One game: the bestiary ``table`` and the name of the hidden creature ``target``."""

    id: str
    table: EntityTable
    target: str

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"TwentyQuestionsTask.id must be a non-empty str, got {self.id!r}")
        if not isinstance(self.table, EntityTable):
            raise TypeError(f"TwentyQuestionsTask.table must be an EntityTable, got {type(self.table).__name__}")
        if not isinstance(self.target, str) or self.table.find(self.target) is None:
            raise ValueError(f"TwentyQuestionsTask.target {self.target!r} is not a creature of the table")

    @property
    def target_entity(self) -> Entity:
        """The hidden creature's row."""
        entity = self.table.find(self.target)
        assert entity is not None  # checked in __post_init__
        return entity


def generate_tasks(
    n: int, level: int | Sequence[int] = 3, seed: int = 0, split: str = "train"
) -> list[TwentyQuestionsTask]:
    """``n`` games, each with its own seeded bestiary of ``LEVEL_SIZES[level]`` creatures (a sequence of
    levels is drawn from uniformly per game) and a uniformly drawn hidden creature. ``split`` ('train' |
    'test') and ``seed`` select independent streams of games."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    levels = (level,) if isinstance(level, int) else tuple(level)
    if not levels or any(lv not in LEVEL_SIZES for lv in levels):
        raise ValueError(f"level must be in {sorted(LEVEL_SIZES)} or a non-empty sequence of them, got {level!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"twenty-questions/{split}/{seed}/{levels}")
    tasks = []
    for i in range(n):
        lv = rng.choice(levels)
        table = generate_table(LEVEL_SIZES[lv], seed=rng.getrandbits(63))
        target = rng.choice(table.entities).name
        tasks.append(TwentyQuestionsTask(f"tq-{split}-L{lv}-{seed}-{i:05d}", table, target))
    return tasks


def twenty_questions_tasks(
    split: str, n: int | None, level: int | Sequence[int], seed: int, path: str | None
) -> list[TwentyQuestionsTask]:
    """Task source of the registry (``make_tasks("twenty_questions", ...)``): ``n`` generated games."""
    if path is not None:
        raise ValueError(f"path: twenty_questions tasks are generated, not loaded; got {path!r}")
    if n is None:
        raise ValueError("n: the number of tasks to generate is required")
    if split == "all":
        raise ValueError("split: generated twenty_questions tasks come as 'train' or 'test', not 'all'")
    return generate_tasks(n, level, seed, split)


_DESCRIPTION = (
    "Twenty questions. The user is thinking of one creature of a bestiary of made-up creatures, each "
    "described by the same attributes (class, color, size, habitat, diet, legs, lifespan, weight, nocturnal, "
    "venomous). Find out which one it is with as few guesses as possible."
)
_CHOICES = {
    "action": "`content` is one yes/no question to the user about one attribute of the hidden creature, e.g. "
    "`is color red?`, `is habitat in forest, swamp?`, `is legs > 4?`, `is nocturnal?`.",
    "search": "look the bestiary up (the user is not involved): empty `content` lists the attributes and all "
    "creatures; a creature's name shows its attributes; conditions in the question form joined by `;` "
    "(e.g. `legs > 4; color in red, blue`) list the creatures that satisfy all of them.",
    "answer": "`content` is the name of one creature. It asks the user to confirm your guess; you may guess "
    "again if wrong, but every guess costs the user effort.",
}
_NOTES = (
    "Read the bestiary first, keep the list of creatures consistent with every answer, and ask the question "
    "that splits that list most evenly.",
    "Guess only when a single creature is left or the budget is nearly spent.",
)


class TwentyQuestionsGym(Gym):
    """Rule-based 20 questions over a generated bestiary; tasks are :class:`TwentyQuestionsTask`."""

    name = "twenty_questions"
    choices = ("action", "search", "answer")

    def __init__(self, max_turns: int = 12, correct_reward: float = 1.0) -> None:
        super().__init__(max_turns)
        self.correct_reward = float(correct_reward)
        self.task: TwentyQuestionsTask | None = None

    def _reset(self, task: Any) -> list[dict[str, str]]:
        if not isinstance(task, TwentyQuestionsTask):
            raise TypeError(f"task must be a TwentyQuestionsTask, got {type(task).__name__}")
        self.task = task
        system = build_system_prompt(_DESCRIPTION, _CHOICES, _NOTES, self.max_turns)
        opening = f"I am thinking of one of the {len(task.table)} creatures in the bestiary. Which one is it?"
        return [{"role": "system", "content": system}, {"role": "user", "content": opening}]

    def _act(self, call: ToolCall) -> Outcome:
        assert self.task is not None
        if call.choice == "action":
            try:
                question = parse_question(call.content)
            except QuestionError as exc:
                return Outcome(str(exc))
            return Outcome("Yes." if question.holds(self.task.target_entity) else "No.")
        if call.choice == "search":
            return Outcome(self._search(call.content))
        guess = self.task.table.find(call.content)
        if guess is None:
            return Outcome(f"No. There is no creature called {call.content.strip()!r} in the bestiary.")
        if guess == self.task.target_entity:
            return Outcome(f"Yes! I was thinking of {guess.name}.", self.correct_reward, terminated=True, success=True)
        return Outcome(f"No, I am not thinking of {guess.name}.")

    def _search(self, query: str) -> str:
        assert self.task is not None
        table = self.task.table
        key = query.strip().strip("'\"`").lower()
        if key in _ALL:
            return f"Attributes:\n{table.schema()}\nCreatures ({len(table)}):\n{table.render()}"
        entity = table.find(key)
        if entity is not None:
            return entity.describe()
        try:
            conditions = [parse_question(c) for c in _CONDITION_SPLIT.split(key) if c]
        except QuestionError as exc:
            return f"Invalid search: {exc} Or search with empty content to list everything."
        matches = [e for e in table if all(c.holds(e) for c in conditions)]
        if not matches:
            return "No creature satisfies all of these conditions."
        return f"{len(matches)} creature(s) satisfy all conditions:\n{table.render(matches)}"
