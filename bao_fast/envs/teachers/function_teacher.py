"""Scripted teacher for the Function gym: solves tasks by hypothesis elimination and writes BAO's two
behaviours (retrospective reasoning, prospective planning) into ``<think>`` blocks.

Strategy, played against a real :class:`FunctionGym` through its text interface only:

1. ``search`` the test case first, so that only hypotheses that disagree on it need separating.
2. Hypothesis space: every rule of the generator's grammar at all levels (~7.8k rules, evaluated
   vectorised). Each turn, probe the point (ints 1..10, never the test case) that minimises the expected
   number of distinct test-case predictions left among the surviving rules, preferring one that changes
   a single input of the previous probe when that is nearly as informative (UserRL's advice, and its
   effect can be narrated); drop every rule that disagrees with the observed value.
3. ``answer`` as soon as all survivors agree on the test case, or when the budget runs out (then the
   best-supported value; a wrong answer eliminates the rules that predicted it). If no rule survives the
   task is outside the grammar and the teacher ends the episode with ``finish`` instead of guessing.

Two narration styles make the same decisions: ``full`` (default) writes the whole memory (every observation,
example surviving rules, the spread of test-case predictions) and a reasoned plan; ``concise`` writes the
same two behaviours in two short lines, ``Known: <latest observation>; <N> rules fit, <M> answers
possible.`` and ``Plan: <k> turns left: <next move>.``, a format a tiny model can learn from few examples.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

from bao_fast.envs.arith import format_number
from bao_fast.envs.function import FunctionGym, FunctionTask
from bao_fast.envs.function_grammar import TEMPLATES, VARIABLES, RuleTemplate
from bao_fast.envs.teachers.episode import TeacherEpisode, play_scripted

__all__ = ["FunctionTeacher", "TeacherEpisode", "TeacherStyle", "solve_rate"]

TeacherStyle = Literal["full", "concise"]
_STYLES: tuple[str, ...] = ("full", "concise")

_RESULT = re.compile(r"^f\(([^)]*)\) (?:= (\S+)|(is undefined|is too large))")
_TEST_CASE = re.compile(r"The test case is \((-?\d+), (-?\d+), (-?\d+), (-?\d+)\)")
_UNDEFINED = math.nan


class _Hypotheses:
    """The rule grammar as a flat, vectorised hypothesis space."""

    def __init__(self, templates: Sequence[RuleTemplate]) -> None:
        self.templates = tuple(templates)
        self.instances = [list(t.instances()) for t in self.templates]
        self.owner = np.concatenate([np.full(len(inst), i) for i, inst in enumerate(self.instances)])
        self.local = np.concatenate([np.arange(len(inst)) for inst in self.instances])

    def __len__(self) -> int:
        return len(self.owner)

    def values(self, points: np.ndarray) -> np.ndarray:
        """f of every hypothesis at ``points`` int[C, 4] -> float64[H, C] (NaN where undefined)."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 4)
        return np.concatenate([t.evaluate_all(pts) for t in self.templates], axis=0)

    def rule(self, index: int) -> str:
        t = int(self.owner[index])
        return self.templates[t].render(*self.instances[t][int(self.local[index])])


def _key(values: np.ndarray) -> np.ndarray:
    """Hashable comparison keys: values rounded to 1e-6, NaN (undefined) mapped to +inf."""
    return np.where(np.isfinite(values), np.round(values, 6), np.inf)


def _matches(predicted: np.ndarray, observed: float) -> np.ndarray:
    if math.isnan(observed):
        return np.isnan(predicted)
    return np.isclose(predicted, observed, rtol=1e-9, atol=1e-9)


def _split_scores(probe_keys: np.ndarray, test_ids: np.ndarray, num_test: int) -> tuple[np.ndarray, np.ndarray]:
    """For each candidate probe: the expected number of distinct test predictions left after observing it
    (lower is better) and the size of the largest group of rules it cannot tell apart.

    ``probe_keys`` float64[C, N] (:func:`_key` of N rules at C points); ``test_ids`` int64[N] in
    [0, num_test): the rules' test-case predictions as dense ids. Returns float64[C], int64[C].
    """
    c, n = probe_keys.shape
    order = np.argsort(probe_keys, axis=1)
    ordered = np.take_along_axis(probe_keys, order, axis=1)
    starts = np.ones_like(ordered, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = np.cumsum(starts, axis=1) - 1 + np.arange(c)[:, None] * n  # globally unique group ids, [C, N]
    pairs = np.sort(group * num_test + test_ids[order], axis=1)
    new_pair = np.ones_like(pairs, dtype=bool)
    new_pair[:, 1:] = pairs[:, 1:] != pairs[:, :-1]
    distinct = np.bincount(pairs[new_pair] // num_test, minlength=n * c)
    sizes = np.bincount(group.ravel(), minlength=n * c)
    scores = distinct[group].sum(axis=1) / n
    return scores, sizes.reshape(c, n).max(axis=1)


class FunctionTeacher:
    """Plays Function-gym tasks to success and records them as SFT chat trajectories.

    Args:
        max_turns: the turn budget of the gym it plays (15 in BAO/UserRL).
        seed: base seed of the candidate probe points and of the phrasing variants.
        num_candidates: random probe points considered per episode.
        style: ``"full"`` or ``"concise"`` narration of the ``<think>`` blocks (same decisions).
    """

    name = "function"

    def __init__(
        self, max_turns: int = 15, seed: int = 0, num_candidates: int = 48, style: TeacherStyle = "full"
    ) -> None:
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 2:
            raise ValueError(f"max_turns must be an int >= 2 (search + answer), got {max_turns!r}")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates!r}")
        if style not in _STYLES:
            raise ValueError(f"style must be one of {list(_STYLES)}, got {style!r}")
        self.max_turns = max_turns
        self.seed = seed
        self.num_candidates = num_candidates
        self.style = style
        self.hypotheses = _Hypotheses(TEMPLATES)

    def solve(self, task: FunctionTask, seed: int | None = None) -> list[dict[str, str]]:
        """Chat messages of a whole episode on ``task`` (see :meth:`play`)."""
        return self.play(task, seed).messages

    def play(self, task: FunctionTask, seed: int | None = None) -> TeacherEpisode:
        """Play one episode against a fresh :class:`FunctionGym`; assistant turns are
        ``<think>reasoning</think>\\n<tool_call>{json}</tool_call>``, user turns the gym's feedback."""
        episode = _Episode(self, f"{self.seed}/{seed}/{task.id}")
        return play_scripted(FunctionGym(max_turns=self.max_turns), task, seed, episode)


class _Episode:
    """Belief state and narration of one episode."""

    def __init__(self, teacher: FunctionTeacher, seed: str) -> None:
        self.teacher = teacher
        self.hyp = teacher.hypotheses
        self.rng = random.Random(f"{seed}/probes")  # decisions: independent of the narration style
        self.phrasing = random.Random(f"{seed}/phrasing")
        self.alive = np.ones(len(self.hyp), dtype=bool)
        self.test_case: tuple[int, ...] | None = None
        self.test_pred: np.ndarray | None = None
        self.pool: list[tuple[int, ...]] = []
        self.values: dict[tuple[int, ...], np.ndarray] = {}
        self.probes: list[tuple[tuple[int, ...], float]] = []
        self.observations: list[str] = []
        self.last_refuted: int | None = None

    # ------------------------------------------------------------------------------------------ belief

    def observe(self, choice: str, content: str, feedback: str) -> None:
        before = int(self.alive.sum())
        if choice == "search" and (m := _TEST_CASE.search(feedback)):
            self.test_case = tuple(int(x) for x in m.groups())
            self.test_pred = self.hyp.values(np.asarray([self.test_case]))[:, 0]
            self._make_pool()
            self.observations.append(f"the test case is {self.test_case}")
        elif choice == "action" and (m := _RESULT.match(feedback)):
            point = tuple(int(x) for x in m.group(1).split(","))
            observed = float(m.group(2)) if m.group(2) is not None else _UNDEFINED
            self.alive &= _matches(self._values_at([point])[0], observed)
            shown = f"= {m.group(2)}" if m.group(2) is not None else m.group(3)
            self.observations.append(f"f{point} {shown}{self._delta(point, observed)}")
            self.probes.append((point, observed))
        elif choice == "answer" and feedback.startswith("Incorrect") and self.test_pred is not None:
            self.alive &= ~_matches(self.test_pred, float(content))
            self.observations.append(f"answer {content} was wrong")
        self.last_refuted = before - int(self.alive.sum())

    def _delta(self, point: tuple[int, ...], observed: float) -> str:
        """How f moved since an earlier probe that differs from ``point`` in one input only."""
        for prev, value in reversed(self.probes):
            diff = [i for i in range(4) if prev[i] != point[i]]
            if len(diff) == 1 and math.isfinite(value) and math.isfinite(observed):
                i = diff[0]
                return (
                    f" (changing only {VARIABLES[i]} from {prev[i]} to {point[i]} moved f by "
                    f"{format_number(observed - value)})"
                )
        return ""

    def _make_pool(self) -> None:
        points = {tuple(self.rng.randint(1, 10) for _ in range(4)) for _ in range(4 * self.teacher.num_candidates)}
        points.discard(self.test_case)
        ordered = sorted(points)
        self.rng.shuffle(ordered)
        self.pool = ordered[: self.teacher.num_candidates]

    def _values_at(self, points: list[tuple[int, ...]], rows: np.ndarray | None = None) -> np.ndarray:
        """The values of the rules selected by ``rows`` (bool[H], default all) at ``points`` ->
        float64[len(points), rows], memoised per point."""
        todo = [p for p in dict.fromkeys(points) if p not in self.values]
        if todo:
            table = self.hyp.values(np.asarray(todo))
            self.values.update({p: table[:, j] for j, p in enumerate(todo)})
        return np.stack([self.values[p] if rows is None else self.values[p][rows] for p in points])

    def _variations(self) -> list[tuple[int, ...]]:
        """Points that change one input of the last probe (inputs 1..10)."""
        if not self.probes:
            return []
        last = self.probes[-1][0]
        return [(*last[:i], v, *last[i + 1 :]) for i in range(4) for v in range(1, 11) if v != last[i]]

    def _predictions(self) -> list[tuple[float, int]]:
        """(test-case value, number of surviving rules predicting it), most supported first."""
        assert self.test_pred is not None
        preds = self.test_pred[self.alive]
        keys, first, counts = np.unique(_key(preds), return_index=True, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        return [(float(preds[first[i]]), int(counts[i])) for i in order if np.isfinite(keys[i])]

    def _best_probe(self) -> tuple[tuple[int, ...], float, int] | None:
        """(point, expected distinct predictions left, worst-case group) of the probe to make, or None when
        no point separates rules that disagree on the test case.

        A probe varying one input of the last one is preferred when it is nearly as informative as the
        best point of the pool (within 25% or 0.25 expected predictions): its effect is readable.
        """
        assert self.test_pred is not None
        probed = {p for p, _ in self.probes} | {self.test_case}
        variations = [p for p in self._variations() if p not in probed]
        pool = [p for p in self.pool if p not in probed and p not in variations]
        points = variations + pool
        if not points:
            return None
        _, test_ids = np.unique(_key(self.test_pred[self.alive]), return_inverse=True)
        current = int(test_ids.max()) + 1
        scores, worst = _split_scores(_key(self._values_at(points, self.alive)), test_ids, current)
        scored = [(float(scores[j]), int(worst[j]), j) for j in range(len(points))]
        useful = [x for x in scored if x[0] < current - 1e-9]
        if not useful:
            return None
        best = min(useful)
        near = [x for x in useful[: len(variations)] if x[0] <= max(1.25 * best[0], best[0] + 0.25)]
        score, worst, j = min(near) if near else best
        return points[j], score, worst

    # --------------------------------------------------------------------------------------- narration

    def _memory(self) -> str:
        alive = int(self.alive.sum())
        if not self.observations:
            return (
                f"Nothing observed yet. My hypotheses: {len(self.hyp)} candidate rules f(a, b, c, d) built "
                "from sums, products, quotients and squares of a, b, c, d with small integer coefficients."
            )
        lines = ["What I know so far: " + "; ".join(self.observations) + "."]
        if self.last_refuted:
            lines.append(f"The last result ruled out {self.last_refuted} rules.")
        if alive == 0:
            return " ".join(lines)
        examples = [f"`{self.hyp.rule(int(i))}`" for i in np.flatnonzero(self.alive)[:3]]
        subject = "1 rule is" if alive == 1 else f"{alive} rules are"
        lines.append(f"{subject} consistent with every observation, e.g. {', '.join(examples)}.")
        return " ".join(lines)

    def _prediction_summary(self, preds: list[tuple[float, int]]) -> str:
        shown = ", ".join(f"{format_number(v)} ({n} rule{'s' * (n != 1)})" for v, n in preds[:3])
        extra = len(preds) - 3
        more = f" and {extra} other value{'s' * (extra != 1)}" if extra > 0 else ""
        return f"On the test case they predict {len(preds)} different values: {shown}{more}."

    def decide(self, turn: int) -> tuple[str, str, str]:
        """(choice, content, reasoning) for 1-based ``turn``."""
        total = self.teacher.max_turns
        left = total - turn + 1
        head = f"Turn {turn} of {total}."
        if self.test_case is None:
            if self.teacher.style == "concise":
                return "search", "test", self._concise(turn, "search the test case, then probe, then answer")
            plan = self.phrasing.choice(
                (
                    f"Plan for the {left} turns: first fetch the test case (1 turn), so I only have to separate "
                    "rules that disagree on it; then probe with small inputs and answer as soon as the "
                    "surviving rules agree, keeping at least one turn for the answer.",
                    f"{left} turns available. Retrieve the test case now; every later probe will be chosen to "
                    "split the rules that still disagree on it, and I will keep one turn in reserve to answer.",
                )
            )
            return "search", "test", f"{head} {self._memory()}\n\n{plan}"
        preds = self._predictions() if self.alive.any() else []
        concise = self.teacher.style == "concise"
        if not preds:
            if concise:
                return "finish", "", self._concise(turn, "no rule fits, so finish instead of guessing", preds)
            plan = (
                f"No rule in my hypothesis space fits all observations and gives a defined value on the test "
                f"case, so the hidden rule is outside the forms I can identify with the {left} remaining turns. "
                "Guessing would only waste the user's effort, so I end the episode."
            )
            return "finish", "", f"{head} {self._memory()}\n\n{plan}"
        if len(preds) == 1:
            value = format_number(preds[0][0])
            if concise:
                return "answer", value, self._concise(turn, f"answer {value} now", preds)
            plan = (
                f"All surviving rules agree: f{self.test_case} = {value}. Answering now uses 1 of the "
                f"{left} remaining turns; further probes cannot change the prediction."
            )
            return "answer", value, f"{head} {self._memory()}\n\n{plan}"
        probe = self._best_probe() if left > 1 else None
        if probe is None:
            value, support = format_number(preds[0][0]), preds[0][1]
            if concise:
                return "answer", value, self._concise(turn, f"answer the likeliest value {value}", preds)
            reason = "this is the last turn" if left == 1 else "no probe I can make separates these rules any further"
            plan = (
                f"{reason[0].upper()}{reason[1:]}, so I submit the best-supported value {value} "
                f"({support} of {int(self.alive.sum())} rules); if it is wrong, those rules are refuted."
            )
            return "answer", value, f"{head} {self._memory()} {self._prediction_summary(preds)}\n\n{plan}"
        point, score, worst = probe
        groups = max(1.0, len(preds) / max(score, 1.0))
        needed = max(1, math.ceil(math.log(len(preds)) / math.log(groups + 1.0)))
        content = " ".join(str(x) for x in point)
        if concise:
            return "action", content, self._concise(turn, f"probe f{point}, then answer", preds)
        plan = (
            f"{left} turns left. Probe f{point}: it leaves about {score:.1f} candidate answers on average "
            f"and at most {worst} indistinguishable rules. I expect {needed} probe{'s' * (needed != 1)} "
            f"before the rules agree, then 1 turn to answer, leaving {max(0, left - needed - 1)} spare."
        )
        return "action", content, f"{head} {self._memory()} {self._prediction_summary(preds)}\n\n{plan}"

    def _concise(self, turn: int, move: str, preds: list[tuple[float, int]] | None = None) -> str:
        """Two-line ``<think>`` body: ``Known:`` (latest observation, surviving rules and the answers they
        allow) and ``Plan:`` (turns left including this one, and the next ``move``)."""
        latest = self.observations[-1] if self.observations else "nothing yet"
        alive = int(self.alive.sum())
        if alive == 0:
            fit = "no rule fits"
        else:
            fit = "1 rule fits" if alive == 1 else f"{alive} rules fit"
            if preds is not None:
                fit += f", {len(preds)} answer{'s' * (len(preds) != 1)} possible"
        left = self.teacher.max_turns - turn + 1
        budget = "last turn" if left == 1 else f"{left} turns left"
        return f"Known: {latest}; {fit}.\nPlan: {budget}: {move}."


def solve_rate(teacher: FunctionTeacher, tasks: Sequence[FunctionTask]) -> float:
    """Fraction of ``tasks`` the teacher solves within its budget."""
    if not tasks:
        raise ValueError("tasks must be non-empty")
    return sum(teacher.play(task, seed=i).success for i, task in enumerate(tasks)) / len(tasks)
