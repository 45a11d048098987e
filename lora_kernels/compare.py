"""`lora-kernels compare`: full fine-tuning vs LoRA with the unfused torch layer (PEFT's way) vs LoRA with the fused
kernels, on a Llama-style decoder built here in code and a synthetic task, measured on this machine: the seed
document's claims (trainable parameters, memory, speed, storage, inference latency, loss) as numbers.

`run_compare(CompareConfig(...)) -> dict` measures; `format_compare(result) -> str` prints; the CLI wraps both.
"""

import contextlib
import ctypes
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

import lora_kernels
from lora_kernels import backends
from lora_kernels._ext import is_finite_number
from lora_kernels.functional import CPU_DECODE_MAX_M, check_layer_scaling
from lora_kernels.modules import LoRALinear, count_parameters, inject_lora, lora_scaling
from lora_kernels.ops import check_flag, positive_int

# ------------------------------------------------------------------------------------------------ the toy model

# Llama's layout at small sizes: MLP width ≈ 8/3 · hidden (SwiGLU), head_dim 32–128. "small" is sized so the whole
# default command takes about half a minute on 2 CPU cores (27 s wall, 1 run); "medium" (542 M parameters, Llama's
# 32k vocabulary) is the GPU default: big enough that the GEMMs, not Python, dominate a step on an H100.
MODEL_SIZES = {
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 176, "vocab": 128},
    "small": {"hidden": 256, "layers": 4, "heads": 4, "intermediate": 688, "vocab": 512},
    "medium": {"hidden": 2048, "layers": 8, "heads": 16, "intermediate": 5632, "vocab": 32000},
}
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INIT_STD = 0.02  # Llama's initializer_range
# The readout (lm_head) gets std 1/sqrt(hidden) instead: its logits then have unit scale. At 0.02 a frozen random
# readout caps the logits LoRA can reach (measured: LoRA stalled at loss 5.7 on the task below while full
# fine-tuning, which also trains lm_head, reached 0.5); a pretrained model has no such cap.
ROPE_THETA = 10000.0
ADAMW_BETA1 = 0.9  # torch.optim.AdamW's default

# Per-device defaults; explicit options override them. Steps include the warm-up steps (trained, not timed).
DEVICE_DEFAULTS = {
    "cpu": {"model_size": "small", "dtype": "float32", "batch_size": 4, "seq_len": 128, "steps": 20, "warmup": 3,
            "infer_reps": 10},
    "cuda": {"model_size": "medium", "dtype": "bfloat16", "batch_size": 8, "seq_len": 512, "steps": 30,
             "warmup": 5, "infer_reps": 20},
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def dtype_name(command, value):
    """--dtype of compare and bench as its full name (fp32 -> float32); anything not in DTYPES a ValueError naming
    the option."""
    if not isinstance(value, str) or value not in DTYPES:
        raise ValueError(f"{command}: --dtype expected one of {', '.join(DTYPES)}, got {value!r}")
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(value, value)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int

    @property
    def head_dim(self):
        return self.hidden // self.heads


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x):
        x32 = x.float()  # the mean of squares in fp32, as Llama does
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg, **factory):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        width = cfg.heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden, width, bias=False, **factory)
        self.k_proj = nn.Linear(cfg.hidden, width, bias=False, **factory)
        self.v_proj = nn.Linear(cfg.hidden, width, bias=False, **factory)
        self.o_proj = nn.Linear(width, cfg.hidden, bias=False, **factory)

    def forward(self, x, cos, sin):
        batch, seq, _ = x.shape
        shape = (batch, seq, self.heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, cfg, **factory):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False, **factory)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False, **factory)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False, **factory)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, **factory):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden, **factory)
        self.self_attn = Attention(cfg, **factory)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, **factory)
        self.mlp = MLP(cfg, **factory)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderLM(nn.Module):
    """A Llama-style causal LM in plain torch (RMSNorm, rotary positions, q/k/v/o and SwiGLU gate/up/down as
    nn.Linear, untied lm_head), with Llama's module names so PEFT-style target lists apply unchanged."""

    def __init__(self, cfg, device=None, dtype=None):
        super().__init__()
        if cfg.hidden % cfg.heads or cfg.head_dim % 2:
            raise ValueError(f"DecoderLM: hidden ({cfg.hidden}) expected a multiple of heads ({cfg.heads}) with an "
                             f"even head_dim, got head_dim {cfg.hidden / cfg.heads:g}")
        factory = {"device": device, "dtype": dtype}
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden, **factory)
        self.layers = nn.ModuleList(DecoderLayer(cfg, **factory) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, **factory)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False, **factory)
        self._rotary = {}  # (seq, device, dtype) -> (cos, sin): not buffers, so not in the state dict

    @torch.no_grad()
    def init_weights(self):
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=INIT_STD)
        nn.init.normal_(self.lm_head.weight, std=self.cfg.hidden ** -0.5)

    def _rotary_tables(self, seq, device, dtype):
        # Not cached while tracing: a dict keyed by the sequence length made torch.compile specialise it (a graph
        # per length, even with dynamic=True); in the graph the tables are a few cheap ops.
        if torch.compiler.is_compiling():
            return self._compute_rotary_tables(seq, device, dtype)
        key = (seq, device, dtype)
        if key not in self._rotary:
            self._rotary[key] = self._compute_rotary_tables(seq, device, dtype)
        return self._rotary[key]

    def _compute_rotary_tables(self, seq, device, dtype):
        dim = self.cfg.head_dim
        inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
        angles = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        cos, sin = self._rotary_tables(input_ids.shape[1], x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def lm_loss(logits, targets):
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ------------------------------------------------------------------------------------------------ the task

def make_task(vocab, task_vocab, seed):
    """A fixed random permutation of the first `task_vocab` tokens: every sequence follows t -> perm[t] from a random
    start. Deterministic (loss floor 0) and learnable in a few steps; starts near ln(vocab) from a random init."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(min(task_vocab, vocab), generator=generator)


def make_batch(perm, batch_size, seq_len, generator):
    """(inputs, targets), both [batch, seq] int64 on CPU: the chain start, perm[start], perm[perm[start]], ..."""
    tokens = torch.empty(batch_size, seq_len + 1, dtype=torch.int64)
    tokens[:, 0] = torch.randint(0, perm.numel(), (batch_size,), generator=generator)
    for t in range(seq_len):
        tokens[:, t + 1] = perm[tokens[:, t]]
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


# ------------------------------------------------------------------------------------------------ measurement

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def optimizer_state_bytes(optimizer):
    """Bytes of every tensor the optimizer keeps (AdamW: exp_avg, exp_avg_sq, and a scalar `step` per parameter)."""
    return sum(tensor_bytes(state.values()) for state in optimizer.state.values())


def gradient_bytes(model):
    return tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)


def _is_parameter_cast(t, parameters):
    """t is a dtype cast of a trainable parameter (a float32 LoRA factor cast to the 16-bit model dtype): weight
    memory of a size fixed by the model, not an activation. Cast by autograd (a ToCopy node from the parameter), or
    inside an autograd Function's forward (LoRALinearFunction saves its casts of float32 factors), which leaves no
    node: then a parameter of t's shape whose cast to t's dtype equals t."""
    grad_fn = t.grad_fn
    if grad_fn is None:
        return any(p.dtype != t.dtype and torch.equal(p.detach().to(t.dtype), t) for p in parameters.get(t.shape, ()))
    if type(grad_fn).__name__ != "ToCopyBackward0":
        return False
    source = grad_fn.next_functions[0][0]
    return source is not None and any(getattr(source, "variable", None) is p for p in parameters.get(t.shape, ()))


def saved_storage_bytes(forward, skip=lambda t: False):
    """Bytes autograd keeps for backward in `forward()` (each storage once; a tensor for which skip(t) is true left
    out), no backward run. Exact and the same on every device; also the bench's per-layer row (bench.saved_bytes)."""
    saved, kept = {}, []

    def pack(t):
        storage = t.untyped_storage()
        if not skip(t):  # the tensors are kept alive until forward() ends, so a pointer is never reused here
            saved[storage.data_ptr()] = storage.nbytes()
        kept.append(t)
        # Not t itself: a saved output would then hold its own autograd node, a cycle through C++ that Python's
        # collector cannot see (compare's full fine-tuning model stayed allocated through the LoRA runs).
        return None

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda packed: packed):
        out = forward()
    del out
    kept.clear()
    return sum(saved.values())


def saved_activation_bytes(model, inputs, targets):
    """Bytes autograd keeps for backward in one training forward (each storage once; parameters and their dtype
    casts excluded): the activation memory a step holds when backward starts."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    parameters = {}  # shape -> the trainable parameters of that shape
    for p in model.parameters():
        if p.requires_grad:
            parameters.setdefault(p.shape, []).append(p)
    return saved_storage_bytes(
        lambda: lm_loss(model(inputs), targets),
        skip=lambda t: t.untyped_storage().data_ptr() in param_storages or _is_parameter_cast(t, parameters))


def _proc_status_kib(field):
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(match.group(1)) if match else None
    except OSError:
        return None


class MemoryProbe:
    """Peak memory of a region of code. CUDA: the caching allocator's peak (torch.cuda.max_memory_allocated) above
    what was allocated at `baseline()`. CPU: the process's peak resident set (VmHWM in /proc/self/status, reset
    before each region by writing 5 to /proc/self/clear_refs) above the resident set at `baseline()`; glibc's
    free heap is returned to the OS (malloc_trim) before each reading so memory freed earlier does not hide new
    allocations."""

    def __init__(self, device):
        self.device = device
        self._libc = None
        if device.type == "cpu":
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                pass
        self.resettable = device.type == "cuda" or self._reset_hwm()
        self.base = 0
        if device.type == "cuda":
            self.method = "CUDA caching-allocator peak (torch.cuda.max_memory_allocated) minus the allocation before " \
                          "the model was built"
        elif self.resettable:
            # glibc raises its mmap threshold after large frees, so a step's tensors come from a heap whose holes
            # stay resident: helper 249 pinned the threshold (MALLOC_MMAP_THRESHOLD_) and the LoRA columns fell by
            # 41 and 27 MB
            self.method = "peak resident set per step (VmHWM, reset via /proc/self/clear_refs; glibc heap trimmed " \
                          "first) minus the resident set before the model was built. It counts glibc's heap, not " \
                          "only tensors: up to tens of MB, differing between methods (at --model-size small the " \
                          "two LoRA columns, equal in torch's own allocations, read 14 MB apart on a 2-core " \
                          "machine), so smaller differences are the allocator's; 'activations saved for bwd' " \
                          "counts tensors exactly"
        else:
            self.method = "peak resident set of the process (VmHWM; could not be reset per step) minus the resident " \
                          "set before the model was built: an upper bound"
        if device.type == "cpu" and _proc_status_kib("VmHWM") is None:
            self.method = "unavailable (no /proc/self/status)"

    def _trim(self):
        if self._libc is not None:
            self._libc.malloc_trim(0)

    @staticmethod
    def _reset_hwm():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def _current(self):
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        kib = _proc_status_kib("VmRSS")
        return None if kib is None else kib * 1024

    def baseline(self):
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._trim()
        self.base = self._current() or 0

    def start(self):
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._trim()
            if self.resettable:
                self._reset_hwm()

    def peak(self):
        """Peak bytes since start() above the baseline (None when it cannot be read)."""
        synchronize(self.device)
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        kib = _proc_status_kib("VmHWM")
        return None if kib is None else kib * 1024 - self.base


class ProgressBar:
    """A one-line progress bar on stderr, drawn only once the run has lasted `delay` seconds (short runs stay quiet).
    On a terminal it redraws in place; elsewhere (logs) it prints a line every 10%."""

    def __init__(self, total, enabled=True, stream=None, delay=2.0, width=30):
        self.total, self.done, self.enabled = max(total, 1), 0, enabled
        self.stream = stream or sys.stderr
        self.delay, self.width = delay, width
        self.start = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_decile = -1
        self._drawn = False

    def update(self, label):
        self.done = min(self.done + 1, self.total)
        if not self.enabled or time.perf_counter() - self.start < self.delay:
            return
        fraction = self.done / self.total
        elapsed = time.perf_counter() - self.start
        if self.tty:
            filled = int(self.width * fraction)
            self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {100 * fraction:3.0f}% "
                              f"{elapsed:5.1f}s  {label[:40]:40s}")
            self._drawn = True
        elif int(10 * fraction) > self._last_decile:
            self._last_decile = int(10 * fraction)
            self.stream.write(f"progress {100 * fraction:3.0f}% {elapsed:6.1f}s  {label}\n")
        self.stream.flush()

    def close(self):
        if self._drawn:
            self.stream.write("\r" + " " * (self.width + 60) + "\r")
            self.stream.flush()


# ------------------------------------------------------------------------------------------------ config

@dataclasses.dataclass
class CompareConfig:
    """Everything `run_compare` needs. None means the device's default (DEVICE_DEFAULTS / MODEL_SIZES)."""

    model_size: str = None
    hidden: int = None
    layers: int = None
    heads: int = None
    intermediate: int = None
    vocab: int = None
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False
    targets: tuple = DEFAULT_TARGETS
    steps: int = None
    warmup: int = None
    batch_size: int = None
    seq_len: int = None
    dtype: str = None
    device: str = None
    backend: str = "auto"
    lr: float = 1e-3  # full fine-tuning (AdamW)
    # LoRA usually takes a larger rate than full fine-tuning: on the default task, 3e-3 learned fastest of
    # {3e-3, 1e-2, 3e-2} for LoRA and 1e-3 of {1e-3, 3e-3} for full fine-tuning. Printed with the results.
    lora_lr: float = 3e-3
    task_vocab: int = 64
    infer_reps: int = None
    seed: int = 0
    threads: int = None  # torch.set_num_threads for the run (CPU); None keeps torch's default
    # torch.compile every decoder layer of all three models (see _compile_layers): without Python's per-op host time,
    # which a small model's eager step on a GPU is largely made of, the methods differ by their device work
    compile: bool = False
    progress: bool = False

    def resolved(self):
        """A copy with every None filled in and every value checked (ValueError names the option)."""
        device = backends.parse_device("compare", self.device)
        defaults = DEVICE_DEFAULTS[device.type]
        cfg = dataclasses.replace(self, device=str(device))
        for name in ("model_size", "dtype", "batch_size", "seq_len", "steps", "warmup", "infer_reps"):
            if getattr(cfg, name) is None:
                setattr(cfg, name, defaults[name])
        if self.warmup is None and isinstance(cfg.steps, int) and cfg.steps >= 1:
            # the default warm-up leaves a step to time: --steps 3 alone had been refused for a --warmup 3 not given
            cfg.warmup = min(cfg.warmup, cfg.steps - 1)
        if cfg.model_size not in MODEL_SIZES:
            raise ValueError(f"compare: --model-size expected one of {', '.join(MODEL_SIZES)}, got {cfg.model_size!r}")
        size = dict(MODEL_SIZES[cfg.model_size])
        heads_given = cfg.heads is not None
        if isinstance(cfg.hidden, int) and cfg.hidden >= 1 and cfg.heads is None:
            # the head count that divides hidden into even head dims nearest the preset's ("heads follow" --hidden:
            # hidden // head_dim alone had answered --hidden 100 with 6 heads, then refused them)
            size["heads"] = _fitting_heads(cfg.hidden, size["hidden"] // size["heads"])
        if cfg.hidden is not None and cfg.intermediate is None:
            size["intermediate"] = 16 * math.ceil(8 * cfg.hidden / 3 / 16)
        for name in size:
            if getattr(cfg, name) is None:
                setattr(cfg, name, size[name])
        cfg.dtype = dtype_name("compare", cfg.dtype)
        for name in ("hidden", "layers", "heads", "intermediate", "vocab", "rank", "batch_size", "seq_len", "steps",
                     "infer_reps", "task_vocab"):
            setattr(cfg, name, positive_int("compare", f"--{name.replace('_', '-')}", getattr(cfg, name)))
        if cfg.vocab < 2:  # the CLI's --vocab takes any int >= 1
            raise ValueError(f"compare: --vocab expected an int >= 2 (one token leaves nothing to predict: the loss is "
                             f"0 before any step, and nothing trains), got {cfg.vocab}")
        if cfg.threads is not None:
            cfg.threads = positive_int("compare", "--threads", cfg.threads)
        # torch's seeds are 64-bit, and the run seeds torch with seed .. seed + 4
        if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not -2 ** 63 <= cfg.seed <= 2 ** 64 - 5:
            raise ValueError(f"compare: --seed expected an int in [-2**63, 2**64 - 5], got {cfg.seed!r}")
        if isinstance(cfg.warmup, bool) or not isinstance(cfg.warmup, int) or not 0 <= cfg.warmup < cfg.steps:
            raise ValueError(f"compare: --warmup expected an int in [0, steps={cfg.steps}), got {cfg.warmup!r}")
        if cfg.hidden % 2:
            raise ValueError(f"compare: --hidden {cfg.hidden} expected an even number (the rotary head dim, hidden / "
                             f"heads, must be even)")
        if cfg.hidden % cfg.heads or (cfg.hidden // cfg.heads) % 2:
            heads = f"--heads {cfg.heads}" if heads_given else f"the {cfg.heads} heads of --model-size {cfg.model_size}"
            got = (f"{cfg.hidden} / {cfg.heads} is not a whole number" if cfg.hidden % cfg.heads
                   else f"the head dim {cfg.hidden} / {cfg.heads} = {cfg.hidden // cfg.heads} is odd")
            raise ValueError(f"compare: --hidden {cfg.hidden} expected a multiple of {heads} with an even head dim "
                             f"(the rotary embedding rotates pairs), but {got}; set --heads to fit")
        # AdamW's first step divides lr by 1 - beta1 (its default 0.9), a factor torch converts to float32: past
        # that range the run had ended in a traceback ("value cannot be converted to type float without overflow")
        largest_lr = torch.finfo(torch.float32).max * (1 - ADAMW_BETA1)
        for name in ("lr", "lora_lr"):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= largest_lr:
                raise ValueError(f"compare: --{name.replace('_', '-')} expected a number > 0 and at most "
                                 f"{largest_lr!r} (AdamW's first step is lr / (1 - beta1) = 10·lr, in float32), "
                                 f"got {value!r}")
        if isinstance(cfg.dropout, bool) or not isinstance(cfg.dropout, (int, float)) or not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"compare: --dropout expected a number in [0, 1), got {cfg.dropout!r}")
        if isinstance(cfg.alpha, bool) or not isinstance(cfg.alpha, (int, float)) or not is_finite_number(cfg.alpha):
            raise ValueError(f"compare: --alpha expected a finite number, got {cfg.alpha!r}")
        if cfg.alpha == 0:  # scaling 0: the LoRA columns' factors get zero gradients and never train
            raise ValueError(f"compare: --alpha expected a nonzero number (0 scales the adapter, and its gradients, "
                             f"to zero: the LoRA columns would train nothing), got {cfg.alpha!r}")
        # a truthy string such as "no" had passed here, to be refused by inject_lora once the model was built
        cfg.use_rslora = check_flag("compare", "--rslora", cfg.use_rslora)
        # with the other arguments: inject_lora would refuse it only after the full fine-tuning run
        check_layer_scaling("compare", lora_scaling(cfg.rank, cfg.alpha, cfg.use_rslora), DTYPES[cfg.dtype],
                            f"--alpha {cfg.alpha!r} / {'sqrt(--rank)' if cfg.use_rslora else '--rank'} at --rank "
                            f"{cfg.rank}")
        cfg.compile = check_flag("compare", "--compile", cfg.compile)
        if cfg.compile and cfg.warmup < 1:
            if self.warmup is None:  # the default warm-up was cut to steps - 1 = 0: --warmup 1 alone would not fit
                raise ValueError(f"compare: --compile expected --steps >= 2 (the first step compiles, and is not "
                                 f"timed), got --steps {cfg.steps}")
            raise ValueError(f"compare: --compile expected --warmup >= 1 (the first steps compile, and are not timed), "
                             f"got --warmup {cfg.warmup}")
        if isinstance(cfg.targets, str):  # tuple() had split it into letters, each "matching no nn.Linear"
            raise TypeError(f"compare: --targets expected a list or tuple of layer names, got the string "
                            f"{cfg.targets!r} (one name: ({cfg.targets!r},))")
        cfg.targets = tuple(cfg.targets)
        # the model's layer names are fixed: an entry that matches none is a typo, not a name of another model's
        # layer (it had only warned, from inject_lora, and the run went on with fewer LoRA layers)
        # every layer has the same names, so a one-layer model tells (the whole model on the meta device, once per
        # target, took minutes at --layers 20000), with a path into layer i as it names layer 0's module
        one_layer = dataclasses.replace(cfg.model_config(), layers=1)
        unmatched = [t for t in cfg.targets
                     if not expected_lora_params(one_layer, (_as_in_layer_zero(t, cfg.layers),), cfg.rank)]
        if not cfg.targets or unmatched:
            raise ValueError(f"compare: --targets {','.join(unmatched or cfg.targets)!r} matched no nn.Linear of the "
                             f"model; its layers are {', '.join(DEFAULT_TARGETS)} and lm_head")
        _check_full_fine_tuning_fits(cfg, device)
        reason = None if cfg.backend == "auto" else backends.unavailable_reason(cfg.backend, device)
        if reason is not None:
            raise ValueError(f"compare: --backend {cfg.backend!r} is not available for {device.type}: {reason}")
        return cfg

    def model_config(self):
        return ModelConfig(self.vocab, self.hidden, self.layers, self.heads, self.intermediate)


def _as_in_layer_zero(target, layers):
    """`target` naming layer 0's module where it names layer i < layers ("layers.1.self_attn.q_proj", or
    "1.self_attn.q_proj"), so a one-layer model can tell whether it matches: such a path into any layer but the first
    had been refused as matching no nn.Linear. Other targets as they are."""
    match = re.fullmatch(r"((?:layers\.)?)(0|[1-9]\d*)(\..+)", target)  # "01" names no layer
    if match and int(match.group(2)) < layers:
        return f"{match.group(1)}0{match.group(3)}"
    return target


def _fitting_heads(hidden, head_dim):
    """The number of heads that splits `hidden` into even head dims nearest `head_dim` (fewer heads on a tie); for
    an odd hidden, which no count fits, hidden // head_dim (resolved() then refuses it)."""
    divisors = set()
    for d in range(1, math.isqrt(hidden) + 1):
        if hidden % d == 0:
            divisors.update((d, hidden // d))
    fitting = [h for h in divisors if (hidden // h) % 2 == 0]
    if not fitting:
        return max(1, hidden // head_dim)
    return min(fitting, key=lambda h: (abs(hidden // h - head_dim), h))


# ------------------------------------------------------------------------------------------------ environment

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device):
    device = torch.device(device)
    triton_version = None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        pass
    env = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "lora_kernels": lora_kernels.__version__, "torch": torch.__version__, "triton": triton_version,
           "python": platform.python_version(), "device": device.type, "cpu": cpu_model(),
           "cpu_threads": torch.get_num_threads(), "gpu": None,
           # Other processes on a shared machine distort CPU timings: the load average says how busy it was.
           "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


# ------------------------------------------------------------------------------------------------ the three runs

METHODS = ("full", "lora_torch", "lora_fused")
# A step whose GPU work is less than this fraction of its median wall time gets a note: it waited on the host.
HOST_BOUND_BUSY = 0.5


def _compile_layers(model):
    """torch.compile each decoder layer in place. The layers share their code, so dynamo compiles it once for all of
    them (a layer's parameters are graph inputs): the compile time of one layer, not of the model."""
    for layer in model.layers:
        layer.compile()


# The three methods' variants of one layer's code (LoRA or not, the backend, training or eval, merged) are each
# compiled graphs of that code, all alive while the steps alternate (9 on CPU with torch 2.11 and 2.14), past dynamo's
# default limit of 8 per code object, beyond which it runs the code eagerly. Each method's variants fit in 8.
COMPILE_RECOMPILE_LIMIT = 8 * len(METHODS)


def _build(method, cfg, init_state, fused_backend):
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    with torch.device("meta"):
        model = DecoderLM(cfg.model_config(), dtype=dtype)
    model = model.to_empty(device=device)
    model.load_state_dict(init_state)
    if method != "full":
        torch.manual_seed(cfg.seed + 1)  # the same A init for both LoRA runs
        backend = "torch" if method == "lora_torch" else fused_backend
        inject_lora(model, list(cfg.targets), r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                    use_rslora=cfg.use_rslora, backend=backend)
    if cfg.compile:
        _compile_layers(model)
    return model


@torch.no_grad()
def _eval_loss(model, batch):
    was_training = model.training
    model.eval()
    loss = lm_loss(model(batch[0]), batch[1]).item()
    model.train(was_training)
    return loss


def device_time_ms(events):
    """Milliseconds of GPU work in torch.profiler's events (a profile's key_averages()): the device time of every
    kernel, copy and memset, summed as its table's "Self CUDA time total" sums it (CPU-side events and the device
    side of record_function ranges left out, so nothing counts twice)."""
    from torch.autograd import DeviceType
    return 1e-3 * sum(event.self_device_time_total for event in events
                      if event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False))


def gpu_busy_ms(step, device):
    """How long the GPU worked during one call of `step` (device_time_ms of a torch.profiler run of it; one stream,
    so its kernels do not overlap), or None off CUDA, where the ops run on the host that issues them, and where the
    profiler recorded no GPU work at all (no CUDA activity tracing: a step always launches kernels)."""
    if device.type != "cuda":
        return None
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        step()
        synchronize(device)
    return device_time_ms(profile.key_averages()) or None


def _train_step(model, optimizer, inputs, targets):
    optimizer.zero_grad(set_to_none=True)
    loss = lm_loss(model(inputs), targets)
    loss.backward()
    optimizer.step()
    return loss


class _MethodRun:
    """One method's training, stepped by its caller: the model, its AdamW and its own random streams. Every run's
    streams start from the same seed, so the two LoRA runs draw the same dropout masks however the three runs'
    steps interleave."""

    def __init__(self, method, model, cfg):
        self.method, self.model = method, model
        self.device = torch.device(cfg.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.lr = cfg.lr if method == "full" else cfg.lora_lr
        self.optimizer = torch.optim.AdamW(self.params, lr=self.lr, betas=(ADAMW_BETA1, 0.999), weight_decay=0.0)
        with self._forked_rng():
            torch.manual_seed(cfg.seed + 2)
            self._rng = self._rng_state()
        self.losses, self.step_seconds = [], []
        model.train()

    def _forked_rng(self):
        # fork_rng restores the caller's streams on exit, so the runs never draw from each other's
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def _rng_state(self):
        return torch.get_rng_state(), (torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)

    def step(self, inputs, targets, timed=False):
        """One training step on its own random streams; its wall time (device synchronised) is kept when `timed`."""
        with self._forked_rng():
            torch.set_rng_state(self._rng[0])
            if self._rng[1] is not None:
                torch.cuda.set_rng_state(self._rng[1], self.device)
            synchronize(self.device)
            t0 = time.perf_counter()
            loss = _train_step(self.model, self.optimizer, inputs, targets)
            synchronize(self.device)
            elapsed = time.perf_counter() - t0
            self._rng = self._rng_state()
        self.losses.append(loss.item())
        if timed:
            self.step_seconds.append(elapsed)

    def step_leaving_the_weights(self, inputs, targets):
        """A step whose AdamW update adds zero to every weight (lr 0, the same kernels; but -0·inf is NaN where a
        diverged run's update is not finite): the step profiled after training had trained the model once more, so
        its checkpoint and inference paths were of `steps` + 1 steps, its losses of `steps`. Its loss is not kept."""
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        try:
            self.step(inputs, targets)
        finally:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
        self.losses.pop()


def _train_alternated(runs, cfg, batches, progress):
    """Trains every run on `batches` (one per step) in rounds of one step each, the order reversed every round: a
    change of the machine's load (other jobs on a shared CPU, a laptop's clock falling as it heats, a GPU's clocks)
    then falls on every method alike, where training one method after another gave it to one column alone (a 2-core
    run under other jobs printed LoRA at 0.10x and 1.30x full fine-tuning's step time; the same methods alternated
    measured 0.93x and 0.87x), and no method always runs right after the same other one."""
    for step, (inputs, targets) in enumerate(batches):
        for run in (runs if step % 2 == 0 else runs[::-1]):
            run.step(inputs, targets, timed=step >= cfg.warmup)
            progress.update(f"{run.method}: step {step + 1}/{len(batches)}")


# Steps run only to measure peak memory, on a model of their own after an untimed first step (AdamW's state,
# compilation). On CPU the probe trims the heap before a step, and the step then faults that memory back in: 18-28%
# of a step's time on this project's 2-core machine, by method, so a probed step is never a timed one.
MEMORY_STEPS = 2


def _peak_step_bytes(method, cfg, init_state, fused_backend, batches, probe):
    """The largest of MEMORY_STEPS training steps' peak memory above what was allocated before the model was built
    (None when unreadable), measured with this method's model alone in memory: while training, all three are."""
    probe.baseline()
    run = _MethodRun(method, _build(method, cfg, init_state, fused_backend), cfg)
    run.step(*batches[0])
    peaks = []
    for inputs, targets in batches[:MEMORY_STEPS]:
        probe.start()
        run.step(inputs, targets)
        peaks.append(probe.peak())
    peak_values = [p for p in peaks if p is not None]
    return max(peak_values) if peak_values else None


def _results(run, cfg, batches, eval_batch):
    """A trained run's column of the table: parameters, memory, step time, losses (peak memory aside:
    _peak_step_bytes; checkpoint sizes: _checkpoint_sizes)."""
    model, optimizer = run.model, run.optimizer
    eval_loss = _eval_loss(model, eval_batch)
    # One more step, profiled (CUDA only), not timed: how much of a step the GPU works (a step far longer waited on
    # the host: Python and kernel launches, which the LoRA columns have more of, per layer, than full fine-tuning)
    busy_ms = gpu_busy_ms(lambda: run.step_leaving_the_weights(*batches[0]), run.device)
    trainable, total = count_parameters(model)
    tokens = cfg.batch_size * cfg.seq_len
    median = statistics.median(run.step_seconds)
    lora_layers = _lora_layers(model)
    extra = {}
    if lora_layers:  # B starts at zero: still all zero, the adapter never trained (its updates were lost)
        extra["adapter_trained"] = any(bool(layer.lora_B.weight.count_nonzero()) for layer in lora_layers)
    return {
        **extra,
        "lr": run.lr,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        "param_bytes": tensor_bytes(model.parameters()),
        "trainable_param_bytes": tensor_bytes(run.params),
        "grad_bytes": gradient_bytes(model),  # the .grad tensors after the last step (before any zero_grad)
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "saved_activation_bytes": saved_activation_bytes(model, *batches[0]),
        "step_ms_median": 1e3 * median,
        "step_ms_all": [1e3 * s for s in run.step_seconds],
        "gpu_busy_ms": busy_ms,
        "tokens_per_s": tokens / median,
        "train_losses": run.losses[:len(batches)],
        "eval_loss": eval_loss,
    }


def _lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def parameter_count(model_cfg):
    """DecoderLM's parameter count, from models of one and two layers on the meta device (its layers are alike)."""
    counts = []
    for layers in (1, 2):
        with torch.device("meta"):
            model = DecoderLM(dataclasses.replace(model_cfg, layers=layers))
        counts.append(sum(p.numel() for p in model.parameters()))
    return counts[0] + (model_cfg.layers - 1) * (counts[1] - counts[0])


def device_memory_bytes(device):
    """The device's total memory (a CUDA GPU's, or this machine's RAM), None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows) or no such name
        return None


def _check_full_fine_tuning_fits(cfg, device):
    """ValueError, before anything is allocated, for a model whose full fine-tuning state (weights, gradients and
    AdamW's two moments, in --dtype) alone exceeds the device's memory: it had run into an allocation failure, or
    the kernel's OOM killer, after minutes of building. A lower bound (the run also holds the LoRA models and
    activations), so no run that fits is refused."""
    memory = device_memory_bytes(device)
    params = parameter_count(cfg.model_config())
    state = 4 * params * getattr(torch, cfg.dtype).itemsize
    if memory is not None and state > memory:
        raise ValueError(f"compare: the model of --hidden {cfg.hidden}, --layers {cfg.layers}, --intermediate "
                         f"{cfg.intermediate}, --vocab {cfg.vocab} has {params:,} parameters: full fine-tuning's "
                         f"weights, gradients and AdamW moments alone take {state / 1e9:.3g} GB in {cfg.dtype}, more "
                         f"than the {memory / 1e9:.3g} GB of this {device.type} device; choose smaller sizes")


def expected_lora_params(model_cfg, targets, rank):
    """sum of r·(K + N) over the nn.Linear layers that `targets` selects in DecoderLM (for tests and the printout)."""
    with torch.device("meta"):
        model = DecoderLM(model_cfg)
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total


def _checkpoint_sizes(model, method, directory):
    """Writes what each method has to store and returns the file sizes: the full state dict (safetensors and
    torch.save) for full fine-tuning; the adapter alone for LoRA, as save_peft_adapter writes it (PEFT's
    adapter_model.safetensors, and its adapter_config.json beside it: PeftModel.from_pretrained loads the
    directory)."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    sizes = {}
    if method == "full":
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        path = os.path.join(directory, "model.safetensors")
        save_file(state, path)
        sizes["full_safetensors_bytes"] = os.path.getsize(path)
        path = os.path.join(directory, "model.pt")
        torch.save(state, path)
        sizes["full_torch_save_bytes"] = os.path.getsize(path)
        sizes["checkpoint_bytes"] = sizes["full_safetensors_bytes"]
        sizes["checkpoint_kind"] = "full model (safetensors)"
    else:
        from lora_kernels.peft_io import save_peft_adapter  # imported by compare runs only
        save_peft_adapter(model, directory)
        path = os.path.join(directory, "adapter_model.safetensors")
        sizes["adapter_safetensors_bytes"] = os.path.getsize(path)
        sizes["adapter_config_bytes"] = os.path.getsize(os.path.join(directory, "adapter_config.json"))
        sizes["adapter_tensor_bytes"] = tensor_bytes(p for name, p in model.named_parameters()
                                                     if ".lora_A." in name or ".lora_B." in name)
        sizes["checkpoint_bytes"] = sizes["adapter_safetensors_bytes"]
        sizes["checkpoint_kind"] = "adapter only (safetensors)"
    return sizes


# Untimed rounds of forward passes before the timed ones (first-call allocations, caches, kernel selection).
INFERENCE_WARMUP = 2


@torch.no_grad()
def _time_forwards(variants, inputs, reps, device):
    """The timed forward passes (ms, in order) of each of `variants` ({name: (prepare, model)}: prepare() puts the
    model into the variant's state, untimed), timed in rounds that run every variant once: a machine whose load
    changes during the measurement (other jobs on a shared CPU) slows every variant alike, where timing one variant's
    passes after the other's gave it alone the slow spell (a 2-core run printed the merged model at 6x the unmerged
    fused one's latency, which does strictly more work)."""
    for _ in range(INFERENCE_WARMUP):
        for prepare, model in variants.values():
            prepare()
            model(inputs)
    times = {name: [] for name in variants}
    for _ in range(reps):
        for name, (prepare, model) in variants.items():
            prepare()
            synchronize(device)
            t0 = time.perf_counter()
            model(inputs)
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: [1e3 * seconds for seconds in t] for name, t in times.items()}


@torch.no_grad()
def _inference(model, cfg, inputs, fused_backend, progress):
    """Forward latency of the trained LoRA model: unmerged with the unfused torch layer, unmerged with the fused
    backend, and merged (W + s·B·A folded into W, a plain F.linear), timed in interleaved rounds (_time_forwards):
    each path's median, and its timed passes under `<path>_ms_all`.
    The merged weights are made once by LoRALinear.merge and swapped in and out (a merge + unmerge per round would
    round a 16-bit weight anew each time); the model is left merged."""
    device = torch.device(cfg.device)
    model.eval()
    layers = _lora_layers(model)
    unmerged = [layer.weight.detach().clone() for layer in layers]
    for layer in layers:
        layer.merge()
    weights = {False: unmerged, True: [layer.weight.detach() for layer in layers]}

    def state(merged, backend=None):
        def prepare():
            for layer, weight in zip(layers, weights[merged]):
                layer.weight.data = weight
                layer.merged = merged
                if backend is not None:
                    layer.backend = backend
        return prepare

    variants = {"unmerged_unfused": (state(False, "torch"), model),
                "unmerged_fused": (state(False, fused_backend), model),
                "merged": (state(True), model)}
    result = {}
    for key, passes_ms in _time_forwards(variants, inputs, cfg.infer_reps, device).items():
        result[f"{key}_ms"] = statistics.median(passes_ms)
        result[f"{key}_ms_all"] = passes_ms  # every timed pass, as step_ms_all: the spread behind the median
    logits = {}
    for key, (prepare, _) in variants.items():
        prepare()
        logits[key] = model(inputs).float()
        progress.update(f"inference: {key}")
    reference = logits["unmerged_unfused"]
    denom = reference.norm().item() or 1.0
    result["merged_vs_unmerged_rel_diff"] = (logits["merged"] - reference).norm().item() / denom
    result["fused_vs_unfused_rel_diff"] = (logits["unmerged_fused"] - reference).norm().item() / denom
    # a diverged run's: the differences are then NaN, which says nothing about the fused backend
    result["unfused_logits_finite"] = bool(torch.isfinite(reference).all())
    result["tokens"] = inputs.numel()
    result["reps"] = cfg.infer_reps
    return result


# The fused backends in the order they measured on an H100 (fwd+bwd at M = 8192: cuda 1.58 ms, triton 2.77 ms;
# backends.auto_backend). Triton on CPU tensors is the test interpreter, never a measurement.
FUSED_BACKENDS = ("cuda", "triton", "cpu")
UNFUSED_BACKENDS = ("torch", "reference")  # compositions of torch ops: the 'fused' column then runs no fused kernel


def fused_backend_for(cfg):
    """(backend name, note) of the 'fused' LoRA run: `cfg.backend` resolved. "auto" takes what backend="auto"
    picks for lora_linear, unless that is the unfused torch composition (on GPUs: backends.auto_backend says why): the
    run would then repeat the unfused column, so it shows the fastest available fused backend instead (by the H100
    measurement, FUSED_BACKENDS), and says so."""
    device = torch.device(cfg.device)
    if cfg.backend == "auto":
        chosen = backends.auto_backend(device, "lora_linear", DTYPES[cfg.dtype])
        fused = _fused_available(device)
        if chosen in UNFUSED_BACKENDS and fused:
            return fused[0], (f"backend='auto' runs lora_linear on {device.type} with the unfused {chosen!r} "
                              f"composition (auto's choice by measurement: backends.auto_backend, BENCHMARKS.md); "
                              f"this column shows the fastest fused kernels, {fused[0]!r}, instead (--backend picks "
                              "another)")
    else:  # resolved() refused a backend that cannot run here
        chosen = cfg.backend
    note = None
    if chosen in UNFUSED_BACKENDS and cfg.backend != "auto":
        # asked for by name: a fused backend may well be available, the user chose not to run it
        note = (f"--backend {chosen!r} is not a fused backend: the 'fused' column runs the {chosen!r} composition "
                f"(fused backends available here: {', '.join(_fused_available(device)) or 'none'})")
    elif chosen in UNFUSED_BACKENDS:
        missing = {name: backends.unavailable_reason(name, device) for name in ("triton", "cuda", "cpu")}
        why = "; ".join(f"{name}: {reason}" for name, reason in missing.items() if reason)
        note = (f"no fused backend is available for {device.type} tensors here, so the 'fused' run uses the "
                f"{chosen!r} backend too ({why})")
    elif chosen == "triton" and device.type != "cuda":
        note = ("--backend 'triton' on CPU tensors runs the Triton interpreter (TRITON_INTERPRET=1, for tests): its "
                "step times and latencies are the interpreter's, not a kernel's")
    return chosen, note


def _fused_available(device):
    """The fused backends that run `device` tensors as kernels (the Triton interpreter on CPU is not one)."""
    return [name for name in FUSED_BACKENDS if backends.unavailable_reason(name, device) is None
            and not (name == "triton" and device.type != "cuda")]


def run_compare(config=None, progress_stream=None):
    """Runs full fine-tuning, LoRA (torch backend) and LoRA (fused backend) from one init on the same batches, their
    steps alternated, and returns every measurement as a JSON-serialisable dict (see format_compare for what each one
    means)."""
    cfg = (config or CompareConfig()).resolved()
    with torch_threads(cfg.threads):
        if not cfg.compile:
            return _run_compare(cfg, progress_stream)
        torch._dynamo.reset()  # graphs of an earlier run would count against the limit below
        limit = max(torch._dynamo.config.recompile_limit, COMPILE_RECOMPILE_LIMIT)
        with torch._dynamo.config.patch(recompile_limit=limit):
            return _run_compare(cfg, progress_stream)


@contextlib.contextmanager
def torch_threads(threads):
    """torch's CPU thread count set to `threads` (None: torch's own) inside the block, the caller's restored after
    it (compare's and bench's --threads)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_compare(cfg, progress_stream):
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    fused_backend, fused_note = fused_backend_for(cfg)
    model_cfg = cfg.model_config()
    env = environment(device)  # now: the load average before the run's own load, the date it started
    started = time.perf_counter()
    progress = ProgressBar(1 + 3 + 3 * cfg.steps + 3 + 3, enabled=cfg.progress, stream=progress_stream)

    torch.manual_seed(cfg.seed)
    with torch.device(device):
        base = DecoderLM(model_cfg, dtype=dtype)
    base.init_weights()
    init_state = {k: v.detach().to("cpu", copy=True) for k, v in base.state_dict().items()}
    del base

    perm = make_task(cfg.vocab, cfg.task_vocab, cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed + 3)
    batches = [tuple(t.to(device) for t in make_batch(perm, cfg.batch_size, cfg.seq_len, generator))
               for _ in range(cfg.steps)]
    eval_batch = tuple(t.to(device) for t in make_batch(perm, cfg.batch_size, cfg.seq_len,
                                                        torch.Generator().manual_seed(cfg.seed + 4)))

    # One untimed step of each method first: lazily created library state (thread pools, kernel caches, Triton
    # compilation, with --compile the compiler's own state) would otherwise land in the first method's memory.
    for method in METHODS:
        model = _build(method, cfg, init_state, fused_backend)
        _train_step(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0), *batches[0])
        del model
    progress.update("warm-up")

    probe = MemoryProbe(device)
    peaks = {}
    for method in METHODS:
        peaks[method] = _peak_step_bytes(method, cfg, init_state, fused_backend, batches, probe)
        progress.update(f"{method}: memory")

    runs = [_MethodRun(method, _build(method, cfg, init_state, fused_backend), cfg) for method in METHODS]
    init_eval_loss = _eval_loss(runs[0].model, eval_batch)
    _train_alternated(runs, cfg, batches, progress)
    methods, inference = {}, None
    with tempfile.TemporaryDirectory(prefix="lora_kernels_compare_") as tmp:
        while runs:
            run = runs.pop(0)
            method, model = run.method, run.model
            result = _results(run, cfg, batches, eval_batch)
            result["peak_step_bytes"] = peaks[method]
            result.update(_checkpoint_sizes(model, method, os.path.join(tmp, method)))
            result["backend"] = {"full": None, "lora_torch": "torch", "lora_fused": fused_backend}[method]
            if method != "full":
                result["lora_layers"] = len(_lora_layers(model))
            progress.update(f"{method}: checkpoint")
            if method == "lora_fused":
                inference = _inference(model, cfg, eval_batch[0], fused_backend, progress)
            methods[method] = result
            del run, model  # the next method's measurements run without this model in memory
    progress.close()

    return {
        "config": dataclasses.asdict(cfg),
        "environment": env,
        "model": {"name": f"Llama-style decoder ({cfg.model_size})", **dataclasses.asdict(model_cfg),
                  "total_params": methods["full"]["total_params"],
                  "expected_lora_params": expected_lora_params(model_cfg, cfg.targets, cfg.rank)},
        "task": {"kind": "next-token prediction on a fixed random permutation chain", "task_vocab": perm.numel(),
                 "tokens_per_step": cfg.batch_size * cfg.seq_len, "initial_eval_loss": init_eval_loss,
                 "uniform_loss": math.log(cfg.vocab)},
        "backends": {"available": [b for b in backends.available_backends(device) if b != "reference"],
                     "fused": fused_backend, "fused_note": fused_note},
        "methods": methods,
        "inference": inference,
        "measurement": {
            "memory": probe.method,
            "optimizer_state": "sum of numel × element_size over the tensors in optimizer.state (AdamW)",
            "gradients": "sum of numel × element_size over every parameter's .grad after the last step",
            "activations": "storages autograd saves for backward in one training forward (saved_tensors_hooks), "
                           "parameters and their dtype casts (float32 LoRA factors in a 16-bit model) excluded",
            "step_time": f"median wall time of steps {cfg.warmup + 1}..{cfg.steps} (device synchronised), "
                         f"first {cfg.warmup} not timed, the three methods' steps in alternating rounds"
                         + (", every decoder layer compiled with torch.compile (before the timed steps)"
                            if cfg.compile else ""),
            "checkpoint": "real file sizes written to a temporary directory",
            "inference": f"median of {cfg.infer_reps} forward passes after {INFERENCE_WARMUP} warm-up passes, eval "
                         f"mode, no grad, the three paths in alternating rounds",
        },
        "wall_s": time.perf_counter() - started,
    }


# ------------------------------------------------------------------------------------------------ printing

def _fmt_scaled(n, units, unscaled):
    """n in the largest of units (largest first) it reaches, two decimals; `unscaled` below them all."""
    for i, (unit, scale) in enumerate(units):
        if abs(n) >= scale:
            text = f"{n / scale:.2f}"
            if i > 0 and abs(float(text)) >= 1000:  # rounded up into the next unit: 999999 is "1.00 M"
                unit, scale = units[i - 1]
                text = f"{n / scale:.2f}"
            return f"{text} {unit}"
    return unscaled


def fmt_count(n):
    return _fmt_scaled(n, (("G", 1e9), ("M", 1e6), ("k", 1e3)), str(n))


def fmt_bytes(n):
    if n is None:
        return "n/a"
    return _fmt_scaled(n, (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)), f"{n} B")


def _ratio(value, reference):
    if value is None or not reference:
        return ""
    ratio = value / reference
    # two significant digits under 0.1: a 976 B adapter against a 268 kB model is 0.0036×, not "0.00×"
    return f" ({ratio:.2g}×)" if 0 < abs(ratio) < 0.095 else f" ({ratio:.2f}×)"


def _percent(value):
    # two significant digits under 0.1%: the seed's "0.01% of a 70B model" is not "0.00%"
    return f"{value:.2g}%" if 0 < value < 0.095 else f"{value:.2f}%"


def _scaling_text(cfg):
    """The LoRA scaling the runs used, and which rule gave it (--rslora: alpha / sqrt(r), else alpha / r)."""
    scaling = lora_scaling(cfg["rank"], cfg["alpha"], cfg["use_rslora"])
    return f"alpha/sqrt(r) = {scaling:g} (rsLoRA)" if cfg["use_rslora"] else f"alpha/r = {scaling:g}"


# A column whose timed steps got this much slower or faster from the first third to the last is flagged: its median
# then describes a machine that changed under the run. The H200 run of 2026-11-29 printed the fused column at 1.28x
# full fine-tuning's step time while its steps rose from 37.7 to 61.5 ms (full fine-tuning's stayed at 39-40 ms).
STEP_DRIFT_LIMIT = 0.10
# The largest relative difference between the fused and the unfused column's logits (the same trained model, eval
# mode) that is rounding: twice design.md §7's per-op tolerance of the dtype, for a whole model's depth.
LOGITS_TOLERANCE = {"float32": 2e-3, "float16": 1e-2, "bfloat16": 4e-2}


def step_time_thirds(step_ms):
    """(median of the first third, median of the last third) of a run's timed steps; None for fewer than 6 steps,
    too few for thirds."""
    third = len(step_ms) // 3
    if third < 2:
        return None
    return statistics.median(step_ms[:third]), statistics.median(step_ms[-third:])


# A column whose timed steps' interquartile range passes this fraction of their median is flagged: its median then
# describes a load that changed during the run more than the method. Alternated steps share a changing load, but a
# median taken over a wide spread still moves with how the spikes fell (a 2-core run under other jobs, the methods
# then trained one after another, had steps of 438-1328, 1695-11714 and 1027-13828 ms).
STEP_SPREAD_LIMIT = 0.25


def step_time_spread(step_ms):
    """(first quartile, third quartile) of a run's timed steps when they are more than STEP_SPREAD_LIMIT of the
    median apart, else None (and None for fewer than 4 steps)."""
    if len(step_ms) < 4:
        return None
    q1, _, q3 = statistics.quantiles(step_ms, n=4)
    return (q1, q3) if q3 - q1 > STEP_SPREAD_LIMIT * statistics.median(step_ms) else None


def step_time_drift(step_ms):
    """step_time_thirds when the two differ by more than STEP_DRIFT_LIMIT, else None."""
    thirds = step_time_thirds(step_ms)
    return thirds if thirds is not None and abs(thirds[1] - thirds[0]) > STEP_DRIFT_LIMIT * thirds[0] else None


def _count_of(count, noun):
    """'1 layer', '4 layers'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def machine_text(env):
    """Where a result was measured, for the first line of compare's and bench's tables: the GPU, or the CPU and its
    threads; then the load average when the run started (other jobs distort the timings)."""
    where = env["gpu"] if env["device"] == "cuda" else f"{env['cpu']}, {_count_of(env['cpu_threads'], 'thread')}"
    if env.get("load_average"):
        where += f", load average {env['load_average'][0]:.2f} at start"
    return where


def _loss_text(loss):
    """A loss for the table; None is a non-finite loss of a result read back from JSON (json_safe wrote it as null)."""
    return "n/a" if loss is None else f"{loss:.3f}"


def _step_time_notes(result, names):
    """The notes on whether the step times were steady: a load change under every column, a column whose steps
    drifted or spread on its own, too few timed steps to tell. `names`: the three columns' headers."""
    methods, env = result["methods"], result["environment"]
    notes = []
    drifts = {method: step_time_drift(methods[method]["step_ms_all"]) for method in METHODS}
    # saved results of older versions, whose methods trained one after another, say no "alternating rounds"
    alternated = "alternating rounds" in result.get("measurement", {}).get("step_time", "")
    together = alternated and all(d is not None and (d[1] > d[0]) == (drifts["full"][1] > drifts["full"][0])
                                  for d in drifts.values())
    if together:  # one change of the machine's load under every column: the alternated steps shared it
        went = ", ".join(f"{name.split(' (')[0]} {drifts[method][0]:.1f} -> {drifts[method][1]:.1f} ms"
                         for method, name in zip(METHODS, names))
        notes.append(f"  note: every column's step time {'rose' if drifts['full'][1] > drifts['full'][0] else 'fell'} "
                     f"during the run ({went}: medians of the first and last thirds of the timed steps): the "
                     f"machine's load changed; the methods' steps alternated, so the ratios compare them under the "
                     f"same load, but no median is a steady-state time")
    for method, name in zip(METHODS, () if together else names):
        drift = drifts[method]
        if drift is not None:
            notes.append(f"  note: {name}: the step time went from {drift[0]:.1f} ms (median of the first third of the "
                         f"timed steps) to {drift[1]:.1f} ms (the last third): the run was not steady (other work on "
                         f"the machine, or too few --warmup steps?), so its step-time ratio is not a steady-state "
                         f"measurement")
        elif (spread := step_time_spread(methods[method]["step_ms_all"])) is not None:
            notes.append(f"  note: {name}: its timed steps spread from {spread[0]:.1f} to {spread[1]:.1f} ms (first "
                         f"to third quartile) around the median: the machine's load changed during the run (other "
                         f"work on it{_threads_advice(env)}), so its step-time ratio is not a steady-state "
                         f"measurement")
    timed_steps = len(methods["full"]["step_ms_all"])
    if timed_steps < 4:  # step_time_spread / step_time_drift need 4 and 6: no note could say the run was unsteady
        notes.append(f"  note: {_count_of(timed_steps, 'timed step')} per column: too few to tell whether the step "
                     f"times are steady, so the step-time ratios may be noise (more --steps)")
    return notes


def format_compare(result):
    """The side-by-side table of full FT vs LoRA (unfused torch) vs LoRA (fused), with ratios against full FT."""
    cfg, env, model, task = result["config"], result["environment"], result["model"], result["task"]
    methods, inference, fused = result["methods"], result["inference"], result["backends"]["fused"]
    lines = [
        f"lora-kernels compare: {env['device']} ({machine_text(env)}), {cfg['dtype']}, torch {env['torch']}, "
        f"triton {env['triton'] or '-'}, {env['date']}",
        f"model: {model['name']}: hidden {model['hidden']}, {_count_of(model['layers'], 'layer')}, "
        f"{_count_of(model['heads'], 'head')}, "
        f"MLP {model['intermediate']}, vocab {model['vocab']}; {fmt_count(model['total_params'])} parameters, "
        f"random init (seed {cfg['seed']})",
        f"task: {task['kind']} over {_tokens(task['task_vocab'])}; batch {cfg['batch_size']} x seq {cfg['seq_len']} = "
        f"{_count_of(task['tokens_per_step'], 'token')}/step; {_count_of(cfg['steps'], 'AdamW step')} "
        f"({cfg['warmup']} warm-up, not timed)"
        + ("; every decoder layer compiled (torch.compile)" if cfg.get("compile") else ""),
        f"LoRA: r={cfg['rank']}, alpha={cfg['alpha']:g}, scaling {_scaling_text(cfg)}, dropout {cfg['dropout']:g} on "
        f"{','.join(cfg['targets'])} ({_count_of(methods['lora_torch']['lora_layers'], 'layer')}); "
        f"lr {cfg['lr']:g} (full) / {cfg['lora_lr']:g} (LoRA)",
        f"backends available: {', '.join(result['backends']['available'])}; fused run: "
        f"backend={cfg['backend']!r} -> {fused}",
    ]
    if result["backends"]["fused_note"]:
        lines.append(f"  note: {result['backends']['fused_note']}")
    if cfg["dropout"] > 0:
        lines.append("  note: with dropout, both LoRA columns redraw the dropout mask from a seed in backward; PEFT's "
                     "own layer saves it, so its activation and peak memory are higher than the torch column's "
                     "(`lora-kernels bench --sections train` times and measures PEFT's layer with dropout 0.1)")
    if cfg["dtype"] in ("bfloat16", "float16"):
        # "both run the branch in the model's dtype" was untrue of the cpu kernels, which save x·Aᵀ in float32
        lines.append("  note: in a 16-bit model both LoRA columns keep float32 factors (PEFT's autocast_adapter_dtype) "
                     "and take each layer's 16-bit input as it is (the torch column runs the LoRA branch in the "
                     "model's dtype; a fused kernel may keep x·Aᵀ, r values per token, in float32); PEFT's own layer "
                     "runs it in float32, on a float32 copy of each layer's input, which it also saves for backward: "
                     "more activation memory than the torch column's. Full fine-tuning trains the 16-bit weights "
                     "themselves, their gradients and AdamW moments 16-bit too (8 bytes per parameter; "
                     "mixed-precision training's float32 master weights and moments take about 16)")
    # the torch / reference compositions (--backend torch, or no fused backend here, as without the C++ extension on
    # CPU: a note says so) are no fused run; "(fused)" had said they were
    kind = "unfused" if fused in UNFUSED_BACKENDS else "fused"
    headers = ["", "full fine-tuning", "LoRA, torch (unfused)", f"LoRA, {fused} ({kind})"]
    full = methods["full"]
    gpu_busy = all(methods[m].get("gpu_busy_ms") is not None for m in METHODS)  # CUDA runs (not saved results of old)

    def row(label, fn):
        return [label] + [fn(methods[m], m) for m in METHODS]

    rows = [
        row("trainable params",
            lambda r, m: f"{fmt_count(r['trainable_params'])} ({_percent(r['trainable_percent'])})"),
        row("weights (all params)", lambda r, m: fmt_bytes(r["param_bytes"])),
        row("gradients (.grad)", lambda r, m: fmt_bytes(r["grad_bytes"]) + _ratio(r["grad_bytes"], full["grad_bytes"])),
        row("optimizer state (AdamW)", lambda r, m: fmt_bytes(r["optimizer_state_bytes"])
            + _ratio(r["optimizer_state_bytes"], full["optimizer_state_bytes"])),
        row("activations saved for bwd", lambda r, m: fmt_bytes(r["saved_activation_bytes"])
            + _ratio(r["saved_activation_bytes"], full["saved_activation_bytes"])),
        row("peak memory / step [1]", lambda r, m: fmt_bytes(r["peak_step_bytes"])
            + _ratio(r["peak_step_bytes"], full["peak_step_bytes"])),
        row("step time (median)", lambda r, m: f"{r['step_ms_median']:.1f} ms"
            + _ratio(r["step_ms_median"], full["step_ms_median"])),
        row("step time (min - max)", lambda r, m: f"{min(r['step_ms_all']):.1f} - {max(r['step_ms_all']):.1f} ms"),
        *([row("GPU busy / step [3]", lambda r, m: f"{r['gpu_busy_ms']:.1f} ms"
               + _ratio(r["gpu_busy_ms"], full["gpu_busy_ms"]))] if gpu_busy else []),
        row("tokens / s", lambda r, m: f"{r['tokens_per_s']:,.0f}"),
        row("checkpoint on disk [2]", lambda r, m: fmt_bytes(r["checkpoint_bytes"])
            + ("" if m == "full" else _ratio(r["checkpoint_bytes"], full["checkpoint_bytes"]))),
        row("loss: first step -> last", lambda r, m: f"{_loss_text(r['train_losses'][0])} -> "
            f"{_loss_text(r['train_losses'][-1])}"),
        row("eval loss after training", lambda r, m: _loss_text(r["eval_loss"])),
    ]
    widths = [max(len(str(line[i])) for line in [headers] + rows) for i in range(len(headers))]
    lines.append("")
    lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    for line in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    lines.append(f"(eval loss before training: {_loss_text(task['initial_eval_loss'])}; "
                 f"ln(vocab) = {task['uniform_loss']:.3f}; ratios in parentheses are against full fine-tuning)")
    lines += _step_time_notes(result, headers[1:])
    compile_hint = "" if cfg.get("compile") else "; --compile compiles the layers to cut the host time"
    for method, name in zip(METHODS, headers[1:]):
        busy = methods[method].get("gpu_busy_ms") if gpu_busy else None
        if busy is not None and busy < HOST_BOUND_BUSY * methods[method]["step_ms_median"]:
            lines.append(f"  note: {name}: the GPU worked {busy / methods[method]['step_ms_median']:.0%} of the "
                         f"median step and waited on the host the rest (Python and kernel launches): its step-time "
                         f"ratio measures host time more than GPU work, which the GPU busy row compares"
                         f"{compile_hint}")
    for method, name in zip(METHODS, headers[1:]):
        losses = methods[method]["train_losses"]
        bad = next((i for i, loss in enumerate(losses) if loss is None or not math.isfinite(loss)), None)
        if bad is None:
            continue
        why = (" (float16 AdamW state: squared gradients under ~6e-8 and eps 1e-8 round to 0 in float16, so updates "
               "divide by 0; --dtype bfloat16 or float32 avoid it)" if cfg["dtype"] == "float16" else "")
        lines.append(f"  note: {name}: the training loss is not finite from step {bad + 1} on{why}; its column "
                     f"measures a diverged run")
    for method, name in zip(METHODS, headers[1:]):
        if methods[method].get("adapter_trained") is False:  # absent for full fine-tuning and older results
            lines.append(f"  note: {name}: every lora_B is still zero after training, so the adapter adds nothing "
                         f"and its eval loss is the untrained model's: its updates were lost (as under a large "
                         f"--alpha, whose squared gradients pass float32's range in AdamW's state and make every "
                         f"update 0); its column measures no training")
    if inference:
        lines += _inference_lines(inference, fused, kind, cfg, env)
    m = result["measurement"]
    lines.append("")
    lines.append(f"[1] {m['memory']}.")
    config_bytes = methods["lora_torch"].get("adapter_config_bytes")  # absent from results saved before
    config_text = f", beside its {fmt_bytes(config_bytes)} adapter_config.json" if config_bytes else ""
    lines.append(f"[2] full fine-tuning stores the whole model (model.safetensors); LoRA stores the adapter, as "
                 f"save_peft_adapter writes it (adapter_model.safetensors{config_text}: PEFT's format); torch.save of "
                 f"the full model: {fmt_bytes(full['full_torch_save_bytes'])}.")
    if gpu_busy:
        lines.append("[3] the GPU's own time in one more step (its kernels, copies and memsets, by torch.profiler), "
                     "not timed; a step longer than it waited on the host.")
    lines.append(f"step time: {m['step_time']}. Total run {result['wall_s']:.1f} s.")
    return "\n".join(lines)


def _threads_advice(env):
    """The advice for an unsteady CPU measurement, unless the run had one thread already."""
    return "; on a shared CPU --threads 1 steadies it" if env["device"] == "cpu" and env["cpu_threads"] != 1 else ""


# The share of inference rounds an unmerged path must win for compare to call it faster than the merged model by
# its GEMMs rather than by the machine's load
SYSTEMATIC_ROUNDS = 0.9
# Fewer rounds than this tell neither: one round faster in 1 of 1 had been called "not the machine's load"
SYSTEMATIC_MIN_ROUNDS = 5


def _tokens(count):
    return f"{count} token{'' if count == 1 else 's'}"


def _inference_lines(inference, fused, kind, cfg, env):
    """The inference latency block: each path's median against the merged model's, its range, and notes on a
    merged model measured slower than an unmerged one and on fused logits that differ beyond rounding."""
    lines = []
    merged = inference["merged_ms"]
    lines.append("")
    lines.append(f"inference latency of the trained LoRA model, {_tokens(inference['tokens'])} per forward "
                 f"(median of {inference['reps']}, eval mode, no grad):")
    for key, label in (("merged_ms", "merged (W + s·B·A folded into W)"),
                       ("unmerged_unfused_ms", "unmerged, torch (unfused)"),
                       ("unmerged_fused_ms", f"unmerged, {fused} ({kind})")):
        passes = inference.get(f"{key}_all")  # absent from results saved before the passes were kept
        spread = f"  (min - max {min(passes):.2f} - {max(passes):.2f} ms)" if passes else ""
        lines.append(f"  {label:36s} {inference[key]:9.2f} ms  {inference[key] / merged:5.2f}× merged{spread}")
    # merged is one F.linear per layer, the unmerged paths that and the LoRA branch: faster by a load change during
    # the passes, unless faster in nearly every round (each times every path once, so a load change slows all of
    # a round's passes): then the path runs its GEMMs another way. Comparing the ranges instead called one slow
    # pass of 20 "the machine's load" (helper 249).
    slower, apart, too_few = [], {}, []
    for key, label in (("unmerged_unfused_ms", "torch"), ("unmerged_fused_ms", fused)):
        if inference[key] < merged:
            passes, merged_passes = inference.get(f"{key}_all"), inference.get("merged_ms_all")
            faster = (sum(p < m for p, m in zip(passes, merged_passes))
                      if passes and merged_passes and len(passes) == len(merged_passes) else 0)
            if faster and faster >= SYSTEMATIC_ROUNDS * len(passes):
                if len(passes) < SYSTEMATIC_MIN_ROUNDS:
                    too_few.append((label, len(passes)))
                else:
                    apart.setdefault(label, (faster, len(passes)))
            else:
                slower.append(label)
    if too_few:
        lines.append(f"  note: the merged model does strictly less work than the unmerged one, yet measured "
                     f"slower than the unmerged {' and '.join(dict.fromkeys(label for label, _ in too_few))} path "
                     f"in all of {_count_of(too_few[0][1], 'round')}: too few to tell the machine's load from GEMMs "
                     f"run another way (more --infer-reps)")
    if slower:
        lines.append(f"  note: the merged model does strictly less work than the unmerged one, yet measured "
                     f"slower than the unmerged {' and '.join(dict.fromkeys(slower))} path: the machine's load "
                     f"changed during these {inference['reps']} passes, so the latencies are not steady-state "
                     f"measurements (more --infer-reps{_threads_advice(env)})")
    for label, (faster, rounds) in apart.items():
        why = ""
        # up to CPU_DECODE_MAX_M tokens the C++ forward keeps its base GEMM in 16 bits
        if (label == "cpu" and env["device"] == "cpu" and cfg["dtype"] in ("float16", "bfloat16")
                and inference["tokens"] > CPU_DECODE_MAX_M):
            why = (f": the C++ CPU kernels run {cfg['dtype']} GEMMs on float32 copies, which on a CPU without "
                   f"{cfg['dtype']} matrix units is faster than torch's {cfg['dtype']} GEMM of the merged model")
        lines.append(f"  note: the unmerged {label} path was faster than the merged model, which does strictly less "
                     f"work, in {faster} of {rounds} rounds (each timing every path once): not the machine's load, "
                     f"but GEMMs run another way{why}")
    rel_diff = inference["merged_vs_unmerged_rel_diff"]
    lines.append(f"  (merged vs unmerged logits: relative difference {rel_diff:.1e})")
    fused_diff = inference.get("fused_vs_unfused_rel_diff")  # absent from results saved before it was printed
    if fused_diff is not None:
        lines.append(f"  (fused vs unfused logits: relative difference {fused_diff:.1e})")
        tolerance = LOGITS_TOLERANCE.get(cfg["dtype"])
        if inference.get("unfused_logits_finite") is False:  # absent (True) in results saved before it was kept
            lines.append("  note: the torch column's logits are not finite (its training diverged), so the fused "
                         "column's logits are not compared with them")
        elif tolerance is not None and not fused_diff <= tolerance:
            lines.append(f"  note: LoRA, {fused} ({kind}): its logits differ from the torch column's by "
                         f"{fused_diff:.1e} (relative), above {tolerance:g} for {cfg['dtype']}, on the same "
                         f"trained model: the fused backend computes another function, so its column does not "
                         f"measure the same LoRA")
    return lines


def plot_compare(result, path):
    """Six panels (parameters, memory, step time, checkpoint, inference latency, loss curves) into `path`."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("compare --plot needs matplotlib, which is not installed "
                           "(pip install matplotlib, or pip install 'lora_kernels[bench]')") from exc
    methods = result["methods"]
    fused = result["backends"]["fused"]
    labels = ["full FT", "LoRA torch", f"LoRA {fused}"]
    colors = ["#4c72b0", "#dd8452", "#55a868"]
    values = [methods[m] for m in METHODS]

    def bars(ax, names, heights, title, fmt, bar_colors=colors):
        drawn = ax.bar(names, heights, color=bar_colors)
        ax.bar_label(drawn, labels=[fmt(h) for h in heights], fontsize=8)
        ax.set_title(title)
        ax.margins(y=0.15)

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    bars(axes[0, 0], labels, [v["trainable_params"] for v in values], "trainable parameters", fmt_count)
    ax = axes[0, 1]
    width = 0.16
    xs = range(len(labels))
    for offset, (key, name) in enumerate((("param_bytes", "weights"), ("grad_bytes", "gradients"),
                                          ("optimizer_state_bytes", "optimizer state"),
                                          ("saved_activation_bytes", "saved activations"),
                                          ("peak_step_bytes", "peak / step"))):
        ax.bar([x + (offset - 2) * width for x in xs], [(v[key] or 0) / 1e6 for v in values], width, label=name)
    ax.set_xticks(list(xs), labels)
    ax.set_title("memory (MB)")
    ax.legend(fontsize=8)
    bars(axes[0, 2], labels, [v["step_ms_median"] for v in values], "training step time (ms, median)",
         lambda h: f"{h:.1f}")
    bars(axes[1, 0], labels, [v["checkpoint_bytes"] / 1e6 for v in values], "checkpoint on disk (MB)",
         lambda h: f"{h:.3g}")
    inference = result["inference"]
    bars(axes[1, 1], ["merged", "unmerged torch", f"unmerged {fused}"],
         [inference["merged_ms"], inference["unmerged_unfused_ms"], inference["unmerged_fused_ms"]],
         "inference latency (ms, median)", lambda h: f"{h:.2f}", ["#8172b2", "#dd8452", "#55a868"])
    ax = axes[1, 2]
    for label, color, style, v in zip(labels, colors, ("-", "-", "--"), values):
        ax.plot(range(1, len(v["train_losses"]) + 1), v["train_losses"], style, label=label, color=color)
    ax.set_xlabel("step")
    ax.set_title("training loss")
    ax.legend(fontsize=8)
    env = result["environment"]
    fig.suptitle(f"lora-kernels compare: {env['gpu'] or env['cpu']}, {result['config']['dtype']}, "
                 f"r={result['config']['rank']}")
    fig.tight_layout()
    # the format by PATH's extension, PNG without one (savefig had written PATH.png then)
    fig.savefig(path, dpi=100, format=None if os.path.splitext(path)[1][1:] else "png")  # "fig." has none either
    plt.close(fig)
    return path


def json_safe(value):
    """`value` with every non-finite float (a diverged loss) as None: JSON has no NaN or Infinity, and parsers other
    than Python's (JavaScript's JSON.parse, strict ones) reject the bare NaN that json.dumps writes by default."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def to_json(result):
    """Standard JSON (non-finite numbers as null)."""
    return json.dumps(json_safe(result), indent=2, allow_nan=False)
