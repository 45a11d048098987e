// Tensor-core building blocks shared by the .cu kernels (the decode forward in lora_linear.cu, the grouped shrink in
// sgmv.cu): 16-byte loads and the m16n8k16 MMA of fp16/bf16 operands with fp32 accumulators (sm_80+).
//
// The operand layout both kernels use: a lane (group g = lane / 4, t = lane % 4) holds A's rows g and g + 8 and B's
// column g, each at the k-slots {2t, 2t + 1} (first register) and {2t + 8, 2t + 9} (second register) of an MMA. The
// k-slots of the MMA are a permutation of K: any one works if A and B share it, and both depend on t only. So lane t
// loads the 8 consecutive elements k0 + 8t .. k0 + 8t + 7 of each of its rows (one 16-byte load; 4 lanes cover 64
// contiguous bytes of a row) and feeds elements 0-3 to one MMA (slots 2t, 2t + 1 <- elements 0, 1; slots 2t + 8,
// 2t + 9 <- elements 2, 3) and elements 4-7 to a second: mma_k32 below. The accumulator d[i] is row g + 8 * (i / 2),
// column 2t + i % 2.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace lora_kernels {

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16 bytes at p, or zeros where !valid (p is not read then). stream: evict-first (data read once, as a weight
// streamed by a decode kernel); otherwise through the read-only cache (data other blocks read too).
__device__ __forceinline__ uint4 load16_or_zero(const void* p, bool valid, bool stream) {
  if (!valid) {
    return make_uint4(0u, 0u, 0u, 0u);
  }
  const uint4* q = reinterpret_cast<const uint4*>(p);
  return stream ? __ldcs(q) : __ldg(q);
}

// The lane's pointers into kTiles n8 tiles of B's columns, stored as rows of `base` (row stride `stride`) from row
// `first`: lane group g takes row first + 8 * tile + g, at its 8-element offset 8t. Rows at or past `limit` are not
// ok: their pointer stays at row 0 and is never read.
template <typename T, int kTiles>
__device__ __forceinline__ void mma_b_rows(const T* base, int64_t first, int64_t limit, int64_t stride, int group,
                                           int t, const T* (&rows)[kTiles], bool (&ok)[kTiles]) {
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile) {
    const int64_t row = first + 8 * tile + group;
    ok[tile] = row < limit;
    rows[tile] = base + (ok[tile] ? row : 0) * stride + 8 * t;
  }
}

// d += a · b for one m16n8k16 tile, fp32 accumulators; fragment layouts in the PTX ISA ("Matrix Fragments for
// mma.m16n8k16 with floating point type"). Each register holds two consecutive elements, the lower one in the low half.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, c10::Half>, "mma_m16n8k16 takes fp16 or bf16");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#else
  __trap();  // unreachable: the launchers take the tensor-core kernels only where this code is sm_80+ (grid_sizing.h)
#endif
}

// d += the products over one 32-wide chunk of K, with the lane's 16-byte loads of that chunk (see the top of this
// file): lo / hi the A rows g and g + 8, b the B column g.
template <typename T>
__device__ __forceinline__ void mma_k32(float (&d)[4], const uint4& lo, const uint4& hi, const uint4& b) {
  mma_m16n8k16<T>(d, lo.x, hi.x, lo.y, hi.y, b.x, b.y);
  mma_m16n8k16<T>(d, lo.z, hi.z, lo.w, hi.w, b.z, b.w);
}

// d += a · b for one m16n8k8 tile of tf32 operands (fp32 bits; the tensor cores ignore the low 13 mantissa bits),
// fp32 accumulators. A lane (g, t) holds A's rows g and g + 8 and B's column g at the k-slots t (a0, a1, b0) and
// t + 4 (a2, a3, b1); the accumulators as for m16n8k16.
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();  // unreachable, as in mma_m16n8k16
#endif
}

// v rounded to the nearest tf32 (ties away from zero), as fp32 bits: the tensor cores would truncate it.
__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t bits = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(bits) : "f"(v));
#else
  __trap();
#endif
  return bits;
}

}  // namespace lora_kernels
