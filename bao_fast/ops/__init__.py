"""Public fused ops of bao_fast. Each op: CPU + CUDA, validated inputs, fp64 reference in
``bao_fast.ops.reference``, ``torch.library`` registration so ``torch.compile`` traces it."""

from bao_fast.algo.shaping import ShapingConfig

# <<op exports>>

__all__ = [
    "ShapingConfig",
    # <<op names>>
]
