"""Grouped multi-adapter LoRA kernels (design.md §3): SGMV shrink/expand for prefill, BGMV-like ones for decode.

    shrink:  out[t, :r_i] = scalings[i] * A[i, :r_i] @ x[t]                 (fp32 out, zero elsewhere)
    expand:  out[t, off:off+N] += B[i, :, :r_i] @ t[t, :r_i]                 (in place)
with i = batch.adapter_ids[t] >= 0 and r_i = ranks[i]; entries of A/B past r_i are never used (the expand kernels
load B and t up to min(r_i rounded up to 8, R), 16 bytes at a time when R is a multiple of 16, and select the
entries past r_i away). The launchers do not check their arguments: lora_kernels.ops (lora_shrink, lora_expand,
add_lora) is the checked API over them; the custom ops below (what compiled graphs, exported programs and direct
callers run) check the shapes, dtypes and devices their kernels index by. Metadata values are clamped on the device
rather than checked (as the cuda kernels do): ids and ranks into range, each slot's token range into [0, M), sorted
token ids outside [0, M) skipped, so a LoRABatch built by hand with bad values never reads or writes outside the
tensors.

Kernels (all launch a grid fixed by shapes and exit early on the device, so they are CUDA-graph safe):
- prefill (`_sgmv_shrink_kernel`, `_sgmv_expand_kernel`): grid (token tiles, slices x rank-or-N tiles [x split-K],
  slots); a program gathers up to BLOCK_M tokens of its slot through `sorted_token_ids` and uses tl.dot. The shrink
  output is only r wide, so split-K over K (fp32 atomics) multiplies the programs to fill the GPU.
- decode (`_bgmv_shrink_kernel`, `_bgmv_expand_kernel`): one program per token (x output tiles [x split-K]), the
  product as elementwise multiply + tl.sum, so a lone token does not pay for a 16-row tensor-core tile.
- deterministic=True, or torch.use_deterministic_algorithms(True), never splits K, so no atomics: repeats are
  bit-identical.

Traced calls (torch.compile, fake tensors) go through the custom ops `lora_kernels_triton::sgmv_shrink`,
`::sgmv_expand` and `::segment_outer` (torch.library.custom_op with fake impls, so torch.compile(fullgraph=True)
traces through; triton_op/wrap_triton cannot trace a kernel running under the Triton interpreter, so the opaque
custom op is used everywhere); plain eager calls launch directly (through_op: the dispatcher's host time).
"""

import inspect

import torch

from lora_kernels._ext import check_devices, through_op
from lora_kernels.triton import (FP_FUSION, HAS_TRITON, INTERPRET, SUPPORTED_DTYPES, TRITON_DTYPE_NAMES, cdiv,
                                 check_tensor, on_tensor_device, one_launch_at_a_time, sm_count)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from lora_kernels.triton import UPCAST_DOT_OPERANDS, round_to_tf32
else:  # keep the module importable: lora_kernels.backends reports triton as unavailable
    triton = tl = None


# Path choice. A batch takes the decode (per-token) kernels when it has at most DECODE_MAX_TOKENS tokens, or at most
# DECODE_MAX_TOKENS_PER_SLOT tokens per slot on average: there a 16-row tensor-core tile per slot is mostly padding.
# 64 is the decode batch size of design.md §8 and vLLM's/Punica's BGMV range; both are unmeasured starting points.
DECODE_MAX_TOKENS = 64
DECODE_MAX_TOKENS_PER_SLOT = 4

# GPU block sizes: starting points after vLLM's default LoRA configs (shrink: short token tile, long K tile;
# expand: wide N tile) within sm_80/86's shared memory (largest: shrink prefill, fp32, R tile 64, 3 stages: 72 KB,
# read from an sm_80 compile). A one-off sweep on an H100 (bf16, K = N = 4096, r = 16; prefill M = 4096 with 1 and
# 16 adapters, decode M = 64 with 64 adapters; ~8 variants per kernel of BLOCK_M/N/K, warps, stages, split-K target)
# found these best or within 0.3 us of the best; other shapes and GPUs are untuned.
# Ranks are tiled by 16 (the smallest tl.dot dimension) or 64 (shrink prefill when R > 16: x is read once per tile).
GPU_CONFIG = {
    "shrink_prefill": {"BLOCK_M": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
    "shrink_decode": {"BLOCK_R": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 2},
    "expand_prefill": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_R": 16, "num_warps": 4, "num_stages": 2},
    "expand_decode": {"BLOCK_N": 128, "BLOCK_R": 16, "num_warps": 4, "num_stages": 2},
    # Untuned (its tests pass on the H200; the grouped training row, 1.05x one adapter, includes it): a GEMM
    # [P, tokens] x [tokens, Q] per slot with P = the rank, so a short P tile (16 or 64) against a wide Q tile.
    # Chosen without spills: ptxas -v for sm_90a gave 90-214 registers and none spilled for bf16/fp32 at P 16/64
    # with 8 warps and 32 tokens per step; 4 warps and 64 tokens spilled 168-456 bytes.
    "segment_outer": {"BLOCK_T": 32, "BLOCK_Q": 128, "num_warps": 8, "num_stages": 3},
    # fp32 x (tf32x3 dots, three MMAs per product) with the bf16 tile spilled at R = 64: 6.8 KB per thread on sm_80,
    # 1.7 KB on sm_90a (ptxas -v). Half the K tile over twice the warps spills none on either, at R 16 and 64.
    "shrink_prefill_fp32": {"BLOCK_M": 32, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
}
SHRINK_PREFILL_BLOCK_R = (16, 64)  # the R (rank) tile: 16 up to rank 16, else 64 (ranks above 64 take several)
SEGMENT_OUTER_BLOCK_P = (16, 64)  # the P (rank) tile: 16 up to rank 16, else 64 (ranks above 64 take several)
# Under the interpreter (tests on CPU): one small config so tiny shapes still span several tiles, and a fixed
# split-K of 2 so the atomic path is exercised.
INTERP_CONFIG = {
    "shrink_prefill": {"BLOCK_M": 16, "BLOCK_K": 32, "num_warps": 1, "num_stages": 1},
    "shrink_decode": {"BLOCK_R": 16, "BLOCK_K": 32, "num_warps": 1, "num_stages": 1},
    "expand_prefill": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_R": 16, "num_warps": 1, "num_stages": 1},
    "expand_decode": {"BLOCK_N": 32, "BLOCK_R": 16, "num_warps": 1, "num_stages": 1},
    "segment_outer": {"BLOCK_T": 16, "BLOCK_Q": 32, "num_warps": 1, "num_stages": 1},
}
INTERP_SPLIT_K = 2
# Which block sizes the launchers take: GPU_CONFIG's on a GPU, INTERP_CONFIG's under the interpreter.
# tests/test_triton_gpu_configs.py switches the interpreter to GPU_CONFIG's too, to run the GPU tiles' edge cases.
USE_GPU_CONFIG = not INTERPRET
# Split-K: aim for SPLIT_K_PROGRAMS_PER_SM programs per SM, at most MAX_SPLIT_K splits, and at least
# MIN_K_BLOCKS_PER_SPLIT K tiles per split so each keeps its pipeline busy. In the H100 sweep above, 4 programs per
# SM beat 2 (29 vs 20 us, 16-adapter prefill shrink) and tied 8; the other two are unmeasured starting points.
SPLIT_K_PROGRAMS_PER_SM = 4
MAX_SPLIT_K = 16
MIN_K_BLOCKS_PER_SPLIT = 2
# Output slices of add_lora one shrink and one expand launch take (a fused QKV projection's three): each slice's
# pointer, width and first output column are kernel arguments (see _of_slice); more slices take several launches.
SLICES_PER_LAUNCH = 3


if HAS_TRITON:
    # fp32 inputs: plain tf32 missed the fp32 tolerance (relative error 1.2e-3 to 1.4e-3 > 1e-3 on an H100, shrink +
    # expand); tf32x3 is about fp32-accurate for 3 MMAs, which these memory-bound GEMMs can afford.
    _FP32_DOT_PRECISION = tl.constexpr("tf32x3")

    @triton.jit
    def _mma(a, b, acc):
        """acc + a · b on tensor cores: fp32 operands in tf32x3 (see _FP32_DOT_PRECISION), upcast first under the
        interpreter (see UPCAST_DOT_OPERANDS)."""
        if UPCAST_DOT_OPERANDS:
            a, b = a.to(tl.float32), b.to(tl.float32)
        if a.dtype == tl.float32:
            return tl.dot(a, b, acc, input_precision=_FP32_DOT_PRECISION)
        return tl.dot(a, b, acc)

    @triton.jit
    def _mma_tf32(a, b, acc):
        """acc + a · b for an fp32 `a` and an fp16-widened `b` on tensor cores in one tf32 MMA, `a` rounded to tf32
        first (the tensor cores would truncate it: see round_to_tf32; `b` converts exactly)."""
        return tl.dot(round_to_tf32(a), b, acc, input_precision="tf32")

    @triton.jit
    def _rank_load_bound(rank, R):
        """How far along a row of B (rank contiguous) the expand kernels load: the slot's rank rounded up to a
        multiple of 8, within R. A mask ending at the rank itself (a loaded value, of unknown divisibility) ends
        anywhere, so Triton loads B element by element; this bound is a multiple of 8 whenever R is, which Triton
        knows when R is a multiple of 16 (it specialises ints on 16-divisibility): then 8 16-bit elements (16 bytes)
        load at once; other R load element by element, as before. Within R, so in bounds for any strides. The up to
        7 entries past the rank are selected away (tl.where, not multiplied by zero: they may hold NaN)."""
        return tl.minimum((rank + 7) // 8 * 8, R)

    @triton.jit
    def _slot_range(slot_starts_ptr, slot_counts_ptr, slot, num_tokens):
        """(start, count) of the slot's tokens in sorted_token_ids, clamped into [0, num_tokens) as the cuda kernels
        clamp them: the metadata of a LoRABatch built by hand is not checked on a GPU (reading it would sync), and
        must never make a kernel read or write outside its tensors (from_adapter_ids' is always in range)."""
        start = tl.minimum(tl.maximum(tl.load(slot_starts_ptr + slot), 0), num_tokens)
        count = tl.minimum(tl.maximum(tl.load(slot_counts_ptr + slot), 0), num_tokens - start)
        return start, count

    @triton.jit
    def _slot_rank(ranks_ptr, slot, R):
        """The slot's rank clamped into [0, R], as the cuda kernels clamp it (see _slot_range)."""
        return tl.minimum(tl.maximum(tl.load(ranks_ptr + slot), 0), R)

    @triton.jit
    def _token_slot_rank(adapter_ids_ptr, ranks_ptr, tok, L, R):
        """(slot, rank) of token tok for the decode kernels: an id outside [0, L) (-1, or an unchecked one) reads
        slot 0's entries with rank 0, so nothing of that slot is used."""
        slot = tl.load(adapter_ids_ptr + tok)
        valid = (slot >= 0) & (slot < L)
        slot = tl.where(valid, slot, 0)
        return slot, tl.where(valid, _slot_rank(ranks_ptr, slot, R), 0)

    @triton.jit
    def _slot_tokens(sorted_ids_ptr, start, count, positions, num_tokens):
        """The token ids at `positions` of a slot's range (int64, 0 where masked) and their mask: positions past
        count, and ids outside [0, num_tokens), are skipped (see _slot_range)."""
        in_range = positions < count
        tok = tl.load(sorted_ids_ptr + start + positions, mask=in_range, other=0).to(tl.int64)
        valid = in_range & (tok >= 0) & (tok < num_tokens)
        return tl.where(valid, tok, 0), valid

    @triton.jit
    def _of_slice(pid_s, v0, v1, v2):
        """The value of slice pid_s (0, 1 or 2; see SLICES_PER_LAUNCH): a slice's own pointer, width, first output
        column or slot stride, passed as a kernel argument rather than read from a table in device memory, so a
        launch needs no host-to-device copy and a captured CUDA graph replays with the arguments it was captured
        with. v0..v2 must have one type: strides are cast to int64 first (one may be past 2^31, an i64 argument)."""
        v = v0
        if pid_s == 1:
            v = v1
        if pid_s == 2:
            v = v2
        return v

    @triton.jit(do_not_specialize=["num_tokens"])
    def _sgmv_shrink_kernel(
        x_ptr, a0_ptr, a1_ptr, a2_ptr, out_ptr,
        sorted_ids_ptr, slot_counts_ptr, slot_starts_ptr, scalings_ptr, ranks_ptr,
        num_tokens, K, R,
        stride_xm, stride_xk,
        stride_al, stride_ar, stride_ak,
        stride_os, stride_om, stride_or,
        num_r_tiles, split_k, k_per_split,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, USE_ATOMIC: tl.constexpr,
    ):
        """Prefill shrink. Grid (cdiv(M, BLOCK_M), S * num_r_tiles * split_k, L); slice s (s < S <= 3) reads A at
        a{s}_ptr. out must be zero where no program writes (rows of -1 tokens, columns past a slot's rank) and, with
        USE_ATOMIC, everywhere."""
        pid_m = tl.program_id(0)
        pid_1 = tl.program_id(1)
        slot = tl.program_id(2)
        start, count = _slot_range(slot_starts_ptr, slot_counts_ptr, slot, num_tokens)
        if pid_m * BLOCK_M >= count:
            return
        pid_split = pid_1 % split_k
        pid_r = (pid_1 // split_k) % num_r_tiles
        pid_s = pid_1 // (split_k * num_r_tiles)
        rank = _slot_rank(ranks_ptr, slot, R)
        if pid_r * BLOCK_R >= rank:
            return
        tok, mask_m = _slot_tokens(sorted_ids_ptr, start, count, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), num_tokens)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
        a_ptrs = (_of_slice(pid_s, a0_ptr, a1_ptr, a2_ptr) + slot.to(tl.int64) * stride_al
                  + offs_r[None, :].to(tl.int64) * stride_ar + offs_k[:, None].to(tl.int64) * stride_ak)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        k_lo = pid_split * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            mask_k = (k0 + offs_k) < k_hi
            xt = tl.load(x_ptrs + tl.cast(k0, tl.int64) * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            at = tl.load(a_ptrs + tl.cast(k0, tl.int64) * stride_ak, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            acc = _mma(xt, at, acc)
        acc = acc * tl.load(scalings_ptr + slot)
        out_ptrs = (out_ptr + pid_s.to(tl.int64) * stride_os + tok[:, None] * stride_om
                    + offs_r[None, :].to(tl.int64) * stride_or)
        mask_out = mask_m[:, None] & mask_r[None, :]
        if USE_ATOMIC:
            tl.atomic_add(out_ptrs, acc, mask=mask_out)
        else:
            tl.store(out_ptrs, acc, mask=mask_out)

    @triton.jit
    def _bgmv_shrink_kernel(
        x_ptr, a0_ptr, a1_ptr, a2_ptr, out_ptr,
        adapter_ids_ptr, scalings_ptr, ranks_ptr,
        K, R, L,
        stride_xm, stride_xk,
        stride_al, stride_ar, stride_ak,
        stride_os, stride_om, stride_or,
        num_r_tiles, k_per_split,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, USE_ATOMIC: tl.constexpr,
    ):
        """Decode shrink. Grid (M, S * num_r_tiles, split_k); slice s (s < S <= 3) reads A at a{s}_ptr. Without
        USE_ATOMIC (split_k == 1) every entry of out is written (zeros for -1 tokens and past the rank); with it, out
        must be zero first."""
        tok = tl.program_id(0).to(tl.int64)
        pid_1 = tl.program_id(1)
        pid_split = tl.program_id(2)
        pid_r = pid_1 % num_r_tiles
        pid_s = pid_1 // num_r_tiles
        slot, rank = _token_slot_rank(adapter_ids_ptr, ranks_ptr, tok, L, R)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        out_ptrs = out_ptr + pid_s.to(tl.int64) * stride_os + tok * stride_om + offs_r.to(tl.int64) * stride_or
        if pid_r * BLOCK_R >= rank:
            if not USE_ATOMIC:
                tl.store(out_ptrs, tl.zeros((BLOCK_R,), dtype=tl.float32), mask=offs_r < R)
            return
        mask_r = offs_r < rank
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + tok * stride_xm + offs_k.to(tl.int64) * stride_xk
        a_ptrs = (_of_slice(pid_s, a0_ptr, a1_ptr, a2_ptr) + slot.to(tl.int64) * stride_al
                  + offs_r[:, None].to(tl.int64) * stride_ar + offs_k[None, :].to(tl.int64) * stride_ak)
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        k_lo = pid_split * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            mask_k = (k0 + offs_k) < k_hi
            xk = tl.load(x_ptrs + tl.cast(k0, tl.int64) * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
            at = tl.load(a_ptrs + tl.cast(k0, tl.int64) * stride_ak, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            acc += at.to(tl.float32) * xk[None, :]
        res = tl.sum(acc, axis=1) * tl.load(scalings_ptr + slot)
        if USE_ATOMIC:
            tl.atomic_add(out_ptrs, res, mask=mask_r)
        else:
            # zeros past the rank, not the sums of 0·x there: NaN for a NaN or Inf in the token's row of x
            tl.store(out_ptrs, tl.where(mask_r, res, 0.0), mask=offs_r < R)

    @triton.jit(do_not_specialize=["num_tokens"])
    def _sgmv_expand_kernel(
        t_ptr, b0_ptr, b1_ptr, b2_ptr, out_ptr,
        sorted_ids_ptr, slot_counts_ptr, slot_starts_ptr, ranks_ptr,
        num_tokens, R,
        N0, N1, N2, col0, col1, col2,
        stride_ts, stride_tm, stride_tr,
        stride_bl0, stride_bl1, stride_bl2, stride_bn, stride_br,
        stride_om, stride_on,
        num_n_tiles,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """Prefill expand, adding into out. Grid (cdiv(M, BLOCK_M), S * num_n_tiles, L); slice s (s < S <= 3) reads
        B at b{s}_ptr (slot stride stride_bl{s}) and adds into columns col{s} ... col{s} + N{s} - 1 of out. Rows of
        -1 tokens are not touched."""
        pid_m = tl.program_id(0)
        pid_1 = tl.program_id(1)
        slot = tl.program_id(2)
        start, count = _slot_range(slot_starts_ptr, slot_counts_ptr, slot, num_tokens)
        if pid_m * BLOCK_M >= count:
            return
        pid_n = pid_1 % num_n_tiles
        pid_s = pid_1 // num_n_tiles
        N = _of_slice(pid_s, N0, N1, N2)
        if pid_n * BLOCK_N >= N:  # a slice narrower than the widest
            return
        rank = _slot_rank(ranks_ptr, slot, R)
        if rank == 0:
            return
        tok, mask_m = _slot_tokens(sorted_ids_ptr, start, count, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), num_tokens)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_r = tl.arange(0, BLOCK_R)
        t_ptrs = (t_ptr + pid_s.to(tl.int64) * stride_ts + tok[:, None] * stride_tm
                  + offs_r[None, :].to(tl.int64) * stride_tr)
        b_ptrs = (_of_slice(pid_s, b0_ptr, b1_ptr, b2_ptr)
                  + slot.to(tl.int64) * _of_slice(pid_s, tl.cast(stride_bl0, tl.int64), tl.cast(stride_bl1, tl.int64),
                                                  tl.cast(stride_bl2, tl.int64))
                  + offs_n[None, :].to(tl.int64) * stride_bn + offs_r[:, None].to(tl.int64) * stride_br)
        r_hi = _rank_load_bound(rank, R)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            mask_r = (r0 + offs_r) < rank
            load_r = (r0 + offs_r) < r_hi  # see _rank_load_bound: 16-byte loads, then past the rank selected away
            tt = tl.load(t_ptrs + tl.cast(r0, tl.int64) * stride_tr, mask=mask_m[:, None] & load_r[None, :], other=0.0)
            tt = tl.where(mask_r[None, :], tt, 0.0)
            bt = tl.load(b_ptrs + tl.cast(r0, tl.int64) * stride_br, mask=load_r[:, None] & mask_n[None, :], other=0.0)
            bt = tl.where(mask_r[:, None], bt, 0.0)
            if bt.dtype == tl.float16:
                # fp16 B: t is already scaled (t = s·S), and rounding it to fp16 made y inf wherever |s·S| passed
                # 65504 while y stayed in range. tf32 keeps fp16's 10-bit mantissa with fp32's exponent (fp16 B
                # converts exactly), at one tensor-core MMA per product, in a kernel that is memory-bound.
                acc = _mma_tf32(tt, bt.to(tl.float32), acc)
            else:
                # bf16 B: t rounded to bf16 for the tensor cores (as vLLM does), bf16 having fp32's exponent range;
                # fp32 B: tf32x3 (see _mma).
                acc = _mma(tt.to(bt.dtype), bt, acc)
        cols = (_of_slice(pid_s, col0, col1, col2) + offs_n).to(tl.int64)
        out_ptrs = out_ptr + tok[:, None] * stride_om + cols[None, :] * stride_on
        mask_out = mask_m[:, None] & mask_n[None, :]
        acc += tl.load(out_ptrs, mask=mask_out, other=0.0).to(tl.float32)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)

    @triton.jit
    def _bgmv_expand_kernel(
        t_ptr, b0_ptr, b1_ptr, b2_ptr, out_ptr,
        adapter_ids_ptr, ranks_ptr,
        R, L,
        N0, N1, N2, col0, col1, col2,
        stride_ts, stride_tm, stride_tr,
        stride_bl0, stride_bl1, stride_bl2, stride_bn, stride_br,
        stride_om, stride_on,
        num_n_tiles,
        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """Decode expand, adding into out. Grid (M, S * num_n_tiles), slices as in _sgmv_expand_kernel; -1 tokens
        are not touched."""
        tok = tl.program_id(0).to(tl.int64)
        pid_1 = tl.program_id(1)
        pid_n = pid_1 % num_n_tiles
        pid_s = pid_1 // num_n_tiles
        N = _of_slice(pid_s, N0, N1, N2)
        if pid_n * BLOCK_N >= N:  # a slice narrower than the widest
            return
        slot, rank = _token_slot_rank(adapter_ids_ptr, ranks_ptr, tok, L, R)
        if rank == 0:
            return
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_r = tl.arange(0, BLOCK_R)
        t_ptrs = t_ptr + pid_s.to(tl.int64) * stride_ts + tok * stride_tm + offs_r.to(tl.int64) * stride_tr
        b_ptrs = (_of_slice(pid_s, b0_ptr, b1_ptr, b2_ptr)
                  + slot.to(tl.int64) * _of_slice(pid_s, tl.cast(stride_bl0, tl.int64), tl.cast(stride_bl1, tl.int64),
                                                  tl.cast(stride_bl2, tl.int64))
                  + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :].to(tl.int64) * stride_br)
        r_hi = _rank_load_bound(rank, R)
        acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            mask_r = (r0 + offs_r) < rank
            load_r = (r0 + offs_r) < r_hi  # see _rank_load_bound: 16-byte loads, then past the rank selected away
            tt = tl.load(t_ptrs + tl.cast(r0, tl.int64) * stride_tr, mask=load_r, other=0.0)
            bt = tl.load(b_ptrs + tl.cast(r0, tl.int64) * stride_br, mask=mask_n[:, None] & load_r[None, :], other=0.0)
            acc += tl.where(mask_r[None, :], bt.to(tl.float32) * tt[None, :], 0.0)
        res = tl.sum(acc, axis=1)
        out_ptrs = out_ptr + tok * stride_om + (_of_slice(pid_s, col0, col1, col2) + offs_n).to(tl.int64) * stride_on
        res += tl.load(out_ptrs, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=mask_n)


    @triton.jit(do_not_specialize=["num_tokens"])
    def _segment_outer_kernel(
        left_ptr, right_ptr, out_ptr,
        sorted_ids_ptr, slot_counts_ptr, slot_starts_ptr,
        num_tokens, P, Q,
        stride_lm, stride_lp, stride_rm, stride_rq, stride_ol, stride_op, stride_oq,
        BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    ):
        """Per-slot gradient sums of the grouped backward: out[slot] = sum over the slot's tokens t of
        outer(left[t], right[t]) in fp32 (dA = uᵀ·x, dB = sᵀ·dy for each adapter). Grid (cdiv(P, BLOCK_P),
        cdiv(Q, BLOCK_Q), L): a program walks its slot's tokens in tiles gathered through sorted_token_ids, so the
        work is M·P·Q in all (not L times that) and no other slot's token is ever loaded (a NaN token stays in its
        slot's gradient). Every program stores its tile: an empty slot gets zeros."""
        pid_p = tl.program_id(0)
        pid_q = tl.program_id(1)
        slot = tl.program_id(2)
        start, count = _slot_range(slot_starts_ptr, slot_counts_ptr, slot, num_tokens)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_t = tl.arange(0, BLOCK_T)
        mask_p = offs_p < P
        mask_q = offs_q < Q
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
        for t0 in range(0, count, BLOCK_T):
            tok, mask_t = _slot_tokens(sorted_ids_ptr, start, count, t0 + offs_t, num_tokens)
            lt = tl.load(left_ptr + tok[None, :] * stride_lm + offs_p[:, None].to(tl.int64) * stride_lp,
                         mask=mask_p[:, None] & mask_t[None, :], other=0.0)  # leftᵀ tile [BLOCK_P, BLOCK_T]
            rt = tl.load(right_ptr + tok[:, None] * stride_rm + offs_q[None, :].to(tl.int64) * stride_rq,
                         mask=mask_t[:, None] & mask_q[None, :], other=0.0)  # [BLOCK_T, BLOCK_Q]
            if rt.dtype == tl.float16:
                # fp32 left in tf32 (see _sgmv_expand_kernel): u = s·dY·B passes fp16's 65504 where dA does not
                acc = _mma_tf32(lt, rt.to(tl.float32), acc)
            else:
                # bf16 right: left rounded to bf16 for the tensor cores; fp32: tf32x3 (see _mma)
                acc = _mma(lt.to(rt.dtype), rt, acc)
        out_ptrs = (out_ptr + slot.to(tl.int64) * stride_ol + offs_p[:, None].to(tl.int64) * stride_op
                    + offs_q[None, :].to(tl.int64) * stride_oq)
        tl.store(out_ptrs, acc, mask=mask_p[:, None] & mask_q[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Configuration


def _config(name, dtype=None):
    """The block sizes of one kernel path; a "<name>_fp32" entry, where there is one, for fp32 inputs."""
    table = GPU_CONFIG if USE_GPU_CONFIG else INTERP_CONFIG
    if dtype == torch.float32 and f"{name}_fp32" in table:
        return table[f"{name}_fp32"]
    return table[name]


def _rank_tile(rank, tiles):
    """The rank tile of the shrink prefill (SHRINK_PREFILL_BLOCK_R) and segment-outer (SEGMENT_OUTER_BLOCK_P)
    kernels: tiles[0] up to that rank, else tiles[1]; always tiles[0] under the interpreter's small configs."""
    return tiles[0] if rank <= tiles[0] or not USE_GPU_CONFIG else tiles[1]


def _split_k(device, num_tiles, K, block_k, deterministic):
    """How many K splits: enough programs to fill the GPU; 1 (no atomics) in deterministic mode, asked for by the
    call or globally by torch.use_deterministic_algorithms(True) (the only way through multi_lora_linear)."""
    if deterministic or torch.are_deterministic_algorithms_enabled():
        return 1
    max_useful = max(1, cdiv(K, block_k * MIN_K_BLOCKS_PER_SPLIT))
    if INTERPRET or device.type != "cuda":
        return min(INTERP_SPLIT_K, max(1, cdiv(K, block_k)))
    want = max(1, (SPLIT_K_PROGRAMS_PER_SM * sm_count(device)) // max(1, num_tiles))
    return max(1, min(want, MAX_SPLIT_K, max_useful))


def _k_splits(device, num_tiles, K, block_k, deterministic):
    """(split_k, k_per_split): _split_k's count of K splits, each split whole BLOCK_K blocks, recounted so that none
    is empty."""
    split_k = _split_k(device, num_tiles, K, block_k, deterministic)
    k_per_split = cdiv(cdiv(K, split_k), block_k) * block_k
    return cdiv(K, k_per_split), k_per_split


def choose_path(num_tokens, num_slots, path="auto"):
    """'decode' or 'prefill' for a batch of num_tokens tokens over num_slots slots (from shapes only: no sync)."""
    if path not in ("auto", "prefill", "decode"):
        raise ValueError(f"path expected 'auto', 'prefill' or 'decode', got {path!r}")
    if path != "auto":
        return path
    if num_tokens <= DECODE_MAX_TOKENS or num_tokens <= DECODE_MAX_TOKENS_PER_SLOT * num_slots:
        return "decode"
    return "prefill"


# ----------------------------------------------------------------------------------------------------------------
# Launch (inputs already checked): through the custom ops below when traced, called directly when eager (through_op)


def _slice_groups(keys):
    """The slices of each launch: runs of consecutive slices of one key, SLICES_PER_LAUNCH at most. keys[s]: slice
    s's strides that a launch shares (one per kernel argument), and which of its own arguments are multiples of 16
    (pointers: addresses). Triton specialises each argument on that (it lets a kernel access memory 16 bytes at a
    time), and a value chosen at run time (_of_slice) keeps only what every slice of its launch has: one odd width
    among multiples of 16 would make every slice's accesses narrow, where a launch of its own keeps the others
    wide."""
    groups, first = [], 0
    for end in range(1, len(keys) + 1):
        if end == len(keys) or keys[end] != keys[first] or end - first == SLICES_PER_LAUNCH:
            groups.append(range(first, end))
            first = end
    return groups


def _aligned(*values):
    """Whether each value (an int, or a tensor's address) is a multiple of 16, as Triton specialises on it."""
    return tuple((v.data_ptr() if isinstance(v, torch.Tensor) else v) % 16 == 0 for v in values)


def _per_slice(values, group):
    """The kernel arguments of a group's slices, the first repeated into the unused places (never read)."""
    chosen = [values[j] for j in group]
    return chosen + chosen[:1] * (SLICES_PER_LAUNCH - len(chosen))


@one_launch_at_a_time
@on_tensor_device
def _launch_shrink(x, lora_a, adapter_ids, sorted_token_ids, slot_counts, slot_starts, scalings, ranks, out,
                   deterministic, path):
    """lora_a: S tensors [L, R, K] of one dtype (any strides); out: [S, M, R], or [M, R] for S = 1."""
    out3 = out if out.dim() == 3 else out.unsqueeze(0)
    L, R, K = lora_a[0].shape
    M = x.shape[0]
    if M == 0 or R == 0:
        return
    if K == 0:
        out3.zero_()
        return
    decode = choose_path(M, L, path) == "decode"
    cfg = _config("shrink_decode") if decode else _config("shrink_prefill", x.dtype)
    block_k = cfg["BLOCK_K"]
    block_r = cfg["BLOCK_R"] if decode else _rank_tile(R, SHRINK_PREFILL_BLOCK_R)
    num_r_tiles = cdiv(R, block_r)
    if not decode:
        out3.zero_()  # rows of -1 tokens, columns past a rank, and the atomics' start
    for group in _slice_groups([(a.stride(), _aligned(a)) for a in lora_a]):
        slices = len(group)
        out_group = out3[group.start:group.stop]
        stride_al, stride_ar, stride_ak = lora_a[group.start].stride()
        if decode:
            split_k, k_per_split = _k_splits(x.device, M * slices * num_r_tiles, K, block_k, deterministic)
            if split_k > 1:
                out_group.zero_()
            _bgmv_shrink_kernel[(M, slices * num_r_tiles, split_k)](
                x, *_per_slice(lora_a, group), out_group, adapter_ids, scalings, ranks,
                K, R, L,
                x.stride(0), x.stride(1),
                stride_al, stride_ar, stride_ak,
                out_group.stride(0), out_group.stride(1), out_group.stride(2),
                num_r_tiles, k_per_split,
                BLOCK_R=block_r, BLOCK_K=block_k, USE_ATOMIC=split_k > 1,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION,
            )
            continue
        block_m = cfg["BLOCK_M"]
        num_m_tiles = cdiv(M, block_m)
        # Token tiles that can be active: each slot's partial last tile adds at most one to M / BLOCK_M.
        active_tiles = (num_m_tiles + min(L, M)) * slices * num_r_tiles
        split_k, k_per_split = _k_splits(x.device, active_tiles, K, block_k, deterministic)
        _sgmv_shrink_kernel[(num_m_tiles, slices * num_r_tiles * split_k, L)](
            x, *_per_slice(lora_a, group), out_group, sorted_token_ids, slot_counts, slot_starts, scalings, ranks,
            M, K, R,
            x.stride(0), x.stride(1),
            stride_al, stride_ar, stride_ak,
            out_group.stride(0), out_group.stride(1), out_group.stride(2),
            num_r_tiles, split_k, k_per_split,
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, USE_ATOMIC=split_k > 1,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION,
        )


@one_launch_at_a_time
@on_tensor_device
def _launch_expand(t, lora_b, adapter_ids, sorted_token_ids, slot_counts, slot_starts, ranks, out, first_columns,
                   path):
    """lora_b: S tensors [L, N_s, R] of one dtype (any strides), slice s added into columns first_columns[s] ...
    + N_s - 1 of out; t: [S, M, R], or [M, R] for S = 1."""
    t3 = t if t.dim() == 3 else t.unsqueeze(0)
    L, _, R = lora_b[0].shape
    M = t3.shape[1]
    widths = [b.shape[1] for b in lora_b]
    if M == 0 or max(widths) == 0:
        return
    slot_strides = [b.stride(0) for b in lora_b]
    decode = choose_path(M, L, path) == "decode"
    cfg = _config("expand_decode" if decode else "expand_prefill")
    for group in _slice_groups([(b.stride()[1:], _aligned(b, width, column, slot_stride)) for b, width, column,
                                slot_stride in zip(lora_b, widths, first_columns, slot_strides)]):
        t_group = t3[group.start:group.stop]
        stride_bn, stride_br = lora_b[group.start].stride()[1:]
        num_n_tiles = cdiv(max(widths[j] for j in group), cfg["BLOCK_N"])
        if num_n_tiles == 0:
            continue
        widths_and_columns = (*_per_slice(widths, group), *_per_slice(first_columns, group))
        strides = (t_group.stride(0), t_group.stride(1), t_group.stride(2),
                   *_per_slice(slot_strides, group), stride_bn, stride_br,
                   out.stride(0), out.stride(1))
        if decode:
            _bgmv_expand_kernel[(M, len(group) * num_n_tiles)](
                t_group, *_per_slice(lora_b, group), out, adapter_ids, ranks,
                R, L, *widths_and_columns, *strides, num_n_tiles,
                BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION,
            )
            continue
        _sgmv_expand_kernel[(cdiv(M, cfg["BLOCK_M"]), len(group) * num_n_tiles, L)](
            t_group, *_per_slice(lora_b, group), out, sorted_token_ids, slot_counts, slot_starts, ranks,
            M, R, *widths_and_columns, *strides, num_n_tiles,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION,
        )


# Checks of the custom ops' arguments. Eager calls through lora_kernels.ops launch directly after its checks; the
# custom ops run in compiled graphs and exported programs (whose lk.ops checks compare symbolic sizes) and for callers
# of torch.ops.lora_kernels_triton.*. There the kernels, which index the metadata vectors as plain arrays, would read
# a sorted_token_ids shorter than the tokens, or write columns past out's, out of bounds: these checks refuse what
# would (shapes, dtypes, devices, contiguity), before the launch. Values are not checked (they are clamped on the
# device, see the module docstring); neither is memory shared between out and an input (lk.ops refuses that). Host
# time: about 10 us per call with 3 slices (this project's 2-core CPU machine), beside the dispatcher's ~30 us; a
# CUDA graph's replay pays neither.


def _refuse(op, error, message):
    raise error(f"{op}: {message}")


def _check_vector(op, name, vector, length, what, device, dtype=torch.int32):
    if vector.dim() != 1 or vector.shape[0] != length:
        _refuse(op, ValueError, f"{name} expected shape [{length}] ({what}), got {list(vector.shape)}")
    if vector.dtype != dtype:
        _refuse(op, TypeError, f"{name} expected dtype {dtype}, got {vector.dtype}")
    if vector.device != device:
        _refuse(op, ValueError, f"{name} expected device {device}, got {vector.device}")
    if not vector.is_contiguous():
        _refuse(op, ValueError, f"{name} expected a contiguous tensor, got strides {vector.stride()}")


def _check_metadata(op, device, num_tokens, tokens, num_slots, slots, sorted_token_ids, slot_counts, slot_starts,
                    ranks=None, adapter_ids=None):
    """tokens and slots: where num_tokens and num_slots come from, for the messages."""
    _check_vector(op, "sorted_token_ids", sorted_token_ids, num_tokens, tokens, device)
    _check_vector(op, "slot_counts", slot_counts, num_slots, slots, device)
    _check_vector(op, "slot_starts", slot_starts, num_slots, slots, device)
    if ranks is not None:
        _check_vector(op, "ranks", ranks, num_slots, slots, device)
    if adapter_ids is not None:
        _check_vector(op, "adapter_ids", adapter_ids, num_tokens, tokens, device)


def _check_slices(op, name, slices, first_shape, dtypes, device, width_dim):
    """slices: a list of 3-D weights, the first of first_shape (None: any size), the others of its dtype and its
    shape but in width_dim (None: no dim may differ)."""
    if not slices:
        _refuse(op, ValueError, f"{name} expected at least one tensor, got an empty list")
    check_tensor(op, f"{name}[0]", slices[0], first_shape, dtypes, device)
    shape = list(slices[0].shape)
    if width_dim is not None:
        shape[width_dim] = None
    for index, weights in enumerate(slices[1:], 1):
        check_tensor(op, f"{name}[{index}]", weights, shape, (slices[0].dtype,), device)


def _check_shrink(x, lora_a, adapter_ids, sorted_token_ids, slot_counts, slot_starts, scalings, ranks, out):
    op = "lora_kernels_triton::sgmv_shrink"
    check_tensor(op, "x", x, (None, None), SUPPORTED_DTYPES, x.device)
    M, K = x.shape
    _check_slices(op, "lora_a", lora_a, (None, None, K), (x.dtype,), x.device, width_dim=None)
    L, R = lora_a[0].shape[:2]
    check_tensor(op, "out", out, (M, R) if len(lora_a) == 1 and out.dim() == 2 else (len(lora_a), M, R),
                  (torch.float32,), x.device)
    slots = "adapter slots = lora_a[0].shape[0]"
    _check_metadata(op, x.device, M, "tokens = x.shape[0]", L, slots, sorted_token_ids, slot_counts, slot_starts,
                    ranks, adapter_ids)
    _check_vector(op, "scalings", scalings, L, slots, x.device, torch.float32)


def _check_expand(t, lora_b, adapter_ids, sorted_token_ids, slot_counts, slot_starts, ranks, out, first_columns):
    op = "lora_kernels_triton::sgmv_expand"
    _check_slices(op, "lora_b", lora_b, (None, None, None), SUPPORTED_DTYPES, t.device, width_dim=1)
    slices, R = len(lora_b), lora_b[0].shape[2]
    check_tensor(op, "t", t, (None, R) if slices == 1 and t.dim() == 2 else (slices, None, R), (torch.float32,),
                  t.device)
    M = t.shape[-2]
    check_tensor(op, "out", out, (M, None), SUPPORTED_DTYPES, t.device)
    if len(first_columns) != slices:
        _refuse(op, ValueError, f"first_columns expected {slices} entries (one per lora_b slice), got "
                                f"{len(first_columns)}")
    for index, (column, weights) in enumerate(zip(first_columns, lora_b)):
        if not 0 <= column <= out.shape[1] - weights.shape[1]:
            _refuse(op, ValueError, f"first_columns[{index}] expected in [0, out.shape[1] - lora_b[{index}].shape[1]]"
                                    f" = [0, {out.shape[1] - weights.shape[1]}], got {column}")
    _check_metadata(op, t.device, M, "tokens = t.shape[-2]", lora_b[0].shape[0], "adapter slots = lora_b[0].shape[0]",
                    sorted_token_ids, slot_counts, slot_starts, ranks, adapter_ids)


def _check_segment_outer(left, right, sorted_token_ids, slot_counts, slot_starts, out):
    op = "lora_kernels_triton::segment_outer"
    check_tensor(op, "left", left, (None, None), (torch.float32,), left.device)
    check_tensor(op, "right", right, (left.shape[0], None), SUPPORTED_DTYPES, left.device)
    check_tensor(op, "out", out, (None, left.shape[1], right.shape[1]), (torch.float32,), left.device)
    _check_metadata(op, left.device, left.shape[0], "tokens = left.shape[0]", out.shape[0],
                    "adapter slots = out.shape[0]", sorted_token_ids, slot_counts, slot_starts)


@torch.library.custom_op("lora_kernels_triton::sgmv_shrink", mutates_args=("out",))
def _sgmv_shrink_op(x: torch.Tensor, lora_a: list[torch.Tensor], adapter_ids: torch.Tensor,
                    sorted_token_ids: torch.Tensor, slot_counts: torch.Tensor, slot_starts: torch.Tensor,
                    scalings: torch.Tensor, ranks: torch.Tensor, out: torch.Tensor, deterministic: bool,
                    path: str) -> None:
    _check_shrink(x, lora_a, adapter_ids, sorted_token_ids, slot_counts, slot_starts, scalings, ranks, out)
    _launch_shrink(x, lora_a, adapter_ids, sorted_token_ids, slot_counts, slot_starts, scalings, ranks, out,
                   deterministic, path)


@_sgmv_shrink_op.register_fake
def _(x, lora_a, adapter_ids, sorted_token_ids, slot_counts, slot_starts, scalings, ranks, out, deterministic, path):
    # the launchers' device check (see check_devices): one meta tensor among real ones sends a call here
    check_devices("lora_kernels_triton::sgmv_shrink", "x", x, lora_a=lora_a, adapter_ids=adapter_ids,
                  sorted_token_ids=sorted_token_ids, slot_counts=slot_counts, slot_starts=slot_starts,
                  scalings=scalings, ranks=ranks, out=out)


@torch.library.custom_op("lora_kernels_triton::sgmv_expand", mutates_args=("out",))
def _sgmv_expand_op(t: torch.Tensor, lora_b: list[torch.Tensor], adapter_ids: torch.Tensor,
                    sorted_token_ids: torch.Tensor, slot_counts: torch.Tensor, slot_starts: torch.Tensor,
                    ranks: torch.Tensor, out: torch.Tensor, first_columns: list[int], path: str) -> None:
    _check_expand(t, lora_b, adapter_ids, sorted_token_ids, slot_counts, slot_starts, ranks, out, first_columns)
    _launch_expand(t, lora_b, adapter_ids, sorted_token_ids, slot_counts, slot_starts, ranks, out, first_columns,
                   path)


@_sgmv_expand_op.register_fake
def _(t, lora_b, adapter_ids, sorted_token_ids, slot_counts, slot_starts, ranks, out, first_columns, path):
    check_devices("lora_kernels_triton::sgmv_expand", "t", t, lora_b=lora_b, adapter_ids=adapter_ids,
                  sorted_token_ids=sorted_token_ids, slot_counts=slot_counts, slot_starts=slot_starts, ranks=ranks,
                  out=out)


@one_launch_at_a_time
@on_tensor_device
def _launch_segment_outer(left, right, sorted_token_ids, slot_counts, slot_starts, out):
    L, P, Q = out.shape
    if out.numel() == 0:
        return
    cfg = _config("segment_outer")
    block_p = _rank_tile(P, SEGMENT_OUTER_BLOCK_P)
    _segment_outer_kernel[(cdiv(P, block_p), cdiv(Q, cfg["BLOCK_Q"]), L)](
        left, right, out, sorted_token_ids, slot_counts, slot_starts,
        left.shape[0], P, Q,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1), out.stride(0), out.stride(1),
        out.stride(2),
        BLOCK_T=cfg["BLOCK_T"], BLOCK_P=block_p, BLOCK_Q=cfg["BLOCK_Q"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION,
    )


@torch.library.custom_op("lora_kernels_triton::segment_outer", mutates_args=("out",))
def _segment_outer_op(left: torch.Tensor, right: torch.Tensor, sorted_token_ids: torch.Tensor,
                      slot_counts: torch.Tensor, slot_starts: torch.Tensor, out: torch.Tensor) -> None:
    _check_segment_outer(left, right, sorted_token_ids, slot_counts, slot_starts, out)
    _launch_segment_outer(left, right, sorted_token_ids, slot_counts, slot_starts, out)


@_segment_outer_op.register_fake
def _(left, right, sorted_token_ids, slot_counts, slot_starts, out):
    check_devices("lora_kernels_triton::segment_outer", "left", left, right=right, sorted_token_ids=sorted_token_ids,
                  slot_counts=slot_counts, slot_starts=slot_starts, out=out)


# Autograd kernels of the three ops. They write into `out` and return nothing, so custom_op's own Autograd kernel has
# no output to hang a gradient (or its absence) on: an exported program (which keeps these ops, not the autograd
# Functions around them) trained without the LoRA term, silently. In grad mode they refuse inputs that require grad,
# as the C++ sgmv_expand does; multi_lora_linear's Functions call them with grad mode off.
_AUTOGRAD = torch.library.Library("lora_kernels_triton", "FRAGMENT")


def _refuse_grad_inputs(op_name, inputs, adds_into_out):
    op = getattr(torch.ops.lora_kernels_triton, op_name).default
    names = [argument.name for argument in op._schema.arguments]

    def kernel(keyset, *args, **kwargs):
        if torch.is_grad_enabled():
            values = {**dict(zip(names, args)), **kwargs}
            needing = next((name for name in inputs if any(  # lora_a and lora_b are lists of tensors
                t.requires_grad for t in (values[name] if isinstance(values[name], list) else [values[name]]))), None)
            if needing is not None:
                raise RuntimeError(f"lora_kernels_triton::{op_name} is not differentiable, but {needing} requires "
                                   f"grad: call lora_kernels.multi_lora_linear (autograd) or this op under "
                                   f"torch.no_grad()")
            # out: a leaf that requires grad, or a view of one, was written (torch's own in-place ops refuse both).
            # A graph node keeps its gradient where the op adds a constant (to autograd) into it, not where it
            # overwrites it.
            out = values["out"]
            leaf_view = out._base is not None and out._base.is_leaf
            if out.requires_grad and (out.is_leaf or leaf_view or not adds_into_out):
                what = "leaf " if out.is_leaf else "view of a leaf " if leaf_view else ""
                raise RuntimeError(f"lora_kernels_triton::{op_name}: out is a {what}tensor "
                                   f"that requires grad, which this op {'adds into' if adds_into_out else 'overwrites'}"
                                   f" in place without a derivative: pass one that does not require grad, or call "
                                   f"this op under torch.no_grad()")
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args, **kwargs)

    _AUTOGRAD.impl(op_name, kernel, "Autograd", with_keyset=True, allow_override=True)  # custom_op's own


_refuse_grad_inputs("sgmv_shrink", ("x", "lora_a", "scalings"), adds_into_out=False)
_refuse_grad_inputs("sgmv_expand", ("t", "lora_b"), adds_into_out=True)
_refuse_grad_inputs("segment_outer", ("left", "right"), adds_into_out=False)


# ----------------------------------------------------------------------------------------------------------------
# Public launchers


def as_slices(weights):
    """[L, a, b] -> [it]; [S, L, a, b] or a list of [L, a, b] -> a list of S."""
    if isinstance(weights, torch.Tensor):
        return [weights] if weights.dim() == 3 else list(weights.unbind(0))
    return list(weights)


def shrink(x, lora_a, batch, scalings, ranks, *, deterministic=False, out=None, path="auto"):
    """out[t, :ranks[i]] = scalings[i] * lora_a[i, :ranks[i]] @ x[t] for i = batch.adapter_ids[t] >= 0; 0 elsewhere.

    x: [M, K] (fp32/fp16/bf16, any strides); lora_a: [L, R, K] of x's dtype (any strides), or S slices of it as one
    [S, L, R, K] or a list of S [L, R, K] (any strides), up to SLICES_PER_LAUNCH per launch; batch:
    LoRABatch of M tokens over L slots; scalings: [L] fp32; ranks: [L] int32, in [0, R]. out: optional [M, R]
    ([S, M, R]) fp32 to write into (no allocation). Returns out (fp32).
    deterministic: no split-K atomics, so repeats are bit-identical. path: 'auto' | 'prefill' | 'decode'.
    Arguments are not checked: lora_kernels.ops (lora_shrink, add_lora) checks them (the checks cost more host time
    than the launch)."""
    slices = as_slices(lora_a)
    if out is None:
        leading = () if isinstance(lora_a, torch.Tensor) and lora_a.dim() == 3 else (len(slices),)
        out = torch.empty((*leading, x.shape[0], slices[0].shape[1]), dtype=torch.float32, device=x.device)
    traced = through_op(x)
    run = torch.ops.lora_kernels_triton.sgmv_shrink if traced else _launch_shrink
    run(x, slices, batch.adapter_ids, batch.sorted_token_ids, batch.slot_counts, batch.slot_starts, scalings, ranks,
        out, bool(deterministic), path)
    # The dispatcher bumps a custom op's mutated argument; a direct launch must, or autograd would not see the write
    if not traced:
        torch.autograd.graph.increment_version(out)
    return out


def expand(t, lora_b, batch, ranks, out, slice_offset=0, *, path="auto"):
    """out[t, off:off+N] += lora_b[i, :, :ranks[i]] @ t[t, :ranks[i]] for i = batch.adapter_ids[t] >= 0, in place.

    t: [M, R] fp32 (the shrink output); lora_b: [L, N, R] (fp32/fp16/bf16, any strides); out: [M, N_total] of any
    of those dtypes, N_total >= slice_offset + N. With t [S, M, R] and S slices of B, as one [S, L, N, R] or a list
    of S [L, N_s, R] (any widths and strides, one dtype), slice s goes to the columns after slice s - 1's (slice 0's
    from slice_offset), up to SLICES_PER_LAUNCH slices per launch (see _slice_groups). The sum is accumulated in fp32;
    out is read once and written once. Returns out. Arguments are not checked (see shrink)."""
    slices = as_slices(lora_b)
    first_columns = [slice_offset]
    for weights in slices[:-1]:
        first_columns.append(first_columns[-1] + weights.shape[1])
    traced = through_op(t)
    run = torch.ops.lora_kernels_triton.sgmv_expand if traced else _launch_expand
    run(t, slices, batch.adapter_ids, batch.sorted_token_ids, batch.slot_counts, batch.slot_starts, ranks, out,
        first_columns, path)
    if not traced:
        torch.autograd.graph.increment_version(out)  # see shrink
    return out


def segment_outer_sum(left, right, batch):
    """[L, P, Q] fp32 with out[i] = sum over the tokens t of slot i of outer(left[t], right[t]): the per-adapter
    gradients of the grouped backward (left [M, P] fp32, right [M, Q] fp32/fp16/bf16, batch: LoRABatch of the M
    tokens over L slots; -1 tokens count nowhere). Arguments are not checked (multi_lora_linear's backward)."""
    out = torch.empty((batch.num_adapters, left.shape[1], right.shape[1]), dtype=torch.float32, device=right.device)
    run = torch.ops.lora_kernels_triton.segment_outer if through_op(right) else _launch_segment_outer
    run(left, right, batch.sorted_token_ids, batch.slot_counts, batch.slot_starts, out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile gate (lora_kernels/triton/aot.py compiles these for sm_80 and sm_90)


def _sig(kernel, pointer_types):
    """Signature dict of `kernel`: pointers from pointer_types, constexprs marked, every other argument (sizes,
    strides) i32."""
    sig = {}
    # From the Python signature: works for a JITFunction and for the interpreter's InterpretedFunction alike.
    for name, param in inspect.signature(kernel.fn).parameters.items():
        if name in pointer_types:
            sig[name] = pointer_types[name]
        elif param.annotation is tl.constexpr or "constexpr" in str(param.annotation):
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    return sig


# Unit inner strides of contiguous operands: Triton specialises an int argument equal to 1 to constexpr 1 at run
# time, so a contiguous row is known contiguous and its loads can be vectorised; the gate compiles that variant.
_INNER_STRIDES = {
    "_sgmv_shrink_kernel": ("stride_xk", "stride_ak", "stride_or"),
    "_bgmv_shrink_kernel": ("stride_xk", "stride_ak", "stride_or"),
    "_sgmv_expand_kernel": ("stride_tr", "stride_br", "stride_on"),
    "_bgmv_expand_kernel": ("stride_tr", "stride_br", "stride_on"),
    "_segment_outer_kernel": ("stride_lp", "stride_rq", "stride_oq"),
}
# Tile and split counts: not sizes, so not marked 16-divisible (num_r_tiles and split_k are often 1, then constexpr).
_NOT_SIZE_ARGS = {"num_r_tiles", "num_n_tiles", "split_k", "num_tokens"}  # num_tokens: do_not_specialize


def _spec(name, kernel, pointer_types, config, contiguous=True, **constexprs):
    """One compile-gate entry: `kernel` with the pointer types given, the block sizes of GPU_CONFIG[config] that
    it takes plus `constexprs`; kernels with a tl.dot must compile to tensor-core instructions. contiguous=True:
    sizes and strides specialised as Triton does at run time for contiguous operands whose sizes are multiples of 16
    (e.g. K = N = 4096, R = 16 or 64): unit inner strides constexpr 1, every other size and stride marked divisible
    by 16 (tile counts such as num_r_tiles, often 1 and then constexpr at run time, stay plain ints). False: every
    int plain, as strided operands or odd sizes (K = 2049, R = 10) launch it."""
    cfg = GPU_CONFIG[config]
    blocks = {key: value for key, value in cfg.items() if key.startswith("BLOCK_")}
    inner = {stride: 1 for stride in _INNER_STRIDES[kernel.fn.__name__]} if contiguous else {}
    signature = _sig(kernel, pointer_types)
    for stride in inner:
        signature[stride] = "constexpr"
    divisible = [arg for arg, kind in signature.items() if kind == "i32" and arg not in _NOT_SIZE_ARGS]
    return {"name": name, "kernel": kernel, "signature": signature,
            "constexprs": {**blocks, **inner, **constexprs}, "num_warps": cfg["num_warps"],
            "num_stages": cfg["num_stages"], "divisible_by_16": divisible if contiguous else [],
            "tensor_cores": kernel in (_sgmv_shrink_kernel, _sgmv_expand_kernel, _segment_outer_kernel)}


def aot_specs():
    """Compile-gate entries: every kernel x dtype x constexpr config the launchers use on a GPU."""
    if not HAS_TRITON:
        return []
    specs = []
    ints = {"sorted_ids_ptr": "*i32", "slot_counts_ptr": "*i32", "slot_starts_ptr": "*i32", "ranks_ptr": "*i32",
            "adapter_ids_ptr": "*i32", "scalings_ptr": "*fp32"}
    for dtype in SUPPORTED_DTYPES:
        name = TRITON_DTYPE_NAMES[dtype]
        shrink_ptrs = {"x_ptr": "*" + name, **{f"a{s}_ptr": "*" + name for s in range(SLICES_PER_LAUNCH)},
                       "out_ptr": "*fp32", **ints}
        for use_atomic in (False, True):
            prefill = "shrink_prefill_fp32" if dtype == torch.float32 else "shrink_prefill"
            for block_r in SHRINK_PREFILL_BLOCK_R:
                specs.append(_spec(f"_sgmv_shrink_kernel[{name},R{block_r},atomic={use_atomic}]", _sgmv_shrink_kernel,
                                   shrink_ptrs, prefill, BLOCK_R=block_r, USE_ATOMIC=use_atomic))
            specs.append(_spec(f"_bgmv_shrink_kernel[{name},atomic={use_atomic}]", _bgmv_shrink_kernel, shrink_ptrs,
                               "shrink_decode", USE_ATOMIC=use_atomic))
        # Per-slot gradient sums: fp32 left (u or s) against right (x or dy) of this dtype, both P tiles.
        segment_ptrs = {"left_ptr": "*fp32", "right_ptr": "*" + name, "out_ptr": "*fp32", **ints}
        for block_p in SEGMENT_OUTER_BLOCK_P:
            specs.append(_spec(f"_segment_outer_kernel[{name},P{block_p}]", _segment_outer_kernel, segment_ptrs,
                               "segment_outer", BLOCK_P=block_p))
    # Expand: B in each dtype with out of B's dtype, plus fp32 out for 16-bit B (fp32 accumulators, gradients).
    for b_dtype in SUPPORTED_DTYPES:
        for out_dtype in dict.fromkeys((b_dtype, torch.float32)):
            b_ptrs = {f"b{s}_ptr": "*" + TRITON_DTYPE_NAMES[b_dtype] for s in range(SLICES_PER_LAUNCH)}
            ptrs = {"t_ptr": "*fp32", **b_ptrs, "out_ptr": "*" + TRITON_DTYPE_NAMES[out_dtype], **ints}
            tag = f"{TRITON_DTYPE_NAMES[b_dtype]}->{TRITON_DTYPE_NAMES[out_dtype]}"
            specs.append(_spec(f"_sgmv_expand_kernel[{tag}]", _sgmv_expand_kernel, ptrs, "expand_prefill"))
            specs.append(_spec(f"_bgmv_expand_kernel[{tag}]", _bgmv_expand_kernel, ptrs, "expand_decode"))
    # The general variant of each kernel (strided operands, sizes not multiples of 16), in bf16.
    bf16_ptrs = {"x_ptr": "*bf16", "out_ptr": "*fp32", "left_ptr": "*fp32", "right_ptr": "*bf16", "t_ptr": "*fp32",
                 **{f"{ab}{s}_ptr": "*bf16" for ab in "ab" for s in range(SLICES_PER_LAUNCH)}, **ints}
    for kernel, config, flags in ((_sgmv_shrink_kernel, "shrink_prefill", dict(BLOCK_R=SHRINK_PREFILL_BLOCK_R[0],
                                                                                USE_ATOMIC=True)),
                                  (_bgmv_shrink_kernel, "shrink_decode", dict(USE_ATOMIC=True)),
                                  (_segment_outer_kernel, "segment_outer", dict(BLOCK_P=SEGMENT_OUTER_BLOCK_P[0])),
                                  (_sgmv_expand_kernel, "expand_prefill", {}),
                                  (_bgmv_expand_kernel, "expand_decode", {})):
        params = inspect.signature(kernel.fn).parameters
        ptrs = {arg: kind for arg, kind in bf16_ptrs.items() if arg in params}
        specs.append(_spec(f"{kernel.fn.__name__}[bf16,strided]", kernel, ptrs, config, contiguous=False, **flags))
        if "stride_bl1" in params:
            # a slot stride past 2^31 is an i64 argument among i32 ones; _of_slice needs one type (the interpreter,
            # which does not type its values, ran such a kernel that a GPU would have failed to compile)
            wide = _spec(f"{kernel.fn.__name__}[bf16,i64 slot stride]", kernel, ptrs, config, contiguous=False)
            wide["signature"]["stride_bl1"] = "i64"
            specs.append(wide)
    return specs
