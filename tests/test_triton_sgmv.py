"""Grouped multi-adapter Triton kernels (lora_kernels/triton/sgmv.py) against the float64 reference.

On CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay tiny; the
same tests run on CUDA through the device fixture.
"""

import math
import re

import pytest
import torch

from conftest import HAS_CUDA, assert_close, randn
import lora_kernels.triton
from lora_kernels import ops, reference
from lora_kernels.batch import LoRABatch
from lora_kernels.triton import HAS_TRITON, INTERPRET

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")

if HAS_TRITON:
    from lora_kernels.triton import sgmv


@pytest.fixture
def device(device):
    """conftest's device, less CPU on a CUDA machine: there the interpreter is off and Triton needs CUDA tensors."""
    if device.type == "cpu" and not INTERPRET:
        pytest.skip("CPU tensors run Triton kernels only under TRITON_INTERPRET=1")
    return device

DISTRIBUTIONS = ["distinct", "uniform", "zipf", "identical", "skewed", "empty_slots", "all_neg", "mixed_neg"]


def make_ids(dist, num_tokens, num_slots, device="cpu"):
    """adapter_ids [M] int32 in [-1, L) drawn from a named segment distribution."""
    M, L = num_tokens, num_slots
    if dist == "distinct":  # every token its own slot as far as L allows, in shuffled order
        ids = torch.randperm(max(M, L))[:M] % L
    elif dist == "uniform":
        ids = torch.randint(0, L, (M,))
    elif dist == "zipf":
        weights = torch.tensor([1.0 / (i + 1) ** 1.5 for i in range(L)])
        ids = torch.multinomial(weights, M, replacement=True)
    elif dist == "identical":
        ids = torch.full((M,), int(torch.randint(0, L, ())))
    elif dist == "skewed":  # one slot takes ~90% of the tokens
        ids = torch.where(torch.rand(M) < 0.9, torch.full((M,), L - 1), torch.randint(0, L, (M,)))
    elif dist == "empty_slots":  # only even slots carry tokens
        ids = 2 * torch.randint(0, (L + 1) // 2, (M,))
    elif dist == "all_neg":
        ids = torch.full((M,), -1)
    elif dist == "mixed_neg":
        ids = torch.randint(-1, L, (M,))
    else:
        raise ValueError(dist)
    return ids.to(torch.int32).to(device)


def make_weights(num_slots, ranks, K, widths, dtype, device, num_a=None):
    """lora_a [L, R, K] (or num_a of them) and one lora_b [L, n, R] per width, NaN past each slot's rank (must never
    be read), with R = max(ranks); plus ranks [L] int32 and scalings [L] fp32."""
    L, R = num_slots, max(ranks)
    ranks_t = torch.tensor(ranks, dtype=torch.int32)

    def poison(w, rank_dim):
        for i, r in enumerate(ranks):
            w[i].narrow(rank_dim - 1, r, R - r).fill_(float("nan"))
        return w.to(device)

    num_a = len(widths) if num_a is None else num_a
    a_list = [poison(randn(L, R, K, dtype=dtype, scale=1 / math.sqrt(K)), 1) for _ in range(num_a)]
    b_list = [poison(randn(L, n, R, dtype=dtype), 2) for n in widths]
    scalings = (0.5 + torch.rand(L)).to(device)
    return a_list, b_list, ranks_t.to(device), scalings


def nan_rows_past_rank(t, ids, ranks):
    """t with NaN wherever expand must not read it: past each token's rank, and whole rows of -1 tokens."""
    t = t.clone()
    for tok, slot in enumerate(ids.tolist()):
        t[tok, (int(ranks[slot]) if slot >= 0 else 0):] = float("nan")
    return t


def cpu(*tensors):
    return [t.cpu() for t in tensors]


# ---------------------------------------------------------------------------------------------------------------
# shrink and expand


@pytest.mark.parametrize("path", ["prefill", "decode"])
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_segments(device, dist, path):
    M, K, N, L, ranks = 37, 67, 45, 5, [8, 1, 16, 5, 16]
    ids = make_ids(dist, M, L, device)
    batch = LoRABatch.from_adapter_ids(ids, L)
    (A,), (B,), ranks_t, scalings = make_weights(L, ranks, K, [N], torch.float32, device)
    x = randn(M, K, device=device)
    out = torch.full((M, max(ranks)), float("nan"), device=device)
    sgmv.shrink(x, A, batch, scalings, ranks_t, out=out, path=path)
    assert_close(out, reference.lora_shrink(*cpu(x, A, ids, scalings, ranks_t)), torch.float32, "shrink")

    t = nan_rows_past_rank(randn(M, max(ranks), device=device), ids.cpu(), ranks_t.cpu())
    y = randn(M, N + 9, device=device)
    expected = reference.lora_expand(*cpu(t, B, ids, y), 4, ranks_t.cpu())
    sgmv.expand(t, B, batch, ranks_t, y, 4, path=path)
    assert_close(y, expected, torch.float32, "expand")


@pytest.mark.parametrize("M, dtype", [
    (1, torch.float32), (17, torch.float16), (64, torch.bfloat16),      # decode
    (65, torch.float32), (100, torch.float16), (100, torch.bfloat16),   # prefill
])
def test_sizes_ranks_dtypes(device, M, dtype):
    """Mixed ranks {1, 8, 16, 64, 128} in one batch, odd K and N; the path is chosen by the launcher (decode up to
    64 tokens, prefill above)."""
    K, N, ranks = 67, 123, [1, 8, 16, 64, 128]
    L = len(ranks)
    assert sgmv.choose_path(M, L) == ("decode" if M <= sgmv.DECODE_MAX_TOKENS else "prefill")
    ids = make_ids("mixed_neg", M, L, device)
    batch = LoRABatch.from_adapter_ids(ids, L)
    (A,), (B,), ranks_t, scalings = make_weights(L, ranks, K, [N], dtype, device)
    x = randn(M, K, dtype=dtype, device=device)
    y = randn(M, N, dtype=dtype, device=device)
    expected = reference.add_lora(*cpu(y, x), [A.cpu()], [B.cpu()], ids.cpu(), *cpu(scalings, ranks_t), [N])
    shrunk = sgmv.shrink(x, A, batch, scalings, ranks_t)
    assert shrunk.dtype == torch.float32
    assert_close(shrunk, reference.lora_shrink(*cpu(x, A, ids, scalings, ranks_t)), dtype, "shrink")
    sgmv.expand(shrunk, B, batch, ranks_t, y)
    assert_close(y, expected, dtype, "shrink + expand")


@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_strided_inputs(device, path):
    """Transposed views everywhere (the backward passes B^T as lora_a and A^T as lora_b), and a strided output."""
    M, K, N, L, ranks = 23, 33, 21, 3, [4, 16, 9]
    R = max(ranks)
    ids = make_ids("mixed_neg", M, L, device)
    batch = LoRABatch.from_adapter_ids(ids, L)
    x = randn(K, M, device=device).T
    A = randn(L, K, R, device=device).transpose(1, 2)
    B = randn(L, R, N, device=device).transpose(1, 2)
    _, _, ranks_t, scalings = make_weights(L, ranks, 1, [], torch.float32, device, num_a=0)
    out = torch.full((R, M), float("nan"), device=device).T
    sgmv.shrink(x, A, batch, scalings, ranks_t, out=out, path=path)
    assert_close(out, reference.lora_shrink(*cpu(x, A, ids, scalings, ranks_t)), torch.float32, "shrink")
    y_storage = randn(N + 5, M, device=device)
    y = y_storage.T
    expected = reference.lora_expand(*cpu(out, B, ids, y), 3, ranks_t.cpu())
    sgmv.expand(out, B, batch, ranks_t, y, 3, path=path)
    assert_close(y, expected, torch.float32, "expand")


# ---------------------------------------------------------------------------------------------------------------
# add_lora: output slices


@pytest.mark.parametrize("widths, stacked, M, dtype", [
    ((48,), False, 9, torch.float32),
    ((48, 16, 16), False, 9, torch.bfloat16),           # fused QKV of unequal widths, decode
    ((40, 8, 24), False, 70, torch.float16),            # prefill
    ((24, 24), True, 12, torch.bfloat16),               # gate_up: stacked A and B, one launch each
    ((24, 24), True, 70, torch.float32),
])
def test_add_lora_slices(device, widths, stacked, M, dtype):
    K, L, ranks = 35, 4, [16, 2, 9, 16]
    ids = make_ids("uniform", M, L, device)
    batch = LoRABatch.from_adapter_ids(ids, L)
    a_list, b_list, ranks_t, scalings = make_weights(L, ranks, K, widths, dtype, device)
    x = randn(M, K, dtype=dtype, device=device)
    y = randn(M, sum(widths), dtype=dtype, device=device)
    expected = reference.add_lora(*cpu(y, x), cpu(*a_list), cpu(*b_list), ids.cpu(), *cpu(scalings, ranks_t),
                                  widths)
    lora_a = torch.stack(a_list) if stacked else a_list
    lora_b = torch.stack(b_list) if stacked else b_list
    buffer = torch.full((len(widths), M, max(ranks)), float("nan"), device=device)
    result = ops.add_lora(y, x, lora_a, lora_b, batch, scalings, ranks_t, widths, buffer=buffer, backend="triton")
    assert result is y
    assert_close(y, expected, dtype, "add_lora")


# ---------------------------------------------------------------------------------------------------------------
# determinism, buffers, edge cases


@pytest.mark.parametrize("stacked", [False, True], ids=["listed", "stacked"])
def test_add_lora_with_a_buffer_and_tensor_ranks_allocates_nothing(monkeypatch, stacked):
    """add_lora's docstring: with buffer, scalings and ranks as tensors, the triton path creates no tensor on the
    host side (only views), so a captured CUDA graph allocates nothing; ranks=None makes a ranks tensor per distinct
    R.
    The launchers are stubbed out: what is checked is the Python around them, every ATen op it dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NonViewOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    for name in ("_launch_shrink", "_launch_expand"):
        monkeypatch.setattr(sgmv, name, lambda *args, **kwargs: None)
    M, K, L, R, widths = 6, 32, 3, 16, (16, 8, 8)
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, 2, -1, 0, 1]), L)
    a_list = [randn(L, R, K) for _ in widths]
    b_list = [randn(L, R, R) for _ in widths] if stacked else [randn(L, w, R) for w in widths]
    widths = (R,) * 3 if stacked else widths
    lora_a, lora_b = (torch.stack(a_list), torch.stack(b_list)) if stacked else (a_list, b_list)
    x, y = randn(M, K), torch.zeros(M, sum(widths))
    scalings, buffer = torch.ones(L), torch.empty(len(widths), M, R)
    for ranks, expected in ((torch.full((L,), R, dtype=torch.int32), []), (None, ["aten.full.default"])):
        with NonViewOps() as mode:
            ops.add_lora(y, x, lora_a, lora_b, batch, scalings, ranks, widths, backend="triton", buffer=buffer)
        assert sorted(set(mode.seen)) == expected, mode.seen


@pytest.mark.parametrize("num_tokens", [4, 80], ids=["decode", "prefill"])
def test_deterministic_flag_reaches_every_shrink_launch(device, monkeypatch, num_tokens):
    """deterministic=True of lora_shrink and add_lora (slices listed or stacked) makes every shrink launch take
    one K split (no atomics). Read off the split count, since the interpreter's atomics run in a fixed order and
    repeats would be bit-identical anyway. On a GPU K is large enough for the shrink to split (K = 70 splits only
    under the interpreter)."""
    K, L, ranks, widths = 70 if device.type == "cpu" else 4096, 3, [16, 5, 12], [33, 7]
    batch = LoRABatch.from_adapter_ids(make_ids("zipf", num_tokens, L, device), L)
    a_list, b_list, ranks_t, scalings = make_weights(L, ranks, K, widths, torch.float32, device)
    x = randn(num_tokens, K, device=device)
    y = randn(num_tokens, sum(widths), device=device)
    splits, original = [], sgmv._split_k

    def recording(*args, **kwargs):
        splits.append(original(*args, **kwargs))
        return splits[-1]

    monkeypatch.setattr(sgmv, "_split_k", recording)
    ops.lora_shrink(x, a_list[0], batch, scalings, ranks_t, backend="triton")
    assert max(splits) > 1, "without the flag the shrink splits K (else this test could not fail)"
    calls = {
        "lora_shrink": lambda: ops.lora_shrink(x, a_list[0], batch, scalings, ranks_t, backend="triton",
                                               deterministic=True),
        "add_lora": lambda: ops.add_lora(y.clone(), x, a_list, b_list, batch, scalings, ranks_t, widths,
                                         backend="triton", deterministic=True),
        "add_lora stacked": lambda: ops.add_lora(y.clone(), x, torch.stack(a_list), b_list, batch, scalings, ranks_t,
                                                 widths, backend="triton", deterministic=True),
    }
    for name, call in calls.items():
        splits.clear()
        call()
        assert splits and set(splits) == {1}, (name, splits)


@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_deterministic_repeats_bit_identical(device, path):
    M, K, N, L, ranks = 24, 70, 33, 3, [16, 5, 12]
    ids = make_ids("zipf", M, L, device)
    batch = LoRABatch.from_adapter_ids(ids, L)
    a_list, b_list, ranks_t, scalings = make_weights(L, ranks, K, [N, 7], torch.bfloat16, device)
    x = randn(M, K, dtype=torch.bfloat16, device=device)
    y0 = randn(M, N + 7, dtype=torch.bfloat16, device=device)
    results = []
    for _ in range(2):
        y = y0.clone()
        ops.add_lora(y, x, a_list, b_list, batch, scalings, ranks_t, [N, 7], deterministic=True, backend="triton")
        results.append(y)
    assert torch.equal(results[0], results[1])
    outs = [sgmv.shrink(x, a_list[0], batch, scalings, ranks_t, deterministic=True, path=path)
            for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    fast = sgmv.shrink(x, a_list[0], batch, scalings, ranks_t, path=path)  # split-K with atomics
    assert_close(fast, outs[0].double(), torch.float32, "split-K vs deterministic")
    # torch's global switch turns the atomics off too (multi_lora_linear has no deterministic argument)
    assert sgmv._split_k(x.device, 1, K, 16, deterministic=False) > 1
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert sgmv._split_k(x.device, 1, K, 16, deterministic=False) == 1
        globally = sgmv.shrink(x, a_list[0], batch, scalings, ranks_t, path=path)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(globally, outs[0])


@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_out_buffer_reuse(device, path):
    """One out buffer, poisoned, reused for batches with other ids: written in place and fully defined each time.
    deterministic=True too: one K split, so no zero fill before the kernel, which must then write the zeros of -1
    tokens and past each rank itself."""
    M, K, L, ranks = 26, 40, 4, [16, 3, 8, 1]
    (A,), _, ranks_t, scalings = make_weights(L, ranks, K, [], torch.float16, device, num_a=1)
    x = randn(M, K, dtype=torch.float16, device=device)
    out = torch.full((M, 16), float("nan"), device=device)
    ptr = out.data_ptr()
    for deterministic in (False, True):
        for dist in ("skewed", "all_neg", "mixed_neg"):
            ids = make_ids(dist, M, L, device)
            batch = LoRABatch.from_adapter_ids(ids, L)
            result = sgmv.shrink(x, A, batch, scalings, ranks_t, out=out, path=path, deterministic=deterministic)
            assert result is out and out.data_ptr() == ptr
            assert_close(out, reference.lora_shrink(*cpu(x, A, ids, scalings, ranks_t)), torch.float16,
                         f"{dist}, deterministic={deterministic}")
            out.fill_(float("nan"))


def test_empty_and_zero_rank(device):
    L = 2
    (A,), (B,), ranks_t, scalings = make_weights(L, [4, 4], 8, [6], torch.float32, device)
    empty = LoRABatch.from_adapter_ids(torch.zeros(0, dtype=torch.int32, device=device), L)
    assert sgmv.shrink(torch.zeros(0, 8, device=device), A, empty, scalings, ranks_t).shape == (0, 4)
    # K = 0: an empty sum, so the shrink is zeros, written over a poisoned out on both paths
    batch_k0 = LoRABatch.from_adapter_ids(torch.tensor([0, -1, 1], dtype=torch.int32, device=device), L)
    for path in ("prefill", "decode"):
        out = torch.full((3, 4), float("nan"), device=device)
        sgmv.shrink(torch.zeros(3, 0, device=device), A[:, :, :0], batch_k0, scalings, ranks_t, out=out, path=path)
        assert torch.equal(out, torch.zeros(3, 4, device=device)), path
    # a slot of rank 0 contributes nothing and reads nothing
    ids = torch.tensor([0, 1, 1, 0], dtype=torch.int32, device=device)
    batch = LoRABatch.from_adapter_ids(ids, L)
    ranks0 = torch.tensor([0, 4], dtype=torch.int32, device=device)
    A[0].fill_(float("nan"))
    B[0].fill_(float("nan"))
    x = randn(4, 8, device=device)
    for path in ("prefill", "decode"):
        out = sgmv.shrink(x, A, batch, scalings, ranks0, path=path)
        assert_close(out, reference.lora_shrink(*cpu(x, A, ids, scalings, ranks0)), torch.float32, path)
        y = randn(4, 6, device=device)
        expected = reference.lora_expand(*cpu(out, B, ids, y), 0, ranks0.cpu())
        sgmv.expand(out, B, batch, ranks0, y, path=path)
        assert_close(y, expected, torch.float32, path)



@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_shrink_of_a_nan_token_is_zero_past_its_rank(device, path):
    """A NaN or Inf in a token's row of x makes its shrink row non-finite up to its slot's rank, and zero past it, as
    the reference's (the decode kernel stored the sums of 0·x there: NaN)."""
    L, R, K = 2, 4, 8
    (A,), _, _, scalings = make_weights(L, [1, R], K, [6], torch.float32, device)
    ranks = torch.tensor([1, 3], dtype=torch.int32, device=device)
    ids = torch.tensor([0, 1, 0, -1], dtype=torch.int32, device=device)
    x = randn(4, K, device=device)
    x[0, 2], x[1, 5] = float("nan"), float("inf")
    out = sgmv.shrink(x, A, LoRABatch.from_adapter_ids(ids, L), scalings, ranks, path=path)
    assert not out[0, :1].isfinite().any() and not out[1, :3].isfinite().any()
    assert torch.equal(out[0, 1:], torch.zeros(R - 1, device=device))
    assert torch.equal(out[1, 3:], torch.zeros(R - 3, device=device))
    assert_close(out[2:], reference.lora_shrink(*cpu(x, A, ids, scalings, ranks))[2:], torch.float32)


@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_unchecked_ranks_are_clamped_to_r(device, path):
    """int32 ranks on the device are not range-checked (lora_kernels.ops checks host values only): each kernel
    clamps a slot's rank to [0, R], so a rank past R neither reads the next slot's rows of A or B (or past the
    last slot's) nor writes past out's R columns, and a negative rank is rank 0."""
    M, K, N, L, R = 20, 40, 24, 3, 10  # R not a multiple of the 16-wide rank tiles
    ids = make_ids("uniform", M, L, device)
    batch = LoRABatch.from_adapter_ids(ids, L)
    (A,), (B,), _, scalings = make_weights(L, [R] * L, K, [N], torch.float32, device)
    wild = torch.tensor([R + 9, -4, 1000], dtype=torch.int32, device=device)
    clamped = torch.tensor([R, 0, R], dtype=torch.int32)
    x = randn(M, K, device=device)
    out = sgmv.shrink(x, A, batch, scalings, wild, path=path)
    assert_close(out, reference.lora_shrink(*cpu(x, A, ids, scalings), clamped), torch.float32, "shrink")
    y = randn(M, N, device=device)
    expected = reference.lora_expand(*cpu(out, B, ids, y), 0, clamped)
    sgmv.expand(out, B, batch, wild, y, path=path)
    assert_close(y, expected, torch.float32, "expand")

# ---------------------------------------------------------------------------------------------------------------
# per-slot gradient sums (the grouped backward's dA and dB)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("P, Q, dtype", [(4, 37, torch.float32), (20, 33, torch.bfloat16), (16, 64, torch.float16)])
def test_segment_outer_sum(device, dist, P, Q, dtype):
    M, L = 45, 5
    ids = make_ids(dist, M, L, device)
    batch = LoRABatch.from_adapter_ids(ids, L)
    left = randn(M, P, device=device)
    right = randn(M, Q, dtype=dtype, device=device)
    out = sgmv.segment_outer_sum(left, right, batch)
    assert out.shape == (L, P, Q) and out.dtype == torch.float32
    # the kernel rounds fp32 `left` to right's dtype for the tensor cores, as the torch path does
    rounded = left.to(dtype).double().cpu()
    for slot in range(L):
        rows = (ids.cpu() == slot)
        expected = rounded[rows].T @ right.double().cpu()[rows]
        assert_close(out[slot], expected, dtype, f"slot {slot}")


def test_segment_outer_sum_keeps_nan_in_its_slot(device):
    ids = torch.tensor([0, 1, 1, -1, 2, 0], dtype=torch.int32, device=device)
    batch = LoRABatch.from_adapter_ids(ids, 3)
    left, right = randn(6, 4, device=device), randn(6, 8, device=device)
    right[2, 3] = float("nan")  # a token of slot 1
    left[3, 0] = float("inf")  # a -1 token: counts nowhere
    out = sgmv.segment_outer_sum(left, right, batch).cpu()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
    assert torch.isnan(out[1, :, 3]).all() and torch.isfinite(out[1, :, :3]).all()


def test_segment_outer_op_opcheck(device):
    ids = make_ids("mixed_neg", 11, 3, device)
    batch = LoRABatch.from_adapter_ids(ids, 3)
    torch.library.opcheck(torch.ops.lora_kernels_triton.segment_outer,
                          (randn(11, 4, device=device), randn(11, 9, device=device), batch.sorted_token_ids,
                           batch.slot_counts, batch.slot_starts, torch.empty(3, 4, 9, device=device)))


# ---------------------------------------------------------------------------------------------------------------
# torch.compile, custom ops, compile-gate specs


def test_custom_ops_opcheck(device):
    M, K, N, L, ranks = 9, 16, 12, 2, [4, 2]
    ids = make_ids("mixed_neg", M, L, device)
    batch = LoRABatch.from_adapter_ids(ids, L)
    (A,), (B,), ranks_t, scalings = make_weights(L, ranks, K, [N], torch.float32, device)
    fields = (batch.adapter_ids, batch.sorted_token_ids, batch.slot_counts, batch.slot_starts)
    x = randn(M, K, device=device)
    out = torch.zeros(M, 4, device=device)
    torch.library.opcheck(torch.ops.lora_kernels_triton.sgmv_shrink,
                          (x, [A], *fields, scalings, ranks_t, out, True, "prefill"))
    torch.library.opcheck(torch.ops.lora_kernels_triton.sgmv_expand,
                          (randn(M, 4, device=device), [B], *fields, ranks_t, randn(M, N, device=device), [0],
                           "decode"))


def test_torch_compile_fullgraph(device):
    M, K, L, ranks, widths = 20, 24, 3, [8, 3, 5], (16, 8)
    ids = make_ids("mixed_neg", M, L, device)
    batch = LoRABatch.from_adapter_ids(ids, L)
    a_list, b_list, ranks_t, scalings = make_weights(L, ranks, K, widths, torch.float32, device)
    x = randn(M, K, device=device)
    y = randn(M, sum(widths), device=device)

    def layer(y, x, batch):
        y = y * 2.0
        return ops.add_lora(y, x, a_list, b_list, batch, scalings, ranks_t, widths, backend="triton") + 1.0

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    expected = reference.add_lora(*cpu(y * 2.0, x), cpu(*a_list), cpu(*b_list), ids.cpu(), *cpu(scalings, ranks_t),
                                  widths) + 1.0
    assert_close(compiled(y, x, batch), expected, torch.float32, "compiled add_lora")
    assert_close(layer(y, x, batch), expected, torch.float32, "eager add_lora")


def test_aot_specs_cover_kernels():
    specs = sgmv.aot_specs()
    names = {spec["kernel"].__name__ for spec in specs}
    assert names == {"_sgmv_shrink_kernel", "_bgmv_shrink_kernel", "_sgmv_expand_kernel", "_bgmv_expand_kernel",
                     "_segment_outer_kernel"}
    for spec in specs:
        assert set(spec) - {"tensor_cores"} == {"name", "kernel", "signature", "constexprs", "num_warps",
                                                "num_stages", "divisible_by_16"}
        assert list(spec["signature"]) == list(spec["kernel"].arg_names)
        assert {k for k, v in spec["signature"].items() if v == "constexpr"} == set(spec["constexprs"])
        # Compiled as Triton specialises a contiguous launch: the unit inner strides constexpr 1 (the variant with
        # vectorised loads), the other strides and sizes 16-divisible, the tile and split counts neither, nor the
        # token count (do_not_specialize: it changes every step and only bounds the metadata). The "strided"
        # specs: the general variant, every int plain (and, for the expand kernels, one with an i64 slot stride).
        inner = {k for k in spec["signature"] if k.startswith("stride_") and spec["constexprs"].get(k) == 1}
        if spec["name"].endswith(("[bf16,strided]", "[bf16,i64 slot stride]")):
            assert not inner and spec["divisible_by_16"] == [], spec["name"]
            continue
        assert len(inner) == 3, (spec["name"], inner)
        assert set(spec["divisible_by_16"]) == {k for k, v in spec["signature"].items()
                                                if v == "i32" and k not in ("num_r_tiles", "num_n_tiles", "split_k",
                                                                            "num_tokens")}
    assert {spec["kernel"].__name__ for spec in specs if spec["name"].endswith(",strided]")} == names
    assert {spec["kernel"].__name__ for spec in specs if spec["signature"].get("stride_bl1") == "i64"} == {
        "_sgmv_expand_kernel", "_bgmv_expand_kernel"}
    for dtype in ("fp32", "fp16", "bf16"):
        assert any(spec["signature"]["x_ptr"] == "*" + dtype for spec in specs if "x_ptr" in spec["signature"])


# ---------------------------------------------------------------------------------------------------------------
# CUDA graphs


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_cuda_graph_replay_with_new_adapter_ids(path):
    """Capture shrink + expand once; replay after refilling the same LoRABatch buffers with other ids: a fixed grid
    with on-device early exit covers every segment layout (SGLang's capture-time grid bug)."""
    assert HAS_CUDA
    device = torch.device("cuda")
    M, K, N, L, ranks, dtype = 48, 256, 192, 6, [16, 4, 8, 16, 1, 12], torch.bfloat16
    (A,), (B,), ranks_t, scalings = make_weights(L, ranks, K, [N], dtype, device)
    batch = LoRABatch.from_adapter_ids(make_ids("identical", M, L, device), L)
    x = randn(M, K, dtype=dtype, device=device)
    base = randn(M, N, dtype=dtype, device=device)
    y = torch.empty_like(base)
    shrunk = torch.empty(M, max(ranks), device=device)

    def step():
        y.copy_(base)
        sgmv.shrink(x, A, batch, scalings, ranks_t, out=shrunk, path=path)
        sgmv.expand(shrunk, B, batch, ranks_t, y, path=path)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile the kernels outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for dist in ("zipf", "mixed_neg", "distinct", "all_neg", "skewed"):
        ids = make_ids(dist, M, L, device)
        batch.refill_(ids)
        x.copy_(randn(M, K, dtype=dtype, device=device))
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.add_lora(*cpu(base, x), [A.cpu()], [B.cpu()], ids.cpu(), *cpu(scalings, ranks_t), [N])
        assert_close(y, expected, dtype, f"graph replay ({dist})")


def test_decode_shrink_covers_a_rank_that_is_not_a_whole_number_of_rank_tiles(device):
    """The decode shrink's grid counts rank tiles rounding up: R = 24 (one 16-wide tile and part of another), flat
    and stacked A, every column of an out full of NaN written."""
    ids = torch.tensor([0, 1, -1, 1, 0], dtype=torch.int32, device=device)
    batch = LoRABatch.from_adapter_ids(ids, 2)
    x, lora_a = randn(5, 40, device=device), randn(2, 24, 40, device=device)
    ranks, scalings = torch.tensor([24, 20], dtype=torch.int32, device=device), torch.tensor([1.0, 0.5], device=device)
    expected = reference.lora_shrink(x.cpu(), lora_a.cpu(), ids.cpu(), scalings.cpu(), ranks.cpu())
    for stacked in (False, True):
        weights = torch.stack([lora_a, lora_a.flip(0)]) if stacked else lora_a
        out = torch.full((2, 5, 24) if stacked else (5, 24), float("nan"), device=device)
        sgmv.shrink(x, weights, batch, scalings, ranks, out=out, path="decode")
        assert_close(out[0] if stacked else out, expected, torch.float32, f"stacked={stacked}")


def test_segment_outer_sum_takes_column_major_operands(device):
    """Both operands of segment_outer_sum with a row stride of 1 (transposed views): each slot's sum of outer
    products against float64 per-slot GEMMs."""
    ids = torch.tensor([0, 1, 2, -1, 0, 1, 2] * 3, dtype=torch.int32, device=device)
    batch = LoRABatch.from_adapter_ids(ids, 3)
    left, right = randn(5, 21, device=device).T, randn(19, 21, device=device).T
    assert right.stride() == (1, 21)
    out = sgmv.segment_outer_sum(left, right, batch)
    expected = torch.stack([left[ids == i].double().T @ right[ids == i].double() for i in range(3)])
    assert_close(out, expected, torch.float32, "segment outer sums")


def test_decode_path_bounds_are_inclusive():
    """At most DECODE_MAX_TOKENS tokens, or at most DECODE_MAX_TOKENS_PER_SLOT per slot on average, take the decode
    kernels; one token more, the prefill ones."""
    per_slot = sgmv.DECODE_MAX_TOKENS_PER_SLOT
    assert sgmv.choose_path(sgmv.DECODE_MAX_TOKENS, 1) == "decode"
    assert sgmv.choose_path(sgmv.DECODE_MAX_TOKENS + 1, 1) == "prefill"
    slots = sgmv.DECODE_MAX_TOKENS // per_slot + 4  # past DECODE_MAX_TOKENS tokens at exactly per_slot per slot
    assert sgmv.choose_path(per_slot * slots, slots) == "decode"
    assert sgmv.choose_path(per_slot * slots + 1, slots) == "prefill"


@pytest.mark.parametrize("op,argument", [("sgmv_shrink", "scalings"), ("sgmv_expand", "lora_b")])
def test_the_grouped_triton_ops_refuse_every_input_that_requires_grad(op, argument, device):
    """Called directly (or from an exported program) in grad mode, the ops refuse the weights that require grad too,
    not only the activations: they have no derivative, and the weights would silently get none."""
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, -1], dtype=torch.int32, device=device), 2)
    meta = (batch.adapter_ids, batch.sorted_token_ids, batch.slot_counts, batch.slot_starts)
    ranks = torch.tensor([4, 4], dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match=f"{argument} requires grad"):
        if op == "sgmv_shrink":
            scalings = torch.ones(2, device=device, requires_grad=True)
            torch.ops.lora_kernels_triton.sgmv_shrink(randn(3, 8, device=device), [randn(2, 4, 8, device=device)],
                                                      *meta, scalings, ranks, torch.zeros(3, 4, device=device),
                                                      False, "auto")
        else:
            lora_b = randn(2, 6, 4, device=device).requires_grad_(True)
            torch.ops.lora_kernels_triton.sgmv_expand(randn(3, 4, device=device), [lora_b], *meta, ranks,
                                                      torch.zeros(3, 6, device=device), [0], "auto")


def _grouped_op_arguments(op, device):
    """Keyword arguments of a valid call of lora_kernels_triton::op: 3 tokens over 2 slots, K = 8, R = 4, N = 6."""
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, -1], dtype=torch.int32, device=device), 2)
    meta = dict(sorted_token_ids=batch.sorted_token_ids, slot_counts=batch.slot_counts, slot_starts=batch.slot_starts)
    ranks = torch.tensor([4, 3], dtype=torch.int32, device=device)
    if op == "sgmv_shrink":
        return dict(x=randn(3, 8, device=device), lora_a=[randn(2, 4, 8, device=device)], adapter_ids=batch.adapter_ids,
                    **meta, scalings=torch.ones(2, device=device), ranks=ranks, out=torch.zeros(3, 4, device=device),
                    deterministic=False, path="auto")
    if op == "sgmv_expand":
        return dict(t=randn(3, 4, device=device), lora_b=[randn(2, 6, 4, device=device)], adapter_ids=batch.adapter_ids,
                    **meta, ranks=ranks, out=torch.zeros(3, 6, device=device), first_columns=[0], path="auto")
    return dict(left=randn(3, 4, device=device), right=randn(3, 8, device=device), **meta,
                out=torch.zeros(2, 4, 8, device=device))


def _short_batch(device):
    return LoRABatch.from_adapter_ids(torch.tensor([0, 1], dtype=torch.int32, device=device), 2)


# (op, the change to a valid call's arguments, the error, its message after "lora_kernels_triton::op: ")
_GROUPED_OP_BAD_ARGUMENTS = {
    "shrink: a batch of fewer tokens": ("sgmv_shrink", lambda a, d: a.update(
        sorted_token_ids=_short_batch(d).sorted_token_ids), ValueError,
        "sorted_token_ids expected shape [3] (tokens = x.shape[0]), got [2]"),
    "shrink: adapter ids of fewer tokens": ("sgmv_shrink", lambda a, d: a.update(
        adapter_ids=_short_batch(d).adapter_ids), ValueError,
        "adapter_ids expected shape [3] (tokens = x.shape[0]), got [2]"),
    "shrink: int64 slot counts": ("sgmv_shrink", lambda a, d: a.update(slot_counts=a["slot_counts"].long()),
                                  TypeError, "slot_counts expected dtype torch.int32, got torch.int64"),
    "shrink: strided ranks": ("sgmv_shrink", lambda a, d: a.update(ranks=a["ranks"].repeat_interleave(2)[::2]),
                              ValueError, "ranks expected a contiguous tensor, got strides (2,)"),
    "shrink: scalings of another length": ("sgmv_shrink", lambda a, d: a.update(scalings=a["scalings"][:1]),
                                           ValueError, "scalings expected shape [2] (adapter slots = "
                                                       "lora_a[0].shape[0]), got [1]"),
    "shrink: float64 scalings": ("sgmv_shrink", lambda a, d: a.update(scalings=a["scalings"].double()), TypeError,
                                 "scalings expected dtype torch.float32, got torch.float64"),
    "shrink: float64 x": ("sgmv_shrink", lambda a, d: a.update(x=a["x"].double()), TypeError,
                          "x expected dtype torch.float32 or torch.float16 or torch.bfloat16, got torch.float64"),
    "shrink: lora_a of another K": ("sgmv_shrink", lambda a, d: a.update(lora_a=[randn(2, 4, 7, device=d)]),
                                    ValueError, "lora_a[0] expected shape [*, *, 8], got [2, 4, 7]"),
    "shrink: lora_a of another dtype": ("sgmv_shrink", lambda a, d: a.update(lora_a=[a["lora_a"][0].half()]),
                                        TypeError, "lora_a[0] expected dtype torch.float32, got torch.float16"),
    "shrink: a second slice of another rank": ("sgmv_shrink", lambda a, d: a.update(
        lora_a=[*a["lora_a"], randn(2, 5, 8, device=d)], out=torch.zeros(2, 3, 4, device=d)), ValueError,
        "lora_a[1] expected shape [2, 4, 8], got [2, 5, 8]"),
    "shrink: a second slice of another dtype": ("sgmv_shrink", lambda a, d: a.update(
        lora_a=[*a["lora_a"], randn(2, 4, 8, device=d).half()], out=torch.zeros(2, 3, 4, device=d)), TypeError,
        "lora_a[1] expected dtype torch.float32, got torch.float16"),
    "shrink: a 3-D x": ("sgmv_shrink", lambda a, d: a.update(x=a["x"].unsqueeze(-1)), ValueError,
                        "x expected shape [*, *], got [3, 8, 1]"),
    "shrink: no slices": ("sgmv_shrink", lambda a, d: a.update(lora_a=[]), ValueError,
                          "lora_a expected at least one tensor, got an empty list"),
    "shrink: out of another rank": ("sgmv_shrink", lambda a, d: a.update(out=torch.zeros(3, 5, device=d)),
                                    ValueError, "out expected shape [3, 4], got [3, 5]"),
    "shrink: out of one slice for two": ("sgmv_shrink", lambda a, d: a.update(lora_a=a["lora_a"] * 2), ValueError,
                                         "out expected shape [2, 3, 4], got [3, 4]"),
    "expand: a first column past out's last": ("sgmv_expand", lambda a, d: a.update(first_columns=[1]), ValueError,
                                               "first_columns[0] expected in [0, out.shape[1] - lora_b[0].shape[1]] "
                                               "= [0, 0], got 1"),
    "expand: a negative first column": ("sgmv_expand", lambda a, d: a.update(first_columns=[-1]), ValueError,
                                        "first_columns[0] expected in"),
    "expand: first columns of two slices for one": ("sgmv_expand", lambda a, d: a.update(first_columns=[0, 0]),
                                                    ValueError, "first_columns expected 1 entries (one per lora_b "
                                                                "slice), got 2"),
    "expand: t of another rank": ("sgmv_expand", lambda a, d: a.update(t=randn(3, 5, device=d)), ValueError,
                                  "t expected shape [*, 4], got [3, 5]"),
    "expand: t of one slice for two": ("sgmv_expand", lambda a, d: a.update(
        lora_b=[*a["lora_b"], randn(2, 2, 4, device=d)], first_columns=[0, 0],
        out=torch.zeros(3, 8, device=d)), ValueError, "t expected shape [2, *, 4], got [3, 4]"),
    "expand: a second slice of other slots": ("sgmv_expand", lambda a, d: a.update(
        lora_b=[*a["lora_b"], randn(3, 2, 4, device=d)], t=torch.zeros(2, 3, 4, device=d), first_columns=[0, 0]),
        ValueError, "lora_b[1] expected shape [2, *, 4], got [3, 2, 4]"),
    "expand: out of fewer tokens": ("sgmv_expand", lambda a, d: a.update(out=torch.zeros(2, 6, device=d)),
                                    ValueError, "out expected shape [3, *], got [2, 6]"),
    "expand: a batch of fewer tokens": ("sgmv_expand", lambda a, d: a.update(
        sorted_token_ids=_short_batch(d).sorted_token_ids), ValueError,
        "sorted_token_ids expected shape [3] (tokens = t.shape[-2]), got [2]"),
    "expand: ranks of another length": ("sgmv_expand", lambda a, d: a.update(ranks=a["ranks"][:1]), ValueError,
                                        "ranks expected shape [2] (adapter slots = lora_b[0].shape[0]), got [1]"),
    "expand: a second slice of another dtype": ("sgmv_expand", lambda a, d: a.update(
        lora_b=[*a["lora_b"], randn(2, 2, 4, device=d).bfloat16()], t=torch.zeros(2, 3, 4, device=d),
        first_columns=[0, 0]), TypeError, "lora_b[1] expected dtype torch.float32, got torch.bfloat16"),
    "expand: float64 out": ("sgmv_expand", lambda a, d: a.update(out=a["out"].double()), TypeError,
                            "out expected dtype torch.float32 or torch.float16 or torch.bfloat16, got torch.float64"),
    "expand: float16 t": ("sgmv_expand", lambda a, d: a.update(t=a["t"].half()), TypeError,
                          "t expected dtype torch.float32, got torch.float16"),
    "segment_outer: right of fewer tokens": ("segment_outer", lambda a, d: a.update(right=randn(2, 8, device=d)),
                                             ValueError, "right expected shape [3, *], got [2, 8]"),
    "segment_outer: out of other columns": ("segment_outer", lambda a, d: a.update(out=torch.zeros(2, 4, 9, device=d)),
                                            ValueError, "out expected shape [*, 4, 8], got [2, 4, 9]"),
    "segment_outer: slot counts of more slots": ("segment_outer", lambda a, d: a.update(
        slot_counts=torch.zeros(3, dtype=torch.int32, device=d)), ValueError,
        "slot_counts expected shape [2] (adapter slots = out.shape[0]), got [3]"),
    "segment_outer: a batch of fewer tokens": ("segment_outer", lambda a, d: a.update(
        sorted_token_ids=_short_batch(d).sorted_token_ids), ValueError,
        "sorted_token_ids expected shape [3] (tokens = left.shape[0]), got [2]"),
    "segment_outer: float64 right": ("segment_outer", lambda a, d: a.update(right=a["right"].double()), TypeError,
                                     "right expected dtype torch.float32 or torch.float16 or torch.bfloat16, got "
                                     "torch.float64"),
    "segment_outer: bfloat16 left": ("segment_outer", lambda a, d: a.update(left=a["left"].bfloat16()), TypeError,
                                     "left expected dtype torch.float32, got torch.bfloat16"),
}


@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_the_grouped_triton_ops_take_slices_of_unequal_widths_as_the_launchers_do(path, device):
    """What the checks must let through: three slices (lora_b of unequal widths, t and out of the shrink [S, M, R]),
    each into its own columns of a wider out after a first column of 2, give through the ops what the eager
    launchers give, bit for bit."""
    M, K, L, widths = 7, 16, 3, (8, 4, 6)
    batch = LoRABatch.from_adapter_ids(make_ids("mixed_neg", M, L, device), L)
    a_list, b_list, ranks, scalings = make_weights(L, [4, 2, 3], K, widths, torch.float32, device)
    meta = (batch.adapter_ids, batch.sorted_token_ids, batch.slot_counts, batch.slot_starts)
    x = randn(M, K, device=device)
    columns = [2, 10, 14]
    outputs = []
    for shrink, expand in ((torch.ops.lora_kernels_triton.sgmv_shrink, torch.ops.lora_kernels_triton.sgmv_expand),
                           (sgmv._launch_shrink, sgmv._launch_expand)):
        t = torch.zeros(3, M, 4, device=device)
        shrink(x, a_list, *meta, scalings, ranks, t, True, path)
        out = torch.zeros(M, 22, device=device)
        expand(t, b_list, *meta, ranks, out, columns, path)
        outputs.append((t, out))
    (t_op, out_op), (t_launch, out_launch) = outputs
    assert torch.equal(t_op, t_launch) and torch.equal(out_op, out_launch)
    assert out_op[batch.adapter_ids >= 0, 2:].abs().sum() > 0 and not out_op[:, :2].any()


@pytest.mark.parametrize("op,first_checked", [("sgmv_shrink", "x"), ("sgmv_expand", r"lora_b\[0\]"),
                                              ("segment_outer", "left")])
def test_the_grouped_triton_ops_refuse_cpu_tensors_outside_the_interpreter(op, first_checked, monkeypatch):
    """A CPU tensor's address handed to a GPU kernel is refused by name, as the single-adapter ops refuse it."""
    arguments = _grouped_op_arguments(op, torch.device("cpu"))
    monkeypatch.setattr(lora_kernels.triton, "INTERPRET", False)
    with pytest.raises(ValueError, match=rf"lora_kernels_triton::{op}: {first_checked} is on cpu; the Triton kernels "
                                         "need CUDA tensors"):
        getattr(torch.ops.lora_kernels_triton, op)(**arguments)
    assert not arguments["out"].any()


@pytest.mark.parametrize("case", list(_GROUPED_OP_BAD_ARGUMENTS))
def test_the_grouped_triton_ops_refuse_what_their_kernels_would_index_out_of_bounds(case, device):
    """The custom ops (what compiled graphs and exported programs run, and what a caller of
    torch.ops.lora_kernels_triton reaches) check what their kernels index as plain arrays, naming the argument, the
    expected and the actual: unchecked, a batch of fewer tokens was read past its end and a first column past out's
    written past it. Nothing is written before the error; the valid call runs."""
    op, change, error, message = _GROUPED_OP_BAD_ARGUMENTS[case]
    run = getattr(torch.ops.lora_kernels_triton, op)
    valid = _grouped_op_arguments(op, device)
    run(**valid)
    assert valid["out"].abs().sum() > 0
    arguments = _grouped_op_arguments(op, device)
    change(arguments, device)
    before = arguments["out"].clone()
    with pytest.raises(error, match=re.escape(f"lora_kernels_triton::{op}: {message}")):
        run(**arguments)
    assert torch.equal(arguments["out"], before)


@pytest.mark.parametrize("op", ["sgmv_shrink", "sgmv_expand", "segment_outer"])
def test_the_grouped_triton_ops_refuse_an_out_that_requires_grad(op, device):
    """Called directly in grad mode, a leaf out that requires grad, or a view of one, is refused before it is written
    (helper 188: it was written, where torch's own in-place ops refuse it); so is a graph node that the shrink and
    segment_outer overwrite (its gradient would still flow to what it was computed from). sgmv_expand adds into a
    graph node, as torch's add_ would: its gradient stays right."""
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, -1], dtype=torch.int32, device=device), 2)
    meta = (batch.adapter_ids, batch.sorted_token_ids, batch.slot_counts, batch.slot_starts)
    ranks = torch.tensor([4, 4], dtype=torch.int32, device=device)
    grouped = torch.ops.lora_kernels_triton
    shapes = {"sgmv_shrink": (3, 4), "sgmv_expand": (3, 6), "segment_outer": (2, 4, 8)}
    out = torch.zeros(shapes[op], device=device, requires_grad=True)
    calls = {
        "sgmv_shrink": lambda: grouped.sgmv_shrink(randn(3, 8, device=device), [randn(2, 4, 8, device=device)], *meta,
                                                   torch.ones(2, device=device), ranks, out, False, "auto"),
        "sgmv_expand": lambda: grouped.sgmv_expand(randn(3, 4, device=device), [randn(2, 6, 4, device=device)], *meta,
                                                   ranks, out, [0], "auto"),
        "segment_outer": lambda: grouped.segment_outer(randn(3, 4, device=device), randn(3, 8, device=device),
                                                       *meta[1:], out),
    }
    how = "adds into" if op == "sgmv_expand" else "overwrites"
    with pytest.raises(RuntimeError, match=f"lora_kernels_triton::{op}: out is a leaf tensor that requires grad, "
                                           f"which this op {how} in place"):
        calls[op]()
    leaf = out
    out = leaf[:]  # a view of the leaf, which torch's in-place ops refuse too: it was written
    with pytest.raises(RuntimeError, match=f"lora_kernels_triton::{op}: out is a view of a leaf tensor that requires "
                                           f"grad"):
        calls[op]()
    out = leaf
    assert torch.equal(out.detach(), torch.zeros_like(out))
    with torch.no_grad():  # outside grad mode the op writes it, as torch's in-place ops do
        calls[op]()
    assert out.detach().abs().sum() > 0
    weight = torch.ones((), device=device, requires_grad=True)
    out = weight * torch.ones(shapes[op], device=device)  # a graph node
    if op != "sgmv_expand":
        with pytest.raises(RuntimeError, match=f"{op}: out is a tensor that requires grad, which this op overwrites"):
            calls[op]()
        return
    before = out.detach().clone()
    calls[op]()
    out.sum().backward()  # d(sum(out))/d(weight) = out's element count: the added term is a constant to it
    assert weight.grad == out.numel() and not torch.equal(out.detach(), before)


@pytest.mark.parametrize("call", ["expand", "shrink_out", "add_lora"])
def test_eager_launches_bump_the_version_of_the_output_they_write(call, device):
    """The eager Triton path launches without the dispatcher, which bumps the version of a custom op's mutated
    argument: the launchers bump it themselves, so autograd refuses a backward that saved the output before it was
    overwritten, as it does on the torch, cpu and reference backends (before, w.grad silently took the new values)."""
    from lora_kernels import ops as lk_ops
    ids = make_ids("mixed_neg", 6, 2, device)
    batch = LoRABatch.from_adapter_ids(ids, 2)
    (A,), (B,), ranks, scalings = make_weights(2, [4, 3], 8, [5], torch.float32, device)
    x = randn(6, 8, device=device)
    out = torch.ones(6, 4 if call == "shrink_out" else 5, device=device)
    w = torch.ones_like(out, requires_grad=True)
    loss = (w * out).sum()  # saves out for w's gradient
    with torch.no_grad():
        if call == "expand":
            t = lk_ops.lora_shrink(x, A, batch, scalings, ranks, backend="triton")
            lk_ops.lora_expand(t, B, batch, out, 0, ranks, backend="triton")
        elif call == "shrink_out":
            lk_ops.lora_shrink(x, A, batch, scalings, ranks, backend="triton", out=out)
        else:
            lk_ops.add_lora(out, x, [A], [B], batch, scalings, ranks, [5], backend="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("op", ["sgmv_shrink", "sgmv_expand"])
def test_the_grouped_triton_ops_refuse_a_later_slice_that_requires_grad(op, device):
    """lora_a and lora_b are lists of slices: a slice after the first that requires grad is refused too (it would
    silently get no gradient)."""
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, -1], dtype=torch.int32, device=device), 2)
    meta = (batch.adapter_ids, batch.sorted_token_ids, batch.slot_counts, batch.slot_starts)
    ranks = torch.tensor([4, 4], dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match=f"{'lora_a' if op == 'sgmv_shrink' else 'lora_b'} requires grad"):
        if op == "sgmv_shrink":
            slices = [randn(2, 4, 8, device=device), randn(2, 4, 8, device=device).requires_grad_(True)]
            torch.ops.lora_kernels_triton.sgmv_shrink(randn(3, 8, device=device), slices, *meta,
                                                      torch.ones(2, device=device), ranks,
                                                      torch.zeros(2, 3, 4, device=device), False, "auto")
        else:
            slices = [randn(2, 6, 4, device=device), randn(2, 2, 4, device=device).requires_grad_(True)]
            torch.ops.lora_kernels_triton.sgmv_expand(torch.zeros(2, 3, 4, device=device), slices, *meta, ranks,
                                                      torch.zeros(3, 8, device=device), [0, 6], "auto")


def _raw_triton_calls(meta_arg):
    """Each raw Triton op with every tensor on the CPU but `meta_arg`, which is on the meta device."""
    from lora_kernels.triton import lora_linear  # noqa: F401 (registers the single-adapter ops)
    M, K, N, r, L = 4, 6, 5, 2, 2
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, -1, 0]), L)
    meta = lambda name, t: t.to("meta") if name == meta_arg else t
    ranks, seed = torch.full((L,), r, dtype=torch.int32), torch.tensor(1)
    single, grouped = torch.ops.lora_kernels, torch.ops.lora_kernels_triton
    metadata = (batch.adapter_ids, batch.sorted_token_ids, batch.slot_counts, batch.slot_starts)
    return {
        "triton_lora_fwd": lambda: single.triton_lora_fwd(
            randn(M, K), meta("weight", randn(N, K)), meta("lora_a", randn(r, K)), randn(N, r), 1.0, None, 0.0, seed),
        "triton_lora_bwd_dx": lambda: single.triton_lora_bwd_dx(
            randn(M, N), meta("ds", randn(M, r)), randn(N, K), randn(r, K), 0.0, seed),
        "triton_lora_bwd_dy": lambda: single.triton_lora_bwd_dy(randn(M, N), meta("s", randn(M, r)), randn(N, r), 1.0),
        "triton_lora_bwd_da": lambda: single.triton_lora_bwd_da(randn(M, r), meta("x", randn(M, K)), 0.0, seed),
        "sgmv_shrink": lambda: grouped.sgmv_shrink(
            randn(M, K), [torch.ones(L, r, K)], *metadata, meta("scalings", torch.ones(L)), ranks,
            torch.full((M, r), 7.0), False, "auto"),
        "sgmv_expand": lambda: grouped.sgmv_expand(
            torch.ones(M, r), [meta("lora_b", torch.ones(L, N, r))], *metadata, ranks, torch.zeros(M, N), [0], "auto"),
        "segment_outer": lambda: grouped.segment_outer(
            torch.ones(M, r), meta("right", torch.ones(M, N)), *metadata[1:], torch.zeros(L, r, N)),
    }


@pytest.mark.parametrize("op, meta_arg, named", [
    ("triton_lora_fwd", "weight", "weight"), ("triton_lora_fwd", "lora_a", "lora_a"),
    ("triton_lora_bwd_dx", "ds", "ds"), ("triton_lora_bwd_dy", "s", "s"), ("triton_lora_bwd_da", "x", "x"),
    ("sgmv_shrink", "scalings", "scalings"), ("sgmv_expand", "lora_b", r"lora_b\[0\]"),
    ("segment_outer", "right", "right")])
def test_a_meta_argument_among_cpu_tensors_is_a_device_error_for_the_raw_triton_ops(op, meta_arg, named):
    """One meta tensor among CPU ones sends a raw op's call to its fake, which took any devices: the single-adapter
    ops returned uninitialised CPU tensors and the grouped ones wrote nothing, with no error. The fakes check devices
    as the launchers do (the C++ ops' too: test_cpp_ops)."""
    with pytest.raises(ValueError, match=rf"{named} expected device cpu \(same as \w+\), got meta"):
        _raw_triton_calls(meta_arg)[op]()
