"""Distributed setup and the FSDP2-sharded policy.

The trainer always runs inside ``torch.distributed``: under ``torchrun`` the process group comes from the
environment; a plain process initialises a world of one (gloo on CPU, nccl on GPU). The policy is the HF
causal LM wrapped in :class:`Policy`, whose ``forward`` returns packed per-token log-probs through the
backbone-once + fused LM-head helper (never the model's logits path). ``fully_shard`` is applied to every
decoder layer and to the :class:`Policy` root (embeddings, final norm, LM head), so the root's FSDP hooks
gather the LM-head weight for the fused op and reduce its gradient.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from bao_fast.config import ModelConfig
from bao_fast.data.packed import PackedBatch
from bao_fast.models.forward import backbone, packed_token_logprobs
from bao_fast.rollout.engine import DTYPES, engine_dtype


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the world: global ``rank``, ``world_size``, ``local_rank``, ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> DistEnv:
    """Join (or create) the default process group and build a 1-D data-parallel device mesh.

    Reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; without them, a world of one. A world of one keeps
    its store in memory: a TCP store would bind ``MASTER_PORT``, which a child process inherits from a parent
    whose own store still holds it. Backend: nccl when CUDA is available, else gloo. Idempotent.
    """
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if int(os.environ["WORLD_SIZE"]) == 1:  # no peer to meet: an in-memory store, no port to bind
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, mesh)


def shutdown_distributed() -> None:
    """Destroy the process groups: a colocated vLLM engine's own groups first, through vLLM (its teardown at
    interpreter exit then finds nothing left to destroy instead of failing on groups already gone), then the
    default group."""
    vllm_parallel_state = sys.modules.get("vllm.distributed.parallel_state")
    if vllm_parallel_state is not None:
        vllm_parallel_state.destroy_model_parallel()
        vllm_parallel_state.destroy_distributed_environment()
    if dist.is_initialized():
        dist.destroy_process_group()


class Policy(nn.Module):
    """The trainable policy: ``forward(batch)`` -> per-target-row log-probs (and entropies).

    ``hf`` is the wrapped ``PreTrainedModel``; its parameter names are the HF checkpoint names.
    """

    def __init__(self, hf: PreTrainedModel) -> None:
        super().__init__()
        self.hf = hf

    def forward(
        self, batch: PackedBatch, temperature: float = 1.0, return_entropy: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """float32 log-probs of ``batch.targets``, shape [T] aligned with the rows (0 outside
        ``batch.target_rows``); with ``return_entropy`` also the float32 per-row entropy [T]."""
        return packed_token_logprobs(self.hf, batch, temperature=temperature, return_entropy=return_entropy)


def disable_dropout(model: nn.Module) -> None:
    """Turn every dropout of a transformers model off: ``nn.Dropout`` modules and the ``attention_dropout``
    probability attention modules read from their config (applied only in train mode)."""
    if isinstance(getattr(getattr(model, "config", None), "attention_dropout", None), float):
        model.config.attention_dropout = 0.0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _apply_liger(model: PreTrainedModel) -> bool:
    """Patch RMSNorm / RoPE / SwiGLU with liger-kernel (GPU only; the LM head stays ours). True if applied."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return False
    _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)
    return True


def attention_problem(name: str) -> str | None:
    """Why transformers cannot train with attention implementation ``name`` (``model.attn_implementation``)
    on this machine, or None: an unknown name, flex attention without a GPU (torch's CPU FlexAttention has no
    backward), or a flash-attention one without a GPU or its package."""
    import transformers.utils
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = sorted({"eager", *(key for key in ALL_ATTENTION_FUNCTIONS if "|" not in key)})
    if name not in known:
        return f"must be one of {known}, got {name!r}"
    if name == "flex_attention" and not torch.cuda.is_available():
        return "flex_attention trains on a CUDA GPU only (torch's CPU FlexAttention has no backward); sdpa runs " \
            "everywhere"
    if name.startswith("flash_attention_"):
        available = getattr(transformers.utils, f"is_flash_attn_{name.rsplit('_', 1)[1]}_available", None)
        if not torch.cuda.is_available() or (available is not None and not available()):
            return f"{name} needs a CUDA GPU and its flash-attn package; sdpa runs everywhere"
    return None


def load_policy(path: str | Path, cfg: ModelConfig, env: DistEnv) -> Policy:
    """Load the HF checkpoint at ``path`` in float32 (master weights) and shard it over ``env.mesh``.

    Only rank 0 reads the checkpoint into host memory; the other ranks build the model on the meta device
    and receive their shards from rank 0 (:func:`_broadcast_from_rank0`), so a node's host memory holds one
    float32 copy of the model, not one per GPU. GPU: parameters computed in ``cfg.dtype`` with float32
    gradient reduction, liger-kernel patches when installed and ``cfg.use_liger``. CPU: float32 throughout.
    ``cfg.gradient_checkpointing`` recomputes each decoder layer's activations in the backward pass. The
    model is in train mode (transformers only checkpoints then) with every dropout off, so its log-probs are
    deterministic.
    """
    if env.is_main:
        hf = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation=cfg.attn_implementation
        )
    else:
        config = AutoConfig.from_pretrained(str(path))
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(
                config, dtype=torch.float32, attn_implementation=cfg.attn_implementation
            )
    hf.config.use_cache = False
    disable_dropout(hf)
    hf.train()
    on_gpu = env.device.type == "cuda"
    if on_gpu and cfg.use_liger:
        _apply_liger(hf)
    if cfg.gradient_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = Policy(hf)
    if env.world_size == 1:
        return shard_policy(policy, env, compute_dtype=compute_dtype(cfg, env))
    full = policy.state_dict() if env.is_main else {}
    shard_policy(policy, env, compute_dtype=compute_dtype(cfg, env))
    _broadcast_from_rank0(policy, full, env)
    return policy


def _broadcast_from_rank0(policy: Policy, full: dict[str, Tensor], env: DistEnv) -> None:
    """Give every rank rank 0's weights: ``full`` is rank 0's full state dict (empty elsewhere); the other
    ranks' sharded policy is still on the meta device. Buffers outside the state dict (rotary frequencies)
    come from rank 0 too."""
    if not env.is_main:
        policy.to_empty(device=env.device)
    set_model_state_dict(policy, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in policy.buffers():
        dist.broadcast(buffer, src=0)


def compute_dtype(cfg: ModelConfig, env: DistEnv) -> torch.dtype:
    """The dtype training computes in: ``cfg.dtype`` on a GPU, float32 on the CPU (the rollout engine's too:
    one rule, ``engine_dtype``)."""
    return DTYPES[engine_dtype(cfg, env.device)]


def decoder_layers(hf: PreTrainedModel) -> nn.ModuleList:
    """The decoder-layer list of a HF causal LM: ``layers`` of its decoder stack (``backbone``), e.g.
    ``model.layers`` of Qwen / Llama / Mistral, ``model.language_model.layers`` of Gemma-3 (multimodal)."""
    decoder = backbone(hf)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(hf).__name__}: its decoder {type(decoder).__name__} has no 'layers' ModuleList")
    return layers


def shard_policy(policy: Policy, env: DistEnv, compute_dtype: torch.dtype = torch.float32) -> Policy:
    """``fully_shard`` each decoder layer, then the root, over ``env.mesh`` (in place; returns ``policy``).

    Layers reshard after forward (ZeRO-3 memory); the root keeps embeddings / LM head gathered between
    forward and backward. Gradients are reduced in float32 and SUMMED over ranks (divide factor 1): the
    trainers normalise each rank's loss by the global token / sequence count instead. ``fully_shard``
    moves each shard to the mesh's device, so the full model never sits on one accelerator.
    """
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(policy.hf):
        fully_shard(layer, mesh=env.mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(policy, mesh=env.mesh, mp_policy=mp, reshard_after_forward=False)
    for module in policy.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return policy
