"""`lora-kernels bench`: the microbenchmark sweep of design.md §8 for the backends available here, as ratios
measured in one run against named baselines (base F.linear, the two base GEMMs, PEFT's unfused layer, full
fine-tuning, one adapter, the per-adapter loop, a measured copy).

`run_bench(BenchConfig(...)) -> dict` measures; `format_bench(result) -> str` prints; the CLI wraps both.
GPU timings: CUDA events around each call after warm-up, the median, several rotating input sets (weights
included) so the L2 cache never holds the next call's operands. CPU timings: time.perf_counter, the median.
"""

import contextlib
import dataclasses
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lora_kernels import backends
from lora_kernels.batch import LoRABatch
from lora_kernels.compare import (DTYPES, ProgressBar, dtype_name, environment, machine_text, saved_storage_bytes,
                                  synchronize, torch_threads)
from lora_kernels.functional import CUDA_BWD_DY_KERNEL_MAX_WORK, lora_linear, multi_lora_linear
from lora_kernels.ops import add_lora, check_flag, lora_expand, lora_shrink, positive_int

# Shapes (design.md §8 on GPUs; scaled down on CPU so the whole sweep takes about two minutes on 2 cores).
PRESETS = {
    "cuda": {"dtype": "bfloat16", "hidden": 4096, "rank": 16, "ranks": (8, 16, 64),
             "ms": (1, 16, 256, 4096, 8192, 16384), "train_m": 8192, "prefill_tokens": 4096, "warmup": 10,
             "reps": 30, "copy_mb": 1024, "sweep_tokens": (1, 16, 64, 256, 1024, 4096, 8192),
             "sweep_adapters": (1, 4, 16, 64)},
    "cuda_quick": {"dtype": "bfloat16", "hidden": 4096, "rank": 16, "ranks": (16,), "ms": (1, 256, 8192),
                   "train_m": 8192, "prefill_tokens": 4096, "warmup": 5, "reps": 10, "copy_mb": 512,
                   "sweep_tokens": (16, 64, 4096), "sweep_adapters": (1, 16, 64)},
    "cpu": {"dtype": "float32", "hidden": 512, "rank": 16, "ranks": (8, 16, 64), "ms": (1, 16, 256, 1024),
            "train_m": 1024, "prefill_tokens": 1024, "warmup": 5, "reps": 30, "copy_mb": 128,
            "sweep_tokens": (1, 16, 64, 256, 1024), "sweep_adapters": (1, 4, 16, 64)},
    "cpu_quick": {"dtype": "float32", "hidden": 256, "rank": 16, "ranks": (16,), "ms": (1, 64, 256),
                  "train_m": 256, "prefill_tokens": 256, "warmup": 1, "reps": 5, "copy_mb": 32,
                  "sweep_tokens": (16, 256), "sweep_adapters": (1, 16)},
}
# Sections of the sweep, in order. "sweep" (the grouped decode/prefill grid of the multi-adapter issue: token counts
# x distinct adapters, and mixed ranks) is long and runs only when asked for.
SECTIONS = ("host", "forward", "train", "grouped", "decode", "sweep")
DEFAULT_SECTIONS = ("host", "forward", "train", "grouped", "decode")
# On GPUs, calls at up to this many tokens are also timed as CUDA-graph replays: eager calls there measure the host
# path (Python, dispatch, launches) as much as the kernels (BENCHMARKS.md: F.linear at M = 1 took 32-40 µs eager
# on an H100, where reading W takes 11 µs), and serving stacks replay graphs at decode sizes.
GRAPH_MAX_TOKENS = 256
CUDA_DECODE_MAX_M = 16  # kDecodeMaxM in csrc/cuda/lora_linear.cu: the rows of the hand-written decode forward
MIXED_RANKS = (8, 16, 32, 64)  # the mixed-rank rows cycle these over the slots (R = 64)
PREFILL_ADAPTERS = 16  # design.md §8: grouped prefill with 16 distinct adapters
LOOP_ADAPTERS = 64  # design.md §8: grouped op vs per-adapter loop, and the decode bandwidth case
DECODE_TOKENS = 64
# Host overhead rows: a shape so small that the kernels take a few µs, so the time per call is what the Python and
# C++ host path costs (argument checks, dispatch, autograd, launches); against F.linear at the same shape.
HOST_SHAPE = {"m": 1, "k": 64, "n": 64, "r": 8, "slots": 8}
# the best of HOST_REPEATS runs of HOST_CALLS calls (a shared CPU is noisy), after HOST_WARMUP calls
HOST_CALLS, HOST_REPEATS, HOST_WARMUP = 100, 5, 10
DROPOUT = 0.1  # the dropout of the "unfused layer vs ours" row (PEFT's common lora_dropout)
ROUNDS = 2  # the candidates of a row are timed alternately in this many rounds, so clock drift hits both alike
# Rotating input sets: enough sets that their bytes exceed this many times the last-level cache.
CACHE_MULTIPLE = 3
# GPU spin before a timed loop of graph replays (see _time_calls): about 10 ms at H100/H200 clocks (1.6-2 GHz), far
# longer than the host needs to queue one round's calls (about 15 calls at 10-20 µs each).
BACKLOG_SLEEP_CYCLES = 20_000_000
CPU_CACHE_BYTES = 32 << 20  # an assumed last-level cache for CPUs (not read from the machine)
GPU_L2_FALLBACK_BYTES = 50 << 20  # an H100's L2, for a torch whose device properties lack L2_cache_size
MAX_SETS, MAX_ROTATION_BYTES = 8, {"cuda": 8 << 30, "cpu": 1 << 30}

# design.md §8 targets: (comparison, value). They are GPU targets; on CPU they are printed for reference only.
TARGETS = {
    "fwd_decode": ("<=", 1.10), "fwd_prefill": ("<=", 1.05), "fwd_bwd_vs_gemms": ("<=", 1.08),
    "unfused_vs_ours": (">=", 1.3), "lora_vs_full": ("<=", 0.72), "grouped_distinct": ("<=", 1.05),
    "grouped_vs_loop": ("<=", 0.1), "decode_bandwidth": (">=", 0.8), "memory_vs_unfused": ("<=", 1.0),
    "peak_memory_vs_unfused": ("<=", 1.0),
}
FLOORS = {"fwd_decode": 1.01, "fwd_prefill": 1.01, "fwd_bwd_vs_gemms": 1.01, "lora_vs_full": 0.67,
          "grouped_distinct": 1.01, "decode_bandwidth": 1.0}


@dataclasses.dataclass
class BenchConfig:
    device: str = None
    dtype: str = None
    quick: bool = False
    backends: tuple = None  # None: every available backend but reference (and the Triton interpreter on CPU)
    hidden: int = None  # K = N
    rank: int = None
    ranks: tuple = None
    ms: tuple = None
    train_m: int = None
    prefill_tokens: int = None
    warmup: int = None
    reps: int = None
    copy_mb: int = None
    sections: tuple = None  # None: DEFAULT_SECTIONS; ("all",): SECTIONS
    sweep_tokens: tuple = None
    sweep_adapters: tuple = None
    threads: int = None
    seed: int = 0
    progress: bool = False

    def resolved(self):
        """A copy with every None filled in from the device's preset and every value checked before any work: a
        ValueError (a TypeError for a bool option that is no bool, or a list option that is a string or no list)
        naming the option as the CLI spells it (train_m: --train-m)."""
        device = backends.parse_device("bench", self.device)
        quick = check_flag("bench", "--quick", self.quick)  # a truthy string such as "no" had picked the quick preset
        preset = PRESETS[device.type + ("_quick" if quick else "")]
        cfg = dataclasses.replace(self, device=str(device), quick=quick)
        for name, value in preset.items():
            if getattr(cfg, name) is None:
                setattr(cfg, name, value)
        cfg.progress = check_flag("bench", "progress", cfg.progress)
        cfg.dtype = dtype_name("bench", cfg.dtype)
        if cfg.backends is None:
            cfg.backends = tuple(b for b in backends.available_backends(device)
                                 if b != "reference" and not (b == "triton" and device.type == "cpu"))
        cfg.backends = _listed("--backends", cfg.backends, "names")
        unknown = [name for name in cfg.backends if name not in backends.BACKENDS]
        if unknown:  # unavailable_reason's own message for these offers 'auto', which the bench has no rows for
            raise ValueError(f"bench: --backends expected names from {', '.join(backends.BACKENDS)}, got "
                             f"{','.join(map(str, unknown))}")
        cfg.backends = tuple(dict.fromkeys(cfg.backends))  # a name given twice is measured once
        for name in cfg.backends:
            reason = backends.unavailable_reason(name, device)
            if reason is not None:
                raise ValueError(f"bench: --backends {name!r} is not available for {device.type}: {reason}")
        for name in ("hidden", "rank", "train_m", "prefill_tokens", "reps", "copy_mb"):
            setattr(cfg, name, positive_int("bench", _option(name), getattr(cfg, name)))
        # a negative warm-up had run none, and a bool where an int belongs had passed as 0 or 1
        if isinstance(cfg.warmup, bool) or not isinstance(cfg.warmup, int) or cfg.warmup < 0:
            raise ValueError(f"bench: --warmup expected an int >= 0, got {cfg.warmup!r}")
        if cfg.threads is not None:  # 0 would keep torch's thread count, as None does
            cfg.threads = positive_int("bench", "--threads", cfg.threads)
        if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not -2 ** 63 <= cfg.seed < 2 ** 64:
            raise ValueError(f"bench: --seed expected an int in [-2**63, 2**64 - 1] (torch's seeds are 64-bit), got "
                             f"{cfg.seed!r}")
        for name in ("ranks", "ms", "sweep_tokens", "sweep_adapters"):
            values = _listed(_option(name), getattr(cfg, name), "ints")
            # shapes and counts: --ms 0 had timed empty tensors, --sweep-adapters 0 ended the run in a
            # ZeroDivisionError, a negative entry, a float or a bool in a torch error
            if any(isinstance(value, bool) or not isinstance(value, int) or value < 1 for value in values):
                raise ValueError(f"bench: {_option(name)} expected ints >= 1, got {values!r}")
            setattr(cfg, name, tuple(dict.fromkeys(values)))  # a value given twice is measured once
        sections = DEFAULT_SECTIONS if cfg.sections is None else _listed("--sections", cfg.sections, "names")
        if sections == ("all",):
            sections = SECTIONS
        unknown = [name for name in sections if name not in SECTIONS]
        if unknown:
            misspelt = [str(name) for name in unknown if name != "all"]
            raise ValueError(f"bench: --sections expected names from {', '.join(SECTIONS)} (or all alone), "
                             f"got {','.join(map(str, sections))}"
                             + (f" (unknown: {','.join(misspelt)})" if misspelt else " (all goes alone)"))
        cfg.sections = tuple(name for name in SECTIONS if name in sections)
        for section, adapters in (("grouped", LOOP_ADAPTERS), ("sweep", PREFILL_ADAPTERS)):
            if section in cfg.sections and cfg.prefill_tokens < adapters:  # fewer tokens: fewer adapters than named
                raise ValueError(f"bench: --prefill-tokens expected at least {adapters} with the {section} section "
                                 f"(its rows spread the tokens over {adapters} distinct adapters), got "
                                 f"{cfg.prefill_tokens}")
        if "sweep" in cfg.sections and not _sweep_points(cfg):
            raise ValueError(f"bench: --sweep-adapters {','.join(map(str, cfg.sweep_adapters))} expected a count <= "
                             f"one of --sweep-tokens {','.join(map(str, cfg.sweep_tokens))} (the sweep skips points "
                             f"with more distinct adapters than tokens, so it would have no grid)")
        return cfg


def _option(name):
    """A BenchConfig field as the CLI spells its option: train_m -> --train-m."""
    return "--" + name.replace("_", "-")


def _listed(option, value, kind):
    """value (a list, tuple or other iterable of `kind`, "names" or "ints") as a tuple. A string, which tuple() had
    split into letters (ranks="16" had measured ranks "1" and "6"), a single value and an empty list are refused
    naming the option."""
    if isinstance(value, (str, bytes)):
        one = f" (one name: ({value!r},))" if kind == "names" else ""
        raise TypeError(f"bench: {option} expected a list or tuple of {kind}, got the string {value!r}{one}")
    try:
        values = tuple(value)
    except TypeError:
        raise TypeError(f"bench: {option} expected a list or tuple of {kind}, got {value!r}") from None
    if not values:  # an empty list had left its rows out silently
        raise ValueError(f"bench: {option} expected a non-empty list of {kind}, got {value!r}")
    return values


# ------------------------------------------------------------------------------------------------ timing

def _cache_bytes(device):
    if device.type == "cuda":
        l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
        return l2_bytes or GPU_L2_FALLBACK_BYTES
    return CPU_CACHE_BYTES


def num_sets(device, set_bytes):
    """How many rotating input sets: their total exceeds CACHE_MULTIPLE × the cache, within MAX_SETS and memory."""
    wanted = math.ceil(CACHE_MULTIPLE * _cache_bytes(device) / max(set_bytes, 1))
    affordable = max(1, MAX_ROTATION_BYTES[device.type] // max(set_bytes, 1))
    return int(max(2, min(wanted, MAX_SETS, affordable)))


def _warm_up(fns, warmup):
    for i in range(warmup):
        fns[i % len(fns)]()


def _time_calls(fns, device, reps, backlog=False, first=0):
    """Milliseconds of each of `reps` calls, cycling through `fns` (one callable per input set) from fns[first].

    backlog: on CUDA, queue BACKLOG_SLEEP_CYCLES of GPU spinning before the calls, so each call's start event waits
    behind the previous call's work and times the kernels alone. Without it, a call shorter than the host's time
    per loop (event records, a graph replay: several µs) starts on an idle GPU and its events also count the host's
    launch gap: CUDA-graph rows (kernels only) use it; eager rows, which include the host path, do not."""
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        if backlog:
            torch.cuda._sleep(BACKLOG_SLEEP_CYCLES)
        for i, (start, end) in enumerate(events):
            start.record()
            fns[(first + i) % len(fns)]()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fns[(first + i) % len(fns)]()
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def forward_kind(m):
    """The design.md §8 forward target a token count M falls under: decode (M <= 16), prefill (M >= 256), or none
    in between."""
    return "fwd_decode" if m <= 16 else "fwd_prefill" if m >= 256 else None


def host_time_ms(fn, device):
    """Wall time per call of HOST_CALLS back-to-back calls, the device synchronised only after the last, best of
    HOST_REPEATS runs after HOST_WARMUP calls: the host cost of a call wherever the device keeps up (tiny shapes)."""
    for _ in range(HOST_WARMUP):
        fn()
    best = math.inf
    for _ in range(HOST_REPEATS):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(HOST_CALLS):
            fn()
        synchronize(device)
        best = min(best, 1e3 * (time.perf_counter() - t0) / HOST_CALLS)
    return best


def graphed(fn, device):
    """A callable that replays a CUDA graph of fn(). fn runs three times first on a side stream, so autotuning,
    lazy initialisation and workspace allocation happen before the capture (the pattern of torch.cuda.graphs'
    documentation); the graph's outputs live in its own memory pool."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _calls_per_round(reps):
    """measure's timed calls per candidate in each of its ROUNDS rounds: at least `reps` in all."""
    return max(1, math.ceil(reps / ROUNDS))


def timed_calls(reps):
    """How many calls measure times per candidate for `reps`: as many in each of its ROUNDS rounds, so at least reps."""
    return ROUNDS * _calls_per_round(reps)


def measure(candidates, device, reps, warmup, graph=False):
    """{name: median ms} for {name: [callables]}, timed alternately in ROUNDS rounds (warm-up before the first).
    graph: on CUDA, time replays of a CUDA graph of each callable instead of eager calls (the kernels alone)."""
    if graph and device.type == "cuda":
        candidates = {name: [graphed(fn, device) for fn in fns] for name, fns in candidates.items()}
    for fns in candidates.values():  # every candidate warm before the first is timed (clocks, caches, allocator)
        _warm_up(fns, warmup)
    times = {name: [] for name in candidates}
    per_round = _calls_per_round(reps)
    for round_index in range(ROUNDS):
        for name, fns in candidates.items():
            # each round goes on through the input sets where the last one stopped: restarting at set 0 had timed
            # only the first few sets (in the cache) when a round has fewer calls than there are sets
            times[name] += _time_calls(fns, device, per_round, backlog=graph, first=round_index * per_round)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory(fn, device):
    """Peak bytes allocated during fn() above what was allocated before it (CUDA only; None elsewhere)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def saved_bytes(forward, exclude=()):
    """Bytes autograd saves for backward in `forward()`, each storage once, the storages of `exclude` (tensors that
    exist anyway: the layer's weights) left out: the activation memory a layer adds between forward and backward.
    Works on every device."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    return saved_storage_bytes(forward, skip=lambda t: t.untyped_storage().data_ptr() in excluded)


# ------------------------------------------------------------------------------------------------ the layers

def peft_lora_forward(x, weight, lora_a, lora_b, scaling, dropout_p):
    """PEFT's LoRA Linear forward, composed of autograd ops: base(x) + lora_B(lora_A(dropout(x))) * scaling."""
    result = F.linear(x, weight)
    return result + F.linear(F.linear(F.dropout(x, dropout_p, training=dropout_p > 0), lora_a), lora_b) * scaling


def per_adapter_loop(x, weight, lora_as, lora_bs, scalings, token_indices):
    """PEFT's mixed-batch forward: the base layer, then a Python loop over adapters gathering each one's tokens
    (index_select) and adding its LoRA output back (index_add_). The index tensors are built once outside the
    timing, which is generous to the loop (PEFT builds them from a Python list on every call)."""
    result = F.linear(x, weight)
    for lora_a, lora_b, scaling, index in zip(lora_as, lora_bs, scalings, token_indices):
        sub = x.index_select(0, index)
        result.index_add_(0, index, F.linear(F.linear(sub, lora_a), lora_b) * scaling)
    return result


class InputSets:
    """Rotating sets of random operands for one (M, K, N, r) shape."""

    def __init__(self, device, dtype, m, k, n, r, *, grad=False, count=None):
        factory = {"device": device, "dtype": dtype}
        set_bytes = (m * k + n * k + r * (k + n) + m * n * (2 if grad else 1)) * torch.finfo(dtype).bits // 8
        self.count = count or num_sets(device, set_bytes)
        self.sets = []
        for _ in range(self.count):
            s = {
                "x": torch.randn(m, k, **factory).requires_grad_(grad),
                "w": torch.randn(n, k, **factory) / math.sqrt(k),
                "a": (torch.randn(r, k, **factory) / math.sqrt(k)).requires_grad_(grad),
                "b": (torch.randn(n, r, **factory) / math.sqrt(r)).requires_grad_(grad),
            }
            if grad:
                s["dy"] = torch.randn(m, n, **factory)
                s["w_ft"] = s["w"].clone().requires_grad_(True)
            self.sets.append(s)

    def fns(self, fn):
        return [lambda s=s: fn(**s) for s in self.sets]


# ------------------------------------------------------------------------------------------------ the sweep

def _row(rows, section, kind, backend, shape, ours, baseline, ratio, ours_value, baseline_value, unit, on_gpu,
         note=None):
    comparison, value = TARGETS.get(kind, (None, None))
    meets = None
    if on_gpu and comparison is not None and ratio is not None:
        meets = ratio <= value if comparison == "<=" else ratio >= value
    rows.append({"section": section, "kind": kind, "backend": backend, "shape": shape, "ours": ours,
                 "baseline": baseline, "ratio": ratio, "ours_value": ours_value, "baseline_value": baseline_value,
                 "unit": unit, "target": None if comparison is None else f"{comparison} {value:g}",
                 "floor": FLOORS.get(kind), "meets_target": meets, "note": note})


@contextlib.contextmanager
def _guard(rows, section, backend, shape, on_gpu):
    """A backend that raises gets an error row; the sweep goes on, so one broken kernel hides no other number."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001  (any failure is reported in the table and the JSON)
        _row(rows, section, "error", backend, shape, "error", "-", None, None, None, "ms", on_gpu,
             note=f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")


def _sweep_points(cfg):
    """(tokens, distinct adapters) of the grouped sweep: every adapter count up to the token count."""
    return [(tokens, adapters) for tokens in cfg.sweep_tokens for adapters in cfg.sweep_adapters if adapters <= tokens]


def _sweep_ranks(cfg):
    """The ranks of the rank sweep: --ranks, and --rank after them when they lack it (design.md §8's fwd+bwd / the
    two base GEMMs row is measured in the sweep, at the main rank; it had been left out without a word)."""
    return tuple(dict.fromkeys((*cfg.ranks, cfg.rank)))


def _count_units(cfg):
    """Progress-bar steps of the sections asked for."""
    per_backend = {"host": 1, "forward": len(cfg.ms), "train": 2 * len(_sweep_ranks(cfg)) + 3, "grouped": 4,
                   "decode": 1, "sweep": len(_sweep_points(cfg)) + 2}
    units = sum(per_backend[name] for name in cfg.sections) * len(cfg.backends)
    return units + ("host" in cfg.sections) + ("decode" in cfg.sections or "sweep" in cfg.sections)


def run_bench(config=None, progress_stream=None, on_update=None):
    """Runs the sweep; returns {"config", "environment", "timing", "copy_bandwidth_gbs", "rows", "wall_s",
    "partial": False}. on_update(result) is called after every measurement with the rows so far ("partial": True),
    so a run stopped by a timeout still leaves what it measured (the CLI's --save writes each update)."""
    cfg = (config or BenchConfig()).resolved()
    device = torch.device(cfg.device)
    # CUDA events, torch.cuda._sleep and graph capture work on the current device's stream: with --device cuda:1
    # while cuda:0 was current they timed an idle stream of GPU 0 and captured none of the kernels.
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with torch_threads(cfg.threads), on_device:
        return _run_bench(cfg, progress_stream, on_update)


def triton_configs():
    """{kernel: {autotune key: chosen config}} of the single-adapter Triton kernels run so far in this process
    (empty when they were not imported): which tile the autotuner picked for each shape."""
    module = sys.modules.get("lora_kernels.triton.lora_linear")
    if module is None:
        return {}
    chosen = {}
    for name in ("_shrink", "_fwd", "_fwd_tma", "_bwd_dy", "_bwd_dx", "_bwd_dx_tma", "_bwd_da"):
        cache = getattr(getattr(module, name, None), "cache", None) or {}
        if cache:
            chosen[name.lstrip("_")] = {str(key): str(config) for key, config in cache.items()}
    return chosen


def _assemble(cfg, device, env, rows, copy_gbs, started, partial):
    on_gpu = device.type == "cuda"
    return {
        "config": dataclasses.asdict(cfg),
        "environment": env,
        "timing": ("CUDA events around each call after warm-up, median" if on_gpu else
                   "time.perf_counter around each call after warm-up, median")
                  + f"; {timed_calls(cfg.reps)} calls after {cfg.warmup} warm-up, in "
                    f"{ROUNDS} alternating rounds per row; up to {MAX_SETS} rotating input sets per row, aiming at "
                    f"{CACHE_MULTIPLE}× the "
                  + ("L2 cache" if on_gpu else f"assumed {CPU_CACHE_BYTES >> 20} MB cache")
                  + " in total (rows whose sets are smaller stay below it: their timings include cache hits)",
        "copy_bandwidth_gbs": copy_gbs,
        "graph_max_tokens": GRAPH_MAX_TOKENS if on_gpu else None,
        "triton_configs": triton_configs(),
        "rows": list(rows),
        "wall_s": time.perf_counter() - started,
        "partial": partial,
    }


def _run_bench(cfg, progress_stream, on_update):
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    on_gpu = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    env = environment(device)  # now: the load average before the run's own load, the date it started
    started = time.perf_counter()
    progress = ProgressBar(_count_units(cfg), enabled=cfg.progress, stream=progress_stream)
    rows = []
    timing = {"device": device, "reps": cfg.reps, "warmup": cfg.warmup}
    copy = {"gbs": None}

    def step(label):
        progress.update(label)
        if on_update is not None:
            on_update(_assemble(cfg, device, env, rows, copy["gbs"], started, partial=True))

    args = (rows, cfg, device, dtype, timing, on_gpu, step)
    if "host" in cfg.sections:
        host_overhead_rows(rows, cfg, device, dtype, on_gpu, step)
    if "forward" in cfg.sections:
        forward_rows(*args)
    if "train" in cfg.sections:
        training_rows(*args)
    if "grouped" in cfg.sections:
        grouped_rows(*args)
    if "decode" in cfg.sections or "sweep" in cfg.sections:
        copy["gbs"] = copy_bandwidth(cfg.copy_mb * (1 << 20) // 4, timing)
        step("copy bandwidth")
    if "decode" in cfg.sections:
        decode_rows(*args, copy["gbs"])
    if "sweep" in cfg.sections:
        sweep_rows(*args, copy["gbs"])
    progress.close()
    return _assemble(cfg, device, env, rows, copy["gbs"], started, partial=False)


def forward_rows(rows, cfg, device, dtype, timing, on_gpu, step):
    """Fused forward / base F.linear at every M. On GPUs, M <= GRAPH_MAX_TOKENS is timed as CUDA-graph replays
    (the kernels: these rows carry the targets) and also eagerly (what a plain Python call costs). Triton on GPUs:
    the shrink's K-split against none (M <= GRAPH_MAX_TOKENS), and on sm_90+ the opt-in TMA forward against the
    default pointer-load forward (M >= 256). cuda at M <= CUDA_DECODE_MAX_M: its decode kernel against its GEMM path."""
    k = n = cfg.hidden
    r = cfg.rank
    section = "forward / base F.linear"
    for m in cfg.ms:
        inputs = InputSets(device, dtype, m, k, n, r)
        kind = forward_kind(m)
        shape = f"M={m} K={k} N={n} r={r}"
        for backend in cfg.backends:
            candidates = {"base": inputs.fns(lambda x, w, a, b: F.linear(x, w)),
                          "ours": inputs.fns(lambda x, w, a, b, be=backend: lora_linear(x, w, a, b, 2.0,
                                                                                         backend=be))}
            graph = on_gpu and m <= GRAPH_MAX_TOKENS
            with _guard(rows, section, backend, shape, on_gpu), torch.no_grad():
                t = measure(candidates, graph=graph, **timing)
                _row(rows, section + (", CUDA-graph replay" if graph else ""), kind, backend, shape,
                     "lora_linear forward", "F.linear(x, W)", t["ours"] / t["base"], t["ours"], t["base"], "ms",
                     on_gpu)
            if backend == "triton" and on_gpu and m <= GRAPH_MAX_TOKENS:
                split_section = "Triton forward: shrink split over K (default) / no split"
                with _guard(rows, split_section, backend, shape, on_gpu), torch.no_grad():
                    unsplit = [_with_triton_setting("SPLIT_OVERRIDE", 1, fn) for fn in candidates["ours"]]
                    t = measure({"unsplit": unsplit, "split": candidates["ours"]}, graph=graph, **timing)
                    _row(rows, split_section, "triton_split", backend, shape, "lora_linear forward, shrink split",
                         "same with SPLIT_OVERRIDE = 1", t["split"] / t["unsplit"], t["split"], t["unsplit"], "ms",
                         on_gpu)
            if backend == "triton" and on_gpu and kind == "fwd_prefill" and _triton_tma_available(device):
                tma_section = "Triton forward: TMA loads (LORA_KERNELS_TRITON_TMA=1) / pointer loads (default)"
                with _guard(rows, tma_section, backend, shape, on_gpu), torch.no_grad():
                    t = measure({"pointer": [_with_triton_setting("USE_TMA", False, fn) for fn in candidates["ours"]],
                                 "tma": [_with_triton_setting("USE_TMA", True, fn) for fn in candidates["ours"]]},
                                graph=graph, **timing)
                    _row(rows, tma_section, "triton_tma", backend, shape, "lora_linear forward, TMA kernel",
                         "same, pointer-load kernel", t["tma"] / t["pointer"], t["tma"], t["pointer"], "ms", on_gpu)
            if backend == "cuda" and m <= CUDA_DECODE_MAX_M:
                cuda_decode_row(rows, inputs, m, timing, graph, on_gpu)
            if graph:
                eager = section + ", eager calls (host path included)"
                with _guard(rows, eager, backend, shape, on_gpu), torch.no_grad():
                    t = measure(candidates, **timing)
                    _row(rows, eager, "fwd_eager", backend, shape, "lora_linear forward", "F.linear(x, W)",
                         t["ours"] / t["base"], t["ours"], t["base"], "ms", on_gpu)
            step(f"forward M={m} {backend}")
        del inputs


def rank_sweep_rows(rows, cfg, device, dtype, timing, on_gpu, step):
    """At the training M, for every rank of _sweep_ranks: forward / base F.linear and fwd+bwd / the two base GEMMs;
    the cuda dY-once kernel against two GEMMs at the training M and at its bound (CUDA_BWD_DY_KERNEL_MAX_WORK)."""
    k = n = cfg.hidden
    m, r = cfg.train_m, cfg.rank
    for rank in _sweep_ranks(cfg):
        inputs = InputSets(device, dtype, m, k, n, rank, grad=True)
        # design.md §8's targets are for r = cfg.rank (16); the other ranks' rows are reported without one
        kind_of = (lambda kind, rank=rank: kind if kind is None or rank == cfg.rank else f"{kind}_other_rank")
        for backend in cfg.backends:
            shape = f"M={m} K={k} N={n} r={rank}"
            # as forward_rows: the forward targets are for the kernels, so a GPU row at M <= GRAPH_MAX_TOKENS is timed
            # as CUDA-graph replays (eager, its host path had been judged against them)
            graph = on_gpu and m <= GRAPH_MAX_TOKENS
            section = "forward / base F.linear, rank sweep" + (", CUDA-graph replay" if graph else "")
            with _guard(rows, section, backend, shape, on_gpu), torch.no_grad():
                t = measure({"base": inputs.fns(lambda x, w, a, b, **_: F.linear(x, w)),
                             "ours": inputs.fns(lambda x, w, a, b, be=backend, **_: lora_linear(
                                 x, w, a, b, 2.0, backend=be))}, graph=graph, **timing)
                _row(rows, section, kind_of(forward_kind(m)), backend, shape, "lora_linear forward", "F.linear(x, W)",
                     t["ours"] / t["base"], t["ours"], t["base"], "ms", on_gpu)
            step(f"rank {rank} forward {backend}")

            def ours(x, w, a, b, dy, be=backend, **_):
                return torch.autograd.grad(lora_linear(x, w, a, b, 2.0, backend=be), (x, a, b), dy)

            def gemms(x, w, dy, **_):
                with torch.no_grad():
                    return F.linear(x, w), dy @ w
            section = "LoRA fwd+bwd / the two base GEMMs (x·Wᵀ, dY·W)"
            with _guard(rows, section, backend, shape, on_gpu):
                t = measure({"gemms": inputs.fns(gemms), "ours": inputs.fns(ours)}, **timing)
                _row(rows, section, kind_of("fwd_bwd_vs_gemms"), backend, shape, "lora_linear fwd+bwd (dX, dA, dB)",
                     "x·Wᵀ + dY·W", t["ours"] / t["gemms"], t["ours"], t["gemms"], "ms", on_gpu)
            if backend == "cuda":
                cuda_bwd_dy_row(rows, inputs, shape, timing, on_gpu)
            step(f"rank {rank} fwd+bwd {backend}")
        del inputs
    if "cuda" in cfg.backends:  # the dY-once kernel also where it runs: M·r at its bound
        bound_m = CUDA_BWD_DY_KERNEL_MAX_WORK // r
        inputs = InputSets(device, dtype, bound_m, k, n, r, grad=True)
        cuda_bwd_dy_row(rows, inputs, f"M={bound_m} K={k} N={n} r={r}", timing, on_gpu)
        del inputs


def training_rows(rows, cfg, device, dtype, timing, on_gpu, step):
    """At the training M: the rank sweep (rank_sweep_rows), then fwd+bwd against PEFT's unfused layer with dropout
    and against full fine-tuning, activation and peak memory, and (Triton) the backward's split reductions against
    no split and, on sm_90+, the TMA kernels against the pointer kernels."""
    rank_sweep_rows(rows, cfg, device, dtype, timing, on_gpu, step)
    k = n = cfg.hidden
    m, r = cfg.train_m, cfg.rank
    inputs = InputSets(device, dtype, m, k, n, r, grad=True)
    shape = f"M={m} K={k} N={n} r={r}"

    def peft_fwd_bwd(x, w, a, b, dy, **_):
        return torch.autograd.grad(peft_lora_forward(x, w, a, b, 2.0, DROPOUT), (x, a, b), dy)

    def full_fwd_bwd(x, w_ft, dy, **_):
        return torch.autograd.grad(F.linear(x, w_ft), (x, w_ft), dy)

    s0 = inputs.sets[0]
    layer_tensors = (s0["x"], s0["w"], s0["a"], s0["b"])
    # The weights are left out, x is not: a layer that keeps x for its backward (ours: drop(x) is redrawn from a
    # seed) holds it as activation memory where PEFT's layer with dropout holds drop(x) and the mask instead, not x
    # (design.md §8 counts x: "x and S only"). Leaving x out of both had reported ours at S alone (0.003-0.005).
    weights = layer_tensors[1:]
    peft_saved = saved_bytes(lambda: peft_lora_forward(*layer_tensors, 2.0, DROPOUT), exclude=weights)
    peft_peak = peak_memory(lambda: peft_fwd_bwd(**s0), device)
    for backend in cfg.backends:
        def ours_dropout(x, w, a, b, dy, be=backend, **_):
            return torch.autograd.grad(lora_linear(x, w, a, b, 2.0, dropout_p=DROPOUT, backend=be), (x, a, b), dy)

        def ours_plain(x, w, a, b, dy, be=backend, **_):
            return torch.autograd.grad(lora_linear(x, w, a, b, 2.0, backend=be), (x, a, b), dy)

        section = f"unfused torch layer (PEFT's forward), dropout {DROPOUT} / ours, fwd+bwd"
        with _guard(rows, section, backend, shape, on_gpu):
            t = measure({"peft": inputs.fns(peft_fwd_bwd), "ours": inputs.fns(ours_dropout)}, **timing)
            _row(rows, section, "unfused_vs_ours", backend, shape, f"lora_linear fwd+bwd, dropout {DROPOUT}",
                 "base(x) + lora_B(lora_A(dropout(x)))·s, autograd", t["peft"] / t["ours"], t["ours"], t["peft"],
                 "ms", on_gpu, note="ratio = baseline / ours (higher is better)")
        step(f"unfused vs ours {backend}")
        section = "LoRA fwd+bwd / full fine-tuning fwd+bwd"
        with _guard(rows, section, backend, shape, on_gpu):
            t = measure({"full": inputs.fns(full_fwd_bwd), "ours": inputs.fns(ours_plain)}, **timing)
            _row(rows, section, "lora_vs_full", backend, shape, "lora_linear fwd+bwd (dX, dA, dB)",
                 "F.linear fwd+bwd with W trainable (dX, dW)", t["ours"] / t["full"], t["ours"], t["full"], "ms",
                 on_gpu)
        step(f"LoRA vs full {backend}")
        section = f"activation memory saved for backward / PEFT's (dropout {DROPOUT})"
        with _guard(rows, section, backend, shape, on_gpu):
            ours_saved = saved_bytes(lambda be=backend: lora_linear(*layer_tensors, 2.0, dropout_p=DROPOUT,
                                                                    backend=be), exclude=weights)
            _row(rows, section, "memory_vs_unfused", backend, shape, "lora_linear", "PEFT's unfused forward",
                 ours_saved / peft_saved, ours_saved, peft_saved, "bytes", on_gpu,
                 note="storages autograd keeps (saved_tensors_hooks), weights excluded, x counted where kept")
        section = f"peak memory of fwd+bwd / PEFT's (dropout {DROPOUT})"
        with _guard(rows, section, backend, shape, on_gpu):
            ours_peak = peak_memory(lambda be=backend: ours_dropout(**s0, be=be), device)
            _row(rows, section, "peak_memory_vs_unfused", backend, shape, "lora_linear fwd+bwd",
                 "PEFT's unfused fwd+bwd",
                 None if ours_peak is None else ours_peak / peft_peak, ours_peak, peft_peak, "bytes", on_gpu,
                 note=None if on_gpu else "n/a on CPU (no allocator statistics)")
        if backend == "triton" and on_gpu:
            section = "Triton fwd+bwd: split reductions (default) / no split"
            with _guard(rows, section, backend, shape, on_gpu):
                t = measure({"unsplit": [_with_triton_setting("SPLIT_OVERRIDE", 1, fn)
                                         for fn in inputs.fns(ours_plain)],
                             "split": inputs.fns(ours_plain)}, **timing)
                _row(rows, section, "triton_split", backend, shape, "fwd+bwd, shrink, dY-once and dA kernels split",
                     "same with SPLIT_OVERRIDE = 1", t["split"] / t["unsplit"], t["split"], t["unsplit"], "ms",
                     on_gpu)
            if _triton_tma_available(device):
                section = "Triton fwd+bwd: TMA loads (LORA_KERNELS_TRITON_TMA=1) / pointer loads (default)"
                # also the TMA forward alone: on the H200 it was faster by itself, forward and dX together slower
                forward_section = "Triton fwd+bwd: TMA forward only / pointer loads (default)"
                with _guard(rows, section, backend, shape, on_gpu):
                    t = measure({"pointer": [_with_triton_setting("USE_TMA", False, fn)
                                             for fn in inputs.fns(ours_plain)],
                                 "tma": [_with_triton_setting("USE_TMA", True, fn) for fn in inputs.fns(ours_plain)],
                                 "tma_forward": inputs.fns(_tma_forward_only)}, **timing)
                    _row(rows, section, "triton_tma", backend, shape, "fwd+bwd, forward and dX kernels with TMA",
                         "same, pointer-load kernels", t["tma"] / t["pointer"], t["tma"], t["pointer"], "ms", on_gpu)
                    _row(rows, forward_section, "triton_tma_forward", backend, shape,
                         "fwd+bwd, forward kernel with TMA", "same, pointer-load kernels",
                         t["tma_forward"] / t["pointer"], t["tma_forward"], t["pointer"], "ms", on_gpu)
        step(f"memory {backend}")
    del inputs


def cuda_bwd_dy_row(rows, inputs, shape, timing, on_gpu):
    """The C++/CUDA dY-once kernel (dB and dS from one read of dY: on tensor cores for fp16/bf16 up to r = 32, fp32
    FMAs otherwise) against the two cuBLAS GEMMs it replaces, which read dY twice: whether reading dY once pays for
    the kernel's arithmetic and partial sums, and so where functional.CUDA_BWD_DY_KERNEL_MAX_WORK should lie."""
    section = "CUDA backward: dY-once kernel (lora_bwd_dy) / two cuBLAS GEMMs (dYᵀ·S, dY·B)"
    with _guard(rows, section, "cuda", shape, on_gpu), torch.no_grad():
        # CUDA-graph replays, as benchmarks/cuda_crossovers.py times them: at the kernel's bound (M = 256, r = 16:
        # 2 MB of dY, a few µs of GPU work) eager calls timed the host path, one op call against five ATen calls
        # (the H200's 53.9 against 104.4 µs), not the kernels the row is about.
        t = measure(bwd_dy_candidates(inputs), graph=True, **timing)
        _row(rows, section, "cuda_bwd_dy", "cuda", shape, "lora_kernels::lora_bwd_dy", "dYᵀ·S and dY·B (ATen)",
             t["kernel"] / t["gemms"], t["kernel"], t["gemms"], "ms", on_gpu, note=_graph_note(on_gpu))


def bwd_dy_candidates(inputs):
    """{"kernel": lora_kernels::lora_bwd_dy, "gemms": the two GEMMs it replaces (dYᵀ·S, dY·B)} over the input sets'
    dY, fp32 S = x·Aᵀ and B, scaling 2 (also benchmarks/cuda_crossovers.py's)."""
    with torch.no_grad():
        saved = [(st["dy"], (st["x"] @ st["a"].detach().T).float(), st["b"].detach()) for st in inputs.sets]
        # The input sets were counted by their bytes, W's 33.5 MB included, which these ops never read: at
        # M = 1024-2048 (K = N = 4096, bf16) 2-3 sets of dY fit in the L2 together. Count the sets by what the ops
        # touch (dY, S, B and the fp32 dB, dS they write), with copies of dY, S and B beyond the input sets.
        dy, s, b = saved[0]
        touched = dy.nbytes + 2 * s.nbytes + b.nbytes + b.numel() * 4
        count = max(len(saved), num_sets(dy.device, touched))
        saved += [tuple(t.clone() for t in saved[i % len(saved)]) for i in range(len(saved), count)]
    return {"gemms": [lambda dy=dy, s=s, b=b: (2.0 * (dy.T @ s.to(dy.dtype)), 2.0 * (dy @ b)) for dy, s, b in saved],
            "kernel": [lambda args=args: torch.ops.lora_kernels.lora_bwd_dy(*args, 2.0) for args in saved]}


def cuda_decode_row(rows, inputs, m, timing, graph, on_gpu, backend="cuda"):
    """The `cuda` forward's hand-written decode kernel (M <= CUDA_DECODE_MAX_M) against the same op one row past
    that bound, where it runs ATen's GEMMs: whether the kernel beats them at decode sizes (on the H200 the cuda
    forward took 106 µs at M = 16, the torch composition 29 µs). backend: "cpu" in the tests, for the plumbing."""
    st = inputs.sets[0]
    (n, k), r = st["w"].shape, st["a"].shape[0]
    past = InputSets(st["x"].device, st["x"].dtype, CUDA_DECODE_MAX_M + 1, k, n, r, count=inputs.count)
    section = f"CUDA forward: decode kernel (M <= {CUDA_DECODE_MAX_M}) / its GEMM path at M = {CUDA_DECODE_MAX_M + 1}"
    shape = f"M={m} K={k} N={n} r={r}"

    def forward(x, w, a, b):
        return lora_linear(x, w, a, b, 2.0, backend=backend)
    with _guard(rows, section, backend, shape, on_gpu), torch.no_grad():
        t = measure({"gemm": past.fns(forward), "kernel": inputs.fns(forward)}, graph=graph, **timing)
        _row(rows, section, "cuda_decode", backend, shape, "lora_linear forward, decode kernel",
             f"same at M = {CUDA_DECODE_MAX_M + 1} (GEMM path)", t["kernel"] / t["gemm"], t["kernel"], t["gemm"], "ms",
             on_gpu)


def _with_triton_setting(name, value, fn):
    """fn() with lora_kernels.triton.lora_linear.<name> set to `value` for the call (SPLIT_OVERRIDE: the split of
    the forward's shrink and of both backward split kernels; USE_TMA: the TMA forward and dX kernels)."""
    from lora_kernels.triton import lora_linear as triton_lora_linear

    def run():
        previous = getattr(triton_lora_linear, name)
        setattr(triton_lora_linear, name, value)
        try:
            return fn()
        finally:
            setattr(triton_lora_linear, name, previous)
    return run


def _tma_forward_only(x, w, a, b, dy, **_):
    """A Triton fwd+bwd whose forward runs the TMA kernel and whose dX runs the pointer-load kernel."""
    y = _with_triton_setting("USE_TMA", True, lambda: lora_linear(x, w, a, b, 2.0, backend="triton"))()
    return _with_triton_setting("USE_TMA", False, lambda: torch.autograd.grad(y, (x, a, b), dy))()


def _triton_tma_available(device):
    from lora_kernels.triton import lora_linear as triton_lora_linear

    return triton_lora_linear._has_tma(device)


def host_overhead_rows(rows, cfg, device, dtype, on_gpu, step):
    """Host time per call at HOST_SHAPE against F.linear's: lora_linear forward (no grad) and fwd+bwd,
    multi_lora_linear over a prebuilt LoRABatch, and building the LoRABatch itself; lora_linear's fwd+bwd also
    against PEFT's unfused layer (no dropout), whose autograd ops are the host cost a LoRA layer competes with."""
    m, k, n, r, slots = (HOST_SHAPE[name] for name in ("m", "k", "n", "r", "slots"))
    factory = {"device": device, "dtype": dtype}
    x = torch.randn(m, k, **factory)
    weight = torch.randn(n, k, **factory)
    lora_a, lora_b = torch.randn(r, k, **factory), torch.randn(n, r, **factory)
    x_grad, a_grad, b_grad = (t.clone().requires_grad_(True) for t in (x, lora_a, lora_b))
    dy = torch.randn(m, n, **factory)
    stacked_a, stacked_b, scalings = stacked_adapters(device, dtype, slots, k, n, r)
    ids = torch.arange(m, device=device) % slots
    batch = LoRABatch.from_adapter_ids(ids, slots)
    shape = f"M={m} K={k} N={n} r={r}"

    def add(backend, ours, baseline, ours_ms, base_ms, grouped=False):
        section = f"host time per call at a tiny shape: {ours} / {baseline}"
        _row(rows, section, "host_overhead", backend, shape + (f", {slots} slots" if grouped else ""), ours,
             baseline, ours_ms / base_ms, ours_ms, base_ms, "ms", on_gpu,
             note=f"wall time per call, best of {HOST_REPEATS} runs of {HOST_CALLS} back-to-back calls after "
                  f"{HOST_WARMUP} warm-up (not --reps/--warmup): the host path (checks, dispatch, autograd, "
                  f"launches)")

    with torch.no_grad():
        linear_ms = host_time_ms(lambda: F.linear(x, weight), device)
    linear_grad_ms = host_time_ms(lambda: torch.autograd.grad(F.linear(x_grad, weight), (x_grad,), dy), device)
    peft_grad_ms = host_time_ms(lambda: torch.autograd.grad(
        peft_lora_forward(x_grad, weight, a_grad, b_grad, 2.0, 0.0), (x_grad, a_grad, b_grad), dy), device)
    batch_ms = host_time_ms(lambda: LoRABatch.from_adapter_ids(ids, slots), device)
    add("-", "LoRABatch.from_adapter_ids", "F.linear forward", batch_ms, linear_ms, grouped=True)
    step("host overhead: LoRABatch")
    for backend in cfg.backends:
        with _guard(rows, "host time per call at a tiny shape", backend, shape, on_gpu):
            with torch.no_grad():
                ours = host_time_ms(lambda: lora_linear(x, weight, lora_a, lora_b, 2.0, backend=backend), device)
            add(backend, "lora_linear forward, no grad", "F.linear forward", ours, linear_ms)
            ours = host_time_ms(lambda: torch.autograd.grad(
                lora_linear(x_grad, weight, a_grad, b_grad, 2.0, backend=backend), (x_grad, a_grad, b_grad), dy),
                device)
            add(backend, "lora_linear fwd+bwd (dX, dA, dB)", "F.linear fwd+bwd (dX)", ours, linear_grad_ms)
            add(backend, "lora_linear fwd+bwd (dX, dA, dB)", "PEFT's unfused fwd+bwd (dX, dA, dB)", ours,
                peft_grad_ms)
            with torch.no_grad():
                ours = host_time_ms(lambda: multi_lora_linear(x, weight, stacked_a, stacked_b, batch, scalings,
                                                              backend=backend), device)
            add(backend, "multi_lora_linear forward, no grad", "F.linear forward", ours, linear_ms, grouped=True)
        step(f"host overhead {backend}")


def copy_bandwidth(numel, timing):
    """GB/s of dst.copy_(src) for float32 buffers of `numel` elements, counting the bytes read and written."""
    src = torch.randn(numel, device=timing["device"])
    dst = torch.empty_like(src)
    copy_ms = measure({"copy": [lambda: dst.copy_(src)]}, **timing)["copy"]
    return 2 * numel * src.element_size() / copy_ms / 1e6


def stacked_adapters(device, dtype, slots, k, n, r):
    lora_a = torch.randn(slots, r, k, device=device, dtype=dtype) / math.sqrt(k)
    lora_b = torch.randn(slots, n, r, device=device, dtype=dtype) / math.sqrt(r)
    scalings = torch.full((slots,), 2.0, device=device)
    return lora_a, lora_b, scalings


def segment_ids(tokens, slots, device):
    """Slot ids for `tokens` tokens in `slots` contiguous segments (requests), as a prefill batch has them."""
    return torch.arange(tokens, device=device) * slots // tokens


def _sweep_ids(tokens, adapters, device):
    """The sweep's slot ids: a decode batch (up to GRAPH_MAX_TOKENS tokens) interleaves the adapters token by token,
    a prefill batch gives each adapter a contiguous segment."""
    if tokens <= GRAPH_MAX_TOKENS:
        return torch.arange(tokens, device=device) % adapters
    return segment_ids(tokens, adapters, device)


class GroupedSets:
    """Rotating sets of grouped-call operands (x [tokens, K], W [N, K], A [L, R, K], B [L, N, R], scalings [L]),
    enough that their bytes exceed CACHE_MULTIPLE x the cache: at K = N = 4096, bf16, W alone (33.5 MB) fits in an
    H100's 50 MB L2, so one set would time reads from the cache, not from memory."""

    def __init__(self, device, dtype, tokens, k, n, r, slots):
        element = torch.finfo(dtype).bits // 8
        self.bytes_per_set = (tokens * (k + n) + n * k + slots * r * (k + n)) * element
        self.sets = []
        for _ in range(num_sets(device, self.bytes_per_set)):
            lora_a, lora_b, scalings = stacked_adapters(device, dtype, slots, k, n, r)
            self.sets.append({"x": torch.randn(tokens, k, device=device, dtype=dtype),
                              "w": torch.randn(n, k, device=device, dtype=dtype) / math.sqrt(k),
                              "a": lora_a, "b": lora_b, "scalings": scalings})

    def grouped(self, batch, backend, ranks=None):
        return [lambda s=s: multi_lora_linear(s["x"], s["w"], s["a"], s["b"], batch, s["scalings"], ranks=ranks,
                                              backend=backend) for s in self.sets]

    def trained(self, batch, backend):
        """fwd+bwd with gradients for x and every slot's A and B (several adapters trained in one batch)."""
        fns = []
        for s in self.sets:
            x, lora_a, lora_b = (s[name].detach().requires_grad_(True) for name in ("x", "a", "b"))
            dy = torch.randn(x.shape[0], s["w"].shape[0], device=x.device, dtype=x.dtype)
            fns.append(lambda s=s, x=x, lora_a=lora_a, lora_b=lora_b, dy=dy: torch.autograd.grad(
                multi_lora_linear(x, s["w"], lora_a, lora_b, batch, s["scalings"], backend=backend),
                (x, lora_a, lora_b), dy))
        return fns

    def loop(self, ids):
        """PEFT's per-adapter loop over the same operands (index tensors built here, outside the timing)."""
        indices = [torch.nonzero(ids == i).squeeze(1) for i in range(self.sets[0]["a"].shape[0])]
        fns = []
        for s in self.sets:
            lora_as, lora_bs, scaling_list = list(s["a"].unbind(0)), list(s["b"].unbind(0)), s["scalings"].tolist()
            fns.append(lambda s=s, lora_as=lora_as, lora_bs=lora_bs, scaling_list=scaling_list: per_adapter_loop(
                s["x"], s["w"], lora_as, lora_bs, scaling_list, indices))
        return fns


def _graph_note(on_gpu):
    return "CUDA-graph replays (kernels only, no host path)" if on_gpu else None


def grouped_rows(rows, cfg, device, dtype, timing, on_gpu, step):
    """design.md §8's grouped rows: prefill over PREFILL_ADAPTERS distinct adapters / one adapter, forward
    (CUDA-graph replays on GPUs) and training fwd+bwd (eager calls), and the grouped op / the per-adapter loop at
    LOOP_ADAPTERS adapters (decode and prefill size, graph replays); then the fused QKV slices (sliced_rows)."""
    k = n = cfg.hidden
    r = cfg.rank
    tokens = cfg.prefill_tokens
    inputs = GroupedSets(device, dtype, tokens, k, n, r, PREFILL_ADAPTERS)
    distinct = LoRABatch.from_adapter_ids(segment_ids(tokens, PREFILL_ADAPTERS, device), PREFILL_ADAPTERS)
    one = LoRABatch.from_adapter_ids(torch.zeros(tokens, dtype=torch.int64, device=device), PREFILL_ADAPTERS)
    section = f"grouped prefill: {PREFILL_ADAPTERS} distinct adapters / one adapter"
    shape = f"{tokens} tokens K={k} N={n} r={r}"
    for backend in cfg.backends:
        with _guard(rows, section, backend, shape, on_gpu), torch.no_grad():
            t = measure({"one": inputs.grouped(one, backend), "distinct": inputs.grouped(distinct, backend)},
                        graph=True, **timing)
            _row(rows, section, "grouped_distinct", backend, shape, "multi_lora_linear forward",
                 "same, every token on one adapter", t["distinct"] / t["one"], t["distinct"], t["one"], "ms", on_gpu,
                 note=_graph_note(on_gpu))
        step(f"grouped prefill {backend}")
        training = f"grouped training fwd+bwd: {PREFILL_ADAPTERS} distinct adapters / one adapter"
        with _guard(rows, training, backend, shape, on_gpu):
            t = measure({"one": inputs.trained(one, backend), "distinct": inputs.trained(distinct, backend)},
                        **timing)
            _row(rows, training, "grouped_train", backend, shape, "multi_lora_linear fwd+bwd (dX, every slot's dA, dB)",
                 "same, every token on one adapter", t["distinct"] / t["one"], t["distinct"], t["one"], "ms", on_gpu,
                 note="eager calls")
    del inputs

    section = f"grouped op / per-adapter loop (PEFT's mixed batch), {LOOP_ADAPTERS} adapters"
    for tokens in (DECODE_TOKENS, cfg.prefill_tokens):
        inputs = GroupedSets(device, dtype, tokens, k, n, r, LOOP_ADAPTERS)
        ids = segment_ids(tokens, LOOP_ADAPTERS, device)
        batch = LoRABatch.from_adapter_ids(ids, LOOP_ADAPTERS)
        loop = inputs.loop(ids)
        shape = f"{tokens} tokens K={k} N={n} r={r}"
        for backend in cfg.backends:
            with _guard(rows, section, backend, shape, on_gpu), torch.no_grad():
                t = measure({"loop": loop, "grouped": inputs.grouped(batch, backend)}, graph=True, **timing)
                _row(rows, section, "grouped_vs_loop", backend, shape, "multi_lora_linear forward",
                     "F.linear + Python loop of index_select / index_add_", t["grouped"] / t["loop"], t["grouped"],
                     t["loop"], "ms", on_gpu, note=_graph_note(on_gpu))
            step(f"grouped vs loop {tokens} {backend}")
        del inputs
    sliced_rows(rows, cfg, device, dtype, timing, on_gpu, step)


def sliced_rows(rows, cfg, device, dtype, timing, on_gpu, step):
    """add_lora over the three slices of a fused QKV projection (widths N, N/4, N/4, as grouped-query attention has
    them), given as lists, against the same work as one lora_shrink and one lora_expand call per slice: with the
    triton backend one launch of each kernel against three (a decode step of DECODE_TOKENS tokens on LOOP_ADAPTERS
    adapters, CUDA-graph replays on GPUs); the other backends go slice by slice either way."""
    k = n = cfg.hidden
    r = cfg.rank
    widths = (n, max(1, n // 4), max(1, n // 4))
    offsets = [sum(widths[:j]) for j in range(len(widths))]
    slots, tokens = LOOP_ADAPTERS, DECODE_TOKENS
    ranks = torch.full((slots,), r, dtype=torch.int32, device=device)
    batch = LoRABatch.from_adapter_ids(torch.arange(tokens, device=device) % slots, slots)
    # rotating sets, as the other grouped rows: the GPU preset's adapters (38 MB in bf16) fit in an H100's L2, so a
    # single set had timed reads from the cache
    set_bytes = (sum(slots * r * (k + width) for width in widths) + tokens * (k + sum(widths))) * (
        torch.finfo(dtype).bits // 8)
    sets = []
    for _ in range(num_sets(device, set_bytes)):
        adapters = [stacked_adapters(device, dtype, slots, k, width, r) for width in widths]
        sets.append({"lora_as": [a for a, _, _ in adapters], "lora_bs": [b for _, b, _ in adapters],
                     "scalings": adapters[0][2], "x": torch.randn(tokens, k, device=device, dtype=dtype),
                     "y": torch.zeros(tokens, sum(widths), device=device, dtype=dtype),
                     "buffer": torch.empty(len(widths), tokens, r, device=device)})
    section = "add_lora: a fused QKV projection's 3 slices in lists / one lora_shrink + lora_expand call per slice"
    shape = f"{tokens} tokens on {slots} adapters K={k} N={'+'.join(map(str, widths))} r={r}"
    for backend in cfg.backends:
        def listed(s, backend=backend):
            add_lora(s["y"], s["x"], s["lora_as"], s["lora_bs"], batch, s["scalings"], ranks, widths, backend=backend,
                     buffer=s["buffer"])

        def per_slice(s, backend=backend):
            for j in range(len(widths)):
                shrunk = lora_shrink(s["x"], s["lora_as"][j], batch, s["scalings"], ranks, backend=backend,
                                     out=s["buffer"][j])
                lora_expand(shrunk, s["lora_bs"][j], batch, s["y"], offsets[j], ranks, backend=backend)
        with _guard(rows, section, backend, shape, on_gpu), torch.no_grad():
            t = measure({"per_slice": [lambda s=s: per_slice(s) for s in sets],
                         "listed": [lambda s=s: listed(s) for s in sets]}, graph=True, **timing)
            _row(rows, section, "sliced_launches", backend, shape, "add_lora, slices in lists",
                 "lora_shrink + lora_expand per slice", t["listed"] / t["per_slice"], t["listed"], t["per_slice"],
                 "ms", on_gpu, note=_graph_note(on_gpu))
        step(f"fused QKV slices {backend}")


def _moved_bytes(tokens, k, n, r, adapters, dtype):
    """What a grouped forward must move at least: W, each used adapter's A and B, x read and y written."""
    return (n * k + adapters * r * (k + n) + tokens * (k + n)) * torch.finfo(dtype).bits // 8


def decode_rows(rows, cfg, device, dtype, timing, on_gpu, step, copy_gbs):
    """Decode: DECODE_TOKENS tokens, each on its own adapter. Bandwidth on all bytes moved (the base weight, every
    adapter's A and B, x read and y written) over the measured time, against the measured copy bandwidth; the row
    with the target times CUDA-graph replays on GPUs, a second row eager calls."""
    k = n = cfg.hidden
    r = cfg.rank
    inputs = GroupedSets(device, dtype, DECODE_TOKENS, k, n, r, LOOP_ADAPTERS)
    batch = LoRABatch.from_adapter_ids(torch.arange(DECODE_TOKENS, device=device) % LOOP_ADAPTERS, LOOP_ADAPTERS)
    moved = _moved_bytes(DECODE_TOKENS, k, n, r, LOOP_ADAPTERS, dtype)
    title = f"grouped decode bandwidth, {DECODE_TOKENS} tokens on {LOOP_ADAPTERS} distinct adapters / copy"
    shape = f"{DECODE_TOKENS} tokens K={k} N={n} r={r}"
    for backend in cfg.backends:
        for graph in (True, False) if on_gpu else (False,):
            section = title + ("" if graph or not on_gpu else ", eager calls (host path included)")
            with _guard(rows, section, backend, shape, on_gpu), torch.no_grad():
                ms = measure({"ours": inputs.grouped(batch, backend)}, graph=graph, **timing)["ours"]
                gbs = moved / ms / 1e6
                _row(rows, section, "decode_bandwidth" if graph or not on_gpu else "decode_bandwidth_eager",
                     backend, shape, f"multi_lora_linear forward, {moved / 1e6:.1f} MB moved",
                     "torch copy_ (read + write)", gbs / copy_gbs, gbs, copy_gbs, "GB/s", on_gpu,
                     note=f"{ms:.3f} ms" + (", CUDA-graph replays" if graph and on_gpu else ""))
        step(f"decode bandwidth {backend}")
    del inputs


def sweep_rows(rows, cfg, device, dtype, timing, on_gpu, step, copy_gbs):
    """The multi-adapter issue's grid: for each token count and number of distinct adapters (r = cfg.rank), the
    grouped forward against the same batch on one adapter and against the per-adapter loop, plus, up to
    GRAPH_MAX_TOKENS tokens (decode), its bandwidth on all bytes moved. Decode batches interleave the adapters token
    by token, prefill batches give each adapter a contiguous segment. Then mixed ranks against the same batch with
    every slot at the padded rank. CUDA-graph replays on GPUs."""
    k = n = cfg.hidden
    r = cfg.rank
    note = _graph_note(on_gpu)
    for tokens, adapters in _sweep_points(cfg):
        decode = tokens <= GRAPH_MAX_TOKENS
        inputs = GroupedSets(device, dtype, tokens, k, n, r, adapters)
        ids = _sweep_ids(tokens, adapters, device)
        batch = LoRABatch.from_adapter_ids(ids, adapters)
        one = LoRABatch.from_adapter_ids(torch.zeros_like(ids), adapters)
        shape = f"{tokens} tokens, {adapters} adapter{'s' if adapters > 1 else ''}, K={k} N={n} r={r}"
        for backend in cfg.backends:
            with _guard(rows, "grouped sweep", backend, shape, on_gpu), torch.no_grad():
                candidates = {"loop": inputs.loop(ids), "ours": inputs.grouped(batch, backend)}
                if adapters > 1:
                    candidates["one"] = inputs.grouped(one, backend)
                t = measure(candidates, graph=True, **timing)
                if adapters > 1:
                    _row(rows, "grouped sweep: distinct adapters / one adapter", "sweep_vs_one", backend, shape,
                         "multi_lora_linear forward", "same, every token on one adapter", t["ours"] / t["one"],
                         t["ours"], t["one"], "ms", on_gpu, note=note)
                _row(rows, "grouped sweep: grouped op / per-adapter loop",
                     "grouped_vs_loop" if adapters == LOOP_ADAPTERS else "sweep_vs_loop", backend, shape,
                     "multi_lora_linear forward", "F.linear + Python loop of index_select / index_add_",
                     t["ours"] / t["loop"], t["ours"], t["loop"], "ms", on_gpu, note=note)
                if decode:
                    moved = _moved_bytes(tokens, k, n, r, adapters, dtype)
                    gbs = moved / t["ours"] / 1e6
                    _row(rows, "grouped sweep: decode bandwidth on all bytes moved / copy", "sweep_bandwidth",
                         backend, shape, "multi_lora_linear forward: W, the adapters used, x and y over the time",
                         "torch copy_ (read + write)", gbs / copy_gbs, gbs, copy_gbs, "GB/s", on_gpu,
                         note=f"{t['ours']:.3f} ms")
            step(f"sweep {tokens}x{adapters} {backend}")
        del inputs

    max_rank = max(MIXED_RANKS)
    for tokens, adapters in ((DECODE_TOKENS, LOOP_ADAPTERS), (cfg.prefill_tokens, PREFILL_ADAPTERS)):
        inputs = GroupedSets(device, dtype, tokens, k, n, max_rank, adapters)
        ids = _sweep_ids(tokens, adapters, device)
        batch = LoRABatch.from_adapter_ids(ids, adapters)
        ranks = torch.tensor([MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(adapters)], dtype=torch.int32,
                             device=device)
        shape = f"{tokens} tokens, {adapters} adapters, K={k} N={n} R={max_rank}"
        for backend in cfg.backends:
            section = f"grouped sweep: mixed ranks {'/'.join(map(str, MIXED_RANKS))} / all at R = {max_rank}"
            with _guard(rows, section, backend, shape, on_gpu), torch.no_grad():
                t = measure({"padded": inputs.grouped(batch, backend),
                             "mixed": inputs.grouped(batch, backend, ranks=ranks)}, graph=True, **timing)
                _row(rows, section, "mixed_vs_padded", backend, shape, "multi_lora_linear forward, ranks cycling "
                     f"{MIXED_RANKS}", f"same, every slot at rank {max_rank}", t["mixed"] / t["padded"], t["mixed"],
                     t["padded"], "ms", on_gpu, note=note)
            step(f"mixed ranks {tokens} {backend}")
        del inputs


# ------------------------------------------------------------------------------------------------ printing

def _fmt_value(value, unit):
    if value is None:
        return "n/a"
    if unit == "ms":
        return f"{value * 1e3:.1f} µs" if value < 1 else f"{value:.2f} ms"
    if unit == "bytes":
        return f"{value / 1e6:.2f} MB"
    return f"{value:.1f} {unit}"


def _table_row(row):
    ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.3f}"
    mark = "ERROR" if row["kind"] == "error" else {True: "ok", False: "MISS", None: ""}[row["meets_target"]]
    return ("row", [row["backend"], row["shape"], ratio, _fmt_value(row["ours_value"], row["unit"]),
                    _fmt_value(row["baseline_value"], row["unit"]), row["target"] or "", mark], row)


def format_bench(result):
    cfg, env = result["config"], result["environment"]
    on_gpu = env["device"] == "cuda"
    lines = [f"lora-kernels bench: {env['device']} ({machine_text(env)}), {cfg['dtype']}, K=N={cfg['hidden']}, "
             f"r={cfg['rank']}, torch {env['torch']}, triton {env['triton'] or '-'}, {env['date']}",
             f"backends: {', '.join(cfg['backends'])}; timing: {result['timing']}",
             "measured copy bandwidth: " + ("not measured" if result["copy_bandwidth_gbs"] is None
                                            else f"{result['copy_bandwidth_gbs']:.1f} GB/s (read + write)")]
    if result.get("partial"):
        lines.append("PARTIAL: the sweep did not finish; these are the rows measured so far")
    if not on_gpu:
        lines.append("targets are GPU targets (BENCHMARKS.md), shown for reference: CPU ratios are not judged by them")
        if "triton" in cfg["backends"]:
            lines.append("note: triton on CPU tensors is the Triton interpreter (TRITON_INTERPRET=1, for tests): its "
                         "rows time the interpreter, not a compiled kernel")
    headers = ["backend", "shape", "ratio", "ours", "baseline", "target", ""]
    sections = {}  # rows grouped by section, sections in order of first appearance
    for row in result["rows"]:
        sections.setdefault(row["section"], []).append(row)
    table = []
    for section, section_rows in sections.items():
        table.append(("section", section, section_rows[0]))
        for row in section_rows:
            table.append(_table_row(row))
    cells = [entry[1] for entry in table if entry[0] == "row"]
    widths = [max([len(headers[i])] + [len(c[i]) for c in cells]) for i in range(len(headers))]
    lines.append("")
    lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for kind, content, row in table:
        if kind == "section":
            note = row["note"] or ""
            shown = (row["kind"] in ("unfused_vs_ours", "memory_vs_unfused", "peak_memory_vs_unfused", "host_overhead")
                     or note.startswith("CUDA-graph"))
            note = f"; {note}" if note and shown else ""
            lines.append(f"{content}  [ours: {row['ours']}; baseline: {row['baseline']}{note}]")
        else:
            lines.append("  " + "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                          for i, (c, w) in enumerate(zip(content, widths))).rstrip())
    errors = [row for row in result["rows"] if row["kind"] == "error"]
    for row in errors:
        lines.append(f"ERROR {row['backend']} ({row['section']}, {row['shape']}): {row['note']}")
    for kernel, choices in (result.get("triton_configs") or {}).items():
        for key, config in choices.items():
            lines.append(f"triton autotune: {kernel} {key} -> {config}")
    lines.append("")
    lines.append(f"Total {result['wall_s']:.1f} s.")
    return "\n".join(lines)
