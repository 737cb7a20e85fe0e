"""One run per ``run_dir``: rank 0 holds an exclusive ``flock`` on ``<run_dir>/.lock`` until its process ends.

Two runs writing the same directory would overwrite each other's checkpoints and exports, and the newer
``config.yaml`` would vouch for the older run's checkpoints. The kernel drops the lock when the process
exits, however it exits (a SIGKILL included), so a crashed run never leaves a stale lock behind. A process
that already holds the lock may start further runs in the same directory (the demo; tests). On a
filesystem without ``flock`` support the run goes on with a warning.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path

LOCK_FILE = ".lock"

_HELD: dict[Path, tuple[int, tuple[int, int]]] = {}
"""Lock file descriptors this process holds, with their files' (device, inode), by resolved ``run_dir``; kept
open for the process's life."""


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def lock_run_dir(run_dir: str | Path) -> str | None:
    """Create ``run_dir`` and take its lock; None once held, else why not (as a ConfigError message naming
    ``run_dir`` and the holder's host and pid, or the lock file that cannot be written)."""
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    key, path = root.resolve(), root / LOCK_FILE
    if key in _HELD:
        fd, identity = _HELD[key]
        if _identity(path) == identity:
            return None
        os.close(fd)  # run_dir was deleted or replaced since: its new lock file is not the one held
        del _HELD[key]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process"
        os.close(fd)
        return (f"config key 'run_dir': {str(run_dir)!r} is in use by another run ({holder}); wait for it to "
                "end or choose another run_dir")
    except OSError as exc:  # e.g. a network filesystem mounted without flock support
        os.close(fd)
        print(f"warning: cannot lock run_dir {str(run_dir)!r} ({exc}); make sure no other run uses it",
              file=sys.stderr, flush=True)
        return None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        held = os.fstat(fd)
        _HELD[key] = fd, (held.st_dev, held.st_ino)
    except OSError as exc:  # e.g. a full disk: the run could not write its checkpoints either
        os.close(fd)
        return f"config key 'run_dir': cannot write the lock file {str(path)!r}: {exc}"
    return None
