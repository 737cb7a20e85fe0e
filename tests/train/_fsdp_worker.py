"""torchrun worker for tests/train/test_fsdp_checkpoint.py (not collected by pytest).

argv: <init model dir> <out dir> [<saved world size>].

Without the third argument, on every world size it: shards the tiny policy, backpropagates the
global-token-mean NLL of a fixed batch split over the ranks, and (rank 0) saves the full gradients; then
takes an optimiser step, checkpoints, takes another step, restores, and checks that parameters, optimiser
state and RNG are back; ignores a half-written ``.tmp-step-*`` directory; exports a HF checkpoint.
Results go to <out dir>/result-<world size>.json and grads-<world size>.pt (gradients, parameters and Adam
moments at the checkpoint, parameters after the step that followed it).

With it, a fresh policy and optimiser on this world size load the checkpoint that run wrote on <saved world
size> ranks (``reshard=True``) and take the same next step; <out dir>/reshard-<saved>-to-<world>.pt holds
what they hold before and after it, for the test to compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bao_fast.config import ModelConfig, OptimConfig
from bao_fast.data.packed import PackedBatch
from bao_fast.data.segments import pack_segments
from bao_fast.models import load_tokenizer
from bao_fast.rollout.tp_group import contiguous_share
from bao_fast.train.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from bao_fast.train.collectives import sum_over_ranks
from bao_fast.train.fsdp import DistEnv, init_distributed, load_policy
from bao_fast.train.optim import build_optimizer, clip_grad_norm


def full_params(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().full_tensor().clone() for n, p in policy.named_parameters()}


def full_moments(policy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's sharded optimiser state (Adam's moments), gathered."""
    return {n: {k: v.full_tensor().clone() for k, v in optimizer.state[p].items() if hasattr(v, "full_tensor")}
            for n, p in policy.named_parameters()}


def rank_batch(env: DistEnv) -> tuple[PackedBatch, float]:
    """This rank's contiguous share of a fixed batch of 4 two-turn trajectories, and the global target count."""
    g = torch.Generator().manual_seed(0)
    trajectories = [
        [("user", torch.randint(3, 2000, (n,), generator=g).tolist()),
         ("assistant", torch.randint(3, 2000, (m,), generator=g).tolist()),
         ("user", torch.randint(3, 2000, (3,), generator=g).tolist()),
         ("assistant", torch.randint(3, 2000, (m + 1,), generator=g).tolist())]
        for n, m in [(7, 5), (9, 4), (4, 6), (11, 3)]
    ]
    batch = pack_segments(contiguous_share(trajectories, env.rank, env.world_size))
    return batch, sum_over_ranks([float(batch.target_rows.numel())])[0]


def reshard(init_dir: Path, out: Path, saved_world: int) -> None:
    env = init_distributed()
    policy = load_policy(init_dir, ModelConfig(path=str(init_dir)), env)
    optimizer = build_optimizer(policy, OptimConfig(lr=1e-2))
    torch.manual_seed(321)
    expected_rand = torch.rand(4)
    torch.manual_seed(321)
    state = load_checkpoint(out / f"ckpt-{saved_world}" / "step-000001", policy, optimizer, reshard=True)
    rng_kept = torch.equal(torch.rand(4), expected_rand)  # another world: the caller's seeding stands
    loaded, moments = full_params(policy), full_moments(policy, optimizer)
    batch, total = rank_batch(env)
    (-(policy(batch).sum()) / total).backward()
    optimizer.step()
    stepped = full_params(policy)  # a collective: every rank
    if env.is_main:
        torch.save({"state": state, "rng_kept": rng_kept, "params": loaded, "moments": moments, "stepped": stepped},
                   out / f"reshard-{saved_world}-to-{env.world_size}.pt")
    dist.destroy_process_group()


def main() -> None:
    init_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    if len(sys.argv) > 3:
        reshard(init_dir, out, int(sys.argv[3]))
        return
    env = init_distributed()
    policy = load_policy(init_dir, ModelConfig(path=str(init_dir)), env)
    batch, total = rank_batch(env)
    (-(policy(batch).sum()) / total).backward()
    grads = {n: p.grad.full_tensor().clone() for n, p in policy.named_parameters()}
    norm = float(clip_grad_norm(policy, 0.0))
    optimizer = build_optimizer(policy, OptimConfig(lr=1e-2))
    optimizer.step()
    root = out / f"ckpt-{env.world_size}"
    if env.is_main:
        (root / ".tmp-step-000009").mkdir(parents=True)  # a crashed write: must be ignored
    dist.barrier()
    torch.manual_seed(123)
    saved_at = save_checkpoint(root, 1, policy, optimizer, {"step": 1, "cursor": [env.rank, 5]})
    expected_rand = torch.rand(4)
    snapshot = full_params(policy)
    moments = full_moments(policy, optimizer)
    moment = moments[next(iter(moments))]
    optimizer.zero_grad()
    (-(policy(batch).sum()) / total).backward()
    optimizer.step()
    stepped = full_params(policy)
    changed = max((stepped[n] - snapshot[n]).abs().max().item() for n in snapshot)
    latest = latest_checkpoint(root)
    state = load_checkpoint(latest, policy, optimizer)
    restored = max((full_params(policy)[n] - snapshot[n]).abs().max().item() for n in snapshot)
    moment_back = {k: v.full_tensor() for k, v in optimizer.state[next(iter(policy.parameters()))].items()
                   if hasattr(v, "full_tensor")}
    moment_err = max((moment_back[k] - moment[k]).abs().max().item() for k in moment)
    rng_ok = torch.equal(torch.rand(4), expected_rand)
    export = export_hf(policy, load_tokenizer(init_dir), out / f"export-{env.world_size}")
    if env.is_main:
        torch.save({"grads": grads, "params": snapshot, "moments": moments, "stepped": stepped},
                   out / f"grads-{env.world_size}.pt")
        result = {
            "grad_norm": norm, "changed": changed, "restored_err": restored, "moment_err": moment_err,
            "rng_ok": rng_ok, "state": state, "latest": str(latest), "saved_at": str(saved_at),
            "dirs": sorted(p.name for p in root.iterdir()), "export": str(export),
        }
        (out / f"result-{env.world_size}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
