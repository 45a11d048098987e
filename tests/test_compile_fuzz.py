"""Differential fuzzing of torch.compile against eager over the public API (README, Guarantees, "torch.compile").

Seeded random cases over: the entry point (lk.lora_linear, LoRALinear, inject_lora on a small torch model and on a
tiny HF Llama, lk.multi_lora_linear, MultiLoRALinear with adapter ids or set_batch_adapters, lk.ops.lora_shrink /
lora_expand / add_lora with output slices, and torch.func transforms of the first four compiled whole), the backend,
the dtype (float32, float16, bfloat16), training (gradients of x, the factors, the bias, the weight) or inference,
dropout, leading dims, non-contiguous inputs, merged / disabled adapters, autocast to float16 or bfloat16,
dynamic=True or the default with several token counts, and adapter ids that change between calls. Each case runs
every call eagerly and compiled (fullgraph=True, as README promises) on the same inputs and the same RNG state and
compares outputs and gradients: float32 within 1e-5 (the compiled graph runs the same kernels; Inductor may reorder
the torch ops around them), 16-bit within design.md §7. It also counts the graphs the backend compiled against
README: one per token count at most until the dimension goes dynamic (the default's one recompile), none for new
adapter ids or a new set_batch_adapters list of as many names, one per number of names, for a list with no adapter
and per module state (merged, disabled, train/eval: Python attributes are constants of a graph).

Dropout: under aot_eager the seed drawn in the graph is the one eager draws under the same torch.manual_seed, so
outputs and gradients match eager's; under Inductor only with torch._inductor.config.fallback_random = True, and
without it a compiled step is reproducible under the seed (README).

Most cases use aot_eager (Inductor's C++ compile takes seconds per graph on CPU); a few use Inductor.
"""

import contextlib
import copy
import os
import random
import warnings
import zlib
from dataclasses import dataclass, field

import pytest
import torch
import torch._dynamo
from conftest import TOLERANCE, backend_or_skip, rel_error
from torch import nn
from torch._dynamo.backends.registry import lookup_backend
from torch.func import functional_call, grad, jacrev, vmap

import lora_kernels as lk
from lora_kernels.batch import LoRABatch

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FP32_TOLERANCE = 1e-5  # compiled against eager, both float32


# --------------------------------------------------------------------------------------------------------- helpers

def counting_backend(name):
    """(backend, graphs): the named torch.compile backend, recording each graph it compiled and returned. A trace
    that dynamo restarts (TensorifyScalarRestartAnalysis, raised from the backend on a first trace that meets a
    float) is not a graph: the exception leaves before it is recorded."""
    inner = lookup_backend(name)
    graphs = []

    def backend(graph_module, example_inputs):
        compiled = inner(graph_module, example_inputs)
        graphs.append(graph_module)
        return compiled

    return backend, graphs


def compile_counted(fn, compiler, dynamic):
    backend, graphs = counting_backend(compiler)
    return torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=backend), graphs


def check(what, got, want, dtype):
    """Compiled `got` against eager `want`: float32 within FP32_TOLERANCE, 16-bit within design.md §7."""
    if want is None or got is None:
        assert got is None and want is None, f"{what}: one of compiled/eager is None"
        return
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != eager {want.dtype}"
    overflowed = ~torch.isfinite(want)
    if overflowed.any():
        # Where the eager run overflows (float16 second derivatives of a gradient penalty pass 65504, COMPILE_FUZZ_SEED
        # 5150), the compiled one must too, with the same values at the same places; the rest is compared as usual.
        torch.testing.assert_close(got[overflowed], want[overflowed], rtol=0, atol=0, equal_nan=True,
                                   msg=f"{what}: compiled differs from eager where eager is not finite")
        got, want = got[~overflowed], want[~overflowed]
    err = rel_error(got, want)
    tol = FP32_TOLERANCE if dtype in (torch.float32, torch.float64) else TOLERANCE[dtype]
    assert err <= tol, f"{what}: compiled vs eager relative error {err:.3e} > {tol:.0e}"


def grads_of(out, leaves, generator_seed):
    """d(sum(out * g))/d(leaves) for a fixed random cotangent g (None where a leaf gets no gradient)."""
    if not leaves:
        return []
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(generator_seed)).to(out.dtype)
    return list(torch.autograd.grad(out, leaves, g, allow_unused=True))


def make_x(shape, dtype, noncontig, requires_grad, generator):
    """x of `shape`; non-contiguous: every other column of a wider tensor, or a transposed one."""
    if noncontig == "stride":
        x = torch.randn(*shape[:-1], 2 * shape[-1], generator=generator).to(dtype)[..., ::2]
    elif noncontig == "transpose" and len(shape) >= 2:
        x = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=generator).to(dtype).transpose(-1, -2)
    else:
        x = torch.randn(*shape, generator=generator).to(dtype)
    return x.requires_grad_(requires_grad)


def autocast_ctx(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()


def max_graphs(calls, dynamic):
    """README's bound for calls [(token count, state)], where a state is whatever a graph holds as a constant (a
    module's merged / disabled / training flags, a set_batch_adapters list's length and whether it names an
    adapter): with dynamic=True one graph per state; by default a state first met before the token count changed
    gets a static graph, and after the first change (dynamo marks the dimension dynamic) one dynamic graph per state.
    Token counts never equal another size of the inputs here: torch's duck sizing would tie the two, and compile
    once more when they part."""
    first, dynamic_now, graphs = None, dynamic is True, set()
    for tokens, state in calls:
        first = tokens if first is None else first
        dynamic_now = dynamic_now or tokens != first
        if (state, "dynamic") in graphs or (state, tokens) in graphs:
            continue
        graphs.add((state, "dynamic" if dynamic_now else tokens))
    return len(graphs)


def check_graphs(graphs, calls, dynamic):
    bound = max_graphs(calls, dynamic)
    assert graphs, "nothing was compiled"
    assert len(graphs) <= bound, f"{len(graphs)} graphs compiled, README's bound is {bound} for calls {calls}"
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    assert breaks == 0, f"{breaks} graph breaks: {dict(torch._dynamo.utils.counters['graph_break'])}"


@dataclass
class Case:
    kind: str
    backend: str = "auto"
    dtype: torch.dtype = F32
    compiler: str = "aot_eager"
    dynamic: object = None
    train: bool = False
    dropout: float = 0.0
    lead: tuple = ()
    noncontig: str = ""
    autocast: object = None  # the autocast dtype
    token_counts: tuple = (5, 9)
    extra: dict = field(default_factory=dict)

    @property
    def compute_dtype(self):
        """The dtype the kernels run in, whose tolerance applies: autocast's under autocast."""
        return self.autocast or self.dtype

    def id(self):
        parts = [self.kind, self.backend, str(self.dtype).removeprefix("torch."), self.compiler,
                 "dyn" if self.dynamic else "default", "train" if self.train else "infer"]
        if self.dropout:
            parts.append(f"drop{self.dropout}")
        if self.lead:
            parts.append("lead" + "x".join(map(str, self.lead)))
        if self.noncontig:
            parts.append(self.noncontig)
        if self.autocast:
            parts.append("autocast_" + str(self.autocast).removeprefix("torch."))
        parts += [f"{k}={v}" for k, v in sorted(self.extra.items())]
        return "-".join(parts)


# ---------------------------------------------------------------------------------------------------- the runners

def run_lora_linear(case, gen):
    K, N, r = case.extra["K"], case.extra["N"], case.extra["r"]
    dtype = F32 if case.autocast else case.dtype
    weight = (torch.randn(N, K, generator=gen) * K ** -0.5).to(dtype)
    lora_a = (torch.randn(r, K, generator=gen) * K ** -0.5).to(dtype)
    lora_b = (torch.randn(N, r, generator=gen) * r ** -0.5).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype) if case.extra["bias"] else None
    grads = case.extra["grads"] if case.train else ""
    for name, t in (("w", weight), ("a", lora_a), ("b", lora_b), ("bias", bias)):
        if t is not None and name in grads:
            t.requires_grad_(True)
    scaling, p, backend = case.extra["scaling"], case.dropout, case.backend

    def fn(x, weight, lora_a, lora_b, bias):
        return lk.lora_linear(x, weight, lora_a, lora_b, scaling, bias, dropout_p=p, backend=backend)

    compiled, graphs = compile_counted(fn, case.compiler, case.dynamic)
    for call, tokens in enumerate(case.token_counts):
        x = make_x(case.lead + (tokens, K), dtype, case.noncontig, "x" in grads, gen)
        leaves = [t for t in (x, weight, lora_a, lora_b, bias) if t is not None and t.requires_grad]
        results = []
        for run in (fn, compiled):
            torch.manual_seed(1000 + call)  # the same dropout seed in both
            with autocast_ctx(case.autocast):
                y = run(x, weight, lora_a, lora_b, bias)
            results.append([y] + grads_of(y, leaves, call))
        for what, got, want in zip(["y"] + [f"grad{i}" for i in range(len(leaves))], results[1], results[0]):
            check(f"call {call} ({tokens} tokens) {what}", got, want, case.compute_dtype)
    check_graphs(graphs, [(tokens, None) for tokens in case.token_counts], case.dynamic)


def _lora_layer(case, gen):
    K, N, r = case.extra["K"], case.extra["N"], case.extra["r"]
    layer = lk.LoRALinear(K, N, r=r, lora_alpha=case.extra["alpha"], lora_dropout=case.dropout,
                          bias=case.extra["bias"], init_lora_weights=False, backend=case.backend,
                          dtype=None if case.autocast else case.dtype)
    return layer.train(case.train)


def _set_state(layer, state, train):
    """'plain', 'merged' or 'eval' (and 'disabled', entered by the caller as a context)."""
    if state == "merged" and not layer.merged:
        layer.merge()
    elif state != "merged" and layer.merged:
        layer.unmerge()
    layer.train(train and state != "eval")


def run_lora_module(case, gen):
    """A LoRALinear through its states: after each state change compiled and eager run the layer as it is now."""
    layer = _lora_layer(case, gen)
    dtype = F32 if case.autocast else case.dtype
    compiled, graphs = compile_counted(layer, case.compiler, case.dynamic)
    states = case.extra["states"]
    params = [p for p in layer.parameters() if p.requires_grad]
    for call, (tokens, state) in enumerate(zip(case.token_counts, states)):
        _set_state(layer, state, case.train)
        x = make_x(case.lead + (tokens, layer.in_features), dtype, case.noncontig, case.train, gen)
        leaves = ([x] + params) if case.train and state != "merged" else ([x] if case.train else [])
        results = []
        for run in (layer, compiled):
            torch.manual_seed(2000 + call)
            ctx = layer.disable_adapter() if state == "disabled" else contextlib.nullcontext()
            with ctx, autocast_ctx(case.autocast):
                y = run(x)
            results.append([y] + grads_of(y, leaves, call))
        for i, (got, want) in enumerate(zip(results[1], results[0])):
            check(f"call {call} ({tokens} tokens, {state}) output {i}", got, want, case.compute_dtype)
    check_graphs(graphs, list(zip(case.token_counts, states)), case.dynamic)


class SmallModel(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.up = nn.Linear(16, 24, dtype=dtype)
        self.down = nn.Linear(24, 12, dtype=dtype)
        self.head = nn.Linear(12, 8, bias=False, dtype=dtype)

    def forward(self, x):
        return self.head(torch.relu(self.down(nn.functional.gelu(self.up(x)))))


def run_inject_torch(case, gen):
    """A small torch model with inject_lora: a training step (compiled and eager on the same weights), then the
    reference pass under lk.disable_adapter, as DPO does."""
    torch.manual_seed(case.extra["init_seed"])
    model = SmallModel(case.dtype)
    lk.inject_lora(model, case.extra["targets"], r=case.extra["r"], lora_alpha=8, lora_dropout=case.dropout,
                   init_lora_weights=False, backend=case.backend, bias=case.extra["bias_mode"])
    model.train(case.train)
    compiled, graphs = compile_counted(model, case.compiler, case.dynamic)
    params = [p for p in model.parameters() if p.requires_grad]
    for call, tokens in enumerate(case.token_counts):
        x = make_x(case.lead + (tokens, 16), case.dtype, case.noncontig, False, gen)
        for disabled in (False, True):
            results = []
            for run in (model, compiled):
                torch.manual_seed(3000 + call)
                # the context manager switches the layers of the model the OptimizedModule wraps
                ctx = lk.disable_adapter(run) if disabled else contextlib.nullcontext()
                with ctx:
                    y = run(x)
                results.append([y] + (grads_of(y, params, call) if case.train and not disabled else []))
            for i, (got, want) in enumerate(zip(results[1], results[0])):
                check(f"call {call} ({tokens} tokens, disabled={disabled}) output {i}", got, want, case.compute_dtype)
    check_graphs(graphs, [(tokens, disabled) for tokens in case.token_counts for disabled in (False, True)],
                 case.dynamic)


def run_hf_llama(case, gen):
    """A tiny HF Llama with inject_lora: the training step's loss and LoRA gradients, then the reference pass
    (lk.disable_adapter, no grad) as DPO takes it, compiled as one graph each."""
    transformers = pytest.importorskip("transformers")
    from conftest import tiny_llama_config
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config()).to(case.dtype)
    lk.inject_lora(model, case.extra["targets"], r=4, lora_dropout=case.dropout, init_lora_weights=False,
                   backend=case.backend)
    model.train(case.train)
    compiled, graphs = compile_counted(model, case.compiler, case.dynamic)
    params = [p for p in model.parameters() if p.requires_grad]
    for call, tokens in enumerate(case.token_counts):
        ids = torch.randint(0, 128, (2, tokens), generator=gen)
        results = []
        for run in (model, compiled):
            torch.manual_seed(4000 + call)
            loss = run(input_ids=ids, labels=ids, use_cache=False).loss
            results.append([loss] + (list(torch.autograd.grad(loss, params)) if case.train else []))
            with torch.no_grad(), lk.disable_adapter(run):
                results[-1].append(run(input_ids=ids, use_cache=False).logits)
        for i, (got, want) in enumerate(zip(results[1], results[0])):
            check(f"call {call} ({tokens} tokens) output {i}", got, want, case.compute_dtype)
    # the reference pass: no labels, grad mode off and the adapters disabled, a graph of its own
    check_graphs(graphs, [(tokens, state) for tokens in case.token_counts for state in ("train", "reference")],
                 case.dynamic)


def run_dropout_inductor(case, gen):
    """LoRALinear with dropout, trained under Inductor. With fallback_random the mask is eager's (same outputs and
    gradients under the same seed); without, Inductor draws its own seed: a step is reproducible under the seed,
    another seed draws another mask, and the backward uses the forward's mask (dB = s·dYᵀ·S with S recovered from
    the forward's output: LoRA term = s·S·Bᵀ, B of full column rank)."""
    layer = _lora_layer(case, gen).train()
    K, N, scaling = layer.in_features, layer.out_features, layer.scaling
    x = make_x(case.lead + (case.token_counts[0], K), case.dtype, case.noncontig, True, gen)
    params = [layer.lora_A.weight, layer.lora_B.weight]

    def step(run, seed):
        torch.manual_seed(seed)
        y = run(x)
        return [y] + grads_of(y, [x] + params, seed)

    import torch._inductor.config as inductor_config
    with inductor_config.patch(fallback_random=True):
        compiled, graphs = compile_counted(layer, "inductor", case.dynamic)
        for i, (got, want) in enumerate(zip(step(compiled, 7), step(layer, 7))):
            check(f"fallback_random output {i}", got, want, case.compute_dtype)
    torch._dynamo.reset()
    compiled, graphs = compile_counted(layer, "inductor", case.dynamic)
    first, again, other = step(compiled, 7), step(compiled, 7), step(compiled, 8)
    for i, (a, b) in enumerate(zip(first, again)):
        assert torch.equal(a, b), f"output {i}: a compiled step is not reproducible under its seed"
    assert not torch.equal(first[0], other[0]), "another seed drew the same mask"
    with torch.no_grad():
        base = nn.functional.linear(x, layer.weight, layer.bias)
        layer.eval()
        assert not torch.equal(first[0], layer(x)), "dropout was not active"
    y, d_lora_b = first[0].double(), first[-1].double()
    lora_term = (y - base.double()).reshape(-1, N) / scaling
    s = torch.linalg.lstsq(layer.lora_B.weight.detach().double(), lora_term.T).solution.T  # [M, r]
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).double().reshape(-1, N)
    assert rel_error(d_lora_b, scaling * g.T @ s) <= 1e-4, "dB does not use the forward's dropout mask"


class Checkpointed(nn.Module):
    """Two LoRA layers, the first inside non-reentrant activation checkpointing: its backward recomputes the
    forward, dropout mask included (README: the same mask)."""

    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        hidden = torch.utils.checkpoint.checkpoint(lambda t: nn.functional.gelu(self.first(t)), x,
                                                   use_reentrant=False)
        return self.second(hidden)


def run_checkpointed(case, gen):
    K, N, r = case.extra["K"], case.extra["N"], case.extra["r"]
    layers = [lk.LoRALinear(k, n, r=r, lora_dropout=case.dropout, init_lora_weights=False, backend=case.backend,
                            dtype=case.dtype) for k, n in ((K, N), (N, K))]
    model = Checkpointed(*layers).train()
    compiled, graphs = compile_counted(model, case.compiler, case.dynamic)
    params = [p for p in model.parameters() if p.requires_grad]
    for call, tokens in enumerate(case.token_counts):
        x = make_x(case.lead + (tokens, K), case.dtype, case.noncontig, True, gen)
        results = []
        for run in (model, compiled):
            torch.manual_seed(5000 + call)
            y = run(x)
            results.append([y] + grads_of(y, [x] + params, call))
        for i, (got, want) in enumerate(zip(results[1], results[0])):
            check(f"call {call} ({tokens} tokens) output {i}", got, want, case.compute_dtype)
    check_graphs(graphs, [(tokens, None) for tokens in case.token_counts], case.dynamic)


def _stacked_adapters(num_slots, max_rank, K, N, ranks, dtype, gen):
    """lora_a [L, R, K], lora_b [L, N, R] with NaN past each slot's rank (never to be read)."""
    lora_a = (torch.randn(num_slots, max_rank, K, generator=gen) * K ** -0.5).to(dtype)
    lora_b = (torch.randn(num_slots, N, max_rank, generator=gen) * max_rank ** -0.5).to(dtype)
    for slot, rank in enumerate(ranks):
        lora_a[slot, rank:] = float("nan")
        lora_b[slot, :, rank:] = float("nan")
    return lora_a, lora_b


def _ids(shape, num_slots, gen):
    return torch.randint(-1, num_slots, shape, generator=gen)


def run_multi_lora_linear(case, gen):
    K, N, L, R = case.extra["K"], case.extra["N"], case.extra["L"], case.extra["R"]
    ranks_list = case.extra["ranks"]
    dtype = F32 if case.autocast else case.dtype
    weight = (torch.randn(N, K, generator=gen) * K ** -0.5).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype) if case.extra["bias"] else None
    lora_a, lora_b = _stacked_adapters(L, R, K, N, ranks_list, dtype, gen)
    scalings_list = [round(0.5 + i * 0.75, 2) for i in range(L)]
    scalings = scalings_list if case.extra["lists"] else torch.tensor(scalings_list)
    ranks = ranks_list if case.extra["lists"] else torch.tensor(ranks_list, dtype=torch.int32)
    grads = case.extra["grads"] if case.train else ""
    for name, t in (("a", lora_a), ("b", lora_b), ("w", weight), ("bias", bias)):
        if t is not None and name in grads:
            t.requires_grad_(True)
    as_batch, backend = case.extra["batch_outside"], case.backend

    def fn(x, weight, lora_a, lora_b, ids, bias):
        return lk.multi_lora_linear(x, weight, lora_a, lora_b, ids, scalings, bias, ranks=ranks, backend=backend)

    compiled, graphs = compile_counted(fn, case.compiler, case.dynamic)
    for call, tokens in enumerate(case.token_counts):
        lead = case.lead + (tokens,)
        x = make_x(lead + (K,), dtype, case.noncontig, "x" in grads, gen)
        ids = _ids(lead, L, gen)  # new ids every call
        if as_batch:
            ids = LoRABatch.from_adapter_ids(ids, L)
        leaves = [t for t in (x, weight, lora_a, lora_b, bias) if t is not None and t.requires_grad]
        results = []
        for run in (fn, compiled):
            with autocast_ctx(case.autocast):
                y = run(x, weight, lora_a, lora_b, ids, bias)
            results.append([y] + grads_of(y, leaves, call))
        for i, (got, want) in enumerate(zip(results[1], results[0])):
            check(f"call {call} ({tokens} tokens) output {i}", got, want, case.compute_dtype)
    check_graphs(graphs, [(tokens, None) for tokens in case.token_counts], case.dynamic)


def _multi_layer(case, gen, base=None):
    K, N, L, R = case.extra["K"], case.extra["N"], case.extra["L"], case.extra["R"]
    layer = lk.MultiLoRALinear(base or nn.Linear(K, N, dtype=case.dtype), max_adapters=L, max_rank=R,
                               backend=case.backend, adapter_dtype=case.extra.get("adapter_dtype"))
    for slot, rank in enumerate(case.extra["ranks"]):
        if rank:
            layer.set_adapter(slot, torch.randn(rank, K, generator=gen) * K ** -0.5,
                              torch.randn(N, rank, generator=gen) * rank ** -0.5, scaling=0.5 + slot)
    if case.train:
        layer.lora_a.requires_grad_(True)
        layer.lora_b.requires_grad_(True)
    return layer


def run_multi_layer_ids(case, gen):
    """MultiLoRALinear(x, adapter_ids) with new ids (and a new token count) every call."""
    layer = _multi_layer(case, gen)
    L = case.extra["L"]
    compiled, graphs = compile_counted(layer, case.compiler, case.dynamic)
    params = [p for p in layer.parameters() if p.requires_grad]
    for call, tokens in enumerate(case.token_counts):
        lead = case.lead + (tokens,)
        x = make_x(lead + (case.extra["K"],), case.dtype, case.noncontig, case.train, gen)
        ids = _ids(lead, L, gen)
        if case.extra["batch_outside"]:
            ids = LoRABatch.from_adapter_ids(ids, L)
        leaves = [x] + params if case.train else []
        results = []
        for run in (layer, compiled):
            with autocast_ctx(case.autocast):
                y = run(x, ids)
            results.append([y] + grads_of(y, leaves, call))
        for i, (got, want) in enumerate(zip(results[1], results[0])):
            check(f"call {call} ({tokens} tokens) output {i}", got, want, case.compute_dtype)
    check_graphs(graphs, [(tokens, None) for tokens in case.token_counts], case.dynamic)


def run_multi_model_names(case, gen):
    """prepare_multi_adapter on a small model, adapters put in slots by name, and set_batch_adapters lists: a new
    list of as many names reuses the graph (README: the ids are an input of it), a list with no adapter gets one of
    its own (the base-only shortcut)."""
    torch.manual_seed(case.extra["init_seed"])
    model = SmallModel(case.dtype)
    L, R = case.extra["L"], case.extra["R"]
    lk.prepare_multi_adapter(model, ["up", "down"], max_adapters=L, max_rank=R, backend=case.backend)
    names = [f"ad{slot}" for slot in range(L)]
    for module in model.modules():
        if isinstance(module, lk.MultiLoRALinear):
            for slot, rank in enumerate(case.extra["ranks"]):
                module.set_adapter(slot, torch.randn(rank, module.in_features, generator=gen) * 0.3,
                                   torch.randn(module.out_features, rank, generator=gen) * 0.3, scaling=1.0 + slot)
            if case.train:
                module.lora_a.requires_grad_(True)
                module.lora_b.requires_grad_(True)
    model.lora_adapter_slots = {name: slot for slot, name in enumerate(names)}
    model.train(case.train)
    compiled, graphs = compile_counted(model, case.compiler, case.dynamic)
    params = [p for p in model.parameters() if p.requires_grad]
    lists = case.extra["name_lists"]
    for call, (tokens, name_list) in enumerate(zip(case.token_counts, lists)):
        x = make_x((len(name_list), tokens, 16), case.dtype, case.noncontig, False, gen)
        results = []
        for run in (model, compiled):
            with lk.set_batch_adapters(model, list(name_list)):
                y = run(x)
            results.append([y] + grads_of(y, params, call))
        for i, (got, want) in enumerate(zip(results[1], results[0])):
            check(f"call {call} ({tokens} tokens, {name_list}) output {i}", got, want, case.compute_dtype)
    states = [(len(names), any(name != "__base__" for name in names)) for names in lists]
    check_graphs(graphs, list(zip(case.token_counts, states)), case.dynamic)


def run_serving_ops(case, gen):
    """lk.ops.add_lora with output slices (or lora_shrink + lora_expand into a column slice), under no_grad, with
    new ids every call, the batch built outside or inside the compiled function."""
    K, L, R = case.extra["K"], case.extra["L"], case.extra["R"]
    widths, ranks_list = case.extra["widths"], case.extra["ranks"]
    dtype, backend = case.dtype, case.backend
    slices = [_stacked_adapters(L, R, K, w, ranks_list, dtype, gen) for w in widths]
    a_slices, b_slices = [a for a, _ in slices], [b for _, b in slices]
    scalings = torch.tensor([0.5 + slot for slot in range(L)])
    ranks = torch.tensor(ranks_list, dtype=torch.int32)
    op, inside, deterministic = case.extra["op"], not case.extra["batch_outside"], case.extra["deterministic"]

    def fn(y, x, ids):
        batch = LoRABatch.from_adapter_ids(ids, L) if inside else ids
        y = y.clone()
        if op == "add_lora":
            return lk.ops.add_lora(y, x, a_slices, b_slices, batch, scalings, ranks, list(widths), backend=backend,
                                   deterministic=deterministic)
        offset = sum(widths[:-1])  # the last slice, into its columns
        shrunk = lk.ops.lora_shrink(x, a_slices[-1], batch, scalings, ranks, backend=backend,
                                    deterministic=deterministic)
        return lk.ops.lora_expand(shrunk, b_slices[-1], batch, y, offset, ranks, backend=backend), shrunk

    compiled, graphs = compile_counted(fn, case.compiler, case.dynamic)
    with torch.no_grad():
        for call, tokens in enumerate(case.token_counts):
            x = make_x((tokens, K), dtype, case.noncontig, False, gen)
            y = torch.randn(tokens, sum(widths), generator=gen).to(dtype)
            ids = _ids((tokens,), L, gen)
            if not inside:
                ids = LoRABatch.from_adapter_ids(ids, L)
            want, got = fn(y, x, ids), compiled(y, x, ids)
            want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
            for i, (g, w) in enumerate(zip(got, want)):
                check(f"call {call} ({tokens} tokens) output {i}", g, w, F32 if w.dtype == F32 else dtype)
    check_graphs(graphs, [(tokens, None) for tokens in case.token_counts], case.dynamic)


def _func_entry(case, gen):
    """(f(params, x, ids) -> y, params): the case's entry point as a function of its trainable tensors (the LoRA
    factors), for torch.func; ids are the adapter ids of the grouped entries (None for the others)."""
    K, N, entry, backend = case.extra["K"], case.extra["N"], case.extra["entry"], case.backend
    if entry in ("LoRALinear", "MultiLoRALinear"):
        layer = _lora_layer(case, gen) if entry == "LoRALinear" else _multi_layer(case, gen)
        params = {name: t.detach() for name, t in layer.named_parameters() if "lora" in name}
        if entry == "LoRALinear":
            return (lambda p, x, ids: functional_call(layer, p, (x,))), params
        return (lambda p, x, ids: functional_call(layer, p, (x, ids))), params
    weight = (torch.randn(N, K, generator=gen) * K ** -0.5).to(case.dtype)
    bias = torch.randn(N, generator=gen).to(case.dtype) if case.extra["bias"] else None
    if entry == "lora_linear":
        r, scaling, p = case.extra["r"], case.extra["scaling"], case.dropout
        params = {"lora_a": (torch.randn(r, K, generator=gen) * K ** -0.5).to(case.dtype),
                  "lora_b": (torch.randn(N, r, generator=gen) * r ** -0.5).to(case.dtype)}
        return (lambda q, x, ids: lk.lora_linear(x, weight, q["lora_a"], q["lora_b"], scaling, bias, dropout_p=p,
                                                 backend=backend)), params
    L, R, ranks = case.extra["L"], case.extra["R"], case.extra["ranks"]
    lora_a, lora_b = _stacked_adapters(L, R, K, N, ranks, case.dtype, gen)
    scalings, ranks = torch.tensor([0.5 + slot for slot in range(L)]), torch.tensor(ranks, dtype=torch.int32)
    return (lambda q, x, ids: lk.multi_lora_linear(x, weight, q["lora_a"], q["lora_b"], ids, scalings, bias,
                                                   ranks=ranks, backend=backend)), {"lora_a": lora_a, "lora_b": lora_b}


def _func_transform(name, f):
    """The transform `name` of f(params, x, ids), as a function of the same arguments. vmap maps over a leading
    batch dimension of x with one dropout mask for the batch (randomness="same"); the loss is taken in float32."""

    def loss(params, x, ids):
        return f(params, x, ids).float().square().sum()

    def penalty(params, x, ids):  # a gradient penalty: its gradient takes second derivatives
        return grad(loss, argnums=1)(params, x, ids).float().square().sum()

    return {"grad": grad(loss),
            "vmap": vmap(f, in_dims=(None, 0, None), randomness="same"),
            "per_sample_grad": vmap(grad(loss), in_dims=(None, 0, None), randomness="same"),
            "jacrev": jacrev(lambda params, x, ids: f(params, x, ids).float().sum(0)),
            "grad_of_penalty": grad(penalty)}[name]


def run_torch_func(case, gen):
    """A torch.func transform of an entry point compiled whole (torch.compile(torch.func.grad(f)), fullgraph=True)
    against the same transform run eagerly: gradients of a loss over the LoRA factors, vmap over a batch of inputs,
    per-sample gradients, jacrev, and the gradient of a gradient penalty (second derivatives: create_graph=True
    cannot differentiate through a compiled graph, README). Eager, the transforms run the torch composition on every
    backend (README, "Higher-order gradients and torch.func"); compiled, the same composition."""
    f, params = _func_entry(case, gen)
    transform = _func_transform(case.extra["transform"], f)
    compiled, graphs = compile_counted(transform, case.compiler, case.dynamic)
    batch = (2,) if case.extra["transform"] in ("vmap", "per_sample_grad") else ()
    for call, tokens in enumerate(case.token_counts):
        x = make_x(batch + (tokens, case.extra["K"]), case.dtype, case.noncontig, False, gen)
        ids = _ids((tokens,), case.extra["L"], gen) if "L" in case.extra else None
        results = []
        for run in (transform, compiled):
            torch.manual_seed(6000 + call)  # the same dropout seed in both
            results.append(torch.utils._pytree.tree_leaves(run(params, x, ids)))
        for i, (got, want) in enumerate(zip(results[1], results[0])):
            check(f"call {call} ({tokens} tokens) output {i}", got, want, case.compute_dtype)
    check_graphs(graphs, [(tokens, None) for tokens in case.token_counts], case.dynamic)


RUNNERS = {
    "lora_linear": run_lora_linear, "LoRALinear": run_lora_module, "inject_torch": run_inject_torch,
    "hf_llama": run_hf_llama, "multi_lora_linear": run_multi_lora_linear, "multi_layer_ids": run_multi_layer_ids,
    "multi_model_names": run_multi_model_names, "serving_ops": run_serving_ops,
    "dropout_inductor": run_dropout_inductor, "checkpointed": run_checkpointed, "torch_func": run_torch_func,
}


# ------------------------------------------------------------------------------------------------ the random cases

def draw_cases(seed):
    rng = random.Random(seed)
    pick = rng.choice
    cases = []

    def common(kind, backends, **fixed):
        case = Case(kind, backend=pick(backends), dtype=pick([F32, F32, F16, BF16]), dynamic=pick([None, True]),
                    lead=pick([(), (2,), (2, 3)]), noncontig=pick(["", "", "stride", "transpose"]),
                    token_counts=tuple(rng.sample([5, 7, 11, 13, 19], rng.choice([2, 3]))))
        for key, value in fixed.items():
            setattr(case, key, value)
        return case

    def autocast_or_none(case):
        """An autocast dtype for some float32 cases (the reference backend is not autocast's)."""
        return pick([BF16, F16]) if case.dtype == F32 and case.backend != "reference" and rng.random() < 0.3 else None

    single = ["torch", "cpu", "triton", "auto", "reference"]
    for i in range(8):
        case = common("lora_linear", single, train=rng.random() < 0.7)
        case.dropout = pick([0.0, 0.0, 0.25]) if case.train else pick([0.0, 0.25])
        case.autocast = autocast_or_none(case)
        case.extra = dict(K=pick([16, 24, 40]), N=pick([12, 20]), r=pick([1, 4, 8]), bias=rng.random() < 0.6,
                          scaling=pick([0.5, 2.0, 16 / 3]), grads=pick(["x a b", "a b", "x a b bias", "x a b w"]))
        cases.append(case)
    for i in range(5):
        case = common("LoRALinear", single, train=rng.random() < 0.7)
        case.dropout = pick([0.0, 0.25]) if case.train else 0.0
        case.autocast = autocast_or_none(case)
        n = len(case.token_counts)
        case.extra = dict(K=pick([16, 24]), N=pick([12, 20]), r=pick([2, 4]), alpha=pick([4, 8, 16]),
                          bias=rng.random() < 0.7,
                          states=tuple(rng.choice(["plain", "merged", "disabled", "eval"]) for _ in range(n)))
        cases.append(case)
    for i in range(3):
        case = common("inject_torch", single[:4], train=rng.random() < 0.7, lead=(2,), noncontig="")
        case.dropout = pick([0.0, 0.25]) if case.train else 0.0
        case.extra = dict(init_seed=i, r=pick([2, 4]), targets=pick([["up", "down"], ["up", "down", "head"], "up"]),
                          bias_mode=pick(["none", "lora_only"]))
        cases.append(case)
    for i in range(2):
        case = common("checkpointed", single[:4], train=True, dropout=0.25)
        case.extra = dict(K=pick([16, 24]), N=pick([12, 20]), r=pick([2, 4]))
        cases.append(case)
    grouped = ["torch", "cpu", "triton", "auto", "reference"]
    for i in range(6):
        case = common("multi_lora_linear", grouped, train=rng.random() < 0.6)
        case.autocast = autocast_or_none(case)
        L, R = pick([2, 3]), pick([4, 8])
        case.extra = dict(K=pick([16, 24]), N=pick([12, 20]), L=L, R=R,
                          ranks=[rng.randint(1 if s == 0 else 0, R) for s in range(L)], bias=rng.random() < 0.5,
                          lists=rng.random() < 0.3, batch_outside=rng.random() < 0.5,
                          grads=pick(["x a b", "a b", "x a b w bias"]))
        cases.append(case)
    for i in range(3):
        case = common("multi_layer_ids", grouped[:4], train=rng.random() < 0.5)
        L, R = pick([2, 3]), 4
        case.autocast = autocast_or_none(case)
        case.extra = dict(K=16, N=12, L=L, R=R, ranks=[rng.randint(0, R) for _ in range(L)],
                          batch_outside=rng.random() < 0.5, adapter_dtype=F32 if case.dtype == BF16 else None)
        cases.append(case)
    for i in range(2):
        lists = [("ad0", "__base__"), ("ad1", "ad0"), ("ad0", "__base__"), ("__base__", "__base__")]
        case = common("multi_model_names", grouped[:4], train=i == 0, lead=(), noncontig="")
        case.token_counts = (5, 7, 9, 11)
        case.extra = dict(init_seed=i, L=2, R=4, ranks=[4, 2], name_lists=tuple(lists))
        cases.append(case)
    for i in range(4):
        case = common("serving_ops", ["torch", "cpu", "triton", "auto", "reference"], lead=(), train=False)
        L, R = pick([2, 3]), pick([4, 8])
        case.extra = dict(K=pick([16, 24]), L=L, R=R, widths=pick([(8,), (8, 4, 4), (12, 6)]),
                          ranks=[rng.randint(0, R) for _ in range(L)], op=pick(["add_lora", "shrink_expand"]),
                          batch_outside=rng.random() < 0.5, deterministic=rng.random() < 0.5)
        cases.append(case)
    # Inductor: a few cases of the main entry points, on the fast CPU backends
    for kind in ("lora_linear", "LoRALinear", "multi_lora_linear"):
        kind_case = next(c for c in cases if c.kind == kind)
        case = copy.deepcopy(kind_case)
        case.compiler = "inductor"
        case.backend = pick(["torch", "cpu"])
        case.dropout = 0.0
        if "r" in case.extra:
            # Rank 1 makes S·Bᵀ a product over an inner dimension of 1, which Inductor's CPU decomposition of mm
            # (torch/_inductor/decomposition.py) turns into a broadcast multiply when M + N <= 32, guarding on M:
            # one more graph on layers this small (N < 32), torch's own.
            case.extra["r"] = max(case.extra["r"], 2)
        cases.append(case)
    # torch.func transforms compiled whole: the transforms run the entry points' torch composition
    for i in range(7):
        entry = pick(["lora_linear", "LoRALinear", "multi_lora_linear", "MultiLoRALinear"])
        case = common("torch_func", single, train=True, lead=())
        case.dropout = pick([0.0, 0.25]) if entry in ("lora_linear", "LoRALinear") else 0.0
        case.extra = dict(entry=entry, transform=pick(["grad", "vmap", "per_sample_grad", "jacrev", "grad_of_penalty"]),
                          K=pick([16, 24]), N=pick([12, 20]), bias=rng.random() < 0.5)
        if entry in ("lora_linear", "LoRALinear"):
            case.extra.update(r=pick([2, 4]), alpha=pick([4, 16]), scaling=pick([0.5, 16 / 3]))
        else:
            L, R = pick([2, 3]), pick([4, 8])
            case.extra.update(L=L, R=R, ranks=[rng.randint(1 if s == 0 else 0, R) for s in range(L)])
        cases.append(case)
    # Inductor draws its own dropout seed (README): compared with eager without dropout
    cases[-1].compiler, cases[-1].backend, cases[-1].dropout = "inductor", pick(["torch", "cpu"]), 0.0
    cases.append(Case("dropout_inductor", backend=pick(["torch", "cpu"]), train=True, dropout=0.25, lead=(2,),
                      token_counts=(7,), extra=dict(K=16, N=20, r=4, alpha=8, bias=True)))
    # one tiny Llama (test_hf_models.py compiles its training step with the default settings)
    cases.append(Case("hf_llama", backend=pick(["auto", "torch", "triton"]), train=True, dropout=0.1,
                      token_counts=(5, 7), dynamic=True, extra=dict(targets=["q_proj", "o_proj", "up_proj"])))
    return cases


# COMPILE_FUZZ_SEED=<int> draws another set of cases (exploration); the default set is the one CI runs.
CASES = draw_cases(int(os.environ.get("COMPILE_FUZZ_SEED", "20261201")))


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_compiled_matches_eager(case):
    backend_or_skip(case.backend, "cpu")
    torch._dynamo.reset()  # dynamo remembers dims that went dynamic in earlier cases, which would hide a recompile
    torch._dynamo.utils.counters["graph_break"].clear()  # counted since the process started (reset keeps them)
    gen = torch.Generator().manual_seed(zlib.crc32(case.id().encode()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        RUNNERS[case.kind](case, gen)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "reference"])
def test_vmap_with_dropout_compiles_once_for_every_token_count(backend):
    """torch.compile(vmap(lora_linear with dropout), dynamic=True): one graph for every token count, with eager's
    outputs (the dropout mask op had no vmap rule: torch's fallback drew the mask once per sample and guarded on
    the sizes, so every token count compiled a graph of its own)."""
    backend_or_skip(backend, "cpu")
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    weight, lora_a, lora_b = (torch.randn(shape, generator=gen) * 0.3 for shape in ((12, 16), (4, 16), (12, 4)))
    fn = torch.func.vmap(lambda x: lk.lora_linear(x, weight, lora_a, lora_b, 2.0, dropout_p=0.25, backend=backend),
                         randomness="same")
    compiled, graphs = compile_counted(fn, "aot_eager", True)
    for tokens in (5, 7, 11):
        x = torch.randn(2, tokens, 16, generator=gen)
        results = []
        for run in (fn, compiled):
            torch.manual_seed(tokens)  # the same dropout seed in both
            results.append(run(x))
        check(f"{tokens} tokens", results[1], results[0], F32)
    assert len(graphs) == 1, f"{len(graphs)} graphs for 3 token counts under dynamic=True"


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "reference"])
def test_vmap_with_dropout_and_a_seed_per_sample_raises_compiled_as_eager(backend):
    """vmap(randomness="different") draws a dropout seed per sample, which the eager path cannot read: it refuses it
    by name (torch's unclear ".item() on a Tensor" error before); compiled, the mask ops' vmap rules refuse it
    (torch's fallback for ops without a vmap rule drew a mask per sample instead: compiled ran what eager refuses)."""
    backend_or_skip(backend, "cpu")
    torch._dynamo.reset()
    weight, lora_a, lora_b = torch.randn(12, 16), torch.randn(4, 16), torch.randn(12, 4)
    fn = torch.func.vmap(lambda x: lk.lora_linear(x, weight, lora_a, lora_b, 2.0, dropout_p=0.25, backend=backend),
                         randomness="different")
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"lora_linear: dropout under torch.func.vmap needs randomness='same' .*"
                                         r"got randomness='different'"):
        fn(x)
    with pytest.raises(RuntimeError, match="dropout under torch.func.vmap needs randomness="):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
