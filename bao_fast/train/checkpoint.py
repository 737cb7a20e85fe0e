"""Checkpoints for exact resume (torch.distributed.checkpoint) and HF exports.

Layout under a run's ``checkpoints/`` (RL) or ``sft-checkpoints/`` (SFT) directory::

    step-000010/            one complete checkpoint (directories appear only by an atomic rename)
      .metadata, __*.distcp model + optimiser shards written by DCP
      rank-0.pt ...         per-rank trainer state: scheduler, RNG states, step, data cursor, counters
    .tmp-step-000010/       a checkpoint being written; ignored (and replaced) by readers
    .del-step-000008/       a checkpoint being deleted (pruned or replaced); ignored by readers

Safety rules (a failed run never corrupts a checkpoint):

* Every rank writes into ``.tmp-step-N`` (DCP shards and ``.metadata`` fsynced by DCP, the rank files and
  the directory fsynced here); only when *every* rank reports success does rank 0 rename it to
  ``step-N``. A crash (exception or SIGKILL) at any point before that leaves at most a ``.tmp-`` directory
  that :func:`latest_checkpoint` never picks; the previous checkpoints stay as they were.
* A failed write (disk full, permissions, ...) raises :class:`CheckpointError` on every rank (none hangs in
  a barrier), naming the checkpoint, the failing rank and the cause; the partial ``.tmp-`` directory is
  removed to give the space back, and the previous checkpoint is untouched.
* ``keep_last`` pruning runs only after the new checkpoint is complete, so it never deletes the only good
  one; directories are renamed to ``.del-`` before they are deleted, so a crash mid-delete never leaves a
  half-deleted ``step-N``. Stale ``.tmp-``/``.del-`` directories of earlier steps are removed after a save.
* Reading: :func:`load_checkpoint` checks, before it changes any state, that the checkpoint is complete
  (``.metadata`` present), that its rank files are those of one world, and that the trainer state each
  rank reads loads; a damaged checkpoint raises :class:`CheckpointError` naming the file and the previous
  checkpoint. It does not silently fall back to an older one (that would quietly discard training and
  hide a storage fault): delete the damaged ``step-N`` directory to resume from the previous checkpoint.
* Another world size: with ``reshard=True`` (the trainers, whose trainer state is the same on every rank) a
  checkpoint saved by k ranks loads on n: DCP reshards model and optimiser, every rank takes rank 0's
  trainer state, and the RNG states stay as the caller seeded them (there are none for new ranks). Without
  it a different world size is refused, naming both.
"""

from __future__ import annotations

import contextlib
import os
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
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from transformers import PreTrainedTokenizerBase

from bao_fast.cli import RunError
from bao_fast.train.collectives import gather_objects
from bao_fast.train.fsdp import Policy

_STEP_DIR = re.compile(r"^step-(\d+)$")
_STALE_DIR = re.compile(r"^\.(?:tmp|del)-step-(\d+)$")
_RANK_FILE = re.compile(r"^rank-(\d+)\.pt$")


class CheckpointError(RunError):
    """A checkpoint or HF export could not be written, or a checkpoint cannot be read; the message names the
    path, the cause, and what is left on disk."""


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
    """Collectively delete ``paths`` (directories or files; missing ones are fine): rank 0 deletes, the others
    wait. A failure raises CheckpointError on every rank: a stale checkpoint left behind would outrank the new
    run's."""
    mine: str | None = None
    if dist.get_rank() == 0:
        try:
            for path in map(Path, paths):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        except OSError as exc:
            mine = _describe(exc)
    if (failure := _first_failure(mine)) is not None:  # every rank raises, none waits in a barrier
        raise CheckpointError(f"could not remove the earlier run's outputs: {failure}")


def resume_checkpoint(root: str | Path, resume: bool) -> Path | None:
    """The checkpoint a run continues from (collective): the latest complete one under ``root`` when
    ``resume``. Otherwise None, and ``root`` is deleted, so that the new run's checkpoints never mix with an
    older run's (``keep_last`` prunes by step number, and a later resume picks the highest step)."""
    if resume:
        return latest_checkpoint(root)
    remove_outputs([root])
    return None


# ----------------------------------------------------------------------------------------------------
# Helpers: error text, agreement between ranks, durable renames
# ----------------------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    """One line for ``exc``; a DCP ``CheckpointException`` (a BaseException whose text is every rank's
    traceback) becomes its ranks' underlying errors."""
    if isinstance(exc, CheckpointException):
        failures = getattr(exc, "failures", None) or {}
        if failures:
            return "; ".join(f"rank {r}: {_describe(e[0] if isinstance(e, tuple) else e)}"  # (exc, traceback)
                             for r, e in sorted(failures.items()))
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _first_failure(mine: str | None) -> str | None:
    """Every rank's ``mine`` (None = success) gathered (a collective, so it also orders the ranks like a
    barrier); the distinct failures joined, each naming its rank, or None when every rank succeeded."""
    failures: list[str] = []
    for r, failure in enumerate(gather_objects(mine)):
        if failure is not None:
            text = failure if failure.startswith("rank ") else f"rank {r}: {failure}"  # DCP's name their ranks
            if text not in failures:
                failures.append(text)
    return "; ".join(failures) or None


def _fsync(path: Path) -> None:
    """fsync a file or directory (best effort for directories: some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            _fsync(path)
    _fsync(root)


def _discard(path: Path) -> None:
    """Delete directory ``path``: renamed to a ``.del-`` sibling first (one atomic step), so that a crash
    mid-delete never leaves a half-deleted directory under its real name."""
    trash = path.with_name(f".del-{path.name.lstrip('.')}")
    shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def _publish(src: Path, dst: Path) -> None:
    """Rename the complete directory ``src`` to ``dst``, replacing (after moving it aside) an existing one."""
    _fsync(src)
    if dst.exists():
        aside = dst.with_name(f".del-{dst.name}")
        shutil.rmtree(aside, ignore_errors=True)
        dst.rename(aside)
        try:
            src.rename(dst)
        except OSError:
            aside.rename(dst)  # put the old one back: ``dst`` never goes missing on a failure
            raise
        _fsync(dst.parent)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        src.rename(dst)
        _fsync(dst.parent)


def _save_rank_file(state: dict[str, Any], path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------
# Save / load / export
# ----------------------------------------------------------------------------------------------------


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
    added here. Older checkpoints beyond ``keep_last`` are deleted (0 keeps all), only once the new one is
    complete. A failed write raises :class:`CheckpointError` on every rank and leaves the earlier
    checkpoints as they were (module docstring).
    """
    root = Path(root)
    rank = dist.get_rank()
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    previous = latest_checkpoint(root)

    def failed(where: str, failure: str) -> CheckpointError:
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        return CheckpointError(f"could not save checkpoint {final} ({where}): {failure}; {kept}")

    mine: str | None = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as exc:
            mine = _describe(exc)
    if (failure := _first_failure(mine)) is not None:
        raise failed("creating its directory", failure)

    mine, state = None, {}
    try:  # before DCP's own collectives: a rank failing here must not leave the others inside dcp.save
        state = {
            "model": get_model_state_dict(policy),
            "optim": get_optimizer_state_dict(policy, optimizer),
        }
    except Exception as exc:
        mine = _describe(exc)
    if (failure := _first_failure(mine)) is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise failed("gathering its state", failure)

    try:
        dcp.save(state, checkpoint_id=str(tmp))
        _save_rank_file({**trainer_state, "rng": rng_state()}, tmp / f"rank-{rank}.pt")
    except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        mine = _describe(exc)
    if (failure := _first_failure(mine)) is not None:  # every rank has stopped writing
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back (e.g. after a full disk)
        raise failed("writing", failure)

    mine = None
    if rank == 0:
        try:
            _publish(tmp, final)
        except OSError as exc:
            mine = _describe(exc)
    if (failure := _first_failure(mine)) is not None:
        raise failed("renaming it into place", failure)

    if rank == 0:  # housekeeping: failures here leave only ignorable directories behind
        if keep_last > 0:
            for _, old in _step_dirs(root)[:-keep_last]:
                with contextlib.suppress(OSError):
                    _discard(old)
        for path in root.iterdir():
            if (m := _STALE_DIR.match(path.name)) and int(m.group(1)) <= step:
                shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
    return final


def _damaged(path: Path, problem: str, what: str = "is damaged") -> CheckpointError:
    older = [p for s, p in _step_dirs(path.parent) if s < checkpoint_step(path)]
    fallback = (f"delete {path} to resume from the previous checkpoint {older[-1]}" if older
                else "no earlier checkpoint exists")
    return CheckpointError(f"checkpoint {path} {what}: {problem}; {fallback}, or start over with "
                           "checkpoint.resume=false")


def checkpoint_step(path: Path) -> int:
    """The step of checkpoint directory ``path`` (``step-N``), or -1 for another name."""
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else -1


def saved_ranks(path: str | Path) -> list[int]:
    """The ranks whose trainer-state files (``rank-<r>.pt``) checkpoint ``path`` holds, ascending."""
    return sorted(int(m.group(1)) for p in Path(path).iterdir() if (m := _RANK_FILE.match(p.name)))


def resume_message(stage: str, step: int, path: str | Path) -> str:
    """The trainers' line on resuming ``stage`` (RL, SFT) after ``step`` from checkpoint ``path``, saying so when
    it was saved by another number of ranks than this run has."""
    saved, world = len(saved_ranks(path)), dist.get_world_size()
    reshard = f" (saved by {_ranks(saved)}, resharded onto {world})" if saved != world else ""
    return f"resuming {stage} after step {step} from {path}{reshard}"


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def load_checkpoint(
    path: str | Path, policy: nn.Module, optimizer: torch.optim.Optimizer, *, reshard: bool = False
) -> dict[str, Any]:
    """Collectively restore model, optimiser and this rank's RNG states from ``path``; returns this rank's
    trainer state (as passed to :func:`save_checkpoint`, without ``rng``).

    ``reshard``: the caller's trainer state is the same on every rank, so a checkpoint saved by another
    number of ranks loads too: model and optimiser resharded by DCP, rank 0's trainer state on every rank,
    RNG states not restored (module docstring). Without it, another world size is refused.

    Checked before any state changes: the checkpoint is complete, its rank files are ``rank-0 ..
    rank-<k-1>`` (k = this run's world size unless ``reshard``), and the trainer state each rank reads
    loads; damage raises :class:`CheckpointError` naming the file (on every rank)."""
    path = Path(path)
    rank, world = dist.get_rank(), dist.get_world_size()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    ranks = saved_ranks(path)
    if not ranks:
        raise _damaged(path, "it holds no trainer-state file (rank-<r>.pt)")
    if ranks != list(range(len(ranks))):
        raise _damaged(path, f"its rank files are {[f'rank-{r}.pt' for r in ranks]}")
    if len(ranks) != world and not reshard:
        raise CheckpointError(
            f"checkpoint {path} was saved by {_ranks(len(ranks))}, this run has {world}: resume with the "
            "world size it was saved with, or start over with checkpoint.resume=false"
        )
    if not (path / ".metadata").is_file():
        raise _damaged(path, f"{path / '.metadata'} is missing")
    same_world = len(ranks) == world

    rank_file = path / f"rank-{rank if same_world else 0}.pt"
    mine: str | None = None
    try:
        trainer_state = torch.load(rank_file, weights_only=False)
        if not isinstance(trainer_state, dict) or "rng" not in trainer_state:
            raise ValueError("not a trainer state (no RNG states)")
    except Exception as exc:
        mine = f"cannot read {rank_file}: {_describe(exc)}"
    if (failure := _first_failure(mine)) is not None:
        raise _damaged(path, failure)

    state = {
        "model": get_model_state_dict(policy),
        "optim": get_optimizer_state_dict(policy, optimizer),
    }
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as exc:  # DCP raises on every rank
        raise _damaged(path, f"cannot restore the model/optimiser shards: {_describe(exc)}",
                       "is damaged or was not saved for this run's model and optimiser") from None
    set_model_state_dict(policy, state["model"])
    set_optimizer_state_dict(policy, optimizer, state["optim"])
    rng = trainer_state.pop("rng")
    if same_world:
        set_rng_state(rng)
    return trainer_state


def export_hf(policy: Policy, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Collectively gather the full weights and, on rank 0, write a HF checkpoint (safetensors + config +
    tokenizer) that transformers and vLLM load. Written (and fsynced) to a temporary sibling, then renamed
    over ``out_dir``: a failure raises :class:`CheckpointError` on every rank and leaves an earlier export
    at ``out_dir`` as it was."""
    out = Path(out_dir)
    full = get_model_state_dict(policy.hf, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    mine: str | None = None
    if dist.get_rank() == 0:
        tmp = out.with_name(f".tmp-{out.name}")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            policy.hf.save_pretrained(tmp, state_dict=full, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            _fsync_tree(tmp)
            _publish(tmp, out)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            mine = _describe(exc)
    if (failure := _first_failure(mine)) is not None:
        kept = "an earlier export there is intact" if (out / "config.json").is_file() else "nothing was written there"
        raise CheckpointError(f"could not write the HF export {out}: {failure}; {kept}")
    return out
