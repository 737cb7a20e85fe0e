"""``token_logprobs``: per-token log-probs (and entropy) of an LM head without materialising the logits.

Dispatch: CUDA tensors run the Triton kernels of ``bao_fast.kernels.logprobs``; CPU tensors run the chunked
PyTorch path of ``bao_fast.ops.logprobs_chunked``. Both are wrapped in the ``torch.library`` ops
``bao_fast::token_logprobs_fwd`` / ``bao_fast::token_logprobs_bwd`` (fake impls + ``register_autograd``), so
the public function is differentiable and traceable by ``torch.compile`` without graph breaks.
"""

from __future__ import annotations

import contextlib
import math

import torch

from bao_fast.ops.logprobs_chunked import chunked_backward, chunked_forward

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@torch.library.custom_op("bao_fast::token_logprobs_fwd", mutates_args=())
def _fwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    target_rows: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp f32 [N], entropy f32 [N] or [0], lse f32 [K]); see ``token_logprobs``. ``lse`` is the row
    statistic the backward op takes, in its path's units: natural on the CPU, log2 (``lse * log2(e)``) on CUDA."""
    if hidden.is_cuda:
        from bao_fast.kernels.logprobs import logprobs_forward

        fwd, device = logprobs_forward, torch.cuda.device(hidden.device)  # Triton launches on the current device
    else:
        fwd, device = chunked_forward, contextlib.nullcontext()
    # an enclosing autocast would run the GEMMs in 16 bits
    with device, torch.autocast(hidden.device.type, enabled=False):
        return fwd(
            hidden, weight, bias, targets, target_rows,
            temperature=temperature, ignore_index=ignore_index, with_entropy=with_entropy,
        )  # fmt: skip


@_fwd_op.register_fake
def _(hidden, weight, bias, targets, target_rows, temperature, ignore_index, with_entropy):
    n = hidden.shape[0]
    k = n if target_rows is None else target_rows.shape[0]
    logp = hidden.new_empty(n, dtype=torch.float32)
    entropy = hidden.new_empty(n if with_entropy else 0, dtype=torch.float32)
    return logp, entropy, hidden.new_empty(k, dtype=torch.float32)


@torch.library.custom_op("bao_fast::token_logprobs_bwd", mutates_args=())
def _bwd_op(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    target_rows: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    need_dhidden: bool,
    need_dweight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous (dhidden [N, H], dweight [V, H], dbias f32 [V]) whatever the input strides; a gradient not
    needed (or dbias without bias) is [0]."""
    if hidden.is_cuda:
        from bao_fast.kernels.logprobs import logprobs_backward

        bwd, device = logprobs_backward, torch.cuda.device(hidden.device)
    else:
        bwd, device = chunked_backward, contextlib.nullcontext()
    with device, torch.autocast(hidden.device.type, enabled=False):
        dh, dw, db = bwd(
            grad_logp, grad_entropy, hidden, weight, bias, targets, target_rows, lse, entropy,
            temperature=temperature, ignore_index=ignore_index, need_dhidden=need_dhidden, need_dweight=need_dweight,
        )  # fmt: skip
    return (
        dh if dh is not None else hidden.new_empty(0),
        dw if dw is not None else weight.new_empty(0),
        db if db is not None else hidden.new_empty(0, dtype=torch.float32),
    )


@_bwd_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, targets, target_rows, lse, entropy, temperature, ignore_index,
      need_dhidden, need_dweight):  # fmt: skip
    dh = hidden.new_empty(hidden.shape) if need_dhidden else hidden.new_empty(0)  # contiguous, as both paths
    dw = weight.new_empty(weight.shape) if need_dweight else weight.new_empty(0)
    db = hidden.new_empty(weight.shape[0] if bias is not None and need_dweight else 0, dtype=torch.float32)
    return dh, dw, db


def _no_double_backward(ctx, *grads):
    raise RuntimeError("token_logprobs does not support double backward (its gradient is not differentiable)")


torch.library.register_autograd("bao_fast::token_logprobs_bwd", _no_double_backward)


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, target_rows, temperature, ignore_index, with_entropy = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, target_rows, lse, entropy if with_entropy else None)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, bias, targets, target_rows, lse, entropy = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
    grad_entropy = None if entropy is None or grad_entropy is None else grad_entropy.float().contiguous()
    need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
    dh, dw, db = _bwd_op(
        grad_logp.float().contiguous(), grad_entropy, hidden, weight, bias, targets, target_rows, lse,
        entropy, ctx.temperature, ctx.ignore_index, need_dh, need_dw or need_db,
    )  # fmt: skip
    return (
        dh if need_dh else None,
        dw if need_dw else None,
        db.to(bias.dtype) if need_db else None,
        None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("bao_fast::token_logprobs_fwd", _backward, setup_context=_setup_context)


def _validate(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    target_rows: torch.Tensor | None,
) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be bfloat16, float16 or float32, got {hidden.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, H] with H={hidden.shape[1]}, got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocab row")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 [N={hidden.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != weight.shape[:1] or bias.dtype != weight.dtype:
            raise ValueError(f"bias must be {weight.dtype} [V={weight.shape[0]}], got {bias.dtype} {tuple(bias.shape)}")
    if target_rows is not None:
        if not isinstance(target_rows, torch.Tensor):
            raise TypeError(f"target_rows must be a torch.Tensor or None, got {type(target_rows).__name__}")
        if target_rows.dim() != 1 or target_rows.dtype != torch.int64:
            raise ValueError(f"target_rows must be int64 [K], got {target_rows.dtype} {tuple(target_rows.shape)}")
    tensors = [("weight", weight), ("targets", targets), ("bias", bias), ("target_rows", target_rows)]
    for name, t in tensors:
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not 0 < temperature < math.inf:  # comparisons, not math.isfinite: a SymFloat under torch.compile(dynamic)
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if hidden.device.type == "cpu" and not torch.compiler.is_compiling():
        _validate_values(hidden.shape[0], weight.shape[0], targets, ignore_index, target_rows)


def _validate_values(
    n: int, v: int, targets: torch.Tensor, ignore_index: int, target_rows: torch.Tensor | None
) -> None:
    """Index range checks; CPU only (on the GPU they would cost a host synchronisation)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
    if bool(bad.any()):
        raise ValueError(f"targets must lie in [0, {v}) or equal ignore_index={ignore_index}")
    if target_rows is not None and target_rows.numel():
        if int(target_rows.min()) < 0 or int(target_rows.max()) >= n:
            raise ValueError(f"target_rows must lie in [0, {n})")
        if target_rows.unique().numel() != target_rows.numel():
            raise ValueError("target_rows must not contain duplicates")


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    target_rows: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each row's target token under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``[N, H]`` bf16/fp16/fp32 final hidden states (any strides).
        weight: ``[V, H]`` LM-head weight, same dtype. bias: optional ``[V]``, same dtype.
        targets: int64 ``[N]``; row ``t`` predicts ``targets[t]``; ``ignore_index`` rows are skipped.
        temperature: logits are divided by it (> 0), as in sampling.
        return_entropy: also return the entropy ``logsumexp(z) - sum(softmax(z) * z)`` (positive).
        target_rows: optional int64 ``[K]`` unique row indices; only these rows are computed (e.g. a
            PackedBatch's ``target_rows``, skipping prompt/observation rows). Outputs stay ``[N]``-shaped
            and row-aligned so no scatter is needed downstream.
    Returns:
        logp f32 ``[N]`` (and entropy f32 ``[N]``). Rows that are ignored or not in ``target_rows`` are 0
        and receive no gradient. Differentiable w.r.t. hidden, weight and bias, through both outputs, once:
        differentiating the gradient again (double backward) raises a RuntimeError.

    The logits are never materialised beyond one tile; dweight is accumulated in fp32 deterministically.
    Index ranges (targets, target_rows) are checked on the CPU only: on the GPU that would synchronise.
    """
    _validate(hidden, weight, targets, bias, temperature, ignore_index, target_rows)
    logp, entropy, _ = _fwd_op(
        hidden, weight, bias.contiguous() if bias is not None else None, targets.contiguous(),
        target_rows.contiguous() if target_rows is not None else None,
        float(temperature), ignore_index, return_entropy,
    )  # fmt: skip
    return (logp, entropy) if return_entropy else logp
