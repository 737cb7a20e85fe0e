"""Triton kernels of bao_fast, installed as ``bao_fast.kernels``. Import only where triton is usable
(CUDA, or ``TRITON_INTERPRET=1`` set before triton is imported)."""
