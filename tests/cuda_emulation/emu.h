// CPU stand-ins for the CUDA built-ins that csrc/cuda/sgmv.cu's decode kernels use, so that those kernels (extracted
// from the .cu file verbatim by tests/test_cuda_emulation.py) run on a machine without a GPU: one std::thread per
// CUDA thread, blocks one after another; __syncthreads is a block barrier, __shfl_xor_sync exchanges through a
// per-warp buffer between two warp barriers, __shared__ variables are statics (one block runs at a time).
// Only what those kernels use; the memory model, timing and inline PTX are not emulated.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define C10_CUDA_KERNEL_LAUNCH_CHECK()

struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim, gridDim;

constexpr int kMaxWarps = 32;
std::unique_ptr<std::barrier<>> g_block_barrier;
std::vector<std::unique_ptr<std::barrier<>>> g_warp_barriers;
float g_warp_exchange[kMaxWarps][32];
std::mutex g_atomic_mutex;

inline void __syncthreads() { g_block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  g_warp_exchange[warp][lane] = value;
  g_warp_barriers[warp]->arrive_and_wait();
  const float other = g_warp_exchange[warp][lane ^ lane_mask];
  g_warp_barriers[warp]->arrive_and_wait();  // nobody overwrites the buffer before every lane has read it
  return other;
}

inline int atomicMax(int* address, int value) {
  const std::lock_guard<std::mutex> lock(g_atomic_mutex);
  const int old = *address;
  *address = std::max(old, value);
  return old;
}

template <typename T>
T __ldg(const T* p) { return *p; }
template <typename T>
T __ldcs(const T* p) { return *p; }

// What sgmv.cu takes from grid_sizing.h, launchers.h and tensor_core.h.
namespace lora_kernels {
constexpr int kBlocksPerSm = 2;
inline int g_sm_count = 132;  // the H200's; the harness varies it
inline int sm_count(int) { return g_sm_count; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t kSgmvTileTokens = 32;
constexpr int64_t kSgmvMaxGridYZ = 65535;
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
inline uint4 load16_or_zero(const void* p, bool valid, bool stream) {
  if (!valid) return make_uint4(0u, 0u, 0u, 0u);
  const uint4* q = reinterpret_cast<const uint4*>(p);
  return stream ? __ldcs(q) : __ldg(q);
}
}  // namespace lora_kernels

// kernel(args) over the grid (grid_x, grid_y) with `threads` threads per block. The same threads run every block
// and meet at a barrier after each: the kernels' own barriers all come before any early return, so every thread
// passes the same number of them.
template <typename Kernel, typename Args>
void emulate_launch(Kernel kernel, const Args& args, unsigned grid_x, unsigned grid_y, unsigned threads) {
  blockDim = {threads, 1, 1};
  gridDim = {grid_x, grid_y, 1};
  g_block_barrier = std::make_unique<std::barrier<>>(threads);
  g_warp_barriers.clear();
  for (unsigned w = 0; w < threads / 32; ++w) g_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = {t, 0, 0};
      for (unsigned by = 0; by < grid_y; ++by) {
        for (unsigned bx = 0; bx < grid_x; ++bx) {
          blockIdx = {bx, by, 0};
          kernel(args);
          g_block_barrier->arrive_and_wait();
        }
      }
    });
  }
  for (auto& thread : pool) thread.join();
}
