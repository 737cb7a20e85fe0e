"""Host-side collectives: in a world of one (gloo), lockstep's padding and its refusal of an empty rank; under
torchrun with two ranks, the reductions, the gather and lockstep across ranks that hold different amounts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bao_fast.train import collectives
from bao_fast.train.collectives import gather_objects, lockstep, max_over_ranks, maxima_over_ranks, sum_over_ranks

from .conftest import run_worker


@pytest.mark.usefixtures("single_rank_world")
def test_reductions_of_a_single_rank_are_its_own_values() -> None:
    assert max_over_ranks(2**40) == 2**40 and max_over_ranks(-3) == -3  # int64, not int32
    assert maxima_over_ranks([0.25, -1.5]) == [0.25, -1.5]
    assert sum_over_ranks([0.25, -1.5]) == [0.25, -1.5]
    assert gather_objects({"rank": 0}) == [{"rank": 0}]


@pytest.mark.usefixtures("single_rank_world")
def test_lockstep_keeps_every_item_with_weight_one() -> None:
    assert lockstep(["a", "b", "c"]) == [("a", 1.0), ("b", 1.0), ("c", 1.0)]


@pytest.mark.usefixtures("single_rank_world")
def test_lockstep_pads_with_zero_weight_repeats_of_the_first_item(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another rank has 5 items: this rank runs its 2 and then 3 weight-0 copies of its first."""
    counts: list[int] = []

    def five_on_the_busiest_rank(count: int) -> int:
        counts.append(count)
        return 5

    monkeypatch.setattr(collectives, "max_over_ranks", five_on_the_busiest_rank)
    assert lockstep(["a", "b"]) == [("a", 1.0), ("b", 1.0), ("a", 0.0), ("a", 0.0), ("a", 0.0)]
    assert counts == [2]


@pytest.mark.usefixtures("single_rank_world")
def test_lockstep_of_no_items_anywhere_is_empty() -> None:
    assert lockstep([], filler="f") == []


@pytest.mark.usefixtures("single_rank_world")
def test_lockstep_refuses_an_empty_rank() -> None:
    with pytest.raises(ValueError, match="lockstep: items is empty; every rank needs at least one trajectory"):
        lockstep([])


@pytest.mark.slow
def test_collectives_across_two_ranks(tmp_path: Path) -> None:
    run_worker("_collectives_worker.py", [str(tmp_path)], nproc=2)
    r0, r1 = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2))
    for r in (r0, r1):
        assert r["max"] == 2**40 + 1 and r["maxima"] == [0.5, 0.0] and r["sum"] == [3.0, 0.5]
        assert r["gather"] == [{"rank": 0}, {"rank": 1}]
    assert r0["lockstep"] == [["r0-0", 1.0], ["r0-0", 0.0]]  # rank 1 has two items: one weight-0 repeat
    assert r1["lockstep"] == [["r1-0", 1.0], ["r1-1", 1.0]]
    assert r0["lockstep_filler"] == [["f", 0.0]] and r1["lockstep_filler"] == [["x", 1.0]]  # rank 0 has none
