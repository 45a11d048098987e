"""Serving-stack level grouped ops (SGMV prefill / BGMV-like decode): lora_shrink, lora_expand, add_lora.

L adapter slots are stacked: lora_a [L, R, K], lora_b [L, N, R], scalings [L] float32, ranks [L] int32. Tokens carry
slot ids through a LoRABatch (-1: base model only). Entries past ranks[i] are never used, and the kernels skip the
rank tiles past ranks[i] (within the tile that holds it the cuda and Triton kernels multiply zeros; the torch
fallback's masked loop, on GPUs and under torch.compile, works over all of R and selects or zeroes what lies past
ranks[i]). The Triton expand loads B and t up to min(ranks[i] rounded up to 8, R), 16 bytes at a time when R is a
multiple of 16, and selects the entries past ranks[i] away.
Checks run here, once, before any backend launches; eager calls then launch the Triton kernels unchecked (the C++
ops, callable directly as torch.ops.lora_kernels.*, check again, and so do the Triton custom ops that compiled
graphs and exported programs run, torch.ops.lora_kernels_triton.*).

Inside a CUDA-graph capture pass scalings and ranks as tensors on the device (MultiLoRALinear keeps them as buffers):
a Python list or a CPU tensor is copied to the device on every call, which synchronises with the host. Under
torch.compile, too: a Python list's values are baked into the graph, so new values recompile it.

These ops compute forward only (a serving stack's LoRA backend): they are not differentiable, and in grad mode every
backend refuses inputs that require grad, by name (check_no_grad_inputs). multi_lora_linear is the differentiable
grouped op.
"""

import collections.abc
import math
import numbers
import sys

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_true

from lora_kernels import triton as triton_pkg
from lora_kernels._dtensor import describe, dtensor_class, is_dtensor
from lora_kernels._ext import accumulate_dtype, autocast_off, has_host_values, wide_mm
from lora_kernels.backends import resolve_backend
from lora_kernels.batch import BUFFER_FIELDS, LoRABatch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def triton_sgmv():
    """lora_kernels.triton.sgmv (imported with the package when triton is importable; see lora_kernels.triton)."""
    from lora_kernels.triton import sgmv
    return sgmv


# ----------------------------------------------------------------------------------------------------------- checks

def check_dense(op, name, t):
    """TypeError for a sparse tensor: every backend reads dense memory, and a sparse argument failed deep inside,
    differently per backend ("Could not run 'lora_kernels::lora_fwd' with arguments from the 'SparseCPU' backend",
    "Cannot access storage of SparseTensorImpl", "expand is unsupported for Sparse tensors"), naming nothing."""
    if t.layout != torch.strided:
        raise TypeError(f"{op}: {name} expected a dense (strided) tensor, got layout {t.layout}; convert it with "
                        f"{name}.to_dense()")


def refuse_dtensor(op, name, t):
    """TypeError for a DTensor (tensor parallelism): the grouped ops index tokens and slots in plain tensors, and a
    DTensor failed inside torch ("aten.searchsorted.Tensor got mixed torch.Tensor and DTensor"), naming nothing."""
    if is_dtensor(t):
        raise TypeError(f"{op}: {name} expected a plain torch.Tensor, got {describe(t)} (tensor parallelism); the "
                        f"grouped ops take each rank's own shards: call them with {name}.to_local() on every rank "
                        f"(a column-parallel layer's lora_b and output slices, a row-parallel layer's x and lora_a "
                        f"with an all_reduce of the shrink's result)")


def _check_float(op, name, t, ndim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} expected a torch.Tensor, got {type(t).__name__}")
    refuse_dtensor(op, name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} expected a floating dtype, got {t.dtype}")
    check_dense(op, name, t)
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} expected a {ndim}-D tensor, got shape {tuple(t.shape)}")


def _check_device(op, name, t, device, same_as):
    # same_as names the tensor `device` is read from: the odd one out may be that one (an out on another device)
    if t.device != device:
        raise ValueError(f"{op}: {name} expected device {device} (same as {same_as}), got {t.device}")


def _byte_span(t):
    """[first, last + 1) address of t's elements (addresses, not storage offsets: two storage objects may hold one
    memory, e.g. torch.from_numpy of one array twice)."""
    start = t.data_ptr()
    return start, start + (1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))) * t.element_size()


def _is_dense(t):
    """Whether t's elements fill its byte span exactly (some permutation of a contiguous layout)."""
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _row_blocks(t):
    """(row pitch, first byte, row width) in bytes of a 2-D view with unit column stride, whose rows are byte ranges
    one pitch apart, as the column slices of one workspace are; else None."""
    if t.dim() != 2 or t.shape[1] > 1 and t.stride(1) != 1 or t.stride(0) < 1:
        return None
    size = t.element_size()
    return t.stride(0) * size, t.data_ptr(), t.shape[1] * size


def _dense_meets_rows(dense, rows):
    """Whether any row of the 2-D row-block view `rows` intersects the byte span of `dense`, which it fills."""
    (start, end), (pitch, first, width) = _byte_span(dense), _row_blocks(rows)
    i = max(0, (start - first - width) // pitch + 1)  # the first row that ends past `start`
    return i < rows.shape[0] and first + i * pitch < end


def _shares_memory(a, b):
    """Whether a and b (non-empty tensors in one memory) share an element: decided (True or False) where their spans
    do not intersect, both are dense, a dense one meets a 2-D view of row blocks (any pitch: the dense one fills its
    span), or both are 2-D views with one row pitch; None (undecided) for other layouts whose spans intersect (views
    of every other column of one buffer, say), as torch's own checks cannot decide them (at::get_overlap_status's
    TooHard)."""
    (a_start, a_end), (b_start, b_end) = _byte_span(a), _byte_span(b)
    if not (a_start < b_end and b_start < a_end):
        return False
    a_dense, b_dense = _is_dense(a), _is_dense(b)
    if a_dense and b_dense:
        return True
    a_layout, b_layout = _row_blocks(a), _row_blocks(b)
    if a_dense and b_layout is not None:  # add_lora's y a column block overlapping a dense x of another pitch
        return _dense_meets_rows(a, b)
    if b_dense and a_layout is not None:
        return _dense_meets_rows(b, a)
    if a_layout is None or b_layout is None or a_layout[0] != b_layout[0]:
        return None
    (pitch, a_first, a_width), (_, b_first, b_width) = a_layout, b_layout
    # Row i of a and row i + k of b intersect where -b_width < shift + k * pitch < a_width: try the least k with the
    # first (the spans' intersection puts it within the rows' range, or makes the rows at that range's end meet).
    # Not by rows and columns of the pitch grid: a view at an offset that is not a whole number of rows has rows
    # that run past the grid's row ends (a flat workspace's [2, 6] view from element 4).
    shift = b_first - a_first
    k = (-b_width - shift) // pitch + 1
    return shift + k * pitch < a_width


def _may_overlap_itself(t):
    """Whether two of t's elements may share memory: unless its dimensions, by increasing stride, each step past the
    span of those before (what every slice, transpose and column block of a dense tensor does). A stride-0
    dimension (an expand()ed view) does not; nor do rare interleavings that share nothing (sizes (3, 2), strides
    (2, 3)), which are refused with them."""
    if t.is_contiguous():  # the common case, in a fraction of the loop's time (every grouped op checks its out)
        return False
    span = 1
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1):
        if stride < span:
            return True
        span += stride * (size - 1)
    return False


_BATCH_INPUT_NAMES = tuple((f"batch.{field}", field) for field in BUFFER_FIELDS)


def batch_inputs(batch):
    """(name, buffer) of a LoRABatch's buffers, the inputs of check_output that every grouped op reads."""
    return [(name, getattr(batch, field)) for name, field in _BATCH_INPUT_NAMES]


def check_output(op, name, out, inputs, refuse_undecided=False):
    """ValueError unless `out`, which the op writes in place, is a tensor of its own: no element written twice (an
    expand()ed view or overlapping strides: the kernels raced there, the backends left different results), and no
    memory shared with the (name, tensor) inputs it reads, the scalings, ranks and batch buffers included (the cpu
    kernels read rows they had already overwritten, the triton ones scalings they had zeroed; see _shares_memory
    for the layouts decided), also through another storage object over the same memory. Returns whether `out` may
    share memory with an input in a layout this cannot decide (interleaved views of one buffer): the op then
    computes into a new tensor and copies it into `out` (refuse_undecided: raises instead). A few µs of host time
    in the common case (separate memory). Not while tracing, nor for meta and fake tensors, which have no memory to
    compare. A tensor that requires grad is refused while grad mode is on (check_no_grad_inputs): torch's in-place
    ops raised on a leaf only after computing, the cpu and triton kernels wrote into it, or into a view of it."""
    check_no_grad_inputs(op, ((name, out),))  # metadata only: also for tensors torch.func wraps (review 290)
    refuse_inference_tensor_writes(op, ((name, out),))
    if not has_host_values(out):
        return False
    if _may_overlap_itself(out):
        expanded = any(stride == 0 and size > 1 for size, stride in zip(out.shape, out.stride()))
        raise ValueError(f"{op}: {name} expected a tensor whose elements do not overlap in memory, got shape "
                         f"{tuple(out.shape)} with strides {out.stride()} "
                         f"({'an expanded view' if expanded else 'strides under which elements may share memory'}); "
                         f"pass a new tensor")
    storage = out.untyped_storage()
    low = storage.data_ptr()
    high = low + storage.nbytes()
    undecided = False
    for input_name, t in inputs:  # the common case first: memory apart from out's (a µs or less per input)
        if t is None:
            continue
        t_storage = t.untyped_storage()
        t_low = t_storage.data_ptr()
        if t_low != low and (t_low >= high or low >= t_low + t_storage.nbytes()) or t.device != out.device:
            continue
        shared = _shares_memory(out, t) if t.numel() and out.numel() else False
        undecided = undecided or shared is None
        if shared or shared is None and refuse_undecided:
            overlaps = "overlaps" if shared else "may overlap (in a layout whose overlap is not decided)"
            raise ValueError(f"{op}: {name} expected memory of its own, got a view that {overlaps} {input_name}, "
                             f"which the op reads ({name}: shape {tuple(out.shape)}, strides {out.stride()}, offset "
                             f"{out.storage_offset()}; {input_name}: shape {tuple(t.shape)}, strides {t.stride()}, "
                             f"offset {t.storage_offset()}); pass a separate tensor")
    return undecided


def refuse_inference_tensor_writes(op, tensors):
    """ValueError naming the first (name, tensor) that is an inference tensor (made under torch.inference_mode) while
    inference mode is off, before `op` writes any of them in place: torch raises there only after the write (its
    version-counter bump follows the kernel). add_lora had written some slices of y, LoRABatch.refill_ adapter_ids
    beside stale sorted metadata, set_adapter a slot's new lora_a beside the old lora_b, merge the merged weight
    with `merged` still False; the eager Triton launches, which bump no such counter, wrote without an error. Not
    while tracing (no inference tensors there)."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return
    for name, t in tensors:
        if isinstance(t, torch.Tensor) and t.is_inference():
            raise ValueError(f"{op}: {name} is an inference tensor (created under torch.inference_mode), which cannot "
                             f"be updated in place outside inference mode; call {op} inside torch.inference_mode(), "
                             f"or create {name} outside it")


def check_no_grad_inputs(op, inputs):
    """ValueError naming the first (name, tensor) that requires grad while grad mode is on: these ops are not
    differentiable, so autograd would not see a write into such an output, and the backends disagreed about such
    inputs (the cpu kernels raised a RuntimeError naming their internal shrink result `t`, the torch and reference
    paths made the output a graph node that the next call on it refused, the eager triton path ignored them). Not
    while tracing, as check_output."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    for name, t in inputs:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"{op}: {name} expected a tensor that does not require grad (the op is not "
                             f"differentiable; lora_kernels.multi_lora_linear is), got one that does; call under "
                             f"torch.no_grad() or pass {name}.detach()")


def _check_batch(op, batch, num_tokens, num_slots, device, tokens_name, weights_name):
    if not isinstance(batch, LoRABatch):
        raise TypeError(f"{op}: batch expected a LoRABatch, got {type(batch).__name__}")
    if dtensor_class() is not None:  # none exists before torch.distributed.tensor is imported
        for field in BUFFER_FIELDS:
            refuse_dtensor(op, f"batch.{field}", getattr(batch, field))
    batch.check_tokens(num_tokens, op, tokens_name)
    _check_batch_slots(op, batch, num_slots, weights_name)
    _check_device(op, "batch", batch.adapter_ids, device, tokens_name)


def _check_batch_slots(op, batch, num_slots, weights_name):
    if batch.num_adapters != num_slots:
        raise ValueError(f"{op}: batch was built for {batch.num_adapters} adapter slots, but {weights_name} has "
                         f"{num_slots} (L)")


def is_boolean(value):
    """Whether value is a bool: Python's, numpy's (not a Python bool: int() and float() take it, and a 0-d bool
    array's value), or a bool tensor."""
    numpy = sys.modules.get("numpy")  # never imported here: a numpy bool comes from a program that imported numpy
    return (isinstance(value, bool) or isinstance(value, torch.Tensor) and value.dtype == torch.bool
            or numpy is not None and (isinstance(value, numpy.bool_)
                                      or isinstance(value, numpy.ndarray) and value.dtype == numpy.bool_))


def _exact_int(value):
    """int(value) for a whole number (numpy ints and one-element tensors included); 1.5 or True is a TypeError
    rather than silently rank 1."""
    converted = int(value)
    if is_boolean(value) or converted != value:
        raise TypeError
    return converted


def _number(value):
    # float("2") would take a string, and float(True) a flag: a scaling of 1.0 (or 0.0) nobody wrote
    if isinstance(value, (str, bytes)) or is_boolean(value):
        raise TypeError
    try:
        return float(value)
    except OverflowError:  # an int past float's range (10**400): infinite, which the value checks then name
        return math.inf if value > 0 else -math.inf


def _host_tensor(op, name, values, dtype, what):
    """A sequence of numbers as a CPU tensor of dtype; anything else a TypeError naming the argument."""
    convert = _number if dtype.is_floating_point else _exact_int
    try:
        return torch.tensor([convert(v) for v in values], dtype=dtype)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} expected {what}, got {values!r}") from None


def check_flag(op, name, value):
    """value as a bool: True/False, an int 0/1 (numpy's too) or a numpy bool; anything else (a truthy string such
    as "no", None, a float, a tensor or array: `in (0, 1)` compared those elementwise, letting 1.0 through and raising
    an unnamed error for several elements) is a TypeError naming the argument."""
    if value is True or value is False:  # first: every lk.ops call checks its `deterministic`
        return value
    numpy_bool = type(value).__name__ in ("bool", "bool_") and type(value).__module__ == "numpy"
    if not (numpy_bool or isinstance(value, numbers.Integral) and value in (0, 1)):
        raise TypeError(f"{op}: {name} expected a bool, got {value!r}")
    return bool(value)


def positive_int(op, name, value):
    """value as an int >= 1 (a numpy integer too); anything else (a bool, a float) a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{op}: {name} expected an int >= 1, got {value!r}")
    return int(value)


def _check_host_or_device(op, name, t, device):
    """scalings and ranks may be CPU tensors (copied over, like a list) or on the tensors' device; any other device
    is refused like a mismatched device of the other arguments (a meta tensor failed in the copy, naming nothing),
    and a sparse one like the other arguments (it failed in the kernels: "Cannot access data pointer")."""
    check_dense(op, name, t)
    if t.device != device and t.device.type != "cpu":
        raise ValueError(f"{op}: {name} expected a tensor on {device} (the device of the other tensors) or the CPU, "
                         f"got {t.device}")


def as_scalings(op, scalings, num_slots, device, dtype=torch.float32):
    """scalings (a sequence or tensor of L numbers) as a float32 tensor [L] on device (what the kernels read);
    dtype=torch.float64 for multi_lora_linear's float64 composition, which must not round them to float32."""
    given = scalings if isinstance(scalings, (torch.Tensor, list, tuple)) else None  # read again on an error
    if not isinstance(scalings, torch.Tensor):
        scalings = _host_tensor(op, "scalings", scalings, dtype, "a float tensor [L] or a sequence of numbers")
    refuse_dtensor(op, "scalings", scalings)
    if scalings.dim() != 1 or scalings.shape[0] != num_slots:
        raise ValueError(f"{op}: scalings expected shape [{num_slots}] (one per slot), got {tuple(scalings.shape)}")
    if not scalings.dtype.is_floating_point:
        raise TypeError(f"{op}: scalings expected a floating dtype, got {scalings.dtype}")
    _check_host_or_device(op, "scalings", scalings, device)
    # Values are checked on the host only (a CUDA tensor's would need a sync), as for ranks; through a Python list:
    # for a layer's few dozen slots cheaper than tensor ops (this function: 5.6 µs with isfinite().all(), 1.7 µs
    # so, for 4 slots on this project's CPU), paid by every grouped call on CPU tensors.
    if scalings.device.type == "cpu" and has_host_values(scalings):
        # Finite in dtype, which they are cast to below (float64 1e39 is infinite in float32); NaN fails too.
        limit = torch.finfo(dtype).max
        bad = next((v for v in scalings.tolist() if not abs(v) <= limit), None)
        if bad is not None:
            if scalings is not given and given is not None:  # the value given, not its inf in dtype (1e39 in float32)
                wide = _host_tensor(op, "scalings", given, torch.float64, "").tolist()
                bad = next(v for v in wide if not abs(v) <= limit)
            in_range = f" in {dtype}'s range" if math.isfinite(bad) else ""
            raise ValueError(f"{op}: scalings expected finite numbers{in_range}, got {bad}")
    # contiguous: the cpu, cuda and triton kernels index it as a plain array (a strided view read other entries)
    return scalings.to(device=device, dtype=dtype).contiguous()


def as_ranks(op, ranks, num_slots, max_rank, device, weights_name, weights):
    """ranks (None: every slot at max_rank) as an int32 tensor [L] on device. Values are checked when they are on
    the host (a list, or a CPU tensor, outside torch.compile tracing); checking CUDA values would need a host sync.
    weights_name, weights: the tensor whose R max_rank is, named in the message (formatted only then: this runs on
    every grouped call)."""
    if ranks is None:
        return torch.full((num_slots,), max_rank, dtype=torch.int32, device=device)
    if not isinstance(ranks, torch.Tensor):  # int64 first: the range check below names a value past int32
        ranks = _host_tensor(op, "ranks", ranks, torch.int64, "an integer tensor [L] or a sequence of ints")
    refuse_dtensor(op, "ranks", ranks)
    if ranks.dim() != 1 or ranks.shape[0] != num_slots:
        raise ValueError(f"{op}: ranks expected shape [{num_slots}] (one per slot), got {tuple(ranks.shape)}")
    if ranks.dtype.is_floating_point or ranks.dtype == torch.bool:
        raise TypeError(f"{op}: ranks expected an integer dtype, got {ranks.dtype}")
    _check_host_or_device(op, "ranks", ranks, device)
    if ranks.device.type == "cpu" and has_host_values(ranks):
        values = ranks.tolist()  # a list, as scalings' values (this function: 3.1 µs with min() and max(), 1.8 so)
        if values:
            low, high = min(values), max(values)
            if low < 0 or high > max_rank:
                raise ValueError(f"{op}: ranks expected values in [0, {max_rank}] (R of {weights_name} "
                                 f"{tuple(weights.shape)}), "
                                 f"got {low if low < 0 else high}")
    elif ranks.dtype == torch.int64:  # unchecked values past int32 would wrap to a wrong rank in the cast
        ranks = ranks.clamp(0, max_rank)
    return ranks.to(device=device, dtype=torch.int32).contiguous()  # indexed as a plain array, as scalings


def _host_max(ranks):
    """The largest of ranks' values where they are on the host (a sequence, or a CPU tensor outside torch.compile
    tracing), after as_ranks has accepted them; else None (no values to check without a sync)."""
    if ranks is None or not has_host_values(ranks):
        return None
    if isinstance(ranks, torch.Tensor):
        if ranks.device.type != "cpu":
            return None
        ranks = ranks.tolist()
    return max((int(value) for value in ranks), default=0)


def check_shrink_args(op, x, lora_a, batch, scalings, ranks, lora_a_name="lora_a", scalings_dtype=torch.float32,
                      lora_a_dtype=None):
    """lora_a_dtype: not None where lora_a holds multi_lora_linear's float32 slots of a 16-bit x (the dtype read
    from lora_a itself), which are not held to x's dtype."""
    _check_float(op, "x", x, 2)
    num_slots, max_rank = _check_lora_a(op, x, lora_a, lora_a_name, lora_a_dtype)
    _check_batch(op, batch, x.shape[0], num_slots, x.device, "x", lora_a_name)
    return (as_scalings(op, scalings, num_slots, x.device, scalings_dtype),
            as_ranks(op, ranks, num_slots, max_rank, x.device, lora_a_name, lora_a))


def _check_lora_a(op, x, lora_a, lora_a_name, lora_a_dtype=None):
    """lora_a [L, R, K] against a checked x; returns (L, R)."""
    _check_float(op, lora_a_name, lora_a, 3)
    num_slots, max_rank, in_features = lora_a.shape
    if x.shape[1] != in_features:
        # a rank larger than K is no LoRA's: then the layout, not x, is the likely mistake
        transposed = (f"; {lora_a_name} looks laid out [L, K, R], expected [L, R, K]"
                      if x.shape[1] == max_rank > in_features else "")
        raise ValueError(f"{op}: x expected shape [M, {in_features}] (K of {lora_a_name} {tuple(lora_a.shape)} = "
                         f"[L, R, K]{transposed}), got {tuple(x.shape)}")
    if lora_a_dtype is None and lora_a.dtype != x.dtype:  # else float32 slots, the dtype read from lora_a itself
        raise TypeError(f"{op}: {lora_a_name} expected dtype {x.dtype} (same as x), got {lora_a.dtype}")
    _check_device(op, lora_a_name, lora_a, x.device, "x")
    return num_slots, max_rank


def check_expand_args(op, t, lora_b, batch, out, slice_offset, ranks, lora_b_name="lora_b", out_name="out"):
    """Checks of lora_expand; t=None checks everything but t and ranks (add_lora, whose t is its own shrink's output,
    whose ranks were checked against that shrink's lora_a of the same R, and whose out is called y)."""
    if t is not None:
        _check_float(op, "t", t, 2)
        if t.dtype != torch.float32:  # what lora_shrink returns, and what every backend's expand reads
            raise TypeError(f"{op}: t expected dtype torch.float32 (lora_shrink's output), got {t.dtype}")
    _check_float(op, lora_b_name, lora_b, 3)
    _check_float(op, out_name, out, 2)
    num_slots, width, max_rank = lora_b.shape
    if isinstance(slice_offset, bool) or not isinstance(slice_offset, int) or slice_offset < 0:
        raise ValueError(f"{op}: slice_offset expected an int >= 0, got {slice_offset!r}")
    if slice_offset + width > out.shape[1]:
        raise ValueError(f"{op}: {out_name} expected at least {slice_offset + width} columns (slice_offset "
                         f"{slice_offset} + N {width} of lora_b), got shape {tuple(out.shape)}")
    if lora_b.dtype != out.dtype:
        raise TypeError(f"{op}: {lora_b_name} expected dtype {out.dtype} (same as {out_name}), got {lora_b.dtype}")
    for name, tensor in (("t", t), (lora_b_name, lora_b)):
        if tensor is not None:
            _check_device(op, name, tensor, out.device, out_name)
    _check_batch(op, batch, out.shape[0], num_slots, out.device, out_name, lora_b_name)
    if t is not None and tuple(t.shape) != (out.shape[0], max_rank):  # after the batch has vouched for out's M
        # as for lora_a: a rank larger than N (and an N that out would hold) points at the layout, not t
        transposed = (f"; {lora_b_name} looks laid out [L, R, N], expected [L, N, R]"
                      if t.dim() == 2 and t.shape[1] == width < max_rank <= out.shape[1] - slice_offset else "")
        raise ValueError(f"{op}: t expected shape [{out.shape[0]}, {max_rank}] ([M, R] for out {tuple(out.shape)} and "
                         f"{lora_b_name} {tuple(lora_b.shape)} = [L, N, R]{transposed}), got {tuple(t.shape)}")
    if t is None:  # add_lora checks its y once, against all of its inputs
        return ranks
    return as_ranks(op, ranks, num_slots, max_rank, out.device, lora_b_name, lora_b)


# ------------------------------------------------------------------------------------------------ torch fallbacks

def as_rows(x):
    """x [..., K] as [M, K], a view where the strides allow (reshape(-1, K) cannot infer M when K is 0), but for a
    bfloat16 CPU x whose rows are padded in memory (a column block of a wider buffer), which is copied: torch 2.14's
    oneDNN bf16 matmul on CPUs with AMX/AVX512-BF16 reads the gap between such rows and multiplies it by zero, so
    NaN or Inf there (a workspace from torch.empty) made 128 of 136 outputs NaN at M = 17, K = 33 (helper 117:
    F.linear itself does it; torch 2.11's did not). The row count is tested last and, when torch.compile cannot
    know it (a token dimension marked unbacked), taken as more than one: a Python `M > 1` there failed the
    compile ("Could not guard on data-dependent expression"); copying one padded row is harmless."""
    rows = x if x.dim() == 2 else x.unsqueeze(0) if x.dim() == 1 else x.flatten(0, -2)
    if (rows.dtype == torch.bfloat16 and rows.device.type == "cpu" and rows.stride(1) == 1
            and rows.stride(0) > rows.shape[1] and guard_or_true(rows.shape[0] > 1)):
        return rows.contiguous()
    return rows


def slots_on_host(tensor, batch, ranks):
    """Whether the torch paths of the grouped ops read the slot sizes on the host and touch each slot's own rows only
    (M·R·K work in all, like PEFT's per-adapter loop): for CPU tensors in eager mode, where reading them costs
    nothing. Traced, on fake tensors or on a GPU, they take a masked loop over every row once per slot (L·M·R·K
    work, no host sync): on this project's CPU that was 5.5-6.7x the per-adapter loop at 64 and 1024 tokens on 64
    adapters (BENCHMARKS.md). The ranks and the batch's buffers, which host_slot_rows reads, must hold values too:
    under torch.func.functionalize ranks made from a list inside the call do not, where x may."""
    return tensor.device.type == "cpu" and all(
        has_host_values(t) for t in (tensor, ranks, batch.sorted_token_ids, batch.slot_starts, batch.slot_counts))


def host_slot_rows(batch, ranks):
    """(slot, token rows, rank) of every slot with tokens and a rank above 0, read on the host. Metadata values out
    of range (a LoRABatch built by hand) are a ValueError before any work, as the cpu kernels' checks: sliced as
    they were, a range past M lost its tokens silently and an id past M raised a bare IndexError."""
    num_tokens = batch.num_tokens
    order = batch.sorted_token_ids.long()
    starts, counts = batch.slot_starts.tolist(), batch.slot_counts.tolist()
    for slot, (start, count) in enumerate(zip(starts, counts)):
        if start < 0 or count < 0 or start + count > num_tokens:
            raise ValueError(f"LoRABatch: slot_starts/slot_counts expected token ranges inside [0, {num_tokens}), "
                             f"got slot {slot} starting at {start} with {count} tokens (from_adapter_ids builds "
                             "consistent metadata)")
    # at decode sizes read on the host once, as a list (four tensor ops and reading their result cost ~9 µs a call,
    # and this runs 2-6 times a step: helper 289), for the range here and the repeats below
    listed = order.tolist() if num_tokens <= 256 else None
    if listed is not None:
        out_of_range = bool(listed) and (min(listed) < 0 or max(listed) >= num_tokens)
    else:
        out_of_range = bool(num_tokens) and not bool(((order >= 0) & (order < num_tokens)).all())
    if out_of_range:
        bad = order[(order < 0) | (order >= num_tokens)][0].item()
        raise ValueError(f"LoRABatch: sorted_token_ids expected values in [0, {num_tokens}), got {bad}")
    # a token in two slots' ranges got both adapters' terms (the cpu kernels refuse it too): from_adapter_ids's
    # ranges are disjoint and its ids a permutation
    ranges = sorted((start, count, slot) for slot, (start, count) in enumerate(zip(starts, counts)) if count)
    for (start, count, slot), (next_start, _, next_slot) in zip(ranges, ranges[1:]):
        if next_start < start + count:
            raise ValueError(f"LoRABatch: slot_starts/slot_counts expected disjoint token ranges, got slot "
                             f"{next_slot} overlapping slot {slot} at position {next_start}")
    # the whole list first (from_adapter_ids's is a permutation), on the host at decode sizes (a set of a few ints:
    # ~1 µs, where bincount and reading its max cost ~10 µs a call, three calls a step); the ranges only if it repeats
    repeats = (len(set(listed)) < num_tokens if listed is not None
               else int(torch.bincount(order, minlength=num_tokens).max()) > 1)
    if repeats:
        covered = torch.cat([order[start:start + count] for start, count, _ in ranges]) if ranges else order[:0]
        per_token = torch.bincount(covered, minlength=num_tokens)
        if covered.numel() and int(per_token.max()) > 1:
            raise ValueError(f"LoRABatch: sorted_token_ids expected each token at most once within the slots' "
                             f"ranges, got token {int(per_token.argmax())} {int(per_token.max())} times")
    return [(slot, order[start:start + count], rank) for slot, (start, count, rank)
            in enumerate(zip(starts, counts, ranks.tolist())) if count and rank]


def _torch_shrink(x, lora_a, batch, scalings, ranks):
    with autocast_off(x.device):
        shrink = _torch_shrink_by_slot if slots_on_host(x, batch, ranks) else _torch_shrink_masked
        return shrink(x, lora_a, batch, scalings, ranks)


def _scaled_shrink(x, a, scaling):
    """scaling · (x @ a.T) in float32 (the shrink's fp32 intermediate), the product kept wide until it is scaled:
    rounded to x's dtype first, it overflowed fp16 past 65504 (and float64 past float32's range) where the reference
    and the fused kernels, which accumulate wide, give the scaled result; bf16 kept 8 bits of it."""
    if x.dtype == torch.float64:
        return (x @ a.T * scaling).float()
    if x.dtype in (torch.float16, torch.bfloat16):
        return wide_mm(x, a.T) * scaling
    return (x @ a.T) * scaling


def _torch_shrink_by_slot(x, lora_a, batch, scalings, ranks):
    out = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for slot, rows, rank in host_slot_rows(batch, ranks):
        out[rows, :rank] = _scaled_shrink(x.index_select(0, rows), lora_a[slot, :rank], scalings[slot])
    return out


def _torch_shrink_masked(x, lora_a, batch, scalings, ranks):
    ids = batch.adapter_ids.long()
    columns = torch.arange(lora_a.shape[1], device=x.device)
    out = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for slot in range(lora_a.shape[0]):
        # The columns past the slot's rank are selected away, not computed from A's rows zeroed: an Inf or NaN token
        # times those zeros gave NaN where the output is zero (and A's padding, which may hold NaN, only reaches them).
        contribution = _scaled_shrink(x, lora_a[slot], scalings[slot])
        out = torch.where((ids == slot)[:, None] & (columns < ranks[slot])[None, :], contribution, out)
    return out


def _torch_expand(t, lora_b, batch, ranks, out, slice_offset):
    with autocast_off(out.device):
        expand = _torch_expand_by_slot if slots_on_host(out, batch, ranks) else _torch_expand_masked
        total = expand(t, lora_b, batch, ranks)
    target = out[:, slice_offset:slice_offset + lora_b.shape[1]]
    target.copy_(target.to(total.dtype) + total)  # one rounding to out's dtype


def _torch_expand_by_slot(t, lora_b, batch, ranks):
    """The LoRA term [M, N] in float32 (float64 for float64; zero for tokens without an adapter)."""
    acc = accumulate_dtype(lora_b.dtype)  # float64 stays float64: the base output must not pass through float32
    total = torch.zeros(t.shape[0], lora_b.shape[1], dtype=acc, device=t.device)
    for slot, rows, rank in host_slot_rows(batch, ranks):
        total[rows] = t.index_select(0, rows)[:, :rank].to(acc) @ lora_b[slot, :, :rank].to(acc).T
    return total


def _torch_expand_masked(t, lora_b, batch, ranks):
    ids = batch.adapter_ids.long()
    columns = torch.arange(lora_b.shape[2], device=t.device)
    acc = accumulate_dtype(lora_b.dtype)
    total = torch.zeros(t.shape[0], lora_b.shape[1], dtype=acc, device=t.device)
    for slot in range(lora_b.shape[0]):
        in_rank = columns < ranks[slot]
        b_slot = torch.where(in_rank[None, :], lora_b[slot], torch.zeros((), dtype=lora_b.dtype, device=t.device))
        t_slot = torch.where(in_rank[None, :], t, torch.zeros((), dtype=t.dtype, device=t.device))
        total = torch.where((ids == slot)[:, None], t_slot.to(acc) @ b_slot.to(acc).T, total)
    return total


# ------------------------------------------------------------------------------------------------------ public ops

def check_triton_args(op, dtype, num_slots):
    """What the Triton kernels need beyond the checks above: a 16- or 32-bit float dtype, and L within a grid
    dimension (the launchers of lora_kernels.triton.sgmv check nothing: these ops are their checked API)."""
    sgmv = triton_sgmv()
    if dtype not in sgmv.SUPPORTED_DTYPES:
        raise TypeError(f"{op}: the triton backend runs float32/float16/bfloat16, got {dtype} (use backend='cuda', "
                        "'cpu' or 'torch' for float64)")
    if num_slots > triton_pkg.MAX_GRID_YZ:
        raise ValueError(f"{op}: the triton backend takes at most {triton_pkg.MAX_GRID_YZ} adapter slots, "
                         f"got L = {num_slots}")


def run_shrink(backend, x, lora_a, batch, scalings, ranks, deterministic=False, out=None):
    """lora_shrink for arguments already checked (scalings and ranks as check_shrink_args returns them) and a
    resolved backend: multi_lora_linear checks once and calls this for forward and backward."""
    if backend == "triton":
        return triton_sgmv().shrink(x, lora_a, batch, scalings, ranks, deterministic=deterministic, out=out)
    if backend in ("cpu", "cuda"):
        result = torch.ops.lora_kernels.sgmv_shrink(x, lora_a, batch.sorted_token_ids, batch.slot_starts,
                                                    batch.slot_counts, scalings, ranks)
    elif backend == "reference" and not has_host_values(x):
        # The reference's loops read each token's slot on the host, which a traced graph cannot (a data-dependent
        # error under fullgraph=True, a graph break per token without), nor fake tensors: the same float64
        # products, slot-masked.
        result = _torch_shrink_masked(x.double(), lora_a.double(), batch, scalings.double(), ranks)
    elif backend == "reference":
        from lora_kernels import reference
        result = reference.lora_shrink(x, lora_a, batch.adapter_ids, scalings, ranks).float()
    else:
        result = _torch_shrink(x, lora_a, batch, scalings, ranks)
    if out is None:
        return result
    return out.copy_(result)


def run_expand(backend, t, lora_b, batch, ranks, out, slice_offset=0):
    """lora_expand for arguments already checked and a resolved backend (see run_shrink)."""
    if backend == "triton":
        triton_sgmv().expand(t.float(), lora_b, batch, ranks, out, slice_offset)
    elif backend in ("cpu", "cuda"):
        torch.ops.lora_kernels.sgmv_expand(t, lora_b, batch.sorted_token_ids, batch.slot_starts, batch.slot_counts,
                                           ranks, out, slice_offset)
    elif backend == "reference" and not has_host_values(t):  # see run_shrink: float64, slot-masked
        _torch_expand(t, lora_b.double(), batch, ranks, out, slice_offset)
    elif backend == "reference":
        from lora_kernels import reference
        out.copy_(reference.lora_expand(t, lora_b, batch.adapter_ids, out, slice_offset, ranks).to(out.dtype))
    else:
        _torch_expand(t, lora_b, batch, ranks, out, slice_offset)
    return out


def lora_shrink(x, lora_a, batch, scalings, ranks=None, *, backend="auto", deterministic=False, out=None):
    """out[t, :ranks[i]] = scalings[i] * lora_a[i, :ranks[i]] @ x[t] for i = slot of t; zero elsewhere.

    x: [M, K]; lora_a: [L, R, K]; batch: LoRABatch over M tokens; scalings: [L]; ranks: [L] or None (all R).
    Returns [M, R] float32 (into `out` when given, for allocation-free CUDA-graph replay; triton backend).
    deterministic: no atomics (bit-identical repeats); only the triton backend uses atomics at all.
    """
    op = "lora_shrink"
    deterministic = check_flag(op, "deterministic", deterministic)
    check_no_grad_inputs(op, (("x", x), ("lora_a", lora_a), ("scalings", scalings)))
    scalings, ranks = check_shrink_args(op, x, lora_a, batch, scalings, ranks)
    backend = resolve_backend(backend, x.device, op, x.dtype, lora_a.shape[0])
    if backend == "triton":
        check_triton_args(op, x.dtype, lora_a.shape[0])
    if out is not None:
        _check_float(op, "out", out, 2)
        if out.dtype != torch.float32 or tuple(out.shape) != (x.shape[0], lora_a.shape[1]):
            raise ValueError(f"{op}: out expected a float32 tensor of shape [{x.shape[0]}, {lora_a.shape[1]}] "
                             f"([M, R]), got {out.dtype} {tuple(out.shape)}")
        _check_device(op, "out", out, x.device, "x")
        if check_output(op, "out", out, [("x", x), ("lora_a", lora_a), ("scalings", scalings), ("ranks", ranks)]
                        + batch_inputs(batch)):  # see check_output: into a new tensor, then copied
            return out.copy_(run_shrink(backend, x, lora_a, batch, scalings, ranks, deterministic))
    return run_shrink(backend, x, lora_a, batch, scalings, ranks, deterministic, out)


def lora_expand(t, lora_b, batch, out, slice_offset=0, ranks=None, *, backend="auto"):
    """out[m, slice_offset : slice_offset + N] += lora_b[i, :, :ranks[i]] @ t[m, :ranks[i]] for i = slot of token
    m, in place (the scalings were applied by lora_shrink).

    t: [M, R] (float32 from lora_shrink); lora_b: [L, N, R]; out: [M, N_total]; slice_offset: int, the first output
    column; ranks: [L] or None (all R). Returns out.
    """
    op = "lora_expand"
    if isinstance(slice_offset, numbers.Integral) and not isinstance(slice_offset, bool):
        slice_offset = int(slice_offset)  # a numpy integer, say
    ranks = check_expand_args(op, t, lora_b, batch, out, slice_offset, ranks)
    undecided = check_output(op, "out", out, [("t", t), ("lora_b", lora_b), ("ranks", ranks)] + batch_inputs(batch))
    check_no_grad_inputs(op, (("t", t), ("lora_b", lora_b)))
    backend = resolve_backend(backend, out.device, op, out.dtype, lora_b.shape[0])
    if backend == "triton":
        check_triton_args(op, out.dtype, lora_b.shape[0])
    if undecided:  # see check_output: the sum in a new tensor, which reads no input that changes under it
        return out.copy_(run_expand(backend, t, lora_b, batch, ranks, out.clone(), slice_offset))
    return run_expand(backend, t, lora_b, batch, ranks, out, slice_offset)


def _check_slices(op, y, x, lora_a_slices, lora_b_slices, batch, scalings, ranks, widths, offsets):
    """add_lora's checks of x, the batch, scalings, ranks and every slice's lora_a and lora_b (widths: output_slices,
    offsets: each slice's first column of y), before any work: nothing half-applied. Returns (scalings, slice_ranks)
    as the launchers take them: slice_ranks[j] the [L] int32 ranks tensor of slice j."""
    # Per slice: ranks=None means every slot at that slice's own R_j. Given ranks are converted and checked once, with
    # slice 0 (a list becomes a device tensor, one copy), and their largest host value against every later slice's
    # R_j: checking only the converted tensor for later slices let [3, 1] through slices of R 3 and 2 on CUDA (the
    # kernels clamped it to 2). x, the batch and scalings, the same for every slice, are checked once too (each
    # slice's own checks of them made up a third of a 3-slice call's host time).
    if isinstance(ranks, collections.abc.Iterator):  # slice 0's conversion reads it; the later slices' check too
        ranks = list(ranks)
    slice_ranks = []
    for j, width in enumerate(widths):  # every slice checked before any work: nothing half-applied
        lora_b = lora_b_slices[j]
        if not isinstance(lora_b, torch.Tensor):
            raise TypeError(f"{op}: lora_b_slices[{j}] expected a torch.Tensor, got {type(lora_b).__name__}")
        if lora_b.dim() != 3 or lora_b.shape[1] != width:
            raise ValueError(f"{op}: lora_b_slices[{j}] expected shape [L, {width}, R] (output_slices[{j}] = {width}), "
                             f"got {tuple(lora_b.shape)}")
        lora_a = lora_a_slices[j]
        if j > 0 and isinstance(lora_a, torch.Tensor) and lora_a.dim() == 3 and lora_a.shape[2] != x.shape[1]:
            # x matched slice 0: this slice is the odd one out, not x
            raise ValueError(f"{op}: lora_a_slices[{j}] expected shape [L, R, {x.shape[1]}] (K of x {tuple(x.shape)} "
                             f"and of lora_a_slices[0]), got {tuple(lora_a.shape)}")
        if j == 0:
            scalings, ranks_j = check_shrink_args(op, x, lora_a, batch, scalings, ranks, lora_a_name="lora_a_slices[0]")
            highest_rank = _host_max(ranks)
        else:
            num_slots, max_rank = _check_lora_a(op, x, lora_a, f"lora_a_slices[{j}]")
            _check_batch_slots(op, batch, num_slots, f"lora_a_slices[{j}]")
            if ranks is None:
                # every slot at R: one tensor per R, so slices of one R also share one triton launch
                ranks_j = next((r for r, a in zip(slice_ranks, lora_a_slices) if a.shape[1] == max_rank), None)
                if ranks_j is None:
                    ranks_j = as_ranks(op, None, num_slots, max_rank, x.device, f"lora_a_slices[{j}]", lora_a)
            else:
                ranks_j = slice_ranks[0]
                if highest_rank is not None and highest_rank > max_rank:
                    raise ValueError(f"{op}: ranks expected values in [0, {max_rank}] (R of lora_a_slices[{j}] "
                                     f"{tuple(lora_a.shape)}), got {highest_rank}")
        if lora_b.shape[2] != lora_a_slices[j].shape[1]:  # before the expand's checks, which would blame ranks
            raise ValueError(f"{op}: lora_b_slices[{j}] expected R = {lora_a_slices[j].shape[1]} (lora_a_slices[{j}] "
                             f"is {tuple(lora_a_slices[j].shape)}), got {tuple(lora_b.shape)}")
        check_expand_args(op, None, lora_b, batch, y, offsets[j], ranks_j, lora_b_name=f"lora_b_slices[{j}]",
                          out_name="y")
        slice_ranks.append(ranks_j)
    return scalings, slice_ranks


def add_lora(y, x, lora_a_slices, lora_b_slices, batch, scalings, ranks, output_slices, *, backend="auto",
             deterministic=False, buffer=None):
    """For each slice j: y[m, o_j : o_j + n_j] += scalings[i] * B_j[i, :, :r] @ (A_j[i, :r] @ x[m]), i = slot of
    token m, r = ranks[i], A_j = lora_a_slices[j], B_j = lora_b_slices[j], o_j = sum(output_slices[:j]) — that is,
    lora_expand(lora_shrink(x, A_j, batch, scalings, ranks), B_j, batch, y, o_j, ranks); e.g. a fused QKV projection
    with q, k, v widths (n_q, n_kv, n_kv).

    y: [M, sum(output_slices)]; x: [M, K]; lora_a_slices: S tensors [L, R_j, K], or one [S, L, R, K];
    lora_b_slices: S tensors [L, n_j, R_j], or one [S, L, n, R] when the widths are equal; scalings: [L]; ranks: [L]
    (every slice: a slice an adapter does not train must hold zeros up to its rank) or None (every slot at each
    slice's own R_j). With the triton backend up to 3 slices (a fused QKV projection's) of one R, stacked or in
    lists, of equal or unequal widths, are one shrink and one expand launch where they are laid out alike (as
    contiguous tensors are) and their widths are multiples of 16; else more launches (see _triton_add_lora).
    buffer: optional [S, M, R] float32 for the shrink results (every slice of rank R), so a captured CUDA graph
    allocates nothing (triton backend, with scalings and ranks given as tensors: ranks=None makes one per
    distinct R).
    Every slice is checked before y is touched. Returns y.
    """
    op = "add_lora"
    deterministic = check_flag(op, "deterministic", deterministic)
    for name, value in (("lora_a_slices", lora_a_slices), ("lora_b_slices", lora_b_slices)):
        if not isinstance(value, (list, tuple, torch.Tensor)):
            raise TypeError(f"{op}: {name} expected a list of tensors or one stacked tensor, "
                            f"got {type(value).__name__}")
    if not isinstance(output_slices, (list, tuple)) or not all(
            isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 0 for w in output_slices):
        raise TypeError(f"{op}: output_slices expected a sequence of ints >= 0, got {output_slices!r}")
    widths = tuple(int(w) for w in output_slices)  # numpy integers too
    if not (len(lora_a_slices) == len(lora_b_slices) == len(widths)) or not widths:
        raise ValueError(f"{op}: lora_a_slices, lora_b_slices and output_slices expected the same non-zero length, "
                         f"got {len(lora_a_slices)}, {len(lora_b_slices)}, {len(widths)}")
    _check_float(op, "y", y, 2)
    if sum(widths) != y.shape[1]:
        raise ValueError(f"{op}: y expected {sum(widths)} columns (sum of output_slices {widths}), "
                         f"got shape {tuple(y.shape)}")
    # a float64 x (into a float32 y) is no call for the Triton kernels, which "auto" picks on GPUs by y's dtype;
    # the slot count is the batch's, checked below (a LoRABatch's num_adapters is an int)
    x_float64 = isinstance(x, torch.Tensor) and x.dtype == torch.float64
    backend = resolve_backend(backend, y.device, op, torch.float64 if x_float64 else y.dtype,
                              batch.num_adapters if isinstance(batch, LoRABatch) else 0)
    offsets = [sum(widths[:j]) for j in range(len(widths))]
    scalings, slice_ranks = _check_slices(op, y, x, lora_a_slices, lora_b_slices, batch, scalings, ranks, widths,
                                          offsets)
    if buffer is not None:
        expected = (len(widths), x.shape[0], lora_a_slices[0].shape[1])
        _check_float(op, "buffer", buffer, 3)
        unequal = [j for j in range(len(widths)) if lora_a_slices[j].shape[1] != expected[2]]
        if unequal:  # the buffer may be right: the slices are not
            raise ValueError(f"{op}: buffer takes slices of one rank R ([S, M, R]), but lora_a_slices[0] has R = "
                             f"{expected[2]} and lora_a_slices[{unequal[0]}] R = {lora_a_slices[unequal[0]].shape[1]}; "
                             f"call without buffer for slices of unequal ranks")
        if buffer.dtype != torch.float32 or tuple(buffer.shape) != expected:
            raise ValueError(f"{op}: buffer expected a float32 tensor of shape [{', '.join(map(str, expected))}] "
                             f"([S, M, R]), got {buffer.dtype} {tuple(buffer.shape)}")
        _check_device(op, "buffer", buffer, x.device, "x")
    inputs = [("x", x)] + [(f"lora_{ab}_slices[{j}]", slices[j]) for ab, slices in (("a", lora_a_slices),
                                                                                   ("b", lora_b_slices))
                           for j in range(len(widths))]
    # one ranks tensor usually serves every slice: checked once
    inputs += [("scalings", scalings)] + [(f"ranks of slice {j}", r) for j, r in enumerate(slice_ranks)
                                          if all(r is not other for other in slice_ranks[:j])]
    inputs += batch_inputs(batch)
    if buffer is not None:  # scratch space: one laid out undecidably over an input is refused, not copied
        check_output(op, "buffer", buffer, inputs + [("y", y)], refuse_undecided=True)
    copy_back = check_output(op, "y", y, inputs)
    check_no_grad_inputs(op, inputs)
    if backend == "triton":
        check_triton_args(op, x.dtype, batch.num_adapters)
        check_triton_args(op, y.dtype, batch.num_adapters)
    # see check_output: the sum in a new tensor, then copied into y
    target = y.clone() if copy_back else y
    _add_lora_into(backend, target, x, lora_a_slices, lora_b_slices, batch, scalings, slice_ranks, widths, offsets,
                   deterministic, buffer)
    return y.copy_(target) if copy_back else y


def _add_lora_into(backend, y, x, lora_a_slices, lora_b_slices, batch, scalings, slice_ranks, widths, offsets,
                   deterministic, buffer):
    """add_lora's work, after its checks."""
    if backend == "triton":
        _triton_add_lora(y, x, lora_a_slices, lora_b_slices, batch, scalings, slice_ranks, widths, offsets,
                         deterministic, buffer)
        return
    # The oracle: float64 from x to y, one rounding to y's dtype. Traced or fake: slice by slice below (see
    # run_shrink), the shrink results rounded to float32 between.
    if backend == "reference" and has_host_values(x):
        from lora_kernels import reference
        if buffer is not None:  # the shrink results, as every other backend leaves them there
            for j in range(len(widths)):
                run_shrink(backend, x, lora_a_slices[j], batch, scalings, slice_ranks[j], out=buffer[j])
        y.copy_(reference.add_lora(y, x, lora_a_slices, lora_b_slices, batch.adapter_ids, scalings, slice_ranks,
                                   widths))
        return
    for j in range(len(widths)):
        shrunk = run_shrink(backend, x, lora_a_slices[j], batch, scalings, slice_ranks[j], deterministic,
                            None if buffer is None else buffer[j])
        run_expand(backend, shrunk, lora_b_slices[j], batch, slice_ranks[j], y, offsets[j])


def _triton_add_lora(y, x, lora_a_slices, lora_b_slices, batch, scalings, slice_ranks, widths, offsets,
                     deterministic, buffer):
    """add_lora's launches with the triton backend. Slices of one R (then one ranks tensor serves them: given ranks,
    or ranks=None's every slot at R) go to the launchers together, stacked or in lists, their shrink results in one
    [S, M, R]; the launchers take up to SLICES_PER_LAUNCH (3) per launch, a slice whose strides or 16-divisibility
    differ from its neighbours' in a launch of its own (sgmv._slice_groups). Slices of several R: one shrink and
    one expand per slice."""
    sgmv = triton_sgmv()
    a_slices, b_slices = sgmv.as_slices(lora_a_slices), sgmv.as_slices(lora_b_slices)
    if all(a.shape == a_slices[0].shape for a in a_slices):
        shrunk = sgmv.shrink(x, a_slices, batch, scalings, slice_ranks[0], deterministic=deterministic, out=buffer)
        sgmv.expand(shrunk, b_slices, batch, slice_ranks[0], y, 0)  # slice j at offsets[j], after slice j - 1
        return
    for j in range(len(widths)):
        shrunk = sgmv.shrink(x, a_slices[j], batch, scalings, slice_ranks[j], deterministic=deterministic,
                             out=None if buffer is None else buffer[j])
        sgmv.expand(shrunk, b_slices[j], batch, slice_ranks[j], y, offsets[j])
