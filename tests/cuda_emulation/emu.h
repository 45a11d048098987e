// CPU stand-ins for the CUDA built-ins that the grouped kernels of csrc/cuda/sgmv.cu and the decode forward and
// tensor-core backward of csrc/cuda/lora_linear.cu use, so that those kernels (cut out of the .cu files, and the
// non-PTX helpers out of tensor_core.h, verbatim by tests/test_cuda_emulation.py) run on a machine without a GPU: one
// std::thread per CUDA thread, blocks one after another; __syncthreads is a block barrier (after which warp 0 runs
// ahead to the next one: see block_barrier), __syncwarp a warp barrier;
// __shfl_xor_sync and the warp-wide MMAs exchange through per-warp buffers between two warp barriers; __shared__
// variables are statics (one block runs at a time). The MMAs (mma.sync m16n8k16 fp16/bf16 and m16n8k8 tf32, in
// inline PTX in tensor_core.h) are computed from the fragment layouts of the PTX ISA as restated below: the kernels'
// use of them (which lane loads what, and where each accumulator goes) is checked against that statement, not the
// statement itself (the GPU tests check that). Built with -fsanitize=thread (the race check), ThreadSanitizer
// reports the accesses that CUDA's barriers leave unordered (see Unordered).
// Not emulated: the rest of the memory model, timing, the compiler's code.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define C10_CUDA_KERNEL_LAUNCH_CHECK()  // the launcher harnesses: the launch's error (host_stubs/c10/cuda)

// 16-byte aligned, as CUDA's: with the harnesses' -fsanitize=alignment a 16-byte load or store from an address that
// is not a multiple of 16 stops the run (on a GPU it faults; x86 would take it).
struct alignas(16) uint4 {
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
struct MmaFragment {
  uint32_t a[4], b[2];
};
MmaFragment g_mma_exchange[kMaxWarps][32];
// `extern __shared__` (dynamic shared memory) arrays point here: the extraction rewrites their declarations.
float g_dynamic_shared[16 * 1024];

// The race check (tests/test_cuda_emulation.py builds a harness with -fsanitize=thread): ThreadSanitizer reports two
// accesses to the same memory, one a write, by threads that nothing orders, and orders them as CUDA's memory model
// does: __syncthreads and __syncwarp (and a launch's end) order every access before them before every access after
// them; the warp shuffles and the MMAs order nothing (they exchange registers: a lane's shared-memory write before
// one and another lane's read after it still race). Their stand-ins exchange through emu.h's buffers, between warp
// barriers: inside one, Unordered keeps ThreadSanitizer from taking those barriers as ordering and from checking the
// buffers' accesses. So a missing __syncwarp between a shared-memory write and another lane's read or write of it
// shows even where the lanes' MMAs (which wait for every lane of the warp) kept the order of a run.
#if defined(__SANITIZE_THREAD__)
extern "C" {
void AnnotateIgnoreSyncBegin(const char* file, int line);
void AnnotateIgnoreSyncEnd(const char* file, int line);
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}
struct Unordered {
  Unordered() {
    AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~Unordered() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
    AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
  }
  Unordered(const Unordered&) = delete;
  Unordered& operator=(const Unordered&) = delete;
};
#else
struct Unordered {};
#endif

inline uint32_t __float_as_uint(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// Warp 0 runs ahead: after each of a kernel's block barriers the other warps wait until all of warp 0 has reached
// the next one (its next __syncthreads, or the end of the block), so warp 0's writes of the next phase land before
// the other warps read what the last phase left in shared memory. A fair schedule let the other warps finish their
// reads first, which hid a missing barrier before shared memory is overwritten (helper 175: the one after dB's
// shared sum in lora_bwd_dy_mma_kernel). Counted per launch: every thread passes the same barriers.
std::mutex g_warp0_mutex;
std::condition_variable g_warp0_arrived;
unsigned g_warp0_arrivals = 0;  // block barriers reached by warp 0's threads, summed over its 32 lanes
thread_local unsigned t_barriers_passed = 0;

// The run-ahead only schedules: it orders nothing for the race check (Unordered), which so also reports warp 0's
// writes of the next phase racing the other warps' reads of the last.
inline void block_barrier(bool kernel_barrier) {
  if (threadIdx.x < 32) {
    const Unordered unordered;
    {
      const std::lock_guard<std::mutex> lock(g_warp0_mutex);
      ++g_warp0_arrivals;
    }
    g_warp0_arrived.notify_all();
  }
  g_block_barrier->arrive_and_wait();
  ++t_barriers_passed;
  if (kernel_barrier && threadIdx.x >= 32) {  // a kernel's barrier: the end of the block (or another) comes next
    const Unordered unordered;
    std::unique_lock<std::mutex> lock(g_warp0_mutex);
    g_warp0_arrived.wait(lock, [] { return g_warp0_arrivals >= 32 * (t_barriers_passed + 1); });
  }
}

inline void __syncthreads() { block_barrier(true); }
inline void __syncwarp() { g_warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  const Unordered unordered;
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
template <typename T>
T __ldcg(const T* p) { return *p; }

// What the .cu files take from grid_sizing.h (but its arithmetic, which test_cuda_emulation.py extracts with the
// kernels) and launchers.h, and the PTX of tensor_core.h. The launcher harnesses (LK_EMU_LAUNCHERS) compile the real
// grid_sizing.h and launchers.h instead, whose sm_count asks the stand-in of cudaDeviceGetAttribute
// (host_stubs/cuda_runtime_api.h) for g_sm_count.
namespace lora_kernels {
inline int g_sm_count = 132;  // the H200's; the harness varies it
#ifndef LK_EMU_LAUNCHERS
constexpr int kBlocksPerSm = 2;
inline int sm_count(int) { return g_sm_count; }
constexpr int64_t kSgmvTileTokens = 32;
constexpr int64_t kMaxGridYZ = 65535;
#endif

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d (16 x 8, fp32) += a (16 x 16) · b (16 x 8). Lane = 4 g + t
// holds a's rows g and g + 8 at columns {2t, 2t + 1} (registers a0, a1) and {2t + 8, 2t + 9} (a2, a3), b's column g
// at rows {2t, 2t + 1} (b0) and {2t + 8, 2t + 9} (b1), the lower index in the lower 16 bits; d[i] is row
// g + 8 * (i / 2), column 2t + i % 2.
template <typename T>
float fp16_bits_to_float(uint32_t reg, int upper) {
  const uint16_t bits = static_cast<uint16_t>(upper ? reg >> 16 : reg & 0xffffu);
  T value;
  std::memcpy(&value, &bits, sizeof(bits));
  return static_cast<float>(value);
}

template <typename T>
void mma_m16n8k16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  const Unordered unordered;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  g_mma_exchange[warp][lane] = {{a0, a1, a2, a3}, {b0, b1}};
  g_warp_barriers[warp]->arrive_and_wait();
  const auto a = [&](int row, int k) {
    const MmaFragment& f = g_mma_exchange[warp][4 * (row % 8) + (k % 8) / 2];
    return fp16_bits_to_float<T>(f.a[(k < 8 ? 0 : 2) + row / 8], k % 2);
  };
  const auto b = [&](int k, int col) {
    return fp16_bits_to_float<T>(g_mma_exchange[warp][4 * col + (k % 8) / 2].b[k / 8], k % 2);
  };
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    for (int k = 0; k < 16; ++k) d[i] = std::fma(a(row, k), b(k, col), d[i]);
  }
  g_warp_barriers[warp]->arrive_and_wait();
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: lane 4 g + t holds a's rows g (a0) and g + 8 (a1) at column t,
// the same rows at column t + 4 (a2, a3), b's column g at rows t (b0) and t + 4 (b1); d as above. The tensor cores
// use the operands' upper 19 bits (the low 13 mantissa bits are ignored).
inline float tf32_operand(uint32_t bits) {
  bits &= ~0x1fffu;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline void mma_m16n8k8_tf32(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                             uint32_t b1) {
  const Unordered unordered;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  g_mma_exchange[warp][lane] = {{a0, a1, a2, a3}, {b0, b1}};
  g_warp_barriers[warp]->arrive_and_wait();
  const auto a = [&](int row, int k) {
    return tf32_operand(g_mma_exchange[warp][4 * (row % 8) + k % 4].a[(k < 4 ? 0 : 2) + row / 8]);
  };
  const auto b = [&](int k, int col) { return tf32_operand(g_mma_exchange[warp][4 * col + k % 4].b[k / 4]); };
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    for (int k = 0; k < 8; ++k) d[i] = std::fma(a(row, k), b(k, col), d[i]);
  }
  g_warp_barriers[warp]->arrive_and_wait();
}

// cvt.rna.tf32.f32: to the nearest tf32, ties away from zero. A NaN stays a NaN (the canonical one): the rounding
// add would carry a payload with its top mantissa bits set into the sign bit, a -0.0 that hid the NaN.
inline uint32_t to_tf32(float value) {
  if (std::isnan(value)) return 0x7fffffffu;
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return (bits + 0x1000u) & ~0x1fffu;
}
}  // namespace lora_kernels

// kernel(args) over the grid (grid_x, grid_y, grid_z) with `threads` threads per block. The same threads run every
// block and meet at a barrier after each: the kernels' own barriers all come before any early return of a thread,
// and a warp returns as a whole before its warp-wide operations, so every thread passes the same number of them.
template <typename Kernel, typename Args>
void emulate_launch(Kernel kernel, const Args& args, unsigned grid_x, unsigned grid_y, unsigned grid_z,
                    unsigned threads) {
  blockDim = {threads, 1, 1};
  gridDim = {grid_x, grid_y, grid_z};
  g_block_barrier = std::make_unique<std::barrier<>>(threads);
  g_warp0_arrivals = 0;
  g_warp_barriers.clear();
  for (unsigned w = 0; w < threads / 32; ++w) g_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = {t, 0, 0};
      t_barriers_passed = 0;
      for (unsigned bz = 0; bz < grid_z; ++bz) {
        for (unsigned by = 0; by < grid_y; ++by) {
          for (unsigned bx = 0; bx < grid_x; ++bx) {
            blockIdx = {bx, by, bz};
            kernel(args);
            block_barrier(false);
          }
        }
      }
    });
  }
  for (auto& thread : pool) thread.join();
}
