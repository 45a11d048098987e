"""What a source distribution carries: an sdist (and a wheel that `python -m build` builds from it) must hold every
file the extension's build reads."""

import ast
import glob
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What setup.py and the build read, and what the sdist carries besides; the copy keeps the checkout's own egg-info
# and build folders out of the test.
BUILD_INPUTS = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "csrc", "lora_kernels", "tests", "benchmarks",
                "scripts", "BENCHMARKS.md", "LICENSE")


def _copy_build_inputs(tmp_path):
    """A copy of what the build reads, in tmp_path/source."""
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(ROOT / name, source / name)
    return source


def test_sdist_holds_every_extension_source_and_header(tmp_path):
    source = _copy_build_inputs(tmp_path)
    # without CUDA: the .cu files then come from MANIFEST.in alone, as in an sdist made on a machine without nvcc
    env = dict(os.environ, LORA_KERNELS_BUILD_CUDA="0")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=source,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (archive,) = (tmp_path / "dist").glob("lora_kernels-*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {pathlib.PurePosixPath(name).relative_to(pathlib.PurePosixPath(name).parts[0]).as_posix()
                  for name in tar.getnames() if len(pathlib.PurePosixPath(name).parts) > 1}
    needed = {path.relative_to(ROOT).as_posix() for path in (ROOT / "csrc").rglob("*") if path.is_file()}
    assert any(name.endswith(".h") for name in needed) and any(name.endswith(".cu") for name in needed)
    # the tests with what they import and read (conftest.py, the CUDA emulation, benchmarks/table.py): only
    # tests/test_*.py were packed, which could not run
    needed |= {path.relative_to(ROOT).as_posix() for folder in ("tests", "benchmarks", "scripts")
               for path in (ROOT / folder).rglob("*") if path.is_file() and "__pycache__" not in path.parts}
    assert {"tests/conftest.py", "tests/cuda_emulation/emu.h", "benchmarks/table.py"} <= needed
    assert not needed - packed, f"missing from the sdist: {sorted(needed - packed)}"
    assert {"setup.py", "pyproject.toml", "lora_kernels/__init__.py", "lora_kernels/triton/__init__.py", "LICENSE",
            "BENCHMARKS.md"} <= packed
    assert not any(name.endswith((".so", ".pyc")) for name in packed), sorted(packed)
    # setup.py supplies the license in the field this setuptools knows (License-Expression from 77 on)
    with tarfile.open(archive) as tar:
        (pkg_info,) = [name for name in tar.getnames() if name.count("/") == 1 and name.endswith("/PKG-INFO")]
        metadata = tar.extractfile(pkg_info).read().decode()
    assert "License-Expression: Apache-2.0" in metadata or "License: Apache-2.0" in metadata, metadata[:2000]


# Run in a fresh interpreter in which `import triton` and `import lora_kernels._C` fail, as on a machine where
# neither was installed or built: every public entry point must still work, on the torch backend.
WITHOUT_EXTENSION_OR_TRITON = r"""
import sys
sys.modules["triton"] = None  # None in sys.modules: the import raises ImportError
sys.modules["lora_kernels._C"] = None
import torch
import lora_kernels as lk
from lora_kernels import _ext, backends, cli
from lora_kernels import triton as triton_pkg

assert not _ext.HAS_EXTENSION and not triton_pkg.HAS_TRITON
assert backends.available_backends("cpu") == ["reference", "torch"], backends.available_backends("cpu")
torch.manual_seed(0)
x = torch.randn(3, 5, 64, dtype=torch.float64)
weight, bias = torch.randn(32, 64, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
lora_a, lora_b = torch.randn(4, 64, dtype=torch.float64), torch.randn(32, 4, dtype=torch.float64)

def grads(backend):
    leaves = [t.clone().requires_grad_() for t in (x, lora_a, lora_b)]
    y = lk.lora_linear(leaves[0], weight, leaves[1], leaves[2], 2.0, bias, backend=backend)
    return [y, *torch.autograd.grad(y.square().sum(), leaves)]

for ours, ref in zip(grads("auto"), grads("reference")):
    torch.testing.assert_close(ours, ref)

ids = torch.tensor([[0, -1, 1, 0, 1]] * 3)
stacked_a, stacked_b = torch.randn(2, 4, 64, dtype=torch.float64), torch.randn(2, 32, 4, dtype=torch.float64)
torch.testing.assert_close(lk.multi_lora_linear(x, weight, stacked_a, stacked_b, ids, [0.5, 2.0], bias),
                           lk.multi_lora_linear(x, weight, stacked_a, stacked_b, ids, [0.5, 2.0], bias,
                                                backend="reference"))
layer = lk.LoRALinear.from_linear(torch.nn.Linear(64, 32), r=4, lora_alpha=8)
layer(x.float()).square().mean().backward()
assert layer.lora_A.weight.grad.abs().sum() == 0 and layer.lora_B.weight.grad.abs().sum() > 0  # B starts at zero
cli.main(["info"])
"""


def _run_from_the_checkout(script):
    """stdout of `script` run by a fresh interpreter that imports this checkout's lora_kernels; fails on an error."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_package_works_without_the_extension_and_triton():
    stdout = _run_from_the_checkout(WITHOUT_EXTENSION_OR_TRITON)
    assert "auto -> lora_linear: torch, grouped ops: torch" in stdout
    assert "cpu        the C++ extension lora_kernels._C is not built" in stdout
    assert "triton     triton is not importable" in stdout


# A regular install (its RECORD lists the built extension) behind a checkout without one, earlier on sys.path: the
# reason names both directories instead of asking for a rebuild that the install does not need.
CHECKOUT_HIDES_AN_INSTALL = r"""
import sys
sys.modules["lora_kernels._C"] = None  # the checkout's package has no extension
from lora_kernels import _ext, backends
print(backends.unavailable_reason("cpu", "cpu"))
"""


def test_a_checkout_hiding_an_installed_extension_says_so(tmp_path):
    site = tmp_path / "site"
    (site / "lora_kernels").mkdir(parents=True)
    extension = "lora_kernels/_C.cpython-311-x86_64-linux-gnu.so"
    (site / extension).write_bytes(b"")
    dist_info = site / "lora_kernels-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: lora_kernels\nVersion: 0.1.0\n")
    (dist_info / "RECORD").write_text(f"{extension},,\nlora_kernels-0.1.0.dist-info/METADATA,,\n")
    # site first for importlib.metadata; the checkout's regular package still wins the import over site's
    # directory without an __init__.py
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHECKOUT_HIDES_AN_INSTALL], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"not built in the lora_kernels imported here ({ROOT / 'lora_kernels'}), which hides the installed one in " \
           f"{site / 'lora_kernels'}" in proc.stdout, proc.stdout
    # without the install: the plain reason
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", CHECKOUT_HIDES_AN_INSTALL], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lora_kernels._C is not built: rebuild it against this torch" in proc.stdout, proc.stdout


def test_a_checkout_with_an_egg_info_hiding_an_installed_extension_says_so(tmp_path):
    # `python -m build --sdist` (README) leaves lora_kernels.egg-info in the checkout, which importlib.metadata finds
    # first from there: it lists no extension, and the reason was the plain "not built: rebuild it", not the hiding
    site = tmp_path / "site"
    (site / "lora_kernels").mkdir(parents=True)
    extension = "lora_kernels/_C.cpython-311-x86_64-linux-gnu.so"
    (site / extension).write_bytes(b"")
    (site / "lora_kernels-0.1.0.dist-info").mkdir()
    (site / "lora_kernels-0.1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: lora_kernels\nVersion: 0.1.0\n")
    (site / "lora_kernels-0.1.0.dist-info" / "RECORD").write_text(f"{extension},,\n")
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "lora_kernels", checkout / "lora_kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    (checkout / "lora_kernels.egg-info").mkdir()
    (checkout / "lora_kernels.egg-info" / "PKG-INFO").write_text(
        "Metadata-Version: 2.1\nName: lora_kernels\nVersion: 0.1.0\n")
    (checkout / "lora_kernels.egg-info" / "SOURCES.txt").write_text("lora_kernels/__init__.py\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHECKOUT_HIDES_AN_INSTALL], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"not built in the lora_kernels imported here ({checkout / 'lora_kernels'}), which hides the installed " \
           f"one in {site / 'lora_kernels'}" in proc.stdout, proc.stdout


# A copy of the package without an extension (another checkout) in an environment where a checkout with one is
# installed editable: setuptools' editable finder maps lora_kernels._C to that checkout's file, which must not run
# in place of this copy's own, unbuilt, sources.
COPY_WITHOUT_EXTENSION = r"""
import importlib.util
import lora_kernels
from lora_kernels import _ext, backends
spec = importlib.util.find_spec("lora_kernels._C")
print(spec.origin if spec is not None else None)
print(_ext.HAS_EXTENSION)
print(backends.unavailable_reason("cpu", "cpu"))
"""


def test_a_copy_without_the_extension_does_not_load_another_checkouts(tmp_path):
    shutil.copytree(ROOT / "lora_kernels", tmp_path / "lora_kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", COPY_WITHOUT_EXTENSION], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    origin, has_extension, reason = proc.stdout.splitlines()
    if origin == "None":
        pytest.skip("no editable install of a checkout with a built extension in this environment")
    found_dir = os.path.dirname(origin)
    assert found_dir != str(tmp_path / "lora_kernels")
    assert has_extension == "False"
    assert (f"not built in the lora_kernels imported here ({tmp_path / 'lora_kernels'}); the one found is another "
            f"copy's, in {found_dir}") in reason, reason


# An extension whose library does not load (built against another torch's symbols, a missing CUDA runtime): the
# package still imports and runs on the torch backend, and says why and what to do.
EXTENSION_THAT_FAILS_TO_LOAD = r"""
import torch
import lora_kernels as lk
from lora_kernels import _ext, backends
assert not _ext.HAS_EXTENSION and "cpu" not in backends.available_backends("cpu")
x, w, a, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
torch.testing.assert_close(lk.lora_linear(x, w, a, b), lk.lora_linear(x, w, a, b, backend="reference"))
print(backends.unavailable_reason("cpu", "cpu"))
"""


def test_an_extension_that_fails_to_load_leaves_the_package_working(tmp_path):
    shutil.copytree(ROOT / "lora_kernels", tmp_path / "lora_kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))
    # as the dynamic loader reports a library built against another torch
    (tmp_path / "lora_kernels" / "_C.py").write_text('raise ImportError("undefined symbol: _ZN3c106detail")\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", EXTENSION_THAT_FAILS_TO_LOAD], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("the C++ extension lora_kernels._C is unloadable: ImportError: undefined symbol: "
                                  "_ZN3c106detail; rebuild it against this torch"), proc.stdout


def test_the_shadowed_install_is_a_recorded_extension_file_that_exists_in_another_directory(tmp_path, monkeypatch):
    """shadowed_installed_extension, in-process over a stand-in site directory: only a built extension that an
    install's RECORD lists directly in its lora_kernels folder counts, only while the file is there, and only when
    that folder is not the package imported (an editable install's files are the checkout's own)."""
    import importlib.metadata

    from lora_kernels import _ext

    site = tmp_path / "site"
    (site / "lora_kernels" / "nested").mkdir(parents=True)
    dist_info = site / "lora_kernels-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: lora_kernels\nVersion: 0.1.0\n")
    distributions = importlib.metadata.distributions
    monkeypatch.setattr(importlib.metadata, "distributions",
                        lambda name: distributions(name=name, path=[str(site)]))
    checkout = str(tmp_path / "checkout" / "lora_kernels")

    def shadowed(*recorded):
        (dist_info / "RECORD").write_text("".join(f"{path},,\n" for path in recorded))
        for path in recorded:
            (site / path).write_bytes(b"")
        return _ext.shadowed_installed_extension(checkout)

    extension = "lora_kernels/_C.cpython-311-x86_64-linux-gnu.so"
    assert shadowed("lora_kernels/__init__.py", extension) == str(site / "lora_kernels")
    assert _ext.shadowed_installed_extension(str(site / "lora_kernels")) is None  # the install imported itself
    (site / extension).unlink()
    assert _ext.shadowed_installed_extension(checkout) is None  # recorded, since deleted
    assert shadowed("lora_kernels/nested/_C.cpython-311-x86_64-linux-gnu.so") is None  # not the package's extension
    assert shadowed("lora_kernels/_Cache.py", "lora_kernels/__init__.py") is None
    # a damaged RECORD (importlib.metadata's TypeError or UnicodeDecodeError) failed `import lora_kernels` where the
    # extension was missing (helper 288): it only words the message, which is then the plain "not built"
    for damaged in (f"{extension},,,\n".encode(), b"lora_kernels/\xff.py,,\n"):
        (dist_info / "RECORD").write_bytes(damaged)
        assert _ext.shadowed_installed_extension(checkout) is None


def test_the_package_own_extension_is_not_another_copys(tmp_path):
    """_another_copys_extension: the extension found in the package's own folder, also through a symlink to it, is
    the package's; one in any other folder (an editable finder's checkout) is named."""
    import importlib.machinery

    from lora_kernels import _ext

    def found(origin):
        return _ext._another_copys_extension(importlib.machinery.ModuleSpec("lora_kernels._C", None, origin=origin))

    name = "_C.cpython-311-x86_64-linux-gnu.so"
    assert found(None) is None
    assert found(os.path.join(_ext.PACKAGE_DIR, name)) is None
    (tmp_path / "linked").symlink_to(_ext.PACKAGE_DIR, target_is_directory=True)
    assert found(str(tmp_path / "linked" / name)) is None
    other = tmp_path / "other_checkout" / "lora_kernels"
    assert found(str(other / name)) == str(other)


# An extension built against another torch minor version, as a wheel pip cached from another machine's build would
# hold (pip's cache is keyed by the download, not by torch): loaded, but not used, and `info` says why and what to do.
ANOTHER_TORCHS_EXTENSION = r"""
import importlib.machinery, sys, types
built = types.ModuleType("lora_kernels._C")
built.__spec__ = importlib.machinery.ModuleSpec("lora_kernels._C", None)
built.WITH_CUDA, built.BUILT_TORCH_MAJOR, built.BUILT_TORCH_MINOR = 0, 2, 0
sys.modules["lora_kernels._C"] = built
import torch
import lora_kernels as lk
from lora_kernels import _ext, backends, cli
assert not _ext.HAS_EXTENSION and "cpu" not in backends.available_backends("cpu")
x, w, a, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
torch.testing.assert_close(lk.lora_linear(x, w, a, b), lk.lora_linear(x, w, a, b, backend="reference"))
cli.main(["info"])
"""


def test_an_extension_built_against_another_torch_is_not_used():
    stdout = _run_from_the_checkout(ANOTHER_TORCHS_EXTENSION)
    assert (f"not loaded (built against torch 2.0 but this is torch {torch.__version__} (a wheel that pip cached "
            f"from another build?); its C++ ABI is another torch's: rebuild it against this torch: pip install "
            f"--no-build-isolation --no-cache-dir --force-reinstall --no-deps <the checkout, sdist or git URL it was "
            f"installed from>") in stdout, stdout  # not torch too, nor a bare name PyPI does not have


def test_the_built_torch_check_compares_minor_versions():
    from lora_kernels._ext import built_torch_mismatch

    class Built:
        BUILT_TORCH_MAJOR, BUILT_TORCH_MINOR = 2, 14

    assert built_torch_mismatch(Built, "2.14.1+cu130") is None and built_torch_mismatch(Built, "2.14.0") is None
    assert built_torch_mismatch(Built, "2.13.0+cpu").startswith("built against torch 2.14 but this is torch 2.13.0")
    assert built_torch_mismatch(object(), "2.13.0") is None  # a build that did not record it is taken as it is


def test_setup_records_the_cuda_skipped_codes_the_package_reads():
    """setup.py records why a build left the CUDA sources out as a number (LORA_KERNELS_CUDA_SKIPPED), which
    _ext.CUDA_SKIPPED_REASONS turns back into words for `lora-kernels info`: the two tables are written apart, and a
    code added or renumbered on one side only would be reported as no reason, or as another one. Each code setup.py
    can record is the package's, for the same cause (the build of code 1 alone is checked end to end, by
    test_extension_messages_survive_a_statically_linked_libstdcxx)."""
    import ast

    from lora_kernels._ext import CUDA_SKIPPED_REASONS
    tree = ast.parse((ROOT / "setup.py").read_text())
    (assignment,) = [node for node in ast.walk(tree) if isinstance(node, ast.Assign)
                     and ast.unparse(node.targets[0]) == "(skipped, reason)"]
    recorded = {}
    for pair in ast.walk(assignment.value):
        if isinstance(pair, ast.Tuple) and len(pair.elts) == 2 and isinstance(pair.elts[0], ast.Constant):
            reason = pair.elts[1]
            recorded[pair.elts[0].value] = reason.value if isinstance(reason, ast.Constant) else ast.unparse(reason)
    assert set(recorded) == set(CUDA_SKIPPED_REASONS), recorded
    causes = {1: "LORA_KERNELS_BUILD_CUDA=0", 2: "CPU-only", 3: "CUDA toolkit", 4: "mismatch"}
    for code, cause in causes.items():
        assert cause.lower() in recorded[code].lower(), (code, recorded[code])
    assert "major version" in CUDA_SKIPPED_REASONS[4]
    for code in (1, 2, 3):
        assert causes[code] in CUDA_SKIPPED_REASONS[code], (code, CUDA_SKIPPED_REASONS[code])


# Bad input to the extension's ops, as the user sees it: every piece of the message, numbers included.
STATIC_LIBSTDCXX_MESSAGES = r"""
import torch
import lora_kernels
from lora_kernels import _ext
assert _ext.HAS_EXTENSION, "the copy's extension did not load"
# what the binary records of its build: this torch's minor version, and why its CUDA sources were left out
assert (_ext._C.BUILT_TORCH_MAJOR, _ext._C.BUILT_TORCH_MINOR) == tuple(int(p) for p in torch.__version__.split(".")[:2])
assert _ext.EXTENSION_CUDA_SKIPPED == "LORA_KERNELS_BUILD_CUDA=0", _ext.EXTENSION_CUDA_SKIPPED
x, w, a, b = torch.randn(3, 16), torch.randn(12, 16), torch.randn(4, 16), torch.randn(12, 4)
calls = [
    (x, w[:, :15], a, b, 1.0),  # a size: an int64 and a shape
    (x, w, a, b.double(), 1.0),  # dtypes
    (x, w, a, b, float("inf")),  # a double
]
for args in calls:
    try:
        torch.ops.lora_kernels.lora_fwd(args[0], None, *args[1:], None)
    except (ValueError, TypeError) as error:
        print(str(error).splitlines()[0])
"""


def test_extension_messages_survive_a_statically_linked_libstdcxx(tmp_path):
    """On the H200 image every failed check of the C++ ops segfaulted the process, in std::ostream's number
    formatting inside the extension, which held libstdc++ code of its own (gdb). Linked that way here
    (-static-libstdc++), a stream dropped every number from the message; csrc/checks.h builds messages without
    streams, so the messages come out whole."""
    libstdcxx_a = subprocess.run(["c++", "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout
    if not os.path.isabs(libstdcxx_a.strip()):
        pytest.skip("no static libstdc++ (libstdc++.a) for the C++ compiler")
    source = _copy_build_inputs(tmp_path)
    env = dict(os.environ, LORA_KERNELS_BUILD_CUDA="0", LDFLAGS="-static-libstdc++", MAX_JOBS="2")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=source, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(source))
    proc = subprocess.run([sys.executable, "-c", STATIC_LIBSTDCXX_MESSAGES], cwd=source, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [
        "lora_fwd: weight.shape[1] expected 16 (in_features = x.shape[1]), got shape [12, 15]",
        "lora_fwd: lora_b expected dtype Float (same as x), got Double",
        "lora_fwd: scaling expected a finite float, got inf",
    ]


def test_setup_prefers_an_installed_toolkit_of_torchs_cuda_major(tmp_path, monkeypatch):
    """Without CUDA_HOME or an nvcc on PATH, /usr/local/cuda linking CUDA 12.4 beside a CUDA 13.0 toolkit was taken
    for a cu130 torch, and the build dropped the CUDA sources for the version mismatch."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    wanted = ("_is_toolkit_root", "_toolkit_major", "_find_cuda_home")
    code = ast.unparse(ast.Module(body=[node for node in tree.body if isinstance(node, ast.FunctionDef)
                                        and node.name in wanted], type_ignores=[]))
    local = tmp_path / "usr-local"
    for version, number in (("12.4", 12040), ("13.0", 13000)):
        toolkit = local / f"cuda-{version}"
        (toolkit / "bin").mkdir(parents=True)
        (toolkit / "include").mkdir()
        (toolkit / "bin" / "nvcc").touch()
        (toolkit / "include" / "cuda_runtime.h").touch()
        (toolkit / "include" / "cuda.h").write_text(f"#define CUDA_VERSION {number}\n")
    (local / "cuda").symlink_to(local / "cuda-12.4")
    assert code.count("'/usr/local/cuda") == 2
    code = code.replace("'/usr/local/cuda", repr(str(local / "cuda"))[:-1])
    namespace = {"os": os, "glob": glob, "shutil": shutil, "re": re, "sys": sys, "Path": pathlib.Path}
    exec(code, namespace)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no nvcc
    find = namespace["_find_cuda_home"]
    assert find(13) == str(local / "cuda-13.0")
    assert find(12) == str(local / "cuda-12.4")  # /usr/local/cuda, resolved
    assert find(None) == str(local / "cuda-12.4")  # a CPU torch: the first found, as before


def test_setup_says_when_cuda_home_names_no_toolkit(tmp_path):
    """A CUDA_HOME that is not a toolkit root (a typo) was passed over for the next toolkit found, unannounced."""
    env = {**os.environ, "CUDA_HOME": str(tmp_path / "no-such-toolkit"), "LORA_KERNELS_BUILD_CUDA": ""}
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (f"lora_kernels: CUDA_HOME={tmp_path / 'no-such-toolkit'} is not a CUDA toolkit root (no bin/nvcc or "
            f"include/cuda_runtime.h there); looking elsewhere") in proc.stderr


def test_a_build_requires_the_torch_minor_version_it_compiled_against(tmp_path):
    """The extension is refused under another torch minor version (_ext.built_torch_mismatch), so a built wheel must
    not let pip install it beside one: with a bare torch >= 2.11, a wheel built on torch 2.13 came with the newest
    torch and an unusable extension."""
    env = dict(os.environ, LORA_KERNELS_BUILD_CUDA="0")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "-e", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    major, minor = torch.__version__.split(".")[:2]
    requires = (tmp_path / "lora_kernels.egg-info" / "requires.txt").read_text().split("\n\n")[0].split()
    assert requires == [f"torch=={major}.{minor}.*", "numpy", "safetensors"], requires


def test_setup_refuses_a_torch_older_than_the_floor():
    script = ("import sys, runpy, torch; torch.__version__ = '2.10.0+cu128'; sys.argv = ['setup.py', '--name']; "
              "runpy.run_path('setup.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ, LORA_KERNELS_BUILD_CUDA="0"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert ("lora_kernels build error: lora_kernels needs torch >= 2.11 (the oldest it is tested with), this is torch "
            "2.10.0+cu128") in proc.stderr, proc.stderr


def test_an_empty_cuda_arch_list_builds_the_default_targets():
    """TORCH_CUDA_ARCH_LIST= (set but empty) is taken as unset: torch reads an empty list as the visible GPUs' and
    failed with an IndexError where there is none."""
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="", LORA_KERNELS_BUILD_CUDA="")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    if "building CPU + CUDA sources" not in proc.stdout:
        pytest.skip(f"setup.py builds no CUDA sources here: {proc.stdout.strip()}")
    assert "TORCH_CUDA_ARCH_LIST=8.0;9.0a)" in proc.stdout, proc.stdout


# A Python 3.9 stand-in for install.sh's checks: runs the code it is given (-c) in this Python, with 3.9's version
OLD_PYTHON = """#!/bin/sh
[ "$1" = "-c" ] || exit 99
exec "{python}" -c 'import sys; sys.version_info = (3, 9, 18, "final", 0); exec(sys.argv[1])' "$2"
"""


@pytest.mark.parametrize("where", ["venv", "PYTHON", "broken venv"])
def test_install_sh_refuses_a_python_older_than_3_10_before_installing(tmp_path, where):
    """On Python 3.9 pip's only complaint was that no torch >= 2.11 exists; an existing .venv was reused whatever
    its Python, and one whose interpreter was removed failed in `python -m venv` over it."""
    (tmp_path / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "install.sh", tmp_path / "scripts" / "install.sh")
    old_python = tmp_path / "python3.9"
    old_python.write_text(OLD_PYTHON.format(python=sys.executable))
    old_python.chmod(0o755)
    env = dict(os.environ)
    if where == "PYTHON":
        env["PYTHON"] = str(old_python)
    else:
        (tmp_path / ".venv" / "bin").mkdir(parents=True)
        target = old_python if where == "venv" else tmp_path / "removed" / "python3.9"
        (tmp_path / ".venv" / "bin" / "python").symlink_to(target)
    proc = subprocess.run(["bash", str(tmp_path / "scripts" / "install.sh")], cwd="/", env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    expected = {"venv": "lora_kernels: ./.venv is Python 3.9; lora_kernels needs Python >= 3.10: remove it",
                "PYTHON": f"lora_kernels: {old_python} is Python 3.9; lora_kernels needs Python >= 3.10: name a newer",
                "broken venv": "lora_kernels: ./.venv exists but .venv/bin/python does not run"}[where]
    assert proc.stderr.startswith(expected), proc.stderr
    assert not (tmp_path / "build").exists() and (where != "PYTHON" or not (tmp_path / ".venv").exists())
