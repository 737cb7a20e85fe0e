"""Trainer step breakdown (PERF.md, "trainer step"): where one BAO RL step spends its time, and packing
against padding for the log-prob forward on the step's own trajectories.

The real step (``bao_fast.train.rl.rl_step``) runs on a real setup (``rl.setup``: FSDP2 policy, optimiser,
rollout engine, Function gym); each phase function it calls is wrapped with a timer (synchronising the GPU
around it), so the breakdown is of the trainer's own code path, not of a re-implementation:

    weight sync     rl.sync_engine          push the policy's weights into the engine
    generate        rl.rollout              all turns of all episodes (the gym steps in between)
    pack            rl.pack_segments        trajectories -> one padding-free batch
    log-prob        rl.forward_logprobs     old log-probs, recomputed by the policy
    advantage       rl.shaped_advantages    BAO penalties, credits, scores, group normalisation
    loss+backward   rl.accumulate_gradients micro-batched clipped-ratio loss and backward
    optimiser       rl.clip_grad_norm + optimizer.step

``other`` is the rest of the step (metrics, scheduler, zero_grad). Medians over ``--steps`` measured steps
after one warm-up step (a step takes seconds to minutes, hence fewer than the ops' 20 repeats).

Then the log-prob forward (no grad) of a plain HF copy of the model is timed over micro-batches of the
trainer's default token budget (``--packing-tokens``; the CPU demo's own budget holds one episode per
micro-batch, where packing and padding do the same work), packed (one ``[1, T]`` stream each, ``position_ids``
restarting per trajectory) and padded (``[B, L_max]`` with an attention mask), with the same LM-head op on the
same target rows, on two sets of trajectories: the last step's rollouts (a random-weight policy: one turn
each, near-equal lengths) and as many scripted-teacher episodes (multi-turn, varied lengths, as a trained
policy produces).

Model: the tiny random-weight Qwen2 on the CPU; on a GPU a Qwen2.5-0.5B-shaped random-weight model whose
vocabulary is padded to Qwen's 151,936 rows (the shipped tokenizer's ids stay below 2048; a random policy
samples from all rows), so that the LM head holds its real share (~27%) of the matmul parameters.
Engine: ``--engine``, else vLLM on a GPU where it is installed (the results record ``vllm_skipped`` and why
when it is not) and hf otherwise. Writes ``benchmarks/results/trainer_step-<device>.json`` (``--quick``:
``benchmarks/results/quick/``).

    python benchmarks/bench_trainer_step.py               # CPU: demo sizes, hf engine
    python benchmarks/bench_trainer_step.py --quick       # smoke run: tiny step
    python benchmarks/bench_trainer_step.py --engine vllm --steps 10
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from common import peak_memory, print_table, timeit_median, write_results
from transformers import AutoModelForCausalLM

from bao_fast.config import Config, TrainConfig, load_config
from bao_fast.data.packed import PackedBatch
from bao_fast.data.segments import pack_segments
from bao_fast.models import TinyModelSpec, create_tiny_model, load_tokenizer
from bao_fast.models.forward import backbone, lm_head, packed_token_logprobs
from bao_fast.ops import token_logprobs
from bao_fast.rollout import Trajectory
from bao_fast.rollout.engine import missing_engine
from bao_fast.train import rl
from bao_fast.train.fsdp import init_distributed, shutdown_distributed
from bao_fast.train.logging import NonFiniteGuard
from bao_fast.train.runtime import TaskSampler, derive_seed
from bao_fast.train.sft_data import teacher_dataset

ROOT = Path(__file__).resolve().parents[1]
# phase -> trainer functions (attributes of bao_fast.train.rl) whose time counts for it
PHASES: dict[str, tuple[str, ...]] = {
    "weight sync": ("sync_engine",),
    "generate": ("rollout",),
    "pack": ("pack_segments",),
    "log-prob": ("forward_logprobs",),
    "advantage": ("shaped_advantages",),
    "loss+backward": ("accumulate_gradients",),
    "optimiser": ("clip_grad_norm", "optimizer.step"),
}
QWEN_05B_SHAPE = TinyModelSpec(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=4864,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
)
QWEN_VOCAB_SIZE = 151936  # Qwen2.5's embedding / LM-head rows (its tokenizer has 151,665 ids)


def default_engine(on_gpu: bool) -> tuple[str, str | None]:
    """The engine without ``--engine`` and, when vLLM was left out, why: vLLM on a GPU where it is installed,
    hf otherwise."""
    reason = missing_engine("vllm") if on_gpu else None
    return ("vllm", None) if on_gpu and reason is None else ("hf", reason)


def pad_vocab(model_path: Path, vocab_size: int) -> Path:
    """Resize the checkpoint's embedding and LM head at ``model_path`` to ``vocab_size`` rows in place (new
    rows from the model's initialiser; the tokenizer is unchanged); returns the path."""
    model = AutoModelForCausalLM.from_pretrained(str(model_path))
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    model.save_pretrained(model_path, safe_serialization=True)
    return model_path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[..., Any], name: str, spent: dict[str, float], device: torch.device) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _sync(device)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        _sync(device)
        spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        return out

    return wrapper


@contextlib.contextmanager
def instrumented(s: rl.RLSetup, spent: dict[str, float], last_rollout: list[list[Trajectory]]) -> Iterator[None]:
    """Time the trainer's phase functions (module attributes of ``rl``, wrapped for the duration) and the
    optimiser's ``step`` (step pre/post hooks); keep the step's trajectories in ``last_rollout``."""
    device = s.env.device
    originals = {name: getattr(rl, name) for names in PHASES.values() for name in names if "." not in name}
    started: list[float] = []

    def rollout(*args: Any, **kwargs: Any) -> list[Trajectory]:
        trajs = originals["rollout"](*args, **kwargs)
        last_rollout[:] = [trajs]
        return trajs

    def pre_step(*_: Any) -> None:
        _sync(device)
        started.append(time.perf_counter())

    def post_step(*_: Any) -> None:
        _sync(device)
        spent["optimizer.step"] = spent.get("optimizer.step", 0.0) + time.perf_counter() - started.pop()

    hooks = [s.optimizer.register_step_pre_hook(pre_step), s.optimizer.register_step_post_hook(post_step)]
    try:
        for name, fn in originals.items():
            setattr(rl, name, _timed(rollout if name == "rollout" else fn, name, spent, device))
        yield
    finally:
        for name, fn in originals.items():
            setattr(rl, name, fn)
        for hook in hooks:
            hook.remove()


def bench_config(args: argparse.Namespace, run_dir: Path, on_gpu: bool) -> Config:
    """The demo config (GPU: larger batch) as one RL step without SFT, checkpoints or evaluation."""
    overrides = [
        f"run_dir={run_dir}",
        "sft.enabled=false",
        "checkpoint.save_every=0",
        "checkpoint.export_hf=false",
        "logging.progress=false",
        f"rollout.engine={args.engine}",
        f"train.steps={args.steps + 1}",
    ]
    if on_gpu:
        overrides += [
            "model.dtype=bfloat16",
            "rollout.prompts_per_step=32",
            "rollout.group_size=8",
            "rollout.max_turn_tokens=512",
            "train.mini_batch_size=8",
            "train.micro_batch_tokens=16384",
        ]
    elif args.quick:
        overrides += [
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            "rollout.max_turn_tokens=32",
            "env.max_turns=2",
            "train.mini_batch_size=2",
        ]
    return load_config(ROOT / "configs" / "demo-cpu.yaml", overrides)


def run_steps(cfg: Config, model_path: Path, steps: int) -> tuple[dict[str, Any], list[Trajectory]]:
    """Warm-up step + ``steps`` instrumented steps; per-phase medians, shares and the step's throughput."""
    env = init_distributed()
    peak_key = "peak_memory_MB" if env.device.type == "cuda" else "peak_process_rss_MB"
    tokenizer = load_tokenizer(model_path)
    s = rl.setup(cfg, env, model_path, tokenizer)
    state = rl.RLState(
        0, TaskSampler(len(s.train_tasks), derive_seed(cfg.seed, 9)), NonFiniteGuard(cfg.train.max_nonfinite_steps)
    )
    per_step: list[dict[str, float]] = []
    reported: list[dict[str, Any]] = []
    last: list[list[Trajectory]] = [[]]
    for i in range(steps + 1):
        state.step += 1
        spent: dict[str, float] = {}
        with instrumented(s, spent, last):
            _sync(env.device)
            t0 = time.perf_counter()
            metrics = rl.rl_step(s, state)
            _sync(env.device)
            wall = time.perf_counter() - t0
        generated = sum(len(t.assistant_token_ids) for t in last[0])
        if i == 0:
            continue  # warm-up
        phases = {phase: sum(spent.get(n, 0.0) for n in names) for phase, names in PHASES.items()}
        phases["other"] = max(0.0, wall - sum(phases.values()))
        per_step.append({**phases, "step": wall, "generated_tokens": generated})
        reported.append(metrics)
    total = sum(p["step"] for p in per_step)
    phases_out = [
        {
            "phase": phase,
            "median_ms": 1e3 * statistics.median(p[phase] for p in per_step),
            "share": sum(p[phase] for p in per_step) / total,
        }
        for phase in (*PHASES, "other")
    ]
    summary = {
        "phases": phases_out,
        "step_median_ms": 1e3 * statistics.median(p["step"] for p in per_step),
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in reported),
        "generated_tokens_per_s": statistics.median(p["generated_tokens"] / p["generate"] for p in per_step),
        # The trainer's figure: CUDA max_memory_allocated on a GPU; on the CPU the process's lifetime peak RSS
        # (ru_maxrss: model loading and the rollout engine included), not the step's.
        peak_key: max(m["peak_memory_gb"] for m in reported) * 1024,
        "trainer_reported_ms": {
            k.split("/", 1)[1]: 1e3 * statistics.median(m[k] for m in reported)
            for k in reported[0]
            if k.startswith("time/")
        },
        "mean_turns": statistics.mean(m["turns"] for m in reported),
        "reward": statistics.mean(m["reward"] for m in reported),
    }
    return summary, last[0]


def padded_inputs(batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, L_max]`` right-padded ids and attention mask of a packed batch, and the (sequence, position)
    of each of its target rows."""
    cu = batch.cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    b, l_max = lens.numel(), int(lens.max())
    pos = torch.arange(l_max, device=cu.device)
    mask = pos[None, :] < lens[:, None]
    ids = torch.zeros(b, l_max, dtype=batch.input_ids.dtype, device=cu.device)
    ids[mask] = batch.input_ids
    seq = batch.seq_ids.long()[batch.target_rows]
    return ids, mask.long(), seq, batch.target_rows - cu[seq]


def padded_token_logprobs(batch: PackedBatch, padded: tuple, model: torch.nn.Module) -> torch.Tensor:
    """Log-probs of the batch's targets at its target rows from a padded ``[B, L_max]`` forward."""
    ids, mask, seq, pos = padded
    hidden = backbone(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    weight, bias = lm_head(model)
    rows = batch.target_rows
    return token_logprobs(hidden[seq, pos], weight, batch.targets[rows], bias=bias)


def load_plain_model(cfg: Config, model_path: Path, device: torch.device) -> torch.nn.Module:
    """An unsharded HF copy of the model for the packing/padding comparison."""
    dtype = getattr(torch, cfg.model.dtype) if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path), dtype=dtype, attn_implementation=cfg.model.attn_implementation
    )
    return model.to(device).eval()


def packing_vs_padding(
    model: torch.nn.Module, source: str, segments: list[list[tuple[str, list[int]]]], max_tokens: int, repeats: int
) -> list[dict[str, Any]]:
    """Rows timing the no-grad log-prob forward of the same trajectories packed and padded, over the
    micro-batches of at most ``max_tokens`` tokens (each padded the same way for the baseline)."""
    device = next(model.parameters()).device
    batch = pack_segments(segments, device)
    micro = [batch.select(a, b) for a, b in batch.micro_batch_bounds(max_tokens)]
    padded = [padded_inputs(m) for m in micro]
    impls = {
        "padded": lambda: [padded_token_logprobs(m, p, model) for m, p in zip(micro, padded)],
        "packed": lambda: [packed_token_logprobs(model, m)[m.target_rows] for m in micro],
    }
    case = {
        "source": source,
        "trajectories": batch.num_sequences,
        "micro_batch_tokens": max_tokens,
        "micro_batches": len(micro),
        "tokens": batch.num_tokens,
        "padded_tokens": sum(p[0].numel() for p in padded),
        "target_rows": batch.target_rows.numel(),
    }
    rows = []
    with torch.no_grad():
        reference = torch.cat(impls["padded"]()).double()
        for name, fn in impls.items():
            timing = timeit_median(fn, warmup=1, repeats=repeats, device=device)
            rows.append(
                {
                    "impl": name,
                    **case,
                    "median_ms": timing["median_ms"],
                    "min_ms": timing["min_ms"],
                    "repeats": timing["repeats"],
                    "peak_mem_MB": peak_memory(fn, device) / 2**20,
                    "max_abs_diff": float((torch.cat(fn()).double() - reference).abs().max()),
                }
            )
    for row in rows:
        row["speedup_vs_padded"] = rows[0]["median_ms"] / row["median_ms"]
    return rows


def teacher_segments(cfg: Config, model_path: Path, n: int) -> list[list[tuple[str, list[int]]]]:
    """``n`` scripted-teacher episodes (multi-turn, varied lengths: what a trained policy produces), with at
    least 6 turns each to solve in (the teacher needs about 4 at level 1; ``--quick`` rolls out only 2)."""
    env = replace(cfg.env, max_turns=max(cfg.env.max_turns, 6))
    cfg = replace(cfg, env=env, sft=replace(cfg.sft, num_trajectories=n))
    return teacher_dataset(cfg, load_tokenizer(model_path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--engine", choices=("vllm", "hf"), default=None, help="default: vllm on a GPU if installed")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 5 on GPU, 3 on CPU, 1 quick)")
    parser.add_argument("--repeats", type=int, default=None, help="packing/padding repeats (default 20, --quick 5)")
    parser.add_argument("--quick", action="store_true", help="small CPU sizes, results to results/quick/")
    parser.add_argument("--packing-tokens", type=int, default=None,
                        help="micro-batch token budget of the packing/padding comparison (default: the trainer's "
                             "default train.micro_batch_tokens, 8192, or the step's when larger)")
    args = parser.parse_args()
    vllm_skipped = None
    if args.engine is None:
        args.engine, vllm_skipped = default_engine(on_gpu)
    elif (reason := missing_engine(args.engine)) is not None:
        parser.exit(2, f"{parser.prog}: error: --engine {args.engine}: {reason}\n")
    args.steps = args.steps or (1 if args.quick else 5 if on_gpu else 3)
    repeats = args.repeats or (5 if args.quick else 20)
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        cfg = bench_config(args, Path(tmp) / "run", on_gpu)
        spec = QWEN_05B_SHAPE if on_gpu else TinyModelSpec()
        model_path = create_tiny_model(Path(tmp) / "model", spec, seed=cfg.seed)
        if on_gpu:
            pad_vocab(model_path, QWEN_VOCAB_SIZE)
        try:
            step, trajs = run_steps(cfg, model_path, args.steps)
        finally:
            shutdown_distributed()
        model = load_plain_model(cfg, model_path, torch.device("cuda" if on_gpu else "cpu"))
        vocab_size = model.config.vocab_size
        rollout_segments = [t.segments for t in trajs]
        teacher = teacher_segments(cfg, model_path, len(trajs))
        max_tokens = args.packing_tokens or max(cfg.train.micro_batch_tokens, TrainConfig().micro_batch_tokens)
        packing = packing_vs_padding(model, "rollout", rollout_segments, max_tokens, repeats)
        packing += packing_vs_padding(model, "teacher", teacher, max_tokens, repeats)
    print_table(step["phases"], title=f"trainer step ({args.engine} engine), median {step['step_median_ms']:.0f} ms")
    columns = ("impl", "source", "tokens", "padded_tokens", "median_ms", "peak_mem_MB", "speedup_vs_padded")
    print_table([{c: row[c] for c in columns} for row in packing], title="log-prob forward (no grad)")
    r = cfg.rollout
    payload = {
        "model": {**asdict(spec), "vocab_size": vocab_size, "dtype": cfg.model.dtype if on_gpu else "float32"},
        "step_config": {
            "engine": args.engine,
            "vllm_skipped": vllm_skipped,
            "prompts_per_step": r.prompts_per_step,
            "group_size": r.group_size,
            "max_turns": cfg.env.max_turns,
            "max_turn_tokens": r.max_turn_tokens,
            "micro_batch_tokens": cfg.train.micro_batch_tokens,
        },
        "measured_steps": args.steps,
        "quick": args.quick,
        "attn_implementation": cfg.model.attn_implementation,
        **step,
        "results": packing,
    }
    print(f"wrote {write_results('trainer_step', payload, quick=args.quick)}")


if __name__ == "__main__":
    main()
