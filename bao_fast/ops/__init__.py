"""Public fused ops of bao_fast. Each op: CPU + CUDA, validated inputs, fp64 reference in
``bao_fast.ops.reference``, ``torch.library`` registration so ``torch.compile`` traces it."""

from bao_fast.algo.shaping import ShapingConfig
from bao_fast.ops.advantages import ShapedAdvantages, shaped_advantages
from bao_fast.ops.logprobs import token_logprobs
from bao_fast.ops.packing import pack_multiturn
from bao_fast.ops.policy_loss import clipped_ratio_loss

__all__ = [
    "ShapedAdvantages",
    "ShapingConfig",
    "clipped_ratio_loss",
    "pack_multiturn",
    "shaped_advantages",
    "token_logprobs",
]
