// Runs the grouped kernels of csrc/cuda/sgmv.cu (the decode, tensor-core and CUDA-core shrinks and expands; extracted
// verbatim into extracted.h by tests/test_cuda_emulation.py) on metadata that is out of range where the kernels'
// clamps make it mean the same as a valid batch's (sgmv.cu's header: ranks clamped to [0, R], slot ranges to [0, M)):
// a rank past R and one below 0, and the last slot's count running past M into a sorted_token_ids buffer that holds
// valid token ids beyond its M entries. Each kernel's result must be the valid batch's, bit for bit. Prints
// "N cases, F failures"; exits 1 on a failure.
#include "emu.h"

namespace lora_kernels {
namespace {
#include "extracted.h"
}
}  // namespace lora_kernels
using namespace lora_kernels;

#include "sgmv_harness.h"

struct BadMetadata {
  std::vector<int32_t> sorted, counts, ranks;
  // batch.meta with the last slot's count 40 past M (the buffer holds token 0 there) and ranks R + 5 on slot 0 (rank
  // R) and -4 on slot 3 (rank 0)
  template <typename B>
  explicit BadMetadata(const B& batch) : sorted(batch.meta.sorted), counts(batch.meta.counts), ranks(batch.ranks) {
    sorted.resize(sorted.size() + 40, 0);
    counts.back() += 40;
    ranks[0] = batch.R + 5;
    ranks[3] = -4;
  }
  void apply(SgmvArgs& args) const {
    args.sorted_token_ids = sorted.data();
    args.slot_counts = counts.data();
    args.ranks = ranks.data();
  }
};

enum class Kernels { kDecode, kTensorCores, kCudaCores };

template <typename T>
void run_case(Kernels kernels, uint32_t seed) {
  g_sm_count = 132;
  // "distinct": no -1 tokens, so the last slot's range ends at M; slots of ranks 16, 15, 8, 0, 16, 1
  GroupedCase<T, T> batch(70, 6, 264, 16, 264, 16, 300, "distinct", seed, /*aligned_out=*/true);
  EXPECT(batch.meta.starts.back() + batch.meta.counts.back() == 70 && batch.ranks[0] == 16 && batch.ranks[3] == 0,
         "unexpected batch");
  const BadMetadata bad(batch);
  std::vector<float> partials;
  if (kernels == Kernels::kDecode) {
    const ShrinkSplit split = decode_k_split(batch.M, batch.K, 16 / sizeof(T), 0);
    SgmvArgs args = batch.shrink_args(partials, split.splits, split.k_per_split);
    bad.apply(args);
    emulate_launch(bgmv_shrink_kernel<T>, args, batch.M, split.splits, 1, kDecodeThreads);
    batch.check_shrink(partials, split.splits);
    SgmvArgs expand = batch.expand_args();
    bad.apply(expand);
    emulate_launch(bgmv_expand_kernel<T>, expand, batch.M, ceil_div(batch.N, kDecodeExpandCols), 1, kDecodeThreads);
    batch.check_expand();
    return;
  }
  const bool mma = kernels == Kernels::kTensorCores;
  const ShrinkSplit split = shrink_k_split(batch.M, batch.L, batch.R, batch.K, mma ? kSgmvMmaWarps : kThreads / 32, 0);
  SgmvArgs args = batch.shrink_args(partials, split.splits, split.k_per_split);
  bad.apply(args);
  args.col_tiles = ceil_div(batch.R, kTileCols);
  const unsigned grid_x = split.splits * args.col_tiles, grid_y = ceil_div(batch.M, kTileTokens);
  if (mma) {
    emulate_launch(sgmv_shrink_mma_kernel<T>, args, grid_x, grid_y, batch.L, kSgmvMmaWarps * 32);
  } else {
    emulate_launch(sgmv_kernel<true, float>, args, grid_x, grid_y, batch.L, kThreads);
  }
  batch.check_shrink(partials, split.splits);
  SgmvArgs expand = batch.expand_args();
  bad.apply(expand);
  expand.col_tiles = ceil_div(batch.N, mma ? kExpandCols : kTileCols);
  if (mma) {
    emulate_launch(sgmv_expand_mma_kernel<T>, expand, expand.col_tiles, grid_y, batch.L, kSgmvMmaWarps * 32);
  } else {
    emulate_launch(sgmv_kernel<false, float>, expand, expand.col_tiles, grid_y, batch.L, kThreads);
  }
  batch.check_expand();
}

int main() {
  int cases = 0;
  run_case<c10::BFloat16>(Kernels::kDecode, 1 + cases++);
  run_case<c10::BFloat16>(Kernels::kTensorCores, 1 + cases++);
  run_case<c10::Half>(Kernels::kCudaCores, 1 + cases++);
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures != 0;
}
