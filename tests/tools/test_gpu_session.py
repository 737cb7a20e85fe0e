"""tools/gpu_session.sh plumbing, with a stand-in Python that sleeps instead of running stages (no GPU here):
per-stage timeouts, the status file, the log archive after every stage, the exit status."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _install_hash() -> str:
    """The script's stamp of this checkout's build, computed as the script computes it."""
    return subprocess.run("cat setup.py csrc/* 2>/dev/null | sha256sum | cut -d' ' -f1", shell=True, cwd=REPO,
                          capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip


def test_stages_time_out_and_every_stage_leaves_status_and_logs(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\nif [[ "$1" == "-c" ]]; then exec {sys.executable} "$@"; fi\n'
                    'echo "stage: $*"; sleep 5\n')  # fmt: skip
    fake.chmod(0o755)
    stamp = tmp_path / "stamp"
    stamp.write_text(_install_hash() + "\n")  # this checkout's build: the install step is skipped
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": str(fake), "STAGE_TIMEOUT": "1",
           "BAO_FAST_INSTALL_STAMP": str(stamp)}  # fmt: skip
    done = subprocess.run(["bash", "tools/gpu_session.sh", "tune", "nonsense"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    status = (out / "status.txt").read_text().splitlines()
    assert status[0].startswith("tune rc=124 ") and status[1].startswith("unknown stage 'nonsense'")
    assert "reusing this machine's build" in _member(out / "logs.tar.gz", "logs/install.log")
    assert "stage: -m bao_fast.kernels.logprobs_tune" in _member(out / "logs.tar.gz", "logs/tune.log")
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "status.txt"]  # nothing else came back


def _member(archive: Path, name: str) -> str:
    with tarfile.open(archive) as tar:
        member = tar.extractfile(name)
        assert member is not None
        return member.read().decode()
