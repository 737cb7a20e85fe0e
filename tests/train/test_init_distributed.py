"""init_distributed without torchrun: a world of one on a free local port, retried when another process takes
the probed port before the store binds it (parallel test workers did, failing runs with EADDRINUSE)."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import os, socket
from unittest import mock
from bao_fast.train import fsdp
busy = socket.socket()
busy.bind(("127.0.0.1", 0))
busy.listen()
taken = busy.getsockname()[1]
real = fsdp._free_port
probes = iter([taken])  # the first probe returns a port that is already in use
with mock.patch.object(fsdp, "_free_port", side_effect=lambda: next(probes, None) or real()):
    env = fsdp.init_distributed()
print(env.rank, env.world_size, int(os.environ["MASTER_PORT"]) != taken)
"""


def test_world_of_one_retries_a_port_taken_before_the_bind() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["0", "1", "True"]
