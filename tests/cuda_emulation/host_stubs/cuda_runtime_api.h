// Stand-ins for the CUDA runtime calls that the launchers of csrc/cuda/*.cu (and grid_sizing.h) make, so that those
// files compile as host C++ against a CPU libtorch and their launches run in emu.h's emulation
// (tests/test_cuda_emulation.py, the launcher harnesses). This directory comes first on the include path: it also
// shadows c10/cuda's CUDAException.h, CUDAGuard.h and CUDAStream.h, which need a CUDA toolkit.
//   - cudaDeviceGetAttribute: the SM count is emu.h's g_sm_count (the harness varies it);
//   - cudaFuncGetAttributes: ptxVersion is g_compiled_arch, which the harness sets: 90 (sm_90 image), 80, 75 (a
//     build whose newest architecture is older than the GPU's: PTX JIT-compiled, no tensor-core code), 0 (no image:
//     every launch then fails with cudaErrorNoKernelImageForDevice, as on a GPU);
//   - kernel<<<grid, block, shared, stream>>>(args) is rewritten by the test into
//     emulated_launch("kernel", kernel, grid, block, shared, stream)(args), and cudaLaunchKernelEx launches the same
//     way: each launch is recorded (g_launches) and run on the CPU after CUDA's launch-configuration checks.
// CPU tensors answer get_device() == -1, so grid_sizing.h's per-device caches are bypassed: every call asks again.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "emu.h"

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9, cudaErrorInvalidDeviceFunction = 98,
                   cudaErrorNoKernelImageForDevice = 209 };
inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    default: return "no kernel image is available for execution on the device";
  }
}
inline cudaError_t g_last_error = cudaSuccess;
inline cudaError_t cudaGetLastError() {
  const cudaError_t error = g_last_error;
  g_last_error = cudaSuccess;
  return error;
}

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  if (attribute != cudaDevAttrMultiProcessorCount) throw std::logic_error("emulation: unknown device attribute");
  *value = lora_kernels::g_sm_count;
  return cudaSuccess;
}

struct cudaFuncAttributes {
  int ptxVersion, binaryVersion;
};
inline int g_compiled_arch = 90;  // what cudaFuncGetAttributes answers for every kernel (the H200's sm_90 build)
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void*) {
  if (g_compiled_arch == 0) {
    g_last_error = cudaErrorNoKernelImageForDevice;  // as the runtime: also left for cudaGetLastError
    return cudaErrorNoKernelImageForDevice;
  }
  attributes->ptxVersion = attributes->binaryVersion = g_compiled_arch;
  return cudaSuccess;
}

struct CUstream_st;
using cudaStream_t = CUstream_st*;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum cudaLaunchAttributeID { cudaLaunchAttributeProgrammaticStreamSerialization = 5 };
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  union {
    int programmaticStreamSerializationAllowed;
  } val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

// One emulated launch: which kernel (its address, and its name as the launch statement spells it), its
// configuration, and whether it was launched as a programmatic dependent of the kernel before it (PDL).
struct Launch {
  const void* kernel;
  std::string name;
  dim3 grid, block;
  size_t shared_bytes;
  bool dependent;
  std::vector<bool> flags;  // the kernel's bool arguments in order: which loads it may take 16 bytes at a time
};
inline std::vector<Launch> g_launches;

template <typename Param, typename Arg>
void add_flag(std::vector<bool>& flags, const Arg& arg) {
  if constexpr (std::is_same_v<Param, bool>) flags.push_back(static_cast<bool>(arg));
}

// CUDA's launch-configuration limits (any GPU since sm_30): grid.x < 2^31, grid.y and grid.z <= 65535, at most 1024
// threads per block; dynamic shared memory at most 48 KiB without cudaFuncSetAttribute, which these files never call,
// and within emu.h's buffer. A launch outside them is not run and reports cudaErrorInvalidConfiguration, as the
// runtime does (C10_CUDA_KERNEL_LAUNCH_CHECK would raise it); the emulation also needs one-dimensional blocks of
// whole warps.
template <typename... Params, typename... Args>
cudaError_t emulate_kernel_launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                                  size_t shared_bytes, bool dependent, Args&&... args) {
  std::vector<bool> flags;
  (add_flag<Params>(flags, args), ...);
  g_launches.push_back({reinterpret_cast<const void*>(kernel), name, grid, block, shared_bytes, dependent, flags});
  const bool valid = grid.x >= 1 && grid.x <= 0x7fffffffu && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 &&
                     grid.z <= 65535 && block.x >= 1 && block.x * block.y * block.z <= 1024 &&
                     shared_bytes <= 48 * 1024 && shared_bytes <= sizeof(g_dynamic_shared);
  if (!valid) {
    g_last_error = cudaErrorInvalidConfiguration;
    return cudaErrorInvalidConfiguration;
  }
  if (g_compiled_arch == 0) {  // no image for the device: no kernel of the extension launches (as the runtime)
    g_last_error = cudaErrorNoKernelImageForDevice;
    return cudaErrorNoKernelImageForDevice;
  }
  if (block.y != 1 || block.z != 1 || block.x % 32 != 0) throw std::logic_error("emulation: block not whole warps");
  emulate_launch([&](int) { kernel(args...); }, 0, grid.x, grid.y, grid.z, block.x);
  return cudaSuccess;
}

// kernel<<<grid, block, shared, stream>>>(args) becomes emulated_launch("kernel", kernel, grid, block, shared,
// stream)(args): the launch statement's arguments, evaluated once, go to the kernel as its parameters.
template <typename... Params>
struct EmulatedLaunch {
  const char* name;
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t shared_bytes;
  template <typename... Args>
  void operator()(Args&&... args) const {
    (void)emulate_kernel_launch(name, kernel, grid, block, shared_bytes, false, std::forward<Args>(args)...);
  }
};
template <typename... Params>
EmulatedLaunch<Params...> emulated_launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                                          size_t shared_bytes = 0, cudaStream_t = nullptr) {
  return {name, kernel, grid, block, shared_bytes};
}

template <typename... Params, typename... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args&&... args) {
  bool dependent = false;
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    if (config->attrs[i].id == cudaLaunchAttributeProgrammaticStreamSerialization) {
      dependent = config->attrs[i].val.programmaticStreamSerializationAllowed != 0;
    }
  }
  return emulate_kernel_launch("cudaLaunchKernelEx", kernel, config->gridDim, config->blockDim,
                               config->dynamicSmemBytes, dependent, std::forward<Args>(args)...);
}
