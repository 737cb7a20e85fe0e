"""Pure-PyTorch reference of every public op: the executable spec that kernels, tests and benchmarks
compare against. Written for clarity, not speed (loops where the math is a loop); compute in fp64 where
the caller passes fp64. Each section belongs to one op."""

from __future__ import annotations

import math

import torch

from bao_fast.algo.shaping import ShapingConfig

# ---- pack_multiturn (issue 3) -----------------------------------------------------------------------
# <<pack_multiturn reference>>

# ---- token_logprobs (issue 4) -----------------------------------------------------------------------
# <<token_logprobs reference>>

# ---- shaped_advantages (issue 5) --------------------------------------------------------------------
# <<shaped_advantages reference>>

# ---- clipped_ratio_loss (issue 5) -------------------------------------------------------------------
# <<clipped_ratio_loss reference>>
