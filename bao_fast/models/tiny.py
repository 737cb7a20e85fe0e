"""Tiny random-weight causal LMs (Qwen2 by default; Qwen3, Llama-3, Mistral on request), written as HF
checkpoints that vLLM and transformers both load, plus the byte-level tokenizer shipped in
``bao_fast/assets/tokenizer``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen3Config,
)

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"
#: Written by ``create_tiny_model`` next to the checkpoint: the spec, seed, dtype and arch it was made with.
TINY_SPEC_FILE = "tiny_spec.txt"

#: ``create_tiny_model``'s architectures: their config class, and config keys beyond the spec's.
ARCHITECTURES: dict[str, type[PretrainedConfig]] = {
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,  # q_norm / k_norm; head_dim independent of hidden_size / heads
    "llama": LlamaConfig,  # Llama-3.1 RoPE ("llama3" frequency scaling)
    "mistral": MistralConfig,  # the class default sliding_window (4096), as Mistral-7B-v0.1 ships
}


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a tiny model. head_dim 64: vLLM's CPU attention rejects head dims under 32."""

    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 64
    intermediate_size: int = 256
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads}): attention shares each KV head among a whole group of query heads"
            )


def load_tokenizer(path: str | Path = TOKENIZER_DIR) -> PreTrainedTokenizerBase:
    """The shipped tokenizer (vocab 2048, Qwen-style chat template, eos ``<|im_end|>``)."""
    return AutoTokenizer.from_pretrained(str(path))


def _rope_parameters(arch: str, spec: TinyModelSpec) -> dict[str, Any]:
    if arch == "llama":  # Llama-3.1's scaling, its context ``factor`` times the original one
        return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": spec.max_position_embeddings // 8}
    return {"rope_type": "default", "rope_theta": 10000.0}


def create_tiny_model(
    out_dir: str | Path,
    spec: TinyModelSpec = TinyModelSpec(),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    arch: str = "qwen2",
) -> Path:
    """Write a random-weight ``*ForCausalLM`` of ``arch`` (a key of ``ARCHITECTURES``) and the tokenizer to
    ``out_dir``; returns the path.

    Idempotent: an existing checkpoint with the same spec, seed, dtype and arch is reused; one of another
    shape that this function wrote is replaced. FileExistsError for any other checkpoint in ``out_dir``
    (``model.tiny`` with ``model.path`` naming a real model must not overwrite it).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    out = Path(out_dir)
    marker = out / TINY_SPEC_FILE
    fingerprint = f"{asdict(spec)} seed={seed} dtype={dtype} arch={arch}"
    if marker.exists() and marker.read_text() == fingerprint:
        return out
    if (out / "config.json").exists() and not marker.exists():
        raise FileExistsError(f"{str(out)!r} holds a checkpoint that is not a tiny model; refusing to overwrite it")
    tokenizer = load_tokenizer()
    config = ARCHITECTURES[arch](
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters=_rope_parameters(arch, spec),
        torch_dtype=dtype,
        **asdict(spec),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker.write_text(fingerprint)
    return out
