"""fp64 references, a test gym and helpers shared by the rollout tests (imported, not collected)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from bao_fast.envs import Gym, StepResult


def load_hf(path: Path) -> PreTrainedModel:
    """The checkpoint as an fp32 transformers model in eval mode."""
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def reference_logprobs(
    model: PreTrainedModel, prompt: list[int], output: list[int], temperature: float
) -> torch.Tensor:
    """fp64 log-probs of ``output`` after ``prompt`` under ``softmax(logits / temperature)`` (1 if 0)."""
    ids = torch.tensor([prompt + output])
    logits = model(ids).logits[0, len(prompt) - 1 : -1].double()
    scale = temperature if temperature > 0 else 1.0
    return (logits / scale).log_softmax(-1).gather(-1, torch.tensor(output)[:, None]).squeeze(-1)


@torch.no_grad()
def reference_greedy(model: PreTrainedModel, prompt: list[int], max_tokens: int, stop: set[int]) -> list[int]:
    """Greedy decoding by full forward passes (no KV cache, no padding): arg-max of fp64 logits."""
    ids = list(prompt)
    for _ in range(max_tokens):
        tok = int(model(torch.tensor([ids])).logits[0, -1].double().argmax())
        ids.append(tok)
        if tok in stop:
            break
    return ids[len(prompt) :]


def perturb_(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Add seeded Gaussian noise to every parameter in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


class EndlessGym(Gym):
    """Accepts any text (even without a tool call) so a random-weight model plays several turns; remembers its
    ``task``."""

    name = "endless"

    def _reset(self, task: Any) -> list[dict[str, str]]:
        self.task = task
        return [{"role": "system", "content": "Say anything."}, {"role": "user", "content": f"Task {task}."}]

    def _act(self, call):  # pragma: no cover - never reached, step is overridden
        raise AssertionError

    def step(self, action_text: str) -> StepResult:
        self._turn += 1
        truncated = self._turn >= self.max_turns
        self._done = truncated
        info = {"choice": "action", "user_involved": False, "success": False, "turn": self._turn}
        return StepResult(
            f"Observation {self._turn}: {len(action_text)} chars.\nReward: 0.0", 0.0, False, truncated, info
        )
