"""Which backends exist on this machine, why the others do not, and how `backend="auto"` chooses.

Backends (design.md §4): reference (the spec), torch (unfused torch ops, PEFT's way), triton (fused Triton kernels),
cuda (the C++/CUDA extension), cpu (the C++ extension's CPU kernels).
"""

import logging

import torch

from lora_kernels import _ext
from lora_kernels import triton as _triton_pkg

BACKENDS = ("reference", "torch", "triton", "cuda", "cpu")
logger = logging.getLogger("lora_kernels")


def unavailable_reason(backend, device):
    """None when `backend` can run tensors on `device` here, else a sentence saying why not."""
    device = torch.device(device)
    if backend in ("reference", "torch", "auto"):  # auto falls back to torch where nothing else runs
        return None
    if backend == "triton":
        if not _triton_pkg.HAS_TRITON:
            return f"triton is not importable ({_triton_pkg.TRITON_ERROR})"
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device"
        if device.type == "cpu":
            if _triton_pkg.INTERPRET:
                return None
            return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter, for tests)"
        return f"Triton does not run on {device.type} tensors"
    if backend in ("cuda", "cpu"):
        if not _ext.HAS_EXTENSION:
            return f"the C++ extension lora_kernels._C is {_ext.EXTENSION_ERROR}"
        if backend == "cuda":
            if not _ext.EXTENSION_WITH_CUDA:
                skipped = _ext.EXTENSION_CUDA_SKIPPED
                return "extension built without CUDA" + (f" ({skipped} when it was built)" if skipped else "")
            if device.type != "cuda":
                return f"the cuda backend runs CUDA tensors, got {device.type} tensors"
            return None if torch.cuda.is_available() else "no CUDA device"
        return None if device.type == "cpu" else f"the cpu backend runs CPU tensors, got {device.type} tensors"
    return f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)} or 'auto'"


def parse_device(op, value):
    """--device of the CLI commands: "cpu", "cuda" or "cuda:N" as a torch.device (None: cuda when available, else
    cpu), else ValueError naming it (torch's own error for a name like "gpu" is a RuntimeError listing every device
    type it knows). Only None takes the default: an empty name is refused, and 0 is cuda:0 as torch reads it (both
    had been taken for "no device given")."""
    if value is None:
        value = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        # an int by its type: torch.device(0) of a CPU-only torch 2.13 raised "Cannot access accelerator device"
        cuda_index = isinstance(value, int) and not isinstance(value, bool)
        device = torch.device("cuda", value) if cuda_index else torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{op}: --device expected cpu or cuda, got {value!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: --device expected cpu or cuda, got {value!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{op}: --device cuda but torch sees no CUDA device")
    # an index torch accepts but the run would not honour: cpu:3 ran on the one CPU device as cpu does, and
    # cuda:5 on a one-GPU machine failed in the middle of the run with torch's "invalid device ordinal"
    if device.type == "cpu" and device.index not in (None, 0):
        raise ValueError(f"{op}: --device expected cpu or cpu:0 (torch has one CPU device), got {value!r}")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise ValueError(f"{op}: --device {value!r} but torch sees {count} CUDA device{'s' if count != 1 else ''} "
                         f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    return device


def check_backend_name(op, backend):
    """ValueError naming `backend` unless it is a backend's name or "auto" (whether it runs here is decided per call,
    by the tensors' device)."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"{op}: backend expected one of {', '.join(BACKENDS)} or 'auto', got {backend!r}")


def available_backends(device):
    """The backend names that can run tensors on `device` (a torch.device or a name such as "cpu" or "cuda:0"),
    reference included; unavailable_reason(name, device) says why another cannot."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"available_backends: device expected a torch.device or a name such as 'cpu' or 'cuda', "
                         f"got {device!r}") from None
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


GROUPED_OPS = ("multi_lora_linear", "lora_shrink", "lora_expand", "add_lora")


def detect_cpu_bf16_gemm_units():
    """Whether this CPU computes bfloat16 GEMMs on its own bf16 units (AVX512-BF16 or AMX), which ATen reaches through
    oneDNN (torch's private CPU-feature checks; False where they are missing, or where oneDNN is unavailable or
    switched off, so that ATen's own slow bf16 GEMMs would run)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


# Read once, at import: dynamo cannot trace torch's feature checks, and resolve_backend asks auto_backend while
# tracing (and caches its choices otherwise), so a later torch.backends.mkldnn switch would not be seen anyway.
CPU_HAS_BF16_GEMM_UNITS = detect_cpu_bf16_gemm_units()


def auto_backend(device, op_name="lora_linear", dtype=None, num_slots=0):
    """The fastest available backend for `op_name` on `device`, by measurement (BENCHMARKS.md, bf16, K = N = 4096):
    - grouped ops on GPUs: the Triton kernels (H200, 64 adapters: 0.03x the per-adapter loop at 64 tokens on
      2026-11-29, 0.23x at 4096 tokens on 2026-11-30, where the C++ CUDA ones took 0.33x; per call at 4096 tokens on
      16 adapters Triton's shrink and expand took 19 and 37 µs, the CUDA ones 57 and 90 µs);
    - lora_linear on GPUs: the unfused torch composition, because a training step with the fused kernels measured
      slower on the first runs (`compare`'s model, H100: torch 38.8 ms, triton 99.9 ms; H200 2026-11-29: torch
      37.2 ms, cuda 50.5 ms, the cuda steps slowing from 38 to 62 ms during that run). The H200 run of 2026-11-30
      has `cuda` ahead in most rows: a step of that model 38.9 ms against 44.0 ms (torch's steps unsteady, 44 -> 38
      ms), one layer's fwd+bwd at M = 8192 0.94 ms against 1.06 ms (triton 1.06 ms), its peak memory 0.67x PEFT's
      against 1.11x, the forward at M = 1 17 µs against 28 µs; but the unmerged inference of that model took 15.9 ms
      with `cuda` against 13.9 ms (12.4 against 13.8 ms in the run before) and the forward at M = 16 33 µs against
      29 µs (its shrink kernel, since changed). The choice stays until a GPU run explains the inference row; ask for
      "cuda" or "triton" explicitly;
    - on CPU: the C++ CPU kernels; but for lora_linear in bf16 the torch composition where the CPU has bf16 GEMM
      units (CPU_HAS_BF16_GEMM_UNITS): the C++ kernels run its base GEMMs on float32 copies, which a CPU without
      them needs (its bf16 GEMMs took 6-60x as long: functional._cpu_widens) and one with them pays for. On a Xeon
      with AMX, 1 thread, K = N = 1024, r = 16, the cpu backend's fwd+bwd took 2.4-7.2x the torch composition's at
      M = 16 to 1024 in bf16 over two runs (BENCHMARKS.md, session 31). In fp16 (AVX512-FP16) it took 1.0-2.2x:
      the C++ kernels stay, whose float32 S and dS do not overflow where PEFT's fp16 composition does. So do their
      grouped ops, ahead at decode sizes (0.7-0.9x the torch fallback's multi-adapter fwd+bwd at 16 and 64 tokens in
      bf16), behind at 1024 tokens (1.7-2.0x). The Triton interpreter is for tests and never chosen automatically
      (with TRITON_INTERPRET=1 on a GPU machine the grouped ops take the C++ CUDA kernels).
    float64 (dtype) skips Triton, whose kernels run 32- and 16-bit floats only; more adapter slots (num_slots) than
    a grid's slot axis holds (MAX_GRID_YZ) skip both GPU kernels (the C++ CUDA ops refused them too). DTensor
    arguments (tensor parallelism) never come here: lora_linear picks "torch" for them
    (functional.resolve_dtensor_backend)."""
    device = torch.device(device)
    if device.type == "cuda":
        order = ("triton", "cuda", "torch") if op_name in GROUPED_OPS else ("torch",)
        if num_slots > _triton_pkg.MAX_GRID_YZ:  # the CUDA ops' kMaxGridYZ is the same limit
            order = ("torch",)
        # TRITON_INTERPRET=1 would run CUDA tensors interpreted
        if dtype == torch.float64 or _triton_pkg.INTERPRET:
            order = tuple(name for name in order if name != "triton")
    elif device.type == "cpu":
        bf16_units = op_name == "lora_linear" and dtype == torch.bfloat16 and CPU_HAS_BF16_GEMM_UNITS
        order = ("torch",) if bf16_units else ("cpu", "torch")
    else:
        order = ("torch",)
    # every order ends with torch, which runs wherever torch does
    return next(name for name in order if unavailable_reason(name, device) is None)


# (backend, device type, op) -> the backend to run, or the ValueError to raise. Availability is fixed once the
# process has imported the package (the extension, triton and the CUDA runtime are loaded or not), and looking it up
# again cost several µs per call. A plain dict, not functools.cache: dynamo traces through it without a warning.
_CHOICES = {}
_LOGGED = set()  # the auto choices already logged at DEBUG level


def _choose(backend, device_type, op_name, dtype, num_slots):
    device = torch.device(device_type)
    if backend == "auto":
        return auto_backend(device, op_name, dtype, num_slots)
    reason = unavailable_reason(backend, device)
    if reason is None:
        return backend
    return ValueError(f"{op_name}: backend {backend!r} is not available for {device_type} tensors: {reason}. "
                      f"Available here: {', '.join(available_backends(device))} (or 'auto').")


def log_auto_choice_by_kind(op_name, chosen, kind):
    """The debug line of an auto choice that the kind of the arguments made (DTensors, a tensor-subclass weight: the
    torch composition), not their device: once per (op, kind), as resolve_backend's."""
    key = (op_name, kind)
    if not torch.compiler.is_compiling() and key not in _LOGGED and logger.isEnabledFor(logging.DEBUG):
        _LOGGED.add(key)
        logger.debug("%s: backend='auto' chose %r for %s", op_name, chosen, kind)


def resolve_backend(backend, device, op_name, dtype=None, num_slots=0):
    """The backend to run `op_name` with: `backend` itself when it can run here, the auto choice for "auto" (for
    tensors of `dtype`, and a grouped op's `num_slots` adapter slots). Raises ValueError naming the reason and the
    available backends otherwise."""
    # only whether the slots fit Triton's grid changes a choice: one cache entry for all counts that fit, one for
    # all that do not
    num_slots = 0 if num_slots <= _triton_pkg.MAX_GRID_YZ else _triton_pkg.MAX_GRID_YZ + 1
    if not isinstance(backend, str):
        raise TypeError(f"{op_name}: backend expected a str, got {type(backend).__name__}")
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if torch.compiler.is_compiling():
        # Traced: no cache. A lookup would make dynamo guard on the dict's contents, and the first compiled call
        # filling it would then fail that guard: one recompile of every graph.
        chosen = _choose(backend, device_type, op_name, dtype, num_slots)
    else:
        key = (backend, device_type, op_name, dtype, num_slots)
        chosen = _CHOICES.get(key)
        if chosen is None:
            chosen = _CHOICES[key] = _choose(backend, device_type, op_name, dtype, num_slots)
        # The auto choice, once per (op, device, dtype) while DEBUG is on, whenever it was switched on (the choice
        # itself is cached from the first call). Not while tracing: dynamo cannot trace Logger calls.
        if backend == "auto" and key not in _LOGGED and logger.isEnabledFor(logging.DEBUG):
            _LOGGED.add(key)
            logger.debug("%s: backend='auto' chose %r for %s tensors", op_name, chosen,
                         device_type if dtype is None else f"{device_type} {str(dtype).removeprefix('torch.')}")
    if isinstance(chosen, ValueError):
        raise ValueError(*chosen.args)
    return chosen
