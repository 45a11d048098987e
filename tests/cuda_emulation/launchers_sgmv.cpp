// Runs the launchers of csrc/cuda/sgmv.cu, sgmv_shrink_cuda_launch and sgmv_expand_cuda_launch, on CPU tensors: the
// whole file compiled as host C++ (tests/test_cuda_emulation.py copies it with its launches rewritten into emu.h's
// emulation, host_stubs/ answering its CUDA runtime calls), so the launchers' choice between the decode (bgmv),
// tensor-core and CUDA-core kernels, the arguments they fill in (SgmvArgs from the tensors' strides), their K-split,
// zero-filled partials and fixed-order sum, all run. Each case checks which kernel was launched and the output against
// a float64 reference on integer-valued data, exactly: LoRABatch-like metadata with -1 tokens, heterogeneous ranks
// with NaN past each (in A, B and t: never read), several adapter slots.
// Prints "N cases, F failures"; exits 1 on a failure. `quick`: a few cases of each launcher.
#include <ATen/ATen.h>

#define LK_EMU_LAUNCHERS
#include "emu.h"
#include "sgmv.cu"  // the test's rewritten copy
#include "launcher_harness.h"

using namespace lora_kernels;
using namespace lk_test;
using BF = c10::BFloat16;

void name_kernels() {
  auto add = [](const void* kernel, const char* name) { g_kernel_names.push_back({kernel, name}); };
#define LK_NAME(...) add(address(__VA_ARGS__), #__VA_ARGS__)
  LK_NAME(bgmv_shrink_kernel<BF>); LK_NAME(bgmv_shrink_kernel<c10::Half>); LK_NAME(bgmv_shrink_kernel<float>);
  LK_NAME(bgmv_expand_kernel<BF>); LK_NAME(bgmv_expand_kernel<c10::Half>); LK_NAME(bgmv_expand_kernel<float>);
  LK_NAME(sgmv_shrink_mma_kernel<BF>); LK_NAME(sgmv_shrink_mma_kernel<c10::Half>);
  LK_NAME(sgmv_expand_mma_kernel<BF>); LK_NAME(sgmv_expand_mma_kernel<c10::Half>);
  LK_NAME(sgmv_kernel<true, float>); LK_NAME(sgmv_kernel<true, double>);
  LK_NAME(sgmv_kernel<false, float>); LK_NAME(sgmv_kernel<false, double>);
#undef LK_NAME
}

// One batch: M tokens on L adapter slots of ranks R, R - 1, R / 2, 0, R, 1, R / 2, 0, ... (max rank R), the metadata
// of harness.h's make_meta (`dist`: which slots the tokens take, -1 for none), and scalings 1/4 .. 4.
struct Batch {
  int64_t M, L, R;
  Meta meta;
  std::vector<int32_t> rank_values;
  at::Tensor ids, starts, counts, ranks, scalings;

  Batch(int64_t M_, int64_t L_, int64_t R_, const std::string& dist, uint32_t seed) : M(M_), L(L_), R(R_) {
    std::mt19937 rng(seed);
    meta = make_meta(int(M), int(L), rng, dist);
    for (int64_t s = 0; s < L; ++s) rank_values.push_back(int32_t(s % 4 == 0 ? R : s % 4 == 2 ? R / 2 : s % 4 == 1));
    if (L > 1) rank_values[1] = int32_t(std::max<int64_t>(R - 1, 1));
    const auto int32 = [](const std::vector<int32_t>& v) {
      return at::tensor(at::ArrayRef<int32_t>(v), at::TensorOptions().dtype(at::kInt));
    };
    ids = int32(meta.sorted), starts = int32(meta.starts), counts = int32(meta.counts), ranks = int32(rank_values);
    std::vector<float> scale(L);
    for (int64_t s = 0; s < L; ++s) scale[s] = std::ldexp(1.0f, int(s % 5) - 2);
    scalings = at::tensor(at::ArrayRef<float>(scale), at::TensorOptions().dtype(at::kFloat));
  }
  int64_t slot(int64_t token) const { return meta.ids[token]; }
  int64_t rank_of(int64_t token) const { return slot(token) >= 0 ? rank_values[slot(token)] : 0; }
};

// [L, C, K] integers, NaN at rank indices at or past each slot's rank (C the rank for A, K the rank for B).
at::Tensor adapter_weights(const Batch& batch, int64_t C, int64_t K, bool rank_is_c, at::ScalarType dtype,
                           uint64_t seed) {
  at::Tensor w = ints({batch.L, C, K}, 3, at::kDouble, seed);
  for (int64_t s = 0; s < batch.L; ++s) {
    const int64_t rank = batch.rank_values[s];
    if (rank_is_c) w[s].narrow(0, rank, C - rank).fill_(std::nan(""));
    else w[s].narrow(1, rank, K - rank).fill_(std::nan(""));
  }
  return w.to(dtype);
}

// `t` [L, C, K] with its slots `gap` elements further apart than C * K (a view into a buffer of its own).
at::Tensor slots_apart(const at::Tensor& t, int64_t gap) {
  const int64_t L = t.size(0), C = t.size(1), K = t.size(2);
  at::Tensor buffer = at::full({L * (C * K + gap)}, std::nan(""), t.options());
  at::Tensor view = buffer.as_strided({L, C, K}, {C * K + gap, K, 1});
  view.copy_(t);
  return view;
}

// `t` with its last dimension every other element of a buffer of its own (unit stride nowhere).
at::Tensor every_other(const at::Tensor& t) {
  std::vector<int64_t> shape = t.sizes().vec();
  shape.back() *= 2;
  at::Tensor view = at::full(shape, std::nan(""), t.options()).slice(-1, 0, shape.back(), 2);
  view.copy_(t);
  return view;
}

struct ShrinkLayout {
  int64_t ld = 0;    // x's and A's rows padded to ld elements
  int64_t a_ld = 0;  // A's alone
  int64_t a_slot_gap = 0;  // A's slots that many elements further apart than R * K
  bool x_misaligned = false, a_misaligned = false, x_every_other = false, a_every_other = false;
};

void run_shrink(const std::string& what, at::ScalarType dtype, int64_t M, int64_t L, int64_t K, int64_t R,
                const std::string& dist, const ShrinkLayout& layout, int arch,
                const std::vector<const void*>& kernels, uint32_t seed = 1) {
  g_compiled_arch = arch;
  const Batch batch(M, L, R, dist, seed);
  at::Tensor x = ints({M, K}, 4, dtype, seed + 1), a = adapter_weights(batch, R, K, true, dtype, seed + 2);
  at::Tensor want = at::zeros({M, R}, at::kDouble);
  const at::Tensor xd = x.to(at::kDouble), ad = a.to(at::kDouble);
  for (int64_t tok = 0; tok < M; ++tok) {
    const int64_t s = batch.slot(tok), rank = batch.rank_of(tok);
    if (s < 0 || rank == 0) continue;
    want[tok].narrow(0, 0, rank).copy_(at::mv(ad[s].narrow(0, 0, rank), xd[tok]) *
                                       double(batch.scalings[s].item<float>()));
  }
  if (layout.ld) {
    x = padded_rows(x, layout.ld);
    a = padded_rows(a.reshape({L * R, K}), layout.ld).view({L, R, K});
  }
  if (layout.x_misaligned) x = offset_view(x, 1);
  if (layout.a_ld) a = padded_rows(a.reshape({L * R, K}), layout.a_ld).view({L, R, K});
  if (layout.a_slot_gap) a = slots_apart(a, layout.a_slot_gap);
  if (layout.a_misaligned) a = offset_view(a, 1);
  if (layout.x_every_other) x = every_other(x);
  if (layout.a_every_other) a = every_other(a);
  call(what, [&] {
    const at::Tensor out = sgmv_shrink_cuda_launch(x, a, batch.ids, batch.starts, batch.counts, batch.scalings,
                                                   batch.ranks);
    expect_launches(what, kernels);
    expect_equal(what, out, want.to(at::kFloat));
  });
}

// out [M, n_total] of out_dtype, integers, the expand adding B's N columns at `offset`; t [M, R] fp32 (NaN past each
// token's rank), column-major if t_column_major.
struct ExpandLayout {
  int64_t offset = 8, n_total = 0;  // n_total 0: N + 16
  bool t_column_major = false, out_misaligned = false;  // out_misaligned: out one element into its buffer
  int64_t b_slot_gap = 0;  // B's slots that many elements further apart than N * R
  bool b_misaligned = false, b_every_other = false;  // B one element into its buffer; its rank every other element
};

void run_expand(const std::string& what, at::ScalarType dtype, at::ScalarType out_dtype, int64_t M, int64_t L,
                int64_t R, int64_t N, const std::string& dist, const ExpandLayout& layout, int arch,
                const std::vector<const void*>& kernels, uint32_t seed = 1) {
  g_compiled_arch = arch;
  const Batch batch(M, L, R, dist, seed);
  const int64_t n_total = layout.n_total ? layout.n_total : N + 16;
  at::Tensor b = adapter_weights(batch, N, R, false, dtype, seed + 1);
  at::Tensor t = ints({M, R}, 3, at::kFloat, seed + 2);
  for (int64_t tok = 0; tok < M; ++tok) t[tok].narrow(0, batch.rank_of(tok), R - batch.rank_of(tok)).fill_(NAN);
  at::Tensor out = ints({M, n_total}, 4, out_dtype, seed + 3);
  at::Tensor want = out.to(at::kDouble);
  const at::Tensor bd = b.to(at::kDouble), td = t.to(at::kDouble);
  for (int64_t tok = 0; tok < M; ++tok) {
    const int64_t s = batch.slot(tok), rank = batch.rank_of(tok);
    if (s < 0 || rank == 0) continue;
    want[tok].narrow(0, layout.offset, N).add_(at::mv(bd[s].narrow(1, 0, rank), td[tok].narrow(0, 0, rank)));
  }
  if (layout.t_column_major) t = column_major(t);
  if (layout.out_misaligned) out = offset_view(out, 1);
  if (layout.b_slot_gap) b = slots_apart(b, layout.b_slot_gap);
  if (layout.b_misaligned) b = offset_view(b, 1);
  if (layout.b_every_other) b = every_other(b);
  call(what, [&] {
    sgmv_expand_cuda_launch(t, b, batch.ids, batch.starts, batch.counts, batch.ranks, out, layout.offset);
    expect_launches(what, kernels);
    expect_equal(what, out, want.to(out_dtype));
  });
}

void shrink_cases(bool quick) {
  const auto bf16 = at::kBFloat16;
  // Decode batches (at most 64 tokens, or 4 per slot), rows of whole 16-byte loads: one token per block.
  run_shrink("shrink bf16 decode", bf16, 6, 3, 264, 16, "distinct", {}, 90, {address(bgmv_shrink_kernel<BF>)});
  // Prefill batches of 16-bit rows: tensor cores (two column tiles of rank, -1 tokens).
  run_shrink("shrink bf16 prefill", bf16, 70, 2, 136, 40, "mixed_base", {}, 80, {address(sgmv_shrink_mma_kernel<BF>)});
  if (quick) return;
  run_shrink("shrink fp16 decode rows of 272", at::kHalf, 10, 5, 264, 16, "mixed_base", {.ld = 272}, 90,
             {address(bgmv_shrink_kernel<c10::Half>)});
  run_shrink("shrink bf16 4 tokens per slot", bf16, 100, 25, 72, 8, "distinct", {}, 90,
             {address(bgmv_shrink_kernel<BF>)});
  run_shrink("shrink bf16 decode all -1", bf16, 6, 3, 264, 16, "all_base", {}, 90, {address(bgmv_shrink_kernel<BF>)});
  run_shrink("shrink fp32 decode", at::kFloat, 6, 3, 132, 16, "mixed_base", {}, 90,
             {address(bgmv_shrink_kernel<float>)});
  run_shrink("shrink fp16 prefill rows of 144", at::kHalf, 70, 2, 136, 16, "two", {.ld = 144}, 90,
             {address(sgmv_shrink_mma_kernel<c10::Half>)});
  // The CUDA-core kernel: prefill on PTX of sm_75, fp32 prefill; rows 16-byte loads cannot read whole (K % 8 != 0,
  // rows of 139, x one element into its buffer) at decode and prefill sizes.
  const std::vector<const void*> cuda_core = {address(sgmv_kernel<true, float>)};
  run_shrink("shrink bf16 prefill sm_75 PTX", bf16, 70, 2, 136, 40, "mixed_base", {}, 75, cuda_core);
  run_shrink("shrink fp32 prefill", at::kFloat, 70, 2, 132, 16, "mixed_base", {}, 90, cuda_core);
  run_shrink("shrink bf16 decode K=130", bf16, 6, 3, 130, 16, "mixed_base", {}, 90, cuda_core);
  // K not a multiple of 8 in rows that are (NaN-padded): a 16-byte load would read past K.
  run_shrink("shrink bf16 decode K=130 rows of 136", bf16, 6, 3, 130, 16, "mixed_base", {.ld = 136}, 90, cuda_core);
  run_shrink("shrink bf16 prefill K=130 rows of 136", bf16, 70, 2, 130, 16, "mixed_base", {.ld = 136}, 90, cuda_core);
  run_shrink("shrink bf16 prefill rows of 139", bf16, 70, 2, 136, 16, "mixed_base", {.ld = 139}, 90, cuda_core);
  run_shrink("shrink bf16 decode x misaligned", bf16, 6, 3, 264, 16, "mixed_base", {.x_misaligned = true}, 90,
             cuda_core);
  // ... and each of lora_a's own conditions alone (x's rows whole 16-byte loads): rows of 268, slots 4 elements
  // further apart, one element into its buffer; and x's or lora_a's K every other element (strides of 2)
  run_shrink("shrink bf16 decode lora_a rows of 268", bf16, 6, 3, 264, 16, "mixed_base", {.a_ld = 268}, 90, cuda_core);
  run_shrink("shrink bf16 decode lora_a slots apart", bf16, 6, 3, 264, 16, "mixed_base", {.a_slot_gap = 4}, 90,
             cuda_core);
  run_shrink("shrink bf16 decode lora_a misaligned", bf16, 6, 3, 264, 16, "mixed_base", {.a_misaligned = true}, 90,
             cuda_core);
  run_shrink("shrink bf16 decode x every other", bf16, 6, 3, 264, 16, "mixed_base", {.x_every_other = true}, 90,
             cuda_core);
  run_shrink("shrink bf16 decode lora_a every other", bf16, 6, 3, 264, 16, "mixed_base", {.a_every_other = true}, 90,
             cuda_core);
  // float64: sgmv_kernel<double>, at decode and prefill sizes.
  run_shrink("shrink fp64 decode", at::kDouble, 6, 3, 40, 16, "mixed_base", {}, 90,
             {address(sgmv_kernel<true, double>)});
  run_shrink("shrink fp64 prefill", at::kDouble, 70, 2, 40, 16, "mixed_base", {}, 90,
             {address(sgmv_kernel<true, double>)});
  // No tokens: nothing launched, an empty output. K = 0: zeros (torch gives empty rows a stride of 1, which is not
  // 16-byte loads: the CUDA-core kernel, its K-range empty).
  run_shrink("shrink bf16 M=0", bf16, 0, 3, 264, 16, "distinct", {}, 90, {});
  run_shrink("shrink bf16 decode K=0", bf16, 6, 3, 0, 16, "distinct", {}, 90, cuda_core);
  run_shrink("shrink bf16 prefill K=0", bf16, 70, 2, 0, 16, "two", {}, 90, cuda_core);
}

void expand_cases(bool quick) {
  const auto bf16 = at::kBFloat16;
  run_expand("expand bf16 decode", bf16, at::kFloat, 6, 3, 16, 300, "distinct", {}, 90,
             {address(bgmv_expand_kernel<BF>)});
  // Prefill, 16-bit B on tensor cores: into out through the staged 16-byte epilogue (rows and slice start 16-byte
  // aligned), and element by element (slice at column 5).
  run_expand("expand bf16 prefill staged", bf16, bf16, 70, 2, 16, 300, "mixed_base", {}, 80,
             {address(sgmv_expand_mma_kernel<BF>)});
  if (quick) return;
  run_expand("expand bf16 prefill offset 5", bf16, bf16, 70, 2, 24, 300, "mixed_base", {.offset = 5}, 90,
             {address(sgmv_expand_mma_kernel<BF>)});
  // Rows of 320 (16-byte aligned) but the slice at column 4, or out one element into its buffer: not the staged
  // 16-byte epilogue (each of its conditions alone; a misaligned 16-byte access stops the run).
  run_expand("expand bf16 prefill offset 4 rows of 320", bf16, bf16, 70, 2, 16, 300, "mixed_base",
             {.offset = 4, .n_total = 320}, 90, {address(sgmv_expand_mma_kernel<BF>)});
  run_expand("expand bf16 prefill out misaligned", bf16, bf16, 70, 2, 16, 300, "mixed_base",
             {.n_total = 320, .out_misaligned = true}, 90, {address(sgmv_expand_mma_kernel<BF>)});
  run_expand("expand fp16 prefill to fp32", at::kHalf, at::kFloat, 70, 2, 16, 300, "two", {.t_column_major = true},
             90, {address(sgmv_expand_mma_kernel<c10::Half>)});
  run_expand("expand fp16 decode to fp16 N=1100", at::kHalf, at::kHalf, 5, 2, 8, 1100, "mixed_base", {}, 90,
             {address(bgmv_expand_kernel<c10::Half>)});
  run_expand("expand fp32 decode", at::kFloat, at::kFloat, 6, 3, 16, 300, "mixed_base", {}, 90,
             {address(bgmv_expand_kernel<float>)});
  // Rank rows of 13, which 16-byte loads cannot read whole: not the decode kernel but, for 16-bit B, the tensor-core
  // one (it reads B element by element), for fp32 B the CUDA-core one.
  run_expand("expand bf16 decode R=13", bf16, at::kFloat, 6, 3, 13, 300, "mixed_base", {}, 90,
             {address(sgmv_expand_mma_kernel<BF>)});
  run_expand("expand fp32 decode R=13", at::kFloat, at::kFloat, 6, 3, 13, 300, "mixed_base", {}, 90,
             {address(sgmv_kernel<false, float>)});
  // ... and each of B's other conditions alone: slots 4 elements further apart, one element into its buffer, the rank
  // every other element
  run_expand("expand bf16 decode lora_b slots apart", bf16, at::kFloat, 6, 3, 16, 300, "mixed_base",
             {.b_slot_gap = 4}, 90, {address(sgmv_expand_mma_kernel<BF>)});
  run_expand("expand bf16 decode lora_b misaligned", bf16, at::kFloat, 6, 3, 16, 300, "mixed_base",
             {.b_misaligned = true}, 90, {address(sgmv_expand_mma_kernel<BF>)});
  run_expand("expand bf16 decode lora_b every other", bf16, at::kFloat, 6, 3, 16, 300, "mixed_base",
             {.b_every_other = true}, 90, {address(sgmv_expand_mma_kernel<BF>)});
  // The CUDA-core kernel: PTX of sm_75, fp32 B at prefill.
  run_expand("expand bf16 prefill sm_75 PTX", bf16, bf16, 70, 2, 16, 300, "mixed_base", {}, 75,
             {address(sgmv_kernel<false, float>)});
  run_expand("expand fp32 prefill", at::kFloat, at::kFloat, 70, 2, 16, 300, "mixed_base", {}, 90,
             {address(sgmv_kernel<false, float>)});
  // float64 B or out: sgmv_kernel<double>.
  run_expand("expand bf16 decode to fp64", bf16, at::kDouble, 6, 3, 16, 300, "mixed_base", {}, 90,
             {address(sgmv_kernel<false, double>)});
  run_expand("expand fp64 prefill to fp32", at::kDouble, at::kFloat, 70, 2, 16, 300, "mixed_base", {}, 90,
             {address(sgmv_kernel<false, double>)});
  run_expand("expand bf16 M=0", bf16, bf16, 0, 3, 16, 300, "distinct", {}, 90, {});
  run_expand("expand bf16 decode N=0", bf16, bf16, 6, 3, 16, 0, "distinct", {}, 90, {});
}

int main(int argc, char** argv) { return run_harness(argc, argv, name_kernels, {shrink_cases, expand_cases}); }
