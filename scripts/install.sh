#!/usr/bin/env bash
# Sets up ./.venv with torch, triton and lora_kernels, building the C++/CUDA extension against that torch.
#   bash scripts/install.sh          # the package
#   bash scripts/install.sh --test   # plus the test dependencies (pytest, hypothesis, transformers, peft)
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
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
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
