// CPU kernel, meta (shape) kernel and TORCH_LIBRARY registration of bao_fast::pack_multiturn.
// Semantics: pack_multiturn.h. Needs no Python: the C++ tests link it directly.
#include "pack_multiturn.h"
#include "pack_multiturn_fill.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/core/SymInt.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

namespace bao_fast {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// Trajectories per parallel task: large enough to amortise scheduling, small enough to balance 2..64 cores.
constexpr int64_t kGrainTrajectories = 8;

at::TensorOptions opts_like(const at::Tensor& t, at::ScalarType dtype) {
  return t.options().dtype(dtype);
}

}  // namespace

void check_pack_args(const at::Tensor& seg_lens, const at::Tensor& seg_trained, const at::Tensor& seq_seg_offsets,
                     const at::Tensor& input_ids, int64_t num_turns, int64_t num_target_rows) {
  TORCH_CHECK(seg_lens.dim() == 1 && seg_lens.scalar_type() == at::kInt, "seg_lens must be int32[S], got ",
              seg_lens.scalar_type(), seg_lens.sizes());
  TORCH_CHECK(seg_trained.dim() == 1 && seg_trained.scalar_type() == at::kBool,
              "seg_trained must be bool[S], got ", seg_trained.scalar_type(), seg_trained.sizes());
  TORCH_CHECK(seg_trained.size(0) == seg_lens.size(0), "seg_trained has ", seg_trained.size(0),
              " entries but seg_lens has ", seg_lens.size(0));
  TORCH_CHECK(seq_seg_offsets.dim() == 1 && seq_seg_offsets.scalar_type() == at::kInt &&
                  seq_seg_offsets.size(0) >= 1,
              "seq_seg_offsets must be int32[B+1], got ", seq_seg_offsets.scalar_type(), seq_seg_offsets.sizes());
  TORCH_CHECK(input_ids.dim() == 1 && input_ids.scalar_type() == at::kLong, "input_ids must be int64[T], got ",
              input_ids.scalar_type(), input_ids.sizes());
  TORCH_CHECK(input_ids.size(0) <= kInt32Max, "input_ids has ", input_ids.size(0),
              " tokens; cu_seqlens is int32 so at most 2^31-1 are supported");
  for (const at::Tensor* t : {&seg_lens, &seg_trained, &seq_seg_offsets}) {
    TORCH_CHECK(t->device() == input_ids.device(), "pack_multiturn: every input must be on ", input_ids.device(),
                ", got ", t->device());
  }
  TORCH_CHECK(num_turns >= 0 && num_turns <= seg_lens.size(0), "num_turns must be in [0, S], got ", num_turns);
  TORCH_CHECK(num_target_rows >= 0 && num_target_rows <= input_ids.size(0),
              "num_target_rows must be in [0, T], got ", num_target_rows);
}

PackOutputs pack_multiturn_cpu(const at::Tensor& seg_lens_in, const at::Tensor& seg_trained_in,
                               const at::Tensor& seq_seg_offsets_in, const at::Tensor& input_ids_in, int64_t num_turns,
                               int64_t num_target_rows, int64_t ignore_index) {
  check_pack_args(seg_lens_in, seg_trained_in, seq_seg_offsets_in, input_ids_in, num_turns, num_target_rows);
  TORCH_CHECK(input_ids_in.device().is_cpu(), "pack_multiturn_cpu: inputs must be CPU tensors");
  const at::Tensor seg_lens = seg_lens_in.contiguous();
  const at::Tensor seg_trained = seg_trained_in.contiguous();
  const at::Tensor seq_seg_offsets = seq_seg_offsets_in.contiguous();
  const at::Tensor input_ids = input_ids_in.contiguous();

  const int64_t S = seg_lens.size(0);
  const int64_t B = seq_seg_offsets.size(0) - 1;
  const int64_t T = input_ids.size(0);
  const int32_t* lens = seg_lens.data_ptr<int32_t>();
  const bool* trained = seg_trained.data_ptr<bool>();
  const int32_t* offs = seq_seg_offsets.data_ptr<int32_t>();

  at::Tensor cu_seqlens = at::empty({B + 1}, opts_like(input_ids, at::kInt));
  at::Tensor turn_offsets = at::empty({B + 1}, opts_like(input_ids, at::kInt));
  int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  int32_t* toff = turn_offsets.data_ptr<int32_t>();

  // Serial pass over the host description (O(S + B)): validates values and computes every trajectory's
  // first token, first turn and first target row.
  TORCH_CHECK(offs[0] == 0, "seq_seg_offsets[0] must be 0, got ", offs[0]);
  TORCH_CHECK(offs[B] == S, "seq_seg_offsets[-1] must equal the number of segments ", S, ", got ", offs[B]);
  std::vector<int64_t> row_start(B + 1);
  int64_t tok = 0, turn = 0, row = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(offs[b] <= offs[b + 1], "seq_seg_offsets must be non-decreasing, got ", offs[b], " > ", offs[b + 1],
                " at index ", b);
    TORCH_CHECK(offs[b + 1] <= S, "seq_seg_offsets must not exceed the number of segments ", S, ", got ", offs[b + 1],
                " at index ", b + 1);
    cu[b] = static_cast<int32_t>(tok);
    toff[b] = static_cast<int32_t>(turn);
    row_start[b] = row;
    const int64_t first_tok = tok;
    for (int64_t s = offs[b]; s < offs[b + 1]; ++s) {
      TORCH_CHECK(lens[s] >= 0, "seg_lens must be >= 0, got ", lens[s], " at index ", s);
      TORCH_CHECK(tok + lens[s] <= T, "sum(seg_lens) exceeds len(input_ids) = ", T);
      if (trained[s]) {
        // Every trained token is a target except a trajectory's first token (nothing predicts it).
        row += lens[s] - (tok == first_tok && lens[s] > 0 ? 1 : 0);
        ++turn;
      }
      tok += lens[s];
    }
  }
  TORCH_CHECK(tok == T, "sum(seg_lens) = ", tok, " must equal len(input_ids) = ", T);
  TORCH_CHECK(turn == num_turns, "num_turns = ", num_turns, " but seg_trained has ", turn, " trained segments");
  TORCH_CHECK(row == num_target_rows, "num_target_rows = ", num_target_rows, " but the batch has ", row);
  cu[B] = static_cast<int32_t>(T);
  toff[B] = static_cast<int32_t>(turn);
  row_start[B] = row;

  at::Tensor position_ids = at::empty({T}, opts_like(input_ids, at::kLong));
  at::Tensor loss_mask = at::empty({T}, opts_like(input_ids, at::kBool));
  at::Tensor turn_ids = at::empty({T}, opts_like(input_ids, at::kInt));
  at::Tensor seq_ids = at::empty({T}, opts_like(input_ids, at::kInt));
  at::Tensor targets = at::empty({T}, opts_like(input_ids, at::kLong));
  at::Tensor target_mask = at::empty({T}, opts_like(input_ids, at::kBool));
  at::Tensor target_turn_ids = at::empty({T}, opts_like(input_ids, at::kInt));
  at::Tensor target_rows = at::empty({num_target_rows}, opts_like(input_ids, at::kLong));

  const int64_t* ids = input_ids.data_ptr<int64_t>();
  const PackPointers out{position_ids.data_ptr<int64_t>(),   loss_mask.data_ptr<bool>(),
                         turn_ids.data_ptr<int32_t>(),       seq_ids.data_ptr<int32_t>(),
                         targets.data_ptr<int64_t>(),        target_mask.data_ptr<bool>(),
                         target_turn_ids.data_ptr<int32_t>(), target_rows.data_ptr<int64_t>()};
  at::parallel_for(0, B, kGrainTrajectories, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      fill_trajectory(b, offs[b], offs[b + 1], lens, trained, ids, TrajectoryStart{cu[b], toff[b], row_start[b]},
                      cu[b + 1], ignore_index, out, /*lane=*/0, /*num_lanes=*/1);
    }
  });
  return {cu_seqlens, position_ids, loss_mask,   turn_ids,        turn_offsets,
          seq_ids,    targets,      target_mask, target_turn_ids, target_rows};
}

namespace {

// Shapes only (FakeTensor / torch.compile); num_turns and num_target_rows may be symbolic.
PackOutputs pack_multiturn_meta(const at::Tensor& seg_lens, const at::Tensor& seg_trained,
                                const at::Tensor& seq_seg_offsets, const at::Tensor& input_ids,
                                c10::SymInt num_turns, c10::SymInt num_target_rows, int64_t /*ignore_index*/) {
  TORCH_CHECK(seg_lens.dim() == 1 && seg_trained.dim() == 1 && seq_seg_offsets.dim() == 1 && input_ids.dim() == 1,
              "pack_multiturn: every input must be 1-D");
  TORCH_CHECK(seg_lens.scalar_type() == at::kInt && seg_trained.scalar_type() == at::kBool &&
                  seq_seg_offsets.scalar_type() == at::kInt && input_ids.scalar_type() == at::kLong,
              "pack_multiturn: dtypes must be seg_lens int32, seg_trained bool, seq_seg_offsets int32, "
              "input_ids int64");
  (void)num_turns;
  const c10::SymInt T = input_ids.sym_size(0);
  const c10::SymInt B1 = seq_seg_offsets.sym_size(0);
  auto make = [&](c10::SymInt n, at::ScalarType dtype) {
    return at::empty_symint({std::move(n)}, opts_like(input_ids, dtype));
  };
  return {make(B1, at::kInt),   make(T, at::kLong),  make(T, at::kBool), make(T, at::kInt),
          make(B1, at::kInt),   make(T, at::kInt),   make(T, at::kLong), make(T, at::kBool),
          make(T, at::kInt),    make(std::move(num_target_rows), at::kLong)};
}

}  // namespace
}  // namespace bao_fast

// FRAGMENT: other bao_fast ops (Triton, registered from Python) share the namespace.
TORCH_LIBRARY_FRAGMENT(bao_fast, m) {
  m.def(
      "pack_multiturn(Tensor seg_lens, Tensor seg_trained, Tensor seq_seg_offsets, Tensor input_ids, "
      "SymInt num_turns, SymInt num_target_rows, int ignore_index=-100) -> (Tensor cu_seqlens, "
      "Tensor position_ids, Tensor loss_mask, Tensor turn_ids, Tensor turn_offsets, Tensor seq_ids, "
      "Tensor targets, Tensor target_mask, Tensor target_turn_ids, Tensor target_rows)");
}

TORCH_LIBRARY_IMPL(bao_fast, CPU, m) {
  m.impl("pack_multiturn", &bao_fast::pack_multiturn_cpu);
}

TORCH_LIBRARY_IMPL(bao_fast, Meta, m) {
  m.impl("pack_multiturn", &bao_fast::pack_multiturn_meta);
}

#ifdef BAO_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(bao_fast, CUDA, m) {
  m.impl("pack_multiturn", &bao_fast::pack_multiturn_cuda);
}
#endif
