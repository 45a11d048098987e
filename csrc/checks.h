// Input-check macros shared by the CPU and CUDA implementations. Messages follow the Python ones:
// "<op>: <argument> expected <what>, got <actual>", so a user sees which argument and both shapes.
// TORCH_CHECK_VALUE raises ValueError in Python, TORCH_CHECK_TYPE raises TypeError.
// `op` may be a string literal or a const char* (it is passed as a separate message piece).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <sstream>
#include <string>

namespace lora_kernels {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

}  // namespace lora_kernels

#define LK_CHECK_DIM(op, t, n)                                                                         \
  TORCH_CHECK_VALUE((t).dim() == (n), op, ": " #t " expected a " #n "-D tensor, got shape ",          \
                    lora_kernels::shape_str(t))

#define LK_CHECK_SIZE(op, t, d, expected, what)                                                        \
  TORCH_CHECK_VALUE((t).size(d) == (expected), op, ": " #t ".shape[" #d "] expected ", (expected),    \
                    " (" what "), got shape ", lora_kernels::shape_str(t))

#define LK_CHECK_SAME_DTYPE(op, t, ref)                                                                \
  TORCH_CHECK_TYPE((t).scalar_type() == (ref).scalar_type(), op, ": " #t " expected dtype ",          \
                   (ref).scalar_type(), " (same as " #ref "), got ", (t).scalar_type())

#define LK_CHECK_DTYPE(op, t, dtype)                                                                   \
  TORCH_CHECK_TYPE((t).scalar_type() == (dtype), op, ": " #t " expected dtype ", (dtype), ", got ",     \
                   (t).scalar_type())

#define LK_CHECK_FLOATING(op, t)                                                                       \
  TORCH_CHECK_TYPE((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||               \
                       (t).scalar_type() == at::kBFloat16 || (t).scalar_type() == at::kDouble,        \
                   op, ": " #t " expected a float32/float16/bfloat16/float64 tensor, got ", (t).scalar_type())

#define LK_CHECK_SAME_DEVICE(op, t, ref)                                                               \
  TORCH_CHECK_VALUE((t).device() == (ref).device(), op, ": " #t " expected device ", (ref).device(), \
                    " (same as " #ref "), got ", (t).device())

// A free-form value check; the message pieces after `cond` should start with "<op>: <argument> expected".
#define LK_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE((cond), __VA_ARGS__)
