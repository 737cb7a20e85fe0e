"""``bao_fast.ops.token_logprobs`` on the CPU (chunked torch path): values, gradients, errors, compile."""

from __future__ import annotations

import pytest
import torch

from bao_fast.ops.logprobs import token_logprobs
from bao_fast.ops.logprobs_chunked import chunked_backward, chunked_forward
from bao_fast.ops.reference import token_logprobs_reference

IGNORE = -100


def _inputs(n, h, v, dtype=torch.float32, *, bias=False, rows=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 3 / h**0.5).to(dtype)
    b = torch.randn(v, generator=gen).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.randperm(n, generator=gen)[: n // 5]] = IGNORE
    target_rows = torch.randperm(n, generator=gen)[: (2 * n) // 3] if rows else None
    return hidden, weight, b, targets, target_rows


def _grads(fn, leaves, g_logp, g_ent):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in leaves]
    out = fn(*leaves)
    logp, ent = out if isinstance(out, tuple) else (out, None)
    loss = (logp.double() * g_logp).sum() if g_logp is not None else 0.0
    if g_ent is not None:
        loss = loss + (ent.double() * g_ent).sum()
    loss.backward()
    return logp, ent, [x.grad if x is not None else None for x in leaves]


def _close(actual, expected, tol, name):
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol * max(1.0, expected.abs().max().item()), f"{name}: max abs err {err:.3e}"


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
@pytest.mark.parametrize(("entropy", "bias", "rows"), [(True, True, True), (False, False, False), (True, False, False)])
def test_matches_fp64_reference(temperature, entropy, bias, rows):
    hidden, weight, b, targets, target_rows = _inputs(53, 40, 131, bias=bias, rows=rows, seed=int(temperature * 10))
    g_logp = torch.randn(53, dtype=torch.float64)
    g_ent = torch.randn(53, dtype=torch.float64) if entropy else None
    kw = {"temperature": temperature, "return_entropy": entropy, "ignore_index": IGNORE, "target_rows": target_rows}
    logp, ent, grads = _grads(lambda h, w, bb: token_logprobs(h, w, targets, bias=bb, **kw), (hidden, weight, b),
                              g_logp, g_ent)  # fmt: skip
    ref = _grads(lambda h, w, bb: token_logprobs_reference(h, w, targets, bias=bb, **kw), (hidden, weight, b),
                 g_logp, g_ent)  # fmt: skip
    assert logp.dtype == torch.float32 and logp.shape == (53,)
    _close(logp, ref[0], 1e-5, "logp")
    if entropy:
        assert ent.dtype == torch.float32
        _close(ent, ref[1], 1e-5, "entropy")
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref[2]):
        if want is None:
            assert got is None
        else:
            _close(got, want, 1e-5, f"d{name}")


def test_entropy_only_gradient():
    hidden, weight, _, targets, _ = _inputs(20, 24, 60, seed=5)
    g = torch.randn(20, dtype=torch.float64)
    ent_only = _grads(lambda h, w: token_logprobs(h, w, targets, return_entropy=True)[1], (hidden, weight), g, None)
    ref = _grads(lambda h, w: token_logprobs_reference(h, w, targets, return_entropy=True)[1], (hidden, weight),
                 g, None)  # fmt: skip
    _close(ent_only[0], ref[0], 1e-5, "entropy")
    _close(ent_only[2][0], ref[2][0], 1e-5, "dhidden")
    _close(ent_only[2][1], ref[2][1], 1e-5, "dweight")


@pytest.mark.parametrize(("row_chunk", "tile_bytes"), [(7, 4 * 7 * 16), (64, 4 * 64 * 1000), (1, 4)])
def test_chunking_does_not_change_results(row_chunk, tile_bytes):
    hidden, weight, b, targets, rows = _inputs(30, 20, 90, bias=True, rows=True, seed=7)
    kw = {"temperature": 0.8, "ignore_index": IGNORE}
    logp, ent, lse = chunked_forward(hidden, weight, b, targets, rows, with_entropy=True, tile_bytes=tile_bytes,
                                     row_chunk=row_chunk, **kw)  # fmt: skip
    ref_logp, ref_ent = token_logprobs_reference(hidden, weight, targets, bias=b, return_entropy=True,
                                                 target_rows=rows, **kw)  # fmt: skip
    _close(logp, ref_logp, 1e-5, "logp")
    _close(ent, ref_ent, 1e-5, "entropy")
    g_logp, g_ent = torch.randn(30), torch.randn(30)
    grads = chunked_backward(g_logp, g_ent, hidden, weight, b, targets, rows, lse, ent, tile_bytes=tile_bytes,
                             row_chunk=row_chunk, **kw)  # fmt: skip
    ref = _grads(lambda h, w, bb: token_logprobs_reference(h, w, targets, bias=bb, return_entropy=True,
                                                           target_rows=rows, **kw), (hidden, weight, b),
                 g_logp.double(), g_ent.double())  # fmt: skip
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref[2]):
        _close(got, want, 1e-5, f"d{name}")


@pytest.mark.parametrize("masked", [slice(0, 48), slice(40, 90), slice(3, 90)], ids=["head", "tail", "all-but-3"])
def test_minus_inf_logits_add_nothing(masked):
    """A -inf bias over whole logit tiles (a masked vocabulary) gives the reference's finite values and
    gradients; they were NaN (exp(-inf - -inf) in the online softmax, 0 * -inf in the entropy)."""
    hidden, weight, b, _, _ = _inputs(25, 20, 90, bias=True, seed=8)
    b[masked] = float("-inf")
    allowed = torch.ones(90, dtype=torch.bool)
    allowed[masked] = False
    pool = allowed.nonzero().squeeze(1)
    targets = pool[torch.randint(0, pool.numel(), (25,), generator=torch.Generator().manual_seed(8))]
    kw = {"temperature": 0.8, "ignore_index": IGNORE}
    tiles = {"tile_bytes": 4 * 8 * 16, "row_chunk": 8}  # 16-column tiles: the masked ranges cover whole ones
    logp, ent, lse = chunked_forward(hidden, weight, b, targets, None, with_entropy=True, **tiles, **kw)
    ref_logp, ref_ent = token_logprobs_reference(hidden, weight, targets, bias=b, return_entropy=True, **kw)
    assert torch.isfinite(ref_logp).all() and torch.isfinite(ref_ent).all()
    _close(logp, ref_logp, 1e-5, "logp")
    _close(ent, ref_ent, 1e-5, "entropy")
    g_logp, g_ent = torch.randn(25), torch.randn(25)
    grads = chunked_backward(g_logp, g_ent, hidden, weight, b, targets, None, lse, ent, **tiles, **kw)
    ref = _grads(lambda h, w, bb: token_logprobs_reference(h, w, targets, bias=bb, return_entropy=True, **kw),
                 (hidden, weight, b), g_logp.double(), g_ent.double())  # fmt: skip
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref[2]):
        assert torch.isfinite(want).all()
        _close(got, want, 1e-5, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    hidden, weight, b, targets, _ = _inputs(25, 32, 70, dtype, bias=True, seed=9)
    g = torch.randn(25, dtype=torch.float64)
    logp, ent, grads = _grads(lambda h, w, bb: token_logprobs(h, w, targets, bias=bb, return_entropy=True),
                              (hidden, weight, b), g, g)  # fmt: skip
    ref = _grads(lambda h, w, bb: token_logprobs_reference(h, w, targets, bias=bb, return_entropy=True),
                 (hidden, weight, b), g, g)  # fmt: skip
    assert logp.dtype == torch.float32 and grads[0].dtype == dtype and grads[1].dtype == dtype
    _close(logp, ref[0], 1e-5, "logp")
    _close(ent, ref[1], 1e-5, "entropy")
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref[2]):
        _close(got, want, 1e-2, f"d{name}")


def test_unlisted_and_ignored_rows_are_zero_without_gradient():
    hidden, weight, _, targets, rows = _inputs(30, 16, 50, rows=True, seed=11)
    hidden.requires_grad_()
    logp, ent = token_logprobs(hidden, weight, targets, return_entropy=True, target_rows=rows)
    (logp.sum() + ent.sum()).backward()
    dead = torch.ones(30, dtype=torch.bool)
    dead[rows] = False
    dead |= targets == IGNORE
    assert torch.all(logp[dead] == 0) and torch.all(ent[dead] == 0) and torch.all(hidden.grad[dead] == 0)
    assert torch.all(logp[~dead] < 0) and torch.all(ent[~dead] > 0)


def test_works_under_torch_compile():
    hidden, weight, b, targets, rows = _inputs(19, 16, 45, bias=True, rows=True, seed=13)

    def f(h, w, bb):
        logp, ent = token_logprobs(h, w, targets, bias=bb, temperature=0.9, return_entropy=True, target_rows=rows)
        return logp.sum() + 0.1 * ent.sum()

    leaves = [x.clone().requires_grad_() for x in (hidden, weight, b)]
    torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves).backward()
    eager = [x.clone().requires_grad_() for x in (hidden, weight, b)]
    f(*eager).backward()
    for got, want in zip(leaves, eager):
        torch.testing.assert_close(got.grad, want.grad)


def test_compiles_with_dynamic_shapes():
    """torch.compile(dynamic=True, fullgraph=True) with the default temperature (a SymFloat there, on which the
    validation's math.isfinite broke the graph) over batches of several sizes, against eager."""
    _, weight, _, _, _ = _inputs(1, 16, 45, seed=43)

    def f(h, w, t, r):
        logp, ent = token_logprobs(h, w, t, return_entropy=True, target_rows=r)
        return (logp * torch.arange(h.shape[0])).sum() + ent.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (9, 17, 30):
        hidden, _, _, targets, rows = _inputs(n, 16, 45, rows=True, seed=n)
        leaves = [(x.clone().requires_grad_(), weight.clone().requires_grad_()) for x in (hidden, hidden)]
        got, want = compiled(*leaves[0], targets, rows), f(*leaves[1], targets, rows)
        got.backward()
        want.backward()
        torch.testing.assert_close(got, want)
        for a, b in zip(leaves[0], leaves[1], strict=True):
            torch.testing.assert_close(a.grad, b.grad)


def test_opcheck_registration():
    hidden, weight, b, targets, rows = _inputs(11, 16, 33, bias=True, rows=True, seed=17)
    args = (hidden.requires_grad_(), weight.requires_grad_(), b.requires_grad_(), targets, rows, 1.1, IGNORE, True)
    torch.library.opcheck(torch.ops.bao_fast.token_logprobs_fwd.default, args)


def _bad(**over):
    hidden, weight, b, targets, _ = _inputs(6, 8, 12, bias=True, seed=19)
    kw = {"hidden": hidden, "weight": weight, "targets": targets, "bias": b}
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    ("over", "exc", "match"),
    [
        ({"hidden": torch.randn(6, 8, 1)}, ValueError, "hidden"),
        ({"hidden": torch.randn(6, 8, dtype=torch.float64)}, TypeError, "hidden"),
        ({"hidden": [[0.0]]}, TypeError, "hidden"),
        ({"weight": torch.randn(12, 9)}, ValueError, "weight"),
        ({"weight": torch.randn(12, 8).half()}, TypeError, "weight"),
        ({"weight": torch.randn(0, 8)}, ValueError, "weight"),
        ({"weight": torch.randn(12, 8, device="meta")}, ValueError, "weight"),
        ({"targets": torch.zeros(6, dtype=torch.int32)}, ValueError, "targets"),
        ({"targets": torch.zeros(5, dtype=torch.int64)}, ValueError, "targets"),
        ({"targets": torch.full((6,), 12)}, ValueError, "targets"),
        ({"targets": torch.full((6,), -1)}, ValueError, "targets"),
        ({"bias": torch.randn(11)}, ValueError, "bias"),
        ({"bias": [0.0] * 12}, TypeError, "bias must be a torch.Tensor or None, got list"),
        ({"target_rows": [0, 1]}, TypeError, "target_rows must be a torch.Tensor or None, got list"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"temperature": True}, TypeError, "temperature"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index"),
        ({"target_rows": torch.tensor([0, 6])}, ValueError, "target_rows"),
        ({"target_rows": torch.tensor([1, 1])}, ValueError, "duplicates"),
        ({"target_rows": torch.tensor([1.0])}, ValueError, "target_rows"),
    ],
)
def test_bad_arguments_raise(over, exc, match):
    kw = _bad(**over)
    with pytest.raises(exc, match=match):
        token_logprobs(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), **kw)


@pytest.mark.parametrize("trainable", ["hidden", "weight", "bias"])
def test_only_requested_gradients(trainable):
    hidden, weight, b, targets, rows = _inputs(23, 16, 41, bias=True, rows=True, seed=23)
    leaves = {"hidden": hidden, "weight": weight, "bias": b}
    leaves[trainable].requires_grad_()
    logp = token_logprobs(hidden, weight, targets, bias=b, target_rows=rows, temperature=1.2)
    (logp * torch.arange(23.0)).sum().backward()
    ref = {k: v.detach().clone().requires_grad_(k == trainable) for k, v in leaves.items()}
    ref_logp = token_logprobs_reference(ref["hidden"], ref["weight"], targets, bias=ref["bias"], target_rows=rows,
                                        temperature=1.2)  # fmt: skip
    (ref_logp * torch.arange(23.0, dtype=torch.float64)).sum().backward()
    for name, leaf in leaves.items():
        if name == trainable:
            _close(leaf.grad, ref[name].grad, 1e-5, f"d{name}")
        else:
            assert leaf.grad is None


def _strided(n, h, v, seed):
    """Views a consumer passes straight in: every other hidden column, a transposed [H, V] head, strided
    bias / targets / target_rows."""
    hidden, weight, b, targets, rows = _inputs(n, 2 * h, v, bias=True, rows=True, seed=seed)
    head = weight[:, :h].T.contiguous()  # [H, V]
    targets2 = torch.stack([targets, torch.full_like(targets, IGNORE)], 1).flatten()
    bias2 = torch.stack([b, torch.zeros_like(b)], 1).flatten()
    rows2 = torch.stack([rows, rows], 1).flatten()
    return hidden, head, bias2, targets2, rows2


def _strided_views(hidden, head, bias2, targets2, rows2):
    return hidden[:, ::2], head.T, bias2[::2], targets2[::2], rows2[::2]


@pytest.mark.parametrize("compiled", [False, True])
def test_strided_views_match_reference(compiled):
    """hidden[:, ::2], head.T, sliced bias / targets / rows: values and gradients of the base tensors, eager and
    under torch.compile (the backward's outputs are contiguous, as its fake impl says)."""
    base = _strided(21, 16, 37, seed=29)
    g_logp, g_ent = torch.randn(21, dtype=torch.float64), torch.randn(21, dtype=torch.float64)

    def run(fn, leaves):
        h, w, bb, t, r = _strided_views(*leaves, base[3], base[4])
        logp, ent = fn(h, w, t, bias=bb, temperature=0.9, return_entropy=True, target_rows=r)
        ((logp.double() * g_logp).sum() + (ent.double() * g_ent).sum()).backward()
        return logp, ent

    fn = torch.compile(token_logprobs, backend="aot_eager", fullgraph=True) if compiled else token_logprobs
    leaves = [x.clone().requires_grad_() for x in base[:3]]
    ref_leaves = [x.double().requires_grad_() for x in base[:3]]
    logp, ent = run(fn, leaves)
    ref_logp, ref_ent = run(token_logprobs_reference, ref_leaves)
    _close(logp, ref_logp, 1e-5, "logp")
    _close(ent, ref_ent, 1e-5, "entropy")
    for name, got, want in zip(("hidden", "weight", "bias"), leaves, ref_leaves, strict=True):
        _close(got.grad, want.grad, 1e-5, f"d{name}")


@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_opcheck_with_strided_views(need):
    """Fake and real impls of both ops agree on strides for views (a transposed weight made the fake dweight
    transposed while the CPU and CUDA impls return it contiguous: inductor's stride assert failed)."""
    hidden, weight, b, targets, rows = _strided_views(*_strided(13, 16, 33, seed=31))
    fwd_args = (hidden, weight, b, targets, rows, 1.1, IGNORE, True)
    torch.library.opcheck(torch.ops.bao_fast.token_logprobs_fwd.default, fwd_args)
    _, ent, lse = torch.ops.bao_fast.token_logprobs_fwd(*fwd_args)
    dh, dw, db = torch.ops.bao_fast.token_logprobs_bwd(torch.randn(13), torch.randn(13), hidden, weight, b, targets,
                                                       rows, lse, ent, 1.1, IGNORE, *need)  # fmt: skip
    assert all(t.is_contiguous() for t in (dh, dw, db))
    assert dh.shape == ((13, 16) if need[0] else (0,)) and dw.shape == ((33, 16) if need[1] else (0,))
    bwd_args = (torch.randn(13), torch.randn(13), hidden, weight, b, targets, rows, lse, ent, 1.1, IGNORE, *need)
    torch.library.opcheck(torch.ops.bao_fast.token_logprobs_bwd.default, bwd_args)


def test_fp32_under_an_enclosing_autocast():
    """A training step under torch.autocast(bfloat16) must not turn the op's fp32 tile GEMMs into bf16 ones
    (errors of 3e-2 instead of 1e-5, forward and backward)."""
    hidden, weight, b, targets, rows = _inputs(40, 64, 300, bias=True, rows=True, seed=41)
    g = torch.randn(40, dtype=torch.float64)
    kw = {"temperature": 0.8, "return_entropy": True, "target_rows": rows}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent, grads = _grads(lambda h, w, bb: token_logprobs(h, w, targets, bias=bb, **kw), (hidden, weight, b),
                                  g, g)  # fmt: skip
    ref = _grads(lambda h, w, bb: token_logprobs_reference(h, w, targets, bias=bb, **kw), (hidden, weight, b), g, g)
    _close(logp, ref[0], 1e-5, "logp")
    _close(ent, ref[1], 1e-5, "entropy")
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref[2], strict=True):
        _close(got, want, 1e-5, f"d{name}")


def test_double_backward_raises_a_clear_error():
    hidden, weight, _, targets, _ = _inputs(9, 8, 20, seed=37)
    hidden.requires_grad_()
    (dh,) = torch.autograd.grad(token_logprobs(hidden, weight, targets).sum(), hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="token_logprobs does not support double backward"):
        dh.sum().backward()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "h", "v", "rows"), [(53, 40, 131, True), (700, 264, 5003, False)])
def test_cuda_op_matches_fp64_reference(dtype, n, h, v, rows):
    """The Triton path through the public op (custom op + autograd), production tiles, shapes that are not
    multiples of any tile; values and all three gradients against fp64."""
    hidden, weight, b, targets, target_rows = (
        x.cuda() if x is not None else None for x in _inputs(n, h, v, dtype, bias=True, rows=rows, seed=n)
    )
    g_logp = torch.randn(n, dtype=torch.float64, device="cuda")
    g_ent = torch.randn(n, dtype=torch.float64, device="cuda")
    kw = {"temperature": 0.8, "return_entropy": True, "ignore_index": IGNORE, "target_rows": target_rows}
    logp, ent, grads = _grads(lambda h_, w, bb: token_logprobs(h_, w, targets, bias=bb, **kw), (hidden, weight, b),
                              g_logp, g_ent)  # fmt: skip
    leaves = tuple(x.double() for x in (hidden, weight, b))
    ref = _grads(lambda h_, w, bb: token_logprobs_reference(h_, w, targets, bias=bb, **kw), leaves, g_logp, g_ent)
    assert logp.is_cuda and logp.dtype == torch.float32 and grads[0].dtype == dtype and grads[1].dtype == dtype
    _close(logp, ref[0], CUDA_TOL[dtype], "logp")
    _close(ent, ref[1], CUDA_TOL[dtype], "entropy")
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref[2], strict=True):
        _close(got, want, CUDA_TOL[dtype], f"d{name}")


@cuda
def test_cuda_op_compiles_and_is_deterministic():
    hidden, weight, b, targets, rows = (
        x.cuda() for x in _inputs(300, 128, 2000, torch.bfloat16, bias=True, rows=True, seed=3)
    )

    def f(h, w, bb):
        logp, ent = token_logprobs(h, w, targets, bias=bb, return_entropy=True, target_rows=rows)
        return logp.sum() + 0.1 * ent.sum()

    runs = []
    for fn in (f, f, torch.compile(f, fullgraph=True)):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, b)]
        fn(*leaves).backward()
        runs.append([x.grad for x in leaves])
    for first, second in zip(runs[0], runs[1], strict=True):
        assert torch.equal(first, second), "the Triton backward must be bitwise deterministic"
    for eager, compiled in zip(runs[0], runs[2], strict=True):
        torch.testing.assert_close(compiled, eager)
