"""Every GPU autotune config and block size of the Triton kernels, run under the interpreter.

The rest of the suite runs the interpreter's single small config per kernel (16-32 wide blocks), so the block sizes a
GPU launches (64-256 wide, the 16-row decode tiles, dY's 128-row blocks, the grouped kernels' GPU tiles) and their
edge cases would first meet a test on a GPU: partial and wrapped edge blocks, the unmasked EVEN_K / EVEN_N loops,
splits counted in the largest block of a list, more row blocks than one L2 group (GROUP_M), rank chunks of 64. Here
each GPU config runs alone (the autotuner's list replaced by it) on shapes sized from its own blocks, against the
float64 reference, with the interpreter's out-of-bounds checker on (tests/conftest.py). Interpreter only: on a GPU
the normal tests launch these configs themselves.
"""

import pytest
import torch

from conftest import assert_close, lora_inputs, randn
from lora_kernels import reference
from lora_kernels.batch import LoRABatch
from lora_kernels.triton import HAS_TRITON, INTERPRET

pytestmark = pytest.mark.skipif(not (HAS_TRITON and INTERPRET),
                                reason="runs the GPU configs under the Triton interpreter (TRITON_INTERPRET=1)")

if HAS_TRITON and INTERPRET:
    from lora_kernels.triton import lora_linear as tk
    from lora_kernels.triton import sgmv
    from test_triton_sgmv import make_ids, make_weights, nan_rows_past_rank

    GPU_CONFIGS = tk.kernel_configs(gpu=True)
else:
    GPU_CONFIGS = {}

SCALING = 0.75
SEED = 123
# The autotuned launcher of each kernel in lora_kernels.triton.lora_linear.
AUTOTUNERS = {"_lora_shrink_kernel": "_shrink", "_lora_fwd_kernel": "_fwd", "_lora_fwd_tma_kernel": "_fwd_tma",
              "_lora_bwd_dy_kernel": "_bwd_dy", "_lora_bwd_dx_kernel": "_bwd_dx",
              "_lora_bwd_dx_tma_kernel": "_bwd_dx_tma", "_lora_bwd_da_kernel": "_bwd_da"}


def _params(kernel):
    return [pytest.param(cfg, id=",".join(f"{k}{v}" for k, v in cfg.kwargs.items()))
            for cfg in GPU_CONFIGS.get(kernel, [])]


@pytest.fixture
def gpu_sizes(monkeypatch):
    """The launchers' GPU block constants: dY's 128-row blocks and the largest blocks of each GPU list (the splits
    count blocks in those)."""
    monkeypatch.setattr(tk, "DY_BLOCK_M", tk.GPU_DY_BLOCK_M)
    for name, kernel, block in [("_SHRINK_MAX_BLOCK_M", "_lora_shrink_kernel", "BLOCK_M"),
                                ("_SHRINK_MAX_BLOCK_K", "_lora_shrink_kernel", "BLOCK_K"),
                                ("_DY_MAX_BLOCK_N", "_lora_bwd_dy_kernel", "BLOCK_N"),
                                ("_DA_MAX_BLOCK_M", "_lora_bwd_da_kernel", "BLOCK_M"),
                                ("_DA_MAX_BLOCK_K", "_lora_bwd_da_kernel", "BLOCK_K")]:
        monkeypatch.setattr(tk, name, tk.max_block(GPU_CONFIGS[kernel], block))


def only(monkeypatch, kernel, cfg):
    """The kernel's autotuner launches `cfg` alone (a one-config autotuner neither prunes nor benchmarks); returns
    the autotuner, whose best_config tells what was launched."""
    autotuner = getattr(tk, AUTOTUNERS[kernel])
    monkeypatch.setattr(autotuner, "configs", [cfg])
    monkeypatch.setattr(autotuner, "cache", {})
    monkeypatch.setattr(autotuner, "best_config", None, raising=False)
    return autotuner


def masked_x(x, dropout_p):
    return x.double() if dropout_p == 0 else x.double() * tk.dropout_mask(SEED, *x.shape, dropout_p, x.device)


def test_every_kernel_has_gpu_configs_here():
    """Each autotuned kernel of lora_linear.py is covered below with its whole GPU list."""
    assert set(GPU_CONFIGS) == set(AUTOTUNERS)
    assert all(len(configs) >= 1 for configs in GPU_CONFIGS.values())


# ---------------------------------------------------------------------------------------------------------------
# Single-adapter kernels (lora_kernels/triton/lora_linear.py)


@pytest.mark.parametrize("cfg", _params("_lora_fwd_kernel"))
def test_forward_config(cfg, gpu_sizes, monkeypatch):
    autotuner = only(monkeypatch, "_lora_fwd_kernel", cfg)
    bm, bn, bk = (cfg.kwargs[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    rows = [5, bm] if bm <= tk.DECODE_MAX_M else [bm + 3]
    cases = [(M, 2 * bk, bn + 5, 16, torch.bfloat16) for M in rows]  # EVEN_K, one rank chunk
    cases.append((rows[-1], bk + 7, 2 * bn - 1, 70, torch.float32))  # masked K tail, two rank chunks
    # More row blocks than one GROUP_M group, over two column blocks: the grouped program order's last group.
    cases.append(((tk.GROUP_M + 1) * bm + 1, bk, bn + 1, 8, torch.bfloat16))
    for M, K, N, r, dtype in cases:
        x, weight, lora_a, lora_b, bias = lora_inputs(M, K, N, r, dtype)
        y, s = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING, bias)
        what = f"y (M={M} K={K} N={N} r={r} {dtype})"
        assert_close(y, reference.lora_linear(x, weight, lora_a, lora_b, SCALING, bias), dtype, what)
    assert autotuner.best_config is cfg


@pytest.mark.parametrize("cfg", _params("_lora_fwd_tma_kernel"))
def test_forward_tma_config(cfg, gpu_sizes, monkeypatch):
    if tk.TensorDescriptor is None:
        pytest.skip("this triton has no host-side tensor descriptors")
    monkeypatch.setattr(tk, "USE_TMA", True)
    autotuner = only(monkeypatch, "_lora_fwd_tma_kernel", cfg)
    monkeypatch.setattr(tk, "_fwd", None)  # the pointer kernel must not run instead
    bm, bn, bk = (cfg.kwargs[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    # Descriptors need 16-byte rows (K a multiple of 8); they zero-fill the edge rows, columns and K tail.
    for M, K, N, r in [(bm + 3, bk + 8, bn + 5, 16), ((tk.GROUP_M + 1) * bm + 1, 2 * bk, bn + 1, 70)]:
        x, weight, lora_a, lora_b, bias = lora_inputs(M, K, N, r, torch.bfloat16)
        y, _ = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING, bias)
        assert_close(y, reference.lora_linear(x, weight, lora_a, lora_b, SCALING, bias), torch.bfloat16,
                     f"y (M={M} K={K} N={N} r={r})")
    assert autotuner.best_config is cfg


@pytest.mark.parametrize("cfg", _params("_lora_shrink_kernel"))
def test_shrink_config(cfg, gpu_sizes, monkeypatch):
    """s = drop(x)·Aᵀ through the forward, with the K split (two chunks under the interpreter, counted in the
    largest K block of the list) and dropout."""
    autotuner = only(monkeypatch, "_lora_shrink_kernel", cfg)
    bm, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
    for M, K, r, dtype, dropout_p in [(1, 2 * tk._SHRINK_MAX_BLOCK_K + 5, 16, torch.bfloat16, 0.25),
                                      (bm + 3, bk + 7, 70, torch.float32, 0.25),
                                      (2 * bm + 1, 3 * tk._SHRINK_MAX_BLOCK_K, 8, torch.bfloat16, 0.0)]:
        x, weight, lora_a, lora_b, _ = lora_inputs(M, K, 24, r, dtype, bias=False)
        _, s = tk.lora_fwd(x, weight, lora_a, lora_b, SCALING, dropout_p=dropout_p, seed=SEED)
        assert_close(s, masked_x(x, dropout_p) @ lora_a.double().T, dtype, f"s (M={M} K={K} r={r} p={dropout_p})")
    assert autotuner.best_config is cfg


@pytest.mark.parametrize("cfg", _params("_lora_bwd_dy_kernel"))
def test_bwd_dy_config(cfg, gpu_sizes, monkeypatch):
    """dB and ds from one read of dy: 128-row blocks, the N split, rank chunks of 64 (16 for fp32)."""
    autotuner = only(monkeypatch, "_lora_bwd_dy_kernel", cfg)
    bn = cfg.kwargs["BLOCK_N"]
    for M, N, r, dtype in [(tk.DY_BLOCK_M + 3, 2 * tk._DY_MAX_BLOCK_N + 5, 70, torch.bfloat16),
                           (2 * tk.DY_BLOCK_M, bn + 1, 24, torch.float32),
                           (7, bn, 16, torch.bfloat16)]:
        dy = randn(M, N, dtype=dtype)
        s = randn(M, r)
        lora_b = randn(N, r, dtype=dtype, scale=r ** -0.5)
        d_lora_b, ds = tk.lora_bwd_dy(dy, s, lora_b, SCALING)
        what = f"(M={M} N={N} r={r} {dtype})"
        assert_close(d_lora_b, SCALING * dy.double().T @ s.double(), dtype, f"d_lora_b {what}")
        assert_close(ds, SCALING * dy.double() @ lora_b.double(), dtype, f"ds {what}")
    assert autotuner.best_config is cfg


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("cfg_index", range(4))
def test_bwd_dx_config(cfg_index, tma, gpu_sizes, monkeypatch):
    """dx = dy·W + drop'(ds·A): EVEN_N and masked N, two rank chunks, dropout, more row blocks than a group."""
    kernel = "_lora_bwd_dx_tma_kernel" if tma else "_lora_bwd_dx_kernel"
    configs = GPU_CONFIGS[kernel]
    assert len(configs) == 4  # the parametrisation above covers the whole list
    cfg = configs[cfg_index]
    if tma:
        if tk.TensorDescriptor is None:
            pytest.skip("this triton has no host-side tensor descriptors")
        monkeypatch.setattr(tk, "USE_TMA", True)
        monkeypatch.setattr(tk, "_bwd_dx", None)  # the pointer kernel must not run instead
    autotuner = only(monkeypatch, kernel, cfg)
    bm, bk, bn = (cfg.kwargs[b] for b in ("BLOCK_M", "BLOCK_K", "BLOCK_N"))
    # N a multiple of 8 for the TMA descriptor of dy; K likewise for W's. fp32 (pointer kernel only) skips the
    # many-row case, the slowest under the interpreter.
    cases = [(bm + 3, bk + 8, 2 * bn, 16, 0.25, torch.bfloat16), (bm + 3, bk + 8, bn + 8, 70, 0.0, torch.bfloat16),
             ((tk.GROUP_M + 1) * bm + 1, 2 * bk, bn, 8, 0.25, torch.bfloat16)]
    if not tma:
        cases += [(bm + 3, bk + 8, 2 * bn, 16, 0.25, torch.float32), (bm + 3, bk + 8, bn + 8, 70, 0.0, torch.float32)]
    for M, K, N, r, dropout_p, dtype in cases:
        _, weight, lora_a, _, _ = lora_inputs(0, K, N, r, dtype, bias=False)
        dy = randn(M, N, dtype=dtype)
        ds = randn(M, r)
        dx = tk.lora_bwd_dx(dy, ds, weight, lora_a, dropout_p=dropout_p, seed=SEED)
        lora_term = ds.double() @ lora_a.double()
        if dropout_p:
            lora_term = lora_term * tk.dropout_mask(SEED, M, K, dropout_p, "cpu").double()
        assert_close(dx, dy.double() @ weight.double() + lora_term, dtype,
                     f"dx (M={M} K={K} N={N} r={r} p={dropout_p} {dtype})")
    assert autotuner.best_config is cfg


@pytest.mark.parametrize("cfg", _params("_lora_bwd_da_kernel"))
def test_bwd_da_config(cfg, gpu_sizes, monkeypatch):
    """dA = dsᵀ·drop(x) with the M split (counted in the list's largest BLOCK_M), dropout, two rank chunks."""
    autotuner = only(monkeypatch, "_lora_bwd_da_kernel", cfg)
    bm, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
    for M, K, r, dtype, dropout_p in [(2 * tk._DA_MAX_BLOCK_M + 3, bk + 5, 70, torch.bfloat16, 0.25),
                                      (bm + 1, 2 * bk, 16, torch.float32, 0.25),
                                      (3, bk - 1, 8, torch.bfloat16, 0.0)]:
        x = randn(M, K, dtype=dtype)
        ds = randn(M, r)
        d_lora_a = tk.lora_bwd_da(ds, x, dropout_p=dropout_p, seed=SEED)
        assert_close(d_lora_a, ds.double().T @ masked_x(x, dropout_p), dtype,
                     f"d_lora_a (M={M} K={K} r={r} p={dropout_p} {dtype})")
    assert autotuner.best_config is cfg


# ---------------------------------------------------------------------------------------------------------------
# Grouped kernels (lora_kernels/triton/sgmv.py): GPU_CONFIG's block sizes


@pytest.fixture
def sgmv_gpu_config(monkeypatch):
    monkeypatch.setattr(sgmv, "USE_GPU_CONFIG", True)
    assert sgmv._config("expand_prefill") is sgmv.GPU_CONFIG["expand_prefill"]
    assert sgmv._config("shrink_prefill", torch.float32) is sgmv.GPU_CONFIG["shrink_prefill_fp32"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("path, M", [("prefill", 150), ("decode", 40)])
@pytest.mark.parametrize("ranks", [[8, 1, 16, 5, 16], [8, 1, 64, 16, 70]], ids=["r16", "r70"])
def test_grouped_shrink_expand_gpu_config(path, M, dtype, ranks, sgmv_gpu_config):
    """Shrink and expand with the GPU tiles: ranks in one 16-wide tile and (r70) in 64-wide prefill tiles, K past
    two of the longest K tiles (the split), N past the widest N tile, NaN in the padding past each rank."""
    K, N, L = 2 * 256 + 37, 2 * 128 + 9, len(ranks)
    ids = make_ids("mixed_neg", M, L)
    batch = LoRABatch.from_adapter_ids(ids, L)
    (lora_a,), (lora_b,), ranks_t, scalings = make_weights(L, ranks, K, [N], dtype, "cpu")
    x = randn(M, K, dtype=dtype)
    out = torch.full((M, max(ranks)), float("nan"))
    sgmv.shrink(x, lora_a, batch, scalings, ranks_t, out=out, path=path)
    assert_close(out, reference.lora_shrink(x, lora_a, ids, scalings, ranks_t), dtype, "shrink")
    t = nan_rows_past_rank(randn(M, max(ranks)), ids, ranks_t)
    y = randn(M, N + 11, dtype=dtype)
    expected = reference.lora_expand(t, lora_b, ids, y, 3, ranks_t)
    sgmv.expand(t, lora_b, batch, ranks_t, y, 3, path=path)
    assert_close(y, expected, dtype, "expand")


@pytest.mark.parametrize("path, M", [("prefill", 150), ("decode", 40)])
def test_grouped_slices_gpu_config(path, M, sgmv_gpu_config):
    """Six slices in lists, as add_lora passes them: expand launches of 3, 2 and 1 slices (the last of an odd width,
    its launch apart), shrink launches of 3 and 3; each slice its own pointer, width (narrower than a tile, past the
    widest N tile, none: programs past a slice's width exit) and columns after the one before, from slice_offset 3;
    B's slot strides differ by width."""
    K, L, ranks, widths = 2 * 128 + 5, 4, [8, 1, 16, 5], [16, 2 * 128 + 16, 0, 144, 64, 5]
    ids = make_ids("mixed_neg", M, L)
    batch = LoRABatch.from_adapter_ids(ids, L)
    a_list, b_list, ranks_t, scalings = make_weights(L, ranks, K, widths, torch.bfloat16, "cpu")
    x = randn(M, K, dtype=torch.bfloat16)
    out = torch.full((len(widths), M, max(ranks)), float("nan"))
    sgmv.shrink(x, a_list, batch, scalings, ranks_t, out=out, path=path)
    y = randn(M, 3 + sum(widths) + 7, dtype=torch.bfloat16)
    expected = y.double()
    for j, (lora_a, lora_b) in enumerate(zip(a_list, b_list)):
        assert_close(out[j], reference.lora_shrink(x, lora_a, ids, scalings, ranks_t), torch.bfloat16,
                     f"shrink, slice {j}")
        expected = reference.lora_expand(out[j], lora_b, ids, expected, 3 + sum(widths[:j]), ranks_t)
    sgmv.expand(out, b_list, batch, ranks_t, y, 3, path=path)
    assert_close(y, expected, torch.bfloat16, "expand")


@pytest.mark.parametrize("P", [16, 70])
def test_segment_outer_gpu_config(P, sgmv_gpu_config):
    """Per-slot sums of outer products with the GPU tiles (32 tokens per step, Q tile 128, P tile 16 or 64)."""
    M, Q, L = 150, 128 + 37, 5
    ids = make_ids("skewed", M, L)
    batch = LoRABatch.from_adapter_ids(ids, L)
    left = randn(M, P)
    right = randn(M, Q, dtype=torch.bfloat16)
    out = sgmv.segment_outer_sum(left, right, batch)
    rounded = left.to(torch.bfloat16).double()  # the kernel rounds fp32 left to right's dtype (see its test)
    for slot in range(L):
        rows = ids == slot
        assert_close(out[slot], rounded[rows].T @ right.double()[rows], torch.bfloat16, f"slot {slot}")
