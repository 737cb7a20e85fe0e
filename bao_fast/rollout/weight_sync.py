"""Full-weight iteration from a (possibly FSDP2-sharded) training model, for pushing into an engine.

``iter_full_weights(model, dtype, bucket_mb)`` yields ``(hf_name, full_tensor)`` for every parameter of
``model`` in registration order. Sharded parameters (``DTensor``, as ``fully_shard`` makes them) are cast
to ``dtype`` *before* the all-gather (half the traffic for bf16) and gathered with ``full_tensor()``, so
every rank of the mesh must consume the iterator to the end, in the same order. Gathers are grouped into
buckets of about ``bucket_mb`` MiB: a bucket is gathered, then handed out, then dropped, which bounds the
extra memory at one bucket (or one parameter, if larger) while keeping the collectives back to back.

Tied parameters appear once (``named_parameters`` deduplicates them); names lose the wrapper prefixes that
``torch.compile`` and activation checkpointing insert, so they are the HF checkpoint names that vLLM's and
transformers' loaders expect.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def hf_name(name: str) -> str:
    """Strip wrapper prefixes (``_orig_mod.``, ``_checkpoint_wrapped_module.``) from a parameter name."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _full(param: Tensor, dtype: torch.dtype) -> Tensor:
    tensor = param.detach()
    if isinstance(tensor, DTensor):
        return tensor.to(dtype).full_tensor()
    return tensor.to(dtype)


def iter_full_weights(model: nn.Module, dtype: torch.dtype, bucket_mb: float = 512) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(hf_name, full tensor of dtype)`` per parameter, gathered in buckets of ~``bucket_mb`` MiB."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not bucket_mb > 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
    limit = bucket_mb * 2**20
    itemsize = torch.empty((), dtype=dtype).element_size()
    bucket: list[tuple[str, Tensor]] = []
    size = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            bucket.append((hf_name(name), _full(param, dtype)))
            size += param.numel() * itemsize
            if size >= limit:
                yield from bucket
                bucket, size = [], 0
        yield from bucket
