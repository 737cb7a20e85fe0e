"""Test-wide setup and fixtures. Triton kernels run in the interpreter on machines without CUDA; the flag
must be set before anything imports triton, which is why it lives here. ``openai_stub`` is a scriptable
OpenAI-compatible server from the standard library (user simulators, judges, LLM teachers)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class Reply:
    """What the stub sends back: ``status``, a JSON ``body`` (or raw ``text``), ``headers``, after ``delay`` s."""

    status: int = 200
    body: Any = None
    text: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


def completion(content: str | None, reasoning: str | None = None, finish_reason: str = "stop") -> Reply:
    """A 200 chat-completion reply with one choice."""
    message = {"role": "assistant", "content": content, "reasoning": reasoning}
    choice = {"index": 0, "message": message, "finish_reason": finish_reason}
    return Reply(body={"id": "x", "object": "chat.completion", "choices": [choice]})


class OpenAIStub:
    """Serves ``POST /v1/chat/completions`` from ``handler(request_json) -> Reply`` and ``GET /v1/models``;
    records every request and the most requests ever in flight at once. ``Reply`` and ``completion`` are
    reachable from the fixture (``openai_stub.completion("Yes")``), since test modules cannot import conftest."""

    Reply = Reply
    completion = staticmethod(completion)

    def __init__(self) -> None:
        self.handler: Callable[[dict[str, Any]], Reply] = lambda _: completion("ok")
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.times: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._send(Reply(body={"data": [{"id": "stub"}]}) if self.path == "/v1/models" else Reply(404, {}))

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub._lock:
                    stub.requests.append(body)
                    stub.headers.append(dict(self.headers))
                    stub.times.append(time.monotonic())
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    reply = stub.handler(body) if self.path == "/v1/chat/completions" else Reply(404, {"error": "no"})
                    time.sleep(reply.delay)
                finally:
                    with stub._lock:
                        stub.in_flight -= 1
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client hung up
                    self._send(reply)

            def _send(self, reply: Reply) -> None:
                data = (reply.text if reply.text is not None else json.dumps(reply.body)).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    def script(self, replies: list[Reply]) -> None:
        """Answer the next requests with ``replies`` in order (then repeat the last one)."""
        queue = list(replies)
        lock = threading.Lock()

        def handler(_: dict[str, Any]) -> Reply:
            with lock:
                return queue.pop(0) if len(queue) > 1 else queue[0]

        self.handler = handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def openai_stub() -> Iterator[OpenAIStub]:
    stub = OpenAIStub()
    yield stub
    stub.close()
