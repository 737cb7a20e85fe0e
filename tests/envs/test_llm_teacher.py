"""LLM teacher against a scripted stub server: trajectory bookkeeping, the behaviour instructions (in the
teacher's view only), reasoning reassembly, context-limit endings and gym wiring."""

from __future__ import annotations

import pytest

from bao_fast.envs import make_teacher
from bao_fast.envs.base import format_tool_call
from bao_fast.envs.function import FunctionGym, generate_tasks
from bao_fast.envs.llm_gyms import TelepathyGym, TelepathyTask
from bao_fast.envs.teachers.llm_teacher import TEACHER_INSTRUCTIONS, LLMTeacher
from bao_fast.envs.user_client import UserSimulatorClient, UserSimulatorError

TASK = TelepathyTask("t1", "owl", "animal")
OVERFLOW = "This model's maximum context length is 1024 tokens. However, you requested 1100 tokens."


def _teacher_script(stub, teacher_replies, user_reply="Yes"):
    """Teacher requests (their system prompt carries the instructions) get ``teacher_replies`` in order;
    user-simulator and judge requests get ``user_reply``."""
    queue = list(teacher_replies)

    def handler(body):
        if TEACHER_INSTRUCTIONS in body["messages"][0]["content"]:
            return queue.pop(0)
        return stub.completion(user_reply)

    stub.handler = handler


def _teacher_requests(stub):
    return [r for r in stub.requests if TEACHER_INSTRUCTIONS in r["messages"][0]["content"]]


def test_plays_a_telepathy_episode(openai_stub):
    ask = format_tool_call("action", "Can it fly?")
    thought = "Known: an animal. Plan: 11 turns left, ask about flight."
    _teacher_script(openai_stub, [
        openai_stub.completion(ask, reasoning=thought),
        openai_stub.completion(f"<think>It flies. Plan: guess owl.</think>\n{format_tool_call('answer', 'owl')}"),
    ])  # fmt: skip
    client = UserSimulatorClient(openai_stub.url, "teacher")
    teacher = LLMTeacher.for_gym(TelepathyGym, client, max_tokens=50, temperature=0.5)
    episode = teacher.play(TASK, seed=3)
    assert episode.success and episode.num_turns == 2
    messages = episode.messages
    assert [m["role"] for m in messages] == ["system", "user"] + ["assistant", "user"] * 2
    assert TEACHER_INSTRUCTIONS not in messages[0]["content"]  # the trajectory keeps the gym's own prompt
    assert messages[2]["content"] == f"<think>\n{thought}\n</think>\n{ask}"
    assert messages[3]["content"].startswith("Yes.") and messages[5]["content"].startswith("Yes! I was thinking of owl")
    first, second = _teacher_requests(openai_stub)
    assert first["messages"][0]["content"].endswith(TEACHER_INSTRUCTIONS)
    assert second["messages"][1:] == messages[1:4]  # the teacher saw its own turn and the feedback
    assert (first["max_tokens"], first["temperature"], first["seed"], second["seed"]) == (50, 0.5, 3000, 3001)


def test_turn_without_tool_call_ends_the_episode(openai_stub):
    _teacher_script(openai_stub, [openai_stub.completion("I am not sure what to do.")])
    teacher = LLMTeacher(UserSimulatorClient(openai_stub.url, "t"), lambda: FunctionGym(max_turns=5))
    episode = teacher.play(generate_tasks(1, 1, seed=0)[0])
    assert episode.num_turns == 1 and not episode.success
    assert episode.messages[-1]["content"].startswith("Invalid tool call")


def test_context_limit_ends_the_episode(openai_stub):
    search = format_tool_call("search", "test")
    _teacher_script(openai_stub, [openai_stub.completion(search),
                                  openai_stub.Reply(400, {"error": {"message": OVERFLOW}})])  # fmt: skip
    teacher = LLMTeacher.for_gym(FunctionGym, UserSimulatorClient(openai_stub.url, "t"), gym_kwargs={"max_turns": 5})
    episode = teacher.play(generate_tasks(1, 1, seed=0)[0])
    assert episode.num_turns == 1 and len(episode.messages) == 4 and not episode.success


def test_errors_propagate(openai_stub):
    client = UserSimulatorClient(openai_stub.url, "t", max_retries=0)
    teacher = LLMTeacher(client, lambda: FunctionGym())
    task = generate_tasks(1, 1, seed=0)[0]
    _teacher_script(openai_stub, [openai_stub.Reply(400, {"error": {"message": OVERFLOW}})])
    with pytest.raises(UserSimulatorError, match="maximum context length"):  # the prompt alone never fits
        teacher.play(task)
    _teacher_script(openai_stub, [openai_stub.Reply(401, {"error": "no key"})])
    with pytest.raises(UserSimulatorError, match="401"):
        teacher.solve(task)


def test_wiring_and_validation(openai_stub):
    client = UserSimulatorClient(openai_stub.url, "teacher")
    user = UserSimulatorClient(openai_stub.url, "user")
    teacher = make_teacher("telepathy", client=client, user_client=user, gym_kwargs={"max_turns": 4})
    gym = teacher.gym_factory()
    assert isinstance(teacher, LLMTeacher) and isinstance(gym, TelepathyGym)
    assert gym.client is user and gym.max_turns == 4
    assert make_teacher("intention", client=client).gym_factory().client is client
    with pytest.raises(TypeError, match="client"):
        LLMTeacher("http://x", FunctionGym)
    with pytest.raises(TypeError, match="gym_factory"):
        LLMTeacher(client, FunctionGym())
    with pytest.raises(ValueError, match="max_tokens"):
        LLMTeacher(client, FunctionGym, max_tokens=0)
