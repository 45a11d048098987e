// Grid sizing shared by the .cu launchers whose kernels split work (K, rows, columns) to fill the GPU: the device's
// SM count (and other attributes), cached, and the block target per SM. Host code only.
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

// A device attribute that does not change while the process runs (SM count, compute capability), cached per device.
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

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace lora_kernels
