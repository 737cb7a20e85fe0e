"""Name -> gym / task source / teacher registries, and the ``make_*`` factories the trainer and CLI use.

Adding a gym: put its class in :data:`GYMS`, a task source ``(split, n, level, seed, path) -> list`` in
:data:`TASKS` and, if it has one, a teacher factory in :data:`TEACHERS`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bao_fast.envs.base import Gym
from bao_fast.envs.function import (
    FunctionGym,
    FunctionTask,
    generate_tasks,
    load_userrl_functions,
    load_userrl_split,
    userrl_split,
)
from bao_fast.envs.llm_gyms import IntentionGym, LLMGym, TelepathyGym, intention_tasks, telepathy_tasks
from bao_fast.envs.teachers.function_teacher import FunctionTeacher
from bao_fast.envs.teachers.llm_teacher import LLMTeacher
from bao_fast.envs.teachers.twenty_questions_teacher import TwentyQuestionsTeacher
from bao_fast.envs.turtle import TurtleGym, turtle_tasks
from bao_fast.envs.twenty_questions import TwentyQuestionsGym, twenty_questions_tasks

SPLITS = ("train", "test", "all")


def function_tasks(split: str, n: int | None, level: int | tuple[int, ...], seed: int, path: str | None) -> list:
    """Function-gym tasks. Without ``path``: ``n`` generated tasks of ``level`` (train and test never
    share a rule). With ``path``: UserRL's data, either a ``functions.json`` file (split as UserRL does,
    460 train / 78 test) or a directory holding ``functions.json`` and optionally ``split.json``
    (``{"train": [ids], "test": [ids]}``); ``n`` then keeps the first n tasks of the split."""
    if path is None:
        if n is None:
            raise ValueError("n: the number of tasks to generate is required when no path is given")
        return generate_tasks(n, level, seed, split=None if split == "all" else split)
    root = Path(path)
    file, split_file = (root / "functions.json", root / "split.json") if root.is_dir() else (root, None)
    tasks: list[FunctionTask]
    if split == "all":
        tasks = load_userrl_functions(file)
    elif split_file is not None and split_file.exists():
        tasks = load_userrl_functions(file, ids=load_userrl_split(split_file)[split])
    else:
        train, test = userrl_split(load_userrl_functions(file))
        tasks = train if split == "train" else test
    return tasks if n is None else tasks[:n]


GYMS: dict[str, type[Gym]] = {
    "function": FunctionGym,
    "twenty_questions": TwentyQuestionsGym,
    "telepathy": TelepathyGym,
    "intention": IntentionGym,
    "turtle": TurtleGym,
}
TASKS: dict[str, Callable[..., list]] = {
    "function": function_tasks,
    "twenty_questions": twenty_questions_tasks,
    "telepathy": telepathy_tasks,
    "intention": intention_tasks,
    "turtle": turtle_tasks,
}
SCRIPTED_TEACHERS: dict[str, Callable[..., Any]] = {
    "function": FunctionTeacher,
    "twenty_questions": TwentyQuestionsTeacher,
}
"""Programmatic teachers (no model behind them); the other gyms' teachers prompt an LLM."""
TEACHERS: dict[str, Callable[..., Any]] = {
    **SCRIPTED_TEACHERS,
    "telepathy": partial(LLMTeacher.for_gym, TelepathyGym),
    "intention": partial(LLMTeacher.for_gym, IntentionGym),
    "turtle": partial(LLMTeacher.for_gym, TurtleGym),
}


def _lookup(registry: dict[str, Any], kind: str, name: str) -> Any:
    if name not in registry:
        raise ValueError(f"name: unknown {kind} {name!r}; registered: {sorted(registry)}")
    return registry[name]


def make_gym(name: str, **kwargs: Any) -> Gym:
    """A fresh gym of the registered ``name`` (e.g. ``make_gym("function", max_turns=15)``)."""
    return _lookup(GYMS, "gym", name)(**kwargs)


def default_max_turns(name: str) -> int:
    """Gym ``name``'s own turn budget T, its constructor's ``max_turns`` default (BAO.md: 15 for Function and
    Turtle, 12 for Telepathy)."""
    return inspect.signature(_lookup(GYMS, "gym", name)).parameters["max_turns"].default


def needs_user_simulator(name: str) -> bool:
    """Whether gym ``name`` talks to an LLM user simulator (its constructor takes the ``client``)."""
    return issubclass(_lookup(GYMS, "gym", name), LLMGym)


def make_tasks(
    name: str,
    *,
    split: str = "train",
    n: int | None = None,
    level: int | tuple[int, ...] = 1,
    seed: int = 0,
    path: str | None = None,
) -> list:
    """Tasks for gym ``name``: ``split`` in train | test | all, at most ``n``; ``level`` and ``seed`` drive
    procedural generation, ``path`` points at a dataset file or directory (gym-specific)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return _lookup(TASKS, "task source", name)(split, n, level, seed, path)


def make_teacher(name: str, **kwargs: Any) -> Any:
    """The scripted teacher of gym ``name``; ``teacher.solve(task, seed) -> list[dict]`` chat messages."""
    return _lookup(TEACHERS, "teacher", name)(**kwargs)
