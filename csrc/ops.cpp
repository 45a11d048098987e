// The one place where every lora_kernels operator schema is declared. CPU and CUDA implementations live in
// csrc/cpu and csrc/cuda (TORCH_LIBRARY_IMPL blocks); fake (meta) implementations are registered from Python
// (lora_kernels/_ext.py) so torch.compile can trace through the ops.
#include <Python.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

extern "C" {
// Importing lora_kernels._C loads this shared library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#ifdef LORA_KERNELS_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  // What it was built against (setup.py), checked by lora_kernels/_ext.py: the torch major.minor version, and why the
  // CUDA sources were left out (setup.py's LORA_KERNELS_CUDA_SKIPPED code, as _ext.CUDA_SKIPPED_REASONS reads it;
  // 0 when they were built).
#ifdef LORA_KERNELS_BUILT_TORCH_MAJOR
  PyModule_AddIntConstant(module, "BUILT_TORCH_MAJOR", LORA_KERNELS_BUILT_TORCH_MAJOR);
  PyModule_AddIntConstant(module, "BUILT_TORCH_MINOR", LORA_KERNELS_BUILT_TORCH_MINOR);
#endif
#ifdef LORA_KERNELS_CUDA_SKIPPED
  PyModule_AddIntConstant(module, "CUDA_SKIPPED", LORA_KERNELS_CUDA_SKIPPED);
#endif
  return module;
}
}

TORCH_LIBRARY(lora_kernels, m) {
  // Single-adapter fused forward. x: [M, K], x_lora: [M, K] or None (the dropped-out LoRA input; None means x),
  // weight: [N, K], lora_a: [r, K], lora_b: [N, r], bias: [N] or None.
  // Returns (y, s): y = x @ weight.T + scaling * (s @ lora_b.T) + bias  [M, N] in x.dtype,
  //                 s = x_lora @ lora_a.T  [M, r] float32, float64 for float64 x (unscaled; saved for backward).
  m.def("lora_fwd(Tensor x, Tensor? x_lora, Tensor weight, Tensor lora_a, Tensor lora_b, float scaling, "
        "Tensor? bias) -> (Tensor, Tensor)");
  // Backward, the part that reads dy: ONE pass over dy gives both
  //   d_lora_b = scaling * dy.T @ s  [N, r]   and   ds = scaling * dy @ lora_b  [M, r],
  // both float32 (float64 for float64 dy). dy: [M, N], s: [M, r] in that same dtype, lora_b: [N, r].
  m.def("lora_bwd_dy(Tensor dy, Tensor s, Tensor lora_b, float scaling) -> (Tensor, Tensor)");
  // Grouped shrink (SGMV/BGMV). x: [M, K], lora_a: [L, R, K], metadata from LoRABatch (int32):
  // sorted_token_ids [M] (token ids stably sorted by slot), slot_starts [L], slot_counts [L];
  // scalings [L] float32, ranks [L] int32. Returns out [M, R] float32 with
  //   out[t, :ranks[i]] = scalings[i] * lora_a[i, :ranks[i]] @ x[t]   for i = slot of t, zero elsewhere
  // (tokens of slot -1 and columns past the slot's rank are zero; lora_a past ranks[i] is never read).
  m.def("sgmv_shrink(Tensor x, Tensor lora_a, Tensor sorted_token_ids, Tensor slot_starts, Tensor slot_counts, "
        "Tensor scalings, Tensor ranks) -> Tensor");
  // Grouped expand, adding in place. t: [M, R] float32, lora_b: [L, N, R], out: [M, N_total];
  //   out[m, slice_offset : slice_offset + N] += lora_b[i, :, :ranks[i]] @ t[m, :ranks[i]]   for i = slot of m.
  m.def("sgmv_expand(Tensor t, Tensor lora_b, Tensor sorted_token_ids, Tensor slot_starts, Tensor slot_counts, "
        "Tensor ranks, Tensor(a!) out, int slice_offset) -> ()");
}

// The ops are not differentiable themselves: lora_linear's and multi_lora_linear's autograd Functions call them with
// grad mode off and give the gradients. A torch.export'ed program calls them directly (export keeps the ops, not the
// Functions); there, torch's default fallback gave no error: the backward left out the LoRA terms (lora_a.grad None),
// or on CPU followed the kernel's own ATen calls. Now an output computed from inputs that require grad gets a grad_fn
// whose backward raises "derivative for lora_kernels::... is not implemented".
//
// sgmv_expand returns nothing (it adds into out), so that fallback sees no output to attach the error to: it refuses
// a t or lora_b that requires grad (in grad mode) before any work, and bumps out's version counter, so autograd
// knows out changed. Like torch's own in-place ops it refuses a leaf out that requires grad, or a view of one (helper
// 188: it was written); a non-leaf one (y = F.linear(x, W) of a trained W) keeps its gradient, which the added term,
// a constant to autograd, does not change.
void sgmv_expand_autograd(c10::DispatchKeySet keys, const at::Tensor& t, const at::Tensor& lora_b,
                          const at::Tensor& sorted_token_ids, const at::Tensor& slot_starts,
                          const at::Tensor& slot_counts, const at::Tensor& ranks, const at::Tensor& out,
                          int64_t slice_offset) {
  TORCH_CHECK(!at::GradMode::is_enabled() || !(t.requires_grad() || lora_b.requires_grad()),
              "lora_kernels::sgmv_expand is not differentiable, but ", t.requires_grad() ? "t" : "lora_b",
              " requires grad: call lora_kernels.multi_lora_linear (autograd) or this op under torch.no_grad()");
  const bool leaf_view = out.is_view() && out._base().is_leaf();
  TORCH_CHECK(!at::GradMode::is_enabled() || !(out.requires_grad() && (out.is_leaf() || leaf_view)),
              "lora_kernels::sgmv_expand: out is a ", leaf_view ? "view of a " : "", "leaf tensor that requires grad, ",
              "which an in-place op cannot write (torch's own in-place ops refuse it too): pass one that does not ",
              "require grad, or call this op under torch.no_grad()");
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lora_kernels::sgmv_expand", "")
                               .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, t, lora_b, sorted_token_ids, slot_starts, slot_counts,
                  ranks, out, slice_offset);
  }
  torch::autograd::impl::bump_version(out);
}

TORCH_LIBRARY_IMPL(lora_kernels, Autograd, m) {
  for (const char* op : {"lora_fwd", "lora_bwd_dy", "sgmv_shrink"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
  m.impl("sgmv_expand", TORCH_FN(sgmv_expand_autograd));
}
