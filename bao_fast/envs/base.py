"""The gym protocol: tool-call parsing, turn budget, episode bookkeeping, and the shared system prompt.

An episode is a dialogue in which every assistant turn ends in one call of the tool ``interact_with_env``
with a ``choice`` (action | search | answer | finish) and a free-text ``content``. Two spellings of a call
are accepted (see :func:`parse_tool_call`)::

    <tool_call>{"name": "interact_with_env", "arguments": {"choice": "action", "content": "1 2 3 4"}}</tool_call>
    [action] 1 2 3 4

Episode end (BAO.md): a terminating outcome (e.g. a correct answer), ``finish``, a turn without any tool
call, or the turn budget (``truncated``). A malformed call (bad JSON, unknown tool or choice) is reported
back to the agent as feedback, counts as a turn, and the episode continues. Nothing the agent writes makes
:meth:`Gym.step` raise.
"""

from __future__ import annotations

import abc
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

TOOL_NAME = "interact_with_env"
CHOICES: tuple[str, ...] = ("action", "search", "answer", "finish")
INVALID = "invalid"

TOOL_SCHEMA: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": "Interact with the environment: query it, look something up, or submit an answer.",
        "parameters": {
            "type": "object",
            "properties": {
                "choice": {"type": "string", "enum": list(CHOICES), "description": "The kind of interaction."},
                "content": {"type": "string", "description": "The payload of the interaction."},
            },
            "required": ["choice", "content"],
        },
    },
}
"""OpenAI function schema of the tool, for chat templates and servers that take ``tools=``."""

_TAG = re.compile(r"^[ \t]*\[(action|search|answer|finish)\]", re.IGNORECASE | re.MULTILINE | re.ASCII)


@dataclass(frozen=True)
class ToolCall:
    """One parsed call of ``interact_with_env``; ``choice`` is lower-case and one of :data:`CHOICES`."""

    choice: str
    content: str


@dataclass(frozen=True)
class ParseError:
    """Why a turn's text is not a valid tool call.

    ``missing`` is True when the text holds no tool call at all (this ends the episode); False when a
    call is present but malformed (reported to the agent, the episode continues).
    """

    message: str
    missing: bool


@dataclass(frozen=True)
class StepResult:
    """Outcome of one turn.

    ``feedback`` is the text shown to the agent (it ends with a ``Reward: r`` line, as UserRL shows it);
    ``info`` holds ``choice`` (action|search|answer|finish|invalid), ``content`` (str), ``user_involved``
    (bool, True for answer), ``success`` (bool, task solved so far), ``turn`` (1-based int) and ``error``
    (str | None, the parse or protocol error of this turn).
    """

    feedback: str
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """What a gym's handler returns for one valid call; :class:`Gym` turns it into a :class:`StepResult`."""

    feedback: str
    reward: float = 0.0
    terminated: bool = False
    success: bool = False


def _visible_text(text: str) -> str:
    """Drop reasoning: closed ``<think>`` blocks, anything before a stray ``</think>`` (templates that
    open the block in the prompt), and anything after an unclosed ``<think>`` (generation cut mid-thought).
    """
    text = _drop_think_blocks(text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text


def _drop_think_blocks(text: str) -> str:
    """``text`` without its closed ``<think>…</think>`` blocks (each to the next ``</think>``), in one pass: a
    regex would rescan the rest of the text from every unclosed ``<think>`` (quadratic in a degenerate turn)."""
    parts, pos = [], 0
    while (start := text.find("<think>", pos)) >= 0 and (end := text.find("</think>", start + len("<think>"))) >= 0:
        parts.append(text[pos:start])
        pos = end + len("</think>")
    parts.append(text[pos:])
    return "".join(parts)


def _last_hermes_body(text: str) -> str | None:
    """The body of the last ``<tool_call>`` in ``text``: of a final call without its closing tag, else of the
    last closed call (from its nearest opening tag, so an unclosed draft before it is not part of it); None
    without one."""
    opening, closing = text.rfind("<tool_call>"), text.rfind("</tool_call>")
    if opening > closing:
        return text[opening + len("<tool_call>") :]
    opening = text.rfind("<tool_call>", 0, closing) if closing >= 0 else -1
    if opening < 0:
        return None
    return text[opening + len("<tool_call>") : text.find("</tool_call>", opening)]


def _content_to_str(content: Any) -> str | None:
    if content is None:
        return ""
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, bool):
        return None
    if isinstance(content, int | float):
        return repr(content) if isinstance(content, float) else str(content)
    if isinstance(content, list) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in content):
        return " ".join(str(x) for x in content)
    return None


def _parse_hermes(payload: str) -> ToolCall | ParseError:
    """Parse the JSON body of one ``<tool_call>`` block."""
    payload = payload.strip()
    try:
        obj, end = json.JSONDecoder().raw_decode(payload)
    except json.JSONDecodeError as exc:
        return ParseError(f"the tool call is not valid JSON ({exc.msg} at position {exc.pos})", missing=False)
    except (ValueError, RecursionError):  # a number beyond int()'s digit limit, or nesting beyond the stack
        return ParseError("the tool call is not valid JSON (too deeply nested or a number too long)", missing=False)
    if payload[end:].strip():
        return ParseError("unexpected text after the JSON object inside <tool_call>", missing=False)
    if not isinstance(obj, dict):
        return ParseError("the tool call must be a JSON object with 'name' and 'arguments'", missing=False)
    if obj.get("name") != TOOL_NAME:
        return ParseError(f"unknown tool {obj.get('name')!r}; the only tool is {TOOL_NAME!r}", missing=False)
    args = obj.get("arguments", obj.get("parameters"))
    if isinstance(args, str):  # OpenAI-style arguments serialised as a JSON string
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
            return ParseError("'arguments' is a string that is not valid JSON", missing=False)
    if not isinstance(args, dict):
        return ParseError("'arguments' must be an object with 'choice' and 'content'", missing=False)
    choice = args.get("choice")
    if not isinstance(choice, str) or choice.strip().lower() not in CHOICES:
        return ParseError(f"'choice' must be one of {', '.join(CHOICES)}; got {choice!r}", missing=False)
    content = _content_to_str(args.get("content"))
    if content is None:
        return ParseError("'content' must be a string", missing=False)
    return ToolCall(choice.strip().lower(), content)


def parse_tool_call(text: str) -> ToolCall | ParseError:
    """Parse the agent's turn into one tool call; never raises.

    Reasoning in ``<think>…</think>`` is ignored. The Hermes/Qwen form ``<tool_call>{json}</tool_call>``
    takes precedence; a final ``<tool_call>`` without its closing tag (generation stopped on the stop
    string) is accepted. Otherwise a line starting with ``[action]``, ``[search]``, ``[answer]`` or
    ``[finish]`` is a call whose content is the rest of the text. When several calls appear, the LAST one
    counts: the turn ends in its decision, earlier ones are drafts or quoted examples. The markers
    ``<think>``, ``</think>``, ``<tool_call>`` and ``</tool_call>`` are structural and may not appear
    literally inside a call's content.
    """
    if not isinstance(text, str):
        return ParseError(f"the turn must be text, got {type(text).__name__}", missing=True)
    visible = _visible_text(text)
    body = _last_hermes_body(visible)
    if body is not None:
        return _parse_hermes(body)
    tags = list(_TAG.finditer(visible))
    if tags:
        last = tags[-1]
        return ToolCall(last.group(1).lower(), visible[last.end() :].strip())
    return ParseError(
        f'no tool call found; end every turn with <tool_call>{{"name": "{TOOL_NAME}", "arguments": '
        '{"choice": ..., "content": ...}}</tool_call>',
        missing=True,
    )


def format_tool_call(choice: str, content: str) -> str:
    """Render a call in the Hermes form that :func:`parse_tool_call` reads (used by teachers)."""
    args = {"choice": choice, "content": content}
    return f"<tool_call>{json.dumps({'name': TOOL_NAME, 'arguments': args}, ensure_ascii=False)}</tool_call>"


def build_system_prompt(
    description: str,
    choices: Mapping[str, str],
    notes: Sequence[str] = (),
    max_turns: int | None = None,
) -> str:
    """System prompt shared by all gyms: the environment, the ``interact_with_env`` tool and its format.

    Args:
        description: what the environment is and what the agent must find out.
        choices: choice name -> what it does and what ``content`` must hold (keys from :data:`CHOICES`).
        notes: extra gym-specific advice, one bullet each.
        max_turns: the turn budget, stated to the agent when given.
    """
    bad = [c for c in choices if c not in CHOICES]
    if bad:
        raise ValueError(f"choices: unknown choice names {bad}; allowed {CHOICES}")
    lines = [
        "You are an agent that interacts with an environment to solve a task. Details of the environment "
        "and of your action space follow.",
        "",
        f"- Environment: {description}",
        "",
        f"- Tool: in every turn, call the tool `{TOOL_NAME}` exactly once, with a `choice` and a `content`:",
    ]
    lines += [f"  * `{name}`: {doc}" for name, doc in choices.items()]
    lines += [
        "",
        "- Format: first reason between <think> and </think>, then write the call as",
        f'  <tool_call>{{"name": "{TOOL_NAME}", "arguments": {{"choice": "<choice>", "content": "<content>"}}}}'
        "</tool_call>",
        "  A turn without a tool call ends the episode. After each call the environment replies with "
        "feedback and a line `Reward: r`.",
    ]
    if max_turns is not None:
        lines.append(f"- Budget: at most {max_turns} turns; plan how to spend them.")
    if notes:
        lines += ["", "- Notes:"]
        lines += [f"  * {note}" for note in notes]
    return "\n".join(lines)


class Gym(abc.ABC):
    """Base class of all gyms: one episode at a time, ``reset`` then ``step`` until ``done``.

    Subclasses set ``name`` and ``choices`` (the valid choices besides ``finish``) and implement
    :meth:`_reset` (the opening chat messages) and :meth:`_act` (one valid, non-finish call). The base
    class parses the turn, enforces the turn budget, formats the feedback and fills ``info``.
    """

    name: ClassVar[str]
    choices: ClassVar[tuple[str, ...]] = ("action", "search", "answer")

    def __init__(self, max_turns: int = 15) -> None:
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"max_turns must be a positive int, got {max_turns!r}")
        self.max_turns = max_turns
        self.rng = random.Random()
        self._turn = 0
        self._done = True
        self._started = False
        self._success = False

    @property
    def num_turns(self) -> int:
        """Turns taken in the current episode."""
        return self._turn

    @property
    def done(self) -> bool:
        """Whether the current episode has ended (terminated or truncated)."""
        return self._done

    @property
    def success(self) -> bool:
        """Whether the current episode's task has been solved."""
        return self._success

    def reset(self, task: Any, seed: int | None = None) -> list[dict[str, str]]:
        """Start an episode on ``task``; returns the opening chat messages (system, then user)."""
        self.rng = random.Random(seed)
        messages = self._reset(task)
        self._turn = 0
        self._done = False
        self._started = True
        self._success = False
        return messages

    def step(self, action_text: str) -> StepResult:
        """Play one assistant turn. Raises RuntimeError only if no episode is running."""
        if not self._started:
            raise RuntimeError(f"{type(self).__name__}.step called before reset")
        if self._done:
            raise RuntimeError(f"{type(self).__name__}.step called on a finished episode; call reset first")
        self._turn += 1
        call = parse_tool_call(action_text)
        error: str | None = None
        if isinstance(call, ParseError):
            choice, content, error = INVALID, "", call.message
            outcome = Outcome(f"Invalid tool call: {call.message}.", terminated=call.missing)
        elif call.choice == "finish":
            choice, content = call.choice, call.content
            outcome = self._on_finish()
        elif call.choice not in self.choices:
            choice, content = INVALID, call.content
            error = f"choice {call.choice!r} is not available here; use one of {', '.join(self.choices)}"
            outcome = Outcome(f"Invalid tool call: {error}.")
        else:
            choice, content = call.choice, call.content
            outcome = self._act(call)
        self._success = self._success or outcome.success
        terminated = outcome.terminated
        truncated = not terminated and self._turn >= self.max_turns
        self._done = terminated or truncated
        info = {
            "choice": choice,
            "content": content,
            "user_involved": choice == "answer",
            "success": self._success,
            "turn": self._turn,
            "error": error,
        }
        reward = float(outcome.reward)
        return StepResult(f"{outcome.feedback}\nReward: {reward}", reward, terminated, truncated, info)

    def _on_finish(self) -> Outcome:
        """Handle ``finish``; by default the episode ends without reward."""
        return Outcome("You ended the episode.", terminated=True)

    @abc.abstractmethod
    def _reset(self, task: Any) -> list[dict[str, str]]:
        """Load ``task`` (validate it, raising ValueError/TypeError) and return the opening messages."""

    @abc.abstractmethod
    def _act(self, call: ToolCall) -> Outcome:
        """Answer one valid call whose choice is in ``self.choices``."""
