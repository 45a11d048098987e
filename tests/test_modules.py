"""LoRALinear as a drop-in for nn.Linear, and inject_lora / merge_and_unload over a model."""

import copy
import math
import pathlib
import re
import warnings

import pytest
import torch
from torch import nn

from conftest import assert_close
import lora_kernels as lk
from lora_kernels import (LoRALinear, count_parameters, inject_lora, load_peft_adapter, merge_and_unload, reference,
                          save_peft_adapter)


def _trained(layer):
    """Gives B non-zero values so the adapter changes the output (a fresh B is zero)."""
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


def test_fresh_layer_equals_its_base_and_uses_peft_names():
    linear = nn.Linear(20, 12)
    expected = linear(torch.randn(1, 20))  # noqa: F841  (exercise the module once)
    layer = LoRALinear.from_linear(linear, r=4, lora_alpha=8)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.weight.shape == (4, 20) and layer.lora_B.weight.shape == (12, 4)
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}
    x = torch.randn(3, 7, 20)
    torch.testing.assert_close(layer(x), linear(x))
    # A base checkpoint loads unchanged (strict=False only because it lacks the adapter keys).
    missing, unexpected = layer.load_state_dict(nn.Linear(20, 12).state_dict(), strict=False)
    assert sorted(missing) == ["lora_A.weight", "lora_B.weight"] and not unexpected


def test_scaling_rslora_and_gaussian_init():
    assert LoRALinear(8, 8, r=4, lora_alpha=16).scaling == 4.0
    assert LoRALinear(8, 8, r=4, lora_alpha=16, use_rslora=True).scaling == 16 / math.sqrt(4)
    layer = LoRALinear(64, 8, r=16, init_lora_weights="gaussian")
    assert abs(layer.lora_A.weight.std().item() - 1 / 16) < 0.02
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoRALinear(8, 8, init_lora_weights="orthogonal-ish")
    with pytest.raises(ValueError, match="r expected an int >= 1, got 0"):
        LoRALinear(8, 8, r=0)
    with pytest.raises(TypeError, match="LoRALinear: lora_alpha expected a number, got None"):
        LoRALinear(8, 8, lora_alpha=None)
    with pytest.raises(ValueError, match=r"from_linear: lora_dropout expected a number in \[0, 1\), got '0\.1'"):
        LoRALinear.from_linear(nn.Linear(8, 8), lora_dropout="0.1")


def test_forward_matches_reference_and_trains_only_the_adapter():
    layer = _trained(LoRALinear(24, 10, r=4, lora_alpha=8, dtype=torch.float64))
    x = torch.randn(5, 24, dtype=torch.float64)
    expected = reference.lora_linear(x, layer.weight, layer.lora_A.weight, layer.lora_B.weight, 2.0, layer.bias)
    torch.testing.assert_close(layer(x), expected)
    layer(x).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None


@pytest.mark.parametrize("policy", ["matmuls", "every_op"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "reference"])
def test_selective_activation_checkpointing_gives_the_plain_runs_outputs_and_gradients(backend, policy):
    """Selective activation checkpointing, as README says: a policy that saves matmuls (torchtitan's), and one that
    saves every op with allow_cache_entry_mutation=True (the layers write temporaries in place). Dropout on."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    from lora_kernels import backends
    reason = backends.unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    from lora_kernels.triton import INTERPRET
    if backend == "triton" and policy == "every_op" and INTERPRET:
        pytest.skip("the Triton interpreter crashes (segfault) in the recompute that replays every op (README)")
    saved = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)

    def save(ctx, op, *args, **kwargs):
        return (CheckpointPolicy.MUST_SAVE if policy == "every_op" or op in saved
                else CheckpointPolicy.PREFER_RECOMPUTE)

    context_fn = functools.partial(create_selective_checkpoint_contexts, save,
                                   allow_cache_entry_mutation=policy == "every_op")
    layer = LoRALinear(32, 16, r=4, lora_dropout=0.3, init_lora_weights=False, backend=backend)
    x = torch.randn(8, 32, requires_grad=True)
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(5)
        y = checkpoint(layer, x, use_reentrant=False, context_fn=context_fn) if checkpointed else layer(x)
        y.square().sum().backward()
        results.append([y.detach()] + [t.grad.clone() for t in (x, layer.lora_A.weight, layer.lora_B.weight)])
        x.grad = layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    for name, plain, checkpointed in zip(("y", "dx", "dA", "dB"), *results):
        assert torch.equal(plain, checkpointed), name


def test_dropout_only_in_training_mode():
    layer = _trained(LoRALinear(32, 16, r=4, lora_dropout=0.5))
    x = torch.randn(8, 32)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    eval_out = layer(x)
    layer.train()
    assert not torch.allclose(layer(x), eval_out)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_activation_checkpointing_recomputes_the_same_dropout_mask(backend, use_reentrant):
    """Under torch.utils.checkpoint (gradient checkpointing in HF models) the forward runs twice; the recomputation
    must draw the same dropout mask, so outputs and gradients equal those of the plain run bit for bit."""
    from lora_kernels import backends
    reason = backends.unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    layer = LoRALinear(32, 16, r=4, lora_dropout=0.3, init_lora_weights=False, backend=backend)
    x = torch.randn(8, 32, requires_grad=True)
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(5)
        y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=use_reentrant) if checkpointed else layer(x)
        y.square().sum().backward()
        results.append([y.detach()] + [t.grad.clone() for t in (x, layer.lora_A.weight, layer.lora_B.weight)])
        x.grad = layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    assert not torch.equal(results[0][0], layer.eval()(x)), "dropout must be active for this test to mean anything"
    for name, plain, checkpointed in zip(("y", "dx", "dA", "dB"), *results):
        assert torch.equal(plain, checkpointed), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_unmerge_round_trip(dtype):
    layer = _trained(LoRALinear(48, 40, r=8, lora_alpha=16, dtype=dtype)).eval()
    x = torch.randn(6, 48, dtype=dtype)
    before, base_weight = layer(x), layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    assert_close(layer(x), before, dtype, "merged output")
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    assert_close(layer.weight, base_weight, dtype, "unmerged weight")
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unmerge_subtracts_what_merge_added_after_the_factors_changed(dtype):
    """An optimizer step while merged (zeroed, not None, gradients: AdamW's momentum still moves the factors), a
    factor's load_state_dict and a new scaling: unmerge subtracted the delta of the factors as they are now, which
    left the base weight off by the difference (2.7 here), without a word. It subtracts what merge added; then the
    layer computes its current factors, as a layer made with them."""
    layer = _trained(LoRALinear.from_linear(nn.Linear(16, 12, dtype=dtype), r=4, fan_in_fan_out=False))
    base_weight = layer.weight.detach().clone()
    optimizer = torch.optim.AdamW([layer.lora_A.weight, layer.lora_B.weight], lr=0.1)
    layer(torch.randn(5, 16, dtype=dtype)).float().sum().backward()
    optimizer.step()
    layer.merge()
    merged_weight = layer.weight.detach().clone()
    optimizer.zero_grad(set_to_none=False)
    optimizer.step()
    layer.lora_B.load_state_dict({"weight": torch.randn(12, 4)})
    layer.scaling = 3.0
    # what save_peft_adapter writes as a targeted lm_head's base weight while merged
    assert_close(layer._unmerged_weight(), base_weight, dtype, "base weight a save writes while merged")
    assert torch.equal(layer.weight, merged_weight)
    layer.unmerge()
    assert_close(layer.weight, base_weight, dtype, "unmerged weight")
    x = torch.randn(3, 16, dtype=dtype)
    expected = nn.functional.linear(x, layer.weight, layer.bias) + 3.0 * (x @ layer.lora_A.weight.to(dtype).T) @ \
        layer.lora_B.weight.to(dtype).T
    assert_close(layer(x), expected, dtype, "output of the current factors")
    layer.merge()  # merged again: the new factors are what unmerge subtracts next
    with torch.no_grad():
        layer.lora_A.weight.mul_(2.0)
    layer.unmerge()
    assert_close(layer.weight, base_weight, dtype, "unmerged weight, merged twice")


def test_safe_merge_refuses_non_finite_and_leaves_the_layer_unchanged():
    layer = _trained(LoRALinear(8, 6, r=2))
    with torch.no_grad():
        layer.lora_A.weight[0, 0] = float("inf")
    weight_before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.merge(safe_merge=True)
    assert not layer.merged and torch.equal(layer.weight, weight_before)


def test_a_layer_built_from_scratch_is_initialised_as_nn_linear():
    """LoRALinear(in, out) is nn.Linear(in, out) plus a fresh adapter: weight and bias uniform within nn.Linear's
    bound 1/sqrt(in) and spanning it, the weight stored [in, out] with fan_in_fan_out (its bound still from in),
    no bias with bias=False. init_lora_weights=False draws B as A is (kaiming-uniform, not gaussian); 16-bit layers
    get float32 factors by default; the backend is kept and used by the forward."""
    bound = 1 / math.sqrt(4)
    for fan_in_fan_out in (False, True):
        layer = LoRALinear(4, 256, fan_in_fan_out=fan_in_fan_out)
        assert layer.weight.shape == ((4, 256) if fan_in_fan_out else (256, 4))
        for tensor in (layer.weight, layer.bias):
            assert tensor.abs().max() <= bound and tensor.max() > bound / 2 and tensor.min() < -bound / 2
    assert LoRALinear(4, 6, bias=False).bias is None
    layer = LoRALinear(256, 64, r=16, init_lora_weights=False)
    for factor, fan_in in ((layer.lora_A, 256), (layer.lora_B, 16)):
        assert factor.weight.abs().max() <= 1 / math.sqrt(fan_in) and factor.weight.max() > 0.5 / math.sqrt(fan_in)
    assert LoRALinear(4, 6, dtype=torch.bfloat16).lora_A.weight.dtype == torch.float32
    layer = LoRALinear(4, 6, backend="cuda")  # a valid name, unavailable for CPU tensors: the forward names it
    assert layer.backend == "cuda" and "backend='cuda'" in repr(layer)
    with pytest.raises(ValueError, match=r"lora_linear: backend 'cuda' is not available for cpu tensors"):
        layer(torch.randn(2, 4))


def test_rslora_scales_the_forward_by_alpha_over_sqrt_r():
    layer = _trained(LoRALinear(8, 6, r=4, lora_alpha=8, use_rslora=True, dtype=torch.float64))
    x = torch.randn(3, 8, dtype=torch.float64)
    expected = reference.lora_linear(x, layer.weight, layer.lora_A.weight, layer.lora_B.weight, 8 / 2, layer.bias)
    torch.testing.assert_close(layer(x), expected)


def test_a_16_bit_merge_rounds_once_and_safe_merge_checks_the_stored_weight():
    """merge, unmerge and to_linear add scaling * B @ A, computed in float32 (from 16-bit factors too, with
    autocast_adapter_dtype=False), to the weight in float32 and round once to the weight's dtype. safe_merge checks
    the weight as it would be stored: a float16 sum past 65504 is finite in float32 but Inf in the weight; NaN is
    refused as Inf is."""
    for float32_factors in (True, False):
        layer = _trained(LoRALinear(64, 48, r=8, lora_alpha=16, dtype=torch.bfloat16,
                                    autocast_adapter_dtype=float32_factors))
        delta = 2.0 * (layer.lora_B.weight.float() @ layer.lora_A.weight.float())
        merged = (layer.weight.float() + delta).bfloat16()
        assert torch.equal(layer.to_linear().weight, merged)
        layer.merge()
        assert torch.equal(layer.weight, merged)
        layer.unmerge()
        assert torch.equal(layer.weight, (merged.float() - delta).bfloat16())

    layer = LoRALinear(4, 2, r=1, lora_alpha=8, dtype=torch.float16)
    with torch.no_grad():
        layer.weight.fill_(60000.0)
        layer.lora_A.weight.fill_(1.0)
        layer.lora_B.weight.fill_(1000.0)  # + 8 * 1000: 68000 in float32, Inf in float16
    weight = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="safe_merge found NaN/Inf"):
        layer.merge(safe_merge=True)
    with torch.no_grad():
        layer.lora_B.weight.fill_(0.0)
        layer.lora_A.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="safe_merge found NaN/Inf"):
        layer.merge(safe_merge=True)
    assert not layer.merged and torch.equal(layer.weight, weight)


def test_a_fan_in_fan_out_layer_computes_with_the_transposed_weight_merged_or_not():
    """fan_in_fan_out stores the weight [in, out] (a Conv1D's layout): the forward, the base-only forward, merge and
    to_linear (a Conv1D of the layer's dtype) all use its transpose."""
    from transformers.pytorch_utils import Conv1D
    layer = _trained(LoRALinear(12, 5, r=2, fan_in_fan_out=True, dtype=torch.float64))
    x = torch.randn(3, 12, dtype=torch.float64)
    expected = reference.lora_linear(x, layer.weight.T, layer.lora_A.weight, layer.lora_B.weight, layer.scaling,
                                     layer.bias)
    torch.testing.assert_close(layer(x), expected)
    with layer.disable_adapter():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight.T, layer.bias))
    unwrapped = layer.to_linear()
    assert type(unwrapped) is Conv1D and unwrapped.weight.dtype == torch.float64
    torch.testing.assert_close(unwrapped(x), expected)
    layer.merge()
    torch.testing.assert_close(layer(x), expected)


def test_a_conv1d_is_wrapped_with_fan_in_fan_out_only():
    from transformers.pytorch_utils import Conv1D
    conv1d = Conv1D(6, 12)  # 6 outputs, 12 inputs: weight [12, 6]
    with pytest.raises(TypeError, match=r"from_linear: linear is a transformers Conv1D, .* pass fan_in_fan_out=True"):
        LoRALinear.from_linear(conv1d)
    layer = LoRALinear.from_linear(conv1d, r=2, fan_in_fan_out=True)
    assert (layer.in_features, layer.out_features) == (12, 6) and layer.lora_A.weight.shape == (2, 12)
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), conv1d(x))


def test_to_linear_keeps_the_bias_the_merged_state_and_the_device():
    """A layer without bias unwraps to one without; a merged layer's weight already holds the adapter (added once);
    the new layer is made on the layer's device in its dtype (meta stands in for a GPU here)."""
    from transformers.pytorch_utils import Conv1D  # noqa: F401  (fan_in_fan_out layers unwrap to it)
    layer = _trained(LoRALinear(8, 6, r=2, bias=False))
    x = torch.randn(3, 8)
    expected = layer(x)
    assert layer.to_linear().bias is None
    torch.testing.assert_close(layer.to_linear()(x), expected)
    layer.merge()
    torch.testing.assert_close(layer.to_linear()(x), expected)
    # a base trained with the adapter (inject_lora's bias="lora_only" / "all", or a weight unfrozen by hand) stays
    # trainable once unwrapped: the new layer had frozen it, and further training left it unchanged, silently
    layer = LoRALinear(8, 6, r=2)
    layer.bias.requires_grad_(True)
    unwrapped = layer.to_linear()
    assert unwrapped.bias.requires_grad and not unwrapped.weight.requires_grad
    layer.weight.requires_grad_(True)
    assert layer.to_linear().weight.requires_grad
    for fan_in_fan_out in (False, True):
        with torch.device("meta"):
            layer = LoRALinear(8, 6, fan_in_fan_out=fan_in_fan_out, dtype=torch.bfloat16)
        unwrapped = layer.to_linear()
        assert unwrapped.weight.is_meta and unwrapped.weight.dtype == torch.bfloat16
        assert unwrapped.weight.shape == layer.weight.shape


def test_the_factors_are_made_on_the_base_weights_device():
    layer = LoRALinear.from_linear(nn.Linear(8, 6, device="meta"))  # meta stands in for a GPU here
    assert layer.lora_A.weight.is_meta and layer.lora_B.weight.is_meta


def test_repr_names_every_setting():
    layer = LoRALinear(8, 6, r=2, lora_alpha=4, bias=False, use_rslora=True, fan_in_fan_out=True, backend="torch")
    assert re.sub(r"\s+", " ", repr(layer)) == (
        "LoRALinear( in_features=8, out_features=6, bias=False, r=2, lora_alpha=4, scaling=2.82843, lora_dropout=0.0, "
        "use_rslora=True, fan_in_fan_out=True, merged=False, backend='torch' "
        "(lora_A): LoRAFactor(shape=(2, 8)) (lora_B): LoRAFactor(shape=(6, 2)) )")


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu", "triton", "reference"])
def test_disable_adapter_context(backend, device):
    # every backend: the context had been tested with auto's only, and a forward that honoured disable_adapters on
    # all backends but one passed the suite (helper 159's mutation audit)
    from conftest import backend_or_skip
    if backend != "auto":
        backend_or_skip(backend, device)
    layer = _trained(LoRALinear(16, 8, r=2, backend=backend, device=device))
    x = torch.randn(3, 16, device=device)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    with layer.disable_adapter():
        torch.testing.assert_close(layer(x), base)
    with lk.disable_adapter(nn.Sequential(layer)):
        torch.testing.assert_close(layer(x), base)
    assert not torch.allclose(layer(x), base)
    assert "r=2" in repr(layer) and "scaling=4" in repr(layer)


def test_nested_disable_adapter_restores_the_outer_state():
    """Each disable_adapter() context puts back the flag it found: leaving an inner one (a helper that disables the
    adapter for its own reference pass) inside an outer one, or inside the model-level context, keeps the layer
    disabled until the outer context ends."""
    from lora_kernels import disable_adapter
    layer = _trained(LoRALinear(16, 8, r=2))
    x = torch.randn(3, 16)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    with layer.disable_adapter():
        with layer.disable_adapter():
            pass
        torch.testing.assert_close(layer(x), base)
    model = nn.Sequential(layer)
    with disable_adapter(model):
        with layer.disable_adapter():
            pass
        torch.testing.assert_close(model(x), base)
    assert not torch.allclose(layer(x), base)


def test_disable_adapter_contexts_that_exit_out_of_order_leave_the_adapter_on():
    """Two disable_adapter contexts that exit in the order they were entered (two asyncio tasks or threads each
    running a reference pass: A enters, B enters, A exits, B exits): each had put back the flag it saw on entry, so B
    restored A's "disabled" and the model computed the base model for good, silently; and B ran with the adapter
    on once A had left. Contexts are counted: disabled while any is open, as before the first once all are closed."""
    from lora_kernels import disable_adapter
    layer = _trained(LoRALinear(16, 8, r=2))
    x = torch.randn(3, 16)
    adapted, base = layer(x), nn.functional.linear(x, layer.weight, layer.bias)
    model = nn.Sequential(layer)
    for first, second in [(layer.disable_adapter(), layer.disable_adapter()),
                          (disable_adapter(model), layer.disable_adapter()),
                          (layer.disable_adapter(), disable_adapter(model))]:
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        torch.testing.assert_close(layer(x), base)  # the second context is still open
        second.__exit__(None, None, None)
        assert not layer.disable_adapters
        torch.testing.assert_close(layer(x), adapted)
    layer.disable_adapters = True  # disabled before any context: stays so after them
    with disable_adapter(model), layer.disable_adapter():
        pass
    assert layer.disable_adapters
    layer.disable_adapters = False
    with layer.disable_adapter():  # a copy made inside a context is in none (it kept counting this one as open)
        copied = copy.deepcopy(layer)
    assert copied.disable_adapters
    copied.disable_adapters = False
    with copied.disable_adapter():
        pass
    assert not copied.disable_adapters


def test_disable_adapter_inside_a_compiled_step():
    """DPO's reference pass inside the compiled training step: `with disable_adapter(model):` traces in one graph
    (the count's lock is not taken while compiling: dynamo cannot enter a lock, which broke the graph, and failed
    under fullgraph=True), once: the count is set when the layer is made (the first trace guarded on its absence,
    which the first call ended, and the second call compiled again)."""
    from torch._dynamo.testing import CompileCounter

    from lora_kernels import disable_adapter
    layer = _trained(LoRALinear(16, 8, r=2, backend="torch"))
    model = nn.Sequential(layer)

    def step(x):
        with disable_adapter(model):
            base = model(x)
        with layer.disable_adapter():
            base_again = layer(x)
        return model(x) - base, base_again

    x = torch.randn(3, 16)
    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for _ in range(3):
        for got, expected in zip(compiled(x), step(x)):
            torch.testing.assert_close(got, expected)
    assert counter.frame_count == 1
    assert not layer.disable_adapters and layer._disabled_contexts == 0


def test_an_eager_thread_keeps_the_locks_and_the_heads_warning_while_another_thread_compiles():
    """The name table's and disable_adapter's locks (and the heads warning) are skipped inside dynamo's trace only:
    torch.compiler.is_compiling() is one flag for the process, True in every thread while any compiles, so an eager
    thread's loads by name and deletes stopped taking turns then (two loads could pick one slot)."""
    import threading

    from lora_kernels import modules
    compiling, release = threading.Event(), threading.Event()

    def slow_backend(graph_module, inputs):  # a long compile (Inductor on a large model)
        compiling.set()
        release.wait(30)
        return graph_module.forward

    compiled = torch.compile(lambda x: x * 2, backend=slow_backend)
    thread = threading.Thread(target=compiled, args=(torch.randn(3),))
    thread.start()
    try:
        assert compiling.wait(30)  # torch.compiler.is_compiling() is True here now (torch 2.11 to 2.14)
        with modules.adapter_table_lock():
            assert modules._ADAPTER_TABLE_LOCK.locked()
        assert modules._disable_lock() is modules._DISABLE_LOCK
        model = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), ["0"], r=2, modules_to_save=["1"])
        with pytest.warns(UserWarning, match=r"modules_to_save \['1'\] train in place"), lk.disable_adapter(model):
            pass
    finally:
        release.set()
        thread.join()


def test_an_error_inside_a_layers_disable_adapter_puts_the_adapter_back():
    """A reference pass that raises inside `with layer.disable_adapter():` (an out-of-memory error that a training
    loop catches and retries) leaves the adapter on: a context that restored the flag on a normal exit only left the
    layer computing the base model for the rest of training, silently. (The model-level context's error path:
    test_peft_io.py::test_an_error_inside_the_adapter_contexts_propagates_and_the_setting_is_restored.)"""
    layer = _trained(LoRALinear(16, 8, r=2))
    x = torch.randn(3, 16)
    adapted = layer(x)
    with pytest.raises(KeyError, match="a failed reference pass"), layer.disable_adapter():
        raise KeyError("a failed reference pass")
    assert not layer.disable_adapters
    torch.testing.assert_close(layer(x), adapted)


def test_disabling_a_merged_layer_is_an_error_not_the_merged_output():
    """A merged layer's weight holds the adapter, so 'disabled' cannot be computed from it: the context refuses it
    on entry (its forward had raised, past the `with` line), and a forward raises for a layer merged inside it,
    instead of silently returning the adapted output."""
    layer = _trained(LoRALinear(16, 8, r=2))
    x = torch.randn(3, 16)
    layer.merge()
    for training in (True, False):  # a reference pass in eval mode (DPO's reference model) is refused alike
        with pytest.raises(RuntimeError, match="LoRALinear.disable_adapter: cannot disable the adapter of a merged "
                                               "layer; call unmerge"):
            layer.train(training).disable_adapter().__enter__()
        assert not layer.disable_adapters
    layer.unmerge()
    with layer.disable_adapter():
        layer.merge()
        with pytest.raises(RuntimeError, match="LoRALinear: cannot disable the adapter of a merged layer"):
            layer(x)
        layer.unmerge()
    with layer.disable_adapter():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj, self.o_proj = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.o_proj(self.v_proj(self.norm(x))) + self.q_proj(x)


def _model():
    return nn.Sequential(TinyBlock(), TinyBlock())


def test_inject_lora_by_names_freezes_the_rest_and_counts_parameters():
    model = _model()
    x = torch.randn(2, 16)
    before = model(x)
    inject_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    assert isinstance(model[0].q_proj, LoRALinear) and isinstance(model[1].v_proj, LoRALinear)
    assert isinstance(model[0].o_proj, nn.Linear) and not isinstance(model[0].o_proj, LoRALinear)
    torch.testing.assert_close(model(x), before)
    trainable, total = count_parameters(model)
    assert trainable == 2 * (4 * (16 + 16) + 4 * (16 + 8))  # sum of r·(K + N) over injected layers
    assert all(("lora_" in name) == p.requires_grad for name, p in model.named_parameters())
    assert "0.q_proj.lora_A.weight" in model.state_dict() and "0.q_proj.weight" in model.state_dict()


@pytest.mark.parametrize("utility", ["count_parameters", "trainable_parameters_summary"])
def test_parameter_counts_refuse_what_is_not_a_module(utility):
    """A TypeError naming the function and the type it got (it was AttributeError: 'str' object has no attribute
    'parameters')."""
    with pytest.raises(TypeError, match=f"^{utility}: model expected a torch.nn.Module, got str$"):
        getattr(lk, utility)("model.safetensors")


def test_inject_lora_by_regex_and_exclude():
    model = inject_lora(_model(), r"1\.(q|o)_proj", r=2)
    assert isinstance(model[1].q_proj, LoRALinear) and isinstance(model[1].o_proj, LoRALinear)
    assert not isinstance(model[0].q_proj, LoRALinear)
    model = inject_lora(_model(), ["q_proj"], exclude_modules=["0.q_proj"], r=2)
    assert not isinstance(model[0].q_proj, LoRALinear) and isinstance(model[1].q_proj, LoRALinear)


def test_a_target_entry_that_matches_nothing_while_others_do_warns():
    """README: a target_modules entry that matches no module while others do warns (a misspelt or ported name
    would silently train a smaller adapter); the entries that match are wrapped. Every entry matching: no warning."""
    import warnings

    from lora_kernels import prepare_multi_adapter
    with pytest.warns(UserWarning, match=r"inject_lora: target_modules entries \['k_proj'\] match no module of the "
                                         r"model \(the others do\)"):
        model = inject_lora(_model(), ["q_proj", "k_proj"], r=2)
    assert isinstance(model[0].q_proj, LoRALinear) and isinstance(model[1].q_proj, LoRALinear)
    with pytest.warns(UserWarning, match=r"prepare_multi_adapter: target_modules entries \['k_proj'\] match no"):
        prepare_multi_adapter(_model(), ["q_proj", "k_proj"], max_adapters=2, max_rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject_lora(_model(), ["q_proj", "v_proj"], r=2)


def test_the_unmatched_target_warning_names_each_entry_once_by_whole_name_components():
    """An entry counts as matching when it is a module's whole name (a top-level "head") or its last components
    ("qk_proj" does not end in ".k_proj"); an entry given twice is named once."""
    model = nn.Module()
    model.head, model.block = nn.Linear(4, 4), nn.Module()
    model.block.qk_proj = nn.Linear(4, 4)
    with pytest.warns(UserWarning, match=r"inject_lora: target_modules entries \['k_proj'\] match no module of the "
                                         r"model \(the others do\)") as caught:
        inject_lora(model, ["head", "k_proj", "qk_proj", "k_proj"], r=2)
    assert len(caught) == 1


def test_target_names_and_patterns_match_whole_name_components_as_peft():
    """PEFT's matching: a regex str matches the whole module name, a list entry the whole name or its last
    components, a rank_pattern / alpha_pattern key the name's end after a dot: "proj" is not "q_proj", "q_proj" is
    not "0.q_proj" as a regex, and "0.q_proj" is not the end of "10.q_proj"."""
    from lora_kernels.modules import pattern_value
    for target in (["proj"], ["_proj"], "q_proj", r"\d\.q"):
        with pytest.raises(ValueError, match="matched no"):
            inject_lora(_model(), target)
    model = inject_lora(_model(), ["1.q_proj", "v_proj"], r=2, rank_pattern={"proj": 4, "0.v_proj": 6},
                        alpha_pattern={"_proj": 5.0})
    assert [(name, m.r, m.lora_alpha) for name, m in model.named_modules() if isinstance(m, LoRALinear)] == [
        ("0.v_proj", 6, 8), ("1.q_proj", 2, 8), ("1.v_proj", 2, 8)]
    assert pattern_value({"0.q_proj": 3}, "layers.10.q_proj", 8) == 8
    assert pattern_value({"0.q_proj": 3}, "layers.0.q_proj", 8) == 3


def test_tuple_and_set_targets_select_what_the_list_selects_and_an_empty_target_is_refused_by_name():
    """target_modules and exclude_modules as a tuple or a set (PEFT's LoraConfig keeps a set) select what the list
    does; an empty target_modules is refused as such, not reported as a list that "matched no nn.Linear"."""
    def wrapped(*args, **kwargs):
        model = inject_lora(_model(), *args, r=2, **kwargs)
        return [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]

    for kind in (tuple, set):
        assert wrapped(kind(["q_proj", "v_proj"])) == ["0.q_proj", "0.v_proj", "1.q_proj", "1.v_proj"], kind
        assert wrapped(["q_proj"], exclude_modules=kind(["0.q_proj"])) == ["1.q_proj"], kind
    for empty in ([], (), set(), ""):
        with pytest.raises(ValueError, match=rf"inject_lora: target_modules expected a regex string or a non-empty "
                                             rf"list of names, got {re.escape(repr(empty))}$"):
            inject_lora(_model(), empty)


def test_a_second_inject_lora_reaches_a_layer_whose_name_extends_a_wrapped_ones():
    """The walk skips what is inside a LoRA layer ("1.base_layer"), not the layers whose names start with its name
    ("10" beside the wrapped "1")."""
    model = nn.Sequential(*(nn.Linear(4, 4) for _ in range(11)))
    inject_lora(model, ["1"], r=2)
    inject_lora(model, ["10"], r=2)
    assert [name for name, m in model.named_modules() if isinstance(m, LoRALinear)] == ["1", "10"]


def test_all_linear_over_lora_layers_is_refused_untouched():
    """"all-linear" selects the LoRA layers of an earlier inject_lora too (PEFT's selects its own LoRA layers): one
    cannot take a second LoRA, so the call is refused by the layer's name, changing nothing."""
    model = inject_lora(_model(), ["q_proj"], r=2)
    before = _model_state(model)
    with pytest.raises(ValueError, match=r"inject_lora: module '0.q_proj' already has a LoRA adapter \(LoRALinear\)"):
        inject_lora(model, "all-linear")
    _assert_model_state(model, before)


def test_a_regex_matching_every_name_wraps_the_linear_layers_as_peft():
    """".*" also matches the model's own name, ""; the model is no target (PEFT wraps its linear layers only), so
    this is no TypeError about a Sequential."""
    peft = pytest.importorskip("peft")
    model = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), ".*", r=2)
    theirs = peft.get_peft_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), peft.LoraConfig(target_modules=".*"))
    assert [name for name, m in model.named_modules() if isinstance(m, LoRALinear)] == ["0", "1"] == [
        name.removeprefix("base_model.model.") for name, m in theirs.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)]


def test_a_str_target_naming_layers_says_it_is_a_regex_over_the_whole_name():
    """A str target_modules is a regex over the whole module name (PEFT's rule), so "q_proj" matches nothing in a
    model whose q_proj layers sit inside blocks; the error said only "matched no nn.Linear", which reads as a wrong
    name. It now says a list selects the layers by name; a regex that matches no layer name gets no such hint."""
    from lora_kernels import prepare_multi_adapter
    with pytest.raises(ValueError, match=r"a str is a regex over the whole module name .* pass a list, \['q_proj'\]"):
        inject_lora(_model(), "q_proj")
    with pytest.raises(ValueError, match=r"prepare_multi_adapter: .* pass a list, \['v_proj'\]"):
        prepare_multi_adapter(_model(), "v_proj", max_adapters=2, max_rank=2)
    with pytest.raises(ValueError, match=r"matched no nn.Linear in the model$"):
        inject_lora(_model(), r"\d\.q")
    assert isinstance(inject_lora(_model(), ["q_proj"])[0].q_proj, LoRALinear)


def test_inject_lora_errors_leave_the_model_untouched():
    model = _model()
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        inject_lora(model, ["k_proj"])
    with pytest.raises(TypeError, match=r"'0.norm' matches target_modules but is a LayerNorm; only nn.Linear and "
                                        r"transformers' Conv1D \(GPT-2's linear layer\) can be wrapped$"):
        inject_lora(model, ["q_proj", "norm"])  # no word of the convolutions and embeddings PEFT adapts
    # PEFT's layer selection options, checked by name (a str index list failed inside the matching: "'in <string>'
    # requires string as left operand")
    with pytest.raises(TypeError, match=r"inject_lora: layers_to_transform expected an int or a list of ints >= 0, "
                                        r"got '1'"):
        inject_lora(nn.Sequential(nn.Sequential(model)), ["q_proj"], layers_to_transform="1")  # 0.0.<layer>.q_proj
    with pytest.raises(TypeError, match=r"inject_lora: layers_pattern expected a str or a list of str, got 0"):
        inject_lora(model, ["q_proj"], layers_to_transform=[1], layers_pattern=0)
    with pytest.raises(TypeError, match=r"inject_lora: layers_pattern expected a str or a list of str, "
                                        r"got \['layers', 0\]"):
        inject_lora(model, ["q_proj"], layers_to_transform=[1], layers_pattern=["layers", 0])
    with pytest.raises(ValueError, match=r"inject_lora: layers_pattern '\(' is not a valid regular expression"):
        inject_lora(model, ["q_proj"], layers_to_transform=[1], layers_pattern="(")
    with pytest.raises(ValueError, match=r"inject_lora: layers_pattern '\(\?i\)LAYERS' is not a valid regular "
                                         r"expression \(global flags not at the start .*, inside "):
        inject_lora(model, ["q_proj"], layers_to_transform=[1], layers_pattern="(?i)LAYERS")  # alone it compiles
    with pytest.raises(TypeError, match=r"inject_lora: layers_to_transform expected an int or a list of ints >= 0, "
                                        r"got True"):  # a bool is no layer index (True would select layer 1)
        inject_lora(nn.Sequential(nn.Sequential(model)), ["q_proj"], layers_to_transform=True)
    for bad in (["1"], [True], [-1], [1.0], (1, "2")):  # as list entries too: none selects a layer, [True] layer 1
        with pytest.raises(TypeError, match=rf"inject_lora: layers_to_transform expected an int or a list of ints "
                                            rf">= 0, got {re.escape(repr(bad))}$"):
            inject_lora(nn.Sequential(nn.Sequential(model)), ["q_proj"], layers_to_transform=bad)
    # pairs PEFT's LoraConfig refuses: its matcher (and this one, before) ignored the layer options there
    for target in (r".*\.q_proj", "all-linear"):
        with pytest.raises(ValueError, match=r"inject_lora: layers_to_transform cannot be used with target_modules "
                                            r"given as a string"):
            inject_lora(model, target, layers_to_transform=[1])
        with pytest.raises(ValueError, match=r"inject_lora: layers_pattern cannot be used with target_modules "
                                            r"given as a string"):
            inject_lora(model, target, layers_pattern="layers")
    with pytest.raises(ValueError, match=r"inject_lora: layers_pattern 'layers' needs layers_to_transform"):
        inject_lora(model, ["q_proj"], layers_pattern="layers")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("edit", ["inject_lora", "prepare_multi_adapter"])
def test_an_interrupt_while_replacing_layers_leaves_the_model_as_it_was(edit, monkeypatch):
    """Ctrl-C (KeyboardInterrupt, no Exception) between two layer replacements: the layers replaced so far are put
    back and every parameter trains again, as after any other failure."""
    import lora_kernels
    from lora_kernels import modules
    model = _model()
    before = _model_state(model)
    replace, calls = modules._set_submodule, []

    def interrupted(model, name, module):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        replace(model, name, module)

    monkeypatch.setattr(modules, "_set_submodule", interrupted)
    with pytest.raises(KeyboardInterrupt):
        if edit == "inject_lora":
            inject_lora(model, ["q_proj", "v_proj"])
        else:
            lora_kernels.prepare_multi_adapter(model, ["q_proj", "v_proj"], max_adapters=2, max_rank=4)
    _assert_model_state(model, before)
    assert not hasattr(model, "lora_adapter_slots")


def test_layers_to_transform_takes_numpy_integers_and_ranges_as_peft():
    """PEFT tests `layer_index in layers_to_transform`, so a range or numpy integers (list(np.arange(...))) select
    layers there; they are TypeErrors nowhere here either."""
    np = pytest.importorskip("numpy")
    for layers in ([np.int64(1)], range(1, 2), np.int64(1), (1,)):
        model = inject_lora(nn.Sequential(nn.Sequential(_model())), ["q_proj"], layers_to_transform=layers)
        assert [name for name, m in model.named_modules() if isinstance(m, LoRALinear)] == ["0.0.1.q_proj"], layers


def test_a_layers_pattern_alternation_matching_without_an_index_selects_as_peft():
    """layers_pattern "layers|h" is a regex: in PEFT's index regex its first branch matches "enc.layers.0.q_proj"
    without the index group, which PEFT reads as no layer index (not selected). int(None) was a bare TypeError, for
    a file PEFT loads too (helper 271)."""
    def block():
        return nn.ModuleDict({"q_proj": nn.Linear(8, 8)})

    model = nn.ModuleDict({"h": nn.ModuleList([block(), block()]),
                           "enc": nn.ModuleDict({"layers": nn.ModuleList([block()])})})
    inject_lora(model, ["q_proj"], layers_to_transform=[0], layers_pattern="layers|h")
    chosen = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert chosen == ["h.0.q_proj"]
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers|h")
    assert [name for name, _ in model.named_modules()
            if name.endswith("q_proj") and peft.tuners.tuners_utils.check_target_module_exists(config, name)] == chosen


def test_an_empty_layers_pattern_needs_no_layers_to_transform_as_in_peft():
    """PEFT's LoraConfig asks for layers_to_transform only beside a non-empty layers_pattern: "" and [] mean no
    pattern, and select every layer the targets name."""
    LoraConfig = pytest.importorskip("peft").LoraConfig
    for empty in ("", []):
        LoraConfig(target_modules=["q_proj"], layers_pattern=empty)  # PEFT accepts it
        model = inject_lora(_model(), ["q_proj"], layers_pattern=empty)
        assert [name for name, m in model.named_modules() if isinstance(m, LoRALinear)] == ["0.q_proj", "1.q_proj"]


def test_merge_and_unload_gives_plain_linears_with_the_same_output():
    model = inject_lora(_model(), ["q_proj", "v_proj", "o_proj"], r=4, init_lora_weights=False)
    x = torch.randn(3, 16)
    before = model(x)
    merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    # the merged layers stay frozen like the rest of the base model (PEFT's merge_and_unload), in its eval mode
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
def test_merge_and_unload_leaves_the_random_state_as_it_was(fan_in_fan_out):
    """PEFT's merge_and_unload merges in place; here each unwrapped layer was built with its random initialisation
    (then overwritten), which moved the global RNG: a sampling or shuffle after it differed from the same script with
    PEFT. A Conv1D without a bias of its own unwraps with a zero bias (not an uninitialised one)."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D  # noqa: F401  (fan_in_fan_out layers unwrap to it)
    model = nn.Sequential(_trained(LoRALinear(8, 6, r=2, bias=False, fan_in_fan_out=fan_in_fan_out)), nn.ReLU(),
                          _trained(LoRALinear(6, 4, r=2, fan_in_fan_out=fan_in_fan_out)))
    x = torch.randn(3, 8)
    expected = model(x)
    torch.manual_seed(11)
    merge_and_unload(model)
    after = torch.rand(4)
    torch.manual_seed(11)
    assert torch.equal(after, torch.rand(4))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    if fan_in_fan_out:
        assert torch.equal(model[0].bias, torch.zeros(6))


def test_merge_and_unload_of_a_lora_layer_itself_returns_the_merged_linear():
    """Given a LoRALinear, it returned that layer unmerged, with the merged nn.Linear set as a child named "" (found
    by a review); it now returns the merged layer and leaves the LoRALinear as it was."""
    layer = _trained(LoRALinear(8, 6))
    x = torch.randn(3, 8)
    before, state = layer(x), {k: v.clone() for k, v in layer.state_dict().items()}
    merged = merge_and_unload(layer)
    assert type(merged) is nn.Linear and not merged.weight.requires_grad
    torch.testing.assert_close(merged(x), before, rtol=1e-5, atol=1e-5)
    assert list(layer._modules) == ["lora_A", "lora_B"] and not layer.merged
    assert layer.state_dict().keys() == state.keys()
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in state.items())


def test_merge_and_unload_gives_a_layer_held_under_two_names_one_merged_layer():
    """A LoRALinear held by its parent under two names (a layer applied twice) was replaced under its first name
    only: a LoRALinear stayed under the other (found by a review). Both names now hold the one merged layer."""
    model = nn.Sequential(_trained(LoRALinear(8, 8)))
    model.add_module("again", model[0])
    x = torch.randn(3, 8)
    before = model(x)
    merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules(remove_duplicate=False))
    assert type(model[0]) is nn.Linear and model.again is model[0]
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_of_a_model_without_lora_layers_is_an_error():
    """It returned such a model unchanged, silently: a second merge_and_unload, or a PeftModel passed to ours (whose
    LoRA layers are PEFT's), read as merged (helper 118)."""
    model = merge_and_unload(inject_lora(_model(), ["q_proj"], r=2))
    with pytest.raises(ValueError, match=r"^merge_and_unload: the model has no LoRALinear layers \(inject_lora or "
                                         r"load_peft_adapter puts them in\); the model is unchanged$"):
        merge_and_unload(model)


def test_merge_and_unload_that_cannot_finish_changes_nothing(monkeypatch):
    """A fan_in_fan_out LoRALinear unwraps to transformers' Conv1D, which needs transformers imported. That failed
    in to_linear after the layers before it had been replaced: a half-merged model. Now refused before any change."""
    import sys
    monkeypatch.delitem(sys.modules, "transformers.pytorch_utils", raising=False)
    model = nn.Sequential(_trained(LoRALinear(8, 6)), _trained(LoRALinear(6, 4, fan_in_fan_out=True)))
    layers, weights = list(model), [p.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"merge_and_unload: layers \['1'\] have fan_in_fan_out=True .* transformers "
                                           r"is not imported; the model is unchanged"):
        merge_and_unload(model)
    assert list(model) == layers and all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))
    with pytest.raises(RuntimeError, match=r"LoRALinear\.to_linear: fan_in_fan_out layers unwrap to transformers' "
                                           r"Conv1D, but transformers is not imported"):
        model[1].to_linear()


@pytest.mark.parametrize("break_last_layer", ["hook_computed_factor", "scaling_past_float32"])
def test_merge_and_unload_refuses_a_layer_to_linear_would_refuse_before_any_change(break_last_layer):
    """The deprecated weight_norm on a factor and a scaling attribute past float32's range are refused by to_linear;
    merge_and_unload met them in its replace loop, after the layers before had been replaced (helper 270)."""
    model = nn.Sequential(_trained(LoRALinear(8, 6)), _trained(LoRALinear(6, 4)))
    if break_last_layer == "hook_computed_factor":
        torch.nn.utils.weight_norm(model[1].lora_A)
        error, message = TypeError, r"merge_and_unload: module '1': lora_A\.weight is recomputed by a forward pre-hook"
    else:
        model[1].scaling = 1e39
        error, message = ValueError, r"merge_and_unload: module '1': the layer's scaling attribute .* 1e\+39, past"
    layers, weights = list(model), [p.clone() for p in model.parameters()]
    for safe_merge in (False, True):
        with pytest.raises(error, match=message):
            merge_and_unload(model, safe_merge=safe_merge)
        assert list(model) == layers and all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))


def test_merge_and_unload_that_fails_in_a_later_layer_puts_the_replaced_layers_back():
    """A failure no check foresees (a weight subclass without __tensor_flatten__ is not recognised as quantized and
    fails in its own add; helper 274) left the layers before it merged: they are put back, the model as it was."""
    model = nn.Sequential(_trained(LoRALinear(8, 6)), _trained(LoRALinear(6, 4)))
    layers, weights = list(model), [p.clone() for p in model.parameters()]

    def unforeseen():
        raise RuntimeError("Q8 dispatch: unimplemented operator aten.add.Tensor")

    model[1].to_linear = unforeseen
    with pytest.raises(RuntimeError, match="Q8 dispatch"):
        merge_and_unload(model)
    assert list(model) == layers and all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))


def test_merge_and_unload_safe_merge_refuses_a_broken_adapter_before_any_change():
    """PEFT's merge_and_unload(safe_merge=True), a call users copy: a layer whose merged weight would hold NaN or Inf
    (here one B entry NaN, and one large enough that the fp16 weight overflows) refuses the whole merge, naming the
    layers, before any layer is replaced."""
    model = nn.Sequential(_trained(LoRALinear(8, 6)), _trained(LoRALinear(6, 6)),
                          _trained(LoRALinear(6, 4, dtype=torch.float16)))  # float32 factors, a float16 weight
    with torch.no_grad():
        model[0].lora_B.weight[1, 0] = float("nan")
        model[2].lora_B.weight.fill_(1e6)
    layers, weights = list(model), [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"^merge_and_unload: safe_merge found NaN/Inf in the merged weights of layers "
                                         r"\['0', '2'\]; the model is unchanged$"):
        merge_and_unload(model, safe_merge=True)
    assert list(model) == layers
    for now, before in zip(model.parameters(), weights):
        torch.testing.assert_close(now, before, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(TypeError, match="merge_and_unload: safe_merge expected a bool, got 'yes'"):
        merge_and_unload(model, safe_merge="yes")
    with torch.device("meta"):  # no values to check: refused as merge(safe_merge=True) refuses it
        on_meta = nn.Sequential(LoRALinear(4, 4))
    with pytest.raises(ValueError, match=r"safe_merge checks the merged weights' values, but layers \['0'\] have base "
                                         r"weights on the meta device.*; the model is unchanged$"):
        merge_and_unload(on_meta, safe_merge=True)
    assert isinstance(on_meta[0], LoRALinear)
    with torch.no_grad():
        model[0].lora_B.weight[1, 0] = 0.0
        model[2].lora_B.weight.fill_(0.01)
    x = torch.randn(2, 8)
    before = model[1](model[0](x))
    merge_and_unload(model, safe_merge=True)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model[1](model[0](x)), before, rtol=1e-5, atol=1e-5)
    assert model[2].weight.dtype == torch.float16 and model[2].weight.isfinite().all()


def test_new_layers_keep_the_train_eval_mode_of_what_they_replace():
    """A model in eval mode (as from_pretrained returns it) stays in eval mode after inject_lora / from_linear: no
    dropout at inference. The new layers had started in train mode, and dropout ran at inference."""
    model = _model().eval()
    inject_lora(model, ["q_proj", "v_proj"], r=4, lora_dropout=0.5, init_lora_weights=False)
    assert not any(m.training for m in model.modules())
    x = torch.randn(4, 16)
    assert torch.equal(model(x), model(x))
    assert LoRALinear.from_linear(nn.Linear(4, 4).train(), r=2).training
    merge_and_unload(model)
    assert not any(m.training for m in model.modules())


def test_a_refused_from_linear_leaves_the_linear_as_it_was():
    linear = nn.Linear(8, 8)
    for kwargs, error, message in [(dict(r=0), ValueError, "r expected an int >= 1, got 0"),
                                   (dict(lora_alpha="x"), TypeError, "lora_alpha expected a number, got 'x'"),
                                   (dict(backend="nope"), ValueError, "backend expected one of .*, got .nope.")]:
        with pytest.raises(error, match=message):
            LoRALinear.from_linear(linear, **kwargs)
        assert linear.weight.requires_grad and linear.bias.requires_grad, kwargs


@pytest.mark.parametrize("flag", ["bias", "fan_in_fan_out", "autocast_adapter_dtype"])
def test_flags_given_as_strings_are_refused(flag, tmp_path):
    """bias / fan_in_fan_out / autocast_adapter_dtype are bools. A string was taken for its truthiness: PEFT's
    bias="none" gave LoRALinear a trained-shape bias, fan_in_fan_out="false" a transposed weight, and
    autocast_adapter_dtype="no" float32 factors. A TypeError naming the flag, before the model or linear changes."""
    with pytest.raises(TypeError, match=rf"LoRALinear: {flag} expected a bool, got 'none'"):
        LoRALinear(8, 8, **{flag: "none"}, dtype=torch.float16)
    if flag == "bias":
        return
    linear = nn.Linear(8, 8)
    with pytest.raises(TypeError, match=rf"LoRALinear.from_linear: {flag} expected a bool, got 'no'"):
        LoRALinear.from_linear(linear, **{flag: "no"})
    assert linear.weight.requires_grad and linear.bias.requires_grad
    model = _model()
    with pytest.raises(TypeError, match=rf"inject_lora: {flag} expected a bool, got 'no'"):
        inject_lora(model, ["q_proj"], **{flag: "no"})
    assert not any(isinstance(m, LoRALinear) for m in model.modules()) and all(p.requires_grad
                                                                                for p in model.parameters())
    if flag == "autocast_adapter_dtype":
        save_peft_adapter(inject_lora(_model(), ["q_proj"]), tmp_path)
        model = _model()
        with pytest.raises(TypeError, match=r"load_peft_adapter: autocast_adapter_dtype expected a bool, got 'no'"):
            load_peft_adapter(model, tmp_path, autocast_adapter_dtype="no")
        assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_flags_take_bools_ints_0_and_1_and_numpy_bools_only():
    """ops.check_flag (every bool argument): `value in (0, 1)` let 1.0 and a one-element tensor through and raised
    torch's and numpy's unnamed "ambiguous" errors for several elements."""
    numpy = pytest.importorskip("numpy")
    from lora_kernels.ops import check_flag
    for value, expected in [(True, True), (False, False), (1, True), (0, False), (numpy.True_, True),
                            (numpy.bool_(False), False), (numpy.int64(1), True)]:
        assert check_flag("op", "flag", value) is expected, value
    for value in [1.0, 0.0, numpy.float32(1), torch.tensor(1), torch.tensor([1, 0]), numpy.array([1, 0]), 2, None,
                  "no"]:
        with pytest.raises(TypeError, match=r"^op: flag expected a bool, got "):
            check_flag("op", "flag", value)
    with pytest.raises(TypeError, match=r"LoRALinear: bias expected a bool, got tensor\(\[1, 0\]\)"):
        LoRALinear(8, 8, bias=torch.tensor([1, 0]))


def test_scalings_past_float32s_range_are_refused_where_the_layer_is_made():
    """A scaling the kernels cannot apply in float32 is refused by the constructors, naming lora_alpha and r: it was
    accepted, then every forward refused it and merge() wrote inf·0 = NaN into the weight (B is zero at init). A
    float64 layer, which runs in float64, takes it; a scaling set on a made layer is refused by merge."""
    with pytest.raises(ValueError, match=r"LoRALinear: lora_alpha 1e\+39 / r at r = 1 gives the scaling 1e\+39, past "
                                         r"float32's range .* torch.float32 layer"):
        LoRALinear(8, 8, r=1, lora_alpha=1e39)
    with pytest.raises(ValueError, match=r"LoRALinear.from_linear: lora_alpha 1e\+39 / sqrt\(r\) at r = 4 gives the "
                                         r"scaling 5e\+38"):
        LoRALinear.from_linear(nn.Linear(8, 8, dtype=torch.bfloat16), r=4, lora_alpha=1e39, use_rslora=True)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"inject_lora: module '0.q_proj': LoRALinear.from_linear: lora_alpha 1e\+39"):
        inject_lora(model, ["q_proj"], r=1, lora_alpha=1e39)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    wide = LoRALinear(8, 8, r=1, lora_alpha=1e39, dtype=torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(wide(x), nn.functional.linear(x, wide.weight, wide.bias))  # B = 0
    layer = LoRALinear(8, 8, r=1)
    layer.scaling = 1e39
    weight = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"LoRALinear.delta_weight: the layer's scaling attribute \(lora_alpha and r "
                                         r"give 8.0\) gives the scaling 1e\+39, past float32's range"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, weight)
    # set by hand to a NaN or a string: said so (NaN read "past float32's range"; a string got torch's bare "must be
    # real number, not str" from inside the merge)
    for scaling, error, words in ((math.nan, ValueError, "nan, expected a finite number"),
                                  ("2", TypeError, "'2', expected a real number")):
        layer.scaling = scaling
        with pytest.raises(error, match=r"LoRALinear.delta_weight: the layer's scaling attribute \(lora_alpha and r "
                                        r"give 8.0\) gives the scaling " + words):
            layer.merge()
        assert not layer.merged and torch.equal(layer.weight, weight)


def test_bad_backend_names_and_non_finite_scalings_are_refused_at_construction():
    with pytest.raises(ValueError, match=r"LoRALinear: backend expected one of reference, torch, triton, cuda, cpu or "
                                         r"'auto', got 'nope'"):
        LoRALinear(8, 8, backend="nope")
    model = _model()
    with pytest.raises(ValueError, match="backend expected one of"):
        inject_lora(model, ["q_proj"], backend="nope")
    assert not any(isinstance(m, LoRALinear) for m in model.modules()) and all(p.requires_grad
                                                                                for p in model.parameters())
    with pytest.raises(ValueError, match=r"LoRALinear: lora_alpha expected a finite number, got nan"):
        LoRALinear(8, 8, lora_alpha=float("nan"))
    with pytest.raises(ValueError, match=r"inject_lora: module '1.q_proj': LoRALinear.from_linear: r expected an int "
                                         r">= 1, got 0"):
        inject_lora(model, ["q_proj"], rank_pattern={r"1\.q_proj": 0})
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_layers_get_float32_factors_as_peft(dtype):
    """PEFT's autocast_adapter_dtype: the factors of a 16-bit layer are float32, so AdamW updates far below the
    16-bit spacing of the factors still land (with bfloat16 factors most of them rounded away); the forward runs the
    layer's dtype and equals the layer computed with the factors rounded to it."""
    torch.manual_seed(0)
    model = _model().to(dtype)
    inject_lora(model, ["q_proj", "v_proj"], r=4, init_lora_weights=False)
    layer = model[0].q_proj
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    assert layer.weight.dtype == dtype
    x = torch.randn(3, 16, dtype=dtype)
    y = layer(x)
    expected = inject_lora(nn.Sequential(nn.Linear(16, 16).to(dtype)), ["0"], r=4, autocast_adapter_dtype=False)[0]
    assert expected.lora_A.weight.dtype == dtype
    with torch.no_grad():
        expected.weight.copy_(layer.weight), expected.bias.copy_(layer.bias)
        expected.lora_A.weight.copy_(layer.lora_A.weight), expected.lora_B.weight.copy_(layer.lora_B.weight)
    assert y.dtype == dtype and torch.equal(y, expected(x))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 16, dtype=dtype)).float().square().mean().backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == torch.float32
            changed = (p.detach() != before[name]).float().mean().item()
            assert changed > 0.99, f"{name}: only {changed:.0%} of the entries changed"


def _float32_factor_grads(backend, device, dtype, m, k=32, n=24, r=8, autocast=False):
    """(layer, x, dy) after one backward of a 16-bit LoRALinear with float32 factors (autocast_adapter_dtype), or
    of a float32 one under torch.autocast to dtype, and the float64 gradients of its factors from the operands the
    forward used: x, dy and the factors rounded to dtype."""
    torch.manual_seed(0)
    device = torch.device(device)
    layer = LoRALinear(k, n, r=r, lora_alpha=2 * r, dtype=None if autocast else dtype, device=device,
                       backend=backend, init_lora_weights=False)
    x = torch.randn(m, k, dtype=None if autocast else dtype, device=device, requires_grad=True)
    dy = torch.randn(m, n, dtype=dtype, device=device)
    with torch.autocast(device.type, dtype=dtype, enabled=autocast):
        y = layer(x)
    y.backward(dy)
    a, b = (f.weight.detach().to(dtype).double() for f in (layer.lora_A, layer.lora_B))
    x64, dy64 = x.detach().to(dtype).double(), dy.double()
    expected_b = layer.scaling * dy64.T @ (x64 @ a.T)
    expected_a = (layer.scaling * dy64 @ b).T @ x64
    return layer, expected_a, expected_b


@pytest.mark.parametrize("m", [6, 600], ids=["m6", "m600"])  # cuda: its dY-once kernel, and cuBLAS past M·r = 4096
@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16_layer", "fp32_layer_under_autocast"])
def test_float32_factors_of_a_16_bit_layer_get_float32_gradients(backend, device, m, autocast):
    """autocast_adapter_dtype's float32 factors get the backward's float32 sums as their gradients, not values
    rounded to bfloat16 first (the factors were cast to the layer's dtype outside the autograd Function, whose
    gradients autograd then cast back: every entry a bfloat16 number). Within the tolerance of the reference. So do
    a float32 layer's factors under torch.autocast (the usual mixed-precision recipe), which autocast's casts
    outside the Function had rounded likewise."""
    from conftest import backend_or_skip
    backend_or_skip(backend, device)
    layer, expected_a, expected_b = _float32_factor_grads(backend, device, torch.bfloat16, m, autocast=autocast)
    for factor, expected in ((layer.lora_A, expected_a), (layer.lora_B, expected_b)):
        grad = factor.weight.grad
        assert grad.dtype == torch.float32
        assert (grad != grad.to(torch.bfloat16).float()).any(), "every entry of the gradient is a bfloat16 number"
        assert_close(grad, expected, torch.bfloat16, "factor gradient")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_factor_gradients_of_the_cpu_backend_are_float32_sums(dtype):
    """The cpu backend sums the factors' gradients in float32 from the 16-bit operands (S kept in float32): they
    equal the float64 gradients to float32's precision, where rounding them to 16 bits cost ~1e-3 (bfloat16)."""
    from conftest import backend_or_skip
    backend_or_skip("cpu", "cpu")
    layer, expected_a, expected_b = _float32_factor_grads("cpu", "cpu", dtype, 6)
    for factor, expected in ((layer.lora_A, expected_a), (layer.lora_B, expected_b)):
        assert_close(factor.weight.grad, expected, torch.float32, "factor gradient", scale=1e-2)  # 1e-5


def test_the_torch_backend_keeps_peft_s_unfused_16_bit_products():
    """The torch backend is PEFT's unfused composition in the layer's dtype: its factors' gradients in bf16 are the
    bf16 products, cast to float32 (README; in fp16 they are written in float32: see the test below)."""
    layer, _, _ = _float32_factor_grads("torch", "cpu", torch.bfloat16, 6)
    for factor in (layer.lora_A, layer.lora_B):
        grad = factor.weight.grad
        assert grad.dtype == torch.float32 and torch.equal(grad, grad.to(torch.bfloat16).float())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp16_layer", "fp32_layer_under_fp16_autocast"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "cuda"])
def test_float32_factor_gradients_of_an_fp16_layer_stay_finite_past_65504(backend, device, autocast):
    """An fp16 layer's float32 factors (autocast_adapter_dtype) get finite gradients where they pass fp16's 65504,
    as PEFT's, which runs the LoRA branch in float32: dB and dA sum M tokens' products, and a GradScaler raises the
    loss scale until a gradient overflows. The torch backend (auto's on GPUs) rounded both to fp16 first: inf. So do
    a float32 layer's factors under fp16 autocast (where autocast had rounded the float32 dB back to fp16 on CPU).
    The first-order backward only: create_graph=True and torch.func keep the torch backend's fp16 products."""
    from conftest import backend_or_skip
    backend_or_skip(backend, device)
    g = torch.Generator().manual_seed(0)
    m, k, n, r = 256, 16, 16, 4
    layer = LoRALinear(k, n, r=r, lora_alpha=r, dtype=None if autocast else torch.float16, device=device,
                       backend=backend)
    with torch.no_grad():  # positive x and A: S and dS add up over the tokens instead of cancelling
        layer.lora_A.weight.copy_(torch.rand(r, k, generator=g) * 0.5)
        layer.lora_B.weight.copy_(torch.full((n, r), 0.05))
    x = (1 + torch.rand(m, k, generator=g)).to(device, None if autocast else torch.float16)
    dy = torch.full((m, n), 1000.0, dtype=torch.float16, device=device)
    with torch.autocast(torch.device(device).type, dtype=torch.float16, enabled=autocast):
        y = layer(x)
        y.backward(dy)  # inside: the backward runs under the same autocast (an autocast-wrapped training step)
    a, b = (f.weight.detach().to(torch.float16).double() for f in (layer.lora_A, layer.lora_B))
    x64, dy64 = x.to(torch.float16).double(), dy.double()
    expected = {"lora_B": dy64.T @ (x64 @ a.T), "lora_A": (dy64 @ b).T @ x64}
    for name, factor in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
        assert expected[name].abs().min() > 65504, name  # past fp16's range, in every entry
        assert factor.weight.grad.dtype == torch.float32
        assert_close(factor.weight.grad, expected[name], torch.float16, f"{name} gradient")


def _leaves_fed_by(node, inputs):
    """The leaf tensors whose gradients the autograd node of a custom Function passes on directly, at the positions
    `inputs` of its forward's arguments (None for another node there); skips where torch (2.11) hides a custom
    Function node's edges ("a legacy access pattern that is no longer supported")."""
    try:
        edges = node.next_functions
    except RuntimeError as error:
        pytest.skip(f"this torch hides a custom Function node's edges: {error}")
    return [getattr(edge, "variable", None) for edge, _ in edges[inputs]]


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16_layer", "fp32_layer_under_autocast"])
def test_float32_factors_are_cast_inside_the_autograd_function(autocast):
    """A 16-bit layer's float32 factors go into the fused autograd Function as they are: no cast node between them
    and it (two kernels and two autograd nodes per layer and step fewer on a GPU, where a small model's step is host
    time). Likewise a float32 layer's under torch.autocast, which cast them outside before."""
    layer = LoRALinear(16, 8, r=4, dtype=None if autocast else torch.bfloat16, backend="torch", init_lora_weights=False)
    x = torch.randn(3, 16, dtype=None if autocast else torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        node = layer(x).grad_fn
    assert type(node).__name__ == "LoRALinearFunctionBackward"
    assert _leaves_fed_by(node, slice(2, 4)) == [layer.lora_A.weight, layer.lora_B.weight]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_second_order_gradients_reach_float32_factors(backend):
    """create_graph=True through a 16-bit layer with float32 factors: the gradients' own derivatives reach the
    factors (the Function's differentiable backward casts them again, in the graph), as the reference backend's,
    which autograd differentiates through its casts."""
    from conftest import backend_or_skip
    backend_or_skip(backend, "cpu")
    results = []
    for run_backend in (backend, "reference"):
        torch.manual_seed(0)
        layer = LoRALinear(16, 8, r=4, lora_alpha=8, dtype=torch.bfloat16, backend=run_backend,
                           init_lora_weights=False)
        x = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
        (grad_a,) = torch.autograd.grad(layer(x).float().square().sum(), layer.lora_A.weight, create_graph=True)
        grad_a.square().sum().backward()
        assert grad_a.dtype == torch.float32
        results.append((layer.lora_B.weight.grad, x.grad))
    for got, expected in zip(*results):
        assert got is not None and got.abs().sum() > 0
        assert_close(got, expected, torch.bfloat16, "second-order gradient", scale=2)


def test_model_level_disable_adapter_context():
    model = inject_lora(_model(), ["q_proj", "v_proj"], r=4, init_lora_weights=False)
    base = _model()
    base.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(3, 16)
    with_adapter = model(x)
    model[1].q_proj.disable_adapters = True  # one layer disabled already stays so afterwards
    from lora_kernels import disable_adapter
    with disable_adapter(model):
        torch.testing.assert_close(model(x), base(x))
    assert model[1].q_proj.disable_adapters and not model[0].q_proj.disable_adapters
    model[1].q_proj.disable_adapters = False
    torch.testing.assert_close(model(x), with_adapter)
    model[0].v_proj.merge()
    with pytest.raises(RuntimeError, match=r"disable_adapter: layers \['0.v_proj'\] are merged"):
        with disable_adapter(model):
            pass
    assert not any(m.disable_adapters for m in model.modules() if isinstance(m, LoRALinear))


def test_flags_take_bool_like_values_and_refuse_strings():
    """use_rslora="no" switched rsLoRA on (a truthy string); 0/1 and numpy bools stay accepted."""
    numpy = pytest.importorskip("numpy")
    for value, expected in ((True, True), (0, False), (1, True), (numpy.bool_(True), True)):
        assert LoRALinear(8, 6, r=2, use_rslora=value).use_rslora is expected
    for value in ("no", None, 2):
        with pytest.raises(TypeError, match="use_rslora expected a bool"):
            LoRALinear(8, 6, r=2, use_rslora=value)


class _FakeQuantLinear(nn.Linear):
    """A QAT-style layer: its forward rounds the weight, so its output is not F.linear(x, weight, bias)."""

    def forward(self, x):
        return nn.functional.linear(x, torch.round(self.weight * 4) / 4, self.bias)


class _TaggedLinear(nn.Linear):
    """A subclass that keeps nn.Linear's forward (like nn.MultiheadAttention's NonDynamicallyQuantizableLinear)."""


def _model_state(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()],
            {k: v.clone() for k, v in model.state_dict().items()})


def _assert_model_state(model, state):
    types, flags, values = state
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags
    assert all(torch.equal(v, values[k]) for k, v in model.state_dict().items())


def test_linear_subclasses_with_their_own_forward_are_refused_untouched():
    """A LoRA layer computes F.linear on the weight and never calls the wrapped layer: a subclass with its own forward
    (fake-quant, Float8Linear, bnb's Linear8bitLt) would silently lose it. Refused by class, before any change."""
    from lora_kernels import MultiLoRALinear
    fake = _FakeQuantLinear(8, 8)
    with pytest.raises(TypeError, match=r"from_linear: linear is a .*_FakeQuantLinear, an nn.Linear subclass with its "
                                        r"own forward"):
        LoRALinear.from_linear(fake)
    with pytest.raises(TypeError, match=r"MultiLoRALinear: base_linear is a .*_FakeQuantLinear"):
        MultiLoRALinear(fake, max_adapters=2, max_rank=4)
    assert fake.weight.requires_grad and fake.bias.requires_grad
    model = nn.Sequential(nn.Linear(8, 8), _FakeQuantLinear(8, 8), nn.ReLU(), _TaggedLinear(8, 8))
    state = _model_state(model)
    with pytest.raises(TypeError, match=r"inject_lora: module '1' is a .*_FakeQuantLinear.*exclude_modules"):
        inject_lora(model, ["0", "1"])  # named: refused
    _assert_model_state(model, state)
    # matched by "all-linear" only (MoE routers, fake-quant layers in a larger model): left out with a warning; a
    # subclass that keeps nn.Linear's forward is a plain linear layer
    with pytest.warns(UserWarning, match=r"inject_lora: left out 1 matched layer\(s\) a LoRA layer cannot stand in "
                                         r"for: '1' \(a _FakeQuantLinear"):
        inject_lora(model, "all-linear")
    assert isinstance(model[0], LoRALinear) and type(model[1]) is _FakeQuantLinear and isinstance(model[3], LoRALinear)
    x = torch.randn(3, 8)
    multi = MultiLoRALinear(_TaggedLinear(8, 8), max_adapters=2, max_rank=4)
    torch.testing.assert_close(multi(x, torch.zeros(3, dtype=torch.long)), multi.base_layer(x))


def test_conv1d_subclasses_with_their_own_forward_are_refused_untouched():
    """The same holds for transformers' Conv1D (GPT-2's linear layer): a subclass with its own forward had been
    wrapped, its forward silently replaced by F.linear on the transposed weight; one keeping Conv1D's forward is a
    Conv1D."""
    from transformers.pytorch_utils import Conv1D

    class RoundingConv1D(Conv1D):
        def forward(self, x):
            return torch.round(super().forward(x))

    class TaggedConv1D(Conv1D):
        pass

    model = nn.Sequential(RoundingConv1D(6, 8), TaggedConv1D(6, 6))
    state = _model_state(model)
    with pytest.raises(TypeError, match=r"from_linear: linear is a .*RoundingConv1D, a transformers Conv1D subclass "
                                        r"with its own forward"):
        LoRALinear.from_linear(model[0], fan_in_fan_out=True)
    with pytest.raises(TypeError, match=r"inject_lora: module '0' is a .*RoundingConv1D"):
        inject_lora(model, ["0", "1"], fan_in_fan_out=True)
    _assert_model_state(model, state)
    inject_lora(model, ["1"], fan_in_fan_out=True)
    x = torch.randn(3, 6)
    torch.testing.assert_close(model[1](x), model[1].to_linear()(x))
    assert isinstance(model[1], LoRALinear)


def test_parametrized_linears_are_refused_with_a_clear_error():
    """weight_norm / spectral_norm / orthogonal (torch.nn.utils.parametrize) compute the weight on each access, and
    the deprecated weight_norm in a forward pre-hook: no Parameter to hold and merge into. A TypeError naming the
    cause, not torch's "you can only change requires_grad flags of leaf variables"."""
    parametrized = nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))
    with pytest.raises(TypeError, match=r"from_linear: linear \(ParametrizedLinear\) has parametrizations on "
                                        r"\['weight'\].*remove_parametrizations"):
        LoRALinear.from_linear(parametrized)
    with pytest.warns(FutureWarning):
        hooked = nn.utils.weight_norm(nn.Linear(8, 8))
    with pytest.raises(TypeError, match=r"from_linear: linear \(Linear\) has a weight that is not a Parameter"):
        LoRALinear.from_linear(hooked)
    model = nn.Sequential(nn.Linear(8, 8), nn.utils.parametrizations.spectral_norm(nn.Linear(8, 8)))
    state = _model_state(model)
    with pytest.raises(TypeError, match=r"inject_lora: module '1' \(ParametrizedLinear\) has parametrizations"):
        inject_lora(model, ["0", "1"])
    _assert_model_state(model, state)
    with pytest.warns(UserWarning, match=r"left out 1 matched layer\(s\).*'1' \(a ParametrizedLinear"):
        inject_lora(model, "all-linear")
    assert isinstance(model[0], LoRALinear) and not isinstance(model[1], LoRALinear)


def _with_weight(linear, convert):
    linear.weight = nn.Parameter(convert(linear.weight.detach()))
    return linear


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
@pytest.mark.parametrize("convert, words", [
    (lambda w: w.to(torch.float8_e4m3fn), "expected a float32, float16, bfloat16 or float64 weight, got "
                                          "torch.float8_e4m3fn"),
    (lambda w: w.to(torch.complex64), "expected a float32, float16, bfloat16 or float64 weight, got torch.complex64"),
    (lambda w: w.to_sparse_csr(), "expected a dense (strided) weight, got layout torch.sparse_csr"),
], ids=["float8", "complex64", "sparse_csr"])
def test_base_weights_of_other_dtypes_or_layouts_are_refused_untouched(convert, words, tmp_path):
    """A float8, complex or sparse base weight: LoRA layers compute F.linear in float32/16/bf16/64 on a dense weight.
    These failed deep inside ("check_uniform_bounds" not implemented for 'Float8_e4m3fn' while initialising the
    factors), in the first forward ("Could not run 'lora_kernels::lora_fwd' with arguments from the 'SparseCsrCPU'
    backend", "x expected a floating dtype ... complex64") or half-way through a merge. Refused by layer name, before
    any change, by every wrapper; "all-linear" leaves them out with a warning."""
    from lora_kernels import MultiLoRALinear, prepare_multi_adapter, save_peft_adapter
    words = re.escape(words)
    with pytest.raises(TypeError, match=r"from_linear: linear \(Linear\) " + words):
        LoRALinear.from_linear(_with_weight(nn.Linear(8, 6), convert))
    with pytest.raises(TypeError, match=r"MultiLoRALinear: base_linear \(Linear\) " + words):
        MultiLoRALinear(_with_weight(nn.Linear(8, 6), convert), max_adapters=2, max_rank=4)
    save_peft_adapter(inject_lora(nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 8)), ["0", "1"], r=2), tmp_path)
    for call in (lambda m: inject_lora(m, ["0", "1"], r=2), lambda m: load_peft_adapter(m, tmp_path),
                 lambda m: prepare_multi_adapter(m, ["0", "1"], max_adapters=2, max_rank=2)):
        model = nn.Sequential(nn.Linear(8, 6), _with_weight(nn.Linear(6, 8), convert))
        first_weight, second_weight = model[0].weight.detach().clone(), model[1].weight
        with pytest.raises(TypeError, match=r": module '1' \(Linear\) " + words):
            call(model)
        # as it was (torch.equal takes neither float8 nor sparse tensors: the refused weight is the same Parameter)
        assert [type(m) for m in model] == [nn.Linear, nn.Linear] and model[1].weight is second_weight
        assert all(p.requires_grad for p in model.parameters()) and torch.equal(model[0].weight, first_weight)
    with pytest.warns(UserWarning, match=r"left out 1 matched layer\(s\).*'1' \(a Linear: .*dtype or layout"):
        inject_lora(model, "all-linear")
    assert isinstance(model[0], LoRALinear) and type(model[1]) is nn.Linear


def test_quantized_base_weights_train_as_dequantized_and_refuse_merging_untouched(tmp_path):
    """A model whose linear weight is a tensor subclass (torchao's quantize_; here conftest's QuantizedWeight): the
    LoRA layer runs the torch backend ("auto" picks it) and trains as on the dequantized weight, gradients through
    the quantized layer's input included (PEFT's TorchaoLoraLinear gave the same outputs and gradients bit for bit
    with torchao 0.18's Int8WeightOnlyConfig, by hand). Before, the first forward failed in the cpu kernel. Merging
    would dequantize and quantize the weight again: merge, to_linear and merge_and_unload refuse it, unchanged; a
    kernel backend is refused at construction; the adapter saves and loads."""
    from conftest import quantized_linear

    def model_with(second):
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), second)

    quantized_layer, plain_layer = quantized_linear(12, 6)
    models = [inject_lora(model_with(layer), ["0", "2"], r=2, init_lora_weights=False)
              for layer in (quantized_layer, plain_layer)]
    with torch.no_grad():  # the same factors
        for name, factor in models[0].named_parameters():
            if "lora_" in name:
                models[1].get_parameter(name).copy_(factor)
    x = torch.randn(5, 8)
    outputs = [model(x) for model in models]
    torch.testing.assert_close(outputs[0], outputs[1])
    for model, y in zip(models, outputs):
        y.square().sum().backward()
    for name in ("0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"):
        torch.testing.assert_close(models[0].get_parameter(name).grad, models[1].get_parameter(name).grad, msg=name)

    model, weight = models[0], quantized_layer.weight
    with pytest.raises(TypeError, match=r"LoRALinear.merge: the base weight is a conftest.QuantizedWeight \(a tensor "
                                        r"subclass.*dequantized and quantized again; the layer is unchanged"):
        model[2].merge()
    with pytest.raises(TypeError, match=r"LoRALinear.to_linear: the base weight is a conftest.QuantizedWeight"):
        model[2].to_linear()
    with pytest.raises(TypeError, match=r"merge_and_unload: layers \['2'\] have base weights such as a "
                                        r"conftest.QuantizedWeight.*the model is unchanged"):
        merge_and_unload(model)
    assert isinstance(model[0], LoRALinear) and isinstance(model[2], LoRALinear) and not model[2].merged
    assert model[2].weight is weight
    torch.testing.assert_close(model(x), outputs[0])
    with pytest.raises(TypeError, match=r"from_linear: backend 'cpu' cannot read weight, a conftest.QuantizedWeight"):
        LoRALinear.from_linear(quantized_linear(12, 6)[0], backend="cpu")
    assert LoRALinear.from_linear(quantized_linear(12, 6)[0], backend="torch").backend == "torch"  # torch reads them

    save_peft_adapter(model, tmp_path)
    loaded = load_peft_adapter(model_with(quantized_layer), tmp_path)
    torch.testing.assert_close(loaded(x), outputs[0])
    # a load with a backend that cannot read it names the call and the module, as inject_lora does (it named
    # LoRALinear.from_linear alone; helper 274)
    fresh = model_with(quantized_linear(12, 6)[0])
    with pytest.raises(TypeError, match=r"^load_peft_adapter: module '2': LoRALinear.from_linear: backend 'cpu' cannot "
                                        r"read weight"):
        load_peft_adapter(fresh, tmp_path, backend="cpu")
    assert type(fresh[0]) is nn.Linear and type(fresh[2]) is nn.Linear


def test_quantized_16_bit_base_weight_takes_a_float32_input_as_its_own_linear_does():
    """The QLoRA recipe on torchao: peft.prepare_model_for_kbit_training on a bfloat16 model that quantize_ has
    quantized casts the norms, embeddings and biases to float32 and leaves the quantized weights bfloat16, so the
    layers get float32 inputs, which torchao's Int8Tensor takes (its F.linear computes in the input's dtype, as
    conftest's QuantizedWeight does). The LoRA layer then computes as the quantized layer does, with its float32
    factors uncast: the float32 outputs and gradients of the dequantized weight in float32 (PEFT's TorchaoLoraLinear
    matched to 5e-8 over training steps of a tiny Llama, by hand with torchao 0.18). Before, the forward cast the
    factors to bfloat16 and the call was refused ("lora_linear: weight expected dtype torch.float32 (same as x), got
    torch.bfloat16"), where PEFT trains."""
    from conftest import quantized_linear
    quantized, _ = quantized_linear(12, 6, dtype=torch.bfloat16)
    quantized.bias = nn.Parameter(quantized.bias.float(), requires_grad=False)  # as prepare_model_for_kbit_training
    plain = nn.Linear(12, 6)
    with torch.no_grad():
        plain.weight.copy_(quantized.weight.dequantize(torch.float32))
        plain.bias.copy_(quantized.bias)
    layers = [LoRALinear.from_linear(base, r=2, init_lora_weights=False) for base in (quantized, plain)]
    with torch.no_grad():  # the same factors, float32 in both (autocast_adapter_dtype for the bfloat16 layer)
        layers[1].lora_A.weight.copy_(layers[0].lora_A.weight)
        layers[1].lora_B.weight.copy_(layers[0].lora_B.weight)
    x = torch.randn(5, 12)
    results = []
    for layer in layers:
        leaf = x.clone().requires_grad_(True)
        y = layer(leaf)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        results.append([y.detach(), leaf.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad])
    assert results[0][0].dtype == torch.float32 and layers[0].lora_A.weight.dtype == torch.float32
    for name, got, expected in zip(("y", "dx", "d_lora_a", "d_lora_b"), *results):
        assert_close(got, expected, torch.float32, name)
    with pytest.raises(TypeError, match=r"lora_linear: x expected a torch.Tensor, got list"):  # x's dtype is read
        layers[0]([1.0] * 12)
    # bfloat16 factors (autocast_adapter_dtype=False) are cast to the input's dtype, not compared with the weight's
    assert LoRALinear.from_linear(quantized, r=2, autocast_adapter_dtype=False)(x).dtype == torch.float32


def test_quantized_16_bit_base_weight_with_a_16_bit_bias_takes_a_float32_input():
    """The bias goes into the quantized weight's own F.linear too: a bfloat16 quantized layer with its bfloat16 bias
    (Qwen2's q/k/v; torchao's quantize_ without peft.prepare_model_for_kbit_training) ran float32 inputs there and in
    PEFT, and was refused here ("lora_linear: bias expected dtype torch.float32 (same as x)"; helper 274). Without
    the bias it ran: the Llama layers of the test above."""
    from conftest import quantized_linear
    quantized, _ = quantized_linear(12, 6, dtype=torch.bfloat16)
    plain = nn.Linear(12, 6)
    with torch.no_grad():
        plain.weight.copy_(quantized.weight.dequantize(torch.float32))
        plain.bias.copy_(quantized.bias)
    x = torch.randn(5, 12)
    for wrap in (lambda base: LoRALinear.from_linear(base, r=2), lambda base: lk.MultiLoRALinear(base, 2, 2)):
        layers = [wrap(base) for base in (quantized, plain)]
        args = (torch.zeros(5, dtype=torch.long),) if isinstance(layers[0], lk.MultiLoRALinear) else ()
        y = layers[0](x, *args)
        assert y.dtype == torch.float32
        assert_close(y, layers[1](x, *args), torch.float32, "y")


def test_quantized_fp16_base_weight_trains_its_float32_factors_in_float32():
    """A quantized fp16 layer's float32 factors: the LoRA branch runs in float32, as PEFT's TorchaoLoraLinear runs it
    and as the plain fp16 layer's torch backend writes dA and dB. Cast to fp16, autograd formed them in fp16: inf past
    65504 (token sums under a GradScaler-sized loss scale), where both of those were finite (helper 274)."""
    from conftest import quantized_linear
    torch.manual_seed(0)
    quantized, plain = quantized_linear(64, 32, dtype=torch.float16)
    layers = [LoRALinear.from_linear(base, r=4, backend="torch") for base in (quantized, plain)]
    with torch.no_grad():
        for layer in layers:
            layer.lora_A.weight.copy_(torch.linspace(0.1, 0.5, 4 * 64).reshape(4, 64))
            layer.lora_B.weight.copy_(torch.linspace(0.1, 0.5, 32 * 4).reshape(32, 4))
    x = torch.rand(256, 64, dtype=torch.float16)
    grads = []
    for layer in layers:
        (layer(x).float().sum() * 64.0).backward()
        grads.append((layer.lora_A.weight.grad, layer.lora_B.weight.grad))
    for got, expected in zip(*grads):
        assert got.dtype == torch.float32 and torch.isfinite(got).all() and expected.abs().max() > 65504
        torch.testing.assert_close(got, expected, rtol=2e-3, atol=0)


def test_quantized_base_weights_refuse_reinitialisation_and_conv1d_untouched():
    """A tensor-subclass (quantized) base weight cannot be re-initialised (nn.Linear's init writes into it) nor
    transposed: reset_parameters() and a transformers Conv1D holding one ([in, out], passed transposed) are refused
    by name before any change. Before, reset_parameters() failed in the init ("QuantizedWeight dispatch: ...
    aten.uniform_", as nn.Linear's own does on torchao's weights) and the Conv1D was wrapped and failed at the first
    forward (aten.permute); reset_lora_parameters() re-initialises the adapter alone."""
    from transformers.pytorch_utils import Conv1D

    from conftest import QuantizedWeight, quantized_linear
    from lora_kernels import MultiLoRALinear
    quantized, _ = quantized_linear(12, 6)
    layer, weight = LoRALinear.from_linear(quantized, r=2, init_lora_weights=False), quantized.weight
    lora_a, lora_b = layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone()
    with pytest.raises(TypeError, match=r"LoRALinear.reset_parameters: the base weight is a conftest.QuantizedWeight "
                                        r"\(a tensor subclass.*cannot be re-initialised; the layer is unchanged \(use "
                                        r"reset_lora_parameters\(\)"):
        layer.reset_parameters()
    assert layer.weight is weight and torch.equal(layer.lora_A.weight, lora_a) and torch.equal(layer.lora_B.weight,
                                                                                                lora_b)
    layer.reset_lora_parameters()
    assert not layer.lora_B.weight.any()
    multi = MultiLoRALinear(quantized_linear(12, 6)[0], max_adapters=2, max_rank=2)
    multi.set_adapter(0, torch.ones(2, 12), torch.ones(6, 2), 1.0)
    with pytest.raises(TypeError, match=r"MultiLoRALinear.reset_parameters: the base weight is a conftest."
                                        r"QuantizedWeight.*the layer is unchanged \(use clear_adapter\(slot\)"):
        multi.reset_parameters()
    assert multi.ranks.tolist() == [2, 0] and multi.lora_a[0].eq(1).all()

    conv1d = Conv1D(6, 12)
    conv1d.weight = nn.Parameter(QuantizedWeight.quantize(conv1d.weight), requires_grad=False)
    transposed = r" \(Conv1D\) has a weight that is a conftest.QuantizedWeight .*passes its transpose"
    with pytest.raises(TypeError, match=r"LoRALinear.from_linear: linear" + transposed):
        LoRALinear.from_linear(conv1d, fan_in_fan_out=True)
    with pytest.raises(TypeError, match=r"MultiLoRALinear: base_linear" + transposed):
        MultiLoRALinear(conv1d, max_adapters=2, max_rank=2)
    with pytest.raises(TypeError, match=r"inject_lora: module '0'" + transposed):
        inject_lora(nn.Sequential(conv1d), ["0"], r=2)


def _materialise_with_garbage(model):
    """to_empty as meta-device init flows do it, with the uninitialised memory made visibly bad (NaN, huge ranks)."""
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(float("nan") if tensor.is_floating_point() else 1701081697)


def _reset_like_meta_init(model):
    # the usual loop (FSDP1's meta init calls it on every module holding parameters itself, torchtitan similarly)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_meta_to_empty_reset_parameters_gives_a_fresh_layer(init):
    """Built under torch.device("meta"), injected, to_empty, reset_parameters(): finite weights, PEFT's init of the
    adapter (B zeros, so the model equals its base layers), as nn.Linear's own flow gives."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
        inject_lora(model, ["0", "2"], r=4, init_lora_weights=init)
    _materialise_with_garbage(model)
    _reset_like_meta_init(model)
    for layer in (model[0], model[2]):
        assert torch.isfinite(layer.weight).all() and torch.isfinite(layer.bias).all()
        assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.isfinite(layer.lora_A.weight).all()
        assert layer.weight.abs().max() <= 1 / math.sqrt(layer.in_features) + 1e-6  # nn.Linear's kaiming bound
    if init == "gaussian":
        assert abs(model[0].lora_A.weight.std().item() - 1 / 4) < 0.05
    x = torch.randn(5, 32)
    expected = nn.functional.linear(torch.relu(nn.functional.linear(x, model[0].weight, model[0].bias)),
                                    model[2].weight, model[2].bias)
    torch.testing.assert_close(model(x), expected)

    # one layer on its own: reset_parameters() also unmerges and keeps init_lora_weights=False's random B
    layer = _trained(LoRALinear(12, 6, r=2, init_lora_weights=False))
    layer.merge()
    layer.reset_parameters()
    assert not layer.merged and torch.count_nonzero(layer.lora_B.weight) > 0
    with pytest.raises(ValueError, match="init_lora_weights expected True, False or 'gaussian', got 1"):
        layer.reset_lora_parameters(1)


def test_multi_lora_reset_parameters_reinitialises_the_base_and_empties_every_slot():
    """MultiLoRALinear.reset_parameters() after to_empty: the base layer re-initialised (nn.Linear's own
    reset_parameters; a transformers Conv1D, which has none, as its constructor does: weight ~ N(0, 0.02), bias zeros)
    and every slot empty (rank 0, scaling 0, zero factors), so the layer computes its base layer."""
    from transformers.pytorch_utils import Conv1D

    from lora_kernels import MultiLoRALinear

    torch.manual_seed(0)
    x, ids = torch.randn(5, 64), torch.tensor([0, 1, -1, 1, 0])
    for base in (nn.Linear(64, 48), Conv1D(48, 64)):  # Conv1D(nf=out, nx=in)
        layer = MultiLoRALinear(base, max_adapters=2, max_rank=4)
        _materialise_with_garbage(layer)
        layer.reset_parameters()
        weight, bias = layer.base_layer.weight, layer.base_layer.bias
        if isinstance(base, nn.Linear):  # kaiming-uniform weight and a uniform bias within 1/sqrt(in)
            assert weight.abs().max() <= 1 / 8 and weight.std() > 0.06
            assert bias.abs().max() <= 1 / 8 and torch.count_nonzero(bias) == 48
        else:
            assert abs(weight.std().item() - 0.02) < 0.002 and torch.count_nonzero(bias) == 0
        for slots in (layer.lora_a, layer.lora_b, layer.scalings, layer.ranks):
            assert torch.count_nonzero(slots) == 0
        torch.testing.assert_close(layer(x, ids), base(x), rtol=0, atol=0)


def test_meta_wrapped_then_a_base_checkpoint_loaded_as_readme_says():
    """README's meta-device flows with a base checkpoint (no LoRA keys). to_empty + load_state_dict(strict=False), then
    reset_lora_parameters() / clear_adapter(slot): the base checkpoint's weights untouched, the adapter PEFT's init
    (A within kaiming's bound, B zeros), frozen base and trainable factors. assign=True: the base weights hold the
    checkpoint's memory, still frozen; the factors stay meta (torch keeps what the state dict lacks) and the forward
    names them."""
    from lora_kernels import MultiLoRALinear, prepare_multi_adapter
    base = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    x = torch.randn(5, 32)
    with torch.device("meta"):
        model = inject_lora(nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)), ["0", "2"], r=4)
        multi = prepare_multi_adapter(nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)), ["0", "2"],
                                      max_adapters=2, max_rank=4)
    assert isinstance(multi[0], MultiLoRALinear)
    _materialise_with_garbage(model)
    _materialise_with_garbage(multi)
    assert model.load_state_dict(base.state_dict(), strict=False).missing_keys == [
        "0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"]
    multi.load_state_dict({k.replace(".", ".base_layer.", 1): v for k, v in base.state_dict().items()}, strict=False)
    for layer in (model[0], model[2]):
        layer.reset_lora_parameters()
        assert layer.lora_A.weight.abs().max() <= 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt(5))
        assert torch.count_nonzero(layer.lora_A.weight) > 0 and torch.count_nonzero(layer.lora_B.weight) == 0
    for layer in (multi[0], multi[2]):
        for slot in range(layer.max_adapters):
            layer.clear_adapter(slot)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    assert torch.equal(multi[2](multi[1](multi[0](x, torch.tensor([0, 1, -1, 0, 1]))), torch.tensor([1, 0, 0, 1, -1])),
                       base(x))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"]

    with torch.device("meta"):
        model = inject_lora(nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)), ["0", "2"], r=4)
    model.load_state_dict(base.state_dict(), assign=True, strict=False)
    assert model[0].weight.data_ptr() == base[0].weight.data_ptr() and not model[0].weight.requires_grad
    assert model[0].lora_A.weight.is_meta and model[0].lora_A.weight.requires_grad
    with pytest.raises(ValueError, match=r"lora_a expected device cpu \(same as x\), got meta"):
        model(x)


def test_merging_factors_left_on_the_meta_device_is_refused_by_name_unchanged():
    """A layer whose factors are still on the meta device (never loaded) while its base weight is real. lora_A alone
    there: torch's CPU matmul B @ A took the meta operand and returned uninitialised memory, which merge, to_linear
    and merge_and_unload merged silently. lora_B there: torch's add failed naming no tensor, after merge_and_unload
    had replaced the layers before it. A ValueError names the factor, before any change. A layer merged before its
    factors were sent to the meta device unmerges: it subtracts the copy of the factors merge() added."""
    never_loaded = r"expected device cpu \(the base weight's\), got meta \(never loaded"
    for meta_factors in (["lora_A"], ["lora_B"], ["lora_A", "lora_B"]):
        named = rf"{meta_factors[0]}\.weight {never_loaded}"
        model = inject_lora(nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)), ["0", "2"], r=4)
        for factor in meta_factors:
            getattr(model[2], factor).to("meta")
        weight = model[2].weight.detach().clone()
        with pytest.raises(ValueError, match=rf"merge_and_unload: module '2': {named}.*the model is unchanged"):
            merge_and_unload(model)
        assert isinstance(model[0], LoRALinear) and isinstance(model[2], LoRALinear)
        for call in (model[2].merge, model[2].to_linear, model[2].delta_weight):
            with pytest.raises(ValueError, match=rf"LoRALinear\.{call.__name__}: {named}"):
                call()
        assert not model[2].merged and torch.equal(model[2].weight, weight)
        base_weight = model[0].weight.detach().clone()
        model[0].merge()
        for factor in meta_factors:
            getattr(model[0], factor).to("meta")
        model[0].unmerge()
        assert not model[0].merged
        torch.testing.assert_close(model[0].weight, base_weight, rtol=0, atol=1e-6)
    # merged on the meta device, then materialised and loaded: no copy of meta factors is kept (to_empty() would give
    # it uninitialised values, and it failed to copy out of meta), so unmerge subtracts the loaded factors
    with torch.device("meta"):
        layer = LoRALinear(8, 6, r=2)
    layer.merge()
    layer.to_empty(device="cpu")
    loaded = _trained(LoRALinear(8, 6, r=2))
    base_weight = loaded.weight.detach().clone()
    loaded.merge()
    with torch.no_grad():  # as a checkpoint's values (load_state_dict refuses a merged layer)
        for mine, theirs in zip(layer.parameters(), loaded.parameters()):
            mine.copy_(theirs)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, base_weight, rtol=0, atol=1e-6)


def test_safe_merge_of_a_layer_on_the_meta_device_is_refused_by_name_unchanged():
    """Base weight and factors all on the meta device: the devices agree, so the factor check passes, and safe_merge's
    finiteness check failed in torch's .item() ("cannot be called on meta tensors"), naming no tensor."""
    with torch.device("meta"):
        layer = LoRALinear(8, 6, r=2)
    with pytest.raises(ValueError, match=r"LoRALinear\.merge: safe_merge .* base weight is on the meta device.*"
                                         r"the layer is unchanged"):
        layer.merge(safe_merge=True)
    assert not layer.merged


def test_reset_parameters_of_a_trained_layer_gives_a_fresh_adapter():
    """reset_parameters() on its own (not after every factor's own reset, as the meta flow above calls them)
    re-draws the adapter: B zeros again, so the layer equals its freshly initialised base layer, A re-drawn."""
    layer = _trained(LoRALinear(12, 6, r=2))
    old_a = layer.lora_A.weight.detach().clone()
    layer.reset_parameters()
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert not torch.equal(layer.lora_A.weight, old_a)
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    del layer.init_lora_weights  # a layer pickled before init_lora_weights was kept: PEFT's default, B zeros
    _trained(layer).reset_parameters()
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_a_state_dict_is_not_loaded_into_a_merged_layer():
    """`merged` is not in the state dict (nor in PEFT's): loaded into a merged layer, the base weight lost the merged
    delta, which the forward skipped and unmerge() then subtracted from a weight that never held it. Refused as torch
    reports a mismatch (after the load, which leaves that layer's keys out); unmerged, the same load goes in."""
    model = inject_lora(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)), ["0", "1"], r=4,
                           init_lora_weights=False)
    saved = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        model[0].lora_B.weight.add_(1.0)
    model[0].merge()
    before = {key: value.clone() for key, value in model[0].state_dict().items()}
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"LoRALinear '0' is merged, and the merged state is not part of a "
                                               r"state dict: unmerge\(\) it before loading; \['0.weight', '0.bias', "
                                               r"'0.lora_A.weight', '0.lora_B.weight'\] not loaded") as refused:
            model.load_state_dict(saved, strict=strict)
        # the refused keys are not also reported missing (they were in the state dict; helper 118)
        assert "Missing key" not in str(refused.value), str(refused.value)
        assert model[0].merged and all(torch.equal(value, before[key]) for key, value in model[0].state_dict().items())
    # a key the state dict lacks is still reported missing (strict): the factors skip only the load refused for them
    partial = {key: value for key, value in saved.items() if key != "0.lora_B.weight"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"0.lora_B.weight\""):
        model.load_state_dict(partial)
    model[0].unmerge()
    model.load_state_dict(saved)
    x = torch.randn(3, 16)
    reference = inject_lora(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)), ["0", "1"], r=4)
    reference.load_state_dict(saved)
    torch.testing.assert_close(model(x), reference(x))


def test_a_multi_lora_state_dict_with_slot_metadata_set_adapter_refuses_is_not_loaded():
    """A rank past max_rank (or negative) or a non-finite scaling loaded without a word, and only the next forward
    refused it. Refused as torch reports a mismatch (after the load), naming the slots, the layer's slots left as
    they were; the base layer still loads, and a good state dict goes in."""
    layer = lk.MultiLoRALinear(nn.Linear(8, 6), max_adapters=3, max_rank=4)
    torch.manual_seed(0)
    layer.set_adapter(1, torch.randn(2, 8), torch.randn(6, 2), 0.5)
    good = {key: value.clone() for key, value in layer.state_dict().items()}
    layer.clear_adapter(1)
    before = {key: value.clone() for key, value in layer.state_dict().items() if not key.startswith("base_layer.")}
    bad = dict(good, ranks=torch.tensor([9, -1, 2], dtype=torch.int32),
               scalings=torch.tensor([float("nan"), 1.0, 0.0]), **{"base_layer.bias": torch.ones(6)})
    with pytest.raises(RuntimeError, match=r"MultiLoRALinear: in the state dict, ranks expected integers in \[0, 4\], "
                                           r"got 9 in slot 0, -1 in slot 1; scalings expected finite numbers in the "
                                           r"range of the slots' torch.float32, got nan in slot 0 \(as set_adapter "
                                           r"takes them\); its slots \(lora_a, lora_b, scalings, ranks\) not loaded"):
        layer.load_state_dict(bad)
    assert all(torch.equal(layer.state_dict()[key], value) for key, value in before.items())
    assert torch.equal(layer.base_layer.bias, torch.ones(6))
    # float64 1e39 is finite there and inf in the slots' float32; a float rank NaN (or 2.5) is no rank
    for key, value, shown in (("scalings", torch.tensor([0.0, 1e39, 0.0], dtype=torch.float64), "1e+39 in slot 1"),
                              ("ranks", torch.tensor([0.0, math.nan, 2.5]), "nan in slot 1, 2.5 in slot 2")):
        with pytest.raises(RuntimeError, match=rf"{key} expected .*, got {re.escape(shown)} \(as set_adapter"):
            layer.load_state_dict(dict(good, **{key: value}))
        assert all(torch.equal(layer.state_dict()[key], value) for key, value in before.items())
    layer.load_state_dict(good)
    assert layer.ranks.tolist() == [0, 2, 0] and layer.scalings[1].item() == 0.5


class _Aliased(nn.Module):
    """One nn.Linear under two attribute names (named_modules() lists it once, as `a`)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.c = nn.Linear(4, 4)


def test_a_target_reachable_under_two_names_is_named_in_warnings_and_errors():
    """A module assigned to two attributes is replaced under its first name only, as in PEFT: a forward through the
    second computes without the adapter, which now warns; targeting the second name alone "matched no nn.Linear"
    (though it is one) or was "no module of the model", and now says which name to target."""
    with pytest.warns(UserWarning) as caught:
        model = inject_lora(_Aliased(), ["a", "c"])
    messages = [str(w.message) for w in caught]
    assert messages == ["inject_lora: target 'a' is the same module as ['b']; it is replaced under 'a' only, so a "
                        "forward through 'b' computes without the adapter (as in PEFT)"], messages
    assert isinstance(model.a, LoRALinear) and type(model.b) is nn.Linear
    with pytest.warns(UserWarning, match=r"entries \['b'\] match no module of the model .*; 'b' is a second name of "
                                         r"module 'a': target that name"):
        inject_lora(_Aliased(), ["b", "c"])
    with pytest.raises(ValueError, match=r"target_modules \['b'\] matched no nn.Linear in the model; 'b' is a "
                                         r"second name of module 'a': target that name"):
        inject_lora(_Aliased(), ["b"])


def test_a_target_inside_a_block_listed_twice_gets_no_alias_warning():
    """A block listed twice (weights shared across depth) reaches its target as "0.q" and "1.q": the replacement is
    made in the block, so both compute the adapter; the warning said "1.q" computed without it (found by a review)."""
    block = nn.Sequential()
    block.add_module("q", nn.Linear(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = inject_lora(nn.Sequential(block, block), ["q"])
    assert isinstance(model[1].q, LoRALinear) and model[1].q is model[0].q


def test_reset_lora_parameters_of_a_merged_layer_is_refused_and_reset_parameters_unmerges():
    """The adapter of a merged layer cannot be re-drawn: unmerge() would subtract the new factors' delta, leaving
    the merged one in the base weight for good (0.39 off). reset_parameters() re-initialises the base weight too,
    so it may: the layer is then a fresh, unmerged one."""
    layer = _trained(LoRALinear(12, 6, r=2))
    base = layer.weight.detach().clone()
    layer.merge()
    factors = [layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone()]
    with pytest.raises(RuntimeError, match=r"reset_lora_parameters: the adapter is merged .* call unmerge\(\) first"):
        layer.reset_lora_parameters()
    assert layer.merged
    assert torch.equal(layer.lora_A.weight, factors[0]) and torch.equal(layer.lora_B.weight, factors[1])
    layer.unmerge()
    torch.testing.assert_close(layer.weight, base)
    layer.merge()
    layer.reset_parameters()
    assert not layer.merged and torch.count_nonzero(layer.lora_B.weight) == 0
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_a_lora_factor_on_its_own_resets_by_its_init_scheme():
    """LoRAFactor.reset_parameters() (what a meta-device init loop calls on every module holding parameters) follows
    the init_scheme it was built with or given: zeros, PEFT's gaussian (std 1/r over its rows) or kaiming-uniform
    within nn.Linear's bound 1/sqrt(fan_in); a factor pickled before init_scheme existed resets kaiming-uniform."""
    from lora_kernels.modules import LoRAFactor
    nan = float("nan")
    zeros = LoRAFactor(6, 4, init_scheme="zeros")
    zeros.weight.data.fill_(nan)
    zeros.reset_parameters()
    assert torch.count_nonzero(zeros.weight) == 0
    gaussian = LoRAFactor(8, 512, init_scheme="gaussian")
    gaussian.reset_parameters()
    assert abs(gaussian.weight.std().item() - 1 / 8) < 0.01
    pickled_before = LoRAFactor(6, 16, init_scheme="zeros")
    del pickled_before.init_scheme
    for factor in (LoRAFactor(6, 16), pickled_before):
        factor.weight.data.fill_(nan)
        factor.reset_parameters()
        bound = 1 / math.sqrt(16)
        assert factor.weight.abs().max() <= bound and factor.weight.abs().max() > bound / 2
    assert repr(LoRAFactor(6, 16)) == "LoRAFactor(shape=(6, 16))"


def test_multi_lora_meta_to_empty_reset_parameters_clears_every_slot():
    """MultiLoRALinear after to_empty: its ranks and scalings buffers held garbage (ranks like 1701081697).
    reset_parameters() re-initialises the base layer and empties every slot: the base output for every id."""
    from lora_kernels import MultiLoRALinear, prepare_multi_adapter
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
        prepare_multi_adapter(model, ["0", "2"], max_adapters=3, max_rank=4)
    _materialise_with_garbage(model)
    _reset_like_meta_init(model)
    layer = model[0]
    assert isinstance(layer, MultiLoRALinear)
    assert layer.ranks.tolist() == [0, 0, 0] and layer.scalings.tolist() == [0.0, 0.0, 0.0]
    assert layer.scalings.dtype == torch.float32
    assert torch.count_nonzero(layer.lora_a) == 0 and torch.count_nonzero(layer.lora_b) == 0
    x, ids = torch.randn(4, 32), torch.tensor([0, 1, 2, -1])
    torch.testing.assert_close(layer(x, ids), layer.base_layer(x))
    layer.set_adapter(1, torch.randn(2, 32), torch.randn(16, 2), scaling=0.5)  # usable as a new layer
    assert layer.ranks.tolist() == [0, 2, 0]
    layer.reset_parameters()  # on its own too, base included
    assert layer.ranks.tolist() == [0, 0, 0] and torch.isfinite(layer.base_layer.weight).all()


def test_merge_inside_autocast_adds_the_float32_delta():
    """delta_weight, merge and merge_and_unload inside torch.autocast: autocast rounded B @ A to bfloat16 (the merged
    fp32 weight off by 3e-3, and an unmerge outside autocast then left it 1.5e-2 off the original)."""
    torch.manual_seed(0)
    layer = _trained(LoRALinear(64, 48, r=8, lora_alpha=16))
    w0 = layer.weight.detach().clone()
    exact = w0.double() + layer.scaling * (layer.lora_B.weight.double() @ layer.lora_A.weight.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.delta_weight().dtype == torch.float32
        layer.merge()
    assert ((layer.weight.double() - exact).norm() / exact.norm()).item() <= 1e-6
    layer.unmerge()
    assert ((layer.weight - w0).norm() / w0.norm()).item() <= 1e-6
    model = nn.Sequential(layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        merged = merge_and_unload(model)
    assert ((merged[0].weight.double() - exact).norm() / exact.norm()).item() <= 1e-6


def test_float64_merge_unmerge_delta_and_to_linear_stay_in_float64():
    """A float64 layer merges in float64 (it rounded through float32: merge + unmerge moved the weight by ~1e-8 for
    good, and delta_weight() was float32). PEFT's drift there is 0; here it is within float64 rounding."""
    torch.manual_seed(0)
    layer = _trained(LoRALinear(48, 40, r=4, lora_alpha=24, dtype=torch.float64))
    w0, x = layer.weight.detach().clone(), torch.randn(6, 48, dtype=torch.float64)
    delta = layer.delta_weight()
    assert delta.dtype == torch.float64
    exact = layer.scaling * (layer.lora_B.weight @ layer.lora_A.weight)
    assert ((delta - exact).abs().max() / exact.abs().max()).item() <= 1e-15
    unmerged = layer(x)
    linear = layer.to_linear()
    assert linear.weight.dtype == torch.float64
    assert ((linear.weight - (w0 + exact)).abs().max() / w0.abs().max()).item() <= 1e-15
    layer.merge()
    assert ((layer(x) - unmerged).abs().max() / unmerged.abs().max()).item() <= 1e-14
    layer.unmerge()  # relative to the merged weight, whose rounding is all that may remain
    assert ((layer.weight - w0).abs().max() / (w0 + exact).abs().max()).item() <= 1e-15
    # 16-bit layers keep merging in float32 (the delta rounded once)
    half = _trained(LoRALinear(16, 8, r=2, dtype=torch.bfloat16))
    assert half.delta_weight().dtype == torch.float32


@pytest.mark.parametrize("wrap", ["inject_lora", "prepare_multi_adapter"])
def test_multihead_attention_out_proj_is_left_out_with_a_warning(wrap):
    """nn.MultiheadAttention reads out_proj.weight itself and never calls out_proj: a LoRA there would be ignored.
    Matched by "all-linear" or a CLIP-style "out_proj" entry (SigLIP's pooling head), it is left out with a warning;
    alone, nothing is left to wrap."""

    def wrapped(targets):
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
        with pytest.warns(UserWarning, match=r"left out 1 matched layer\(s\).*'self_attn.out_proj' \(the out_proj of "
                                             r"an nn.MultiheadAttention"):
            getattr(lk, wrap)(layer, targets, *((2, 2) if wrap == "prepare_multi_adapter" else ()))
        return {name for name, module in layer.named_modules() if isinstance(module, lk.modules.LORA_WRAPPERS)}

    assert wrapped("all-linear") == {"linear1", "linear2"}
    assert wrapped(["out_proj", "linear1"]) == {"linear1"}
    with pytest.raises(ValueError, match=r"matched no nn.Linear in the model it can wrap"):
        wrapped(["out_proj"])


@pytest.mark.parametrize("wrap", ["inject_lora", "load_peft_adapter", "prepare_multi_adapter"])
def test_lora_layers_of_a_transformer_encoder_layer_count_in_eval(wrap, tmp_path):
    """nn.TransformerEncoderLayer's inference fast path (eval mode; with grad too, as the weights it reads are
    frozen) reads linear1's and linear2's weights and never calls them: their adapter was skipped silently there
    (PEFT's is too), while training saw it (helper 270). A do-nothing hook on each LoRA layer keeps torch on the path
    that calls them, and the encoder (default enable_nested_tensor=True) no longer makes nested tensors of a padded
    batch, which a LoRA layer cannot take (review: "NestedTensorImpl doesn't support sizes"). The plain layers
    merge_and_unload gives back, which hold the merged weights, need no hook and warn of none."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0,
                                                                batch_first=True), num_layers=2)
    source = inject_lora(copy.deepcopy(encoder), ["linear1", "linear2"], r=2)
    for module in source.modules():
        if isinstance(module, LoRALinear):
            nn.init.normal_(module.lora_B.weight)
    if wrap == "inject_lora":
        model = source
    else:
        lk.save_peft_adapter(source, tmp_path)
        model = copy.deepcopy(encoder)
        if wrap == "prepare_multi_adapter":
            lk.prepare_multi_adapter(model, ["linear1", "linear2"], 2, 2)
            load_peft_adapter(model, tmp_path, adapter_name="a")
            lk.set_batch_adapters(model, ["a", "a"])
        else:
            load_peft_adapter(model, tmp_path)
    x = torch.randn(2, 5, 16)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])  # left aligned, as the nested path needs
    expected = {mask: model.train()(x, src_key_padding_mask=mask).detach() for mask in (None, padding)}
    model.eval()
    for mask in (None, padding):
        with_grad = model(x, src_key_padding_mask=mask)
        with torch.no_grad():
            without_grad = model(x, src_key_padding_mask=mask)
        for got in (with_grad, without_grad):
            torch.testing.assert_close(got.detach(), expected[mask], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        base = encoder.eval()(x)
    assert (expected[None] - base).abs().max() > 0.1  # the adapter counts
    if wrap != "prepare_multi_adapter":
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            merged = merge_and_unload(model)
        with torch.no_grad():
            torch.testing.assert_close(merged(x), expected[None], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("error", [NotImplementedError, AttributeError])
def test_all_linear_wraps_every_linear_when_get_output_embeddings_raises(error):
    """"all-linear" leaves out the output layer that get_output_embeddings names; an accessor that raises (older
    transformers' NotImplementedError, or an AttributeError for a head the model lacks) means there is none."""

    class NoOutputLayer(nn.Sequential):
        def get_output_embeddings(self):
            raise error("no output embeddings")

    model = inject_lora(NoOutputLayer(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), "all-linear", r=2)
    assert isinstance(model[0], LoRALinear) and isinstance(model[2], LoRALinear)


class _FusedExperts(nn.Module):
    """transformers 5's fused mixture-of-experts block: 3-D expert weights, no nn.Linear per expert."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj, self.down_proj = nn.Parameter(torch.zeros(4, 16, 8)), nn.Parameter(torch.zeros(4, 8, 8))
        self.router_bias = nn.Parameter(torch.zeros(4, 8))  # 2-D: not an expert weight


@pytest.mark.parametrize("wrap", ["inject_lora", "prepare_multi_adapter"])
def test_fused_expert_weights_left_out_are_named_at_the_callers_line(wrap):
    """"all-linear" (and a list entry matching nothing) on a model with fused 3-D expert weights warns at the
    caller's line, naming the first two of them (found by a module called "experts" or a class named "...Experts")
    and "..." when there are more."""

    def warned(model, targets):
        with pytest.warns(UserWarning) as caught:
            getattr(lk, wrap)(model, targets, *((2, 2) if wrap == "prepare_multi_adapter" else ()))
        assert [w.filename for w in caught] == [__file__]
        return str(caught[0].message)

    experts = nn.Module()  # found by its name alone
    experts.experts = nn.Module()
    experts.experts.gate_up_proj = nn.Parameter(torch.zeros(4, 16, 8))
    two = ["'1.gate_up_proj', '1.down_proj'"]
    assert f"fused expert weights ([{two[0]}]: 3-D Parameters" in warned(
        nn.Sequential(nn.Linear(8, 8), _FusedExperts()), "all-linear")
    assert f"fused expert weights ([{two[0]}] ...: 3-D Parameters" in warned(
        nn.Sequential(nn.Linear(8, 8), _FusedExperts(), experts), "all-linear")
    assert "add no LoRA layer; the model's experts are fused 3-D Parameters ('1.experts.gate_up_proj' ...)" in warned(
        nn.Sequential(nn.Linear(8, 8), experts), ["0", "w2"])


def test_more_than_three_left_out_layers_are_summarised_at_the_callers_line():
    """The left-out warning names the first three layers and counts the rest, so a large model's stays readable."""
    model = nn.Sequential(*(nn.MultiheadAttention(8, 2) for _ in range(4)), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"left out 4 matched layer\(s\) .*'2.out_proj' \(the out_proj[^']*calls it\) "
                                         r"and 1 more$") as caught:
        inject_lora(model, "all-linear")
    assert [w.filename for w in caught] == [__file__]


def test_warnings_name_a_pseudo_file_caller_run_from_inside_the_package(monkeypatch):
    """A REPL's or exec'd code's frame ("<stdin>") is the caller even with the current directory inside the package:
    told by file path, "<stdin>" resolved to a file there and was taken for the package's own."""
    monkeypatch.chdir(pathlib.Path(lk.__file__).parent)
    model = nn.Sequential(nn.Linear(8, 8))
    code = compile("lk.inject_lora(model, ['0', 'no_such_layer'])", "<stdin>", "exec")
    with pytest.warns(UserWarning, match="target_modules entries") as caught:
        exec(code, {"lk": lk, "model": model})
    assert [w.filename for w in caught] == ["<stdin>"]


def test_all_linear_in_any_case_is_all_linear_as_in_peft():
    """PEFT lowercases target_modules before comparing it with "all-linear": "ALL-Linear" wraps every nn.Linear but
    the output layer, leaves out (with the warning) a layer a LoRALinear cannot stand in for and names the fused
    expert weights, as "all-linear" does."""

    class Router(nn.Linear):  # a forward of its own: left out under "all-linear"
        def forward(self, x):
            return super().forward(x).softmax(-1)

    class WithHead(nn.Sequential):
        def get_output_embeddings(self):
            return self[2]

    for spelling in ("all-linear", "ALL-Linear"):
        model = WithHead(nn.Linear(8, 8), Router(8, 4), nn.Linear(8, 8), _FusedExperts())
        with pytest.warns(UserWarning) as caught:
            inject_lora(model, spelling, r=2)
        assert [name for name, m in model.named_modules() if isinstance(m, LoRALinear)] == ["0"], spelling
        messages = [str(w.message) for w in caught]
        assert len(messages) == 2 and "left out 1 matched layer(s)" in messages[0] and "'1' (a Router" in messages[0]
        assert "fused expert weights (['3.gate_up_proj', '3.down_proj']" in messages[1], messages


def test_multi_lora_float32_slots_train_the_adapters_of_a_16bit_model():
    """adapter_dtype=torch.float32: several adapters of a bfloat16 model trained in one batch keep float32 factors,
    as LoRALinear does for one (an update far below bfloat16's spacing lands in every entry; in bfloat16 slots almost
    none does), and the forward is the same as with bfloat16 slots."""
    from lora_kernels import MultiLoRALinear, prepare_multi_adapter

    torch.manual_seed(0)
    base = nn.Linear(64, 32).to(torch.bfloat16)
    x, ids = torch.randn(6, 64, dtype=torch.bfloat16), torch.tensor([0, 1, -1, 0, 1, 1])
    a, b = torch.randn(8, 64), 0.1 * torch.randn(32, 8)
    results = {}
    for adapter_dtype in (None, torch.float32):
        layer = MultiLoRALinear(base, 2, 8, adapter_dtype=adapter_dtype)
        layer.set_adapter(0, a, b, 2.0)
        layer.set_adapter(1, 0.5 * a, b, 1.0)
        layer.lora_a.requires_grad_(True)
        y = layer(x, ids)
        y.float().square().sum().backward()
        before = layer.lora_a.detach().clone()
        with torch.no_grad():
            layer.lora_a -= 1e-6 * layer.lora_a.grad.sign()
        results[adapter_dtype] = (y.detach(), layer.lora_a.grad.dtype, (layer.lora_a != before).float().mean().item())
    (y16, grad16, changed16), (y32, grad32, changed32) = results[None], results[torch.float32]
    assert y16.dtype == y32.dtype == torch.bfloat16 and torch.equal(y16, y32)
    assert (grad16, grad32) == (torch.bfloat16, torch.float32)
    assert changed32 == 1.0 and changed16 < 0.01
    assert "adapter_dtype=torch.float32" in repr(MultiLoRALinear(base, 2, 8, adapter_dtype=torch.float32))
    for dtype in (torch.int32, torch.float8_e4m3fn):  # float8 failed in the slots' set_adapter copies
        with pytest.raises(TypeError, match=r"MultiLoRALinear: adapter_dtype expected None or a floating torch.dtype "
                                            rf"\(float32/float16/bfloat16/float64\), got {dtype}"):
            MultiLoRALinear(base, 2, 8, adapter_dtype=dtype)
    model = prepare_multi_adapter(nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16)), ["0"], 2, 4,
                                  adapter_dtype=torch.float32)
    assert model[0].lora_a.dtype == model[0].lora_b.dtype == torch.float32


def _float32_slot_grads(backend, device, tokens=7, k=32, n=24, r=8):
    """(layer, expected dA, expected dB) after one backward of a bfloat16 MultiLoRALinear with float32 slots
    (adapter_dtype), the expected ones in float64 from the operands its forward used (the slots rounded to
    bfloat16)."""
    from lora_kernels import MultiLoRALinear
    torch.manual_seed(0)
    layer = MultiLoRALinear(nn.Linear(k, n, device=device).to(torch.bfloat16), 3, r, backend=backend,
                            adapter_dtype=torch.float32)
    for slot in range(3):
        layer.set_adapter(slot, torch.randn(r, k), torch.randn(n, r), scaling=0.5 + slot)
    layer.lora_a.requires_grad_(True)
    layer.lora_b.requires_grad_(True)
    x = torch.randn(tokens, k, dtype=torch.bfloat16, device=device)
    ids = torch.arange(tokens, device=device) % 4 - 1  # -1, 0, 1, 2, -1, ...
    dy = torch.randn(tokens, n, dtype=torch.bfloat16, device=device)
    layer(x, ids).backward(dy)
    a, b = (t.detach().to(torch.bfloat16).double() for t in (layer.lora_a, layer.lora_b))
    x64, dy64 = x.double(), dy.double()
    expected_a, expected_b = torch.zeros_like(a), torch.zeros_like(b)
    for slot in range(3):
        rows = ids == slot
        scaling = layer.scalings[slot].item()
        expected_b[slot] = scaling * dy64[rows].T @ (x64[rows] @ a[slot].T)
        expected_a[slot] = (scaling * dy64[rows] @ b[slot]).T @ x64[rows]
    return layer, expected_a, expected_b


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_multi_lora_float32_slots_get_float32_gradients(backend, device):
    """adapter_dtype=torch.float32 slots of a bfloat16 layer get the backward's float32 sums as gradients, not values
    rounded to bfloat16 first (cast outside the autograd Function, every entry was a bfloat16 number; on GPUs the
    cuda and torch backends' per-slot GEMMs still sum in bfloat16), within the tolerance of the reference."""
    from conftest import backend_or_skip
    backend_or_skip(backend, device)
    layer, expected_a, expected_b = _float32_slot_grads(backend, device)
    for grad, expected in ((layer.lora_a.grad, expected_a), (layer.lora_b.grad, expected_b)):
        assert grad.dtype == torch.float32
        if backend == "triton" or device.type == "cpu":
            assert (grad != grad.to(torch.bfloat16).float()).any(), "every entry is a bfloat16 number"
        assert_close(grad, expected, torch.bfloat16, "slot gradient")


def test_multi_lora_float32_slots_reach_second_order_gradients():
    """A MultiLoRALinear's float32 slots, cast inside its autograd Function: its create_graph backward reaches them,
    as the reference backend's does through its casts."""
    from conftest import backend_or_skip
    backend_or_skip("cpu", "cpu")
    layer, _, _ = _float32_slot_grads("cpu", "cpu")
    x, ids = torch.randn(5, 32, dtype=torch.bfloat16, requires_grad=True), torch.tensor([0, 1, 2, -1, 1])
    second_order = []
    for backend in ("cpu", "reference"):
        layer.backend = backend
        layer.lora_a.grad = layer.lora_b.grad = None
        (grad_a,) = torch.autograd.grad(layer(x, ids).float().square().sum(), layer.lora_a, create_graph=True)
        grad_a.square().sum().backward()
        second_order.append(layer.lora_b.grad)
    assert second_order[0] is not None and second_order[0].abs().sum() > 0
    assert_close(second_order[0], second_order[1], torch.bfloat16, "second-order gradient", scale=2)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_multi_lora_float32_slots_save_no_16_bit_copies_for_backward(backend):
    """The 16-bit casts of a MultiLoRALinear's float32 slots are made again in backward, not saved for it: the casts
    of every slot, L·R·(K+N) elements whatever the batch's token count, were saved activation memory of the order of
    x's (found by counting saved storages: 32 slots of rank 16 at K = N = 1024 saved 2 MiB per layer beside x's
    0.5 MiB at 256 tokens). The float32 slots themselves are saved (parameters: no memory of their own)."""
    from conftest import backend_or_skip
    backend_or_skip(backend, "cpu")
    layer, _, _ = _float32_slot_grads(backend, "cpu")
    x, ids = torch.randn(5, 32, dtype=torch.bfloat16, requires_grad=True), torch.tensor([0, 1, 2, -1, 1])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x, ids)
    slot_shapes = {layer.lora_a.shape, layer.lora_b.shape}
    assert [t.dtype for t in saved if t.shape in slot_shapes] == [torch.float32] * 2
    saved.clear()  # no references to the saved tensors beside the graph's
    layer.lora_a.grad = layer.lora_b.grad = None
    y.float().square().sum().backward()
    grads = [layer.lora_a.grad.clone(), layer.lora_b.grad.clone(), x.grad.clone()]
    x.grad = layer.lora_a.grad = layer.lora_b.grad = None
    layer(x, ids).float().square().sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(grads, [layer.lora_a.grad, layer.lora_b.grad, x.grad]))


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16_layer", "fp32_layer_under_autocast"])
def test_multi_lora_float32_slots_are_cast_inside_the_autograd_function(autocast):
    """No cast node between a MultiLoRALinear's float32 slots and its autograd Function (the slots' gradients,
    L·R·(K+N) elements, cast back by autograd every step before), in a bfloat16 layer and in a float32 one under
    torch.autocast, where the Function saved autocast's casts of every slot for backward too."""
    layer, _, _ = _float32_slot_grads("torch", "cpu")
    if autocast:
        layer.float()  # the slots are float32 already
    x = torch.randn(5, 32, dtype=torch.float32 if autocast else torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        node = layer(x, torch.tensor([0, 1, 2, -1, 1])).grad_fn
    assert type(node).__name__ == "MultiLoRAFunctionBackward"
    assert [t.dtype for t in saved if t.shape in (layer.lora_a.shape, layer.lora_b.shape)] == [torch.float32] * 2
    assert _leaves_fed_by(node, slice(3, 5)) == [layer.lora_a, layer.lora_b]


@pytest.mark.parametrize("convert", ["half", "bfloat16", "to_bfloat16"])
def test_multi_lora_scalings_stay_float32_across_dtype_conversions(convert):
    """Module dtype conversions cast floating buffers: a scaling of 16/24 became 0.66797 under .bfloat16(). The
    scalings buffer keeps its float32 values; the factors and base take the new dtype as usual."""
    from lora_kernels import MultiLoRALinear
    layer = MultiLoRALinear(nn.Linear(16, 8), max_adapters=2, max_rank=4)
    layer.set_adapter(0, torch.randn(4, 16), torch.randn(8, 4), scaling=16 / 24)
    dtype = torch.float16 if convert == "half" else torch.bfloat16
    layer = layer.to(dtype) if convert == "to_bfloat16" else getattr(layer, convert)()
    assert layer.scalings.dtype == torch.float32 and layer.scalings[0].item() == torch.tensor(16 / 24).item()
    assert layer.lora_a.dtype == layer.base_layer.weight.dtype == dtype
    layer.set_adapter(1, torch.randn(2, 16), torch.randn(8, 2), scaling=16 / 24)  # loaded after the conversion too
    assert layer.scalings[1].item() == layer.scalings[0].item()
    x = torch.randn(3, 16, dtype=dtype)
    assert layer(x, torch.tensor([0, 1, -1])).dtype == dtype
    moved = layer.to("meta", torch.float16)  # a conversion that also moves it still moves it
    assert moved.scalings.is_meta and moved.scalings.dtype == torch.float32 and moved.lora_a.dtype == torch.float16


def _float64_slot_error(layer, lora_a, lora_b, scaling):
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    expected_delta = scaling * (x @ lora_a.T) @ lora_b.T
    y = layer(x, torch.zeros(5, dtype=torch.long))
    return ((y - layer.base_layer(x) - expected_delta).norm() / expected_delta.norm()).item()


@pytest.mark.parametrize("made", ["float64", "double", "meta_then_load"])
def test_multi_lora_float64_layers_keep_float64_scalings(made, tmp_path):
    """A float64 layer's scalings are float64 (design §7: 1e-10 for float64): kept in float32, an rsLoRA scaling
    such as 8/sqrt(6) left every float64 output 3e-8 off. Made in float64, converted with .double() (the adapters
    set after it), or built on the meta device and given float64 base weights before load_peft_adapter; .float()
    narrows them back to the float32 array the kernels read."""
    import json
    from safetensors.torch import save_file
    from lora_kernels import MultiLoRALinear, prepare_multi_adapter
    torch.manual_seed(0)
    scaling = 8 / math.sqrt(6)
    lora_a, lora_b = torch.randn(6, 16, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    if made == "meta_then_load":
        directory = tmp_path / "adapter"
        directory.mkdir()
        (directory / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": 6, "lora_alpha": 8, "use_rslora": True, "target_modules": ["0"]}))
        save_file({"base_model.model.0.lora_A.weight": lora_a.float().contiguous(),
                   "base_model.model.0.lora_B.weight": lora_b.float().contiguous()},
                  str(directory / "adapter_model.safetensors"))
        lora_a, lora_b = lora_a.float().double(), lora_b.float().double()
        with torch.device("meta"):
            model = nn.Sequential(nn.Linear(16, 8))
            prepare_multi_adapter(model, ["0"], max_adapters=2, max_rank=8)
        base = nn.Linear(16, 8).double()
        model.load_state_dict({"0.base_layer.weight": base.weight, "0.base_layer.bias": base.bias}, strict=False,
                              assign=True)
        load_peft_adapter(model, str(directory), adapter_name="a")
        layer = model[0]
    else:
        base = nn.Linear(16, 8).double() if made == "float64" else nn.Linear(16, 8)
        layer = MultiLoRALinear(base, max_adapters=2, max_rank=8)
        if made == "double":
            layer = layer.double()
        layer.set_adapter(0, lora_a, lora_b, scaling)
    assert layer.scalings.dtype == torch.float64
    assert _float64_slot_error(layer, lora_a, lora_b, scaling) < 1e-13
    layer.float()
    assert layer.scalings.dtype == torch.float32 and layer.scalings[0].item() == torch.tensor(scaling).float().item()


def test_multi_lora_scalings_set_in_float32_are_exact_after_double():
    """Adapters set (or loaded) into a float32 layer, then .double(): the float32 buffer was widened, so a scaling such
    as 2/3 stayed rounded to float32 and float64 outputs were 7e-7 off PEFT's (helper 283); converted before the load
    they were exact. A slot cleared or given another value through the state dict since keeps its stored value."""
    from lora_kernels import MultiLoRALinear
    torch.manual_seed(0)
    scaling = 8 / math.sqrt(6)
    lora_a, lora_b = torch.randn(6, 16, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    layer = MultiLoRALinear(nn.Linear(16, 8), max_adapters=3, max_rank=8)
    for slot in range(3):
        layer.set_adapter(slot, lora_a, lora_b, scaling)
    layer.clear_adapter(1)
    layer.load_state_dict({**layer.state_dict(), "scalings": torch.tensor([scaling, 0.0, 0.5])})
    lora_a, lora_b = lora_a.float().double(), lora_b.float().double()  # the float32 slots hold them rounded
    for _ in range(2):  # and again after a round trip through float32
        layer.double()
        assert layer.scalings.dtype == torch.float64 and layer.scalings.tolist() == [scaling, 0.0, 0.5]
        assert _float64_slot_error(layer, lora_a, lora_b, scaling) < 1e-13
        layer.float()


def test_multi_lora_share_memory_shares_the_scalings_it_holds():
    """Only a conversion of the layer's dtype re-types the scalings: share_memory() of a float64 layer holding float32
    scalings (a float32 state dict assigned into it) had replaced them by an unshared float64 copy."""
    from lora_kernels import MultiLoRALinear
    layer = MultiLoRALinear(nn.Linear(8, 4).double(), max_adapters=2, max_rank=2)
    state = {name: t.float() if name == "scalings" else t for name, t in layer.state_dict().items()}
    layer.load_state_dict(state, assign=True)
    held = layer.scalings
    layer.share_memory()
    assert layer.scalings is held and held.is_shared() and layer.lora_a.is_shared()


def test_hooks_on_a_replaced_or_wrapped_layer_get_a_warning(tmp_path):
    """Hooks registered on a layer before the adapter goes in never fire afterwards: inject_lora and
    load_peft_adapter replace the module, MultiLoRALinear keeps it but never calls it, merge_and_unload replaces the
    LoRA layer. Each warns, naming the module and the hook kinds, at the caller's line; hook-free layers do not."""
    import warnings

    from lora_kernels import MultiLoRALinear, load_peft_adapter, prepare_multi_adapter, save_peft_adapter

    def model_with_hooks():
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        model[0].register_forward_hook(lambda module, args, output: None)
        model[2].register_forward_pre_hook(lambda module, args: None)
        return model

    match = r"module '[02]' \(Linear\) has forward (pre )?hooks, which are not carried over: the LoRALinear that"
    with pytest.warns(UserWarning, match=rf"inject_lora: {match}") as injected:
        model = inject_lora(model_with_hooks(), ["0", "2"])
    save_peft_adapter(model, tmp_path)
    with pytest.warns(UserWarning, match=rf"load_peft_adapter: {match}") as loaded:
        load_peft_adapter(model_with_hooks(), tmp_path)
    for caught in (injected, loaded):
        assert sorted(str(w.message).partition(" has ")[2].partition(" hooks")[0] for w in caught) == [
            "forward", "forward pre"]
        assert all(w.filename == __file__ for w in caught)
    with pytest.warns(UserWarning, match=r"prepare_multi_adapter: module '0' \(Linear\) has forward hooks.*"
                                         r"MultiLoRALinear keeps it as base_layer but reads its weight and "
                                         r"never") as prepared:
        prepare_multi_adapter(model_with_hooks(), ["0"], max_adapters=2, max_rank=4)
    with pytest.warns(UserWarning, match=r"MultiLoRALinear: base_linear \(Linear\) has forward pre hooks") as built:
        MultiLoRALinear(model_with_hooks()[2], max_adapters=2, max_rank=4)
    assert all(w.filename == __file__ for w in (*prepared, *built))
    model[0].register_full_backward_hook(lambda module, grad_input, grad_output: None)
    model[0].register_full_backward_pre_hook(lambda module, grad_output: None)
    with pytest.warns(UserWarning, match=r"merge_and_unload: module '0' \(LoRALinear\) has backward and backward pre "
                                         r"hooks"):
        merge_and_unload(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_and_unload(inject_lora(nn.Sequential(nn.Linear(8, 8)), ["0"]))


def test_a_numpy_lora_alpha_is_kept_as_a_python_number(tmp_path):
    """lora_alpha from numpy (a sweep's grid, as r already is: test_layer_sizes_and_ranks_take_numpy_integers_...)
    was stored as given: its numpy scaling made torch.compile(fullgraph=True) fail ("scaling expected a real number,
    got ndarray": dynamo traces numpy scalars as arrays) and save_peft_adapter fail after training ("Object of type
    float32 is not JSON serializable")."""
    np = pytest.importorskip("numpy")
    import json
    x = torch.randn(3, 8)
    for alpha, expected in ((np.float32(16), 16.0), (np.int64(16), 16), (np.float64(12.5), 12.5)):
        layer = LoRALinear(8, 6, r=4, lora_alpha=alpha, init_lora_weights=False)
        assert type(layer.lora_alpha) is type(expected) and layer.lora_alpha == expected
        assert type(layer.scaling) is float and layer.scaling == expected / 4
        torch._dynamo.reset()
        assert torch.equal(torch.compile(layer, fullgraph=True, backend="eager")(x), layer(x))
        model = inject_lora(nn.Sequential(nn.Linear(8, 6)), ["0"], r=4, lora_alpha=alpha)
        save_peft_adapter(model, tmp_path)
        assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == expected


def test_disable_adapter_computes_the_base_model_beside_multi_lora_layers():
    """inject_lora layers may sit beside prepared ones (README: they apply to every row); lk.disable_adapter switched
    off the LoRALinear layers only, and the MultiLoRALinear layers kept adding the adapter set_batch_adapters named:
    not the base model, without a word. On exit the names in effect before are back."""
    import copy
    import warnings
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    model = lk.prepare_multi_adapter(copy.deepcopy(base), ["0"], 2, 4)
    model[0].set_adapter(0, torch.randn(2, 8), torch.randn(8, 2), 1.0)
    model.lora_adapter_slots["a"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lk.inject_lora(model, ["2"], r=2, init_lora_weights=False)
    x = torch.randn(3, 8)
    with lk.set_batch_adapters(model, "a"):
        adapted = model(x)
        with lk.disable_adapter(model):
            assert torch.allclose(model(x), base(x), atol=1e-6)
        assert torch.equal(model(x), adapted)


def test_disable_adapter_beside_multi_lora_layers_and_with_heads_inside_a_compiled_step():
    """The compiled step of test_disable_adapter_inside_a_compiled_step on a model with MultiLoRALinear layers beside
    the LoRALinear ones, and on one with modules_to_save heads: the name table's lock (set_batch_adapters, entered
    for the MultiLoRALinear layers) and the heads' warning broke the graph (an error under fullgraph=True). One graph
    now, eager's results, the names in effect before put back."""
    from torch._dynamo.testing import CompileCounter
    import copy
    import warnings
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    mixed = lk.prepare_multi_adapter(copy.deepcopy(base), ["0"], 2, 4, backend="torch")
    mixed[0].set_adapter(0, torch.randn(2, 8), torch.randn(8, 2), 1.0)
    mixed.lora_adapter_slots["a"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lk.inject_lora(mixed, ["2"], r=2, init_lora_weights=False, backend="torch")
        with_heads = inject_lora(copy.deepcopy(base), ["0"], r=2, init_lora_weights=False, backend="torch",
                                 modules_to_save=["2"])
    x = torch.randn(3, 8)
    for model in (mixed, with_heads):
        def step(x):
            adapted = model(x)
            with lk.disable_adapter(model):
                return adapted, model(x)

        counter = CompileCounter()
        compiled = torch.compile(step, backend=counter, fullgraph=True)
        with torch.no_grad(), lk.set_batch_adapters(mixed, "a"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = step(x)
            for _ in range(2):
                for got, want in zip(compiled(x), expected):
                    torch.testing.assert_close(got, want)
            assert mixed[0].batch_adapters.names == "a"
        assert counter.frame_count == 1
        assert torch.allclose(expected[1], base(x) if model is mixed else model[2](model[1](base[0](x))), atol=1e-6)


def _three_projections():
    torch.manual_seed(0)
    return nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8), "o_proj": nn.Linear(8, 8)})


@pytest.mark.parametrize("op", ["inject_lora", "prepare_multi_adapter"])
def test_an_exclude_modules_entry_that_excludes_nothing_warns(op):
    """exclude_modules=["o_prj"] (a typo) excluded nothing without a word, so o_proj got a LoRA layer it was meant not
    to get; PEFT warns there ("You have passed exclude_modules=... but no modules were excluded")."""
    call = ((lambda m, **kw: lk.inject_lora(m, ".*proj", r=2, **kw)) if op == "inject_lora" else
            (lambda m, **kw: lk.prepare_multi_adapter(m, ".*proj", 2, 2, **kw)))
    with pytest.warns(UserWarning, match=rf"{op}: exclude_modules \['o_prj'\] matches no module of the model"):
        call(_three_projections(), exclude_modules=["o_prj"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = call(_three_projections(), exclude_modules=["o_proj"])  # one that excludes: no warning
    assert type(model["o_proj"]) is nn.Linear


@pytest.mark.parametrize("option,words", [
    (dict(exclude_modules=["q_proj"]), r"\['q_proj'\] would match, but exclude_modules \['q_proj'\] leaves them out"),
    (dict(layers_to_transform=[5]), r"\['layers\.0\.q_proj', 'layers\.1\.q_proj'\] would match, but not in "
                                     r"layers_to_transform \[5\]"),
])
def test_targets_left_out_by_the_options_are_not_called_unmatched(option, words):
    """When exclude_modules or layers_to_transform left out every module target_modules matched, the error said
    only "target_modules ['q_proj'] matched no nn.Linear in the model", which sends the user to check names that
    are right. It now says which modules matched and which option left them out (as PEFT names those options)."""
    model = nn.Sequential() if "layers_to_transform" in option else _three_projections()
    if "layers_to_transform" in option:
        model.layers = nn.ModuleList([nn.ModuleDict({"q_proj": nn.Linear(8, 8)}) for _ in range(2)])
    tree = [name for name, _ in model.named_modules()]
    with pytest.raises(ValueError, match=r"inject_lora: target_modules \['q_proj'\] matched no nn\.Linear in the "
                                         r"model; " + words):
        lk.inject_lora(model, ["q_proj"], r=2, **option)
    assert [name for name, _ in model.named_modules()] == tree


@pytest.mark.parametrize("compute_weight", ["parametrize_weight_norm", "old_weight_norm", "prune"])
def test_merge_of_a_weight_computed_since_wrapping_is_refused_not_dropped(compute_weight):
    # A weight parametrized (or pruned, or weight-normed) after the layer was made is computed on each access or
    # forward: merge() wrote the delta into that temporary, set merged=True, and the adapter vanished from the output
    layer = _trained(LoRALinear(16, 12, r=4, backend="torch"))
    if compute_weight == "parametrize_weight_norm":
        nn.utils.parametrizations.weight_norm(layer, "weight")
    elif compute_weight == "old_weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            nn.utils.weight_norm(layer, "weight")
    else:
        from torch.nn.utils import prune
        prune.l1_unstructured(layer, "weight", 0.3)
    x = torch.randn(5, 16)
    expected = layer(x)
    with pytest.raises(TypeError, match="computed from other parameters"):
        layer.merge()
    assert not layer.merged
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.to_linear()(x), expected)  # the supported way to fold it in
    merged = _trained(LoRALinear(16, 12, r=4, backend="torch"))
    merged.merge()
    nn.utils.parametrizations.weight_norm(merged, "weight")
    with pytest.raises(TypeError, match="LoRALinear.unmerge: the base weight is computed"):
        merged.unmerge()
    assert merged.merged


@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
@pytest.mark.parametrize("compute_weight", ["old_weight_norm", "old_spectral_norm", "prune"])
def test_a_factor_weight_recomputed_by_a_pre_hook_is_refused_by_name(compute_weight, factor):
    """The deprecated weight_norm / spectral_norm and prune recompute a module's weight in a forward pre-hook; the
    factors are read by the kernels, never called, so the hook never ran: spectral_norm's lora_A silently never
    trained (its weight_orig got no gradient), pruned or weight-normed factors failed at the second backward with
    torch's "backward through the graph a second time", and a merge added a stale delta. Refused by name, in the
    forward and in merge, the layer unchanged; torch.nn.utils.parametrizations' versions compute the weight on
    access and train."""
    layer = _trained(LoRALinear(16, 12, r=4, backend="torch"))
    module = getattr(layer, factor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if compute_weight == "old_weight_norm":
            nn.utils.weight_norm(module, "weight")
        elif compute_weight == "old_spectral_norm":
            nn.utils.spectral_norm(module, "weight")
        else:
            from torch.nn.utils import prune
            prune.l1_unstructured(module, "weight", 0.3)
    weight_before = layer.weight.clone()
    words = f"{factor}.weight is recomputed by a forward pre-hook of {factor}"
    with pytest.raises(TypeError, match=f"LoRALinear.forward: {words}"):
        layer(torch.randn(5, 16))
    with pytest.raises(TypeError, match=f"LoRALinear.delta_weight: {words}"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, weight_before)

    parametrized = _trained(LoRALinear(16, 12, r=4, backend="torch"))
    nn.utils.parametrizations.spectral_norm(getattr(parametrized, factor), "weight")
    original = getattr(parametrized, factor).parametrizations.weight.original
    before = original.detach().clone()
    optimizer = torch.optim.SGD(parametrized.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        parametrized(torch.randn(5, 16)).square().sum().backward()
        optimizer.step()
    assert not torch.equal(original, before)  # it trains


def test_merge_of_a_plain_tensor_weight_names_fsdp1_not_a_parametrization():
    # FullyShardedDataParallel (use_orig_params=False) holds `weight` as a plain tensor view of its flat parameter
    # outside summon_full_params: not in _parameters, yet nothing parametrizes or prunes it; the refusal named those
    layer = _trained(LoRALinear(16, 12, r=4, backend="torch"))
    view = layer.weight.detach()
    del layer.weight
    layer.weight = view  # what FSDP1's _use_unsharded_views(as_params=False) does
    before = view.clone()
    for op in ("merge", "unmerge"):
        layer.merged = op == "unmerge"
        with pytest.raises(TypeError, match=rf"LoRALinear.{op}: the base weight is a Tensor, not the layer's "
                                            rf"Parameter .*summon_full_params"):
            getattr(layer, op)()
    torch.testing.assert_close(layer.weight, before, rtol=0, atol=0)


def test_a_forward_set_on_the_linear_instance_is_refused_like_a_subclass_forward():
    """A forward patched onto one nn.Linear (module.forward = ...: a clamp, fake-quant or capture patch) passed the
    check of the class's forward and was dropped silently: a fresh adapter differed from the layer by 1.0, where
    PEFT calls the patched layer (helper 270). Refused by name as a subclass's own forward is; "all-linear" leaves
    the layer out with a warning."""
    import types

    def patched(self, x):
        return nn.functional.linear(x, self.weight, self.bias).clamp(min=0)

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    model[0].forward = types.MethodType(patched, model[0])
    layers = list(model)
    message = r"has a forward set on the instance \(module.forward = \.\.\.\).*\(del module.forward\)"
    with pytest.raises(TypeError, match=r"LoRALinear.from_linear: linear \(Linear\) " + message):
        LoRALinear.from_linear(model[0])
    with pytest.raises(TypeError, match=r"MultiLoRALinear: base_linear \(Linear\) " + message):
        lk.MultiLoRALinear(model[0], 2, 2)
    with pytest.raises(TypeError, match=r"inject_lora: module '0' \(Linear\) " + message):
        inject_lora(model, ["0", "1"], r=2)
    assert list(model) == layers and all(p.requires_grad for p in model.parameters())
    with pytest.warns(UserWarning, match=r"left out 1 matched layer\(s\).*'0' \(a Linear: its own forward"):
        inject_lora(model, "all-linear", r=2)
    assert model[0] is layers[0] and isinstance(model[1], LoRALinear)


def test_a_forward_accelerate_put_back_on_the_instance_is_no_patch():
    """accelerate's remove_hook_from_module leaves the class's own bound forward in the instance's __dict__ (PEFT's
    from_pretrained on an offloaded model, diffusers' remove_all_hooks): no patch, wrapped as before (the review of
    the instance-forward refusal)."""
    hooks = pytest.importorskip("accelerate.hooks")
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    hooks.add_hook_to_module(model[0], hooks.ModelHook())
    hooks.remove_hook_from_submodules(model)
    assert "forward" in vars(model[0])
    inject_lora(model, ["0", "1"], r=2)
    assert isinstance(model[0], LoRALinear) and isinstance(model[1], LoRALinear)


@pytest.mark.parametrize("register, kind", [("register_state_dict_post_hook", "state_dict"),
                                            ("register_state_dict_pre_hook", "state_dict pre"),
                                            ("register_load_state_dict_pre_hook", "load_state_dict pre"),
                                            ("register_load_state_dict_post_hook", "load_state_dict post")])
def test_state_dict_hooks_of_a_replaced_linear_are_warned_of(register, kind):
    """state_dict and load_state_dict hooks of a layer a LoRALinear replaces stop running, like its forward hooks,
    which were warned of; these were dropped without a word (helper 270). MultiLoRALinear keeps the layer as
    base_layer, whose state dict still runs them: no warning there."""
    def hooked():
        linear = nn.Linear(8, 8)
        getattr(linear, register)(lambda *args: None)
        return linear

    with pytest.warns(UserWarning, match=rf"inject_lora: module '0' \(Linear\) has {kind} hooks, which are not "
                                         rf"carried over to the layer that replaces it"):
        inject_lora(nn.Sequential(hooked()), ["0"], r=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.MultiLoRALinear(hooked(), 2, 2)


@pytest.mark.parametrize("extra", ["bias_buffer", "parameter", "buffer"])
def test_a_linear_holding_other_tensors_is_refused_before_they_leave_the_model(extra, tmp_path):
    """A LoRALinear keeps the weight and bias Parameters only: a bias registered as a buffer, or an extra Parameter
    or buffer (an activation scale), left the model and its state dict silently, and a bias buffer stayed float32
    through .double() (helper 270). Refused by name, the model unchanged; "all-linear" leaves the layer out with a
    warning (it failed the whole call; helper 273); MultiLoRALinear, which keeps the layer as base_layer, takes it."""
    def model_with_extra():
        model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 4))
        if extra == "bias_buffer":
            del model[0].bias
            model[0].register_buffer("bias", torch.zeros(4))
        elif extra == "parameter":
            model[0].extra = nn.Parameter(torch.ones(4))
        else:
            model[0].register_buffer("act_scale", torch.ones(8))
        return model

    named = {"bias_buffer": "buffer 'bias'", "parameter": "parameter 'extra'", "buffer": "buffer 'act_scale'"}[extra]
    model = model_with_extra()
    keys = list(model.state_dict())
    message = rf"module '0' \(Linear\) holds {named} besides its weight and bias Parameters"
    with pytest.raises(TypeError, match=rf"^inject_lora: {message}"):
        inject_lora(model, ["0"], r=2)
    assert type(model[0]) is nn.Linear and list(model.state_dict()) == keys
    with pytest.raises(TypeError, match=rf"^LoRALinear.from_linear: linear \(Linear\) holds {named}"):
        LoRALinear.from_linear(model[0])
    with pytest.warns(UserWarning, match=r"left out 1 matched layer\(s\).*'0' \(a Linear: .*other tensors besides"):
        inject_lora(model, "all-linear", r=2)
    assert type(model[0]) is nn.Linear and isinstance(model[1], LoRALinear)
    lk.save_peft_adapter(inject_lora(nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 4)), ["0", "1"], r=2), tmp_path)
    with pytest.raises(TypeError, match=rf"^load_peft_adapter: {message}"):
        load_peft_adapter(model_with_extra(), tmp_path)
    prepared = lk.prepare_multi_adapter(model_with_extra(), ["0"], 2, 2)
    kept = {"bias_buffer": "bias", "parameter": "extra", "buffer": "act_scale"}[extra]
    assert isinstance(prepared[0], lk.MultiLoRALinear) and f"0.base_layer.{kept}" in prepared.state_dict()


def test_uninitialised_lazy_linears_are_refused_by_name(tmp_path):
    """nn.LazyLinear before its first forward: torch's "uninitialized parameter" error, naming no module, also under
    "all-linear" and for a lazy module the targets do not include (the model's parameters are frozen)."""
    with pytest.raises(TypeError, match=r"LoRALinear.from_linear: linear \(LazyLinear\) has a weight that is not "
                                        r"initialised yet .*run one forward first"):
        LoRALinear.from_linear(nn.LazyLinear(4))
    with pytest.raises(TypeError, match=r"MultiLoRALinear: base_linear \(LazyLinear\) has a weight that is not "
                                        r"initialised"):
        lk.MultiLoRALinear(nn.LazyLinear(4), 2, 2)
    model = nn.Sequential(nn.Linear(8, 8), nn.LazyLinear(4))
    for targets in (["0"], "all-linear"):
        with pytest.raises(ValueError, match=r"inject_lora: modules \['1'\] have uninitialised parameters .*run one "
                                             r"forward first; the model is unchanged"):
            inject_lora(model, targets, r=2)
    assert type(model[0]) is nn.Linear and model[0].weight.requires_grad
    model(torch.randn(2, 8))
    inject_lora(model, "all-linear", r=2)
    assert isinstance(model[1], LoRALinear)
    # a lazy module added after the injection does not stop the adapter's save (nothing is frozen there)
    model.append(nn.LazyLinear(4))
    save_peft_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_a_pruned_linear_is_refused_with_how_to_remove_the_pruning():
    """The refusal of a weight computed by a forward pre-hook named only weight_norm's remedy (helper 270)."""
    import torch.nn.utils.prune

    linear = nn.Linear(8, 4)
    torch.nn.utils.prune.l1_unstructured(linear, "weight", 0.5)
    with pytest.raises(TypeError, match=r"torch.nn.utils.prune, compute it in a forward pre-hook.*prune.remove"):
        LoRALinear.from_linear(linear)


def test_a_subclass_that_computes_its_base_weight_is_used_by_the_forward():
    """The forward reads the weight from the layer's parameter dict (host time); a subclass's base_weight() had been
    skipped there, while the disabled and merged paths used it (review 291)."""

    class HalfWeight(LoRALinear):
        def base_weight(self):
            return super().base_weight() * 0.5

    layer = HalfWeight.from_linear(nn.Linear(8, 6), r=2).eval()  # B = 0: the adapter adds nothing
    x = torch.randn(3, 8)
    with layer.disable_adapter():
        disabled = layer(x)
    torch.testing.assert_close(layer(x), disabled)
    torch.testing.assert_close(disabled, nn.functional.linear(x, layer.weight * 0.5, layer.bias))
