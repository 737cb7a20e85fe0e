"""``bao-fast eval``: the tiny model through the transformers engine, and an OpenAI-compatible endpoint
played by a stdlib stub server with a scripted agent (so the metrics of the episodes are known exactly)."""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bao_fast.cli import UsageError
from bao_fast.config import ConfigError, load_config
from bao_fast.envs import FunctionGym, FunctionTask, Outcome, ToolCall
from bao_fast.envs.user_client import ChatCompletion, UserSimulatorClient, UserSimulatorError
from bao_fast.eval import evaluate
from bao_fast.eval.evaluate import evaluate_endpoint, repeated_seeds_warning, write_eval
from bao_fast.eval.metrics import summarize
from bao_fast.models import create_tiny_model
from bao_fast.rollout import Trajectory


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return parser.parse_args(argv)


def _cli(argv: list[str]) -> int:
    """``bao-fast eval ARGV`` through the module's own parser (the dispatcher is tested in tests/test_cli.py)."""
    return evaluate.run(_args(argv))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny"))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_cli_on_tiny_model_with_hf_engine(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    args = [
        "--checkpoint",
        str(tiny_model),
        "--engine",
        "hf",
        "--num-tasks",
        "3",
        "--seeds",
        "2",
        "--out",
        str(out),
        "--label",
        "tiny",
        "env.max_turns=2",
        "rollout.max_turn_tokens=6",
        "rollout.max_model_len=4096",  # the tiny model's context
        "eval.max_k=4",
    ]
    assert _cli(args) == 0
    assert "warning: greedy decoding with 2 seeds" in capsys.readouterr().err
    episodes = _read_jsonl(out / "episodes.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert len(episodes) == 6 and summary["num_episodes"] == 6
    assert [e["seed"] for e in episodes] == [0, 0, 0, 1, 1, 1]  # seed-major
    assert [e["task_id"] for e in episodes[:3]] == [e["task_id"] for e in episodes[3:]]
    for e in episodes:
        assert 1 <= e["turns"] <= 2 and len(e["choices"]) == len(e["rewards"]) == e["turns"]
        assert 1 <= e["generated_tokens"] <= 6 * e["turns"]
        assert e["messages"][0]["role"] == "system" and e["messages"][-1]["role"] in ("assistant", "user")
    # greedy decoding: the second seed replays the first exactly (the Function gym's opening is seed-free)
    assert [e["messages"] for e in episodes[:3]] == [e["messages"] for e in episodes[3:]]
    recomputed = summarize(episodes)
    for key in ("score", "ur", "turns", "choice_counts"):
        assert summary[key] == recomputed[key]
    assert sorted(int(k) for k in summary["pass_at_u"]) == [1, 2, 3, 4]
    assert summary["label"] == "tiny" and summary["decoding"]["greedy"] is True
    assert summary["generated_tokens"] == sum(e["generated_tokens"] for e in episodes)
    assert (out / "summary.md").read_text().startswith("# tiny\n\n6 episodes, gym function, split test, num_tasks 3")


# ----------------------------------------------------------------------------------- endpoint, stub server

# The scripted agent: probe, answer wrong, answer right (the task's rule is a+b+c+d, test case 1 2 3 4).
SCRIPT = ["<think>probe</think>[action] 1 1 1 1", "[answer] 3", "<think>sum</think>[answer] 10"]


class _StubChatServer:
    """``POST /v1/chat/completions`` answering from SCRIPT by the number of assistant turns so far."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        lock = threading.Lock()
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    requests.append(body)
                if self.path != "/v1/chat/completions":
                    self.send_response(404)
                    self.end_headers()
                    return
                turn = sum(m["role"] == "assistant" for m in body["messages"])
                reply = {
                    "choices": [
                        {
                            "message": {"role": "assistant", "content": SCRIPT[turn % len(SCRIPT)]},
                            "finish_reason": "stop",
                        }
                    ]
                }
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _StubChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def stub_server() -> Iterator[_StubChatServer]:
    with _StubChatServer() as server:
        yield server


def test_endpoint_episodes_and_metrics_are_exact(stub_server: _StubChatServer, tmp_path: Path) -> None:
    tasks = [FunctionTask("sum", "a+b+c+d", (1, 2, 3, 4), 10.0), FunctionTask("prod", "a*b*c*d", (1, 2, 3, 4), 24.0)]
    cfg = load_config(None, ["model.path=stub", "eval.num_seeds=3", "env.max_turns=3", "rollout.max_turn_tokens=64"])
    with UserSimulatorClient(stub_server.url, "stub-model", max_concurrency=4) as client:
        trajs = evaluate_endpoint(client, cfg, tasks)
    assert len(trajs) == 6 and [t.seed for t in trajs] == [0, 0, 1, 1, 2, 2]
    solved, failed = trajs[0], trajs[1]
    assert solved.turn_choices == ["action", "answer", "answer"] and solved.turn_rewards == [0.0, 0.0, 1.0]
    assert solved.success and solved.end_reason == "correct"
    assert failed.turn_choices == ["action", "answer", "answer"] and not failed.success
    assert failed.end_reason == "max_turns"
    assert solved.messages[-2] == {"role": "assistant", "content": SCRIPT[2]}
    # every request carries the whole conversation so far, greedy settings and the model name
    assert len(stub_server.requests) == 18
    assert all(r["model"] == "stub-model" and r["temperature"] == 0.0 for r in stub_server.requests)
    assert sorted(len(r["messages"]) for r in stub_server.requests) == [2] * 6 + [4] * 6 + [6] * 6

    summary = write_eval(trajs, tmp_path, {"label": "stub"}, max_k=9)
    assert summary["score"] == pytest.approx(0.5) and summary["ur"] == pytest.approx(2 / 3)
    assert summary["pass_at_u"][1] == 0.0 and summary["pass_at_u"][2] == pytest.approx(0.5)
    assert summary["end_reasons"] == {"correct": 3, "max_turns": 3}
    assert summary["score_per_seed"] == {"0": 0.5, "1": 0.5, "2": 0.5}
    lines = _read_jsonl(tmp_path / "episodes.jsonl")
    assert [line["success"] for line in lines] == [True, False] * 3 and lines[0]["generated_tokens"] is None


def test_endpoint_cli_writes_summary(stub_server: _StubChatServer, tmp_path: Path) -> None:
    out = tmp_path / "ep"
    args = [
        "--endpoint",
        stub_server.url,
        "--model",
        "stub-model",
        "--num-tasks",
        "2",
        "--sample",
        "--temperature",
        "0.7",
        "--out",
        str(out),
        "env.max_turns=2",
    ]
    assert _cli(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_episodes"] == 2 and summary["label"] == "stub-model"
    assert summary["decoding"]["temperature"] == 0.7
    assert {r["temperature"] for r in stub_server.requests} == {0.7}
    assert summary["choice_counts"]["action"] == 2 and summary["choice_counts"]["answer"] == 2


def test_endpoint_requires_model_name(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--model"):
        _cli(["--endpoint", "http://127.0.0.1:9", "--out", str(tmp_path)])


# ------------------------------------------------------------------- endpoint episodes that end early

OVERFLOW = "HTTP 400: This model's maximum context length is 8192 tokens. However, you requested 9000 tokens"


class _ScriptedClient(UserSimulatorClient):
    """The agent: replies ``replies[turn]``; a request with more than ``fits`` messages raises ``error``."""

    def __init__(self, replies: list[str], fits: int = 100, error: UserSimulatorError | None = None) -> None:
        super().__init__("http://127.0.0.1:9", "agent", max_concurrency=2)
        self.replies, self.fits, self.error = replies, fits, error

    def complete(self, messages: Any, **kwargs: Any) -> ChatCompletion:
        if len(messages) > self.fits:
            assert self.error is not None
            raise self.error
        return ChatCompletion(self.replies[sum(m["role"] == "assistant" for m in messages)], None, "stop")


class _BuggyGym(FunctionGym):
    """A Function gym with a bug that the answer ``boom`` triggers (or a user simulator that is down)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(max_turns=4)
        self.error = error

    def _act(self, call: ToolCall) -> Outcome:
        if call.content == "boom":
            raise self.error
        return super()._act(call)


TASKS = [FunctionTask("sum", "a+b+c+d", (1, 2, 3, 4), 10.0), FunctionTask("prod", "a*b*c*d", (1, 2, 3, 4), 24.0)]
ENDPOINT_CFG = ["model.path=stub", "env.max_turns=4", "rollout.max_turn_tokens=64"]


def test_endpoint_context_overflow_ends_only_that_episode(tmp_path: Path) -> None:
    cfg = load_config(None, ENDPOINT_CFG)
    client = _ScriptedClient(["[action] 1 1 1 1", "[answer] 3"], fits=4, error=UserSimulatorError(OVERFLOW, 400))
    trajs = evaluate_endpoint(client, cfg, TASKS)  # the third request (6 messages) overflows
    for traj in trajs:
        assert traj.end_reason == "context_limit" and traj.turn_choices == ["action", "answer"]
        assert traj.turn_rewards == [0.0, 0.0] and [m["role"] for m in traj.messages[-2:]] == ["assistant", "user"]
    assert write_eval(trajs, tmp_path, {"label": "x"}, max_k=2)["end_reasons"] == {"context_limit": 2}
    opening = _ScriptedClient(["[answer] 3"], fits=1, error=UserSimulatorError(OVERFLOW, 400))
    with pytest.raises(ValueError, match=r"task sum: the opening prompt plus rollout\.max_turn_tokens=64"):
        evaluate_endpoint(opening, cfg, TASKS)


def test_endpoint_server_failure_still_raises() -> None:
    down = UserSimulatorError("http://127.0.0.1:9/v1/chat/completions failed: ConnectError", None)
    client = _ScriptedClient(["[action] 1 1 1 1", "[answer] 3"], fits=2, error=down)
    with pytest.raises(UserSimulatorError, match="ConnectError") as info:
        evaluate_endpoint(client, load_config(None, ENDPOINT_CFG), TASKS)
    assert info.value.__notes__ == [
        "raised by the agent endpoint being evaluated (--endpoint / --model), not by a user simulator"
    ]


def test_endpoint_gym_error_ends_only_that_episode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(evaluate, "gym_factory", lambda cfg: lambda: _BuggyGym(ZeroDivisionError("bug")))
    cfg = load_config(None, ENDPOINT_CFG)
    trajs = evaluate_endpoint(_ScriptedClient(["[action] 1 1 1 1", "[answer] boom"]), cfg, TASKS)
    for traj in trajs:
        assert traj.end_reason == "gym_error" and traj.turn_choices == ["action", "invalid"]
        assert traj.turn_rewards == [0.0, 0.0] and traj.turn_is_answer == [False, False] and not traj.success
        assert traj.messages[-1] == {"role": "assistant", "content": "[answer] boom"}  # no feedback to it
    assert write_eval(trajs, tmp_path, {"label": "x"}, max_k=2)["end_reasons"] == {"gym_error": 2}
    # a user simulator that is down concerns every episode: the evaluation stops
    monkeypatch.setattr(evaluate, "gym_factory", lambda cfg: lambda: _BuggyGym(UserSimulatorError("down", 503)))
    with pytest.raises(UserSimulatorError, match="down"):
        evaluate_endpoint(_ScriptedClient(["[answer] boom"]), cfg, TASKS)


def test_end_reasons_count_episodes_without_one(tmp_path: Path) -> None:
    trajs = [
        Trajectory("a", 0, 0, turn_choices=["answer"], turn_rewards=[1.0], success=True, end_reason="correct"),
        Trajectory("b", 1, 0, turn_choices=["action"], turn_rewards=[0.0], end_reason=None),
        Trajectory("c", 2, 0, turn_choices=["action"], turn_rewards=[0.0], end_reason=None),
    ]
    summary = write_eval(trajs, tmp_path, {"label": "x"}, max_k=1)
    assert summary["end_reasons"] == {"None": 2, "correct": 1}


# ------------------------------------------------------------------------------- decoding and labels


def test_temperature_without_sample_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--temperature needs --sample"):
        _cli(["--endpoint", "http://127.0.0.1:9", "--model", "m", "--temperature", "0.7", "--out", str(tmp_path)])


@pytest.mark.parametrize(
    ("target", "flag"),
    [
        (["--endpoint", "http://127.0.0.1:9", "--model", "m"], ["--engine", "hf"]),
        (["--checkpoint", "ckpt"], ["--model", "m"]),
    ],
)
def test_flags_of_the_other_target_are_errors(tmp_path: Path, target: list[str], flag: list[str]) -> None:
    """--engine only acts on a checkpoint and --model only on an endpoint: given with the other target they
    would be silently ignored."""
    with pytest.raises(UsageError, match=f"^{flag[0]} "):
        _cli([*target, *flag, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_greedy_decoding_with_several_seeds_warns() -> None:
    def warning(*overrides: str) -> str | None:
        return repeated_seeds_warning(load_config(None, ["model.path=stub", *overrides]))

    assert "3 seeds" in warning("eval.num_seeds=3") and "--sample" in warning("eval.num_seeds=3")
    assert warning("eval.num_seeds=3", "eval.greedy=false") is None and warning("eval.num_seeds=1") is None


def test_default_label_tells_runs_apart(tmp_path: Path) -> None:
    labels = [
        evaluate.default_label(_args(["--checkpoint", str(tmp_path / "runs" / run / "final-model")]))
        for run in ("bao", "grpo")
    ]
    assert labels == ["bao/final-model", "grpo/final-model"]
    assert evaluate.default_label(_args(["--endpoint", "http://x", "--model", "Qwen/Qwen3-8B"])) == "Qwen/Qwen3-8B"


@pytest.mark.parametrize("stage", ["train", "eval"])
def test_llm_user_gym_without_user_server_is_refused_up_front(stage: str) -> None:
    """RL rollouts and evaluation of an LLM-user gym need env.user_base_url even when an LLM teacher is set
    (its server stands in for the user only in SFT): refused before the run starts, not once SFT is done."""
    teacher = ["sft.teacher=llm", "sft.teacher_base_url=http://127.0.0.1:9", "sft.teacher_model=t"]
    cfg = load_config(None, ["model.tiny=true", "env.name=telepathy", *teacher])
    with pytest.raises(ConfigError, match=r"^config key 'env\.user_base_url': the 'telepathy' gym's RL rollouts"):
        evaluate.check_servers(cfg, stage)
    evaluate.check_servers(cfg, "sft")  # the teacher's server is the user: not up yet, warned, not refused


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["env.name=nosuch"], r"^config key 'env\.name': no gym 'nosuch' is registered"),
        (["--num-tasks", "100", "env.name=telepathy", "env.user_base_url=http://127.0.0.1:9", "env.user_model=u"],
         r"^config key 'env\.num_eval_tasks' \(100 test tasks of the 'telepathy' gym\)"),
    ],
)
def test_tasks_the_gym_cannot_supply_are_config_errors(tmp_path: Path, overrides: list[str], message: str) -> None:
    """As for the trainer (bao_fast.train.runtime.config_tasks): the key at fault, not a bare ValueError."""
    with pytest.raises(ConfigError, match=message):
        _cli(["--endpoint", "http://127.0.0.1:9", "--model", "m", "--out", str(tmp_path / "x"), *overrides])
    assert not (tmp_path / "x").exists()


def test_cli_checks_the_served_models_before_playing(openai_stub, tmp_path: Path) -> None:
    """The agent endpoint must serve --model, the user simulator env.user_model; nothing is played otherwise."""
    base = ["--endpoint", openai_stub.url, "--num-tasks", "1", "--out", str(tmp_path / "x")]
    with pytest.raises(UsageError, match=rf"--model: the server at {openai_stub.url} serves \['stub'\], not 'gpt-x'"):
        _cli([*base, "--model", "gpt-x"])
    llm_user = ["env.name=telepathy", f"env.user_base_url={openai_stub.url}", "env.user_model=sim"]
    with pytest.raises(ConfigError, match=r"'env.user_model': the server at .* serves \['stub'\], not 'sim'"):
        _cli([*base, "--model", "stub", *llm_user])
    assert openai_stub.requests == [] and not (tmp_path / "x").exists()
