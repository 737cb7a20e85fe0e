"""init_distributed without torchrun: a world of one needs no port, so a child process that inherits the
``MASTER_PORT`` its parent's store still listens on starts cleanly (CLI runs launched from the test process
failed with EADDRINUSE)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

SCRIPT = """
import os
from bao_fast.train.fsdp import init_distributed
env = init_distributed()
print(env.rank, env.world_size, os.environ["MASTER_PORT"])
"""


def test_world_of_one_ignores_an_inherited_port_in_use() -> None:
    with socket.socket() as busy:  # the parent's store, still listening
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}
        proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120,
                              check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["0", "1", port]
