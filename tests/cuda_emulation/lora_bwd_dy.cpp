// Runs lora_bwd_dy's tensor-core kernel (csrc/cuda/lora_linear.cu: lora_bwd_dy_mma_kernel over bwd_dy_mma_grid's
// grid, extracted verbatim into extracted.h by tests/test_cuda_emulation.py) on the CPU over whole launches, its
// block partials summed as the launcher sums them, against a float64 reference on integer-valued data: exact, so a
// dropped, doubled or misplaced product changes dB or dS. M within one block's rows and over several, N within one
// 64-column piece and over several blocks of pieces, partial last pieces and strips, r = 1 to 32 (one and two rank
// tiles), padded dy rows, S in either layout, and grids of one to many column blocks (the SM count varied).
// Prints "N cases, F failures"; exits 1 on a failure. `quick`: one case of each rank-tile variant.
#include "emu.h"

namespace lora_kernels {
namespace {
#include "extracted.h"
}
}  // namespace lora_kernels
using namespace lora_kernels;

#include "harness.h"

// dy [M, N] with rows of N + row_pad elements, S [M, r] fp32 (column-major when s_column_major), B [N, r].
template <typename T>
void run_case(int64_t M, int64_t N, int r, int64_t row_pad, bool s_column_major, int sms, uint32_t seed) {
  g_sm_count = sms;
  std::mt19937 rng(seed);
  auto ival = [&](int bound) { return float(int(rng() % (2 * bound + 1)) - bound); };
  const int64_t ld = N + row_pad;
  std::vector<T> dy_storage, bt_storage;
  T* dy = aligned16_in(dy_storage, size_t(M) * ld);
  for (int64_t i = 0; i < M * ld; ++i) dy[i] = T(ival(3));
  std::vector<float> s(size_t(M) * r);
  for (auto& v : s) v = ival(4);
  const int64_t s_sm = s_column_major ? 1 : r, s_sr = s_column_major ? M : 1;
  std::vector<T> b(size_t(N) * r);
  for (auto& v : b) v = T(ival(3));
  T* bt = aligned16_in(bt_storage, size_t(r) * N);  // the launcher's lora_b.t().contiguous()
  for (int64_t n = 0; n < N; ++n) for (int j = 0; j < r; ++j) bt[j * N + n] = b[n * r + j];

  const BwdDyMmaGrid grid = bwd_dy_mma_grid(M, N, r, 0);
  // at::empty: garbage until written, so an element no block writes shows up as NaN in the sums
  std::vector<float> db_partials(size_t(grid.row_blocks) * N * r, std::nanf(""));
  std::vector<float> ds_partials(size_t(grid.col_blocks) * M * r, std::nanf(""));
  const float scaling = 0.5f;
  emulate_launch([&](int) {
    if (r <= 16) {
      lora_bwd_dy_mma_kernel<T, 1>(dy, ld, s.data(), s_sm, s_sr, bt, M, N, r, scaling, grid.cols_per_block,
                                   db_partials.data(), ds_partials.data());
    } else {
      lora_bwd_dy_mma_kernel<T, 2>(dy, ld, s.data(), s_sm, s_sr, bt, M, N, r, scaling, grid.cols_per_block,
                                   db_partials.data(), ds_partials.data());
    }
  }, 0, grid.col_blocks, grid.row_blocks, 1, kBwdMmaWarps * 32);

  for (int64_t n = 0; n < N; ++n) {
    for (int j = 0; j < r; ++j) {
      double want = 0.0;
      for (int64_t m = 0; m < M; ++m) want += double(float(dy[m * ld + n])) * s[m * s_sm + j * s_sr];
      float got = 0.f;
      for (int64_t blk = 0; blk < grid.row_blocks; ++blk) got += db_partials[(blk * N + n) * r + j];
      EXPECT(double(got) == scaling * want, "dB M=%lld N=%lld r=%d n=%lld j=%d: %g vs %g", (long long)M,
             (long long)N, r, (long long)n, j, got, scaling * want);
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int j = 0; j < r; ++j) {
      double want = 0.0;
      for (int64_t n = 0; n < N; ++n) want += double(float(dy[m * ld + n])) * double(float(b[n * r + j]));
      float got = 0.f;
      for (int64_t blk = 0; blk < grid.col_blocks; ++blk) got += ds_partials[(blk * M + m) * r + j];
      EXPECT(double(got) == scaling * want, "dS M=%lld N=%lld r=%d m=%lld j=%d: %g vs %g", (long long)M,
             (long long)N, r, (long long)m, j, got, scaling * want);
    }
  }
}

int main(int argc, char** argv) {
  int cases = 0;
  if (argc > 1 && std::string(argv[1]) == "quick") {
    run_case<c10::BFloat16>(77, 200, 16, 0, false, 2, 1 + cases++);
    run_case<c10::Half>(40, 72, 20, 8, false, 2, 1 + cases++);
    std::printf("%d cases, %d failures\n", cases, failures);
    return failures != 0;
  }
  run_case<c10::BFloat16>(1, 64, 16, 0, false, 4, 1 + cases++);     // one row, one piece
  run_case<c10::BFloat16>(77, 200, 8, 0, false, 4, 1 + cases++);    // partial strip and piece, several blocks
  run_case<c10::BFloat16>(300, 136, 16, 8, true, 1, 1 + cases++);   // two row blocks, padded rows, S transposed
  run_case<c10::BFloat16>(33, 40, 1, 0, false, 16, 1 + cases++);    // r = 1, N < one chunk
  run_case<c10::BFloat16>(16, 2048, 16, 0, false, 4, 1 + cases++);  // several pieces per column block
  run_case<c10::Half>(130, 72, 20, 8, false, 4, 1 + cases++);       // two rank tiles: r past 16
  run_case<c10::Half>(260, 520, 32, 0, true, 2, 1 + cases++);       // r = 32, three row blocks of 128
  run_case<c10::Half>(5, 8, 17, 0, false, 1, 1 + cases++);          // N = 8: one 16-byte chunk
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures != 0;
}
