"""One run per run_dir: a second process is refused, naming the holder, until the first one ends (however it
ends); the process that holds the lock may start further runs there."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bao_fast.config import ConfigError, load_config, save_config
from bao_fast.train.run_lock import LOCK_FILE, lock_run_dir
from bao_fast.train.runtime import CONFIG_FILE, start_run

HOLD = "import sys, time; from bao_fast.train.run_lock import lock_run_dir; " \
       "assert lock_run_dir(sys.argv[1]) is None; print('locked', flush=True); time.sleep(120)"


def test_a_second_process_is_refused_until_the_holder_dies(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "a"  # created by the lock
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        problem = lock_run_dir(run_dir)
        assert problem == (f"config key 'run_dir': {str(run_dir)!r} is in use by another run (host "
                           f"{socket.gethostname()} pid {holder.pid}); wait for it to end or choose another run_dir")
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        holder.wait()
    assert lock_run_dir(run_dir) is None
    assert (run_dir / LOCK_FILE).read_text() == f"host {socket.gethostname()} pid {os.getpid()}\n"


def test_the_holder_may_lock_its_run_dir_again(tmp_path: Path) -> None:
    assert lock_run_dir(tmp_path) is None
    assert lock_run_dir(tmp_path / ".." / tmp_path.name) is None  # the same directory by another name
    other = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert other.returncode == 1 and "AssertionError" in other.stderr  # refused while this process holds it


@pytest.mark.usefixtures("single_rank_world")
@pytest.mark.parametrize("overrides", [["checkpoint.resume=false"], ["seed=2"], ["train.steps=2"]])
def test_start_run_on_a_locked_run_dir_says_so_before_anything_else(tmp_path: Path, overrides: list[str]) -> None:
    """Also when the config would fail preflight's resume checks against the running run's outputs (another seed,
    fewer steps than its checkpoint): their advice (resume=false) does not apply to a directory in use."""
    base = ["model.tiny=true", f"run_dir={tmp_path}", "rollout.engine=hf"]
    save_config(load_config(None, base), tmp_path / CONFIG_FILE)
    (tmp_path / "checkpoints" / "step-000003").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"is in use by another run .host .* pid {holder.pid}"):
            start_run(load_config(None, [*base, *overrides]), "train")
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "checkpoints" / "step-000003").is_dir()
    assert load_config(str(tmp_path / CONFIG_FILE), []) == load_config(None, base)  # not overwritten


def test_a_recreated_run_dir_is_locked_again(tmp_path: Path) -> None:
    """The process held the deleted directory's lock file, not the new one's."""
    run_dir = tmp_path / "run"
    assert lock_run_dir(run_dir) is None
    shutil.rmtree(run_dir)
    assert lock_run_dir(run_dir) is None
    other = subprocess.run([sys.executable, "-c", HOLD, str(run_dir)], capture_output=True, text=True, timeout=60)
    assert other.returncode == 1 and "AssertionError" in other.stderr


def test_an_unwritable_lock_file_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    problem = lock_run_dir(tmp_path)
    assert problem == (f"config key 'run_dir': cannot write the lock file {str(tmp_path / LOCK_FILE)!r}: "
                       "[Errno 28] No space left on device")
    monkeypatch.undo()
    assert lock_run_dir(tmp_path) is None  # the failed attempt kept no lock
