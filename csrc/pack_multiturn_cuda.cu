// CUDA kernel of bao_fast::pack_multiturn (semantics: pack_multiturn.h).
//
// One launch, one thread block per trajectory, no host synchronisation. Each trajectory needs the
// exclusive prefix (first token, first turn, first target row) over all earlier trajectories; blocks get
// it from a single-pass decoupled look-back scan (Merrill & Garland, 2016): a block takes a ticket (so
// tickets follow launch order and every predecessor it waits on is resident or finished), reduces its
// own segments, publishes that aggregate, walks back over predecessors' published aggregates until it
// finds an inclusive prefix, publishes its own inclusive prefix, then writes its tokens. Work and
// traffic are O(S + T); the scan state is 8 int64 per trajectory, zeroed with one memset. The token-level
// writes are fill_trajectory (pack_multiturn_fill.h), the code the CPU kernel and the C++ tests run.
//
// Output sizes (T, B, num_turns, num_target_rows) are known before the launch; the Python wrapper
// computes the last two from the host description and validates the values there, so the kernel only
// guards against out-of-bounds writes (device assert) rather than re-validating.
#include "pack_multiturn.h"
#include "pack_multiturn_fill.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace bao_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Scan slot of one trajectory: status, aggregate (tokens, turns, rows), inclusive prefix (same), pad.
constexpr int kSlot = 8;
constexpr long long kStatusAggregate = 1;
constexpr long long kStatusInclusive = 2;

struct Totals {
  long long tokens;
  long long turns;
  long long trained_tokens;
  int first_nonempty;  // first segment index with tokens (INT_MAX: none)
};

// Block-wide reduction (sums and min); the result is returned to every thread.
__device__ Totals block_reduce(Totals v) {
  __shared__ Totals partial[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int o = 16; o > 0; o >>= 1) {
    v.tokens += __shfl_down_sync(0xffffffffu, v.tokens, o);
    v.turns += __shfl_down_sync(0xffffffffu, v.turns, o);
    v.trained_tokens += __shfl_down_sync(0xffffffffu, v.trained_tokens, o);
    v.first_nonempty = min(v.first_nonempty, __shfl_down_sync(0xffffffffu, v.first_nonempty, o));
  }
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      v.tokens += partial[w].tokens;
      v.turns += partial[w].turns;
      v.trained_tokens += partial[w].trained_tokens;
      v.first_nonempty = min(v.first_nonempty, partial[w].first_nonempty);
    }
    partial[0] = v;
  }
  __syncthreads();
  return partial[0];
}

__device__ void spin_pause() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  __nanosleep(64);
#endif
}

// Decoupled look-back, run by one thread: publishes this trajectory's aggregate, sums predecessors until
// an inclusive prefix is found, publishes the inclusive prefix, returns the exclusive one in `excl`.
__device__ void look_back(long long* scan, long long b, const long long agg[3], long long excl[3]) {
  volatile long long* mine = scan + b * kSlot;
  excl[0] = excl[1] = excl[2] = 0;
  if (b > 0) {
    for (int i = 0; i < 3; ++i) mine[1 + i] = agg[i];
    __threadfence();
    mine[0] = kStatusAggregate;
    for (long long j = b - 1; j >= 0; --j) {
      volatile long long* pred = scan + j * kSlot;
      long long status;
      while ((status = pred[0]) == 0) spin_pause();
      __threadfence();
      const int base = status == kStatusInclusive ? 4 : 1;
      for (int i = 0; i < 3; ++i) excl[i] += pred[base + i];
      if (status == kStatusInclusive) break;
    }
  }
  for (int i = 0; i < 3; ++i) mine[4 + i] = excl[i] + agg[i];
  __threadfence();
  mine[0] = kStatusInclusive;
}

struct PackArgs {
  const int32_t* lens;
  const bool* trained;
  const int32_t* offs;
  const int64_t* ids;
  long long num_seqs;
  long long num_tokens;
  long long num_target_rows;
  int64_t ignore_index;
  long long* ticket;  // 1 counter
  long long* scan;    // kSlot per trajectory
  int32_t* cu_seqlens;
  int32_t* turn_offsets;
  PackPointers out;
};

__global__ void __launch_bounds__(kThreads) pack_multiturn_kernel(PackArgs a) {
  __shared__ long long sh_b;
  __shared__ long long sh_excl[3];
  if (threadIdx.x == 0) sh_b = static_cast<long long>(atomicAdd(reinterpret_cast<unsigned long long*>(a.ticket), 1ull));
  __syncthreads();
  const long long b = sh_b;
  const int s0 = a.offs[b];
  const int s1 = a.offs[b + 1];

  Totals mine{0, 0, 0, INT_MAX};
  for (long long s = s0 + static_cast<long long>(threadIdx.x); s < s1; s += kThreads) {
    const int len = a.lens[s];
    CUDA_KERNEL_ASSERT(len >= 0);
    mine.tokens += len;
    mine.turns += a.trained[s] ? 1 : 0;
    mine.trained_tokens += a.trained[s] ? len : 0;
    if (len > 0) mine.first_nonempty = min(mine.first_nonempty, static_cast<int>(s));  // s < s1 <= INT_MAX
  }
  const Totals tot = block_reduce(mine);
  // A trajectory's first token is predicted by no row, so it is never a target row.
  const long long first_trained = tot.first_nonempty != INT_MAX && a.trained[tot.first_nonempty] ? 1 : 0;

  if (threadIdx.x == 0) {
    const long long agg[3] = {tot.tokens, tot.turns, tot.trained_tokens - first_trained};
    long long excl[3];
    look_back(a.scan, b, agg, excl);
    for (int i = 0; i < 3; ++i) sh_excl[i] = excl[i];
    CUDA_KERNEL_ASSERT(excl[0] + agg[0] <= a.num_tokens);
    CUDA_KERNEL_ASSERT(excl[2] + agg[2] <= a.num_target_rows);
    a.cu_seqlens[b] = static_cast<int32_t>(excl[0]);
    a.turn_offsets[b] = static_cast<int32_t>(excl[1]);
    if (b == a.num_seqs - 1) {
      CUDA_KERNEL_ASSERT(excl[0] + agg[0] == a.num_tokens);
      CUDA_KERNEL_ASSERT(excl[2] + agg[2] == a.num_target_rows);
      a.cu_seqlens[b + 1] = static_cast<int32_t>(excl[0] + agg[0]);
      a.turn_offsets[b + 1] = static_cast<int32_t>(excl[1] + agg[1]);
    }
  }
  __syncthreads();
  const long long start = sh_excl[0];
  const long long end = start + tot.tokens;
  // An invalid description (the device asserts above report it) must not write out of bounds.
  if (end > a.num_tokens || sh_excl[2] + tot.trained_tokens - first_trained > a.num_target_rows) return;
  fill_trajectory(b, s0, s1, a.lens, a.trained, a.ids,
                  TrajectoryStart{start, static_cast<int32_t>(sh_excl[1]), sh_excl[2]}, end, a.ignore_index, a.out,
                  threadIdx.x, kThreads);
}

}  // namespace

PackOutputs pack_multiturn_cuda(const at::Tensor& seg_lens_in, const at::Tensor& seg_trained_in,
                                const at::Tensor& seq_seg_offsets_in, const at::Tensor& input_ids_in,
                                int64_t num_turns, int64_t num_target_rows, int64_t ignore_index) {
  check_pack_args(seg_lens_in, seg_trained_in, seq_seg_offsets_in, input_ids_in, num_turns, num_target_rows);
  TORCH_CHECK(input_ids_in.is_cuda(), "pack_multiturn_cuda: inputs must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(input_ids_in.device());
  const at::Tensor seg_lens = seg_lens_in.contiguous();
  const at::Tensor seg_trained = seg_trained_in.contiguous();
  const at::Tensor seq_seg_offsets = seq_seg_offsets_in.contiguous();
  const at::Tensor input_ids = input_ids_in.contiguous();
  const int64_t B = seq_seg_offsets.size(0) - 1;
  const int64_t T = input_ids.size(0);
  const auto opts = [&](at::ScalarType dtype) { return input_ids.options().dtype(dtype); };

  at::Tensor position_ids = at::empty({T}, opts(at::kLong));
  at::Tensor loss_mask = at::empty({T}, opts(at::kBool));
  at::Tensor turn_ids = at::empty({T}, opts(at::kInt));
  at::Tensor seq_ids = at::empty({T}, opts(at::kInt));
  at::Tensor targets = at::empty({T}, opts(at::kLong));
  at::Tensor target_mask = at::empty({T}, opts(at::kBool));
  at::Tensor target_turn_ids = at::empty({T}, opts(at::kInt));
  at::Tensor target_rows = at::empty({num_target_rows}, opts(at::kLong));
  if (B == 0) {
    return {at::zeros({1}, opts(at::kInt)), position_ids, loss_mask,   turn_ids,        at::zeros({1}, opts(at::kInt)),
            seq_ids,                        targets,      target_mask, target_turn_ids, target_rows};
  }
  at::Tensor cu_seqlens = at::empty({B + 1}, opts(at::kInt));
  at::Tensor turn_offsets = at::empty({B + 1}, opts(at::kInt));
  at::Tensor workspace = at::empty({1 + kSlot * B}, opts(at::kLong));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(workspace.data_ptr(), 0, workspace.nbytes(), stream));

  PackArgs args{seg_lens.data_ptr<int32_t>(),
                seg_trained.data_ptr<bool>(),
                seq_seg_offsets.data_ptr<int32_t>(),
                input_ids.data_ptr<int64_t>(),
                B,
                T,
                num_target_rows,
                ignore_index,
                reinterpret_cast<long long*>(workspace.data_ptr<int64_t>()),
                reinterpret_cast<long long*>(workspace.data_ptr<int64_t>()) + 1,
                cu_seqlens.data_ptr<int32_t>(),
                turn_offsets.data_ptr<int32_t>(),
                PackPointers{position_ids.data_ptr<int64_t>(), loss_mask.data_ptr<bool>(), turn_ids.data_ptr<int32_t>(),
                             seq_ids.data_ptr<int32_t>(), targets.data_ptr<int64_t>(), target_mask.data_ptr<bool>(),
                             target_turn_ids.data_ptr<int32_t>(), target_rows.data_ptr<int64_t>()}};
  pack_multiturn_kernel<<<static_cast<unsigned int>(B), kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {cu_seqlens, position_ids, loss_mask,   turn_ids,        turn_offsets,
          seq_ids,    targets,      target_mask, target_turn_ids, target_rows};
}

}  // namespace bao_fast
