"""Telepathy and Intention gyms against a scripted stub server: rules, rewards, what the user/judge LLM is
sent, and robust reading of its replies (the real-server protocol test is test_llm_gyms.py)."""

from __future__ import annotations

import json

import pytest

from bao_fast.envs import make_gym, make_tasks
from bao_fast.envs.base import format_tool_call
from bao_fast.envs.llm_gyms import (
    MAX_REPLY_CHARS,
    IntentionGym,
    IntentionTask,
    TelepathyGym,
    TelepathyTask,
    intention_tasks,
    parse_covered,
    parse_verdict,
    strip_reasoning,
    telepathy_tasks,
)
from bao_fast.envs.user_client import UserSimulatorClient, UserSimulatorError

KANGAROO = TelepathyTask("t1", "kangaroo", "animal", ("roo",))
TRIP = IntentionTask("i1", "Help me plan a trip.", ("destination: Kyoto", "duration: 5 days", "budget: cheap",
                                                     "companion: my partner"))  # fmt: skip


def _routed(stub, user: list[str], judge: list[str]) -> None:
    """User-simulator requests get ``user`` replies in order, judge requests ``judge`` replies."""
    queues = {"user": list(user), "judge": list(judge)}

    def handler(body):
        role = "judge" if body["messages"][0]["content"].startswith(("You judge", "You check")) else "user"
        return stub.completion(queues[role].pop(0))

    stub.handler = handler


def _gym(stub, cls=TelepathyGym, **kwargs):
    return cls(UserSimulatorClient(stub.url, "sim", max_retries=0), **kwargs)


def _step(gym, choice, content):
    return gym.step(format_tool_call(choice, content))


def test_strip_reasoning():
    assert strip_reasoning("<think>yes</think> No") == "No"
    assert strip_reasoning("hidden</think>Yes") == "Yes"
    assert strip_reasoning("Maybe <think>cut mid-thought") == "Maybe"


# ------------------------------------------------------------------------------------------------ telepathy


def test_telepathy_questions(openai_stub):
    _routed(openai_stub, ["Yes, it is a kangaroo!", "<think>yes</think>no.", "banana 12 ###"], [])
    gym = _gym(openai_stub, user_max_tokens=9)
    messages = gym.reset(KANGAROO, seed=0)
    assert "'animal'" in messages[1]["content"] and "kangaroo" not in json.dumps(messages)
    first = _step(gym, "action", "Does it hop?")
    assert first.feedback.split("\n")[0] == "Yes." and "kangaroo" not in first.feedback  # no leak
    assert first.reward == 0.0 and not first.info["user_involved"]
    assert _step(gym, "action", "Is it blue?").feedback.split("\n")[0] == "No."
    assert _step(gym, "action", "Is it big?").feedback.startswith("I am not sure")
    assert [e.parsed for e in gym.exchanges] == ["Yes", "No", None]
    first_req, last_req = openai_stub.requests[0], openai_stub.requests[-1]
    assert "kangaroo" in first_req["messages"][0]["content"] and first_req["max_tokens"] == 9
    dialogue = ["Does it hop?", "Yes.", "Is it blue?", "No.", "Is it big?"]
    assert [m["content"] for m in last_req["messages"][1:]] == dialogue


def test_telepathy_guesses(openai_stub):
    _routed(openai_stub, [], ["INCORRECT", "gibberish", "Correct."])
    gym = _gym(openai_stub, max_turns=6)
    gym.reset(KANGAROO)
    for guess in ("wallaby", "a marsupial"):
        result = _step(gym, "answer", guess)
        assert (result.reward, result.terminated, result.info["user_involved"]) == (0.0, False, True)
    assert gym.exchanges[0].parsed == "False" and gym.exchanges[1].parsed is None  # unreadable = rejected
    result = _step(gym, "answer", "grey kangaroo")
    assert (result.reward, result.terminated, result.info["success"]) == (1.0, True, True)
    assert all(r["temperature"] == 0.0 for r in openai_stub.requests)
    assert len(openai_stub.requests) == 3


@pytest.mark.parametrize(
    "reply",
    [
        "The guess is not correct. INCORRECT",
        "Not right.",
        "CORRECT? No, INCORRECT.",
        "Correct would be a kangaroo; this is wrong.",
        "It isn't correct",
        "right",
    ],
)
def test_telepathy_judge_must_say_correct_unambiguously(openai_stub, reply):
    """A negation anywhere, or no CORRECT at all, rejects the guess; the first verdict-like word does not decide."""
    _routed(openai_stub, [], [reply])
    gym = _gym(openai_stub)
    gym.reset(KANGAROO)
    result = _step(gym, "answer", "wallaby")
    assert (result.reward, result.terminated, result.info["success"]) == (0.0, False, False)
    assert parse_verdict(reply) is not True and parse_verdict(" **CORRECT**\n") is True


@pytest.mark.parametrize("guess", ["Kangaroo", "the kangaroo.", "It's a KANGAROO!", "roo"])
def test_telepathy_exact_match_needs_no_judge(openai_stub, guess):
    gym = _gym(openai_stub)
    gym.reset(KANGAROO)
    result = _step(gym, "answer", guess)
    assert result.reward == 1.0 and result.terminated and not openai_stub.requests


def test_telepathy_protocol_errors(openai_stub):
    gym = _gym(openai_stub, max_turns=2)
    gym.reset(KANGAROO)
    result = _step(gym, "search", "kangaroo")
    assert result.info["choice"] == "invalid" and "not available" in result.feedback
    result = _step(gym, "action", "")
    assert result.feedback.startswith("Invalid action") and result.truncated
    assert not openai_stub.requests
    with pytest.raises(TypeError, match="TelepathyTask"):
        gym.reset(TRIP)
    with pytest.raises(TypeError, match="client"):
        TelepathyGym("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="judge_max_tokens"):
        _gym(openai_stub, judge_max_tokens=0)


def test_server_failure_propagates(openai_stub):
    openai_stub.script([openai_stub.Reply(500, {"error": "down"})])
    gym = _gym(openai_stub)
    gym.reset(KANGAROO)
    with pytest.raises(UserSimulatorError, match="500"):
        _step(gym, "action", "Is it alive?")


# ------------------------------------------------------------------------------------------------ intention


def test_intention_clarifying_questions(openai_stub):
    _routed(openai_stub, ["<think>they want Kyoto</think>Kyoto, please.", "", "x" * 2000], [])
    gym = _gym(openai_stub, IntentionGym)
    messages = gym.reset(TRIP)
    assert messages[1]["content"] == TRIP.request and "Kyoto" not in json.dumps(messages)
    assert _step(gym, "action", "Where to?").feedback.split("\n")[0] == "Kyoto, please."
    assert _step(gym, "action", "When?").feedback.startswith("Sorry, I don't know.")
    long = _step(gym, "action", "Anything else?").feedback
    assert long.split("\n")[0] == "x" * MAX_REPLY_CHARS
    system = openai_stub.requests[0]["messages"][0]["content"]
    assert all(detail in system for detail in TRIP.intentions)


def test_intention_literal_match_needs_whole_words(openai_stub):
    """The detail value "cat" is not mentioned by "communicate"; a whole word in any case is."""
    _routed(openai_stub, [], ['{"covered": []}'])
    gym = _gym(openai_stub, IntentionGym)
    gym.reset(IntentionTask("i2", "I want a pet.", ("animal: cat",)))
    assert _step(gym, "answer", "You want to communicate with a pet.").reward == 0.0 and len(openai_stub.requests) == 1
    result = _step(gym, "answer", "A CAT.")
    assert result.reward == 1.0 and result.terminated and len(openai_stub.requests) == 1


def test_intention_scoring(openai_stub):
    _routed(openai_stub, [], ['{"covered": [2]}', "Here: 1: yes\n2: yes\n3. yes\n4) no", "no idea"])
    gym = _gym(openai_stub, IntentionGym, max_turns=8)
    gym.reset(TRIP)
    r1 = _step(gym, "answer", "A trip to Kyoto for a week.")  # literal 1 + judge 2
    assert r1.reward == pytest.approx(0.5) and not r1.terminated and r1.info["user_involved"]
    assert "covers 2 of the 4" in r1.feedback
    r2 = _step(gym, "answer", "Kyoto, 5 days, cheap.")  # literal 1-3, judge 1-3
    assert r2.reward == pytest.approx(0.25) and gym.best_coverage == pytest.approx(0.75)
    r3 = _step(gym, "answer", "Somewhere.")  # unreadable judge: nothing covered, no negative reward
    assert r3.reward == 0.0 and gym.exchanges[-1].parsed is None
    r4 = _step(gym, "answer", "Kyoto for 5 days, cheap, with my partner.")  # all literal: no judge call
    assert r4.reward == pytest.approx(0.25) and r4.terminated and r4.info["success"]
    assert len(openai_stub.requests) == 3
    assert r1.reward + r2.reward + r3.reward + r4.reward == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"covered": [1, 3]}', {1, 3}),
        ('Sure! ```json\n{"covered": ["2", 9, -1, "x"]}\n```', {2}),
        ('{"bad json', None),
        ('{"covered": [4], "why": {"4": "stated"}} and {"covered": [1]}', {4}),
        ("1: covered\n2: missing\n3 - true\n4. not covered", {1, 3}),
        ("I cannot tell.", None),
        ('{"other": 1}', None),
    ],
)
def test_parse_covered(reply, expected):
    assert parse_covered(reply, 4) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"covered": ["²", "3"]}', {3}),  # "²".isdigit() but int("²") fails
        ('{"covered": [' + "1" * 5000 + "]}\n2: yes", {2}),  # beyond int()'s digit limit: not JSON
        ("1" * 5000 + ": yes\n2: yes", {2}),
        ('{"covered": ' + "[" * 5000, None),
    ],
)
def test_parse_covered_never_raises(reply, expected):
    """Items that int() or the JSON decoder cannot read are skipped, never raised."""
    assert parse_covered(reply, 4) == expected


# -------------------------------------------------------------------------------------------------- tasks


def test_builtin_task_splits():
    for source, total in ((telepathy_tasks, 32), (intention_tasks, 10)):
        train, test, every = source("train"), source("test"), source("all")
        assert len(every) == total and len(train) + len(test) == total
        assert {t.id for t in train}.isdisjoint({t.id for t in test})
        assert [t.id for t in source("all", seed=1)] != [t.id for t in source("all", seed=2)]
        assert len(source("train", 3)) == 3
        with pytest.raises(ValueError, match="n must"):
            source("train", total + 1)
        with pytest.raises(ValueError, match="split"):
            source("val")
    assert len(make_tasks("telepathy", split="test")) == 8 and len(make_tasks("intention", n=2)) == 2


def test_tasks_from_json(tmp_path):
    path = tmp_path / "tp.json"
    path.write_text(json.dumps([{"id": 1, "entity": "moon", "category": "space", "aliases": ["luna"]}]))
    assert telepathy_tasks(path=str(path)) == [TelepathyTask("1", "moon", "space", ("luna",))]
    path.write_text(json.dumps([{"id": "a", "request": "Help", "intentions": ["x: y"]}]))
    assert intention_tasks(path=str(path)) == [IntentionTask("a", "Help", ("x: y",))]
    path.write_text(json.dumps([{"id": "a", "request": "Help"}]))
    with pytest.raises(ValueError, match="missing keys"):
        intention_tasks(path=str(path))
    with pytest.raises(ValueError, match="intentions"):
        IntentionTask("a", "Help", ())
    with pytest.raises(ValueError, match="entity"):
        TelepathyTask("a", " ", "x")
    path.write_text(json.dumps([{"id": 1, "entity": "honeybee", "category": "animal", "aliases": "bee"}]))
    with pytest.raises(ValueError, match="row 0: 'aliases' must be a list of names, got 'bee'"):
        telepathy_tasks(path=str(path))  # its letters would each be an exact-match guess
    with pytest.raises(ValueError, match="aliases"):
        TelepathyTask("a", "honeybee", "animal", ("bee", ""))


def test_registry_gyms(openai_stub):
    client = UserSimulatorClient(openai_stub.url, "sim")
    assert isinstance(make_gym("telepathy", client=client), TelepathyGym)
    gym = make_gym("intention", client=client, max_turns=4)
    assert isinstance(gym, IntentionGym) and gym.max_turns == 4 and gym.user_max_tokens == 96


def test_a_reply_cut_before_any_visible_text_is_an_error(openai_stub):
    gym = _gym(openai_stub, user_max_tokens=8)
    gym.reset(KANGAROO, seed=0)
    openai_stub.script([openai_stub.completion("<think>Is it a mammal? Let me", finish_reason="length")])
    with pytest.raises(UserSimulatorError, match=r"user_max_tokens.*user_thinking=false"):
        _step(gym, "answer", "Does it hop?")
    openai_stub.script([openai_stub.completion("Yes, it", finish_reason="length")])  # cut, but readable
    assert _step(gym, "answer", "Does it hop?").feedback


def test_gym_factory_passes_the_user_simulator_settings(openai_stub):
    from bao_fast.config import load_config
    from bao_fast.eval.evaluate import gym_factory

    cfg = load_config(None, ["model.tiny=true", "env.name=telepathy", f"env.user_base_url={openai_stub.url}",
                             "env.user_model=sim", "env.user_max_tokens=33", "env.judge_max_tokens=7",
                             "env.user_thinking=false", "rollout.env_workers=3"])
    gym = gym_factory(cfg)()
    assert (gym.user_max_tokens, gym.judge_max_tokens) == (33, 7)
    assert gym.extra_body == {"chat_template_kwargs": {"enable_thinking": False}}
    assert gym.client.max_concurrency == 3


@pytest.mark.parametrize(("name", "own"), [("telepathy", (64, 64)), ("intention", (96, 64)), ("turtle", (64, 96))])
def test_gym_factory_keeps_the_gyms_own_limits_by_default(openai_stub, name: str, own: tuple[int, int]):
    from bao_fast.config import load_config
    from bao_fast.eval.evaluate import gym_factory

    cfg = load_config(None, ["model.tiny=true", f"env.name={name}", f"env.user_base_url={openai_stub.url}",
                             "env.user_model=sim"])
    gym = gym_factory(cfg)()
    assert (gym.user_max_tokens, gym.judge_max_tokens) == own


def test_gym_factory_needs_a_user_simulator_only_for_llm_gyms(openai_stub):
    from bao_fast.config import ConfigError, load_config
    from bao_fast.eval.evaluate import gym_factory

    with pytest.raises(ConfigError, match=r"'env\.user_base_url': the 'intention' gym talks to an LLM user"):
        gym_factory(load_config(None, ["model.tiny=true", "env.name=intention"]))
    cfg = load_config(None, ["model.tiny=true", f"env.user_base_url={openai_stub.url}", "env.user_model=sim"])
    gym = gym_factory(cfg)()  # the Function gym has no user simulator: the settings are ignored
    assert type(gym).__name__ == "FunctionGym" and not hasattr(gym, "client")
