"""Gym protocol: tool-call parsing (incl. fuzzing), turn budget, episode end and feedback format."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bao_fast.envs.base import (
    CHOICES,
    TOOL_NAME,
    Gym,
    Outcome,
    ParseError,
    ToolCall,
    build_system_prompt,
    format_tool_call,
    parse_tool_call,
)
from bao_fast.envs.function import FunctionGym, generate_tasks


def _hermes(args: object, name: str = TOOL_NAME) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (_hermes({"choice": "action", "content": "1 2 3 4"}), ToolCall("action", "1 2 3 4")),
        ("  <tool_call>\n " + json.dumps({"name": TOOL_NAME, "arguments": {"choice": "search", "content": "test"}})
         + "\n </tool_call>\n", ToolCall("search", "test")),
        ("<think>maybe [answer] 3 or <tool_call>{}</tool_call></think>\n"
         + _hermes({"choice": "answer", "content": "7"}) + "\nDone.", ToolCall("answer", "7")),
        ("reasoning without opening tag</think>" + _hermes({"choice": "action", "content": "1 1 1 1"}),
         ToolCall("action", "1 1 1 1")),
        (_hermes({"choice": "ANSWER ", "content": 3.5}), ToolCall("answer", "3.5")),
        (_hermes({"choice": "answer", "content": 12}), ToolCall("answer", "12")),
        (_hermes({"choice": "action", "content": [1, 2, 3, 4]}), ToolCall("action", "1 2 3 4")),
        (_hermes({"choice": "finish"}), ToolCall("finish", "")),
        (_hermes(json.dumps({"choice": "search", "content": "test"})), ToolCall("search", "test")),
        # generation stopped on the stop string: no closing tag
        ('<tool_call>{"name": "interact_with_env", "arguments": {"choice": "answer", "content": "5"}}',
         ToolCall("answer", "5")),
        # several calls: the last one counts
        (_hermes({"choice": "action", "content": "1 2 3 4"}) + _hermes({"choice": "answer", "content": "9"}),
         ToolCall("answer", "9")),
        ("[action] 1 2 3 4", ToolCall("action", "1 2 3 4")),
        ("<think>hmm</think>\n  [SEARCH] test  ", ToolCall("search", "test")),
        ("[answer] 1\nthinking again\n[answer] 2.5", ToolCall("answer", "2.5")),
        ("[finish]", ToolCall("finish", "")),
        # an unclosed draft before the final call is not part of it
        ("<tool_call>draft\n" + _hermes({"choice": "answer", "content": "7"}), ToolCall("answer", "7")),
        (_hermes({"choice": "answer", "content": "7"}) + " stray </tool_call>", ToolCall("answer", "7")),
        ("<think>a</think><think>b" + "<think>" * 50, ParseError("", True)),
    ],
)
def test_parse_valid_calls(text: str, expected: ToolCall | ParseError) -> None:
    result = parse_tool_call(text)
    if isinstance(expected, ParseError):
        assert isinstance(result, ParseError) and result.missing == expected.missing
    else:
        assert result == expected


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"name": "interact_with_env", "arguments": {"choice": "action"}} extra</tool_call>',
        _hermes({"choice": "action", "content": "1"}, name="python"),
        _hermes({"choice": "guess", "content": "1"}),
        _hermes({"choice": 3, "content": "1"}),
        _hermes(["action", "1"]),
        _hermes({"choice": "answer", "content": {"x": 1}}),
        _hermes("{broken"),
        "<tool_call>[1, 2]</tool_call>",
    ],
)
def test_parse_malformed_call_is_not_missing(text: str) -> None:
    result = parse_tool_call(text)
    assert isinstance(result, ParseError) and not result.missing and result.message


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>" + "[" * 1000,
        _hermes("[" * 1000),
        '<tool_call>{"name": "interact_with_env", "arguments": {"choice": "answer", "content": ' + "9" * 5000 + "}}",
    ],
)
def test_parse_unparseable_json_is_malformed(text: str) -> None:
    """Nesting beyond the recursion limit and numbers beyond int()'s digit limit are bad JSON, not crashes."""
    result = parse_tool_call(text)
    assert isinstance(result, ParseError) and not result.missing and "JSON" in result.message


@pytest.mark.parametrize(
    "text",
    ["", "I will now think about a b c d.", "<think>[action] 1 2 3 4", "<think>x</think>", "we try [action] 1 2 3 4",
     "[finiſh]", "[İnvalid]", "[ſearch] test"],  # IGNORECASE alone would fold these non-ASCII letters into a tag
)
def test_parse_missing_call(text: str) -> None:
    result = parse_tool_call(text)
    assert isinstance(result, ParseError) and result.missing


def test_parse_non_text_is_error() -> None:
    assert isinstance(parse_tool_call(None), ParseError)  # type: ignore[arg-type]


_FRAGMENTS = st.sampled_from(
    ["<tool_call>", "</tool_call>", "<think>", "</think>", "{", "}", '"', "[action]", "[answer]", "\n", ":", ",",
     '"name"', '"arguments"', f'"{TOOL_NAME}"', '"choice"', '"content"', '"answer"', "1 2 3 4", "null", "[", "]",
     "\\", "1e999", "NaN", "\x00"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_FRAGMENTS, st.text(max_size=8)), max_size=24).map("".join))
def test_parse_fuzz_never_raises(text: str) -> None:
    result = parse_tool_call(text)
    assert isinstance(result, ToolCall | ParseError)
    if isinstance(result, ToolCall):
        assert result.choice in CHOICES and isinstance(result.content, str)


_SAFE_TEXT = st.text(st.characters(blacklist_characters="<", blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(CHOICES), _SAFE_TEXT, _SAFE_TEXT)
def test_format_parse_roundtrip(choice: str, content: str, thought: str) -> None:
    text = f"<think>{thought}</think>\n{format_tool_call(choice, content)}"
    assert parse_tool_call(text) == ToolCall(choice, content.strip())


class _EchoGym(Gym):
    """Minimal gym: ``action`` echoes, ``answer`` "yes" wins, ``search`` is not offered."""

    name = "echo"
    choices = ("action", "answer")

    def _reset(self, task: object) -> list[dict[str, str]]:
        return [{"role": "system", "content": "sys"}, {"role": "user", "content": str(task)}]

    def _act(self, call: ToolCall) -> Outcome:
        if call.choice == "answer":
            ok = call.content == "yes"
            return Outcome("right" if ok else "wrong", reward=1.0 if ok else 0.0, terminated=ok, success=ok)
        return Outcome(f"echo {call.content}")


def _info_ok(info: dict, turn: int) -> None:
    assert set(info) == {"choice", "content", "user_involved", "success", "turn", "error"}
    assert info["turn"] == turn and info["user_involved"] == (info["choice"] == "answer")


def test_gym_episode_flow_and_truncation() -> None:
    gym = _EchoGym(max_turns=3)
    with pytest.raises(RuntimeError, match=r"_EchoGym\.step called before reset"):
        gym.step("[action] x")
    assert gym.reset("task", seed=1)[1]["content"] == "task"
    r1 = gym.step("[action] hi")
    assert r1.feedback == "echo hi\nReward: 0.0" and not (r1.terminated or r1.truncated)
    _info_ok(r1.info, 1)
    r2 = gym.step(_hermes({"choice": "search", "content": "test"}))  # not offered by this gym
    assert r2.info["choice"] == "invalid" and "search" in r2.info["error"] and not r2.terminated
    _info_ok(r2.info, 2)
    r3 = gym.step("[answer] no")
    assert r3.truncated and not r3.terminated and gym.done and r3.info["user_involved"]
    assert gym.num_turns == 3
    with pytest.raises(RuntimeError, match=r"_EchoGym\.step called on a finished episode; call reset first"):
        gym.step("[answer] yes")


def test_gym_success_terminates_with_reward_line() -> None:
    gym = _EchoGym(max_turns=5)
    gym.reset("t")
    r = gym.step("<think>sure</think>[answer] yes")
    assert r.terminated and not r.truncated and r.reward == 1.0 and r.feedback.endswith("\nReward: 1.0")
    assert r.info["success"] and gym.success and gym.done


def test_gym_missing_call_ends_malformed_continues() -> None:
    gym = _EchoGym()
    gym.reset("t")
    bad = gym.step("<tool_call>{oops</tool_call>")
    assert bad.info["choice"] == "invalid" and bad.info["error"] and not bad.terminated and not gym.done
    none = gym.step("I give up thinking")
    assert none.info["choice"] == "invalid" and none.terminated and gym.done and none.reward == 0.0
    _info_ok(none.info, 2)


def test_gym_finish_and_reset_restarts() -> None:
    gym = _EchoGym()
    gym.reset("t")
    r = gym.step("[finish]")
    assert r.terminated and r.info["choice"] == "finish" and not r.info["success"]
    gym.reset("again")
    assert gym.num_turns == 0 and not gym.done and gym.step("[action] z").info["turn"] == 1


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_gym_rejects_bad_max_turns(bad: object) -> None:
    with pytest.raises(ValueError, match="max_turns"):
        _EchoGym(max_turns=bad)  # type: ignore[arg-type]


def test_system_prompt_describes_tool_and_budget() -> None:
    text = build_system_prompt("Find x.", {"action": "probe", "answer": "submit"}, ["be brief"], max_turns=7)
    assert TOOL_NAME in text and "Find x." in text and "`answer`: submit" in text and "7 turns" in text
    assert "be brief" in text and "<tool_call>" in text
    with pytest.raises(ValueError, match="choices"):
        build_system_prompt("x", {"jump": "no"})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_FRAGMENTS, st.text(max_size=10)).map(str), min_size=1, max_size=20))
def test_function_gym_fuzz_never_raises(turns: list[str]) -> None:
    gym = FunctionGym(max_turns=15)
    gym.reset(generate_tasks(1, 5, 0)[0])
    for text in turns:
        if gym.done:
            break
        r = gym.step(text)
        assert r.feedback.endswith(f"Reward: {r.reward}") and r.info["choice"] in (*CHOICES, "invalid")
