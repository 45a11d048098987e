"""LoRALinear (a drop-in for nn.Linear), inject_lora / merge_and_unload over a model. No maths here: the forward
is lora_kernels.functional.lora_linear."""

import contextlib
import math
import re

import torch
from torch import nn

from lora_kernels.functional import lora_linear, multi_lora_linear


class LoRAFactor(nn.Module):
    """Holds one LoRA factor as `.weight`, so state-dict keys read `<layer>.lora_A.weight` as in PEFT. Not an
    nn.Linear on purpose: target-module matching never wraps a factor."""

    def __init__(self, out_features, in_features, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))

    def extra_repr(self):
        return f"shape={tuple(self.weight.shape)}"


def lora_scaling(r, lora_alpha, use_rslora):
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRALinear(nn.Module):
    """y = x @ weight.T + bias + scaling * lora_B(lora_A(dropout(x))), with scaling = lora_alpha / r
    (lora_alpha / sqrt(r) with use_rslora). weight [out, in] and bias [out] are frozen; lora_A.weight [r, in] and
    lora_B.weight [out, r] train. A fresh layer equals its base layer (A kaiming-uniform, B zeros, as PEFT)."""

    def __init__(self, in_features, out_features, r=8, lora_alpha=8, lora_dropout=0.0, bias=True, use_rslora=False,
                 device=None, dtype=None, *, init_lora_weights=True, backend="auto"):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LoRALinear: {name} expected an int >= 1, got {value!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
                     if bias else None)
        self._reset_base_parameters()
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend, "LoRALinear")

    def _init_lora(self, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend, op):
        """The adapter half of construction, shared by __init__ and from_linear (the base weight exists already)."""
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{op}: r expected an int >= 1, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"{op}: lora_dropout expected a number in [0, 1), got {lora_dropout!r}")
        self.r, self.lora_alpha, self.use_rslora, self.lora_dropout = r, lora_alpha, use_rslora, float(lora_dropout)
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.backend = backend
        self.lora_A = LoRAFactor(r, self.in_features, device=self.weight.device, dtype=self.weight.dtype)
        self.lora_B = LoRAFactor(self.out_features, r, device=self.weight.device, dtype=self.weight.dtype)
        self.merged = False
        self.disable_adapters = False
        self.reset_lora_parameters(init_lora_weights)

    def _reset_base_parameters(self):
        # nn.Linear's own initialisation, so a LoRALinear built from scratch behaves like a new nn.Linear.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights=True):
        """PEFT's initialisations: True (A kaiming-uniform a=sqrt(5), B zeros), "gaussian" (A ~ N(0, 1/r), B zeros),
        False (both random: the layer no longer starts as the identity; for tests)."""
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
            nn.init.zeros_(self.lora_B.weight)
        elif init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
        else:
            raise ValueError(f"LoRALinear: init_lora_weights expected True, False or 'gaussian', got {init_lora_weights!r}")

    @classmethod
    def from_linear(cls, linear, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, *, init_lora_weights=True,
                    backend="auto"):
        """Wraps an existing nn.Linear: its weight and bias Parameters are reused (not copied) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear: linear expected an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight.requires_grad_(False)
        layer.bias = None if linear.bias is None else linear.bias.requires_grad_(False)
        layer._init_lora(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend, "LoRALinear.from_linear")
        return layer

    def forward(self, x):
        if self.merged or self.disable_adapters:
            if self.disable_adapters and self.merged:
                raise RuntimeError("LoRALinear: cannot disable the adapter of a merged layer; call unmerge() first")
            return nn.functional.linear(x, self.weight, self.bias)
        dropout_p = self.lora_dropout if self.training else 0.0
        return lora_linear(x, self.weight, self.lora_A.weight, self.lora_B.weight, self.scaling, self.bias,
                           dropout_p=dropout_p, backend=self.backend)

    def delta_weight(self):
        """scaling * B @ A in float32: what merge adds to the base weight (added in float32, rounded once)."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merge(self, safe_merge=False):
        """Adds scaling * B @ A into the base weight. safe_merge computes the result first and refuses (ValueError,
        weight untouched) when it holds NaN or Inf."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge: the adapter is already merged; call unmerge() first")
        merged_weight = (self.weight.float() + self.delta_weight()).to(self.weight.dtype)
        if safe_merge and not torch.isfinite(merged_weight).all():
            raise ValueError("LoRALinear.merge: safe_merge found NaN/Inf in the merged weight; the layer is unchanged")
        self.weight.copy_(merged_weight)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Subtracts the merged delta again (exact up to the weight dtype's rounding)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: the adapter is not merged")
        self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within this context the layer computes the base linear only."""
        previous = self.disable_adapters
        self.disable_adapters = True
        try:
            yield self
        finally:
            self.disable_adapters = previous

    def to_linear(self):
        """A plain nn.Linear holding the merged weights (the adapter folded in)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight if self.merged else (self.weight.float() + self.delta_weight()))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}"
                f"{', use_rslora=True' if self.use_rslora else ''}, merged={self.merged}, backend={self.backend!r}")


class MultiLoRALinear(nn.Module):
    """A base nn.Linear plus `max_adapters` preallocated LoRA slots of rank up to `max_rank`, for batches that mix
    adapters: forward(x, adapter_ids) with adapter_ids shaped like x.shape[:-1] (-1: base only).

    lora_a [L, R, K], lora_b [L, N, R] are Parameters (frozen; requires_grad_(True) trains several adapters at once),
    scalings [L] and ranks [L] are buffers. A cleared slot has rank 0 and contributes nothing."""

    def __init__(self, base_linear, max_adapters, max_rank, *, backend="auto"):
        super().__init__()
        if not isinstance(base_linear, nn.Linear):
            raise TypeError(f"MultiLoRALinear: base_linear expected an nn.Linear, got {type(base_linear).__name__}")
        for name, value in (("max_adapters", max_adapters), ("max_rank", max_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MultiLoRALinear: {name} expected an int >= 1, got {value!r}")
        self.base_layer = base_linear
        self.max_adapters, self.max_rank, self.backend = max_adapters, max_rank, backend
        weight = base_linear.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_a = nn.Parameter(torch.zeros(max_adapters, max_rank, base_linear.in_features, **factory),
                                   requires_grad=False)
        self.lora_b = nn.Parameter(torch.zeros(max_adapters, base_linear.out_features, max_rank, **factory),
                                   requires_grad=False)
        self.register_buffer("scalings", torch.zeros(max_adapters, dtype=torch.float32, device=weight.device))
        self.register_buffer("ranks", torch.zeros(max_adapters, dtype=torch.int32, device=weight.device))

    @property
    def in_features(self):
        return self.base_layer.in_features

    @property
    def out_features(self):
        return self.base_layer.out_features

    def _check_slot(self, op, slot):
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.max_adapters:
            raise ValueError(f"{op}: slot expected an int in [0, {self.max_adapters}), got {slot!r}")

    @torch.no_grad()
    def set_adapter(self, slot, lora_a, lora_b, scaling):
        """Loads one adapter (lora_a [r, K], lora_b [N, r], any r <= max_rank) into `slot`. Everything is checked
        and the padded slot rows are built before the slot is written, so a failure leaves the slot as it was."""
        op = "MultiLoRALinear.set_adapter"
        self._check_slot(op, slot)
        for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.dim() != 2:
                desc = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"{op}: {name} expected a 2-D floating tensor, got {desc}")
        rank = lora_a.shape[0]
        if not 1 <= rank <= self.max_rank or lora_a.shape[1] != self.in_features:
            raise ValueError(f"{op}: lora_a expected shape [r, {self.in_features}] with 1 <= r <= {self.max_rank}, "
                             f"got {tuple(lora_a.shape)}")
        if tuple(lora_b.shape) != (self.out_features, rank):
            raise ValueError(f"{op}: lora_b expected shape [{self.out_features}, {rank}], got {tuple(lora_b.shape)}")
        scaling = float(scaling)
        padded_a = torch.zeros_like(self.lora_a[slot])
        padded_a[:rank] = lora_a.to(padded_a)
        padded_b = torch.zeros_like(self.lora_b[slot])
        padded_b[:, :rank] = lora_b.to(padded_b)
        self.lora_a[slot].copy_(padded_a)
        self.lora_b[slot].copy_(padded_b)
        self.scalings[slot] = scaling
        self.ranks[slot] = rank

    @torch.no_grad()
    def clear_adapter(self, slot):
        self._check_slot("MultiLoRALinear.clear_adapter", slot)
        self.ranks[slot] = 0
        self.scalings[slot] = 0.0
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    def forward(self, x, adapter_ids):
        """x: [..., K]; adapter_ids: integer tensor shaped like x.shape[:-1], or a LoRABatch built for x's tokens."""
        return multi_lora_linear(x, self.base_layer.weight, self.lora_a, self.lora_b, adapter_ids, self.scalings,
                                 self.base_layer.bias, ranks=self.ranks, backend=self.backend)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, max_adapters={self.max_adapters}, "
                f"max_rank={self.max_rank}, backend={self.backend!r}")


# ------------------------------------------------------------------------------------------------- model utilities

def _matches(name, target_modules):
    """PEFT's rule: a str is a regex that must match the whole module name; a list matches a name equal to an entry
    or ending in "." + entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def find_target_linears(model, target_modules, exclude_modules=None, op="inject_lora"):
    """[(name, module)] of the nn.Linear modules matching target_modules and not exclude_modules."""
    if not isinstance(target_modules, (str, list, tuple, set)) or not target_modules:
        raise ValueError(f"{op}: target_modules expected a regex string or a non-empty list of names, "
                         f"got {target_modules!r}")
    found = []
    for name, module in model.named_modules():
        if not name or not _matches(name, target_modules):
            continue
        if exclude_modules and _matches(name, exclude_modules):
            continue
        if isinstance(module, LoRALinear):
            raise ValueError(f"{op}: module {name!r} already has a LoRA adapter")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{op}: module {name!r} matches target_modules but is a {type(module).__name__}; "
                            f"only nn.Linear layers can be wrapped")
        found.append((name, module))
    if not found:
        raise ValueError(f"{op}: target_modules {target_modules!r} matched no nn.Linear in the model")
    return found


def _set_submodule(model, name, module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject_lora(model, target_modules, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, *,
                exclude_modules=None, init_lora_weights=True, backend="auto"):
    """Replaces, in place, every nn.Linear whose name matches target_modules (a regex over the full name, or a list
    of names/suffixes, as PEFT) with a LoRALinear sharing its weights, freezes every other parameter, returns model.
    All targets are found and validated before the model is changed."""
    targets = find_target_linears(model, target_modules, exclude_modules)
    layers = [(name, LoRALinear.from_linear(linear, r, lora_alpha, lora_dropout, use_rslora,
                                            init_lora_weights=init_lora_weights, backend=backend))
              for name, linear in targets]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name, layer in layers:
        _set_submodule(model, name, layer)
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)
    return model


def merge_and_unload(model):
    """Replaces every LoRALinear by a plain nn.Linear with the adapter merged into its weight; returns model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _set_submodule(model, name, module.to_linear())
    return model


def count_parameters(model):
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def trainable_parameters_summary(model):
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
