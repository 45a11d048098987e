// CPU implementations of the grouped ops sgmv_shrink and sgmv_expand (schemas in csrc/ops.cpp): a loop over
// adapter slots using the LoRABatch metadata, each slot one gather + GEMM at its real rank, so entries of A/B
// past ranks[i] (which may hold NaN) are never read. Accumulation in fp32 (fp64 when an operand is fp64).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../lora_checks.h"

namespace lora_kernels {
namespace {

at::ScalarType accumulate_type(at::ScalarType a, at::ScalarType b) {
  return (a == at::kDouble || b == at::kDouble) ? at::kDouble : at::kFloat;
}

at::Tensor sgmv_shrink_cpu(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& sorted_token_ids,
                           const at::Tensor& slot_starts, const at::Tensor& slot_counts, const at::Tensor& scalings,
                           const at::Tensor& ranks) {
  check_sgmv_shrink(x, lora_a, sorted_token_ids, slot_starts, slot_counts, scalings, ranks);
  const int64_t num_tokens = x.size(0), max_rank = lora_a.size(1);
  check_sgmv_metadata_values_cpu("sgmv_shrink", num_tokens, max_rank, sorted_token_ids, slot_starts, slot_counts,
                                 ranks);
  at::Tensor out = at::zeros({num_tokens, max_rank}, x.options().dtype(at::kFloat));
  const at::ScalarType acc = accumulate_type(x.scalar_type(), x.scalar_type());
  const at::Tensor token_ids = sorted_token_ids.to(at::kLong);
  const auto starts = slot_starts.accessor<int32_t, 1>();
  const auto counts = slot_counts.accessor<int32_t, 1>();
  const auto rank_values = ranks.accessor<int32_t, 1>();
  const auto scale_values = scalings.accessor<float, 1>();
  for (int64_t slot = 0; slot < lora_a.size(0); ++slot) {
    const int64_t count = counts[slot], rank = rank_values[slot];
    if (count == 0 || rank == 0) {
      continue;
    }
    const at::Tensor tokens = token_ids.narrow(0, starts[slot], count);
    const at::Tensor xs = x.index_select(0, tokens).to(acc);               // [count, K]
    const at::Tensor a = lora_a.select(0, slot).narrow(0, 0, rank).to(acc);  // [rank, K]
    const at::Tensor shrunk = at::mm(xs, a.t()).mul_(static_cast<double>(scale_values[slot]));
    out.narrow(1, 0, rank).index_copy_(0, tokens, shrunk.to(at::kFloat));
  }
  return out;
}

void sgmv_expand_cpu(const at::Tensor& t, const at::Tensor& lora_b, const at::Tensor& sorted_token_ids,
                     const at::Tensor& slot_starts, const at::Tensor& slot_counts, const at::Tensor& ranks,
                     const at::Tensor& out, int64_t slice_offset) {
  check_sgmv_expand(t, lora_b, sorted_token_ids, slot_starts, slot_counts, ranks, out, slice_offset);
  const int64_t num_tokens = t.size(0), max_rank = lora_b.size(2), width = lora_b.size(1);
  check_sgmv_metadata_values_cpu("sgmv_expand", num_tokens, max_rank, sorted_token_ids, slot_starts, slot_counts,
                                 ranks);
  const at::ScalarType acc = accumulate_type(lora_b.scalar_type(), out.scalar_type());
  const at::Tensor token_ids = sorted_token_ids.to(at::kLong);
  at::Tensor out_slice = out.narrow(1, slice_offset, width);
  const auto starts = slot_starts.accessor<int32_t, 1>();
  const auto counts = slot_counts.accessor<int32_t, 1>();
  const auto rank_values = ranks.accessor<int32_t, 1>();
  for (int64_t slot = 0; slot < lora_b.size(0); ++slot) {
    const int64_t count = counts[slot], rank = rank_values[slot];
    if (count == 0 || rank == 0) {
      continue;
    }
    const at::Tensor tokens = token_ids.narrow(0, starts[slot], count);
    const at::Tensor ts = t.index_select(0, tokens).narrow(1, 0, rank).to(acc);  // [count, rank]
    const at::Tensor b = lora_b.select(0, slot).narrow(1, 0, rank).to(acc);      // [N, rank]
    // Read the output rows, add in the accumulation type, round once on the way back.
    at::Tensor rows = out_slice.index_select(0, tokens).to(acc);
    rows.addmm_(ts, b.t());
    out_slice.index_copy_(0, tokens, rows.to(out.scalar_type()));
  }
}

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("sgmv_shrink", &lora_kernels::sgmv_shrink_cpu);
  m.impl("sgmv_expand", &lora_kernels::sgmv_expand_cpu);
}
