"""Loads the C++/CUDA extension `lora_kernels._C` when it was built, and registers the fake (meta) implementations
of its ops so torch.compile can trace through them. Importing this never fails: a missing extension is recorded.
It also holds what functional, ops and the Triton launchers share (accumulate_dtype, autocast_off, scaled_mm,
wide_mm, is_finite_number, through_op, has_host_values, VMAP_DROPOUT_NEEDS_ONE_SEED): it imports none of the
package's modules, and the launchers cannot import functional (functional -> ops -> backends -> lora_kernels.triton
-> the launchers: a cycle)."""

import contextlib
import importlib
import importlib.util
import math
import os

import torch
from torch._subclasses.fake_tensor import FakeTensor

# --no-deps: --force-reinstall alone reinstalls torch from the index too, after building against the torch it replaces
# (a CPU-only torch became PyPI's CUDA build, and the new extension was refused in turn). lora_kernels is not on PyPI:
# its bare name installs nothing, so the source is the user's to name.
_REBUILD = ("rebuild it against this torch: pip install --no-build-isolation --no-cache-dir --force-reinstall "
            "--no-deps <the checkout, sdist or git URL it was installed from> (from a checkout: bash "
            "scripts/install.sh, or pip install --no-build-isolation -e .)")
# Why a build left its CUDA sources out: the codes setup.py records (LORA_KERNELS_CUDA_SKIPPED)
CUDA_SKIPPED_REASONS = {1: "LORA_KERNELS_BUILD_CUDA=0", 2: "torch was a CPU-only build",
                        3: "no CUDA toolkit was found (set CUDA_HOME)",
                        4: "the CUDA toolkit's major version was not torch's"}


def built_torch_mismatch(module, torch_version):
    """None, or why `module` (lora_kernels._C) cannot be used with torch `torch_version`: it records the torch
    minor version it was built against (a build before it did not, and is taken as it is)."""
    built = (getattr(module, "BUILT_TORCH_MAJOR", None), getattr(module, "BUILT_TORCH_MINOR", None))
    running = tuple(int(part) for part in torch_version.split(".")[:2])
    if None in built or built == running:
        return None
    return (f"built against torch {built[0]}.{built[1]} but this is torch {torch_version} (a wheel that pip cached "
            f"from another build?); its C++ ABI is another torch's: {_REBUILD}")


def shadowed_installed_extension(package_dir):
    """The directory of an installed lora_kernels whose files include a built extension, when it is not
    package_dir (the package imported here, which has none): a checkout first on sys.path (the current directory of
    `python -m pytest` in it) hides a regular install. None otherwise (an editable install's files are the
    checkout's own, listed by no record)."""
    import importlib.metadata  # here: only a missing extension pays for it
    # every lora_kernels on sys.path, not the first only: a checkout's lora_kernels.egg-info (python -m build --sdist
    # leaves one) comes first from the checkout's directory and lists no built extension
    # a damaged RECORD (a row of 4 fields, bytes not UTF-8) raised here and failed the import: it only words a message
    try:
        files = [file for dist in importlib.metadata.distributions(name="lora_kernels") for file in dist.files or ()]
    except Exception:
        return None
    for file in files:
        if file.parts[0] == "lora_kernels" and len(file.parts) == 2 and file.name.startswith("_C."):
            located = os.path.dirname(os.path.abspath(file.locate()))
            if located != os.path.abspath(package_dir) and os.path.exists(file.locate()):
                return located
    return None


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))  # the lora_kernels imported here


def _not_built_reason():
    installed = shadowed_installed_extension(PACKAGE_DIR)
    if installed is None:
        return f"not built: {_REBUILD}"
    return (f"not built in the lora_kernels imported here ({PACKAGE_DIR}), which hides the installed one in "
            f"{installed} (a checkout ahead of it on sys.path, e.g. the current directory): run from another "
            f"directory, or build the checkout: pip install --no-build-isolation -e .")


def _another_copys_extension(spec):
    """The directory of the extension `spec` names when it is not in the package imported here: setuptools' editable
    finder maps the name lora_kernels._C to the checkout it installed, so a second copy of the package without a
    built extension (another checkout using the same environment) would load that checkout's compiled ops, built
    from other sources, silently. None when the extension is the package's own (or has no file)."""
    if spec.origin is None:
        return None
    found_dir = os.path.dirname(os.path.abspath(spec.origin))
    if found_dir == PACKAGE_DIR or os.path.realpath(found_dir) == os.path.realpath(PACKAGE_DIR):
        return None
    return found_dir


_C = None
EXTENSION_ERROR = None
_spec = importlib.util.find_spec("lora_kernels._C")
if _spec is None:
    EXTENSION_ERROR = _not_built_reason()
elif (_foreign_dir := _another_copys_extension(_spec)) is not None:
    EXTENSION_ERROR = (f"not built in the lora_kernels imported here ({PACKAGE_DIR}); "
                       f"the one found is another copy's, in {_foreign_dir} (an editable install of another checkout), "
                       f"built from its sources: build this checkout: pip install --no-build-isolation -e .")
else:
    try:
        _C = importlib.import_module("lora_kernels._C")  # loading the library registers the ops
    except ImportError as exc:  # e.g. built against another torch
        EXTENSION_ERROR = f"unloadable: {type(exc).__name__}: {exc}; {_REBUILD}"
    else:
        EXTENSION_ERROR = built_torch_mismatch(_C, torch.__version__)
        if EXTENSION_ERROR is not None:  # its ops stay registered, unused: no backend and no fake impl takes them
            _C = None

HAS_EXTENSION = _C is not None
EXTENSION_WITH_CUDA = bool(getattr(_C, "WITH_CUDA", 0))
# Why a loaded extension has no CUDA kernels, or None (built with them, or a build that did not record it)
EXTENSION_CUDA_SKIPPED = CUDA_SKIPPED_REASONS.get(getattr(_C, "CUDA_SKIPPED", 0))


def is_finite_number(value):
    """math.isfinite for a real number, False (not OverflowError) for an int past float's range (10**400)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


# Dropout under torch.func.vmap draws one mask for the batch: a seed per sample (randomness="different") is refused,
# by the torch backend's mask (functional.py) and the Triton one's alike.
VMAP_DROPOUT_NEEDS_ONE_SEED = ("dropout under torch.func.vmap needs randomness='same' (one seed for the batch), got "
                               "randomness='different' (one seed per sample)")


def through_op(tensor):
    """Whether a call goes through its custom op rather than straight to its implementation: when tracing
    (torch.compile, export) and for fake or other tensor subclasses (a memory estimator's FakeTensorMode), which only
    the op's fake impl or the subclass's own dispatch can run, and under torch.func.functionalize (its tensors have no
    storage a kernel could take: the op's functionalization runs it, or torch refuses it naming the op), and under
    make_fx's tracing of real tensors (torch.func.linearize): the dropout seed read as an int there was torch's
    "trying to get value out of a tracing tensor" (helper 286). Plain eager calls run the implementation directly:
    the custom-op dispatcher costs ~30 us of host time per call (measured on this project's CPU machine), which a
    decode step outside a CUDA graph would pay for every launch."""
    return (torch.compiler.is_compiling() or type(tensor) is not torch.Tensor or torch._is_functional_tensor(tensor)
            or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None)


def has_host_values(tensor):
    """Whether the host may read tensor's values now: not while tracing, nor for a fake tensor (a memory estimator's
    FakeTensorMode, outside torch.compile) or a meta one, which have none (reading them raised
    DataDependentOutputException, or "Tensor.item() cannot be called on meta tensors" in the reference backend's
    grouped ops, which then take their slot-masked torch ops, as for fake tensors); nor under
    torch.func.functionalize (torch's RuntimeError on unallocated storage), nor for a tensor torch.func wraps (a
    MultiLoRALinear's scalings under vmap, stack_module_state's ensembles: "Cannot access data pointer of Tensor
    that doesn't have storage"), nor under make_fx's tracing of real tensors (torch.func.linearize: "trying to get
    value out of a tracing tensor")."""
    return not (torch.compiler.is_compiling() or isinstance(tensor, FakeTensor)
                or isinstance(tensor, torch.Tensor) and (tensor.is_meta or torch._is_functional_tensor(tensor)
                                                         or torch._C._functorch.is_functorch_wrapped_tensor(tensor))
                or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None)


def autocast_dtype(device):
    """The dtype torch.autocast runs matmuls in on this device, or None where autocast is off."""
    device_type = device.type
    # eager on cpu and cuda, with autocast off everywhere (the usual case), one call of 0.1 µs instead of the 0.9
    # below, which runs once a forward and 2-3 times a backward (helper 289). Not for other devices (it does not
    # see MPS autocast, review 290); traced, the calls below, which dynamo knows.
    if (device_type in ("cpu", "cuda") and not torch.compiler.is_compiling()
            and not torch._C._is_any_autocast_enabled()):
        return None
    # cpu and cuda always have autocast. Asking torch.amp.is_autocast_available about them broke
    # torch.compile(fullgraph=True) on torch 2.11, whose dynamo cannot trace it (2.14's can).
    if device_type not in ("cpu", "cuda") and not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_off(device):
    """A region where torch ops run in the dtypes they are given even inside torch.autocast: the torch fallbacks
    accumulate in float32 on purpose, and autocast would round their matmuls to its 16-bit dtype."""
    if autocast_dtype(device) is not None:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def accumulate_dtype(dtype):
    """The dtype the ops accumulate and keep intermediates in (the single-adapter ops' s, d_lora_b and ds; the torch
    grouped fallback's expand): float32 for 16- and 32-bit floats, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def wide_mm(a, b, out_dtype=torch.float32):
    """a @ b of 16-bit operands written in the wider out_dtype rather than rounded to 16 bits: cuBLAS's own output on
    GPUs (mm's out_dtype, CUDA-only), the product of out_dtype copies elsewhere, with autocast off (it rounded that
    product back to fp16 under a CPU fp16 autocast: dB = inf past 65504 again)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=out_dtype)
    with autocast_off(a.device):
        return torch.mm(a.to(out_dtype), b.to(out_dtype))


def scaled_mm(a, b, scaling, out_dtype=None):
    """scaling · (a @ b) for the backward's GEMM fallbacks (a = dY with b = B, or dYᵀ with b = S: b has r columns),
    with b cast to a's dtype.

    The product is in a's dtype unless out_dtype is given and wider than a's 16-bit dtype (the Triton fallback's
    fp32 dB and dS, the cuda fallback's dB of float32 factors): cuBLAS then writes it in out_dtype (mm.dtype,
    CUDA-only); other devices (the Triton interpreter's tests) multiply float32 copies of the same 16-bit operands.

    The scaling goes where no rounded intermediate exceeds both the operands and the result: into b before it is
    rounded to a's dtype when |scaling| <= 1 and something is rounded (the 16-bit product, or b itself: a float32
    S), onto the product after it otherwise. Scaling afterwards at a scaling below 1 rounded dY·B to fp16 first: inf
    where it passed 65504 while the result did not, where PEFT, which scales dY first, stays finite; likewise a
    float32 S past 65504 rounded to fp16 unscaled. A float32 product of b already in a's dtype is exact unscaled
    (folded, a small s·B was rounded into fp16's subnormals)."""
    wide_out = out_dtype is not None and out_dtype != a.dtype
    scale_b = abs(scaling) <= 1.0 and not (wide_out and b.dtype == a.dtype)
    b = (b * scaling if scale_b else b).to(a.dtype)
    if wide_out:
        product = wide_mm(a, b, out_dtype)
    else:
        product = a @ b
    return product if scale_b else product.mul_(scaling)


def check_devices(op, ref_name, ref, **tensors):
    """The kernels' device check, in the fakes too (the C++ and the Triton ops'): one meta tensor among CPU ones sends
    a call there, and a fake that took any devices returned uninitialised CPU tensors (or, for the in-place ops, wrote
    nothing) without an error. A list of tensors (the Triton grouped ops' slices) is checked item by item."""
    for name, value in tensors.items():
        for index, t in enumerate(value if isinstance(value, (list, tuple)) else [value]):
            if t is not None and t.device != ref.device:
                what = f"{name}[{index}]" if isinstance(value, (list, tuple)) else name
                raise ValueError(f"{op}: {what} expected device {ref.device} (same as {ref_name}), got {t.device}")


def _fake_lora_fwd(x, x_lora, weight, lora_a, lora_b, scaling, bias):
    check_devices("lora_fwd", "x", x, x_lora=x_lora, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias)
    return (x.new_empty(x.shape[0], weight.shape[0]),
            x.new_empty(x.shape[0], lora_a.shape[0], dtype=accumulate_dtype(x.dtype)))


def _fake_lora_bwd_dy(dy, s, lora_b, scaling):
    check_devices("lora_bwd_dy", "dy", dy, s=s, lora_b=lora_b)
    acc = accumulate_dtype(dy.dtype)
    return dy.new_empty(lora_b.shape, dtype=acc), dy.new_empty(dy.shape[0], lora_b.shape[1], dtype=acc)


def _fake_sgmv_shrink(x, lora_a, sorted_token_ids, slot_starts, slot_counts, scalings, ranks):
    check_devices("sgmv_shrink", "x", x, lora_a=lora_a, sorted_token_ids=sorted_token_ids, slot_starts=slot_starts,
                  slot_counts=slot_counts, scalings=scalings, ranks=ranks)
    return x.new_empty(x.shape[0], lora_a.shape[1], dtype=torch.float32)


def _fake_sgmv_expand(t, lora_b, sorted_token_ids, slot_starts, slot_counts, ranks, out, slice_offset):
    check_devices("sgmv_expand", "t", t, lora_b=lora_b, sorted_token_ids=sorted_token_ids, slot_starts=slot_starts,
                  slot_counts=slot_counts, ranks=ranks, out=out)


if HAS_EXTENSION:
    for _name, _fake in [("lora_fwd", _fake_lora_fwd), ("lora_bwd_dy", _fake_lora_bwd_dy),
                         ("sgmv_shrink", _fake_sgmv_shrink), ("sgmv_expand", _fake_sgmv_expand)]:
        torch.library.register_fake(f"lora_kernels::{_name}")(_fake)
