"""Scripted teacher for the 20-questions gym: halves the candidate set each turn and writes BAO's two
behaviours (retrospective reasoning, prospective planning) into ``<think>`` blocks.

Strategy, played against a real :class:`TwentyQuestionsGym` through its text interface only:

1. ``search`` with empty content to read the bestiary (the attributes and every creature).
2. Keep the creatures consistent with every answer so far. Each turn, ask the question (an equality or a
   set of up to three values, a flag, or a ``>`` threshold) whose yes/no split of the survivors is most
   even; ties go to the simpler question, then to a seeded random pick.
3. ``answer`` when one creature is left, or on the last turn (the first survivor; a wrong guess removes it).

Everything the reasoning mentions has been shown in the conversation, so a policy trained on it sees the
same information. ``ceil(log2 N) + 2`` turns suffice for a bestiary of N creatures.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from bao_fast.envs.entity_table import Entity, Question, candidate_questions, parse_question
from bao_fast.envs.teachers.episode import TeacherEpisode, play_scripted
from bao_fast.envs.twenty_questions import TwentyQuestionsGym, TwentyQuestionsTask

__all__ = ["TwentyQuestionsTeacher"]

_NAMES_SHOWN = 8
"""Survivor lists longer than this are summarised (count plus the first few names)."""


class TwentyQuestionsTeacher:
    """Plays 20-questions tasks to success and records them as SFT chat trajectories.

    Args:
        max_turns: the turn budget of the gym it plays.
        seed: base seed of tie-breaking between equally good questions and of phrasing variants.
    """

    name = "twenty_questions"

    def __init__(self, max_turns: int = 12, seed: int = 0) -> None:
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 2:
            raise ValueError(f"max_turns must be an int >= 2 (search + answer), got {max_turns!r}")
        self.max_turns = max_turns
        self.seed = seed

    def solve(self, task: TwentyQuestionsTask, seed: int | None = None) -> list[dict[str, str]]:
        """Chat messages of a whole episode on ``task`` (see :meth:`play`)."""
        return self.play(task, seed).messages

    def play(self, task: TwentyQuestionsTask, seed: int | None = None) -> TeacherEpisode:
        """Play one episode against a fresh :class:`TwentyQuestionsGym`; assistant turns are
        ``<think>reasoning</think>\\n<tool_call>{json}</tool_call>``, user turns the gym's feedback."""
        episode = _Episode(task, self.max_turns, random.Random(f"{self.seed}/{seed}/{task.id}"))
        return play_scripted(TwentyQuestionsGym(max_turns=self.max_turns), task, seed, episode)


def _names(entities: Sequence[Entity]) -> str:
    names = [e.name for e in entities]
    if len(names) <= _NAMES_SHOWN:
        return ", ".join(names)
    return f"{', '.join(names[:_NAMES_SHOWN])} and {len(names) - _NAMES_SHOWN} more"


class _Episode:
    """Belief state (surviving creatures, facts learned) and narration of one episode."""

    def __init__(self, task: TwentyQuestionsTask, max_turns: int, rng: random.Random) -> None:
        self.task = task
        self.max_turns = max_turns
        self.rng = rng
        self.survivors: list[Entity] | None = None  # None until the bestiary has been read
        self.facts: list[str] = []
        self.last_removed: list[Entity] = []

    def observe(self, choice: str, content: str, feedback: str) -> None:
        """Update the belief from the gym's ``feedback`` to the call (``choice``, ``content``)."""
        self.last_removed = []
        if choice == "search" and feedback.startswith("Attributes:"):
            self.survivors = list(self.task.table)  # the listing shows every row of this table
            return
        if self.survivors is None:
            return
        if choice == "action" and feedback.split("\n", 1)[0] in ("Yes.", "No."):
            yes = feedback.startswith("Yes.")
            question = parse_question(content)
            kept = [e for e in self.survivors if question.holds(e) == yes]
            self.facts.append(f"{content.rstrip('?')} -> {'yes' if yes else 'no'}")
        elif choice == "answer" and feedback.startswith("No"):
            kept = [e for e in self.survivors if e.name != content]
            self.facts.append(f"it is not {content}")
        else:
            return
        self.last_removed = [e for e in self.survivors if e not in kept]
        self.survivors = kept

    def _best_question(self) -> tuple[Question, int, int]:
        """The most even split of the survivors: (question, #yes, #no)."""
        assert self.survivors is not None
        scored = []
        for q in candidate_questions(self.survivors):
            yes = sum(q.holds(e) for e in self.survivors)
            scored.append(((min(yes, len(self.survivors) - yes), -len(q.values)), q, yes))
        best = max(key for key, _, _ in scored)
        _, question, yes = self.rng.choice([s for s in scored if s[0] == best])
        return question, yes, len(self.survivors) - yes

    def _memory(self) -> str:
        assert self.survivors is not None
        n = len(self.survivors)
        if not self.facts:
            return f"I have read the bestiary: {n} creatures, any of which could be the hidden one."
        lines = ["What I know so far: " + "; ".join(self.facts) + "."]
        if self.last_removed:
            lines.append(f"The last answer ruled out {len(self.last_removed)}: {_names(self.last_removed)}.")
        subject = "Only 1 creature fits" if n == 1 else f"{n} creatures still fit"
        lines.append(f"{subject} every answer: {_names(self.survivors)}.")
        return " ".join(lines)

    def decide(self, turn: int) -> tuple[str, str, str]:
        """(choice, content, reasoning) for 1-based ``turn``."""
        left = self.max_turns - turn + 1
        head = f"Turn {turn} of {self.max_turns}."
        size = len(self.task.table)
        if self.survivors is None:
            needed = math.ceil(math.log2(size)) if size > 1 else 0
            plan = self.rng.choice(
                (
                    f"I know nothing about the hidden creature yet, only that it is one of {size}. Plan for my "
                    f"{left} turns: read the bestiary (1 turn), then about {needed} yes/no questions that each "
                    "halve the candidates, then 1 guess once a single creature is left.",
                    f"No information yet: {size} possible creatures. Halving questions need about {needed} turns; "
                    f"with the search and the final guess that is {needed + 2} of my {left} turns, so first I "
                    "look the bestiary up.",
                )
            )
            return "search", "", f"{head} {plan}"
        memory = self._memory()
        if len(self.survivors) == 1:
            name = self.survivors[0].name
            plan = f"{name} is the only hypothesis left, so I answer now with 1 of my {left} remaining turns."
            return "answer", name, f"{head} {memory}\n\n{plan}"
        if left == 1 or not self.survivors:
            pool = self.survivors or list(self.task.table)
            name = pool[0].name
            plan = f"This is my last turn and {len(pool)} creatures remain, so I guess {name}."
            return "answer", name, f"{head} {memory}\n\n{plan}"
        question, yes, no = self._best_question()
        worst = max(yes, no)
        needed = 1 + (math.ceil(math.log2(worst)) if worst > 1 else 0)
        plan = (
            f"{left} turns left. The most even split is `{question.render()}` ({yes} yes / {no} no). "
            f"About {needed} question{'s' * (needed != 1)} should leave one creature, then 1 turn to answer, "
            f"leaving {max(0, left - needed - 1)} spare."
        )
        return "action", question.render(), f"{head} {memory}\n\n{plan}"
