"""bao_fast: a lean, fast trainer for proactive multi-turn LLM agents with BAO, and its fused ops."""

__version__ = "0.1.0"
