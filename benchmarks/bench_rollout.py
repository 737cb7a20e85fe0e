"""Benchmark the multi-turn rollout layer: episodes/s and tokens/s of ``run_episodes`` per engine.

Workload: ``--tasks`` prompts × ``--group-size`` episodes, each ``--max-turns`` turns of at most
``--max-tokens`` sampled tokens (a random-weight model almost never samples eos, so turns are full length
unless ``--stop-fraction f`` makes a seeded fraction f of the vocabulary stop tokens: turns then end after a
roughly geometric number of tokens, mean about 1/f, as a real policy's replies vary) with a short fixed
environment reply between turns (``ReplyGym`` never ends an episode early, so the shape
does not depend on what the model writes). ``--user-latency-ms L`` makes every reply take a seeded
uniform 0..2L ms, as a user simulator behind a server does. Configurations, in the same run and on the same
workload:

* ``vllm``: ``run_episodes`` on ``VLLMEngine`` with continuous scheduling (an episode's next turn joins the
  running batch as soon as its reply is in);
* ``vllm-rounds`` / ``hf``: ``VLLMEngine`` / ``HFEngine`` in rounds (all live episodes in one ``generate``
  call per turn, then all replies), the baseline continuous scheduling is measured against
  (``speedup_vs_rounds``);
* ``vllm-sequential`` / ``hf-sequential``: the same episodes played one at a time (how a naive agent loop
  drives an engine), the baseline that batching across episodes is measured against. They are slow by
  design and timed ``--baseline-repeats`` times (default 3), the batched runs ``--repeats`` times (20).

Reports the median wall time of a rollout, episodes/s, generated tokens/s (assistant tokens), total
tokens/s (prompt + feedback + generated, the tokens a trainer then packs) and the peak extra tensor memory of
one rollout (``common.peak_memory``; a vLLM engine's KV cache is allocated at start-up, not counted).
Models: ``tiny`` (the test model, fp32 on the CPU) or ``qwen`` (GPU only: a random-weight Qwen2 with
Qwen3-4B's layer shapes, hidden 2560, 36 layers, 32/8 heads of 128, MLP 9728, bf16, vocabulary 2048 of the
shipped tokenizer).
Engines: ``--engines``, else hf and vLLM, where vLLM is not installed hf only and a ``skipped`` row for vLLM
that says why. Writes ``benchmarks/results/rollout-<device>.json`` after every engine, with ``complete:
false`` until the last (a run that fails in a later engine keeps the rows of the earlier ones).

    python benchmarks/bench_rollout.py                           # tiny model, CPU-sized workload
    python benchmarks/bench_rollout.py --engines vllm --max-turns 8 --max-tokens 96 --user-latency-ms 30 --no-sequential
    python benchmarks/bench_rollout.py --model qwen --tasks 64 --group-size 8 --max-tokens 512   # GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_memory, print_table, timeit_median, write_results

from bao_fast.config import RolloutConfig
from bao_fast.envs.base import Gym, StepResult
from bao_fast.models import TinyModelSpec, create_tiny_model, load_tokenizer
from bao_fast.rollout import GenerationParams, HFEngine, Trajectory, run_episodes
from bao_fast.rollout.engine import missing_engine

QWEN3_4B_SHAPE = TinyModelSpec(
    hidden_size=2560,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=9728,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
)


class ReplyGym(Gym):
    """Answers every turn with the same short observation, after a uniform 0..2 ``latency_s`` seconds seeded by
    (``episode``, turn): the same latencies in every run and scheduling), and runs to its turn budget."""

    name = "reply"

    def __init__(self, max_turns: int, latency_s: float = 0.0, episode: int = 0):
        super().__init__(max_turns=max_turns)
        self.latency_s, self.episode = latency_s, episode

    def _reset(self, task: Any) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": "You probe a hidden function f(a, b, c, d) and then answer f(test)."},
            {"role": "user", "content": f"Task {task}: the hidden function is fixed. Start when ready."},
        ]

    def _act(self, call: Any) -> Any:  # never reached: step is overridden
        raise NotImplementedError

    def step(self, action_text: str) -> StepResult:
        if self.latency_s:
            time.sleep(random.Random(f"{self.episode}-{self._turn}").uniform(0.0, 2.0 * self.latency_s))
        self._turn += 1
        self._done = self._turn >= self.max_turns
        info = {"choice": "action", "user_involved": False, "success": False, "turn": self._turn}
        return StepResult("f(1, 2, 3, 4) = 10\nReward: 0.0", 0.0, False, self._done, info)


DEFAULT_ENGINES = ("hf", "vllm")  # hf first: vLLM lowers torch's thread count for the rest of the process


def engines_to_run(requested: str | None) -> tuple[list[str], list[dict[str, str]]]:
    """The engines of ``--engines`` (ValueError naming the flag when one cannot run here), else the default
    engines that can, and a skipped row for each default one that cannot."""
    if requested is not None:
        names = requested.split(",")
        for name in names:
            if (reason := missing_engine(name)) is not None:
                raise ValueError(f"--engines {name}: {reason}")
        return names, []
    missing = {name: missing_engine(name) for name in DEFAULT_ENGINES}
    skipped = [{"engine": name, "skipped": why} for name, why in missing.items() if why is not None]
    return [name for name, why in missing.items() if why is None], skipped


def make_engine(name: str, model_dir: Path, cfg: RolloutConfig, device: torch.device) -> Any:
    if name == "hf":
        return HFEngine.from_config(model_dir, cfg, device=device, max_batch_size=256)
    from bao_fast.rollout.vllm_engine import VLLMEngine

    return VLLMEngine.from_config(model_dir, cfg, seed=0)


def stop_tokens(fraction: float, vocab_size: int) -> tuple[int, ...]:
    """A seeded ``fraction`` of the token ids ``[3, vocab_size)`` (the specials below 3 left out)."""
    ids = list(range(3, vocab_size))
    return tuple(sorted(random.Random(0).sample(ids, round(fraction * len(ids)))))


def rollout(engine: Any, tokenizer: Any, args: argparse.Namespace, mode: str) -> list[Trajectory]:
    """The workload's episodes: ``mode`` continuous / rounds (all at once), or sequential (one at a time)."""
    params = GenerationParams(max_tokens=args.max_tokens, temperature=1.0, seed=0,
                              stop_token_ids=stop_tokens(args.stop_fraction, len(tokenizer)))
    episodes = itertools.count()  # gyms are made in episode order
    gym = lambda: ReplyGym(args.max_turns, args.user_latency_ms / 1e3, next(episodes))  # noqa: E731
    tasks = list(range(args.tasks))
    play = dict(params=params, max_turns=args.max_turns, env_workers=args.tasks * args.group_size)
    if mode != "sequential":
        return run_episodes(engine, tokenizer, gym, tasks, group_size=args.group_size, scheduling=mode, **play)
    return [
        traj
        for task in tasks
        for _ in range(args.group_size)
        for traj in run_episodes(engine, tokenizer, gym, [task], **play)
    ]


def bench_engine(
    name: str, model_dir: Path, cfg: RolloutConfig, device: torch.device, tokenizer: Any, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The rows of engine ``name``: all episodes at once (vLLM: continuous, then in rounds; hf: in rounds)
    and, unless ``--no-sequential``, one episode at a time."""
    t0 = time.perf_counter()
    engine = make_engine(name, model_dir, cfg, device)
    init_s = time.perf_counter() - t0
    rows = []
    modes = ["continuous", "rounds"] if name == "vllm" else ["rounds"]
    for mode in modes if args.no_sequential else [*modes, "sequential"]:
        trajs = rollout(engine, tokenizer, args, mode)
        stats = timeit_median(
            lambda e=engine, m=mode: rollout(e, tokenizer, args, m),
            warmup=args.warmup,
            repeats=args.baseline_repeats if mode == "sequential" else args.repeats,
            device=device,
        )
        seconds = stats["median_ms"] / 1e3
        generated = sum(len(t.assistant_token_ids) for t in trajs)
        rows.append(
            {
                "engine": name if mode == modes[0] else f"{name}-{mode}",
                "episodes": len(trajs),
                "turns": sum(t.num_turns for t in trajs),
                "median_s": seconds,
                "episodes_per_s": len(trajs) / seconds,
                "gen_tokens_per_s": generated / seconds,
                "total_tokens_per_s": sum(t.num_tokens for t in trajs) / seconds,
                "engine_init_s": init_s,
                "repeats": stats["repeats"],
                "peak_mem_MB": peak_memory(lambda e=engine, m=mode: rollout(e, tokenizer, args, m), device) / 2**20,
            }
        )
    if name == "vllm":
        engine.shutdown()
    return rows


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Set every timed row's ``speedup_vs_sequential`` (its engine's sequential median / its median) and the
    continuous vLLM row's ``speedup_vs_rounds``."""
    medians = {row["engine"]: row["median_s"] for row in rows if "median_s" in row}
    for row in rows:
        if "median_s" in row:
            engine = row["engine"].split("-")[0]
            baseline = medians.get(f"{engine}-sequential")
            row["speedup_vs_sequential"] = baseline / row["median_s"] if baseline else None
            if row["engine"] == "vllm" and "vllm-rounds" in medians:
                row["speedup_vs_rounds"] = medians["vllm-rounds"] / row["median_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "qwen"], default="tiny")
    parser.add_argument(
        "--engines",
        default=None,
        help="comma-separated, run in order (default: hf,vllm, vllm left out where it is not installed; vLLM "
        "lowers torch's thread count for the rest of the process, so hf goes first)",
    )
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stop-fraction", type=float, default=0.03,
                        help="fraction of the vocabulary that ends a turn (varied turn lengths, mean ~1/f)")
    parser.add_argument("--user-latency-ms", type=float, default=20.0,
                        help="mean time the environment takes per reply (uniform 0..2x, seeded)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--baseline-repeats", type=int, default=3, help="repeats of the sequential baselines")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-sequential", action="store_true", help="skip the one-episode-at-a-time baselines")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.model == "qwen" and device.type != "cuda":
        parser.error("--model qwen needs a GPU")
    try:
        engines, skipped = engines_to_run(args.engines)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    spec, dtype = (QWEN3_4B_SHAPE, torch.bfloat16) if args.model == "qwen" else (TinyModelSpec(), torch.float32)
    model_dir = create_tiny_model(Path(tempfile.gettempdir()) / f"bao-fast-bench-{args.model}", spec, dtype=dtype)
    tokenizer = load_tokenizer()
    max_model_len = 256 + args.max_turns * (args.max_tokens + 64)
    cfg = RolloutConfig(max_model_len=max_model_len, gpu_memory_utilization=0.6, enforce_eager=device.type != "cuda")
    payload = {
        "model": args.model,
        "model_spec": dataclasses.asdict(spec),
        "dtype": str(dtype),
        "workload": {
            k: getattr(args, k)
            for k in ("tasks", "group_size", "max_turns", "max_tokens", "stop_fraction", "user_latency_ms")
        },
        "max_model_len": max_model_len,
    }
    rows: list[dict[str, Any]] = []
    for i, name in enumerate(engines, start=1):
        rows += bench_engine(name, model_dir, cfg, device, tokenizer, args)
        add_speedups(rows)
        path = write_results("rollout", {**payload, "complete": i == len(engines), "rows": rows + skipped}, device)
    print_table(rows + skipped, title=f"rollout ({args.model} model, {device.type})")
    print("wrote", path)


if __name__ == "__main__":
    main()
