"""``packed_token_logprobs``: one packed backbone pass equals running every trajectory on its own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Gemma3Config

from bao_fast.data.segments import pack_segments
from bao_fast.models import TinyModelSpec, create_tiny_model
from bao_fast.models.forward import backbone, lm_head, packed_token_logprobs

SPEC = TinyModelSpec(hidden_size=64, num_hidden_layers=2, intermediate_size=96)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "m", spec=SPEC, seed=5)


def _trajectories(vocab: int, seed: int = 0) -> list[list[tuple[str, list[int]]]]:
    gen = torch.Generator().manual_seed(seed)

    def toks(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    return [
        [("system", toks(5)), ("user", toks(4)), ("assistant", toks(6)), ("observation", toks(3)),
         ("assistant", toks(4))],
        [("user", toks(1)), ("assistant", toks(1))],
        [("system", toks(7)), ("assistant", toks(9)), ("user", toks(2)), ("assistant", toks(5))],
    ]


def _separate(model, trajectories, temperature):
    """Per trajectory: full logits from the model's own forward, log-softmax and entropy in fp64."""
    logps, ents = [], []
    for traj in trajectories:
        ids = torch.tensor([t for _, seg in traj for t in seg])
        logits = model(input_ids=ids[None]).logits[0].double() / temperature
        logprobs = torch.log_softmax(logits, dim=-1)
        nxt = torch.cat([ids[1:], ids[:1]])  # last row's target is ignored; any valid index will do
        logps.append(logprobs.gather(1, nxt[:, None]).squeeze(1))
        ents.append(-(logprobs.exp() * logprobs).sum(-1))
    return torch.cat(logps), torch.cat(ents)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_separate(model_dir: Path, attn: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32).eval()
    trajectories = _trajectories(model.config.vocab_size)
    batch = pack_segments(trajectories)
    logp, ent = packed_token_logprobs(model, batch, temperature=0.8, return_entropy=True)
    ref_logp, ref_ent = _separate(model, trajectories, 0.8)
    rows = batch.target_rows
    trained = torch.tensor([role == "assistant" for traj in trajectories for role, seg in traj for _ in seg])
    starts = torch.tensor([i == 0 for traj in trajectories for i in range(sum(len(seg) for _, seg in traj))])
    expected_rows = (trained[1:] & ~starts[1:]).nonzero().squeeze(1)  # row t predicts a trained token t+1
    assert torch.equal(rows, expected_rows)
    torch.testing.assert_close(logp[rows].double(), ref_logp[rows], rtol=0, atol=1e-5)
    torch.testing.assert_close(ent[rows].double(), ref_ent[rows], rtol=0, atol=1e-5)
    off = torch.ones(batch.num_tokens, dtype=torch.bool)
    off[rows] = False
    assert torch.all(logp[off] == 0) and torch.all(ent[off] == 0)


def test_unsupported_head_raises(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        packed_token_logprobs(model, pack_segments(_trajectories(model.config.vocab_size)))


def test_empty_batch_is_refused(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with pytest.raises(ValueError, match="batch has no tokens"):
        packed_token_logprobs(model, pack_segments([[], []]))


# Tiny stand-ins for the architectures users train (hidden 128, head_dim 64, 2 layers, the shipped vocab).
ARCHITECTURES = {
    # Qwen3-4B's traits: q_norm / k_norm, head_dim apart from hidden / heads (4 * 64 != 128), tied head
    "qwen3": ("qwen3", TinyModelSpec(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama": ("llama", TinyModelSpec()),  # rope_type llama3
    "mistral": ("mistral", TinyModelSpec()),  # sliding_window 4096: transformers' own packed masks
    "qwen2-tied": ("qwen2", TinyModelSpec(tie_word_embeddings=True)),  # Qwen2.5's small sizes
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch_model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch, spec = ARCHITECTURES[request.param]
    return create_tiny_model(tmp_path_factory.mktemp(request.param) / "m", spec=spec, seed=7, arch=arch)


def test_architectures_packed_equals_separate(arch_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(arch_model_dir, dtype=torch.float32).eval()
    trajectories = _trajectories(model.config.vocab_size, seed=2)
    batch = pack_segments(trajectories)
    logp, ent = packed_token_logprobs(model, batch, temperature=0.7, return_entropy=True)
    ref_logp, ref_ent = _separate(model, trajectories, 0.7)
    rows = batch.target_rows
    torch.testing.assert_close(logp[rows].double(), ref_logp[rows], rtol=0, atol=1e-5)
    torch.testing.assert_close(ent[rows].double(), ref_ent[rows], rtol=0, atol=1e-5)
    sliding = model.config.model_type == "mistral"
    assert model.config._attn_implementation == ("sdpa" if sliding else "bao_varlen_sdpa")


def test_architectures_gradients_reach_backbone_and_head(arch_model_dir: Path) -> None:
    """Tied heads: the shared embedding's gradient is the sum of an untied copy's embedding and head gradients."""
    model = AutoModelForCausalLM.from_pretrained(arch_model_dir, dtype=torch.float32)
    batch = pack_segments(_trajectories(model.config.vocab_size, seed=3))
    packed_token_logprobs(model, batch).sum().backward()
    weight, _ = lm_head(model)
    embedding = model.get_input_embeddings().weight
    layer_grads = [p.grad for p in backbone(model).layers.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in layer_grads)
    assert (weight is embedding) == model.config.tie_word_embeddings
    if weight is not embedding:
        assert weight.grad.abs().sum() > 0 and embedding.grad.abs().sum() > 0
        return
    untied = AutoModelForCausalLM.from_pretrained(arch_model_dir, dtype=torch.float32)
    untied.lm_head.weight = torch.nn.Parameter(untied.get_input_embeddings().weight.detach().clone())
    packed_token_logprobs(untied, batch).sum().backward()
    head_grad, embed_grad = untied.lm_head.weight.grad, untied.get_input_embeddings().weight.grad
    assert head_grad.abs().sum() > 0 and embed_grad.abs().sum() > 0
    torch.testing.assert_close(embedding.grad, head_grad + embed_grad, rtol=1e-5, atol=1e-6)


def _tiny_config(model_type: str, **overrides: object):
    shape = {"vocab_size": 2048, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64}
    return AutoConfig.for_model(model_type, **{**shape, **overrides})


@pytest.mark.parametrize(
    ("model_type", "overrides", "key"),
    [
        ("gemma2", {}, "final_logit_softcapping=30.0"),  # Gemma-2's default cap
        ("gemma3_text", {"final_logit_softcapping": 1.0}, "final_logit_softcapping=1.0"),  # 1.0 still caps
        ("cohere", {}, "logit_scale=0.0625"),
        ("granite", {"logits_scaling": 8.0}, "logits_scaling=8.0"),
    ],
)
def test_logit_transforming_heads_are_refused(model_type: str, overrides: dict, key: str) -> None:
    model = AutoModelForCausalLM.from_config(_tiny_config(model_type, **overrides))
    with pytest.raises(ValueError, match=re.escape(f"model config {key} transforms the logits")):
        packed_token_logprobs(model, pack_segments(_trajectories(2048)))


def _tiny_gemma3_multimodal(**text_overrides: object):
    """Gemma-3 as its >= 4B checkpoints load (``Gemma3ForConditionalGeneration``), with a one-layer vision tower."""
    text = _tiny_config("gemma3_text", num_hidden_layers=2, **text_overrides).to_dict()
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(
        Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    ).eval()


def test_gemma3_multimodal_packed_equals_separate() -> None:
    """Its sliding-window layers sit in the text config: the model keeps transformers' own packed masks."""
    model = _tiny_gemma3_multimodal()
    trajectories = _trajectories(2048, seed=4)
    batch = pack_segments(trajectories)
    logp = packed_token_logprobs(model, batch)
    ref_logp, _ = _separate(model, trajectories, 1.0)
    torch.testing.assert_close(logp[batch.target_rows].double(), ref_logp[batch.target_rows], rtol=0, atol=1e-5)
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match=re.escape("final_logit_softcapping=30.0")):  # checked in the text config too
        lm_head(_tiny_gemma3_multimodal(final_logit_softcapping=30.0))
