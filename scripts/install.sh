#!/usr/bin/env bash
# Sets up ./.venv with torch, triton and lora_kernels, building the C++/CUDA extension against that torch.
#   bash scripts/install.sh          # the package
#   bash scripts/install.sh --test   # plus the test dependencies (pytest, pytest-xdist, hypothesis, transformers, peft)
# The CUDA sources are built when torch is a CUDA build and a CUDA toolkit of its major version is found
# (setup.py; LORA_KERNELS_BUILD_CUDA=0/1 forces off/on).
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
case "${1:-}" in
  "") ;;
  --test) extras="[test]" ;;
  *) echo "usage: bash scripts/install.sh [--test]" >&2; exit 2 ;;
esac

# Always ./.venv, even inside another active virtualenv: the README's commands run .venv/bin/...
# Its Python checked first: on 3.9 pip's only complaint was that no torch >= 2.11 exists.
too_old() {  # prints "X.Y" and succeeds when the interpreter $1 is older than 3.10
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2]); sys.exit(sys.version_info >= (3, 10))'
}
if [ -e .venv/bin/python ] || [ -L .venv/bin/python ]; then
  if ! .venv/bin/python -c "" 2>/dev/null; then
    echo "lora_kernels: ./.venv exists but .venv/bin/python does not run (its interpreter was removed or moved?): remove it (rm -rf .venv) and run this again" >&2
    exit 1
  fi
  if version=$(too_old .venv/bin/python); then
    echo "lora_kernels: ./.venv is Python $version; lora_kernels needs Python >= 3.10: remove it (rm -rf .venv) and run this again (PYTHON=python3.X picks the interpreter)" >&2
    exit 1
  fi
else
  base="${PYTHON:-python3}"
  if ! command -v "$base" > /dev/null; then
    echo "lora_kernels: $base not found: install Python >= 3.10 or name one with PYTHON=python3.X" >&2
    exit 1
  fi
  if version=$(too_old "$base"); then
    echo "lora_kernels: $base is Python $version; lora_kernels needs Python >= 3.10: name a newer one with PYTHON=python3.X" >&2
    exit 1
  fi
  "$base" -m venv .venv
fi
python=.venv/bin/python
export PATH="$PWD/.venv/bin:$PATH"  # ninja and the console scripts of this environment

"$python" -m pip install -q --upgrade pip "setuptools>=68" wheel
"$python" -m pip install -q "torch>=2.11" "triton>=3.6" numpy ninja

mkdir -p build
echo "lora_kernels: building the extension (log: build/install.log)"
if ! MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$python" -m pip install -v --no-build-isolation -e ".${extras}" > build/install.log 2>&1; then
  tail -n 60 build/install.log
  echo "lora_kernels: install failed (full log: build/install.log)" >&2
  exit 1
fi
grep -m1 -E "^ *lora_kernels: building" build/install.log | sed "s/^ *//" || true
echo "lora_kernels: nvcc compile steps: $(grep -cE '(^|[ /])nvcc .*\.cu' build/install.log || true)"
"$python" -m lora_kernels info
