// Grid sizing shared by the .cu launchers whose kernels split work (K, rows, columns) to fill the GPU: the device's
// SM count (and other attributes), cached, and the block target per SM; whether the tensor-core code runs. Host code
// only.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace lora_kernels {

constexpr int kBlocksPerSm = 2;  // grid target of the split kernels: every SM covered twice

// Devices whose attributes are cached (a node has at most a few dozen; others query the driver on every call).
constexpr int kMaxCachedDevices = 64;

// A device attribute that does not change while the process runs (its SM count), cached per device.
// inline, outside an anonymous namespace: one cache per attribute for the whole extension, whichever .cu file asks
// first.
template <cudaDeviceAttr kAttribute>
inline int device_attribute(int device) {
  static std::atomic<int> cache[kMaxCachedDevices] = {};
  if (device >= 0 && device < kMaxCachedDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      return cached;
    }
  }
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, kAttribute, device));
  if (device >= 0 && device < kMaxCachedDevices) {
    cache[device].store(value, std::memory_order_relaxed);
  }
  return value;
}

inline int sm_count(int device) { return std::max(device_attribute<cudaDevAttrMultiProcessorCount>(device), 1); }

// Whether the image of `kernel` the CUDA runtime runs on `device` (the current device: the launchers' CUDAGuard) was
// compiled for sm_80 or later, where tensor_core.h's mma/cvt helpers are instructions and not __trap(). The device's
// compute capability alone does not say: a build whose newest architecture is older than the GPU's major version
// (TORCH_CUDA_ARCH_LIST="7.5+PTX" on an sm_80 or sm_90 GPU, or "7.0+PTX;8.0" on sm_90) runs PTX compiled for that
// older architecture, JIT-compiled at load. ptxVersion is that PTX's virtual architecture (80 for compute_80, as
// CUB's PtxVersion reads it), also for a SASS-only image. Any kernel answers for the whole extension: setup.py
// compiles every .cu file with the same -gencode flags. When the runtime has no image for the device at all, the
// answer is no, and the error is cleared: the CUDA-core kernel the caller launches instead reports it.
inline bool tensor_core_code_runs(const void* kernel, int device) {
  static std::atomic<int> cache[kMaxCachedDevices] = {};  // 0: not asked yet, 1: no, 2: yes
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached != 0) {
      return cached == 2;
    }
  }
  cudaFuncAttributes attributes{};
  bool runs = false;
  if (cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess) {
    runs = attributes.ptxVersion >= 80;
  } else {
    (void)cudaGetLastError();  // not left for the next launch check to report as its own
  }
  if (cacheable) {
    cache[device].store(runs ? 2 : 1, std::memory_order_relaxed);
  }
  return runs;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace lora_kernels
