// Runs the tensor-core kernels of the grouped ops (csrc/cuda/sgmv.cu: sgmv_shrink_mma_kernel, sgmv_expand_mma_kernel;
// extracted verbatim, with tensor_core.h's loads and fragment helpers, into extracted.h by
// tests/test_cuda_emulation.py) on the CPU over whole launches of a prefill batch, the MMAs computed from the PTX
// fragment layouts as emu.h states them, with the launchers' split choice (the extracted shrink_k_split) and grids
// (restated here), against a float64 reference on integer-valued data (exact, so a dropped, doubled or misplaced
// product changes the result). Heterogeneous ranks with NaN past each, -1 tokens, rows padded past K, two column
// tiles of rank, partial token tiles, K splits with a short last one, fp32 and 16-bit outputs of the expand.
// Prints "N cases, F failures"; exits 1 on a failure. `quick`: one distribution and SM count.
#include "emu.h"

namespace lora_kernels {
namespace {
#include "extracted.h"
}
}  // namespace lora_kernels
using namespace lora_kernels;

#include "sgmv_harness.h"

// row_pad: elements past K in the rows of x and A (a multiple of 8). Out: the expand's output dtype.
// aligned_out: out's rows and slice start 16-byte aligned, so the expand adds through its staged 16-byte epilogue
// (N = 300: its last 4 columns, short of 8, element by element).
template <typename T, typename Out>
void run_case(int M, int L, int K, int R, int row_pad, const std::string& dist, int sms, uint32_t seed,
              bool aligned_out = false) {
  g_sm_count = sms;
  const int threads = kSgmvMmaWarps * 32;
  GroupedCase<T, Out> batch(M, L, K, R, K + row_pad, R, 300, dist, seed, aligned_out);  // N: 2 blocks of 128, a part
  EXPECT(!aligned_out || reinterpret_cast<uintptr_t>(batch.out.data()) % 16 == 0, "out not 16-byte aligned");

  std::vector<float> partials;
  const KSplit split = shrink_k_split(M, L, R, K, kSgmvMmaWarps, 0);
  SgmvArgs args = batch.shrink_args(partials, split.splits, split.k_per_split);
  EXPECT(shrink_rows_of_16_bytes(args), "shrink rows not whole 16-byte loads (K=%d pad=%d)", K, row_pad);
  EXPECT(!decode_path(M, L), "a decode shape M=%d L=%d", M, L);
  EXPECT(split.k_per_split % kTileK == 0 && (split.splits - 1) * split.k_per_split < K &&
         split.splits * split.k_per_split >= K, "splits of %lld cover K", (long long)split.k_per_split);
  args.col_tiles = ceil_div(R, kTileCols);
  emulate_launch(sgmv_shrink_mma_kernel<T>, args, split.splits * args.col_tiles, ceil_div(M, kTileTokens), L, threads);
  batch.check_shrink(partials, split.splits);

  SgmvArgs expand = batch.expand_args();
  expand.col_tiles = ceil_div(batch.N, kExpandCols);
  emulate_launch(sgmv_expand_mma_kernel<T>, expand, expand.col_tiles, ceil_div(M, kTileTokens), L, threads);
  batch.check_expand();
}

int main(int argc, char** argv) {
  const CaseGrid grid = case_grid(argc, argv, {"distinct", "mixed_base", "two"});
  int cases = 0;
  for (const std::string& dist : grid.dists) {
    for (int sms : grid.sm_counts) {
      run_case<c10::BFloat16, float>(150, 6, 72, 16, 8, dist, sms, 1 + cases++);
      run_case<c10::Half, c10::Half>(100, 3, 1000, 64, 0, dist, sms, 1 + cases++);  // two column tiles of rank
      run_case<c10::BFloat16, c10::BFloat16>(70, 2, 264, 20, 0, dist, sms, 1 + cases++);
      run_case<c10::BFloat16, c10::BFloat16>(150, 6, 72, 16, 8, dist, sms, 1 + cases++, true);
      run_case<c10::Half, c10::Half>(70, 3, 264, 20, 0, dist, sms, 1 + cases++, true);
      run_case<c10::BFloat16, float>(100, 3, 1000, 64, 0, dist, sms, 1 + cases++, true);
    }
  }
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures != 0;
}
