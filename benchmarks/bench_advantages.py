"""Benchmark ``bao_fast.ops.shaped_advantages`` against the way trainers compute BAO's advantages today.

Baselines, in the same run and on the same batch:

* ``python-loop``: a per-trajectory Python loop like the BAO release (a fork of UserRL's verl trainer):
  turn rewards pulled to the host, penalties / reward-to-go / scores in Python per trajectory, group stats
  from a dict of lists, then one tensor write per trajectory for its tokens;
* ``torch-eager``: the vectorised torch implementation (``shaped_advantages_torch``: segment ops,
  ``torch.unique``, a loop over the turn index only); it synchronises with the host on a GPU.

``bao_fast`` is the public op: the four Triton kernels on CUDA, the torch implementation on the CPU (so on
the CPU the two coincide). Reports the median time, speed-up over the loop, effective bandwidth (bytes of
the inputs and outputs / time; % of the H100's 3.35 TB/s on a GPU) and max abs difference to the loop.
Writes ``benchmarks/results/shaped_advantages-<device>.json``.

    python benchmarks/bench_advantages.py     # CUDA: PERF.md's 4096 x 16 turns x 512 tokens; CPU: 256 x 16 x 64
    python benchmarks/bench_advantages.py --trajectories 512 --turns 16 --tokens-per-turn 128
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hbm_bytes_per_s, peak_memory, print_table, timeit_median, write_results

from bao_fast.algo.shaping import ShapingConfig, preset
from bao_fast.ops.advantages import ShapedAdvantages, shaped_advantages, shaped_advantages_torch

GROUP_SIZE = 8


OBSERVATION_TOKENS = 64  # untrained tokens (the environment's reply) opening every turn


def make_batch(num_traj: int, turns: int, tokens_per_turn: int, device: torch.device, seed: int = 0):
    """A packed batch like a BAO step, of PERF.md's shape: ``num_traj`` trajectories of exactly ``turns`` turns
    of exactly ``tokens_per_turn`` tokens, each turn opening with ``OBSERVATION_TOKENS`` untrained observation
    tokens (half the turn when it is shorter than twice that) before its trained assistant tokens. Groups of 8
    rollouts of one prompt (shuffled ids), rewards mostly 0 with a final success for 40% of trajectories, 60%
    answer turns. Returns the op's inputs plus the token span of every trajectory (for the loop baseline)."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(num_traj + 1) * turns
    num_turns = num_traj * turns
    success = torch.rand(num_traj, generator=gen) < 0.4
    rewards = torch.zeros(num_turns)
    rewards[offsets[1:][success] - 1] = 1.0
    answers = torch.rand(num_turns, generator=gen) < 0.6
    groups = torch.randperm(num_traj, generator=gen) // GROUP_SIZE * 7919 - 10**9
    observation = observation_tokens(tokens_per_turn)
    position = torch.arange(tokens_per_turn).repeat(num_turns)
    turn_of_token = torch.arange(num_turns).repeat_interleave(tokens_per_turn)
    token_turns = torch.where(position < observation, -1, turn_of_token).int()
    inputs = (rewards, answers, offsets.int(), groups, token_turns)
    return tuple(t.to(device) for t in inputs), (offsets * tokens_per_turn).tolist()


def observation_tokens(tokens_per_turn: int) -> int:
    """Untrained tokens at the start of each turn: ``OBSERVATION_TOKENS``, or half of a shorter turn."""
    return min(OBSERVATION_TOKENS, tokens_per_turn // 2)


def python_loop(
    rewards: torch.Tensor,
    answers: torch.Tensor,
    offsets: torch.Tensor,
    groups: torch.Tensor,
    token_turns: torch.Tensor,
    token_spans: list[int],
    cfg: ShapingConfig,
) -> torch.Tensor:
    """Per-trajectory loop of BAO.md's formulas, the structure of the release's advantage estimator."""
    r, a, off, gids = rewards.tolist(), answers.tolist(), offsets.tolist(), groups.tolist()
    credits_of, scores = [], []
    for b in range(len(gids)):
        rb, ab = r[off[b] : off[b + 1]], a[off[b] : off[b + 1]]
        n, total = len(rb), sum(rb)
        shaped = list(rb)
        for t in range(1, n):
            if total <= 0 and ab[t] and ab[t - 1]:
                shaped[t] -= cfg.info_seeking_coef
        if cfg.overthinking_coef > 0 and total == 0 and n < cfg.horizon:
            big_p = cfg.overthinking_coef * (cfg.horizon - n) + 0.2
            for t in range(1, n):
                shaped[t] -= big_p / (n + 1)
            if n == 1:
                shaped[0] -= 0.5
        credits, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            running = shaped[t] + cfg.gamma * running
            credits[t] = running
        credits_of.append(credits)
        scores.append(sum(shaped))
    members = defaultdict(list)
    for b, g in enumerate(gids):
        members[g].append(scores[b])
    token_adv = torch.zeros(token_turns.numel(), dtype=rewards.dtype, device=rewards.device)
    for b, g in enumerate(gids):
        group = members[g]
        if len(group) == 1:
            adv = scores[b] / (1.0 + cfg.eps)
        elif min(group) == max(group):
            adv = 0.0
        else:
            mean = sum(group) / len(group)
            std = math.sqrt(sum((s - mean) ** 2 for s in group) / (len(group) - 1))
            adv = (scores[b] - mean) / (std + cfg.eps)
        lo, hi = token_spans[b], token_spans[b + 1]
        turn_ids = token_turns[lo:hi].long()
        trained = turn_ids >= 0
        credit = torch.tensor(credits_of[b], dtype=rewards.dtype, device=rewards.device)
        tok_credit = torch.where(trained, credit[(turn_ids - off[b]).clamp(min=0)], 0.0)
        c_sum = float(tok_credit.sum())
        if c_sum != 0.0:
            nonzero = float((tok_credit != 0).sum())
            token_adv[lo:hi] = tok_credit * (adv * nonzero / c_sum)
    return token_adv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trajectories", type=int, default=None, help="default 4096 on CUDA, 256 on CPU")
    parser.add_argument("--turns", type=int, default=16)
    parser.add_argument("--tokens-per-turn", type=int, default=None, help="default 512 on CUDA, 64 on CPU")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--loop-repeats", type=int, default=None, help="repeats of the slow loop baseline (5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a loaded machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    num_traj = args.trajectories or (4096 if on_gpu else 256)
    tokens_per_turn = args.tokens_per_turn or (512 if on_gpu else 64)
    hbm = hbm_bytes_per_s(device)
    cfg = preset("bao", horizon=args.turns)
    inputs, spans = make_batch(num_traj, args.turns, tokens_per_turn, device)
    num_tokens = inputs[4].numel()

    impls = {
        "bao_fast": lambda: shaped_advantages(*inputs, cfg).token_advantages,
        "torch-eager": lambda: shaped_advantages_torch(*inputs, cfg).token_advantages,
        "python-loop": lambda: python_loop(*inputs, spans, cfg),
    }
    expected = impls["python-loop"]()
    out: ShapedAdvantages = shaped_advantages(*inputs, cfg)
    io_bytes = sum(t.numel() * t.element_size() for t in (*inputs, *out))
    rows, loop_ms = [], None
    for name in ("python-loop", "torch-eager", "bao_fast"):
        repeats = (args.loop_repeats or 5) if name == "python-loop" else args.repeats
        timing = timeit_median(impls[name], warmup=1 if name == "python-loop" else 3, repeats=repeats, device=device)
        ms = timing["median_ms"]
        loop_ms = loop_ms or ms
        row = {
            "impl": name,
            "median_ms": ms,
            "speedup_vs_loop": loop_ms / ms,
            "GB_per_s": io_bytes / ms / 1e6,
            "peak_mem_MB": peak_memory(impls[name], device) / 2**20,
            "max_abs_diff": float((impls[name]().double() - expected.double()).abs().max()),
            "repeats": repeats,
        }
        if hbm:
            row["pct_of_hbm"] = 100 * io_bytes / (ms * 1e-3) / hbm
        rows.append(row)
    shape = {
        "trajectories": num_traj,
        "turns_per_trajectory": args.turns,
        "tokens_per_turn": tokens_per_turn,
        "observation_tokens_per_turn": observation_tokens(tokens_per_turn),
        "turns": inputs[0].numel(),
        "tokens": num_tokens,
        "io_bytes": io_bytes,
    }
    print_table(rows, title=f"shaped_advantages on {device} ({shape})")
    path = write_results(
        "shaped_advantages",
        {"shape": shape, "dtype": "float32", "config": repr(cfg), "hbm_bytes_per_s": hbm, "results": rows},
        device,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
