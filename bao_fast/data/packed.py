"""``PackedBatch``: a flat, padding-free multi-turn token stream plus the masks every loss op shares.

Built by ``bao_fast.ops.pack_multiturn`` (or ``bao_fast.data.segments.pack_segments``); the contract is
DESIGN.md's "Packed multi-turn batch". ``T`` tokens, ``B`` trajectories, ``S`` segments, ``M`` turns
(one per trained segment, zero-length ones included), ``K`` target rows.

The host description (``seg_lens``, ``seg_trained``, ``seq_seg_offsets``) always stays on the CPU, so
sizes, token ranges and micro-batch cuts are computed without touching (or synchronising) the device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

# Fields that live on the token device (moved by ``to``); the host description is the rest.
DEVICE_FIELDS = (
    "input_ids",
    "cu_seqlens",
    "position_ids",
    "loss_mask",
    "turn_ids",
    "turn_offsets",
    "seq_ids",
    "targets",
    "target_mask",
    "target_turn_ids",
    "target_rows",
)
HOST_FIELDS = ("seg_lens", "seg_trained", "seq_seg_offsets")


@dataclass(frozen=True, eq=False)
class PackedBatch:
    """One packed batch. Token ``t`` / LM-head row ``t`` indexes every ``[T]`` field.

    Attributes:
        input_ids: int64[T] token ids of all trajectories, concatenated.
        cu_seqlens: int32[B+1] token offsets of the trajectories (varlen-attention layout).
        position_ids: int64[T] position inside the trajectory (restarts at 0).
        loss_mask: bool[T] token belongs to an assistant (trained) segment.
        turn_ids: int32[T] global turn (0..M-1, trajectory-major) of an assistant token, -1 otherwise.
        turn_offsets: int32[B+1] trajectory b owns turns ``turn_offsets[b]:turn_offsets[b+1]``.
        seq_ids: int32[T] trajectory index of the token.
        targets: int64[T] next token ``input_ids[t+1]``; ``ignore_index`` at a trajectory's last token.
        target_mask: bool[T] ``loss_mask[t+1]``; false at a trajectory's last token.
        target_turn_ids: int32[T] ``turn_ids[t+1]``; -1 at a trajectory's last token.
        target_rows: int64[K] ascending rows with ``target_mask`` true (the LM-head rows to compute).
        seg_lens: int32[S] host: token count of every segment.
        seg_trained: bool[S] host: segment is an assistant turn.
        seq_seg_offsets: int32[B+1] host: trajectory b owns segments ``seq_seg_offsets[b]:[b+1]``.
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    position_ids: torch.Tensor
    loss_mask: torch.Tensor
    turn_ids: torch.Tensor
    turn_offsets: torch.Tensor
    seq_ids: torch.Tensor
    targets: torch.Tensor
    target_mask: torch.Tensor
    target_turn_ids: torch.Tensor
    target_rows: torch.Tensor
    seg_lens: torch.Tensor
    seg_trained: torch.Tensor
    seq_seg_offsets: torch.Tensor

    @property
    def num_sequences(self) -> int:
        """Number of trajectories ``B``."""
        return self.seq_seg_offsets.numel() - 1

    @property
    def num_tokens(self) -> int:
        """Number of tokens ``T``."""
        return self.input_ids.numel()

    @property
    def num_turns(self) -> int:
        """Number of turns ``M`` (trained segments)."""
        return int(self.seg_trained.numpy().sum())

    @property
    def device(self) -> torch.device:
        """Device of the token-level fields."""
        return self.input_ids.device

    def host_offsets(self) -> HostOffsets:
        """Token / turn / target-row offsets of the trajectories, computed on the CPU (no device sync)."""
        return host_offsets(self.seg_lens, self.seg_trained, self.seq_seg_offsets)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """Copy of the batch with the token-level fields on ``device`` (the host description stays on CPU)."""
        moved = {name: getattr(self, name).to(device, non_blocking=non_blocking) for name in DEVICE_FIELDS}
        return dataclasses.replace(self, **moved)

    def micro_batch_bounds(self, max_tokens: int) -> list[tuple[int, int]]:
        """Greedy cut into trajectory ranges ``[start, stop)`` of at most ``max_tokens`` tokens each.

        Trajectories stay whole and in order; one longer than ``max_tokens`` gets a range of its own, and an
        empty one joins a neighbouring range, so no range has zero tokens unless the whole batch has.
        Computed on the host description only.
        """
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        lengths = self.host_offsets().tokens.diff().tolist()
        bounds: list[tuple[int, int]] = []
        start, used = 0, 0
        for b, n in enumerate(lengths):
            if used > 0 and n > 0 and used + n > max_tokens:
                bounds.append((start, b))
                start, used = b, 0
            used += n
        if lengths:
            bounds.append((start, len(lengths)))
        return bounds

    def split(self, max_tokens: int) -> list[PackedBatch]:
        """Micro-batches of at most ``max_tokens`` tokens (dynamic batch size), see ``micro_batch_bounds``.

        Each piece is a self-contained batch (token, turn and trajectory indices restart at 0), equal to
        packing its trajectories alone. An empty batch gives an empty list.
        """
        offsets = self.host_offsets()
        return [self._select(start, stop, offsets) for start, stop in self.micro_batch_bounds(max_tokens)]

    def select(self, start: int, stop: int) -> PackedBatch:
        """Trajectories ``start:stop`` as a self-contained batch; slices and offsets only, no device sync."""
        if not 0 <= start <= stop <= self.num_sequences:
            raise ValueError(f"need 0 <= start <= stop <= {self.num_sequences}, got start={start}, stop={stop}")
        return self._select(start, stop, self.host_offsets())

    def _select(self, start: int, stop: int, offsets: HostOffsets) -> PackedBatch:
        t0, t1 = int(offsets.tokens[start]), int(offsets.tokens[stop])
        m0 = int(offsets.turns[start])
        r0, r1 = int(offsets.target_rows[start]), int(offsets.target_rows[stop])
        s0, s1 = int(self.seq_seg_offsets[start]), int(self.seq_seg_offsets[stop])
        return PackedBatch(
            input_ids=self.input_ids[t0:t1],
            cu_seqlens=self.cu_seqlens[start : stop + 1] - t0,
            position_ids=self.position_ids[t0:t1],
            loss_mask=self.loss_mask[t0:t1],
            turn_ids=_shift_ids(self.turn_ids[t0:t1], m0),
            turn_offsets=self.turn_offsets[start : stop + 1] - m0,
            seq_ids=self.seq_ids[t0:t1] - start,
            targets=self.targets[t0:t1],
            target_mask=self.target_mask[t0:t1],
            target_turn_ids=_shift_ids(self.target_turn_ids[t0:t1], m0),
            target_rows=self.target_rows[r0:r1] - t0,
            seg_lens=self.seg_lens[s0:s1],
            seg_trained=self.seg_trained[s0:s1],
            seq_seg_offsets=self.seq_seg_offsets[start : stop + 1] - s0,
        )


class HostOffsets(NamedTuple):
    """Exclusive prefixes over trajectories, int64[B+1] each, on the CPU."""

    tokens: torch.Tensor  # equals cu_seqlens
    turns: torch.Tensor  # equals turn_offsets
    target_rows: torch.Tensor  # trajectory b owns target_rows[target_rows[b]:target_rows[b+1]]


def host_offsets(seg_lens: torch.Tensor, seg_trained: torch.Tensor, seq_seg_offsets: torch.Tensor) -> HostOffsets:
    """Offsets of every trajectory from a (validated) CPU host description.

    A trajectory's target rows are its trained tokens except its first token (no row predicts it), so
    ``target_rows[-1]`` is ``K`` and ``turns[-1]`` is ``M``. Computed with NumPy on zero-copy views: the
    description is small, and torch's intra-op thread pool would only add synchronisation.
    """
    lens = seg_lens.numpy().astype(np.int64)
    trained = seg_trained.numpy()
    offsets = seq_seg_offsets.numpy().astype(np.int64)
    first = _first_token_trained(lens, trained, offsets).astype(np.int64)
    rows = _segment_prefix(lens * trained, offsets) - np.concatenate(([0], np.cumsum(first)))
    return HostOffsets(
        torch.from_numpy(_segment_prefix(lens, offsets)),
        torch.from_numpy(_segment_prefix(trained.astype(np.int64), offsets)),
        torch.from_numpy(rows),
    )


def _segment_prefix(per_segment: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """int64[B+1] exclusive prefix over trajectories of ``per_segment`` (int64[S]) summed per trajectory."""
    return np.concatenate(([0], np.cumsum(per_segment, dtype=np.int64)))[offsets]


def _first_token_trained(lens: np.ndarray, trained: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """bool[B]: trajectory b's first token lies in a trained segment."""
    starts, stops = offsets[:-1], offsets[1:]
    nonempty = np.flatnonzero(lens > 0)
    if nonempty.size == 0:
        return np.zeros(starts.size, dtype=bool)
    first = nonempty[np.minimum(np.searchsorted(nonempty, starts), nonempty.size - 1)]
    return (first >= starts) & (first < stops) & trained[first]


def _shift_ids(ids: torch.Tensor, offset: int) -> torch.Tensor:
    """Subtract ``offset`` from the non-negative entries of ``ids`` (``-1`` = none stays ``-1``)."""
    return torch.where(ids >= 0, ids - offset, ids) if offset else ids
