"""Stopping on SIGTERM / SIGUSR1 at a step boundary with a checkpoint (``bao_fast.train.preemption``).

In-process: the handlers record instead of killing, are restored afterwards, and the command line turns the
stop into exit status 128 + the signal. In subprocesses: an SFT run (one rank, SIGUSR1) and an RL run (two
torchrun ranks; SIGTERM to torchrun, which forwards it) stop after a step with a complete checkpoint of that
step, and rerunning resumes from it — SFT exactly as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bao_fast import cli
from bao_fast.cli import StopRequested
from bao_fast.train import rl
from bao_fast.train.checkpoint import latest_checkpoint
from bao_fast.train.logging import read_jsonl
from bao_fast.train.preemption import STOP_SIGNALS, stop_requested, stop_signals

from .conftest import run_worker, worker_command, worker_process
from .test_sft_resume import sft_args, stable
from .test_train import BASE as RL_BASE


@pytest.mark.usefixtures("single_rank_world")
@pytest.mark.parametrize("sig", STOP_SIGNALS)
def test_a_stop_signal_is_recorded_then_the_old_handler_returns(sig: signal.Signals) -> None:
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    with stop_signals() as signals:
        assert signals.agreed() is None
        os.kill(os.getpid(), sig)  # delivered to this (main) thread before kill returns
        assert signals.received == sig
        assert signals.agreed() == sig
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


@pytest.mark.usefixtures("single_rank_world")
def test_outside_the_main_thread_nothing_is_installed() -> None:
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    seen: list[object] = []

    def body() -> None:
        with stop_signals() as signals:
            seen.append({s: signal.getsignal(s) for s in STOP_SIGNALS})
            seen.append(signals.agreed())

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [before, None]


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_the_command_line_exits_with_128_plus_the_signal(
    sig: signal.Signals, status: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def stopped(args: object) -> int:
        raise stop_requested("RL", 7, sig, "checkpoint runs/x/checkpoints/step-000007 saved")

    monkeypatch.setattr(rl, "run", stopped)
    assert cli.main(["train", "--config", "unused.yaml"]) == status
    assert capsys.readouterr().err == (f"bao-fast train: RL stopped after step 7 on {sig.name}: checkpoint "
                                       "runs/x/checkpoints/step-000007 saved; rerun the command to resume\n")
    assert isinstance(stop_requested("SFT", 1, sig, "c"), StopRequested)


def signal_after_first_step(cmd: list[str], env: dict[str, str], log: Path, sig: signal.Signals,
                            timeout: float = 300) -> subprocess.CompletedProcess:
    """Start ``cmd``, send ``sig`` once ``log`` records step 1, and wait for it to end."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not (log.is_file() and any(r.get("step", 0) >= 1 for r in read_jsonl(log))):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"no step 1 before the run ended (exit {proc.returncode}):\n{(out + err)[-4000:]}")
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_sft_stopped_by_sigusr1_saves_its_step_and_resumes_exactly(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    run_worker("_train_worker.py", sft_args(straight), timeout=200)
    run_dir = tmp_path / "run"
    cmd, env = worker_command("_train_worker.py", sft_args(run_dir))
    proc = signal_after_first_step(cmd, env, run_dir / "sft.jsonl", signal.SIGUSR1)
    assert proc.returncode == 128 + signal.SIGUSR1, (proc.stdout + proc.stderr)[-4000:]
    step = stable(run_dir)[-1]["step"]
    checkpoint = run_dir / "sft-checkpoints" / f"step-{step:06d}"
    assert latest_checkpoint(run_dir / "sft-checkpoints") == checkpoint  # save_every=2 alone would not say so
    assert (f"bao-fast: SFT stopped after step {step} on SIGUSR1: checkpoint {checkpoint} saved; rerun the command "
            "to resume") in proc.stderr
    assert not (run_dir / "sft-model").exists()
    run_worker("_train_worker.py", sft_args(run_dir), timeout=200)
    assert stable(run_dir) == stable(straight)


@pytest.mark.slow
def test_rl_on_two_ranks_stopped_by_sigterm_to_torchrun_saves_its_step_and_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [*RL_BASE, f"run_dir={run_dir}", "rollout.engine=hf", "train.steps=50", "checkpoint.save_every=0",
                 "train.eval_every=0"]
    args = [json.dumps({"overrides": overrides}), str(run_dir.with_suffix(".json"))]
    # the grace torchrun gives its workers after forwarding SIGTERM (30 s by default): room for a loaded CI machine
    cmd, env = worker_command("_train_worker.py", args, nproc=2, torchrun_args=("--shutdown-timeout", "180"))
    proc = signal_after_first_step(cmd, env, run_dir / "train.jsonl", signal.SIGTERM)
    records = [r for r in read_jsonl(run_dir / "train.jsonl") if "reward" in r]
    step = records[-1]["step"]
    assert 1 <= step < 50, (proc.stdout + proc.stderr)[-4000:]
    checkpoint = run_dir / "checkpoints" / f"step-{step:06d}"
    assert latest_checkpoint(run_dir / "checkpoints") == checkpoint  # save_every=0: only the stop saved
    stopped = json.loads(run_dir.with_suffix(".json").read_text())["stopped"]
    assert stopped == (f"RL stopped after step {step} on SIGTERM: checkpoint {checkpoint} saved; rerun the command "
                       "to resume")
    assert not (run_dir / "final-model").exists()
    overrides[overrides.index("train.steps=50")] = f"train.steps={step + 1}"
    args[0] = json.dumps({"overrides": overrides})
    cmd, env = worker_command("_train_worker.py", args, nproc=2)
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert f"resuming RL after step {step} from {checkpoint}" in resumed.stderr
    assert [r["step"] for r in read_jsonl(run_dir / "train.jsonl") if "reward" in r] == list(range(1, step + 2))
    assert (run_dir / "final-model" / "config.json").is_file()


@pytest.mark.slow
def test_a_signal_in_sfts_last_step_stops_train_after_the_export_before_rl(tmp_path: Path) -> None:
    """SIGTERM at the end of SFT's last step (as its export begins) in ``train``: the export completes, and the
    run stops there instead of dropping the signal and starting RL."""
    run_dir = tmp_path / "run"
    spec = {**json.loads(sft_args(run_dir)[0]), "stage": "train", "signal_at_sft_export": "SIGTERM"}
    spec["overrides"] += ["rollout.engine=hf", "train.steps=1"]  # bounded, should RL start after all
    proc = worker_process("_train_worker.py", [json.dumps(spec), str(run_dir.with_suffix(".json"))])
    assert proc.returncode == 128 + signal.SIGTERM, (proc.stdout + proc.stderr)[-4000:]
    last = stable(run_dir)[-1]["step"]
    assert (f"bao-fast: SFT stopped after step {last} on SIGTERM: the SFT model {run_dir / 'sft-model'} exported; "
            "rerun the command to resume") in proc.stderr
    assert (run_dir / "sft-model" / "model.safetensors").is_file()
    assert not (run_dir / "sft-checkpoints").exists()
    assert not (run_dir / "train.jsonl").exists() and not (run_dir / "checkpoints").exists()
