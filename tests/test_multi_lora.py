"""The grouped ops through the public API on every backend here: LoRABatch, lk.ops.lora_shrink/lora_expand/add_lora,
multi_lora_linear with autograd, MultiLoRALinear, bad input, torch.compile."""

import copy
import re
import warnings

import pytest
import torch
from torch import nn

import lora_kernels as lk
from conftest import (DTYPES, assert_close, assert_fake_step_like_the_real_one, assert_same_non_finite,
                      assert_summed_magnitude, backend_or_skip, quantized_linear, randn, rel_error)
from lora_kernels import backends, functional, modules, reference
from lora_kernels.batch import LoRABatch

GROUPED_BACKENDS = ["torch", "cpu", "cuda", "triton"]


def segment_ids(kind, num_tokens, num_slots, generator=None):
    """Slot ids for the segment distributions of design.md §7."""
    g = generator or torch.Generator().manual_seed(7)
    if kind == "distinct":
        ids = torch.arange(num_tokens) % num_slots
    elif kind == "uniform":
        ids = torch.randint(0, num_slots, (num_tokens,), generator=g)
    elif kind == "zipf":
        weights = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64)
        ids = torch.multinomial(weights, num_tokens, replacement=True, generator=g)
    elif kind == "identical":
        ids = torch.full((num_tokens,), num_slots - 1)
    elif kind == "skewed":
        ids = torch.zeros(num_tokens, dtype=torch.int64)
        ids[-1:] = num_slots - 1
    elif kind == "empty_slots":
        ids = torch.randint(0, 2, (num_tokens,), generator=g) * (num_slots - 1)
    elif kind == "all_base":
        ids = torch.full((num_tokens,), -1)
    elif kind == "mixed_base":
        ids = torch.randint(-1, num_slots, (num_tokens,), generator=g)
    else:
        raise ValueError(kind)
    return ids[torch.randperm(num_tokens, generator=g)]


DISTRIBUTIONS = ["distinct", "uniform", "zipf", "identical", "skewed", "empty_slots", "all_base", "mixed_base"]


def _adapters(num_slots, max_rank, k, n, ranks, dtype, device):
    """Stacked adapters with NaN written past each slot's rank: it must never be read."""
    lora_a = randn(num_slots, max_rank, k, dtype=dtype, device=device, scale=k ** -0.5)
    lora_b = randn(num_slots, n, max_rank, dtype=dtype, device=device, scale=max_rank ** -0.5)
    for slot, rank in enumerate(ranks):
        lora_a[slot, rank:] = float("nan")
        lora_b[slot, :, rank:] = float("nan")
    return lora_a, lora_b


def test_lora_batch_metadata():
    ids = torch.tensor([2, -1, 0, 2, 2, -1, 0])
    batch = LoRABatch.from_adapter_ids(ids, 4)
    assert batch.sorted_token_ids.tolist() == [1, 5, 2, 6, 0, 3, 4]  # stable: -1 first, then slot order
    assert batch.slot_counts.tolist() == [2, 0, 3, 0]
    assert batch.slot_starts.tolist() == [2, 4, 4, 7]
    assert batch.active_slots.tolist() == [0, 2, -1, -1] and batch.num_active.tolist() == [2]
    assert all(t.dtype == torch.int32 for t in (batch.adapter_ids, batch.sorted_token_ids, batch.slot_counts))
    empty = LoRABatch.from_adapter_ids(torch.zeros(0, dtype=torch.int64), 3)
    assert empty.num_tokens == 0 and empty.slot_counts.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match=r"adapter_ids expected values in \[-1, 4\), got 4"):
        LoRABatch.from_adapter_ids(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match=r"got -2"):
        LoRABatch.from_adapter_ids(torch.tensor([-2]), 4)
    with pytest.raises(TypeError, match="integer dtype"):
        LoRABatch.from_adapter_ids(torch.tensor([0.0]), 4)
    unchecked = LoRABatch.from_adapter_ids(torch.tensor([7, 1, -5]), 4, validate=False)
    assert unchecked.adapter_ids.tolist() == [-1, 1, -1]  # out of range either way is treated as base-only, never read
    at_bound = LoRABatch.from_adapter_ids(torch.tensor([4, 1, 4]), 4, validate=False)  # L itself is out of range
    assert at_bound.adapter_ids.tolist() == [-1, 1, -1] and at_bound.slot_counts.tolist() == [0, 1, 0, 0]
    assert all(t.dtype == torch.int32 and t.is_contiguous() for t in (batch.slot_starts, batch.active_slots))
    assert batch.num_active.dtype == torch.int32 and batch.num_active.shape == (1,)


@pytest.mark.parametrize("ids", [torch.zeros(1, dtype=torch.int8).expand(2**31),  # no memory: one element, stride 0
                                 torch.empty(2**31, dtype=torch.int64, device="meta")],
                         ids=["cpu", "meta"])
def test_lora_batch_refuses_more_tokens_than_int32_positions_hold(ids):
    """Token positions are int32 in every buffer: 2**31 ids wrapped to negative positions (on the meta device a batch
    came back; on the CPU it went on to copy and sort 8 GB of int32 positions)."""
    with pytest.raises(ValueError, match=r"LoRABatch.from_adapter_ids: adapter_ids expected at most 2147483647 ids "
                                         r"\(the batch holds token positions as int32\), got 2147483648"):
        LoRABatch.from_adapter_ids(ids, 4)
    with pytest.raises(ValueError, match="multi_lora_linear: adapter_ids expected at most 2147483647 ids"):
        LoRABatch._for_op("multi_lora_linear", ids, 4)


@pytest.mark.parametrize("num_tokens", [100, 333])
def test_lora_batch_sort_is_stable_on_many_tokens(device, num_tokens):
    """The metadata of a batch long enough that an unstable sort reorders equal ids (torch's CPU sort does from
    ~100 elements; 7 tokens cannot tell): within each slot, and among the -1 tokens, the token indices ascend, and
    every buffer equals a plain Python build."""
    num_adapters = 5
    ids = torch.randint(-1, num_adapters, (num_tokens,))
    batch = LoRABatch.from_adapter_ids(ids.to(device), num_adapters)
    listed = ids.tolist()
    expected_order = sorted(range(num_tokens), key=lambda t: (listed[t], t))
    assert batch.sorted_token_ids.cpu().tolist() == expected_order
    counts = [listed.count(slot) for slot in range(num_adapters)]
    starts = [listed.count(-1) + sum(counts[:slot]) for slot in range(num_adapters)]
    assert batch.slot_counts.cpu().tolist() == counts and batch.slot_starts.cpu().tolist() == starts
    active = [slot for slot in range(num_adapters) if counts[slot]]
    assert batch.active_slots.cpu().tolist() == active + [-1] * (num_adapters - len(active))
    assert batch.num_active.cpu().tolist() == [len(active)]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.int16], ids=str)
@pytest.mark.parametrize("validate", [None, True, False])
def test_lora_batch_owns_its_buffers(dtype, validate):
    # int32 ids checked in range need no clamp, and a plain .to(int32) of them would be the caller's own tensor:
    # refill_ would write the caller's ids, and the caller's later edits would desync the sorted metadata
    ids = torch.tensor([2, 0, 1, 0], dtype=dtype)
    batch = LoRABatch.from_adapter_ids(ids, 3, validate=validate)
    assert batch.adapter_ids.dtype == torch.int32
    assert batch.adapter_ids.untyped_storage().data_ptr() != ids.untyped_storage().data_ptr()
    ids[0] = 1
    assert batch.adapter_ids.tolist() == [2, 0, 1, 0]
    batch.refill_(torch.tensor([1, 1, 1, 1]))
    assert ids.tolist() == [1, 0, 1, 0]


def test_lora_batch_refill_in_place(device):
    """refill_ (a captured CUDA graph's next step): the same buffers, holding what a fresh build holds; a bad id or
    count raises before anything is written."""
    batch = LoRABatch.from_adapter_ids(torch.tensor([2, -1, 0, 2, 2, -1, 0], device=device), 4)
    buffers = {name: getattr(batch, name) for name in ("adapter_ids", "sorted_token_ids", "slot_counts",
                                                       "slot_starts", "active_slots", "num_active")}
    pointers = {name: t.data_ptr() for name, t in buffers.items()}
    new_ids = torch.tensor([1, 1, 3, -1, 0, 3, 2])
    assert batch.refill_(new_ids.to(device)) is batch
    fresh = LoRABatch.from_adapter_ids(new_ids, 4)
    for name, t in buffers.items():
        assert t.data_ptr() == pointers[name] and getattr(batch, name) is t
        assert torch.equal(t.cpu(), getattr(fresh, name)), name
    snapshot = {name: t.clone() for name, t in buffers.items()}
    with pytest.raises(ValueError, match=r"LoRABatch.refill_: adapter_ids expected 7 ids \(the batch's num_tokens\), "
                                         r"got shape \(6,\)"):
        batch.refill_(new_ids[:6].to(device))
    with pytest.raises(ValueError, match=r"LoRABatch.refill_: adapter_ids expected values in \[-1, 4\), got 4"):
        batch.refill_(torch.tensor([0, 1, 2, 3, 4, 0, 0]))  # CPU ids are checked, wherever the batch lives
    with pytest.raises(TypeError, match="adapter_ids expected a torch.Tensor, got list"):
        batch.refill_([0] * 7)
    # named as refill_'s, before any value is read (a float 9.0 was an out-of-range id; sparse failed in reshape)
    with pytest.raises(TypeError, match=r"LoRABatch.refill_: adapter_ids expected an integer dtype, got torch.float32"):
        batch.refill_(torch.tensor([9.0, 1, 2, 3, 0, 0, 0]))
    with pytest.raises(TypeError, match=r"LoRABatch.refill_: adapter_ids expected a dense \(strided\) tensor"):
        batch.refill_(new_ids.to_sparse())
    assert all(torch.equal(t, snapshot[name]) for name, t in buffers.items())


@pytest.mark.gpu
@pytest.mark.parametrize("pinned", [False, True], ids=["pageable", "pinned"])
def test_cuda_lora_batch_refills_from_host_ids_without_a_sync(pinned):
    """A scheduler's ids come from the host every step: refill_ copies them to the GPU without waiting for the GPU's
    queued work (a blocking copy synchronised the stream; helper 171), and ids the caller rewrites as soon as
    refill_ returns, while the GPU is still busy, do not reach the batch (they are staged in a pinned buffer)."""
    device = torch.device("cuda")
    batch = LoRABatch.from_adapter_ids(torch.zeros(64, dtype=torch.int32, device=device), 4)
    ids = torch.randint(-1, 4, (64,), dtype=torch.int32)
    expected = LoRABatch.from_adapter_ids(ids.clone(), 4)
    if pinned:
        ids = ids.pin_memory()
    batch.refill_(ids)  # the first staging buffer comes from cudaHostAlloc; the allocator keeps it for reuse
    torch.cuda.synchronize(device)
    torch.cuda._sleep(50_000_000)  # tens of ms of queued GPU work, which a sync would wait for
    torch.cuda.set_sync_debug_mode("error")  # torch's own syncs (a blocking copy's cudaStreamSynchronize)
    try:
        batch.refill_(ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not torch.cuda.current_stream(device).query(), "refill_ waited for the queued GPU work"  # the driver's
    ids.fill_(3)  # the caller's next step
    torch.cuda.synchronize(device)
    for name in ("adapter_ids", "sorted_token_ids", "slot_counts", "slot_starts", "active_slots", "num_active"):
        assert torch.equal(getattr(batch, name).cpu(), getattr(expected, name)), name


def test_set_and_clear_adapter_take_numpy_slot_indices():
    """A slot from numpy (np.int64, as an index array's element) names the slot as a Python int would; the lk.ops
    take numpy integers too. It was refused with "slot expected an int in [0, 2), got np.int64(1)"."""
    np = pytest.importorskip("numpy")
    layer = lk.MultiLoRALinear(nn.Linear(8, 6), max_adapters=2, max_rank=4)
    lora_a, lora_b = torch.randn(3, 8), torch.randn(6, 3)
    layer.set_adapter(np.int64(1), lora_a, lora_b, 2.0)
    assert layer.ranks.tolist() == [0, 3] and layer.scalings.tolist() == [0.0, 2.0]
    assert torch.equal(layer.lora_a[1, :3], lora_a) and torch.equal(layer.lora_b[1, :, :3], lora_b)
    layer.clear_adapter(np.int32(1))
    assert layer.ranks.tolist() == [0, 0] and not layer.lora_a.any()
    with pytest.raises(ValueError, match=r"slot expected an int in \[0, 2\), got np.True_|got True"):
        layer.clear_adapter(np.bool_(True))


def test_layer_sizes_and_ranks_take_numpy_integers_as_python_ints():
    """in_features, out_features, r, max_adapters and max_rank from numpy (a sweep's grid) were refused with
    "expected an int >= 1, got np.int64(4)", unlike slots and num_adapters; they are stored as Python ints (json
    writes the saved adapter's r)."""
    np = pytest.importorskip("numpy")
    layer = lk.LoRALinear(np.int64(8), np.int32(6), r=np.int64(2))
    assert (layer.in_features, layer.out_features, layer.r) == (8, 6, 2)
    assert all(type(v) is int for v in (layer.in_features, layer.out_features, layer.r))
    assert type(lk.LoRALinear.from_linear(nn.Linear(8, 6), r=np.int16(3)).r) is int
    multi = lk.MultiLoRALinear(nn.Linear(8, 6), max_adapters=np.int64(2), max_rank=np.int64(4))
    assert type(multi.max_adapters) is type(multi.max_rank) is int and multi.lora_a.shape == (2, 4, 8)
    for bad in (np.int64(0), np.bool_(True), 2.0):
        with pytest.raises(ValueError, match=r"LoRALinear: r expected an int >= 1"):
            lk.LoRALinear(8, 6, r=bad)


def test_validate_takes_a_bool_or_none_and_num_adapters_a_numpy_integer():
    """validate="no" read as truthy and checked the ids (a string is a TypeError now, as deterministic's); a numpy
    integer num_adapters was a ValueError that read like a bad value."""
    np = pytest.importorskip("numpy")
    ids = torch.tensor([0, 1, -1])
    for call in (lambda v: LoRABatch.from_adapter_ids(ids, 2, validate=v),
                 lambda v: LoRABatch.from_adapter_ids(ids, 2).refill_(ids, validate=v)):
        with pytest.raises(TypeError, match=r"validate expected a bool, got 'no'"):
            call("no")
        call(np.bool_(False))
    batch = LoRABatch.from_adapter_ids(ids, np.int64(2))
    assert batch.num_adapters == 2 and type(batch.num_adapters) is int
    assert torch.equal(batch.slot_counts, LoRABatch.from_adapter_ids(ids, 2).slot_counts)


def test_validate_true_is_skipped_while_tracing():
    """validate=True (what a CUDA serving step passes) reads the id values on the host: under torch.compile with
    fullgraph=True that failed on a data-dependent expression, in from_adapter_ids and in refill_. Traced ids are not
    checked (the docstring's rule); eager ones still are."""
    def build(ids):
        return LoRABatch.from_adapter_ids(ids, 4, validate=True).sorted_token_ids + 0

    def refill(batch, ids):
        return batch.refill_(ids, validate=True).slot_counts + 0

    ids = torch.tensor([0, 3, -1, 2])
    compiled = torch.compile(build, fullgraph=True, backend="aot_eager")(ids)
    assert torch.equal(compiled, build(ids))
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, 2, 3]), 4)
    counts = torch.compile(refill, fullgraph=True, backend="aot_eager")(batch, ids)
    assert torch.equal(counts, LoRABatch.from_adapter_ids(ids, 4).slot_counts)
    with pytest.raises(ValueError, match=r"LoRABatch.from_adapter_ids: adapter_ids expected values in \[-1, 4\)"):
        build(torch.tensor([0, 4, -1, 2]))


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_refilled_batch_before_backward_is_refused(backend, device):
    """A LoRABatch refilled between multi_lora_linear's forward and its backward: autograd refuses the modified
    buffers. It had silently computed the gradients of the new ids (a serving stack reusing one batch per CUDA
    graph while training several adapters)."""
    backend_or_skip(backend, device)
    lora_a, lora_b = [t.requires_grad_(True) for t in _adapters(4, 4, 8, 6, [4, 4, 4, 4], torch.float32, device)]
    x, weight = randn(6, 8, device=device), randn(6, 8, device=device)
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 0, 1, 1, -1, 2], device=device), 4)
    y = lk.multi_lora_linear(x, weight, lora_a, lora_b, batch, [1.0] * 4, backend=backend)
    batch.refill_(torch.full((6,), 3, device=device))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float32), ("torch", torch.float64),
                                            ("cpu", torch.float64)])
def test_refilled_batch_before_backward_keeps_the_gradients_of_the_ids_it_ran_with(backend, dtype, device):
    """The paths that keep what they read (the reference backend, the float64 composition) raise nothing for a
    batch refilled before the backward, and never use the new ids either (LoRABatch.refill_'s docstring)."""
    backend_or_skip(backend, device)
    ids = torch.tensor([0, 0, 1, 1, -1, 2], device=device)
    grads = []
    for refill in (False, True):
        torch.manual_seed(0)  # the same inputs twice
        lora_a, lora_b = [t.requires_grad_(True) for t in _adapters(4, 4, 8, 6, [4, 4, 4, 4], dtype, device)]
        x = randn(6, 8, device=device, dtype=dtype).requires_grad_(True)
        weight = randn(6, 8, device=device, dtype=dtype)
        batch = LoRABatch.from_adapter_ids(ids, 4)
        y = lk.multi_lora_linear(x, weight, lora_a, lora_b, batch, [1.0, 0.5, 2.0, 1.0], backend=backend)
        if refill:
            batch.refill_(torch.full((6,), 3, device=device))
        y.sum().backward()
        grads.append((x.grad, lora_a.grad, lora_b.grad))
    for before, after in zip(*grads):
        assert torch.equal(before, after)
    assert not grads[1][1][3].any() and grads[1][1][0].any()  # slot 3 (the new ids') has no gradient


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
                                   torch.uint32])
def test_lora_batch_takes_every_integer_dtype(dtype):
    """uint16 and uint32 ids failed the value check with torch's bare "aminmax_cpu not implemented" (a review)."""
    unsigned = dtype in (torch.uint8, torch.uint16, torch.uint32)
    ids = torch.tensor([2, 0, 3, 2] + ([] if unsigned else [-1]), dtype=dtype)
    batch = LoRABatch.from_adapter_ids(ids, 4)
    assert batch.adapter_ids.tolist() == ids.tolist()  # no wrap-around of unsigned or narrow ids
    assert batch.slot_counts.tolist() == [1, 0, 2, 1]
    unchecked = LoRABatch.from_adapter_ids(torch.tensor([9, 1], dtype=dtype), 4, validate=False)
    assert unchecked.adapter_ids.tolist() == [-1, 1]
    with pytest.raises(ValueError, match=r"adapter_ids expected values in \[-1, 4\), got 9"):
        LoRABatch.from_adapter_ids(torch.tensor([9, 1], dtype=dtype), 4)


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_shrink_expand_distributions(backend, distribution, device):
    backend_or_skip(backend, device)
    num_slots, max_rank, k, n, m = 4, 16, 37, 23, 19
    ranks = [16, 1, 8, 5]
    dtype = torch.float32
    lora_a, lora_b = _adapters(num_slots, max_rank, k, n, ranks, dtype, device)
    ids = segment_ids(distribution, m, num_slots).to(device)
    scalings = torch.tensor([0.5, 2.0, 1.0, -1.5], device=device)
    ranks_t = torch.tensor(ranks, dtype=torch.int32, device=device)
    x = randn(m, k, dtype=dtype, device=device)
    batch = LoRABatch.from_adapter_ids(ids, num_slots)
    shrunk = lk.ops.lora_shrink(x, lora_a, batch, scalings, ranks_t, backend=backend)
    expected_shrunk = reference.lora_shrink(x, lora_a, ids, scalings, ranks_t)
    assert shrunk.dtype == torch.float32 and shrunk.shape == (m, max_rank)
    assert_close(shrunk, expected_shrunk, dtype, "shrink")
    out = randn(m, n + 9, dtype=dtype, device=device)
    expected_out = reference.lora_expand(shrunk, lora_b, ids, out, 5, ranks_t)
    lk.ops.lora_expand(shrunk, lora_b, batch, out, 5, ranks_t, backend=backend)
    assert_close(out, expected_out, dtype, "expand")


@pytest.mark.parametrize("path", ["by_slot", "masked"])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_torch_fallback_paths(path, distribution, device):
    """Both paths of the torch backend's grouped ops against the reference: slot by slot with the slot sizes read on
    the host (CPU tensors in eager mode), and the masked loop over all rows (traced, or on a GPU: no host sync)."""
    from lora_kernels import ops
    num_slots, max_rank, k, n, m = 4, 16, 37, 23, 19
    ranks = torch.tensor([16, 1, 8, 5], dtype=torch.int32, device=device)
    lora_a, lora_b = _adapters(num_slots, max_rank, k, n, ranks.tolist(), torch.float32, device)
    ids = segment_ids(distribution, m, num_slots).to(device)
    scalings = torch.tensor([0.5, 2.0, 1.0, -1.5], device=device)
    x = randn(m, k, device=device)
    batch = LoRABatch.from_adapter_ids(ids, num_slots)
    shrink, expand = {"by_slot": (ops._torch_shrink_by_slot, ops._torch_expand_by_slot),
                      "masked": (ops._torch_shrink_masked, ops._torch_expand_masked)}[path]
    shrunk = shrink(x, lora_a, batch, scalings, ranks)
    assert_close(shrunk, reference.lora_shrink(x, lora_a, ids, scalings, ranks), torch.float32, "shrink")
    total = expand(shrunk, lora_b, batch, ranks)
    expected = reference.lora_expand(shrunk, lora_b, ids, torch.zeros(m, n, device=device), 0, ranks)
    assert_close(total, expected, torch.float32, "expand")


@pytest.mark.parametrize("path", [True, False], ids=["by_slot", "masked"])
def test_torch_fallback_expand_keeps_float64(path, device, monkeypatch):
    """A float64 output stays float64: rows without an adapter keep their bits, the others get the float64 sum (the
    fallback once rounded the whole output slice, base result included, to float32)."""
    from lora_kernels import ops
    monkeypatch.setattr(ops, "slots_on_host", lambda *args: path)
    lora_a, lora_b = _adapters(2, 4, 9, 7, [4, 3], torch.float64, device)
    ids = torch.tensor([0, -1, 1, 1, -1], device=device)
    batch, ranks = LoRABatch.from_adapter_ids(ids, 2), torch.tensor([4, 3], dtype=torch.int32, device=device)
    shrunk = lk.ops.lora_shrink(randn(5, 9, dtype=torch.float64, device=device), lora_a, batch, [1.0, 0.5], ranks,
                                backend="torch")
    out = randn(5, 7, dtype=torch.float64, device=device)
    before = out.clone()
    lk.ops.lora_expand(shrunk, lora_b, batch, out, 0, ranks, backend="torch")
    expected = reference.lora_expand(shrunk.cpu(), lora_b.cpu(), ids.cpu(), before.cpu(), 0, ranks.cpu())
    assert torch.equal(out[ids < 0], before[ids < 0])
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_lora_slices(backend, dtype, device):
    backend_or_skip(backend, device)
    num_slots, max_rank, k, m = 3, 16, 33, 13
    widths = (24, 8, 8)
    ranks = [4, 16, 1]
    lora_as, lora_bs = zip(*[_adapters(num_slots, max_rank, k, w, ranks, dtype, device) for w in widths])
    ids = segment_ids("mixed_base", m, num_slots).to(device)
    scalings = torch.tensor([1.0, 0.25, 3.0], device=device)
    x = randn(m, k, dtype=dtype, device=device)
    y = randn(m, sum(widths), dtype=dtype, device=device)
    expected = reference.add_lora(y, x, lora_as, lora_bs, ids, scalings, torch.tensor(ranks), widths)
    batch = LoRABatch.from_adapter_ids(ids, num_slots)
    lk.ops.add_lora(y, x, list(lora_as), list(lora_bs), batch, scalings, ranks, widths, backend=backend)
    assert_close(y, expected, dtype, "add_lora")


@pytest.mark.parametrize("backend", GROUPED_BACKENDS + ["reference"])
@pytest.mark.parametrize("stack_b", [False, True])
def test_add_lora_stacked_slices(backend, stack_b, device):
    """lora_a (and, with equal widths, lora_b) as one stacked tensor: one launch each with the triton backend. The
    buffer holds each slice's shrink results afterwards, on every backend (the reference left it unwritten)."""
    backend_or_skip(backend, device)
    num_slots, max_rank, k, m, widths, ranks = 2, 8, 20, 11, (12, 12, 12), [8, 3]
    lora_as, lora_bs = zip(*[_adapters(num_slots, max_rank, k, w, ranks, torch.float32, device) for w in widths])
    ids = segment_ids("mixed_base", m, num_slots).to(device)
    scalings = torch.tensor([0.5, 2.0], device=device)
    x, y = randn(m, k, device=device), randn(m, sum(widths), device=device)
    expected = reference.add_lora(y, x, lora_as, lora_bs, ids, scalings, torch.tensor(ranks), widths)
    batch = LoRABatch.from_adapter_ids(ids, num_slots)
    lora_b = torch.stack(lora_bs) if stack_b else list(lora_bs)
    buffer = torch.full((len(widths), m, max_rank), float("nan"), device=device)  # every entry gets written
    lk.ops.add_lora(y, x, torch.stack(lora_as), lora_b, batch, scalings, ranks, widths, backend=backend,
                    buffer=buffer)
    assert_close(y, expected, torch.float32, "add_lora stacked")
    for j in range(len(widths)):
        shrunk = reference.lora_shrink(x, lora_as[j], ids, scalings, torch.tensor(ranks))
        assert_close(buffer[j], shrunk, torch.float32, f"buffer[{j}]")
    with pytest.raises(ValueError, match=r"buffer expected a float32 tensor of shape \[3, 11, 8\]"):
        lk.ops.add_lora(y, x, torch.stack(lora_as), lora_b, batch, scalings, ranks, widths, backend=backend,
                        buffer=buffer[:, :5])


def _column_major(weights):
    """The same values, laid out with the last dimension slowest (other strides than a contiguous tensor's)."""
    return weights.transpose(-1, -2).contiguous().transpose(-1, -2)


# layout -> (widths, each slice's R, shrink launches, expand launches): up to 3 slices of one R, laid out alike, are
# one launch of each kernel, of any widths that are multiples of 16 (the interpreter's N tile is 32); a slice of an
# odd width or other strides takes launches of its own of the kernel that reads it (Triton would make every slice's
# accesses narrow; a launch shares its strides); more slices take several, and slices of other R one of each.
_SLICE_LAUNCH_CASES = {
    "qkv lists": ((32, 16, 16), (4, 4, 4), 1, 1),
    "stacked a and b": ((16, 16, 16), (4, 4, 4), 1, 1),
    "stacked a, listed b": ((32, 16, 16), (4, 4, 4), 1, 1),
    "b views of one buffer": ((32, 16, 16), (4, 4, 4), 1, 1),  # slot strides of the buffer, not of each slice
    "ranks=None, one R": ((32, 16, 16), (4, 4, 4), 1, 1),
    "widest not first": ((16, 48, 32), (4, 4, 4), 1, 1),  # N tiles for the widest, not the first
    "first width 0": ((0, 16, 32), (4, 4, 4), 1, 1),
    "four slices": ((32, 16, 16, 48), (4, 4, 4, 4), 2, 2),
    "an odd width": ((32, 16, 8), (4, 4, 4), 1, 2),
    "ranks=None, two R": ((32, 16, 16), (4, 2, 4), 3, 3),
    "ranks=None, rising R": ((32, 16, 16), (2, 4, 4), 3, 3),
    "a column-major lora_a": ((32, 16, 16), (4, 4, 4), 3, 1),  # the middle one: launches before, it, after
    "a column-major lora_b": ((32, 16, 16), (4, 4, 4), 1, 3),
    "every lora_b column-major": ((32, 16, 16), (4, 4, 4), 1, 2),  # one stride along N, along R the width
    "a lora_b cut from a wider R": ((32, 16, 16), (4, 4, 4), 1, 3),  # one stride along R, another along N
}


def _interpreted_launches(monkeypatch):
    """The names of the Triton kernels launched from now on, in order (the interpreter's launches: CPU only)."""
    backend_or_skip("triton", torch.device("cpu"))
    import triton
    launches = []
    run = triton.runtime.interpreter.InterpretedFunction.run
    monkeypatch.setattr(triton.runtime.interpreter.InterpretedFunction, "run",
                        lambda self, *args, **kwargs: launches.append(self.fn.__name__) or run(self, *args, **kwargs))
    return launches


@pytest.mark.parametrize("m", [5, 80], ids=["decode", "prefill"])
@pytest.mark.parametrize("layout", list(_SLICE_LAUNCH_CASES))
def test_add_lora_launches_once_for_up_to_three_slices_with_triton(layout, m, monkeypatch):
    """README, Serving stacks: with Triton up to 3 slices (a fused QKV projection's: unequal widths, in lists) are
    one shrink and one expand launch, where they have one R, are laid out alike and their widths are multiples of
    16; else more. The kernels really run (under the interpreter): each slice's result lands in its own columns."""
    launches = _interpreted_launches(monkeypatch)
    widths, slice_ranks, shrinks, expands = _SLICE_LAUNCH_CASES[layout]
    num_slots, k = 2, 8
    given_ranks = not layout.startswith("ranks=None")  # else every slot at its slice's R: no NaN padding to skip
    slot_ranks = [[r, r // 2 if given_ranks else r] for r in slice_ranks]
    lora_as, lora_bs = zip(*[_adapters(num_slots, r, k, w, ranks, torch.float32, "cpu")
                             for r, w, ranks in zip(slice_ranks, widths, slot_ranks)])
    lora_a, lora_b = list(lora_as), list(lora_bs)
    ranks = torch.tensor(slot_ranks[0], dtype=torch.int32) if given_ranks else None
    if layout.startswith("stacked"):
        lora_a = torch.stack(lora_as)
        if layout == "stacked a and b":
            lora_b = torch.stack(lora_bs)
    elif layout == "b views of one buffer":
        lora_b = list(torch.cat(lora_bs, dim=1).split(widths, dim=1))
    elif layout == "a column-major lora_a":
        lora_a[1] = _column_major(lora_a[1])
    elif layout == "a column-major lora_b":
        lora_b[1] = _column_major(lora_b[1])
    elif layout == "every lora_b column-major":
        lora_b = [_column_major(b) for b in lora_b]
    elif layout == "a lora_b cut from a wider R":
        lora_b[1] = torch.cat([lora_b[1], torch.full_like(lora_b[1], float("nan"))], dim=2)[:, :, :slice_ranks[1]]
    x, y = randn(m, k), randn(m, sum(widths))
    batch = LoRABatch.from_adapter_ids(torch.arange(m) % (num_slots + 1) - 1, num_slots)
    expected = y.double()
    for j in range(len(widths)):
        slot_ranks_j = torch.tensor(slot_ranks[0 if given_ranks else j])
        shrunk = reference.lora_shrink(x, lora_as[j], batch.adapter_ids, torch.tensor([1.0, 2.0]), slot_ranks_j)
        expected = reference.lora_expand(shrunk, lora_bs[j], batch.adapter_ids, expected, sum(widths[:j]),
                                         slot_ranks_j)
    lk.ops.add_lora(y, x, lora_a, lora_b, batch, [1.0, 2.0], ranks, widths, backend="triton")
    assert_close(y, expected, torch.float32, f"add_lora, {layout}")
    kind = "bgmv" if m == 5 else "sgmv"
    assert sorted(launches) == [f"_{kind}_expand_kernel"] * expands + [f"_{kind}_shrink_kernel"] * shrinks


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_add_lora_checks_every_slice_before_touching_y(backend, device):
    """A bad last slice is an error before the first slice is added: y is left exactly as it was."""
    backend_or_skip(backend, device)
    num_slots, max_rank, k, m, widths, ranks = 2, 4, 16, 6, (8, 8), [4, 2]
    (a0, b0), (a1, b1) = [_adapters(num_slots, max_rank, k, w, ranks, torch.float32, device) for w in widths]
    batch = LoRABatch.from_adapter_ids(segment_ids("mixed_base", m, num_slots).to(device), num_slots)
    x, y = randn(m, k, device=device), randn(m, sum(widths), device=device)
    before = y.clone()
    with pytest.raises(ValueError, match=r"add_lora: lora_a_slices\[1\] expected shape \[L, R, 16\]"):
        lk.ops.add_lora(y, x, [a0, a1[:, :, :15]], [b0, b1], batch, [1.0, 1.0], ranks, widths, backend=backend)
    with pytest.raises(TypeError, match=r"lora_b_slices\[1\] expected dtype torch.float32"):
        lk.ops.add_lora(y, x, [a0, a1], [b0, b1.double()], batch, [1.0, 1.0], ranks, widths, backend=backend)
    # errors about a later slice's weights name that slice
    with pytest.raises(ValueError, match=r"lora_a_slices\[1\] expected shape \[L, R, 16\] \(K of x \(6, 16\) and of "
                                         r"lora_a_slices\[0\]\), got \(2, 4, 15\)"):
        lk.ops.add_lora(y, x, [a0, a1[:, :, :15]], [b0, b1], batch, [1.0, 1.0], ranks, widths, backend=backend)
    with pytest.raises(ValueError, match=r"batch was built for 2 adapter slots, but lora_a_slices\[1\] has 1"):
        lk.ops.add_lora(y, x, [a0, a1[:1]], [b0, b1], batch, [1.0, 1.0], ranks, widths, backend=backend)
    assert torch.equal(y, before)


@pytest.mark.parametrize("backend", GROUPED_BACKENDS + ["reference"])
@pytest.mark.parametrize("order", [(8, 16), (16, 8)], ids=["R8,16", "R16,8"])
def test_add_lora_default_ranks_per_slice(backend, order, device):
    """ranks=None: every slot at each slice's own R_j (slices may be padded to different R). It had taken the first
    slice's R for all: a wider later slice was cut to it, a narrower one refused."""
    backend_or_skip(backend, device)
    num_slots, k, m, widths = 3, 20, 9, (12, 6)
    weights = [_adapters(num_slots, r, k, w, [r] * num_slots, torch.float32, device) for r, w in zip(order, widths)]
    lora_as, lora_bs = zip(*weights)
    ids = segment_ids("mixed_base", m, num_slots).to(device)
    scalings = torch.tensor([1.0, 0.5, 2.0], device=device)
    x, y = randn(m, k, device=device), randn(m, sum(widths), device=device)
    expected = y.double().cpu()
    for j, (lora_a, lora_b) in enumerate(weights):
        full = torch.full((num_slots,), order[j])
        shrunk = reference.lora_shrink(x.cpu(), lora_a.cpu(), ids.cpu(), scalings.cpu(), full)
        expected = reference.lora_expand(shrunk, lora_b.cpu(), ids.cpu(), expected, sum(widths[:j]), full)
    batch = LoRABatch.from_adapter_ids(ids, num_slots)
    lk.ops.add_lora(y, x, list(lora_as), list(lora_bs), batch, scalings, None, widths, backend=backend)
    assert_close(y, expected, torch.float32, "add_lora, ranks=None")


def test_reference_backend_is_float64_throughout(device):
    """The reference backend of add_lora keeps the shrink result in float64 (the oracle); lora_shrink's output is
    float32 on every backend, as documented."""
    num_slots, max_rank, k, m, widths, ranks = 3, 8, 24, 10, (16, 8), [8, 3, 5]
    lora_as, lora_bs = zip(*[_adapters(num_slots, max_rank, k, w, ranks, torch.float64, device) for w in widths])
    ids = segment_ids("uniform", m, num_slots).to(device)
    scalings = torch.tensor([1.0, 0.3, 2.0], device=device)
    x, y = randn(m, k, dtype=torch.float64, device=device), randn(m, sum(widths), dtype=torch.float64, device=device)
    expected = reference.add_lora(y.cpu(), x.cpu(), [a.cpu() for a in lora_as], [b.cpu() for b in lora_bs],
                                  ids.cpu(), scalings.cpu(), torch.tensor(ranks), widths)
    batch = LoRABatch.from_adapter_ids(ids, num_slots)
    lk.ops.add_lora(y, x, list(lora_as), list(lora_bs), batch, scalings, ranks, widths, backend="reference")
    assert_close(y, expected, torch.float64, "add_lora, reference backend")
    shrunk = lk.ops.lora_shrink(x, lora_as[0], batch, scalings, ranks, backend="reference")
    assert shrunk.dtype == torch.float32


@pytest.mark.parametrize("backend", GROUPED_BACKENDS + ["reference"])
def test_lora_expand_takes_float32_t_only(backend, device):
    """t is lora_shrink's float32 output on every backend; another dtype is refused by name (the cpu backend had
    refused it from C++, torch and triton had taken it silently)."""
    backend_or_skip(backend, device)
    lora_a, lora_b = _adapters(2, 4, 8, 6, [4, 2], torch.float32, device)
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, -1], device=device), 2)
    out = torch.zeros(3, 6, device=device)
    for dtype in (torch.bfloat16, torch.float64):
        with pytest.raises(TypeError, match=rf"lora_expand: t expected dtype torch.float32 .*got {dtype}"):
            lk.ops.lora_expand(torch.zeros(3, 4, dtype=dtype, device=device), lora_b, batch, out, 0, [4, 2],
                               backend=backend)
    assert not out.any()


@pytest.mark.parametrize("backend", GROUPED_BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead", [(2, 5), (4, 10)], ids=["10_tokens", "40_tokens"])  # 40: the cpu backend's 16-bit
def test_multi_lora_linear_forward_and_gradients(backend, dtype, lead, device):   # base GEMM in fp32 (> 16 rows)
    backend_or_skip(backend, device)
    num_slots, max_rank, k, n = 3, 8, 20, 12
    ranks = [8, 2, 5]
    lora_a, lora_b = _adapters(num_slots, max_rank, k, n, ranks, torch.float64, device)
    lora_a, lora_b = lora_a.nan_to_num(0.0), lora_b.nan_to_num(0.0)  # gradients are compared on the whole tensor
    x = randn(*lead, k, dtype=torch.float64, device=device)
    weight = randn(n, k, dtype=torch.float64, device=device, scale=k ** -0.5)
    bias = randn(n, dtype=torch.float64, device=device)
    ids = segment_ids("mixed_base", lead[0] * lead[1], num_slots).reshape(lead).to(device)
    scalings = torch.tensor([0.5, 1.0, 2.0])
    dy = randn(*lead, n, dtype=torch.float64, device=device)
    names = ("x", "weight", "lora_a", "lora_b", "bias")  # weight and bias too: full fine-tuning of the base
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, weight, lora_a, lora_b, bias)]
    expected = reference.multi_lora_linear_autograd(*ref_leaves[:4], ids.cpu(), scalings, ref_leaves[4],
                                                    torch.tensor(ranks))
    expected.backward(dy)
    leaves = [t.to(dtype).clone().requires_grad_(True) for t in (x, weight, lora_a, lora_b, bias)]
    y = lk.multi_lora_linear(*leaves[:4], ids, scalings, leaves[4], ranks=ranks, backend=backend)
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert_close(y, expected, dtype, "y")
    y.backward(dy.to(dtype))
    for name, leaf, ref_leaf in zip(names, leaves, ref_leaves):
        assert leaf.grad is not None and leaf.grad.dtype == dtype, name
        assert_close(leaf.grad, ref_leaf.grad, dtype, f"d{name}", scale=2.0)
    for slot, rank in enumerate(ranks):  # padding past a slot's rank gets no gradient
        assert torch.count_nonzero(leaves[2].grad[slot, rank:]) == 0


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_scalings_inexact_in_the_input_dtype_are_applied_unrounded(backend, dtype, device):
    """Per-slot scalings as PEFT makes them (lora_alpha / r = 16/3, rsLoRA's 8/√7, -2/3), none exact in bf16 or fp16,
    reach the shrink and multi_lora_linear's y, dx, dA and dB unrounded. The other grouped tests' scalings (0.25 ...
    3) are exact in 16 bits, where a scaling rounded to x's dtype cannot show. Checked by summed magnitudes (a
    bf16-rounded 16/3 is 2e-3 off, fp16 2.4e-4), with a zero base weight so that y and dx are the LoRA term alone."""
    backend_or_skip(backend, device)
    num_slots, max_rank, k, n, m = 3, 8, 192, 160, 240
    ranks = [8, 7, 3]
    scalings = torch.tensor([16 / 3, 8 / 7 ** 0.5, -2 / 3], dtype=torch.float64)
    assert (scalings.to(dtype).double() != scalings).all()
    lora_a, lora_b = _adapters(num_slots, max_rank, k, n, ranks, dtype, device)
    x = randn(m, k, dtype=dtype, device=device)
    ids = segment_ids("distinct", m, num_slots).to(device)
    ranks_t = torch.tensor(ranks, dtype=torch.int32, device=device)
    scalings32 = scalings.float().to(device)
    shrunk = lk.ops.lora_shrink(x, lora_a, LoRABatch.from_adapter_ids(ids, num_slots), scalings32, ranks_t,
                                backend=backend)
    expected_shrunk = reference.lora_shrink(x.double(), lora_a.double(), ids, scalings32.double(), ranks_t)
    assert_summed_magnitude(shrunk, expected_shrunk, dtype, "shrink")

    lora_a, lora_b = lora_a.nan_to_num(0.0), lora_b.nan_to_num(0.0)  # gradients are compared on the whole tensor
    weight = torch.zeros(n, k, dtype=dtype, device=device)
    dy = randn(m, n, dtype=dtype, device=device)
    leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
    y = lk.multi_lora_linear(leaves[0], weight, leaves[1], leaves[2], ids, scalings32, ranks=ranks, backend=backend)
    y.backward(dy)
    ref_leaves = [t.double().clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
    expected = reference.multi_lora_linear_autograd(ref_leaves[0], weight.double(), ref_leaves[1], ref_leaves[2],
                                                    ids.cpu(), scalings32.double(), None, torch.tensor(ranks))
    expected.backward(dy.double())
    results = {"y": (y, expected), "dx": (leaves[0].grad, ref_leaves[0].grad),
               "dA": (leaves[1].grad, ref_leaves[1].grad), "dB": (leaves[2].grad, ref_leaves[2].grad)}
    if backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        # The Triton interpreter truncates every float32 -> bf16 conversion (a GPU rounds to nearest): the kernels'
        # stores into y and their 16-bit operands of the backward's dots bias y, dx and dA by -0.3% to -0.6%. fp16
        # conversions round to nearest there, so the fp16 case checks the Triton kernels' scalings.
        results = {}
    for name, (got, ref) in results.items():
        assert_summed_magnitude(got, ref, dtype, name)


@pytest.mark.parametrize("backend", GROUPED_BACKENDS + ["reference"])
@pytest.mark.parametrize("trained", ["x", "weight", "lora_a", "lora_b", "bias"])
def test_multi_lora_linear_gives_each_gradient_when_only_its_input_needs_one(backend, trained, device):
    """One input requiring grad at a time (a frozen-LoRA fine-tune of the base weight or bias alone, an adapter's
    factors alone, x alone): that input gets its gradient, equal to the reference's, and the others none. With a
    negative scaling among the slots, whose sign dA and dB must keep."""
    backend_or_skip(backend, device)
    num_slots, max_rank, k, n, ranks = 3, 8, 20, 12, [8, 2, 5]
    lora_a, lora_b = _adapters(num_slots, max_rank, k, n, ranks, torch.float32, device)
    lora_a, lora_b = lora_a.nan_to_num(0.0), lora_b.nan_to_num(0.0)
    inputs = {"x": randn(10, k, device=device), "weight": randn(n, k, device=device, scale=k ** -0.5),
              "lora_a": lora_a, "lora_b": lora_b, "bias": randn(n, device=device)}
    ids = segment_ids("mixed_base", 10, num_slots).to(device)
    scalings = torch.tensor([0.5, -1.5, 2.0])
    dy = randn(10, n, device=device)
    order = ("x", "weight", "lora_a", "lora_b")
    ref_leaves = {name: t.double().requires_grad_(name == trained) for name, t in inputs.items()}
    reference.multi_lora_linear_autograd(*(ref_leaves[name] for name in order), ids.cpu(), scalings,
                                         ref_leaves["bias"], torch.tensor(ranks)).backward(dy.double())
    leaves = {name: t.clone().requires_grad_(name == trained) for name, t in inputs.items()}
    lk.multi_lora_linear(*(leaves[name] for name in order), ids, scalings, leaves["bias"], ranks=ranks,
                         backend=backend).backward(dy)
    for name, leaf in leaves.items():
        if name == trained:
            assert_close(leaf.grad, ref_leaves[name].grad, torch.float32, f"d{name}", scale=2.0)
        else:
            assert leaf.grad is None, name


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_multi_lora_linear_saves_s_only_while_lora_b_trains_and_x_only_for_da_or_dw(backend, device):
    """S [M, R] (float32) is read by the backward only for dB: with the slots' B frozen (the adapters frozen while a
    layer below trains, or lora_a alone trained) it was saved all the same, where PEFT's layer keeps no S. x [M, K]
    only for dA and dW: with the slots' A frozen (LoRA-FA) it was saved all the same, where PEFT's layer keeps S
    alone. The gradients stay the reference's. M, K, N, R all distinct."""
    backend_or_skip(backend, device)
    m, k, n, max_rank, ranks = 10, 20, 12, 8, [8, 2, 5]
    lora_a, lora_b = (t.nan_to_num(0.0) for t in _adapters(3, max_rank, k, n, ranks, torch.float32, device))
    x, weight = randn(m, k, device=device), randn(n, k, device=device, scale=k ** -0.5)
    ids, scalings, dy = segment_ids("mixed_base", m, 3).to(device), torch.tensor([0.5, -1.5, 2.0]), randn(m, n,
                                                                                                       device=device)
    for trained in (("x",), ("x", "lora_a"), ("lora_b",), ("x", "lora_b"), ("x", "lora_a", "lora_b"), ("weight",)):
        inputs = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b}
        leaves = {name: t.clone().requires_grad_(name in trained) for name, t in inputs.items()}
        shapes, outputs = [], []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outputs.append(lk.multi_lora_linear(*leaves.values(), ids, scalings, ranks=ranks, backend=backend))
        assert ((m, max_rank) in shapes) == ("lora_b" in trained), (trained, shapes)
        assert ((m, k) in shapes) == ("lora_a" in trained or "weight" in trained), (trained, shapes)
        grads = torch.autograd.grad(outputs[0], [leaves[name] for name in trained], dy)
        ref = {name: t.double().requires_grad_(name in trained) for name, t in inputs.items()}
        expected = torch.autograd.grad(reference.multi_lora_linear_autograd(*ref.values(), ids.cpu(), scalings, None,
                                                                            torch.tensor(ranks)),
                                       [ref[name] for name in trained], dy.double())
        for name, got, want in zip(trained, grads, expected):
            assert_close(got, want, torch.float32, f"d{name} (trained: {trained})", scale=2.0)


def test_auto_runs_float64_where_triton_cannot(device, monkeypatch):
    """The Triton kernels run 32- and 16-bit floats only: "auto" picks another backend for float64 (on a GPU it
    picked Triton and raised)."""
    lora_a, lora_b = _adapters(2, 4, 10, 6, [4, 2], torch.float64, device)
    x, weight = randn(5, 10, dtype=torch.float64, device=device), randn(6, 10, dtype=torch.float64, device=device)
    ids, scalings = torch.tensor([0, 1, -1, 1, 0], device=device), torch.tensor([0.5, 2.0])
    y = lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, scalings, ranks=[4, 2])
    expected = reference.multi_lora_linear_autograd(x.cpu(), weight.cpu(), lora_a.cpu(), lora_b.cpu(), ids.cpu(),
                                                    scalings, None, torch.tensor([4, 2]))
    assert y.dtype == torch.float64
    assert_close(y, expected, torch.float64)
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: None)  # as on a GPU with every backend
    monkeypatch.setattr(backends._triton_pkg, "INTERPRET", False)  # compiled Triton kernels, as there
    assert backends.auto_backend("cuda", "lora_shrink") == "triton"
    assert backends.auto_backend("cuda", "lora_shrink", torch.float64) == "cuda"
    assert backends.auto_backend("cuda", "lora_linear", torch.float64) == "torch"


@pytest.mark.parametrize("backend", ["torch", "cpu", "cuda", "reference"])  # Triton runs 32- and 16-bit floats
def test_multi_lora_linear_float64_passes_gradcheck(backend, device):
    """float64 outputs and gradients keep float64 precision on every backend: the grouped ops' shrink results are
    float32, and with them gradcheck failed on the torch and cpu backends (a Jacobian mismatch for x)."""
    backend_or_skip(backend, device)
    ranks = [3, 1]
    lora_a, lora_b = (t.nan_to_num(0.0) for t in _adapters(2, 3, 8, 5, ranks, torch.float64, device))
    x, weight = randn(6, 8, dtype=torch.float64, device=device), randn(5, 8, dtype=torch.float64, device=device)
    ids = torch.tensor([0, 1, -1, 0, 1, 1], device=device)
    inputs = [t.requires_grad_(True) for t in (x, weight, lora_a, lora_b)]

    def fn(x, weight, lora_a, lora_b):
        return lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, [0.7, 1.3], ranks=ranks, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("backend", ["torch", "cpu", "cuda", "reference"])
def test_multi_lora_linear_float64_keeps_float64_scalings(backend, as_tensor, device):
    """Scalings not representable in float32 (1/3, 16/3), given as a list or a float64 tensor, are used in float64
    by float64 calls: rounded to float32 they left outputs and gradients 3e-8 off on every backend, the reference
    included (so comparing with it, and gradcheck, which differentiates the rounded function, did not see it). The
    expected values are written here token by token, not taken from the reference."""
    backend_or_skip(backend, device)
    ranks, scalings = [3, 2], [1 / 3, 16 / 3]
    lora_a, lora_b = _adapters(2, 3, 6, 5, ranks, torch.float64, device)
    x, weight = randn(5, 6, dtype=torch.float64, device=device), randn(5, 6, dtype=torch.float64, device=device)
    bias = randn(5, dtype=torch.float64, device=device)
    ids = torch.tensor([0, 1, -1, 1, 0], device=device)
    for leaf in (x, lora_a, lora_b):
        leaf.requires_grad_(True)
    given = torch.tensor(scalings, dtype=torch.float64, device=device) if as_tensor else scalings
    y = lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, given, bias, ranks=ranks, backend=backend)
    dy = randn(*y.shape, dtype=torch.float64, device=device)
    y.backward(dy)
    expected = x.detach() @ weight.T + bias
    d_x, d_a, d_b = dy @ weight, torch.zeros_like(lora_a), torch.zeros_like(lora_b)
    for t, slot in enumerate(ids.tolist()):
        if slot < 0:
            continue
        r, s = ranks[slot], scalings[slot]
        a, b, xt = lora_a.detach()[slot, :r], lora_b.detach()[slot, :, :r], x.detach()[t]
        expected[t] += s * (b @ (a @ xt))
        d_s = s * (b.T @ dy[t])
        d_x[t] += a.T @ d_s
        d_a[slot, :r] += torch.outer(d_s, xt)
        d_b[slot, :, :r] += s * torch.outer(dy[t], a @ xt)
    for what, out, ref in (("y", y, expected), ("dx", x.grad, d_x), ("d_lora_a", lora_a.grad, d_a),
                           ("d_lora_b", lora_b.grad, d_b)):
        err = (out.detach() - ref).norm() / ref.norm()
        assert err <= 1e-13, f"{what}: relative error {err:.2e} (float32 scalings give ~3e-8)"


@pytest.mark.parametrize("backend", GROUPED_BACKENDS + ["reference"])
def test_scalings_tensor_of_another_float_dtype_is_converted(backend, device):
    """A scalings tensor in float64 or float16 (a model config's) with float32 inputs: read as float32, as a list
    is (the kernels read a float32 array; the cpu ops refused a float64 one)."""
    backend_or_skip(backend, device)
    ranks = [3, 2]
    lora_a, lora_b = _adapters(2, 3, 6, 5, ranks, torch.float32, device)
    x, weight = randn(4, 6, device=device), randn(5, 6, device=device)
    ids = torch.tensor([0, 1, -1, 1], device=device)
    expected = lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, [0.5, 2.0], ranks=ranks, backend=backend)
    for dtype in (torch.float64, torch.float16):
        scalings = torch.tensor([0.5, 2.0], dtype=dtype, device=device)  # exact in each dtype
        got = lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, scalings, ranks=ranks, backend=backend)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", GROUPED_BACKENDS + ["reference"])
def test_multi_lora_linear_under_autocast(backend, device):
    """Under torch.autocast, fp32 weights and adapters compute in the autocast dtype, like F.linear: bit for bit the
    call on inputs cast by hand, with fp32 gradients for the fp32 adapters (the scalings stay fp32)."""
    backend_or_skip(backend, device)
    low, num_slots, max_rank, k, n = torch.bfloat16, 3, 8, 20, 12
    lora_a, lora_b = _adapters(num_slots, max_rank, k, n, [8, 8, 8], torch.float32, device)
    x = randn(7, k, device=device)
    weight = randn(n, k, device=device, scale=k ** -0.5)
    bias = randn(n, device=device)
    ids = segment_ids("mixed_base", 7, num_slots).to(device)
    scalings = torch.tensor([0.5, 1.0, 2.0], device=device)
    dy = randn(7, n, dtype=low, device=device)
    leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
    with torch.autocast(device.type, dtype=low):
        y = lk.multi_lora_linear(leaves[0], weight, leaves[1], leaves[2], ids, scalings, bias, backend=backend)
    y.backward(dy)
    cast = [t.to(low).requires_grad_(True) for t in (x, lora_a, lora_b)]
    y_cast = lk.multi_lora_linear(cast[0], weight.to(low), cast[1], cast[2], ids, scalings, bias.to(low),
                                  backend=backend)
    y_cast.backward(dy)
    assert y.dtype == low and torch.equal(y, y_cast)
    for name, leaf, cast_leaf in zip(("x", "lora_a", "lora_b"), leaves, cast):
        assert leaf.grad.dtype == torch.float32 and torch.equal(leaf.grad, cast_leaf.grad.float()), name


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_autocast_saves_no_weight_copy_when_x_needs_no_gradient(backend, device):
    """W is read by the backward only for dX. Under autocast it is a 16-bit copy [N, K]; saving it when x needs no
    gradient (a first layer's projections, whose input is a frozen embedding's output) kept one such copy per layer
    alive until the backward, as lora_linear's did before."""
    backend_or_skip(backend, device)
    num_slots, max_rank, m, k, n = 3, 4, 8, 32, 24
    lora_a, lora_b = _adapters(num_slots, max_rank, k, n, [4, 2, 4], torch.float32, device)
    lora_a.requires_grad_(True)
    lora_b.requires_grad_(True)
    weight = randn(n, k, device=device, scale=k ** -0.5)
    ids = segment_ids("mixed_base", m, num_slots).to(device)
    for x_needs_grad in (False, True):
        shapes = []

        def pack(tensor, shapes=shapes):
            shapes.append(tuple(tensor.shape))
            return tensor

        x = randn(m, k, device=device).requires_grad_(x_needs_grad)
        with torch.autocast(device.type, dtype=torch.bfloat16), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, [0.5, 1.0, 2.0], backend=backend)
        assert ((n, k) in shapes) == x_needs_grad, shapes
        y.float().sum().backward()
        assert lora_a.grad is not None and lora_b.grad is not None and (x.grad is not None) == x_needs_grad
        lora_a.grad = lora_b.grad = None


@pytest.mark.parametrize("op", ["multi_lora_linear", "lora_linear"])
@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_backward_inside_autocast_equals_backward_outside(op, backend, device):
    """A backward called inside torch.autocast (loss.backward() in the autocast block, as many training loops do)
    runs under it; its gradients are those of a backward outside it, bit for bit. On the cpu backend its 16-bit base
    GEMMs (dX, dW) stay on fp32 copies there too: autocast rounded them back to bf16 GEMMs, 40x slower on this
    project's CPU (the gradients came out the same: a bf16 GEMM accumulates in fp32 and rounds once too)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    backend_or_skip(backend, device)
    low, num_slots, rank, m, k, n = torch.bfloat16, 3, 4, 40, 32, 24
    x, weight = randn(m, k, device=device), randn(n, k, device=device, scale=k ** -0.5)
    lora_a, lora_b = randn(num_slots, rank, k, device=device), randn(num_slots, n, rank, device=device)
    ids = segment_ids("mixed_base", m, num_slots).to(device)
    dy = randn(m, n, dtype=low, device=device)

    class BaseGemmDtypes(TorchDispatchMode):  # operand dtypes of the [M, N] x [N, K] and [N, M] x [M, K] products
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default):
                a, b = args[-2:]
                if {tuple(a.shape), tuple(b.shape)} in ({(m, n), (n, k)}, {(n, m), (m, k)}):
                    self.seen.append((a.dtype, b.dtype))
            return func(*args, **(kwargs or {}))

    def gradients(backward_in_autocast):
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, lora_a, lora_b)]
        recorder = BaseGemmDtypes()
        with torch.autocast(device.type, dtype=low):
            if op == "lora_linear":
                y = lk.lora_linear(leaves[0], leaves[1], leaves[2][0], leaves[3][0], 2.0, backend=backend)
            else:
                y = lk.multi_lora_linear(*leaves, ids, [0.5, 1.0, 2.0], backend=backend)
            if backward_in_autocast:
                with recorder:
                    y.backward(dy)
        if not backward_in_autocast:
            y.backward(dy)
        return [leaf.grad for leaf in leaves], recorder.seen

    inside, base_gemms = gradients(True)
    outside, _ = gradients(False)
    for name, grad_inside, grad_outside in zip(("x", "weight", "lora_a", "lora_b"), inside, outside):
        assert torch.equal(grad_inside, grad_outside), name
    if backend == "cpu":
        assert len(base_gemms) == 2 and set(base_gemms) == {(torch.float32, torch.float32)}, base_gemms


def test_slots_absent_from_the_batch_get_zero_gradient():
    lora_a = torch.randn(3, 4, 6, requires_grad=True)
    lora_b = torch.randn(3, 5, 4, requires_grad=True)
    y = lk.multi_lora_linear(torch.randn(4, 6), torch.randn(5, 6), lora_a, lora_b, torch.tensor([0, 2, 2, -1]),
                             [1.0, 1.0, 1.0], backend="torch")
    y.sum().backward()
    assert torch.count_nonzero(lora_a.grad[1]) == 0 and torch.count_nonzero(lora_b.grad[1]) == 0
    assert torch.count_nonzero(lora_a.grad[0]) > 0 and torch.count_nonzero(lora_b.grad[2]) > 0


@pytest.mark.parametrize("path", ["float64", "create_graph", "reference"])
@pytest.mark.parametrize("factor", ["lora_a", "lora_b"])
def test_a_slot_absent_from_the_batch_gets_zero_gradient_with_nan_in_its_rank(path, factor):
    """An unused slot holding NaN/Inf within its rank (an unloaded slot): the autograd composition that float64,
    create_graph=True and the reference backend differentiate gave it NaN gradients (0·NaN), which clip_grad_norm_
    then spread over every slot; the kernels' path gave zeros (found by a review)."""
    dtype = torch.float64 if path == "float64" else torch.float32
    factors = {"lora_a": torch.randn(3, 4, 6, dtype=dtype), "lora_b": torch.randn(3, 5, 4, dtype=dtype)}
    factors[factor][1] = float("nan")
    factors[factor][1, 0, 0] = float("inf")
    lora_a, lora_b = (factors[name].requires_grad_() for name in ("lora_a", "lora_b"))
    y = lk.multi_lora_linear(torch.randn(4, 6, dtype=dtype), torch.randn(5, 6, dtype=dtype), lora_a, lora_b,
                             torch.tensor([0, 2, 2, -1]), [1.0, 1.0, 1.0],
                             backend="reference" if path == "reference" else "torch")
    grads = torch.autograd.grad(y.sum(), (lora_a, lora_b), create_graph=path == "create_graph")
    assert torch.isfinite(y).all()
    for grad in grads:
        assert torch.count_nonzero(grad[1]) == 0
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_selective_activation_checkpointing_that_saves_matmuls_trains_the_slots(backend, device):
    """Selective activation checkpointing with a policy that saves matmul outputs (torchtitan's saves aten.mm): the
    base GEMM's output is cached, and the grouped forward added the LoRA term into it in place, so the backward
    raised "Tensor cached during selective activation checkpoint has been mutated" (helper 281). Outputs and
    gradients now equal those without checkpointing."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
    backend_or_skip(backend, device)
    saved = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    torch.manual_seed(0)
    layer = lk.MultiLoRALinear(nn.Linear(8, 6), max_adapters=2, max_rank=2, backend=backend).to(device)
    for slot in range(2):
        layer.set_adapter(slot, torch.randn(2, 8), torch.randn(6, 2), 1.5)
    layer.lora_a.requires_grad_(True)
    layer.lora_b.requires_grad_(True)
    ids = torch.tensor([0, 1, -1, 0], device=device)
    results = []
    for checkpointed in (False, True):
        x = torch.randn(4, 8, device=device, generator=torch.Generator(device).manual_seed(1)).requires_grad_()
        y = (checkpoint(layer, x, ids, use_reentrant=False,
                        context_fn=functools.partial(create_selective_checkpoint_contexts, policy))
             if checkpointed else layer(x, ids))
        y.square().sum().backward()
        results.append([y.detach(), x.grad, layer.lora_a.grad.clone(), layer.lora_b.grad.clone()])
        layer.lora_a.grad = layer.lora_b.grad = None
    for name, plain, checkpointed in zip(("y", "dx", "dA", "dB"), *results):
        assert torch.equal(plain, checkpointed), name


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_recomputes_under_the_forwards_adapter_names_or_raises(use_reentrant, tmp_path):
    """set_batch_adapters + activation checkpointing: the backward reruns the forward with the names in effect then.
    Inside the forward's `with` (or another with the same names) that gives the forward's gradients; under names no
    forward ran with it computed another mix's gradients without a word (1.35 relative error), and with no names it
    blamed the forward. Both raise now, naming the recompute."""
    from torch.utils.checkpoint import checkpoint
    base = nn.Sequential(nn.Linear(8, 8))
    for name in "ab":
        torch.manual_seed(ord(name))
        adapter = lk.inject_lora(copy.deepcopy(base), ["0"], r=2, lora_alpha=2, init_lora_weights=False)
        lk.save_peft_adapter(adapter, tmp_path / name)
    model = lk.prepare_multi_adapter(copy.deepcopy(base), ["0"], max_adapters=2, max_rank=2)
    for name in "ab":
        lk.load_peft_adapter(model, tmp_path / name, adapter_name=name)
    model[0].lora_a.requires_grad_(True)
    x = torch.randn(2, 8, requires_grad=use_reentrant)  # reentrant checkpointing needs an input that requires grad

    def loss_under(names, checkpointed):
        model.zero_grad()
        with lk.set_batch_adapters(model, names):
            y = checkpoint(model, x, use_reentrant=use_reentrant) if checkpointed else model(x)
        return y.square().sum()

    loss_under(["a", "b"], checkpointed=False).backward()
    want = model[0].lora_a.grad.clone()
    loss = loss_under(["a", "b"], checkpointed=True)
    with lk.set_batch_adapters(model, ["a", "b"]):
        loss.backward()
    torch.testing.assert_close(model[0].lora_a.grad, want)
    # forwards under other names between a forward and its backward (evaluation or logging passes, here of 1, 2, ...
    # rows): the layers remember the names of their last _RECENT_FORWARDS forwards, so the recompute still finds
    # the training one; after that many it is forgotten, and refused rather than guessed
    def other_forwards(count):
        with torch.no_grad():
            for rows in range(1, count + 1):
                with lk.set_batch_adapters(model, ["b"] * rows):
                    model(torch.randn(rows, 8))

    for count in (1, modules._RECENT_FORWARDS - 1):
        loss = loss_under(["a", "b"], checkpointed=True)
        other_forwards(count)
        model.zero_grad()
        with lk.set_batch_adapters(model, ["a", "b"]):
            loss.backward()
        torch.testing.assert_close(model[0].lora_a.grad, want)
    loss = loss_under(["a", "b"], checkpointed=True)
    other_forwards(modules._RECENT_FORWARDS)
    with lk.set_batch_adapters(model, ["a", "b"]), pytest.raises(RuntimeError, match="which no recent forward ran"):
        loss.backward()
    loss = loss_under(["a", "b"], checkpointed=True)
    with lk.set_batch_adapters(model, ["b", "a"]), pytest.raises(
            RuntimeError, match=r"recomputes this layer's forward \(activation checkpointing\) under adapter names "
                                r"\('b', 'a'\), which no recent forward ran with"):
        loss.backward()
    loss = loss_under(["a", "b"], checkpointed=True)
    with pytest.raises(RuntimeError, match="recomputes this layer's forward .* with no set_batch_adapters in effect"):
        loss.backward()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_adapters_trained_in_one_batch_match_each_trained_alone(backend, optimizer, tmp_path):
    """Three adapters of ranks 4, 1 and 3 (in rank-4 slots, a fourth slot empty) trained in one batch of a prepared
    2-layer model: per-row losses summed, 2 micro-batches accumulated per step, some rows base only, adapter "b"
    absent from every other step. Each adapter ends where a float64 LoRALinear model trained on its rows alone ends,
    and the padding past each rank and the empty slot stay exactly zero. Plain SGD matches a separate run that skips
    the steps without "b"; AdamW (README, "Several adapters in one model") still moves "b" there (a zero gradient
    of the shared slot Parameter, with momentum and weight decay): it matches a run that steps with zero gradients."""
    backend_or_skip(backend, "cpu")
    ranks, max_rank, steps = {"a": 4, "b": 1, "c": 3}, 4, 4 if backend == "triton" else 8

    def base_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))

    def make_optimizer(params):
        return (torch.optim.SGD(params, lr=0.02) if optimizer == "sgd"
                else torch.optim.AdamW(params, lr=0.01, weight_decay=0.1))

    joint = lk.prepare_multi_adapter(base_model(), ["0", "2"], max_adapters=4, max_rank=max_rank, backend=backend)
    alone = {}  # name -> {"zero": (model, optimizer), "skip": (model, optimizer)}
    for i, (name, r) in enumerate(ranks.items()):
        torch.manual_seed(1 + i)
        model = lk.inject_lora(base_model(), ["0", "2"], r=r, lora_alpha=2 * r + i, init_lora_weights=False,
                               backend="torch")
        lk.save_peft_adapter(model, tmp_path / name)
        lk.load_peft_adapter(joint, tmp_path / name, adapter_name=name, backend=backend)
        copies = [model.double(), copy.deepcopy(model.double())]
        alone[name] = {kind: (m, make_optimizer([p for p in m.parameters() if p.requires_grad]))
                       for kind, m in zip(("zero", "skip"), copies)}
    layers = {name: m for name, m in joint.named_modules() if isinstance(m, lk.MultiLoRALinear)}
    params = [p.requires_grad_(True) for m in layers.values() for p in (m.lora_a, m.lora_b)]
    joint_optimizer = make_optimizer(params)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        names = ["a", "c", "__base__", "a"] + (["b", "c"] if step % 2 else ["c", "__base__"])
        micro = [(names[j::2], torch.randn(3, 2, 6, generator=g, dtype=torch.float64),
                  torch.randn(3, 2, 5, generator=g, dtype=torch.float64)) for j in range(2)]
        for rows, x, target in micro:
            with lk.set_batch_adapters(joint, rows):
                (joint(x.float()) - target).square().sum().backward()
        joint_optimizer.step()
        joint_optimizer.zero_grad(set_to_none=step % 2 == 0)
        for name, runs in alone.items():
            for kind, (model, opt) in runs.items():
                picked = [([i for i, n in enumerate(rows) if n == name], x, t) for rows, x, t in micro]
                if not any(idx for idx, _, _ in picked):
                    if kind == "skip":
                        continue
                    for p in opt.param_groups[0]["params"]:
                        p.grad = torch.zeros_like(p)
                for idx, x, target in picked:
                    if idx:
                        (model(x[idx]) - target[idx]).square().sum().backward()
                opt.step()
                opt.zero_grad()
    slots = joint.lora_adapter_slots
    assert sorted(slots.values()) == [0, 1, 2]  # slot 3 stays empty
    for path, layer in layers.items():
        a, b = layer.lora_a.detach(), layer.lora_b.detach()
        for name, r in ranks.items():
            slot = slots[name]
            for kind, (model, _) in alone[name].items():
                ref = model.get_submodule(path)
                pairs = ((a[slot, :r], ref.lora_A.weight), (b[slot, :, :r], ref.lora_B.weight))
                errors = [rel_error(out, expected) for out, expected in pairs]
                if kind == "skip" and name == "b" and optimizer == "adamw":
                    assert min(errors) > 1e-3, f"{path} {name}: AdamW skipped the absent adapter's steps"
                else:
                    assert max(errors) < 1e-5, f"{path} {name} vs {kind}: relative errors {errors}"
            assert not a[slot, r:].any() and not b[slot, :, r:].any(), f"{path} {name}: padding changed"
        assert not a[3].any() and not b[3].any(), f"{path}: the empty slot changed"


@pytest.mark.parametrize("ids", [[-1, -1, -1], []], ids=["all_base", "no_tokens"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
def test_a_batch_without_adapter_tokens_gives_zero_adapter_gradients(backend, ids):
    """Only the adapters require grad and no token uses one (or there are no tokens): backward gives them zero
    gradients on every backend. The reference backend's output did not depend on them there, so backward raised
    "element 0 of tensors does not require grad"."""
    backend_or_skip(backend, "cpu")
    lora_a = torch.randn(2, 3, 4, requires_grad=True)
    lora_b = torch.randn(2, 5, 3, requires_grad=True)
    y = lk.multi_lora_linear(torch.randn(len(ids), 4), torch.randn(5, 4), lora_a, lora_b,
                             torch.tensor(ids, dtype=torch.int64), [1.0, 2.0], backend=backend)
    y.sum().backward()
    assert torch.count_nonzero(lora_a.grad) == 0 and torch.count_nonzero(lora_b.grad) == 0


def test_reference_base_tokens_take_no_slot_scaling():
    """The reference's token without an adapter adds a rank-0 product and no slot's scaling: an inf scaling in slot 0
    (unchecked for CUDA tensors) left a base token NaN there (0·inf)."""
    x, weight = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    lora_a, lora_b = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    y = reference.multi_lora_linear_autograd(x, weight, lora_a, lora_b, torch.tensor([-1, 1, -1]),
                                             torch.tensor([float("inf"), 2.0], dtype=torch.float64))
    torch.testing.assert_close(y[[0, 2]], (x @ weight.T)[[0, 2]], rtol=0, atol=0)
    assert torch.isfinite(y[1]).all()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_multi_lora_linear_module(backend):
    backend_or_skip(backend, "cpu")
    base = nn.Linear(16, 10)
    layer = lk.MultiLoRALinear(base, max_adapters=4, max_rank=8, backend=backend)
    assert not base.weight.requires_grad and not base.bias.requires_grad  # frozen, as in LoRALinear
    adapters = {0: (torch.randn(8, 16), torch.randn(10, 8), 0.5), 2: (torch.randn(3, 16), torch.randn(10, 3), 2.0)}
    for slot, (a, b, s) in adapters.items():
        layer.set_adapter(slot, a, b, s)
    x = torch.randn(2, 3, 16)
    ids = torch.tensor([[0, 2, -1], [1, 2, 0]])  # slot 1 is empty: base only
    y = layer(x, ids)
    for pos in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]:
        slot = int(ids[pos])
        expected = base(x[pos])
        if slot in adapters:
            a, b, s = adapters[slot]
            expected = expected + s * (b @ (a @ x[pos]))
        torch.testing.assert_close(y[pos], expected, rtol=1e-4, atol=1e-4)
    layer.clear_adapter(2)
    torch.testing.assert_close(layer(x, ids)[0, 1], base(x[0, 1]), rtol=1e-5, atol=1e-5)


def test_set_adapter_is_atomic_and_checks_input():
    layer = lk.MultiLoRALinear(nn.Linear(8, 6), max_adapters=2, max_rank=4)
    layer.set_adapter(0, torch.randn(2, 8), torch.randn(6, 2), 1.0)
    before = [t.detach().clone() for t in (layer.lora_a, layer.lora_b, layer.scalings, layer.ranks)]
    for bad, error, message in [
        ((0, torch.randn(5, 8), torch.randn(6, 5), 1.0), ValueError, r"1 <= r <= 4"),
        ((0, torch.randn(2, 8), torch.randn(6, 3), 1.0), ValueError, r"lora_b expected shape \[6, 2\]"),
        ((2, torch.randn(2, 8), torch.randn(6, 2), 1.0), ValueError, r"slot expected an int in \[0, 2\)"),
        ((0, torch.ones(2, 8, dtype=torch.int64), torch.randn(6, 2), 1.0), TypeError, "2-D floating tensor"),
        ((0, torch.randn(2, 8), torch.randn(6, 2), "big"), TypeError, "scaling expected a number, got 'big'"),
        ((0, torch.randn(2, 8), torch.randn(6, 2), float("inf")), ValueError, "scaling expected a finite number"),
        ((0, torch.randn(2, 8), torch.randn(6, 2), float("nan")), ValueError, "scaling expected a finite number"),
        ((0, torch.randn(2, 8).to_sparse(), torch.randn(6, 2), 1.0), TypeError,
         r"lora_a expected a dense \(strided\) tensor, got layout torch.sparse_coo"),
        # finite, but not in the slots' float32: the factors were written before the scaling's store failed
        ((0, torch.randn(2, 8), torch.randn(6, 2), 1e39), ValueError,
         r"scaling expected a finite number in the range of the slots' torch.float32, got 1e\+39"),
        ((True, torch.randn(2, 8), torch.randn(6, 2), 1.0), ValueError, r"slot expected an int in \[0, 2\), got True"),
        ((-1, torch.randn(2, 8), torch.randn(6, 2), 1.0), ValueError, r"slot expected an int in \[0, 2\), got -1"),
        ((0, torch.randn(8), torch.randn(6, 2), 1.0), TypeError, r"lora_a expected a 2-D floating tensor, got "
                                                                 r"torch.float32 tensor of shape \(8,\)"),
        ((0, torch.randn(2, 8), torch.randn(6, 2, 1), 1.0), TypeError, "lora_b expected a 2-D floating tensor"),
        ((0, [[0.0] * 8] * 2, torch.randn(6, 2), 1.0), TypeError, "lora_a expected a 2-D floating tensor, got list"),
        ((0, torch.randn(0, 8), torch.randn(6, 0), 1.0), ValueError, r"1 <= r <= 4, got \(0, 8\)"),
        ((0, torch.randn(2, 6), torch.randn(6, 2), 1.0), ValueError, r"lora_a expected shape \[r, 8\]"),
        ((0, torch.randn(2, 8), torch.randn(5, 2), 1.0), ValueError, r"lora_b expected shape \[6, 2\]"),
        ((0, torch.randn(2, 8), torch.randn(6, 2), True), TypeError, "scaling expected a number, got True"),
        ((0, torch.randn(2, 8), torch.randn(6, 2), torch.tensor(True)), TypeError, "scaling expected a number"),
        ((0, torch.randn(2, 8), torch.randn(6, 2), pytest.importorskip("numpy").bool_(True)), TypeError,
         "scaling expected a number, got"),
        ((0, torch.randn(2, 8), torch.randn(6, 2), "2.0"), TypeError, "scaling expected a number, got '2.0'"),
        ((0, torch.randn(2, 8), torch.randn(6, 2), None), TypeError, "scaling expected a number, got None"),
        ((0, torch.randn(2, 8), torch.randn(6, 2), torch.ones(2)), TypeError, "scaling expected a number"),
        ((0, torch.randn(2, 8), torch.randn(6, 2), torch.ones((), device="meta")), TypeError,
         "scaling expected a number"),
    ]:
        with pytest.raises(error, match=message):
            layer.set_adapter(*bad)
    for old, new in zip(before, (layer.lora_a, layer.lora_b, layer.scalings, layer.ranks)):
        assert torch.equal(old, new)
    layer.set_adapter(1, torch.randn(4, 8), torch.randn(6, 4), torch.tensor(0.5))  # r = max_rank, a tensor scaling
    assert layer.ranks.tolist() == [2, 4] and layer.scalings.tolist() == [1.0, 0.5]
    for bad in (2, -1, True):
        with pytest.raises(ValueError, match=rf"clear_adapter: slot expected an int in \[0, 2\), got {bad}"):
            layer.clear_adapter(bad)
    assert layer.ranks.tolist() == [2, 4]
    layer.clear_adapter(1)  # rank 0, scaling 0 and zero factors (what a state dict shows), slot 0 untouched
    assert layer.ranks.tolist() == [2, 0] and layer.scalings.tolist() == [1.0, 0.0]
    assert torch.count_nonzero(layer.lora_a[1]) == torch.count_nonzero(layer.lora_b[1]) == 0
    assert torch.equal(layer.lora_a[0], before[0][0]) and torch.equal(layer.lora_b[0], before[1][0])


def test_a_new_layer_is_frozen_in_its_base_layers_mode_and_needs_adapter_ids():
    """Every Parameter of a new MultiLoRALinear is frozen (the base layer's; the slots until requires_grad_(True)
    trains them), it takes the base layer's train/eval mode, and forward(x) without adapter_ids says what it needs."""
    for training in (True, False):
        base = nn.Linear(8, 6).train(training)
        layer = lk.MultiLoRALinear(base, max_adapters=2, max_rank=4)
        assert [name for name, p in layer.named_parameters() if p.requires_grad] == []
        assert layer.training is training
    with pytest.raises(RuntimeError, match=r"forward\(x\) without adapter_ids needs the per-row adapters set first"):
        layer(torch.randn(3, 8))
    with pytest.raises(TypeError, match="x expected a torch.Tensor, got list"):  # named, not an AttributeError
        layer([[1.0] * 8], torch.zeros(1, dtype=torch.long))
    # the dtypes the grouped ops take as they are (int64 ranks would be range-checked and cast on every forward), also
    # on a 16-bit model: a bfloat16 scaling would round 16 / 24 to 0.66797
    half = lk.MultiLoRALinear(nn.Linear(8, 6).to(torch.bfloat16), max_adapters=2, max_rank=4)
    half.set_adapter(0, torch.randn(2, 8), torch.randn(6, 2), 16 / 24)
    assert half.ranks.dtype == torch.int32 and half.scalings[0].item() == torch.tensor(16 / 24).item()


def test_slot_rows_past_the_rank_are_never_read():
    """design.md: entries of a slot's lora_a/lora_b beyond its rank are never read (a state dict or a stacking
    consumer may leave garbage there), so NaN past the rank leaves the output as the rank-r adapter gives it."""
    layer = lk.MultiLoRALinear(nn.Linear(8, 6), max_adapters=2, max_rank=4)
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    layer.set_adapter(0, a, b, 0.5)
    with torch.no_grad():
        layer.lora_a[0, 2:] = float("nan")
        layer.lora_b[0, :, 2:] = float("nan")
    x = torch.randn(3, 8)
    expected = layer.base_layer(x) + 0.5 * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x, torch.zeros(3, dtype=torch.long)), expected)


def test_a_smaller_adapter_in_a_used_slot_leaves_zeros_past_its_rank():
    """A slot's rows past its rank are zeros after set_adapter, not the previous adapter's: our kernels never read
    them, but a consumer of the stacked lora_a/lora_b that computes at the max rank (vLLM's layout) or a state dict
    read elsewhere would."""
    layer = lk.MultiLoRALinear(nn.Linear(8, 6), max_adapters=2, max_rank=4)
    layer.set_adapter(1, torch.randn(4, 8), torch.randn(6, 4), 1.0)
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    layer.set_adapter(1, a, b, 0.5)
    assert torch.equal(layer.lora_a[1], torch.cat([a, torch.zeros(2, 8)]))
    assert torch.equal(layer.lora_b[1], torch.cat([b, torch.zeros(6, 2)], dim=1))


def test_grouped_bad_input():
    x, lora_a, lora_b = torch.randn(4, 6), torch.randn(2, 3, 6), torch.randn(2, 5, 3)
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, -1, 0]), 2)
    with pytest.raises(ValueError, match=r"scalings expected shape \[2\]"):
        lk.ops.lora_shrink(x, lora_a, batch, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"lora_shrink: scalings expected finite numbers, got nan"):
        lk.ops.lora_shrink(x, lora_a, batch, [1.0, float("nan")])
    with pytest.raises(ValueError, match=r"multi_lora_linear: scalings expected finite numbers, got inf"):
        lk.multi_lora_linear(x, torch.randn(5, 6), lora_a, lora_b, torch.tensor([0, 1, -1, 0]),
                             torch.tensor([float("inf"), 1.0]))
    # float64 1e39 is finite, and infinite in the float32 the kernels read; a list's, cast to float32 before its
    # check, was named as "got inf"
    for scalings in (torch.tensor([1.0, 1e39], dtype=torch.float64), [1.0, 1e39]):
        with pytest.raises(ValueError, match=r"lora_shrink: scalings expected finite numbers in torch.float32's "
                                             r"range, got 1e\+39"):
            lk.ops.lora_shrink(x, lora_a, batch, scalings)
    with pytest.raises(ValueError, match=r"lora_shrink: scalings expected finite numbers, got inf"):  # read once
        lk.ops.lora_shrink(x, lora_a, batch, (s for s in [1.0, 1e39]))
    with pytest.raises(ValueError, match=r"ranks expected values in \[0, 3\]"):
        lk.ops.lora_shrink(x, lora_a, batch, [1.0, 1.0], [3, 4])
    with pytest.raises(ValueError, match="batch was built for 4 tokens, but x has 3 rows"):
        lk.ops.lora_shrink(x[:3], lora_a, batch, [1.0, 1.0])
    with pytest.raises(ValueError, match=r"x expected shape \[M, 6\]"):
        lk.ops.lora_shrink(x[:, :5], lora_a, batch, [1.0, 1.0])
    with pytest.raises(TypeError, match="lora_a expected dtype torch.float32"):
        lk.ops.lora_shrink(x, lora_a.half(), batch, [1.0, 1.0])
    with pytest.raises(ValueError, match=r"out expected at least 7 columns"):
        lk.ops.lora_expand(torch.zeros(4, 3), lora_b, batch, torch.zeros(4, 6), slice_offset=2)
    with pytest.raises(ValueError, match="adapter_ids expected shape"):
        lk.multi_lora_linear(x, torch.randn(5, 6), lora_a, lora_b, torch.tensor([0, 1]), [1.0, 1.0])
    # arguments of the wrong kind are named too, not left to Python's own error
    with pytest.raises(TypeError, match=r"scalings expected a float tensor \[L\] or a sequence of numbers, got 1\.0"):
        lk.ops.lora_shrink(x, lora_a, batch, 1.0)
    with pytest.raises(TypeError, match=r"ranks expected an integer tensor \[L\] or a sequence of ints, "
                                        r"got \['a', 2\]"):
        lk.ops.lora_shrink(x, lora_a, batch, [1.0, 1.0], ["a", 2])
    # flags are not numbers (a list of bools had run as scalings 1.0 and 0.0), numpy's and tensors' too
    numpy = pytest.importorskip("numpy")
    for flags in ([True, False], [1.0, numpy.bool_(True)], [torch.tensor(True), 1.0], [numpy.array(True), 1.0]):
        with pytest.raises(TypeError, match=r"scalings expected a float tensor \[L\] or a sequence of numbers"):
            lk.ops.lora_shrink(x, lora_a, batch, flags)
    with pytest.raises(TypeError, match=r"ranks expected an integer tensor \[L\] or a sequence of ints"):
        lk.ops.lora_shrink(x, lora_a, batch, [1.0, 1.0], [numpy.bool_(True), 2])
    with pytest.raises(ValueError, match="batch was built for 4 tokens, but out has 3 rows"):
        lk.ops.lora_expand(torch.zeros(3, 3), lora_b, batch, torch.zeros(3, 5))
    with pytest.raises(TypeError, match="lora_a_slices expected a list of tensors or one stacked tensor, got int"):
        lk.ops.add_lora(torch.zeros(4, 5), x, 3, [lora_b], batch, [1.0, 1.0], None, [5])
    with pytest.raises(TypeError, match="output_slices expected a sequence of ints >= 0, got None"):
        lk.ops.add_lora(torch.zeros(4, 5), x, [lora_a], [lora_b], batch, [1.0, 1.0], None, None)


def test_multi_lora_linear_id_errors_name_it():
    """Bad adapter ids given to multi_lora_linear (or MultiLoRALinear.forward, which calls it) are named as that
    function's argument, not as LoRABatch.from_adapter_ids', which the user did not call."""
    layer = lk.MultiLoRALinear(nn.Linear(6, 5), max_adapters=2, max_rank=3)
    x = torch.randn(3, 6)
    for call in (lambda ids: layer(x, ids),
                 lambda ids: lk.multi_lora_linear(x, torch.randn(5, 6), torch.randn(2, 3, 6), torch.randn(2, 5, 3),
                                                  ids, [1.0, 1.0])):
        with pytest.raises(ValueError, match=r"^multi_lora_linear: adapter_ids expected values in \[-1, 2\), got 2"):
            call(torch.tensor([0, 2, -1]))
        with pytest.raises(TypeError, match=r"^multi_lora_linear: adapter_ids expected an integer dtype"):
            call(torch.tensor([0.0, 1.0, 1.0]))


@pytest.mark.parametrize("case", ["no_slots", "0-D_x", "ids_shaped_like_a_prefix", "base_linear_float64_triton"])
def test_multi_lora_linear_bad_input_names_the_argument(case):
    """multi_lora_linear's own checks, each of which a later error hid (or nothing did): zero slots ([L >= 1] of
    lora_a), a 0-D x (x.shape[-1] was an IndexError), adapter ids shaped like a prefix of x.shape[:-1] (zip compared
    their common dims only: the ids' dim count is checked too) and multi_lora_base_linear's float64 on the triton
    backend (refused as multi_lora_linear refuses it; the base GEMM alone would have run it, so a layer of a batch
    without adapters took float64 where the next batch raised)."""
    x, weight, lora_a, lora_b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 3, 4), torch.randn(2, 5, 3)
    ids, scalings = torch.tensor([0, 1, -1]), [1.0, 1.0]
    if case == "no_slots":
        lora_a, lora_b, scalings = lora_a[:0], lora_b[:0], torch.ones(0)
        error, message = ValueError, "multi_lora_linear: lora_a expected shape [L >= 1, R, 4]"
    elif case == "0-D_x":
        x, ids = torch.tensor(1.0), torch.tensor(0)
        error, message = ValueError, "multi_lora_linear: x expected shape [..., 4]"
    elif case == "ids_shaped_like_a_prefix":
        x, ids = torch.randn(2, 3, 4), torch.tensor([0, 1])
        error, message = ValueError, "multi_lora_linear: adapter_ids expected shape (2, 3) (x.shape[:-1]), got (2,)"
    else:
        backend_or_skip("triton", "cpu")
        with pytest.raises(TypeError, match=r"multi_lora_linear: the triton backend runs float32/float16/bfloat16, "
                                            r"got torch\.float64"):
            functional.multi_lora_base_linear(x.double(), weight.double(), backend="triton")
        return
    with pytest.raises(error, match=re.escape(message)):
        lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, scalings, backend="torch")


def test_add_lora_errors_name_its_output_y():
    """add_lora's output argument is y; its expand checks, shared with lora_expand, named it "out", an argument
    add_lora does not have (a 16-bit y with float32 lora_b read "expected dtype torch.bfloat16 (same as out)")."""
    x, lora_a, lora_b = torch.randn(4, 6), torch.randn(2, 3, 6), torch.randn(2, 5, 3)
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, -1, 0]), 2)
    with pytest.raises(TypeError, match=r"add_lora: lora_b_slices\[0\] expected dtype torch.bfloat16 \(same as y\)"):
        lk.ops.add_lora(torch.zeros(4, 5, dtype=torch.bfloat16), x, [lora_a], [lora_b], batch, [1.0, 1.0], None, [5])
    with pytest.raises(ValueError, match="add_lora: batch was built for 4 tokens, but y has 3 rows"):
        lk.ops.add_lora(torch.zeros(3, 5), x, [lora_a], [lora_b], batch, [1.0, 1.0], None, [5])
    with pytest.raises(TypeError, match=r"lora_expand: lora_b expected dtype torch.bfloat16 \(same as out\)"):
        lk.ops.lora_expand(torch.zeros(4, 3), lora_b, batch, torch.zeros(4, 5, dtype=torch.bfloat16))


def test_torch_compile_fullgraph_multi_lora_linear():
    weight, lora_a, lora_b = torch.randn(10, 16), torch.randn(3, 4, 16), torch.randn(3, 10, 4)
    scalings, ranks = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([4, 2, 1], dtype=torch.int32)
    x = torch.randn(6, 16)
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, 2, -1, 1, 0]), 3)

    def step(x, batch):
        return lk.multi_lora_linear(x, weight, lora_a, lora_b, batch, scalings, ranks=ranks, backend="torch")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, batch), step(x, batch))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_torch_compile_fullgraph_multi_adapter_training(backend):
    """Trainable slots through a compiled MultiLoRALinear: the forward's check for inference-mode batch buffers
    (Tensor.is_inference, which dynamo cannot trace) broke fullgraph=True."""
    backend_or_skip(backend, torch.device("cpu"))
    layer = lk.MultiLoRALinear(nn.Linear(16, 10), max_adapters=3, max_rank=4, backend=backend)
    for slot in range(3):
        layer.set_adapter(slot, randn(4, 16), randn(10, 4), scaling=1.0 + slot)
    layer.lora_a.requires_grad_(True)
    layer.lora_b.requires_grad_(True)
    x, ids = randn(6, 16), torch.tensor([0, 1, 2, -1, 1, 0])
    torch.compile(layer, fullgraph=True, backend="aot_eager")(x, ids).square().sum().backward()
    compiled_grads = [layer.lora_a.grad.clone(), layer.lora_b.grad.clone()]
    layer.lora_a.grad = layer.lora_b.grad = None
    layer(x, ids).square().sum().backward()
    # float32 sums in another order: traced, the torch backend masks every slot over all tokens (it cannot read the
    # slots on the host); eager, it gathers each slot's tokens (2.4e-6 relative apart on an Intel Xeon)
    torch.testing.assert_close(compiled_grads, [layer.lora_a.grad, layer.lora_b.grad], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_compiled_bf16_slot_gradients_sum_in_float32_on_cpu_as_eager(backend):
    """Float32 slots of a bf16 layer trained compiled on CPU: traced, the CPU tensors took the GPU branch of
    _segment_outer_sum, which rounds the float32 u = s·dY·B and S to bf16 before its GEMMs: slot gradients ~2e-3
    (relative) off eager's float32 sums, where README promises float32 sums off GPUs (helper 132)."""
    backend_or_skip(backend, torch.device("cpu"))
    torch._dynamo.reset()
    eager = lk.MultiLoRALinear(nn.Linear(32, 24).to(torch.bfloat16), 2, 4, backend=backend,
                               adapter_dtype=torch.float32)
    eager.set_adapter(0, randn(4, 32), randn(24, 4), 2.0)
    eager.set_adapter(1, randn(3, 32), randn(24, 3), 0.5)
    eager.lora_a.requires_grad_(True)
    eager.lora_b.requires_grad_(True)
    traced = copy.deepcopy(eager)
    x, dy = randn(6, 32, dtype=torch.bfloat16), randn(6, 24, dtype=torch.bfloat16)
    ids = torch.tensor([0, 1, 1, -1, 0, 1])
    eager(x, ids).backward(dy)
    torch.compile(traced, backend="aot_eager", fullgraph=True)(x, ids).backward(dy)
    for name in ("lora_a", "lora_b"):
        want, got = getattr(eager, name).grad, getattr(traced, name).grad
        assert got.dtype == want.dtype == torch.float32
        relative = float((got - want).norm() / want.norm())
        assert relative <= 1e-5, f"{name}: compiled gradient {relative:.2e} (relative) off eager's"


@pytest.mark.parametrize("offset", [0, 1], ids=["at_the_bound", "past_it"])
def test_cpu_16_bit_base_gemm_widens_past_the_decode_bound_only(offset):
    """The cpu backend's 16-bit multi_lora_linear runs its base GEMM in 16 bits up to CPU_DECODE_MAX_M rows (decode,
    as lora_fwd_cpu's kDecodeMaxM) and on fp32 copies past it (ATen's 16-bit GEMMs without bf16 units ran 12-64x
    slower: functional._cpu_widens). Either GEMM gives the reference's y within bf16's tolerance, so the output
    checks passed with the choice inverted or the bound moved by one; here the dtype of the [M, N] product is."""
    backend_or_skip("cpu", "cpu")
    from torch.utils._python_dispatch import TorchDispatchMode
    m, k, n = functional.CPU_DECODE_MAX_M + offset, 8, 6

    class BaseProductDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.linear) \
                    and tuple(out.shape) == (m, n):
                self.dtypes.append(out.dtype)
            return out

    lora_a, lora_b = _adapters(2, 3, k, n, [3, 2], torch.bfloat16, "cpu")
    x, weight = randn(m, k, dtype=torch.bfloat16), randn(n, k, dtype=torch.bfloat16)
    with BaseProductDtypes() as products:
        lk.multi_lora_linear(x, weight, lora_a, lora_b, torch.arange(m) % 3 - 1, [1.0, 2.0], backend="cpu")
    assert products.dtypes == [torch.float32 if offset else torch.bfloat16], products.dtypes


def test_torch_compile_dynamic_token_count_across_the_cpu_decode_bound_compiles_once():
    """The cpu backend runs a 16-bit forward's base GEMM in 16 bits up to CPU_DECODE_MAX_M rows and on fp32 copies
    above. The choice was a Python comparison of the traced token count, on which dynamo guarded: with dynamic=True
    the first count on the other side of the bound compiled the graph again (tests/test_compile_fuzz.py)."""
    backend_or_skip("cpu", torch.device("cpu"))
    from lora_kernels.functional import CPU_DECODE_MAX_M
    torch._dynamo.reset()
    layer = lk.MultiLoRALinear(nn.Linear(16, 10, dtype=torch.bfloat16), max_adapters=2, max_rank=4, backend="cpu")
    for slot in range(2):
        layer.set_adapter(slot, randn(4, 16), randn(10, 4), scaling=1.0 + slot)
    layer.lora_a.requires_grad_(True)
    graphs = []
    compiled = torch.compile(layer, fullgraph=True, dynamic=True,
                             backend=lambda gm, example_inputs: graphs.append(gm) or gm.forward)
    generator = torch.Generator().manual_seed(5)
    for tokens in (CPU_DECODE_MAX_M - 9, CPU_DECODE_MAX_M + 20, CPU_DECODE_MAX_M - 5):
        x, ids = randn(tokens, 16, dtype=torch.bfloat16), torch.randint(-1, 2, (tokens,), generator=generator)
        results = []
        for run in (layer, compiled):
            y = run(x, ids)
            results.append([y, torch.autograd.grad(y.float().square().sum(), layer.lora_a)[0]])
        for name, got, want in zip(("y", "dA"), results[1], results[0]):
            assert_close(got, want, torch.bfloat16, f"{name} at {tokens} tokens")
    assert len(graphs) == 1, f"{len(graphs)} graphs"


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_compiled_shrink_keeps_zeros_past_each_rank_for_an_inf_token(backend, device):
    """lora_shrink's output is zero past each slot's rank (a serving stack may read all R columns). The slot-masked
    torch loop that the torch and reference backends run when traced (the torch backend on GPUs always) multiplied an
    Inf token by A's zeroed padding rows: NaN there, where eager CPU and the kernels give 0."""
    torch._dynamo.reset()
    lora_a, _ = _adapters(2, 4, 8, 3, [2, 4], torch.float32, device)
    x = randn(4, 8, device=device)
    x[1, 2] = float("inf")  # token 1 is slot 0's, of rank 2
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 0, 1, -1], device=device), 2)
    ranks = torch.tensor([2, 4], device=device)
    shrink = torch.compile(lambda x: lk.ops.lora_shrink(x, lora_a, batch, [1.0, 0.5], ranks, backend=backend),
                           fullgraph=True, backend="eager")
    out = shrink(x)
    expected = reference.lora_shrink(x.cpu(), lora_a.cpu(), batch.adapter_ids.cpu(), [1.0, 0.5], ranks.cpu()).float()
    assert out[1, :2].isinf().all() and torch.count_nonzero(out[1, 2:]) == 0
    assert torch.equal(out.isnan().cpu(), expected.isnan()) and torch.equal(out.isinf().cpu(), expected.isinf())
    finite = torch.isfinite(expected)
    assert_close(out.cpu()[finite], expected[finite], torch.float32, "finite entries")


def test_torch_compile_fullgraph_reference_backend_of_the_grouped_ops():
    """backend="reference" of multi_lora_linear and lk.ops.* ran the oracle's per-token loops, which read each
    token's slot on the host: under torch.compile(fullgraph=True) torch's "Could not guard on data-dependent
    expression" error (tests/test_compile_fuzz.py). Traced, they compute the same float64 math in slot-masked torch
    ops; NaN past each slot's rank is still never read."""
    torch._dynamo.reset()
    num_slots, max_rank, k, widths = 3, 4, 16, (6, 4)
    a_slices, b_slices = zip(*(_adapters(num_slots, max_rank, k, n, [4, 1, 3], torch.float32, "cpu") for n in widths))
    weight, bias = randn(sum(widths), k), randn(sum(widths))
    lora_a, lora_b = (t.detach().clone().requires_grad_(True) for t in (a_slices[0], b_slices[0]))
    scalings, ranks = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([4, 1, 3], dtype=torch.int32)

    def train(x, ids):
        return lk.multi_lora_linear(x, weight[:widths[0]], lora_a, lora_b, ids, scalings, bias[:widths[0]],
                                    ranks=ranks, backend="reference")

    def serve(y, x, ids):
        batch = LoRABatch.from_adapter_ids(ids, num_slots)
        shrunk = lk.ops.lora_shrink(x, a_slices[1], batch, scalings, ranks, backend="reference")
        expanded = lk.ops.lora_expand(shrunk, b_slices[1], batch, y.clone(), widths[0], ranks, backend="reference")
        added = lk.ops.add_lora(y.clone(), x, list(a_slices), list(b_slices), batch, scalings, ranks, list(widths),
                                backend="reference")
        return shrunk, expanded, added

    compiled_train = torch.compile(train, fullgraph=True, backend="aot_eager")
    compiled_serve = torch.compile(serve, fullgraph=True, backend="aot_eager")
    for ids in ([0, 1, 2, -1, 1, 0, 2], [2, 2, -1, -1, 0, 1, 1]):
        x, ids = randn(7, k).requires_grad_(True), torch.tensor(ids)
        results = []
        for run in (train, compiled_train):
            y = run(x, ids)
            results.append([y, *torch.autograd.grad(y.square().sum(), (x, lora_a, lora_b))])
        for name, got, want in zip(("y", "dx", "dA", "dB"), results[1], results[0]):
            assert rel_error(got, want) <= 1e-6, name
        y = randn(7, sum(widths))
        with torch.no_grad():
            for name, got, want in zip(("shrink", "expand", "add_lora"), compiled_serve(y, x, ids), serve(y, x, ids)):
                assert rel_error(got, want) <= 1e-6, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_an_unbacked_token_count_compiles_one_graph_for_every_count(backend, dtype):
    """A serving stack may mark the token dimension unbacked (torch._dynamo.mark_unbacked: no guard on its value,
    0 and 1 included): the batch's token-count check compared it with the ids' count, which torch cannot decide
    while tracing ("Could not guard on data-dependent expression"), so nothing compiled. The counts are now asserted
    equal when the graph runs. In bfloat16, as_rows' test of the row count (its copy of padded CPU rows) failed the
    compile of lora_linear and MultiLoRALinear the same way; x here is a column block, its rows padded."""
    backend_or_skip(backend, torch.device("cpu"))
    layer = lk.MultiLoRALinear(nn.Linear(16, 10), max_adapters=3, max_rank=4, backend=backend).to(dtype).eval()
    for slot in range(3):
        layer.set_adapter(slot, randn(4, 16), randn(10, 4), scaling=0.5)
    weight, lora_a, lora_b = randn(10, 16).to(dtype), randn(4, 16).to(dtype), randn(10, 4).to(dtype)

    def step(x, ids):
        batch = LoRABatch.from_adapter_ids(ids, 3)
        y = torch.zeros(x.shape[0], 10, dtype=dtype)
        lk.ops.add_lora(y, x, [layer.lora_a], [layer.lora_b], batch, layer.scalings, layer.ranks, [10],
                        backend=backend)
        return layer(x, ids), y, lk.lora_linear(x, weight, lora_a, lora_b, 0.5, backend=backend)

    graphs = []
    compiled = torch.compile(step, fullgraph=True,
                             backend=lambda gm, example_inputs: graphs.append(gm) or gm.forward)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for tokens in (7, 3, 1, 0):
            x = torch.randn(tokens, 20, generator=generator).to(dtype)[:, :16]
            ids = torch.randint(-1, 3, (tokens,), generator=generator)
            torch._dynamo.decorators.mark_unbacked(x, 0)
            torch._dynamo.decorators.mark_unbacked(ids, 0)
            torch.testing.assert_close(compiled(x, ids), step(x, ids))
    assert len(graphs) == 1, f"{len(graphs)} graphs"


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_an_unbacked_token_count_unlike_the_batchs_is_refused_when_the_graph_runs(backend):
    """With the token dimensions of x and of the ids both marked unbacked, check_tokens cannot compare them while
    tracing; it records their equality (torch._check) instead, which the graph checks before it runs. Without that
    record the Triton backend ran 5 rows of x against a batch of 3 tokens and returned a result (the other backends'
    own checks refused it later); a matching count still runs (LoRABatch.check_tokens)."""
    backend_or_skip(backend, torch.device("cpu"))
    lora_a, lora_b = randn(3, 4, 16), randn(3, 10, 4)
    scalings, ranks = torch.full((3,), 0.5), torch.full((3,), 4, dtype=torch.int32)

    def step(x, ids):
        y = torch.zeros(x.shape[0], 10)
        lk.ops.add_lora(y, x, [lora_a], [lora_b], LoRABatch.from_adapter_ids(ids, 3), scalings, ranks, [10],
                        backend=backend)
        return y

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for tokens, id_count in ((7, 7), (5, 3), (3, 5)):
            x = torch.randn(tokens, 16, generator=generator)
            ids = torch.randint(0, 3, (id_count,), generator=generator)
            torch._dynamo.decorators.mark_unbacked(x, 0)
            torch._dynamo.decorators.mark_unbacked(ids, 0)
            if tokens == id_count:
                torch.testing.assert_close(compiled(x, ids), step(x, ids))
            else:
                with pytest.raises(AssertionError):  # torch's own: dynamo takes no message for torch._check here
                    compiled(x, ids)


@pytest.mark.parametrize("shape", [(None,), (2, None)])
def test_an_unbacked_token_count_compiles_a_multi_lora_layer_called_alone(shape):
    """MultiLoRALinear(x, ids) with the token dimension of x and of the ids marked unbacked, and nothing before it
    that relates the two (the test above calls add_lora first, whose check_tokens asserts them equal):
    multi_lora_linear compared adapter_ids.shape with x.shape[:-1] in Python ("Could not guard on data-dependent
    expression Eq(u0, u1)"), so the layer did not compile; training under aot_eager included."""
    layer = lk.MultiLoRALinear(nn.Linear(16, 10), max_adapters=3, max_rank=4, backend="torch")
    for slot in range(3):
        layer.set_adapter(slot, randn(4, 16), randn(10, 4), scaling=0.5)
    layer.lora_a.requires_grad_(True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    generator = torch.Generator().manual_seed(5)
    dim = shape.index(None)
    for tokens in (7, 3, 1, 0):
        size = tuple(tokens if s is None else s for s in shape)
        x = torch.randn(*size, 16, generator=generator)
        ids = torch.randint(-1, 3, size, generator=generator)
        torch._dynamo.decorators.mark_unbacked(x, dim)
        torch._dynamo.decorators.mark_unbacked(ids, dim)
        got = compiled(x, ids)
        (grad,) = torch.autograd.grad(got.sum(), [layer.lora_a])
        want = layer(x, ids)
        (want_grad,) = torch.autograd.grad(want.sum(), [layer.lora_a])
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(grad, want_grad)


def test_a_batch_from_outside_the_compiled_region_keeps_the_token_count_dynamic():
    """A LoRABatch built once per step outside the compiled model and read by every layer: its token count was a
    stored int, which torch.compile treated as a constant (one graph per count, eager after 8) and
    torch.export refused for a dynamic dimension."""
    layer = lk.MultiLoRALinear(nn.Linear(16, 10), max_adapters=3, max_rank=4, backend="torch").eval()
    for slot in range(3):
        layer.set_adapter(slot, randn(4, 16), randn(10, 4), scaling=1.0)
    graphs = []
    compiled = torch.compile(layer, backend=lambda gm, example_inputs: graphs.append(gm) or gm.forward)
    generator = torch.Generator().manual_seed(3)
    for tokens in (5, 9, 13, 17, 21):
        x = torch.randn(tokens, 16, generator=generator)
        batch = LoRABatch.from_adapter_ids(torch.randint(-1, 3, (tokens,), generator=generator), 3)
        torch.testing.assert_close(compiled(x, batch), layer(x, batch))
    assert len(graphs) <= 2, f"{len(graphs)} graphs"  # the first count, then one dynamic graph

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, ids):
            return self.layer(x, ids)

    tokens = torch.export.Dim("tokens", min=2, max=4096)
    x, ids = torch.randn(7, 16), torch.tensor([0, 1, 2, -1, 1, 0, 2])
    exported = torch.export.export(Model(), (x, ids), dynamic_shapes={"x": {0: tokens}, "ids": {0: tokens}})
    x, ids = torch.randn(13, 16), torch.randint(-1, 3, (13,), generator=generator)
    torch.testing.assert_close(exported.module()(x, ids), layer(x, ids))

    # the LoRABatch itself as an input of the exported model (a pytree node), its [M] buffers dynamic
    from lora_kernels.batch import BUFFER_FIELDS
    x, batch = torch.randn(7, 16), LoRABatch.from_adapter_ids(torch.tensor([0, 1, 2, -1, 1, 0, 2]), 3)
    batch_shapes = [{0: tokens} if name in ("adapter_ids", "sorted_token_ids") else None for name in BUFFER_FIELDS]
    exported = torch.export.export(Model(), (x, batch),
                                   dynamic_shapes={"x": {0: tokens}, "ids": batch_shapes + [None]})
    x, batch = torch.randn(13, 16), LoRABatch.from_adapter_ids(ids, 3)
    torch.testing.assert_close(exported.module()(x, batch), layer(x, batch))


def test_torch_compile_traces_once(monkeypatch):
    """The backend choice is not cached while tracing: a lookup in the cache made dynamo guard on its contents, and
    the first compiled call, by filling it, forced one recompile of the graph."""
    from lora_kernels import backends as backends_module
    monkeypatch.setattr(backends_module, "_CHOICES", {})
    weight, lora_a, lora_b = torch.randn(10, 16), torch.randn(3, 4, 16), torch.randn(3, 10, 4)
    scalings = torch.tensor([1.0, 0.5, 2.0])
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    @torch.compile(fullgraph=True, backend=counting_backend)
    def step(x, ids):
        return lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, scalings, backend="auto")

    for ids in ([0, 1, 2, -1, 1, 0], [2, 2, 0, 1, -1, -1], [1, 0, 0, 0, 2, 1]):
        x, ids = torch.randn(6, 16), torch.tensor(ids)
        got = step(x, ids)  # first: traced with the cache still empty
        torch.testing.assert_close(got, lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, scalings))
    assert len(graphs) == 1, f"{len(graphs)} graphs compiled"


def test_new_values_of_python_lists_of_scalings_or_ranks_recompile():
    """README: Python lists of scalings or ranks are constants of a graph: new values recompile it, and the compiled
    result follows them (a graph never replays old values)."""
    weight, lora_a, lora_b = torch.randn(10, 16), torch.randn(3, 4, 16), torch.randn(3, 10, 4)
    graphs = []

    @torch.compile(fullgraph=True, backend=lambda gm, example_inputs: graphs.append(gm) or gm.forward)
    def step(x, ids, scalings, ranks):
        return lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, scalings, ranks=ranks, backend="torch")

    x, ids = torch.randn(6, 16), torch.tensor([0, 1, 2, -1, 1, 0])
    for count, (scalings, ranks) in enumerate((([1.0, 0.5, 2.0], [4, 2, 1]), ([1.0, 0.5, 3.0], [4, 2, 1]),
                                               ([1.0, 0.5, 3.0], [4, 3, 1])), start=1):
        expected = lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, scalings, ranks=ranks, backend="torch")
        torch.testing.assert_close(step(x, ids, scalings, ranks), expected)
        assert len(graphs) == count


def test_a_batch_built_under_inference_mode_trains():
    """A LoRABatch built under torch.inference_mode (a reference pass whose batch is then reused for the policy
    step) holds inference tensors, which autograd cannot save: multi_lora_linear saves a copy of its buffers."""
    with torch.inference_mode():
        batch = LoRABatch.from_adapter_ids(torch.tensor([0, 0, 1, 1, -1, 2]), 4)
    lora_a, lora_b = [t.requires_grad_(True) for t in _adapters(4, 4, 8, 6, [4, 4, 4, 4], torch.float32, "cpu")]
    x, weight = randn(6, 8), randn(6, 8)
    lk.multi_lora_linear(x, weight, lora_a, lora_b, batch, [1.0] * 4, backend="torch").square().sum().backward()
    leaves = [t.detach().clone().requires_grad_(True) for t in (lora_a, lora_b)]
    lk.multi_lora_linear(x, weight, *leaves, batch.adapter_ids.clone(), [1.0] * 4,
                         backend="torch").square().sum().backward()
    assert torch.equal(lora_a.grad, leaves[0].grad) and torch.equal(lora_b.grad, leaves[1].grad)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_scalings_and_ranks_made_under_inference_mode_train(backend):
    """A serving stack's scalings (float32) and ranks (int32) tables made under torch.inference_mode and reused for a
    training step: they were saved for backward as given, which torch refuses for inference tensors ("Inference
    tensors cannot be saved for backward"), while a batch made there is copied. The gradients are those of plain
    tensors."""
    backend_or_skip(backend, torch.device("cpu"))
    with torch.inference_mode():
        scalings, ranks = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([4, 2, 3], dtype=torch.int32)
    lora_a, lora_b = (t.nan_to_num(0.0) for t in _adapters(3, 4, 8, 6, [4, 2, 3], torch.float32, "cpu"))
    x, weight, ids = randn(6, 8), randn(6, 8), torch.tensor([0, 0, 1, 2, -1, 2])
    grads = []
    for scaling_table, rank_table in ((scalings, ranks), (scalings.clone(), ranks.clone())):
        leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
        y = lk.multi_lora_linear(leaves[0], weight, leaves[1], leaves[2], ids, scaling_table, ranks=rank_table,
                                 backend=backend)
        grads.append(torch.autograd.grad(y.square().sum(), leaves))
    for name, got, want in zip(("x", "lora_a", "lora_b"), *grads):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_unchecked_int64_ranks_are_clamped_not_wrapped(backend):
    """Rank values are not checked where that needs a sync or breaks a trace (CUDA tensors, torch.compile); they
    are clamped to [0, R]. An int64 rank past int32 wrapped in the cast to int32: 2**32 + 3 became rank 3."""
    backend_or_skip(backend, torch.device("cpu"))
    lora_a, _ = _adapters(2, 4, 8, 6, [4, 4], torch.float32, "cpu")
    x, batch = randn(3, 8), LoRABatch.from_adapter_ids(torch.tensor([0, 1, 0]), 2)
    huge = torch.tensor([2**32 + 3, -(2**32) + 2], dtype=torch.int64)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def shrink(x, ranks):
        return lk.ops.lora_shrink(x, lora_a, batch, [1.0, 1.0], ranks, backend=backend)

    clamped = torch.tensor([4, 0], dtype=torch.int64)
    torch.testing.assert_close(shrink(x, huge), lk.ops.lora_shrink(x, lora_a, batch, [1.0, 1.0], clamped))


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_strided_scalings_and_ranks_give_the_same_result(backend, device):
    """scalings and ranks given as strided views (every other entry of a longer tensor) compute what their
    contiguous copies do. The cpu and triton kernels index them as plain arrays: a view read the entries between
    (other slots' values, or past the end for a stride-0 expand) and gave wrong outputs without an error."""
    backend_or_skip(backend, device)
    num_slots, max_rank, k, n, m = 3, 4, 8, 6, 10
    lora_a, lora_b = _adapters(num_slots, max_rank, k, n, [4, 1, 3], torch.float32, device)
    ids = segment_ids("mixed_base", m, num_slots).to(device)
    batch = LoRABatch.from_adapter_ids(ids, num_slots)
    x, weight, t = randn(m, k, device=device), randn(n, k, device=device), randn(m, max_rank, device=device)
    scalings = torch.tensor([1.0, 9.0, 0.5, 9.0, 2.0, 9.0], device=device)[::2]
    ranks = torch.tensor([4, 0, 1, 0, 3, 0], dtype=torch.int32, device=device)[::2]
    flat_s, flat_r = scalings.contiguous(), ranks.contiguous()
    assert not scalings.is_contiguous() and not ranks.is_contiguous()
    torch.testing.assert_close(lk.ops.lora_shrink(x, lora_a, batch, scalings, ranks, backend=backend),
                               lk.ops.lora_shrink(x, lora_a, batch, flat_s, flat_r, backend=backend))
    torch.testing.assert_close(lk.ops.lora_expand(t, lora_b, batch, torch.zeros(m, n, device=device), 0, ranks,
                                                  backend=backend),
                               lk.ops.lora_expand(t, lora_b, batch, torch.zeros(m, n, device=device), 0, flat_r,
                                                  backend=backend))
    torch.testing.assert_close(
        lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, scalings, ranks=ranks, backend=backend),
        lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, flat_s, ranks=flat_r, backend=backend))
    one = torch.tensor([0.5], device=device).expand(num_slots)  # stride 0
    torch.testing.assert_close(lk.ops.lora_shrink(x, lora_a, batch, one, flat_r, backend=backend),
                               lk.ops.lora_shrink(x, lora_a, batch, one.contiguous(), flat_r, backend=backend))


@pytest.mark.parametrize("backend", GROUPED_BACKENDS + ["reference"])
def test_outputs_that_overlap_an_input_or_themselves_are_refused(backend, device):
    """The serving ops write out / y in place. An out that is also an input (lora_expand into its own t: the cpu
    kernel read rows it had already written; add_lora with x a view of y: later slices read the updated x) gave
    wrong results, and an expanded out (stride 0: every row one memory row) raced in the cpu and triton kernels
    where the torch backend raised torch's RuntimeError after computing; so did a leaf out that requires grad, which
    the cpu and triton kernels wrote into. Each is a ValueError naming the argument, raised before anything is
    written."""
    backend_or_skip(backend, device)
    num_slots, rank, m = 2, 4, 6
    lora_a, lora_b = _adapters(num_slots, rank, rank, rank, [rank, 2], torch.float32, device)
    batch = LoRABatch.from_adapter_ids(segment_ids("mixed_base", m, num_slots).to(device), num_slots)
    scalings = [1.0, 0.5]

    def refused(call, target, words):
        before = target.clone()
        with pytest.raises(ValueError, match=words):
            call()
        assert torch.equal(target, before)

    t = randn(m, rank, device=device)
    refused(lambda: lk.ops.lora_expand(t, lora_b, batch, t, backend=backend), t, r"lora_expand: out .* overlaps t")
    wide = torch.zeros(1, rank, device=device)
    refused(lambda: lk.ops.lora_expand(t, lora_b, batch, wide.expand(m, rank), backend=backend), wide,
            r"lora_expand: out expected a tensor whose elements do not overlap in memory, got shape \(6, 4\) with "
            r"strides \(0, 1\)")
    x = randn(m, rank, device=device)
    refused(lambda: lk.ops.lora_shrink(x, lora_a, batch, scalings, backend=backend, out=x), x,
            r"lora_shrink: out .* overlaps x")
    refused(lambda: lk.ops.lora_shrink(x, lora_a, batch, scalings, backend=backend, out=wide.expand(m, rank)), wide,
            r"lora_shrink: out expected a tensor whose elements do not overlap")
    y = randn(m, 2 * rank, device=device)
    refused(lambda: lk.ops.add_lora(y, y[:, :rank], [lora_a, lora_a], [lora_b, lora_b], batch, scalings, None,
                                    (rank, rank), backend=backend), y, r"add_lora: y .* overlaps x")
    row = torch.zeros(1, 2 * rank, device=device)
    refused(lambda: lk.ops.add_lora(row.expand(m, 2 * rank), x, [lora_a, lora_a], [lora_b, lora_b], batch,
                                    scalings, None, (rank, rank), backend=backend), row,
            r"add_lora: y expected a tensor whose elements do not overlap")
    # a tensor that requires grad (a leaf, or a view of one): torch's in-place ops raised on a leaf after computing,
    # the cpu and triton kernels wrote into it; the ops are not differentiable, so autograd would miss the write
    leaf = torch.zeros(m, 2 * rank, device=device, requires_grad=True)
    refused(lambda: lk.ops.lora_expand(t, lora_b, batch, leaf[:, :rank], backend=backend), leaf,
            r"lora_expand: out expected a tensor that does not require grad \(the op is not differentiable; "
            r"lora_kernels.multi_lora_linear is\)")
    refused(lambda: lk.ops.lora_shrink(x, lora_a, batch, scalings, backend=backend, out=leaf[:, rank:]), leaf,
            r"lora_shrink: out expected a tensor that does not require grad")
    with torch.no_grad():
        lk.ops.lora_expand(t, lora_b, batch, leaf[:, :rank], backend=backend)
    # a column block of a wider tensor that no input shares stays a valid out
    out = torch.zeros(m, 3 * rank, device=device)
    lk.ops.lora_expand(t, lora_b, batch, out[:, rank:], backend=backend)
    assert out[:, :rank].eq(0).all()
    # x and y as column blocks of one workspace (a serving stack's preallocated buffer) share no element: valid;
    # shifted by one column they share one, which is refused
    workspace = torch.zeros(m, 3 * rank, device=device)
    workspace[:, :rank] = x
    ranks = [rank, 2]  # the padding holds NaN
    y_alone = lk.ops.add_lora(torch.zeros(m, 2 * rank, device=device), x, [lora_a, lora_a], [lora_b, lora_b], batch,
                              scalings, ranks, (rank, rank), backend=backend)
    lk.ops.add_lora(workspace[:, rank:], workspace[:, :rank], [lora_a, lora_a], [lora_b, lora_b], batch, scalings,
                    ranks, (rank, rank), backend=backend)
    torch.testing.assert_close(workspace[:, rank:], y_alone)
    refused(lambda: lk.ops.add_lora(workspace[:, rank - 1:-1], workspace[:, :rank], [lora_a, lora_a],
                                    [lora_b, lora_b], batch, scalings, None, (rank, rank), backend=backend),
            workspace, r"add_lora: y expected memory of its own, got a view that overlaps x")


def test_lora_expand_runs_on_fake_tensors():
    """Under FakeTensorMode (shape and memory estimates outside torch.compile) every storage's data pointer is 0:
    the output check must not take that for shared memory (it refused every call)."""
    backend_or_skip("cpu", "cpu")  # the C++ extension's ops
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map
    num_slots, rank, m, n = 2, 4, 6, 5
    batch = LoRABatch.from_adapter_ids(segment_ids("mixed_base", m, num_slots), num_slots)
    with FakeTensorMode() as mode:
        fake = lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
        t, lora_b, y = (mode.from_tensor(v) for v in (randn(m, rank), randn(num_slots, n, rank), randn(m, n)))
        out = lk.ops.lora_expand(t, lora_b, tree_map(fake, batch), y, backend="cpu")
    assert out.shape == (m, n)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_multi_adapter_step_under_fake_tensor_mode_gives_the_real_steps_shapes(backend, dtype):
    """Under FakeTensorMode outside torch.compile (a memory estimator), a MultiLoRALinear training step and a serving
    add_lora give the outputs and gradients of a real step in shape and dtype: the checks and the torch paths read
    the ids, ranks, scalings and slot sizes of CPU tensors on the host, which fake tensors have none of
    (DataDependentOutputException)."""
    backend_or_skip(backend, "cpu")

    def step():
        torch.manual_seed(0)
        layer = lk.MultiLoRALinear(torch.nn.Linear(16, 12, dtype=dtype), max_adapters=3, max_rank=4, backend=backend)
        layer.set_adapter(0, torch.randn(4, 16), torch.randn(12, 4), 0.5)
        layer.set_adapter(1, torch.randn(2, 16), torch.randn(12, 2), 2.0)
        layer.lora_a.requires_grad_(True)
        layer.lora_b.requires_grad_(True)
        x = torch.randn(2, 5, 16, dtype=dtype, requires_grad=True)
        ids = torch.tensor([[0, 1, -1, 0, 1], [2, 2, 0, 1, -1]])
        y = layer(x, ids)
        y.float().sum().backward()
        served = torch.zeros(10, 12, dtype=dtype)
        with torch.no_grad():
            lk.ops.add_lora(served, x.reshape(10, 16), [layer.lora_a], [layer.lora_b],
                            LoRABatch.from_adapter_ids(ids.flatten(), 3), layer.scalings, layer.ranks, [12],
                            backend=backend)
        return [y, x.grad, layer.lora_a.grad, layer.lora_b.grad, served]

    assert_fake_step_like_the_real_one(step)


def test_lora_expand_takes_a_numpy_integer_slice_offset():
    numpy = pytest.importorskip("numpy")
    _, lora_b = _adapters(2, 4, 8, 6, [4, 4], torch.float32, "cpu")
    batch, t = LoRABatch.from_adapter_ids(torch.tensor([0, 1, -1]), 2), randn(3, 4)
    got = lk.ops.lora_expand(t, lora_b, batch, torch.zeros(3, 9), numpy.int64(2), backend="torch")
    torch.testing.assert_close(got, lk.ops.lora_expand(t, lora_b, batch, torch.zeros(3, 9), 2, backend="torch"))


@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
def test_serving_ops_ignore_autocast(backend):
    """lk.ops.* compute in the dtypes they are given, autocast or not (README, Mixed precision)."""
    backend_or_skip(backend, torch.device("cpu"))
    lora_a, lora_b = _adapters(2, 4, 8, 6, [4, 2], torch.float32, "cpu")
    x, batch = randn(5, 8), LoRABatch.from_adapter_ids(torch.tensor([0, 1, -1, 1, 0]), 2)

    def run():
        shrunk = lk.ops.lora_shrink(x, lora_a, batch, [1.0, 0.5], [4, 2], backend=backend)
        expanded = lk.ops.lora_expand(shrunk, lora_b, batch, torch.zeros(5, 6), 0, [4, 2], backend=backend)
        added = lk.ops.add_lora(torch.zeros(5, 6), x, [lora_a], [lora_b], batch, [1.0, 0.5], [4, 2], [6],
                                backend=backend)
        return shrunk, expanded, added

    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = run()
    for got, expected in zip(under_autocast, plain):
        assert got.dtype == torch.float32 and torch.equal(got, expected)


def _assert_a_finite_output_where_the_reference_has_one(x, weight, lora_a, lora_b, ids, scalings, ranks, backend):
    """y finite and close to the reference's, which lies well inside x's dtype (only an intermediate overflows)."""
    expected = reference.multi_lora_linear(x.cpu(), weight.cpu(), lora_a.cpu(), lora_b.cpu(), ids.cpu(), scalings,
                                           None, torch.tensor(ranks))
    assert expected.abs().max() < torch.finfo(x.dtype).max / 4  # y does not
    got = lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, scalings, ranks=ranks, backend=backend)
    assert torch.isfinite(got).all()
    assert_close(got, expected, x.dtype, "y")


def _scaled_shrink_overflow_case(num_tokens, device):
    """fp16 inputs of 3 slots where s·S passes 65504 (S itself does not): x, weight, lora_a, lora_b, ids,
    scalings, ranks."""
    dtype, num_slots, max_rank, k, n = torch.float16, 3, 4, 64, 32
    ranks, scalings = [4, 2, 3], torch.tensor([200.0, 150.0, 1.0])
    lora_a = randn(num_slots, max_rank, k, dtype=dtype, device=device, scale=90.0)
    lora_b = randn(num_slots, n, max_rank, dtype=dtype, device=device, scale=1e-3)
    x = randn(num_tokens, k, dtype=dtype, device=device)
    weight = randn(n, k, dtype=dtype, device=device, scale=k ** -0.5)
    ids = segment_ids("mixed_base", num_tokens, num_slots).to(device)
    shrunk = reference.lora_shrink(x.cpu(), lora_a.cpu(), ids.cpu(), scalings, torch.tensor(ranks))
    assert shrunk.abs().max() > 2 * torch.finfo(dtype).max  # s·S overflows fp16
    return x, weight, lora_a, lora_b, ids, scalings, ranks


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
@pytest.mark.parametrize("path", ["float64", "create_graph", "torch_func"])
def test_an_inf_stays_inf_through_the_differentiable_grouped_composition(backend, path, device):
    """The torch composition of the grouped term (float64 on the cpu and torch backends; create_graph=True and
    torch.func on every backend) zeroed A's padding and other slots' rows of x, then multiplied: an Inf in x (a token
    of a slot of rank < R), in dY, or in A (beside a base-only token) met those zeros and gave NaN in y, dX or dB,
    where the reference gives Inf (helper 254). All values positive, so every Inf stays an Inf there."""
    backend_or_skip(backend, device)
    dtype = torch.float64 if path == "float64" else torch.float32
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the triton backend takes no float64")
    k, n, max_rank = 3, 4, 2
    g = torch.Generator().manual_seed(5)
    weight = torch.ones(n, k, dtype=dtype)
    lora_a = torch.rand(1, max_rank, k, generator=g, dtype=dtype) + 0.5
    lora_b = torch.rand(1, n, max_rank, generator=g, dtype=dtype) + 0.5
    x = torch.rand(2, k, generator=g, dtype=dtype) + 0.5
    dy = torch.ones(2, n, dtype=dtype)
    inf_x, inf_dy, inf_a = x.clone(), dy.clone(), lora_a.clone()
    inf_x[0, 0] = inf_dy[0, 0] = inf_a[0, 0, 1] = float("inf")
    cases = [("Inf in x, rank 1 < R", inf_x, lora_a, dy, [0, 0], [1]),
             ("Inf in dY, rank 1 < R", x, lora_a, inf_dy, [0, 0], [1]),
             ("Inf in A, a base-only token", x, inf_a, dy, [0, -1], [2])]
    for what, x_case, a_case, dy_case, ids, ranks in cases:
        ids = torch.tensor(ids)

        def run(impl, inputs, backend_name):
            return impl(inputs[0], weight.to(inputs[0]), inputs[1], inputs[2], ids.to(inputs[0].device),
                        [1.0], ranks=ranks, backend=backend_name)

        ref_leaves = [t.double().clone().requires_grad_(True) for t in (x_case, a_case, lora_b)]
        expected = run(lk.multi_lora_linear, ref_leaves, "reference")
        expected.backward(dy_case.double())
        leaves = [t.to(device).clone().requires_grad_(True) for t in (x_case, a_case, lora_b)]
        if path == "torch_func":
            y, vjp = torch.func.vjp(lambda *ins: run(lk.multi_lora_linear, ins, backend), *leaves)
            grads = vjp(dy_case.to(device))
        else:
            y = run(lk.multi_lora_linear, leaves, backend)
            grads = torch.autograd.grad(y, leaves, dy_case.to(device), create_graph=path == "create_graph")
        assert_same_non_finite(y, expected.to(dtype), dtype, f"y, {what}")
        for name, grad, ref_leaf in zip(("x", "lora_a", "lora_b"), grads, ref_leaves):
            assert_same_non_finite(grad, ref_leaf.grad.to(dtype), dtype, f"d{name}, {what}")


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
@pytest.mark.parametrize("num_tokens", [12, 80], ids=["decode", "prefill"])
def test_fp16_output_stays_finite_where_only_the_scaled_shrink_overflows(backend, num_tokens, device):
    """|s·S| above fp16's 65504 where S and y are in range: y is finite and accurate on both kernel paths (the
    Triton prefill expand rounded s·S to fp16 for its tensor-core dot, so y was inf there)."""
    backend_or_skip(backend, device)
    x, weight, lora_a, lora_b, ids, scalings, ranks = _scaled_shrink_overflow_case(num_tokens, device)
    _assert_a_finite_output_where_the_reference_has_one(x, weight, lora_a, lora_b, ids, scalings, ranks, backend)


def _run_the_device_slot_loop(backend, monkeypatch):
    """The per-slot GEMMs that the cuda and torch backends run on GPUs (slots not on the host), on CPU tensors."""
    if backend == "triton":
        pytest.skip("the triton backend runs its own kernel")
    from lora_kernels import ops
    monkeypatch.setattr(ops, "slots_on_host", lambda *args: False)


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
@pytest.mark.parametrize("num_tokens", [12, 80], ids=["decode", "prefill"])
@pytest.mark.parametrize("slot_loop", [False, True], ids=["own_path", "device_slot_loop"])
def test_fp16_output_stays_finite_where_only_the_unscaled_shrink_overflows(backend, num_tokens, slot_loop, device,
                                                                           monkeypatch):
    """x·Aᵀ above fp16's 65504 with scalings below 1, where s·S and y are in range: the torch backend rounded x·Aᵀ to
    fp16 before widening and scaling it (y = inf; lora_shrink's fp32 result inf where the reference's is finite);
    the other backends accumulate in fp32 (helper 254). device_slot_loop: the GPU path, here on CPU tensors."""
    backend_or_skip(backend, device)
    if slot_loop:
        _run_the_device_slot_loop(backend, monkeypatch)
    dtype, num_slots, max_rank, k, n = torch.float16, 2, 4, 32, 16
    ranks, scalings = [4, 3], torch.tensor([0.004, -0.003])
    lora_a = (40.0 * (1.0 + torch.rand(num_slots, max_rank, k))).to(dtype).to(device)  # one sign: no cancelling
    x = (40.0 * (1.0 + torch.rand(num_tokens, k))).to(dtype).to(device)
    lora_b = randn(num_slots, n, max_rank, dtype=dtype, device=device)
    weight = randn(n, k, dtype=dtype, device=device, scale=k ** -0.5)
    ids = segment_ids("mixed_base", num_tokens, num_slots).to(device)
    shrunk = reference.lora_shrink(x.cpu(), lora_a.cpu(), ids.cpu(), torch.ones(num_slots), torch.tensor(ranks))
    assert shrunk[ids.cpu() >= 0, :min(ranks)].abs().min() > torch.finfo(dtype).max  # every in-rank one overflows
    _assert_a_finite_output_where_the_reference_has_one(x, weight, lora_a, lora_b, ids, scalings, ranks, backend)
    batch = LoRABatch.from_adapter_ids(ids, num_slots)
    got_shrink = lk.ops.lora_shrink(x, lora_a, batch, scalings, ranks, backend=backend)
    assert_close(got_shrink, reference.lora_shrink(x.cpu(), lora_a.cpu(), ids.cpu(), scalings, torch.tensor(ranks)),
                 torch.float32, "shrink")


@pytest.mark.parametrize("backend", [b for b in GROUPED_BACKENDS if b != "triton"])
def test_float64_shrink_scales_a_product_past_float32_range_before_narrowing(backend, device):
    """float64 x·Aᵀ past float32's range with a scaling that brings it back: the torch backend narrowed the product
    to float32 before scaling it (inf; 0 · inf = NaN at scaling 0), where the reference and cpu give the scaled
    float32 result (helper 254)."""
    backend_or_skip(backend, device)
    x = torch.full((3, 4), 1e20, dtype=torch.float64, device=device)
    lora_a = torch.full((1, 2, 4), 1e20, dtype=torch.float64, device=device)  # x·Aᵀ = 4e40
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, -1, 0], device=device), 1)
    for scaling in (1e-10, 0.0):
        got = lk.ops.lora_shrink(x, lora_a, batch, torch.tensor([scaling], dtype=torch.float64), [2], backend=backend)
        expected = torch.tensor([4e40 * scaling] * 2, dtype=torch.float32)
        torch.testing.assert_close(got.cpu(), torch.stack([expected, torch.zeros(2), expected]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
@pytest.mark.parametrize("num_tokens", [12, 80], ids=["decode", "prefill"])
@pytest.mark.parametrize("slot_loop", [False, True], ids=["own_path", "device_slot_loop"])
@pytest.mark.parametrize("overflowing", ["scaled", "unscaled"])
def test_fp16_x_and_lora_a_gradients_stay_finite_where_only_the_scaled_dy_b_overflows(backend, num_tokens, slot_loop,
                                                                                        overflowing, device,
                                                                                        monkeypatch):
    """scaled: u = s·dY·B above fp16's 65504 while dX and dA are in range: every backend keeps u in fp32 up to the
    products that use it, as the single-adapter backward keeps dS (the Triton dA kernel and the GPU slot loop rounded
    u to fp16: dA = inf; PEFT's dS overflows here too). unscaled: scalings below 1 and dY·B above 65504 where u is in
    range (the torch backend rounded dY·B to fp16 before scaling it: dX = dA = inf; PEFT, scaling dY first, stays
    finite). device_slot_loop: the per-slot GEMMs that the cuda and torch backends run on GPUs, here on CPU
    tensors."""
    backend_or_skip(backend, device)
    if slot_loop:
        _run_the_device_slot_loop(backend, monkeypatch)
    dtype, num_slots, max_rank, k, n = torch.float16, 2, 4, 32, 16
    ranks = [4, 3]
    scalings, b_scale = (torch.tensor([200.0, 150.0]), 100.0) if overflowing == "scaled" else (
        torch.tensor([0.01, -0.02]), 5000.0)
    lora_a = randn(num_slots, max_rank, k, dtype=dtype, device=device, scale=1e-3)
    lora_b = (b_scale * (1.0 + torch.rand(num_slots, n, max_rank))).to(dtype).to(device)  # one sign: no cancelling
    # x this small keeps dA ~ u·x (40 tokens a slot) far inside fp16 on any draw: at 1e-3 its largest entry was
    # above 1e4 on about half the seeds (12689 on the H200, whose random stream differs from the CPU's).
    x = randn(num_tokens, k, dtype=dtype, device=device, scale=3e-4)
    weight = randn(n, k, dtype=dtype, device=device, scale=k ** -0.5)
    ids = (torch.arange(num_tokens) % num_slots).to(device)
    dy = (1.0 + torch.rand(num_tokens, n)).to(dtype).to(device)
    leaves = [t.double().cpu().requires_grad_(True) for t in (x, lora_a, lora_b)]
    reference.multi_lora_linear_autograd(leaves[0], weight.double().cpu(), *leaves[1:], ids.cpu(), scalings, None,
                                         torch.tensor(ranks)).backward(dy.double().cpu())
    overflowing_factor = scalings.abs().min() if overflowing == "scaled" else 1.0
    assert overflowing_factor * dy.double().min() * b_scale * n > torch.finfo(dtype).max  # every in-rank one overflows
    in_range = torch.finfo(dtype).max / 4
    assert leaves[0].grad.abs().max() < in_range and leaves[1].grad.abs().max() < in_range  # dX and dA do not
    got = [t.clone().requires_grad_(True) for t in (x, lora_a)]
    lk.multi_lora_linear(got[0], weight, got[1], lora_b, ids, scalings, ranks=ranks, backend=backend).backward(dy)
    assert_close(got[0].grad, leaves[0].grad, dtype, "dx", scale=2.0)
    assert_close(got[1].grad, leaves[1].grad, dtype, "dlora_a", scale=2.0)


@pytest.mark.parametrize("backend", ["torch", "cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_device_slot_loop_gradients_match_the_reference(backend, dtype, device, monkeypatch):
    """The per-slot masked GEMMs that the torch and cuda backends run for dA and dB on GPUs (the fp32 and bf16
    branch: left cast to right's dtype), here on CPU tensors, against the float64 reference: mixed ranks, a slot of
    rank 0 and tokens without an adapter (id -1)."""
    backend_or_skip(backend, device)
    from lora_kernels import ops
    monkeypatch.setattr(ops, "slots_on_host", lambda *args: False)
    num_slots, max_rank, k, n = 3, 4, 24, 10
    ranks, scalings = [4, 0, 2], torch.tensor([2.0, 1.0, 0.5])
    lora_a = randn(num_slots, max_rank, k, dtype=dtype, device=device, scale=k ** -0.5)
    lora_b = randn(num_slots, n, max_rank, dtype=dtype, device=device)
    x = randn(9, k, dtype=dtype, device=device)
    weight = randn(n, k, dtype=dtype, device=device, scale=k ** -0.5)
    ids = torch.tensor([0, 2, -1, 1, 0, 2, 2, -1, 0], device=device)
    dy = randn(9, n, dtype=dtype, device=device)
    leaves = [t.double().cpu().requires_grad_(True) for t in (x, lora_a, lora_b)]
    reference.multi_lora_linear_autograd(leaves[0], weight.double().cpu(), *leaves[1:], ids.cpu(), scalings, None,
                                         torch.tensor(ranks)).backward(dy.double().cpu())
    got = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
    lk.multi_lora_linear(got[0], weight, got[1], got[2], ids, scalings, ranks=ranks, backend=backend).backward(dy)
    for name, g, ref in zip(("dx", "dlora_a", "dlora_b"), got, leaves):
        assert_close(g.grad, ref.grad, dtype, name, scale=2.0)


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_fp16_lora_b_gradient_is_built_from_the_unscaled_shrink(backend, device):
    """dB = s·dYᵀ·S with |s·S| above fp16's 65504 where S, dB and y are in range: dB is finite and accurate (it
    was reduced over s·S rounded to fp16, inf where PEFT's, which rounds S unscaled, is finite). 80 tokens: the
    Triton prefill path."""
    backend_or_skip(backend, device)
    dtype = torch.float16
    x, weight, lora_a, lora_b, ids, scalings, ranks = _scaled_shrink_overflow_case(80, device)
    dy = randn(80, weight.shape[0], dtype=dtype, device=device, scale=1e-2)
    ref_leaves = [t.double().cpu().requires_grad_(True) for t in (lora_a, lora_b)]
    reference.multi_lora_linear_autograd(x.double().cpu(), weight.double().cpu(), *ref_leaves, ids.cpu(), scalings,
                                         None, torch.tensor(ranks)).backward(dy.double().cpu())
    assert ref_leaves[1].grad.abs().max() < torch.finfo(dtype).max / 2  # dB does not
    leaf = lora_b.clone().requires_grad_(True)
    lk.multi_lora_linear(x, weight, lora_a, leaf, ids, scalings, ranks=ranks, backend=backend).backward(dy)
    assert_close(leaf.grad, ref_leaves[1].grad, dtype, "dlora_b", scale=2.0)


@pytest.mark.parametrize("path", ["device_slot_loop", "float64_composition"])
def test_a_non_finite_token_stays_in_its_slots_gradients(path, device, monkeypatch):
    """A NaN in one token's x reaches only its own slot's dA and dB: in the per-slot masked GEMMs GPUs run for the
    torch and cuda backends (here on CPU tensors) both operands of every slot's product are masked, and so is x in
    the float64 torch composition; an unmasked operand gave 0·NaN = NaN in every slot."""
    from lora_kernels import ops
    dtype, backend = torch.float32, "torch"
    if path == "device_slot_loop":
        monkeypatch.setattr(ops, "slots_on_host", lambda *args: False)
    else:
        dtype, backend = torch.float64, "cpu"
    backend_or_skip(backend, device)
    num_slots, max_rank, k, n, ranks = 3, 4, 24, 10, [4, 3, 2]
    lora_a = randn(num_slots, max_rank, k, dtype=dtype, device=device, scale=k ** -0.5)
    lora_b = randn(num_slots, n, max_rank, dtype=dtype, device=device)
    weight = randn(n, k, dtype=dtype, device=device, scale=k ** -0.5)
    x = randn(9, k, dtype=dtype, device=device)
    ids = torch.tensor([0, 2, -1, 1, 0, 2, 2, -1, 1], device=device)
    x[0, 3] = float("nan")  # a token of slot 0
    leaves = [t.clone().requires_grad_(True) for t in (lora_a, lora_b)]
    lk.multi_lora_linear(x, weight, *leaves, ids, [2.0, 1.0, 0.5], ranks=ranks, backend=backend).sum().backward()
    ref = [t.double().cpu().requires_grad_(True) for t in (lora_a, lora_b)]
    reference.multi_lora_linear_autograd(x.double().cpu(), weight.double().cpu(), *ref, ids.cpu(),
                                         torch.tensor([2.0, 1.0, 0.5]), None, torch.tensor(ranks)).sum().backward()
    for name, leaf, ref_leaf in zip(("lora_a", "lora_b"), leaves, ref):
        assert leaf.grad[0].isnan().any() and torch.isfinite(leaf.grad[1:]).all(), name
        assert_same_non_finite(leaf.grad, ref_leaf.grad.to(dtype), dtype, f"d{name}", scale=2.0)


def test_multi_lora_base_linear_returns_the_input_dtype_with_the_reference_backend(device):
    x, weight, bias = randn(3, 4, 8, device=device), randn(5, 8, device=device), randn(5, device=device)
    y = functional.multi_lora_base_linear(x, weight, bias, backend="reference")
    assert y.dtype == torch.float32 and y.shape == (3, 4, 5)
    assert_close(y, torch.nn.functional.linear(x.double(), weight.double(), bias.double()), torch.float32)


@pytest.mark.parametrize("backend", GROUPED_BACKENDS + ["reference"])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)], ids=["1-D", "2-D", "3-D"])
def test_multi_lora_base_linear_equals_multi_lora_linear_without_adapter_rows(backend, lead, device):
    """MultiLoRALinear's shortcut for a batch without adapter rows gives what multi_lora_linear gives with every id
    -1, shape included: a 1-D x [K] gives [N] (x.dim() <= 2 returning the [1, N] rows passed every other test)."""
    backend_or_skip(backend, device)
    x, weight, bias = randn(*lead, 8, device=device), randn(5, 8, device=device), randn(5, device=device)
    lora_a, lora_b = randn(2, 4, 8, device=device), randn(2, 5, 4, device=device)
    ids = torch.full(lead, -1, dtype=torch.long, device=device)
    y = functional.multi_lora_base_linear(x, weight, bias, backend=backend)
    expected = lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, [1.0, 1.0], bias, backend=backend)
    assert y.shape == expected.shape == (*lead, 5)
    assert_close(y, expected, torch.float32)


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
def test_bf16_torch_func_keeps_the_scalings_unrounded(backend, device):
    """Under torch.func (the torch composition) the scalings multiply in fp32, as the kernels read them: 1/3 and
    16/3 rounded to bf16 first moved the LoRA term by ~0.2%."""
    backend_or_skip(backend, device)
    from torch.func import vmap
    dtype, num_slots, max_rank, k, n, m = torch.bfloat16, 2, 4, 32, 64, 64
    lora_a = randn(num_slots, max_rank, k, dtype=dtype, device=device)
    lora_b = randn(num_slots, n, max_rank, dtype=dtype, device=device)
    weight, x = torch.zeros(n, k, dtype=dtype, device=device), randn(m, k, dtype=dtype, device=device)
    ids, scalings = (torch.arange(m) % num_slots).to(device), [1 / 3, 16 / 3]

    def layer(rows):
        return lk.multi_lora_linear(rows, weight, lora_a, lora_b, ids, scalings, backend=backend)
    expected = reference.multi_lora_linear_autograd(x.double().cpu(), weight.double().cpu(), lora_a.double().cpu(),
                                                    lora_b.double().cpu(), ids.cpu(), torch.tensor(scalings).double())
    got = vmap(layer)(x[None])[0]
    ratio = (got.double().cpu() / expected).mean().item()
    assert abs(ratio - 1.0) < 5e-4, ratio


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_values_land_where_the_reference_puts_them(backend, dtype, device):
    """NaN, +inf and -inf planted in x, W, a slot's A or B (within its rank; NaN padding past it) or dY come out of
    multi_lora_linear's y and every gradient (bias and W trained too) at exactly the reference's places: no backend
    drops or invents one; a slot with scaling 0 still propagates its adapter's (0·inf is NaN)."""
    backend_or_skip(backend, device)
    num_slots, max_rank, k, n, ranks, scalings = 3, 4, 12, 10, [2, 4, 3], [2.0, 0.0, 0.5]
    g = torch.Generator().manual_seed(23)
    for case, target in enumerate(("x", "lora_a", "lora_b", "weight", "dy")):
        m = 5 if case % 2 else 20
        ids = torch.randint(-1, num_slots, (m,), generator=g)
        tensors = {"x": torch.randn(m, k, generator=g), "weight": torch.randn(n, k, generator=g) * k ** -0.5,
                   "lora_a": torch.randn(num_slots, max_rank, k, generator=g) * k ** -0.5,
                   "lora_b": torch.randn(num_slots, n, max_rank, generator=g) * max_rank ** -0.5,
                   "bias": torch.randn(n, generator=g), "dy": torch.randn(m, n, generator=g)}
        planted = tensors[target]
        for slot, value in zip(range(num_slots), (float("nan"), float("inf"), -float("inf"))):
            if target == "lora_a":
                planted[slot, ranks[slot] - 1, case] = value
            elif target == "lora_b":
                planted[slot, case, ranks[slot] - 1] = value
            else:
                planted.view(-1)[torch.randint(planted.numel(), (), generator=g)] = value
        for slot, rank in enumerate(ranks):  # never read
            tensors["lora_a"][slot, rank:] = float("nan")
            tensors["lora_b"][slot, :, rank:] = float("nan")
        x, weight, lora_a, lora_b, bias, dy = (tensors[name].to(dtype).to(device) for name in tensors)
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, lora_a, lora_b, bias)]
        y = lk.multi_lora_linear(*leaves[:4], ids.to(device), scalings, leaves[4], ranks=ranks, backend=backend)
        y.backward(dy)
        ref_leaves = [t.double().cpu().requires_grad_(True) for t in (x, weight, lora_a, lora_b, bias)]
        expected = reference.multi_lora_linear_autograd(*ref_leaves[:4], ids, torch.tensor(scalings).double(),
                                                        ref_leaves[4], torch.tensor(ranks))
        expected.backward(dy.double().cpu())
        what = f"{target} planted, M = {m}"
        assert_same_non_finite(y, expected.to(dtype), dtype, f"y, {what}")
        for name, leaf, ref_leaf in zip(("x", "weight", "lora_a", "lora_b", "bias"), leaves, ref_leaves):
            assert_same_non_finite(leaf.grad, ref_leaf.grad.to(dtype), dtype, f"d{name}, {what}", scale=2.0)


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
@pytest.mark.parametrize("num_tokens", [12, 80], ids=["decode", "prefill"])
def test_nan_token_leaves_the_padding_gradient_zero(backend, num_tokens, device):
    """A NaN in one token of slot 0 makes slot 0's in-rank gradients NaN, as it must, but the padding past its rank
    (never read) keeps a zero gradient, as in the reference (0·NaN in the full-R sums gave NaN there); other slots
    stay finite."""
    backend_or_skip(backend, device)
    num_slots, max_rank, k, n, ranks = 3, 8, 16, 12, [3, 8, 5]
    lora_a, lora_b = _adapters(num_slots, max_rank, k, n, ranks, torch.float32, device)
    x = randn(num_tokens, k, device=device)
    weight = randn(n, k, device=device, scale=k ** -0.5)
    ids = (torch.arange(num_tokens) % num_slots).to(device)
    x[0, 3] = float("nan")  # token 0 is slot 0's
    leaves = [t.clone().requires_grad_(True) for t in (lora_a, lora_b)]
    y = lk.multi_lora_linear(x, weight, *leaves, ids, [2.0, 1.0, 0.5], ranks=ranks, backend=backend)
    y.backward(randn(num_tokens, n, device=device))
    grad_a, grad_b = leaves[0].grad, leaves[1].grad
    for slot, rank in enumerate(ranks):
        assert torch.count_nonzero(grad_a[slot, rank:]) == 0 and torch.count_nonzero(grad_b[slot, :, rank:]) == 0
    assert torch.isnan(grad_a[0, :ranks[0]]).any() and torch.isnan(grad_b[0, :, :ranks[0]]).any()
    for slot in (1, 2):
        assert torch.isfinite(grad_a[slot, :ranks[slot]]).all() and torch.isfinite(grad_b[slot, :, :ranks[slot]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_nan_adapter_leaves_the_other_slots_tokens_finite(backend, dtype, device):
    """A NaN inside one slot's rank (a broken adapter) makes that slot's tokens NaN and no other token: float64 runs
    the slot-by-slot torch composition, where each slot's product must keep the other slots' rows out (0·NaN)."""
    backend_or_skip(backend, device)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend runs float32/float16/bfloat16")
    ranks = [3, 2, 4]
    lora_a, lora_b = _adapters(3, 4, 10, 6, ranks, dtype, device)
    lora_a[1, 0, 0] = float("nan")
    x, weight = randn(7, 10, dtype=dtype, device=device), randn(6, 10, dtype=dtype, device=device)
    ids = torch.tensor([0, 1, 2, -1, 0, 2, 1], device=device)
    y = lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, [0.5, 2.0, 1.5], ranks=ranks, backend=backend)
    assert torch.isnan(y[ids == 1]).all()
    assert torch.isfinite(y[ids != 1]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_multi_lora_under_torch_func_keeps_the_input_dtype(backend, dtype, device):
    """Under torch.func (the torch composition) a 16-bit call returns its output in the input dtype, as the autograd
    path does, not the composition's fp32 accumulator's."""
    backend_or_skip(backend, device)
    from torch.func import vjp
    x, weight, lora_a, lora_b, ids, scalings, ranks = _grouped_inputs(device, dtype)
    lora_a, lora_b = lora_a.nan_to_num(0.0), lora_b.nan_to_num(0.0)
    y, _ = vjp(lambda a: lk.multi_lora_linear(x, weight, a, lora_b, ids, scalings, ranks=ranks, backend=backend),
               lora_a)
    assert y.dtype == dtype
    expected = reference.multi_lora_linear(x, weight, lora_a, lora_b, ids, scalings, None, ranks)
    assert_close(y, expected, dtype, "y")


def _grouped_inputs(device, dtype=torch.float32):
    num_slots, max_rank, k, n, ranks = 3, 4, 10, 6, [4, 2, 3]
    lora_a, lora_b = _adapters(num_slots, max_rank, k, n, ranks, dtype, device)
    x = randn(9, k, dtype=dtype, device=device)
    weight = randn(n, k, dtype=dtype, device=device, scale=k ** -0.5)
    ids = torch.tensor([0, 1, 2, -1, 0, 2, 1, 0, 2], device=device)
    return x, weight, lora_a, lora_b, ids, torch.tensor([0.5, 2.0, 1.5]), ranks


@pytest.mark.parametrize("backend", GROUPED_BACKENDS + ["reference"])
def test_multi_lora_gradients_with_finite_garbage_past_each_rank(backend, device):
    """The padding past each rank holds finite garbage (the other tests' is NaN, zeroed for the gradient checks): a
    backward that read A or B past the ranks (at R) passed them. The gradients are the reference's and both
    factors' padding gets exactly zero. float32 (float64 runs the autograd composition)."""
    backend_or_skip(backend, device)
    num_slots, max_rank, k, n, m = 3, 8, 20, 12, 10
    ranks = [8, 2, 5]
    x = randn(m, k, dtype=torch.float64)
    weight = randn(n, k, dtype=torch.float64, scale=k ** -0.5)
    lora_a = randn(num_slots, max_rank, k, dtype=torch.float64, scale=k ** -0.5)
    lora_b = randn(num_slots, n, max_rank, dtype=torch.float64, scale=max_rank ** -0.5)
    ids = torch.tensor([0, 1, 2, -1, 1, 0, 2, 2, 1, 0])
    scalings = torch.tensor([0.5, 1.0, 2.0])
    dy = randn(m, n, dtype=torch.float64)
    ref = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
    reference.multi_lora_linear_autograd(ref[0], weight, ref[1], ref[2], ids, scalings, None,
                                         torch.tensor(ranks)).backward(dy)
    leaves = [t.float().to(device).requires_grad_(True) for t in (x, lora_a, lora_b)]
    lk.multi_lora_linear(leaves[0], weight.float().to(device), leaves[1], leaves[2], ids.to(device), scalings,
                         ranks=ranks, backend=backend).backward(dy.float().to(device))
    for name, leaf, expected in zip(("x", "lora_a", "lora_b"), leaves, ref):
        assert_close(leaf.grad, expected.grad, torch.float32, f"d{name}")
    for slot, rank in enumerate(ranks):
        assert torch.count_nonzero(leaves[1].grad[slot, rank:]) == 0, f"dA padding of slot {slot}"
        assert torch.count_nonzero(leaves[2].grad[slot, :, rank:]) == 0, f"dB padding of slot {slot}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", GROUPED_BACKENDS + ["reference"])
def test_multi_lora_refuses_scalings_that_require_grad(backend, dtype, device):
    """scalings are constants (docstring, README): a tensor of them that requires grad is refused before any work,
    on every backend and dtype, and accepted under no_grad. Before, the kernels' Function and the reference left its
    gradient None without a word while the float64 composition differentiated it."""
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the triton backend runs 16-bit and float32 only")
    backend_or_skip(backend, device)
    x, weight, lora_a, lora_b, ids, scalings, ranks = _grouped_inputs(device, dtype)
    lora_a.requires_grad_(True)
    learnable = scalings.clone().requires_grad_(True)
    with pytest.raises(ValueError, match=r"multi_lora_linear: scalings expected a tensor that does not require grad"):
        lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, learnable, ranks=ranks, backend=backend)
    with torch.no_grad():
        y = lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, learnable, ranks=ranks, backend=backend)
    expected = reference.multi_lora_linear(x.double().cpu(), weight.double().cpu(), lora_a.detach().double().cpu(),
                                           lora_b.double().cpu(), ids.cpu(), scalings, None, torch.tensor(ranks))
    assert_close(y, expected, dtype, "y under no_grad")


@pytest.mark.parametrize("factor_requires_grad", [False, True], ids=["plain", "factor_requires_grad"])
@pytest.mark.parametrize("backend", GROUPED_BACKENDS + ["reference"])
def test_multi_lora_eager_forward_ad_gives_the_jvp_of_the_reference(backend, factor_requires_grad, device):
    """torch.autograd.forward_ad through multi_lora_linear: the tangent of y (tangents on x and the stacked lora_a)
    is the reference's JVP on every backend. Triton returned the base layer's tangent alone (silently), the C++ ops
    raised; the torch composition runs there now."""
    backend_or_skip(backend, device)
    import torch.autograd.forward_ad as fwad
    x, weight, lora_a, lora_b, ids, scalings, ranks = _grouped_inputs(device)
    tx, ta = torch.randn_like(x), torch.randn_like(lora_a)
    lora_b.requires_grad_(factor_requires_grad)

    def run(x, a, name):
        return lk.multi_lora_linear(x, weight, a, lora_b, ids, scalings, ranks=ranks, backend=name)

    _, expected = torch.func.jvp(lambda x, a: run(x, a, "reference"), (x, lora_a), (tx, ta))
    with fwad.dual_level():
        primal, tangent = fwad.unpack_dual(run(fwad.make_dual(x, tx), fwad.make_dual(lora_a, ta), backend))
    assert tangent is not None, "y lost its tangent"
    assert_close(primal, run(x, lora_a, "reference"), torch.float32, "y")
    assert_close(tangent, expected, torch.float32, "tangent")


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_multi_lora_double_backward_matches_the_reference(backend, device):
    """create_graph=True through multi_lora_linear: the reference's second derivatives on every backend, NaN padding
    included, with no warning (the kernels' gradients are not differentiable)."""
    backend_or_skip(backend, device)
    x, weight, lora_a, lora_b, ids, scalings, ranks = _grouped_inputs(device)
    dy = randn(9, 6, device=device)

    def penalty_gradients(fn, leaves, dy):
        first = torch.autograd.grad((fn(*leaves) * dy).sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in first), leaves)

    leaves = [t.clone().requires_grad_(True) for t in (x, weight, lora_a, lora_b)]
    with warnings.catch_warnings():
        # torch's "autograd kernel was not registered" is a UserWarning; the triton 3.6 interpreter itself raises numpy
        # DeprecationWarnings, which are not ours
        warnings.simplefilter("error", UserWarning)
        got = penalty_gradients(lambda *t: lk.multi_lora_linear(*t, ids, scalings, ranks=ranks, backend=backend),
                                leaves, dy)
    ref_leaves = [t.double().cpu().nan_to_num(0.0).requires_grad_(True) for t in (x, weight, lora_a, lora_b)]
    expected = penalty_gradients(lambda *t: reference.multi_lora_linear_autograd(*t, ids.cpu(), scalings, None,
                                                                                 torch.tensor(ranks)),
                                 ref_leaves, dy.double().cpu())
    for name, g, e in zip(("x", "weight", "lora_a", "lora_b"), got, expected):
        assert_close(g, e, torch.float32, f"d(penalty)/d{name}")


def _gradient_and_its_dy_derivative(fn, inputs, trained, dy):
    """create_graph=True: the gradient of <fn(*inputs), dy> with respect to inputs[trained], and the derivative of
    the sum of its squares with respect to dy (dy requires grad: a gradient need not depend on its own input)."""
    dy = dy.detach().requires_grad_(True)
    first, = torch.autograd.grad(fn(*inputs), inputs[trained], dy, create_graph=True)
    second, = torch.autograd.grad(first.square().sum(), dy)
    return first, second


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_multi_lora_double_backward_of_the_weight_alone_matches_the_reference(backend, device, monkeypatch):
    """create_graph=True with the base weight alone requiring grad (the adapters and x frozen: a gradient penalty in
    a base fine-tune): dW and its derivative in dY are the reference's. With no LoRA input to differentiate, the
    differentiable backward must ask autograd for no gradient of its LoRA term (torch.autograd.grad of no inputs
    raises), nor build that term (L·M·R·(K+N) work for nothing);
    test_multi_lora_double_backward_matches_the_reference trains every input at once."""
    backend_or_skip(backend, device)
    x, weight, lora_a, lora_b, ids, scalings, ranks = _grouped_inputs(device)
    dy = randn(9, 6, device=device)
    weight.requires_grad_(True)

    def unwanted_term(*args):
        raise AssertionError("the LoRA term was built for a backward that differentiates none of its inputs")

    monkeypatch.setattr(functional, "_multi_lora_term", unwanted_term)
    got = _gradient_and_its_dy_derivative(
        lambda *t: lk.multi_lora_linear(*t, ids, scalings, ranks=ranks, backend=backend), [x, weight, lora_a, lora_b],
        1, dy)
    ref_inputs = [t.detach().double().cpu().nan_to_num(0.0) for t in (x, weight, lora_a, lora_b)]
    ref_inputs[1].requires_grad_(True)
    expected = _gradient_and_its_dy_derivative(
        lambda *t: reference.multi_lora_linear_autograd(*t, ids.cpu(), scalings, None, torch.tensor(ranks)),
        ref_inputs, 1, dy.double().cpu())
    for name, g, e in zip(("dweight", "d(|dweight|²)/d(dy)"), got, expected):
        assert_close(g, e, torch.float32, name)


@pytest.mark.parametrize("trained", ["x", "lora_b"])
@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_multi_lora_double_backward_without_x_kept(backend, trained, device):
    """create_graph=True where the forward kept no x (the slots' A and the weight frozen): dX of the LoRA term,
    linear in x, and dB from the saved S; each gradient and its derivative in dY are the reference's. x and lora_b
    both trained there need x for dB's derivative in x: refused by name, as lora_linear does."""
    backend_or_skip(backend, device)
    x, weight, lora_a, lora_b, ids, scalings, ranks = _grouped_inputs(device)
    dy = randn(9, 6, device=device)
    position = {"x": 0, "lora_b": 3}[trained]
    inputs = [x, weight, lora_a, lora_b]
    inputs[position].requires_grad_(True)
    got = _gradient_and_its_dy_derivative(
        lambda *t: lk.multi_lora_linear(*t, ids, scalings, ranks=ranks, backend=backend), inputs, position, dy)
    ref_inputs = [t.detach().double().cpu().nan_to_num(0.0) for t in inputs]
    ref_inputs[position].requires_grad_(True)
    expected = _gradient_and_its_dy_derivative(
        lambda *t: reference.multi_lora_linear_autograd(*t, ids.cpu(), scalings, None, torch.tensor(ranks)),
        ref_inputs, position, dy.double().cpu())
    for name, g, e in zip((f"d{trained}", f"d(|d{trained}|²)/d(dy)"), got, expected):
        assert_close(g, e, torch.float32, name)

    both = [t.detach().requires_grad_(name in ("x", "lora_b"))
            for name, t in zip(("x", "weight", "lora_a", "lora_b"), inputs)]
    y = lk.multi_lora_linear(*both, ids, scalings, ranks=ranks, backend=backend)
    with pytest.raises(RuntimeError, match="lora_b and x requiring gradients but lora_a and the weight frozen"):
        torch.autograd.grad(y, [both[0], both[3]], dy, create_graph=True)


@pytest.mark.parametrize("trained", ["lora_a", "lora_b"])
@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_multi_lora_double_backward_of_float32_slots_without_an_input_gradient(backend, trained, device):
    """create_graph=True through a bf16 layer's float32 slots (MultiLoRALinear's adapter_dtype) with x frozen: the
    Function's backward casts the slots to bf16 again, in the graph, for autograd's LoRA term, which needs both
    slots whatever x needs (the first-order backward casts lora_a only for dX and lora_b only for dX and dA). The
    trained slot's float32 gradient and its derivative in dY are the reference's, on the slots rounded to bf16 as
    the forward rounds them."""
    backend_or_skip(backend, device)
    dtype = torch.bfloat16
    x, weight, lora_a, lora_b, ids, scalings, ranks = _grouped_inputs(device)
    x, weight = x.to(dtype), weight.to(dtype)
    lora_a, lora_b = lora_a.nan_to_num(0.0), lora_b.nan_to_num(0.0)
    position = {"lora_a": 2, "lora_b": 3}[trained]
    dy = randn(9, 6, dtype=dtype, device=device)
    inputs = [x, weight, lora_a, lora_b]
    inputs[position].requires_grad_(True)
    got = _gradient_and_its_dy_derivative(
        lambda *t: functional.multi_lora_linear_float32_factors(*t, ids, scalings, None, ranks, backend), inputs,
        position, dy)
    assert got[0].dtype == torch.float32
    ref_inputs = [t.detach().to(dtype).double().cpu() for t in inputs]
    ref_inputs[position].requires_grad_(True)
    expected = _gradient_and_its_dy_derivative(
        lambda *t: reference.multi_lora_linear_autograd(*t, ids.cpu(), scalings, None, torch.tensor(ranks)),
        ref_inputs, position, dy.double().cpu())
    for name, g, e in zip((f"d{trained}", f"d(|d{trained}|²)/d(dy)"), got, expected):
        assert_close(g, e, dtype, name)


@pytest.mark.parametrize("training", [True, False], ids=["training", "no_grad"])
@pytest.mark.parametrize("backend", ["reference", *GROUPED_BACKENDS])
def test_float32_slots_of_a_bf16_layer_are_rounded_to_bf16_on_every_backend(backend, training, device):
    """A bf16 layer's float32 slots (MultiLoRALinear's adapter_dtype) are rounded to bf16 for the forward on every
    backend, the reference (the spec, in float64) included, as lora_linear's float32 factors are: y = 256·A − 256
    is 0 with A = 1 + 2⁻¹⁰ rounded to bf16 (1) and 0.25 with it unrounded. With gradients the kernel backends cast
    inside the autograd Function and the reference up front; without, every backend casts up front (the grouped
    kernels read one dtype)."""
    backend_or_skip(backend, device)
    x = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
    weight = torch.full((1, 1), -256.0, dtype=torch.bfloat16, device=device)
    lora_a = torch.full((1, 1, 1), 1 + 2 ** -10, device=device, requires_grad=training)  # bf16 rounds it to 1
    lora_b = torch.full((1, 1, 1), 256.0, device=device, requires_grad=training)
    with torch.set_grad_enabled(training):
        y = functional.multi_lora_linear_float32_factors(x, weight, lora_a, lora_b, torch.tensor([0], device=device),
                                                         torch.tensor([1.0]), None, None, backend)
    assert y.dtype == torch.bfloat16 and y.item() == 0.0, f"y = {y.item()}: the float32 slots were not rounded"
    if training:  # the rounded slots' gradients, in float32: dA = B·x = 256, dB = A·x = 1
        y.sum().backward()
        assert lora_a.grad.dtype == torch.float32
        assert (lora_a.grad.item(), lora_b.grad.item()) == (256.0, 1.0)


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_multi_lora_under_torch_func_grad(backend, device):
    """torch.func.grad of a loss of multi_lora_linear in the stacked adapters: the reference's gradients (the
    autograd.Function without setup_context refused every functorch transform)."""
    backend_or_skip(backend, device)
    from torch.func import grad
    x, weight, lora_a, lora_b, ids, scalings, ranks = _grouped_inputs(device)

    def loss(a, b, backend):
        return lk.multi_lora_linear(x, weight, a, b, ids, scalings, ranks=ranks, backend=backend).square().sum()

    got = grad(loss, argnums=(0, 1))(lora_a, lora_b, backend)
    ref_leaves = [t.double().cpu().requires_grad_(True) for t in (lora_a, lora_b)]
    reference.multi_lora_linear_autograd(x.double().cpu(), weight.double().cpu(), *ref_leaves, ids.cpu(), scalings,
                                         None, torch.tensor(ranks)).square().sum().backward()
    for name, g, leaf in zip(("lora_a", "lora_b"), got, ref_leaves):
        assert_close(g, leaf.grad, torch.float32, f"torch.func.grad {name}")


@pytest.mark.parametrize("backend", GROUPED_BACKENDS + ["reference"])
def test_functionalize_runs_the_grouped_ops(backend, device):
    """torch.func.functionalize over multi_lora_linear and lk.ops.*: eager's results. Its tensors hold no values the
    host may read: scalings given as a list were read back with .tolist() (a RuntimeError of torch's on unallocated
    storage) and the overlap check of an in-place op read the storages' addresses ("invalid python storage"). The
    in-place ops run on the torch and reference backends; torch cannot functionalize a custom op that writes in place
    outside torch.compile/export (the cpu backend's expand, the triton kernels lk.ops.* call: they write an out
    tensor), and says so naming it."""
    backend_or_skip(backend, device)
    from torch.func import functionalize
    x, weight, lora_a, lora_b, ids, scalings, ranks = _grouped_inputs(device)
    scaling_list = scalings.tolist()
    batch = lk.LoRABatch.from_adapter_ids(ids, lora_a.shape[0])
    calls = {
        "multi_lora_linear": lambda x: lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, scaling_list, ranks=ranks,
                                                            backend=backend),
        "lora_shrink": lambda x: lk.ops.lora_shrink(x, lora_a, batch, scaling_list, ranks, backend=backend),
    }
    in_place = {
        "lora_expand": lambda x: lk.ops.lora_expand(x[:, :4] * 1.0, lora_b, batch, torch.zeros_like(x[:, :6]), 0,
                                                     ranks, backend=backend),
        "add_lora": lambda x: lk.ops.add_lora(torch.zeros_like(x[:, :6]), x, [lora_a], [lora_b], batch, scaling_list,
                                               ranks, [6], backend=backend),
    }
    runs = {"torch": {**calls, **in_place}, "reference": {**calls, **in_place}, "cpu": calls,
            "triton": {"multi_lora_linear": None}}[backend]
    for name, call in {**calls, **in_place}.items():
        if name in runs:
            assert_close(functionalize(call)(x), call(x), torch.float32, name)
        else:
            with pytest.raises(RuntimeError, match="operator whose output has alias annotations: lora_kernels"):
                functionalize(call)(x)
    if backend != "triton":  # the factors as the input, x not: the ranks made from the list hold no values either
        shrink_of_a = lambda a: lk.ops.lora_shrink(x, a, batch, scaling_list, ranks, backend=backend)
        assert_close(functionalize(shrink_of_a)(lora_a), shrink_of_a(lora_a), torch.float32, "lora_shrink of lora_a")


@pytest.mark.parametrize("backend", GROUPED_BACKENDS + ["reference"])
def test_multi_lora_vmap_over_the_adapter_ids(backend, device):
    """torch.func.vmap mapping the adapter ids as well as x (sequences with ids of their own), and per-sample
    gradients of the stacked adapters under it: each sample's output and gradient are the reference's for that
    sample. Before, building the batch read the ids' range on the host (vmap's ".item() on a Tensor" error), and
    the reference backend's loop each token's slot."""
    backend_or_skip(backend, device)
    from torch.func import grad, vmap
    x, weight, lora_a, lora_b, ids, scalings, ranks = _grouped_inputs(device)
    xs, id_rows = torch.stack([x, x.flip(0)]), torch.stack([ids, ids.roll(1)])

    def run(a, x, ids):
        return lk.multi_lora_linear(x, weight, a, lora_b, ids, scalings, ranks=ranks, backend=backend)

    ys = vmap(run, in_dims=(None, 0, 0))(lora_a, xs, id_rows)
    grads = vmap(grad(lambda a, x, ids: run(a, x, ids).square().sum()), in_dims=(None, 0, 0))(lora_a, xs, id_rows)
    for sample in range(2):
        ref_a = lora_a.double().cpu().requires_grad_(True)
        expected = reference.multi_lora_linear_autograd(xs[sample].double().cpu(), weight.double().cpu(), ref_a,
                                                        lora_b.double().cpu(), id_rows[sample].cpu(), scalings, None,
                                                        torch.tensor(ranks))
        expected.square().sum().backward()
        assert_close(ys[sample], expected, torch.float32, f"y of sample {sample}")
        assert_close(grads[sample], ref_a.grad, torch.float32, f"per-sample d_lora_a of sample {sample}")


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_multi_lora_vmap_over_the_adapter_ids_counts_out_of_range_ids_as_base_only(backend, device):
    """Under vmap the ids' range cannot be checked on the host (README, "Higher-order gradients and torch.func"): an
    id out of range, above or below, counts as -1, as the kernels treat unchecked ids, never as another slot."""
    backend_or_skip(backend, device)
    from torch.func import vmap
    x, weight, lora_a, lora_b, ids, scalings, ranks = _grouped_inputs(device)
    bad = ids.clone()
    bad[[1, 4, 6]] = torch.tensor([3, -2, 1000], device=device)  # 3 slots: 3 and 1000 above, -2 below
    expected = bad.clone()
    expected[[1, 4, 6]] = -1
    ys = vmap(lambda ids: lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, scalings, ranks=ranks,
                                               backend=backend))(torch.stack([bad, ids]))
    want = reference.multi_lora_linear(x.double().cpu(), weight.double().cpu(), lora_a.double().cpu(),
                                       lora_b.double().cpu(), expected.cpu(), scalings, None, torch.tensor(ranks))
    assert_close(ys[0], want, torch.float32, "y with out-of-range ids")
    assert_close(ys[1], lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, scalings, ranks=ranks,
                                             backend="reference"), torch.float32, "y of the valid ids")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)  # fp16: the torch backward's per_token
@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_a_hand_built_batch_with_ids_past_the_slots_trains_them_as_base_only(backend, dtype, device):
    """A LoRABatch built by hand (dataclasses.replace, the constructor) may hold ids outside [-1, L), which every
    backend counts as -1 (base only), as the reference does (from_adapter_ids maps them to -1 itself, so only such a
    batch reaches the ops with them). Training reads each token's scaling (functional.per_token: the forward's, and
    the torch backend's fp16 backward's): a gather that did not clamp the ids into [0, L) read scalings[-1], [3] or
    [1000] (an IndexError on a CPU, another tensor's memory on a GPU). Output and gradients are the reference's."""
    backend_or_skip(backend, device)
    import dataclasses
    x, weight, lora_a, lora_b, ids, scalings, ranks = _grouped_inputs(device, dtype)
    lora_a, lora_b = lora_a.nan_to_num(0.0), lora_b.nan_to_num(0.0)
    base_only = ids.clone()
    base_only[[1, 4, 6]] = -1
    hand_ids = base_only.clone()
    hand_ids[[1, 4, 6]] = torch.tensor([3, -2, 1000], device=device)  # 3 slots: 3 (= L) and 1000 above, -2 below
    batch = dataclasses.replace(LoRABatch.from_adapter_ids(base_only, 3), adapter_ids=hand_ids.to(torch.int32))
    dy = randn(9, 6, dtype=dtype, device=device)
    leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
    y = lk.multi_lora_linear(leaves[0], weight, leaves[1], leaves[2], batch, scalings, ranks=ranks, backend=backend)
    y.backward(dy)
    ref_leaves = [t.double().cpu().requires_grad_(True) for t in (x, lora_a, lora_b)]
    expected = reference.multi_lora_linear_autograd(ref_leaves[0], weight.double().cpu(), *ref_leaves[1:],
                                                    base_only.cpu(), scalings, None, torch.tensor(ranks))
    expected.backward(dy.double().cpu())
    assert_close(y, expected, dtype, "y")
    for name, leaf, ref_leaf in zip(("x", "lora_a", "lora_b"), leaves, ref_leaves):
        assert_close(leaf.grad, ref_leaf.grad, dtype, f"d{name}", scale=2.0)


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_multi_lora_torch_func_under_autocast_keeps_the_lora_term_in_fp32(backend):
    """Under torch.func (the torch composition) inside torch.autocast the LoRA term accumulates in fp32, as the
    kernels' paths and lora_linear's composition do: the same as without autocast on the inputs autocast casts to.
    Before, autocast ran the composition's fp32 matmuls in bf16."""
    backend_or_skip(backend, torch.device("cpu"))
    from torch.func import vmap
    x, weight, lora_a, lora_b, ids, scalings, ranks = _grouped_inputs(torch.device("cpu"))

    def run(x, weight, lora_a, lora_b):
        return lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, scalings, ranks=ranks, backend=backend)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = vmap(run, in_dims=(0, None, None, None))(x[None], weight, lora_a, lora_b)
    cast_first = vmap(run, in_dims=(0, None, None, None))(*(t.bfloat16() for t in (x[None], weight, lora_a, lora_b)))
    assert under_autocast.dtype == torch.bfloat16
    torch.testing.assert_close(under_autocast, cast_first, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantized_weight_subclass_serves_and_trains_as_dequantized(backend, dtype):
    """A base weight that is a tensor subclass (torchao's quantized weights; here conftest's QuantizedWeight): the base
    GEMM is its own F.linear and the grouped kernels read only x and the adapters, so serving runs every kernel
    backend; gradients come from the torch composition (its dX through the subclass's F.linear). Outputs and
    gradients are those of the dequantized weight. Before, training failed at dY @ W ("unimplemented operator
    aten.mm"), and the cpu backend's 16-bit forward past 16 tokens at its float32 copy of the weight."""
    backend_or_skip(backend, torch.device("cpu"))
    quantized, plain = quantized_linear(24, 16, dtype=dtype)
    num_slots, rank, m = 3, 4, 40
    x = randn(m, 24, dtype=dtype)
    lora_a, lora_b = randn(num_slots, rank, 24, dtype=dtype, scale=0.2), randn(num_slots, 16, rank, dtype=dtype)
    ids = torch.arange(m) % (num_slots + 1) - 1
    results = []
    for weight in (quantized.weight, plain.weight):
        # the bias detached: nothing requires grad, so this is the serving path (the layer's bias does)
        served = lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, [2.0, 0.5, 1.0], quantized.bias.detach(),
                                      backend=backend)
        leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
        y = lk.multi_lora_linear(*leaves[:1], weight, *leaves[1:], ids, [2.0, 0.5, 1.0], quantized.bias,
                                 backend=backend)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=dtype).reshape(y.shape))
        results.append([served, y.detach()] + [leaf.grad for leaf in leaves])
    for name, got, expected in zip(("served", "y", "dx", "d_lora_a", "d_lora_b"), *results):
        assert_close(got, expected, dtype, name)
    with pytest.raises(TypeError, match=r"multi_lora_linear: backend 'reference' cannot read weight, a conftest."
                                        r"QuantizedWeight \(a tensor subclass"):
        lk.multi_lora_linear(x, quantized.weight, lora_a, lora_b, ids, [2.0, 0.5, 1.0], backend="reference")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_quantized_weight_subclass_in_a_batch_with_no_active_adapter(backend):
    """MultiLoRALinear's shortcut for a batch without adapter rows (multi_lora_base_linear) on a subclass base
    weight: its own F.linear, as the base layer computes (the cpu backend's float32 copy past 16 rows of a bf16
    layer is not among its ops)."""
    backend_or_skip(backend, torch.device("cpu"))
    quantized, _ = quantized_linear(24, 16, dtype=torch.bfloat16)
    model = lk.prepare_multi_adapter(nn.Sequential(quantized), ["0"], max_adapters=2, max_rank=4, backend=backend)
    x = randn(2, 20, 24, dtype=torch.bfloat16)  # 40 rows: past CPU_DECODE_MAX_M
    with torch.no_grad(), lk.set_batch_adapters(model, "__base__"):
        torch.testing.assert_close(model(x), quantized(x), rtol=0, atol=0)


@pytest.mark.parametrize("training", [None, "lora_a", "lora_b"])
def test_a_batch_without_adapters_skips_the_grouped_ops_unless_slots_train(monkeypatch, training):
    """set_batch_adapters naming no adapter: the base GEMM alone (the grouped ops cost more than a decode-size base
    GEMM), with the layer's backend; slots being trained (either factor) still get their zero gradients."""
    from lora_kernels import modules

    model = lk.prepare_multi_adapter(nn.Sequential(nn.Linear(8, 6)), ["0"], max_adapters=2, max_rank=4,
                                     backend="reference")
    layer, x = model[0], torch.randn(2, 8)
    grouped, base_backends = [], []
    multi_lora_linear, multi_lora_base_linear = (modules.multi_lora_linear_float32_factors,
                                                 modules.multi_lora_base_linear)
    monkeypatch.setattr(modules, "multi_lora_linear_float32_factors",
                        lambda *a, **k: grouped.append(k["backend"]) or multi_lora_linear(*a, **k))
    monkeypatch.setattr(modules, "multi_lora_base_linear",
                        lambda *a, **k: base_backends.append(k["backend"]) or multi_lora_base_linear(*a, **k))
    if training:
        getattr(layer, training).requires_grad_(True)
    with lk.set_batch_adapters(model, ["__base__", "__base__"]):
        out = model(x)
    if training:
        out.sum().backward()
        assert grouped == ["reference"] and torch.count_nonzero(getattr(layer, training).grad) == 0
    else:
        assert grouped == [] and base_backends == ["reference"]


def test_repr_names_the_layout_and_a_slot_dtype_other_than_the_base_weights():
    """A Conv1D base ([in, out] weight) and float32 slots on a 16-bit model show in the repr; defaults do not."""
    from transformers.pytorch_utils import Conv1D

    assert lk.MultiLoRALinear(nn.Linear(8, 6), 2, 4).extra_repr() == (
        "in_features=8, out_features=6, max_adapters=2, max_rank=4, backend='auto'")
    layer = lk.MultiLoRALinear(Conv1D(6, 8).to(torch.bfloat16), 2, 4, adapter_dtype=torch.float32)
    assert layer.extra_repr() == ("in_features=8, out_features=6, max_adapters=2, max_rank=4, fan_in_fan_out=True, "
                                  "adapter_dtype=torch.float32, backend='auto'")


def test_explicit_adapter_ids_win_over_set_batch_adapters():
    """forward(x, adapter_ids) uses the ids given, also while set_batch_adapters is in effect (its rows are for
    forward(x) without ids)."""
    model = lk.prepare_multi_adapter(nn.Sequential(nn.Linear(8, 6)), ["0"], max_adapters=2, max_rank=4)
    a, b, x = torch.randn(2, 8), torch.randn(6, 2), torch.randn(2, 8)
    model[0].set_adapter(0, a, b, 0.5)
    with torch.no_grad(), lk.set_batch_adapters(model, ["__base__", "__base__"]):
        y = model[0](x, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(y, model[0].base_layer(x) + 0.5 * (x @ a.T @ b.T))


def test_quantized_weight_subclass_with_the_reference_backend_is_refused_at_construction():
    """The reference backend computes the base in float64, which a subclass weight does not convert to: refused when
    the layer is built (as LoRALinear refuses its kernel backends), not at the first forward, and a refused
    prepare_multi_adapter leaves the model as it was. A layer switched to "reference" afterwards is refused by
    multi_lora_linear."""
    quantized, _ = quantized_linear(24, 16, dtype=torch.bfloat16)
    words = r"backend 'reference' cannot read weight, a conftest.QuantizedWeight \(a tensor subclass"
    with pytest.raises(TypeError, match=r"^MultiLoRALinear: " + words):
        lk.MultiLoRALinear(quantized, max_adapters=2, max_rank=4, backend="reference")
    model = nn.Sequential(quantized)
    with pytest.raises(TypeError, match=r"^prepare_multi_adapter: module '0': " + words):
        lk.prepare_multi_adapter(model, ["0"], max_adapters=2, max_rank=4, backend="reference")
    assert model[0] is quantized and quantized.bias.requires_grad  # not frozen
    model = lk.prepare_multi_adapter(model, ["0"], max_adapters=2, max_rank=4, backend="cpu")
    model[0].backend = "reference"
    x = randn(3, 24, dtype=torch.bfloat16)
    with torch.no_grad(), pytest.raises(TypeError, match=r"^multi_lora_linear: " + words):
        model[0](x, torch.tensor([0, -1, 1]))
    with torch.no_grad(), lk.set_batch_adapters(model, "__base__"), pytest.raises(TypeError, match=words):
        model(x)  # the shortcut for a batch without adapter rows (multi_lora_base_linear)

@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_quantized_weight_subclass_under_autocast_runs_its_own_linear_uncast(backend):
    """Under torch.autocast a subclass weight is left uncast, as nn.Linear leaves it (its own F.linear runs under
    autocast), serving and training: as the dequantized weight under autocast. Before, the cast of the weight failed
    ("unimplemented operator aten._to_copy"; torchao 0.18's Int8Tensor stays float32, which the checks refused)."""
    backend_or_skip(backend, "cpu")
    quantized, plain = quantized_linear(24, 16)
    num_slots, rank, m = 3, 4, 40
    x = randn(m, 24)
    lora_a, lora_b = randn(num_slots, rank, 24, scale=0.2), randn(num_slots, 16, rank)
    ids = torch.arange(m) % (num_slots + 1) - 1
    results = []
    for weight in (quantized.weight, plain.weight):
        leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            served = lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, [2.0, 0.5, 1.0], quantized.bias,
                                          backend=backend)
            y = lk.multi_lora_linear(*leaves[:1], weight, *leaves[1:], ids, [2.0, 0.5, 1.0], quantized.bias,
                                     backend=backend)
        y.float().backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        results.append([served, y.detach()] + [leaf.grad for leaf in leaves])
    assert results[0][0].dtype == results[0][1].dtype == torch.bfloat16
    for name, got, expected in zip(("served", "y", "dx", "d_lora_a", "d_lora_b"), *results):
        assert_close(got, expected, torch.bfloat16, name)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_quantized_16_bit_base_weight_takes_a_float32_input_as_its_own_linear_does(backend):
    """A bfloat16 quantized weight with float32 inputs, biases and slots (peft.prepare_model_for_kbit_training on a
    torchao-quantized bfloat16 model, see test_modules): its own F.linear takes them (torchao's Int8Tensor computes
    in the input's dtype), so serving and training compute as on the dequantized weight in float32. Before, the
    call was refused ("multi_lora_linear: weight expected dtype torch.float32 (same as x), got torch.bfloat16")."""
    backend_or_skip(backend, "cpu")
    quantized, _ = quantized_linear(24, 16, dtype=torch.bfloat16)
    bias = quantized.bias.detach().float()
    plain_weight = quantized.weight.dequantize(torch.float32)
    num_slots, rank, m = 3, 4, 40
    x = randn(m, 24)
    lora_a, lora_b = randn(num_slots, rank, 24, scale=0.2), randn(num_slots, 16, rank)
    ids = torch.arange(m) % (num_slots + 1) - 1
    results = []
    for weight in (quantized.weight, plain_weight):
        served = lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, [2.0, 0.5, 1.0], bias, backend=backend)
        leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
        y = lk.multi_lora_linear(*leaves[:1], weight, *leaves[1:], ids, [2.0, 0.5, 1.0], bias, backend=backend)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        results.append([served, y.detach()] + [leaf.grad for leaf in leaves])
    assert results[0][0].dtype == results[0][1].dtype == torch.float32
    for name, got, expected in zip(("served", "y", "dx", "d_lora_a", "d_lora_b"), *results):
        assert_close(got, expected, torch.float32, name)


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_multi_lora_torch_func_compiled_whole_matches_eager(backend, device):
    """torch.compile(torch.func.grad(loss), fullgraph=True) over multi_lora_linear: the eager transform's gradients
    (asked whether a transform was active only outside tracing, the cpu backend's forward op, which has no
    derivative, was traced under the transform: zero gradients, silently)."""
    backend_or_skip(backend, device)
    from torch.func import grad
    x, weight, lora_a, lora_b, ids, scalings, ranks = _grouped_inputs(device)

    def loss(a, b):
        return lk.multi_lora_linear(x, weight, a, b, ids, scalings, ranks=ranks, backend=backend).square().sum()

    step = grad(loss, argnums=(0, 1))
    torch.testing.assert_close(torch.compile(step, fullgraph=True, backend="aot_eager")(lora_a, lora_b),
                               step(lora_a, lora_b))


# ------------------------------------------------------------------ README claims, checked as written (helper79)

@pytest.mark.parametrize("deterministic", [False, True], ids=["split_k", "deterministic"])
@pytest.mark.parametrize("m", [6, 64], ids=["decode", "prefill"])
def test_add_lora_with_triton_allocates_nothing_given_buffer_scalings_and_ranks_tensors(m, deterministic, monkeypatch):
    """README, Serving stacks: for CUDA graphs, add_lora given its buffer, scalings and ranks as tensors allocates
    nothing on the Triton path; ranks=None makes a ranks tensor (one per distinct R) on every call, and without a
    buffer the shrink results are allocated. The kernels are stubbed out (the interpreter copies every argument), so
    what is counted is every CPU allocation made on the way to them, torch.tensor of a list included."""
    backend_or_skip("triton", torch.device("cpu"))
    import triton
    from torch.profiler import ProfilerActivity, profile
    launches = []
    monkeypatch.setattr(triton.runtime.interpreter.InterpretedFunction, "run",
                        lambda self, *args, **kwargs: launches.append(self.fn.__name__))
    widths, num_slots, rank, k = (32, 16, 16), 3, 8, 32  # multiples of 16: one launch for the three (see sgmv)
    lora_as, lora_bs = zip(*[_adapters(num_slots, rank, k, w, [8, 4, 2], torch.float32, "cpu") for w in widths])
    x, y = randn(m, k), torch.zeros(m, sum(widths))
    batch = LoRABatch.from_adapter_ids(torch.arange(m) % (num_slots + 1) - 1, num_slots)
    scalings, ranks = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([8, 4, 2], dtype=torch.int32)
    buffer = torch.empty(len(widths), m, rank)

    def allocations(**changed):
        arguments = dict(scalings=scalings, ranks=ranks, buffer=buffer) | changed
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiled:
            lk.ops.add_lora(y, x, list(lora_as), list(lora_bs), batch, arguments["scalings"], arguments["ranks"],
                            widths, backend="triton", deterministic=deterministic, buffer=arguments["buffer"])
        return [(event.name, event.cpu_memory_usage) for event in profiled.events() if event.cpu_memory_usage > 0]

    assert allocations() == []
    assert len(launches) == 2  # the shrink and the expand of every slice reached their kernel, one launch each
    assert allocations(ranks=None)
    assert allocations(scalings=[1.0, 0.5, 2.0])  # a list becomes a tensor on every call
    assert allocations(buffer=None)


@pytest.mark.parametrize("backend", GROUPED_BACKENDS + ["reference"])
def test_serving_ops_refuse_a_sparse_tensor_in_any_argument(backend, device):
    """README, Fine-tuning a model: the lk.ops serving ops refuse a sparse tensor in any argument, naming it, with y
    and out left as they were."""
    backend_or_skip(backend, device)
    m, k, num_slots, rank, n = 4, 8, 2, 2, 6
    lora_a, lora_b = _adapters(num_slots, rank, k, n, [2, 1], torch.float32, device)
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, -1, 0], device=device), num_slots)
    dense = dict(x=randn(m, k, device=device), lora_a=lora_a, lora_b=lora_b, t=randn(m, rank, device=device),
                 y=randn(m, n, device=device), out=randn(m, rank, device=device),
                 buffer=torch.zeros(1, m, rank, device=device), scalings=torch.tensor([1.0, 0.5], device=device),
                 ranks=torch.tensor([2, 1], device=device))
    calls = {
        "add_lora": (["y", "x", "lora_a", "lora_b", "scalings", "ranks", "buffer"], lambda a: lk.ops.add_lora(
            a["y"], a["x"], [a["lora_a"]], [a["lora_b"]], batch, a["scalings"], a["ranks"], [n], backend=backend,
            buffer=a["buffer"])),
        "lora_shrink": (["x", "lora_a", "scalings", "ranks", "out"], lambda a: lk.ops.lora_shrink(
            a["x"], a["lora_a"], batch, a["scalings"], a["ranks"], backend=backend, out=a["out"])),
        "lora_expand": (["t", "lora_b", "y", "ranks"], lambda a: lk.ops.lora_expand(
            a["t"], a["lora_b"], batch, a["y"], 0, a["ranks"], backend=backend)),
    }
    # the names the errors use: add_lora's slice lists, lora_expand's output argument
    shown = {"add_lora": {"lora_a": "lora_a_slices[0]", "lora_b": "lora_b_slices[0]"}, "lora_expand": {"y": "out"}}
    for op, (arguments, call) in calls.items():
        for argument in arguments:
            sparse = {**dense, argument: dense[argument].to_sparse()}
            before = {name: dense[name].clone() for name in ("y", "out")}
            name = shown.get(op, {}).get(argument, argument)
            with pytest.raises(TypeError, match=rf"{op}: {re.escape(name)} expected a dense \(strided\) tensor, "
                                                r"got layout torch.sparse_coo"):
                call(sparse)
            assert all(torch.equal(dense[key], value) for key, value in before.items()), (op, argument)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5's gradient_checkpointing_enable rename
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "reentrant checkpointing"])
def test_slots_trained_under_reentrant_checkpointing_switched_on_before_prepare_get_gradients(checkpointing,
                                                                                              tmp_path):
    """A model whose main input is not input_ids (ViT), whose checkpointing transformers does not mark: switched on
    before prepare_multi_adapter (as README says for inject_lora), every trained slot gets the gradients it gets
    without checkpointing. Unmarked, reentrant checkpointing back-propagated into no checkpointed layer: the slots
    of every encoder layer had grad None (torch's "None of the inputs have requires_grad=True" warning only) while
    the classifier's trained on."""
    transformers = pytest.importorskip("transformers")

    def vit():
        torch.manual_seed(0)
        return transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, image_size=8,
            patch_size=4, num_labels=3))

    torch.manual_seed(1)
    lk.save_peft_adapter(lk.inject_lora(vit(), ["q_proj", "v_proj", "classifier"], r=2, init_lora_weights=False),
                         tmp_path / "a")
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))

    def slot_grads(checkpointed):
        model = vit()
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        lk.prepare_multi_adapter(model, ["q_proj", "v_proj", "classifier"], max_adapters=2, max_rank=2)
        lk.load_peft_adapter(model, tmp_path / "a", adapter_name="a")
        for module in model.modules():
            if isinstance(module, lk.MultiLoRALinear):
                module.lora_a.requires_grad_(True)
                module.lora_b.requires_grad_(True)
        model.train()
        with lk.set_batch_adapters(model, ["a", "a"]):
            model(pixel_values=pixels).logits.square().sum().backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    expected = slot_grads(False)
    grads = slot_grads(checkpointing)
    assert sorted(grads) == sorted(expected) and len(grads) == 10
    missing = [name for name, grad in grads.items() if grad is None]
    assert not missing, f"no gradient for {missing}"
    for name, grad in grads.items():
        assert_close(grad, expected[name], torch.float32, name)


def test_layers_built_under_inference_mode_refuse_writes_outside_it_before_writing(tmp_path):
    """A serving model built (and its first adapters loaded) under torch.inference_mode holds inference tensors;
    written outside inference mode, torch raises only after the in-place write. set_adapter then left the new
    lora_a beside the old lora_b, scaling and rank (the slot served a hybrid of two adapters) and merge left the
    weight merged with merged = False (the delta then added twice), against README's "Nothing half-applied"."""
    torch.manual_seed(0)
    lk.save_peft_adapter(lk.inject_lora(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), ["0", "1"], r=2,
                                        init_lora_weights=False), tmp_path / "a")
    with torch.inference_mode():
        multi = lk.prepare_multi_adapter(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), ["0", "1"], 2, 2)
        lk.load_peft_adapter(multi, tmp_path / "a", adapter_name="a")
        single = lk.inject_lora(nn.Sequential(nn.Linear(8, 8)), ["0"], r=2, init_lora_weights=False)
    layer, x = multi[0], torch.randn(3, 8)
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    calls = {"MultiLoRALinear.set_adapter": lambda: layer.set_adapter(0, torch.randn(2, 8), torch.randn(8, 2), 0.5),
             "MultiLoRALinear.clear_adapter": lambda: layer.clear_adapter(0),
             "load_peft_adapter": lambda: lk.load_peft_adapter(multi, tmp_path / "a", adapter_name="a")}
    for op, call in calls.items():
        with pytest.raises(ValueError, match=f"{op}: .* is an inference tensor"):
            call()
        assert all(torch.equal(t, before[name]) for name, t in layer.state_dict().items()), op
    with torch.no_grad():
        y = single(x)
        with pytest.raises(ValueError, match="LoRALinear.merge: the base weight is an inference tensor"):
            single[0].merge()
        assert not single[0].merged and torch.equal(single(x), y)
    # helper 183: reset_lora_parameters drew lora_A anew, then torch refused lora_B; reset_parameters the base too
    single_before = {name: t.clone() for name, t in single.state_dict().items()}
    for op, call in (("LoRALinear.reset_lora_parameters", single[0].reset_lora_parameters),
                     ("LoRALinear.reset_parameters", single[0].reset_parameters)):
        with pytest.raises(ValueError, match=f"{op}: .* is an inference tensor"):
            call()
        assert all(torch.equal(t, single_before[name]) for name, t in single.state_dict().items()), op
    with torch.inference_mode():  # inside it they are ordinary writes
        layer.set_adapter(0, torch.randn(2, 8), torch.randn(8, 2), 0.5)
        single[0].merge()
        single[0].unmerge()
        single[0].reset_lora_parameters()


@pytest.mark.parametrize("slots_dtype", [torch.float16, torch.bfloat16])
def test_set_adapter_refuses_factors_past_the_slots_range(slots_dtype):
    """Finite factors too large for 16-bit slots (a float32 adapter into fp16 slots) became inf without a word, and
    the rows of that adapter inf or NaN; refused, naming the factor, with the slot as it was. Values that round to
    the largest finite value, and inf or NaN already in the adapter, are stored as given."""
    layer = lk.MultiLoRALinear(nn.Linear(8, 6).to(slots_dtype), max_adapters=2, max_rank=4)
    layer.set_adapter(0, torch.randn(2, 8), torch.randn(6, 2), 1.0)
    before = [t.detach().clone() for t in (layer.lora_a, layer.lora_b, layer.scalings, layer.ranks)]
    largest = torch.finfo(slots_dtype).max
    big_a, big_b = torch.randn(3, 8, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    big_a[1, 2] = big_b[4, 1] = -2.0 * largest
    for lora_a, lora_b, name in [(big_a, torch.randn(6, 3), "lora_a"), (torch.randn(3, 8), big_b, "lora_b")]:
        magnitude = re.escape(f"{2.0 * largest:.6g}")
        with pytest.raises(ValueError, match=rf"set_adapter: {name} holds finite values past the range of "
                                             rf"{slots_dtype} \(largest magnitude {magnitude}, "):
            layer.set_adapter(0, lora_a, lora_b, 1.0)
    for old, new in zip(before, (layer.lora_a, layer.lora_b, layer.scalings, layer.ranks)):
        assert torch.equal(old, new)
    given = torch.randn(3, 8)
    given[0, 0], given[0, 1], given[2, 2] = float("inf"), float("nan"), largest
    layer.set_adapter(1, given, torch.randn(6, 3), 1.0)
    torch.testing.assert_close(layer.lora_a[1, :3], given.to(slots_dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bad_scaling", [float("nan"), float("inf"), "big", 1e39, None])
def test_set_adapter_with_a_bad_scaling_keeps_the_slots_rank(bad_scaling):
    """Helper 182: writing the rank before the scaling checks passed every test: the atomicity test's bad scalings all
    come with the rank the slot already holds (2), so a half-applied rank write is invisible."""
    layer = lk.MultiLoRALinear(nn.Linear(8, 6), max_adapters=2, max_rank=4)
    layer.set_adapter(0, torch.randn(2, 8), torch.randn(6, 2), 1.0)
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    with pytest.raises((TypeError, ValueError), match="scaling expected"):
        layer.set_adapter(0, torch.randn(3, 8), torch.randn(6, 3), bad_scaling)
    with pytest.raises((TypeError, ValueError), match="scaling expected"):
        layer.set_adapter(1, torch.randn(4, 8), torch.randn(6, 4), bad_scaling)
    assert all(torch.equal(t, before[name]) for name, t in layer.state_dict().items())


def test_reset_parameters_refuses_inference_slots_before_touching_the_base():
    """Helper 182: reset_parameters' inference-tensor check dropped (or its slot tensors left out) passed every
    test: the slots made under inference_mode failed only at their zero_(), after the base layer had been
    re-initialised."""
    base = nn.Linear(8, 6)
    with torch.inference_mode():
        layer = lk.MultiLoRALinear(base, max_adapters=2, max_rank=4)
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    with pytest.raises(ValueError, match=r"MultiLoRALinear.reset_parameters: lora_a is an inference tensor"):
        layer.reset_parameters()
    assert torch.equal(base.weight, weight) and torch.equal(base.bias, bias)


def test_reset_parameters_refuses_an_inference_base_weight_by_name():
    """Helper 182: the base weight left out of reset_parameters' inference-tensor check passed every test."""
    with torch.inference_mode():
        base = nn.Linear(8, 6)
    layer = lk.MultiLoRALinear(base, max_adapters=2, max_rank=4)
    layer.set_adapter(0, torch.randn(2, 8), torch.randn(6, 2), 1.0)
    with pytest.raises(ValueError, match=r"MultiLoRALinear.reset_parameters: weight is an inference tensor"):
        layer.reset_parameters()
    assert layer.ranks.tolist() == [2, 0]


def test_torch_backend_fp16_slot_gradients_are_as_close_as_peft_for_a_small_scaled_lora_b():
    """The grouped torch backward folded a slot's scaling of at most 1 into its fp16 B (s·B ~ 1e-5: fp16
    subnormals): dA ~4-5x further from float64 than PEFT's per-adapter composition, which scales dY first."""
    torch.manual_seed(0)
    m, k, n, r, num_slots = 64, 256, 256, 16, 2
    scalings = torch.tensor([0.125, 0.25])
    x, w = torch.randn(m, k).half(), (0.02 * torch.randn(n, k)).half()
    lora_a = (0.02 * torch.randn(num_slots, r, k)).half()
    lora_b, dy = (1e-4 * torch.randn(num_slots, n, r)).half(), torch.randn(m, n).half()
    ids = torch.arange(m) % num_slots
    a64 = lora_a.double().requires_grad_(True)
    peft = lora_a.clone().requires_grad_(True)
    for slot in range(num_slots):
        rows = ids == slot
        (scalings[slot].item() * (x[rows].double() @ a64[slot].T) @ lora_b[slot].double().T).backward(
            dy[rows].double())
        (((x[rows] @ peft[slot].T) @ lora_b[slot].T) * scalings[slot].item()).backward(dy[rows])
    ours = lora_a.clone().requires_grad_(True)
    lk.multi_lora_linear(x, w, ours, lora_b, ids, scalings, backend="torch").backward(dy)
    for slot in range(num_slots):
        error = lambda g: float((g[slot].double() - a64.grad[slot]).norm() / a64.grad[slot].norm())
        assert error(ours.grad) <= 1.5 * error(peft.grad), (slot, error(ours.grad), error(peft.grad))


def test_set_adapter_refuses_real_values_into_meta_slots():
    """A layer prepared on the meta device took set_adapter's real lora_a / lora_b without a word and dropped them
    (a copy into a meta tensor is a no-op), where load_peft_adapter refuses such a layer by name. Refused before any
    change; meta factors into meta slots still pass (a shape-only flow)."""
    with torch.device("meta"):
        layer = lk.MultiLoRALinear(torch.nn.Linear(8, 6), max_adapters=2, max_rank=2)
    with pytest.raises(ValueError, match=r"MultiLoRALinear.set_adapter: the layer's slots are on the meta device "
                                         r"\(the model was built there\), which holds no values.*"
                                         r"reset_parameters\(\) to clear every slot"):
        layer.set_adapter(0, torch.randn(2, 8), torch.randn(6, 2), 2.0)
    layer.set_adapter(0, torch.randn(2, 8, device="meta"), torch.randn(6, 2, device="meta"), 2.0)


def _other_slot_stride(weights):
    """The same values, slots spaced further apart (cut from a buffer twice as long along dim 1, NaN-padded):
    strides along dims 1 and 2 as a contiguous tensor's, the slot stride 2·a·b."""
    return torch.cat([weights, torch.full_like(weights, float("nan"))], dim=1)[:, :weights.shape[1]]


def _odd_address(weights):
    """The same values and strides at an address 4 bytes past a multiple of 16 (Triton specialises on it)."""
    storage = torch.empty(weights.numel() + 1, dtype=weights.dtype, device=weights.device)[1:]
    return storage.view(weights.shape).copy_(weights)


def _odd_slot_stride(weights):
    """The same values and strides along dims 1 and 2, the slot stride one element longer (not a multiple of 16)."""
    num_slots, a, b = weights.shape
    storage = torch.empty(num_slots, a * b + 1, dtype=weights.dtype, device=weights.device)
    return storage[:, :a * b].view(num_slots, a, b).copy_(weights)


# layout -> (widths, which lora_a / lora_b is changed and how, shrink launches, expand launches)
_SLICE_KEY_CASES = {
    "a lora_a of another slot stride": ((16, 16, 16), ("a", 1, _other_slot_stride), 3, 1),
    "a lora_a at an odd address": ((16, 16, 16), ("a", 1, _odd_address), 3, 1),
    "a lora_b at an odd address": ((16, 16, 16), ("b", 1, _odd_address), 1, 3),
    "a lora_b of an odd slot stride": ((16, 16, 16), ("b", 1, _odd_slot_stride), 1, 3),
    "an odd first column": ((8, 8, 16), None, 1, 3),  # slice 1 starts at column 8: a launch of its own
}


@pytest.mark.parametrize("m", [5, 80], ids=["decode", "prefill"])
@pytest.mark.parametrize("layout", list(_SLICE_KEY_CASES))
def test_add_lora_with_triton_launches_apart_each_slice_whose_launch_key_differs(layout, m, monkeypatch):
    """sgmv._slice_groups' keys: the shrink kernel takes one slot stride per launch (a lora_a whose slots are spaced
    otherwise is read at its neighbours' stride unless launched apart: wrong results), and a slice whose address,
    slot stride or first output column is 16-divisible where a neighbour's is not takes launches of its own (else
    every slice of the launch loses its 16-byte accesses). Results against the reference."""
    launches = _interpreted_launches(monkeypatch)
    widths, change, shrinks, expands = _SLICE_KEY_CASES[layout]
    num_slots, r, k, slot_ranks = 3, 4, 16, [4, 2, 3]
    lora_as, lora_bs = zip(*[_adapters(num_slots, r, k, w, slot_ranks, torch.float32, "cpu") for w in widths])
    lora_a, lora_b = list(lora_as), list(lora_bs)
    if change is not None:
        which, j, relayout = change
        weights = lora_a if which == "a" else lora_b
        weights[j] = relayout(weights[j])
    x, y = randn(m, k), randn(m, sum(widths))
    batch = LoRABatch.from_adapter_ids(torch.arange(m) % (num_slots + 1) - 1, num_slots)
    scalings, ranks = [1.0, 2.0, 0.5], torch.tensor(slot_ranks, dtype=torch.int32)
    expected = reference.add_lora(y, x, lora_as, lora_bs, batch.adapter_ids, torch.tensor(scalings), ranks, widths)
    lk.ops.add_lora(y, x, lora_a, lora_b, batch, scalings, ranks, widths, backend="triton")
    assert_close(y, expected, torch.float32, f"add_lora, {layout}")
    kind = "bgmv" if m == 5 else "sgmv"
    assert sorted(launches) == [f"_{kind}_expand_kernel"] * expands + [f"_{kind}_shrink_kernel"] * shrinks


def test_add_lora_ranks_none_makes_one_ranks_tensor_per_distinct_r(monkeypatch):
    """add_lora's docstring: ranks=None makes one ranks tensor per distinct R (slices of one R share it, and with it
    the triton launches), not one per slice."""
    made = []
    as_ranks = lk.ops.as_ranks
    monkeypatch.setattr(lk.ops, "as_ranks", lambda op, ranks, *args: made.append(ranks is None) or as_ranks(
        op, ranks, *args))
    num_slots, k, m = 2, 8, 5
    for rs, distinct in (((4, 4, 4), 1), ((4, 2, 4), 2), ((2, 4, 4, 2), 2)):
        weights = [_adapters(num_slots, r, k, 8, [r] * num_slots, torch.float32, "cpu") for r in rs]
        lora_as, lora_bs = zip(*weights)
        batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, -1, 1, 0]), num_slots)
        made.clear()
        lk.ops.add_lora(torch.zeros(m, 8 * len(rs)), randn(m, k), list(lora_as), list(lora_bs), batch,
                        [1.0, 1.0], None, (8,) * len(rs), backend="torch")
        assert made.count(True) == distinct, (rs, made)


def test_a_base_layer_swapped_by_quantize_dynamic_is_named_in_the_error_and_repr_still_works():
    """quantize_dynamic({nn.Linear}) swaps a MultiLoRALinear's base_layer for a dynamic quantized Linear, whose weight
    is a method: repr(model) raised AttributeError, and the forward "weight expected a torch.Tensor, got method"
    (helper 287). PEFT's layer fails there too; the error now names the base layer and what replaced it."""
    if "fbgemm" not in torch.backends.quantized.supported_engines and \
            "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("no quantized engine")
    model = lk.prepare_multi_adapter(nn.Sequential(nn.Linear(16, 8)), ["0"], max_adapters=2, max_rank=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert "in_features=16, out_features=8, max_adapters=2, max_rank=4, backend='auto'" in repr(quantized)
    with pytest.raises(TypeError, match=r"MultiLoRALinear: base_layer expected the nn.Linear or Conv1D it was prepared "
                                        r"with, got a torch.ao.nn.quantized.dynamic.*Linear whose weight is a method"):
        quantized[0](torch.randn(2, 16), torch.zeros(2, dtype=torch.long))


def _two_adapter_model(tmp_path, backend):
    base = nn.Sequential(nn.Linear(8, 8))
    for name in "ab":
        torch.manual_seed(ord(name))
        lk.save_peft_adapter(lk.inject_lora(copy.deepcopy(base), ["0"], r=2, init_lora_weights=False), tmp_path / name)
    model = lk.prepare_multi_adapter(copy.deepcopy(base), ["0"], max_adapters=2, max_rank=2, backend=backend)
    for name in "ab":
        lk.load_peft_adapter(model, tmp_path / name, adapter_name=name)
    return model


@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
def test_set_batch_adapters_per_row_names_under_vmap_over_another_dimension(backend, tmp_path):
    """vmap over a dimension other than the rows (jacfwd's tangents, a batch of scales) leaves the layers the rows,
    and the names apply to them: eager's results. (A refusal of per-row names under any vmap broke these; review
    290. vmap over the rows themselves spreads the names over each sample's first dimension: README.)"""
    if backend not in backends.available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    model = _two_adapter_model(tmp_path, backend)
    x, scales = torch.randn(2, 3, 8), torch.tensor([0.5, 2.0, -1.0])
    with lk.set_batch_adapters(model, ["a", "b"]):
        mapped = torch.func.vmap(lambda scale: model(x * scale))(scales)
        assert_close(mapped, torch.stack([model(x * scale) for scale in scales]), torch.float32)
        jacobian = torch.func.jacfwd(model)(x)
        expected = torch.autograd.functional.jacobian(model, x)
    assert_close(jacobian, expected, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "cpu", "reference", "triton"])
def test_an_ensemble_of_multi_lora_layers_runs_under_vmap(backend):
    """torch.func's ensembling (stack_module_state + vmap over functional_call) maps the scalings and ranks buffers
    too: their host-side checks read them with .tolist(), "Cannot access data pointer of Tensor that doesn't have
    storage" (helper 286). A tensor torch.func wraps now has no host values, as a traced one: each model's outputs."""
    if backend not in backends.available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    torch.manual_seed(0)
    models = []
    for scaling in (1.0, 2.0):
        layer = lk.MultiLoRALinear(nn.Linear(16, 12), 2, 4, backend=backend)
        layer.set_adapter(0, torch.randn(4, 16), torch.randn(12, 4), scaling)
        layer.set_adapter(1, torch.randn(2, 16), torch.randn(12, 2), 0.5)
        models.append(layer)
    params, buffers = torch.func.stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    x, ids = torch.randn(5, 16), torch.tensor([0, 1, -1, 1, 0])
    ensemble = torch.func.vmap(lambda p, b: torch.func.functional_call(skeleton, (p, b), (x, ids)))(params, buffers)
    assert_close(ensemble, torch.stack([layer(x, ids) for layer in models]), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "cpu", "reference", "triton"])
def test_linearize_and_make_fx_of_real_tensors_trace_multi_lora_linear(backend):
    """make_fx(tracing_mode="real") and torch.func.linearize read the slots' scalings, ranks and batch on the host
    before: torch's "trying to get value out of a tracing tensor" (helper 286's lead). They take the traced paths
    now: eager's outputs and tangents."""
    if backend not in backends.available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    from torch.fx.experimental.proxy_tensor import make_fx
    torch.manual_seed(0)
    layer = lk.MultiLoRALinear(nn.Linear(16, 12), 3, 4, backend=backend)
    for slot in range(3):
        layer.set_adapter(slot, torch.randn(4 - slot, 16), torch.randn(12, 4 - slot), 0.5 + slot)
    x, ids, tangent = torch.randn(5, 16), torch.tensor([0, 1, -1, 2, 0]), torch.randn(5, 16)
    torch.testing.assert_close(make_fx(layer)(x, ids)(x, ids), layer(x, ids))
    y, jvp_of = torch.func.linearize(lambda x: layer(x, ids), x)
    expected_y, expected_tangent = torch.func.jvp(lambda x: layer(x, ids), (x,), (tangent,))
    torch.testing.assert_close(y, expected_y)
    torch.testing.assert_close(jvp_of(tangent), expected_tangent)
