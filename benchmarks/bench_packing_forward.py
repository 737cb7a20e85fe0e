"""Benchmark the packed log-prob forward: padded vs packed with a dense mask (old) vs packed varlen (new).

The same trajectories (multi-turn, lengths drawn from ``--min-len``..``--max-len`` tokens) are split into the
trainer's token-budget micro-batches (``PackedBatch.micro_batch_bounds``) and scored three ways, forward only
(no grad) and forward + backward (``logp.sum()``):

* ``padded``: each micro-batch as ``[B, L_max]`` right-padded rows with an attention mask (the baseline);
* ``packed_dense``: one packed stream, transformers building the ``[T, T]`` block-diagonal mask from the
  restarting ``position_ids`` (``packed_token_logprobs`` before ``bao_fast.models.varlen_attention``);
* ``packed_varlen``: ``packed_token_logprobs`` as it is, per-trajectory causal attention without a mask.

Each implementation runs on its own copy of the same random-weight Qwen2-shaped model (sdpa, fp32 on the CPU,
bf16 on a GPU). Reports the median over ``--repeats`` timed runs after warm-up (taken round-robin across the
implementations, see ``interleaved_times``), the speed-up over padded,
peak extra memory and the max abs logp difference to padded. Writes
``benchmarks/results/packing_forward-<device>.json``.

    python benchmarks/bench_packing_forward.py
    python benchmarks/bench_packing_forward.py --trajectories 4 --repeats 3   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_memory, print_table, timeit_median, write_results

from bao_fast.data.packed import PackedBatch
from bao_fast.data.segments import pack_segments
from bao_fast.models import TinyModelSpec, create_tiny_model
from bao_fast.models.forward import backbone, lm_head, packed_token_logprobs
from bao_fast.ops.logprobs import token_logprobs

# The demo's Qwen2-shaped tiny model (hidden 128, 2 layers, 2 query / 1 kv heads of dim 64, vocab 2048).
SPEC = TinyModelSpec()
Segments = list[tuple[str, list[int]]]


def make_trajectories(n: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[Segments]:
    """``n`` trajectories of uniform length in ``[min_len, max_len]``: a prompt, then assistant / observation
    turns of 40..200 tokens (the last segment is cut to fit)."""
    gen = torch.Generator().manual_seed(seed)
    trajectories = []
    for _ in range(n):
        total = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        segments: Segments = []
        roles = ("user", "assistant", "observation", "assistant")
        used = 0
        while used < total:
            n_tok = min(int(torch.randint(40, 201, (1,), generator=gen)), total - used)
            role = roles[len(segments) % len(roles)]
            segments.append((role, torch.randint(3, vocab, (n_tok,), generator=gen).tolist()))
            used += n_tok
        trajectories.append(segments)
    return trajectories


def padded_logprobs(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Target-row log-probs of ``batch`` from a right-padded ``[B, L_max]`` forward with an attention mask."""
    cu = batch.cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    mask = torch.arange(int(lens.max()), device=cu.device)[None, :] < lens[:, None]
    ids = torch.zeros(mask.shape, dtype=batch.input_ids.dtype, device=cu.device)
    ids[mask] = batch.input_ids
    hidden = backbone(model)(input_ids=ids, attention_mask=mask.long(), use_cache=False).last_hidden_state
    rows = batch.target_rows
    seq = batch.seq_ids.long()[rows]
    weight, bias = lm_head(model)
    return token_logprobs(hidden[seq, rows - cu[seq]], weight, batch.targets[rows], bias=bias)


def packed_dense_logprobs(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Target-row log-probs from one packed forward where transformers builds the dense block-diagonal mask."""
    hidden = backbone(model)(
        input_ids=batch.input_ids[None], position_ids=batch.position_ids[None], use_cache=False
    ).last_hidden_state[0]
    rows = batch.target_rows
    weight, bias = lm_head(model)
    return token_logprobs(hidden[rows], weight, batch.targets[rows], bias=bias)


def packed_varlen_logprobs(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    return packed_token_logprobs(model, batch)[batch.target_rows]


IMPLS: dict[str, Callable[[torch.nn.Module, PackedBatch], torch.Tensor]] = {
    "padded": padded_logprobs,
    "packed_dense": packed_dense_logprobs,
    "packed_varlen": packed_varlen_logprobs,
}


def run_pass(model: torch.nn.Module, impl: Callable, micro: list[PackedBatch], backward: bool) -> torch.Tensor:
    """Score every micro-batch (and backpropagate ``logp.sum()`` per micro-batch); returns the detached logp."""
    outs = []
    for batch in micro:
        if backward:
            logp = impl(model, batch)
            logp.sum().backward()
        else:
            with torch.no_grad():
                logp = impl(model, batch)
        outs.append(logp.detach())
    if backward:
        model.zero_grad(set_to_none=True)
    return torch.cat(outs)


def interleaved_times(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Per implementation, ``repeats`` wall times in ms, taken round-robin (one call of each per round) so
    that load drift on a shared machine hits every implementation alike."""
    for fn in fns.values():
        timeit_median(fn, warmup=warmup, repeats=1, device=device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timeit_median(fn, warmup=0, repeats=1, device=device)["median_ms"])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=6)
    parser.add_argument("--min-len", type=int, default=200)
    parser.add_argument("--max-len", type=int, default=2000)
    parser.add_argument("--micro-batch-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_dir = create_tiny_model(Path(tempfile.mkdtemp()) / "model", spec=SPEC, seed=args.seed)
    models = {
        name: AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=dtype).to(device)
        for name in IMPLS
    }
    vocab = models["padded"].config.vocab_size
    trajectories = make_trajectories(args.trajectories, args.min_len, args.max_len, vocab, args.seed)
    batch = pack_segments(trajectories, device)
    micro = [batch.select(a, b) for a, b in batch.micro_batch_bounds(args.micro_batch_tokens)]
    lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    case = {
        "trajectories": batch.num_sequences,
        "tokens": batch.num_tokens,
        "micro_batches": len(micro),
        "padded_tokens": sum(m.num_sequences * int((m.cu_seqlens[1:] - m.cu_seqlens[:-1]).max()) for m in micro),
        "attention_pairs_packed_dense": sum(m.num_tokens**2 for m in micro),
        "attention_pairs_varlen": sum(n * n for n in lens),
    }

    rows: list[dict[str, Any]] = []
    for backward in (False, True):
        for model in models.values():
            model.train(backward)
        reference = run_pass(models["padded"], IMPLS["padded"], micro, backward).double()
        fns = {name: partial(run_pass, models[name], impl, micro, backward) for name, impl in IMPLS.items()}
        times = interleaved_times(fns, args.warmup, args.repeats, device)
        for name, fn in fns.items():
            rows.append(
                {
                    "impl": name,
                    "pass": "fwd+bwd" if backward else "fwd",
                    "median_ms": statistics.median(times[name]),
                    "min_ms": min(times[name]),
                    "max_ms": max(times[name]),
                    "repeats": len(times[name]),
                    "peak_mem_MB": peak_memory(fn, device) / 2**20,
                    "max_abs_diff_vs_padded": float((fn().double() - reference).abs().max()),
                }
            )
    for row in rows:
        padded = next(r for r in rows if r["impl"] == "padded" and r["pass"] == row["pass"])
        row["speedup_vs_padded"] = padded["median_ms"] / row["median_ms"]

    print_table(rows, title=f"packed log-prob forward, {case}")
    path = write_results(
        "packing_forward",
        {
            "model": {**asdict(SPEC), "vocab_size": vocab, "attn_implementation": "sdpa"},
            "dtype": str(dtype).removeprefix("torch."),
            "micro_batch_tokens": args.micro_batch_tokens,
            "trajectory_lengths": lens,
            "case": case,
            "warmup": args.warmup,
            "results": rows,
        },
        device,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
