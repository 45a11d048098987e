"""The Triton compile gate (design.md §7): compiles every kernel spec that a module's `aot_specs()` lists for sm_80
and sm_90 with Triton's own compiler (no GPU needed), checks its shared memory against the target's limit, and
records which matrix instructions its PTX uses (wgmma, mma.sync or none) and whether it loads with TMA, failing specs
that require tensor cores (or TMA) and compiled without them.

Triton's compiler cannot run on interpreted kernels: with TRITON_INTERPRET=1, @triton.jit returns interpreter
objects with no compilable IR. `run_gate` therefore compiles in a subprocess started with TRITON_INTERPRET=0,
one per module (its specs are spread over a small process pool there):

    python -m lora_kernels.triton.aot [--module lora_linear] [--cc 80 90] [--jobs N] [--json out.json]
                                      [--match _lora_fwd_kernel[bf16]] [--registers]   # + ptxas -v usage
                                      [--loads]   # + global loads/stores by width and source line
"""

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import time

# Modules of lora_kernels.triton that define aot_specs().
SPEC_MODULES = ("lora_linear", "sgmv")
TARGETS = (80, 90)
# Opt-in shared memory per block (CUDA programming guide, compute capabilities table): 163 KiB on sm_80 (A100),
# 227 KiB on sm_90 (H100); 99 KiB on sm_86 and sm_89, which --cc can target.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
WARP_SIZE = 32


class SharedMemoryError(RuntimeError):
    """A kernel compiled but needs more shared memory than its target has."""


class TmaError(RuntimeError):
    """A kernel whose spec requires TMA loads on sm_90 compiled without them."""


def _jit_function(kernel):
    """The @triton.jit function under autotune/heuristics wrappers; refuses interpreted kernels."""
    from triton.runtime.jit import JITFunction

    def interpreted(k):
        return type(k).__name__ == "InterpretedFunction"

    while not isinstance(kernel, JITFunction) and not interpreted(kernel) and hasattr(kernel, "fn"):
        kernel = kernel.fn  # Autotuner / Heuristics
    if interpreted(kernel):
        raise RuntimeError(
            f"{kernel.__name__} is an interpreted kernel (TRITON_INTERPRET=1): Triton can only compile kernels "
            "defined without the interpreter; use run_gate(), which compiles in a TRITON_INTERPRET=0 subprocess")
    if not isinstance(kernel, JITFunction):
        raise TypeError(f"expected a @triton.jit function, got {type(kernel).__name__}")
    return kernel


def _divisibility_attrs(fn, signature, divisible):
    """Arguments Triton would mark 16-divisible at run time: every pointer (torch allocations are 16-byte aligned)
    and the int arguments the spec lists under "divisible_by_16"."""
    attrs = {}
    for index, name in enumerate(fn.arg_names):
        kind = signature.get(name)
        if kind is None or kind == "constexpr":
            continue
        if kind.startswith("*") or name in divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return attrs


def uses_tma(ptx):
    """Whether a kernel's PTX loads tiles with Hopper's tensor-memory accelerator (bulk tensor copies)."""
    return "cp.async.bulk.tensor" in ptx


def mma_kind(ptx):
    """Which matrix instructions a kernel's PTX uses: "wgmma" (Hopper's warp-group MMA), "mma" (mma.sync, the
    Ampere-style tensor-core MMA) or "none" (its dots, if any, became CUDA-core FMAs)."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return "none"


def ptxas_path(cc):
    """The ptxas Triton compiles sm_<cc> with, else the first on PATH; None when there is none. Triton ships two
    and picks one per target (`get_ptxas(arch)`, in every supported Triton): from 3.9 on, ptxas-blackwell (CUDA 13)
    serves sm_90 too, and writes PTX of a version that the older bundled ptxas (CUDA 12.9) refuses."""
    import shutil

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(cc).path
    except (ImportError, RuntimeError):  # RuntimeError: Triton's knob found no binary
        return shutil.which("ptxas")


def register_usage(ptx, cc):
    """(registers per thread, spill store bytes, spill load bytes) that `ptxas -v` reports for this PTX on sm_<cc>
    (sm_90a for 90, as Triton targets it). Spills go to local memory: a kernel that spills is slower than its tile
    suggests."""
    import tempfile

    ptxas = ptxas_path(cc)
    if ptxas is None:
        raise RuntimeError("ptxas not found (neither Triton's nor on PATH)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
        proc = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True, timeout=300)
    report = proc.stdout + proc.stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if proc.returncode != 0 or registers is None or spills is None:
        raise RuntimeError(f"ptxas -v gave no register report (exit {proc.returncode}): {report[-500:]}")
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


_MEMORY_OP = re.compile(r"^\s*(?:@!?%p\d+\s+)?((?:ld|st|red|atom)\.global[\w.:]*"
                        r"|cp\.async\.(?:ca|cg)\.shared\.global|cp\.async\.bulk\.tensor[\w.:]*)\s*(.*)$")


def global_memory_ops(ptx):
    """The global memory instructions of a kernel's PTX: {(instruction, bytes per thread, "file.py:line"): count},
    the line being the source line of the last `.loc` before it (Triton's debug info; an access the compiler moved
    may carry a neighbouring line). Loads (`ld.global`, `cp.async` into shared memory, TMA's `cp.async.bulk.tensor`,
    0 bytes: a whole tile per copy), stores and atomics. A streamed operand reaches bandwidth with 16-byte accesses
    (`ld.global.v4.b32`, `cp.async ... 16`); 2- and 4-byte ones issue 4-8x the instructions for the same bytes."""
    import collections

    files = dict(re.findall(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, flags=re.MULTILINE))  # listed after the code
    ops, line_of = collections.Counter(), "?"
    for text in ptx.splitlines():
        loc = re.match(r"^\s*\.loc\s+(\d+)\s+(\d+)", text)
        if loc:
            line_of = f"{os.path.basename(files.get(loc.group(1), '?'))}:{loc.group(2)}"
            continue
        match = _MEMORY_OP.match(text)
        if not match:
            continue
        op = match.group(1)
        if op.startswith("cp.async.bulk"):
            width = 0
        elif op.startswith("cp.async"):
            size = re.search(r"\],\s*(0x[0-9a-fA-F]+|\d+)", match.group(2))
            width = int(size.group(1), 0) if size else 0
        else:
            bits = re.search(r"\.[bsuf](8|16|32|64)\b", op)
            vec = re.search(r"\.v(2|4|8)\b", op)
            width = (int(bits.group(1)) // 8 if bits else 0) * (int(vec.group(1)) if vec else 1)
        ops[(op, width, line_of)] += 1
    return dict(ops)


class TensorCoreError(RuntimeError):
    """A kernel whose spec requires tensor cores compiled without MMA instructions (a silent ~10x slowdown)."""


def compile_spec(spec, cc, registers=False, loads=False):
    """Compile one aot_specs() entry for sm_<cc>; returns {"shared": bytes of shared memory, "mma": mma_kind, "tma":
    uses_tma}.
    Raises SharedMemoryError when the shared memory exceeds the target's limit, TensorCoreError when the spec asks
    for tensor cores ("tensor_cores": True; on sm_90 "wgmma": True asks for warp-group MMA) and the PTX has none,
    TmaError when it asks for TMA loads on sm_90 ("tma": True) and the PTX has none, and whatever Triton raises when
    it does not compile. registers=True adds "registers" and "spill_bytes" from
    `ptxas -v` (a second ptxas run per kernel, so not part of the CI gate); loads=True adds "memory": the
    `global_memory_ops` of its PTX as [instruction, bytes, source line, count] rows."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lora_kernels.triton import FP_FUSION  # the launchers' setting: compile what runs

    fn = _jit_function(spec["kernel"])
    signature = dict(spec["signature"])
    constexprs = dict(spec.get("constexprs", {}))
    for name in constexprs:
        signature[name] = "constexpr"
    missing = [name for name in fn.arg_names if name not in signature]
    if missing:
        raise ValueError(f"{spec['name']}: signature lacks arguments {missing}")
    attrs = _divisibility_attrs(fn, signature, set(spec.get("divisible_by_16", ())))
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"], "enable_fp_fusion": FP_FUSION}
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, WARP_SIZE), options=options)
    shared = int(compiled.metadata.shared)
    limit = SHARED_MEMORY_LIMIT[cc]
    if shared > limit:
        raise SharedMemoryError(f"{spec['name']}: needs {shared} bytes of shared memory on sm_{cc}, "
                                f"the limit is {limit} bytes")
    mma = mma_kind(compiled.asm["ptx"])
    if spec.get("tensor_cores") and mma == "none":
        raise TensorCoreError(f"{spec['name']}: its dots compiled to CUDA-core FMAs on sm_{cc}, not tensor-core MMA")
    if spec.get("wgmma") and cc >= 90 and mma != "wgmma":
        raise TensorCoreError(f"{spec['name']}: compiled to {mma} on sm_{cc}, not Hopper's warp-group MMA (wgmma)")
    tma = uses_tma(compiled.asm["ptx"])
    if spec.get("tma") and cc >= 90 and not tma:
        raise TmaError(f"{spec['name']}: its tensor-descriptor loads compiled without TMA bulk copies on sm_{cc}")
    result = {"shared": shared, "mma": mma, "tma": tma}
    if registers:
        result["registers"], result["spill_bytes"], _ = register_usage(compiled.asm["ptx"], cc)
    if loads:
        result["memory"] = sorted([*key, count] for key, count in global_memory_ops(compiled.asm["ptx"]).items())
    return result


def module_specs(module_name):
    """aot_specs() of lora_kernels.triton.<module_name>."""
    return list(importlib.import_module(f"lora_kernels.triton.{module_name}").aot_specs())


def all_specs(modules=SPEC_MODULES):
    """Every compile-gate spec of every module in `modules`, each with its "module" recorded."""
    specs = []
    for name in modules:
        for spec in module_specs(name):
            specs.append({**spec, "module": name})
    return specs


# ----------------------------------------------------------------------------------------------------------------
# Running the gate
# ----------------------------------------------------------------------------------------------------------------

_WORKER_SPECS = None
_WORKER_REGISTERS = False
_WORKER_LOADS = False


def _compile_one(job):
    """Pool worker: compile spec `index` of the list loaded before the fork; report instead of raising."""
    index, cc = job
    spec = _WORKER_SPECS[index]
    start = time.perf_counter()
    record = {"name": spec["name"], "module": spec.get("module"), "cc": cc, "limit": SHARED_MEMORY_LIMIT[cc]}
    try:
        record.update(compile_spec(spec, cc, registers=_WORKER_REGISTERS, loads=_WORKER_LOADS))
        record["ok"] = True
    except Exception as exc:  # noqa: BLE001  (reported, and the gate fails on it)
        record["ok"] = False
        record["error"] = f"{type(exc).__name__}: {exc}".strip()[:2000]
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def compile_all(specs, targets=TARGETS, jobs=None, registers=False, loads=False):
    """Compile every spec for every target, `jobs` processes at a time; returns one record per (spec, target):
    name, module, cc, ok, shared, limit, mma, tma, seconds, error when it failed, with registers=True the
    registers and spill bytes of ptxas -v, and with loads=True its global memory instructions ("memory")."""
    global _WORKER_SPECS, _WORKER_REGISTERS, _WORKER_LOADS
    _WORKER_SPECS, _WORKER_REGISTERS, _WORKER_LOADS = specs, registers, loads
    work = [(index, cc) for index in range(len(specs)) for cc in targets]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    if jobs == 1:
        return [_compile_one(job) for job in work]
    import multiprocessing

    # fork: the workers inherit the imported kernels (JIT functions do not pickle); nothing touched CUDA here.
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_one, work, chunksize=1)


def run_gate(module, targets=TARGETS, jobs=None, timeout=900):
    """Compile one module's specs in a TRITON_INTERPRET=0 subprocess; returns the records of `compile_all`, or
    raises RuntimeError with the subprocess's output when it fails before compiling (e.g. an import error)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "lora_kernels.triton.aot", "--module", module, "--json", "-",
           "--cc", *map(str, targets)]
    if jobs:
        cmd += ["--jobs", str(jobs)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    marker = "AOT-GATE-JSON:"
    for line in proc.stdout.splitlines():
        if line.startswith(marker):
            return json.loads(line[len(marker):])
    raise RuntimeError(f"compile gate for {module} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def format_records(records):
    lines = []
    for rec in records:
        if rec["ok"]:
            usage = (f"{rec['registers']:>3} regs {rec['spill_bytes']:>5} B spilled  " if "registers" in rec
                     else "")
            loads = "tma" if rec.get("tma") else "   "
            lines.append(f"ok   sm_{rec['cc']} {rec['shared']:>7} B / {rec['limit']} B  {rec['mma']:<5} {loads}  "
                         f"{usage}{rec['seconds']:6.2f}s  {rec['name']}")
            for op, width, line, count in rec.get("memory", ()):
                lines.append(f"       {count:>4} x {op:<44} {width:>2} B  {line}")
        else:
            lines.append(f"FAIL sm_{rec['cc']} {rec['name']}: {rec['error']}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", help="module of lora_kernels.triton (default: all)")
    # only the capabilities whose shared memory limit is known: any other failed with a KeyError traceback
    parser.add_argument("--cc", type=int, nargs="+", default=list(TARGETS), choices=sorted(SHARED_MEMORY_LIMIT))
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the records as JSON to this file ('-': stdout line)")
    parser.add_argument("--registers", action="store_true",
                        help="also report registers and spill bytes per kernel (ptxas -v; slower)")
    parser.add_argument("--loads", action="store_true",
                        help="also list each kernel's global loads, stores and atomics by width and source line")
    parser.add_argument("--match", default=None, help="only the specs whose name contains this text")
    args = parser.parse_args(argv)
    from lora_kernels.triton import INTERPRET

    if INTERPRET:
        parser.error("run with TRITON_INTERPRET=0: the interpreter's kernels cannot be compiled")
    specs = all_specs(args.module or SPEC_MODULES)
    if args.match:
        specs = [spec for spec in specs if args.match in spec["name"]]
    if not specs:  # a --match typo compiled nothing and passed
        parser.error(f"no spec selected (--module {args.module or 'all'}, --match {args.match!r})")
    records = compile_all(specs, args.cc, args.jobs, registers=args.registers, loads=args.loads)
    print(format_records(records), flush=True)
    if args.json == "-":
        print("AOT-GATE-JSON:" + json.dumps(records), flush=True)
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0 if all(rec["ok"] for rec in records) else 1


if __name__ == "__main__":
    sys.exit(main())
