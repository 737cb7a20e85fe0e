"""Typed config loading: YAML + dotted overrides, presets, strict validation, round trip, shipped configs."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from bao_fast.algo import preset
from bao_fast.config import (
    Config,
    ConfigError,
    config_to_dict,
    json_safe,
    load_config,
    parse_overrides,
    resume_conflicts,
    save_config,
)
from bao_fast.eval.evaluate import check_servers
from bao_fast.train.runtime import check_world_size, config_tasks

TINY = ["model.tiny=true"]


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: runs/x\ntrain:\n  steps: 7\noptim:\n  lr: 2.0e-5\nmodel:\n  tiny: true\n")
    cfg = load_config(path, ["train.steps=9", "rollout.temperature=0.7", "env.name=function"])
    assert isinstance(cfg, Config)
    assert (cfg.run_dir, cfg.train.steps, cfg.optim.lr, cfg.rollout.temperature) == ("runs/x", 9, 2e-5, 0.7)
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("name", ["bao", "userrl", "grpo"])
def test_algo_preset_then_explicit_shaping(name: str) -> None:
    cfg = load_config(None, [*TINY, f"algo.name={name}", "env.max_turns=12"])
    assert cfg.algo.shaping == preset(name, horizon=12)
    tuned = load_config(None, [*TINY, f"algo.name={name}", "algo.shaping.gamma=0.5", "algo.loss.clip_high=0.28"])
    assert tuned.algo.shaping.gamma == 0.5 and tuned.algo.loss.clip_high == 0.28
    assert tuned.algo.shaping.turn_credit == preset(name).turn_credit


@pytest.mark.parametrize(
    ("gym", "budget"),
    [("function", 15), ("turtle", 15), ("telepathy", 12), ("twenty_questions", 12), ("intention", 10)],
)
def test_turn_budget_defaults_to_the_gyms_own(gym: str, budget: int, tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, f"env.name={gym}"])
    assert cfg.env.max_turns == budget and cfg.algo.shaping.horizon == budget  # BAO.md: T is 12 for Telepathy
    assert load_config(None, [*TINY, f"env.name={gym}", "env.max_turns=7"]).algo.shaping.horizon == 7
    path = tmp_path / "c.yaml"
    path.write_text(f"env:\n  name: {gym}\n  max_turns: 9\n")
    assert load_config(path, TINY).env.max_turns == 9


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["trian.steps=3"], "unknown config key 'trian'"),
        (["train.stpes=3"], r"did you mean 'train.steps'"),
        (["train.steps=three"], "'train.steps' must be an int"),
        (["train.steps=2.5"], "'train.steps' must be an int"),
        (["logging.wandb=1"], "'logging.wandb' must be a bool"),
        (["algo.name=ppo"], "'algo.name' must be one of"),
        (["rollout.engine=sglang"], "'rollout.engine' must be one of"),
        (["rollout.scheduling=async"], "'rollout.scheduling' must be one of"),
        (["algo.shaping.turn_credit=foo"], "turn_credit"),
        (["algo.loss.dual_clip=0.5"], "dual_clip"),
        (["algo.loss.kl_coef=-0.1"], "'algo.loss'.*kl_coef must be >= 0"),
        (["algo.loss.entropy_coef=-0.1"], "'algo.loss'.*entropy_coef must be >= 0"),
        (["train.entropy_every=-3"], "'train.entropy_every' must be >= 0"),
        (["train.steps=0"], "'train.steps' must be >= 1"),
        (["train.mini_batch_size=3", "rollout.prompts_per_step=8"], "'train.mini_batch_size'.*must divide"),
        (["rollout.temperature=0"], "'rollout.temperature' must be > 0"),
        (["rollout.max_turn_tokens=9000"], "'rollout.max_model_len'"),
        (["rollout.old_logprobs=engine", "rollout.top_p=0.9"], "'rollout.old_logprobs'.*top_p = 1"),
        (["rollout.tensor_parallel_size=2", "rollout.engine=hf"], "'rollout.tensor_parallel_size' must be 1 with"),
        (["rollout.tensor_parallel_size=0"], "'rollout.tensor_parallel_size' must be >= 1, got 0"),
        (["env.user_base_url=http://sim:8000/v1"], "'env.user_model' must name the user-simulator model"),
        (["env.judge_max_tokens=0"], "'env.judge_max_tokens' must be >= 1"),
        (["algo.shaping.horizon=10"], "must equal env.max_turns"),
        (["env.max_turns=0"], "'env.max_turns' must be >= 1, got 0"),  # the preset's horizon: no bare ValueError
        (["algo.name=grpo", "env.max_turns=six"], "'env.max_turns' must be an int"),
        (["optim.lr=0"], "'optim.lr' must be > 0"),
        (["optim.lr=.inf"], "'optim.lr' must be > 0 and finite, got inf"),
        (["sft.optim.weight_decay=.inf"], "'sft.optim.weight_decay' must be >= 0 and finite"),
        (["algo.loss.kl_coef=.inf"], "'algo.loss'.*kl_coef must be >= 0 and finite"),
        (["algo.loss.entropy_coef=.inf"], "'algo.loss'.*entropy_coef must be >= 0 and finite"),
        (["sft.optim.min_lr_ratio=2"], "'sft.optim.min_lr_ratio'"),
        (["sft.eval_fraction=1.0"], "'sft.eval_fraction'"),
        (["sft.teacher_style=terse"], "'sft.teacher_style' must be one of"),
        (["checkpoint.keep_last=-1"], "'checkpoint.keep_last'"),
        (["model.tiny_hidden_size=100"], "'model.tiny_hidden_size' must be a positive multiple of 64"),
        (["model.tiny_layers=0"], "'model.tiny_layers' must be >= 1"),
        (["train"], "must look like"),
        (["train=3"], "'train' must be a mapping"),
    ],
)
def test_bad_configs_are_rejected_with_the_key(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, [*TINY, *overrides])


def test_model_path_required() -> None:
    with pytest.raises(ConfigError, match=r"model\.path"):
        load_config(None, [])
    assert load_config(None, ["model.path=/some/ckpt"]).model.path == "/some/ckpt"


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_parse_overrides_nests_and_parses_scalars() -> None:
    tree = parse_overrides(["a.b.c=1", "a.b.d=x", "e=true", "f=0.5", "g="])
    assert tree == {"a": {"b": {"c": 1, "d": "x"}}, "e": True, "f": 0.5, "g": ""}


def test_exponent_floats_without_dot(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-6\n")
    assert load_config(path, TINY).optim.lr == 1e-6
    assert load_config(None, [*TINY, "optim.lr=3e-4"]).optim.lr == 3e-4
    with pytest.raises(ConfigError, match=r"'optim\.lr' must be a number"):
        load_config(None, [*TINY, "optim.lr=fast"])


def test_save_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, "algo.name=userrl", "algo.shaping.gamma=0.9", "optim.schedule=cosine"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


SHIPPED = sorted(p.name for p in resources.files("bao_fast.configs").iterdir() if p.name.endswith(".yaml"))


def shipped(name: str) -> Path:
    return Path(str(resources.files("bao_fast.configs").joinpath(name)))


def test_every_config_is_shipped() -> None:
    assert {"demo-cpu.yaml", "functiongym-qwen3-4b-bao.yaml", "telepathy-qwen3-4b-bao.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name: str) -> None:
    overrides = [] if name.startswith("demo") else ["model.path=/ckpt/Qwen3-4B"]
    cfg = load_config(shipped(name), overrides)
    assert cfg.algo.name == "bao" and cfg.algo.shaping == preset("bao", horizon=cfg.env.max_turns)
    if name.startswith("demo"):
        assert cfg.model.tiny and cfg.sft.enabled and cfg.env.name == "function"
    else:
        assert cfg.rollout.group_size == 8 and cfg.rollout.prompts_per_step == 128 and cfg.optim.lr == 1e-6
        assert cfg.algo.shaping.info_seeking_coef == 0.005 and cfg.algo.shaping.overthinking_coef == 0.05


@pytest.mark.parametrize(
    ("gym", "overrides", "turns"),
    [("telepathy", [], 12), ("turtle", ["env.num_train_tasks=9", "env.num_eval_tasks=3"], 15),
     ("intention", ["env.num_train_tasks=8", "env.num_eval_tasks=2"], 10)],
)
def test_llm_gym_config_runs_the_gyms_it_names(gym: str, overrides: list[str], turns: int) -> None:
    """What the telepathy config's header says: each LLM-user gym with its own budget T and the built-in tasks
    at the counts given, on 8 ranks, refused without the user simulator's address."""
    overrides = ["model.path=/ckpt/Qwen3-4B", f"env.name={gym}", *overrides]
    cfg = load_config(shipped("telepathy-qwen3-4b-bao.yaml"), overrides)
    assert cfg.env.max_turns == cfg.algo.shaping.horizon == turns
    assert len(config_tasks(cfg, "train", cfg.env.num_train_tasks, "env.num_train_tasks")) == cfg.env.num_train_tasks
    num_eval = min(cfg.env.num_eval_tasks, cfg.eval.num_tasks)
    assert len(config_tasks(cfg, "test", num_eval, "env.num_eval_tasks")) == num_eval == cfg.env.num_eval_tasks
    check_world_size(cfg, 8)
    with pytest.raises(ConfigError, match=r"config key 'env\.user_base_url'"):
        check_servers(cfg, "train")


def test_a_key_a_resumed_run_lacks_counts_as_its_default() -> None:
    """A run started by a version without ``optim.loss_scale`` resumes under the default, not another value."""
    cfg = load_config(None, ["model.tiny=true"])
    saved = json_safe(config_to_dict(cfg))
    del saved["optim"]["loss_scale"]
    assert resume_conflicts(saved, cfg) == []
    changed = load_config(None, ["model.tiny=true", "optim.loss_scale=dynamic"])
    assert resume_conflicts(saved, changed) == [("optim.loss_scale", "auto", "dynamic")]
