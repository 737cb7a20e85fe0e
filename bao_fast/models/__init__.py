"""Locally created models and the tokenizer shipped with the package (nothing is downloaded)."""

from bao_fast.models.tiny import TOKENIZER_DIR, TinyModelSpec, create_tiny_model, load_tokenizer

__all__ = ["TOKENIZER_DIR", "TinyModelSpec", "create_tiny_model", "load_tokenizer"]
