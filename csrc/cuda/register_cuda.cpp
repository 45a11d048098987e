// CUDA registrations of every lora_kernels op (schemas in csrc/ops.cpp). Compiled by the host C++ compiler, NOT
// nvcc: all argument checks run here and throw c10 errors (ValueError/TypeError in Python) from host-compiled
// code; only then are the launchers of the .cu files called (csrc/cuda/launchers.h), which do not validate user
// input. (The H100 run's crashes on bad input, first put down to exceptions thrown from nvcc-compiled code, were
// std::ostream's number formatting in the messages, as the H200 run showed: csrc/checks.h.)
#include <torch/library.h>

#include "../checks.h"
#include "../lora_checks.h"
#include "../no_autocast.h"
#include "launchers.h"

namespace lora_kernels {
namespace {

// The sgmv grid's y and z dimensions (token tiles of tokens_arg's rows, slots of lora_arg's) are at most
// kMaxGridYZ.
void check_sgmv_grid(const char* op, const char* tokens_arg, int64_t num_tokens, const char* lora_arg,
                     int64_t num_slots) {
  LK_CHECK_VALUE((num_tokens + kSgmvTileTokens - 1) / kSgmvTileTokens <= kMaxGridYZ, op, ": ", tokens_arg,
                 ".shape[0] expected at most ", kMaxGridYZ * kSgmvTileTokens, " tokens (CUDA grid limit: ",
                 kMaxGridYZ, " tiles of ", kSgmvTileTokens, "), got ", num_tokens);
  LK_CHECK_VALUE(num_slots <= kMaxGridYZ, op, ": ", lora_arg, ".shape[0] expected at most ", kMaxGridYZ,
                 " adapter slots (CUDA grid limit), got ", num_slots);
}

std::tuple<at::Tensor, at::Tensor> lora_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& x_lora,
                                                 const at::Tensor& weight, const at::Tensor& lora_a,
                                                 const at::Tensor& lora_b, double scaling,
                                                 const std::optional<at::Tensor>& bias) {
  const AutocastOff autocast_off;
  check_lora_fwd(x, x_lora, weight, lora_a, lora_b, scaling, bias);
  return lora_fwd_cuda_launch(x, x_lora, weight, lora_a, lora_b, scaling, bias);
}

std::tuple<at::Tensor, at::Tensor> lora_bwd_dy_cuda(const at::Tensor& dy, const at::Tensor& s,
                                                    const at::Tensor& lora_b, double scaling) {
  const AutocastOff autocast_off;
  check_lora_bwd_dy(dy, s, lora_b, scaling);
  return lora_bwd_dy_cuda_launch(dy, s, lora_b, scaling);
}

at::Tensor sgmv_shrink_cuda(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& sorted_token_ids,
                            const at::Tensor& slot_starts, const at::Tensor& slot_counts, const at::Tensor& scalings,
                            const at::Tensor& ranks) {
  const AutocastOff autocast_off;
  check_sgmv_shrink(x, lora_a, sorted_token_ids, slot_starts, slot_counts, scalings, ranks);
  check_sgmv_grid("sgmv_shrink", "x", x.size(0), "lora_a", lora_a.size(0));
  return sgmv_shrink_cuda_launch(x, lora_a, sorted_token_ids, slot_starts, slot_counts, scalings, ranks);
}

void sgmv_expand_cuda(const at::Tensor& t, const at::Tensor& lora_b, const at::Tensor& sorted_token_ids,
                      const at::Tensor& slot_starts, const at::Tensor& slot_counts, const at::Tensor& ranks,
                      const at::Tensor& out, int64_t slice_offset) {
  const AutocastOff autocast_off;
  check_sgmv_expand(t, lora_b, sorted_token_ids, slot_starts, slot_counts, ranks, out, slice_offset);
  check_sgmv_grid("sgmv_expand", "t", t.size(0), "lora_b", lora_b.size(0));
  sgmv_expand_cuda_launch(t, lora_b, sorted_token_ids, slot_starts, slot_counts, ranks, out, slice_offset);
}

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("lora_fwd", &lora_kernels::lora_fwd_cuda);
  m.impl("lora_bwd_dy", &lora_kernels::lora_bwd_dy_cuda);
  m.impl("sgmv_shrink", &lora_kernels::sgmv_shrink_cuda);
  m.impl("sgmv_expand", &lora_kernels::sgmv_expand_cuda);
}
