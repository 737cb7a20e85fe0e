"""A process that colocates vLLM with the trainer's process group exits without vLLM's exit-time teardown
failing on process groups the trainer already destroyed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bao_fast.models import TinyModelSpec, create_tiny_model

SCRIPT = textwrap.dedent(
    """
    import sys
    from bao_fast.config import RolloutConfig
    from bao_fast.rollout.vllm_engine import VLLMEngine
    from bao_fast.train.fsdp import init_distributed, shutdown_distributed

    init_distributed()
    engine = VLLMEngine.from_config(sys.argv[1], RolloutConfig(max_model_len=256, enforce_eager=True))
    shutdown_distributed()
    print("shutdown ok")
    """
)


@pytest.mark.slow
def test_exit_after_shutdown_with_colocated_vllm_is_clean(tmp_path: Path) -> None:
    model = create_tiny_model(tmp_path / "tiny", spec=TinyModelSpec(num_hidden_layers=1))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shutdown ok" in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
