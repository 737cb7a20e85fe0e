"""``bao-fast eval``: evaluate a checkpoint or an OpenAI-compatible chat endpoint on a gym's test split.

Writes ``<out>/episodes.jsonl`` (one episode per line: task, seed, per-turn choices and rewards, success,
end reason, the whole conversation), ``<out>/summary.json`` (``bao_fast.eval.metrics.summarize``: Score,
Pass@U-k, UR, turns, per-choice counts, 95% CIs; plus the decoding settings and timings) and
``<out>/summary.md`` (the same as tables).

    bao-fast eval --checkpoint runs/demo/final-model --config configs/demo-cpu.yaml --out eval/demo
    bao-fast eval --checkpoint ckpt/ --engine hf --seeds 4 --sample --temperature 0.7
    bao-fast eval --endpoint http://127.0.0.1:8000 --model Qwen/Qwen3-8B --out eval/qwen3-8b env.level=2

Gym, task source and budgets come from the run config (``--config`` and dotted ``KEY=VALUE``
overrides): ``env.*``, ``eval.*``, ``rollout.max_turn_tokens`` / ``max_model_len`` / ``top_p``. The tasks
are those the trainer evaluates on, the first ``min(env.num_eval_tasks, eval.num_tasks)`` of the test split
(``--num-tasks`` sets both); a checkpoint runs in ``model.dtype`` on a GPU, float32 on the CPU. The
``k`` seeds are ``seed, seed+1, ...``: each task is played once per seed, all episodes batched together.
Decoding is greedy unless ``--sample`` (``eval.greedy=false``); ``--temperature`` without ``--sample`` is
an error, and greedy decoding with several seeds warns (the seeds replay the same agent, so the intervals
would count repeats as independent episodes). The summary's ``label`` defaults to the checkpoint's
``RUN/DIR`` (``runs/x/final-model`` -> ``x/final-model``) or the endpoint's ``--model``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from bao_fast.cli import UsageError
from bao_fast.config import Config, ConfigError, load_config
from bao_fast.envs import Gym, make_gym, needs_user_simulator
from bao_fast.envs.user_client import UserSimulatorClient, UserSimulatorError, unserved_model
from bao_fast.eval.metrics import summarize
from bao_fast.eval.report import summary_markdown
from bao_fast.rollout import GenerationEngine, GenerationParams, Trajectory, run_episodes
from bao_fast.rollout.agent_loop import end_reason_of, reset_gym, step_gym
from bao_fast.rollout.engine import engine_dtype, missing_engine

EPISODES_FILE = "episodes.jsonl"
SUMMARY_FILE = "summary.json"
SUMMARY_MD_FILE = "summary.md"


def eval_tasks(cfg: Config) -> list[Any]:
    """The tasks the trainer evaluates on: the first ``min(env.num_eval_tasks, eval.num_tasks)`` of the gym's
    test split; a ConfigError naming the key at fault (``env.name``, ``env.tasks_path``,
    ``env.num_eval_tasks``) when the gym cannot supply them."""
    from bao_fast.train.runtime import config_tasks  # runtime imports this module (check_servers)

    return config_tasks(cfg, "test", min(cfg.env.num_eval_tasks, cfg.eval.num_tasks), "env.num_eval_tasks")


def gym_factory(cfg: Config, client: UserSimulatorClient | None = None) -> Callable[[], Gym]:
    """Fresh gyms of ``env.name`` with the turn budget (training, evaluation and the SFT teacher alike).
    LLM-user gyms share ``client``, built when not given from ``env.user_base_url`` / ``env.user_model`` (key
    from ``$OPENAI_API_KEY``, ``rollout.env_workers`` concurrent requests), and get the ``env.user_*``
    settings; other gyms ignore both. ConfigError when an LLM-user gym has no user simulator."""
    env = cfg.env
    kwargs: dict[str, Any] = {"max_turns": env.max_turns}
    if needs_user_simulator(env.name):
        if client is None and not env.user_base_url:
            raise ConfigError(
                f"config key 'env.user_base_url': the {env.name!r} gym talks to an LLM user simulator; set "
                "env.user_base_url and env.user_model to an OpenAI-compatible server"
            )
        if client is None:
            client = UserSimulatorClient(env.user_base_url, env.user_model,
                                         api_key=os.environ.get("OPENAI_API_KEY"),
                                         max_concurrency=cfg.rollout.env_workers)
        kwargs["client"] = client
        limits = {"user_max_tokens": env.user_max_tokens, "judge_max_tokens": env.judge_max_tokens}
        kwargs.update({name: limit for name, limit in limits.items() if limit is not None})  # None: the gym's own
        if not env.user_thinking:
            kwargs["extra_body"] = {"chat_template_kwargs": {"enable_thinking": False}}
    return lambda: make_gym(env.name, **kwargs)


def check_servers(cfg: Config, stage: str) -> None:
    """ConfigError when a configured OpenAI-compatible server (the LLM user simulator, the SFT teacher) does
    not serve the configured model: found now, not after the engine has loaded and the first request fails
    (``stage``: ``sft``; ``train``, whose SFT runs when ``sft.enabled``; ``eval``, which needs no teacher).
    A server that cannot be asked (not up yet, no ``/models``) only gets a warning. An LLM-user gym's RL
    rollouts and evaluation need ``env.user_base_url`` (only the SFT teacher falls back to its own server):
    missing, a ConfigError now rather than once SFT is done."""
    if stage != "sft" and needs_user_simulator(cfg.env.name) and not cfg.env.user_base_url:
        raise ConfigError(
            f"config key 'env.user_base_url': the {cfg.env.name!r} gym's RL rollouts and evaluation talk to an LLM "
            "user simulator; set env.user_base_url and env.user_model (only SFT's LLM teacher falls back to its own "
            "server)"
        )
    servers = []
    if needs_user_simulator(cfg.env.name) and cfg.env.user_base_url:
        servers.append((cfg.env.user_base_url, cfg.env.user_model, "env.user_model"))
    if (stage == "sft" or (stage == "train" and cfg.sft.enabled)) and cfg.sft.teacher == "llm":
        servers.append((cfg.sft.teacher_base_url, cfg.sft.teacher_model, "sft.teacher_model"))
    for base_url, model, key in servers:
        problem = unserved_model(base_url, model, api_key=os.environ.get("OPENAI_API_KEY"))
        if problem is not None:
            raise ConfigError(f"config key '{key}': {problem}")


def episode_seeds(cfg: Config) -> list[int]:
    """The ``eval.num_seeds`` seeds ``cfg.seed + s``."""
    return [cfg.seed + s for s in range(cfg.eval.num_seeds)]


def decoding(cfg: Config) -> dict[str, Any]:
    """The decoding settings of an evaluation, as recorded in its summary (greedy: temperature 0 and
    top-p 1, whatever ``eval.temperature`` and ``rollout.top_p`` say)."""
    greedy = cfg.eval.greedy
    return {
        "greedy": greedy,
        "temperature": 0.0 if greedy else cfg.eval.temperature,
        "top_p": 1.0 if greedy else cfg.rollout.top_p,
        "max_turn_tokens": cfg.rollout.max_turn_tokens,
        "max_turns": cfg.env.max_turns,
        "seeds": episode_seeds(cfg),
    }


def repeated_seeds_warning(cfg: Config) -> str | None:
    """Why ``eval.num_seeds > 1`` under greedy decoding misleads, or None. The agent then replays its
    replies on every seed (only a seeded gym or a sampling user simulator can make them differ), yet the
    confidence intervals count every episode as an independent sample, so they come out too narrow."""
    if not cfg.eval.greedy or cfg.eval.num_seeds == 1:
        return None
    return (
        f"greedy decoding with {cfg.eval.num_seeds} seeds (--seeds / eval.num_seeds) repeats the agent's "
        "episodes on every seed, and the confidence intervals count the repeats as independent episodes "
        "(too narrow); use --sample for independent seeds, or one seed"
    )


def evaluate_model(
    engine: GenerationEngine, tokenizer: PreTrainedTokenizerBase, cfg: Config, tasks: Sequence[Any] | None = None
) -> list[Trajectory]:
    """Play every task once per seed with the agent loop on ``engine``; all ``tasks × seeds`` episodes
    run in one batch. Returns the trajectories seed-major (seed 0: every task, then seed 1, ...)."""
    tasks = eval_tasks(cfg) if tasks is None else list(tasks)
    if not tasks:
        raise ValueError("tasks: the evaluation split is empty")
    seeds = episode_seeds(cfg)
    dec = decoding(cfg)
    params = GenerationParams(
        max_tokens=cfg.rollout.max_turn_tokens,
        temperature=dec["temperature"],
        top_p=dec["top_p"],
        seed=cfg.seed,
        stop_token_ids=(tokenizer.eos_token_id,),
        return_logprobs=False,
    )
    return run_episodes(
        engine,
        tokenizer,
        gym_factory(cfg),
        [t for _ in seeds for t in tasks],
        group_size=1,
        params=params,
        max_turns=cfg.env.max_turns,
        max_model_len=min(cfg.rollout.max_model_len, engine.max_model_len),
        seeds=[s for s in seeds for _ in tasks],
        env_workers=cfg.rollout.env_workers,
        scheduling=cfg.rollout.scheduling,
    )


_ENDPOINT_NOTE = "raised by the agent endpoint being evaluated (--endpoint / --model), not by a user simulator"


def _endpoint_episode(
    client: UserSimulatorClient,
    gym: Gym,
    task: Any,
    index: int,
    seed: int,
    cfg: Config,
    extra_body: Mapping[str, Any] | None,
) -> Trajectory:
    """One episode against the endpoint, in text space: the whole conversation is sent every turn.

    Ends like the agent loop's episodes (``bao_fast.rollout.agent_loop``): ``context_limit`` when the server
    refuses a later turn's request as longer than its context (the turns played stand); ``gym_error`` when
    the gym raises, that turn recorded ``invalid`` with reward 0. A refused opening request raises
    ValueError (no turn fits: the settings are wrong, as for an opening prompt past ``max_model_len``); any
    other ``UserSimulatorError`` (agent server or user simulator unreachable) propagates."""
    messages = reset_gym(gym, task, seed, index)
    traj = Trajectory(str(getattr(task, "id", index)), index, seed, engine_logprobs=None, messages=list(messages))
    dec = decoding(cfg)
    for turn in range(cfg.env.max_turns):
        try:
            reply = client.complete(  # seeds matter only when sampling; distinct per episode seed and turn
                traj.messages,
                max_tokens=cfg.rollout.max_turn_tokens,
                temperature=dec["temperature"],
                top_p=dec["top_p"],
                seed=seed * 1000 + turn,
                extra_body=extra_body,
            )
        except UserSimulatorError as exc:
            if not exc.context_overflow:
                if _ENDPOINT_NOTE not in getattr(exc, "__notes__", ()):
                    exc.add_note(_ENDPOINT_NOTE)
                raise
            if turn == 0:
                raise ValueError(
                    f"task {traj.task_id}: the opening prompt plus rollout.max_turn_tokens="
                    f"{cfg.rollout.max_turn_tokens} exceed the endpoint's context ({exc})"
                ) from exc
            traj.end_reason = "context_limit"
            break
        traj.messages.append({"role": "assistant", "content": reply.content})
        result = step_gym(gym, traj.task_id, reply.content)
        if isinstance(result, Exception):
            traj.turn_choices.append("invalid")
            traj.turn_rewards.append(0.0)
            traj.turn_is_answer.append(False)
            traj.end_reason = "gym_error"
            break
        traj.messages.append({"role": "user", "content": result.feedback})
        traj.turn_choices.append(str(result.info.get("choice", "invalid")))
        traj.turn_rewards.append(float(result.reward))
        traj.turn_is_answer.append(bool(result.info.get("user_involved", False)))
        traj.success = bool(result.info.get("success", False))
        traj.end_reason = end_reason_of(result)  # the gym truncates at env.max_turns: the loop always ends here
        if traj.end_reason is not None:
            break
    return traj


def evaluate_endpoint(
    client: UserSimulatorClient,
    cfg: Config,
    tasks: Sequence[Any] | None = None,
    extra_body: Mapping[str, Any] | None = None,
) -> list[Trajectory]:
    """Play every task once per seed against an OpenAI-compatible chat model (``client``), up to
    ``client.max_concurrency`` episodes at once. Trajectories carry messages, choices and rewards (no
    token ids). Seed-major order, like :func:`evaluate_model`. The agent's replies are stepped verbatim
    (reasoning returned in a separate field is not shown to the gym)."""
    tasks = eval_tasks(cfg) if tasks is None else list(tasks)
    if not tasks:
        raise ValueError("tasks: the evaluation split is empty")
    make = gym_factory(cfg)
    jobs = [(i, t, s) for s in episode_seeds(cfg) for i, t in enumerate(tasks)]
    with ThreadPoolExecutor(max_workers=min(client.max_concurrency, len(jobs))) as pool:
        return list(pool.map(lambda j: _endpoint_episode(client, make(), j[1], j[0], j[2], cfg, extra_body), jobs))


def episode_record(traj: Trajectory) -> dict[str, Any]:
    """One line of ``episodes.jsonl``."""
    return {
        "task_id": traj.task_id,
        "seed": traj.seed,
        "success": traj.success,
        "reward": traj.reward,
        "turns": traj.num_turns,
        "answers": sum(traj.turn_is_answer),
        "choices": traj.turn_choices,
        "rewards": traj.turn_rewards,
        "end_reason": traj.end_reason,
        "generated_tokens": len(traj.assistant_token_ids) if traj.segments else None,
        "messages": traj.messages,
    }


def write_eval(trajs: Sequence[Trajectory], out_dir: str | Path, meta: Mapping[str, Any], max_k: int) -> dict[str, Any]:
    """Write ``episodes.jsonl``, ``summary.json`` (metrics up to Pass@U-``max_k`` plus ``meta``) and its
    markdown rendering ``summary.md`` to ``out_dir``; returns the summary."""
    if not trajs:
        raise ValueError("trajs: no episodes to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / EPISODES_FILE).open("w", encoding="utf-8") as f:
        for traj in trajs:
            f.write(json.dumps(episode_record(traj), ensure_ascii=False) + "\n")
    summary = summarize(trajs, max_k=max_k)
    by_seed: dict[int | None, list[float]] = {}
    for traj in trajs:
        by_seed.setdefault(traj.seed, []).append(traj.reward)
    summary["score_per_seed"] = {str(s): sum(r) / len(r) for s, r in by_seed.items()}
    summary["end_reasons"] = dict(sorted(Counter(str(t.end_reason) for t in trajs).items()))
    summary = {**meta, **summary}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    (out / SUMMARY_MD_FILE).write_text(summary_markdown(summary))
    return summary


def _build_engine(kind: str, checkpoint: Path, cfg: Config) -> GenerationEngine:
    """The ``kind`` engine on ``checkpoint``, in the precision the trainer's rollouts use (``engine_dtype``)."""
    dtype = engine_dtype(cfg.model, "cuda" if torch.cuda.is_available() else "cpu")
    if kind == "hf":
        from bao_fast.rollout import HFEngine

        return HFEngine.from_config(checkpoint, cfg.rollout, dtype=dtype)
    from bao_fast.rollout.vllm_engine import VLLMEngine

    return VLLMEngine.from_config(checkpoint, cfg.rollout, seed=cfg.seed, dtype=dtype)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--checkpoint", type=Path, help="HF checkpoint directory (config.json + weights)")
    target.add_argument("--endpoint", help="OpenAI-compatible server URL (with --model)")
    parser.add_argument("--model", help="model name the endpoint serves")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    parser.add_argument("--config", type=Path, help="run config YAML (gym, budgets, eval.*)")
    parser.add_argument("--engine", choices=("vllm", "hf"), help="generation engine (default: rollout.engine)")
    parser.add_argument("--seeds", type=int, help="number of seeds k (eval.num_seeds)")
    parser.add_argument("--num-tasks", type=int, help="tasks of the test split (eval.num_tasks and env.num_eval_tasks)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, help="sampling temperature (eval.temperature; needs --sample)")
    parser.add_argument("--out", type=Path, default=Path("eval"), help="output directory (default: ./eval)")
    parser.add_argument(
        "--label", help="name of this evaluation in Pareto tables (default: RUN/DIR of the checkpoint, or --model)"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def default_label(args: argparse.Namespace) -> str:
    """The checkpoint's directory with its parent (``runs/x/final-model`` -> ``x/final-model``: every
    trainer export is a ``final-model``), or the endpoint's ``--model``."""
    if args.checkpoint is None:
        return args.model
    path = args.checkpoint.resolve()
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _config(args: argparse.Namespace) -> Config:
    if args.temperature is not None and not args.sample:
        raise UsageError("--temperature needs --sample (greedy decoding has no temperature)")
    overrides = list(args.overrides)
    overrides.append(f"model.path={args.checkpoint if args.checkpoint is not None else args.model}")
    overrides.append("model.tiny=false")
    if args.seeds is not None:
        overrides.append(f"eval.num_seeds={args.seeds}")
    if args.num_tasks is not None:
        overrides += [f"eval.num_tasks={args.num_tasks}", f"env.num_eval_tasks={args.num_tasks}"]
    if args.sample:
        overrides.append("eval.greedy=false")
    if args.temperature is not None:
        overrides.append(f"eval.temperature={args.temperature}")
    return load_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    if args.endpoint is not None and not args.model:
        raise UsageError("--endpoint needs --model NAME")
    if args.endpoint is not None and args.engine is not None:
        raise UsageError("--engine runs a --checkpoint; an --endpoint generates with its own server")
    if args.checkpoint is not None and args.model is not None:
        raise UsageError("--model names the model an --endpoint serves; name a --checkpoint's results with --label")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; give a directory")
    cfg = _config(args)
    tasks = eval_tasks(cfg)  # first: a gym that is not registered has no user simulator to check
    check_servers(cfg, "eval")
    if args.endpoint is not None and (problem := unserved_model(args.endpoint, args.model,
                                                                 os.environ.get(args.api_key_env))):
        raise UsageError(f"--model: {problem}")
    warning = repeated_seeds_warning(cfg)
    if warning:
        print(f"bao-fast eval: warning: {warning}", file=sys.stderr)
    if args.checkpoint is not None:
        from bao_fast.models import load_tokenizer

        if not (args.checkpoint / "config.json").is_file():
            raise UsageError(f"--checkpoint {args.checkpoint} is not an HF checkpoint (no config.json)")
        engine_kind = args.engine or cfg.rollout.engine
        if (missing := missing_engine(engine_kind)) is not None:
            where = f"--engine {engine_kind}" if args.engine else "config key 'rollout.engine'"
            raise UsageError(f"{where}: {missing}; --engine hf generates with transformers instead")
        engine, tokenizer = _build_engine(engine_kind, args.checkpoint, cfg), load_tokenizer(args.checkpoint)
        start = time.perf_counter()  # episodes only, not the model load
        trajs = evaluate_model(engine, tokenizer, cfg, tasks)
        model = str(args.checkpoint)
    else:
        with UserSimulatorClient(args.endpoint, args.model, api_key=os.environ.get(args.api_key_env)) as client:
            start = time.perf_counter()
            trajs = evaluate_endpoint(client, cfg, tasks)
        model, engine_kind = args.model, f"endpoint:{args.endpoint}"
    elapsed = time.perf_counter() - start
    meta = {
        "label": args.label or default_label(args),
        "model": model,
        "engine": engine_kind,
        "gym": cfg.env.name,
        "split": "test",
        "num_tasks": len(tasks),
        "decoding": decoding(cfg),
        "elapsed_s": round(elapsed, 3),
    }
    if args.checkpoint is not None:
        meta["generated_tokens"] = sum(len(t.assistant_token_ids) for t in trajs)
        meta["tokens_per_s"] = meta["generated_tokens"] / elapsed if elapsed > 0 else None
    summary = write_eval(trajs, args.out, meta, cfg.eval.max_k)
    ks = sorted(summary["pass_at_u"])
    print(
        f"{meta['label']}: Score {summary['score']:.3f} [{summary['score_ci'][0]:.3f}, {summary['score_ci'][1]:.3f}]"
        f"  UR {summary['ur']:.3f}  turns {summary['turns']:.2f}  "
        + "  ".join(f"Pass@U-{k} {summary['pass_at_u'][k]:.3f}" for k in ks[:3])
        + f"  ({summary['num_episodes']} episodes, {elapsed:.1f} s)"
    )
    print(f"wrote {args.out / EPISODES_FILE}, {args.out / SUMMARY_FILE} and {args.out / SUMMARY_MD_FILE}")
    return 0
