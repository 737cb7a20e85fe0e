"""SFT data: only solved teacher episodes, in attempt order however they are played (threads, ranks); the
scripted or LLM teacher the config names; the data file a resumed run reads; clear errors."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from bao_fast.config import ConfigError, load_config
from bao_fast.envs import make_tasks
from bao_fast.envs.base import format_tool_call
from bao_fast.envs.teachers import TeacherEpisode
from bao_fast.envs.teachers.llm_teacher import TEACHER_INSTRUCTIONS, LLMTeacher
from bao_fast.models import load_tokenizer
from bao_fast.train import sft_data
from bao_fast.train.runtime import derive_seed
from bao_fast.train.sft_data import (
    MAX_ATTEMPTS_PER_TRAJECTORY,
    SFT_DATA_FILE,
    sft_episodes,
    sft_teacher,
    solved_episodes,
    teacher_dataset,
)

from .conftest import run_worker

DEMO_CONFIG = Path(__file__).parents[2] / "configs" / "demo-cpu.yaml"
LLM_TEACHER = [
    "sft.teacher=llm", "sft.teacher_style=full", "sft.teacher_base_url=http://127.0.0.1:9", "sft.teacher_model=m"
]


def _assistant_texts(data: list[list[tuple[str, list[int]]]]) -> list[list[str]]:
    tokenizer = load_tokenizer()
    return [[tokenizer.decode(ids) for role, ids in segments if role == "assistant"] for segments in data]


class _FakeTeacher:
    """Attempt ``i`` (in call order) is solved iff ``i % every == 0`` (never when ``every`` is 0); its one
    turn names ``i``."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.attempts = 0

    def play(self, task: object, seed: int | None = None) -> TeacherEpisode:
        i, self.attempts = self.attempts, self.attempts + 1
        messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                    {"role": "assistant", "content": f"attempt {i}"}, {"role": "user", "content": "f"}]
        return TeacherEpisode(messages, success=self.every > 0 and i % self.every == 0, num_turns=1)


class _SeedTeacher:
    """Thread-safe: solves exactly the attempts whose seed is divisible by 3; counts plays."""

    def __init__(self) -> None:
        self.plays = 0
        self._lock = threading.Lock()

    def play(self, task: object, seed: int | None = None) -> TeacherEpisode:
        with self._lock:
            self.plays += 1
        messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                    {"role": "assistant", "content": f"seed {seed}"}, {"role": "user", "content": "f"}]
        return TeacherEpisode(messages, success=seed % 3 == 0, num_turns=1)


def _expected_seeds(cfg, n: int) -> list[int]:
    seeds = (derive_seed(cfg.seed, 1, i) for i in range(n * MAX_ATTEMPTS_PER_TRAJECTORY))
    return [s for s in seeds if s % 3 == 0][:n]


def test_dataset_keeps_only_solved_episodes(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeTeacher(every=3)
    monkeypatch.setattr(sft_data, "sft_teacher", lambda cfg: fake)
    cfg = load_config(DEMO_CONFIG, ["sft.num_trajectories=5"])
    texts = _assistant_texts(teacher_dataset(cfg, load_tokenizer()))
    assert texts == [[f"attempt {i}<|im_end|>"] for i in (0, 3, 6, 9, 12)]
    assert fake.attempts == 13  # stops at the 5th solved episode


def test_too_few_solved_episodes_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeTeacher(every=0)
    monkeypatch.setattr(sft_data, "sft_teacher", lambda cfg: fake)
    cfg = load_config(DEMO_CONFIG, ["sft.num_trajectories=2"])
    with pytest.raises(ConfigError, match=r"'sft\.num_trajectories': the teacher solved only 0 of 8 episodes"):
        teacher_dataset(cfg, load_tokenizer())
    assert fake.attempts == 2 * MAX_ATTEMPTS_PER_TRAJECTORY


@pytest.mark.parametrize("workers", [1, 3, 8])
def test_threads_keep_attempt_order(monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    teacher = _SeedTeacher()
    monkeypatch.setattr(sft_data, "sft_teacher", lambda cfg: teacher)
    cfg = load_config(DEMO_CONFIG, ["sft.num_trajectories=6", *LLM_TEACHER, f"sft.teacher_workers={workers}"])
    episodes = solved_episodes(cfg)
    assert [m[2]["content"] for m in episodes] == [f"seed {s}" for s in _expected_seeds(cfg, 6)]
    assert teacher.plays % workers == 0 or teacher.plays == 6 * MAX_ATTEMPTS_PER_TRAJECTORY  # whole waves


@pytest.mark.slow
def test_ranks_share_the_attempts_and_fail_together(tmp_path: Path) -> None:
    overrides = ["model.tiny=true", "env.num_train_tasks=5", "sft.num_trajectories=5"]
    out = tmp_path / "out.json"
    run_worker("_sft_data_worker.py", [json.dumps(overrides), str(out)], nproc=2, timeout=120)
    result = json.loads(out.read_text())
    cfg = load_config(None, overrides)
    assert [m[2]["content"] for m in result["episodes"]] == [f"seed {s}" for s in _expected_seeds(cfg, 5)]
    tasks = make_tasks("function", n=5, seed=cfg.env.seed)
    seeds = [derive_seed(cfg.seed, 1, i) for i in range(20)]
    assert [m[1]["content"] for m in result["episodes"]] == [
        f"task {tasks[i % 5]}" for i, s in enumerate(seeds) if s % 3 == 0
    ][:5]
    assert result["errors"][0] == "RuntimeError: the SFT teacher failed on rank 1: " \
                                  "ConnectionError('teacher server unreachable')"
    assert result["errors"][1] == "ConnectionError: teacher server unreachable"


def test_data_file_is_reused_only_for_the_same_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    teacher = _SeedTeacher()
    monkeypatch.setattr(sft_data, "sft_teacher", lambda cfg: teacher)
    base = [f"run_dir={tmp_path}", "sft.num_trajectories=3"]
    cfg = load_config(DEMO_CONFIG, base)
    first = sft_episodes(cfg)
    lines = (tmp_path / SFT_DATA_FILE).read_text().splitlines()
    assert [json.loads(line)["messages"] for line in lines[1:]] == first and teacher.plays > 0
    assert json.loads(lines[0])["source"]["num_trajectories"] == 3
    plays = teacher.plays
    assert sft_episodes(cfg) == first and teacher.plays == plays  # resumed: read, not played
    assert sft_episodes(load_config(DEMO_CONFIG, [*base, "checkpoint.resume=false"])) == first
    assert teacher.plays == 2 * plays  # resume=false plays again
    assert len(sft_episodes(load_config(DEMO_CONFIG, [*base[:1], "sft.num_trajectories=4"]))) == 4
    assert teacher.plays > 3 * plays and len((tmp_path / SFT_DATA_FILE).read_text().splitlines()) == 5
    assert not list(tmp_path.glob("*.tmp"))
    # a teacher or user server restarted elsewhere serves the same models: the episodes stay, nothing replays
    served = [*base[:1], "sft.num_trajectories=4", "env.user_model=m"]
    here = sft_episodes(load_config(DEMO_CONFIG, [*served, "env.user_base_url=http://h:7"]))
    plays = teacher.plays
    moved = load_config(DEMO_CONFIG, [*served, "sft.teacher_base_url=http://h:9", "env.user_base_url=http://h:8"])
    assert sft_episodes(moved) == here and teacher.plays == plays


@pytest.mark.parametrize("style", ["full", "concise"])
def test_real_teacher_episodes_in_the_configured_style(style: str) -> None:
    cfg = load_config(DEMO_CONFIG, ["sft.num_trajectories=3", f"sft.teacher_style={style}"])
    assert sft_teacher(cfg).style == style
    for turns in _assistant_texts(teacher_dataset(cfg, load_tokenizer())):
        assert '"choice": "answer"' in turns[-1] and len(turns) <= cfg.env.max_turns
        assert all(("\nKnown: " in t and "\nPlan: " in t) == (style == "concise") for t in turns)


def test_teacher_config_errors() -> None:
    cfg = load_config(None, ["model.tiny=true", "env.name=twenty_questions", "sft.teacher_style=concise"])
    with pytest.raises(ConfigError, match=r"sft\.teacher_style"):
        sft_teacher(cfg)
    cfg = load_config(None, ["model.tiny=true", "env.name=telepathy", "env.user_base_url=http://u", "env.user_model=u"])
    with pytest.raises(ConfigError, match=r"'sft\.teacher': the 'telepathy' gym has no scripted teacher"):
        sft_teacher(cfg)
    for overrides, key in [
        (["sft.teacher=llm"], "sft.teacher_base_url"),
        (["sft.teacher=llm", "sft.teacher_base_url=http://t"], "sft.teacher_model"),
        ([*LLM_TEACHER, "sft.teacher_style=concise"], "sft.teacher_style"),
        (["sft.teacher=tutor"], "sft.teacher"),
        (["sft.teacher_workers=0"], "sft.teacher_workers"),
        (["sft.teacher_max_tokens=0"], "sft.teacher_max_tokens"),
        (["sft.teacher_temperature=-1"], "sft.teacher_temperature"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, ["model.tiny=true", *overrides])


def test_llm_teacher_on_a_function_gym_gets_no_user_simulator(openai_stub) -> None:
    cfg = load_config(None, ["model.tiny=true", "sft.teacher=llm", f"sft.teacher_base_url={openai_stub.url}",
                             "sft.teacher_model=t", "sft.teacher_max_tokens=77", "env.max_turns=4",
                             "algo.shaping.horizon=4"])
    teacher = sft_teacher(cfg)
    assert isinstance(teacher, LLMTeacher) and teacher.max_tokens == 77 and teacher.temperature == 0.7
    assert teacher.gym_factory().max_turns == 4 and not hasattr(teacher.gym_factory(), "client")


def test_llm_teacher_plays_telepathy_over_http(openai_stub, tmp_path: Path) -> None:
    """The teacher asks once, then guesses; the user simulator and judge (on the teacher's server, since
    env.user_base_url is empty) accept the guess for the secrets in ``solved``. Episodes run concurrently
    and come back in attempt order."""
    cfg = load_config(None, [
        "model.tiny=true", "env.name=telepathy", "env.max_turns=3", "algo.shaping.horizon=3",
        "env.num_train_tasks=8", f"run_dir={tmp_path}", "sft.teacher=llm", f"sft.teacher_base_url={openai_stub.url}",
        "sft.teacher_model=teach", "sft.teacher_workers=4", "sft.num_trajectories=3",
    ])  # fmt: skip
    tasks = make_tasks("telepathy", split="train", n=8, seed=cfg.env.seed)
    solved = {tasks[i].entity for i in (1, 4, 6)}

    def handler(body):
        system = body["messages"][0]["content"]
        if TEACHER_INSTRUCTIONS in system:
            assert (body["model"], body["max_tokens"]) == ("teach", 1024)
            asked = any(m["role"] == "assistant" for m in body["messages"])
            call = format_tool_call("answer", "my guess") if asked else format_tool_call("action", "Is it alive?")
            return openai_stub.Reply(body=openai_stub.completion(call, reasoning="Plan: ask, then guess.").body,
                                     delay=0.05)
        if system.startswith("You judge"):
            secret = system.split("The secret is: ", 1)[1].split(".", 1)[0]
            return openai_stub.completion("CORRECT" if secret in solved else "INCORRECT")
        return openai_stub.completion("Yes")

    openai_stub.handler = handler
    episodes = sft_episodes(cfg)
    assert [len(m) for m in episodes] == [6, 6, 6]  # system, user, (assistant, feedback) x 2
    assert all(m[2]["content"].startswith("<think>\nPlan: ask, then guess.\n</think>\n") for m in episodes)
    assert all(TEACHER_INSTRUCTIONS not in m[0]["content"] for m in episodes)  # the gym's own prompt is kept
    expected = [tasks[i % 8].entity for i in range(3 * MAX_ATTEMPTS_PER_TRAJECTORY) if tasks[i % 8].entity in solved]
    assert [e for m in episodes for e in solved if e in m[5]["content"]] == expected[:3]
    assert openai_stub.max_in_flight >= 2
    assert (tmp_path / SFT_DATA_FILE).is_file()
