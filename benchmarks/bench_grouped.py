"""Grouped multi-adapter ops (design.md §8 rows 6-8): prefill with many distinct adapters vs one adapter, the
grouped op vs PEFT's per-adapter loop, and decode with every token on its own adapter vs the base layer alone."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import BACKENDS, DEVICE, DTYPE, SHAPES, run
from lora_kernels import LoRABatch, multi_lora_linear
from lora_kernels.bench import (DECODE_TOKENS, LOOP_ADAPTERS, PREFILL_ADAPTERS, per_adapter_loop, segment_ids,
                                stacked_adapters)

K = N = SHAPES["hidden"]
R = SHAPES["rank"]
PREFILL = SHAPES["prefill_tokens"]


@functools.lru_cache(maxsize=None)
def weight():
    return torch.randn(N, K, device=DEVICE, dtype=DTYPE) / math.sqrt(K)


@functools.lru_cache(maxsize=None)
def adapters(slots):
    return stacked_adapters(DEVICE, DTYPE, slots, K, N, R)


@functools.lru_cache(maxsize=None)
def tokens(count):
    return torch.randn(count, K, device=DEVICE, dtype=DTYPE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["one adapter", f"{PREFILL_ADAPTERS} distinct adapters"])
def test_prefill(benchmark, backend, layout):
    benchmark.group = f"grouped prefill {PREFILL} tokens, {backend}"
    lora_a, lora_b, scalings = adapters(PREFILL_ADAPTERS)
    ids = (torch.zeros(PREFILL, dtype=torch.int64, device=DEVICE) if layout == "one adapter"
           else segment_ids(PREFILL, PREFILL_ADAPTERS, DEVICE))
    batch = LoRABatch.from_adapter_ids(ids, PREFILL_ADAPTERS)
    x = tokens(PREFILL)
    with torch.no_grad():
        run(benchmark, [lambda: multi_lora_linear(x, weight(), lora_a, lora_b, batch, scalings, backend=backend)],
            role="baseline" if layout == "one adapter" else "candidate", backend=backend, layout=layout)


@pytest.mark.parametrize("count", [DECODE_TOKENS, PREFILL])
@pytest.mark.parametrize("variant", ["per-adapter loop"] + BACKENDS)
def test_grouped_vs_loop(benchmark, count, variant):
    benchmark.group = f"grouped vs per-adapter loop, {count} tokens, {LOOP_ADAPTERS} adapters"
    lora_a, lora_b, scalings = adapters(LOOP_ADAPTERS)
    ids = segment_ids(count, LOOP_ADAPTERS, DEVICE)
    x = tokens(count)
    if variant == "per-adapter loop":
        indices = [torch.nonzero(ids == i).squeeze(1) for i in range(LOOP_ADAPTERS)]
        lora_as, lora_bs, scaling_list = list(lora_a.unbind(0)), list(lora_b.unbind(0)), scalings.tolist()
        fn = lambda: per_adapter_loop(x, weight(), lora_as, lora_bs, scaling_list, indices)  # noqa: E731
    else:
        batch = LoRABatch.from_adapter_ids(ids, LOOP_ADAPTERS)
        fn = lambda: multi_lora_linear(x, weight(), lora_a, lora_b, batch, scalings, backend=variant)  # noqa: E731
    with torch.no_grad():
        run(benchmark, [fn], role="baseline" if variant == "per-adapter loop" else "candidate", backend=variant)


@pytest.mark.parametrize("variant", ["base F.linear"] + BACKENDS)
def test_decode(benchmark, variant):
    benchmark.group = f"decode {DECODE_TOKENS} tokens on {LOOP_ADAPTERS} distinct adapters"
    lora_a, lora_b, scalings = adapters(LOOP_ADAPTERS)
    x = tokens(DECODE_TOKENS)
    element = torch.finfo(DTYPE).bits // 8
    if variant == "base F.linear":
        fn = lambda: F.linear(x, weight())  # noqa: E731
        moved = (N * K + DECODE_TOKENS * (K + N)) * element
    else:
        batch = LoRABatch.from_adapter_ids(torch.arange(DECODE_TOKENS, device=DEVICE) % LOOP_ADAPTERS, LOOP_ADAPTERS)
        fn = lambda: multi_lora_linear(x, weight(), lora_a, lora_b, batch, scalings, backend=variant)  # noqa: E731
        moved = (N * K + LOOP_ADAPTERS * R * (K + N) + DECODE_TOKENS * (K + N)) * element
    with torch.no_grad():
        run(benchmark, [fn], role="baseline" if variant == "base F.linear" else "candidate", backend=variant,
            bytes_moved=moved)
