"""Packed forward of a transformers causal LM into per-token log-probs, bypassing the model's logits.

The backbone runs once over the whole packed stream (batch dimension 1, ``position_ids`` restarting at 0 per
trajectory), and every trajectory attends to itself only; ``tests/models`` checks this against running each
trajectory alone. sdpa / eager models are switched to ``bao_fast.models.varlen_attention`` (per-trajectory
causal attention, no ``[T, T]`` mask, so packing costs ``Σ L_b²`` like padding); other models rely on
transformers detecting the ``position_ids`` restarts (flash-attention goes varlen, flex builds a block mask).
The LM head is applied by ``bao_fast.ops.token_logprobs`` to the trained target rows only, so no ``[T, V]``
logits exist at any point.
"""

from __future__ import annotations

import torch
from torch import nn

from bao_fast.data.packed import PackedBatch
from bao_fast.models.varlen_attention import enable_varlen_attention, varlen_inputs
from bao_fast.ops.logprobs import token_logprobs

# Config keys of heads that post-process the logits in ways token_logprobs does not reproduce, with the value
# that leaves the logits as they are: Gemma-2/3 soft-cap ``c * tanh(z / c)`` unless None, Cohere multiplies by
# ``logit_scale``, Granite divides by ``logits_scaling``.
_UNSUPPORTED_HEAD_KEYS: dict[str, float | None] = {
    "final_logit_softcapping": None,
    "logit_scale": 1.0,
    "logits_scaling": 1.0,
}


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack of a ``*ForCausalLM`` (``model.get_decoder()``, else ``model.base_model``)."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "base_model", None)
    if decoder is None or decoder is model:
        raise TypeError(f"model {type(model).__name__} exposes no backbone (get_decoder() / base_model)")
    return decoder


def lm_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` of the output embedding; raises on unsupported logit transforms."""
    config = getattr(model, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    configs = (config, get_text_config()) if callable(get_text_config) else (config,)  # + a composite's text model
    for key, identity in _UNSUPPORTED_HEAD_KEYS.items():
        for cfg in configs:
            value = getattr(cfg, key, identity)
            if value != identity:
                raise ValueError(
                    f"model config {key}={value} transforms the logits; token_logprobs does not support it"
                )
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"model {type(model).__name__} has no output embedding with a weight")
    bias = getattr(head, "bias", None)
    return head.weight, bias if isinstance(bias, torch.Tensor) else None


def packed_token_logprobs(
    model: nn.Module,
    batch: PackedBatch,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``batch.targets`` under ``model`` for the whole packed batch, in one backbone pass.

    Args:
        model: a transformers causal LM (``*ForCausalLM``) on ``batch.device``; an sdpa / eager model is
            switched to its varlen counterpart for good (see ``enable_varlen_attention``).
        batch: the packed trajectories (``input_ids``, ``position_ids``, ``targets``, ``target_rows``).
        temperature: the sampling temperature the log-probs refer to.
        return_entropy: also return the per-row entropy of the (tempered) next-token distribution.
        ignore_index: the value marking ``batch.targets`` without a next token.
    Returns:
        logp f32 ``[T]`` (and entropy f32 ``[T]``) aligned with the rows: row ``t`` scores
        ``targets[t]``; rows not in ``batch.target_rows`` are 0 and get no gradient.
    """
    if batch.num_tokens == 0:
        raise ValueError("batch has no tokens: the backbone cannot run on an empty packed batch")
    weight, bias = lm_head(model)
    inputs = {"input_ids": batch.input_ids[None], "position_ids": batch.position_ids[None], "use_cache": False}
    if enable_varlen_attention(model):  # lengths from the host description: no device sync
        inputs |= varlen_inputs(batch.host_offsets().tokens.diff().tolist(), batch.device)
    out = backbone(model)(**inputs)
    hidden = out.last_hidden_state[0]
    return token_logprobs(
        hidden,
        weight,
        batch.targets,
        bias=bias,
        temperature=temperature,
        return_entropy=return_entropy,
        ignore_index=ignore_index,
        target_rows=batch.target_rows,
    )
