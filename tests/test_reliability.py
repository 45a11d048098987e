"""Reliability: NaN/Inf confinement, fp16 overflow, bounded memory, offsets past 2**31, threads. The hypothesis
property tests and fuzzers are in test_properties.py."""

import gc
import json
import logging
import os
import threading

import pytest
import torch
from safetensors.torch import load_file

import lora_kernels as lk
from conftest import TOLERANCE, backend_or_skip, quantized_linear, rel_error
from lora_kernels import backends, modules, peft_io, reference
from lora_kernels.batch import LoRABatch

CPU_BACKENDS = [b for b in ("torch", "cpu", "triton") if backends.unavailable_reason(b, "cpu") is None]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_in_x_stays_in_its_rows(backend):
    x, weight = torch.randn(6, 16), torch.randn(8, 16)
    lora_a, lora_b = torch.randn(4, 16), torch.randn(8, 4)
    x[2, 5] = float("nan")
    x[4, 0] = float("inf")
    y = lk.lora_linear(x, weight, lora_a, lora_b, 1.0, backend=backend)
    bad_rows = {2, 4}
    for row in range(6):
        assert torch.isfinite(y[row]).all() != (row in bad_rows), row
    # Grouped: a NaN token poisons its own output row only, whichever slot its neighbours use.
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, 0, -1, 1, 0]), 2)
    shrunk = lk.ops.lora_shrink(x, torch.randn(2, 4, 16), batch, [1.0, 1.0], backend=backend)
    out = torch.zeros(6, 8)
    lk.ops.lora_expand(shrunk, torch.randn(2, 8, 4), batch, out, backend=backend)
    for row in range(6):
        row_has_lora = row != 3
        assert torch.isfinite(out[row]).all() != (row in bad_rows and row_has_lora), row


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_broken_adapter_poisons_only_its_own_tokens(backend):
    """NaN inside one slot's rank (not padding: real weights) reaches that slot's tokens only, in the forward and
    in every gradient: one bad adapter in a serving batch or a multi-adapter training step spares the others."""
    x = torch.randn(6, 16, requires_grad=True)
    weight = torch.randn(8, 16)
    lora_a, lora_b = torch.randn(3, 4, 16), torch.randn(3, 8, 4)
    lora_a[1, 0, 3] = float("nan")
    lora_b[1, 2, 1] = float("nan")
    lora_a.requires_grad_(True)
    lora_b.requires_grad_(True)
    ids = torch.tensor([0, 1, 2, -1, 1, 0])
    y = lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, [1.0, 0.5, 2.0], backend=backend)
    poisoned = {1, 4}
    for row in range(6):
        assert torch.isfinite(y[row]).all() != (row in poisoned), row
    y.sum().backward()
    for row in range(6):
        assert torch.isfinite(x.grad[row]).all() != (row in poisoned), row
    for slot in (0, 2):
        assert torch.isfinite(lora_a.grad[slot]).all() and torch.isfinite(lora_b.grad[slot]).all(), slot
    assert not torch.isfinite(lora_a.grad[1]).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # the Triton interpreter
@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
def test_a_zero_scaling_still_propagates_the_adapters_nan_in_the_grouped_ops(backend):
    """README: scaling = 0 still propagates NaN/Inf of the adapter weights (0·NaN, as PEFT and the reference), on
    every backend: in the grouped ops, the tokens of a slot with scaling 0 and NaN in lora_b (or Inf in lora_a)
    inside its rank come out NaN; base-only tokens stay finite."""
    x, weight = torch.randn(4, 8), torch.randn(6, 8)
    lora_a, lora_b = torch.randn(2, 4, 8), torch.randn(2, 6, 4)
    lora_b[0, 2, 1] = float("nan")
    lora_a[1, 0, 3] = float("inf")
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, -1, 0]), 2)
    shrunk = lk.ops.lora_shrink(x, lora_a, batch, [0.0, 0.0], backend=backend)
    out = lk.ops.lora_expand(shrunk, lora_b, batch, torch.zeros(4, 6), backend=backend)
    y = lk.multi_lora_linear(x, weight, lora_a, lora_b, batch, [0.0, 0.0], backend=backend)
    for result in (out, y):
        assert torch.isnan(result).any(dim=1).tolist() == [True, True, False, True]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp16_overflow_becomes_inf_in_the_overflowing_rows_only(backend):
    """Documented behaviour: accumulation is fp32, the store rounds to fp16, so a result beyond ±65504 becomes ±inf
    (as F.linear in fp16 does) and never NaN; other rows are unaffected."""
    x = torch.ones(3, 32, dtype=torch.float16)
    x[1] *= 300.0
    weight = torch.full((4, 32), 10.0, dtype=torch.float16)  # row 1: 300·10·32 = 96000 > 65504
    lora_a, lora_b = torch.full((2, 32), 0.01, dtype=torch.float16), torch.full((4, 2), 0.01, dtype=torch.float16)
    y = lk.lora_linear(x, weight, lora_a, lora_b, 1.0, backend=backend)
    assert torch.isinf(y[1]).all() and (y[1] > 0).all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()
    assert not torch.isnan(y).any()


def _rss_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_repeated_training_steps_do_not_grow_memory(backend):
    layer = lk.LoRALinear(256, 256, r=8, init_lora_weights=False, backend=backend)
    x = torch.randn(64, 256)

    def steps(count):
        for _ in range(count):
            layer(x).square().mean().backward()
            layer.zero_grad(set_to_none=True)

    steps(20)  # warm-up: allocator pools, lazy initialisation
    gc.collect()
    before = _rss_kib()
    steps(200)
    gc.collect()
    grown_kib = _rss_kib() - before
    # One step's tensors are ~0.5 MiB; a leak of even one activation per step would add > 12 MiB over 200 steps.
    assert grown_kib < 8 * 1024, f"RSS grew by {grown_kib} KiB over 200 steps"


def test_set_adapter_from_another_thread_never_mixes_weights_within_a_forward():
    """One thread swaps slot 0 between two adapters of different ranks while the main thread runs forwards: every
    output row equals the output of one adapter or the other, never a mix of old and new weights."""
    torch.manual_seed(3)
    base = torch.nn.Linear(32, 24)
    layer = lk.MultiLoRALinear(base, max_adapters=2, max_rank=8, backend="torch")
    adapters = [(torch.randn(8, 32), torch.randn(24, 8), 1.0), (torch.randn(3, 32), torch.randn(24, 3), -2.0)]
    x = torch.randn(16, 32)
    ids = torch.zeros(16, dtype=torch.int64)
    with torch.no_grad():
        expected = [base(x) + s * (x @ a.T) @ b.T for a, b, s in adapters]
    layer.set_adapter(0, *adapters[0])
    stop = threading.Event()

    def swap():
        i = 0
        while not stop.is_set():
            i ^= 1
            layer.set_adapter(0, *adapters[i])

    writer = threading.Thread(target=swap)
    writer.start()
    try:
        seen = set()
        with torch.no_grad():
            for _ in range(150):
                y = layer(x, ids)
                match = [torch.allclose(y, e, rtol=1e-4, atol=1e-4) for e in expected]
                assert any(match), "a forward mixed the weights of two adapters"
                seen.add(match.index(True))
    finally:
        stop.set()
        writer.join()
    assert seen, "no forward ran"


def test_two_threads_loading_new_adapters_by_name_get_a_slot_each(tmp_path, monkeypatch):
    """Two threads loading different new adapters into one prepared model at once: each name gets its own slot
    holding its own weights. Both loads chose the first free slot before either recorded its name, so both names got
    slot 0, holding the weights of whichever wrote last. Forced here: load "a" stops inside its first slot write
    until load "b" has finished, or is about to take the table lock that "a" holds (the hook announces it); once out
    of the lock, "a" waits for "b" to finish (so "a" must have recorded its name inside)."""
    import contextlib

    torch.manual_seed(6)
    sources = {}
    for name in ("a", "b"):
        sources[name] = lk.inject_lora(torch.nn.Sequential(torch.nn.Linear(16, 12)), ["0"], r=4)
        torch.nn.init.normal_(sources[name][0].lora_B.weight)
        lk.save_peft_adapter(sources[name], tmp_path / name)
    model = lk.prepare_multi_adapter(torch.nn.Sequential(torch.nn.Linear(16, 12)), ["0"], max_adapters=3, max_rank=4,
                                     backend="torch")
    a_inside, b_waits_or_done, b_done = threading.Event(), threading.Event(), threading.Event()
    set_adapter = modules.MultiLoRALinear.set_adapter
    table_lock = getattr(peft_io, "adapter_table_lock", None)

    def set_adapter_stopping_load_a(self, *args, **kwargs):
        if threading.current_thread().name == "a" and not a_inside.is_set():
            a_inside.set()
            b_waits_or_done.wait()
        return set_adapter(self, *args, **kwargs)

    @contextlib.contextmanager
    def announced_table_lock():
        if threading.current_thread().name == "b":
            b_waits_or_done.set()
        with table_lock():
            yield
        if threading.current_thread().name == "a":
            b_done.wait()

    monkeypatch.setattr(modules.MultiLoRALinear, "set_adapter", set_adapter_stopping_load_a)
    monkeypatch.setattr(peft_io, "adapter_table_lock", announced_table_lock, raising=False)

    def load(name):
        try:
            lk.load_peft_adapter(model, tmp_path / name, adapter_name=name)
        finally:  # whatever happened, neither load waits for the other any longer
            a_inside.set()
            b_waits_or_done.set()
            b_done.set()

    first = threading.Thread(target=load, args=("a",), name="a")
    first.start()
    a_inside.wait()
    second = threading.Thread(target=load, args=("b",), name="b")
    second.start()
    first.join()
    second.join()
    slots = model.lora_adapter_slots
    assert sorted(slots) == ["a", "b"] and slots["a"] != slots["b"], slots
    for name, source in sources.items():
        assert torch.equal(model[0].lora_b[slots[name], :, :4], source[0].lora_B.weight), name


def test_two_threads_deleting_one_adapter_at_once_one_is_told_it_is_gone(tmp_path, monkeypatch):
    """delete_adapter takes turns with other deletes (and loads by name): of two threads deleting one adapter at once,
    one deletes it and the other gets the ValueError for a name that is not loaded. Both found the name when they
    did not take turns, and the second to finish failed on a bare KeyError. Forced here: the first delete stops in
    its first clear_adapter until the second has finished, or is about to take the table lock (the hook announces
    it)."""
    lk.save_peft_adapter(lk.inject_lora(torch.nn.Sequential(torch.nn.Linear(16, 12)), ["0"], r=4), tmp_path)
    model = lk.prepare_multi_adapter(torch.nn.Sequential(torch.nn.Linear(16, 12)), ["0"], max_adapters=2, max_rank=4,
                                     backend="torch")
    lk.load_peft_adapter(model, tmp_path, adapter_name="a")
    first_inside, second_waits_or_done = threading.Event(), threading.Event()
    clear_adapter, table_lock = modules.MultiLoRALinear.clear_adapter, modules.adapter_table_lock

    def clear_adapter_stopping_the_first(self, slot):
        if threading.current_thread().name == "first" and not first_inside.is_set():
            first_inside.set()
            second_waits_or_done.wait()
        return clear_adapter(self, slot)

    def announced_table_lock():
        if threading.current_thread().name == "second":
            second_waits_or_done.set()
        return table_lock()

    monkeypatch.setattr(modules.MultiLoRALinear, "clear_adapter", clear_adapter_stopping_the_first)
    monkeypatch.setattr(modules, "adapter_table_lock", announced_table_lock)
    outcomes = {}

    def delete():
        try:
            lk.delete_adapter(model, "a")
            outcomes[threading.current_thread().name] = "deleted"
        except Exception as error:  # noqa: BLE001 (the outcome is checked below)
            outcomes[threading.current_thread().name] = error
        finally:  # whatever happened, neither delete waits for the other any longer
            first_inside.set()
            second_waits_or_done.set()

    first = threading.Thread(target=delete, name="first")
    first.start()
    first_inside.wait()
    second = threading.Thread(target=delete, name="second")
    second.start()
    first.join()
    second.join()
    assert outcomes["first"] == "deleted", outcomes
    assert isinstance(outcomes["second"], ValueError), outcomes
    assert "delete_adapter: unknown adapter name 'a'" in str(outcomes["second"]), outcomes
    assert model.lora_adapter_slots == {} and int(model[0].ranks[0]) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("held_in", ["forward", "load"])
def test_a_process_forked_while_another_thread_holds_a_lock_can_use_the_model(held_in, tmp_path, monkeypatch):
    """A process forked while another thread is inside a MultiLoRALinear forward (which holds the slot lock
    throughout) or a load by name (the adapter table lock), as a DataLoader worker or a fork-started pool can be,
    runs the layer and deletes an adapter itself: its copy of the lock was held by a thread that does not exist
    there, and its forward waited forever."""
    import multiprocessing
    import threading
    import warnings


    torch.manual_seed(4)
    source = lk.inject_lora(torch.nn.Sequential(torch.nn.Linear(16, 12)), ["0"], r=4)
    torch.nn.init.normal_(source[0].lora_B.weight)
    lk.save_peft_adapter(source, tmp_path)
    model = lk.prepare_multi_adapter(torch.nn.Sequential(torch.nn.Linear(16, 12)), ["0"], max_adapters=2, max_rank=4,
                                     backend="torch")
    lk.load_peft_adapter(model, tmp_path, adapter_name="a")
    x, ids = torch.randn(5, 16), torch.tensor([0, -1, 0, 1, 0])
    with torch.no_grad():
        expected = model[0](x, ids)
    inside, leave = threading.Event(), threading.Event()

    def stop_in(function):
        def stopped(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                inside.set()
                leave.wait()
            return function(*args, **kwargs)
        return stopped

    if held_in == "forward":
        monkeypatch.setattr(modules, "multi_lora_linear_float32_factors",
                            stop_in(modules.multi_lora_linear_float32_factors))
        holder = threading.Thread(target=lambda: model[0](x, ids))
    else:
        monkeypatch.setattr(modules.MultiLoRALinear, "set_adapter", stop_in(modules.MultiLoRALinear.set_adapter))
        holder = threading.Thread(target=lambda: lk.load_peft_adapter(model, tmp_path, adapter_name="b"))
    holder.start()
    inside.wait()
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    try:
        with warnings.catch_warnings():  # Python 3.12+: "This process is multi-threaded, use of fork() may lead to
            warnings.simplefilter("ignore", DeprecationWarning)  # deadlocks in the child", the case tested here
            child = context.Process(target=_forward_and_delete, args=(model, x, ids, results))
            child.start()
        child.join(60)  # a guard against the hang, not a timing: the child's work takes milliseconds
        hung = child.is_alive()
        if hung:
            child.kill()
        assert not hung, "the forked process waited for a lock its parent's thread held"
        output, slots = results.get(timeout=60)
        assert torch.equal(torch.tensor(output), expected) and slots == {}
    finally:
        leave.set()
        holder.join()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_process_forked_during_a_triton_launch_can_launch():
    """The Triton launch lock (one_launch_at_a_time), held by another thread while it launches (under the
    interpreter: for the kernel's whole run), was inherited held by a forked process (a DataLoader worker), whose
    first launch waited forever; the slot and adapter table locks were already new in the child."""
    import multiprocessing
    import warnings

    from lora_kernels import triton as triton_pkg
    backend_or_skip("triton", "cpu")
    torch.manual_seed(4)
    layer = lk.MultiLoRALinear(torch.nn.Linear(16, 12), max_adapters=2, max_rank=4, backend="triton")
    layer.set_adapter(0, torch.randn(4, 16), torch.randn(12, 4), 0.5)
    x, ids = torch.randn(5, 16), torch.tensor([0, -1, 0, 1, 0])
    with torch.no_grad():
        expected = layer(x, ids)
    inside, leave = threading.Event(), threading.Event()

    def launching():  # a launch in progress in another thread, as the lock sees it
        with triton_pkg._LAUNCH_LOCK:
            inside.set()
            leave.wait()

    holder = threading.Thread(target=launching)
    holder.start()
    inside.wait()
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    try:
        with warnings.catch_warnings():  # Python 3.12+: fork() of a multi-threaded process (the case tested here)
            warnings.simplefilter("ignore", DeprecationWarning)
            child = context.Process(target=_forward, args=(layer, x, ids, results))
            child.start()
        child.join(60)  # a guard against the hang, not a timing: the child's work takes well under a second
        hung = child.is_alive()
        if hung:
            child.kill()
        assert not hung, "the forked process waited for the launch lock its parent's thread held"
        torch.testing.assert_close(torch.tensor(results.get(timeout=60)), expected, rtol=0, atol=0)
    finally:
        leave.set()
        holder.join()


def _forward(layer, x, ids, results):
    with torch.no_grad():
        results.put(layer(x, ids).tolist())


def _forward_and_delete(model, x, ids, results):
    with torch.no_grad():
        output = model[0](x, ids).tolist()  # plain floats: a tensor would be sent as a handle to the child's memory
    results.put((output, lk.delete_adapter(model, "a").lora_adapter_slots))


# Tests that take tens of GB of GPU memory (up to ~70 GB for the first, 4.5-17 GB per case of the second): gpu_check.sh
# runs them in a stage of their own, one at a time, not among its 12 parallel workers on one GPU (80 GB on an H100),
# where several at once would run out of memory. A marker, not an xdist group: pytest-xdist 3.8's loadgroup does
# not group under pytest 9 (checked here: 8.4 groups, 9.2 does not).
GPU_MEMORY_GROUP = pytest.mark.gpu_memory


@pytest.mark.gpu
@GPU_MEMORY_GROUP
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_offsets_past_2_to_the_31_elements(backend):
    """x with M·K > 2³¹ elements: the rows at the end are computed right (64-bit offsets), single and grouped ops;
    in the backward, dX (M·K elements written) at its last rows and dA, dB (sums over every row of x) too."""
    if backends.unavailable_reason(backend, "cuda") is not None:
        pytest.skip(backends.unavailable_reason(backend, "cuda"))
    k, n, r = 4096, 64, 16
    m = 2**31 // k + 3
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    lora_a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lora_b = torch.randn(n, r, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = lk.lora_linear(x, weight, lora_a, lora_b, 0.5, backend=backend)
    tail = slice(m - 5, m)
    expected = reference.lora_linear(x[tail].detach(), weight, lora_a.detach(), lora_b.detach(), 0.5)
    assert rel_error(y[tail], expected) <= TOLERANCE[torch.bfloat16]
    dy = torch.randn_like(y)
    y.backward(dy)
    tail_grads = reference.lora_linear_backward(dy[tail], x[tail].detach(), weight, lora_a.detach(),
                                                lora_b.detach(), 0.5)
    assert rel_error(x.grad[tail], tail_grads["x"]) <= TOLERANCE[torch.bfloat16]
    with torch.no_grad():  # every row: fp32 on the GPU (a float64 copy of x would take 17 GB)
        x32 = x.float()
        ds = 0.5 * (dy.float() @ lora_b.float())
        assert rel_error(lora_a.grad, ds.T @ x32) <= TOLERANCE[torch.bfloat16]
        assert rel_error(lora_b.grad, 0.5 * dy.float().T @ (x32 @ lora_a.float().T)) <= TOLERANCE[torch.bfloat16]
        del x32
    x, lora_a = x.detach(), lora_a.detach()  # the serving ops are forward only
    ids = torch.zeros(m, dtype=torch.int32, device="cuda")
    batch = LoRABatch.from_adapter_ids(ids, 1)
    shrunk = lk.ops.lora_shrink(x, lora_a[None], batch, [0.5], backend=backend)
    assert rel_error(shrunk[tail], 0.5 * (x[tail].double() @ lora_a.double().T)) <= TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@GPU_MEMORY_GROUP
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_grouped_expand_past_2_to_the_31_elements(backend):
    """The grouped expand of a LoRA on an lm_head (a 152064-word vocabulary) over a long prefill: out [M, N] with
    M·N > 2³¹ elements, and lora_b [64, N, 256], whose last slots start past 2³¹ elements. The last rows, which the
    last slots write past 2³¹, are right (64-bit offsets): about 9.3 GB of GPU memory."""
    if backends.unavailable_reason(backend, "cuda") is not None:
        pytest.skip(backends.unavailable_reason(backend, "cuda"))
    num_slots, n, r = 64, 152064, 256
    m = 2**31 // n + 3
    assert (num_slots - 1) * n * r > 2**31 and (m - 1) * n > 2**31
    lora_b = torch.randn(num_slots, n, r, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(m, r, device="cuda") * r ** -0.5
    ids = (torch.arange(m, device="cuda") - m) % num_slots  # the last token on the last slot
    batch = LoRABatch.from_adapter_ids(ids, num_slots)
    out = torch.zeros(m, n, device="cuda", dtype=torch.bfloat16)
    lk.ops.lora_expand(t, lora_b, batch, out, backend=backend)
    tail = range(m - 5, m)  # rows on both sides of element 2³¹ of out, on slots 59-63
    expected = torch.stack([lora_b[ids[row]].float() @ t[row] for row in tail])
    assert rel_error(out[m - 5:], expected) <= TOLERANCE[torch.bfloat16]


# One operand a view whose element span passes 2**31 through a stride below 2**31, as a transposed x of 2**26 tokens,
# a Conv1D's transposed W or a W with 2**26 input features has (operand, (M, K, N, r), strides). STRIDE: 32 times it
# passes 2**31, so with int32 offsets every GPU block of 32 or more wrapped at its pointer step, and blocks of 64 or
# more already at lane 32; the strided dimension (129) is longer than any block, so every step is taken.
# RANK_STRIDE: 15 times it passes 2**31 (a rank index of rank 16). The CPU tests (interpreter block sizes) are in
# test_triton_lora_linear.py; 4.5 to 17 GB of GPU memory per case.
STRIDE, RANK_STRIDE = 2**26 + 64, 150_000_000
GPU_SPAN_CASES = {
    "x_transposed": ("x", (5, 129, 64, 16), (1, STRIDE)),
    "weight_transposed": ("weight", (5, 129, 64, 16), (1, STRIDE)),
    "weight_rows": ("weight", (5, 64, 129, 16), (STRIDE, 1)),
    "lora_a_transposed": ("lora_a", (5, 129, 64, 16), (1, STRIDE)),
    "lora_a_rows": ("lora_a", (5, 64, 64, 16), (RANK_STRIDE, 1)),
    "lora_b_transposed": ("lora_b", (5, 64, 64, 16), (1, RANK_STRIDE)),
    "lora_b_rows": ("lora_b", (5, 64, 129, 16), (STRIDE, 1)),
    "x_rows": ("x", (129, 64, 64, 16), (STRIDE, 1)),
}


@pytest.mark.gpu
@GPU_MEMORY_GROUP
@pytest.mark.parametrize("case", list(GPU_SPAN_CASES))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_strided_operands_past_2_to_the_31_elements(backend, case, monkeypatch):
    """lora_linear forward and backward with one operand spanning past 2**31 elements through a stride below 2**31:
    y, dx, dA and dB match the reference on contiguous copies (the Triton launchers take the kernels' INT64 variant
    there; the .cu kernels index in int64 throughout). One split, so the split kernels take their pointer steps."""
    if backends.unavailable_reason(backend, "cuda") is not None:
        pytest.skip(backends.unavailable_reason(backend, "cuda"))
    if backend == "triton":
        from lora_kernels.triton import lora_linear as tk
        monkeypatch.setattr(tk, "SPLIT_OVERRIDE", 1)
    name, (m, k, n, r), strides = GPU_SPAN_CASES[case]
    dtype = torch.bfloat16
    operands = dict(x=torch.randn(m, k), weight=torch.randn(n, k) * k ** -0.5, lora_a=torch.randn(r, k) * k ** -0.5,
                    lora_b=torch.randn(n, r) * r ** -0.5)
    operands = {key: value.to("cuda", dtype) for key, value in operands.items()}
    plain = dict(operands)
    span = 1 + sum((size - 1) * stride for size, stride in zip(plain[name].shape, strides))
    operands[name] = torch.empty(span, device="cuda", dtype=dtype).as_strided(plain[name].shape, strides)
    operands[name].copy_(plain[name])
    leaves = {key: value.requires_grad_(key != "weight") for key, value in operands.items()}
    y = lk.lora_linear(leaves["x"], leaves["weight"], leaves["lora_a"], leaves["lora_b"], 0.5, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    args = [plain[key].detach() for key in ("x", "weight", "lora_a", "lora_b")]
    assert rel_error(y, reference.lora_linear(*args, 0.5)) <= TOLERANCE[dtype]
    expected = reference.lora_linear_backward(dy, *args, 0.5)
    for key in ("x", "lora_a", "lora_b"):
        assert rel_error(leaves[key].grad, expected[key]) <= 2 * TOLERANCE[dtype], key


@pytest.mark.skipif(backends.unavailable_reason("triton", "cpu") is not None, reason="Triton backend not available")
def test_triton_launches_from_several_threads():
    """Several threads launching the Triton kernels at once (first use of an autotune key included), single-adapter
    and grouped, all get the right result: launches take turns on a lock, so the autotuner's state is never raced
    (nor the interpreter's, whose grouped kernels failed here with "x >= grid_dim[0]" before they took the lock)."""
    from concurrent.futures import ThreadPoolExecutor

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        m = 3 + seed  # distinct M: every thread brings a new autotune key
        x, weight = torch.randn(m, 24, generator=g), torch.randn(16, 24, generator=g)
        lora_a, lora_b = torch.randn(4, 24, generator=g), torch.randn(16, 4, generator=g)
        y = lk.lora_linear(x, weight, lora_a, lora_b, 0.5, backend="triton")
        stacked_a, stacked_b = torch.randn(3, 4, 24, generator=g), torch.randn(3, 16, 4, generator=g)
        ids, scalings = torch.arange(m) % 4 - 1, torch.rand(3, generator=g)
        grouped = lk.multi_lora_linear(x, weight, stacked_a, stacked_b, ids, scalings, backend="triton")
        return max(rel_error(y, reference.lora_linear(x, weight, lora_a, lora_b, 0.5)),
                   rel_error(grouped, reference.multi_lora_linear(x, weight, stacked_a, stacked_b, ids, scalings)))

    with ThreadPoolExecutor(max_workers=4) as pool:
        errors = list(pool.map(run, range(8)))
    assert max(errors) <= TOLERANCE[torch.float32], errors


@pytest.mark.skipif(backends.unavailable_reason("triton", "cpu") is not None, reason="Triton backend not available")
@pytest.mark.cuda_branch
def test_every_triton_launch_holds_the_launch_lock(monkeypatch):
    """Every Triton kernel runs holding the launch lock, on the eager paths and through the custom ops a compiled
    graph calls (called here directly, as its compiled code does), the grouped kernels included. The ops' path ran
    unlocked, and the grouped launches and dropout_mask had no lock: several threads then raced the autotuner's
    per-launch state (triton-lang/triton#11494) on a GPU, and the interpreter's process-wide state on CPU (4
    threads: "x >= grid_dim[0]", "Did you forget to add @triton.jit ?")."""
    import triton

    import lora_kernels.triton as lk_triton
    from lora_kernels.triton import lora_linear as triton_lora_linear

    kernel_class = (triton.runtime.interpreter.InterpretedFunction if lk_triton.INTERPRET
                    else triton.runtime.jit.JITFunction)
    launches, path = [], ["eager"]
    run = kernel_class.run

    def recording_run(self, *args, **kwargs):
        launches.append((path[0], self.fn.__name__, lk_triton._LAUNCH_LOCK.locked()))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(kernel_class, "run", recording_run)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(5)
    x, weight, dy = (torch.randn(*shape, generator=g).to(device) for shape in ((6, 24), (16, 24), (6, 16)))
    lora_a, lora_b = torch.randn(4, 24, generator=g).to(device), torch.randn(16, 4, generator=g).to(device)
    stacked_a, stacked_b = torch.randn(3, 4, 24, generator=g).to(device), torch.randn(3, 16, 4, generator=g).to(device)
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 2, -1, 0, 1, 2], device=device), 3)
    scalings, ranks = torch.ones(3, device=device), torch.tensor([4, 2, 3], dtype=torch.int32, device=device)
    seed = torch.tensor(7)

    # eager: the single-adapter kernels with dropout (and its mask), the grouped ones through multi_lora_linear
    leaves = [t.clone().requires_grad_() for t in (x, lora_a, lora_b, stacked_a, stacked_b)]
    lk.lora_linear(leaves[0], weight, leaves[1], leaves[2], 0.5, dropout_p=0.2, backend="triton").backward(dy)
    triton_lora_linear.dropout_mask(seed, 6, 24, 0.2, device)
    lk.multi_lora_linear(leaves[0], weight, leaves[3], leaves[4], batch, scalings, ranks=ranks,
                         backend="triton").backward(dy)
    path[0] = "custom op"  # as compiled code runs them
    ops, grouped = torch.ops.lora_kernels, torch.ops.lora_kernels_triton
    _, s = ops.triton_lora_fwd(x, weight, lora_a, lora_b, 0.5, None, 0.2, seed)
    _, ds = ops.triton_lora_bwd_dy(dy, s, lora_b, 0.5)
    ops.triton_lora_bwd_dx(dy, ds, weight, lora_a, 0.2, seed)
    ops.triton_lora_bwd_da(ds, x, 0.2, seed)
    ops.triton_dropout_mask(seed, 6, 24, 0.2, torch.device(device))
    metadata = (batch.adapter_ids, batch.sorted_token_ids, batch.slot_counts, batch.slot_starts)
    shrunk = torch.empty(6, 4, device=device)
    grouped.sgmv_shrink(x, [stacked_a], *metadata, scalings, ranks, shrunk, False, "auto")
    grouped.sgmv_expand(shrunk, [stacked_b], *metadata, ranks, torch.zeros(6, 16, device=device), [0], "auto")
    grouped.segment_outer(shrunk, x, *metadata[1:], torch.empty(3, 4, 24, device=device))

    for each_path in ("eager", "custom op"):  # every kernel ran on both paths
        names = {name for launch_path, name, _ in launches if launch_path == each_path}
        assert {"_lora_shrink_kernel", "_lora_fwd_kernel", "_lora_bwd_dy_kernel", "_lora_bwd_dx_kernel",
                "_lora_bwd_da_kernel", "_dropout_mask_kernel", "_segment_outer_kernel"} <= names, (each_path, names)
        assert {"shrink", "expand"} <= {name.split("_")[2] for name in names if "gmv_" in name}, (each_path, names)
    unlocked = sorted({(launch_path, name) for launch_path, name, locked in launches if not locked})
    assert not unlocked, f"launched without the launch lock: {unlocked}"


def test_auto_choice_is_logged_when_debug_is_switched_on_after_the_first_call(caplog, monkeypatch):
    """design.md §4: the auto choice is visible in a debug log line. The choice is cached at the first call; the line
    comes at the first call after DEBUG is on, once per (op, device, dtype)."""
    monkeypatch.setattr(backends, "_LOGGED", set())
    x, w, a, b = torch.randn(2, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
    lk.lora_linear(x, w, a, b)  # cached before logging is switched on
    with caplog.at_level(logging.DEBUG, logger="lora_kernels"):
        lk.lora_linear(x, w, a, b)
        lk.lora_linear(x, w, a, b)
    lines = [r.getMessage() for r in caplog.records if "backend='auto' chose" in r.getMessage()]
    assert lines == [f"lora_linear: backend='auto' chose {backends.auto_backend('cpu')!r} for cpu float32 tensors"]


@pytest.mark.parametrize("units", [False, True])
def test_auto_runs_a_bf16_lora_linear_on_the_torch_composition_on_a_cpu_with_bf16_gemm_units(units, caplog,
                                                                                             monkeypatch):
    """lora_linear asks auto with x's dtype: in bf16 on a CPU with bf16 GEMM units the torch composition, whose
    GEMMs run on them, where the C++ kernels' float32 copies measured 2.4-7.2x its fwd+bwd (backends.auto_backend)."""
    monkeypatch.setattr(backends, "_LOGGED", set())
    monkeypatch.setattr(backends, "_CHOICES", {})
    monkeypatch.setattr(backends, "CPU_HAS_BF16_GEMM_UNITS", units)
    x, w, a, b = (torch.randn(*shape, dtype=torch.bfloat16) for shape in ((2, 8), (4, 8), (2, 8), (4, 2)))
    expected = "torch" if units else backends.auto_backend("cpu")
    with caplog.at_level(logging.DEBUG, logger="lora_kernels"):
        y = lk.lora_linear(x, w, a, b)
    lines = [r.getMessage() for r in caplog.records if "backend='auto' chose" in r.getMessage()]
    assert lines == [f"lora_linear: backend='auto' chose {expected!r} for cpu bfloat16 tensors"]
    assert torch.equal(y, lk.lora_linear(x, w, a, b, backend=expected))


def test_bf16_gemm_units_count_only_with_onednn_on(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert backends.detect_cpu_bf16_gemm_units() == torch.backends.mkldnn.is_available()
    with torch.backends.mkldnn.flags(enabled=False):  # ATen's own bf16 GEMMs then, slow without oneDNN
        assert not backends.detect_cpu_bf16_gemm_units()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not backends.detect_cpu_bf16_gemm_units()
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the private check: as without units
    assert not backends.detect_cpu_bf16_gemm_units()


def test_auto_choice_for_a_tensor_subclass_weight_is_logged(caplog, monkeypatch):
    """A quantized (tensor-subclass) weight makes "auto" run the torch composition whatever the device: that choice
    is logged too (it bypassed resolve_backend's auto path, and its line)."""
    monkeypatch.setattr(backends, "_LOGGED", set())
    quantized, _ = quantized_linear(8, 4)
    x, a, b = torch.randn(2, 8), torch.randn(2, 8), torch.randn(4, 2)
    with caplog.at_level(logging.DEBUG, logger="lora_kernels"):
        lk.lora_linear(x, quantized.weight, a, b)
        lk.lora_linear(x, quantized.weight, a, b)
    lines = [r.getMessage() for r in caplog.records if "backend='auto' chose" in r.getMessage()]
    assert lines == ["lora_linear: backend='auto' chose 'torch' for a tensor-subclass weight (is_subclass_weight)"]


# ------------------------------------------------------------ tensor lifetimes, reference cycles, unbounded caches
# What a training or serving step leaves behind: the tensors the autograd Functions save and how long they live,
# objects only the cycle collector would free (gc disabled, DEBUG_SAVEALL), and tensors held by caches.

def _saved_by(fn, *args):
    """(fn(*args), [(shape, dtype, bytes, weakref)] of every tensor autograd saved while it ran)."""
    import weakref
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype, tensor.numel() * tensor.element_size(),
                      weakref.ref(tensor)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn(*args)
    return result, saved


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_training_step_saves_x_and_s_only_and_they_die_at_the_backward(backend):
    """README: the layer saves x and S = drop(x)·Aᵀ (plus W for dX and the factors); the dropout mask comes back from
    a seed, and no fp32 copy of a 16-bit x is kept. PEFT's layer on the same shapes saves the dropout output [M, K]
    beside x, and with float32 factors (autocast_adapter_dtype) a float32 copy of x. S, the only activation the
    Function makes, is freed by the backward while the graph (the output) is still held."""
    peft = pytest.importorskip("peft")
    m, k, n, r, p = 64, 48, 40, 4, 0.1
    x = torch.randn(m, k, dtype=torch.bfloat16, requires_grad=True)
    layer = lk.LoRALinear(k, n, r=r, lora_dropout=p, dtype=torch.bfloat16, init_lora_weights=False, backend=backend)
    y, saved = _saved_by(layer, x)
    s_dtype = x.dtype if backend == "torch" else torch.float32  # the fused kernels keep S in fp32 (PEFT: x's dtype)
    # x, S, W (for dX), A and B cast from their fp32 Parameters, the dropout seed, and the fp32 Parameters themselves
    # (no memory of their own; the backward's create_graph path differentiates through them)
    assert [(shape, dtype) for shape, dtype, _, _ in saved] == [
        ((m, k), x.dtype), ((m, r), s_dtype), ((n, k), x.dtype), ((r, k), x.dtype), ((n, r), x.dtype),
        ((), torch.int64), ((r, k), torch.float32), ((n, r), torch.float32)]
    assert saved[6][3]() is layer.lora_A.weight and saved[7][3]() is layer.lora_B.weight
    y.float().sum().backward()
    assert saved[1][3]() is None, "S outlived the backward"

    base = torch.nn.Sequential(torch.nn.Linear(k, n)).to(torch.bfloat16)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=8, lora_dropout=p, target_modules=["0"]))
    _, peft_saved = _saved_by(peft_model, x)
    ours, theirs = sum(size for _, _, size, _ in saved), sum(size for _, _, size, _ in peft_saved)
    assert ours < theirs - 2 * m * k, (ours, theirs)  # at least one [M, K] bf16 tensor less


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_16_bit_cast_of_a_float32_lora_a_is_kept_only_for_dx(backend):
    """The 16-bit cast of lora_A's float32 Parameter is read by the backward only for dX: where x needs no gradient
    (the first layer's projections) it was saved beside the Parameter all the same, r·K elements per layer over
    PEFT's. The gradients, dropout's mask included (drawn like x [M, K] without x), are those of the layer with x
    requiring grad."""
    m, k, n, r, p = 16, 48, 40, 4, 0.1
    layer = lk.LoRALinear(k, n, r=r, lora_dropout=p, dtype=torch.bfloat16, init_lora_weights=False, backend=backend)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    grads = []
    for x_grad in (False, True):
        torch.manual_seed(0)  # the same dropout mask
        y, saved = _saved_by(layer, x.clone().requires_grad_(x_grad))
        assert (((r, k), torch.bfloat16) in [(shape, dtype) for shape, dtype, _, _ in saved]) == x_grad, saved
        layer.zero_grad()
        y.float().square().sum().backward()
        grads.append([layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()])
    for without_x_grad, with_x_grad in zip(*grads):
        assert torch.equal(without_x_grad, with_x_grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_multi_lora_backward_frees_what_the_forward_saved_while_the_graph_lives(backend):
    """After the backward nothing of a training step's MultiLoRAFunction stays alive through its graph (kept by a
    loss held for logging until the next step's forward): neither S nor the LoRABatch's buffers, which the
    Function's context also held outside save_for_backward."""
    import weakref

    from lora_kernels.batch import BUFFER_FIELDS

    m, k, n, max_rank, num_slots = 12, 32, 24, 8, 3
    layer = lk.MultiLoRALinear(torch.nn.Linear(k, n), num_slots, max_rank, backend=backend)
    for slot in range(num_slots):
        layer.set_adapter(slot, torch.randn(4, k), torch.randn(n, 4), 0.5)
    layer.requires_grad_(True)
    layer.base_layer.requires_grad_(False)
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, 2, -1] * 3), num_slots)
    buffers = [weakref.ref(getattr(batch, name)) for name in BUFFER_FIELDS]
    y, saved = _saved_by(layer, torch.randn(m, k, requires_grad=True), batch)
    del batch
    s = next(ref for shape, _, _, ref in saved if shape == (m, max_rank))
    y.sum().backward()
    assert s() is None, "S outlived the backward"
    assert all(ref() is None for ref in buffers), "the LoRABatch outlived the backward"
    assert y.grad_fn is not None  # the graph is still alive


def _garbage_of(step):
    """The objects that only the cycle collector frees, left by step() (run once before to warm up lazy imports and
    caches): with gc disabled, whatever refcounting does not free stays for gc.collect() to find."""
    step()
    # Until a collection finds nothing: what an earlier test left (torch.compile's caches after test_compile_fuzz)
    # can free in cascades, each collection's finalizers and weakref callbacks dropping the last outside reference
    # to the next cycles. One collection left 2228, 1447 and 573 objects for a step that did nothing at all.
    for _ in range(20):
        if not gc.collect():
            break
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # the collector keeps what it finds in gc.garbage instead of freeing it
    try:
        step()
        gc.collect()
        return list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _small_model():
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))


# The Triton interpreter leaves cycles of its own (GridExecutor's recursive argument-copying closures, with the CPU
# copies of the launch's tensors in them): not the launchers', and not there in compiled kernels.
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_steps_adapter_loads_and_model_edits_leave_no_reference_cycles(backend, tmp_path):
    """Everything a training or serving step, a LoRABatch, an adapter load or unload and a model edit creates is
    freed by refcounting alone (a cycle, e.g. through an autograd context holding a module or a closure over
    itself, keeps its tensors until the collector happens to run)."""
    adapter = _small_model()
    lk.inject_lora(adapter, ["0", "2"], r=4, init_lora_weights=False)
    lk.save_peft_adapter(adapter, tmp_path)

    def lora_step():
        layer = lk.LoRALinear(16, 8, r=4, lora_dropout=0.1, init_lora_weights=False, backend=backend)
        x = torch.randn(6, 16, requires_grad=True)
        layer(x).sum().backward()
        torch.autograd.grad(layer(x).sum(), x, create_graph=True)[0].sum().backward()  # the differentiable backward

    def multi_step():
        layer = lk.MultiLoRALinear(torch.nn.Linear(16, 8), 3, 4, backend=backend)
        layer.set_adapter(1, torch.randn(2, 16), torch.randn(8, 2), 0.5)
        ids = torch.tensor([1, -1, 0, 1])
        batch = LoRABatch.from_adapter_ids(ids, 3).refill_(ids.flip(0))
        with torch.no_grad():
            layer(torch.randn(4, 16), batch)
        layer.requires_grad_(True)
        layer(torch.randn(4, 16, requires_grad=True), ids).sum().backward()
        layer.clear_adapter(1)

    def model_edits():
        model = _small_model()
        lk.inject_lora(model, ["0", "2"], r=4)
        model(torch.randn(2, 16)).sum().backward()
        lk.merge_and_unload(model)
        lk.load_peft_adapter(_small_model(), tmp_path, backend=backend)
        served = lk.prepare_multi_adapter(_small_model(), ["0", "2"], 2, 4, backend=backend)
        lk.load_peft_adapter(served, tmp_path, adapter_name="a")
        with lk.set_batch_adapters(served, ["a", "__base__"]), torch.no_grad():
            served(torch.randn(2, 16))
        lk.delete_adapter(served, "a")

    for step in (lora_step, multi_step, model_edits):
        # the collector also finds what other threads of the process (a compile worker, an earlier test's) left in the
        # same window: that failed once in a full xdist run, not alone. A cycle of the step's own recurs every time.
        garbage = _garbage_of(step) and _garbage_of(step)
        assert not garbage, f"{step.__name__}: {len(garbage)} objects in cycles, e.g. {garbage[:5]}"


def _live_tensors():
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))  # type(): no __class__ lookups


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_serving_with_a_new_token_count_every_call_keeps_no_tensors(backend, monkeypatch):
    """A serving loop's token count changes every call: no cache keyed by it (backend choice, LoRABatch, kernel
    configuration) may keep tensors per count, nor may loading and unloading adapters accumulate any. The batch
    cache of set_batch_adapters is bounded: filled first, then passed over with more shapes than it holds (a bound
    of 2 here, to keep the interpreted Triton calls few)."""
    monkeypatch.setattr(lk.modules.BatchAdapterIds, "_MAX_CACHED", 2)
    k, n, num_slots = 16, 8, 3
    single = lk.LoRALinear(k, n, r=4, init_lora_weights=False, backend=backend).eval()
    multi = lk.prepare_multi_adapter(_small_model(), ["0", "2"], num_slots, 4, backend=backend)
    multi.lora_adapter_slots.update(a=0, b=1)
    layers = [m for m in multi.modules() if isinstance(m, lk.MultiLoRALinear)]

    def serve(tokens):
        for layer in layers:  # load and unload: slot 0 takes a new rank each call, slot 1 is emptied and refilled
            layer.set_adapter(0, torch.randn(1 + tokens % 4, layer.in_features),
                              torch.randn(layer.out_features, 1 + tokens % 4), 0.5 * tokens)
            layer.clear_adapter(1)
            layer.set_adapter(1, torch.randn(2, layer.in_features), torch.randn(layer.out_features, 2), 1.0)
        with torch.no_grad():
            single(torch.randn(tokens, k))
            multi[0](torch.randn(tokens, k), torch.randint(-1, num_slots, (tokens,)))
            multi(torch.randn(2, tokens, k))  # under set_batch_adapters below: one cached batch per shape

    with lk.set_batch_adapters(multi, ["a", "b"]):
        cache_size = lk.modules.BatchAdapterIds._MAX_CACHED
        for tokens in range(1, cache_size + 1):
            serve(tokens)
        before = _live_tensors()
        for tokens in range(cache_size + 1, 3 * cache_size + 1):
            serve(tokens)
        assert _live_tensors() <= before

class AnnouncingLock:
    """`lock` for tests that force an interleaving: the thread named `waiter` sets `event` when it finds the lock held
    and is about to wait for it (the other thread, stopped inside, then goes on)."""

    def __init__(self, lock, waiter, event):
        self.lock, self.waiter, self.event = lock, waiter, event

    def __enter__(self):
        if not self.lock.acquire(blocking=False):
            if threading.current_thread().name == self.waiter:
                self.event.set()
            self.lock.acquire()
        return self

    def __exit__(self, *exc):
        self.lock.release()
        return False


def _second_once_the_first_stops(first, stopped, second):
    """Starts thread `first`, then `second` once `first` has set the event `stopped`; waits for both."""
    first.start()
    assert stopped.wait(10)
    second.start()
    first.join(20)
    second.join(20)


def _replace_a_by_b(model, tmp_path, done):
    """Deletes adapter "a" and loads "b" (from tmp_path / "b", into the freed slot), then sets the event `done`."""
    try:
        lk.delete_adapter(model, "a")
        lk.load_peft_adapter(model, tmp_path / "b", adapter_name="b")
    finally:
        done.set()


def _save_two_layer_adapter(path, seed, alpha_pattern=None):
    torch.manual_seed(seed)
    src = lk.inject_lora(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)), ["0", "1"], r=4)
    for layer in src:
        torch.nn.init.normal_(layer.lora_B.weight)
    lk.save_peft_adapter(src, path)
    if alpha_pattern:
        config = json.loads((path / "adapter_config.json").read_text())
        config["alpha_pattern"] = alpha_pattern
        (path / "adapter_config.json").write_text(json.dumps(config))


def _two_prepared_layers():
    return lk.prepare_multi_adapter(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)), ["0", "1"],
                                    max_adapters=2, max_rank=4, backend="torch")


def test_a_scaling_past_float32_is_refused_before_any_slot_is_written(tmp_path, monkeypatch):
    """A reload of a served name whose second layer's scaling (alpha_pattern) passes float32 was refused only by
    set_adapter of that layer, after the first layer's slot held the new adapter: forwards in other threads computed
    an adapter that the load then refused. It must fail before any write, naming the module."""
    _save_two_layer_adapter(tmp_path / "old", 1)
    _save_two_layer_adapter(tmp_path / "bad", 2, {"1": 1e300})
    model = _two_prepared_layers()
    lk.load_peft_adapter(model, tmp_path / "old", adapter_name="a")
    writes = []
    set_adapter = modules.MultiLoRALinear.set_adapter

    def spy(self, *args, **kwargs):
        writes.append(self)
        return set_adapter(self, *args, **kwargs)

    monkeypatch.setattr(modules.MultiLoRALinear, "set_adapter", spy)
    try:
        lk.load_peft_adapter(model, tmp_path / "bad", adapter_name="a")
    except ValueError as error:
        message = str(error)
    else:
        raise AssertionError("the load was not refused")
    assert writes == [], "a slot was written before the load was refused"
    assert message.startswith("load_peft_adapter: module '1'"), message


def test_a_failed_load_restores_the_slots_under_the_slot_lock(tmp_path, monkeypatch):
    """A load by name that fails after writing some layers restores them; that restore must take the slot lock as
    set_adapter does, or a forward in another thread sees a slot half restored (old lora_a with new lora_b: 40 of
    ~5000 forwards mixed in a stress run). Forced: the load fails in layer 1 while another thread, standing for a
    running forward, holds the slot lock; the restore must wait for it, not write layer 0 meanwhile."""
    _save_two_layer_adapter(tmp_path / "old", 1)
    _save_two_layer_adapter(tmp_path / "new", 2)
    model = _two_prepared_layers()
    lk.load_peft_adapter(model, tmp_path / "old", adapter_name="a")
    old_b = model[0].lora_b[0].clone()
    layer0_written, holder_has_lock, restore_waits = threading.Event(), threading.Event(), threading.Event()
    set_adapter = modules.MultiLoRALinear.set_adapter

    def fail_in_layer_1(self, *args, **kwargs):
        if self is model[1]:
            layer0_written.set()
            holder_has_lock.wait(10)
            raise MemoryError("forced failure in layer 1")
        return set_adapter(self, *args, **kwargs)

    real_lock = modules._SLOT_LOCK

    class RestoreAnnouncingLock:
        def __enter__(self):
            if holder_has_lock.is_set() and threading.current_thread().name == "loader":
                restore_waits.set()
            return real_lock.__enter__()

        def __exit__(self, *exc):
            return real_lock.__exit__(*exc)

    monkeypatch.setattr(modules.MultiLoRALinear, "set_adapter", fail_in_layer_1)
    monkeypatch.setattr(modules, "_SLOT_LOCK", RestoreAnnouncingLock())
    errors = []

    def load():
        try:
            lk.load_peft_adapter(model, tmp_path / "new", adapter_name="a")
        except MemoryError as error:
            errors.append(error)

    loader = threading.Thread(target=load, name="loader")
    loader.start()
    assert layer0_written.wait(10)
    with real_lock:
        holder_has_lock.set()
        new_b = model[0].lora_b[0].clone()
        while not restore_waits.is_set() and loader.is_alive():
            restore_waits.wait(0.01)
        # the holder (a forward) still sees layer 0 whole: the new adapter, not partly restored
        assert torch.equal(model[0].lora_b[0], new_b), "the restore wrote a slot while a forward held the lock"
        assert restore_waits.is_set(), "the restore did not take the slot lock"
    loader.join(10)
    assert errors and torch.equal(model[0].lora_b[0], old_b)


def test_rows_of_a_deleted_name_never_compute_the_adapter_that_took_its_slot(tmp_path, monkeypatch):
    """README: names are looked up again on every load/delete, "so a deleted one computes the base model, also once
    another adapter took its slot". A forward read set_batch_adapters' slot ids before taking the slot lock: a delete
    of "a" and a load of "b" into a's slot in between made rows named "a" compute "b". Forced: the forward stops
    right after it reads the ids until the writer has finished, or is about to take the slot lock (it announces)."""
    for name, seed in (("a", 1), ("b", 2)):
        _save_two_layer_adapter(tmp_path / name, seed)
    model = _two_prepared_layers()
    lk.load_peft_adapter(model, tmp_path / "a", adapter_name="a")
    x = torch.randn(2, 16)
    with torch.no_grad():
        base = model[0].base_layer(x)
        a_out = model[0](x, torch.zeros(2, dtype=torch.int64))
    read_ids, writer_waits_or_done = threading.Event(), threading.Event()
    batch_for = modules.BatchAdapterIds.batch_for
    real_lock = modules._SLOT_LOCK

    def stopping_batch_for(self, *args, **kwargs):
        if threading.current_thread().name == "reader" and not read_ids.is_set():
            read_ids.set()
            writer_waits_or_done.wait(10)
        return batch_for(self, *args, **kwargs)

    monkeypatch.setattr(modules.BatchAdapterIds, "batch_for", stopping_batch_for)
    # held by the reader: the writer announces that it waits for it
    monkeypatch.setattr(modules, "_SLOT_LOCK", AnnouncingLock(real_lock, "writer", writer_waits_or_done))
    out = {}

    def reader():
        with torch.no_grad():
            out["y"] = model[0](x)

    with lk.set_batch_adapters(model, ["a", "a"]):
        _second_once_the_first_stops(threading.Thread(target=reader, name="reader"), read_ids,
                                     threading.Thread(target=_replace_a_by_b, name="writer",
                                                      args=(model, tmp_path, writer_waits_or_done)))
    assert model.lora_adapter_slots == {"b": 0}
    with torch.no_grad():
        b_out = model[0](x, torch.zeros(2, dtype=torch.int64))
    assert not torch.allclose(out["y"], b_out), "rows named 'a' (deleted) computed adapter 'b', which took its slot"
    # ordered before the delete (a's output) or after it (the base model's)
    assert torch.allclose(out["y"], a_out, atol=1e-5) or torch.allclose(out["y"], base, atol=1e-5)


def test_a_name_deleted_while_set_batch_adapters_looks_it_up_computes_the_base_model(tmp_path, monkeypatch):
    """set_batch_adapters looked names up, then put the setting in place, outside the turns that loads and deletes
    by name take: a delete in between resolved the settings then in place, not the new one, which kept the deleted
    name's slot (its rows computed whichever adapter was loaded there next). Forced: the setter stops once it has
    looked the names up until the delete has finished, or is about to take the table lock (it announces)."""
    _save_two_layer_adapter(tmp_path / "a", 1)
    model = _two_prepared_layers()
    lk.load_peft_adapter(model, tmp_path / "a", adapter_name="a")
    looked_up, deleter_waits_or_done = threading.Event(), threading.Event()
    batch_adapter_ids_init = modules.BatchAdapterIds.__init__

    def stopping_init(self, *args, **kwargs):
        batch_adapter_ids_init(self, *args, **kwargs)
        if threading.current_thread().name == "setter":
            looked_up.set()
            deleter_waits_or_done.wait(10)

    # held by the setter: the delete announces that it waits for it
    table_lock = AnnouncingLock(modules.adapter_table_lock(), "deleter", deleter_waits_or_done)
    monkeypatch.setattr(modules.BatchAdapterIds, "__init__", stopping_init)
    monkeypatch.setattr(modules, "adapter_table_lock", lambda: table_lock)

    def delete():
        try:
            lk.delete_adapter(model, "a")
        finally:
            deleter_waits_or_done.set()

    _second_once_the_first_stops(threading.Thread(target=lk.set_batch_adapters, args=(model, ["a", "a"]),
                                                  name="setter"),
                                 looked_up, threading.Thread(target=delete, name="deleter"))
    assert model.lora_adapter_slots == {}
    assert model[0].batch_adapters.rows.slot_ids == (-1, -1), "the setting kept the deleted name's slot"


def test_saving_an_adapter_by_name_while_it_is_replaced_saves_it_whole(tmp_path, monkeypatch):
    """save_peft_adapter(adapter_name=...) read the slots outside the turns loads and deletes by name take, and kept
    views of them until the file was written: a delete of "a" and a load of "b" into its slot meanwhile saved "b"
    (or layers of both) as "a". Forced: the save stops after reading its first layer until the writer has finished,
    or is about to take the table lock (it announces)."""
    for name, seed in (("a", 1), ("b", 2)):
        _save_two_layer_adapter(tmp_path / name, seed)
    model = _two_prepared_layers()
    lk.load_peft_adapter(model, tmp_path / "a", adapter_name="a")
    first_read, writer_waits_or_done = threading.Event(), threading.Event()
    clean_number = peft_io._clean_number

    def stopping_clean_number(*args):
        if threading.current_thread().name == "saver" and not first_read.is_set():
            first_read.set()
            writer_waits_or_done.wait(10)
        return clean_number(*args)

    # held by the saver: the writer announces that it waits for it
    table_lock = AnnouncingLock(modules.adapter_table_lock(), "writer", writer_waits_or_done)
    monkeypatch.setattr(peft_io, "_clean_number", stopping_clean_number)
    monkeypatch.setattr(peft_io, "adapter_table_lock", lambda: table_lock)
    monkeypatch.setattr(modules, "adapter_table_lock", lambda: table_lock)

    _second_once_the_first_stops(threading.Thread(target=lk.save_peft_adapter, args=(model, tmp_path / "saved"),
                                                  kwargs={"adapter_name": "a"}, name="saver"),
                                 first_read, threading.Thread(target=_replace_a_by_b, name="writer",
                                                              args=(model, tmp_path, writer_waits_or_done)))
    assert model.lora_adapter_slots == {"b": 0}
    saved, original = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("saved", "a"))
    assert saved.keys() == original.keys()
    for key in original:
        assert torch.equal(saved[key], original[key]), f"{key} is not adapter 'a''s"


def test_loading_adapters_by_name_does_not_grow_python_memory(tmp_path):
    """A server loads and deletes adapters for days: each load_peft_adapter must free what it allocated. safetensors'
    load_file (0.8.0) kept ~56 bytes per tensor per call (helper 152: 25 KB per load of a 448-tensor adapter)."""
    import tracemalloc

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(32))

    source = lk.inject_lora(Model(), ["layers.%d" % i for i in range(32)], r=2)
    lk.save_peft_adapter(source, tmp_path)  # 64 tensors
    model = lk.prepare_multi_adapter(Model(), ["layers.%d" % i for i in range(32)], 2, 4)

    def cycles(count):
        for _ in range(count):
            lk.load_peft_adapter(model, tmp_path, adapter_name="a")
            lk.delete_adapter(model, "a")

    cycles(5)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cycles(100)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # 64 tensors x 100 loads x ~56 B leaked = ~350 KB; what a cycle keeps legitimately is bounded and far below that
    assert grown < 64 * 1024, f"100 load/delete cycles kept {grown} bytes"


def test_reading_an_adapter_file_holds_it_in_memory_once(tmp_path):
    """An adapter with modules_to_save heads (embed_tokens, lm_head) is GBs: read_adapter_weights must not hold the
    file's bytes and a copy of every tensor at once (safetensors.torch.load of f.read(): 2x the file at peak)."""
    import tracemalloc
    from safetensors.torch import save_file

    from lora_kernels.peft_io import read_adapter_weights
    save_file({"base_model.model.lm_head.modules_to_save.weight": torch.randn(1024, 1024)},
              str(tmp_path / "adapter_model.safetensors"))  # 4 MiB
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    tracemalloc.start()
    try:
        tensors, _ = read_adapter_weights(str(tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tensors["base_model.model.lm_head.modules_to_save.weight"].shape == (1024, 1024)
    assert peak < 1.3 * size, f"reading a {size}-byte file peaked at {peak} bytes of Python memory"
