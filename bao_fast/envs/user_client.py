"""Client for the LLM that plays the user (and the judge, or a teacher) over an OpenAI-compatible API.

Any server that implements ``POST {base_url}/chat/completions`` works (vLLM, SGLang, OpenAI, ...).
The client is synchronous and thread-safe: gyms call it from rollout worker threads, and at most
``max_concurrency`` requests are in flight at once across all threads. Transient failures (connection
errors, timeouts, HTTP 429 and 5xx) are retried with exponential back-off; anything else raises
:class:`UserSimulatorError` at once, with the status and the server's message.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = ["ChatCompletion", "ClientStats", "UserSimulatorClient", "UserSimulatorError", "unserved_model"]

logger = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
"""HTTP statuses that are retried; every other non-2xx status fails at once."""
MAX_RETRY_AFTER_S = 30.0
"""Cap on a server's ``Retry-After`` header (seconds), so a misbehaving server cannot stall a rollout."""
_CONTEXT_OVERFLOW = re.compile(r"context length|context window|context_length_exceeded|max_model_len|too long", re.I)


class UserSimulatorError(RuntimeError):
    """A chat request failed for good (non-retryable status, retries exhausted, malformed response).

    ``status`` is the HTTP status of the last response (None for connection errors, timeouts and
    malformed bodies).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def context_overflow(self) -> bool:
        """Whether the server refused the request because prompt + max_tokens exceed its context."""
        return self.status == 400 and _CONTEXT_OVERFLOW.search(str(self)) is not None


@dataclass(frozen=True)
class ChatCompletion:
    """The first choice of a chat completion.

    ``content`` is the message text ('' when the server returned none); ``reasoning`` is the separate
    reasoning text that servers with a reasoning parser return (None otherwise).
    """

    content: str
    reasoning: str | None
    finish_reason: str | None


@dataclass
class ClientStats:
    """Counters since the client was built: HTTP attempts, retried attempts, requests that failed."""

    attempts: int = 0
    retries: int = 0
    failures: int = 0


def _api_root(base_url: str) -> str:
    """``http://host:port`` -> ``http://host:port/v1``; a URL that already has a path is kept as given."""
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
    url = httpx.URL(base_url.rstrip("/"))
    if not url.host:
        raise ValueError(f"base_url has no host: {base_url!r}")
    return str(url) if url.path not in ("", "/") else str(url.copy_with(path="/v1"))


def unserved_model(base_url: str, model: str, api_key: str | None = None) -> str | None:
    """Why the OpenAI-compatible server at ``base_url`` cannot answer requests for ``model`` (it lists other
    models), or None when it lists ``model`` or cannot be asked (not up yet, no ``/models``: logged)."""
    with UserSimulatorClient(base_url, model, api_key=api_key, max_retries=0) as client:
        try:
            served = client.served_models()
        except UserSimulatorError as exc:
            logger.warning("could not check that %s serves %r: %s", base_url, model, exc)
            return None
    return None if model in served else f"the server at {base_url} serves {sorted(served)}, not {model!r}"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S) if value is not None else None
    except ValueError:
        return None  # an HTTP date; fall back to our own back-off


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with str 'role' and 'content', got {m!r}")
        out.append(dict(m))
    return out


class UserSimulatorClient:
    """Chat client for an OpenAI-compatible server.

    Args:
        base_url: server root (``http://127.0.0.1:8000``, ``/v1`` is appended) or API root
            (``https://host/v1``, kept as given).
        model: the model name the server expects.
        api_key: sent as ``Authorization: Bearer``; None sends no header.
        timeout: seconds per HTTP attempt (connect, read, write, pool).
        max_retries: retries after the first attempt for transient failures.
        backoff: the first retry waits ``backoff`` seconds, then doubles per retry; a ``Retry-After``
            header (capped at 30 s) takes precedence.
        max_concurrency: most requests in flight at once, across threads.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_concurrency: int = 8,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty str, got {model!r}")
        if api_key is not None and not isinstance(api_key, str):
            raise TypeError(f"api_key must be a str or None, got {type(api_key).__name__}")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be a non-negative int, got {max_retries!r}")
        if isinstance(backoff, bool) or not isinstance(backoff, int | float) or not backoff >= 0:
            raise ValueError(f"backoff must be a non-negative number of seconds, got {backoff!r}")
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a positive int, got {max_concurrency!r}")
        self.base_url = _api_root(base_url)
        self.model = model
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_concurrency = max_concurrency
        self.stats = ClientStats()
        self._stats_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_concurrency)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(self.timeout), limits=limits
        )

    def __enter__(self) -> UserSimulatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r})"

    def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> ChatCompletion:
        """One chat completion of ``messages`` (``[{"role", "content"}, ...]``); returns the first choice.

        ``extra_body`` is merged into the request JSON (server-specific options, e.g. vLLM's
        ``{"chat_template_kwargs": {"enable_thinking": False}}``). Raises :class:`UserSimulatorError`.
        """
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        body: dict[str, Any] = {
            "model": self.model,
            "messages": _check_messages(messages),
            "max_tokens": max_tokens,
            "temperature": float(temperature),
            "top_p": float(top_p),
        }
        if stop:
            body["stop"] = list(stop)
        if seed is not None:
            body["seed"] = int(seed)
        body.update(extra_body or {})
        return _parse_completion(self._post("/chat/completions", body))

    def chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> str:
        """The reply text of :meth:`complete` (same arguments)."""
        return self.complete(messages, **kwargs).content

    def chat_many(self, conversations: Sequence[Sequence[Mapping[str, Any]]], **kwargs: Any) -> list[str]:
        """:meth:`chat` over many conversations in parallel (up to ``max_concurrency``); order is kept."""
        if not conversations:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(conversations))) as pool:
            return list(pool.map(lambda m: self.chat(m, **kwargs), conversations))

    def wait_until_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        """Poll ``GET {base_url}/models`` until the server answers 200; UserSimulatorError after ``timeout``."""
        deadline = time.monotonic() + timeout
        last = "no attempt"
        while True:
            try:
                response = self._http.get("/models", timeout=min(self.timeout, 5.0))
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() + interval > deadline:
                raise UserSimulatorError(f"server at {self.base_url} not ready after {timeout:.0f} s ({last})")
            time.sleep(interval)

    def served_models(self) -> list[str]:
        """The model ids ``GET {base_url}/models`` lists (one attempt, at most 5 s). UserSimulatorError when the
        server cannot be reached or does not answer with an OpenAI model list."""
        try:
            response = self._http.get("/models", timeout=min(self.timeout, 5.0))
        except httpx.TransportError as exc:
            raise UserSimulatorError(f"{self.base_url}/models: {type(exc).__name__}: {exc or 'no detail'}") from None
        if not response.is_success:
            raise UserSimulatorError(f"{self.base_url}/models: HTTP {response.status_code}", response.status_code)
        try:
            return [str(m["id"]) for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise UserSimulatorError(f"{self.base_url}/models: not an OpenAI model list: {response.text[:200]!r}",
                                     response.status_code) from None

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for key, value in deltas.items():
                setattr(self.stats, key, getattr(self.stats, key) + value)

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        """POST with retries; the concurrency slot is held only while a request is in flight, not while
        backing off, so one failing request does not starve the others."""
        problem, status = "", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count(retries=1)
            wait: float | None = None
            with self._slots:
                self._count(attempts=1)
                try:
                    response = self._http.post(path, json=body)
                except httpx.TransportError as exc:  # connect / read / write / pool errors and timeouts
                    problem, status = f"{type(exc).__name__}: {exc or 'no detail'}", None
                else:
                    if response.is_success:
                        try:
                            return response.json()
                        except ValueError:
                            self._count(failures=1)
                            raise UserSimulatorError(
                                f"{self.base_url}{path}: response is not JSON: {response.text[:200]!r}"
                            ) from None
                    problem, status = f"HTTP {response.status_code}: {response.text[:300]}", response.status_code
                    if status not in RETRY_STATUS:
                        self._count(failures=1)
                        raise UserSimulatorError(
                            f"{self.base_url}{path} (model {self.model!r}) failed: {problem}", status
                        )
                    wait = _retry_after(response)
            if attempt < self.max_retries:
                time.sleep(wait if wait is not None else self.backoff * 2**attempt)
        self._count(failures=1)
        raise UserSimulatorError(
            f"{self.base_url}{path} (model {self.model!r}) failed after {self.max_retries + 1} attempts: {problem}",
            status,
        )


def _parse_completion(payload: Any) -> ChatCompletion:
    try:
        choice = payload["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError):
        raise UserSimulatorError(f"malformed chat completion (no choices[0].message): {str(payload)[:200]}") from None
    content = message.get("content") if isinstance(message, dict) else None
    reasoning = message.get("reasoning") or message.get("reasoning_content") if isinstance(message, dict) else None
    if content is not None and not isinstance(content, str):
        raise UserSimulatorError(f"malformed chat completion: content is {type(content).__name__}, not str")
    return ChatCompletion(content or "", reasoning if isinstance(reasoning, str) else None, choice.get("finish_reason"))
