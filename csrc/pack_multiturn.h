// Packed multi-turn batches: flat, padding-free token stream plus the masks every loss op shares.
//
// Op `bao_fast::pack_multiturn` (schema in pack_multiturn.cpp). Inputs, all on one device:
//   seg_lens int32[S] (>= 0), seg_trained bool[S], seq_seg_offsets int32[B+1] (0 .. S, non-decreasing),
//   input_ids int64[T] with T = sum(seg_lens); num_turns M = sum(seg_trained) (every trained segment is a
//   turn, zero-length ones included); num_target_rows K = number of rows whose next token is trained.
// Outputs (T-sized ones are indexed by token / LM-head row t):
//   cu_seqlens int32[B+1], position_ids int64[T] (restart at 0 per trajectory), loss_mask bool[T],
//   turn_ids int32[T] (global turn or -1), turn_offsets int32[B+1], seq_ids int32[T],
//   targets int64[T] (input_ids[t+1], ignore_index at a trajectory's last token),
//   target_mask bool[T] (loss_mask[t+1], false at a trajectory's last token),
//   target_turn_ids int32[T] (turn_ids[t+1], -1 at a trajectory's last token),
//   target_rows int64[K] (ascending rows t with target_mask[t]).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace bao_fast {

using PackOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Checks ranks, dtypes, devices and sizes shared by every backend (not the values: those need the data).
void check_pack_args(const at::Tensor& seg_lens, const at::Tensor& seg_trained, const at::Tensor& seq_seg_offsets,
                     const at::Tensor& input_ids, int64_t num_turns, int64_t num_target_rows);

// CPU kernel: validates the values too, then fills every output in parallel over trajectories.
PackOutputs pack_multiturn_cpu(const at::Tensor& seg_lens, const at::Tensor& seg_trained,
                               const at::Tensor& seq_seg_offsets, const at::Tensor& input_ids, int64_t num_turns,
                               int64_t num_target_rows, int64_t ignore_index);

#ifdef BAO_FAST_WITH_CUDA
// CUDA kernel: one launch for the whole batch, no host synchronisation. Values are trusted (validated on
// the host description by the Python wrapper); sizes are checked.
PackOutputs pack_multiturn_cuda(const at::Tensor& seg_lens, const at::Tensor& seg_trained,
                                const at::Tensor& seq_seg_offsets, const at::Tensor& input_ids, int64_t num_turns,
                                int64_t num_target_rows, int64_t ignore_index);
#endif

}  // namespace bao_fast
