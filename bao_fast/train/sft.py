"""``bao-fast sft``: behaviour-enhanced SFT (BAO.md stage 1) on scripted-teacher trajectories.

The gym's teacher plays training tasks and writes retrospective reasoning and prospective planning into
``<think>`` blocks (``sft.teacher_style``: full or concise narration); only the episodes it solved are kept.
Each episode is turned into the same token stream a rollout produces (opening prompt
from the chat template, every assistant message + eos as a trained segment, every feedback wrapped by the
template's turn markers; ``bao_fast.rollout.ChatFormat``), packed without padding, and the policy is fully
fine-tuned with the mean negative log-likelihood of the assistant tokens. A held-out fraction gives the
eval loss after every epoch. The result is exported as a HF checkpoint at ``<run_dir>/sft-model``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from bao_fast.config import Config, ConfigError, config_to_dict, load_config, save_config
from bao_fast.data.packed import PackedBatch
from bao_fast.data.segments import pack_segments
from bao_fast.envs import TEACHERS, make_tasks, make_teacher
from bao_fast.models import load_tokenizer
from bao_fast.rollout import ChatFormat
from bao_fast.train.checkpoint import export_hf
from bao_fast.train.fsdp import DistEnv, Policy, init_distributed, load_policy, shutdown_distributed
from bao_fast.train.logging import MetricsLogger, NonFiniteGuard
from bao_fast.train.optim import build_optimizer, build_scheduler, clip_grad_norm
from bao_fast.train.runtime import derive_seed, initial_model, lockstep, seed_everything, sum_over_ranks

Segments = list[tuple[str, list[int]]]
SFT_MODEL_DIR = "sft-model"
MAX_ATTEMPTS_PER_TRAJECTORY = 4


def messages_to_segments(fmt: ChatFormat, messages: list[dict[str, str]]) -> Segments:
    """A solved chat episode as rollout-identical segments: ``[("user", opening prompt ids),
    ("assistant", content ids + eos), ("user", feedback ids incl. the next generation prompt), ...]``,
    ending at the last assistant message."""
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise ValueError("messages: the episode has no assistant message")
    first = roles.index("assistant")
    last = len(roles) - 1 - roles[::-1].index("assistant")
    tokenizer = fmt.tokenizer
    segments: Segments = [("user", fmt.prompt_ids(messages[:first]))]
    for message in messages[first : last + 1]:
        if message["role"] == "assistant":
            ids = [*tokenizer.encode(message["content"], add_special_tokens=False), tokenizer.eos_token_id]
            segments.append(("assistant", ids))
        else:
            segments.append(("user", fmt.feedback_ids(message["content"], assistant_ended_with_eos=True)))
    return segments


def sft_teacher(cfg: Config) -> Any:
    """The teacher named by ``sft.teacher`` (``scripted``: the gym's own), narrating in ``sft.teacher_style``."""
    name = cfg.sft.teacher if cfg.sft.teacher != "scripted" else cfg.env.name
    kwargs: dict[str, Any] = {"max_turns": cfg.env.max_turns, "seed": cfg.seed}
    if cfg.sft.teacher_style != "full":
        factory = TEACHERS.get(name)
        if factory is None or "style" not in inspect.signature(factory).parameters:
            raise ConfigError(
                f"config key 'sft.teacher_style': the {name!r} teacher only writes the 'full' style, "
                f"got {cfg.sft.teacher_style!r}"
            )
        kwargs["style"] = cfg.sft.teacher_style
    return make_teacher(name, **kwargs)


def teacher_dataset(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> list[Segments]:
    """``cfg.sft.num_trajectories`` episodes the teacher solved, over the training tasks (cycled, one seed
    per attempt). Unsolved episodes are skipped; raises ``ValueError`` when fewer than the requested number
    succeed in ``MAX_ATTEMPTS_PER_TRAJECTORY`` times as many attempts."""
    n = cfg.sft.num_trajectories
    tasks = make_tasks(
        cfg.env.name, split="train", n=cfg.env.num_train_tasks, level=cfg.env.level, seed=cfg.env.seed,
        path=cfg.env.tasks_path or None,
    )
    teacher = sft_teacher(cfg)
    fmt = ChatFormat.from_tokenizer(tokenizer)
    data: list[Segments] = []
    attempts = n * MAX_ATTEMPTS_PER_TRAJECTORY
    for i in range(attempts):
        episode = teacher.play(tasks[i % len(tasks)], seed=derive_seed(cfg.seed, 1, i))
        if episode.success:
            data.append(messages_to_segments(fmt, episode.messages))
            if len(data) == n:
                return data
    raise ValueError(
        f"sft.num_trajectories: the teacher solved only {len(data)} of {attempts} episodes, fewer than the "
        f"{n} requested (env.max_turns={cfg.env.max_turns}, env.level={cfg.env.level}); lower "
        "sft.num_trajectories or give the teacher more turns"
    )


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
    total, count = 0.0, 0.0
    with torch.no_grad():
        for micro, w in lockstep(batch.split(micro_batch_tokens)):
            nll, n = _nll_sums(policy, micro, w * weight)
            total, count = total + float(nll), count + n
    total, count = sum_over_ranks([total, count])
    return total / max(count, 1.0)


def train_sft(cfg: Config, env: DistEnv, init_path: Path, tokenizer: PreTrainedTokenizerBase) -> Path:
    """Run SFT from ``init_path``; returns the exported HF checkpoint (reused if it already exists)."""
    out = Path(cfg.run_dir) / SFT_MODEL_DIR
    if (out / "config.json").is_file():
        return out
    s = cfg.sft
    seed_everything(derive_seed(cfg.seed, 2, env.rank))
    data = teacher_dataset(cfg, tokenizer)
    num_eval = int(len(data) * s.eval_fraction)
    order = np.random.default_rng(derive_seed(cfg.seed, 3)).permutation(len(data)).tolist()
    held_out, train = [data[i] for i in order[:num_eval]], [data[i] for i in order[num_eval:]]
    steps_per_epoch = math.ceil(len(train) / s.batch_trajectories)
    total_steps = s.epochs * steps_per_epoch

    policy = load_policy(init_path, cfg.model, env)
    optimizer = build_optimizer(policy, s.optim)
    scheduler = build_scheduler(optimizer, s.optim, total_steps)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
    logger = MetricsLogger(cfg.run_dir, cfg.logging, name="sft", total=total_steps, enabled=env.is_main,
                           run_config=config_to_dict(cfg))
    step = 0
    try:
        for epoch in range(s.epochs):
            perm = np.random.default_rng(derive_seed(cfg.seed, 4, epoch)).permutation(len(train)).tolist()
            for start in range(0, len(perm), s.batch_trajectories):
                step += 1
                t0 = time.perf_counter()
                chunk = [train[i] for i in perm[start : start + s.batch_trajectories]]
                local = _shard(chunk, env)
                batch = pack_segments(local or chunk[:1], env.device)
                weight = 1.0 if local else 0.0
                num_targets = sum_over_ranks([float(batch.target_rows.numel()) * weight])[0]
                loss_sum = 0.0
                for micro, w in lockstep(batch.split(s.micro_batch_tokens)):
                    nll, _ = _nll_sums(policy, micro, w * weight)
                    (nll / max(num_targets, 1.0)).backward()
                    loss_sum += float(nll.detach())
                loss = sum_over_ranks([loss_sum])[0] / max(num_targets, 1.0)
                grad_norm = float(clip_grad_norm(policy, s.optim.grad_clip))
                lr = scheduler.get_last_lr()[0]
                applied = guard.check(step, loss=loss, grad_norm=grad_norm)
                if applied:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                metrics = {
                    "epoch": epoch, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                    "tokens": int(num_targets), "skipped": not applied,
                    "tokens_per_s": num_targets / (time.perf_counter() - t0),
                }
                logger.log(step, metrics, status=f"loss {loss:.3f}")
            logger.log(step, {"epoch": epoch, "eval_loss": eval_loss(policy, held_out, env, s.micro_batch_tokens)})
        export_hf(policy, tokenizer, out)
    finally:
        logger.close()
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run config (e.g. configs/demo-cpu.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.epochs=3 run_dir=runs/x")


def run(args: argparse.Namespace) -> int:
    """SFT only: writes ``<run_dir>/sft-model`` (use ``bao-fast train`` to continue with RL)."""
    cfg = load_config(args.config, args.overrides)
    env = init_distributed()
    try:
        if env.is_main:
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            save_config(cfg, Path(cfg.run_dir) / "config.yaml")
        init_path = initial_model(cfg, env)
        path = train_sft(cfg, env, init_path, load_tokenizer(init_path))
        if env.is_main:
            print(f"SFT model: {path}")
    finally:
        shutdown_distributed()
    return 0
