"""Triton token log-prob kernels (run under TRITON_INTERPRET=1 on CPU) against the fp64 reference."""

from __future__ import annotations

import pytest
import torch
from bao_fast.kernels.logprobs import logprobs_backward, logprobs_forward

from bao_fast.ops.reference import token_logprobs_reference

IGNORE = -100
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU tensors: the Triton interpreter
# Output tolerance per input dtype: bf16/fp16 gradients are rounded to the input dtype on output.
TOL = {torch.float32: 5e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # launcher buffers start as NaN / 2**30


def _inputs(n, h, v, dtype, *, bias, rows, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 3 / h**0.5).to(dtype)
    b = torch.randn(v, generator=gen).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.randperm(n, generator=gen)[: n // 5]] = IGNORE
    target_rows = torch.randperm(n, generator=gen)[: (2 * n) // 3] if rows else None
    return tuple(t.to(DEVICE) if t is not None else None for t in (hidden, weight, b, targets, target_rows))


def _reference(hidden, weight, bias, targets, rows, g_logp, g_ent, temperature):
    leaves = [x.double().requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    logp, ent = token_logprobs_reference(
        leaves[0], leaves[1], targets, bias=leaves[2], temperature=temperature, return_entropy=True,
        ignore_index=IGNORE, target_rows=rows,
    )  # fmt: skip
    loss = (logp * g_logp.double()).sum()
    if g_ent is not None:
        loss = loss + (ent * g_ent.double()).sum()
    loss.backward()
    return logp, ent, [x.grad if x is not None else None for x in leaves]


def _assert_close(actual, expected, tol, name):
    scale = max(1.0, expected.abs().max().item())
    err = (actual.double() - expected).abs().max().item()
    assert err <= tol * scale, f"{name}: max abs err {err:.3e} > {tol * scale:.3e}"


CASES = [
    # n, h, v, dtype, temperature, entropy, bias, rows, splits, chunk
    (37, 40, 101, torch.float32, 1.0, True, False, False, 1, None),
    (37, 40, 101, torch.float32, 0.7, True, True, True, 3, 64),
    (45, 72, 130, torch.float32, 1.3, False, True, False, 2, 32),
    (29, 24, 77, torch.bfloat16, 0.7, True, True, True, 2, 64),
    (33, 48, 96, torch.bfloat16, 1.0, False, False, False, 1, None),
    (21, 40, 67, torch.float16, 1.3, True, False, True, 2, 32),
    (18, 136, 50, torch.float16, 1.0, True, True, False, 1, None),
]


@pytest.mark.parametrize(("n", "h", "v", "dtype", "temperature", "entropy", "bias", "rows", "splits", "chunk"), CASES)
def test_kernels_match_fp64_reference(n, h, v, dtype, temperature, entropy, bias, rows, splits, chunk):
    hidden, weight, b, targets, target_rows = _inputs(n, h, v, dtype, bias=bias, rows=rows, seed=n + v)
    logp, ent, lse = logprobs_forward(
        hidden, weight, b, targets, target_rows, temperature=temperature, ignore_index=IGNORE,
        with_entropy=entropy, num_splits=splits,
    )  # fmt: skip
    g_logp = torch.randn(n, device=DEVICE)
    g_ent = torch.randn(n, device=DEVICE) if entropy else None
    ref_logp, ref_ent, ref_grads = _reference(hidden, weight, b, targets, target_rows, g_logp, g_ent, temperature)
    assert logp.dtype == torch.float32 and logp.shape == (n,)
    _assert_close(logp, ref_logp, 5e-5 if dtype == torch.float32 else 1e-4, "logp")
    if entropy:
        _assert_close(ent, ref_ent, 5e-5 if dtype == torch.float32 else 1e-4, "entropy")
    else:
        assert ent.numel() == 0
    dh, dw, db = logprobs_backward(
        g_logp, g_ent, hidden, weight, b, targets, target_rows, lse, ent if entropy else None,
        temperature=temperature, ignore_index=IGNORE, chunk_cols=chunk,
    )  # fmt: skip
    assert dh.dtype == dtype and dw.dtype == dtype
    _assert_close(dh, ref_grads[0], TOL[dtype], "dhidden")
    _assert_close(dw, ref_grads[1], TOL[dtype], "dweight")
    if bias:
        _assert_close(db, ref_grads[2], TOL[dtype], "dbias")
    else:
        assert db is None


def _masked_vocab_inputs(n, h, v, masked, seed):
    """Inputs whose bias is ``-inf`` on vocab ids ``masked`` (a range covering whole tiles / splits); targets
    avoid them (a -inf target's logp is -inf)."""
    hidden, weight, b, _, _ = _inputs(n, h, v, torch.float32, bias=True, rows=False, seed=seed)
    b[masked] = float("-inf")
    allowed = torch.ones(v, dtype=torch.bool)
    allowed[masked] = False
    pool = allowed.nonzero().squeeze(1)
    targets = pool[torch.randint(0, pool.numel(), (n,), generator=torch.Generator().manual_seed(seed))]
    return hidden, weight, b, targets.to(DEVICE)


# p * z2 is 0 * -inf = NaN on masked lanes; the kernel never selects it (p > 0 only), but the interpreter's NumPy
# warns on computing it.
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize(
    ("masked", "splits"),
    [(slice(0, 32), 1), (slice(0, 32), 2), (slice(33, 67), 2), (slice(5, 40), 3)],
    ids=["first-tile", "first-split", "last-split", "tile-and-a-half"],
)
def test_minus_inf_logits_add_nothing(masked, splits):
    """A -inf bias over a whole vocab tile or split (masked vocabulary) gives the reference's finite values
    and gradients; they were NaN (exp2(-inf - -inf) in the online softmax, 0 * -inf in the entropy)."""
    n, v = 19, 67
    hidden, weight, b, targets = _masked_vocab_inputs(n, 24, v, masked, seed=5)
    logp, ent, lse = logprobs_forward(
        hidden, weight, b, targets, None, temperature=0.8, ignore_index=IGNORE, with_entropy=True, num_splits=splits
    )
    g_logp, g_ent = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    ref_logp, ref_ent, ref_grads = _reference(hidden, weight, b, targets, None, g_logp, g_ent, 0.8)
    assert torch.isfinite(ref_logp).all() and torch.isfinite(ref_ent).all()
    _assert_close(logp, ref_logp, 5e-5, "logp")
    _assert_close(ent, ref_ent, 5e-5, "entropy")
    dh, dw, db = logprobs_backward(
        g_logp, g_ent, hidden, weight, b, targets, None, lse, ent, temperature=0.8, ignore_index=IGNORE,
        chunk_cols=32,
    )  # fmt: skip
    for name, got, want in zip(("dhidden", "dweight", "dbias"), (dh, dw, db), ref_grads):
        assert torch.isfinite(want).all()
        _assert_close(got, want, TOL[torch.float32], name)


def test_confident_rows_keep_their_gradient_precision():
    """The backward recomputes p in the forward's log2 units: on peaked rows (|logits| ~ 1e3, p_max ~ 1) the
    fp32 gradients stay within 1e-5 of fp64 (they were off by ~1e-4 when it mixed natural and log2 units)."""
    hidden, weight, _, targets, _ = _inputs(16, 32, 64, torch.float32, bias=False, rows=False, seed=9)
    hidden = hidden * 1000
    _, _, lse = logprobs_forward(
        hidden, weight, None, targets, None, temperature=1.0, ignore_index=IGNORE, with_entropy=False
    )
    g = torch.randn(16, device=DEVICE)
    dh, dw, _ = logprobs_backward(g, None, hidden, weight, None, targets, None, lse, None, temperature=1.0,
                                  ignore_index=IGNORE)  # fmt: skip
    _, _, ref = _reference(hidden, weight, None, targets, None, g, None, 1.0)
    _assert_close(dh, ref[0], 1e-5, "dhidden")
    _assert_close(dw, ref[1], 1e-5, "dweight")


def test_zero_hidden_size_still_writes_dbias():
    """H = 0: the logits are bias / T; dbias is computed (no hidden tile would have run the dw kernel)."""
    hidden, weight, b, targets, _ = _inputs(11, 0, 40, torch.float32, bias=True, rows=False, seed=6)
    logp, ent, lse = logprobs_forward(
        hidden, weight, b, targets, None, temperature=0.9, ignore_index=IGNORE, with_entropy=True
    )
    g_logp, g_ent = torch.randn(11, device=DEVICE), torch.randn(11, device=DEVICE)
    _, _, db = logprobs_backward(
        g_logp, g_ent, hidden, weight, b, targets, None, lse, ent, temperature=0.9, ignore_index=IGNORE
    )
    ref_logp, _, ref_grads = _reference(hidden, weight, b, targets, None, g_logp, g_ent, 0.9)
    _assert_close(logp, ref_logp, 5e-5, "logp")
    _assert_close(db, ref_grads[2], TOL[torch.float32], "dbias")


def test_skipped_rows_are_zero_and_get_no_gradient():
    hidden, weight, _, targets, rows = _inputs(26, 32, 70, torch.float32, bias=False, rows=True, seed=1)
    logp, ent, lse = logprobs_forward(
        hidden, weight, None, targets, rows, temperature=1.0, ignore_index=IGNORE, with_entropy=True, num_splits=2
    )
    dead = torch.ones(26, dtype=torch.bool, device=DEVICE)
    dead[rows] = False
    dead |= targets == IGNORE
    assert dead.any() and (~dead).any()
    assert torch.all(logp[dead] == 0) and torch.all(ent[dead] == 0)
    assert torch.all(logp[~dead] < 0) and torch.all(ent[~dead] > 0)
    dh, _, _ = logprobs_backward(
        torch.randn(26, device=DEVICE), torch.randn(26, device=DEVICE), hidden, weight, None, targets, rows, lse, ent,
        temperature=1.0, ignore_index=IGNORE, chunk_cols=32,
    )  # fmt: skip
    assert torch.all(dh[dead] == 0)
    assert torch.all(dh[~dead].abs().sum(1) > 0)


def test_backward_is_bitwise_deterministic():
    hidden, weight, b, targets, _ = _inputs(40, 32, 90, torch.float32, bias=True, rows=False, seed=2)
    _, ent, lse = logprobs_forward(
        hidden, weight, b, targets, None, temperature=0.9, ignore_index=IGNORE, with_entropy=True, num_splits=2
    )
    g_logp, g_ent = torch.randn(40, device=DEVICE), torch.randn(40, device=DEVICE)

    def run():
        return logprobs_backward(
            g_logp, g_ent, hidden, weight, b, targets, None, lse, ent, temperature=0.9, ignore_index=IGNORE,
            chunk_cols=32,
        )

    first, second = run(), run()
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_empty_target_rows():
    hidden, weight, _, targets, _ = _inputs(9, 16, 40, torch.float32, bias=False, rows=False, seed=3)
    rows = torch.empty(0, dtype=torch.int64, device=DEVICE)
    logp, _, lse = logprobs_forward(
        hidden, weight, None, targets, rows, temperature=1.0, ignore_index=IGNORE, with_entropy=False
    )
    assert lse.numel() == 0 and torch.all(logp == 0)
    dh, dw, _ = logprobs_backward(
        torch.ones(9, device=DEVICE), None, hidden, weight, None, targets, rows, lse, None,
        temperature=1.0, ignore_index=IGNORE,
    )  # fmt: skip
    assert torch.all(dh == 0) and torch.all(dw == 0)


@pytest.mark.parametrize(("need_dhidden", "need_dweight"), [(True, False), (False, True)])
def test_requested_gradients_only(need_dhidden, need_dweight):
    hidden, weight, b, targets, rows = _inputs(27, 24, 60, torch.float32, bias=True, rows=True, seed=4)
    _, _, lse = logprobs_forward(
        hidden, weight, b, targets, rows, temperature=1.0, ignore_index=IGNORE, with_entropy=False
    )
    g = torch.randn(27, device=DEVICE)
    dh, dw, db = logprobs_backward(
        g, None, hidden, weight, b, targets, rows, lse, None, temperature=1.0, ignore_index=IGNORE,
        need_dhidden=need_dhidden, need_dweight=need_dweight, chunk_cols=32,
    )  # fmt: skip
    _, _, ref = _reference(hidden, weight, b, targets, rows, g, None, 1.0)
    assert (dh is None) != need_dhidden and (dw is None) != need_dweight and (db is None) != need_dweight
    if need_dhidden:
        _assert_close(dh, ref[0], TOL[torch.float32], "dhidden")
    else:
        _assert_close(dw, ref[1], TOL[torch.float32], "dweight")
        _assert_close(db, ref[2], TOL[torch.float32], "dbias")
