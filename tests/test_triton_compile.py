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
        dtypes = {spec["signature"].get("x_ptr", spec["signature"].get("dy_ptr")) for spec in specs
                  if spec["kernel"].__name__ == kernel}
        assert dtypes == {"*bf16", "*fp16", "*fp32"}, (kernel, dtypes)


def test_missing_module_is_skipped():
    assert aot.module_specs("no_such_module_here") == []


@pytest.mark.skipif(not INTERPRET, reason="only the interpreter's kernels are refused")
def test_interpreted_kernel_is_refused_with_a_clear_error():
    from lora_kernels.triton import lora_linear

    spec = lora_linear.aot_specs()[0]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.compile_spec(spec, 80)
