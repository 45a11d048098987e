"""Which kernels take the time: torch.profiler tables of one lora_linear fwd+bwd, of its forward at decode sizes, and
of grouped forwards (decode and prefill) for every available backend, at design.md §8's shapes on a GPU (bf16,
K = N = 4096, r = 16), of one layer of `compare`'s model (full fine-tuning's and each backend's LoRA fwd+bwd:
host time against kernel time), and of the no-grad forwards of its inference at its three layer shapes, each with a
count of the output elements that follow one rounding or the other, and the `cuda` GEMM path's two orders of ATen
calls at those shapes (COMPARE_INFERENCE).

The bench gives ratios; this gives the per-kernel breakdown behind them (the first H100 run had only the ratios, and
the causes had to be read from the code).

    python benchmarks/profile_kernels.py                 # GPU shapes when CUDA is available
    python benchmarks/profile_kernels.py --device cpu --quick   # tiny CPU shapes (checks the plumbing)
"""

import argparse
import itertools
import math
import sys

import torch

from lora_kernels import backends, bench
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
# The inference forwards of compare's default GPU model, (M, K, N) of its three layer shapes (q/k/v/o, gate/up,
# down): the H200 run of 2026-11-30 measured its unmerged `cuda` inference at 1.50x the merged model (torch 1.31x)
# although the bench's forward rows had `cuda` ahead of torch, and with logits equal to the torch composition's bit
# for bit. These tables and the bit counts below them are the per-layer evidence for both.
COMPARE_INFERENCE = {"gpu": ((4096, 2048, 2048), (4096, 2048, 5632), (4096, 5632, 2048)),
                     "quick": ((32, 32, 32), (32, 32, 88), (32, 88, 32))}
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


def _lora_term_first(x, weight, lora_b, s):
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    y.addmm_(s, lora_b.T, beta=0.0, alpha=2.0)
    return y.addmm_(x, weight.T)


def _print_rounding_counts(shape, names, x, weight, lora_a, lora_b):
    """Which rounding each backend's no-grad forward follows, counted in output elements: the base product rounded
    to x's dtype before the LoRA term is added (the torch composition's order), or the base product's fp32 sum with
    the LoRA term rounded once (what lora_fwd_gemm's beta = 1 GEMM is expected to give). Both models take the same
    LoRA term, rounded as the torch composition rounds it (S, then S·Bᵀ, then the scaling of 2, exact)."""
    with torch.no_grad():
        outputs = {name: lora_linear(x, weight, lora_a, lora_b, 2.0, backend=name) for name in names}
        lora_term = 2.0 * ((x @ lora_a.T) @ lora_b.T)
        base = x.float() @ weight.float().T
        models = {"base rounded first": (base.to(x.dtype).float() + lora_term.float()).to(x.dtype),
                  "rounded once": (base + lora_term.float()).to(x.dtype)}
    for name, out in outputs.items():
        counts = ", ".join(f"{(out != model).sum().item()} from {label}" for label, model in models.items())
        print(f"forward {shape}, backend {name}: of {out.numel()} elements, {counts}")


def _rotating(fn, operand_sets):
    """A callable that calls fn with the next of operand_sets each time: each call reads its weights from memory,
    not from the cache the previous call filled (K = N = 4096's 33.5 MB bf16 W fits an H200's 50 MB L2)."""
    sets = itertools.cycle(operand_sets)
    return lambda: fn(*next(sets))


def _copies(device, *tensors):
    """The tensors and enough copies of them to pass the cache together (bench.num_sets), as tuples."""
    count = bench.num_sets(device, sum(t.nbytes for t in tensors))
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(count - 1)]


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
    # The decode-size and grouped tables rotate their weights over copies that pass the cache together: each call
    # then reads W (and the adapters) from memory, as the bench's rotating input sets do
    decode_weights = _copies(device, weight, lora_a.detach(), lora_b.detach())
    rotated = f" (weights rotated over {len(decode_weights)} copies)"
    for tokens in DECODE_M:
        xd = torch.randn(tokens, hidden, **factory)
        tables.append((f"F.linear forward, M={tokens}: the floor{rotated}",
                       _rotating(lambda w, a, b, xd=xd: torch.nn.functional.linear(xd, w), decode_weights)))
        for name in names:
            tables.append((f"lora_linear forward, backend {name}, M={tokens}{rotated}",
                           _rotating(lambda w, a, b, name=name, xd=xd: lora_linear(xd, w, a, b, 2.0, backend=name),
                                     decode_weights)))
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
    # not Triton: its forward autotunes for every new (K, N) (tens of seconds of gpu_check's profile stage), and
    # the question is the `cuda` path against the torch composition
    inference_names = [name for name in names if name != "triton"]
    failures = []
    for im, ik, inn in COMPARE_INFERENCE["quick" if args.quick else "gpu"]:
        ix = torch.randn(im, ik, **factory)
        iw = torch.randn(inn, ik, **factory) / math.sqrt(ik)
        ia = torch.randn(r, ik, **factory) / math.sqrt(ik)
        ib = torch.randn(inn, r, **factory) / math.sqrt(r)
        try:  # printed now, the tables after: an error here must not cost them
            _print_rounding_counts(f"M={im}, K={ik}, N={inn}", inference_names, ix, iw, ia, ib)
        except Exception as exc:  # noqa: BLE001
            failures.append(exc)
            print(f"ERROR (rounding counts, M={im}, K={ik}, N={inn}): {type(exc).__name__}: {exc}")
        tables.append((f"F.linear forward, M={im}, K={ik}, N={inn} (compare's inference): the floor",
                       lambda ix=ix, iw=iw: torch.nn.functional.linear(ix, iw)))
        for name in inference_names:
            tables.append((f"lora_linear forward, no grad, backend {name}, M={im}, K={ik}, N={inn} (compare's "
                           f"inference)", lambda name=name, ix=ix, iw=iw, ia=ia, ib=ib:
                           lora_linear(ix, iw, ia, ib, 2.0, backend=name)))
        # The two orders of the `cuda` GEMM path's ATen calls, S given: the LoRA term first and the base GEMM adding
        # into it with beta = 1 (what lora_fwd_gemm does), or the base GEMM first and the rank-r GEMM adding into it
        # (its comment's alternative): whether cuBLAS's beta = 1 base GEMM is what the inference row pays for.
        i_s = ix @ ia.T
        tables.append((f"ATen, LoRA term first, base GEMM with beta = 1 (lora_fwd_gemm's order), M={im}, K={ik}, "
                       f"N={inn}", lambda ix=ix, iw=iw, ib=ib, i_s=i_s: _lora_term_first(ix, iw, ib, i_s)))
        tables.append((f"ATen, base GEMM first, LoRA term added with beta = 1, M={im}, K={ik}, N={inn}",
                       lambda ix=ix, iw=iw, ib=ib, i_s=i_s: (ix @ iw.T).addmm_(i_s, ib.T, alpha=2.0)))
    stacked_a = torch.randn(adapters, r, hidden, **factory) / math.sqrt(hidden)
    stacked_b = torch.randn(adapters, hidden, r, **factory) / math.sqrt(r)
    scalings = torch.full((adapters,), 2.0, device=device)
    grouped_weights = _copies(device, weight, stacked_a, stacked_b)
    for tokens in (decode_tokens, prefill_tokens):
        xs = torch.randn(tokens, hidden, **factory)
        batch = LoRABatch.from_adapter_ids(torch.arange(tokens, device=device) % adapters, adapters)
        for name in names:
            def grouped(w, a, b, name=name, xs=xs, batch=batch):
                with torch.no_grad():
                    return multi_lora_linear(xs, w, a, b, batch, scalings, backend=name)
            tables.append((f"multi_lora_linear forward, backend {name}, {tokens} tokens on {adapters} adapters "
                           f"(weights rotated over {len(grouped_weights)} copies)",
                           _rotating(grouped, grouped_weights)))
    failed = len(failures)
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
