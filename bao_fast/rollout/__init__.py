"""Multi-turn agent loop and generation engines (vLLM colocated, transformers fallback).

``run_episodes(engine, tokenizer, gym_factory, tasks, ...) -> list[Trajectory]`` drives the episodes;
engines implement ``GenerationEngine`` and, to play episodes continuously, ``StreamingEngine``
(``bao_fast.rollout.engine``; vLLM's does); ``TPGroup`` keeps the ranks of a
tensor-parallel engine in step (``bao_fast.rollout.tp_group``). ``VLLMEngine`` is imported lazily
(``from bao_fast.rollout.vllm_engine import VLLMEngine``) so that this package imports without vLLM.
"""

from bao_fast.rollout.agent_loop import run_episodes
from bao_fast.rollout.chat_format import ChatFormat
from bao_fast.rollout.engine import Generation, GenerationEngine, GenerationParams, StreamingEngine
from bao_fast.rollout.hf_engine import HFEngine
from bao_fast.rollout.tp_group import TPGroup
from bao_fast.rollout.trajectory import END_REASONS, Trajectory
from bao_fast.rollout.weight_sync import iter_full_weights

__all__ = [
    "END_REASONS",
    "ChatFormat",
    "Generation",
    "GenerationEngine",
    "GenerationParams",
    "HFEngine",
    "StreamingEngine",
    "TPGroup",
    "Trajectory",
    "iter_full_weights",
    "run_episodes",
]
