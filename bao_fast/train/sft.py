"""``bao-fast sft``: behaviour-enhanced SFT (BAO.md stage 1) on teacher trajectories.

The teacher (scripted, or an LLM: ``sft.teacher``) plays training tasks and writes retrospective reasoning
and prospective planning into ``<think>`` blocks; only the episodes it solved are kept, in
``<run_dir>/sft-data.jsonl`` (:mod:`bao_fast.train.sft_data`).
Each episode is turned into the same token stream a rollout produces (opening prompt
from the chat template, every assistant message + eos as a trained segment, every feedback wrapped by the
template's turn markers; ``bao_fast.rollout.ChatFormat``), packed without padding, and the policy is fully
fine-tuned with the mean negative log-likelihood of the assistant tokens. A held-out fraction gives the
eval loss after every epoch. The result is exported as a HF checkpoint at ``<run_dir>/sft-model``.

SFT resumes exactly, like RL: every ``checkpoint.save_every`` optimiser steps an atomic DCP checkpoint
(model, optimiser, RNG and :class:`SFTState`: step, epoch, position in the epoch's order, scheduler,
non-finite guard, eval losses) goes to ``<run_dir>/sft-checkpoints``, keeping ``checkpoint.keep_last``. A
rerun continues from the latest one on the same data (the data file; checkpoints record its digest) with
the same next batch (the data order derives from seeds), so it logs the losses an uninterrupted run would
have; on another world size it reshards (the same losses up to float summation order). The export ends
SFT: the last step writes no checkpoint, the checkpoints are deleted once the export exists, and a rerun
reuses the export. SIGTERM / SIGUSR1 end SFT after the current step with a checkpoint of it
(:mod:`bao_fast.train.preemption`). ``checkpoint.resume=false`` starts SFT over (the teacher plays
again; an earlier export and checkpoints are deleted). An SFT that trains deletes the RL outputs of the run
(``RL_OUTPUTS``): they were trained from an earlier export.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from bao_fast.cli import UsageError
from bao_fast.config import Config, config_to_dict, load_config
from bao_fast.data.packed import PackedBatch
from bao_fast.data.segments import pack_segments
from bao_fast.models import load_tokenizer
from bao_fast.train.checkpoint import (
    export_hf,
    load_checkpoint,
    remove_outputs,
    resume_checkpoint,
    resume_message,
    save_checkpoint,
)
from bao_fast.train.collectives import lockstep, sum_over_ranks
from bao_fast.train.fsdp import DistEnv, Policy, compute_dtype, load_policy, shutdown_distributed
from bao_fast.train.logging import MetricsLogger, NonFiniteGuard
from bao_fast.train.loss_scale import LossScale, loss_scale_for
from bao_fast.train.optim import advance_schedule, build_optimizer, build_scheduler, clip_grad_norm
from bao_fast.train.preemption import stop_requested, stop_signals
from bao_fast.train.runtime import (
    RL_OUTPUTS,
    SFT_CHECKPOINT_DIR,
    SFT_MODEL_DIR,
    derive_seed,
    initial_model,
    seed_everything,
    start_run,
)
from bao_fast.train.sft_data import SFT_DATA_FILE, Segments, data_digest, sft_episodes, to_segments


def _nll_sums(policy: Policy, batch: PackedBatch, weight: float) -> tuple[torch.Tensor, float]:
    """(sum of -log p over trained targets × weight, number of trained targets × weight)."""
    logp = policy(batch)
    return -(logp.sum() * weight), float(batch.target_rows.numel()) * weight


def _shard(items: list[Segments], env: DistEnv) -> list[Segments]:
    """Round-robin share of ``items`` for this rank; a rank left empty repeats item 0 (weighted 0)."""
    return items[env.rank :: env.world_size]


def eval_loss(policy: Policy, data: list[Segments], env: DistEnv, micro_batch_tokens: int) -> float:
    """Mean NLL per trained token of ``data`` over all ranks (nan when ``data`` is empty)."""
    if not data:
        return float("nan")
    local = _shard(data, env)
    weight = 1.0 if local else 0.0
    batch = pack_segments(local or data[:1], env.device)
    total = torch.zeros((), dtype=torch.float64, device=env.device)  # read once: no host sync per micro-batch
    count = 0.0
    with torch.no_grad():
        for micro, w in lockstep(batch.split(micro_batch_tokens)):
            nll, n = _nll_sums(policy, micro, w * weight)
            total += nll
            count += n
    total, count = sum_over_ranks([float(total), count])
    return total / max(count, 1.0)


@dataclass
class SFTState:
    """Everything besides model/optimiser that exact resume needs; the same on every rank (saved per rank
    with its RNG states), so a checkpoint also resumes on another world size."""

    step: int
    epoch: int
    position: int  # index, in the epoch's order, of the next batch's first trajectory
    guard: NonFiniteGuard
    evals: list[dict[str, float]] = field(default_factory=list)


@dataclass
class SFTSetup:
    """The objects one SFT run holds."""

    cfg: Config
    env: DistEnv
    policy: Policy
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_scale: LossScale
    train: list[Segments]
    held_out: list[Segments]
    total_steps: int
    data_digest: str


def setup(cfg: Config, env: DistEnv, init_path: Path, tokenizer: PreTrainedTokenizerBase) -> SFTSetup:
    """Teacher episodes split into train / held-out, the sharded policy, optimiser and schedule."""
    s = cfg.sft
    episodes = sft_episodes(cfg)
    data = to_segments(episodes, tokenizer)
    num_eval = int(len(data) * s.eval_fraction)
    order = np.random.default_rng(derive_seed(cfg.seed, 3)).permutation(len(data)).tolist()
    held_out, train = [data[i] for i in order[:num_eval]], [data[i] for i in order[num_eval:]]
    total_steps = s.epochs * math.ceil(len(train) / s.batch_trajectories)
    policy = load_policy(init_path, cfg.model, env)
    optimizer = build_optimizer(policy, s.optim)
    scheduler = build_scheduler(optimizer, s.optim, total_steps)
    loss_scale = loss_scale_for(s.optim, compute_dtype(cfg.model, env))
    return SFTSetup(cfg, env, policy, optimizer, scheduler, loss_scale, train, held_out, total_steps,
                    data_digest(episodes))


def next_batch(s: SFTSetup, state: SFTState) -> list[Segments]:
    """The next ``sft.batch_trajectories`` trajectories of the epoch's seeded order (the epoch's last batch
    may be smaller); advances ``state.position``."""
    order = np.random.default_rng(derive_seed(s.cfg.seed, 4, state.epoch)).permutation(len(s.train)).tolist()
    chunk = [s.train[i] for i in order[state.position : state.position + s.cfg.sft.batch_trajectories]]
    state.position += len(chunk)
    return chunk


def sft_step(s: SFTSetup, state: SFTState, chunk: list[Segments]) -> dict[str, Any]:
    """One optimiser step on ``chunk`` (each rank its share, micro-batched by token budget, normalised by
    the global count of trained tokens; skipped on a loss-scale overflow, which halves the scale, or when the
    non-finite guard says so); returns the step's metrics (identical on all ranks)."""
    cfg, env = s.cfg.sft, s.env
    t0 = time.perf_counter()
    local = _shard(chunk, env)
    batch = pack_segments(local or chunk[:1], env.device)
    weight = 1.0 if local else 0.0
    num_targets = sum_over_ranks([float(batch.target_rows.numel()) * weight])[0]
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)  # read once: no host sync per micro-batch
    for micro, w in lockstep(batch.split(cfg.micro_batch_tokens)):
        nll, _ = _nll_sums(s.policy, micro, w * weight)
        s.loss_scale.scaled(nll / max(num_targets, 1.0)).backward()
        loss_sum += nll.detach()
    loss = sum_over_ranks([float(loss_sum)])[0] / max(num_targets, 1.0)
    s.loss_scale.unscale_(s.policy)
    grad_norm = float(clip_grad_norm(s.policy, cfg.optim.grad_clip))
    lr = s.scheduler.get_last_lr()[0]
    overflow = s.loss_scale.absorb_overflow(loss, grad_norm)
    applied = not overflow and state.guard.check(state.step, loss=loss, grad_norm=grad_norm)
    if applied:
        s.optimizer.step()
        s.loss_scale.grow()
    advance_schedule(s.scheduler)
    s.optimizer.zero_grad(set_to_none=True)
    metrics = {
        "epoch": state.epoch, "loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": int(num_targets),
        "skipped": not applied, "tokens_per_s": num_targets / (time.perf_counter() - t0),
    }
    if s.loss_scale.enabled:
        metrics.update(overflow=overflow, loss_scale=s.loss_scale.scale)
    return metrics


def _trainer_state(s: SFTSetup, state: SFTState) -> dict[str, Any]:
    return {
        "step": state.step,
        "epoch": state.epoch,
        "position": state.position,
        "num_train": len(s.train),
        "data_digest": s.data_digest,
        "guard": state.guard.state_dict(),
        "scheduler": s.scheduler.state_dict(),
        "loss_scale": s.loss_scale.state_dict(),
        "evals": state.evals,
    }


def _restore(s: SFTSetup, state: SFTState, checkpoint: Path) -> None:
    saved = load_checkpoint(checkpoint, s.policy, s.optimizer, reshard=True)
    if saved.get("data_digest") != s.data_digest:
        if saved["num_train"] != len(s.train):
            how = f"{saved['num_train']} training trajectories, this run has {len(s.train)}"
        else:
            how = f"data digest {saved.get('data_digest')}, this run's is {s.data_digest}"
        raise ValueError(
            f"SFT checkpoint {checkpoint} was trained on other SFT data than this run's {SFT_DATA_FILE} "
            f"(the checkpoint has {how}): resume with the same sft and env config, or set checkpoint.resume=false"
        )
    state.step, state.epoch, state.position = saved["step"], saved["epoch"], saved["position"]
    state.guard.load_state_dict(saved["guard"])
    s.scheduler.load_state_dict(saved["scheduler"])
    if "loss_scale" in saved:  # checkpoints written before loss scaling existed start from the initial scale
        s.loss_scale.load_state_dict(saved["loss_scale"])
    state.evals = saved["evals"]


def _status(metrics: dict[str, Any], state: SFTState) -> str:
    last_eval = f" eval {state.evals[-1]['eval_loss']:.3f}" if state.evals else ""
    return f"loss {metrics['loss']:.3f}{last_eval}"


def train_sft(
    cfg: Config, env: DistEnv, init_path: Path, tokenizer: PreTrainedTokenizerBase, *, stop_after: int | None = None
) -> Path | None:
    """Run SFT from ``init_path`` (resuming from the latest SFT checkpoint when ``checkpoint.resume``); returns
    the exported HF checkpoint, reused if it already exists and ``checkpoint.resume``.

    ``stop_after`` ends the run after that step, before the export (as if killed right after it; used by
    resume tests), and returns None.
    """
    run_dir = Path(cfg.run_dir)
    out = run_dir / SFT_MODEL_DIR
    if cfg.checkpoint.resume and (out / "config.json").is_file():
        return out
    # an earlier run's export must not pass for this run's, nor RL trained from it resume on this one
    remove_outputs([out, *(run_dir / name for name in RL_OUTPUTS)])
    seed_everything(derive_seed(cfg.seed, 2, env.rank))
    s = setup(cfg, env, init_path, tokenizer)
    state = SFTState(0, 0, 0, NonFiniteGuard(cfg.train.max_nonfinite_steps))
    root = run_dir / SFT_CHECKPOINT_DIR
    checkpoint = resume_checkpoint(root, cfg.checkpoint.resume)
    if checkpoint is not None:
        _restore(s, state, checkpoint)
        if env.is_main:
            print(resume_message("SFT", state.step, checkpoint), file=sys.stderr, flush=True)
    logger = MetricsLogger(run_dir, cfg.logging, name="sft", total=s.total_steps, enabled=env.is_main,
                           run_config=config_to_dict(cfg),
                           resume_step=state.step if checkpoint is not None else -1)  # fresh: drop old records
    logger.advance_to(state.step)
    try:
        with stop_signals() as signals:
            while state.epoch < cfg.sft.epochs:
                state.step += 1
                metrics = sft_step(s, state, next_batch(s, state))
                logger.log(state.step, metrics, status=_status(metrics, state))
                if state.position == len(s.train):
                    if s.held_out:  # sft.eval_fraction of a small set can hold out nothing
                        loss = eval_loss(s.policy, s.held_out, env, cfg.sft.micro_batch_tokens)
                        state.evals.append({"epoch": state.epoch, "eval_loss": loss})
                        logger.log(state.step, state.evals[-1], status=_status(metrics, state))
                    state.epoch, state.position = state.epoch + 1, 0
                save_every = cfg.checkpoint.save_every
                unfinished = state.epoch < cfg.sft.epochs  # the last step goes on to the export
                signum = signals.agreed() if unfinished else None
                if unfinished and ((save_every and state.step % save_every == 0) or signum is not None):
                    saved = save_checkpoint(root, state.step, s.policy, s.optimizer, _trainer_state(s, state),
                                            keep_last=cfg.checkpoint.keep_last)
                if signum is not None:
                    raise stop_requested("SFT", state.step, signum, f"checkpoint {saved} saved")
                if stop_after is not None and state.step >= stop_after:
                    return None
            export_hf(s.policy, tokenizer, out)
            remove_outputs([root])  # only an unfinished SFT resumes from them
            if (signum := signals.agreed()) is not None:  # it came in the last step or the export: RL must not start
                raise stop_requested("SFT", state.step, signum, f"the SFT model {out} exported")
    finally:
        logger.close()
    return out


def run_sft(cfg: Config, *, stop_after: int | None = None) -> Path | None:
    """The ``bao-fast sft`` pipeline of one config: the initial model, then :func:`train_sft`."""
    env = start_run(cfg, "sft")
    init_path = initial_model(cfg, env)
    return train_sft(cfg, env, init_path, load_tokenizer(init_path), stop_after=stop_after)


COMMAND_HELP = """\
bao-fast sft: behaviour-enhanced SFT alone (BAO's first stage; bao-fast train runs it, then RL). The
teacher (sft.teacher: the gym's scripted one, or an LLM behind an OpenAI-compatible server) plays training
tasks, writing retrospective and prospective reasoning; the policy is fine-tuned on the episodes it solved,
with the loss on the assistant's tokens only.

    bao-fast sft --config configs/demo-cpu.yaml run_dir=runs/sft-try
    torchrun --nproc_per_node 8 -m bao_fast.cli sft --config configs/telepathy-qwen3-4b-bao.yaml \\
        model.path=/models/Qwen3-4B sft.teacher=llm sft.teacher_base_url=http://127.0.0.1:8002 \\
        sft.teacher_model=Qwen/Qwen3-235B-A22B

Writes to run_dir: sft-data.jsonl (the teacher's solved episodes, reused by a rerun), sft.jsonl (metrics per
step), sft-checkpoints/ (DCP, until the export exists) and sft-model/ (the HF checkpoint). Rerunning resumes,
on the same or another number of ranks; SIGTERM or SIGUSR1 stop after the current step with a checkpoint
(exit status 128 + the signal). Exit status 2: a bad flag, config key or path; 1: a checkpoint that cannot
be written or read.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = COMMAND_HELP
    parser.add_argument("--config", required=True, help="YAML run config (e.g. configs/demo-cpu.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.epochs=3 run_dir=runs/x")


def run(args: argparse.Namespace) -> int:
    """SFT only: writes ``<run_dir>/sft-model`` (use ``bao-fast train`` to continue with RL)."""
    cfg = load_config(args.config, args.overrides)
    if not cfg.sft.enabled:
        raise UsageError("sft.enabled is false: nothing to train (bao-fast train runs RL without SFT)")
    try:
        path = run_sft(cfg)
        if dist.get_rank() == 0:
            print(f"SFT model: {path}")
    finally:
        shutdown_distributed()
    return 0
