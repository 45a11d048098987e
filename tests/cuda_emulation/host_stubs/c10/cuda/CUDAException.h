// Stand-in for c10/cuda/CUDAException.h (tests/cuda_emulation/host_stubs/cuda_runtime_api.h): C10_CUDA_CHECK raises
// a failed call's error; C10_CUDA_KERNEL_LAUNCH_CHECK the error an emulated launch left, as c10's do.
#pragma once

#include <c10/util/Exception.h>

#include <cuda_runtime_api.h>

#define C10_CUDA_CHECK(EXPR)                                                           \
  do {                                                                                 \
    const cudaError_t lk_emu_error = (EXPR);                                           \
    TORCH_CHECK(lk_emu_error == cudaSuccess, "CUDA error: ", cudaGetErrorString(lk_emu_error)); \
  } while (0)
#undef C10_CUDA_KERNEL_LAUNCH_CHECK
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
