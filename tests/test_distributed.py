"""A LoRA training step under DDP and under FSDP2 (fully_shard), gloo backend, 2 processes on CPU: the LoRA
gradients equal those of one process on the full batch, frozen base weights get none, and save_peft_adapter of the
wrapped model (FSDP2: sharded weights gathered by every rank, rank 0 writes) loads back to the same adapter.

Both run in one pair of spawned processes (process start-up dominates the cost). A second pair runs the serving ops
under tensor parallelism (below)."""

import dataclasses
import json
import os
import shutil
import socket
import sys
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_close
from safetensors.torch import load_file
from torch import nn

import lora_kernels as lk
from lora_kernels import reference

WORLD = 2
BATCH = 8  # split evenly, so the mean over ranks of per-rank mean losses is the full-batch mean loss
TIMEOUT_S = 180


def _base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))


def _model():
    return lk.inject_lora(_base(), ["0", "2", "4"], r=4, lora_alpha=8, init_lora_weights=False, backend="torch")


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 16, generator=generator), torch.randn(BATCH, 8, generator=generator)


def _loss(model, x, target):
    return nn.functional.mse_loss(model(x), target)


def _has_fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2; torch >= 2.6)
        return True
    except ImportError:
        return False


def _exit_without_teardown():
    """Ends a worker that finished (results saved, process group destroyed) without the interpreter's teardown: there,
    now and then, a thread torch.distributed left behind aborted the process ("terminate called without an active
    exception", 2 of 24 and 2 of 30 runs of the DTensor test here, each after destroy_process_group had returned on
    both ranks), which failed the test after every check had passed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x, target = _batch()
        x, target = x.chunk(WORLD)[rank], target.chunk(WORLD)[rank]
        results = {}

        ddp = nn.parallel.DistributedDataParallel(_model())
        _loss(ddp, x, target).backward()
        results["ddp"] = {n.removeprefix("module."): p.grad.clone() for n, p in ddp.named_parameters()
                          if p.grad is not None}
        if rank == 0:
            lk.save_peft_adapter(ddp.module, os.path.join(out_dir, "ddp_adapter"))
            lk.save_peft_adapter(ddp, os.path.join(out_dir, "ddp_wrapper_adapter"))  # the wrapper itself
        # LoRA weights added inside DDP would not be synchronised: every op that adds or replaces layers refuses a
        # DDP-wrapped model, before any change (README, "Distributed training")
        wrapped = nn.parallel.DistributedDataParallel(_base())  # a collective: on every rank
        dist.barrier()  # rank 0 wrote ddp_adapter above: a file every rank reads
        saved_adapter = os.path.join(out_dir, "ddp_adapter")
        ddp_refusals = {}
        for op, call in (("inject_lora", lambda: lk.inject_lora(wrapped, ["0"])),
                         ("load_peft_adapter", lambda: lk.load_peft_adapter(wrapped, saved_adapter)),
                         ("prepare_multi_adapter", lambda: lk.prepare_multi_adapter(wrapped, ["0"], max_adapters=2,
                                                                                   max_rank=4)),
                         ("merge_and_unload", lambda: lk.merge_and_unload(ddp))):
            try:
                call()
                ddp_refusals[op] = "accepted"
            except ValueError as exc:
                ddp_refusals[op] = str(exc)
        ddp_refusals["unchanged"] = (not any(isinstance(m, lk.LoRALinear) for m in wrapped.modules())
                                        and sum(isinstance(m, lk.LoRALinear) for m in ddp.modules()) == 3)

        if _has_fully_shard():
            from torch.distributed.fsdp import fully_shard
            model = _model()
            for layer in model:
                if isinstance(layer, lk.LoRALinear):
                    fully_shard(layer)  # frozen weight/bias and trainable lora_A/lora_B in one FSDP group
            fully_shard(model)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*returned a view tensor")
                _loss(model, x, target).backward()
            results["fsdp2"] = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
            lk.save_peft_adapter(model, os.path.join(out_dir, "fsdp2_adapter"))  # every rank: gathers the shards
            dist.barrier()  # rank 0 writes the file that every rank loads below (rank 1 had looked before it existed)
            # a named adapter loaded into, deleted from or cleared in sharded slots: refused by name, the slots as
            # they were (lora_a[slot] of a sharded stack is a gathered copy: clearing it had zeroed only the copy)
            multi = lk.prepare_multi_adapter(_base(), ["0", "2", "4"], max_adapters=2, max_rank=4)
            lk.load_peft_adapter(multi, os.path.join(out_dir, "fsdp2_adapter"), adapter_name="a")
            layers = [layer for layer in multi if isinstance(layer, lk.MultiLoRALinear)]
            for layer in layers:
                fully_shard(layer)
            refusals = []
            for call in (lambda: lk.load_peft_adapter(multi, os.path.join(out_dir, "fsdp2_adapter"), adapter_name="b"),
                         lambda: lk.delete_adapter(multi, "a"), lambda: layers[0].clear_adapter(0)):
                try:
                    call()
                    refusals.append("accepted")
                except TypeError as exc:
                    refusals.append(str(exc))
            results["fsdp2_multi_refusals"] = refusals
            results["fsdp2_multi_slots"] = (multi.lora_adapter_slots,  # FSDP2 shards parameters, not buffers
                                            [m.ranks.tolist() for m in layers],
                                            [m.lora_a.full_tensor()[0].count_nonzero().item() > 0 for m in layers])
            # a root-only fully_shard keeps the parameters unsharded after a forward, as plain tensors: merge() and a
            # load then wrote into those copies, dropped at the next reshard (the layer claimed merged and computed
            # the base model; the loaded adapter gave way to the one before), silently (helper 257)
            other = _model()
            with torch.no_grad():
                for layer in other:
                    if isinstance(layer, lk.LoRALinear):
                        layer.lora_B.weight.add_(0.5)
                if rank == 0:
                    lk.save_peft_adapter(other, os.path.join(out_dir, "other_adapter"))
                dist.barrier()
                unsharded = {}
                for write in ("merge", "unmerge", "load", "reset"):
                    root_only = fully_shard(_model())
                    layers = [layer for layer in root_only if isinstance(layer, lk.LoRALinear)]
                    if write == "unmerge":
                        for layer in layers:
                            layer.merge()
                    expected = root_only(x)  # the forward that leaves the parameters unsharded
                    if write == "merge":
                        for layer in layers:
                            layer.merge()
                    elif write == "unmerge":
                        for layer in layers:
                            layer.unmerge()
                    elif write == "load":
                        lk.load_peft_adapter(root_only, os.path.join(out_dir, "other_adapter"))
                        expected = other(x)
                    else:  # B zeros: the base model's outputs
                        for layer in layers:
                            layer.reset_lora_parameters()
                        expected = _base()(x)
                    root_only.reshard()  # as the next backward does
                    unsharded[write] = (root_only(x) - expected).abs().max().item()
            results["fsdp2_unsharded_writes"] = unsharded
            # README: float32 factors and trained 16-bit biases in one fully_shard group fail FSDP2's one-dtype
            # check; autocast_adapter_dtype=False (16-bit factors) passes it
            for float32_factors in (True, False):
                torch.manual_seed(0)
                model = lk.inject_lora(_base().to(torch.bfloat16), ["0", "2", "4"], r=4, bias="all",
                                       autocast_adapter_dtype=float32_factors, backend="torch")
                try:
                    fully_shard(model[0])
                    model[0](x.to(torch.bfloat16)).float().sum().backward()
                    results[f"fsdp2_bias_all/{float32_factors}"] = "ok"
                except Exception as exc:  # noqa: BLE001  (the outcome is what the test checks)
                    results[f"fsdp2_bias_all/{float32_factors}"] = f"{type(exc).__name__}: {exc}"
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "grads.pt"))
            torch.save(ddp_refusals, os.path.join(out_dir, "ddp_refusals.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_without_teardown()


def _run_workers(worker, world, tmp_path):
    """worker(rank, port, out_dir) in `world` spawned processes; fails the test past TIMEOUT_S."""
    context = mp.spawn(worker, args=(_free_port(), str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_and_fsdp2_lora_gradients_equal_one_process_and_saved_adapters_load(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    _run_workers(_worker, WORLD, tmp_path)
    results = torch.load(tmp_path / "grads.pt")

    model = _model()
    _loss(model, *_batch()).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(expected) == sorted(f"{i}.lora_{f}.weight" for i in (0, 2, 4) for f in "AB")
    kinds = ["ddp"] + (["fsdp2"] if _has_fully_shard() else [])
    if _has_fully_shard():
        mixed, uniform = results.pop("fsdp2_bias_all/True"), results.pop("fsdp2_bias_all/False")
        assert "uniform" in mixed and "dtype" in mixed, mixed
        assert uniform == "ok", uniform
        for op, refused in zip(("load_peft_adapter", "delete_adapter", "MultiLoRALinear.clear_adapter"),
                               results.pop("fsdp2_multi_refusals")):
            assert f"{op}: the layer's slots are a DTensor" in refused, refused
            assert "clear or delete adapters before sharding the model" in refused, refused
        # nothing half-applied: adapter "a" in slot 0 of every layer, its factors there
        assert results.pop("fsdp2_multi_slots") == ({"a": 0}, [[4, 0]] * 3, [True] * 3)
        # merged or unmerged: the same outputs up to rounding; loaded: the other adapter's; reset: the base model's
        unsharded_writes = results.pop("fsdp2_unsharded_writes")
        assert max(unsharded_writes.values()) < 1e-5, unsharded_writes
    assert sorted(results) == kinds
    x, _ = _batch()
    for kind in kinds:
        assert sorted(results[kind]) == sorted(expected), kind  # no gradient for a frozen base weight
        for name, grad in expected.items():
            assert_close(results[kind][name], grad, torch.float32, f"{kind} grad {name}")
        # the adapter saved from the wrapped model (rank 0 writes) is the one every rank started from
        loaded = lk.load_peft_adapter(_base(), tmp_path / f"{kind}_adapter")
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # saved through the DDP wrapper: the model's own names, the same file
    wrapper_file = load_file(tmp_path / "ddp_wrapper_adapter" / "adapter_model.safetensors")
    assert wrapper_file.keys() == load_file(tmp_path / "ddp_adapter" / "adapter_model.safetensors").keys()
    refusals = torch.load(tmp_path / "ddp_refusals.pt")
    assert refusals.pop("unchanged") is True
    assert sorted(refusals) == ["inject_lora", "load_peft_adapter", "merge_and_unload", "prepare_multi_adapter"]
    for op, message in refusals.items():
        assert message.startswith(f"{op}: model is wrapped in DistributedDataParallel"), message
        # merge_and_unload comes after training: its way out is the model inside, not calling it before wrapping
        hint = "on the model inside (ddp.module)" if op == "merge_and_unload" else "on the model first, then wrap it"
        assert hint in message, message


# ---------------------------------------------------------------------------------------------- tensor parallelism
# The serving ops under tensor parallelism, as a serving stack shards a layer over TP_WORLD ranks: the results must
# equal the unsharded layer's, computed in one process. Column-parallel (W and lora_b split over N, x and lora_a
# whole): add_lora per rank, then all_gather. Row-parallel (W, lora_a and x split over K, the result all-reduced):
# either add_lora with the rank's K-shard and the whole lora_b before the all-reduce (the partial LoRA terms sum
# like the base partials), or lora_shrink, all_reduce of the [M, R] shrink result, and lora_expand of this rank's
# N-slice of lora_b at its slice_offset (vLLM's way: 1/tp of the expand). The trap the README names: all-reduced
# shrink results expanded over all N on every rank count the LoRA term TP_WORLD times.

TP_WORLD = 2
TP_SHAPE = {"tokens": 24, "k": 32, "n": 16, "slots": 3, "max_rank": 4}
TP_BACKENDS = ("torch", "cpu")


def _tp_problem():
    generator = torch.Generator().manual_seed(3)
    s = TP_SHAPE
    x = torch.randn(s["tokens"], s["k"], generator=generator)
    weight = torch.randn(s["n"], s["k"], generator=generator) / s["k"] ** 0.5
    lora_a = torch.randn(s["slots"], s["max_rank"], s["k"], generator=generator)
    lora_b = torch.randn(s["slots"], s["n"], s["max_rank"], generator=generator)
    ids = torch.arange(s["tokens"]) % (s["slots"] + 1) - 1  # every slot and base-only tokens
    return x, weight, lora_a, lora_b, ids, torch.tensor([2.0, 0.5, 1.0]), torch.tensor([4, 2, 3])


def _tp_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=TP_WORLD)
    try:
        x, weight, lora_a, lora_b, ids, scalings, ranks = _tp_problem()
        batch = lk.LoRABatch.from_adapter_ids(ids, lora_a.shape[0])
        n_shard, k_shard = weight.shape[0] // TP_WORLD, weight.shape[1] // TP_WORLD
        cols, ks = slice(rank * n_shard, (rank + 1) * n_shard), slice(rank * k_shard, (rank + 1) * k_shard)
        results = {}
        for backend in (b for b in TP_BACKENDS if b in lk.available_backends("cpu")):
            # column-parallel
            y = x @ weight[cols].T
            lk.ops.add_lora(y, x, [lora_a], [lora_b[:, cols].contiguous()], batch, scalings, ranks, [n_shard],
                            backend=backend)
            gathered = [torch.empty_like(y) for _ in range(TP_WORLD)]
            dist.all_gather(gathered, y)
            results[f"column/{backend}"] = torch.cat(gathered, dim=1)
            # row-parallel, add_lora before the all-reduce
            x_shard, a_shard = x[:, ks].contiguous(), lora_a[:, :, ks].contiguous()
            y = x_shard @ weight[:, ks].T
            lk.ops.add_lora(y, x_shard, [a_shard], [lora_b], batch, scalings, ranks, [weight.shape[0]],
                            backend=backend)
            dist.all_reduce(y)
            results[f"row add_lora/{backend}"] = y
            # row-parallel, all-reduced shrink, each rank expanding its own N-slice
            t = lk.ops.lora_shrink(x_shard, a_shard, batch, scalings, ranks, backend=backend)
            dist.all_reduce(t)
            y = x_shard @ weight[:, ks].T
            lk.ops.lora_expand(t, lora_b[:, cols].contiguous(), batch, y, cols.start, ranks, backend=backend)
            dist.all_reduce(y)
            results[f"row sliced expand/{backend}"] = y
            # the trap: the all-reduced shrink expanded over all N on every rank
            y = x_shard @ weight[:, ks].T
            lk.ops.lora_expand(t, lora_b, batch, y, 0, ranks, backend=backend)
            dist.all_reduce(y)
            results[f"trap/{backend}"] = y
        # DTensor arguments: refused by name (they failed inside torch's token indexing, "mixed torch.Tensor and
        # DTensor"); the ops take each rank's shards, as above
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
        mesh = init_device_mesh("cpu", (TP_WORLD,))
        weight_dt = distribute_tensor(weight, mesh, [Shard(0)])
        x_dt = distribute_tensor(x, mesh, [Shard(1)])
        replicated = lambda t: distribute_tensor(t, mesh, [Replicate()])  # noqa: E731
        dt_batch = dataclasses.replace(batch, adapter_ids=replicated(batch.adapter_ids))
        refusals = {}
        for name, call in (
                ("weight", lambda: lk.multi_lora_linear(x, weight_dt, lora_a, lora_b, ids, scalings, ranks=ranks)),
                ("adapter_ids", lambda: lk.multi_lora_linear(x, weight, lora_a, lora_b, replicated(ids), scalings)),
                ("scalings", lambda: lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, replicated(scalings))),
                ("ranks", lambda: lk.ops.lora_shrink(x, lora_a, batch, scalings, replicated(ranks))),
                ("batch.adapter_ids", lambda: lk.ops.lora_shrink(x, lora_a, dt_batch, scalings, ranks)),
                ("x", lambda: lk.ops.lora_shrink(x_dt, lora_a, batch, scalings, ranks)),
                ("out", lambda: lk.ops.lora_expand(torch.zeros(x.shape[0], lora_a.shape[1]), lora_b, batch,
                                                   distribute_tensor(x @ weight.T, mesh, [Shard(1)]), 0, ranks))):
            try:
                call()
                refusals[name] = "accepted"
            except TypeError as exc:
                refusals[name] = str(exc)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "tp.pt"))
            torch.save(refusals, os.path.join(out_dir, "tp_refusals.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_without_teardown()


def test_serving_ops_under_tensor_parallelism_equal_the_unsharded_layer(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    _run_workers(_tp_worker, TP_WORLD, tmp_path)
    results = torch.load(tmp_path / "tp.pt")
    x, weight, lora_a, lora_b, ids, scalings, ranks = _tp_problem()
    expected = reference.multi_lora_linear(x, weight, lora_a, lora_b, ids, scalings, None, ranks)
    base = x.double() @ weight.double().T
    backends = [b for b in TP_BACKENDS if b in lk.available_backends("cpu")]
    assert sorted(results) == sorted(f"{kind}/{b}" for b in backends
                                     for kind in ("column", "row add_lora", "row sliced expand", "trap"))
    for name, got in results.items():
        if name.startswith("trap/"):  # the LoRA term counted TP_WORLD times: what the README warns against
            assert_close(got, base + TP_WORLD * (expected - base), torch.float32, name)
        else:
            assert_close(got, expected, torch.float32, name)
    for name, refused in torch.load(tmp_path / "tp_refusals.pt").items():
        assert f"{name} expected a plain torch.Tensor, got a DTensor" in refused, refused
        assert f"{name}.to_local()" in refused, refused


# --------------------------------------------------------------------------- LoRA layers under DTensor tensor parallelism
# PyTorch's own tensor parallelism (parallelize_module with ColwiseParallel / RowwiseParallel: DTensor weights and
# layout hooks on each nn.Linear), the FSDP2+TP recipe's TP half. Layer "0" column-parallel (W, bias and so lora_B
# split over N), layer "2" row-parallel (W and so lora_A split over K, the result all-reduced). One pair of processes
# for every case; rank 0 saves what it saw and the parent compares it with one process.
#   (a) inject_lora, then parallelize_module: torch refuses the LoRA layers (its styles take nn.Linear only).
#   (b) parallelize_module, then inject_lora: the torch backend (and "auto", which picks it for DTensors) gives the
#       one-process output and LoRA gradients (the factors sharded like the weight, the layout hooks carried over);
#       merge() in place too. A kernel backend, which takes plain tensors, lora_dropout > 0, prepare_multi_adapter
#       and merge_and_unload (plain layers) are refused before the model changes.
#   (c) save_peft_adapter of (b)'s model writes the one-process adapter; load_peft_adapter into a parallelized base
#       model computes the one-process output.
# Each lk.lora_linear call with a DTensor argument and a plain one, or a kernel backend, is refused by name.

TP_LORA_PLAN_TARGETS = ["0", "2"]


def _tp_lora_base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


def _tp_lora_inject(model, **kwargs):
    torch.manual_seed(7)  # the same draws for the factors in one process and on rank 0 (whose draw every rank gets)
    return lk.inject_lora(model, TP_LORA_PLAN_TARGETS, r=4, lora_alpha=8, init_lora_weights=False, **kwargs)


def _tp_lora_batch():
    generator = torch.Generator().manual_seed(2)
    return torch.randn(6, 16, generator=generator), torch.randn(6, 8, generator=generator)


def _outcome(fn):
    """("ok", value) or ("error", exception type name, message): what a case did on this rank."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = fn()
        return ("ok", value, [str(w.message) for w in caught])
    except Exception as exc:  # noqa: BLE001  (the test compares the type and message)
        return ("error", type(exc).__name__, str(exc))


def _read(output):
    """RowwiseParallel's output all-reduce is asynchronous: the layer returns an AsyncCollectiveTensor whose collective
    is waited for by the first op that reads it. Outputs only pickled (rank 0) or dropped (rank 1) left their
    collectives unwaited at exit, where gloo's teardown now and then aborted a process ("terminate called without an
    active exception"). clone() reads it."""
    return output.clone()


def _unwaited_collectives():
    """Collectives started and never waited for on this rank (0 when every output was read); None where this torch
    does not count them."""
    count = getattr(torch._C._distributed_c10d, "_get_work_registry_size", None)
    return None if count is None else count()


def _tp_lora_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=TP_WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        mesh = init_device_mesh("cpu", (TP_WORLD,))

        def parallel_base():
            return parallelize_module(_tp_lora_base(), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})

        x, target = _tp_lora_batch()
        results = {}
        results["a"] = _outcome(lambda: parallelize_module(_tp_lora_inject(_tp_lora_base(), backend="torch"), mesh,
                                                           {"0": ColwiseParallel(), "2": RowwiseParallel()}))

        def step(backend):
            model = _tp_lora_inject(parallel_base(), backend=backend)
            y = model(x)
            _loss(model, x, target).backward()
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
            # each factor sharded like the weight it adapts, and its gradient laid out as the factor
            placements = {n: (tuple(map(repr, p.placements)), p.grad.placements == p.placements)
                          for n, p in model.named_parameters() if "lora_" in n}
            if backend == "torch":
                lk.save_peft_adapter(model, os.path.join(out_dir, "tp_adapter"))  # every rank: gathers the factors
            unload = _outcome(lambda: lk.merge_and_unload(model))[:2]  # would make plain layers: refused
            unload += (all(isinstance(model[i], lk.LoRALinear) for i in (0, 2)),)
            unload += _outcome(lambda: model[0].to_linear())[:2]  # so would to_linear on its own
            for i in (0, 2):
                model[i].merge()  # in place, on the sharded weight
            return _read(y), grads, placements, unload, _read(model(x))

        for backend in ("torch", "auto"):
            results[f"b/{backend}"] = _outcome(lambda backend=backend: step(backend))

        def refused(apply):  # the error, and whether the model is still the parallelized base model
            model = parallel_base()
            flags = [p.requires_grad for p in model.parameters()]
            outcome = _outcome(lambda: apply(model) and None)  # not the model: its hooks do not pickle
            unchanged = (all(type(model[i]) is nn.Linear for i in (0, 2))
                         and flags == [p.requires_grad for p in model.parameters()])
            return outcome, unchanged

        if "cpu" in lk.available_backends("cpu"):
            results["b/cpu"] = refused(lambda model: _tp_lora_inject(model, backend="cpu"))
        results["b/dropout"] = refused(lambda model: _tp_lora_inject(model, lora_dropout=0.1))
        # several adapters per batch: grouped kernels only
        results["b/multi"] = refused(lambda model: lk.prepare_multi_adapter(model, TP_LORA_PLAN_TARGETS, 2, 4))
        # a DTensor weight without parallelize_module's layout hooks (an FSDP2 shard, or distributed by hand): refused
        from torch.distributed.tensor import Shard, distribute_tensor
        model = _tp_lora_base()
        model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(0)]))
        results["b/no_hooks"] = (_outcome(lambda: _tp_lora_inject(model, backend="torch") and None),
                                 type(model[0]) is nn.Linear)

        def loaded():
            model = lk.load_peft_adapter(parallel_base(), os.path.join(out_dir, "tp_adapter"))
            return _read(model(x))
        results["c/load"] = _outcome(loaded)
        # an adapter trained with dropout (Hub adapters often have lora_dropout 0.05-0.1): refused by name before
        # any change, into the parallelized base model and into an injected one (which took the value and failed at
        # its first training forward)
        dropout_adapter = os.path.join(out_dir, f"tp_adapter_dropout{rank}")
        shutil.copytree(os.path.join(out_dir, "tp_adapter"), dropout_adapter)
        config_path = os.path.join(dropout_adapter, "adapter_config.json")
        with open(config_path) as f:
            config = json.load(f)
        with open(config_path, "w") as f:
            json.dump({**config, "lora_dropout": 0.1}, f)
        results["c/load_dropout"] = refused(lambda model: lk.load_peft_adapter(model, dropout_adapter))
        model = _tp_lora_inject(parallel_base(), backend="torch")
        results["c/load_dropout_injected"] = (_outcome(lambda: lk.load_peft_adapter(model, dropout_adapter) and None),
                                              [model[i].lora_dropout for i in (0, 2)])

        # the functional op, called directly: a DTensor weight with a plain x (a layer without parallelize_module's
        # input hook), and DTensors for a kernel backend
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
        generator = torch.Generator().manual_seed(4)
        w, a, b = (torch.randn(*shape, generator=generator) for shape in ((8, 16), (2, 16), (8, 2)))
        w_d = distribute_tensor(w, mesh, [Shard(0)])
        a_d, b_d = distribute_tensor(a, mesh, [Replicate()]), distribute_tensor(b, mesh, [Shard(0)])
        x_d = distribute_tensor(x, mesh, [Replicate()])
        results["op/mixed"] = _outcome(lambda: lk.lora_linear(x, w_d, a_d, b_d, 2.0, backend="torch"))
        # dropout (a mask drawn by each process) and a weight on another mesh: refused by name
        results["op/dropout"] = _outcome(lambda: lk.lora_linear(x_d, w_d, a_d, b_d, 2.0, dropout_p=0.1, backend="torch"))
        mesh_2d = init_device_mesh("cpu", (1, TP_WORLD))
        w_other = distribute_tensor(w, mesh_2d, [Replicate(), Shard(0)])
        results["op/mesh"] = _outcome(lambda: lk.lora_linear(x_d, w_other, a_d, b_d, 2.0, backend="torch"))
        # a parallelized layer whose weight is on a 2-D mesh (FSDP2 over tensor parallelism): refused by name
        model = parallel_base()
        whole = model[0].weight.detach().full_tensor()
        model[0].weight = nn.Parameter(distribute_tensor(whole, mesh_2d, [Replicate(), Shard(0)]))
        results["b/mesh_2d"] = _outcome(lambda: _tp_lora_inject(model, backend="torch") and None)
        if "cpu" in lk.available_backends("cpu"):
            results["op/cpu"] = _outcome(lambda: lk.lora_linear(x_d, w_d, a_d, b_d, 2.0, backend="cpu"))
        for backend in ("auto", "reference"):  # torch ops, DTensor-aware (auto picks torch)
            results[f"op/{backend}"] = _outcome(lambda backend=backend: lk.lora_linear(
                x_d, w_d, a_d, b_d, 2.0, backend=backend).full_tensor())
        results["unwaited"] = [None] * TP_WORLD
        dist.all_gather_object(results["unwaited"], _unwaited_collectives())
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "tp_lora.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_without_teardown()


def test_lora_layers_under_dtensor_tensor_parallelism_equal_one_process_or_are_refused(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    _run_workers(_tp_lora_worker, TP_WORLD, tmp_path)
    results = torch.load(tmp_path / "tp_lora.pt", weights_only=False)
    x, target = _tp_lora_batch()
    model = _tp_lora_inject(_tp_lora_base(), backend="torch")
    expected_y = model(x)
    _loss(model, x, target).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    # (a) torch's own refusal: its styles shard nn.Linear and nn.Embedding only
    assert results["a"][:2] == ("error", "NotImplementedError") and "nn.Linear" in results["a"][2]
    # (b) the torch backend, and auto, which picks it for DTensors: one process's output and gradients, with the
    # factors sharded like the weight they adapt and no warning about dropped hooks (the layout hooks move along)
    for backend in ("torch", "auto"):
        status, value, caught = results[f"b/{backend}"]
        assert status == "ok", results[f"b/{backend}"]
        y, grads, placements, unload, merged_y = value
        assert not caught, caught
        assert_close(y, expected_y, torch.float32, f"TP output/{backend}")
        assert sorted(grads) == sorted(expected)
        for name, grad in expected.items():
            assert_close(grads[name], grad, torch.float32, f"TP grad {name}/{backend}")
        assert placements == {"0.lora_A.weight": (("Replicate()",), True), "0.lora_B.weight": (("Shard(dim=0)",), True),
                              "2.lora_A.weight": (("Shard(dim=1)",), True), "2.lora_B.weight": (("Replicate()",), True)}
        # merge_and_unload refused, the model unchanged; to_linear refused
        assert unload == ("error", "TypeError", True, "error", "TypeError"), unload
        assert_close(merged_y, expected_y, torch.float32, f"TP output after merge()/{backend}")
    # refused before any change: a kernel backend (plain tensors only), dropout (masks drawn per process)
    if "cpu" in lk.available_backends("cpu"):
        (status, kind, message), unchanged = results["b/cpu"]
        assert (status, kind, unchanged) == ("error", "TypeError", True), results["b/cpu"]
        assert "backend 'cpu'" in message and "backend='torch'" in message, message
    (status, kind, message), unchanged = results["b/dropout"]
    assert (status, kind, unchanged) == ("error", "ValueError", True), results["b/dropout"]
    assert "lora_dropout" in message and "0.1" in message, message
    (status, kind, message), unchanged = results["b/multi"]
    assert (status, kind, unchanged) == ("error", "TypeError", True), results["b/multi"]
    assert message.startswith("prepare_multi_adapter: module '0'") and "DTensor" in message, message
    # (c) the saved adapter is the one-process one; loaded into a parallelized base model it computes its output
    loaded = lk.load_peft_adapter(_tp_lora_base(), tmp_path / "tp_adapter")
    torch.testing.assert_close(loaded(x), expected_y.detach(), rtol=0, atol=0)
    status, y, caught = results["c/load"]
    assert status == "ok", results["c/load"]
    assert not caught, caught
    assert_close(y, expected_y, torch.float32, "TP output after load_peft_adapter")
    (status, kind, message), unchanged = results["c/load_dropout"]
    assert (status, kind, unchanged) == ("error", "ValueError", True), results["c/load_dropout"]
    assert message.startswith("load_peft_adapter: module '0': the adapter's lora_dropout is 0.1"), message
    (status, kind, message), dropouts = results["c/load_dropout_injected"]
    assert (status, kind, dropouts) == ("error", "ValueError", [0.0, 0.0]), results["c/load_dropout_injected"]
    # the functional op
    (status, kind, message), unchanged = results["b/no_hooks"]
    assert (status, kind, unchanged) == ("error", "TypeError", True), results["b/no_hooks"]
    assert "without the input and output hooks" in message, message
    status, kind, message = results["op/mixed"]
    assert (status, kind) == ("error", "TypeError") and message.startswith("lora_linear: x "), results["op/mixed"]
    status, kind, message = results["op/dropout"]
    assert (status, kind) == ("error", "ValueError") and "dropout_p expected 0" in message, results["op/dropout"]
    status, kind, message = results["b/mesh_2d"]
    assert (status, kind) == ("error", "TypeError") and "on a mesh of 2 dimensions" in message, results["b/mesh_2d"]
    status, kind, message = results["op/mesh"]
    assert (status, kind) == ("error", "ValueError") and message.startswith("lora_linear: weight "), results["op/mesh"]
    if "op/cpu" in results:
        status, kind, message = results["op/cpu"]
        assert (status, kind) == ("error", "TypeError") and "backend 'cpu'" in message, message
    generator = torch.Generator().manual_seed(4)
    w, a, b = (torch.randn(*shape, generator=generator) for shape in ((8, 16), (2, 16), (8, 2)))
    for backend in ("auto", "reference"):
        status, y, _ = results[f"op/{backend}"]
        assert status == "ok", results[f"op/{backend}"]
        assert_close(y, lk.lora_linear(x, w, a, b, 2.0, backend="torch"), torch.float32, f"DTensor lora_linear/{backend}")
    # every collective waited for on both ranks before the process group is destroyed (see _read)
    assert results["unwaited"] in ([0] * TP_WORLD, [None] * TP_WORLD), results["unwaited"]


def test_factor_placements_follow_the_weights_split_in_either_layout():
    """Which factor is sharded, and how, for each placement of a 1-D-mesh DTensor base weight, checked without
    processes (the spawned test above reaches nn.Linear's layout only: torch's styles do not shard a Conv1D). The
    weight is split over out (column parallel: lora_B [out, r] splits over out), over in (row parallel: lora_A
    [r, in] splits over in) or replicated; a transformers Conv1D stores its weight [in, out], so its dims swap."""
    from types import SimpleNamespace

    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import Partial

    from lora_kernels.modules import _factor_placements

    def placements(placement, fan_in_fan_out=False, backend="torch", lora_dropout=0.0, mesh_dims=1):
        weight = SimpleNamespace(device_mesh=SimpleNamespace(ndim=mesh_dims), placements=(placement,) * mesh_dims)
        return _factor_placements("op", weight, fan_in_fan_out, backend, lora_dropout)

    column, row, replicated = ((Replicate(),), (Shard(0),)), ((Shard(1),), (Replicate(),)), ((Replicate(),),) * 2
    assert placements(Shard(0)) == column and placements(Shard(1)) == row and placements(Shard(-1)) == row
    assert placements(Shard(1), fan_in_fan_out=True) == column and placements(Shard(0), fan_in_fan_out=True) == row
    assert placements(Replicate()) == placements(Replicate(), fan_in_fan_out=True) == replicated
    for backend in ("auto", "reference"):  # torch ops, which take DTensors
        assert placements(Shard(0), backend=backend) == column
    with pytest.raises(TypeError, match=r"op: backend 'cpu' runs plain tensors, .* use backend='torch'"):
        placements(Shard(0), backend="cpu")
    with pytest.raises(ValueError, match=r"op: lora_dropout expected 0 for a DTensor base weight .*, got 0\.1"):
        placements(Shard(0), lora_dropout=0.1)
    with pytest.raises(TypeError, match="on a mesh of 2 dimensions"):
        placements(Shard(0), mesh_dims=2)
    with pytest.raises(TypeError, match="expected Shard or Replicate placements"):
        placements(Partial())


def test_tensor_parallel_needs_a_dtensor_weight_and_both_layout_hooks(monkeypatch):
    """is_tensor_parallel, checked without processes: parallelize_module's layout is a DTensor weight with
    distribute_module's input and output hooks both on the layer; a DTensor weight with either alone (an FSDP2
    shard has none), or the hooks on a plain weight, is not. The hooks are known by distribute_module's module and
    qualified name, not by their name alone (a user's lambda of the same name is not one)."""
    from lora_kernels import _dtensor

    def hook(module_name, qualname):
        def fn(*args):
            return None
        fn.__module__, fn.__qualname__ = module_name, qualname
        return fn

    theirs = ("torch.distributed.tensor._api", "distribute_module.<locals>.<lambda>")
    assert _dtensor.is_tensor_parallel_hook(hook(*theirs))
    assert not _dtensor.is_tensor_parallel_hook(hook("user_code", theirs[1]))
    assert not _dtensor.is_tensor_parallel_hook(hook(theirs[0], "shard_tensor.<locals>.<lambda>"))

    class StandIn(nn.Parameter):  # a stand-in DTensor (a plain Parameter is known not to be one)
        pass

    def layer(pre_hook, post_hook):
        linear = nn.Linear(4, 3)
        linear.weight = StandIn(linear.weight.detach())
        if pre_hook:
            linear.register_forward_pre_hook(hook(*theirs))
        if post_hook:
            linear.register_forward_hook(hook(*theirs))
        linear.register_forward_hook(hook("user_code", "logger"))  # not a layout hook
        return linear

    assert not _dtensor.is_tensor_parallel(layer(True, True))  # plain weight
    monkeypatch.setattr(_dtensor, "dtensor_class", lambda: StandIn)
    assert _dtensor.is_tensor_parallel(layer(True, True))
    assert not _dtensor.is_tensor_parallel(layer(True, False))
    assert not _dtensor.is_tensor_parallel(layer(False, True))
    assert [len(found) for found in _dtensor.tensor_parallel_hooks(layer(True, True))] == [1, 1]


def _fsdp1_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        x, target = (t.chunk(WORLD)[rank] for t in _batch())
        model = FSDP(_model(), device_id=torch.device("cpu"), use_orig_params=True)  # mixed requires_grad: orig params
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _loss(model, x, target).backward()
        try:  # outside summon_full_params the factors are views of the flat local shard
            lk.save_peft_adapter(model, os.path.join(out_dir, "fsdp1_sharded"))
            outside = "accepted"
        except ValueError as exc:
            outside = str(exc)
        with FSDP.summon_full_params(model, writeback=False):
            lk.save_peft_adapter(model, os.path.join(out_dir, "fsdp1_adapter"))
        refusals = []
        for index in (0, 2, 4):  # outside summon_full_params: B @ A of empty shards was 0 and set `merged`
            try:
                model.module[index].merge()
                refusals.append("merged")
            except ValueError as exc:
                refusals.append(str(exc))
        merged = [model.module[index].merged for index in (0, 2, 4)]
        try:
            lk.merge_and_unload(model)
            refusals.append("merged")
        except ValueError as exc:
            refusals.append(str(exc))
        unchanged = [type(layer).__name__ for layer in model.module] == ["LoRALinear", "GELU"] * 2 + ["LoRALinear"]
        dist.barrier()  # both ranks wrote fsdp1_adapter
        try:  # into the flat shards: torch's copy failed, naming no tensor ("The size of tensor a (36) must match")
            lk.load_peft_adapter(model, os.path.join(out_dir, "fsdp1_adapter"))
            refusals.append("loaded")
        except ValueError as exc:
            refusals.append(str(exc))
        # LoRA layers made inside FSDP1 (its flat parameters fixed when it was built) held a flat shard as weight and
        # factors outside the flat parameter: refused, the model unchanged, inside summon_full_params too
        plain = FSDP(_base(), device_id=torch.device("cpu"), use_orig_params=True)
        added = []
        for op, call in (("inject_lora", lambda: lk.inject_lora(plain, ["0"])),
                         ("prepare_multi_adapter", lambda: lk.prepare_multi_adapter(plain, ["0"], 2, 4)),
                         ("load_peft_adapter", lambda: lk.load_peft_adapter(plain, os.path.join(out_dir,
                                                                                                "fsdp1_adapter")))):
            with FSDP.summon_full_params(plain, writeback=True):
                try:
                    call()
                    added.append(f"{op}: accepted")
                except ValueError as exc:
                    added.append(str(exc))
        added.append(not any(isinstance(m, lk.LoRALinear) for m in plain.modules()))
        # use_orig_params=False: the factors keep their shapes but view the flat parameter FSDP1 frees after the
        # backward (saving them crashed the process)
        flat = FSDP(_model().requires_grad_(True), device_id=torch.device("cpu"), use_orig_params=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _loss(flat, x, target).backward()
        try:
            lk.save_peft_adapter(flat, os.path.join(out_dir, "fsdp1_freed"))
            refusals.append("saved")
        except ValueError as exc:
            refusals.append(str(exc))
        try:  # written into, they crashed the process too
            lk.load_peft_adapter(flat, os.path.join(out_dir, "fsdp1_adapter"))
            refusals.append("loaded")
        except ValueError as exc:
            refusals.append(str(exc))
        # slots as flat shards: a load by name failed in torch's indexing ("index 0 is out of bounds"), naming nothing
        slots = FSDP(lk.prepare_multi_adapter(_base(), ["0", "2", "4"], max_adapters=2, max_rank=4),
                     device_id=torch.device("cpu"), use_orig_params=True)
        try:
            lk.load_peft_adapter(slots, os.path.join(out_dir, "fsdp1_adapter"), adapter_name="a")
            refusals.append("loaded")
        except ValueError as exc:
            refusals.append(str(exc))
        if rank == 0:
            torch.save(outside, os.path.join(out_dir, "fsdp1_outside.pt"))
        torch.save((refusals, merged, unchanged, added), os.path.join(out_dir, f"fsdp1_refusals_{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_without_teardown()


def test_fsdp1_save_refuses_flat_shards_and_saves_the_gathered_adapter(tmp_path):
    """FullyShardedDataParallel (FSDP1, use_orig_params=True: the frozen base and the trainable factors in one unit)
    holds the factors as views of each rank's flat shard outside summon_full_params: saving them wrote 1-D pieces
    under `_fsdp_wrapped_module.` keys. Refused by name; inside summon_full_params the adapter is the whole one, under
    the model's own names. merge() / merge_and_unload there are refused too (a merge of empty shards had added
    nothing and set `merged`, silently dropping the adapter from the output), and so is saving the factors of a
    use_orig_params=False model after the backward freed the flat parameter they view (a SIGSEGV), and loading into
    them. LoRA layers made inside an FSDP1 model are refused (helper 257)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    _run_workers(_fsdp1_worker, WORLD, tmp_path)
    outside = torch.load(tmp_path / "fsdp1_outside.pt")
    assert "FSDP1" in outside and "summon_full_params" in outside, outside
    # summon_full_params(rank0_only=True) leaves the other ranks their shards: saving there was told to do what it did
    assert "(with writeback=False, rank0_only=True: on rank 0 only, the other ranks keep their shards)" in outside, (
        outside)
    assert not (tmp_path / "fsdp1_sharded").exists()
    for rank in range(WORLD):
        refusals, merged, unchanged, added = torch.load(tmp_path / f"fsdp1_refusals_{rank}.pt")
        assert len(refusals) == 8
        for message in refusals:
            assert "FSDP1" in message and "summon_full_params" in message, (rank, message)
        assert merged == [False] * 3 and unchanged, (rank, merged, unchanged)
        assert added.pop() is True, (rank, added)
        for op, message in zip(("inject_lora", "prepare_multi_adapter", "load_peft_adapter"), added):
            assert message.startswith(f"{op}: the model is a FullyShardedDataParallel (FSDP1) unit") and (
                f"call {op} on the model first, then wrap it" in message), (rank, message)
    assert not (tmp_path / "fsdp1_freed").exists()
    model = _model()
    saved = load_file(tmp_path / "fsdp1_adapter" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(f"base_model.model.{i}.lora_{f}.weight" for i in (0, 2, 4) for f in "AB")
    x, _ = _batch()
    torch.testing.assert_close(lk.load_peft_adapter(_base(), tmp_path / "fsdp1_adapter")(x), model(x), rtol=0, atol=0)
