"""The CUDA kernels written without a GPU run on the CPU: the grouped ops' kernels (csrc/cuda/sgmv.cu), the
decode forward and the dY-once backward (csrc/cuda/lora_linear.cu), with the loads and fragment helpers of
csrc/cuda/tensor_core.h, are cut out of the files verbatim and compiled as C++ with stand-ins for the CUDA built-ins
they use (tests/cuda_emulation/emu.h: a thread per CUDA thread, barriers for __syncthreads and __syncwarp, warp
shuffles and the warp-wide MMAs, whose fragment layouts emu.h restates from the PTX ISA; after each block barrier
warp 0 runs ahead to the next before the other warps go on, so a missing barrier before shared memory is
overwritten shows). The race check builds the kernel harnesses with ThreadSanitizer, which orders the threads'
accesses as CUDA does (__syncthreads and __syncwarp order them, the shuffles and MMAs do not), so a missing
__syncwarp shows too, where the MMAs (which wait for every lane) kept a run's results right. The address check
builds the harnesses' full runs with AddressSanitizer, so a read or write outside a buffer stops them as a GPU's
illegal address would, also where no output takes the value read (a row past M). Six harnesses run whole
launches on integer-valued data against a float64 reference, bit for bit (the expands' output columns outside
their slice too, which hold -0.0: an added zero shows): decode_kernels.cpp the grouped
one-token-per-block decode kernels, sgmv_mma.cpp the grouped tensor-core shrink and expand of a prefill batch,
sgmv_cuda_core.cpp the grouped CUDA-core kernel (float32, float64 and rows 16-byte loads cannot read whole),
bad_metadata.cpp the grouped kernels on out-of-range ranks, slot ranges and token ids that their clamps make mean a
valid batch's, lora_fwd_decode.cpp lora_fwd's decode shrink and its tensor-core and CUDA-core forward kernels,
lora_bwd_dy.cpp lora_bwd_dy's tensor-core and CUDA-core kernels.

Two more harnesses run the launchers themselves (launchers_lora_linear.cpp, launchers_sgmv.cpp): the whole of
lora_linear.cu or sgmv.cu compiled as host C++ against the CPU libtorch, its launches rewritten into emulated ones
(launcher_sources) and its CUDA runtime calls answered by tests/cuda_emulation/host_stubs/ (the SM count, the
architecture the kernels' image was compiled for, programmatic dependent launches, CUDA's launch-configuration
limits). Each case calls a launcher on CPU tensors and checks which kernels it launched (with their bool arguments: the
16-byte load switches) and its outputs against a
float64 reference, exactly: the dispatch (decode or GEMM path, tensor or CUDA cores, bgmv or sgmv, float64), what
the launchers build (contiguous copies, the re-aligned transposed lora_b, partials and their sums) and pass, and
their ATen compositions, with cuBLAS's GEMMs stood in for (launchers_lora_linear.cpp: fp32 accumulation, and BLAS's
alpha = 0 / beta = 0 rules).

This checks the kernels' index arithmetic, masking and split/grid logic, their bounds, their barriers, and the
launchers' host code, on every CI run, without a GPU, and that grid_sizing.h's K-split tiling gives each split the
fewest tiles that keep within the splits asked for (one tile more gives the same results on fewer SMs); not their
speed, the rest of the GPU memory model (launches run one after another: a programmatic dependent launch's overlap
is not emulated), the compiler's code for the GPU or the PTX layouts themselves (the GPU tests in test_cpp_ops.py check those on a GPU)."""
import os
import re
import shutil
import subprocess
import warnings

import pytest
import torch.utils.cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC_CUDA = os.path.join(HERE, os.pardir, "csrc", "cuda")

# What each harness's kernels need, as (file, where a section starts, the text that ends it): tensor_core.h's
# alignment check, loads and fragment helpers, without the inline PTX (emu.h has stand-ins); grid_sizing.h's
# ceil_div and K-split tiling; sgmv.cu's anonymous namespace up to its launches, without dtype_code (it takes an
# at::Tensor); lora_linear.cu's decode kernels and split, up to the dispatch macro; its tensor-core backward kernel
# and grid, up to the partial sums. The CUDA launches stay out (the harnesses restate the grids).
TENSOR_CORE = [
    ("tensor_core.h", "inline bool aligned16", "// d += a · b for one m16n8k16 tile"),
    ("tensor_core.h", "// d += the products over one 32-wide chunk", "// d += a · b for one m16n8k8 tile"),
]
# grid_sizing.h's arithmetic (ceil_div, the K-splits' tiling) from its end: the rest of it asks the CUDA runtime.
GRID_SIZING = [("grid_sizing.h", "inline int64_t ceil_div", "}  // namespace lora_kernels")]
COMMON = TENSOR_CORE + GRID_SIZING
SGMV = COMMON + [("sgmv.cu", "constexpr int kTileTokens", "// ---- launches ---")]
SECTIONS = {
    "decode_kernels": SGMV,
    "sgmv_mma": SGMV,
    "sgmv_cuda_core": SGMV,
    "bad_metadata": SGMV,
    "lora_fwd_decode": COMMON + [("lora_linear.cu", "constexpr int kWarpSize", "#define LK_DISPATCH_FLOAT")],
    "lora_bwd_dy": COMMON + [("lora_linear.cu", "// ---- backward ---", "// Elements of T in one 16-byte vector"),
                             ("lora_linear.cu", "// ---- lora_bwd_dy ---",
                              "// (dB, dS) from the kernels' block partials")],
}
HARNESS_SOURCE = {"decode_kernels": "sgmv.cu", "sgmv_mma": "sgmv.cu", "sgmv_cuda_core": "sgmv.cu",
                  "bad_metadata": "sgmv.cu", "lora_fwd_decode": "lora_linear.cu", "lora_bwd_dy": "lora_linear.cu"}


def read_sources():
    sources = {}
    for name in ("tensor_core.h", "grid_sizing.h", "sgmv.cu", "lora_linear.cu"):
        with open(os.path.join(CSRC_CUDA, name)) as f:
            sources[name] = f.read()
    return sources


def cut_sections(sources, sections):
    parts = []
    for name, start, end in sections:
        source = sources[name]
        assert source.count(start) == 1, f"{name}: expected one {start!r} (has the file been reorganised?)"
        begin = source.index(start)
        assert end in source[begin:], f"{name}: no {end!r} after {start!r}"
        parts.append(source[begin:source.index(end, begin)])
    return "".join(parts)


def extract_kernels(sources, harness):
    code = cut_sections(sources, SECTIONS[harness])
    if HARNESS_SOURCE[harness] == "sgmv.cu":
        code, removed = re.subn(r"// The dtypes were validated.*?\n}\n", "", code, flags=re.S)
        assert removed == 1, "sgmv.cu: dtype_code not found where expected"
    # dynamic shared memory: a static buffer of emu.h's (one block runs at a time)
    return re.sub(r"extern __shared__ float (\w+)\[\];", r"float* \1 = g_dynamic_shared;", code)


# The launcher harnesses compile the whole of a .cu file as host C++, each against its launchers' harness:
# launchers_lora_linear.cpp, launchers_sgmv.cpp (tests/cuda_emulation/host_stubs/ answers the CUDA runtime calls).
LAUNCHER_HARNESSES = {"launchers_lora_linear": "lora_linear.cu", "launchers_sgmv": "sgmv.cu"}
# kernel<<<grid, block, shared, stream>>>(args): the kernel a name, a template instance or a variable.
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\(", re.S)


def launcher_sources(sources):
    """The files a launcher harness includes: both .cu files with every `kernel<<<config>>>(args)` rewritten into
    `emulated_launch("kernel", kernel, config)(args)` (recorded and run by emu.h's emulation) and their dynamic shared
    memory pointed at emu.h's buffer, and a tensor_core.h of the loads and fragment helpers without the inline PTX
    (emu.h has stand-ins), which the .cu files' #include "tensor_core.h" finds beside them. Nothing else changes."""
    files = {"tensor_core.h": "#pragma once\n#include <c10/util/BFloat16.h>\n#include <c10/util/Half.h>\n"
                              "namespace lora_kernels {\n" + cut_sections(sources, TENSOR_CORE) + "}\n"}
    for name in LAUNCHER_HARNESSES.values():
        code = sources[name]
        code, launches = LAUNCH.subn(r'emulated_launch("\1", \1, \2)(', code)
        assert launches == sources[name].count("<<<") and launches > 0 and "<<<" not in code, name
        code, shared = re.subn(r"extern __shared__ float (\w+)\[\];", r"float* \1 = g_dynamic_shared;", code)
        assert shared == sources[name].count("extern __shared__"), name
        files[name] = code
    return files


def build_and_run(tmp_path, harness, sources, *args, race_check=False, address_check=False):
    """Build the harness and run it: (exit code, stdout, stderr). race_check: with ThreadSanitizer (see RACE_EXIT).
    address_check: with AddressSanitizer, which stops the run (exit code ADDRESS_EXIT) at the first access outside
    a buffer (harness.h poisons its aligned storages' slack), as a GPU stops at an illegal address: the results alone
    do not show a read past a buffer whose values no output takes (a row past M, a column past N). Where the compiler
    cannot link AddressSanitizer the run goes on without it, with a warning."""
    assert not (race_check and address_check), "ThreadSanitizer and AddressSanitizer do not combine"
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler")
    launchers = harness in LAUNCHER_HARNESSES
    if launchers:
        for name, text in launcher_sources(sources).items():
            (tmp_path / name).write_text(text)
    else:
        (tmp_path / "extracted.h").write_text(extract_kernels(sources, harness))
    torch_lib = torch.utils.cpp_extension.TORCH_LIB_PATH
    binary = tmp_path / harness
    includes = [f"-I{path}" for path in torch.utils.cpp_extension.include_paths()]
    # The launcher harnesses: the CUDA stand-ins first (they shadow c10/cuda's headers), the rewritten .cu files and
    # tensor_core.h, then grid_sizing.h and launchers.h as they are; linked against libtorch_cpu (ATen).
    stubs = [f"-I{HERE}/cuda_emulation/host_stubs"] if launchers else []
    sources_dir = [f"-I{CSRC_CUDA}"] if launchers else []
    libraries = ["-ltorch_cpu", "-lc10"] if launchers else ["-lc10"]
    # -fsanitize=alignment: a misaligned 16-byte access (a fault on a GPU) stops the run (emu.h's uint4)
    # race_check: built with ThreadSanitizer (the race check: see emu.h's Unordered), -g for its reports' lines
    race = ["-fsanitize=thread", "-g"] if race_check else []
    address = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"] if address_check else []

    def build(sanitizers):
        return subprocess.run([compiler, "-std=c++20", "-O1", "-pthread", "-fsanitize=alignment",
                               "-fno-sanitize-recover=alignment", *sanitizers, *stubs, f"-I{tmp_path}",
                               f"-I{HERE}/cuda_emulation", *sources_dir, *includes,
                               os.path.join(HERE, "cuda_emulation", f"{harness}.cpp"), "-o", str(binary),
                               f"-L{torch_lib}", *libraries, f"-Wl,-rpath,{torch_lib}"],
                              capture_output=True, text=True, timeout=300)

    built = build(race + address)
    if race_check and built.returncode != 0 and "tsan" in built.stderr:
        pytest.skip(f"the compiler cannot link ThreadSanitizer: {built.stderr[-300:]}")
    if address_check and built.returncode != 0 and "asan" in built.stderr:
        warnings.warn(f"{harness} built without the address check: the compiler cannot link AddressSanitizer "
                      f"({built.stderr[-300:]})")
        address, built = [], build(race)
    assert built.returncode == 0, built.stderr[-3000:]
    # the race check: the first race stops the run, with exit code RACE_EXIT and its report on stderr; the address
    # check likewise with ADDRESS_EXIT (no leak report: libtorch keeps its registries to the end)
    env = None
    if race_check:
        env = dict(os.environ, TSAN_OPTIONS=f"halt_on_error=1 exitcode={RACE_EXIT}")
    elif address:
        env = dict(os.environ, ASAN_OPTIONS=f"halt_on_error=1:detect_leaks=0:exitcode={ADDRESS_EXIT}")
    run = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=600, env=env)
    if race_check and "FATAL: ThreadSanitizer" in run.stderr:  # e.g. a kernel's address-space layout it cannot map
        pytest.skip(f"ThreadSanitizer cannot run here: {run.stderr[-300:]}")
    return run.returncode, run.stdout, run.stderr


RACE_EXIT = 66
ADDRESS_EXIT = 67
# The kernel harnesses' `quick` case counts (their main()s), which the race check and the broken-kernel tests run
QUICK_CASES = {"decode_kernels": 6, "sgmv_mma": 6, "sgmv_cuda_core": 6, "lora_fwd_decode": 2, "lora_bwd_dy": 4}


@pytest.mark.parametrize("harness,cases", [("decode_kernels", 48), ("sgmv_mma", 36), ("sgmv_cuda_core", 31),
                                           ("lora_fwd_decode", 16), ("lora_bwd_dy", 15)])
def test_cuda_kernels_match_the_reference_on_the_cpu(tmp_path, harness, cases):
    """Every case's results, and every access inside its buffers (the address check)."""
    returncode, output, errors = build_and_run(tmp_path, harness, read_sources(), address_check=True)
    assert returncode == 0 and output.splitlines()[-1] == f"{cases} cases, 0 failures", (output[-3000:],
                                                                                          errors[-3000:])


@pytest.mark.parametrize("harness,cases", [("launchers_lora_linear", 49), ("launchers_sgmv", 43)])
def test_cuda_launchers_dispatch_and_match_the_reference_on_the_cpu(tmp_path, harness, cases):
    """The launchers themselves (lora_fwd_cuda_launch, lora_bwd_dy_cuda_launch, sgmv_shrink_cuda_launch,
    sgmv_expand_cuda_launch), the whole .cu file compiled as host C++ on CPU tensors: which kernels they launch for
    each dtype, layout, size and compiled architecture, what they build and pass them, and the ATen paths; every
    access inside the tensors (the address check)."""
    returncode, output, errors = build_and_run(tmp_path, harness, read_sources(), address_check=True)
    assert returncode == 0 and output.splitlines()[-1] == f"{cases} cases, 0 failures", (output[-3000:],
                                                                                          errors[-3000:])


@pytest.mark.parametrize("harness,args,old,new,failure", [
    # lora_bwd_dy: the transposed lora_b used as it is when its .t().contiguous() is a misaligned view (a GPU faults
    # on its 16-byte loads: the bug a GPU run found)
    ("launchers_lora_linear", ["quick"], "  if (!aligned16(bt.data_ptr())) bt = bt.clone();\n", "",
     "misaligned address"),
    # sgmv_expand: a float64 out on the decode kernel, which accumulates and adds in float32
    ("launchers_sgmv", [], "if (args.out_dtype != kF64 && expand_rows_of_16_bytes(args)",
     "if (expand_rows_of_16_bytes(args)", "expand bf16 decode to fp64: launched [bgmv_expand_kernel<BF>]"),
    # lora_fwd's GEMM path passing BLAS an alpha of 0 at scaling 0, which drops a NaN/Inf of the LoRA term
    ("launchers_lora_linear", [], "const bool zero_scaling = scaling == 0.0;", "const bool zero_scaling = false;",
     "fwd gemm scaling 0 Inf: y:"),
    # lora_fwd's decode path keeping a contiguous x one element into its buffer, which takes the CUDA-core forward
    ("launchers_lora_linear", [], "  return aligned16(c.data_ptr()) ? c : c.clone();", "  return c;",
     "fwd bf16 M=4 x misaligned: launched [lora_shrink_splitk_kernel<c10::BFloat16, 4>, "
     "lora_fwd_decode_kernel<c10::BFloat16, 4>]"),
    # ... and a separate x_lora so, which the shrink then reads element by element (same kernels, same results)
    ("launchers_lora_linear", [], "contiguous_aligned16(*x_lora_opt)", "x_lora_opt->contiguous()",
     "fwd bf16 M=4 x, x_lora misaligned: bool arguments [false][], expected [true][]"),
], ids=["bwd-dy-misaligned-bt", "expand-fp64-decode", "gemm-zero-scaling", "decode-misaligned-x",
        "decode-misaligned-x-lora"])
def test_the_launcher_emulation_fails_a_broken_launcher(tmp_path, harness, args, old, new, failure):
    """The launcher harnesses are not vacuous: a dropped alignment fix-up, dispatch condition or composition step
    in a launcher fails them."""
    sources = read_sources()
    cu_file = LAUNCHER_HARNESSES[harness]
    assert sources[cu_file].count(old) == 1, old
    sources[cu_file] = sources[cu_file].replace(old, new)
    returncode, output, errors = build_and_run(tmp_path, harness, sources, *args)
    assert returncode != 0 and failure in output + errors, (output[-2000:], errors[-2000:])


@pytest.mark.parametrize("harness,old,new", [
    # the decode shrink: a lane's K chunks strided by 1 instead of by the 32 lanes (x and A chunks no longer match)
    ("decode_kernels", "const int64_t k = k_begin + int64_t(lane + 32 * i) * kVec;",
     "const int64_t k = k_begin + int64_t(lane * kDecodeChunks + i) * kVec;"),
    # the decode expand: every column one to the right
    ("decode_kernels", "const int64_t n = n0 + int64_t(c) * kDecodeThreads;\n      const bool ok",
     "const int64_t n = n0 + int64_t(c) * kDecodeThreads + 1;\n      const bool ok"),
    # the tensor-core shrink: the accumulators' rank columns swapped in pairs
    ("sgmv_mma", "2 * t + i % 2;\n      if (token >= 0 && col < rank)",
     "2 * t + 1 - i % 2;\n      if (token >= 0 && col < rank)"),
    # the tensor-core expand: t's rank index and B's out of step
    ("sgmv_mma", "2 * t + e;\n          w[e]", "2 * t + 1 - e;\n          w[e]"),
    # the expand's staged epilogue: the accumulators' columns swapped in pairs on their way into shared memory
    ("sgmv_mma", "[8 * tile + 2 * t + i % 2] = acc[tile][i];", "[8 * tile + 2 * t + 1 - i % 2] = acc[tile][i];"),
    # ... and a lane adding the other half-row's 16 columns
    ("sgmv_mma", "&staged[warp][row][16 * half + chunk]", "&staged[warp][row][16 * (1 - half) + chunk]"),
    # the tensor-core decode forward: the accumulators' columns (rows of W) swapped in pairs
    ("lora_fwd_decode", "[8 * tile + 2 * t + i % 2] = acc[tile][i];",
     "[8 * tile + 2 * t + 1 - i % 2] = acc[tile][i];"),
    # the tensor-core backward: dy's transposed tile read at the same row for both k-slots of a lane
    ("lora_bwd_dy", "transposed[warp][8 * ks + t + 4][8 * ct + group]",
     "transposed[warp][8 * ks + t][8 * ct + group]"),
    # the grouped CUDA-core shrink: A's rank rows past ranks[slot] (NaN) read and written
    ("sgmv_cuda_core", "const int64_t cols = kShrink ? rank : args.cols_full;",
     "const int64_t cols = kShrink ? args.max_rank : args.cols_full;"),
    # ... and every K split summing all of K
    ("sgmv_cuda_core", "(kShrink && k_begin + args.k_per_split < kdim) ? k_begin + args.k_per_split : kdim",
     "kdim"),
    # the CUDA-core backward: dS of a block's later column pieces overwriting the earlier ones instead of adding
    ("lora_bwd_dy", "*dst = n0 == n_begin ? scaling * sum : *dst + scaling * sum;", "*dst = scaling * sum;"),
], ids=["decode-shrink-chunks", "decode-expand-columns", "mma-shrink-columns", "mma-expand-rank",
        "mma-expand-staged-columns", "mma-expand-staged-half", "mma-decode-forward", "mma-bwd-dy-transpose",
        "sgmv-shrink-rank-padding", "sgmv-shrink-splits", "bwd-dy-column-pieces"])
def test_the_emulation_fails_a_broken_kernel(tmp_path, harness, old, new):
    """The harnesses are not vacuous: one wrong index in any of the kernels fails them."""
    sources = read_sources()
    cu_file = HARNESS_SOURCE[harness]
    assert sources[cu_file].count(old) == 1, old
    sources[cu_file] = sources[cu_file].replace(old, new)
    returncode, output, _ = build_and_run(tmp_path, harness, sources, "quick")
    assert returncode == 1 and re.search(rf"^{QUICK_CASES[harness]} cases, [1-9]\d* failures$", output, re.M), (
        output[-3000:])


def test_the_emulation_fails_a_missing_barrier_before_shared_memory_is_overwritten(tmp_path):
    """emu.h runs warp 0 ahead after every block barrier, so a barrier missing before warp 0 overwrites what the other
    warps still read shows: lora_bwd_dy_mma_kernel without the one after dB's shared sum (its next column piece's
    sums overwrite it) passed every case under a fair schedule (helper 175). The full run: its blocks of several
    column pieces."""
    sources = read_sources()
    old = "    __syncthreads();  // db_sum is read before the next piece's warp 0 overwrites it\n"
    assert sources["lora_linear.cu"].count(old) == 1
    sources["lora_linear.cu"] = sources["lora_linear.cu"].replace(old, "")
    returncode, output, _ = build_and_run(tmp_path, "lora_bwd_dy", sources)
    assert returncode == 1 and re.search(r"^15 cases, [1-9]\d* failures$", output, re.M), output[-3000:]


@pytest.mark.parametrize("harness,cases", QUICK_CASES.items())
def test_the_cuda_kernels_have_no_data_race(tmp_path, harness, cases):
    """The race check: each harness's quick cases built with ThreadSanitizer, which orders the threads' accesses as
    CUDA does (emu.h's Unordered: __syncthreads and __syncwarp order shared memory, the shuffles and MMAs do not):
    no shared-memory write races another thread's read or write. (bad_metadata runs the kernels of
    decode_kernels, sgmv_mma and sgmv_cuda_core.)"""
    returncode, output, errors = build_and_run(tmp_path, harness, read_sources(), "quick", race_check=True)
    assert returncode == 0 and output.splitlines()[-1] == f"{cases} cases, 0 failures", errors[-4000:]


@pytest.mark.parametrize("harness,old,new,shared", [
    # sgmv_expand_mma_kernel's staged epilogue: a lane adds the columns other lanes staged
    ("sgmv_mma", "      __syncwarp();\n      if (row_token >= 0) {", "      if (row_token >= 0) {", "staged"),
    # ... and the next column tile's accumulators overwrite what other lanes still add
    ("sgmv_mma", "      __syncwarp();  // the next column tile overwrites staged\n", "", "staged"),
    # lora_bwd_dy_mma_kernel: a lane reads the dy tile other lanes transposed
    ("lora_bwd_dy", "      __syncwarp();\n      // dBᵀ's B operand", "      // dBᵀ's B operand", "transposed"),
    # ... and the next strip's tile overwrites what other lanes still read
    ("lora_bwd_dy", "      __syncwarp();  // every lane's reads are done before the next strip overwrites the buffer\n",
     "", "transposed"),
    # lora_bwd_dy_mma_kernel: warp 0 sums the next piece's dB into db_sum while other warps still write it out
    ("lora_bwd_dy", "    __syncthreads();  // db_sum is read before the next piece's warp 0 overwrites it\n", "",
     "db_sum"),
], ids=["expand-staged-written", "expand-staged-read", "bwd-dy-transposed-written", "bwd-dy-transposed-read",
        "bwd-dy-db-sum-reused"])
def test_the_race_check_fails_a_missing_barrier(tmp_path, harness, old, new, shared):
    """The race check is not vacuous: without any one of the kernels' __syncwarp calls a lane's shared-memory write
    races another lane's access of it, and without the __syncthreads before db_sum's reuse a warp's. A run's results
    do not show three of the four __syncwarp: the MMAs between the write and the other lane's read (or between the
    read and the next write) wait for every lane of the warp, which orders a run's accesses but not the GPU's (an MMA
    exchanges registers, not memory)."""
    sources = read_sources()
    cu_file = HARNESS_SOURCE[harness]
    assert sources[cu_file].count(old) == 1, old
    sources[cu_file] = sources[cu_file].replace(old, new)
    returncode, output, errors = build_and_run(tmp_path, harness, sources, "quick", race_check=True)
    assert returncode == RACE_EXIT and "ThreadSanitizer: data race" in errors and f"::{shared}' " in errors, (
        output[-2000:], errors[-4000:])


@pytest.mark.parametrize("harness,args,old,new", [
    # the decode forward's rows of x past M: read again from the last valid row, as the kernels' comment promises
    ("lora_fwd_decode", ["quick"], "return x + int64_t(m < M ? m : M - 1) * ldx;", "return x + int64_t(m) * ldx;"),
    # ... and its rows of W past N (the full run: N not a multiple of the rows a warp takes)
    ("lora_fwd_decode", [], "w_rows[rr] = w + (row0 + rr < num_rows ? row0 + rr : num_rows - 1) * ldw;",
     "w_rows[rr] = w + (row0 + rr) * ldw;"),
    # the grouped tensor-core kernels' token ids at or past M in a slot's range (bad_metadata's bad ids): used as rows
    ("bad_metadata", [], "tokens[h] = token >= 0 && token < args.num_tokens ? token : -1;",
     "tokens[h] = token >= 0 ? token : -1;"),
    # ... and a slot start below 0, unclamped: the slot's range starts before sorted_token_ids
    ("bad_metadata", [], "start = start < 0 ? 0 : (start > args.num_tokens ? args.num_tokens : start);",
     "start = start > args.num_tokens ? args.num_tokens : start;"),
], ids=["x-rows-past-m", "w-rows-past-n", "grouped-token-ids-past-m", "grouped-slot-start-below-0"])
def test_the_address_check_stops_a_read_past_a_buffer(tmp_path, harness, args, old, new):
    """The address check is not vacuous: without the clamps that keep the decode forward's loads of rows past M (x)
    or past N (W) inside the buffers, its results stay right (those rows' sums are never stored: the emulation
    without the check passed both), and the run stops at the first such read; so it does where the grouped kernels
    take bad metadata (a token id past M, a slot start below 0) unclamped, whose results bad_metadata compares too."""
    sources = read_sources()
    cu_file = HARNESS_SOURCE[harness]
    assert sources[cu_file].count(old) == 1, old
    sources[cu_file] = sources[cu_file].replace(old, new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a build without the check would pass vacuously
        returncode, output, errors = build_and_run(tmp_path, harness, sources, *args, address_check=True)
    assert returncode == ADDRESS_EXIT and "ERROR: AddressSanitizer" in errors and "READ of size" in errors, (
        output[-2000:], errors[-3000:])


def test_the_emulation_stops_a_misaligned_16_byte_access(tmp_path):
    """emu.h's uint4 is 16-byte aligned and the harnesses are built with -fsanitize=alignment, so a 16-byte access a
    GPU would fault on stops the run (x86 alone takes it): the expand's staged epilogue without its row-stride and
    slice-start checks runs for the harness's unaligned outputs (rows of 309 elements, the slice at column 5)."""
    sources = read_sources()
    old = "(args.out_stride_t & (per16 - 1)) == 0 &&\n                          (args.col_offset & (per16 - 1)) == 0 &&"
    assert sources["sgmv.cu"].count(old) == 1
    sources["sgmv.cu"] = sources["sgmv.cu"].replace(old, "")
    returncode, output, errors = build_and_run(tmp_path, "sgmv_mma", sources, "quick")
    assert returncode != 0 and "misaligned address" in errors, (output[-2000:], errors[-2000:])


def test_the_cuda_decode_path_rule_is_the_triton_one():
    """sgmv.cu says its decode bounds are the Triton kernels' (lora_kernels/triton/sgmv.py, choose_path)."""
    from lora_kernels.triton import sgmv as triton_sgmv
    bounds = dict(re.findall(r"constexpr int64_t (kDecodeMaxTokens(?:PerSlot)?) = (\d+);", read_sources()["sgmv.cu"]))
    assert bounds == {"kDecodeMaxTokens": str(triton_sgmv.DECODE_MAX_TOKENS),
                      "kDecodeMaxTokensPerSlot": str(triton_sgmv.DECODE_MAX_TOKENS_PER_SLOT)}


def test_the_emulation_restates_the_launch_constants_as_the_sources_define_them():
    """emu.h restates what the kernels take from grid_sizing.h and launchers.h (which include CUDA headers): a
    changed value there must change the emulated grids too."""
    def constants(text):
        return dict(re.findall(r"constexpr (?:int|int64_t) (k\w+) = (\d+);", text))

    restated = constants(open(os.path.join(HERE, "cuda_emulation", "emu.h")).read())
    defined = {}
    for name in ("grid_sizing.h", "launchers.h"):
        with open(os.path.join(CSRC_CUDA, name)) as f:
            defined.update(constants(f.read()))
    shared = {"kBlocksPerSm", "kSgmvTileTokens", "kMaxGridYZ"}
    assert shared <= restated.keys() and shared <= defined.keys()
    assert {k: restated[k] for k in shared} == {k: defined[k] for k in shared}


# Prints split_k_in_tiles(k, tile, wanted) over a sweep, one "k tile wanted splits k_per_split" line each.
K_SPLIT_SWEEP = r"""
#include <algorithm>
#include <cstdint>
#include <cstdio>
namespace lora_kernels {
%s
}  // namespace lora_kernels
int main() {
  for (long long k = 0; k <= 600; ++k)
    for (long long tile : {1, 8, 32, 256})
      for (long long wanted = 0; wanted <= 40; ++wanted) {
        const lora_kernels::KSplit s = lora_kernels::split_k_in_tiles(k, tile, wanted);
        std::printf("%%lld %%lld %%lld %%lld %%lld\n", k, tile, wanted, (long long)s.splits, (long long)s.k_per_split);
      }
}
"""


def k_split_sweep(tmp_path, grid_sizing):
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler")
    source = tmp_path / "k_split_sweep.cpp"
    source.write_text(K_SPLIT_SWEEP % cut_sections({"grid_sizing.h": grid_sizing}, GRID_SIZING))
    binary = tmp_path / "k_split_sweep"
    built = subprocess.run([compiler, "-std=c++20", "-O1", str(source), "-o", str(binary)], capture_output=True,
                           text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300, check=True)
    return [tuple(map(int, line.split())) for line in run.stdout.splitlines()]


def k_split_faults(rows):
    """The rows of a split_k_in_tiles sweep that break its contract, each with what it breaks. Beyond covering K in
    whole tiles with no empty split (which the harnesses' results check), the kernels' speed rests on the split being
    as wide as `wanted` allows: each split takes the fewest tiles with which at most `wanted` splits cover K (a split
    of one tile more leaves SMs idle, and the results stay right)."""
    faults = []
    for k, tile, wanted, splits, per_split in rows:
        wanted_splits = max(wanted, 1)
        tiles_per_split, rest = divmod(per_split, tile)
        if rest or tiles_per_split < 1:
            faults.append((k, tile, wanted, splits, per_split, "not a whole number of tiles"))
        elif splits != max(-(-k // per_split), 1):
            faults.append((k, tile, wanted, splits, per_split, "not ceil(K / k_per_split) splits (an empty one?)"))
        elif splits > wanted_splits:
            faults.append((k, tile, wanted, splits, per_split, "more splits than wanted"))
        elif tiles_per_split > 1 and -(-k // (per_split - tile)) <= wanted_splits:
            faults.append((k, tile, wanted, splits, per_split, "one tile fewer per split would do"))
    return faults


def test_the_k_split_takes_the_fewest_tiles_per_split_within_the_wanted_count(tmp_path):
    rows = k_split_sweep(tmp_path, read_sources()["grid_sizing.h"])
    assert len(rows) == 601 * 4 * 41
    assert k_split_faults(rows) == []


@pytest.mark.parametrize("old,new,fault", [
    # a tile more per split wherever the tiles divide evenly among the wanted splits (correct results, fewer splits)
    ("ceil_div(tiles, std::max<int64_t>(wanted, 1))", "(tiles / std::max<int64_t>(wanted, 1) + 1)",
     "one tile fewer per split would do"),
    # the wanted count kept without recounting: empty splits past the end of K
    ("std::max<int64_t>(ceil_div(k, k_per_split), 1)", "std::max<int64_t>(wanted, 1)",
     "not ceil(K / k_per_split) splits (an empty one?)"),
], ids=["a-tile-more", "no-recount"])
def test_the_k_split_check_fails_a_broken_tiling(tmp_path, old, new, fault):
    grid_sizing = read_sources()["grid_sizing.h"]
    assert grid_sizing.count(old) == 1, old
    faults = k_split_faults(k_split_sweep(tmp_path, grid_sizing.replace(old, new)))
    assert faults and {row[-1] for row in faults} == {fault}, faults[:5]


def test_the_grouped_kernels_clamp_out_of_range_metadata(tmp_path):
    """sgmv.cu's clamps (ranks to [0, R], slot ranges to [0, M), token ids outside [0, M) skipped): a rank past R or
    below 0, a slot count past M, a slot start below 0 and token ids -1, -2, M and M + 1 in a slot's range give the
    valid batch's results, in every grouped kernel (bad_metadata.cpp), with every access inside the buffers (the
    address check)."""
    returncode, output, errors = build_and_run(tmp_path, "bad_metadata", read_sources(), address_check=True)
    assert returncode == 0 and output.splitlines()[-1] == "6 cases, 0 failures", (output[-3000:], errors[-3000:])
