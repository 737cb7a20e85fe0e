"""``rl_step`` wiring: the advantages that reach the policy update are BAO's shaped advantages of the step's
rollouts (turn rewards and answer flags in trajectory order, prompt groups, row-aligned to the token each row
predicts), derived here independently from the fp64 reference over token-aligned turn ids."""

from __future__ import annotations

import itertools
import time
from types import SimpleNamespace

import pytest
import torch

from bao_fast.config import load_config
from bao_fast.data.segments import pack_segments
from bao_fast.ops.reference import shaped_advantages_reference
from bao_fast.rollout import Trajectory
from bao_fast.rollout.tp_group import TPGroup
from bao_fast.train import rl

pytestmark = pytest.mark.usefixtures("single_rank_world")

# (group, per-turn (reward, is_answer), assistant tokens per turn): different turn counts, rewards and answer
# patterns, so every turn of a group has its own advantage and a one-row shift changes them.
EPISODES = [
    (0, [(0.0, False), (0.0, True), (1.0, True)], [3, 2, 4]),
    (0, [(0.0, True), (0.0, True)], [2, 5]),
    (1, [(0.0, False), (0.5, True)], [4, 3]),
    (1, [(0.0, True), (0.0, False), (0.0, True), (0.0, True)], [2, 2, 3, 2]),
]


def _trajectories(episodes=EPISODES) -> list[Trajectory]:
    out, token = [], 10
    for k, (group, turns, lengths) in enumerate(episodes):
        segments: list[tuple[str, list[int]]] = [("user", [5, 6, 7, 8])]
        for n in lengths:
            segments += [("assistant", list(range(token, token + n))), ("user", [9, 9])]
            token += n
        out.append(Trajectory(f"task{group}", group, k, segments[:-1], ["answer" if a else "ask" for _, a in turns],
                              [r for r, _ in turns], [a for _, a in turns], end_reason="max_turns"))
    return out


def _run_step(monkeypatch: pytest.MonkeyPatch, overrides: list[str], trajectories: list[Trajectory]) -> dict:
    """One ``rl_step`` on ``trajectories`` as its rollouts; its config and what the rollout and the policy update
    were given."""
    cfg = load_config(None, ["model.tiny=true", "algo.name=bao", "rollout.prompts_per_step=2",
                             "rollout.group_size=2", "train.mini_batch_size=2", "env.max_turns=4", *overrides])
    captured: dict = {"cfg": cfg}

    def rollout(*args, return_logprobs: bool, **kwargs) -> list[Trajectory]:
        captured["return_logprobs"] = return_logprobs
        return trajectories

    def update(s, state, batch, cuts, old_logp, advantages, ref_logp, keep):
        captured.update(batch=batch, old_logp=old_logp.clone(), advantages=advantages.clone(), keep=keep)
        return {}

    monkeypatch.setattr(rl, "sync_engine", lambda s: None)
    monkeypatch.setattr(rl, "rollout", rollout)
    monkeypatch.setattr(rl, "forward_logprobs", lambda policy, batch, *a, **k: torch.zeros(batch.num_tokens))
    monkeypatch.setattr(rl, "policy_update", update)
    s = SimpleNamespace(cfg=cfg, env=SimpleNamespace(device=torch.device("cpu")), policy=None, ref_policy=None,
                        engine=SimpleNamespace(sleep=lambda: None), tp_group=TPGroup(1, 0, 1, 0), train_tasks=[0, 1])
    state = SimpleNamespace(step=0, sampler=SimpleNamespace(next=lambda n: list(range(n))))
    captured["metrics"] = rl.rl_step(s, state)
    return captured


def test_update_gets_the_shaped_advantages_of_the_rollouts(monkeypatch: pytest.MonkeyPatch) -> None:
    trajectories = _trajectories()
    captured = _run_step(monkeypatch, [], trajectories)
    cfg = captured["cfg"]
    assert captured["return_logprobs"] is False  # recomputed old log-probs: the engine's are not needed

    batch = pack_segments([t.segments for t in trajectories])
    per_token = shaped_advantages_reference(
        torch.tensor([r for t in trajectories for r in t.turn_rewards]),
        torch.tensor([a for t in trajectories for a in t.turn_is_answer]),
        batch.turn_offsets, torch.tensor([t.group_id for t in trajectories]), batch.turn_ids, cfg.algo.shaping,
    ).token_advantages  # token j's advantage
    expected = torch.zeros(batch.num_tokens, dtype=torch.float64)
    for start, stop in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist(), strict=True):
        expected[start : stop - 1] = per_token[start + 1 : stop]  # row t scores token t + 1 of its trajectory
    assert expected.abs().gt(0).sum() > 20 and (expected > 0).any() and (expected < 0).any()
    torch.testing.assert_close(captured["advantages"].double(), expected, rtol=1e-5, atol=1e-6)
    signal = [bool(expected[a:b].any()) for a, b in itertools.pairwise(batch.cu_seqlens.tolist())]
    assert captured["keep"] == signal
    assert captured["metrics"]["advantage_abs_max"] == pytest.approx(float(expected.abs().max()), rel=1e-5)
    assert captured["metrics"]["advantage_abs_mean"] == pytest.approx(
        float(expected.abs().sum() / batch.target_mask.sum()), rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_phase_clock_waits_for_the_gpu_and_the_peak_is_per_step() -> None:
    device = torch.device("cuda")
    torch.cuda.synchronize(device)
    t0 = rl.phase_clock(device)
    torch.cuda._sleep(100_000_000)  # tens of ms of GPU time, queued in microseconds
    queued = time.perf_counter() - t0
    assert rl.phase_clock(device) - t0 > max(0.01, 10 * queued)
    env = SimpleNamespace(device=device)
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    del big
    assert rl.peak_memory_gb(env) >= 0.25
    rl.reset_peak_memory(env)
    assert rl.peak_memory_gb(env) < 0.25


def _with_engine_logprobs(trajectories: list[Trajectory]) -> list[Trajectory]:
    """``trajectories`` whose engine log-prob of assistant token id ``k`` is ``-k / 100`` (all distinct)."""
    for t in trajectories:
        t.engine_logprobs = [-tok / 100 for role, ids in t.segments if role == "assistant" for tok in ids]
    return trajectories


def test_engine_old_logprobs_reach_the_update_row_aligned(monkeypatch: pytest.MonkeyPatch) -> None:
    trajectories = _with_engine_logprobs(_trajectories())
    captured = _run_step(monkeypatch, ["rollout.old_logprobs=engine"], trajectories)
    assert captured["return_logprobs"] is True
    batch, old_logp = captured["batch"], captured["old_logp"]
    expected = torch.zeros(batch.num_tokens)
    rows = batch.target_rows.tolist()
    expected[rows] = -batch.input_ids[[r + 1 for r in rows]].float() / 100  # row r scores token r + 1
    assert len(rows) == sum(n for _, _, lengths in EPISODES for n in lengths)
    torch.testing.assert_close(old_logp, expected, rtol=0, atol=1e-7)


def test_engine_old_logprobs_must_cover_every_assistant_token(monkeypatch: pytest.MonkeyPatch) -> None:
    trajectories = _with_engine_logprobs(_trajectories())
    trajectories[2].engine_logprobs.pop()
    with pytest.raises(ValueError, match="engine log-probs for every assistant token"):
        _run_step(monkeypatch, ["rollout.old_logprobs=engine"], trajectories)


def test_a_group_of_equal_scores_is_left_out_of_the_update(monkeypatch: pytest.MonkeyPatch) -> None:
    """Group 1's two episodes score alike: no advantage, so the update is told to leave them out."""
    same = (1, [(0.0, False), (1.0, True)], [4, 3])
    captured = _run_step(monkeypatch, [], _trajectories([*EPISODES[:2], same, same]))
    assert captured["keep"] == [True, True, False, False]
    assert captured["metrics"]["advantage_abs_max"] > 0
