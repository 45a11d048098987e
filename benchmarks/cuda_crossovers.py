"""Where the `cuda` backend's hand-written kernels beat cuBLAS: the measurements behind its dispatch bounds.

- decode forward: `lora_linear` at M = 1..16 (the decode kernels) against the same op on its GEMM path (a
  column-major W takes that path at any M) and against F.linear alone, CUDA-graph replays (the kernels alone);
- dY-once backward: `lora_kernels::lora_bwd_dy` against the two cuBLAS GEMMs it replaces (dYᵀ·S, dY·B), over
  M x r, CUDA-graph replays; functional.CUDA_BWD_DY_KERNEL_MAX_WORK bounds where the backward calls it. In bf16 (the
  tensor-core kernel up to r = 32), and in fp32 (the CUDA-core kernel) at the sizes below that bound.

    python benchmarks/cuda_crossovers.py [--save FILE]          # GPU shapes (bf16, K = N = 4096)
    python benchmarks/cuda_crossovers.py --device cpu --quick   # tiny shapes on the cpu backend (the plumbing)
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from lora_kernels import bench
from lora_kernels.cli import _non_negative_int, _positive_int
from lora_kernels.functional import lora_linear

SHAPES = {  # hidden, decode rank, decode M, backward M, backward ranks, fp32 backward M
    "gpu": (4096, 16, (1, 2, 4, 6, 8, 12, 16), (64, 256, 1024, 2048, 4096, 8192), (8, 16, 32, 64), (64, 256)),
    "quick": (64, 8, (1, 4, 16), (16, 64), (8, 16), (16,)),
}


def decode_rows(device, dtype, hidden, r, ms, timing, backend):
    rows = []
    for m in ms:
        inputs = bench.InputSets(device, dtype, m, hidden, hidden, r)
        # the same W column-major: the op's decode test (weight.stride(1) == 1) fails, so it runs its GEMM path
        column_major = [(s["x"], s["w"].t().contiguous().t(), s["a"], s["b"]) for s in inputs.sets]
        candidates = {
            "kernel": inputs.fns(lambda x, w, a, b: lora_linear(x, w, a, b, 2.0, backend=backend)),
            "gemm_path": [lambda args=args: lora_linear(*args, 2.0, backend=backend) for args in column_major],
            "base": inputs.fns(lambda x, w, a, b: F.linear(x, w)),
        }
        with torch.no_grad():
            t = bench.measure(candidates, graph=True, **timing)
        rows.append({"section": "decode forward", "shape": f"M={m} K={hidden} N={hidden} r={r}",
                     "kernel_ms": t["kernel"], "gemm_path_ms": t["gemm_path"], "base_ms": t["base"],
                     "kernel_vs_gemm_path": t["kernel"] / t["gemm_path"], "kernel_vs_base": t["kernel"] / t["base"]})
        del inputs, column_major
    return rows


def bwd_dy_rows(device, dtype, hidden, ms, ranks, timing):
    rows = []
    for r in ranks:
        for m in ms:
            inputs = bench.InputSets(device, dtype, m, hidden, hidden, r, grad=True)
            with torch.no_grad():
                t = bench.measure(bench.bwd_dy_candidates(inputs), graph=True, **timing)
            rows.append({"section": f"dY-once backward, {str(dtype).removeprefix('torch.')}",
                         "shape": f"M={m} K={hidden} N={hidden} r={r}", "m": m,
                         "r": r, "kernel_ms": t["kernel"], "gemms_ms": t["gemms"],
                         "kernel_vs_gemms": t["kernel"] / t["gemms"]})
            del inputs
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes")
    parser.add_argument("--reps", type=_positive_int, default=30, help="timed calls per candidate, at least")
    parser.add_argument("--warmup", type=_non_negative_int, default=10)
    parser.add_argument("--save", help="write the rows as JSON to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    backend = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    hidden, r, decode_ms, bwd_ms, bwd_ranks, fp32_bwd_ms = SHAPES["quick" if args.quick or not on_gpu else "gpu"]
    if on_gpu:
        torch.cuda.set_device(device)
    timing = {"device": device, "reps": args.reps, "warmup": args.warmup}
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(f"cuda_crossovers: {name}, {dtype}, backend {backend}, torch {torch.__version__}; "
          f"{'CUDA-graph replays' if on_gpu else 'eager calls'}, "
          f"median of {bench.timed_calls(args.reps)} after {args.warmup} warm-up")
    rows, failed = [], 0

    def save():  # after every section: an error or a time limit later must not cost what was measured
        if args.save:
            with open(args.save + ".tmp", "w") as f:
                json.dump({"device": name, "dtype": str(dtype), "torch": torch.__version__, "rows": rows}, f,
                          indent=1)
            os.replace(args.save + ".tmp", args.save)

    def section(title, measure):
        nonlocal failed
        try:
            new_rows = measure()
        except Exception as exc:  # noqa: BLE001  (one failing section must not hide the others)
            failed += 1
            print(f"\n{title}\nERROR: {type(exc).__name__}: {exc}")
            return []
        rows.extend(new_rows)
        save()
        return new_rows

    decode = section("decode forward", lambda: decode_rows(device, dtype, hidden, r, decode_ms, timing, backend))
    if decode:
        print("\ndecode forward: lora_linear (decode kernels) / the same op's GEMM path (column-major W), and / "
              "F.linear")
    for row in decode:
        print(f"  {row['shape']:<26} kernel {1e3 * row['kernel_ms']:8.1f} µs  "
              f"GEMM path {1e3 * row['gemm_path_ms']:8.1f} µs  F.linear {1e3 * row['base_ms']:8.1f} µs  "
              f"kernel/GEMM path {row['kernel_vs_gemm_path']:.3f}  kernel/F.linear {row['kernel_vs_base']:.3f}")
    bwd = section(f"dY-once backward, {dtype}", lambda: bwd_dy_rows(device, dtype, hidden, bwd_ms, bwd_ranks, timing))
    if on_gpu:  # fp32 dy takes the CUDA-core kernel: where lora_linear runs it, M·r <= CUDA_BWD_DY_KERNEL_MAX_WORK
        bwd += section("dY-once backward, float32", lambda: bwd_dy_rows(device, torch.float32, hidden, fp32_bwd_ms,
                                                                        bwd_ranks, timing))
    if bwd:
        print("\ndY-once backward: lora_bwd_dy / two cuBLAS GEMMs (dYᵀ·S, dY·B)")
    for row in bwd:
        dtype_name = row["section"].split(", ")[-1]
        print(f"  {dtype_name:<9} {row['shape']:<28} kernel {1e3 * row['kernel_ms']:9.1f} µs  "
              f"GEMMs {1e3 * row['gemms_ms']:9.1f} µs  ratio {row['kernel_vs_gemms']:.3f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
