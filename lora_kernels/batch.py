"""LoRABatch: the per-batch metadata of the grouped (SGMV/BGMV) ops, built on the device with no host sync.

Every buffer has a size fixed by (num_tokens, num_adapters), never by the ids' values, so building it can be captured
in a CUDA graph and one LoRABatch serves every layer of a step.
"""

import numbers
from dataclasses import dataclass, fields

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

from lora_kernels._ext import has_host_values

MAX_TOKENS = 2**31 - 1


@dataclass(frozen=True)
class LoRABatch:
    """Metadata of one batch of tokens, each carrying an adapter slot id in [-1, num_adapters).

    adapter_ids       [M] int32  the slot of each token (-1: base model only)
    sorted_token_ids  [M] int32  token indices stably sorted by slot (the -1 tokens come first)
    slot_counts       [L] int32  tokens per slot
    slot_starts       [L] int32  offset of each slot's first token in sorted_token_ids
    active_slots      [L] int32  the slots with at least one token, ascending, then -1 padding
    num_active        [1] int32  how many entries of active_slots are real

    The fields never change (frozen); `refill_` rewrites the buffers' contents in place for the next step's ids.
    """

    adapter_ids: torch.Tensor
    sorted_token_ids: torch.Tensor
    slot_counts: torch.Tensor
    slot_starts: torch.Tensor
    active_slots: torch.Tensor
    num_active: torch.Tensor
    num_adapters: int

    def __post_init__(self):
        # A batch built by hand (the constructor, dataclasses.replace): the kernels read these buffers as plain
        # int32 arrays of fixed lengths. A strided one gave silently wrong results with Triton (helper 117: errors
        # up to 10) and, on a GPU, token indices from outside the buffer; a short one, reads past it. Not while
        # tracing or under torch.func (a batch from_adapter_ids made there, or checked before, as the graph's input).
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            return
        # A numpy integer is taken as its int (as from_adapter_ids and the ops take one); it had skipped the checks
        # below, and the torch backend then dropped the tokens of a too-short slot_counts silently. A float or bool
        # is no slot count.
        count = self.num_adapters
        if (isinstance(count, (bool, str, torch.Tensor)) or type(count).__name__ in ("bool", "bool_")  # numpy's
                or (isinstance(count, numbers.Number) and not isinstance(count, numbers.Integral))):
            raise TypeError(f"LoRABatch: num_adapters expected an int, got {type(count).__name__} {count!r}")
        if isinstance(count, numbers.Integral) and type(count) is not int:
            object.__setattr__(self, "num_adapters", int(count))
        # Only plain tensors and an int: torch.export's machinery rebuilds batches of other leaves (an _IntWrapper).
        buffers = [getattr(self, name) for name in BUFFER_FIELDS]
        if type(self.num_adapters) is not int or not all(isinstance(t, torch.Tensor) for t in buffers):
            return
        ids = self.adapter_ids
        num_tokens, num_slots, device = ids.shape[0] if ids.dim() else 1, self.num_adapters, ids.device
        lengths = (num_tokens, num_tokens, num_slots, num_slots, num_slots, 1)
        for name, t, length in zip(BUFFER_FIELDS, buffers, lengths):
            if (t.dtype != torch.int32 or t.dim() != 1 or t.shape[0] != length or t.device != device
                    or (length > 1 and t.stride(0) != 1)):
                raise (TypeError if t.dtype != torch.int32 else ValueError)(
                    f"LoRABatch: {name} expected a contiguous int32 tensor of shape ({length},) on {device} (as "
                    f"from_adapter_ids builds it), got {t.dtype}, shape {tuple(t.shape)}, stride {t.stride()} on "
                    f"{t.device}")

    @property
    def device(self):
        return self.adapter_ids.device

    @property
    def num_tokens(self):
        """M, read from adapter_ids' shape rather than stored as an int: a stored int made torch.compile and
        torch.export treat a dynamic token count as a constant (a recompile per count, or an export error)."""
        return self.adapter_ids.shape[0]

    @classmethod
    def from_adapter_ids(cls, adapter_ids, num_adapters, *, validate=None):
        """adapter_ids: integer tensor of any shape (flattened to [M]) with values in [-1, num_adapters).

        validate: check the id values and raise ValueError on one out of range. Checking values costs a host sync,
        so the default (None) checks CPU tensors only; CUDA tensors are checked with validate=True (not inside a
        CUDA-graph capture: the check syncs). Traced ids are never checked, validate=True too (reading them would
        break the graph), nor any inside torch.func transforms (vmap over the ids cannot read their values on the
        host). Unchecked out-of-range ids are never read out of bounds: they are treated as -1 (base model only)."""
        return cls._for_op("LoRABatch.from_adapter_ids", adapter_ids, num_adapters, validate=validate)

    @classmethod
    def _for_op(cls, op, adapter_ids, num_adapters, *, validate=None):
        """from_adapter_ids for a function that takes adapter ids itself (multi_lora_linear): its errors name op,
        the function the user called."""
        from lora_kernels.ops import positive_int  # ops imports this module
        _check_ids_tensor(op, adapter_ids)
        if guard_or_false(adapter_ids.numel() > MAX_TOKENS):  # token positions are int32: they would wrap
            raise ValueError(f"{op}: adapter_ids expected at most {MAX_TOKENS} ids (the batch holds token positions "
                             f"as int32), got {adapter_ids.numel()}")
        num_adapters = positive_int(op, "num_adapters", num_adapters)  # a numpy integer too, as set_adapter's slots
        ids = adapter_ids.reshape(-1)
        validate = _check_validate(op, validate)
        checked = (validate is None or validate) and _check_id_values(ids, num_adapters, op,
                                                                      asked=validate is not None)
        device = ids.device
        # int32 throughout (what the kernels read), in few ops: each op is a kernel launch on a GPU. Narrow and
        # unsigned dtypes are widened first, or comparing them with -1 would wrap. Ids whose values were just read
        # in range (checked) need no clamp: four ops fewer (17 of 110 µs per CPU batch build, helper 163's timing).
        if checked:  # a copy always: the batch owns its buffers (refill_ writes them; the caller's ids may change)
            ids = ids.to(torch.int32, copy=True)
        else:
            if ids.dtype not in (torch.int32, torch.int64):
                ids = ids.to(torch.int64)
            ids = torch.where((ids >= -1) & (ids < num_adapters), ids, -1).to(torch.int32)
        sorted_ids, order = torch.sort(ids, stable=True)
        sorted_token_ids = order.to(torch.int32)
        # Slot i's tokens are sorted_ids[starts[i] : starts[i + 1]]: binary search for 0..L in the sorted ids.
        # (bincount would size its output from the data: a host sync.)
        slots = torch.arange(num_adapters + 1, device=device, dtype=torch.int32)
        bounds = torch.searchsorted(sorted_ids, slots, out_int32=True)
        slot_starts = bounds[:-1]
        slot_counts = bounds[1:] - slot_starts
        has_tokens = slot_counts > 0
        active = torch.sort(torch.where(has_tokens, slots[:-1], num_adapters)).values
        active_slots = torch.where(active < num_adapters, active, -1)
        num_active = has_tokens.sum(dtype=torch.int32).reshape(1)
        return cls._built(ids, sorted_token_ids, slot_counts, slot_starts, active_slots, num_active, num_adapters)

    @classmethod
    def _built(cls, *values):
        """A batch of buffers this package just built as __post_init__ checks them (from_adapter_ids, a backward's
        saved copies), without those checks: ~10 µs a layer and step on the host (helper 289). Traced, through the
        constructor (dynamo cannot trace this one; __post_init__ checks nothing there)."""
        if torch.compiler.is_compiling():
            return cls(*values)
        batch = object.__new__(cls)
        for field, value in zip(fields(cls), values, strict=True):
            object.__setattr__(batch, field.name, value)
        return batch

    def refill_(self, adapter_ids, *, validate=None):
        """Rebuilds this batch in place for new adapter ids, as many as before (any shape): every buffer keeps its
        address, so a CUDA graph captured with this batch replays with the new ids. Build one batch per token count
        once, refill it before each replay. On the device with no host sync (ids from the host too, as a
        scheduler's usually are); validate as in from_adapter_ids (a bad id raises before anything is written). A
        multi_lora_linear whose backward has not run yet never uses the new ids: the kernel backends' autograd
        refuses a refilled batch (autograd's error about a tensor modified in place), and the reference backend and
        the float64 and torch.func compositions, which keep what they read, compute the gradients of the ids they
        ran with. Not so under activation checkpointing, whose backward recomputes the forward with the batch as it
        is then: refill only after the backward there. Not while another thread uses this batch (no lock: it read
        a mix of old and new buffers). Returns self."""
        op = "LoRABatch.refill_"
        _check_ids_tensor(op, adapter_ids)
        if adapter_ids.numel() != self.num_tokens:
            raise ValueError(f"{op}: adapter_ids expected {self.num_tokens} ids (the batch's num_tokens), "
                             f"got shape {tuple(adapter_ids.shape)}")
        from lora_kernels.ops import refuse_inference_tensor_writes  # ops imports this module
        refuse_inference_tensor_writes(op, [(f"the batch's {name}", getattr(self, name)) for name in BUFFER_FIELDS])
        if adapter_ids.is_meta and self.device.type != "meta":  # the copy into the buffers failed, naming nothing
            raise ValueError(f"{op}: adapter_ids expected values to copy into the batch's buffers on {self.device}, "
                             f"got a tensor on the meta device (no values)")
        validate = _check_validate(op, validate)
        if validate is None or validate:  # as from_adapter_ids would decide, for the ids where the caller has them
            _check_id_values(adapter_ids.reshape(-1), self.num_adapters, op, asked=validate is not None)
        fresh = LoRABatch._for_op(op, _to_device_without_sync(adapter_ids, self.device), self.num_adapters,
                                  validate=False)
        for name in BUFFER_FIELDS:
            getattr(self, name).copy_(getattr(fresh, name))
        return self

    def check_tokens(self, num_tokens, op_name, arg_name="x"):
        # Unbacked token counts (mark_unbacked) cannot be compared while compiling: torch._check records their
        # equality, which dynamo checks before the graph runs (a mismatch fails there with torch's own AssertionError,
        # not this message; torch 2.11's dynamo takes no message that reads a variable)
        if guard_or_false(num_tokens != self.num_tokens):
            raise ValueError(f"{op_name}: batch was built for {self.num_tokens} tokens, but {arg_name} has "
                             f"{num_tokens} rows")
        if torch.compiler.is_compiling():
            torch._check(num_tokens == self.num_tokens, lambda: "the LoRABatch was built for another token count")


def _to_device_without_sync(ids, device):
    """ids on device. A blocking copy from the host to a GPU waits for the GPU's queued work (a stream sync), every
    step of a serving loop whose scheduler hands over host ids. CUDA promises an asynchronous copy only from pinned
    memory (from pageable memory the driver may wait for the stream), so the ids are staged in a pinned buffer of
    torch's caching host allocator first: the caller may rewrite its ids at once, and the allocator does not hand
    the buffer out again before the copy has run (it records an event on it)."""
    if ids.device.type != "cpu" or device.type != "cuda" or torch.compiler.is_compiling():
        return ids.to(device)
    staged = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
    staged.copy_(ids)
    return staged.to(device, non_blocking=True)


def _check_ids_tensor(op, adapter_ids):
    """TypeError naming op unless adapter_ids is a dense integer tensor."""
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"{op}: adapter_ids expected a torch.Tensor, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype.is_floating_point or adapter_ids.dtype.is_complex or adapter_ids.dtype == torch.bool:
        raise TypeError(f"{op}: adapter_ids expected an integer dtype, got {adapter_ids.dtype}")
    if adapter_ids.dtype == torch.uint64:  # widened to int64 (ids are compared with -1), 2**64 - 1 would read as -1
        raise TypeError(f"{op}: adapter_ids expected a signed integer dtype (int64, int32, ...) or uint8/16/32, got "
                        f"torch.uint64")
    if adapter_ids.layout != torch.strided:  # failed in reshape, naming nothing
        raise TypeError(f"{op}: adapter_ids expected a dense (strided) tensor, got layout {adapter_ids.layout}")


def _check_validate(op, validate):
    """validate: None or a bool (a string such as "no" is a TypeError, not a truthy True)."""
    from lora_kernels.ops import check_flag  # ops imports this module
    return None if validate is None else check_flag(op, "validate", validate)


def _check_id_values(ids, num_adapters, op, asked):
    """ValueError for an id of ids [M] outside [-1, num_adapters); True where the values were read (all in range),
    False where they were not checked. Reads the values on the host: a CPU tensor's always, another device's (a
    sync) only when `asked` (validate=True). Never while torch.compile traces (a fullgraph=True compile failed on the
    data-dependent read, validate=True too), for fake tensors (FakeTensorMode: none to read), or inside torch.func
    transforms (vmap over the ids, also inside a nested grad that hides them in its own wrapper: reading them raised
    torch's ".item() on a Tensor" error, where the rest of the batch is built with batched torch ops)."""
    if torch.compiler.is_compiling():  # first: ids.numel() may be an unbacked symbol there
        return False
    unread = (torch._C._are_functorch_transforms_active() or ids.numel() == 0
              or (ids.device.type != "cpu" and not asked))
    if ids.is_meta and not unread:
        # asked (meta is not cpu): reading them raised torch's bare "item() cannot be called on meta tensors"
        raise ValueError(f"{op}: validate=True expected adapter_ids with values to check, got a tensor on the meta "
                         f"device (build the batch with validate=False there)")
    if unread or not has_host_values(ids):
        return False
    # torch has no aminmax for uint16/uint32 (a bare NotImplementedError): widened, as the unchecked path does
    low, high = (int(v) for v in torch.aminmax(ids if ids.dtype not in (torch.uint16, torch.uint32)
                                               else ids.to(torch.int64)))
    if low < -1 or high >= num_adapters:
        raise ValueError(f"{op}: adapter_ids expected values in [-1, {num_adapters}), got {low if low < -1 else high}")
    return True  # every value read, and in range


# The tensor fields of a LoRABatch: its device buffers (the rest are sizes).
BUFFER_FIELDS = tuple(field.name for field in fields(LoRABatch) if field.type is torch.Tensor)

# A pytree node, so a LoRABatch can be an input of torch.export (a serving engine's batch is built outside the
# exported model); the token dimension of its [M] buffers can be dynamic.
torch.export.register_dataclass(LoRABatch, serialized_type_name="lora_kernels.LoRABatch")
# torch.export.save pickles a program's example inputs, which torch.export.load reads back with weights_only=True:
# without this a LoRABatch among them failed that load, which then fell back to a full unpickle behind a logged
# traceback (torch 2.14). A LoRABatch holds tensors and an int, so it is safe to allow.
torch.serialization.add_safe_globals([LoRABatch])
