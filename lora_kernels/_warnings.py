"""warn_at_caller: a warning attributed to the line that called into lora_kernels."""

import contextlib
import os
import sys
import warnings

import torch.utils._contextlib

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# The frames between a package function and its caller that are not the caller's: the wrappers of
# @contextlib.contextmanager and of @torch.no_grad()
_WRAPPER_FILES = {os.path.abspath(contextlib.__file__), os.path.abspath(torch.utils._contextlib.__file__)}


def warn_at_caller(message, category=UserWarning):
    """warnings.warn at the first frame outside this package (and outside the context-manager and no_grad wrappers
    around its functions): the user's line, however deep the package's own calls run. Fixed stacklevels pointed
    inside the package where a function is reached by more than one path (load_peft_adapter's config warnings)."""
    frame, stacklevel = sys._getframe(1), 2
    while frame.f_back is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not (filename.startswith(_PACKAGE_DIR) or filename in _WRAPPER_FILES):
            break
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(message, category, stacklevel=stacklevel)
