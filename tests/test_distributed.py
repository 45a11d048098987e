"""A LoRA training step under DDP and under FSDP2 (fully_shard), gloo backend, 2 processes on CPU: the LoRA
gradients equal those of one process on the full batch, frozen base weights get none, and save_peft_adapter of the
wrapped model (FSDP2: sharded weights gathered by every rank, rank 0 writes) loads back to the same adapter.

Both run in one pair of spawned processes (process start-up dominates the cost)."""

import os
import socket
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
        try:  # LoRA weights added inside DDP would not be synchronised: refused
            lk.inject_lora(nn.parallel.DistributedDataParallel(_base()), ["0"])
            inject_into_ddp = "accepted"
        except ValueError as exc:
            inject_into_ddp = str(exc)

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
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "grads.pt"))
            torch.save(inject_into_ddp, os.path.join(out_dir, "inject_into_ddp.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_and_fsdp2_lora_gradients_equal_one_process_and_saved_adapters_load(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    context = mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    results = torch.load(tmp_path / "grads.pt")

    model = _model()
    _loss(model, *_batch()).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(expected) == sorted(f"{i}.lora_{f}.weight" for i in (0, 2, 4) for f in "AB")
    kinds = ["ddp"] + (["fsdp2"] if _has_fully_shard() else [])
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
    assert "wrapped in DistributedDataParallel" in torch.load(tmp_path / "inject_into_ddp.pt")
