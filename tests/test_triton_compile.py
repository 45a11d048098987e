"""The Triton compile gate (design.md §7): every kernel spec of every lora_kernels.triton module compiles for sm_80
and sm_90 with Triton's own compiler, within the target's shared memory. No GPU needed.

The compilation runs in a TRITON_INTERPRET=0 subprocess per module (the interpreter's kernels cannot be compiled);
a module that does not exist yet is skipped, one that exists and fails to import fails the gate.
"""

import importlib.util
from pathlib import Path

import pytest

from lora_kernels.triton import HAS_TRITON, INTERPRET, TRITON_ERROR

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason=f"triton not importable: {TRITON_ERROR}")

if HAS_TRITON:
    from lora_kernels.triton import aot


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
    import os
    import subprocess
    import sys
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
    env = dict(os.environ, TRITON_INTERPRET="0")
    repo_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
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
    import os
    import subprocess
    import sys
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
    env = dict(os.environ, TRITON_INTERPRET="0")
    repo_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "MISSING:" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    missing = proc.stdout.split("MISSING:", 1)[1].strip()
    assert missing == "[]", f"launched but never compiled by the gate: {missing}"
