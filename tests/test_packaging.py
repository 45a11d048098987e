"""What a source distribution carries: an sdist (and a wheel that `python -m build` builds from it) must hold every
file the extension's build reads."""

import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What setup.py and the build read; the copy keeps the checkout's own egg-info and build folders out of the test.
BUILD_INPUTS = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "csrc", "lora_kernels")


def test_sdist_holds_every_extension_source_and_header(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(ROOT / name, source / name)
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
    assert not needed - packed, f"missing from the sdist: {sorted(needed - packed)}"
    assert {"setup.py", "pyproject.toml", "lora_kernels/__init__.py", "lora_kernels/triton/__init__.py"} <= packed
