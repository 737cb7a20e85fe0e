"""The ``bao-fast`` dispatcher: every subcommand is listed and has working ``--help``, only the chosen
command's module is imported, and mistakes in the command line end in one line and exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bao_fast.cli import COMMANDS, build_parser, main
from bao_fast.eval import pareto
from bao_fast.rollout import engine as rollout_engine

DEMO_CONFIG = str(Path(__file__).parents[1] / "configs" / "demo-cpu.yaml")


def test_every_subcommand_is_listed_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_help_imports_no_command_module() -> None:
    code = (
        "import sys\nfrom bao_fast.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith(('bao_fast.eval', 'bao_fast.train', 'torch'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_subcommand_help_exits_cleanly(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"bao-fast {name}" in out
    assert not any(role in out for role in (":func:", ":mod:", ":class:", ":data:", ":meth:"))  # user text


def test_unknown_subcommand_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["launch"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [(["train", "--config", "c.yaml", "--steps", "3"], "--steps"), (["demo", "--cofig", "x"], "--cofig")],
)
def test_unknown_flag_names_the_command(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The command's own usage and name, not the top level's ``usage: bao-fast [-h] {sft,...}``."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: bao-fast {argv[0]} ")
    assert f"bao-fast {argv[0]}: error: unrecognized arguments: {flag}" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--endpoint", "http://127.0.0.1:9"], "bao-fast eval: --endpoint needs --model NAME"),
        (["eval", "--endpoint", "http://127.0.0.1:9", "--model", "m", "--temperature", "0.5"],
         "bao-fast eval: --temperature needs --sample"),
        (["eval", "--endpoint", "http://127.0.0.1:9", "--model", "m", "env.nope=1"],
         "bao-fast eval: unknown config key 'env.nope'"),
        (["eval", "--endpoint", "http://127.0.0.1:9", "--model", "m", "--config", "no/such.yaml"],
         "bao-fast eval: no/such.yaml: No such file or directory"),
        (["pareto"], "bao-fast pareto: give summaries"),
        (["pareto", "no/such/run"], "bao-fast pareto: inputs: no/such/run does not exist"),
        (["bench", "--only", "nosuchop", "--bench-dir", "{tmp}"], "bao-fast bench: --only: no benchmarks/bench_*.py"),
        (["eval", "--endpoint", "http://127.0.0.1:9", "--model", "m", "--config", "{tmp}"],
         "bao-fast eval: {tmp}: Is a directory"),
        (["demo", "--config", "{tmp}"], "bao-fast demo: {tmp}: Is a directory"),
        (["sft", "--config", "{demo}", "sft.enabled=false"],
         "bao-fast sft: sft.enabled is false: nothing to train (bao-fast train runs RL without SFT)"),
        (["eval", "--endpoint", "http://127.0.0.1:9", "--model", "m", "--out", "{tmp}/file"],
         "bao-fast eval: --out {tmp}/file is a file; give a directory"),
        (["pareto", "{tmp}", "--out", "{tmp}/file"], "bao-fast pareto: --out {tmp}/file is a file; give a directory"),
        (["pareto", "{tmp}/file"], "bao-fast pareto: {tmp}/file: not a JSON evaluation summary"),
        (["pareto", "--dry-run", "{tmp}"], "bao-fast pareto: --dry-run needs --sweep BASE_YAML"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("not a directory, nor a summary")
    assert main([a.format(tmp=tmp_path, demo=DEMO_CONFIG) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(tmp=tmp_path)) and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("error", [FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError])
def test_path_errors_name_the_path_and_exit_2(
    error: type[OSError], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refused(args: object) -> int:
        raise error(17, "refused", "runs/x")

    monkeypatch.setattr(pareto, "run", refused)
    assert main(["pareto", "x"]) == 2
    assert capsys.readouterr().err == "bao-fast pareto: runs/x: refused\n"


def test_run_errors_print_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bao_fast.train.checkpoint import CheckpointError

    def damaged(args: object) -> int:
        raise CheckpointError("checkpoint runs/x/step-000002 is damaged: rank 0: cannot read rank-0.pt")

    monkeypatch.setattr(pareto, "run", damaged)
    assert main(["pareto", "x"]) == 1
    err = capsys.readouterr().err
    assert err == "bao-fast pareto: checkpoint runs/x/step-000002 is damaged: rank 0: cannot read rank-0.pt\n"


def test_bugs_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args: object) -> int:
        raise ValueError("a bug, not a user error")

    monkeypatch.setattr(pareto, "run", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["pareto", "x"])


def test_module_entry_point_reports_user_errors() -> None:
    """``python -m bao_fast.cli`` (torchrun, sweeps) catches the UsageError class the commands import."""
    result = subprocess.run([sys.executable, "-m", "bao_fast.cli", "pareto"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("bao-fast pareto: give summaries")


@pytest.mark.parametrize(("flags", "message"), [
    (["--engine", "vllm"], "bao-fast eval: --engine vllm: vLLM is not installed here"),
    ([], "bao-fast eval: config key 'rollout.engine': vLLM is not installed here"),
])
def test_eval_without_vllm_names_the_engine_before_loading(
    flags: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(rollout_engine, "find_spec", lambda name: None)
    (tmp_path / "config.json").write_text("{}")  # refused before anything reads it
    assert main(["eval", "--checkpoint", str(tmp_path), "--config", DEMO_CONFIG, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and "; --engine hf generates with transformers instead" in err
    assert len(err.splitlines()) == 1
