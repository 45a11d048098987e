"""Triton kernels, one module per op. Importable without triton installed: `TRITON_ERROR` then says why."""

import functools
import os

import torch

# Read once: the interpreter must be switched on before triton compiles anything, so tests set it first.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

TRITON_ERROR = None
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as exc:
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"

HAS_TRITON = TRITON_ERROR is None


def on_tensor_device(launcher):
    """Runs `launcher` with the CUDA device of its first (tensor) argument current: Triton launches on the current
    device, so tensors on cuda:1 while cuda:0 is current would be addressed by a kernel on GPU 0."""
    @functools.wraps(launcher)
    def launch(tensor, *args, **kwargs):
        if tensor.is_cuda and tensor.device.index != torch.cuda.current_device():
            with torch.cuda.device(tensor.device):
                return launcher(tensor, *args, **kwargs)
        return launcher(tensor, *args, **kwargs)
    return launch
