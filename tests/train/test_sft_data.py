"""SFT data: only solved teacher episodes, the narration style from the config, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from bao_fast.config import ConfigError, load_config
from bao_fast.envs.teachers import TeacherEpisode
from bao_fast.models import load_tokenizer
from bao_fast.train import sft
from bao_fast.train.sft import MAX_ATTEMPTS_PER_TRAJECTORY, sft_teacher, teacher_dataset

DEMO_CONFIG = Path(__file__).parents[2] / "configs" / "demo-cpu.yaml"


def _assistant_texts(data: list[list[tuple[str, list[int]]]]) -> list[list[str]]:
    tokenizer = load_tokenizer()
    return [[tokenizer.decode(ids) for role, ids in segments if role == "assistant"] for segments in data]


class _FakeTeacher:
    """Attempt ``i`` is solved iff ``i % every == 0`` (never when ``every`` is 0); its one turn names ``i``."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.attempts = 0

    def play(self, task: object, seed: int | None = None) -> TeacherEpisode:
        i, self.attempts = self.attempts, self.attempts + 1
        messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                    {"role": "assistant", "content": f"attempt {i}"}, {"role": "user", "content": "f"}]
        return TeacherEpisode(messages, success=self.every > 0 and i % self.every == 0, num_turns=1)


def test_dataset_keeps_only_solved_episodes(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeTeacher(every=3)
    monkeypatch.setattr(sft, "sft_teacher", lambda cfg: fake)
    cfg = load_config(DEMO_CONFIG, ["sft.num_trajectories=5"])
    texts = _assistant_texts(teacher_dataset(cfg, load_tokenizer()))
    assert texts == [[f"attempt {i}<|im_end|>"] for i in (0, 3, 6, 9, 12)]
    assert fake.attempts == 13  # stops at the 5th solved episode


def test_too_few_solved_episodes_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeTeacher(every=0)
    monkeypatch.setattr(sft, "sft_teacher", lambda cfg: fake)
    cfg = load_config(DEMO_CONFIG, ["sft.num_trajectories=2"])
    with pytest.raises(ValueError, match=r"sft\.num_trajectories: the teacher solved only 0 of"):
        teacher_dataset(cfg, load_tokenizer())
    assert fake.attempts == 2 * MAX_ATTEMPTS_PER_TRAJECTORY


@pytest.mark.parametrize("style", ["full", "concise"])
def test_real_teacher_episodes_in_the_configured_style(style: str) -> None:
    cfg = load_config(DEMO_CONFIG, ["sft.num_trajectories=3", f"sft.teacher_style={style}"])
    assert sft_teacher(cfg).style == style
    for turns in _assistant_texts(teacher_dataset(cfg, load_tokenizer())):
        assert '"choice": "answer"' in turns[-1] and len(turns) <= cfg.env.max_turns
        assert all(("\nKnown: " in t and "\nPlan: " in t) == (style == "concise") for t in turns)


def test_style_needs_a_teacher_that_supports_it() -> None:
    cfg = load_config(None, ["model.tiny=true", "env.name=twenty_questions", "sft.teacher_style=concise"])
    with pytest.raises(ConfigError, match=r"sft\.teacher_style"):
        sft_teacher(cfg)
