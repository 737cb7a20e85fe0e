"""Build the small byte-level BPE tokenizer shipped in ``bao_fast/assets/tokenizer``.

Run once by a maintainer (``python tools/build_tokenizer.py``); the output is committed so tests and the
demo never download anything. The corpus is generated from the gym vocabulary, arithmetic and the chat /
tool-call markup, so common agent phrases become single tokens.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

OUT_DIR = Path(__file__).resolve().parents[1] / "bao_fast" / "assets" / "tokenizer"
VOCAB_SIZE = 2044  # + 4 markup tokens = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Reasoning / tool markup: single tokens, but *not* special, so decoding keeps them (as Qwen does).
MARKUP_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
PHRASES = [
    "You are a proactive agent.", "The hidden rule uses a, b, c and d.", "Reward:", "[action]", "[search]",
    "[answer]", "[finish]", "interact_with_env", '{"name": "interact_with_env", "arguments": {"choice": ',
    '"content": ', "What I know so far:", "Hypotheses:", "Remaining turns:", "Plan:", "refuted", "consistent",
    "The test case is", "The result is", "Correct answer.", "Wrong answer.", "Invalid action.", "turns left",
    "Is it", "Yes.", "No.", "attribute", "entity", "question", "user", "assistant", "system", "observation",
    "function", "probe", "separate", "candidate", "evaluate", "submit", "because", "therefore", "then",
]


def corpus(n_lines: int = 20000, seed: int = 0) -> list[str]:
    """Synthetic training text: phrases, expressions over a..d and numbers, chat markup."""
    rng = random.Random(seed)
    ops = ["+", "-", "*", "/", "**"]
    lines = []
    for _ in range(n_lines):
        expr = " ".join(
            itertools.chain.from_iterable((v, rng.choice(ops)) for v in rng.sample("abcd", 4))
        )[:-2]
        nums = " ".join(str(rng.randint(-200, 2000)) for _ in range(4))
        lines.append(
            f"{rng.choice(PHRASES)} {expr} {nums} {rng.choice(PHRASES)} {rng.random():.4f} "
            f"{rng.choice(PHRASES).lower()}"
        )
    return lines


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 8192
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(OUT_DIR)
    print(f"saved {len(fast)} tokens to {OUT_DIR}")


if __name__ == "__main__":
    main()
