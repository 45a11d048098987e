// CUDA implementations of the grouped ops sgmv_shrink and sgmv_expand (schemas in csrc/ops.cpp).
//
// One kernel serves both: a gathered "x · Wᵀ" per adapter slot,
//   shrink: out[tok, c]           = scalings[i] · Σ_{k<K}        x[tok, k] · A[i, c, k]   for c < ranks[i]
//   expand: out[tok, offset + c] +=               Σ_{k<ranks[i]} t[tok, k] · B[i, c, k]   for c < N
// over a fixed grid (output column tiles, token tiles, slots): a block whose token tile starts past
// slot_counts[slot], or whose column tile starts past the slot's width, exits at once. The grid depends only on
// the shapes, never on the metadata values, so there is no host sync and the launch can be captured in a CUDA
// graph. Metadata values are clamped (ranks to [0, R], slot ranges to [0, M), token ids outside [0, M) skipped)
// rather than checked, so bad metadata never reads out of bounds; A/B are never read past ranks[i].
//
// Simple and correct: shared-memory tiles and fp32 FMAs, operand dtypes read at run time (one kernel for every
// dtype combination instead of a template per pair: compile time). A tensor-core version would stage bf16/fp16
// tiles with cp.async and use mma.sync (rank padded to 16), split K for the skinny shrink to fill the GPU, and
// handle decode (one token per slot) with a per-token warp kernel instead of a 32-row tile that is mostly empty.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>

#include "../lora_checks.h"

namespace lora_kernels {
namespace {

constexpr int kTileTokens = 32;
constexpr int kTileCols = 32;
constexpr int kTileK = 32;
constexpr int kThreads = 256;  // 16 x 16 threads, each a 2 x 2 micro-tile of the 32 x 32 output tile
constexpr int kMaxGridYZ = 65535;

enum DtypeCode : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: TORCH_CHECK_TYPE(false, "sgmv: unsupported dtype ", t.scalar_type());
  }
  return kF32;
}

__device__ __forceinline__ float load_as_float(const void* p, int64_t i, int dtype) {
  switch (dtype) {
    case kF16: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    case kBF16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    case kF64: return static_cast<float>(static_cast<const double*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* p, int64_t i, int dtype, float v) {
  switch (dtype) {
    case kF16: static_cast<c10::Half*>(p)[i] = c10::Half(v); break;
    case kBF16: static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(v); break;
    case kF64: static_cast<double*>(p)[i] = static_cast<double>(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

struct SgmvArgs {
  const void* x;  // shrink: x [M, K]; expand: t [M, R] fp32
  int x_dtype;
  int64_t x_stride_t, x_stride_k;
  const void* w;  // shrink: lora_a [L, R, K] (c = rank row); expand: lora_b [L, N, R] (c = output column)
  int w_dtype;
  int64_t w_stride_slot, w_stride_c, w_stride_k;
  void* out;  // shrink: [M, R] fp32 (zero-filled); expand: [M, N_total]
  int out_dtype;
  int64_t out_stride_t, out_stride_c, col_offset;
  const int32_t* sorted_token_ids;
  const int32_t* slot_starts;
  const int32_t* slot_counts;
  const int32_t* ranks;
  const float* scalings;  // shrink only
  int64_t num_tokens, max_rank;
  int64_t k_full;     // shrink: K (expand: the slot's rank)
  int64_t cols_full;  // expand: N (shrink: the slot's rank)
};

template <bool kShrink>
__global__ void __launch_bounds__(kThreads) sgmv_kernel(const SgmvArgs args) {
  const int slot = blockIdx.z;
  int64_t start = args.slot_starts[slot], count = args.slot_counts[slot];
  start = start < 0 ? 0 : (start > args.num_tokens ? args.num_tokens : start);
  count = count < 0 ? 0 : (count > args.num_tokens - start ? args.num_tokens - start : count);
  const int64_t t0 = int64_t(blockIdx.y) * kTileTokens;
  if (t0 >= count) {
    return;  // fixed grid: this token tile is past the slot's tokens
  }
  int64_t rank = args.ranks[slot];
  rank = rank < 0 ? 0 : (rank > args.max_rank ? args.max_rank : rank);
  const int64_t cols = kShrink ? rank : args.cols_full;
  const int64_t kdim = kShrink ? args.k_full : rank;
  const int64_t c0 = int64_t(blockIdx.x) * kTileCols;
  if (c0 >= cols || kdim == 0) {
    return;  // nothing to write: shrink's zero columns are already zero, expand adds nothing
  }

  __shared__ int64_t tokens[kTileTokens];
  __shared__ float x_tile[kTileTokens][kTileK + 1];  // +1: the column reads below hit distinct banks
  __shared__ float w_tile[kTileCols][kTileK + 1];
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
  float acc[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
  const int64_t w_slot = int64_t(slot) * args.w_stride_slot;
  for (int64_t k0 = 0; k0 < kdim; k0 += kTileK) {
    for (int e = tid; e < kTileTokens * kTileK; e += kThreads) {
      const int row = e / kTileK, kk = e % kTileK;
      const int64_t token = tokens[row], k = k0 + kk;
      x_tile[row][kk] = (token >= 0 && k < kdim)
                            ? load_as_float(args.x, token * args.x_stride_t + k * args.x_stride_k, args.x_dtype)
                            : 0.f;
    }
    for (int e = tid; e < kTileCols * kTileK; e += kThreads) {
      const int c = e / kTileK, kk = e % kTileK;
      const int64_t col = c0 + c, k = k0 + kk;
      w_tile[c][kk] = (col < cols && k < kdim)
                          ? load_as_float(args.w, w_slot + col * args.w_stride_c + k * args.w_stride_k, args.w_dtype)
                          : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTileK; ++kk) {
      const float a0 = x_tile[ty][kk], a1 = x_tile[ty + 16][kk];
      const float b0 = w_tile[tx][kk], b1 = w_tile[tx + 16][kk];
      acc[0][0] = fmaf(a0, b0, acc[0][0]);
      acc[0][1] = fmaf(a0, b1, acc[0][1]);
      acc[1][0] = fmaf(a1, b0, acc[1][0]);
      acc[1][1] = fmaf(a1, b1, acc[1][1]);
    }
    __syncthreads();
  }

  const float scale = kShrink ? args.scalings[slot] : 1.f;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t token = tokens[ty + 16 * i];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t col = c0 + tx + 16 * j;
      if (token >= 0 && col < cols) {
        const int64_t idx = token * args.out_stride_t + (args.col_offset + col) * args.out_stride_c;
        if (kShrink) {
          store_from_float(args.out, idx, args.out_dtype, scale * acc[i][j]);
        } else {
          // Tokens are distinct (sorted_token_ids is a permutation), so each element has one writer.
          store_from_float(args.out, idx, args.out_dtype, load_as_float(args.out, idx, args.out_dtype) + acc[i][j]);
        }
      }
    }
  }
}

// The grid's y and z dimensions are limited to 65535 (token tiles and slots).
void check_sgmv_grid(const char* op, const char* lora_arg, int64_t num_tokens, int64_t num_slots) {
  LK_CHECK_VALUE((num_tokens + kTileTokens - 1) / kTileTokens <= kMaxGridYZ, op, ": the tokens (rows of x / t) ",
                 "expected at most ", int64_t(kMaxGridYZ) * kTileTokens, " (CUDA grid limit), got ", num_tokens);
  LK_CHECK_VALUE(num_slots <= kMaxGridYZ, op, ": ", lora_arg, ".shape[0] expected at most ", kMaxGridYZ,
                 " adapter slots (CUDA grid limit), got ", num_slots);
}

template <bool kShrink>
void launch_sgmv(const SgmvArgs& args, int64_t num_slots, int64_t max_cols) {
  const int64_t token_tiles = (args.num_tokens + kTileTokens - 1) / kTileTokens;
  const int64_t col_tiles = (max_cols + kTileCols - 1) / kTileCols;
  if (token_tiles == 0 || col_tiles == 0 || num_slots == 0) {
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  sgmv_kernel<kShrink><<<dim3(col_tiles, token_tiles, num_slots), kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor sgmv_shrink_cuda(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& sorted_token_ids,
                            const at::Tensor& slot_starts, const at::Tensor& slot_counts, const at::Tensor& scalings,
                            const at::Tensor& ranks) {
  check_sgmv_shrink(x, lora_a, sorted_token_ids, slot_starts, slot_counts, scalings, ranks);
  check_sgmv_grid("sgmv_shrink", "lora_a", x.size(0), lora_a.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t num_tokens = x.size(0), max_rank = lora_a.size(1);
  at::Tensor out = at::zeros({num_tokens, max_rank}, x.options().dtype(at::kFloat));
  // Metadata vectors are [L] or [M]: contiguous copies are cheap (and a no-op for LoRABatch's).
  const at::Tensor ids = sorted_token_ids.contiguous(), starts = slot_starts.contiguous();
  const at::Tensor counts = slot_counts.contiguous(), rank_values = ranks.contiguous();
  const at::Tensor scale_values = scalings.contiguous();
  SgmvArgs args{};
  args.x = x.data_ptr();
  args.x_dtype = dtype_code(x);
  args.x_stride_t = x.stride(0);
  args.x_stride_k = x.stride(1);
  args.w = lora_a.data_ptr();
  args.w_dtype = dtype_code(lora_a);
  args.w_stride_slot = lora_a.stride(0);
  args.w_stride_c = lora_a.stride(1);
  args.w_stride_k = lora_a.stride(2);
  args.out = out.data_ptr();
  args.out_dtype = kF32;
  args.out_stride_t = out.stride(0);
  args.out_stride_c = out.stride(1);
  args.col_offset = 0;
  args.sorted_token_ids = ids.data_ptr<int32_t>();
  args.slot_starts = starts.data_ptr<int32_t>();
  args.slot_counts = counts.data_ptr<int32_t>();
  args.ranks = rank_values.data_ptr<int32_t>();
  args.scalings = scale_values.data_ptr<float>();
  args.num_tokens = num_tokens;
  args.max_rank = max_rank;
  args.k_full = x.size(1);
  args.cols_full = 0;
  launch_sgmv<true>(args, lora_a.size(0), max_rank);
  return out;
}

void sgmv_expand_cuda(const at::Tensor& t, const at::Tensor& lora_b, const at::Tensor& sorted_token_ids,
                      const at::Tensor& slot_starts, const at::Tensor& slot_counts, const at::Tensor& ranks,
                      const at::Tensor& out, int64_t slice_offset) {
  check_sgmv_expand(t, lora_b, sorted_token_ids, slot_starts, slot_counts, ranks, out, slice_offset);
  check_sgmv_grid("sgmv_expand", "lora_b", t.size(0), lora_b.size(0));
  const c10::cuda::CUDAGuard guard(t.device());
  const at::Tensor ids = sorted_token_ids.contiguous(), starts = slot_starts.contiguous();
  const at::Tensor counts = slot_counts.contiguous(), rank_values = ranks.contiguous();
  SgmvArgs args{};
  args.x = t.data_ptr();
  args.x_dtype = kF32;
  args.x_stride_t = t.stride(0);
  args.x_stride_k = t.stride(1);
  args.w = lora_b.data_ptr();
  args.w_dtype = dtype_code(lora_b);
  args.w_stride_slot = lora_b.stride(0);
  args.w_stride_c = lora_b.stride(1);
  args.w_stride_k = lora_b.stride(2);
  args.out = out.data_ptr();
  args.out_dtype = dtype_code(out);
  args.out_stride_t = out.stride(0);
  args.out_stride_c = out.stride(1);
  args.col_offset = slice_offset;
  args.sorted_token_ids = ids.data_ptr<int32_t>();
  args.slot_starts = starts.data_ptr<int32_t>();
  args.slot_counts = counts.data_ptr<int32_t>();
  args.ranks = rank_values.data_ptr<int32_t>();
  args.scalings = nullptr;
  args.num_tokens = t.size(0);
  args.max_rank = lora_b.size(2);
  args.k_full = 0;
  args.cols_full = lora_b.size(1);
  launch_sgmv<false>(args, lora_b.size(0), lora_b.size(1));
}

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("sgmv_shrink", &lora_kernels::sgmv_shrink_cuda);
  m.impl("sgmv_expand", &lora_kernels::sgmv_expand_cuda);
}
