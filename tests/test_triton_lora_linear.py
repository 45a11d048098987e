"""The fused single-adapter Triton kernels (lora_kernels/triton/lora_linear.py) against lora_kernels.reference in
float64: forward y and s, each backward kernel, dropout, edge cases and input checks. On CPU they run under the
Triton interpreter (tests/conftest.py switches it on), so the shapes stay tiny."""

import re

import pytest
import torch

from conftest import DTYPES, assert_close, lora_inputs, randn
import lora_kernels.triton
from lora_kernels import bench, reference
from lora_kernels.functional import lora_linear
from lora_kernels.triton import HAS_TRITON, INTERPRET, TRITON_ERROR

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason=f"triton not importable: {TRITON_ERROR}")

if HAS_TRITON:
    import triton
    import triton.language as tl

    from lora_kernels.triton import lora_linear as tk
    from lora_kernels.triton import round_to_tf32

    @triton.jit
    def _round_to_tf32_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, round_to_tf32(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)

# (M, K, N, r): odd sizes with masked tails; ranks from 1 (padded to 16) to 512 (eight chunks of 64). Two have K
# (and N) a multiple of the interpreter's 32-wide reduction blocks: the unmasked EVEN_K / EVEN_N main loops, with
# edge rows (and columns) wrapped around; the last, K = N = 48, a multiple of 16 but not of the blocks: masked loops.
CASES = [(5, 67, 33, 1), (5, 67, 33, 16), (33, 130, 17, 8), (33, 130, 17, 64), (17, 40, 24, 256), (6, 40, 24, 512),
         (9, 64, 96, 16), (20, 96, 40, 8), (7, 48, 48, 16)]
SCALING = 0.75


@pytest.fixture
def dev(device):
    if device.type == "cpu" and not INTERPRET:
        pytest.skip("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")
    return device


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled float tensors, so an output element a kernel forgets to write shows up."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", empty)


def ref_s(x, lora_a, mask=None):
    x64 = x.double() if mask is None else x.double() * mask.double()
    return x64 @ lora_a.double().T


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("M,K,N,r", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward(dev, dtype, M, K, N, r, bias, poisoned_empty):
    x, weight, lora_a, lora_b, b = lora_inputs(M, K, N, r, dtype, dev, bias)
    y, s = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING, b)
    assert y.dtype == dtype and y.shape == (M, N)
    assert s.dtype == torch.float32 and s.shape == (M, r)
    assert_close(y, reference.lora_linear(x, weight, lora_a, lora_b, SCALING, b), dtype, "y")
    assert_close(s, ref_s(x, lora_a), torch.float32, "s", tf32=True)  # fp32 accumulation of exact products


@pytest.mark.parametrize("M,K,N,r", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward(dev, dtype, M, K, N, r, poisoned_empty):
    x, weight, lora_a, lora_b, _ = lora_inputs(M, K, N, r, dtype, dev, bias=False)
    dy = randn(M, N, dtype=dtype, device=dev)
    ref = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, SCALING)
    _, s = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING)
    d_lora_b, ds = tk.lora_bwd_dy(dy, s, lora_b, SCALING)
    assert d_lora_b.dtype == ds.dtype == torch.float32
    assert d_lora_b.shape == (N, r) and ds.shape == (M, r)
    # s, ds are fp32 results of rounded-precision inputs: the fp32 tolerance covers them.
    assert_close(d_lora_b, ref["lora_b"], torch.float32, "d_lora_b", tf32=True)
    assert_close(ds, SCALING * dy.double() @ lora_b.double(), torch.float32, "ds", tf32=True)
    dx = tk.lora_bwd_dx(dy, ds, weight, lora_a)
    assert dx.dtype == dtype and dx.shape == (M, K)
    assert_close(dx, ref["x"], dtype, "dx")
    d_lora_a = tk.lora_bwd_da(ds, x)
    assert d_lora_a.dtype == torch.float32 and d_lora_a.shape == (r, K)
    assert_close(d_lora_a, ref["lora_a"], torch.float32, "d_lora_a", tf32=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(dev, dtype, poisoned_empty):
    """x a transposed view, weight/lora_a column slices, dy a strided slice: strides are always passed."""
    M, K, N, r = 9, 70, 20, 8
    x = randn(K, M, dtype=dtype, device=dev).T  # [M, K], stride (1, M)
    weight = randn(N, 2 * K, dtype=dtype, device=dev, scale=K ** -0.5)[:, ::2]
    lora_a = randn(r, K + 5, dtype=dtype, device=dev, scale=K ** -0.5)[:, 5:]
    lora_b = randn(r, N, dtype=dtype, device=dev, scale=r ** -0.5).T
    b = randn(2 * N, dtype=dtype, device=dev)[::2]
    dy = randn(M, 3 * N, dtype=dtype, device=dev)[:, N:2 * N]
    assert not (x.is_contiguous() or weight.is_contiguous() or dy.is_contiguous() or lora_b.is_contiguous())
    y, s = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING, b)
    assert_close(y, reference.lora_linear(x, weight, lora_a, lora_b, SCALING, b), dtype, "y")
    ref = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, SCALING)
    s_t = s.T.contiguous().T  # an fp32 s with column-major strides
    d_lora_b, ds = tk.lora_bwd_dy(dy, s_t, lora_b, SCALING)
    assert_close(d_lora_b, ref["lora_b"], torch.float32, "d_lora_b", tf32=True)
    assert_close(tk.lora_bwd_dx(dy, ds, weight, lora_a), ref["x"], dtype, "dx")
    assert_close(tk.lora_bwd_da(ds, x), ref["lora_a"], torch.float32, "d_lora_a", tf32=True)


# Operands whose element span passes 2**31 with strides below it (Triton passes those as int32): views with a huge
# stride over a torch.empty storage of that span. Only the viewed elements are written, and the interpreter hands a
# CPU storage to the kernel as it is (UntypedStorage.cpu() returns it; the copy back is a self-copy torch skips), so
# the untouched pages never become resident: 4.3-4.6 GB of address space per operand, 0.8 GB peak RSS for a pytest
# process running these tests (measured). HUGE: 31 and 32 times it pass 2**31 (the interpreter's 32-wide K and N
# blocks: the last lane's offset and the pointer step); HUGE_RANK: 15 times it does (the 16-wide rank chunk of rank
# 16); HUGE_ROWS: 16 times it does (the 16-row blocks of dA's loop over M).
HUGE, HUGE_RANK, HUGE_ROWS = 70_000_000, 150_000_000, 135_000_000
# operand, (M, K, N, r), its strides, and what read outside the tensors with int32 products
SPAN_CASES = {
    "x_transposed": ("x", (5, 34, 6, 4), (1, HUGE), "shrink step; fwd x column offsets and step"),
    "weight_transposed": ("weight", (5, 34, 6, 4), (1, HUGE), "fwd W column offsets and step (a Conv1D's W.T)"),
    "weight_rows": ("weight", (5, 34, 33, 4), (HUGE, 1), "dx W row offsets and step (as W with K past 2**31 / 32)"),
    "lora_a_transposed": ("lora_a", (5, 34, 6, 4), (1, HUGE), "shrink A step"),
    "lora_a_rows": ("lora_a", (5, 34, 6, 16), (HUGE_RANK, 1), "dx LoRA term's A row offsets (as r·K past 2**31)"),
    "lora_b_transposed": ("lora_b", (5, 34, 6, 16), (1, HUGE_RANK), "fwd epilogue's B rank offsets"),
    "lora_b_rows": ("lora_b", (5, 34, 33, 4), (HUGE, 1), "dy B step"),
    "x_rows": ("x", (17, 34, 6, 4), (HUGE_ROWS, 1), "dA x step over M (as x with K past 2**31 / 16)"),
}


def _huge_span_copy(t, strides):
    """t's values in a view with `strides` over a fresh storage just large enough for them."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, strides))
    view = torch.empty(span, dtype=t.dtype, device=t.device).as_strided(t.shape, strides)
    return view.copy_(t)


@pytest.mark.parametrize("case", list(SPAN_CASES))
def test_operands_spanning_past_2_to_the_31_elements(dev, case, monkeypatch):
    """lora_linear forward and backward with one operand spanning past 2**31 elements through a stride below 2**31:
    every index times stride product is 64-bit, so y, dx, dA and dB match the reference on contiguous copies (with
    int32 products each case's kernel addressed memory gigabytes before its operand: tests/triton_bounds.py raised).
    One split (SPLIT_OVERRIDE = 1), so the split kernels take the pointer steps a split of one block never takes."""
    if dev.type != "cpu":
        pytest.skip("the interpreter's block sizes set the strides; the GPU case is test_reliability's")
    monkeypatch.setattr(tk, "SPLIT_OVERRIDE", 1)
    name, (M, K, N, r), strides, _ = SPAN_CASES[case]
    dtype = torch.float16
    x, weight, lora_a, lora_b, _ = lora_inputs(M, K, N, r, dtype, dev, bias=False)
    operands = dict(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b)
    operands[name] = _huge_span_copy(operands[name], strides)
    leaves = {key: operands[key].requires_grad_(key != "weight") for key in operands}
    y = lora_linear(leaves["x"], leaves["weight"], leaves["lora_a"], leaves["lora_b"], SCALING, backend="triton")
    dy = randn(M, N, dtype=dtype, device=dev)
    y.backward(dy)
    assert_close(y, reference.lora_linear(x, weight, lora_a, lora_b, SCALING), dtype, "y")
    expected = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, SCALING)
    for key in ("x", "lora_a", "lora_b"):
        assert_close(leaves[key].grad, expected[key], dtype, f"d{key}", scale=2.0)


def test_int64_variant_threshold(dev, monkeypatch):
    """The int32 variant multiplies strides below INT64_STRIDE by lanes of a block, block steps and rank indices
    only, so none of its products reaches 2**31 while every block and MAX_RANK stay within 2**31 / INT64_STRIDE.
    Contiguous operands keep it, at any M (the partials' and y's large strides only meet int64 indices); a transposed
    x with INT64_STRIDE tokens takes the INT64 variant."""
    blocks = [value for configs in tk.kernel_configs(gpu=True).values() for cfg in configs
              for key, value in cfg.kwargs.items() if key.startswith("BLOCK_")]
    largest = max(blocks + [tk.GPU_DY_BLOCK_M, tk.MAX_BLOCK_R, tk.MAX_RANK])
    assert largest * tk.INT64_STRIDE <= 2**31
    launched = []

    class Recording:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((self.name, kwargs["INT64"]))

    for name in ("_shrink", "_fwd", "_bwd_dy", "_bwd_dx", "_bwd_da"):
        monkeypatch.setattr(tk, name, Recording(name))
    M, K, N, r = tk.INT64_STRIDE // 16 + 1, 64, 64, 16  # M·r past the threshold: the partials' row stride
    x, weight = torch.empty(M, K, device=dev), torch.empty(N, K, device=dev)
    lora_a, lora_b = torch.empty(r, K, device=dev), torch.empty(N, r, device=dev)
    tk.lora_fwd(x, weight, lora_a, lora_b, SCALING)
    dy, s = torch.empty(M, N, device=dev), torch.empty(M, r, device=dev)
    tk.lora_bwd_dy(dy, s, lora_b, SCALING)
    tk.lora_bwd_dx(dy, s, weight, lora_a)
    tk.lora_bwd_da(s, x)
    assert len(launched) == 5 and not any(int64 for _, int64 in launched), launched
    launched.clear()
    tk.lora_fwd(torch.empty(K, tk.INT64_STRIDE, device=dev).T, weight, lora_a, lora_b, SCALING)
    assert launched == [("_shrink", True), ("_fwd", True)]


@pytest.mark.parametrize("launcher", ["lora_bwd_dy", "lora_bwd_dx"])
def test_launcher_operands_spanning_past_2_to_the_31_elements(dev, launcher, monkeypatch):
    """The backward launchers with dy (and ds) spanning past 2**31 elements through transposed views with strides
    below 2**31 (lora_linear itself passes a contiguous dy and the ds bwd_dy returns): dB and ds, or dx, match the
    reference. With int32 products bwd_dy's dy step wrapped, and dx's dy column offsets and step and its rank index
    times stride_dsr."""
    if dev.type != "cpu":
        pytest.skip("the interpreter's block sizes set the strides")
    monkeypatch.setattr(tk, "SPLIT_OVERRIDE", 1)
    M, K, N, r = 5, 24, 33, 16
    dtype = torch.float16
    _, weight, lora_a, lora_b, _ = lora_inputs(M, K, N, r, dtype, dev, bias=False)
    dy = randn(M, N, dtype=dtype, device=dev)
    if launcher == "lora_bwd_dy":
        s = randn(M, r, device=dev)
        d_lora_b, ds = tk.lora_bwd_dy(_huge_span_copy(dy, (1, HUGE)), s, lora_b, SCALING)
        assert_close(d_lora_b, SCALING * dy.double().T @ s.double(), torch.float32, "d_lora_b", tf32=True)
        assert_close(ds, SCALING * dy.double() @ lora_b.double(), torch.float32, "ds", tf32=True)
    else:
        ds = randn(M, r, device=dev)
        dx = tk.lora_bwd_dx(_huge_span_copy(dy, (1, HUGE)), _huge_span_copy(ds, (1, HUGE_RANK)), weight, lora_a)
        assert_close(dx, dy.double() @ weight.double() + ds.double() @ lora_a.double(), dtype, "dx")


def test_empty_batch(dev):
    M, K, N, r = 0, 40, 24, 8
    x, weight, lora_a, lora_b, b = lora_inputs(M, K, N, r, torch.float32, dev)
    y, s = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING, b, dropout_p=0.1, seed=3)
    assert y.shape == (0, N) and s.shape == (0, r)
    dy = randn(M, N, device=dev)
    d_lora_b, ds = tk.lora_bwd_dy(dy, s, lora_b, SCALING)
    assert d_lora_b.shape == (N, r) and ds.shape == (0, r) and torch.all(d_lora_b == 0)
    assert tk.lora_bwd_dx(dy, ds, weight, lora_a, dropout_p=0.1, seed=3).shape == (0, K)
    d_lora_a = tk.lora_bwd_da(ds, x, dropout_p=0.1, seed=3)
    assert d_lora_a.shape == (r, K) and torch.all(d_lora_a == 0)


def test_d_lora_b_is_deterministic(dev):
    """dB is reduced from per-row-block partials in a fixed order: bitwise equal across runs."""
    M, N, r = 40, 33, 16
    dy = randn(M, N, device=dev)
    s = randn(M, r, device=dev)
    lora_b = randn(N, r, device=dev)
    first = tk.lora_bwd_dy(dy, s, lora_b, SCALING)
    second = tk.lora_bwd_dy(dy, s, lora_b, SCALING)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_split_count_heuristic(monkeypatch):
    """The launchers' split of the backward reductions: SPLIT_PROGRAMS_PER_SM programs per SM, at most MAX_SPLIT,
    never more than the blocks of the split dimension, at least 1; the interpreter uses INTERPRET_SPLIT."""
    monkeypatch.setattr(tk, "SPLIT_OVERRIDE", None)
    per_sm, cap = tk.SPLIT_PROGRAMS_PER_SM, tk.MAX_SPLIT
    # M = 8192 (64 row blocks of 128) on an H100's 132 SMs: enough splits for per_sm programs per SM.
    assert tk._split_count(64, 32, 132) == min(-(-per_sm * 132 // 64), cap)
    assert tk._split_count(64, 32, 132) > 1
    assert tk._split_count(1, 1000, 132) == cap
    assert tk._split_count(64, 3, 132) == 3  # no more splits than blocks
    assert tk._split_count(10_000, 32, 132) == 1  # a grid that fills the GPU alone is not split
    assert tk._split_count(64, 32, None) == tk.INTERPRET_SPLIT
    assert tk._split_count(64, 1, None) == 1
    monkeypatch.setattr(tk, "SPLIT_OVERRIDE", 5)
    assert tk._split_count(64, 32, 132) == 5 and tk._split_count(64, 4, None) == 4


def test_autotune_keys_name_kernel_arguments_and_the_split_counts():
    """Triton's autotuner silently drops a key name that is not an argument of the kernel, so a misspelt key would
    reuse one shape's config for every other. The split kernels' keys hold their split count: SPLIT_OVERRIDE (the
    bench's "split / no split" rows) changes their grid, which must not reuse the config tuned for the other. The
    token count enters as its power-of-two bucket, never as M (see the next test)."""
    tuned = {name: kernel for name, kernel in vars(tk).items() if isinstance(kernel, triton.runtime.Autotuner)}
    assert {"_shrink", "_fwd", "_fwd_tma", "_bwd_dy", "_bwd_dx", "_bwd_dx_tma", "_bwd_da"} <= set(tuned)
    for name, kernel in tuned.items():
        assert set(kernel.keys) <= set(kernel.arg_names), (name, kernel.keys)
        assert "m_bucket" in kernel.keys and "M" not in kernel.keys, (name, kernel.keys)
    assert "split_k" in tk._shrink.keys and "split_n" in tk._bwd_dy.keys and "split_m" in tk._bwd_da.keys


def test_m_bucket_is_a_power_of_two_that_keeps_decode_apart():
    """Each M tunes as the next power of two at or above it, and no bucket holds both a decode-size M (the 16-row
    tiles) and a larger one, so the forward's prune, decided on the bucket, is right for every M in it."""
    for M in range(1, 1100):
        bucket = tk._m_bucket(M)
        assert M <= bucket < 2 * M and bucket & (bucket - 1) == 0
        assert (bucket <= tk.DECODE_MAX_M) == (M <= tk.DECODE_MAX_M), M


@pytest.mark.parametrize("gpu_blocks", [False, True], ids=["interpreter_blocks", "gpu_blocks"])
def test_splits_are_the_same_for_every_token_count_of_a_bucket(gpu_blocks, monkeypatch):
    """The split counts are part of their kernels' autotune keys: taken from M itself they changed within a bucket
    (8 values for the shrink over M = 4097..8192 on 132 SMs), and each new value was timed again. With the
    interpreter's small blocks dA's split never reaches M's block count, so M could not vary it: the GPU's block
    maxima are checked too."""
    monkeypatch.setattr(tk, "_device_sm_count", lambda device: 132)
    if gpu_blocks:
        configs = tk.kernel_configs(gpu=True)
        for name, kernel, block in [("_SHRINK_MAX_BLOCK_M", "_lora_shrink_kernel", "BLOCK_M"),
                                    ("_SHRINK_MAX_BLOCK_K", "_lora_shrink_kernel", "BLOCK_K"),
                                    ("_DY_MAX_BLOCK_N", "_lora_bwd_dy_kernel", "BLOCK_N"),
                                    ("_DA_MAX_BLOCK_M", "_lora_bwd_da_kernel", "BLOCK_M"),
                                    ("_DA_MAX_BLOCK_K", "_lora_bwd_da_kernel", "BLOCK_K")]:
            monkeypatch.setattr(tk, name, tk.max_block(configs[kernel], block))
        monkeypatch.setattr(tk, "DY_BLOCK_M", tk.GPU_DY_BLOCK_M)
    for low in (17, 300, 1025, 4097):
        tokens = range(low, tk._m_bucket(low) + 1, 7)
        for split in (lambda M: tk._shrink_split(M, 4096, 16, None),
                      lambda M: tk._bwd_dy_split(M, 4096, 16, None, torch.bfloat16),
                      lambda M: tk._bwd_da_split(M, 4096, 16, None)):
            assert len({split(M) for M in tokens}) == 1, (low, [split(M) for M in tokens])


# The tiles each kernel pipelines through shared memory, as its math reads them: (row block, column block) of
# each operand tile along the reduction block, and the reduction block.
_PIPELINED_TILES = {
    "_lora_shrink_kernel": (("BLOCK_M", "BLOCK_R"), "BLOCK_K", "x_ptr"),  # x [M, K], A [R, K]
    "_lora_fwd_kernel": (("BLOCK_M", "BLOCK_N"), "BLOCK_K", "x_ptr"),  # x [M, K], W [N, K]
    "_lora_bwd_dy_kernel": (("BLOCK_M", "BLOCK_R"), "BLOCK_N", "dy_ptr"),  # dY [M, N], B [N, R]
    "_lora_bwd_dx_kernel": (("BLOCK_M", "BLOCK_K"), "BLOCK_N", "dy_ptr"),  # dY [M, N], W [N, K]
    "_lora_bwd_da_kernel": (("BLOCK_R", "BLOCK_K"), "BLOCK_M", "x_ptr"),  # dS [M, R], x [M, K]
    "_lora_fwd_tma_kernel": (("BLOCK_M", "BLOCK_N"), "BLOCK_K", "y_ptr"),  # as _lora_fwd_kernel
    "_lora_bwd_dx_tma_kernel": (("BLOCK_M", "BLOCK_K"), "BLOCK_N", "dx_ptr"),  # as _lora_bwd_dx_kernel
}


@pytest.mark.parametrize("kernel", sorted(_PIPELINED_TILES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shared_memory_prune_sizes_the_tiles_each_kernel_pipelines(kernel, dtype):
    """The prune keeps a GPU config exactly when its pipelined operand tiles fit SMEM_BUDGET. Its block names are
    positional: dA's reduction block (BLOCK_M) swapped with its rank block let two fp32 configs near sm_80's limit
    through, and no other test looked."""
    (rows, cols), inner, pointer = _PIPELINED_TILES[kernel]
    configs = tk.kernel_configs(gpu=True)[kernel]
    fixed = {"BLOCK_M": tk.GPU_DY_BLOCK_M} if kernel == "_lora_bwd_dy_kernel" else {}
    for chunk in (16, 32, 64):
        blocks = lambda cfg: {**fixed, "BLOCK_R": chunk, **cfg.kwargs}
        fits = [cfg for cfg in configs if cfg.num_stages * (blocks(cfg)[rows] + blocks(cfg)[cols]) *
                blocks(cfg)[inner] * dtype.itemsize <= tk.SMEM_BUDGET]
        kept = tk._PRUNE[kernel](configs, {pointer: torch.empty(0, dtype=dtype)}, **fixed, BLOCK_R=chunk)
        assert kept == (fits or configs[:1]), (chunk, [cfg.kwargs for cfg in kept])


@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
def test_a_new_token_count_in_a_tuned_bucket_is_not_timed_again(dev, tma, monkeypatch):
    """Training with dynamic padding meets a new M nearly every step: keyed on M, the autotuner timed every config
    of every kernel again for each (Triton's default timing: 25 + 100 ms per config). Every autotuned launch of a
    forward and backward gets two candidate configs and a counter for timing: M = 20 and then 30 (bucket 32) time
    each kernel's candidates once, M = 40 (bucket 64) again; every result is still right."""
    if tma:
        _tma_or_skip(dev)
    monkeypatch.setattr(tk, "USE_TMA", tma)
    timed = {}

    def counting_bench(log):
        def bench(*args, config, **kwargs):
            log.append(config)
            return float(len(log))  # the first candidate timed wins
        return bench

    for name in ("_shrink", "_fwd", "_fwd_tma", "_bwd_dy", "_bwd_dx", "_bwd_dx_tma", "_bwd_da"):
        autotuner = getattr(tk, name)
        config = autotuner.configs[0]
        twin = tk._config(config.num_warps, config.num_stages, config.pre_hook, **config.kwargs)
        monkeypatch.setattr(autotuner, "configs", [config, twin])
        monkeypatch.setattr(autotuner, "cache", {})
        monkeypatch.setattr(autotuner, "cache_results", False)  # TRITON_CACHE_AUTOTUNING=1 would answer from disk
        timed[name] = []
        monkeypatch.setattr(autotuner, "_bench", counting_bench(timed[name]))
    used = ("_shrink", "_fwd_tma" if tma else "_fwd", "_bwd_dy", "_bwd_dx_tma" if tma else "_bwd_dx", "_bwd_da")
    counts = []
    dtype = torch.bfloat16 if tma else torch.float32  # the TMA kernels are 16-bit only
    for M in (20, 30, 40):
        x, weight, lora_a, lora_b, _ = lora_inputs(M, 48, 32, 8, dtype, dev, False)
        dy = randn(M, 32, dtype=dtype, device=dev)
        y, s = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING)
        d_lora_b, ds = tk.lora_bwd_dy(dy, s, lora_b, SCALING)
        dx = tk.lora_bwd_dx(dy, ds, weight, lora_a)
        d_lora_a = tk.lora_bwd_da(ds, x)
        expected = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, SCALING)
        assert_close(y, reference.lora_linear(x, weight, lora_a, lora_b, SCALING), dtype, "y")
        for name, got in (("x", dx), ("lora_a", d_lora_a), ("lora_b", d_lora_b)):
            assert_close(got, expected[name], dtype, f"d{name}", scale=2.0)
        counts.append({name: len(timed[name]) for name in used})
    assert counts == [dict.fromkeys(used, 2), dict.fromkeys(used, 2), dict.fromkeys(used, 4)], counts
    for name in used:  # m_bucket leads every key; one key per bucket (the split counts follow the bucket too)
        assert sorted(key[0] for key in getattr(tk, name).cache) == [32, 64], (name, getattr(tk, name).cache)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["nodrop", "drop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("split", [3, 4])
def test_backward_split_paths(dev, dtype, split, dropout_p, monkeypatch, poisoned_empty):
    """bwd_dy split over N and bwd_da split over M (forced through SPLIT_OVERRIDE), with uneven and empty last
    splits (5 blocks into 3 or 4 chunks of 2 blocks; 3 blocks of M into 3, or into 4 with one empty, as dA counts
    the blocks of M's bucket) and two rank chunks: they match the reference and are bitwise repeatable."""
    monkeypatch.setattr(tk, "SPLIT_OVERRIDE", split)
    seed = 77
    # Sizes in blocks of the largest config block, which the launchers count the blocks in (5 and 4 or 2-3 blocks).
    block_m, block_n = tk._DA_MAX_BLOCK_M, tk._DY_MAX_BLOCK_N
    for M, K, N, r in [(5 * block_m - 3, 67, 5 * block_n - 2, 16), (2 * block_m + 1, 40, 4 * block_n, 70)]:
        assert tk._bwd_dy_split(M, N, r, dev, dtype) > 1 and tk._bwd_da_split(M, K, r, dev) > 1
        x, weight, lora_a, lora_b, _ = lora_inputs(M, K, N, r, dtype, dev, bias=False)
        dy = randn(M, N, dtype=dtype, device=dev)
        mask = tk.dropout_mask(seed, M, K, dropout_p, dev)
        ref = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, SCALING, dropout_mask=mask)
        _, s = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING, dropout_p=dropout_p, seed=seed)
        d_lora_b, ds = tk.lora_bwd_dy(dy, s, lora_b, SCALING)
        assert_close(d_lora_b, ref["lora_b"], torch.float32, "d_lora_b", tf32=True)
        assert_close(ds, SCALING * dy.double() @ lora_b.double(), torch.float32, "ds", tf32=True)
        d_lora_a = tk.lora_bwd_da(ds, x, dropout_p=dropout_p, seed=seed)
        assert_close(d_lora_a, ref["lora_a"], torch.float32, "d_lora_a", tf32=True)
        again = tk.lora_bwd_dy(dy, s, lora_b, SCALING)
        assert torch.equal(again[0], d_lora_b) and torch.equal(again[1], ds)
        assert torch.equal(tk.lora_bwd_da(ds, x, dropout_p=dropout_p, seed=seed), d_lora_a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bwd_dy_past_the_partials_budget(dev, dtype, monkeypatch):
    """Past DY_PARTIALS_BUDGET bytes of dB partials the dY part of the backward is two GEMMs, not the kernel (whose
    partials grow with M·N·r): the same gradients, to the dtype's rounding, through lora_linear too."""
    M, K, N, r = 70, 24, 33, 8
    x, weight, lora_a, lora_b, _ = lora_inputs(M, K, N, r, dtype, dev, bias=False)
    dy = randn(M, N, dtype=dtype, device=dev)
    _, s = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING)
    at_budget = -(-M // tk.DY_BLOCK_M) * N * r * 4
    kernel = tk.lora_bwd_dy(dy, s, lora_b, SCALING)
    monkeypatch.setattr(tk, "DY_PARTIALS_BUDGET", at_budget)  # exactly at the budget: still the kernel
    at = tk.lora_bwd_dy(dy, s, lora_b, SCALING)
    assert torch.equal(at[0], kernel[0]) and torch.equal(at[1], kernel[1])
    monkeypatch.setattr(tk, "DY_PARTIALS_BUDGET", at_budget - 1)
    monkeypatch.setattr(tk, "_bwd_dy", None)  # launching the kernel now would fail
    d_lora_b, ds = tk.lora_bwd_dy(dy, s, lora_b, SCALING)
    assert d_lora_b.dtype == ds.dtype == torch.float32
    assert_close(d_lora_b, kernel[0].double(), dtype, "d_lora_b")
    assert_close(ds, kernel[1].double(), dtype, "ds")
    leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
    lora_linear(leaves[0], weight, leaves[1], leaves[2], SCALING, backend="triton").backward(dy)
    expected = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, SCALING)
    for name, leaf in zip(("x", "lora_a", "lora_b"), leaves):
        assert_close(leaf.grad, expected[name], dtype, f"d{name}", scale=2.0)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["nodrop", "drop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("split", [3, 4])
def test_shrink_split_paths(dev, dtype, split, dropout_p, monkeypatch, poisoned_empty):
    """The forward's shrink split over K (forced through SPLIT_OVERRIDE), at decode and larger M, with uneven and
    empty last splits (5 blocks of K into 3 or 4 chunks of 2 blocks; 4 blocks) and two rank chunks: s and y match
    the reference and repeat bit for bit."""
    monkeypatch.setattr(tk, "SPLIT_OVERRIDE", split)
    seed = 5
    block_k = tk._SHRINK_MAX_BLOCK_K
    for M, K, N, r in [(1, 5 * block_k - 3, 24, 16), (3, 4 * block_k, 17, 70), (2 * tk._SHRINK_MAX_BLOCK_M + 1,
                                                                            5 * block_k, 20, 8)]:
        assert tk._shrink_split(M, K, r, dev) > 1
        x, weight, lora_a, lora_b, b = lora_inputs(M, K, N, r, dtype, dev)
        mask = tk.dropout_mask(seed, M, K, dropout_p, dev)
        y, s = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING, b, dropout_p=dropout_p, seed=seed)
        assert s.shape == (M, r) and s.dtype == torch.float32
        assert_close(s, ref_s(x, lora_a, mask), torch.float32, "s", tf32=True)
        assert_close(y, reference.lora_linear(x, weight, lora_a, lora_b, SCALING, b, dropout_mask=mask), dtype, "y")
        again = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING, b, dropout_p=dropout_p, seed=seed)
        assert torch.equal(again[0], y) and torch.equal(again[1], s)


# ---------------------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------------------


def test_dropout_mask_values_fraction_and_seeds(dev):
    M, K, p = 64, 96, 0.3
    mask = tk.dropout_mask(11, M, K, p, dev)
    assert mask.dtype == torch.float32 and mask.shape == (M, K)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).item()
    assert torch.all((mask == 0) | (mask == scale))
    dropped = (mask == 0).double().mean().item()
    assert abs(dropped - p) < 0.04, dropped  # 6144 Bernoulli(0.3) draws: std 0.006
    assert torch.equal(mask, tk.dropout_mask(11, M, K, p, dev)), "same seed, same mask"
    assert not torch.equal(mask, tk.dropout_mask(12, M, K, p, dev)), "another seed, another mask"
    assert torch.all(tk.dropout_mask(11, M, K, 0.0, dev) == 1)
    big_seed = tk.dropout_mask(2**40 + 11, M, K, p, dev)  # 64-bit seeds reach the kernel intact
    assert not torch.equal(mask, big_seed) and abs((big_seed == 0).double().mean().item() - p) < 0.04
    # The mask of a smaller M is the leading rows of a larger one: it depends on (seed, m * K + k) only.
    assert torch.equal(tk.dropout_mask(11, 7, K, p, dev), mask[:7])


def test_dropout_p0_is_no_dropout(dev):
    x, weight, lora_a, lora_b, b = lora_inputs(9, 40, 20, 8, torch.float32, dev)
    plain = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING, b)
    seeded = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING, b, dropout_p=0.0, seed=1234)
    assert torch.equal(plain[0], seeded[0]) and torch.equal(plain[1], seeded[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_forward_and_backward_share_the_mask(dev, dtype, poisoned_empty):
    """Every kernel regenerates the forward's mask from the seed: compare all of them to the reference fed with
    dropout_mask(). Ranks 16 and 70 (two chunks) over two shapes."""
    p, seed = 0.25, 2024
    for M, K, N, r in [(17, 67, 33, 16), (6, 40, 20, 70)]:
        x, weight, lora_a, lora_b, b = lora_inputs(M, K, N, r, dtype, dev)
        mask = tk.dropout_mask(seed, M, K, p, dev)
        y, s = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING, b, dropout_p=p, seed=seed)
        assert_close(y, reference.lora_linear(x, weight, lora_a, lora_b, SCALING, b, dropout_mask=mask), dtype, "y")
        assert_close(s, ref_s(x, lora_a, mask), torch.float32, "s", tf32=True)
        dy = randn(M, N, dtype=dtype, device=dev)
        ref = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, SCALING, dropout_mask=mask)
        d_lora_b, ds = tk.lora_bwd_dy(dy, s, lora_b, SCALING)
        assert_close(d_lora_b, ref["lora_b"], torch.float32, "d_lora_b", tf32=True)
        assert_close(tk.lora_bwd_dx(dy, ds, weight, lora_a, dropout_p=p, seed=seed), ref["x"], dtype, "dx")
        assert_close(tk.lora_bwd_da(ds, x, dropout_p=p, seed=seed), ref["lora_a"], torch.float32, "d_lora_a", tf32=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_keeps_a_dropped_nan(dev, dtype):
    """A NaN that dropout drops is still NaN after it (x·0, as torch's dropout x·mask, the other backends and the
    reference give): in S, dA and dB for a NaN of x, in dX's LoRA term for a NaN of A. The kernels selected 0 for
    dropped elements, which left them finite."""
    if dtype == torch.bfloat16 and dev.type == "cpu":
        pytest.skip("the Triton interpreter's bf16 multiply gives NaN·0 = 0")
    p, seed, (M, K, N, r) = 0.5, 7, (6, 40, 20, 8)
    x, weight, lora_a, lora_b, _ = lora_inputs(M, K, N, r, dtype, dev)
    mask = tk.dropout_mask(seed, M, K, p, dev)
    row, col = (mask == 0).nonzero()[0].tolist()
    x[row, col] = float("nan")
    s = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING, dropout_p=p, seed=seed)[1]
    assert s[row].isnan().all()
    dy = randn(M, N, dtype=dtype, device=dev)
    ref = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, SCALING, dropout_mask=mask)
    d_lora_b, ds = tk.lora_bwd_dy(dy, s, lora_b, SCALING)
    assert torch.equal(d_lora_b.isnan(), ref["lora_b"].isnan())
    assert torch.equal(tk.lora_bwd_da(ds, x, dropout_p=p, seed=seed).isnan(), ref["lora_a"].isnan())
    lora_a[0, col] = float("nan")
    assert tk.lora_bwd_dx(dy, ds, weight, lora_a, dropout_p=p, seed=seed)[:, col].isnan().all()


def test_dropout_seeds_change_the_result_and_p1_drops_everything(dev):
    x, weight, lora_a, lora_b, _ = lora_inputs(9, 40, 20, 8, torch.float32, dev)
    s1 = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING, dropout_p=0.5, seed=1)[1]
    s2 = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING, dropout_p=0.5, seed=2)[1]
    assert not torch.equal(s1, s2)
    y, s = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING, dropout_p=1.0, seed=1)
    assert torch.all(s == 0)
    assert_close(y, x.double() @ weight.double().T, torch.float32, "y with everything dropped", tf32=True)


# ---------------------------------------------------------------------------------------------------------------
# Input checks: raised before any launch, naming the argument
# ---------------------------------------------------------------------------------------------------------------


def test_forward_rejects_bad_inputs(dev):
    x, weight, lora_a, lora_b, b = lora_inputs(4, 32, 16, 8, torch.float32, dev)
    fwd = tk.lora_fwd
    cases = [
        (ValueError, "weight", lambda: fwd(x, weight[:, :31], lora_a, lora_b, 1.0)),
        (ValueError, "lora_a", lambda: fwd(x, weight, lora_a[:, :31], lora_b, 1.0)),
        (ValueError, "lora_b", lambda: fwd(x, weight, lora_a, lora_b[:15], 1.0)),
        (ValueError, "lora_b", lambda: fwd(x, weight, lora_a, lora_b[:, :7], 1.0)),
        (ValueError, "bias", lambda: fwd(x, weight, lora_a, lora_b, 1.0, b[:15])),
        (ValueError, "x", lambda: fwd(x[None], weight, lora_a, lora_b, 1.0)),
        (ValueError, "lora_a", lambda: fwd(x, weight, lora_a[:0], lora_b[:, :0], 1.0)),
        (TypeError, "weight", lambda: fwd(x, weight.half(), lora_a, lora_b, 1.0)),
        (TypeError, "lora_b", lambda: fwd(x, weight, lora_a, lora_b.bfloat16(), 1.0)),
        (TypeError, "bias", lambda: fwd(x, weight, lora_a, lora_b, 1.0, b.double())),
        (TypeError, "x", lambda: fwd(x.to(torch.int32), weight, lora_a, lora_b, 1.0)),
        (TypeError, "x", lambda: fwd(x.double(), weight, lora_a, lora_b, 1.0)),
        (TypeError, "x", lambda: fwd(x.tolist(), weight, lora_a, lora_b, 1.0)),
        (ValueError, "dropout_p", lambda: fwd(x, weight, lora_a, lora_b, 1.0, dropout_p=1.5)),
        (TypeError, "dropout_p", lambda: fwd(x, weight, lora_a, lora_b, 1.0, dropout_p="0.1")),
        (TypeError, "seed", lambda: fwd(x, weight, lora_a, lora_b, 1.0, dropout_p=0.1, seed=0.5)),
        (ValueError, "seed", lambda: fwd(x, weight, lora_a, lora_b, 1.0, dropout_p=0.1, seed=-1)),
        (TypeError, "scaling", lambda: fwd(x, weight, lora_a, lora_b, torch.tensor(1.0))),
        (ValueError, "scaling", lambda: fwd(x, weight, lora_a, lora_b, float("inf"))),
        # an int past float's range: math.isfinite raised OverflowError, naming nothing
        (ValueError, "scaling", lambda: fwd(x, weight, lora_a, lora_b, 10**400)),
    ]
    for error, name, call in cases:
        with pytest.raises(error, match=rf"lora_fwd: {name} expected"):
            call()


def test_backward_rejects_bad_inputs(dev):
    M, K, N, r = 4, 32, 16, 8
    x, weight, lora_a, lora_b, _ = lora_inputs(M, K, N, r, torch.float32, dev)
    dy = randn(M, N, device=dev)
    s = randn(M, r, device=dev)
    cases = [
        (ValueError, "lora_bwd_dy: lora_b", lambda: tk.lora_bwd_dy(dy, s, lora_b[:15], 1.0)),
        (ValueError, "lora_bwd_dy: s", lambda: tk.lora_bwd_dy(dy, s[:, :7], lora_b, 1.0)),
        (ValueError, "lora_bwd_dy: s", lambda: tk.lora_bwd_dy(dy, s[:3], lora_b, 1.0)),
        (TypeError, "lora_bwd_dy: s", lambda: tk.lora_bwd_dy(dy, s.half(), lora_b, 1.0)),
        (TypeError, "lora_bwd_dy: lora_b", lambda: tk.lora_bwd_dy(dy, s, lora_b.half(), 1.0)),
        (TypeError, "lora_bwd_dy: dy", lambda: tk.lora_bwd_dy(dy.long(), s, lora_b, 1.0)),
        (ValueError, "lora_bwd_dx: weight", lambda: tk.lora_bwd_dx(dy, s, weight[:15], lora_a)),
        (ValueError, "lora_bwd_dx: lora_a", lambda: tk.lora_bwd_dx(dy, s, weight, lora_a[:, :31])),
        (ValueError, "lora_bwd_dx: ds", lambda: tk.lora_bwd_dx(dy, s[:, :7], weight, lora_a)),
        (TypeError, "lora_bwd_dx: weight", lambda: tk.lora_bwd_dx(dy, s, weight.bfloat16(), lora_a)),
        (TypeError, "lora_bwd_dx: ds", lambda: tk.lora_bwd_dx(dy, s.bfloat16(), weight, lora_a)),
        (ValueError, "lora_bwd_da: ds", lambda: tk.lora_bwd_da(s[:3], x)),
        (TypeError, "lora_bwd_da: ds", lambda: tk.lora_bwd_da(s.half(), x)),
        (TypeError, "lora_bwd_da: x", lambda: tk.lora_bwd_da(s, x.to(torch.int16))),
        (ValueError, "lora_bwd_da: dropout_p", lambda: tk.lora_bwd_da(s, x, dropout_p=-0.1)),
    ]
    for error, prefix, call in cases:
        with pytest.raises(error, match=rf"{prefix} expected"):
            call()


def test_launchers_refuse_other_devices_bad_seed_tensors_and_mask_sizes(dev, monkeypatch):
    x, weight, lora_a, lora_b, _ = lora_inputs(4, 32, 16, 8, torch.float32, dev)
    with pytest.raises(ValueError, match=rf"lora_fwd: weight expected device {x.device}, got meta"):
        tk.lora_fwd(x, weight.to("meta"), lora_a, lora_b, 1.0)
    with pytest.raises(TypeError, match="lora_fwd: seed expected an int or a 0-d int64 CPU tensor, got a torch.int32"):
        tk.lora_fwd(x, weight, lora_a, lora_b, 1.0, dropout_p=0.1, seed=torch.tensor(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="dropout_mask: K expected a non-negative int, got -1"):
        tk.dropout_mask(0, 4, -1, 0.1, dev)
    if dev.type == "cpu":  # without the interpreter CPU tensors are refused by name, not handed to a GPU kernel
        monkeypatch.setattr(tk, "INTERPRET", False)  # read by dropout_mask's check
        monkeypatch.setattr(lora_kernels.triton, "INTERPRET", False)  # read by check_tensor
        with pytest.raises(ValueError, match="lora_fwd: x is on cpu; the Triton kernels need CUDA tensors"):
            tk.lora_fwd(x, weight, lora_a, lora_b, 1.0)
        with pytest.raises(ValueError, match="dropout_mask: device is cpu; the Triton kernels need CUDA"):
            tk.dropout_mask(0, 4, 4, 0.1, "cpu")


# ---------------------------------------------------------------------------------------------------------------
# torch.compile / custom op registration
# ---------------------------------------------------------------------------------------------------------------


def test_custom_ops_are_registered():
    for name in ("triton_lora_fwd", "triton_lora_bwd_dy", "triton_lora_bwd_dx", "triton_lora_bwd_da"):
        assert hasattr(torch.ops.lora_kernels, name), name


def test_every_launcher_runs_on_its_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: each launcher makes its tensors' device current first (tensors
    on cuda:1 while cuda:0 is current would otherwise be addressed from GPU 0). Checked with a stand-in tensor; a
    real two-GPU run is the gpu test below."""
    import contextlib

    from lora_kernels.triton import on_tensor_device, sgmv
    for launcher in (tk._lora_fwd_impl, tk._lora_bwd_dy_impl, tk._lora_bwd_dx_impl, tk._lora_bwd_da_impl,
                     tk._launch_dropout_mask, sgmv._launch_shrink, sgmv._launch_expand, sgmv._launch_segment_outer):
        # under one_launch_at_a_time (test_reliability.py checks that every launch holds its lock)
        assert launcher.__wrapped__.__code__ is on_tensor_device(lambda t: t).__code__, launcher.__name__
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext(entered.append(d)))

    class OnSecondGpu:
        is_cuda, device = True, torch.device("cuda", 1)

    assert on_tensor_device(lambda t, n: n + 1)(OnSecondGpu(), 2) == 3
    assert entered == [torch.device("cuda", 1)]
    on_tensor_device(lambda t: t)(torch.zeros(1))  # CPU tensors (the interpreter): nothing to switch
    assert len(entered) == 1
    # with cuda:1 current, a tensor on cuda:1 runs where it is
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert on_tensor_device(lambda t: t.device)(OnSecondGpu()) == torch.device("cuda", 1) and len(entered) == 1


def test_sm_count_of_an_index_less_cuda_device_is_the_current_devices(monkeypatch):
    """The launchers size their grids by sm_count(x.device); a "cuda" device without an index is the current device
    (checked on a stand-in machine of two GPUs with different SM counts; the count is cached per index)."""
    from types import SimpleNamespace

    from lora_kernels import triton as triton_pkg
    counts = {0: 132, 1: 78}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(multi_processor_count=counts[index]))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    triton_pkg._sm_count_of.cache_clear()
    try:
        assert triton_pkg.sm_count(torch.device("cuda")) == 78
        assert triton_pkg.sm_count(torch.device("cuda", 0)) == 132
        assert triton_pkg.sm_count(torch.device("cuda", 1)) == 78
    finally:
        triton_pkg._sm_count_of.cache_clear()  # the stand-in counts must not outlive the test


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_on_the_second_gpu():
    device = torch.device("cuda", 1)
    x, weight, lora_a, lora_b, b = lora_inputs(33, 130, 17, 8, torch.bfloat16, device)
    with torch.cuda.device(0):
        y, _ = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING, b)
    assert_close(y, reference.lora_linear(x, weight, lora_a, lora_b, SCALING, b), torch.bfloat16, "y on cuda:1")


def test_opcheck_forward(dev):
    x, weight, lora_a, lora_b, b = lora_inputs(5, 40, 20, 8, torch.float32, dev)
    torch.library.opcheck(torch.ops.lora_kernels.triton_lora_fwd.default,
                          (x, weight, lora_a, lora_b, SCALING, b, 0.1, torch.tensor(7)),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_opcheck_backward(dev, dtype):
    """The fake impls of the three backward ops against their real outputs: shapes (N != K, so dx [M, K] is not
    [M, N]) and dtypes (dA, dB and dS float32 whatever x's dtype, dX in dy's). torch.compile trusts the fakes: a
    float16 fake dA (the real one float32) passed every aot_eager compile test, whose graphs cast it anyway."""
    M, K, N, r = 5, 40, 20, 8
    x, weight, lora_a, lora_b, _ = lora_inputs(M, K, N, r, dtype, dev)
    dy = randn(M, N, device=dev).to(dtype)
    s = randn(M, r, device=dev)
    ds = randn(M, r, device=dev)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.lora_kernels.triton_lora_bwd_dy.default, (dy, s, lora_b, SCALING),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.lora_kernels.triton_lora_bwd_dx.default,
                          (dy, ds, weight, lora_a, 0.1, torch.tensor(7)), test_utils=utils)
    torch.library.opcheck(torch.ops.lora_kernels.triton_lora_bwd_da.default, (ds, x, 0.1, torch.tensor(7)),
                          test_utils=utils)


# (op, its valid arguments changed by `change`, the error's message) for the raw ops called directly
_RAW_OP_BAD_ARGUMENTS = {
    "fwd: lora_b of another rank": ("triton_lora_fwd", lambda a, d: a.update(lora_b=randn(20, 7, device=d)),
                                    "lora_fwd: lora_b expected shape [20, 8], got [20, 7]"),
    "fwd: weight of another K": ("triton_lora_fwd", lambda a, d: a.update(weight=randn(20, 41, device=d)),
                                 "lora_fwd: weight expected shape [*, 40], got [20, 41]"),
    "fwd: bias of another N": ("triton_lora_fwd", lambda a, d: a.update(bias=randn(19, device=d)),
                               "lora_fwd: bias expected shape [20], got [19]"),
    "fwd: dropout past 1": ("triton_lora_fwd", lambda a, d: a.update(dropout_p=1.5),
                            "lora_fwd: dropout_p expected a float in [0, 1], got 1.5"),
    "bwd_dy: s of fewer tokens": ("triton_lora_bwd_dy", lambda a, d: a.update(s=randn(4, 8, device=d)),
                                  "lora_bwd_dy: s expected shape [5, 8], got [4, 8]"),
    "bwd_dy: lora_b of another N": ("triton_lora_bwd_dy", lambda a, d: a.update(lora_b=randn(21, 8, device=d)),
                                    "lora_bwd_dy: lora_b expected shape [20, *], got [21, 8]"),
    "bwd_dx: ds of fewer tokens": ("triton_lora_bwd_dx", lambda a, d: a.update(ds=randn(4, 8, device=d)),
                                   "lora_bwd_dx: ds expected shape [5, 8], got [4, 8]"),
    "bwd_dx: lora_a of another K": ("triton_lora_bwd_dx", lambda a, d: a.update(lora_a=randn(8, 39, device=d)),
                                    "lora_bwd_dx: lora_a expected shape [*, 40], got [8, 39]"),
    "bwd_da: x of fewer tokens": ("triton_lora_bwd_da", lambda a, d: a.update(x=randn(4, 40, device=d)),
                                  "lora_bwd_da: ds expected shape [4, *], got [5, 8]"),
    "bwd_da: a float seed": ("triton_lora_bwd_da", lambda a, d: a.update(seed=torch.tensor(7.0)),
                             "lora_bwd_da: seed expected an int or a 0-d int64 CPU tensor, got a torch.float32"),
    "dropout_mask: dropout past 1": ("triton_dropout_mask", lambda a, d: a.update(p=1.5),
                                     "dropout_mask: dropout_p expected a float in [0, 1], got 1.5"),
}


def _raw_op_arguments(op, device):
    """Keyword arguments of a valid call of lora_kernels::op: M = 5, K = 40, N = 20, r = 8, float32."""
    x, weight, lora_a, lora_b, bias = lora_inputs(5, 40, 20, 8, torch.float32, device)
    dy, s = randn(5, 20, device=device), randn(5, 8, device=device)
    seed = torch.tensor(7)
    return {"triton_lora_fwd": dict(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, scaling=SCALING, bias=bias,
                                    dropout_p=0.1, seed=seed),
            "triton_lora_bwd_dy": dict(dy=dy, s=s, lora_b=lora_b, scaling=SCALING),
            "triton_lora_bwd_dx": dict(dy=dy, ds=s, weight=weight, lora_a=lora_a, dropout_p=0.1, seed=seed),
            "triton_lora_bwd_da": dict(ds=s, x=x, dropout_p=0.1, seed=seed),
            "triton_dropout_mask": dict(seed=seed, M=5, K=40, p=0.1, device=device)}[op]


@pytest.mark.parametrize("case", list(_RAW_OP_BAD_ARGUMENTS))
def test_the_raw_ops_check_their_arguments_as_the_launchers_do(case, dev):
    """torch.ops.lora_kernels.triton_lora_* called directly (or by an exported program) run the launchers' checks
    before their kernels: unchecked, the kernels indexed by the shapes given. The valid call runs."""
    op_name, change, message = _RAW_OP_BAD_ARGUMENTS[case]
    op = getattr(torch.ops.lora_kernels, op_name)
    assert op(**_raw_op_arguments(op_name, dev)) is not None
    arguments = _raw_op_arguments(op_name, dev)
    change(arguments, dev)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        op(**arguments)


def test_torch_compile_fullgraph(dev):
    """torch.compile(fullgraph=True) traces the launchers (checks included) and the ops without graph breaks."""
    torch._dynamo.reset()
    M, K, N, r = 6, 40, 20, 8
    x, weight, lora_a, lora_b, b = lora_inputs(M, K, N, r, torch.float32, dev)
    dy = randn(M, N, device=dev)

    def step(x, weight, lora_a, lora_b, b, dy):
        y, s = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING, b, dropout_p=0.2, seed=5)
        d_lora_b, ds = tk.lora_bwd_dy(dy, s, lora_b, SCALING)
        dx = tk.lora_bwd_dx(dy, ds, weight, lora_a, dropout_p=0.2, seed=5)
        d_lora_a = tk.lora_bwd_da(ds, x, dropout_p=0.2, seed=5)
        return y, dx, d_lora_a, d_lora_b

    backend = "aot_eager" if dev.type == "cpu" else "inductor"
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    for got, want in zip(compiled(x, weight, lora_a, lora_b, b, dy), step(x, weight, lora_a, lora_b, b, dy)):
        torch.testing.assert_close(got, want)


def test_forward_configs_follow_m():
    """The forward's autotune candidates on a GPU: the decode tiles (16 rows) for M <= DECODE_MAX_M, the others
    above; the interpreter's single config for every M (each set falls back to what fits when it would be empty)."""
    x = torch.empty(0, dtype=torch.bfloat16)
    gpu = tk.kernel_configs(gpu=True)["_lora_fwd_kernel"]

    def launch_args(M):  # as the autotuner passes them
        return {"x_ptr": x, "M": M, "m_bucket": tk._m_bucket(M)}

    def block_rows(M):
        return sorted({cfg.kwargs["BLOCK_M"] for cfg in tk._prune_fwd(gpu, launch_args(M), BLOCK_R=16)})

    assert block_rows(1) == block_rows(tk.DECODE_MAX_M) == [16]
    assert block_rows(tk.DECODE_MAX_M + 1) == [64, 128]
    assert len(tk._prune_fwd(gpu, {"x_ptr": x}, BLOCK_R=16)) == len(gpu)  # no M (the compile gate): all that fit
    interpreter = tk.kernel_configs(gpu=False)["_lora_fwd_kernel"]
    assert len(interpreter) == 1
    for M in (1, 4096):
        assert tk._prune_fwd(interpreter, launch_args(M), BLOCK_R=16) == interpreter


def test_fp32_dy_kernel_takes_rank_chunks_of_16():
    """fp32 ranks above 16 run the dY-once kernel in chunks of 16 (larger chunks spilled kilobytes per thread);
    16-bit dtypes keep chunks of 64. The multi-chunk fp32 path itself runs in the r = 64 and 256 cases above."""
    assert tk._dy_block_r(64, torch.float32) == 16 and tk._dy_block_r(256, torch.float32) == 16
    assert tk._dy_block_r(64, torch.bfloat16) == 64 and tk._dy_block_r(8, torch.float32) == 16
    fp32_dy = [spec for spec in tk.aot_specs() if spec["name"].startswith("_lora_bwd_dy_kernel[fp32")]
    assert fp32_dy and max(spec["constexprs"]["BLOCK_R"] for spec in fp32_dy) == tk.DY_MAX_BLOCK_R_FP32



def test_fp32_dy_launch_takes_rank_chunks_of_16(dev, monkeypatch):
    """lora_bwd_dy launches the fp32 kernel with BLOCK_R = 16 (four rank chunks at r = 64, the only fp32 chunk the
    compile gate builds) and the bf16 one with 64. The chunk changes no number, so only the launch can show it."""
    launches = []
    real = tk._bwd_dy

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, kwargs["BLOCK_R"]))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(tk, "_bwd_dy", Recording())
    M, N, r = 5, 20, 64
    for dtype, block_r in ((torch.float32, 16), (torch.bfloat16, 64)):
        launches.clear()
        dy, lora_b = randn(M, N, dtype=dtype, device=dev), randn(N, r, dtype=dtype, device=dev)
        s = randn(M, r, device=dev)
        d_lora_b, ds = tk.lora_bwd_dy(dy, s, lora_b, SCALING)
        assert [(grid[1], chunk) for grid, chunk in launches] == [(r // block_r, block_r)], (dtype, launches)
        assert_close(d_lora_b, SCALING * dy.double().T @ s.double(), torch.float32, "d_lora_b", tf32=True)
        assert_close(ds, SCALING * dy.double() @ lora_b.double(), torch.float32, "ds", tf32=True)

# (M, K, N, r) for the TMA forward: rows past DECODE_MAX_M, K a multiple of 8 (16-byte rows, which a descriptor
# needs) but not of the interpreter's 32-wide K blocks in the second case (the descriptor zero-fills the tail),
# odd N, ranks padded (1), one chunk (16) and two chunks (80).
TMA_CASES = [(20, 96, 40, 1), (33, 72, 17, 16), (40, 64, 48, 80)]


def _tma_or_skip(dev):
    if dev.type == "cuda" and not tk._has_tma(dev):
        pytest.skip("the TMA forward needs sm_90 or newer")
    if tk.TensorDescriptor is None:
        pytest.skip("this triton has no host tensor descriptors")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("M,K,N,r", TMA_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tma_forward(dev, dtype, M, K, N, r, bias, monkeypatch, poisoned_empty):
    """The opt-in TMA forward (LORA_KERNELS_TRITON_TMA=1) against the reference; the pointer kernel is made to
    fail, so the result can only come from the TMA kernel."""
    _tma_or_skip(dev)
    monkeypatch.setattr(tk, "USE_TMA", True)
    monkeypatch.setattr(tk, "_fwd", None)  # subscripting it would raise
    x, weight, lora_a, lora_b, b = lora_inputs(M, K, N, r, dtype, dev, bias)
    assert tk._use_tma(x, weight)
    y, s = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING, b)
    assert_close(y, reference.lora_linear(x, weight, lora_a, lora_b, SCALING, b), dtype, "y")
    assert_close(s, ref_s(x, lora_a), torch.float32, "s", tf32=True)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["nodrop", "drop"])
@pytest.mark.parametrize("M,K,N,r", TMA_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tma_dx(dev, dtype, M, K, N, r, dropout_p, monkeypatch, poisoned_empty):
    """The opt-in TMA dX kernel (dy and W through descriptors; N is dX's reduction, so the odd N = 17 case has a
    zero-filled reduction tail) against the reference, with and without dropout; the pointer kernel is made to
    fail."""
    _tma_or_skip(dev)
    monkeypatch.setattr(tk, "USE_TMA", True)
    monkeypatch.setattr(tk, "_bwd_dx", None)  # subscripting it would raise
    seed = 77
    x, weight, lora_a, lora_b, _ = lora_inputs(M, K, N, r, dtype, dev, bias=False)
    # dy rows must be 16-byte multiples for a descriptor: N = 17 takes a padded allocation, sliced (stride 24).
    dy = randn(M, (N + 7) // 8 * 8, dtype=dtype, device=dev)[:, :N]
    assert tk._use_tma(dy, weight)
    mask = tk.dropout_mask(seed, M, K, dropout_p, dev)
    ref = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, SCALING, dropout_mask=mask)
    ds = SCALING * (dy.float() @ lora_b.float())
    dx = tk.lora_bwd_dx(dy, ds, weight, lora_a, dropout_p=dropout_p, seed=seed)
    assert_close(dx, ref["x"], dtype, "dx")


def test_tma_forward_only_where_a_descriptor_can_run(dev, monkeypatch):
    """Off by default; when on, fp32, decode sizes, rows that are not 16-byte multiples, non-unit inner strides and
    overlapping rows take the pointer kernel, with the same results."""
    _tma_or_skip(dev)
    x, weight, lora_a, lora_b, b = lora_inputs(24, 64, 40, 8, torch.bfloat16, dev, True)
    assert not tk._use_tma(x, weight)  # USE_TMA is off unless LORA_KERNELS_TRITON_TMA=1
    monkeypatch.setattr(tk, "USE_TMA", True)
    assert tk._use_tma(x, weight)
    odd_k = lora_inputs(24, 60, 40, 8, torch.bfloat16, dev, True)  # 120-byte rows
    pointer_only = [
        (x.float(), weight.float()),
        (x[:16], weight),
        (odd_k[0], odd_k[1]),
        (randn(64, 24, dtype=torch.bfloat16, device=dev).T, weight),  # inner stride 24
        (randn(1, 64, dtype=torch.bfloat16, device=dev).expand(24, 64), weight),  # row stride 0
        (randn(24 * 64 + 1, dtype=torch.bfloat16, device=dev)[1:].view(24, 64), weight),  # base 2 bytes off 16
    ]
    for xs, ws in pointer_only:
        assert not tk._use_tma(xs, ws), (xs.shape, xs.stride(), xs.dtype)
    xs, ws, a, bb, bias = odd_k
    monkeypatch.setattr(tk, "_fwd_tma", None)  # would raise if it were used
    y, _ = tk.lora_fwd(xs, ws, a, bb, SCALING, bias)
    assert_close(y, reference.lora_linear(xs, ws, a, bb, SCALING, bias), torch.bfloat16, "y")


def test_tma_leaves_empty_operands_to_the_pointer_kernels(dev, monkeypatch):
    """A descriptor needs every dimension > 0 (Triton asserts "shape must be positive"): with TMA on, a weight of
    0 output features (y [M, 0]) and a dY of 0 columns take the pointer kernels, as with TMA off."""
    _tma_or_skip(dev)
    monkeypatch.setattr(tk, "USE_TMA", True)
    M, K, r, dtype = 24, 64, 8, torch.bfloat16
    x, _, lora_a, _, _ = lora_inputs(M, K, 8, r, dtype, dev, False)
    weight, lora_b = randn(0, K, dtype=dtype, device=dev), randn(0, r, dtype=dtype, device=dev)
    assert not tk._use_tma(x, weight)
    y, s = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING)
    assert y.shape == (M, 0) and s.shape == (M, r)
    assert_close(s, ref_s(x, lora_a), torch.float32, "s", tf32=True)
    dy = randn(M, 0, dtype=dtype, device=dev)
    assert not tk._use_tma(dy, weight)
    dx = tk.lora_bwd_dx(dy, s, weight, lora_a)
    assert_close(dx, s.double() @ lora_a.double(), dtype, "dx with N = 0")


@pytest.mark.gpu
def test_tma_kernels_in_a_cuda_graph(monkeypatch):
    """The TMA forward and dX captured once in a CUDA graph (descriptors are kernel parameters, built at capture)
    and replayed on new inputs copied into the same buffers: the replays match the reference."""
    device = torch.device("cuda")
    if not tk._has_tma(device) or tk.TensorDescriptor is None:
        pytest.skip("the TMA kernels need sm_90 or newer and host tensor descriptors")
    monkeypatch.setattr(tk, "USE_TMA", True)
    M, K, N, r, dtype = 192, 256, 320, 16, torch.bfloat16
    x, weight, lora_a, lora_b, b = lora_inputs(M, K, N, r, dtype, device)
    dy = randn(M, N, dtype=dtype, device=device)
    assert tk._use_tma(x, weight) and tk._use_tma(dy, weight)
    out = {}

    def step():
        out["y"], s = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING, b)
        out["dx"] = tk.lora_bwd_dx(dy, s, weight, lora_a)  # s stands in for ds: any [M, r] fp32 works

    replay = bench.graphed(step, device)  # autotunes and compiles on a side stream, then captures
    for _ in range(2):
        x.copy_(randn(M, K, dtype=dtype, device=device))
        dy.copy_(randn(M, N, dtype=dtype, device=device))
        replay()
        torch.cuda.synchronize()
        assert_close(out["y"], reference.lora_linear(x, weight, lora_a, lora_b, SCALING, b), dtype, "y")
        s = (x.double() @ lora_a.double().T).float()
        expected_dx = dy.double() @ weight.double() + s.double() @ lora_a.double()
        assert_close(out["dx"], expected_dx, dtype, "dx")


def _tf32_nearest_even(bits):
    """The reference: fp32 bit pattern -> the nearest tf32 pattern (low 13 bits zero), ties to even; NaN/inf kept."""
    if bits & 0x7F800000 == 0x7F800000:
        return bits
    dropped, kept = bits & 0x1FFF, bits & 0xFFFFE000
    if dropped > 0x1000 or (dropped == 0x1000 and kept & 0x2000):
        kept += 0x2000  # a carry into the exponent is the next binade, or inf past the largest tf32
    return kept


def test_round_to_tf32_rounds_to_nearest_even(dev):
    """The tf32 rounding of the fp32 operands of 16-bit layers' tf32 dots (the tensor cores truncate): nearest, ties
    to even on both sides, carries into the exponent and to inf, subnormals, and NaN (CUDA's 0x7FFFFFFF too) and
    inf untouched, on random bit patterns besides."""
    special = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x7F800001, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x7F7FEFFF,
               0x7F7FF000, 0x00001000, 0x00003000, 0x00000FFF, 0x3F801000, 0x3F803000, 0x3F801001, 0xBF801000,
               0xBF803000, 0xBF803001, 0x3FFFF000, 0x00000001, 0x80000000, 0]
    generator = torch.Generator().manual_seed(3)
    patterns = special + torch.randint(0, 2 ** 32, (3000,), dtype=torch.int64, generator=generator).tolist()
    x = torch.tensor(patterns, dtype=torch.int64).to(torch.uint32).view(torch.int32).view(torch.float32).to(dev)
    y = torch.full_like(x, 1.5)
    _round_to_tf32_kernel[(1,)](x, y, x.numel(), BLOCK=4096)
    got = y.cpu().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    wrong = [(hex(p), hex(g)) for p, g in zip(patterns, got.tolist()) if g != _tf32_nearest_even(p)]
    assert not wrong, f"{len(wrong)} patterns rounded wrongly (input, got), e.g. {wrong[:4]}"


def test_host_cdiv_and_next_power_of_2_match_triton():
    """The launchers' own integer helpers (triton's are slow to call from Python) give triton's values."""
    for n in range(0, 300):
        assert tk._next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 64, 128):
            assert tk.cdiv(n, d) == triton.cdiv(n, d), (n, d)
    for n in (2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, 2 ** 40 + 3):
        assert tk._next_power_of_2(n) == triton.next_power_of_2(n) and tk.cdiv(n, 64) == triton.cdiv(n, 64)


def test_the_largest_rank_the_triton_backend_takes(dev):
    """r = MAX_RANK runs (one more is refused: test_validation_matrix), forward and gradients against the reference."""
    from lora_kernels.triton.lora_linear import MAX_RANK
    x, weight, lora_a, lora_b, bias = lora_inputs(3, 8, 5, MAX_RANK, torch.float32, dev)
    leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
    y = lora_linear(leaves[0], weight, *leaves[1:], SCALING, bias, backend="triton")
    ref_leaves = [t.double().cpu().requires_grad_(True) for t in (x, lora_a, lora_b)]
    expected = reference.lora_linear(ref_leaves[0], weight.double().cpu(), *ref_leaves[1:], SCALING,
                                     bias.double().cpu())
    assert_close(y, expected, torch.float32, "y", tf32=True)
    dy = randn(3, 5, device=dev)
    y.backward(dy)
    expected.backward(dy.double().cpu())
    for name, leaf, ref_leaf in zip(("x", "lora_a", "lora_b"), leaves, ref_leaves):
        assert_close(leaf.grad, ref_leaf.grad, torch.float32, f"d{name}")


# From helper 191's mutation round of this file's kernels and launchers (87 mutants, no code bug): each test below
# fails on a mutant that every other test passed.
if HAS_TRITON:
    @triton.jit(do_not_specialize=["seed"])
    def _rand_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK).to(tl.int64)  # int64 offsets, as _keep_mask's (int64 offs_m) are
        tl.store(out_ptr + offs, tl.rand(seed, offs), mask=offs < n)


def test_dropout_mask_is_rand_of_m_times_K_plus_k_at_least_p(dev):
    """The documented mask: element (m, k) is kept when tl.rand(seed, m * K + k) >= p, drawn here by a kernel of
    its own. p is one of the draws, so the boundary (a draw equal to p: kept) is exercised too."""
    seed, M, K = 11, 5, 7
    rand = torch.empty(M * K, device=dev, dtype=torch.float32)
    _rand_kernel[(1,)](rand, seed, M * K, BLOCK=64)
    rand = rand.view(M, K)
    p = rand[1, 2].item()  # an fp32 value: the kernels see exactly this p
    assert 0.0 < p < 1.0
    mask = tk.dropout_mask(seed, M, K, p, dev)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    expected = torch.where(rand >= p, scale, torch.tensor(0.0))
    assert mask[1, 2] == scale, "a draw equal to p is kept"
    assert torch.equal(mask, expected)


def test_autotune_keys_hold_every_size_but_M_and_every_flag():
    """A config tuned for one weight shape, rank or flag setting must not be reused for another: each autotuned
    kernel's key holds its size arguments other than M (N, K, R, as the kernel takes them) and its boolean flags
    (HAS_*, INT64). The autotuner gives no warning when one is missing."""
    tuned = {name: kernel for name, kernel in vars(tk).items() if isinstance(kernel, triton.runtime.Autotuner)}
    assert tuned
    for name, kernel in tuned.items():
        wanted = {a for a in kernel.arg_names if a in ("N", "K", "R") or a.startswith("HAS_") or a == "INT64"}
        assert wanted <= set(kernel.keys), (name, sorted(wanted - set(kernel.keys)))


@pytest.mark.parametrize("r", [0, "max+1"])
def test_backward_launchers_refuse_ranks_outside_1_to_max_rank(dev, r):
    """Each backward launcher checks the rank it is given (lora_fwd's check is covered by the forward test):
    a rank of 0 or past MAX_RANK raises ValueError naming the operand, before any launch."""
    r = tk.MAX_RANK + 1 if r == "max+1" else r
    M, K, N = 4, 32, 16
    dy, x, weight = randn(M, N, device=dev), randn(M, K, device=dev), randn(N, K, device=dev)
    s, lora_a, lora_b = randn(M, r, device=dev), randn(r, K, device=dev), randn(N, r, device=dev)
    with pytest.raises(ValueError, match="lora_bwd_dy: lora_b expected a rank"):
        tk.lora_bwd_dy(dy, s, lora_b, 1.0)
    with pytest.raises(ValueError, match="lora_bwd_dx: lora_a expected a rank"):
        tk.lora_bwd_dx(dy, s, weight, lora_a)
    with pytest.raises(ValueError, match="lora_bwd_da: ds expected a rank"):
        tk.lora_bwd_da(s, x)


def test_seed_range_ends_below_2_to_the_63(dev):
    """A seed is an int in [0, 2**63) (what a 0-d int64 tensor holds): 2**63 - 1 is taken, 2**63 refused."""
    tk.dropout_mask(2**63 - 1, 2, 3, 0.5, dev)
    for bad in (-1, 2**63):
        with pytest.raises(ValueError, match="seed expected an int in"):
            tk.dropout_mask(bad, 2, 3, 0.5, dev)


def test_a_negative_seed_tensor_is_refused_as_a_negative_int_is(dev):
    """A 0-d int64 seed tensor holding a negative value: refused by every launcher that takes a seed and by the custom
    op (what compiled graphs and exported programs call), as the int -1 is, before any launch."""
    M, K, N, r = 4, 32, 16, 8
    x, weight, lora_a, lora_b, _ = lora_inputs(M, K, N, r, torch.float32, dev)
    dy, ds = randn(M, N, device=dev), randn(M, r, device=dev)
    negative = torch.tensor(-5, dtype=torch.int64)
    calls = {"lora_fwd": lambda seed: tk.lora_fwd(x, weight, lora_a, lora_b, 1.0, None, 0.1, seed),
             "lora_bwd_dx": lambda seed: tk.lora_bwd_dx(dy, ds, weight, lora_a, 0.1, seed),
             "lora_bwd_da": lambda seed: tk.lora_bwd_da(ds, x, 0.1, seed),
             "dropout_mask": lambda seed: tk.dropout_mask(seed, M, K, 0.1, dev),
             "triton_lora_fwd": lambda seed: torch.ops.lora_kernels.triton_lora_fwd(x, weight, lora_a, lora_b, 1.0,
                                                                                     None, 0.1, seed)}
    for op, call in calls.items():
        call(torch.tensor(5, dtype=torch.int64))  # a non-negative one runs
        name = "lora_fwd" if op == "triton_lora_fwd" else op  # the op runs the launcher's check
        with pytest.raises(ValueError, match=rf"{name}: seed expected an int in \[0, 2\*\*63\), got a tensor "
                                             r"holding -5"):
            call(negative)


def test_splits_are_sized_by_the_largest_block_of_any_config():
    """The launchers count the blocks of a split dimension before the autotuner picks a config, with max_block: so
    a split never exceeds the blocks of the dimension under whichever GPU config runs (no empty K / N splits)."""
    gpu = tk.kernel_configs(gpu=True)
    for kernel, block in (("_lora_shrink_kernel", "BLOCK_K"), ("_lora_bwd_dy_kernel", "BLOCK_N"),
                          ("_lora_bwd_da_kernel", "BLOCK_K"), ("_lora_bwd_da_kernel", "BLOCK_M")):
        configs = gpu[kernel]
        largest = tk.max_block(configs, block)
        assert all(cfg.kwargs[block] <= largest for cfg in configs), (kernel, block)
        assert any(cfg.kwargs[block] == largest for cfg in configs), (kernel, block)
        for size in (1, 100, 200, 4096, 5000):
            split = tk._split_count(1, -(-size // largest), 132)
            assert all(split <= -(-size // cfg.kwargs[block]) for cfg in configs), (kernel, block, size, split)


def test_empty_batch_outputs_have_the_documented_dtypes(dev):
    """M = 0: y in x.dtype, s float32 (lora_bwd_dy checks s is float32), dB and ds float32, dA float32."""
    x, weight, lora_a, lora_b, b = lora_inputs(0, 40, 24, 8, torch.bfloat16, dev)
    y, s = tk.lora_fwd(x, weight, lora_a, lora_b, 0.5, b)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    d_lora_b, ds = tk.lora_bwd_dy(randn(0, 24, dtype=torch.bfloat16, device=dev), s, lora_b, 0.5)
    assert d_lora_b.dtype == ds.dtype == torch.float32
    assert tk.lora_bwd_da(ds, x).dtype == torch.float32


def test_specs_mark_only_sizes_and_strides_divisible_by_16_and_demand_wgmma_from_64_rows():
    """The compile gate builds what runs: split counts, m_bucket and the seed are not sizes (never marked
    16-divisible, or the gate would compile a variant no launch selects), and every 16-bit forward / dX base-GEMM
    tile of 64 rows or more must be warp-group MMA on sm_90 (a 64-row warp group: 64 rows included)."""
    specs = tk.aot_specs()
    for spec in specs:
        assert not set(spec["divisible_by_16"]) & tk._NOT_SIZE_ARGS, spec["name"]
    for rows, wgmma in ((16, False), (64, True), (128, True)):
        blocks = dict(BLOCK_M=rows, BLOCK_N=64, BLOCK_K=64)
        for fn, flags in ((tk._lora_fwd_kernel, dict(HAS_BIAS=True, EVEN_K=True)),
                          (tk._lora_bwd_dx_kernel, dict(HAS_DROPOUT=True, EVEN_N=True))):
            for dtype in (torch.bfloat16, torch.float16):
                spec = tk._spec(fn, dtype, blocks, 4, 3, GROUP=tk.GROUP_M, BLOCK_R=16, **flags)
                assert spec["wgmma"] is wgmma, spec["name"]
            assert tk._spec(fn, torch.float32, blocks, 4, 3, GROUP=tk.GROUP_M, BLOCK_R=16, **flags)["wgmma"] is False


def test_gate_compiles_the_int64_variant_of_every_kernel_that_has_one():
    """Each kernel with an INT64 flag has at least one INT64 spec (the variant large strides launch)."""
    specs = tk.aot_specs()
    for fn in {spec["kernel"] for spec in specs}:
        if "INT64" in fn.arg_names:
            assert any(s["kernel"] is fn and s["constexprs"]["INT64"] for s in specs), fn.__name__
