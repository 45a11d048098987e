// Runs the grouped kernels of csrc/cuda/sgmv.cu (the decode, tensor-core and CUDA-core shrinks and expands; extracted
// verbatim into extracted.h by tests/test_cuda_emulation.py) on metadata that is out of range where the kernels'
// clamps make it mean the same as a valid batch's (sgmv.cu's header: ranks clamped to [0, R], slot ranges to [0, M)):
// a rank past R and one below 0, and the last slot's count running past M into a sorted_token_ids buffer that holds
// valid token ids beyond its M entries; and (bad ids) token ids outside [0, M) (-1, -2, M, M + 1) in a slot's range,
// which are skipped, and a slot start below 0, clamped to 0. Each kernel's result must be the valid batch's, bit for
// bit (an id or start used unclamped reads or writes outside a buffer: the address check stops the run). Prints "N
// cases, F failures"; exits 1 on a failure.
#include "emu.h"

namespace lora_kernels {
namespace {
#include "extracted.h"
}
}  // namespace lora_kernels
using namespace lora_kernels;

#include "sgmv_harness.h"

struct BadMetadata {
  std::vector<int32_t> sorted, starts, counts, ranks;
  // batch.meta with the last slot's count 40 past M (the buffer holds token 0 there) and ranks R + 5 on slot 0 (rank
  // R) and -4 on slot 3 (rank 0). bad_ids: instead, the positions past the slots' ranges (the -1 tokens', which no
  // kernel reads) hold ids -1, M, -2, M + 1, ... and the last slot's range covers them, and slot 0 starts at -1
  // (clamped to its valid start, 0).
  template <typename B>
  BadMetadata(const B& batch, bool bad_ids)
      : sorted(batch.meta.sorted), starts(batch.meta.starts), counts(batch.meta.counts), ranks(batch.ranks) {
    if (bad_ids) {
      const int end = starts.back() + counts.back();
      const int32_t ids[] = {-1, batch.M, -2, batch.M + 1};  // -1: the kernels' own mark for none
      for (int i = end; i < batch.M; ++i) sorted[i] = ids[(i - end) % 4];
      counts.back() += batch.M - end;
      starts[0] = -1;
      return;
    }
    sorted.resize(sorted.size() + 40, 0);
    counts.back() += 40;
    ranks[0] = batch.R + 5;
    ranks[3] = -4;
  }
  void apply(SgmvArgs& args) const {
    args.sorted_token_ids = sorted.data();
    args.slot_starts = starts.data();
    args.slot_counts = counts.data();
    args.ranks = ranks.data();
  }
};

enum class Kernels { kDecode, kTensorCores, kCudaCores };

template <typename T>
void run_case(Kernels kernels, bool bad_ids, uint32_t seed) {
  g_sm_count = 132;
  // "distinct": no -1 tokens, so the last slot's range ends at M; slots of ranks 16, 15, 8, 0, 16, 1. bad_ids:
  // "mixed_base", whose -1 tokens' positions (past the slots' ranges) take the bad ids
  GroupedCase<T, T> batch(70, 6, 264, 16, 264, 16, 300, bad_ids ? "mixed_base" : "distinct", seed,
                          /*aligned_out=*/true);
  const int end = batch.meta.starts.back() + batch.meta.counts.back();
  EXPECT(bad_ids ? end <= 66 && batch.meta.counts[0] > 0 : end == 70 && batch.ranks[0] == 16 && batch.ranks[3] == 0,
         "unexpected batch");
  const BadMetadata bad(batch, bad_ids);
  std::vector<float> partials;
  if (kernels == Kernels::kDecode) {
    const KSplit split = decode_k_split(batch.M, batch.K, 16 / sizeof(T), 0);
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
  const KSplit split = shrink_k_split(batch.M, batch.L, batch.R, batch.K, mma ? kSgmvMmaWarps : kThreads / 32, 0);
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
  for (bool bad_ids : {false, true}) {
    run_case<c10::BFloat16>(Kernels::kDecode, bad_ids, 1 + cases++);
    run_case<c10::BFloat16>(Kernels::kTensorCores, bad_ids, 1 + cases++);
    run_case<c10::Half>(Kernels::kCudaCores, bad_ids, 1 + cases++);
  }
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures != 0;
}
