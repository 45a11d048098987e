"""`lora-kernels compare` on a tiny config: the structure of the result and the relations its numbers must obey
(parameter counts, file sizes, optimizer and gradient memory against the counts, the loss going down)."""

import io
import json
import math

import pytest
import torch

import lora_kernels
from lora_kernels import compare
from lora_kernels.compare import CompareConfig, DecoderLM, ModelConfig, run_compare

TINY = CompareConfig(model_size="tiny", device="cpu", batch_size=4, seq_len=32, steps=10, warmup=2, infer_reps=3,
                     threads=1)
FLOAT32_BYTES = 4


@pytest.fixture(scope="module")
def result():
    return run_compare(TINY)


def _injected_layer_shapes(model_cfg, targets):
    """(in, out) of every nn.Linear a target name selects, read off the model the same way PEFT matches names."""
    with torch.device("meta"):
        model = DecoderLM(model_cfg)
    return [(m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]


def test_result_structure(result):
    assert set(result["methods"]) == {"full", "lora_torch", "lora_fused"}
    for method in result["methods"].values():
        for key in ("trainable_params", "total_params", "grad_bytes", "optimizer_state_bytes", "peak_step_bytes",
                    "saved_activation_bytes", "step_ms_median", "tokens_per_s", "checkpoint_bytes", "train_losses",
                    "eval_loss"):
            assert key in method, key
        assert len(method["train_losses"]) == TINY.steps
        assert len(method["step_ms_all"]) == TINY.steps - TINY.warmup
        assert method["step_ms_median"] > 0 and method["tokens_per_s"] > 0
    assert result["methods"]["lora_torch"]["backend"] == "torch"
    assert result["backends"]["fused"] == result["methods"]["lora_fused"]["backend"]
    assert result["backends"]["fused"] in result["backends"]["available"]
    for key in ("merged_ms", "unmerged_unfused_ms", "unmerged_fused_ms"):
        assert result["inference"][key] > 0
    for key in ("memory", "optimizer_state", "gradients", "step_time", "checkpoint", "inference"):
        assert result["measurement"][key]
    assert json.loads(compare.to_json(result)) == json.loads(json.dumps(result))


def test_lora_trainable_count_is_sum_of_r_times_k_plus_n(result):
    cfg = result["config"]
    model_cfg = ModelConfig(cfg["vocab"], cfg["hidden"], cfg["layers"], cfg["heads"], cfg["intermediate"])
    shapes = _injected_layer_shapes(model_cfg, cfg["targets"])
    assert len(shapes) == 7 * cfg["layers"]
    expected = sum(cfg["rank"] * (k + n) for k, n in shapes)
    for method in ("lora_torch", "lora_fused"):
        run = result["methods"][method]
        assert run["trainable_params"] == expected
        assert run["lora_layers"] == len(shapes)
        assert run["total_params"] == result["model"]["total_params"] + expected
        assert run["trainable_percent"] == pytest.approx(100 * expected / run["total_params"])
    assert result["model"]["expected_lora_params"] == expected
    full = result["methods"]["full"]
    assert full["trainable_params"] == full["total_params"] == result["model"]["total_params"]


def test_adapter_file_is_smaller_by_the_parameter_ratio(result):
    full, lora = result["methods"]["full"], result["methods"]["lora_fused"]
    # safetensors: the raw tensor bytes plus a JSON header (under 200 bytes per tensor; tiny has 21 and 28 tensors)
    header_allowance = 16 * 1024
    assert 0 <= full["checkpoint_bytes"] - full["total_params"] * FLOAT32_BYTES < header_allowance
    assert 0 <= lora["checkpoint_bytes"] - lora["trainable_params"] * FLOAT32_BYTES < header_allowance
    assert lora["adapter_tensor_bytes"] == lora["trainable_params"] * FLOAT32_BYTES
    expected_factor = full["total_params"] / lora["trainable_params"]
    assert full["checkpoint_bytes"] / lora["checkpoint_bytes"] == pytest.approx(expected_factor, rel=0.05)
    assert full["full_torch_save_bytes"] >= full["total_params"] * FLOAT32_BYTES


def test_optimizer_state_and_gradients_follow_the_trainable_counts(result):
    for run in result["methods"].values():
        trainable = run["trainable_params"]
        assert run["grad_bytes"] == trainable * FLOAT32_BYTES
        # AdamW: exp_avg and exp_avg_sq per trainable parameter, plus one scalar `step` tensor per parameter tensor
        states = 2 * trainable * FLOAT32_BYTES
        assert states <= run["optimizer_state_bytes"] <= states + 8 * 200
    full, lora = result["methods"]["full"], result["methods"]["lora_torch"]
    expected_ratio = full["trainable_params"] / lora["trainable_params"]
    assert full["optimizer_state_bytes"] / lora["optimizer_state_bytes"] == pytest.approx(expected_ratio, rel=0.02)
    assert full["optimizer_state_bytes"] > 2 * lora["optimizer_state_bytes"]


def test_losses_are_finite_start_equal_and_go_down(result):
    methods = result["methods"]
    first = [run["train_losses"][0] for run in methods.values()]
    # same init, same data, and a fresh LoRA adapter is the identity: the first loss is the same for all three
    assert first == pytest.approx([first[0]] * 3, rel=1e-5)
    assert first[0] == pytest.approx(math.log(result["config"]["vocab"]), rel=0.25)
    for name, run in methods.items():
        assert all(math.isfinite(loss) for loss in run["train_losses"]), name
        assert run["train_losses"][-1] < run["train_losses"][0] - 0.5, name
        assert run["eval_loss"] < result["task"]["initial_eval_loss"] - 0.5, name
    # the two LoRA runs differ only in the backend: the same numbers up to rounding
    assert methods["lora_fused"]["train_losses"] == pytest.approx(methods["lora_torch"]["train_losses"], rel=1e-3)


def test_merged_model_matches_unmerged(result):
    assert result["inference"]["merged_vs_unmerged_rel_diff"] < 1e-4
    assert result["inference"]["fused_vs_unfused_rel_diff"] < 1e-3


def test_printed_table_names_every_measurement(result):
    text = compare.format_compare(result)
    for label in ("trainable params", "gradients", "optimizer state", "activations saved", "peak memory / step",
                  "step time", "tokens / s", "checkpoint on disk", "eval loss", "merged", "unmerged, torch",
                  f"LoRA, {result['backends']['fused']} (fused)", result["measurement"]["memory"]):
        assert label in text, label


def test_parameter_bytes_and_printed_ratios_follow_the_runs(result):
    """The byte counts of the result follow the parameter counts (trainable bytes count trainable parameters only),
    and each ratio printed in the table is that column's value over full fine-tuning's, not the inverse."""
    methods = result["methods"]
    for name, run in methods.items():
        assert run["trainable_param_bytes"] == run["trainable_params"] * FLOAT32_BYTES, name
        assert run["param_bytes"] == run["total_params"] * FLOAT32_BYTES, name
    assert methods["lora_torch"]["trainable_param_bytes"] < methods["lora_torch"]["param_bytes"] / 2
    text = compare.format_compare(result)
    full = methods["full"]
    for label, key in (("gradients (.grad)", "grad_bytes"), ("optimizer state (AdamW)", "optimizer_state_bytes")):
        line = next(line for line in text.splitlines() if line.startswith(label))
        assert line.count("×") == 3, line
        for name in ("full", "lora_torch", "lora_fused"):
            assert f"({methods[name][key] / full[key]:.2f}×)" in line, (name, line)
        assert methods["lora_torch"][key] / full[key] < 0.5  # so an inverted ratio cannot print the same text


def test_a_diverged_run_is_named_and_its_json_stays_standard(result):
    """Pure float16 full fine-tuning goes to nan after one AdamW step (its float16 state rounds eps and small squared
    gradients to 0): the table had printed "5.178 -> nan" with no word, and --json / --save wrote bare NaN, which
    JSON.parse and strict parsers reject."""
    import copy
    diverged = copy.deepcopy(result)
    diverged["config"]["dtype"] = "float16"
    full = diverged["methods"]["full"]
    full["train_losses"][1:] = [math.nan] * (len(full["train_losses"]) - 1)
    full["eval_loss"] = math.nan
    text = compare.format_compare(diverged)
    assert "note: full fine-tuning: the training loss is not finite from step 2 on (float16 AdamW state" in text
    assert "note: LoRA" not in text
    assert "not finite" not in compare.format_compare(result)

    def refuse(constant):
        raise ValueError(constant)

    loaded = json.loads(compare.to_json(diverged), parse_constant=refuse)
    assert loaded["methods"]["full"]["eval_loss"] is None and loaded["methods"]["full"]["train_losses"][1] is None
    assert loaded["methods"]["full"]["train_losses"][0] == full["train_losses"][0]


def test_small_ratios_keep_two_significant_digits():
    # --targets lm_head --rank 1 printed the adapter file as "976 B (0.00×)" the full checkpoint
    assert compare._ratio(976, 268130) == " (0.0036×)"
    assert compare._ratio(9.86, 468.22) == " (0.021×)"
    assert compare._ratio(34, 100) == " (0.34×)" and compare._ratio(1, 1) == " (1.00×)"
    assert compare._ratio(0, 1) == " (0.00×)" and compare._ratio(5, 0) == ""


def test_plot_writes_a_png(result, tmp_path):
    pytest.importorskip("matplotlib")
    path = compare.plot_compare(result, str(tmp_path / "compare.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_model_is_causal_and_uses_llama_names():
    cfg = ModelConfig(vocab=32, hidden=32, layers=1, heads=2, intermediate=48)
    torch.manual_seed(0)
    model = DecoderLM(cfg)
    model.init_weights()
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == set(compare.DEFAULT_TARGETS) | {"lm_head"}
    ids = torch.randint(0, 32, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 32
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :6], model(changed)[:, :6])
        assert not torch.allclose(model(ids)[:, 6:], model(changed)[:, 6:])


def test_compiled_injected_model_keeps_the_sequence_length_dynamic():
    """Fine-tuning with dynamic padding feeds a new sequence length every step. The rotary tables were cached in a
    dict keyed by the length, which made torch.compile specialise it: a graph per length even with dynamic=True
    (eager after 8). Now one graph for every length, matching eager."""
    cfg = ModelConfig(vocab=32, hidden=32, layers=1, heads=2, intermediate=48)
    torch.manual_seed(0)
    model = DecoderLM(cfg)
    model.init_weights()
    lora_kernels.inject_lora(model, compare.DEFAULT_TARGETS, r=4, lora_alpha=8, init_lora_weights=False,
                             backend="torch")
    graphs = []
    compiled = torch.compile(model, fullgraph=True, dynamic=True,
                             backend=lambda gm, example_inputs: graphs.append(gm) or gm.forward)
    for batch, seq in ((2, 5), (2, 9), (3, 13), (2, 17)):
        ids = torch.randint(0, 32, (batch, seq))
        torch.testing.assert_close(compiled(ids), model(ids))
    # 1 here; 2 allowed: dynamo may trace the first call again with the LoRA scalings (floats) specialised
    assert len(graphs) <= 2, f"{len(graphs)} graphs for 4 sequence lengths"


def test_task_is_deterministic_and_follows_the_permutation():
    perm = compare.make_task(vocab=128, task_vocab=16, seed=3)
    assert sorted(perm.tolist()) == list(range(16))
    inputs, targets = compare.make_batch(perm, 3, 8, torch.Generator().manual_seed(0))
    again, _ = compare.make_batch(perm, 3, 8, torch.Generator().manual_seed(0))
    assert torch.equal(inputs, again)
    assert torch.equal(targets, perm[inputs])
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


@pytest.mark.parametrize("change, message", [
    ({"model_size": "huge"}, "--model-size"),
    ({"targets": ("nope",)}, "--targets"),
    ({"targets": ("q_proj", "v_prj")}, "--targets 'v_prj' matched no nn.Linear"),  # had only warned
    ({"seed": 2 ** 64 - 1}, "--seed"),  # these two had ended in torch's "Overflow when unpacking long long"
    ({"seed": -2 ** 63 - 1}, "--seed"),
    ({"steps": 3, "warmup": 3}, "--warmup"),
    ({"hidden": 30, "heads": 4}, "--hidden"),
    ({"dtype": "int8"}, "--dtype"),
    ({"threads": 0}, "--threads"),
])
def test_bad_config_names_the_option(change, message):
    import dataclasses
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **change).resolved()


def test_few_steps_alone_lower_the_default_warmup():
    # --steps 3 without --warmup had been refused: "--warmup expected an int in [0, steps=3), got 3"
    default = compare.DEVICE_DEFAULTS["cpu"]["warmup"]
    for steps, warmup in ((1, 0), (2, 1), (default, default - 1), (default + 1, default), (50, default)):
        assert CompareConfig(model_size="tiny", device="cpu", steps=steps).resolved().warmup == warmup, steps
    with pytest.raises(ValueError, match=r"--warmup expected an int in \[0, steps=2\), got 2"):
        CompareConfig(model_size="tiny", device="cpu", steps=2, warmup=2).resolved()


def test_explicit_hidden_derives_heads_and_mlp_width():
    cfg = CompareConfig(model_size="small", hidden=128, layers=2, device="cpu").resolved()
    assert (cfg.hidden, cfg.layers) == (128, 2)
    assert cfg.hidden % cfg.heads == 0 and cfg.hidden // cfg.heads == 64
    assert cfg.intermediate % 16 == 0 and cfg.intermediate >= 8 * 128 // 3


@pytest.mark.parametrize("hidden, heads", [(100, 5), (96, 6), (48, 3), (64, 4), (4, 1)])
def test_explicit_hidden_gets_a_head_count_that_fits(hidden, heads):
    # "heads and MLP width follow unless given": --hidden 100 on tiny (head dim 16) had derived 100 // 16 = 6 heads,
    # then refused them ("expected a multiple of the 6 heads of --model-size tiny", which has 4)
    cfg = CompareConfig(model_size="tiny", hidden=hidden, device="cpu").resolved()
    assert cfg.heads == heads and hidden % heads == 0 and (hidden // heads) % 2 == 0


def test_progress_bar_prints_to_its_stream_only_after_the_delay():
    stream = io.StringIO()
    quiet = compare.ProgressBar(10, stream=stream, delay=60)
    for _ in range(10):
        quiet.update("step")
    assert stream.getvalue() == ""
    bar = compare.ProgressBar(10, stream=stream, delay=0)
    for i in range(10):
        bar.update(f"step {i}")
    bar.close()
    assert "100%" in stream.getvalue() and "step 9" in stream.getvalue()


def test_auto_never_repeats_the_unfused_column_when_a_fused_backend_exists(monkeypatch):
    # On GPUs backend="auto" picks the torch composition for lora_linear (measured faster); compare then shows the
    # fastest available fused backend in its 'fused' column and says why. Here the choice is forced to torch on CPU,
    # where Triton (the interpreter, under the tests) is never the one measured.
    cfg = CompareConfig(model_size="tiny", device="cpu").resolved()
    fused = [name for name in compare.FUSED_BACKENDS
             if compare.backends.unavailable_reason(name, "cpu") is None and name != "triton"]
    monkeypatch.setattr(compare.backends, "auto_backend", lambda device, op_name="lora_linear": "torch")
    chosen, note = compare.fused_backend_for(cfg)
    assert compare.FUSED_BACKENDS.index("cuda") < compare.FUSED_BACKENDS.index("triton")  # measured faster
    if fused:
        assert chosen == fused[0] and "unfused 'torch' composition" in note and repr(fused[0]) in note
    else:
        assert chosen == "torch" and "no fused backend is available" in note


def test_a_backend_named_on_the_command_line_is_run_as_asked():
    # gpu_check.sh's fallback stage runs `compare --backend torch` on a GPU, where fused backends exist: the note
    # said "no fused backend is available" there. A backend that cannot run here is refused, naming it.
    cfg = CompareConfig(model_size="tiny", device="cpu", backend="torch").resolved()
    chosen, note = compare.fused_backend_for(cfg)
    assert chosen == "torch" and "is not a fused backend" in note and "no fused backend" not in note
    if compare.backends.unavailable_reason("cpu", "cpu") is None:
        assert compare.fused_backend_for(CompareConfig(model_size="tiny", device="cpu", backend="cpu").resolved()) \
            == ("cpu", None)
    with pytest.raises(ValueError, match="compare: --backend 'cuda' is not available for cpu"):
        compare.fused_backend_for(CompareConfig(model_size="tiny", device="cpu", backend="cuda").resolved())


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_an_unfused_backend_asked_for_by_name_is_not_said_to_be_all_there_is(backend):
    # --backend torch with the C++ extension loaded had printed "no fused backend is available for cpu tensors here"
    # next to "backends available: torch, cpu"
    cfg = CompareConfig(model_size="tiny", device="cpu", backend=backend).resolved()
    chosen, note = compare.fused_backend_for(cfg)
    fused = compare._fused_available(torch.device("cpu"))
    assert chosen == backend
    assert "no fused backend is available" not in note
    assert f"--backend {backend!r} is not a fused backend" in note
    assert f"fused backends available here: {', '.join(fused) or 'none'}" in note


def test_triton_on_cpu_says_it_is_the_interpreter(monkeypatch):
    monkeypatch.setattr(compare.backends, "unavailable_reason", lambda name, device: None)
    cfg = CompareConfig(model_size="tiny", device="cpu", backend="triton").resolved()
    chosen, note = compare.fused_backend_for(cfg)
    assert chosen == "triton" and "Triton interpreter" in note and "not a kernel's" in note


def test_saved_activations_count_neither_parameters_nor_their_casts():
    """A bf16 LoRA layer with float32 factors also saves the factors' bf16 casts: weight memory of a size fixed by
    the model, not activations (they made LoRA's activations exceed full fine-tuning's on the tiny bf16 model). The
    count equals that of the same layer with bf16 factors, which need no cast."""
    from lora_kernels import LoRALinear

    class Head(torch.nn.Module):
        def __init__(self, float32_factors):
            super().__init__()
            self.proj = LoRALinear(16, 8, r=4, dtype=torch.bfloat16, backend="cpu",
                                   autocast_adapter_dtype=float32_factors)

        def forward(self, x):
            return self.proj(x).unsqueeze(0)  # [1, M, vocab] logits for lm_loss

    x, targets = torch.randn(6, 16, dtype=torch.bfloat16), torch.randint(0, 8, (1, 6))
    with_casts, without = (compare.saved_activation_bytes(Head(flag), x, targets) for flag in (True, False))
    assert with_casts == without > x.numel() * x.element_size()
