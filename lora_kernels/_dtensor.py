"""Tensor parallelism (torch.distributed.tensor, parallelize_module): recognising DTensors and the layout hooks
parallelize_module puts on a layer, without importing torch.distributed (no DTensor can exist before it is
imported)."""

import sys

import torch


def dtensor_class():
    """torch.distributed.tensor.DTensor once that module is imported, else None."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_dtensor(t):
    # plain tensors and Parameters answered first (a DTensor made a Parameter keeps its type): the grouped ops ask
    # 16-21 times a call, at 0.4 µs each through the module lookup below (helper 289)
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
        return False
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def describe(t):
    """'a DTensor (placements (Shard(dim=0),) on DeviceMesh(...))' for error messages."""
    return f"a DTensor (placements {tuple(t.placements)} on {t.device_mesh})"


def is_tensor_parallel_hook(hook):
    """Whether `hook` is one of the forward (pre-)hooks torch.distributed.tensor.distribute_module registers, which
    ColwiseParallel / RowwiseParallel / SequenceParallel (parallelize_module) use to convert a layer's input to the
    DTensor layout its sharded weight needs and its output back: lambdas defined in distribute_module (torch 2.5 on:
    torch/distributed/tensor/_api.py)."""
    return (getattr(hook, "__module__", None) == "torch.distributed.tensor._api"
            and getattr(hook, "__qualname__", "").startswith("distribute_module."))


def tensor_parallel_hooks(module):
    """(forward pre-hooks, forward hooks) that distribute_module registered on `module`, in registration order."""
    return ([h for h in module._forward_pre_hooks.values() if is_tensor_parallel_hook(h)],
            [h for h in module._forward_hooks.values() if is_tensor_parallel_hook(h)])


def is_tensor_parallel(module):
    """Whether module's weight is a DTensor that parallelize_module laid out (its layout hooks are on the module):
    tensor parallelism, not an FSDP2 shard, which forwards plain tensors."""
    pre_hooks, hooks = tensor_parallel_hooks(module)
    return is_dtensor(module.weight) and bool(pre_hooks) and bool(hooks)


def reshard_fsdp2_units(module):
    """Reshards each fully_shard (FSDP2) unit that holds one of `module`'s parameters unsharded now. A root-only
    fully_shard (or reshard_after_forward=False) leaves them unsharded after a forward, as plain tensors, and a write
    into those (merge(), a loaded adapter, a slot) was dropped at the unit's next reshard, silently: the layer then
    claimed merged and computed the base model. Resharded first, the write reaches the shards, or is refused where
    sharded tensors are. FSDPModule.reshard is local (no collective) and leaves a sharded unit as it is. The units
    come from torch's registry of composable module states (private: without it, nothing is resharded)."""
    fsdp_module = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    registry = getattr(sys.modules.get("torch.distributed._composable_state"), "_module_state_mapping", None)
    if fsdp_module is None or not registry:
        return
    units = [unit for unit in list(registry.keys()) if isinstance(unit, fsdp_module)]
    if units:
        wanted = {id(parameter) for parameter in module.parameters()}
        for unit in units:
            # the unit's own parameters: those of units nested in it are theirs (resharding an outer unit for them
            # would cost it an all-gather at its next forward)
            nested = {id(parameter) for sub in unit.modules() if sub is not unit and isinstance(sub, fsdp_module)
                      for parameter in sub.parameters()}
            if any(id(parameter) in wanted and id(parameter) not in nested for parameter in unit.parameters()):
                unit.reshard()
