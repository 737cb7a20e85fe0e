"""Checkpoints for exact resume (torch.distributed.checkpoint) and HF exports.

Layout under a run's ``checkpoints/`` (RL) or ``sft-checkpoints/`` (SFT) directory::

    step-000010/            one complete checkpoint (directories appear only by an atomic rename)
      .metadata, __*.distcp model + optimiser shards written by DCP
      rank-0.pt ...         per-rank trainer state: scheduler, RNG states, step, data cursor, counters
    .tmp-step-000010/       a checkpoint being written; ignored (and replaced) by readers

A checkpoint is written to ``.tmp-step-N`` by every rank, then rank 0 renames it to ``step-N`` after a
barrier, so a crash mid-write never leaves a directory that :func:`latest_checkpoint` would pick.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from transformers import PreTrainedTokenizerBase

from bao_fast.train.fsdp import Policy

_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch CPU and (when present) the current CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root``, or None."""
    dirs = _step_dirs(Path(root))
    return dirs[-1][1] if dirs else None


def remove_outputs(paths: Iterable[str | Path]) -> None:
    """Collectively delete ``paths`` (directories or files; missing ones are fine): rank 0 deletes, then every
    rank passes a barrier. Failures raise: a stale checkpoint left behind would outrank the new run's."""
    if dist.get_rank() == 0:
        for path in map(Path, paths):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    dist.barrier()


def resume_checkpoint(root: str | Path, resume: bool) -> Path | None:
    """The checkpoint a run continues from (collective): the latest complete one under ``root`` when
    ``resume``. Otherwise None, and ``root`` is deleted, so that the new run's checkpoints never mix with an
    older run's (``keep_last`` prunes by step number, and a later resume picks the highest step)."""
    if resume:
        return latest_checkpoint(root)
    remove_outputs([root])
    return None


def save_checkpoint(
    root: str | Path,
    step: int,
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Collectively write ``root/step-<step>`` (all ranks must call); returns its path.

    ``trainer_state`` is this rank's picklable state (scheduler, step, data cursor, ...); RNG states are
    added here. Older checkpoints beyond ``keep_last`` are deleted (0 keeps all).
    """
    root = Path(root)
    rank = dist.get_rank()
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = {
        "model": get_model_state_dict(policy),
        "optim": get_optimizer_state_dict(policy, optimizer),
    }
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save({**trainer_state, "rng": rng_state()}, tmp / f"rank-{rank}.pt")
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if keep_last > 0:
            for _, old in _step_dirs(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str | Path, policy: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collectively restore model, optimiser and this rank's RNG states from ``path``; returns this rank's
    trainer state (as passed to :func:`save_checkpoint`, without ``rng``)."""
    path = Path(path)
    rank_file = path / f"rank-{dist.get_rank()}.pt"
    if not rank_file.exists():
        raise ValueError(
            f"checkpoint {path} has no state for rank {dist.get_rank()}: resume with the world size it was saved with"
        )
    state = {
        "model": get_model_state_dict(policy),
        "optim": get_optimizer_state_dict(policy, optimizer),
    }
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(policy, state["model"])
    set_optimizer_state_dict(policy, optimizer, state["optim"])
    trainer_state = torch.load(rank_file, weights_only=False)
    set_rng_state(trainer_state.pop("rng"))
    return trainer_state


def export_hf(policy: Policy, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Collectively gather the full weights and, on rank 0, write a HF checkpoint (safetensors + config +
    tokenizer) that transformers and vLLM load. Written to a temporary sibling, then renamed."""
    out = Path(out_dir)
    full = get_model_state_dict(policy.hf, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        tmp = out.with_name(f".tmp-{out.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        policy.hf.save_pretrained(tmp, state_dict=full, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    dist.barrier()
    return out
