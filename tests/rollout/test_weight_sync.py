"""iter_full_weights on plain modules: order, dtype cast, tied-parameter dedup, wrapper-prefix stripping,
bucketing laziness and argument errors (the 2-rank FSDP2 path runs in test_weight_sync_torchrun.py); then a
one-rank FSDP2 policy of each supported architecture synced into vLLM-CPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import distribute_tensor

from bao_fast.config import ModelConfig, RolloutConfig
from bao_fast.models import TinyModelSpec, create_tiny_model, load_tokenizer
from bao_fast.rollout import GenerationParams, iter_full_weights, weight_sync
from bao_fast.rollout.weight_sync import hf_name
from bao_fast.train.fsdp import DistEnv, init_distributed, load_policy

from ._helpers import load_hf, perturb_, reference_greedy


class _Wrapped(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self._checkpoint_wrapped_module = inner


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.ModuleDict({"embed": nn.Embedding(37, 5), "layer": _Wrapped(nn.Linear(5, 7)), "head": nn.Linear(5, 37)})
    model["head"].weight = model["embed"].weight  # tied, as with tie_word_embeddings
    return model


def test_names_order_dtype_and_values():
    model = _model()
    out = list(iter_full_weights(model, torch.bfloat16, bucket_mb=1e-4))
    assert [n for n, _ in out] == ["embed.weight", "layer.weight", "layer.bias", "head.bias"]
    params = dict(model.named_parameters())
    for name, tensor in out:
        assert tensor.dtype == torch.bfloat16
        source = params[name.replace("layer.", "layer._checkpoint_wrapped_module.")]
        torch.testing.assert_close(tensor, source.detach().to(torch.bfloat16), atol=0, rtol=0)


@pytest.mark.parametrize(("bucket_mb", "gathered_before_first"), [(1e-9, 1), (8e-4, 2), (1e3, 4)])
def test_buckets_bound_what_is_gathered(monkeypatch, bucket_mb, gathered_before_first):
    calls: list[int] = []
    original = weight_sync._full
    monkeypatch.setattr(weight_sync, "_full", lambda p, dtype: calls.append(p.numel()) or original(p, dtype))
    it = iter_full_weights(_model(), torch.float32, bucket_mb=bucket_mb)
    next(it)
    assert len(calls) == gathered_before_first  # a bucket is gathered, then handed out
    assert len(list(it)) == 3 and len(calls) == 4


def test_hf_name_strips_wrappers():
    assert hf_name("_orig_mod.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") == (
        "model.layers.0.mlp.up_proj.weight"
    )


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="model"):
        list(iter_full_weights("not a module", torch.float32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bucket_mb"):
        list(iter_full_weights(_model(), torch.float32, bucket_mb=0))


# Architectures synced into vLLM-CPU: Qwen3 as Qwen3-4B (q/k norms, head_dim apart from hidden / heads, tied
# head), Llama-3 RoPE, Mistral's sliding window, a tied Qwen2 (Qwen2.5's small sizes).
ARCHITECTURES = {
    "qwen3-tied": ("qwen3", TinyModelSpec(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama": ("llama", TinyModelSpec()),
    "mistral": ("mistral", TinyModelSpec()),
    "qwen2-tied": ("qwen2", TinyModelSpec(tie_word_embeddings=True)),
}
PROMPTS = [[5, 17, 300, 41, 1022], [9, 8, 7, 6, 5, 4, 3], [1500, 3]]
MAX_TOKENS = 12


@pytest.fixture
def trainer_world(monkeypatch: pytest.MonkeyPatch) -> Iterator[DistEnv]:
    """The trainer's world of one in a plain process (``init_distributed``), whose ``RANK`` / ``LOCAL_RANK``
    make vLLM join it (``external_launcher``); the variables are restored afterwards."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    yield init_distributed()
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_fsdp_policy_sync_into_vllm(name: str, trainer_world: DistEnv, tmp_path: Path) -> None:
    """After the FSDP2 policy's weights change and are synced, vLLM decodes greedily like transformers does
    with the new weights (a tied head too: vLLM-CPU keeps a packed copy of it, see VLLMEngine.load_weights)."""
    pytest.importorskip("vllm")
    from bao_fast.rollout.vllm_engine import VLLMEngine, reprocess_tied_embeddings

    arch, spec = ARCHITECTURES[name]
    path = create_tiny_model(tmp_path / name, spec=spec, seed=2, arch=arch)
    policy = load_policy(path, ModelConfig(path=str(path)), trainer_world)
    reference = load_hf(path)
    stop = {load_tokenizer().eos_token_id}
    params = GenerationParams(max_tokens=MAX_TOKENS, temperature=0.0)
    engine = VLLMEngine.from_config(path, RolloutConfig(max_model_len=128, weight_sync_bucket_mb=1), seed=0)
    try:
        before = [g.token_ids for g in engine.generate(PROMPTS, params)]
        assert before == [reference_greedy(reference, p, MAX_TOKENS, stop) for p in PROMPTS]
        perturb_(reference, scale=0.05, seed=3)
        with torch.no_grad():  # the same change, into the sharded policy
            for (key, sharded), (ref_key, full) in zip(policy.hf.named_parameters(), reference.named_parameters(),
                                                       strict=True):
                assert key == ref_key
                sharded.copy_(distribute_tensor(full.detach(), sharded.device_mesh, sharded.placements))
        engine.sync_weights_from(policy.hf)
        after = [g.token_ids for g in engine.generate(PROMPTS, params)]
        assert after == [reference_greedy(reference, p, MAX_TOKENS, stop) for p in PROMPTS]
        assert after != before
        assert engine.llm.collective_rpc(reprocess_tied_embeddings) == [2 if spec.tie_word_embeddings else 0]
    finally:
        engine.shutdown()
