"""Table printer for benchmark results: the ratio table of a pytest-benchmark JSON (each group's entries against the
group's baseline), and the short summary of `lora-kernels bench --save` / `lora-kernels compare --save` files that
scripts/gpu_check.sh prints last.

    python benchmarks/table.py results.json           # pytest-benchmark JSON: ratios against each group's baseline
    python benchmarks/table.py --summary OUTDIR       # bench/grouped/sweep/crossovers/compare.json of a gpu_check run
"""

import argparse
import json
import os
import sys

# bench rows shown in the summary: per kind and backend, the worst ratio over the rows of that kind (rows at ranks
# other than design.md §8's r = 16 have a kind of their own, without a target, and are not summarised).
SUMMARY_KINDS = ("fwd_decode", "fwd_prefill", "fwd_bwd_vs_gemms", "unfused_vs_ours", "lora_vs_full",
                 "memory_vs_unfused", "peak_memory_vs_unfused", "grouped_distinct", "grouped_train", "grouped_vs_loop",
                 "sliced_launches", "decode_bandwidth", "triton_split", "triton_tma", "triton_tma_forward",
                 "cuda_bwd_dy", "cuda_decode")
# the bench JSON files of a gpu_check run (train, forward and grouped sections run as separate stages), and the rows
# of `lora-kernels bench --sections sweep` (sweep.json)
BENCH_FILES = ("train.json", "bench.json", "grouped.json")
SWEEP_KINDS = ("sweep_vs_one", "grouped_vs_loop", "sweep_bandwidth", "mixed_vs_padded")
HIGHER_IS_BETTER = ("unfused_vs_ours", "decode_bandwidth", "sweep_bandwidth")


def _load(path):
    with open(path) as f:
        return json.load(f)


def _print_table(headers, rows, out):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    out.write("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip() + "\n")
    for row in rows:
        out.write("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")


# ---------------------------------------------------------------------------------------- pytest-benchmark JSON

def pytest_benchmark_ratios(data):
    """[(group, name, median_s, baseline name, ratio, inverted, full-FT ratio)] for a pytest-benchmark JSON.

    Each benchmark's extra_info names its role: "baseline" (the group's ratios are median / the baseline's median),
    "full_ft" (full fine-tuning: a second ratio, median / its median, design.md §8's LoRA / full FT row) or
    "candidate". extra_info["inverted"] turns a candidate's ratio into baseline / median: §8 states the dropout row
    as PEFT's layer / ours. A group without a baseline gets no ratios."""
    groups = {}
    for bench in data.get("benchmarks", []):
        groups.setdefault(bench.get("group") or "", []).append(bench)
    rows = []
    for group, benches in groups.items():
        def role(name):
            return next((b for b in benches if b.get("extra_info", {}).get("role") == name), None)

        baseline, full_ft = role("baseline"), role("full_ft")
        for bench in benches:
            median = bench["stats"]["median"]
            inverted = bool(bench.get("extra_info", {}).get("inverted"))
            ratio = None
            if baseline is not None:
                ratio = baseline["stats"]["median"] / median if inverted else median / baseline["stats"]["median"]
            vs_full = (None if full_ft is None or bench in (full_ft, baseline)
                       else median / full_ft["stats"]["median"])
            rows.append((group, bench["name"], median, None if baseline is None else baseline["name"], ratio,
                         inverted, vs_full))
    return rows


def print_pytest_benchmark(path, out=sys.stdout):
    data = _load(path)
    machine = data.get("machine_info", {})
    extra = machine.get("lora_kernels", {})
    device_name = extra.get("device_name") or machine.get("cpu", {}).get("brand_raw", "?")
    out.write(f"{path}: {data.get('datetime', '?')}, {device_name}, "
              f"torch {extra.get('torch', '?')}, triton {extra.get('triton', '?')}\n")
    out.write("(pytest-benchmark: wall time per call, each call synchronised, launch overhead included; "
              "`lora-kernels bench` times the same rows with CUDA events)\n")
    rows = [(group, name, _fmt_seconds(median), baseline or "-", "-" if ratio is None else f"{ratio:.3f}",
             "-" if ratio is None else ("baseline / this" if inverted else "this / baseline"),
             "-" if vs_full is None else f"{vs_full:.3f}")
            for group, name, median, baseline, ratio, inverted, vs_full in pytest_benchmark_ratios(data)]
    _print_table(["group", "benchmark", "median", "baseline", "ratio", "ratio is", "/ full FT"], rows, out)


def _fmt_seconds(seconds):
    return f"{seconds * 1e6:.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.3f} ms"


# ---------------------------------------------------------------------------------------- gpu_check summary

def summary_bench_rows(bench, kinds=SUMMARY_KINDS):
    """One row per (kind, backend): the worst ratio of that kind (against its target where it has one), with its
    shape."""
    grouped = {}
    for row in bench["rows"]:
        if row["kind"] in kinds:
            grouped.setdefault((row["kind"], row["backend"]), []).append(row)
    table = []
    for (kind, backend) in sorted(grouped, key=lambda key: (kinds.index(key[0]), key[1])):
        rows = grouped[(kind, backend)]
        measured = [r for r in rows if r["ratio"] is not None]
        if not measured:
            row = rows[0]
        elif kind in HIGHER_IS_BETTER:
            row = min(measured, key=lambda r: r["ratio"])
        else:
            row = max(measured, key=lambda r: r["ratio"])
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.3f}"
        mark = {True: "ok", False: "MISS", None: ""}[row["meets_target"]]
        table.append((kind, backend, row["shape"], ratio, row["target"] or "", mark))
    return table


def _thirds(step_ms):
    """'first -> last': compare's medians of the first and last third of a run's timed steps. Imported here, not at
    the top: the pytest-benchmark table needs no lora_kernels on the path."""
    from lora_kernels.compare import step_time_thirds
    thirds = step_time_thirds(step_ms)
    return "n/a" if thirds is None else f"{thirds[0]:.1f} -> {thirds[1]:.1f}"


def summary_compare_rows(compare):
    methods = compare["methods"]
    full, torch_lora, fused = methods["full"], methods["lora_torch"], methods["lora_fused"]
    inference = compare.get("inference") or {}

    def ratio(a, b):
        return "n/a" if a is None or not b else f"{a / b:.3f}"

    rows = [
        ("trainable params %", f"{full['trainable_percent']:.2f}", f"{torch_lora['trainable_percent']:.3f}",
         f"{fused['trainable_percent']:.3f}"),
        ("optimizer state / full FT", "1", ratio(torch_lora["optimizer_state_bytes"], full["optimizer_state_bytes"]),
         ratio(fused["optimizer_state_bytes"], full["optimizer_state_bytes"])),
        ("peak memory per step / full FT", "1", ratio(torch_lora["peak_step_bytes"], full["peak_step_bytes"]),
         ratio(fused["peak_step_bytes"], full["peak_step_bytes"])),
        ("step time / full FT", "1", ratio(torch_lora["step_ms_median"], full["step_ms_median"]),
         ratio(fused["step_ms_median"], full["step_ms_median"])),
        # a drift from the first third of the timed steps to the last says the machine changed under the run
        # (compare's own table notes it); the H200 run of 2026-11-29 had its fused column rise from 37.7 to 61.5 ms
        ("step ms, first -> last third", *(_thirds(run.get("step_ms_all") or []) for run in (full, torch_lora, fused))),
        ("tokens / s", f"{full['tokens_per_s']:,.0f}", f"{torch_lora['tokens_per_s']:,.0f}",
         f"{fused['tokens_per_s']:,.0f}"),
        ("checkpoint / full FT", "1", ratio(torch_lora["checkpoint_bytes"], full["checkpoint_bytes"]),
         ratio(fused["checkpoint_bytes"], full["checkpoint_bytes"])),
        # null in the JSON: a loss that was not finite (a diverged run; compare writes standard JSON)
        ("eval loss after training", *("not finite" if run["eval_loss"] is None else f"{run['eval_loss']:.3f}"
                                       for run in (full, torch_lora, fused))),
    ]
    if inference:
        rows.append(("inference latency / merged", "1 (merged)",
                     ratio(inference["unmerged_unfused_ms"], inference["merged_ms"]),
                     ratio(inference["unmerged_fused_ms"], inference["merged_ms"])))
    return rows


def summary_crossover_lines(crossovers):
    """benchmarks/cuda_crossovers.py's rows as ratio lines (below 1: the hand-written kernel wins): the decode
    forward against its GEMM path per M, and the dY-once backward against two GEMMs, one line per dtype and rank."""
    rows = crossovers["rows"]
    decode = [row for row in rows if row["section"] == "decode forward"]
    lines = []
    if decode:
        lines.append("decode forward / its GEMM path: " + "  ".join(
            f"{row['shape'].split()[0]} {row['kernel_vs_gemm_path']:.2f}" for row in decode))
    backward = {}
    for row in rows:
        if row["section"].startswith("dY-once backward"):
            key = (row["section"].split(", ")[-1], row["r"])
            backward.setdefault(key, []).append(row)
    for (dtype, rank), group in backward.items():
        lines.append(f"dY-once / 2 GEMMs, {dtype} r={rank}: " + "  ".join(
            f"M={row['m']} {row['kernel_vs_gemms']:.2f}" for row in group))
    return lines


def print_summary(outdir, out=sys.stdout):
    """The key numbers of a gpu_check run (bench: the worst case of each ratio); missing files are reported."""
    compare_path = os.path.join(outdir, "compare.json")
    # gpu_check runs the bench in parts (train, host/grouped/decode, forward), each with its own time limit
    parts = [_load(path) for path in (os.path.join(outdir, name) for name in BENCH_FILES) if os.path.exists(path)]
    bench_path = os.path.join(outdir, " + ".join(BENCH_FILES))
    missing = [name for name in BENCH_FILES if not os.path.exists(os.path.join(outdir, name))]
    if parts and missing:  # a part that did not run or failed before saving: its rows are absent, not passed
        out.write(f"bench: no {', '.join(missing)} in {outdir} (that part did not run, or failed before saving)\n")
    if parts:
        bench = {**parts[0], "rows": [row for part in parts for row in part["rows"]],
                 "partial": any(part.get("partial") for part in parts),
                 "copy_bandwidth_gbs": next((part["copy_bandwidth_gbs"] for part in parts
                                             if part.get("copy_bandwidth_gbs")), None)}
        env = bench["environment"]
        copy = bench.get("copy_bandwidth_gbs")
        out.write(f"bench ({env['gpu'] or env['cpu']}, {bench['config']['dtype']}, K=N={bench['config']['hidden']}, "
                  f"r={bench['config']['rank']}; copy {'not measured' if copy is None else f'{copy:.0f} GB/s'}"
                  f"{'; PARTIAL: the sweep did not finish' if bench.get('partial') else ''}):\n")
        _print_table(["what (worst case)", "backend", "shape", "ratio", "target", ""], summary_bench_rows(bench), out)
        for row in bench["rows"]:
            if row["kind"] == "error":
                out.write(f"ERROR {row['backend']} in '{row['section']}' ({row['shape']}): {row['note']}\n")
    else:
        out.write(f"bench: no {bench_path}\n")
    sweep_path = os.path.join(outdir, "sweep.json")
    if os.path.exists(sweep_path):
        sweep = _load(sweep_path)
        out.write(f"\ngrouped sweep ({len(sweep['rows'])} rows{'; PARTIAL' if sweep.get('partial') else ''}; "
                  "worst case of each kind):\n")
        _print_table(["what (worst case)", "backend", "shape", "ratio", "target", ""],
                     summary_bench_rows(sweep, SWEEP_KINDS), out)
        for row in sweep["rows"]:
            if row["kind"] == "error":
                out.write(f"ERROR {row['backend']} in '{row['section']}' ({row['shape']}): {row['note']}\n")
    crossovers_path = os.path.join(outdir, "crossovers.json")
    if os.path.exists(crossovers_path):
        crossovers = _load(crossovers_path)
        out.write(f"\ncuda crossovers ({crossovers['device']}; ratio below 1: the hand-written kernel wins):\n")
        out.writelines(f"  {line}\n" for line in summary_crossover_lines(crossovers))
    if os.path.exists(compare_path):
        _print_compare(_load(compare_path), out)
    else:
        out.write(f"compare: no {compare_path}\n")
    # gpu_check's last stage, `compare --compile`, when the budget left time for it
    compiled_path = os.path.join(outdir, "compare_compiled.json")
    if os.path.exists(compiled_path):
        _print_compare(_load(compiled_path), out)


def _print_compare(compare, out):
    cfg = compare["config"]
    out.write(f"\ncompare ({compare['model']['name']}, {cfg['dtype']}, r={cfg['rank']}, "
              f"{compare['task']['tokens_per_step']} tokens/step, {cfg['steps']} steps"
              f"{', every decoder layer compiled' if cfg.get('compile') else ''}):\n")
    _print_table(["", "full FT", "LoRA torch", f"LoRA {compare['backends']['fused']}"],
                 summary_compare_rows(compare), out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a pytest-benchmark JSON file, or with --summary a gpu_check OUTDIR")
    parser.add_argument("--summary", action="store_true", help="summarise bench.json and compare.json in PATH")
    args = parser.parse_args(argv)
    if args.summary:
        print_summary(args.path)
    else:
        print_pytest_benchmark(args.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
