// Runs the decode forward of lora_fwd (csrc/cuda/lora_linear.cu: lora_shrink_splitk_kernel, then
// lora_fwd_decode_mma_kernel for fp16/bf16 rows of whole 16-byte loads, else lora_fwd_decode_kernel; extracted
// verbatim into extracted.h by tests/test_cuda_emulation.py) on the CPU over whole launches, with launch_decode's
// choices (the extracted decode_shrink_split; the dispatch and grids restated here), against a float64 reference on
// integer-valued data: exact, so a dropped, doubled or misplaced product changes y or s. M on either side of the MMA
// tile's upper rows, K less than one warp's step and with a partial last step, r = 1 to 256, N not a multiple of the
// block's rows, a separate x_lora, a column-major lora_b, bias on and off, and the CUDA-core kernel's vector and
// scalar paths; and decode_shrink_split over a sweep of shapes. Prints "N cases, F failures"; exits 1 on a failure.
// `quick`: two cases of the MMA kernel.
#include "emu.h"

namespace lora_kernels {
namespace {
#include "extracted.h"
}
}  // namespace lora_kernels
using namespace lora_kernels;

#include "harness.h"

// A forward launch's dynamic shared memory: M * r floats (launch_decode's shared_bytes). Under the address check the
// rest of emu.h's buffer is poisoned while it runs, as a GPU faults on a shared-memory access past a block's
// allocation (S's rows past M: the shared buffer alone would hold them).
struct DynamicSharedMemory {
  explicit DynamicSharedMemory(size_t floats) : floats(floats) {
#ifdef LK_ADDRESS_CHECK
    ASAN_POISON_MEMORY_REGION(g_dynamic_shared + floats, (std::size(g_dynamic_shared) - floats) * sizeof(float));
#endif
  }
  ~DynamicSharedMemory() {
#ifdef LK_ADDRESS_CHECK
    ASAN_UNPOISON_MEMORY_REGION(g_dynamic_shared + floats, (std::size(g_dynamic_shared) - floats) * sizeof(float));
#endif
  }
  size_t floats;
};

template <typename T, int kMaxM>
void launch(const T* x, int64_t ldx, const T* x_lora, int64_t ldxl, int M, const T* w, int64_t ldw, int64_t N,
            int64_t K, const T* a, int64_t lda, int r, const T* b, int64_t ldb_n, int64_t ldb_r, float scaling,
            const T* bias, T* y, float* s, bool vec_fwd, bool vec_shrink, bool* took_mma) {
  constexpr int V = Vec16<T>::kSize;
  const KSplit split = decode_shrink_split(M, r, K, V, 0);
  std::vector<float> partials(size_t(split.splits) * M * r, std::nanf(""));  // at::empty: garbage until written
  emulate_launch([&](int) {
    lora_shrink_splitk_kernel<T, kMaxM>(x_lora, ldxl, M, a, lda, r, K, split.k_per_split, vec_shrink,
                                        partials.data());
  }, 0, ceil_div(r, kRowsPerBlock), split.splits, 1, kDecodeWarps * kWarpSize);
  *took_mma = !std::is_same_v<T, float> && vec_fwd;
  const DynamicSharedMemory shared(size_t(M) * r);
  if constexpr (!std::is_same_v<T, float>) {
    if (vec_fwd) {
      emulate_launch([&](int) {
        if (M > 8) {
          lora_fwd_decode_mma_kernel<T, true>(x, ldx, M, w, ldw, N, K, partials.data(), split.splits, r, b, ldb_n,
                                              ldb_r, scaling, bias, 1, y, N, s);
        } else {
          lora_fwd_decode_mma_kernel<T, false>(x, ldx, M, w, ldw, N, K, partials.data(), split.splits, r, b, ldb_n,
                                               ldb_r, scaling, bias, 1, y, N, s);
        }
      }, 0, ceil_div(N, kMmaRowsPerBlock), 1, 1, kMmaWarps * kWarpSize);
      return;
    }
  }
  emulate_launch([&](int) {
    lora_fwd_decode_kernel<T, kMaxM>(x, ldx, M, w, ldw, N, K, vec_fwd, partials.data(), split.splits, r, b, ldb_n,
                                     ldb_r, scaling, bias, 1, y, N, s);
  }, 0, ceil_div(N, kRowsPerBlock), 1, 1, kDecodeWarps * kWarpSize);
}

// x [M, K] with row stride ldx (x_lora another such tensor when separate_lora_input), W [N, K], A [r, K] (rows
// padded by row_pad), B [N, r] (column-major when b_column_major), bias [N] or none; expect_mma: which kernel.
template <typename T>
void run_case(int M, int64_t K, int r, int row_pad, bool separate_lora_input, bool b_column_major, bool with_bias,
              bool expect_mma, uint32_t seed) {
  std::mt19937 rng(seed);
  auto ival = [&](int bound) { return T(float(int(rng() % (2 * bound + 1)) - bound)); };
  const int64_t N = 123, ld = K + row_pad;
  std::vector<T> xbuf, xlbuf, wbuf, abuf;
  T* x = aligned16_in(xbuf, size_t(M) * ld);
  T* xl = separate_lora_input ? aligned16_in(xlbuf, size_t(M) * ld) : x;
  T* w = aligned16_in(wbuf, size_t(N) * ld);
  T* a = aligned16_in(abuf, size_t(r) * ld);
  for (int64_t i = 0; i < M * ld; ++i) x[i] = ival(4);
  if (separate_lora_input) for (int64_t i = 0; i < M * ld; ++i) xl[i] = ival(4);
  for (int64_t i = 0; i < N * ld; ++i) w[i] = ival(4);
  for (int64_t i = 0; i < r * ld; ++i) a[i] = ival(4);
  std::vector<T> b(size_t(N) * r), bias(N);
  for (auto& v : b) v = ival(3);
  for (auto& v : bias) v = ival(8);
  const int64_t ldb_n = b_column_major ? 1 : r, ldb_r = b_column_major ? N : 1;
  const float scaling = 0.5f;
  std::vector<T> y(size_t(M) * N, T(std::nanf("")));
  std::vector<float> s(size_t(M) * r, std::nanf(""));
  constexpr int V = Vec16<T>::kSize;  // launch_decode's conditions for 16-byte loads
  const bool vec_fwd = K % V == 0 && ld % V == 0 && aligned16(x) && aligned16(w);
  const bool vec_shrink = K % V == 0 && ld % V == 0 && aligned16(xl) && aligned16(a);
  const T* bias_ptr = with_bias ? bias.data() : nullptr;
  bool took_mma = false;
  if (M == 1) {
    launch<T, 1>(x, ld, xl, ld, M, w, ld, N, K, a, ld, r, b.data(), ldb_n, ldb_r, scaling, bias_ptr, y.data(),
                 s.data(), vec_fwd, vec_shrink, &took_mma);
  } else if (M <= 4) {
    launch<T, 4>(x, ld, xl, ld, M, w, ld, N, K, a, ld, r, b.data(), ldb_n, ldb_r, scaling, bias_ptr, y.data(),
                 s.data(), vec_fwd, vec_shrink, &took_mma);
  } else {
    launch<T, 16>(x, ld, xl, ld, M, w, ld, N, K, a, ld, r, b.data(), ldb_n, ldb_r, scaling, bias_ptr, y.data(),
                  s.data(), vec_fwd, vec_shrink, &took_mma);
  }
  EXPECT(took_mma == expect_mma, "M=%d K=%lld: the %s kernel ran", M, (long long)K, took_mma ? "MMA" : "CUDA-core");
  for (int m = 0; m < M; ++m) {
    std::vector<double> s_ref(r, 0.0);
    for (int j = 0; j < r; ++j) {
      for (int64_t k = 0; k < K; ++k) s_ref[j] += double(float(xl[m * ld + k])) * double(float(a[j * ld + k]));
      EXPECT(double(s[m * r + j]) == s_ref[j], "s M=%d K=%lld r=%d m=%d j=%d: %g vs %g", M, (long long)K, r, m, j,
             s[m * r + j], s_ref[j]);
    }
    for (int64_t n = 0; n < N; ++n) {
      double ref = with_bias ? double(float(bias[n])) : 0.0, lora = 0.0;
      for (int64_t k = 0; k < K; ++k) ref += double(float(x[m * ld + k])) * double(float(w[n * ld + k]));
      for (int j = 0; j < r; ++j) lora += s_ref[j] * double(float(b[n * ldb_n + j * ldb_r]));
      const float got = float(y[m * N + n]), want = float(T(float(ref + scaling * lora)));
      EXPECT(got == want, "y M=%d K=%lld r=%d m=%d n=%lld: %g vs %g", M, (long long)K, r, m, (long long)n, got, want);
    }
  }
}

// decode_shrink_split over a sweep of shapes and SM counts, without launching: splits that cover K in whole chunks
// of one warp's 16-byte loads, none empty, at most kMaxSplitK, within the partials a forward block sums. One case.
void check_splits() {
  for (int sms : {1, 4, 132}) {
    g_sm_count = sms;
    for (int64_t M : {1, 4, 16}) {
      for (int64_t r : {1, 16, 64, 256}) {
        for (int64_t K : {int64_t(1), int64_t(31), int64_t(256), int64_t(4096), int64_t(4100), int64_t(1) << 20}) {
          for (int64_t V : {4, 8}) {
            const KSplit s = decode_shrink_split(M, r, K, V, 0);
            EXPECT(split_covers(K, s.splits, s.k_per_split, kWarpSize * V, kMaxSplitK) &&
                   (s.splits == 1 || s.splits * M * r <= kPartialBudget),
                   "decode_shrink_split M=%lld r=%lld K=%lld V=%lld sms=%d: %lld x %lld", (long long)M, (long long)r,
                   (long long)K, (long long)V, sms, (long long)s.splits, (long long)s.k_per_split);
          }
        }
      }
    }
  }
}

int main(int argc, char** argv) {
  g_sm_count = 4;  // 8 shrink splits at most: each one's warp shuffles are emulated with barriers, slow on a CPU
  int cases = 0;
  if (argc > 1 && std::string(argv[1]) == "quick") {  // the MMA kernel with and without the tile's upper rows
    run_case<c10::BFloat16>(9, 4104, 16, 0, false, false, true, true, 1 + cases++);
    run_case<c10::BFloat16>(5, 64, 16, 0, false, false, true, true, 1 + cases++);
    std::printf("%d cases, %d failures\n", cases, failures);
    return failures != 0;
  }
  for (int M : {1, 5, 8, 9, 16}) {
    for (int64_t K : {64, 4104}) {
      run_case<c10::BFloat16>(M, K, 16, 0, M == 9, M == 5, M != 8, true, 1 + cases++);
    }
  }
  run_case<c10::Half>(16, 72, 256, 8, true, false, true, true, 1 + cases++);       // r = 256: one split
  run_case<c10::Half>(3, 4104, 1, 0, false, true, false, true, 1 + cases++);
  run_case<float>(4, 4100, 8, 0, false, false, true, false, 1 + cases++);          // fp32: 16-byte loads of 4
  run_case<c10::BFloat16>(3, 4100, 16, 0, true, false, true, false, 1 + cases++);  // K % 8 != 0: scalar loads
  run_case<c10::BFloat16>(16, 260, 64, 3, false, true, true, false, 1 + cases++);  // rows of 263: scalar loads
  check_splits();
  ++cases;
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures != 0;
}
