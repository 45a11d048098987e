"""LoRALinear (a drop-in for nn.Linear or transformers' Conv1D), MultiLoRALinear, and the model utilities:
inject_lora / merge_and_unload, prepare_multi_adapter / set_batch_adapters, PEFT's target-module matching.
No maths here: the forwards are lora_kernels.functional.lora_linear and multi_lora_linear (through their
entry points for float32 factors of a 16-bit model, lora_linear_float32_factors and its grouped twin)."""

import contextlib
import math
import numbers
import os
import re
import sys
import threading
import weakref
from typing import NamedTuple

import torch
from torch import nn

from lora_kernels._dtensor import (describe, is_dtensor, is_tensor_parallel_hook, reshard_fsdp2_units,
                                   tensor_parallel_hooks)
from lora_kernels._ext import has_host_values, is_finite_number, through_op
from lora_kernels._warnings import warn_at_caller
from lora_kernels.backends import check_backend_name
from lora_kernels.functional import (MULTI_SUBCLASS_WEIGHT_USE, SUBCLASS_WEIGHT_USE, check_layer_scaling,
                                     describe_subclass, is_subclass_weight, lora_linear_float32_factors,
                                     multi_lora_base_linear, multi_lora_linear_float32_factors,
                                     refuse_subclass_weight_backend)
from lora_kernels.ops import (FLOAT_DTYPES, autocast_off, check_dense, check_flag, is_boolean, positive_int,
                              refuse_inference_tensor_writes)


class LoRAFactor(nn.Module):
    """Holds one LoRA factor as `.weight`, so state-dict keys read `<layer>.lora_A.weight` as in PEFT. Not an
    nn.Linear on purpose: target-module matching never wraps a factor.

    init_scheme ("kaiming", "zeros" or "gaussian"; set by the owning LoRALinear from its init_lora_weights) is what
    reset_parameters() does: meta-device init flows that call reset_parameters() on every module holding
    parameters (FSDP1's default param_init_fn does, parents before children) reach the factors too, after their
    LoRALinear, so a factor must re-create its own part of PEFT's init (lora_B zeros: a fresh adapter stays the
    identity)."""

    def __init__(self, out_features, in_features, device=None, dtype=None, init_scheme="kaiming"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.init_scheme = init_scheme

    @torch.no_grad()
    def reset_parameters(self):
        scheme = getattr(self, "init_scheme", "kaiming")  # a factor pickled before init_scheme existed
        weight = self.weight
        if is_dtensor(weight):
            # tensor parallelism: drawn whole, then rank 0's draw distributed (a collective), so a replicated factor
            # is the same on every rank and a sharded one holds the shards of one draw (the draws of one process)
            weight = torch.empty(self.weight.shape, dtype=self.weight.dtype, device=self.weight.device)
        if scheme == "zeros":
            nn.init.zeros_(weight)
        elif scheme == "gaussian":  # lora_A [r, in]: PEFT's N(0, std 1/r)
            nn.init.normal_(weight, std=1 / weight.shape[0])
        else:
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if weight is not self.weight:
            self.weight.copy_(distribute_like(weight, self.weight))

    def _load_from_state_dict(self, state_dict, prefix, *args):
        if self.__dict__.pop("_skip_next_load", False):  # its merged LoRALinear refused this load (and says so)
            return
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self):
        return f"shape={tuple(self.weight.shape)}"


def distribute_like(tensor, dtensor):
    """`tensor` (whole, the same on every rank) as a DTensor laid out like `dtensor`: rank 0's copy is scattered or
    broadcast (a collective, as parallelize_module distributes weights)."""
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(tensor, dtensor.device_mesh, dtensor.placements)


def copy_into(parameter, tensor):
    """parameter.copy_(tensor) for a whole `tensor`, also when parameter is a DTensor (see distribute_like)."""
    if is_dtensor(parameter) and not is_dtensor(tensor):
        tensor = distribute_like(tensor.to(device=parameter.device, dtype=parameter.dtype), parameter)
    parameter.copy_(tensor)


def refuse_overflowed_copy(op, name, source, stored, fix):
    """ValueError when `stored` (source rounded into a narrower dtype: fp16 factors from a float32 file) holds inf
    where source held a finite value: the copy turned it into inf without a word (PEFT's load does so too)."""
    if torch.finfo(stored.dtype).max >= torch.finfo(source.dtype).max:
        return  # no narrower range: nothing to check (and no host sync)
    if not (has_host_values(source) and has_host_values(stored)) or is_dtensor(source) or is_dtensor(stored):
        return  # no values to read (meta, fake, traced), or a shard of them
    if not bool(torch.isinf(stored).any()):  # the usual case, in one pass over the narrower copy
        return
    if bool((torch.isfinite(source.to(stored.device)) & ~torch.isfinite(stored)).any()):
        largest = source.detach().abs().nan_to_num(0.0, 0.0, 0.0).amax().item()
        raise ValueError(f"{op}: {name} holds finite values past the range of {stored.dtype} (largest magnitude "
                         f"{largest:.6g}, {stored.dtype} max {torch.finfo(stored.dtype).max:.6g}), which would "
                         f"become inf there; {fix}, or rescale the adapter")


def _factor_placements(op, weight, fan_in_fan_out, backend, lora_dropout):
    """The placements of (lora_A [r, in], lora_B [out, r]) for a LoRA layer on a base weight that is a DTensor, so
    that the factors are sharded as the weight is: a column-parallel weight (split over out) splits lora_B over out,
    a row-parallel one (split over in) lora_A over in, a replicated one replicates both. Then the torch ops of the
    torch backend compute the same layout as the base layer's (A·x is partial for a row-parallel layer and reduced
    with its base output). Refused by name: a kernel backend, dropout, a mesh of more than one dimension (FSDP2
    over tensor parallelism) and a partial weight."""
    from torch.distributed.tensor import Replicate, Shard
    where = f"the base weight is {describe(weight)}"
    if backend not in ("auto", "torch", "reference"):
        raise TypeError(f"{op}: backend {backend!r} runs plain tensors, but {where} (tensor parallelism); use "
                        f"backend='torch' (or 'auto', which picks it for DTensors)")
    if lora_dropout > 0:
        raise ValueError(f"{op}: lora_dropout expected 0 for a DTensor base weight (tensor parallelism), got "
                         f"{lora_dropout!r}: the dropout mask is drawn by each process, not as a DTensor")
    if weight.device_mesh.ndim != 1:
        raise TypeError(f"{op}: {where}, on a mesh of {weight.device_mesh.ndim} dimensions; LoRA layers go on a "
                        f"tensor-parallel (1-D mesh) weight: call inject_lora / load_peft_adapter after "
                        f"parallelize_module and before fully_shard")
    (placement,) = weight.placements
    out_dim = 1 if fan_in_fan_out else 0
    if isinstance(placement, Replicate):
        return (Replicate(),), (Replicate(),)
    if isinstance(placement, Shard) and placement.dim % 2 == out_dim:
        return (Replicate(),), (Shard(0),)
    if isinstance(placement, Shard):
        return (Shard(1),), (Replicate(),)
    raise TypeError(f"{op}: {where}; expected Shard or Replicate placements (a partial weight holds no value "
                    f"of its own to adapt)")


def lora_scaling(r, lora_alpha, use_rslora):
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def scaling_source(r, lora_alpha, use_rslora):
    """What made lora_scaling's result, for an error message."""
    return f"lora_alpha {lora_alpha!r} / {'sqrt(r)' if use_rslora else 'r'} at r = {r}"


def conv1d_class():
    """transformers' Conv1D (GPT-2's linear layer, weight stored [in, out]) when transformers is imported, else None.
    Never imports transformers itself: a model that holds a Conv1D has imported it already."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_conv1d(module):
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def in_out_features(linear):
    """(in_features, out_features) of an nn.Linear, or of a transformers Conv1D, whose weight is stored [in, out]."""
    return tuple(linear.weight.shape) if is_conv1d(linear) else (linear.in_features, linear.out_features)


# nn.Linear subclasses whose own forward computes exactly F.linear(x, weight, bias): wrapped like nn.Linear.
# transformers' FalconLinear (every Falcon projection) is `input @ weight.T (+ bias)`.
LINEAR_EQUIVALENTS = frozenset({"transformers.models.falcon.modeling_falcon.FalconLinear"})


def has_own_linear_forward(module):
    """Whether `module` is a subclass of nn.Linear or of transformers' Conv1D computing something other than
    F.linear in its own forward."""
    cls = type(module)
    base = conv1d_class() if is_conv1d(module) else nn.Linear if isinstance(module, nn.Linear) else None
    return (base is not None and cls.forward is not base.forward
            and f"{cls.__module__}.{cls.__qualname__}" not in LINEAR_EQUIVALENTS)


# Why merging into a tensor-subclass (quantized) base weight is refused, and what to do instead.
_NO_MERGE_INTO_SUBCLASS = "which cannot take the adapter without being dequantized and quantized again"
_KEEP_THE_ADAPTER_SEPARATE = ("Keep the adapter separate (save_peft_adapter), or load it into the unquantized model "
                              "and merge there")


def refuse_subclass_reset(op, weight, instead):
    """TypeError for re-initialising a tensor-subclass (quantized) base weight, before any change: nn.Linear's
    initialisation writes values into it, which such weights do not implement (nn.Linear.reset_parameters() fails
    on torchao's with "unimplemented operator ... aten.uniform_"), and a random quantized weight is of no use."""
    if is_subclass_weight(weight):
        raise TypeError(f"{op}: the base weight is {describe_subclass(weight)}, which cannot be re-initialised; the "
                        f"layer is unchanged (use {instead})")


def weight_computed_by_hook(module):
    """Whether `module.weight` is recomputed before each forward by a forward pre-hook of the module rather than
    held as its Parameter: the deprecated torch.nn.utils.weight_norm ("weight_g"/"weight_v"), spectral_norm and
    torch.nn.utils.prune ("weight_orig") keep the parameter under those names."""
    return any(f"weight{suffix}" in module._parameters for suffix in ("_orig", "_g", "_v"))


def _forward_set_on_instance(module):
    """Whether `module.forward` is set on the instance to something else than its class's own forward: accelerate's
    hooks (refused by name elsewhere) patch it, and remove_hook_from_module puts back the class's own bound method,
    which is no patch."""
    forward = vars(module).get("forward")
    if forward is None or getattr(module, "_hf_hook", None) is not None:
        return False
    return not (getattr(forward, "__self__", None) is module
                and getattr(forward, "__func__", None) is type(module).forward)


def check_wrappable_linear(op, what, module, hint="", *, replaced=True):
    """TypeError, naming `what` and the class, for a linear layer a LoRA wrapper cannot stand in for. The wrappers
    compute F.linear(x, weight, bias) on the layer's weight Parameter and never call the layer itself, so:
    - an nn.Linear (or Conv1D) subclass with its own forward (fake-quant/QAT, torchao's Float8Linear, bnb's
      Linear8bitLt) would lose that forward silently (a fresh adapter would not even reproduce the layer's output);
    - a weight computed on each access (torch.nn.utils.parametrize: weight_norm, spectral_norm, orthogonal) or by a
      forward pre-hook (the deprecated torch.nn.utils.weight_norm) is no Parameter to hold, freeze and merge into.
    - a weight of another dtype (float8, complex) or a sparse one cannot be computed with (an obscure error deep in
      the first forward, the factors' initialisation or a merge);
    - a transformers Conv1D's weight [in, out] is passed transposed, which a tensor-subclass (quantized) weight does
      not implement (torchao's: "unimplemented operator ... aten.permute" at the first forward).
    - a layer `replaced` by a LoRALinear (not kept as MultiLoRALinear keeps it) holding other tensors than its weight
      and bias Parameters (a bias registered as a buffer, an activation scale): they would leave the model and its
      state dict.
    nn.Linear, transformers' Conv1D and their subclasses that keep the parent's forward (or whose forward computes
    F.linear: LINEAR_EQUIVALENTS) pass."""
    cls = type(module)
    # _parameters, not getattr: reading a parametrized weight computes it (spectral_norm's power iteration updates
    # its buffers in training mode), and the check below refuses such layers unchanged
    if isinstance(module._parameters.get("weight"), nn.parameter.UninitializedParameter):
        raise TypeError(f"{op}: {what} ({cls.__name__}) has a weight that is not initialised yet (its shape comes "
                        f"from the first input): run one forward first{hint}")
    if has_own_linear_forward(module):
        kind = "a transformers Conv1D" if is_conv1d(module) else "an nn.Linear"
        raise TypeError(f"{op}: {what} is a {cls.__module__}.{cls.__qualname__}, {kind} subclass with its own "
                        f"forward (e.g. fake-quant, float8 or 8-bit layers); a LoRA layer computes F.linear on its "
                        f"weight and never calls that forward, so the layer's own computation would be lost. Only "
                        f"nn.Linear, transformers' Conv1D and their subclasses that keep the parent's forward can be "
                        f"wrapped{hint}")
    if _forward_set_on_instance(module):
        raise TypeError(f"{op}: {what} ({cls.__name__}) has a forward set on the instance (module.forward = ...); a "
                        f"LoRA layer computes F.linear on its weight and never calls that forward, so its computation "
                        f"would be lost. Remove it first (del module.forward){hint}")
    if nn.utils.parametrize.is_parametrized(module):
        raise TypeError(f"{op}: {what} ({cls.__name__}) has parametrizations on {sorted(module.parametrizations)} "
                        f"(torch.nn.utils.parametrize: weight_norm, spectral_norm, orthogonal, ...): its weight is "
                        f"computed on each access, not a Parameter a LoRA layer can hold and merge into. Remove them "
                        f"first (parametrize.remove_parametrizations(module, 'weight') keeps the current value)"
                        f"{hint}")
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise TypeError(f"{op}: {what} ({cls.__name__}) has a weight that is not a Parameter (got "
                        f"{type(weight).__name__}; the deprecated torch.nn.utils.weight_norm and spectral_norm, and "
                        f"torch.nn.utils.prune, compute it in a forward pre-hook): a LoRA layer needs the weight "
                        f"Parameter itself. Remove the hook first (torch.nn.utils.remove_weight_norm, "
                        f"remove_spectral_norm, prune.remove){hint}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {what} ({cls.__name__}) expected a float32, float16, bfloat16 or float64 weight, got "
                        f"{weight.dtype}: LoRA layers compute in those (a float8 weight is run by layers with a "
                        f"forward of their own, or by torchao's quantize_ configs, whose weights LoRA layers take; "
                        f"complex and integer weights are not supported){hint}")
    if weight.layout != torch.strided:
        raise TypeError(f"{op}: {what} ({cls.__name__}) expected a dense (strided) weight, got layout "
                        f"{weight.layout}: the kernels, the merge and nn.Linear's own forward (COO) read dense "
                        f"weights; convert it first (module.weight = nn.Parameter(module.weight.to_dense())){hint}")
    if is_conv1d(module) and is_subclass_weight(weight):
        # torchao's quantize_ leaves Conv1D out by default; with a filter_fn it quantizes the [in, out] weight as if it
        # were [out, in], and the Conv1D's own forward fails on it (aten.addmm)
        raise TypeError(f"{op}: {what} ({cls.__name__}) has a weight that is {describe_subclass(weight)}: a Conv1D's "
                        f"weight is stored [in, out] and a LoRA layer passes its transpose, which such weights do not "
                        f"implement (nor does the Conv1D's own forward run on one). Quantize nn.Linear layers only "
                        f"(torchao's quantize_ default){hint}")
    others = ([f"parameter {n!r}" for n, _ in module.named_parameters(recurse=False) if n not in ("weight", "bias")]
              + [f"buffer {n!r}" for n, _ in module.named_buffers(recurse=False)]
              + [f"submodule {n!r}" for n, _ in module.named_children()]) if replaced else []
    if others:  # the new layer holds weight and bias only: the rest left the model and its state dict, silently
        raise TypeError(f"{op}: {what} ({cls.__name__}) holds {', '.join(others)} besides its weight and bias "
                        f"Parameters, which a LoRALinear would not keep (they would leave the model and its state "
                        f"dict); move them to another module first{hint}")


_HOOK_KINDS = (("forward", "_forward_hooks"), ("forward pre", "_forward_pre_hooks"), ("backward", "_backward_hooks"),
               ("backward pre", "_backward_pre_hooks"))
_STATE_DICT_HOOK_KINDS = (("state_dict", "_state_dict_hooks"), ("state_dict pre", "_state_dict_pre_hooks"),
                          ("load_state_dict pre", "_load_state_dict_pre_hooks"),
                          ("load_state_dict post", "_load_state_dict_post_hooks"))


def warn_dropped_hooks(op, what, module, why, *, replaced=True):
    """Warns when `module` carries hooks that the LoRA wrapper replacing it (or wrapping it without calling it) will
    not fire: activation capture, steering or observers registered before the adapter went in would go silent. Not
    carried over: a forward hook would then see the LoRA output (PEFT's see the base layer's), and the handles the
    caller holds would remove them from the old module only. A layer `replaced` (not kept as a submodule, as
    MultiLoRALinear keeps it) loses its state_dict and load_state_dict hooks too."""
    # parallelize_module's layout hooks are not dropped: LoRALinear.from_linear carries them over
    kinds = [kind for kind, attr in _HOOK_KINDS
             if any(not is_tensor_parallel_hook(hook) and hook is not _take_transformer_slow_path
                    for hook in (getattr(module, attr, None) or {}).values())]
    if kinds:
        warn_at_caller(f"{op}: {what} ({type(module).__name__}) has {' and '.join(kinds)} hooks, which are not carried "
                       f"over: {why}, so they will not fire. Register them again on the new layer (they then see its "
                       f"output, adapter included)")
    state_dict_kinds = [kind for kind, attr in _STATE_DICT_HOOK_KINDS if replaced and getattr(module, attr, None)]
    if state_dict_kinds:
        warn_at_caller(f"{op}: {what} ({type(module).__name__}) has {' and '.join(state_dict_kinds)} hooks, which are "
                       f"not carried over to the layer that replaces it, so they will not run on its state dict. "
                       f"Register them again on the new layer")


# init_lora_weights -> (lora_A's, lora_B's) LoRAFactor.init_scheme
_INIT_SCHEMES = ((True, ("kaiming", "zeros")), ("gaussian", ("gaussian", "zeros")), (False, ("kaiming", "kaiming")))


class LoRALinear(nn.Module):
    """y = x @ weight.T + bias + scaling * lora_B(lora_A(dropout(x))), with scaling = lora_alpha / r
    (lora_alpha / sqrt(r) with use_rslora). weight [out, in] and bias [out] are frozen; lora_A.weight [r, in] and
    lora_B.weight [out, r] train. A fresh layer equals its base layer (A kaiming-uniform, B zeros, as PEFT).

    fan_in_fan_out=True stores weight as [in, out], the layout of transformers' Conv1D (GPT-2), so the base keys and
    shapes of the state dict stay those of the wrapped Conv1D; the forward passes weight.T (a view, no copy). The
    LoRA factors keep PEFT's layout [r, in] / [out, r] either way.

    autocast_adapter_dtype=True (PEFT's default of the same name): the factors of a float16/bfloat16 layer are
    float32, so the optimizer updates them in float32 (in bfloat16, AdamW steps below ~1/256 of a weight round
    away). The forward casts them to the input's dtype, the layer's, and runs the same 16-bit kernels; their
    gradients come back in float32 from the backward's float32 sums, not rounded to 16 bits (but with the `torch`
    backend, PEFT's unfused composition in the input dtype, whose products are bf16 in bf16, and float32 in fp16,
    where 16-bit sums overflowed, in the first-order backward, and the `reference` backend, autograd of the 16-bit
    casts; PEFT itself runs its LoRA branch in float32). A
    quantized (tensor-subclass) weight whose own F.linear takes float32 inputs runs the branch in float32 on them.
    False: the factors take the layer's dtype."""

    def __init__(self, in_features, out_features, r=8, lora_alpha=8, lora_dropout=0.0, bias=True, use_rslora=False,
                 device=None, dtype=None, *, init_lora_weights=True, backend="auto", fan_in_fan_out=False,
                 autocast_adapter_dtype=True):
        super().__init__()
        in_features = positive_int("LoRALinear", "in_features", in_features)
        out_features = positive_int("LoRALinear", "out_features", out_features)
        if dtype is not None and dtype not in FLOAT_DTYPES:  # float8 failed in nn.init, naming nothing
            raise TypeError(f"LoRALinear: dtype expected a floating dtype (float32/float16/bfloat16/float64), got "
                            f"{dtype!r}")
        # flags, not truthy values: PEFT's bias="none" made a bias, fan_in_fan_out="false" a transposed weight
        bias = check_flag("LoRALinear", "bias", bias)
        self.in_features, self.out_features = in_features, out_features
        self.fan_in_fan_out = check_flag("LoRALinear", "fan_in_fan_out", fan_in_fan_out)
        shape = (in_features, out_features) if self.fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(*shape, device=device, dtype=dtype), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
                     if bias else None)
        self._reset_base_parameters()
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend, autocast_adapter_dtype,
                        "LoRALinear")

    @staticmethod
    def _check_lora_args(op, r, lora_alpha, lora_dropout, backend):
        """Raises for a bad argument; returns r and lora_alpha as Python numbers (numpy's from a sweep's grid: a numpy
        scaling broke torch.compile(fullgraph=True), which traces it as an ndarray, and json in save_peft_adapter)."""
        r = positive_int(op, "r", r)
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real):
            raise TypeError(f"{op}: lora_alpha expected a number, got {lora_alpha!r}")
        if not is_finite_number(lora_alpha):
            raise ValueError(f"{op}: lora_alpha expected a finite number, got {lora_alpha!r}")
        if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real) or not 0 <= lora_dropout < 1:
            raise ValueError(f"{op}: lora_dropout expected a number in [0, 1), got {lora_dropout!r}")
        check_backend_name(op, backend)
        return r, (int(lora_alpha) if isinstance(lora_alpha, numbers.Integral) else float(lora_alpha))

    def _factor_dtype_for(self, weight_dtype):
        """The factors' dtype over a base weight of weight_dtype: float32 for a 16-bit one with
        autocast_adapter_dtype (PEFT's default), else the weight's."""
        if self._autocast_adapter_dtype and weight_dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return weight_dtype

    def _init_lora(self, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend, autocast_adapter_dtype,
                   op):
        """The adapter half of construction, shared by __init__ and from_linear (the base weight exists already)."""
        r, lora_alpha = self._check_lora_args(op, r, lora_alpha, lora_dropout, backend)
        use_rslora = check_flag(op, "use_rslora", use_rslora)  # a truthy string such as "no" switched rsLoRA on
        autocast_adapter_dtype = check_flag(op, "autocast_adapter_dtype", autocast_adapter_dtype)
        scaling = lora_scaling(r, lora_alpha, use_rslora)
        check_layer_scaling(op, scaling, self.weight.dtype, scaling_source(r, lora_alpha, use_rslora))
        self.r, self.lora_alpha, self.use_rslora, self.lora_dropout = r, lora_alpha, use_rslora, float(lora_dropout)
        self.scaling = scaling
        self.backend = backend
        # kept for load_peft_adapter, which makes meta factors anew for a base weight loaded since in another dtype
        self._autocast_adapter_dtype = autocast_adapter_dtype
        factor_dtype = self._factor_dtype_for(self.weight.dtype)
        placements = (_factor_placements(op, self.weight, self.fan_in_fan_out, backend, lora_dropout)
                      if is_dtensor(self.weight) else None)
        if backend not in ("auto", "torch") and is_subclass_weight(self.weight):  # refused now, not at the forward
            refuse_subclass_weight_backend(op, backend, self.weight, SUBCLASS_WEIGHT_USE)
        self.lora_A = LoRAFactor(r, self.in_features, device=self.weight.device, dtype=factor_dtype)
        self.lora_B = LoRAFactor(self.out_features, r, device=self.weight.device, dtype=factor_dtype)
        if placements is not None:  # sharded like the base weight; reset_lora_parameters fills them
            from torch.distributed.tensor import distribute_tensor
            for factor, placement in zip((self.lora_A, self.lora_B), placements):
                factor.weight = nn.Parameter(distribute_tensor(factor.weight.detach(), self.weight.device_mesh,
                                                               placement, src_data_rank=None))
        self.merged = False
        self._merged_factors = None  # merge() keeps the factors it added here (see _merged_delta)
        self.disable_adapters = False
        # set here, not first by a disable_adapter context: a compiled step's first trace guarded on their absence,
        # which its own run ended, and the step compiled again on its second call
        self._disabled_contexts, self._disabled_before_contexts = 0, False
        self.reset_lora_parameters(init_lora_weights)

    def base_weight(self):
        """The base weight as [out, in] (a transposed view with fan_in_fan_out)."""
        return self.weight.T if self.fan_in_fan_out else self.weight

    def _reset_base_parameters(self):
        # nn.Linear's own initialisation, so a LoRALinear built from scratch behaves like a new nn.Linear.
        nn.init.kaiming_uniform_(self.base_weight(), a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights=True):
        """PEFT's initialisations: True (A kaiming-uniform a=sqrt(5), B zeros), "gaussian" (A ~ N(0, std 1/r), B zeros),
        False (both random: the layer no longer starts as the identity; for tests). The choice is kept for
        reset_parameters(). Refused while merged: unmerge() subtracts the delta of the factors it finds."""
        reshard_fsdp2_units(self)
        if self.merged:
            raise RuntimeError("LoRALinear.reset_lora_parameters: the adapter is merged into the base weight, and "
                               "unmerge() would subtract the new factors' delta instead of the merged one; call "
                               "unmerge() first")
        schemes = next((v for k, v in _INIT_SCHEMES
                        if type(k) is type(init_lora_weights) and k == init_lora_weights), None)  # 1 is not True
        if schemes is None:
            raise ValueError(f"LoRALinear: init_lora_weights expected True, False or 'gaussian', "
                             f"got {init_lora_weights!r}")
        # torch refused the second factor's write only after the first was drawn anew (helper 183)
        refuse_inference_tensor_writes("LoRALinear.reset_lora_parameters",
                                       [("lora_A.weight", self.lora_A.weight), ("lora_B.weight", self.lora_B.weight)])
        self.init_lora_weights = init_lora_weights
        for factor, scheme in zip((self.lora_A, self.lora_B), schemes):
            factor.init_scheme = scheme
            factor.reset_parameters()

    def reset_parameters(self):
        """Re-initialises the layer as a new one: the base weight and bias as nn.Linear does, the adapter with the
        layer's init_lora_weights (a fresh adapter: the identity, unless it is False), unmerged. What meta-device
        flows call after to_empty(); on a layer made by from_linear it re-initialises the shared base weight too,
        as nn.Linear.reset_parameters() would. Refused for a tensor-subclass (quantized) base weight."""
        reshard_fsdp2_units(self)
        refuse_subclass_reset("LoRALinear.reset_parameters", self.weight,
                              "reset_lora_parameters() to re-initialise the adapter alone")
        refuse_inference_tensor_writes("LoRALinear.reset_parameters", [
            ("weight", self.weight), ("bias", self.bias), ("lora_A.weight", self.lora_A.weight),
            ("lora_B.weight", self.lora_B.weight)])
        self._reset_base_parameters()
        self.merged = False  # the base weight is new: nothing is merged into it
        self._merged_factors = None
        self.reset_lora_parameters(getattr(self, "init_lora_weights", True))  # a layer pickled before it was kept

    @classmethod
    def from_linear(cls, linear, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, *, init_lora_weights=True,
                    backend="auto", fan_in_fan_out=False, autocast_adapter_dtype=True):
        """Wraps an existing nn.Linear, or with fan_in_fan_out=True a transformers Conv1D (weight [in, out]): its
        weight and bias Parameters are reused (not copied) and frozen, and the new layer takes its train/eval mode.
        Bad arguments raise before `linear` is touched."""
        op = "LoRALinear.from_linear"
        fan_in_fan_out = check_flag(op, "fan_in_fan_out", fan_in_fan_out)
        if fan_in_fan_out:
            if not is_conv1d(linear):
                raise TypeError(f"{op}: fan_in_fan_out=True expects a transformers Conv1D (weight [in, out]), "
                                f"got {type(linear).__name__}" + ("; an nn.Linear needs fan_in_fan_out=False"
                                                                 if isinstance(linear, nn.Linear) else ""))
            in_features, out_features = linear.weight.shape
        elif isinstance(linear, nn.Linear):
            in_features, out_features = linear.in_features, linear.out_features
        elif is_conv1d(linear):
            raise TypeError(f"{op}: linear is a transformers Conv1D, whose weight is stored [in, out]; "
                            f"pass fan_in_fan_out=True to wrap it")
        else:
            raise TypeError(f"{op}: linear expected an nn.Linear, got {type(linear).__name__}")
        check_wrappable_linear(op, "linear", linear)
        pre_hooks, hooks = tensor_parallel_hooks(linear)
        if is_dtensor(linear.weight) and not (pre_hooks and hooks):
            raise TypeError(f"{op}: linear's weight is {describe(linear.weight)} without the input and output hooks "
                            f"parallelize_module puts on a tensor-parallel layer (an FSDP2-sharded weight, or one "
                            f"distributed by hand); apply LoRA before fully_shard, or after parallelize_module")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = in_features, out_features
        layer.fan_in_fan_out = bool(fan_in_fan_out)
        layer.weight, layer.bias = linear.weight, linear.bias
        layer._init_lora(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend, autocast_adapter_dtype,
                         op)
        linear.weight.requires_grad_(False)  # after every check: a refused wrap leaves `linear` as it was
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        # parallelize_module's hooks convert the input to the DTensor layout the sharded weight needs and the
        # output back: part of the layer's computation, so they come along (other hooks do not: warn_dropped_hooks)
        for hook in pre_hooks:
            layer.register_forward_pre_hook(hook)
        for hook in hooks:
            layer.register_forward_hook(hook)
        return layer.train(linear.training)  # a model in eval mode stays in eval mode (no dropout)

    def forward(self, x):
        if self.merged or self.disable_adapters:
            if self.disable_adapters and self.merged:
                raise RuntimeError("LoRALinear: cannot disable the adapter of a merged layer; call unmerge() first")
            return nn.functional.linear(x, self.base_weight(), self.bias)
        # The Parameters read from the dicts that hold them: nn.Module.__getattr__ costs ~1 µs a read, and these
        # reads ~10 µs of a forward's host time (helper 289). Through getattr where a dict lacks one (a
        # parametrization computes it, FSDP1 sets a view, a pre-hook recomputes it: refused below).
        # A subclass's own base_weight() is its to compute (review 291).
        weight, bias = self._parameters.get("weight"), self._parameters.get("bias")
        lora_a = self._modules["lora_A"]._parameters.get("weight")
        lora_b = self._modules["lora_B"]._parameters.get("weight")
        if type(self).base_weight is not LoRALinear.base_weight:
            weight = self.base_weight()
        else:
            if weight is None:
                weight = self.weight
            if self.fan_in_fan_out:
                weight = weight.T
        if bias is None:
            bias = self.bias
        if lora_a is None or lora_b is None:
            self._refuse_hook_computed_factors("LoRALinear.forward")
            lora_a, lora_b = self.lora_A.weight, self.lora_B.weight
        dropout_p = self.lora_dropout if self.training else 0.0
        # The factors in their own dtype: lora_linear_float32_factors casts them to x's (float32 ones of a 16-bit
        # layer inside the autograd Function, which gives their gradients in float32)
        try:
            return lora_linear_float32_factors(x, weight, lora_a, lora_b, self.scaling, bias, dropout_p,
                                               self.backend)
        except ValueError:  # a factor's device refused: say why where accelerate's offloading is the cause
            offloaded = self._offloaded_error("LoRALinear.forward")
            if offloaded is not None:
                raise offloaded from None
            raise

    def _merge_dtype(self):
        # float32 at least (a 16-bit weight takes the delta rounded once, not B @ A rounded first), and float64 for a
        # float64 layer: rounding through float32 would move its weight by ~1e-8 for good on merge + unmerge
        return torch.promote_types(torch.promote_types(self.weight.dtype, self.lora_A.weight.dtype), torch.float32)

    def delta_weight(self):
        """scaling * B @ A [out, in] in float32 (float64 for a float64 layer): what merge adds to the base weight
        (added in that dtype, rounded once; transposed first with fan_in_fan_out)."""
        self._refuse_hook_computed_factors("LoRALinear.delta_weight")
        self._check_factor_devices("LoRALinear.delta_weight")
        self._check_scaling("LoRALinear.delta_weight")
        dtype = self._merge_dtype()
        with autocast_off(self.lora_B.weight.device):  # autocast would round the product (and so merge) to 16 bits
            return self.scaling * (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype))

    def _check_scaling(self, op):
        check_layer_scaling(op, self.scaling, self._merge_dtype(),
                            f"the layer's scaling attribute (lora_alpha and r give "
                            f"{lora_scaling(self.r, self.lora_alpha, self.use_rslora)!r})")

    def _stored_delta(self):
        delta = self.delta_weight()
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, safe_merge=False):
        """Adds scaling * B @ A into the base weight. safe_merge computes the result first and refuses (ValueError,
        weight untouched) when it holds NaN or Inf."""
        safe_merge = check_flag("LoRALinear.merge", "safe_merge", safe_merge)
        reshard_fsdp2_units(self)
        self._refuse_computed_weight("LoRALinear.merge")
        self._refuse_subclass_weight("LoRALinear.merge")
        self._check_factor_devices("LoRALinear.merge")
        if safe_merge and self.weight.is_meta:  # no values to check: torch failed in .item(), naming no tensor
            raise ValueError("LoRALinear.merge: safe_merge checks the merged weight's values, but the base weight is "
                             "on the meta device, which holds none (load the weights first); the layer is unchanged")
        if self.merged:
            raise RuntimeError("LoRALinear.merge: the adapter is already merged; call unmerge() first")
        refuse_inference_tensor_writes("LoRALinear.merge", [("the base weight", self.weight)])
        merged_weight = self._merged_weight()
        if safe_merge and not torch.isfinite(merged_weight).all():
            raise ValueError("LoRALinear.merge: safe_merge found NaN/Inf in the merged weight; the layer is unchanged")
        self.weight.copy_(merged_weight)
        self.merged = True
        # what was added, to subtract it again: the factors may change while merged (an optimizer step with zeroed
        # rather than None gradients, a factor's load_state_dict, a new scaling), and unmerging by the current ones
        # left the base weight off by the difference, without a word. r·(K + N) elements, the factors' own size.
        factors = (self.lora_A.weight.detach(), self.lora_B.weight.detach())
        self._merged_factors = (None if any(f.is_meta for f in factors)  # no values to keep
                                else (factors[0].clone(), factors[1].clone(), self.scaling))

    def _merged_delta(self, op):
        """The delta merge() added to the stored weight, from the factors and scaling as they were then (on the
        weight's device now); from the current ones where no copy is kept (a layer pickled merged before they were,
        or merged on the meta device, which holds no values)."""
        merged_with = getattr(self, "_merged_factors", None)
        if merged_with is None:
            self._check_factor_devices(op)  # refuses an offloaded layer and checks the shapes too
            return self._stored_delta()
        self.refuse_offloaded(op)
        self._check_full_shapes(op)
        scaling, dtype, device = merged_with[2], self._merge_dtype(), self.weight.device
        lora_a, lora_b = (f.to(dtype) if f.device == device else f.to(device=device, dtype=dtype)
                          for f in merged_with[:2])
        with autocast_off(device):
            delta = scaling * (lora_b @ lora_a)
        return delta.T if self.fan_in_fan_out else delta

    def _unmerged_weight(self):
        """The stored base weight without the adapter: the weight itself, or once merged what unmerge() would leave."""
        if not self.merged:
            return self.weight
        return (self.weight.to(self._merge_dtype()) - self._merged_delta("save_peft_adapter")).to(self.weight.dtype)

    def _merged_weight(self):
        """The base weight with the adapter merged, in the weight's dtype: the weight itself once merged."""
        if self.merged:
            return self.weight
        return (self.weight.to(self._merge_dtype()) + self._stored_delta()).to(self.weight.dtype)

    @torch.no_grad()
    def unmerge(self):
        """Subtracts the merged delta again (exact up to the weight dtype's rounding)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: the adapter is not merged")
        reshard_fsdp2_units(self)
        self._refuse_computed_weight("LoRALinear.unmerge")
        refuse_inference_tensor_writes("LoRALinear.unmerge", [("the base weight", self.weight)])
        delta = self._merged_delta("LoRALinear.unmerge")
        self.weight.copy_((self.weight.to(self._merge_dtype()) - delta).to(self.weight.dtype))
        self.merged = False
        self._merged_factors = None

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within this context the layer computes the base linear only. A merged layer cannot be disabled: a
        RuntimeError on entering (its forward inside the context raised it, past the `with` line); unmerge() first."""
        if self.merged:
            raise RuntimeError("LoRALinear.disable_adapter: cannot disable the adapter of a merged layer; call "
                               "unmerge() first")
        self._enter_disabled()
        try:
            yield self
        finally:
            self._exit_disabled()

    def _enter_disabled(self):
        """One more disable_adapter context (of the layer or the model) open on this layer. Counted, not saved and
        restored per context: two contexts that exit out of order (asyncio tasks, threads) put back the flag the
        first one saw, and the layer stayed disabled for good (or the second ran enabled inside its context)."""
        with _disable_lock():
            depth = getattr(self, "_disabled_contexts", 0)  # a layer pickled before it was counted: none open
            if depth == 0:
                self._disabled_before_contexts = self.disable_adapters
            self._disabled_contexts = depth + 1
            self.disable_adapters = True

    def _exit_disabled(self):
        with _disable_lock():
            self._disabled_contexts -= 1
            if self._disabled_contexts == 0:  # the last one open: the flag as before the first
                self.disable_adapters = self._disabled_before_contexts

    def __setstate__(self, state):
        # A copy (deepcopy, pickle, torch.save) made inside a disable_adapter context is in none: counted as open
        # there, every later context on the copy would have left it disabled. It keeps the flag it was copied with.
        super().__setstate__({**state, "_disabled_contexts": 0})

    def _apply(self, fn, recurse=True):
        # The factors merge() kept follow the weight to another device (a merged model moved to the CPU or offloaded
        # held them on the GPU), in their own dtype; to the meta device they go (to_empty() would give them
        # uninitialised values), and unmerge() then subtracts the current factors.
        result = super()._apply(fn, recurse)
        merged_with = self.__dict__.get("_merged_factors")
        if merged_with is not None and not is_dtensor(self.weight) and merged_with[0].device != self.weight.device:
            device = self.weight.device
            self._merged_factors = (None if device.type == "meta"
                                    else (merged_with[0].to(device), merged_with[1].to(device), merged_with[2]))
        return result

    def _refuse_hook_computed_factors(self, op):
        """TypeError when a factor's weight is recomputed by a forward pre-hook of the factor (the deprecated
        torch.nn.utils.weight_norm and spectral_norm, torch.nn.utils.prune): the factors are read, never called, so
        the hook never ran and `weight` stayed the tensor computed when it was applied (spectral_norm's lora_A
        silently never trained; pruned or weight-normed factors failed at the second backward). Parametrizations
        (torch.nn.utils.parametrize) compute the weight on access, and work."""
        for name in ("lora_A", "lora_B"):
            factor = self._modules[name]  # not getattr: nn.Module.__getattr__ costs ~0.8 µs per forward and factor
            if "weight" in factor._parameters:  # the common case
                continue
            if weight_computed_by_hook(factor):
                raise TypeError(f"{op}: {name}.weight is recomputed by a forward pre-hook of {name} (the deprecated "
                                f"torch.nn.utils.weight_norm or spectral_norm, or torch.nn.utils.prune), which never "
                                f"runs: the factors are read by the kernels, never called, so {name} would not train "
                                f"and a merge would add a stale delta. Use torch.nn.utils.parametrizations."
                                f"weight_norm / spectral_norm (or a torch.nn.utils.parametrize parametrization for a "
                                f"mask), which compute the weight on access, or remove it (remove_weight_norm, "
                                f"remove_spectral_norm, prune.remove)")

    def _refuse_computed_weight(self, op):
        """TypeError when `weight` is no longer the layer's own Parameter but computed from others on each access or
        forward (torch.nn.utils.parametrize: parametrizations.weight_norm / spectral_norm / orthogonal; the deprecated
        weight_norm / spectral_norm hooks; torch.nn.utils.prune): merge()/unmerge() wrote the delta into that computed
        tensor, which the next access or forward computes anew, so `merged` was set while the adapter was gone from
        the output (check_wrappable_linear refuses such weights when wrapping; this is one parametrized since)."""
        if "weight" in self._parameters:
            return
        computed = nn.utils.parametrize.is_parametrized(self, "weight") or weight_computed_by_hook(self)
        if not computed:  # a plain tensor attribute: FSDP1 (use_orig_params=False) holds views of its flat parameter
            raise TypeError(f"{op}: the base weight is a {type(self.weight).__name__}, not the layer's Parameter (a "
                            f"view of FullyShardedDataParallel's flat parameter, use_orig_params=False?); the layer "
                            f"is unchanged. Call {op.rpartition('.')[2]}() on every rank inside `with "
                            f"FullyShardedDataParallel.summon_full_params(model, writeback=True):`, or register the "
                            f"weight as a Parameter again")
        raise TypeError(f"{op}: the base weight is computed from other parameters on each access or forward "
                        f"(torch.nn.utils.parametrize, weight_norm, spectral_norm or prune, applied after the "
                        f"layer was made), so a delta written into it would be lost; the layer is unchanged. "
                        f"Remove that first (parametrize.remove_parametrizations(layer, 'weight'), "
                        f"remove_weight_norm, prune.remove), or use to_linear() / merge_and_unload(), which "
                        f"read the computed weight")

    def _refuse_subclass_weight(self, op):
        """TypeError for a merge into a subclass weight (is_subclass_weight): merging into a quantized weight means
        dequantizing it, adding the delta and quantizing it again, which rounds the whole weight anew (PEFT's
        TorchaoLoraLinear does that when it knows the quantization config; here it failed deep inside, e.g.
        "Int8Tensor dispatch: ... aten.add")."""
        if is_subclass_weight(self.weight):
            raise TypeError(f"{op}: the base weight is {describe_subclass(self.weight)}, {_NO_MERGE_INTO_SUBCLASS}; "
                            f"the layer is unchanged. {_KEEP_THE_ADAPTER_SEPARATE}")

    def refuse_offloaded(self, op):
        """ValueError where accelerate offloaded this layer after it was made (cpu_offload, a device_map with
        "cpu"/"disk" entries): its hooks move in the weights of the modules they wrap for their forward, and the
        factors' modules are never called, so the factors stay on the meta device (the forward, merge and save had
        said they were never loaded, and load_peft_adapter, which that advised, refused the model)."""
        error = self._offloaded_error(op)
        if error is not None:
            raise error

    def _offloaded_error(self, op):
        factors = (self.lora_A.weight, self.lora_B.weight)
        if (any(factor.is_meta for factor in factors)
                and any(getattr(m, "_hf_hook", None) is not None for m in (self, self.lora_A, self.lora_B))):
            return ValueError(f"{op}: this LoRALinear is offloaded by accelerate (cpu_offload, or a device_map with "
                              f"\"cpu\"/\"disk\" entries, applied after the LoRA layers were made), whose hooks "
                              f"never move its LoRA factors in from the meta device; dispatch the model without "
                              f"cpu/disk offloading, or merge_and_unload() it before offloading")
        return None

    def _check_factor_devices(self, op, unchanged="the layer"):
        """ValueError naming the factor that is not on the base weight's device, or the tensor whose shape is not the
        layer's, before B @ A is computed. A layer wrapped on the meta device whose base checkpoint was loaded since
        (load_state_dict(assign=True)) holds meta factors. Torch's CPU matmul takes a meta operand and returns
        uninitialised memory (a lora_A left on meta merged garbage, silently); with both factors meta the merge failed
        in torch's add ("Tensor on device meta is not on the expected device cpu!"), naming no tensor, after
        merge_and_unload had replaced earlier layers."""
        self.refuse_offloaded(op)
        for name, factor in (("lora_A.weight", self.lora_A.weight), ("lora_B.weight", self.lora_B.weight)):
            if factor.device != self.weight.device:
                hint = " (never loaded: load the adapter first, e.g. with load_peft_adapter)" if factor.is_meta else ""
                raise ValueError(f"{op}: {name} expected device {self.weight.device} (the base weight's), got "
                                 f"{factor.device}{hint}; {unchanged} is unchanged")
        self._check_full_shapes(op, unchanged)

    def _check_full_shapes(self, op, unchanged="the layer"):
        """ValueError naming the tensor whose shape is not the layer's. FSDP1 (use_orig_params=True) holds the
        parameters as 1-D views of each rank's flat shard outside summon_full_params, often empty: B @ A of empty
        shards is 0, so merge() had set `merged` and added nothing."""
        weight_shape = (self.in_features, self.out_features) if self.fan_in_fan_out else (self.out_features,
                                                                                          self.in_features)
        for name, tensor, shape in (("weight", self.weight, weight_shape),
                                    ("lora_A.weight", self.lora_A.weight, (self.r, self.in_features)),
                                    ("lora_B.weight", self.lora_B.weight, (self.out_features, self.r))):
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{op}: {name} has shape {list(tensor.shape)}, expected {list(shape)} (a "
                                 f"FullyShardedDataParallel (FSDP1) model's flattened shard?); {unchanged} is "
                                 f"unchanged. Call it on every rank inside `with FullyShardedDataParallel."
                                 f"summon_full_params(model, writeback=True):`, or shard with fully_shard (FSDP2)")

    def to_linear(self):
        """A plain nn.Linear holding the merged weights (the adapter folded in); a transformers Conv1D with
        fan_in_fan_out, so the state dict keeps the wrapped layer's keys and shapes. Its weight and bias keep this
        layer's requires_grad (frozen, unless the base was trained) and train/eval mode. Not for a DTensor base weight
        (tensor parallelism) or a tensor-subclass one (a quantized weight): TypeError."""
        self._refuse_subclass_weight("LoRALinear.to_linear")
        self._check_factor_devices("LoRALinear.to_linear")
        if is_dtensor(self.weight):
            raise TypeError(f"LoRALinear.to_linear: the base weight is {describe(self.weight)} (tensor parallelism) "
                            f"and the new layer would be a plain one; merge() in place, or save the adapter "
                            f"(save_peft_adapter, on every rank) and merge it into an unsharded model")
        # Built on the meta device: its random initialisation, overwritten below anyway, moved the global RNG (a
        # sampling after merge_and_unload differed from PEFT's, which merges in place), and Conv1D's ran on a
        # float32 CPU copy of the whole weight first.
        with torch.device("meta"):
            if self.fan_in_fan_out:
                conv1d = conv1d_class()
                if conv1d is None:
                    raise RuntimeError("LoRALinear.to_linear: fan_in_fan_out layers unwrap to transformers' Conv1D, "
                                       "but transformers is not imported")
                linear = conv1d(self.out_features, self.in_features)  # always with a bias: zeros where none
            else:
                linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear = linear.to(dtype=self.weight.dtype).to_empty(device=self.weight.device)
        with torch.no_grad():
            linear.weight.copy_(self._merged_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
            elif linear.bias is not None:
                linear.bias.zero_()
        linear.weight.requires_grad_(self.weight.requires_grad)
        if linear.bias is not None:
            linear.bias.requires_grad_(self.bias is not None and self.bias.requires_grad)
        return linear.train(self.training)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # `merged` is not in the state dict (nor in PEFT's): a base weight loaded into a merged layer lost the delta
        # the forward skips and unmerge() subtracts, and new factors differ from the delta in the weight. Refused
        # as torch reports a shape mismatch: an error after the load, this layer's keys left out of it.
        own = [key for key in state_dict if key.startswith(prefix)
               and key[len(prefix):] in ("weight", "bias", "lora_A.weight", "lora_B.weight")] if self.merged else []
        if own:
            error_msgs.append(f"LoRALinear{f' {prefix[:-1]!r}' if prefix else ''} is merged, and the merged state is "
                              f"not part of a state dict: unmerge() it before loading; {own} not loaded")
            for key in own:
                del state_dict[key]
            # The factors load after this returns, and reported their keys, deleted here, as missing: the error
            # then began "Missing key(s)" for keys that were there. Each factor whose key was refused skips its load.
            for name in ("lora_A", "lora_B"):
                if f"{prefix}{name}.weight" in own:
                    getattr(self, name)._skip_next_load = True
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}"
                f"{', use_rslora=True' if self.use_rslora else ''}"
                f"{', fan_in_fan_out=True' if self.fan_in_fan_out else ''}"
                f", merged={self.merged}, backend={self.backend!r}")


# One lock for every MultiLoRALinear (a per-module lock would make modules unpicklable): set_adapter/clear_adapter
# and the launch of a forward exclude each other, so one layer's forward never sees half of a slot update. The
# writes and the forward's kernels are then queued in that order on the current stream, so the guarantee holds on
# GPUs too when both threads use the same stream (the default).
_SLOT_LOCK = threading.RLock()
_DISABLE_LOCK = threading.Lock()  # disable_adapter's per-layer count of open contexts


def _disable_lock():
    # a compiled step's `with disable_adapter(model):` (DPO's reference pass): dynamo cannot enter a lock (a graph
    # break, an error under fullgraph=True), and a traced count is updated by the graph's own code. Dynamo's own
    # flag: torch.compiler.is_compiling() is one flag for the process, True in every thread while any compiles, and
    # an eager thread then went without the lock
    return contextlib.nullcontext() if torch.compiler.is_dynamo_compiling() else _DISABLE_LOCK

# Activation checkpointing reruns a forward during the backward, and a forward without adapter ids reads the names
# set_batch_adapters has in effect then, not those of the forward it recomputes (it cannot know them). Each layer keeps
# the slot ids of its last few forwards, so a recompute under names none of them ran with (a backward called under
# another `with`) fails instead of computing the gradients of other adapters; names of another recent forward pass.
_RECENT_FORWARDS = 8
_RECOMPUTE = "the backward recomputes this layer's forward (activation checkpointing)"
_RECOMPUTE_UNDER_THE_SAME_NAMES = ("call backward inside the `with lora_kernels.set_batch_adapters(...)` that ran the "
                                   "forward, or pass adapter ids to the forward")


# One lock for the name -> slot tables of every model (model.lora_adapter_slots): a load by name
# (load_peft_adapter(..., adapter_name=...)) and delete_adapter take turns, from choosing a slot to recording the name.
_ADAPTER_TABLE_LOCK = threading.Lock()


def adapter_table_lock():
    """_ADAPTER_TABLE_LOCK as it is now (a forked process replaces it); none while compiling, as _disable_lock: a
    compiled step's disable_adapter on a model with MultiLoRALinear layers enters set_batch_adapters, and dynamo
    cannot enter a lock (a graph break, an error under fullgraph=True)."""
    return contextlib.nullcontext() if torch.compiler.is_dynamo_compiling() else _ADAPTER_TABLE_LOCK


def _new_locks_in_child():
    # A process forked while another thread held a lock (a forward holds the slot lock throughout) inherits it held by
    # a thread that does not exist there: every MultiLoRALinear forward of the child (a DataLoader worker, a
    # fork-started multiprocessing pool) waited for it forever. A slot update in progress at the fork stays as the
    # child copied it.
    global _SLOT_LOCK, _ADAPTER_TABLE_LOCK, _DISABLE_LOCK
    _SLOT_LOCK, _ADAPTER_TABLE_LOCK, _DISABLE_LOCK = threading.RLock(), threading.Lock(), threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX: the processes that fork
    os.register_at_fork(after_in_child=_new_locks_in_child)


class MultiLoRALinear(nn.Module):
    """A base nn.Linear (or transformers Conv1D) plus `max_adapters` preallocated LoRA slots of rank up to
    `max_rank`, for batches that mix adapters: forward(x, adapter_ids) with adapter_ids shaped like x.shape[:-1]
    (-1: base only). forward(x) without ids takes them from set_batch_adapters (one id per batch row).

    The base layer's weight and bias are frozen, as in LoRALinear. lora_a [L, R, K], lora_b [L, N, R] are Parameters
    (frozen; requires_grad_(True) trains several adapters at once), scalings [L] (float32; float64 in a float64
    layer) and ranks [L] are buffers. A cleared slot has rank 0 and contributes nothing. No dropout: the slots serve
    inference (and dropout-free multi-adapter training).

    adapter_dtype: the dtype of the slots' factors; None (default) is the base weight's, as serving stacks keep them
    (set_adapter casts float32 factors down). torch.float32 on a 16-bit model trains several adapters in one batch
    the way LoRALinear trains one (PEFT's autocast_adapter_dtype): optimizer updates below the 16-bit spacing still
    land, each forward casts the factors (L·R·(K+N) elements) to x's dtype for the kernels, and their gradients
    come back in float32 as the backward sums them (on GPUs the cuda and torch backends sum them in 16 bits; the
    reference backend, autograd of the 16-bit casts, rounds them to 16 bits everywhere).

    Thread safety: set_adapter / clear_adapter may run in another thread while eager forwards run; each forward of
    this layer uses either the old or the new weights of a slot, never a mix (per layer: a model forward that runs
    while a loop updates its layers one by one can see some layers updated and others not). A compiled forward takes
    no lock (a traced graph cannot hold one): update slots between compiled calls."""

    def __init__(self, base_linear, max_adapters, max_rank, *, backend="auto", adapter_dtype=None, _name=None):
        super().__init__()
        # _name: the base layer's name in its model, which prepare_multi_adapter's messages name
        op, what = (("MultiLoRALinear", "base_linear") if _name is None
                    else ("prepare_multi_adapter", f"module {_name!r}"))
        owner = op if _name is None else f"{op}: {what}"
        if not (isinstance(base_linear, nn.Linear) or is_conv1d(base_linear)):
            raise TypeError(f"MultiLoRALinear: base_linear expected an nn.Linear or a transformers Conv1D, "
                            f"got {type(base_linear).__name__}")
        self.fan_in_fan_out = is_conv1d(base_linear)  # Conv1D stores weight [in, out]; the forward passes weight.T
        in_features, out_features = in_out_features(base_linear)
        check_wrappable_linear("MultiLoRALinear", "base_linear", base_linear, replaced=False)
        if is_dtensor(base_linear.weight):  # the grouped kernels take plain tensors, and the layout hooks never fire
            raise TypeError(f"{owner}: the base weight is {describe(base_linear.weight)} (tensor parallelism); several "
                            f"adapters in one batch are not supported on DTensor layers: use a LoRALinear per adapter "
                            f"(inject_lora / load_peft_adapter after parallelize_module), or the serving ops lk.ops.* "
                            f"on each rank's plain shards")
        max_adapters = positive_int("MultiLoRALinear", "max_adapters", max_adapters)
        max_rank = positive_int("MultiLoRALinear", "max_rank", max_rank)
        check_backend_name("MultiLoRALinear", backend)
        if backend == "reference" and is_subclass_weight(base_linear.weight):  # refused now, not at the forward
            refuse_subclass_weight_backend(owner, backend, base_linear.weight, MULTI_SUBCLASS_WEIGHT_USE)
        if adapter_dtype is not None and adapter_dtype not in FLOAT_DTYPES:
            raise TypeError(f"MultiLoRALinear: adapter_dtype expected None or a floating torch.dtype "
                            f"(float32/float16/bfloat16/float64), got {adapter_dtype!r}")
        warn_dropped_hooks(op, what, base_linear, "MultiLoRALinear keeps it as base_layer but reads its weight and "
                           "never calls it", replaced=False)
        self.base_layer = base_linear
        self.max_adapters, self.max_rank, self.backend = max_adapters, max_rank, backend
        self._in_features, self._out_features = in_features, out_features
        self.batch_adapters = None  # a BatchAdapterIds while set_batch_adapters is in effect
        self._recent_forward_slot_ids = ()  # of the forwards that read batch_adapters (see _RECENT_FORWARDS)
        self._exact_scalings = {}  # slot -> the scaling set_adapter stored, as given (see _apply)
        weight = base_linear.weight
        # None follows the base weight: load_peft_adapter makes meta slots anew in the dtype of a base weight loaded
        # since (load_state_dict(..., assign=True) keeps the checkpoint's dtype)
        self._requested_adapter_dtype = adapter_dtype
        factory = {"device": weight.device, "dtype": adapter_dtype or weight.dtype}
        self.lora_a = nn.Parameter(torch.zeros(max_adapters, max_rank, in_features, **factory), requires_grad=False)
        self.lora_b = nn.Parameter(torch.zeros(max_adapters, out_features, max_rank, **factory), requires_grad=False)
        self.register_buffer("scalings", torch.zeros(max_adapters, dtype=self._scalings_dtype(), device=weight.device))
        self.register_buffer("ranks", torch.zeros(max_adapters, dtype=torch.int32, device=weight.device))
        self.train(base_linear.training)
        base_linear.requires_grad_(False)  # last: a failed allocation above leaves the base layer as it was

    def _scalings_dtype(self):
        """float64 where the base weight or the slots are float64 (multi_lora_linear reads float64 scalings for a
        float64 x: float32 ones left outputs and gradients 3e-8 off for a scaling such as 3/sqrt(6), against design
        §7's 1e-10), float32 elsewhere, the array the kernels read as it is."""
        wide = torch.float64 in (self.base_layer.weight.dtype, self.lora_a.dtype)
        return torch.float64 if wide else torch.float32

    def _apply(self, fn, recurse=True):
        # .half() / .bfloat16() / .to(dtype) cast every floating buffer: scalings would round (16/24 -> 0.66797 in
        # bfloat16, +0.2% on every delta of that adapter) and the result would depend on whether the model was
        # converted before or after prepare. Keep their dtype and let the conversion move them (device, to_empty);
        # then widen or narrow them to what the converted layer computes in.
        scalings = self._buffers.get("scalings")

        def keep_scalings_dtype(tensor):
            result = fn(tensor)
            if tensor is scalings and result.dtype != tensor.dtype:
                result = tensor.to(device=result.device)
            return result

        computed_in = self._scalings_dtype()
        module = super()._apply(keep_scalings_dtype, recurse)
        scalings = self._buffers.get("scalings")
        # only after a conversion of the layer's dtype: any other _apply (share_memory(), a move) keeps the buffer
        # it made, even one whose dtype no longer follows the layer (a float32 state dict assigned into it)
        wanted = self._scalings_dtype()
        if wanted != computed_in and scalings is not None and scalings.dtype != wanted:
            self._buffers["scalings"] = self._widened_exactly(scalings, wanted)
        return module

    def _given_scaling(self, slot):
        """The scaling set_adapter stored in `slot`, as it was given, while the slot still holds it (see
        _widened_exactly); else None."""
        given = getattr(self, "_exact_scalings", {}).get(slot)  # a pickle from before it has none
        if given is not None and float(torch.tensor(given, dtype=self.scalings.dtype)) == float(self.scalings[slot]):
            return given
        return None

    def _widened_exactly(self, scalings, dtype):
        """scalings in dtype, where a slot still holds the value set_adapter stored, the scaling it was given:
        widened, the float32 value of a scaling such as 2/3 left a float64 model's outputs 7e-7 off (against design
        §7's 1e-10) where the model was converted after its adapters were loaded, not before."""
        widened = scalings.to(dtype)
        exact = getattr(self, "_exact_scalings", {})  # a pickle from before it has none
        if not exact or not has_host_values(scalings) or torch.finfo(dtype).bits <= torch.finfo(scalings.dtype).bits:
            return widened
        slots = torch.tensor(list(exact), device=scalings.device)
        given = torch.tensor(list(exact.values()), dtype=dtype, device=scalings.device)
        # a slot cleared, reset or loaded from a state dict since holds another value: widened as it is
        still_set = scalings[slots] == given.to(scalings.dtype)
        widened[slots] = torch.where(still_set, given, widened[slots])
        return widened

    @property
    def in_features(self):
        return self._in_features

    @property
    def out_features(self):
        return self._out_features

    @property
    def weight(self):
        """The base layer's weight as it stores it, for model code that reads `<layer>.weight` (T5's feed-forward
        casts to `wo.weight.dtype`), as PEFT's layers expose it."""
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def base_weight(self):
        """The base weight as [out, in] (a transposed view of a Conv1D's [in, out] weight)."""
        weight = self.base_layer.weight
        if not isinstance(weight, torch.Tensor):  # the forward said "weight expected a torch.Tensor, got method"
            raise TypeError(f"MultiLoRALinear: base_layer expected the nn.Linear or Conv1D it was prepared with, got "
                            f"a {type(self.base_layer).__module__}.{type(self.base_layer).__name__} whose weight is a "
                            f"{type(weight).__name__} (swapped in by a quantizer such as quantize_dynamic?)")
        return weight.T if self.fan_in_fan_out else weight

    def _check_slot(self, op, slot):
        """slot as a Python int; numpy's integers too (numbers.Integral), as lk.ops takes them, not bools."""
        if isinstance(slot, bool) or not isinstance(slot, numbers.Integral) or not 0 <= slot < self.max_adapters:
            raise ValueError(f"{op}: slot expected an int in [0, {self.max_adapters}), got {slot!r}")
        return int(slot)

    def _slot_tensors(self):
        return [(name, getattr(self, name)) for name in ("lora_a", "lora_b", "scalings", "ranks")]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A rank past max_rank or a non-finite scaling, which set_adapter refuses, loaded without a word and only
        # the next forward refused it. Reported as torch reports a shape mismatch (an error after the load), the
        # slots left as they were: their four tensors describe the adapters together.
        def bad_slots(key, is_bad, expected):
            tensor = state_dict.get(prefix + key)
            if (not isinstance(tensor, torch.Tensor) or tensor.dim() != 1 or not has_host_values(tensor)
                    or is_dtensor(tensor)):
                return  # torch reports a wrong shape; meta or sharded values are not read
            slots = is_bad(tensor).nonzero().flatten().tolist()
            if slots:
                shown = ", ".join(f"{tensor[i].item()} in slot {i}" for i in slots[:4])
                problems.append(f"{key} expected {expected}, got {shown}{', ...' if len(slots) > 4 else ''}")

        def bad_ranks(ranks):
            bad = (ranks < 0) | (ranks > self.max_rank)
            return bad | (ranks != ranks.trunc()) if ranks.dtype.is_floating_point else bad  # NaN, 2.5

        problems = []
        bad_slots("ranks", bad_ranks, f"integers in [0, {self.max_rank}]")
        # finite in the slots' dtype, which they are cast to (float64 1e39 is inf in float32)
        bad_slots("scalings", lambda scalings: ~torch.isfinite(scalings.to(self.scalings.dtype)),
                  f"finite numbers in the range of the slots' {self.scalings.dtype}")
        if problems:
            error_msgs.append(f"MultiLoRALinear{f' {prefix[:-1]!r}' if prefix else ''}: in the state dict, "
                              f"{'; '.join(problems)} (as set_adapter takes them); its slots (lora_a, lora_b, "
                              f"scalings, ranks) not loaded")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def set_adapter(self, slot, lora_a, lora_b, scaling):
        """Loads one adapter (lora_a [r, K], lora_b [N, r], any r <= max_rank) into `slot`. Everything is checked
        and the padded slot rows are built before the slot is written, so a failure leaves the slot as it was."""
        op = "MultiLoRALinear.set_adapter"
        slot = self._check_slot(op, slot)
        for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.dim() != 2:
                desc = (f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor)
                        else type(t).__name__)
                raise TypeError(f"{op}: {name} expected a 2-D floating tensor, got {desc}")
            check_dense(op, name, t)  # failed in the copy below, naming neither
        rank = lora_a.shape[0]
        if not 1 <= rank <= self.max_rank or lora_a.shape[1] != self.in_features:
            raise ValueError(f"{op}: lora_a expected shape [r, {self.in_features}] with 1 <= r <= {self.max_rank}, "
                             f"got {tuple(lora_a.shape)}")
        if tuple(lora_b.shape) != (self.out_features, rank):
            raise ValueError(f"{op}: lora_b expected shape [{self.out_features}, {rank}], got {tuple(lora_b.shape)}")
        try:
            if isinstance(scaling, (str, bytes)) or is_boolean(scaling):  # float("2.0") would take a string
                raise TypeError
            scaling = float(scaling)  # a number, or a one-element tensor
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{op}: scaling expected a number, got {scaling!r}") from None
        except OverflowError:  # an int past float's range (10**400)
            scaling = math.inf
        if not math.isfinite(scaling):
            raise ValueError(f"{op}: scaling expected a finite number, got {scaling!r}")
        if abs(scaling) > torch.finfo(self.scalings.dtype).max:  # the slot's store below would fail half-way
            raise ValueError(f"{op}: scaling expected a finite number in the range of the slots' "
                             f"{self.scalings.dtype}, got {scaling!r}")
        self._refuse_sharded_slots(op)
        for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):  # failed in the copy below, naming neither
            if t.is_meta and not self.lora_a.is_meta:
                raise ValueError(f"{op}: {name} expected a tensor holding values, got one on the meta device")
        if self.lora_a.is_meta and not (lora_a.is_meta and lora_b.is_meta):
            # the copy into a meta slot is a no-op: the adapter was dropped without a word (load_peft_adapter
            # makes the slots on the base weight's device first). to_empty() alone leaves every slot's rank and
            # scaling uninitialised: reset_parameters() clears them (and re-initialises the base layer)
            raise ValueError(f"{op}: the layer's slots are on the meta device (the model was built there), which "
                             f"holds no values, so the adapter would be dropped; materialise the layer first "
                             f"(to_empty(), then reset_parameters() to clear every slot, then load the base "
                             f"weights), or load the adapter with load_peft_adapter")
        refuse_inference_tensor_writes(op, self._slot_tensors())
        padded_a = torch.zeros_like(self.lora_a[slot])
        padded_a[:rank] = lora_a.to(padded_a)
        padded_b = torch.zeros_like(self.lora_b[slot])
        padded_b[:, :rank] = lora_b.to(padded_b)
        refuse_overflowed_copy(op, "lora_a", lora_a, padded_a[:rank], "make the layer with a wider adapter_dtype")
        refuse_overflowed_copy(op, "lora_b", lora_b, padded_b[:, :rank], "make the layer with a wider adapter_dtype")
        with _SLOT_LOCK:
            self.lora_a[slot].copy_(padded_a)
            self.lora_b[slot].copy_(padded_b)
            self.scalings[slot] = scaling
            self.__dict__.setdefault("_exact_scalings", {})[slot] = scaling  # a pickle from before it has none
            self.ranks[slot] = rank

    def _refuse_sharded_slots(self, op):
        """TypeError when fully_shard (FSDP2) split the stacked slots over the ranks: `lora_a[slot]` is then a gathered
        copy, so writing one slot failed in torch ("mixed torch.Tensor and DTensor"), naming nothing, or (zero_())
        changed only the copy. Slots that a unit holds unsharded after a forward are resharded first
        (reshard_fsdp2_units)."""
        reshard_fsdp2_units(self)
        if is_dtensor(self.lora_a) or is_dtensor(self.lora_b):
            raise TypeError(f"{op}: the layer's slots are {describe(self.lora_a)} (sharded by fully_shard); set, "
                            f"load, clear or delete adapters before sharding the model")

    @torch.no_grad()
    def reset_parameters(self):
        """Re-initialises the base layer (its reset_parameters(); a transformers Conv1D, which has none, as its
        constructor does: weight ~ N(0, 0.02), bias zeros) and clears every slot (rank 0, scaling 0, zero
        factors), as after construction: what meta-device flows call after to_empty(), which leaves the ranks and
        scalings buffers uninitialised. A name -> slot table the model holds (lora_adapter_slots) is not changed:
        load the adapters again. Refused for a tensor-subclass (quantized) base weight."""
        reshard_fsdp2_units(self)
        base = self.base_layer
        refuse_subclass_reset("MultiLoRALinear.reset_parameters", base.weight, "clear_adapter(slot) to clear a slot")
        refuse_inference_tensor_writes("MultiLoRALinear.reset_parameters",
                                       [("weight", base.weight), *self._slot_tensors()])
        if callable(getattr(base, "reset_parameters", None)):
            base.reset_parameters()
        else:
            nn.init.normal_(base.weight, std=0.02)
            if getattr(base, "bias", None) is not None:
                nn.init.zeros_(base.bias)
        with _SLOT_LOCK:
            self.lora_a.zero_()
            self.lora_b.zero_()
            self.scalings.zero_()
            self.ranks.zero_()

    @torch.no_grad()
    def clear_adapter(self, slot):
        """Empties a slot (rank 0, zero factors): its tokens get the base output until set_adapter fills it."""
        slot = self._check_slot("MultiLoRALinear.clear_adapter", slot)
        self._refuse_sharded_slots("MultiLoRALinear.clear_adapter")
        refuse_inference_tensor_writes("MultiLoRALinear.clear_adapter", self._slot_tensors())
        with _SLOT_LOCK:
            self.ranks[slot] = 0
            self.scalings[slot] = 0.0
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()

    def forward(self, x, adapter_ids=None):
        """x: [..., K]; adapter_ids: integer tensor shaped like x.shape[:-1], or a LoRABatch built for x's tokens;
        None takes the per-row slots of set_batch_adapters (one LoRABatch per input shape, shared by all layers)."""
        if torch.compiler.is_dynamo_compiling():  # a traced graph cannot hold a Python lock (see _disable_lock)
            return self._resolve_and_forward(x, adapter_ids)
        # set_batch_adapters' slot ids are read under the lock too: read before it, a delete of their name and a load
        # of another adapter into the freed slot in between made the rows of the deleted name compute the new adapter
        with _SLOT_LOCK:
            return self._resolve_and_forward(x, adapter_ids)

    def _resolve_and_forward(self, x, adapter_ids):
        if adapter_ids is None:
            state = self.batch_adapters
            compiling = torch.compiler.is_compiling()  # traced code keeps no Python state (the ids are an input)
            recomputing = not compiling and torch._C._current_graph_task_id() != -1
            if state is None:
                if recomputing:
                    raise RuntimeError(f"MultiLoRALinear: {_RECOMPUTE} with no set_batch_adapters in effect; "
                                       f"{_RECOMPUTE_UNDER_THE_SAME_NAMES}")
                raise RuntimeError("MultiLoRALinear: forward(x) without adapter_ids needs the per-row adapters set "
                                   "first: `with lora_kernels.set_batch_adapters(model, adapter_names): model(...)`")
            rows = state.rows  # read once: a load or delete by name in another thread replaces it whole
            if not compiling:
                recent = self._recent_forward_slot_ids  # a tuple, replaced whole: other threads read it whole
                if recomputing and rows.slot_ids not in recent:
                    raise RuntimeError(f"MultiLoRALinear: {_RECOMPUTE} under adapter names {state.names!r}, which no "
                                       f"recent forward ran with; {_RECOMPUTE_UNDER_THE_SAME_NAMES}")
                if not recomputing and (not recent or recent[-1] != rows.slot_ids):
                    self._recent_forward_slot_ids = (*recent[1 - _RECENT_FORWARDS:], rows.slot_ids)
            state.check_rows(tuple(x.shape[:-1]))
            if not rows.any_adapter and not (torch.is_grad_enabled() and (self.lora_a.requires_grad
                                                                          or self.lora_b.requires_grad)):
                # No row has an adapter, as the names say on the host: multi_lora_linear's base GEMM alone, without
                # the grouped ops (their checks and launches cost more than a decode-size base GEMM: a serving
                # stack's "no LoRA" flag). Slots being trained still get their zero gradients below.
                return multi_lora_base_linear(x, self.base_weight(), self.base_layer.bias, backend=self.backend)
            adapter_ids = state.batch_for(x, self.max_adapters, rows)
        return self._forward(x, adapter_ids)

    def _forward(self, x, adapter_ids):
        # adapter_dtype slots in their own dtype: multi_lora_linear_float32_factors casts them for the kernels
        return multi_lora_linear_float32_factors(x, self.base_weight(), self.lora_a, self.lora_b, adapter_ids,
                                                 self.scalings, self.base_layer.bias, ranks=self.ranks,
                                                 backend=self.backend)

    def extra_repr(self):
        # getattr: a base layer a quantizer swapped in may hold a method as its weight (its forward says so)
        own_dtype = self.lora_a.dtype == getattr(self.base_layer.weight, "dtype", self.lora_a.dtype)
        return (f"in_features={self.in_features}, out_features={self.out_features}, max_adapters={self.max_adapters}, "
                f"max_rank={self.max_rank}{', fan_in_fan_out=True' if self.fan_in_fan_out else ''}, "
                f"{'' if own_dtype else f'adapter_dtype={self.lora_a.dtype}, '}backend={self.backend!r}")


# ------------------------------------------------------------------------------------------------- model utilities

LORA_WRAPPERS = (LoRALinear, MultiLoRALinear)


def _matches(name, target_modules):
    """PEFT's rule: a str is a regex that must match the whole module name; a list matches a name equal to an entry
    or ending in "." + entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def _layer_index_matches(name, layers_to_transform, layers_pattern):
    """PEFT's layers_to_transform rule: the first numbered segment after `layers_pattern` (any segment when no
    pattern is given) must be one of the indices (or equal the one int)."""
    if layers_pattern is None or len(layers_pattern) == 0:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(layers_pattern_regex(pattern), name)
            if match is not None:
                break
    # a pattern with an alternation ("layers|h") can match through a branch without the index group: no index, as
    # PEFT reads it (int(None) was a bare TypeError)
    if match is None or match.group("idx") is None:
        return False
    index = int(match.group("idx"))
    return index == layers_to_transform if isinstance(layers_to_transform, int) else index in layers_to_transform


def modules_to_save_regex(entry):
    """The regex PEFT matches a module name against a modules_to_save entry with, to leave that module LoRA-free."""
    return rf"(^|.*\.){entry}($|\..*)"


def in_modules_to_save(name, modules_to_save):
    """PEFT's rule: a module named by modules_to_save, or inside one (a whole name component), gets no LoRA."""
    return bool(modules_to_save) and any(re.match(modules_to_save_regex(entry), name) for entry in modules_to_save)


def target_module_matches(name, target_modules, exclude_modules=None, layers_to_transform=None, layers_pattern=None,
                          modules_to_save=None):
    """Whether PEFT (`check_target_module_exists`) would put a LoRA on the module called `name`: not excluded
    (exclude_modules: regex str or list of names/suffixes), not in a modules_to_save module, matched by
    target_modules (regex str over the whole name, or list of names/suffixes), and, for a list only, in
    layers_to_transform (int or list of layer indices)."""
    if (exclude_modules and _matches(name, exclude_modules)) or in_modules_to_save(name, modules_to_save):
        return False
    if not _matches(name, target_modules):
        return False
    if isinstance(target_modules, str) or name in target_modules:
        return True
    using_indices = layers_to_transform is not None and (
        len(layers_to_transform) != 0 if isinstance(layers_to_transform, (list, tuple)) else True)
    return not using_indices or _layer_index_matches(name, layers_to_transform, layers_pattern)


def pattern_key_regex(key):
    """The regex PEFT matches a rank_pattern / alpha_pattern key as (get_pattern_key)."""
    return rf"(.*\.)?({key})$"


def layers_pattern_regex(pattern):
    """The regex PEFT finds the layer index after a layers_pattern with."""
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


def regex_error(pattern, matched_as=None):
    """None when `pattern` compiles, alone and inside the regex it is matched as (`matched_as(pattern)`); else why
    not. A key with inline flags ("(?i)v_proj") compiles alone but not inside PEFT's lookup regex."""
    try:
        re.compile(pattern)
    except re.error as exc:
        return str(exc)
    if matched_as is not None:
        try:
            re.compile(matched_as(pattern))
        except re.error as exc:
            return f"{exc}, inside {matched_as(pattern)!r}, the regex it is matched as"
    return None


def pattern_value(pattern, name, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the value of the first key (in dict order) whose pattern_key_regex
    matches `name`; else the value of the key equal to `name` (PEFT's get_pattern_key falls back to the name itself:
    a module name such as "blocks.a+b" is no regex of itself), else `default`."""
    pattern = pattern or {}
    for key, value in pattern.items():
        if re.match(pattern_key_regex(key), name):
            return value
    return pattern.get(name, default)


def embedding_layer(model, getter):
    """model.<getter>() (transformers' get_input_embeddings / get_output_embeddings), or None where the model has
    none (another nn.Module, or a transformers model without one, which raises)."""
    get = getattr(model, getter, None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def is_layer_index(value):
    """A layers_to_transform entry: an int >= 0 (numpy integers too, as PEFT takes them)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def check_regex(op, name, pattern, matched_as=None):
    """ValueError naming the argument when `pattern` is not a valid regular expression, alone or inside the regex it
    is matched as (regex_error; re.error, which is neither a ValueError nor names the argument, came out of the
    matching otherwise)."""
    error = regex_error(pattern, matched_as)
    if error is not None:
        raise ValueError(f"{op}: {name} {pattern!r} is not a valid regular expression ({error})")


def _check_names(op, name, value):
    """A regex string, or a list of module names (each a non-empty str)."""
    if isinstance(value, str):
        check_regex(op, name, value)
        return
    bad = next((entry for entry in value if not isinstance(entry, str) or not entry), None)
    if bad is not None:
        raise TypeError(f"{op}: {name} expected a regex string or a list of module names (str), got the entry "
                        f"{bad!r} in {value!r}")


# Components that wrappers insert into module names and that their state_dict hooks take out of the keys again:
# torch's activation-checkpoint wrapper (checkpoint_wrapper / offload_wrapper, as apply_activation_checkpointing puts
# them in: the FSDP recipes of torchtitan and accelerate) and FullyShardedDataParallel (FSDP1). PEFT names its keys
# after the state dict, so target matching and the adapter files use the names without them.
WRAPPED_MODULE_COMPONENTS = ("_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def state_dict_name(name):
    """A module's name as the model's state dict (and PEFT's adapter files) spell it: the wrappers' components
    removed ("layers.0._checkpoint_wrapped_module.q" is "layers.0.q")."""
    if "_wrapped_module" not in name:  # the common case, cheaply
        return name
    return ".".join(part for part in name.split(".") if part not in WRAPPED_MODULE_COMPONENTS)


def is_name_wrapper(module):
    """Whether module is such a wrapper: the module inside it has its name in the state dict, and is the one that
    target matching selects and a LoRA layer replaces."""
    return any(component in module._modules for component in WRAPPED_MODULE_COMPONENTS)


def named_target_modules(model, target_modules, exclude_modules=None, *, layers_to_transform=None,
                         layers_pattern=None, modules_to_save=None, op="inject_lora"):
    """[(name, module)] of every module whose full name PEFT would target, in model order. Does not look inside
    LoRALinear/MultiLoRALinear (their factors and base layer are not targets; the wrapper itself is). Names are
    matched as the state dict spells them (state_dict_name) and returned as the model's.
    target_modules="all-linear" takes every nn.Linear/Conv1D but the model's output layer, as PEFT."""
    if not isinstance(target_modules, (str, list, tuple, set)) or not target_modules:
        raise ValueError(f"{op}: target_modules expected a regex string or a non-empty list of names, "
                         f"got {target_modules!r}")
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    if isinstance(exclude_modules, (tuple, set)):
        exclude_modules = list(exclude_modules)
    if exclude_modules is not None and not isinstance(exclude_modules, (str, list)):
        raise TypeError(f"{op}: exclude_modules expected a regex string or a list of names, got {exclude_modules!r}")
    _check_names(op, "target_modules", target_modules)
    if exclude_modules is not None:
        _check_names(op, "exclude_modules", exclude_modules)
    if layers_to_transform is not None:  # as plain ints: PEFT takes numpy integers and ranges too
        if is_layer_index(layers_to_transform):
            layers_to_transform = int(layers_to_transform)
        elif isinstance(layers_to_transform, (list, tuple, range)) and all(map(is_layer_index, layers_to_transform)):
            layers_to_transform = [int(i) for i in layers_to_transform]
        else:
            raise TypeError(f"{op}: layers_to_transform expected an int or a list of ints >= 0, "
                            f"got {layers_to_transform!r}")
    if layers_pattern is not None:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"{op}: layers_pattern expected a str or a list of str, got {layers_pattern!r}")
        for pattern in patterns:
            check_regex(op, "layers_pattern", pattern, layers_pattern_regex)
    # PEFT's LoraConfig refuses these pairs; its matcher would ignore the layer options, and so did this one.
    for option, value in (("layers_to_transform", layers_to_transform), ("layers_pattern", layers_pattern)):
        if value is not None and isinstance(target_modules, str):
            raise ValueError(f"{op}: {option} cannot be used with target_modules given as a string "
                             f"({target_modules!r}: a regex, or 'all-linear'), as in PEFT; list the module names")
    if layers_pattern and layers_to_transform is None:
        raise ValueError(f"{op}: layers_pattern {layers_pattern!r} needs layers_to_transform (as in PEFT)")
    all_linear = isinstance(target_modules, str) and target_modules.lower() == "all-linear"
    output_layer = embedding_layer(model, "get_output_embeddings") if all_linear else None
    found, wrapper_prefixes = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in wrapper_prefixes):
            continue
        if isinstance(module, LORA_WRAPPERS):
            wrapper_prefixes.append(name + ".")
        key_name = state_dict_name(name)
        if is_name_wrapper(module) or not key_name:
            continue
        if all_linear:
            linear_like = isinstance(module, (nn.Linear, *LORA_WRAPPERS)) or is_conv1d(module)
            hit = (linear_like and module is not output_layer
                   and not (exclude_modules and _matches(key_name, exclude_modules))
                   and not in_modules_to_save(key_name, modules_to_save))
        else:
            hit = target_module_matches(key_name, target_modules, exclude_modules, layers_to_transform,
                                        layers_pattern, modules_to_save)
        if hit:
            found.append((name, module))
    return found


_LEAVE_OUT_HINT = "; or leave it out of the targets (exclude_modules)"


def refuse_peft_model(op, model):
    """TypeError when `model` is or holds a PEFT module (a PeftModel, its LoRA layers). Only a matched PEFT layer was
    refused before: "all-linear" then put LoRALinears inside PEFT's layers (on their base_layer and lora_A/lora_B),
    and other targets froze PEFT's adapter with the rest of the model, silently (helper 118)."""
    for name, module in model.named_modules():
        if type(module).__module__.startswith("peft."):
            where = f"module {name!r} is" if name else "the model is"
            raise TypeError(f"{op}: {where} a PEFT module ({type(module).__name__}); pass the base model, not a "
                            f"PeftModel (PEFT's merge_and_unload() gives it back with its adapter merged)")


# layers PEFT puts a LoRA on (Whisper's and ViT's convolutions, embeddings) that a LoRALinear cannot stand in for
PEFT_ONLY_LAYERS = (nn.modules.conv._ConvNd, nn.Embedding)
_PEFT_ONLY_HINT = " (PEFT's LoRA on convolution and embedding layers is not supported here)"


def refuse_uninitialised_modules(op, model):
    """ValueError naming lazy modules not run yet: a model edit freezes every parameter, which failed in torch's
    "uninitialized parameter" error, naming no module."""
    lazy = [name for name, module in model.named_modules()
            if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters(recurse=False))]
    if lazy:
        raise ValueError(f"{op}: modules {lazy[:3]}{' ...' if len(lazy) > 3 else ''} have uninitialised parameters "
                         f"(nn.LazyLinear and other lazy modules take their shapes from the first input): run one "
                         f"forward first; the model is unchanged")


def find_target_linears(model, target_modules, exclude_modules=None, op="inject_lora", *, layers_to_transform=None,
                        layers_pattern=None, modules_to_save=None, replaced=True):
    """[(name, module)] of the nn.Linear and transformers Conv1D modules that target_modules selects. A matched
    module of another type is a TypeError, one that already holds a LoRA a ValueError. Two kinds of matched linear
    layer are left out with one warning: an nn.MultiheadAttention's out_proj (it reads the weight and never calls
    the layer, so a LoRA there would be ignored; SigLIP's pooling head, matched by "all-linear" or a CLIP-style
    "out_proj" entry), and under "all-linear" the layers check_wrappable_linear refuses when named (nn.Linear
    subclasses with a forward of their own, such as MoE routers that return scores and indices or fake-quant
    layers; parametrized weights; weights of another dtype or a sparse layout; a Conv1D's quantized weight)."""
    refuse_peft_model(op, model)
    refuse_uninitialised_modules(op, model)
    all_linear = isinstance(target_modules, str) and target_modules.lower() == "all-linear"
    found, skipped = [], []
    for name, module in named_target_modules(model, target_modules, exclude_modules, op=op,
                                             layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
                                             modules_to_save=modules_to_save):
        if isinstance(module, LORA_WRAPPERS):
            raise ValueError(f"{op}: module {name!r} already has a LoRA adapter ({type(module).__name__})")
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise TypeError(f"{op}: module {name!r} matches target_modules but is a {type(module).__name__}; "
                            f"only nn.Linear and transformers' Conv1D (GPT-2's linear layer) can be wrapped"
                            f"{_PEFT_ONLY_HINT if isinstance(module, PEFT_ONLY_LAYERS) else ''}")
        if is_attention_out_proj(model, name):
            skipped.append(f"{name!r} ({ATTENTION_OUT_PROJ})")
            continue
        if all_linear:
            try:
                check_wrappable_linear(op, f"module {name!r}", module, replaced=replaced)
            except TypeError:
                skipped.append(f"{name!r} (a {type(module).__name__}: its own forward, a computed weight, a "
                               f"weight of another dtype or layout, a quantized Conv1D weight, or other "
                               f"tensors besides weight and bias)")
                continue
        check_no_accelerate_hook(op, name, module)
        check_no_offloading_ancestor(op, model, name)
        if not all_linear:  # under "all-linear" checked above, where a refusal leaves the layer out
            check_wrappable_linear(op, f"module {name!r}", module, _LEAVE_OUT_HINT, replaced=replaced)
        found.append((name, module))
    if skipped:
        shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        warn_at_caller(f"{op}: left out {len(skipped)} matched layer(s) a LoRA layer cannot stand in for: {shown}")
    if not found:
        hint = ""
        if (isinstance(target_modules, str) and not all_linear
                and any(name.endswith("." + target_modules) for name, _ in model.named_modules())):
            hint = (f"; a str is a regex over the whole module name (PEFT's rule): for the layers named "
                    f"{target_modules!r} pass a list, [{target_modules!r}]")
        if modules_to_save:  # PEFT's rule too: the targets in a head that trains whole get no LoRA, unannounced
            in_heads = [name for name, _ in named_target_modules(
                model, target_modules, exclude_modules, op=op, layers_to_transform=layers_to_transform,
                layers_pattern=layers_pattern) if in_modules_to_save(name, modules_to_save)]
            if in_heads:
                hint += (f"; {in_heads[:3]!r} would match, but are (inside) modules_to_save {modules_to_save!r}, "
                         f"which train whole and get no LoRA, as in PEFT")
        hint += _left_out_hint(model, target_modules, exclude_modules, layers_to_transform, layers_pattern,
                               modules_to_save, op)
        if isinstance(target_modules, (list, tuple)):
            hint += _alias_hint(model, list(target_modules))
        raise ValueError(f"{op}: target_modules {target_modules!r} matched no nn.Linear in the model"
                         f"{' it can wrap' if skipped else ''}{hint}")
    _warn_partial_targets(op, model, target_modules)
    _warn_unused_exclude(op, model, exclude_modules)
    _warn_aliased_targets(op, model, found)
    return found


ATTENTION_OUT_PROJ = "the out_proj of an nn.MultiheadAttention, which reads its weight and never calls it"


def is_attention_out_proj(model, name):
    """Whether module `name` is an nn.MultiheadAttention's out_proj: a LoRA there would be ignored."""
    return isinstance(model.get_submodule(name.rpartition(".")[0]), nn.MultiheadAttention)


def _module_names(model):
    """{id(module): every name it is reachable under, the one named_modules() lists (and PEFT matches) first}: one
    module assigned to two attributes has two names."""
    names = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _warn_aliased_targets(op, model, targets):
    """Warns about a target that is also reachable under other names: it is replaced under the name named_modules()
    lists only, and a forward through the others computes without the adapter, as in PEFT. A name through a shared
    parent (a block listed twice) is no other: the replacement is made in that parent, which both names reach."""
    names = _module_names(model)

    def slot(name):  # the (parent, attribute) a replacement under `name` is set in
        parent, _, child = name.rpartition(".")
        return id(model.get_submodule(parent) if parent else model), child

    for name, module in targets:
        others = [other for other in names[id(module)] if slot(other) != slot(name)]
        if others:
            warn_at_caller(f"{op}: target {name!r} is the same module as {others}; it is replaced under {name!r} "
                           f"only, so a forward through {others[0]!r} computes without the adapter (as in PEFT)")


def _fused_expert_parameters(model):
    """Names of the 3-D Parameters held by mixture-of-experts modules (transformers 5 fuses each layer's experts
    into `experts.gate_up_proj` / `experts.down_proj` [num_experts, ...]): no nn.Linear, so no target here."""
    return [f"{name}.{pname}" for name, module in model.named_modules()
            if name.rpartition(".")[2] == "experts" or type(module).__name__.endswith("Experts")
            for pname, parameter in module.named_parameters(recurse=False) if parameter.dim() == 3]


def _left_out_hint(model, target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save, op):
    """Why targets that exist were all left out, for the error when nothing is wrapped: the error said the
    targets "matched no nn.Linear" where exclude_modules or layers_to_transform had removed every match (PEFT
    says "No modules were targeted ... mismatched target modules and excluded modules", and names
    layers_to_transform)."""
    hint = ""
    if exclude_modules:
        excluded = [name for name, _ in named_target_modules(
            model, target_modules, None, op=op, layers_to_transform=layers_to_transform,
            layers_pattern=layers_pattern, modules_to_save=modules_to_save)]
        if excluded:
            hint += (f"; {excluded[:3]!r}{' ...' if len(excluded) > 3 else ''} would match, but exclude_modules "
                     f"{exclude_modules!r} leaves them out")
    if layers_to_transform is not None:
        other_layers = [name for name, _ in named_target_modules(
            model, target_modules, exclude_modules, op=op, modules_to_save=modules_to_save)]
        if other_layers:
            hint += (f"; {other_layers[:3]!r}{' ...' if len(other_layers) > 3 else ''} would match, but not in "
                     f"layers_to_transform {layers_to_transform!r} (layers_pattern {layers_pattern!r})")
    return hint


def _warn_unused_exclude(op, model, exclude_modules):
    """Warns, as PEFT does ("You have passed exclude_modules=... but no modules were excluded"), when
    exclude_modules names no module of the model: a typo there silently put LoRA layers on the modules it was
    meant to leave out."""
    if not exclude_modules:
        return
    if not any(_matches(state_dict_name(name), exclude_modules) for name, _ in model.named_modules() if name):
        warn_at_caller(f"{op}: exclude_modules {exclude_modules!r} matches no module of the model, so it excludes "
                       f"nothing; check the names")


def _warn_partial_targets(op, model, target_modules):
    """Warns where the adapter is silently smaller than the user (or PEFT) would make it: a list entry that names no
    module while others do (PEFT only raises when nothing matches; a name ported from transformers 4, such as
    Mixtral's "w2", then trains nothing), and "all-linear" on a model with fused 3-D expert weights, which PEFT
    adapts for some models through target_parameters, unsupported here. One pass over the module names."""
    if isinstance(target_modules, str):
        if target_modules.lower() != "all-linear":
            return
        fused = _fused_expert_parameters(model)
        if fused:
            warn_at_caller(f"{op}: target_modules='all-linear' adapts nn.Linear/Conv1D layers only; the model's fused "
                           f"expert weights ({fused[:2]}{' ...' if len(fused) > 2 else ''}: 3-D Parameters, not "
                           f"layers) get no LoRA. PEFT adapts them for some models (target_parameters, e.g. Mixtral "
                           f"under transformers 5), which lora_kernels does not support, so this adapter is smaller "
                           f"than PEFT's")
        return
    entries = list(dict.fromkeys(target_modules))
    names = [state_dict_name(name) for name, _ in model.named_modules() if name]  # the names targets are matched by
    missing = [entry for entry in entries if not any(n == entry or n.endswith("." + entry) for n in names)]
    if missing:
        fused = _fused_expert_parameters(model)
        hint = (f"; the model's experts are fused 3-D Parameters ({fused[0]!r} ...), which hold no per-expert "
                f"layers to target (PEFT's target_parameters, unsupported here)" if fused else "")
        warn_at_caller(f"{op}: target_modules entries {missing} match no module of the model (the others do), so they "
                       f"add no LoRA layer{hint}{_alias_hint(model, missing)}")


def _alias_hint(model, entries):
    """For entries that name a module only under a second name (_module_names): its first name, to target
    instead."""
    found = {}
    for first, *others in _module_names(model).values():
        for name in others:
            entry = next((e for e in entries if name == e or name.endswith("." + e)), None)
            if entry is not None:
                found.setdefault(entry, first)
    return "".join(f"; {entry!r} is a second name of module {name!r}: target that name"
                   for entry, name in found.items())


MODULES_TO_SAVE_ATTR = "lora_modules_to_save"  # on the model: the modules_to_save names its adapter trains and saves


def selected_modules_to_save(model, modules_to_save, whole_components=True):
    """[(name, module)] that the modules_to_save entries select (named_modules_to_save's rule), unchecked.
    whole_components=False: PEFT <= 0.21's plain suffix test instead ("proj" also selects "q_proj"), which the files
    it wrote followed."""
    found, skip_prefixes = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in skip_prefixes) or is_name_wrapper(module):
            continue
        key_name = state_dict_name(name)
        selected = bool(key_name) and (_matches(key_name, list(modules_to_save)) if whole_components
                                       else any(key_name.endswith(entry) for entry in modules_to_save))
        if selected:
            found.append((name, module))
        if selected or isinstance(module, LORA_WRAPPERS):
            skip_prefixes.append(name + ".")  # nothing inside a selected module or a LoRA layer is selected again
    return found


def suffix_only_modules_to_save(model, modules_to_save):
    """[(name, module)] whose state-dict name ends with a modules_to_save entry, but not as whole name components:
    PEFT <= 0.21 selected them, PEFT >= 0.22 and lora_kernels do not. Those inside a selected module are left out."""
    if not modules_to_save:  # inject_lora without modules_to_save: no second walk over the model
        return []
    selected = [name + "." for name, _ in selected_modules_to_save(model, modules_to_save)]
    return [(name, module) for name, module in selected_modules_to_save(model, modules_to_save, whole_components=False)
            if not any((name + ".").startswith(prefix) for prefix in selected)]


def named_modules_to_save(model, modules_to_save, op):
    """[(name, module)] that PEFT's modules_to_save selects: modules whose full name (as the state dict spells it)
    ends with an entry as whole name components ("score" selects "score" and "model.score", not "prescore"; PEFT's
    rule since 0.22, before which it tested a plain suffix), the outermost of nested matches, none inside a LoRA
    wrapper. Such a module is trained and saved whole beside the adapter (PEFT adds the classification head of SEQ_CLS
    models this way); LoRA targets never lie inside one (in_modules_to_save). A module that holds a LoRA layer
    already, shares a parameter with the rest of the model (tied weights: changing it would change both) or carries
    an accelerate hook is a ValueError."""
    if (not isinstance(modules_to_save, (list, tuple)) or not modules_to_save
            or not all(isinstance(n, str) and n for n in modules_to_save)):
        raise ValueError(f"{op}: modules_to_save expected a non-empty list of module names, got {modules_to_save!r}")
    found = selected_modules_to_save(model, modules_to_save)
    owners = _parameter_names(model)
    for name, module in found:
        inside = name + "."
        lora = [f"{name}.{n}".rstrip(".") for n, m in module.named_modules() if isinstance(m, LORA_WRAPPERS)]
        if lora:
            raise ValueError(f"{op}: modules_to_save selects module {name!r}, which holds the LoRA layer {lora[0]!r}; "
                             f"a module is either trained whole or given a LoRA, not both")
        for sub_name, sub in module.named_modules():
            check_no_accelerate_hook(op, f"{name}.{sub_name}".rstrip("."), sub,
                                     why="that swaps the module's weights in and out around each forward (a "
                                         "modules_to_save module must hold the weights it trains or loads)")
        for parameter in module.parameters():
            outside = [n for n in owners[id(parameter)] if not n.startswith(inside)]
            if outside:
                raise ValueError(f"{op}: modules_to_save selects module {name!r}, whose parameter is tied to "
                                 f"{outside[0]!r} outside it; training or loading it would change both (untie them "
                                 f"first)")
    return found


def check_targets_outside_heads(op, targets, heads, modules_to_save, file):
    """ValueError when a LoRA target is (or lies inside) a modules_to_save module of an adapter file. LoRA targets
    are kept out of the modules an entry selects by whole name components (in_modules_to_save), but PEFT <= 0.21
    selected modules_to_save by a plain suffix test ("classifier" also selected DistilBERT's "pre_classifier"), and
    a file it wrote holds such a module's state (_split_modules_to_save loads it); PEFT before 0.16 also put a LoRA
    on it. The module would get a LoRA and train whole. file: the weights file, named in the error. Called before the
    model changes."""
    for name, _ in targets:
        for head, _ in heads:
            if name == head or name.startswith(head + "."):
                entry = next(e for e in modules_to_save if state_dict_name(head).endswith(e))
                where = "is" if name == head else "lies inside"
                raise ValueError(f"{op}: module {name!r} is a LoRA target and {where} the modules_to_save module "
                                 f"{head!r}, whose state {file} holds (entry {entry!r}: PEFT <= 0.21 selected "
                                 f"modules_to_save by a plain name suffix); a module is either trained whole or "
                                 f"given a LoRA, not both")


def _warn_suffix_only_modules_to_save(op, model, modules_to_save):
    """Names the modules whose names end with a modules_to_save entry but not as whole name components: not selected
    (PEFT >= 0.22's rule, and ours), where PEFT <= 0.21 selected them (trained whole, or refused the model where one
    holds a LoRA layer), and expects their weights in a saved file (save_peft_adapter warns too)."""
    left_out = [state_dict_name(name) for name, _ in suffix_only_modules_to_save(model, modules_to_save or [])]
    if left_out:
        warn_at_caller(f"{op}: modules_to_save {list(modules_to_save)!r} selects modules by whole name components "
                       f"(PEFT >= 0.22's rule): {left_out[:5]}{' ...' if len(left_out) > 5 else ''} end with an entry "
                       f"but are not selected and train only as targets, if at all; PEFT <= 0.21 selected them by a "
                       f"plain suffix, and cannot read a file saved from this model. Name them in modules_to_save to "
                       f"train them whole", UserWarning)


def _record(model, attr, value):
    """Remembers `value` on the model as `attr` (one of the *_ATTR names), for save_peft_adapter; None forgets it:
    save_peft_adapter reads an absent attribute as the adapter having none (no modules_to_save, bias "none", ...)."""
    if value is not None:
        setattr(model, attr, value)
    elif hasattr(model, attr):
        delattr(model, attr)


# On the model: the state-dict names of the embedding layers whose whole state the adapter file that
# load_peft_adapter read held (PEFT's save_embedding_layers), which save_peft_adapter writes again by default, and of
# the LoRA targets whose base layer it held, which a later load must overwrite as well
EMBEDDING_LAYERS_ATTR = "lora_embedding_layers"


TASK_TYPE_ATTR = "lora_task_type"  # on the model: the task_type of the adapter file load_peft_adapter read


BIAS_MODES = ("none", "lora_only", "all")  # PEFT's LoraConfig.bias, from fewest biases trained to most
BIAS_ATTR = "lora_bias_mode"  # on the model: the bias mode its adapter trains and saves (absent: "none")


def check_bias_mode(op, bias):
    if bias not in BIAS_MODES:
        raise ValueError(f"{op}: bias expected one of {list(BIAS_MODES)}, got {bias!r}")


def trained_biases(model, bias, lora_names, skip=()):
    """[(state-dict key, tensor, LoRA layer name or None)] of the biases that PEFT's bias mode trains and saves:
    "all" every state-dict entry called bias (PEFT's name test, LayerNorm biases included), "lora_only" those of
    the LoRA layers named in `lora_names`, "none" none. Entries inside the modules named in `skip` are left out:
    modules_to_save modules train and save whole anyway. The names are the model's; the keys the state dict's."""
    if bias == "none":
        return []
    lora_names = {state_dict_name(name) for name in lora_names}
    skip = [state_dict_name(name) for name in skip]
    found = []
    for key, tensor in model.state_dict(keep_vars=True).items():
        module, _, leaf = key.rpartition(".")
        if leaf != "bias" or any(key.startswith(f"{name}.") for name in skip):
            continue
        if module in lora_names:
            found.append((key, tensor, module))
        elif bias == "all":
            found.append((key, tensor, None))
    return found


def _train_biases(tensors):
    # PEFT saves buffers called bias under "all" too, but only parameters can train
    for tensor in tensors:
        if isinstance(tensor, nn.Parameter):
            tensor.requires_grad_(True)


def _offloads(hook):
    """Whether an accelerate hook (a SequentialHook's parts included) offloads the weights under it."""
    return bool(getattr(hook, "offload", False)) or any(_offloads(part) for part in getattr(hook, "hooks", ()))


def check_no_offloading_ancestor(op, model, name):
    """Refuses a layer inside a block that accelerate offloads as a whole (cpu_offload or a device_map with "disk" and
    preload_module_classes: the hook sits on the decoder layer, not on the linear): the block's hook loads every
    tensor under it from its offloaded copies by name, and a LoRA layer's factors are not among them (the first
    forward failed inside accelerate with a KeyError)."""
    parts = name.split(".")
    for depth in range(len(parts)):
        prefix = ".".join(parts[:depth])
        hook = getattr(model.get_submodule(prefix), "_hf_hook", None)
        if hook is not None and _offloads(hook):
            raise ValueError(f"{op}: module {name!r} lies inside {prefix or 'the model'!r}, which an accelerate hook "
                             f"({type(hook).__name__}, from cpu_offload or a device_map with \"cpu\"/\"disk\" "
                             f"entries) offloads as a whole, loading its tensors by name for each forward; the LoRA "
                             f"factors would not be among them. Load the model with every weight on a real device and "
                             f"no offloading first")


def check_no_accelerate_hook(op, name, module, why="that a LoRA wrapper would drop"):
    """Refuses a layer that carries an accelerate hook. Offloading (a device_map with "cpu"/"disk", cpu_offload) keeps
    the layer's weight on the meta device and moves it in for each forward through a hook on that very layer (and
    puts device-moving hooks on the other layers); a LoRA wrapper holds the weight itself and replaces the layer,
    so the hook would be dropped and the weight stay meta."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None:
        weight = getattr(module, "weight", None)
        offloaded = "; its weight is on the meta device (offloaded)" if weight is not None and weight.is_meta else ""
        raise ValueError(f"{op}: module {name!r} carries an accelerate hook ({type(hook).__name__}, from a device_map "
                         f"dispatch or offloading) {why}{offloaded}. Load the model with every weight on a real "
                         f"device and no offloading first")


def unwrap_model(model, op, *, adds_parameters=False, ddp_hint=None):
    """The model inside torch.compile's and DistributedDataParallel/DataParallel's wrappers, whose module names are
    the model's own (the wrappers prefix them with `_orig_mod.` / `module.`): the model utilities and the adapter
    files use those names, as PEFT does for a compiled or DDP-wrapped model. Anything but an nn.Module is a
    TypeError naming `op`. An op that adds or replaces parameters (adds_parameters) reshards FSDP2 units first
    (reshard_fsdp2_units) and refuses DDP: DDP took its parameter list when it was built, so new LoRA weights would
    train unsynchronised on each rank; ddp_hint: what to do instead, for the message (default: call op before
    wrapping)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model expected a torch.nn.Module, got {type(model).__name__}")
    while True:
        # a compiled model exists only once dynamo is imported, so plain calls do not pay for importing it
        dynamo = sys.modules.get("torch._dynamo.eval_frame")
        if dynamo is not None and isinstance(model, dynamo.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) and adds_parameters:
            raise ValueError(f"{op}: model is wrapped in DistributedDataParallel, which fixed its parameters when it "
                             f"was built (new or replaced layers would not be synchronised across ranks); "
                             f"{ddp_hint or f'call {op} on the model first, then wrap it'}")
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            if adds_parameters:  # it writes the model's tensors too: into the shards, not unsharded copies
                reshard_fsdp2_units(model)
            return model


def refuse_new_layers_under_fsdp1(op, model):
    """ValueError when `model` is or holds a FullyShardedDataParallel (FSDP1) unit: FSDP1 flattened its parameters
    when it was built, so a LoRA layer made now would hold a view of a flat shard as its weight (outside
    summon_full_params: a 1-D one, which the first forward refused) and factors outside the flat parameter, neither
    sharded nor synchronised. Made before wrapping, the layers are FSDP1's like any other."""
    fsdp1 = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", None)
    units = [] if fsdp1 is None else [name for name, module in model.named_modules() if isinstance(module, fsdp1)]
    if units:
        where = "is" if units[0] == "" else f"holds ({units[0]!r})"
        raise ValueError(f"{op}: the model {where} a FullyShardedDataParallel (FSDP1) unit, which fixed its "
                         f"parameters when it was built (new LoRA layers would be neither sharded nor synchronised); "
                         f"call {op} on the model first, then wrap it")


def enable_input_grads_for_checkpointing(model):
    """As PEFT when it wraps a model: a transformers model with gradient checkpointing on gets its input embeddings'
    output marked as requiring grad. Reentrant checkpointing recomputes (and back-propagates through) a segment only
    when one of its inputs requires grad; with a frozen embedding none does, and every LoRA gradient stays zero.
    Text models' checkpointing does this itself, others (ViT) do not."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers 5 renamed the flag
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if not checkpointing or not hasattr(model, "enable_input_require_grads"):
        return
    if not getattr(model, "_require_grads_hooks", None) and getattr(model, "_require_grads_hook", None) is None:
        try:
            model.enable_input_require_grads()  # once: each call registers another hook
        except NotImplementedError:  # transformers 4's get_input_embeddings, on a model without token embeddings
            warn_at_caller(f"{type(model).__name__} has gradient checkpointing on but no input embeddings to mark as "
                           f"requiring grad; with reentrant checkpointing its LoRA layers may get no gradients "
                           f"(use use_reentrant=False)")


def _set_submodule(model, name, module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _take_transformer_slow_path(module, args):
    """A forward pre-hook that does nothing (keep_transformer_layers_calling_lora)."""
    return None


def keep_transformer_layers_calling_lora(model):
    """nn.TransformerEncoderLayer's inference fast path (eval mode, with grad too: the weights it reads are frozen)
    reads linear1's and linear2's weights and never calls those layers, so their adapter was skipped silently (PEFT's
    too). A do-nothing forward pre-hook on each LoRA layer there keeps torch on the path that calls them (it takes it
    while any submodule has a hook), and an enclosing nn.TransformerEncoder stops turning padded batches into nested
    tensors, which only that fast path reads (a LoRA layer given one failed). Called once a model edit has succeeded;
    merge_and_unload's plain layers, which hold the merged weights, go without the hook."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(isinstance(m, LORA_WRAPPERS) for m in module.modules()):
            module.use_nested_tensor = False
        if isinstance(module, nn.TransformerEncoderLayer):
            for child in module.children():
                if (isinstance(child, LORA_WRAPPERS)
                        and _take_transformer_slow_path not in child._forward_pre_hooks.values()):
                    child.register_forward_pre_hook(_take_transformer_slow_path)


@contextlib.contextmanager
def _rollback_on_error(model):
    """Undoes module replacements (recorded by the body through the yielded list of (name, old_module)) and restores
    every parameter's requires_grad flag when the body raises, so a failed model edit leaves the model as it was."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    replaced = []
    try:
        yield replaced
    except BaseException:
        for name, old in reversed(replaced):
            _set_submodule(model, name, old)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        raise


def _parameter_names(model):
    """{id(parameter): every name it has in model}: a tied parameter has several."""
    names = {}
    for parameter_name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(parameter_name)
    return names


_TIED_LORA_LINEAR = ("the adapter trains as usual, but LoRALinear.merge() would change both (merge_and_unload "
                     "unties them), as PEFT warns")
# transformers re-ties by assigning `lm_head.weight`, which a MultiLoRALinear holds as base_layer.weight
_TIED_MULTI_LORA = ("the slots serve and train as usual, but transformers' tie_weights() and save_pretrained() fail "
                    "on the wrapped layer (its weight is <name>.base_layer.weight there); save adapters with "
                    "save_peft_adapter")


def _warn_tied_targets(op, model, targets, consequence=_TIED_LORA_LINEAR):
    names = _parameter_names(model)
    for name, module in targets:
        tied = [n for n in names.get(id(module.weight), []) if n != f"{name}.weight"
                and model.get_submodule(n.rpartition(".")[0]) is not module]  # an alias: _warn_aliased_targets
        if tied:
            warn_at_caller(f"{op}: the weight of target {name!r} is tied to {tied[0]!r}; {consequence}")


def warn_fan_in_fan_out_corrections(op, fan_in_fan_out, conv1d_by_name):
    """One warning per call for the targets whose fan_in_fan_out flag was corrected, as PEFT's one per model (a
    warning per layer, each naming its layer, was 48 for a GPT-2's "all-linear"). conv1d_by_name: {target name:
    whether it is a transformers Conv1D}."""
    def listed(names):
        return ", ".join(map(repr, names[:3])) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    linear_names = [name for name, conv in conv1d_by_name.items() if not conv] if fan_in_fan_out else []
    conv1d_names = [] if fan_in_fan_out else [name for name, conv in conv1d_by_name.items() if conv]
    if linear_names:
        one = len(linear_names) == 1
        warn_at_caller(f"{op}: fan_in_fan_out=True but {listed(linear_names)} "
                       f"{'is an nn.Linear' if one else 'are nn.Linear layers'} (weight [out, in]); wrapping "
                       f"{'it' if one else 'them'} with fan_in_fan_out=False, as PEFT does")
    if conv1d_names:
        one = len(conv1d_names) == 1
        warn_at_caller(f"{op}: {listed(conv1d_names)} {'is a transformers' if one else 'are transformers'} Conv1D"
                       f" (weight [in, out]) but fan_in_fan_out is False; wrapping {'it' if one else 'them'} with "
                       f"fan_in_fan_out=True, as PEFT does")


def inject_lora(model, target_modules, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, *,
                exclude_modules=None, init_lora_weights=True, backend="auto", fan_in_fan_out=False,
                layers_to_transform=None, layers_pattern=None, rank_pattern=None, alpha_pattern=None,
                modules_to_save=None, autocast_adapter_dtype=True, bias="none"):
    """Replaces, in place, every nn.Linear whose name matches target_modules (a regex over the full name, or a list
    of names/suffixes, as PEFT) with a LoRALinear sharing its weights, freezes every parameter but the adapter's,
    returns model. All targets are found and validated before the model is changed; a failure leaves it as it was.
    A second call adds to the adapter: the LoRA layers, modules_to_save and bias mode of earlier calls stay trained
    and are saved together (the broader bias mode of the two holds); one with another lora_dropout or use_rslora
    warns that save_peft_adapter will refuse the mix (PEFT's config holds one of each).

    PEFT's LoraConfig options, same meaning: exclude_modules, layers_to_transform (+ layers_pattern) for list
    targets, rank_pattern / alpha_pattern ({name regex: r or alpha}), fan_in_fan_out (transformers' Conv1D, GPT-2's
    [in, out] layer, is wrapped with fan_in_fan_out=True and nn.Linear with False whatever the flag says, with a
    warning where it disagrees, as PEFT), autocast_adapter_dtype (float32 factors for 16-bit layers: see
    LoRALinear), and modules_to_save (module names, e.g. ["score"] for a classification head): those modules train
    whole and save_peft_adapter writes them beside the adapter. Unlike PEFT, no copy is kept: they train in place.
    bias ("none", "all" or "lora_only") is PEFT's option too: "all" also trains every parameter called bias
    (LayerNorm biases included), "lora_only" the biases of the LoRA layers; save_peft_adapter saves them.
    The new layers keep the train/eval mode of the layers they replace. A target whose weight is tied to another
    module's (GPT-2's lm_head) gets PEFT's warning: LoRALinear.merge() would change both; merge_and_unload unties."""
    op = "inject_lora"
    wrapper, model = model, unwrap_model(model, op, adds_parameters=True)
    refuse_new_layers_under_fsdp1(op, model)
    check_bias_mode(op, bias)
    fan_in_fan_out = check_flag(op, "fan_in_fan_out", fan_in_fan_out)
    autocast_adapter_dtype = check_flag(op, "autocast_adapter_dtype", autocast_adapter_dtype)
    for name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if pattern is not None and not isinstance(pattern, dict):
            raise TypeError(f"{op}: {name} expected a dict {{module name regex: value}}, got {pattern!r}")
        for key in pattern or {}:
            if not isinstance(key, str):
                raise TypeError(f"{op}: {name} expected module name regex keys (str), got the key {key!r}")
            check_regex(op, f"{name} key", key, pattern_key_regex)
    if isinstance(modules_to_save, (list, tuple)):  # anything else is named_modules_to_save's to refuse
        for entry in modules_to_save:
            if isinstance(entry, str):
                check_regex(op, "modules_to_save entry", entry, modules_to_save_regex)
    if modules_to_save and not named_modules_to_save(model, modules_to_save, op):  # None or [] (PEFT's default)
        ends = [state_dict_name(name) for name, _ in suffix_only_modules_to_save(model, modules_to_save)][:3]
        hint = (f" ({ends} end with an entry, but modules_to_save selects by whole name components, as PEFT >= 0.22; "
                f"name them to train them whole)" if ends else "")
        raise ValueError(f"{op}: modules_to_save {modules_to_save!r} matched no module of the model{hint}")
    _warn_suffix_only_modules_to_save(op, model, modules_to_save)
    # an earlier call's adapter stays part of this one
    earlier = getattr(model, MODULES_TO_SAVE_ATTR, None) or []
    modules_to_save = earlier + [name for name in modules_to_save or [] if name not in earlier]
    bias = max(bias, getattr(model, BIAS_ATTR, "none"), key=BIAS_MODES.index)  # the broader of the two
    targets = find_target_linears(model, target_modules, exclude_modules, op, layers_to_transform=layers_to_transform,
                                  layers_pattern=layers_pattern, modules_to_save=modules_to_save or None)
    heads = named_modules_to_save(model, modules_to_save, op) if modules_to_save else []
    _warn_tied_targets(op, model, targets)
    with _rollback_on_error(model) as replaced:
        layers = []
        conv1d = {name: is_conv1d(module) for name, module in targets}
        warn_fan_in_fan_out_corrections(op, fan_in_fan_out, conv1d)
        for name, module in targets:
            conv = conv1d[name]
            warn_dropped_hooks(op, f"module {name!r}", module, "the LoRALinear that replaces it never calls it")
            try:
                key = state_dict_name(name)  # as the targets are matched: a checkpoint wrapper's name is no key
                layer = LoRALinear.from_linear(
                    module, pattern_value(rank_pattern, key, r), pattern_value(alpha_pattern, key, lora_alpha),
                    lora_dropout, use_rslora, init_lora_weights=init_lora_weights, backend=backend,
                    fan_in_fan_out=conv, autocast_adapter_dtype=autocast_adapter_dtype)
            except (TypeError, ValueError) as exc:  # name the module: its r or alpha may come from a pattern
                raise type(exc)(f"{op}: module {name!r}: {exc}") from None
            layers.append((name, module, layer))
        # before the model changes: a warning raised as an error (-W error) leaves it as it was
        _warn_mixed_adapter_options(op, [m for m in model.modules() if isinstance(m, LoRALinear)]
                                    + [layer for _, _, layer in layers])
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for name, old, layer in layers:
            _set_submodule(model, name, layer)
            replaced.append((name, old))
        lora_names = set()
        for name, layer in model.named_modules():
            if isinstance(layer, LoRALinear):
                lora_names.add(name)
                layer.lora_A.weight.requires_grad_(True)
                layer.lora_B.weight.requires_grad_(True)
        _train_biases(tensor for _, tensor, _ in trained_biases(model, bias, lora_names, [name for name, _ in heads]))
        for _, head in heads:
            head.requires_grad_(True)
    _record(model, MODULES_TO_SAVE_ATTR, list(modules_to_save) or None)
    _record(model, BIAS_ATTR, None if bias == "none" else bias)
    enable_input_grads_for_checkpointing(model)
    keep_transformer_layers_calling_lora(model)
    return wrapper


def _warn_mixed_adapter_options(op, layers):
    """A second inject_lora call with another lora_dropout or use_rslora trains, but save_peft_adapter refuses the
    adapter (PEFT's config holds one of each): said here, before the training, instead of only at the save. layers:
    the model's LoRALinear layers once the call is done."""
    for option in ("lora_dropout", "use_rslora"):
        values = sorted({getattr(layer, option) for layer in layers})
        if len(values) > 1:
            warn_at_caller(f"{op}: the model's LoRA layers now have different {option} values {values}: they train, "
                           f"but save_peft_adapter refuses them (PEFT's adapter_config.json holds one {option})")


# --------------------------------------------------------------------------------- several named adapters, mixed batch

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch (slot id -1)


def prepare_multi_adapter(model, target_modules, max_adapters, max_rank, *, exclude_modules=None,
                          layers_to_transform=None, layers_pattern=None, backend="auto", adapter_dtype=None):
    """Wraps, in place, every nn.Linear / transformers Conv1D that target_modules selects (PEFT's matching rules)
    with a MultiLoRALinear of `max_adapters` empty slots of rank up to `max_rank`, freezes every parameter and
    records an empty name -> slot table as `model.lora_adapter_slots`. Adapters then go in by name with
    load_peft_adapter(model, path, adapter_name=...) and a batch mixes them per row with set_batch_adapters.
    Target the union of the modules of every adapter you will load: a slot of a layer that an adapter does not
    target stays empty (that layer computes the base output for that adapter's rows, as PEFT). adapter_dtype:
    the slots' factor dtype (see MultiLoRALinear; torch.float32 to train the adapters of a 16-bit model). Returns
    model."""
    op = "prepare_multi_adapter"
    wrapper, model = model, unwrap_model(model, op, adds_parameters=True)
    refuse_new_layers_under_fsdp1(op, model)
    if getattr(model, "lora_adapter_slots", None) is not None:
        raise ValueError(f"{op}: the model is prepared already (it has lora_adapter_slots)")
    targets = find_target_linears(model, target_modules, exclude_modules, op, layers_to_transform=layers_to_transform,
                                  layers_pattern=layers_pattern, replaced=False)
    _warn_tied_targets(op, model, targets, _TIED_MULTI_LORA)
    with _rollback_on_error(model) as replaced:
        layers = []
        for name, module in targets:
            layers.append((name, module, MultiLoRALinear(module, max_adapters, max_rank, backend=backend,
                                                         adapter_dtype=adapter_dtype, _name=name)))
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for name, old, layer in layers:
            _set_submodule(model, name, layer)
            replaced.append((name, old))
    model.lora_adapter_slots = {}
    # Slots trained in one batch (requires_grad_(True)) under reentrant checkpointing switched on before this call
    # get gradients only when the input embeddings' output requires grad, as inject_lora marks it
    enable_input_grads_for_checkpointing(model)
    keep_transformer_layers_calling_lora(model)
    return wrapper


def delete_adapter(model, adapter_name):
    """Unloads the named adapter of a model prepared with prepare_multi_adapter (PEFT's delete_adapter): its slot
    is cleared in every MultiLoRALinear (rank 0: rows still pointing at it get the base output) and freed for the
    next load_peft_adapter. Raises ValueError, changing nothing, for a name that is not loaded. Returns model."""
    op = "delete_adapter"
    wrapper, model = model, unwrap_model(model, op)
    slots = getattr(model, "lora_adapter_slots", None)
    if slots is None:
        raise ValueError(f"{op}: the model has no named adapters (prepare_multi_adapter first)")
    with adapter_table_lock():  # taking turns with loads by name (and other deletes)
        if not isinstance(adapter_name, str) or adapter_name not in slots:
            raise ValueError(f"{op}: unknown adapter name {adapter_name!r}; loaded: {sorted(slots)}")
        slot = slots[adapter_name]
        layers = [module for module in model.modules() if isinstance(module, MultiLoRALinear)]
        for module in layers:  # before any slot is cleared
            module._refuse_sharded_slots(op)
            refuse_inference_tensor_writes(op, module._slot_tensors())
        for module in layers:
            module.clear_adapter(slot)
        del slots[adapter_name]
        resolve_batch_adapters(model)
    return wrapper


def _check_adapter_names(model, adapter_names, op):
    """ValueError unless every name is loaded (or "__base__"); returns the model's name -> slot table."""
    slots = getattr(model, "lora_adapter_slots", None)
    if slots is None:
        raise ValueError(f"{op}: the model has no named adapters; call prepare_multi_adapter and load_peft_adapter("
                         f"..., adapter_name=...) first")
    for name in adapter_names:
        if name != BASE_ADAPTER and name not in slots:
            raise ValueError(f"{op}: unknown adapter name {name!r}; loaded: {sorted(slots)} (or {BASE_ADAPTER!r})")
    return slots


class ResolvedRows(NamedTuple):
    """set_batch_adapters' names looked up in the slot table: the slot id of each name (-1: "__base__" or deleted),
    whether any is an adapter, and the ids as an int64 tensor, which a compiled forward reads as an input."""
    slot_ids: tuple
    any_adapter: bool
    tensor: torch.Tensor


class BatchAdapterIds:
    """The adapter names of the next forwards (one per batch row, or one str for every row), their slot ids and the
    LoRABatch built from them: one per (input shape, slot ids, device), shared by every MultiLoRALinear of a forward.
    The names are looked up in the model's name -> slot table when set and again whenever load_peft_adapter(...,
    adapter_name=...) or delete_adapter changes it (resolve): an adapter deleted since counts as the base model (-1),
    never as whichever adapter took its slot. A compiled forward reads the ids as a tensor, not as constants: a new
    list of as many names, with an adapter among them, runs the same graph (HF generate has no way to pass ids)."""

    _MAX_CACHED = 8  # distinct (shape, ids) kept (prefill + decode shapes of a generate loop)

    def __init__(self, slots, names, device):
        self.slots, self.names, self.device = slots, names, device
        # what a compiled forward reads (dynamo guards on it, as on any Python value): never the names
        self.per_row = not isinstance(names, str)
        self.count = len(names) if self.per_row else 1
        self._cache = {}
        self.resolve()

    def resolve(self):
        """Looks the names up in the slot table now."""
        names = self.names if self.per_row else (self.names,)
        slot_ids = tuple(self.slots.get(name, -1) for name in names)
        self.rows = ResolvedRows(slot_ids, max(slot_ids) >= 0,
                                 torch.tensor(slot_ids, dtype=torch.int64, device=self.device))

    def check_rows(self, lead):
        """ValueError unless an input with leading dims `lead` has a batch dimension the names can cover."""
        if not self.per_row:
            return
        if not lead or lead[0] % self.count:
            raise ValueError(f"MultiLoRALinear: set_batch_adapters got {self.count} adapter names, but the layer input "
                             f"has shape {tuple(lead)} + [features] (the batch dimension first, expected a multiple "
                             f"of {self.count})")

    def batch_for(self, x, num_adapters, rows):
        """The LoRABatch of x's rows for `rows` (this object's rows, read once by the caller)."""
        from lora_kernels.batch import LoRABatch
        lead = tuple(x.shape[:-1])
        # Cached for plain eager forwards only. Traced, the batch is part of the graph; under a FakeTensorMode (a
        # memory estimator's forward) or a torch.func transform (functionalize) its tensors would be fake or
        # wrapped, and the next eager forward of that shape took them from the cache: the cpu ops then added no
        # LoRA term (their fake impls ran), the other backends raised.
        cached = not (through_op(x) or torch._C._are_functorch_transforms_active()
                      or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None)
        key = (lead, num_adapters, x.device, rows.slot_ids) if cached else None
        batch = self._cache.get(key) if cached else None
        if batch is None:
            ids = rows.tensor.to(x.device)
            if lead:
                # A batch k times the names long (generate's beams or num_return_sequences repeat each row k
                # times, next to each other): each name covers k rows, as PEFT expands adapter_names for beams.
                ids = ids[:, None].expand(self.count, lead[0] // self.count)
                ids = ids.reshape(-1, *([1] * (len(lead) - 1))).expand(lead)
            else:  # a 1-D x: one token, under one name
                ids = ids.reshape(())
            batch = LoRABatch.from_adapter_ids(ids, num_adapters)
            if cached:
                if len(self._cache) >= self._MAX_CACHED:
                    self._cache.clear()
                self._cache[key] = batch
        return batch


def resolve_batch_adapters(model):
    """Looks the names of every set_batch_adapters setting in effect on `model` up again (its slot table changed)."""
    states = {id(m.batch_adapters): m.batch_adapters for m in model.modules()
              if isinstance(m, MultiLoRALinear) and m.batch_adapters is not None}
    for state in states.values():
        state.resolve()


class set_batch_adapters:
    """Per-row adapters for the MultiLoRALinear layers of `model` (PEFT's `adapter_names=` of a mixed batch):
    adapter_names is a list with one name per batch row ("__base__": the base model for that row), or one name for
    every row, or None to unset. Applies at once, and stays in effect until the next call; as a context manager its
    setting ends on exit (contexts may exit out of order): the newest call still in effect applies again, a context
    still open or one made without `with`, or else the setting from before them all:

        with lk.set_batch_adapters(model, ["fr", "__base__", "de"]):
            logits = model(input_ids).logits     # row 0 with adapter "fr", row 1 base only, row 2 with "de"

    Every layer input must have the batch dimension first ([B, ...]; not the per-expert linears of a mixture of
    experts, whose rows are the tokens routed to them); slot ids broadcast over the other dims. A batch
    dimension k times as long as the list (generate with num_beams=k or num_return_sequences=k) gives each name k
    consecutive rows (so a list not one name per prompt is refused only where the expanded batch is no multiple of
    its length: the layers never see the prompt count). Names are looked up again whenever
    load_peft_adapter(..., adapter_name=...) or delete_adapter change the model's name -> slot table: a name deleted
    since computes the base model for its rows. Under
    torch.compile the slot ids are an input of the graph, not constants: a new list of as many names runs the same
    graph (generate(): no recompile per mix); another number of names, or a list with no adapter (every layer then
    skips the grouped ops), compiles one more. The setting belongs to the model, not to a thread: threads sharing a
    model that set names at once see each other's (a forward reads, layer by layer, whichever names were set last);
    such threads pass adapter ids or a LoRABatch to each forward. Under activation checkpointing the backward
    recomputes each layer under the names in effect when it runs: call it inside the forward's `with` (it raises
    under names no recent forward ran with, or none), and backward each micro-batch's loss inside its own `with`:
    losses of several summed under different names would all recompute under the last names, without an error."""

    def __init__(self, model, adapter_names):
        op = "set_batch_adapters"
        model = unwrap_model(model, op)
        layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
        if not layers:
            raise ValueError(f"{op}: the model has no MultiLoRALinear layers; call prepare_multi_adapter first")
        device = layers[0].ranks.device  # a layer on another device copies the ids over
        if not (adapter_names is None or isinstance(adapter_names, str)):
            names = list(adapter_names) if isinstance(adapter_names, (list, tuple)) else []
            if not names or not all(isinstance(n, str) for n in names):
                raise TypeError(f"{op}: adapter_names expected a non-empty list of str, a str or None, "
                                f"got {adapter_names!r}")
            adapter_names = tuple(names)
        # Looked up and put in place in one turn with loads and deletes by name: one in between resolved the settings
        # in place then, not this one, which kept slot ids of the table before it (a deleted name's rows computed
        # whichever adapter was loaded into its slot next)
        with adapter_table_lock():
            state = None
            if adapter_names is not None:
                names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
                state = BatchAdapterIds(_check_adapter_names(model, names, op), adapter_names, device)
            self._layers = layers
            owner = weakref.ref(self)
            for layer in layers:
                settings = _BATCH_SETTINGS.get(layer)
                if settings is None:  # the layer's first: what it had before is the setting under every later one
                    settings = _BATCH_SETTINGS[layer] = [(None, layer.batch_adapters)]
                # a call not used as a context is gone once made (its weakref dead): it stays in effect until the
                # next, which replaces it; only the newest such one is kept, under the open contexts above it
                done = [i for i, (ref, _) in enumerate(settings) if ref is None or ref() is None]
                settings[:] = [entry for i, entry in enumerate(settings) if i not in done[:-1]]
                settings.append((owner, state))
                layer.batch_adapters = state

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        with adapter_table_lock():  # as in __init__
            in_effect = {}
            for layer in self._layers:
                settings = _BATCH_SETTINGS.get(layer, [])
                settings[:] = [entry for entry in settings if entry[0] is None or entry[0]() is not self]
                state = settings[-1][1] if settings else None
                layer.batch_adapters = state
                if state is not None:
                    in_effect[id(state)] = state
            for state in in_effect.values():
                state.resolve()  # the slot table may have changed while it was set aside
        return False


# Per MultiLoRALinear, the set_batch_adapters settings made on it, oldest first, as (weakref to the call, its
# BatchAdapterIds or None); the last is in effect. A `with` removes its own on exit, so contexts that exit out of
# order (asyncio tasks, threads serving requests) leave the newest one still open, or the setting from before them
# all, in effect: each had put back what it saw on entry, and the names of a finished request stayed in effect (a
# forward without ids then ran its adapter instead of refusing), or a disable_adapter left the base model on.
_BATCH_SETTINGS = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def disable_adapter(model):
    """Within this context every LoRALinear of `model` computes its base layer only (PEFT's
    `with model.disable_adapter():`, e.g. the reference model of DPO without a second copy); on exit each layer is
    as it was. A merged layer cannot be disabled: RuntimeError before any layer changes. MultiLoRALinear layers beside
    them compute the base model too (unless a forward passes them adapter ids); a model with MultiLoRALinear layers
    only is refused: use set_batch_adapters(model, "__base__") there. modules_to_save heads and trained
    biases are not switched off (they hold the trained values in place; a warning says so for heads, outside
    torch.compile: dynamo cannot trace it, and a compiled step's graph broke there)."""
    wrapper, model = model, unwrap_model(model, "disable_adapter")
    layers = [module for module in model.modules() if isinstance(module, LoRALinear)]
    if not layers:
        hint = ""
        if any(isinstance(module, MultiLoRALinear) for module in model.modules()):
            hint = ("; its MultiLoRALinear layers pick adapters per row: set_batch_adapters(model, \"__base__\") "
                    "computes the base model")
        raise ValueError(f"disable_adapter: the model has no LoRALinear layers{hint}")
    heads = getattr(model, MODULES_TO_SAVE_ATTR, None)
    if heads and not torch.compiler.is_dynamo_compiling():  # see _disable_lock
        warn_at_caller(f"disable_adapter: the modules_to_save {heads} train in place and stay active in this "
                       f"context, so the result is not the base model's once they have trained (PEFT keeps the "
                       f"originals beside them)")
    merged = [name for name, module in model.named_modules() if isinstance(module, LoRALinear) and module.merged]
    if merged:
        raise RuntimeError(f"disable_adapter: layers {merged[:3]}{' ...' if len(merged) > 3 else ''} are merged; "
                           f"unmerge() them first")
    multi = any(isinstance(module, MultiLoRALinear) for module in model.modules())
    for layer in layers:
        layer._enter_disabled()
    try:
        # MultiLoRALinear layers beside them (inject_lora on modules that prepare_multi_adapter left out) compute the
        # base model too: they added the adapter set_batch_adapters named (adapter ids a forward is given still win)
        with set_batch_adapters(model, BASE_ADAPTER) if multi else contextlib.nullcontext():
            yield wrapper
    finally:
        for layer in layers:
            layer._exit_disabled()


def merge_and_unload(model, *, safe_merge=False):
    """Replaces every LoRALinear by a plain nn.Linear (or Conv1D) with the adapter merged into its weight, frozen
    as the base weight was; returns model (given a LoRALinear itself: the merged layer). A model with
    MultiLoRALinear layers (several named adapters) is refused before any change: which adapter to merge is not
    defined; so are a model without LoRALinear layers and a PEFT model (PEFT's own merge_and_unload merges its
    layers). safe_merge (PEFT's option): every layer's merged weight is computed and checked first, and NaN or Inf in
    any of them refuses the merge (ValueError naming the layers) before a layer is replaced."""
    safe_merge = check_flag("merge_and_unload", "safe_merge", safe_merge)
    wrapper, model = model, unwrap_model(model, "merge_and_unload", adds_parameters=True,
                                         ddp_hint="call merge_and_unload on the model inside (ddp.module) once "
                                                  "training is done, and wrap the result again to train it further")
    multi = [name for name, module in model.named_modules() if isinstance(module, MultiLoRALinear)]
    if multi:
        raise ValueError(f"merge_and_unload: the model has MultiLoRALinear layers ({multi[:3]}"
                         f"{' ...' if len(multi) > 3 else ''}), which hold several adapters; load the one adapter to "
                         f"merge into the base model (load_peft_adapter without adapter_name) and merge that")
    refuse_peft_model("merge_and_unload", model)
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    if not layers:  # returning the model unchanged read as success (a PeftModel's layers are PEFT's, not these)
        raise ValueError("merge_and_unload: the model has no LoRALinear layers (inject_lora or load_peft_adapter "
                         "puts them in); the model is unchanged")
    fan_in_fan_out = [name for name, module in layers if module.fan_in_fan_out]
    if fan_in_fan_out and conv1d_class() is None:  # to_linear would fail there, after earlier layers were replaced
        raise RuntimeError(f"merge_and_unload: layers {fan_in_fan_out[:3]} have fan_in_fan_out=True and unwrap to "
                           f"transformers' Conv1D, but transformers is not imported; the model is unchanged")
    sharded = [name for name, module in layers if is_dtensor(module.weight)]
    if sharded:  # to_linear would refuse them, after earlier layers were replaced
        raise TypeError(f"merge_and_unload: layers {sharded[:3]}{' ...' if len(sharded) > 3 else ''} have DTensor base "
                        f"weights (tensor parallelism or FSDP2) and would become plain nn.Linear layers; merge() them "
                        f"in place, or save the adapter (save_peft_adapter, on every rank) and merge it into an "
                        f"unsharded model; the model is unchanged")
    quantized = [(name, module.weight) for name, module in layers if is_subclass_weight(module.weight)]
    if quantized:  # to_linear would refuse them, after earlier layers were replaced
        raise TypeError(f"merge_and_unload: layers {[name for name, _ in quantized[:3]]}"
                        f"{' ...' if len(quantized) > 3 else ''} have base weights such as "
                        f"{describe_subclass(quantized[0][1])}, {_NO_MERGE_INTO_SUBCLASS}; the model is unchanged. "
                        f"{_KEEP_THE_ADAPTER_SEPARATE}")
    for name, module in layers:  # to_linear would refuse them, after earlier layers were replaced
        op = f"merge_and_unload: module {name!r}"
        module._check_factor_devices(op, unchanged="the model")
        module._refuse_hook_computed_factors(op)
        module._check_scaling(op)
    if safe_merge:
        meta = [name for name, module in layers if module.weight.is_meta]
        if meta:
            raise ValueError(f"merge_and_unload: safe_merge checks the merged weights' values, but layers {meta[:3]}"
                             f"{' ...' if len(meta) > 3 else ''} have base weights on the meta device, which hold "
                             f"none (load the weights first); the model is unchanged")
        with torch.no_grad():  # one merged weight at a time, computed again below: all at once doubled the memory
            broken = [name for name, module in layers if not torch.isfinite(module._merged_weight()).all()]
        if broken:
            raise ValueError(f"merge_and_unload: safe_merge found NaN/Inf in the merged weights of layers "
                             f"{broken[:3]}{' ...' if len(broken) > 3 else ''}; the model is unchanged")
    if isinstance(model, LoRALinear):  # no parent to put the merged layer in: it is the result
        if wrapper is not model:
            raise ValueError(f"merge_and_unload: the model is a LoRALinear inside {type(wrapper).__name__}, which "
                             f"cannot be given the merged layer in its place; call it on the LoRALinear itself; the "
                             f"model is unchanged")
        warn_dropped_hooks("merge_and_unload", "the LoRALinear", model, "the merged nn.Linear returned in its place "
                           "is a new layer")
        return model.to_linear()
    merged = {}  # by layer: one LoRALinear held under two names (a layer applied twice) becomes one merged layer
    # The checks above refuse what to_linear refuses; anything else failing there (a weight subclass that is not
    # recognised as one, e.g. without __tensor_flatten__, failing in its own add) puts the layers replaced so far back
    with _rollback_on_error(model) as replaced:
        for name, module in list(model.named_modules(remove_duplicate=False)):  # listed first: the loop replaces them
            if isinstance(module, LoRALinear):
                if id(module) not in merged:
                    warn_dropped_hooks("merge_and_unload", f"module {name!r}", module, "it is replaced by a new "
                                       "layer holding the merged weight")
                    merged[id(module)] = module.to_linear()
                _set_submodule(model, name, merged[id(module)])
                replaced.append((name, module))
    # the adapter is gone: a later inject_lora starts a new one; the embedding layers are the merged model's own now.
    # Also what an inject_lora or load on a submodule recorded there: kept, it outlived every LoRA layer
    for module in model.modules():
        for attr in (MODULES_TO_SAVE_ATTR, BIAS_ATTR, TASK_TYPE_ATTR, EMBEDDING_LAYERS_ATTR):
            _record(module, attr, None)
    return wrapper


def count_parameters(model):
    """(trainable, total) parameter counts."""
    return _count_parameters("count_parameters", model)


def _count_parameters(op, model):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model expected a torch.nn.Module, got {type(model).__name__}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def trainable_parameters_summary(model):
    """PEFT's print_trainable_parameters line, as a string: trainable and total parameter counts and the share."""
    trainable, total = _count_parameters("trainable_parameters_summary", model)
    return (f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")
