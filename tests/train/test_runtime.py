"""The tiny initial model follows the ``model.tiny_*`` config keys; the config's tasks, or an error naming the key;
the checks a run makes before it writes anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bao_fast.config import ConfigError, load_config, save_config
from bao_fast.envs import TASKS, make_tasks
from bao_fast.models import create_tiny_model
from bao_fast.models.tiny import TINY_SPEC_FILE
from bao_fast.rollout import engine as rollout_engine
from bao_fast.train.runtime import CONFIG_FILE, config_tasks, preflight, start_run, tiny_spec, unshared_run_dir


def test_tiny_spec_follows_config() -> None:
    cfg = load_config(None, ["model.tiny=true", "model.tiny_hidden_size=256", "model.tiny_layers=3"])
    spec = tiny_spec(cfg.model)
    assert (spec.hidden_size, spec.num_hidden_layers) == (256, 3)
    assert spec.num_attention_heads * spec.head_dim == 256  # head_dim 64, as vLLM's CPU attention requires
    assert spec.num_attention_heads % spec.num_key_value_heads == 0
    assert spec.intermediate_size == 512
    default = tiny_spec(load_config(None, ["model.tiny=true"]).model)
    assert (default.hidden_size, default.num_hidden_layers, default.num_attention_heads) == (128, 2, 2)


@pytest.mark.parametrize(("hidden", "kv_heads"), [(64, 1), (320, 5), (384, 3), (448, 7)])
def test_tiny_spec_of_any_valid_width_builds_a_model_that_runs(tmp_path, hidden: int, kv_heads: int) -> None:
    """An odd query-head count (5, 7) cannot share KV heads in pairs: the spec keeps one KV head per head."""
    cfg = load_config(None, ["model.tiny=true", f"model.tiny_hidden_size={hidden}", "model.tiny_layers=1"])
    spec = tiny_spec(cfg.model)
    assert spec.num_key_value_heads == kv_heads
    model = AutoModelForCausalLM.from_pretrained(create_tiny_model(tmp_path / "m", spec=spec))
    logits = model(torch.randint(0, 100, (1, 5))).logits
    assert logits.shape[:2] == (1, 5) and torch.isfinite(logits).all()


def test_preflight_refuses_a_tiny_model_over_another_checkpoint(tmp_path) -> None:
    real = create_tiny_model(tmp_path / "real")
    (real / TINY_SPEC_FILE).unlink()  # now a checkpoint model.tiny did not write
    cfg = load_config(None, ["model.tiny=true", f"model.path={real}", f"run_dir={tmp_path / 'run'}"])
    assert "config key 'model.path'" in preflight(cfg, 1, "train") and "would overwrite it" in preflight(cfg, 1, "sft")
    tiny = load_config(None, ["model.tiny=true", f"model.path={tmp_path / 'tiny'}", f"run_dir={tmp_path / 'run'}"])
    create_tiny_model(tmp_path / "tiny")
    assert preflight(tiny, 1, "train") is None  # a tiny model there is reused or replaced


def test_config_tasks_names_the_key_at_fault(tmp_path, monkeypatch) -> None:
    cfg = load_config(None, ["model.tiny=true", "env.name=telepathy", "env.num_train_tasks=460"])
    with pytest.raises(ConfigError, match=r"'env\.num_train_tasks' \(460 train tasks of the 'telepathy' gym\): "
                                          r"n must be an int in 0\.\.24"):
        config_tasks(cfg, "train", cfg.env.num_train_tasks, "env.num_train_tasks")
    tasks = config_tasks(cfg, "test", 8, "env.num_eval_tasks")
    assert len(tasks) == 8 and tasks == make_tasks("telepathy", split="test", n=8, seed=cfg.env.seed)
    with pytest.raises(ConfigError, match=r"'env\.name': no gym 'guess' is registered"):
        config_tasks(load_config(None, ["model.tiny=true", "env.name=guess"]), "train", 4, "env.num_train_tasks")
    monkeypatch.setitem(TASKS, "guess", lambda split, n, level, seed, path: ["only one"])
    with pytest.raises(ConfigError, match=r"'env\.num_train_tasks': 4 train tasks requested, the 'guess' gym supplied"):
        config_tasks(load_config(None, ["model.tiny=true", "env.name=guess"]), "train", 4, "env.num_train_tasks")
    path = tmp_path / "tasks.json"
    path.write_text('[{"id": "a", "entity": "owl", "category": "animal"}, {"id": "b"')
    bad = load_config(None, ["model.tiny=true", "env.name=telepathy", f"env.tasks_path={path}"])
    with pytest.raises(ConfigError, match=r"'env\.tasks_path': cannot read 'telepathy' tasks .*JSONDecodeError"):
        config_tasks(bad, "train", 1, "env.num_train_tasks")
    path.write_text('[{"id": "a", "entity": "owl", "category": "animal"}]')
    assert [t.entity for t in config_tasks(bad, "train", 1, "env.num_train_tasks")] == ["owl"]
    with pytest.raises(ConfigError, match=r"'env\.num_eval_tasks': 2 test tasks requested, .* holds 0"):
        config_tasks(bad, "test", 2, "env.num_eval_tasks")


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("bogus", "must be one of ["),
        ("flash_attention_2", "needs a CUDA GPU and its flash-attn package"),
        pytest.param("flex_attention", "trains on a CUDA GPU only", marks=pytest.mark.skipif(
            torch.cuda.is_available(), reason="flex attention trains on a GPU")),
    ],
)
def test_preflight_refuses_an_attention_this_machine_cannot_run(tmp_path, name, problem) -> None:
    """Before anything is written (SFT would have played its teacher first, then failed in transformers)."""
    cfg = load_config(None, ["model.tiny=true", f"run_dir={tmp_path}", f"model.attn_implementation={name}"])
    for stage in ("sft", "train"):
        message = preflight(cfg, 1, stage)
        assert message.startswith("config key 'model.attn_implementation': ") and problem in message
    for fine in ("sdpa", "eager"):
        assert preflight(load_config(None, ["model.tiny=true", f"run_dir={tmp_path}",
                                            f"model.attn_implementation={fine}"]), 1, "sft") is None  # fmt: skip


def test_preflight_checks_the_world_size_the_model_and_a_resumed_run_dir(tmp_path) -> None:
    base = ["model.tiny=true", f"run_dir={tmp_path}", "rollout.prompts_per_step=8", "train.mini_batch_size=4"]
    cfg = load_config(None, base)
    assert preflight(cfg, 1, "train") is None
    assert "'train.mini_batch_size' (4 prompts) must divide by the world size (3)" in preflight(cfg, 3, "train")
    assert preflight(cfg, 3, "sft") is None  # SFT has no prompt mini-batches
    tp = load_config(None, [*base, "rollout.tensor_parallel_size=4"])
    assert "'rollout.tensor_parallel_size' (4) must divide the world size (2)" in preflight(tp, 2, "train")
    missing = load_config(None, [*base, "model.tiny=false", f"model.path={tmp_path}/none"])
    assert "'model.path'" in preflight(missing, 1, "train")
    save_config(cfg, tmp_path / CONFIG_FILE)
    other = load_config(None, [*base, "algo.name=grpo", "train.steps=500", "logging.progress=false"])
    assert preflight(other, 1, "train") is None  # nothing to resume yet
    (tmp_path / "checkpoints").mkdir()
    problem = preflight(other, 1, "train")
    assert problem.startswith("config key 'algo.name': run_dir") and "algo.name: 'bao' -> 'grpo'" in problem
    assert "train.steps" not in problem and "logging" not in problem  # a resumed run may change these
    assert preflight(load_config(None, [*base, "train.steps=500"]), 1, "train") is None
    assert preflight(load_config(None, [*base, "rollout.env_workers=2"]), 1, "train") is None  # resources
    tp = preflight(load_config(None, [*base, "rollout.tensor_parallel_size=2"]), 2, "train")  # samples other seeds
    assert tp.startswith("config key 'rollout.tensor_parallel_size': run_dir")
    assert preflight(load_config(None, [*base, "algo.name=grpo", "checkpoint.resume=false"]), 1, "train") is None


def test_preflight_refuses_train_steps_below_the_latest_rl_checkpoint(tmp_path) -> None:
    """Resuming would train nothing and export step 5's model as the result of a 3-step run."""
    base = ["model.tiny=true", f"run_dir={tmp_path}", "rollout.engine=hf"]
    (tmp_path / "checkpoints" / "step-000005").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".tmp-step-000009").mkdir()  # incomplete: not a step the run reached
    problem = preflight(load_config(None, [*base, "train.steps=3"]), 1, "train")
    assert problem == (f"config key 'train.steps' (3): run_dir {str(tmp_path)!r} holds the RL checkpoint "
                       f"{str(tmp_path / 'checkpoints' / 'step-000005')!r} of step 5; resume with train.steps >= 5, "
                       "or start over with checkpoint.resume=false or a new run_dir")
    assert preflight(load_config(None, [*base, "train.steps=5"]), 1, "train") is None  # the export is redone
    assert preflight(load_config(None, [*base, "train.steps=3", "checkpoint.resume=false"]), 1, "train") is None
    assert preflight(load_config(None, [*base, "train.steps=3"]), 1, "sft") is None  # SFT does not read them


EARLIER_OUTPUTS = ("sft-checkpoints/step-000002", "sft-model", "checkpoints/step-000004", "final-model")


def earlier_run(run_dir: Path) -> None:
    """What an earlier run left in ``run_dir``: SFT and RL checkpoints and exports, evals, its SFT data."""
    for name in EARLIER_OUTPUTS:
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "marker").write_text("earlier run")
    (run_dir / "evals.json").write_text("[]")
    (run_dir / "sft-data.jsonl").write_text("{}")


@pytest.mark.usefixtures("single_rank_world")
@pytest.mark.parametrize(("stage", "sft", "kept"), [
    ("train", True, ["sft-data.jsonl"]),
    ("sft", True, ["sft-data.jsonl"]),
    ("train", False, ["sft-checkpoints", "sft-data.jsonl", "sft-model"]),  # sft-model may be the starting model
])
def test_start_run_over_an_earlier_run_clears_its_outputs_before_writing_the_config(
    tmp_path: Path, stage: str, sft: bool, kept: list[str]
) -> None:
    """A run that starts over and is killed before it saves anything leaves no earlier checkpoint that its
    config.yaml would vouch for on a later resume; the SFT data carries its own source check and stays."""
    earlier_run(tmp_path)
    cfg = load_config(None, ["model.tiny=true", f"run_dir={tmp_path}", "rollout.engine=hf", f"sft.enabled={sft}",
                             "checkpoint.resume=false"])
    start_run(cfg, stage)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted([*kept, CONFIG_FILE])
    assert load_config(str(tmp_path / CONFIG_FILE), []) == cfg


@pytest.mark.usefixtures("single_rank_world")
def test_start_run_that_resumes_keeps_the_earlier_outputs(tmp_path: Path) -> None:
    earlier_run(tmp_path)
    start_run(load_config(None, ["model.tiny=true", f"run_dir={tmp_path}", "rollout.engine=hf"]), "train")
    assert all((tmp_path / name / "marker").is_file() for name in EARLIER_OUTPUTS)
    assert (tmp_path / "evals.json").is_file()


def test_preflight_refuses_the_vllm_engine_where_vllm_is_not_installed(tmp_path, monkeypatch) -> None:
    """Found before the policy loads: a GPU machine without vLLM fails in seconds, naming the key and the fix."""
    monkeypatch.setattr(rollout_engine, "find_spec", lambda name: None)
    cfg = load_config(None, ["model.tiny=true", f"run_dir={tmp_path}"])
    problem = preflight(cfg, 1, "train")
    assert problem.startswith("config key 'rollout.engine': vLLM is not installed here") and "engine=hf" in problem
    assert preflight(cfg, 1, "sft") is None  # SFT generates nothing
    hf = load_config(None, ["model.tiny=true", f"run_dir={tmp_path}", "rollout.engine=hf"])
    assert preflight(hf, 1, "train") is None


def test_preflight_checks_the_models_the_servers_serve(openai_stub, tmp_path, caplog) -> None:
    """The stub serves model 'stub': a user simulator or teacher model it does not serve is a config error."""
    user = ["model.tiny=true", f"run_dir={tmp_path}", "env.name=telepathy", "env.num_train_tasks=8",
            "env.num_eval_tasks=4", "eval.num_tasks=4", f"env.user_base_url={openai_stub.url}", "sft.enabled=false"]
    assert preflight(load_config(None, [*user, "env.user_model=stub"]), 1, "train") is None
    problem = preflight(load_config(None, [*user, "env.user_model=Qwen/Qwen3-32B"]), 1, "train")
    assert problem == (
        f"config key 'env.user_model': the server at {openai_stub.url} serves ['stub'], not 'Qwen/Qwen3-32B'"
    )
    teacher = ["model.tiny=true", f"run_dir={tmp_path}", "sft.teacher=llm", f"sft.teacher_base_url={openai_stub.url}",
               "sft.teacher_model=big"]
    assert "config key 'sft.teacher_model': the server at" in preflight(load_config(None, teacher), 1, "sft")
    assert preflight(load_config(None, [*teacher, "sft.enabled=false"]), 1, "train") is None  # no SFT, no teacher
    down = load_config(None, [*user[:6], "env.user_base_url=http://127.0.0.1:9", "env.user_model=m"])
    assert preflight(down, 1, "train") is None  # not up yet: warned, not refused
    assert "could not check that http://127.0.0.1:9 serves 'm'" in caplog.text


def test_a_run_dir_the_ranks_do_not_share_is_refused() -> None:
    assert unshared_run_dir("runs/x", ["ab12", "ab12", "ab12"]) is None
    problem = unshared_run_dir("/scratch/x", ["ab12", None, "ab12", "ffff"])
    assert problem == ("config key 'run_dir': ranks [1, 3] do not see the config.yaml rank 0 wrote in '/scratch/x'; "
                       "run_dir must be on a filesystem that every rank shares")
