"""The shipped tokenizer and the tiny-model factory that tests and the demo build on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bao_fast.config import load_config
from bao_fast.models import TinyModelSpec, create_tiny_model, load_tokenizer
from bao_fast.models.tiny import ARCHITECTURES
from bao_fast.train.runtime import tiny_spec


def test_tokenizer_chat_template_and_markup_tokens() -> None:
    tok = load_tokenizer()
    assert len(tok) == 2048
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    messages = [{"role": "user", "content": "[action] 1 2 3 4"}, {"role": "assistant", "content": "<think>x</think>"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\n[action] 1 2 3 4<|im_end|>\n<|im_start|>assistant\n<think>x</think><|im_end|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    for markup in ("<think>", "</think>", "<tool_call>", "</tool_call>"):
        ids = tok.encode(markup, add_special_tokens=False)
        assert len(ids) == 1, markup
        assert tok.decode(ids, skip_special_tokens=True) == markup  # markup survives decoding
    sample = "Reward: 0.0\n[answer] -12.5 <tool_call>{\"choice\": \"action\"}</tool_call>"
    assert tok.decode(tok.encode(sample, add_special_tokens=False)) == sample


def test_create_tiny_model_round_trips_and_is_idempotent(tmp_path: Path) -> None:
    spec = TinyModelSpec(hidden_size=64, num_hidden_layers=1, intermediate_size=96)
    path = create_tiny_model(tmp_path / "m", spec=spec, seed=3)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert create_tiny_model(tmp_path / "m", spec=spec, seed=3) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tok) == 2048
    assert model.config.head_dim == 64 and model.config.hidden_size == 64
    ids = torch.tensor([tok.encode("[action] 1 2 3 4", add_special_tokens=False)])
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 2048) and torch.isfinite(logits).all()

    other = AutoModelForCausalLM.from_pretrained(create_tiny_model(tmp_path / "n", spec=spec, seed=4))
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)  # the seed matters


def test_create_tiny_model_architectures(tmp_path: Path) -> None:
    spec = TinyModelSpec(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    expected = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
                "mistral": "MistralForCausalLM"}
    assert sorted(ARCHITECTURES) == sorted(expected)
    for arch, cls in expected.items():
        model = AutoModelForCausalLM.from_pretrained(create_tiny_model(tmp_path / arch, spec=spec, arch=arch))
        attn = model.model.layers[0].self_attn
        assert type(model).__name__ == cls and model.config.vocab_size == 2048
        assert attn.q_proj.weight.shape == (4 * 64, 128)  # head_dim 64 whatever hidden_size / heads give
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert hasattr(attn, "q_norm") == (arch == "qwen3")
        assert model.config.rope_parameters["rope_type"] == ("llama3" if arch == "llama" else "default")
        assert getattr(model.config, "sliding_window", None) == (4096 if arch == "mistral" else None)
    default = AutoModelForCausalLM.from_pretrained(create_tiny_model(tmp_path / "default"))
    assert type(default).__name__ == "Qwen2ForCausalLM" and not default.config.tie_word_embeddings
    with pytest.raises(ValueError, match="arch must be one of"):
        create_tiny_model(tmp_path / "x", arch="gemma2")


def _layers(path: Path) -> int:
    return json.loads((path / "config.json").read_text())["num_hidden_layers"]


def test_tiny_model_path_replaces_only_tiny_models(tmp_path: Path) -> None:
    path = tmp_path / "model"
    cfg = load_config(None, ["model.tiny=true", f"model.path={path}", "model.tiny_layers=3"])
    create_tiny_model(cfg.model.path, spec=tiny_spec(cfg.model))
    assert _layers(path) == 3
    create_tiny_model(cfg.model.path)  # another tiny shape: replaced
    assert _layers(path) == 2


def test_tiny_model_never_overwrites_another_checkpoint(tmp_path: Path) -> None:
    real = tmp_path / "real"
    spec = tiny_spec(load_config(None, ["model.tiny=true", "model.tiny_layers=3"]).model)
    create_tiny_model(tmp_path / "src", spec=spec)
    shutil.copytree(tmp_path / "src", real, ignore=shutil.ignore_patterns("tiny_spec.txt"))  # a user's checkpoint
    before = {p.name: p.read_bytes() for p in real.iterdir()}
    with pytest.raises(FileExistsError, match="not a tiny model"):
        create_tiny_model(real)
    assert {p.name: p.read_bytes() for p in real.iterdir()} == before


def test_a_tiny_spec_whose_kv_heads_do_not_divide_the_heads_is_refused() -> None:
    with pytest.raises(ValueError, match=r"num_key_value_heads \(2\) must divide num_attention_heads \(5\)"):
        TinyModelSpec(hidden_size=320, num_attention_heads=5, num_key_value_heads=2)
    TinyModelSpec(num_attention_heads=6, num_key_value_heads=3)
