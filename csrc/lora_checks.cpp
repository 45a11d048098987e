// Definitions of the argument checks declared in lora_checks.h, whose comments state each op's shapes. This is the
// ONLY translation unit that defines them, and it is compiled by the host C++ compiler: no nvcc-compiled copy exists.
// Messages are built by lora_kernels::message (csrc/checks.h), never with std::ostream.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "lora_checks.h"

#include "checks.h"

namespace lora_kernels {

// The kernels apply scaling in float32 to inputs narrower than float64: past float32's range it is inf there, and
// rows of x·Aᵀ that are zero came out NaN where the exact result is finite (lora_linear refuses it in Python; a direct
// call to the op, an exported program's among them, did not).
static void check_scaling(const char* op, double scaling, const at::Tensor& x) {
  LK_CHECK_VALUE(std::isfinite(scaling), op, ": scaling expected a finite float, got ", scaling);
  LK_CHECK_VALUE(x.scalar_type() == at::kDouble || std::fabs(scaling) <= std::numeric_limits<float>::max(), op,
                 ": scaling expected a number within float32's range for ", x.scalar_type(),
                 " inputs (the kernels apply it in float32), got ", scaling);
}

void check_lora_fwd(const at::Tensor& x, const std::optional<at::Tensor>& x_lora_opt,
                           const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                           double scaling, const std::optional<at::Tensor>& bias_opt) {
  constexpr const char* op = "lora_fwd";
  LK_CHECK_DIM(op, x, 2);
  LK_CHECK_FLOATING(op, x);
  LK_CHECK_DIM(op, weight, 2);
  LK_CHECK_DIM(op, lora_a, 2);
  LK_CHECK_DIM(op, lora_b, 2);
  LK_CHECK_SAME_DTYPE(op, weight, x);
  LK_CHECK_SAME_DTYPE(op, lora_a, x);
  LK_CHECK_SAME_DTYPE(op, lora_b, x);
  LK_CHECK_SAME_DEVICE(op, weight, x);
  LK_CHECK_SAME_DEVICE(op, lora_a, x);
  LK_CHECK_SAME_DEVICE(op, lora_b, x);
  const int64_t K = x.size(1), N = weight.size(0), r = lora_a.size(0);
  LK_CHECK_SIZE(op, weight, 1, K, "in_features = x.shape[1]");
  LK_CHECK_SIZE(op, lora_a, 1, K, "in_features = x.shape[1]");
  LK_CHECK_VALUE(r >= 1, op, ": lora_a.shape[0] (the rank r) expected >= 1, got shape ", shape_str(lora_a));
  LK_CHECK_SIZE(op, lora_b, 0, N, "out_features = weight.shape[0]");
  LK_CHECK_SIZE(op, lora_b, 1, r, "rank = lora_a.shape[0]");
  if (x_lora_opt.has_value()) {
    const at::Tensor& x_lora = *x_lora_opt;
    LK_CHECK_DIM(op, x_lora, 2);
    LK_CHECK_SAME_DTYPE(op, x_lora, x);
    LK_CHECK_SAME_DEVICE(op, x_lora, x);
    LK_CHECK_SIZE(op, x_lora, 0, x.size(0), "tokens = x.shape[0]");
    LK_CHECK_SIZE(op, x_lora, 1, K, "in_features = x.shape[1]");
  }
  if (bias_opt.has_value()) {
    const at::Tensor& bias = *bias_opt;
    LK_CHECK_DIM(op, bias, 1);
    LK_CHECK_SAME_DTYPE(op, bias, x);
    LK_CHECK_SAME_DEVICE(op, bias, x);
    LK_CHECK_SIZE(op, bias, 0, N, "out_features = weight.shape[0]");
  }
  check_scaling(op, scaling, x);
}

void check_lora_bwd_dy(const at::Tensor& dy, const at::Tensor& s, const at::Tensor& lora_b, double scaling) {
  constexpr const char* op = "lora_bwd_dy";
  LK_CHECK_DIM(op, dy, 2);
  LK_CHECK_FLOATING(op, dy);
  LK_CHECK_DIM(op, s, 2);
  LK_CHECK_DTYPE(op, s, dy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  LK_CHECK_DIM(op, lora_b, 2);
  LK_CHECK_SAME_DTYPE(op, lora_b, dy);
  LK_CHECK_SAME_DEVICE(op, s, dy);
  LK_CHECK_SAME_DEVICE(op, lora_b, dy);
  LK_CHECK_SIZE(op, s, 0, dy.size(0), "tokens = dy.shape[0]");
  LK_CHECK_SIZE(op, lora_b, 0, dy.size(1), "out_features = dy.shape[1]");
  LK_CHECK_SIZE(op, lora_b, 1, s.size(1), "rank = s.shape[1]");
  check_scaling(op, scaling, dy);
}

// The kernels read these as plain arrays (no strides): metadata vectors and scalings.
#define LK_CHECK_CONTIGUOUS(op, t)                                                                     \
  LK_CHECK_VALUE((t).is_contiguous(), op, ": " #t " expected a contiguous tensor, got strides ",     \
                 (t).strides(), " (shape ", shape_str(t), "); pass " #t ".contiguous()")

// One int32 vector of the metadata: 1-D, int32, contiguous, on ref's device, `size` entries. A macro so the messages
// name the argument (the checks stringize it). Contiguous: the kernels index it as a plain array, so a strided view
// read other entries (out of bounds for sorted_token_ids).
// ref_name: the argument ref is (LK_CHECK_SAME_DEVICE would name the parameter, "ref").
#define LK_CHECK_METADATA_VECTOR(op, t, ref, size, what)                                                    \
  LK_CHECK_DIM(op, t, 1);                                                                                    \
  LK_CHECK_DTYPE(op, t, at::kInt);                                                                           \
  LK_CHECK_CONTIGUOUS(op, t);                                                                                \
  TORCH_CHECK_VALUE((t).device() == (ref).device(),                                                          \
                    ::lora_kernels::message(op, ": " #t " expected device ", (ref).device(), " (same as ",    \
                                            ref_name, "), got ", (t).device()));                             \
  LK_CHECK_SIZE(op, t, 0, size, what)

namespace {

// The metadata of the M tokens of `ref` (the argument named ref_name: x or t) and num_slots slots (slots_name's
// shape[0]: lora_a or lora_b).
void check_sgmv_metadata(const char* op, const at::Tensor& ref, const char* ref_name, int64_t num_slots,
                         const char* slots_name, const at::Tensor& sorted_token_ids, const at::Tensor& slot_starts,
                         const at::Tensor& slot_counts, const at::Tensor& ranks) {
  // where the expected sizes come from: a wrong x / lora_a is as likely as wrong metadata
  const std::string tokens = std::string("tokens = ") + ref_name + ".shape[0]";
  const std::string slots = std::string("adapter slots = ") + slots_name + ".shape[0]";
  LK_CHECK_METADATA_VECTOR(op, sorted_token_ids, ref, ref.size(0), tokens);
  LK_CHECK_METADATA_VECTOR(op, slot_starts, ref, num_slots, slots);
  LK_CHECK_METADATA_VECTOR(op, slot_counts, ref, num_slots, slots);
  LK_CHECK_METADATA_VECTOR(op, ranks, ref, num_slots, slots);
}

}  // namespace

void check_sgmv_shrink(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& sorted_token_ids,
                              const at::Tensor& slot_starts, const at::Tensor& slot_counts,
                              const at::Tensor& scalings, const at::Tensor& ranks) {
  constexpr const char* op = "sgmv_shrink";
  LK_CHECK_DIM(op, x, 2);
  LK_CHECK_FLOATING(op, x);
  LK_CHECK_DIM(op, lora_a, 3);
  LK_CHECK_SAME_DTYPE(op, lora_a, x);
  LK_CHECK_SAME_DEVICE(op, lora_a, x);
  LK_CHECK_SIZE(op, lora_a, 2, x.size(1), "in_features = x.shape[1]");
  const int64_t num_slots = lora_a.size(0);
  check_sgmv_metadata(op, x, "x", num_slots, "lora_a", sorted_token_ids, slot_starts, slot_counts, ranks);
  LK_CHECK_DIM(op, scalings, 1);
  LK_CHECK_DTYPE(op, scalings, at::kFloat);
  LK_CHECK_CONTIGUOUS(op, scalings);
  LK_CHECK_SAME_DEVICE(op, scalings, x);
  LK_CHECK_SIZE(op, scalings, 0, num_slots, "adapter slots = lora_a.shape[0]");
}

void check_sgmv_expand(const at::Tensor& t, const at::Tensor& lora_b, const at::Tensor& sorted_token_ids,
                              const at::Tensor& slot_starts, const at::Tensor& slot_counts, const at::Tensor& ranks,
                              const at::Tensor& out, int64_t slice_offset) {
  constexpr const char* op = "sgmv_expand";
  LK_CHECK_DIM(op, t, 2);
  LK_CHECK_DTYPE(op, t, at::kFloat);
  LK_CHECK_DIM(op, lora_b, 3);
  LK_CHECK_FLOATING(op, lora_b);
  LK_CHECK_SAME_DEVICE(op, lora_b, t);
  LK_CHECK_SIZE(op, lora_b, 2, t.size(1), "max rank = t.shape[1]");
  LK_CHECK_DIM(op, out, 2);
  LK_CHECK_FLOATING(op, out);
  LK_CHECK_SAME_DEVICE(op, out, t);
  LK_CHECK_SIZE(op, out, 0, t.size(0), "tokens = t.shape[0]");
  const int64_t width = lora_b.size(1);
  // Against out.size(1) - width, which cannot overflow: slice_offset + width wrapped past INT64_MAX for a huge
  // slice_offset, and that negative sum passed.
  LK_CHECK_VALUE(slice_offset >= 0 && slice_offset <= out.size(1) - width, op,
                 ": slice_offset expected in [0, out.shape[1] - lora_b.shape[1]] = [0, ", out.size(1) - width,
                 "], got ", slice_offset, " (out shape ", shape_str(out), ", lora_b shape ", shape_str(lora_b), ")");
  check_sgmv_metadata(op, t, "t", lora_b.size(0), "lora_b", sorted_token_ids, slot_starts, slot_counts, ranks);
  // out is written in place: an element reached twice (an expanded view) was raced, and memory shared with t or
  // lora_b was read after the kernel had overwritten it. Layouts too hard to decide (TooHard) are let through.
  LK_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
                 ": out expected a tensor whose elements do not overlap in memory, got shape ", shape_str(out),
                 " with strides ", out.strides(), " (an expanded view); pass a new tensor");
  for (const auto& [name, input] : {std::pair<const char*, const at::Tensor*>{"t", &t}, {"lora_b", &lora_b}}) {
    const at::MemOverlapStatus status = at::get_overlap_status(out, *input);
    LK_CHECK_VALUE(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op,
                   ": out expected memory of its own, got a view that overlaps ", name, ", which the op reads (out: ",
                   "shape ", shape_str(out), ", strides ", out.strides(), ", offset ", out.storage_offset(), "; ",
                   name, ": shape ", shape_str(*input), ", strides ", input->strides(), ", offset ",
                   input->storage_offset(), "); pass a separate tensor");
  }
}

void check_sgmv_metadata_values_cpu(const char* op, int64_t num_tokens, int64_t max_rank,
                                           const at::Tensor& sorted_token_ids, const at::Tensor& slot_starts,
                                           const at::Tensor& slot_counts, const at::Tensor& ranks) {
  const auto starts = slot_starts.accessor<int32_t, 1>();
  const auto counts = slot_counts.accessor<int32_t, 1>();
  const auto rank_values = ranks.accessor<int32_t, 1>();
  for (int64_t i = 0; i < ranks.size(0); ++i) {
    LK_CHECK_VALUE(rank_values[i] >= 0 && rank_values[i] <= max_rank, op, ": ranks expected values in [0, ",
                   max_rank, "] (the max rank R), got ranks[", i, "] = ", rank_values[i]);
    LK_CHECK_VALUE(starts[i] >= 0 && counts[i] >= 0 && int64_t(starts[i]) + counts[i] <= num_tokens, op,
                   ": slot_starts/slot_counts expected token ranges inside [0, ", num_tokens, "), got slot ", i,
                   " starting at ", starts[i], " with ", counts[i], " tokens");
  }
  const auto token_ids = sorted_token_ids.accessor<int32_t, 1>();
  for (int64_t position = 0; position < num_tokens; ++position) {
    LK_CHECK_VALUE(token_ids[position] >= 0 && token_ids[position] < num_tokens, op,
                   ": sorted_token_ids expected values in [0, ", num_tokens, "), got sorted_token_ids[", position,
                   "] = ", token_ids[position]);
  }
  // The CPU kernels write each token's row from one thread: two slots covering one token would race. So the slots'
  // ranges must not overlap and must name distinct tokens (LoRABatch's always do: its ids are a permutation).
  std::vector<char> position_taken(num_tokens, 0), token_taken(num_tokens, 0);
  for (int64_t i = 0; i < ranks.size(0); ++i) {
    for (int64_t position = starts[i]; position < int64_t(starts[i]) + counts[i]; ++position) {
      LK_CHECK_VALUE(!position_taken[position], op, ": slot_starts/slot_counts expected disjoint token ranges, got ",
                     "slot ", i, " overlapping another slot at position ", position);
      position_taken[position] = 1;
      const int32_t token = token_ids[position];
      LK_CHECK_VALUE(!token_taken[token], op, ": sorted_token_ids expected each token at most once within the ",
                     "slots' ranges, got token ", token, " twice");
      token_taken[token] = 1;
    }
  }
}

}  // namespace lora_kernels
