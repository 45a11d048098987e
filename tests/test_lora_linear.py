"""lora_linear on every backend available here against the float64 reference: forward, every gradient, dtypes,
odd shapes, ranks 1..512, bias, leading dims, non-contiguous input, dropout, bad input, torch.compile."""

import re
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import (DTYPES, assert_close, assert_fake_step_like_the_real_one, assert_same_non_finite,
                      assert_summed_magnitude, backend_or_skip, lora_inputs, quantized_linear, randn)
from lora_kernels import backends, bench, functional, reference
from lora_kernels.functional import lora_linear

# (M, K, N, r): odd sizes and the whole rank range, kept tiny for the Triton interpreter.
SHAPES = [(5, 67, 33, 1), (17, 32, 48, 8), (3, 40, 24, 16), (9, 24, 19, 64), (2, 16, 20, 256), (3, 24, 20, 512)]
KERNEL_BACKENDS = ["torch", "cpu", "cuda", "triton"]


def _dropout_mask(backend, seed, x2, p):
    """The mask the backend generates for `seed`, so the reference can apply the same one."""
    if backend == "triton":
        from lora_kernels.triton.lora_linear import dropout_mask
        return dropout_mask(seed, x2.shape[0], x2.shape[1], p, x2.device)
    # Drawn in x's dtype, as the backend draws it: the random stream depends on the dtype (on CUDA).
    return functional.torch_dropout_keep(seed, x2, p).double() / (1.0 - p)


def _run(backend, x, weight, lora_a, lora_b, bias, scaling, dy, dropout_p=0.0):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
    bias_leaf = None if bias is None else bias.detach().clone().requires_grad_(True)
    y = lora_linear(leaves[0], weight, leaves[1], leaves[2], scaling, bias_leaf, dropout_p=dropout_p, backend=backend)
    y.backward(dy)
    grads = {"x": leaves[0].grad, "lora_a": leaves[1].grad, "lora_b": leaves[2].grad}
    if bias_leaf is not None:
        grads["bias"] = bias_leaf.grad
    return y, grads


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}-r{}".format(*s))
def test_forward_and_gradients_match_reference(backend, dtype, shape, device):
    backend_or_skip(backend, device)
    m, k, n, r = shape
    x, weight, lora_a, lora_b, bias = lora_inputs(m, k, n, r, dtype, device, bias=r != 8)
    scaling = 1.5
    dy = randn(m, n, dtype=dtype, device=device)
    y, grads = _run(backend, x, weight, lora_a, lora_b, bias, scaling, dy)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close(y, reference.lora_linear(x, weight, lora_a, lora_b, scaling, bias), dtype, "y")
    expected = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, scaling)
    for name, grad in grads.items():
        assert grad.dtype == dtype, name
        # Gradients pass through one more rounding (S or dS in the input dtype) than the forward.
        assert_close(grad, expected[name], dtype, f"d{name}", scale=2.0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scaling", [0.5, -0.25])
def test_gradients_match_the_reference_at_a_scaling_of_at_most_one(backend, dtype, scaling, device):
    """The test above runs scaling = 1.5 only, so the torch backend's fp16 branch for |scaling| <= 1 (PEFT's order,
    dY scaled first: _scaled_dy_products), the one lora_alpha <= r takes, was never compared with the reference: a
    dB scaled twice there passed the whole suite (helper 159's mutation audit)."""
    backend_or_skip(backend, device)
    m, k, n, r = 37, 40, 33, 8
    x, weight, lora_a, lora_b, bias = lora_inputs(m, k, n, r, dtype, device)
    dy = randn(m, n, dtype=dtype, device=device)
    y, grads = _run(backend, x, weight, lora_a, lora_b, bias, scaling, dy)
    assert_close(y, reference.lora_linear(x, weight, lora_a, lora_b, scaling, bias), dtype, "y")
    expected = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, scaling)
    for name, grad in grads.items():
        assert_close(grad, expected[name], dtype, f"d{name}", scale=2.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, r", [(100, 16), (300, 16), (80, 64)], ids=["kernel", "gemms", "gemms-r64"])
def test_cuda_backward_either_side_of_the_kernel_bound(dtype, m, r, device):
    """The cuda backend's dY products come from its dY-once kernel up to M·r = CUDA_BWD_DY_KERNEL_MAX_WORK and from
    two GEMMs above: both sides against the reference. On CPU the autograd Function runs with backend 'cuda' on
    CPU tensors (the extension's CPU kernels stand in for the CUDA ones; the GEMM branch is the same code)."""
    if device.type == "cuda":
        backend_or_skip("cuda", device)
    elif not hasattr(torch.ops.lora_kernels, "lora_fwd"):
        pytest.skip("needs the C++ extension")
    k, n, scaling = 24, 40, 0.5
    x, weight, lora_a, lora_b, bias = lora_inputs(m, k, n, r, dtype, device)
    dy = randn(m, n, dtype=dtype, device=device)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
    y = functional.LoRALinearFunction.apply(leaves[0], weight, leaves[1], leaves[2], bias, scaling, 0.0, None, "cuda")
    y.backward(dy)
    expected = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, scaling)
    for name, leaf in zip(("x", "lora_a", "lora_b"), leaves):
        assert_close(leaf.grad, expected[name], dtype, f"d{name}", scale=2.0)
    assert (m * r > functional.CUDA_BWD_DY_KERNEL_MAX_WORK) == (m != 100)  # the cases sit on both sides


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bf16_rows_padded_with_nan_in_memory(backend, device):
    """x a column block of a wider bf16 buffer whose other columns hold NaN and Inf (a workspace from torch.empty):
    the output and gradients are the reference's, all finite. torch 2.14's oneDNN bf16 matmul on CPUs with
    AMX/AVX512-BF16 read the gap between such rows (M >= 17, K not a multiple of 16): the torch backend's forward,
    F.linear's, gave 128 of 136 outputs NaN (helper 117); multi_lora_linear's base GEMM too."""
    backend_or_skip(backend, device)
    dtype, m, k = torch.bfloat16, 17, 33
    workspace = torch.full((m, 40), float("nan"), dtype=dtype, device=device)
    workspace[:, 36:] = float("inf")
    _, weight, lora_a, lora_b, bias = lora_inputs(m, k, 8, 4, dtype, device)
    workspace[:, :k] = randn(m, k, dtype=dtype, device=device)
    x = workspace.requires_grad_(True)[:, :k]  # the view itself, as the layer gets it (a clone would be dense)
    lora_a.requires_grad_(True)
    lora_b.requires_grad_(True)
    dy = randn(m, 8, dtype=dtype, device=device)
    y = lora_linear(x, weight, lora_a, lora_b, 0.5, bias, backend=backend)
    grads = dict(zip(("x", "lora_a", "lora_b"), torch.autograd.grad(y, (x, lora_a, lora_b), dy)))
    assert_close(y, reference.lora_linear(x, weight, lora_a, lora_b, 0.5, bias), dtype, "y")
    expected = reference.lora_linear_backward(dy, x.detach(), weight, lora_a.detach(), lora_b.detach(), 0.5)
    for name in ("x", "lora_a", "lora_b"):
        assert_close(grads[name], expected[name], dtype, f"d{name}", scale=2.0)
    ids = torch.zeros(m, dtype=torch.long, device=device)
    multi = functional.multi_lora_linear(x, weight, lora_a[None], lora_b[None], ids, [0.5], bias, backend=backend)
    assert_close(multi, reference.lora_linear(x, weight, lora_a, lora_b, 0.5, bias), dtype, "multi_lora_linear y")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_leading_dims_and_non_contiguous_input(backend, device):
    backend_or_skip(backend, device)
    dtype = torch.float32
    x_wide, weight, lora_a, lora_b, bias = lora_inputs(12, 2 * 24, 20, 8, dtype, device)
    x = x_wide.reshape(2, 6, 48)[..., ::2]  # [2, 6, 24], stride 2 in the last dim
    weight, lora_a = weight[:, :24].contiguous(), lora_a[:, :24].contiguous()
    assert not x.is_contiguous()
    dy = randn(2, 6, 20, dtype=dtype, device=device)
    y, grads = _run(backend, x, weight, lora_a, lora_b, bias, 0.5, dy)
    assert y.shape == (2, 6, 20)
    assert_close(y, reference.lora_linear(x, weight, lora_a, lora_b, 0.5, bias), dtype, "y")
    expected = reference.lora_linear_backward(dy.reshape(12, 20), x.reshape(12, 24), weight, lora_a, lora_b, 0.5)
    assert_close(grads["x"].reshape(12, 24), expected["x"], dtype, "dx")
    assert_close(grads["lora_a"], expected["lora_a"], dtype, "dA")
    transposed = x_wide[:, :24].T.contiguous().T  # a column-major [12, 24] view
    assert_close(lora_linear(transposed, weight, lora_a, lora_b, 0.5, bias, backend=backend),
                 reference.lora_linear(transposed, weight, lora_a, lora_b, 0.5, bias), dtype, "y (column-major x)")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_empty_batch(backend, device):
    backend_or_skip(backend, device)
    x, weight, lora_a, lora_b, bias = lora_inputs(0, 16, 8, 4, torch.float32, device)
    x.requires_grad_(True)
    y = lora_linear(x, weight, lora_a, lora_b, 2.0, bias, backend=backend)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 16)


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
@pytest.mark.parametrize("lead", [(2, 3), (), (4,)], ids=["3-D", "1-D", "2-D"])
def test_zero_in_features_give_the_bias(backend, lead, device):
    """K = 0 (an empty feature dim): y is the bias, dB zero, on lora_linear and multi_lora_linear. x [..., 0] with
    leading dims other than one failed in x.reshape(-1, 0), which cannot infer M ("cannot reshape tensor of 0
    elements")."""
    backend_or_skip(backend, device)
    bias = randn(5, device=device)
    weight = torch.empty(5, 0, device=device)
    x = torch.empty(*lead, 0, device=device, requires_grad=True)
    lora_a, lora_b = torch.empty(2, 0, device=device), randn(5, 2, device=device).requires_grad_(True)
    y = lora_linear(x, weight, lora_a, lora_b, 0.5, bias, backend=backend)
    y.sum().backward()
    torch.testing.assert_close(y, bias.expand(*lead, 5))
    assert x.grad.shape == x.shape and torch.equal(lora_b.grad, torch.zeros_like(lora_b))
    ids = torch.zeros(lead, dtype=torch.long, device=device)
    y = functional.multi_lora_linear(x, weight, lora_a[None], lora_b.detach()[None], ids, [1.0], bias,
                                     backend=backend)
    torch.testing.assert_close(y, bias.expand(*lead, 5))


def test_a_fraction_scaling_is_taken_by_the_reference_backend_too():
    """A numbers.Real scaling that is not a float (fractions.Fraction) passes the checks; the other backends took it
    as float(scaling), the reference one failed on Fraction * Tensor."""
    import fractions
    x, weight, lora_a, lora_b, bias = lora_inputs(3, 5, 4, 2, torch.float32, "cpu")
    got = lora_linear(x, weight, lora_a, lora_b, fractions.Fraction(1, 2), bias, backend="reference")
    torch.testing.assert_close(got, lora_linear(x, weight, lora_a, lora_b, 0.5, bias, backend="reference"))


@pytest.mark.parametrize("training", [True, False], ids=["training", "no_grad"])
@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_float32_factors_of_a_bf16_layer_are_rounded_to_bf16_on_every_backend(backend, training, device):
    """A bf16 LoRALinear's float32 factors (autocast_adapter_dtype) are rounded to bf16 for the forward (README: "the
    forward casts them and runs the 16-bit kernels"), and the reference backend, the spec, computes with the same
    rounded factors, in float64. Its float64 product of the unrounded float32 factors is another result: here
    y = 256·A − 256 is 0 with A = 1 + 2⁻¹⁰ rounded to bf16 (1) and 0.25 with it unrounded. Training matters: the
    factors that require grad keep float32 up to the autograd Function, past which the reference backend's branch
    would see them."""
    backend_or_skip(backend, device)
    from lora_kernels.modules import LoRALinear
    layer = LoRALinear(1, 1, r=1, lora_alpha=1, bias=False, dtype=torch.bfloat16, device=device, backend=backend)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.scaling == 1.0
    with torch.no_grad():
        layer.weight.fill_(-256.0)
        layer.lora_A.weight.fill_(1 + 2 ** -10)  # bf16 keeps 8 significant bits: rounds to 1
        layer.lora_B.weight.fill_(256.0)
    with torch.set_grad_enabled(training):
        y = layer(torch.ones(1, 1, dtype=torch.bfloat16, device=device))
    assert y.requires_grad == training
    assert y.dtype == torch.bfloat16 and y.item() == 0.0, f"y = {y.item()}: the float32 factors were not rounded"
    if training:  # the rounded factors' gradients, in float32: dA = B·x = 256, dB = A·x = 1
        y.sum().backward()
        assert layer.lora_A.weight.grad.dtype == torch.float32
        assert (layer.lora_A.weight.grad.item(), layer.lora_B.weight.grad.item()) == (256.0, 1.0)


@pytest.mark.parametrize("backend", ["torch", "cpu", "cuda"])
def test_float64_keeps_float64_precision(backend, device):
    """float64 in, float64 precision out, gradients included: the C++ ops keep s, dB and dS in float64 for float64
    inputs (they stored them in float32, so gradients agreed to ~1e-7 only; gradcheck's tolerances let that pass)."""
    backend_or_skip(backend, device)
    x, weight, lora_a, lora_b, bias = lora_inputs(9, 40, 24, 8, torch.float64, device)
    dy = randn(9, 24, dtype=torch.float64, device=device)
    y, grads = _run(backend, x, weight, lora_a, lora_b, bias, 0.7, dy)
    assert_close(y, reference.lora_linear(x, weight, lora_a, lora_b, 0.7, bias), torch.float64, "y")
    expected = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, 0.7)
    for name in ("x", "lora_a", "lora_b"):
        assert_close(grads[name], expected[name], torch.float64, f"d{name}")


@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
def test_gradcheck_float64(backend):
    backend_or_skip(backend, "cpu")
    x, weight, lora_a, lora_b, bias = (t.double().requires_grad_(True) if t is not None else None
                                       for t in lora_inputs(3, 5, 4, 2, torch.float32, "cpu"))
    weight.requires_grad_(True)

    def fn(x, weight, lora_a, lora_b, bias):
        return lora_linear(x, weight, lora_a, lora_b, 0.7, bias, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, weight, lora_a, lora_b, bias))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_lora_gradients_equal_full_finetuning(backend, device):
    """dA and dB of the A/B-only path equal those of full fine-tuning (merged W + s·B·A, W trainable), and with
    weight.requires_grad the same function returns dW = dYᵀ·x."""
    backend_or_skip(backend, device)
    dtype = torch.float32
    x, weight, lora_a, lora_b, bias = lora_inputs(11, 24, 18, 8, dtype, device)
    dy = randn(11, 18, dtype=dtype, device=device)
    full = [t.double().requires_grad_(True) for t in (x, weight, lora_a, lora_b)]
    reference.full_finetune_linear(*full, 0.5, bias.double()).backward(dy.double())
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, lora_a, lora_b)]
    lora_linear(*leaves, 0.5, bias, backend=backend).backward(dy)
    for name, leaf, ref_leaf in zip(("x", "weight", "lora_a", "lora_b"), leaves, full):
        assert_close(leaf.grad, ref_leaf.grad, dtype, f"d{name}")


class _ProductShapes(TorchDispatchMode):
    """Records the output shape of every matrix product run inside it (not copies: the Triton interpreter copies the
    weight, an [N, K] tensor that is no gradient); PRODUCTS None: of every op."""

    PRODUCTS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm,
                torch.ops.aten.matmul, torch.ops.aten.linear}

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.PRODUCTS is None or func.overloadpacket in self.PRODUCTS:
            self.shapes += [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else (out,))
                            if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_frozen_weight_gets_no_weight_gradient_computed(backend, create_graph, device):
    """design.md §2: dW only when weight.requires_grad. This had been checked by `weight.grad is None`, which autograd
    guarantees for a leaf that needs no gradient whatever the backward computes: a backward forming dW = dYᵀ·x anyway
    (an M·N·K GEMM each step, the base layer's cost again) passed it (helper 159). Here no matrix product of the
    backward may produce an [N, K] tensor (M, K, N, r all distinct)."""
    backend_or_skip(backend, device)
    m, k, n, r = 11, 24, 18, 8
    x, weight, lora_a, lora_b, bias = lora_inputs(m, k, n, r, torch.float32, device)
    leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
    y = lora_linear(leaves[0], weight, leaves[1], leaves[2], 0.5, bias, backend=backend)
    with _ProductShapes() as products:
        grads = torch.autograd.grad(y, leaves, randn(m, n, device=device), create_graph=create_graph)
    assert [tuple(g.shape) for g in grads] == [(m, k), (r, k), (n, r)]
    assert (n, k) not in products.shapes, products.shapes
    assert products.shapes or backend == "triton"  # the mode saw the products (Triton: its own kernels)


class _SumShapes(_ProductShapes):
    """Records the output shape of every aten.sum run inside it (d(bias) is dY summed over the tokens)."""

    PRODUCTS = {torch.ops.aten.sum}


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_frozen_bias_gets_no_bias_gradient_computed(backend, create_graph, device):
    """design.md §2: d(bias) only when bias.requires_grad, as dW. LoRA fine-tuning freezes the base layer's bias, and
    a backward that summed dY over the tokens for it anyway (an [M, N] pass each layer and step) passed every
    gradient check: autograd drops a gradient returned for an input that needs none. Here the backward of a frozen
    bias runs no [N]-shaped sum, and that of a trained one does (so the mode sees the sum where it is made)."""
    backend_or_skip(backend, device)
    m, k, n, r = 11, 24, 18, 8  # all distinct: an [N] sum is the bias gradient
    x, weight, lora_a, lora_b, bias = lora_inputs(m, k, n, r, torch.float32, device)
    dy = randn(m, n, device=device)
    for bias_trained in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
        bias_leaf = bias.clone().requires_grad_(bias_trained)
        y = lora_linear(leaves[0], weight, leaves[1], leaves[2], 0.5, bias_leaf, backend=backend)
        with _SumShapes() as sums:
            grads = torch.autograd.grad(y, leaves + [bias_leaf] * bias_trained, dy, create_graph=create_graph)
        assert len(grads) == 3 + bias_trained
        assert ((n,) in sums.shapes) == bias_trained, f"bias trained: {bias_trained}, sums: {sums.shapes}"


class _OutputShapes(_ProductShapes):
    """Records the output shape of every op run inside it, allocations and the C++ ops included."""

    PRODUCTS = None


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("trained", ["weight", "bias"])
def test_a_frozen_adapter_gets_no_lora_gradient_computed(backend, trained, create_graph, device):
    """The base weight or bias trained with x and the adapter frozen (a base fine-tune beside a frozen adapter, or a
    gradient penalty on the base): the backward forms neither dS = s·dY·B [M, r] nor dB [N, r], a read of dY [M, N]
    and 2·M·N·r of work for gradients autograd would drop (every gradient check passed with them). With lora_b
    trained as well, dB is formed (so the mode sees it where it is made). M, K, N, r all distinct."""
    backend_or_skip(backend, device)
    m, k, n, r = 11, 24, 18, 8
    x, weight, lora_a, lora_b, bias = lora_inputs(m, k, n, r, torch.float32, device)
    dy = randn(m, n, device=device)
    for lora_b_trained in (False, True):
        base = {"weight": weight, "bias": bias}
        base[trained] = base[trained].clone().requires_grad_(True)
        b_leaf = lora_b.clone().requires_grad_(lora_b_trained)
        y = lora_linear(x, base["weight"], lora_a, b_leaf, 0.5, base["bias"], backend=backend)
        with _OutputShapes() as outputs:
            grads = torch.autograd.grad(y, [base[trained]] + [b_leaf] * lora_b_trained, dy,
                                        create_graph=create_graph)
        assert [tuple(g.shape) for g in grads] == [tuple(base[trained].shape)] + [(n, r)] * lora_b_trained
        if lora_b_trained:
            assert (n, r) in outputs.shapes, outputs.shapes
        else:
            assert not {(n, r), (m, r)} & set(outputs.shapes), outputs.shapes


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("trained", ["x", "weight", "lora_a", "lora_b", "bias"])
def test_each_gradient_when_only_its_input_needs_one(backend, trained, device):
    """One input requiring grad at a time (the base weight or bias fine-tuned with the adapter frozen, the factors
    alone, x alone): that input gets full fine-tuning's gradient and the others none."""
    backend_or_skip(backend, device)
    names = ("x", "weight", "lora_a", "lora_b", "bias")
    inputs = dict(zip(names, lora_inputs(11, 24, 18, 8, torch.float32, device)))
    dy = randn(11, 18, device=device)
    full = {name: t.double().requires_grad_(name == trained) for name, t in inputs.items()}
    reference.full_finetune_linear(*(full[name] for name in names[:4]), -0.5, full["bias"]).backward(dy.double())
    leaves = {name: t.clone().requires_grad_(name == trained) for name, t in inputs.items()}
    lora_linear(*(leaves[name] for name in names[:4]), -0.5, leaves["bias"], backend=backend).backward(dy)
    for name, leaf in leaves.items():
        if name == trained:
            assert_close(leaf.grad, full[name].grad, torch.float32, f"d{name}")
        else:
            assert leaf.grad is None, name


def _saved_sizes(fn):
    """The shapes of the tensors autograd saves for backward while fn() runs (parameters included)."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["no_dropout", "dropout"])
def test_x_and_s_are_saved_only_for_the_gradients_that_read_them(backend, dropout_p, device):
    """x [M, K] is read only by dA and dW: with lora_a and the weight frozen (PEFT's LoRA-FA freezes lora_A; an
    adapter frozen while the layers below train) the backward needs S for dB and dY for dX, and PEFT's unfused
    layer then keeps only S. x was saved for every backward (an [M, K] activation per layer PEFT does not keep, and
    an x made under torch.inference_mode could not be saved at all). S [M, r] is read only by dB: with lora_b
    frozen PEFT's layer keeps nothing for its LoRA branch, and S was saved all the same (helper 296). The gradients
    are the reference's, with the forward's dropout mask regenerated without x. M, K, N, r all distinct."""
    backend_or_skip(backend, device)
    m, k, n, r = 11, 24, 18, 8
    x, weight, lora_a, lora_b, bias = lora_inputs(m, k, n, r, torch.float32, device)
    dy = randn(m, n, device=device)
    for trained in (("x", "lora_b"), ("lora_b",), ("x",), ("x", "lora_a", "lora_b"), ("lora_b", "weight"),
                    ("x", "lora_a"), ("lora_a",), ("x", "weight")):
        leaves = {name: t.clone().requires_grad_(name in trained)
                  for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b))}
        torch.manual_seed(5)
        seed = functional.new_seed()
        torch.manual_seed(5)
        outputs = []
        saved = _saved_sizes(lambda: outputs.append(
            lora_linear(*leaves.values(), 0.5, bias, dropout_p=dropout_p, backend=backend)))
        x_read = "lora_a" in trained or "weight" in trained
        assert ((m, k) in saved) == x_read, (trained, saved)
        assert ((m, r) in saved) == ("lora_b" in trained), (trained, saved)
        grads = torch.autograd.grad(outputs[0], [leaves[name] for name in trained], dy)
        mask = _dropout_mask(backend, seed, x, dropout_p) if dropout_p else None
        full = {name: t.double().requires_grad_(name in trained)
                for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b))}
        expected = torch.autograd.grad(reference.lora_linear(*full.values(), 0.5, bias, mask),
                                       [full[name] for name in trained], dy.double())
        for name, got, want in zip(trained, grads, expected):
            assert_close(got, want, torch.float32, f"d{name} (trained: {trained})")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_an_inference_mode_input_trains_a_frozen_a_adapter(backend, device):
    """Features computed under torch.inference_mode (a frozen backbone) into a layer whose lora_b alone trains: PEFT's
    layer trains it, and lora_linear failed with "Inference tensors cannot be saved for backward" (it saved x)."""
    backend_or_skip(backend, device)
    x, weight, lora_a, lora_b, bias = lora_inputs(7, 24, 18, 8, torch.float32, device)
    with torch.inference_mode():
        features = x.clone()
    b_leaf = lora_b.clone().requires_grad_(True)
    dy = randn(7, 18, device=device)
    d_lora_b, = torch.autograd.grad(lora_linear(features, weight, lora_a, b_leaf, 0.5, bias, backend=backend), b_leaf,
                                    dy)
    b_ref = lora_b.double().requires_grad_(True)
    expected, = torch.autograd.grad(reference.lora_linear(x.double(), weight, lora_a, b_ref, 0.5, bias), b_ref,
                                    dy.double())
    assert_close(d_lora_b, expected, torch.float32, "dlora_b")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_double_backward_through_x_with_lora_a_frozen_is_refused(backend, device):
    """create_graph=True with x and lora_b trained and lora_a frozen: dB = s·dYᵀ·(x·Aᵀ) must be differentiated with
    respect to x, which the forward no longer keeps there (test_x_is_saved_only_for_the_gradients_that_read_it): a
    RuntimeError naming the way out, not a dB whose derivative in x is silently missing. With lora_a trained it runs."""
    backend_or_skip(backend, device)
    x, weight, lora_a, lora_b, bias = lora_inputs(6, 16, 12, 4, torch.float32, device)
    x_leaf, b_leaf = x.clone().requires_grad_(True), lora_b.clone().requires_grad_(True)
    y = lora_linear(x_leaf, weight, lora_a, b_leaf, 1.5, bias, backend=backend)
    with pytest.raises(RuntimeError, match=r"create_graph=True .* lora_a\.requires_grad_\(True\)"):
        torch.autograd.grad(y, [x_leaf, b_leaf], torch.ones_like(y), create_graph=True)
    a_leaf = lora_a.clone().requires_grad_(True)
    y = lora_linear(x_leaf, weight, a_leaf, b_leaf, 1.5, bias, backend=backend)
    grads = torch.autograd.grad(y, [x_leaf, b_leaf], torch.ones_like(y), create_graph=True)
    assert all(g.requires_grad for g in grads)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout(backend, device):
    backend_or_skip(backend, device)
    dtype, p, scaling = torch.float32, 0.25, 1.0
    x, weight, lora_a, lora_b, bias = lora_inputs(24, 32, 16, 8, dtype, device)
    dy = randn(24, 16, dtype=dtype, device=device)
    # p = 0 is exactly no dropout.
    assert torch.equal(lora_linear(x, weight, lora_a, lora_b, scaling, bias, dropout_p=0.0, backend=backend),
                       lora_linear(x, weight, lora_a, lora_b, scaling, bias, backend=backend))
    # Reproducible under torch.manual_seed; the backward uses the forward's mask.
    torch.manual_seed(1234)
    y1, grads = _run(backend, x, weight, lora_a, lora_b, bias, scaling, dy, dropout_p=p)
    torch.manual_seed(1234)
    y2 = lora_linear(x, weight, lora_a, lora_b, scaling, bias, dropout_p=p, backend=backend)
    assert torch.equal(y1, y2)
    torch.manual_seed(1234)
    mask = _dropout_mask(backend, functional.new_seed(), x, p)
    dropped = (mask == 0).double().mean().item()
    assert 0.1 < dropped < 0.4, f"dropped fraction {dropped} for p={p}"
    assert_close(y1, reference.lora_linear(x, weight, lora_a, lora_b, scaling, bias, mask), dtype, "y (dropout)")
    expected = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, scaling, mask)
    for name in ("x", "lora_a", "lora_b"):
        assert_close(grads[name], expected[name], dtype, f"d{name} (dropout)")
    torch.manual_seed(99)
    y3 = lora_linear(x, weight, lora_a, lora_b, scaling, bias, dropout_p=p, backend=backend)
    assert not torch.equal(y1, y3), "another seed must give another mask"


def _kept(backend, device, m, k, p, seed):
    torch.manual_seed(seed)
    return _dropout_mask(backend, functional.new_seed(), torch.empty(m, k, device=device), p) > 0


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout_drops_a_fraction_p(backend, device):
    """The dropped fraction is p within 5 standard deviations (8192 draws): test_dropout's bounds (0.1 to 0.4 at
    p = 0.25) let a keep probability of 1 - p/2 through (helper 127's mutant)."""
    backend_or_skip(backend, device)
    for p in (0.1, 0.25, 0.5):
        dropped = 1.0 - _kept(backend, device, 64, 128, p, 5).double().mean().item()
        assert abs(dropped - p) < 0.025, f"dropped fraction {dropped} for p={p}"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout_masks_of_different_tokens_are_independent(backend, device):
    """No token's mask is a neighbour's shifted by s < K (a random-offset layout m*B + k with B < K makes token m+1's
    mask token m's shifted by B, exactly: the rate and the values stay right, so no other test saw it; B = 0 gives
    every token one mask). Independent Bernoulli draws agree on p² + (1-p)² = 58% of the elements here."""
    backend_or_skip(backend, device)
    m, k, p = 64, 96, 0.3
    kept = _kept(backend, device, m, k, p, 11).cpu()
    for shift in range(k):
        for later, earlier in ((kept[1:, shift:], kept[:-1, :k - shift]), (kept[1:, :k - shift], kept[:-1, shift:])):
            agree = (later == earlier).double().mean().item()
            assert agree < 0.9, f"token m+1's mask is token m's shifted by ±{shift} ({agree:.2f} of it agrees)"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dropout_scale_is_rounded_once(dtype, device):
    """The non-Triton backends scale kept elements by 1/(1-p) in float math, rounding once, as torch's fused dropout
    does on a GPU and the Triton kernels do: a multiplier stored in bf16 (1/0.9 -> 1.109375) shrank the LoRA
    branch by 0.16%."""
    p = 0.1
    x = randn(64, 48, dtype=dtype, device=device)
    keep = functional.torch_dropout_keep(functional.new_seed(), x, p)
    assert keep.dtype == dtype and set(keep.unique().tolist()) == {0.0, 1.0}
    dropped = functional.apply_dropout(x, keep, p)
    assert torch.equal(dropped, (x.float() * keep.float() * (1.0 / (1.0 - p))).to(dtype))
    kept = (x.double() * keep.double()).abs().sum()
    assert abs(dropped.double().abs().sum() / kept * (1.0 - p) - 1.0) < 5e-4


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
@pytest.mark.parametrize("path", ["autograd", "create_graph", "torch_func"])
def test_fp16_dropout_stays_finite_where_only_x_over_keep_overflows(backend, path, device):
    """x = 40000 at p = 0.5: x/(1-p) passes fp16's 65504 while S, y and every gradient of the reference are small.
    The fused backends apply 1/(1-p) to the fp32 S (and to x widened first in the backward), so everything stays
    finite, also with lora_b zeros (PEFT's initialisation), where an inf in S makes y NaN (inf·0). The cpu backend
    formed x/(1-p) in fp16 (y and dA NaN), and so did every backend's create_graph and torch.func composition. The
    torch backend, PEFT's composition, rounds drop(x) to fp16 as PEFT's dropout does."""
    backend_or_skip(backend, device)
    dtype, p, scaling = torch.float16, 0.5, 2.0
    x = randn(6, 16, dtype=dtype, device=device)
    x[:, 3:7] = 40000.0
    weight = randn(8, 16, dtype=dtype, device=device, scale=1e-3)
    lora_a = randn(4, 16, dtype=dtype, device=device, scale=1e-3)
    lora_b = torch.zeros(8, 4, dtype=dtype, device=device)
    dy = randn(6, 8, dtype=dtype, device=device)
    leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
    torch.manual_seed(11)
    if path == "torch_func":
        y, pullback = torch.func.vjp(
            lambda *ts: lora_linear(ts[0], weight, ts[1], ts[2], scaling, dropout_p=p, backend=backend), *leaves)
        grads = pullback(dy)
    else:
        y = lora_linear(leaves[0], weight, leaves[1], leaves[2], scaling, dropout_p=p, backend=backend)
        grads = torch.autograd.grad(y, leaves, dy, create_graph=path == "create_graph")
    torch.manual_seed(11)
    mask = _dropout_mask(backend, functional.new_seed(), x, p)
    assert (x.double() * mask.to(x.device)).abs().max() > torch.finfo(dtype).max  # x/(1-p) overflows fp16
    assert_close(y, reference.lora_linear(x, weight, lora_a, lora_b, scaling, None, mask), dtype, "y")
    expected = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, scaling, mask)
    for name, grad in zip(("x", "lora_a", "lora_b"), grads):
        assert torch.isfinite(grad).all(), f"d{name}"
        assert_close(grad, expected[name], dtype, f"d{name}", scale=2.0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout_leaves_the_lora_branch_unbiased_in_bf16(backend, device):
    """With the base weight zero, y, dX and dA are the LoRA branch alone: their size matches the float64 reference
    on the same mask summed over every element (a 1/(1-p) stored in bf16 made them 0.16% small)."""
    backend_or_skip(backend, device)
    if backend == "triton" and device.type == "cpu":
        # the interpreter of triton 3.7 and 3.8 truncates fp32 -> bf16 casts (0.29% small on average); GPUs round to
        # nearest
        pytest.skip("the Triton interpreter truncates bf16 casts; this bias check runs on a GPU")
    p, dtype, scaling = 0.1, torch.bfloat16, 0.5
    x, _, lora_a, lora_b, _ = lora_inputs(128, 64, 48, 8, dtype, device, bias=False)
    weight = torch.zeros(48, 64, dtype=dtype, device=device)
    dy = randn(128, 48, dtype=dtype, device=device)
    torch.manual_seed(5)
    y, grads = _run(backend, x, weight, lora_a, lora_b, None, scaling, dy, dropout_p=p)
    torch.manual_seed(5)
    mask = _dropout_mask(backend, functional.new_seed(), x, p)
    expected = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, scaling, mask)
    expected["y"] = reference.lora_linear(x, weight, lora_a, lora_b, scaling, None, mask)
    for name, out in (("y", y), ("x", grads["x"]), ("lora_a", grads["lora_a"])):
        assert_summed_magnitude(out, expected[name], dtype, name)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
def test_autocast_computes_in_the_autocast_dtype_like_linear(backend, device):
    """Under torch.autocast an fp32 layer computes as nn.Linear does there: in the autocast dtype, with fp32
    gradients for its fp32 tensors. Bit for bit the same call on inputs cast by hand (so the 16-bit kernels ran, not
    the fp32 ones, and nothing inside them was cast again), and close to the reference."""
    backend_or_skip(backend, device)
    low = torch.bfloat16
    x, weight, lora_a, lora_b, bias = lora_inputs(6, 40, 24, 8, torch.float32, device)
    dy = randn(6, 24, dtype=low, device=device)
    leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b, bias)]
    with torch.autocast(device.type, dtype=low):
        y = lora_linear(leaves[0], weight, leaves[1], leaves[2], 1.5, leaves[3], backend=backend)
        assert y.dtype == torch.nn.functional.linear(x, weight, bias).dtype == low
    y.backward(dy)
    cast = [t.to(low).requires_grad_(True) for t in (x, lora_a, lora_b, bias)]
    y_cast = lora_linear(cast[0], weight.to(low), cast[1], cast[2], 1.5, cast[3], backend=backend)
    y_cast.backward(dy)
    assert torch.equal(y, y_cast)
    for name, leaf, cast_leaf in zip(("x", "lora_a", "lora_b", "bias"), leaves, cast):
        assert leaf.grad.dtype == torch.float32, name
        assert torch.equal(leaf.grad, cast_leaf.grad.float()), name
    assert_close(y, reference.lora_linear(x, weight, lora_a, lora_b, 1.5, bias), low, "y")


def test_autocast_reaches_the_modules_and_leaves_float64_alone():
    """README: under torch.autocast LoRALinear and MultiLoRALinear compute in the autocast dtype with fp32 gradients
    for their fp32 factors, as lora_linear / multi_lora_linear do; float64 tensors are not cast (nor by autocast), in
    the functions and the modules alike."""
    from torch import nn

    from lora_kernels import LoRALinear, MultiLoRALinear, multi_lora_linear
    low, f64 = torch.bfloat16, torch.float64
    ids = torch.tensor([0, -1, 1])
    layer = LoRALinear(8, 6, r=2, init_lora_weights=False)
    multi = MultiLoRALinear(nn.Linear(8, 6), max_adapters=2, max_rank=2)
    multi.set_adapter(0, torch.randn(2, 8), torch.randn(6, 2), 1.0)
    multi.lora_a.requires_grad_(True)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=low):
        outputs = [layer(x), multi(x, ids)]
    assert [y.dtype for y in outputs] == [low, low]
    sum(y.float().sum() for y in outputs).backward()
    assert layer.lora_A.weight.grad.dtype == multi.lora_a.grad.dtype == torch.float32
    x, weight = torch.randn(3, 8, dtype=f64), torch.randn(6, 8, dtype=f64)
    layer64, multi64 = layer.to(f64), MultiLoRALinear(nn.Linear(8, 6, dtype=f64), max_adapters=2, max_rank=2)
    with torch.autocast("cpu", dtype=low):
        outputs = [lora_linear(x, weight, torch.randn(2, 8, dtype=f64), torch.randn(6, 2, dtype=f64), 1.0),
                   multi_lora_linear(x, weight, torch.randn(2, 2, 8, dtype=f64), torch.randn(2, 6, 2, dtype=f64), ids,
                                     [1.0, 1.0]),
                   layer64(x), multi64(x, ids), nn.functional.linear(x, weight)]
    assert [y.dtype for y in outputs] == [f64] * 5


def test_dropout_seed_stays_on_the_cpu_under_a_default_device():
    """torch.set_default_device("cuda") must not move the seed to a GPU (a sync per read, and the Triton ops refuse
    it); "meta" stands in for a GPU here."""
    with torch.device("meta"):
        seed = functional.new_seed()
    assert seed.device.type == "cpu" and seed.dtype == torch.int64 and seed.dim() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout_refuses_cuda_graph_capture(backend):
    """A captured graph would replay the seed drawn at capture: one dropout mask forever. Refused, not silent."""
    device = torch.device("cuda")
    backend_or_skip(backend, device)
    x, weight, lora_a, lora_b, bias = lora_inputs(32, 64, 48, 8, torch.bfloat16, device)
    step = lambda p: lora_linear(x, weight, lora_a, lora_b, 2.0, bias, dropout_p=p, backend=backend)  # noqa: E731
    step(0.1)  # eager dropout works
    bench.graphed(lambda: step(0.0), device)  # and capturing without dropout
    with pytest.raises(RuntimeError, match="inside a CUDA-graph capture"):
        bench.graphed(lambda: step(0.1), device)


BAD_INPUTS = [
    ("x", lambda a: {**a, "x": a["x"][:, :-1]}, ValueError, "x expected last dimension"),
    ("lora_a", lambda a: {**a, "lora_a": a["lora_a"][:, :-1]}, ValueError, "lora_a expected shape"),
    ("lora_b", lambda a: {**a, "lora_b": a["lora_b"][:, :-1]}, ValueError, "lora_b expected shape"),
    ("rank0", lambda a: {**a, "lora_a": a["lora_a"][:0], "lora_b": a["lora_b"][:, :0]}, ValueError, "r >= 1"),
    ("bias", lambda a: {**a, "bias": a["bias"][:-1]}, ValueError, "bias expected shape"),
    ("dtype", lambda a: {**a, "lora_a": a["lora_a"].half()}, TypeError, "lora_a expected dtype torch.float32"),
    ("int", lambda a: {**a, "x": a["x"].int()}, TypeError, "x expected a floating dtype"),
    ("nontensor", lambda a: {**a, "weight": [[1.0]]}, TypeError, "weight expected a torch.Tensor"),
    ("dropout", lambda a: {**a, "dropout_p": 1.0}, ValueError, "dropout_p expected a number in [0, 1)"),
    ("backend", lambda a: {**a, "backend": "nope"}, ValueError, "backend 'nope' is not available"),
    ("scaling", lambda a: {**a, "scaling": float("nan")}, ValueError, "lora_linear: scaling expected a finite number"),
    # bool is an int subclass: a flag passed in the scaling's or dropout's place would run as 1 or 0 without a word
    # (the fast path's type() check and the full checks' isinstance(..., bool) both refuse it). dropout_p False, not
    # True: True (1) is out of [0, 1) anyway, so only False tells the bool check from the range check.
    ("scaling_bool", lambda a: {**a, "scaling": True}, TypeError,
     "lora_linear: scaling expected a real number, got bool"),
    ("dropout_bool", lambda a: {**a, "dropout_p": False}, TypeError,
     "lora_linear: dropout_p expected a real number in [0, 1), got bool"),
    # a 0-d tensor was told it is not "a number in [0, 1)" (its value was); the type is the problem (a review)
    ("dropout_tensor", lambda a: {**a, "dropout_p": torch.tensor(0.1)}, TypeError,
     "lora_linear: dropout_p expected a real number in [0, 1), got Tensor"),
    # applied in float32, where 1e39 is inf: cpu and torch gave NaN for zero rows of x·Aᵀ (a review); float64 takes it
    ("scaling_range", lambda a: {**a, "scaling": 1e39}, ValueError,
     "lora_linear: scaling expected a number within float32's range (±3.403e+38: the kernels apply it in float32 to "
     "torch.float32 inputs, where it would be inf), got 1e+39"),
]


@pytest.mark.parametrize("name,mutate,error,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_clear_error(name, mutate, error, message):
    x, weight, lora_a, lora_b, bias = lora_inputs(4, 8, 6, 2, torch.float32, "cpu")
    args = mutate({"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b, "bias": bias,
                   "dropout_p": 0.0, "backend": "torch", "scaling": 1.0})
    with pytest.raises(error, match=re.escape(message)):
        lora_linear(args["x"], args["weight"], args["lora_a"], args["lora_b"], args["scaling"], args["bias"],
                    dropout_p=args["dropout_p"], backend=args["backend"])


def test_unavailable_backend_says_why_and_what_is_available():
    if backends.unavailable_reason("cuda", "cpu") is None:
        pytest.skip("cuda backend unexpectedly available for CPU tensors")
    x, weight, lora_a, lora_b, bias = lora_inputs(2, 4, 3, 1, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"backend 'cuda' is not available .*Available here: reference, torch"):
        lora_linear(x, weight, lora_a, lora_b, backend="cuda")


@pytest.mark.cuda_branch
def test_unavailable_reason_names_each_missing_piece(monkeypatch):
    backend_or_skip("cpu", "cpu")  # it reads the reasons of a build with the extension
    from lora_kernels import _ext
    from lora_kernels import triton as triton_pkg
    cuda_reason = None if torch.cuda.is_available() else "no CUDA device"
    assert backends.unavailable_reason("reference", "meta") is None
    assert backends.unavailable_reason("foo", "cpu").startswith("unknown backend 'foo'")
    # 'auto' runs wherever torch does (its fallback): its reason had been "unknown backend
    # 'auto'; expected one of ... or 'auto'"
    assert backends.unavailable_reason("auto", "cpu") is None and backends.unavailable_reason("auto", "meta") is None
    assert backends.unavailable_reason("cpu", "meta") == "the cpu backend runs CPU tensors, got meta tensors"
    if triton_pkg.HAS_TRITON:
        assert backends.unavailable_reason("triton", "cuda") == cuda_reason
        assert backends.unavailable_reason("triton", "meta") == "Triton does not run on meta tensors"
        monkeypatch.setattr(triton_pkg, "INTERPRET", False)
        assert "TRITON_INTERPRET=1" in backends.unavailable_reason("triton", "cpu")
    monkeypatch.setattr(triton_pkg, "HAS_TRITON", False)
    monkeypatch.setattr(triton_pkg, "TRITON_ERROR", "ImportError: no triton")
    assert backends.unavailable_reason("triton", "cpu") == "triton is not importable (ImportError: no triton)"
    monkeypatch.setattr(_ext, "HAS_EXTENSION", True)
    monkeypatch.setattr(_ext, "EXTENSION_WITH_CUDA", False)
    monkeypatch.setattr(_ext, "EXTENSION_CUDA_SKIPPED", None)
    assert backends.unavailable_reason("cuda", "cuda") == "extension built without CUDA"
    monkeypatch.setattr(_ext, "EXTENSION_CUDA_SKIPPED", "no CUDA toolkit was found (set CUDA_HOME)")
    assert backends.unavailable_reason("cuda", "cuda") == ("extension built without CUDA (no CUDA toolkit was found "
                                                           "(set CUDA_HOME) when it was built)")
    monkeypatch.setattr(_ext, "EXTENSION_WITH_CUDA", True)
    assert backends.unavailable_reason("cuda", "cuda") == cuda_reason
    assert backends.unavailable_reason("cuda", "cpu") == "the cuda backend runs CUDA tensors, got cpu tensors"
    monkeypatch.setattr(_ext, "HAS_EXTENSION", False)
    monkeypatch.setattr(_ext, "EXTENSION_ERROR", "not built")
    assert backends.unavailable_reason("cpu", "cpu") == "the C++ extension lora_kernels._C is not built"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_torch_compile_fullgraph(backend):
    backend_or_skip(backend, "cpu")
    from lora_kernels import LoRALinear
    layer = LoRALinear(16, 12, r=4, lora_alpha=8, init_lora_weights=False, backend=backend)
    x = torch.randn(3, 5, 16)
    expected = layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.weight.grad is None


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_torch_compile_dynamic_fullgraph(backend):
    """dynamic=True traces the layer's scaling as a symbolic float: the finiteness check of scaling (math.isfinite,
    which dynamo cannot trace) broke fullgraph=True, in lora_linear and then in the Triton launchers (lora_fwd,
    lora_bwd_dy), whose own check was still traced. Several token counts, one graph."""
    backend_or_skip(backend, "cpu")
    from lora_kernels import LoRALinear
    layer = LoRALinear(16, 12, r=4, lora_alpha=8, init_lora_weights=False, backend=backend)
    graphs = []
    compiled = torch.compile(layer, fullgraph=True, dynamic=True,
                             backend=lambda gm, example_inputs: graphs.append(gm) or gm.forward)
    for tokens in (5, 9, 17):
        x = torch.randn(2, tokens, 16)
        torch.testing.assert_close(compiled(x), layer(x))
    assert len(graphs) <= 2, f"{len(graphs)} graphs"  # dynamo may restart its first trace once for the float


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_torch_compile_training_with_a_new_token_count_every_step(backend):
    """Dynamic padding: every training step a new token count, under torch.compile's default settings. The first
    new count makes the dimension dynamic (one recompile); nothing of ours may specialise it again (a Python branch
    on M, a cache keyed by the shape), dropout's seed included. Outputs and gradients as eager's."""
    backend_or_skip(backend, "cpu")
    from lora_kernels import LoRALinear
    torch._dynamo.reset()  # dynamo remembers which dims went dynamic in earlier tests, which would hide a recompile
    layer = LoRALinear(16, 12, r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False, backend=backend)
    graphs = []
    compiled = torch.compile(layer, fullgraph=True,
                             backend=lambda gm, example_inputs: graphs.append(gm) or gm.forward)
    for tokens in (14, 18, 39, 40, 132):
        x = torch.randn(tokens, 16)
        results = []
        for run in (layer, compiled):
            torch.manual_seed(tokens)  # the same dropout mask in both
            y = run(x)
            y.square().sum().backward()
            results.append((y.detach(), layer.lora_A.weight.grad, layer.lora_B.weight.grad))
            layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
        for name, got, want in zip(("y", "dA", "dB"), results[1], results[0]):
            torch.testing.assert_close(got, want, msg=f"{name} at {tokens} tokens")
    assert len(graphs) <= 2, f"{len(graphs)} graphs for 5 token counts"  # the first count, then one dynamic graph


def test_torch_compile_dynamic_token_count_across_the_cuda_backward_bound_compiles_once():
    """The cuda backend's backward picks its dY-once kernel up to M·r = CUDA_BWD_DY_KERNEL_MAX_WORK and two GEMMs
    above. The choice was a Python comparison of the traced M, on which dynamo guarded: with dynamic=True the first
    M·r on the other side of the bound compiled the graph again (tests/test_compile_fuzz.py). Run here through the
    autograd Function with CPU tensors, whose C++ ops dispatch to their CPU kernels: the branch is the cuda
    backend's own."""
    backend_or_skip("cpu", "cpu")
    torch._dynamo.reset()
    bound, r = functional.CUDA_BWD_DY_KERNEL_MAX_WORK, 4
    _, weight, lora_a, lora_b, bias = lora_inputs(1, 8, 6, r)
    lora_a.requires_grad_(True)
    lora_b.requires_grad_(True)

    def step(x):
        return functional.LoRALinearFunction.apply(x, weight, lora_a, lora_b, bias, 2.0, 0.0, None, "cuda")

    graphs = []
    compiled = torch.compile(step, fullgraph=True, dynamic=True,
                             backend=lambda gm, example_inputs: graphs.append(gm) or gm.forward)
    for tokens in (bound // r - 100, bound // r + 100, bound // r - 50):
        x = randn(tokens, 8).requires_grad_(True)
        results = []
        for run in (step, compiled):
            y = run(x)
            results.append([y, *torch.autograd.grad(y.square().sum(), (x, lora_a, lora_b))])
        for name, got, want in zip(("y", "dx", "dA", "dB"), results[1], results[0]):
            torch.testing.assert_close(got, want, msg=f"{name} at {tokens} tokens")
    assert len(graphs) == 1, f"{len(graphs)} graphs"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_torch_compile_fullgraph_under_autocast(backend):
    backend_or_skip(backend, "cpu")
    from lora_kernels import LoRALinear
    layer = LoRALinear(16, 12, r=4, lora_alpha=8, init_lora_weights=False, backend=backend)
    x = torch.randn(3, 5, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer(x)
        out = compiled(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    out.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_dropout_keep(dtype):
    """The dropout mask op's fake against its real output: the mask is drawn in x's dtype (a fake saying float32
    passed every compile test, all of which run dropout in float32)."""
    x = randn(6, 10).to(dtype)
    torch.library.opcheck(torch.ops.lora_kernels.torch_dropout_keep.default, (torch.tensor(7), x, 0.3),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph_with_dropout(backend, device):
    """Training with dropout compiles without graph breaks: the seed is drawn in the graph (a tensor, not a Python
    int), so each compiled step draws a new mask, the same one eager draws under the same torch.manual_seed."""
    backend_or_skip(backend, device)
    from lora_kernels import LoRALinear
    torch._dynamo.reset()
    layer = LoRALinear(16, 12, r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False, backend=backend,
                       device=device)
    x = torch.randn(3, 5, 16, device=device)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    for run in (layer, compiled, compiled):
        torch.manual_seed(11 if len(results) < 2 else 12)
        y = run(x)
        y.square().sum().backward()
        results.append((y.detach(), layer.lora_A.weight.grad, layer.lora_B.weight.grad))
        layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    eager, same_seed, other_seed = results
    for name, got, want in zip(("y", "dA", "dB"), same_seed, eager):
        assert torch.equal(got, want), name
    assert not torch.equal(other_seed[0], eager[0]), "another seed must give another mask in the compiled graph"
    assert not torch.equal(eager[0], layer.eval()(x)), "dropout must be active for this test to mean anything"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_a_frozen_b_backward_inside_autocast_keeps_the_fp32_ds(backend):
    """An fp32 layer with lora_b frozen, its forward outside autocast and its backward inside a bf16 region: the dS
    computed without S (no dY-once kernel) was rounded to bf16 by autocast (dA and dX 1e4x further from float64;
    Triton refused it: "ds expected dtype torch.float32"; review 297). The kernels' float32 dS, as with lora_b
    trained."""
    backend_or_skip(backend, "cpu")
    m, k, n, r = 20, 24, 18, 4
    x, weight, lora_a, lora_b, _ = lora_inputs(m, k, n, r, torch.float32, "cpu")
    dy = randn(m, n, device="cpu")
    x_leaf, a_leaf = x.clone().requires_grad_(True), lora_a.clone().requires_grad_(True)
    y = lora_linear(x_leaf, weight, a_leaf, lora_b, 0.5, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y.backward(dy)
    full = {name: t.double().requires_grad_(name in ("x", "lora_a"))
            for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b))}
    want_x, want_a = torch.autograd.grad(reference.lora_linear(*full.values(), 0.5), [full["x"], full["lora_a"]],
                                         dy.double())
    assert_close(x_leaf.grad, want_x, torch.float32, "dx")
    assert_close(a_leaf.grad, want_a, torch.float32, "dA")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_the_gemm_fallbacks_inside_autocast_keep_the_fp32_products(backend, monkeypatch):
    """An fp32 layer's backward run inside a bf16 autocast region on the two-GEMM paths (the Triton backward past
    DY_PARTIALS_BUDGET; the cuda backend above CUDA_BWD_DY_KERNEL_MAX_WORK, here on CPU tensors, whose fused forward
    the C++ CPU op runs): autocast rounded dB and dS to bf16, so Triton's lora_bwd_dx refused the dS and the cuda
    backend's gradients were 3e-3 off, silently (review 304)."""
    backend_or_skip({"cuda": "cpu"}.get(backend, backend), "cpu")
    if backend == "cuda":
        monkeypatch.setattr(functional, "CUDA_BWD_DY_KERNEL_MAX_WORK", 0)
    else:
        from lora_kernels.triton import lora_linear as triton_lora_linear
        monkeypatch.setattr(triton_lora_linear, "DY_PARTIALS_BUDGET", 0)
    x, weight, lora_a, lora_b, _ = lora_inputs(20, 24, 18, 4, torch.float32, "cpu")
    dy = randn(20, 18, device="cpu")
    leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
    y = functional.LoRALinearFunction.apply(leaves[0], weight, leaves[1], leaves[2], None, 0.5, 0.0, None, backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y.backward(dy)
    full = [t.double().requires_grad_(True) for t in (x, weight, lora_a, lora_b)]
    wanted = torch.autograd.grad(reference.lora_linear(*full, 0.5), [full[0], full[2], full[3]], dy.double())
    for name, leaf, want in zip(("dx", "dA", "dB"), leaves, wanted):
        assert_close(leaf.grad, want, torch.float32, name)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_autocast_saves_no_weight_copy_when_x_needs_no_gradient(backend):
    """W is read by the backward only for dX. Under autocast it is a 16-bit copy [N, K]; saving it when x needs no
    gradient (the first layer's projections) kept one such copy per layer alive until the backward."""
    backend_or_skip(backend, "cpu")
    x, weight, lora_a, lora_b, _ = lora_inputs(8, 32, 24, 4, torch.float32, "cpu")
    lora_a.requires_grad_(True)
    lora_b.requires_grad_(True)
    for x_needs_grad in (False, True):
        shapes = []

        def pack(tensor, shapes=shapes):
            shapes.append(tuple(tensor.shape))
            return tensor

        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = lora_linear(x.detach().requires_grad_(x_needs_grad), weight, lora_a, lora_b, 2.0, backend=backend)
        assert ((24, 32) in shapes) == x_needs_grad, shapes
        y.float().sum().backward()
        assert lora_a.grad is not None and lora_b.grad is not None


def _allocation_peak(fn, device):
    """The peak of the bytes allocated during fn() above those before it. CUDA: the caching allocator's statistics
    (bench.peak_memory, which has none for CPU). CPU: the running sum of the profiler's memory events (every
    allocation and free through torch's CPU allocator, in the order they happened)."""
    if device.type == "cuda":
        return bench.peak_memory(fn, device)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiled:
        fn()
    events = [event for event in profiled.profiler.kineto_results.events() if event.name() == "[memory]"]
    allocated = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        allocated += event.nbytes()
        peak = max(peak, allocated)
    return peak


def test_torch_backend_releases_the_dropped_x_before_the_products(device):
    """The torch backend's forward with dropout releases the dropped x and its mask ([M, K] each) before it makes the
    [M, N] products: alive together they put its fwd+bwd peak at 5 tensors of x's size (K = N here), above
    PEFT's composition (bench.peft_lora_forward) on a GPU, whose mask is bool (4.5: the H200 measured 1.11x,
    BENCHMARKS.md), where now 3 are. On CPU, in float32, PEFT's mask takes x's dtype: 5 there, which shows that the
    measure sees the temporaries it is meant to count. On a GPU, in bf16 (the H200's case), below PEFT's."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x, weight, lora_a, lora_b, _ = lora_inputs(1024, 256, 256, 8, dtype, device)
    leaves = [t.requires_grad_(True) for t in (x, lora_a, lora_b)]
    dy = randn(1024, 256, dtype=dtype, device=device)

    def torch_backend():
        torch.autograd.grad(lora_linear(x, weight, lora_a, lora_b, 2.0, dropout_p=0.1, backend="torch"), leaves, dy)

    def peft():
        torch.autograd.grad(bench.peft_lora_forward(x, weight, lora_a, lora_b, 2.0, 0.1), leaves, dy)

    x_size = x.numel() * x.element_size()
    torch_backend(), peft()  # first calls outside the measure (cuBLAS's workspace, the profiler's setup)
    ours, theirs = _allocation_peak(torch_backend, device) / x_size, _allocation_peak(peft, device) / x_size
    if device.type == "cpu":
        assert theirs >= 5.0 and ours < 3.5, (ours, theirs)
    else:
        assert ours < theirs, (ours, theirs)


def test_auto_picks_by_device_and_op_as_the_readme_says(monkeypatch):
    """README, Backends: with every backend available, "auto" takes on GPUs the Triton kernels for the grouped ops and
    the torch composition for lora_linear (the fused single-adapter kernels measured slower), on CPU the C++ kernels
    for every op but lora_linear in bf16 on a CPU with bf16 GEMM units (the torch composition); the Triton
    interpreter is never chosen, and torch is the last fallback."""
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: None)
    monkeypatch.setattr(backends._triton_pkg, "INTERPRET", False)  # compiled Triton kernels, as on a GPU
    for units in (False, True):  # a CPU with bf16 GEMM units: lora_linear in bf16 on the torch composition
        monkeypatch.setattr(backends, "CPU_HAS_BF16_GEMM_UNITS", units)
        for dtype in (None, torch.float32, torch.float16, torch.bfloat16):
            assert backends.auto_backend("cuda", "lora_linear", dtype) == "torch"
            for op in backends.GROUPED_OPS:
                assert backends.auto_backend("cuda", op, dtype) == "triton"
                assert backends.auto_backend("cpu", op, dtype) == "cpu"
            expected = "torch" if units and dtype == torch.bfloat16 else "cpu"
            assert backends.auto_backend("cpu", "lora_linear", dtype) == expected
    for op in backends.GROUPED_OPS:  # float64: the cuda kernels, Triton's taking 32- and 16-bit floats only
        assert backends.auto_backend("cuda", op, torch.float64) == "cuda"
    monkeypatch.setattr(backends._triton_pkg, "INTERPRET", True)  # TRITON_INTERPRET=1 on a GPU machine
    for op in backends.GROUPED_OPS:
        assert backends.auto_backend("cuda", op) == "cuda"
    for op in ("lora_linear", *backends.GROUPED_OPS):  # other devices: the torch composition, whatever else says
        assert backends.auto_backend("meta", op) == "torch"
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: None if name == "torch" else "absent")
    assert backends.auto_backend("cpu") == backends.auto_backend("cuda", "lora_shrink") == "torch"


def test_available_backends_names_a_bad_device():
    assert "torch" in backends.available_backends("cpu")
    with pytest.raises(ValueError, match=r"available_backends: device expected .*got 'gpu'"):
        backends.available_backends("gpu")
    for bad in (None, 1.5, [0]):  # torch.device's TypeErrors, as ValueErrors naming the argument
        with pytest.raises(ValueError, match=rf"available_backends: device expected .*got {re.escape(repr(bad))}"):
            backends.available_backends(bad)


def test_parse_device_takes_cpu_and_cuda_only(monkeypatch):
    assert backends.parse_device("compare", "cpu") == torch.device("cpu")
    for bad in ("meta", "gpu", "", 1.5, [0]):
        with pytest.raises(ValueError, match=rf"compare: --device expected cpu or cuda, got {re.escape(repr(bad))}"):
            backends.parse_device("compare", bad)
    assert backends.parse_device("compare", None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a stand-in GPU machine: no device given is cuda
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert backends.parse_device("compare", None) == torch.device("cuda")


def test_a_refused_backend_lists_what_is_available_here(monkeypatch):
    monkeypatch.setattr(backends, "_CHOICES", {})
    with pytest.raises(TypeError, match="lora_linear: backend expected a str, got int"):
        backends.resolve_backend(1, torch.device("cpu"), "lora_linear")
    unavailable = [name for name in backends.BACKENDS if backends.unavailable_reason(name, "cpu") is not None]
    assert "cuda" in unavailable  # CUDA tensors only
    for name in unavailable:
        with pytest.raises(ValueError) as refused:
            backends.resolve_backend(name, torch.device("cpu"), "lora_linear")
        available = ", ".join(backends.available_backends("cpu"))
        assert str(refused.value) == (f"lora_linear: backend {name!r} is not available for cpu tensors: "
                                      f"{backends.unavailable_reason(name, 'cpu')}. Available here: {available} "
                                      f"(or 'auto').")
        assert name not in available.split(", ")


def test_the_cached_auto_choice_is_per_dtype(monkeypatch):
    """resolve_backend caches its choices: keyed without the dtype, a bf16 call on a CPU with bf16 GEMM units would
    hand its torch choice to every later float32 call (or the C++ kernels to bf16 after a float32 call)."""
    monkeypatch.setattr(backends, "_CHOICES", {})
    monkeypatch.setattr(backends, "CPU_HAS_BF16_GEMM_UNITS", True)
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: None)
    cpu = torch.device("cpu")
    for _ in range(2):  # the second round from the cache
        assert backends.resolve_backend("auto", cpu, "lora_linear", torch.bfloat16) == "torch"
        assert backends.resolve_backend("auto", cpu, "lora_linear", torch.float32) == "cpu"
        assert backends.resolve_backend("auto", cpu, "lora_shrink", torch.bfloat16) == "cpu"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("m", [4, 40], ids=["M4", "M40"])  # the cuda backend's decode kernel and its GEMM path
def test_scaling_zero_keeps_nan_in_lora_b_like_the_reference(backend, m, device):
    """scaling = 0 multiplies the LoRA term by zero, and 0·NaN is NaN: every backend returns NaN in the columns of a
    NaN in lora_b, as the reference and PEFT do (the cpu backend passed scaling as addmm's alpha, and BLAS skips the
    product when alpha is 0, so its y came out finite)."""
    backend_or_skip(backend, device)
    x, weight, lora_a, lora_b, bias = lora_inputs(m, 32, 24, 8, torch.float32, device)
    lora_b[5, 3] = float("nan")
    y = lora_linear(x, weight, lora_a, lora_b, 0.0, bias, backend=backend)
    expected = reference.lora_linear(x, weight, lora_a, lora_b, 0.0, bias)
    assert torch.equal(torch.isnan(y).cpu(), torch.isnan(expected).cpu())
    assert torch.isnan(y[:, 5]).all()
    finite = ~torch.isnan(expected).cpu()
    assert_close(y.cpu()[finite], expected.cpu()[finite], torch.float32, "y (finite columns)")


# Where NaN/±inf are planted, three at a time in one tensor: (target, lora_b zeros as PEFT initialises it).
NON_FINITE_CASES = [("x", False), ("x", True), ("weight", False), ("lora_a", True), ("lora_b", False), ("bias", False),
                    ("dy", True)]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_non_finite_values_land_where_the_reference_puts_them(backend, dtype, dropout_p, device):
    """NaN, +inf and -inf planted in x, W, A, B, bias or dY (with lora_b zeros too: inf·0 is NaN) come out of y and
    every gradient (dX, dA, dB, d(bias), dW) at exactly the reference's places: no backend drops one (a GradScaler
    would then miss an overflow) or invents one (it would skip a good step). Dropout multiplies (x·0 is NaN for a
    dropped Inf, as torch's dropout gives). Rows up to 16 and above: the cpu backend's two forward paths."""
    backend_or_skip(backend, device)
    if backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16 and dropout_p:
        pytest.skip("the Triton interpreter's bf16 multiply gives NaN·0 = 0 (dropout's x·0)")
    g = torch.Generator().manual_seed(17)
    for case, (target, zero_b) in enumerate(NON_FINITE_CASES):
        m, k, n, r = (20 if case % 2 else 5), 12, 10, 4
        tensors = {"x": torch.randn(m, k, generator=g), "weight": torch.randn(n, k, generator=g) * k ** -0.5,
                   "lora_a": torch.randn(r, k, generator=g) * k ** -0.5,
                   "lora_b": torch.zeros(n, r) if zero_b else torch.randn(n, r, generator=g) * r ** -0.5,
                   "bias": torch.randn(n, generator=g), "dy": torch.randn(m, n, generator=g)}
        planted = tensors[target].view(-1)  # three distinct elements, spread over rows and columns
        for position, value in zip(torch.randperm(planted.numel(), generator=g)[:3], (float("nan"), float("inf"),
                                                                                      -float("inf"))):
            planted[position] = value
        x, weight, lora_a, lora_b, bias, dy = (tensors[name].to(dtype).to(device) for name in tensors)
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, lora_a, lora_b, bias)]
        torch.manual_seed(case)
        y = lora_linear(*leaves[:4], 2.0, leaves[4], dropout_p=dropout_p, backend=backend)
        y.backward(dy)
        torch.manual_seed(case)
        mask = _dropout_mask(backend, functional.new_seed(), x, dropout_p) if dropout_p else None
        what = f"{target} planted{' (lora_b zeros)' if zero_b else ''}, M = {m}"
        assert_same_non_finite(y, reference.lora_linear(x, weight, lora_a, lora_b, 2.0, bias, mask).to(dtype),
                                dtype, f"y, {what}")
        expected = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, 2.0, mask)
        for name, leaf in zip(("x", "weight", "lora_a", "lora_b", "bias"), leaves):
            assert_same_non_finite(leaf.grad, expected[name].to(dtype), dtype, f"d{name}, {what}", scale=2.0)


def _ds_overflow_case(device):
    """fp16 inputs where |s·dY·B| passes 65504 while dX and dA stay in range: (scaling, x, weight, lora_a, lora_b,
    dy, the float64 reference gradients)."""
    dtype, scaling, m, k, n, r = torch.float16, 200.0, 8, 32, 16, 4
    x = randn(m, k, dtype=dtype, device=device, scale=1e-3)
    weight = randn(n, k, dtype=dtype, device=device, scale=k ** -0.5)
    lora_a = randn(r, k, dtype=dtype, device=device, scale=1e-3)
    lora_b = (100.0 * (1.0 + torch.rand(n, r, device=device))).to(dtype)  # one sign: dY·B cannot cancel
    dy = (1.0 + torch.rand(m, n, device=device)).to(dtype)
    expected = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, scaling)
    assert (scaling * dy.double() @ lora_b.double()).abs().min() > torch.finfo(dtype).max  # dS overflows fp16
    assert expected["x"].abs().max() < 1e4 and expected["lora_a"].abs().max() < 1e4  # dX and dA do not
    return scaling, x, weight, lora_a, lora_b, dy, expected


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
def test_fp16_gradients_stay_finite_where_only_ds_overflows(backend, device):
    """|s·dY·B| above fp16's 65504 while dX and dA are in range: the fused backends keep dS in fp32 and round dX and
    dA once, so both come out finite and accurate (the cpu backend rounded dS to fp16 first: dx = inf, as PEFT's
    and the torch backend's). The cuda backend's GEMM path above CUDA_BWD_DY_KERNEL_MAX_WORK rounds like PEFT."""
    backend_or_skip(backend, device)
    scaling, x, weight, lora_a, lora_b, dy, expected = _ds_overflow_case(device)
    _, grads = _run(backend, x, weight, lora_a, lora_b, None, scaling, dy)
    for name in ("x", "lora_a"):
        assert_close(grads[name], expected[name], torch.float16, f"d{name}", scale=2.0)


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
def test_fp16_create_graph_gradients_stay_finite_where_only_ds_overflows(backend, device):
    """The inputs of test_fp16_gradients_stay_finite_where_only_ds_overflows with create_graph=True, which runs the
    differentiable torch composition on every backend: the fused backends keep its LoRA branch in fp32 as their
    kernels keep S and dS (it formed s·dY·B in fp16: dx = dA = inf where the first-order backward was finite)."""
    backend_or_skip(backend, device)
    scaling, x, weight, lora_a, lora_b, dy, expected = _ds_overflow_case(device)
    leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
    y = lora_linear(leaves[0], weight, leaves[1], leaves[2], scaling, backend=backend)
    grads = torch.autograd.grad(y, leaves, dy, create_graph=True)
    for name, grad in zip(("x", "lora_a", "lora_b"), grads):
        assert grad.requires_grad  # still differentiable
        assert_close(grad, expected[name], torch.float16, f"d{name}", scale=2.0)


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
def test_fp16_torch_func_stays_finite_where_only_an_intermediate_overflows(backend, device):
    """torch.func runs the torch composition on every backend; the fused backends keep its LoRA branch in fp32, as
    their kernels do. vmap: S·Bᵀ passes fp16's 65504 while s·S·Bᵀ (s = 0.25) and y do not (the composition rounded
    S·Bᵀ to fp16 before scaling it: y = inf where the backend's own forward was finite). torch.func.vjp: the inputs
    of test_fp16_gradients_stay_finite_where_only_ds_overflows (s·dY·B rounded to fp16: dx = dA = inf)."""
    backend_or_skip(backend, device)
    from torch.func import vjp, vmap
    dtype, m, k, n, r = torch.float16, 8, 32, 16, 4
    weight = randn(n, k, dtype=dtype, device=device, scale=k ** -0.5)
    lora_b = (100.0 * (1.0 + torch.rand(n, r, device=device))).to(dtype)  # one sign: nothing cancels
    x = randn(m, k, dtype=dtype, device=device)
    lora_a = randn(r, k, dtype=dtype, device=device, scale=40.0)
    shrunk = x.double() @ lora_a.double().T
    assert (shrunk @ lora_b.double().T).abs().max() > 2 * torch.finfo(dtype).max  # S·Bᵀ overflows fp16
    expected = reference.lora_linear(x, weight, lora_a, lora_b, 0.25)
    assert expected.abs().max() < torch.finfo(dtype).max  # y does not
    got = vmap(lambda row: lora_linear(row, weight, lora_a, lora_b, 0.25, backend=backend))(x[:, None, :])[:, 0]
    assert got.dtype == dtype
    assert_close(got, expected, dtype, "vmap y")
    with torch.autocast(device.type, dtype=dtype):  # autocast must not round the fp32 branch back to fp16
        got = vmap(lambda row: lora_linear(row, weight, lora_a, lora_b, 0.25, backend=backend))(x[:, None, :])[:, 0]
    assert_close(got, expected, dtype, "vmap y under autocast")

    scaling = 200.0
    x = randn(m, k, dtype=dtype, device=device, scale=1e-3)
    lora_a = randn(r, k, dtype=dtype, device=device, scale=1e-3)
    dy = (1.0 + torch.rand(m, n, device=device)).to(dtype)
    expected = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, scaling)
    assert (scaling * dy.double() @ lora_b.double()).abs().min() > torch.finfo(dtype).max  # dS overflows fp16
    _, pullback = vjp(lambda xx, a, b: lora_linear(xx, weight, a, b, scaling, backend=backend), x, lora_a, lora_b)
    for name, grad in zip(("x", "lora_a", "lora_b"), pullback(dy)):
        assert_close(grad, expected[name], dtype, f"torch.func.vjp d{name}", scale=2.0)


def test_tensor_subclasses_are_not_taken_for_dtensors():
    """With torch.distributed.tensor imported (DTensor checks live), a tensor subclass that is no DTensor runs as a
    plain tensor (the type test only skips the isinstance check for plain tensors)."""
    pytest.importorskip("torch.distributed.tensor")

    class Tagged(torch.Tensor):
        pass

    x, weight, lora_a, lora_b, _ = lora_inputs(3, 8, 6, 2, bias=False)
    y = lora_linear(x.as_subclass(Tagged), weight, lora_a, lora_b, 2.0, backend="torch")
    assert_close(y, reference.lora_linear(x, weight, lora_a, lora_b, 2.0), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "reference"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("create_graph", [False, True])
def test_a_training_step_under_fake_tensor_mode_gives_the_real_steps_shapes(backend, dropout_p, dtype, create_graph):
    """Under FakeTensorMode (a memory estimator's forward and backward, outside torch.compile) every backend gives
    the outputs and gradients of a real step in shape, dtype and device, create_graph=True too: the Triton launchers
    and the dropout masks ran their kernels or a generator seeded from a fake seed on fake tensors and raised."""
    backend_or_skip(backend, "cpu")
    from lora_kernels.modules import LoRALinear

    def step():
        torch.manual_seed(0)
        layer = LoRALinear(16, 12, r=4, lora_dropout=dropout_p, dtype=dtype, backend=backend)
        x = torch.randn(2, 5, 16, dtype=dtype, requires_grad=True)
        y = layer(x)
        inputs = [x, layer.lora_A.weight, layer.lora_B.weight]
        return [y, *torch.autograd.grad(y.float().sum(), inputs, create_graph=create_graph)]

    assert_fake_step_like_the_real_one(step)


def test_fp16_torch_func_on_the_torch_backend_rounds_as_its_own_forward(device):
    """The torch backend's torch.func path is its own (PEFT's) composition in the input dtype, not the fused
    backends' fp32 branch: where S·Bᵀ passes fp16's 65504 both give inf at the same places."""
    from torch.func import vmap
    dtype, m, k, n, r = torch.float16, 8, 32, 16, 4
    weight = randn(n, k, dtype=dtype, device=device, scale=k ** -0.5)
    lora_b = (100.0 * (1.0 + torch.rand(n, r, device=device))).to(dtype)
    x = randn(m, k, dtype=dtype, device=device)
    lora_a = randn(r, k, dtype=dtype, device=device, scale=40.0)
    own = lora_linear(x, weight, lora_a, lora_b, 0.25, backend="torch")
    got = vmap(lambda row: lora_linear(row, weight, lora_a, lora_b, 0.25, backend="torch"))(x[:, None, :])[:, 0]
    assert own.isinf().any()
    assert torch.equal(got.isinf(), own.isinf())


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
def test_fp16_torch_func_adds_the_lora_term_before_rounding(backend, device):
    """The fused backends' torch.func path adds the fp32 LoRA term to the base product before rounding to fp16, as
    their forward does: base -60000 plus a LoRA term of +70000 is 10000, where the term rounded to fp16 first is
    inf (and so the sum)."""
    backend_or_skip(backend, device)
    from torch.func import vmap
    dtype = torch.float16
    x = torch.ones(4, 1, dtype=dtype, device=device)
    weight = torch.full((1, 1), -60000.0, dtype=dtype, device=device)
    lora_a = torch.ones(1, 1, dtype=dtype, device=device)
    lora_b = torch.full((1, 1), 35000.0, dtype=dtype, device=device)
    own = lora_linear(x, weight, lora_a, lora_b, 2.0, backend=backend)
    got = vmap(lambda row: lora_linear(row, weight, lora_a, lora_b, 2.0, backend=backend))(x[:, None, :])[:, 0]
    assert torch.isfinite(own).all() and torch.equal(got, own), (own, got)


def test_reference_dropout_matches_the_torch_backend(device):
    """The reference backend's dropout is the torch backend's mask (torch_dropout_keep of the same seed) and the same
    1/(1-p) scale: under one torch.manual_seed the two agree."""
    x, weight, lora_a, lora_b, bias = lora_inputs(12, 16, 10, 4, torch.float32, device)
    outputs = []
    for backend in ("reference", "torch"):
        torch.manual_seed(7)
        outputs.append(lora_linear(x, weight, lora_a, lora_b, 2.0, bias, dropout_p=0.5, backend=backend))
    assert_close(outputs[0], outputs[1], torch.float32, "reference vs torch, p = 0.5")
    assert not torch.equal(outputs[1], lora_linear(x, weight, lora_a, lora_b, 2.0, bias, backend="torch"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_create_graph_bias_gradient_is_differentiable(backend, device):
    """With create_graph=True the bias gradient (dY summed over rows) is a function of dY that autograd follows, so
    a penalty on it reaches the factors: d(sum of dbias)/d(dY) is all ones."""
    backend_or_skip(backend, device)
    x, weight, lora_a, lora_b, bias = lora_inputs(5, 8, 6, 2, torch.float32, device)
    lora_a, lora_b, bias = (t.requires_grad_(True) for t in (lora_a, lora_b, bias))
    dy = randn(5, 6, device=device).requires_grad_(True)
    y = lora_linear(x, weight, lora_a, lora_b, 0.7, bias, backend=backend)
    d_bias, = torch.autograd.grad(y, bias, dy, create_graph=True)
    assert d_bias.requires_grad
    d_dy, = torch.autograd.grad(d_bias.sum(), dy)
    assert torch.equal(d_dy, torch.ones_like(dy))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_func_applies_the_dropout_mask_of_the_autograd_path(backend, device):
    """lora_linear with dropout_p > 0 under torch.func (the torch composition) draws the mask the backend's own
    path draws from the same seed: the same output and gradient as the autograd path."""
    backend_or_skip(backend, device)
    from torch.func import vjp
    x, weight, lora_a, lora_b, _ = lora_inputs(6, 32, 16, 4, device=device, bias=False)
    dy = randn(6, 16, device=device)
    leaf = lora_a.clone().requires_grad_(True)
    torch.manual_seed(3)
    y = lora_linear(x, weight, leaf, lora_b, 2.0, dropout_p=0.5, backend=backend)
    y.backward(dy)
    torch.manual_seed(3)
    got, pullback = vjp(lambda a: lora_linear(x, weight, a, lora_b, 2.0, dropout_p=0.5, backend=backend), lora_a)
    torch.testing.assert_close(got, y.detach())
    torch.testing.assert_close(pullback(dy)[0], leaf.grad)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_linearize_and_make_fx_of_real_tensors_trace_the_dropout_mask(backend, device):
    """torch.func.linearize and make_fx(tracing_mode="real") trace real tensors: reading the dropout seed as an int
    there was torch's "trying to get value out of a tracing tensor" on every backend (helper 286). They go through
    the custom ops now, as other tracing does: the traced functions give eager's results for the same seed (the
    linearized function draws its mask anew when called, as torch's own dropout does there)."""
    backend_or_skip(backend, device)
    from torch.fx.experimental.proxy_tensor import make_fx
    x, weight, lora_a, lora_b, bias = lora_inputs(6, 32, 16, 4, device=device)
    tangent = randn(6, 32, device=device)

    def f(x):
        return lora_linear(x, weight, lora_a, lora_b, 2.0, bias, dropout_p=0.5, backend=backend)

    torch.manual_seed(3)
    y, jvp_of = torch.func.linearize(f, x)
    torch.manual_seed(3)
    torch.testing.assert_close(y, f(x))
    torch.manual_seed(5)
    got_tangent = jvp_of(tangent)
    torch.manual_seed(5)
    torch.testing.assert_close(got_tangent, torch.func.jvp(f, (x,), (tangent,))[1])
    traced = make_fx(f)(x)
    torch.manual_seed(4)
    replayed = traced(x)
    torch.manual_seed(4)
    torch.testing.assert_close(replayed, f(x))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_func_compiled_whole_matches_eager(backend, device):
    """torch.compile(fullgraph=True) of a torch.func transform of lora_linear with dropout: the eager transform's
    output and gradients (the torch composition, with the backend's mask). Dynamo answers whether a transform is
    active while it traces one; asked only outside tracing, the cpu backend's forward op (no derivative) was traced
    under the transform and its gradients came out zero, silently, and the Triton mask's launch failed to trace."""
    backend_or_skip(backend, device)
    from torch.func import vjp
    x, weight, lora_a, lora_b, bias = lora_inputs(6, 32, 16, 4, device=device)
    dy = randn(6, 16, device=device)

    def step(a, b):
        y, pullback = vjp(lambda a, b: lora_linear(x, weight, a, b, 2.0, bias, dropout_p=0.5, backend=backend), a, b)
        return y, pullback(dy)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)  # the same dropout seed in both (aot_eager draws eager's)
    expected = step(lora_a, lora_b)
    torch.manual_seed(3)
    torch.testing.assert_close(compiled(lora_a, lora_b), expected)


@pytest.mark.parametrize("magnitude", ["small", "large"])
def test_triton_gemm_fallback_keeps_fp32_products(magnitude, device, monkeypatch):
    """The Triton backward past DY_PARTIALS_BUDGET returns fp32 dB and dS like its kernel: neither product is rounded
    to fp16 on the way (small: s·dY·B ~ 1e-6 is subnormal in fp16, where the folded scaling lost 5% of its bits;
    large: dY·B passes 65504 while s·dY·B does not)."""
    backend_or_skip("triton", device)
    from lora_kernels.triton import lora_linear as triton_lora_linear
    monkeypatch.setattr(triton_lora_linear, "DY_PARTIALS_BUDGET", 0)
    dtype, m, n, r, scaling = torch.float16, 8, 16, 4, 0.01
    dy = randn(m, n, dtype=dtype, device=device, scale=1e-3 if magnitude == "small" else 1.0)
    lora_b = ((1e-2 if magnitude == "small" else 5000.0) * (1.0 + torch.rand(n, r))).to(dtype).to(device)
    s = randn(m, r, device=device)
    d_lora_b, ds = triton_lora_linear.lora_bwd_dy(dy, s, lora_b, scaling)
    assert d_lora_b.dtype == ds.dtype == torch.float32
    s16 = s.to(dtype).double().cpu()  # S is rounded to dy's dtype for the GEMM, as PEFT rounds it
    assert_close(ds, scaling * dy.double().cpu() @ lora_b.double().cpu(), torch.float32, "ds")
    assert_close(d_lora_b, scaling * dy.double().cpu().T @ s16, torch.float32, "d_lora_b", tf32=True)


@pytest.mark.parametrize("path", ["cuda_above_the_kernel_bound", "triton_past_the_partials_budget", "torch",
                                  "torch_create_graph"])
@pytest.mark.parametrize("scaling", [0.01, 4.0])
def test_fp16_gemm_fallbacks_stay_finite_where_only_the_unscaled_dy_b_overflows(path, scaling, monkeypatch):
    """The backward paths that take two GEMMs in the input dtype (the cuda backend above
    CUDA_BWD_DY_KERNEL_MAX_WORK, here on CPU tensors, whose fused forward the C++ CPU op runs; the Triton backward
    past DY_PARTIALS_BUDGET; the torch backend, also its create_graph backward) fold a scaling below 1 into B and S
    before the GEMM: they rounded dY·B to fp16 and scaled it afterwards, so dX and dA were inf where dY·B passed
    65504 while dS, dX and dA did not (PEFT, scaling dY first, stays finite). A scaling above 1 is applied after the
    GEMM, where the product is the smaller value."""
    backend = path.split("_")[0]
    backend_or_skip({"cuda": "cpu"}.get(backend, backend), "cpu")
    if backend == "cuda":
        monkeypatch.setattr(functional, "CUDA_BWD_DY_KERNEL_MAX_WORK", 0)
    elif backend == "triton":
        from lora_kernels.triton import lora_linear as triton_lora_linear
        monkeypatch.setattr(triton_lora_linear, "DY_PARTIALS_BUDGET", 0)
    dtype, m, k, n, r = torch.float16, 8, 32, 16, 4
    x = randn(m, k, dtype=dtype, scale=1e-3)
    weight = randn(n, k, dtype=dtype, scale=k ** -0.5)
    lora_a = randn(r, k, dtype=dtype, scale=1e-3)
    b_scale = 5000.0 if scaling < 1 else 5.0  # scaling 0.01: dY·B overflows fp16, dS does not
    lora_b = (b_scale * (1.0 + torch.rand(n, r))).to(dtype)  # one sign: dY·B cannot cancel
    dy = (1.0 + torch.rand(m, n)).to(dtype)
    expected = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, scaling)
    if scaling < 1:
        assert (dy.double() @ lora_b.double()).abs().min() > torch.finfo(dtype).max  # dY·B overflows fp16
    assert (scaling * dy.double() @ lora_b.double()).abs().max() < 1e4  # dS does not
    leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
    y = functional.LoRALinearFunction.apply(leaves[0], weight, leaves[1], leaves[2], None, scaling, 0.0, None, backend)
    grads = torch.autograd.grad(y, leaves, dy, create_graph=path.endswith("create_graph"))
    for name, grad in zip(("x", "lora_a"), grads):  # dB is ~1e-6 at scaling 0.01, subnormal in fp16 everywhere
        assert_close(grad, expected[name], dtype, f"d{name}", scale=2.0)
    if scaling > 1:
        assert_close(grads[2], expected["lora_b"], dtype, "dlora_b", scale=2.0)


def test_scaled_mm_applies_a_scaling_above_one_in_magnitude_after_the_product():
    """Either sign: a scaling of -100 folded into B (1000 · -100 = -1e5) overflowed fp16, where the product scaled
    afterwards (4 · -100) did not; only |scaling| <= 1 goes into B."""
    from lora_kernels._ext import scaled_mm
    a = torch.full((2, 4), 1e-3, dtype=torch.float16)
    b = torch.full((4, 3), 1000.0, dtype=torch.float16)
    for scaling in (100.0, -100.0):
        out = scaled_mm(a, b, scaling)
        assert out.dtype == torch.float16
        torch.testing.assert_close(out.float(), torch.full((2, 3), scaling * 4 * 1e-3 * 1000), rtol=1e-2, atol=0)


@pytest.mark.parametrize("scaling", [0.5, -0.25])
def test_scaled_mm_scales_a_float32_operand_before_rounding_it_to_float16(scaling):
    """dB = s·dYᵀ·S with a float32 output (the cuda fallback's dB of float32 factors, the Triton fallback's dB): S
    past fp16's 65504 whose scaled value is not is scaled before it is rounded to dY's fp16, as for a 16-bit output:
    rounded first it was inf, and dB with it, where the result is finite."""
    from lora_kernels._ext import scaled_mm
    a = torch.full((2, 3), 1e-2, dtype=torch.float16)
    b = torch.full((3, 4), 80000.0)
    for out_dtype in (None, torch.float32):
        out = scaled_mm(a, b, scaling, out_dtype=out_dtype)
        assert out.dtype == (out_dtype or torch.float16)
        expected = torch.full((2, 4), scaling * 3 * a[0, 0].item() * 80000.0)
        torch.testing.assert_close(out.float(), expected, rtol=2e-3, atol=0)


def test_scaled_mm_keeps_a_16_bit_operand_unscaled_for_a_float32_product():
    """dS = s·dY·B with a float32 output (the Triton fallback): B is fp16 already, so nothing needs the scaling
    first, and B·s folded in (1.3e-3 · 0.01) would fall into fp16's subnormals (0.3% steps): scaled after, in
    float32, the product keeps float32's precision."""
    from lora_kernels._ext import scaled_mm
    a = (1.0 + torch.rand(4, 8)).to(torch.float16)
    b = (1e-3 * (1.0 + torch.rand(8, 3))).to(torch.float16)
    out = scaled_mm(a, b, 0.01, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert_close(out, 0.01 * a.double() @ b.double(), torch.float32, "product", scale=1e-2)  # 1e-5


def _penalty_gradients(fn, leaves, dy):
    """Second derivatives through a gradient penalty: the first-order gradients of <fn(leaves), dy> are taken with
    create_graph=True, and the gradients of the sum of their squares with respect to every leaf are returned."""
    first = torch.autograd.grad((fn(*leaves) * dy).sum(), leaves, create_graph=True)
    penalty = sum(g.square().sum() for g in first)
    return torch.autograd.grad(penalty, leaves)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["no_dropout", "dropout"])
def test_double_backward_matches_the_reference(backend, dropout_p, device):
    """create_graph=True (a gradient penalty, second-order meta-learning) gives the reference's second derivatives
    on every backend, with no warning (triton failed with "element 0 of tensors does not require grad", the C++ ops
    warned that no autograd kernel was registered, and the saved S left dB's derivatives out)."""
    backend_or_skip(backend, device)
    dtype = torch.float32
    x, weight, lora_a, lora_b, bias = lora_inputs(6, 16, 12, 4, dtype, device)
    dy = randn(6, 12, dtype=dtype, device=device)
    torch.manual_seed(3)
    seed = functional.new_seed()
    mask = _dropout_mask(backend, seed, x, dropout_p) if dropout_p else None
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, lora_a, lora_b)]
    with warnings.catch_warnings():
        # torch's "autograd kernel was not registered" is a UserWarning; the triton 3.6 interpreter itself raises numpy
        # DeprecationWarnings, which are not ours
        warnings.simplefilter("error", UserWarning)
        torch.manual_seed(3)
        got = _penalty_gradients(lambda *t: lora_linear(*t, 1.5, bias, dropout_p=dropout_p, backend=backend),
                                 leaves, dy)
    ref_leaves = [t.double().requires_grad_(True) for t in (x, weight, lora_a, lora_b)]
    expected = _penalty_gradients(lambda *t: reference.lora_linear(*t, 1.5, bias, mask), ref_leaves, dy.double())
    for name, g, e in zip(("x", "weight", "lora_a", "lora_b"), got, expected):
        assert_close(g, e, dtype, f"d(penalty)/d{name}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("trained", ["lora_a", "lora_b"])
def test_double_backward_of_one_factor_alone_matches_the_reference(backend, trained, device):
    """create_graph=True with one factor alone requiring grad (x, weight and the other factor frozen, as in a
    gradient penalty on one adapter matrix): its gradient, and that gradient's derivative with respect to dY, are the
    reference's. The differentiable backward builds S = x·Aᵀ only for dB and dA only where lora_a needs it, by
    ctx.needs_input_grad; test_double_backward_matches_the_reference trains every input at once, where a flag read
    for the wrong input (need_a for need_b) gave the same result. dY requires grad: neither factor's gradient
    depends on that factor itself, so its derivative in dY is the one there is."""
    backend_or_skip(backend, device)
    x, weight, lora_a, lora_b, bias = lora_inputs(6, 16, 12, 4, torch.float32, device)
    dy = randn(6, 12, device=device)
    results = []
    for fn, dtype in ((lambda *t: lora_linear(*t, 1.5, bias, backend=backend), torch.float32),
                      (lambda *t: reference.lora_linear(*t, 1.5, bias), torch.float64)):
        inputs = {name: t.to(dtype) for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a),
                                                    ("lora_b", lora_b))}
        inputs[trained].requires_grad_(True)
        dy_leaf = dy.to(dtype).requires_grad_(True)
        first, = torch.autograd.grad(fn(*inputs.values()), inputs[trained], dy_leaf, create_graph=True)
        second, = torch.autograd.grad(first.square().sum(), dy_leaf)
        results.append((first, second))
    (first, second), (expected_first, expected_second) = results
    assert_close(first, expected_first, torch.float32, f"d{trained}")
    assert_close(second, expected_second, torch.float32, f"d(|d{trained}|²)/d(dy)")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradgradcheck_float64(backend):
    backend_or_skip(backend, "cpu")
    x, weight, lora_a, lora_b, bias = (t.double().requires_grad_(True)
                                       for t in lora_inputs(3, 5, 4, 2, torch.float32, "cpu"))

    def fn(x, weight, lora_a, lora_b, bias):
        return lora_linear(x, weight, lora_a, lora_b, 0.7, bias, backend=backend)

    assert torch.autograd.gradgradcheck(fn, (x, weight, lora_a, lora_b, bias))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_func_transforms_match_the_reference(backend, device):
    """torch.func.grad over functional_call, vmap and jacrev of a LoRALinear run on every backend (torch refused the
    autograd.Function: "must override the setup_context staticmethod") and give the reference backend's results."""
    backend_or_skip(backend, device)
    from torch.func import functional_call, grad, jacrev, vmap

    import lora_kernels as lk
    layer = lk.LoRALinear(8, 6, r=2, lora_alpha=4, init_lora_weights=False, backend=backend).to(device)
    x = randn(5, 8, device=device)
    params = {name: p.detach() for name, p in layer.named_parameters()}

    def run(backend_name, transform):
        layer.backend = backend_name
        return transform()

    def loss_grads():
        return grad(lambda p: functional_call(layer, p, (x,)).square().sum())(params)

    got, expected = run(backend, loss_grads), run("reference", loss_grads)
    for name in ("lora_A.weight", "lora_B.weight"):
        assert_close(got[name], expected[name], torch.float32, f"torch.func.grad {name}")
    batched = run(backend, lambda: vmap(layer)(x[:, None, :]))
    assert_close(batched[:, 0], run("reference", lambda: layer(x)), torch.float32, "vmap")
    jacobian = run(backend, lambda: jacrev(lambda a: lk.lora_linear(x, layer.weight, a, layer.lora_B.weight, 2.0,
                                                                    backend=backend))(params["lora_A.weight"]))
    expected_jacobian = jacrev(lambda a: reference.lora_linear(x, layer.weight, a, layer.lora_B.weight, 2.0).float())(
        params["lora_A.weight"])
    assert_close(jacobian, expected_jacobian, torch.float32, "jacrev")


@pytest.mark.parametrize("factor_requires_grad", [False, True], ids=["plain", "factor_requires_grad"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
def test_eager_forward_ad_gives_the_jvp_of_the_reference(backend, factor_requires_grad, device):
    """torch.autograd.forward_ad (eager forward-mode AD) through lora_linear: the tangent of y is the reference's JVP
    on every backend, tangents on x and lora_a at once, bias included. The kernels have no forward derivatives:
    Triton returned y without a tangent (zero, silently), the C++ ops raised, and so did the autograd Function
    once a factor required grad; the torch composition runs there now."""
    backend_or_skip(backend, device)
    import torch.autograd.forward_ad as fwad
    x, weight, lora_a, lora_b, bias = lora_inputs(5, 12, 7, 3, device=device)
    tx, ta = torch.randn_like(x), torch.randn_like(lora_a)
    lora_b.requires_grad_(factor_requires_grad)

    def run(x, a, name):
        return lora_linear(x, weight, a, lora_b, 0.7, bias, backend=name)

    _, expected = torch.func.jvp(lambda x, a: run(x, a, "reference"), (x, lora_a), (tx, ta))
    with fwad.dual_level():
        y = run(fwad.make_dual(x, tx), fwad.make_dual(lora_a, ta), backend)
        primal, tangent = fwad.unpack_dual(y)
    assert tangent is not None, "y lost its tangent"
    assert_close(primal, run(x, lora_a, "reference"), torch.float32, "y")
    assert_close(tangent, expected, torch.float32, "tangent")


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_quantized_weight_subclass_runs_the_torch_composition(backend):
    """A weight that is a tensor subclass (torchao's quantized weights; here conftest's QuantizedWeight): only its own
    ops read it, F.linear among them. "auto" picks the torch composition, which autograd differentiates (dX through
    the subclass's F.linear), and gives the outputs and gradients of the same call on the dequantized weight. Before,
    "auto" ran the cpu kernel ("QuantizedWeight dispatch: attempting to run unimplemented operator
    lora_kernels.lora_fwd") and the torch backend's backward failed at dY @ W (aten.mm)."""
    quantized, plain = quantized_linear(24, 16)
    x, _, lora_a, lora_b, _ = lora_inputs(5, 24, 16, 4)
    results = []
    for weight in (quantized.weight, plain.weight):
        leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
        y = lora_linear(leaves[0], weight, leaves[1], leaves[2], 2.0, quantized.bias, backend=backend)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        results.append([y.detach()] + [leaf.grad for leaf in leaves])
    for name, got, expected in zip(("y", "dx", "d_lora_a", "d_lora_b"), *results):
        torch.testing.assert_close(got, expected, msg=name)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_quantized_weight_subclass_refuses_the_kernel_backends(backend):
    """Named, instead of "Attempted to access the data pointer on an invalid python storage" (triton) or the
    subclass's "unimplemented operator" (cpu: lora_fwd; reference: its float64 copy)."""
    backend_or_skip(backend, torch.device("cpu"))
    quantized, _ = quantized_linear(24, 16)
    x, _, lora_a, lora_b, _ = lora_inputs(5, 24, 16, 4)
    with pytest.raises(TypeError, match=rf"lora_linear: backend '{backend}' cannot read weight, a conftest."
                                        rf"QuantizedWeight \(a tensor subclass.*use backend='torch'"):
        lora_linear(x, quantized.weight, lora_a, lora_b, backend=backend)


def test_quantized_weight_subclass_under_autocast_runs_its_own_linear_uncast():
    """Under torch.autocast a subclass weight is left uncast, as nn.Linear leaves it: its own F.linear runs under
    autocast on x and bias cast to the autocast dtype, and the output (in that dtype) and the gradients are those of
    the dequantized weight under autocast. Before, the cast of the weight failed ("QuantizedWeight dispatch: ...
    unimplemented operator aten._to_copy"; torchao 0.18's Int8Tensor ignores it and stays float32, which the
    same-dtype check then refused)."""
    quantized, plain = quantized_linear(24, 16)
    x, _, lora_a, lora_b, _ = lora_inputs(5, 24, 16, 4)
    results = []
    for weight in (quantized.weight, plain.weight):
        leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lora_linear(leaves[0], weight, leaves[1], leaves[2], 2.0, quantized.bias)
        y.float().backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        results.append([y.detach()] + [leaf.grad for leaf in leaves])
    assert results[0][0].dtype == torch.bfloat16 and results[0][1].dtype == torch.float32
    for name, got, expected in zip(("y", "dx", "d_lora_a", "d_lora_b"), *results):
        assert_close(got, expected, torch.bfloat16, name)


@pytest.mark.parametrize("create_graph", [False, True])
def test_torch_backend_fp16_backward_is_as_close_as_peft_for_a_small_scaled_lora_b(create_graph):
    """The torch backend's backward folded a scaling of at most 1 into the fp16 B before its GEMM: s·B ~ 1e-5
    (early training: B ~ 1e-4, s = 1/8) lands in fp16's subnormals, and dA came out ~4.7x further from float64
    than PEFT's (which scales dY first, as _scaled_dy_products now does)."""
    torch.manual_seed(0)
    m, k, n, r, scaling = 64, 256, 256, 16, 0.125
    x, w = torch.randn(m, k).half(), (0.02 * torch.randn(n, k)).half()
    a, b, dy = (0.02 * torch.randn(r, k)).half(), (1e-4 * torch.randn(n, r)).half(), torch.randn(m, n).half()
    a64 = a.double().requires_grad_(True)
    (x.double() @ w.double().T + scaling * (x.double() @ a64.T) @ b.double().T).backward(dy.double())
    peft_a = a.clone().requires_grad_(True)
    (x @ w.T + ((x @ peft_a.T) @ b.T) * scaling).backward(dy)
    ours_a = a.clone().requires_grad_(True)
    y = functional.LoRALinearFunction.apply(x, w, ours_a, b, None, scaling, 0.0, None, "torch")
    (grad,) = torch.autograd.grad(y, ours_a, dy, create_graph=create_graph)
    error = lambda g: float((g.double() - a64.grad).norm() / a64.grad.norm())
    assert error(grad) <= 1.5 * error(peft_a.grad), (error(grad), error(peft_a.grad))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_scaling_inexact_in_the_input_dtype_is_applied_unrounded(backend, dtype, device):
    """A scaling that is not exact in x's dtype (PEFT's lora_alpha=16, r=3: 16/3) reaches the LoRA term unrounded. The
    other kernel tests use scalings exact in bf16 and fp16 (0.25 ... 3), where rounding it cannot show, and their
    relative error of the whole y (2e-2 in bf16, the LoRA term diluted by the base and the bias) could not see its
    0.2%: the Triton launchers passing float(torch.tensor(scaling).to(x.dtype)) passed every test (helper 165)."""
    backend_or_skip(backend, device)
    scaling = 16 / 3
    assert torch.tensor(scaling, dtype=dtype).item() != scaling
    x, _, lora_a, lora_b, _ = lora_inputs(256, 256, 192, 6, dtype, device, bias=False)
    weight = torch.zeros(192, 256, dtype=dtype, device=device)  # y and dX are the LoRA branch alone
    dy = randn(256, 192, dtype=dtype, device=device)
    y, grads = _run(backend, x, weight, lora_a, lora_b, None, scaling, dy)
    expected = reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, scaling)
    expected["y"] = reference.lora_linear(x, weight, lora_a, lora_b, scaling)
    results = {"y": y, "x": grads["x"], "lora_a": grads["lora_a"], "lora_b": grads["lora_b"]}
    if backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        # the interpreter truncates the kernels' own bf16 stores (y, dX); dA and dB are cast by torch
        del results["y"], results["x"]
    for name, out in results.items():
        assert_summed_magnitude(out, expected[name], dtype, name)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
def test_functionalize_runs_lora_linear(backend, device):
    """torch.func.functionalize over lora_linear, as README promises with the grouped ops' test: eager's results on
    every backend (the transforms take the torch composition, so to rounding), the bias and a list-free scaling
    included, with the weight as the functionalized input too (helper 273: only the grouped ops had a test)."""
    backend_or_skip(backend, device)
    from torch.func import functionalize
    x, weight, lora_a, lora_b, bias = lora_inputs(6, 8, 5, 3, torch.float32, device)
    call = lambda x: lora_linear(x, weight, lora_a, lora_b, 0.7, bias, backend=backend)
    assert_close(functionalize(call)(x), call(x), torch.float32, "y")
    of_weight = lambda w: lora_linear(x, w, lora_a, lora_b, 0.7, bias, backend=backend)
    assert_close(functionalize(of_weight)(weight), of_weight(weight), torch.float32, "y of weight")


def test_a_scaling_whose_dropout_multiple_overflows_is_refused_naming_both(device):
    """The cpu and cuda kernels take scaling / (1 - p) as one float32 factor: a scaling within float32's range
    whose multiple is not was refused by the op, naming a scaling the caller never passed (helper 285)."""
    backend = "cuda" if device == "cuda" else "cpu"
    backend_or_skip(backend, device)
    x, weight, lora_a, lora_b, _ = lora_inputs(4, 8, 6, 2, device=device, bias=False)
    with pytest.raises(ValueError, match=rf"lora_linear: scaling 2e\+38 with dropout_p 0.5: the {backend} kernels "
                                         r"apply scaling / \(1 - dropout_p\) = 4e\+38 in one factor, past float32's "
                                         r"range"):
        lora_linear(x, weight, lora_a, lora_b, 2.0e38, dropout_p=0.5, backend=backend)


@pytest.mark.parametrize("device_type", ["cpu", "mps", "maia"])
def test_autocast_dtype_sees_autocast_on_devices_its_quick_check_does_not_cover(device_type):
    """autocast_dtype answers "off" from one call where no autocast is on; torch's call does not see MPS (or MAIA)
    autocast, where it had answered "off" inside torch.autocast("mps") (review 290)."""
    from lora_kernels._ext import autocast_dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autocast on a device this machine lacks
        with torch.autocast(device_type, dtype=torch.float16):
            assert autocast_dtype(torch.device(device_type)) == torch.float16
    assert autocast_dtype(torch.device(device_type)) is None
