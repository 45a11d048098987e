// Runs the CUDA-core kernel of the grouped ops (csrc/cuda/sgmv.cu: sgmv_kernel, the shrink and the expand; extracted
// verbatim into extracted.h by tests/test_cuda_emulation.py) on the CPU over whole launches of a prefill batch, with
// the launchers' split choice (the extracted shrink_k_split, counted in sgmv_kernel's 8-warp blocks) and grids
// (restated here), against a float64 reference on integer-valued data (exact, so a dropped, doubled or misplaced
// product changes the result). The cases are the batches the launchers give this kernel on an sm_80+ GPU: a float32
// shrink; a 16-bit shrink whose rows 16-byte loads cannot read whole (K or the row stride not a multiple of 8); a
// float64 shrink with float64 partials; a float32 or float64 lora_b's expand into float32, 16-bit or float64 outputs.
// Heterogeneous ranks with NaN past each, -1 tokens, two column tiles of rank, partial token and column tiles, K
// splits with a short last one; and the grouped shrink's K-splits (prefill and decode) over a sweep of shapes. Prints
// "N cases, F failures"; exits 1 on a failure. `quick`: one distribution and SM count.
#include "emu.h"

namespace lora_kernels {
namespace {
#include "extracted.h"
}
}  // namespace lora_kernels
using namespace lora_kernels;

#include "sgmv_harness.h"

// row_pad: elements past K in the rows of x and A; b_pad: past R in the rows of B. Out: the expand's output dtype.
// Acc: sgmv_kernel's accumulation type (float64 where any operand is, as launch_sgmv picks).
template <typename T, typename Out>
void run_case(int M, int L, int K, int R, int row_pad, int b_pad, const std::string& dist, int sms, uint32_t seed) {
  using Acc = std::conditional_t<std::is_same_v<T, double> || std::is_same_v<Out, double>, double, float>;
  g_sm_count = sms;
  GroupedCase<T, Out> batch(M, L, K, R, K + row_pad, R + b_pad, 150, dist, seed);  // N: 4 column tiles, a part
  EXPECT(!decode_path(M, L), "a decode shape M=%d L=%d", M, L);

  std::vector<Acc> partials;
  const KSplit split = shrink_k_split(M, L, R, K, kThreads / 32, 0);
  SgmvArgs args = batch.shrink_args(partials, split.splits, split.k_per_split);
  // the launcher's tensor-core condition, false here: float32 or float64 x, or rows not whole 16-byte loads
  EXPECT(!shrink_rows_of_16_bytes(args) || args.x_dtype == kF32 || args.x_dtype == kF64,
         "a tensor-core shrink (K=%d pad=%d)", K, row_pad);
  args.col_tiles = ceil_div(R, kTileCols);
  emulate_launch(sgmv_kernel<true, Acc>, args, split.splits * args.col_tiles, ceil_div(M, kTileTokens), L, kThreads);
  batch.check_shrink(partials, split.splits);

  SgmvArgs expand = batch.expand_args();
  expand.col_tiles = ceil_div(batch.N, kTileCols);
  emulate_launch(sgmv_kernel<false, Acc>, expand, expand.col_tiles, ceil_div(M, kTileTokens), L, kThreads);
  batch.check_expand();
}

// shrink_k_split and decode_k_split over a sweep of shapes and SM counts, without launching: splits that cover K in
// whole tiles (decode: whole chunks of 32 lanes' 16-byte loads), none empty, within their bounds and the shrink's
// partial budget. Counted as one case.
void check_splits() {
  for (int sms : {1, 4, 132}) {
    g_sm_count = sms;
    for (int64_t k : {int64_t(0), int64_t(1), int64_t(31), int64_t(33), int64_t(4096), int64_t(4100), int64_t(14336),
                      int64_t(1) << 26}) {
      for (int64_t tokens : {1, 7, 64, 65, 4096, 100000}) {
        for (int64_t slots : {1, 16}) {
          for (int64_t rank : {1, 16, 64}) {
            for (int64_t warps : {int64_t(kSgmvMmaWarps), int64_t(kThreads / 32)}) {
              const KSplit s = shrink_k_split(tokens, slots, rank, k, warps, 0);
              const int64_t budget = std::max(tokens * k / 2, kMinShrinkPartials);
              EXPECT(split_covers(k, s.splits, s.k_per_split, kTileK, kMaxShrinkSplits) &&
                     (s.splits == 1 || s.splits * tokens * rank <= budget),
                     "shrink_k_split tokens=%lld slots=%lld rank=%lld k=%lld warps=%lld sms=%d: %lld x %lld",
                     (long long)tokens, (long long)slots, (long long)rank, (long long)k, (long long)warps, sms,
                     (long long)s.splits, (long long)s.k_per_split);
            }
          }
        }
        for (int64_t vec : {4, 8}) {
          const KSplit s = decode_k_split(tokens, k, vec, 0);
          const int64_t fewest = ceil_div(k, 32 * vec * kDecodeChunks);  // x held in registers
          EXPECT(split_covers(k, s.splits, s.k_per_split, 32 * vec, std::max(kMaxShrinkSplits, fewest)),
                 "decode_k_split tokens=%lld k=%lld vec=%lld sms=%d: %lld x %lld", (long long)tokens, (long long)k,
                 (long long)vec, sms, (long long)s.splits, (long long)s.k_per_split);
        }
      }
    }
  }
}

int main(int argc, char** argv) {
  const CaseGrid grid = case_grid(argc, argv, {"distinct", "mixed_base", "two"});
  int cases = 0;
  for (const std::string& dist : grid.dists) {
    for (int sms : grid.sm_counts) {
      run_case<float, float>(150, 6, 72, 16, 0, 0, dist, sms, 1 + cases++);
      run_case<float, c10::BFloat16>(100, 3, 1000, 64, 4, 3, dist, sms, 1 + cases++);  // two column tiles of rank
      run_case<c10::Half, c10::Half>(70, 2, 261, 20, 0, 1, dist, sms, 1 + cases++);     // K not a multiple of 8
      run_case<c10::BFloat16, float>(90, 4, 264, 9, 3, 0, dist, sms, 1 + cases++);      // rows of 267 elements
      run_case<double, double>(70, 3, 300, 40, 1, 2, dist, sms, 1 + cases++);
    }
  }
  check_splits();
  ++cases;
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures != 0;
}
