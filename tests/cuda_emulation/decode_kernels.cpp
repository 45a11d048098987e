// Runs the decode kernels of csrc/cuda/sgmv.cu (bgmv_shrink_kernel, bgmv_expand_kernel; extracted verbatim into
// extracted.h by tests/test_cuda_emulation.py) on the CPU over whole launches, with the launchers' path, split and
// grid choices (the split and path functions are the extracted ones; the grids are restated here), against a float64
// reference on integer-valued data: exact in fp32, so a dropped, doubled or misplaced product changes the result.
// Heterogeneous ranks with NaN past each (and in t past each token's rank), -1 tokens, rows padded past K and R,
// a rank that ends inside a 16-byte chunk and one whose row ends inside one, more slots than a block has threads.
// Prints "N cases, F failures"; exits 1 on a failure. `quick`: one distribution and SM count.
#include "emu.h"

namespace lora_kernels {
namespace {
#include "extracted.h"
}
}  // namespace lora_kernels
using namespace lora_kernels;

#include "sgmv_harness.h"

// row_pad: elements past K in the rows of x and A (rounded up to the vector width: the decode kernels need rows of
// whole 16-byte loads) and past R in B's rank rows (as given: the last chunk of a rank row may end past R).
template <typename T>
void run_case(int M, int L, int K, int R, int row_pad, const std::string& dist, int sms, uint32_t seed) {
  g_sm_count = sms;
  constexpr int kVec = 16 / sizeof(T);
  const int64_t shrink_ld = K + (row_pad + kVec - 1) / kVec * kVec;
  GroupedCase<T, T> batch(M, L, K, R, shrink_ld, R + row_pad, 1100 + row_pad, dist, seed);  // N: 2 blocks and a part

  std::vector<float> partials;
  const KSplit split = decode_k_split(M, K, kVec, 0);
  SgmvArgs args = batch.shrink_args(partials, split.splits, split.k_per_split);
  EXPECT(shrink_rows_of_16_bytes(args), "shrink rows not whole 16-byte loads (K=%d pad=%d)", K, row_pad);
  EXPECT(decode_path(M, L), "not a decode shape M=%d L=%d", M, L);
  EXPECT(split.k_per_split % (32 * kVec) == 0 && split.k_per_split <= 32 * kVec * kDecodeChunks &&
         (split.splits - 1) * split.k_per_split < K && split.splits * split.k_per_split >= K,
         "splits of %lld cover K", (long long)split.k_per_split);
  emulate_launch(bgmv_shrink_kernel<T>, args, M, split.splits, 1, kDecodeThreads);
  batch.check_shrink(partials, split.splits);

  SgmvArgs expand = batch.expand_args();
  EXPECT(expand_rows_of_16_bytes(expand), "expand rows not whole 16-byte loads");
  emulate_launch(bgmv_expand_kernel<T>, expand, M, ceil_div(batch.N, kDecodeExpandCols), 1, kDecodeThreads);
  batch.check_expand();
}

int main(int argc, char** argv) {
  const CaseGrid grid = case_grid(argc, argv, {"distinct", "mixed_base", "two", "all_base"});
  int cases = 0;
  for (const std::string& dist : grid.dists) {
    for (int sms : grid.sm_counts) {
      run_case<c10::BFloat16>(9, 6, 1000, 16, 0, dist, sms, 1 + cases++);
      run_case<c10::Half>(5, 3, 4104, 20, 4, dist, sms, 1 + cases++);      // R 20 in rows of 24: a partial chunk
      run_case<float>(12, 5, 68, 8, 0, dist, sms, 1 + cases++);
      run_case<c10::BFloat16>(1, 1, 64, 64, 8, dist, sms, 1 + cases++);
      // rank rows of 3 in strides of 8; the last slot's rank 3 (its warp of rows 2 and 3 ends at A's end)
      run_case<c10::BFloat16>(40, 13, 256, 3, 5, dist, sms, 1 + cases++);
      run_case<c10::Half>(70, 300, 64, 8, 0, dist, sms, 1 + cases++);       // more slots than threads
    }
  }
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures != 0;
}
