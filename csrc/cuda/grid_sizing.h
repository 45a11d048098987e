// Grid sizing shared by the .cu launchers whose kernels split work (K, rows, columns) to fill the GPU: the device's
// SM count, cached, and the block target per SM; whether the tensor-core code runs; K-splits of whole tiles. Host
// code only.
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

// The architecture the image of `kernel` the CUDA runtime runs on `device` (the current device: the launchers'
// CUDAGuard) was compiled for, as 10 * major + minor of its PTX virtual architecture (80 for compute_80; CUB's
// PtxVersion reads it the same way), also for a SASS-only image; 0 when the runtime has no image for the device (that
// error is cleared: the kernel the caller launches instead reports it). Any other error (cudaFuncGetAttributes may
// return one of an earlier asynchronous launch) is raised, not cached. The device's compute capability alone does
// not say what runs: a build whose newest architecture is older than the GPU's major version
// (TORCH_CUDA_ARCH_LIST="7.5+PTX" on an sm_80 GPU, "7.0+PTX;8.0" on sm_90) runs PTX compiled for that older
// architecture, JIT-compiled at load, in which tensor_core.h's mma/cvt helpers are __trap() (they need 80) and the
// grid dependency instructions nothing (they need 90). Any kernel answers for the whole extension: setup.py compiles
// every .cu file with the same -gencode flags.
inline int compiled_arch(const void* kernel, int device) {
  static std::atomic<int> cache[kMaxCachedDevices] = {};  // the answer + 1: 0 is "not asked yet"
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached != 0) {
      return cached - 1;
    }
  }
  cudaFuncAttributes attributes{};
  const cudaError_t status = cudaFuncGetAttributes(&attributes, kernel);
  int arch = 0;
  if (status == cudaSuccess) {
    arch = attributes.ptxVersion;
  } else if (status == cudaErrorNoKernelImageForDevice || status == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError();  // not left for the next launch check to report as its own
  } else {
    C10_CUDA_CHECK(status);
  }
  if (cacheable) {
    cache[device].store(arch + 1, std::memory_order_relaxed);
  }
  return arch;
}

// Whether the tensor-core kernels' code (mma.sync, sm_80+) is what runs on `device` (see compiled_arch).
inline bool tensor_core_code_runs(const void* kernel, int device) { return compiled_arch(kernel, device) >= 80; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How a K-split kernel divides K: `splits` parts of k_per_split elements (the last one shorter), a whole number of
// `tile`s each. The kernels pick about `wanted` splits; recounting leaves none empty (5 tiles wanted in 4 splits:
// 2 + 2 + 1, so 3 splits). At least one split of one tile, K = 0 too.
struct KSplit {
  int64_t splits, k_per_split;
};

inline KSplit split_k_in_tiles(int64_t k, int64_t tile, int64_t wanted) {
  const int64_t tiles = std::max<int64_t>(ceil_div(k, tile), 1);
  const int64_t k_per_split = ceil_div(tiles, std::max<int64_t>(wanted, 1)) * tile;
  return {std::max<int64_t>(ceil_div(k, k_per_split), 1), k_per_split};
}

}  // namespace lora_kernels
