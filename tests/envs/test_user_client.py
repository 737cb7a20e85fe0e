"""UserSimulatorClient against a local stub server: request format, retries with back-off, timeouts,
non-retryable errors, malformed replies and the cross-thread concurrency limit."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from bao_fast.envs.user_client import UserSimulatorClient, UserSimulatorError

MSG = [{"role": "user", "content": "Is it an animal?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_request_format_and_reply(openai_stub):
    openai_stub.script([openai_stub.completion("Yes.", reasoning="thinking", finish_reason="length")])
    with UserSimulatorClient(openai_stub.url, "tiny", api_key="sk-test") as client:
        out = client.complete(
            MSG, max_tokens=7, temperature=0.3, stop=["\n"], seed=5, extra_body={"chat_template_kwargs": {"a": 1}}
        )
    assert (out.content, out.reasoning, out.finish_reason) == ("Yes.", "thinking", "length")
    body = openai_stub.requests[0]
    assert body["model"] == "tiny" and body["messages"] == MSG
    assert (body["max_tokens"], body["temperature"], body["stop"], body["seed"]) == (7, 0.3, ["\n"], 5)
    assert body["chat_template_kwargs"] == {"a": 1}
    assert openai_stub.headers[0]["Authorization"] == "Bearer sk-test"
    assert client.stats.attempts == 1 and client.stats.retries == 0


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1"),
        ("http://h:1/v1/", "http://h:1/v1"),
        ("https://api.example.com/openai/v1", "https://api.example.com/openai/v1"),
    ],
)
def test_base_url_normalisation(given, expected):
    assert UserSimulatorClient(given, "m").base_url == expected


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"base_url": "127.0.0.1:8000"}, "base_url"),
        ({"base_url": "http://"}, "base_url"),
        ({"model": ""}, "model"),
        ({"timeout": 0}, "timeout"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
        ({"backoff": -0.1}, "backoff"),
        ({"max_concurrency": 0}, "max_concurrency"),
    ],
)
def test_bad_constructor_arguments(kwargs, name):
    args = {"base_url": "http://127.0.0.1:1", "model": "m", **kwargs}
    with pytest.raises(ValueError, match=name):
        UserSimulatorClient(**args)


def test_bad_call_arguments():
    client = UserSimulatorClient("http://127.0.0.1:1", "m")
    with pytest.raises(TypeError, match="api_key"):
        UserSimulatorClient("http://127.0.0.1:1", "m", api_key=3)
    with pytest.raises(ValueError, match="max_tokens"):
        client.chat(MSG, max_tokens=0)
    for bad in ([], "hello", [{"role": "user"}], [{"role": "user", "content": 3}]):
        with pytest.raises(ValueError, match="messages"):
            client.chat(bad)


def test_retries_5xx_with_exponential_backoff(openai_stub):
    openai_stub.script([openai_stub.Reply(503, {"error": "busy"}), openai_stub.Reply(500, text="oops"),
                        openai_stub.completion("No.")])  # fmt: skip
    client = UserSimulatorClient(openai_stub.url, "m", max_retries=3, backoff=0.1)
    assert client.chat(MSG) == "No."
    gaps = [b - a for a, b in zip(openai_stub.times, openai_stub.times[1:])]
    # 0.1 then 0.2 s; the upper bounds leave a loaded CI machine room and still refuse a much longer wait
    assert len(gaps) == 2 and 0.09 <= gaps[0] < 1.0 and 0.19 <= gaps[1] < 1.1
    assert (client.stats.attempts, client.stats.retries, client.stats.failures) == (3, 2, 0)


def test_429_honours_retry_after(openai_stub):
    openai_stub.script([openai_stub.Reply(429, {"error": "slow down"}, headers={"Retry-After": "0.05"}),
                        openai_stub.completion("Yes.")])  # fmt: skip
    client = UserSimulatorClient(openai_stub.url, "m", backoff=5.0)
    start = time.monotonic()
    assert client.chat(MSG) == "Yes."
    assert time.monotonic() - start < 2.0  # the server's 0.05 s, not our 5 s back-off


def test_retries_exhausted(openai_stub):
    openai_stub.script([openai_stub.Reply(502, {"error": "bad gateway"})])
    client = UserSimulatorClient(openai_stub.url, "m", max_retries=2, backoff=0.0)
    with pytest.raises(UserSimulatorError, match=r"after 3 attempts.*502") as info:
        client.chat(MSG)
    assert info.value.status == 502 and not info.value.context_overflow
    assert len(openai_stub.requests) == 3 and client.stats.failures == 1


def test_client_errors_fail_at_once(openai_stub):
    message = "This model's maximum context length is 1024 tokens. However, your prompt contains 2000."
    openai_stub.script([openai_stub.Reply(400, {"error": {"message": message}})])
    client = UserSimulatorClient(openai_stub.url, "m", max_retries=3, backoff=1.0)
    with pytest.raises(UserSimulatorError, match="400") as info:
        client.chat(MSG)
    assert info.value.status == 400 and info.value.context_overflow
    assert len(openai_stub.requests) == 1
    openai_stub.script([openai_stub.Reply(404, {"error": "The model `m` does not exist."})])
    with pytest.raises(UserSimulatorError, match="does not exist") as info:
        client.chat(MSG)
    assert info.value.status == 404 and not info.value.context_overflow


@pytest.mark.parametrize(
    "reply",
    [
        {"choices": []},
        {"result": "Yes"},
        {"choices": [{"message": {"content": 7}}]},
    ],
)
def test_malformed_replies(openai_stub, reply):
    openai_stub.script([openai_stub.Reply(body=reply)])
    with pytest.raises(UserSimulatorError, match="malformed"):
        UserSimulatorClient(openai_stub.url, "m").chat(MSG)


def test_non_json_success_body(openai_stub):
    openai_stub.script([openai_stub.Reply(text="<html>")])
    with pytest.raises(UserSimulatorError, match="not JSON"):
        UserSimulatorClient(openai_stub.url, "m").chat(MSG)


def test_missing_content_is_empty(openai_stub):
    openai_stub.script([openai_stub.completion(None)])
    assert UserSimulatorClient(openai_stub.url, "m").chat(MSG) == ""


def test_read_timeout_is_retried_then_fails(openai_stub):
    openai_stub.script([openai_stub.Reply(body={}, delay=4.0)])
    client = UserSimulatorClient(openai_stub.url, "m", timeout=0.2, max_retries=1, backoff=0.0)
    start = time.monotonic()
    with pytest.raises(UserSimulatorError, match="Timeout") as info:
        client.chat(MSG)
    assert time.monotonic() - start < 3.0 and info.value.status is None  # two 0.2 s timeouts, not the 4 s reply
    assert client.stats.attempts == 2


def test_connection_refused_is_retried():
    client = UserSimulatorClient(f"http://127.0.0.1:{_free_port()}", "m", max_retries=2, backoff=0.01)
    with pytest.raises(UserSimulatorError, match="ConnectError") as info:
        client.chat(MSG)
    assert info.value.status is None and client.stats.attempts == 3 and client.stats.retries == 2


@pytest.mark.parametrize("limit", [1, 3])
def test_concurrency_limit_across_threads(openai_stub, limit):

    def echo(body):
        reply = openai_stub.completion(body["messages"][0]["content"])
        reply.delay = 0.1
        return reply

    openai_stub.handler = echo
    client = UserSimulatorClient(openai_stub.url, "m", max_concurrency=limit)
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(8)]
    assert client.chat_many(convs) == [f"q{i}" for i in range(8)]  # order kept
    assert openai_stub.max_in_flight == limit
    # raw threads share the same limit
    openai_stub.max_in_flight = 0
    threads = [threading.Thread(target=client.chat, args=(c,)) for c in convs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert openai_stub.max_in_flight == limit and client.stats.attempts == 16


def test_wait_until_ready(openai_stub):
    UserSimulatorClient(openai_stub.url, "m").wait_until_ready(timeout=5)
    client = UserSimulatorClient(f"http://127.0.0.1:{_free_port()}", "m")
    start = time.monotonic()
    with pytest.raises(UserSimulatorError, match="not ready"):
        client.wait_until_ready(timeout=0.3, interval=0.05)
    assert time.monotonic() - start < 2.0


def test_served_models(openai_stub):
    assert UserSimulatorClient(openai_stub.url, "m").served_models() == ["stub"]
    with pytest.raises(UserSimulatorError, match=r"/v2/models: HTTP 404"):
        UserSimulatorClient(f"{openai_stub.url}/v2", "m").served_models()
    start = time.monotonic()
    with pytest.raises(UserSimulatorError, match=r"/models: ConnectError"):
        UserSimulatorClient(f"http://127.0.0.1:{_free_port()}", "m").served_models()
    assert time.monotonic() - start < 5.0
