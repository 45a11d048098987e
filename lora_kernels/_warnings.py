"""warn_at_caller: a warning attributed to the line that called into lora_kernels."""

import sys
import warnings

# The frames between a package function and its caller that are not the caller's: the wrappers of
# @contextlib.contextmanager and of @torch.no_grad()
_WRAPPER_MODULES = {"contextlib", "torch.utils._contextlib"}


def warn_at_caller(message, category=UserWarning):
    """warnings.warn at the first frame outside this package (and outside the context-manager and no_grad wrappers
    around its functions): the user's line, however deep the package's own calls run. Fixed stacklevels pointed
    inside the package where a function is reached by more than one path (load_peft_adapter's config warnings).
    Frames are told by their module's name, not their file's path: a REPL's "<stdin>" resolved against a current
    directory inside the package was taken for one of its files."""
    frame, stacklevel = sys._getframe(1), 2
    while frame.f_back is not None:
        module = frame.f_globals.get("__name__", "")
        if not (module == "lora_kernels" or module.startswith("lora_kernels.") or module in _WRAPPER_MODULES):
            break
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(message, category, stacklevel=stacklevel)
