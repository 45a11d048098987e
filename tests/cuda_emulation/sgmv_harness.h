// What the grouped-op harnesses share: one batch's data (LoRABatch-like metadata, heterogeneous ranks with NaN past
// each, integer-valued operands), the kernels' arguments for it, and the float64 references of the shrink and the
// expand, compared bit for bit. Include after extracted.h (SgmvArgs, the dtype codes).
#pragma once

#include "harness.h"

#include <cstring>

template <typename T> int code();
template <> int code<float>() { return kF32; }
template <> int code<c10::Half>() { return kF16; }
template <> int code<c10::BFloat16>() { return kBF16; }
template <> int code<double>() { return kF64; }

// x [M, K] and A [L, R, K] in rows of shrink_ld elements; B [L, N, R] in rank rows of b_ld elements; t [M, R] fp32;
// out [M, n_total] of Out, the expand adding at columns offset .. offset + N. T: x, A and B. aligned_out: offset and
// n_total multiples of 8 elements (out's rows and the slice start 16-byte aligned, as the staged expand needs).
template <typename T, typename Out>
struct GroupedCase {
  int M, L, K, R, N, offset, n_total;
  int64_t shrink_ld, b_ld;
  std::string dist;
  Meta meta;
  std::vector<int32_t> ranks;
  std::vector<float> scalings, t;
  std::vector<T> x_storage, a_storage, b_storage;
  T *x, *a, *b;
  std::vector<Out> out, before;

  GroupedCase(int M_, int L_, int K_, int R_, int64_t shrink_ld_, int64_t b_ld_, int N_, const std::string& dist_,
              uint32_t seed, bool aligned_out = false)
      : M(M_), L(L_), K(K_), R(R_), N(N_), offset(aligned_out ? 8 : 5),
        n_total(aligned_out ? (N_ + 8 + 7) / 8 * 8 + 8 : N_ + 9), shrink_ld(shrink_ld_), b_ld(b_ld_), dist(dist_) {
    std::mt19937 rng(seed);
    auto ival = [&](int bound) { return float(int(rng() % (2 * bound + 1)) - bound); };
    const float nan = std::nanf("");
    meta = make_meta(M, L, rng, dist);
    ranks.resize(L);  // R, R - 1, R / 2, 0, R, 1, R / 2, 0, ...
    for (int s = 0; s < L; ++s) ranks[s] = (s % 4 == 0) ? R : (s % 4 == 1 ? 1 : (s % 4 == 2 ? R / 2 : 0));
    if (L > 1) ranks[1] = std::max(R - 1, 1);
    scalings.resize(L);
    for (int s = 0; s < L; ++s) scalings[s] = std::ldexp(1.0f, s % 5 - 2);
    x = aligned16_in(x_storage, size_t(M) * shrink_ld);
    a = aligned16_in(a_storage, size_t(L) * R * shrink_ld);
    b = aligned16_in(b_storage, size_t(L) * N * b_ld);
    for (int64_t i = 0; i < int64_t(M) * shrink_ld; ++i) x[i] = T(ival(4));
    for (int s = 0; s < L; ++s) {
      for (int c = 0; c < R; ++c) {
        T* row = a + (int64_t(s) * R + c) * shrink_ld;
        for (int64_t k = 0; k < shrink_ld; ++k) row[k] = c < ranks[s] ? T(ival(4)) : T(nan);
      }
      for (int n = 0; n < N; ++n) {
        for (int64_t j = 0; j < b_ld; ++j) b[(int64_t(s) * N + n) * b_ld + j] = j < ranks[s] ? T(ival(3)) : T(nan);
      }
    }
    // the rows' padding past K (x, A) and past R (B) is no element of theirs: the kernels never read it
    poison_row_padding(x, M, shrink_ld, K);
    poison_row_padding(a, int64_t(L) * R, shrink_ld, K);
    poison_row_padding(b, int64_t(L) * N, b_ld, R);
    t.resize(size_t(M) * R);
    for (int tok = 0; tok < M; ++tok) {
      for (int j = 0; j < R; ++j) t[tok * R + j] = token_rank(tok) > j ? ival(3) : nan;
    }
    out.resize(size_t(M) * n_total);
    for (auto& v : out) v = Out(ival(4));
    // -0.0 outside the slice: a kernel that adds (zeros) there turns it into +0.0, which check_expand's bitwise
    // comparison sees (a float comparison would not)
    for (int tok = 0; tok < M; ++tok) {
      for (int col = 0; col < n_total; ++col) {
        if (col < offset || col >= offset + N) out[size_t(tok) * n_total + col] = Out(-0.0f);
      }
    }
    // ... and the zeros in the slice of a token of rank 0 (its slot's, or none), which no kernel adds to either
    for (int tok = 0; tok < M; ++tok) {
      for (int col = offset; token_rank(tok) == 0 && col < offset + N; ++col) {
        if (float(out[size_t(tok) * n_total + col]) == 0.f) out[size_t(tok) * n_total + col] = Out(-0.0f);
      }
    }
    before = out;
  }

  int token_rank(int tok) const { return meta.ids[tok] >= 0 ? ranks[meta.ids[tok]] : 0; }

  void set_metadata(SgmvArgs& args) const {
    args.sorted_token_ids = meta.sorted.data(); args.slot_starts = meta.starts.data();
    args.slot_counts = meta.counts.data(); args.ranks = ranks.data(); args.scalings = scalings.data();
    args.num_tokens = M; args.max_rank = R; args.num_slots = L;
  }

  // The shrink's arguments into zero-filled partials [splits, M, R] (the launcher's at::zeros) of P: float32, or
  // float64 where x is (the accumulation type).
  template <typename P>
  SgmvArgs shrink_args(std::vector<P>& partials, int64_t splits, int64_t k_per_split) const {
    SgmvArgs args{};
    args.x = x; args.x_dtype = code<T>(); args.x_stride_t = shrink_ld; args.x_stride_k = 1;
    args.w = a; args.w_dtype = code<T>(); args.w_stride_slot = R * shrink_ld; args.w_stride_c = shrink_ld;
    args.w_stride_k = 1; args.k_full = K;
    partials.assign(size_t(splits) * M * R, P(0));
    args.out = partials.data(); args.out_dtype = code<P>();
    args.out_stride_split = int64_t(M) * R; args.out_stride_t = R; args.out_stride_c = 1;
    args.k_per_split = k_per_split;
    set_metadata(args);
    return args;
  }

  SgmvArgs expand_args() {
    SgmvArgs args{};
    args.x = t.data(); args.x_dtype = kF32; args.x_stride_t = R; args.x_stride_k = 1;
    args.w = b; args.w_dtype = code<T>(); args.w_stride_slot = N * b_ld; args.w_stride_c = b_ld; args.w_stride_k = 1;
    args.out = out.data(); args.out_dtype = code<Out>(); args.out_stride_t = n_total; args.out_stride_c = 1;
    args.col_offset = offset; args.cols_full = N;
    set_metadata(args);
    return args;
  }

  // The partials summed over the splits in order (the launcher's partials.sum(0)), as float32 (its .to(kFloat)),
  // against the reference.
  template <typename P>
  void check_shrink(const std::vector<P>& partials, int64_t splits) const {
    for (int tok = 0; tok < M; ++tok) {
      const int s = meta.ids[tok];
      for (int c = 0; c < R; ++c) {
        P sum = 0;
        for (int64_t split = 0; split < splits; ++split) sum += partials[(split * M + tok) * R + c];
        const float got = float(sum);
        double ref = 0;
        for (int64_t k = 0; c < token_rank(tok) && k < K; ++k) {
          ref += double(float(x[tok * shrink_ld + k])) * double(float(a[(int64_t(s) * R + c) * shrink_ld + k]));
        }
        ref *= s >= 0 ? scalings[s] : 0.f;
        EXPECT(double(got) == ref, "shrink %s M=%d L=%d K=%d R=%d tok=%d c=%d: %g vs %g", dist.c_str(), M, L, K, R,
               tok, c, got, ref);
      }
    }
  }

  void check_expand() const {
    for (int tok = 0; tok < M; ++tok) {
      const int s = meta.ids[tok];
      for (int col = 0; col < n_total; ++col) {
        double ref = double(float(before[tok * n_total + col]));
        const int n = col - offset;
        if (n < 0 || n >= N || token_rank(tok) == 0) {  // outside the slice, or rank 0: untouched, bit for bit
          EXPECT(std::memcmp(&out[tok * n_total + col], &before[tok * n_total + col], sizeof(Out)) == 0,
                 "expand %s M=%d L=%d R=%d tok=%d col=%d: written outside the slice or for a token of rank 0",
                 dist.c_str(), M, L, R, tok, col);
          continue;
        }
        for (int j = 0; n >= 0 && n < N && j < token_rank(tok); ++j) {
          ref += double(t[tok * R + j]) * double(float(b[(int64_t(s) * N + n) * b_ld + j]));
        }
        const float got = float(out[tok * n_total + col]), want = float(Out(float(ref)));
        EXPECT(got == want, "expand %s M=%d L=%d R=%d tok=%d col=%d: %g vs %g", dist.c_str(), M, L, R, tok, col, got,
               want);
      }
    }
  }
};

// The case grid of a grouped harness: `quick` (argv[1]) one mixed batch on the H200's 132 SMs; otherwise every
// segment distribution in `full`, on 132 SMs and on 4 (few or no K-splits).
struct CaseGrid {
  std::vector<std::string> dists;
  std::vector<int> sm_counts;
};
inline CaseGrid case_grid(int argc, char** argv, std::vector<std::string> full) {
  if (argc > 1 && std::string(argv[1]) == "quick") {
    return {{"mixed_base"}, {132}};
  }
  return {std::move(full), {132, 4}};
}
