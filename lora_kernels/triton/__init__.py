"""Triton kernels, one module per op. Importable without triton installed: `TRITON_ERROR` then says why."""

import functools
import os
import threading
import warnings

import torch

# Read once: the interpreter must be switched on before triton compiles anything, so tests set it first. Read as
# Triton reads it (getenv_bool, triton 3.6 to 3.8: "1", "true", "on", "yes", "y" in any case): with only "1" here,
# TRITON_INTERPRET=true ran the interpreter while the package chose compiled kernels' configs and dot operands.
_TRUE, _FALSE = ("1", "true", "on", "yes", "y"), ("0", "false", "off", "no", "n")
INTERPRET = os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE


def env_flag(name, default):
    """The package's own switch `name` from the environment, spelled as Triton's (any case): unset or empty gives
    default, another value a warning and default. Compared with "0" or "1" only, LORA_KERNELS_AUTOTUNE=false left
    autotuning on and LORA_KERNELS_TRITON_TMA=true the TMA kernels off, without a word."""
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    if value:
        warnings.warn(f"{name}={os.environ[name]!r} is not one of {'/'.join(_TRUE + _FALSE)}; using the default, "
                      f"{int(default)}", stacklevel=2)
    return default

TRITON_ERROR = None
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as exc:
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"

HAS_TRITON = TRITON_ERROR is None

# Triton's names of the dtypes the kernels take (the compile gate's signatures).
TRITON_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SUPPORTED_DTYPES = tuple(TRITON_DTYPE_NAMES)  # what every Triton kernel here takes
# CUDA's limit on grid dimensions y and z, the grouped kernels' slot axis: "auto" does not pick them past it
MAX_GRID_YZ = 65535

# Every launch (and the compile gate) passes enable_fp_fusion=FP_FUSION: FMA contraction on, as Triton 3.6 to 3.9
# default to and as the tolerances and BENCHMARKS.md were measured. Triton 3.9 warns (UserWarning, once per process)
# when a kernel leaves it to the default, which 3.10 turns off.
FP_FUSION = True

if HAS_TRITON:
    # The interpreter's tl.dot multiplies the raw bit patterns of bfloat16 operands (triton-lang/triton#11584, seen
    # with triton 3.7 and 3.8): under the interpreter only, every dot's operands are upcast to fp32 first. Compiled
    # kernels never take this branch.
    import triton.language as tl  # as `tl`: the interpreter looks for the language module in a jit function's globals

    UPCAST_DOT_OPERANDS = tl.constexpr(INTERPRET)

    @triton.jit
    def round_to_tf32(v):
        """fp32 `v` rounded to the nearest tf32 (10 mantissa bits, ties to even); NaN and ±inf as they are. For an
        fp32 operand of a tf32 dot: the tensor cores drop its low 13 bits instead (round toward zero), so products
        came out a few parts in 10^4 smaller on average: on the H200 (2026-11-29) a bf16 layer's dA summed to 0.99950
        of the float64 reference's magnitude in the Triton kernels, where rounding to nearest leaves no bias."""
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
        # NaN and inf: all exponent bits set; adding to the largest NaN's bits would carry into the sign
        special = (bits & 0x7F800000) == 0x7F800000
        return tl.where(special, bits, rounded).to(tl.float32, bitcast=True)


def check_tensor(op, name, tensor, shape, dtypes=SUPPORTED_DTYPES, device=None):
    """Raises a TypeError/ValueError starting "{op}: {name} expected" unless `tensor` is a tensor of `shape` (sizes,
    None where any size goes) with a dtype in `dtypes`, on `device` (None: any) and, outside the interpreter, on a
    CUDA device: what the Triton launchers and custom ops check before their kernels index by these shapes."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != len(shape) or any(want is not None and got != want for got, want in zip(tensor.shape, shape)):
        expected = ", ".join("*" if want is None else str(want) for want in shape)
        raise ValueError(f"{op}: {name} expected shape [{expected}], got {list(tensor.shape)}")
    if tensor.dtype not in dtypes:
        raise TypeError(f"{op}: {name} expected dtype {' or '.join(map(str, dtypes))}, got {tensor.dtype}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{op}: {name} expected device {device}, got {tensor.device}")
    if tensor.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{op}: {name} is on {tensor.device}; the Triton kernels need CUDA tensors "
                         "(CPU tensors only under TRITON_INTERPRET=1)")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' grid and split arithmetic. Not triton.cdiv (nor triton.next_power_of_2):
    since triton 3.6 they are constexpr functions, whose calls from Python took about a third of the package's own
    host time per Triton lora_linear call (BENCHMARKS.md, session 19)."""
    return -(-a // b)


@functools.cache
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: launchers size their grids with it on every call)."""
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


# Triton launches take turns, on every path: the eager calls and the custom ops that compiled graphs run.
# triton.autotune keeps the arguments of the launch in progress on the kernel object, where the config prune and the
# TMA kernels' pre-hook read them and another thread's launch resets them to None (triton-lang/triton#11494), and it
# times the candidates on the first use of a key; the interpreter (TRITON_INTERPRET=1) runs a kernel on process-wide
# state: two interpreted kernels at once failed with "x >= grid_dim[0]" or "Did you forget to add @triton.jit ?".
# A GPU launch holds the lock for its host time (microseconds, but for a key's first autotuning).
_LAUNCH_LOCK = threading.Lock()


def _new_launch_lock_in_child():
    # A process forked while another thread was launching (a DataLoader worker forked during a forward under the
    # interpreter) inherits the lock held by a thread that does not exist there: its first launch waited forever.
    global _LAUNCH_LOCK
    _LAUNCH_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX: the processes that fork
    os.register_at_fork(after_in_child=_new_launch_lock_in_child)


def one_launch_at_a_time(launcher):
    """Runs `launcher` (a function that launches Triton kernels) holding the launch lock."""
    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        with _LAUNCH_LOCK:
            return launcher(*args, **kwargs)
    return launch


def on_tensor_device(launcher):
    """Runs `launcher` with the CUDA device of its first (tensor) argument current: Triton launches on the current
    device, so tensors on cuda:1 while cuda:0 is current would be addressed by a kernel on GPU 0."""
    @functools.wraps(launcher)
    def launch(tensor, *args, **kwargs):
        if tensor.is_cuda and tensor.device.index != torch.cuda.current_device():
            with torch.cuda.device(tensor.device):
                return launcher(tensor, *args, **kwargs)
        return launcher(tensor, *args, **kwargs)
    return launch


if HAS_TRITON:
    # The kernel modules register their custom ops (lora_kernels::triton_lora_*, lora_kernels_triton::*) when they
    # are imported. Imported here, with the package, rather than on first use: a program exported or AOT-compiled
    # with the triton backend (the auto choice for the grouped ops on GPUs) names those ops, and a process loading
    # it after `import lora_kernels` failed with "Could not find schema for lora_kernels_triton::sgmv_shrink".
    # Triton itself is imported above already; the two modules add ~50 ms (this project's 2-core CPU).
    from lora_kernels.triton import lora_linear, sgmv  # noqa: F401
