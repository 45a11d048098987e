"""Triton kernels, one module per op. Importable without triton installed: `TRITON_ERROR` then says why."""

import os

# Read once: the interpreter must be switched on before triton compiles anything, so tests set it first.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

TRITON_ERROR = None
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as exc:
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"

HAS_TRITON = TRITON_ERROR is None
