"""Pieces both trainers share: seeding, the resumable task sampler, the initial model, and the start of a
run (preflight checks, the run_dir lock, clearing an earlier run's outputs, the saved config)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from bao_fast.config import Config, ConfigError, ModelConfig, resume_conflicts, save_config
from bao_fast.envs import TASKS, make_tasks
from bao_fast.eval.evaluate import check_servers
from bao_fast.models import TinyModelSpec, create_tiny_model
from bao_fast.models.tiny import TINY_SPEC_FILE
from bao_fast.rollout.engine import missing_engine
from bao_fast.rollout.tp_group import check_tp_size
from bao_fast.train.checkpoint import checkpoint_step, latest_checkpoint, remove_outputs
from bao_fast.train.collectives import gather_objects
from bao_fast.train.fsdp import DistEnv, attention_problem, init_distributed
from bao_fast.train.run_lock import lock_run_dir


def derive_seed(*parts: int) -> int:
    """A 31-bit seed that depends on every part (e.g. ``(cfg.seed, step, rank)``), stable across runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class TaskSampler:
    """Endless epochs over ``num_tasks`` task indices, reshuffled per epoch from ``seed``; resumable.

    ``next(n)`` returns the next ``n`` indices (crossing epoch boundaries); the cursor is the state.
    """

    def __init__(self, num_tasks: int, seed: int) -> None:
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_tasks = num_tasks
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        rng = np.random.default_rng(derive_seed(self.seed, epoch))
        return rng.permutation(self.num_tasks).tolist()

    def next(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            take = min(n - len(out), self.num_tasks - self.position)
            out += self._order[self.position : self.position + take]
            self.position += take
            if self.position == self.num_tasks:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
        return out

    def state_dict(self) -> dict[str, int]:
        return {"num_tasks": self.num_tasks, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_tasks"] != self.num_tasks:
            raise ValueError(f"sampler state is for {state['num_tasks']} tasks, this run has {self.num_tasks}")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


def config_tasks(cfg: Config, split: str, n: int, key: str) -> list[Any]:
    """``n`` tasks of the config's gym (``env.name``, ``env.level``, ``env.seed``, ``env.tasks_path``) from
    ``split``. ConfigError naming the key at fault: ``env.name`` for an unregistered gym, ``env.tasks_path``
    for a dataset that cannot be read, ``key`` (the count's key) when the gym cannot supply ``n`` tasks."""
    e = cfg.env
    if e.name not in TASKS:
        raise ConfigError(f"config key 'env.name': no gym {e.name!r} is registered; registered: {sorted(TASKS)}")
    if e.tasks_path:
        try:
            tasks = make_tasks(e.name, split=split, level=e.level, seed=e.seed, path=e.tasks_path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"config key 'env.tasks_path': cannot read {e.name!r} tasks from "
                              f"{e.tasks_path!r}: {type(exc).__name__}: {exc}") from exc
        if len(tasks) < n:
            raise ConfigError(f"config key '{key}': {n} {split} tasks requested, {e.tasks_path!r} holds {len(tasks)}")
        return tasks[:n]
    try:
        tasks = make_tasks(e.name, split=split, n=n, level=e.level, seed=e.seed)
    except ValueError as exc:
        raise ConfigError(f"config key '{key}' ({n} {split} tasks of the {e.name!r} gym): {exc}") from exc
    if len(tasks) < n:  # a registered task source that returns fewer than asked
        raise ConfigError(f"config key '{key}': {n} {split} tasks requested, the {e.name!r} gym supplied {len(tasks)}")
    return tasks


def tiny_spec(model: ModelConfig) -> TinyModelSpec:
    """Shape of the tiny model ``model.tiny`` creates: head_dim 64, one KV head per two query heads (per query
    head when their count is odd, as grouped attention needs whole groups)."""
    heads = max(1, model.tiny_hidden_size // 64)
    return TinyModelSpec(
        hidden_size=model.tiny_hidden_size,
        num_hidden_layers=model.tiny_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2 if heads % 2 == 0 else heads,
        intermediate_size=2 * model.tiny_hidden_size,
    )


SFT_MODEL_DIR = "sft-model"
SFT_CHECKPOINT_DIR = "sft-checkpoints"
FINAL_MODEL_DIR = "final-model"
CHECKPOINT_DIR = "checkpoints"
EVALS_FILE = "evals.json"
CONFIG_FILE = "config.yaml"
RESUMABLE_OUTPUTS = (SFT_CHECKPOINT_DIR, SFT_MODEL_DIR, CHECKPOINT_DIR, FINAL_MODEL_DIR)
"""What a rerun with ``checkpoint.resume`` continues from (or reuses) in ``run_dir``."""
RL_OUTPUTS = (CHECKPOINT_DIR, FINAL_MODEL_DIR, EVALS_FILE)
"""What RL writes in ``run_dir`` on top of the model it starts from (stale once that model is trained again)."""


def start_run(cfg: Config, stage: str) -> DistEnv:
    """Join the process group, check what only the run can check and lock ``run_dir`` (rank 0,
    :func:`claim_run_dir`), delete an earlier run's outputs unless ``checkpoint.resume`` (:func:`stale_outputs`),
    then (rank 0) write the run's ``config.yaml``, which every rank must then see (:func:`unshared_run_dir`).
    ``stage``: ``sft`` or ``train`` (SFT, then RL)."""
    env = init_distributed()
    problem = claim_run_dir(cfg, env.world_size, stage) if env.is_main else None
    if env.world_size > 1:
        problem = gather_objects(problem)[0]
    if problem is not None:
        raise ConfigError(problem)
    if not cfg.checkpoint.resume:
        remove_outputs(Path(cfg.run_dir) / name for name in stale_outputs(cfg, stage))
    config_file = Path(cfg.run_dir) / CONFIG_FILE
    if env.is_main:
        save_config(cfg, config_file)
    if env.world_size > 1:
        gather_objects(None)  # a barrier: rank 0 has written the file before any rank reads it
        problem = unshared_run_dir(cfg.run_dir, gather_objects(_digest(config_file)))
        if problem is not None:
            raise ConfigError(problem)
    return env


def claim_run_dir(cfg: Config, world_size: int, stage: str) -> str | None:
    """Rank 0: :func:`preflight`, then the ``run_dir`` lock; a directory another run is using is reported
    first (its checkpoints could also fail preflight's resume checks, with advice that does not apply). A
    ``run_dir`` that does not exist yet is created only once preflight passes."""
    if Path(cfg.run_dir).is_dir():
        return lock_run_dir(cfg.run_dir) or preflight(cfg, world_size, stage)
    return preflight(cfg, world_size, stage) or lock_run_dir(cfg.run_dir)


def stale_outputs(cfg: Config, stage: str) -> tuple[str, ...]:
    """What a run that starts over (``checkpoint.resume=false``) deletes from ``run_dir`` before it writes its
    ``config.yaml``, which would otherwise vouch for them: a run killed before it saves anything must not leave
    an earlier run's checkpoints for a later resume to continue. SFT's outputs are kept where ``train`` runs
    without SFT (``sft-model`` may be the model it starts from)."""
    if stage == "train" and not cfg.sft.enabled:
        return RL_OUTPUTS
    return (SFT_CHECKPOINT_DIR, SFT_MODEL_DIR, *RL_OUTPUTS)


def _digest(path: Path) -> str | None:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest() if path.is_file() else None


def unshared_run_dir(run_dir: str, digests: list[str | None]) -> str | None:
    """Why ``run_dir`` is not one directory for all ranks, given each rank's digest of the ``config.yaml`` rank 0
    just wrote there (None: not found), or None. Every rank writes checkpoint shards that rank 0 publishes, so a
    node-local ``run_dir`` would save checkpoints no run can resume from."""
    others = [r for r, d in enumerate(digests) if d != digests[0]]
    if not others:
        return None
    return (f"config key 'run_dir': ranks {others} do not see the {CONFIG_FILE} rank 0 wrote in {run_dir!r}; "
            "run_dir must be on a filesystem that every rank shares")


def preflight(cfg: Config, world_size: int, stage: str) -> str | None:
    """Why ``cfg`` cannot run (as a ConfigError message), or None; checked before anything is written: the
    training forward's attention, the starting checkpoint, the gym's tasks, the models of the OpenAI-compatible
    servers, RL's rollout engine and world size, and that a resumed ``run_dir`` holds a run of the same config
    (up to ``RESUME_SAFE_KEYS``) that has not trained past ``train.steps``."""
    try:
        if (problem := attention_problem(cfg.model.attn_implementation)) is not None:
            raise ConfigError(f"config key 'model.attn_implementation': {problem}")
        if not cfg.model.tiny:
            model_path(cfg)
        elif cfg.model.path:
            check_tiny_model_path(Path(cfg.model.path))
        config_tasks(cfg, "train", cfg.env.num_train_tasks, "env.num_train_tasks")
        check_servers(cfg, stage)
        if stage == "train":
            if (missing := missing_engine(cfg.rollout.engine)) is not None:
                raise ConfigError(f"config key 'rollout.engine': {missing}; rollout.engine=hf generates with "
                                  "transformers instead")
            check_world_size(cfg, world_size)
            config_tasks(cfg, "test", min(cfg.env.num_eval_tasks, cfg.eval.num_tasks), "env.num_eval_tasks")
            if cfg.checkpoint.resume:
                check_rl_length(cfg)
    except ConfigError as exc:
        return str(exc)
    run_dir = Path(cfg.run_dir)
    saved = run_dir / CONFIG_FILE
    if not cfg.checkpoint.resume or not saved.is_file() or not any((run_dir / o).exists() for o in RESUMABLE_OUTPUTS):
        return None
    conflicts = resume_conflicts(yaml.safe_load(saved.read_text()) or {}, cfg)
    if not conflicts:
        return None
    changes = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in conflicts[:5])
    return (f"config key '{conflicts[0][0]}': run_dir {str(run_dir)!r} holds a run with another config ({changes}); "
            "rerun with its config to resume it, or start over with checkpoint.resume=false or a new run_dir")


def check_rl_length(cfg: Config) -> None:
    """ConfigError naming ``train.steps`` when ``run_dir`` holds an RL checkpoint past it: resuming would train
    nothing and export a later step's model as the result of a shorter run."""
    latest = latest_checkpoint(Path(cfg.run_dir) / CHECKPOINT_DIR)
    if latest is not None and (step := checkpoint_step(latest)) > cfg.train.steps:
        raise ConfigError(f"config key 'train.steps' ({cfg.train.steps}): run_dir {cfg.run_dir!r} holds the RL "
                          f"checkpoint {str(latest)!r} of step {step}; resume with train.steps >= {step}, or start "
                          "over with checkpoint.resume=false or a new run_dir")


def check_world_size(cfg: Config, world_size: int) -> None:
    """ConfigError unless RL's ``train.mini_batch_size`` and ``rollout.tensor_parallel_size`` divide over
    ``world_size`` ranks."""
    if cfg.train.mini_batch_size % world_size:
        raise ConfigError(f"config key 'train.mini_batch_size' ({cfg.train.mini_batch_size} prompts) must divide "
                          f"by the world size ({world_size})")
    check_tp_size(cfg.rollout.tensor_parallel_size, world_size)


def model_path(cfg: Config) -> Path:
    """``model.path`` as a HF checkpoint directory; ConfigError naming the key when it is not one."""
    path = Path(cfg.model.path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"config key 'model.path': {str(path)!r} is not a HF checkpoint directory (no config.json)")
    return path


def check_tiny_model_path(path: Path) -> None:
    """ConfigError naming ``model.path`` when ``path`` holds a checkpoint that ``model.tiny`` did not write
    (creating the tiny model there would overwrite it)."""
    if (path / "config.json").exists() and not (path / TINY_SPEC_FILE).exists():
        raise ConfigError(f"config key 'model.path': {str(path)!r} holds a checkpoint that is not a tiny model; "
                          "model.tiny would overwrite it (unset model.tiny, or name another directory)")


def initial_model(cfg: Config, env: DistEnv) -> Path:
    """The HF checkpoint training starts from: ``model.path``, or (``model.tiny``) a random tiny Qwen2
    created once by rank 0 under ``model.path`` or ``<run_dir>/init-model``."""
    if not cfg.model.tiny:
        return model_path(cfg)
    path = Path(cfg.model.path or Path(cfg.run_dir) / "init-model")
    if env.is_main:
        create_tiny_model(path, spec=tiny_spec(cfg.model), seed=cfg.seed)
    dist.barrier()
    return path
