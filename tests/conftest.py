"""Shared test fixtures: the device fixture, the tolerance table (design.md §7) and the relative-error check.

Without a CUDA device the Triton interpreter is switched on here, before any lora_kernels kernel module is
imported, so the Triton kernels run on CPU tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# ‖out − ref‖ / ‖ref‖ in float64 (design.md §7). fp32 allows for tf32 on GPUs.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def installed_version(package):
    """(major, minor) of an installed distribution, read from its metadata without importing it; None when it is
    not installed. For the reference-library checks whose behaviour changed between the versions the test extra
    allows (peft >= 0.13, transformers >= 4.45)."""
    import importlib.metadata
    import re
    try:
        match = re.match(r"(\d+)\.(\d+)", importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        return None
    return (int(match[1]), int(match[2])) if match else None


def tiny_llama_config(**overrides):
    """A LlamaConfig small enough for CPU tests (vocabulary 128, 2 layers, hidden 64, GQA 4/2 heads), with
    `overrides`; transformers is imported here, so only the tests that use it need it."""
    import transformers
    options = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
    return transformers.LlamaConfig(**{**options, **overrides})


def backend_or_skip(backend, device):
    """Skips the test, naming why, when `backend` cannot run on `device` here."""
    from lora_kernels import backends  # after TRITON_INTERPRET is set above

    reason = backends.unavailable_reason(backend, device)
    if reason is not None:
        pytest.skip(f"{backend} on {device}: {reason}")


def rel_error(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64; inf when out holds NaN/Inf (so it never passes)."""
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    assert out64.shape == ref64.shape, f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}"
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


# fp32 on a machine without CUDA: there is no tf32 there, and every CPU path of an fp32 input (torch, the C++ cpu
# kernels, the Triton interpreter with its tf32x3 dots) is within ~4e-7 of the float64 reference at the test shapes.
# design.md §7's 1e-3 is the GPU's tf32 allowance; on a CPU it let fp32 inputs computed in fp16 (or tf32-rounded)
# precision pass. On a CUDA machine results are often moved .cpu() before the check, so the device cannot tell.
CPU_FP32_TOLERANCE = 1e-5


def tolerance(dtype, tf32=False):
    """The relative tolerance of dtype's results: design.md §7's; fp32 on a machine without CUDA CPU_FP32_TOLERANCE,
    unless tf32=True (a product the code rounds to tf32 on purpose, e.g. of 16-bit operands)."""
    if dtype == torch.float32 and not tf32 and not HAS_CUDA:
        return CPU_FP32_TOLERANCE
    return TOLERANCE[dtype]


def assert_close(out, ref, dtype, what="output", scale=1.0, tf32=False):
    """Relative error against the float64 reference within tolerance(dtype, tf32), times `scale` for results that
    pass through more roundings (e.g. gradients built from a rounded intermediate)."""
    err = rel_error(out, ref)
    tol = tolerance(dtype, tf32) * scale
    assert err <= tol, f"{what}: relative error {err:.3e} > tolerance {tol:.1e} ({dtype})"


# A 16-bit result's summed magnitude against the float64 reference's: each element's rounding averages out in the
# sum, a systematic error such as a scaling rounded to 16 bits does not (16/3 rounded to bf16 is 1.95e-3 off, to fp16
# 2.44e-4; dropout's 1/(1-p) at p = 0.1 stored in bf16 1.6e-3). At the tests' shapes, over 600 seeds of the
# single-adapter check and 200 of the grouped one, the torch backend came within 4.4e-4 (bf16) and 6.4e-5 (fp16), the
# cpu one within 2.0e-4 and 3.0e-5 (helper 169).
SUMMED_MAGNITUDE_TOLERANCE = {torch.bfloat16: 1e-3, torch.float16: 1.5e-4}


def assert_summed_magnitude(out, ref, dtype, what="output"):
    ratio = (out.detach().double().abs().sum().cpu() / ref.detach().double().abs().sum().cpu()).item()
    assert abs(ratio - 1.0) < SUMMED_MAGNITUDE_TOLERANCE[dtype], \
        f"{what}: summed magnitude {ratio:.6f} of the reference's"


def assert_same_non_finite(got, expected, dtype, what="output", scale=1.0):
    """NaN, +inf and -inf exactly where the reference has them, and the finite values within assert_close's
    tolerance: no NaN/Inf dropped (a GradScaler would miss the overflow) and none invented (it would skip a step)."""
    got, expected = got.detach().cpu(), expected.detach().cpu()
    for kind, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        mismatch = (test(got) != test(expected)).nonzero().tolist()
        assert not mismatch, f"{what}: {kind} differs from the reference at {mismatch[:4]}"
    finite = torch.isfinite(expected)
    if finite.any():
        assert_close(got[finite], expected[finite], dtype, f"{what} (finite entries)", scale=scale)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _triton_bounds_checked():
    """Under the interpreter every Triton launch checks that its loads, stores and atomics stay inside its tensor
    arguments (tests/triton_bounds.py): the interpreter would read past a tensor's end silently, a GPU would not."""
    from lora_kernels.triton import HAS_TRITON, INTERPRET
    if not (HAS_TRITON and INTERPRET):
        yield
        return
    from triton_bounds import bounds_checked
    with bounds_checked():
        yield


def assert_fake_step_like_the_real_one(step):
    """Runs step() (building its inputs, returning tensors) for real, then under FakeTensorMode (a memory estimator's
    run): the same outputs, fake, of the same shapes, dtypes and devices."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    real = step()
    with FakeTensorMode():
        fake = step()
    assert len(fake) == len(real)
    for got, want in zip(fake, real):
        assert isinstance(got, FakeTensor)
        assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, want.device)


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    """Fresh random values (never zeros), generated in float32 then cast, so every dtype sees the same numbers."""
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def lora_inputs(m, k, n, r, dtype=torch.float32, device="cpu", bias=True):
    """x [m, k], weight [n, k], lora_a [r, k], lora_b [n, r] (scaled so outputs stay O(1)) and bias [n] or None."""
    x = randn(m, k, dtype=dtype, device=device)
    weight = randn(n, k, dtype=dtype, device=device, scale=k ** -0.5)
    lora_a = randn(r, k, dtype=dtype, device=device, scale=k ** -0.5)
    lora_b = randn(n, r, dtype=dtype, device=device, scale=r ** -0.5)
    b = randn(n, dtype=dtype, device=device) if bias else None
    return x, weight, lora_a, lora_b, b


class QuantizedWeight(torch.Tensor):
    """A weight-only int8 tensor subclass in the manner of torchao's (quantize_(model, Int8WeightOnlyConfig()) puts
    one in an nn.Linear's .weight; torchao is not a test dependency): int8 values and a scale per row, F.linear on
    the weight dequantized in x's dtype, as torchao's Int8Tensor computes it (differentiable in x), and no other op,
    so a kernel, a merge or the reference that reads it raises as torchao's subclasses do ("... dispatch: attempting
    to run unimplemented operator")."""

    @staticmethod
    def __new__(cls, qdata, scale, dtype):
        return torch.Tensor._make_wrapper_subclass(cls, qdata.shape, dtype=dtype, device=qdata.device)

    def __init__(self, qdata, scale, dtype):
        self.qdata, self.scale = qdata, scale

    @classmethod
    def quantize(cls, weight):
        scale = weight.detach().abs().amax(dim=1).clamp(min=1e-12) / 127
        return cls(torch.round(weight.detach() / scale[:, None]).to(torch.int8), scale, weight.dtype)

    def dequantize(self, dtype=None):
        dtype = dtype or self.dtype
        return self.qdata.to(dtype) * self.scale[:, None].to(dtype)

    def __tensor_flatten__(self):
        return ["qdata", "scale"], self.dtype

    @classmethod
    def __tensor_unflatten__(cls, inner, dtype, outer_size, outer_stride):
        return cls(inner["qdata"], inner["scale"], dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            # as torchao's Int8Tensor: the product in x's dtype, then the bias added whatever its dtype (a bfloat16
            # layer's bias with float32 inputs), in x's dtype again
            x, weight, *rest = args
            bias = rest[0] if rest else (kwargs or {}).get("bias")
            y = torch.nn.functional.linear(x, weight.dequantize(x.dtype))
            return y if bias is None else (y + bias).to(x.dtype)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):  # nn.Parameter(...) detaches
            return cls(args[0].qdata, args[0].scale, args[0].dtype)
        raise NotImplementedError(f"QuantizedWeight dispatch: attempting to run unimplemented operator {func}")


def quantized_linear(in_features, out_features, dtype=torch.float32):
    """An nn.Linear whose weight is a QuantizedWeight (frozen, as torchao leaves it), and the same layer with the
    dequantized weight as a plain Parameter: what its outputs and gradients are compared with."""
    plain = torch.nn.Linear(in_features, out_features, dtype=dtype)
    quantized = torch.nn.Linear(in_features, out_features, dtype=dtype)
    with torch.no_grad():
        quantized.weight = torch.nn.Parameter(QuantizedWeight.quantize(plain.weight), requires_grad=False)
        plain.weight.copy_(quantized.weight.dequantize())
        quantized.bias.copy_(plain.bias)
    return quantized, plain
