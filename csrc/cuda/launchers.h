// Host-side entry points of the CUDA implementations, defined in the .cu files and called ONLY from
// csrc/cuda/register_cuda.cpp (compiled by the host compiler), which validates every argument first
// (csrc/lora_checks.h) and holds the TORCH_LIBRARY_IMPL(lora_kernels, CUDA) registrations.
//
// Contract: the arguments are already validated; a launcher never throws for user input (only CUDA launch or
// runtime errors, e.g. C10_CUDA_KERNEL_LAUNCH_CHECK). The checks live in one host-compiled file so each op checks its
// arguments once, with the messages of csrc/checks.h (whose header says why they avoid std::ostream).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace lora_kernels {

// CUDA's limit on a grid's y and z dimensions. The sgmv kernels' (token tiles of kSgmvTileTokens, adapter slots):
// register_cuda.cpp checks them against it before launching; lora_linear.cu's tensor-core lora_bwd_dy falls back to
// its CUDA-core kernel past it.
constexpr int64_t kSgmvTileTokens = 32;
constexpr int64_t kMaxGridYZ = 65535;

// csrc/cuda/lora_linear.cu
std::tuple<at::Tensor, at::Tensor> lora_fwd_cuda_launch(const at::Tensor& x,
                                                        const std::optional<at::Tensor>& x_lora_opt,
                                                        const at::Tensor& weight, const at::Tensor& lora_a,
                                                        const at::Tensor& lora_b, double scaling,
                                                        const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor> lora_bwd_dy_cuda_launch(const at::Tensor& dy, const at::Tensor& s,
                                                           const at::Tensor& lora_b, double scaling);

// csrc/cuda/sgmv.cu
at::Tensor sgmv_shrink_cuda_launch(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& sorted_token_ids,
                                   const at::Tensor& slot_starts, const at::Tensor& slot_counts,
                                   const at::Tensor& scalings, const at::Tensor& ranks);
void sgmv_expand_cuda_launch(const at::Tensor& t, const at::Tensor& lora_b, const at::Tensor& sorted_token_ids,
                             const at::Tensor& slot_starts, const at::Tensor& slot_counts, const at::Tensor& ranks,
                             const at::Tensor& out, int64_t slice_offset);

}  // namespace lora_kernels
