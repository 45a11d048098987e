// What the launcher harnesses share (launchers_lora_linear.cpp, launchers_sgmv.cpp; include after the .cu file they
// test): integer-valued CPU tensors, the check of which kernels a launcher call launched (host_stubs' g_launches), and
// exact comparisons against a float64 reference.
#pragma once

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "harness.h"

namespace lk_test {

// Uniform integers in [-bound, bound] as `dtype`, from a seeded generator (exact in every dtype for small bounds).
inline at::Tensor ints(at::IntArrayRef shape, int64_t bound, at::ScalarType dtype, uint64_t seed) {
  const at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randint(-bound, bound + 1, shape, gen, at::TensorOptions().dtype(at::kDouble)).to(dtype);
}

// A contiguous [rows, cols] view `offset` elements into a buffer of its own (offset 1 of a 16-bit or fp32 tensor: a
// data pointer 16-byte loads cannot read).
inline at::Tensor offset_view(const at::Tensor& t, int64_t offset) {
  at::Tensor buffer = at::empty({t.numel() + offset}, t.options());
  at::Tensor view = buffer.narrow(0, offset, t.numel()).view(t.sizes());
  view.copy_(t);
  return view;
}

// `t` in a buffer whose rows are `ld` elements apart (ld >= t.size(1)).
inline at::Tensor padded_rows(const at::Tensor& t, int64_t ld) {
  at::Tensor buffer = at::full({t.size(0), ld}, std::nan(""), t.options());
  at::Tensor view = buffer.narrow(1, 0, t.size(1));
  view.copy_(t);
  return view;
}

// `t` stored column-major (a .t() of a contiguous transpose).
inline at::Tensor column_major(const at::Tensor& t) { return t.t().contiguous().t(); }

template <typename F>
const void* address(F kernel) {
  return reinterpret_cast<const void*>(kernel);
}

// The kernels' names for messages, by address (the harness lists every instantiation it expects).
inline std::vector<std::pair<const void*, std::string>> g_kernel_names;
inline std::string name_of(const void* kernel) {
  for (const auto& [address, name] : g_kernel_names) {
    if (address == kernel) return name;
  }
  return "an unlisted kernel";
}

// `kernels` were launched, in that order; `dependent`: which of them as a programmatic dependent (default: none).
inline void expect_launches(const std::string& what, const std::vector<const void*>& kernels,
                            const std::vector<bool>& dependent = {}) {
  bool same = g_launches.size() == kernels.size();
  for (size_t i = 0; same && i < kernels.size(); ++i) {
    same = g_launches[i].kernel == kernels[i] && g_launches[i].dependent == (i < dependent.size() && dependent[i]);
  }
  std::string want;
  for (size_t i = 0; i < kernels.size(); ++i) {
    want += (i ? ", " : "") + name_of(kernels[i]) + (i < dependent.size() && dependent[i] ? " (dependent)" : "");
  }
  std::string got;
  for (const Launch& launch : g_launches) {
    got += (got.empty() ? "" : ", ") + name_of(launch.kernel) + (launch.dependent ? " (dependent)" : "");
  }
  EXPECT(same, "%s: launched [%s], expected [%s]", what.c_str(), got.c_str(), want.c_str());
}

// got == want element for element (NaN == NaN), of want's dtype and shape.
inline void expect_equal(const std::string& what, const at::Tensor& got, const at::Tensor& want) {
  if (got.scalar_type() != want.scalar_type() || !got.sizes().equals(want.sizes())) {
    EXPECT(false, "%s: got %s %s, expected %s %s", what.c_str(), c10::toString(got.scalar_type()),
           c10::str(got.sizes()).c_str(), c10::toString(want.scalar_type()), c10::str(want.sizes()).c_str());
    return;
  }
  const at::Tensor g = got.to(at::kDouble).reshape(-1), w = want.to(at::kDouble).reshape(-1);
  const at::Tensor bad = (g != w).logical_and_(g.isnan().logical_and(w.isnan()).logical_not_()).nonzero();
  if (bad.numel() != 0) {
    const int64_t i = bad[0].item<int64_t>();
    EXPECT(false, "%s: %lld of %lld elements differ, the first at flat index %lld: %g vs %g", what.c_str(),
           (long long)bad.size(0), (long long)g.numel(), (long long)i, g[i].item<double>(), w[i].item<double>());
  }
}

// The bool arguments of each launch of the last call (their 16-byte-load switches) are `want`, launch by launch:
// a launcher that stops handing a kernel aligned operands keeps its kernels and results, and loses only these.
inline void expect_flags(const std::string& what, const std::vector<std::vector<bool>>& want) {
  std::vector<std::vector<bool>> got;
  for (const Launch& launch : g_launches) got.push_back(launch.flags);
  const auto text = [](const std::vector<std::vector<bool>>& lists) {
    std::string out;
    for (const auto& list : lists) {
      out += "[";
      for (size_t i = 0; i < list.size(); ++i) out += std::string(i ? ", " : "") + (list[i] ? "true" : "false");
      out += "]";
    }
    return out;
  };
  EXPECT(got == want, "%s: bool arguments %s, expected %s", what.c_str(), text(got).c_str(), text(want).c_str());
}

// Runs one launcher call (a case): clears the launch record and counts a thrown error as a failure.
inline int g_cases = 0;
inline void call(const std::string& what, const std::function<void()>& body) {
  ++g_cases;
  g_launches.clear();
  try {
    body();
  } catch (const std::exception& e) {
    EXPECT(false, "%s: threw %s", what.c_str(), e.what());
  }
}

// at::empty is garbage on a GPU: NaN here (torch's deterministic fill), so an element no kernel writes shows.
inline void fill_empty_with_nan() {
  at::globalContext().setDeterministicAlgorithms(true, /*warn_only=*/true);
  at::globalContext().setDeterministicFillUninitializedMemory(true);
  EXPECT(at::empty({64}).isnan().all().item<bool>(), "at::empty is not filled with NaN");
}

// A launcher harness's main: names the kernels for messages, fills at::empty with NaN, runs its groups of cases on
// few SMs (each emulated barrier costs a CPU thread switch), `quick` (argv[1]) for the mutant tests. Prints "N cases,
// F failures"; returns 1 on a failure.
inline int run_harness(int argc, char** argv, void (*name_kernels)(), std::initializer_list<void (*)(bool)> groups) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  fill_empty_with_nan();
  name_kernels();
  lora_kernels::g_sm_count = 4;
  for (auto cases : groups) cases(quick);
  std::printf("%d cases, %d failures\n", g_cases, failures);
  return failures != 0;
}

}  // namespace lk_test
