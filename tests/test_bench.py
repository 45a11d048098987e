"""Pieces of `lora-kernels bench` that the CLI tests do not reach on CPU: the section selection, the grouped sweep,
the host-overhead timer, the CUDA dY-once comparison row (its C++ op also has a CPU kernel) and, on a GPU, timing
as CUDA-graph replays. Structure and arithmetic only: no timing is asserted."""

import importlib.util
import json
import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import backend_or_skip
from lora_kernels import bench, compare
from lora_kernels.batch import LoRABatch
from lora_kernels.functional import lora_linear, multi_lora_linear

HAS_EXTENSION = hasattr(torch.ops.lora_kernels, "lora_bwd_dy")


def _tiny(**overrides):
    settings = {"device": "cpu", "quick": True, "threads": 1, "reps": 2, "warmup": 1, "hidden": 32,
                "backends": ("torch",)}
    settings.update(overrides)
    return bench.BenchConfig(**settings)


def _benchmark_script(name):
    """benchmarks/<name>.py as a module (the folder is no package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("environment, plugin, outcome", [
    ({}, ["-p", "no:benchmark"], "skipped"),
    # loaded by module name the plugin is registered under it, not as "benchmark": every benchmark had been skipped
    ({"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}, ["-p", "pytest_benchmark.plugin", "--benchmark-disable"], "passed"),
    ({"LORA_KERNELS_BENCH_QUICK": "true"}, ["-p", "no:benchmark"],
     "LORA_KERNELS_BENCH_QUICK expected 1 or 0, got 'true'"),
    ({"LORA_KERNELS_BENCH_THREADS": "abc"}, ["-p", "no:benchmark"],
     "LORA_KERNELS_BENCH_THREADS expected an integer >= 1, got 'abc'"),
])
def test_the_benchmark_suites_skip_without_the_plugin_and_name_a_bad_variable(environment, plugin, outcome):
    """benchmarks/conftest.py implemented pytest-benchmark's hook without marking it optional: without the plugin
    pytest refused the conftest (INTERNALERROR, unknown hook) before the suites could skip. A quick setting of
    "true" ran the full shapes silently, and a bad thread count failed in int() naming no variable (helper 258)."""
    import subprocess
    env = {**os.environ, "LORA_KERNELS_BENCH_QUICK": "1", **environment}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin, "-k", "forward",
                           str(Path(__file__).parents[1] / "benchmarks" / "bench_lora_linear.py")],
                          capture_output=True, text=True, env=env, timeout=300)
    output = done.stdout + done.stderr
    if outcome == "skipped":
        assert done.returncode == 0 and re.search(r"\d+ skipped", output) and "passed" not in output, output
    elif outcome == "passed":
        assert done.returncode == 0 and re.search(r"\d+ passed", output) and "skipped" not in output, output
    else:
        assert done.returncode != 0 and outcome in output, output


def test_a_gpu_bench_runs_with_its_device_current(monkeypatch):
    """CUDA events, torch.cuda._sleep and graph capture use the current device's stream: --device cuda:1 must make
    cuda:1 current for the whole run (with cuda:0 current it timed an idle stream). Checked with stand-ins for the
    CUDA calls; no GPU here."""
    import contextlib

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext(current.append(d)))
    monkeypatch.setattr(bench, "_run_bench", lambda cfg, progress_stream, on_update: list(current))
    assert bench.run_bench(_tiny(device="cuda:1")) == [torch.device("cuda", 1)]


def test_sections_default_all_and_unknown():
    assert _tiny().resolved().sections == bench.DEFAULT_SECTIONS
    assert _tiny(sections=("all",)).resolved().sections == bench.SECTIONS
    assert _tiny(sections=("sweep", "host")).resolved().sections == ("host", "sweep")  # always in sweep order
    with pytest.raises(ValueError, match="--sections expected names from host, forward"):
        _tiny(sections=("fast",)).resolved()


def test_a_sweep_with_no_point_is_refused():
    # every adapter count above every token count: the sweep had printed only its mixed-rank rows, its grid silently
    # empty; outside the sweep section the sweep options do not matter
    with pytest.raises(ValueError, match="--sweep-adapters 8,16 expected a count <= one of --sweep-tokens 2,4"):
        _tiny(sections=("sweep",), sweep_tokens=(2, 4), sweep_adapters=(8, 16)).resolved()
    assert _tiny(sections=("host",), sweep_tokens=(2,), sweep_adapters=(8,)).resolved().sections == ("host",)
    assert _tiny(sections=("sweep",), sweep_tokens=(2, 8), sweep_adapters=(8, 16)).resolved()


def test_cpu_triton_rows_are_said_to_time_the_interpreter():
    # --backends triton under TRITON_INTERPRET=1 printed a 155x forward ratio with no word about the interpreter
    result = {"config": {"dtype": "float32", "hidden": 32, "rank": 16, "backends": ["triton"]}, "rows": [],
              "environment": {"device": "cpu", "cpu": "x", "cpu_threads": 1, "gpu": None, "torch": "t", "triton": "3",
                              "date": "d"},
              "timing": "t", "copy_bandwidth_gbs": None, "wall_s": 0.0}
    assert "note: triton on CPU tensors is the Triton interpreter" in bench.format_bench(result)
    result["config"]["backends"] = ["torch"]
    assert "Triton interpreter" not in bench.format_bench(result)


def test_a_repeated_name_or_value_is_measured_once():
    # --backends torch,torch and --ms 1,1 had printed every row twice
    cfg = _tiny(backends=("torch", "torch"), ms=(1, 8, 1), ranks=(4, 4), sweep_tokens=(16, 16),
                sweep_adapters=(1, 1)).resolved()
    assert (cfg.backends, cfg.ms, cfg.ranks, cfg.sweep_tokens, cfg.sweep_adapters) == (("torch",), (1, 8), (4,), (16,),
                                                                                       (1,))
    with pytest.raises(ValueError, match=r"got host,fast \(unknown: fast\)"):
        _tiny(sections=("host", "fast")).resolved()
    with pytest.raises(ValueError, match=r"got all,host \(all goes alone\)"):
        _tiny(sections=("all", "host")).resolved()


@pytest.mark.parametrize("change, message", [
    # named as the CLI spells them (the messages had said "bench: train_m expected ...")
    ({"hidden": True}, "bench: --hidden expected an int >= 1, got True"),
    ({"rank": 0}, "bench: --rank expected an int >= 1, got 0"),
    ({"train_m": 0}, "bench: --train-m expected an int >= 1, got 0"),
    ({"prefill_tokens": -1}, "bench: --prefill-tokens expected an int >= 1, got -1"),
    # fewer tokens than the rows' adapters had measured fewer distinct adapters than the rows named
    ({"prefill_tokens": 63, "sections": ("grouped",)},
     "bench: --prefill-tokens expected at least 64 with the grouped section (its rows spread the tokens over 64 "
     "distinct adapters), got 63"),
    ({"prefill_tokens": 15, "sections": ("sweep",)}, "bench: --prefill-tokens expected at least 16 with the sweep"),
    ({"reps": "2"}, "bench: --reps expected an int >= 1, got '2'"),
    ({"copy_mb": 1.5}, "bench: --copy-mb expected an int >= 1, got 1.5"),
    ({"dtype": "float64"}, "bench: --dtype expected one of float32, fp32, bfloat16, bf16, float16, fp16, "
                           "got 'float64'"),
    ({"dtype": ["bf16"]}, "bench: --dtype expected one of"),  # had been "unhashable type: 'list'"
    # a negative warm-up had run none; a bool had passed as 0 or 1 warm-up calls
    ({"warmup": -1}, "bench: --warmup expected an int >= 0, got -1"),
    ({"warmup": True}, "bench: --warmup expected an int >= 0, got True"),
    ({"warmup": 1.5}, "bench: --warmup expected an int >= 0, got 1.5"),  # had ended the run in a TypeError
    ({"threads": 0}, "bench: --threads expected an int >= 1, got 0"),  # had kept torch's thread count
    ({"threads": True}, "bench: --threads expected an int >= 1, got True"),  # had ended in torch's RuntimeError
    ({"seed": 2 ** 64}, r"bench: --seed expected an int in [-2**63, 2**64 - 1] (torch's seeds are 64-bit), got "
                        r"18446744073709551616"),  # had ended in "Overflow when unpacking long long"
    ({"seed": -2 ** 63 - 1}, "bench: --seed expected an int in"),
    ({"seed": 1.5}, "bench: --seed expected an int in [-2**63, 2**64 - 1] (torch's seeds are 64-bit), got 1.5"),
    ({"seed": True}, "got True"),  # these two had seeded torch with 1
    # shapes and counts: --ms 0 had timed empty tensors, --ranks 0 printed error rows, --sweep-adapters 0 ended the
    # run in a ZeroDivisionError, the others in torch errors
    ({"ms": (1, 0)}, "bench: --ms expected ints >= 1, got (1, 0)"),
    ({"ms": [-4]}, "bench: --ms expected ints >= 1, got (-4,)"),
    ({"ms": (True,)}, "bench: --ms expected ints >= 1, got (True,)"),
    ({"ranks": (0,)}, "bench: --ranks expected ints >= 1, got (0,)"),
    ({"ranks": (8, 16.0)}, "bench: --ranks expected ints >= 1, got (8, 16.0)"),
    ({"ranks": ("8",)}, "bench: --ranks expected ints >= 1, got ('8',)"),
    ({"sweep_tokens": (0,)}, "bench: --sweep-tokens expected ints >= 1, got (0,)"),
    ({"sweep_adapters": (0,)}, "bench: --sweep-adapters expected ints >= 1, got (0,)"),  # checked outside the sweep too
    # an empty list had left its rows out (no forward rows, no rank sweep, a table of the LoRABatch row alone)
    ({"ms": ()}, "bench: --ms expected a non-empty list of ints, got ()"),
    ({"ranks": []}, "bench: --ranks expected a non-empty list of ints, got []"),
    ({"sweep_tokens": ()}, "bench: --sweep-tokens expected a non-empty list of ints, got ()"),
    ({"sweep_adapters": ()}, "bench: --sweep-adapters expected a non-empty list of ints, got ()"),
    ({"backends": ()}, "bench: --backends expected a non-empty list of names, got ()"),
    ({"sections": ()}, "bench: --sections expected a non-empty list of names, got ()"),  # had run the default ones
    # "auto" had been refused as "unknown backend 'auto'; expected one of reference, ..., cpu or 'auto'"
    ({"backends": ("auto",)}, "bench: --backends expected names from reference, torch, triton, cuda, cpu, got auto"),
    ({"backends": ("torch", "nope", None)}, "bench: --backends expected names from reference, torch, triton, cuda, "
                                            "cpu, got nope,None"),
    ({"sections": (1,)}, "bench: --sections expected names from host, forward, train, grouped, decode, sweep (or all "
                         "alone), got 1 (unknown: 1)"),  # had been "sequence item 0: expected str instance"
])
def test_bad_config_names_the_option(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _tiny(**change).resolved()


@pytest.mark.parametrize("change, message", [
    # a string had been split into letters: ranks "16" measured ranks "1" and "6" (then a TypeError deep in the run),
    # backends "torch" was refused as "--backends 't' is not available"
    ({"ranks": "16"}, "bench: --ranks expected a list or tuple of ints, got the string '16'"),
    ({"ms": "1,4"}, "bench: --ms expected a list or tuple of ints, got the string '1,4'"),
    ({"sweep_tokens": "16"}, "bench: --sweep-tokens expected a list or tuple of ints, got the string '16'"),
    ({"sweep_adapters": b"4"}, "bench: --sweep-adapters expected a list or tuple of ints, got the string b'4'"),
    ({"backends": "torch"}, "bench: --backends expected a list or tuple of names, got the string 'torch' (one name: "
                            "('torch',))"),
    ({"sections": "all"}, "bench: --sections expected a list or tuple of names, got the string 'all' (one name: "
                          "('all',))"),
    ({"ms": 16}, "bench: --ms expected a list or tuple of ints, got 16"),  # (16) for (16,)
    # a truthy string had picked the quick preset, or shown the progress bar
    ({"quick": "no"}, "bench: --quick expected a bool, got 'no'"),
    ({"quick": None}, "bench: --quick expected a bool, got None"),
    ({"progress": "no"}, "bench: progress expected a bool, got 'no'"),
])
def test_a_config_value_of_the_wrong_type_names_the_option(change, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        _tiny(**change).resolved()


def test_config_values_at_their_bounds_are_accepted_and_normalised():
    cfg = _tiny(warmup=0, threads=None, seed=2 ** 64 - 1, ms=[1], ranks=range(1, 3), sweep_tokens=iter([1]),
                sweep_adapters=(1,), backends=["torch"], sections=["host", "sweep"], quick=1, progress=0).resolved()
    assert (cfg.warmup, cfg.threads, cfg.seed, cfg.ms, cfg.ranks, cfg.sweep_tokens, cfg.backends, cfg.sections) == (
        0, None, 2 ** 64 - 1, (1,), (1, 2), (1,), ("torch",), ("host", "sweep"))
    assert cfg.quick is True and cfg.progress is False
    assert _tiny(seed=-2 ** 63, threads=1).resolved().seed == -2 ** 63
    # quick picks the preset: 0 the full one, 1 the quick one, as False and True do
    assert bench.BenchConfig(device="cpu", quick=0).resolved() == bench.BenchConfig(device="cpu").resolved()
    assert bench.BenchConfig(device="cpu", quick=1).resolved().ms == bench.PRESETS["cpu_quick"]["ms"]


@pytest.mark.cuda_branch
def test_defaults_name_the_device_and_leave_out_reference_and_the_interpreter():
    # the run, the table and the JSON get the device's name (None had been kept); the default backends are those that
    # run here but the reference oracle and, on CPU, the Triton interpreter (minutes per row under TRITON_INTERPRET=1)
    assert bench.BenchConfig().resolved().device == ("cuda" if torch.cuda.is_available() else "cpu")
    with_extension = bench.backends.unavailable_reason("cpu", "cpu") is None
    assert bench.BenchConfig(device="cpu").resolved().backends == (("torch", "cpu") if with_extension else ("torch",))


@pytest.mark.parametrize("alias, name", [("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16")])
def test_a_dtype_alias_resolves_to_its_full_name(alias, name):
    # the run, the table and the JSON see the full name alone; run_bench resolves an already resolved config again
    cfg = _tiny(dtype=alias).resolved()
    assert cfg == _tiny(dtype=name).resolved() and cfg.dtype == name
    assert cfg.resolved() == cfg


def test_sweep_section_rows():
    result = bench.run_bench(_tiny(sections=("sweep",), sweep_tokens=(4, 32), sweep_adapters=(1, 4)))
    kinds = {}
    for row in result["rows"]:
        kinds.setdefault(row["kind"], []).append(row)
    assert "error" not in kinds, kinds.get("error")
    # points: (4, 1), (4, 4), (32, 1), (32, 4); "one adapter" rows only where there are several
    assert len(kinds["sweep_vs_loop"]) == 4
    assert len(kinds["sweep_vs_one"]) == 2
    assert len(kinds["sweep_bandwidth"]) == 4  # every point is a decode size (<= GRAPH_MAX_TOKENS tokens)
    assert len(kinds["mixed_vs_padded"]) == 2
    assert all(row["ratio"] > 0 for rows in kinds.values() for row in rows)
    assert result["copy_bandwidth_gbs"] > 0
    assert "grouped sweep: mixed ranks 8/16/32/64" in bench.format_bench(result)


def test_the_main_rank_gets_its_fwd_bwd_vs_gemms_row_outside_the_rank_sweep():
    """--rank names the rank of design.md §8's rows: with --ranks 16 and --rank 8, "LoRA fwd+bwd / the two base
    GEMMs" (measured in the rank sweep) was measured at r = 16 alone, without its target (helper 129)."""
    cfg = bench.BenchConfig(device="cpu", quick=True, threads=1, reps=2, warmup=0, hidden=32, backends=("torch",),
                            sections=("train",), train_m=32, rank=8, ranks=(16,))
    rows = bench.run_bench(cfg)["rows"]
    main = [row for row in rows if row["kind"] == "fwd_bwd_vs_gemms"]
    assert len(main) == 1 and main[0]["shape"].endswith("r=8") and main[0]["target"] == "<= 1.08", main
    assert [row["shape"][-4:] for row in rows if row["kind"] == "fwd_bwd_vs_gemms_other_rank"] == ["r=16"]


def test_rank_sweep_forward_rows_carry_the_target_of_their_token_count():
    """The rank sweep's forward row took the M >= 256 target (<= 1.05) at any --train-m; design.md §8 sets none
    between 16 and 256 tokens, as the forward rows do."""
    assert [bench.forward_kind(m) for m in (1, 16, 17, 255, 256, 8192)] == [
        "fwd_decode", "fwd_decode", None, None, "fwd_prefill", "fwd_prefill"]
    rows = bench.run_bench(_tiny(sections=("train",), train_m=64, ranks=(4, 8), rank=4))["rows"]
    sweep = [row for row in rows if row["section"] == "forward / base F.linear, rank sweep"]
    assert len(sweep) == 2 and all(row["kind"] is None and row["target"] is None for row in sweep), sweep


def test_a_gpu_rank_sweep_forward_row_under_graph_size_is_timed_as_graph_replays(monkeypatch):
    """On GPUs the forward targets judge CUDA-graph replays (the kernels); the rank sweep's forward row at a
    --train-m <= GRAPH_MAX_TOKENS was timed eagerly (the host path) and still judged against fwd_decode's target.
    Stand-ins: on_gpu=True and a measure that records its graph flag; nothing is timed."""
    graphs = []

    def measure(candidates, device, reps, warmup, graph=False):
        graphs.append(graph)
        return {name: 1.0 for name in candidates}
    monkeypatch.setattr(bench, "measure", measure)
    cfg = bench.BenchConfig(device="cpu", quick=True, hidden=32, rank=4, ranks=(4,), train_m=16,
                            backends=("torch",)).resolved()
    rows = []
    timing = {"device": torch.device("cpu"), "reps": 1, "warmup": 0}
    bench.rank_sweep_rows(rows, cfg, torch.device("cpu"), torch.float32, timing, True, lambda label: None)
    (forward,) = [row for row in rows if row["section"].startswith("forward / base F.linear, rank sweep")]
    assert forward["section"].endswith(", CUDA-graph replay") and forward["kind"] == "fwd_decode"
    assert graphs[rows.index(forward)] is True


def test_the_environment_is_read_before_the_rows(monkeypatch):
    """The load average printed "at start" (and the date) were read when the result was assembled, at the end,
    counting the bench's own load."""
    loads = iter([(0.5, 0.5, 0.5)] + [(9.0, 9.0, 9.0)] * 100)
    monkeypatch.setattr(os, "getloadavg", lambda: next(loads))
    measure = bench.measure

    def measure_after_the_first_read(*args, **kwargs):
        next(loads)
        return measure(*args, **kwargs)

    monkeypatch.setattr(bench, "measure", measure_after_the_first_read)
    result = bench.run_bench(_tiny(sections=("forward",), ms=(2,)))
    assert "load average 0.50 at start" in bench.format_bench(result)


def test_the_bench_table_names_the_machine_as_compare_does():
    """One machine line for both tables: bench's own copy left the load average out on GPUs, where other jobs on
    the host distort the launch-bound rows' timings too."""
    result = {"config": {"dtype": "bfloat16", "hidden": 8, "rank": 2, "backends": ["cuda"]},
              "environment": {"device": "cuda", "gpu": "G", "cpu": "x", "cpu_threads": 1, "torch": "t",
                              "triton": None, "date": "d", "load_average": (1.5, 1.0, 1.0)},
              "timing": "t", "copy_bandwidth_gbs": None, "rows": [], "wall_s": 1.0}
    assert "(G, load average 1.50 at start)" in bench.format_bench(result).splitlines()[0]
    assert compare.machine_text(result["environment"]) == "G, load average 1.50 at start"


def test_a_failing_measurement_is_an_error_row_and_the_run_goes_on(monkeypatch):
    """A backend that raises gets an error row (its first line of message, in the table and on an ERROR line) and
    the other rows are still measured; the updates a run sends while it goes on print as PARTIAL."""
    measure, calls = bench.measure, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("kernel failed\nsecond line")
        return measure(*args, **kwargs)

    monkeypatch.setattr(bench, "measure", failing_once)
    updates = []
    result = bench.run_bench(_tiny(sections=("forward",), ms=(2, 4)), on_update=updates.append)
    errors = [row for row in result["rows"] if row["kind"] == "error"]
    assert len(errors) == 1 and errors[0]["note"] == "error: RuntimeError: kernel failed", errors
    assert any(row["kind"] != "error" and row["ratio"] is not None for row in result["rows"]), result["rows"]
    text = bench.format_bench(result)
    assert f"ERROR torch ({errors[0]['section']}, {errors[0]['shape']}): error: RuntimeError: kernel failed" in text
    assert any(line.rstrip().endswith("ERROR") for line in text.splitlines() if line.startswith("  torch")), text
    assert "PARTIAL" not in text and not result["partial"]
    assert updates and updates[0]["partial"] and "PARTIAL: the sweep did not finish" in bench.format_bench(updates[0])


def test_moved_bytes_counts_weight_adapters_and_activations():
    # W 4x4, two adapters of rank 2 (A 2x4 and B 4x2 each), 3 tokens of x (4) and y (4), bf16
    assert bench._moved_bytes(3, 4, 4, 2, 2, torch.bfloat16) == (16 + 2 * 2 * 8 + 3 * 8) * 2


def test_host_overhead_rows_cover_every_backend():
    cfg = _tiny(backends=("torch", "cpu") if HAS_EXTENSION else ("torch",)).resolved()
    rows = []
    bench.host_overhead_rows(rows, cfg, torch.device("cpu"), torch.float32, False, lambda label: None)
    assert [row["backend"] for row in rows][0] == "-"  # LoRABatch first, then 4 rows per backend
    assert len(rows) == 1 + 4 * len(cfg.backends)
    assert all(row["kind"] == "host_overhead" and row["ours_value"] > 0 for row in rows)
    # its own method, said in each row: --reps and --warmup (the run's "timing" line) do not apply to it
    assert all(row["note"].startswith("wall time per call, best of 5 runs of 100 back-to-back calls after 10 "
                                      "warm-up (not --reps/--warmup)") for row in rows)


@pytest.mark.skipif(not HAS_EXTENSION, reason="needs the C++ extension")
def test_cuda_bwd_dy_row_computes_the_same_products():
    # The row times the C++ op against two GEMMs; on CPU the op's CPU kernel stands in for the CUDA one. First,
    # the two candidates compute the same thing (else the ratio compares different work).
    inputs = bench.InputSets(torch.device("cpu"), torch.float32, 16, 8, 12, 4, grad=True, count=2)
    st = inputs.sets[0]
    s = (st["x"] @ st["a"].T).detach().float()
    d_lora_b, ds = torch.ops.lora_kernels.lora_bwd_dy(st["dy"], s, st["b"].detach(), 2.0)
    torch.testing.assert_close(d_lora_b, 2.0 * st["dy"].T @ s)
    torch.testing.assert_close(ds, 2.0 * st["dy"] @ st["b"].detach())
    rows = []
    bench.cuda_bwd_dy_row(rows, inputs, "tiny", {"device": torch.device("cpu"), "reps": 2, "warmup": 1}, False)
    assert rows[0]["kind"] == "cuda_bwd_dy" and rows[0]["ratio"] > 0, rows


@pytest.mark.skipif(not HAS_EXTENSION, reason="needs the C++ extension")
def test_cuda_decode_row_times_the_op_at_m_against_one_row_past_the_decode_bound():
    # The row is for the cuda backend; on CPU the cpu backend's op stands in (the plumbing: shapes, kind, labels).
    inputs = bench.InputSets(torch.device("cpu"), torch.float32, 4, 8, 12, 3, count=2)
    rows = []
    bench.cuda_decode_row(rows, inputs, 4, {"device": torch.device("cpu"), "reps": 2, "warmup": 1}, False, False,
                          backend="cpu")
    (row,) = rows
    assert (row["kind"], row["backend"], row["shape"]) == ("cuda_decode", "cpu", "M=4 K=8 N=12 r=3"), row
    assert row["ratio"] > 0 and row["baseline"] == f"same at M = {bench.CUDA_DECODE_MAX_M + 1} (GEMM path)"


def test_tma_forward_only_switches_tma_on_for_the_forward_launch_alone(monkeypatch):
    """The "TMA forward only" row's fwd+bwd: USE_TMA is on when the forward asks whether to use TMA and off when
    dX asks, and it is restored after; the gradients are the plain call's."""
    tk = pytest.importorskip("lora_kernels.triton.lora_linear")
    asked = []
    monkeypatch.setattr(tk, "_use_tma", lambda tokens, weight: asked.append(tk.USE_TMA) or False)
    before = tk.USE_TMA
    torch.manual_seed(0)
    x, a, b = (torch.randn(*shape, requires_grad=True) for shape in ((4, 16), (2, 16), (8, 2)))
    w, dy = torch.randn(8, 16), torch.randn(4, 8)
    grads = bench._tma_forward_only(x, w, a, b, dy)
    assert asked == [True, False] and tk.USE_TMA == before
    expected = torch.autograd.grad(lora_linear(x, w, a, b, 2.0, backend="triton"), (x, a, b), dy)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_with_triton_setting_sets_and_restores_it():
    tk = pytest.importorskip("lora_kernels.triton.lora_linear")
    seen = []
    before = tk.SPLIT_OVERRIDE, tk.USE_TMA
    bench._with_triton_setting("SPLIT_OVERRIDE", 1, lambda: seen.append(tk.SPLIT_OVERRIDE))()
    bench._with_triton_setting("USE_TMA", not tk.USE_TMA, lambda: seen.append(tk.USE_TMA))()
    assert seen == [1, not before[1]] and (tk.SPLIT_OVERRIDE, tk.USE_TMA) == before


def test_pytest_benchmark_table_ratios():
    """benchmarks/table.py: each ratio against the group's baseline, inverted where design.md §8 states the row as
    baseline / ours (PEFT's layer with dropout), and a second column against full fine-tuning."""
    table = _benchmark_script("table")

    def entry(group, name, median, **info):
        return {"group": group, "name": name, "stats": {"median": median}, "extra_info": info}

    data = {"benchmarks": [
        entry("fwd+bwd", "gemms", 1.0, role="baseline"), entry("fwd+bwd", "full", 3.0, role="full_ft"),
        entry("fwd+bwd", "ours", 2.0, role="candidate"),
        entry("dropout", "peft", 3.0, role="baseline"), entry("dropout", "ours", 2.0, role="candidate", inverted=True),
    ]}
    rows = {(group, name): (ratio, inverted, vs_full)
            for group, name, _, _, ratio, inverted, vs_full in table.pytest_benchmark_ratios(data)}
    assert rows[("fwd+bwd", "ours")] == (2.0, False, pytest.approx(2 / 3))
    assert rows[("fwd+bwd", "full")] == (3.0, False, None) and rows[("fwd+bwd", "gemms")][2] is None
    assert rows[("dropout", "ours")] == (1.5, True, None)  # PEFT / ours


def test_summary_of_the_crossovers_groups_the_backward_by_dtype_and_rank():
    """gpu_check's summary shows cuda_crossovers.py's ratios: the decode forward per M, the dY-once backward on one
    line per (dtype, rank), in the order measured."""
    table = _benchmark_script("table")

    def backward(dtype, m, r, ratio):
        return {"section": f"dY-once backward, {dtype}", "shape": f"M={m} K=8 N=8 r={r}", "m": m, "r": r,
                "kernel_vs_gemms": ratio}
    rows = [{"section": "decode forward", "shape": "M=1 K=8 N=8 r=4", "kernel_vs_gemm_path": 0.631},
            {"section": "decode forward", "shape": "M=16 K=8 N=8 r=4", "kernel_vs_gemm_path": 1.189},
            backward("bfloat16", 64, 8, 0.5), backward("bfloat16", 256, 8, 0.6), backward("bfloat16", 64, 16, 0.7),
            backward("float32", 64, 8, 2.25)]
    assert table.summary_crossover_lines({"device": "x", "rows": rows}) == [
        "decode forward / its GEMM path: M=1 0.63  M=16 1.19",
        "dY-once / 2 GEMMs, bfloat16 r=8: M=64 0.50  M=256 0.60",
        "dY-once / 2 GEMMs, bfloat16 r=16: M=64 0.70",
        "dY-once / 2 GEMMs, float32 r=8: M=64 2.25"]


def test_crossovers_header_counts_the_calls_measure_times_and_refuses_bad_reps(capsys):
    """The header said "median of {--reps}" where measure times a whole number of calls per round (--reps 5: 6), and
    --reps 0 or -3 ran, printing "median of 0" (helper 258)."""
    crossovers = _benchmark_script("cuda_crossovers")
    for option, bad, expected in (("--reps", "0", ">= 1"), ("--reps", "-3", ">= 1"), ("--warmup", "-3", ">= 0")):
        with pytest.raises(SystemExit):
            crossovers.main(["--device", "cpu", "--quick", option, bad])
        assert f"argument {option}: expected an integer {expected}" in capsys.readouterr().err
    assert bench.timed_calls(5) == 6 and bench.timed_calls(30) == 30


def test_crossovers_keep_the_sections_measured_before_one_fails(tmp_path, monkeypatch, capsys):
    """A GPU lease is rare: a section of cuda_crossovers.py that raises is reported and the others still run, and
    the JSON holds what was measured (it was written only at the end, so one error lost every row)."""
    backend_or_skip("cpu", "cpu")  # its rows on CPU run the cpu backend
    crossovers = _benchmark_script("cuda_crossovers")

    def fail(*args, **kwargs):
        raise RuntimeError("decode kernel failed")
    monkeypatch.setattr(crossovers, "decode_rows", fail)
    saved = tmp_path / "crossovers.json"
    assert crossovers.main(["--device", "cpu", "--quick", "--reps", "2", "--warmup", "1", "--save", str(saved)]) == 1
    assert "ERROR: RuntimeError: decode kernel failed" in capsys.readouterr().out
    rows = json.loads(saved.read_text())["rows"]
    assert rows and all(row["section"].startswith("dY-once backward") for row in rows)


def test_profile_tables_survive_a_failing_rounding_count(monkeypatch, capsys):
    """profile_kernels.py prints its tables at the end: an error in the rounding counts it prints first is reported
    (exit status 1) and the tables still come (it ended the run before)."""
    profile = _benchmark_script("profile_kernels")

    def fail(*args, **kwargs):
        raise RuntimeError("rounding count failed")
    monkeypatch.setattr(profile, "_print_rounding_counts", fail)
    assert profile.main(["--device", "cpu", "--quick", "--iterations", "1"]) == 1
    out = capsys.readouterr().out
    assert "ERROR (rounding counts" in out and "=== the two base GEMMs" in out


def test_counting_saved_bytes_keeps_nothing_alive():
    """saved_bytes' hook returned the tensor itself: an op that saves its own output (sigmoid, softmax, SiLU's
    compositions) then held its autograd node through it, a cycle through C++ that gc cannot collect, so the
    measured forward's activations stayed allocated."""
    import gc
    import weakref

    x, w = torch.randn(64, 32, requires_grad=True), torch.randn(48, 32)
    outputs = []

    def forward():
        y = torch.sigmoid(x @ w.T)  # saves y for its backward
        outputs.append(weakref.ref(y))
        return y
    assert bench.saved_bytes(forward, exclude=(w,)) == 64 * 48 * 4  # y: the GEMM keeps w alone (w needs no grad)
    gc.collect()
    assert outputs[0]() is None


def test_profile_decode_tables_rotate_weights_past_the_cache(monkeypatch):
    """The decode and grouped tables called one kernel on the same weights again and again: a 33.5 MB W stays in an
    H200's 50 MB L2, so their kernel times were the cache's, beside bench rows that rotate their inputs. Each call
    now takes the next of copies that pass the cache together."""
    profile = _benchmark_script("profile_kernels")
    cache = 1 << 20
    monkeypatch.setattr(bench, "_cache_bytes", lambda device: cache)
    weight = torch.randn(256, 256)
    copies = profile._copies(torch.device("cpu"), weight)
    assert len(copies) == bench.MAX_SETS or len(copies) * weight.nbytes >= bench.CACHE_MULTIPLE * cache
    assert all(torch.equal(w, weight) for (w,) in copies)
    seen = []
    call = profile._rotating(lambda w: seen.append(w.data_ptr()), copies)
    for _ in range(2 * len(copies)):
        call()
    assert len(set(seen)) == len(copies) and seen[:len(copies)] == seen[len(copies):]


def test_summary_names_the_bench_parts_that_left_no_results(tmp_path):
    """gpu_check runs the bench in three parts; with only train.json saved the summary said nothing of the others,
    and its forward rows came from the train part's rank sweep, as if the forward part had run."""
    import io
    import json

    from lora_kernels.compare import to_json
    table = _benchmark_script("table")
    result = bench.run_bench(_tiny(sections=("train",), train_m=32, rank=4, ranks=(4,)))
    (tmp_path / "train.json").write_text(to_json(result))
    out = io.StringIO()
    table.print_summary(str(tmp_path), out)
    assert f"bench: no bench.json, grouped.json in {tmp_path} (that part did not run, or failed before saving)" \
        in out.getvalue(), out.getvalue()
    for name in ("bench.json", "grouped.json"):
        (tmp_path / name).write_text(json.dumps({**json.loads(to_json(result)), "rows": []}))
    out = io.StringIO()
    table.print_summary(str(tmp_path), out)
    assert "that part did not run" not in out.getvalue()


def test_summary_of_a_compare_json_with_a_diverged_run():
    """compare writes a non-finite loss as null (standard JSON): the gpu_check summary prints it, not a TypeError."""
    table = _benchmark_script("table")
    run = {"trainable_percent": 1.0, "optimizer_state_bytes": 8, "peak_step_bytes": None, "step_ms_median": 2.0,
           "tokens_per_s": 10.0, "checkpoint_bytes": 4, "eval_loss": 0.5}
    compare = {"methods": {"full": {**run, "eval_loss": None}, "lora_torch": run, "lora_fused": run}, "inference": None}
    rows = {row[0]: row[1:] for row in table.summary_compare_rows(compare)}
    assert rows["eval loss after training"] == ("not finite", "0.500", "0.500")
    assert rows["step ms, first -> last third"] == ("n/a", "n/a", "n/a")  # a run without its step list
    compare["methods"]["lora_fused"] = {**run, "step_ms_all": [37.7, 43.8, 58.9, 46.9, 48.5, 40.8, 61.8, 62.5, 63.6]}
    rows = {row[0]: row[1:] for row in table.summary_compare_rows(compare)}
    assert rows["step ms, first -> last third"] == ("n/a", "n/a", "43.8 -> 62.5")


def test_summary_of_a_compare_json_puts_each_column_over_full_fine_tuning():
    """Each ratio row of the gpu_check summary is that LoRA column's value over full fine-tuning's (inference: over
    the merged latency), not the inverse nor the other LoRA column's; a reading missing from full fine-tuning (a CPU
    peak that could not be read) gives n/a, and a loss of 0 is a loss, not "not finite"."""
    table = _benchmark_script("table")
    full = {"trainable_percent": 100.0, "optimizer_state_bytes": 1000, "peak_step_bytes": 2000, "step_ms_median": 40.0,
            "tokens_per_s": 100.0, "checkpoint_bytes": 4000, "eval_loss": 0.0}
    torch_lora = {"trainable_percent": 1.5, "optimizer_state_bytes": 10, "peak_step_bytes": 1000,
                  "step_ms_median": 50.0, "tokens_per_s": 80.0, "checkpoint_bytes": 40, "eval_loss": 0.25}
    fused = {**torch_lora, "optimizer_state_bytes": 20, "peak_step_bytes": 500, "step_ms_median": 20.0,
             "tokens_per_s": 200.0, "checkpoint_bytes": 80, "eval_loss": 0.125}
    compare = {"methods": {"full": full, "lora_torch": torch_lora, "lora_fused": fused},
               "inference": {"merged_ms": 2.0, "unmerged_unfused_ms": 3.0, "unmerged_fused_ms": 5.0}}
    rows = {row[0]: row[1:] for row in table.summary_compare_rows(compare)}
    assert rows == {
        "trainable params %": ("100.00", "1.500", "1.500"),
        "optimizer state / full FT": ("1", "0.010", "0.020"),
        "peak memory per step / full FT": ("1", "0.500", "0.250"),
        "step time / full FT": ("1", "1.250", "0.500"),
        "step ms, first -> last third": ("n/a", "n/a", "n/a"),
        "tokens / s": ("100", "80", "200"),
        "checkpoint / full FT": ("1", "0.010", "0.020"),
        "eval loss after training": ("0.000", "0.250", "0.125"),
        "inference latency / merged": ("1 (merged)", "1.500", "2.500"),
    }
    full["peak_step_bytes"] = None
    rows = {row[0]: row[1:] for row in table.summary_compare_rows(compare)}
    assert rows["peak memory per step / full FT"] == ("1", "n/a", "n/a")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_graph_replay_timing_on_gpu(backend):
    # Every backend's forward and grouped forward can be captured in a CUDA graph and replayed by the bench, and
    # a replay computes what an eager call computes.
    reason = bench.backends.unavailable_reason(backend, "cuda")
    if reason:
        pytest.skip(reason)
    device, dtype = torch.device("cuda"), torch.bfloat16
    x, w = torch.randn(16, 64, device=device, dtype=dtype), torch.randn(48, 64, device=device, dtype=dtype)
    a, b = torch.randn(8, 64, device=device, dtype=dtype), torch.randn(48, 8, device=device, dtype=dtype)
    lora_a, lora_b, scalings = bench.stacked_adapters(device, dtype, 4, 64, 48, 8)
    batch = LoRABatch.from_adapter_ids(torch.arange(16, device=device) % 4, 4)
    out = {}
    with torch.no_grad():
        single = lambda: out.__setitem__("single", lora_linear(x, w, a, b, 2.0, backend=backend))  # noqa: E731
        grouped = lambda: out.__setitem__("grouped", multi_lora_linear(  # noqa: E731
            x, w, lora_a, lora_b, batch, scalings, backend=backend))
        times = bench.measure({"single": [single], "grouped": [grouped]}, device, reps=3, warmup=1, graph=True)
        assert all(t > 0 for t in times.values())
        torch.testing.assert_close(out["single"], lora_linear(x, w, a, b, 2.0, backend=backend))
        torch.testing.assert_close(out["grouped"], multi_lora_linear(x, w, lora_a, lora_b, batch, scalings,
                                                                     backend=backend))


def _saved_storages(forward):
    """A tensor of each storage autograd saves in forward()."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return list(saved.values())


def test_activation_memory_row_counts_the_input_the_layer_keeps():
    # design.md §8: a LoRA layer's activation memory is "x and S only", against PEFT's. Ours keeps x (drop(x) is
    # redrawn from a seed in backward); PEFT's layer with dropout keeps drop(x) and its mask, and not x (its frozen
    # base GEMM saves only W). The row had left x out of both sides, so ours was reported as S alone.
    rows = bench.run_bench(_tiny(sections=("train",), train_m=64))["rows"]
    (row,) = [r for r in rows if r["kind"] == "memory_vs_unfused"]
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(32, 32)
    a, b = torch.randn(16, 32, requires_grad=True), torch.randn(32, 16, requires_grad=True)
    kept = _saved_storages(lambda: lora_linear(x, w, a, b, 2.0, dropout_p=bench.DROPOUT, backend="torch"))
    assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in kept)  # ours keeps x
    assert row["ours_value"] >= x.numel() * x.element_size(), row
    assert row["ratio"] > 0.3, row  # x against drop(x) + mask: about 0.5-0.7, not S against them (0.03)


@pytest.mark.skipif(not HAS_EXTENSION, reason="needs the C++ extension")
def test_the_dy_once_row_times_graph_replays_on_gpus(monkeypatch):
    # At the kernel's bound (M·r = 4096: 2 MB of dY at K = N = 4096) its GPU work is a few µs, less than the host
    # time of one call: eager CUDA events there measure the host path (bench._time_calls' docstring), which the
    # H200 row "0.52x at its bound, 53.9 against 104.4 µs, eager" did. The GPU branch must replay CUDA graphs.
    graph_flags = []
    real_measure = bench.measure

    def spy(candidates, device, reps, warmup, graph=False):
        graph_flags.append(graph)
        return real_measure(candidates, device, reps, warmup, graph=graph)
    monkeypatch.setattr(bench, "measure", spy)
    inputs = bench.InputSets(torch.device("cpu"), torch.float32, 16, 8, 12, 4, grad=True, count=2)
    rows = []
    bench.cuda_bwd_dy_row(rows, inputs, "tiny", {"device": torch.device("cpu"), "reps": 2, "warmup": 1}, False)
    assert rows[0]["kind"] == "cuda_bwd_dy" and graph_flags == [True], (rows, graph_flags)


def test_the_dy_once_candidates_rotate_by_the_bytes_they_touch(monkeypatch):
    # InputSets counts its sets by x, W, A, B, dY and y; the dY-once candidates read only dY, S and B. Counted by
    # W's bytes, the rotation of dY stayed inside the cache (H200, K = N = 4096, bf16: 25-37 MiB of 50 at
    # M = 1024-2048, where cuda_crossovers looks for the kernel's crossover), so both columns read dY from L2.
    cache = 1 << 20
    monkeypatch.setattr(bench, "_cache_bytes", lambda device: cache)
    inputs = bench.InputSets(torch.device("cpu"), torch.float32, 64, 512, 512, 4, grad=True)
    candidates = bench.bwd_dy_candidates(inputs)
    dys = {fn.__defaults__[0].untyped_storage().data_ptr(): fn.__defaults__[0] for fn in candidates["gemms"]}
    assert len(dys) == len(candidates["gemms"]) == len(candidates["kernel"])  # one distinct dY per set
    rotated = sum(dy.nbytes for dy in dys.values())
    assert len(dys) == bench.MAX_SETS or rotated >= bench.CACHE_MULTIPLE * cache, (len(dys), rotated)


def test_the_fused_qkv_slices_row_rotates_its_operands(monkeypatch):
    """The add_lora slices row timed one operand set per candidate, where every other grouped row rotates them past
    CACHE_MULTIPLE x the cache: the GPU preset's adapters (38 MB in bf16) fit in an H100's 50 MB L2 (helper 258)."""
    cache = 1 << 20
    monkeypatch.setattr(bench, "_cache_bytes", lambda device: cache)
    timed = {}

    def measure(candidates, **kwargs):
        timed.update(candidates)
        return dict.fromkeys(candidates, 1.0)
    monkeypatch.setattr(bench, "measure", measure)
    cfg = bench.BenchConfig(device="cpu", quick=True, backends=("torch",)).resolved()
    rows = []
    bench.sliced_rows(rows, cfg, torch.device("cpu"), torch.float32, {"device": torch.device("cpu"), "reps": 1,
                                                                      "warmup": 0}, False, lambda label: None)
    assert [row["kind"] for row in rows] == ["sliced_launches"]
    assert len(timed["listed"]) == len(timed["per_slice"]) >= 2
    # each call reads its own x (and adapters): distinct storages
    xs = {fn.__defaults__[0]["x"].data_ptr() for fn in timed["listed"]}
    assert len(xs) == len(timed["listed"])


def test_every_rows_ratio_is_its_ours_value_over_its_baseline_value():
    """Each row's ratio is the value in its "ours" column over the one in its "baseline" column (the one row that
    design.md §8 states as baseline / ours, PEFT's layer with dropout, inverted and said so in its note), in every
    section: a ratio inverted or divided by another row's value had printed, e.g., LoRA at 0.5x full fine-tuning's
    fwd+bwd time where it took 2x, or our activation memory at 1.6x PEFT's where it was 0.6x."""
    backends = ("torch", "cpu") if HAS_EXTENSION else ("torch",)
    rows = bench.run_bench(_tiny(sections=("all",), backends=backends, ms=(2,), train_m=32, sweep_tokens=(4,),
                                 sweep_adapters=(2,)))["rows"]
    assert not [row for row in rows if row["kind"] == "error"]
    kinds = {row["kind"] for row in rows if row["ratio"] is not None}
    assert {"unfused_vs_ours", "lora_vs_full", "memory_vs_unfused", "fwd_bwd_vs_gemms", "decode_bandwidth",
            "grouped_vs_loop", "sliced_launches", "sweep_bandwidth", "host_overhead"} <= kinds
    for row in rows:
        if row["ratio"] is None:
            continue
        if row["kind"] == "unfused_vs_ours":
            assert row["note"].startswith("ratio = baseline / ours"), row
            assert row["ratio"] == pytest.approx(row["baseline_value"] / row["ours_value"]), row
        else:
            assert row["ratio"] == pytest.approx(row["ours_value"] / row["baseline_value"]), row


def test_copy_bandwidth_counts_the_bytes_read_and_written(monkeypatch):
    """The decode bandwidth rows' baseline: a copy of n float32 elements reads 4n bytes and writes 4n, so 1 MiB
    copied in 1 ms is 2 x 4 MiB / 1 ms (counting one of the two had doubled every bandwidth ratio)."""
    monkeypatch.setattr(bench, "measure", lambda candidates, **timing: dict.fromkeys(candidates, 1.0))
    timing = {"device": torch.device("cpu"), "reps": 1, "warmup": 0}
    assert bench.copy_bandwidth(1 << 20, timing) == pytest.approx(2 * 4 * (1 << 20) / 1e6)


def test_every_candidate_is_warmed_up_before_the_first_is_timed(monkeypatch):
    """measure warms every candidate (each of its input sets in turn) before timing any: warming the first one alone
    left the others' first timed calls cold (allocator, caches, lazily built kernels)."""
    calls = []
    candidates = {name: [lambda name=name, i=i: calls.append((name, i)) for i in range(2)] for name in ("a", "b")}
    bench.measure(candidates, torch.device("cpu"), reps=2, warmup=3)
    warm = [("a", 0), ("a", 1), ("a", 0), ("b", 0), ("b", 1), ("b", 0)]
    assert calls[:6] == warm
    assert len(calls) == 6 + bench.ROUNDS * len(candidates) * max(1, -(-2 // bench.ROUNDS))


# ------------------------------------------------------------------------------------------------ mutation round
# Survivors of bench.py's mutation round (helper 204): the timers' arithmetic, the rotation counts, each row's
# candidates and values, the table's notes. Stand-in clocks, devices and timings: no timing is asserted.

def test_num_sets_aims_at_the_cache_multiple_within_the_caps(monkeypatch):
    """Rotating sets: enough that together they exceed CACHE_MULTIPLE x the cache (rounded up: rounded down, the sets
    fit in it and the rows time cache hits), at most MAX_SETS, at most what this device's MAX_ROTATION_BYTES holds
    (not the GPU's 8 GiB on a CPU), and never fewer than two."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(bench, "_cache_bytes", lambda device: 1000)
    assert bench.num_sets(cpu, 700) == 5  # 3 x 1000 / 700 = 4.3
    assert bench.num_sets(cpu, 1000) == 3
    assert bench.num_sets(cpu, 1) == bench.MAX_SETS
    assert bench.num_sets(cpu, 10 ** 6) == 2  # one set is past the cache already: still two
    monkeypatch.setattr(bench, "_cache_bytes", lambda device: 1 << 40)
    assert bench.num_sets(cpu, bench.MAX_ROTATION_BYTES["cpu"] // 5) == 5  # the memory allowed caps it


def test_input_sets_are_counted_by_the_bytes_a_call_touches(monkeypatch):
    """InputSets and GroupedSets count their sets by one set's bytes: x, W, A, B (and dY for training) and the
    output y, at the dtype's element size. Undercounted, the rotation stays inside the cache it is there to pass."""
    counted = []
    monkeypatch.setattr(bench, "num_sets", lambda device, set_bytes: counted.append(set_bytes) or 2)
    cpu, y_bytes = torch.device("cpu"), 4 * 12 * 2  # y: 4 tokens x N = 12 in bfloat16
    for grad in (False, True):
        s = bench.InputSets(cpu, torch.bfloat16, 4, 8, 12, 3, grad=grad).sets[0]
        operands = ("x", "w", "a", "b") + (("dy",) if grad else ())
        assert counted[-1] == sum(s[name].nbytes for name in operands) + y_bytes, grad
    grouped = bench.GroupedSets(cpu, torch.bfloat16, 4, 8, 12, 3, 5)
    s = grouped.sets[0]
    assert counted[-1] == grouped.bytes_per_set == sum(s[name].nbytes for name in ("x", "w", "a", "b")) + y_bytes


def test_cpu_call_times_are_milliseconds_of_each_call_in_turn(monkeypatch):
    """_time_calls: one time per rep in ms (the unit of every "ms" column and of _fmt_value), cycling through the
    input sets, the device drained before the first call (work queued earlier is not the first call's). A stand-in
    clock."""
    now, events = [0.0], []
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(bench, "synchronize", lambda device: events.append("sync"))

    def call(i, seconds):
        events.append(i)
        now[0] += seconds
    fns = [lambda: call(0, 0.001), lambda: call(1, 0.003)]
    assert bench._time_calls(fns, torch.device("cpu"), 3) == pytest.approx([1.0, 3.0, 1.0])
    assert events == ["sync", 0, 1, 0]


def test_measure_rounds_go_on_through_the_input_sets(monkeypatch):
    """Each of measure's rounds restarted at input set 0, so with fewer calls per round than sets (cpu_quick's 5
    reps: 3 calls per round, 8 sets) the timed calls touched sets 0-2 only, operands the cache held, where the sets
    are there to keep the next call's operands out of it."""
    monkeypatch.setattr(bench, "_warm_up", lambda fns, warmup: None)
    called = {"a": [], "b": []}
    candidates = {name: [lambda name=name, i=i: called[name].append(i) for i in range(8)] for name in called}
    bench.measure(candidates, torch.device("cpu"), reps=5, warmup=0)
    assert called == {"a": [0, 1, 2, 3, 4, 5], "b": [0, 1, 2, 3, 4, 5]}


def test_gpu_call_times_are_each_calls_events_and_the_backlog_only_when_asked(monkeypatch):
    """On CUDA each call is timed by its own start and end events (start.elapsed_time(end), positive), and the GPU
    spin that makes graph replays time the kernels alone is queued only when asked (backlog=True): before eager calls
    it hid the host path that their rows are there to include. Stand-ins for the CUDA calls; no GPU here."""
    now, slept = [0.0], []

    class Event:
        def __init__(self, enable_timing=False):
            self.at = None

        def record(self):
            self.at = now[0]

        def elapsed_time(self, end):
            return end.at - self.at
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", slept.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(bench, "synchronize", lambda device: None)

    def call(ms):
        now[0] += ms
    fns, cuda = [lambda: call(2.0), lambda: call(5.0)], torch.device("cuda")
    assert bench._time_calls(fns, cuda, 3) == [2.0, 5.0, 2.0] and slept == []
    assert bench._time_calls(fns, cuda, 2, backlog=True) == [2.0, 5.0] and slept == [bench.BACKLOG_SLEEP_CYCLES]


def test_host_time_is_the_best_runs_ms_per_call_from_a_drained_device_to_a_drained_one(monkeypatch):
    """host_time_ms: HOST_WARMUP calls, then HOST_REPEATS runs of HOST_CALLS calls, each from a drained device to a
    drained device, and the best run's ms per call: neither the warm-up's queued work nor a run's own work still
    queued at its end (an asynchronous device) may move the number, nor a slower run (a noisy host). Stand-ins for
    the clock and the device's queue: a call queues its work, synchronising runs it."""
    now, queued, calls = [0.0], [0.0], []
    runs = (1e-3, 3e-3, 2e-3, 5e-3, 4e-3)  # seconds per call in each run; the first is the best
    assert len(runs) == bench.HOST_REPEATS
    per_call = [0.5] * bench.HOST_WARMUP + [s for s in runs for _ in range(bench.HOST_CALLS)]

    def fn():
        queued[0] += per_call[len(calls)]
        calls.append(1)

    def synchronize(device):
        now[0] += queued[0]
        queued[0] = 0.0
    monkeypatch.setattr(bench, "synchronize", synchronize)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    assert bench.host_time_ms(fn, torch.device("cpu")) == pytest.approx(1.0)
    assert len(calls) == len(per_call)


def test_measure_takes_the_median_of_every_round_with_at_least_reps_calls(monkeypatch):
    """measure: the candidates alternate in ROUNDS rounds of ceil(reps / ROUNDS) calls (at least --reps calls in
    all, an odd count too), graph rows ask _time_calls for the backlog, and a candidate's number is the median of
    all its calls: not the best call, nor the mean (one outlier moves it), nor one round's."""
    assert bench.ROUNDS == 2  # the stand-in timings below give a list per round
    script = {"a": iter([[1.0, 2.0], [9.0, 3.0]]), "b": iter([[4.0, 5.0], [6.0, 100.0]])}
    log = []

    def time_calls(fns, device, reps, backlog=False, first=0):
        name = fns[0]()
        log.append((name, reps, backlog, first))
        return next(script[name])
    monkeypatch.setattr(bench, "_time_calls", time_calls)
    candidates = {name: [lambda name=name: name] for name in ("a", "b")}
    assert bench.measure(candidates, torch.device("cpu"), reps=3, warmup=0, graph=True) == {"a": 2.5, "b": 5.5}
    assert log == [("a", 2, True, 0), ("b", 2, True, 0), ("a", 2, True, 2), ("b", 2, True, 2)]


def test_peak_memory_is_the_calls_peak_above_what_was_allocated_before(monkeypatch):
    """peak_memory: the allocator's peak is reset before the call (an earlier, higher peak of the run is not this
    call's) and what was allocated before it (the inputs) is taken off. Stand-ins for the CUDA allocator."""
    state = {"allocated": 300, "peak": 5000}
    monkeypatch.setattr(bench, "synchronize", lambda device: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: state.update(peak=state["allocated"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])

    def fn():
        state["peak"] = max(state["peak"], state["allocated"] + 200)
    assert bench.peak_memory(fn, torch.device("cuda")) == 200
    assert bench.peak_memory(fn, torch.device("cpu")) is None


def test_a_gpu_row_is_judged_in_its_targets_direction():
    """On GPUs a row meets its target at or below a "<=" value and at or above a ">=" one (the unfused layer's
    speed-up), marked ok or MISS, with its floor; CPU rows are not judged."""
    rows = []
    for kind, ratio in (("fwd_decode", 1.05), ("fwd_decode", 1.2), ("unfused_vs_ours", 1.5), ("unfused_vs_ours", 1.1)):
        bench._row(rows, "s", kind, "torch", "M=1", "ours", "base", ratio, ratio, 1.0, "ms", True)
    bench._row(rows, "s", "fwd_decode", "torch", "M=1", "ours", "base", 1.05, 1.05, 1.0, "ms", False)
    assert [row["meets_target"] for row in rows] == [True, False, True, False, None]
    assert [bench._table_row(row)[1][-1] for row in rows] == ["ok", "MISS", "ok", "MISS", ""]
    assert (rows[0]["target"], rows[0]["floor"]) == ("<= 1.1", 1.01)
    assert (rows[2]["target"], rows[2]["floor"]) == (">= 1.3", None)


def test_prefill_tokens_as_many_as_the_rows_adapters_are_enough():
    """--prefill-tokens 64 spreads the grouped rows over their 64 adapters, one token each (and 16 the sweep's 16):
    only fewer are refused."""
    assert _tiny(sections=("grouped",), prefill_tokens=bench.LOOP_ADAPTERS).resolved().prefill_tokens == 64
    assert _tiny(sections=("sweep",), prefill_tokens=bench.PREFILL_ADAPTERS, sweep_tokens=(4,),
                 sweep_adapters=(2,)).resolved().prefill_tokens == 16


def test_each_host_row_is_over_the_baseline_call_of_its_own_kind(monkeypatch):
    """Host rows: the fwd+bwd rows over F.linear's fwd+bwd and over PEFT's unfused fwd+bwd, the forward rows and the
    LoRABatch row over F.linear's forward (a wrong or swapped baseline had printed, e.g., the autograd path's overhead
    against a plain forward). A stand-in host_time_ms gives each kind of call its own time."""
    def host_time_ms(fn, device):
        names = fn.__code__.co_names
        if "peft_lora_forward" in names:
            return 8.0
        if "multi_lora_linear" in names:
            return 6.0
        if "lora_linear" in names:
            return 5.0 if "grad" in names else 4.0
        if "from_adapter_ids" in names:
            return 3.0
        return 2.0 if "grad" in names else 1.0
    monkeypatch.setattr(bench, "host_time_ms", host_time_ms)
    rows = []
    bench.host_overhead_rows(rows, _tiny().resolved(), torch.device("cpu"), torch.float32, False, lambda label: None)
    assert [(row["ours"], row["ours_value"], row["baseline_value"], row["ratio"]) for row in rows] == [
        ("LoRABatch.from_adapter_ids", 3.0, 1.0, 3.0), ("lora_linear forward, no grad", 4.0, 1.0, 4.0),
        ("lora_linear fwd+bwd (dX, dA, dB)", 5.0, 2.0, 2.5), ("lora_linear fwd+bwd (dX, dA, dB)", 5.0, 8.0, 0.625),
        ("multi_lora_linear forward, no grad", 6.0, 1.0, 6.0)]


@pytest.mark.skipif(not HAS_EXTENSION, reason="needs the C++ extension")
def test_cuda_decode_row_times_the_kernel_at_m_and_the_gemm_path_one_row_past(monkeypatch):
    """The decode kernel's row: "kernel" runs the op at M, "gemm" at CUDA_DECODE_MAX_M + 1, where the op leaves the
    decode kernel for its GEMMs (at the bound itself both columns had timed the decode kernel)."""
    seen = {}

    def measure(candidates, graph=False, **timing):
        seen.update({name: {fn.__defaults__[0]["x"].shape[0] for fn in fns} for name, fns in candidates.items()})
        return dict.fromkeys(candidates, 1.0)
    monkeypatch.setattr(bench, "measure", measure)
    inputs = bench.InputSets(torch.device("cpu"), torch.float32, 4, 8, 12, 3, count=2)
    bench.cuda_decode_row([], inputs, 4, {"device": torch.device("cpu"), "reps": 1, "warmup": 0}, False, False,
                          backend="cpu")
    assert seen == {"kernel": {4}, "gemm": {bench.CUDA_DECODE_MAX_M + 1}}


def test_the_dy_once_kernel_is_also_timed_at_its_bound(monkeypatch):
    """With the cuda backend the rank sweep times the dY-once kernel at the training M and again at its bound,
    M·r = CUDA_BWD_DY_KERNEL_MAX_WORK (where functional.py still picks it). Stand-ins for the timing; no GPU here."""
    shapes = []
    monkeypatch.setattr(bench, "measure", lambda candidates, graph=False, **timing: dict.fromkeys(candidates, 1.0))
    monkeypatch.setattr(bench, "cuda_bwd_dy_row", lambda rows, inputs, shape, timing, on_gpu: shapes.append(
        (shape, inputs.sets[0]["dy"].shape[0])))
    cfg = types.SimpleNamespace(hidden=8, rank=16, ranks=(16,), train_m=8, backends=("cuda",))
    bench.rank_sweep_rows([], cfg, torch.device("cpu"), torch.float32, {}, False, lambda label: None)
    bound = bench.CUDA_BWD_DY_KERNEL_MAX_WORK // 16
    assert shapes == [("M=8 K=8 N=8 r=16", 8), (f"M={bound} K=8 N=8 r=16", bound)]


def test_gpu_forward_rows_replay_graphs_up_to_their_bound(monkeypatch):
    """On GPUs the forward rows up to GRAPH_MAX_TOKENS tokens time CUDA-graph replays and then eager calls, those past
    it eager calls alone; the cuda decode kernel's row comes up to CUDA_DECODE_MAX_M. Stand-ins for the timing."""
    graphs, decode = [], []
    monkeypatch.setattr(bench, "measure", lambda candidates, graph=False, **timing: graphs.append(graph)
                        or dict.fromkeys(candidates, 1.0))
    monkeypatch.setattr(bench, "cuda_decode_row", lambda rows, inputs, m, timing, graph, on_gpu: decode.append(m))
    cfg = _tiny(ms=(16, 17, 256, 257)).resolved()
    cfg.backends = ("cuda",)  # refused by resolved() here; the rows' selection is what is checked
    rows = []
    bench.forward_rows(rows, cfg, torch.device("cpu"), torch.float32, {"device": torch.device("cpu"), "reps": 1,
                                                                       "warmup": 0}, True, lambda label: None)
    assert graphs == [True, False, True, False, True, False, False] and decode == [16]
    assert [row["kind"] for row in rows] == ["fwd_decode", "fwd_eager", None, "fwd_eager", "fwd_prefill", "fwd_eager",
                                             "fwd_prefill"]


def test_the_loop_and_peft_baselines_compute_what_ours_compute():
    """The per-adapter loop row compares the same work: GroupedSets.loop (PEFT's mixed batch: every adapter's tokens
    gathered, its scaled LoRA output added to the base output) gives multi_lora_linear's output; PEFT's layer gives
    lora_linear's without dropout and drops inputs with it (else the "unfused" row times a layer without dropout)."""
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    sets = bench.GroupedSets(cpu, torch.float32, 12, 8, 6, 2, 5)  # 5 adapters of rank 2
    ids = torch.arange(12) % 5
    batch = LoRABatch.from_adapter_ids(ids, 5)
    for loop, grouped in zip(sets.loop(ids), sets.grouped(batch, "torch")):
        torch.testing.assert_close(loop(), grouped())
    x, w, a, b = torch.randn(16, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    plain = bench.peft_lora_forward(x, w, a, b, 2.0, 0.0)
    torch.testing.assert_close(plain, lora_linear(x, w, a, b, 2.0, backend="torch"))
    assert not torch.allclose(bench.peft_lora_forward(x, w, a, b, 2.0, 0.5), plain)


def test_the_seed_fixes_the_inputs(monkeypatch):
    """--seed: two runs with the same seed time the same inputs, whatever the random state before them."""
    drawn = []

    def measure(candidates, graph=False, **timing):
        drawn.append(candidates["base"][0].__defaults__[0]["x"].clone())
        return dict.fromkeys(candidates, 1.0)
    monkeypatch.setattr(bench, "measure", measure)
    for seed in (3, 3, 4):
        torch.manual_seed(100 + len(drawn))
        bench.run_bench(_tiny(sections=("forward",), ms=(2,), seed=seed))
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])


STAND_IN_MS = {"base": 2.0, "ours": 3.0, "gemms": 5.0, "peft": 7.0, "full": 11.0, "one": 13.0, "distinct": 17.0,
               "loop": 19.0, "grouped": 23.0, "per_slice": 29.0, "listed": 31.0, "padded": 37.0, "mixed": 41.0,
               "copy": 0.25}


def _stand_in_run(monkeypatch, **overrides):
    """run_bench over every section with measure replaced: each candidate's first callable runs once, with the calls
    of lora_linear, multi_lora_linear, peft_lora_forward and per_adapter_loop it makes recorded, and
    STAND_IN_MS[name] is its time. Returns (resolved config, result, [{candidate: [(function, args, kwargs)]}]
    per measure call, the number of progress steps)."""
    calls, current = [], {"events": []}
    for name in ("lora_linear", "multi_lora_linear", "peft_lora_forward", "per_adapter_loop"):
        def spy(*args, _name=name, _real=getattr(bench, name), **kwargs):
            current["events"].append((_name, args, kwargs))
            return _real(*args, **kwargs)
        monkeypatch.setattr(bench, name, spy)

    def measure(candidates, device, reps, warmup, graph=False):
        called = {}
        for name, fns in candidates.items():
            current["events"] = called.setdefault(name, [])
            fns[0]()
        current["events"] = []
        calls.append(called)
        return {name: STAND_IN_MS[name] for name in candidates}
    monkeypatch.setattr(bench, "measure", measure)
    settings = {"sections": ("all",), "backends": ("torch", "cpu") if HAS_EXTENSION else ("torch",), "ms": (2,),
                "train_m": 32, "prefill_tokens": 80, "sweep_tokens": (4, 64, 256, 257), "sweep_adapters": (2, 64)}
    settings.update(overrides)
    steps = []
    result = bench.run_bench(_tiny(**settings), on_update=steps.append)
    return _tiny(**settings).resolved(), result, calls, len(steps)


def test_every_row_reports_the_times_of_the_candidates_it_names(monkeypatch):
    """Each timed row's ours and baseline columns hold the times of the candidates its labels name (a ratio and its
    two values inverted together, or another candidate's time, had passed the ratio = ours / baseline check), the
    bandwidth rows GB/s of all bytes moved over the time against the copy's read + write; the grouped op / loop rows
    come at the decode and the prefill size, the sweep's at 64 adapters carry that row's target, and its bandwidth
    rows come up to GRAPH_MAX_TOKENS tokens."""
    cfg, result, _, _ = _stand_in_run(monkeypatch)
    t, k, r = STAND_IN_MS, cfg.hidden, cfg.rank
    copy_gbs = 2 * (cfg.copy_mb << 20) / t["copy"] / 1e6
    assert result["copy_bandwidth_gbs"] == pytest.approx(copy_gbs)
    named = {None: ("ours", "base"), "fwd_decode": ("ours", "base"), "fwd_bwd_vs_gemms": ("ours", "gemms"),
             "unfused_vs_ours": ("ours", "peft"), "lora_vs_full": ("ours", "full"),
             "grouped_distinct": ("distinct", "one"), "grouped_train": ("distinct", "one"),
             "sliced_launches": ("listed", "per_slice"), "sweep_vs_one": ("ours", "one"),
             "sweep_vs_loop": ("ours", "loop"), "mixed_vs_padded": ("mixed", "padded")}
    rows = [row for row in result["rows"] if row["unit"] != "bytes" and row["kind"] != "host_overhead"]
    assert not [row for row in rows if row["kind"] == "error"]
    for row in rows:
        if row["unit"] == "GB/s":
            tokens, adapters = bench.DECODE_TOKENS, bench.LOOP_ADAPTERS
            if row["kind"] == "sweep_bandwidth":
                tokens, adapters = map(int, re.match(r"(\d+) tokens, (\d+) adapter", row["shape"]).groups())
            gbs = bench._moved_bytes(tokens, k, k, r, adapters, torch.float32) / t["ours"] / 1e6
            assert (row["ours_value"], row["baseline_value"]) == pytest.approx((gbs, copy_gbs)), row
            continue
        ours, baseline = named.get(row["kind"]) or ("grouped" if row["section"].startswith("grouped op") else "ours",
                                                    "loop")
        assert (row["ours_value"], row["baseline_value"]) == (t[ours], t[baseline]), row
    loop_rows = [row["shape"].split(" tokens")[0] for row in rows if row["section"].startswith("grouped op")]
    assert loop_rows == ["64"] * len(cfg.backends) + ["80"] * len(cfg.backends)  # decode, then prefill size
    sweep_loop = {row["shape"].split(", K")[0]: row["kind"] for row in rows if "per-adapter loop" in row["section"]
                  and row["section"].startswith("grouped sweep")}
    assert sweep_loop["64 tokens, 64 adapters"] == sweep_loop["256 tokens, 64 adapters"] == "grouped_vs_loop"
    assert sweep_loop["64 tokens, 2 adapters"] == "sweep_vs_loop"
    assert {int(row["shape"].split()[0]) for row in rows if row["kind"] == "sweep_bandwidth"} == {4, 64, 256}
    # the fused QKV slices as grouped-query attention has them: N, N/4, N/4
    assert {row["shape"] for row in rows if row["kind"] == "sliced_launches"} == {
        f"{bench.DECODE_TOKENS} tokens on {bench.LOOP_ADAPTERS} adapters K={k} N={k}+{k // 4}+{k // 4} r={r}"}


def test_each_rows_candidates_do_the_work_its_labels_name(monkeypatch):
    """Behind the labels: PEFT's layer and ours both with dropout in the "unfused" row, ours without it against full
    fine-tuning; "one adapter" baselines with every token on slot 0 against distinct adapters (interleaved token by
    token up to GRAPH_MAX_TOKENS tokens, contiguous segments past it); mixed ranks against every slot at
    max(MIXED_RANKS); the per-adapter loop visiting every token once."""
    _, _, calls, _ = _stand_in_run(monkeypatch)

    def ids(events):
        (batch,) = {id(args[4]): args[4] for name, args, _ in events if name == "multi_lora_linear"}.values()
        return batch.adapter_ids.long(), batch.num_adapters

    def contiguous(ids_, adapters):
        return torch.equal(ids_, ids_.sort().values) and ids_.unique().numel() == adapters
    checked = dict.fromkeys(("dropout", "full", "one", "sweep", "mixed", "loop"), 0)
    for called in calls:
        names = set(called)
        if names == {"peft", "ours"}:
            assert [args[5] for name, args, _ in called["peft"] if name == "peft_lora_forward"] == [bench.DROPOUT]
            assert [kw.get("dropout_p", 0.0) for name, _, kw in called["ours"] if name == "lora_linear"] == [
                bench.DROPOUT]
            checked["dropout"] += 1
        if names == {"full", "ours"}:
            assert [kw.get("dropout_p", 0.0) for name, _, kw in called["ours"] if name == "lora_linear"] == [0.0]
            checked["full"] += 1
        if names == {"one", "distinct"}:
            (one, slots), (distinct, _) = ids(called["one"]), ids(called["distinct"])
            assert slots == bench.PREFILL_ADAPTERS and not one.any() and contiguous(distinct, slots)
            checked["one"] += 1
        if "loop" in names and "ours" in names:
            ours, adapters = ids(called["ours"])
            tokens = ours.numel()
            if tokens <= bench.GRAPH_MAX_TOKENS:
                assert torch.equal(ours, torch.arange(tokens) % adapters), (tokens, adapters)
            else:
                assert contiguous(ours, adapters), (tokens, adapters)
            if adapters > 1:
                assert not ids(called["one"])[0].any()
            checked["sweep"] += 1
        if names == {"padded", "mixed"}:
            (_, padded_args, padded_kw), = [e for e in called["padded"] if e[0] == "multi_lora_linear"]
            (_, _, mixed_kw), = [e for e in called["mixed"] if e[0] == "multi_lora_linear"]
            slots = padded_args[2].shape[0]
            assert padded_kw["ranks"] is None and padded_args[2].shape[1] == max(bench.MIXED_RANKS)
            assert mixed_kw["ranks"].tolist() == [bench.MIXED_RANKS[i % len(bench.MIXED_RANKS)] for i in range(slots)]
            checked["mixed"] += 1
        for name, args, _ in called.get("loop", []):
            if name == "per_adapter_loop":
                visited = torch.cat(args[5]).sort().values
                assert torch.equal(visited, torch.arange(args[0].shape[0])), len(args[5])
                checked["loop"] += 1
    assert all(checked.values()), checked


def test_a_run_counts_its_progress_steps_and_says_how_it_timed(monkeypatch):
    """The progress bar's total is the number of steps the run takes (a wrong count stopped the bar short of 100% or
    pinned it there early); the copy behind the bandwidth rows is --copy-mb MiB of float32; the timing line says how
    many calls measure makes (ROUNDS x ceil(reps / ROUNDS), not --reps) and the CPU's assumed cache."""
    numels = []
    copy_bandwidth = bench.copy_bandwidth
    monkeypatch.setattr(bench, "copy_bandwidth", lambda numel, timing: numels.append(numel) or copy_bandwidth(
        numel, timing))
    cfg, result, _, steps = _stand_in_run(monkeypatch, reps=3, copy_mb=2)
    assert steps == bench._count_units(cfg)
    for sections in (("train",), ("grouped",), ("sweep",), ("decode",)):
        cfg, _, _, steps = _stand_in_run(monkeypatch, sections=sections, backends=("torch",))
        assert steps == bench._count_units(cfg), sections
    assert numels[0] == (2 << 20) // 4
    assert "; 4 calls after 1 warm-up, in 2 alternating rounds" in result["timing"]
    assert f"assumed {bench.CPU_CACHE_BYTES >> 20} MB cache" in result["timing"] and "32 MB" in result["timing"]
    assert result["graph_max_tokens"] is None  # no graph replays on CPU


def test_values_print_in_their_units():
    """ms under 1 print as µs, bytes as MB (10^6, as the rows' labels), other units as they are."""
    assert bench._fmt_value(0.5, "ms") == "500.0 µs" and bench._fmt_value(1.0, "ms") == "1.00 ms"
    assert bench._fmt_value(2_500_000, "bytes") == "2.50 MB" and bench._fmt_value(12.34, "GB/s") == "12.3 GB/s"
    assert bench._fmt_value(None, "ms") == "n/a"


def test_the_table_shows_the_notes_that_qualify_a_section_and_aligns_its_columns():
    """A section's line carries the note that changes how its numbers read (host rows: wall time per call; graph
    rows: kernels only), not the others; backend and shape are left-aligned, numbers right-aligned; the copy line
    says it counts read + write; the CPU note on targets shows on CPU alone; each Triton autotune choice is listed."""
    rows = []
    bench._row(rows, "host s", "host_overhead", "torch", "M=1", "o", "b", 2.0, 0.002, 0.001, "ms", False, note="wall")
    bench._row(rows, "graph s", "grouped_vs_loop", "torch", "64 tokens", "o", "b", 0.5, 1.5, 3.0, "ms", False,
               note=bench._graph_note(True))
    bench._row(rows, "plain s", "lora_vs_full", "torch", "M=1", "o", "b", 0.5, 1.5, 3.0, "ms", False, note="hidden")
    env = {"device": "cpu", "cpu": "x", "cpu_threads": 1, "gpu": None, "torch": "t", "triton": None, "date": "d"}
    result = {"config": {"dtype": "float32", "hidden": 8, "rank": 2, "backends": ["torch"]}, "environment": env,
              "timing": "t", "copy_bandwidth_gbs": 12.5, "rows": rows, "wall_s": 1.0,
              "triton_configs": {"fwd": {"(16, 32)": "BLOCK_M: 64"}}}
    lines = bench.format_bench(result).splitlines()
    assert "host s  [ours: o; baseline: b; wall]" in lines
    assert f"graph s  [ours: o; baseline: b; {bench._graph_note(True)}]" in lines
    assert "plain s  [ours: o; baseline: b]" in lines
    assert "  torch    M=1        2.000   2.0 µs    1.0 µs" in lines
    assert "measured copy bandwidth: 12.5 GB/s (read + write)" in lines
    assert "triton autotune: fwd (16, 32) -> BLOCK_M: 64" in lines
    assert any(line.startswith("targets are GPU targets") for line in lines)
    result["environment"] = {**env, "device": "cuda", "gpu": "G"}
    assert not any(line.startswith("targets are GPU targets") for line in bench.format_bench(result).splitlines())


def test_triton_configs_name_each_kernel_as_the_table_does(monkeypatch):
    """triton_configs reads each Triton kernel's autotune cache, named without its leading underscore; kernels not
    run yet (an empty cache) are left out."""
    fake = types.SimpleNamespace(_fwd=types.SimpleNamespace(cache={(16, 32): "BLOCK_M: 64"}),
                                 _shrink=types.SimpleNamespace(cache={}))
    monkeypatch.setitem(sys.modules, "lora_kernels.triton.lora_linear", fake)
    assert bench.triton_configs() == {"fwd": {"(16, 32)": "BLOCK_M: 64"}}


def test_activation_memory_row_holds_each_layers_saved_bytes_with_dropout(monkeypatch):
    """The activation memory row: ours is what lora_linear with dropout saves, PEFT's what its layer with dropout
    saves (drop(x), the mask and S: more than x and S, which its layer without dropout would keep), both with the
    weights left out, in their own columns (inverted together, they had passed the ratio check)."""
    monkeypatch.setattr(bench, "measure", lambda candidates, graph=False, **timing: dict.fromkeys(candidates, 1.0))
    rows = bench.run_bench(_tiny(sections=("train",), train_m=64))["rows"]
    (row,) = [r for r in rows if r["kind"] == "memory_vs_unfused"]
    x, w = torch.randn(64, 32, requires_grad=True), torch.randn(32, 32)
    a, b = torch.randn(16, 32, requires_grad=True), torch.randn(32, 16, requires_grad=True)
    ours = bench.saved_bytes(lambda: lora_linear(x, w, a, b, 2.0, dropout_p=bench.DROPOUT, backend="torch"),
                             exclude=(w, a, b))
    peft = bench.saved_bytes(lambda: bench.peft_lora_forward(x, w, a, b, 2.0, bench.DROPOUT), exclude=(w, a, b))
    assert (row["ours_value"], row["baseline_value"]) == (ours, peft), row
    assert peft > x.nbytes + 64 * 16 * 4, peft  # x and S (64 x r = 16, float32)


@pytest.mark.skipif(not HAS_EXTENSION, reason="needs the C++ extension")
def test_the_dy_once_candidates_compute_the_same_and_rotate_by_what_they_touch(monkeypatch):
    """The dY-once row's two candidates give the same dB and dS (the GEMMs with the scaling the kernel applies: without
    it the baseline does less work), and their sets are counted by the bytes they touch: dY, S and B read, dB and dS
    written in float32."""
    counted = []
    monkeypatch.setattr(bench, "num_sets", lambda device, set_bytes: counted.append(set_bytes) or 2)
    inputs = bench.InputSets(torch.device("cpu"), torch.float32, 16, 8, 12, 4, grad=True, count=2)
    candidates = bench.bwd_dy_candidates(inputs)
    for gemms, kernel in zip(candidates["gemms"], candidates["kernel"]):
        for got, want in zip(kernel(), gemms()):
            torch.testing.assert_close(got, want)
    st = inputs.sets[0]
    dy, b, s_numel = st["dy"], st["b"], 16 * 4  # S: M x r in float32
    assert counted[-1] == dy.nbytes + b.nbytes + 2 * 4 * s_numel + 4 * b.numel()
