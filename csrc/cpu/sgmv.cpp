// CPU implementations of the grouped ops sgmv_shrink and sgmv_expand (schemas in csrc/ops.cpp). Entries of A/B past
// ranks[i] (which may hold NaN) are never read. Accumulation in fp32 (fp64 when an operand is fp64).
//
// Two paths, chosen per slot by its work (slot_uses_gemm):
// - a slot with many tokens is one gather + BLAS GEMM at its real rank (prefill: the BLAS is far faster per FLOP,
//   and its ~10 ATen calls per slot are spread over many rows);
// - the other slots (decode: one or a few tokens each) are computed here token by token, all of them in one
//   at::parallel_for loop. Through the GEMM path each would cost those ~10 ATen calls for a few thousand
//   multiply-adds, which made decode over many adapters no faster than a Python loop over adapters.
// On Linux the extension is compiled with OpenMP (setup.py), so that loop is split over torch's intra-op threads;
// elsewhere ATen's header-only parallel_for runs it on the calling thread. Each position writes its own output row:
// any thread count gives the same bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../lora_checks.h"
#include "../no_autocast.h"

namespace lora_kernels {
namespace {

// Whether a slot goes through gather + BLAS GEMM rather than the direct loop: `count` tokens, `features` the long
// side of the product (K for the shrink, N for the expand). The GEMM path costs ~10 ATen calls per slot, which only
// pay once there is enough work per slot. Crossovers measured on a 2-core AMD EPYC, fp32 and bf16, r = 16
// (BENCHMARKS.md, "CPU grouped ops"): about 8 tokens at K = 512, 2 to 4 at K = 4096.
bool slot_uses_gemm(int64_t count, int64_t features) {
  return count > 2 && count * features > 4096;
}

at::ScalarType accumulate_type(at::ScalarType a, at::ScalarType b) {
  return (a == at::kDouble || b == at::kDouble) ? at::kDouble : at::kFloat;
}

// row · vec, kept in kLanes independent partial sums so the compiler vectorizes them (it may not reassociate one
// running sum). Grouping several tokens per loaded row was tried: GCC then vectorizes worse, and it was slower.
constexpr int kLanes = 8;

template <typename acc_t>
inline acc_t dot(const acc_t* row, const acc_t* vec, int64_t n) {
  acc_t partial[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      partial[lane] += row[i + lane] * vec[i + lane];
    }
  }
  acc_t total = 0;
  for (int lane = 0; lane < kLanes; ++lane) {
    total += partial[lane];
  }
  for (; i < n; ++i) {
    total += row[i] * vec[i];
  }
  return total;
}

// acc_t: fp64 when an operand is fp64, fp32 otherwise.
template <typename a_t, typename b_t>
using accumulate_t = std::conditional_t<std::is_same_v<a_t, double> || std::is_same_v<b_t, double>, double, float>;

// Rows of a matrix as acc_t with unit column stride: the rows themselves when the type already is acc_t and the
// columns are unit-strided, otherwise `rows` x `cols` converted (gathered) into `buffer` (only the first `cols`
// columns, so a slot's padding past its rank is never read). A column stride other than 1 (the transposed stacks
// multi_lora_linear's backward passes) is gathered here, slot by slot, rather than copying the whole [L, ., .]
// stack with .contiguous() on every call.
template <typename acc_t>
struct AccRows {
  const acc_t* data;
  int64_t stride;
  const acc_t* row(int64_t i) const { return data + i * stride; }
};

template <typename acc_t, typename scalar_t>
AccRows<acc_t> as_acc_rows(const scalar_t* src, int64_t rows, int64_t cols, int64_t stride, int64_t col_stride,
                           std::vector<acc_t>& buffer) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    if (col_stride == 1 || cols <= 1) {
      return {src, stride};
    }
  }
  buffer.resize(rows * cols);
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t col = 0; col < cols; ++col) {
      buffer[row * cols + col] = static_cast<acc_t>(src[row * stride + col * col_stride]);
    }
  }
  return {buffer.data(), cols};
}

// The sorted positions of the slots that do not use the GEMM path, with their slot, in slot order (so consecutive
// positions of one parallel chunk share a slot and its converted weights).
struct SmallSlotWork {
  std::vector<int32_t> positions;
  std::vector<int32_t> slots;
};

SmallSlotWork small_slot_work(const at::TensorAccessor<int32_t, 1>& starts,
                              const at::TensorAccessor<int32_t, 1>& counts,
                              const at::TensorAccessor<int32_t, 1>& ranks, int64_t num_slots, int64_t features) {
  SmallSlotWork work;
  for (int64_t slot = 0; slot < num_slots; ++slot) {
    if (counts[slot] == 0 || ranks[slot] == 0 || slot_uses_gemm(counts[slot], features)) {
      continue;
    }
    for (int32_t i = 0; i < counts[slot]; ++i) {
      work.positions.push_back(starts[slot] + i);
      work.slots.push_back(static_cast<int32_t>(slot));
    }
  }
  return work;
}

// Multiply-adds per parallel task: 32768 of them are some tens of microseconds of work, well above the few
// microseconds at::parallel_for spends per task, so scheduling is noise (a round number, not tuned).
constexpr int64_t kMultiplyAddsPerTask = 32768;

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMultiplyAddsPerTask / std::max<int64_t>(work_per_item, 1));
}

template <typename scalar_t>
void shrink_small_slots(const at::Tensor& x, const at::Tensor& lora_a, const int32_t* token_ids,
                        const SmallSlotWork& work, const int32_t* rank_values, const float* scale_values,
                        const at::Tensor& out) {
  using acc_t = accumulate_t<scalar_t, scalar_t>;
  const int64_t k = x.size(1), max_rank = lora_a.size(1);
  const int64_t x_stride = x.stride(0), x_col_stride = x.stride(1);
  const int64_t a_slot_stride = lora_a.stride(0), a_row_stride = lora_a.stride(1), a_col_stride = lora_a.stride(2);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* a_data = lora_a.const_data_ptr<scalar_t>();
  float* out_data = out.data_ptr<float>();
  const int64_t items = static_cast<int64_t>(work.positions.size());
  at::parallel_for(0, items, grain_for(max_rank * k), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> a_buffer, x_buffer;
    int32_t converted_slot = -1;
    AccRows<acc_t> a_rows{nullptr, 0};
    for (int64_t item = begin; item < end; ++item) {
      const int32_t slot = work.slots[item];
      const int64_t rank = rank_values[slot];
      if (slot != converted_slot) {  // consecutive items mostly share a slot: convert its A once
        a_rows = as_acc_rows<acc_t>(a_data + slot * a_slot_stride, rank, k, a_row_stride, a_col_stride, a_buffer);
        converted_slot = slot;
      }
      const int64_t token = token_ids[work.positions[item]];
      const acc_t* x_row = as_acc_rows<acc_t>(x_data + token * x_stride, 1, k, k, x_col_stride, x_buffer).data;
      const acc_t scale = static_cast<acc_t>(scale_values[slot]);
      float* out_row = out_data + token * max_rank;
      for (int64_t j = 0; j < rank; ++j) {
        out_row[j] = static_cast<float>(dot(a_rows.row(j), x_row, k) * scale);
      }
    }
  });
}

template <typename lora_t, typename out_t>
void expand_small_slots(const at::Tensor& t, const at::Tensor& lora_b, const int32_t* token_ids,
                        const SmallSlotWork& work, const int32_t* rank_values, const at::Tensor& out,
                        int64_t slice_offset) {
  using acc_t = accumulate_t<lora_t, out_t>;
  const int64_t width = lora_b.size(1), max_rank = lora_b.size(2);
  const int64_t b_slot_stride = lora_b.stride(0), b_row_stride = lora_b.stride(1), b_col_stride = lora_b.stride(2);
  const int64_t out_row_stride = out.stride(0), out_col_stride = out.stride(1);
  const float* t_data = t.const_data_ptr<float>();
  const lora_t* b_data = lora_b.const_data_ptr<lora_t>();
  out_t* out_data = out.data_ptr<out_t>();
  const int64_t items = static_cast<int64_t>(work.positions.size());
  at::parallel_for(0, items, grain_for(width * max_rank), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> b_buffer, t_buffer;
    int32_t converted_slot = -1;
    AccRows<acc_t> b_rows{nullptr, 0};
    for (int64_t item = begin; item < end; ++item) {
      const int32_t slot = work.slots[item];
      const int64_t rank = rank_values[slot];
      if (slot != converted_slot) {  // B[slot, :, :rank] as [width, rank] rows
        b_rows = as_acc_rows<acc_t>(b_data + slot * b_slot_stride, width, rank, b_row_stride, b_col_stride, b_buffer);
        converted_slot = slot;
      }
      const int64_t token = token_ids[work.positions[item]];
      const acc_t* t_row = as_acc_rows<acc_t>(t_data + token * max_rank, 1, rank, max_rank, 1, t_buffer).data;
      out_t* out_row = out_data + token * out_row_stride + slice_offset * out_col_stride;
      for (int64_t col = 0; col < width; ++col) {
        // Add in the accumulation type and round once on the way back, as the GEMM path does.
        out_t& target = out_row[col * out_col_stride];
        target = static_cast<out_t>(static_cast<acc_t>(target) + dot(b_rows.row(col), t_row, rank));
      }
    }
  });
}

// Calls gemm_slot(slot, tokens, rank) for each slot that takes the GEMM path (slot_uses_gemm; rank > 0), in slot
// order: tokens its int64 token ids [count], for index_select / index_copy_.
template <typename GemmSlot>
void for_each_gemm_slot(const at::Tensor& sorted_token_ids, const at::TensorAccessor<int32_t, 1>& starts,
                        const at::TensorAccessor<int32_t, 1>& counts, const at::TensorAccessor<int32_t, 1>& ranks,
                        int64_t num_slots, int64_t features, const GemmSlot& gemm_slot) {
  at::Tensor token_ids;  // made only when a slot takes the GEMM path
  for (int64_t slot = 0; slot < num_slots; ++slot) {
    const int64_t count = counts[slot], rank = ranks[slot];
    if (rank == 0 || !slot_uses_gemm(count, features)) {
      continue;
    }
    if (!token_ids.defined()) {
      token_ids = sorted_token_ids.to(at::kLong);
    }
    gemm_slot(slot, token_ids.narrow(0, starts[slot], count), rank);
  }
}

at::Tensor sgmv_shrink_cpu(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& sorted_token_ids,
                           const at::Tensor& slot_starts, const at::Tensor& slot_counts, const at::Tensor& scalings,
                           const at::Tensor& ranks) {
  const AutocastOff autocast_off;
  check_sgmv_shrink(x, lora_a, sorted_token_ids, slot_starts, slot_counts, scalings, ranks);
  const int64_t num_tokens = x.size(0), max_rank = lora_a.size(1);
  check_sgmv_metadata_values_cpu("sgmv_shrink", num_tokens, max_rank, sorted_token_ids, slot_starts, slot_counts,
                                 ranks);
  // x and lora_a in any strides: the direct loop gathers a non-unit column stride per slot and per token
  // (as_acc_rows), and the GEMM path's ATen calls take views. Copying the whole stack here cost multi_lora_linear's
  // backward, which passes the transposed stacks, a copy of all L slots (used or not) per call: 3.0 ms against
  // 0.04 ms at L = 64, N = 2048.
  at::Tensor out = at::zeros({num_tokens, max_rank}, x.options().dtype(at::kFloat));
  const at::ScalarType acc = accumulate_type(x.scalar_type(), lora_a.scalar_type());
  const auto starts = slot_starts.accessor<int32_t, 1>();
  const auto counts = slot_counts.accessor<int32_t, 1>();
  const auto rank_values = ranks.accessor<int32_t, 1>();
  const auto scale_values = scalings.accessor<float, 1>();
  const int64_t num_slots = lora_a.size(0), features = x.size(1);

  for_each_gemm_slot(sorted_token_ids, starts, counts, rank_values, num_slots, features,
                     [&](int64_t slot, const at::Tensor& tokens, int64_t rank) {
                       const at::Tensor xs = x.index_select(0, tokens).to(acc);               // [count, K]
                       const at::Tensor a = lora_a.select(0, slot).narrow(0, 0, rank).to(acc);  // [rank, K]
                       const at::Tensor shrunk = at::mm(xs, a.t()).mul_(static_cast<double>(scale_values[slot]));
                       out.narrow(1, 0, rank).index_copy_(0, tokens, shrunk.to(at::kFloat));
                     });

  const SmallSlotWork work = small_slot_work(starts, counts, rank_values, num_slots, features);
  if (!work.positions.empty()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sgmv_shrink_cpu", [&] {
      shrink_small_slots<scalar_t>(x, lora_a, sorted_token_ids.const_data_ptr<int32_t>(), work,
                                   ranks.const_data_ptr<int32_t>(), scalings.const_data_ptr<float>(), out);
    });
  }
  return out;
}

void sgmv_expand_cpu(const at::Tensor& t_in, const at::Tensor& lora_b, const at::Tensor& sorted_token_ids,
                     const at::Tensor& slot_starts, const at::Tensor& slot_counts, const at::Tensor& ranks,
                     const at::Tensor& out, int64_t slice_offset) {
  const AutocastOff autocast_off;
  check_sgmv_expand(t_in, lora_b, sorted_token_ids, slot_starts, slot_counts, ranks, out, slice_offset);
  const int64_t num_tokens = t_in.size(0), max_rank = lora_b.size(2), width = lora_b.size(1);
  check_sgmv_metadata_values_cpu("sgmv_expand", num_tokens, max_rank, sorted_token_ids, slot_starts, slot_counts,
                                 ranks);
  const at::Tensor t = t_in.contiguous();  // [M, R] fp32: small; lora_b in any strides (see sgmv_shrink_cpu)
  const at::ScalarType acc = accumulate_type(lora_b.scalar_type(), out.scalar_type());
  at::Tensor out_slice = out.narrow(1, slice_offset, width);
  const auto starts = slot_starts.accessor<int32_t, 1>();
  const auto counts = slot_counts.accessor<int32_t, 1>();
  const auto rank_values = ranks.accessor<int32_t, 1>();
  const int64_t num_slots = lora_b.size(0);

  for_each_gemm_slot(sorted_token_ids, starts, counts, rank_values, num_slots, width,
                     [&](int64_t slot, const at::Tensor& tokens, int64_t rank) {
                       const at::Tensor ts = t.index_select(0, tokens).narrow(1, 0, rank).to(acc);  // [count, rank]
                       const at::Tensor b = lora_b.select(0, slot).narrow(1, 0, rank).to(acc);      // [N, rank]
                       // Read the output rows, add in the accumulation type, round once on the way back.
                       at::Tensor rows = out_slice.index_select(0, tokens).to(acc);
                       rows.addmm_(ts, b.t());
                       out_slice.index_copy_(0, tokens, rows.to(out.scalar_type()));
                     });

  const SmallSlotWork work = small_slot_work(starts, counts, rank_values, num_slots, width);
  if (work.positions.empty()) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lora_b.scalar_type(), "sgmv_expand_cpu", [&] {
    using lora_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "sgmv_expand_cpu_out", [&] {
      expand_small_slots<lora_t, scalar_t>(t, lora_b, sorted_token_ids.const_data_ptr<int32_t>(), work,
                                           ranks.const_data_ptr<int32_t>(), out, slice_offset);
    });
  });
}

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("sgmv_shrink", &lora_kernels::sgmv_shrink_cpu);
  m.impl("sgmv_expand", &lora_kernels::sgmv_expand_cpu);
}
