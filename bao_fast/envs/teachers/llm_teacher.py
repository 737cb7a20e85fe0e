"""LLM teacher: an OpenAI-compatible model plays any gym, prompted to write BAO's two behaviours
(retrospective reasoning, prospective planning) in ``<think>`` before each tool call.

The instructions are appended to the gym's system prompt only in the teacher's view of the dialogue; the
recorded trajectory keeps the gym's own opening messages, so a policy fine-tuned on it learns the
behaviours without being told to. Replies of servers that return reasoning separately (a reasoning
parser) are reassembled as ``<think>reasoning</think>content``. The episode ends as the gym decides, or
when the dialogue no longer fits the server's context (BAO's context-limit ending).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from bao_fast.envs.base import Gym
from bao_fast.envs.teachers.episode import TeacherEpisode
from bao_fast.envs.user_client import ChatCompletion, UserSimulatorClient, UserSimulatorError

__all__ = ["TEACHER_INSTRUCTIONS", "LLMTeacher"]

TEACHER_INSTRUCTIONS = (
    "You are also demonstrating expert behaviour for others to learn from. In every turn, before the tool "
    "call, reason inside <think> ... </think> and cover both of these:\n"
    "1. Retrospective reasoning: restate what you have learned from the environment so far, list the "
    "hypotheses that are still consistent with all of it, and say which ones the latest feedback ruled out.\n"
    "2. Prospective planning: state how many turns remain and how you will spend them (which questions or "
    "probes, and when you will answer).\n"
    "Then make exactly one tool call. Submit an answer only when your remaining hypotheses support it."
)


def _assemble(completion: ChatCompletion) -> str:
    """The assistant turn as the policy should write it: reasoning in ``<think>``, then the content."""
    content = completion.content.strip()
    if completion.reasoning and "<think>" not in content:
        return f"<think>\n{completion.reasoning.strip()}\n</think>\n{content}"
    return content


class LLMTeacher:
    """Plays episodes of any gym with an LLM and records them as SFT chat trajectories.

    Args:
        client: the OpenAI-compatible client of the teacher model.
        gym_factory: builds a fresh gym per episode (e.g. ``lambda: TelepathyGym(user_client)``).
        max_tokens: completion limit per turn.
        temperature: sampling temperature (each turn's request seed derives from the episode seed).
        instructions: the behaviour instructions appended to the system prompt in the teacher's view.
        extra_body: extra request fields (e.g. vLLM ``chat_template_kwargs``).
    """

    name = "llm"

    def __init__(
        self,
        client: UserSimulatorClient,
        gym_factory: Callable[[], Gym],
        max_tokens: int = 1024,
        temperature: float = 0.7,
        instructions: str = TEACHER_INSTRUCTIONS,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(client, UserSimulatorClient):
            raise TypeError(f"client must be a UserSimulatorClient, got {type(client).__name__}")
        if not callable(gym_factory):
            raise TypeError(f"gym_factory must be callable, got {type(gym_factory).__name__}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        self.client = client
        self.gym_factory = gym_factory
        self.max_tokens = max_tokens
        self.temperature = float(temperature)
        self.instructions = instructions
        self.extra_body = dict(extra_body or {})

    @classmethod
    def for_gym(
        cls,
        gym_cls: Callable[..., Gym],
        client: UserSimulatorClient,
        user_client: UserSimulatorClient | None = None,
        gym_kwargs: Mapping[str, Any] | None = None,
        **teacher_kwargs: Any,
    ) -> LLMTeacher:
        """A teacher for gyms built by ``gym_cls(**gym_kwargs)``. LLM-user gyms (whose first argument is
        the user client) get ``user_client``, by default the teacher's own ``client``."""
        from bao_fast.envs.llm_gyms import LLMGym

        kwargs = dict(gym_kwargs or {})
        if isinstance(gym_cls, type) and issubclass(gym_cls, LLMGym):
            kwargs.setdefault("client", user_client or client)
        return cls(client, lambda: gym_cls(**kwargs), **teacher_kwargs)

    def solve(self, task: Any, seed: int | None = None) -> list[dict[str, str]]:
        """Chat messages of a whole episode on ``task`` (see :meth:`play`)."""
        return self.play(task, seed).messages

    def play(self, task: Any, seed: int | None = None) -> TeacherEpisode:
        """Play one episode; raises :class:`UserSimulatorError` when the server fails for another reason
        than the context limit (a 400 context error on the first turn means the prompt can never fit)."""
        gym = self.gym_factory()
        messages = gym.reset(task, seed)
        if not messages or messages[0].get("role") != "system":
            raise ValueError(f"{type(gym).__name__}.reset must open with a system message")
        view = [{"role": "system", "content": f"{messages[0]['content']}\n\n{self.instructions}"}, *messages[1:]]
        while not gym.done:
            try:
                completion = self.client.complete(
                    view,
                    max_tokens=self.max_tokens,
                    temperature=self.temperature,
                    seed=None if seed is None else seed * 1000 + gym.num_turns,
                    extra_body=self.extra_body,
                )
            except UserSimulatorError as exc:
                if exc.context_overflow and gym.num_turns > 0:
                    break
                raise
            text = _assemble(completion)
            result = gym.step(text)
            turn = [{"role": "assistant", "content": text}, {"role": "user", "content": result.feedback}]
            messages += turn
            view += turn
        return TeacherEpisode(messages, gym.success, gym.num_turns)
