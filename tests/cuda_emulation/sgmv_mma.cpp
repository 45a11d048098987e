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

#include "harness.h"

// sgmv.cu's run-time dtype codes of the kernels' operands
template <typename T> int code();
template <> int code<float>() { return kF32; }
template <> int code<c10::Half>() { return kF16; }
template <> int code<c10::BFloat16>() { return kBF16; }

template <typename T, typename Out>
void run_case(int M, int L, int K, int R, int row_pad, const std::string& dist, int sms, uint32_t seed) {
  std::mt19937 rng(seed);
  g_sm_count = sms;
  auto ival = [&](int bound) { return float(int(rng() % (2 * bound + 1)) - bound); };
  const Meta meta = make_meta(M, L, rng, dist);
  std::vector<int32_t> ranks(L);
  for (int s = 0; s < L; ++s) ranks[s] = (s % 4 == 0) ? R : (s % 4 == 1 ? 1 : (s % 4 == 2 ? R / 2 : 0));
  if (L > 1) ranks[1] = std::max(R - 1, 1);
  std::vector<float> scal(L);
  for (int s = 0; s < L; ++s) scal[s] = std::ldexp(1.0f, s % 5 - 2);
  const float nan = std::nanf("");
  const int threads = kShrinkWarps * 32;

  // ---- shrink: x [M, K] and A [L, R, K], rows padded by row_pad (a multiple of 8)
  const int64_t xs = K + row_pad, as_c = K + row_pad, as_s = int64_t(R) * as_c;
  std::vector<T> xbuf, abuf;
  T* x = aligned16_in(xbuf, size_t(M) * xs);
  T* a = aligned16_in(abuf, size_t(L) * as_s);
  for (int64_t i = 0; i < int64_t(M) * xs; ++i) x[i] = T(ival(4));
  for (int s = 0; s < L; ++s) {
    for (int c = 0; c < R; ++c) {
      for (int k = 0; k < as_c; ++k) a[s * as_s + c * as_c + k] = c < ranks[s] ? T(ival(4)) : T(nan);
    }
  }
  SgmvArgs args{};
  args.x = x; args.x_dtype = code<T>(); args.x_stride_t = xs; args.x_stride_k = 1;
  args.w = a; args.w_dtype = code<T>(); args.w_stride_slot = as_s; args.w_stride_c = as_c; args.w_stride_k = 1;
  args.k_full = K;
  EXPECT(shrink_rows_of_16_bytes(args), "shrink rows not whole 16-byte loads (K=%d pad=%d)", K, row_pad);
  EXPECT(!decode_path(M, L), "a decode shape M=%d L=%d", M, L);
  const ShrinkSplit split = shrink_k_split(M, L, R, K, 0);
  EXPECT(split.k_per_split % kTileK == 0 && (split.splits - 1) * split.k_per_split < K &&
         split.splits * split.k_per_split >= K, "splits of %lld cover K", (long long)split.k_per_split);
  std::vector<float> partials(size_t(split.splits) * M * R, 0.f);
  args.out = partials.data(); args.out_dtype = kF32;
  args.out_stride_split = int64_t(M) * R; args.out_stride_t = R; args.out_stride_c = 1;
  args.sorted_token_ids = meta.sorted.data(); args.slot_starts = meta.starts.data();
  args.slot_counts = meta.counts.data(); args.ranks = ranks.data(); args.scalings = scal.data();
  args.num_tokens = M; args.max_rank = R; args.num_slots = L;
  args.col_tiles = ceil_div(R, kTileCols); args.k_per_split = split.k_per_split;
  emulate_launch(sgmv_shrink_mma_kernel<T>, args, split.splits * args.col_tiles, ceil_div(M, kTileTokens), L, threads);
  std::vector<float> shrunk(size_t(M) * R, 0.f);
  for (int64_t sp = 0; sp < split.splits; ++sp) {
    for (int i = 0; i < M * R; ++i) shrunk[i] += partials[sp * M * R + i];
  }
  for (int tok = 0; tok < M; ++tok) {
    const int s = meta.ids[tok];
    for (int c = 0; c < R; ++c) {
      double ref = 0;
      if (s >= 0 && c < ranks[s]) {
        for (int k = 0; k < K; ++k) ref += double(float(x[tok * xs + k])) * double(float(a[s * as_s + c * as_c + k]));
        ref *= scal[s];
      }
      EXPECT(double(shrunk[tok * R + c]) == ref, "shrink %s M=%d L=%d K=%d R=%d tok=%d c=%d: %g vs %g", dist.c_str(),
             M, L, K, R, tok, c, shrunk[tok * R + c], ref);
    }
  }

  // ---- expand: t [M, R] fp32 (NaN past each token's rank), B [L, N, R] (NaN past each rank), into Out
  const int N = 300;  // three blocks of kExpandCols columns, the last one partial
  const int64_t bs_n = R, bs_s = int64_t(N) * bs_n;
  std::vector<T> b(size_t(L) * bs_s);
  for (int s = 0; s < L; ++s) {
    for (int n = 0; n < N; ++n) {
      for (int j = 0; j < R; ++j) b[s * bs_s + n * bs_n + j] = j < ranks[s] ? T(ival(3)) : T(nan);
    }
  }
  std::vector<float> t(size_t(M) * R);
  for (int tok = 0; tok < M; ++tok) {
    for (int j = 0; j < R; ++j) {
      const int s = meta.ids[tok];
      t[tok * R + j] = (s >= 0 && j < ranks[s]) ? ival(3) : nan;
    }
  }
  const int offset = 5, n_total = N + 9;
  std::vector<Out> out(size_t(M) * n_total);
  for (auto& v : out) v = Out(ival(4));
  const std::vector<Out> before = out;
  SgmvArgs e{};
  e.x = t.data(); e.x_dtype = kF32; e.x_stride_t = R; e.x_stride_k = 1;
  e.w = b.data(); e.w_dtype = code<T>(); e.w_stride_slot = bs_s; e.w_stride_c = bs_n; e.w_stride_k = 1;
  e.out = out.data(); e.out_dtype = code<Out>(); e.out_stride_t = n_total; e.out_stride_c = 1; e.col_offset = offset;
  e.sorted_token_ids = meta.sorted.data(); e.slot_starts = meta.starts.data(); e.slot_counts = meta.counts.data();
  e.ranks = ranks.data(); e.num_tokens = M; e.max_rank = R; e.num_slots = L; e.cols_full = N;
  e.col_tiles = ceil_div(N, kExpandCols);
  emulate_launch(sgmv_expand_mma_kernel<T>, e, e.col_tiles, ceil_div(M, kTileTokens), L, threads);
  for (int tok = 0; tok < M; ++tok) {
    const int s = meta.ids[tok];
    for (int col = 0; col < n_total; ++col) {
      double ref = double(float(before[tok * n_total + col]));
      const int n = col - offset;
      if (s >= 0 && n >= 0 && n < N) {
        for (int j = 0; j < ranks[s]; ++j) ref += double(t[tok * R + j]) * double(float(b[s * bs_s + n * bs_n + j]));
      }
      const float got = float(out[tok * n_total + col]), want = float(Out(float(ref)));
      EXPECT(got == want, "expand %s M=%d L=%d R=%d tok=%d col=%d: %g vs %g", dist.c_str(), M, L, R, tok, col, got,
             want);
    }
  }
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  std::vector<std::string> dists = {"mixed_base"};
  std::vector<int> sm_counts = {132};
  if (!quick) {
    dists = {"distinct", "mixed_base", "two"};
    sm_counts = {132, 4};  // 4 SMs: no split at these sizes
  }
  int cases = 0;
  for (const std::string& dist : dists) {
    for (int sms : sm_counts) {
      run_case<c10::BFloat16, float>(150, 6, 72, 16, 8, dist, sms, 1 + cases++);
      run_case<c10::Half, c10::Half>(100, 3, 1000, 64, 0, dist, sms, 1 + cases++);  // two column tiles of rank
      run_case<c10::BFloat16, c10::BFloat16>(70, 2, 264, 20, 0, dist, sms, 1 + cases++);
    }
  }
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures != 0;
}
