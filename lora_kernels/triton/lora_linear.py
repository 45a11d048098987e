"""Fused single-adapter LoRA linear in Triton (design.md §2): the forward and the three A/B-only backward kernels,
their launchers (check, then run the kernels: eagerly directly, under torch.compile through the opaque custom ops
lora_kernels::triton_lora_* registered on the same checks and bodies), and the AOT compile-gate specs.

    s  = drop(x) · Aᵀ                         _lora_shrink_kernel   (dropout fused, s stored fp32, unscaled)
    y  = x · Wᵀ + scaling · s · Bᵀ + bias     _lora_fwd_kernel      (base GEMM and expand in one accumulator;
                                              _lora_fwd_tma_kernel: the same with TMA loads, opt-in, sm_90+)
    dB = scaling · dyᵀ · s,  ds = scaling · dy · B                  _lora_bwd_dy_kernel   (one read of dy)
    dX = dy · W + drop'(ds · A)               _lora_bwd_dx_kernel   (base GEMM and LoRA term, one kernel;
                                              _lora_bwd_dx_tma_kernel: the same with TMA loads, opt-in, sm_90+)
    dA = dsᵀ · drop(x)                        _lora_bwd_da_kernel

Dropout is never stored: element (m, k) of x is kept when tl.rand(seed, m * K + k) >= p, and every kernel (and
`dropout_mask`, for tests and the torch.func path) regenerates the same decision from (seed, m * K + k).
"""

import functools
import numbers

import torch
import triton
import triton.language as tl

from lora_kernels._ext import (VMAP_DROPOUT_NEEDS_ONE_SEED, autocast_off, check_devices, is_finite_number, scaled_mm,
                               through_op)
from lora_kernels.triton import (FP_FUSION, INTERPRET, TRITON_DTYPE_NAMES, UPCAST_DOT_OPERANDS, cdiv, check_tensor,
                                 env_flag, on_tensor_device, one_launch_at_a_time, round_to_tf32, sm_count)

from triton.tools.tensor_descriptor import TensorDescriptor  # host-side TMA descriptors

# tl.dot needs every block dimension >= 16: ranks below 16 are padded up to 16 inside the kernels with masks.
MIN_DOT_DIM = 16
# Ranks are processed in chunks of at most this many columns: it bounds the registers and shared memory the LoRA
# operands take (an fp32 [128, 64] tile is 32 KiB), so every rank runs with one set of block sizes. Ranks up to 64
# (the usual 8, 16, 32, 64) are a single chunk.
MAX_BLOCK_R = 64
# fp32 _lora_bwd_dy_kernel holds [BLOCK_N, chunk] and [128, chunk] fp32 operands for its full-precision FMA dots.
# ptxas -v for the two fp32 tiles the shared-memory prune keeps: chunk 64 spilled 15-18 KB per thread on sm_90a,
# chunk 32 spilled 3.7-6.5 KB on sm_80 (0-28 bytes on sm_90a), chunk 16 at most 12 bytes on either. fp32 ranks
# above 16 therefore take chunks of 16 there: dy is read once per chunk (4 times at r = 64) instead of spilling.
DY_MAX_BLOCK_R_FP32 = 16
# Rank of the largest adapter the launchers accept: design.md asks for 1..256, serving stacks go to 512 (vLLM's
# max_lora_rank) and high-rank LoRA to 1024. The rank is looped over in chunks of MAX_BLOCK_R at run time, so larger
# ranks compile no other kernel variant; r = 512 runs in the tests (interpreter), GPU speed there is unmeasured.
MAX_RANK = 1024
# Launches where a stride that the kernels multiply by an int32 index is at least this many elements take their
# INT64 variant (see "64-bit offsets" below, and _int64_offsets). Those indices are lanes of a block (at most 256
# wide), block steps and rank indices below MAX_RANK, so below this stride no such product reaches 2**31. Contiguous
# operands bring strides 1, r and K there: they keep the int32 variant unless K passes 2**21.
INT64_STRIDE = 2**31 // MAX_RANK
# L2-friendly program order: GROUP_M row-blocks of the output are walked before moving to the next column block
# (the grouped ordering of Triton's matmul tutorial; 8 is its measured default).
GROUP_M = 8
# Configs whose pipelined operand tiles, num_stages * (rows + cols) * reduction block * element size, exceed this are
# pruned before autotuning (fp32 with the bigger tiles). Measured with the compile gate: sm_80 keeps num_stages - 1
# buffers, so it stays below the estimate and within its 163 KiB; sm_90 keeps num_stages buffers plus up to ~16 KiB
# more, which its 227 KiB absorb (fp32 shrink at the limit: 163840 B on sm_80, 212992 B on sm_90).
SMEM_BUDGET = 160 * 1024
# GPUs with less shared memory per block than sm_80's (sm_86 and sm_89 — A10, L4, L40S, RTX 30 and 40 series — have
# 99 KiB) take the budget scaled down to theirs (sm_90's, larger, keeps SMEM_BUDGET: the configs measured there), and
# where it prunes every config of a list, a smaller copy of the least one (fewer stages, then smaller blocks) instead
# of the first config: fp32 shrinks at rank chunks 32 and 64 needed 114-164 KB there, and every launch raised
# OutOfResources. SM80_SHARED_MEMORY: sm_80's opt-in shared memory per block, in bytes (aot.SHARED_MEMORY_LIMIT).
SM80_SHARED_MEMORY = 166912
# Bytes of dB partials (one [N, r] fp32 partial per DY_BLOCK_M rows) above which the backward's dY part runs as two
# GEMMs (dY read twice) instead of _lora_bwd_dy_kernel: the partials grow with M·N·r, and at M = 65536 rows,
# N = 16384, r = 64 they took 2 GiB, as much as dY itself in bf16. 256 MiB leaves every bench shape on the kernel
# (M = 16384, N = 4096, r = 64: 128 MiB).
DY_PARTIALS_BUDGET = 256 * 2**20
# The dropout_mask utility kernel (the tests' mask, and the torch.func path's: functional._dropout_as_function, no
# fast path): its tile, untuned, and its launch parameters as the compile gate compiles it (Triton's default warps;
# one stage: the kernel has no loop to pipeline).
DROPOUT_BLOCK = 32
DROPOUT_NUM_WARPS, DROPOUT_NUM_STAGES = 4, 1
# Split-K-style parallelism of the three skinny reductions whose natural grids are small: _lora_bwd_dy_kernel has one
# program per DY_BLOCK_M row block (64 at M = 8192), _lora_bwd_da_kernel one per BLOCK_K column block (64 at
# K = 4096), and _lora_shrink_kernel one per row block (1 at decode sizes, 4 at M = 256), against 132 SMs on an
# H100. The launchers split the reduced dimension (N, M, resp. K) into chunks of whole blocks, one program each, and
# sum the fp32 partials afterwards in a fixed order (deterministic, no atomics).
# Programs per SM the split aims for: these kernels stream dy / x from memory, so several resident programs per SM
# hide load latency and shorten the last wave. 4 (the top of a 2-4 range) gives 9 splits at M = 8192, K = N = 4096,
# r = 16 on 132 SMs, 576 programs each; the extra traffic is the fp32 partials, written once and read once by the
# sum: 9 x M x r x 4 B = 4.7 MB for ds (7% of dy's 67 MB) and 9 x r x K x 4 B = 2.4 MB for dA (3.5% of x's).
# Chosen from these shapes, not measured on a GPU yet.
SPLIT_PROGRAMS_PER_SM = 4
# Upper bound on the split: each split adds a partial of ds (M x r fp32) or dA (r x K fp32) to write and sum, and
# past 16 chunks the per-program share of the reduction (N or M / 16) gets short enough that the fixed per-program
# work (loading s, storing the partial) stops being negligible.
MAX_SPLIT = 16
# Under the interpreter there is no SM count: a small fixed split, so every interpreted test runs the split path
# whenever the reduced dimension has at least two blocks.
INTERPRET_SPLIT = 2
# Forces the split of all three split kernels (the forward's shrink over K, bwd_dy over N, bwd_da over M), still
# capped by the number of blocks of the split dimension; None = the heuristic. For tests and the bench's
# "split / no split" rows.
SPLIT_OVERRIDE = None


def _config(num_warps, num_stages, pre_hook=None, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages, pre_hook=pre_hook)


# Tensor-descriptor arguments of the TMA kernels and the block sizes that shape their tiles (W is [N, K] in both:
# the forward reduces over its K, dX over its N).
_DESC_BLOCKS = {"x_desc": ("BLOCK_M", "BLOCK_K"), "w_desc": ("BLOCK_N", "BLOCK_K"),
                "dy_desc": ("BLOCK_M", "BLOCK_N")}


def _set_tma_block_shapes(nargs):
    """Autotune pre-hook of the TMA kernels: the descriptors' block shapes follow the config being launched."""
    for name, (rows, cols) in _DESC_BLOCKS.items():
        if name in nargs:
            nargs[name].block_shape = [nargs[rows], nargs[cols]]


# Autotune configs. Under the interpreter one small config keeps the tests fast (autotuning is meaningless there).
# GPU configs: the usual H100/A100 bf16 GEMM tiles for K = N = 4096 (Triton matmul tutorial and persistent-matmul
# defaults), as (output rows, output cols, reduction block, num_warps, num_stages). The first of each list is the
# default: it fits every dtype within sm_80's shared memory, and aot_specs() compiles it for every dtype.
GPU_GEMM_TILES = [
    (128, 128, 32, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
]
# Forward at decode sizes (M <= DECODE_MAX_M): bound by reading W once, so it wants many programs in flight.
# At K = N = 4096 a 16 x 32 tile gives 128 column blocks (an H100 has 132 SMs) where 64 x 64 gives 64 and
# 128 x 128 gives 32; 16 rows hold every decode M in one row block. Chosen from those counts, not measured on a GPU yet.
GPU_DECODE_TILES = [
    (16, 32, 128, 4, 4),
    (16, 64, 128, 4, 4),
]
DECODE_MAX_M = 16
# Row block of _lora_bwd_dy_kernel. It is fixed, not autotuned, because it sets the number of dB partials the
# launcher allocates before the launch. 128 rows halve the partials against 64 and still keep the skinny
# [128, <=64] fp32 ds accumulator in registers.
GPU_DY_BLOCK_M = 128


def kernel_configs(gpu: bool) -> dict[str, list]:
    """Autotune configs by kernel name: the GPU lists, or (gpu=False) the interpreter's single small config each.
    The GPU lists also run under the interpreter in tests/test_triton_gpu_configs.py, block sizes as on a GPU."""
    gemm_tiles = GPU_GEMM_TILES if gpu else [(16, 32, 32, 1, 1)]
    decode_tiles = GPU_DECODE_TILES if gpu else []
    # The TMA kernels take the GEMM tiles (decode sizes stay on the pointer kernel's 16-row tiles). dx drops the
    # 128 x 256 tile: with dropout it regenerates the mask over its whole output tile, and that variant alone took
    # ~25 s of CPU to compile per target for no expected gain over 128 x 128 (dx is a plain GEMM shape).
    # Forward: output [BLOCK_M, BLOCK_N], reduction over K. dx: output [BLOCK_M, BLOCK_K], reduction over N.
    dx_tiles = [tile for tile in gemm_tiles if tile[0] * tile[1] <= 128 * 128]
    configs = {
        "_lora_fwd_kernel": [_config(w, st, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k)
                             for m, n, k, w, st in gemm_tiles + decode_tiles],
        "_lora_fwd_tma_kernel": [_config(w, st, _set_tma_block_shapes, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k)
                                 for m, n, k, w, st in gemm_tiles],
        "_lora_bwd_dx_kernel": [_config(w, st, BLOCK_M=m, BLOCK_K=n, BLOCK_N=k) for m, n, k, w, st in dx_tiles],
        "_lora_bwd_dx_tma_kernel": [_config(w, st, _set_tma_block_shapes, BLOCK_M=m, BLOCK_K=n, BLOCK_N=k)
                                    for m, n, k, w, st in dx_tiles],
    }
    if not gpu:
        return {**configs,
                "_lora_shrink_kernel": [_config(1, 1, BLOCK_M=16, BLOCK_K=32)],
                "_lora_bwd_dy_kernel": [_config(1, 1, BLOCK_N=32)],
                "_lora_bwd_da_kernel": [_config(1, 1, BLOCK_M=16, BLOCK_K=32)]}
    return {
        **configs,
        # The shrink is a skinny GEMM (N = r): memory-bound on x, so long K blocks and enough rows per program.
        "_lora_shrink_kernel": [
            _config(4, 3, BLOCK_M=64, BLOCK_K=128),
            _config(4, 4, BLOCK_M=128, BLOCK_K=64),
            _config(4, 4, BLOCK_M=32, BLOCK_K=128),
        ],
        "_lora_bwd_dy_kernel": [
            _config(8, 3, BLOCK_N=64),
            _config(8, 4, BLOCK_N=128),
            _config(4, 3, BLOCK_N=32),
        ],
        # dA owns [r, BLOCK_K] tiles and loops over its split of M (see SPLIT_PROGRAMS_PER_SM).
        "_lora_bwd_da_kernel": [
            _config(4, 3, BLOCK_M=64, BLOCK_K=64),
            _config(4, 4, BLOCK_M=128, BLOCK_K=32),
            _config(8, 3, BLOCK_M=128, BLOCK_K=64),
        ],
    }


def max_block(configs, block: str) -> int:
    """The largest `block` over a config list. The launchers size their splits before the autotuner picks a config,
    so they count blocks with the largest block of any config: then the K and N splits never exceed their blocks
    under any config, and dA's program count is the smallest any config gives. dA's split over M is capped by the
    blocks of M's bucket instead, so it may exceed M's own: the surplus splits store zeros."""
    return max(cfg.kwargs[block] for cfg in configs)


_CONFIGS = kernel_configs(gpu=not INTERPRET)
SHRINK_CONFIGS = _CONFIGS["_lora_shrink_kernel"]
GEMM_CONFIGS = _CONFIGS["_lora_fwd_kernel"]
TMA_CONFIGS = _CONFIGS["_lora_fwd_tma_kernel"]
DY_CONFIGS = _CONFIGS["_lora_bwd_dy_kernel"]
DX_CONFIGS = _CONFIGS["_lora_bwd_dx_kernel"]
TMA_DX_CONFIGS = _CONFIGS["_lora_bwd_dx_tma_kernel"]
DA_CONFIGS = _CONFIGS["_lora_bwd_da_kernel"]
DY_BLOCK_M = 16 if INTERPRET else GPU_DY_BLOCK_M
_SHRINK_MAX_BLOCK_M = max_block(SHRINK_CONFIGS, "BLOCK_M")
_SHRINK_MAX_BLOCK_K = max_block(SHRINK_CONFIGS, "BLOCK_K")
_DY_MAX_BLOCK_N = max_block(DY_CONFIGS, "BLOCK_N")
_DA_MAX_BLOCK_M = max_block(DA_CONFIGS, "BLOCK_M")
_DA_MAX_BLOCK_K = max_block(DA_CONFIGS, "BLOCK_K")


@functools.cache
def _device_shared_memory(index):
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def smem_budget(tensor):
    """SMEM_BUDGET for the device of `tensor`: scaled down on a GPU with less shared memory per block than sm_80."""
    if tensor.device.type != "cuda":
        return SMEM_BUDGET
    return min(SMEM_BUDGET, SMEM_BUDGET * _device_shared_memory(tensor.device.index) // SM80_SHARED_MEMORY)


def _prune_by_smem(row_block, col_block, inner_block, element_ptr, row_element_size=None):
    """early_config_prune: drop configs whose pipelined operand tiles overflow the device's budget (smem_budget) for
    this dtype (only fp32 with the biggest tiles). Where none fits, the first config survives on sm_80 and sm_90
    (it fits their limits: the compile gate), and a copy of the least config made to fit on smaller GPUs. _budget:
    the budget itself, for the compile gate's checks of those GPUs. row_element_size: the row operand's element
    size where it does not have element_ptr's dtype (dA's dSᵀ tile is float32 for 16-bit x too)."""

    def prune(configs, named_args, _budget=None, **kwargs):
        size = named_args[element_ptr].element_size()
        row_size = size if row_element_size is None else row_element_size
        budget = smem_budget(named_args[element_ptr]) if _budget is None else _budget

        def blocks(cfg):
            kw = cfg.kwargs
            return [kw.get(name, kwargs.get(name, 0)) for name in (row_block, col_block, inner_block)]

        def estimate(cfg):
            rows, cols, inner = blocks(cfg)
            return cfg.num_stages * (rows * row_size + cols * size) * inner

        kept = [cfg for cfg in configs if estimate(cfg) <= budget]
        if kept or budget >= SMEM_BUDGET:
            return kept or configs[:1]
        least = min(configs, key=estimate)
        fitted = triton.Config(dict(least.kwargs), num_warps=least.num_warps, num_stages=least.num_stages,
                               pre_hook=least.pre_hook)
        # fewer pipeline stages first (the same tiles), then halve the tunable blocks, reduction first
        while estimate(fitted) > budget and fitted.num_stages > 2:
            fitted.num_stages -= 1
        for name in (inner_block, row_block, col_block):
            while estimate(fitted) > budget and fitted.kwargs.get(name, 0) > MIN_DOT_DIM:
                fitted.kwargs[name] //= 2
        return [fitted]

    return prune


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
# 64-bit offsets (style rule 4). Triton passes an int argument below 2**31 as int32 and tl.arange is int32, so an
# index times a stride is an int32 product, which wraps once it reaches 2**31, long before the stride does: the
# pointer step BLOCK_K * stride_xk of a transposed x (stride_xk = M) wrapped from M = 2**31 / BLOCK_K tokens (2**24
# at BLOCK_K = 128), the lanes and step of a Conv1D's transposed W likewise from N = 2**24, A's rank rows (index
# times stride_ar = K) once r * K passed 2**31. Program ids are widened to int64 before they become offsets, always.
# The lane, step and rank products are int64 in the INT64 variant only, which a launch takes when one of the
# strides they multiply is INT64_STRIDE or more (_int64_offsets). Always in int64, they cost the contiguous path,
# where stride_wn and stride_ar are K (not a constexpr 1): ptxas -v register counts changed for 39 of the then 126
# compile-gate kernels, and two dX tiles that spill already spilled 24 and 84 bytes more. The int32 variant compiles
# to the registers, spills and load widths it had before the flag (all 126 then, ptxas -v).


@triton.jit
def _idx(offs, INT64: tl.constexpr):
    """Index offsets that multiply a stride: int64 in the INT64 variant, as they are otherwise."""
    if INT64:
        offs = offs.to(tl.int64)
    return offs


@triton.jit
def _step(BLOCK: tl.constexpr, stride, INT64: tl.constexpr):
    """The pointer step of one BLOCK along a dimension of `stride`: int64 in the INT64 variant."""
    if INT64:
        stride = tl.cast(stride, tl.int64)
    return BLOCK * stride


@triton.jit
def _dot(a, b, acc, FP32_INPUT: tl.constexpr):
    if UPCAST_DOT_OPERANDS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    if FP32_INPUT:
        # fp32 layers: tf32 missed the 1e-3 fp32 tolerance on an H100 (relative error 1.1e-3 to 1.7e-3 in y, dx and
        # dB), and tf32x3 overflowed shared memory with the larger tiles; full-precision FMA dots are slower but
        # exact to fp32. 16-bit layers keep tensor cores (their widened fp32 LoRA-term dots run in tf32).
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _tf32_operand(v, FP32_INPUT: tl.constexpr):
    """An fp32 intermediate (s, dS) about to meet a widened 16-bit operand in a 16-bit layer's tf32 dot, rounded to
    tf32 first (the tensor cores would truncate it: see round_to_tf32). fp32 layers' dots are IEEE: v as it is."""
    if FP32_INPUT:
        return v
    return round_to_tf32(v)


@triton.jit
def _gemm_loop(a_ptrs, b_ptrs, acc, offs_red, size_red, step_a, step_b, FP32_INPUT: tl.constexpr,
               EVEN: tl.constexpr, BLOCK: tl.constexpr):
    """acc += A · B over a reduction of size_red: a_ptrs points at [rows, BLOCK] tiles and b_ptrs at [BLOCK, cols]
    tiles, advanced by step_a / step_b per step. EVEN (size_red a multiple of BLOCK): loads without masks; callers
    point edge rows and columns at valid addresses (wrapped) and mask them at the store."""
    for r0 in range(0, size_red, BLOCK):
        if EVEN:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            mask = offs_red < size_red - r0
            a = tl.load(a_ptrs, mask=mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask[:, None], other=0.0)
        acc = _dot(a, b, acc, FP32_INPUT)
        a_ptrs += step_a
        b_ptrs += step_b
    return acc


@triton.jit
def _keep_mask(seed, offs_m, offs_k, K, p):
    """Dropout keep-decision of elements (offs_m, offs_k) of x [M, K]: tl.rand(seed, m * K + k) >= p.
    offs_m is int64, so m * K cannot overflow. The kernels taking `seed` leave it unspecialised
    (do_not_specialize): a new seed every step must not select another compiled binary (a multiple of 16 did)."""
    rand_offsets = offs_m[:, None] * K + offs_k[None, :]
    return tl.rand(seed, rand_offsets) >= p


@triton.jit
def _grouped_pid(pid, num_m, num_n, GROUP: tl.constexpr):
    """Program id -> (row block, column block), GROUP row blocks at a time (L2 reuse of the column operand)."""
    width = GROUP * num_n
    group = pid // width
    first_m = group * GROUP
    group_size = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    return pid_m, pid_n


@triton.jit(do_not_specialize=["m_bucket", "seed"])
def _lora_shrink_kernel(
    x_ptr, a_ptr, sp_ptr,
    M, K, R, split_k, m_bucket,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sp_part, stride_sp_m, stride_sp_r,
    p, dropout_scale, seed,
    HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """s_partial[k-split, M, R] (fp32) = drop(x[:, k-split]) · A[:, k-split]ᵀ. Grid: (row blocks, rank chunks,
    k-splits); each split reduces whole BLOCK_K blocks of K (the last may be short or empty: it stores zeros), and
    the launcher sums the partials in a fixed order. At decode and small-batch sizes the row-block grid is a handful
    of programs, each streaming all of A (and its rows of x) through one SM: latency-bound, not bandwidth-bound;
    the split spreads that stream over many SMs."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), split_k) * BLOCK_K  # whole blocks: splits never share a block
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_r = offs_r < R
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :] * stride_xk
    # Aᵀ tile [BLOCK_K, BLOCK_R]
    a_ptrs = a_ptr + offs_r[None, :] * stride_ar + (k_start + offs_k)[:, None] * stride_ak
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            # Zero the dropped elements; the uniform 1/(1-p) factor is applied once to the result (exact). x·0, not
            # 0: a dropped NaN/Inf stays NaN, as torch's dropout (x·mask), the other backends and the reference give
            # (a plain 0 left S, dA and dB finite there).
            x = tl.where(_keep_mask(seed, offs_m, offs_k + k0, K, p), x, x * 0)
        a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = _dot(x, a, acc, x_ptr.dtype.element_ty == tl.float32)
        x_ptrs += _step(BLOCK_K, stride_xk, INT64)
        a_ptrs += _step(BLOCK_K, stride_ak, INT64)
    if HAS_DROPOUT:
        acc = acc * dropout_scale
    sp_ptrs = sp_ptr + pid_s * stride_sp_part + offs_m[:, None] * stride_sp_m + offs_r[None, :] * stride_sp_r
    tl.store(sp_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["m_bucket"])
def _lora_fwd_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, R, m_bucket,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br, stride_bias,
    stride_ym, stride_yn,
    scaling,
    HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, GROUP: tl.constexpr, EVEN_K: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[M, N] = x · Wᵀ + scaling · s · Bᵀ (+ bias): the expand is extra K-steps of the same accumulator."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # The main loop loads rows and columns past the edge wrapped around (modulo M, N: valid addresses whose
    # products land only in rows and columns the store masks off), so its loads need no row or column masks, and
    # with EVEN_K (K a multiple of BLOCK_K) no masks at all: the unmasked, vectorised loads of Triton's matmul.
    x_ptrs = x_ptr + (offs_m % M)[:, None] * stride_xm + _idx(offs_k, INT64)[None, :] * stride_xk
    w_ptrs = w_ptr + (offs_n % N)[None, :] * stride_wn + _idx(offs_k, INT64)[:, None] * stride_wk  # Wᵀ tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _gemm_loop(x_ptrs, w_ptrs, acc, offs_k, K, _step(BLOCK_K, stride_xk, INT64),
                     _step(BLOCK_K, stride_wk, INT64), x_ptr.dtype.element_ty == tl.float32, EVEN_K, BLOCK_K)
    _expand_bias_store(acc, s_ptr, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, M, N, R, stride_sm, stride_sr,
                       stride_bn, stride_br, stride_bias, stride_ym, stride_yn, scaling,
                       x_ptr.dtype.element_ty == tl.float32, HAS_BIAS, BLOCK_R, INT64)


@triton.jit(do_not_specialize=["m_bucket"])
def _lora_fwd_tma_kernel(
    x_desc, w_desc, s_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, R, m_bucket,
    stride_sm, stride_sr, stride_bn, stride_br, stride_bias, stride_ym, stride_yn,
    scaling,
    HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, GROUP: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """_lora_fwd_kernel with the main loop's x and W tiles fetched by tensor descriptors (Hopper's TMA copy engine:
    one instruction per tile instead of per-thread address arithmetic and cp.async, the loads cuBLAS-class Hopper
    GEMMs use). The descriptors fill out-of-bounds rows, columns and the K tail with zeros, so the loop has no masks
    at any shape. 16-bit dtypes only; the launcher picks it (see _use_tma)."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = x_desc.load([row0, k0])
        w = w_desc.load([col0, k0])
        acc = _dot(x, w.T, acc, False)
    offs_m = row0.to(tl.int64) + tl.arange(0, BLOCK_M)
    offs_n = col0.to(tl.int64) + tl.arange(0, BLOCK_N)
    _expand_bias_store(acc, s_ptr, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, M, N, R, stride_sm, stride_sr,
                       stride_bn, stride_br, stride_bias, stride_ym, stride_yn, scaling, False, HAS_BIAS, BLOCK_R,
                       INT64)


@triton.jit
def _expand_bias_store(acc, s_ptr, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, M, N, R, stride_sm, stride_sr,
                       stride_bn, stride_br, stride_bias, stride_ym, stride_yn, scaling,
                       FP32_INPUT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
                       INT64: tl.constexpr):
    """The forward's epilogue: acc += scaling · s · Bᵀ (+ bias), stored to y with edge masks."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Expand: s is fp32, so B is widened and the dot runs in tf32 (fp32 in the interpreter); ranks past R are
    # masked to zero, which pads small ranks up to BLOCK_R >= 16.
    offs_r = tl.arange(0, BLOCK_R)
    # Not software-pipelined (num_stages=1): ranks up to 64 are one iteration, and staging fp32 [BLOCK_M, 64] and
    # [64, BLOCK_N] operands num_stages times would more than double the kernel's shared memory.
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
        mask_r = offs_r < R - r0
        rank_offs = _idx(offs_r + r0, INT64)
        s = tl.load(s_ptr + offs_m[:, None] * stride_sm + rank_offs[None, :] * stride_sr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + rank_offs[:, None] * stride_br,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(_tf32_operand(s * scaling, FP32_INPUT), b.to(tl.float32), acc, FP32_INPUT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["m_bucket"])
def _lora_bwd_dy_kernel(
    dy_ptr, s_ptr, b_ptr, dsp_ptr, dbp_ptr,
    M, N, R, split_n, m_bucket,
    stride_dym, stride_dyn, stride_sm, stride_sr, stride_bn, stride_br,
    stride_dsp_part, stride_dsp_m, stride_dsp_r, stride_dbp_part, stride_dbp_n, stride_dbp_r,
    scaling,
    BLOCK_R: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One read of dy for both products. Program (m-block, r-chunk, n-split) walks its split's share of N, whole
    BLOCK_N blocks from n_start to n_end (the last splits may be short or empty):
        ds_partial[n-split, m-block, r-chunk] = scaling · dy[m-block, n-split] · B[n-split, r-chunk]
        dB_partial[m-block, n, r-chunk]       = scaling · dy[m-block, n]ᵀ · s[m-block, r-chunk]   (n in its split)
    The splits partition N, so dy is still read once per rank chunk, and every partial element is written by
    exactly one program (an empty split stores zeros). Both partials are summed afterwards in a fixed order:
    deterministic, no atomics."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    n_per_split = tl.cdiv(tl.cdiv(N, BLOCK_N), split_n) * BLOCK_N  # whole blocks: splits never share a block
    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_r = offs_r < R
    s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    s = _tf32_operand(s * scaling, dy_ptr.dtype.element_ty == tl.float32)  # dB's only use of s
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    dy_ptrs = dy_ptr + offs_m[:, None] * stride_dym + (n_start + offs_n)[None, :] * stride_dyn
    b_ptrs = b_ptr + (n_start + offs_n)[:, None] * stride_bn + offs_r[None, :] * stride_br
    dbp_ptrs = (dbp_ptr + pid_m * stride_dbp_part + (n_start + offs_n)[:, None] * stride_dbp_n
                + offs_r[None, :] * stride_dbp_r)
    for n0 in range(n_start, n_end, BLOCK_N):
        mask_n = offs_n < N - n0
        dy = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        ds = _dot(dy, b, ds, dy_ptr.dtype.element_ty == tl.float32)
        db = _dot(tl.trans(dy).to(tl.float32), s, None, dy_ptr.dtype.element_ty == tl.float32)
        tl.store(dbp_ptrs, db, mask=mask_n[:, None] & mask_r[None, :])
        dy_ptrs += _step(BLOCK_N, stride_dyn, INT64)
        b_ptrs += _step(BLOCK_N, stride_bn, INT64)
        dbp_ptrs += _step(BLOCK_N, stride_dbp_n, INT64)
    dsp_ptrs = dsp_ptr + pid_s * stride_dsp_part + offs_m[:, None] * stride_dsp_m + offs_r[None, :] * stride_dsp_r
    tl.store(dsp_ptrs, ds * scaling, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["m_bucket", "seed"])
def _lora_bwd_dx_kernel(
    dy_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr,
    M, N, K, R, m_bucket,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dsm, stride_dsr, stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    p, dropout_scale, seed,
    HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, GROUP: tl.constexpr, EVEN_N: tl.constexpr,
    INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx[M, K] = dy · W + drop'(ds · A). The (skinny) LoRA term comes first, masked element-wise with dropout, and
    becomes the initial accumulator of the base GEMM's loop: one [BLOCK_M, BLOCK_K] fp32 accumulator is live at a
    time. (Computed after the loop, the dropout variant kept a second one: ptxas -v for sm_90a gave 255 registers
    for every 128-row bf16 tile, with spills at rank chunk 64; first, 242-244 registers and no spills at chunk 16.)"""
    pid_m, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    acc = _dx_lora_term(ds_ptr, a_ptr, offs_m, offs_k, M, K, R, stride_dsm, stride_dsr, stride_ar, stride_ak,
                        p, dropout_scale, seed, dy_ptr.dtype.element_ty == tl.float32, HAS_DROPOUT, BLOCK_R,
                        INT64, BLOCK_M, BLOCK_K)
    # Edge rows and columns wrap around in the main loop's loads, as in _lora_fwd_kernel (EVEN_N: no masks at all).
    dy_ptrs = dy_ptr + (offs_m % M)[:, None] * stride_dym + _idx(offs_n, INT64)[None, :] * stride_dyn
    w_ptrs = w_ptr + _idx(offs_n, INT64)[:, None] * stride_wn + (offs_k % K)[None, :] * stride_wk
    acc = _gemm_loop(dy_ptrs, w_ptrs, acc, offs_n, N, _step(BLOCK_N, stride_dyn, INT64),
                     _step(BLOCK_N, stride_wn, INT64), dy_ptr.dtype.element_ty == tl.float32, EVEN_N, BLOCK_N)
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])


@triton.jit(do_not_specialize=["m_bucket", "seed"])
def _lora_bwd_dx_tma_kernel(
    dy_desc, w_desc, ds_ptr, a_ptr, dx_ptr,
    M, N, K, R, m_bucket,
    stride_dsm, stride_dsr, stride_ar, stride_ak, stride_dxm, stride_dxk,
    p, dropout_scale, seed,
    HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, GROUP: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """_lora_bwd_dx_kernel with the main loop's dy and W tiles fetched by tensor descriptors (TMA; see
    _lora_fwd_tma_kernel): zero-filled edges, no masks. 16-bit dtypes only; the launcher picks it."""
    pid_m, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP)
    row0 = pid_m * BLOCK_M
    col0 = pid_k * BLOCK_K
    offs_m = row0.to(tl.int64) + tl.arange(0, BLOCK_M)
    offs_k = col0.to(tl.int64) + tl.arange(0, BLOCK_K)
    acc = _dx_lora_term(ds_ptr, a_ptr, offs_m, offs_k, M, K, R, stride_dsm, stride_dsr, stride_ar, stride_ak,
                        p, dropout_scale, seed, False, HAS_DROPOUT, BLOCK_R, INT64, BLOCK_M, BLOCK_K)
    for n0 in range(0, N, BLOCK_N):
        dy = dy_desc.load([row0, n0])
        w = w_desc.load([n0, col0])
        acc = _dot(dy, w, acc, False)
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])


@triton.jit
def _dx_lora_term(ds_ptr, a_ptr, offs_m, offs_k, M, K, R, stride_dsm, stride_dsr, stride_ar, stride_ak,
                  p, dropout_scale, seed, FP32_INPUT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  BLOCK_R: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """drop'(ds · A) for the [BLOCK_M, BLOCK_K] tile at (offs_m, offs_k), fp32: dX's initial accumulator."""
    mask_m = offs_m < M
    mask_k = offs_k < K
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):  # not pipelined: see _expand_bias_store
        mask_r = offs_r < R - r0
        rank_offs = _idx(offs_r + r0, INT64)
        ds = tl.load(ds_ptr + offs_m[:, None] * stride_dsm + rank_offs[None, :] * stride_dsr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        a = tl.load(a_ptr + rank_offs[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc = _dot(_tf32_operand(ds, FP32_INPUT), a.to(tl.float32), acc, FP32_INPUT)
    if HAS_DROPOUT:
        acc = acc * tl.where(_keep_mask(seed, offs_m, offs_k, K, p), dropout_scale, 0.0)  # ·0: see the shrink
    return acc


@triton.jit(do_not_specialize=["m_bucket", "seed"])
def _lora_bwd_da_kernel(
    ds_ptr, x_ptr, dap_ptr,
    M, K, R, split_m, m_bucket,
    stride_dsm, stride_dsr, stride_xm, stride_xk, stride_dap_part, stride_dap_r, stride_dap_k,
    p, dropout_scale, seed,
    HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dA_partial[m-split, R, K] (fp32) = ds[m-split]ᵀ · drop(x[m-split]). Program (k-block, r-chunk, m-split) owns
    an [r-chunk, k-block] tile of its split's partial and loops over its split's share of M, whole BLOCK_M blocks
    from m_start to m_end (the last splits may be short or empty: an empty split stores zeros). The partials are
    summed over the splits afterwards in a fixed order: deterministic, no atomics."""
    pid_k = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    m_per_split = tl.cdiv(tl.cdiv(M, BLOCK_M), split_m) * BLOCK_M  # whole blocks: splits never share a block
    m_start = pid_s * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    mask_k = offs_k < K
    mask_r = offs_r < R
    # dsᵀ tile [BLOCK_R, BLOCK_M]
    dst_ptrs = ds_ptr + offs_r[:, None] * stride_dsr + (m_start + offs_m)[None, :] * stride_dsm
    x_ptrs = x_ptr + (m_start + offs_m)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        mask_m = offs_m < M - m0
        dst = tl.load(dst_ptrs, mask=mask_r[:, None] & mask_m[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, offs_m + m0, offs_k, K, p), x, x * 0)  # x·0: see _lora_shrink_kernel
        acc = _dot(_tf32_operand(dst, x_ptr.dtype.element_ty == tl.float32), x.to(tl.float32), acc,
                   x_ptr.dtype.element_ty == tl.float32)
        dst_ptrs += _step(BLOCK_M, stride_dsm, INT64)
        x_ptrs += _step(BLOCK_M, stride_xm, INT64)
    if HAS_DROPOUT:
        acc = acc * dropout_scale
    dap_ptrs = dap_ptr + pid_s * stride_dap_part + offs_r[:, None] * stride_dap_r + offs_k[None, :] * stride_dap_k
    tl.store(dap_ptrs, acc, mask=mask_r[:, None] & mask_k[None, :])


@triton.jit(do_not_specialize=["seed"])  # a new seed every step: one binary for all (see _keep_mask)
def _dropout_mask_kernel(
    out_ptr,
    M, K,
    stride_om, stride_ok,
    p, dropout_scale, seed,
    BLOCK: tl.constexpr,
):
    """out[M, K] (fp32) = the multiplier every kernel applies: 1/(1-p) where kept, 0 where dropped."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs_k = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = _keep_mask(seed, offs_m, offs_k, K, p)
    value = tl.where(keep, dropout_scale, 0.0)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok, value,
             mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])


def _prune_fwd(configs, named_args, _budget=None, **kwargs):
    """The forward's configs for this M: after the shared-memory prune, the decode tiles when M <= DECODE_MAX_M and
    the others above it (each set, when it is empty here, falls back to whatever survived). Without an M (the
    compile gate's spec list) every config that fits is kept. Decided on the autotune key's m_bucket, not M, so
    the choice holds for every M of the bucket (DECODE_MAX_M is a power of two: a bucket boundary)."""
    kept = _prune_by_smem("BLOCK_M", "BLOCK_N", "BLOCK_K", "x_ptr")(configs, named_args, _budget, **kwargs)
    if "m_bucket" not in named_args:
        return kept
    decode = named_args["m_bucket"] <= DECODE_MAX_M
    decode_block_m = {tile[0] for tile in GPU_DECODE_TILES}
    return [cfg for cfg in kept if (cfg.kwargs["BLOCK_M"] in decode_block_m) == decode] or kept


_PRUNE = {
    "_lora_shrink_kernel": _prune_by_smem("BLOCK_M", "BLOCK_R", "BLOCK_K", "x_ptr"),
    "_lora_fwd_kernel": _prune_fwd,
    "_lora_fwd_tma_kernel": _prune_by_smem("BLOCK_M", "BLOCK_N", "BLOCK_K", "y_ptr"),
    "_lora_bwd_dx_tma_kernel": _prune_by_smem("BLOCK_M", "BLOCK_K", "BLOCK_N", "dx_ptr"),
    "_lora_bwd_dy_kernel": _prune_by_smem("BLOCK_M", "BLOCK_R", "BLOCK_N", "dy_ptr"),
    "_lora_bwd_dx_kernel": _prune_by_smem("BLOCK_M", "BLOCK_K", "BLOCK_N", "dy_ptr"),
    "_lora_bwd_da_kernel": _prune_by_smem("BLOCK_R", "BLOCK_K", "BLOCK_M", "x_ptr", row_element_size=4),
}


# LORA_KERNELS_AUTOTUNE=0 launches the first config the prune keeps, untimed: the GPU tests run many shapes, and
# autotuning every one of them would spend minutes compiling and timing configs that correctness does not need.
AUTOTUNE = env_flag("LORA_KERNELS_AUTOTUNE", True)


def _first_kept(prune):
    def prune_to_first(configs, named_args, **kwargs):
        return prune(configs, named_args, **kwargs)[:1]
    return prune_to_first


def _untimed(kernel_call, quantiles=None, **kwargs):
    """The autotuner's do_bench with AUTOTUNE off: triton 3.6 times even the one config left after the prune
    (triton 3.8 does not); nothing is run here, the chosen config runs for real afterwards."""
    return [0.0, 0.0, 0.0]


def _autotune(configs, key, kernel, heuristics=None):
    # The whole list either way: triton's autotuner calls the prune only when it holds more than one config, so a
    # list cut to its first config launched it unpruned, and the fp32 shrink's first config needs 114-164 KB of
    # shared memory, past the 99 KiB of sm_86/sm_89 GPUs (helper 272)
    prune = _PRUNE[kernel.__name__]
    if heuristics:  # constexprs derived from the arguments and the chosen config (e.g. EVEN_K)
        kernel = triton.heuristics(heuristics)(kernel)
    if AUTOTUNE:
        return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": _first_kept(prune)},
                           do_bench=_untimed)(kernel)


# The keys hold m_bucket (see _m_bucket), not M, so a new token count reuses its bucket's tuning. The split kernels'
# keys hold their split count: the launchers derive it from the bucket, the other sizes and the SM count (one value
# per key, so no extra tuning), but SPLIT_OVERRIDE (the bench's "split / no split" rows) changes the grid a config
# runs on, and a config tuned for one grid must not be reused for the other. The INT64 variant is tuned on its own.
_shrink = _autotune(SHRINK_CONFIGS, ["m_bucket", "K", "R", "split_k", "HAS_DROPOUT", "INT64"], _lora_shrink_kernel)
_fwd = _autotune(GEMM_CONFIGS, ["m_bucket", "N", "K", "R", "HAS_BIAS", "INT64"], _lora_fwd_kernel,
                 {"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
_fwd_tma = _autotune(TMA_CONFIGS, ["m_bucket", "N", "K", "R", "HAS_BIAS", "INT64"], _lora_fwd_tma_kernel)
_bwd_dy = _autotune(DY_CONFIGS, ["m_bucket", "N", "R", "split_n", "INT64"], _lora_bwd_dy_kernel)
_bwd_dx = _autotune(DX_CONFIGS, ["m_bucket", "N", "K", "R", "HAS_DROPOUT", "INT64"], _lora_bwd_dx_kernel,
                    {"EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0})
_bwd_dx_tma = _autotune(TMA_DX_CONFIGS, ["m_bucket", "N", "K", "R", "HAS_DROPOUT", "INT64"],
                        _lora_bwd_dx_tma_kernel)
_bwd_da = _autotune(DA_CONFIGS, ["m_bucket", "K", "R", "split_m", "HAS_DROPOUT", "INT64"], _lora_bwd_da_kernel)


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------

def _check_rank(op, name, r):
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"{op}: {name} expected a rank between 1 and {MAX_RANK}, got {r}")


def _check_dropout(op, dropout_p, seed, traced):
    """Checks dropout_p and seed; returns the seed as the ops take it (see _seed_value): a tensor where the call goes
    through the op (`traced`: see through_op)."""
    if not isinstance(dropout_p, numbers.Real) or isinstance(dropout_p, bool):
        raise TypeError(f"{op}: dropout_p expected a float in [0, 1], got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:  # 1 drops everything, as torch's dropout does (lora_linear refuses it)
        raise ValueError(f"{op}: dropout_p expected a float in [0, 1], got {dropout_p!r}")
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.dim() != 0 or seed.device.type != "cpu":
            raise TypeError(f"{op}: seed expected an int or a 0-d int64 CPU tensor, got a {seed.dtype} tensor of "
                            f"shape {tuple(seed.shape)} on {seed.device}")
        # Held to the int's range where it has a value: a traced or fake seed has none until the graph runs, when the
        # op's own check (_register) reads it. int64 holds nothing past 2**63 - 1.
        if not through_op(seed) and seed.item() < 0:
            raise ValueError(f"{op}: seed expected an int in [0, 2**63), got a tensor holding {seed.item()}")
        return seed
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"{op}: seed expected an int in [0, 2**63), got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"{op}: seed expected an int in [0, 2**63), got {seed!r}")
    # Traced calls go through the custom op, whose schema takes the seed as a tensor (a graph input, not a constant).
    return torch.tensor(seed, dtype=torch.int64, device="cpu") if traced else seed


def _seed_value(seed):
    """The seed as the kernels take it: an int. The ops' schemas declare a 0-d int64 CPU tensor (what
    functional.new_seed draws, so torch.compile keeps the draw in the graph); eager calls may pass an int."""
    return int(seed)


def _check_scaling(op, scaling):
    if not isinstance(scaling, numbers.Real) or isinstance(scaling, bool):
        raise TypeError(f"{op}: scaling expected a float, got {type(scaling).__name__}")
    # Not while tracing: torch.compile(dynamic=True) traces a float as a symbolic one, which math.isfinite cannot
    # take (a graph break per launcher, an error under fullgraph=True), as lora_linear's own check skips it there.
    if not torch.compiler.is_compiling() and not is_finite_number(scaling):
        raise ValueError(f"{op}: scaling expected a finite float, got {scaling!r}")


def _next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0), as triton.next_power_of_2 (not called: see cdiv)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _block_r(r, limit=MAX_BLOCK_R):
    """Rank chunk: the rank rounded up to a power of two, at least MIN_DOT_DIM, at most `limit`."""
    return min(max(MIN_DOT_DIM, _next_power_of_2(r)), limit)


def _dy_block_r(r, dtype):
    """Rank chunk of _lora_bwd_dy_kernel (smaller for fp32: see DY_MAX_BLOCK_R_FP32)."""
    return _block_r(r, DY_MAX_BLOCK_R_FP32 if dtype == torch.float32 else MAX_BLOCK_R)


def _split_count(programs: int, blocks: int, sm_count: int | None) -> int:
    """Chunks to split a reduction of `blocks` blocks into, for a grid of `programs` programs without the split:
    enough for SPLIT_PROGRAMS_PER_SM programs per SM (sm_count None: the interpreter's INTERPRET_SPLIT), at most
    MAX_SPLIT (SPLIT_OVERRIDE replaces both), and never more than `blocks`, at least 1."""
    if SPLIT_OVERRIDE is not None:
        split = SPLIT_OVERRIDE
    elif sm_count is None:
        split = INTERPRET_SPLIT
    else:
        split = min(cdiv(SPLIT_PROGRAMS_PER_SM * sm_count, max(programs, 1)), MAX_SPLIT)
    return max(1, min(split, blocks))


def _m_bucket(M: int) -> int:
    """The token count the autotuners key on: M rounded up to a power of two, so a new token count (dynamic
    padding in training, each prompt length in serving) reuses the tile tuned at its bucket's first M instead of
    timing every config again (Triton's do_bench: about 25 + 100 ms per config, 2-5 configs per kernel, per weight
    shape). That the tile is as good for the bucket's other Ms is assumed, not measured. The kernels never read it,
    and Triton does not specialise on it (one compiled variant)."""
    return _next_power_of_2(M)


def _device_sm_count(device: torch.device) -> int | None:
    return None if INTERPRET else sm_count(device)


# The three splits below count M's rows by its bucket (_m_bucket), not M: the split is part of its kernel's
# autotune key, and counted from M it took up to 8 values within one bucket (M = 4097..8192 gives 33..64 shrink row
# blocks, so splits 16..9 on 132 SMs), each timed anew.


def _shrink_split(M: int, K: int, r: int, device: torch.device) -> int:
    """K-split of _lora_shrink_kernel: its grid is (M / BLOCK_M) x (rank chunks) without it (one program at
    decode sizes)."""
    programs = cdiv(_m_bucket(M), _SHRINK_MAX_BLOCK_M) * cdiv(r, _block_r(r))
    return _split_count(programs, cdiv(K, _SHRINK_MAX_BLOCK_K), _device_sm_count(device))


def _bwd_dy_split(M: int, N: int, r: int, device: torch.device, dtype: torch.dtype) -> int:
    """N-split of _lora_bwd_dy_kernel: its grid is (M / DY_BLOCK_M) x (rank chunks) without it."""
    programs = cdiv(_m_bucket(M), DY_BLOCK_M) * cdiv(r, _dy_block_r(r, dtype))
    return _split_count(programs, cdiv(N, _DY_MAX_BLOCK_N), _device_sm_count(device))


def _bwd_da_split(M: int, K: int, r: int, device: torch.device) -> int:
    """M-split of _lora_bwd_da_kernel: its grid is (K / BLOCK_K) x (rank chunks) without it. Capped by the blocks
    of M's bucket, so below the bucket's top up to half the splits are empty (they store zeros)."""
    programs = cdiv(K, _DA_MAX_BLOCK_K) * cdiv(r, _block_r(r))
    return _split_count(programs, cdiv(_m_bucket(M), _DA_MAX_BLOCK_M), _device_sm_count(device))


# The TMA forward and dX kernels are opt-in until a GPU run has measured them against the pointer kernels (bench
# rows "Triton forward: TMA / pointer loads" and "Triton fwd+bwd: TMA / pointer loads"): LORA_KERNELS_TRITON_TMA=1
# uses them wherever they can run.
USE_TMA = env_flag("LORA_KERNELS_TRITON_TMA", False)


@functools.cache
def _has_tma(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def _tma_addressable(t: torch.Tensor) -> bool:
    """What a TMA descriptor needs of a 2-D tensor: no empty dimension, unit inner stride, 16-byte aligned base and
    row stride, and rows that do not overlap (an expanded x has row stride 0: Triton's descriptor accepts it, and
    the CUDA driver's documented layouts have none such, so those take the pointer kernels)."""
    return (t.numel() > 0 and t.stride(1) == 1 and t.stride(0) >= t.shape[1]
            and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0)


def _use_tma(tokens: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the forward (tokens = x) or dX (tokens = dy) runs its TMA kernel: when switched on (USE_TMA), on a
    GPU with TMA (sm_90+; any device under the interpreter), for 16-bit operands a descriptor can address, above
    decode sizes."""
    return (USE_TMA and tokens.dtype in (torch.float16, torch.bfloat16)
            and tokens.shape[0] > DECODE_MAX_M and _tma_addressable(tokens) and _tma_addressable(weight)
            and (INTERPRET or _has_tma(tokens.device)))


def _descriptor(t: torch.Tensor, configs, name: str):
    """A TMA descriptor of t, with the block shape of the first config (the autotune pre-hook sets the launched
    config's)."""
    rows, cols = (configs[0].kwargs[block] for block in _DESC_BLOCKS[name])
    return TensorDescriptor.from_tensor(t, [rows, cols])


def _int64_offsets(*strides: int) -> bool:
    """Whether a launch takes its kernel's INT64 variant: one of `strides`, those that kernel's int32 variant
    multiplies by an int32 index (a lane, a block step or a rank index), is INT64_STRIDE or more. The others only
    meet int64 indices (program ids, row offsets), so a large M never changes the variant."""
    return max(strides) >= INT64_STRIDE


def _sum_partials(partials: torch.Tensor) -> torch.Tensor:
    """The sum over dim 0 of a split kernel's fp32 partials: a fixed-shape reduction, so deterministic (no
    atomics); no work when there is one split."""
    return partials[0] if partials.shape[0] == 1 else partials.sum(dim=0)


def _dropout_args(dropout_p):
    """(has_dropout, p, scale) as the kernels take them; p == 1 drops everything (scale 0, like torch)."""
    p = float(dropout_p)
    return p > 0.0, p, (1.0 / (1.0 - p) if p < 1.0 else 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Op bodies: allocate and launch (inputs already checked). Registered as custom ops below.
# ----------------------------------------------------------------------------------------------------------------


@one_launch_at_a_time
@on_tensor_device
def _lora_fwd_impl(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   scaling: float, bias: torch.Tensor | None, dropout_p: float, seed: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    # The shrink runs first as its own small kernel instead of inside the main one: fused, every column-block
    # program of the main GEMM would recompute drop(x)·Aᵀ and regenerate the mask (N / BLOCK_N times the shrink's
    # 2·M·r·K FLOPs: +12.5% FLOPs at N = 4096, BLOCK_N = 128, r = 16), and s has to reach memory anyway because
    # the backward reuses it. Separate, it costs one extra read of x (~2r/N of the GEMM's traffic).
    M, K = x.shape
    N, r = weight.shape[0], lora_a.shape[0]
    has_dropout, p, scale = _dropout_args(dropout_p)
    seed = _seed_value(seed)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y, torch.empty((M, r), device=x.device, dtype=torch.float32)
    block_r = _block_r(r)
    split = _shrink_split(M, K, r, x.device)
    s_partials = torch.empty((split, M, r), device=x.device, dtype=torch.float32)
    _shrink[lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(r, block_r), split)](
        x, lora_a, s_partials,
        M, K, r, split, _m_bucket(M),
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1),
        s_partials.stride(0), s_partials.stride(1), s_partials.stride(2),
        p, scale, seed,
        HAS_DROPOUT=has_dropout, BLOCK_R=block_r, INT64=_int64_offsets(x.stride(1), lora_a.stride(1)),
        enable_fp_fusion=FP_FUSION,
    )
    s = _sum_partials(s_partials)
    has_bias = bias is not None
    bias_arg = bias if has_bias else y  # never read when HAS_BIAS is False
    int64 = _int64_offsets(x.stride(1), weight.stride(1), s.stride(1), lora_b.stride(1))
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    if _use_tma(x, weight):
        _fwd_tma[grid](
            _descriptor(x, TMA_CONFIGS, "x_desc"), _descriptor(weight, TMA_CONFIGS, "w_desc"),
            s, lora_b, bias_arg, y,
            M, N, K, r, _m_bucket(M),
            s.stride(0), s.stride(1), lora_b.stride(0), lora_b.stride(1), bias_arg.stride(0), y.stride(0),
            y.stride(1),
            float(scaling),
            HAS_BIAS=has_bias, BLOCK_R=block_r, GROUP=GROUP_M, INT64=int64, enable_fp_fusion=FP_FUSION,
        )
        return y, s
    _fwd[grid](
        x, weight, s, lora_b, bias_arg, y,
        M, N, K, r, _m_bucket(M),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), s.stride(0), s.stride(1),
        lora_b.stride(0), lora_b.stride(1), bias_arg.stride(0), y.stride(0), y.stride(1),
        float(scaling),
        HAS_BIAS=has_bias, BLOCK_R=block_r, GROUP=GROUP_M, INT64=int64, enable_fp_fusion=FP_FUSION,
    )
    return y, s


@one_launch_at_a_time
@on_tensor_device
def _lora_bwd_dy_impl(dy: torch.Tensor, s: torch.Tensor, lora_b: torch.Tensor, scaling: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    M, N = dy.shape
    r = lora_b.shape[1]
    if M == 0:
        return (torch.zeros((N, r), device=dy.device, dtype=torch.float32),
                torch.empty((M, r), device=dy.device, dtype=torch.float32))
    num_parts = cdiv(M, DY_BLOCK_M)
    if num_parts * N * r * 4 > DY_PARTIALS_BUDGET:
        # Two GEMMs with 16-bit operands (S rounded to dy's dtype, as PEFT rounds it, scaled first at |scaling| <= 1)
        # and fp32 products, dy read twice: no [M, r] or [N, r] product is rounded to 16 bits (see scaled_mm).
        # Autocast off: a backward run inside an autocast region rounded an fp32 layer's products to its 16-bit
        # dtype, which lora_bwd_dx then refused as ds.
        with autocast_off(dy.device):
            return (scaled_mm(dy.T, s, scaling, out_dtype=torch.float32),
                    scaled_mm(dy, lora_b, scaling, out_dtype=torch.float32))
    block_r = _dy_block_r(r, dy.dtype)
    split = _bwd_dy_split(M, N, r, dy.device, dy.dtype)
    partials = torch.empty((num_parts, N, r), device=dy.device, dtype=torch.float32)
    ds_partials = torch.empty((split, M, r), device=dy.device, dtype=torch.float32)
    _bwd_dy[(num_parts, cdiv(r, block_r), split)](
        dy, s, lora_b, ds_partials, partials,
        M, N, r, split, _m_bucket(M),
        dy.stride(0), dy.stride(1), s.stride(0), s.stride(1), lora_b.stride(0), lora_b.stride(1),
        ds_partials.stride(0), ds_partials.stride(1), ds_partials.stride(2),
        partials.stride(0), partials.stride(1), partials.stride(2),
        float(scaling),
        BLOCK_R=block_r, BLOCK_M=DY_BLOCK_M, INT64=_int64_offsets(dy.stride(1), lora_b.stride(0), partials.stride(1)),
        enable_fp_fusion=FP_FUSION,
    )
    # Deterministic: fixed-shape reductions over the row-block (dB) and N-split (ds) partials (no atomics).
    d_lora_b, ds = _sum_partials(partials), _sum_partials(ds_partials)
    return d_lora_b, ds


@one_launch_at_a_time
@on_tensor_device
def _lora_bwd_dx_impl(dy: torch.Tensor, ds: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                      dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    M, N = dy.shape
    K, r = weight.shape[1], lora_a.shape[0]
    has_dropout, p, scale = _dropout_args(dropout_p)
    seed = _seed_value(seed)
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    if M == 0:
        return dx
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
    int64 = _int64_offsets(dy.stride(1), weight.stride(0), ds.stride(1), lora_a.stride(0))
    if _use_tma(dy, weight):
        _bwd_dx_tma[grid](
            _descriptor(dy, TMA_DX_CONFIGS, "dy_desc"), _descriptor(weight, TMA_DX_CONFIGS, "w_desc"),
            ds, lora_a, dx,
            M, N, K, r, _m_bucket(M),
            ds.stride(0), ds.stride(1), lora_a.stride(0), lora_a.stride(1), dx.stride(0), dx.stride(1),
            p, scale, seed,
            HAS_DROPOUT=has_dropout, BLOCK_R=_block_r(r), GROUP=GROUP_M, INT64=int64, enable_fp_fusion=FP_FUSION,
        )
        return dx
    _bwd_dx[grid](
        dy, weight, ds, lora_a, dx,
        M, N, K, r, _m_bucket(M),
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), ds.stride(0), ds.stride(1),
        lora_a.stride(0), lora_a.stride(1), dx.stride(0), dx.stride(1),
        p, scale, seed,
        HAS_DROPOUT=has_dropout, BLOCK_R=_block_r(r), GROUP=GROUP_M, INT64=int64, enable_fp_fusion=FP_FUSION,
    )
    return dx


@one_launch_at_a_time
@on_tensor_device
def _lora_bwd_da_impl(ds: torch.Tensor, x: torch.Tensor, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    M, K = x.shape
    r = ds.shape[1]
    has_dropout, p, scale = _dropout_args(dropout_p)
    seed = _seed_value(seed)
    if M == 0:
        return torch.zeros((r, K), device=x.device, dtype=torch.float32)
    block_r = _block_r(r)
    split = _bwd_da_split(M, K, r, x.device)
    partials = torch.empty((split, r, K), device=x.device, dtype=torch.float32)
    _bwd_da[lambda meta: (cdiv(K, meta["BLOCK_K"]), cdiv(r, block_r), split)](
        ds, x, partials,
        M, K, r, split, _m_bucket(M),
        ds.stride(0), ds.stride(1), x.stride(0), x.stride(1),
        partials.stride(0), partials.stride(1), partials.stride(2),
        p, scale, seed,
        HAS_DROPOUT=has_dropout, BLOCK_R=block_r, INT64=_int64_offsets(ds.stride(0), x.stride(0)),
        enable_fp_fusion=FP_FUSION,
    )
    return _sum_partials(partials)


# The fakes check the devices as the launchers do (the seed is a CPU tensor on every device): see check_devices.
def _fake_lora_fwd(x, weight, lora_a, lora_b, scaling, bias, dropout_p, seed):
    check_devices("triton_lora_fwd", "x", x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias)
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], lora_a.shape[0]), dtype=torch.float32))


def _fake_lora_bwd_dy(dy, s, lora_b, scaling):
    check_devices("triton_lora_bwd_dy", "dy", dy, s=s, lora_b=lora_b)
    return (dy.new_empty(tuple(lora_b.shape), dtype=torch.float32),
            dy.new_empty((dy.shape[0], lora_b.shape[1]), dtype=torch.float32))


def _fake_lora_bwd_dx(dy, ds, weight, lora_a, dropout_p, seed):
    check_devices("triton_lora_bwd_dx", "dy", dy, ds=ds, weight=weight, lora_a=lora_a)
    return dy.new_empty((dy.shape[0], weight.shape[1]))


def _fake_lora_bwd_da(ds, x, dropout_p, seed):
    check_devices("triton_lora_bwd_da", "ds", ds, x=x)
    return x.new_empty((ds.shape[1], x.shape[1]), dtype=torch.float32)


def _register(name, impl, fake, check):
    """An opaque custom op with a fake implementation: torch.compile(fullgraph=True) traces through it and calls the
    launcher as it is. Not a triton_op: that hands the kernels to Inductor, which failed to compile the fused forward
    on an H100 (torch 2.11, triton 3.6: CompilationError at its rank loop), and under the interpreter it would run
    the body on fake tensors. The op runs the launcher's checks (`check`, taking the op's arguments) before impl: a
    compiled graph checked them on symbolic shapes when traced, but a direct caller of torch.ops.lora_kernels.<name>
    or an exported program had the kernels index by unchecked shapes."""

    @functools.wraps(impl)  # custom_op reads the schema from impl's annotated signature
    def checked(*args, **kwargs):
        check(*args, **kwargs)
        return impl(*args, **kwargs)

    op = torch.library.custom_op(f"lora_kernels::{name}", checked, mutates_args=())
    op.register_fake(fake)
    return op


def _call(op, impl, *args):
    # Eager calls on plain tensors skip the dispatcher (tens of microseconds of host time per call); traced calls and
    # fake tensors need the op (through_op). Both run impl, which takes the launch lock (one_launch_at_a_time).
    return op(*args) if through_op(args[0]) else impl(*args)


# ----------------------------------------------------------------------------------------------------------------
# Launchers: check, then call the op (which checks again: see _register). Each check takes the op's arguments and
# returns the seed as the op takes it.
# ----------------------------------------------------------------------------------------------------------------


def _check_fwd(x, weight, lora_a, lora_b, scaling, bias, dropout_p, seed):
    op = "lora_fwd"
    check_tensor(op, "x", x, (None, None))
    M, K = x.shape
    dtype, device = x.dtype, x.device
    check_tensor(op, "weight", weight, (None, K), (dtype,), device)
    N = weight.shape[0]
    check_tensor(op, "lora_a", lora_a, (None, K), (dtype,), device)
    r = lora_a.shape[0]
    _check_rank(op, "lora_a", r)
    check_tensor(op, "lora_b", lora_b, (N, r), (dtype,), device)
    if bias is not None:
        check_tensor(op, "bias", bias, (N,), (dtype,), device)
    _check_scaling(op, scaling)
    return _check_dropout(op, dropout_p, seed, through_op(x))


def _check_bwd_dy(dy, s, lora_b, scaling):
    op = "lora_bwd_dy"
    check_tensor(op, "dy", dy, (None, None))
    M, N = dy.shape
    check_tensor(op, "lora_b", lora_b, (N, None), (dy.dtype,), dy.device)
    r = lora_b.shape[1]
    _check_rank(op, "lora_b", r)
    check_tensor(op, "s", s, (M, r), (torch.float32,), dy.device)
    _check_scaling(op, scaling)


def _check_bwd_dx(dy, ds, weight, lora_a, dropout_p, seed):
    op = "lora_bwd_dx"
    check_tensor(op, "dy", dy, (None, None))
    M, N = dy.shape
    check_tensor(op, "weight", weight, (N, None), (dy.dtype,), dy.device)
    K = weight.shape[1]
    check_tensor(op, "lora_a", lora_a, (None, K), (dy.dtype,), dy.device)
    r = lora_a.shape[0]
    _check_rank(op, "lora_a", r)
    check_tensor(op, "ds", ds, (M, r), (torch.float32,), dy.device)
    return _check_dropout(op, dropout_p, seed, through_op(dy))


def _check_bwd_da(ds, x, dropout_p, seed):
    op = "lora_bwd_da"
    check_tensor(op, "x", x, (None, None))
    M, K = x.shape
    check_tensor(op, "ds", ds, (M, None), (torch.float32,), x.device)
    _check_rank(op, "ds", ds.shape[1])
    return _check_dropout(op, dropout_p, seed, through_op(ds))


_fwd_op = _register("triton_lora_fwd", _lora_fwd_impl, _fake_lora_fwd, _check_fwd)
_bwd_dy_op = _register("triton_lora_bwd_dy", _lora_bwd_dy_impl, _fake_lora_bwd_dy, _check_bwd_dy)
_bwd_dx_op = _register("triton_lora_bwd_dx", _lora_bwd_dx_impl, _fake_lora_bwd_dx, _check_bwd_dx)
_bwd_da_op = _register("triton_lora_bwd_da", _lora_bwd_da_impl, _fake_lora_bwd_da, _check_bwd_da)


def lora_fwd(x, weight, lora_a, lora_b, scaling, bias=None, dropout_p=0.0, seed=0):
    """y, s = x @ W.T + scaling * (s := drop(x) @ A.T) @ B.T + bias, s.float()

    x: [M, K] (any strides), weight: [N, K], lora_a: [r, K], lora_b: [N, r], bias: [N] or None, all one float
    dtype and device. Returns y [M, N] in x.dtype and s [M, r] float32 (unscaled, saved for the backward).
    Dropout (p = dropout_p) applies to the LoRA branch input; its mask comes from (seed, m * K + k), see
    `dropout_mask`."""
    seed = _check_fwd(x, weight, lora_a, lora_b, scaling, bias, dropout_p, seed)
    return _call(_fwd_op, _lora_fwd_impl, x, weight, lora_a, lora_b, float(scaling), bias, float(dropout_p), seed)


def lora_bwd_dy(dy, s, lora_b, scaling):
    """d_lora_b, ds = scaling * dy.T @ s, scaling * dy @ B   (both float32, from one read of dy)

    dy: [M, N], s: [M, r] float32 (from lora_fwd), lora_b: [N, r] in dy.dtype.
    Returns d_lora_b [N, r] and ds [M, r], float32."""
    _check_bwd_dy(dy, s, lora_b, scaling)
    return _call(_bwd_dy_op, _lora_bwd_dy_impl, dy, s, lora_b, float(scaling))


def lora_bwd_dx(dy, ds, weight, lora_a, dropout_p=0.0, seed=0):
    """dx = dy @ W + mask * (ds @ A)   (mask: the forward's dropout multiplier for (seed, dropout_p))

    dy: [M, N], ds: [M, r] float32, weight: [N, K], lora_a: [r, K] in dy.dtype. Returns dx [M, K] in dy.dtype."""
    seed = _check_bwd_dx(dy, ds, weight, lora_a, dropout_p, seed)
    return _call(_bwd_dx_op, _lora_bwd_dx_impl, dy, ds, weight, lora_a, float(dropout_p), seed)


def lora_bwd_da(ds, x, dropout_p=0.0, seed=0):
    """d_lora_a = ds.T @ (x * mask)   (float32; mask as in lora_fwd for the same seed and dropout_p)

    ds: [M, r] float32, x: [M, K] (any strides). Returns d_lora_a [r, K] float32."""
    seed = _check_bwd_da(ds, x, dropout_p, seed)
    return _call(_bwd_da_op, _lora_bwd_da_impl, ds, x, float(dropout_p), seed)


def dropout_mask(seed, M, K, p, device):
    """The dropout multiplier [M, K] float32 the kernels apply for (seed, p): 1/(1-p) where kept, 0 where dropped.
    For tests (feed it to lora_kernels.reference) and lora_linear's torch.func path; the kernels regenerate it and
    never store it."""
    op = "dropout_mask"
    # traced, or a fake seed (FakeTensorMode: the create_graph path's mask), through the op. Not yet under torch.func
    # in FakeTensorMode: the seed is then a functorch wrapper, of the plain tensor type
    traced = torch.compiler.is_compiling() or isinstance(seed, torch.Tensor) and through_op(seed)
    seed = _check_dropout(op, p, seed, traced)
    if traced:  # M and K may be symbols: unchecked, as lora_linear checks no values there
        return _dropout_mask_op(seed, M, K, float(p), torch.device(device))
    return _dropout_mask_impl(seed, M, K, p, device)


def _dropout_mask_impl(seed: torch.Tensor, M: int, K: int, p: float, device: torch.device) -> torch.Tensor:
    op = "dropout_mask"
    seed = _seed_value(seed)
    for name, value in (("M", M), ("K", K)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{op}: {name} expected a non-negative int, got {value!r}")
    device = torch.device(device)
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{op}: device is {device}; the Triton kernels need CUDA (CPU only under TRITON_INTERPRET=1)")
    has_dropout, p, scale = _dropout_args(p)
    out = torch.empty((M, K), device=device, dtype=torch.float32)
    if not has_dropout:
        return out.fill_(1.0)
    if M and K:
        _launch_dropout_mask(out, p, scale, seed)
    return out


# Traced (lora_linear's torch.func path under torch.compile), an opaque op: the launch cannot run on fake tensors.
# It takes the sizes, not a tensor shaped like x, which vmap would batch (torch's fallback then launches per sample).
_dropout_mask_op = _register("triton_dropout_mask", _dropout_mask_impl,
                             lambda seed, M, K, p, device: torch.empty((M, K), device=device, dtype=torch.float32),
                             lambda seed, M, K, p, device: _check_dropout("dropout_mask", p, seed, False))


@_dropout_mask_op.register_vmap
def _dropout_mask_vmap(info, in_dims, seed, M, K, p, device):
    # Reached only with a seed per sample (the one tensor argument): vmap's randomness="different", which the eager
    # path refuses too (it reads the seed as an int), as the torch backend's mask does (functional.py).
    raise ValueError(VMAP_DROPOUT_NEEDS_ONE_SEED)


@one_launch_at_a_time
@on_tensor_device
def _launch_dropout_mask(out, p, scale, seed):
    M, K = out.shape
    _dropout_mask_kernel[(cdiv(M, DROPOUT_BLOCK), cdiv(K, DROPOUT_BLOCK))](
        out, M, K, out.stride(0), out.stride(1), p, scale, seed, BLOCK=DROPOUT_BLOCK, num_warps=DROPOUT_NUM_WARPS,
        num_stages=DROPOUT_NUM_STAGES, enable_fp_fusion=FP_FUSION)


# ----------------------------------------------------------------------------------------------------------------
# AOT compile-gate specs (lora_kernels/triton/aot.py compiles each for sm_80 and sm_90)
# ----------------------------------------------------------------------------------------------------------------

_INNER_STRIDES = {  # unit strides of contiguous operands: Triton specialises them to constexpr 1 at run time,
    # which turns on vectorised, pipelined loads, so that is the variant whose shared memory matters.
    "_lora_shrink_kernel": ("stride_xk", "stride_ak", "stride_sp_r"),
    "_lora_fwd_kernel": ("stride_xk", "stride_wk", "stride_sr", "stride_br", "stride_bias", "stride_yn"),
    "_lora_fwd_tma_kernel": ("stride_sr", "stride_br", "stride_bias", "stride_yn"),
    "_lora_bwd_dx_tma_kernel": ("stride_dsr", "stride_ak", "stride_dxk"),
    "_lora_bwd_dy_kernel": ("stride_dyn", "stride_sr", "stride_br", "stride_dsp_r", "stride_dbp_r"),
    "_lora_bwd_dx_kernel": ("stride_dyn", "stride_wk", "stride_dsr", "stride_ak", "stride_dxk"),
    "_lora_bwd_da_kernel": ("stride_dsr", "stride_xk", "stride_dap_k"),
    "_dropout_mask_kernel": ("stride_ok",),
}
_FP32_POINTERS = {"s_ptr", "sp_ptr", "ds_ptr", "dsp_ptr", "dbp_ptr", "dap_ptr", "out_ptr"}
# Split counts (the launchers' N / M / K splits), the autotune bucket and the dropout seed: run-time ints that are not
# sizes, so not marked 16-divisible (Triton does not specialise m_bucket and seed at all). The seed is compiled as the
# i32 that functional.new_seed's draws (< 2**31) launch as; an explicit seed past that gets an i64 binary.
_NOT_SIZE_ARGS = {"split_n", "split_m", "split_k", "m_bucket", "seed"}
_FLOAT_SCALARS = {"scaling", "p", "dropout_scale"}


def _signature(fn, dtype, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _DESC_BLOCKS:
            rows, cols = (constexprs[block] for block in _DESC_BLOCKS[name])
            sig[name] = f"tensordesc<{TRITON_DTYPE_NAMES[dtype]}[{rows},{cols}]>"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in _FP32_POINTERS else "*" + TRITON_DTYPE_NAMES[dtype]
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


_TMA_KERNELS = (_lora_fwd_tma_kernel, _lora_bwd_dx_tma_kernel)


def _spec(fn, dtype, config, num_warps, num_stages, int64=False, **flags):
    constexprs = dict(config)
    constexprs.update(flags)
    constexprs.update({name: 1 for name in _INNER_STRIDES[fn.__name__]})
    if "INT64" in fn.arg_names:
        constexprs["INT64"] = int64
    # INT64 is in the name only when on: the int32 specs keep the names they had before the flag
    tagged = {**config, **flags, **({"INT64": True} if int64 else {})}
    tag = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(tagged.items()))
    signature = _signature(fn, dtype, constexprs)
    return {
        "name": f"{fn.__name__}[{TRITON_DTYPE_NAMES[dtype]}; {tag}; w{num_warps} s{num_stages}]",
        "kernel": fn,
        "signature": signature,
        "constexprs": constexprs,
        "num_warps": num_warps,
        "num_stages": num_stages,
        # Sizes and strides as Triton specialises them for K = N = 4096, M = 8192, r = 16: divisible by 16, which
        # enables the vectorised async copies of the pipelined loops, the variant with the most shared memory.
        "divisible_by_16": [name for name, kind in signature.items() if kind == "i32" and name not in _NOT_SIZE_ARGS],
        # The gate fails a 16-bit kernel whose dots did not become tensor-core MMAs, and a base-GEMM tile (forward,
        # dX, 64 rows or more) that is not warp-group MMA on sm_90 (the instruction Hopper's GEMM speed needs).
        # fp32 layers run full-precision FMA dots by design (see _dot).
        "tensor_cores": dtype != torch.float32 and fn is not _dropout_mask_kernel,
        "wgmma": dtype != torch.float32 and fn in (_lora_fwd_kernel, _lora_fwd_tma_kernel, _lora_bwd_dx_kernel,
                                                   _lora_bwd_dx_tma_kernel)
                 and config["BLOCK_M"] >= 64,  # a warp group's MMA spans 64 rows: the decode tiles use mma.sync
        "tma": fn in _TMA_KERNELS,
    }


def aot_specs():
    """Compile-gate entries for every kernel here. bf16: every autotune config at rank chunk 64 (the largest LoRA
    operands, so the most shared memory) with every flag on, plus the default config at chunk 16 with the flags off
    and at chunk 32. fp16 (same sizes as bf16): the default config at chunk 64. fp32 (twice the bytes per operand):
    every config the shared-memory prune keeps at its largest chunk (64; 16 for the dY-once kernel), flags on, and
    the default config at chunk 16, flags off. Larger ranks loop over chunks of that size. (A bf16 spec at chunk 64
    may be one the prune skips at run time for that chunk: it still launches at smaller chunks.) The TMA kernels
    are 16-bit only: every bf16 config, the default at chunk 16 flags off, and fp16's default. Each kernel's INT64
    variant (64-bit index products, for strides of INT64_STRIDE or more): bf16, the default config at chunk 64,
    flags on."""
    specs = []
    seen = set()

    def add(fn, dtype, cfg, int64=False, **flags):
        spec = _spec(fn, dtype, cfg.kwargs, cfg.num_warps, cfg.num_stages, int64, **flags)
        if spec["name"] not in seen:
            seen.add(spec["name"])
            specs.append(spec)

    kernels = (  # (configs, kernel, flags on, flags off, fixed constexprs)
        (SHRINK_CONFIGS, _lora_shrink_kernel, dict(HAS_DROPOUT=True), dict(HAS_DROPOUT=False), {}),
        (GEMM_CONFIGS, _lora_fwd_kernel, dict(HAS_BIAS=True, EVEN_K=True), dict(HAS_BIAS=False, EVEN_K=False),
         dict(GROUP=GROUP_M)),
        (TMA_CONFIGS, _lora_fwd_tma_kernel, dict(HAS_BIAS=True), dict(HAS_BIAS=False), dict(GROUP=GROUP_M)),
        (DY_CONFIGS, _lora_bwd_dy_kernel, {}, {}, dict(BLOCK_M=DY_BLOCK_M)),
        (DX_CONFIGS, _lora_bwd_dx_kernel, dict(HAS_DROPOUT=True, EVEN_N=True), dict(HAS_DROPOUT=False, EVEN_N=False),
         dict(GROUP=GROUP_M)),
        (TMA_DX_CONFIGS, _lora_bwd_dx_tma_kernel, dict(HAS_DROPOUT=True), dict(HAS_DROPOUT=False),
         dict(GROUP=GROUP_M)),
        (DA_CONFIGS, _lora_bwd_da_kernel, dict(HAS_DROPOUT=True), dict(HAS_DROPOUT=False), {}),
    )
    for configs, fn, on, off, fixed in kernels:
        if fn in _TMA_KERNELS:  # 16-bit only: bf16 every config, fp16 the default
            for cfg in configs:
                add(fn, torch.bfloat16, cfg, **on, **fixed, BLOCK_R=MAX_BLOCK_R)
            add(fn, torch.bfloat16, configs[0], **off, **fixed, BLOCK_R=MIN_DOT_DIM)
            add(fn, torch.float16, configs[0], **on, **fixed, BLOCK_R=MAX_BLOCK_R)
            continue
        for cfg in configs:
            add(fn, torch.bfloat16, cfg, **on, **fixed, BLOCK_R=MAX_BLOCK_R)
        add(fn, torch.bfloat16, configs[0], **off, **fixed, BLOCK_R=MIN_DOT_DIM)
        add(fn, torch.bfloat16, configs[0], **on, **fixed, BLOCK_R=32)
        add(fn, torch.float16, configs[0], **on, **fixed, BLOCK_R=MAX_BLOCK_R)
        # fp32: every config the shared-memory prune lets it launch with, at the largest rank chunk it launches at
        # (the prune of the shrink and dA keeps more configs at chunks 16 and 32 than at 64).
        element_ptr = "dy_ptr" if "dy_ptr" in fn.arg_names else "x_ptr"
        prune = _PRUNE[fn.__name__]
        fp32_block_r = DY_MAX_BLOCK_R_FP32 if fn is _lora_bwd_dy_kernel else MAX_BLOCK_R
        fp32_compiled = set()
        for chunk in (c for c in (MAX_BLOCK_R, 32, MIN_DOT_DIM) if c <= fp32_block_r):
            for cfg in prune(configs, {element_ptr: torch.empty(0)}, **fixed, BLOCK_R=chunk):
                if id(cfg) not in fp32_compiled:
                    fp32_compiled.add(id(cfg))
                    add(fn, torch.float32, cfg, **on, **fixed, BLOCK_R=chunk)
        add(fn, torch.float32, configs[0], **off, **fixed, BLOCK_R=MIN_DOT_DIM)
    add(_dropout_mask_kernel, torch.float32, triton.Config({"BLOCK": DROPOUT_BLOCK}, num_warps=DROPOUT_NUM_WARPS,
                                                           num_stages=DROPOUT_NUM_STAGES))
    for configs, fn, on, _, fixed in kernels:
        add(fn, torch.bfloat16, configs[0], int64=True, **on, **fixed, BLOCK_R=MAX_BLOCK_R)
    return specs
