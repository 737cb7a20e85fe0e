"""The BAO policy update with recomputed old log-probs (``rollout.old_logprobs=recompute``).

The first mini-batch's old log-probs come from its own first training forward (the weights are still the
rollout's), so rl_step's extra no-grad forward only covers the other mini-batches, and none is left with one
mini-batch. The update must equal the one whose old log-probs were all recomputed up front (``engine`` mode
given those values), over several mini-batches and PPO epochs.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from bao_fast.config import load_config
from bao_fast.data.segments import pack_segments
from bao_fast.models.tiny import create_tiny_model
from bao_fast.train import rl
from bao_fast.train.fsdp import Policy
from bao_fast.train.logging import NonFiniteError, NonFiniteGuard
from bao_fast.train.loss_scale import LossScale, loss_scale_for
from bao_fast.train.optim import build_optimizer, build_scheduler
from bao_fast.train.rl import accumulate_gradients, forward_logprobs, minibatch_cuts, policy_update

PROMPTS, GROUP, TEMPERATURE = 4, 2, 0.8


pytestmark = pytest.mark.usefixtures("single_rank_world")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(3)

    def ids(lo: int, hi: int) -> list[int]:
        return torch.randint(3, 2048, (int(torch.randint(lo, hi, (1,), generator=gen)),), generator=gen).tolist()

    trajectories = [
        [("user", ids(4, 12)), ("assistant", ids(3, 15)), ("user", ids(2, 6)), ("assistant", ids(3, 15))]
        for _ in range(PROMPTS * GROUP)
    ]
    return pack_segments(trajectories)


def run_update(model_dir: Path, batch, old_logprobs: str, mini_batch_size: int, epochs: int,
               old_logp: torch.Tensor | None = None, overrides: tuple[str, ...] = (), steps: int = 1,
               advantage_scale: float | torch.Tensor = 1.0, loss_scale: LossScale | None = None):
    """``steps`` policy_updates (RL steps) on fresh weights (``loss_scale``: the config's for float32 unless
    given); returns (policy, old_logp after the first, the last step's stats, no-grad forwards)."""
    cfg = load_config(None, [
        "model.tiny=true", f"rollout.old_logprobs={old_logprobs}", f"rollout.group_size={GROUP}",
        f"rollout.prompts_per_step={PROMPTS}", f"rollout.temperature={TEMPERATURE}",
        f"train.mini_batch_size={mini_batch_size}", f"train.ppo_epochs={epochs}", "train.micro_batch_tokens=48",
        "optim.lr=3e-3", *overrides,
    ])
    policy = Policy(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    no_grad_forwards: list[int] = []
    policy.register_forward_pre_hook(
        lambda _, args: no_grad_forwards.append(args[0].num_sequences) if not torch.is_grad_enabled() else None
    )
    optimizer = build_optimizer(policy, cfg.optim)
    s = SimpleNamespace(cfg=cfg, policy=policy, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg.optim, 8),
                        loss_scale=loss_scale or loss_scale_for(cfg.optim, torch.float32))
    cuts = minibatch_cuts(cfg, batch)
    advantages = torch.randn(batch.num_tokens, generator=torch.Generator().manual_seed(5)) * batch.target_mask
    advantages *= advantage_scale
    keep = rl.with_learning_signal(cfg, advantages, batch)  # as rl_step: advantages first
    if old_logp is None:
        old_logp = forward_logprobs(policy, batch, TEMPERATURE, cfg.train.micro_batch_tokens, start=cuts[1],
                                    keep=keep)
    state = SimpleNamespace(step=0, guard=NonFiniteGuard(cfg.train.max_nonfinite_steps))
    for _ in range(steps):
        state.step += 1
        stats = policy_update(s, state, batch, cuts, old_logp, advantages, None, keep)
    return policy, old_logp, stats, no_grad_forwards


@pytest.mark.parametrize(("mini_batch_size", "epochs"), [(PROMPTS, 1), (PROMPTS // 2, 2)])
def test_first_minibatch_reuses_its_training_forward(model_dir, batch, mini_batch_size, epochs):
    upfront = Policy(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    expected_old = forward_logprobs(upfront, batch, TEMPERATURE, 48)
    reference, _, ref_stats, _ = run_update(model_dir, batch, "engine", mini_batch_size, epochs,
                                            old_logp=expected_old.clone())
    policy, old_logp, stats, no_grad = run_update(model_dir, batch, "recompute", mini_batch_size, epochs)

    num_minibatches = PROMPTS // mini_batch_size
    per_minibatch = PROMPTS * GROUP // num_minibatches
    # the up-front forward covered only the mini-batches after the first (none with one mini-batch)
    assert sum(no_grad) == PROMPTS * GROUP - per_minibatch
    torch.testing.assert_close(old_logp, expected_old, rtol=0, atol=1e-6)
    assert stats["actor/approx_kl"] == pytest.approx(ref_stats["actor/approx_kl"], abs=1e-7)
    assert stats["actor/loss"] == pytest.approx(ref_stats["actor/loss"], abs=1e-6)
    moved = 0.0
    for (name, p), q, init in zip(policy.named_parameters(), reference.parameters(), upfront.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
        moved = max(moved, (p - init).abs().max().item())
    assert moved > 1e-4  # the update did something


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_micro_batching_does_not_change_the_gradient(model_dir, agg):
    """The same mini-batch in one micro-batch or in several (one trajectory without a trained token among
    them) gives the gradient of the same loss, entropy bonus included."""
    gen = torch.Generator().manual_seed(11)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 2048, (n,), generator=gen).tolist()

    lengths = [(6, 9), (3, 4), (10, 2), (5, 12)]
    trajectories = [[("user", ids(u)), ("assistant", ids(a))] for u, a in lengths] + [[("user", ids(7))]]
    mini = pack_segments(trajectories)
    old_logp = torch.randn(mini.num_tokens, generator=gen) * 0.05 - 7.0
    advantages = torch.randn(mini.num_tokens, generator=gen) * mini.target_mask

    def gradients(micro_batch_tokens: int) -> tuple[dict[str, float], list[torch.Tensor]]:
        cfg = load_config(None, [
            "model.tiny=true", f"algo.loss.agg={agg}", "algo.loss.norm_length=16", "algo.loss.entropy_coef=0.01",
            f"train.micro_batch_tokens={micro_batch_tokens}",
        ])
        policy = Policy(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
        s = SimpleNamespace(cfg=cfg, policy=policy, loss_scale=LossScale(enabled=False))
        stats = accumulate_gradients(s, mini, 0, mini.num_sequences, old_logp, advantages, None, True)
        return stats, [p.grad.clone() for p in policy.parameters()]

    whole, whole_grads = gradients(4096)
    split, split_grads = gradients(16)  # one trajectory per micro-batch
    assert whole.keys() == split.keys() and {"loss", "entropy", "clipfrac"} <= whole.keys()
    for key in whole:
        assert split[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key
    for a, b in zip(whole_grads, split_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_step_statistics_are_token_means_whatever_the_mini_batches(model_dir, batch):
    """With the weights held (lr 1e-30) the step's clip fraction, KL and entropy are token means over the whole
    batch: one mini-batch or two of different token counts log the same values."""
    gen = torch.Generator().manual_seed(8)
    old_logp = forward_logprobs(Policy(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)),
                                batch, TEMPERATURE, 48) + 0.3 * torch.randn(batch.num_tokens, generator=gen)
    held = ("optim.lr=1e-30", "algo.loss.kl_coef=0")  # no float32 weight moves by 1e-30
    _, _, one, _ = run_update(model_dir, batch, "engine", PROMPTS, 1, old_logp=old_logp.clone(), overrides=held)
    _, _, two, _ = run_update(model_dir, batch, "engine", PROMPTS // 2, 1, old_logp=old_logp.clone(), overrides=held)
    halves = minibatch_cuts(load_config(None, ["model.tiny=true", f"rollout.group_size={GROUP}",
                                               f"rollout.prompts_per_step={PROMPTS}",
                                               f"train.mini_batch_size={PROMPTS // 2}"]), batch)
    sizes = [int(batch.select(a, b).target_rows.numel()) for a, b in itertools.pairwise(halves)]
    assert sizes[0] != sizes[1] and 0 < one["actor/clipfrac"] < 1
    for key in ("actor/clipfrac", "actor/clipfrac_lower", "actor/approx_kl", "actor/entropy"):
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key


def test_entropy_bonus_applies_on_steps_that_do_not_log_entropy(model_dir, batch):
    """train.entropy_every only sets how often entropy is logged; the bonus applies on every step (and the
    entropy it computes is logged)."""
    plain, _, plain_stats, _ = run_update(model_dir, batch, "recompute", PROMPTS, 1,
                                          overrides=("train.entropy_every=0",))
    bonus, _, stats, _ = run_update(model_dir, batch, "recompute", PROMPTS, 1,
                                    overrides=("train.entropy_every=0", "algo.loss.entropy_coef=1"))
    assert "actor/entropy" not in plain_stats and stats["actor/entropy"] > 0
    moved = max((p - q).abs().max().item() for p, q in zip(bonus.parameters(), plain.parameters(), strict=True))
    assert moved > 1e-4


def test_max_nonfinite_steps_counts_rl_steps_not_optimiser_updates(model_dir, batch):
    """train.max_nonfinite_steps counts RL steps (TrainConfig's "step"): a step whose every mini-batch update is
    non-finite skips them all and counts once; the run stops at the N-th such step in a row."""
    nonfinite = ("train.max_nonfinite_steps=2",)
    policy, _, stats, _ = run_update(model_dir, batch, "recompute", 1, 1, overrides=nonfinite,
                                     advantage_scale=float("nan"))
    assert stats["actor/skipped_updates"] == PROMPTS  # four updates skipped, one non-finite step
    assert math.isnan(stats["actor/grad_norm"])  # no update applied
    init = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for p, q in zip(policy.hf.parameters(), init.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    with pytest.raises(NonFiniteError, match="step 2: 2 consecutive steps"):
        run_update(model_dir, batch, "recompute", 1, 1, overrides=nonfinite, steps=2, advantage_scale=float("nan"))


def test_a_skipped_update_leaves_the_others_grad_norms_logged(model_dir, batch):
    """One non-finite mini-batch out of four: its update is skipped, the other three apply, and the step's grad
    norm is their mean (finite), not poisoned by the skipped one's."""
    first = batch.host_offsets().tokens[GROUP]  # the first mini-batch: one prompt's GROUP trajectories
    scale = torch.ones(batch.num_tokens)
    scale[:first] = float("nan")
    _, _, stats, _ = run_update(model_dir, batch, "recompute", 1, 1, advantage_scale=scale)
    assert stats["actor/skipped_updates"] == 1
    assert math.isfinite(stats["actor/grad_norm"]) and stats["actor/grad_norm"] > 0


def test_dynamic_loss_scaling_gives_the_unscaled_update_in_float32(model_dir, batch):
    """optim.loss_scale=dynamic on float32 (where nothing underflows): scaling by 2^16 and back is exact, so the
    weights equal the unscaled run's bit for bit; the step reports the scale and no overflow."""
    plain, _, plain_stats, _ = run_update(model_dir, batch, "recompute", PROMPTS // 2, 2)
    scaled, _, stats, _ = run_update(model_dir, batch, "recompute", PROMPTS // 2, 2,
                                     overrides=("optim.loss_scale=dynamic",))
    assert "actor/loss_scale" not in plain_stats
    assert stats["actor/loss_scale"] == 2.0**16 and stats["actor/overflow_updates"] == 0
    for key in ("actor/grad_norm", "actor/loss", "actor/clipfrac"):
        assert stats[key] == plain_stats[key], key
    for p, q in zip(scaled.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_overflow_backs_off_without_counting_as_a_nonfinite_step(model_dir, batch):
    """A scale so large the backward overflows float32: those updates are skipped and halve the scale until it
    fits, and even train.max_nonfinite_steps=1 does not stop the run; at the scale's floor an overflow is the
    model's, and stops it."""
    huge = 2.0**127  # float32's largest power of two
    policy, _, stats, _ = run_update(model_dir, batch, "recompute", 1, 1, overrides=("train.max_nonfinite_steps=1",),
                                     loss_scale=LossScale(enabled=True, init_scale=huge, max_scale=huge))
    overflows = stats["actor/overflow_updates"]
    assert 1 <= overflows < PROMPTS and stats["actor/skipped_updates"] == 0
    assert stats["actor/loss_scale"] == huge / 2**overflows and math.isfinite(stats["actor/grad_norm"])
    init = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    moved = max((p - q).abs().max().item() for p, q in zip(policy.hf.parameters(), init.parameters(), strict=True))
    assert moved > 0  # the updates after the back-off applied
    with pytest.raises(NonFiniteError, match="step 1: 1 consecutive steps"):
        run_update(model_dir, batch, "recompute", 1, 1, overrides=("train.max_nonfinite_steps=1",),
                   loss_scale=LossScale(enabled=True, init_scale=huge, min_scale=huge, max_scale=huge))


@pytest.mark.parametrize(("device", "expected"), [("cuda", "float16"), ("cpu", "float32")])
def test_make_engine_samples_in_the_policys_compute_dtype(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, device: str, expected: str
) -> None:
    """The engine's precision is model.dtype on a GPU (as training computes), float32 on the CPU."""
    calls: list[dict[str, object]] = []

    def capture(cls: type, model_path: Path, cfg: object, **kwargs: object) -> str:
        calls.append(kwargs)
        return "engine"

    monkeypatch.setattr(rl.HFEngine, "from_config", classmethod(capture))
    cfg = load_config(None, ["model.tiny=true", "model.dtype=float16", "rollout.engine=hf"])
    assert rl.make_engine(cfg, tmp_path, SimpleNamespace(device=torch.device(device))) == "engine"
    assert calls == [{"device": torch.device(device), "dtype": expected}]


def test_trajectories_without_advantage_are_left_out_of_an_identical_update(model_dir, batch):
    """Two of the four prompt groups have all-zero advantages (equal scores): with train.skip_zero_advantage
    they run no forward at all (old log-probs, training), and the weights and loss equal the full update's."""
    offsets = batch.host_offsets().tokens
    scale = torch.ones(batch.num_tokens)
    scale[offsets[GROUP] : offsets[3 * GROUP]] = 0.0  # groups 1 and 2
    full, _, full_stats, full_no_grad = run_update(model_dir, batch, "recompute", PROMPTS // 2, 2,
                                                   overrides=("train.skip_zero_advantage=false",),
                                                   advantage_scale=scale)
    lean, _, stats, no_grad = run_update(model_dir, batch, "recompute", PROMPTS // 2, 2, advantage_scale=scale)
    assert sum(full_no_grad) == 2 * GROUP and sum(no_grad) == GROUP  # the second mini-batch: group 3 only
    rows = batch.host_offsets().target_rows
    kept = int(rows[GROUP] - rows[0] + rows[4 * GROUP] - rows[3 * GROUP])
    assert stats["actor/trained_token_fraction"] == pytest.approx(kept / int(rows[-1]))
    assert full_stats["actor/trained_token_fraction"] == 1.0
    assert stats["actor/loss"] == pytest.approx(full_stats["actor/loss"], rel=1e-6, abs=1e-9)
    for p, q in zip(lean.parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_every_trajectory_runs_where_a_zero_advantage_still_has_a_loss(batch):
    """A KL or entropy term gives zero-advantage tokens a gradient; a nan advantage must reach the guard."""
    advantages = torch.zeros(batch.num_tokens)
    advantages[batch.host_offsets().tokens[1] + 1] = float("nan")  # in trajectory 1
    base = ["model.tiny=true"]
    assert rl.with_learning_signal(load_config(None, base), advantages, batch) == [False, True] + [False] * 6
    for extra in ("algo.loss.kl_coef=0.1", "algo.loss.entropy_coef=0.01", "train.skip_zero_advantage=false"):
        assert rl.with_learning_signal(load_config(None, [*base, extra]), advantages, batch) == [True] * 8, extra


def test_a_step_without_any_advantage_logs_no_statistics(model_dir, batch):
    """Every group scored alike: nothing runs but each rank's zero-weight micro-batch (AdamW's zero-gradient
    step), and no token's statistics are logged, rather than a fake entropy or clip fraction of 0."""
    _, _, stats, no_grad = run_update(model_dir, batch, "recompute", PROMPTS // 2, 1, advantage_scale=0.0)
    assert no_grad == [] and stats["actor/trained_token_fraction"] == 0.0
    assert stats["actor/loss"] == 0.0 and stats["actor/skipped_updates"] == 0
    assert not {"actor/entropy", "actor/clipfrac", "actor/approx_kl"} & stats.keys()
    assert math.isfinite(stats["actor/grad_norm"])
