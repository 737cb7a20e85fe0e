"""PackedBatch: sizes, host offsets, device moves and token-budget micro-batching."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bao_fast.data.packed import DEVICE_FIELDS, HOST_FIELDS, PackedBatch
from bao_fast.data.segments import pack_segments

ROLES = ("system", "user", "assistant", "observation")
trajectories_st = st.lists(
    st.lists(st.tuples(st.sampled_from(ROLES), st.lists(st.integers(0, 1000), max_size=12)), max_size=7),
    max_size=10,
)


def assert_same_batch(a: PackedBatch, b: PackedBatch) -> None:
    for name in DEVICE_FIELDS + HOST_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, f"{name}: {x.dtype} != {y.dtype}"
        assert torch.equal(x, y), f"{name}: {x.tolist()} != {y.tolist()}"


@settings(max_examples=40, deadline=None)
@given(trajectories=trajectories_st, max_tokens=st.integers(1, 40))
def test_split_pieces_equal_packing_their_trajectories(
    trajectories: list[list[tuple[str, list[int]]]], max_tokens: int
) -> None:
    batch = pack_segments(trajectories)
    bounds = batch.micro_batch_bounds(max_tokens)
    pieces = batch.split(max_tokens)
    assert len(pieces) == len(bounds)
    # Whole trajectories, in order, nothing lost or repeated.
    assert [b for start, stop in bounds for b in range(start, stop)] == list(range(len(trajectories)))
    for (start, stop), piece in zip(bounds, pieces, strict=True):
        assert_same_batch(piece, pack_segments(trajectories[start:stop]))
        # Within budget unless a single trajectory is longer than the budget on its own (empty ones may join it).
        non_empty = sum(1 for traj in trajectories[start:stop] if any(ids for _, ids in traj))
        assert piece.num_tokens <= max_tokens or non_empty == 1
        assert piece.num_tokens > 0 or batch.num_tokens == 0
    # Greedy: the next trajectory did not fit into the previous piece.
    for (_, stop), piece in zip(bounds[:-1], pieces[:-1], strict=True):
        next_len = sum(len(ids) for _, ids in trajectories[stop])
        assert piece.num_tokens + next_len > max_tokens
    if pieces:
        assert torch.equal(torch.cat([p.input_ids for p in pieces]), batch.input_ids)


def test_long_trajectory_becomes_its_own_micro_batch() -> None:
    trajectories = [
        [("user", [1, 2]), ("assistant", [3])],
        [("user", list(range(10))), ("assistant", [4, 5])],
        [("assistant", [6])],
        [("user", [7]), ("assistant", [8, 9])],
    ]
    batch = pack_segments(trajectories)
    assert batch.micro_batch_bounds(5) == [(0, 1), (1, 2), (2, 4)]
    pieces = batch.split(5)
    assert [p.num_tokens for p in pieces] == [3, 12, 4]
    assert pieces[2].turn_ids.tolist() == [0, -1, 1, 1]  # turns renumbered from 0 inside the piece
    assert pieces[2].seq_ids.tolist() == [0, 1, 1, 1]


def test_empty_trajectory_after_a_long_one_joins_its_range() -> None:
    """An empty trajectory never gets a zero-token micro-batch of its own (the backbone cannot run on one)."""
    batch = pack_segments([[("user", list(range(10)))], [], [("assistant", [1, 2])], []])
    assert batch.micro_batch_bounds(5) == [(0, 2), (2, 4)]
    assert [p.num_tokens for p in batch.split(5)] == [10, 2]


def test_split_of_empty_batch_and_bad_budget() -> None:
    assert pack_segments([]).split(16) == []
    batch = pack_segments([[("assistant", [1, 2])]])
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="max_tokens"):
            batch.split(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start <= stop"):
        batch.select(1, 0)


@settings(max_examples=25, deadline=None)
@given(trajectories=trajectories_st)
def test_host_offsets_and_sizes_agree_with_device_fields(trajectories: list[list[tuple[str, list[int]]]]) -> None:
    batch = pack_segments(trajectories)
    offsets = batch.host_offsets()
    assert offsets.tokens.tolist() == batch.cu_seqlens.tolist()
    assert offsets.turns.tolist() == batch.turn_offsets.tolist()
    for b in range(batch.num_sequences):
        rows = batch.target_rows[offsets.target_rows[b] : offsets.target_rows[b + 1]]
        assert ((rows >= offsets.tokens[b]) & (rows < offsets.tokens[b + 1])).all()
    assert int(offsets.target_rows[-1]) == batch.target_rows.numel()
    assert batch.num_sequences == len(trajectories)
    assert batch.num_tokens == sum(len(ids) for traj in trajectories for _, ids in traj)
    assert batch.num_turns == sum(role == "assistant" for traj in trajectories for role, _ in traj)


def test_to_moves_token_fields_and_keeps_host_description_on_cpu() -> None:
    batch = pack_segments([[("user", [1, 2]), ("assistant", [3, 4])], [("assistant", [5])]])
    moved = batch.to("meta")
    assert all(getattr(moved, name).device.type == "meta" for name in DEVICE_FIELDS)
    assert all(getattr(moved, name).device.type == "cpu" for name in HOST_FIELDS)
    assert moved.device.type == "meta"
    assert (moved.num_sequences, moved.num_tokens, moved.num_turns) == (2, 5, 2)
    # Cuts come from the host description, so a batch on another device splits without touching its data.
    assert [p.num_tokens for p in moved.split(4)] == [4, 1]
    assert_same_batch(batch.to("cpu"), batch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_split_on_cuda_matches_cpu() -> None:
    trajectories = [[("user", [1, 2, 3]), ("assistant", [4, 5])], [("assistant", [6])], [("user", [7, 8])]]
    cpu_pieces = pack_segments(trajectories).split(3)
    cuda_pieces = pack_segments(trajectories, device="cuda").split(3)
    for a, b in zip(cpu_pieces, cuda_pieces, strict=True):
        assert_same_batch(a, b.to("cpu"))
