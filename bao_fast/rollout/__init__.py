"""Multi-turn agent loop and generation engines (vLLM colocated, transformers fallback)."""
