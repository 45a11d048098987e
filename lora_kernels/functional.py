"""lora_linear and multi_lora_linear: input checks, backend dispatch and autograd (the A/B-only backward).

Single adapter (design.md §2), x [..., K], weight [N, K], lora_a [r, K], lora_b [N, r]:
    y = x @ weight.T + scaling * (drop(x) @ lora_a.T) @ lora_b.T + bias
Backward gives dX, dA, dB and d(bias); dW only when weight.requires_grad (full fine-tuning). Saved:
S = drop(x) @ lora_a.T, and x where lora_a or the weight requires grad; the dropout mask is regenerated from a seed,
never stored.
"""

import contextlib
import numbers

import torch
import torch.utils.checkpoint
from torch.fx.experimental.symbolic_shapes import guard_or_false, statically_known_true
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack, is_traceable_wrapper_subclass_type

from lora_kernels import ops, reference
from lora_kernels._dtensor import describe, dtensor_class, is_dtensor
from lora_kernels._ext import (VMAP_DROPOUT_NEEDS_ONE_SEED, accumulate_dtype, autocast_dtype, has_host_values,
                               is_finite_number, scaled_mm, through_op, wide_mm)
from lora_kernels.backends import log_auto_choice_by_kind, resolve_backend
from lora_kernels.batch import BUFFER_FIELDS, LoRABatch
from lora_kernels.triton import SUPPORTED_DTYPES as TRITON_DTYPES


# ----------------------------------------------------------------------------------------------------------- checks

def _check_tensor(op, name, t, *, ndim=None, optional=False):
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in ops.FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} expected a floating dtype (float32/float16/bfloat16/float64), got {t.dtype}")
    ops.check_dense(op, name, t)  # a model may hold a CSR weight (nn.Linear runs one); no backend reads it
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} expected a {ndim}-D tensor, got shape {tuple(t.shape)}")


def _check_same(op, name, t, ref_name, ref, *, dtype=True):
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} expected dtype {ref.dtype} (same as {ref_name}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} expected device {ref.device} (same as {ref_name}), got {t.device}")


def _lora_linear_args_ok(x, weight, lora_a, lora_b, bias, scaling, dropout_p, factor_dtype):
    """True only when every check of check_lora_linear_args passes, tested in few Python operations: the checks run
    on every call of every layer, and the full version cost ~8 µs of host time per call. False means "look closer":
    the full checks then run and name the problem. While tracing, scaling's value is not checked (an inf scaling
    goes through): torch.compile(dynamic=True) traces a float as a symbolic one, which math.isfinite cannot take,
    and dynamo presents it as a float, so the two cannot be told apart there."""
    tensor, strided = torch.Tensor, torch.strided
    if not (isinstance(x, tensor) and isinstance(weight, tensor) and isinstance(lora_a, tensor)
            and isinstance(lora_b, tensor)):
        return False
    dtype, device = x.dtype, x.device
    factor_dtype = factor_dtype or dtype
    if (dtype not in ops.FLOAT_DTYPES or weight.dtype != dtype or lora_a.dtype != factor_dtype
            or lora_b.dtype != factor_dtype
            or weight.device != device or lora_a.device != device or lora_b.device != device
            or x.dim() < 1 or weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2
            or x.layout != strided or weight.layout != strided or lora_a.layout != strided
            or lora_b.layout != strided):
        return False
    out_features, in_features = weight.shape
    rank = lora_a.shape[0]
    if (rank < 1 or x.shape[-1] != in_features or lora_a.shape[1] != in_features or lora_b.shape[0] != out_features
            or lora_b.shape[1] != rank):
        return False
    if bias is not None and not (isinstance(bias, tensor) and bias.dtype == dtype and bias.device == device
                                 and bias.dim() == 1 and bias.shape[0] == out_features and bias.layout == strided):
        return False
    return (type(scaling) in (float, int) and (torch.compiler.is_compiling() or _scaling_fits(scaling, dtype))
            and type(dropout_p) in (float, int) and 0.0 <= dropout_p < 1.0)


def _check_bias_and_like_x(op, x, weight, lora_a, lora_b, bias, out_features, factor_dtype=None):
    """bias [N] (or None), and every given tensor on x's device and dtype: the tail of both ops' argument checks.
    factor_dtype not None: lora_a and lora_b are a layer's float32 factors of a 16-bit x (_float32_factor_dtype read
    that dtype from them), exempt from x's dtype."""
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{op}: bias expected shape [{out_features}] (N of weight {tuple(weight.shape)}), got "
                         f"{tuple(bias.shape)}")
    # A subclass weight's dtype is its own F.linear's to judge, as in nn.Linear: torchao's Int8Tensor computes in x's
    # dtype, so a bfloat16 one takes the float32 inputs of peft.prepare_model_for_kbit_training's float32 norms and a
    # float32 one autocast's (it is left uncast, see _cast_for_autocast); others raise their own dtype error. The
    # bias goes into that F.linear too (a bfloat16 Qwen2 layer's, with float32 inputs, ran there and in PEFT).
    subclass_weight = is_subclass_weight(weight)
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        if t is not None:
            factor = name in ("lora_a", "lora_b") and factor_dtype is not None
            _check_same(op, name, t, "x", x, dtype=not (name in ("weight", "bias") and subclass_weight or factor))


def check_lora_linear_args(op, x, weight, lora_a, lora_b, bias, scaling, dropout_p, factor_dtype=None):
    """Raises ValueError/TypeError naming the argument, the expected and the actual shape/dtype/device.
    factor_dtype: float32 where lora_a and lora_b are float32 factors of a 16-bit x (_float32_factor_dtype), which
    are not held to x's dtype (see lora_linear_float32_factors)."""
    if _lora_linear_args_ok(x, weight, lora_a, lora_b, bias, scaling, dropout_p, factor_dtype):
        return
    _check_tensor(op, "x", x)
    _check_tensor(op, "weight", weight, ndim=2)
    _check_tensor(op, "lora_a", lora_a, ndim=2)
    _check_tensor(op, "lora_b", lora_b, ndim=2)
    _check_tensor(op, "bias", bias, ndim=1, optional=True)
    if x.dim() < 1:
        raise ValueError(f"{op}: x expected at least 1 dimension [..., K], got a 0-D tensor")
    out_features, in_features = weight.shape
    rank = lora_a.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(f"{op}: x expected last dimension {in_features} (weight is {tuple(weight.shape)} = [N, K]), "
                         f"got shape {tuple(x.shape)}")
    if rank < 1:
        raise ValueError(f"{op}: lora_a expected shape [r, {in_features}] with r >= 1, got {tuple(lora_a.shape)}")
    if lora_a.shape[1] != in_features:
        raise ValueError(f"{op}: lora_a expected shape [r, {in_features}] (K of weight {tuple(weight.shape)}), "
                         f"got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (out_features, rank):
        raise ValueError(f"{op}: lora_b expected shape [{out_features}, {rank}] ([N, r] for weight "
                         f"{tuple(weight.shape)} and lora_a {tuple(lora_a.shape)}), got {tuple(lora_b.shape)}")
    _check_bias_and_like_x(op, x, weight, lora_a, lora_b, bias, out_features, factor_dtype)
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"{op}: scaling expected a real number, got {type(scaling).__name__}")
    if not torch.compiler.is_compiling() and not is_finite_number(scaling):  # see _lora_linear_args_ok
        raise ValueError(f"{op}: scaling expected a finite number, got {scaling!r}")
    if not torch.compiler.is_compiling() and not _scaling_fits(scaling, x.dtype):
        raise ValueError(f"{op}: scaling expected a number within float32's range (±{FLOAT32_MAX:.4g}: the kernels "
                         f"apply it in float32 to {x.dtype} inputs, where it would be inf), got {scaling!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"{op}: dropout_p expected a real number in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p expected a number in [0, 1), got {dropout_p!r}")


FLOAT32_MAX = torch.finfo(torch.float32).max


def _scaling_fits(scaling, dtype):
    """A finite scaling, within float32's range for inputs narrower than float64: the kernels apply it in float32,
    where a larger one is inf (NaN in rows of x·Aᵀ that are zero, inf elsewhere, where the exact result is finite)."""
    return is_finite_number(scaling) and (dtype == torch.float64 or abs(scaling) <= FLOAT32_MAX)


def check_layer_scaling(op, scaling, dtype, source):
    """ValueError where a layer of `dtype` could not run `scaling` (_scaling_fits), naming `source`, what made it
    (lora_alpha and r): refused where the layer is made or its adapter loaded, not first at its forward, and before
    a merge, which computed inf·0 = NaN into the weight (B is zero at init) in float32."""
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):  # a layer's attribute set by hand
        raise TypeError(f"{op}: {source} gives the scaling {scaling!r}, expected a real number")
    if not is_finite_number(scaling):
        raise ValueError(f"{op}: {source} gives the scaling {scaling!r}, expected a finite number")
    if not _scaling_fits(scaling, dtype):
        raise ValueError(f"{op}: {source} gives the scaling {scaling!r}, past float32's range (±{FLOAT32_MAX:.4g}), in "
                         f"which the kernels apply it to a {dtype} layer (only a float64 layer takes any finite "
                         f"scaling)")


# DTensor (tensor parallelism) is run by the backends that compose torch ops, whose DTensor rules shard the maths:
# the kernels take plain tensors (a DTensor reached them as "lora_fwd.default does not have a sharding strategy
# registered", or as torch's "got mixed torch.Tensor and DTensor" deep inside).
DTENSOR_BACKENDS = ("torch", "reference")


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter, type(None))


def _has_dtensor(tensors):
    """Whether one of `tensors` is a DTensor; plain tensors are told apart by type first (an isinstance check
    against DTensor costs ~0.15 µs a tensor, every call of every layer)."""
    cls = dtensor_class()
    if cls is None:
        return False
    for t in tensors:
        if type(t) not in _PLAIN_TYPES and isinstance(t, cls):
            return True
    return False


def resolve_dtensor_backend(op, backend, named, dropout_p):
    """The backend for a call with a DTensor among `named` ((name, tensor or None) pairs, checked otherwise already):
    "auto" picks "torch", the composition of DTensor-aware torch ops (a kernel backend cannot take them); a kernel
    backend, a plain tensor beside a DTensor, another device mesh and dropout are refused (TypeError/ValueError
    naming the argument) before any work."""
    cls = dtensor_class()
    first_name, first = next((n, t) for n, t in named if isinstance(t, cls))
    for name, t in named:
        if t is None:
            continue
        if not isinstance(t, cls):
            raise TypeError(f"{op}: {name} expected a DTensor, as {first_name} is {describe(first)}, got a plain "
                            f"torch.Tensor: with tensor parallelism every tensor argument is a DTensor on one device "
                            f"mesh (parallelize_module's hooks convert a layer's input; a LoRALinear made from a "
                            f"parallelized nn.Linear by inject_lora, load_peft_adapter or from_linear keeps them)")
        if t.device_mesh != first.device_mesh:
            raise ValueError(f"{op}: {name} expected a DTensor on {first.device_mesh} (as {first_name}), got "
                             f"{describe(t)}")
    chosen = resolve_backend("torch" if backend == "auto" else backend, first.device, op)
    if backend == "auto":
        log_auto_choice_by_kind(op, chosen, "DTensors (tensor parallelism)")
    if chosen not in DTENSOR_BACKENDS:
        raise TypeError(f"{op}: backend {backend!r} runs plain tensors, got {first_name} as {describe(first)} "
                        f"(tensor parallelism); use backend='torch' (or 'auto', which picks it for DTensors): its "
                        f"torch ops shard the computation as the weights are sharded")
    if dropout_p > 0.0:
        raise ValueError(f"{op}: dropout_p expected 0 with DTensor inputs (tensor parallelism), got {dropout_p!r}: "
                         f"the dropout mask is drawn by each process, not as a DTensor; use lora_dropout=0 there")
    return chosen


def is_subclass_weight(weight):
    """Whether `weight` is a tensor subclass that holds its data in tensors of its own, such as torchao's quantized
    weights (quantize_(model, Int8WeightOnlyConfig()) keeps nn.Linear and puts one in .weight); DTensors are not
    counted here. Only the subclass's own ops read it, F.linear among them: the kernels and the reference cannot
    ("Attempted to access the data pointer on an invalid python storage", "Int8Tensor dispatch: attempting to run
    unimplemented operator/function: func=<OpOverload(op='lora_kernels.lora_fwd' ...", and in the torch backend's
    backward, aten.mm for dX)."""
    # the type, not the instance: dynamo answers the instance check False for such a weight
    cls = type(weight)
    return cls not in _PLAIN_TYPES and is_traceable_wrapper_subclass_type(cls) and not is_dtensor(weight)


def describe_subclass(t):
    """'a torchao.quantization.Int8Tensor (a tensor subclass, such as torchao's quantized weights)' for messages."""
    return f"a {type(t).__module__}.{type(t).__qualname__} (a tensor subclass, such as torchao's quantized weights)"


# lora_linear's single-adapter kernels compute the base GEMM themselves
SUBCLASS_WEIGHT_USE = "backend='torch' (or 'auto', which picks it for such weights)"


def refuse_subclass_weight_backend(op, backend, weight, use):
    """TypeError for a backend that cannot read a subclass weight; `use` names the ones that can."""
    raise TypeError(f"{op}: backend {backend!r} cannot read weight, {describe_subclass(weight)}; use {use}: the base "
                    f"output is then the subclass's own F.linear")


# ------------------------------------------------------------------------------------------------------ autocast

def _autocast_dtype(x):
    """The dtype torch.autocast runs linear layers in on x's device, or None where autocast is off (or x is not a
    tensor: the checks then name the problem)."""
    return autocast_dtype(x.device) if isinstance(x, torch.Tensor) else None


def _cast_for_autocast(dtype, tensors):
    """The tensors as autocast hands them to F.linear: floating tensors cast to `dtype`, float64 left alone (and then
    refused by the same-dtype check, as F.linear refuses it). Our kernels and custom ops are invisible to autocast,
    so without this an fp32 model under autocast ran the slow fp32 kernels, or failed on the mixed dtypes autocast
    gave the torch ops around them. The casts are differentiable: fp32 parameters get fp32 gradients, like
    nn.Linear's under autocast. A subclass weight (is_subclass_weight) is left as it is, as nn.Linear leaves it: its
    own F.linear runs under autocast (see _lora_linear_composition and _multi_lora_base). A quantized weight may have
    no cast (conftest's QuantizedWeight: "unimplemented operator aten._to_copy") or ignore it (torchao 0.18's
    Int8Tensor.to(torch.bfloat16) stays float32, which the same-dtype check then refused)."""
    return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
            and t.dtype not in (dtype, torch.float64) and not is_subclass_weight(t) else t for t in tensors]


def _cast_for_autocast_but_layer_factors(dtype, x, weight, lora_a, lora_b, bias, float32_factors):
    """_cast_for_autocast of every operand, except a layer's float32 factors (or slots) where x becomes 16-bit: they
    are then the float32 factors of a 16-bit x that the autograd Functions cast themselves, as for a 16-bit layer
    (lora_linear_float32_factors). Cast here, each cast was an autograd node per factor and step, their gradients
    rounded to 16 bits before autograd cast them back, and MultiLoRALinear's Function saved the casts of every
    slot for backward."""
    x, weight, bias = _cast_for_autocast(dtype, (x, weight, bias))
    if not (float32_factors and _float32_factor_dtype(x, lora_a, lora_b)):
        lora_a, lora_b = _cast_for_autocast(dtype, (lora_a, lora_b))
    return x, weight, lora_a, lora_b, bias


# ------------------------------------------------------------------------------------------------- dropout (torch)

def new_seed():
    """A dropout seed: a 0-d int64 CPU tensor drawn from torch's default CPU generator, so torch.manual_seed makes
    dropout reproducible and activation checkpointing (which restores that generator) redraws the same mask. A
    tensor, not an int: torch.compile keeps the draw in its graph, where a Python int (and the .item() that made
    it) broke the graph, and would have been baked into the compiled code as one mask for every step. On the CPU
    even under torch.set_default_device("cuda"): reading it for a kernel launch must not sync with a GPU."""
    return torch.randint(0, 2**31 - 1, (), device="cpu")


def _dropout_keep_impl(seed: torch.Tensor, like: torch.Tensor, p: float) -> torch.Tensor:
    generator = torch.Generator(device=like.device)
    generator.manual_seed(int(seed))
    # Drawn straight into the input dtype (0 and 1 are exact there): no float32 [M, K] temporary (measured on an
    # H100: torch.rand + compare + cast raised fwd+bwd peak memory to 1.56x PEFT's at M=8192, K=4096, bf16).
    return torch.empty(like.shape, device=like.device, dtype=like.dtype).bernoulli_(1.0 - p, generator=generator)


# An opaque op for torch.compile: a seeded torch.Generator cannot be traced.
_dropout_keep_op = torch.library.custom_op("lora_kernels::torch_dropout_keep", _dropout_keep_impl, mutates_args=())
_dropout_keep_op.register_fake(lambda seed, like, p: like.new_empty(like.shape))


@_dropout_keep_op.register_vmap
def _dropout_keep_vmap(info, in_dims, seed, like, p):
    # torch.func.vmap traced by torch.compile (randomness="same": the seed is one for all samples): one mask of a
    # sample's shape, as the eager call under vmap draws. torch's fallback drew one per sample (the same one, from
    # the same seed) and guarded on the sizes: a recompile for every token count, dynamic=True too.
    seed_dim, like_dim, _ = in_dims  # one per argument, p included
    if seed_dim is not None:
        raise ValueError(VMAP_DROPOUT_NEEDS_ONE_SEED)
    return _dropout_keep_op(seed, like if like_dim is None else like.select(like_dim, 0), p), None


def torch_dropout_keep(seed, like, p):
    """The dropout keep-mask (1 kept, 0 dropped, each kept with probability 1 - p) of the non-Triton backends,
    shaped like `like` and in its dtype and device: drawn from a generator seeded with `seed` (from new_seed), so
    backward regenerates exactly the forward's mask instead of storing it."""
    if through_op(like):  # traced, or fake tensors: a generator seeded from a traced or fake seed cannot run
        return _dropout_keep_op(seed, like.detach(), p)
    return _dropout_keep_impl(seed, like, p)


def apply_dropout(t, keep, p, *, inplace=False):
    """t * keep / (1 - p), rounded once to t's dtype: the 1/(1-p) factor stays a float in the multiply's own math
    instead of being stored in t's dtype (in bf16 1/0.9 is 1.109375: the LoRA branch came out 0.16% small).
    inplace: into t itself (a temporary of the caller's) instead of a new tensor."""
    return (t.mul_(keep) if inplace else t * keep).mul_(1.0 / (1.0 - p))


# ------------------------------------------------------------------------------------------- single-adapter autograd

# The cuda backend's dY-once kernel (csrc/cuda/lora_linear.cu) multiplied on CUDA cores out of shared memory. On the
# H100 (BENCHMARKS.md, first run) the cuda backend's fwd+bwd at M = 8192 took 1.58 ms at r = 16 and 3.37 ms at
# r = 64, against 1.28 and 1.07 ms for the torch composition, whose backward reads dY twice in two cuBLAS GEMMs on
# tensor cores, while the cuda forward was the faster one. By its arithmetic the kernel moves ~16·r bytes of shared
# memory per dY element where the two GEMMs read 4 bytes of HBM, so it can only win where the GEMMs' fixed launch
# cost dominates: it runs up to M·r = CUDA_BWD_DY_KERNEL_MAX_WORK (M = 256 at r = 16), cuBLAS above. The bench's
# "CUDA backward" rows time the kernel against the two GEMMs directly, at M = 8192: on the H200 it took 6.5x
# (r = 8) to 19x (r = 64) their time, 2-4 TFLOP/s. At that rate it would lose from M·r of about 2000 at N = 4096;
# the bound itself is still unmeasured. Since then fp16/bf16 up to r = 32 run a tensor-core kernel (one read of dY
# from memory, partials written once): on the H200 (2026-11-30, bf16, N = 4096) 0.52x the two GEMMs at M = 256,
# r = 16 (the bound; timed eager, so mostly host time there), 0.63x at M = 8192, r = 8, but 1.16x at M = 8192,
# r = 16. Where between those the kernel stops winning (and whether fp32 or misaligned rows, which take the
# CUDA-core kernel, lose already at the bound) is not measured: benchmarks/cuda_crossovers.py measures it over
# M x r; the bound stays until it has run.
CUDA_BWD_DY_KERNEL_MAX_WORK = 4096


# Rows up to which a 16-bit cpu-backend forward keeps its base GEMM in 16 bits (kDecodeMaxM in
# csrc/cpu/lora_linear.cpp; multi_lora_linear's forward uses the same bound).
CPU_DECODE_MAX_M = 16


def _cpu_widens(backend, t):
    """Whether the cpu backend runs the base GEMMs for 16-bit `t` in fp32 on fp32 copies: the backward's dX = dY·W
    and dW = dYᵀ·X always, a multi_lora_linear forward's x·Wᵀ past CPU_DECODE_MAX_M rows (as lora_fwd_cpu does in
    C++). ATen's 16-bit GEMMs on a CPU without bf16/fp16 matrix units are slow, and dY·W (W not transposed)
    pathologically so. This project's 2-core AMD EPYC (AVX2), 1 thread, K = N = 1024: bf16 dY·W took 152 ms at
    M = 16 and 5.0 s at M = 512 against 1.3 and 78 ms through fp32 copies, fp16 1.2 s against 16 ms at M = 128; a
    bf16 LoRA fwd+bwd of one layer went from 0.8-1.2x to 0.01-0.32x PEFT's unfused layer at M >= 16 (BENCHMARKS.md,
    "CPU: the backends against PEFT's unfused layer", session 9; `lora-kernels bench --device cpu --dtype bf16
    --sections train` shows it). On a CPU with bf16 units (AMX) the copies cost more than they save: auto runs a bf16
    lora_linear on the torch composition there (backends.auto_backend; BENCHMARKS.md, session 31)."""
    return backend == "cpu" and t.dtype in (torch.bfloat16, torch.float16)


def _fp32_mm(a, b):
    """a @ b on fp32 copies (see _cpu_widens), with autocast off: a backward called inside torch.autocast runs
    under it, and autocast would put the product back into 16 bits (0.59 s against 0.010 s for a multi_lora_linear
    backward at M = 256, K = N = 1024 in bf16, 1 thread, on this project's CPU)."""
    with ops.autocast_off(a.device):
        return a.float() @ b.float()


def _functorch_transforms_active():
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running this call. Its C function is the one
    torch's own autograd.Function.apply asks (torch 2.11 and 2.14 alike); dynamo answers it while tracing a
    transform too (torch.compile(torch.func.grad(f))), where the kernels' ops would not be differentiated: ignoring
    it there ran the cpu backend's forward op, which has no derivative, and gave zero gradients, silently."""
    return torch._C._are_functorch_transforms_active()


def _forward_ad_active():
    """Whether eager forward-mode AD is on (inside torch.autograd.forward_ad.dual_level). The kernels have no
    forward derivatives: a Triton launch dropped the tangents silently (lora_linear's output had none, that is zero;
    multi_lora_linear's only the base layer's), the C++ ops and the autograd Functions raised. The torch
    composition, which autograd differentiates in both modes, runs there instead, as under torch.func.jvp. Read
    from the module that keeps the level (torch 2.11 and 2.14 alike); nothing else makes dual tensors."""
    return torch.autograd.forward_ad._current_level >= 0


def _triton_lora_linear():
    from lora_kernels.triton import lora_linear as triton_lora_linear
    return triton_lora_linear


def _or_zero(seed):
    # The Triton launchers take seed 0 when there is no dropout (the kernels never read it then).
    return 0 if seed is None else seed


def _lora_linear_forward(x2, weight, lora_a, lora_b, bias, scaling, dropout_p, seed, backend):
    """(y [M, N], S [M, r]) for one backend; S = drop(x2) @ lora_a.T, unscaled (what backward needs)."""
    if backend == "triton":
        return _triton_lora_linear().lora_fwd(x2, weight, lora_a, lora_b, scaling, bias, dropout_p, _or_zero(seed))
    keep = None if dropout_p == 0.0 else torch_dropout_keep(seed, x2, dropout_p)
    if backend in ("cpu", "cuda"):
        if keep is None:
            return torch.ops.lora_kernels.lora_fwd(x2, None, weight, lora_a, lora_b, float(scaling), bias)
        # The kernels get the kept elements (x·keep: exact in x's dtype) and the 1/(1-p) factor with the scaling, so
        # it is applied to the fp32 S, as the Triton shrink applies it: x/(1-p) rounded to fp16 passes 65504 where x
        # does not (x = 40000 at p = 0.5 gave S = inf, and y = NaN where lora_b is zeros, against a finite reference).
        keep_scale = 1.0 / (1.0 - dropout_p)
        # the op's own refusal named a scaling never passed; not while tracing (a symbolic scaling: see
        # _lora_linear_args_ok)
        if not torch.compiler.is_compiling() and not _scaling_fits(scaling * keep_scale, x2.dtype):
            raise ValueError(f"lora_linear: scaling {scaling!r} with dropout_p {dropout_p!r}: the {backend} kernels "
                             f"apply scaling / (1 - dropout_p) = {scaling * keep_scale!r} in one factor, past "
                             f"{'float64' if x2.dtype == torch.float64 else 'float32'}'s range (the torch and triton "
                             f"backends take it)")
        y, s = torch.ops.lora_kernels.lora_fwd(x2, x2 * keep, weight, lora_a, lora_b, scaling * keep_scale, bias)
        return y, s.mul_(keep_scale)
    # "torch": the unfused composition PEFT runs, in the input dtype. The dropped x and its mask ([M, K] each) are
    # released before the [M, N] products are made: alive together, they put this forward's peak memory at 5
    # tensors of x's size, where PEFT's is 4.5 on a GPU (its mask is bool), which the H200 measured as 1.11x
    # PEFT's fwd+bwd peak (BENCHMARKS.md, 2026-11-30); now 3. Same ops on the same values: the same bits.
    s = (x2 if keep is None else apply_dropout(x2, keep, dropout_p)) @ lora_a.T
    del keep
    return torch.nn.functional.linear(x2, weight, bias) + scaling * (s @ lora_b.T), s


class LoRALinearFunction(torch.autograd.Function):
    """Autograd of the fused LoRA linear for one backend. x2 is [M, K]; returns y [M, N].

    lora_a and lora_b may be float32 where x2 is 16-bit (lora_linear_float32_factors): they are cast to x2's dtype
    here, for the same kernels, and their gradients are returned in float32 as the backward computes them, where a
    cast outside this Function returned them rounded to 16 bits first (and cast back by autograd: two more kernels
    and autograd nodes per layer and step)."""

    @staticmethod
    def forward(ctx, x2, weight, lora_a, lora_b, bias, scaling, dropout_p, seed, backend):
        factors = (lora_a, lora_b)
        lora_a, lora_b = _in_dtype(lora_a, x2.dtype), _in_dtype(lora_b, x2.dtype)
        y, s = _lora_linear_forward(x2, weight, lora_a, lora_b, bias, scaling, dropout_p, seed, backend)
        need_x, need_w, need_a, need_b = ctx.needs_input_grad[:4]
        # x [M, K] is read only by dA = dSᵀ·drop(x) and dW = dYᵀ·x: with lora_a and the weight frozen (LoRA-FA, or
        # an adapter frozen while the layers below train) dB needs only S and dX only dY, as PEFT's unfused layer
        # then keeps only S. W is read only for dX: not saving it otherwise matters under autocast, where it is a
        # 16-bit copy [N, K] (the first layer's projections, whose input needs no gradient). The float32 factors
        # too, where they were cast: create_graph's backward differentiates through them (casting them again). Their
        # 16-bit cast of lora_a is read only for dX: not kept beside the float32 factor otherwise (the first layer's
        # projections, whose input needs no gradient: r·K elements per layer).
        # S is read only by dB = s·dYᵀ·S: not kept with lora_b frozen (an adapter frozen while the layers below
        # train), where PEFT's layer keeps nothing for its LoRA branch; the backward then computes dS alone.
        cast = lora_a is not factors[0]
        ctx.save_for_backward(x2 if need_a or need_w else None, s if need_b else None,
                              weight if need_x else None,
                              lora_a if need_x or not cast else None, lora_b, seed, *(factors if cast else ()))
        ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
        ctx.in_features = x2.shape[1]
        ctx.has_bias, ctx.weight_dtype, ctx.x_dtype = bias is not None, weight.dtype, x2.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, s, weight, lora_a, lora_b, seed, *factors = ctx.saved_tensors
        scaling, dropout_p, backend = ctx.scaling, ctx.dropout_p, ctx.backend
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        # the base weight or bias alone (a base fine-tune with the adapter frozen) needs no dS nor dB
        lora_wanted = need_x or need_a or need_b
        # The factors' gradients in their own dtype (float32 factors of a 16-bit x2: see the class docstring)
        grad_a_like, grad_b_like = factors or (lora_a, lora_b)
        if torch.is_grad_enabled():
            # create_graph=True (a gradient penalty, second-order meta-learning): the gradients must be
            # differentiable themselves. The Triton kernels and the C++ ops have no derivatives (triton failed at the
            # second grad, the C++ ops warned "autograd kernel was not registered"), and the saved S is detached
            # from lora_a and x, so dB would miss their terms: the torch composition, on an S recomputed here
            # (from float32 factors cast again, differentiably: the forward's casts are not in the graph).
            if factors and lora_wanted:
                lora_a, lora_b = (factor.to(ctx.x_dtype) for factor in factors)
            return _lora_linear_backward_differentiable(ctx, dy, x2, s, weight, lora_a, lora_b, seed, grad_a_like,
                                                        grad_b_like)
        dy = dy.contiguous()
        dx = d_weight = d_lora_a = d_lora_b = d_bias = None
        widen = _cpu_widens(backend, dy)  # dX = dY·W and dW = dYᵀ·X in fp32 (see _cpu_widens)
        if not lora_wanted:
            pass
        elif backend == "triton":  # dB comes with dS: the kernel reads dY once for both
            kernels = _triton_lora_linear()
            d_lora_b, ds = (kernels.lora_bwd_dy(dy, s, lora_b, scaling) if need_b
                            else (None, _ds_alone(backend, dy, lora_b, scaling)))
            if need_x:
                dx = kernels.lora_bwd_dx(dy, ds, weight, lora_a, dropout_p, _or_zero(seed))
            if need_a:
                d_lora_a = kernels.lora_bwd_da(ds, x2, dropout_p, _or_zero(seed))
        else:
            keep = torch_dropout_keep(seed, _like_x(ctx, dy), dropout_p) if dropout_p > 0.0 else None
            d_lora_b, ds = (_dy_products(backend, dy, s, lora_b, scaling, grad_b_like.dtype) if need_b
                            else (None, _ds_alone(backend, dy, lora_b, scaling)))
            # ds's dtype: the other operands of the dS products are widened to it (a no-op but for the cpu and
            # small-M cuda paths in 16 bits), and autocast must not round them back.
            with ops.autocast_off(dy.device):
                # The [M, K] temporaries (the dropped x, the mask, the LoRA part of dX) are released as soon as
                # they are used, so no more than two are alive beside x and dx.
                if need_a:
                    # widened before the 1/(1-p) factor: see _lora_linear_forward
                    x_lora = _in_dtype(x2, ds.dtype)
                    if keep is not None:
                        x_lora = apply_dropout(x_lora, keep, dropout_p, inplace=x_lora is not x2)
                    if ds.dtype != grad_a_like.dtype == torch.float32 and (
                            backend == "cuda" or backend == "torch" and ds.dtype == torch.float16):  # _dy_products
                        d_lora_a = wide_mm(ds.T, x_lora)
                    else:
                        d_lora_a = ds.T @ x_lora
                    del x_lora
                if need_x:
                    dx_lora = ds @ _in_dtype(lora_a, ds.dtype)
                    if keep is not None:
                        apply_dropout(dx_lora, keep, dropout_p, inplace=True)
                    del keep
                    if backend == "torch":  # PEFT's composition: separate GEMM and add
                        dx = (dy @ weight).add_(dx_lora)
                    elif widen:  # fp32 GEMM into the fp32 LoRA term, rounded once to x's dtype by _cast_grads
                        dx = dx_lora.addmm_(dy.to(dx_lora.dtype), weight.to(dx_lora.dtype))
                    else:  # the base GEMM adds the LoRA term in its epilogue: one pass over dx [M, K], not three
                        # In place, into a tensor of our own: the out-of-place torch.addmm first copies its input
                        # into a new result (the H200 profile: a 33 µs device copy per call at M = 8192, K = 4096).
                        dx = dx_lora.to(dy.dtype).addmm_(dy, weight)
        if need_w:  # full fine-tuning: the M·N·K GEMM the A/B-only path never forms
            d_weight = _fp32_mm(dy.T, x2) if widen else dy.T @ x2
        if need_bias and ctx.has_bias:
            d_bias = dy.sum(0)
        return _cast_grads(ctx, (dx, d_weight, d_lora_a, d_lora_b, d_bias), grad_a_like, grad_b_like)


def _like_x(ctx, dy):
    """A tensor with x2's shape [M, K], dtype and device and no memory of its own: what the dropout mask is drawn
    like in backward, where x2 itself is saved only for dA and dW (LoRALinearFunction.forward)."""
    return dy.new_empty((), dtype=ctx.x_dtype).expand(dy.shape[0], ctx.in_features)


def _dy_products(backend, dy, s, lora_b, scaling, grad_b_dtype):
    """(dB = s·dYᵀ·S, dS = s·dY·B) of LoRALinearFunction's backward on the cpu, cuda and torch backends (the Triton
    kernels compute their own); grad_b_dtype: the dtype of lora_b's gradient (float32 for float32 factors)."""
    if backend == "cuda" and not _at_most(dy.shape[0] * lora_b.shape[1], CUDA_BWD_DY_KERNEL_MAX_WORK):
        # cuBLAS GEMMs in the input dtype, S rounded to it as PEFT rounds it (scaled first when that keeps it
        # smaller: see scaled_mm). Using the fp32 S and dS would take fp32 copies of dy [M, N] and x [M, K] (a GEMM
        # takes one input dtype): a cost at large M no GPU has measured yet. A float32 factor's gradient is written
        # in float32 by cuBLAS, not rounded to 16 bits (the backward's dA likewise). Autocast off, as the fused ops
        # compute: a backward run inside an autocast region rounded an fp32 layer's dB and dS to bf16 (review 304).
        with ops.autocast_off(dy.device):
            return scaled_mm(dy.T, s, scaling, out_dtype=grad_b_dtype), scaled_mm(dy, lora_b, scaling)
    if backend in ("cpu", "cuda"):
        # dS stays in fp32 (fp64 for fp64): |s·dY·B| may pass 65504 in fp16 where dA and the LoRA term of dX do not,
        # as the Triton backward keeps it (rounding it first gave dx = inf there, as PEFT does).
        return torch.ops.lora_kernels.lora_bwd_dy(dy, s, lora_b, float(scaling))
    # torch: PEFT's GEMMs in the input dtype, its scaling where no product overflows first
    if grad_b_dtype == torch.float32 and dy.dtype == torch.float16:
        # float32 factors of an fp16 layer: dB sums M tokens' products, and rounded to fp16 it was inf where PEFT,
        # which runs that branch in float32, was finite (a GradScaler's loss scale of 2^23 on an MSE of order 1, 4096
        # tokens); written in float32 instead, dA too (LoRALinearFunction.backward). bf16 has float32's range.
        return scaled_mm(dy.T, s, scaling, out_dtype=torch.float32), _scaled_dy_products(dy, None, lora_b, scaling)[1]
    return _scaled_dy_products(dy, s, lora_b, scaling)


def _ds_alone(backend, dy, lora_b, scaling):
    """dS = s·dY·B of LoRALinearFunction's backward where lora_b is frozen (no S kept, no dB): in the dtype
    _dy_products gives it, the torch backend's and the cuda backend's GEMM path in the input dtype, the fused
    kernels' in float32 (float64 for float64), which cuBLAS writes from 16-bit operands directly. Outside the
    torch backend with autocast off, as the C++ and Triton ops compute: a backward run inside an autocast region
    had rounded an fp32 layer's dS to bf16 (review 297; Triton then refused it)."""
    if backend == "torch":
        return _scaled_dy_products(dy, None, lora_b, scaling)[1]
    with ops.autocast_off(dy.device):
        if backend == "cuda" and not _at_most(dy.shape[0] * lora_b.shape[1], CUDA_BWD_DY_KERNEL_MAX_WORK):
            return scaled_mm(dy, lora_b, scaling)
        return scaled_mm(dy, lora_b, scaling, out_dtype=accumulate_dtype(dy.dtype))


def _in_dtype(t, dtype):
    """t in dtype; t itself (as Tensor.to returns it) when it has that dtype already, without the call: Tensor.to
    costs ~0.7 µs of host time even then, and a layer's backward makes up to seven such calls."""
    return t if t.dtype == dtype else t.to(dtype)


def _cast_grads(ctx, grads, lora_a, lora_b):
    """LoRALinearFunction.backward's return: each gradient in its input's dtype (None where not needed)."""
    dx, d_weight, d_lora_a, d_lora_b, d_bias = grads
    if _has_dtensor((lora_a,)):
        # tensor parallelism: a replicated factor's gradient comes out partial (summed over the ranks' shards of N
        # or K); reduced here, so each factor's gradient is laid out as the factor is (as torch's own parallel
        # layers give theirs), which optimizers, grad clipping and FSDP2 over TP expect
        d_lora_a, d_lora_b = (g if g is None or g.placements == t.placements
                              else g.redistribute(t.device_mesh, t.placements)
                              for g, t in ((d_lora_a, lora_a), (d_lora_b, lora_b)))
    cast = (lambda g, dtype: None if g is None else _in_dtype(g, dtype))
    return (cast(dx, ctx.x_dtype), cast(d_weight, ctx.weight_dtype), cast(d_lora_a, lora_a.dtype),
            cast(d_lora_b, lora_b.dtype) if ctx.needs_input_grad[3] else None, cast(d_bias, ctx.weight_dtype),
            None, None, None, None)


def _differentiable_lora_operands(backend, *tensors):
    """The LoRA-branch operands of the differentiable paths (create_graph=True, torch.func), cast (differentiably) to
    the dtype the branch runs in: float32 for 16-bit inputs on the fused backends, whose kernels keep S and dS in
    float32 (s·dY·B and S·Bᵀ pass fp16's 65504 where dX, dA and y do not: rounding them gave inf there, where the
    backend's own path was finite); the input dtype on the torch backend, which is PEFT's composition and rounds as
    PEFT does. These paths are not the fast ones: the float32 copies of dy and x are the price."""
    if backend == "torch":
        return tensors
    return tuple(t.to(accumulate_dtype(t.dtype)) for t in tensors)


def _check_one_seed_for_the_batch():
    """ValueError for dropout under an eager torch.func.vmap with randomness="different": each sample drew a seed of
    its own, which the mask's generator (or kernel launch) would read on the host, where torch raised its unclear
    "vmap: It looks like you're calling .item() on a Tensor". Traced, the mask ops' vmap rules refuse it (see
    _dropout_keep_vmap). Called on the paths the transforms take only (the torch composition, the reference)."""
    if torch.compiler.is_compiling() or not _functorch_transforms_active():
        return
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    if any(interpreter.key() == torch._C._functorch.TransformType.Vmap and interpreter.randomness() == "different"
           for interpreter in retrieve_all_functorch_interpreters()):
        raise ValueError(f"lora_linear: {VMAP_DROPOUT_NEEDS_ONE_SEED}")


def _dropout_as_function(backend, seed, x2, dropout_p):
    """The dropout of the forward that drew `seed` from x2 [M, K], as a function of a tensor shaped like x2: the
    Triton kernels draw their own mask from the seed, the other backends torch_dropout_keep's."""
    _check_one_seed_for_the_batch()
    if backend == "triton":
        # Outside torch.func's transforms: the launch needs the plain storage of its output, which a tensor created
        # inside a transform's level does not expose ("Cannot access storage of TensorWrapper"); the mask is a
        # constant of the seed and the shape. Traced, dropout_mask is an opaque op, which runs below the transforms
        # (and dynamo cannot trace _DisableFuncTorch).
        with contextlib.nullcontext() if torch.compiler.is_compiling() else torch._C._DisableFuncTorch():
            multiplier = _triton_lora_linear().dropout_mask(seed, x2.shape[0], x2.shape[1], dropout_p, x2.device)
        return lambda t: (t * multiplier).to(t.dtype)
    keep = torch_dropout_keep(seed, x2, dropout_p)
    return lambda t: apply_dropout(t, keep, dropout_p)


def _lora_linear_composition(x2, weight, lora_a, lora_b, bias, scaling, dropout_p, seed, backend):
    """y [M, N] in differentiable torch ops (the torch.func path): the torch backend's composition, with the LoRA
    branch in the dtype of _differentiable_lora_operands and the base output added to it there, then rounded once
    more to x's dtype. Dropout draws the mask the backend's own path draws from the same seed."""
    drop = None if dropout_p == 0.0 else _dropout_as_function(backend, seed, x2, dropout_p)
    # Under autocast as in nn.Linear: a subclass weight, left uncast (_cast_for_autocast), may be of another dtype
    # than x2 (torchao's Int8Tensor stays float32), which its F.linear leaves to autocast. Other weights are cast.
    base = torch.nn.functional.linear(x2, weight, bias)
    with ops.autocast_off(x2.device):
        x_lora, lora_a, lora_b = _differentiable_lora_operands(backend, x2, lora_a, lora_b)
        x_lora = x_lora.to(lora_a.dtype)  # a subclass weight's float32 factors of a 16-bit x (_lora_linear)
        if drop is not None:  # after the widening, as the kernels apply 1/(1-p) (see _lora_linear_forward)
            x_lora = drop(x_lora)
        term = scaling * ((x_lora @ lora_a.T) @ lora_b.T)
        return (base.to(term.dtype) + term).to(x2.dtype)


def _scaled_dy_products(dy, s, lora_b, scaling):
    """(s·dYᵀ·S, s·dY·B) of the torch backend's backwards (S None: dB not wanted). In fp16, PEFT's order: a scaling
    of at most 1 scales dY first (rounded once to fp16, as PEFT's backward of `lora_B(...) * scaling` does), so
    neither product is rounded unscaled (dY·B past 65504 gave inf where PEFT is finite) and no small factor is
    rounded into fp16's subnormals (s·B, folded into B, put dA 4-5x further from float64 than PEFT's early in
    training, B ~ 1e-4). A larger scaling, and every scaling in bf16 and wider dtypes (fp32's range: nothing
    overflows), scales the [., r] products afterwards, without a pass over dY [M, N]."""
    if dy.dtype == torch.float16 and abs(scaling) <= 1.0:
        dy = dy * scaling
        return (None if s is None else dy.T @ s.to(dy.dtype)), dy @ lora_b.to(dy.dtype)
    return (None if s is None else scaling * (dy.T @ s.to(dy.dtype))), scaling * (dy @ lora_b.to(dy.dtype))


def _lora_linear_backward_differentiable(ctx, dy, x2, s, weight, lora_a, lora_b, seed, grad_a_like, grad_b_like):
    """The A/B-only backward of design.md §2 in differentiable torch ops (any backend, for create_graph=True):
    S is recomputed from x and lora_a so that dB, too, carries their derivatives (the saved S where neither needs a
    gradient: x2 is then None, see LoRALinearFunction.forward). grad_a_like, grad_b_like: the Function's factor
    inputs, whose dtypes the gradients take. The LoRA branch (its float32 copies of dY and x included) is
    differentiated only when x or a factor needs a gradient."""
    scaling, dropout_p = ctx.scaling, ctx.dropout_p
    need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
    if x2 is None and need_x and need_b:
        raise RuntimeError(
            "lora_linear: a create_graph=True backward with lora_b and x requiring gradients but lora_a and the "
            "weight frozen needs x to differentiate dB = s·dYᵀ·(x·Aᵀ) with respect to x, and the forward did not "
            "keep x (it keeps x [M, K] only for the gradients of lora_a and the weight, as PEFT's layer does with "
            "lora_A frozen); run that forward with lora_a.requires_grad_(True) (and leave its gradient unused)")
    dx = d_lora_a = d_lora_b = None
    if need_x or need_a or need_b:
        # the forward's mask
        # (dB from the saved S alone, where x2 is None and dX is not wanted, needs no mask)
        drop = (None if dropout_p == 0.0 or (x2 is None and not need_x)
                else _dropout_as_function(ctx.backend, seed, _like_x(ctx, dy), dropout_p))
        with ops.autocast_off(dy.device):  # the LoRA branch's dtype, not autocast's (as in the first-order backward)
            dy_l, a_l, b_l = _differentiable_lora_operands(ctx.backend, dy, lora_a, lora_b)
            if x2 is not None:
                x_l, = _differentiable_lora_operands(ctx.backend, x2)
                x_l = x_l if drop is None else drop(x_l)  # after the widening, as in _lora_linear_composition
            s_l = None if not need_b else (x_l @ a_l.T if x2 is not None else s.to(dy_l.dtype))
            # differentiable; the scaling where no 16-bit product overflows first
            d_lora_b, ds = _scaled_dy_products(dy_l, s_l, b_l, scaling)
            d_lora_a = ds.T @ x_l if need_a else None
            if need_x:
                dx_lora = ds @ a_l
                dx = dy @ weight + (dx_lora if drop is None else drop(dx_lora))
    d_weight = dy.T @ x2 if need_w else None
    d_bias = dy.sum(0) if need_bias and ctx.has_bias else None
    return _cast_grads(ctx, (dx, d_weight, d_lora_a, d_lora_b, d_bias), grad_a_like, grad_b_like)


def lora_linear(x, weight, lora_a, lora_b, scaling=1.0, bias=None, *, dropout_p=0.0, backend="auto"):
    """y = x @ weight.T + scaling * (dropout(x) @ lora_a.T) @ lora_b.T + bias

    x: [..., K]; weight: [N, K]; lora_a: [r, K]; lora_b: [N, r]; bias: [N] or None; all one dtype and device (but
    for the dtype of a subclass weight, which its own F.linear judges). dropout_p applies to the LoRA branch input
    only (pass 0 in eval mode). Returns [..., N] in x.dtype; under
    torch.autocast, in the autocast dtype, like F.linear (every input is cast to it first, but for a subclass weight,
    whose own F.linear runs under autocast).
    backend: "auto", "triton", "cuda", "cpu", "torch" or "reference" (see lora_kernels.backends).
    DTensors (tensor parallelism; all arguments then, on one mesh, dropout_p = 0): "torch" or "reference" only,
    and "auto" picks "torch" (resolve_dtensor_backend). A weight that is a tensor subclass (is_subclass_weight:
    torchao's quantized weights): "torch" only, which "auto" picks, in torch ops that autograd differentiates (the
    subclass's F.linear gives dX).
    Saves x for the backward only when lora_a or weight requires grad (PEFT's layer with lora_A frozen keeps none):
    a create_graph=True backward with x and lora_b requiring grad but lora_a and weight frozen then raises (keep
    lora_a requiring grad for it), but on "reference", plain autograd of torch ops, which keeps x.
    """
    return _lora_linear(x, weight, lora_a, lora_b, scaling, bias, dropout_p, backend, float32_factors=False)


def lora_linear_float32_factors(x, weight, lora_a, lora_b, scaling, bias, dropout_p, backend):
    """lora_linear for a layer's own factors (LoRALinear), which may be of another dtype than x: float32 factors of a
    16-bit x (autocast_adapter_dtype) are cast to x's dtype for the same kernels, but inside the autograd Function,
    which returns their gradients in float32 as it computes them (LoRALinearFunction) rather than rounded to 16
    bits (and costs no autograd node per cast); factors of any other dtype, and every call that does not take the
    Function, are cast to x's dtype up front (_layer_factors)."""
    return _lora_linear(x, weight, lora_a, lora_b, scaling, bias, dropout_p, backend, float32_factors=True)


def _float32_factor_dtype(x, lora_a, lora_b):
    """torch.float32 where lora_a and lora_b are float32 factors of a 16-bit x, which the autograd Functions take as
    they are (see lora_linear_float32_factors); None otherwise (the factors then have x's dtype)."""
    if (isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16) and isinstance(lora_a, torch.Tensor)
            and isinstance(lora_b, torch.Tensor) and lora_a.dtype == lora_b.dtype == torch.float32):
        return torch.float32
    return None


def _layer_factors(x, lora_a, lora_b):
    """A layer's factors (or slots) for its input x: float32 ones of a 16-bit x as they are (_float32_factor_dtype),
    others in x's dtype, which is the layer's but for a quantized (subclass) weight, whose own F.linear may take
    another: the LoRA branch runs in x's dtype."""
    if (isinstance(x, torch.Tensor) and x.dtype.is_floating_point and lora_a.dtype != x.dtype
            and _float32_factor_dtype(x, lora_a, lora_b) is None):
        return lora_a.to(x.dtype), lora_b.to(x.dtype)
    return lora_a, lora_b


def _operands_after_casts(x, weight, lora_a, lora_b, bias, float32_factors):
    """(x, weight, lora_a, lora_b, bias, factor_dtype) as lora_linear and multi_lora_linear compute with them: a
    layer's factors (or slots) for x (_layer_factors), then autocast's casts; factor_dtype is float32 where a layer's
    float32 factors of a 16-bit x stay so until the autograd Function (None: x's dtype)."""
    if float32_factors:
        lora_a, lora_b = _layer_factors(x, lora_a, lora_b)
    autocast_dtype = _autocast_dtype(x)
    if autocast_dtype is not None:
        x, weight, lora_a, lora_b, bias = _cast_for_autocast_but_layer_factors(
            autocast_dtype, x, weight, lora_a, lora_b, bias, float32_factors)
    factor_dtype = _float32_factor_dtype(x, lora_a, lora_b) if float32_factors else None
    return x, weight, lora_a, lora_b, bias, factor_dtype


def _needs_grad(x, weight, lora_a, lora_b, bias):
    """Whether autograd differentiates this call."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or lora_a.requires_grad
                                        or lora_b.requires_grad or (bias is not None and bias.requires_grad))


def _lora_linear(x, weight, lora_a, lora_b, scaling, bias, dropout_p, backend, float32_factors):
    op = "lora_linear"
    x, weight, lora_a, lora_b, bias, factor_dtype = _operands_after_casts(x, weight, lora_a, lora_b, bias,
                                                                          float32_factors)
    check_lora_linear_args(op, x, weight, lora_a, lora_b, bias, scaling, dropout_p, factor_dtype)
    subclass_weight = False
    dtensor = _has_dtensor((x, weight, lora_a, lora_b, bias))
    if dtensor:  # tensor parallelism: the torch composition
        backend = resolve_dtensor_backend(op, backend, (("x", x), ("weight", weight), ("lora_a", lora_a),
                                                        ("lora_b", lora_b), ("bias", bias)), dropout_p)
    elif is_subclass_weight(weight):
        subclass_weight = True
        if resolve_backend("torch" if backend == "auto" else backend, x.device, op) != "torch":
            refuse_subclass_weight_backend(op, backend, weight, SUBCLASS_WEIGHT_USE)
        if backend == "auto":
            log_auto_choice_by_kind(op, "torch", "a tensor-subclass weight (is_subclass_weight)")
        backend = "torch"
    else:
        backend = resolve_backend(backend, x.device, op, x.dtype)
    if backend == "triton":  # the kernels' limits, named for this op and before the dropout seed is drawn
        kernels = _triton_lora_linear()
        if x.dtype not in TRITON_DTYPES:
            raise TypeError(f"{op}: the triton backend runs float32/float16/bfloat16, got {x.dtype} (use backend="
                            "'cuda', 'cpu' or 'torch' for float64)")
        if lora_a.shape[0] > kernels.MAX_RANK:
            raise ValueError(f"{op}: the triton backend takes ranks up to r = {kernels.MAX_RANK}, got lora_a "
                             f"{tuple(lora_a.shape)} (use backend='torch' or 'cuda' for larger ranks)")
    seed = None
    if dropout_p > 0.0:
        if x.is_cuda and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing():
            # The seed is drawn on the host now: every replay of the graph would reuse this one dropout mask.
            raise RuntimeError(f"{op}: dropout_p = {dropout_p} inside a CUDA-graph capture would replay one dropout "
                               "mask forever; capture with dropout_p = 0 (eval mode) or run the step eagerly")
        seed = new_seed()
    lead_shape = x.shape[:-1]
    # torch.func transforms need an autograd.Function with setup_context and a vmap rule, and the kernels and C++ ops
    # have neither derivatives nor batching rules ("must override the setup_context staticmethod"): the torch
    # composition, outside the Function, which the transforms differentiate and batch themselves. A subclass weight
    # implements F.linear and its derivative, not the dY @ W of the Function's backward.
    composition = subclass_weight or _functorch_transforms_active() or _forward_ad_active()
    through_function = not composition and _needs_grad(x, weight, lora_a, lora_b, bias)
    # A subclass weight's float32 factors stay float32, and its composition runs the LoRA branch in float32, as
    # PEFT's TorchaoLoraLinear does: cast to fp16, autograd formed dA and dB in fp16 (inf past 65504 under a
    # GradScaler's loss scale, where PEFT's and the plain-weight torch backend's float32 gradients were finite)
    if factor_dtype is not None and (not through_function or backend == "reference" or dtensor) and not subclass_weight:
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)  # differentiable, as LoRALinear cast them before
    if backend == "reference":
        if seed is not None:
            _check_one_seed_for_the_batch()
        mask = None if seed is None else torch_dropout_keep(seed, x, dropout_p).double() / (1.0 - dropout_p)
        return reference.lora_linear(x, weight, lora_a, lora_b, float(scaling), bias, mask).to(x.dtype)
    x2 = ops.as_rows(x)
    args = (x2, weight, lora_a, lora_b, bias, float(scaling), float(dropout_p), seed, backend)
    if composition:
        y = _lora_linear_composition(*args)
    elif through_function:
        y = LoRALinearFunction.apply(*args)
    else:  # nothing to differentiate (inference, no_grad): the autograd Function's bookkeeping costs ~13 µs a call
        y = _lora_linear_forward(*args)[0]
    return y if x.dim() == 2 else y.reshape(*lead_shape, weight.shape[0])


# --------------------------------------------------------------------------------------------- grouped (multi-LoRA)

def _segment_outer_sum(batch, ranks, backend, left, right, scalings=None):
    """[L, P, Q] with slot i holding sum over tokens t of slot i of outer(left[t], right[t]) (times scalings[i] when
    given), zero in rows p >= ranks[i]; left [M, P] (P = R, the rank axis), right [M, Q]. fp32 (fp64 for fp64 right).
    Triton: one segment-GEMM kernel (M·P·Q work). CPU tensors: each slot's rows gathered (M·P·Q work), in fp32.
    Other devices: slot by slot, each a GEMM over all M rows with the other slots' rows of BOTH operands zeroed by
    `where` (L·M·P·Q work, no host sync): a 0/1 mask multiplied in would turn another slot's NaN or Inf row into NaN
    (0·NaN), so one broken token or adapter would poison every slot's gradient."""
    acc = accumulate_dtype(right.dtype)
    if backend == "triton":
        sums = ops.triton_sgmv().segment_outer_sum(left, right, batch)
    elif ops.slots_on_host(right, batch, ranks):
        # Each slot's own rows only, M·P·Q work in all; in fp32, as the CPU kernels compute (a 16-bit copy of a
        # slot's rows is no cheaper to multiply on a CPU). A slot of rank 0 keeps its zero sum.
        left = left.to(acc)
        sums = torch.zeros(batch.num_adapters, left.shape[1], right.shape[1], dtype=acc, device=right.device)
        with ops.autocast_off(right.device):
            for slot, rows, _ in ops.host_slot_rows(batch, ranks):
                torch.mm(left.index_select(0, rows).T, right.index_select(0, rows).to(acc), out=sums[slot])
    else:
        if right.dtype == torch.float16 or right.device.type == "cpu":
            # fp32 GEMMs: u = s·dY·B (left) passes fp16's 65504 where dA does not (the Triton kernel multiplies in
            # tf32 for the same reason), and rounding it gave dA = inf. CPU tensors reach here only while
            # torch.compile traces: fp32 as the eager CPU path above (rounding the fp32 u and S to bf16 here put
            # compiled slot gradients ~2e-3 off eager's)
            left, right = left.to(acc), right.to(acc)
        else:
            left = left.to(right.dtype)  # tensor-core GEMMs in the input dtype, as PEFT's
        ids, num_slots = batch.adapter_ids, batch.num_adapters
        zero = torch.zeros((), dtype=right.dtype, device=right.device)
        per_slot = []
        with ops.autocast_off(right.device):
            for slot in range(num_slots):
                rows = (ids == slot)[:, None]
                per_slot.append(torch.where(rows, left, zero).T @ torch.where(rows, right, zero))
        sums = torch.stack(per_slot).to(acc)
    if scalings is not None:
        sums = sums * scalings.to(acc)[:, None, None]
    # Past a slot's rank the sums are 0·(that slot's tokens): NaN when one of them holds NaN or Inf, where the
    # reference's gradient is 0 (padding is never read, so it gets no gradient).
    in_rank = torch.arange(left.shape[1], device=right.device) < ranks[:, None]
    return torch.where(in_rank[:, :, None], sums, torch.zeros((), dtype=acc, device=right.device))


def _at_most(size, bound):
    """Whether `size` (of a token count) is at most `bound`, for the backends' Python choices between two ways of
    computing by size. A dynamic size in a torch.compile trace counts as larger unless its range says otherwise: a
    plain comparison made dynamo guard on it, so the first token count on the other side of the bound compiled the
    graph again (dynamic=True included). Such a graph takes the large-size way at every count."""
    return statically_known_true(size <= bound)


def _multi_lora_base(x2, weight, bias, backend):
    """x2 @ weight.T + bias as the grouped forward computes it, before the expand adds the LoRA term into it. A
    subclass weight (is_subclass_weight) runs its own F.linear: a float32 copy is not among its ops."""
    if (_cpu_widens(backend, x2) and not _at_most(x2.shape[0], CPU_DECODE_MAX_M)
            and not is_subclass_weight(weight)):
        # the base GEMM in fp32 past decode size, as lora_fwd_cpu's (see _cpu_widens); unlike lora_fwd_cpu, which
        # rounds once, y is rounded before the expand adds the LoRA term into it, as on every backend here
        with ops.autocast_off(x2.device):
            return torch.nn.functional.linear(x2.float(), weight.float(),
                                              None if bias is None else bias.float()).to(x2.dtype)
    return torch.nn.functional.linear(x2, weight, bias)


def per_token(per_slot, batch):
    """per_slot [L] gathered for each token [M] by its slot. Tokens of no slot (-1, and ids past the slots, which a
    hand-built batch may hold and the kernels treat as -1) get some slot's value, never read past per_slot: the
    grouped ops skip those tokens, so nothing scaled by it is added anywhere."""
    return per_slot.index_select(0, batch.adapter_ids.clamp(0, per_slot.shape[0] - 1))


def _selective_checkpointing():
    """Whether selective activation checkpointing (torch.utils.checkpoint with context_fn=
    create_selective_checkpoint_contexts) is recording or replaying this eager forward: it caches the outputs of the
    ops its policy saves, and raises in the backward where one was written in place since."""
    if torch.compiler.is_compiling() or not torch._C._len_torch_dispatch_stack():
        return False
    return any(isinstance(mode, _SELECTIVE_CHECKPOINT_MODES) for mode in _get_current_dispatch_mode_stack())


# torch's private dispatch modes of selective checkpointing (recording, replaying); none where a release renames them
_SELECTIVE_CHECKPOINT_MODES = tuple(mode for mode in (getattr(torch.utils.checkpoint, name, None) for name in (
    "_CachingTorchDispatchMode", "_CachedTorchDispatchMode")) if mode is not None)


def _multi_lora_forward(x2, weight, bias, lora_a, lora_b, batch, scalings, ranks, backend, unscaled=False):
    """(y, shrunk): the base GEMM, then the grouped shrink and expand added into its output. unscaled: shrunk is
    returned without the scalings (S = x·Aᵀ per slot, fp32), what the backward's dB is built from."""
    y = _multi_lora_base(x2, weight, bias, backend)
    if _selective_checkpointing():
        # a policy that saves matmuls (torchtitan's) caches the base GEMM's output: the expand adds into a copy
        y = y.clone()
    if not unscaled:
        shrunk = ops.run_shrink(backend, x2, lora_a, batch, scalings, ranks)
        ops.run_expand(backend, shrunk, lora_b, batch, ranks, y)
        return y, shrunk
    s = ops.run_shrink(backend, x2, lora_a, batch, torch.ones_like(scalings), ranks)
    token_scalings = per_token(scalings, batch)
    ops.run_expand(backend, s * token_scalings[:, None], lora_b, batch, ranks, y)
    return y, s


def _multi_lora_term(x2, lora_a, lora_b, adapter_ids, scalings, ranks, shrunk=None):
    """The grouped LoRA term [M, N] (design.md §3) in differentiable torch ops, in lora_b's dtype (x2's: the slots
    are cast to it; accumulated in fp32, fp64 for fp64): what autograd differentiates where the kernels cannot be
    (create_graph=True, torch.func). Slot by slot over all rows with `where`, so no other slot's NaN or Inf row and
    no NaN padding reaches a value or a gradient (L·M·R·(K+N) work: these paths are not the fast ones). Autocast is off
    inside: it would run the fp32 matmuls in its 16-bit dtype. shrunk: the forward's unscaled S = x2·Aᵀ [M, R] in
    place of x2 and lora_a (both None), for dB where the forward kept no x (see MultiLoRAFunction.forward)."""
    acc = accumulate_dtype(lora_b.dtype)
    device = lora_b.device
    num_slots, _, max_rank = lora_b.shape
    with ops.autocast_off(device):
        zero = torch.zeros((), dtype=acc, device=device)
        in_rank = torch.arange(max_rank, device=device) < ranks[:, None]
        b = torch.where(in_rank[:, None, :], lora_b.to(acc), zero)
        if shrunk is None:
            a = torch.where(in_rank[:, :, None], lora_a.to(acc), zero)
            x_acc = x2.to(acc)
        else:
            shrunk_acc = shrunk.to(acc)
        total = torch.zeros(adapter_ids.shape[0], lora_b.shape[1], dtype=acc, device=device)
        for slot in range(num_slots):
            rows = (adapter_ids == slot)[:, None]
            # a slot no row uses gets zero gradients, as from the kernels' path, even where its factors hold NaN/Inf
            # (an unloaded slot): 0·NaN in their products' gradients had been NaN. Masked on the device: no sync.
            used = rows.any()
            b_slot = torch.where(used, b[slot], zero)
            if shrunk is None:
                # the product's other rows and padding columns are selected away too: 0 times an Inf of A (other
                # rows, whose x is zeroed) or of x (padding, whose A is zeroed) is NaN, in y or in dB = Sᵀ·dY
                s_slot = torch.where(rows & in_rank[slot],
                                     torch.where(rows, x_acc, zero) @ torch.where(used, a[slot], zero).T, zero)
            else:  # S's columns past the slot's rank and other slots' rows are never read
                s_slot = torch.where(rows & in_rank[slot], shrunk_acc, zero)
            term = (s_slot * scalings[slot].to(acc)) @ b_slot.T
            total = total + torch.where(rows, term, zero)
        return total.to(lora_b.dtype)


class MultiLoRAFunction(torch.autograd.Function):
    """y = x2 @ W.T + bias + grouped LoRA; gradients for x2, every slot's A and B, and W and bias when they require
    it (full fine-tuning of the base; never the scalings). float32 slots of a 16-bit x2
    (multi_lora_linear_float32_factors) are cast here and get their gradients in float32, as in LoRALinearFunction."""

    @staticmethod
    def forward(ctx, x2, weight, bias, lora_a, lora_b, batch, scalings, ranks, backend):
        factors = (lora_a, lora_b)
        lora_a, lora_b = _in_dtype(lora_a, x2.dtype), _in_dtype(lora_b, x2.dtype)
        # S is kept unscaled: dB = s·dYᵀ·S may reduce S rounded to the input dtype (bf16 on GPUs; fp16 stays fp32
        # there, see _segment_outer_sum), and the scaled s·S overflows fp16 where S does not (PEFT rounds S unscaled).
        y, s = _multi_lora_forward(x2, weight, bias, lora_a, lora_b, batch, scalings, ranks, backend, unscaled=True)
        # The batch's buffers are saved like the other inputs: refilling them in place (LoRABatch.refill_, for the
        # next step of a CUDA graph) before this backward runs then raises autograd's in-place modification error
        # instead of computing the gradients for the new ids. A batch built under torch.inference_mode (a reference
        # pass whose batch is reused for training) holds inference tensors, which cannot be saved: a copy is. Not
        # while tracing (dynamo cannot trace is_inference()): compiled training needs a batch built outside
        # inference_mode (set_batch_adapters builds its batch inside the graph, so only a batch passed in is).
        batch_buffers = [getattr(batch, name) for name in BUFFER_FIELDS]
        if not torch.compiler.is_compiling() and any(t.is_inference() for t in batch_buffers):
            batch_buffers = [t.clone() for t in batch_buffers]
        if not torch.compiler.is_compiling():  # a serving stack's scalings and ranks tables likewise
            scalings, ranks = (t.clone() if t.is_inference() else t for t in (scalings, ranks))
        # W only for dX, as in LoRALinearFunction: under autocast it is a 16-bit copy [N, K]. Float32 slots cast here
        # are saved as they are (parameters: no memory of their own) and cast again in backward, not their casts: the
        # copies of every slot, L·R·(K+N) elements whatever the token count, were saved activation memory of the
        # order of x's (64 slots of rank 16 at K = N = 4096: 16.8 MB per layer, x 33.5 MB at 4096 tokens in bf16).
        cast = lora_a is not factors[0]
        # S [M, R] (float32) only for dB: not while the slots' B train no more (a layer below trains). x [M, K] only
        # for dA and dW, as in LoRALinearFunction: with the slots' A and the weight frozen dB needs S and dX dY alone.
        need_x_kept = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        ctx.save_for_backward(x2 if need_x_kept else None, weight if ctx.needs_input_grad[0] else None,
                              *((None, None) if cast else factors),
                              s if ctx.needs_input_grad[4] else None, scalings, ranks,
                              *(factors if cast else (None, None)), *batch_buffers)
        # Sizes only outside save_for_backward: a LoRABatch here kept its buffers alive past the backward for as long
        # as the graph lived (a loss held for logging until the next step's forward).
        ctx.num_adapters, ctx.backend, ctx.x_dtype = batch.num_adapters, backend, x2.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_a, lora_b, s, scalings, ranks, factor_a, factor_b, *batch_buffers = ctx.saved_tensors
        batch = LoRABatch._built(*batch_buffers, ctx.num_adapters)
        backend = ctx.backend
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        # The slots' gradients in their own dtype (float32 slots of a 16-bit x2: see the class docstring)
        grad_a_like, grad_b_like = (lora_a, lora_b) if factor_a is None else (factor_a, factor_b)
        if factor_a is not None:  # the forward's casts again (see forward), those this backward reads
            # create_graph=True: both, in the graph, for the LoRA term, built only where one of its inputs needs a
            # gradient (below)
            lora_term = torch.is_grad_enabled() and (need_x or need_a or need_b)
            # the expand of dX; not for a term built on the saved S (x not kept: see the create_graph branch below)
            lora_a = factor_a.to(ctx.x_dtype) if need_x or lora_term and x2 is not None else None
            lora_b = factor_b.to(ctx.x_dtype) if need_x or need_a or lora_term else None  # the shrink of dY
        if torch.is_grad_enabled():
            # create_graph=True: differentiable gradients, which the kernels and C++ ops do not give (see
            # LoRALinearFunction.backward). The LoRA term's are autograd's own, of its torch composition, on the
            # float32 slots cast again in the graph where the forward cast them.
            shrunk = None
            if x2 is None and need_b:  # dB from the saved S (x not kept: see forward), as in the first order
                if need_x:
                    raise RuntimeError(
                        "multi_lora_linear: a create_graph=True backward with lora_b and x requiring gradients but "
                        "lora_a and the weight frozen needs x to differentiate dB = s·dYᵀ·(x·Aᵀ) with respect to x, "
                        "and the forward did not keep x (it keeps x [M, K] only for the gradients of lora_a and the "
                        "weight, as PEFT's layer does with lora_A frozen); run that forward with "
                        "lora_a.requires_grad_(True) (and leave its gradient unused)")
                lora_a, shrunk = None, s
            elif x2 is None and need_x:
                # dX of the term, linear in x: the same from any x (zeros), differentiable in dY and the slots
                x2 = dy.new_zeros(dy.shape[0], lora_a.shape[2]).requires_grad_(True)
            wanted = ((x2, need_x), (grad_a_like, need_a), (grad_b_like, need_b))
            inputs = [t for t, need in wanted if need]
            grads = iter(())
            if inputs:  # the term (L·M·R·(K+N) work) only for gradients of it: not for the weight or bias alone
                term = _multi_lora_term(x2, lora_a, lora_b, batch.adapter_ids, scalings, ranks, shrunk)
                grads = iter(torch.autograd.grad(term, inputs, dy, create_graph=True, allow_unused=True,
                                                 materialize_grads=True))
            dx, d_lora_a, d_lora_b = (next(grads) if need else None for _, need in wanted)
            if need_x:
                dx = dy @ weight + dx
            return (dx, dy.T @ x2 if need_w else None, dy.sum(0) if need_bias else None, d_lora_a, d_lora_b,
                    None, None, None, None)
        dy = dy.contiguous()
        dx = d_weight = d_bias = d_lora_a = d_lora_b = None
        widen = _cpu_widens(backend, dy)  # the base GEMMs in fp32 (see _cpu_widens)
        if need_x or need_a:
            # u[t] = scalings[i] * B_i[:, :r]^T dy[t]: the shrink with B^T as the "A" of each slot.
            if backend == "torch" and dy.dtype == torch.float16:
                # Its shrink rounds the fp16 product dY·B before scaling it: inf where that passes 65504 and s·dY·B
                # does not. PEFT's order instead (see _scaled_dy_products): a token's dY scaled first by its slot's
                # scaling of at most 1 (computed in fp32, rounded once), larger ones after the product.
                scale_first = scalings.abs() <= 1.0
                token_first = per_token(torch.where(scale_first, scalings, 1.0), batch)
                scaled_dy = torch.mul(dy, token_first[:, None], out=torch.empty_like(dy))
                u = ops.run_shrink(backend, scaled_dy, lora_b.transpose(1, 2), batch,
                                   torch.where(scale_first, 1.0, scalings), ranks)
            else:
                u = ops.run_shrink(backend, dy, lora_b.transpose(1, 2), batch, scalings, ranks)
            if need_x:
                dx = _fp32_mm(dy, weight).to(dy.dtype) if widen else dy @ weight
                ops.run_expand(backend, u, lora_a.transpose(1, 2), batch, ranks, dx)
            if need_a:
                d_lora_a = _segment_outer_sum(batch, ranks, backend, u, x2).to(grad_a_like.dtype)
        if need_b:
            d_lora_b = _segment_outer_sum(batch, ranks, backend, s, dy, scalings).transpose(1, 2).to(
                grad_b_like.dtype)
        if need_w:
            d_weight = _fp32_mm(dy.T, x2).to(dy.dtype) if widen else dy.T @ x2
        if need_bias:
            d_bias = dy.sum(0)
        return dx, d_weight, d_bias, d_lora_a, d_lora_b, None, None, None, None


# A subclass weight (is_subclass_weight) in the grouped ops: the base GEMM is its own F.linear and the kernels read only
# x and the adapters; the reference computes the base in float64, which a quantized weight does not convert to.
MULTI_SUBCLASS_WEIGHT_USE = "another backend (or 'auto')"


def _multi_lora_args_ok(x, weight, lora_a, lora_b, bias, factor_dtype):
    """True only when every check of _check_multi_lora_args passes, for plain tensors, tested in few Python
    operations as _lora_linear_args_ok tests lora_linear's (the full checks: ~9 µs a layer and call, helper 289).
    Other types (a DTensor, a quantized weight) are for the full checks to judge."""
    plain, dtype, device, strided = (torch.Tensor, torch.nn.Parameter), x.dtype, x.device, torch.strided
    factors = () if lora_a is None else (lora_a, lora_b)
    if not (type(x) in plain and type(weight) in plain and all(type(t) in plain for t in factors)
            and (bias is None or type(bias) in plain)):
        return False
    factor_dtype = factor_dtype or dtype
    if (dtype not in ops.FLOAT_DTYPES or x.dim() < 1 or x.layout != strided
            or weight.dtype != dtype or weight.device != device or weight.dim() != 2 or weight.layout != strided
            or any(t.dtype != factor_dtype or t.device != device or t.dim() != 3 or t.layout != strided
                   for t in factors)):
        return False
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features or factors and (
            lora_a.shape[0] == 0 or lora_a.shape[2] != in_features
            or tuple(lora_b.shape) != (lora_a.shape[0], out_features, lora_a.shape[1])):
        return False
    return bias is None or (bias.dtype == dtype and bias.device == device and bias.dim() == 1
                            and bias.shape[0] == out_features and bias.layout == strided)


def _check_multi_lora_args(op, x, weight, lora_a, lora_b, bias, factor_dtype=None):
    """multi_lora_linear's checks of its tensors (after autocast's casts); lora_a and lora_b None: x, weight and
    bias only (multi_lora_base_linear). factor_dtype: as check_lora_linear_args'."""
    if isinstance(x, torch.Tensor) and _multi_lora_args_ok(x, weight, lora_a, lora_b, bias, factor_dtype):
        return
    for name, t, ndim in (("x", x, None), ("weight", weight, 2), ("lora_a", lora_a, 3), ("lora_b", lora_b, 3)):
        _check_tensor(op, name, t, ndim=ndim, optional=name.startswith("lora_") and lora_a is None)
    _check_tensor(op, "bias", bias, ndim=1, optional=True)
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        ops.refuse_dtensor(op, name, t)  # lora_linear takes DTensors; the grouped ops' token indexing does not
    # K is weight's, as lora_linear takes it: a wrong x or lora_a is named, not the two that agree
    out_features, in_features = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{op}: x expected shape [..., {in_features}] (K of weight {tuple(weight.shape)} = [N, K]), "
                         f"got {tuple(x.shape)}")
    if lora_a is not None and (lora_a.shape[2] != in_features or lora_a.shape[0] == 0):
        raise ValueError(f"{op}: lora_a expected shape [L >= 1, R, {in_features}] (K of weight {tuple(weight.shape)}), "
                         f"got {tuple(lora_a.shape)}")
    if lora_a is not None and tuple(lora_b.shape) != (lora_a.shape[0], out_features, lora_a.shape[1]):
        raise ValueError(f"{op}: lora_b expected shape [{lora_a.shape[0]}, {out_features}, {lora_a.shape[1]}] "
                         f"([L, N, R]), got {tuple(lora_b.shape)}")
    _check_bias_and_like_x(op, x, weight, lora_a, lora_b, bias, out_features, factor_dtype)


def multi_lora_base_linear(x, weight, bias=None, *, backend="auto"):
    """multi_lora_linear's y for a batch in which no token has an adapter, known on the host (MultiLoRALinear under
    set_batch_adapters with every row "__base__"): the same checks of x, weight and bias, autocast and base GEMM
    (fp32 on the cpu backend past decode size, see _cpu_widens), without the grouped ops. x: [..., K]; weight:
    [N, K]; bias: [N] or None."""
    op = "multi_lora_linear"
    autocast_dtype = _autocast_dtype(x)
    if autocast_dtype is not None:
        x, weight, bias = _cast_for_autocast(autocast_dtype, (x, weight, bias))
    _check_multi_lora_args(op, x, weight, None, None, bias)
    backend = resolve_backend(backend, x.device, op, x.dtype)
    if backend == "reference" and is_subclass_weight(weight):
        refuse_subclass_weight_backend(op, backend, weight, MULTI_SUBCLASS_WEIGHT_USE)
    if backend == "triton":
        ops.check_triton_args(op, x.dtype, 1)
    x2 = ops.as_rows(x)
    if backend == "reference":
        y = torch.nn.functional.linear(x2.double(), weight.double(), None if bias is None else bias.double())
        y = y.to(x.dtype)
    else:
        y = _multi_lora_base(x2, weight, bias, backend)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def multi_lora_linear(x, weight, lora_a, lora_b, adapter_ids, scalings, bias=None, *, ranks=None, backend="auto"):
    """y[t] = x[t] @ weight.T + bias + scalings[i] * lora_b[i, :, :r_i] @ (lora_a[i, :r_i] @ x[t]), i = adapter_ids[t]
    (-1: base only; r_i = ranks[i], default R).

    x: [..., K]; weight: [N, K]; lora_a: [L, R, K]; lora_b: [L, N, R]; adapter_ids: integer tensor shaped like
    x.shape[:-1], or a LoRABatch already built for these tokens (reuse one per step across layers); scalings: [L];
    bias: [N] or None; ranks: [L] ints or None (every slot at R). Differentiable in x, lora_a and lora_b (several
    adapters trained in one batch), and in weight and bias when they require grad; not in scalings (refused when
    they require grad). Under torch.autocast, computed in the autocast dtype, like F.linear (scalings stay
    float32). float64 runs a torch composition, float64 throughout but slot by slot (L·M·R·(K+N) work): the
    kernels' shrink results are float32.
    A weight that is a tensor subclass (is_subclass_weight: torchao's quantized weights) computes its own F.linear,
    on every backend but "reference"; with gradients, in that slot-by-slot composition (its dX is the subclass's).
    Saves x for the backward only when lora_a or weight requires grad, as lora_linear does (and raises as it does
    for a create_graph=True backward with x and lora_b requiring grad but lora_a and weight frozen, but on
    "reference" and in float64, whose torch compositions autograd differentiates whole, keeping x).
    """
    return _multi_lora_linear(x, weight, lora_a, lora_b, adapter_ids, scalings, bias, ranks, backend,
                              float32_factors=False)


def multi_lora_linear_float32_factors(x, weight, lora_a, lora_b, adapter_ids, scalings, bias, ranks, backend):
    """multi_lora_linear for a layer's own slots (MultiLoRALinear's adapter_dtype), as lora_linear_float32_factors:
    float32 slots of a 16-bit x are cast inside the autograd Function, which returns their gradients in float32;
    slots of another dtype are cast to x's up front."""
    return _multi_lora_linear(x, weight, lora_a, lora_b, adapter_ids, scalings, bias, ranks, backend,
                              float32_factors=True)


def _multi_lora_linear(x, weight, lora_a, lora_b, adapter_ids, scalings, bias, ranks, backend, float32_factors):
    op = "multi_lora_linear"
    x, weight, lora_a, lora_b, bias, factor_dtype = _operands_after_casts(x, weight, lora_a, lora_b, bias,
                                                                          float32_factors)
    _check_multi_lora_args(op, x, weight, lora_a, lora_b, bias, factor_dtype)
    num_slots, _, in_features = lora_a.shape
    out_features = weight.shape[0]
    lead_shape = x.shape[:-1]
    if isinstance(adapter_ids, LoRABatch):
        batch = adapter_ids
    else:
        if not isinstance(adapter_ids, torch.Tensor):
            raise TypeError(f"{op}: adapter_ids expected a torch.Tensor or LoRABatch, got {type(adapter_ids).__name__}")
        ops.refuse_dtensor(op, "adapter_ids", adapter_ids)
        # unbacked sizes (mark_unbacked on x and the ids) cannot be compared while compiling: recorded as equal,
        # as LoRABatch.check_tokens does
        if adapter_ids.dim() != len(lead_shape) or any(guard_or_false(a != b)
                                                       for a, b in zip(adapter_ids.shape, lead_shape)):
            raise ValueError(f"{op}: adapter_ids expected shape {tuple(lead_shape)} (x.shape[:-1]), "
                             f"got {tuple(adapter_ids.shape)}")
        if torch.compiler.is_compiling():
            for a, b in zip(adapter_ids.shape, lead_shape):
                torch._check(a == b, lambda: "adapter_ids expected the shape x.shape[:-1]")
        if adapter_ids.device != x.device:
            raise ValueError(f"{op}: adapter_ids expected device {x.device} (same as x), got {adapter_ids.device}")
        batch = LoRABatch._for_op(op, adapter_ids, num_slots)
    backend = resolve_backend(backend, x.device, op, x.dtype, num_slots)
    subclass_weight = is_subclass_weight(weight)
    if backend == "reference" and subclass_weight:
        refuse_subclass_weight_backend(op, backend, weight, MULTI_SUBCLASS_WEIGHT_USE)
    if isinstance(scalings, torch.Tensor) and scalings.requires_grad and torch.is_grad_enabled():
        # Constants, as MultiLoRALinear's buffers: the kernels' Function and the reference returned no gradient for
        # them (silently None) while the float64 composition returned one.
        raise ValueError(f"{op}: scalings expected a tensor that does not require grad (they are not "
                         f"differentiable), got one that does; pass scalings.detach()")
    x2 = ops.as_rows(x)
    # float64 runs torch compositions (below) that read the scalings in float64: rounded to float32, as the
    # kernels read them, they left float64 outputs and gradients 3e-8 off for a scaling such as 1/3 or 16/3.
    scalings_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    scalings, ranks = ops.check_shrink_args(op, x2, lora_a, batch, scalings, ranks, scalings_dtype=scalings_dtype,
                                            lora_a_dtype=factor_dtype)
    if backend == "triton":
        ops.check_triton_args(op, x.dtype, num_slots)
    needs_grad = _needs_grad(x, weight, lora_a, lora_b, bias)
    composition = (_functorch_transforms_active() or _forward_ad_active() or x.dtype == torch.float64
                   or (needs_grad and subclass_weight))
    if factor_dtype is not None and (backend == "reference" or composition or not needs_grad):
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)  # differentiable, as MultiLoRALinear cast them before
    if backend == "reference":
        x64, weight64, bias64 = x2.double(), weight.double(), None if bias is None else bias.double()
        if not has_host_values(x2) or _functorch_transforms_active():
            # The reference's loop reads each token's slot on the host, which a traced graph cannot (a data-dependent
            # error under fullgraph=True), nor fake tensors, nor vmap over the ids (torch's ".item() on a Tensor"
            # error): the same float64 math in slot-masked torch ops, differentiated by autograd.
            y = torch.nn.functional.linear(x64, weight64, bias64) + _multi_lora_term(
                x64, lora_a.double(), lora_b.double(), batch.adapter_ids, scalings, ranks)
        else:
            y = reference.multi_lora_linear_autograd(x64, weight64, lora_a.double(), lora_b.double(),
                                                     batch.adapter_ids, scalings, bias64, ranks.cpu())
        return y.to(x.dtype).reshape(*lead_shape, out_features)
    if composition:
        # torch.func: see lora_linear. float64: the grouped ops' shrink results are float32 (lora_shrink's contract),
        # which left float64 outputs and gradients float32-accurate (gradcheck failed); this composition, which
        # autograd differentiates, keeps them float64 (and the scalings, as given). A subclass weight: see
        # lora_linear (its forward alone runs the grouped kernels, below).
        y = torch.nn.functional.linear(x2, weight, bias) + _multi_lora_term(x2, lora_a, lora_b, batch.adapter_ids,
                                                                            scalings, ranks)
    elif needs_grad:
        y = MultiLoRAFunction.apply(x2, weight, bias, lora_a, lora_b, batch, scalings, ranks, backend)
    else:  # nothing to differentiate (serving): skip the autograd Function's bookkeeping
        y = _multi_lora_forward(x2, weight, bias, lora_a, lora_b, batch, scalings, ranks, backend)[0]
    return y if x.dim() == 2 else y.reshape(*lead_shape, out_features)
