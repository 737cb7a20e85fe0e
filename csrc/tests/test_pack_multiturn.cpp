// C++ unit test of bao_fast::pack_multiturn against libtorch (no Python): a hand-derived batch, edge cases,
// random batches checked token by token against an independent per-token formulation, the dispatcher
// registration, and value validation. Exit code = number of failed checks.
#include "pack_multiturn.h"
#include "pack_multiturn_fill.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstdint>
#include <iostream>
#include <random>
#include <string>
#include <vector>

namespace {

int g_failures = 0;

#define EXPECT(cond)                                                                 \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      ++g_failures;                                                                  \
      std::cerr << __FILE__ << ":" << __LINE__ << ": EXPECT failed: " #cond << "\n"; \
    }                                                                                \
  } while (0)

struct Batch {
  std::vector<std::vector<std::pair<int32_t, bool>>> trajectories;  // (length, trained) per segment
};

struct Inputs {
  at::Tensor seg_lens, seg_trained, seq_seg_offsets, input_ids;
  int64_t num_turns = 0, num_target_rows = 0;
};

template <typename T>
std::vector<T> to_vec(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return std::vector<T>(c.data_ptr<T>(), c.data_ptr<T>() + c.numel());
}

Inputs make_inputs(const Batch& batch, std::mt19937_64& rng) {
  std::vector<int32_t> lens, offs{0};
  std::vector<uint8_t> trained;
  Inputs in;
  for (const auto& traj : batch.trajectories) {
    int64_t first_token_trained = -1;  // -1: no token yet
    for (const auto& [len, tr] : traj) {
      lens.push_back(len);
      trained.push_back(tr);
      in.num_turns += tr ? 1 : 0;
      in.num_target_rows += tr ? len : 0;
      if (first_token_trained < 0 && len > 0) first_token_trained = tr ? 1 : 0;
    }
    in.num_target_rows -= first_token_trained > 0 ? 1 : 0;
    offs.push_back(static_cast<int32_t>(lens.size()));
  }
  int64_t total = 0;
  for (int32_t l : lens) total += l;
  const auto i32 = at::TensorOptions().dtype(at::kInt);
  in.seg_lens = at::from_blob(lens.data(), {static_cast<int64_t>(lens.size())}, i32).clone();
  in.seg_trained = at::from_blob(trained.data(), {static_cast<int64_t>(trained.size())}, at::kByte).to(at::kBool);
  in.seq_seg_offsets = at::from_blob(offs.data(), {static_cast<int64_t>(offs.size())}, i32).clone();
  std::uniform_int_distribution<int64_t> vocab(0, 50000);
  std::vector<int64_t> ids(total);
  for (auto& id : ids) id = vocab(rng);
  in.input_ids = at::from_blob(ids.data(), {total}, at::kLong).clone();
  return in;
}

bao_fast::PackOutputs run(const Inputs& in, int64_t ignore_index = -100) {
  return bao_fast::pack_multiturn_cpu(in.seg_lens, in.seg_trained, in.seq_seg_offsets, in.input_ids, in.num_turns,
                                      in.num_target_rows, ignore_index);
}

// Every field, token by token, from a per-token description built independently of the kernel.
void check_against_per_token_model(const Batch& batch, const Inputs& in, const bao_fast::PackOutputs& out,
                                   int64_t ignore_index) {
  const auto& [cu, pos, lmask, tids, toff, sids, tgt, tmask, ttids, rows] = out;
  std::vector<int64_t> e_seq, e_pos, e_turn;
  std::vector<bool> e_mask;
  std::vector<int32_t> e_cu{0}, e_toff{0};
  int32_t turn = 0;
  for (size_t b = 0; b < batch.trajectories.size(); ++b) {
    int64_t p = 0;
    for (const auto& [len, tr] : batch.trajectories[b]) {
      for (int32_t i = 0; i < len; ++i) {
        e_seq.push_back(static_cast<int64_t>(b));
        e_pos.push_back(p++);
        e_mask.push_back(tr);
        e_turn.push_back(tr ? turn : -1);
      }
      turn += tr ? 1 : 0;
    }
    e_cu.push_back(static_cast<int32_t>(e_seq.size()));
    e_toff.push_back(turn);
  }
  const int64_t T = static_cast<int64_t>(e_seq.size());
  EXPECT(to_vec<int32_t>(cu) == e_cu);
  EXPECT(to_vec<int32_t>(toff) == e_toff);
  EXPECT(pos.numel() == T && lmask.numel() == T && tids.numel() == T && sids.numel() == T && tgt.numel() == T &&
         tmask.numel() == T && ttids.numel() == T);
  EXPECT(pos.scalar_type() == at::kLong && lmask.scalar_type() == at::kBool && tids.scalar_type() == at::kInt &&
         sids.scalar_type() == at::kInt && tgt.scalar_type() == at::kLong && tmask.scalar_type() == at::kBool &&
         ttids.scalar_type() == at::kInt && rows.scalar_type() == at::kLong && cu.scalar_type() == at::kInt &&
         toff.scalar_type() == at::kInt);
  const auto v_pos = to_vec<int64_t>(pos), v_tgt = to_vec<int64_t>(tgt), ids = to_vec<int64_t>(in.input_ids);
  const auto v_tids = to_vec<int32_t>(tids), v_sids = to_vec<int32_t>(sids), v_ttids = to_vec<int32_t>(ttids);
  const auto v_lmask = to_vec<bool>(lmask), v_tmask = to_vec<bool>(tmask);
  std::vector<int64_t> e_rows;
  int bad = 0;
  for (int64_t t = 0; t < T; ++t) {
    const bool has_next = t + 1 < T && e_seq[t + 1] == e_seq[t];
    const bool e_tmask = has_next && e_mask[t + 1];
    if (e_tmask) e_rows.push_back(t);
    bad += v_pos[t] != e_pos[t] || v_lmask[t] != e_mask[t] || v_tids[t] != e_turn[t] || v_sids[t] != e_seq[t];
    bad += v_tgt[t] != (has_next ? ids[t + 1] : ignore_index);
    bad += v_tmask[t] != e_tmask || v_ttids[t] != (has_next ? e_turn[t + 1] : -1);
  }
  EXPECT(bad == 0);
  EXPECT(to_vec<int64_t>(rows) == e_rows);
}

void test_hand_derived() {
  // Trajectory 0: user(2) assistant(3) user(1); trajectory 1: assistant(0) assistant(2) user(1).
  std::mt19937_64 rng(0);
  const Batch batch{{{{2, false}, {3, true}, {1, false}}, {{0, true}, {2, true}, {1, false}}}};
  Inputs in = make_inputs(batch, rng);
  in.input_ids = at::arange(10, 19, at::kLong);
  EXPECT(in.num_turns == 3 && in.num_target_rows == 4);
  const auto out = run(in);
  const auto& [cu, pos, lmask, tids, toff, sids, tgt, tmask, ttids, rows] = out;
  EXPECT((to_vec<int32_t>(cu) == std::vector<int32_t>{0, 6, 9}));
  EXPECT((to_vec<int64_t>(pos) == std::vector<int64_t>{0, 1, 2, 3, 4, 5, 0, 1, 2}));
  EXPECT((to_vec<bool>(lmask) == std::vector<bool>{false, false, true, true, true, false, true, true, false}));
  EXPECT((to_vec<int32_t>(tids) == std::vector<int32_t>{-1, -1, 0, 0, 0, -1, 2, 2, -1}));
  EXPECT((to_vec<int32_t>(toff) == std::vector<int32_t>{0, 1, 3}));
  EXPECT((to_vec<int32_t>(sids) == std::vector<int32_t>{0, 0, 0, 0, 0, 0, 1, 1, 1}));
  EXPECT((to_vec<int64_t>(tgt) == std::vector<int64_t>{11, 12, 13, 14, 15, -100, 17, 18, -100}));
  EXPECT((to_vec<bool>(tmask) == std::vector<bool>{false, true, true, true, false, false, true, false, false}));
  EXPECT((to_vec<int32_t>(ttids) == std::vector<int32_t>{-1, 0, 0, 0, -1, -1, 2, -1, -1}));
  EXPECT((to_vec<int64_t>(rows) == std::vector<int64_t>{1, 2, 3, 6}));
  check_against_per_token_model(batch, in, out, -100);
}

void test_edge_cases() {
  std::mt19937_64 rng(1);
  const std::vector<Batch> cases = {
      Batch{},                                             // empty batch
      Batch{{{}}},                                         // one trajectory without segments
      Batch{{{{1, true}}}},                                // single trained token: no target row
      Batch{{{{1, false}}, {{0, true}}, {{1, true}}}},     // single-token trajectories, an empty turn
      Batch{{{{3, false}, {4, false}}, {{0, false}}}},     // nothing trained
      Batch{{{{0, true}, {0, false}, {5, true}, {0, true}}}},  // zero-length segments around a turn
  };
  for (const Batch& batch : cases) {
    const Inputs in = make_inputs(batch, rng);
    check_against_per_token_model(batch, in, run(in, -7), -7);
  }
}

// Up to 40 trajectories in tasks of 8: with several intra-op threads the fill is split across them.
void test_random_batches(int num_threads) {
  at::set_num_threads(num_threads);
  std::mt19937_64 rng(2);
  std::uniform_int_distribution<int> num_seqs(0, 40), num_segs(0, 9), seg_len(0, 30), coin(0, 1);
  for (int trial = 0; trial < 50; ++trial) {
    Batch batch;
    batch.trajectories.resize(num_seqs(rng));
    for (auto& traj : batch.trajectories) {
      const int n = num_segs(rng);
      for (int s = 0; s < n; ++s) traj.emplace_back(seg_len(rng) * coin(rng) + coin(rng), coin(rng) == 1);
    }
    const Inputs in = make_inputs(batch, rng);
    check_against_per_token_model(batch, in, run(in), -100);
  }
}

// The CUDA kernel runs fill_trajectory with a thread block's threads as lanes: emulate lane counts that do
// not divide the segment lengths (every lane in turn) and compare with the CPU op's one-lane result.
void test_fill_with_many_lanes() {
  std::mt19937_64 rng(5);
  std::uniform_int_distribution<int> num_segs(0, 8), seg_len(0, 40), coin(0, 1);
  Batch batch;
  batch.trajectories.resize(25);
  for (auto& traj : batch.trajectories) {
    const int n = num_segs(rng);
    for (int s = 0; s < n; ++s) traj.emplace_back(seg_len(rng), coin(rng) == 1);
  }
  const Inputs in = make_inputs(batch, rng);
  const auto expected = run(in, -3);
  const auto& cu = std::get<0>(expected);
  const auto& toff = std::get<4>(expected);
  const auto lens = to_vec<int32_t>(in.seg_lens), offs = to_vec<int32_t>(in.seq_seg_offsets);
  const auto ids = to_vec<int64_t>(in.input_ids);
  const auto v_cu = to_vec<int32_t>(cu), v_toff = to_vec<int32_t>(toff);
  const auto trained_t = in.seg_trained.contiguous();
  const bool* trained = trained_t.data_ptr<bool>();
  const int64_t T = in.input_ids.numel();
  const auto e_rows = to_vec<int64_t>(std::get<9>(expected));
  for (int64_t num_lanes : {2, 3, 7, 32, 256}) {
    std::vector<int64_t> pos(T, -9), tgt(T, -9), rows(in.num_target_rows, -9);
    std::vector<int32_t> tids(T, -9), sids(T, -9), ttids(T, -9);
    std::vector<uint8_t> lmask(T, 9), tmask(T, 9);
    const bao_fast::PackPointers out{pos.data(),
                                     reinterpret_cast<bool*>(lmask.data()),
                                     tids.data(),
                                     sids.data(),
                                     tgt.data(),
                                     reinterpret_cast<bool*>(tmask.data()),
                                     ttids.data(),
                                     rows.data()};
    for (size_t b = 0; b + 1 < offs.size(); ++b) {
      // First target row of trajectory b = number of expected rows before its first token.
      const int64_t row = std::lower_bound(e_rows.begin(), e_rows.end(), v_cu[b]) - e_rows.begin();
      const bao_fast::TrajectoryStart start{v_cu[b], v_toff[b], row};
      for (int64_t lane = num_lanes - 1; lane >= 0; --lane) {
        bao_fast::fill_trajectory(static_cast<int64_t>(b), offs[b], offs[b + 1], lens.data(), trained, ids.data(),
                                  start, v_cu[b + 1], -3, out, lane, num_lanes);
      }
    }
    EXPECT(pos == to_vec<int64_t>(std::get<1>(expected)));
    EXPECT(tids == to_vec<int32_t>(std::get<3>(expected)));
    EXPECT(sids == to_vec<int32_t>(std::get<5>(expected)));
    EXPECT(tgt == to_vec<int64_t>(std::get<6>(expected)));
    EXPECT(ttids == to_vec<int32_t>(std::get<8>(expected)));
    EXPECT(rows == e_rows);
    const auto e_lmask = to_vec<bool>(std::get<2>(expected)), e_tmask = to_vec<bool>(std::get<7>(expected));
    int bad = 0;
    for (int64_t t = 0; t < T; ++t) bad += lmask[t] != e_lmask[t] || tmask[t] != e_tmask[t];
    EXPECT(bad == 0);
  }
}

void test_dispatcher_registration() {
  std::mt19937_64 rng(3);
  const Batch batch{{{{4, false}, {6, true}}, {{2, true}, {3, false}, {1, true}}}};
  const Inputs in = make_inputs(batch, rng);
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("bao_fast::pack_multiturn", "")
                      .typed<bao_fast::PackOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, c10::SymInt, c10::SymInt, int64_t)>();
  const auto out = op.call(in.seg_lens, in.seg_trained, in.seq_seg_offsets, in.input_ids, in.num_turns,
                           in.num_target_rows, -100);
  check_against_per_token_model(batch, in, out, -100);
}

template <typename Fn>
void expect_error(Fn&& fn, const std::string& needle) {
  try {
    fn();
    ++g_failures;
    std::cerr << "expected an error mentioning '" << needle << "', got none\n";
  } catch (const c10::Error& e) {
    if (std::string(e.what()).find(needle) == std::string::npos) {
      ++g_failures;
      std::cerr << "error does not mention '" << needle << "': " << e.what_without_backtrace() << "\n";
    }
  }
}

void test_validation() {
  std::mt19937_64 rng(4);
  const Batch batch{{{{2, false}, {3, true}}, {{1, true}}}};
  const Inputs good = make_inputs(batch, rng);
  Inputs in = good;
  in.seg_lens = good.seg_lens.clone();
  in.seg_lens[0] = -1;
  in.input_ids = good.input_ids.narrow(0, 0, 3);
  expect_error([&] { run(in); }, "seg_lens must be >= 0");
  in = good;
  in.seq_seg_offsets = at::tensor({0, 2, 1, 3}, at::kInt);
  expect_error([&] { run(in); }, "non-decreasing");
  in = good;
  in.input_ids = good.input_ids.narrow(0, 0, 5);
  expect_error([&] { run(in); }, "sum(seg_lens)");
  in = good;
  in.num_turns = 1;
  expect_error([&] { run(in); }, "num_turns");
  in = good;
  in.num_target_rows = 4;
  expect_error([&] { run(in); }, "num_target_rows");
  in = good;
  in.seg_lens = good.seg_lens.to(at::kLong);
  expect_error([&] { run(in); }, "seg_lens must be int32");
  in = good;
  in.seg_trained = good.seg_trained.narrow(0, 0, 2);
  expect_error([&] { run(in); }, "seg_trained has 2 entries");
}

}  // namespace

int main() {
  test_hand_derived();
  test_edge_cases();
  for (int num_threads : {1, 2, 5}) test_random_batches(num_threads);
  test_fill_with_many_lanes();
  test_dispatcher_registration();
  test_validation();
  if (g_failures) {
    std::cerr << g_failures << " check(s) failed\n";
  } else {
    std::cout << "test_pack_multiturn: all checks passed\n";
  }
  return g_failures == 0 ? 0 : 1;
}
