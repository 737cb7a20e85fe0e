"""The frozen KL reference (``algo.loss.kl_coef > 0``) leaves nothing gathered after its log-probs: FSDP keeps a
root's parameters whole after a forward until a backward, which the reference never runs."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

from bao_fast.config import ModelConfig
from bao_fast.data.segments import pack_segments
from bao_fast.models.tiny import create_tiny_model
from bao_fast.train.fsdp import init_distributed, load_policy
from bao_fast.train.rl import forward_logprobs, reference_logprobs

pytestmark = pytest.mark.usefixtures("single_rank_world")


def test_reference_logprobs_reshard_the_reference(tmp_path) -> None:
    path = create_tiny_model(tmp_path / "tiny")
    ref = load_policy(path, ModelConfig(path=str(path)), init_distributed()).eval().requires_grad_(False)
    batch = pack_segments([[("user", [5, 6, 7]), ("assistant", [9, 10, 11, 12])], [("user", [4]),
                           ("assistant", [20, 21])]])
    expected = forward_logprobs(ref, batch, 1.0, 64)
    gathered = [name for name, p in ref.named_parameters() if not isinstance(p, DTensor)]
    assert "hf.lm_head.weight" in gathered or "hf.model.embed_tokens.weight" in gathered  # what reshard undoes
    ref.reshard()
    logp = reference_logprobs(ref, batch, 1.0, 64)
    assert [name for name, p in ref.named_parameters() if not isinstance(p, DTensor)] == []
    torch.testing.assert_close(logp, expected, rtol=0, atol=0)
    assert (logp[batch.target_rows] < 0).all()
