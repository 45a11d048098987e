"""The Triton compile gate (design.md §7): every kernel spec of every lora_kernels.triton module compiles for sm_80
and sm_90 with Triton's own compiler, within the target's shared memory. No GPU needed.

The compilation runs in a TRITON_INTERPRET=0 subprocess per module (the interpreter's kernels cannot be compiled);
a module that does not exist yet is skipped, one that exists and fails to import fails the gate.
"""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lora_kernels.triton import HAS_TRITON, INTERPRET, TRITON_ERROR

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason=f"triton not importable: {TRITON_ERROR}")

if HAS_TRITON:
    from lora_kernels.triton import aot


def _run_without_interpreter(code, timeout, **env):
    """Runs `code` in a Python subprocess with TRITON_INTERPRET=0 (the GPU config lists, triton's compiler; no GPU
    needed) and this checkout first on its path."""
    env = dict(os.environ, TRITON_INTERPRET="0", **env)
    repo_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def _printed_json(proc, marker):
    """The JSON the subprocess printed after `marker`."""
    assert marker in proc.stdout, proc.stdout + proc.stderr[-3000:]
    return json.loads(proc.stdout.split(marker, 1)[1])


def _module_exists(name):
    return importlib.util.find_spec(f"lora_kernels.triton.{name}") is not None


@pytest.mark.parametrize("module", aot.SPEC_MODULES if HAS_TRITON else [])
def test_specs_compile_for_sm80_and_sm90(module, record_property):
    if not _module_exists(module):
        pytest.skip(f"lora_kernels.triton.{module} does not exist (yet)")
    records = aot.run_gate(module)
    report = f"{module}: {len(records)} compilations\n" + aot.format_records(records)
    print("\n" + report)
    # .ci/run prints these files, so every CI log shows what was compiled for which target.
    build_dir = Path(__file__).resolve().parent.parent / "build"
    build_dir.mkdir(exist_ok=True)
    (build_dir / f"triton_aot_{module}.txt").write_text(report + "\n")
    record_property(f"{module}_compiled", [(r["name"], r["cc"], r.get("shared")) for r in records if r["ok"]])
    failures = [r for r in records if not r["ok"]]
    assert not failures, "\n".join(f"sm_{r['cc']} {r['name']}: {r['error']}" for r in failures)
    for cc in aot.TARGETS:
        assert any(r["cc"] == cc for r in records) or not records, f"nothing compiled for sm_{cc}"
    for r in records:
        assert 0 <= r["shared"] <= aot.SHARED_MEMORY_LIMIT[r["cc"]]
        assert r["mma"] in ("wgmma", "mma", "none")
    if module == "lora_linear":  # the spec flags held: Hopper's 16-bit base GEMM tiles are warp-group MMA
        fwd_sm90 = [r for r in records if r["name"].startswith("_lora_fwd_kernel[bf16") and r["cc"] == 90]
        gemm_tiles = [r for r in fwd_sm90 if "BLOCK_M=16," not in r["name"]]  # not the decode tiles
        assert gemm_tiles and all(r["mma"] == "wgmma" for r in gemm_tiles)
        assert all(r["mma"] in ("wgmma", "mma") for r in fwd_sm90)


def test_mma_kind_reads_the_ptx():
    assert aot.mma_kind("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...}") == "wgmma"
    assert aot.mma_kind("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...}") == "mma"
    assert aot.mma_kind("fma.rn.f32 %f1, %f2, %f3, %f4;") == "none"


def test_tensor_core_flags_of_the_specs():
    """16-bit dot kernels must compile to tensor-core MMAs (the gate fails them otherwise), the base GEMMs to wgmma
    on sm_90; fp32 and dot-free kernels are exempt (checked in-process: building the specs needs no compiler)."""
    from lora_kernels.triton import lora_linear, sgmv

    for spec in lora_linear.aot_specs():
        fp32 = "fp32" in spec["name"].split(";")[0]
        assert spec["tensor_cores"] == (not fp32 and spec["kernel"].__name__ != "_dropout_mask_kernel"), spec["name"]
        base_gemm = spec["kernel"].__name__ in ("_lora_fwd_kernel", "_lora_bwd_dx_kernel")
        assert spec["wgmma"] == (base_gemm and not fp32 and spec["constexprs"]["BLOCK_M"] >= 64), spec["name"]
    for spec in sgmv.aot_specs():
        assert spec.get("tensor_cores", False) == spec["name"].startswith(("_sgmv_", "_segment_")), spec["name"]


def test_lora_linear_specs_cover_every_kernel():
    """Every @triton.jit kernel of lora_linear has specs for every dtype, and every signature names every argument
    (checked in-process: building the specs needs no compiler)."""
    from lora_kernels.triton import lora_linear

    specs = lora_linear.aot_specs()
    kernels = {name for name in dir(lora_linear) if name.startswith("_") and name.endswith("_kernel")}
    assert {spec["kernel"].__name__ for spec in specs} == kernels
    for spec in specs:
        assert set(spec["signature"]) == set(spec["kernel"].arg_names), spec["name"]
        for name, value in spec["constexprs"].items():
            assert spec["signature"][name] == "constexpr", (spec["name"], name, value)
        assert spec["num_warps"] in (1, 2, 4, 8) and spec["num_stages"] >= 1
    names = [spec["name"] for spec in specs]
    assert len(names) == len(set(names)), "duplicate specs"
    for kernel in kernels - {"_dropout_mask_kernel"}:
        dtypes = {next(spec["signature"][name] for name in ("x_ptr", "dy_ptr", "y_ptr", "dx_ptr")
                       if name in spec["signature"])
                  for spec in specs if spec["kernel"].__name__ == kernel}
        # The TMA kernels run 16-bit operands only (fp32 layers keep the pointer kernels' full-precision dots).
        expected = {"*bf16", "*fp16"} if "_tma_" in kernel else {"*bf16", "*fp16", "*fp32"}
        assert dtypes == expected, (kernel, dtypes)
    tma_specs = [spec for spec in specs if "_tma_" in spec["kernel"].__name__]
    assert {spec["kernel"].__name__ for spec in tma_specs} == {"_lora_fwd_tma_kernel", "_lora_bwd_dx_tma_kernel"}
    assert all(spec["tma"] and any(kind.startswith("tensordesc<") for kind in spec["signature"].values())
               for spec in tma_specs)


def test_the_dropout_mask_launch_is_the_one_the_gate_compiles(monkeypatch):
    """The dropout mask kernel launches with the warps and stages of its spec (an untuned launch, not autotuned): the
    gate compiled num_stages=1 while the launch left Triton's default of 3, so it did not compile what runs."""
    import torch

    from lora_kernels.triton import lora_linear

    (spec,) = [spec for spec in lora_linear.aot_specs() if spec["kernel"] is lora_linear._dropout_mask_kernel]
    launched = {}

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.update(kwargs)

    monkeypatch.setattr(lora_linear, "_dropout_mask_kernel", Recorder())
    lora_linear._launch_dropout_mask(torch.empty(3, 5), 0.5, 2.0, 7)
    assert (launched.get("num_warps"), launched.get("num_stages")) == (spec["num_warps"], spec["num_stages"])
    assert launched["BLOCK"] == spec["constexprs"]["BLOCK"]


def test_interpret_reads_the_environment_as_triton_does():
    """INTERPRET is what Triton itself makes of TRITON_INTERPRET: it read only "1", so with TRITON_INTERPRET=true
    Triton ran the interpreter while the launchers chose the compiled kernels' configs and dot operands. Checked
    in a subprocess, where reloading the package cannot change this one's kernels."""
    import subprocess
    import sys

    values = ["1", "0", "", "true", "TRUE", "on", "Yes", "y", "2", "off", " 1"]
    script = (
        "import importlib, os, sys, triton\n"
        "import lora_kernels.triton as package\n"
        "for value in sys.argv[1:]:\n"
        "    os.environ['TRITON_INTERPRET'] = value\n"
        "    importlib.reload(package)\n"
        "    print(repr(value), package.INTERPRET, bool(triton.knobs.runtime.interpret))\n")
    proc = subprocess.run([sys.executable, "-c", script, *values], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(values), proc.stdout
    interpreted = {}
    for value, line in zip(values, lines):
        ours, triton_reading = line.rsplit(" ", 2)[1:]
        assert ours == triton_reading, f"TRITON_INTERPRET={value!r}: INTERPRET {ours}, Triton {triton_reading}"
        interpreted[value] = ours == "True"
    assert interpreted["true"] and interpreted["1"] and not interpreted["0"] and not interpreted[""]


@pytest.mark.skipif(not INTERPRET, reason="only the interpreter's kernels are refused")
def test_interpreted_kernel_is_refused_with_a_clear_error():
    from lora_kernels.triton import lora_linear

    spec = lora_linear.aot_specs()[0]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.compile_spec(spec, 80)


def test_gate_fails_a_kernel_that_lost_its_tensor_cores_or_tma():
    """The checks can fail: an fp32 forward spec (full-precision FMA dots by design) marked as needing tensor cores,
    and the pointer-load forward marked as needing TMA, are refused when compiled for sm_90 (in a
    TRITON_INTERPRET=0 subprocess, like the gate)."""
    import os
    import subprocess
    import sys

    code = ("from lora_kernels.triton import aot, lora_linear as ll\n"
            "specs = ll.aot_specs()\n"
            "fp32 = next(s for s in specs if s['name'].startswith('_lora_fwd_kernel[fp32'))\n"
            "bf16 = next(s for s in specs if s['name'].startswith('_lora_fwd_kernel[bf16'))\n"
            "for spec, error in ((dict(fp32, tensor_cores=True), aot.TensorCoreError),\n"
            "                    (dict(bf16, tma=True), aot.TmaError)):\n"
            "    try:\n"
            "        aot.compile_spec(spec, 90)\n"
            "    except error as exc:\n"
            "        print('REFUSED', exc)\n")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("REFUSED") == 2, proc.stdout
    assert "CUDA-core FMAs on sm_90" in proc.stdout and "without TMA bulk copies on sm_90" in proc.stdout, proc.stdout


def test_register_report_from_ptxas():
    """`python -m lora_kernels.triton.aot --registers` adds ptxas -v's registers and spill bytes per kernel (the
    numbers BENCHMARKS.md quotes); one small kernel, both targets."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-m", "lora_kernels.triton.aot", "--module", "lora_linear", "--match",
                           "_dropout_mask_kernel", "--registers", "--json", "-", "--jobs", "1"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("AOT-GATE-JSON:"))
    records = json.loads(line[len("AOT-GATE-JSON:"):])
    assert {r["cc"] for r in records} == set(aot.TARGETS)
    assert all(r["ok"] and 1 <= r["registers"] <= 255 and r["spill_bytes"] >= 0 for r in records), records
    assert "regs" in proc.stdout and "B spilled" in proc.stdout


def test_global_memory_ops_reads_the_ptx():
    ptx = "\n".join([
        "\t.loc\t1 10 5                        // k.py:10:5",
        "\tcp.async.cg.shared.global [ %r53 + 0 ], [ %rd29 + 0 ], 0x10, %r54;",
        "\tcp.async.ca.shared.global [ %r55 + 0 ], [ %rd30 + 0 ], 0x4, %r56;",
        "\t@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];",
        "\t.loc\t1 12 7",
        "\t@!%p2 ld.global.b16 { %rs1 }, [ %rd2 + 0 ];",
        "\tst.global.v2.b32 [ %rd3 + 0 ], { %r5, %r6 };",
        "\tatom.global.gpu.acq_rel.add.f32 %r7, [ %rd4 + 0 ], %r8;",
        "\tcp.async.bulk.tensor.2d.shared::cta.global.mbarrier::complete_tx::bytes [%r9], [%rd5, {%r10}], [%r12];",
        "\tld.shared.v4.b32 { %r1, %r2, %r3, %r4 }, [ %r13 + 0 ];",  # not global memory
        '\t.file\t1 "/somewhere/k.py"',
    ])
    assert aot.global_memory_ops(ptx) == {
        ("cp.async.cg.shared.global", 16, "k.py:10"): 1, ("cp.async.ca.shared.global", 4, "k.py:10"): 1,
        ("ld.global.v4.b32", 16, "k.py:10"): 1, ("ld.global.b16", 2, "k.py:12"): 1,
        ("st.global.v2.b32", 8, "k.py:12"): 1, ("atom.global.gpu.acq_rel.add.f32", 4, "k.py:12"): 1,
        ("cp.async.bulk.tensor.2d.shared::cta.global.mbarrier::complete_tx::bytes", 0, "k.py:12"): 1}


@pytest.mark.parametrize("match", ["_shrink_kernel[bf16,atomic", "_shrink_kernel[bf16,R", "_expand_kernel[bf16->"])
def test_grouped_kernels_load_their_16_bit_operands_16_bytes_at_a_time(match):
    """The grouped kernels stream x and A (shrink) and B (expand): compiled as they run for contiguous bf16
    operands (unit inner strides, sizes divisible by 16), none of their global loads is 2 bytes wide (one bf16
    element) except the decode expand's read of its bf16 output row (one element per thread by its tile), and
    each has 16-byte loads. The expand kernels loaded B 2 bytes at a time while their mask ended at the slot's rank
    (a loaded value), and the gate, compiling unit strides as plain ints, saw 2-byte loads of A and x as well.
    Counted over the whole kernel: Triton's source lines for a load are not reliable enough to attribute it."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-m", "lora_kernels.triton.aot", "--module", "sgmv", "--match", match,
                           "--loads", "--json", "-", "--jobs", "1"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("AOT-GATE-JSON:"))
    records = json.loads(line[len("AOT-GATE-JSON:"):])
    specs = {"_shrink_kernel[bf16,atomic": 2, "_shrink_kernel[bf16,R": 4, "_expand_kernel[bf16->": 4}[match]
    assert len(records) == specs * len(aot.TARGETS), [r["name"] for r in records]
    for r in records:
        loads = [(op, width, count) for op, width, _, count in r["memory"] if op.startswith(("ld.", "cp.async"))]
        one_element = sum(count for op, width, count in loads if width == 2)
        allowed = 1 if r["name"].startswith("_bgmv_expand_kernel[bf16->bf16]") else 0
        assert one_element <= allowed, (r["name"], r["cc"], loads)
        assert any(width == 16 for _, width, _ in loads), (r["name"], r["cc"], loads)


def test_every_launch_passes_the_fp_fusion_setting():
    """Every `kernel[grid](...)` launch in lora_kernels/triton passes enable_fp_fusion=FP_FUSION, the setting the
    gate compiles with: triton 3.9 warns on a launch that leaves it to the default, which 3.10 turns off (FMA
    contraction off changes the numerics, silently). CI's triton 3.8 does not warn, so a new launch without it would
    pass every other test here. Read from the source: the interpreter ignores the option."""
    import ast

    launches = {}
    for path in sorted(Path(aot.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):  # kernel[grid](...)
                passed = {k.arg: ast.unparse(k.value) for k in node.keywords}.get("enable_fp_fusion")
                launches[f"{path.name}:{node.lineno} {ast.unparse(node.func.value)}"] = passed
    assert len(launches) >= 13, sorted(launches)  # the launch sites of lora_linear.py and sgmv.py
    assert {site for site, passed in launches.items() if passed != "FP_FUSION"} == set(), launches


def _argument_selects_no_compiled_variant(module, argument, kernel_count):
    """Whether `argument` of every kernel in module.aot_specs() that takes it leaves the launch's cache key alone
    (kernel_count of them): Triton specialises an int argument on its value (1: a constexpr; a multiple of 16: a
    divisibility attribute), each a binary of its own. Checked on the binder whose specialisation a launch's cache
    key is made of, in a TRITON_INTERPRET=0 subprocess (like the gate)."""
    import textwrap

    code = textwrap.dedent(f"""
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
        from lora_kernels.triton import aot, {module} as module
        backend = make_backend(GPUTarget("cuda", 90, 32))
        kernels = {{}}
        for spec in module.aot_specs():
            fn = aot._jit_function(spec["kernel"])
            if "{argument}" in fn.arg_names:
                kernels[fn.fn.__name__] = fn
        assert len(kernels) == {kernel_count}, sorted(kernels)
        for name, fn in kernels.items():
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            keys = {{str(binder(**{{arg: 48 for arg in fn.arg_names if arg != "{argument}"}}, {argument}=value)[1])
                    for value in (1234567, 1234560, 1)}}
            assert len(keys) == 1, (name, keys)
        print("UNSPECIALISED-OK")
    """)
    proc = _run_without_interpreter(code, timeout=300)
    assert "UNSPECIALISED-OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_dropout_seed_selects_no_compiled_variant():
    """Every training step draws a new dropout seed (functional.new_seed): a specialised seed compiled every dropout
    kernel again, on a GPU, at the first step whose seed was a multiple of 16 (about 2 s per kernel and layer
    shape)."""
    _argument_selects_no_compiled_variant("lora_linear", "seed", 5)


def test_grouped_token_count_selects_no_compiled_variant():
    """The grouped prefill kernels take the token count M only to clamp a hand-built batch's metadata, and M changes
    every serving step: specialised, every M a multiple of 16 (and M = 1) would compile each kernel again."""
    _argument_selects_no_compiled_variant("sgmv", "num_tokens", 3)


def test_gate_compiles_every_config_the_prune_launches():
    """Each autotune config that the shared-memory prune lets a kernel launch with, for fp32 and bf16 at every rank
    chunk, is compiled by the gate at that chunk or a larger one (whose operands are larger). The fp32 prune keeps
    more configs at chunks 16 and 32 (every fp32 rank up to 32) than at 64, where the gate looked: the shrink's and
    dA's 128-row tiles ran there uncompiled (they fit, spilling 0.7-3.7 KB per thread). Specs are listed in a
    TRITON_INTERPRET=0 subprocess, where the module holds its GPU config lists."""
    import textwrap

    code = textwrap.dedent("""
        import torch
        from lora_kernels.triton import lora_linear as ll
        compiled = {}
        for spec in ll.aot_specs():
            name, tag, launch = spec["name"].split("[", 1)[1].rstrip("]").split("; ")
            kwargs = dict(item.split("=") for item in tag.split(","))
            compiled.setdefault((spec["kernel"].__name__, name, launch), []).append(kwargs)
        kernels = {"_lora_shrink_kernel": (ll.SHRINK_CONFIGS, "x_ptr", {}),
                   "_lora_fwd_kernel": (ll.GEMM_CONFIGS, "x_ptr", {}),
                   "_lora_bwd_dy_kernel": (ll.DY_CONFIGS, "dy_ptr", {"BLOCK_M": ll.DY_BLOCK_M}),
                   "_lora_bwd_dx_kernel": (ll.DX_CONFIGS, "dy_ptr", {}),
                   "_lora_bwd_da_kernel": (ll.DA_CONFIGS, "x_ptr", {})}
        missing = []
        for kernel, (configs, pointer, fixed) in kernels.items():
            for dtype in (torch.float32, torch.bfloat16):
                for r in (1, 17, 33, 1024):
                    chunk = ll._dy_block_r(r, dtype) if kernel == "_lora_bwd_dy_kernel" else ll._block_r(r)
                    for cfg in ll._PRUNE[kernel](configs, {pointer: torch.empty(0, dtype=dtype)}, **fixed,
                                                 BLOCK_R=chunk):
                        key = (kernel, ll.TRITON_DTYPE_NAMES[dtype], f"w{cfg.num_warps} s{cfg.num_stages}")
                        if not any(int(kw["BLOCK_R"]) >= chunk and all(kw.get(k) == str(v) for k, v in
                                                                      cfg.kwargs.items())
                                   for kw in compiled.get(key, [])):
                            missing.append(f"{kernel}[{key[1]}; {cfg.kwargs}, BLOCK_R={chunk}; {key[2]}]")
        print("MISSING:" + repr(sorted(set(missing))))
    """)
    proc = _run_without_interpreter(code, timeout=300)
    assert "MISSING:" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    missing = proc.stdout.split("MISSING:", 1)[1].strip()
    assert missing == "[]", f"launched but never compiled by the gate: {missing}"


def test_with_autotuning_off_each_kernel_launches_the_first_config_its_prune_keeps():
    """LORA_KERNELS_AUTOTUNE=0 (the GPU tests' setting) cut each config list to its first config, and triton's
    autotuner calls the prune only for lists of more than one: the fp32 shrink's first config (114-164 KB of shared
    memory) launched unpruned on the 99 KiB of sm_86/sm_89 GPUs, OutOfResources (helper 272). Now each autotuner
    holds the whole list, its own prune_configs gives the first config the prune keeps for that GPU's budget (the
    one test_the_prune_leaves_a_config_that_fits_a_99_kib_gpu compiles), and its do_bench runs nothing (triton
    3.6 times a lone config). A TRITON_INTERPRET=0 subprocess: the GPU config lists."""
    import textwrap

    code = textwrap.dedent("""
        import json, torch
        from lora_kernels.triton import aot, lora_linear as ll
        assert not ll.AUTOTUNE
        budget = ll.SMEM_BUDGET * aot.SHARED_MEMORY_LIMIT[86] // ll.SM80_SHARED_MEMORY
        ll.smem_budget = lambda tensor: budget  # what the prune reads on an sm_86 GPU
        results = {}
        for name, pointer in (("_shrink", "x_ptr"), ("_fwd", "x_ptr"), ("_bwd_dy", "dy_ptr"), ("_bwd_dx", "dy_ptr"),
                              ("_bwd_da", "x_ptr")):
            tuner = getattr(ll, name)
            tuner.nargs = {pointer: torch.empty(0, dtype=torch.float32)}
            fixed = dict(BLOCK_R=64, GROUP=ll.GROUP_M, BLOCK_M=ll.DY_BLOCK_M if name == "_bwd_dy" else None)
            fixed = {key: value for key, value in fixed.items() if value is not None and key not in
                     tuner.configs[0].kwargs}
            chosen = tuner.prune_configs(fixed)
            expected = ll._PRUNE[tuner.base_fn.__name__](tuner.configs, tuner.nargs, budget, **fixed)[0]
            def kernel_call():
                raise AssertionError("timed")
            results[name] = dict(listed=len(tuner.configs), chosen=len(chosen), same=str(chosen[0]) == str(expected),
                                 first=str(chosen[0]) == str(tuner.configs[0]),
                                 timing=tuner.do_bench(kernel_call, quantiles=(0.5, 0.2, 0.8)))
        print("RESULTS:" + json.dumps(results))
    """)
    proc = _run_without_interpreter(code, timeout=600, LORA_KERNELS_AUTOTUNE="0")
    results = _printed_json(proc, "RESULTS:")
    for name, result in results.items():
        assert result["listed"] > 1 and result["chosen"] == 1 and result["same"], (name, result)
        assert result["timing"] == [0.0, 0.0, 0.0], (name, result)
    assert not results["_shrink"]["first"]  # fp32 at rank chunk 64: the first config does not fit 99 KiB


def test_every_da_config_the_prune_keeps_for_a_99_kib_gpu_fits_there():
    """The prune costed dA's pipelined dSᵀ tile at x's element size, but it is float32 for 16-bit x too: for bf16 at
    rank chunk 64 it kept two configs needing 131-139 KB on sm_86, which autotuning compiled to no use on every new
    key (helper 272). Every config it keeps now compiles within 99 KiB."""
    import textwrap

    code = textwrap.dedent("""
        import json, torch
        from lora_kernels.triton import aot, lora_linear as ll
        budget = ll.SMEM_BUDGET * aot.SHARED_MEMORY_LIMIT[86] // ll.SM80_SHARED_MEMORY
        specs = []
        for dtype in (torch.bfloat16, torch.float32):
            for chunk in (32, 64):
                kept = ll._PRUNE["_lora_bwd_da_kernel"](ll.DA_CONFIGS, {"x_ptr": torch.empty(0, dtype=dtype)}, budget,
                                                        BLOCK_R=chunk)
                specs += [ll._spec(ll._lora_bwd_da_kernel, dtype, cfg.kwargs, cfg.num_warps, cfg.num_stages,
                                   HAS_DROPOUT=True, BLOCK_R=chunk) for cfg in kept]
        records = aot.compile_all(specs, targets=(86,))
        print("RECORDS:" + json.dumps([(r["name"], r["ok"], r.get("shared"), r.get("error")) for r in records]))
    """)
    proc = _run_without_interpreter(code, timeout=900)
    records = _printed_json(proc, "RECORDS:")
    assert len(records) >= 4
    assert all(ok and shared <= aot.SHARED_MEMORY_LIMIT[86] for _, ok, shared, _ in records), records


def test_the_prune_leaves_a_config_that_fits_a_99_kib_gpu():
    """sm_86 and sm_89 GPUs (A10, L4, L40S, RTX 30 and 40 series) have 99 KiB of shared memory per block, where the
    prune's budget was sm_80's: every config it kept of the fp32 shrink at rank chunks 32 (with dropout) and 64
    needed 114-164 KB there (its own fallback, the first config, 164 KB), so each launch raised OutOfResources.
    With that GPU's budget, the config it launches first (the first one kept; the only one with
    LORA_KERNELS_AUTOTUNE=0) compiles for sm_86 within 99 KiB, for every kernel, fp32 and bf16, rank chunk and flag
    on (and a lone config's fitted copy too). A TRITON_INTERPRET=0 subprocess, as the gate's."""
    import textwrap

    code = textwrap.dedent("""
        import json, torch
        from lora_kernels.triton import aot, lora_linear as ll
        budget = ll.SMEM_BUDGET * aot.SHARED_MEMORY_LIMIT[86] // ll.SM80_SHARED_MEMORY
        kernels = [(ll.SHRINK_CONFIGS, ll._lora_shrink_kernel, "x_ptr", dict(HAS_DROPOUT=True), {}),
                   (ll.GEMM_CONFIGS, ll._lora_fwd_kernel, "x_ptr", dict(HAS_BIAS=True, EVEN_K=True),
                    dict(GROUP=ll.GROUP_M)),
                   (ll.DY_CONFIGS, ll._lora_bwd_dy_kernel, "dy_ptr", {}, dict(BLOCK_M=ll.DY_BLOCK_M)),
                   (ll.DX_CONFIGS, ll._lora_bwd_dx_kernel, "dy_ptr", dict(HAS_DROPOUT=True, EVEN_N=True),
                    dict(GROUP=ll.GROUP_M)),
                   (ll.DA_CONFIGS, ll._lora_bwd_da_kernel, "x_ptr", dict(HAS_DROPOUT=True), {})]
        specs, seen = [], set()
        for configs, fn, pointer, flags, fixed in kernels:
            for dtype in (torch.float32, torch.bfloat16):
                top = ll.DY_MAX_BLOCK_R_FP32 if fn is ll._lora_bwd_dy_kernel and dtype == torch.float32 else 64
                for chunk in (c for c in (16, 32, 64) if c <= top):
                    for listed in (configs, configs[:1]):
                        cfg = ll._PRUNE[fn.__name__](listed, {pointer: torch.empty(0, dtype=dtype)}, budget, **fixed,
                                                    BLOCK_R=chunk)[0]
                        spec = ll._spec(fn, dtype, cfg.kwargs, cfg.num_warps, cfg.num_stages, **flags, **fixed,
                                        BLOCK_R=chunk)
                        if spec["name"] not in seen:
                            seen.add(spec["name"])
                            specs.append(spec)
        records = aot.compile_all(specs, targets=(86,))
        print("RECORDS:" + json.dumps([(r["name"], r["ok"], r.get("shared"), r.get("error")) for r in records]))
    """)
    proc = _run_without_interpreter(code, timeout=900)
    records = _printed_json(proc, "RECORDS:")
    assert len(records) >= 20
    failures = [(name, shared, error) for name, ok, shared, error in records if not ok]
    assert not failures, failures
    assert all(shared <= aot.SHARED_MEMORY_LIMIT[86] for _, _, shared, _ in records)


def test_the_prune_fits_a_copy_of_the_least_config_where_none_fits_a_smaller_gpu():
    """The fallback where a small GPU's budget prunes every config: a copy of the least one, with fewer stages and
    then halved blocks (never below a dot's 16), within the budget; the configs themselves untouched. sm_80 and
    sm_90 keep the first config as before (it fits their limits)."""
    import torch

    from lora_kernels.triton import lora_linear as ll
    configs = [ll.triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
               ll.triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4)]
    prune = ll._prune_by_smem("BLOCK_M", "BLOCK_R", "BLOCK_K", "x_ptr")
    fp32 = {"x_ptr": torch.empty(0)}
    assert prune(configs, fp32, ll.SMEM_BUDGET, BLOCK_R=64) == configs[:1]  # nothing fits 160 KiB: the first
    fitted, = prune(configs, fp32, 40 * 1024, BLOCK_R=64)
    assert fitted not in configs and fitted.num_stages == 2 and fitted.num_warps == 4
    assert fitted.num_stages * (fitted.kwargs["BLOCK_M"] + 64) * fitted.kwargs["BLOCK_K"] * 4 <= 40 * 1024
    assert min(fitted.kwargs.values()) >= ll.MIN_DOT_DIM
    assert configs[0].kwargs == {"BLOCK_M": 64, "BLOCK_K": 128} and configs[0].num_stages == 3
    assert ll.smem_budget(torch.empty(0)) == ll.SMEM_BUDGET  # not a GPU: the measured budget


# ----------------------------------------------------------------------------------------------------------------
# The gate's decisions, with stand-ins for Triton's compiler: each check runs in milliseconds, in this process (whose
# kernels are interpreted and cannot be compiled), on PTX and shared memory sizes chosen to sit on each boundary.
# ----------------------------------------------------------------------------------------------------------------

# Real PTX spellings (Triton 3.x output and the PTX ISA) of the instructions the gate looks for.
WGMMA_PTX = "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, p, 1, 1, 0, 1;"
MMA_PTX = ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 { %f1, %f2, %f3, %f4 }, { %r1, %r2, %r3, %r4 }, "
           "{ %r5, %r6 }, { %f1, %f2, %f3, %f4 };")
FMA_PTX = "fma.rn.f32 %f1, %f2, %f3, %f4;"
TMA_PTX = ("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r2, %r3}], "
           "[%r4];")


def _stand_in_compiler(monkeypatch, ptx=MMA_PTX, shared=0, arg_names=("x_ptr", "n", "stride", "BLOCK")):
    """Replaces what compile_spec uses of Triton (the jit function it unwraps, ASTSource, triton.compile) with
    recorders; triton.compile returns a kernel with this `shared` memory and `ptx`. Returns the list of
    (source, target, options) that triton.compile received. GPUTarget stays Triton's own (a plain dataclass)."""
    import triton
    import triton.compiler

    fn = SimpleNamespace(arg_names=list(arg_names))
    compiled = []

    class Source:
        def __init__(self, fn, signature, constexprs, attrs):
            self.fn, self.signature, self.constexprs, self.attrs = fn, signature, constexprs, attrs

    def compile(src, target, options):
        compiled.append((src, target, options))
        return SimpleNamespace(metadata=SimpleNamespace(shared=shared), asm={"ptx": ptx})

    monkeypatch.setattr(aot, "_jit_function", lambda kernel: fn)
    monkeypatch.setattr(triton.compiler, "ASTSource", Source)
    monkeypatch.setattr(triton, "compile", compile)
    return compiled


def _spec(**overrides):
    """A compile-gate spec of the stand-in kernel (x_ptr, n, stride, BLOCK)."""
    spec = {"name": "_k_kernel[bf16]", "kernel": object(), "signature": {"x_ptr": "*bf16", "n": "i32", "stride": "i32"},
            "constexprs": {"BLOCK": 64}, "num_warps": 8, "num_stages": 3}
    return {**spec, **overrides}


@pytest.mark.parametrize("cc", sorted(set(aot.TARGETS)) if HAS_TRITON else [])
def test_shared_memory_at_the_limit_passes_and_one_byte_over_fails(monkeypatch, cc):
    """The limit is the target's own (sm_90 allows 64 KiB more than sm_80) and inclusive: a kernel may use all of
    it. Both targets' limits differ, so a lookup of the wrong target's limit fails one side here."""
    limit = aot.SHARED_MEMORY_LIMIT[cc]
    _stand_in_compiler(monkeypatch, shared=limit)
    assert aot.compile_spec(_spec(), cc)["shared"] == limit
    _stand_in_compiler(monkeypatch, shared=limit + 1)
    with pytest.raises(aot.SharedMemoryError, match=f"needs {limit + 1} bytes of shared memory on sm_{cc}, "
                                                    f"the limit is {limit} bytes"):
        aot.compile_spec(_spec(), cc)


def test_compile_spec_compiles_what_the_spec_says(monkeypatch):
    """What reaches triton.compile is what launches: the spec's warps and stages, the launchers' FP_FUSION, a
    32-thread-warp CUDA target of the requested capability, constexprs marked in the signature, and the 16-divisible
    attributes Triton would specialise at run time (every pointer, plus the ints the spec lists; never a
    constexpr, which has no runtime value to align)."""
    from triton.backends.compiler import GPUTarget

    from lora_kernels.triton import FP_FUSION

    compiled = _stand_in_compiler(monkeypatch)
    aot.compile_spec(_spec(divisible_by_16=["n", "BLOCK"]), 90)
    ((src, target, options),) = compiled
    assert options == {"num_warps": 8, "num_stages": 3, "enable_fp_fusion": FP_FUSION}
    assert target == GPUTarget("cuda", 90, 32)
    assert src.signature == {"x_ptr": "*bf16", "n": "i32", "stride": "i32", "BLOCK": "constexpr"}
    assert src.constexprs == {"BLOCK": 64}
    # (index,) of x_ptr (a pointer) and n (listed); stride is an unlisted int, BLOCK a constexpr
    assert src.attrs == {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
    compiled.clear()
    aot.compile_spec(_spec(num_warps=4, num_stages=1), 80)
    ((src, target, options),) = compiled
    assert (options["num_warps"], options["num_stages"], target) == (4, 1, GPUTarget("cuda", 80, 32))
    assert src.attrs == {(0,): [["tt.divisibility", 16]]}  # no divisible_by_16: the pointer only


def test_a_signature_missing_an_argument_is_refused_by_name(monkeypatch):
    """A spec whose signature lacks a kernel argument (one added to the kernel, not to its spec) is refused before
    Triton sees it, naming the argument; a constexpr counts as present."""
    compiled = _stand_in_compiler(monkeypatch)
    with pytest.raises(ValueError, match=r"_k_kernel\[bf16\]: signature lacks arguments \['stride'\]"):
        aot.compile_spec(_spec(signature={"x_ptr": "*bf16", "n": "i32"}), 80)
    assert compiled == []


@pytest.mark.parametrize("flags, ptx, refused", [
    # Hopper's base GEMMs must use warp-group MMA; mma.sync there is the Ampere path (about half the throughput).
    ({"wgmma": True}, MMA_PTX, {90: "TensorCoreError"}),
    ({"wgmma": True}, WGMMA_PTX, {}),
    # sm_80 has no TMA: the flag binds sm_90 only.
    ({"tma": True}, MMA_PTX, {90: "TmaError"}),
    ({"tma": True}, TMA_PTX + "\n" + MMA_PTX, {}),
    # tensor cores on every target: FMA-only dots are a silent ~10x slowdown.
    ({"tensor_cores": True}, FMA_PTX, {80: "TensorCoreError", 90: "TensorCoreError"}),
    ({"tensor_cores": True}, MMA_PTX, {}),
    ({}, FMA_PTX, {}),  # no flag, no requirement: fp32 and dot-free kernels compile to FMAs by design
], ids=["wgmma-mma", "wgmma-ok", "tma-missing", "tma-ok", "tensor-cores-fma", "tensor-cores-ok", "no-flags"])
def test_spec_flags_refuse_the_instructions_they_rule_out(monkeypatch, flags, ptx, refused):
    _stand_in_compiler(monkeypatch, ptx=ptx)
    for cc in aot.TARGETS:
        if cc in refused:
            with pytest.raises(getattr(aot, refused[cc]), match=f"sm_{cc}"):
                aot.compile_spec(_spec(**flags), cc)
        else:
            result = aot.compile_spec(_spec(**flags), cc)
            assert (result["mma"], result["tma"]) == (aot.mma_kind(ptx), aot.uses_tma(ptx))


def test_mma_kind_prefers_wgmma_and_counts_tf32_mma():
    """A Hopper kernel can hold both (wgmma for its main loop, mma.sync for a small epilogue dot): it is a wgmma
    kernel. fp32 dots run as tf32 mma.sync (m16n8k8), tensor-core instructions as much as the 16-bit ones."""
    assert aot.mma_kind(WGMMA_PTX + "\n" + MMA_PTX) == "wgmma"
    assert aot.mma_kind(MMA_PTX + "\n" + WGMMA_PTX) == "wgmma"
    tf32 = ("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 { %f5, %f6, %f7, %f8 }, { %r7, %r8, %r9, %r10 }, "
            "{ %r11, %r12 }, { %f5, %f6, %f7, %f8 };")
    assert aot.mma_kind(FMA_PTX + "\n" + tf32) == "mma"
    # wgmma's fences and waits alone are no MMA
    assert aot.mma_kind("wgmma.fence.sync.aligned;\nwgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 0;"
                        "\n" + FMA_PTX) == "none"


@pytest.mark.parametrize("rank", [1, 2, 3, 4, 5])
def test_uses_tma_sees_bulk_tensor_copies_of_every_rank(rank):
    coords = ", ".join(f"%r{i + 10}" for i in range(rank))
    ptx = f"@%p1 cp.async.bulk.tensor.{rank}d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1, " \
          f"{{{coords}}}], [%r2];"
    assert aot.uses_tma(ptx)


def test_uses_tma_ignores_plain_bulk_copies():
    """cp.async.bulk without .tensor is a 1-D bulk copy from a plain address (no tensor descriptor), and cp.async
    is Ampere's per-thread async copy: neither is a tensor-descriptor (TMA) load."""
    assert not aot.uses_tma("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1], 256, "
                            "[%r2];")
    assert not aot.uses_tma("cp.async.cg.shared.global [ %r53 + 0 ], [ %rd29 + 0 ], 0x10, %r54;\n" + MMA_PTX)


def _recording_compile_spec(monkeypatch, fail=()):
    """Replaces compile_spec: records (name, cc, registers, loads) and raises ValueError for the specs named in
    `fail`. Returns the list of calls."""
    calls = []

    def compile_spec(spec, cc, registers=False, loads=False):
        calls.append((spec["name"], cc, registers, loads))
        if spec["name"] in fail:
            raise ValueError(f"{spec['name']} does not fit")
        return {"shared": 1024, "mma": "mma", "tma": False}

    monkeypatch.setattr(aot, "compile_spec", compile_spec)
    return calls


def test_compile_all_reports_a_failing_spec_and_compiles_the_rest(monkeypatch):
    """One spec failing to compile neither stops the gate nor hides the others: each (spec, target) gets a record,
    the failing one with the exception's type and message."""
    specs = [{"name": name, "module": "m"} for name in ("a", "b", "c")]
    calls = _recording_compile_spec(monkeypatch, fail={"b"})
    records = aot.compile_all(specs, targets=(80, 90), jobs=1, registers=True, loads=True)
    assert [(r["name"], r["cc"]) for r in records] == [(n, cc) for n in "abc" for cc in (80, 90)]
    assert sorted(calls) == [(n, cc, True, True) for n in "abc" for cc in (80, 90)]
    for r in records:
        assert r["module"] == "m" and r["limit"] == aot.SHARED_MEMORY_LIMIT[r["cc"]]
        if r["name"] == "b":
            assert r["ok"] is False and r["error"] == "ValueError: b does not fit", r
        else:
            assert r["ok"] is True and r["shared"] == 1024 and "error" not in r, r


def _main_with_stand_ins(monkeypatch, fail=()):
    """main() in this process: INTERPRET off (main refuses the interpreter), two modules' specs, compile_spec
    recording. Returns the compile_spec calls and the modules all_specs was asked for."""
    import lora_kernels.triton as package

    monkeypatch.setattr(package, "INTERPRET", False)
    asked = []

    def all_specs(modules=aot.SPEC_MODULES):
        asked.append(list(modules))
        return [{"name": name, "module": "m"} for name in ("_x_kernel[bf16]", "_x_kernel[fp32]", "_y_kernel[bf16]")]

    monkeypatch.setattr(aot, "all_specs", all_specs)
    return _recording_compile_spec(monkeypatch, fail), asked


def test_main_exit_status_is_the_gates_verdict(monkeypatch, capsys):
    calls, asked = _main_with_stand_ins(monkeypatch)
    assert aot.main(["--jobs", "1"]) == 0
    assert asked == [list(aot.SPEC_MODULES)] and len(calls) == 3 * len(aot.TARGETS)
    calls, _ = _main_with_stand_ins(monkeypatch, fail={"_y_kernel[bf16]"})
    assert aot.main(["--jobs", "1", "--cc", "90"]) == 1
    assert "FAIL sm_90 _y_kernel[bf16]: ValueError: _y_kernel[bf16] does not fit" in capsys.readouterr().out


def test_main_match_keeps_only_the_specs_named(monkeypatch, capsys):
    """--match selects by any substring of the spec name, not only a prefix (the CLI's way to recompile one kernel),
    and --json - prints the records on the marker line run_gate reads."""
    import json

    calls, asked = _main_with_stand_ins(monkeypatch)
    assert aot.main(["--module", "sgmv", "--match", "x_kernel[", "--json", "-", "--jobs", "1"]) == 0
    assert asked == [["sgmv"]]
    assert sorted({name for name, *_ in calls}) == ["_x_kernel[bf16]", "_x_kernel[fp32]"]
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("AOT-GATE-JSON:")]
    records = json.loads(line[len("AOT-GATE-JSON:"):])
    assert sorted((r["name"], r["cc"]) for r in records) == sorted(
        (name, cc) for name in ("_x_kernel[bf16]", "_x_kernel[fp32]") for cc in aot.TARGETS)


def test_main_refuses_the_interpreter(monkeypatch):
    import lora_kernels.triton as package

    monkeypatch.setattr(package, "INTERPRET", True)
    calls = _recording_compile_spec(monkeypatch)
    with pytest.raises(SystemExit):
        aot.main(["--jobs", "1"])
    assert calls == []


def test_run_gate_compiles_in_a_subprocess_without_the_interpreter(monkeypatch):
    """The subprocess must not inherit TRITON_INTERPRET=1 (its kernels could not be compiled) and must be asked for
    the JSON marker line and the targets; its records are what run_gate returns."""
    import json
    import subprocess

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    records = [{"name": "_k_kernel[bf16]", "cc": 80, "ok": True}]
    runs = []

    def run(cmd, env=None, **kwargs):
        runs.append((cmd, env))
        return subprocess.CompletedProcess(cmd, 0, stdout="ok   sm_80 ...\nAOT-GATE-JSON:" + json.dumps(records) + "\n",
                                           stderr="")

    monkeypatch.setattr(subprocess, "run", run)
    assert aot.run_gate("sgmv", targets=(80, 90)) == records
    ((cmd, env),) = runs
    assert env["TRITON_INTERPRET"] == "0"
    assert cmd[1:3] == ["-m", "lora_kernels.triton.aot"]
    assert cmd[cmd.index("--module") + 1] == "sgmv" and cmd[cmd.index("--json") + 1] == "-"
    assert cmd[cmd.index("--cc") + 1:][:2] == ["80", "90"]
    # the checkout under test, ahead of any other copy on the caller's PYTHONPATH, is what the subprocess imports
    assert env["PYTHONPATH"].split(os.pathsep) == [str(Path(aot.__file__).resolve().parents[2]), "/elsewhere"]


def test_run_gate_without_records_raises_with_the_output(monkeypatch):
    """A subprocess that dies before printing its records (an import error, say) fails the gate with what it
    printed, rather than passing with no records."""
    import subprocess

    def run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="importing sgmv\n",
                                           stderr="ImportError: cannot import name '_sgmv_kernel'\n")

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(RuntimeError, match=r"(?s)exit 1.*importing sgmv.*cannot import name '_sgmv_kernel'"):
        aot.run_gate("sgmv")


def _kernel_names(module):
    return {name for name in dir(module) if name.startswith("_") and name.endswith("_kernel")}


def test_every_kernel_module_is_gated():
    """A new kernel module must be listed in SPEC_MODULES, or the gate never compiles its kernels."""
    import pkgutil

    import lora_kernels.triton as package

    with_kernels = {info.name for info in pkgutil.iter_modules(package.__path__)
                    if _kernel_names(importlib.import_module(f"lora_kernels.triton.{info.name}"))}
    assert with_kernels and with_kernels <= set(aot.SPEC_MODULES), (with_kernels, aot.SPEC_MODULES)
    assert aot.TARGETS == (80, 90)


@pytest.mark.parametrize("module", aot.SPEC_MODULES if HAS_TRITON else [])
def test_specs_cover_every_kernel_of_the_module(module):
    """Every `_*_kernel` of a gated module has at least one spec, every signature names exactly the kernel's
    arguments, and constexprs are marked so (checked in-process: building the specs needs no compiler)."""
    mod = importlib.import_module(f"lora_kernels.triton.{module}")
    specs = mod.aot_specs()
    assert {spec["kernel"].__name__ for spec in specs} == _kernel_names(mod)
    for spec in specs:
        assert set(spec["signature"]) == set(spec["kernel"].arg_names), spec["name"]
        for name in spec["constexprs"]:
            assert spec["signature"][name] == "constexpr", (spec["name"], name)
    names = [spec["name"] for spec in specs]
    assert len(names) == len(set(names)), "duplicate specs"


def test_all_specs_records_each_specs_module():
    """The gate's records name the module of each kernel (the module whose specs listed it), so a failure points at
    the file to fix."""
    specs = aot.all_specs()
    assert {spec["module"] for spec in specs} == set(aot.SPEC_MODULES)
    for spec in specs:
        module = importlib.import_module(f"lora_kernels.triton.{spec['module']}")
        assert spec["kernel"].__name__ in _kernel_names(module), (spec["name"], spec["module"])
    assert len(specs) == sum(len(aot.module_specs(name)) for name in aot.SPEC_MODULES)


FAKE_PTXAS = """#!/bin/sh
# ptxas as Triton and register_usage call it: --version (Triton's check of the binary), then -arch=... -v in -o out
if [ "$1" = "--version" ]; then echo "Cuda compilation tools, release 12.9, V12.9.86"; exit 0; fi
echo "$@" >> "$(dirname "$0")/calls"
cp "$3" "$(dirname "$0")/input.ptx"
cat >&2 <<'REPORT'
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_k_kernel' for 'sm_90a'
ptxas info    : Function properties for _k_kernel
    24 bytes stack frame, 16 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 400 bytes cmem[0]
REPORT
"""


def test_register_usage_reads_ptxas_report(monkeypatch, tmp_path):
    """register_usage runs the ptxas Triton would (Triton's knobs pointed at a stand-in that prints ptxas -v's
    report), for sm_90a on Hopper (wgmma and TMA need the 'a' target), and reads registers and both spill counts
    from the report. Both knobs: from triton 3.9 on, sm_90 compiles with ptxas-blackwell
    (TRITON_PTXAS_BLACKWELL_PATH), before it with ptxas (TRITON_PTXAS_PATH)."""
    ptxas = tmp_path / "ptxas"
    ptxas.write_text(FAKE_PTXAS)
    ptxas.chmod(0o755)
    monkeypatch.setenv("TRITON_PTXAS_PATH", str(ptxas))
    monkeypatch.setenv("TRITON_PTXAS_BLACKWELL_PATH", str(ptxas))
    assert aot.ptxas_path(90) == str(ptxas)
    assert aot.register_usage(".version 8.7\n.target sm_90a\n" + WGMMA_PTX, 90) == (168, 16, 20)
    assert aot.register_usage(".version 8.7\n.target sm_80\n", 80) == (168, 16, 20)
    calls = [line.split() for line in (tmp_path / "calls").read_text().splitlines()]
    assert [(call[0], call[1]) for call in calls] == [("-arch=sm_90a", "-v"), ("-arch=sm_80", "-v")]
    assert (tmp_path / "input.ptx").read_text() == ".version 8.7\n.target sm_80\n"  # the PTX, as given


def test_register_usage_fails_without_a_report(monkeypatch, tmp_path):
    """ptxas refusing the PTX (so printing no usage) is an error that shows its message, not zero registers."""
    ptxas = tmp_path / "ptxas"
    ptxas.write_text("#!/bin/sh\necho 'ptxas fatal   : Unresolved extern function' >&2\nexit 255\n")
    ptxas.chmod(0o755)
    monkeypatch.setattr(aot, "ptxas_path", lambda cc: str(ptxas))
    with pytest.raises(RuntimeError, match="exit 255.*Unresolved extern function"):
        aot.register_usage(".version 8.7\n", 80)


def test_main_refuses_a_selection_it_cannot_gate(monkeypatch):
    """A --match that selects nothing, or a capability without a known shared memory limit, is a usage error:
    the first exited 0 having compiled nothing, the second with a KeyError traceback."""
    calls, _ = _main_with_stand_ins(monkeypatch)
    for argv in (["--match", "no-such-kernel"], ["--cc", "100"]):
        with pytest.raises(SystemExit) as exit_info:
            aot.main([*argv, "--jobs", "1"])
        assert exit_info.value.code == 2, argv
    assert calls == []
