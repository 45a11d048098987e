// Each op implementation computes in the precision it was written for (fp32 accumulation of upcast operands).
// Under torch.autocast the dispatcher would cast the fp32 operands of the ops' own ATen GEMMs back down to the
// autocast dtype (and the in-place addmm_ then failed on the mixed dtypes), so every op turns autocast off for its
// own body. The Python API casts the inputs to the autocast dtype before calling an op, as autocast does for
// F.linear.
#pragma once

#include <c10/core/impl/LocalDispatchKeySet.h>

namespace lora_kernels {

struct AutocastOff {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace lora_kernels
