// Argument checks of every lora_kernels op, written once and called first by both the CPU and the CUDA
// implementations (shapes, dtypes, devices; never values on the device, which would need a host sync).
//
// Declarations only: the definitions live in ONE host-compiled translation unit, csrc/lora_checks.cpp, so no copy
// compiled by nvcc exists (the H100 run's crashes on bad input were first put down to exceptions thrown from
// nvcc-compiled code; the H200 run found them in std::ostream's number formatting, see csrc/checks.h). The CUDA ops
// validate in csrc/cuda/register_cuda.cpp, then call the launchers of csrc/cuda/launchers.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace lora_kernels {

// x: [M, K], x_lora: [M, K] or None, weight: [N, K], lora_a: [r, K], lora_b: [N, r], bias: [N] or None.
void check_lora_fwd(const at::Tensor& x, const std::optional<at::Tensor>& x_lora_opt, const at::Tensor& weight,
                    const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
                    const std::optional<at::Tensor>& bias_opt);

// dy: [M, N], s: [M, r] float32 (float64 for float64 dy), lora_b: [N, r].
void check_lora_bwd_dy(const at::Tensor& dy, const at::Tensor& s, const at::Tensor& lora_b, double scaling);

// The grouped ops' LoRABatch metadata of M tokens and L slots: sorted_token_ids [M], slot_starts [L], slot_counts [L],
// ranks [L], all int32, contiguous, on the device of x / t.

// x: [M, K], lora_a: [L, R, K], the metadata, scalings: [L] float32.
void check_sgmv_shrink(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& sorted_token_ids,
                       const at::Tensor& slot_starts, const at::Tensor& slot_counts, const at::Tensor& scalings,
                       const at::Tensor& ranks);

// t: [M, R] float32, lora_b: [L, N, R], out: [M, N_total] with 0 <= slice_offset <= N_total - N.
void check_sgmv_expand(const at::Tensor& t, const at::Tensor& lora_b, const at::Tensor& sorted_token_ids,
                       const at::Tensor& slot_starts, const at::Tensor& slot_counts, const at::Tensor& ranks,
                       const at::Tensor& out, int64_t slice_offset);

// Value checks of the metadata, for CPU tensors only (on CUDA they would cost a host sync; the kernels clamp
// instead, so bad values never read out of bounds). ranks in [0, R], every slot's token range inside [0, M),
// token ids in [0, M), the slots' ranges disjoint and no token twice in them (the CPU kernels write a token's row
// from one thread).
void check_sgmv_metadata_values_cpu(const char* op, int64_t num_tokens, int64_t max_rank,
                                    const at::Tensor& sorted_token_ids, const at::Tensor& slot_starts,
                                    const at::Tensor& slot_counts, const at::Tensor& ranks);

}  // namespace lora_kernels
