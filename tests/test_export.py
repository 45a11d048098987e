"""The deployment path: torch.export, AOTInductor packages and saved exported programs, loaded in a fresh process the
way a serving process loads them."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run_python(script, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_importing_lora_kernels_registers_every_custom_op_a_traced_call_can_record():
    """A process that loads an exported program or AOTInductor package resolves its custom ops by name, and the
    Triton kernels' ops were registered only when their module was first used: a package exported with the triton
    backend (the auto choice for the grouped ops on GPUs) failed to load after `import lora_kernels` ("Could not
    find schema for lora_kernels_triton::sgmv_shrink")."""
    script = """
import importlib, json, pkgutil, torch

def ours():
    return {name for name in torch._C._dispatch_get_all_op_names() if name.split("::")[0].startswith("lora_kernels")}

import lora_kernels
after_import = ours()
for module in pkgutil.walk_packages(lora_kernels.__path__, "lora_kernels."):
    if not module.name.endswith("__main__"):  # runs the command line
        importlib.import_module(module.name)
print(json.dumps([sorted(after_import), sorted(ours() - after_import)]))
"""
    proc = _run_python(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    registered, missing = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"lora_kernels::lora_fwd", "lora_kernels::torch_dropout_keep"} <= set(registered), registered
    assert not missing, f"registered only when another module is imported: {missing}"
