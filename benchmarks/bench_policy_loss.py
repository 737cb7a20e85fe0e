"""Benchmark ``bao_fast.ops.clipped_ratio_loss`` (forward + backward) against the torch eager composition.

Baselines, in the same run and on the same packed tokens:

* ``torch-eager``: the verl-style composition of the clipped surrogate (ratio, two clipped terms,
  max / dual-clip min, KL, masked aggregation with ``index_add_`` for the seq-mean modes) and its stats,
  differentiated by autograd;
* ``torch-compile`` (CUDA only, ``--compile`` elsewhere): ``torch.compile`` of that composition.

``bao_fast`` is the public op (the fused Triton kernel on CUDA, the analytic-gradient torch path on the
CPU). Reports median fwd+bwd time, speed-up over eager, effective bandwidth (inputs read + gradient written
/ time; % of the H100's 3.35 TB/s on a GPU), peak extra memory and the max abs gradient difference to eager.
Writes ``benchmarks/results/clipped_ratio_loss-<device>.json``.

    python benchmarks/bench_policy_loss.py                  # T = 8M on CUDA, 1M on the CPU
    python benchmarks/bench_policy_loss.py --tokens 262144 --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hbm_bytes_per_s, peak_memory, print_table, timeit_median, write_results

from bao_fast.ops.policy_loss import clipped_ratio_loss

SEQ_LEN = 2048


def make_inputs(num_tokens: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Packed fp32 tokens in sequences of ~SEQ_LEN tokens, 70% trained, PPO-like log-ratios."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN * 3 // 2, (num_tokens // SEQ_LEN + 1,), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0).clamp(max=num_tokens)])
    cu = torch.unique_consecutive(torch.cat([cu, torch.tensor([num_tokens])]))
    logp = -torch.rand(num_tokens, generator=gen) * 3
    tensors = {
        "logp": logp,
        "old_logp": logp + torch.randn(num_tokens, generator=gen) * 0.2,
        "advantages": torch.randn(num_tokens, generator=gen),
        "mask": torch.rand(num_tokens, generator=gen) < 0.7,
        "cu_seqlens": cu.int(),
        "ref_logp": logp + torch.randn(num_tokens, generator=gen) * 0.3,
    }
    return {k: v.to(device) for k, v in tensors.items()}


def eager_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    ref_logp: torch.Tensor | None,
    agg: str,
    kl_coef: float,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float = 3.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The torch composition trainers use (token-mean / seq-mean-token-mean, k3 KL)."""
    log_ratio = torch.clamp(logp - old_logp, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    pg = torch.maximum(pg1, pg2)
    pg3 = -advantages * dual_clip
    per_token = torch.where(advantages < 0, torch.minimum(pg, pg3), pg)
    if ref_logp is not None:
        x = torch.clamp(ref_logp - logp, -10.0, 10.0)
        per_token = per_token + kl_coef * (torch.exp(x) - x - 1)
    m = mask.to(logp.dtype)
    count = m.sum().clamp(min=1)
    if agg == "token-mean":
        loss = (per_token * m).sum() / count
    else:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=logp.device), lengths, output_size=logp.numel()
        )
        sums = torch.zeros(lengths.numel(), device=logp.device).index_add(0, seq, per_token * m)
        counts = torch.zeros(lengths.numel(), device=logp.device).index_add(0, seq, m)
        valid = counts > 0
        loss = torch.where(valid, sums / counts.clamp(min=1), 0.0).sum() / valid.sum().clamp(min=1)
    stats = {
        "clipfrac": ((pg2 > pg1).to(m.dtype) * m).sum() / count,
        "clipfrac_lower": (((advantages < 0) & (pg3 < pg)).to(m.dtype) * m).sum() / count,
        "approx_kl": ((old_logp - logp) * m).sum() / count,
    }
    return loss, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=None, help="default 8M on CUDA, 1M on CPU")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the eager loss")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a loaded machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    num_tokens = args.tokens or (8 * 2**20 if on_gpu else 2**20)
    data = make_inputs(num_tokens, device)
    leaf = data["logp"].clone().requires_grad_()
    compiled = torch.compile(eager_loss, dynamic=False) if (on_gpu or args.compile) else None
    hbm = hbm_bytes_per_s(device)

    rows = []
    for agg in ("token-mean", "seq-mean-token-mean"):
        for with_kl in (False, True):
            ref_logp = data["ref_logp"] if with_kl else None
            common = (data["old_logp"], data["advantages"], data["mask"])
            impls = {
                "torch-eager": lambda a=agg, r=ref_logp, c=common: eager_loss(leaf, *c, data["cu_seqlens"], r, a, 0.05),
                "bao_fast": lambda a=agg, r=ref_logp, c=common: clipped_ratio_loss(
                    leaf, *c, cu_seqlens=data["cu_seqlens"], ref_logp=r, agg=a, kl_coef=0.05 if r is not None else 0.0
                ),
            }
            if compiled is not None:
                impls["torch-compile"] = lambda a=agg, r=ref_logp, c=common: compiled(
                    leaf, *c, data["cu_seqlens"], r, a, 0.05
                )

            def grad_of(fn):
                leaf.grad = None
                loss, _ = fn()
                loss.backward()
                return leaf.grad.clone()

            expected = grad_of(impls["torch-eager"])
            io_bytes = num_tokens * (4 * (3 + with_kl) + 1 + 4)
            eager_ms = None
            for name, fn in impls.items():

                def step(fn=fn):
                    leaf.grad = None
                    fn()[0].backward()

                ms = timeit_median(step, warmup=3, repeats=args.repeats, device=device)["median_ms"]
                eager_ms = eager_ms or ms
                # The timed runs' gradient would sit in CUDA's starting level, and the step's new one cancel it.
                leaf.grad = None
                peak = peak_memory(step, device)
                row = {
                    "agg": agg,
                    "kl": "k3" if with_kl else "-",
                    "impl": name,
                    "median_ms": ms,
                    "speedup_vs_eager": eager_ms / ms,
                    "GB_per_s": io_bytes / ms / 1e6,
                    "peak_mem_MB": peak / 2**20,
                    "max_abs_grad_diff": float((grad_of(fn) - expected).abs().max()),
                }
                if hbm:
                    row["pct_of_hbm"] = 100 * io_bytes / (ms * 1e-3) / hbm
                rows.append(row)
    shape = {"tokens": num_tokens, "sequences": data["cu_seqlens"].numel() - 1}
    print_table(rows, title=f"clipped_ratio_loss fwd+bwd on {device} ({shape})")
    path = write_results(
        "clipped_ratio_loss",
        {"shape": shape, "dtype": "float32", "repeats": args.repeats, "hbm_bytes_per_s": hbm, "results": rows},
        device,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
