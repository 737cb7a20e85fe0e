"""The Function gym (UserRL's FunctionGym): find a hidden rule f(a, b, c, d), then answer f(test case).

Choices: ``action`` with four integers returns f at that point (the test case itself is refused);
``search`` with content ``test`` reveals the test case; ``answer`` with a number is checked against the
expected result with absolute tolerance 1e-6 and, when right, gives reward 1 and ends the episode;
``finish`` ends it. Also here: the task type, the seeded task generator and UserRL's file loaders.
"""

from __future__ import annotations

import json
import math
import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bao_fast.envs.arith import RuleError, UndefinedResult, evaluate, format_number, parse_expression
from bao_fast.envs.base import Gym, Outcome, ToolCall, build_system_prompt
from bao_fast.envs.function_grammar import LEVELS, VARIABLES, templates_for

__all__ = [
    "FunctionGym",
    "FunctionTask",
    "RuleError",
    "UndefinedResult",
    "evaluate_rule",
    "generate_tasks",
    "load_userrl_functions",
    "load_userrl_split",
    "parse_inputs",
    "userrl_split",
]

MAX_EXPECTED = 1e6
"""Generated tasks whose answer exceeds this magnitude are rejected (they read as noise to a model)."""
TEST_FRACTION_BUCKETS = 5
"""Generated rules are split by a stable hash: one bucket in five is ``test``, the rest ``train``."""
USERRL_NUM_TRAIN = 460
USERRL_SPLIT_SEED = 42

_INT_TOKEN = re.compile(r"[+-]?\d{1,16}")


def evaluate_rule(rule: str, a: int | float, b: int | float, c: int | float, d: int | float) -> float:
    """f(a, b, c, d) for a rule over the variables a, b, c, d, by the safe evaluator (never ``eval``).

    Raises :class:`UndefinedResult` (e.g. division by zero) or :class:`RuleError` (disallowed syntax,
    exponent above 64, a value above 1e15 in magnitude).
    """
    return evaluate(rule, dict(zip(VARIABLES, (a, b, c, d), strict=True)))


@dataclass(frozen=True)
class FunctionTask:
    """One Function-gym task: the hidden ``rule`` over a, b, c, d, the ``test_case`` (4 ints) and
    ``expected_result`` = f(test_case)."""

    id: str
    rule: str
    test_case: tuple[int, int, int, int]
    expected_result: float

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"FunctionTask.id must be a non-empty str, got {self.id!r}")
        parse_expression(self.rule, set(VARIABLES))
        tc = self.test_case
        if not (isinstance(tc, tuple) and len(tc) == 4 and all(_is_int(x) for x in tc)):
            raise ValueError(f"FunctionTask.test_case must be a tuple of 4 ints, got {tc!r}")
        if not _is_real(self.expected_result) or not math.isfinite(self.expected_result):
            raise ValueError(f"FunctionTask.expected_result must be a finite number, got {self.expected_result!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def parse_inputs(content: str) -> tuple[int, int, int, int] | None:
    """Read four integers from an ``action`` content ("1 2 3 4", "1, 2, 3, 4", "(1, 2, 3, 4)"); None if
    the content is anything else."""
    tokens = content.strip().strip("()[]").replace(",", " ").split()
    if len(tokens) != 4 or not all(_INT_TOKEN.fullmatch(t) for t in tokens):
        return None
    a, b, c, d = (int(t) for t in tokens)
    return a, b, c, d


def _parse_answer(content: str) -> float | None:
    text = content.strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        try:
            value = evaluate(text, {})  # plain arithmetic such as "7/2"
        except RuleError:
            return None
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------- generator


def _split_of(rule: str) -> str:
    return "test" if zlib.crc32(rule.encode()) % TEST_FRACTION_BUCKETS == 0 else "train"


def generate_tasks(
    n: int, level: int | Sequence[int], seed: int, split: str | None = None, max_attempts_per_task: int = 200
) -> list[FunctionTask]:
    """``n`` distinct random rules of a difficulty ``level`` (1..5, or a sequence of levels drawn
    uniformly per task), each with a test case of four ints in 1..10 and its exact expected result.

    Rules whose value on the test case is undefined or above 1e6 in magnitude are redrawn. ``split``
    ('train' | 'test' | None) keeps only rules in that side of a fixed hash split of the rule text,
    so generated train and test sets never share a rule.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    levels = (level,) if isinstance(level, int) else tuple(level)
    if not levels or any(lv not in LEVELS for lv in levels):
        raise ValueError(f"level must be in {LEVELS} or a non-empty sequence of them, got {level!r}")
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
    rng = random.Random(f"function-tasks/{seed}/{levels}/{split}")
    tasks: list[FunctionTask] = []
    seen: set[str] = set()
    for _ in range(n * max_attempts_per_task):
        if len(tasks) == n:
            break
        lv = rng.choice(levels)
        template = rng.choice(templates_for(lv))
        rule = template.render(*template.sample(rng))
        test_case = (rng.randint(1, 10), rng.randint(1, 10), rng.randint(1, 10), rng.randint(1, 10))
        if rule in seen or (split is not None and _split_of(rule) != split):
            continue
        try:
            expected = evaluate_rule(rule, *test_case)
        except RuleError:
            continue
        if abs(expected) > MAX_EXPECTED:
            continue
        seen.add(rule)
        tasks.append(FunctionTask(f"gen-L{lv}-{seed}-{len(tasks):05d}", rule, test_case, expected))
    if len(tasks) < n:
        raise ValueError(f"n={n}: could only generate {len(tasks)} distinct rules at level {level!r}, split {split}")
    return tasks


# ------------------------------------------------------------------------------------------------ loaders


def _row_task(row: Any, index: int, verify: bool) -> FunctionTask:
    where = f"row {index}"
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
    missing = [k for k in ("id", "rule", "test_case", "expected_result") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    rid = row["id"]
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        raise ValueError(f"{where}: 'id' must be a str or int, got {rid!r}")
    where = f"row {index} (id {rid!r})"
    rule, test_case, expected = row["rule"], row["test_case"], row["expected_result"]
    if isinstance(test_case, str):
        test_case = parse_inputs(test_case)
    elif isinstance(test_case, list) and len(test_case) == 4 and all(_is_int(x) for x in test_case):
        test_case = tuple(test_case)
    else:
        test_case = None
    if test_case is None:
        raise ValueError(f"{where}: 'test_case' must be 4 integers, got {row['test_case']!r}")
    if isinstance(expected, str):
        try:
            expected = float(expected)
        except ValueError:
            raise ValueError(f"{where}: 'expected_result' is not a number: {expected!r}") from None
    if not _is_real(expected) or not math.isfinite(expected):
        raise ValueError(f"{where}: 'expected_result' must be a finite number, got {expected!r}")
    try:
        task = FunctionTask(str(rid), rule, test_case, float(expected))
        value = evaluate_rule(rule, *test_case) if verify else expected
    except RuleError as exc:
        raise ValueError(f"{where}: bad rule {rule!r}: {exc}") from None
    if verify and not math.isclose(value, expected, rel_tol=1e-6, abs_tol=1e-6):
        raise ValueError(f"{where}: rule {rule!r} gives {value!r} on {test_case}, but expected_result is {expected!r}")
    return replace(task, expected_result=float(value))  # answers are checked against f(test case) (BAO.md)


def load_userrl_functions(
    path: str | Path, ids: Sequence[str | int] | None = None, verify: bool = True
) -> list[FunctionTask]:
    """Load UserRL's ``functions.json``: a JSON list of ``{"id", "rule", "test_case", "expected_result"}``.

    Accepted per row: ``id`` str or int (kept as str); ``rule`` in the safe grammar; ``test_case`` a list
    of 4 ints or a string of 4 integers; ``expected_result`` a number or numeric string. With ``verify``
    the rule must reproduce ``expected_result`` on the test case (relative/absolute tolerance 1e-6), and the
    task keeps the rule's value, which answers are checked against; without it the file's value is kept.
    ``ids`` selects and orders rows. Raises ValueError naming the offending row or id.
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of function rows, got {type(data).__name__}")
    tasks: dict[str, FunctionTask] = {}
    for i, row in enumerate(data):
        task = _row_task(row, i, verify)
        if task.id in tasks:
            raise ValueError(f"row {i}: duplicate id {task.id!r}")
        tasks[task.id] = task
    if ids is None:
        return list(tasks.values())
    unknown = [i for i in ids if str(i) not in tasks]
    if unknown:
        raise ValueError(f"ids: {len(unknown)} not in {path}, e.g. {unknown[:5]}")
    return [tasks[str(i)] for i in ids]


def load_userrl_split(path: str | Path) -> dict[str, list[str]]:
    """Read a split file: a JSON object ``{"train": [ids...], "test": [ids...]}`` (ids str or int; other
    keys such as "val" are kept too). Raises ValueError when a list is malformed or ids overlap."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not {"train", "test"} <= data.keys():
        raise ValueError(f"{path}: expected an object with 'train' and 'test' id lists")
    split: dict[str, list[str]] = {}
    for name, ids in data.items():
        if not isinstance(ids, list) or not all(isinstance(i, str | int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"{path}: '{name}' must be a list of str/int ids")
        split[name] = [str(i) for i in ids]
    owners: dict[str, str] = {}
    for name, ids in split.items():
        for i in ids:
            if owners.setdefault(i, name) != name:
                raise ValueError(f"{path}: id {i!r} is in both '{owners[i]}' and '{name}'")
    return split


def userrl_split(
    tasks: Sequence[FunctionTask], num_train: int = USERRL_NUM_TRAIN, seed: int = USERRL_SPLIT_SEED
) -> tuple[list[FunctionTask], list[FunctionTask]]:
    """UserRL's train/test split of ``functions.json``: numpy's legacy ``shuffle`` seeded with 42 over the
    file order, the first 460 rows train and the rest (78 of 538) test."""
    order = np.arange(len(tasks))
    np.random.RandomState(seed).shuffle(order)
    shuffled = [tasks[i] for i in order]
    return shuffled[:num_train], shuffled[num_train:]


# ---------------------------------------------------------------------------------------------------- gym

_DESCRIPTION = (
    "Function is a rule-guessing game. A hidden function f(a, b, c, d) maps four numbers to one output "
    "using only +, -, *, / and powers, and it uses all four inputs. Query it with inputs of your choice, "
    "deduce the rule, then apply it to the test case."
)
_CHOICES = {
    "action": "`content` is four integers separated by spaces, e.g. `1 2 3 4`; the environment returns "
    "f at that point. The test case itself cannot be queried.",
    "search": "`content` must be `test`; the environment reveals the test case.",
    "answer": "`content` is one number: your value of f on the test case. You may answer more than once.",
}
_NOTES = (
    "Start with small numbers and vary one input at a time to isolate its effect; the rule may combine "
    "the inputs in any order.",
    "Keep track of every observation, keep only the hypotheses consistent with all of them, and answer "
    "when they agree on the test case.",
)
_OPENING = "The hidden function is fixed. Start your trials whenever you are ready."


class FunctionGym(Gym):
    """UserRL's Function gym. Tasks are :class:`FunctionTask`; reward 1 for a correct answer, else 0."""

    name = "function"
    choices = ("action", "search", "answer")

    def __init__(self, max_turns: int = 15, correct_reward: float = 1.0, tolerance: float = 1e-6) -> None:
        super().__init__(max_turns)
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
        self.correct_reward = float(correct_reward)
        self.tolerance = float(tolerance)
        self.task: FunctionTask | None = None

    def _reset(self, task: Any) -> list[dict[str, str]]:
        if not isinstance(task, FunctionTask):
            raise TypeError(f"task must be a FunctionTask, got {type(task).__name__}")
        self.task = task
        system = build_system_prompt(_DESCRIPTION, _CHOICES, _NOTES, self.max_turns)
        return [{"role": "system", "content": system}, {"role": "user", "content": _OPENING}]

    def _act(self, call: ToolCall) -> Outcome:
        assert self.task is not None
        if call.choice == "action":
            return self._query(call.content)
        if call.choice == "search":
            if call.content.strip().strip("'\"`").lower() != "test":
                return Outcome("Invalid search: the only thing you can search for is `test`.")
            a, b, c, d = self.task.test_case
            return Outcome(f"The test case is ({a}, {b}, {c}, {d}): answer with f({a}, {b}, {c}, {d}).")
        value = _parse_answer(call.content)
        if value is None:
            return Outcome("Invalid answer: `answer` takes one number.")
        if abs(value - self.task.expected_result) <= self.tolerance:
            return Outcome("Correct! Your answer matches f on the test case.", self.correct_reward, True, True)
        return Outcome("Incorrect answer.")

    def _query(self, content: str) -> Outcome:
        assert self.task is not None
        inputs = parse_inputs(content)
        if inputs is None:
            return Outcome("Invalid action: `action` takes exactly four integers separated by spaces, e.g. `1 2 3 4`.")
        point = ", ".join(str(x) for x in inputs)
        if inputs == self.task.test_case:
            return Outcome(f"You cannot query the test case ({point}); submit your value with `answer`.")
        try:
            value = evaluate_rule(self.task.rule, *inputs)
        except UndefinedResult:
            return Outcome(f"f({point}) is undefined.")
        except RuleError:
            return Outcome(f"f({point}) is too large to compute; use smaller inputs.")
        return Outcome(f"f({point}) = {format_number(value)}")
