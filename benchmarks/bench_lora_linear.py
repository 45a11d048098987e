"""Single-adapter LoRA linear: fused forward vs base F.linear; fwd+bwd vs the two base GEMMs and vs full
fine-tuning (a second ratio column); PEFT's unfused layer with dropout / ours (design.md §8 rows 1-5)."""

import functools

import pytest
import torch
import torch.nn.functional as F

from conftest import BACKENDS, DEVICE, DTYPE, SHAPES, run
from lora_kernels import lora_linear
from lora_kernels.bench import DROPOUT, InputSets, peft_lora_forward

K = N = SHAPES["hidden"]
R = SHAPES["rank"]
TRAIN_M = SHAPES["train_m"]
SCALING = 2.0


@functools.lru_cache(maxsize=2)
def inputs(m, r, grad):
    return InputSets(DEVICE, DTYPE, m, K, N, r, grad=grad)


@pytest.mark.parametrize("m", SHAPES["ms"])
@pytest.mark.parametrize("variant", ["base F.linear"] + BACKENDS)
def test_forward(benchmark, m, variant):
    benchmark.group = f"forward M={m} K={K} N={N} r={R}"
    sets = inputs(m, R, False)
    if variant == "base F.linear":
        fn = lambda x, w, a, b: F.linear(x, w)  # noqa: E731
    else:
        fn = lambda x, w, a, b: lora_linear(x, w, a, b, SCALING, backend=variant)  # noqa: E731
    with torch.no_grad():
        run(benchmark, sets.fns(fn), role="baseline" if variant == "base F.linear" else "candidate", backend=variant)


@pytest.mark.parametrize("r", SHAPES["ranks"])
@pytest.mark.parametrize("variant", ["two base GEMMs", "full fine-tuning"] + BACKENDS)
def test_fwd_bwd(benchmark, r, variant):
    benchmark.group = f"fwd+bwd M={TRAIN_M} K={K} N={N} r={r}"
    sets = inputs(TRAIN_M, r, True)
    if variant == "two base GEMMs":  # the physical floor: x·Wᵀ and dY·W, nothing else
        def fn(x, w, dy, **_):
            with torch.no_grad():
                return F.linear(x, w), dy @ w
    elif variant == "full fine-tuning":  # dX and dW through autograd
        def fn(x, w_ft, dy, **_):
            return torch.autograd.grad(F.linear(x, w_ft), (x, w_ft), dy)
    else:
        def fn(x, w, a, b, dy, **_):
            return torch.autograd.grad(lora_linear(x, w, a, b, SCALING, backend=variant), (x, a, b), dy)
    role = {"two base GEMMs": "baseline", "full fine-tuning": "full_ft"}.get(variant, "candidate")
    run(benchmark, sets.fns(fn), role=role, backend=variant)


@pytest.mark.parametrize("variant", ["PEFT unfused layer"] + BACKENDS)
def test_fwd_bwd_dropout(benchmark, variant):
    benchmark.group = f"fwd+bwd dropout {DROPOUT} M={TRAIN_M} K={K} N={N} r={R}"
    sets = inputs(TRAIN_M, R, True)
    if variant == "PEFT unfused layer":
        def fn(x, w, a, b, dy, **_):
            return torch.autograd.grad(peft_lora_forward(x, w, a, b, SCALING, DROPOUT), (x, a, b), dy)
    else:
        def fn(x, w, a, b, dy, **_):
            y = lora_linear(x, w, a, b, SCALING, dropout_p=DROPOUT, backend=variant)
            return torch.autograd.grad(y, (x, a, b), dy)
    # design.md §8 states this row as PEFT's layer / ours (>= 1.3): the ratio is inverted
    baseline = variant == "PEFT unfused layer"
    run(benchmark, sets.fns(fn), role="baseline" if baseline else "candidate", inverted=not baseline, backend=variant)
