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

#include "harness.h"

// sgmv.cu's run-time dtype codes of the kernels' operands
template <typename T> int code();
template <> int code<float>() { return kF32; }
template <> int code<c10::Half>() { return kF16; }
template <> int code<c10::BFloat16>() { return kBF16; }

template <typename T>
void run_case(int M, int L, int K, int R, int row_pad, const std::string& dist, int sms, uint32_t seed) {
  std::mt19937 rng(seed);
  g_sm_count = sms;
  auto ival = [&](int bound) { return float(int(rng() % (2 * bound + 1)) - bound); };
  Meta meta = make_meta(M, L, rng, dist);
  std::vector<int32_t> ranks(L);
  for (int s = 0; s < L; ++s) ranks[s] = (s % 4 == 0) ? R : (s % 4 == 1 ? 1 : (s % 4 == 2 ? R / 2 : 0));
  if (L > 1) ranks[1] = std::max(R - 1, 1);
  std::vector<float> scal(L);
  for (int s = 0; s < L; ++s) scal[s] = std::ldexp(1.0f, s % 5 - 2);
  const float nan = std::nanf("");

  // ---- shrink: x [M, K] (row stride K + row_pad), A [L, R, K] (rank row stride K + row_pad)
  const int64_t shrink_pad = (row_pad + 16 / sizeof(T) - 1) / (16 / sizeof(T)) * (16 / sizeof(T));
  const int64_t xs = K + shrink_pad, as_c = K + shrink_pad, as_s = int64_t(R) * as_c;
  std::vector<T> xbuf, abuf;
  T* x = aligned16_in(xbuf, size_t(M) * xs);
  T* a = aligned16_in(abuf, size_t(L) * as_s);
  for (int64_t i = 0; i < int64_t(M) * xs; ++i) x[i] = T(ival(4));
  for (int s = 0; s < L; ++s) for (int c = 0; c < R; ++c) for (int k = 0; k < as_c; ++k)
    a[s * as_s + c * as_c + k] = c < ranks[s] ? T(ival(4)) : T(nan);
  SgmvArgs args{};
  args.x = x; args.x_dtype = code<T>(); args.x_stride_t = xs; args.x_stride_k = 1;
  args.w = a; args.w_dtype = code<T>(); args.w_stride_slot = as_s; args.w_stride_c = as_c; args.w_stride_k = 1;
  args.k_full = K;
  const bool vectorized = shrink_rows_of_16_bytes(args);
  EXPECT(vectorized, "shrink rows not vectorized (K=%d pad=%d)", K, row_pad);
  EXPECT(decode_path(M, L), "not a decode shape M=%d L=%d", M, L);
  const int vec = 16 / sizeof(T);
  const ShrinkSplit split = decode_k_split(M, K, vec, 0);
  EXPECT(split.k_per_split % (32 * vec) == 0 && split.k_per_split <= 32 * vec * kDecodeChunks,
         "k_per_split %lld", (long long)split.k_per_split);
  EXPECT((split.splits - 1) * split.k_per_split < K && split.splits * split.k_per_split >= K, "splits cover K");
  std::vector<float> partials(size_t(split.splits) * M * R, 0.f);
  args.out = partials.data(); args.out_dtype = kF32;
  args.out_stride_split = int64_t(M) * R; args.out_stride_t = R; args.out_stride_c = 1;
  args.sorted_token_ids = meta.sorted.data(); args.slot_starts = meta.starts.data();
  args.slot_counts = meta.counts.data(); args.ranks = ranks.data(); args.scalings = scal.data();
  args.num_tokens = M; args.max_rank = R; args.num_slots = L; args.k_per_split = split.k_per_split;
  emulate_launch(bgmv_shrink_kernel<T>, args, M, split.splits, 1, kDecodeThreads);
  std::vector<float> shrunk(size_t(M) * R, 0.f);
  for (int64_t sp = 0; sp < split.splits; ++sp) for (int i = 0; i < M * R; ++i) shrunk[i] += partials[sp * M * R + i];
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

  // ---- expand: t [M, R] fp32 (NaN past each token's rank), B [L, N, R] with rank row stride R + row_pad
  const int N = 1100 + row_pad;  // two column blocks of kDecodeExpandCols, a partial one
  const int64_t bs_n = R + row_pad, bs_s = int64_t(N) * bs_n;
  std::vector<T> bbuf;
  T* b = aligned16_in(bbuf, size_t(L) * bs_s);
  for (int s = 0; s < L; ++s) for (int n = 0; n < N; ++n) for (int j = 0; j < bs_n; ++j)
    b[s * bs_s + n * bs_n + j] = j < ranks[s] ? T(ival(3)) : T(nan);
  std::vector<float> t(size_t(M) * R);
  for (int tok = 0; tok < M; ++tok) for (int j = 0; j < R; ++j) {
    const int s = meta.ids[tok];
    t[tok * R + j] = (s >= 0 && j < ranks[s]) ? ival(3) : nan;
  }
  const int offset = 5, n_total = N + 9;
  std::vector<T> out(size_t(M) * n_total), before;
  for (auto& v : out) v = T(ival(4));
  before = out;
  SgmvArgs e{};
  e.x = t.data(); e.x_dtype = kF32; e.x_stride_t = R; e.x_stride_k = 1;
  e.w = b; e.w_dtype = code<T>(); e.w_stride_slot = bs_s; e.w_stride_c = bs_n; e.w_stride_k = 1;
  e.out = out.data(); e.out_dtype = code<T>(); e.out_stride_t = n_total; e.out_stride_c = 1; e.col_offset = offset;
  e.sorted_token_ids = meta.sorted.data(); e.slot_starts = meta.starts.data(); e.slot_counts = meta.counts.data();
  e.ranks = ranks.data(); e.num_tokens = M; e.max_rank = R; e.num_slots = L; e.cols_full = N;
  EXPECT(expand_rows_of_16_bytes(e), "expand rows not vectorized");
  emulate_launch(bgmv_expand_kernel<T>, e, M, ceil_div(N, kDecodeExpandCols), 1, kDecodeThreads);
  for (int tok = 0; tok < M; ++tok) {
    const int s = meta.ids[tok];
    for (int col = 0; col < n_total; ++col) {
      double ref = double(float(before[tok * n_total + col]));
      const int n = col - offset;
      if (s >= 0 && n >= 0 && n < N) {
        for (int j = 0; j < ranks[s]; ++j) ref += double(t[tok * R + j]) * double(float(b[s * bs_s + n * bs_n + j]));
      }
      const float got = float(out[tok * n_total + col]), want = float(T(float(ref)));
      EXPECT(got == want, "expand %s M=%d L=%d R=%d pad=%d tok=%d col=%d: %g vs %g", dist.c_str(), M, L, R, row_pad,
             tok, col, got, want);
    }
  }
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  std::vector<std::string> dists = {"mixed_base"};
  std::vector<int> sm_counts = {132};
  if (!quick) {
    dists = {"distinct", "mixed_base", "two", "all_base"};
    sm_counts = {132, 4};  // 4 SMs: the fewest splits
  }
  int cases = 0;
  for (const std::string& dist : dists) {
    for (int sms : sm_counts) {
      run_case<c10::BFloat16>(9, 6, 1000, 16, 0, dist, sms, 1 + cases++);
      run_case<c10::Half>(5, 3, 4104, 20, 4, dist, sms, 1 + cases++);      // R 20 in rows of 24: a partial chunk
      run_case<float>(12, 5, 68, 8, 0, dist, sms, 1 + cases++);
      run_case<c10::BFloat16>(1, 1, 64, 64, 8, dist, sms, 1 + cases++);
      run_case<c10::BFloat16>(40, 12, 256, 3, 5, dist, sms, 1 + cases++);   // rank rows of 3 in strides of 8
      run_case<c10::Half>(70, 300, 64, 8, 0, dist, sms, 1 + cases++);       // more slots than threads
    }
  }
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures != 0;
}
