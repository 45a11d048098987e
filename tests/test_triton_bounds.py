"""The interpreter's out-of-bounds check (tests/triton_bounds.py, on for the whole suite under the interpreter)
catches a read or a write one element past a tensor, and lets masked-off lanes through."""

import pytest
import torch

from lora_kernels.triton import HAS_TRITON, INTERPRET, TRITON_ERROR

pytestmark = [pytest.mark.skipif(not HAS_TRITON, reason=f"triton not importable: {TRITON_ERROR}"),
              pytest.mark.skipif(not INTERPRET, reason="checks the Triton interpreter (TRITON_INTERPRET=1)")]

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _copy_kernel(src_ptr, dst_ptr, n, extra_read, extra_write, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        values = tl.load(src_ptr + offs, mask=offs < n + extra_read, other=0.0)
        tl.store(dst_ptr + offs, values, mask=offs < n + extra_write)


def _launch(extra_read, extra_write, n=13):
    storage = torch.randn(n + 3)
    src = storage[:n]  # a view: the storage's three extra elements are still in bounds
    dst = torch.empty(n)
    _copy_kernel[(1,)](src, dst, n, extra_read, extra_write, BLOCK=32)
    return src, dst


def test_in_bounds_and_masked_lanes_pass():
    src, dst = _launch(0, 0)
    assert torch.equal(dst, src)
    _launch(3, 0)  # past the view, inside its storage: memory the kernel may read


@pytest.mark.parametrize("extra_read, extra_write, kind, past, name", [
    (4, 0, "load", 4, "src_ptr"),
    (0, 1, "store", 4, "dst_ptr"),
])
def test_out_of_bounds_access_is_caught(extra_read, extra_write, kind, past, name):
    with pytest.raises(Exception, match=rf"_copy_kernel: a {kind} of 1 active lane\(s\) outside every tensor "
                                        rf"argument's storage; the first is {past} bytes past the end of the storage "
                                        rf"of '{name}'"):
        _launch(extra_read, extra_write)
