"""An episode a gym error ended trains nothing: no advantage on its tokens, and its prompt group's baseline
(mean and std of the scores) is taken over the other episodes only."""

from __future__ import annotations

import torch

from bao_fast.algo.shaping import preset
from bao_fast.data.segments import pack_segments
from bao_fast.ops import shaped_advantages
from bao_fast.rollout import Trajectory
from bao_fast.train.rl import advantage_group_ids, zero_gym_error_advantages


def _episode(group: int, rewards: list[float], end: str) -> Trajectory:
    segments = [("user", [5, 6, 7])]
    for i, _ in enumerate(rewards):
        segments += [("assistant", [10 + i, 11 + i]), ("user", [8])]
    return Trajectory(f"t{group}", group, 0, segments[:-1], ["answer"] * len(rewards), rewards,
                      [True] * len(rewards), success=rewards[-1] > 0, end_reason=end)


def _advantages(trajectories: list[Trajectory], group_ids: list[int]) -> torch.Tensor:
    batch = pack_segments([t.segments for t in trajectories])
    shaped = shaped_advantages(
        torch.tensor([x for t in trajectories for x in t.turn_rewards]),
        torch.tensor([x for t in trajectories for x in t.turn_is_answer]),
        batch.turn_offsets, torch.tensor(group_ids), batch.target_turn_ids, preset("bao", horizon=4),
    )
    return shaped.token_advantages, batch


def test_gym_error_episode_gets_no_advantage_and_leaves_the_baseline():
    episodes = [
        _episode(0, [0.0, 1.0], "correct"), _episode(0, [0.0, 0.0], "max_turns"),
        _episode(0, [0.0], "gym_error"), _episode(1, [1.0], "correct"), _episode(1, [0.0, 0.0, 0.0], "gym_error"),
        _episode(1, [0.0, 0.0], "max_turns"),
    ]  # fmt: skip
    ids = advantage_group_ids(episodes)
    assert ids == [0, 0, 2, 1, 3, 1]
    advantages, batch = _advantages(episodes, ids)
    torch.manual_seed(0)
    poisoned = advantages + torch.randn_like(advantages)
    zero_gym_error_advantages(poisoned, episodes, batch)
    offsets = batch.cu_seqlens.tolist()
    for b in (2, 4):
        assert torch.all(poisoned[offsets[b] : offsets[b + 1]] == 0)
    # the other episodes get what they would get with the failed ones never rolled out
    kept = [0, 1, 3, 5]
    alone, alone_batch = _advantages([episodes[b] for b in kept], [0, 0, 1, 1])
    alone_offsets = alone_batch.cu_seqlens.tolist()
    for i, b in enumerate(kept):
        expected = alone[alone_offsets[i] : alone_offsets[i + 1]]
        torch.testing.assert_close(advantages[offsets[b] : offsets[b + 1]], expected)
    assert advantages[offsets[0] : offsets[1]].abs().max() > 0
