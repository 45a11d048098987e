#!/usr/bin/env bash
# The supported floor of design.md §6 (torch 2.11 + triton 3.6, the versions of the GPU image), checked on any
# machine without a GPU: the committed HEAD cloned into VENV/src, torch 2.11, triton 3.6 and numpy < 2.4 (the
# triton 3.6 interpreter breaks on 2.4) in the virtualenv VENV, the extension built (with its CUDA sources when nvcc
# is found), then the whole test suite and the sm_80/sm_90 compile gate. CI runs only the newest versions; run this
# after touching torch.compile, torch.library, Triton APIs or the C++/CUDA sources, and before a GPU session. It
# found a torch.compile break on torch 2.11 that CI could not see. Downloads torch 2.11 from PyPI with its CUDA
# libraries (a few GB) on first use.
#   bash scripts/floor_check.sh [VENV]        (default /tmp/lk-floor; logs in VENV/logs)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-/tmp/lk-floor}"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"
mkdir -p "$venv/logs"
printf 'torch==2.11.*\ntriton==3.6.*\nnumpy<2.4\n' > "$venv/constraints.txt"

rm -rf "$venv/src"
git clone -q . "$venv/src"
echo "floor check of $(git -C "$venv/src" log --oneline -1) in $venv"
# The oldest setuptools the build supports (pyproject.toml; Ubuntu 24.04's, whose Python 3.12.3 the GPU image
# runs): CI builds with the newest.
"$py" -m pip install -q --upgrade pip "setuptools==68.1.2" wheel
"$py" -m pip install -q -c "$venv/constraints.txt" torch triton numpy ninja
# With nvcc on PATH the CUDA sources are compiled too, against torch 2.11's headers: the build step of a GPU session
# (the GPU image has these versions), checked before the GPU time is spent on it. About 3 minutes on 2 cores.
cuda=0
command -v nvcc > /dev/null && cuda=1
(cd "$venv/src" && LORA_KERNELS_BUILD_CUDA=$cuda MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  "$py" -m pip install -q --no-build-isolation -c "$venv/constraints.txt" -e ".[test]") > "$venv/logs/install.log" 2>&1 \
  || { tail -n 40 "$venv/logs/install.log"; exit 1; }
"$py" -c "import torch, triton, numpy; print('torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)"
(cd "$venv/src" && "$py" -c "
import torch, lora_kernels._C
has = lambda key: all(torch._C._dispatch_has_kernel_for_dispatch_key('lora_kernels::' + op, key)
                      for op in ('lora_fwd', 'lora_bwd_dy', 'sgmv_shrink', 'sgmv_expand'))
print('extension built with kernels for', 'CPU and CUDA' if has('CUDA') else 'CPU only', '(nvcc found: $cuda)')
assert has('CPU') and has('CUDA') == bool($cuda)
")

status=0
# The triton 3.6 interpreter warns on every call under numpy 2.3 ("Conversion of an array with ndim > 0 to a
# scalar"): -W ignore keeps the log readable. -n 2: two processes, as the README's test command.
(cd "$venv/src" && "$py" -m pytest -q -n 2 -p no:cacheprovider -W ignore) > "$venv/logs/pytest.log" 2>&1 || status=1
tail -n 3 "$venv/logs/pytest.log"
(cd "$venv/src" && "$py" -m lora_kernels.triton.aot) > "$venv/logs/aot.log" 2>&1 || status=1
tail -n 2 "$venv/logs/aot.log"
exit $status
