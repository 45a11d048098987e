"""Pieces of `lora-kernels bench` that the CLI tests do not reach on CPU: the section selection, the grouped sweep,
the host-overhead timer, the CUDA dY-once comparison row (its C++ op also has a CPU kernel) and, on a GPU, timing
as CUDA-graph replays. Structure and arithmetic only: no timing is asserted."""

import importlib.util
import json
import os
import re
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
    assert [row["backend"] for row in rows][0] == "-"  # LoRABatch first, then 3 rows per backend
    assert len(rows) == 1 + 3 * len(cfg.backends)
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
