"""``bao-fast`` command line: dispatches each subcommand to the module that implements it.

Every command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Only the chosen command's
module is imported (they pull in torch, transformers or vLLM), so ``bao-fast --help`` loads none of them.

A mistake in what the user typed ends the command with one line on stderr, ``bao-fast <cmd>: <message>``,
and exit status 2 (argparse's own status for bad arguments): :class:`UsageError` (flags that do not go
together, an unknown name, input files that are not what the command reads), ``ConfigError`` (a bad
config file or ``KEY=VALUE`` override) and the ``OSError`` of a path that does not exist, is a file where a
directory is needed or the other way round, or may not be read or written (:data:`PATH_ERRORS`). The
commands load their config inside ``run``, so these are caught around it. A :class:`RunError` (the run's
files or disk failed it: a damaged checkpoint, a full disk) prints its one line too, with exit status 1;
:class:`StopRequested` (a run that saved a checkpoint and stopped on SIGTERM / SIGUSR1) with 128 + the signal's
number. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from bao_fast.config import ConfigError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "sft": ("bao_fast.train.sft", "behaviour-enhanced SFT on teacher trajectories"),
    "train": ("bao_fast.train.rl", "BAO multi-turn GRPO training (SFT first when enabled)"),
    "eval": ("bao_fast.eval.evaluate", "evaluate a checkpoint or an OpenAI-compatible endpoint on a gym"),
    "pareto": ("bao_fast.eval.pareto", "Pareto frontier of Score vs user effort over runs"),
    "bench": ("bao_fast.eval.bench", "run the benchmark suite and render its report"),
    "demo": ("bao_fast.train.demo", "the embedded default: tiny model, Function gym, SFT then BAO RL"),
}


class UsageError(ValueError):
    """The command line asks for something the command cannot do; the message names the argument."""


class RunError(RuntimeError):
    """The run cannot go on for a reason outside the code (a damaged checkpoint, a full disk); the message
    names the path and what is left on disk. The command ends with that one line and exit status 1."""


class StopRequested(RuntimeError):
    """The run stopped early on a signal, after saving a checkpoint (``bao_fast.train.preemption``); rerunning
    the command resumes it. The command ends with the message and exit status 128 + ``signum``."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = int(signum)


PATH_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError
)
USER_ERRORS: tuple[type[Exception], ...] = (UsageError, ConfigError, *PATH_ERRORS)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``bao-fast`` parser. Every subcommand is listed; only ``command`` has its arguments (and its
    module imported), enough to parse a command line that names it."""
    parser = argparse.ArgumentParser(
        prog="bao-fast", description="BAO trainer for proactive multi-turn LLM agents, with fused ops."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module_name, help_text) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        parsed = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(parsed)
        parsed.set_defaults(_run=module.run, _parser=parsed)
    return parser


def _message(exc: Exception) -> str:
    if isinstance(exc, PATH_ERRORS) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the top level has no valued options
    args, unknown = build_parser(command if command in COMMANDS else None).parse_known_args(argv)
    if unknown:  # the command's usage and name, not the top level's (argparse reports them at the top)
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as exc:
        print(f"bao-fast {args.command}: {_message(exc)}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"bao-fast {args.command}: {exc}", file=sys.stderr)
        return 1
    except StopRequested as exc:
        print(f"bao-fast {args.command}: {exc}", file=sys.stderr)
        return 128 + exc.signum


if __name__ == "__main__":
    from bao_fast import cli  # the imported module: its UsageError is the class the commands raise

    sys.exit(cli.main())
