"""Builds the C++/CUDA extension `lora_kernels._C`; the metadata lives in pyproject.toml, but for the license and the
dependencies (a build requires the torch minor version it was compiled against).

CPU sources are always built. CUDA sources are built when torch is a CUDA build and a toolkit is found;
LORA_KERNELS_BUILD_CUDA=1 forces them (and fails loudly when impossible), =0 skips them.
TORCH_CUDA_ARCH_LIST overrides the default targets (sm_80 and sm_90a); set but empty, it is taken as unset.
"""

import glob
import os
import re
import shutil
import sys
from pathlib import Path

import setuptools
from setuptools import setup

ROOT = Path(__file__).resolve().parent
os.chdir(ROOT)  # the source globs below and setuptools' relative source paths, wherever the build is started from
DEFAULT_CUDA_ARCHS = "8.0;9.0a"


def _fail(message):
    sys.stderr.write(f"\nlora_kernels build error: {message}\n\n")
    raise SystemExit(1)


try:
    import torch  # noqa: F401
except ImportError:
    _fail(
        "torch is not importable here. An isolated build (pip's default, and python -m build's) does not see the "
        "torch you installed: build with pip install --no-build-isolation (python -m build --no-isolation), so the "
        "extension is compiled against that torch; without torch, install it first (pip install 'torch>=2.11'). "
        "scripts/install.sh does both."
    )


def _is_toolkit_root(path):
    return path is not None and (Path(path) / "bin" / "nvcc").exists() and (Path(path) / "include" / "cuda_runtime.h").exists()


def _find_cuda_home(torch_cuda_major=None):
    """The toolkit root, or None: CUDA_HOME, CUDA_PATH, the nvcc on PATH, else under /usr/local the first toolkit of
    torch's CUDA major version (cuda, then cuda-* newest first), else the first of those. torch guesses it from the
    nvcc on PATH, which may be a link or a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc -> guessed
    root /usr/local, which has no CUDA headers)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
        try:  # a wrapper script that execs the real nvcc: take the path it names
            text = Path(nvcc).read_text(errors="ignore")
            if len(text) < 4096:  # a wrapper script is a few lines; the real nvcc is a large binary
                for token in text.replace('"', " ").split():
                    if token.endswith("/bin/nvcc"):
                        candidates.append(str(Path(token).resolve().parent.parent))
        except OSError:
            pass
    versioned = glob.glob("/usr/local/cuda-*")  # newest first: cuda-13.0 before cuda-9.2 (not a text sort)
    installed = ["/usr/local/cuda"] + sorted(versioned, key=lambda p: [int(n) for n in re.findall(r"\d+", p)],
                                             reverse=True)
    # /usr/local/cuda linking another major version than torch's (cuda -> cuda-12.4 beside cuda-13.0 with a cu130
    # torch) made the build drop the CUDA sources although a matching toolkit was installed
    candidates += sorted(installed, key=lambda path: _toolkit_major(path) != torch_cuda_major)
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        named = os.environ.get(variable)
        if named and not _is_toolkit_root(named):  # a typo there would otherwise pick another toolkit unannounced
            print(f"lora_kernels: {variable}={named} is not a CUDA toolkit root (no bin/nvcc or "
                  f"include/cuda_runtime.h there); looking elsewhere", file=sys.stderr)
    for candidate in candidates:
        if _is_toolkit_root(candidate):
            return str(Path(candidate).resolve())
    return None


def _toolkit_major(cuda_home):
    """The CUDA major version of the toolkit at cuda_home (from cuda.h), or None."""
    try:
        text = (Path(cuda_home) / "include" / "cuda.h").read_text(errors="ignore")
    except OSError:
        return None
    match = re.search(r"#define\s+CUDA_VERSION\s+(\d+)", text)
    return int(match.group(1)) // 1000 if match else None


build_cuda_env = os.environ.get("LORA_KERNELS_BUILD_CUDA", "").strip()
if build_cuda_env not in ("", "0", "1"):
    _fail(f"LORA_KERNELS_BUILD_CUDA must be 0 or 1, got {build_cuda_env!r}")

torch_cuda_major = int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None
cuda_home = _find_cuda_home(torch_cuda_major) if build_cuda_env != "0" else None
if cuda_home:
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import.
    os.environ["CUDA_HOME"] = cuda_home

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

torch_has_cuda = torch.version.cuda is not None
# torch.utils.cpp_extension refuses a toolkit whose CUDA major version differs from torch's build.
toolkit_major = _toolkit_major(cuda_home) if cuda_home else None
version_mismatch = torch_has_cuda and toolkit_major is not None and toolkit_major != torch_cuda_major
mismatch_reason = (f"the CUDA toolkit at {cuda_home} is CUDA {toolkit_major}, torch {torch.__version__} was built "
                   f"with CUDA {torch.version.cuda}")
if build_cuda_env == "1":
    if not torch_has_cuda:
        _fail(f"LORA_KERNELS_BUILD_CUDA=1 but torch {torch.__version__} is a CPU-only build (torch.version.cuda is None).")
    if cuda_home is None:
        _fail("LORA_KERNELS_BUILD_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME to the toolkit root).")
    if version_mismatch:
        _fail(f"LORA_KERNELS_BUILD_CUDA=1 but {mismatch_reason}; install a matching toolkit or torch build.")
build_cuda = build_cuda_env != "0" and torch_has_cuda and cuda_home is not None and not version_mismatch

# What the binary was built against, which lora_kernels._ext checks at import: a wheel pip cached from another
# machine's build (its cache is keyed by the download, not by torch) may hold another torch's ABI or no CUDA.
# Integers: a string macro's quotes would not survive the ninja build's shell.
TORCH_MAJOR, TORCH_MINOR = (int(part) for part in torch.__version__.split(".")[:2])
if (TORCH_MAJOR, TORCH_MINOR) < (2, 11):
    _fail(f"lora_kernels needs torch >= 2.11 (the oldest it is tested with), this is torch {torch.__version__}: "
          f"install a newer one first (pip install 'torch>=2.11'), then build again.")
build_macros = [("LORA_KERNELS_BUILT_TORCH_MAJOR", str(TORCH_MAJOR)),
                ("LORA_KERNELS_BUILT_TORCH_MINOR", str(TORCH_MINOR))]

cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
# No -std flag: torch.utils.cpp_extension adds the standard its headers need (torch 2.14 requires C++20;
# an explicit -std=c++17 breaks the build against torch 2.14 headers).
cxx_flags = ["-O3"]
link_flags = []
if sys.platform.startswith("linux"):
    # OpenMP turns ATen's header-only at::parallel_for (the cpu backend's grouped decode loop) into threads; without
    # it the loop runs on the calling thread. torch's Linux wheels use OpenMP themselves and load their libgomp.so.1
    # first, so the extension shares that runtime and its thread count (torch.set_num_threads). Linux only: Apple's
    # clang has no -fopenmp.
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")

if build_cuda:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():  # set but empty (TORCH_CUDA_ARCH_LIST=) as unset:
        # torch reads an empty list as "the visible GPUs'" and failed with an IndexError on a machine without one
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    print(f"lora_kernels: building CPU + CUDA sources (CUDA_HOME={cuda_home}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
    extension = CUDAExtension(
        "lora_kernels._C",
        cpu_sources + cuda_sources,
        define_macros=[("LORA_KERNELS_WITH_CUDA", "1")] + build_macros,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        },
        extra_link_args=link_flags,
    )
else:
    # The code and its text chosen together; lora_kernels/_ext.py CUDA_SKIPPED_REASONS holds the same codes.
    skipped, reason = ((1, "LORA_KERNELS_BUILD_CUDA=0") if build_cuda_env == "0"
                       else (2, "torch is a CPU-only build") if not torch_has_cuda
                       else (3, "no CUDA toolkit found") if cuda_home is None else (4, mismatch_reason))
    print(f"lora_kernels: building CPU sources only ({reason})")
    extension = CppExtension("lora_kernels._C", cpu_sources, extra_compile_args={"cxx": cxx_flags},
                             extra_link_args=link_flags,
                             define_macros=build_macros + [("LORA_KERNELS_CUDA_SKIPPED", str(skipped))])

# PEP 639's license expression where setuptools has it (77+), the old free-text field before: one pyproject.toml
# for every setuptools from 68 on (a GPU image's system Python may carry an old one, and have no network to upgrade).
if int(setuptools.__version__.split(".")[0]) >= 77:
    license_metadata = {"license_expression": "Apache-2.0"}
else:
    license_metadata = {"license": "Apache-2.0"}
# The extension runs with no other torch minor version than the one it was compiled against (lora_kernels._ext
# refuses it), so a wheel built here requires that one: with a bare torch >= 2.11, pip installed a wheel built on
# torch 2.13 beside the newest torch and its extension was unusable. Local labels (+cpu, +cu130) are not matched.
install_requires = [f"torch=={TORCH_MAJOR}.{TORCH_MINOR}.*", "numpy", "safetensors"]
setup(ext_modules=[extension], cmdclass={"build_ext": BuildExtension}, install_requires=install_requires,
      **license_metadata)
