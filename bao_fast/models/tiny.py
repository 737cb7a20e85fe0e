"""Tiny Qwen2-shaped causal LMs with random weights, written as HF checkpoints that vLLM and
transformers both load, plus the byte-level tokenizer shipped in ``bao_fast/assets/tokenizer``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a tiny Qwen2 model. head_dim 64: vLLM's CPU attention rejects head dims under 32."""

    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 64
    intermediate_size: int = 256
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False


def load_tokenizer(path: str | Path = TOKENIZER_DIR) -> PreTrainedTokenizerBase:
    """The shipped tokenizer (vocab 2048, Qwen-style chat template, eos ``<|im_end|>``)."""
    return AutoTokenizer.from_pretrained(str(path))


def create_tiny_model(
    out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec(), seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a random-weight Qwen2ForCausalLM and the tokenizer to ``out_dir``; returns the path.

    Idempotent: an existing checkpoint with the same spec and seed is reused.
    """
    out = Path(out_dir)
    marker = out / "tiny_spec.txt"
    fingerprint = f"{asdict(spec)} seed={seed} dtype={dtype}"
    if marker.exists() and marker.read_text() == fingerprint:
        return out
    tokenizer = load_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_theta=10000.0,
        torch_dtype=dtype,
        **asdict(spec),
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker.write_text(fingerprint)
    return out
