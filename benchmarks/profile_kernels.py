"""Which kernels take the time: torch.profiler tables of one lora_linear fwd+bwd, of its forward at decode sizes, and
of grouped forwards (decode and prefill) for every available backend, at design.md §8's shapes on a GPU (bf16,
K = N = 4096, r = 16), and of one layer of `compare`'s model (full fine-tuning's and each backend's LoRA fwd+bwd:
host time against kernel time).

The bench gives ratios; this gives the per-kernel breakdown behind them (the first H100 run had only the ratios, and
the causes had to be read from the code).

    python benchmarks/profile_kernels.py                 # GPU shapes when CUDA is available
    python benchmarks/profile_kernels.py --device cpu --quick   # tiny CPU shapes (checks the plumbing)
"""

import argparse
import math
import sys

import torch

from lora_kernels import backends
from lora_kernels.batch import LoRABatch
from lora_kernels.functional import lora_linear, multi_lora_linear

SHAPES = {  # (training M, hidden, rank, decode tokens, prefill tokens, adapters of the grouped rows)
    "gpu": (8192, 4096, 16, 64, 4096, 16),
    "quick": (64, 64, 8, 8, 32, 4),
}
# One layer of `lora-kernels compare`'s default GPU model (hidden 2048, 4096 tokens per step), (M, hidden): its eager
# step looked host-bound on the H200 (a LoRA step 0.95x full fine-tuning's, the fused column unsteady); the tables'
# "Self CPU time total" against "Self CUDA time total" say whether a layer's host path outlasts its kernels.
COMPARE_LAYER = {"gpu": (4096, 2048), "quick": (32, 32)}
# design.md §8's decode sizes: the forward alone (the cuda backend's decode kernels, the Triton decode configs)
DECODE_M = (1, 16)
ROW_LIMIT = 12  # kernels shown per table


def _profile(fn, device, iterations):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for _ in range(3):  # warm-up: autotuning and lazy initialisation stay out of the table
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iterations):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=ROW_LIMIT, max_name_column_width=70)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes")
    parser.add_argument("--iterations", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m, hidden, r, decode_tokens, prefill_tokens, adapters = SHAPES["quick" if args.quick else "gpu"]
    names = [b for b in backends.available_backends(device)
             if b != "reference" and not (b == "triton" and device.type == "cpu")]
    print(f"profile_kernels: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{dtype}, K=N={hidden}, r={r}, torch {torch.__version__}; {args.iterations} iterations per table; "
          f"backends {', '.join(names)}")
    factory = {"device": device, "dtype": dtype}
    x = torch.randn(m, hidden, **factory, requires_grad=True)
    weight = torch.randn(hidden, hidden, **factory) / math.sqrt(hidden)
    lora_a = (torch.randn(r, hidden, **factory) / math.sqrt(hidden)).requires_grad_(True)
    lora_b = (torch.randn(hidden, r, **factory) / math.sqrt(r)).requires_grad_(True)
    dy = torch.randn(m, hidden, **factory)

    def base_gemms():
        with torch.no_grad():
            return x @ weight.T, dy @ weight

    tables = [("the two base GEMMs (x·Wᵀ, dY·W): the floor", base_gemms)]
    for name in names:
        tables.append((f"lora_linear fwd+bwd, backend {name}, M={m}",
                       lambda name=name: torch.autograd.grad(lora_linear(x, weight, lora_a, lora_b, 2.0,
                                                                         backend=name), (x, lora_a, lora_b), dy)))
    for tokens in DECODE_M:
        xd = torch.randn(tokens, hidden, **factory)
        tables.append((f"F.linear forward, M={tokens}: the floor",
                       lambda xd=xd: torch.nn.functional.linear(xd, weight)))
        for name in names:
            tables.append((f"lora_linear forward, backend {name}, M={tokens}",
                           lambda name=name, xd=xd: lora_linear(xd, weight, lora_a.detach(), lora_b.detach(), 2.0,
                                                                backend=name)))
    layer_m, layer_hidden = COMPARE_LAYER["quick" if args.quick else "gpu"]
    lx = torch.randn(layer_m, layer_hidden, **factory, requires_grad=True)
    lw = (torch.randn(layer_hidden, layer_hidden, **factory) / math.sqrt(layer_hidden)).requires_grad_(True)
    la = (torch.randn(r, layer_hidden, **factory) / math.sqrt(layer_hidden)).requires_grad_(True)
    lb = (torch.randn(layer_hidden, r, **factory) / math.sqrt(r)).requires_grad_(True)
    ldy = torch.randn(layer_m, layer_hidden, **factory)
    tables.append((f"full fine-tuning layer fwd+bwd (F.linear, dX and dW), M={layer_m}, K=N={layer_hidden}",
                   lambda: torch.autograd.grad(torch.nn.functional.linear(lx, lw), (lx, lw), ldy)))
    for name in names:
        tables.append((f"lora_linear fwd+bwd, backend {name}, M={layer_m}, K=N={layer_hidden} (compare's layer)",
                       lambda name=name: torch.autograd.grad(lora_linear(lx, lw.detach(), la, lb, 2.0, backend=name),
                                                             (lx, la, lb), ldy)))
    stacked_a = torch.randn(adapters, r, hidden, **factory) / math.sqrt(hidden)
    stacked_b = torch.randn(adapters, hidden, r, **factory) / math.sqrt(r)
    scalings = torch.full((adapters,), 2.0, device=device)
    for tokens in (decode_tokens, prefill_tokens):
        xs = torch.randn(tokens, hidden, **factory)
        batch = LoRABatch.from_adapter_ids(torch.arange(tokens, device=device) % adapters, adapters)
        for name in names:
            def grouped(name=name, xs=xs, batch=batch):
                with torch.no_grad():
                    return multi_lora_linear(xs, weight, stacked_a, stacked_b, batch, scalings, backend=name)
            tables.append((f"multi_lora_linear forward, backend {name}, {tokens} tokens on {adapters} adapters",
                           grouped))
    failed = 0
    for title, fn in tables:
        print(f"\n=== {title}")
        try:
            print(_profile(fn, device, args.iterations))
        except Exception as exc:  # noqa: BLE001  (one failing backend must not hide the others' tables)
            failed += 1
            print(f"ERROR: {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
