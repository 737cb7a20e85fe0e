"""FSDP2 sharding (1 and 2 gloo ranks give the same gradients), DCP checkpoint save/restore (atomic,
exact, and onto another world size), and the HF export loadable by transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bao_fast.models import create_tiny_model

from .conftest import run_worker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    init = create_tiny_model(out / "init")
    run_worker("_fsdp_worker.py", [str(init), str(out)], nproc=1)
    run_worker("_fsdp_worker.py", [str(init), str(out)], nproc=2)
    run_worker("_fsdp_worker.py", [str(init), str(out), "2"], nproc=1)  # 2 ranks' checkpoint onto 1
    run_worker("_fsdp_worker.py", [str(init), str(out), "1"], nproc=2)  # and 1's onto 2
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_checkpoint_restores_exactly_and_is_atomic(results: Path, world: int) -> None:
    r = json.loads((results / f"result-{world}.json").read_text())
    assert r["changed"] > 0  # the second optimiser step moved the weights ...
    assert r["restored_err"] == 0.0 and r["moment_err"] == 0.0  # ... and the restore undid it exactly
    assert r["rng_ok"]
    assert r["state"] == {"step": 1, "cursor": [0, 5]}
    assert r["latest"] == r["saved_at"] and r["latest"].endswith("step-000001")
    assert r["dirs"] == [".tmp-step-000009", "step-000001"]  # the crashed write is never picked


def test_gradients_match_across_world_sizes(results: Path) -> None:
    one = torch.load(results / "grads-1.pt")
    two = torch.load(results / "grads-2.pt")
    assert one["grads"].keys() == two["grads"].keys()
    for name, grad in one["grads"].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    r1, r2 = (json.loads((results / f"result-{w}.json").read_text()) for w in (1, 2))
    assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-5)


@pytest.mark.parametrize(("saved", "world"), [(2, 1), (1, 2)])
def test_checkpoint_reshards_onto_another_world_size(results: Path, saved: int, world: int) -> None:
    """Parameters and Adam moments come back bit for bit on the new sharding, the trainer state is rank 0's,
    the caller's RNG seeding stands, and the next step matches the one the saving world took."""
    original = torch.load(results / f"grads-{saved}.pt")
    resharded = torch.load(results / f"reshard-{saved}-to-{world}.pt")
    assert resharded["state"] == {"step": 1, "cursor": [0, 5]}
    assert resharded["rng_kept"]
    assert resharded["params"].keys() == original["params"].keys()
    for name, value in original["params"].items():
        assert torch.equal(resharded["params"][name], value), name
        assert original["moments"][name].keys() == {"exp_avg", "exp_avg_sq"}, name
        for key, moment in original["moments"][name].items():
            assert moment.abs().sum() > 0, (name, key)
            assert torch.equal(resharded["moments"][name][key], moment), (name, key)
        stepped = resharded["stepped"][name]
        assert not torch.equal(stepped, value), name
        torch.testing.assert_close(stepped, original["stepped"][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("world", [1, 2])
def test_hf_export_loads_with_the_trained_weights(results: Path, world: int) -> None:
    export = Path(json.loads((results / f"result-{world}.json").read_text())["export"])
    model = AutoModelForCausalLM.from_pretrained(export)
    params = torch.load(results / f"grads-{world}.pt")["params"]
    state = model.state_dict()
    for name, value in params.items():
        torch.testing.assert_close(state[name.removeprefix("hf.")], value, rtol=0, atol=0, msg=name)
    assert set(load_file(export / "model.safetensors")) <= set(state)
    assert (export / "tokenizer.json").is_file()
