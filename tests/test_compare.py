"""`lora-kernels compare` on a tiny config: the structure of the result and the relations its numbers must obey
(parameter counts, file sizes, optimizer and gradient memory against the counts, the loss going down)."""

import copy
import dataclasses
import io
import json
import math
import re
import statistics
import types

import pytest
import torch

import lora_kernels
from lora_kernels import backends, compare
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
        assert len(result["inference"][f"{key}_all"]) == TINY.infer_reps
        assert result["inference"][key] == statistics.median(result["inference"][f"{key}_all"])
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
    cfg = result["config"]
    with torch.device("meta"):
        model = DecoderLM(ModelConfig(cfg["vocab"], cfg["hidden"], cfg["layers"], cfg["heads"], cfg["intermediate"]))
    for name, run in result["methods"].items():
        trainable = run["trainable_params"]
        assert run["grad_bytes"] == trainable * FLOAT32_BYTES
        # AdamW: exp_avg and exp_avg_sq per trainable parameter, plus a float32 scalar `step` per parameter tensor
        tensors = len(list(model.parameters())) if name == "full" else 2 * run["lora_layers"]
        assert run["optimizer_state_bytes"] == (2 * trainable + tensors) * FLOAT32_BYTES, name
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


def _fused_kind(fused):
    """The third column's kind: the torch composition (no C++ extension here) is no fused run."""
    return "unfused" if fused in ("torch", "reference") else "fused"


def _fused_label(result):
    fused = result["backends"]["fused"]
    return f"LoRA, {fused} ({_fused_kind(fused)})"


def test_printed_table_names_every_measurement(result):
    text = compare.format_compare(result)
    for label in ("trainable params", "gradients", "optimizer state", "activations saved", "peak memory / step",
                  "step time", "tokens / s", "checkpoint on disk", "eval loss", "merged", "unmerged, torch",
                  _fused_label(result), result["measurement"]["memory"]):
        assert label in text, label


def test_the_table_header_describes_the_run(result):
    """The lines above the table say what ran, from the result: where, the model and its parameter count, the task
    and its step count, the LoRA options with the number of adapted layers and both learning rates, the backends."""
    env, model, lora = result["environment"], result["model"], result["methods"]["lora_torch"]
    load = f", load average {env['load_average'][0]:.2f} at start" if env["load_average"] else ""
    assert compare.format_compare(result).splitlines()[:5] == [
        f"lora-kernels compare: cpu ({env['cpu']}, 1 thread{load}), float32, torch {env['torch']}, "
        f"triton {env['triton'] or '-'}, {env['date']}",
        f"model: Llama-style decoder (tiny): hidden 64, 2 layers, 4 heads, MLP 176, vocab 128; "
        f"{compare.fmt_count(model['total_params'])} parameters, random init (seed 0)",
        "task: next-token prediction on a fixed random permutation chain over 64 tokens; batch 4 x seq 32 = "
        "128 tokens/step; 10 AdamW steps (2 warm-up, not timed)",
        f"LoRA: r=16, alpha=32, scaling alpha/r = 2, dropout 0 on {','.join(compare.DEFAULT_TARGETS)} "
        f"({lora['lora_layers']} layers); lr 0.001 (full) / 0.003 (LoRA)",
        f"backends available: {', '.join(result['backends']['available'])}; fused run: backend='auto' -> "
        f"{result['backends']['fused']}",
    ]


def test_the_header_counts_one_token_and_one_step_in_the_singular(result):
    """--batch-size 1 --seq-len 1 --steps 1 --warmup 0 printed "1 tokens/step; 1 AdamW steps"."""
    single = copy.deepcopy(result)
    single["task"]["tokens_per_step"], single["config"]["steps"], single["config"]["warmup"] = 1, 1, 0
    assert "= 1 token/step; 1 AdamW step (0 warm-up, not timed)" in compare.format_compare(single).splitlines()[2]


def test_a_trainable_share_under_a_tenth_of_a_percent_keeps_two_significant_digits():
    """The seed's "0.01% of a 70B model" printed as "0.00%" (a 1e-3 % share of a large vocabulary's model)."""
    assert [compare._percent(v) for v in (0.000996, 0.0123, 0.5, 12.345, 100.0, 0.0)] == [
        "0.001%", "0.012%", "0.50%", "12.35%", "100.00%", "0.00%"]


def test_the_load_average_and_date_are_read_before_the_runs(monkeypatch):
    """"load average ... at start" was read after the three runs, counting the compare's own load."""
    loads = iter([(0.5, 0.5, 0.5)] + [(9.0, 9.0, 9.0)] * 100)
    monkeypatch.setattr(compare.os, "getloadavg", lambda: next(loads))
    build = compare._build

    def build_after_the_first_read(*args, **kwargs):
        next(loads)  # the runs themselves raise the load
        return build(*args, **kwargs)

    monkeypatch.setattr(compare, "_build", build_after_the_first_read)
    small = dataclasses.replace(TINY, batch_size=1, seq_len=8, steps=2, warmup=1, infer_reps=1)
    text = compare.format_compare(run_compare(small))
    assert "load average 0.50 at start" in text


def test_each_table_row_shows_its_own_measurement(result):
    """Every row's cells are that measurement of each run, in the column order of the header, with the ratio to
    full fine-tuning (value / full's) where the row has one."""
    fmt_bytes, ratio = compare.fmt_bytes, compare._ratio
    full = result["methods"]["full"]

    def with_ratio(key, text=fmt_bytes):
        return lambda run, name: text(run[key]) + ratio(run[key], full[key])

    expected = {
        "trainable params": lambda run, name: f"{compare.fmt_count(run['trainable_params'])} "
                                              f"({compare._percent(run['trainable_percent'])})",
        "weights (all params)": lambda run, name: fmt_bytes(run["param_bytes"]),
        "gradients (.grad)": with_ratio("grad_bytes"),
        "optimizer state (AdamW)": with_ratio("optimizer_state_bytes"),
        "activations saved for bwd": with_ratio("saved_activation_bytes"),
        "peak memory / step [1]": with_ratio("peak_step_bytes"),
        "step time (median)": with_ratio("step_ms_median", lambda ms: f"{ms:.1f} ms"),
        "step time (min - max)": lambda run, name: f"{min(run['step_ms_all']):.1f} - {max(run['step_ms_all']):.1f} ms",
        "tokens / s": lambda run, name: f"{run['tokens_per_s']:,.0f}",
        "checkpoint on disk [2]": lambda run, name: fmt_bytes(run["checkpoint_bytes"])
        + ("" if name == "full" else ratio(run["checkpoint_bytes"], full["checkpoint_bytes"])),
        "loss: first step -> last": lambda run, name: f"{run['train_losses'][0]:.3f} -> {run['train_losses'][-1]:.3f}",
        "eval loss after training": lambda run, name: f"{run['eval_loss']:.3f}",
    }
    lines = compare.format_compare(result).splitlines()
    header = next(line for line in lines if line.lstrip().startswith("full fine-tuning"))
    assert re.split(r"\s{2,}", header.strip()) == ["full fine-tuning", "LoRA, torch (unfused)",
                                                   _fused_label(result)]
    for label, cell in expected.items():
        line = next(line for line in lines if line.startswith(label))
        assert re.split(r"\s{2,}", line.strip()) == [label] + [cell(result["methods"][name], name)
                                                               for name in compare.METHODS], label


def test_one_token_is_printed_as_one_token(result):
    """--batch-size 1 --seq-len 1 printed "1 tokens per forward" (helper 294)."""
    import copy
    shown = copy.deepcopy(result)
    shown["inference"]["tokens"] = 1
    shown["task"]["task_vocab"] = 1
    text = compare.format_compare(shown)
    assert "the trained LoRA model, 1 token per forward (" in text and "permutation chain over 1 token;" in text
    assert "1 tokens" not in text


def test_the_lines_around_the_table_print_the_results_own_values(result):
    """format_compare prints the result it is given (a saved one too): its environment, seed and LoRA layer count in
    the header; the inference latencies each over the merged one, the fused line naming the backend that ran; the
    eval loss before training, torch.save's size and the run's wall time under the table; a note for the fused
    backend and for dropout only when there is one."""
    import copy
    shown = copy.deepcopy(result)
    shown["environment"]["torch"] = "2.99.0"
    shown["config"]["seed"] = 7
    shown["methods"]["lora_torch"]["lora_layers"] = 99
    for run in shown["methods"].values():
        run["step_ms_all"] = [40.0] * 8  # steady: no drift note
    shown["inference"].update(merged_ms=2.0, unmerged_unfused_ms=3.0, unmerged_fused_ms=5.0,
                              merged_ms_all=[2.0, 1.5, 2.25], unmerged_unfused_ms_all=[3.0, 3.0, 3.0],
                              unmerged_fused_ms_all=[9.0, 5.0, 4.5],
                              merged_vs_unmerged_rel_diff=3.5e-6, fused_vs_unfused_rel_diff=2.5e-7)
    shown["task"]["initial_eval_loss"] = 4.321
    shown["methods"]["full"]["full_torch_save_bytes"] = 2_500_000
    shown["wall_s"] = 12.34
    shown["backends"]["fused_note"] = None
    fused = shown["backends"]["fused"]
    lines = compare.format_compare(shown).splitlines()
    assert ", torch 2.99.0, " in lines[0] and lines[1].endswith("random init (seed 7)") and "(99 layers)" in lines[3]
    assert not [line for line in lines if "note:" in line]
    assert f"(eval loss before training: 4.321; ln(vocab) = {math.log(128):.3f}; ratios in parentheses are against " \
           f"full fine-tuning)" in lines
    start = lines.index("inference latency of the trained LoRA model, 128 tokens per forward (median of 3, eval mode, "
                        "no grad):")
    assert [re.split(r"\s{2,}", line.strip()) for line in lines[start + 1:start + 4]] == [
        ["merged (W + s·B·A folded into W)", "2.00 ms", "1.00× merged", "(min - max 1.50 - 2.25 ms)"],
        ["unmerged, torch (unfused)", "3.00 ms", "1.50× merged", "(min - max 3.00 - 3.00 ms)"],
        [f"unmerged, {fused} ({_fused_kind(fused)})", "5.00 ms", "2.50× merged", "(min - max 4.50 - 9.00 ms)"]]
    saved_before = copy.deepcopy(shown)  # a result saved before the passes were kept prints the medians alone
    for key in ("merged_ms_all", "unmerged_unfused_ms_all", "unmerged_fused_ms_all"):
        del saved_before["inference"][key]
    assert [re.split(r"\s{2,}", line.strip()) for line in
            compare.format_compare(saved_before).splitlines()[start + 1:start + 4]] == [
        ["merged (W + s·B·A folded into W)", "2.00 ms", "1.00× merged"],
        ["unmerged, torch (unfused)", "3.00 ms", "1.50× merged"],
        [f"unmerged, {fused} ({_fused_kind(fused)})", "5.00 ms", "2.50× merged"]]
    assert lines[start + 4:start + 6] == ["  (merged vs unmerged logits: relative difference 3.5e-06)",
                                          "  (fused vs unfused logits: relative difference 2.5e-07)"]
    shown["methods"]["lora_torch"]["adapter_config_bytes"] = 612
    lines = compare.format_compare(shown).splitlines()
    assert lines[-3:] == [
        f"[1] {shown['measurement']['memory']}.",
        "[2] full fine-tuning stores the whole model (model.safetensors); LoRA stores the adapter, as "
        "save_peft_adapter writes it (adapter_model.safetensors, beside its 612 B adapter_config.json: PEFT's "
        "format); torch.save of the full model: 2.50 MB.",
        f"step time: {shown['measurement']['step_time']}. Total run 12.3 s."]
    del shown["methods"]["lora_torch"]["adapter_config_bytes"]  # a result saved before it was recorded
    assert compare.format_compare(shown).splitlines()[-2].startswith(
        "[2] full fine-tuning stores the whole model (model.safetensors); LoRA stores the adapter, as "
        "save_peft_adapter writes it (adapter_model.safetensors: PEFT's format); ")
    shown["backends"]["fused_note"] = "a note on the fused backend"
    shown["config"]["dropout"] = 0.1
    notes = [line for line in compare.format_compare(shown).splitlines() if "note:" in line]
    assert notes[0] == "  note: a note on the fused backend" and len(notes) == 2
    assert notes[1].startswith("  note: with dropout, both LoRA columns redraw the dropout mask")
    # the fused column computing another function than the unfused one (past rounding): its timings are not the
    # same LoRA's, and its better or worse eval loss is not the kernels' doing
    shown["inference"]["fused_vs_unfused_rel_diff"] = 0.27
    notes = [line for line in compare.format_compare(shown).splitlines() if "note:" in line]
    assert len(notes) == 3 and notes[2] == (
        f"  note: {_fused_label(shown)}: its logits differ from the torch column's by 2.7e-01 (relative), above 0.002 "
        f"for float32, on the same trained model: the fused backend computes another function, so its column does "
        f"not measure the same LoRA"), notes


def test_gpu_busy_time_is_measured_on_cuda_only(result):
    """The profiled extra step (gpu_busy_ms) runs where a GPU works apart from the host; on CPU the step is not run
    and the table has no GPU busy row."""
    assert all(run["gpu_busy_ms"] is None for run in result["methods"].values())
    assert compare.gpu_busy_ms(lambda: pytest.fail("the step ran"), torch.device("cpu")) is None
    assert "GPU busy" not in compare.format_compare(result)


def test_device_time_sums_the_gpu_s_own_events_once():
    """device_time_ms adds the self device time of the CUDA events of a profile (kernels, copies, memsets), as
    torch.profiler's "Self CUDA time total": not the CPU-side events (whose self device time is their kernels'
    again), nor the device side of record_function ranges, which span kernels already counted."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    events = [SimpleNamespace(device_type=DeviceType.CUDA, is_user_annotation=False, self_device_time_total=1500),
              SimpleNamespace(device_type=DeviceType.CUDA, is_user_annotation=False, self_device_time_total=250),
              SimpleNamespace(device_type=DeviceType.CPU, is_user_annotation=False, self_device_time_total=1750),
              SimpleNamespace(device_type=DeviceType.CUDA, is_user_annotation=True, self_device_time_total=1750)]
    assert compare.device_time_ms(events) == pytest.approx(1.75)


def test_gpu_busy_row_and_the_host_bound_note(result):
    """A CUDA run's table has a GPU busy row (ratios against full fine-tuning) and footnote [3], and a note for each
    column whose GPU worked less than half its median step: that step waited on the host."""
    import copy
    shown = copy.deepcopy(result)
    for name, (step_ms, busy_ms) in zip(compare.METHODS, ((40.0, 36.0), (44.0, 20.0), (39.0, 12.0))):
        shown["methods"][name].update(step_ms_median=step_ms, step_ms_all=[step_ms] * 8, gpu_busy_ms=busy_ms)
    lines = compare.format_compare(shown).splitlines()
    row = next(line for line in lines if line.startswith("GPU busy / step [3]"))
    assert re.split(r"\s{2,}", row.strip()) == ["GPU busy / step [3]", "36.0 ms (1.00×)", "20.0 ms (0.56×)",
                                                "12.0 ms (0.33×)"]
    notes = [line for line in lines if "note:" in line and "waited on the host" in line]
    assert len(notes) == 2 and notes[0].startswith("  note: LoRA, torch (unfused): the GPU worked 45% of the median")
    assert notes[1].startswith(f"  note: {_fused_label(shown)}: the GPU worked 31% of the median")
    assert lines[-2].startswith("[3] the GPU's own time in one more step")
    assert notes[0].endswith("; --compile compiles the layers to cut the host time")
    shown["config"]["compile"] = True  # compiled already: no hint
    assert [line for line in compare.format_compare(shown).splitlines() if "waited on the host" in line][0].endswith(
        "which the GPU busy row compares")


def test_a_16_bit_run_notes_that_peft_runs_its_lora_branch_in_float32(result):
    """PEFT casts each LoRA layer's input to its float32 factors' dtype; the torch column runs the branch in the
    model's dtype: a 16-bit run says so (a float32 run has nothing to say)."""
    import copy
    shown = copy.deepcopy(result)
    assert not [line for line in compare.format_compare(shown).splitlines() if "float32 copy" in line]
    for dtype in ("bfloat16", "float16"):
        shown["config"]["dtype"] = dtype
        notes = [line for line in compare.format_compare(shown).splitlines() if "float32 copy" in line]
        assert len(notes) == 1 and notes[0].startswith("  note: in a 16-bit model both LoRA columns keep float32 "
                                                       "factors (PEFT's autocast_adapter_dtype)")
        # the full fine-tuning column's 16-bit AdamW state (helper 185: it measured 2 bytes per moment, unsaid)
        assert notes[0].endswith("Full fine-tuning trains the 16-bit weights themselves, their gradients and AdamW "
                                 "moments 16-bit too (8 bytes per parameter; mixed-precision training's float32 "
                                 "master weights and moments take about 16)")


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


def test_a_column_whose_steps_drift_is_named(result):
    """A column whose timed steps got slower during its run (the H200's fused column rose from 37.7 to 61.5 ms
    while full fine-tuning's held at 39-40 ms) gets a note with the first and last thirds' medians; steady columns,
    and noise within STEP_DRIFT_LIMIT, get none."""
    import copy
    drifting = copy.deepcopy(result)
    rising = [40.0, 41.0, 39.0, 44.0, 46.0, 45.0, 60.0, 62.0, 61.0]  # thirds' medians 40 and 61
    steady = [40.0, 43.0, 39.0, 41.0, 38.0, 42.0, 40.5, 39.5, 43.5]  # within 10% third to third
    drifting["methods"]["full"]["step_ms_all"] = steady
    drifting["methods"]["lora_torch"]["step_ms_all"] = [2 * ms for ms in steady]
    drifting["methods"]["lora_fused"]["step_ms_all"] = rising
    notes = [line for line in compare.format_compare(drifting).splitlines() if "step time went from" in line]
    assert notes == [f"  note: {_fused_label(drifting)}: the step time went from 40.0 ms (median of the first third of "
                     "the timed steps) to 61.0 ms (the last third): the run was not steady (other work on the machine, "
                     "or too few --warmup steps?), so its step-time ratio is not a steady-state measurement"]
    drifting["methods"]["lora_fused"]["step_ms_all"] = rising[::-1]  # faster towards the end: named too
    assert "went from 61.0 ms" in compare.format_compare(drifting)
    assert compare.step_time_drift([40.0, 40.0, 40.0, 40.0, 44.1, 44.1]) == (40.0, 44.1)
    assert compare.step_time_drift([40.0, 40.0, 40.0, 40.0, 43.9, 43.9]) is None
    # "more than" 10% of the first third's median, either way: exactly 10% is within the limit, a fall too
    assert compare.step_time_drift([40.0, 40.0, 40.0, 40.0, 44.0, 44.0]) is None
    assert compare.step_time_drift([40.0, 40.0, 40.0, 40.0, 36.0, 36.0]) is None
    assert compare.step_time_drift([40.0, 40.0, 40.0, 40.0, 35.9, 35.9]) == (40.0, 35.9)
    assert compare.step_time_drift([10.0, 10.0, 90.0, 90.0, 90.0]) is None  # under 6 steps: no thirds to compare


def test_every_column_drifting_the_same_way_gets_one_note(result):
    """Alternated steps share a change of the machine's load: when every column's step time rose (or fell) one note
    says so, and that the ratios compare the methods under the same load, instead of a note per column calling each
    ratio unsteady. Columns drifting apart, or a saved result of a version that trained them one after another, keep
    the notes per column."""
    import copy
    shown = copy.deepcopy(result)
    rising = [40.0, 41.0, 39.0, 44.0, 46.0, 45.0, 60.0, 62.0, 61.0]  # thirds' medians 40 and 61
    for method, factor in zip(compare.METHODS, (1.0, 0.5, 0.25)):
        shown["methods"][method]["step_ms_all"] = [factor * ms for ms in rising]
    notes = [line for line in compare.format_compare(shown).splitlines() if "note:" in line and " ms" in line]
    assert notes == [f"  note: every column's step time rose during the run (full fine-tuning 40.0 -> 61.0 ms, LoRA, "
                     f"torch 20.0 -> 30.5 ms, LoRA, {shown['backends']['fused']} 10.0 -> 15.2 ms: medians of the first "
                     f"and last thirds of the timed steps): the machine's load changed; the methods' steps alternated, "
                     f"so the ratios compare them under the same load, but no median is a steady-state time"]
    falling = copy.deepcopy(shown)
    for run in falling["methods"].values():
        run["step_ms_all"] = run["step_ms_all"][::-1]
    assert "every column's step time fell during the run" in compare.format_compare(falling)
    shown["methods"]["lora_fused"]["step_ms_all"] = rising[::-1]  # one column the other way: named one by one
    text = compare.format_compare(shown)
    assert "every column" not in text and text.count("the step time went from") == 3
    for run in shown["methods"].values():
        run["step_ms_all"] = rising
    shown["measurement"]["step_time"] = "median wall time of steps 3..10 (device synchronised), first 2 not timed"
    text = compare.format_compare(shown)
    assert "every column" not in text and text.count("the step time went from") == 3


def test_a_column_whose_steps_spread_is_named(result):
    """A column whose timed steps scatter without a trend (a 2-core run under other jobs: LoRA fused 1027-13828 ms
    around a median of 8796 ms, printed as 1.30x full fine-tuning's with no word) gets a note with its quartiles;
    steady columns get none, and a drifting one keeps the drift note alone."""
    import copy
    noisy = copy.deepcopy(result)
    steady = [40.0, 43.0, 39.0, 41.0, 38.0, 42.0, 40.5, 39.5, 43.5]
    scattered = [9032, 8860, 8796, 4254, 1027, 1611, 1542, 6402, 9520, 9080, 8076, 8940, 8829, 9743, 8064, 13828, 2900]
    noisy["methods"]["full"]["step_ms_all"] = steady
    noisy["methods"]["lora_torch"]["step_ms_all"] = [2 * ms for ms in steady]
    noisy["methods"]["lora_fused"]["step_ms_all"] = scattered
    notes = [line for line in compare.format_compare(noisy).splitlines() if "timed steps spread" in line]
    assert len(notes) == 1 and notes[0].startswith(f"  note: {_fused_label(noisy)}: ")
    noisy["methods"]["lora_fused"]["step_ms_all"] = steady
    assert "timed steps spread" not in compare.format_compare(noisy)


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
    assert [line for line in text.splitlines() if "not finite" in line] == [
        next(line for line in text.splitlines() if line.startswith("  note: full fine-tuning: the training loss"))]
    assert "not finite" not in compare.format_compare(result)
    diverged["config"]["dtype"] = "bfloat16"  # the float16 explanation is for float16 only
    assert "  note: full fine-tuning: the training loss is not finite from step 2 on; its column measures a " \
           "diverged run" in compare.format_compare(diverged).splitlines()

    def refuse(constant):
        raise ValueError(constant)

    loaded = json.loads(compare.to_json(diverged), parse_constant=refuse)
    assert loaded["methods"]["full"]["eval_loss"] is None and loaded["methods"]["full"]["train_losses"][1] is None
    assert loaded["methods"]["full"]["train_losses"][0] == full["train_losses"][0]
    assert compare.json_safe({"a": (1.0, math.inf), "b": [-math.inf, "x"]}) == {"a": [1.0, None], "b": [None, "x"]}
    # The saved result prints too (it raised TypeError formatting the null losses), with the same note.
    saved_lines = compare.format_compare(loaded).splitlines()
    full_loss_row = next(line for line in saved_lines if line.startswith("loss: first step -> last"))
    full_eval_row = next(line for line in saved_lines if line.startswith("eval loss after training"))
    assert re.split(r"\s{2,}", full_loss_row)[1] == f"{full['train_losses'][0]:.3f} -> n/a"
    assert re.split(r"\s{2,}", full_eval_row)[1] == "n/a"
    assert "  note: full fine-tuning: the training loss is not finite from step 2 on; its column measures a " \
           "diverged run" in saved_lines


def test_a_lora_column_that_trained_nothing_is_named(result):
    """A huge --alpha (1e30) makes the factors' squared gradients pass float32's range in AdamW's state, so every
    update is 0: B stayed zero, the eval loss was the untrained model's, and nothing said so (a real tiny run here, and
    the note on the result of the default run, whose adapters trained)."""
    assert result["methods"]["lora_torch"]["adapter_trained"] is True
    assert result["methods"]["lora_fused"]["adapter_trained"] is True and "adapter_trained" not in result["methods"][
        "full"]
    assert "still zero" not in compare.format_compare(result)
    untrained = run_compare(dataclasses.replace(TINY, steps=2, warmup=1, infer_reps=1, batch_size=2, seq_len=8,
                                                targets=("q_proj",), alpha=1e30))
    notes = [line for line in compare.format_compare(untrained).splitlines() if "still zero" in line]
    assert [note.split(":")[1].strip() for note in notes] == [
        f"LoRA, {label}" for label in ("torch (unfused)", f"{untrained['backends']['fused']} (fused)")], notes
    assert all(untrained["methods"][m]["eval_loss"] == untrained["task"]["initial_eval_loss"]
               for m in ("lora_torch", "lora_fused"))


def test_small_ratios_keep_two_significant_digits():
    # --targets lm_head --rank 1 printed the adapter file as "976 B (0.00×)" the full checkpoint
    assert compare._ratio(976, 268130) == " (0.0036×)"
    assert compare._ratio(9.86, 468.22) == " (0.021×)"
    assert compare._ratio(34, 100) == " (0.34×)" and compare._ratio(1, 1) == " (1.00×)"
    assert compare._ratio(0, 1) == " (0.00×)" and compare._ratio(5, 0) == ""
    assert compare._ratio(612, 10000) == " (0.061×)"  # not "0.06×": one significant digit
    assert compare._ratio(97, 1000) == " (0.10×)"  # from 0.095 up, two decimals show two significant digits


def test_counts_and_bytes_print_with_decimal_units():
    assert [compare.fmt_count(n) for n in (999, 1000, 312_320, 3_430_000, 542_150_000)] == \
        ["999", "1.00 k", "312.32 k", "3.43 M", "542.15 M"]
    # a CPU peak is a difference of resident sets, and may come out negative
    assert [compare.fmt_bytes(n) for n in (None, 999, 1000, 13_710_000, 1_080_000_000, -2_500_000)] == \
        ["n/a", "999 B", "1.00 kB", "13.71 MB", "1.08 GB", "-2.50 MB"]
    # the unit of the number as printed: 999999 rounds to 1.00 M (it printed "1000.00 k"; helper 249)
    assert [compare.fmt_count(n) for n in (999_999, 999_994_999, 999_499)] == ["1.00 M", "999.99 M", "999.50 k"]
    assert [compare.fmt_bytes(n) for n in (999_999, -999_999_999, 999_990)] == ["1.00 MB", "-1.00 GB", "999.99 kB"]


def test_plot_writes_a_png(result, tmp_path):
    pytest.importorskip("matplotlib")
    path = compare.plot_compare(result, str(tmp_path / "compare.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", ["compare", "compare."])
def test_plot_without_an_extension_writes_png_to_the_named_file(result, tmp_path, name):
    """A name ending in a bare dot has no extension either: savefig had written compare.png for "compare." while
    the CLI printed "figure: compare."."""
    pytest.importorskip("matplotlib")
    assert compare.plot_compare(result, str(tmp_path / name)) == str(tmp_path / name)
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


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
    ({"rank": 0}, "--rank expected an int >= 1, got 0"),  # the CLI's parser refuses these too; the API checks them
    ({"batch_size": 0}, "--batch-size expected an int >= 1, got 0"),
    ({"layers": True}, "--layers expected an int >= 1, got True"),
    ({"targets": ("proj",)}, "--targets 'proj' matched no nn.Linear"),  # a name matches whole, as in PEFT
    ({"targets": ("layers.2.self_attn.q_proj",)}, "--targets 'layers.2.self_attn.q_proj' matched no"),  # 2 layers
    ({"targets": ("layers.01.self_attn.q_proj",)}, "--targets 'layers.01.self_attn.q_proj' matched no"),
    ({"warmup": -1}, r"--warmup expected an int in \[0, steps=10\), got -1"),  # the CLI's --warmup takes any int
    ({"task_vocab": 0}, "--task-vocab expected an int >= 1, got 0"),
    ({"lr": 0.0}, "--lr expected a number > 0 and at most 3.4028234663852877e\\+37 .*, got 0.0"),
    ({"lora_lr": math.inf}, "--lora-lr expected a number > 0 .*, got inf"),  # every LoRA step's update would be inf
    # AdamW's first step (10·lr in float32) had ended the run in a traceback (helper 294)
    ({"lr": 3.5e37}, r"--lr expected a number > 0 and at most 3.4028234663852877e\+37 \(AdamW's first step is "
                     r"lr / \(1 - beta1\) = 10·lr, in float32\), got 3.5e\+37"),
    ({"lora_lr": 1e39}, "--lora-lr expected a number > 0 and at most 3.4028234663852877e\\+37 .*, got 1e\\+39"),
    ({"vocab": 1}, r"--vocab expected an int >= 2 \(one token leaves nothing to predict"),  # its loss was 0 throughout
    ({"targets": ()}, "--targets '' matched no nn.Linear"),  # no LoRA layer: the two LoRA columns would train nothing
    ({"dropout": 1.0}, r"--dropout expected a number in \[0, 1\), got 1.0"),  # every LoRA input dropped
    ({"alpha": 10**400}, "--alpha expected a finite number, got 1000"),  # math.isfinite raised OverflowError
    ({"alpha": 0}, r"--alpha expected a nonzero number .*got 0"),  # ran, and the LoRA columns trained nothing
    # refused by inject_lora only after the full fine-tuning run had been measured
    ({"alpha": 1e40, "rank": 4}, r"compare: --alpha 1e\+40 / --rank at --rank 4 gives the scaling 2.5e\+39, past "
                                 r"float32's range"),
    ({"steps": 3, "warmup": True}, r"--warmup expected an int in \[0, steps=3\), got True"),  # had been taken as 1
    ({"dtype": ["float32"]}, "--dtype expected one of"),  # had raised "unhashable type: 'list'", naming nothing
    # resolved() checks every value, as its docstring says: the backend had been checked only when the run began
    ({"backend": "nope"}, "--backend 'nope' is not available for cpu: unknown backend 'nope'"),
    ({"backend": "cuda"}, "--backend 'cuda' is not available for cpu"),
])
def test_bad_config_names_the_option(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **change).resolved()


def test_the_largest_accepted_lr_takes_an_adamw_step():
    """The --lr bound is where torch's AdamW stops: its first step at the largest accepted lr runs (the next float64
    up is refused above)."""
    largest = torch.finfo(torch.float32).max * (1 - compare.ADAMW_BETA1)
    dataclasses.replace(TINY, lr=largest, lora_lr=largest).resolved()
    with pytest.raises(ValueError, match="--lr expected"):
        dataclasses.replace(TINY, lr=math.nextafter(largest, math.inf)).resolved()
    weight = torch.nn.Parameter(torch.zeros(2))
    weight.grad = torch.ones(2)
    torch.optim.AdamW([weight], lr=largest, betas=(compare.ADAMW_BETA1, 0.999), weight_decay=0.0).step()
    with pytest.raises(RuntimeError, match="overflow"):
        torch.optim.AdamW([weight], lr=largest * 1.01, betas=(compare.ADAMW_BETA1, 0.999), weight_decay=0.0).step()



def test_targets_may_name_a_layer_of_any_index():
    """The targets are checked on a one-layer model (fast at any --layers), where a path into layer 1 matched nothing:
    "layers.1.self_attn.q_proj" was refused as matching no nn.Linear, though inject_lora takes it. A path into a
    layer past the model's is still refused (test_bad_config_names_the_option)."""
    layers = TINY.resolved().layers
    assert layers >= 2
    for target in (f"layers.{layers - 1}.self_attn.q_proj", f"{layers - 1}.mlp.down_proj", "layers.0.self_attn.k_proj"):
        config = dataclasses.replace(TINY, targets=(target,)).resolved()
        assert compare.expected_lora_params(config.model_config(), config.targets, config.rank) > 0, target

@pytest.mark.parametrize("change, error, message", [
    # these had ended in "'<=' not supported between instances of 'float' and 'NoneType'", naming no option
    ({"dropout": None}, ValueError, r"compare: --dropout expected a number in \[0, 1\), got None"),
    ({"dropout": "0.1"}, ValueError, r"compare: --dropout expected a number in \[0, 1\), got '0.1'"),
    # a truthy string had passed the check, to be refused by inject_lora once the model was built, naming its argument
    ({"use_rslora": "no"}, TypeError, "compare: --rslora expected a bool, got 'no'"),
    # a string had been split into letters: "--targets 'q,_,p,r,o,j' matched no nn.Linear"
    ({"targets": "q_proj"}, TypeError, r"compare: --targets expected a list or tuple of layer names, got the string "
                                       r"'q_proj' \(one name: \('q_proj',\)\)"),
])
def test_a_config_value_of_the_wrong_type_names_the_option(change, error, message):
    with pytest.raises(error, match=message):
        dataclasses.replace(TINY, **change).resolved()


@pytest.mark.cuda_branch
def test_only_a_missing_device_takes_the_default():
    # "" and 0 had been taken for "no device given" (`value or default`): "" is refused, 0 is cuda:0 as torch reads it
    with pytest.raises(ValueError, match="compare: --device expected cpu or cuda, got ''"):
        dataclasses.replace(TINY, device="").resolved()
    if torch.cuda.is_available():
        assert dataclasses.replace(TINY, device=0).resolved().device == "cuda:0"
    else:
        with pytest.raises(ValueError, match="compare: --device cuda but torch sees no CUDA device"):
            dataclasses.replace(TINY, device=0).resolved()
    assert dataclasses.replace(TINY, device=None).resolved().device == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.cuda_branch
def test_a_device_index_the_run_would_not_honour_is_refused():
    # cpu:3 had run on the one CPU device as plain cpu does; cuda:N past the GPU count failed mid-run in torch
    with pytest.raises(ValueError, match=r"compare: --device expected cpu or cpu:0 \(torch has one CPU device\), "
                                         r"got 'cpu:3'"):
        dataclasses.replace(TINY, device="cpu:3").resolved()
    assert dataclasses.replace(TINY, device="cpu:0").resolved().device == "cpu:0"
    count = torch.cuda.device_count()
    if count:
        with pytest.raises(ValueError, match=rf"compare: --device 'cuda:{count}' but torch sees {count} CUDA device"):
            dataclasses.replace(TINY, device=f"cuda:{count}").resolved()
        assert dataclasses.replace(TINY, device=f"cuda:{count - 1}").resolved().device == f"cuda:{count - 1}"


def test_a_cuda_index_past_the_gpu_count_is_refused_on_a_stand_in_two_gpu_machine(monkeypatch):
    # the test above reaches its cuda:N check only on a GPU machine (helper 168: `index > count` passed on a CPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert backends.parse_device("compare", "cuda:1") == torch.device("cuda", 1)
    assert backends.parse_device("compare", 1) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"compare: --device 'cuda:2' but torch sees 2 CUDA devices "
                                         r"\(cuda:0 to cuda:1\)"):
        backends.parse_device("compare", "cuda:2")


def test_compile_is_a_flag_and_needs_a_warmup_step():
    with pytest.raises(TypeError, match="compare: --compile expected a bool, got 'yes'"):
        dataclasses.replace(TINY, compile="yes").resolved()
    with pytest.raises(ValueError, match=r"compare: --compile expected --warmup >= 1 \(the first steps compile, and "
                                         r"are not timed\), got --warmup 0"):
        dataclasses.replace(TINY, compile=True, warmup=0).resolved()
    assert dataclasses.replace(TINY, compile=1).resolved().compile is True


def test_compiled_run_trains_as_the_eager_one_without_graph_breaks(result):
    """--compile compiles every decoder layer of the three models: the same training as the eager run (same init,
    data and maths; inductor's fusions round differently), said in the header and the JSON, and every layer variant
    (LoRA or not, the first layer's input without grad, eval, the two backends and merged at inference) compiled
    whole: no graph break, and no frame left to run eagerly past dynamo's recompile limit."""
    from torch._dynamo.utils import counters
    counters.clear()
    compiled = run_compare(dataclasses.replace(TINY, compile=True))
    assert counters["stats"]["unique_graphs"] >= 3 * 2  # at least a training and an eval graph per method
    assert counters["frames"]["ok"] == counters["frames"]["total"]
    assert not counters["graph_break"] and not counters["unimplemented"], dict(counters)
    for name, run in compiled["methods"].items():
        assert run["train_losses"] == pytest.approx(result["methods"][name]["train_losses"], rel=1e-3), name
    assert compiled["config"]["compile"] is True and result["config"]["compile"] is False
    assert compare.format_compare(compiled).splitlines()[2].endswith("; every decoder layer compiled (torch.compile)")
    assert "compiled" not in compare.format_compare(result).splitlines()[2]
    assert compiled["inference"]["merged_vs_unmerged_rel_diff"] < 1e-4


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


@pytest.mark.parametrize("hidden, heads", [(100, 5), (96, 6), (48, 3), (64, 4), (4, 1), (60, 3), (256, 16)])
def test_explicit_hidden_gets_a_head_count_that_fits(hidden, heads):
    # "heads and MLP width follow unless given": --hidden 100 on tiny (head dim 16) had derived 100 // 16 = 6 heads,
    # then refused them ("expected a multiple of the 6 heads of --model-size tiny", which has 4). 60: head dims 20
    # (3 heads) and 12 (5 heads) are equally near tiny's 16, and the tie goes to fewer heads
    # 256: the preset's own head dim, 16 = sqrt(256), is the divisor pair (16, 16) that a search stopping short of
    # isqrt(hidden) misses (it had then picked 32 heads of 8)
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
    compare.ProgressBar(0, stream=stream, delay=0).update("nothing to do")  # no division by a total of 0


def test_auto_never_repeats_the_unfused_column_when_a_fused_backend_exists(monkeypatch):
    # On GPUs backend="auto" picks the torch composition for lora_linear (see auto_backend); compare then shows the
    # fastest available fused backend in its 'fused' column and says why. Here the choice is forced to torch on CPU,
    # where Triton (the interpreter, under the tests) is never the one measured.
    cfg = CompareConfig(model_size="tiny", device="cpu").resolved()
    fused = [name for name in compare.FUSED_BACKENDS
             if compare.backends.unavailable_reason(name, "cpu") is None and name != "triton"]
    monkeypatch.setattr(compare.backends, "auto_backend", lambda device, op_name="lora_linear", dtype=None: "torch")
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
        CompareConfig(model_size="tiny", device="cpu", backend="cuda").resolved()


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


def test_triton_on_a_gpu_runs_without_a_note(monkeypatch):
    # the interpreter note is for CPU tensors only (checked with stand-ins: no GPU here)
    monkeypatch.setattr(compare.backends, "unavailable_reason", lambda name, device: None)
    on_cpu = CompareConfig(model_size="tiny", device="cpu", backend="triton").resolved()
    cfg = dataclasses.replace(on_cpu, device="cuda")
    assert compare.fused_backend_for(cfg) == ("triton", None)


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
            self.proj = LoRALinear(16, 8, r=4, dtype=torch.bfloat16, backend="torch",
                                   autocast_adapter_dtype=float32_factors)

        def forward(self, x):
            return self.proj(x).unsqueeze(0)  # [1, M, vocab] logits for lm_loss

    x, targets = torch.randn(6, 16, dtype=torch.bfloat16), torch.randint(0, 8, (1, 6))
    with_casts, without = (compare.saved_activation_bytes(Head(flag), x, targets) for flag in (True, False))
    assert with_casts == without > x.numel() * x.element_size()


def test_the_built_in_model_is_a_llama():
    """compare argues about a Llama-style decoder: with the same weights, transformers' LlamaForCausalLM (rotary
    positions, RMSNorm, SwiGLU, pre-norm residuals, untied head) gives the same logits. Its initialisation is Llama's
    (std 0.02), except the readout's (1/sqrt(hidden), see INIT_STD)."""
    transformers = pytest.importorskip("transformers")
    from conftest import tiny_llama_config
    cfg = ModelConfig(vocab=64, hidden=64, layers=2, heads=4, intermediate=96)
    torch.manual_seed(0)
    ours = DecoderLM(cfg)
    ours.init_weights()
    llama = transformers.LlamaForCausalLM(tiny_llama_config(
        vocab_size=64, num_key_value_heads=4, rms_norm_eps=1e-5, tie_word_embeddings=False)).eval()
    state = ours.state_dict()
    llama.model.load_state_dict({k: v for k, v in state.items() if not k.startswith("lm_head.")})
    llama.lm_head.weight.data.copy_(state["lm_head.weight"])
    ids = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), llama(ids).logits, rtol=1e-5, atol=1e-5)
    for name, module in ours.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            expected = cfg.hidden ** -0.5 if name == "lm_head" else compare.INIT_STD
            assert module.weight.std().item() == pytest.approx(expected, rel=0.1), name
    assert compare.INIT_STD == 0.02  # Llama's initializer_range


def test_an_odd_head_dim_is_refused_by_the_model():
    # rotary positions rotate pairs of channels: an odd head dim had failed in forward with a shape error
    with pytest.raises(ValueError, match=r"hidden \(6\) expected a multiple of heads \(2\) with an even head_dim"):
        DecoderLM(ModelConfig(vocab=8, hidden=6, layers=1, heads=2, intermediate=8))


def test_the_documented_default_runs():
    """BENCHMARKS.md's defaults: on CPU the "small" model (hidden 256, 4 layers, fp32, 4 x 128 tokens, 20 steps;
    3.43 M parameters, 312.32 k of them LoRA's at r=16 on every projection), on CUDA the "medium" one (hidden 2048,
    8 layers, 32k vocabulary, 542.15 M parameters, bf16, 8 x 512 tokens, 30 steps)."""
    cfg = CompareConfig(device="cpu").resolved()
    assert (cfg.model_size, cfg.hidden, cfg.layers, cfg.dtype, cfg.batch_size, cfg.seq_len, cfg.steps) == \
        ("small", 256, 4, "float32", 4, 128, 20)
    assert (cfg.rank, cfg.alpha, cfg.targets) == (16, 32.0, compare.DEFAULT_TARGETS)
    assert (cfg.warmup, cfg.infer_reps) == (3, 10)  # BENCHMARKS.md's CPU run: "(3 warm-up", "(median of 10"

    def parameters(model_cfg):
        with torch.device("meta"):
            return sum(p.numel() for p in DecoderLM(model_cfg).parameters())

    assert compare.fmt_count(parameters(cfg.model_config())) == "3.43 M"
    assert compare.fmt_count(compare.expected_lora_params(cfg.model_config(), cfg.targets, cfg.rank)) == "312.32 k"
    gpu, medium = compare.DEVICE_DEFAULTS["cuda"], compare.MODEL_SIZES["medium"]
    assert (gpu["model_size"], gpu["dtype"], gpu["batch_size"], gpu["seq_len"], gpu["steps"]) == \
        ("medium", "bfloat16", 8, 512, 30)
    assert (gpu["warmup"], gpu["infer_reps"]) == (5, 20)
    assert (medium["hidden"], medium["layers"], medium["vocab"]) == (2048, 8, 32000)
    assert compare.fmt_count(parameters(ModelConfig(**medium))) == "542.15 M"


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("fp32", torch.float32),
                                         ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
                                         ("float16", torch.float16), ("fp16", torch.float16)])
def test_dtype_names_run_their_dtype(name, dtype):
    cfg = CompareConfig(model_size="tiny", device="cpu", dtype=name).resolved()
    assert cfg.dtype == str(dtype).removeprefix("torch.")  # one name in the result, whichever alias was given
    assert compare.DTYPES[cfg.dtype] == dtype


def test_the_loss_is_computed_in_float32():
    # a bfloat16 cross-entropy rounds its log-sum-exp to 8 bits: the loss of a 16-bit model is taken in float32
    logits, targets = torch.randn(2, 5, 64).bfloat16(), torch.randint(0, 64, (2, 5))
    assert compare.lm_loss(logits, targets).dtype == torch.float32
    assert compare.lm_loss(logits, targets) == torch.nn.functional.cross_entropy(logits.float().reshape(10, 64),
                                                                                 targets.reshape(10))


def test_the_task_uses_every_token_it_may_and_no_other():
    # the task's tokens must exist in the model's vocabulary (--vocab below the task's 64 tokens), and every chain
    # start is drawn from all of them
    perm = compare.make_task(vocab=16, task_vocab=64, seed=0)
    assert sorted(perm.tolist()) == list(range(16))
    inputs, _ = compare.make_batch(perm, 2000, 1, torch.Generator().manual_seed(0))
    assert set(inputs[:, 0].tolist()) == set(range(16))


def test_saved_activations_count_each_storage_once_and_casts_of_activations():
    """Two views of one saved tensor are one storage (counted once); a float32 cast of a bfloat16 activation is an
    activation (counted), unlike a cast of a parameter."""
    class Net(torch.nn.Module):
        def __init__(self, variant):
            super().__init__()
            self.variant = variant
            self.proj = torch.nn.Linear(16, 8, bias=False, dtype=torch.bfloat16)

        def forward(self, x):
            y = self.proj(x)
            if self.variant == "views":  # mul saves both operands: two views of y's storage
                y = y.float()
                return (y[:, :, :4] * y[:, :, 4:]).repeat(1, 1, 2)
            if self.variant == "copies":  # the same bytes in two storages of half the size
                y = y.float()
                return (y[:, :, :4].clone() * y[:, :, 4:].clone()).repeat(1, 1, 2)
            if self.variant == "cast":  # mul saves the cast (ToCopyBackward0 of an activation)
                y = y.float()
            else:  # "product": mul saves a MulBackward0 result of the same size instead
                y = y.float() * 1.0
            return y * y

    x, targets = torch.randn(1, 6, 16, dtype=torch.bfloat16), torch.randint(0, 8, (1, 6))
    count = {variant: compare.saved_activation_bytes(Net(variant), x, targets)
             for variant in ("views", "copies", "cast", "product")}
    assert count["views"] == count["copies"]
    assert count["cast"] == count["product"]


def test_saved_activations_are_what_backward_keeps_beyond_the_weights():
    """A frozen weight that backward keeps (for the input's gradient) is weight memory, like a trainable one; an
    activation is counted whatever made it, a trainable embedding included; and the loss's own saved tensors (the
    cross-entropy's log-probabilities) are part of a training forward's activations."""
    tokens, vocab, hidden = 6, 8, 4

    class Net(torch.nn.Module):
        def __init__(self, variant):
            super().__init__()
            self.variant = variant
            self.embed_tokens = torch.nn.Embedding(vocab, hidden)  # trainable: its output has a grad_fn
            self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
            self.lm_head.weight.requires_grad_(variant == "trainable head")
            self.scale = torch.nn.Parameter(torch.ones(vocab), requires_grad=False)

        def forward(self, ids):  # ids 1-D: the head's matmul keeps the embedding output itself, not a view of it
            logits = self.lm_head(self.embed_tokens(ids))
            # mul keeps the frozen scale (for the gradient of logits) and nothing else; a Python float, nothing
            return logits * self.scale if self.variant == "frozen scale" else logits * 1.0

    class Logits(torch.nn.Module):  # keeps nothing itself: what is counted is the loss's
        def __init__(self):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.randn(tokens, vocab))

        def forward(self, ids):
            return self.logits * 1.0

    ids, targets = torch.randint(0, vocab, (tokens,)), torch.randint(0, vocab, (tokens,))
    count = {variant: compare.saved_activation_bytes(Net(variant), ids, targets)
             for variant in ("frozen head", "frozen scale", "trainable head")}
    assert count["frozen scale"] == count["frozen head"]
    # the head's weight gradient needs its input, the embedding output: 96 bytes more (the weight has 128)
    assert count["trainable head"] - count["frozen head"] == tokens * hidden * FLOAT32_BYTES
    assert compare.saved_activation_bytes(Logits(), ids, targets) >= tokens * vocab * FLOAT32_BYTES


def test_counting_saved_activations_leaves_no_reference_to_the_model():
    """The saved-tensor hook returned the tensor itself: a saved output then held its own autograd node, a cycle
    through C++ that Python's collector cannot see, so the full fine-tuning model stayed allocated through the LoRA
    runs (in their memory baselines; with --compile until dynamo's caches were cleared)."""
    import gc
    import weakref

    model = DecoderLM(ModelConfig(vocab=64, hidden=32, layers=2, heads=4, intermediate=48))
    ids = torch.randint(0, 64, (2, 8))
    assert compare.saved_activation_bytes(model, ids, ids) > 0
    weight = weakref.ref(model.embed_tokens.weight)
    del model
    gc.collect()
    assert weight() is None


def _can_reset_the_high_water_mark():
    """Whether this kernel lets a process reset its VmHWM (Linux >= 4.0), asked here rather than of MemoryProbe, so
    that a probe that wrongly thinks it cannot reset is a failure, not a skipped test."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_reset_the_high_water_mark(), reason="needs /proc/self/clear_refs")
def test_cpu_memory_probe_measures_each_region_above_the_baseline():
    """The CPU peak of a region is what the region allocated: not the process's whole resident set, not an earlier
    region's peak (the high-water mark is reset per region), not hidden by freed heap memory that is still
    resident (the heap is trimmed first), and a peak: memory freed before the reading still counts. Sizes are
    MiB-scale so that allocator noise cannot pass for them."""
    mib = 2 ** 20
    probe = compare.MemoryProbe(torch.device("cpu"))
    assert probe.resettable
    assert probe.method.startswith("peak resident set per step (VmHWM, reset via /proc/self/clear_refs")
    assert "It counts glibc's heap, not only tensors" in probe.method  # footnote [1] says what else it holds
    probe.baseline()
    probe.start()
    idle = probe.peak()
    # nothing allocated: near 0, not the resident set of a process that imported torch (nor 2.4% of it, a baseline
    # read in kB of 1000 bytes)
    assert abs(idle) < 4 * mib
    big = torch.ones(64 * mib // 4)  # touched, so resident
    grown = probe.peak() - idle
    # a few pages short at times: the kernel's resident-set counters are per-CPU approximations (read 63.97 MiB
    # for these 64 MiB in 9 of 35 runs on a busy machine)
    assert 63 * mib <= grown < 96 * mib
    del big
    assert probe.peak() - idle > 48 * mib  # freed, but it was the region's peak
    probe.start()
    assert probe.peak() - idle < 32 * mib  # the 64 MiB peak above belonged to the previous region
    # Freed heap-sized pieces (below glibc's mmap threshold) stay resident unless trimmed, and new ones reuse them
    # without raising the resident set. A live allocation above them keeps glibc from returning them by itself
    # (it returns only a free top of the heap), as a training step's surviving tensors do.
    pieces = [torch.ones(100 * 1024 // 4) for _ in range(640)]
    above = torch.ones(100 * 1024 // 4)
    del pieces
    probe.baseline()  # trimmed first: the freed pieces are not part of the baseline
    probe.start()
    idle = probe.peak()
    assert abs(idle) < 4 * mib
    pieces = [torch.ones(100 * 1024 // 4) for _ in range(640)]
    size = sum(piece.nbytes for piece in pieces)
    assert probe.peak() - idle >= 0.5 * size  # untrimmed: under 1%
    del pieces
    probe.start()  # trimmed again: what an earlier region freed is not reused unseen by the next one
    idle = probe.peak()
    pieces = [torch.ones(100 * 1024 // 4) for _ in range(640)]
    assert probe.peak() - idle >= 0.5 * size
    del pieces, above


@pytest.mark.parametrize("status", [None, "Name:\tpython\nVmRSS:\t  620000 kB\n"], ids=["no file", "no VmHWM"])
def test_a_cpu_without_a_readable_peak_reports_none(monkeypatch, status):
    """Where /proc/self/status is missing or has no VmHWM (some sandboxes), the probe says the memory is unavailable
    and its peak is None (printed n/a), not a number made of a missing reading."""
    def fake_open(path, *args, **kwargs):
        if path != "/proc/self/status":
            return open(path, *args, **kwargs)
        if status is None:
            raise FileNotFoundError(2, "No such file or directory", path)
        return io.StringIO(status)

    monkeypatch.setattr(compare, "open", fake_open, raising=False)
    probe = compare.MemoryProbe(torch.device("cpu"))
    assert probe.method == "unavailable (no /proc/self/status)"
    probe.baseline()
    probe.start()
    assert probe.peak() is None and compare.fmt_bytes(probe.peak()) == "n/a"


@pytest.fixture(scope="module")
def bf16_result():
    """A bfloat16 run with fewer LoRA targets and a vocabulary under the task's 64 tokens."""
    return run_compare(dataclasses.replace(TINY, dtype="bfloat16", vocab=48, batch_size=2, seq_len=8, steps=2,
                                           warmup=1, infer_reps=1, rank=4, targets=("q_proj", "down_proj", "lm_head")))


def test_byte_counts_follow_each_tensors_dtype(bf16_result):
    """A bfloat16 model (2 bytes a parameter) with float32 LoRA factors (PEFT's default, 4 bytes): every byte count
    is its tensors' numel times their own element size, recounted here from the model's shapes; AdamW keeps
    exp_avg and exp_avg_sq in each parameter's dtype and a float32 `step` per parameter tensor."""
    cfg = bf16_result["config"]
    with torch.device("meta"):
        model = DecoderLM(ModelConfig(cfg["vocab"], cfg["hidden"], cfg["layers"], cfg["heads"], cfg["intermediate"]))
    base, base_tensors = sum(p.numel() for p in model.parameters()), len(list(model.parameters()))
    shapes = _injected_layer_shapes(model.cfg, cfg["targets"])
    lora, lora_tensors = sum(cfg["rank"] * (k + n) for k, n in shapes), 2 * len(shapes)
    assert len(shapes) == 2 * cfg["layers"] + 1  # q_proj and down_proj per layer, and lm_head
    bf16, fp32 = 2, 4
    full = bf16_result["methods"]["full"]
    assert full["trainable_params"] == full["total_params"] == base
    assert full["param_bytes"] == full["trainable_param_bytes"] == full["grad_bytes"] == bf16 * base
    assert full["optimizer_state_bytes"] == 2 * bf16 * base + fp32 * base_tensors
    assert 0 <= full["checkpoint_bytes"] - bf16 * base < 16 * 1024  # safetensors: tensor bytes + a JSON header
    for method in ("lora_torch", "lora_fused"):
        run = bf16_result["methods"][method]
        assert (run["trainable_params"], run["total_params"], run["lora_layers"]) == (lora, base + lora, len(shapes))
        assert run["param_bytes"] == bf16 * base + fp32 * lora
        assert run["trainable_param_bytes"] == run["grad_bytes"] == run["adapter_tensor_bytes"] == fp32 * lora
        assert run["optimizer_state_bytes"] == 2 * fp32 * lora + fp32 * lora_tensors
        assert 0 <= run["checkpoint_bytes"] - fp32 * lora < 16 * 1024
    assert bf16_result["model"]["expected_lora_params"] == lora


def test_a_vocabulary_smaller_than_the_task_bounds_its_tokens(bf16_result):
    assert bf16_result["task"]["task_vocab"] == bf16_result["config"]["vocab"] == 48  # tokens the model has
    assert bf16_result["task"]["uniform_loss"] == math.log(48)


def test_a_run_uses_its_threads_and_restores_the_callers(monkeypatch):
    monkeypatch.setattr(compare, "_run_compare", lambda cfg, progress_stream: torch.get_num_threads())
    before = torch.get_num_threads()
    assert run_compare(dataclasses.replace(TINY, threads=before + 1)) == before + 1
    assert torch.get_num_threads() == before


def test_progress_bar_in_a_log_prints_each_tenth_once_and_never_past_100():
    stream = io.StringIO()  # not a terminal: a line per tenth of the work, not a redrawn bar
    bar = compare.ProgressBar(20, stream=stream, delay=0)
    for i in range(25):  # more updates than the total: it stays at 100%
        bar.update(f"step {i}")
    percents = [int(line.split()[1].rstrip("%")) for line in stream.getvalue().splitlines()]
    assert percents == [5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    quiet = io.StringIO()
    disabled = compare.ProgressBar(20, enabled=False, stream=quiet, delay=0)  # --no-progress
    for i in range(20):
        disabled.update(f"step {i}")
    disabled.close()
    assert quiet.getvalue() == ""


def _tiny_cfg(**changes):
    return dataclasses.replace(TINY, **{"targets": ("q_proj", "down_proj"), "rank": 4, **changes}).resolved()


def _trainable_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _init_state(cfg):
    torch.manual_seed(cfg.seed)
    model = DecoderLM(cfg.model_config())
    model.init_weights()
    return model.state_dict()


def test_each_lora_run_is_built_with_its_own_backend_and_the_given_lora_options():
    cfg = _tiny_cfg(rank=4, alpha=6.0, dropout=0.25, use_rslora=True)
    init_state = _init_state(cfg)
    fused = compare.fused_backend_for(cfg)[0]
    for method, backend in (("lora_torch", "torch"), ("lora_fused", fused)):
        layers = compare._lora_layers(compare._build(method, cfg, init_state, fused))
        assert len(layers) == 2 * cfg.layers and {layer.backend for layer in layers} == {backend}, method
        # rsLoRA: alpha / sqrt(r) = 6 / 2
        assert {(layer.r, layer.scaling, layer.lora_dropout) for layer in layers} == {(4, 3.0, 0.25)}, method
    assert not compare._lora_layers(compare._build("full", cfg, init_state, fused))


def test_eval_loss_is_taken_in_eval_mode_and_leaves_the_mode_as_it_was():
    cfg = _tiny_cfg(dropout=0.5)
    model = compare._build("lora_torch", cfg, _init_state(cfg), "torch")
    for layer in compare._lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight)  # a non-zero LoRA branch, so dropout would change the loss
    batch = compare.make_batch(compare.make_task(cfg.vocab, cfg.task_vocab, 0), 2, 8, torch.Generator().manual_seed(0))
    model.train()
    losses = {compare._eval_loss(model, batch) for _ in range(3)}
    assert model.training
    model.eval()
    assert losses == {compare._eval_loss(model, batch)} and not model.training


def test_inference_times_each_path_as_its_label_says(monkeypatch):
    """unmerged_unfused runs every LoRA layer on the torch backend, unmerged_fused on the fused one, merged with the
    weights folded in; all in eval mode (LoRA dropout off) and over the whole batch."""
    cfg = _tiny_cfg(dropout=0.5, infer_reps=3)
    fused = compare.fused_backend_for(cfg)[0]
    model = compare._build("lora_torch", cfg, _init_state(cfg), fused)
    for layer in compare._lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    model.train()
    timed = []

    def record(variants, inputs, reps, device, warmup=2):
        for prepare, model in variants.values():
            prepare()
            layers = compare._lora_layers(model)
            timed.append(({layer.backend for layer in layers}, {layer.merged for layer in layers}, model.training,
                          reps))
        return {name: [1.0] for name in variants}

    monkeypatch.setattr(compare, "_time_forwards", record)
    inputs = torch.randint(0, cfg.vocab, (3, 5))
    result = compare._inference(model, cfg, inputs, fused, compare.ProgressBar(1, enabled=False))
    merged_backend = timed[2][0]
    assert timed == [({"torch"}, {False}, False, 3), ({fused}, {False}, False, 3), (merged_backend, {True}, False, 3)]
    assert (result["tokens"], result["reps"]) == (15, 3)
    assert result["merged_vs_unmerged_rel_diff"] < 1e-5 and result["fused_vs_unfused_rel_diff"] < 1e-4


def test_inference_latencies_are_timed_in_rounds_so_a_slow_spell_falls_on_every_path(monkeypatch):
    """A shared machine that gets slower during the measurement (another job starts) must not make one inference
    path look slower than the others: on a stand-in clock, every forward pass takes 1 s until the 25th and 10 s from
    then on. Timed one path after another, the merged model (timed last) got the whole slow spell and printed at 10x
    the unmerged ones; timed in rounds, each path gets 3 of its 9 passes in it, and every median is 1 s."""
    cfg = _tiny_cfg(infer_reps=9)
    model = compare._build("lora_torch", cfg, _init_state(cfg), "torch")
    clock, calls = [0.0], [0]

    def advance(module, args):
        calls[0] += 1
        clock[0] += 10.0 if calls[0] >= 25 else 1.0

    model.register_forward_pre_hook(advance)
    monkeypatch.setattr(compare, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    inputs = torch.randint(0, cfg.vocab, (2, 5))
    result = compare._inference(model, cfg, inputs, "cpu" if "cpu" in compare._fused_available(torch.device("cpu"))
                                else "torch", compare.ProgressBar(1, enabled=False))
    assert (result["unmerged_unfused_ms"], result["unmerged_fused_ms"], result["merged_ms"]) == (1000.0,) * 3
    for key in ("unmerged_unfused", "unmerged_fused", "merged"):  # every path's passes, each 1 s or 10 s
        assert sorted(result[f"{key}_ms_all"]) == [1000.0] * 6 + [10000.0] * 3


def test_the_inference_differences_are_against_the_unfused_logits(monkeypatch):
    """merged_vs_unmerged_rel_diff is ||merged - unfused|| / ||unfused|| and fused_vs_unfused_rel_diff
    ||fused - unfused|| / ||unfused||, the logits recomputed here (the reference backend stands for the fused one: it
    rounds differently from the torch composition, so the two differences cannot come out the same by chance)."""
    import copy
    cfg = _tiny_cfg(infer_reps=1)
    model = compare._build("lora_torch", cfg, _init_state(cfg), "torch")
    for layer in compare._lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    model.eval()
    inputs = torch.randint(0, cfg.vocab, (2, 5))
    with torch.no_grad():
        unfused = model(inputs)
        fused_model, merged_model = copy.deepcopy(model), copy.deepcopy(model)
        for layer in compare._lora_layers(fused_model):
            layer.backend = "reference"
        for layer in compare._lora_layers(merged_model):
            layer.merge()
        fused, merged = fused_model(inputs), merged_model(inputs)
    monkeypatch.setattr(compare, "_time_forwards", lambda variants, *args, **kwargs: {name: [1.0] for name in variants})
    result = compare._inference(model, cfg, inputs, "reference", compare.ProgressBar(1, enabled=False))
    norm = unfused.norm().item()
    assert result["fused_vs_unfused_rel_diff"] == pytest.approx((fused - unfused).norm().item() / norm, rel=1e-4)
    assert result["merged_vs_unmerged_rel_diff"] == pytest.approx((merged - unfused).norm().item() / norm, rel=1e-4)
    assert result["fused_vs_unfused_rel_diff"] > 0 and result["unfused_logits_finite"] is True
    diverged = compare._build("lora_torch", cfg, _init_state(cfg), "torch")
    for layer in compare._lora_layers(diverged):
        torch.nn.init.constant_(layer.lora_B.weight, math.nan)
    result = compare._inference(diverged, cfg, inputs, "reference", compare.ProgressBar(1, enabled=False))
    assert math.isnan(result["fused_vs_unfused_rel_diff"]) and result["unfused_logits_finite"] is False


def test_inference_passes_are_timed_in_ms_after_two_warmup_passes(monkeypatch):
    """On a stand-in clock that each forward pass advances by its own duration: the two warm-up passes (slow here)
    are not timed, the timed passes are returned in order, in milliseconds (_inference takes their median)."""
    clock = [0.0]
    monkeypatch.setattr(compare, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    durations = iter([9.0, 9.0, 0.004, 0.001, 0.002])  # seconds

    def forward(inputs):
        clock[0] += next(durations)

    times = compare._time_forwards({"model": (lambda: None, forward)}, None, 3, torch.device("cpu"))
    assert times == {"model": pytest.approx([4.0, 1.0, 2.0])}
    assert next(durations, None) is None  # five passes in all


def test_each_inference_path_is_warmed_up_in_its_own_state():
    """The warm-up passes put each path into its state first, as the timed ones do: run in whatever state the model
    was left in, they warmed one path (its kernels, caches, allocations) and left the others' first timed passes
    cold."""
    state, ran = [None], []
    variants = {name: (lambda name=name: state.__setitem__(0, name), lambda inputs: ran.append(state[0]))
                for name in ("unmerged_unfused", "unmerged_fused", "merged")}
    compare._time_forwards(variants, None, 1, torch.device("cpu"))
    assert ran == list(variants) * 3  # two warm-up rounds, then one timed round


def test_checkpoints_are_peft_adapter_files_and_full_state_dicts(tmp_path):
    from safetensors import safe_open
    cfg = _tiny_cfg()
    init_state = _init_state(cfg)
    lora = compare._build("lora_torch", cfg, init_state, "torch")
    sizes = compare._checkpoint_sizes(lora, "lora_torch", str(tmp_path / "lora"))
    path = tmp_path / "lora" / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert keys == {f"base_model.model.layers.{i}.{module}.lora_{ab}.weight" for i in range(cfg.layers)
                    for module in ("self_attn.q_proj", "mlp.down_proj") for ab in "AB"}  # PEFT's key names
    config = tmp_path / "lora" / "adapter_config.json"
    assert sizes == {"adapter_safetensors_bytes": path.stat().st_size, "checkpoint_bytes": path.stat().st_size,
                     "adapter_config_bytes": config.stat().st_size,
                     "adapter_tensor_bytes": FLOAT32_BYTES * _trainable_count(lora),
                     "checkpoint_kind": "adapter only (safetensors)"}
    assert json.loads(config.read_text())["r"] == cfg.rank
    full = compare._build("full", cfg, init_state, "torch")
    sizes = compare._checkpoint_sizes(full, "full", str(tmp_path / "full"))
    path = tmp_path / "full" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(init_state)
    assert set(torch.load(tmp_path / "full" / "model.pt")) == set(init_state)  # the state dict, not the module
    assert sizes == {"full_safetensors_bytes": path.stat().st_size, "checkpoint_bytes": path.stat().st_size,
                     "full_torch_save_bytes": (tmp_path / "full" / "model.pt").stat().st_size,
                     "checkpoint_kind": "full model (safetensors)"}


def test_the_lora_checkpoint_is_an_adapter_peft_loads_to_the_trained_models_logits(tmp_path):
    """The LoRA column's checkpoint is a PEFT adapter directory (helper 185: it held only the safetensors file, which
    PeftModel.from_pretrained cannot load, and no test read the stored values: writing every factor transposed
    passed). Loaded by PEFT into the base model, it gives the LoRA model's logits."""
    peft = pytest.importorskip("peft")
    cfg = _tiny_cfg()
    init_state = _init_state(cfg)
    lora = compare._build("lora_torch", cfg, init_state, "torch")
    torch.manual_seed(5)
    with torch.no_grad():  # a trained adapter: B no longer zero
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    compare._checkpoint_sizes(lora, "lora_torch", str(tmp_path))
    base = DecoderLM(cfg.model_config())
    base.load_state_dict(init_state)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    ids = torch.randint(0, cfg.vocab, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), lora.eval()(ids))


def test_each_peak_is_read_against_a_baseline_taken_before_its_model_is_built(monkeypatch):
    """Footnote [1]: a column's peak is its resident set minus the one before its model was built. A baseline taken
    after the build dropped the model's weights out of every peak, with every test green (helper 185's mutant)."""
    import gc
    events = []

    def models_alive():
        gc.collect()
        return sum(type(o) is DecoderLM for o in gc.get_objects())

    class Probe(StandInProbe):
        def baseline(self):
            events.append(("baseline", models_alive() - before))

        def start(self):
            events.append(("start", None))

    monkeypatch.setattr(compare, "MemoryProbe", Probe)
    before = models_alive()  # whatever earlier tests left alive
    run_compare(dataclasses.replace(TINY, steps=2, warmup=1, infer_reps=1, batch_size=2, seq_len=8,
                                    targets=("q_proj",)))
    assert events == ([("baseline", 0)] + [("start", None)] * compare.MEMORY_STEPS) * len(compare.METHODS)


def test_a_merged_model_timed_slower_than_an_unmerged_one_is_called_noise(result):
    """The merged model runs one F.linear per layer, the unmerged paths that and the LoRA branch: a merged median
    above an unmerged one is the machine's load (helper 185: 104 against 12.7 ms under other jobs, no note)."""
    import copy
    shown = copy.deepcopy(result)
    fused = shown["backends"]["fused"]
    shown["inference"].update(merged_ms=2.0, unmerged_unfused_ms=3.0, unmerged_fused_ms=5.0,
                              merged_ms_all=[2.0, 7.0, 1.0], unmerged_unfused_ms_all=[3.0, 3.0, 2.5],
                              unmerged_fused_ms_all=[5.0, 5.5, 2.5])  # every range overlaps the merged one
    assert "strictly less work" not in compare.format_compare(shown)
    shown["inference"].update(merged_ms=4.0)
    shown["environment"]["cpu_threads"] = 2
    notes = [line for line in compare.format_compare(shown).splitlines() if "strictly less work" in line]
    assert notes == ["  note: the merged model does strictly less work than the unmerged one, yet measured slower "
                     "than the unmerged torch path: the machine's load changed during these 3 passes, so the "
                     "latencies are not steady-state measurements (more --infer-reps; on a shared CPU --threads 1 "
                     "steadies it)"]
    shown["environment"]["cpu_threads"] = 1  # advised where it was set already: not again
    assert [line for line in compare.format_compare(shown).splitlines() if "strictly less work" in line] == [
        notes[0].replace("; on a shared CPU --threads 1 steadies it", "")]
    shown["inference"].update(merged_ms=6.0)
    both = "torch" if fused == "torch" else f"torch and {fused}"  # no fused backend: the torch composition twice
    assert f"slower than the unmerged {both} path:" in compare.format_compare(shown)



@pytest.mark.parametrize("device, dtype, explained", [("cpu", "float16", True), ("cpu", "bfloat16", True),
                                                      ("cpu", "float32", False), ("cuda", "float16", False)])
def test_an_unmerged_path_faster_in_every_pass_is_not_called_noise(result, device, dtype, explained):
    """A fp16 run on a CPU without fp16 matrix units timed the merged model at 20.0 ms (19.6-22.4) and the cpu
    backend's unmerged one at 8.6 ms (8.2-10.5), in every run, and the note blamed the machine's load and advised
    --threads 1, which was set: torch's fp16 GEMM is slow there, and the C++ kernels run float32 copies
    (functional._cpu_widens). A path faster in at least 90% of the rounds gets a note saying the difference is
    systematic, also when one of its passes was slowed (the ranges then overlapped: helper 249's 2 runs of 2); the
    load note stays for the torch path, slower in a round."""
    import copy
    shown = copy.deepcopy(result)
    shown["environment"].update(device=device, gpu="a GPU")
    shown["config"]["dtype"] = dtype
    shown["backends"]["fused"] = "cpu"
    shown["inference"].update(merged_ms=20.0, unmerged_unfused_ms=19.0, unmerged_fused_ms=8.6,
                              merged_ms_all=[19.6, 20.0, 22.4] * 4, unmerged_unfused_ms_all=[18.0, 21.0, 21.0] * 4,
                              unmerged_fused_ms_all=[8.2, 8.6, 10.5] * 3 + [8.2, 8.6, 25.0])  # one slow pass
    notes = [line for line in compare.format_compare(shown).splitlines() if "strictly less work" in line]
    assert len(notes) == 2, notes
    assert "than the unmerged torch path: the machine's load changed" in notes[0]
    systematic = ("  note: the unmerged cpu path was faster than the merged model, which does strictly less work, in "
                  "11 of 12 rounds (each timing every path once): not the machine's load, but GEMMs run another way")
    because = (f": the C++ CPU kernels run {dtype} GEMMs on float32 copies, which on a CPU without {dtype} matrix "
               f"units is faster than torch's {dtype} GEMM of the merged model")
    assert notes[1] == systematic + (because if explained else "")
    # up to 16 tokens the C++ forward keeps its base GEMM in 16 bits (kDecodeMaxM): no such reason then
    shown["inference"]["tokens"] = 16
    notes = [line for line in compare.format_compare(shown).splitlines() if "strictly less work" in line]
    assert notes[1] == systematic

def test_too_few_timed_steps_to_judge_their_spread_get_a_note(result):
    """The spread and drift notes need 4 and 6 timed steps: with fewer, a noisy ratio (--steps 1: 29.68x) went
    without a word."""
    import copy
    shown = copy.deepcopy(result)
    for steps in (1, 3, 4):
        for run in shown["methods"].values():
            run["step_ms_all"] = [40.0] * steps
        notes = [line for line in compare.format_compare(shown).splitlines() if "too few" in line]
        assert notes == ([f"  note: {steps} timed step{'s' if steps > 1 else ''} per column: too few to tell whether "
                          f"the step times are steady, so the step-time ratios may be noise (more --steps)"]
                         if steps < 4 else []), steps


def test_counts_of_one_are_singular(result):
    import copy
    shown = copy.deepcopy(result)
    shown["model"].update(layers=1, heads=1)
    shown["methods"]["lora_torch"]["lora_layers"] = 1
    lines = compare.format_compare(shown).splitlines()
    assert ": hidden 64, 1 layer, 1 head, MLP 176," in lines[1] and lines[3].endswith(
        "(1 layer); lr 0.001 (full) / 0.003 (LoRA)")


class StandInProbe:
    """compare.MemoryProbe's interface, reading nothing: tests override what they observe."""
    method = "stand-in"

    def __init__(self, device):
        pass

    def baseline(self):
        pass

    def start(self):
        pass

    def peak(self):
        return None


def test_peak_memory_is_the_largest_of_the_probed_steps(monkeypatch):
    """Each run's peak is the larger of its MEMORY_STEPS probed steps (a stand-in probe gives the readings)."""
    readings = iter([7000, 1000, 8000, 2000, 9000, 3000])  # two steps per run, the first one's the larger

    class Probe(StandInProbe):
        def peak(self):
            return next(readings)

    monkeypatch.setattr(compare, "MemoryProbe", Probe)
    result = run_compare(dataclasses.replace(TINY, steps=2, warmup=1, infer_reps=1, batch_size=2, seq_len=8,
                                             targets=("q_proj",)))
    assert compare.MEMORY_STEPS == 2
    assert [result["methods"][m]["peak_step_bytes"] for m in compare.METHODS] == [7000, 8000, 9000]


def test_each_probed_peak_covers_one_step_and_an_unreadable_one_prints_na(monkeypatch):
    """The probe is started before each probed training step and read after it (a stand-in probe counts the steps
    in between); a probe that cannot read the memory (None) gives a peak of None, printed n/a, not 0. Each method
    also runs one untimed step first, before any measured run, so that lazily created library state is not
    measured as the first method's."""
    steps = []
    train_step = compare._train_step
    monkeypatch.setattr(compare, "_train_step", lambda *args: steps.append(1) or train_step(*args))
    covered = []

    class Probe(StandInProbe):
        def start(self):
            self.steps_at_start = len(steps)

        def peak(self):
            covered.append(len(steps) - self.steps_at_start)
            return None  # unreadable, as without /proc/self/status

    monkeypatch.setattr(compare, "MemoryProbe", Probe)
    result = run_compare(dataclasses.replace(TINY, steps=2, warmup=1, infer_reps=1, batch_size=2, seq_len=8,
                                             targets=("q_proj",)))
    assert covered == [1] * (len(compare.METHODS) * compare.MEMORY_STEPS)
    # per method: the untimed first step, the memory model's untimed and probed steps, --steps 2
    assert len(steps) == len(compare.METHODS) * (1 + 1 + compare.MEMORY_STEPS + 2)
    assert [result["methods"][m]["peak_step_bytes"] for m in compare.METHODS] == [None] * 3
    line = next(line for line in compare.format_compare(result).splitlines() if line.startswith("peak memory"))
    assert re.split(r"\s{2,}", line.strip()) == ["peak memory / step [1]", "n/a", "n/a", "n/a"]


def test_peak_memory_is_measured_with_one_model_in_memory(monkeypatch):
    """The three models train together (their steps alternate), but each probed step runs with its own method's
    model alone in memory: the others' weights, gradients and AdamW state would count in its peak."""
    import gc
    alive = []

    class Probe(StandInProbe):
        def start(self):
            gc.collect()
            alive.append(sum(type(o) is DecoderLM for o in gc.get_objects()))

    monkeypatch.setattr(compare, "MemoryProbe", Probe)
    run_compare(dataclasses.replace(TINY, steps=2, warmup=1, infer_reps=1, batch_size=2, seq_len=8,
                                    targets=("q_proj",)))
    assert alive == [1] * (len(compare.METHODS) * compare.MEMORY_STEPS)


def test_each_columns_peak_memory_is_measured_on_that_methods_model(monkeypatch):
    """The model alone in memory during a probed step is the column's own: no LoRA layer for full fine-tuning
    (every weight trained), the torch backend's LoRA layers for the torch column, the fused backend's for the fused
    one. A peak measured on another method's model (full fine-tuning's for all three) printed one method's memory
    in every column, and its ratios 1.00x."""
    import gc
    models = []

    class Probe(StandInProbe):
        def start(self):
            gc.collect()
            model, = [o for o in gc.get_objects() if type(o) is DecoderLM]
            models.append(sorted({layer.backend for layer in compare._lora_layers(model)}))

    monkeypatch.setattr(compare, "MemoryProbe", Probe)
    result = run_compare(dataclasses.replace(TINY, steps=2, warmup=1, infer_reps=1, batch_size=2, seq_len=8,
                                             targets=("q_proj",)))
    expected = [[], ["torch"], [result["backends"]["fused"]]]
    assert models == [backends for backends in expected for _ in range(compare.MEMORY_STEPS)]


def _stand_in_runs(monkeypatch, draws):
    """A _MethodRun per method over a one-parameter model each, whose training step draws a number from the global
    random stream (as LoRA dropout does) and records it with the method's name in `draws`."""
    def train_step(model, optimizer, inputs, targets):
        draws.append((model.method, torch.rand(()).item()))
        return torch.zeros(())

    monkeypatch.setattr(compare, "_train_step", train_step)
    cfg = _tiny_cfg(steps=4, warmup=1)
    runs = []
    for method in compare.METHODS:
        model = torch.nn.Linear(1, 1)
        model.method = method
        runs.append(compare._MethodRun(method, model, cfg))
    return cfg, runs


def test_training_steps_alternate_between_the_methods_in_rounds_of_reversed_order(monkeypatch):
    """One step of each method per round, the order reversed every round, so a change of the machine's load falls
    on every column alike (trained one after another, a 2-core run under load printed LoRA at 0.10x and 1.30x full
    fine-tuning's step time); the warm-up steps are trained but not timed."""
    draws = []
    cfg, runs = _stand_in_runs(monkeypatch, draws)
    batches = [(None, None)] * cfg.steps
    compare._train_alternated(runs, cfg, batches, compare.ProgressBar(1, enabled=False))
    forward, backward = list(compare.METHODS), list(reversed(compare.METHODS))
    assert [method for method, _ in draws] == forward + backward + forward + backward
    assert [len(run.step_seconds) for run in runs] == [cfg.steps - cfg.warmup] * 3
    assert [len(run.losses) for run in runs] == [cfg.steps] * 3


def test_each_method_draws_from_its_own_random_streams(monkeypatch):
    """The runs' steps interleave, yet each run's n-th step draws what every other run's n-th step draws (the LoRA
    columns then train with the same dropout masks, as when they ran one after another from one seed), and stepping
    a run leaves the caller's random stream as it was."""
    draws = []
    cfg, runs = _stand_in_runs(monkeypatch, draws)
    torch.manual_seed(1234)
    outside = torch.get_rng_state()
    compare._train_alternated(runs, cfg, [(None, None)] * cfg.steps, compare.ProgressBar(1, enabled=False))
    assert torch.equal(torch.get_rng_state(), outside)
    by_method = {method: [value for m, value in draws if m == method] for method in compare.METHODS}
    assert by_method["full"] == by_method["lora_torch"] == by_method["lora_fused"]
    assert len(set(by_method["full"])) == cfg.steps  # the stream moves on from step to step
    torch.manual_seed(cfg.seed + 2)
    assert by_method["full"] == [torch.rand(()).item() for _ in range(cfg.steps)]


def test_the_eval_loss_before_and_after_training_is_taken_on_the_same_held_out_batch():
    """With learning rates too small to move a float32 weight (or a LoRA B factor's product with A, next to the base
    output), training changes nothing: each method's eval loss after training is then the one before it, which it
    is only when both are taken on the held-out batch (not on a training batch)."""
    still = run_compare(dataclasses.replace(TINY, steps=2, warmup=1, infer_reps=1, batch_size=2, seq_len=8,
                                            targets=("q_proj",), lr=1e-30, lora_lr=1e-30))
    for name, run in still["methods"].items():
        assert run["eval_loss"] == pytest.approx(still["task"]["initial_eval_loss"], rel=1e-6), name


def test_the_result_says_what_ran(result):
    """The numbers that describe the run itself, recomputed from the config: the task, the step-time statistics and
    their derived rates, each method's learning rate, which backends were run and what the footnotes say."""
    cfg, task = result["config"], result["task"]
    assert task["task_vocab"] == min(cfg["task_vocab"], cfg["vocab"]) == 64
    assert task["tokens_per_step"] == cfg["batch_size"] * cfg["seq_len"]
    assert task["uniform_loss"] == math.log(cfg["vocab"])  # the model's vocabulary, not the task's 64 tokens
    for name, run in result["methods"].items():
        assert run["lr"] == (cfg["lr"] if name == "full" else cfg["lora_lr"]), name
        assert run["step_ms_median"] == statistics.median(run["step_ms_all"]), name
        assert run["tokens_per_s"] == pytest.approx(task["tokens_per_step"] / (run["step_ms_median"] / 1e3)), name
        assert ("lora_layers" in run) == (name != "full"), name
    assert "reference" not in result["backends"]["available"]  # the spec, not a backend to run a model with
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    assert result["environment"]["triton"] == triton_version
    assert result["environment"]["cpu_threads"] == cfg["threads"] == TINY.threads
    assert result["measurement"]["step_time"].startswith(
        f"median wall time of steps {TINY.warmup + 1}..{TINY.steps} (device synchronised), first {TINY.warmup} ")
    assert (result["inference"]["tokens"], result["inference"]["reps"]) == (TINY.batch_size * TINY.seq_len,
                                                                            TINY.infer_reps)
    # _time_forwards' two warm-up rounds (test_inference_passes_are_timed_in_ms_after_two_warmup_passes)
    assert result["measurement"]["inference"] == (f"median of {TINY.infer_reps} forward passes after 2 warm-up "
                                                  f"passes, eval mode, no grad, the three paths in alternating rounds")


@pytest.mark.skipif(compare.backends.unavailable_reason("cpu", "cpu") is not None, reason="needs the C++ extension")
def test_auto_in_bf16_on_a_cpu_with_bf16_gemm_units_says_the_fused_column_is_not_autos_choice(monkeypatch):
    """backend="auto" runs a bf16 lora_linear on the torch composition on a CPU with bf16 GEMM units; the fused
    column asked auto without the run's dtype, got the C++ kernels, and showed them as auto's choice, unnoted."""
    monkeypatch.setattr(compare.backends, "CPU_HAS_BF16_GEMM_UNITS", True)
    chosen, note = compare.fused_backend_for(CompareConfig(model_size="tiny", device="cpu", dtype="bf16").resolved())
    assert chosen == "cpu"
    assert note is not None and "backend='auto' runs lora_linear on cpu with the unfused 'torch'" in note, note


def test_without_a_fused_backend_the_note_says_why_each_is_missing(monkeypatch):
    monkeypatch.setattr(compare.backends, "auto_backend", lambda device, op_name="lora_linear", dtype=None: "torch")
    monkeypatch.setattr(compare.backends, "unavailable_reason",
                        lambda name, device: None if name in ("torch", "reference") else f"no {name} here")
    chosen, note = compare.fused_backend_for(CompareConfig(model_size="tiny", device="cpu").resolved())
    assert chosen == "torch"
    assert note.endswith("uses the 'torch' backend too (triton: no triton here; cuda: no cuda here; cpu: no cpu here)")


def test_the_cpu_is_named_by_its_model_name():
    # /proc/cpuinfo also has a "model" line (a number) before "model name"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    if not names:
        pytest.skip("no model name in /proc/cpuinfo")
    assert compare.cpu_model() == names[0]


# ------------------------------------------------------------------------------------------------ mutation round 2

def test_the_extreme_seeds_torch_takes_are_accepted():
    """--seed's range is torch's [-2**63, 2**64 - 1] less the 4 seeds the run adds: both ends run, the next ones out
    are refused (test_bad_config_names_the_option)."""
    for seed in (-2 ** 63, 2 ** 64 - 5):
        assert dataclasses.replace(TINY, seed=seed).resolved().seed == seed
        torch.Generator().manual_seed(seed + 4)  # the largest seed the run gives torch


def test_auto_choosing_a_fused_backend_runs_it_without_a_note(monkeypatch):
    """Where backend="auto" already picks a fused backend for lora_linear (the C++ kernels on a CPU, fp32), the fused
    column runs auto's choice and says nothing: the note that auto's choice was replaced is for the unfused one."""
    monkeypatch.setattr(compare.backends, "unavailable_reason", lambda name, device: None)
    monkeypatch.setattr(compare.backends, "auto_backend", lambda device, op_name="lora_linear", dtype=None: "cpu")
    assert compare.fused_backend_for(CompareConfig(model_size="tiny", device="cpu").resolved()) == ("cpu", None)


def test_the_eval_loss_is_taken_on_a_batch_no_step_trained_on(monkeypatch):
    """"eval loss after training" is a held-out loss: its batch is drawn from its own seed, none of the training
    batches (drawn from the seed before it, it had been the first training batch, which every method fits best)."""
    trained, evaluated = [], []
    train_step, eval_loss = compare._train_step, compare._eval_loss
    monkeypatch.setattr(compare, "_train_step",
                        lambda model, optimizer, inputs, targets: trained.append(inputs)
                        or train_step(model, optimizer, inputs, targets))
    monkeypatch.setattr(compare, "_eval_loss",
                        lambda model, batch: evaluated.append(batch[0]) or eval_loss(model, batch))
    run_compare(dataclasses.replace(TINY, steps=3, warmup=1, infer_reps=1, batch_size=2, seq_len=8,
                                    targets=("q_proj",)))
    assert trained and len(evaluated) == 1 + len(compare.METHODS)  # before training, then after it per method
    assert all(torch.equal(batch, evaluated[0]) for batch in evaluated)
    assert not any(torch.equal(batch, evaluated[0]) for batch in trained)


def test_the_training_losses_are_the_steps_the_table_counts(monkeypatch):
    """On CUDA one more step runs, profiled, after training (gpu_busy_ms): its loss is not one of the --steps steps
    the table's "first step -> last" and the plot's curve show (a stand-in profiler runs it here), and it changes no
    weight (it had: the checkpoint and the inference paths measured a model trained one step more than its losses
    say), while its forward, backward and optimizer step run as in training."""
    profiling, profiled = [], []
    train_step = compare._train_step

    def recorded_train_step(model, optimizer, inputs, targets):
        if not profiling:
            return train_step(model, optimizer, inputs, targets)
        before = [p.detach().clone() for p in optimizer.param_groups[0]["params"]]
        steps_before = [optimizer.state[p]["step"].item() for p in optimizer.param_groups[0]["params"]]
        loss = train_step(model, optimizer, inputs, targets)
        params = optimizer.param_groups[0]["params"]
        profiled.append((all(torch.equal(b, p) for b, p in zip(before, params)),
                         all(p.grad is not None for p in params),
                         [optimizer.state[p]["step"].item() for p in params] == [s + 1 for s in steps_before]))
        return loss

    def busy(step, device):
        profiling.append(True)
        step()
        profiling.pop()
        return 5.0

    monkeypatch.setattr(compare, "_train_step", recorded_train_step)
    monkeypatch.setattr(compare, "gpu_busy_ms", busy)
    shown = run_compare(dataclasses.replace(TINY, steps=3, warmup=1, infer_reps=1, batch_size=2, seq_len=8,
                                            targets=("q_proj",)))
    for name, run in shown["methods"].items():
        assert len(run["train_losses"]) == 3 and run["gpu_busy_ms"] == 5.0, name
    assert profiled == [(True, True, True)] * len(compare.METHODS)
    assert "GPU busy / step [3]" in compare.format_compare(shown)


def test_a_step_with_zero_gradients_leaves_the_weights_as_they_were(monkeypatch):
    """The runs train with AdamW without weight decay (its default 0.01 pulls every trained weight towards 0 each
    step: all of full fine-tuning's, only the factors of LoRA's), so that the columns differ by what they train."""
    cfg = _tiny_cfg(lr=1.0, lora_lr=1.0)
    monkeypatch.setattr(compare, "lm_loss", lambda logits, targets: (logits * 0).sum())
    inputs, targets = compare.make_batch(compare.make_task(cfg.vocab, cfg.task_vocab, 0), 2, 8,
                                         torch.Generator().manual_seed(0))
    for method in ("full", "lora_torch"):
        run = compare._MethodRun(method, compare._build(method, cfg, _init_state(cfg), "torch"), cfg)
        before = [p.detach().clone() for p in run.params]
        run.step(inputs, targets)
        assert all(torch.equal(p, q) for p, q in zip(run.params, before)), method


def test_each_training_step_starts_from_fresh_gradients():
    """A step's gradients are its own batch's: kept from the step before, they would add up (a second step on the
    same batch had twice the first one's gradients)."""
    cfg = _tiny_cfg()
    model = compare._build("full", cfg, _init_state(cfg), "torch")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    batch = compare.make_batch(compare.make_task(cfg.vocab, cfg.task_vocab, 0), 2, 8, torch.Generator().manual_seed(0))
    compare._train_step(model, optimizer, *batch)
    first = [p.grad.clone() for p in model.parameters()]
    compare._train_step(model, optimizer, *batch)
    for p, grad in zip(model.parameters(), first):
        torch.testing.assert_close(p.grad, grad)


def test_the_progress_bar_reaches_its_end_with_the_run(monkeypatch):
    """The bar's total is the run's number of updates: fewer, and it said 100% while the inference latencies were
    still being measured."""
    bars = []

    class Bar(compare.ProgressBar):
        def __init__(self, total, **kwargs):
            super().__init__(total, **kwargs)
            self.updates = 0
            bars.append(self)

        def update(self, label):
            self.updates += 1
            super().update(label)

    monkeypatch.setattr(compare, "ProgressBar", Bar)
    run_compare(dataclasses.replace(TINY, steps=3, warmup=1, infer_reps=1, batch_size=2, seq_len=8,
                                    targets=("q_proj",)))
    assert len(bars) == 1 and bars[0].updates == bars[0].total


def test_step_time_spread_needs_four_steps_and_more_than_its_limit():
    """step_time_spread's quartiles: None for fewer than 4 steps (3 have quartiles, too few to call a spread) and for
    an interquartile range of exactly STEP_SPREAD_LIMIT of the median ("more than", as the drift's limit)."""
    assert compare.STEP_SPREAD_LIMIT == 0.25
    assert compare.step_time_spread([10.0, 40.0, 90.0]) is None
    assert compare.step_time_spread([36.0, 36.0, 40.0, 46.0, 46.0]) is None  # quartiles 36 and 46: 10 = 0.25 * 40
    assert compare.step_time_spread([32.0, 36.0, 40.0, 44.0, 48.0]) == (34.0, 46.0)


def test_a_drifting_column_gets_the_drift_note_alone(result):
    """A column whose steps rose steadily also spreads wide around its median: it gets the drift note, which says
    more, and not the spread note as well."""
    import copy
    shown = copy.deepcopy(result)
    steady = [40.0, 43.0, 39.0, 41.0, 38.0, 42.0, 40.5, 39.5, 43.5]
    rising = [40.0, 41.0, 39.0, 44.0, 46.0, 45.0, 60.0, 62.0, 61.0]
    assert compare.step_time_spread(rising) is not None
    shown["methods"]["full"]["step_ms_all"] = steady
    shown["methods"]["lora_torch"]["step_ms_all"] = steady
    shown["methods"]["lora_fused"]["step_ms_all"] = rising
    notes = [line for line in compare.format_compare(shown).splitlines() if "note:" in line and " ms" in line]
    assert len(notes) == 1 and "the step time went from 40.0 ms" in notes[0], notes


def test_inference_notes_at_their_boundaries(result):
    """A merged median equal to an unmerged one is not "measured slower"; a fused-vs-unfused difference that is not
    a number (NaN logits) is not within the tolerance, and is named."""
    import copy
    shown = copy.deepcopy(result)
    shown["backends"]["fused_note"] = None
    for run in shown["methods"].values():
        run["step_ms_all"] = [40.0] * 8  # steady: no step-time note
    shown["inference"].update(merged_ms=3.0, unmerged_unfused_ms=3.0, unmerged_fused_ms=3.0,
                              fused_vs_unfused_rel_diff=1e-6)
    assert not [line for line in compare.format_compare(shown).splitlines() if "note:" in line]
    shown["inference"]["fused_vs_unfused_rel_diff"] = math.nan
    notes = [line for line in compare.format_compare(shown).splitlines() if "note:" in line]
    assert len(notes) == 1 and "its logits differ from the torch column's by nan (relative)" in notes[0], notes
    # the torch column's logits NaN too (a diverged run, --alpha 1e30): nothing is said against the fused backend
    shown["inference"]["unfused_logits_finite"] = False
    notes = [line for line in compare.format_compare(shown).splitlines() if "note:" in line]
    assert notes == ["  note: the torch column's logits are not finite (its training diverged), so the fused column's "
                     "logits are not compared with them"], notes


def test_gpu_busy_at_half_the_step_or_missing_for_a_column(result):
    """The host-bound note is for a GPU that worked less than half the median step: exactly half gets none. A column
    whose profile recorded no GPU work (None) leaves the GPU busy row out, rather than failing to print None."""
    import copy
    shown = copy.deepcopy(result)
    for name in compare.METHODS:
        shown["methods"][name].update(step_ms_median=40.0, step_ms_all=[40.0] * 8, gpu_busy_ms=20.0)
    text = compare.format_compare(shown)
    assert "GPU busy / step [3]" in text and not [line for line in text.splitlines() if "waited on the host" in line
                                                  and "note:" in line]
    shown["methods"]["lora_fused"]["gpu_busy_ms"] = None
    text = compare.format_compare(shown)
    assert "GPU busy" not in text and "[3]" not in text


def test_a_share_just_under_a_tenth_of_a_percent_prints_two_decimals():
    """From 0.095% up two decimals show two significant digits, as _ratio's (0.0996% is "0.10%", not "0.1%")."""
    assert [compare._percent(v) for v in (0.0949, 0.0996, 0.1)] == ["0.095%", "0.10%", "0.10%"]


def test_plot_writes_the_format_its_extension_names(result, tmp_path):
    """--plot fig.svg (a format the CLI accepts) writes SVG, not PNG bytes under an .svg name."""
    pytest.importorskip("matplotlib")
    path = compare.plot_compare(result, str(tmp_path / "compare.svg"))
    assert b"<svg" in (tmp_path / "compare.svg").read_bytes()[:1000] and path == str(tmp_path / "compare.svg")


@pytest.mark.parametrize("layers", [1, 2, 5])
def test_the_parameter_count_that_the_memory_check_reads_is_the_models(layers):
    """parameter_count extrapolates from one- and two-layer models (resolved() never builds a huge one)."""
    model_cfg = ModelConfig(vocab=50, hidden=24, layers=layers, heads=3, intermediate=40)
    with torch.device("meta"):
        model = DecoderLM(model_cfg)
    assert compare.parameter_count(model_cfg) == sum(p.numel() for p in model.parameters())


def test_the_memory_check_refuses_only_what_cannot_fit(monkeypatch):
    """Full fine-tuning's weights, gradients and AdamW moments (4 copies in --dtype) against the device's memory."""
    cfg = CompareConfig(model_size="tiny", device="cpu").resolved()
    state = 4 * 4 * compare.parameter_count(cfg.model_config())
    monkeypatch.setattr(compare, "device_memory_bytes", lambda device: state)
    CompareConfig(model_size="tiny", device="cpu").resolved()  # exactly fits
    monkeypatch.setattr(compare, "device_memory_bytes", lambda device: state - 1)
    with pytest.raises(ValueError, match=r"^compare: the model of --hidden 64, --layers 2, --intermediate 176, --vocab "
                                         r"128 has 117,056 parameters: .* take 0\.00187 GB in float32, more than the "
                                         r"0\.00187 GB of this cpu device; choose smaller sizes$"):
        CompareConfig(model_size="tiny", device="cpu").resolved()
    monkeypatch.setattr(compare, "device_memory_bytes", lambda device: None)  # unknown: not checked
    CompareConfig(model_size="tiny", device="cpu").resolved()


def test_an_unmerged_path_faster_in_too_few_rounds_is_not_called_systematic(result):
    """--infer-reps 1: the unmerged path faster than the merged model in its one round was "not the machine's load,
    but GEMMs run another way", a conclusion from one timing (the step-time notes need 4 steps). Below
    SYSTEMATIC_MIN_ROUNDS rounds the note says the rounds are too few to tell; from there the systematic note
    returns."""
    import copy
    shown = copy.deepcopy(result)
    shown["backends"]["fused"] = "cpu"
    for rounds in (1, 4, compare.SYSTEMATIC_MIN_ROUNDS):
        shown["inference"].update(reps=rounds, merged_ms=30.0, unmerged_unfused_ms=40.0, unmerged_fused_ms=29.0,
                                  merged_ms_all=[30.0] * rounds, unmerged_unfused_ms_all=[40.0] * rounds,
                                  unmerged_fused_ms_all=[29.0] * rounds)
        notes = [line for line in compare.format_compare(shown).splitlines() if "strictly less work" in line]
        if rounds < compare.SYSTEMATIC_MIN_ROUNDS:
            assert notes == [f"  note: the merged model does strictly less work than the unmerged one, yet measured "
                             f"slower than the unmerged cpu path in all of {rounds} round{'s' if rounds > 1 else ''}: "
                             f"too few to tell the machine's load from GEMMs run another way (more --infer-reps)"]
        else:
            assert len(notes) == 1 and f"in {rounds} of {rounds} rounds" in notes[0] and "not the machine's" in notes[0]
