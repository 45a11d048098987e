// Runs lora_bwd_dy's kernels (csrc/cuda/lora_linear.cu: the tensor-core lora_bwd_dy_mma_kernel over bwd_dy_mma_grid's
// grid, and the CUDA-core lora_bwd_dy_kernel over bwd_dy_grid's, both extracted verbatim into extracted.h by
// tests/test_cuda_emulation.py) on the CPU over whole launches, their block partials summed as the launcher sums them,
// against a float64 reference on integer-valued data: exact, so a dropped, doubled or misplaced product changes dB or
// dS. Tensor cores: M within one block's rows and over several, N within one 64-column piece and over several blocks
// of pieces, partial last pieces and strips, r = 1 to 32 (one and two rank tiles), padded dy rows, S in either layout,
// grids of one to many column blocks (the SM count varied). CUDA cores (the launcher's path for float32, r past 32,
// and dy rows that 16-byte loads cannot read whole): both tiles (r <= 32 and past), partial tiles, dy, S and B in
// either layout, several row and column blocks; and both kernels' grids over a sweep of shapes (every row and column
// owned once, whole tiles, the partial budget kept). Prints "N cases, F failures"; exits 1 on a failure. `quick`: one
// case of each tensor-core rank-tile variant, one of several pieces per column block and one of the CUDA-core kernel.
#include "emu.h"

namespace lora_kernels {
namespace {
#include "extracted.h"
}
}  // namespace lora_kernels
using namespace lora_kernels;

#include "harness.h"

// dy [M, N] at strides (dy_sm, dy_sn), S [M, r] fp32 at (s_sm, s_sr), B [N, r] at (b_sn, b_sr), integer-valued;
// dy in storage aligned to 16 bytes.
template <typename T>
struct BwdCase {
  int64_t M, N;
  int r;
  int64_t dy_sm, dy_sn, s_sm, s_sr, b_sn, b_sr;
  std::vector<T> dy_storage, b;
  std::vector<float> s;
  T* dy;

  BwdCase(int64_t M_, int64_t N_, int r_, int64_t dy_sm_, int64_t dy_sn_, bool s_column_major, bool b_column_major,
          uint32_t seed)
      : M(M_), N(N_), r(r_), dy_sm(dy_sm_), dy_sn(dy_sn_), s_sm(s_column_major ? 1 : r_),
        s_sr(s_column_major ? M_ : 1), b_sn(b_column_major ? 1 : r_), b_sr(b_column_major ? N_ : 1) {
    std::mt19937 rng(seed);
    auto ival = [&](int bound) { return float(int(rng() % (2 * bound + 1)) - bound); };
    const int64_t span = (M - 1) * dy_sm + (N - 1) * dy_sn + 1;
    dy = aligned16_in(dy_storage, size_t(span));
    for (int64_t i = 0; i < span; ++i) dy[i] = T(ival(3));
    s.resize(size_t(M) * r);
    for (auto& v : s) v = ival(4);
    b.resize(size_t(N) * r);
    for (auto& v : b) v = T(ival(3));
  }

  float dy_at(int64_t m, int64_t n) const { return float(dy[m * dy_sm + n * dy_sn]); }
  float b_at(int64_t n, int j) const { return float(b[n * b_sn + j * b_sr]); }

  // The partials [row_blocks, N, r] and [col_blocks, M, r] summed in block order (the launcher's sum(0)).
  void check(const char* kernel, float scaling, const std::vector<float>& db_partials, int64_t row_blocks,
             const std::vector<float>& ds_partials, int64_t col_blocks) const {
    for (int64_t n = 0; n < N; ++n) {
      for (int j = 0; j < r; ++j) {
        double want = 0.0;
        for (int64_t m = 0; m < M; ++m) want += double(dy_at(m, n)) * s[m * s_sm + j * s_sr];
        float got = 0.f;
        for (int64_t blk = 0; blk < row_blocks; ++blk) got += db_partials[(blk * N + n) * r + j];
        EXPECT(double(got) == scaling * want, "%s dB M=%lld N=%lld r=%d n=%lld j=%d: %g vs %g", kernel, (long long)M,
               (long long)N, r, (long long)n, j, got, scaling * want);
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      for (int j = 0; j < r; ++j) {
        double want = 0.0;
        for (int64_t n = 0; n < N; ++n) want += double(dy_at(m, n)) * double(b_at(n, j));
        float got = 0.f;
        for (int64_t blk = 0; blk < col_blocks; ++blk) got += ds_partials[(blk * M + m) * r + j];
        EXPECT(double(got) == scaling * want, "%s dS M=%lld N=%lld r=%d m=%lld j=%d: %g vs %g", kernel, (long long)M,
               (long long)N, r, (long long)m, j, got, scaling * want);
      }
    }
  }
};

// The tensor-core kernel: dy's rows of N + row_pad elements, bt = Bᵀ contiguous (the launcher's
// lora_b.t().contiguous()).
template <typename T>
void run_mma_case(int64_t M, int64_t N, int r, int64_t row_pad, bool s_column_major, int sms, uint32_t seed) {
  g_sm_count = sms;
  const BwdCase<T> c(M, N, r, N + row_pad, 1, s_column_major, false, seed);
  std::vector<T> bt_storage;
  T* bt = aligned16_in(bt_storage, size_t(r) * N);
  for (int64_t n = 0; n < N; ++n) for (int j = 0; j < r; ++j) bt[j * N + n] = T(c.b_at(n, j));

  const BwdDyMmaGrid grid = bwd_dy_mma_grid(M, N, r, 0);
  // at::empty: garbage until written, so an element no block writes shows up as NaN in the sums
  std::vector<float> db_partials(size_t(grid.row_blocks) * N * r, std::nanf(""));
  std::vector<float> ds_partials(size_t(grid.col_blocks) * M * r, std::nanf(""));
  const float scaling = 0.5f;
  emulate_launch([&](int) {
    if (r <= 16) {
      lora_bwd_dy_mma_kernel<T, 1>(c.dy, c.dy_sm, c.s.data(), c.s_sm, c.s_sr, bt, M, N, r, scaling,
                                   grid.cols_per_block, db_partials.data(), ds_partials.data());
    } else {
      lora_bwd_dy_mma_kernel<T, 2>(c.dy, c.dy_sm, c.s.data(), c.s_sm, c.s_sr, bt, M, N, r, scaling,
                                   grid.cols_per_block, db_partials.data(), ds_partials.data());
    }
  }, 0, grid.col_blocks, grid.row_blocks, 1, kBwdMmaWarps * 32);
  c.check("mma", scaling, db_partials, grid.row_blocks, ds_partials, grid.col_blocks);
}

// The CUDA-core kernel: dy row-major with rows of N + row_pad elements, or column-major.
template <typename T>
void run_cuda_core_case(int64_t M, int64_t N, int r, int64_t row_pad, bool dy_column_major, bool s_column_major,
                        bool b_column_major, int sms, uint32_t seed) {
  g_sm_count = sms;
  const BwdCase<T> c(M, N, r, dy_column_major ? 1 : N + row_pad, dy_column_major ? M : 1, s_column_major,
                     b_column_major, seed);
  const BwdDyGrid grid = bwd_dy_grid(M, N, r, 0);
  EXPECT(size_t(grid.tile * (grid.tile + 1) + 2 * grid.tile * r) <= 16 * 1024, "shared memory past emu.h's buffer");
  std::vector<float> db_partials(size_t(grid.row_blocks) * N * r, std::nanf(""));
  std::vector<float> ds_partials(size_t(grid.col_blocks) * M * r, std::nanf(""));
  const float scaling = 0.25f;
  emulate_launch([&](int) {
    lora_bwd_dy_kernel<T>(c.dy, c.dy_sm, c.dy_sn, c.s.data(), c.s_sm, c.s_sr, c.b.data(), c.b_sn, c.b_sr, M, N, r,
                          scaling, grid.tile, grid.rows_per_block, grid.cols_per_block, db_partials.data(),
                          ds_partials.data());
  }, 0, grid.col_blocks, grid.row_blocks, 1, kBwdThreads);
  c.check("cuda-core", scaling, db_partials, grid.row_blocks, ds_partials, grid.col_blocks);
}

// Both kernels' grids without launching, over a sweep of shapes and SM counts: blocks of whole tiles (pieces) that
// own every row and column once; bwd_dy_grid's within the tile's work items and kBlocksPerSm blocks per SM; the
// partials within the budget unless the side that the budget shrinks is one block already.
void check_grids() {
  for (int64_t M : {1, 63, 64, 65, 1000, 8192, 100000}) {
    for (int64_t N : {1, 64, 200, 4096, 16384}) {
      for (int64_t r : {1, 16, 32, 33, 64}) {
        for (int sms : {1, 4, 132}) {
          g_sm_count = sms;
          const BwdDyGrid g = bwd_dy_grid(M, N, r, 0);
          const int64_t budget = std::max<int64_t>(M * N / 2, int64_t(1) << 20);
          const bool ok = g.tile * r <= kBwdThreads * kBwdItems && g.rows_per_block % g.tile == 0 &&
                          g.cols_per_block % g.tile == 0 && g.row_blocks * g.rows_per_block >= M &&
                          (g.row_blocks - 1) * g.rows_per_block < M && g.col_blocks * g.cols_per_block >= N &&
                          (g.col_blocks - 1) * g.cols_per_block < N &&
                          g.row_blocks * g.col_blocks <= int64_t(kBlocksPerSm) * sms &&
                          (r * (g.row_blocks * N + g.col_blocks * M) <= budget ||
                           (g.row_blocks == 1 && g.col_blocks == 1));
          EXPECT(ok, "bwd_dy_grid M=%lld N=%lld r=%lld sms=%d: tile %d, %lld x %lld rows, %lld x %lld cols",
                 (long long)M, (long long)N, (long long)r, sms, g.tile, (long long)g.row_blocks,
                 (long long)g.rows_per_block, (long long)g.col_blocks, (long long)g.cols_per_block);
          if (r > kBwdMmaMaxRank) continue;
          const BwdDyMmaGrid mma = bwd_dy_mma_grid(M, N, r, 0);
          const bool mma_ok =
              mma.row_blocks == ceil_div(M, bwd_mma_rows_per_block(r <= 16 ? 1 : 2)) &&
              split_covers(N, mma.col_blocks, mma.cols_per_block, kBwdMmaCols, ceil_div(N, kBwdMmaCols)) &&
              (mma.col_blocks == 1 || r * (mma.row_blocks * N + mma.col_blocks * M) <= budget);
          EXPECT(mma_ok, "bwd_dy_mma_grid M=%lld N=%lld r=%lld sms=%d: %lld row blocks, %lld x %lld cols",
                 (long long)M, (long long)N, (long long)r, sms, (long long)mma.row_blocks, (long long)mma.col_blocks,
                 (long long)mma.cols_per_block);
        }
      }
    }
  }
}

int main(int argc, char** argv) {
  int cases = 0;
  if (argc > 1 && std::string(argv[1]) == "quick") {
    run_mma_case<c10::BFloat16>(77, 200, 16, 0, false, 2, 1 + cases++);
    run_mma_case<c10::Half>(40, 72, 20, 8, false, 2, 1 + cases++);
    run_mma_case<c10::BFloat16>(16, 2048, 16, 0, false, 4, 1 + cases++);  // db_sum reused by the next piece
    run_cuda_core_case<float>(130, 150, 8, 3, false, false, false, 2, 1 + cases++);
    std::printf("%d cases, %d failures\n", cases, failures);
    return failures != 0;
  }
  run_mma_case<c10::BFloat16>(1, 64, 16, 0, false, 4, 1 + cases++);     // one row, one piece
  run_mma_case<c10::BFloat16>(77, 200, 8, 0, false, 4, 1 + cases++);    // partial strip and piece, several blocks
  run_mma_case<c10::BFloat16>(300, 136, 16, 8, true, 1, 1 + cases++);   // two row blocks, padded rows, S transposed
  run_mma_case<c10::BFloat16>(33, 40, 1, 0, false, 16, 1 + cases++);    // r = 1, N < one chunk
  run_mma_case<c10::BFloat16>(16, 2048, 16, 0, false, 4, 1 + cases++);  // several pieces per column block
  run_mma_case<c10::Half>(130, 72, 20, 8, false, 4, 1 + cases++);       // two rank tiles: r past 16
  run_mma_case<c10::Half>(260, 520, 32, 0, true, 2, 1 + cases++);       // r = 32, three row blocks of 128
  run_mma_case<c10::Half>(5, 8, 17, 0, false, 1, 1 + cases++);          // N = 8: one 16-byte chunk
  run_cuda_core_case<float>(1, 1, 1, 0, false, false, false, 4, 1 + cases++);          // one element
  run_cuda_core_case<float>(130, 150, 8, 3, false, false, false, 2, 1 + cases++);      // partial tiles, 2 x 2 blocks
  run_cuda_core_case<float>(200, 70, 64, 0, false, true, true, 4, 1 + cases++);        // r = 64: 32-wide tiles
  run_cuda_core_case<c10::Half>(100, 77, 40, 0, true, false, false, 3, 1 + cases++);   // dy column-major, r past 32
  run_cuda_core_case<c10::BFloat16>(70, 300, 5, 1, false, true, true, 8, 1 + cases++); // odd rows, many col blocks
  run_cuda_core_case<float>(300, 40, 33, 0, false, false, true, 1, 1 + cases++);       // one block: several tiles
  check_grids();
  ++cases;
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures != 0;
}
