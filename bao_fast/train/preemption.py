"""Stop on a scheduler's signal at the next step boundary, with a checkpoint, instead of losing the steps since
the last one.

While :func:`stop_signals` is active, SIGTERM (what SLURM and Kubernetes send before they kill a job, and what
``torchrun`` forwards to its workers when it is stopped) and SIGUSR1 (SLURM's ``--signal=USR1@<seconds>``
warning) only record that they arrived. The trainers ask :meth:`StopSignals.agreed` after every step: one
max-reduce over the ranks, so that every rank decides the same even when the signal reached them at different
moments. They then save a checkpoint of that step and raise :class:`StopRequested`, which the command line
turns into one line and exit status 128 + the signal's number (143 for SIGTERM, the shell's convention for a
process that signal ended). Rerunning the command resumes from that checkpoint. A signal during SFT's last
step or its export stops the run once the SFT model is exported, before RL starts.

The step must end within the launcher's grace period: ``torchrun --shutdown-timeout`` (30 s by default)
before its SIGKILL, SLURM's ``KillWait``, or the lead time of ``--signal=USR1@<seconds>`` (``torchrun``
forwards SIGUSR1 only when told: ``--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1``). A kill
before the checkpoint is complete loses only that step: checkpoints are written atomically. SIGINT (Ctrl-C)
keeps its immediate effect.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from bao_fast.cli import StopRequested
from bao_fast.train.collectives import max_over_ranks

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """The stop signals this process received while :func:`stop_signals` was active (the latest one)."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def agreed(self) -> signal.Signals | None:
        """Collective (every rank must call it at the same point): the stop signal any rank received, or None.
        When several ranks received different ones, the highest-numbered."""
        signum = max_over_ranks(int(self.received or 0))
        return signal.Signals(signum) if signum else None


@contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """Record :data:`STOP_SIGNALS` instead of dying of them, for the duration of the block; the previous
    handlers come back afterwards. Outside the main thread (where Python cannot install handlers) nothing is
    installed and no signal is ever recorded, the same on every rank."""
    signals = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return
    previous = {sig: signal.signal(sig, signals._record) for sig in STOP_SIGNALS}
    try:
        yield signals
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_requested(stage: str, step: int, signum: signal.Signals, saved: str) -> StopRequested:
    """The exception a trainer raises once it stopped after ``step`` of ``stage`` on ``signum``, having
    ``saved`` (e.g. ``checkpoint <path> saved``)."""
    return StopRequested(f"{stage} stopped after step {step} on {signum.name}: {saved}; rerun the command to resume",
                         signum)
