"""pack_multiturn (C++ CPU op, CUDA op when a GPU is present) against the Python reference."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bao_fast import _C
from bao_fast.data.packed import DEVICE_FIELDS, PackedBatch
from bao_fast.ops import pack_multiturn
from bao_fast.ops.reference import pack_multiturn_reference

OUTPUT_FIELDS = DEVICE_FIELDS[1:]  # the op's outputs, in schema order
# (length, trained) per segment, per trajectory
trajectories_st = st.lists(
    st.lists(st.tuples(st.integers(0, 24), st.booleans()), max_size=9),
    max_size=12,
)


def make_inputs(
    trajectories: list[list[tuple[int, bool]]], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host description + random token ids for (length, trained) segments."""
    seg_lens = torch.tensor([n for traj in trajectories for n, _ in traj], dtype=torch.int32)
    seg_trained = torch.tensor([tr for traj in trajectories for _, tr in traj], dtype=torch.bool)
    counts = torch.tensor([0] + [len(traj) for traj in trajectories])
    seq_seg_offsets = counts.cumsum(0).to(torch.int32)
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 150_000, (int(seg_lens.sum()),), generator=gen, dtype=torch.int64)
    return seg_lens, seg_trained, seq_seg_offsets, input_ids


M_PERTURB = -6  # glibc mallopt: malloc fills each block with ~byte, free with byte


@pytest.fixture
def poisoned_malloc() -> Iterator[None]:
    """glibc's malloc perturbation for the test: the op's at::empty outputs (posix_memalign underneath) start
    as 0x5A bytes, so an element it does not write cannot pass as a correct zero or a stale value."""
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(M_PERTURB, 0xA5) == 1
    try:
        probe = torch.empty(1000, dtype=torch.int32)
        assert bool((probe.view(torch.uint8) == 0x5A).all()), "malloc perturbation is not active"
        del probe
        yield
    finally:
        libc.mallopt(M_PERTURB, 0)


@contextlib.contextmanager
def poisoned_cuda_pool(num_tokens: int) -> Iterator[None]:
    """Route CUDA allocations to a private pool whose only free memory is 0x5A bytes: a 2 MiB segment for
    requests <= 1 MiB and a large block for every [T] output, allocated, filled and freed first (the caching
    allocator hands freed blocks of the pool back)."""
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool):
        blocks = [torch.empty(2**20, dtype=torch.uint8, device="cuda") for _ in range(2)]
        blocks.append(torch.empty(64 * (num_tokens + 1) + 2**22, dtype=torch.uint8, device="cuda"))
        for block in blocks:
            block.fill_(0x5A)
        del blocks, block
        probe = torch.empty(num_tokens + 1, dtype=torch.int64, device="cuda")
        assert bool((probe.view(torch.uint8) == 0x5A).all()), "the pool did not hand back the poisoned memory"
        del probe
        yield


def assert_matches_reference(batch: PackedBatch, ignore_index: int = -100) -> None:
    expected = pack_multiturn_reference(
        batch.seg_lens, batch.seg_trained, batch.seq_seg_offsets, batch.input_ids.cpu(), ignore_index=ignore_index
    )
    for name in OUTPUT_FIELDS:
        got = getattr(batch, name)
        assert got.dtype == expected[name].dtype, f"{name}: dtype {got.dtype} != {expected[name].dtype}"
        assert torch.equal(got.cpu(), expected[name]), f"{name}: {got.tolist()} != {expected[name].tolist()}"


@pytest.mark.usefixtures("poisoned_malloc")
@settings(max_examples=60, deadline=None)
@given(trajectories=trajectories_st, ignore_index=st.sampled_from([-100, -1, 0]), seed=st.integers(0, 2**16))
def test_cpu_matches_reference(trajectories: list[list[tuple[int, bool]]], ignore_index: int, seed: int) -> None:
    inputs = make_inputs(trajectories, seed)
    batch = pack_multiturn(*inputs, ignore_index=ignore_index)
    assert_matches_reference(batch, ignore_index)
    assert batch.num_sequences == len(trajectories)
    assert batch.num_tokens == sum(n for traj in trajectories for n, _ in traj)
    assert batch.num_turns == sum(tr for traj in trajectories for _, tr in traj)


@pytest.mark.usefixtures("poisoned_malloc")
@pytest.mark.parametrize("num_threads", [1, 2, 5])
def test_large_batch_matches_reference(num_threads: int) -> None:
    """Enough trajectories to split the C++ kernel over ``num_threads`` threads (grain: 8 trajectories)."""
    gen = torch.Generator().manual_seed(7)
    trajectories = [
        [(int(n), bool(tr)) for n, tr in zip(torch.randint(0, 60, (13,), generator=gen), torch.arange(13) % 2 == 1)]
        for _ in range(300)
    ]
    inputs = make_inputs(trajectories, seed=7)
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        batch = pack_multiturn(*inputs)
    finally:
        torch.set_num_threads(previous)
    assert_matches_reference(batch)


def test_extension_runs_parallel_under_torchs_openmp_backend() -> None:
    """at::parallel_for is header code: compiled without OpenMP it runs on one thread whatever torch's setting."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch does not use the OpenMP backend")
    assert _C.openmp, "bao_fast._C was built without -fopenmp: the C++ ops would run on one thread"


@pytest.mark.usefixtures("poisoned_malloc")
def test_semantics_on_a_hand_checked_batch() -> None:
    """The contract's alignment rules, spelled out: row t predicts token t+1 of the same trajectory."""
    # Trajectory 0: system(2) assistant(3) user(1); trajectory 1: empty assistant, assistant(2), user(1).
    inputs = make_inputs([[(2, False), (3, True), (1, False)], [(0, True), (2, True), (1, False)]])
    ids = inputs[3]
    batch = pack_multiturn(*inputs)
    assert batch.cu_seqlens.tolist() == [0, 6, 9]
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert batch.turn_ids.tolist() == [-1, -1, 0, 0, 0, -1, 2, 2, -1]  # the empty assistant segment is turn 1
    assert batch.turn_offsets.tolist() == [0, 1, 3]
    assert batch.seq_ids.tolist() == [0] * 6 + [1] * 3
    assert batch.targets.tolist() == [*ids[1:6].tolist(), -100, *ids[7:9].tolist(), -100]
    assert batch.target_mask.tolist() == [False, True, True, True, False, False, True, False, False]
    assert batch.target_turn_ids.tolist() == [-1, 0, 0, 0, -1, -1, 2, -1, -1]
    assert batch.target_rows.tolist() == [1, 2, 3, 6]  # token 6 starts trajectory 1: no row predicts it


@pytest.mark.parametrize(
    "trajectories",
    [
        pytest.param([], id="empty-batch"),
        pytest.param([[]], id="trajectory-without-segments"),
        pytest.param([[(0, True), (0, False)]], id="zero-length-segments-only"),
        pytest.param([[(3, False), (2, False)], [(4, True)]], id="trajectory-without-trained-segment"),
        pytest.param([[(1, True)], [(1, False)], [(1, True)]], id="single-token-trajectories"),
        pytest.param([[(0, True), (5, True), (0, True), (2, False)]], id="empty-turns-around-a-turn"),
    ],
)
@pytest.mark.usefixtures("poisoned_malloc")
def test_edge_cases(trajectories: list[list[tuple[int, bool]]]) -> None:
    batch = pack_multiturn(*make_inputs(trajectories))
    assert_matches_reference(batch)
    assert batch.turn_offsets[-1].item() == batch.num_turns


def test_raw_op_and_torch_compile() -> None:
    """The registered op traces under torch.compile (fullgraph) via its meta kernel and passes opcheck."""
    seg_lens, seg_trained, seq_seg_offsets, input_ids = make_inputs([[(3, False), (4, True)], [(2, True), (1, False)]])
    args = (seg_lens, seg_trained, seq_seg_offsets, input_ids, 2, 5, -100)  # rows: 4 + (2 - 1)
    torch.library.opcheck(torch.ops.bao_fast.pack_multiturn.default, args)
    eager = torch.ops.bao_fast.pack_multiturn(*args)
    compiled = torch.compile(torch.ops.bao_fast.pack_multiturn.default, fullgraph=True, backend="aot_eager")(*args)
    for name, a, b in zip(OUTPUT_FIELDS, eager, compiled, strict=True):
        assert torch.equal(a, b), name


def test_raw_op_rejects_inconsistent_sizes() -> None:
    seg_lens, seg_trained, seq_seg_offsets, input_ids = make_inputs([[(3, False), (4, True)]])
    with pytest.raises(RuntimeError, match="num_target_rows"):
        torch.ops.bao_fast.pack_multiturn(seg_lens, seg_trained, seq_seg_offsets, input_ids, 1, 3, -100)
    with pytest.raises(RuntimeError, match="num_turns"):
        torch.ops.bao_fast.pack_multiturn(seg_lens, seg_trained, seq_seg_offsets, input_ids, 0, 4, -100)


def test_raw_op_rejects_offsets_past_the_segments() -> None:
    """A middle offset beyond S is refused before any segment past the end is read (seg_lens is a view, so
    the memory behind it would otherwise be read as segments)."""
    backing_lens = torch.tensor([1, 1, -7, 0], dtype=torch.int32)
    backing_trained = torch.zeros(4, dtype=torch.bool)
    offsets = torch.tensor([0, 4, 2], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="seq_seg_offsets must not exceed the number of segments 2, got 4"):
        torch.ops.bao_fast.pack_multiturn(backing_lens[:2], backing_trained[:2], offsets, torch.arange(2), 0, 0, -100)


GOOD = make_inputs([[(2, False), (3, True)], [(1, True)]])


def _replace(index: int, value: object) -> list[object]:
    args: list[object] = list(GOOD)
    args[index] = value
    return args


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (_replace(0, torch.tensor([2, -1, 2], dtype=torch.int32)), ValueError, "seg_lens must be >= 0"),
        (_replace(0, torch.tensor([2, 3, 2], dtype=torch.int32)), ValueError, "seg_lens sums to 7"),
        (_replace(0, GOOD[0].long()), ValueError, "seg_lens must have dtype torch.int32"),
        (_replace(0, GOOD[0].view(1, 3)), ValueError, "seg_lens must be 1-D"),
        (_replace(0, [2, 3, 1]), TypeError, "seg_lens must be a torch.Tensor"),
        (_replace(1, GOOD[1].int()), ValueError, "seg_trained must have dtype torch.bool"),
        (_replace(1, GOOD[1][:2]), ValueError, "seg_trained has 2 entries"),
        (_replace(2, torch.tensor([0, 3, 2, 3], dtype=torch.int32)), ValueError, "seq_seg_offsets must be non-decr"),
        (_replace(2, torch.tensor([1, 2, 3], dtype=torch.int32)), ValueError, "seq_seg_offsets must start at 0"),
        (_replace(2, torch.tensor([0, 2], dtype=torch.int32)), ValueError, "seq_seg_offsets must start at 0"),
        (_replace(2, torch.zeros(0, dtype=torch.int32)), ValueError, "seq_seg_offsets must have B"),
        (_replace(2, GOOD[2].long()), ValueError, "seq_seg_offsets must have dtype torch.int32"),
        (_replace(0, GOOD[0].to("meta")), ValueError, "seg_lens is host metadata and must be a CPU tensor"),
        (_replace(1, GOOD[1].to("meta")), ValueError, "seg_trained is host metadata and must be a CPU tensor"),
        (_replace(2, GOOD[2].to("meta")), ValueError, "seq_seg_offsets is host metadata"),
        (_replace(3, GOOD[3].int()), ValueError, "input_ids must have dtype torch.int64"),
        (_replace(3, GOOD[3][:5]), ValueError, "len\\(input_ids\\) = 5"),
        (_replace(3, GOOD[3].to("meta")), ValueError, "input_ids must be on a CPU or CUDA device"),
    ],
)
def test_validation_names_the_argument(args: list[object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        pack_multiturn(*args)


def test_ignore_index_must_be_int() -> None:
    with pytest.raises(TypeError, match="ignore_index"):
        pack_multiturn(*GOOD, ignore_index=-100.0)
    with pytest.raises(ValueError, match="ignore_index must fit in int64, got 9223372036854775808"):
        pack_multiturn(*GOOD, ignore_index=2**63)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@settings(max_examples=40, deadline=None)
@given(trajectories=trajectories_st, seed=st.integers(0, 2**16))
def test_cuda_matches_reference(trajectories: list[list[tuple[int, bool]]], seed: int) -> None:
    seg_lens, seg_trained, seq_seg_offsets, input_ids = make_inputs(trajectories, seed)
    input_ids = input_ids.cuda()
    with poisoned_cuda_pool(input_ids.numel()):
        batch = pack_multiturn(seg_lens, seg_trained, seq_seg_offsets, input_ids)
    assert batch.cu_seqlens.is_cuda and batch.target_rows.is_cuda
    assert_matches_reference(batch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_large_batch_without_host_sync() -> None:
    """Many blocks exercise the look-back scan; sync debug mode turns any host synchronisation into an error."""
    gen = torch.Generator().manual_seed(11)
    trajectories = [[(int(n), s % 2 == 1) for s, n in enumerate(torch.randint(0, 90, (33,), generator=gen))]]
    trajectories = trajectories * 2000
    seg_lens, seg_trained, seq_seg_offsets, input_ids = make_inputs(trajectories, seed=11)
    input_ids = input_ids.cuda()
    with poisoned_cuda_pool(input_ids.numel()):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            batch = pack_multiturn(seg_lens, seg_trained, seq_seg_offsets, input_ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert_matches_reference(batch)
