"""Grouped multi-adapter ops (design.md §8 rows 6-8): prefill with many distinct adapters vs one adapter, the
grouped op vs PEFT's per-adapter loop, and decode with every token on its own adapter vs the base layer alone.
Every call takes the next of lora_kernels.bench.GroupedSets' rotating operand sets (W and the adapters together are
about an H100's L2, so one set would time reads from the cache)."""

import functools

import pytest
import torch
import torch.nn.functional as F

from conftest import BACKENDS, DEVICE, DTYPE, SHAPES, run
from lora_kernels import LoRABatch
from lora_kernels.bench import DECODE_TOKENS, LOOP_ADAPTERS, PREFILL_ADAPTERS, GroupedSets, segment_ids

K = N = SHAPES["hidden"]
R = SHAPES["rank"]
PREFILL = SHAPES["prefill_tokens"]


@functools.lru_cache(maxsize=2)
def operand_sets(tokens, slots):
    return GroupedSets(DEVICE, DTYPE, tokens, K, N, R, slots)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["one adapter", f"{PREFILL_ADAPTERS} distinct adapters"])
def test_prefill(benchmark, backend, layout):
    benchmark.group = f"grouped prefill {PREFILL} tokens, {backend}"
    ids = (torch.zeros(PREFILL, dtype=torch.int64, device=DEVICE) if layout == "one adapter"
           else segment_ids(PREFILL, PREFILL_ADAPTERS, DEVICE))
    batch = LoRABatch.from_adapter_ids(ids, PREFILL_ADAPTERS)
    with torch.no_grad():
        run(benchmark, operand_sets(PREFILL, PREFILL_ADAPTERS).grouped(batch, backend),
            role="baseline" if layout == "one adapter" else "candidate", backend=backend, layout=layout)


@pytest.mark.parametrize("count", [DECODE_TOKENS, PREFILL])
@pytest.mark.parametrize("variant", ["per-adapter loop"] + BACKENDS)
def test_grouped_vs_loop(benchmark, count, variant):
    benchmark.group = f"grouped vs per-adapter loop, {count} tokens, {LOOP_ADAPTERS} adapters"
    ids = segment_ids(count, LOOP_ADAPTERS, DEVICE)
    sets = operand_sets(count, LOOP_ADAPTERS)
    if variant == "per-adapter loop":
        fns = sets.loop(ids)
    else:
        fns = sets.grouped(LoRABatch.from_adapter_ids(ids, LOOP_ADAPTERS), variant)
    with torch.no_grad():
        run(benchmark, fns, role="baseline" if variant == "per-adapter loop" else "candidate", backend=variant)


@pytest.mark.parametrize("variant", ["base F.linear"] + BACKENDS)
def test_decode(benchmark, variant):
    """The ratio against the base layer; the bandwidth row of design.md §8 (all bytes moved / copy bandwidth) is
    `lora-kernels bench --sections decode`, which measures the copy bandwidth in the same run."""
    benchmark.group = f"decode {DECODE_TOKENS} tokens on {LOOP_ADAPTERS} distinct adapters"
    sets = operand_sets(DECODE_TOKENS, LOOP_ADAPTERS)
    element = torch.finfo(DTYPE).bits // 8
    if variant == "base F.linear":
        fns = [lambda s=s: F.linear(s["x"], s["w"]) for s in sets.sets]
        moved = (N * K + DECODE_TOKENS * (K + N)) * element
    else:
        batch = LoRABatch.from_adapter_ids(torch.arange(DECODE_TOKENS, device=DEVICE) % LOOP_ADAPTERS, LOOP_ADAPTERS)
        fns = sets.grouped(batch, variant)
        moved = (N * K + LOOP_ADAPTERS * R * (K + N) + DECODE_TOKENS * (K + N)) * element
    with torch.no_grad():
        run(benchmark, fns, role="baseline" if variant == "base F.linear" else "candidate", backend=variant,
            bytes_moved=moved)
