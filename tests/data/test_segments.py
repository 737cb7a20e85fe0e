"""Rollout (role, token_ids) segments -> pack_multiturn inputs."""

from __future__ import annotations

import pytest
import torch

from bao_fast.data.segments import pack_segments, segments_to_inputs


def test_segments_to_inputs_layout() -> None:
    trajectories = [
        [("system", [1, 2]), ("user", [3]), ("assistant", [4, 5]), ("observation", []), ("assistant", [6])],
        [],
        [("assistant", torch.tensor([7, 8], dtype=torch.int32)), ("tool", (9,))],
    ]
    seg_lens, seg_trained, seq_seg_offsets, input_ids = segments_to_inputs(trajectories)
    assert seg_lens.dtype == torch.int32 and seg_lens.tolist() == [2, 1, 2, 0, 1, 2, 1]
    assert seg_trained.dtype == torch.bool
    assert seg_trained.tolist() == [False, False, True, False, True, True, False]
    assert seq_seg_offsets.dtype == torch.int32 and seq_seg_offsets.tolist() == [0, 5, 5, 7]
    assert input_ids.dtype == torch.int64 and input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_empty_rollout() -> None:
    seg_lens, seg_trained, seq_seg_offsets, input_ids = segments_to_inputs([])
    assert (seg_lens.numel(), seg_trained.numel(), input_ids.numel()) == (0, 0, 0)
    assert seq_seg_offsets.tolist() == [0]
    batch = pack_segments([])
    assert (batch.num_sequences, batch.num_tokens, batch.num_turns) == (0, 0, 0)
    assert batch.cu_seqlens.tolist() == [0] and batch.turn_offsets.tolist() == [0]


def test_pack_segments_trains_only_assistant_tokens() -> None:
    trajectories = [
        [("system", [10, 11]), ("user", [12]), ("assistant", [13, 14, 15]), ("user", [16]), ("assistant", [17])],
        [("user", [20]), ("assistant", [])],
    ]
    batch = pack_segments(trajectories, ignore_index=-1)
    assert batch.targets.tolist() == [11, 12, 13, 14, 15, 16, 17, -1, -1]  # by hand: the next token, -1 at ends
    assert batch.target_rows.tolist() == [2, 3, 4, 6]  # the rows whose next token is an assistant token
    trained_ids = batch.input_ids[batch.loss_mask].tolist()
    assert trained_ids == [13, 14, 15, 17]
    assert batch.targets[batch.target_rows].tolist() == [13, 14, 15, 17]  # exactly the assistant tokens
    assert batch.turn_offsets.tolist() == [0, 2, 3]  # the empty assistant segment still counts as a turn
    assert batch.targets.tolist()[-1] == -1


@pytest.mark.parametrize(
    ("trajectories", "error", "match"),
    [
        ([[("assistant", [1]), ("narrator", [2])]], ValueError, r"trajectories\[0\]\[1\] has role 'narrator'"),
        ([[("user", [1, -2])]], ValueError, r"trajectories\[0\]\[0\] token_ids must be >= 0"),
        ([[("user", [1, 2.0])]], ValueError, "must contain only ints"),
        ([[("user", [True])]], ValueError, "must contain only ints"),
        ([[("user", [1, True])]], ValueError, "must contain only ints"),
        ([[("user", [[1], [2, 3]])]], ValueError, r"trajectories\[0\]\[0\] token_ids must contain only ints"),
        ([[("user", [-(2**63) - 1])]], ValueError, r"trajectories\[0\]\[0\] token_ids must fit in int64"),
        ([[("user", [2**63])]], ValueError, r"trajectories\[0\]\[0\] token_ids must fit in int64"),
        ([[(["user"], [1])]], ValueError, r"trajectories\[0\]\[0\] has role \['user'\]"),
        ([[("user", torch.tensor([1.0]))]], ValueError, "1-D integer tensor"),
        ([[("user", torch.tensor([[1]]))]], ValueError, "1-D integer tensor"),
        ([[("user", "hello")]], TypeError, "list of ints or a 1-D tensor"),
        ([[], [("user", [1], "extra")]], TypeError, r"trajectories\[1\]\[0\] must be a \(role, token_ids\) pair"),
        ([("user", [1])], TypeError, r"trajectories\[0\]\[0\] must be a \(role, token_ids\) pair"),
        ([[("user", [1])], "oops"], TypeError, r"trajectories\[1\] must be a list"),
        ("oops", TypeError, "trajectories must be a list"),
    ],
)
def test_bad_segments_raise_with_location(trajectories: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        segments_to_inputs(trajectories)  # type: ignore[arg-type]
