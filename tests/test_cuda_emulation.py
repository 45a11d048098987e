"""The CUDA decode kernels of the grouped ops (csrc/cuda/sgmv.cu: bgmv_shrink_kernel, bgmv_expand_kernel) run on the
CPU: their source is cut out of the .cu file verbatim and compiled as C++ with stand-ins for the CUDA built-ins they
use (tests/cuda_emulation/emu.h: a thread per CUDA thread, barriers for __syncthreads and warp shuffles). The harness
(tests/cuda_emulation/decode_kernels.cpp) runs whole launches on integer-valued data against a float64 reference.

This checks the kernels' index arithmetic, masking and split/grid logic on every CI run, without a GPU; not their
speed, the GPU memory model or the compiler's code for the GPU (the GPU tests in test_cpp_ops.py do that on a GPU)."""
import os
import re
import shutil
import subprocess

import pytest
import torch.utils.cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
SGMV_CU = os.path.join(HERE, os.pardir, "csrc", "cuda", "sgmv.cu")

# What the kernels need from sgmv.cu, as (first line's start, the text that ends it): the constants, dtype codes,
# load/store helpers, SgmvArgs and slot helpers before the first kernel (without dtype_code, which takes an
# at::Tensor); the decode section; the split struct and the decode launchers' host helpers.
SECTIONS = [
    ("constexpr int kTileTokens", "template <bool kShrink, typename Acc>"),
    ("// ---- decode: one token per block", "struct ShrinkSplit {"),
    ("struct ShrinkSplit {", "// The shrink's K-split"),
    ("// The decode shrink's K-split", "// grid (M, grid_y)"),
]


def extract_decode_kernels(source):
    parts = []
    for start, end in SECTIONS:
        assert source.count(start) == 1, f"sgmv.cu: expected one {start!r} (has the file been reorganised?)"
        begin = source.index(start)
        assert end in source[begin:], f"sgmv.cu: no {end!r} after {start!r}"
        parts.append(source[begin:source.index(end, begin)])
    parts[0], removed = re.subn(r"// The dtypes were validated.*?\n}\n", "", parts[0], flags=re.S)
    assert removed == 1, "sgmv.cu: dtype_code not found where expected"
    return "".join(parts)


def build_and_run(tmp_path, source, *args):
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler")
    (tmp_path / "extracted.h").write_text(extract_decode_kernels(source))
    torch_lib = torch.utils.cpp_extension.TORCH_LIB_PATH
    binary = tmp_path / "decode_kernels"
    includes = [f"-I{path}" for path in torch.utils.cpp_extension.include_paths()]
    build = subprocess.run([compiler, "-std=c++20", "-O1", "-pthread", f"-I{tmp_path}", f"-I{HERE}/cuda_emulation",
                            *includes, os.path.join(HERE, "cuda_emulation", "decode_kernels.cpp"), "-o", str(binary),
                            f"-L{torch_lib}", "-lc10", f"-Wl,-rpath,{torch_lib}"],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=600)
    return run.returncode, run.stdout


def test_cuda_decode_kernels_match_the_reference_on_the_cpu(tmp_path):
    with open(SGMV_CU) as f:
        source = f.read()
    returncode, output = build_and_run(tmp_path, source)
    assert returncode == 0 and output.splitlines()[-1] == "48 cases, 0 failures", output[-3000:]


@pytest.mark.parametrize("old,new", [
    # the shrink: a lane's K chunks strided by 1 instead of by the 32 lanes (x and A chunks no longer match)
    ("const int64_t k = k_begin + int64_t(lane + 32 * i) * kVec;",
     "const int64_t k = k_begin + int64_t(lane * kDecodeChunks + i) * kVec;"),
    # the expand: every column one to the right
    ("const int64_t n = n0 + int64_t(c) * kDecodeThreads;\n      const bool ok",
     "const int64_t n = n0 + int64_t(c) * kDecodeThreads + 1;\n      const bool ok"),
], ids=["shrink-chunks", "expand-columns"])
def test_the_emulation_fails_a_broken_kernel(tmp_path, old, new):
    """The harness is not vacuous: one wrong index in either kernel fails it."""
    with open(SGMV_CU) as f:
        source = f.read()
    assert source.count(old) == 1, old
    returncode, output = build_and_run(tmp_path, source.replace(old, new), "quick")
    assert returncode == 1 and re.search(r"^6 cases, [1-9]\d* failures$", output, re.M), output[-3000:]


def test_the_cuda_decode_path_rule_is_the_triton_one():
    """sgmv.cu says its decode bounds are the Triton kernels' (lora_kernels/triton/sgmv.py, choose_path)."""
    from lora_kernels.triton import sgmv as triton_sgmv
    with open(SGMV_CU) as f:
        source = f.read()
    bounds = dict(re.findall(r"constexpr int64_t (kDecodeMaxTokens(?:PerSlot)?) = (\d+);", source))
    assert bounds == {"kDecodeMaxTokens": str(triton_sgmv.DECODE_MAX_TOKENS),
                      "kDecodeMaxTokensPerSlot": str(triton_sgmv.DECODE_MAX_TOKENS_PER_SLOT)}
