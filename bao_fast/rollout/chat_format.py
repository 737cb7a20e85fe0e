"""Token ids that the chat template puts between turns, derived once from the template itself.

The agent loop never re-tokenises a conversation: a turn's prompt is the previous prompt, plus the
engine's output ids verbatim, plus the ids of the text the template writes after an assistant message and
around the next user message. For the shipped Qwen-style template that text is::

    <|im_end|>\\n<|im_start|>user\\n{feedback}<|im_end|>\\n<|im_start|>assistant\\n

and its leading eos (``<|im_end|>``) is dropped when the engine already generated it, so that the eos
belongs to the assistant segment exactly when the engine produced it. ``ChatFormat`` finds these pieces by
rendering the template with marker strings, so any template that renders assistant and user messages
in order works. Because each piece starts at a special token (eos or the template's turn marker), the
ids equal those of a fresh tokenisation of the whole conversation whenever the engine's outputs are the
canonical tokenisation of their text and end in eos (see ``tests/rollout/test_agent_loop.py``).

Message text from outside the policy (a gym's opening messages, a user simulator's feedback, a teacher
model's turn) is tokenised with its special-token spellings split into ordinary tokens: a task or a reply that
writes ``<|im_end|>`` cannot close a turn or open a new one in the token stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from transformers import PreTrainedTokenizerBase

_ASSISTANT_MARK = "\x1eBAO-ASSISTANT\x1e"
_USER_MARK = "\x1eBAO-USER\x1e"
_MESSAGE_MARK = "\x1eBAO-MESSAGE-{}\x1e"


@dataclass(frozen=True)
class ChatFormat:
    """Template-derived turn wrappers for one tokenizer; build it with ``ChatFormat.from_tokenizer``."""

    tokenizer: PreTrainedTokenizerBase
    eos_text: str
    after_assistant: str  # template text between an assistant message's content and the next user content
    after_user: str  # template text between a user message's content and the next assistant content

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> ChatFormat:
        """Render a marker conversation to locate the turn wrappers; ValueError if the template hides them."""
        if tokenizer.chat_template is None or tokenizer.eos_token is None:
            raise ValueError("tokenizer must have a chat_template and an eos_token")
        messages = [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": _ASSISTANT_MARK},
            {"role": "user", "content": _USER_MARK},
        ]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if text.count(_ASSISTANT_MARK) != 1 or text.count(_USER_MARK) != 1:
            raise ValueError("tokenizer.chat_template does not render assistant and user contents verbatim")
        after_assistant, after_user = text.split(_ASSISTANT_MARK, 1)[1].split(_USER_MARK, 1)
        return cls(tokenizer, tokenizer.eos_token, after_assistant, after_user)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Ids of the opening ``messages`` rendered with the generation prompt. The template's text is encoded
        as the template writes it; each message's content as plain text (see :meth:`text_ids`)."""
        marks = [_MESSAGE_MARK.format(i) for i in range(len(messages))]
        marked = [{**message, "content": mark} for message, mark in zip(messages, marks, strict=True)]
        rest = self.tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
        encode = self.tokenizer.encode
        ids: list[int] = []
        for mark, message in zip(marks, messages, strict=True):
            if rest.count(mark) != 1:
                raise ValueError("tokenizer.chat_template does not render each message's content verbatim once")
            head, rest = rest.split(mark)
            ids += [*encode(head, add_special_tokens=False), *self.text_ids(message["content"])]
        return ids + encode(rest, add_special_tokens=False)

    def text_ids(self, text: str) -> list[int]:
        """Ids of message ``text`` as plain text: special-token spellings in it become ordinary tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def feedback_ids(self, feedback: str, assistant_ended_with_eos: bool) -> list[int]:
        """Ids that close the assistant turn and carry ``feedback`` (plain text, see :meth:`text_ids`) as
        the next user message, up to and including the next generation prompt."""
        closing = self._closing_ids[assistant_ended_with_eos]
        return [*closing, *self.text_ids(feedback), *self._after_user_ids]

    @cached_property
    def _closing_ids(self) -> dict[bool, tuple[int, ...]]:
        """Ids of the template text that closes an assistant turn, keyed by whether the engine's output ended
        in eos (then the text's leading eos is dropped); encoded once, not every turn."""
        closing = self.after_assistant
        without_eos = closing[len(self.eos_text) :] if closing.startswith(self.eos_text) else closing
        encode = self.tokenizer.encode
        return {False: tuple(encode(closing, add_special_tokens=False)),
                True: tuple(encode(without_eos, add_special_tokens=False))}

    @cached_property
    def _after_user_ids(self) -> tuple[int, ...]:
        """Ids of the template text between a user message and the next generation, encoded once."""
        return tuple(self.tokenizer.encode(self.after_user, add_special_tokens=False))
