"""torchrun worker of the SFT-data tests (not collected by pytest).

Every rank plays its share of the attempts with a teacher that solves attempt seeds divisible by 3, then a
second time with a teacher that fails on rank 1. Rank 0 writes {"episodes": [...], "errors": [per rank]} to
argv[2]; the config overrides come as JSON in argv[1].
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch.distributed as dist

from bao_fast.config import load_config
from bao_fast.envs.teachers.episode import TeacherEpisode
from bao_fast.train import sft_data
from bao_fast.train.collectives import gather_objects


class SeedTeacher:
    """Solves exactly the attempts whose seed is divisible by 3; its one turn names the task and seed."""

    def __init__(self, fail_on_rank: int | None = None) -> None:
        self.fail_on_rank = fail_on_rank

    def play(self, task: Any, seed: int | None = None) -> TeacherEpisode:
        if dist.get_rank() == self.fail_on_rank:
            raise ConnectionError("teacher server unreachable")
        messages = [{"role": "system", "content": "s"}, {"role": "user", "content": f"task {task}"},
                    {"role": "assistant", "content": f"seed {seed}"}, {"role": "user", "content": "done"}]
        return TeacherEpisode(messages, success=seed % 3 == 0, num_turns=1)


def main() -> None:
    dist.init_process_group("gloo")
    cfg = load_config(None, json.loads(sys.argv[1]))
    sft_data.sft_teacher = lambda cfg: SeedTeacher()
    episodes = sft_data.solved_episodes(cfg)
    sft_data.sft_teacher = lambda cfg: SeedTeacher(fail_on_rank=1)
    try:
        sft_data.solved_episodes(cfg)
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    errors = gather_objects(error)
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump({"episodes": episodes, "errors": errors}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
