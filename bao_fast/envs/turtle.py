"""UserRL's Turtle Soup gym: lateral-thinking puzzles with an LLM user and judge (BAO.md: T = 15 turns).

The agent is told a puzzling story (the *surface*); the user knows what really happened (the *bottom*).
``action`` asks a yes/no question, answered from the bottom and reduced to ``Yes.``, ``No.`` or ``Maybe.`` (so
the user can never leak the solution); ``answer`` tells the agent's explanation, which the judge scores against
the puzzle's weighted key points (0, 0.5 or 1 each). The explanation's score is Σ weight·judgment / Σ weight;
the reward is the increase of the best score so far (an episode's rewards sum to its best score), and a score
of at least ``success_threshold`` solves the puzzle and ends the episode. The feedback names the key points
the explanation fully meets. A judge reply that cannot be read scores 0.

Tasks: the built-in puzzles, or UserRL's story file: a JSON list of ``{"title"?, "description" (surface),
"ground_truth" (bottom), "evaluation_criteria": [{"statement", "score" (weight)}]}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from bao_fast.envs.base import Outcome, build_system_prompt
from bao_fast.envs.llm_gyms import Exchange, LLMGym, _load_rows, _shuffle_take, _split
from bao_fast.envs.user_client import UserSimulatorClient

__all__ = ["TURTLE_JUDGE_PROMPT", "TURTLE_USER_PROMPT", "TurtleGym", "TurtleTask", "parse_scores", "turtle_tasks"]

TURTLE_USER_PROMPT = (
    "You host a lateral-thinking puzzle. The player was told this story:\n{surface}\n"
    "What really happened (secret):\n{bottom}\n"
    "The player asks yes/no questions. Answer each truthfully according to what really happened, with exactly "
    "one word: Yes, No, or Maybe (when the secret does not decide it or it does not matter). Never reveal the "
    "secret."
)
TURTLE_JUDGE_PROMPT = (
    "You grade explanations of a lateral-thinking puzzle.\nStory told to the player:\n{surface}\n"
    "What really happened:\n{bottom}\nKey points:\n{points}\n"
    "For each numbered key point, score the player's explanation: 1 if it states the point, 0.5 if it is "
    "partly right, 0 if it misses or contradicts it. Reply with JSON only, one score per key point in order: "
    '{{"scores": [1, 0.5, 0]}}'
)
_DESCRIPTION = (
    "Turtle Soup: the user tells you a puzzling story and knows what really happened. Find the hidden "
    "explanation by asking yes/no questions, then tell the user the whole story as you understand it."
)
_CHOICES = {
    "action": "`content` is one yes/no question about the story; the user answers Yes, No or Maybe.",
    "answer": "`content` is your explanation of what really happened. It is scored by the key points of the "
    "true story it covers; a (nearly) complete explanation ends the game.",
}
_NOTES = ("Question the strange details of the story first; explain only once the answers fit together.",)
_VALID_SCORES = (0.0, 0.5, 1.0)


@dataclass(frozen=True)
class TurtleTask:
    """A puzzle: the ``surface`` the agent is told, the ``bottom`` (what really happened) and its key
    ``points``: ``(statement, weight)`` pairs with weights > 0."""

    id: str
    surface: str
    bottom: str
    points: tuple[tuple[str, float], ...]

    def __post_init__(self) -> None:
        for name in ("id", "surface", "bottom"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"TurtleTask.{name} must be a non-empty str, got {value!r}")
        ok = bool(self.points) and all(
            isinstance(s, str) and s.strip() and isinstance(w, int | float) and not isinstance(w, bool) and w > 0
            for s, w in self.points
        )
        if not ok:
            raise ValueError(f"TurtleTask.points must be non-empty (statement, weight > 0) pairs, got {self.points!r}")


_TURTLE = (
    ("A man pushes his car up to a hotel and at once knows that he is bankrupt.",
     "He is playing Monopoly. His token is the car; it landed on a property with a hotel on it, and he cannot "
     "pay the rent.",
     (("It is a board game (Monopoly), not real life", 0.5),
      ("His token landed on a space with a hotel whose rent he cannot pay", 0.5))),
    ("A woman asks a bartender for a glass of water. He pulls out a gun and points it at her. She thanks him "
     "and leaves without the water.",
     "She had hiccups and wanted water to stop them. The bartender scared them away with the gun, so she no "
     "longer needed the water.",
     (("She had hiccups", 0.5), ("The fright from the gun cured the hiccups, so the water was not needed", 0.5))),
    ("A man lives on the tenth floor. Every evening he rides the lift to the seventh floor and walks up the rest, "
     "except on rainy days, when he rides all the way.",
     "He is too short to reach the button for the tenth floor. On rainy days he carries an umbrella and presses "
     "the button with it.",
     (("He is too short to reach the higher buttons", 0.6), ("On rainy days he presses it with his umbrella", 0.4))),
    ("A man lies dead in the middle of a field. Next to him is an unopened package. Nobody else is around.",
     "He jumped from a plane. The package is his parachute, which failed to open.",
     (("He fell from an aircraft", 0.5), ("The package is a parachute that did not open", 0.5))),
    ("Two bodies lie on the floor of a room, among broken glass and a puddle of water.",
     "They are goldfish. Their bowl was knocked off a shelf and broke.",
     (("The dead are fish, not people", 0.6), ("Their glass bowl fell and broke", 0.4))),
    ("A woman shoots her husband, holds him under water for five minutes and then hangs him. An hour later they "
     "go out to dinner together.",
     "She is a photographer. She took a picture of him, developed it in a bath of liquid and hung the print up "
     "to dry.",
     (("'Shooting' him means taking a photograph", 0.5),
      ("The photo was developed in liquid and hung up to dry", 0.5))),
    ("A boy is hurt in a car crash and rushed to hospital. The surgeon looks at him and says: 'I cannot operate "
     "on this boy, he is my son.' The surgeon is not his father.",
     "The surgeon is the boy's mother.",
     (("The surgeon is the boy's mother", 1.0),)),
    ("A man drinks some punch at a party and leaves early. Everyone who drank the punch later is poisoned.",
     "The poison was frozen inside the ice cubes. He drank while the ice was still solid; later it melted into "
     "the punch.",
     (("The poison was in the ice cubes", 0.6), ("He drank before the ice had melted", 0.4))),
    ("A man is found dead in a cabin on a mountainside, surrounded by other bodies.",
     "The cabin is the passenger cabin of an airliner that crashed into the mountain.",
     (("The cabin is an aircraft's cabin", 0.6), ("The plane crashed into the mountain", 0.4))),
    ("A rider arrives in town on Friday, stays three days, and leaves on Friday.",
     "His horse is called Friday.",
     (("Friday is the name of his horse", 1.0),)),
    ("Anna was born in 2000, yet in 2024 she celebrated only her sixth birthday.",
     "She was born on 29 February, and she only celebrates on the real date, which comes in leap years only.",
     (("She was born on 29 February", 0.6), ("The date exists only in leap years, so she has had six", 0.4))),
    ("A man in black walks along an unlit country road. A car with its headlights off comes towards him and stops "
     "in time. How did the driver see him?",
     "It was the middle of the day.",
     (("It was daytime", 1.0),)),
)  # fmt: skip


def turtle_tasks(
    split: str = "all", n: int | None = None, level: Any = None, seed: int = 0, path: str | None = None
) -> list[TurtleTask]:
    """Turtle Soup tasks: the 12 built-in puzzles or, with ``path``, UserRL's story file (module docstring);
    every fourth one is ``test``, the rest ``train`` (the two never share a puzzle). Shuffled by ``seed``; the
    first ``n`` (default all). ``level`` is unused (registry signature)."""
    if path is not None:
        rows = _load_rows(path, ("description", "ground_truth", "evaluation_criteria"))
        tasks = [
            TurtleTask(str(r.get("title") or f"turtle-{i:03d}"), r["description"], r["ground_truth"],
                       tuple((c["statement"], c["score"]) for c in r["evaluation_criteria"]))
            for i, r in enumerate(rows)
        ]  # fmt: skip
    else:
        tasks = [TurtleTask(f"ts-{i:03d}", s, b, p) for i, (s, b, p) in enumerate(_TURTLE)]
    return _shuffle_take(_split(tasks, split, every=4), n, f"turtle/{seed}")


def _judgment(item: Any) -> float | None:
    """A key point's score: 0, 0.5 or 1 given as a number, a numeric string or ``{"score": ...}``."""
    if isinstance(item, dict):
        item = item.get("score")
    if isinstance(item, str) and re.fullmatch(r"\s*(0|1|0?\.5|1\.0|0\.0)\s*", item):
        item = float(item)
    if isinstance(item, int | float) and not isinstance(item, bool) and item in _VALID_SCORES:  # no float(): a
        return float(item)  # JSON integer beyond float's range would raise
    return None


def parse_scores(reply: str, num_points: int) -> list[float] | None:
    """Per-key-point scores in a judge reply: the first JSON object whose ``"scores"`` list has one valid score
    (0, 0.5 or 1) per point. None when the reply holds no such object."""
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r"\{", reply)):
        try:
            obj, _ = decoder.raw_decode(reply, start)
        except (ValueError, RecursionError):  # bad JSON, a number beyond int()'s digit limit, deep nesting
            continue
        scores = obj.get("scores") if isinstance(obj, dict) else None
        if isinstance(scores, list) and len(scores) == num_points:
            judged = [_judgment(s) for s in scores]
            if all(j is not None for j in judged):
                return judged  # type: ignore[return-value]
    return None


class TurtleGym(LLMGym):
    """UserRL's Turtle Soup gym; tasks are :class:`TurtleTask`. Rewards sum to the best explanation's score.

    Args:
        client, max_turns, ...: as :class:`~bao_fast.envs.llm_gyms.LLMGym` (15 turns, as in BAO.md).
        success_threshold: the score (in (0, 1]) that solves the puzzle.
    """

    name = "turtle"
    choices = ("action", "answer")

    def __init__(
        self, client: UserSimulatorClient, max_turns: int = 15, success_threshold: float = 0.9, **kwargs: Any
    ) -> None:
        kwargs.setdefault("judge_max_tokens", 96)
        super().__init__(client, max_turns, **kwargs)
        if not 0 < success_threshold <= 1:
            raise ValueError(f"success_threshold must be in (0, 1], got {success_threshold!r}")
        self.success_threshold = float(success_threshold)
        self.task: TurtleTask | None = None
        self.best_score = 0.0

    def _reset(self, task: Any) -> list[dict[str, str]]:
        if not isinstance(task, TurtleTask):
            raise TypeError(f"task must be a TurtleTask, got {type(task).__name__}")
        self.task = task
        self.best_score = 0.0
        self._start()
        system = build_system_prompt(_DESCRIPTION, _CHOICES, _NOTES, self.max_turns)
        opening = f"Here is the story:\n{task.surface}\nWhat really happened? Ask me yes/no questions."
        return [{"role": "system", "content": system}, {"role": "user", "content": opening}]

    def _question(self, question: str) -> Outcome:
        assert self.task is not None
        return self._yes_no(TURTLE_USER_PROMPT.format(surface=self.task.surface, bottom=self.task.bottom), question)

    def _answer(self, explanation: str) -> Outcome:
        assert self.task is not None
        points = self.task.points
        numbered = "\n".join(f"{i}. {statement}" for i, (statement, _) in enumerate(points, 1))
        system = TURTLE_JUDGE_PROMPT.format(surface=self.task.surface, bottom=self.task.bottom, points=numbered)
        reply = self._judge(system, f"Player's explanation: {explanation}")
        judged = parse_scores(reply, len(points))
        self.exchanges.append(Exchange("judge", explanation, reply, None if judged is None else str(judged)))
        judged = judged or [0.0] * len(points)
        score = sum(w * j for (_, w), j in zip(points, judged, strict=True)) / sum(w for _, w in points)
        reward = max(0.0, score - self.best_score)
        self.best_score = max(self.best_score, score)
        if self.best_score >= self.success_threshold:
            return Outcome(f"Yes, that is what happened! {self.task.bottom}", reward, terminated=True, success=True)
        covered = [statement for (statement, _), j in zip(points, judged, strict=True) if j == 1.0]
        if not covered:
            return Outcome("Your explanation does not get any key point of the story right yet.", reward)
        lines = "\n".join(f"- {s}" for s in covered)
        return Outcome(f"Your explanation gets these key points right:\n{lines}\nBut there is more to it.", reward)
