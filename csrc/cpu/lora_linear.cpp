// CPU implementations of lora_fwd and lora_bwd_dy (schemas in csrc/ops.cpp). They compose ATen GEMMs in float32
// (float64 for float64 inputs, s and the gradients included), so half-precision inputs are rounded once, when y is
// stored: the base GEMM, the LoRA expand and the bias share one fp32 accumulator, as in the fused GPU kernels; at
// decode sizes the 16-bit base GEMM stays 16-bit (see lora_fwd_cpu).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../lora_checks.h"
#include "../no_autocast.h"

namespace lora_kernels {
namespace {

// Rows up to which a 16-bit forward keeps the base GEMM in 16 bits (see lora_fwd_cpu).
constexpr int64_t kDecodeMaxM = 16;

at::ScalarType accumulate_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> lora_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& x_lora,
                                                const at::Tensor& weight, const at::Tensor& lora_a,
                                                const at::Tensor& lora_b, double scaling,
                                                const std::optional<at::Tensor>& bias) {
  const AutocastOff autocast_off;
  check_lora_fwd(x, x_lora, weight, lora_a, lora_b, scaling, bias);
  const at::ScalarType acc = accumulate_type(x.scalar_type());
  const at::Tensor x_acc = x.to(acc);
  const at::Tensor x_lora_acc = x_lora.has_value() ? x_lora->to(acc) : x_acc;
  const at::Tensor s = at::mm(x_lora_acc, lora_a.to(acc).t());  // [M, r], unscaled
  at::Tensor y;
  if (x.scalar_type() != acc && x.size(0) <= kDecodeMaxM) {
    // Decode sizes, 16-bit: an fp32 copy of W (N·K conversions and a second pass over W) costs more than the
    // M·N·K GEMM itself, so the base GEMM runs in x's dtype (fp32 accumulation inside ATen) and y is rounded to it
    // once before the LoRA term, as the CUDA GEMM path rounds. bf16, K = N = 4096, r = 16, one thread of this
    // project's CPU (no bf16 matrix units): M = 1 took 3.6 ms (F.linear 3.3 ms) against 55 ms through the fp32 copy;
    // M = 16 51 ms against 65 ms; from M = 32 on the fp32 copy was faster (83 ms against 105 ms in bf16).
    y = (bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t())).to(acc);
  } else {
    y = bias.has_value() ? at::addmm(bias->to(acc), x_acc, weight.to(acc).t()) : at::mm(x_acc, weight.to(acc).t());
  }
  // Scaling S (M·r multiplies) rather than passing it as addmm's alpha: BLAS skips the product when alpha is 0, so
  // at scaling 0 a NaN/Inf in lora_b or S vanished here while the reference, the other backends and PEFT return
  // NaN (0·NaN). S is fp32 (fp64); scaling it first overflows only where |scaling·S| passes float32's range, which a
  // scaling near float32's largest value (~1e38) with tiny lora_b could reach while the product stays finite.
  y.addmm_(s.mul(scaling), lora_b.to(acc).t());
  return {y.to(x.scalar_type()), s};  // s in the accumulate type: float32, or float64 for float64
}

std::tuple<at::Tensor, at::Tensor> lora_bwd_dy_cpu(const at::Tensor& dy, const at::Tensor& s,
                                                   const at::Tensor& lora_b, double scaling) {
  const AutocastOff autocast_off;
  check_lora_bwd_dy(dy, s, lora_b, scaling);
  const at::ScalarType acc = accumulate_type(dy.scalar_type());
  const at::Tensor dy_acc = dy.to(acc);
  at::Tensor d_lora_b = at::mm(dy_acc.t(), s.to(acc)).mul_(scaling);  // [N, r]
  at::Tensor ds = at::mm(dy_acc, lora_b.to(acc)).mul_(scaling);       // [M, r]
  return {d_lora_b, ds};
}

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("lora_fwd", &lora_kernels::lora_fwd_cpu);
  m.impl("lora_bwd_dy", &lora_kernels::lora_bwd_dy_cpu);
}
