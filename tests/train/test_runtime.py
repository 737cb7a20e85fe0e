"""The tiny initial model follows the ``model.tiny_*`` config keys; the config's tasks, or an error naming the key."""

from __future__ import annotations

import pytest

from bao_fast.config import ConfigError, load_config
from bao_fast.envs import make_tasks
from bao_fast.train.runtime import config_tasks, tiny_spec


def test_tiny_spec_follows_config() -> None:
    cfg = load_config(None, ["model.tiny=true", "model.tiny_hidden_size=256", "model.tiny_layers=3"])
    spec = tiny_spec(cfg.model)
    assert (spec.hidden_size, spec.num_hidden_layers) == (256, 3)
    assert spec.num_attention_heads * spec.head_dim == 256  # head_dim 64, as vLLM's CPU attention requires
    assert spec.num_attention_heads % spec.num_key_value_heads == 0
    assert spec.intermediate_size == 512
    default = tiny_spec(load_config(None, ["model.tiny=true"]).model)
    assert (default.hidden_size, default.num_hidden_layers, default.num_attention_heads) == (128, 2, 2)


def test_config_tasks_names_the_count_key_the_gym_cannot_supply() -> None:
    cfg = load_config(None, ["model.tiny=true", "env.name=telepathy", "env.num_train_tasks=460"])
    with pytest.raises(ConfigError, match=r"'env\.num_train_tasks' \(460 train tasks of the 'telepathy' gym from its "
                                          r"built-in tasks\): n must be an int in 0\.\.24"):
        config_tasks(cfg, "train", cfg.env.num_train_tasks, "env.num_train_tasks")
    tasks = config_tasks(cfg, "test", 8, "env.num_eval_tasks")
    assert len(tasks) == 8 and tasks == make_tasks("telepathy", split="test", n=8, seed=cfg.env.seed)
