"""Ahead-of-time compilation of Triton kernels for an NVIDIA GPU architecture, without a GPU.

The Triton interpreter accepts code the JIT rejects (loop-carried type changes, unsupported ops), so kernels
that have only run under ``TRITON_INTERPRET=1`` are compiled here the way a real launch would compile them:
``launch_spec`` turns argument kinds into the signature and specialisation a launch derives (tensor -> 16-byte
aligned pointer, Python int -> ``i32`` or the constant 1, float -> ``fp32``), ``compile_kernels`` lowers each
spec to a cubin with Triton's bundled ptxas and reads shared memory, registers, local memory (spills) and PTX
instruction counts back as a ``KernelReport``. ``run_cli`` is the command line shared by the per-module
checks (``python -m bao_fast.kernels.advantages_aot``, ``...policy_loss_aot``).

Needs the JIT, so ``TRITON_INTERPRET`` must not be set.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TRITON_TYPES = {
    torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
    torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8", torch.bool: "u1",
}  # fmt: skip
IntMode = Literal["any", "one"]
ArgKind = torch.dtype | type | str
SHARED_MEMORY_LIMITS = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # bytes per block, opt-in
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass(frozen=True)
class KernelSpec:
    """One compilation of ``fn``: the Triton type of every runtime argument (``"*fp32"``, ``"i32"``, ...),
    the value of every constexpr, the arguments specialised as divisible by 16, and the launch options."""

    fn: JITFunction
    signature: Mapping[str, str]
    constexprs: Mapping[str, object]
    aligned: frozenset[str] = field(default_factory=frozenset)
    num_warps: int = 4
    num_stages: int = 3

    def source(self) -> ASTSource:
        """The ``ASTSource`` Triton compiles; raises ValueError if an argument is missing or given twice."""
        names = set(self.fn.arg_names)
        given = set(self.signature) | set(self.constexprs)
        if given != names or set(self.signature) & set(self.constexprs):
            raise ValueError(
                f"{self.fn.__name__}: signature/constexprs must cover each argument exactly once; "
                f"missing {sorted(names - given)}, unknown {sorted(given - names)}, "
                f"both {sorted(set(self.signature) & set(self.constexprs))}"
            )
        if not self.aligned <= set(self.signature):
            raise ValueError(f"{self.fn.__name__}: aligned names non-runtime arguments {sorted(self.aligned)}")
        signature = {name: self.signature.get(name, "constexpr") for name in self.fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(self.fn.arg_names) if name in self.aligned}
        return ASTSource(self.fn, signature=signature, constexprs=dict(self.constexprs), attrs=attrs)


def launch_spec(
    fn: JITFunction,
    args: Mapping[str, ArgKind],
    constexprs: Mapping[str, object],
    *,
    ints: IntMode = "any",
    unit: Collection[str] = (),
    aligned: Collection[str] = (),
    num_warps: int = 4,
    num_stages: int = 3,
) -> KernelSpec:
    """The spec a launch with these argument kinds compiles.

    args: runtime argument -> kind: a torch dtype (a tensor: pointer to it, 16-byte aligned as fresh
    allocations are), ``int`` (``i32``), ``float`` (``fp32``) or an explicit Triton type string.
    ints: ``"any"`` (ints of no particular value) or ``"one"`` (every ``int`` argument equals 1, which a
    launch turns into the constant 1). unit: arguments of ``fn``, not in ``args``, that are always 1 (unit
    strides). aligned: further arguments that are multiples of 16 (leading strides, padded sizes).
    """
    if ints not in ("any", "one"):
        raise ValueError(f"ints must be 'any' or 'one', got {ints!r}")
    signature: dict[str, str] = {}
    const = dict(constexprs)
    divisible = set(aligned)
    const.update({name: 1 for name in unit if name in fn.arg_names})
    for name, kind in args.items():
        if kind is int and ints == "one":
            const[name] = 1
        elif isinstance(kind, torch.dtype):
            signature[name] = "*" + TRITON_TYPES[kind]
            divisible.add(name)
        elif kind is int:
            signature[name] = "i32"
        elif kind is float:
            signature[name] = "fp32"
        elif isinstance(kind, str):
            signature[name] = kind
        else:
            raise TypeError(f"args[{name!r}] must be a torch dtype, int, float or a Triton type, got {kind!r}")
    divisible &= set(signature)
    return KernelSpec(fn, signature, const, frozenset(divisible), num_warps, num_stages)


@dataclass(frozen=True)
class KernelReport:
    """A compiled kernel. shared_bytes: dynamic shared memory Triton requests at launch (static_shared_bytes
    come on top); registers, stack_bytes and local_bytes per thread (Triton inlines every call, so a stack
    frame holds register spills: 0 for a kernel that fits its registers); wgmma / mma_sync / cp_async:
    counts of those instructions in the PTX."""

    shared_bytes: int
    static_shared_bytes: int
    num_warps: int
    registers: int
    stack_bytes: int
    local_bytes: int
    wgmma: int
    mma_sync: int
    cp_async: int

    def problems(self, arch: int) -> list[str]:
        """What keeps this kernel from running well on ``sm_{arch}``: shared memory over the per-block
        limit, register spills. Empty when there is nothing to flag."""
        if arch not in SHARED_MEMORY_LIMITS:
            raise ValueError(f"arch must be one of {sorted(SHARED_MEMORY_LIMITS)}, got {arch}")
        found = []
        shared = self.shared_bytes + self.static_shared_bytes
        if shared > SHARED_MEMORY_LIMITS[arch]:
            found.append(f"{shared} B shared memory > {SHARED_MEMORY_LIMITS[arch]} B per block on sm_{arch}")
        if self.stack_bytes or self.local_bytes:
            found.append(f"register spills: {self.stack_bytes} B stack, {self.local_bytes} B local per thread")
        return found


def _resources(cubin: bytes) -> dict[str, int]:
    """registers, stack_bytes, static_shared_bytes, local_bytes of the single kernel in ``cubin``, from
    cuobjdump's resource usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    found = _RESOURCES.findall(out)
    if len(found) != 1:
        raise RuntimeError(f"expected one kernel in the cubin, cuobjdump says:\n{out[:2000]}")
    registers, stack, static_shared, local = (int(x) for x in found[0])
    return {
        "registers": registers,
        "stack_bytes": stack,
        "static_shared_bytes": static_shared,
        "local_bytes": local,
    }


def compile_kernel(spec: KernelSpec, arch: int) -> KernelReport:
    """Compile ``spec`` for ``sm_{arch}`` (e.g. 90) down to a cubin and report on it."""
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    kernel = triton.compile(spec.source(), target=GPUTarget("cuda", arch, 32), options=options)
    ptx = kernel.asm["ptx"]
    return KernelReport(
        shared_bytes=kernel.metadata.shared,
        num_warps=spec.num_warps,
        **_resources(kernel.asm["cubin"]),
        wgmma=ptx.count("wgmma.mma_async"),
        mma_sync=ptx.count("mma.sync"),
        cp_async=ptx.count("cp.async"),
    )


_WORKER_JOBS: dict[tuple, tuple[KernelSpec, int]] = {}


def _set_worker_jobs(jobs: dict[tuple, tuple[KernelSpec, int]]) -> None:
    _WORKER_JOBS.update(jobs)


def _compile_job(key: tuple) -> KernelReport:
    return compile_kernel(*_WORKER_JOBS[key])


def compile_kernels(jobs: Mapping[str, tuple[KernelSpec, int]], workers: int = 1) -> dict[str, KernelReport]:
    """Compile every (spec, arch) of ``jobs`` once (identical compilations are shared between names) on
    ``workers`` forked processes; returns name -> report in the order of ``jobs``."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if knobs.runtime.interpret:
        raise RuntimeError("ahead-of-time compilation needs the JIT: unset TRITON_INTERPRET")
    keys = {}
    for name, (spec, arch) in jobs.items():
        keys[name] = (spec.source().hash(), spec.num_warps, spec.num_stages, arch)
    unique = {key: jobs[name] for name, key in keys.items()}
    if workers == 1:
        done = {key: compile_kernel(*job) for key, job in unique.items()}
    else:
        context = multiprocessing.get_context("fork")  # jit functions do not pickle; forked workers inherit them
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_set_worker_jobs, initargs=(unique,)) as pool:
            done = dict(zip(unique, pool.map(_compile_job, unique)))
    return {name: done[key] for name, key in keys.items()}


def run_cli(
    argv: Sequence[str] | None,
    description: str,
    specs: Callable[[int, torch.dtype], Mapping[str, KernelSpec]],
    dtypes: Sequence[str],
) -> None:
    """Command line of a per-module check: compile ``specs(arch, dtype)`` for every ``--arch`` x ``--dtype``, print
    one JSON line ``{"sm90/float32/<name>": KernelReport fields}`` and each report's problems on stderr."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(SHARED_MEMORY_LIMITS), default=[80, 90])
    parser.add_argument("--dtype", nargs="+", choices=dtypes, default=list(dtypes))
    parser.add_argument("--workers", type=int, default=1, help="compile in this many processes")
    args = parser.parse_args(argv)
    jobs = {
        f"sm{arch}/{dtype}/{name}": (spec, arch)
        for arch in args.arch
        for dtype in args.dtype
        for name, spec in specs(arch, getattr(torch, dtype)).items()
    }
    reports = compile_kernels(jobs, args.workers)
    for name, report in reports.items():
        for problem in report.problems(jobs[name][1]):
            print(f"{name}: {problem}", file=sys.stderr)
    print(json.dumps({name: asdict(report) for name, report in reports.items()}))
