"""Compile-check of the CUDA sources with nvcc, so they stay buildable on machines without a GPU.

The CPU torch wheel ships the ATen / c10 CUDA headers but not the one CMake generates
(``c10/cuda/impl/cuda_cmake_macros.h``); the test supplies it (a CUDA wheel defines the same macro). The
kernel itself runs in ``tests/ops/test_packing.py`` when a GPU is present.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

CSRC = Path(__file__).resolve().parents[2] / "csrc"
GENERATED_HEADER = Path("c10/cuda/impl/cuda_cmake_macros.h")


def find_nvcc() -> str | None:
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    default = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return str(default) if default.exists() else None


def torch_includes(tmp_path: Path) -> list[str]:
    """``-I`` flags for torch's headers, plus the generated CUDA macros header when the wheel lacks it."""
    dirs = list(include_paths())
    if not any((Path(d) / GENERATED_HEADER).exists() for d in dirs):
        header = tmp_path / "generated" / GENERATED_HEADER
        header.parent.mkdir(parents=True)
        header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.append(str(tmp_path / "generated"))
    return [f"-I{d}" for d in dirs]


def run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{' '.join(cmd[:3])} ... failed:\n{result.stderr[-4000:]}"


@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cuda_source_compiles(source: str, tmp_path: Path) -> None:
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    obj = tmp_path / "out.o"
    # One architecture keeps the check fast; setup.py builds sm_80, sm_90a and sm_90 PTX.
    run(
        [
            nvcc,
            "-std=c++17",
            "-O1",
            "-c",
            str(CSRC / source),
            "-o",
            str(obj),
            "-DBAO_FAST_WITH_CUDA=1",
            "-gencode=arch=compute_80,code=sm_80",
            "--expt-relaxed-constexpr",
            "-Xcompiler",
            "-fPIC",
            *torch_includes(tmp_path),
        ]
    )
    assert obj.stat().st_size > 0


def test_cuda_registration_compiles(tmp_path: Path) -> None:
    """The ``BAO_FAST_WITH_CUDA`` branch of the C++ sources (the CUDA dispatch registration) compiles."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    includes = torch_includes(tmp_path)
    for source in sorted(CSRC.glob("*.cpp")):
        if source.name == "python_module.cpp":  # needs Python headers; built by setup.py only
            continue
        run([cxx, "-std=c++17", "-fsyntax-only", str(source), "-DBAO_FAST_WITH_CUDA=1", *includes])
