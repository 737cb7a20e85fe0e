"""One finished multi-turn episode, as the trainer, the evaluator and the logs consume it.

``segments`` is the token stream the trainer packs (``bao_fast.data.segments.pack_segments``):
``[("user", opening prompt ids), ("assistant", turn 1 engine output ids), ("user", feedback 1 ids),
("assistant", turn 2 output ids), ...]``. Every ``assistant`` segment is exactly what the engine sampled
for that turn (ending in eos only if the engine produced it) and is one turn, so
``len(turn_choices) == len(turn_rewards) == len(turn_is_answer) == number of assistant segments``.
Non-assistant segments hold the template/feedback ids in between; nothing follows the last assistant
segment. ``engine_logprobs`` (when the engine returned them) is flat, one float per assistant token in
stream order, i.e. aligned with the packed ``loss_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

EndReason = Literal["correct", "terminated", "finish", "no_tool_call", "context_limit", "max_turns", "gym_error"]
END_REASONS: tuple[str, ...] = (
    "correct", "terminated", "finish", "no_tool_call", "context_limit", "max_turns", "gym_error"
)
"""``correct``: solved (the gym terminated with success); ``terminated``: the gym ended it otherwise;
``finish``: the agent chose finish; ``no_tool_call``: a turn without a tool call; ``context_limit``: the
next prompt or a generation hit ``max_model_len``; ``max_turns``: the turn budget ran out; ``gym_error``:
the gym raised on the last turn (a gym bug; the turn counts as invalid)."""


@dataclass
class Trajectory:
    """A finished episode (see the module docstring for the segment layout)."""

    task_id: str
    group_id: int
    seed: int | None
    segments: list[tuple[str, list[int]]] = field(default_factory=list)
    turn_choices: list[str] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)
    turn_is_answer: list[bool] = field(default_factory=list)
    engine_logprobs: list[float] | None = field(default_factory=list)
    success: bool = False
    end_reason: EndReason | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_turns(self) -> int:
        """Assistant turns taken."""
        return len(self.turn_choices)

    @property
    def reward(self) -> float:
        """Sum of the per-turn rewards (before BAO shaping)."""
        return float(sum(self.turn_rewards))

    @property
    def num_tokens(self) -> int:
        """Tokens in the whole stream."""
        return sum(len(ids) for _, ids in self.segments)

    @property
    def assistant_token_ids(self) -> list[int]:
        """The trained tokens (all assistant segments, in order)."""
        return [tok for role, ids in self.segments if role == "assistant" for tok in ids]

    @property
    def input_ids(self) -> list[int]:
        """The whole stream of token ids."""
        return [tok for _, ids in self.segments for tok in ids]
