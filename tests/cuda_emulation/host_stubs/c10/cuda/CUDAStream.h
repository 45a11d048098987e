// Stand-in for c10/cuda/CUDAStream.h: the emulation runs every launch at once, in order, so a stream is a dummy.
#pragma once

#include <cuda_runtime_api.h>

namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
}  // namespace c10::cuda
