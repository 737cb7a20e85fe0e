"""``pack_multiturn``: rollout segments -> one padding-free token stream with exact masks.

The public function validates the host description (``seg_lens``, ``seg_trained``, ``seq_seg_offsets``:
CPU tensors), computes the data-dependent output sizes from it on the host (``num_turns`` = trained
segments, ``num_target_rows`` = trained tokens minus the trajectories whose first token is trained),
copies the description to ``input_ids``' device and calls ``torch.ops.bao_fast.pack_multiturn`` (C++ on
the CPU, one CUDA kernel launch on the GPU). Because sizes come from host metadata, the CUDA path never
synchronises with the device. Semantics: ``bao_fast.data.packed.PackedBatch`` and
``bao_fast.ops.reference.pack_multiturn_reference``.
"""

from __future__ import annotations

import numpy as np
import torch

import bao_fast._C  # noqa: F401  (registers torch.ops.bao_fast.pack_multiturn)
from bao_fast.data.packed import DEVICE_FIELDS, PackedBatch, host_offsets

_MAX_TOKENS = 2**31 - 1  # cu_seqlens is int32


def pack_multiturn(
    seg_lens: torch.Tensor,
    seg_trained: torch.Tensor,
    seq_seg_offsets: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    ignore_index: int = -100,
) -> PackedBatch:
    """Pack ``B`` trajectories of ``S`` segments and ``T`` tokens into a ``PackedBatch``.

    Args:
        seg_lens: int32[S] CPU, token count of every segment (>= 0, zero allowed).
        seg_trained: bool[S] CPU, segment is an assistant turn (each one is a turn, even if empty).
        seq_seg_offsets: int32[B+1] CPU, non-decreasing from 0 to S; trajectory b owns segments
            ``seq_seg_offsets[b]:seq_seg_offsets[b+1]``.
        input_ids: int64[T] on the CPU or a CUDA device, ``T == seg_lens.sum()``; outputs live there.
        ignore_index: target of each trajectory's last row.

    Raises:
        TypeError / ValueError naming the offending argument.

    A host-side step (its output sizes come from the host description): call it outside ``torch.compile``d
    code; ``torch.ops.bao_fast.pack_multiturn`` with precomputed sizes is the traceable op.
    """
    validate_pack_inputs(seg_lens, seg_trained, seq_seg_offsets, input_ids, ignore_index)
    offsets = host_offsets(seg_lens, seg_trained, seq_seg_offsets)
    device = input_ids.device
    outputs = torch.ops.bao_fast.pack_multiturn(
        seg_lens.to(device, non_blocking=True),
        seg_trained.to(device, non_blocking=True),
        seq_seg_offsets.to(device, non_blocking=True),
        input_ids,
        int(offsets.turns[-1]),
        int(offsets.target_rows[-1]),
        ignore_index,
    )
    return PackedBatch(
        input_ids=input_ids,
        **dict(zip(DEVICE_FIELDS[1:], outputs, strict=True)),
        seg_lens=seg_lens,
        seg_trained=seg_trained,
        seq_seg_offsets=seq_seg_offsets,
    )


def validate_pack_inputs(
    seg_lens: torch.Tensor,
    seg_trained: torch.Tensor,
    seq_seg_offsets: torch.Tensor,
    input_ids: torch.Tensor,
    ignore_index: int = -100,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument unless the inputs describe a valid batch."""
    spec = {
        "seg_lens": (seg_lens, torch.int32),
        "seg_trained": (seg_trained, torch.bool),
        "seq_seg_offsets": (seq_seg_offsets, torch.int32),
        "input_ids": (input_ids, torch.int64),
    }
    for name, (tensor, dtype) in spec.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype != dtype:
            raise ValueError(f"{name} must have dtype {dtype}, got {tensor.dtype}")
        if tensor.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
        if name != "input_ids" and tensor.device.type != "cpu":
            raise ValueError(f"{name} is host metadata and must be a CPU tensor, got device {tensor.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if input_ids.device.type not in ("cpu", "cuda"):
        raise ValueError(f"input_ids must be on a CPU or CUDA device, got {input_ids.device}")
    if input_ids.is_cuda and not torch._C._dispatch_has_kernel_for_dispatch_key("bao_fast::pack_multiturn", "CUDA"):
        raise ValueError("input_ids is a CUDA tensor but bao_fast._C was built without CUDA")
    if input_ids.numel() > _MAX_TOKENS:
        raise ValueError(f"input_ids has {input_ids.numel()} tokens; cu_seqlens is int32 (at most {_MAX_TOKENS})")
    # Value checks on NumPy views: the description is small and torch's thread pool would only add overhead.
    lens, offsets = seg_lens.numpy(), seq_seg_offsets.numpy()
    num_segments = lens.size
    if seg_trained.numel() != num_segments:
        raise ValueError(f"seg_trained has {seg_trained.numel()} entries but seg_lens has {num_segments}")
    if offsets.size < 1:
        raise ValueError("seq_seg_offsets must have B + 1 >= 1 entries, got an empty tensor")
    if offsets[0] != 0 or offsets[-1] != num_segments:
        raise ValueError(
            f"seq_seg_offsets must start at 0 and end at len(seg_lens) = {num_segments}, "
            f"got {offsets[0]} .. {offsets[-1]}"
        )
    decreasing = np.flatnonzero(np.diff(offsets) < 0)
    if decreasing.size:
        i = int(decreasing[0])
        raise ValueError(f"seq_seg_offsets must be non-decreasing, got {offsets[i]} > {offsets[i + 1]} at index {i}")
    negative = np.flatnonzero(lens < 0)
    if negative.size:
        i = int(negative[0])
        raise ValueError(f"seg_lens must be >= 0, got {lens[i]} at index {i}")
    total = int(lens.sum(dtype=np.int64))
    if total != input_ids.numel():
        raise ValueError(f"seg_lens sums to {total} but len(input_ids) = {input_ids.numel()}")
