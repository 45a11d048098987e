// Runs the launchers of csrc/cuda/lora_linear.cu, lora_fwd_cuda_launch and lora_bwd_dy_cuda_launch, on CPU tensors:
// the whole file compiled as host C++ (tests/test_cuda_emulation.py copies it with its launches rewritten into emu.h's
// emulation, host_stubs/ answering its CUDA runtime calls), so what they build (contiguous copies, the transposed and
// re-aligned lora_b, partials, summed_partials), the kernels they choose and the arguments they pass them, and the
// ATen compositions of the paths without a kernel, all run. Each case checks which kernels were launched (and whether
// as programmatic dependents) and the outputs against a float64 reference on integer-valued data, exactly.
// Prints "N cases, F failures"; exits 1 on a failure. `quick`: a few cases of each launcher.
#include <ATen/ATen.h>
#include <torch/library.h>

#define LK_EMU_LAUNCHERS
#include "emu.h"
#include "lora_linear.cu"  // the test's rewritten copy
#include "launcher_harness.h"

using namespace lora_kernels;
using namespace lk_test;

// cuBLAS, as the launchers' ATen GEMMs (lora_fwd_gemm, mm_float) call it on a GPU, in place of torch's CPU kernels:
// alpha · (a · b) + beta · c in fp32 (fp64 for float64 operands), rounded once to the output dtype, and BLAS's rules
// that c is not read where beta is 0 and a · b not computed where alpha is 0 (a NaN or Inf in them vanishes; torch's
// CPU addmm computes the product anyway, which would hide a launcher relying on it). And mm.dtype (fp32 out of 16-bit
// operands: mm_float), which torch has no CPU kernel for at all.
at::Tensor blas_gemm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, double beta, double alpha,
                     at::ScalarType out_dtype) {
  const at::ScalarType acc = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor result = at::zeros({a.size(0), b.size(1)}, a.options().dtype(acc));
  if (beta != 0.0) result.add_(c.to(acc).expand_as(result), beta);
  if (alpha != 0.0) result.add_(at::mm(a.to(acc), b.to(acc)), alpha);
  return result.to(out_dtype);
}
at::Tensor blas_mm_dtype(const at::Tensor& a, const at::Tensor& b, at::ScalarType out_dtype) {
  return blas_gemm({}, a, b, 0.0, 1.0, out_dtype);
}
at::Tensor blas_addmm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, const at::Scalar& beta,
                      const at::Scalar& alpha) {
  return blas_gemm(c, a, b, beta.toDouble(), alpha.toDouble(), c.scalar_type());
}
at::Tensor& blas_addmm_(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, const at::Scalar& beta,
                        const at::Scalar& alpha) {
  return c.copy_(blas_gemm(c, a, b, beta.toDouble(), alpha.toDouble(), c.scalar_type()));
}
TORCH_LIBRARY_IMPL(aten, CPU, m) {
  m.impl("mm.dtype", &blas_mm_dtype);
  m.impl("addmm", &blas_addmm);
  m.impl("addmm_", &blas_addmm_);
}

void name_kernels() {
  auto add = [](const void* kernel, const char* name) { g_kernel_names.push_back({kernel, name}); };
#define LK_NAME(...) add(address(__VA_ARGS__), #__VA_ARGS__)
  LK_NAME(lora_shrink_splitk_kernel<c10::BFloat16, 1>); LK_NAME(lora_shrink_splitk_kernel<c10::BFloat16, 4>);
  LK_NAME(lora_shrink_splitk_kernel<c10::BFloat16, 16>); LK_NAME(lora_shrink_splitk_kernel<c10::Half, 4>);
  LK_NAME(lora_shrink_splitk_kernel<c10::Half, 16>);
  LK_NAME(lora_shrink_splitk_kernel<float, 4>); LK_NAME(lora_shrink_splitk_kernel<float, 16>);
  LK_NAME(lora_fwd_decode_mma_kernel<c10::BFloat16, false>); LK_NAME(lora_fwd_decode_mma_kernel<c10::BFloat16, true>);
  LK_NAME(lora_fwd_decode_mma_kernel<c10::Half, false>); LK_NAME(lora_fwd_decode_mma_kernel<c10::Half, true>);
  LK_NAME(lora_fwd_decode_kernel<c10::BFloat16, 1>); LK_NAME(lora_fwd_decode_kernel<c10::BFloat16, 4>);
  LK_NAME(lora_fwd_decode_kernel<c10::BFloat16, 16>); LK_NAME(lora_fwd_decode_kernel<c10::Half, 4>);
  LK_NAME(lora_fwd_decode_kernel<float, 4>); LK_NAME(lora_fwd_decode_kernel<float, 16>);
  LK_NAME(lora_bwd_dy_mma_kernel<c10::BFloat16, 1>); LK_NAME(lora_bwd_dy_mma_kernel<c10::BFloat16, 2>);
  LK_NAME(lora_bwd_dy_mma_kernel<c10::Half, 1>); LK_NAME(lora_bwd_dy_mma_kernel<c10::Half, 2>);
  LK_NAME(lora_bwd_dy_kernel<c10::BFloat16>); LK_NAME(lora_bwd_dy_kernel<c10::Half>);
  LK_NAME(lora_bwd_dy_kernel<float>);
#undef LK_NAME
}

// No image of the extension for the device (g_compiled_arch 0): compiled_arch answers 0 and clears its error, the
// launcher falls back to a CUDA-core kernel, whose launch fails as every launch does there, and
// C10_CUDA_KERNEL_LAUNCH_CHECK raises "no kernel image" (nothing runs, no output is returned).
void run_no_image(const std::string& what, const std::function<void()>& body,
                  const std::vector<const void*>& kernels) {
  g_compiled_arch = 0;
  call(what, [&] {
    std::string error;
    try {
      body();
    } catch (const c10::Error& e) {
      error = e.what();
    }
    expect_launches(what, kernels);
    EXPECT(error.find("no kernel image is available") != std::string::npos, "%s: expected the launch's error, got '%s'",
           what.c_str(), error.substr(0, 200).c_str());
  });
  g_compiled_arch = 90;
}

// ---- lora_fwd ----------------------------------------------------------------------------------------------------
// The inputs of one call, integer-valued, and their layout: x (rows padded to ld_x), x and x_lora one element into
// their buffers (not 16-byte aligned), a separate x_lora, lora_a [r, K] column-major, in rows padded to ld_a or one
// element into its buffer, lora_b [N, r] column-major or as the .t() of a [r, N] view one element into its buffer, W
// transposed (GPT-2's Conv1D) or one element into its buffer, bias strided.
struct FwdLayout {
  int64_t ld_x = 0, ld_w = 0, ld_a = 0;  // rows padded to that many elements
  bool x_misaligned = false, separate_x_lora = false, a_column_major = false, b_column_major = false;
  bool a_misaligned = false, w_misaligned = false;
  bool w_transposed = false, bias = true, bias_strided = false;
};

void run_fwd(const std::string& what, at::ScalarType dtype, int64_t M, int64_t K, int64_t N, int64_t r, double scaling,
             const FwdLayout& layout, int arch, const std::vector<const void*>& kernels,
             const std::vector<bool>& dependent = {}, uint64_t seed = 1) {
  g_compiled_arch = arch;
  at::Tensor x = ints({M, K}, 2, dtype, seed), xl = ints({M, K}, 2, dtype, seed + 1);
  at::Tensor w = ints({N, K}, 2, dtype, seed + 2), a = ints({r, K}, 2, dtype, seed + 3);
  at::Tensor b = ints({N, r}, 2, dtype, seed + 4), bias = ints({N}, 8, dtype, seed + 5);
  const at::Tensor xd = x.to(at::kDouble), xld = (layout.separate_x_lora ? xl : x).to(at::kDouble);
  const at::Tensor s_ref = at::mm(xld, a.to(at::kDouble).t());
  at::Tensor lora = at::mm(s_ref, b.to(at::kDouble).t()) * scaling;
  if (layout.bias) lora = lora + bias.to(at::kDouble);
  const at::Tensor y_ref = at::mm(xd, w.to(at::kDouble).t()) + lora;
  // The GEMM path rounds S, and the LoRA term with the bias, to x's dtype before the base GEMM: the data keeps them
  // exact there, so y is rounded once on every path (the decode kernels accumulate in fp32, exact for these sums).
  const auto exact = [&](const at::Tensor& t) { return t.to(dtype).to(at::kDouble).equal(t); };
  EXPECT(!kernels.empty() || (exact(s_ref) && exact(lora)), "%s: the case's data is not exact in its dtype",
         what.c_str());

  if (layout.ld_x) x = padded_rows(x, layout.ld_x);
  if (layout.x_misaligned) x = offset_view(x, 1), xl = offset_view(xl, 1);
  if (layout.ld_w) w = padded_rows(w, layout.ld_w);
  if (layout.a_column_major) a = column_major(a);
  if (layout.ld_a) a = padded_rows(a, layout.ld_a);
  if (layout.a_misaligned) a = offset_view(a, 1);
  if (layout.w_misaligned) w = offset_view(w, 1);
  if (layout.b_column_major) b = column_major(b);
  if (layout.w_transposed) w = w.t().contiguous().t();
  if (layout.bias_strided) bias = at::stack({bias, bias}, 1).select(1, 0);
  const std::optional<at::Tensor> x_lora = layout.separate_x_lora ? std::optional<at::Tensor>(xl) : std::nullopt;
  const std::optional<at::Tensor> bias_opt = layout.bias ? std::optional<at::Tensor>(bias) : std::nullopt;
  call(what, [&] {
    const auto [y, s] = lora_fwd_cuda_launch(x, x_lora, w, a, b, scaling, bias_opt);
    expect_launches(what, kernels, dependent);
    expect_equal(what + ": y", y, y_ref.to(dtype));
    expect_equal(what + ": s", s, s_ref.to(dtype == at::kDouble ? at::kDouble : at::kFloat));
  });
}

// lora_fwd at scaling 0 with an Inf in lora_b: 0 · Inf is NaN in the reference and the other backends; the GEMM path
// multiplies the zero into S rather than passing BLAS an alpha of 0 (which skips the product).
void run_fwd_zero_scaling_inf(const std::string& what, int64_t M, bool bias, const std::vector<const void*>& kernels,
                              const std::vector<bool>& dependent = {}) {
  g_compiled_arch = 90;
  const at::ScalarType dtype = at::kBFloat16;
  const int64_t K = 64, N = 40, r = 8;
  at::Tensor x = ints({M, K}, 2, dtype, 7), w = ints({N, K}, 2, dtype, 8), a = ints({r, K}, 2, dtype, 9);
  at::Tensor b = ints({N, r}, 2, dtype, 10), bias_t = ints({N}, 8, dtype, 11);
  b.index_put_({5, 3}, std::numeric_limits<double>::infinity());
  at::Tensor y_ref = at::mm(x.to(at::kDouble), w.to(at::kDouble).t());
  if (bias) y_ref = y_ref + bias_t.to(at::kDouble);
  y_ref.select(1, 5).fill_(std::nan(""));
  call(what, [&] {
    const auto [y, s] =
        lora_fwd_cuda_launch(x, std::nullopt, w, a, b, 0.0, bias ? std::optional<at::Tensor>(bias_t) : std::nullopt);
    expect_launches(what, kernels, dependent);
    expect_equal(what + ": y", y, y_ref.to(dtype));
  });
}

void fwd_cases(bool quick) {
  using BF = c10::BFloat16;
  const auto bf16 = at::kBFloat16;
  // Decode sizes, 16-bit rows of whole 16-byte loads: the split-K shrink, then the tensor-core forward, as its
  // programmatic dependent where the image is sm_90 (K = 1032: 5 K-splits on 4 SMs, a partial last one).
  run_fwd("fwd bf16 M=1", bf16, 1, 1032, 40, 16, 0.5, {}, 90,
          {address(lora_shrink_splitk_kernel<BF, 1>), address(lora_fwd_decode_mma_kernel<BF, false>)}, {false, true});
  run_fwd("fwd bf16 M=16 x_lora", bf16, 16, 264, 40, 8, 0.5, {.separate_x_lora = true, .b_column_major = true}, 90,
          {address(lora_shrink_splitk_kernel<BF, 16>), address(lora_fwd_decode_mma_kernel<BF, true>)}, {false, true});
  if (quick) return;
  run_fwd("fwd bf16 M=4 sm_80 image", bf16, 4, 264, 40, 20, 2.0, {.ld_x = 272, .bias_strided = true}, 80,
          {address(lora_shrink_splitk_kernel<BF, 4>), address(lora_fwd_decode_mma_kernel<BF, false>)});
  run_fwd("fwd fp16 M=3 lora_a column-major", at::kHalf, 3, 256, 24, 5, 0.5, {.a_column_major = true, .bias = false},
          90, {address(lora_shrink_splitk_kernel<c10::Half, 4>), address(lora_fwd_decode_mma_kernel<c10::Half, false>)},
          {false, true});
  // M = 9..15: the tensor-core forward with its MMA tile's upper rows (M = 16 alone does not tell M > 8 from M > 15).
  run_fwd("fwd bf16 M=9", bf16, 9, 264, 40, 16, 0.5, {}, 90,
          {address(lora_shrink_splitk_kernel<BF, 16>), address(lora_fwd_decode_mma_kernel<BF, true>)}, {false, true});
  run_fwd("fwd bf16 M=9 K % 8 != 0", bf16, 9, 260, 40, 16, 0.5, {}, 90,
          {address(lora_shrink_splitk_kernel<BF, 16>), address(lora_fwd_decode_kernel<BF, 16>)});
  expect_flags("fwd bf16 M=9 K % 8 != 0", {{false}, {false}});
  // x is copied (at most 16 rows) into contiguous rows 16-byte loads read whole: rows of 270 into rows of 264, and a
  // contiguous x one element into its buffer (and a separate x_lora so) into an aligned one: both take tensor cores.
  run_fwd("fwd bf16 M=4 rows of 270", bf16, 4, 264, 40, 16, 0.5, {.ld_x = 270}, 90,
          {address(lora_shrink_splitk_kernel<BF, 4>), address(lora_fwd_decode_mma_kernel<BF, false>)}, {false, true});
  run_fwd("fwd bf16 M=4 x misaligned", bf16, 4, 264, 40, 16, 0.5, {.x_misaligned = true}, 90,
          {address(lora_shrink_splitk_kernel<BF, 4>), address(lora_fwd_decode_mma_kernel<BF, false>)}, {false, true});
  expect_flags("fwd bf16 M=4 x misaligned", {{true}, {}});  // the shrink's 16-byte loads of x
  run_fwd("fwd bf16 M=4 x, x_lora misaligned", bf16, 4, 264, 40, 16, 0.5,
          {.x_misaligned = true, .separate_x_lora = true}, 90,
          {address(lora_shrink_splitk_kernel<BF, 4>), address(lora_fwd_decode_mma_kernel<BF, false>)}, {false, true});
  expect_flags("fwd bf16 M=4 x, x_lora misaligned", {{true}, {}});  // ... of x_lora
  // W is never copied: rows of 267 take the CUDA-core forward (the shrink still reads A with 16-byte loads).
  run_fwd("fwd bf16 M=4 W rows of 267", bf16, 4, 264, 40, 16, 0.5, {.ld_w = 267}, 90,
          {address(lora_shrink_splitk_kernel<BF, 4>), address(lora_fwd_decode_kernel<BF, 4>)});
  expect_flags("fwd bf16 M=4 W rows of 267", {{true}, {false}});
  // ... nor is a W one element into its buffer (rows of 264: only its base pointer stops 16-byte loads)
  run_fwd("fwd bf16 M=4 W misaligned", bf16, 4, 264, 40, 16, 0.5, {.w_misaligned = true}, 90,
          {address(lora_shrink_splitk_kernel<BF, 4>), address(lora_fwd_decode_kernel<BF, 4>)});
  expect_flags("fwd bf16 M=4 W misaligned", {{true}, {false}});
  // lora_a's unit-stride rows are not copied: rows of 268, or one element into its buffer, take the shrink's scalar
  // loads (the forward's 16-byte loads stay)
  run_fwd("fwd bf16 M=4 lora_a rows of 268", bf16, 4, 264, 40, 16, 0.5, {.ld_a = 268}, 90,
          {address(lora_shrink_splitk_kernel<BF, 4>), address(lora_fwd_decode_mma_kernel<BF, false>)}, {false, true});
  expect_flags("fwd bf16 M=4 lora_a rows of 268", {{false}, {}});
  run_fwd("fwd bf16 M=4 lora_a misaligned", bf16, 4, 264, 40, 16, 0.5, {.a_misaligned = true}, 90,
          {address(lora_shrink_splitk_kernel<BF, 4>), address(lora_fwd_decode_mma_kernel<BF, false>)}, {false, true});
  expect_flags("fwd bf16 M=4 lora_a misaligned", {{false}, {}});
  run_fwd("fwd fp32 M=4", at::kFloat, 4, 260, 40, 16, 0.5, {.b_column_major = true}, 90,
          {address(lora_shrink_splitk_kernel<float, 4>), address(lora_fwd_decode_kernel<float, 4>)});
  run_fwd("fwd fp32 M=16", at::kFloat, 16, 130, 24, 3, 0.5, {.ld_x = 131, .bias = false}, 90,
          {address(lora_shrink_splitk_kernel<float, 16>), address(lora_fwd_decode_kernel<float, 16>)});
  // A build whose newest architecture is older than the GPU's (PTX of sm_75: no tensor-core code), or no image.
  run_fwd("fwd bf16 M=4 sm_75 PTX", bf16, 4, 264, 40, 16, 0.5, {}, 75,
          {address(lora_shrink_splitk_kernel<BF, 4>), address(lora_fwd_decode_kernel<BF, 4>)});
  run_no_image("fwd bf16 M=1 no image", [] {
    const at::Tensor x = ints({1, 264}, 2, at::kBFloat16, 1), w = ints({40, 264}, 2, at::kBFloat16, 2);
    const at::Tensor a = ints({16, 264}, 2, at::kBFloat16, 3), b = ints({40, 16}, 2, at::kBFloat16, 4);
    (void)lora_fwd_cuda_launch(x, std::nullopt, w, a, b, 0.5, std::nullopt);
  }, {address(lora_shrink_splitk_kernel<BF, 1>)});
  // r = 256: S fills the forward's shared memory (16 KiB at M = 16).
  run_fwd("fwd fp16 M=16 r=256", at::kHalf, 16, 72, 24, 256, 0.5, {.bias = false}, 80,
          {address(lora_shrink_splitk_kernel<c10::Half, 16>), address(lora_fwd_decode_mma_kernel<c10::Half, true>)});
  // The GEMM path: M > 16, float64, r > 256, a transposed W; with and without bias.
  run_fwd("fwd bf16 M=17 gemm", bf16, 17, 64, 40, 8, 0.5, {}, 90, {});
  run_fwd("fwd bf16 M=17 gemm no bias", bf16, 17, 64, 40, 8, 0.5, {.bias = false}, 90, {});
  run_fwd("fwd fp32 M=40 gemm scaling 0", at::kFloat, 40, 64, 40, 8, 0.0, {}, 90, {});
  run_fwd("fwd fp64 M=4 gemm", at::kDouble, 4, 64, 40, 8, 0.5, {}, 90, {});
  run_fwd("fwd fp16 M=2 r=257 gemm", at::kHalf, 2, 16, 24, 257, 0.5, {.bias = false}, 90, {});
  run_fwd("fwd bf16 M=2 W transposed gemm", bf16, 2, 64, 40, 8, 0.5, {.w_transposed = true}, 90, {});
  run_fwd("fwd bf16 M=3 K=0 gemm", bf16, 3, 0, 40, 8, 0.5, {}, 90, {});
  run_fwd("fwd bf16 M=3 N=0 gemm", bf16, 3, 64, 0, 8, 0.5, {}, 90, {});
  run_fwd("fwd bf16 M=0 gemm", bf16, 0, 64, 40, 8, 0.5, {}, 90, {});
  // Scaling 0 with an Inf in lora_b: NaN in its column, on the GEMM path (with and without bias) and decode.
  run_fwd_zero_scaling_inf("fwd gemm scaling 0 Inf", 17, true, {});
  run_fwd_zero_scaling_inf("fwd gemm scaling 0 Inf no bias", 17, false, {});
  run_fwd_zero_scaling_inf("fwd decode scaling 0 Inf", 4, true,
                           {address(lora_shrink_splitk_kernel<BF, 4>), address(lora_fwd_decode_mma_kernel<BF, false>)},
                           {false, true});
}

// ---- lora_bwd_dy -------------------------------------------------------------------------------------------------
// dy [M, N] (rows padded to ld_dy, transposed, or one element into its buffer), S [M, r] fp32 (fp64 for fp64 dy),
// column-major or not, lora_b [N, r] contiguous, column-major, or the .t() of a [r, N] view one element into its
// buffer (whose .t().contiguous() is that misaligned view itself: the launcher must copy it for 16-byte loads).
struct BwdLayout {
  int64_t ld_dy = 0;
  bool dy_transposed = false, dy_misaligned = false, s_column_major = false, b_column_major = false;
  bool b_misaligned_transpose = false;
  bool s_past_fp16 = false;  // S of 70000 and -69999 in one column: past fp16's 65504, their dB sum is not
};

void run_bwd(const std::string& what, at::ScalarType dtype, int64_t M, int64_t N, int64_t r, const BwdLayout& layout,
             int arch, const std::vector<const void*>& kernels, uint64_t seed = 1) {
  g_compiled_arch = arch;
  const double scaling = 0.5;
  const at::ScalarType s_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dy = ints({M, N}, 3, dtype, seed), s = ints({M, r}, 8, s_dtype, seed + 1);
  at::Tensor b = ints({N, r}, 3, dtype, seed + 2);
  if (layout.s_past_fp16) {
    s[0][0] = 70000.0;
    s[1][0] = -69999.0;
  }
  const at::Tensor db_ref = at::mm(dy.to(at::kDouble).t(), s.to(at::kDouble)) * scaling;
  const at::Tensor ds_ref = at::mm(dy.to(at::kDouble), b.to(at::kDouble)) * scaling;
  if (layout.ld_dy) dy = padded_rows(dy, layout.ld_dy);
  if (layout.dy_transposed) dy = column_major(dy);
  if (layout.dy_misaligned) dy = offset_view(dy, 1);
  if (layout.s_column_major) s = column_major(s);
  if (layout.b_column_major) b = column_major(b);
  if (layout.b_misaligned_transpose) b = offset_view(b.t().contiguous(), 1).t();
  call(what, [&] {
    const auto [db, ds] = lora_bwd_dy_cuda_launch(dy, s, b, scaling);
    expect_launches(what, kernels);
    expect_equal(what + ": dB", db, db_ref.to(s_dtype));
    expect_equal(what + ": dS", ds, ds_ref.to(s_dtype));
  });
}

void bwd_cases(bool quick) {
  using BF = c10::BFloat16;
  const auto bf16 = at::kBFloat16;
  // Tensor cores: fp16/bf16, r <= 32, dy rows of whole 16-byte loads. Two column blocks (ds partials summed); M = 140
  // at r = 32: two row blocks (dB partials summed).
  run_bwd("bwd bf16 r=8", bf16, 40, 72, 8, {}, 90, {address(lora_bwd_dy_mma_kernel<BF, 1>)});
  run_bwd("bwd bf16 lora_b misaligned transpose", bf16, 40, 72, 16, {.b_misaligned_transpose = true}, 90,
          {address(lora_bwd_dy_mma_kernel<BF, 1>)});
  if (quick) return;
  run_bwd("bwd fp16 r=32 two row blocks", at::kHalf, 140, 72, 32, {.s_column_major = true}, 80,
          {address(lora_bwd_dy_mma_kernel<c10::Half, 2>)});
  run_bwd("bwd bf16 r=17 rows of 80", bf16, 40, 72, 17, {.ld_dy = 80, .b_column_major = true}, 90,
          {address(lora_bwd_dy_mma_kernel<BF, 2>)});
  // CUDA cores: r past 32, fp32, N % 8 != 0, dy transposed, rows of 76, dy misaligned, PTX of sm_75.
  run_bwd("bwd bf16 r=33", bf16, 40, 72, 33, {}, 90, {address(lora_bwd_dy_kernel<BF>)});
  run_bwd("bwd bf16 r=64", bf16, 40, 72, 64, {.b_misaligned_transpose = true}, 90, {address(lora_bwd_dy_kernel<BF>)});
  run_bwd("bwd fp32 r=8", at::kFloat, 40, 72, 8, {.s_column_major = true}, 90, {address(lora_bwd_dy_kernel<float>)});
  run_bwd("bwd bf16 N=70", bf16, 40, 70, 8, {}, 90, {address(lora_bwd_dy_kernel<BF>)});
  run_bwd("bwd bf16 dy transposed", bf16, 40, 72, 8, {.dy_transposed = true}, 90, {address(lora_bwd_dy_kernel<BF>)});
  run_bwd("bwd fp16 rows of 76", at::kHalf, 40, 72, 8, {.ld_dy = 76}, 90, {address(lora_bwd_dy_kernel<c10::Half>)});
  run_bwd("bwd bf16 dy misaligned", bf16, 40, 72, 8, {.dy_misaligned = true}, 90, {address(lora_bwd_dy_kernel<BF>)});
  run_bwd("bwd bf16 sm_75 PTX", bf16, 40, 72, 8, {}, 75, {address(lora_bwd_dy_kernel<BF>)});
  run_no_image("bwd bf16 no image", [] {
    const at::Tensor dy = ints({40, 72}, 3, at::kBFloat16, 1), s = ints({40, 8}, 8, at::kFloat, 2);
    (void)lora_bwd_dy_cuda_launch(dy, s, ints({72, 8}, 3, at::kBFloat16, 3), 0.5);
  }, {address(lora_bwd_dy_kernel<BF>)});
  // Two cuBLAS GEMMs: r > 64, float64. dB from the float32 S: rounded to fp16, S past 65504 was inf and dB NaN,
  // where the kernel at r = 64 is finite.
  run_bwd("bwd bf16 r=65 gemm", bf16, 40, 72, 65, {}, 90, {});
  run_bwd("bwd fp16 r=64 S past fp16", at::kHalf, 40, 72, 64, {.s_past_fp16 = true}, 90,
          {address(lora_bwd_dy_kernel<c10::Half>)});
  run_bwd("bwd fp16 r=65 gemm S past fp16", at::kHalf, 40, 72, 65, {.s_past_fp16 = true}, 90, {});
  run_bwd("bwd fp64 gemm", at::kDouble, 40, 72, 8, {}, 90, {});
  // Empty: zeros of the accumulation dtype, nothing launched.
  run_bwd("bwd bf16 M=0", bf16, 0, 72, 8, {}, 90, {});
  run_bwd("bwd fp64 N=0", at::kDouble, 40, 0, 8, {}, 90, {});
}

int main(int argc, char** argv) { return run_harness(argc, argv, name_kernels, {fwd_cases, bwd_cases}); }
