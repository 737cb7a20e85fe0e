"""transformers ``generate`` rollout engine: the same interface as ``VLLMEngine``, for machines without vLLM.

::

    engine = HFEngine.from_config(model_path, cfg.rollout, device="cpu")
    gens = engine.generate(prompts, GenerationParams(max_tokens=64, temperature=0.0))
    engine.sync_weights_from(policy)   # plain or FSDP2 policy: gathered full tensors copied in place

Prompts are sorted by length and decoded in left-padded micro-batches of at most ``max_batch_size``;
positions come from the attention mask, so a prompt's continuation does not depend on its batch-mates
(up to float rounding), and greedy output matches vLLM's on the same weights. Every prompt's output is
cut at its first stop token (kept) and at ``max_model_len - len(prompt)`` tokens. Log-probs are the
log-softmax of the processed scores (after temperature / top-p), the sampling distribution. Sampling
with ``params.seed`` seeds a forked RNG, so it neither depends on nor disturbs the global RNG state.
On a GPU ``sleep`` moves the model to host memory and ``wake_up`` moves it back; both are no-ops on the CPU.
The checkpoint's ``generation_config.json`` is ignored (transformers would otherwise fill every setting left
unset, e.g. a ``repetition_penalty``, from it): rollouts sample the policy's own distribution. Only its eos
ids count: generation stops at those of ``config.json`` and ``generation_config.json`` alike, as vLLM's does
(Qwen-Instruct checkpoints list ``<|endoftext|>`` there only).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, GenerationConfig

from bao_fast.config import RolloutConfig
from bao_fast.rollout.engine import DTYPES, Generation, GenerationParams, check_context_length, validate_prompts
from bao_fast.rollout.weight_sync import iter_full_weights


def _as_ids(eos: int | Sequence[int] | None) -> tuple[int, ...]:
    return tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))


def checkpoint_eos_ids(model_path: str | Path, config_eos: int | Sequence[int] | None) -> tuple[int, ...]:
    """The eos ids of the checkpoint at ``model_path``: ``config_eos`` (config.json's) then those only its
    ``generation_config.json`` lists, in order without repeats."""
    ids = list(_as_ids(config_eos))
    if (Path(model_path) / "generation_config.json").is_file():
        ids += _as_ids(GenerationConfig.from_pretrained(str(model_path)).eos_token_id)
    return tuple(dict.fromkeys(ids))


class HFEngine:
    """``GenerationEngine`` over a transformers causal LM (``model`` is used as is: no copy; its generation
    config is reset to neutral defaults). Generation stops at any of ``eos_token_ids``."""

    def __init__(
        self,
        model: nn.Module,
        *,
        max_model_len: int,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        max_batch_size: int = 64,
        bucket_mb: float = 512,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not eos_token_ids:
            raise ValueError("eos_token_ids must name at least one token")
        model.generation_config = GenerationConfig()
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_model_len = max_model_len
        self.eos_token_ids = tuple(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.bucket_mb = bucket_mb

    @classmethod
    def from_config(
        cls,
        model_path: str | Path,
        cfg: RolloutConfig,
        *,
        dtype: str | None = None,
        device: str | torch.device | None = None,
        max_batch_size: int = 64,
    ) -> HFEngine:
        """Load the HF checkpoint at ``model_path``; ``dtype`` defaults to bfloat16 on a GPU, float32 on CPU.
        ConfigError when ``cfg.max_model_len`` exceeds the checkpoint's context (``check_context_length``)."""
        if not Path(model_path).is_dir():
            raise ValueError(f"model_path {str(model_path)!r} is not a checkpoint directory")
        check_context_length(model_path, cfg.max_model_len)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or ("bfloat16" if device.type == "cuda" else "float32")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=DTYPES[dtype]).to(device)
        config = model.config
        eos_ids = checkpoint_eos_ids(model_path, config.eos_token_id)
        if not eos_ids:
            raise ValueError(f"checkpoint {str(model_path)!r}: its config has no eos_token_id")
        return cls(
            model,
            max_model_len=cfg.max_model_len,
            eos_token_ids=eos_ids,
            pad_token_id=config.pad_token_id if config.pad_token_id is not None else eos_ids[0],
            max_batch_size=max_batch_size,
            bucket_mb=cfg.weight_sync_bucket_mb,
        )

    def _generation_config(self, params: GenerationParams, max_new_tokens: int) -> GenerationConfig:
        sampling = {} if params.greedy else {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=not params.greedy,
            eos_token_id=[*self.eos_token_ids, *params.stop_token_ids],
            pad_token_id=self.pad_token_id,
            output_scores=params.return_logprobs,
            return_dict_in_generate=True,
            **sampling,
        )

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], params: GenerationParams) -> list[Generation]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        limits = [min(params.max_tokens, self.max_model_len - len(p)) for p in prompts]
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            generation_config=self._generation_config(params, max(limits)),
        )
        new_tokens = out.sequences[:, width:].tolist()
        logprobs = None
        if params.return_logprobs:
            sampled = out.sequences[:, width:]  # [B, steps]; one [B, V] score tensor per step
            per_step = [
                step.float().log_softmax(-1).gather(-1, sampled[:, j, None]).squeeze(-1)
                for j, step in enumerate(out.scores)
            ]
            logprobs = torch.stack(per_step, dim=1).tolist()
        stops = {*self.eos_token_ids, *params.stop_token_ids}
        results = []
        for row, limit in enumerate(limits):
            tokens = new_tokens[row][:limit]
            end = next((j + 1 for j, tok in enumerate(tokens) if tok in stops), None)
            finish = "stop" if end is not None else "length"
            tokens = tokens[:end] if end is not None else tokens
            lps = logprobs[row][: len(tokens)] if logprobs is not None else None
            results.append(Generation(token_ids=tokens, logprobs=lps, finish_reason=finish))
        return results

    def generate(self, prompts: list[list[int]], params: GenerationParams) -> list[Generation]:
        """One continuation per prompt (see ``bao_fast.rollout.engine`` for the contract)."""
        validate_prompts(prompts, self.max_model_len)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Generation | None] = [None] * len(prompts)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=params.seed is not None):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(order), self.max_batch_size):
                chunk = order[start : start + self.max_batch_size]
                for i, gen in zip(chunk, self._generate_batch([prompts[i] for i in chunk], params)):
                    results[i] = gen
        return results  # type: ignore[return-value]

    def sleep(self) -> None:
        """Move the model to host memory (GPU only; it moves ``model`` itself, so an engine that wraps the
        training model must not sleep)."""
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        """Move the model back to its device (GPU only)."""
        if self.device.type == "cuda":
            self.model.to(self.device)

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Copy HF-named full tensors into the model in place (tied aliases such as ``lm_head.weight``
        are accepted). Raises ValueError naming an unknown parameter or a shape mismatch."""
        params = self.model.state_dict(keep_vars=True)
        for name, tensor in named_tensors:
            if name not in params:
                raise ValueError(f"named_tensors: unknown parameter {name!r}")
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"named_tensors: {name!r} has shape {tuple(tensor.shape)}, model expects "
                    f"{tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)

    def sync_weights_from(self, model: nn.Module) -> None:
        """Copy ``model``'s weights (plain or FSDP2-sharded; every rank must call this) into the engine."""
        self.load_weights(iter_full_weights(model, self.dtype, self.bucket_mb))
