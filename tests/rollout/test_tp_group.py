"""``TPGroup`` and ``run_episodes(tp_group=...)`` on 4 gloo ranks in groups of 2 (``_tp_group_worker.py``): the
leader alone runs what ``from_leader`` is given and its result or exception reaches the group; the ranks of a
group play identical episodes though only the leader steps the gyms (whose feedback names the stepping rank)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bao_fast.config import ConfigError, load_config
from bao_fast.rollout.tp_group import check_tp_size

WORKER = Path(__file__).with_name("_tp_group_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("tp-group")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    proc = subprocess.run([*cmd, str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]


def test_groups_are_consecutive_ranks_and_shares_match_rank_shares(ranks) -> None:
    assert [r["group"] for r in ranks] == [
        [2, 0, 2, 0, True, 0], [2, 0, 2, 1, False, 0], [2, 1, 2, 0, True, 2], [2, 1, 2, 1, False, 2],
    ]
    assert [r["shares"] for r in ranks] == [
        [[0, 1, 2, 3], [0, 1]], [[0, 1, 2, 3], [2, 3]], [[4, 5, 6, 7], [0, 1]], [[4, 5, 6, 7], [2, 3]],
    ]
    assert all(r["bad_tp"]["error"] == "ConfigError" for r in ranks)
    assert "'rollout.tensor_parallel_size' (3) must divide the world size (4)" in ranks[0]["bad_tp"]["message"]


def test_from_leader_runs_once_and_shares_results_and_errors(ranks) -> None:
    assert [r["value"] for r in ranks] == [0, 0, 2, 2]
    assert [r["called"] for r in ranks] == [[0], [], [2], []]
    for r in ranks:
        assert r["user_error"]["error"] == "UserSimulatorError" and r["user_error"]["status"] == 503
        assert r["unpicklable_result"]["error"] == "TypeError"
        assert "does not pickle" in r["unpicklable_result"]["message"]
        assert r["same"] == {"value": None}
        assert r["different"]["error"] == "RuntimeError" and "tensor-parallel group" in r["different"]["message"]
    assert ranks[0]["user_error"]["notes"] == []
    assert ranks[1]["user_error"]["notes"] == ["raised on rank 0, the leader of this rank's tensor-parallel group"]
    assert ranks[0]["unpicklable_error"]["error"] == "Unpicklable"  # the leader raises the original
    assert ranks[1]["unpicklable_error"] == {"error": "RuntimeError", "message": "Unpicklable: odd", "status": None,
                                             "notes": ["raised on rank 0, the leader of this rank's tensor-parallel "
                                                       "group"]}


def test_a_group_plays_identical_episodes_stepped_by_its_leader(ranks) -> None:
    for leader, follower in (ranks[0:2], ranks[2:4]):
        assert leader["prompts"] == follower["prompts"] and len(leader["prompts"]) == 3
        assert leader["trajectories"] == follower["trajectories"]
        assert leader["gym_steps"] > 0 and follower["gym_steps"] == 0
    assert ranks[0]["trajectories"] != ranks[2]["trajectories"]  # other tasks
    (_, _, choices, reason, messages) = ranks[1]["trajectories"][0]
    assert reason == "max_turns" and choices == ["action"] * 3 and messages[2]["content"] == "rank 0 turn 1"
    assert ranks[3]["trajectories"][0][4][2]["content"] == "rank 2 turn 1"
    bug = [t for t in ranks[1]["trajectories"] if t[0] == "1"]  # task "bug": the gym raised on turn 2
    assert len(bug) == 2 and all(t[2] == ["action", "invalid"] and t[3] == "gym_error" for t in bug)


def test_a_diverging_rank_or_a_failing_gym_factory_fails_the_whole_group_at_once(ranks) -> None:
    """Both fail in the round they happen on every rank of the group (they used to hang the group)."""
    for r in ranks:
        assert r["diverged"]["error"] == "RuntimeError" and "rolled out different episodes" in r["diverged"]["message"]
        assert r["factory_error"]["error"] == "ValueError" and r["factory_error"]["message"] == "the gym factory failed"
    assert ranks[0]["factory_error"]["notes"] == [] and ranks[1]["factory_error"]["notes"] == [
        "raised on rank 0, the leader of this rank's tensor-parallel group"]


@pytest.mark.parametrize(("overrides", "match"), [
    (["rollout.tensor_parallel_size=0"], "'rollout.tensor_parallel_size' must be >= 1"),
    (["rollout.tensor_parallel_size=2", "rollout.engine=hf"], "'rollout.tensor_parallel_size' must be 1 with"),
])
def test_config_rejects_bad_tensor_parallel_sizes(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.tiny=true", *overrides])
    assert load_config(None, ["model.tiny=true", "rollout.tensor_parallel_size=4"]).rollout.tensor_parallel_size == 4


def test_tensor_parallel_size_must_divide_the_world_size() -> None:
    check_tp_size(2, 4)
    with pytest.raises(ConfigError, match=r"'rollout.tensor_parallel_size' \(2\) must divide the world size \(1\)"):
        check_tp_size(2, 1)


def test_checked_from_leader_checks_and_shares_in_one_gather(ranks) -> None:
    assert [r["checked"] for r in ranks] == [{"value": 0}, {"value": 0}, {"value": 2}, {"value": 2}]
    for r in ranks:
        assert r["checked_different"]["error"] == "RuntimeError"
        assert "rolled out different episodes" in r["checked_different"]["message"]
        assert r["checked_error"]["error"] == "UserSimulatorError"


def test_a_group_streams_the_episodes_of_its_rounds_in_lockstep(ranks) -> None:
    """Continuous scheduling on the group's shared streaming engine: every rank adds the same requests in the
    same order, and the episodes are those the rounds gave; a rank whose engine diverges fails the whole group
    at once (it would desynchronise, then hang, the collectives)."""
    for leader, follower in (ranks[0:2], ranks[2:4]):
        assert leader["streamed_requests"] == follower["streamed_requests"] and leader["streamed_requests"]
        assert leader["streamed"] == follower["streamed"] == leader["trajectories"]
    for r in ranks[:2]:  # rank 1's engine diverges: its group fails; the other group plays on
        assert r["stream_diverged"]["error"] == "RuntimeError"
        assert "rolled out different episodes" in r["stream_diverged"]["message"]
    assert ranks[2]["stream_diverged"] == ranks[3]["stream_diverged"] == {"value": 4}
