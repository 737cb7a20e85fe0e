"""Tensor-parallel rollout groups: ``rollout.tensor_parallel_size`` consecutive ranks share one vLLM engine.

::

    group = TPGroup.create(cfg.rollout.tensor_parallel_size)   # collective: every rank, same tp
    mine = group.group_share(task_ids)                          # the group's prompts (the same on its ranks)
    trajs = run_episodes(engine, ..., tp_group=group)            # gyms stepped once, by the group's leader
    group.check_identical(trajs)
    train_on = group.member_share(trajs)                        # this rank's part for the FSDP update

With ``external_launcher`` vLLM builds its tensor-parallel groups from consecutive ranks (``[0..tp-1]``,
``[tp..2tp-1]``, ...), and every rank of a group runs its own copy of the scheduler: all of them must submit
the same prompts and sampling params, in the same order (the same ``generate`` calls, or the same
``add_request`` calls between the same engine steps). The engine then returns
the same tokens on every rank of the group (the logits are all-gathered, sampling is seeded per request).

What the engine does not control is the environment. A gym backed by an LLM user simulator sends HTTP requests
whose replies may differ between two identical requests (sampling, batch-dependent numerics), and stepping every
gym ``tp`` times would multiply the simulator's load. So only the group's first rank (the *leader*) resets and
steps the gyms; :meth:`TPGroup.from_leader` broadcasts what they returned (opening messages, feedback,
rewards, flags, info; or the exception they raised) to the other ranks over a gloo group. With ``tp == 1``
nothing is broadcast and nothing changes.

Group ``g`` of ``num_groups = world_size / tp`` holds ranks ``g*tp .. g*tp+tp-1``; its rank ``g*tp + m`` is
member ``m``. ``group_share`` then ``member_share`` of a list is exactly the contiguous per-rank share of that
list with ``tp == 1``, so each rank trains on the same trajectories whatever ``tp`` is.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

from bao_fast.config import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class TPGroup:
    """This rank's tensor-parallel rollout group (see the module docstring).

    ``size``: ranks per group (``rollout.tensor_parallel_size``); ``index``: which group (0..num_groups-1);
    ``num_groups``: world size / size; ``member``: position in the group (0 = leader); ``process_group``: gloo
    group of the group's ranks (None when ``size == 1``).
    """

    size: int
    index: int
    num_groups: int
    member: int
    process_group: Any = None

    @classmethod
    def create(cls, tp: int) -> TPGroup:
        """The group of this rank. Collective (``dist.new_group`` for every group): all ranks must call it,
        with the same ``tp``. ConfigError naming ``rollout.tensor_parallel_size`` unless ``tp`` divides the
        world size."""
        rank, world = dist.get_rank(), dist.get_world_size()
        check_tp_size(tp, world)
        process_group = None
        if tp > 1:
            for g in range(world // tp):
                pg = dist.new_group(list(range(g * tp, (g + 1) * tp)), backend="gloo")
                if g == rank // tp:
                    process_group = pg
        return cls(tp, rank // tp, world // tp, rank % tp, process_group)

    @property
    def is_leader(self) -> bool:
        """Whether this rank steps the gyms of its group (member 0)."""
        return self.member == 0

    @property
    def leader_rank(self) -> int:
        """Global rank of the group's leader."""
        return self.index * self.size

    def group_share(self, items: Sequence[T]) -> list[T]:
        """The group's contiguous share of ``items`` (the same list on all its ranks); ``len(items)`` must
        divide by ``num_groups``."""
        return contiguous_share(items, self.index, self.num_groups)

    def member_share(self, items: Sequence[T]) -> list[T]:
        """This member's contiguous share of the group's ``items``; ``len(items)`` must divide by ``size``."""
        return contiguous_share(items, self.member, self.size)

    def from_leader(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on the leader only; every rank of the group returns the leader's result, or raises
        the exception ``fn`` raised there (a copy, noted as the leader's, on the other ranks). The result must
        pickle; one that does not makes every rank raise TypeError."""
        if self.process_group is None:
            return fn()
        payload, error = self._run_on_leader(fn)
        box: list[Any] = [payload]
        dist.broadcast_object_list(box, src=self.leader_rank, group=self.process_group)
        return self._leader_result(box[0], error)

    def check_identical(self, obj: Any) -> None:
        """RuntimeError on every rank of the group unless ``obj`` (e.g. its rollout's token ids and rewards:
        plain lists, tuples, numbers and strings, which pickle deterministically) is the same on all of them;
        one small gather of a digest."""
        if self.process_group is None:
            return
        digests: list[Any] = [None] * self.size
        dist.all_gather_object(digests, _digest(obj), group=self.process_group)
        self._require_identical(digests)

    def checked_from_leader(self, obj: Any, fn: Callable[[], T]) -> T:
        """:meth:`check_identical` of ``obj`` and :meth:`from_leader` of ``fn`` in one gather: RuntimeError on
        every rank unless ``obj`` is the same on all of them, else the leader's result (or its exception)."""
        if self.process_group is None:
            return fn()
        payload, error = self._run_on_leader(fn)
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, (_digest(obj), payload), group=self.process_group)
        self._require_identical([digest for digest, _ in gathered])
        return self._leader_result(gathered[0][1], error)  # member 0: the leader

    def _run_on_leader(self, fn: Callable[[], Any]) -> tuple[bytes | None, Exception | None]:
        """On the leader, ``fn()``'s pickled ``(ok, result or exception)`` and the exception itself; elsewhere
        ``(None, None)``."""
        if not self.is_leader:
            return None, None
        try:
            return _portable((True, fn())), None
        except Exception as exc:
            return _portable((False, exc)), exc

    def _leader_result(self, payload: bytes, error: Exception | None) -> Any:
        """The leader's result from its pickled payload, or its exception raised (the original on the leader,
        a copy noted as the leader's elsewhere)."""
        ok, value = pickle.loads(payload)
        if ok:
            return value
        if error is not None:
            raise error
        value.add_note(f"raised on rank {self.leader_rank}, the leader of this rank's tensor-parallel group")
        raise value

    def _require_identical(self, digests: list[Any]) -> None:
        if len(set(digests)) > 1:
            raise RuntimeError(
                f"the ranks of tensor-parallel group {self.index} (ranks {self.leader_rank}.."
                f"{self.leader_rank + self.size - 1}) rolled out different episodes; they must submit identical "
                "prompts and sampling params in the same order (rollout.tensor_parallel_size)"
            )


def check_tp_size(tp: int, world_size: int) -> None:
    """ConfigError naming ``rollout.tensor_parallel_size`` unless ``tp`` >= 1 divides ``world_size``."""
    if tp < 1 or world_size % tp:
        raise ConfigError(
            f"config key 'rollout.tensor_parallel_size' ({tp}) must divide the world size ({world_size}): "
            "tensor-parallel groups are made of consecutive ranks"
        )


def contiguous_share(items: Sequence[T], part: int, parts: int) -> list[T]:
    """Part ``part`` of ``items`` cut into ``parts`` equal contiguous runs (ValueError unless they divide)."""
    if len(items) % parts:
        raise ValueError(f"{len(items)} items cannot be split evenly into {parts} parts")
    per = len(items) // parts
    return list(items[part * per : (part + 1) * per])


def _digest(obj: Any) -> str:
    """A 128-bit digest of ``obj``'s pickle."""
    return hashlib.blake2b(pickle.dumps(obj), digest_size=16).hexdigest()


def _portable(payload: tuple[bool, Any]) -> bytes:
    """``payload`` pickled, checked to unpickle; a result that does not survives as a TypeError, an exception
    as a RuntimeError with its type and message."""
    try:
        data = pickle.dumps(payload)
        pickle.loads(data)
        return data
    except Exception as exc:
        ok, value = payload
        if ok:
            return pickle.dumps((False, TypeError(f"the tensor-parallel leader's result does not pickle: {exc}")))
        return pickle.dumps((False, RuntimeError(f"{type(value).__name__}: {value}")))
