"""The RL loop's evaluation decodes as ``eval.*`` says (greedy, or sampled at ``eval.temperature``) and reports
Pass@U up to ``eval.max_k``; rollouts map a temperature to the engine's generation parameters."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from bao_fast.config import load_config
from bao_fast.rollout import TPGroup
from bao_fast.train import rl

pytestmark = pytest.mark.usefixtures("single_rank_world")


def fake_setup(overrides: list[str]) -> SimpleNamespace:
    cfg = load_config(None, ["model.tiny=true", "eval.num_tasks=3", *overrides])
    return SimpleNamespace(cfg=cfg, env=SimpleNamespace(rank=0, world_size=1), eval_tasks=["t0", "t1", "t2"],
                           engine=SimpleNamespace(sleep=lambda: None), tp_group=TPGroup.create(1))


@pytest.mark.parametrize(("overrides", "temperature"), [
    (["eval.greedy=true", "eval.temperature=0.6"], 0.0),
    (["eval.greedy=false", "eval.temperature=0.6", "rollout.temperature=1.2"], 0.6),
])
def test_evaluation_decodes_and_reports_as_configured(monkeypatch, overrides: list[str], temperature: float):
    calls: list[dict[str, Any]] = []

    def fake_rollout(s, tasks, task_ids, seed, group_size, *, temperature, return_logprobs, gym_seed_base):
        calls.append({"tasks": tasks, "temperature": temperature, "return_logprobs": return_logprobs})
        return [SimpleNamespace(turn_choices=["answer"] * 11, turn_rewards=[0.0] * 10 + [1.0], success=True)
                for _ in tasks]  # solved with the 11th answer

    monkeypatch.setattr(rl, "sync_engine", lambda s: None)
    monkeypatch.setattr(rl, "rollout", fake_rollout)
    summary = rl.evaluate(fake_setup([*overrides, "eval.max_k=11"]), step=4)
    assert calls == [{"tasks": ["t0", "t1", "t2"], "temperature": temperature, "return_logprobs": False}]
    assert summary["step"] == 4 and list(summary["pass_at_u"]) == list(range(1, 12))
    assert summary["pass_at_u"][10] == 0.0 and summary["pass_at_u"][11] == 1.0


@pytest.mark.parametrize(("temperature", "top_p", "return_logprobs"), [(0.0, 1.0, False), (0.7, 0.9, True)])
def test_rollout_maps_its_arguments_to_generation_params(monkeypatch, temperature, top_p, return_logprobs):
    seen = {}
    monkeypatch.setattr(rl, "run_episodes", lambda *args, params, **kwargs: seen.update(params=params, **kwargs))
    s = fake_setup(["rollout.top_p=0.9", "rollout.scheduling=rounds"])
    s.tokenizer, s.gym_factory = SimpleNamespace(eos_token_id=2), None
    rl.rollout(s, ["t0"], [0], 5, 1, temperature=temperature, return_logprobs=return_logprobs)
    params = seen["params"]
    assert (params.temperature, params.top_p, params.seed, params.stop_token_ids, params.return_logprobs) == (
        temperature, top_p, 5, (2,), return_logprobs)
    assert seen["scheduling"] == "rounds"
