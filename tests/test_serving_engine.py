"""A simulated continuous-batching serving engine driving the serving ops over many steps: state carried from step to
step (slots loaded, evicted and reused at other ranks, one LoRABatch per padded token count refilled in place and
shared by two layers, ranks / scalings / buffer tensors updated in place), checked at every step against a float64
oracle built from the adapters' original weights, never from the slots."""

import random
from collections import OrderedDict

import pytest
import torch
from torch import nn

import lora_kernels as lk
from conftest import TOLERANCE, backend_or_skip, rel_error
from lora_kernels import LoRABatch

K, WIDTHS, N_MLP, SLOTS, MAX_RANK, BUCKETS = 16, (16, 8, 12), 24, 3, 8, (4, 8, 16)
ADAPTER_RANKS = (3, 8, 1, 5, 2)  # five adapters for three slots: evictions, and slots reused at another rank


@pytest.mark.parametrize("backend,dtype,steps", [("torch", torch.float32, 30), ("torch", torch.bfloat16, 30),
                                                 ("cpu", torch.float32, 30), ("cpu", torch.bfloat16, 30),
                                                 ("triton", torch.float32, 10), ("triton", torch.bfloat16, 10),
                                                 ("triton-prefill", torch.float32, 10),
                                                 ("triton-prefill", torch.bfloat16, 10)])
def test_simulated_engine_with_slot_reuse_eviction_and_refilled_padded_batches(backend, dtype, steps, monkeypatch):
    """Requests with an adapter or none (-1) arrive, prefill in chunks, decode and finish; adapters go into slots
    with LRU eviction (see evict); each step's tokens are padded with -1 to a
    bucket size whose LoRABatch is refilled in place and shared by a fused QKV add_lora (three unequal slices, a
    preallocated buffer) and an MLP MultiLoRALinear reading a strided view of its output. Slot padding past a rank
    and freed slots hold NaN. Every step: real tokens match the float64 oracle, padding rows of y are untouched by
    add_lora and get the base output from the MLP. The engine's batches (at most 16 tokens) take the Triton decode
    kernels; "triton-prefill" sends them to the prefill (SGMV) kernels instead."""
    prefill = backend == "triton-prefill"
    backend = "triton" if prefill else backend
    backend_or_skip(backend, "cpu")
    if prefill:
        from lora_kernels.triton import sgmv
        monkeypatch.setattr(sgmv, "DECODE_MAX_TOKENS", 0)
        monkeypatch.setattr(sgmv, "DECODE_MAX_TOKENS_PER_SLOT", 0)
    rng, nan = random.Random(12), float("nan")
    # the original weights (float32), kept by the engine: the oracle never reads the slots
    adapters = [dict(r=r, s=rng.choice([0.5, 2.0, 16 / 3]), qa=[torch.randn(r, K) * K ** -0.5 for _ in WIDTHS],
                     qb=[torch.randn(n, r) * r ** -0.5 for n in WIDTHS], ma=torch.randn(r, K) * K ** -0.5,
                     mb=torch.randn(N_MLP, r) * r ** -0.5) for r in ADAPTER_RANKS]
    w_qkv, b_qkv = (torch.randn(sum(WIDTHS), K) * K ** -0.5).to(dtype), torch.randn(sum(WIDTHS)).to(dtype)
    mlp = lk.MultiLoRALinear(nn.Linear(K, N_MLP).to(dtype), SLOTS, MAX_RANK, backend=backend)
    qkv_a = torch.full((len(WIDTHS), SLOTS, MAX_RANK, K), nan, dtype=dtype)  # stacked [S, L, R, K]
    qkv_b = [torch.full((SLOTS, n, MAX_RANK), nan, dtype=dtype) for n in WIDTHS]
    scalings, ranks = torch.zeros(SLOTS), torch.zeros(SLOTS, dtype=torch.int32)
    batches = {m: LoRABatch.from_adapter_ids(torch.full((m,), -1), SLOTS) for m in BUCKETS}
    pointers = {m: batch.adapter_ids.data_ptr() for m, batch in batches.items()}
    buffers = {m: torch.empty(len(WIDTHS), m, MAX_RANK) for m in BUCKETS}
    with torch.no_grad():
        mlp.lora_a.fill_(nan)
        mlp.lora_b.fill_(nan)
    slot_of, lru, last_rank, requests, seen, evicted = {}, OrderedDict(), {}, [], set(), []

    def poison(slot, rank):
        with torch.no_grad():
            qkv_a[:, slot, rank:] = nan
            for b in qkv_b:
                b[slot, :, rank:] = nan
            mlp.lora_a[slot, rank:] = nan
            mlp.lora_b[slot, :, rank:] = nan

    def evict(index):
        """Frees index's slot for the next load, in one of three ways in turn: clear_adapter; the ranks zeroed only,
        the weights left in place (vLLM's way); nothing, the next set_adapter writing over the old adapter."""
        slot = slot_of.pop(index)
        lru.pop(index)
        if len(evicted) % 3 == 0:
            mlp.clear_adapter(slot)
        elif len(evicted) % 3 == 1:
            mlp.ranks[slot] = 0
        if len(evicted) % 3 != 2:
            ranks[slot], scalings[slot] = 0, 0.0
            poison(slot, 0)
        evicted.append(index)

    def load(index, slot):
        ad = adapters[index]
        seen.add("reuse at another rank" if last_rank.get(slot, ad["r"]) != ad["r"] else "load")
        last_rank[slot] = ad["r"]
        with torch.no_grad():
            for j in range(len(WIDTHS)):
                qkv_a[j, slot, :ad["r"]] = ad["qa"][j].to(dtype)
                qkv_b[j][slot, :, :ad["r"]] = ad["qb"][j].to(dtype)
        scalings[slot], ranks[slot] = ad["s"], ad["r"]
        mlp.set_adapter(slot, ad["ma"], ad["mb"], ad["s"])
        poison(slot, ad["r"])  # set_adapter zero-pads: NaN there instead, which must never be read
        slot_of[index] = slot
        lru[index] = None

    def oracle(x, weight, bias, rows, terms):
        out = x.double() @ weight.double().T + bias.double()
        for row, index in enumerate(rows):
            if index >= 0:
                ad = adapters[index]
                out[row] += torch.cat([ad["s"] * b.double() @ (a.double() @ x[row].double()) for a, b in terms(ad)])
        return out

    for step in range(steps):
        requests += [dict(adapter=rng.randrange(-1, len(adapters)), prompt=rng.randint(1, 7), done=0,
                          decode=rng.randint(1, 4)) for _ in range(rng.choice([0, 1, 2]))]
        scheduled, tokens = [], 0
        for req in requests:
            n = min(req["prompt"] - req["done"], rng.randint(1, 5)) if req["done"] < req["prompt"] else 1
            if req["adapter"] >= 0 and req["adapter"] not in slot_of:
                if len(slot_of) == SLOTS:
                    busy = {r["adapter"] for r, _ in scheduled}
                    victims = [index for index in lru if index not in busy]
                    if not victims:
                        continue  # waits for a slot
                    evict(victims[0])
                load(req["adapter"], min(set(range(SLOTS)) - set(slot_of.values())))
            if tokens + n > BUCKETS[-1]:
                break
            scheduled.append((req, n))
            tokens += n
            if req["adapter"] >= 0:
                lru.move_to_end(req["adapter"])
        if not scheduled:
            continue
        rows = [req["adapter"] for req, n in scheduled for _ in range(n)]
        m = next(size for size in BUCKETS if size >= len(rows))
        seen.add(f"bucket {m}")
        seen.update(["padding"] * (m > len(rows)) + ["base tokens"] * (-1 in rows))
        batch = batches[m].refill_(torch.tensor([slot_of[i] if i >= 0 else -1 for i in rows] + [-1] * (m - len(rows))))
        assert batch.adapter_ids.data_ptr() == pointers[m]
        x = torch.randn(m, K).to(dtype)
        y = nn.functional.linear(x, w_qkv, b_qkv)
        base_y = y.clone()
        lk.ops.add_lora(y, x, qkv_a, qkv_b, batch, scalings, ranks, list(WIDTHS), backend=backend, buffer=buffers[m])
        h = y[:, 4:4 + K]  # the next layer reads a strided view, through the same batch
        z = mlp(h, batch)
        t = len(rows)
        expected = oracle(x[:t], w_qkv, b_qkv, rows, lambda ad: zip(ad["qa"], ad["qb"]))
        assert rel_error(y[:t], expected) <= TOLERANCE[dtype], f"step {step}: add_lora, rows {rows}"
        assert torch.equal(y[t:], base_y[t:]), f"step {step}: add_lora wrote into padding rows"
        weight, bias = mlp.base_layer.weight, mlp.base_layer.bias
        assert rel_error(z[:t], oracle(h[:t], weight, bias, rows, lambda ad: [(ad["ma"], ad["mb"])])) <= TOLERANCE[
            dtype], f"step {step}: MultiLoRALinear, rows {rows}"
        assert rel_error(z[t:], oracle(h[t:], weight, bias, [-1] * (m - t), None)) <= TOLERANCE[dtype], (
            f"step {step}: MultiLoRALinear padding rows")
        for req, n in scheduled:
            if req["done"] < req["prompt"]:
                req["done"] += n
            else:
                req["decode"] -= 1
            if req["done"] >= req["prompt"] and req["decode"] <= 0:
                requests.remove(req)
                seen.add("finish")
    # the schedule (fixed by the seed, within 10 steps) went through every transition this test is about
    expected_events = {"reuse at another rank", "padding", "base tokens", "finish", "bucket 4", "bucket 8"}
    assert expected_events <= seen, f"not exercised: {expected_events - seen}"
    assert len(evicted) >= 3, f"evictions: {evicted} (one of each kind expected)"
