"""pytest-benchmark suites for lora_kernels (not part of the test run: testpaths is tests/).

    python -m pytest benchmarks/ --benchmark-json=bench.json     # then: python benchmarks/table.py bench.json
    LORA_KERNELS_BENCH_QUICK=1 python -m pytest benchmarks/      # the quick shapes
    LORA_KERNELS_BENCH_THREADS=1 ...                             # torch CPU threads

Files are named bench_*.py and collected by the hook below. Every benchmark belongs to a group with one baseline
(extra_info["role"] == "baseline"), so each ratio is measured in the same run (benchmarks/table.py prints them).
Shapes are lora_kernels.bench.PRESETS: bf16 K=N=4096 on a GPU, fp32 scaled down on CPU. pytest-benchmark times each
call with time.perf_counter, so on a GPU every call ends with torch.cuda.synchronize() (launch overhead included);
`lora-kernels bench` times the same cases with CUDA events (use it for §8 numbers). Each call takes the next of
several rotating input sets.
"""

import itertools
import os

import pytest
import torch

from lora_kernels import backends
from lora_kernels.bench import PRESETS
from lora_kernels.compare import DTYPES, environment

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
THREADS = os.environ.get("LORA_KERNELS_BENCH_THREADS", "")
if THREADS:  # e.g. 1 on a CPU shared with other jobs
    if not (THREADS.isdigit() and int(THREADS) >= 1):
        raise pytest.UsageError(f"LORA_KERNELS_BENCH_THREADS expected an integer >= 1, got {THREADS!r}")
    torch.set_num_threads(int(THREADS))
QUICK_VALUE = os.environ.get("LORA_KERNELS_BENCH_QUICK", "0")
if QUICK_VALUE not in ("0", "1", ""):  # "true" had run the full preset silently
    raise pytest.UsageError(f"LORA_KERNELS_BENCH_QUICK expected 1 or 0, got {QUICK_VALUE!r}")
QUICK = QUICK_VALUE == "1"
SHAPES = PRESETS[DEVICE.type + ("_quick" if QUICK else "")]
DTYPE = DTYPES[SHAPES["dtype"]]
# Every available backend but the spec (float64) and the Triton interpreter (CPU tests only).
BACKENDS = [b for b in backends.available_backends(DEVICE)
            if b != "reference" and not (b == "triton" and DEVICE.type == "cpu")]
ROUNDS = 10 if QUICK else 30
WARMUP_ROUNDS = 2 if QUICK else 5


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    if "benchmark" not in {name for item in items for name in getattr(item, "fixturenames", ())}:
        return
    # not installed, or not loaded (-p no:benchmark); loaded by module name (-p pytest_benchmark.plugin) it is
    # registered under that name, not "benchmark"
    loaded = {getattr(plugin, "__name__", None) for plugin in config.pluginmanager.get_plugins()}
    if "pytest_benchmark.plugin" not in loaded:
        skip = pytest.mark.skip(reason="the pytest-benchmark plugin is not installed or not loaded")
        for item in items:
            item.add_marker(skip)


@pytest.hookimpl(optionalhook=True)  # without pytest-benchmark pytest refused the conftest before anything skipped
def pytest_benchmark_update_machine_info(config, machine_info):
    env = environment(DEVICE)
    machine_info["lora_kernels"] = {
        "device": DEVICE.type, "device_name": env["gpu"] or env["cpu"], "torch": env["torch"],
        "triton": env["triton"], "dtype": SHAPES["dtype"], "backends": BACKENDS, "python": env["python"],
        "quick": QUICK,
    }


def run(benchmark, fns, role="candidate", **info):
    """Times fns[i % len(fns)]() per round (one callable per rotating input set) and records what it is."""
    counter = itertools.count()

    def call():
        fns[next(counter) % len(fns)]()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(role=role, device=DEVICE.type, dtype=SHAPES["dtype"], **info)
    benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
