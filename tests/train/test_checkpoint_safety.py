"""Checkpoint robustness, in one process (a gloo world of one): a failed or killed save never corrupts or
hides the previous checkpoint, retention never deletes the only good one, a damaged or foreign checkpoint
is refused with an error naming it, and a restore continues bit-exactly (model, optimiser, scheduler, RNG,
data cursor), after which the HF export loads in transformers. Faults are injected by monkeypatching; one
test SIGKILLs a real saving process."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoModelForCausalLM

from bao_fast.config import ModelConfig, OptimConfig
from bao_fast.data.segments import pack_segments
from bao_fast.models import load_tokenizer
from bao_fast.models.tiny import create_tiny_model
from bao_fast.train import checkpoint as ck
from bao_fast.train.checkpoint import (
    CheckpointError,
    export_hf,
    latest_checkpoint,
    load_checkpoint,
    resume_message,
    save_checkpoint,
)
from bao_fast.train.fsdp import init_distributed, load_policy
from bao_fast.train.optim import build_optimizer, build_scheduler, clip_grad_norm
from bao_fast.train.runtime import TaskSampler

from .conftest import run_worker

pytestmark = pytest.mark.usefixtures("single_rank_world")

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny"))


class Trainer:
    """A miniature trainer: sharded policy, AdamW + schedule, a task sampler and RNG-driven batches."""

    def __init__(self, model_dir: Path) -> None:
        self.policy = load_policy(model_dir, ModelConfig(path=str(model_dir)), init_distributed())
        self.optim_cfg = OptimConfig(lr=1e-2, warmup_steps=3, schedule="cosine")
        self.optimizer = build_optimizer(self.policy, self.optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, self.optim_cfg, 8)
        self.sampler = TaskSampler(5, seed=7)
        self.step = 0

    def train_step(self) -> float:
        """One optimiser step on a batch that depends on the sampler and on python / numpy / torch RNG."""
        self.step += 1
        tasks = self.sampler.next(2)
        trajectories = [
            [("user", [3 + t, 4 + random.randrange(50), 5]),
             ("assistant", (torch.randint(3, 2000, (4,)) + int(np.random.randint(0, 9))).tolist())]
            for t in tasks
        ]
        batch = pack_segments(trajectories)
        loss = -self.policy(batch).sum() / batch.target_rows.numel()
        loss.backward()
        clip_grad_norm(self.policy, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def state(self) -> dict:
        return {"step": self.step, "sampler": self.sampler.state_dict(), "scheduler": self.scheduler.state_dict()}

    def save(self, root: Path, keep_last: int = 2) -> Path:
        return save_checkpoint(root, self.step, self.policy, self.optimizer, self.state(), keep_last=keep_last)

    def restore(self, path: Path, *, reshard: bool = False) -> None:
        saved = load_checkpoint(path, self.policy, self.optimizer, reshard=reshard)
        self.step = saved["step"]
        self.sampler.load_state_dict(saved["sampler"])
        self.scheduler.load_state_dict(saved["scheduler"])

    def params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().full_tensor().clone() for n, p in self.policy.named_parameters()}


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------------------------------
# Exact resume, and the HF export after it
# ----------------------------------------------------------------------------------------------------


def test_restore_in_a_fresh_trainer_continues_bit_exactly_and_exports(model_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    straight = Trainer(model_dir)
    for _ in range(2):
        straight.train_step()
    saved = straight.save(tmp_path / "ck")
    expected_losses = [straight.train_step() for _ in range(3)]
    expected = straight.params()

    torch.manual_seed(99), np.random.seed(99), random.seed(99)  # a new process has other RNG states
    resumed = Trainer(model_dir)  # fresh model, optimiser (no moments yet), schedule and cursor
    resumed.restore(latest_checkpoint(tmp_path / "ck"))
    assert latest_checkpoint(tmp_path / "ck") == saved and resumed.step == 2
    assert [resumed.train_step() for _ in range(3)] == expected_losses
    assert_same(resumed.params(), expected)
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()

    export = export_hf(resumed.policy, load_tokenizer(model_dir), tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(export)
    state = model.state_dict()
    for name, value in expected.items():
        assert torch.equal(state[name.removeprefix("hf.")], value), name
    assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


# ----------------------------------------------------------------------------------------------------
# Failed and killed saves
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def trained(model_dir: Path, tmp_path: Path) -> tuple[Trainer, Path, dict[str, torch.Tensor]]:
    """A trainer with a good checkpoint at step 1 (and its parameters), then one more step taken."""
    torch.manual_seed(0)
    t = Trainer(model_dir)
    t.train_step()
    root = tmp_path / "ck"
    t.save(root)
    good = t.params()
    t.train_step()
    return t, root, good


def assert_restores(t: Trainer, path: Path, params: dict[str, torch.Tensor]) -> None:
    t.restore(path)
    assert_same(t.params(), params)


def _fail_on_first_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full when DCP syncs its first shard (the data is already written): os.fsync raises once."""
    real = os.fsync
    calls = []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise ENOSPC
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _fail_after_dcp_wrote(monkeypatch: pytest.MonkeyPatch) -> None:
    """dcp.save writes every shard and .metadata, then raises (e.g. a rank dying right after)."""
    real = dcp.save

    def save(*args, **kwargs):
        real(*args, **kwargs)
        raise ENOSPC

    monkeypatch.setattr(ck.dcp, "save", save)


def _fail_on_rank_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save of the per-rank trainer state hits a full disk (DCP's own torch.save calls pass)."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if str(getattr(f, "name", f)).endswith(".pt"):
            f.write(b"PK\x03\x04partial")
            raise ENOSPC
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("inject", [_fail_on_first_fsync, _fail_after_dcp_wrote, _fail_on_rank_file])
def test_disk_full_during_save_raises_clearly_and_keeps_the_previous_checkpoint(
    trained, monkeypatch: pytest.MonkeyPatch, inject
) -> None:
    t, root, good = trained
    inject(monkeypatch)
    with pytest.raises(CheckpointError) as info:
        t.save(root)
    monkeypatch.undo()
    message = str(info.value)
    assert str(root / "step-000002") in message and "No space left on device" in message
    assert f"previous checkpoint {root / 'step-000001'} is intact" in message
    assert names(root) == ["step-000001"]  # the partial write is gone (its space given back)
    assert latest_checkpoint(root) == root / "step-000001"
    assert_restores(t, root / "step-000001", good)


def test_failed_state_gather_raises_before_writing(trained, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank whose optimiser state cannot be gathered (e.g. out of memory) stops every rank before DCP's
    collectives, instead of leaving the others inside dcp.save."""
    t, root, good = trained

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ck, "get_optimizer_state_dict", out_of_memory)
    monkeypatch.setattr(dcp, "save", lambda *a, **k: pytest.fail("dcp.save must not run"))
    with pytest.raises(CheckpointError, match=r"step-000002 \(gathering its state\): rank 0: RuntimeError: CUDA out"):
        t.save(root)
    monkeypatch.undo()
    assert names(root) == ["step-000001"]
    assert_restores(t, root / "step-000001", good)


def test_failed_save_with_keep_last_one_keeps_the_only_checkpoint(trained, monkeypatch) -> None:
    t, root, good = trained
    _fail_after_dcp_wrote(monkeypatch)
    with pytest.raises(CheckpointError):
        t.save(root, keep_last=1)
    monkeypatch.undo()
    assert names(root) == ["step-000001"]
    assert_restores(t, root / "step-000001", good)


class Killed(BaseException):
    """Stands for SIGKILL: no ``except Exception`` handler (nor the checkpoint code's) runs."""


def test_crash_mid_save_is_never_picked_and_the_next_save_cleans_up(trained, monkeypatch) -> None:
    t, root, good = trained
    real = dcp.save

    def save(state, checkpoint_id):
        real(state, checkpoint_id=checkpoint_id)
        for f in Path(checkpoint_id).glob("*.distcp"):  # a shard half-written when the process died
            f.write_bytes(f.read_bytes()[:100])
        raise Killed

    monkeypatch.setattr(ck.dcp, "save", save)
    with pytest.raises(Killed):
        t.save(root)
    monkeypatch.undo()
    assert names(root) == [".tmp-step-000002", "step-000001"]
    assert latest_checkpoint(root) == root / "step-000001"
    assert_restores(t, root / "step-000001", good)
    t.train_step()
    t.save(root)  # the rerun reaches step 2 again: a complete checkpoint, the crashed write cleared
    assert names(root) == ["step-000001", "step-000002"]
    assert_restores(t, root / "step-000002", t.params())


def test_crash_while_pruning_never_leaves_a_half_deleted_step(trained, monkeypatch) -> None:
    t, root, _ = trained
    t.save(root)  # step 2
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path).name == ".del-step-000001" and Path(path).exists():
            (Path(path) / ".metadata").unlink()  # the process dies partway through the delete
            raise Killed
        real(path, *args, **kwargs)

    t.train_step()
    monkeypatch.setattr(ck.shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        t.save(root)  # step 3, keep_last=2 prunes step 1
    monkeypatch.undo()
    assert names(root) == [".del-step-000001", "step-000002", "step-000003"]
    assert latest_checkpoint(root) == root / "step-000003"
    t.train_step()
    t.save(root)
    assert names(root) == ["step-000003", "step-000004"]


def test_keep_last_prunes_only_after_the_new_checkpoint_is_complete(trained) -> None:
    t, root, _ = trained
    for _ in range(3):
        t.save(root, keep_last=2)
        t.train_step()
    assert names(root) == ["step-000003", "step-000004"]
    t.save(root, keep_last=0)
    assert names(root) == ["step-000003", "step-000004", "step-000005"]


def test_saving_a_step_again_replaces_it(trained) -> None:
    t, root, _ = trained
    t.step = 1  # as if resumed from an earlier checkpoint: step 1 is saved again with other weights
    t.save(root)
    assert names(root) == ["step-000001"]
    assert_restores(t, root / "step-000001", t.params())


def test_save_survives_sigkill_of_the_saving_process(model_dir: Path, tmp_path: Path) -> None:
    """A real SIGKILL after DCP wrote the shards (before the rank file and the rename)."""
    script = textwrap.dedent(f"""
        import os, signal, tempfile
        from pathlib import Path
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method="file://" + tempfile.mkdtemp() + "/s", rank=0, world_size=1)
        import torch.distributed.checkpoint as dcp
        from bao_fast.config import ModelConfig, OptimConfig
        from bao_fast.train import checkpoint as ck
        from bao_fast.train.fsdp import init_distributed, load_policy
        from bao_fast.train.optim import build_optimizer, build_scheduler
        policy = load_policy({str(model_dir)!r}, ModelConfig(path={str(model_dir)!r}), init_distributed())
        optimizer = build_optimizer(policy, OptimConfig())
        build_scheduler(optimizer, OptimConfig(), 8)
        root = Path({str(tmp_path / "ck")!r})
        ck.save_checkpoint(root, 1, policy, optimizer, {{"step": 1}})
        real = dcp.save
        def save(*args, **kwargs):
            real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        ck.dcp.save = save
        ck.save_checkpoint(root, 2, policy, optimizer, {{"step": 2}})
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", script], env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    root = tmp_path / "ck"
    assert names(root) == [".tmp-step-000002", "step-000001"]
    assert latest_checkpoint(root) == root / "step-000001"
    t = Trainer(model_dir)
    assert load_checkpoint(root / "step-000001", t.policy, t.optimizer) == {"step": 1}


# ----------------------------------------------------------------------------------------------------
# Damaged and foreign checkpoints
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("victim", [".metadata", "__0_0.distcp", "rank-0.pt"])
def test_truncated_file_is_refused_naming_the_checkpoint_and_the_fallback(trained, victim: str) -> None:
    t, root, good = trained
    t.save(root)  # step 2, to be damaged
    f = root / "step-000002" / victim
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError) as info:
        t.restore(latest_checkpoint(root))
    message = str(info.value)
    assert f"checkpoint {root / 'step-000002'} is damaged" in message
    assert f"delete {root / 'step-000002'} to resume from the previous checkpoint {root / 'step-000001'}" in message
    if victim == "rank-0.pt":
        assert str(f) in message
    shutil.rmtree(root / "step-000002")  # what the message says to do
    assert_restores(t, latest_checkpoint(root), good)


def test_missing_metadata_is_refused_before_any_state_changes(trained) -> None:
    t, root, _ = trained
    (root / "step-000001" / ".metadata").unlink()
    before = t.params()
    with pytest.raises(CheckpointError, match=r"step-000001/\.metadata is missing"):
        t.restore(root / "step-000001")
    assert_same(t.params(), before)


@pytest.mark.parametrize("saved_world", [2, 3])
def test_checkpoint_of_another_world_size_is_refused(trained, saved_world: int) -> None:
    t, root, _ = trained
    for r in range(1, saved_world):  # as if saved by `saved_world` ranks
        shutil.copy(root / "step-000001" / "rank-0.pt", root / "step-000001" / f"rank-{r}.pt")
    before = t.params()
    with pytest.raises(CheckpointError, match=f"saved by {saved_world} ranks, this run has 1: resume with the world"):
        t.restore(root / "step-000001")
    assert_same(t.params(), before)


@pytest.mark.parametrize("reshard", [False, True])
@pytest.mark.parametrize(("ranks", "problem"), [
    ([], "it holds no trainer-state file (rank-<r>.pt)"),
    ([0, 2], "its rank files are ['rank-0.pt', 'rank-2.pt']"),
    ([1], "its rank files are ['rank-1.pt']"),
])
def test_rank_files_of_no_one_world_are_refused(trained, ranks: list[int], problem: str, reshard: bool) -> None:
    t, root, _ = trained
    step = root / "step-000001"
    state = (step / "rank-0.pt").read_bytes()
    (step / "rank-0.pt").unlink()
    for r in ranks:
        (step / f"rank-{r}.pt").write_bytes(state)
    before = t.params()
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {step} is damaged: {problem}")):
        t.restore(step, reshard=reshard)
    assert_same(t.params(), before)


def test_reshard_from_more_ranks_takes_rank_0s_state_and_keeps_the_callers_rng(trained) -> None:
    """The checkpoint as 3 ranks would leave it (the DCP shards of this 1-rank world load on any world):
    rank 0's trainer state on this rank, model and optimiser restored, RNG as the caller seeded it."""
    t, root, good = trained
    step = root / "step-000001"
    other = torch.load(step / "rank-0.pt", weights_only=False)
    other["step"], other["rng"]["torch"] = 99, torch.manual_seed(5).get_state()
    for r in (1, 2):
        torch.save(other, step / f"rank-{r}.pt")
    assert resume_message("RL", 1, step) == f"resuming RL after step 1 from {step} (saved by 3 ranks, resharded onto 1)"
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    t.restore(step, reshard=True)
    assert torch.equal(torch.rand(3), expected)
    assert t.step == 1  # rank 0's, not rank 1's
    assert_same(t.params(), good)
    t.train_step()  # and training goes on from there


# ----------------------------------------------------------------------------------------------------
# HF export
# ----------------------------------------------------------------------------------------------------


def test_failed_export_keeps_the_earlier_export(trained, model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    t, _, _ = trained
    tokenizer = load_tokenizer(model_dir)
    out = export_hf(t.policy, tokenizer, tmp_path / "final-model")
    before = (out / "model.safetensors").read_bytes()
    t.train_step()

    def full_disk(*args, **kwargs):
        raise ENOSPC

    monkeypatch.setattr(tokenizer, "save_pretrained", full_disk)  # after the weights were written
    with pytest.raises(CheckpointError, match=r"final-model: rank 0: OSError: .*No space left.*earlier export"):
        export_hf(t.policy, tokenizer, out)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir() if "final-model" in p.name) == ["final-model"]
    assert (out / "model.safetensors").read_bytes() == before
    AutoModelForCausalLM.from_pretrained(out)
    export_hf(t.policy, tokenizer, out)  # a later export replaces it
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir() if "final-model" in p.name) == ["final-model"]


# ----------------------------------------------------------------------------------------------------
# Faults on one rank of two
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_fault_on_one_rank_fails_every_rank_clearly(model_dir: Path, tmp_path: Path) -> None:
    run_worker("_checkpoint_fault_worker.py", [str(model_dir), str(tmp_path)], nproc=2, timeout=150)
    ranks = [json.loads((tmp_path / f"faults-{r}.json").read_text()) for r in (0, 1)]
    root = tmp_path / "ck"
    for r in ranks:  # the same error on both ranks: no rank is left waiting
        assert r["disk_full"].startswith(f"CheckpointError: could not save checkpoint {root / 'step-000002'}")
        assert "rank 1: OSError: [Errno 28] No space left on device" in r["disk_full"]
        assert r["dirs"] == ["step-000001"] and r["latest"] == str(root / "step-000001")
        assert r["damaged"].startswith(f"CheckpointError: checkpoint {tmp_path / 'damaged' / 'step-000001'} is damaged")
        assert f"cannot read {tmp_path / 'damaged' / 'step-000001' / 'rank-1.pt'}" in r["damaged"]
        assert r["single"].startswith("CheckpointError: checkpoint")
        assert "saved by 1 rank, this run has 2" in r["single"]
        assert r["good"] == "ok"


def test_failed_rename_over_an_existing_step_keeps_it(trained, monkeypatch) -> None:
    t, root, good = trained
    t.step = 1  # saving step 1 again; the rename of the new one into place fails
    real = Path.rename

    def rename(self, target):
        if self.name == ".tmp-step-000001":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(CheckpointError, match=r"step-000001 \(renaming it into place\): rank 0: OSError"):
        t.save(root)
    monkeypatch.undo()
    assert latest_checkpoint(root) == root / "step-000001"
    assert_restores(t, root / "step-000001", good)
