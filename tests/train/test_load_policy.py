"""``load_policy``: the policy trains in train mode with every dropout off (its log-probs are deterministic,
as the PPO ratio needs), and ``model.gradient_checkpointing`` really recomputes each decoder layer in the
backward (transformers checkpoints only in train mode)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bao_fast.config import ModelConfig
from bao_fast.data.segments import pack_segments
from bao_fast.models.tiny import TinyModelSpec, create_tiny_model
from bao_fast.train.fsdp import decoder_layers, init_distributed, load_policy

from .conftest import run_worker

pytestmark = pytest.mark.usefixtures("single_rank_world")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with attention dropout in its config, as some checkpoints ship."""
    path = create_tiny_model(tmp_path_factory.mktemp("tiny"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    return path


@pytest.fixture(scope="module")
def batch():
    return pack_segments([[("user", [5, 6, 7, 8]), ("assistant", [9, 10, 11, 12, 13])], [("user", [4, 3]),
                          ("assistant", [20, 21, 22])]])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_recomputes_every_layer(model_dir: Path, batch, checkpointing: bool) -> None:
    policy = load_policy(model_dir, ModelConfig(path=str(model_dir), gradient_checkpointing=checkpointing),
                         init_distributed())
    calls: list[int] = []
    for i, layer in enumerate(decoder_layers(policy.hf)):  # (forward hooks do not fire in the recompute)
        layer.mlp.forward = lambda *args, i=i, forward=layer.mlp.forward, **kwargs: (
            calls.append(i), forward(*args, **kwargs))[1]
    policy(batch).sum().backward()
    assert sorted(calls) == ([0, 0, 1, 1] if checkpointing else [0, 1])  # forward (+ recompute in backward)


def test_policy_trains_without_dropout(model_dir: Path, batch) -> None:
    policy = load_policy(model_dir, ModelConfig(path=str(model_dir)), init_distributed())
    assert policy.hf.training
    assert all(getattr(m, "attention_dropout", 0.0) == 0.0 for m in policy.modules())
    first, second = policy(batch), policy(batch)
    assert first.abs().sum() > 0 and first.equal(second)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_two_ranks_read_the_checkpoint_once(tmp_path: Path, tied: bool) -> None:
    """Rank 0 reads the checkpoint; rank 1 builds on the meta device and receives the weights and the rotary
    buffers (outside the state dict) from rank 0: every gathered tensor equals the checkpoint's."""
    model = create_tiny_model(tmp_path / "tiny", spec=TinyModelSpec(tie_word_embeddings=tied))
    run_worker("_load_worker.py", [str(model), str(tmp_path)], nproc=2)
    results = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["reads"] for r in results] == [1, 0]
    assert [r["mismatches"] for r in results] == [[], []]
