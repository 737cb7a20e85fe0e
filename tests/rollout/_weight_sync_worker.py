"""Worker for ``test_weight_sync_torchrun.py`` (run under ``torchrun --nproc_per_node 2``; not collected).

Each rank: FSDP2-shards the tiny model on gloo, builds its own vLLM engine (``external_launcher``),
generates greedily, perturbs the sharded weights, syncs them into the engine and generates again.
Rank 0 compares both generations with transformers' greedy output of the unsharded model before and
after the perturbation and writes ``{"ranks": [...]}`` of per-rank results to ``argv[2]``.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from bao_fast.config import RolloutConfig
from bao_fast.rollout.engine import GenerationParams
from bao_fast.rollout.vllm_engine import VLLMEngine

PROMPTS = [[5, 17, 300, 41, 1022], [9, 8, 7, 6, 5, 4, 3], [1500, 3]]
PARAMS = GenerationParams(max_tokens=12, temperature=0.0)


def hf_greedy(model: torch.nn.Module) -> list[list[int]]:
    """transformers greedy continuations of PROMPTS (one prompt at a time: no padding effects)."""
    outs = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        gen = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=PARAMS.max_tokens, do_sample=False
        )
        outs.append(gen[0, len(prompt) :].tolist())
    return outs


def main(model_dir: str, out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for layer in policy.model.layers:
        fully_shard(layer)
    fully_shard(policy)

    engine = VLLMEngine.from_config(model_dir, RolloutConfig(max_model_len=256, weight_sync_bucket_mb=1), seed=0)
    before = [g.token_ids for g in engine.generate(PROMPTS, PARAMS)]

    generator = torch.Generator().manual_seed(1234)  # same perturbation on every rank and the reference
    with torch.no_grad():
        for (_, sharded), (_, full) in zip(policy.named_parameters(), reference.named_parameters()):
            noise = 0.05 * torch.randn(full.shape, generator=generator)
            full.add_(noise)
            sharded.add_(torch.distributed.tensor.distribute_tensor(noise, sharded.device_mesh, sharded.placements))
    engine.sync_weights_from(policy)
    after = [g.token_ids for g in engine.generate(PROMPTS, PARAMS)]

    result = {
        "rank": rank,
        "world": world,
        "sharded": all(isinstance(p, torch.distributed.tensor.DTensor) for p in policy.parameters()),
        "before": before,
        "after": after,
        "hf_after": hf_greedy(reference),
    }
    gathered: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(gathered, result)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"ranks": gathered}, f)
    dist.barrier()
    engine.shutdown()  # also destroys the default process group


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
