// Input-check macros shared by the CPU and CUDA implementations. Messages follow the Python ones:
// "<op>: <argument> expected <what>, got <actual>", so a user sees which argument and both shapes.
// TORCH_CHECK_VALUE raises ValueError in Python, TORCH_CHECK_TYPE raises TypeError.
// `op` may be a string literal or a const char* (it is passed as a separate message piece).
//
// Messages are built by lora_kernels::message() from std::to_string and snprintf, never with std::ostream (which
// TORCH_CHECK uses for several message pieces): on the H200 image (2026-11-29) every failed check segfaulted the
// process inside std::ostream's number formatting in this extension (gdb: check_lora_fwd -> shape_str ->
// ostream::_M_insert<long>), with libstdc++ code linked into the extension itself; linked that way here
// (-static-libstdc++), a stream drops every number from the message. So each check hands TORCH_CHECK one string.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace lora_kernels {

namespace message_detail {

inline void append(std::string& out, const char* piece) { out += piece; }
inline void append(std::string& out, const std::string& piece) { out += piece; }
inline void append(std::string& out, c10::ScalarType dtype) { out += c10::toString(dtype); }
inline void append(std::string& out, const c10::Device& device) { out += device.str(); }

// As c10 prints an IntArrayRef: "[2, 3]".
inline void append(std::string& out, c10::IntArrayRef values) {
  out += '[';
  for (size_t i = 0; i < values.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(values[i]);
  }
  out += ']';
}

template <typename Integer, std::enable_if_t<std::is_integral_v<Integer>, int> = 0>
inline void append(std::string& out, Integer value) {
  out += std::to_string(value);
}

// "%g" is what a default std::ostream prints for a double (6 significant digits; inf, nan).
inline void append(std::string& out, double value) {
  char text[32];
  std::snprintf(text, sizeof(text), "%g", value);
  out += text;
}

}  // namespace message_detail

template <typename... Pieces>
std::string message(const Pieces&... pieces) {
  std::string out;
  (message_detail::append(out, pieces), ...);
  return out;
}

inline std::string shape_str(const at::Tensor& t) { return message(t.sizes()); }

}  // namespace lora_kernels

#define LK_CHECK_DIM(op, t, n)                                                                         \
  TORCH_CHECK_VALUE((t).dim() == (n), ::lora_kernels::message(op, ": " #t " expected a " #n           \
                                                              "-D tensor, got shape ",                 \
                                                              ::lora_kernels::shape_str(t)))

#define LK_CHECK_SIZE(op, t, d, expected, what)                                                        \
  TORCH_CHECK_VALUE((t).size(d) == (expected),                                                         \
                    ::lora_kernels::message(op, ": " #t ".shape[" #d "] expected ", (expected), " (",  \
                                            what, "), got shape ", ::lora_kernels::shape_str(t)))

#define LK_CHECK_SAME_DTYPE(op, t, ref)                                                                \
  TORCH_CHECK_TYPE((t).scalar_type() == (ref).scalar_type(),                                          \
                   ::lora_kernels::message(op, ": " #t " expected dtype ", (ref).scalar_type(),        \
                                           " (same as " #ref "), got ", (t).scalar_type()))

#define LK_CHECK_DTYPE(op, t, dtype)                                                                   \
  TORCH_CHECK_TYPE((t).scalar_type() == (dtype),                                                      \
                   ::lora_kernels::message(op, ": " #t " expected dtype ", (dtype), ", got ",          \
                                           (t).scalar_type()))

#define LK_CHECK_FLOATING(op, t)                                                                       \
  TORCH_CHECK_TYPE((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||               \
                       (t).scalar_type() == at::kBFloat16 || (t).scalar_type() == at::kDouble,        \
                   ::lora_kernels::message(op, ": " #t " expected a float32/float16/bfloat16/float64 tensor, "  \
                                           "got ", (t).scalar_type()))

#define LK_CHECK_SAME_DEVICE(op, t, ref)                                                               \
  TORCH_CHECK_VALUE((t).device() == (ref).device(),                                                   \
                    ::lora_kernels::message(op, ": " #t " expected device ", (ref).device(),           \
                                            " (same as " #ref "), got ", (t).device()))

// A free-form value check; the message pieces after `cond` should start with "<op>: <argument> expected".
#define LK_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE((cond), ::lora_kernels::message(__VA_ARGS__))
