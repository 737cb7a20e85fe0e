"""The Triton ops launch on their tensors' GPU, not the current one: inputs on cuda:1 while cuda:0 is current
give the CPU path's results (Triton launches on the current device, which would read cuda:1's memory from
cuda:0). Needs two GPUs."""

from __future__ import annotations

import pytest
import torch

from bao_fast.algo.shaping import preset
from bao_fast.ops import clipped_ratio_loss, shaped_advantages, token_logprobs

from .test_advantages import HORIZON, random_batch
from .test_logprobs import _inputs
from .test_policy_loss import make_inputs

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")

OTHER = torch.device("cuda", 1)


@pytest.fixture(autouse=True)
def current_device_zero():
    torch.cuda.set_device(0)
    yield
    assert torch.cuda.current_device() == 0  # the ops leave the current device as they found it


def test_token_logprobs_on_the_second_gpu() -> None:
    hidden, weight, bias, targets, rows = _inputs(333, 96, 1000, bias=True, rows=True, seed=5)
    hidden.requires_grad_(True)
    other = hidden.detach().to(OTHER).requires_grad_(True)
    logp, entropy = token_logprobs(other, weight.to(OTHER), targets.to(OTHER), bias=bias.to(OTHER),
                                   target_rows=rows.to(OTHER), return_entropy=True, temperature=0.7)
    want_logp, want_entropy = token_logprobs(hidden, weight, targets, bias=bias, target_rows=rows, return_entropy=True,
                                             temperature=0.7)
    (logp.sum() + entropy.sum()).backward()
    (want_logp.sum() + want_entropy.sum()).backward()
    assert logp.device == OTHER and other.grad.device == OTHER
    torch.testing.assert_close(logp.cpu(), want_logp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy.cpu(), want_entropy, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(other.grad.cpu(), hidden.grad, rtol=1e-3, atol=1e-4)


def test_shaped_advantages_on_the_second_gpu() -> None:
    cfg = preset("bao", horizon=HORIZON)
    batch = random_batch(200, 7)
    got = shaped_advantages(*(t.to(OTHER) for t in batch), cfg)
    want = shaped_advantages(*batch, cfg)
    for g, w in zip(got, want):
        assert g.device == OTHER
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-5)


def test_clipped_ratio_loss_on_the_second_gpu() -> None:
    logp, old_logp, advantages, mask, cu, ref_logp = make_inputs([5, 300, 17], seed=3, dtype=torch.float32)
    logp.requires_grad_(True)
    other = logp.detach().to(OTHER).requires_grad_(True)
    options = dict(kl_coef=0.1, agg="seq-mean-token-mean")
    loss, _ = clipped_ratio_loss(other, old_logp.to(OTHER), advantages.to(OTHER), mask.to(OTHER),
                                 cu_seqlens=cu.to(OTHER), ref_logp=ref_logp.to(OTHER), **options)
    want, _ = clipped_ratio_loss(logp, old_logp, advantages, mask, cu_seqlens=cu, ref_logp=ref_logp, **options)
    loss.backward()
    want.backward()
    torch.testing.assert_close(loss.cpu(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(other.grad.cpu(), logp.grad, rtol=1e-5, atol=1e-6)
