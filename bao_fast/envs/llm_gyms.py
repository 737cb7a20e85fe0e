"""Gyms whose user and judge are an LLM behind an OpenAI-compatible server (UserRL's Telepathy and
Intention), built on :class:`~bao_fast.envs.user_client.UserSimulatorClient`.

- :class:`TelepathyGym`: the user thinks of an entity; ``action`` asks a yes/no question (the reply is
  reduced to ``Yes.``, ``No.`` or ``Maybe.``, so the user can never leak the name), ``answer`` is a guess
  that an exact name match or the LLM judge accepts (reward 1, the episode ends).
- :class:`IntentionGym`: the user made a vague request and hides the details they want; ``action`` asks
  a clarifying question (free-text reply), ``answer`` submits a summary of the user's intention, scored
  by the fraction of hidden details it covers (a literal mention or the judge's verdict). Rewards are
  the increase of the best coverage so far, so an episode's rewards sum to its final coverage; covering
  every detail ends the episode.

The LLM's replies are parsed defensively: reasoning (``<think>``) is dropped, a judge reply that cannot be
read counts as a rejection, and every exchange is kept in :attr:`LLMGym.exchanges` for inspection.
Server failures (after the client's retries) raise :class:`~bao_fast.envs.user_client.UserSimulatorError`:
a reward computed without the judge would be silently wrong, so the episode must be discarded.
"""

from __future__ import annotations

import abc
import json
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bao_fast.envs.base import Gym, Outcome, ToolCall, build_system_prompt
from bao_fast.envs.user_client import UserSimulatorClient, UserSimulatorError

__all__ = [
    "INTENTION_JUDGE_PROMPT",
    "INTENTION_USER_PROMPT",
    "TELEPATHY_JUDGE_PROMPT",
    "TELEPATHY_USER_PROMPT",
    "Exchange",
    "IntentionGym",
    "IntentionTask",
    "LLMGym",
    "TelepathyGym",
    "TelepathyTask",
    "intention_tasks",
    "parse_covered",
    "parse_verdict",
    "strip_reasoning",
    "telepathy_tasks",
]

TELEPATHY_USER_PROMPT = (
    "You are playing twenty questions and you are thinking of: {entity} (category: {category}). The player "
    "asks yes/no questions about it. Answer each question truthfully for {entity} with exactly one word: "
    "Yes, No, or Maybe (when the answer is unclear). Never reveal what you are thinking of."
)
TELEPATHY_JUDGE_PROMPT = (
    "You judge a game of twenty questions. The secret is: {entity}. Decide whether the player's guess names "
    "the same thing; synonyms and common alternative names count, a different, broader or related thing "
    "does not. Reply with exactly one word: CORRECT or INCORRECT."
)
INTENTION_USER_PROMPT = (
    "You are a user who asked an assistant: \"{request}\"\n"
    "What you really want includes these details, which you did not state:\n{intentions}\n"
    "The assistant asks clarifying questions. Answer in one or two short sentences, giving only the details "
    "the question asks about; never list all details at once. If a question is about none of them, say you "
    "have no preference."
)
INTENTION_JUDGE_PROMPT = (
    "You check whether a summary of a user's request covers the user's hidden details.\n"
    "Hidden details:\n{intentions}\n"
    "For each numbered detail, decide whether the summary states it (paraphrases count, vague mentions do "
    "not). Reply with JSON only, listing the numbers of the covered details: {{\"covered\": [1, 3]}}"
)

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_YES_NO = re.compile(r"\b(yes|no|maybe)\b", re.IGNORECASE)
_CORRECT = re.compile(r"\bcorrect\b", re.IGNORECASE)
_NEGATIVE = re.compile(r"\b(?:incorrect|wrong|not|no)\b|n't\b", re.IGNORECASE)
_DETAIL_LINE = re.compile(r"(\d+)\s*[:.)\-]\s*(yes|covered|true|no|not covered|missing|false)\b", re.IGNORECASE)
_ARTICLES = re.compile(r"^(?:(?:it is|it's|is it|the answer is)\s+)?(?:a|an|the)\s+", re.IGNORECASE)
MAX_REPLY_CHARS = 500
"""User replies longer than this are cut (a runaway generation must not flood the agent's context)."""


def strip_reasoning(text: str) -> str:
    """Drop ``<think>`` blocks (and an unclosed or orphaned one) from an LLM reply and trim it."""
    text = _THINK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return text.split("<think>", 1)[0].strip()


def _normalise_name(text: str) -> str:
    text = re.sub(r"[^\w\s'-]", " ", text.lower()).strip()
    return re.sub(r"\s+", " ", _ARTICLES.sub("", text)).strip()


@dataclass(frozen=True)
class Exchange:
    """One call of the LLM by a gym: who it played (``user`` | ``judge``), the text it was given, its raw
    reply, and what the gym read from it (``parsed``, None when the reply could not be read)."""

    role: str
    prompt: str
    reply: str
    parsed: str | None


class LLMGym(Gym):
    """Shared plumbing of the LLM-user gyms: the client, the sampling settings, the exchange log.

    Args:
        client: the OpenAI-compatible client that plays the user and the judge.
        max_turns: the turn budget.
        user_max_tokens / judge_max_tokens: completion limits of the user and judge calls.
        temperature: sampling temperature of the user (the judge is always greedy).
        extra_body: extra request fields for every call (e.g. vLLM ``chat_template_kwargs``).
    """

    def __init__(
        self,
        client: UserSimulatorClient,
        max_turns: int = 12,
        user_max_tokens: int = 64,
        judge_max_tokens: int = 64,
        temperature: float = 0.0,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(max_turns)
        if not isinstance(client, UserSimulatorClient):
            raise TypeError(f"client must be a UserSimulatorClient, got {type(client).__name__}")
        for name, value in (("user_max_tokens", user_max_tokens), ("judge_max_tokens", judge_max_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.client = client
        self.user_max_tokens = user_max_tokens
        self.judge_max_tokens = judge_max_tokens
        self.temperature = float(temperature)
        self.extra_body = dict(extra_body or {})
        self.exchanges: list[Exchange] = []
        self._history: list[dict[str, str]] = []  # the user-simulator's side of the dialogue

    def _start(self) -> None:
        self.exchanges = []
        self._history = []

    def _ask_user(self, system: str, question: str) -> str:
        """The user-simulator's raw visible reply to ``question``, given the dialogue so far."""
        messages = [{"role": "system", "content": system}, *self._history, {"role": "user", "content": question}]
        return self._visible_reply(messages, self.user_max_tokens, self.temperature, self.rng.getrandbits(31))

    def _judge(self, system: str, content: str) -> str:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": content}]
        return self._visible_reply(messages, self.judge_max_tokens, 0.0, None)

    def _visible_reply(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                       seed: int | None) -> str:
        """The reply without its reasoning. Raises ``UserSimulatorError`` when the token limit ran out before
        any visible text (a thinking simulator): every reply would read as empty, and the episodes as noise."""
        out = self.client.complete(messages, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                   extra_body=self.extra_body)
        text = strip_reasoning(out.content)
        if not text and out.finish_reason == "length":
            raise UserSimulatorError(
                f"the user simulator used all {max_tokens} tokens without a visible reply (it is probably "
                "thinking): raise env.user_max_tokens / env.judge_max_tokens or set env.user_thinking=false"
            )
        return text

    def _act(self, call: ToolCall) -> Outcome:
        """An ``action`` is a question to the user, an ``answer`` goes to the judge; empty content is invalid."""
        if not call.content:
            return Outcome(f"Invalid {call.choice}: `content` must not be empty.")
        if call.choice == "action":
            return self._question(call.content)
        return self._answer(call.content)

    @abc.abstractmethod
    def _question(self, question: str) -> Outcome:
        """The user's reply to a non-empty question."""

    @abc.abstractmethod
    def _answer(self, answer: str) -> Outcome:
        """The judge's verdict on a non-empty answer."""

    def _yes_no(self, system: str, question: str) -> Outcome:
        """Ask the user ``question`` under ``system``; the reply reduced to ``Yes.``, ``No.`` or ``Maybe.`` (so
        the user cannot leak what it hides), an unreadable one answered as unsure."""
        reply = self._ask_user(system, question)
        match = _YES_NO.search(reply)
        parsed = match.group(1).capitalize() if match else None
        self.exchanges.append(Exchange("user", question, reply, parsed))
        answer = f"{parsed}." if parsed else "Maybe."
        self._remember(question, answer)
        return Outcome(answer if parsed else "I am not sure how to answer that. Maybe.")

    def _remember(self, question: str, answer: str) -> None:
        self._history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# ------------------------------------------------------------------------------------------------ telepathy


@dataclass(frozen=True)
class TelepathyTask:
    """The entity the user thinks of, its ``category`` (told to the agent) and accepted ``aliases``."""

    id: str
    entity: str
    category: str
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("id", "entity", "category"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"TelepathyTask.{name} must be a non-empty str, got {getattr(self, name)!r}")
        if not isinstance(self.aliases, tuple) or not all(isinstance(a, str) and a.strip() for a in self.aliases):
            raise ValueError(f"TelepathyTask.aliases must be a tuple of non-empty str, got {self.aliases!r}")


_TELEPATHY = (
    ("giraffe", "animal", ()), ("penguin", "animal", ()), ("octopus", "animal", ()), ("honeybee", "animal", ("bee",)),
    ("dolphin", "animal", ()), ("owl", "animal", ()), ("crocodile", "animal", ("croc",)), ("kangaroo", "animal", ()),
    ("violin", "object", ()), ("umbrella", "object", ()), ("bicycle", "object", ("bike",)), ("telescope", "object", ()),
    ("candle", "object", ()), ("hammer", "object", ()), ("compass", "object", ()), ("kite", "object", ()),
    ("pineapple", "food", ()), ("pizza", "food", ()), ("sushi", "food", ()), ("chocolate", "food", ()),
    ("carrot", "food", ()), ("pancake", "food", ("pancakes",)), ("Eiffel Tower", "place", ("the eiffel tower",)),
    ("Sahara", "place", ("sahara desert",)), ("Mount Everest", "place", ("everest",)), ("Amazon River", "place", ()),
    ("Antarctica", "place", ()), ("Venice", "place", ()), ("volcano", "nature", ()), ("rainbow", "nature", ()),
    ("glacier", "nature", ()), ("lightning", "nature", ()),
)  # fmt: skip


def telepathy_tasks(
    split: str = "all", n: int | None = None, level: Any = None, seed: int = 0, path: str | None = None
) -> list[TelepathyTask]:
    """Telepathy tasks: the 32 built-in entities or, with ``path``, a JSON list of ``{"id", "entity",
    "category", "aliases"?}``; every fourth one is ``test``, the rest ``train`` (the two never share a task).
    Shuffled by ``seed``; the first ``n`` (default all). ``level`` is unused (registry signature)."""
    if path is not None:
        rows = _load_rows(path, ("id", "entity", "category"))
        for i, row in enumerate(rows):  # a string would become its letters, each then an exact match
            if not isinstance(row.get("aliases", []), list):
                raise ValueError(f"{path}: row {i}: 'aliases' must be a list of names, got {row['aliases']!r}")
        tasks = [TelepathyTask(str(r["id"]), r["entity"], r["category"], tuple(r.get("aliases", ()))) for r in rows]
    else:
        tasks = [TelepathyTask(f"tp-{i:03d}", e, c, a) for i, (e, c, a) in enumerate(_TELEPATHY)]
    return _shuffle_take(_split(tasks, split, every=4), n, f"telepathy/{seed}")


def _split(tasks: list, split: str, every: int) -> list:
    """The train / test split: every ``every``-th task is ``test``, the others ``train``."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if split == "all":
        return tasks
    return [t for i, t in enumerate(tasks) if (i % every == every - 1) == (split == "test")]


def _shuffle_take(tasks: list, n: int | None, key: str) -> list:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(tasks)):
        raise ValueError(f"n must be an int in 0..{len(tasks)}, got {n!r}")
    tasks = list(tasks)
    random.Random(key).shuffle(tasks)
    return tasks if n is None else tasks[:n]


def _load_rows(path: str, required: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = json.loads(Path(path).read_text())
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of task objects, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        missing = [k for k in required if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{path}: row {i} is missing keys {missing}")
    return rows


_TELEPATHY_DESCRIPTION = (
    "Telepathy: the user is thinking of one thing (you are told its category). Find out what it is by asking "
    "yes/no questions, then name it."
)
_TELEPATHY_CHOICES = {
    "action": "`content` is one yes/no question to the user about the thing; the user answers Yes, No or Maybe.",
    "answer": "`content` is your guess: the name of the thing. A correct guess ends the game; a wrong one "
    "costs the user effort and the game goes on.",
}
_TELEPATHY_NOTES = ("Ask questions that split the remaining possibilities in half; guess only when confident.",)


class TelepathyGym(LLMGym):
    """UserRL's Telepathy gym; tasks are :class:`TelepathyTask`. Reward 1 for a correct guess."""

    name = "telepathy"
    choices = ("action", "answer")

    def __init__(self, client: UserSimulatorClient, max_turns: int = 12, **kwargs: Any) -> None:
        super().__init__(client, max_turns, **kwargs)
        self.task: TelepathyTask | None = None

    def _reset(self, task: Any) -> list[dict[str, str]]:
        if not isinstance(task, TelepathyTask):
            raise TypeError(f"task must be a TelepathyTask, got {type(task).__name__}")
        self.task = task
        self._start()
        system = build_system_prompt(_TELEPATHY_DESCRIPTION, _TELEPATHY_CHOICES, _TELEPATHY_NOTES, self.max_turns)
        opening = f"I am thinking of something in the category '{task.category}'. Ask me yes/no questions."
        return [{"role": "system", "content": system}, {"role": "user", "content": opening}]

    def _question(self, question: str) -> Outcome:
        assert self.task is not None
        system = TELEPATHY_USER_PROMPT.format(entity=self.task.entity, category=self.task.category)
        return self._yes_no(system, question)

    def _answer(self, guess: str) -> Outcome:
        assert self.task is not None
        names = {_normalise_name(n) for n in (self.task.entity, *self.task.aliases)}
        if _normalise_name(guess) in names:
            correct: bool | None = True
            self.exchanges.append(Exchange("judge", guess, "", "exact match"))
        else:
            reply = self._judge(TELEPATHY_JUDGE_PROMPT.format(entity=self.task.entity), f"Guess: {guess}")
            correct = parse_verdict(reply)
            self.exchanges.append(Exchange("judge", guess, reply, None if correct is None else str(correct)))
        if correct:
            return Outcome(f"Yes! I was thinking of {self.task.entity}.", 1.0, terminated=True, success=True)
        return Outcome("No, that is not what I am thinking of.")


# ------------------------------------------------------------------------------------------------ intention


@dataclass(frozen=True)
class IntentionTask:
    """A vague ``request`` and the hidden ``intentions`` behind it (``"slot: value"`` strings)."""

    id: str
    request: str
    intentions: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"IntentionTask.id must be a non-empty str, got {self.id!r}")
        if not isinstance(self.request, str) or not self.request.strip():
            raise ValueError(f"IntentionTask.request must be a non-empty str, got {self.request!r}")
        if not self.intentions or not all(isinstance(s, str) and s.strip() for s in self.intentions):
            raise ValueError("IntentionTask.intentions must be a non-empty tuple of non-empty strings")


_INTENTION = (
    ("Help me plan a trip next month.",
     ("destination: Kyoto", "duration: 5 days", "budget: under 2000 dollars", "companion: my partner")),
    ("I need a new laptop.",
     ("use: video editing", "budget: about 1500 dollars", "screen: 15 inch or larger", "os: macOS")),
    ("Can you suggest a recipe for tonight?",
     ("diet: vegetarian", "time: under 30 minutes", "cuisine: Thai", "servings: 4 people")),
    ("I want to start exercising.",
     ("goal: lose weight", "place: at home", "time: 20 minutes a day", "equipment: none")),
    ("Find me a book to read.",
     ("genre: science fiction", "length: under 300 pages", "format: audiobook")),
    ("I'd like to learn a new language.",
     ("language: Spanish", "reason: travel to Mexico", "time: 15 minutes a day", "method: a phone app")),
    ("Recommend a gift for my friend.",
     ("occasion: birthday", "interest: gardening", "budget: under 50 dollars")),
    ("Help me write an email.",
     ("recipient: my manager", "purpose: ask for a day off", "date: next Friday", "tone: polite and short")),
    ("I want to adopt a pet.",
     ("animal: cat", "home: small apartment", "age: adult, not a kitten")),
    ("Plan a party for me.",
     ("occasion: graduation", "guests: 20 people", "place: backyard", "food: barbecue")),
)  # fmt: skip


def intention_tasks(
    split: str = "all", n: int | None = None, level: Any = None, seed: int = 0, path: str | None = None
) -> list[IntentionTask]:
    """Intention tasks: the 10 built-in requests or, with ``path``, a JSON list of ``{"id", "request",
    "intentions": [...]}``; every fifth one is ``test``, the rest ``train`` (the two never share a task).
    Shuffled by ``seed``; the first ``n`` (default all). ``level`` is unused (registry signature)."""
    if path is not None:
        rows = _load_rows(path, ("id", "request", "intentions"))
        tasks = [IntentionTask(str(r["id"]), r["request"], tuple(r["intentions"])) for r in rows]
    else:
        tasks = [IntentionTask(f"in-{i:03d}", r, s) for i, (r, s) in enumerate(_INTENTION)]
    return _shuffle_take(_split(tasks, split, every=5), n, f"intention/{seed}")


_INTENTION_DESCRIPTION = (
    "Intention: the user made a vague request and has specific details in mind that they did not state. "
    "Find out what they really want by asking clarifying questions, then summarise their full intention."
)
_INTENTION_CHOICES = {
    "action": "`content` is one clarifying question to the user; the user replies in free text.",
    "answer": "`content` is your summary of everything the user wants. It is scored by how many of the "
    "user's hidden details it covers; covering all of them ends the episode.",
}
_INTENTION_NOTES = ("Ask about one aspect at a time and include every detail you learned in the summary.",)


def _numbered(intentions: tuple[str, ...]) -> str:
    return "\n".join(f"{i}. {s}" for i, s in enumerate(intentions, 1))


def _detail_number(item: Any) -> int | None:
    """``item`` as a detail number: an int, or a str of at most 9 decimal digits (so ``int`` cannot fail)."""
    if isinstance(item, int) and not isinstance(item, bool):
        return item
    if isinstance(item, str) and item.strip().isdecimal() and len(item.strip()) <= 9:
        return int(item)
    return None


def parse_covered(reply: str, num_details: int) -> set[int] | None:
    """Detail numbers (1-based) a judge reply marks as covered: a JSON ``{"covered": [...]}`` object, or
    lines like ``2: yes``. None when the reply holds neither."""
    decoder = json.JSONDecoder()
    details = set(range(1, num_details + 1))
    for start in (m.start() for m in re.finditer(r"\{", reply)):
        try:
            obj, _ = decoder.raw_decode(reply, start)
        except (ValueError, RecursionError):  # bad JSON, a number beyond int()'s digit limit, deep nesting
            continue
        covered = obj.get("covered") if isinstance(obj, dict) else None
        if isinstance(covered, list):
            return details.intersection(map(_detail_number, covered))
    lines = _DETAIL_LINE.findall(reply)
    if not lines:
        return None
    positive = ("yes", "covered", "true")
    return details.intersection(_detail_number(i) for i, verdict in lines if verdict.lower() in positive)


def parse_verdict(reply: str) -> bool | None:
    """The telepathy judge's verdict: True only for an unambiguous CORRECT (no negation such as INCORRECT,
    "wrong" or "not" anywhere in the reply), False for a negative reply, None when the reply holds neither."""
    if _NEGATIVE.search(reply):
        return False
    return True if _CORRECT.search(reply) else None


class IntentionGym(LLMGym):
    """UserRL's Intention gym; tasks are :class:`IntentionTask`. Rewards sum to the best coverage."""

    name = "intention"
    choices = ("action", "answer")

    def __init__(self, client: UserSimulatorClient, max_turns: int = 10, **kwargs: Any) -> None:
        kwargs.setdefault("user_max_tokens", 96)
        super().__init__(client, max_turns, **kwargs)
        self.task: IntentionTask | None = None
        self.best_coverage = 0.0

    def _reset(self, task: Any) -> list[dict[str, str]]:
        if not isinstance(task, IntentionTask):
            raise TypeError(f"task must be an IntentionTask, got {type(task).__name__}")
        self.task = task
        self.best_coverage = 0.0
        self._start()
        system = build_system_prompt(_INTENTION_DESCRIPTION, _INTENTION_CHOICES, _INTENTION_NOTES, self.max_turns)
        return [{"role": "system", "content": system}, {"role": "user", "content": task.request}]

    def _question(self, question: str) -> Outcome:
        assert self.task is not None
        system = INTENTION_USER_PROMPT.format(request=self.task.request, intentions=_numbered(self.task.intentions))
        reply = self._ask_user(system, question)[:MAX_REPLY_CHARS].strip()
        self.exchanges.append(Exchange("user", question, reply, reply or None))
        reply = reply or "Sorry, I don't know."
        self._remember(question, reply)
        return Outcome(reply)

    def _answer(self, summary: str) -> Outcome:
        assert self.task is not None
        details = self.task.intentions
        values = [s.split(":", 1)[-1].strip() for s in details]  # "budget: cheap" -> "cheap"
        literal = {i for i, v in enumerate(values, 1) if re.search(rf"(?<!\w){re.escape(v)}(?!\w)", summary, re.I)}
        covered = set(literal)
        if len(literal) < len(details):
            system = INTENTION_JUDGE_PROMPT.format(intentions=_numbered(details))
            reply = self._judge(system, f"Summary: {summary}")
            judged = parse_covered(reply, len(details))
            self.exchanges.append(Exchange("judge", summary, reply, None if judged is None else str(sorted(judged))))
            covered |= judged or set()
        coverage = len(covered) / len(details)
        reward = max(0.0, coverage - self.best_coverage)
        self.best_coverage = max(self.best_coverage, coverage)
        done = len(covered) == len(details)
        feedback = f"Your summary covers {len(covered)} of the {len(details)} things I want."
        if done:
            feedback += " That is exactly what I want, thank you!"
        return Outcome(feedback, reward, terminated=done, success=done)
