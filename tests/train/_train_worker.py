"""torchrun / subprocess worker for the trainer tests (not collected by pytest).

Registers a one-turn "coin" gym whose reward depends on the parity of the generated text's length, so a
random-weight tiny model gets varied rewards (non-zero GRPO advantages) in a few tokens. Then runs
``bao_fast.train.rl.train`` (or, with "stage": "sft", ``bao_fast.train.sft.run_sft``) on the config built
from argv[1] (JSON: {"config": path | null, "overrides": [...], "stop_after": int | null, "stage": ...}) and,
on rank 0, writes {"evals": ...} (or {"model": path | null}) and "world_size" to argv[2]. A run stopped by a
signal (``StopRequested``) writes {"stopped": message} and exits like the command line, with 128 + the signal.
"signal_at_sft_export": a signal name the process sends itself as SFT's export begins (the end of its last step).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import torch.distributed as dist

from bao_fast.cli import StopRequested
from bao_fast.config import load_config
from bao_fast.envs import GYMS, TASKS
from bao_fast.envs.base import Gym, Outcome, StepResult, ToolCall
from bao_fast.train import sft
from bao_fast.train.rl import train


class CoinGym(Gym):
    """One turn: reward 1 when the assistant's text has an even number of characters."""

    name = "coin"

    def _reset(self, task: Any) -> list[dict[str, str]]:
        return [{"role": "system", "content": "Reply."}, {"role": "user", "content": f"Task {task}: say something."}]

    def _act(self, call: ToolCall) -> Outcome:  # every turn goes through step()
        raise AssertionError("unreachable")

    def step(self, action_text: str) -> StepResult:
        self._turn += 1
        self._done = True
        reward = float(len(action_text) % 2 == 0)
        self._success = reward > 0
        info = {"choice": "answer", "content": action_text, "user_involved": True, "success": self._success,
                "turn": self._turn, "error": None}
        return StepResult(f"Reward: {reward}", reward, True, False, info)


def coin_tasks(split: str, n: int | None, level: Any, seed: int, path: str | None) -> list[str]:
    return [f"{split}-{seed}-{i}" for i in range(n or 8)]


def signal_at_sft_export(signum: signal.Signals) -> None:
    export = sft.export_hf

    def signalled(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signum)
        return export(*args, **kwargs)

    sft.export_hf = signalled


def main() -> int:
    GYMS["coin"] = CoinGym
    TASKS["coin"] = coin_tasks
    spec = json.loads(sys.argv[1])
    if spec.get("signal_at_sft_export"):
        signal_at_sft_export(signal.Signals[spec["signal_at_sft_export"]])
    cfg = load_config(spec.get("config"), spec["overrides"])
    status = 0
    try:
        if spec.get("stage") == "sft":
            model = sft.run_sft(cfg, stop_after=spec.get("stop_after"))
            result: dict[str, Any] = {"model": model and str(model)}
        else:
            result = {"evals": train(cfg, stop_after=spec.get("stop_after"))}
    except StopRequested as exc:  # as the command line reports it
        print(f"bao-fast: {exc}", file=sys.stderr, flush=True)
        result, status = {"stopped": str(exc)}, 128 + exc.signum
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump({**result, "world_size": dist.get_world_size()}, f)
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
