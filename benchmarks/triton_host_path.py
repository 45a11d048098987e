"""Host time of lora_linear(backend="triton") spent in this package's Python, on any machine: CPU tensors under the
Triton interpreter, every kernel launch replaced by a no-op, so neither the kernels nor Triton's own launcher are
timed. What is left is the path a GPU call runs before its launches (checks, grids, splits, autotune keys, buffers,
autograd), at a tiny shape where nothing else costs. On a GPU the `host` bench rows time the whole host path.

    python benchmarks/triton_host_path.py            # median µs per call of 5 rounds of 300 calls, one thread
"""

import argparse
import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported: CPU tensors then pass the checks

import torch  # noqa: E402

import lora_kernels as lk  # noqa: E402
from lora_kernels.triton import lora_linear as triton_lora_linear  # noqa: E402

LAUNCHED = ("_shrink", "_fwd", "_fwd_tma", "_bwd_dy", "_bwd_dx", "_bwd_dx_tma", "_bwd_da", "_dropout_mask_kernel")


class _NoLaunch:
    """Stands in for a kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in LAUNCHED:
        setattr(triton_lora_linear, name, _NoLaunch())
    x = torch.randn(1, 64, requires_grad=True)
    weight = torch.randn(64, 64)
    lora_a, lora_b = torch.randn(8, 64, requires_grad=True), torch.randn(64, 8, requires_grad=True)
    dy = torch.randn(1, 64)

    def forward():
        with torch.no_grad():
            lk.lora_linear(x, weight, lora_a, lora_b, 2.0, backend="triton")

    def forward_backward():
        torch.autograd.grad(lk.lora_linear(x, weight, lora_a, lora_b, 2.0, backend="triton"), (x, lora_a, lora_b), dy)

    print(f"triton_host_path: torch {torch.__version__}, M=1 K=N=64 r=8, kernels not launched, one thread")
    for name, call in (("forward, no grad", forward), ("fwd+bwd (dX, dA, dB)", forward_backward)):
        per_call = []
        for _ in range(args.rounds):
            for _ in range(20):
                call()
            start = time.perf_counter()
            for _ in range(args.calls):
                call()
            per_call.append((time.perf_counter() - start) / args.calls * 1e6)
        print(f"  {name:22s} {statistics.median(per_call):7.1f} µs per call (median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
