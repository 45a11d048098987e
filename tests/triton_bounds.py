"""An out-of-bounds check for the Triton kernels under the interpreter: every active lane of every load, store and
atomic must address bytes inside the storage of one of the launched kernel's tensor arguments.

The interpreter reads and writes raw host memory, so an access past a tensor's end passes there silently (it reads
whatever lies next to it); on a GPU the same access reads garbage or ends the process with an illegal memory access.
tests/conftest.py switches this check on for the whole suite whenever the interpreter runs the kernels."""

import contextlib

import numpy as np


class OutOfBoundsAccess(AssertionError):
    pass


def _storage_ranges(arg_names, args):
    """[(start, end, argument name)] of the storages behind the tensor arguments (TMA descriptors: their base)."""
    ranges = []

    def add(name, value):
        if isinstance(value, (tuple, list)):
            for item in value:
                add(name, item)
        elif hasattr(value, "base") and hasattr(value, "block_shape"):  # a host-side TensorDescriptor
            add(name, value.base)
        elif hasattr(value, "untyped_storage"):
            storage = value.untyped_storage()
            if storage.nbytes():
                ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes(), name))

    for name, value in zip(arg_names, args):
        add(name, value)
    return sorted(set(ranges))


def _check(state, kind, addresses, itemsize):
    if addresses.size == 0:
        return
    ranges = state["ranges"]
    starts = np.array([r[0] for r in ranges], dtype=np.uint64)
    ends = np.array([r[1] for r in ranges], dtype=np.uint64)
    addresses = addresses.astype(np.uint64).ravel()
    index = np.searchsorted(starts, addresses, side="right").astype(np.int64) - 1
    inside = (index >= 0) & (addresses + np.uint64(itemsize) <= ends[np.maximum(index, 0)])
    if inside.all():
        return
    bad = int(addresses[~inside][0])
    nearest = min(ranges, key=lambda r: min(abs(bad - r[0]), abs(bad - r[1])))
    where = (f"{nearest[0] - bad} bytes before" if bad < nearest[0] else f"{bad + itemsize - nearest[1]} bytes past "
             f"the end of")
    raise OutOfBoundsAccess(f"{state['kernel']}: a {kind} of {int((~inside).sum())} active lane(s) outside every "
                            f"tensor argument's storage; the first is {where} the storage of {nearest[2]!r}")


@contextlib.contextmanager
def bounds_checked():
    """Within this context every interpreted Triton launch checks its memory accesses (OutOfBoundsAccess)."""
    from triton.runtime import interpreter

    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    originals = {name: getattr(builder, name)
                 for name in ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")}
    original_init = executor._init_args_hst
    state = {"kernel": "?", "ranges": []}

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = original_init(self, args_dev, kwargs)  # the storages the kernel will address
        names = list(self.arg_names) + list(kwargs_hst)
        state["kernel"] = getattr(self.fn, "__name__", "kernel")
        state["ranges"] = _storage_ranges(names, list(args_hst) + list(kwargs_hst.values()))
        return args_hst, kwargs_hst

    def active(ptrs, mask):
        data = ptrs.data
        return data if mask is None else data[np.broadcast_to(mask.data, data.shape)]

    def element_size(ptrs):
        return interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize

    def masked_load(self, ptrs, mask, other, *args, **kwargs):
        _check(state, "load", active(ptrs, mask), element_size(ptrs))
        return originals["create_masked_load"](self, ptrs, mask, other, *args, **kwargs)

    def masked_store(self, ptrs, value, mask, *args, **kwargs):
        _check(state, "store", active(ptrs, mask), element_size(ptrs))
        return originals["create_masked_store"](self, ptrs, value, mask, *args, **kwargs)

    def atomic_rmw(self, op, ptr, val, mask, *args, **kwargs):
        _check(state, "atomic", active(ptr, mask), val.data.dtype.itemsize)
        return originals["create_atomic_rmw"](self, op, ptr, val, mask, *args, **kwargs)

    def atomic_cas(self, ptr, cmp, val, *args, **kwargs):
        _check(state, "atomic compare-and-swap", active(ptr, None), val.data.dtype.itemsize)
        return originals["create_atomic_cas"](self, ptr, cmp, val, *args, **kwargs)

    patched = {"create_masked_load": masked_load, "create_masked_store": masked_store,
               "create_atomic_rmw": atomic_rmw, "create_atomic_cas": atomic_cas}
    for name, method in patched.items():
        setattr(builder, name, method)
    executor._init_args_hst = init_args
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(builder, name, method)
        executor._init_args_hst = original_init
