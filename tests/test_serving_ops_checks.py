"""The checks of the serving-stack API (lk.ops.*, LoRABatch) that mutation testing of ops.py and batch.py found
untested: each test fails when the check it names is deleted or weakened."""

import collections
import dataclasses
import re

import pytest
import torch

import lora_kernels as lk
from conftest import backend_or_skip
from lora_kernels import backends, ops
from lora_kernels import triton as triton_pkg
from lora_kernels.batch import BUFFER_FIELDS, LoRABatch


def _element_indices(view):
    """The storage indices of view's elements, enumerated one by one (the brute-force answer)."""
    indices = torch.zeros((), dtype=torch.int64) + view.storage_offset()
    for size, stride in zip(view.shape, view.stride()):
        indices = (indices[..., None] + torch.arange(size) * stride)
    return set(indices.reshape(-1).tolist())


def _random_view(storage, g):
    """A view of the 1-D storage: a flat range, a block of a matrix of some row pitch that starts at the storage's
    start or within its first row (the block possibly one row, every other column, or transposed), or an arbitrary
    as_strided view."""
    def pick(high):
        return int(torch.randint(0, high, (), generator=g))

    kind = pick(4)
    if kind == 0:
        start = pick(40)
        return storage[start:start + 1 + pick(20)].view(1, -1) if pick(2) else storage[start:start + 2 + pick(20)]
    # a matrix of some row pitch, from the storage's start or from an element within its first row
    pitch, first = 6 + pick(3), pick(2) * pick(6)
    matrix = storage[first:first + pitch * ((storage.numel() - first) // pitch)].view(-1, pitch)
    row, column = pick(matrix.shape[0] - 1), pick(pitch - 1)
    block = matrix[row:row + 1 + pick(4), column:column + 1 + pick(5)]
    if kind == 1:
        return block
    if kind == 2:
        return matrix[row:row + 1 + pick(4), column::2] if pick(2) else block.T
    shape = (1 + pick(4), 1 + pick(5))
    strides = (pick(13), 1 + pick(3))  # row stride 0: an expanded input
    offset = pick(storage.numel() - (shape[0] - 1) * strides[0] - (shape[1] - 1) * strides[1])
    return storage.as_strided(shape, strides, offset)


def _decided(view):
    """The layouts whose overlap check_output decides exactly (ops._shares_memory): dense, or 2-D with unit column
    stride (its rows one row pitch apart)."""
    dense = sorted((stride, size) for size, stride in zip(view.shape, view.stride()) if size != 1)
    expected = 1
    for stride, size in dense:
        if stride != expected:
            break
        expected *= size
    else:
        return "dense"
    if view.dim() == 2 and (view.shape[1] == 1 or view.stride(1) == 1):
        return ("pitch", view.stride(0))
    return None


def test_overlap_check_matches_the_elements_views_really_share():
    """check_output against brute force over random pairs of views of one storage: an out whose elements repeat is
    refused (not only an expanded one: the backends left different sums there); else refused only where the two
    share an element (a valid out is never refused: touching, interleaved and wrapped views included), and refused
    wherever they do when both are dense, both are 2-D row blocks of one pitch (a workspace's column slices), or one
    is dense and the other 2-D row blocks of any pitch (let through before: helper 117's add_lora y over x). Every
    other pair that shares an element is reported undecided (the op then computes into a copy): none is let
    through as separate (the triton kernels zeroed out before reading an interleaved x)."""
    g = torch.Generator().manual_seed(0)
    storage = torch.zeros(64)
    decided_overlaps = self_overlapping = 0
    for _ in range(4000):
        out, t = _random_view(storage, g), _random_view(storage, g)
        repeats = len(_element_indices(out)) < out.numel()
        assert ops._may_overlap_itself(out) >= repeats, (out.shape, out.stride())
        if ops._may_overlap_itself(out):  # repeats, or one of the rare interleavings the stride test takes for it
            with pytest.raises(ValueError, match="out expected a tensor whose elements do not overlap in memory"):
                ops.check_output("lora_expand", "out", out, [("t", t)])
            self_overlapping += repeats
            continue
        shared = bool(_element_indices(out) & _element_indices(t))
        try:
            undecided = ops.check_output("lora_expand", "out", out, [("t", t)])
            refused = False
        except ValueError as error:
            assert "out expected memory of its own, got a view that overlaps t" in str(error)
            refused = undecided = True
        assert refused or undecided or not shared, (out.shape, out.stride(), out.storage_offset(), t.shape,
                                                    t.stride(), t.storage_offset())
        layouts = _decided(out), _decided(t)
        decided = (layouts == ("dense", "dense") or (layouts[0] == layouts[1] and layouts[0] is not None)
                   or ("dense" in layouts and None not in layouts  # dense against row blocks of any pitch
                       and all(layout == "dense" or layout[1] >= 1 for layout in layouts)))
        assert refused <= shared, f"refused views that share no element: {out.stride()}+{out.storage_offset()}, " \
                                  f"{t.stride()}+{t.storage_offset()}"
        if decided:
            assert refused or not undecided, "a decided layout reported undecided"
            decided_overlaps += shared
            assert refused == shared, f"missed an overlap: shape {tuple(out.shape)} strides {out.stride()} offset " \
                                      f"{out.storage_offset()}; shape {tuple(t.shape)} strides {t.stride()} offset " \
                                      f"{t.storage_offset()}"
    assert decided_overlaps > 100 and self_overlapping > 20  # the cases above are not all disjoint


def test_overlap_check_sees_rows_that_run_past_the_pitch_grid():
    """Two views of one flat workspace with one row pitch (6) whose offsets differ by part of a row: out's rows start
    4 elements into the grid's rows and run into the next, where t's row lies. Their rows and columns on the grid
    did not intersect, so the overlap was let through to kernels that read what they had written."""
    workspace = torch.zeros(28)
    out = workspace[4:].view(-1, 6)[:2, :4]  # elements 4-7 and 10-13
    t = workspace[:24].view(-1, 6)[1:3, :2]  # elements 6, 7, 12 and 13
    with pytest.raises(ValueError, match="out expected memory of its own, got a view that overlaps t"):
        ops.check_output("lora_expand", "out", out, [("t", t)])
    ops.check_output("lora_expand", "out", workspace[4:].view(-1, 6)[:2, :2], [("t", t)])  # elements 4, 5, 10, 11
    # a one-row out whose row stride is 0 against an expanded input (row pitch 0 too): undecided, let through
    one_row = workspace[:6].as_strided((1, 6), (0, 1))
    ops.check_output("lora_expand", "out", one_row, [("t", workspace[:6].expand(3, 6))])


@pytest.mark.parametrize("ids,num_adapters,error,words", [
    (torch.tensor([0j, 1j]), 2, TypeError, "adapter_ids expected an integer dtype, got torch.complex64"),
    (torch.tensor([True, False]), 2, TypeError, "adapter_ids expected an integer dtype, got torch.bool"),
    # widened to int64 for the checks, its values past 2**63 would wrap (2**64 - 1 to -1: base only)
    (torch.tensor([0, 1], dtype=torch.uint64), 2, TypeError, r"adapter_ids expected a signed integer dtype \(int64, "
                                                              r"int32, ...\) or uint8/16/32, got torch.uint64"),
    (torch.tensor([0, 1]), True, ValueError, "num_adapters expected an int >= 1, got True"),
    (torch.tensor([0, 1]), 2.0, ValueError, "num_adapters expected an int >= 1, got 2.0"),
])
def test_lora_batch_refuses_ids_and_slot_counts_of_the_wrong_type(ids, num_adapters, error, words):
    """Bool ids (a mask passed for ids) became slots 0 and 1, and num_adapters=True one slot."""
    with pytest.raises(error, match=words):
        LoRABatch.from_adapter_ids(ids, num_adapters)


def _strided(t):
    storage = torch.full((2 * t.numel(),), 7, dtype=t.dtype)
    storage[::2] = t
    return storage[::2]


@pytest.mark.parametrize("field,bad,error,words", [
    ("adapter_ids", _strided, ValueError, "adapter_ids expected a contiguous int32 tensor of shape (6,)"),
    ("sorted_token_ids", _strided, ValueError, "sorted_token_ids expected a contiguous int32 tensor of shape (6,)"),
    ("slot_starts", _strided, ValueError, "slot_starts expected a contiguous int32 tensor of shape (3,)"),
    ("slot_counts", lambda t: t[:2], ValueError, "slot_counts expected a contiguous int32 tensor of shape (3,) on cpu "
                                                 "(as from_adapter_ids builds it), got torch.int32, shape (2,)"),
    ("active_slots", lambda t: t.long(), TypeError, "active_slots expected a contiguous int32 tensor of shape (3,)"),
    ("num_active", lambda t: t.reshape(()), ValueError, "num_active expected a contiguous int32 tensor of shape (1,)"),
])
def test_lora_batch_built_by_hand_is_refused_unless_laid_out_as_the_kernels_read_it(field, bad, error, words):
    """The kernels read a batch's buffers as int32 arrays of fixed lengths: a strided buffer put in with
    dataclasses.replace (the dataclass is public) gave Triton errors up to 10 (helper 117), and a short one would
    read past it. Refused when the batch is built."""
    import dataclasses
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, 2, -1, 2, 1]), 3)
    with pytest.raises(error, match=re.escape(f"LoRABatch: {words}")):
        dataclasses.replace(batch, **{field: bad(getattr(batch, field))})
    assert dataclasses.replace(batch, adapter_ids=batch.adapter_ids.clone()).num_tokens == 6  # a valid one passes


def test_a_hand_built_batch_with_a_numpy_slot_count_is_checked_as_with_an_int():
    """num_adapters=np.int64(3) skipped every buffer check (only an int was checked, for torch.export's own leaves),
    and the torch backend then left the tokens of a short slot_counts without their LoRA term, silently. A numpy
    integer is taken as its int; a float or bool is refused."""
    np = pytest.importorskip("numpy")
    batch = _six_token_batch()
    with pytest.raises(ValueError, match=re.escape("LoRABatch: slot_counts expected a contiguous int32 tensor of "
                                                   "shape (3,)")):
        dataclasses.replace(batch, num_adapters=np.int64(3), slot_counts=batch.slot_counts[:1])
    same = dataclasses.replace(batch, num_adapters=np.int64(3))
    assert type(same.num_adapters) is int and same.num_adapters == 3
    for bad in (3.0, True, np.float32(3), np.bool_(True), torch.tensor(3), "3"):
        with pytest.raises(TypeError, match=rf"LoRABatch: num_adapters expected an int, got {type(bad).__name__} "):
            dataclasses.replace(batch, num_adapters=bad, slot_counts=batch.slot_counts[:1])


def _six_token_batch():
    return LoRABatch.from_adapter_ids(torch.tensor([0, 1, 2, -1, 2, 1]), 3)


@pytest.mark.parametrize("field,bad,length", [
    ("sorted_token_ids", lambda t: torch.cat([t, t]), 6),
    ("slot_counts", lambda t: torch.cat([t, t]), 3),
    ("active_slots", lambda t: torch.cat([t, t]), 3),
    ("num_active", lambda t: torch.cat([t, t]), 1),
])
def test_hand_built_batch_refuses_a_buffer_longer_than_its_length(field, bad, length):
    """Helper 182: refusing only short buffers (`<` for `!=`) passed every test."""
    with pytest.raises(ValueError, match=re.escape(f"LoRABatch: {field} expected a contiguous int32 tensor of shape "
                                                   f"({length},)")):
        dataclasses.replace(_six_token_batch(), **{field: bad(getattr(_six_token_batch(), field))})


@pytest.mark.parametrize("field", ["sorted_token_ids", "slot_counts", "slot_starts", "active_slots", "num_active"])
def test_hand_built_batch_refuses_a_buffer_on_another_device(field):
    """Helper 182: dropping the device check passed every test (a CPU buffer in a CUDA batch is a host pointer to the
    kernels). meta stands in for the other device on a CPU-only machine."""
    batch = _six_token_batch()
    with pytest.raises(ValueError, match=re.escape(f"LoRABatch: {field} expected a contiguous int32 tensor")
                       + ".* on cpu"):
        dataclasses.replace(batch, **{field: getattr(batch, field).to("meta")})


def test_hand_built_batch_takes_a_one_element_buffer_of_any_stride():
    """Helper 182: applying the stride check to one-element buffers too passed every test: a [1] view with stride 2
    holds its one element where the kernels read it."""
    batch = LoRABatch.from_adapter_ids(torch.tensor([1]), 3)
    strided = torch.tensor([[1, 5]], dtype=torch.int32)[:, 0]  # shape (1,), stride (2,)
    assert strided.stride() == (2,)
    num_active = torch.tensor([[1, 5]], dtype=torch.int32)[:, 0]
    rebuilt = dataclasses.replace(batch, adapter_ids=strided, num_active=num_active)
    x, lora_a, lora_b = torch.randn(1, 8), torch.randn(3, 2, 8), torch.randn(3, 6, 2)
    for backend in ("torch", "cpu"):
        y = torch.zeros(1, 6)
        t = lk.ops.lora_shrink(x, lora_a, rebuilt, [1.0, 1.0, 1.0], backend=backend)
        lk.ops.lora_expand(t, lora_b, rebuilt, y, backend=backend)
        torch.testing.assert_close(y[0], lora_b[1] @ (lora_a[1] @ x[0]))


def test_refill_with_validate_true_reads_device_ids():
    """Helper 182: refill_ passing asked=False passed every test (validate=True ignored for non-CPU ids: a CUDA
    serving step's bad ids silently become base-only). meta ids have no values, so validate=True on them must say
    so, as from_adapter_ids(validate=True) does."""
    ids = torch.tensor([0, 1, 1, -1], device="meta")
    batch = LoRABatch.from_adapter_ids(ids, 2)
    batch.refill_(ids)  # not asked: not read
    with pytest.raises(ValueError, match=r"LoRABatch.refill_: validate=True expected adapter_ids with values"):
        batch.refill_(ids, validate=True)


def test_lora_batch_reads_device_ids_on_the_host_only_when_asked():
    """Ids on a device (meta here: no values to read) are not validated by default, building or refilling: the
    check is a host sync, which a CUDA-graph capture refuses."""
    ids = torch.tensor([0, 1, 1, -1], device="meta")
    batch = LoRABatch.from_adapter_ids(ids, 2)
    assert batch.slot_counts.shape == (2,) and batch.device.type == "meta"
    batch.refill_(ids)


def test_lora_batch_refuses_meta_ids_it_cannot_read_or_copy_by_name():
    """validate=True on meta ids, and meta ids refilled into a batch with values, raised torch's bare errors (item()
    on a meta tensor; "Cannot copy out of meta tensor"); the batch is left as it was."""
    ids = torch.tensor([0, 1, 1, -1], device="meta")
    with pytest.raises(ValueError, match=r"from_adapter_ids: validate=True expected adapter_ids with values.*meta"):
        LoRABatch.from_adapter_ids(ids, 2, validate=True)
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 0, 1, -1]), 2)
    before = {name: getattr(batch, name).clone() for name in BUFFER_FIELDS}
    with pytest.raises(ValueError, match=r"refill_: adapter_ids expected values to copy into the batch's buffers "
                                         r"on cpu, got a tensor on the meta device"):
        batch.refill_(ids)
    assert all(torch.equal(getattr(batch, name), value) for name, value in before.items())


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_grouped_ops_on_meta_tensors_give_meta_results(backend):
    """Meta inputs (a model built under torch.device("meta"), sized before it is materialised) through the backends
    available_backends("meta") lists: results of the right shapes on the meta device. The reference backend's
    grouped ops read the ids on the host and raised "Tensor.item() cannot be called on meta tensors" (the
    multi_lora_linear: "Cannot copy out of meta tensor"), where the error message of the other backends names it."""
    assert backend in lk.available_backends("meta")
    m, k, n, r, slots = 5, 16, 12, 4, 3
    with torch.device("meta"):
        x, weight = torch.randn(m, k), torch.randn(n, k)
        lora_a, lora_b, ids = torch.randn(slots, r, k), torch.randn(slots, n, r), torch.tensor([0, 1, -1, 2, 0])
        t, out = torch.randn(m, r), torch.zeros(m, n)
    batch = LoRABatch.from_adapter_ids(ids, slots)
    results = [lk.ops.lora_shrink(x, lora_a, batch, [1.0] * slots, backend=backend),
               lk.ops.lora_expand(t, lora_b, batch, out, backend=backend),
               lk.ops.add_lora(out, x, [lora_a], [lora_b], batch, [1.0] * slots, None, [n], backend=backend),
               lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, [1.0] * slots, backend=backend)]
    assert [(tuple(y.shape), y.device.type) for y in results] == [((m, r), "meta")] + [((m, n), "meta")] * 3


def test_lora_batch_refills_inside_torch_compile():
    """refill_ traced whole (fullgraph): its CPU ids are not validated while tracing, which needs their values."""
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, 1, -1]), 3)
    refill = torch.compile(lambda batch, ids: batch.refill_(ids), fullgraph=True, backend="eager")
    refill(batch, torch.tensor([2, 2, 0, 1]))
    assert batch.slot_counts.tolist() == [1, 1, 2] and batch.adapter_ids.tolist() == [2, 2, 0, 1]


def _serving_args():
    ids = torch.tensor([0, 1, -1, 1])
    return torch.randn(4, 8), torch.randn(2, 3, 8), LoRABatch.from_adapter_ids(ids, 2), [1.0, 0.5]


@pytest.mark.parametrize("bad,error,words", [
    (lambda x, a, batch: (x.tolist(), a, batch), TypeError, "lora_shrink: x expected a torch.Tensor, got list"),
    (lambda x, a, batch: (x.int(), a.int(), batch), TypeError,
     "lora_shrink: x expected a floating dtype, got torch.int32"),
    (lambda x, a, batch: (x, a[0], batch), ValueError,
     r"lora_shrink: lora_a expected a 3-D tensor, got shape \(3, 8\)"),
    (lambda x, a, batch: (x, a.to("meta"), batch), ValueError,
     r"lora_shrink: lora_a expected device cpu \(same as x\), got meta"),
    (lambda x, a, batch: (x, a, LoRABatch.from_adapter_ids(batch.adapter_ids.to("meta"), 2)), ValueError,
     "lora_shrink: batch expected device cpu \\(same as x\\), got meta"),
])
def test_lora_shrink_names_a_wrong_argument(bad, error, words):
    x, lora_a, batch, scalings = _serving_args()
    x, lora_a, batch = bad(x, lora_a, batch)
    with pytest.raises(error, match=words):
        lk.ops.lora_shrink(x, lora_a, batch, scalings, backend="torch")


def test_serving_ops_take_what_their_checks_promise():
    """Values the checks must let through: deterministic given as 1 (a bool as 0/1), and a one-token out whose row
    stride is 0 (a [1, N] view of an [N] vector: no element is written twice). A True rank is refused, not rank 1."""
    x, lora_a, batch, scalings = _serving_args()
    t = lk.ops.lora_shrink(x, lora_a, batch, scalings, backend="torch", deterministic=1)
    torch.testing.assert_close(t, lk.ops.lora_shrink(x, lora_a, batch, scalings, backend="torch"))
    one = LoRABatch.from_adapter_ids(torch.tensor([1]), 2)
    row = torch.zeros(5)
    lk.ops.lora_expand(t[1:2], torch.randn(2, 5, 3), one, row.as_strided((1, 5), (0, 1)), backend="torch")
    assert row.ne(0).all()
    with pytest.raises(TypeError, match=r"lora_shrink: ranks expected an integer tensor \[L\] or a sequence of ints"):
        lk.ops.lora_shrink(x, lora_a, batch, scalings, [True, 3], backend="torch")


@pytest.mark.parametrize("name", ["scalings", "ranks"])
@pytest.mark.parametrize("shape", [(2, 1), (1,), (3,)])
def test_scalings_and_ranks_need_one_entry_per_slot(name, shape):
    """A [L, 1] column or a vector of another length is refused by shape. Read on the host, a short ranks stopped
    the slot loop early (slot 1's tokens got no LoRA), and a [L, 1] column failed in the value check, naming
    nothing."""
    x, lora_a, batch, scalings = _serving_args()
    args = {"scalings": scalings, "ranks": None}
    args[name] = torch.ones(shape, dtype=torch.float32 if name == "scalings" else torch.int64)
    with pytest.raises(ValueError, match=re.escape(f"lora_shrink: {name} expected shape [2] (one per slot), "
                                                   f"got {shape}")):
        lk.ops.lora_shrink(x, lora_a, batch, args["scalings"], args["ranks"], backend="torch")


def test_serving_ops_run_on_meta_tensors():
    """Meta tensors (a model built on the meta device, shapes traced without data) go through the serving ops: their
    outputs have no memory to compare, and every meta storage's data pointer is 0, so the overlap check refused them
    as overlapping their inputs."""
    ids = torch.tensor([0, 1, -1, 1], device="meta")
    batch = LoRABatch.from_adapter_ids(ids, 2)
    x, lora_a, lora_b = (torch.empty(shape, device="meta") for shape in ((4, 8), (2, 3, 8), (2, 5, 3)))
    out = torch.empty(4, 3, device="meta")
    assert lk.ops.lora_shrink(x, lora_a, batch, [1.0, 0.5], backend="torch", out=out) is out
    expanded = torch.empty(4, 5, device="meta")
    assert lk.ops.lora_expand(out, lora_b, batch, expanded, backend="torch") is expanded
    y = torch.empty(4, 10, device="meta")
    assert lk.ops.add_lora(y, x, [lora_a, lora_a], [lora_b, lora_b], batch, [1.0, 0.5], None, [5, 5],
                           backend="torch") is y


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_add_lora_refuses_a_y_whose_rows_fall_in_a_dense_x_of_another_pitch(backend):
    """y a column block of a 10-wide workspace, x a dense [4, 5] at its start: y's rows 0 and 1 hold x's elements
    0-2 and 10-12. The overlap check decided only views of one row pitch, so this passed, and the torch and cpu
    backends read x after writing into it (error 2.2 against x as it was; helper 117)."""
    backend_or_skip(backend, torch.device("cpu"))
    workspace = torch.zeros(100)
    x = workspace[:20].view(4, 5)
    x.copy_(torch.randn(4, 5))
    y = workspace.view(10, 10)[:4, :6]
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, -1, 1]), 2)
    lora_a, lora_b = torch.randn(2, 3, 5), torch.randn(2, 3, 3)
    with pytest.raises(ValueError, match="y expected memory of its own, got a view that overlaps x"):
        lk.ops.add_lora(y, x, [lora_a, lora_a], [lora_b, lora_b], batch, [1.0, 1.0], None, [3, 3], backend=backend)
    assert torch.equal(workspace[20:], torch.zeros(80))  # nothing written


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "reference"])
def test_outputs_over_scalings_ranks_or_batch_buffers_are_refused(backend):
    """The overlap check compared an output with x and the factors only: lora_shrink's out over its scalings gave
    the triton kernels' result 1.9 off (they zero out before reading the scalings), add_lora's y over the scalings
    every backend's but the reference's 0.63 off (slice 1's shrink read what slice 0's expand had written); the
    ranks and the batch's buffers are read the same way. Each is refused by name, before anything is written."""
    backend_or_skip(backend, torch.device("cpu"))
    m, k, num_slots, rank = 6, 8, 2, 4
    ids = torch.tensor([0, 1, 0, -1, 1, 1])
    x, lora_a = torch.randn(m, k), torch.randn(num_slots, rank, k)
    lora_bs = [torch.randn(num_slots, 3, rank), torch.randn(num_slots, 5, 2)]
    workspace = torch.randn(m * rank + 4)
    out, scalings = workspace[:m * rank].view(m, rank), workspace[m * rank - 2:m * rank]  # scalings: out's last two
    scalings.copy_(torch.tensor([0.5, 2.0]))
    before = workspace.clone()
    with pytest.raises(ValueError, match="out expected memory of its own, got a view that overlaps scalings"):
        lk.ops.lora_shrink(x, lora_a, LoRABatch.from_adapter_ids(ids, num_slots), scalings, backend=backend, out=out)
    y_workspace = torch.randn(m * 8 + 2)
    y, y_scalings = y_workspace[:m * 8].view(m, 8), y_workspace[m * 8 - 1:m * 8 + 1]  # scalings: from y's last element
    with pytest.raises(ValueError, match="y expected memory of its own, got a view that overlaps scalings"):
        lk.ops.add_lora(y, x, [lora_a, lora_a[:, :2]], lora_bs, LoRABatch.from_adapter_ids(ids, num_slots),
                        y_scalings, None, [3, 5], backend=backend)
    int_workspace = torch.zeros(m * rank + 8, dtype=torch.float32)
    ranks = int_workspace[:num_slots].view(torch.int32)
    ranks.copy_(torch.tensor([rank, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="out expected memory of its own, got a view that overlaps ranks"):
        lk.ops.lora_shrink(x, lora_a, LoRABatch.from_adapter_ids(ids, num_slots), [0.5, 2.0], ranks,
                           backend=backend, out=int_workspace[:m * rank].view(m, rank))
    assert torch.equal(workspace, before)
    batch = LoRABatch.from_adapter_ids(ids, num_slots)
    for field in ("adapter_ids", "sorted_token_ids"):  # the [M] int32 buffers, as a float32 out [M, 1]
        buffer = getattr(batch, field)
        buffer_before = buffer.clone()
        with pytest.raises(ValueError, match=f"out expected memory of its own, got a view that overlaps batch.{field}"):
            lk.ops.lora_expand(torch.randn(m, rank), lora_bs[0][:, :1], batch, buffer.view(torch.float32).view(m, 1),
                               backend=backend)
        assert torch.equal(buffer, buffer_before)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "reference"])
def test_an_out_whose_elements_repeat_is_refused(backend):
    """An out whose rows overlap each other (strides (1, 1)) was accepted, and the backends left different sums in
    it (torch and the reference compute, then copy; cpu and triton add token by token); torch's own checks refuse
    only stride-0 dimensions."""
    backend_or_skip(backend, torch.device("cpu"))
    m, n, rank = 5, 4, 3
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, -1, 0, 1]), 2)
    storage = torch.zeros(m + n)
    out = storage.as_strided((m, n), (1, 1))
    with pytest.raises(ValueError, match=r"out expected a tensor whose elements do not overlap in memory, got shape "
                                         r"\(5, 4\) with strides \(1, 1\) \(strides under which elements may share"):
        lk.ops.lora_expand(torch.randn(m, rank), torch.randn(2, n, rank), batch, out, backend=backend)
    assert torch.equal(storage, torch.zeros(m + n))


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "reference"])
def test_overlap_through_two_storage_objects_over_one_memory_is_refused(backend):
    """torch.from_numpy of one array twice gives two storage objects over one memory: the check compared storages,
    not addresses, and let y over x through (torch and cpu: 3.96 off), where the same views of one tensor are
    refused."""
    np = pytest.importorskip("numpy")
    backend_or_skip(backend, torch.device("cpu"))
    array = np.random.default_rng(0).standard_normal((6, 12)).astype(np.float32)
    x, y = torch.from_numpy(array)[:, :8], torch.from_numpy(array[:, 2:10])
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, 0, -1, 1, 1]), 2)
    before = array.copy()
    with pytest.raises(ValueError, match="y expected memory of its own, got a view that overlaps x"):
        lk.ops.add_lora(y, x, [torch.randn(2, 3, 8)] * 2, [torch.randn(2, 4, 3)] * 2, batch, [1.0, 0.5], None,
                        [4, 4], backend=backend)
    assert np.array_equal(array, before)


@pytest.mark.parametrize("op", ["lora_shrink", "lora_expand", "add_lora"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "reference"])
def test_an_out_interleaved_with_an_input_gets_the_sum_of_the_inputs_as_they_were(backend, op):
    """x every other column of a workspace and out a column block of it: a layout whose overlap the check cannot
    decide (nor can torch's), which it let through to the kernels, and the triton ones zeroed out before reading x
    (0.07 to 0.41 off; add_lora's torch and cpu paths read x after slice 0's expand; the cpu expand read rows of t
    that earlier tokens' rows of out had overwritten, 0.65 off). Now the op computes into a new tensor and copies it
    into out: every backend's result is that of the inputs as they were."""
    backend_or_skip(backend, torch.device("cpu"))
    from lora_kernels import reference
    for m, k in ((6, 64), (80, 8)):  # the decode (split-K) and prefill paths of the triton shrink
        g = torch.Generator().manual_seed(m)
        rank, num_slots = 4, 2
        ids = torch.tensor(([0, 1, 0, -1, 1, 1] * 14)[:m])
        batch = LoRABatch.from_adapter_ids(ids, num_slots)
        scalings, ranks = torch.tensor([0.5, 2.0]), torch.tensor([rank, 3])
        lora_a = torch.randn(num_slots, rank, k, generator=g)
        lora_b = torch.randn(num_slots, 2, rank, generator=g)
        workspace = torch.randn(m, 2 * k, generator=g)
        x = workspace[:, ::2]
        x_before = x.clone()
        if op == "lora_shrink":
            out = workspace[:, 1:1 + rank]
            expected = reference.lora_shrink(x_before, lora_a, ids, scalings, ranks)
            lk.ops.lora_shrink(x, lora_a, batch, scalings, ranks, backend=backend, out=out)
        elif op == "lora_expand":  # t dense, out's rows (two elements 2 apart, 8 apart) through it
            store = torch.randn(8 * m + 4 * rank, generator=g)
            out, t = store.as_strided((m, 2), (8, 2)), store[16:16 + m * rank].view(m, rank)
            t_before, out_before = t.clone(), out.clone()
            expected = reference.lora_expand(t_before, lora_b, ids, out_before.double(), 0, ranks)
            lk.ops.lora_expand(t, lora_b, batch, out, 0, ranks, backend=backend)
        else:
            out = workspace[:, 1:5]
            expected = reference.add_lora(out.clone(), x_before, [lora_a, lora_a], [lora_b, lora_b], ids, scalings,
                                          [ranks, ranks], (2, 2))
            lk.ops.add_lora(out, x, [lora_a, lora_a], [lora_b, lora_b], batch, scalings, ranks, [2, 2],
                            backend=backend)
        error = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
        assert error <= 1e-5, (m, error)


def test_an_empty_out_within_an_input_is_its_own_memory():
    """An out with no elements (rank 0) overlaps nothing, even as a view inside x's rows: its byte span and row
    blocks were read as if it held one row of width 0 and was refused."""
    x, _, batch, scalings = _serving_args()
    shrunk = lk.ops.lora_shrink(x, torch.randn(2, 0, 8), batch, scalings, backend="torch", out=x[:, 3:3])
    assert shrunk.shape == (4, 0)


@pytest.mark.parametrize("slice_offset", [True, 1.0, -1])
def test_lora_expand_refuses_a_slice_offset_that_is_not_an_int_from_0(slice_offset):
    """True was column 1, and 1.0 failed in the slicing of out, naming nothing."""
    x, lora_a, batch, scalings = _serving_args()
    t = lk.ops.lora_shrink(x, lora_a, batch, scalings, backend="torch")
    with pytest.raises(ValueError, match=re.escape(f"lora_expand: slice_offset expected an int >= 0, "
                                                   f"got {slice_offset!r}")):
        lk.ops.lora_expand(t, torch.randn(2, 5, 3), batch, torch.zeros(4, 7), slice_offset, backend="torch")


def test_lora_expand_refuses_t_of_another_token_count():
    """t is [M, R] for out's M tokens: a t shrunk for another batch failed inside the backend (the torch fallback's
    sum of shapes [4, 5] and [8, 5]), naming nothing."""
    x, lora_a, batch, scalings = _serving_args()
    t = lk.ops.lora_shrink(torch.cat([x, x]), lora_a, LoRABatch.from_adapter_ids(torch.zeros(8, dtype=torch.int64), 2),
                           scalings, backend="torch")
    with pytest.raises(ValueError, match=re.escape("lora_expand: t expected shape [4, 3] ([M, R] for out (4, 5) and "
                                                   "lora_b (2, 5, 3) = [L, N, R]), got (8, 3)")):
        lk.ops.lora_expand(t, torch.randn(2, 5, 3), batch, torch.zeros(4, 5), backend="torch")


def test_a_transposed_lora_a_or_lora_b_is_named_as_such():
    """A lora_a laid out [L, K, R] (or a lora_b [L, R, N]) was blamed on x (or t) alone, whose shape was right
    (helper 180)."""
    x, lora_a, batch, scalings = _serving_args()
    with pytest.raises(ValueError, match=re.escape("lora_a looks laid out [L, K, R], expected [L, R, K]), got (4, 8)")):
        lk.ops.lora_shrink(x, lora_a.transpose(1, 2), batch, scalings, backend="torch")
    t = lk.ops.lora_shrink(x, lora_a, batch, scalings, backend="torch")
    with pytest.raises(ValueError, match=re.escape("lora_b looks laid out [L, R, N], expected [L, N, R]), got (4, 3)")):
        lk.ops.lora_expand(t, torch.randn(2, 3, 5), batch, torch.zeros(4, 5), backend="torch")
    # right layouts with an x or t of the wrong width that equals R (or N): no layout hint, which misled (a review)
    with pytest.raises(ValueError, match=re.escape("lora_shrink: x expected shape [M, 8] (K of lora_a (2, 3, 8) = "
                                                   "[L, R, K]), got (4, 3)")):
        lk.ops.lora_shrink(x[:, :3], lora_a, batch, scalings, backend="torch")
    with pytest.raises(ValueError, match=re.escape("lora_expand: t expected shape [4, 3] ([M, R] for out (4, 5) and "
                                                   "lora_b (2, 5, 3) = [L, N, R]), got (4, 5)")):
        lk.ops.lora_expand(torch.zeros(4, 5), torch.randn(2, 5, 3), batch, torch.zeros(4, 5), backend="torch")


@pytest.mark.parametrize("bad,words", [
    (lambda t, lora_b, out: (t.to("meta"), lora_b, out),
     r"lora_expand: t expected device cpu \(same as out\), got meta"),
    (lambda t, lora_b, out: (t, lora_b.to("meta"), out),
     r"lora_expand: lora_b expected device cpu \(same as out\), got meta"),
    # out the odd one: the message names it as where the expected device comes from (it had read as t's fault)
    (lambda t, lora_b, out: (t, lora_b, out.to("meta")),
     r"lora_expand: t expected device meta \(same as out\), got cpu"),
    (lambda t, lora_b, out: (t, lora_b, lora_b.view(-1)[:20].view(4, 5)),
     "lora_expand: out expected memory of its own, got a view that overlaps lora_b"),
])
def test_lora_expand_names_t_or_lora_b_on_another_device_or_under_out(bad, words):
    x, lora_a, batch, scalings = _serving_args()
    t = lk.ops.lora_shrink(x, lora_a, batch, scalings, backend="torch")
    t, lora_b, out = bad(t, torch.randn(2, 5, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match=words):
        lk.ops.lora_expand(t, lora_b, batch, out, backend="torch")


@pytest.mark.parametrize("on_host", [True, False], ids=["by_slot", "masked"])
def test_torch_fallback_reads_nothing_past_a_slot_rank(on_host, monkeypatch):
    """Both paths of the torch backend: an Inf in a token of a rank-1 slot leaves zeros in its shrink columns past
    rank 1 (the masked path made NaN there as Inf times A's rows zeroed), and NaN in t's columns past the rank stays
    out of the expand (the masked path zeroed B's columns only: NaN times 0)."""
    monkeypatch.setattr(ops, "slots_on_host", lambda *args: on_host)
    x, lora_a, batch, scalings = _serving_args()  # tokens 1 and 3 in slot 1
    ranks = [3, 1]
    x[1, 0] = float("inf")
    shrunk = lk.ops.lora_shrink(x, lora_a, batch, scalings, ranks, backend="torch")
    assert shrunk[[1, 3], 1:].eq(0).all()
    t = torch.randn(4, 3)
    t[[1, 3], 1:] = float("nan")
    assert lk.ops.lora_expand(t, torch.randn(2, 5, 3), batch, torch.zeros(4, 5), ranks=ranks,
                              backend="torch").isfinite().all()


@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
def test_lora_expand_rounds_once_into_a_16_bit_out(backend):
    """out + the LoRA term is rounded once: bfloat16 256 + (1 + 2^-9) is 258. The term rounded to bfloat16 first
    (1.0) made a tie, 257, that rounds to even: 256."""
    backend_or_skip(backend, "cpu")
    batch = LoRABatch.from_adapter_ids(torch.tensor([0]), 1)
    out = torch.full((1, 1), 256.0, dtype=torch.bfloat16)
    lk.ops.lora_expand(torch.tensor([[1 + 2 ** -9]]), torch.ones(1, 1, 1, dtype=torch.bfloat16), batch, out,
                       backend=backend)
    assert out.item() == 258


def test_triton_slot_limit_is_inclusive():
    """L up to a grid dimension's limit runs on the triton backend; one more slot is refused."""
    limit = triton_pkg.MAX_GRID_YZ
    ops.check_triton_args("lora_shrink", torch.float32, limit)
    with pytest.raises(ValueError, match=f"lora_shrink: the triton backend takes at most {limit} adapter slots, got "
                                         f"L = {limit + 1}"):
        ops.check_triton_args("lora_shrink", torch.float32, limit + 1)


def test_reference_backend_traced_keeps_its_float64_math():
    """Traced (torch.compile), the reference backend's shrink and expand are slot-masked torch ops in float64, as its
    eager loops are: their float32 results equal the eager ones bit for bit (in float32, ~1e-5 off here)."""
    torch.manual_seed(0)
    x, lora_a, lora_b, y = torch.randn(16, 256), torch.randn(2, 4, 256), torch.randn(2, 64, 4), torch.randn(16, 64)

    def serve(x, ids, y):
        batch = LoRABatch.from_adapter_ids(ids, 2)
        shrunk = lk.ops.lora_shrink(x, lora_a, batch, [1.0, 1.0], backend="reference")
        return shrunk, lk.ops.lora_expand(shrunk, lora_b, batch, y, backend="reference")

    ids = torch.tensor([0, 1] * 8)
    compiled = torch.compile(serve, fullgraph=True, backend="eager")
    for name, got, want in zip(("shrink", "expand"), compiled(x, ids, y.clone()), serve(x, ids, y.clone())):
        assert torch.equal(got, want), name


def test_reference_lora_expand_adds_at_the_slice_offset():
    x, lora_a, batch, scalings = _serving_args()
    t, lora_b = lk.ops.lora_shrink(x, lora_a, batch, scalings, backend="torch"), torch.randn(2, 5, 3)
    want = lk.ops.lora_expand(t, lora_b, batch, torch.zeros(4, 9), 3, backend="torch")
    torch.testing.assert_close(lk.ops.lora_expand(t, lora_b, batch, torch.zeros(4, 9), 3, backend="reference"), want)


@pytest.mark.parametrize("bad_out,error,words", [
    (lambda lora_a: torch.zeros(4, 3).tolist(), TypeError, "lora_shrink: out expected a torch.Tensor, got list"),
    (lambda lora_a: torch.zeros(4, 3, device="meta"), ValueError,
     r"lora_shrink: out expected device cpu \(same as x\), got meta"),
    (lambda lora_a: lora_a.view(-1)[:12].view(4, 3), ValueError,
     "lora_shrink: out expected memory of its own, got a view that overlaps lora_a"),
])
def test_lora_shrink_names_a_wrong_out(bad_out, error, words):
    """A list out failed reading its dtype, a meta out was copied into, and an out over lora_a's memory let the
    shrink overwrite the weights it reads."""
    x, lora_a, batch, scalings = _serving_args()
    with pytest.raises(error, match=words):
        lk.ops.lora_shrink(x, lora_a, batch, scalings, backend="torch", out=bad_out(lora_a))


def test_lora_expand_picks_its_backend_for_out_dtype(monkeypatch):
    """The auto choice is made for out's dtype, not t's (always float32): a float64 out on CUDA got the Triton
    backend, which refuses float64, where the C++ CUDA one runs it."""
    asked = []
    resolve = ops.resolve_backend
    monkeypatch.setattr(ops, "resolve_backend", lambda *args: asked.append(args[3]) or resolve(*args))
    x, lora_a, batch, scalings = _serving_args()
    t = lk.ops.lora_shrink(x, lora_a, batch, scalings, backend="torch")
    lk.ops.lora_expand(t, torch.randn(2, 5, 3, dtype=torch.float64), batch, torch.zeros(4, 5, dtype=torch.float64))
    assert asked == [torch.float32, torch.float64]


def test_add_lora_refuses_a_deterministic_that_is_not_a_bool():
    x, lora_a, batch, scalings = _serving_args()
    with pytest.raises(TypeError, match="add_lora: deterministic expected a bool, got 'no'"):
        lk.ops.add_lora(torch.zeros(4, 5), x, [lora_a], [torch.randn(2, 5, 3)], batch, scalings, None, [5],
                        backend="torch", deterministic="no")


@pytest.mark.parametrize("output_slices", [(True, 4), (2.0, 3.0), (6, -1)])
def test_add_lora_refuses_output_slices_that_are_not_ints_from_0(output_slices):
    """True was width 1 and 2.0 width 2; a negative width was refused as a y too narrow for the slice before."""
    x, lora_a, batch, scalings = _serving_args()
    lora_b = [torch.randn(2, abs(int(width)), 3) for width in output_slices]
    with pytest.raises(TypeError, match=re.escape(f"add_lora: output_slices expected a sequence of ints >= 0, "
                                                  f"got {list(output_slices)!r}")):
        lk.ops.add_lora(torch.zeros(4, 5), x, [lora_a, lora_a], lora_b, batch, scalings, None, list(output_slices),
                        backend="torch")


@pytest.mark.parametrize("num_a,num_b,widths", [(0, 0, []), (2, 1, [5])])
def test_add_lora_needs_as_many_a_and_b_slices_as_widths(num_a, num_b, widths):
    """No slice at all, or an extra lora_a slice (ignored), is refused naming the three lengths."""
    x, lora_a, batch, scalings = _serving_args()
    with pytest.raises(ValueError, match=f"add_lora: lora_a_slices, lora_b_slices and output_slices expected the "
                                         f"same non-zero length, got {num_a}, {num_b}, {len(widths)}"):
        lk.ops.add_lora(torch.zeros(4, sum(widths)), x, [lora_a] * num_a, [torch.randn(2, 5, 3)] * num_b, batch,
                        scalings, None, widths, backend="torch")


def test_add_lora_names_a_y_that_is_not_a_tensor():
    """It failed reading y's shape, naming nothing."""
    x, lora_a, batch, scalings = _serving_args()
    with pytest.raises(TypeError, match="add_lora: y expected a torch.Tensor, got list"):
        lk.ops.add_lora(torch.zeros(4, 5).tolist(), x, [lora_a], [torch.randn(2, 5, 3)], batch, scalings, None, [5],
                        backend="torch")


@pytest.mark.parametrize("lora_b,error,words", [
    (torch.randn(2, 5, 3).tolist(), TypeError, "add_lora: lora_b_slices[0] expected a torch.Tensor, got list"),
    (torch.randn(5, 5), ValueError, "add_lora: lora_b_slices[0] expected shape [L, 5, R] (output_slices[0] = 5), "
                                    "got (5, 5)"),
])
def test_add_lora_names_a_lora_b_slice_that_is_not_a_3d_tensor(lora_b, error, words):
    """A list is a TypeError, as for every other tensor argument (it was a ValueError); a 2-D lora_b whose second
    dimension happens to be the slice's width is refused by shape, not an IndexError reading its R."""
    x, lora_a, batch, scalings = _serving_args()
    with pytest.raises(error, match=re.escape(words)):
        lk.ops.add_lora(torch.zeros(4, 5), x, [lora_a], [lora_b], batch, scalings, None, [5], backend="torch")


def test_add_lora_names_the_slice_whose_k_differs_from_x_and_slice_0():
    """x matched lora_a_slices[0]; a later slice of another K was reported as "x expected shape [M, 9] (K of
    lora_a_slices[1] ...)", blaming x."""
    x, lora_a, batch, scalings = _serving_args()
    odd = torch.randn(lora_a.shape[0], lora_a.shape[1], x.shape[1] + 1)
    words = (f"add_lora: lora_a_slices[1] expected shape [L, R, {x.shape[1]}] (K of x {tuple(x.shape)} and of "
             f"lora_a_slices[0]), got {tuple(odd.shape)}")
    with pytest.raises(ValueError, match=re.escape(words)):
        lk.ops.add_lora(torch.zeros(4, 10), x, [lora_a, odd], [torch.randn(2, 5, 3)] * 2, batch, scalings, None,
                        [5, 5], backend="torch")


@pytest.mark.parametrize("device", ["meta", "cpu"])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["list", "cpu_tensor"])
def test_add_lora_checks_host_ranks_against_every_slice_rank(device, as_tensor):
    """Ranks given on the host are checked against each slice's R, also when x is on a device: converted once for
    the first slice (R 3), the later slice (R 2) got a device tensor, whose values are not read, and a rank of 3
    passed (meta stands in for CUDA). y is left untouched."""
    ids = torch.tensor([0, 1, -1, 1], device=device)
    x, y = torch.zeros(4, 8, device=device), torch.zeros(4, 10, device=device)
    lora_a = [torch.ones(2, rank, 8, device=device) for rank in (3, 2)]
    lora_b = [torch.ones(2, 5, rank, device=device) for rank in (3, 2)]
    ranks = torch.tensor([3, 1]) if as_tensor else [3, 1]
    with pytest.raises(ValueError, match=re.escape("add_lora: ranks expected values in [0, 2] (R of lora_a_slices[1] "
                                                   "(2, 2, 8)), got 3")):
        lk.ops.add_lora(y, x + 1, lora_a, lora_b, LoRABatch.from_adapter_ids(ids, 2), [1.0, 0.5], ranks, [5, 5],
                        backend="torch")
    if device == "cpu":
        assert y.eq(0).all()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_add_lora_checks_ranks_given_as_an_iterator_against_every_slice(backend):
    """An iterator of ranks is read up by slice 0's conversion: a later slice's check then saw no values, and the
    cpu backend refused the rank only after slice 0 was added into y (the torch backend clamped it silently)."""
    backend_or_skip(backend, "cpu")
    ids, y = torch.tensor([0, 1, -1, 1]), torch.zeros(4, 10)
    lora_a = [torch.ones(2, rank, 8) for rank in (3, 2)]
    lora_b = [torch.ones(2, 5, rank) for rank in (3, 2)]
    with pytest.raises(ValueError, match=re.escape("add_lora: ranks expected values in [0, 2] (R of lora_a_slices[1] "
                                                   "(2, 2, 8)), got 3")):
        lk.ops.add_lora(y, torch.ones(4, 8), lora_a, lora_b, LoRABatch.from_adapter_ids(ids, 2), [1.0, 0.5],
                        iter([3, 1]), [5, 5], backend=backend)
    assert y.eq(0).all()


@pytest.mark.parametrize("bad, error, words", [
    (lambda a: a.double(), TypeError, "add_lora: lora_a_slices[1] expected dtype torch.float32 (same as x), got "
                                      "torch.float64"),
    (lambda a: a.to("meta"), ValueError, "add_lora: lora_a_slices[1] expected device cpu (same as x), got meta"),
    (lambda a: a.tolist(), TypeError, "add_lora: lora_a_slices[1] expected a torch.Tensor, got list"),
    (lambda a: a[0], ValueError, "add_lora: lora_a_slices[1] expected a 3-D tensor, got shape (2, 8)"),
    (lambda a: a[:1], ValueError, "add_lora: batch was built for 2 adapter slots, but lora_a_slices[1] has 1 (L)"),
])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_add_lora_checks_a_later_slice_lora_a_before_touching_y(backend, bad, error, words):
    """Slices after the first skip the checks of x, the batch and scalings, not their own lora_a's: a bad one is
    refused by name before slice 0 is added into y."""
    backend_or_skip(backend, "cpu")
    ids, y = torch.tensor([0, 1, -1, 1]), torch.zeros(4, 10)
    lora_a = [torch.ones(2, 2, 8), bad(torch.ones(2, 2, 8))]
    lora_b = [torch.ones(2, 5, 2) for _ in range(2)]
    with pytest.raises(error, match=re.escape(words)):
        lk.ops.add_lora(y, torch.ones(4, 8), lora_a, lora_b, LoRABatch.from_adapter_ids(ids, 2), [1.0, 0.5],
                        None, [5, 5], backend=backend)
    assert y.eq(0).all()


@pytest.mark.parametrize("ranks", [[3, 1], None], ids=["ranks", "no_ranks"])
def test_add_lora_converts_scalings_and_ranks_once_per_call(ranks, monkeypatch):
    """scalings, ranks and the batch are the same for every slice: checked per slice they made up a third of a
    3-slice call's host time (helper 177: as_ranks ran 6 times, as_scalings 3). ranks=None still makes one full
    ranks per slice (each slice's own R). The result is the slices' lora_shrink and lora_expand."""
    x, _, batch, scalings = _serving_args()
    lora_a = [torch.randn(2, rank, 8) for rank in (3, 4, 5)]
    lora_b = [torch.randn(2, width, rank) for width, rank in ((5, 3), (2, 4), (3, 5))]
    calls = collections.Counter()
    for name in ("as_ranks", "as_scalings"):
        def counted(*args, _real=getattr(ops, name), _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(ops, name, counted)
    y = lk.ops.add_lora(torch.zeros(4, 10), x, lora_a, lora_b, batch, scalings, ranks, [5, 2, 3], backend="torch")
    assert calls == {"as_scalings": 1, "as_ranks": 1 if ranks else 3}
    monkeypatch.undo()
    expected = torch.zeros(4, 10)
    for a, b, offset in zip(lora_a, lora_b, (0, 5, 7)):
        t = lk.ops.lora_shrink(x, a, batch, scalings, ranks, backend="torch")
        lk.ops.lora_expand(t, b, batch, expected, offset, ranks, backend="torch")
    assert torch.equal(y, expected)


def _add_lora_args(ranks=(3, 3)):
    """Two slices of width 5 over _serving_args' x and batch, of ranks R_j, and y [4, 10]."""
    x, _, batch, scalings = _serving_args()
    lora_a = [torch.randn(2, rank, 8) for rank in ranks]
    lora_b = [torch.randn(2, 5, rank) for rank in ranks]
    return x, lora_a, lora_b, batch, scalings, torch.zeros(4, 10)


@pytest.mark.parametrize("ranks,bad_buffer,error,words", [
    ((3, 3), lambda y: torch.zeros(2, 4, 3).tolist(), TypeError, "add_lora: buffer expected a torch.Tensor, got list"),
    ((3, 3), lambda y: torch.zeros(2, 4, 3, dtype=torch.float16), ValueError,
     "add_lora: buffer expected a float32 tensor of shape [2, 4, 3] ([S, M, R]), "
     "got torch.float16 (2, 4, 3)"),
    # the buffer fits the first slice: the slices' ranks are what it cannot take (the message had named the buffer,
    # expected and got alike)
    ((3, 2), lambda y: torch.zeros(2, 4, 3), ValueError,
     "add_lora: buffer takes slices of one rank R ([S, M, R]), but lora_a_slices[0] has R = 3 and lora_a_slices[1] "
     "R = 2; call without buffer for slices of unequal ranks"),
    ((3, 3), lambda y: torch.zeros(2, 4, 3, device="meta"), ValueError,
     "add_lora: buffer expected device cpu (same as x), got meta"),
    ((3, 3), lambda y: y.view(-1)[:24].view(2, 4, 3), ValueError,
     "add_lora: buffer expected memory of its own, got a view that overlaps y"),
])
def test_add_lora_names_a_wrong_buffer(ranks, bad_buffer, error, words):
    """A list failed reading its dtype; a float16 buffer (the shrink results rounded to 16 bits), one sized for the
    first slice's R when a later slice's differs, a meta one, and one over y's memory (each shrink's result written
    into the columns the expands add to) were taken."""
    x, lora_a, lora_b, batch, scalings, y = _add_lora_args(ranks)
    with pytest.raises(error, match=re.escape(words)):
        lk.ops.add_lora(y, x, lora_a, lora_b, batch, scalings, None, [5, 5], backend="torch", buffer=bad_buffer(y))


def test_add_lora_refuses_a_y_over_a_lora_b_slice():
    """The expand of the first slice overwrote the second slice's weights before reading them."""
    x, lora_a, lora_b, batch, scalings, _ = _add_lora_args()
    memory = torch.zeros(40)
    lora_b[1] = memory[:30].view(2, 5, 3).copy_(lora_b[1])
    y = memory.view(4, 10)
    with pytest.raises(ValueError, match=re.escape("add_lora: y expected memory of its own, got a view that overlaps "
                                                   "lora_b_slices[1]")):
        lk.ops.add_lora(y, x, lora_a, lora_b, batch, scalings, None, [5, 5], backend="torch")


@pytest.mark.parametrize("x_dtype,y_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_add_lora_triton_refuses_float64_x_or_y_alone(x_dtype, y_dtype):
    """x and y are checked apart: the shrink reads x's dtype, the expand writes y's."""
    x, lora_a, lora_b, batch, scalings, y = _add_lora_args()
    with pytest.raises(TypeError, match=re.escape("add_lora: the triton backend runs float32/float16/bfloat16, got "
                                                  "torch.float64")):
        lk.ops.add_lora(y.to(y_dtype), x.to(x_dtype), [a.to(x_dtype) for a in lora_a],
                        [b.to(y_dtype) for b in lora_b], batch, scalings, None, [5, 5], backend="triton")


def test_add_lora_triton_takes_a_stacked_lora_b_after_listed_lora_a_slices():
    """The one stacked expand needs the shrink results stacked too: after one shrink per listed slice, each slice of
    a stacked lora_b is expanded on its own."""
    x, lora_a, lora_b, batch, scalings, y = _add_lora_args()
    want = lk.ops.add_lora(y.clone(), x, lora_a, lora_b, batch, scalings, None, [5, 5], backend="torch")
    got = lk.ops.add_lora(y, x, lora_a, torch.stack(lora_b), batch, scalings, None, [5, 5], backend="triton")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["cpu", "torch", "reference", "triton"])
@pytest.mark.parametrize("which", ["x", "lora_a", "lora_b", "scalings"])
def test_serving_ops_refuse_inputs_that_require_grad_by_name(backend, which):
    """An adapter stack kept as an nn.Parameter, run without torch.no_grad: the backends disagreed (cpu raised a
    RuntimeError naming its internal shrink result t, torch and reference made y a graph node that the next call on
    the same buffer refused, blaming y, triton dropped the requirement); each refuses now, naming the input, before y
    is written (helper 128)."""
    backend_or_skip(backend, "cpu")
    num_slots, rank, k, n = 2, 4, 8, 6
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, -1]), num_slots)
    args = {"x": torch.randn(3, k), "lora_a": torch.randn(num_slots, rank, k),
            "lora_b": torch.randn(num_slots, n, rank), "scalings": torch.ones(num_slots)}
    args[which] = torch.nn.Parameter(args[which])
    name = {"lora_a": "lora_a_slices[0]", "lora_b": "lora_b_slices[0]"}.get(which, which)
    y = torch.randn(3, n)
    before = y.clone()

    def add_lora():
        return lk.ops.add_lora(y, args["x"], [args["lora_a"]], [args["lora_b"]], batch, args["scalings"], None, [n],
                               backend=backend)
    with pytest.raises(ValueError, match=re.escape(f"add_lora: {name} expected a tensor that does not require grad "
                                                   f"(the op is not differentiable; lora_kernels.multi_lora_linear "
                                                   f"is), got one that does; call under torch.no_grad() or pass "
                                                   f"{name}.detach()")):
        add_lora()
    assert torch.equal(y, before) and not y.requires_grad
    with torch.no_grad():
        add_lora()
    assert not torch.equal(y, before) and not y.requires_grad
    if which == "lora_b":
        with torch.no_grad():
            t = lk.ops.lora_shrink(args["x"], args["lora_a"], batch, args["scalings"], backend=backend)
        before = y.clone()
        with pytest.raises(ValueError, match=r"lora_expand: lora_b expected a tensor that does not require grad"):
            lk.ops.lora_expand(t, args["lora_b"], batch, y, backend=backend)
        assert torch.equal(y, before)
    else:
        with pytest.raises(ValueError, match=rf"lora_shrink: {which} expected a tensor that does not require grad"):
            lk.ops.lora_shrink(args["x"], args["lora_a"], batch, args["scalings"], backend=backend)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "reference"])
def test_serving_ops_refuse_an_inference_tensor_output_outside_inference_mode_before_writing(backend):
    """An output made under torch.inference_mode, written outside it: torch raises only after its in-place write (the
    version bump follows the kernel), so add_lora wrote some slices and raised (torch, cpu, reference), and the
    eager Triton launches wrote without an error. Refused by name before anything is written, on every backend."""
    backend_or_skip(backend, "cpu")
    L, R, K, M = 2, 4, 8, 3
    x, scalings, ranks = torch.randn(M, K), torch.ones(L), torch.full((L,), R, dtype=torch.int32)
    lora_a, lora_b = [torch.randn(L, R, K) for _ in range(2)], [torch.randn(L, 5, R) for _ in range(2)]
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, 0]), L)
    with torch.inference_mode():
        y, out = torch.zeros(M, 10), torch.zeros(M, R)
    with torch.no_grad():
        with pytest.raises(ValueError, match="add_lora: y is an inference tensor"):
            lk.ops.add_lora(y, x, lora_a, lora_b, batch, scalings, ranks, [5, 5], backend=backend)
        with pytest.raises(ValueError, match="lora_expand: out is an inference tensor"):
            lk.ops.lora_expand(torch.randn(M, R), lora_b[0], batch, y, 0, ranks, backend=backend)
        with pytest.raises(ValueError, match="lora_shrink: out is an inference tensor"):
            lk.ops.lora_shrink(x, lora_a[0], batch, scalings, ranks, backend=backend, out=out)
    assert not y.any() and not out.any()
    with torch.inference_mode():  # inside inference mode they are ordinary outputs
        lk.ops.add_lora(y, x, lora_a, lora_b, batch, scalings, ranks, [5, 5], backend=backend)
    assert y.any()


def test_lora_batch_built_under_inference_mode_refuses_a_refill_outside_it_before_writing():
    """refill_ outside inference mode of a batch built inside it raised after writing adapter_ids alone: the sorted
    metadata stayed stale, so the Triton decode kernels (which read adapter_ids) and the others disagreed."""
    with torch.inference_mode():
        batch = LoRABatch.from_adapter_ids(torch.full((4,), -1), 2)
    with pytest.raises(ValueError, match="LoRABatch.refill_: the batch's adapter_ids is an inference tensor"):
        batch.refill_(torch.tensor([1, 0, 1, -1]))
    assert batch.adapter_ids.tolist() == [-1] * 4 and batch.slot_counts.tolist() == [0, 0]
    with torch.inference_mode():
        batch.refill_(torch.tensor([1, 0, 1, -1]))
    assert batch.slot_counts.tolist() == [1, 2]


def _hand_built_batches(m, num_slots, device):
    """A consistent batch of m tokens over num_slots slots, and copies whose metadata a hand-built LoRABatch could
    get wrong: an adapter id at L or below -1 (what the decode kernels read; unchecked on a GPU by default); a sorted
    token id at M, past it and far past it, one below 0; a slot range running one past M, five past it, one starting
    below 0 (what the prefill kernels read)."""
    good = LoRABatch.from_adapter_ids(torch.arange(m, device=device) % num_slots, num_slots)

    def changed(field, position, value):
        values = getattr(good, field).clone()
        values[position] = value
        return dataclasses.replace(good, **{field: values})

    return good, {"id at L": changed("adapter_ids", 1, num_slots),
                  "id below -1": changed("adapter_ids", 1, -2),
                  "token at M": changed("sorted_token_ids", -1, m),
                  "token past M": changed("sorted_token_ids", -1, m + 2),
                  "token far past M": changed("sorted_token_ids", 3, 10 ** 6),
                  "token below 0": changed("sorted_token_ids", 0, -5),
                  "range one past M": changed("slot_counts", num_slots - 1, int(good.slot_counts[-1]) + 1),
                  "range past M": changed("slot_counts", num_slots - 1, int(good.slot_counts[-1]) + 5),
                  "range below 0": changed("slot_starts", 0, -3)}


@pytest.mark.parametrize("m", [8, 80], ids=["decode", "prefill"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_hand_built_batch_out_of_range_never_reaches_past_the_tensors(device, backend, m):
    """Device metadata is clamped, not checked (reading it would sync): a LoRABatch built by hand with values out of
    range must not make the decode (8 tokens on 3 slots) or prefill kernels (80) read rows of x past M, write rows
    of out or y past M, read past the slots, or read past M in the backward (helper 171: Triton's prefill kernels
    read and wrote there, and crashed on an id far past M). x, out and y are views of buffers whose rows past M hold
    NaN or a marker."""
    backend_or_skip(backend, device)
    k, n, r, num_slots = 8, 6, 4, 3
    _, bad_batches = _hand_built_batches(m, num_slots, device)
    x_buffer = torch.full((m + 8, k), float("nan"), device=device)
    x_buffer[:m] = torch.randn(m, k, device=device)
    x = x_buffer[:m]
    lora_a, lora_b = torch.randn(num_slots, r, k, device=device), torch.randn(num_slots, n, r, device=device)
    weight, scalings = torch.randn(n, k, device=device), torch.ones(num_slots, device=device)
    for what, batch in bad_batches.items():
        out_buffer = torch.full((m + 8, r), 7.0, device=device)
        lk.ops.lora_shrink(x, lora_a, batch, scalings, backend=backend, out=out_buffer[:m])
        y_buffer = torch.full((m + 8, n), 7.0, device=device)
        lk.ops.lora_expand(out_buffer[:m], lora_b, batch, y_buffer[:m], backend=backend)
        for name, buffer in (("lora_shrink's out", out_buffer), ("lora_expand's out", y_buffer)):
            assert torch.isfinite(buffer[:m]).all(), f"{what}: {name} read a row of x past M"
            assert (buffer[m:] == 7.0).all(), f"{what}: {name} written past M"
        a, b = lora_a.clone().requires_grad_(), lora_b.clone().requires_grad_()
        lk.multi_lora_linear(x, weight, a, b, batch, scalings, backend=backend).sum().backward()
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all(), f"{what}: the backward read past M"


def test_the_reference_counts_a_hand_built_batchs_id_out_of_range_as_base_only():
    """The reference backend reads adapter_ids alone, and as every other backend an id outside [-1, L) counts as -1
    (base model only): an id at L raised a bare IndexError there (helper 183)."""
    m, k, n, r, num_slots = 8, 8, 6, 4, 3
    _, bad_batches = _hand_built_batches(m, num_slots, "cpu")
    x, lora_a, lora_b = torch.randn(m, k), torch.randn(num_slots, r, k), torch.randn(num_slots, n, r)
    weight, scalings = torch.randn(n, k), torch.ones(num_slots)
    for what in ("id at L", "id below -1"):
        batch = bad_batches[what]
        in_range = (batch.adapter_ids >= 0) & (batch.adapter_ids < num_slots)
        as_base = dataclasses.replace(batch, adapter_ids=torch.where(in_range, batch.adapter_ids, -1))
        assert not in_range.all()
        for name, call in (
                ("lora_shrink", lambda b: lk.ops.lora_shrink(x, lora_a, b, scalings, backend="reference")),
                ("lora_expand", lambda b: lk.ops.lora_expand(torch.ones(m, r), lora_b, b, torch.zeros(m, n),
                                                             backend="reference")),
                ("multi_lora_linear", lambda b: lk.multi_lora_linear(x, weight, lora_a, lora_b, b, scalings,
                                                                     backend="reference"))):
            assert torch.equal(call(batch), call(as_base)), (what, name)
        a, b = lora_a.clone().requires_grad_(), lora_b.clone().requires_grad_()
        lk.multi_lora_linear(x, weight, a, b, batch, scalings, backend="reference").sum().backward()
        assert torch.isfinite(a.grad).all(), what


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_hand_built_batch_out_of_range_is_refused_on_the_host(backend):
    """CPU metadata is read on the host anyway: values out of range are a ValueError naming the field, before any
    write (the torch backend had dropped a range's tokens past M silently and raised a bare IndexError for an id)."""
    backend_or_skip(backend, torch.device("cpu"))
    m, k, n, r, num_slots = 80, 8, 6, 4, 3
    _, bad_batches = _hand_built_batches(m, num_slots, "cpu")
    x, lora_a, lora_b = torch.randn(m, k), torch.randn(num_slots, r, k), torch.randn(num_slots, n, r)
    for what, batch in bad_batches.items():
        if what.startswith("id"):
            continue  # the host paths read the sorted metadata, not adapter_ids
        field = "sorted_token_ids" if what.startswith("token") else "slot_starts/slot_counts"
        with pytest.raises(ValueError, match=re.escape(field)):
            lk.ops.lora_shrink(x, lora_a, batch, torch.ones(num_slots), backend=backend)
        y = torch.zeros(m, n)
        with pytest.raises(ValueError, match=re.escape(field)):
            lk.ops.lora_expand(torch.ones(m, r), lora_b, batch, y, backend=backend)
        assert (y == 0).all(), what


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_hand_built_batch_with_a_token_in_two_slots_is_refused_on_the_host(backend):
    """Two slots' ranges over one sorted position, or one token listed twice within the ranges (from_adapter_ids
    never builds either): the cpu kernels refused them, the torch backend added both adapters' terms to the token,
    without a word (helper 282)."""
    backend_or_skip(backend, torch.device("cpu"))
    m, k, n, r, num_slots = 6, 8, 5, 2, 2
    good = LoRABatch.from_adapter_ids(torch.tensor([0, 1, 1, 0, 1, 0]), num_slots)
    overlapping = dataclasses.replace(good, slot_counts=good.slot_counts + torch.tensor([1, 0], dtype=torch.int32))
    token_twice = dataclasses.replace(good, sorted_token_ids=torch.tensor([0, 3, 5, 1, 2, 1], dtype=torch.int32))
    x, lora_a, lora_b = torch.randn(m, k), torch.randn(num_slots, r, k), torch.randn(num_slots, n, r)
    for batch, words in ((overlapping, "slot_starts/slot_counts expected disjoint token ranges, got slot 1 "
                                       "overlapping "),
                         (token_twice, "sorted_token_ids expected each token at most once within the slots' ranges, "
                                       "got token 1 ")):
        with pytest.raises(ValueError, match=re.escape(words)):
            lk.ops.lora_shrink(x, lora_a, batch, torch.ones(num_slots), backend=backend)
        y = torch.zeros(m, n)
        with pytest.raises(ValueError, match=re.escape(words)):
            lk.ops.lora_expand(torch.ones(m, r), lora_b, batch, y, backend=backend)
        assert (y == 0).all()
        with pytest.raises(ValueError, match=re.escape(words)):
            lk.multi_lora_linear(x, torch.randn(n, k), lora_a, lora_b, batch, torch.ones(num_slots), backend=backend)
    # past decode sizes the torch backend counts the tokens another way; a repeat outside the ranges is no error
    large = LoRABatch.from_adapter_ids(torch.arange(300) % 3 - 1, num_slots)  # ids -1 (outside the ranges), 0, 1
    ids = large.sorted_token_ids.clone()
    outside_twice, inside_twice = ids.clone(), ids.clone()
    outside_twice[0] = ids[1]  # positions 0-99 hold the -1 tokens, in no slot's range
    inside_twice[150] = ids[149]
    x = torch.randn(300, k)
    lk.ops.lora_shrink(x, lora_a, dataclasses.replace(large, sorted_token_ids=outside_twice), torch.ones(num_slots),
                       backend=backend)
    with pytest.raises(ValueError, match=re.escape("sorted_token_ids expected each token at most once within the "
                                                   f"slots' ranges, got token {int(ids[149])} ")):
        lk.ops.lora_shrink(x, lora_a, dataclasses.replace(large, sorted_token_ids=inside_twice),
                           torch.ones(num_slots), backend=backend)


def test_auto_leaves_out_the_triton_kernels_where_they_cannot_run(monkeypatch):
    """On GPUs "auto" picks the Triton kernels for the grouped ops by op and dtype alone: a float64 x into a float32 y
    (add_lora, resolved by y's dtype) and more adapter slots than Triton's grid holds were then refused by the Triton
    checks, where other backends run them (the C++ CUDA ops refuse that many slots too, and the float64 ones picked
    for them were); with TRITON_INTERPRET=1 CUDA tensors would run interpreted. Stand-ins: a
    resolve_backend that gives "auto" auto_backend's choice for a GPU with every backend available (its CUDA kernels
    standing in as torch for these CPU tensors), and a CUDA device for auto_backend."""
    from lora_kernels import backends, functional, ops

    real = backends.resolve_backend

    def gpu_like(backend, device, op, dtype=None, num_slots=0):
        if backend != "auto":
            return real(backend, device, op, dtype, num_slots)
        chosen = backends.auto_backend(torch.device("cuda"), op, dtype, num_slots)
        return "torch" if chosen == "cuda" else chosen

    monkeypatch.setattr(backends, "unavailable_reason", lambda backend, device: None)
    monkeypatch.setattr(backends._triton_pkg, "INTERPRET", False)  # the tests' own setting would leave Triton out
    monkeypatch.setattr(ops, "resolve_backend", gpu_like)
    monkeypatch.setattr(functional, "resolve_backend", gpu_like)
    slots = triton_pkg.MAX_GRID_YZ + 1
    x, lora_a, lora_b = torch.randn(2, 2), torch.randn(slots, 1, 2), torch.randn(slots, 3, 1)
    ids, scalings = torch.tensor([0, slots - 1]), torch.ones(slots)
    batch = LoRABatch.from_adapter_ids(ids, slots)
    torch.testing.assert_close(lk.ops.lora_shrink(x, lora_a, batch, scalings, backend="auto"),
                               lk.ops.lora_shrink(x, lora_a, batch, scalings, backend="torch"))
    weight = torch.randn(3, 2)
    torch.testing.assert_close(lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, scalings),
                               lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, scalings, backend="torch"))
    small = LoRABatch.from_adapter_ids(torch.tensor([0, 1, -1]), 2)
    y, expected = torch.zeros(3, 4), torch.zeros(3, 4)
    x64, a, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(2, 2, 5, dtype=torch.float64), torch.randn(2, 4, 2)
    lk.ops.add_lora(y, x64, [a], [b], small, torch.ones(2), None, [4])
    lk.ops.add_lora(expected, x64, [a], [b], small, torch.ones(2), None, [4], backend="torch")
    torch.testing.assert_close(y, expected)

    cuda = torch.device("cuda")
    assert backends.auto_backend(cuda, "lora_shrink", torch.float32, slots - 1) == "triton"  # the grid holds them
    # nor the CUDA kernels' (register_cuda.cpp's check_sgmv_grid refused them; the test's first calls cannot tell)
    assert backends.auto_backend(cuda, "lora_shrink", torch.float32, slots) == "torch"
    assert backends.auto_backend(cuda, "multi_lora_linear", torch.float64, slots) == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends._triton_pkg, "INTERPRET", True)
    assert backends.auto_backend(torch.device("cuda"), "multi_lora_linear", torch.float32) != "triton"



@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
def test_an_out_that_requires_grad_is_refused_under_torch_func_grad_too(backend):
    """check_output read "no host values" for a tensor torch.func wraps and returned before its metadata checks: an
    out that requires grad went through under torch.func.grad (review 290). They run first now."""
    if backend not in backends.available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    torch.manual_seed(0)
    x, weight = torch.randn(5, 8), torch.randn(6, 8)
    lora_b = torch.randn(2, 6, 3)
    batch = lk.LoRABatch.from_adapter_ids(torch.tensor([0, 1, -1, 1, 0]), 2)
    t = lk.ops.lora_shrink(x, torch.randn(2, 3, 8), batch, torch.tensor([1.0, 2.0]), backend=backend)

    def loss(weight):
        out = x @ weight.T
        lk.ops.lora_expand(t, lora_b, batch, out, backend=backend)
        return out.square().sum()

    with pytest.raises(ValueError, match=r"lora_expand: out expected a tensor that does not require grad"):
        torch.func.grad(loss)(weight)
