"""The C++/CUDA extension's ops (torch.ops.lora_kernels.*) called directly, against the float64 reference: lora_fwd,
lora_bwd_dy, sgmv_shrink, sgmv_expand on every dtype, odd shapes, ranks 1..256, segment distributions, NaN padding
past each rank, bad input, opcheck. The `device` fixture runs them on CPU (and CUDA when present); the gpu-marked
tests cover what only the CUDA kernels have (the decode kernel's vector/scalar paths, split-K, determinism, graphs)."""

import pathlib
import re
import sys

import pytest
import torch

from conftest import DTYPES, assert_close, lora_inputs, randn
from lora_kernels import _ext, reference
from lora_kernels.batch import LoRABatch

if not _ext.HAS_EXTENSION:
    pytest.skip(f"lora_kernels._C cannot be used here: {_ext.EXTENSION_ERROR}", allow_module_level=True)

ops = torch.ops.lora_kernels
ALL_DTYPES = DTYPES + [torch.float64]
RANKS = [1, 8, 16, 64, 256]


def _tol_dtype(dtype):
    """The grouped shrink's result is stored in float32, so it is never more precise than float32."""
    return torch.float32 if dtype == torch.float64 else dtype


def _acc(dtype):
    """The dtype of lora_fwd's s and lora_bwd_dy's outputs: float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# lora_fwd


def _check_fwd(x, x_lora, weight, lora_a, lora_b, scaling, bias, mask=None):
    dtype = x.dtype
    y, s = ops.lora_fwd(x, x_lora, weight, lora_a, lora_b, scaling, bias)
    m, n, r = x.shape[0], weight.shape[0], lora_a.shape[0]
    assert y.shape == (m, n) and y.dtype == dtype and y.device == x.device
    assert s.shape == (m, r) and s.dtype == _acc(dtype)
    if m == 0:
        return y, s
    y_ref = reference.lora_linear(x.cpu(), weight.cpu(), lora_a.cpu(), lora_b.cpu(), scaling,
                                  None if bias is None else bias.cpu(), None if mask is None else mask.cpu())
    x_lora_ref = (x if x_lora is None else x_lora).cpu().double()
    s_ref = x_lora_ref @ lora_a.cpu().double().T
    assert_close(y, y_ref, dtype, "y")
    assert_close(s, s_ref, dtype, "s")
    # The LoRA term on its own (y minus the base layer), so a wrong expand cannot hide behind the base GEMM.
    base = x.cpu().double() @ weight.cpu().double().T + (0 if bias is None else bias.cpu().double())
    assert_close(y.double().cpu() - base, y_ref - base, dtype, "y - base", scale=4.0)
    return y, s


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_lora_fwd_matches_reference(dtype, r, device):
    x, weight, lora_a, lora_b, bias = lora_inputs(7, 67, 123, r, dtype, device)
    _check_fwd(x, None, weight, lora_a, lora_b, 2.0, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (4, 67, 123), (16, 72, 40), (17, 33, 65), (40, 128, 96)])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_lora_fwd_shapes_and_bias(dtype, m, k, n, with_bias, device):
    x, weight, lora_a, lora_b, bias = lora_inputs(m, k, n, 16, dtype, device, bias=with_bias)
    _check_fwd(x, None, weight, lora_a, lora_b, 0.5, bias)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_lora_fwd_with_x_lora(dtype, device):
    """x_lora is the dropped-out LoRA input: x * mask with mask in {0, 1/(1-p)} (p = 0.5, so x * 2 is exact)."""
    x, weight, lora_a, lora_b, bias = lora_inputs(9, 67, 50, 8, dtype, device)
    mask = (torch.rand(9, 67, device=device) > 0.5).to(dtype) * 2.0
    x_lora = x * mask
    y, _ = _check_fwd(x, x_lora, weight, lora_a, lora_b, 1.5, bias, mask=mask)
    y_plain, _ = ops.lora_fwd(x, None, weight, lora_a, lora_b, 1.5, bias)
    assert not torch.equal(y, y_plain)  # x_lora was used, not x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_fwd_non_contiguous(dtype, device):
    x_wide, weight, lora_a, lora_b, bias = lora_inputs(6, 2 * 40, 30, 8, dtype, device)
    x = x_wide[:, ::2]                               # stride 2 along K
    x_t = randn(40, 6, dtype=dtype, device=device).T  # column-major
    weight, lora_a = weight[:, :40], lora_a[:, :40]  # row stride 80, unit column stride
    lora_b = randn(8, 30, dtype=dtype, device=device, scale=8 ** -0.5).T
    bias = randn(60, dtype=dtype, device=device)[::2]
    for xi in (x, x_t):
        assert not xi.is_contiguous()
        _check_fwd(xi, None, weight, lora_a, lora_b, 2.0, bias)
    # x_lora column-major and a column-major weight (the CUDA decode path copies it to unit-stride rows).
    _check_fwd(x_t, x_t.contiguous(), weight.T.contiguous().T, lora_a, lora_b, 2.0, bias)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_lora_fwd_empty_batch(dtype, device):
    x, weight, lora_a, lora_b, bias = lora_inputs(0, 32, 24, 4, dtype, device)
    y, s = _check_fwd(x, None, weight, lora_a, lora_b, 1.0, bias)
    assert y.shape == (0, 24) and s.shape == (0, 4)


def test_lora_fwd_is_deterministic(device):
    x, weight, lora_a, lora_b, bias = lora_inputs(4, 1000, 300, 16, torch.bfloat16, device)
    first = ops.lora_fwd(x, None, weight, lora_a, lora_b, 2.0, bias)
    second = ops.lora_fwd(x, None, weight, lora_a, lora_b, 2.0, bias)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("m, converts_weight", [(1, False), (16, False), (17, True)])
def test_cpu_lora_fwd_keeps_a_16bit_weight_16bit_at_decode_sizes(m, converts_weight):
    """At decode sizes a 16-bit W is not copied to fp32 on every call (that copy made the bf16 M = 1 forward ~15x
    slower than F.linear on CPU); above them the fp32 copy is the faster path. Checked by the ops' input shapes."""
    from torch.profiler import ProfilerActivity, profile

    n, k = 48, 80
    x, weight, lora_a, lora_b, bias = lora_inputs(m, k, n, 8, torch.bfloat16, "cpu")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        ops.lora_fwd(x, None, weight, lora_a, lora_b, 2.0, bias)
    conversions = [event.input_shapes[0] for event in prof.events() if event.name == "aten::_to_copy"]
    assert ([n, k] in conversions) == converts_weight, conversions


# ---------------------------------------------------------------------------------------------------------------------
# lora_bwd_dy


def _check_bwd(dy, s, lora_b, scaling):
    d_lora_b, ds = ops.lora_bwd_dy(dy, s, lora_b, scaling)
    m, n, r = dy.shape[0], dy.shape[1], s.shape[1]
    assert d_lora_b.shape == (n, r) and d_lora_b.dtype == _acc(dy.dtype)
    assert ds.shape == (m, r) and ds.dtype == _acc(dy.dtype)
    dy64, s64, b64 = dy.cpu().double(), s.cpu().double(), lora_b.cpu().double()
    tol = dy.dtype
    if m == 0:
        assert torch.equal(d_lora_b.cpu(), torch.zeros(n, r, dtype=_acc(dy.dtype)))
        return d_lora_b, ds
    assert_close(d_lora_b, scaling * dy64.T @ s64, tol, "d_lora_b")
    assert_close(ds, scaling * dy64 @ b64, tol, "ds")
    return d_lora_b, ds


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_lora_bwd_dy_matches_reference(dtype, r, device):
    dy = randn(19, 123, dtype=dtype, device=device)
    s = randn(19, r, dtype=_acc(dtype), device=device)
    lora_b = randn(123, r, dtype=dtype, device=device, scale=r ** -0.5)
    _check_bwd(dy, s, lora_b, 2.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,r", [(1, 33, 16), (16, 4096, 16), (300, 70, 32), (129, 257, 64), (64, 200, 128)])
def test_lora_bwd_dy_shapes(dtype, m, n, r, device):
    dy = randn(m, n, dtype=dtype, device=device)
    s = randn(m, r, device=device)
    lora_b = randn(n, r, dtype=dtype, device=device, scale=r ** -0.5)
    _check_bwd(dy, s, lora_b, 0.25)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_bwd_dy_non_contiguous_and_empty(dtype, device):
    dy = randn(50, 20, dtype=dtype, device=device).T  # [20, 50], column-major
    s = randn(8, 20, device=device).T
    lora_b = randn(8, 50, dtype=dtype, device=device).T
    _check_bwd(dy, s, lora_b, 1.0)
    _check_bwd(randn(0, 50, dtype=dtype, device=device), randn(0, 8, device=device), lora_b, 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# sgmv_shrink / sgmv_expand

NUM_SLOTS = 6


def _adapter_ids(distribution, m, num_slots, device):
    g = torch.Generator().manual_seed(1234)
    if distribution == "distinct":
        ids = torch.randperm(num_slots, generator=g)[:m] if m <= num_slots else torch.arange(m) % num_slots
    elif distribution == "uniform":
        ids = torch.randint(0, num_slots, (m,), generator=g)
    elif distribution == "identical":
        ids = torch.full((m,), 2)
    elif distribution == "skewed":  # most tokens on one slot, a few elsewhere (zipf-like)
        ids = torch.where(torch.rand(m, generator=g) < 0.8, 0, torch.randint(1, num_slots, (m,), generator=g))
    elif distribution == "empty_slots":  # slots 1, 2, 4 get nothing
        ids = torch.tensor([0, 3, 5])[torch.randint(0, 3, (m,), generator=g)]
    elif distribution == "all_base":
        ids = torch.full((m,), -1)
    elif distribution == "mixed_base":
        ids = torch.randint(-1, num_slots, (m,), generator=g)
    else:
        raise AssertionError(distribution)
    return ids.to(device=device, dtype=torch.int32)


DISTRIBUTIONS = ["distinct", "uniform", "identical", "skewed", "empty_slots", "all_base", "mixed_base"]


def _stacked_lora(num_slots, max_rank, k, n, dtype, device, ranks):
    """A [L, R, K] and B [L, N, R] with NaN past each slot's rank (it must never be read)."""
    lora_a = randn(num_slots, max_rank, k, dtype=dtype, device=device, scale=k ** -0.5)
    lora_b = randn(num_slots, n, max_rank, dtype=dtype, device=device, scale=max_rank ** -0.5)
    for slot, rank in enumerate(ranks.tolist()):
        lora_a[slot, rank:] = float("nan")
        lora_b[slot, :, rank:] = float("nan")
    return lora_a, lora_b


def _hetero_ranks(max_rank, device):
    ranks = [max_rank, 1, max(max_rank // 2, 1), 3 if max_rank >= 3 else 1, 0, max_rank]
    return torch.tensor(ranks[:NUM_SLOTS], dtype=torch.int32, device=device)


def _expected_zero_mask(ids, ranks, max_rank):
    """True where the shrink output must be exactly zero: -1 tokens and columns past the token's slot rank."""
    ids, ranks = ids.cpu().long(), ranks.cpu().long()
    token_rank = torch.where(ids >= 0, ranks[ids.clamp(min=0)], torch.zeros_like(ids))
    return torch.arange(max_rank)[None, :] >= token_rank[:, None]


@pytest.mark.parametrize("m", [37, 150])
@pytest.mark.parametrize("k", [67, 72])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sgmv_shrink_matches_reference(dtype, distribution, k, m, device):
    """On CUDA: 37 tokens on 6 slots take the decode kernel where the rows are whole 16-byte loads (K = 72, and
    fp32 too), 150 the token-tile kernels, on tensor cores for fp16/bf16 at K = 72; K = 67 and float64 take the
    CUDA-core token-tile kernel at either size."""
    max_rank = 16
    ids = _adapter_ids(distribution, m, NUM_SLOTS, device)
    ranks = _hetero_ranks(max_rank, device)
    lora_a, _ = _stacked_lora(NUM_SLOTS, max_rank, k, 8, dtype, device, ranks)
    x = randn(m, k, dtype=dtype, device=device)
    scalings = torch.tensor([0.5, 2.0, 1.0, 4.0, 1.5, 0.25], device=device)
    batch = LoRABatch.from_adapter_ids(ids, NUM_SLOTS, validate=True)
    out = ops.sgmv_shrink(x, lora_a, batch.sorted_token_ids, batch.slot_starts, batch.slot_counts, scalings, ranks)
    assert out.shape == (m, max_rank) and out.dtype == torch.float32
    ref = reference.lora_shrink(x.cpu(), lora_a.cpu(), ids.cpu(), scalings.cpu(), ranks.cpu())
    assert torch.isfinite(out).all()
    zero = _expected_zero_mask(ids, ranks, max_rank)
    assert (out.cpu()[zero] == 0).all()
    assert_close(out, ref, _tol_dtype(dtype), "shrink")


@pytest.mark.parametrize("m", [37, 150])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sgmv_expand_matches_reference(dtype, distribution, m, device):
    """On CUDA: 37 tokens on 6 slots take the decode kernel (float64 the CUDA-core token-tile one), 150 the
    token-tile kernels."""
    out = randn(m, 100, dtype=dtype, device=device)
    _check_sgmv_expand(dtype, distribution, out, 30, device)


def _check_sgmv_expand(lora_b_dtype, distribution, out, offset, device, n=45, max_rank=16):
    """sgmv_expand of a slice of n columns at `offset` into `out` [M, n_total] against the reference: inside the
    slice, and bit for bit outside it and in rows that add nothing."""
    m, dtype = out.shape[0], out.dtype
    ids = _adapter_ids(distribution, m, NUM_SLOTS, device)
    ranks = _hetero_ranks(max_rank, device)
    _, lora_b = _stacked_lora(NUM_SLOTS, max_rank, 8, n, lora_b_dtype, device, ranks)
    t = randn(m, max_rank, device=device)
    ranks_cpu, ids_cpu = ranks.cpu().long(), ids.cpu().long()
    for token in range(m):  # t past the token's rank is garbage too: it must not be read
        rank = int(ranks_cpu[ids_cpu[token]]) if ids_cpu[token] >= 0 else 0
        t[token, rank:] = float("nan")
    before = out.clone()
    batch = LoRABatch.from_adapter_ids(ids, NUM_SLOTS, validate=True)
    result = ops.sgmv_expand(t, lora_b, batch.sorted_token_ids, batch.slot_starts, batch.slot_counts, ranks, out,
                             offset)
    assert result is None
    ref = reference.lora_expand(t.cpu(), lora_b.cpu(), ids_cpu, before.cpu(), offset, ranks_cpu)
    assert torch.isfinite(out).all()
    # Columns outside the slice, and rows of tokens that add nothing, are untouched bit for bit.
    assert torch.equal(out[:, :offset], before[:, :offset]) and torch.equal(out[:, offset + n:], before[:, offset + n:])
    untouched = (ids_cpu < 0) | (ranks_cpu[ids_cpu.clamp(min=0)] == 0)
    assert torch.equal(out.cpu()[untouched], before.cpu()[untouched])
    sl = slice(offset, offset + n)
    assert_close(out[:, sl], ref[:, sl], dtype, "expand slice")
    assert_close((out[:, sl].double() - before[:, sl].double()).cpu(), ref[:, sl] - before[:, sl].cpu().double(),
                 dtype, "expand delta", scale=4.0)


@pytest.mark.gpu
@pytest.mark.parametrize("distribution", ["uniform", "mixed_base"])
@pytest.mark.parametrize("lora_b_dtype,out_dtype,n_total,offset,shift", [
    (torch.bfloat16, torch.bfloat16, 104, 32, 0), (torch.float16, torch.float16, 104, 32, 8),
    (torch.float16, torch.float32, 100, 28, 0), (torch.bfloat16, torch.float32, 100, 28, 4),
    (torch.bfloat16, torch.bfloat16, 104, 33, 0)], ids=str)
def test_cuda_sgmv_expand_tensor_cores_into_aligned_outputs(lora_b_dtype, out_dtype, n_total, offset, shift,
                                                            distribution, cuda_device):
    """The tensor-core expand (150 tokens, a 16-bit lora_b) into outputs whose rows and slice start are whole 16-byte
    units, which take its staged epilogue (16-byte loads and stores per lane; 45 columns, not a whole number of such
    units, end in a short tail): out at the start of its storage or 16 bytes into it (shift, in elements); offset
    33 is the unaligned case beside them, the fragment-order epilogue. test_sgmv_expand_matches_reference's rows of
    200 bytes never take the staged one."""
    storage = randn(150 * n_total + shift, dtype=out_dtype, device=cuda_device)
    out = storage[shift:].view(150, n_total)
    _check_sgmv_expand(lora_b_dtype, distribution, out, offset, cuda_device)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sgmv_large_and_small_slots_in_one_batch(dtype, device):
    """On CPU a slot with much work goes through a BLAS GEMM and the others through the direct per-token loop: one
    batch with both (and -1 tokens, an empty slot, NaN padding past each rank) matches the reference. Two GEMM slots,
    one of the max rank and one below it: the GEMM path must not read the padding either (its zero columns of the
    shrink output, no NaN in the expand's)."""
    k = n = 520  # 20 or 30 tokens x 520 features is a GEMM slot on CPU; 1 or 2 tokens are direct ones
    ids = torch.tensor([0] * 30 + [2] * 20 + [1, 1, 3, 3, 4] + [-1] * 4)
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(3))].to(device=device,
                                                                                         dtype=torch.int32)
    m, max_rank = ids.numel(), 16
    ranks = _hetero_ranks(max_rank, device)  # slot 0 has the max rank, slot 2 half of it, 4 rank 0, 5 no tokens
    lora_a, lora_b = _stacked_lora(NUM_SLOTS, max_rank, k, n, dtype, device, ranks)
    x = randn(m, k, dtype=dtype, device=device)
    y = randn(m, n + 7, dtype=dtype, device=device)
    scalings = torch.tensor([0.5, 2.0, 1.0, 4.0, 1.5, 0.25], device=device)
    batch = LoRABatch.from_adapter_ids(ids, NUM_SLOTS, validate=True)
    meta = (batch.sorted_token_ids, batch.slot_starts, batch.slot_counts)
    shrunk = ops.sgmv_shrink(x, lora_a, *meta, scalings, ranks)
    ref_shrunk = reference.lora_shrink(x.cpu(), lora_a.cpu(), ids.cpu(), scalings.cpu(), ranks.cpu())
    assert (shrunk.cpu()[_expected_zero_mask(ids, ranks, max_rank)] == 0).all()
    assert_close(shrunk, ref_shrunk, _tol_dtype(dtype), "shrink")
    before = y.clone()
    ops.sgmv_expand(shrunk, lora_b, *meta, ranks, y, 7)
    ref = reference.lora_expand(shrunk.cpu(), lora_b.cpu(), ids.cpu().long(), before.cpu(), 7, ranks.cpu().long())
    assert torch.equal(y[:, :7], before[:, :7])
    assert_close((y[:, 7:].double() - before[:, 7:].double()).cpu(), ref[:, 7:] - before[:, 7:].cpu().double(),
                 dtype, "expand delta", scale=4.0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="setup.py builds with OpenMP on Linux only")
def test_the_extension_is_built_with_openmp_on_linux():
    """The cpu backend's grouped direct loop is an at::parallel_for, which runs on the calling thread unless the
    extension was compiled with OpenMP: the binary then calls the OpenMP runtime (GCC's GOMP_parallel, LLVM's
    __kmpc_fork_call)."""
    binary = pathlib.Path(_ext._C.__file__).read_bytes()
    assert b"GOMP_parallel" in binary or b"__kmpc_fork_call" in binary
    # ... and shares torch's OpenMP runtime (its thread count, torch.set_num_threads): torch's wheels carry
    # libgomp.so.1, which the extension's dependency of that name resolves to; a second runtime would keep a thread
    # pool of its own, sized by the core count.
    mapped = {line.split()[-1] for line in pathlib.Path("/proc/self/maps").read_text().splitlines()}
    runtimes = {path for path in mapped if re.search(r"/lib(g|i)?omp[^/]*\.so", path)}
    assert len(runtimes) == 1, runtimes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_direct_loop_gives_the_same_bits_on_any_thread_count(dtype):
    """The direct loop's positions are split over threads (OpenMP); each writes its own output row, so one thread and
    several give the same bits. 48 one-token slots of 520 features: far more positions than one task's grain."""
    k = n = 520
    ids = torch.arange(48, dtype=torch.int32)
    ranks = torch.tensor([16, 1, 8, 3] * 12, dtype=torch.int32)
    lora_a, lora_b = _stacked_lora(48, 16, k, n, dtype, "cpu", ranks)
    x = randn(48, k, dtype=dtype)
    y = randn(48, n, dtype=dtype)
    scalings = torch.linspace(0.5, 2.0, 48)
    batch = LoRABatch.from_adapter_ids(ids, 48, validate=True)
    meta = (batch.sorted_token_ids, batch.slot_starts, batch.slot_counts)
    results, threads_before = [], torch.get_num_threads()
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            shrunk = ops.sgmv_shrink(x, lora_a, *meta, scalings, ranks)
            expanded = y.clone()
            ops.sgmv_expand(shrunk, lora_b, *meta, ranks, expanded, 0)
            results.append((shrunk, expanded))
    finally:
        torch.set_num_threads(threads_before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    ref = reference.lora_shrink(x, lora_a, ids, scalings, ranks)
    assert_close(results[1][0], ref, _tol_dtype(dtype), "shrink")


@pytest.mark.parametrize("r", RANKS)
def test_sgmv_ranks_and_shrink_expand_roundtrip(r, device):
    """Every max rank of the range; shrink then expand into a fused (two-slice) output equals the reference add_lora."""
    dtype, m, k, widths = torch.bfloat16, 21, 40, (24, 9)
    ids = _adapter_ids("mixed_base", m, NUM_SLOTS, device)
    ranks = _hetero_ranks(r, device)
    scalings = torch.linspace(0.5, 2.0, NUM_SLOTS, device=device)
    x = randn(m, k, dtype=dtype, device=device)
    y = randn(m, sum(widths), dtype=dtype, device=device)
    slices = [_stacked_lora(NUM_SLOTS, r, k, w, dtype, device, ranks) for w in widths]
    expected = reference.add_lora(y.cpu(), x.cpu(), [a.cpu() for a, _ in slices], [b.cpu() for _, b in slices],
                                  ids.cpu(), scalings.cpu(), ranks.cpu(), list(widths))
    batch = LoRABatch.from_adapter_ids(ids, NUM_SLOTS, validate=True)
    meta = (batch.sorted_token_ids, batch.slot_starts, batch.slot_counts)
    offset = 0
    for (lora_a, lora_b), width in zip(slices, widths):
        shrunk = ops.sgmv_shrink(x, lora_a, *meta, scalings, ranks)
        ops.sgmv_expand(shrunk, lora_b, *meta, ranks, y, offset)
        offset += width
    assert torch.isfinite(y).all()
    assert_close(y, expected, dtype, "add_lora", scale=2.0)


def test_sgmv_mixed_dtypes_and_strided_out(device):
    """out may have another float dtype than lora_b, and any strides: column-major, or a column block of a wider
    buffer (whose overlap check torch answers "too hard", not "no": refusing that had passed this file)."""
    m, n, max_rank = 13, 20, 8
    ids = _adapter_ids("uniform", m, NUM_SLOTS, device)
    ranks = _hetero_ranks(max_rank, device)
    _, lora_b = _stacked_lora(NUM_SLOTS, max_rank, 4, n, torch.bfloat16, device, ranks)
    t = randn(m, max_rank, device=device)
    batch = LoRABatch.from_adapter_ids(ids, NUM_SLOTS, validate=True)
    meta = (batch.sorted_token_ids, batch.slot_starts, batch.slot_counts)
    for out_dtype in (torch.float32, torch.float16):
        for out in (randn(2 * n + 3, m, dtype=out_dtype, device=device).T,  # [m, 2n+3], column-major
                    randn(m, 3 * n + 5, dtype=out_dtype, device=device)[:, 2:2 * n + 5]):  # a column block
            before = out.clone()
            ops.sgmv_expand(t, lora_b, *meta, ranks, out, n + 3)
            ref = reference.lora_expand(t.cpu(), lora_b.cpu(), ids.cpu(), before.cpu(), n + 3, ranks.cpu())
            assert_close(out, ref, out_dtype, f"expand into {out_dtype} {out.stride()}")


def test_sgmv_empty_batch(device):
    lora_a = randn(NUM_SLOTS, 8, 16, device=device)
    lora_b = randn(NUM_SLOTS, 10, 8, device=device)
    ranks = torch.full((NUM_SLOTS,), 8, dtype=torch.int32, device=device)
    scalings = torch.ones(NUM_SLOTS, device=device)
    batch = LoRABatch.from_adapter_ids(torch.zeros(0, dtype=torch.int32, device=device), NUM_SLOTS)
    meta = (batch.sorted_token_ids, batch.slot_starts, batch.slot_counts)
    out = ops.sgmv_shrink(randn(0, 16, device=device), lora_a, *meta, scalings, ranks)
    assert out.shape == (0, 8)
    y = randn(0, 10, device=device)
    ops.sgmv_expand(out, lora_b, *meta, ranks, y, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sgmv_strided_x_and_weights(dtype, device):
    """x, t and the stacked weights as strided views: x and lora_a as the first K columns of a wider tensor and
    column-major, t column-major, lora_b column-major and as the first R columns of a wider tensor (the padding is
    NaN). The CPU direct loops index rows by their stride, read float32 weights in place and convert
    16-bit ones row by row, and need unit column strides (they copy other layouts), so a row length taken for the row
    stride, or a column-major view read as row-major, gave other rows' values. Both CPU paths (a GEMM slot, direct
    slots) against the reference."""
    k = n = 520  # slot 0's 30 tokens take the GEMM path on CPU, the others the direct loop
    ids = torch.tensor([0] * 30 + [1, 1, 2, 3, 3, 4] + [-1] * 4)
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(3))].to(device=device,
                                                                                         dtype=torch.int32)
    m, max_rank = ids.numel(), 16
    ranks = _hetero_ranks(max_rank, device)
    lora_a, lora_b = _stacked_lora(NUM_SLOTS, max_rank, k, n, dtype, device, ranks)
    x = randn(m, k, dtype=dtype, device=device)
    scalings = torch.tensor([0.5, 2.0, 1.0, 4.0, 1.5, 0.25], device=device)
    batch = LoRABatch.from_adapter_ids(ids, NUM_SLOTS, validate=True)
    meta = (batch.sorted_token_ids, batch.slot_starts, batch.slot_counts)

    def padded(tensor, extra):
        """The same values as a view whose rows are `extra` NaN columns longer."""
        pad = torch.full((*tensor.shape[:-1], extra), float("nan"), dtype=dtype, device=device)
        return torch.cat([tensor, pad], dim=-1)[..., :tensor.shape[-1]]

    ref_shrunk = reference.lora_shrink(x.cpu(), lora_a.cpu(), ids.cpu(), scalings.cpu(), ranks.cpu())
    column_major_a = lora_a.transpose(1, 2).contiguous().transpose(1, 2)
    for x_view, a_view in ((padded(x, 8), padded(lora_a, 8)), (x.T.contiguous().T, column_major_a)):
        shrunk = ops.sgmv_shrink(x_view, a_view, *meta, scalings, ranks)
        assert torch.isfinite(shrunk).all()
        assert_close(shrunk, ref_shrunk, _tol_dtype(dtype), "shrink")
    t = ref_shrunk.float().to(device)
    y = randn(m, n, dtype=dtype, device=device)
    ref = reference.lora_expand(t.cpu(), lora_b.cpu(), ids.cpu(), y.cpu(), 0, ranks.cpu())
    column_major_b = lora_b.transpose(1, 2).contiguous().transpose(1, 2)
    for t_view, b_view in ((t, column_major_b), (t, padded(lora_b, 4)), (t.T.contiguous().T, lora_b)):
        out = y.clone()
        ops.sgmv_expand(t_view, b_view, *meta, ranks, out, 0)
        assert torch.isfinite(out).all()
        assert_close((out.double() - y.double()).cpu(), ref - y.cpu().double(), dtype, "expand delta", scale=4.0)


def _integers(*shape, bound=64, step=1.0, dtype=torch.float32, device="cpu"):
    """Random integers in [-bound, bound] times `step` (a power of two), exact in every dtype here; so are the
    float32 sums of their products below 2**24, and a float32 result can be compared for equality."""
    return (torch.randint(-bound, bound + 1, shape, device=device).float() * step).to(dtype)


def _assert_equal(out, expected, what):
    assert out.dtype == expected.dtype and torch.equal(out, expected), \
        f"{what}: {(out != expected).sum().item()} of {out.numel()} elements differ"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_ops_accumulate_16bit_inputs_in_float32_and_round_once(dtype):
    """16-bit inputs are multiplied and summed in float32 and rounded once. With integer-valued inputs every float32
    sum here is exact, so the float32 results equal the float64 reference bit for bit and the 16-bit expand output is
    the exact sum rounded once; a GEMM or an accumulator in the 16-bit dtype, or the expand's product rounded to it
    before the add, round sums of more bits than the dtype holds, within the 16-bit tolerances of the tests above.
    Both CPU paths of the grouped ops (a GEMM slot, direct slots) are covered."""
    cpu = torch.device("cpu")
    for m in (3, 40):  # lora_fwd's decode and prefill paths
        x, lora_a = _integers(m, 520, dtype=dtype), _integers(16, 520, dtype=dtype)
        weight, lora_b = randn(24, 520, dtype=dtype, scale=520 ** -0.5), randn(24, 16, dtype=dtype)
        _, s = ops.lora_fwd(x, None, weight, lora_a, lora_b, 2.0, None)
        _assert_equal(s, (x.double() @ lora_a.double().T).float(), f"lora_fwd s, M = {m}")
    dy, s, lora_b = _integers(40, 520, dtype=dtype), _integers(40, 16), _integers(520, 16, dtype=dtype)
    d_lora_b, ds = ops.lora_bwd_dy(dy, s, lora_b, 0.5)
    _assert_equal(d_lora_b, (0.5 * dy.double().T @ s.double()).float(), "lora_bwd_dy d_lora_b")
    _assert_equal(ds, (0.5 * dy.double() @ lora_b.double()).float(), "lora_bwd_dy ds")

    k = n = 520  # slot 0's 30 tokens take the GEMM path, the others the direct loop
    ids = torch.tensor([0] * 30 + [1, 1, 2, 3, 3, 4] + [-1] * 4, dtype=torch.int32)
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(3))]
    m, max_rank = ids.numel(), 16
    ranks = _hetero_ranks(max_rank, cpu)
    lora_a = _integers(NUM_SLOTS, max_rank, k, dtype=dtype)
    lora_b = _integers(NUM_SLOTS, n, max_rank, step=2.0 ** -10, dtype=dtype)
    for slot, rank in enumerate(ranks.tolist()):
        lora_a[slot, rank:] = float("nan")
        lora_b[slot, :, rank:] = float("nan")
    x = _integers(m, k, dtype=dtype)
    scalings = torch.tensor([0.5, 2.0, 1.0, 4.0, 1.5, 0.25])
    batch = LoRABatch.from_adapter_ids(ids, NUM_SLOTS, validate=True)
    meta = (batch.sorted_token_ids, batch.slot_starts, batch.slot_counts)
    shrunk = ops.sgmv_shrink(x, lora_a, *meta, scalings, ranks)
    _assert_equal(shrunk, reference.lora_shrink(x, lora_a, ids, scalings, ranks).float(), "sgmv_shrink")

    t = _integers(m, max_rank)  # sums of 16 products below 64, in steps of 2**-10: 16 bits, more than 16-bit dtypes
    out = _integers(m, n + 7, step=2.0 ** -4, dtype=dtype)
    expected = reference.lora_expand(t, lora_b, ids, out, 7, ranks).to(dtype)
    ops.sgmv_expand(t, lora_b, *meta, ranks, out, 7)
    _assert_equal(out, expected, "sgmv_expand")


@pytest.mark.parametrize("lora_b_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cpu_grouped_ops_accumulate_float64_operands_in_float64(lora_b_dtype):
    """A float64 operand makes the grouped ops accumulate in float64: the float64 shrink rounds its exact sums to its
    float32 output once, and a float64 out gets the exact sum whatever lora_b's dtype (the ops take mixed dtypes).
    The integer-valued inputs make every float64 sum here exact while float32 ones are not (they need up to 37 bits),
    so a float32 accumulator, or out passed through float32, differs from the reference. Both CPU paths (a GEMM slot,
    direct slots)."""
    k = n = 520  # slot 0's 30 tokens take the GEMM path, the others the direct loop
    ids = torch.tensor([0] * 30 + [1, 1, 2, 3, 3, 4] + [-1] * 4, dtype=torch.int32)
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(3))]
    m, max_rank = ids.numel(), 16
    ranks = _hetero_ranks(max_rank, torch.device("cpu"))
    lora_a = _integers(NUM_SLOTS, max_rank, k, dtype=torch.float64)
    lora_b = _integers(NUM_SLOTS, n, max_rank, step=2.0 ** -10, dtype=lora_b_dtype)
    for slot, rank in enumerate(ranks.tolist()):
        lora_a[slot, rank:] = float("nan")
        lora_b[slot, :, rank:] = float("nan")
    x = _integers(m, k, bound=2 ** 20, dtype=torch.float64)
    scalings = torch.tensor([0.5, 2.0, 1.0, 4.0, 1.5, 0.25])
    batch = LoRABatch.from_adapter_ids(ids, NUM_SLOTS, validate=True)
    meta = (batch.sorted_token_ids, batch.slot_starts, batch.slot_counts)
    shrunk = ops.sgmv_shrink(x, lora_a, *meta, scalings, ranks)
    _assert_equal(shrunk, reference.lora_shrink(x, lora_a, ids, scalings, ranks).float(), "sgmv_shrink")

    t = _integers(m, max_rank)
    out = _integers(m, n + 7, bound=2 ** 20, step=2.0 ** -30, dtype=torch.float64)
    expected = reference.lora_expand(t, lora_b, ids, out, 7, ranks)
    ops.sgmv_expand(t, lora_b, *meta, ranks, out, 7)
    _assert_equal(out, expected, "sgmv_expand")


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: ValueError / TypeError naming the argument, before any work.


def _good_fwd(device):
    x, weight, lora_a, lora_b, bias = lora_inputs(3, 16, 12, 4, torch.float32, device)
    return dict(x=x, x_lora=None, weight=weight, lora_a=lora_a, lora_b=lora_b, scaling=1.0, bias=bias)


FWD_BAD = [
    ("x", lambda a: a["x"][None], ValueError, r"x expected a 2-D tensor, got shape \[1, 3, 16\]"),
    ("x", lambda a: a["x"].to(torch.int32), TypeError, "x expected a float32/float16/bfloat16/float64 tensor, got Int"),
    ("weight", lambda a: a["weight"][:, :15], ValueError,
     r"weight.shape\[1\] expected 16 \(in_features = x.shape\[1\]\), got shape \[12, 15\]"),
    ("weight", lambda a: a["weight"][None], ValueError, r"weight expected a 2-D tensor, got shape \[1, 12, 16\]"),
    ("weight", lambda a: a["weight"].double(), TypeError, "weight expected dtype"),
    ("lora_a", lambda a: a["lora_a"][:, :15], ValueError, r"lora_a.shape\[1\] expected 16"),
    ("lora_a", lambda a: a["lora_a"][None], ValueError, "lora_a expected a 2-D"),
    ("lora_a", lambda a: a["lora_a"].double(), TypeError, r"lora_a expected dtype Float \(same as x\), got Double"),
    ("lora_b", lambda a: a["lora_b"][:11], ValueError, r"lora_b.shape\[0\] expected 12"),
    ("lora_b", lambda a: a["lora_b"][:, :3], ValueError, r"lora_b.shape\[1\] expected 4"),
    ("lora_b", lambda a: a["lora_b"].half(), TypeError, r"lora_b expected dtype Float \(same as x\), got Half"),
    ("lora_b", lambda a: a["lora_b"][None], ValueError, r"lora_b expected a 2-D tensor, got shape \[1, 12, 4\]"),
    ("bias", lambda a: a["bias"][:5], ValueError, r"bias.shape\[0\] expected 12"),
    ("bias", lambda a: a["bias"][None], ValueError, "bias expected a 1-D"),
    ("bias", lambda a: a["bias"].double(), TypeError, "bias expected dtype"),
    ("x_lora", lambda a: a["x"][:2], ValueError, r"x_lora.shape\[0\] expected 3"),
    ("x_lora", lambda a: a["x"].half(), TypeError, "x_lora expected dtype"),
    ("x_lora", lambda a: a["x"][None], ValueError, "x_lora expected a 2-D"),
    ("x_lora", lambda a: torch.cat([a["x"], a["x"][:, :1]], dim=1), ValueError, r"x_lora.shape\[1\] expected 16"),
    ("scaling", lambda a: float("nan"), ValueError, "scaling expected a finite"),
    # applied in float32 there: inf, and NaN in rows of x·Aᵀ that are zero (a direct call skipped lora_linear's check)
    ("scaling", lambda a: -1e39, ValueError, r"scaling expected a number within float32's range for Float inputs"),
]


@pytest.mark.parametrize("arg,make,error,match", FWD_BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(FWD_BAD)])
def test_lora_fwd_bad_input(arg, make, error, match, device):
    args = _good_fwd(device)
    args[arg] = make(args)
    with pytest.raises(error, match=f"lora_fwd: {match}"):
        ops.lora_fwd(**args)


def test_lora_fwd_rank_zero_and_device_mismatch(device):
    args = _good_fwd(device)
    args["lora_a"], args["lora_b"] = args["lora_a"][:0], args["lora_b"][:, :0]
    with pytest.raises(ValueError, match="lora_a.shape"):
        ops.lora_fwd(**args)
    if device.type == "cuda":  # each argument's own check (on CPU a meta argument reaches the fakes' check instead)
        for arg in ("weight", "lora_a", "lora_b", "bias", "x_lora"):
            args = _good_fwd(device)
            args["x_lora"] = args["x"].clone()
            args[arg] = args[arg].cpu()
            # x's device as the C++ check prints it: cuda:0, where the fixture's device is "cuda"
            message = rf"lora_fwd: {arg} expected device {args['x'].device} \(same as x\), got cpu"
            with pytest.raises(ValueError, match=message):
                ops.lora_fwd(**args)


def test_lora_bwd_dy_bad_input(device):
    dy, s, lora_b = randn(5, 12, device=device), randn(5, 4, device=device), randn(12, 4, device=device)
    with pytest.raises(TypeError, match="lora_bwd_dy: s expected dtype"):
        ops.lora_bwd_dy(dy, s.half(), lora_b, 1.0)
    with pytest.raises(TypeError, match="lora_bwd_dy: lora_b expected dtype"):
        ops.lora_bwd_dy(dy, s, lora_b.double(), 1.0)
    with pytest.raises(TypeError, match="lora_bwd_dy: s expected dtype Double, got Float"):
        ops.lora_bwd_dy(dy.double(), s, lora_b.double(), 1.0)
    with pytest.raises(ValueError, match=r"lora_bwd_dy: lora_b.shape\[0\] expected 12"):
        ops.lora_bwd_dy(dy, s, lora_b[:10], 1.0)
    with pytest.raises(ValueError, match=r"lora_bwd_dy: s.shape\[0\] expected 5"):
        ops.lora_bwd_dy(dy, s[:4], lora_b, 1.0)
    with pytest.raises(ValueError, match=r"lora_bwd_dy: lora_b.shape\[1\] expected 3"):
        ops.lora_bwd_dy(dy, s[:, :3], lora_b, 1.0)
    with pytest.raises(ValueError, match="lora_bwd_dy: dy expected a 2-D"):
        ops.lora_bwd_dy(dy[None], s, lora_b, 1.0)
    with pytest.raises(ValueError, match=r"lora_bwd_dy: s expected a 2-D tensor, got shape \[1, 5, 4\]"):
        ops.lora_bwd_dy(dy, s[None], lora_b, 1.0)
    with pytest.raises(ValueError, match="lora_bwd_dy: lora_b expected a 2-D"):
        ops.lora_bwd_dy(dy, s, lora_b[None], 1.0)
    with pytest.raises(TypeError, match="lora_bwd_dy: dy expected a float32"):
        ops.lora_bwd_dy(dy.to(torch.int32), s, lora_b.to(torch.int32), 1.0)
    with pytest.raises(ValueError, match="lora_bwd_dy: scaling expected a number within float32's range for Float"):
        ops.lora_bwd_dy(dy, s, lora_b, 1e39)
    with pytest.raises(ValueError, match="lora_bwd_dy: scaling expected a finite float"):
        ops.lora_bwd_dy(dy, s, lora_b, float("inf"))


def test_a_scaling_past_float32s_range_runs_in_float64(device):
    """float64 inputs are computed in float64, where such a scaling is finite: the range check leaves them alone."""
    args = {name: t.double() if isinstance(t, torch.Tensor) else t for name, t in _good_fwd(device).items()}
    args["scaling"] = 1e39
    y, s = ops.lora_fwd(**args)
    expected = args["x"] @ args["weight"].T + 1e39 * (args["x"] @ args["lora_a"].T) @ args["lora_b"].T
    if args.get("bias") is not None:
        expected = expected + args["bias"]
    torch.testing.assert_close(y, expected)
    d_lora_b, _ = ops.lora_bwd_dy(torch.ones_like(y), s, args["lora_b"], 1e39)
    assert torch.isfinite(d_lora_b).all()


def _good_sgmv(device):
    m, k, n, max_rank = 10, 16, 12, 4
    ids = _adapter_ids("mixed_base", m, NUM_SLOTS, device)
    batch = LoRABatch.from_adapter_ids(ids, NUM_SLOTS, validate=True)
    return dict(
        x=randn(m, k, device=device), lora_a=randn(NUM_SLOTS, max_rank, k, device=device),
        lora_b=randn(NUM_SLOTS, n, max_rank, device=device), sorted_token_ids=batch.sorted_token_ids,
        slot_starts=batch.slot_starts, slot_counts=batch.slot_counts,
        scalings=torch.ones(NUM_SLOTS, device=device),
        ranks=torch.full((NUM_SLOTS,), max_rank, dtype=torch.int32, device=device),
        t=randn(m, max_rank, device=device), out=randn(m, 2 * n, device=device), slice_offset=n)


def _shrink(a):
    return ops.sgmv_shrink(a["x"], a["lora_a"], a["sorted_token_ids"], a["slot_starts"], a["slot_counts"],
                           a["scalings"], a["ranks"])


def _expand(a):
    return ops.sgmv_expand(a["t"], a["lora_b"], a["sorted_token_ids"], a["slot_starts"], a["slot_counts"],
                           a["ranks"], a["out"], a["slice_offset"])


def _strided(t):
    """The same values in a view with stride 2."""
    return torch.stack([t, t], dim=-1)[..., 0]


SGMV_BAD = [
    (_shrink, "sorted_token_ids", lambda a: a["sorted_token_ids"].long(), TypeError, "sorted_token_ids expected dtype"),
    (_shrink, "slot_starts", lambda a: a["slot_starts"][:-1], ValueError, r"slot_starts.shape\[0\] expected 6"),
    (_shrink, "slot_counts", lambda a: a["slot_counts"].float(), TypeError, "slot_counts expected dtype"),
    (_shrink, "scalings", lambda a: a["scalings"].double(), TypeError, "scalings expected dtype"),
    (_shrink, "scalings", lambda a: a["scalings"][:-1], ValueError, r"scalings.shape\[0\] expected 6"),
    (_shrink, "ranks", lambda a: a["ranks"][None], ValueError, "ranks expected a 1-D"),
    (_shrink, "lora_a", lambda a: a["lora_a"][:, :, :15], ValueError, r"lora_a.shape\[2\] expected 16"),
    (_shrink, "lora_a", lambda a: a["lora_a"].half(), TypeError, "lora_a expected dtype"),
    (_shrink, "x", lambda a: a["x"][:9], ValueError, r"sorted_token_ids.shape\[0\] expected 9"),
    (_shrink, "x", lambda a: a["x"][None], ValueError, r"x expected a 2-D tensor, got shape \[1, 10, 16\]"),
    (_shrink, "x", lambda a: a["x"].to(torch.int32), TypeError, "x expected a float32/float16/bfloat16/float64 tensor"),
    (_shrink, "lora_a", lambda a: a["lora_a"][0], ValueError, r"lora_a expected a 3-D tensor, got shape \[4, 16\]"),
    (_shrink, "scalings", lambda a: a["scalings"][None], ValueError,
     r"scalings expected a 1-D tensor, got shape \[1, 6\]"),
    (_expand, "t", lambda a: a["t"][None], ValueError, r"t expected a 2-D tensor, got shape \[1, 10, 4\]"),
    (_expand, "t", lambda a: a["t"].half(), TypeError, "t expected dtype"),
    (_expand, "lora_b", lambda a: a["lora_b"][:, :, :3], ValueError, r"lora_b.shape\[2\] expected 4"),
    (_expand, "lora_b", lambda a: a["lora_b"].to(torch.int32), TypeError, "lora_b expected a float32"),
    (_expand, "lora_b", lambda a: a["lora_b"][0], ValueError, r"lora_b expected a 3-D tensor, got shape \[12, 4\]"),
    (_expand, "out", lambda a: a["out"][None], ValueError, r"out expected a 2-D tensor, got shape \[1, 10, 24\]"),
    (_expand, "out", lambda a: a["out"][:9], ValueError, r"out.shape\[0\] expected 10"),
    (_expand, "out", lambda a: a["out"].to(torch.int32), TypeError, "out expected a float32"),
    (_expand, "slice_offset", lambda a: 13, ValueError, r"slice_offset expected in \[0, out.shape\[1\] - "
     r"lora_b.shape\[1\]\] = \[0, 12\], got 13 \(out shape \[10, 24\], lora_b shape \[6, 12, 4\]\)"),
    (_expand, "slice_offset", lambda a: -1, ValueError, "slice_offset expected in"),
    # slice_offset + N wrapped past INT64_MAX to a negative sum, which passed (out.narrow then raised an IndexError;
    # a CUDA kernel wrote that far past out)
    (_expand, "slice_offset", lambda a: 2 ** 63 - 1, ValueError, "slice_offset expected in"),
    # the kernels index metadata and scalings as plain arrays: a strided view read other entries (out of bounds)
    (_shrink, "sorted_token_ids", lambda a: _strided(a["sorted_token_ids"]), ValueError,
     "sorted_token_ids expected a contiguous tensor"),
    (_shrink, "slot_counts", lambda a: _strided(a["slot_counts"]), ValueError, "slot_counts expected a contiguous"),
    (_shrink, "scalings", lambda a: _strided(a["scalings"]), ValueError, "scalings expected a contiguous tensor"),
    (_expand, "ranks", lambda a: _strided(a["ranks"]), ValueError, "ranks expected a contiguous tensor"),
    (_expand, "slot_starts", lambda a: _strided(a["slot_starts"]), ValueError, "slot_starts expected a contiguous"),
    (_expand, "out", lambda a: a["out"][:1].expand(10, -1), ValueError,
     "out expected a tensor whose elements do not overlap in memory"),
]


@pytest.mark.parametrize("call,arg,make,error,match", SGMV_BAD,
                         ids=[f"{b[0].__name__[1:]}-{b[1]}-{i}" for i, b in enumerate(SGMV_BAD)])
def test_sgmv_bad_input(call, arg, make, error, match, device):
    args = _good_sgmv(device)
    args[arg] = make(args)
    op = "sgmv_shrink" if call is _shrink else "sgmv_expand"
    with pytest.raises(error, match=f"{op}: {match}"):
        call(args)


def test_grouped_and_bwd_dy_ops_refuse_an_argument_on_another_device(device):
    """Each argument's own device check, which only a CUDA call reaches (on CPU a meta argument reaches the fakes'
    check instead): a CPU argument among CUDA ones would be a host pointer read by the kernel. Deleting the checks of
    lora_bwd_dy's s or of a metadata vector passed every CPU test (helper 176)."""
    if device.type != "cuda":
        pytest.skip("needs a CUDA device: a CPU argument among CUDA ones")
    for call, op, ref, names in (
            (_shrink, "sgmv_shrink", "x", ("lora_a", "scalings", "sorted_token_ids", "slot_starts", "slot_counts",
                                           "ranks")),
            (_expand, "sgmv_expand", "t", ("lora_b", "out", "sorted_token_ids", "slot_starts", "slot_counts",
                                           "ranks"))):
        for name in names:
            args = _good_sgmv(device)
            args[name] = args[name].cpu()
            with pytest.raises(ValueError, match=rf"{op}: {name} expected device {args[ref].device} \(same as "
                                                 rf"{ref}\), got cpu"):
                call(args)
    dy, s, lora_b = randn(5, 12, device=device), randn(5, 4, device=device), randn(12, 4, device=device)
    for name in ("s", "lora_b"):
        args = dict(dy=dy, s=s, lora_b=lora_b)
        args[name] = args[name].cpu()
        with pytest.raises(ValueError, match=rf"lora_bwd_dy: {name} expected device {dy.device} \(same as dy\), "
                                             rf"got cpu"):
            ops.lora_bwd_dy(args["dy"], args["s"], args["lora_b"], 1.0)


@pytest.mark.parametrize("call", [_shrink, _expand], ids=["shrink", "expand"])
@pytest.mark.parametrize("name", ["sorted_token_ids", "slot_starts", "slot_counts", "ranks"])
def test_sgmv_checks_each_metadata_vector(call, name, device):
    """Each metadata vector on its own must be 1-D, int32, contiguous (the kernels read it as a plain int32 array) and
    hold one entry per token (sorted_token_ids) or per slot (the others)."""
    op = "sgmv_shrink" if call is _shrink else "sgmv_expand"
    args = _good_sgmv(device)
    vector = args[name]
    n = vector.numel()
    what = (rf"tokens = {'x' if call is _shrink else 't'}.shape\[0\]" if name == "sorted_token_ids"
            else rf"adapter slots = {'lora_a' if call is _shrink else 'lora_b'}.shape\[0\]")
    for bad, error, match in [
        (vector[None], ValueError, rf"{name} expected a 1-D tensor, got shape \[1, {n}\]"),
        (vector.long(), TypeError, rf"{name} expected dtype Int, got Long"),
        (_strided(vector), ValueError,
         rf"{name} expected a contiguous tensor, got strides \[2\] \(shape \[{n}\]\); pass {name}.contiguous\(\)"),
        (vector[:-1], ValueError, rf"{name}.shape\[0\] expected {n} \({what}\), got shape \[{n - 1}\]"),
    ]:
        with pytest.raises(error, match=f"{op}: {match}"):
            call(dict(args, **{name: bad}))


@pytest.mark.parametrize("overlapped", ["t", "lora_b"])
def test_sgmv_expand_refuses_an_out_sharing_memory_with_its_inputs(overlapped, device):
    """out is written in place: sharing memory with t or lora_b, it was read after being overwritten."""
    args = _good_sgmv(device)
    source = args[overlapped]
    storage = torch.zeros(source.numel() + args["out"].numel(), device=device)
    args[overlapped] = storage[:source.numel()].view_as(source).copy_(source)
    args["out"] = storage[source.numel() // 2:][:args["out"].numel()].view_as(args["out"])  # half over the input
    before = storage.clone()
    with pytest.raises(ValueError, match=f"sgmv_expand: out expected memory of its own, got a view that overlaps {overlapped}, "):
        _expand(args)
    assert torch.equal(storage, before)


def test_sgmv_expand_refuses_t_itself_as_out(device):
    """The full overlap too: out passed as t itself (lora_b as wide as t's rank), which the op would overwrite while
    reading it."""
    args = _good_sgmv(device)
    args["lora_b"] = args["lora_b"][:, :args["t"].shape[1]]
    args["out"], args["slice_offset"] = args["t"], 0
    before = args["t"].clone()
    with pytest.raises(ValueError, match="sgmv_expand: out expected memory of its own, got a view that overlaps t, "):
        _expand(args)
    assert torch.equal(args["t"], before)


def test_sgmv_bad_metadata_values_cpu():
    """On CPU the metadata values are checked too (free there; on CUDA the kernels clamp instead of syncing)."""
    args = _good_sgmv(torch.device("cpu"))
    bad_ranks = dict(args, ranks=torch.full((NUM_SLOTS,), 5, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"sgmv_shrink: ranks expected values in \[0, 4\]"):
        _shrink(bad_ranks)
    negative_rank = dict(args, ranks=torch.tensor([4, 4, -1, 4, 4, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"sgmv_expand: ranks expected values in \[0, 4\] \(the max rank R\), got "
                                        r"ranks\[2\] = -1"):
        _expand(negative_rank)
    bad_counts = dict(args, slot_counts=args["slot_counts"] + 10)
    with pytest.raises(ValueError, match="sgmv_expand: slot_starts/slot_counts expected"):
        _expand(bad_counts)
    # Below zero too, on an empty slot: a range starting before token 0, a negative count.
    starts, counts = args["slot_starts"], args["slot_counts"]
    assert (counts == 0).any()
    before_zero = dict(args, slot_starts=torch.where(counts == 0, -1, starts).to(torch.int32))
    negative_count = dict(args, slot_counts=torch.where(counts == 0, -1, counts).to(torch.int32))
    for bad in (before_zero, negative_count):
        with pytest.raises(ValueError, match="sgmv_shrink: slot_starts/slot_counts expected token ranges inside"):
            _shrink(bad)
    bad_ids = dict(args, sorted_token_ids=args["sorted_token_ids"] + 100)
    with pytest.raises(ValueError, match="sgmv_shrink: sorted_token_ids expected values"):
        _shrink(bad_ids)
    negative_id = dict(args, sorted_token_ids=args["sorted_token_ids"].clone())
    assert int(starts.min()) > 0  # position 0 holds a token of no slot (-1 tokens sort first), outside every range
    negative_id["sorted_token_ids"][0] = -1
    with pytest.raises(ValueError, match=r"sgmv_expand: sorted_token_ids expected values in \[0, 10\), got "
                                         r"sorted_token_ids\[0\] = -1"):
        _expand(negative_id)
    one_past = dict(args, sorted_token_ids=args["sorted_token_ids"].clone())
    one_past["sorted_token_ids"][0] = 10  # M: one row past the last token
    with pytest.raises(ValueError, match=r"sgmv_shrink: sorted_token_ids expected values in \[0, 10\), got "
                                         r"sorted_token_ids\[0\] = 10"):
        _shrink(one_past)
    # Two slots over one token would have two threads write its row: overlapping ranges and repeated tokens fail.
    overlapping = dict(args, slot_starts=torch.zeros(NUM_SLOTS, dtype=torch.int32),
                       slot_counts=torch.full((NUM_SLOTS,), 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="sgmv_shrink: slot_starts/slot_counts expected disjoint token ranges, got "
                                         "slot 1 overlapping another slot at position 0"):
        _shrink(overlapping)
    repeated = dict(args, sorted_token_ids=torch.zeros(10, dtype=torch.int32),
                    slot_starts=torch.tensor([0, 2, 4, 6, 8, 10], dtype=torch.int32),
                    slot_counts=torch.tensor([2, 2, 2, 2, 2, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="sgmv_expand: sorted_token_ids expected each token at most once within the "
                                         "slots' ranges, got token 0 twice"):
        _expand(repeated)


def test_sgmv_metadata_size_errors_say_where_the_expected_size_comes_from():
    """A wrong x / t or lora_a / lora_b is as likely as wrong metadata: the size errors name the argument the expected
    size was read from (helper 188: "expected 3 (tokens)" blamed sorted_token_ids for an x of the wrong rows)."""
    args = _good_sgmv(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"sgmv_shrink: sorted_token_ids.shape\[0\] expected 9 \(tokens = "
                                         r"x.shape\[0\]\), got shape \[10\]"):
        _shrink(dict(args, x=args["x"][:9]))
    with pytest.raises(ValueError, match=r"sgmv_expand: sorted_token_ids.shape\[0\] expected 9 \(tokens = "
                                         r"t.shape\[0\]\), got shape \[10\]"):
        _expand(dict(args, t=args["t"][:9], out=args["out"][:9]))
    with pytest.raises(ValueError, match=rf"sgmv_shrink: slot_starts.shape\[0\] expected {NUM_SLOTS - 1} \(adapter "
                                         rf"slots = lora_a.shape\[0\]\), got shape \[{NUM_SLOTS}\]"):
        _shrink(dict(args, lora_a=args["lora_a"][1:]))
    with pytest.raises(ValueError, match=rf"sgmv_expand: slot_starts.shape\[0\] expected {NUM_SLOTS - 1} \(adapter "
                                         rf"slots = lora_b.shape\[0\]\), got shape \[{NUM_SLOTS}\]"):
        _expand(dict(args, lora_b=args["lora_b"][1:]))


def test_sgmv_metadata_value_checks_reach_the_last_slot_and_token():
    """The CPU value checks read every slot and every position, the last ones included, and a slot's range is bounded
    by where it ends (start + count), not by its count alone."""
    args = _good_sgmv(torch.device("cpu"))
    last = NUM_SLOTS - 1
    assert args["slot_starts"][last] + args["slot_counts"][last] == 10  # the last slot ends at the last token
    ranks = args["ranks"].clone()
    ranks[last] = 5
    with pytest.raises(ValueError, match=rf"sgmv_shrink: ranks expected values in \[0, 4\] \(the max rank R\), got "
                                         rf"ranks\[{last}\] = 5"):
        _shrink(dict(args, ranks=ranks))
    counts = args["slot_counts"].clone()
    counts[last] += 1  # 3 tokens from position 8: one past the end, though 3 alone fits in 10
    with pytest.raises(ValueError, match=rf"sgmv_expand: slot_starts/slot_counts expected token ranges inside "
                                         rf"\[0, 10\), got slot {last} starting at 8 with 3 tokens"):
        _expand(dict(args, slot_counts=counts))
    token_ids = args["sorted_token_ids"].clone()
    token_ids[-1] = 10
    with pytest.raises(ValueError, match=r"sgmv_shrink: sorted_token_ids expected values in \[0, 10\), got "
                                         r"sorted_token_ids\[9\] = 10"):
        _shrink(dict(args, sorted_token_ids=token_ids))
    over_first = dict(args, sorted_token_ids=torch.arange(10, dtype=torch.int32),
                      slot_starts=torch.tensor([0, 2, 4, 6, 8, 0], dtype=torch.int32),
                      slot_counts=torch.tensor([2, 2, 2, 2, 2, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=rf"sgmv_expand: slot_starts/slot_counts expected disjoint token ranges, got "
                                         rf"slot {last} overlapping another slot at position 0"):
        _expand(over_first)


@pytest.mark.parametrize("call, arg", [("fwd", "weight"), ("fwd", "lora_a"), ("fwd", "lora_b"), ("fwd", "bias"),
                                       ("fwd", "x_lora"), ("bwd_dy", "s"), ("bwd_dy", "lora_b"),
                                       ("shrink", "lora_a"), ("shrink", "ranks"), ("shrink", "scalings"),
                                       ("expand", "ranks"), ("expand", "lora_b"), ("expand", "out")])
def test_a_meta_argument_among_cpu_tensors_is_a_device_error(call, arg):
    """One meta tensor among CPU ones sends the call to the fake (meta) implementation, which took any devices: it
    returned uninitialised CPU tensors (lora_fwd, sgmv_shrink) or did nothing (sgmv_expand), with no error. The
    fakes check devices as the kernels do."""
    cpu = torch.device("cpu")
    if call == "fwd":
        args = _good_fwd(cpu)
        args["x_lora"] = args["x"].clone()
        args[arg] = args[arg].to("meta")
        run = lambda: ops.lora_fwd(**args)
        ref = "x"
    elif call == "bwd_dy":
        dy, s, lora_b = randn(3, 12), randn(3, 4), randn(12, 4)
        meta = {"s": s, "lora_b": lora_b}
        meta[arg] = meta[arg].to("meta")
        run = lambda: ops.lora_bwd_dy(dy, meta["s"], meta["lora_b"], 1.0)
        ref = "dy"
    else:
        args = _good_sgmv(cpu)
        args[arg] = args[arg].to("meta")
        run = (lambda: _shrink(args)) if call == "shrink" else (lambda: _expand(args))
        ref = "x" if call == "shrink" else "t"
    with pytest.raises(ValueError, match=rf"{arg} expected device cpu \(same as {ref}\), got meta"):
        run()


def test_the_fakes_device_check_tells_one_gpu_from_another():
    """The fakes compare whole devices, not their types: under torch.compile a factor on cuda:1 with x on cuda:0
    must be refused at trace time as the kernels refuse it (checked with stand-in tensors: no GPU here)."""
    from types import SimpleNamespace

    on = {index: SimpleNamespace(device=torch.device("cuda", index)) for index in (0, 1)}
    _ext.check_devices("lora_fwd", "x", on[0], weight=on[0], bias=None)  # same device, no bias: fine
    with pytest.raises(ValueError, match=r"lora_fwd: lora_a expected device cuda:0 \(same as x\), got cuda:1"):
        _ext.check_devices("lora_fwd", "x", on[0], weight=on[0], lora_a=on[1])


# ---------------------------------------------------------------------------------------------------------------------
# opcheck: schema, fake (meta) impls, and that the registrations agree with them.


def test_ops_compute_as_written_under_autocast(device):
    """torch.autocast must not reach inside the ops: their fp32 GEMMs stay fp32 and give the same bits as without
    autocast. Before, lora_fwd failed on the mixed dtypes autocast made inside it, and the shrink's GEMM path would
    have rounded to bfloat16."""
    x, weight, lora_a, lora_b, bias = lora_inputs(7, 67, 123, 8, torch.float32, device)
    dy = randn(7, 123, device=device)
    k = n = 520  # 30 tokens x 520 features: the CPU shrink/expand take their GEMM path for slot 0
    ids = torch.tensor([0] * 30 + [1, 1], device=device, dtype=torch.int32)
    stacked_a = randn(2, 8, k, device=device, scale=k ** -0.5)
    stacked_b = randn(2, n, 8, device=device, scale=8 ** -0.5)
    tokens = randn(ids.numel(), k, device=device)
    scalings, ranks = torch.tensor([1.0, 2.0], device=device), torch.tensor([8, 8], device=device, dtype=torch.int32)
    batch = LoRABatch.from_adapter_ids(ids, 2, validate=True)
    meta = (batch.sorted_token_ids, batch.slot_starts, batch.slot_counts)

    def run_all():
        y, s = ops.lora_fwd(x, None, weight, lora_a, lora_b, 2.0, bias)
        d_lora_b, ds = ops.lora_bwd_dy(dy, s, lora_b, 2.0)
        shrunk = ops.sgmv_shrink(tokens, stacked_a, *meta, scalings, ranks)
        out = torch.zeros(ids.numel(), n, device=device)
        ops.sgmv_expand(shrunk, stacked_b, *meta, ranks, out, 0)
        return y, s, d_lora_b, ds, shrunk, out

    expected = run_all()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        results = run_all()
    for name, got, want in zip(("y", "s", "dB", "dS", "shrink", "expand"), results, expected):
        assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want), name


def test_opcheck_lora_fwd(device):
    # float64 too: s is accumulate_dtype(x.dtype), float64 there (a fake saying float32 passed the other dtypes)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x, weight, lora_a, lora_b, bias = lora_inputs(5, 24, 20, 4, dtype, device)
        torch.library.opcheck(ops.lora_fwd.default, (x, None, weight, lora_a, lora_b, 2.0, bias))
        torch.library.opcheck(ops.lora_fwd.default, (x, x * 2, weight, lora_a, lora_b, 0.5, None))


def test_opcheck_lora_bwd_dy(device):
    dy = randn(5, 20, dtype=torch.bfloat16, device=device)
    torch.library.opcheck(ops.lora_bwd_dy.default,
                          (dy, randn(5, 4, device=device), randn(20, 4, dtype=torch.bfloat16, device=device), 2.0))


def test_opcheck_sgmv(device):
    args = _good_sgmv(device)
    torch.library.opcheck(ops.sgmv_shrink.default, (args["x"], args["lora_a"], args["sorted_token_ids"],
                                                     args["slot_starts"], args["slot_counts"], args["scalings"],
                                                     args["ranks"]))
    for dtype in (torch.bfloat16, torch.float64):  # the shrink's result is float32 whatever x's dtype
        torch.library.opcheck(ops.sgmv_shrink.default, (args["x"].to(dtype), args["lora_a"].to(dtype),
                                                         args["sorted_token_ids"], args["slot_starts"],
                                                         args["slot_counts"], args["scalings"], args["ranks"]))
    torch.library.opcheck(ops.sgmv_expand.default, (args["t"], args["lora_b"], args["sorted_token_ids"],
                                                     args["slot_starts"], args["slot_counts"], args["ranks"],
                                                     args["out"], args["slice_offset"]))


# ---------------------------------------------------------------------------------------------------------------------
# CUDA only: paths the CPU implementation does not have.


@pytest.fixture
def cuda_device():
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 2, 4, 5, 8, 9, 16])
@pytest.mark.parametrize("k", [64, 67, 4096, 4100, 4104])
@pytest.mark.parametrize("r", [1, 16, 256])
def test_cuda_decode_kernel(dtype, m, k, r, cuda_device):
    """The hand-written decode forward (M <= 16): K multiple of the 16-byte vector or not (scalar path), split-K
    shrink for large K, the partial budget at r = 256, bias on. fp16/bf16 with K a multiple of 8 run the tensor-core
    kernel: M = 8 and 9 on either side of its switch to the MMA tile's upper rows, K = 64 less than one warp's step,
    K = 4104 a last step with one 16-byte load per row; N = 123 a partial last block."""
    x, weight, lora_a, lora_b, bias = lora_inputs(m, k, 123, r, dtype, cuda_device)
    _check_fwd(x, None, weight, lora_a, lora_b, 2.0, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_decode_forward_waits_for_a_slow_shrink(dtype, cuda_device):
    """On sm_90 the tensor-core forward starts while the shrink runs (programmatic dependent launch) and waits for it
    only before it reads S. Here the shrink has far more work than the forward (M = 16 rows of x against r = 256 rows
    of A, one K split at the partial budget, against one block for N = 16 rows of W), so a forward that read S
    without waiting would read it before the shrink wrote it. A new x each time: a stale S of the same shape left in
    the reused buffer would be the previous call's, not this one's."""
    _, weight, lora_a, lora_b, bias = lora_inputs(16, 16384, 16, 256, dtype, cuda_device)
    for _ in range(3):
        x = randn(16, 16384, dtype=dtype, device=cuda_device)
        _check_fwd(x, None, weight, lora_a, lora_b, 2.0, bias)


@pytest.mark.gpu
def test_cuda_decode_forward_overlaps_the_shrink_on_sm_90(cuda_device):
    """That the dependent launch is taken: on sm_90 (the extension's sm_90a image) the tensor-core forward starts
    while the shrink runs. With the slow shrink of the test above (tens of µs against the forward's W stream), the
    profiler's trace must show the forward's kernel starting before the shrink's ends; launched one after the other
    (an image without the wait, or no dependent launch), it starts after."""
    if torch.cuda.get_device_capability(cuda_device) < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90")
    x, weight, lora_a, lora_b, bias = lora_inputs(16, 16384, 16, 256, torch.bfloat16, cuda_device)
    ops.lora_fwd(x, None, weight, lora_a, lora_b, 2.0, bias)  # warm-up: lazy loading out of the trace
    torch.cuda.synchronize(cuda_device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.lora_fwd(x, None, weight, lora_a, lora_b, 2.0, bias)
        torch.cuda.synchronize(cuda_device)
    kernels = {name: [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and re.search(name + "[<I]", e.name)]
               for name in ("lora_shrink_splitk_kernel", "lora_fwd_decode_mma_kernel")}
    assert all(len(events) == 1 for events in kernels.values()), [e.name for e in prof.events()]
    shrink, forward = kernels["lora_shrink_splitk_kernel"][0], kernels["lora_fwd_decode_mma_kernel"][0]
    assert forward.time_range.start < shrink.time_range.end, (
        f"forward {forward.time_range.start}-{forward.time_range.end} µs, shrink {shrink.time_range.start}-"
        f"{shrink.time_range.end} µs")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
def test_cuda_decode_forward_replays_in_a_cuda_graph(m, cuda_device):
    """The decode forward's two kernels (the forward a programmatic dependent of the shrink on sm_90) captured in a
    CUDA graph, replayed on new values of x."""
    x, weight, lora_a, lora_b, bias = lora_inputs(m, 4096, 256, 16, torch.bfloat16, cuda_device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.lora_fwd(x, None, weight, lora_a, lora_b, 2.0, bias)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, s = ops.lora_fwd(x, None, weight, lora_a, lora_b, 2.0, bias)
    for _ in range(2):
        x.copy_(randn(m, 4096, dtype=torch.bfloat16, device=cuda_device))
        graph.replay()
        torch.cuda.synchronize(cuda_device)
        y_ref = reference.lora_linear(x.cpu(), weight.cpu(), lora_a.cpu(), lora_b.cpu(), 2.0, bias.cpu(), None)
        assert_close(y, y_ref, torch.bfloat16, "graph replay y")
        assert_close(s, x.cpu().double() @ lora_a.cpu().double().T, torch.bfloat16, "graph replay s")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,k,kernel", [
    (torch.bfloat16, 4096, "lora_fwd_decode_mma_kernel"), (torch.float16, 64, "lora_fwd_decode_mma_kernel"),
    (torch.bfloat16, 4100, "lora_fwd_decode_kernel"), (torch.float32, 4096, "lora_fwd_decode_kernel")], ids=str)
def test_cuda_decode_takes_the_tensor_core_kernel_where_it_can(dtype, k, kernel, cuda_device):
    """Which decode kernel runs: the tensor-core one for 16-bit rows of whole 16-byte loads (on sm_80+, which every
    GPU this extension is built for has), the CUDA-core one for fp32 and for K not a multiple of 8. The other tests
    check the numbers; this one that they checked the kernel meant (a wrong dispatch would pass them on the old one)."""
    x, weight, lora_a, lora_b, bias = lora_inputs(4, k, 256, 16, dtype, cuda_device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.lora_fwd(x, None, weight, lora_a, lora_b, 2.0, bias)
        torch.cuda.synchronize(cuda_device)
    names = [event.name for event in prof.events()]
    # demangled (`...kernel<c10::BFloat16, false>`) or mangled (`...kernelIN3c10...`): not the other kernel's prefix
    assert any(re.search(kernel + "[<I]", name) for name in names), names


@pytest.mark.gpu
@pytest.mark.parametrize("m,dtype,k,strided,kernel", [
    (256, torch.bfloat16, 4096, False, "sgmv_shrink_mma_kernel"), (256, torch.float16, 72, False,
                                                                   "sgmv_shrink_mma_kernel"),
    (256, torch.bfloat16, 4100, False, "sgmv_kernel"), (256, torch.float32, 4096, False, "sgmv_kernel"),
    (256, torch.bfloat16, 4096, True, "sgmv_kernel"),
    (64, torch.bfloat16, 4096, False, "bgmv_shrink_kernel"), (17, torch.float32, 4096, False, "bgmv_shrink_kernel"),
    (64, torch.bfloat16, 4100, False, "sgmv_kernel"), (64, torch.bfloat16, 4096, True, "sgmv_kernel")], ids=str)
def test_cuda_sgmv_shrink_takes_the_tensor_core_kernel_where_it_can(m, dtype, k, strided, kernel, cuda_device):
    """Which grouped shrink runs. 256 tokens on 4 slots (more than 64, and more than 4 per slot): the token-tile
    kernels, on tensor cores for x and lora_a of one 16-bit dtype in rows of whole 16-byte loads, CUDA-core for fp32,
    K not a multiple of 8, or x strided along K. 64 or 17 tokens: the decode kernel (one token per block) for rows of
    whole 16-byte loads of any dtype but float64, else the CUDA-core token-tile one. The other tests check the
    numbers; this one that they checked the kernel meant."""
    num_slots, max_rank = 4, 16
    x = randn(m, 2 * k if strided else k, dtype=dtype, device=cuda_device)[:, ::2 if strided else 1]
    ranks = torch.full((num_slots,), max_rank, dtype=torch.int32, device=cuda_device)
    lora_a = randn(num_slots, max_rank, k, dtype=dtype, device=cuda_device, scale=k ** -0.5)
    batch = LoRABatch.from_adapter_ids(_adapter_ids("uniform", m, num_slots, cuda_device), num_slots, validate=True)
    scalings = torch.ones(num_slots, device=cuda_device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.sgmv_shrink(x, lora_a, batch.sorted_token_ids, batch.slot_starts, batch.slot_counts, scalings, ranks)
        torch.cuda.synchronize(cuda_device)
    names = [event.name for event in prof.events()]
    assert any(re.search(kernel + "[<I]", name) for name in names), names


@pytest.mark.gpu
@pytest.mark.parametrize("m,b_dtype,out_dtype,kernel", [
    (256, torch.bfloat16, torch.bfloat16, "sgmv_expand_mma_kernel"),
    (256, torch.float16, torch.float32, "sgmv_expand_mma_kernel"),
    (256, torch.float32, torch.float32, "sgmv_kernel"), (256, torch.bfloat16, torch.float64, "sgmv_kernel"),
    (64, torch.bfloat16, torch.bfloat16, "bgmv_expand_kernel"), (16, torch.float32, torch.float32,
                                                                 "bgmv_expand_kernel"),
    (64, torch.bfloat16, torch.float64, "sgmv_kernel")], ids=str)
def test_cuda_sgmv_expand_takes_the_tensor_core_kernel_where_it_can(m, b_dtype, out_dtype, kernel, cuda_device):
    """Which grouped expand runs. 256 tokens on 4 slots: the tensor-core one (tf32 MMAs) for a 16-bit lora_b into a
    16-bit or float32 out, the CUDA-core one for an fp32 lora_b or a float64 out (float64 accumulation). 64 or 16
    tokens: the decode kernel, but for a float64 out."""
    n, num_slots, max_rank = 256, 4, 16
    ranks = torch.full((num_slots,), max_rank, dtype=torch.int32, device=cuda_device)
    lora_b = randn(num_slots, n, max_rank, dtype=b_dtype, device=cuda_device)
    batch = LoRABatch.from_adapter_ids(_adapter_ids("uniform", m, num_slots, cuda_device), num_slots, validate=True)
    t, out = randn(m, max_rank, device=cuda_device), randn(m, n, dtype=out_dtype, device=cuda_device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.sgmv_expand(t, lora_b, batch.sorted_token_ids, batch.slot_starts, batch.slot_counts, ranks, out, 0)
        torch.cuda.synchronize(cuda_device)
    names = [event.name for event in prof.events()]
    assert any(re.search(kernel + "[<I]", name) for name in names), names


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_decode_kernel_misaligned_and_strided(dtype, cuda_device):
    """W's rows of k + 3 elements (not a multiple of the vector width) take the CUDA-core path; x one element into
    its buffer is copied into an aligned one (tests/cuda_emulation/launchers_lora_linear.cpp checks which kernels
    run); x_lora given; no bias; a column-major lora_b."""
    m, k, n, r = 3, 256, 77, 8
    buf = randn(m * k + 1, dtype=dtype, device=cuda_device)
    x = buf[1:].view(m, k)  # 2 or 4 bytes past a 16-byte boundary
    weight = randn(n, k + 3, dtype=dtype, device=cuda_device, scale=k ** -0.5)[:, :k]  # row stride k + 3
    lora_a = randn(r, k, dtype=dtype, device=cuda_device, scale=k ** -0.5)
    lora_b = randn(r, n, dtype=dtype, device=cuda_device).T
    mask = (torch.rand(m, k, device=cuda_device) > 0.5).to(dtype) * 2.0
    _check_fwd(x, x * mask, weight, lora_a, lora_b, 1.5, None, mask=mask)
    _check_fwd(x.contiguous(), None, weight.contiguous(), lora_a, lora_b, 1.5, None)


@pytest.mark.gpu
def test_cuda_decode_size_transposed_weight_is_not_copied(cuda_device):
    """A transposed W (GPT-2's Conv1D) at decode size goes to the GEMM path: the decode kernel needs unit-stride
    rows, and copying W for it on every call (as before) allocated and moved N·K elements per token."""
    k, n, r = 4096, 4096, 16
    x, weight, lora_a, lora_b, bias = lora_inputs(4, k, n, r, torch.bfloat16, cuda_device)
    weight_t = weight.T.contiguous().T  # [n, k], column-major
    # a first call outside the measurement: cuBLAS allocates its workspace (32 MiB on sm_90) on its first GEMM on a
    # stream, which a process running this test alone would otherwise count here
    ops.lora_fwd(x, None, weight_t, lora_a, lora_b, 2.0, bias)
    torch.cuda.synchronize(cuda_device)
    torch.cuda.reset_peak_memory_stats(cuda_device)
    before = torch.cuda.memory_allocated(cuda_device)
    _check_fwd(x, None, weight_t, lora_a, lora_b, 2.0, bias)
    extra = torch.cuda.max_memory_allocated(cuda_device) - before
    assert extra < weight.numel() * weight.element_size() // 4, f"{extra} bytes allocated: W was copied"


@pytest.mark.gpu
def test_cuda_out_of_memory_inside_the_extension_raises(cuda_device):
    """An error thrown through the nvcc-compiled launchers (here the caching allocator's out-of-memory inside
    lora_fwd's GEMM path) reaches Python as torch.OutOfMemoryError and the process lives on. Bad input once crashed
    the process on an H100; the checks moved out of the .cu files, but allocation and launch errors still pass
    through them. In a subprocess: its memory cap must not reach the other tests."""
    import os
    import pathlib
    import subprocess
    import sys
    code = f"""
import torch, lora_kernels
dev = torch.device({str(cuda_device)!r})
if dev.index is None:  # set_per_process_memory_fraction needs the index (the H200 run: "got: cuda")
    dev = torch.device("cuda", torch.cuda.current_device())
x = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
a = torch.randn(16, 4096, device=dev, dtype=torch.bfloat16)
b = torch.randn(4096, 16, device=dev, dtype=torch.bfloat16)
torch.cuda.set_per_process_memory_fraction(torch.cuda.memory_allocated(dev) / torch.cuda.get_device_properties(dev).total_memory + 1e-4, dev)
try:
    torch.ops.lora_kernels.lora_fwd(x, None, x, a, b, 1.0, None)
except torch.OutOfMemoryError:
    print("raised OutOfMemoryError")
"""
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0 and "raised OutOfMemoryError" in proc.stdout, (proc.returncode, proc.stdout,
                                                                                proc.stderr[-2000:])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [17, 64, 300])
def test_cuda_gemm_path(dtype, m, cuda_device):
    x, weight, lora_a, lora_b, bias = lora_inputs(m, 4096, 256, 16, dtype, cuda_device)
    _check_fwd(x, None, weight, lora_a, lora_b, 2.0, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,r", [(1, 4096, 16), (16, 4099, 8), (4096, 1024, 16), (1000, 333, 64), (77, 5000, 1),
                                   (300, 136, 20), (2048, 4096, 32), (8192, 512, 16)])
def test_cuda_bwd_dy_kernel(dtype, m, n, r, cuda_device):
    """fp16/bf16 with N a multiple of 8 and r <= 32 run the tensor-core kernel (partial strips and pieces at
    300 x 136, two rank tiles at r = 20 and 32, many row blocks at M = 8192), the others the CUDA-core one."""
    dy = randn(m, n, dtype=dtype, device=cuda_device)
    s = randn(m, r, device=cuda_device)
    lora_b = randn(n, r, dtype=dtype, device=cuda_device, scale=r ** -0.5)
    first = _check_bwd(dy, s, lora_b, 2.0)
    second = ops.lora_bwd_dy(dy, s, lora_b, 2.0)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("r", [1, 16])
def test_cuda_bwd_dy_kernel_takes_a_misaligned_transposed_lora_b(r, cuda_device):
    """lora_b as the .t() of a [r, N] view one element into its buffer: its transpose is contiguous already, so
    the launcher's contiguous() kept the 2-byte offset, which the tensor-core kernel's 16-byte loads cannot take."""
    m, n = 64, 4096
    dy = randn(m, n, dtype=torch.bfloat16, device=cuda_device)
    s = randn(m, r, device=cuda_device)
    buffer = randn(r * n + 1, dtype=torch.bfloat16, device=cuda_device, scale=r ** -0.5)
    lora_b = buffer[1:].view(r, n).t()
    assert lora_b.t().is_contiguous() and lora_b.data_ptr() % 16 != 0
    _check_bwd(dy, s, lora_b, 2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,n,r,transposed,kernel", [
    (torch.bfloat16, 4096, 16, False, "lora_bwd_dy_mma_kernel"), (torch.float16, 136, 32, False,
                                                                  "lora_bwd_dy_mma_kernel"),
    (torch.bfloat16, 4099, 16, False, "lora_bwd_dy_kernel"), (torch.float32, 4096, 16, False, "lora_bwd_dy_kernel"),
    (torch.bfloat16, 4096, 33, False, "lora_bwd_dy_kernel"), (torch.bfloat16, 4096, 16, True, "lora_bwd_dy_kernel")],
    ids=str)
def test_cuda_bwd_dy_takes_the_tensor_core_kernel_where_it_can(dtype, n, r, transposed, kernel, cuda_device):
    """Which lora_bwd_dy kernel runs: the tensor-core one for fp16/bf16 dy in rows of whole 16-byte loads (N a
    multiple of 8, unit column stride) and r <= 32, the CUDA-core one otherwise. The other tests check the numbers;
    this one that they checked the kernel meant."""
    m = 64
    dy = randn(n, m, dtype=dtype, device=cuda_device).T if transposed else randn(m, n, dtype=dtype, device=cuda_device)
    s = randn(m, r, device=cuda_device)
    lora_b = randn(n, r, dtype=dtype, device=cuda_device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.lora_bwd_dy(dy, s, lora_b, 2.0)
        torch.cuda.synchronize(cuda_device)
    names = [event.name for event in prof.events()]
    assert any(re.search(kernel + "[<I]", name) for name in names), names


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)  # the tensor-core and CUDA-core kernels
def test_cuda_bwd_dy_replays_in_a_cuda_graph(dtype, cuda_device):
    """lora_bwd_dy captured in a CUDA graph (the bench's "CUDA backward" rows time it so), replayed on new values of
    dy: the results of eager calls, bit for bit (fixed-order partial sums)."""
    m, n, r = 256, 4096, 16
    dy = randn(m, n, dtype=dtype, device=cuda_device)
    s = randn(m, r, device=cuda_device)
    lora_b = randn(n, r, dtype=dtype, device=cuda_device, scale=r ** -0.5)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.lora_bwd_dy(dy, s, lora_b, 2.0)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        d_lora_b, ds = ops.lora_bwd_dy(dy, s, lora_b, 2.0)
    for _ in range(2):
        dy.copy_(randn(m, n, dtype=dtype, device=cuda_device))
        graph.replay()
        eager_d_lora_b, eager_ds = _check_bwd(dy, s, lora_b, 2.0)
        assert torch.equal(d_lora_b, eager_d_lora_b) and torch.equal(ds, eager_ds)


@pytest.mark.gpu
def test_cuda_matches_cpu_extension(cuda_device):
    """Larger grouped shapes: the CUDA kernels agree with the CPU implementation."""
    m, k, n, max_rank, num_slots = 700, 1000, 300, 64, 16
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(-1, num_slots, (m,), generator=g).to(torch.int32)
    ranks = torch.randint(0, max_rank + 1, (num_slots,), generator=g).to(torch.int32)
    scalings = torch.rand(num_slots, generator=g) + 0.5
    x = randn(m, k, dtype=torch.bfloat16)
    lora_a = randn(num_slots, max_rank, k, dtype=torch.bfloat16, scale=k ** -0.5)
    lora_b = randn(num_slots, n, max_rank, dtype=torch.bfloat16, scale=max_rank ** -0.5)
    out = randn(m, n, dtype=torch.bfloat16)
    results = {}
    for dev in (torch.device("cpu"), cuda_device):
        batch = LoRABatch.from_adapter_ids(ids.to(dev), num_slots, validate=True)
        meta = (batch.sorted_token_ids, batch.slot_starts, batch.slot_counts)
        shrunk = ops.sgmv_shrink(x.to(dev), lora_a.to(dev), *meta, scalings.to(dev), ranks.to(dev))
        # A copy on every device: out.to("cpu") returns out itself, so the CPU run's in-place add would otherwise
        # leak into the input of the CUDA run (which then added the LoRA delta twice).
        y = out.to(dev, copy=True)
        ops.sgmv_expand(shrunk, lora_b.to(dev), *meta, ranks.to(dev), y, 0)
        results[dev.type] = (shrunk.cpu(), y.cpu())
    assert_close(results["cuda"][0], results["cpu"][0], torch.float32, "shrink cuda vs cpu")
    assert_close(results["cuda"][1], results["cpu"][1], torch.bfloat16, "expand cuda vs cpu")


def _check_split_shrink(m, num_slots, k, max_rank, dtype, device):
    """sgmv_shrink with integer-valued x and A, and power-of-two scalings: every product, partial and sum is exact
    (below 2**24), so the result equals the float64 reference bit for bit whatever the split, and a K position that no
    split covers, or two do, changes it. Heterogeneous ranks with NaN past each (slot 0 one below the max), a slot of
    rank 0, tokens of -1 (token 0 on an adapter), and with 16 slots at m = 1 and 16, slots without tokens."""
    ids = ((torch.arange(m) * 7 + 3) % (num_slots + 1) - 1).to(device=device, dtype=torch.int32)
    ranks = torch.tensor([max_rank - 1, 1, max_rank // 2, 3, 0, max_rank] * 50, dtype=torch.int32)[:num_slots]
    ranks = ranks.to(device)
    scalings = (2.0 ** (torch.arange(num_slots) % 5 - 2)).to(device)
    x = _integers(m, k, bound=8, dtype=dtype, device=device)
    lora_a = _integers(num_slots, max_rank, k, bound=8, dtype=dtype, device=device)
    for slot, rank in enumerate(ranks.tolist()):
        lora_a[slot, rank:] = float("nan")
    batch = LoRABatch.from_adapter_ids(ids, num_slots, validate=True)
    out = ops.sgmv_shrink(x, lora_a, batch.sorted_token_ids, batch.slot_starts, batch.slot_counts, scalings, ranks)
    expected = reference.lora_shrink(x.cpu(), lora_a.cpu(), ids.cpu(), scalings.cpu(), ranks.cpu()).float()
    _assert_equal(out.cpu(), expected, f"sgmv_shrink m={m} slots={num_slots} K={k} R={max_rank} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("max_rank", [16, 64])
@pytest.mark.parametrize("k", [20, 1000, 4096, 4100])
@pytest.mark.parametrize("num_slots", [1, 16, 300])
@pytest.mark.parametrize("m", [1, 16, 64, 200])
def test_cuda_sgmv_shrink_split_k(m, num_slots, k, max_rank, cuda_device):
    """Few tokens: the CUDA shrink splits K into partials summed in a fixed order. K = 1000 and 4096 (rows of whole
    16-byte loads) take the decode kernel at up to 64 tokens, and at 200 on 300 slots (more slots than the 256
    threads of a decode block scan at once): a split is 256 to 1024 of K (K = 1000 at up to 64 tokens: 4 splits of
    256, the last 232). The odd K, and 200 tokens on 1 or 16 slots, take the token-tile kernels (on an H200's 132
    SMs, K = 4100: 26 splits for 1 or 16 tokens on one adapter, 13 for 64 tokens on 16 slots at R = 16; K = 20 is
    one tile, no split; the odd K leave a partial last tile); there R = 64 takes two column tiles, and slot 0's rank
    63 ends the second one a column early."""
    _check_split_shrink(m, num_slots, k, max_rank, torch.bfloat16, cuda_device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_cuda_sgmv_shrink_split_k_dtypes(dtype, cuda_device):
    """Every input dtype through the split path; float64 accumulates (and keeps its partials) in float64."""
    _check_split_shrink(16, 16, 4100, 64, dtype, cuda_device)


@pytest.mark.gpu
def test_cuda_sgmv_shrink_split_k_is_deterministic(cuda_device):
    """Repeats at split shapes are bit-identical: no atomics, the partials are summed in a fixed order. Random
    (non-integer) values, so a sum whose order varied would differ in its last bits."""
    k, max_rank = 4096, 16
    for m, num_slots in ((16, 1), (64, 16), (200, 4)):  # decode kernel, then the tensor-core token-tile one
        ids = _adapter_ids("mixed_base", m, num_slots, cuda_device)
        ranks = torch.full((num_slots,), max_rank, dtype=torch.int32, device=cuda_device)
        scalings = torch.linspace(0.5, 2.0, num_slots, device=cuda_device)
        x = randn(m, k, dtype=torch.bfloat16, device=cuda_device)
        lora_a = randn(num_slots, max_rank, k, dtype=torch.bfloat16, device=cuda_device, scale=k ** -0.5)
        batch = LoRABatch.from_adapter_ids(ids, num_slots, validate=True)
        args = (x, lora_a, batch.sorted_token_ids, batch.slot_starts, batch.slot_counts, scalings, ranks)
        first = ops.sgmv_shrink(*args)
        for _ in range(3):
            assert torch.equal(ops.sgmv_shrink(*args), first), f"m={m} slots={num_slots}: repeats differ"


@pytest.mark.gpu
@pytest.mark.parametrize("extra_k, kernel", [(0, "bgmv_shrink_kernel"), (512, "sgmv_kernel")])
def test_cuda_grouped_decode_shrink_leaves_more_splits_than_the_grid_holds_to_sgmv(extra_k, kernel, cuda_device):
    """The decode shrink's K-splits are its grid's y dimension, at most 65535, and a split is at least 512 float32
    elements of K: K = 65535 · 512 still fits, one split more would not (CUDA refuses the launch), so the sgmv
    kernel, whose splits are the x dimension, takes it. One token, one slot, rank 1 (x and lora_a 134 MB each);
    values of ±1, whose partial sums are exact in float32."""
    k = 65535 * 512 + extra_k
    x = torch.randint(0, 2, (1, k), device=cuda_device).float() * 2 - 1
    lora_a = (torch.randint(0, 2, (1, 1, k), device=cuda_device).float() * 2 - 1)
    batch = LoRABatch.from_adapter_ids(torch.zeros(1, dtype=torch.int32, device=cuda_device), 1, validate=True)
    ones = torch.ones(1, device=cuda_device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = ops.sgmv_shrink(x, lora_a, batch.sorted_token_ids, batch.slot_starts, batch.slot_counts, ones,
                              torch.ones(1, dtype=torch.int32, device=cuda_device))
        torch.cuda.synchronize(cuda_device)
    names = [event.name for event in prof.events()]
    assert any(re.search(kernel + "[<I]", name) for name in names), names
    assert out.item() == (x.double() * lora_a[0].double()).sum().item()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [64, 200])
def test_cuda_sgmv_graph_capture(m, cuda_device):
    """No host sync: metadata build, shrink and expand capture into a CUDA graph and replay with new ids (64
    tokens: the decode kernels; 200: the token-tile ones)."""
    k, n, max_rank = 256, 128, 16
    ranks = _hetero_ranks(max_rank, cuda_device)
    lora_a, lora_b = _stacked_lora(NUM_SLOTS, max_rank, k, n, torch.bfloat16, cuda_device, ranks)
    scalings = torch.linspace(0.5, 2.0, NUM_SLOTS, device=cuda_device)
    x = randn(m, k, dtype=torch.bfloat16, device=cuda_device)
    ids = _adapter_ids("uniform", m, NUM_SLOTS, cuda_device)
    y = torch.zeros(m, n, dtype=torch.bfloat16, device=cuda_device)

    def step():
        batch = LoRABatch.from_adapter_ids(ids, NUM_SLOTS, validate=False)
        meta = (batch.sorted_token_ids, batch.slot_starts, batch.slot_counts)
        y.zero_()
        ops.sgmv_expand(ops.sgmv_shrink(x, lora_a, *meta, scalings, ranks), lora_b, *meta, ranks, y, 0)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    ids.copy_(_adapter_ids("mixed_base", m, NUM_SLOTS, cuda_device))
    graph.replay()
    torch.cuda.synchronize()
    ref = reference.add_lora(torch.zeros(m, n), x.cpu(), [lora_a.cpu()], [lora_b.cpu()], ids.cpu(), scalings.cpu(),
                             ranks.cpu(), [n])
    assert_close(y, ref, torch.bfloat16, "graph replay", scale=2.0)


def test_cpu_sgmv_ops_do_not_copy_a_transposed_stack():
    """multi_lora_linear's backward passes the stacks transposed (lora_b.transpose(1, 2) to the shrink,
    lora_a.transpose(1, 2) to the expand): column stride R or K, not 1. The CPU ops copied the whole [L, ., .] stack
    with .contiguous() on every call, all L slots whether any token used them or not (3.0 ms against 0.04 ms for the
    shrink at M = 8, L = 64, N = 2048, R = 16), which made the cpu backend's multi-adapter training step slower than
    the torch fallback's there. The direct loop gathers a slot's strided rows itself; results as before."""
    from torch.profiler import ProfilerActivity, profile
    num_slots, max_rank, k, n = 16, 4, 64, 40
    ids = torch.tensor([0, 3, 3, -1, 5, 0])
    ranks = torch.tensor([4, 1, 2, 3, 4, 2, 4, 4, 1, 1, 1, 1, 2, 2, 2, 2], dtype=torch.int32)
    lora_a = randn(num_slots, k, max_rank).transpose(1, 2)  # [L, R, K], column stride R
    lora_b = randn(num_slots, max_rank, n).transpose(1, 2)  # [L, N, R], column stride N
    for slot in range(num_slots):  # padding past each rank is never read
        lora_a[slot, ranks[slot]:] = float("nan")
        lora_b[slot, :, ranks[slot]:] = float("nan")
    x, scalings = randn(ids.numel(), k), torch.rand(num_slots) + 0.5
    batch = LoRABatch.from_adapter_ids(ids, num_slots)
    meta = (batch.sorted_token_ids, batch.slot_starts, batch.slot_counts)
    y = randn(ids.numel(), n)
    out = y.clone()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        shrunk = ops.sgmv_shrink(x, lora_a, *meta, scalings, ranks)
        ops.sgmv_expand(shrunk, lora_b, *meta, ranks, out, 0)
    stacks = {(num_slots, max_rank, k), (num_slots, n, max_rank)}
    copies = [event.name for event in prof.events()
              if event.name in ("aten::contiguous", "aten::clone", "aten::copy_")
              and any(tuple(shape) in stacks for shape in event.input_shapes)]
    assert not copies, f"the whole stack was copied: {copies}"
    ref_shrunk = reference.lora_shrink(x, lora_a, ids, scalings, ranks)
    assert_close(shrunk, ref_shrunk, torch.float32, "shrink")
    ref = reference.lora_expand(shrunk, lora_b, ids, y, 0, ranks)
    assert torch.isfinite(out).all()
    assert_close(out.double() - y.double(), ref - y.double(), torch.float32, "expand delta", scale=4.0)


def test_the_python_decode_bounds_restate_the_cpp_ones():
    """Python restates the C++ ops' decode bounds: functional.CPU_DECODE_MAX_M is csrc/cpu/lora_linear.cpp's
    kDecodeMaxM (multi_lora_linear's forward rounds as lora_fwd_cpu does only with the same bound), and
    bench.CUDA_DECODE_MAX_M csrc/cuda/lora_linear.cu's (the bench times the decode kernel up to it), which that file
    says is the Triton forward's DECODE_MAX_M. A changed value on one side must change the other."""
    from lora_kernels import bench, functional
    from lora_kernels.triton import lora_linear as triton_lora_linear

    def bound(name):
        source = (pathlib.Path(__file__).resolve().parents[1] / "csrc" / name).read_text()
        return [int(value) for value in re.findall(r"constexpr (?:int|int64_t) kDecodeMaxM = (\d+);", source)]

    assert bound("cpu/lora_linear.cpp") == [functional.CPU_DECODE_MAX_M]
    assert bound("cuda/lora_linear.cu") == [bench.CUDA_DECODE_MAX_M] == [triton_lora_linear.DECODE_MAX_M]
