"""Rollout segments -> inputs of ``pack_multiturn``.

A trajectory is a list of ``(role, token_ids)`` segments in order (system prompt, user / observation
messages, assistant turns). Role ``assistant`` is trained and every assistant segment is one turn (an empty
one too, so turn indices match the rollout's per-turn rewards); the other roles are context only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bao_fast.data.packed import PackedBatch
from bao_fast.ops.packing import pack_multiturn

TRAINED_ROLE = "assistant"
ROLES = frozenset({"system", "user", "assistant", "observation", "tool"})

Segment = tuple[str, Sequence[int] | torch.Tensor]


def segments_to_inputs(
    trajectories: Sequence[Sequence[Segment]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten trajectories into ``(seg_lens int32[S], seg_trained bool[S], seq_seg_offsets int32[B+1],
    input_ids int64[T])``, all on the CPU.

    Raises:
        TypeError / ValueError naming the trajectory and segment index of a bad role or token list.
    """
    if isinstance(trajectories, (str, bytes)) or not isinstance(trajectories, Sequence):
        raise TypeError(f"trajectories must be a list of trajectories, got {type(trajectories).__name__}")
    seg_lens: list[int] = []
    seg_trained: list[bool] = []
    offsets = [0]
    ids: list[torch.Tensor] = [torch.zeros(0, dtype=torch.int64)]
    for b, trajectory in enumerate(trajectories):
        if isinstance(trajectory, (str, bytes)) or not isinstance(trajectory, Sequence):
            raise TypeError(f"trajectories[{b}] must be a list of (role, token_ids), got {type(trajectory).__name__}")
        for s, segment in enumerate(trajectory):
            where = f"trajectories[{b}][{s}]"
            if not isinstance(segment, (tuple, list)) or len(segment) != 2:
                raise TypeError(f"{where} must be a (role, token_ids) pair, got {segment!r:.80}")
            role, token_ids = segment
            if not isinstance(role, str) or role not in ROLES:
                raise ValueError(f"{where} has role {role!r}; expected one of {sorted(ROLES)}")
            tokens = _as_token_tensor(token_ids, where)
            seg_lens.append(tokens.numel())
            seg_trained.append(role == TRAINED_ROLE)
            ids.append(tokens)
        offsets.append(len(seg_lens))
    return (
        torch.tensor(seg_lens, dtype=torch.int32),
        torch.tensor(seg_trained, dtype=torch.bool),
        torch.tensor(offsets, dtype=torch.int32),
        torch.cat(ids),
    )


def pack_segments(
    trajectories: Sequence[Sequence[Segment]],
    device: torch.device | str | None = None,
    *,
    ignore_index: int = -100,
) -> PackedBatch:
    """Pack rollout trajectories into a ``PackedBatch`` whose token fields live on ``device`` (default CPU)."""
    seg_lens, seg_trained, seq_seg_offsets, input_ids = segments_to_inputs(trajectories)
    if device is not None:
        input_ids = input_ids.to(device)
    return pack_multiturn(seg_lens, seg_trained, seq_seg_offsets, input_ids, ignore_index=ignore_index)


def _as_token_tensor(token_ids: object, where: str) -> torch.Tensor:
    """int64[n] CPU tensor of non-negative token ids, or an error naming ``where``."""
    if isinstance(token_ids, torch.Tensor):
        bad_dtype = token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool
        if token_ids.dim() != 1 or bad_dtype:
            shape = list(token_ids.shape)
            raise ValueError(f"{where} token_ids must be a 1-D integer tensor, got {token_ids.dtype}{shape}")
        tokens = token_ids.detach().to("cpu", torch.int64)
    elif isinstance(token_ids, (list, tuple)):
        if not set(map(type, token_ids)) <= {int}:  # C-speed type check: bools, floats, numpy scalars refused
            raise ValueError(f"{where} token_ids must contain only ints")
        try:
            array = np.asarray(token_ids, dtype=np.int64)  # one C pass
        except OverflowError:
            raise ValueError(f"{where} token_ids must fit in int64") from None
        tokens = torch.from_numpy(array)
    else:
        raise TypeError(f"{where} token_ids must be a list of ints or a 1-D tensor, got {type(token_ids).__name__}")
    if tokens.numel() and int(tokens.min()) < 0:
        raise ValueError(f"{where} token_ids must be >= 0, got {int(tokens.min())}")
    return tokens
