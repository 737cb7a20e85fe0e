"""What a teacher returns, and the play loop shared by the scripted teachers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from bao_fast.envs.base import Gym, format_tool_call


@dataclass(frozen=True)
class TeacherEpisode:
    """A played episode: chat ``messages`` (system, user, then assistant/user turns), whether it was
    solved, and the number of turns taken."""

    messages: list[dict[str, str]]
    success: bool
    num_turns: int


class ScriptedPolicy(Protocol):
    """A scripted teacher's per-episode state: picks each move with its reasoning, then reads the feedback."""

    def decide(self, turn: int) -> tuple[str, str, str]:
        """(choice, content, thought) of the 1-based ``turn``."""
        ...

    def observe(self, choice: str, content: str, feedback: str) -> None:
        """Update the state with the gym's feedback to the move just made."""
        ...


def play_scripted(gym: Gym, task: Any, seed: int | None, policy: ScriptedPolicy) -> TeacherEpisode:
    """Play ``policy`` against ``gym`` on ``task`` through the gym's text interface; assistant turns are
    ``<think>thought</think>\\n<tool_call>{json}</tool_call>``, user turns the gym's feedback."""
    messages = gym.reset(task, seed)
    while not gym.done:
        choice, content, thought = policy.decide(gym.num_turns + 1)
        text = f"<think>\n{thought}\n</think>\n{format_tool_call(choice, content)}"
        result = gym.step(text)
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": result.feedback}]
        policy.observe(choice, content, result.feedback)
    return TeacherEpisode(messages, gym.success, gym.num_turns)
