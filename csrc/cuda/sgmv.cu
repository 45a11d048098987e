// CUDA implementations of the grouped ops sgmv_shrink and sgmv_expand (schemas in csrc/ops.cpp).
//
// One kernel (sgmv_kernel) serves both, and tensor-core ones 16-bit inputs (sgmv_shrink_mma_kernel,
// sgmv_expand_mma_kernel): a gathered "x · Wᵀ" per adapter slot,
//   shrink: out[tok, c]           = scalings[i] · Σ_{k<K}        x[tok, k] · A[i, c, k]   for c < ranks[i]
//   expand: out[tok, offset + c] +=               Σ_{k<ranks[i]} t[tok, k] · B[i, c, k]   for c < N
// over a fixed grid (K-splits x output column tiles, token tiles, slots): a block whose token tile starts past
// slot_counts[slot], or whose column tile starts past the slot's width, exits at once. The grid depends only on
// the shapes and the SM count, never on the metadata values, so there is no host sync and the launch can be
// captured in a CUDA graph. Metadata values are clamped (ranks to [0, R], slot ranges to [0, M), token ids outside
// [0, M) skipped) rather than checked, so bad metadata never reads out of bounds; A/B are never read past ranks[i].
//
// Split-K (shrink only): its output has only R columns, so one block per (column tile, token tile, slot) left most
// SMs idle at decode sizes (one block walking all of K = 4096 for 16 tokens on one adapter). Each block takes a
// K-range of k_per_split (a multiple of the 32-wide K tile) and writes its scaled partial into its own slice of
// zero-filled partials [splits, M, R]; the launcher sums them in a fixed order afterwards (no atomics: repeats are
// bit-identical). Elements no block writes (-1 tokens, columns past a slot's rank) stay exactly 0. The expand has
// one split: its K is the rank, and its N output columns give many column tiles (128 at N = 4096).
//
// Argument checks (and the CUDA grid limits) run before the launchers below are called, in the host-compiled
// csrc/cuda/register_cuda.cpp, which also holds the registrations: nothing here throws for user input.
//
// Accumulation is fp32, or fp64 when any operand (x / lora_a, lora_b, out) is float64, like the CPU implementation.
// sgmv_kernel is simple and correct: shared-memory tiles and fp32 FMAs, operand dtypes read at run time (one kernel
// for every dtype combination instead of a template per pair: compile time). The tensor-core shrink (fp16/bf16 x
// and lora_a of one dtype, 16-byte aligned rows, sm_80+) and expand (16-bit lora_b, tf32 MMAs) are below it, and
// below them the decode kernels (bgmv_*: one token per block, for batches of few tokens per slot).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "grid_sizing.h"
#include "launchers.h"
#include "tensor_core.h"

namespace lora_kernels {
namespace {

constexpr int kTileTokens = static_cast<int>(kSgmvTileTokens);
constexpr int kTileCols = 32;
constexpr int kTileK = 32;
constexpr int kThreads = 256;  // 16 x 16 threads, each a 2 x 2 micro-tile of the 32 x 32 output tile
constexpr int64_t kMaxShrinkSplits = 32;  // bounds the partials the fixed-order sum reads per output element
// Floor of the shrink partials' budget, in elements: 4 MB in fp32, which stays in L2 on sm_80/sm_90, so small
// shapes are not starved of blocks (as lora_bwd_dy's partials; a starting point, not measured on a GPU yet).
constexpr int64_t kMinShrinkPartials = int64_t(1) << 20;

enum DtypeCode : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// The dtypes were validated by register_cuda.cpp (float32/float16/bfloat16/float64): no throwing default here.
int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: return kF32;
  }
}

// Loads and stores in the accumulation type Acc (float, or double when an operand is float64).
template <typename Acc>
__device__ __forceinline__ Acc load_as(const void* p, int64_t i, int dtype) {
  switch (dtype) {
    case kF16: return static_cast<Acc>(static_cast<float>(static_cast<const c10::Half*>(p)[i]));
    case kBF16: return static_cast<Acc>(static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]));
    case kF64: return static_cast<Acc>(static_cast<const double*>(p)[i]);
    default: return static_cast<Acc>(static_cast<const float*>(p)[i]);
  }
}

template <typename Acc>
__device__ __forceinline__ void store_as(void* p, int64_t i, int dtype, Acc v) {
  switch (dtype) {
    case kF16: static_cast<c10::Half*>(p)[i] = c10::Half(static_cast<float>(v)); break;
    case kBF16: static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(static_cast<float>(v)); break;
    case kF64: static_cast<double*>(p)[i] = static_cast<double>(v); break;
    default: static_cast<float*>(p)[i] = static_cast<float>(v);
  }
}

// out[i, i + 16 bytes) += v, one 16-byte load and store: each element rounded once, as store_as(load_as + v) does.
// out + i must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ void add_16_bytes_as(void* out, int64_t i, const float* v) {
  uint4* p = reinterpret_cast<uint4*>(static_cast<T*>(out) + i);
  uint4 raw = *p;
  T* elems = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int e = 0; e < int(16 / sizeof(T)); ++e) {
    elems[e] = T(static_cast<float>(elems[e]) + v[e]);
  }
  *p = raw;
}

__device__ __forceinline__ float mul_add(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double mul_add(double a, double b, double c) { return fma(a, b, c); }

struct SgmvArgs {
  const void* x;  // shrink: x [M, K]; expand: t [M, R] fp32
  int x_dtype;
  int64_t x_stride_t, x_stride_k;
  const void* w;  // shrink: lora_a [L, R, K] (c = rank row); expand: lora_b [L, N, R] (c = output column)
  int w_dtype;
  int64_t w_stride_slot, w_stride_c, w_stride_k;
  void* out;  // shrink: partials [splits, M, R] fp32, fp64 when Acc is double (zero-filled); expand: [M, N_total]
  int out_dtype;
  int64_t out_stride_split, out_stride_t, out_stride_c, col_offset;
  const int32_t* sorted_token_ids;
  const int32_t* slot_starts;
  const int32_t* slot_counts;
  const int32_t* ranks;
  const float* scalings;  // shrink only
  int64_t num_tokens, max_rank, num_slots;
  int64_t k_full;     // shrink: K (unused by the expand, whose K is the slot's rank)
  int64_t cols_full;  // expand: N (unused by the shrink, whose columns are the slot's rank)
  int64_t col_tiles;    // grid.x = splits * col_tiles, split-major
  int64_t k_per_split;  // shrink: a multiple of kTileK
};

// The slot's range in sorted_token_ids, clamped into [0, M) (bad metadata never reads out of bounds).
struct SlotRange {
  int64_t start, count;
};

__device__ __forceinline__ SlotRange slot_range(const SgmvArgs& args, int slot) {
  int64_t start = args.slot_starts[slot], count = args.slot_counts[slot];
  start = start < 0 ? 0 : (start > args.num_tokens ? args.num_tokens : start);
  count = count < 0 ? 0 : (count > args.num_tokens - start ? args.num_tokens - start : count);
  return {start, count};
}

// The slot's rank, clamped into [0, R].
__device__ __forceinline__ int64_t slot_rank(const SgmvArgs& args, int slot) {
  const int64_t rank = args.ranks[slot];
  return rank < 0 ? 0 : (rank > args.max_rank ? args.max_rank : rank);
}

// The token ids of a warp's MMA rows `group` and `group + 8` (tensor_core.h), whose first row is the slot's token
// t0: -1 where there is none (past the slot's count, or an id outside [0, M), which is skipped).
__device__ __forceinline__ void mma_row_tokens(const SgmvArgs& args, SlotRange slot, int64_t t0, int group,
                                               int64_t (&tokens)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t i = t0 + group + 8 * h;
    const int64_t token = i < slot.count ? int64_t(args.sorted_token_ids[slot.start + i]) : -1;
    tokens[h] = token >= 0 && token < args.num_tokens ? token : -1;
  }
}

template <bool kShrink, typename Acc>
__global__ void __launch_bounds__(kThreads) sgmv_kernel(const SgmvArgs args) {
  const int slot = blockIdx.z;
  const auto [start, count] = slot_range(args, slot);
  const int64_t t0 = int64_t(blockIdx.y) * kTileTokens;
  if (t0 >= count) {
    return;  // fixed grid: this token tile is past the slot's tokens
  }
  const int64_t rank = slot_rank(args, slot);
  const int64_t cols = kShrink ? rank : args.cols_full;
  const int64_t kdim = kShrink ? args.k_full : rank;
  // grid.x = splits * col_tiles, split-major. The expand's one split is fixed at compile time: deriving it from the
  // grid too took the expand from 31 to 48 registers on sm_80.
  const int64_t split = kShrink ? blockIdx.x / args.col_tiles : 0;
  const int64_t c0 = (kShrink ? blockIdx.x % args.col_tiles : blockIdx.x) * kTileCols;
  const int64_t k_begin = split * args.k_per_split;
  const int64_t k_end = (kShrink && k_begin + args.k_per_split < kdim) ? k_begin + args.k_per_split : kdim;
  if (c0 >= cols || k_begin >= k_end) {
    return;  // nothing to write: shrink's zero columns are already zero, expand adds nothing
  }

  __shared__ int64_t tokens[kTileTokens];
  __shared__ Acc x_tile[kTileTokens][kTileK + 1];  // +1: the column reads below hit distinct banks
  __shared__ Acc w_tile[kTileCols][kTileK + 1];
  const int tid = threadIdx.x;
  if (tid < kTileTokens) {
    int64_t token = -1;
    if (t0 + tid < count) {
      token = args.sorted_token_ids[start + t0 + tid];
      if (token < 0 || token >= args.num_tokens) token = -1;
    }
    tokens[tid] = token;
  }
  __syncthreads();

  const int ty = tid / 16, tx = tid % 16;
  Acc acc[2][2] = {{Acc(0), Acc(0)}, {Acc(0), Acc(0)}};
  const int64_t w_slot = int64_t(slot) * args.w_stride_slot;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
    for (int e = tid; e < kTileTokens * kTileK; e += kThreads) {
      const int row = e / kTileK, kk = e % kTileK;
      const int64_t token = tokens[row], k = k0 + kk;
      x_tile[row][kk] = (token >= 0 && k < k_end)
                            ? load_as<Acc>(args.x, token * args.x_stride_t + k * args.x_stride_k, args.x_dtype)
                            : Acc(0);
    }
    for (int e = tid; e < kTileCols * kTileK; e += kThreads) {
      const int c = e / kTileK, kk = e % kTileK;
      const int64_t col = c0 + c, k = k0 + kk;
      w_tile[c][kk] = (col < cols && k < k_end)
                          ? load_as<Acc>(args.w, w_slot + col * args.w_stride_c + k * args.w_stride_k, args.w_dtype)
                          : Acc(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTileK; ++kk) {
      const Acc a0 = x_tile[ty][kk], a1 = x_tile[ty + 16][kk];
      const Acc b0 = w_tile[tx][kk], b1 = w_tile[tx + 16][kk];
      acc[0][0] = mul_add(a0, b0, acc[0][0]);
      acc[0][1] = mul_add(a0, b1, acc[0][1]);
      acc[1][0] = mul_add(a1, b0, acc[1][0]);
      acc[1][1] = mul_add(a1, b1, acc[1][1]);
    }
    __syncthreads();
  }

  const Acc scale = kShrink ? static_cast<Acc>(args.scalings[slot]) : Acc(1);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t token = tokens[ty + 16 * i];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t col = c0 + tx + 16 * j;
      if (token >= 0 && col < cols) {
        const int64_t idx =
            split * args.out_stride_split + token * args.out_stride_t + (args.col_offset + col) * args.out_stride_c;
        if (kShrink) {
          store_as<Acc>(args.out, idx, args.out_dtype, scale * acc[i][j]);
        } else {
          // LoRABatch's sorted_token_ids is a permutation, so each element has one writer. Metadata with a repeated
          // token races here: token ids are not value-checked on CUDA (that would need a host sync).
          store_as<Acc>(args.out, idx, args.out_dtype, load_as<Acc>(args.out, idx, args.out_dtype) + acc[i][j]);
        }
      }
    }
  }
}

// ---- shrink on tensor cores (fp16/bf16 x and lora_a of one dtype, 16-byte aligned rows, sm_80+) ---------------
// sgmv_kernel<true> loads x and A one element at a time through a run-time dtype switch, with two barriers per
// 32-wide K tile: the H200 profile had it at 263 µs per call for 64 tokens on 16 adapters (the expand 20 µs), and
// the sweep 774 µs for the whole op at 4096 tokens on one adapter, over a base GEMM of ~180 µs. Here each
// warp multiplies 16 of the block's 32 tokens by its 32 rank columns on tensor cores (tensor_core.h: the tokens are
// the MMA's rows, A's rank rows its columns), with 16-byte loads, kShrinkUnroll K chunks loaded before their MMAs.
// The same grid and partials as sgmv_kernel<true>, the K-split counted for its 2-warp blocks (shrink_k_split);
// rank rows past ranks[slot] are never read.
// The MMA shrink's and expand's blocks (sgmv_expand_mma_kernel below takes the same shape):
constexpr int kSgmvMmaWarps = kTileTokens / 16;    // 16 tokens (one MMA tile of rows) per warp
constexpr int kSgmvMmaColTiles = kTileCols / 8;    // the block's 32 rank (or output) columns as n8 MMA tiles
constexpr int kShrinkUnroll = 2;                   // 32-wide K chunks per step: 2 x (2 + 4) 16-byte loads in flight
static_assert(kTileK == 32, "one K tile is one mma_k32");

template <typename T>
__global__ void __launch_bounds__(kSgmvMmaWarps * 32, 1) sgmv_shrink_mma_kernel(const SgmvArgs args) {
  const int slot = blockIdx.z;
  const SlotRange range = slot_range(args, slot);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane / 4, t = lane % 4;
  const int64_t t0 = int64_t(blockIdx.y) * kTileTokens + 16 * warp;  // this warp's first token of the slot
  if (t0 >= range.count) {
    return;  // fixed grid: no token of the slot here (no barrier below: each warp is on its own)
  }
  const int64_t rank = slot_rank(args, slot);
  const int64_t split = blockIdx.x / args.col_tiles;
  const int64_t c0 = (blockIdx.x % args.col_tiles) * kTileCols;
  const int64_t k_begin = split * args.k_per_split;
  const int64_t k_end = k_begin + args.k_per_split < args.k_full ? k_begin + args.k_per_split : args.k_full;
  if (c0 >= rank || k_begin >= k_end) {
    return;  // columns past the rank stay zero in the partials
  }
  int64_t tokens[2];  // -1: read as zeros, not stored
  mma_row_tokens(args, range, t0, group, tokens);
  const T* x = static_cast<const T*>(args.x);
  const T* x_lo = x + (tokens[0] >= 0 ? tokens[0] : 0) * args.x_stride_t + 8 * t;
  const T* x_hi = x + (tokens[1] >= 0 ? tokens[1] : 0) * args.x_stride_t + 8 * t;
  const T* a_rows[kSgmvMmaColTiles];  // A's rank rows past the slot's rank: never read
  bool a_ok[kSgmvMmaColTiles];
  mma_b_rows(static_cast<const T*>(args.w) + int64_t(slot) * args.w_stride_slot, c0, rank, args.w_stride_c, group, t,
             a_rows, a_ok);

  float acc[kSgmvMmaColTiles][4] = {};
  for (int64_t k0 = k_begin; k0 < k_end; k0 += int64_t(kShrinkUnroll) * kTileK) {
    uint4 lo[kShrinkUnroll], hi[kShrinkUnroll], a[kShrinkUnroll][kSgmvMmaColTiles];
#pragma unroll
    for (int u = 0; u < kShrinkUnroll; ++u) {
      const int64_t k = k0 + u * kTileK;
      const bool in_k = k + 8 * t < k_end;  // K and the split bounds are multiples of 8: a load is wholly in or out
      lo[u] = load16_or_zero(x_lo + k, in_k && tokens[0] >= 0, false);
      hi[u] = load16_or_zero(x_hi + k, in_k && tokens[1] >= 0, false);
#pragma unroll
      for (int tile = 0; tile < kSgmvMmaColTiles; ++tile) {
        a[u][tile] = load16_or_zero(a_rows[tile] + k, in_k && a_ok[tile], false);
      }
    }
#pragma unroll
    for (int u = 0; u < kShrinkUnroll; ++u) {
#pragma unroll
      for (int tile = 0; tile < kSgmvMmaColTiles; ++tile) mma_k32<T>(acc[tile], lo[u], hi[u], a[u][tile]);
    }
  }
  // acc[tile][i] is token row group + 8 * (i / 2), rank column 8 * tile + 2t + i % 2 (tensor_core.h)
  const float scale = args.scalings[slot];
  float* out = static_cast<float*>(args.out) + split * args.out_stride_split;
#pragma unroll
  for (int tile = 0; tile < kSgmvMmaColTiles; ++tile) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t token = tokens[i / 2], col = c0 + 8 * tile + 2 * t + i % 2;
      if (token >= 0 && col < rank) {
        out[token * args.out_stride_t + col * args.out_stride_c] = scale * acc[tile][i];
      }
    }
  }
}

// ---- expand on tensor cores (fp16/bf16 lora_b, sm_80+) -----------------------------------------------------------
// Each warp adds the products of 16 of the block's 32 tokens with kExpandCols output columns (tf32 m16n8k8 MMAs:
// the tokens are the MMA's rows, B's rows its columns, the rank its K). t is fp32 and rounded to the nearest tf32
// (as the Triton expand does for fp16 B), so an fp16 B does not round s·S to fp16 (it may pass 65504 where y does
// not); B's 16-bit values convert to tf32 exactly. Elements of t and B past the slot's rank are never read. A block
// covers kExpandCols columns (4 x 32) instead of sgmv_kernel's 32: a quarter of the blocks, each reusing its token
// ids and its rows of t (from L1) four times.
constexpr int kExpandCols = 4 * kTileCols;

// The accumulators go into out through shared memory when out's rows allow 16-byte accesses (unit column stride,
// 16-byte aligned rows and slice start): each lane then adds 16 consecutive columns of one token's row with 16-byte
// loads and stores. Added from the MMA fragments directly, each lane touched 2-byte elements two columns apart on 8
// rows per instruction, a quarter of each 32-byte sector: on the H200 this expand took 90 µs per call at 4096 tokens
// on 16 adapters (N = 4096, r = 16; out read and written once is ~15 µs at the copy rate), Triton's 37 µs.
constexpr int kStagedPitch = kTileCols + 4;  // floats per staged row: a lane's 16 columns start 16-byte aligned

template <typename T>
__global__ void __launch_bounds__(kSgmvMmaWarps * 32) sgmv_expand_mma_kernel(const SgmvArgs args) {
  __shared__ float staged[kSgmvMmaWarps][16][kStagedPitch];  // a warp's 16 tokens x 32 columns of one column tile
  const int slot = blockIdx.z;
  const SlotRange range = slot_range(args, slot);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane / 4, t = lane % 4;
  const int64_t t0 = int64_t(blockIdx.y) * kTileTokens + 16 * warp;
  if (t0 >= range.count) {
    return;
  }
  const int64_t rank = slot_rank(args, slot);
  const int64_t block_c0 = int64_t(blockIdx.x) * kExpandCols;
  if (rank == 0 || block_c0 >= args.cols_full) {
    return;  // adds nothing
  }
  int64_t tokens[2];
  mma_row_tokens(args, range, t0, group, tokens);
  // Staged epilogue: lane adds row `row` of the warp's 16 (its token row_token, -1: none), columns 16 * half + 0..15.
  // elements per 16 bytes (out is fp32, fp16 or bf16 here): a power of two, so `& (per16 - 1)` is the remainder of
  // the non-negative stride and offset (a 64-bit `%` by a run-time value compiled to a division routine whose
  // registers spilled on sm_80)
  const int per16 = args.out_dtype == kF32 ? 4 : 8;
  const bool staged_out = args.out_stride_c == 1 && (args.out_stride_t & (per16 - 1)) == 0 &&
                          (args.col_offset & (per16 - 1)) == 0 && reinterpret_cast<uintptr_t>(args.out) % 16 == 0;
  const int row = lane / 2, half = lane % 2;
  int64_t row_token = t0 + row < range.count ? int64_t(args.sorted_token_ids[range.start + t0 + row]) : -1;
  row_token = row_token >= 0 && row_token < args.num_tokens ? row_token : -1;
  const float* t_rows = static_cast<const float*>(args.x);
  const T* b = static_cast<const T*>(args.w) + int64_t(slot) * args.w_stride_slot;
  for (int64_t c0 = block_c0; c0 < block_c0 + kExpandCols && c0 < args.cols_full; c0 += kTileCols) {
    float acc[kSgmvMmaColTiles][4] = {};
    for (int64_t j0 = 0; j0 < rank; j0 += 8) {
      // k-slot t <- rank index j0 + 2t, slot t + 4 <- j0 + 2t + 1 (the same for t and B: see tensor_core.h)
      uint32_t a[2][2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t j = j0 + 2 * t + e;
          a[h][e] = tokens[h] >= 0 && j < rank
                        ? to_tf32(t_rows[tokens[h] * args.x_stride_t + j * args.x_stride_k]) : 0u;
        }
      }
#pragma unroll
      for (int tile = 0; tile < kSgmvMmaColTiles; ++tile) {
        const int64_t n = c0 + 8 * tile + group;
        uint32_t w[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t j = j0 + 2 * t + e;
          w[e] = n < args.cols_full && j < rank
                     ? __float_as_uint(static_cast<float>(b[n * args.w_stride_c + j * args.w_stride_k])) : 0u;
        }
        mma_m16n8k8_tf32(acc[tile], a[0][0], a[1][0], a[0][1], a[1][1], w[0], w[1]);
      }
    }
    // acc[tile][i] is token row group + 8 * (i / 2), column c0 + 8 * tile + 2t + i % 2: added into out in fp32,
    // rounded once (LoRABatch's sorted_token_ids is a permutation: one writer per element, as in sgmv_kernel)
    if (staged_out) {
#pragma unroll
      for (int tile = 0; tile < kSgmvMmaColTiles; ++tile) {
#pragma unroll
        for (int i = 0; i < 4; ++i) staged[warp][group + 8 * (i / 2)][8 * tile + 2 * t + i % 2] = acc[tile][i];
      }
      __syncwarp();
      if (row_token >= 0) {
        for (int chunk = 0; chunk < 16; chunk += per16) {
          const int64_t col = c0 + 16 * half + chunk;
          const float* v = &staged[warp][row][16 * half + chunk];
          const int64_t idx = row_token * args.out_stride_t + args.col_offset + col;
          if (col + per16 <= args.cols_full) {
            if (args.out_dtype == kBF16) {
              add_16_bytes_as<c10::BFloat16>(args.out, idx, v);
            } else if (args.out_dtype == kF16) {
              add_16_bytes_as<c10::Half>(args.out, idx, v);
            } else {
              add_16_bytes_as<float>(args.out, idx, v);
            }
          } else {  // the last columns, short of 16 bytes
            for (int e = 0; col + e < args.cols_full && e < per16; ++e) {
              const float sum = load_as<float>(args.out, idx + e, args.out_dtype) + v[e];
              store_as<float>(args.out, idx + e, args.out_dtype, sum);
            }
          }
        }
      }
      __syncwarp();  // the next column tile overwrites staged
      continue;
    }
#pragma unroll
    for (int tile = 0; tile < kSgmvMmaColTiles; ++tile) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t token = tokens[i / 2], col = c0 + 8 * tile + 2 * t + i % 2;
        if (token >= 0 && col < args.cols_full) {
          const int64_t idx = token * args.out_stride_t + (args.col_offset + col) * args.out_stride_c;
          store_as<float>(args.out, idx, args.out_dtype, load_as<float>(args.out, idx, args.out_dtype) + acc[tile][i]);
        }
      }
    }
  }
}

// ---- decode: one token per block (BGMV-like) ------------------------------------------------------------------
// With a token or two per slot (decode: each request its own adapter) the kernels above put one token in a 16-row
// MMA tile (or a 32-token shared-memory tile), so most of each tile's products are wasted and, worse for an op that
// is memory-bound there, each warp has few loads in flight. Here a block is one position of sorted_token_ids
// (grid.x = M): it finds its slot by scanning the slot ranges (decode_slot), so the metadata is the same as the
// other kernels'; a position no range holds (a -1 token's) exits. The launchers take this path from the shapes only,
// by the rule of the Triton kernels (choose_path in lora_kernels/triton/sgmv.py, the same two bounds, unmeasured
// starting points there too): at most kDecodeMaxTokens tokens, or at most kDecodeMaxTokensPerSlot per slot on
// average. fp16/bf16/fp32 rows of whole 16-byte loads, fp32 FMAs; other layouts and float64 take sgmv_kernel.
constexpr int64_t kDecodeMaxTokens = 64;
constexpr int64_t kDecodeMaxTokensPerSlot = 4;
constexpr int kDecodeThreads = 256;
constexpr int kDecodeWarps = kDecodeThreads / 32;
constexpr int kDecodeRows = 2;           // shrink: rank rows per warp step, all their loads issued before the FMAs
constexpr int kDecodeChunks = 4;         // shrink: 16-byte chunks of K per lane per split (x held in registers)
constexpr int kDecodeColsPerThread = 4;  // expand: output columns per thread, their loads of B issued together
constexpr int64_t kDecodeExpandCols = int64_t(kDecodeThreads) * kDecodeColsPerThread;

bool decode_path(int64_t num_tokens, int64_t num_slots) {
  return num_tokens <= kDecodeMaxTokens || num_tokens <= kDecodeMaxTokensPerSlot * num_slots;
}

// The slot whose range holds sorted position `pos`, or -1 (a -1 token's position). LoRABatch's ranges are disjoint;
// overlapping ones (bad metadata) give the highest such slot. Every thread of the block gets the answer.
__device__ __forceinline__ int decode_slot(const SgmvArgs& args, int64_t pos) {
  __shared__ int found;
  if (threadIdx.x == 0) {
    found = -1;
  }
  __syncthreads();
  for (int64_t slot = threadIdx.x; slot < args.num_slots; slot += blockDim.x) {
    const SlotRange range = slot_range(args, static_cast<int>(slot));
    if (pos >= range.start && pos < range.start + range.count) {
      atomicMax(&found, static_cast<int>(slot));
    }
  }
  __syncthreads();
  return found;
}

// This block's token (-1: none, a -1 token's position, or an id outside [0, M)), its slot and the slot's rank.
struct DecodeToken {
  int slot;
  int64_t token, rank;
};

__device__ __forceinline__ DecodeToken decode_token(const SgmvArgs& args) {
  const int slot = decode_slot(args, blockIdx.x);
  const int64_t token = slot >= 0 ? int64_t(args.sorted_token_ids[blockIdx.x]) : -1;
  if (token < 0 || token >= args.num_tokens) {
    return {0, -1, 0};
  }
  return {slot, token, slot_rank(args, slot)};
}

template <typename T>
__device__ __forceinline__ float dot16(const uint4& a, const uint4& b) {
  const T* u = reinterpret_cast<const T*>(&a);
  const T* v = reinterpret_cast<const T*>(&b);
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < int(16 / sizeof(T)); ++i) acc = fmaf(static_cast<float>(u[i]), static_cast<float>(v[i]), acc);
  return acc;
}

// Shrink: grid (M, splits). Each warp takes kDecodeRows rank rows at a time; its lanes stride the split's K range in
// 16-byte chunks (the token's x chunks loaded once, in registers), then a butterfly sum gives each row's dot product.
// Rows at or past the slot's rank are never read, and their partials stay zero.
template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) bgmv_shrink_kernel(const SgmvArgs args) {
  constexpr int kVec = 16 / sizeof(T);
  const auto [slot, token, rank] = decode_token(args);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t k_begin = int64_t(blockIdx.y) * args.k_per_split;
  const int64_t k_end = k_begin + args.k_per_split < args.k_full ? k_begin + args.k_per_split : args.k_full;
  if (token < 0 || int64_t(warp) * kDecodeRows >= rank || k_begin >= k_end) {
    return;  // no barrier below: each warp is on its own
  }
  const T* x_row = static_cast<const T*>(args.x) + token * args.x_stride_t;
  uint4 xv[kDecodeChunks];
#pragma unroll
  for (int i = 0; i < kDecodeChunks; ++i) {
    const int64_t k = k_begin + int64_t(lane + 32 * i) * kVec;  // K and k_per_split are multiples of kVec
    xv[i] = load16_or_zero(x_row + (k < k_end ? k : 0), k < k_end, false);
  }
  const T* a = static_cast<const T*>(args.w) + int64_t(slot) * args.w_stride_slot;
  const float scale = args.scalings[slot];
  float* out = static_cast<float*>(args.out) + int64_t(blockIdx.y) * args.out_stride_split + token * args.out_stride_t;
  for (int64_t c0 = int64_t(warp) * kDecodeRows; c0 < rank; c0 += int64_t(kDecodeWarps) * kDecodeRows) {
    uint4 av[kDecodeRows][kDecodeChunks];
#pragma unroll
    for (int r = 0; r < kDecodeRows; ++r) {
#pragma unroll
      for (int i = 0; i < kDecodeChunks; ++i) {
        const int64_t c = c0 + r, k = k_begin + int64_t(lane + 32 * i) * kVec;
        const bool ok = c < rank && k < k_end;
        av[r][i] = load16_or_zero(a + (ok ? c * args.w_stride_c + k : 0), ok, false);
      }
    }
    float acc[kDecodeRows];
#pragma unroll
    for (int r = 0; r < kDecodeRows; ++r) {
      acc[r] = 0.f;
#pragma unroll
      for (int i = 0; i < kDecodeChunks; ++i) acc[r] += dot16<T>(xv[i], av[r][i]);
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], offset);
    }
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < kDecodeRows; ++r) {
        if (c0 + r < rank) out[(c0 + r) * args.out_stride_c] = scale * acc[r];
      }
    }
  }
}

// Expand: grid (M, column blocks of kDecodeExpandCols). Each thread adds kDecodeColsPerThread output columns, a
// 16-byte load of B's row per column and rank chunk. A chunk that ends within R is loaded whole and its elements at or
// past the slot's rank skipped (not multiplied: they may hold NaN); one past R (R not a multiple of the vector
// width) element by element. t (fp32) is read only below the rank, by every thread at once (one broadcast load).
template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) bgmv_expand_kernel(const SgmvArgs args) {
  constexpr int kVec = 16 / sizeof(T);
  const auto [slot, token, rank] = decode_token(args);
  if (token < 0 || rank == 0) {
    return;  // adds nothing
  }
  const float* t_row = static_cast<const float*>(args.x) + token * args.x_stride_t;
  const T* b = static_cast<const T*>(args.w) + int64_t(slot) * args.w_stride_slot;
  const int64_t n0 = int64_t(blockIdx.y) * kDecodeExpandCols + threadIdx.x;
  float acc[kDecodeColsPerThread] = {};
  for (int64_t j0 = 0; j0 < rank; j0 += kVec) {
    float tv[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) tv[e] = j0 + e < rank ? t_row[(j0 + e) * args.x_stride_k] : 0.f;
    const bool whole = j0 + kVec <= args.max_rank;
    uint4 raw[kDecodeColsPerThread];
#pragma unroll
    for (int c = 0; c < kDecodeColsPerThread; ++c) {
      const int64_t n = n0 + int64_t(c) * kDecodeThreads;
      const bool ok = whole && n < args.cols_full;
      raw[c] = load16_or_zero(b + (ok ? n * args.w_stride_c + j0 : 0), ok, false);
    }
#pragma unroll
    for (int c = 0; c < kDecodeColsPerThread; ++c) {
      const int64_t n = n0 + int64_t(c) * kDecodeThreads;
      const T* elems = reinterpret_cast<const T*>(&raw[c]);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        if (j0 + e < rank && n < args.cols_full) {
          const float w = whole ? static_cast<float>(elems[e]) : static_cast<float>(b[n * args.w_stride_c + j0 + e]);
          acc[c] = fmaf(tv[e], w, acc[c]);
        }
      }
    }
  }
  // LoRABatch's sorted_token_ids is a permutation: one writer per element, as in sgmv_kernel.
#pragma unroll
  for (int c = 0; c < kDecodeColsPerThread; ++c) {
    const int64_t n = n0 + int64_t(c) * kDecodeThreads;
    if (n < args.cols_full) {
      const int64_t idx = token * args.out_stride_t + (args.col_offset + n) * args.out_stride_c;
      store_as<float>(args.out, idx, args.out_dtype, load_as<float>(args.out, idx, args.out_dtype) + acc[c]);
    }
  }
}

// The shrink's K-split, from the shapes and the SM count only (never the metadata values: no host sync). About
// kShrinkWarpsPerSm warps of ACTIVE blocks per SM (kBlocksPerSm blocks of sgmv_kernel's 8 warps; four times as many
// of sgmv_shrink_mma_kernel's 2-warp blocks): the nominal grid over-counts, since a slot's token tiles past its count
// exit at once; at most min(token_tiles * L, token_tiles + L) (slot, token tile) pairs hold tokens (every tile on
// every slot, or each full tile once plus one partial tile per slot). No split once they fill the GPU (prefill). Each
// split is at least one K tile. The partials are zero-filled, written and read once: capped at half of x's elements,
// but at least kMinShrinkPartials. grid.x = splits * col_tiles stays at most max(col_tiles, kShrinkWarpsPerSm * SMs).
// Counted in warps because each warp walks its split of K one step (a DRAM round trip) at a time: with the MMA
// kernel's blocks counted as 8-warp ones, 4096 tokens on 16 adapters (K = 4096, r = 16) got no split, 4 warps per
// SM, and the H200 measured 57 µs per call, ~64 steps of one round trip each (Triton's shrink: 19 µs).
constexpr int64_t kShrinkWarpsPerSm = int64_t(kBlocksPerSm) * (kThreads / 32);

KSplit shrink_k_split(int64_t num_tokens, int64_t num_slots, int64_t max_rank, int64_t k, int64_t block_warps,
                      int device) {
  const int64_t token_tiles = ceil_div(num_tokens, kTileTokens), col_tiles = ceil_div(max_rank, kTileCols);
  const int64_t active_pairs = std::min(token_tiles * num_slots, token_tiles + num_slots);
  const int64_t active_warps = std::max<int64_t>(active_pairs * col_tiles * block_warps, 1);
  const int64_t k_tiles = std::max<int64_t>(ceil_div(k, kTileK), 1);
  const int64_t partial_budget = std::max(num_tokens * k / 2, kMinShrinkPartials);
  const int64_t max_for_budget = partial_budget / std::max<int64_t>(num_tokens * max_rank, 1);
  int64_t splits = kShrinkWarpsPerSm * sm_count(device) / active_warps;  // 0 when the GPU is already full
  return split_k_in_tiles(k, kTileK, std::min({splits, kMaxShrinkSplits, k_tiles, max_for_budget}));
}

// The decode shrink's K-split, from the shapes and the SM count only: at least enough splits that a lane's
// kDecodeChunks chunks cover one (x stays in registers); more while the blocks (one per token and split) number
// under kBlocksPerSm per SM, up to kMaxShrinkSplits, each split at least one chunk per lane. `vec`: elements per
// 16 bytes.
KSplit decode_k_split(int64_t num_tokens, int64_t k, int64_t vec, int device) {
  const int64_t lane_span = 32 * vec;  // K elements that one chunk per lane covers
  const int64_t fewest = std::max<int64_t>(ceil_div(k, lane_span * kDecodeChunks), 1);
  const int64_t most = std::max<int64_t>(ceil_div(k, lane_span), 1);
  const int64_t fill = ceil_div(int64_t(kBlocksPerSm) * sm_count(device), std::max<int64_t>(num_tokens, 1));
  return split_k_in_tiles(k, lane_span, std::max(fewest, std::min({fill, most, kMaxShrinkSplits})));
}

// x and lora_a of one dtype (fp16, bf16 or fp32) in rows that 16-byte loads read whole: unit stride along K, K and
// the row strides multiples of the vector width, 16-byte aligned base pointers.
bool shrink_rows_of_16_bytes(const SgmvArgs& args) {
  if (args.x_dtype != args.w_dtype || args.x_dtype == kF64) {
    return false;
  }
  const int64_t vec = args.x_dtype == kF32 ? 4 : 8;
  return args.x_stride_k == 1 && args.w_stride_k == 1 && args.k_full % vec == 0 && args.x_stride_t % vec == 0 &&
         args.w_stride_c % vec == 0 && args.w_stride_slot % vec == 0 && aligned16(args.x) && aligned16(args.w);
}

// lora_b (fp16, bf16 or fp32) in rows of the rank that 16-byte loads read from a multiple of the vector width on.
bool expand_rows_of_16_bytes(const SgmvArgs& args) {
  if (args.w_dtype == kF64) {
    return false;
  }
  const int64_t vec = args.w_dtype == kF32 ? 4 : 8;
  return args.w_stride_k == 1 && args.w_stride_c % vec == 0 && args.w_stride_slot % vec == 0 && aligned16(args.w);
}

// ---- launches -----------------------------------------------------------------------------------------------
template <bool kShrink, typename T>
void launch_bgmv_as(const SgmvArgs& args, dim3 grid, cudaStream_t stream) {
  if constexpr (kShrink) {
    bgmv_shrink_kernel<T><<<grid, kDecodeThreads, 0, stream>>>(args);
  } else {
    bgmv_expand_kernel<T><<<grid, kDecodeThreads, 0, stream>>>(args);
  }
}

// grid (M, grid_y): grid_y the shrink's K-splits or the expand's column blocks. The kernel's T is x's dtype for the
// shrink, lora_b's for the expand (fp16, bf16 or fp32: the callers checked).
template <bool kShrink>
void launch_bgmv(const SgmvArgs& args, int64_t grid_y) {
  if (args.num_tokens == 0 || grid_y == 0) {
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(args.num_tokens, grid_y);
  const int dtype = kShrink ? args.x_dtype : args.w_dtype;
  if (dtype == kBF16) {
    launch_bgmv_as<kShrink, c10::BFloat16>(args, grid, stream);
  } else if (dtype == kF16) {
    launch_bgmv_as<kShrink, c10::Half>(args, grid, stream);
  } else {
    launch_bgmv_as<kShrink, float>(args, grid, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The grid's y and z dimensions (token tiles, slots) were checked against kMaxGridYZ by register_cuda.cpp.
// tensor_cores: sgmv_shrink_mma_kernel / sgmv_expand_mma_kernel, whose conditions the caller checked (and, for the
// expand, whose column tiles of kExpandCols it counted in args.col_tiles).
template <bool kShrink>
void launch_sgmv(const SgmvArgs& args, int64_t splits, bool tensor_cores) {
  const int64_t token_tiles = ceil_div(args.num_tokens, kTileTokens);
  if (token_tiles == 0 || args.col_tiles == 0 || args.num_slots == 0) {
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(splits * args.col_tiles, token_tiles, args.num_slots);
  if (kShrink && tensor_cores) {
    if (args.x_dtype == kBF16) {
      sgmv_shrink_mma_kernel<c10::BFloat16><<<grid, kSgmvMmaWarps * 32, 0, stream>>>(args);
    } else {
      sgmv_shrink_mma_kernel<c10::Half><<<grid, kSgmvMmaWarps * 32, 0, stream>>>(args);
    }
  } else if (!kShrink && tensor_cores) {
    if (args.w_dtype == kBF16) {
      sgmv_expand_mma_kernel<c10::BFloat16><<<grid, kSgmvMmaWarps * 32, 0, stream>>>(args);
    } else {
      sgmv_expand_mma_kernel<c10::Half><<<grid, kSgmvMmaWarps * 32, 0, stream>>>(args);
    }
  } else if (args.x_dtype == kF64 || args.w_dtype == kF64 || args.out_dtype == kF64) {
    sgmv_kernel<kShrink, double><<<grid, kThreads, 0, stream>>>(args);
  } else {
    sgmv_kernel<kShrink, float><<<grid, kThreads, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// What both ops' SgmvArgs share: x (the shrink's x, the expand's t [M, R]) and w (lora_a, lora_b) with their strides,
// and the metadata, whose vectors are contiguous (check_sgmv_metadata): read as plain arrays.
SgmvArgs operand_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sorted_token_ids,
                      const at::Tensor& slot_starts, const at::Tensor& slot_counts, const at::Tensor& ranks) {
  SgmvArgs args{};
  args.x = x.data_ptr();
  args.x_dtype = dtype_code(x);
  args.x_stride_t = x.stride(0);
  args.x_stride_k = x.stride(1);
  args.w = w.data_ptr();
  args.w_dtype = dtype_code(w);
  args.w_stride_slot = w.stride(0);
  args.w_stride_c = w.stride(1);
  args.w_stride_k = w.stride(2);
  args.sorted_token_ids = sorted_token_ids.data_ptr<int32_t>();
  args.slot_starts = slot_starts.data_ptr<int32_t>();
  args.slot_counts = slot_counts.data_ptr<int32_t>();
  args.ranks = ranks.data_ptr<int32_t>();
  args.num_tokens = x.size(0);
  args.num_slots = w.size(0);
  return args;
}

}  // namespace

// Launchers (csrc/cuda/launchers.h): the arguments were validated by csrc/cuda/register_cuda.cpp, which also holds
// the CUDA registrations; nothing here throws for user input.
at::Tensor sgmv_shrink_cuda_launch(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& sorted_token_ids,
                                   const at::Tensor& slot_starts, const at::Tensor& slot_counts,
                                   const at::Tensor& scalings, const at::Tensor& ranks) {
  const c10::cuda::CUDAGuard guard(x.device());
  SgmvArgs args = operand_args(x, lora_a, sorted_token_ids, slot_starts, slot_counts, ranks);
  const int64_t num_tokens = args.num_tokens, num_slots = args.num_slots, max_rank = lora_a.size(1);
  args.max_rank = max_rank;
  args.k_full = x.size(1);
  args.scalings = scalings.data_ptr<float>();  // contiguous (check_sgmv_shrink)
  args.col_tiles = ceil_div(max_rank, kTileCols);
  const bool rows_of_16_bytes = shrink_rows_of_16_bytes(args);
  const KSplit decode_split = decode_k_split(num_tokens, args.k_full, args.x_dtype == kF32 ? 4 : 8, x.get_device());
  // The decode grid's K-splits are its y dimension, at most kMaxGridYZ: past that (K above about 2^25 in float32,
  // 2^26 in 16 bits) the sgmv kernels, whose splits are the x dimension, take it.
  const bool decode =
      rows_of_16_bytes && decode_path(num_tokens, num_slots) && decode_split.splits <= kMaxGridYZ;
  // Tensor cores for x and lora_a of one 16-bit dtype whose rows are whole 16-byte loads, on sm_80+.
  const bool tensor_cores =
      !decode && rows_of_16_bytes && args.x_dtype != kF32 &&
      tensor_core_code_runs(reinterpret_cast<const void*>(sgmv_shrink_mma_kernel<c10::Half>), x.get_device());
  // The partials hold the accumulation type (launch_sgmv's choice), so a float64 sum is rounded to float32 once.
  const bool acc_fp64 = args.x_dtype == kF64 || args.w_dtype == kF64;
  const KSplit k_split =
      decode ? decode_split
             : shrink_k_split(num_tokens, num_slots, max_rank, args.k_full, tensor_cores ? kSgmvMmaWarps : kThreads / 32,
                              x.get_device());
  at::Tensor partials = at::zeros({k_split.splits, num_tokens, max_rank},
                                  x.options().dtype(acc_fp64 ? at::kDouble : at::kFloat));
  args.out = partials.data_ptr();
  args.out_dtype = acc_fp64 ? kF64 : kF32;
  args.out_stride_split = partials.stride(0);
  args.out_stride_t = partials.stride(1);
  args.out_stride_c = partials.stride(2);
  args.k_per_split = k_split.k_per_split;
  if (decode) {
    launch_bgmv<true>(args, k_split.splits);
  } else {
    launch_sgmv<true>(args, k_split.splits, tensor_cores);
  }
  // Fixed-order sum over the splits: deterministic, unlike atomics. float32 for every input dtype, as on CPU.
  const at::Tensor out = k_split.splits == 1 ? partials.select(0, 0) : partials.sum(0);
  return out.to(at::kFloat);
}

void sgmv_expand_cuda_launch(const at::Tensor& t, const at::Tensor& lora_b, const at::Tensor& sorted_token_ids,
                             const at::Tensor& slot_starts, const at::Tensor& slot_counts, const at::Tensor& ranks,
                             const at::Tensor& out, int64_t slice_offset) {
  const c10::cuda::CUDAGuard guard(t.device());
  SgmvArgs args = operand_args(t, lora_b, sorted_token_ids, slot_starts, slot_counts, ranks);
  args.out = out.data_ptr();
  args.out_dtype = dtype_code(out);
  args.out_stride_t = out.stride(0);
  args.out_stride_c = out.stride(1);
  args.col_offset = slice_offset;
  args.max_rank = lora_b.size(2);
  args.cols_full = lora_b.size(1);
  // k_full and k_per_split stay 0, unused: the expand's one split covers every k < the slot's rank
  // float64 out keeps float64 accumulation (sgmv_kernel). The decode grid's column blocks are its y dimension.
  const int64_t decode_col_blocks = ceil_div(args.cols_full, kDecodeExpandCols);
  if (args.out_dtype != kF64 && expand_rows_of_16_bytes(args) && decode_path(args.num_tokens, args.num_slots) &&
      decode_col_blocks <= kMaxGridYZ) {
    launch_bgmv<false>(args, decode_col_blocks);
    return;
  }
  // Tensor cores for a 16-bit lora_b into a 16-bit or float32 out, on sm_80+.
  const bool tensor_cores =
      (args.w_dtype == kF16 || args.w_dtype == kBF16) && args.out_dtype != kF64 &&
      tensor_core_code_runs(reinterpret_cast<const void*>(sgmv_expand_mma_kernel<c10::Half>), t.get_device());
  args.col_tiles = ceil_div(args.cols_full, tensor_cores ? kExpandCols : kTileCols);
  launch_sgmv<false>(args, 1, tensor_cores);
}

}  // namespace lora_kernels
