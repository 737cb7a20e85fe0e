"""Benchmark ``bao_fast.ops.token_logprobs`` (fwd+bwd) against the LM-head log-prob baselines.

Baselines, in the same run and on the same inputs: torch eager (fp32 ``log_softmax`` + gather, entropy from
the full distribution), ``torch.compile`` of it, both also without entropy (``*_no_entropy``), torch's chunked
``F.linear_cross_entropy`` (``LinearCrossEntropyOptions``), liger-kernel's fused linear cross-entropy (CUDA
only) and cut-cross-entropy (its Triton kernels on CUDA, its ``torch_compile`` backend on the CPU; the row
records the options it passes, ``cce_options``). The last three return a per-token loss (= -logp) and no
entropy, so they are compared with ``bao_fast`` without entropy as well. Baselines that are not installed or
not supported on the device are recorded as skipped, with the reason.

Every row's ``speedup_vs_eager``, ``mem_vs_eager`` and ``workspace_vs_eager`` are against the eager row of the
same work (named in its ``baseline``): ``eager`` for the rows with entropy, ``eager_no_entropy`` for the rest.

Reports per implementation and shape: median fwd+bwd time over ``--repeats`` runs after warm-up, effective
TFLOP/s (``6*N*H*V`` flops, PERF.md's count), peak extra memory, workspace (that peak less the gradients and
outputs every implementation must hold), max abs error of logp / entropy against the fp64 reference and the
relative error (max abs error / max abs value) of the gradients of the timed step against fp64. Workspace
counts the outputs a row returns: logp, and entropy only for the rows that compute it.
``bao_fast`` recomputes the logits in its backward (the price of never storing them and of accumulating dW in
fp32 over all rows), so it executes ``8*N*H*V`` flops; its rows also report that executed rate. Peak memory is
that of one warm fwd+bwd (after the timed runs, so compilation and autotuning are not counted): the CUDA
allocator peak on a GPU, the peak of CPU tensor allocations on the CPU (``common.peak_memory``).
Writes ``benchmarks/results/logprobs-<device>.json`` after every shape, with ``complete: false`` until the
last one (a run stopped part-way keeps the shapes it finished); ``--quick`` writes to
``benchmarks/results/quick/`` instead.

    python benchmarks/bench_logprobs.py                  # preset by device: gpu on CUDA, cpu otherwise
    python benchmarks/bench_logprobs.py --preset cpu --quick
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_memory, print_table, timeit_median, write_results

from bao_fast.ops.logprobs import token_logprobs
from bao_fast.ops.reference import token_logprobs_reference

Outputs = tuple[torch.Tensor, torch.Tensor | None]
LogprobFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Outputs]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXECUTED_FLOPS_FACTOR = 8  # bao_fast: forward GEMM + backward recompute, dW and dH GEMMs, each 2*N*H*V
EAGER_BASELINES = ("eager", "eager_no_entropy")  # the ratios' baselines, with and without entropy


@dataclass(frozen=True)
class Case:
    """One benchmark shape: N rows, hidden H, vocab V, input dtype, timed repeats."""

    n: int
    h: int
    v: int
    dtype: str
    repeats: int


def presets(name: str, repeats: int | None, quick: bool, head_only: bool = False) -> list[Case]:
    """PERF.md's headline shape of the preset first, then a sweep over N and V; ``repeats`` None: the defaults
    (20, but 3 for the CPU headline shape)."""
    if name == "gpu":
        head = [Case(16384, 4096, 151936, "bfloat16", repeats or 20)]
        sweep = [Case(n, 4096, v, "bfloat16", repeats or 20) for n in (4096, 8192, 16384) for v in (32000, 128256)]
    else:
        # 2 CPU cores: the headline shape takes ~15-25 s per fwd+bwd, so by default it gets 3 timed repeats.
        head = [Case(8192, 512, 32000, "float32", repeats or 3)]
        sweep = [Case(n, 512, v, "float32", repeats or 20) for n in (512, 2048) for v in (4096, 16384)]
    if quick:
        return sweep[:1]
    return head if head_only else head + sweep


def eager(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> Outputs:
    """The usual trainer code: full fp32 logits, log_softmax, gather; entropy from the full distribution."""
    logprobs = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    logp = logprobs.gather(1, targets[:, None]).squeeze(1)
    return logp, -(logprobs.exp() * logprobs).sum(-1)


def eager_no_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> Outputs:
    """``eager`` without the entropy: the baseline of the rows that return logp only."""
    logprobs = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    return logprobs.gather(1, targets[:, None]).squeeze(1), None


def fused(with_entropy: bool) -> LogprobFn:
    def run(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> Outputs:
        out = token_logprobs(hidden, weight, targets, return_entropy=with_entropy)
        return out if with_entropy else (out, None)

    return run


def torch_chunked_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> Outputs:
    loss = torch.nn.functional.linear_cross_entropy(
        hidden, weight, targets, reduction="none", options=torch.nn.LinearCrossEntropyOptions()
    )
    return -loss.float(), None


def liger_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> Outputs:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    loss = liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="none")
    loss = loss[0] if isinstance(loss, tuple) else loss
    return -loss.float(), None


def cce_options(device: torch.device) -> dict[str, Any]:
    """The options the ``cce`` row passes to cut-cross-entropy's ``linear_cross_entropy``: on CUDA its Triton
    kernels (``impl="cce"``) with their default gradient filtering; elsewhere its compiled PyTorch path,
    which takes no filtering options."""
    return {"impl": "cce", "filter_eps": "auto"} if device.type == "cuda" else {"impl": "torch_compile"}


def cce(options: dict[str, Any]) -> LogprobFn:
    """cut-cross-entropy's ``linear_cross_entropy`` with ``options`` (``cce_options``)."""

    def run(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> Outputs:
        from cut_cross_entropy import linear_cross_entropy

        return -linear_cross_entropy(hidden, weight, targets, reduction="none", **options).float(), None

    return run


def implementations(device: torch.device, with_compile: bool) -> dict[str, tuple[LogprobFn | None, str]]:
    """name -> (function or None, reason it is skipped)."""
    cuda = device.type == "cuda"
    impls: dict[str, tuple[LogprobFn | None, str]] = {
        "eager": (eager, ""),
        "eager_no_entropy": (eager_no_entropy, ""),
        "bao_fast": (fused(True), ""),
        "bao_fast_no_entropy": (fused(False), ""),
    }
    # Static shapes: each case compiles its own kernels (``bench_case`` resets dynamo's caches per case).
    for name, fn in (("compile", eager), ("compile_no_entropy", eager_no_entropy)):
        impls[name] = (torch.compile(fn, dynamic=False), "") if with_compile else (None, "--no-compile was given")
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        impls["torch_chunked_ce"] = (torch_chunked_ce, "")
    else:
        impls["torch_chunked_ce"] = (None, f"torch {torch.__version__} has no LinearCrossEntropyOptions")
    if importlib.util.find_spec("liger_kernel") is None:
        impls["liger"] = (None, "liger_kernel is not installed")
    else:
        impls["liger"] = (liger_ce, "") if cuda else (None, "liger_kernel's fused linear cross-entropy needs CUDA")
    if importlib.util.find_spec("cut_cross_entropy") is None:
        impls["cce"] = (None, "cut_cross_entropy is not installed")
    else:
        impls["cce"] = (cce(cce_options(device)), "")
    return impls


def reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """fp64 logp and entropy, a few thousand rows at a time to bound the fp64 logits."""
    rows = max(1, (1 << 28) // (8 * weight.shape[0]))
    weight = weight.double()
    parts = [
        token_logprobs_reference(hidden[i : i + rows], weight, targets[i : i + rows], return_entropy=True)
        for i in range(0, hidden.shape[0], rows)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def reference_grads(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """dhidden and dweight of ``make_step``'s loss computed in fp64, a few thousand rows at a time like
    ``reference``; returned in fp32 (half the memory they hold while a case runs)."""
    rows = max(1, (1 << 28) // (8 * weight.shape[0]))
    weight64 = weight.detach().double().requires_grad_()
    dhidden = torch.empty(hidden.shape, dtype=torch.float64, device=hidden.device)
    for i in range(0, hidden.shape[0], rows):
        part = hidden[i : i + rows].detach().double().requires_grad_()
        logp, ent = token_logprobs_reference(part, weight64, targets[i : i + rows], return_entropy=True)
        loss = (logp * grad[i : i + rows]).sum() + (ent.sum() if with_entropy else 0.0)
        loss.backward()
        dhidden[i : i + rows] = part.grad
    return dhidden.float(), weight64.grad.float()


def rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    """max |value - ref| / max |ref| (in fp32, as ``ref`` is)."""
    return ((value.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def make_inputs(case: Case, device: torch.device) -> tuple[torch.Tensor, ...]:
    """hidden ``[N, H]``, weight ``[V, H]`` (leaves), targets int64 ``[N]``, upstream grad f32 ``[N]``."""
    dtype = DTYPES[case.dtype]
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(case.n, case.h, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(case.v, case.h, generator=gen) / case.h**0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, case.v, (case.n,), generator=gen).to(device)
    return hidden, weight, targets, torch.randn(case.n, generator=gen).to(device)


def make_step(fn: LogprobFn, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor):
    """One fwd+bwd: ``sum(logp * grad) + sum(entropy)``, gradients into fresh ``.grad`` tensors."""

    def step() -> None:
        hidden.grad = weight.grad = None
        logp, ent = fn(hidden, weight, targets)
        loss = (logp * grad).sum() + (ent.sum() if ent is not None else 0.0)
        loss.backward()

    return step


def bench_case(case: Case, device: torch.device, impls: dict[str, tuple[LogprobFn | None, str]]) -> list[dict]:
    # Compiled baselines get a graph specialised to this shape, as in a trainer with a fixed shape: without the
    # reset, the second shape recompiles with dynamic sizes (torch.compile's default) or, with dynamic=False,
    # the cases' static graphs together pass dynamo's recompile limit and the last cases run eagerly.
    torch._dynamo.reset()
    hidden, weight, targets, grad = make_inputs(case, device)
    with torch.no_grad():
        ref_logp, ref_ent = reference(hidden, weight, targets)
    flops = 6.0 * case.n * case.h * case.v
    # Bytes every implementation must hold at its peak: dhidden, dweight (input dtype); then its fp32 outputs.
    grad_bytes = (case.n * case.h + case.v * case.h) * hidden.element_size()
    rows: list[dict] = []
    ref_grads: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}  # by with_entropy, computed when first needed
    baselines: dict[bool, dict] = {}  # the eager row of the same work, by with_entropy
    for name, (fn, reason) in impls.items():
        row = {"impl": name, **asdict(case)}
        if name == "cce":
            row["cce_options"] = cce_options(device)
        if fn is None:
            rows.append({**row, "skipped": reason})
            continue

        step = make_step(fn, hidden, weight, targets, grad)
        try:
            with torch.no_grad():
                logp, ent = fn(hidden, weight, targets)
            row["logp_max_err"] = (logp.double() - ref_logp).abs().max().item()
            row["entropy_max_err"] = (ent.double() - ref_ent).abs().max().item() if ent is not None else None
            with_entropy = ent is not None
            del logp, ent
            timing = timeit_median(step, warmup=1, repeats=case.repeats, device=device)
            hidden.grad = weight.grad = None  # the measured step's gradients count towards its peak
            row["peak_mem_mb"] = peak_memory(step, device) / 2**20
            if with_entropy not in ref_grads:
                ref_grads[with_entropy] = reference_grads(hidden, weight, targets, grad, with_entropy)
            ref_dhidden, ref_dweight = ref_grads[with_entropy]
            row["dhidden_rel_err"] = rel_err(hidden.grad, ref_dhidden)
            row["dweight_rel_err"] = rel_err(weight.grad, ref_dweight)
        except torch.OutOfMemoryError as err:
            rows.append({**row, "skipped": f"out of memory: {str(err).splitlines()[0]}"})
            continue
        except Exception as err:  # a broken baseline must not cost the other implementations' figures
            rows.append({**row, "skipped": f"{type(err).__name__}: {str(err)[:200]}"})
            continue
        finally:
            hidden.grad = weight.grad = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row.update(timing)
        row["tflops"] = flops / (timing["median_ms"] * 1e-3) / 1e12
        if name.startswith("bao_fast"):
            row["executed_tflops"] = row["tflops"] * EXECUTED_FLOPS_FACTOR / 6
        output_bytes = (2 if with_entropy else 1) * 4 * case.n
        row["workspace_mb"] = max(0.0, row["peak_mem_mb"] - (grad_bytes + output_bytes) / 2**20)
        if name in EAGER_BASELINES:
            baselines[with_entropy] = row
        if with_entropy in baselines:
            compare_with(row, baselines[with_entropy])
        rows.append(row)
    return rows


def compare_with(row: dict, base: dict) -> None:
    """Add ``row``'s time, peak and workspace ratios to those of the eager row ``base`` of the same work."""
    row["baseline"] = base["impl"]
    row["speedup_vs_eager"] = base["median_ms"] / row["median_ms"]
    row["mem_vs_eager"] = row["peak_mem_mb"] / base["peak_mem_mb"] if base["peak_mem_mb"] else None
    row["workspace_vs_eager"] = row["workspace_mb"] / base["workspace_mb"] if base["workspace_mb"] else None


def table_row(row: dict) -> dict[str, str]:
    """Short, formatted columns for the printed table (the JSON keeps everything)."""
    if "skipped" in row:
        return {"impl": row["impl"], "ms": "skipped (reason in the JSON)"}

    def fmt(key: str, spec: str) -> str:
        return format(row[key], spec) if row.get(key) is not None else "-"

    return {
        "impl": row["impl"],
        "ms": fmt("median_ms", ".1f"),
        "TFLOP/s": fmt("tflops", ".3g"),
        "exec TFLOP/s": fmt("executed_tflops", ".3g"),
        "peak MiB": fmt("peak_mem_mb", ".1f"),
        "mem/eager": fmt("mem_vs_eager", ".3f"),
        "workspace/eager": fmt("workspace_vs_eager", ".4f"),
        "x eager": fmt("speedup_vs_eager", ".2f"),
        "logp err": fmt("logp_max_err", ".1e"),
        "ent err": fmt("entropy_max_err", ".1e"),
        "dH rel err": fmt("dhidden_rel_err", ".1e"),
        "dW rel err": fmt("dweight_rel_err", ".1e"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=("cpu", "gpu"), default=None, help="default: by device")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 20; CPU headline 3)")
    parser.add_argument("--quick", action="store_true", help="one small shape, results to results/quick/")
    parser.add_argument("--head-only", action="store_true", help="only the preset's headline (PERF.md) shape")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    impls = implementations(device, with_compile=not args.no_compile)
    cases = presets(preset, args.repeats, args.quick, args.head_only)
    results: list[dict] = []
    for i, case in enumerate(cases, start=1):
        rows = bench_case(case, device, impls)
        results.extend(rows)
        print_table(
            [table_row(r) for r in rows],
            title=f"token_logprobs fwd+bwd N={case.n} H={case.h} V={case.v} {case.dtype} ({case.repeats} repeats)",
        )
        payload = {
            "preset": preset,
            "quick": args.quick,
            "complete": i == len(cases),
            "flops_per_step": "6*N*H*V",
            "bao_fast_executed_flops": f"{EXECUTED_FLOPS_FACTOR}*N*H*V",
            "results": results,
        }
        print(f"wrote {write_results('logprobs', payload, device, quick=args.quick)} ({i}/{len(cases)} shapes)")


if __name__ == "__main__":
    main()
