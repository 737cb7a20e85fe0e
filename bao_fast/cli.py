"""``bao-fast`` command line: dispatches each subcommand to the module that implements it.

Every command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. A module that is not
there yet leaves its subcommand listed, failing with a clear message that names the issue.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, one-line help, issue that delivers it)
COMMANDS: dict[str, tuple[str, str, int]] = {
    "sft": ("bao_fast.train.sft", "behaviour-enhanced SFT on teacher trajectories", 8),
    "train": ("bao_fast.train.rl", "BAO multi-turn GRPO training (SFT first when enabled)", 8),
    "eval": ("bao_fast.eval.evaluate", "evaluate a checkpoint or an OpenAI-compatible endpoint on a gym", 9),
    "pareto": ("bao_fast.eval.pareto", "Pareto frontier of Score vs user effort over runs", 9),
    "bench": ("bao_fast.eval.bench", "run the benchmark suite and render its report", 9),
    "demo": ("bao_fast.train.demo", "the embedded default: tiny model, Function gym, SFT then BAO RL", 8),
}


def _load(module_name: str):
    """Import a command module; None when the module itself does not exist yet."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bao-fast", description="BAO trainer for proactive multi-turn LLM agents, with fused ops."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module_name, help_text, issue) in COMMANDS.items():
        module = _load(module_name)
        if module is None:
            sub.add_parser(name, help=f"{help_text} (not implemented yet: see issue {issue})")
            continue
        command = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        _, _, issue = COMMANDS[args.command]
        print(f"bao-fast {args.command}: not implemented yet: see issue {issue}", file=sys.stderr)
        return 2
    return int(run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
