"""Short RL runs on the CPU: 1 rank with the transformers engine, 2 torchrun ranks with the colocated vLLM
engine; finite metrics, a policy that moves, exact resume after a stop, and SFT through the CLI.

The gym is the one-turn "coin" gym of ``_train_worker.py`` (reward = parity of the reply's length), so a
random tiny model gets non-zero advantages within a few tokens. Resume uses the transformers engine with
seeded sampling (a private generator per call), which makes reruns bit-identical.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bao_fast.train import checkpoint as ck
from bao_fast.train.logging import read_jsonl

from .conftest import run_worker, worker_process

pytestmark = pytest.mark.slow

STEPS = 3
BASE = [
    "model.tiny=true", "env.name=coin", "env.max_turns=1", "env.num_train_tasks=8", "env.num_eval_tasks=4",
    "eval.num_tasks=4", "sft.enabled=false", "rollout.group_size=2", "rollout.prompts_per_step=4",
    "rollout.max_turn_tokens=12", "rollout.max_model_len=256", "rollout.env_workers=1",
    "train.mini_batch_size=2", "train.micro_batch_tokens=128", f"train.steps={STEPS}", "optim.lr=1e-3",
    "checkpoint.save_every=1", "checkpoint.keep_last=1", "logging.progress=false",
]
VOLATILE = ("time", "tokens_per_s", "peak_memory_gb")
DEMO_CONFIG = str(Path(__file__).parents[2] / "configs" / "demo-cpu.yaml")


def train_run(run_dir: Path, overrides: list[str], nproc: int = 1, stop_after: int | None = None) -> dict:
    spec = {"overrides": [*BASE, f"run_dir={run_dir}", *overrides], "stop_after": stop_after}
    out = run_dir.with_suffix(".json")
    run_worker("_train_worker.py", [json.dumps(spec), str(out)], nproc=nproc, timeout=400)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("hf") / "run"
    train_run(run_dir, ["rollout.engine=hf"])
    return run_dir


def check_run(run_dir: Path, result: dict, world_size: int) -> None:
    assert result["world_size"] == world_size
    records = read_jsonl(run_dir / "train.jsonl")
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for r in steps:
        for key, value in r.items():
            if isinstance(value, (int, float)):
                assert math.isfinite(value), (r["step"], key, value)
            assert not isinstance(value, str) or key == "time", (key, value)  # no "nan"/"inf" strings
        assert r["actor/skipped_updates"] == 0
        assert 0.0 <= r["success_rate"] <= 1.0 and r["turns"] == 1.0 and r["gym_error_fraction"] == 0.0
    assert any(r["advantage_abs_mean"] > 0 and r["actor/grad_norm"] > 0 for r in steps)
    assert [e["step"] for e in result["evals"]] == [0, STEPS]
    assert all(e["num_episodes"] == 4 for e in result["evals"])
    # the policy moved, and the export is a loadable HF checkpoint
    init = load_file(run_dir / "init-model" / "model.safetensors")
    final = load_file(run_dir / "final-model" / "model.safetensors")
    assert init.keys() == final.keys()
    assert max((final[k] - init[k]).abs().max().item() for k in init) > 1e-4
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final-model")
    torch.testing.assert_close(model.state_dict()["lm_head.weight"], final["lm_head.weight"])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step-{STEPS:06d}"]


def test_one_rank_hf_engine(hf_run: Path) -> None:
    check_run(hf_run, json.loads(hf_run.with_suffix(".json").read_text()), world_size=1)


def test_two_ranks_vllm_engine(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = train_run(run_dir, ["rollout.engine=vllm", "rollout.cpu_kv_cache_gib=0.25"], nproc=2)
    check_run(run_dir, result, world_size=2)


def test_resume_after_stop_reproduces_the_next_step(hf_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_run(run_dir, ["rollout.engine=hf"], stop_after=STEPS - 1)
    assert (run_dir / "checkpoints" / f"step-{STEPS - 1:06d}").is_dir()
    assert not (run_dir / "final-model").exists()
    # a stale record past the checkpoint (a step that died before saving) must be dropped on resume
    with (run_dir / "train.jsonl").open("a") as f:
        f.write(json.dumps({"step": STEPS, "reward": -1.0}) + "\n")
    train_run(run_dir, ["rollout.engine=hf"])
    resumed = [r for r in read_jsonl(run_dir / "train.jsonl") if "reward" in r]
    straight = [r for r in read_jsonl(hf_run / "train.jsonl") if "reward" in r]
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    def stable(record: dict) -> dict:
        return {k: v for k, v in record.items() if k not in VOLATILE and not k.startswith("time/")}

    assert stable(resumed[-1]) == stable(straight[-1])
    final = load_file(run_dir / "final-model" / "model.safetensors")
    reference = load_file(hf_run / "final-model" / "model.safetensors")
    for key, value in reference.items():
        assert torch.equal(final[key], value), key


def test_run_without_export_leaves_no_earlier_export(hf_run: Path, tmp_path: Path) -> None:
    """checkpoint.export_hf=false: a resumed run that trains further leaves no final-model of an earlier step."""
    run_dir = tmp_path / "run"
    shutil.copytree(hf_run, run_dir)
    train_run(run_dir, ["rollout.engine=hf", f"train.steps={STEPS + 1}", "checkpoint.export_hf=false"])
    assert json.loads((run_dir / "evals.json").read_text())[-1]["step"] == STEPS + 1
    assert not (run_dir / "final-model").exists()


def test_one_rank_run_continues_on_two_ranks(hf_run: Path, tmp_path: Path) -> None:
    """The 1-rank run's last checkpoint resharded onto 2 ranks: one more step from where it ended (its
    records, evals and sampler cursor kept), on both ranks' share of the prompts."""
    run_dir = tmp_path / "run"
    shutil.copytree(hf_run, run_dir)
    spec = {"overrides": [*BASE, f"run_dir={run_dir}", "rollout.engine=hf", f"train.steps={STEPS + 1}"]}
    args = [json.dumps(spec), str(run_dir.with_suffix(".json"))]
    proc = worker_process("_train_worker.py", args, nproc=2, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    checkpoint = run_dir / "checkpoints" / f"step-{STEPS:06d}"
    assert f"resuming RL after step {STEPS} from {checkpoint} (saved by 1 rank, resharded onto 2)" in proc.stderr
    records = [r for r in read_jsonl(run_dir / "train.jsonl") if "reward" in r]
    straight = [r for r in read_jsonl(hf_run / "train.jsonl") if "reward" in r]
    assert records[:STEPS] == straight and records[-1]["step"] == STEPS + 1
    assert math.isfinite(records[-1]["actor/loss"]) and records[-1]["actor/skipped_updates"] == 0
    evals = json.loads((run_dir / "evals.json").read_text())
    assert evals[:-1] == json.loads((hf_run / "evals.json").read_text()) and evals[-1]["step"] == STEPS + 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step-{STEPS + 1:06d}"]
    assert len(ck.saved_ranks(run_dir / "checkpoints" / f"step-{STEPS + 1:06d}")) == 2


def test_resume_false_starts_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_run(run_dir, ["rollout.engine=hf", "train.steps=2", "train.eval_every=0"])
    train_run(run_dir, ["rollout.engine=hf", "train.steps=1", "train.eval_every=0", "checkpoint.resume=false"])
    # the earlier run's step-2 checkpoint would outrank this run's, and its records would mix with this run's
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000001"]
    assert [r["step"] for r in read_jsonl(run_dir / "train.jsonl")] == [0, 1]  # eval of the start, step 1


def test_resume_false_clears_rl_outputs_before_sft(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_run(run_dir, ["rollout.engine=hf", "train.steps=1", "train.eval_every=0"])
    assert (run_dir / "checkpoints").is_dir() and (run_dir / "final-model").is_dir()
    # a new run over the directory dies in SFT (the coin gym has no teacher), before its RL stage starts:
    # a later resume must not find the earlier run's RL checkpoints
    with pytest.raises(pytest.fail.Exception, match="teacher"):
        train_run(run_dir, ["rollout.engine=hf", "sft.enabled=true", "checkpoint.resume=false"])
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "final-model").exists()


def test_sft_cli_trains_on_teacher_episodes(tmp_path: Path) -> None:
    run_dir = tmp_path / "sft"
    cmd = [sys.executable, "-m", "bao_fast.cli", "sft", "--config", DEMO_CONFIG, f"run_dir={run_dir}",
           "sft.num_trajectories=5", "sft.epochs=2", "sft.batch_trajectories=2",
           "sft.eval_fraction=0.2", "sft.micro_batch_tokens=1600", "sft.optim.warmup_steps=2",
           "logging.progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    records = read_jsonl(run_dir / "sft.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(train) == 4 and len(evals) == 2
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 and r["tokens"] > 0 for r in train)
    assert evals[1] < evals[0]  # held-out NLL falls with training
    assert train[0]["lr"] < train[1]["lr"]  # warm-up
    model = AutoModelForCausalLM.from_pretrained(run_dir / "sft-model")
    assert model.config.vocab_size == 2048


def test_bad_override_is_rejected_by_the_cli(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bao_fast.cli", "train", "--config", DEMO_CONFIG,
           f"run_dir={tmp_path}", "train.stpes=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert "unknown config key 'train.stpes' (did you mean 'train.steps'?)" in proc.stderr
