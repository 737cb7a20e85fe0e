"""FSDP2 policy of each supported architecture in a gloo world of one: ``load_policy`` shards every decoder
layer (found through the model's decoder stack, not a class name), a tied LM head stays tied through sharding
and an optimizer step, and ``export_hf`` writes a checkpoint that reloads to the trained policy's log-probs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, Gemma3Config

from bao_fast.config import ModelConfig
from bao_fast.data.segments import pack_segments
from bao_fast.models import TinyModelSpec, create_tiny_model, load_tokenizer
from bao_fast.models.forward import packed_token_logprobs
from bao_fast.train.checkpoint import export_hf
from bao_fast.train.fsdp import decoder_layers, init_distributed, load_policy

pytestmark = pytest.mark.usefixtures("single_rank_world")

ARCHITECTURES = {
    "qwen3": ("qwen3", TinyModelSpec(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama": ("llama", TinyModelSpec()),
    "mistral": ("mistral", TinyModelSpec()),
    "qwen2-tied": ("qwen2", TinyModelSpec(tie_word_embeddings=True)),
}


@pytest.fixture(scope="module")
def batch():
    return pack_segments([[("user", [5, 6, 7, 8]), ("assistant", [9, 10, 11, 12, 13])],
                          [("user", [4, 3]), ("assistant", [20, 21, 22, 1900])]])


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_shard_train_export_reload(name: str, batch, tmp_path: Path) -> None:
    arch, spec = ARCHITECTURES[name]
    path = create_tiny_model(tmp_path / "init", spec=spec, seed=11, arch=arch)
    policy = load_policy(path, ModelConfig(path=str(path)), init_distributed())
    hf = policy.hf
    assert decoder_layers(hf) is hf.model.layers and len(hf.model.layers) == 2
    assert all(isinstance(m, FSDPModule) for m in [policy, *hf.model.layers])
    assert all(isinstance(p, DTensor) for p in policy.parameters())
    tied = spec.tie_word_embeddings
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied

    initial = policy(batch).detach()
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    policy(batch).sum().backward()
    assert hf.model.embed_tokens.weight.grad is not None and hf.lm_head.weight.grad is not None
    optimizer.step()
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied
    with torch.no_grad():
        trained = policy(batch)
    rows = batch.target_rows
    assert (trained[rows] - initial[rows]).abs().max() > 1e-3  # the step changed the policy

    out = export_hf(policy, load_tokenizer(), tmp_path / "export")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert ("lm_head.weight" in stored) == (not tied)  # a tied head is stored once, as the embedding
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).train()
    assert type(reloaded).__name__ == type(hf).__name__
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tied
    with torch.no_grad():
        torch.testing.assert_close(packed_token_logprobs(reloaded, batch), trained, rtol=0, atol=1e-6)


def test_decoder_layers_of_a_composite_model() -> None:
    """Gemma-3 >= 4B loads as ``Gemma3ForConditionalGeneration``: its decoder layers sit in the text model."""
    text = {"vocab_size": 2048, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}
    model = AutoModelForCausalLM.from_config(Gemma3Config(text_config=text, vision_config=vision,
                                                          mm_tokens_per_image=4))
    assert decoder_layers(model) is model.model.language_model.layers and len(decoder_layers(model)) == 2
