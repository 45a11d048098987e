"""The deployment path: torch.export, AOTInductor packages and saved exported programs, loaded in a fresh process the
way a serving process loads them."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

import lora_kernels as lk
from conftest import backend_or_skip, rel_error
from lora_kernels.batch import BUFFER_FIELDS

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run_python(script, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


class _Deployed(nn.Module):
    """What a deployment exports, on the CPU backends: single-adapter layers (eval, one in train mode with dropout),
    a MultiLoRALinear fed adapter ids and one fed a LoRABatch built outside, the serving ops adding into the base
    output, and lora_expand adding into a buffer the caller passes in (an input mutated in place)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)

        def randn(*shape):
            return torch.randn(*shape, generator=generator)

        self.single = nn.ModuleList()
        for backend in ("cpu", "torch", "reference"):
            layer = lk.LoRALinear.from_linear(nn.Linear(16, 12), r=4, lora_alpha=8, backend=backend)
            layer.lora_B.weight.data = randn(12, 4)  # B starts at zero, which would hide the LoRA term
            self.single.append(layer)
        self.dropped = lk.LoRALinear.from_linear(nn.Linear(16, 12), r=4, lora_alpha=8, lora_dropout=0.5,
                                                 backend="cpu")
        self.dropped.lora_B.weight.data = randn(12, 4)
        self.multi = nn.ModuleList(lk.MultiLoRALinear(nn.Linear(16, 12), max_adapters=3, max_rank=4, backend=backend)
                                   for backend in ("cpu", "torch"))
        for layer in self.multi:
            for slot in range(3):
                layer.set_adapter(slot, randn(4, 16), randn(12, 4), scaling=0.5 + slot)
        self.base = nn.Linear(16, 20)
        self.register_buffer("lora_a_slices", randn(2, 3, 4, 16))
        self.register_buffer("lora_b_slices", randn(2, 3, 10, 4))
        self.register_buffer("scalings", torch.tensor([1.0, 0.5, 2.0]))
        self.register_buffer("ranks", torch.tensor([4, 2, 3], dtype=torch.int32))
        self.eval()
        self.dropped.train()

    def forward(self, x, adapter_ids, batch, out):
        single = [layer(x) for layer in self.single]
        own_batch = lk.LoRABatch.from_adapter_ids(adapter_ids, 3)
        qkv = lk.ops.add_lora(self.base(x), x, list(self.lora_a_slices), list(self.lora_b_slices), own_batch,
                              self.scalings, self.ranks, [10, 10], backend="cpu")
        shrunk = lk.ops.lora_shrink(x, self.lora_a_slices[0], batch, self.scalings, self.ranks, backend="cpu")
        lk.ops.lora_expand(shrunk, self.lora_b_slices[0], batch, out, 2, self.ranks, backend="cpu")
        return (*single, self.multi[0](x, adapter_ids), self.multi[1](x, batch), qkv, self.dropped(x))


# Runs the package and the saved program on inputs of another token count than the exported one, in a process that
# imported nothing but torch and lora_kernels (argv: the package, the saved program, the inputs, where to write).
_LOAD_AND_RUN = """
import sys
import pytest
import torch
import lora_kernels  # what a deployment imports before loading: it registers the ops and the LoRABatch node

package, program, inputs, results = sys.argv[1:]
x, adapter_ids, batch, out = torch.load(inputs, weights_only=True)  # a LoRABatch among them
runner = torch._inductor.aoti_load_package(package)
compiled_out = out.clone()
compiled = runner(x, adapter_ids, batch, compiled_out)
torch.manual_seed(5)
seeded = runner(x, adapter_ids, batch, out.clone())[-1]
torch.manual_seed(5)
reseeded = runner(x, adapter_ids, batch, out.clone())[-1]
exported_out = out.clone()
exported = torch.export.load(program).module()(x, adapter_ids, batch, exported_out)
# the last output is the dropout layer's: compared on its own
torch.save({"compiled": (*compiled[:-1], compiled_out), "exported": (*exported[:-1], exported_out),
            "dropout": (compiled[-1], seeded, reseeded)}, results)
"""

# The package loaded without `import lora_kernels`: prints the error.
_LOAD_WITHOUT_IMPORT = """
import sys
import pytest
import torch

try:
    torch._inductor.aoti_load_package(sys.argv[1])
except Exception as error:
    print(f"{type(error).__name__}: {error}")
"""


def test_an_aoti_package_and_a_saved_program_run_in_a_fresh_process_after_import_lora_kernels(tmp_path):
    """AOTInductor packages and saved programs of LoRA layers (the cpu, torch and reference backends; adapter ids
    and LoRABatch inputs; the in-place serving ops) run in another process with a dynamic token count, as the eager
    model computes, once that process imports lora_kernels; without the import, loading the package names the
    missing op. The package draws a new dropout mask per call (the seed is drawn in the graph), reproducible under
    torch.manual_seed. ~25 s on 2 CPU cores, most of it Inductor's C++ compile."""
    backend_or_skip("cpu", "cpu")  # the C++ extension's ops
    model = _Deployed()
    tokens = torch.export.Dim("tokens", min=2, max=64)
    batch_shapes = [{0: tokens} if name in ("adapter_ids", "sorted_token_ids") else None for name in BUFFER_FIELDS]

    def inputs(count, seed):
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(-1, 3, (count,), generator=generator)
        return (torch.randn(count, 16, generator=generator), ids, lk.LoRABatch.from_adapter_ids(ids, 3),
                torch.randn(count, 12, generator=generator))

    exported = torch.export.export(model, inputs(7, 0),
                                   dynamic_shapes=({0: tokens}, {0: tokens}, batch_shapes + [None], {0: tokens}))
    package, program, saved_inputs = tmp_path / "model.pt2", tmp_path / "program.pt2", tmp_path / "inputs.pt"
    torch._inductor.aoti_compile_and_package(exported, package_path=str(package))
    torch.export.save(exported, program)
    x, adapter_ids, batch, out = inputs(13, 1)
    torch.save((x, adapter_ids, batch, out), saved_inputs)

    proc = _run_python(_LOAD_AND_RUN, package, program, saved_inputs, tmp_path / "results.pt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(tmp_path / "results.pt")
    eager_out = out.clone()
    with torch.no_grad():
        eager = (*model(x, adapter_ids, batch, eager_out)[:-1], eager_out)
    for way in ("compiled", "exported"):
        for index, (value, want) in enumerate(zip(results[way], eager, strict=True)):
            assert rel_error(value, want) <= 1e-6, f"{way} output {index}: {rel_error(value, want):.2e}"
    first, seeded, reseeded = results["dropout"]
    torch.testing.assert_close(seeded, reseeded, rtol=0, atol=0)
    assert not torch.equal(first, seeded)

    # the ExportedProgram's decompositions (functionalized in-place ops) compute the same
    decomposed_out = out.clone()
    decomposed = exported.run_decompositions().module()(x, adapter_ids, batch, decomposed_out)
    for value, want in zip((*decomposed[:-1], decomposed_out), eager, strict=True):
        assert rel_error(value, want) <= 1e-6

    proc = _run_python(_LOAD_WITHOUT_IMPORT, package)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("RuntimeError: Could not find schema for lora_kernels::"), proc.stdout


def test_importing_lora_kernels_registers_every_custom_op_a_traced_call_can_record():
    """A process that loads an exported program or AOTInductor package resolves its custom ops by name, and the
    Triton kernels' ops were registered only when their module was first used: a package exported with the triton
    backend (the auto choice for the grouped ops on GPUs) failed to load after `import lora_kernels` ("Could not
    find schema for lora_kernels_triton::sgmv_shrink")."""
    backend_or_skip("cpu", "cpu")  # the C++ extension's ops
    script = """
import importlib, json, pkgutil, torch

def ours():
    return {name for name in torch._C._dispatch_get_all_op_names() if name.split("::")[0].startswith("lora_kernels")}

import lora_kernels
after_import = ours()
for module in pkgutil.walk_packages(lora_kernels.__path__, "lora_kernels."):
    if not module.name.endswith("__main__"):  # runs the command line
        importlib.import_module(module.name)
print(json.dumps([sorted(after_import), sorted(ours() - after_import)]))
"""
    proc = _run_python(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    registered, missing = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"lora_kernels::lora_fwd", "lora_kernels::torch_dropout_keep"} <= set(registered), registered
    assert not missing, f"registered only when another module is imported: {missing}"


# ------------------------------------------------------------------ README claims, checked as written (helper79)

# Loads a saved program in a process that does not import lora_kernels, and runs it (argv: the program, its input).
_LOAD_SAVED_PROGRAM_WITHOUT_IMPORT = """
import sys
import pytest
import torch

try:
    program = torch.export.load(sys.argv[1])
except Exception as error:
    print(f"{type(error).__name__}: {error}")
else:
    y = program.module()(*torch.load(sys.argv[2], weights_only=False))
    print(f"loaded {'lora_kernels' in sys.modules} {y.shape}")
"""


def test_a_saved_program_loaded_without_import_lora_kernels_fails_unless_its_inputs_hold_a_lora_batch(tmp_path):
    """README, Serving stacks: without `import lora_kernels`, torch.export.load logs "We failed to resolve
    torch.ops.lora_kernels.lora_fwd.default" and fails; a program whose example inputs hold a LoRABatch loads,
    because unpickling them imports the package. ~8 s, two fresh processes importing torch."""
    backend_or_skip("cpu", "cpu")  # the C++ extension's ops
    single = lk.LoRALinear.from_linear(nn.Linear(16, 12), r=4, backend="cpu").eval()
    multi = lk.MultiLoRALinear(nn.Linear(16, 12), max_adapters=2, max_rank=4, backend="cpu").eval()
    x = torch.randn(5, 16)
    cases = {"single": (single, (x,)), "multi": (multi, (x, lk.LoRABatch.from_adapter_ids(
        torch.tensor([0, -1, 1, 0, 1]), 2)))}
    outputs = {}
    for name, (module, inputs) in cases.items():
        torch.export.save(torch.export.export(module, inputs), tmp_path / f"{name}.pt2")
        torch.save(inputs, tmp_path / f"{name}.pt")
        proc = _run_python(_LOAD_SAVED_PROGRAM_WITHOUT_IMPORT, tmp_path / f"{name}.pt2", tmp_path / f"{name}.pt")
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[name] = (proc.stdout, proc.stderr)
    stdout, stderr = outputs["single"]
    assert stdout.startswith("RuntimeError: "), stdout
    assert "We failed to resolve torch.ops.lora_kernels.lora_fwd.default" in stderr, stderr[-3000:]
    assert outputs["multi"][0].strip() == "loaded True torch.Size([5, 12])", outputs["multi"]


def test_backward_through_an_exported_program_raises_instead_of_dropping_the_lora_gradients():
    """torch.export keeps the C++ kernel ops but not the autograd Functions around them. Training through the
    exported program lost the LoRA terms without a word (lora_a.grad None, x.grad off by 100%) or, on CPU, followed
    the kernel's ATen calls by chance; now the single-adapter ops' backward raises, and sgmv_expand (in place, no
    output to raise from) refuses a t that requires grad. Without grad the exported programs still compute."""
    backend_or_skip("cpu", "cpu")  # the C++ extension's ops
    torch.manual_seed(0)
    single = lk.LoRALinear(16, 12, r=4, backend="cpu")
    nn.init.normal_(single.lora_B.weight)
    multi = lk.MultiLoRALinear(nn.Linear(16, 12), max_adapters=2, max_rank=4, backend="cpu")
    multi.set_adapter(0, torch.randn(4, 16), torch.randn(12, 4), 1.0)
    multi.lora_a.requires_grad_(True)
    x, ids = torch.randn(5, 16, requires_grad=True), torch.tensor([0, 0, -1, 0, 0])
    exported_single = torch.export.export(single, (x,)).module()
    exported_multi = torch.export.export(multi, (x, ids)).module()
    with torch.no_grad():
        torch.testing.assert_close(exported_single(x), single(x))
        torch.testing.assert_close(exported_multi(x, ids), multi(x, ids))
    loss = exported_single(x).sum()
    with pytest.raises(RuntimeError, match="derivative for lora_kernels::lora_fwd is not implemented"):
        loss.backward()
    with pytest.raises(RuntimeError, match="lora_kernels::sgmv_expand is not differentiable, but t requires grad"):
        exported_multi(x, ids)


def test_the_raw_cpp_ops_refuse_or_raise_for_every_input_that_requires_grad():
    """Called directly (an exported program's graph calls them so), each C++ op with an input that requires grad
    either raises in backward (lora_fwd, lora_bwd_dy, sgmv_shrink: autograd's not-implemented fallback) or refuses
    it at once (sgmv_expand, in place: no output to raise from), for lora_b alone too. Without the fallback
    sgmv_shrink's x got no gradient and lora_bwd_dy's dy one from the kernel's own ATen calls, with a warning only;
    an expand refusing only t let a LoRA-FA layer (A frozen, B trained) train without B's gradient (helper 176)."""
    backend_or_skip("cpu", "cpu")
    ops = torch.ops.lora_kernels
    ids = torch.tensor([0, 1, -1])
    batch = lk.LoRABatch.from_adapter_ids(ids, 2)
    meta = (batch.sorted_token_ids, batch.slot_starts, batch.slot_counts)
    ranks = torch.full((2,), 4, dtype=torch.int32)
    x = torch.randn(3, 8, requires_grad=True)
    shrunk = ops.sgmv_shrink(x, torch.randn(2, 4, 8), *meta, torch.ones(2), ranks)
    with pytest.raises(RuntimeError, match="derivative for lora_kernels::sgmv_shrink is not implemented"):
        shrunk.sum().backward()
    dy = torch.randn(3, 5, requires_grad=True)
    _, ds = ops.lora_bwd_dy(dy, torch.randn(3, 4), torch.randn(5, 4), 1.0)
    with pytest.raises(RuntimeError, match="derivative for lora_kernels::lora_bwd_dy is not implemented"):
        ds.sum().backward()
    for t, lora_b, name in ((torch.randn(3, 4, requires_grad=True), torch.randn(2, 5, 4), "t"),
                            (torch.randn(3, 4), torch.randn(2, 5, 4, requires_grad=True), "lora_b")):
        with pytest.raises(RuntimeError, match=f"sgmv_expand is not differentiable, but {name} requires grad"):
            ops.sgmv_expand(t, lora_b, *meta, ranks, torch.zeros(3, 5), 0)
    # a leaf out that requires grad (helper 188): it was written, where torch's own in-place ops refuse it
    out = torch.zeros(3, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="sgmv_expand: out is a leaf tensor that requires grad, which an in-place "
                                           "op cannot write"):
        ops.sgmv_expand(torch.randn(3, 4), torch.randn(2, 5, 4), *meta, ranks, out, 0)
    # and a view of one (torch's in-place ops refuse both): it was written
    with pytest.raises(RuntimeError, match="sgmv_expand: out is a view of a leaf tensor that requires grad"):
        ops.sgmv_expand(torch.randn(3, 4), torch.randn(2, 5, 4), *meta, ranks, out[:, :], 0)
    assert torch.equal(out.detach(), torch.zeros(3, 5))
    # a graph node (an exported program's y = F.linear(x, W) of a trained W) is added into, its gradient unchanged
    weight = torch.ones((), requires_grad=True)
    node = weight * torch.ones(3, 5)
    ops.sgmv_expand(torch.randn(3, 4), torch.randn(2, 5, 4), *meta, ranks, node, 0)
    node.sum().backward()
    assert weight.grad == 15 and not torch.equal(node.detach(), torch.ones(3, 5))
    with torch.no_grad():  # what an exported program computes without grad
        ops.sgmv_expand(torch.randn(3, 4), torch.randn(2, 5, 4, requires_grad=True), *meta, ranks,
                        torch.zeros(3, 5), 0)
        ops.sgmv_expand(torch.randn(3, 4), torch.randn(2, 5, 4), *meta, ranks, out, 0)
    assert out.detach().abs().sum() > 0


def test_the_grouped_triton_ops_of_an_exported_program_refuse_inputs_that_require_grad():
    """The grouped Triton ops write into an output and return nothing: through an exported program, whose graph keeps
    them without multi_lora_linear's autograd Function, x and the slots that required grad got no LoRA gradient and
    no error. Now each refuses such inputs in grad mode; without grad the program computes, and torch.compile (which
    keeps the Function) still trains."""
    from lora_kernels.triton import HAS_TRITON, INTERPRET
    if not (HAS_TRITON and INTERPRET):
        pytest.skip("the triton backend on CPU tensors needs the Triton interpreter")
    torch.manual_seed(0)
    multi = lk.MultiLoRALinear(nn.Linear(16, 12), max_adapters=2, max_rank=4, backend="triton")
    multi.set_adapter(0, torch.randn(4, 16), torch.randn(12, 4), 1.0)
    multi.lora_a.requires_grad_(True)
    x, ids = torch.randn(5, 16, requires_grad=True), torch.tensor([0, 0, -1, 0, 0])
    exported = torch.export.export(multi, (x, ids)).module()
    with torch.no_grad():
        torch.testing.assert_close(exported(x, ids), multi(x, ids))
    with pytest.raises(RuntimeError, match="lora_kernels_triton::sgmv_shrink is not differentiable, but x requires "
                                           "grad"):
        exported(x, ids)
    with pytest.raises(RuntimeError, match="sgmv_shrink is not differentiable, but lora_a requires grad"):
        exported(x.detach(), ids)
    batch = lk.LoRABatch.from_adapter_ids(ids, 2)
    meta = (batch.adapter_ids, batch.sorted_token_ids, batch.slot_counts, batch.slot_starts)
    t = torch.randn(5, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="sgmv_expand is not differentiable, but t requires grad"):
        torch.ops.lora_kernels_triton.sgmv_expand(t, [torch.randn(2, 12, 4)], *meta,
                                                  torch.full((2,), 4, dtype=torch.int32), torch.zeros(5, 12), [0],
                                                  "auto")
    with pytest.raises(RuntimeError, match="segment_outer is not differentiable, but left requires grad"):
        torch.ops.lora_kernels_triton.segment_outer(t, x.detach(), *meta[1:], torch.zeros(2, 4, 16))
    compiled = torch.compile(multi, fullgraph=True)
    compiled(x, ids).sum().backward()
    assert multi.lora_a.grad is not None and multi.lora_a.grad[0].abs().sum() > 0


def test_the_raw_expand_bumps_the_version_of_the_output_it_adds_into():
    """sgmv_expand writes into out: its version counter moves, so autograd refuses a backward that saved out before
    (torch's default kernel for custom ops left the counter alone)."""
    backend_or_skip("cpu", "cpu")  # the C++ extension's ops
    batch = lk.LoRABatch.from_adapter_ids(torch.tensor([0, 1, -1]), 2)
    out = torch.zeros(3, 5)
    torch.ops.lora_kernels.sgmv_expand(torch.randn(3, 4), torch.randn(2, 5, 4), batch.sorted_token_ids,
                                       batch.slot_starts, batch.slot_counts, torch.full((2,), 4, dtype=torch.int32),
                                       out, 0)
    assert out._version == 1
