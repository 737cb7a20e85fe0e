"""Typed run configuration: dataclasses loaded from YAML with dotted CLI overrides.

``load_config("configs/demo-cpu.yaml", ["algo.shaping.gamma=0.9", "train.steps=4"])`` starts from the
dataclass defaults, applies the YAML, then the overrides (values parsed as YAML scalars), and rejects
unknown keys and wrong types with a ``ConfigError`` naming the dotted key. ``algo.name`` selects the
shaping preset of ``bao_fast.algo.shaping.preset``; explicit ``algo.shaping.*`` keys override it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bao_fast.algo.loss import LossConfig
from bao_fast.algo.shaping import ShapingConfig, preset


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type, or an invalid value."""


Scheduling = Literal["continuous", "rounds"]
"""How ``run_episodes`` schedules episodes' turns (``bao_fast.rollout.agent_loop``)."""


@dataclass
class ModelConfig:
    """Policy model. ``tiny: true`` creates a random-weight tiny Qwen2 (``bao_fast.models``) at ``path``
    (default ``<run_dir>/init-model``) with ``tiny_layers`` decoder layers of width ``tiny_hidden_size``
    (head_dim 64); otherwise ``path`` is a local HF checkpoint directory. On a GPU, training computes in
    ``dtype`` (float32 master weights and gradient reduction; float16 with dynamic loss scaling, see
    ``optim.loss_scale``) and the rollout engine samples in it; on the CPU everything runs in float32.
    ``gradient_checkpointing`` recomputes each decoder layer in the backward; ``use_liger`` patches RMSNorm /
    RoPE / SwiGLU with liger-kernel on a GPU when it is installed; ``attn_implementation`` (transformers' name) is
    the training forward's attention: sdpa and eager run varlen over packed batches; flash_attention_2/3 and
    flex_attention (GPU only) use transformers' packed-sequence handling; rollout engines use their own."""

    path: str = ""
    tiny: bool = False
    tiny_hidden_size: int = 128
    tiny_layers: int = 2
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    gradient_checkpointing: bool = False
    use_liger: bool = True
    attn_implementation: str = "sdpa"


@dataclass
class EnvConfig:
    """Gym and its task sets (``bao_fast.envs.make_tasks``). ``tasks_path``: a dataset file or directory
    (gym-specific; empty = generated tasks). LLM-user gyms reach their user simulator at ``user_base_url``
    (OpenAI-compatible, model ``user_model``, key from ``$OPENAI_API_KEY`` when set), with completion limits
    ``user_max_tokens`` / ``judge_max_tokens`` (null: the gym's own, 64 tokens, 96 for Intention's user and
    Turtle's judge); ``user_thinking: false`` asks the server to skip the model's
    thinking (``chat_template_kwargs.enable_thinking``, as vLLM / SGLang serve Qwen3). ``max_turns`` (the
    turn budget T, also ``algo.shaping.horizon``) defaults to the gym's own: 15 for Function and Turtle, 12 for
    Telepathy and Twenty Questions, 10 for Intention. ``num_train_tasks`` / ``num_eval_tasks``: tasks taken from
    the train / test split (generated ones from ``seed``, at difficulty ``level`` where the gym has levels;
    evaluation uses the first ``min(num_eval_tasks, eval.num_tasks)``)."""

    name: str = "function"
    level: int = 1
    num_train_tasks: int = 460
    num_eval_tasks: int = 78
    tasks_path: str = ""
    max_turns: int = 15
    seed: int = 0
    user_base_url: str = ""
    user_model: str = ""
    user_max_tokens: int | None = None
    judge_max_tokens: int | None = None
    user_thinking: bool = True


@dataclass
class RolloutConfig:
    """Multi-turn generation. ``engine: vllm`` colocates vLLM in the training processes; ``hf`` uses
    transformers ``generate``. ``max_model_len`` bounds prompt + all turns (BAO.md end condition).
    ``old_logprobs``: ``recompute`` (the policy's before the update: one no-grad forward over every mini-batch
    but the first, whose first training forward still runs on the rollout's weights) or ``engine`` (the
    engine's sampling log-probs, no forward). ``tensor_parallel_size`` (vLLM only; must divide the world size,
    checked at start-up): consecutive ranks share one tensor-parallel engine and roll out the same prompts (the
    group's first rank steps the gyms and broadcasts the results); the trajectories are then split over the
    group's ranks by whole GRPO groups, and FSDP still trains data-parallel over all ranks.

    Sampling: ``prompts_per_step`` tasks per RL step, each played ``group_size`` times (a GRPO group), at
    ``temperature`` / ``top_p``, each assistant turn at most ``max_turn_tokens`` tokens; ``env_workers``
    threads step the gyms (and wait on a user simulator) concurrently. ``scheduling``: ``continuous`` gives each
    episode its next turn as soon as its gym step returns while vLLM keeps generating the others' (a
    tensor-parallel group's leader tells its ranks which answers are in after every engine step); ``rounds``
    waits for every live episode's turn, then steps all gyms (what the hf engine always does). ``rounds`` reruns
    bit-exactly with reproducible gyms, ``continuous`` up to the engine's batch-dependent numerics (see
    ``bao_fast.rollout.agent_loop``). vLLM resources:
    on a GPU its KV cache gets ``gpu_memory_utilization`` of the device, and between rollouts it sleeps
    (``sleep_level`` 1 offloads its weights to host memory, 2 discards them); ``enforce_eager`` skips CUDA
    graphs. On the CPU its KV cache
    is ``cpu_kv_cache_gib`` GiB (the ``VLLM_CPU_KVCACHE_SPACE`` environment variable, in GiB, overrides it).
    Weight sync gathers the policy's weights into the engine in buckets of ``weight_sync_bucket_mb`` MiB."""

    engine: Literal["vllm", "hf"] = "vllm"
    group_size: int = 8
    prompts_per_step: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    max_turn_tokens: int = 1024
    max_model_len: int = 8152
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    cpu_kv_cache_gib: float = 1.0
    sleep_level: int = 1
    enforce_eager: bool = False
    weight_sync_bucket_mb: int = 512
    old_logprobs: Literal["recompute", "engine"] = "recompute"
    env_workers: int = 8
    scheduling: Scheduling = "continuous"


@dataclass
class AlgoConfig:
    """BAO algorithm: ``name`` in bao | userrl | grpo picks the shaping preset."""

    name: Literal["bao", "userrl", "grpo"] = "bao"
    shaping: ShapingConfig = field(default_factory=lambda: preset("bao"))
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up over ``warmup_steps``, then constant, or cosine / linear decay to
    ``min_lr_ratio`` × ``lr`` at the end of the run. Both count optimiser steps: SFT steps, but in RL
    ``train.ppo_epochs`` × ``rollout.prompts_per_step`` / ``train.mini_batch_size`` per RL step.
    ``loss_scale`` (``bao_fast.train.loss_scale``): ``auto`` scales the loss dynamically when training computes
    in float16 (``model.dtype`` on a GPU), against gradient underflow; ``dynamic`` always; ``none`` never."""

    lr: float = 1e-6
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0
    loss_scale: Literal["auto", "dynamic", "none"] = "auto"


@dataclass
class SFTConfig:
    """Behaviour-enhanced SFT on teacher trajectories (loss on assistant tokens only). ``num_trajectories``
    counts episodes the teacher solved. ``teacher``: ``scripted`` (the gym's programmatic teacher; Function
    and Twenty Questions have one) or ``llm`` (a model behind the OpenAI-compatible server ``teacher_base_url``
    serving ``teacher_model``, key from ``$OPENAI_API_KEY``, prompted to write BAO's behaviours; any gym, with
    ``teacher_workers`` episodes in flight per rank). ``teacher_style`` picks the scripted narration
    (``concise``: two-line ``<think>`` blocks, for tiny models; supported by teachers that take a ``style``)."""

    enabled: bool = True
    teacher: Literal["scripted", "llm"] = "scripted"
    teacher_style: Literal["full", "concise"] = "full"
    teacher_base_url: str = ""
    teacher_model: str = ""
    teacher_max_tokens: int = 1024
    teacher_temperature: float = 0.7
    teacher_workers: int = 8
    num_trajectories: int = 256
    epochs: int = 2
    micro_batch_tokens: int = 8192
    batch_trajectories: int = 16
    eval_fraction: float = 0.1
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=10, schedule="cosine"))


@dataclass
class TrainConfig:
    """RL loop sizes. A step = ``rollout.prompts_per_step`` prompts × ``group_size`` rollouts, split per PPO
    epoch into mini-batches of ``mini_batch_size`` prompts (with their rollouts), one optimiser step each,
    accumulated over micro-batches of at most ``micro_batch_tokens`` tokens. ``eval_every``: evaluate every N
    steps, and always before the first and after the last (0 = only there). ``max_nonfinite_steps``: stop after
    N steps in a row that skipped an update for a non-finite loss or gradient norm (SFT, which uses it too: N
    optimiser steps). ``entropy_every``: log the policy's entropy every N steps (0 = never; with
    ``algo.loss.entropy_coef`` > 0, which needs it, it is computed and logged on every step).
    ``skip_zero_advantage``: without a KL or entropy term, leave trajectories whose advantages are all 0 (a
    group whose scores are all equal, a gym error) out of the old-log-prob and training forwards: their loss
    and gradient are exactly 0, and the loss keeps its normaliser, so the update is the same up to float
    summation order (one difference: a non-finite log-prob of a trajectory left out no longer makes the loss nan
    and skips the update); the actor statistics are over the tokens that ran (not logged when none did), and
    ``actor/trained_token_fraction`` is their share."""

    steps: int = 100
    ppo_epochs: int = 1
    mini_batch_size: int = 16
    micro_batch_tokens: int = 16384
    eval_every: int = 10
    max_nonfinite_steps: int = 3
    entropy_every: int = 1
    skip_zero_advantage: bool = True


@dataclass
class CheckpointConfig:
    """DCP checkpoints for exact resume every ``save_every`` steps, keeping the last ``keep_last`` (0 = all).
    RL: under ``<run_dir>/checkpoints``, per RL step, and always at the last step (``save_every`` 0 = only
    there). SFT: under ``<run_dir>/sft-checkpoints``, per SFT optimiser step, never at its last step (its end
    is the ``sft-model`` export, which then replaces them; 0 = none). ``resume`` continues from the latest
    checkpoint (and reuses a finished SFT export), on any world size (resharded when it differs from the
    saving run's); false starts over, deleting them. ``export_hf`` writes the
    RL result to ``<run_dir>/final-model`` (false: an earlier export there is deleted at the end)."""

    save_every: int = 10
    keep_last: int = 2
    resume: bool = True
    export_hf: bool = True


@dataclass
class LoggingConfig:
    """JSONL metrics always; a rich progress bar (``progress``, rank 0), TensorBoard and wandb optional."""

    progress: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "bao_fast"


@dataclass
class EvalConfig:
    """Greedy (or sampled) evaluation on the eval split, ``num_seeds`` seeds, Pass@U-k up to ``max_k``."""

    num_tasks: int = 78
    num_seeds: int = 1
    greedy: bool = True
    temperature: float = 1.0
    max_k: int = 9


@dataclass
class Config:
    """Everything one run needs."""

    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _check_scalar(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key '{key}' must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_scalar(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}' has unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str, base: Any = None) -> Any:
    """Instantiate dataclass ``cls`` from ``base`` (or defaults) updated with the nested dict ``data``."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            hint = difflib.get_close_matches(key, names, n=1)
            suggestion = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{suggestion}")
    current = base if base is not None else cls()
    values = {}
    for name in names:
        tp, key = hints[name], f"{prefix}{name}"
        old = getattr(current, name)
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, data.get(name, {}), f"{key}.", old)
        elif name in data:
            values[name] = _check_scalar(data[name], tp, key)
        else:
            values[name] = old
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(f"invalid '{prefix.rstrip('.') or 'config'}': {exc}") from exc


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> nested dict, values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like 'section.key=value'")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc.__class__.__name__})") from exc
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    """Validate a nested dict into a Config (the algorithm preset is applied before ``algo.shaping``)."""
    algo = data.get("algo", {}) if isinstance(data.get("algo", {}), dict) else {}
    env = data.get("env", {})
    if isinstance(env, dict) and "max_turns" not in env:  # the gym's own budget, recorded in the run's config
        data = {**data, "env": {**env, "max_turns": _gym_max_turns(env.get("name", EnvConfig.name))}}
    horizon = data["env"]["max_turns"] if isinstance(env, dict) else EnvConfig.max_turns
    horizon = _check_scalar(horizon, int, "env.max_turns")  # the preset's horizon: checked before it is built
    _require(horizon >= 1, "env.max_turns", f"must be >= 1, got {horizon}")
    base = Config()
    if "name" in algo:
        name = _check_scalar(algo["name"], typing.get_type_hints(AlgoConfig)["name"], "algo.name")
        base.algo = AlgoConfig(name=name, shaping=preset(name, horizon=horizon), loss=base.algo.loss)
    else:
        base.algo = AlgoConfig(shaping=preset("bao", horizon=horizon))
    return validate(_build(Config, data, "", base))


def _gym_max_turns(name: Any) -> int:
    """Registered gym ``name``'s turn budget; ``EnvConfig.max_turns`` for a name the registry lacks (the
    preflight reports ``env.name``)."""
    from bao_fast.envs.registry import GYMS, default_max_turns  # the gyms import more than a config load needs

    return default_max_turns(name) if isinstance(name, str) and name in GYMS else EnvConfig.max_turns


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")


def _validate_optim(cfg: OptimConfig, prefix: str) -> None:
    _require(0 < cfg.lr < math.inf, f"{prefix}.lr", f"must be > 0 and finite, got {cfg.lr}")
    wd = cfg.weight_decay
    _require(0 <= wd < math.inf, f"{prefix}.weight_decay", f"must be >= 0 and finite, got {wd}")
    _require(0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1, f"{prefix}.beta1/beta2", "must be in [0, 1)")
    _require(0 < cfg.eps < math.inf, f"{prefix}.eps", f"must be > 0 and finite, got {cfg.eps}")
    _require(cfg.grad_clip >= 0, f"{prefix}.grad_clip", f"must be >= 0 (0 = no clipping), got {cfg.grad_clip}")
    _require(cfg.warmup_steps >= 0, f"{prefix}.warmup_steps", f"must be >= 0, got {cfg.warmup_steps}")
    _require(0 <= cfg.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", f"must be in [0, 1], got {cfg.min_lr_ratio}")


def validate(cfg: Config) -> Config:
    """Cross-field checks; raises ConfigError naming the offending key. Returns ``cfg``."""
    m, e, r, t = cfg.model, cfg.env, cfg.rollout, cfg.train
    _require(m.tiny or bool(m.path), "model.path", "must name a local HF checkpoint directory (or set model.tiny)")
    _require(bool(cfg.run_dir), "run_dir", "must not be empty")
    _require(m.tiny_hidden_size >= 64 and m.tiny_hidden_size % 64 == 0, "model.tiny_hidden_size",
             f"must be a positive multiple of 64 (head_dim 64), got {m.tiny_hidden_size}")
    _require(m.tiny_layers >= 1, "model.tiny_layers", f"must be >= 1, got {m.tiny_layers}")
    _require(e.max_turns >= 1, "env.max_turns", f"must be >= 1, got {e.max_turns}")
    _require(e.num_train_tasks >= 1, "env.num_train_tasks", f"must be >= 1, got {e.num_train_tasks}")
    _require(e.num_eval_tasks >= 1, "env.num_eval_tasks", f"must be >= 1, got {e.num_eval_tasks}")
    _require(not e.user_base_url or bool(e.user_model), "env.user_model",
             "must name the user-simulator model when env.user_base_url is set")
    for key, limit in (("user_max_tokens", e.user_max_tokens), ("judge_max_tokens", e.judge_max_tokens)):
        _require(limit is None or limit >= 1, f"env.{key}", f"must be >= 1 or null (the gym's own), got {limit}")
    _require(
        cfg.algo.shaping.horizon == e.max_turns,
        "algo.shaping.horizon",
        f"({cfg.algo.shaping.horizon}) must equal env.max_turns ({e.max_turns}), the turn budget T of BAO.md",
    )
    _require(r.group_size >= 1, "rollout.group_size", f"must be >= 1, got {r.group_size}")
    _require(r.prompts_per_step >= 1, "rollout.prompts_per_step", f"must be >= 1, got {r.prompts_per_step}")
    _require(r.temperature > 0, "rollout.temperature", f"must be > 0 for training rollouts, got {r.temperature}")
    _require(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    _require(
        r.old_logprobs != "engine" or r.top_p == 1,
        "rollout.old_logprobs",
        f"'engine' needs rollout.top_p = 1 (got {r.top_p}): the engine's log-probs are renormalised over the "
        "top-p nucleus, the training forward's are not, so their ratio would be biased; use 'recompute'",
    )
    _require(r.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", f"must be >= 1, got {r.tensor_parallel_size}")
    _require(
        r.tensor_parallel_size == 1 or r.engine == "vllm",
        "rollout.tensor_parallel_size",
        f"must be 1 with rollout.engine={r.engine!r}, got {r.tensor_parallel_size}: only the vLLM engine is "
        "tensor-parallel",
    )
    _require(r.max_turn_tokens >= 1, "rollout.max_turn_tokens", f"must be >= 1, got {r.max_turn_tokens}")
    _require(
        r.max_model_len > r.max_turn_tokens,
        "rollout.max_model_len",
        f"({r.max_model_len}) must exceed rollout.max_turn_tokens ({r.max_turn_tokens})",
    )
    _require(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be in (0, 1]")
    _require(r.env_workers >= 1, "rollout.env_workers", f"must be >= 1, got {r.env_workers}")
    _require(r.weight_sync_bucket_mb >= 1, "rollout.weight_sync_bucket_mb", "must be >= 1")
    _require(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    _require(t.ppo_epochs >= 1, "train.ppo_epochs", f"must be >= 1, got {t.ppo_epochs}")
    _require(t.mini_batch_size >= 1, "train.mini_batch_size", f"must be >= 1, got {t.mini_batch_size}")
    _require(
        r.prompts_per_step % t.mini_batch_size == 0,
        "train.mini_batch_size",
        f"({t.mini_batch_size} prompts) must divide rollout.prompts_per_step ({r.prompts_per_step})",
    )
    _require(t.micro_batch_tokens >= 1, "train.micro_batch_tokens", f"must be >= 1, got {t.micro_batch_tokens}")
    _require(t.eval_every >= 0, "train.eval_every",
             f"must be >= 0 (0 = only before the first and after the last step), got {t.eval_every}")
    _require(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", f"must be >= 1, got {t.max_nonfinite_steps}")
    _require(t.entropy_every >= 0, "train.entropy_every", f"must be >= 0 (0 = never logged), got {t.entropy_every}")
    _validate_optim(cfg.optim, "optim")
    s = cfg.sft
    _validate_optim(s.optim, "sft.optim")
    _require(s.num_trajectories >= 1, "sft.num_trajectories", f"must be >= 1, got {s.num_trajectories}")
    _require(s.epochs >= 1, "sft.epochs", f"must be >= 1, got {s.epochs}")
    _require(s.batch_trajectories >= 1, "sft.batch_trajectories", f"must be >= 1, got {s.batch_trajectories}")
    _require(s.micro_batch_tokens >= 1, "sft.micro_batch_tokens", f"must be >= 1, got {s.micro_batch_tokens}")
    _require(0 <= s.eval_fraction < 1, "sft.eval_fraction", f"must be in [0, 1), got {s.eval_fraction}")
    if s.teacher == "llm":
        _require(bool(s.teacher_base_url), "sft.teacher_base_url", "must be set when sft.teacher is 'llm'")
        _require(bool(s.teacher_model), "sft.teacher_model", "must name the teacher model when sft.teacher is 'llm'")
        _require(s.teacher_style == "full", "sft.teacher_style",
                 f"must be 'full' for the llm teacher (concise narration is scripted), got {s.teacher_style!r}")
    _require(s.teacher_max_tokens >= 1, "sft.teacher_max_tokens", f"must be >= 1, got {s.teacher_max_tokens}")
    _require(s.teacher_temperature >= 0, "sft.teacher_temperature", f"must be >= 0, got {s.teacher_temperature}")
    _require(s.teacher_workers >= 1, "sft.teacher_workers", f"must be >= 1, got {s.teacher_workers}")
    c = cfg.checkpoint
    _require(c.save_every >= 0, "checkpoint.save_every",
             f"must be >= 0 (0 = RL only at its last step, SFT none), got {c.save_every}")
    _require(c.keep_last >= 0, "checkpoint.keep_last", f"must be >= 0 (0 = keep all), got {c.keep_last}")
    v = cfg.eval
    _require(v.num_tasks >= 1, "eval.num_tasks", f"must be >= 1, got {v.num_tasks}")
    _require(v.num_seeds >= 1, "eval.num_seeds", f"must be >= 1, got {v.num_seeds}")
    _require(v.max_k >= 1, "eval.max_k", f"must be >= 1, got {v.max_k}")
    _require(v.greedy or v.temperature > 0, "eval.temperature", "must be > 0 when eval.greedy is false")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file at ``path`` <- dotted ``overrides``; raises ConfigError on any bad key."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded
    return config_from_dict(_merge(data, parse_overrides(overrides or [])))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for YAML dumps and run metadata)."""
    return dataclasses.asdict(cfg)


SERVER_ADDRESS_KEYS = ("sft.teacher_base_url", "env.user_base_url")
"""Where the teacher / user-simulator models are served, not which models they are (their names stay)."""

RESUME_SAFE_KEYS = (
    "run_dir", "train.steps", "train.eval_every", "train.entropy_every", "checkpoint.", "logging.", "eval.",
    "rollout.env_workers", "rollout.gpu_memory_utilization", "rollout.cpu_kv_cache_gib", "rollout.enforce_eager",
    "rollout.sleep_level", "rollout.weight_sync_bucket_mb", "sft.teacher_workers", *SERVER_ADDRESS_KEYS,
)  # fmt: skip
"""Dotted keys (or prefixes ending in ``.``) a resumed run may change: length, logging, evaluation, checkpoint
cadence, resources and :data:`SERVER_ADDRESS_KEYS`. Any other key defines what the run trains."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def resume_conflicts(saved: dict[str, Any], cfg: Config) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` for every key outside :data:`RESUME_SAFE_KEYS` on which ``cfg``
    differs from ``saved`` (a run's ``config.yaml`` as loaded by YAML). A key ``saved`` lacks (the run was
    started by a version without it) counts as its default."""
    defaults = _flatten(json_safe(config_to_dict(Config())))
    old, new = {**defaults, **_flatten(saved)}, _flatten(json_safe(config_to_dict(cfg)))
    keys = sorted(set(old) | set(new))
    return [(k, old.get(k), new.get(k)) for k in keys
            if old.get(k) != new.get(k) and not any(k == s or (s.endswith(".") and k.startswith(s))
                                                    for s in RESUME_SAFE_KEYS)]  # fmt: skip


def json_safe(tree: Any) -> Any:
    """``tree`` as YAML round-trips it (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(tree, sort_keys=False))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML that ``load_config`` reads back to an equal Config."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
