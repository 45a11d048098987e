// CUDA implementations of lora_fwd and lora_bwd_dy (schemas in csrc/ops.cpp).
//
// lora_fwd, decode sizes (M <= 16): two hand-written kernels.
//   1. lora_shrink_splitk_kernel: S partials = x_lora · Aᵀ over K slices (split-K: A has only r rows, so without
//      splitting K a handful of blocks would read it). Partials [splits, M, r] fp32, no atomics.
//   2. the forward: every block sums the partials into S in shared memory (fixed order: deterministic; block 0 also
//      stores S as the `s` output), streams its rows of W once with 16-byte loads, adds scaling·dot(S_m, B_n) and the
//      bias in fp32 and stores y in x.dtype. W is read exactly once. fp16/bf16 on sm_80+ with 16-byte aligned rows
//      (x is copied into such rows; W is not copied): lora_fwd_decode_mma_kernel, the base product on tensor cores
//      (x's rows are one MMA tile); otherwise lora_fwd_decode_kernel, fp32 FMAs on CUDA cores. Where its image is
//      compiled for sm_90+, the tensor-core kernel is launched as a programmatic dependent of the shrink: it streams
//      W while the shrink runs and reads the partials only after waiting for it (wait_for_prerequisite_grids).
// lora_fwd, M > 16: ATen GEMMs with in-place epilogues (see lora_fwd_gemm).
// lora_bwd_dy, r <= 64 and not float64: one kernel reads each element of dy once and produces both
//   ds = scaling·dy·B and dB = scaling·dyᵀ·S as deterministic fp32 partials, summed afterwards in a fixed order: on
//   tensor cores for fp16/bf16 up to r = 32 with 16-byte rows (lora_bwd_dy_mma_kernel), on CUDA cores otherwise
//   (lora_bwd_dy_kernel). r > 64 and float64: two cuBLAS GEMMs (see lora_bwd_dy_cuda_launch).
//
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers a bare toolkit may lack.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "grid_sizing.h"
#include "launchers.h"
#include "tensor_core.h"

namespace lora_kernels {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- decode forward ------------------------------------------------------------------------------------------
// Decode path bound: issue #3 asks for a hand-written forward at M <= 16; above it cuBLAS's tensor-core GEMMs are
// expected to win (the same bound as Triton's DECODE_MAX_M). On the H200 (2026-11-30, bf16, K = N = 4096, r = 16) the
// decode path took 0.63x its GEMM path at M = 1 (17.3 against 27.5 µs) but 1.19x at M = 16, where the split-K shrink
// took 15.7 of its 32.6 µs (one DRAM round trip per row of x, since fixed in warp_rows_dot; not re-measured).
// benchmarks/cuda_crossovers.py measures the decode path against its GEMM path at M = 1..16.
constexpr int kDecodeMaxM = 16;
constexpr int kDecodeMaxRank = 256;  // S [M, r] fp32 lives in shared memory: 16 * 256 * 4 B = 16 KiB
constexpr int kDecodeWarps = 4;      // 128 threads per block
constexpr int kRowsPerWarp = 4;      // rows of W per warp: each x vector loaded serves 4 rows (L1 traffic / 4)
constexpr int kRowsPerBlock = kDecodeWarps * kRowsPerWarp;
constexpr int kMaxSplitK = 32;         // bounds the partial-sum work of the second kernel
// Floats of S partials (splits * M * r) each forward block sums from L2 (8 KiB): caps the splits as M·r grows (8 at
// M = r = 16, one past M·r = 1024). A round number, not measured.
constexpr int kPartialBudget = 2048;

// ---- backward ------------------------------------------------------------------------------------------------
constexpr int kBwdThreads = 256;
constexpr int kBwdItems = 8;         // (column, rank) accumulators per thread: tile * r <= 256 * 8
constexpr int kBwdMaxRank = 64;      // above: 2r fp32 FMAs per dy element make this kernel slower than cuBLAS

// Elements of T in one 16-byte vector.
template <typename T>
struct Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
};

// The 16-byte vector `raw` as Vec16<T>::kSize floats.
template <typename T>
__device__ __forceinline__ void vec16_to_float(const uint4& raw, float (&out)[Vec16<T>::kSize]) {
  const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec16<T>::kSize; ++i) {
    out[i] = static_cast<float>(elems[i]);
  }
}

// Per-lane partial sums acc[rr][m] += Σ_k x[m, k] · w[row0 + rr, k] for k in [k_begin, k_end) (lanes stride K).
// `vec` selects 16-byte loads; the caller guarantees that then K-slice bounds, row strides and base pointers are
// multiples of the vector width / 16 bytes.
// Each step issues all its loads (kRowsPerWarp rows of w, kMaxM rows of x) before its first FMA: one memory round
// trip per step. A guard per row of x (`if (m < M)`) compiled to a branch and a dependent load per row, kMaxM round
// trips per step: on the H200 the decode shrink took 15.7 µs at M = 16 against 2.2 µs at M = 1. So rows past
// num_rows or M read the last valid row again (always in bounds) and their sums are garbage that no caller stores:
// the callers guard their stores by row and by m < M, and warp_reduce skips m >= M.
template <typename T, int kMaxM>
__device__ __forceinline__ void warp_rows_dot(const T* __restrict__ x, int64_t ldx, int M, const T* __restrict__ w,
                                              int64_t ldw, int64_t row0, int64_t num_rows, int64_t k_begin,
                                              int64_t k_end, bool vec, float (&acc)[kRowsPerWarp][kMaxM]) {
  const int lane = threadIdx.x % kWarpSize;
  const T* w_rows[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    w_rows[rr] = w + (row0 + rr < num_rows ? row0 + rr : num_rows - 1) * ldw;
  }
  auto x_row = [&](int m) { return x + int64_t(m < M ? m : M - 1) * ldx; };
  if (vec) {
    constexpr int V = Vec16<T>::kSize;
    for (int64_t k = k_begin + int64_t(lane) * V; k < k_end; k += int64_t(kWarpSize) * V) {
      uint4 w_raw[kRowsPerWarp], x_raw[kMaxM];
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        w_raw[rr] = __ldcs(reinterpret_cast<const uint4*>(w_rows[rr] + k));  // W streamed once: evict first
      }
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
        x_raw[m] = __ldg(reinterpret_cast<const uint4*>(x_row(m) + k));  // x re-read by every warp: cached
      }
      float wv[kRowsPerWarp][V];
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) vec16_to_float<T>(w_raw[rr], wv[rr]);
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
        float xv[V];
        vec16_to_float<T>(x_raw[m], xv);
#pragma unroll
        for (int rr = 0; rr < kRowsPerWarp; ++rr) {
#pragma unroll
          for (int v = 0; v < V; ++v) acc[rr][m] = fmaf(wv[rr][v], xv[v], acc[rr][m]);
        }
      }
    }
  } else {
    for (int64_t k = k_begin + lane; k < k_end; k += kWarpSize) {
      float wv[kRowsPerWarp], xv[kMaxM];
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) wv[rr] = static_cast<float>(w_rows[rr][k]);
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) xv[m] = static_cast<float>(x_row(m)[k]);
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
#pragma unroll
        for (int rr = 0; rr < kRowsPerWarp; ++rr) acc[rr][m] = fmaf(wv[rr], xv[m], acc[rr][m]);
      }
    }
  }
}

// Butterfly sum across the warp: afterwards every lane holds every total.
template <int kMaxM>
__device__ __forceinline__ void warp_reduce(int M, float (&acc)[kRowsPerWarp][kMaxM]) {
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) {
      if (m < M) {
#pragma unroll
        for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
          acc[rr][m] += __shfl_xor_sync(kFullMask, acc[rr][m], offset);
        }
      }
    }
  }
}

// Programmatic dependent launch (PDL, sm_90+): the tensor-core forward kernel is launched as a dependent of the
// shrink before it, so it starts while the shrink runs, streams W, and only then waits for the shrink's partials
// (on the H200 the shrink took 2.2 of the forward's 17.3 µs at M = 1, and the kernels ran one after the other).
// Where a kernel was not launched as a dependent, the wait returns at once (it started after the shrink ended), and
// the trigger does nothing. An image compiled for an older architecture has neither instruction; the launcher never
// launches such a kernel as a dependent (compiled_arch, grid_sizing.h).
__device__ __forceinline__ void let_dependent_grid_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Waits until the grids this one depends on (the shrink) have finished and their writes are visible.
__device__ __forceinline__ void wait_for_prerequisite_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// grid (ceil(r / kRowsPerBlock), splits). partials[split, m, j] = Σ_{k in split} x_lora[m, k] · A[j, k].
// __launch_bounds__'s minimum of 1 block per SM: with its default, ptxas issued 8 of a step's 20 loads (kMaxM = 16,
// bf16) before the first FMA, with it 11 (188 registers, no spills; sm_90a SASS read with cuobjdump). The grid is at
// most 16 x kMaxSplitK = 512 blocks, so fewer resident blocks per SM costs nothing.
template <typename T, int kMaxM>
__global__ void __launch_bounds__(kDecodeWarps* kWarpSize, 1)
    lora_shrink_splitk_kernel(const T* __restrict__ x_lora, int64_t ldx, int M, const T* __restrict__ lora_a,
                              int64_t lda, int r, int64_t K, int64_t k_per_split, bool vec,
                              float* __restrict__ partials) {
  let_dependent_grid_launch();  // at once: the forward's blocks fit beside this grid's (a few hundred of 128 threads)
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t row0 = int64_t(blockIdx.x) * kRowsPerBlock + int64_t(warp) * kRowsPerWarp;
  if (row0 >= r) {
    return;
  }
  const int64_t k_begin = int64_t(blockIdx.y) * k_per_split;
  const int64_t k_end = k_begin + k_per_split < K ? k_begin + k_per_split : K;
  float acc[kRowsPerWarp][kMaxM];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) acc[rr][m] = 0.f;
  }
  warp_rows_dot<T, kMaxM>(x_lora, ldx, M, lora_a, lda, row0, r, k_begin, k_end, vec, acc);
  warp_reduce<kMaxM>(M, acc);
  float* out = partials + int64_t(blockIdx.y) * M * r;
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) {
      if (m < M && row0 + rr < r && lane == (rr * kMaxM + m) % kWarpSize) {
        out[int64_t(m) * r + row0 + rr] = acc[rr][m];
      }
    }
  }
}

// S = Σ_split partials[split] ([M, r], mr elements) into shared memory, in a fixed order (deterministic); block 0
// also stores it as the op's `s` output. Ends with a barrier: S is ready for every thread of the block. The partials
// are read from L2 (__ldcg), not through the read-only cache that `const __restrict__` would allow: under PDL the
// shrink writes them while this kernel runs (wait_for_prerequisite_grids orders the reads after those writes).
__device__ __forceinline__ void sum_shrink_partials(const float* partials, int splits, int64_t mr, float* s_shared,
                                                    float* __restrict__ s_out) {
  for (int64_t i = threadIdx.x; i < mr; i += blockDim.x) {
    float total = 0.f;
    for (int split = 0; split < splits; ++split) total += __ldcg(partials + split * mr + i);
    s_shared[i] = total;
    if (blockIdx.x == 0) {
      s_out[i] = total;
    }
  }
  __syncthreads();
}

// grid (ceil(N / kRowsPerBlock)), dynamic shared memory M * r floats.
// y[m, n] = Σ_k x[m, k] · W[n, k] + scaling · Σ_j S[m, j] · B[n, j] + bias[n], S = Σ_split partials[split].
template <typename T, int kMaxM>
__global__ void __launch_bounds__(kDecodeWarps* kWarpSize)
    lora_fwd_decode_kernel(const T* __restrict__ x, int64_t ldx, int M, const T* __restrict__ weight, int64_t ldw,
                           int64_t N, int64_t K, bool vec, const float* partials, int splits, int r,
                           const T* __restrict__ lora_b, int64_t ldb_n, int64_t ldb_r, float scaling,
                           const T* __restrict__ bias, int64_t bias_stride, T* __restrict__ y, int64_t ldy,
                           float* __restrict__ s_out) {
  extern __shared__ float s_shared[];  // [M, r]
  sum_shrink_partials(partials, splits, int64_t(M) * r, s_shared, s_out);

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t row0 = int64_t(blockIdx.x) * kRowsPerBlock + int64_t(warp) * kRowsPerWarp;
  if (row0 >= N) {
    return;
  }
  float acc[kRowsPerWarp][kMaxM];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) acc[rr][m] = 0.f;
  }
  warp_rows_dot<T, kMaxM>(x, ldx, M, weight, ldw, row0, N, 0, K, vec, acc);
  // The LoRA expand goes into the same per-lane accumulators before the one warp reduction (lanes stride r).
  for (int j = lane; j < r; j += kWarpSize) {
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      if (row0 + rr < N) {
        const float b = scaling * static_cast<float>(lora_b[(row0 + rr) * ldb_n + int64_t(j) * ldb_r]);
#pragma unroll
        for (int m = 0; m < kMaxM; ++m) {
          if (m < M) acc[rr][m] = fmaf(s_shared[m * r + j], b, acc[rr][m]);
        }
      }
    }
  }
  warp_reduce<kMaxM>(M, acc);
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t n = row0 + rr;
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) {
      if (m < M && n < N && lane == (rr * kMaxM + m) % kWarpSize) {
        const float b = bias != nullptr ? static_cast<float>(bias[n * bias_stride]) : 0.f;
        y[m * ldy + n] = static_cast<T>(acc[rr][m] + b);
      }
    }
  }
}

// ---- decode forward on tensor cores (fp16/bf16, sm_80+) -------------------------------------------------------
// lora_fwd_decode_kernel spends M fp32 FMAs per element of W and re-reads x for every kRowsPerWarp rows of W; each
// warp has one 16-byte load per row in flight per step. On the H200 it took 106 µs at M = 16 (F.linear 15.6 µs) and
// 34.8 µs at M = 1, where W alone takes ~8 µs at the copy rate. Here the M <= 16 rows of x are the rows of one
// m16n8k16 MMA tile (missing rows are zeros), so a warp multiplies 256 bytes of W per tensor-core instruction, and
// each lane keeps kMmaUnroll x kMmaTiles 16-byte loads of W in flight. On the H200 (2026-11-30) it took 8.7 µs at
// M = 1 and 10.3 µs at M = 16 for K = N = 4096 (cuBLAS's F.linear at M = 1: 8.4 µs plus a 1.6 µs split-K reduce).
constexpr int kMmaWarps = 8;          // the warps of a block split K between them
constexpr int kMmaTiles = 2;          // n8 MMA tiles per block: kMmaRowsPerBlock rows of W
constexpr int kMmaRowsPerBlock = 8 * kMmaTiles;
constexpr int kMmaChunk = 32;         // K elements per mma_k32: 4 lanes x 8 consecutive elements (16 bytes)
constexpr int kMmaUnroll = 4;         // chunks per warp step, all loaded before the first MMA
constexpr int64_t kMmaWarpStep = int64_t(kMmaChunk) * kMmaUnroll;
static_assert(kMmaWarps * kWarpSize == kDecodeMaxM * kMmaRowsPerBlock, "the epilogue maps one thread per output");

// grid (ceil(N / kMmaRowsPerBlock)), kMmaWarps warps, dynamic shared memory M * r floats. The same y as
// lora_fwd_decode_kernel. Needs K, ldx and ldw multiples of 8 and x, W 16-byte aligned (every 16-byte load whole).
// kUpperRows: M > 8, so the MMA tile's rows 8..15 hold rows of x (else they are zeros, not loaded). MMA operands
// (csrc/cuda/tensor_core.h): A = x's rows [16, k], B = W's rows as columns [k, n8], two n8 tiles per block.
//
// __launch_bounds__'s minimum of 1 block per SM lets ptxas keep a whole step's loads in registers (108-122 of them):
// with its default it kept 64 and issued each chunk's loads just before that chunk's MMAs, one DRAM round trip per
// chunk instead of one per step (sm_90a SASS read with cuobjdump; 256 threads x 122 registers still fit 2 blocks/SM).
template <typename T, bool kUpperRows>
__global__ void __launch_bounds__(kMmaWarps* kWarpSize, 1)
    lora_fwd_decode_mma_kernel(const T* __restrict__ x, int64_t ldx, int M, const T* __restrict__ weight,
                               int64_t ldw, int64_t N, int64_t K, const float* partials, int splits,
                               int r, const T* __restrict__ lora_b, int64_t ldb_n, int64_t ldb_r, float scaling,
                               const T* __restrict__ bias, int64_t bias_stride, T* __restrict__ y, int64_t ldy,
                               float* __restrict__ s_out) {
  extern __shared__ float s_shared[];  // [M, r]
  __shared__ float warp_sums[kMmaWarps][kDecodeMaxM][kMmaRowsPerBlock];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int group = lane / 4, t = lane % 4;
  const int64_t n0 = int64_t(blockIdx.x) * kMmaRowsPerBlock;
  // Rows past M or N are read as zeros; their pointers stay at row 0, never dereferenced.
  const bool x_lo_ok = group < M, x_hi_ok = kUpperRows && group + 8 < M;
  const T* x_lo = x + (x_lo_ok ? int64_t(group) : 0) * ldx + 8 * t;
  const T* x_hi = x + (x_hi_ok ? int64_t(group) + 8 : 0) * ldx + 8 * t;
  const T* w_rows[kMmaTiles];
  bool w_ok[kMmaTiles];
  mma_b_rows(weight, n0, N, ldw, group, t, w_rows, w_ok);

  float acc[kMmaTiles][4] = {};
  for (int64_t k0 = int64_t(warp) * kMmaWarpStep; k0 < K; k0 += int64_t(kMmaWarps) * kMmaWarpStep) {
    uint4 w[kMmaUnroll][kMmaTiles], xl[kMmaUnroll], xh[kMmaUnroll];
#pragma unroll
    for (int u = 0; u < kMmaUnroll; ++u) {
      const int64_t k = k0 + u * kMmaChunk;
      const bool in_k = k + 8 * t < K;  // K is a multiple of 8: a 16-byte load is wholly inside K or outside
#pragma unroll
      for (int tile = 0; tile < kMmaTiles; ++tile) {
        w[u][tile] = load16_or_zero(w_rows[tile] + k, in_k && w_ok[tile], true);
      }
      xl[u] = load16_or_zero(x_lo + k, in_k && x_lo_ok, false);
      xh[u] = load16_or_zero(x_hi + k, in_k && x_hi_ok, false);
    }
#pragma unroll
    for (int u = 0; u < kMmaUnroll; ++u) {
#pragma unroll
      for (int tile = 0; tile < kMmaTiles; ++tile) mma_k32<T>(acc[tile], xl[u], xh[u], w[u][tile]);
    }
  }
  // acc[tile][i] is row (m) g + 8 * (i / 2), column (n) 8 * tile + 2t + i % 2 (tensor_core.h)
#pragma unroll
  for (int tile = 0; tile < kMmaTiles; ++tile) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      warp_sums[warp][group + 8 * (i / 2)][8 * tile + 2 * t + i % 2] = acc[tile][i];
    }
  }
  // The base product is done without S; the shrink's partials are read only now (PDL, above). The barrier at the end
  // of sum_shrink_partials also makes warp_sums whole for the epilogue.
  wait_for_prerequisite_grids();
  sum_shrink_partials(partials, splits, int64_t(M) * r, s_shared, s_out);

  // One thread per output: the warps' K slices summed in a fixed order, then the LoRA term and the bias in fp32.
  const int m = threadIdx.x / kMmaRowsPerBlock, col = threadIdx.x % kMmaRowsPerBlock;
  const int64_t n = n0 + col;
  if (m < M && n < N) {
    float base = 0.f;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) base += warp_sums[w][m][col];
    float lora = 0.f;
    for (int j = 0; j < r; ++j) {
      lora = fmaf(s_shared[m * r + j], static_cast<float>(lora_b[n * ldb_n + j * ldb_r]), lora);
    }
    const float b = bias != nullptr ? static_cast<float>(bias[n * bias_stride]) : 0.f;
    y[m * ldy + n] = static_cast<T>(base + scaling * lora + b);
  }
}

// The decode shrink's K-split: enough splits that its blocks (ceil(r / kRowsPerBlock) per split) cover the GPU, in
// chunks of one warp-wide vector load (V elements per lane), within the partial budget. From the shapes and the SM
// count only.
KSplit decode_shrink_split(int64_t M, int64_t r, int64_t K, int64_t V, int device) {
  const int64_t chunk = int64_t(kWarpSize) * V;
  const int64_t chunks = std::max<int64_t>(ceil_div(K, chunk), 1);
  const int64_t row_blocks = ceil_div(r, kRowsPerBlock);
  const int64_t fill = ceil_div(int64_t(kBlocksPerSm) * sm_count(device), row_blocks);
  const int64_t within_budget = std::max<int64_t>(kPartialBudget / (M * r), 1);
  return split_k_in_tiles(K, chunk, std::min<int64_t>({fill, kMaxSplitK, chunks, within_budget}));
}

#define LK_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Rows of A must be unit-stride for the kernels (A is r x K, so a copy is cheap). W is not copied: a transposed W
// (GPT-2's Conv1D, fan_in_fan_out) takes the GEMM path, since copying it would triple the bytes decode exists to save.
at::Tensor unit_stride_rows(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// x is at most 16 rows: copying it is cheap and gives the kernels contiguous rows their 16-byte loads read whole.
// contiguous() returns an already contiguous view as it is, one element into its buffer included, which would take
// the CUDA-core forward; a fresh allocation is 16-byte aligned.
at::Tensor contiguous_aligned16(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return aligned16(c.data_ptr()) ? c : c.clone();
}

template <typename T, int kMaxM>
void launch_decode(const at::Tensor& x, const at::Tensor& x_lora, const at::Tensor& weight, const at::Tensor& lora_a,
                   const at::Tensor& lora_b, double scaling, const std::optional<at::Tensor>& bias, at::Tensor& y,
                   at::Tensor& s) {
  const int M = static_cast<int>(x.size(0)), r = static_cast<int>(lora_a.size(0));
  const int64_t K = x.size(1), N = weight.size(0);
  constexpr int V = Vec16<T>::kSize;
  const T* x_ptr = x.data_ptr<T>();
  const T* xl_ptr = x_lora.data_ptr<T>();
  const T* w_ptr = weight.data_ptr<T>();
  const T* a_ptr = lora_a.data_ptr<T>();
  const int64_t ldx = x.stride(0), ldxl = x_lora.stride(0), ldw = weight.stride(0), lda = lora_a.stride(0);
  // 16-byte loads need every row start 16-byte aligned: K, the row strides and the base pointers.
  const bool vec_fwd = K % V == 0 && ldx % V == 0 && ldw % V == 0 && aligned16(x_ptr) && aligned16(w_ptr);
  const bool vec_shrink = K % V == 0 && ldxl % V == 0 && lda % V == 0 && aligned16(xl_ptr) && aligned16(a_ptr);

  const int device = x.get_device();
  const KSplit split = decode_shrink_split(M, r, K, V, device);
  const int64_t splits = split.splits;
  at::Tensor partials = at::empty({splits, M, r}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  lora_shrink_splitk_kernel<T, kMaxM>
      <<<dim3(ceil_div(r, kRowsPerBlock), splits), kDecodeWarps * kWarpSize, 0, stream>>>(
          xl_ptr, ldxl, M, a_ptr, lda, r, K, split.k_per_split, vec_shrink, partials.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const T* bias_ptr = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  const int64_t bias_stride = bias.has_value() ? bias->stride(0) : 0;
  const size_t shared_bytes = size_t(M) * r * sizeof(float);
  if constexpr (!std::is_same_v<T, float>) {
    auto kernel = M > 8 ? lora_fwd_decode_mma_kernel<T, true> : lora_fwd_decode_mma_kernel<T, false>;
    const int arch = compiled_arch(reinterpret_cast<const void*>(kernel), device);
    if (vec_fwd && arch >= 80) {
      // As a dependent of the shrink only where its image has the wait (sm_90+): without it, it would read the
      // partials before the shrink wrote them.
      cudaLaunchConfig_t config = {};
      config.gridDim = dim3(ceil_div(N, kMmaRowsPerBlock));
      config.blockDim = dim3(kMmaWarps * kWarpSize);
      config.dynamicSmemBytes = shared_bytes;
      config.stream = stream;
      cudaLaunchAttribute dependent = {};
      dependent.id = cudaLaunchAttributeProgrammaticStreamSerialization;
      dependent.val.programmaticStreamSerializationAllowed = 1;
      config.attrs = &dependent;
      config.numAttrs = arch >= 90 ? 1 : 0;
      C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, x_ptr, ldx, M, w_ptr, ldw, N, K, partials.data_ptr<float>(),
                                        static_cast<int>(splits), r, lora_b.data_ptr<T>(), lora_b.stride(0),
                                        lora_b.stride(1), static_cast<float>(scaling), bias_ptr, bias_stride,
                                        y.data_ptr<T>(), y.stride(0), s.data_ptr<float>()));
      return;
    }
  }
  lora_fwd_decode_kernel<T, kMaxM><<<ceil_div(N, kRowsPerBlock), kDecodeWarps * kWarpSize, shared_bytes, stream>>>(
      x_ptr, ldx, M, w_ptr, ldw, N, K, vec_fwd, partials.data_ptr<float>(), static_cast<int>(splits), r,
      lora_b.data_ptr<T>(), lora_b.stride(0), lora_b.stride(1), static_cast<float>(scaling), bias_ptr, bias_stride,
      y.data_ptr<T>(), y.stride(0), s.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// fp32 result of a @ b: cuBLAS writes fp32 directly for half types (mm.dtype), no rounding through the input dtype.
at::Tensor mm_float(const at::Tensor& a, const at::Tensor& b) {
  const at::ScalarType dtype = a.scalar_type();
  if (dtype == at::kHalf || dtype == at::kBFloat16) {
    return at::mm(a, b, at::kFloat);
  }
  return at::mm(a, b);  // fp32 stays fp32; fp64 stays fp64
}

// M > 16 (and fp64, r > 256, a transposed W, empty shapes): cuBLAS tensor-core GEMMs are the roofline at large M,
// and the LoRA term is only 2r/d extra FLOPs and bytes, so a hand-written GEMM has nothing to win there. The LoRA
// term (with the bias) is written into y first, and the base GEMM then adds into it with beta = 1: cuBLAS reads y in
// its epilogue, hidden under the compute-bound M·N·K mainloop. The other order (base GEMM, then the rank-r GEMM
// adding in place) made the memory-bound rank-r GEMM read and write y: at M = 8192, K = N = 4096 in bf16 that is
// 128 MB against 64 MB written here, ~20 µs of the ~450 µs forward on an H100 by bandwidth (the first H100 run
// measured the old order at 1.29x F.linear; this order is not measured yet). Unlike the decode kernel's single fp32
// accumulator, 16-bit S is rounded to x's dtype for the rank-r GEMM and the LoRA term + bias once more when stored
// in y before the base GEMM adds to it (the base product itself is rounded once, at the end), within design.md §7's
// tolerances; an fp32 [M, N] y would cost more bytes than the LoRA term itself.
std::tuple<at::Tensor, at::Tensor> lora_fwd_gemm(const at::Tensor& x, const at::Tensor& x_lora,
                                                 const at::Tensor& weight, const at::Tensor& lora_a,
                                                 const at::Tensor& lora_b, double scaling,
                                                 const std::optional<at::Tensor>& bias) {
  const at::Tensor s_acc = mm_float(x_lora, lora_a.t());  // [M, r] unscaled, fp32 (fp64 for fp64 inputs)
  // Scaling as addmm's alpha keeps S unscaled where it is rounded to 16 bits (it overflows only where PEFT's S
  // does). But BLAS skips the product when alpha is 0, so at scaling 0 a NaN/Inf in lora_b or S would vanish while
  // the reference and the other backends return NaN (0·NaN): there the zero is multiplied into S instead.
  const bool zero_scaling = scaling == 0.0;
  const at::Tensor s_in = (zero_scaling ? s_acc.mul(0.0) : s_acc).to(x.scalar_type());
  const double alpha = zero_scaling ? 1.0 : scaling;
  at::Tensor y;
  if (bias.has_value()) {
    y = at::addmm(*bias, s_in, lora_b.t(), /*beta=*/1.0, alpha);
  } else {
    y = at::empty({x.size(0), weight.size(0)}, x.options());
    y.addmm_(s_in, lora_b.t(), /*beta=*/0.0, alpha);  // beta 0: y's uninitialised values are not read
  }
  y.addmm_(x, weight.t());
  return {y, s_acc};
}

}  // namespace

// Launchers (csrc/cuda/launchers.h): the arguments were validated by csrc/cuda/register_cuda.cpp, which also holds
// the CUDA registrations; nothing here throws for user input.
std::tuple<at::Tensor, at::Tensor> lora_fwd_cuda_launch(const at::Tensor& x,
                                                        const std::optional<at::Tensor>& x_lora_opt,
                                                        const at::Tensor& weight, const at::Tensor& lora_a,
                                                        const at::Tensor& lora_b, double scaling,
                                                        const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_a.size(0);
  const at::Tensor x_lora = x_lora_opt.has_value() ? *x_lora_opt : x;
  const bool decode = M >= 1 && M <= kDecodeMaxM && N >= 1 && K >= 1 && r <= kDecodeMaxRank &&
                      x.scalar_type() != at::kDouble && weight.stride(1) == 1;
  if (!decode) {
    return lora_fwd_gemm(x, x_lora, weight, lora_a, lora_b, scaling, bias);
  }
  const at::Tensor xc = contiguous_aligned16(x);
  const at::Tensor xlc = x_lora_opt.has_value() ? contiguous_aligned16(*x_lora_opt) : xc;
  const at::Tensor ac = unit_stride_rows(lora_a);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor s = at::empty({M, r}, x.options().dtype(at::kFloat));
  LK_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "lora_fwd_cuda", [&] {
    if (M == 1) {
      launch_decode<scalar_t, 1>(xc, xlc, weight, ac, lora_b, scaling, bias, y, s);
    } else if (M <= 4) {
      launch_decode<scalar_t, 4>(xc, xlc, weight, ac, lora_b, scaling, bias, y, s);
    } else {
      launch_decode<scalar_t, 16>(xc, xlc, weight, ac, lora_b, scaling, bias, y, s);
    }
  });
  return {y, s};
}

namespace {

// ---- lora_bwd_dy ---------------------------------------------------------------------------------------------
// grid (col_blocks, row_blocks). A block owns dy[m_begin:m_end, n_begin:n_end] and walks it in tile x tile pieces,
// column pieces outer: per piece of columns, dB[n, :] accumulates in registers over all of the block's rows; ds
// accumulates over the block's column pieces in its own slice of ds_partials (read-modify-write by the thread that
// owns the element, no atomics). Each dy element is loaded once. Partials are reduced by the caller.
template <typename T>
__global__ void __launch_bounds__(kBwdThreads)
    lora_bwd_dy_kernel(const T* __restrict__ dy, int64_t dy_sm, int64_t dy_sn, const float* __restrict__ s,
                       int64_t s_sm, int64_t s_sr, const T* __restrict__ lora_b, int64_t b_sn, int64_t b_sr,
                       int64_t M, int64_t N, int r, float scaling, int tile, int64_t rows_per_block,
                       int64_t cols_per_block, float* __restrict__ db_partials, float* __restrict__ ds_partials) {
  extern __shared__ float smem[];
  const int pitch = tile + 1;  // odd pitch: column reads of dy_tile hit distinct banks
  float* dy_tile = smem;                       // [tile][pitch]
  float* s_tile = dy_tile + tile * pitch;      // [tile][r]
  float* b_tile = s_tile + tile * r;           // [tile][r]
  const int tid = threadIdx.x;
  const int64_t m_begin = int64_t(blockIdx.y) * rows_per_block;
  const int64_t m_end = m_begin + rows_per_block < M ? m_begin + rows_per_block : M;
  const int64_t n_begin = int64_t(blockIdx.x) * cols_per_block;
  const int64_t n_end = n_begin + cols_per_block < N ? n_begin + cols_per_block : N;
  float* db_out = db_partials + int64_t(blockIdx.y) * N * r;
  float* ds_out = ds_partials + int64_t(blockIdx.x) * M * r;
  const int items = tile * r;  // both (column, rank) and (row, rank) work items of one piece

  for (int64_t n0 = n_begin; n0 < n_end; n0 += tile) {
    for (int e = tid; e < items; e += kBwdThreads) {
      const int64_t n = n0 + e / r;
      b_tile[e] = n < n_end ? static_cast<float>(lora_b[n * b_sn + int64_t(e % r) * b_sr]) : 0.f;
    }
    float db_acc[kBwdItems];
#pragma unroll
    for (int i = 0; i < kBwdItems; ++i) db_acc[i] = 0.f;

    for (int64_t m0 = m_begin; m0 < m_end; m0 += tile) {
      __syncthreads();  // b_tile is written; the previous piece's readers of dy_tile/s_tile are done
      for (int e = tid; e < tile * tile; e += kBwdThreads) {
        const int64_t m = m0 + e / tile, n = n0 + e % tile;
        dy_tile[(e / tile) * pitch + e % tile] =
            (m < m_end && n < n_end) ? static_cast<float>(dy[m * dy_sm + n * dy_sn]) : 0.f;
      }
      for (int e = tid; e < items; e += kBwdThreads) {
        const int64_t m = m0 + e / r;
        s_tile[e] = m < m_end ? s[m * s_sm + int64_t(e % r) * s_sr] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kBwdItems; ++i) {
        const int e = tid + i * kBwdThreads;
        if (e < items) {
          const int col = e / r, j = e % r;
          float sum = 0.f;
          for (int row = 0; row < tile; ++row) sum = fmaf(dy_tile[row * pitch + col], s_tile[row * r + j], sum);
          db_acc[i] += sum;
        }
      }
#pragma unroll
      for (int i = 0; i < kBwdItems; ++i) {
        const int e = tid + i * kBwdThreads;
        const int64_t m = m0 + e / r;
        if (e < items && m < m_end) {
          const int row = e / r, j = e % r;
          float sum = 0.f;
          for (int col = 0; col < tile; ++col) sum = fmaf(dy_tile[row * pitch + col], b_tile[col * r + j], sum);
          float* dst = ds_out + m * r + j;
          *dst = n0 == n_begin ? scaling * sum : *dst + scaling * sum;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kBwdItems; ++i) {
      const int e = tid + i * kBwdThreads;
      const int64_t n = n0 + e / r;
      if (e < items && n < n_end) {
        db_out[n * r + e % r] = scaling * db_acc[i];
      }
    }
    __syncthreads();  // every reader of b_tile is done before the next column piece overwrites it
  }
}

// lora_bwd_dy_kernel's threads hold a piece's tile * r (column, rank) items, kBwdItems each; items past that would
// be dropped silently. bwd_dy_grid's tiles, 64 up to r = 32 and 32 up to kBwdMaxRank, fit.
static_assert(64 * 32 <= kBwdThreads * kBwdItems && 32 * kBwdMaxRank <= kBwdThreads * kBwdItems,
              "bwd_dy_grid: tile * r must fit kBwdThreads * kBwdItems");

struct BwdDyGrid {
  int tile;  // the block's square pieces of dy: tile * r <= kBwdThreads * kBwdItems
  int64_t rows_per_block, cols_per_block, row_blocks, col_blocks;
};

// About kBlocksPerSm blocks per SM, split between rows and columns to keep the partials
// (r · (row_blocks · N + col_blocks · M) floats) small; the larger side halved until they fit the budget. Blocks own
// whole pieces of rows and columns.
BwdDyGrid bwd_dy_grid(int64_t M, int64_t N, int64_t r, int device) {
  const int tile = r <= 32 ? 64 : 32;
  const int64_t target = int64_t(kBlocksPerSm) * sm_count(device);
  const int64_t max_row_blocks = ceil_div(M, tile), max_col_blocks = ceil_div(N, tile);
  int64_t row_blocks = std::llround(std::sqrt(double(target) * double(M) / double(N)));
  row_blocks = std::clamp<int64_t>(row_blocks, 1, std::min(max_row_blocks, target));
  int64_t col_blocks = std::clamp<int64_t>(target / row_blocks, 1, max_col_blocks);
  // The partials are written once and read once: capped at half of dy's elements (so at most half as much extra
  // traffic as reading dy) but at least 1 Mi floats (4 MB, which stays in L2 on sm_80/sm_90), so small shapes are not
  // starved of blocks. A starting point, not measured on a GPU yet.
  const int64_t budget = std::max<int64_t>(M * N / 2, int64_t(1) << 20);
  while (r * (row_blocks * N + col_blocks * M) > budget && (row_blocks > 1 || col_blocks > 1)) {
    if ((row_blocks * N >= col_blocks * M && row_blocks > 1) || col_blocks == 1) {
      row_blocks = (row_blocks + 1) / 2;
    } else {
      col_blocks = (col_blocks + 1) / 2;
    }
  }
  const int64_t rows_per_block = ceil_div(ceil_div(M, row_blocks), tile) * tile;
  const int64_t cols_per_block = ceil_div(ceil_div(N, col_blocks), tile) * tile;
  return {tile, rows_per_block, cols_per_block, ceil_div(M, rows_per_block), ceil_div(N, cols_per_block)};
}

// ---- lora_bwd_dy on tensor cores (fp16/bf16, r <= 32, sm_80+) --------------------------------------------------
// lora_bwd_dy_kernel multiplies out of shared memory on CUDA cores, ~16·r bytes of shared-memory traffic per dy
// element: on the H200 it took 6.5x (r = 8) to 19x (r = 64) the time of the two cuBLAS GEMMs at M = 8192 (2-4
// TFLOP/s), so lora_linear's backward runs it only up to M·r = 4096 (functional.py). Here both products run on
// tensor cores, and dy is still read from memory once:
//   dS = dy · B: m16n8k16 with A = dy's rows (16-byte loads, as they lie in memory) and B = Bᵀ's rows (the launcher
//     makes Bᵀ [r, N] contiguous: r·N elements, so a column of B is one 16-byte load).
//   dBᵀ = Sᵀ · dy: the reduction runs over dy's rows, so dy's tile goes through a per-warp shared-memory buffer to be
//     read transposed; m16n8k8 in tf32, because S is fp32 (|S| may pass 65504 where dS does not), rounded to the
//     nearest tf32 as the Triton kernels round their fp32 operands; dy's 16-bit values are exact in tf32.
// A block of kBwdMmaWarps warps owns bwd_mma_strips(kRankTiles) strips of 16 rows per warp for all of its columns,
// which it walks in pieces of kBwdMmaCols: each warp keeps its rows' dS in registers over every piece, and the
// warps' dB of a piece are summed in a fixed warp order in shared memory; each partial element is written once.
// On the H200 (2026-11-30, bf16, K = N = 4096) it took 0.52x the two cuBLAS GEMMs' time at M = 256, r = 16, 0.63x at
// M = 8192, r = 8 and 1.16x at M = 8192, r = 16 (rows "CUDA backward" of `lora-kernels bench --sections train`).
constexpr int kBwdMmaWarps = 4;
constexpr int kBwdMmaMaxRank = 32;
constexpr int kBwdMmaChunks = 2;                          // 32-column chunks per piece (mma_k32 each)
constexpr int kBwdMmaCols = 32 * kBwdMmaChunks;           // columns per piece
constexpr int kBwdMmaPitch = kBwdMmaCols + 8;             // transposed reads of a warp hit 16 distinct banks
constexpr int kBwdMmaColTiles = kBwdMmaCols / 8;          // n8 tiles of dBᵀ per piece

// 16-row strips per warp: dS of kStrips strips (kStrips * 2 * kRankTiles * 4 floats) stays in registers.
constexpr int bwd_mma_strips(int rank_tiles) { return 4 / rank_tiles; }
constexpr int64_t bwd_mma_rows_per_block(int rank_tiles) {
  return int64_t(kBwdMmaWarps) * 16 * bwd_mma_strips(rank_tiles);
}

struct BwdDyMmaGrid {
  int64_t row_blocks, col_blocks, cols_per_block;
};

// Rows per block are fixed by the rank (dS registers); columns are split so the grid covers kBlocksPerSm blocks per
// SM, in whole pieces, within the partial budget of lora_bwd_dy_kernel (half of dy's elements, at least 1 Mi floats).
BwdDyMmaGrid bwd_dy_mma_grid(int64_t M, int64_t N, int64_t r, int device) {
  const int rank_tiles = r <= 16 ? 1 : 2;
  const int64_t row_blocks = ceil_div(M, bwd_mma_rows_per_block(rank_tiles));
  const int64_t pieces = ceil_div(N, kBwdMmaCols);
  int64_t col_blocks = std::clamp<int64_t>(ceil_div(int64_t(kBlocksPerSm) * sm_count(device), row_blocks), 1, pieces);
  const int64_t budget = std::max<int64_t>(M * N / 2, int64_t(1) << 20);
  while (col_blocks > 1 && r * (row_blocks * N + col_blocks * M) > budget) col_blocks = (col_blocks + 1) / 2;
  const int64_t cols_per_block = ceil_div(pieces, col_blocks) * kBwdMmaCols;
  return {row_blocks, ceil_div(N, cols_per_block), cols_per_block};
}

// grid (col_blocks, row_blocks), kBwdMmaWarps warps. ds_partials[blockIdx.x, m, j] = scaling · Σ_{n in the block's
// columns} dy[m, n] · B[n, j]; db_partials[blockIdx.y, n, j] = scaling · Σ_{m in the block's rows} dy[m, n] · S[m, j].
// Needs dy's rows unit-stride, 16-byte aligned and N a multiple of 8 (every 16-byte load whole); bt = Bᵀ [r, N]
// contiguous. kRankTiles = ceil(r / 16): the rank rows of dBᵀ's MMA tiles; rank columns of dS in n8 tiles.
template <typename T, int kRankTiles>
__global__ void __launch_bounds__(kBwdMmaWarps* 32)
    lora_bwd_dy_mma_kernel(const T* __restrict__ dy, int64_t ld_dy, const float* __restrict__ s, int64_t s_sm,
                           int64_t s_sr, const T* __restrict__ bt, int64_t M, int64_t N, int r, float scaling,
                           int64_t cols_per_block, float* __restrict__ db_partials, float* __restrict__ ds_partials) {
  constexpr int kStrips = bwd_mma_strips(kRankTiles);
  constexpr int kRankN8 = 2 * kRankTiles;  // n8 tiles of dS's rank columns
  __shared__ __align__(16) T transposed[kBwdMmaWarps][16][kBwdMmaPitch];
  __shared__ float db_sum[16 * kRankTiles][kBwdMmaCols];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane / 4, t = lane % 4;
  const int64_t m_block = int64_t(blockIdx.y) * bwd_mma_rows_per_block(kRankTiles);
  const int64_t n_begin = int64_t(blockIdx.x) * cols_per_block;
  const int64_t n_end = n_begin + cols_per_block < N ? n_begin + cols_per_block : N;

  // The warp's strips: rows m_block + 16 * (warp + kBwdMmaWarps * i). S's fragments of dBᵀ's A operand (Sᵀ: rank
  // rows g and g + 8 of each rank tile, S's rows t and t + 4 of each k-step of 8) are loaded once, as tf32.
  int64_t strip_row[kStrips];
  uint32_t s_frag[kStrips][kRankTiles][2][4];
#pragma unroll
  for (int i = 0; i < kStrips; ++i) {
    strip_row[i] = m_block + 16 * (warp + int64_t(kBwdMmaWarps) * i);
#pragma unroll
    for (int rt = 0; rt < kRankTiles; ++rt) {
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t m = strip_row[i] + 8 * ks + t + 4 * (e / 2);
          const int j = 16 * rt + group + 8 * (e % 2);
          s_frag[i][rt][ks][e] = m < M && j < r ? to_tf32(s[m * s_sm + j * s_sr]) : 0u;
        }
      }
    }
  }

  float ds_acc[kStrips][kRankN8][4] = {};
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kBwdMmaCols) {
    // B's columns j = 8 * jt + g of this piece (Bᵀ's rows; past r: zeros, not loaded)
    uint4 b_frag[kBwdMmaChunks][kRankN8];
#pragma unroll
    for (int c = 0; c < kBwdMmaChunks; ++c) {
      const int64_t n = n0 + 32 * c + 8 * t;  // N is a multiple of 8: a 16-byte load is wholly inside or outside
#pragma unroll
      for (int jt = 0; jt < kRankN8; ++jt) {
        const int j = 8 * jt + group;
        b_frag[c][jt] = load16_or_zero(bt + (j < r && n < n_end ? j * N + n : 0), j < r && n < n_end, false);
      }
    }
    // The piece's dy for all of the warp's strips is loaded before any of it is used: kStrips x 4 16-byte loads in
    // flight per lane instead of 4 (ptxas interleaved one strip's loads with the previous strip's MMAs otherwise).
    uint4 lo[kStrips][kBwdMmaChunks], hi[kStrips][kBwdMmaChunks];
#pragma unroll
    for (int i = 0; i < kStrips; ++i) {
#pragma unroll
      for (int c = 0; c < kBwdMmaChunks; ++c) {
        const int64_t n = n0 + 32 * c + 8 * t, m_lo = strip_row[i] + group, m_hi = m_lo + 8;
        const bool in_n = n < n_end;
        lo[i][c] = load16_or_zero(dy + (in_n && m_lo < M ? m_lo * ld_dy + n : 0), in_n && m_lo < M, true);
        hi[i][c] = load16_or_zero(dy + (in_n && m_hi < M ? m_hi * ld_dy + n : 0), in_n && m_hi < M, true);
      }
    }
    float db_acc[kRankTiles][kBwdMmaColTiles][4] = {};
#pragma unroll
    for (int i = 0; i < kStrips; ++i) {
#pragma unroll
      for (int c = 0; c < kBwdMmaChunks; ++c) {
#pragma unroll
        for (int jt = 0; jt < kRankN8; ++jt) mma_k32<T>(ds_acc[i][jt], lo[i][c], hi[i][c], b_frag[c][jt]);
        *reinterpret_cast<uint4*>(&transposed[warp][group][32 * c + 8 * t]) = lo[i][c];
        *reinterpret_cast<uint4*>(&transposed[warp][group + 8][32 * c + 8 * t]) = hi[i][c];
      }
      __syncwarp();
      // dBᵀ's B operand: column g of each n8 tile (the piece's column 8 * ct + g) at the strip's rows t and t + 4 of
      // each k-step.
#pragma unroll
      for (int ct = 0; ct < kBwdMmaColTiles; ++ct) {
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
          const uint32_t b0 = __float_as_uint(static_cast<float>(transposed[warp][8 * ks + t][8 * ct + group]));
          const uint32_t b1 = __float_as_uint(static_cast<float>(transposed[warp][8 * ks + t + 4][8 * ct + group]));
#pragma unroll
          for (int rt = 0; rt < kRankTiles; ++rt) {
            const uint32_t(&a)[4] = s_frag[i][rt][ks];
            mma_m16n8k8_tf32(db_acc[rt][ct], a[0], a[1], a[2], a[3], b0, b1);
          }
        }
      }
      __syncwarp();  // every lane's reads are done before the next strip overwrites the buffer
    }
    // The piece's dBᵀ: the warps' sums added in warp order (deterministic), then written as [n, j] partials.
    // db_acc[rt][ct][e] is rank row 16 * rt + g + 8 * (e / 2), column 8 * ct + 2t + e % 2 of the piece.
    for (int w = 0; w < kBwdMmaWarps; ++w) {
      if (warp == w) {
#pragma unroll
        for (int rt = 0; rt < kRankTiles; ++rt) {
#pragma unroll
          for (int ct = 0; ct < kBwdMmaColTiles; ++ct) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              float& dst = db_sum[16 * rt + group + 8 * (e / 2)][8 * ct + 2 * t + e % 2];
              dst = w == 0 ? db_acc[rt][ct][e] : dst + db_acc[rt][ct][e];
            }
          }
        }
      }
      __syncthreads();
    }
    float* db_out = db_partials + int64_t(blockIdx.y) * N * r;
    for (int e = threadIdx.x; e < kBwdMmaCols * 16 * kRankTiles; e += kBwdMmaWarps * 32) {
      const int j = e % (16 * kRankTiles), col = e / (16 * kRankTiles);
      if (j < r && n0 + col < n_end) {
        db_out[(n0 + col) * r + j] = scaling * db_sum[j][col];
      }
    }
    __syncthreads();  // db_sum is read before the next piece's warp 0 overwrites it
  }

  // ds_acc[i][jt][e] is row strip_row[i] + g + 8 * (e / 2), rank column 8 * jt + 2t + e % 2.
  float* ds_out = ds_partials + int64_t(blockIdx.x) * M * r;
#pragma unroll
  for (int i = 0; i < kStrips; ++i) {
#pragma unroll
    for (int jt = 0; jt < kRankN8; ++jt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t m = strip_row[i] + group + 8 * (e / 2);
        const int j = 8 * jt + 2 * t + e % 2;
        if (m < M && j < r) {
          ds_out[m * r + j] = scaling * ds_acc[i][jt][e];
        }
      }
    }
  }
}

// (dB, dS) from the kernels' block partials [row_blocks, N, r] and [col_blocks, M, r]: fixed-order sums,
// deterministic, unlike fp32 atomics.
std::tuple<at::Tensor, at::Tensor> summed_partials(const at::Tensor& db_partials, const at::Tensor& ds_partials) {
  return {db_partials.size(0) == 1 ? db_partials.select(0, 0) : db_partials.sum(0),
          ds_partials.size(0) == 1 ? ds_partials.select(0, 0) : ds_partials.sum(0)};
}

// Whether lora_bwd_dy_mma_kernel takes dy: fp16/bf16 up to kBwdMmaMaxRank, dy's rows whole 16-byte loads (unit
// stride, 16-byte aligned, N a multiple of 8), and the image that runs has the tensor-core code.
bool bwd_dy_mma_applies(const at::Tensor& dy, int64_t r) {
  const bool half_type = dy.scalar_type() == at::kHalf || dy.scalar_type() == at::kBFloat16;
  return half_type && r <= kBwdMmaMaxRank && dy.stride(1) == 1 && dy.stride(0) % 8 == 0 && dy.size(1) % 8 == 0 &&
         aligned16(dy.data_ptr()) &&
         tensor_core_code_runs(reinterpret_cast<const void*>(lora_bwd_dy_mma_kernel<c10::Half, 1>), dy.get_device());
}

// lora_bwd_dy_mma_kernel on `grid` (the caller checked bwd_dy_mma_applies), its partials summed.
template <typename T>
std::tuple<at::Tensor, at::Tensor> bwd_dy_on_tensor_cores(const at::Tensor& dy, const at::Tensor& s,
                                                          const at::Tensor& lora_b, double scaling,
                                                          const BwdDyMmaGrid& grid) {
  const int64_t M = dy.size(0), N = dy.size(1), r = lora_b.size(1);
  // [r, N]: a column of B is one 16-byte load. contiguous() returns an already contiguous view as it is, storage
  // offset included (lora_b the .t() of a view into a buffer), and a misaligned 16-byte load faults.
  at::Tensor bt = lora_b.t().contiguous();
  if (!aligned16(bt.data_ptr())) bt = bt.clone();
  const auto fp32 = dy.options().dtype(at::kFloat);
  at::Tensor db_partials = at::empty({grid.row_blocks, N, r}, fp32);
  at::Tensor ds_partials = at::empty({grid.col_blocks, M, r}, fp32);
  auto kernel = r <= 16 ? lora_bwd_dy_mma_kernel<T, 1> : lora_bwd_dy_mma_kernel<T, 2>;
  kernel<<<dim3(grid.col_blocks, grid.row_blocks), kBwdMmaWarps * 32, 0,
           c10::cuda::getCurrentCUDAStream(dy.get_device())>>>(
      dy.data_ptr<T>(), dy.stride(0), s.data_ptr<float>(), s.stride(0), s.stride(1), bt.data_ptr<T>(), M, N,
      static_cast<int>(r), static_cast<float>(scaling), grid.cols_per_block, db_partials.data_ptr<float>(),
      ds_partials.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return summed_partials(db_partials, ds_partials);
}

// lora_bwd_dy_kernel (fp32/fp16/bf16, r <= kBwdMaxRank, any strides), its partials summed.
std::tuple<at::Tensor, at::Tensor> bwd_dy_on_cuda_cores(const at::Tensor& dy, const at::Tensor& s,
                                                        const at::Tensor& lora_b, double scaling) {
  const int64_t M = dy.size(0), N = dy.size(1), r = lora_b.size(1);
  const BwdDyGrid grid = bwd_dy_grid(M, N, r, dy.get_device());
  const auto fp32 = dy.options().dtype(at::kFloat);
  at::Tensor db_partials = at::empty({grid.row_blocks, N, r}, fp32);
  at::Tensor ds_partials = at::empty({grid.col_blocks, M, r}, fp32);
  const size_t shared_bytes = size_t(grid.tile * (grid.tile + 1) + 2 * grid.tile * r) * sizeof(float);  // <= 33 KiB
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dy.get_device());
  LK_DISPATCH_FLOAT_HALF_BF16(dy.scalar_type(), "lora_bwd_dy_cuda", [&] {
    lora_bwd_dy_kernel<scalar_t><<<dim3(grid.col_blocks, grid.row_blocks), kBwdThreads, shared_bytes, stream>>>(
        dy.data_ptr<scalar_t>(), dy.stride(0), dy.stride(1), s.data_ptr<float>(), s.stride(0), s.stride(1),
        lora_b.data_ptr<scalar_t>(), lora_b.stride(0), lora_b.stride(1), M, N, static_cast<int>(r),
        static_cast<float>(scaling), grid.tile, grid.rows_per_block, grid.cols_per_block,
        db_partials.data_ptr<float>(), ds_partials.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return summed_partials(db_partials, ds_partials);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_bwd_dy_cuda_launch(const at::Tensor& dy, const at::Tensor& s,
                                                           const at::Tensor& lora_b, double scaling) {
  const c10::cuda::CUDAGuard guard(dy.device());
  const int64_t M = dy.size(0), N = dy.size(1), r = lora_b.size(1);
  if (M == 0 || N == 0 || r == 0) {
    const auto acc = dy.scalar_type() == at::kDouble ? dy.options() : dy.options().dtype(at::kFloat);
    return {at::zeros({N, r}, acc), at::zeros({M, r}, acc)};
  }
  if (r > kBwdMaxRank || dy.scalar_type() == at::kDouble) {
    // Two cuBLAS GEMMs read dy twice but run on tensor cores; at large r that beats 2r fp32 FMAs per element.
    // float64 stays float64 throughout (mm_float), so float64 gradients keep float64 precision. dB is formed from
    // the float32 S, as the kernels below and the CPU op form it: S rounded to fp16 was inf past 65504, and dB NaN
    // or inf where they are finite. A GEMM takes one input dtype, so dy is widened instead; functional.py sends
    // this op M·r <= 4096 (CUDA_BWD_DY_KERNEL_MAX_WORK): at most 63 rows of dy here.
    const at::Tensor dy_like_s = dy.scalar_type() == s.scalar_type() ? dy : dy.to(s.scalar_type());
    at::Tensor d_lora_b = at::mm(dy_like_s.t(), s).mul_(scaling);
    at::Tensor ds = mm_float(dy, lora_b).mul_(scaling);
    return {d_lora_b, ds};
  }
  if (bwd_dy_mma_applies(dy, r)) {
    const BwdDyMmaGrid grid = bwd_dy_mma_grid(M, N, r, dy.get_device());
    if (grid.row_blocks <= kMaxGridYZ) {  // past 16 Mi rows, the CUDA-core kernel below
      return dy.scalar_type() == at::kHalf ? bwd_dy_on_tensor_cores<c10::Half>(dy, s, lora_b, scaling, grid)
                                           : bwd_dy_on_tensor_cores<c10::BFloat16>(dy, s, lora_b, scaling, grid);
    }
  }
  return bwd_dy_on_cuda_cores(dy, s, lora_b, scaling);
}

}  // namespace lora_kernels
