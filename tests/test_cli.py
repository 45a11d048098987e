"""The command line: `lora-kernels info | compare | bench` (in-process and as subprocesses) and scripts/gpu_check.sh
(syntax, and its --dry-run on CPU). Structure only: no timing is asserted."""

import argparse
import ast
import io
import json
import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import warnings

import pytest

from lora_kernels import backends, cli
from lora_kernels import triton as triton_pkg

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY_COMPARE = ["compare", "--model-size", "tiny", "--device", "cpu", "--batch-size", "2", "--seq-len", "16",
                "--steps", "4", "--warmup", "1", "--infer-reps", "2", "--threads", "1", "--no-progress"]
QUICK_BENCH = ["bench", "--quick", "--device", "cpu", "--threads", "1", "--reps", "2", "--no-progress"]
# gpu_check's stages on CPU (the crossovers' stand-in rows) run the cpu backend, absent from a checkout not built
needs_cpu_backend = pytest.mark.skipif(backends.unavailable_reason("cpu", "cpu") is not None,
                                       reason=f"needs the cpu backend: {backends.unavailable_reason('cpu', 'cpu')}")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run(args, timeout=120):
    return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_python_m_lora_kernels_info():
    proc = _run([sys.executable, "-m", "lora_kernels", "info"])
    assert proc.returncode == 0, proc.stderr
    assert "backends for cpu tensors" in proc.stdout and "torch" in proc.stdout


@pytest.mark.skipif(not triton_pkg.HAS_TRITON, reason="triton not importable")
def test_info_shows_the_triton_tma_switch():
    def info(*args, **extra_env):
        env = {key: value for key, value in _env().items() if key != "LORA_KERNELS_TRITON_TMA"}
        proc = subprocess.run([sys.executable, "-m", "lora_kernels", "info", *args], cwd=ROOT, env={**env, **extra_env},
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "TMA forward/dX kernels (sm_90+; fwd+bwd 1.11-1.12x the pointer kernels' time on the H200): off " \
        "(LORA_KERNELS_TRITON_TMA=1" in info()
    assert json.loads(info("--json"))["triton_tma"] is False
    assert json.loads(info("--json", LORA_KERNELS_TRITON_TMA="1"))["triton_tma"] is True
    # read as Triton reads TRITON_INTERPRET: "true" left the kernels off (helper 288)
    assert json.loads(info("--json", LORA_KERNELS_TRITON_TMA="true"))["triton_tma"] is True


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("ON", True), (" yes ", True), ("0", False),
                                             ("false", False), ("Off", False), ("no", False), ("", "default")])
@pytest.mark.parametrize("default", [True, False])
def test_the_packages_switches_read_triton_s_spellings(monkeypatch, value, expected, default):
    """LORA_KERNELS_AUTOTUNE and LORA_KERNELS_TRITON_TMA were compared with "0" and "1": AUTOTUNE=false left the
    minutes of autotuning on, TRITON_TMA=true the kernels off, silently (helper 288)."""
    monkeypatch.setenv("LORA_KERNELS_SOME_SWITCH", value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert triton_pkg.env_flag("LORA_KERNELS_SOME_SWITCH", default) is (default if expected == "default"
                                                                            else expected)
    monkeypatch.delenv("LORA_KERNELS_SOME_SWITCH")
    assert triton_pkg.env_flag("LORA_KERNELS_SOME_SWITCH", default) is default


@pytest.mark.skipif(not triton_pkg.HAS_TRITON, reason="triton not importable")
def test_lora_kernels_autotune_false_turns_autotuning_off():
    proc = subprocess.run([sys.executable, "-c", "import lora_kernels.triton.lora_linear as t; print(t.AUTOTUNE)"],
                          cwd=ROOT, env={**_env(), "LORA_KERNELS_AUTOTUNE": "false"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_an_unknown_spelling_of_a_switch_warns_and_keeps_the_default(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_AUTOTUNE", "fasle")
    with pytest.warns(UserWarning, match=r"LORA_KERNELS_AUTOTUNE='fasle' is not one of 1/true/on/yes/y/0/false/off/"
                                         r"no/n; using the default, 1"):
        assert triton_pkg.env_flag("LORA_KERNELS_AUTOTUNE", True) is True


@pytest.mark.skipif(not triton_pkg.HAS_TRITON, reason="triton not importable")
def test_info_says_triton_on_cpu_is_the_interpreter():
    # with TRITON_INTERPRET=1, info listed triton for cpu tensors as plain "available"
    proc = subprocess.run([sys.executable, "-m", "lora_kernels", "info"], cwd=ROOT,
                          env={**_env(), "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^  triton +available \(the Triton interpreter, TRITON_INTERPRET=1", proc.stdout, re.MULTILINE)


def test_info_says_the_tma_kernels_are_unavailable_without_triton(monkeypatch, capsys):
    """Without triton, info told the user to set LORA_KERNELS_TRITON_TMA=1, which cannot turn them on."""
    info = cli.info_dict()
    monkeypatch.setattr(cli, "info_dict", lambda: {**info, "triton": None, "triton_tma": False})
    cli.print_info()
    assert "pointer kernels' time on the H200): unavailable (triton is not importable)" in capsys.readouterr().out


@pytest.mark.parametrize("units", [False, True])
def test_info_names_the_bf16_lora_linear_choice_where_it_differs(units, monkeypatch, capsys):
    from lora_kernels import backends
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: None if name in ("cpu", "torch") else "-")
    monkeypatch.setattr(backends, "CPU_HAS_BF16_GEMM_UNITS", units)
    cli.print_info()
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("backends for cpu"))
    assert line == "backends for cpu tensors (auto -> lora_linear: cpu" + (" (bfloat16: torch)" if units else "") \
        + ", grouped ops: cpu):"


def test_console_script_info():
    script = shutil.which("lora-kernels", path=os.path.dirname(sys.executable)) or shutil.which("lora-kernels")
    if script is None:
        pytest.skip("the lora-kernels console script is not installed (pip install -e . installs it)")
    proc = _run([script, "info", "--json"])
    assert proc.returncode == 0, proc.stderr
    assert "cpu" in json.loads(proc.stdout)["backends"]


def test_pyproject_declares_the_console_script():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^lora-kernels = "lora_kernels\.cli:main"$', text, re.MULTILINE)
    assert callable(cli.main)


def test_compare_json_parses_and_has_the_three_runs(capsys):
    assert cli.main(TINY_COMPARE + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["methods"]) == {"full", "lora_torch", "lora_fused"}
    assert result["config"]["model_size"] == "tiny" and result["config"]["steps"] == 4
    assert result["methods"]["full"]["trainable_percent"] == 100.0


def test_compare_table_and_save(capsys, tmp_path):
    saved = tmp_path / "compare.json"
    assert cli.main(TINY_COMPARE + ["--rank", "4", "--alpha", "8", "--targets", "q_proj,v_proj",
                                    "--save", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "full fine-tuning" in out and "LoRA, torch (unfused)" in out and "inference latency" in out
    result = json.loads(saved.read_text())
    assert result["config"]["targets"] == ["q_proj", "v_proj"] and result["methods"]["lora_torch"]["lora_layers"] == 4


def test_compare_table_says_which_scaling_rule_ran(capsys):
    # --rslora changed the scaling (alpha / sqrt(r)) but the printed LoRA line was the same as without it
    assert cli.main(TINY_COMPARE + ["--rank", "4", "--alpha", "8", "--rslora", "--targets", "q_proj"]) == 0
    assert "r=4, alpha=8, scaling alpha/sqrt(r) = 4 (rsLoRA)," in capsys.readouterr().out
    assert cli.main(TINY_COMPARE + ["--rank", "4", "--alpha", "8", "--targets", "q_proj"]) == 0
    out = capsys.readouterr().out
    assert "r=4, alpha=8, scaling alpha/r = 2," in out and "rsLoRA" not in out


def test_compare_save_and_json_write_standard_json(monkeypatch, capsys, tmp_path):
    # --save went through json.dump's default allow_nan=True: a diverged loss became a bare NaN in the file
    from lora_kernels import compare
    run = compare.run_compare

    def diverging(config):
        result = run(config)
        result["methods"]["full"]["eval_loss"] = float("nan")
        return result

    monkeypatch.setattr(compare, "run_compare", diverging)
    saved = tmp_path / "c.json"
    assert cli.main(TINY_COMPARE + ["--targets", "q_proj", "--save", str(saved)]) == 0
    capsys.readouterr()

    def refuse(constant):
        raise ValueError(constant)

    assert json.loads(saved.read_text(), parse_constant=refuse)["methods"]["full"]["eval_loss"] is None
    assert cli.main(TINY_COMPARE + ["--targets", "q_proj", "--json"]) == 0  # and so does --json on stdout
    assert json.loads(capsys.readouterr().out, parse_constant=refuse)["methods"]["full"]["eval_loss"] is None


def test_compare_help_lists_the_backends(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    assert "reference, torch, triton, cuda, cpu or auto" in " ".join(capsys.readouterr().out.split())


def test_compare_bad_option_is_a_clear_error(capsys):
    assert cli.main(TINY_COMPARE + ["--targets", "no_such_layer"]) == 2
    assert "--targets" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(TINY_COMPARE + ["--rank", "0"])


@pytest.mark.parametrize("options, message", [
    (["--device", "gpu"], "compare: --device expected cpu or cuda, got 'gpu'"),
    (["--lr", "-1"], "compare: --lr expected a number > 0 and at most 3.4028234663852877e+37"),
    (["--lora-lr", "nan"], "compare: --lora-lr expected a number > 0 and at most 3.4028234663852877e+37"),
    # AdamW's first step had ended the run in a traceback (helper 294)
    (["--lr", "1e39"], "compare: --lr expected a number > 0 and at most 3.4028234663852877e+37"),
    (["--vocab", "1"], "compare: --vocab expected an int >= 2"),
    (["--alpha", "nan"], "compare: --alpha expected a finite number, got nan"),
    (["--alpha", "inf"], "compare: --alpha expected a finite number, got inf"),
    # an odd hidden fits no head count: the message had said to "set --heads to fit", which no --heads can
    (["--hidden", "65"], "compare: --hidden 65 expected an even number (the rotary head dim"),
    (["--hidden", "66", "--heads", "2"], "compare: --hidden 66 expected a multiple of --heads 2 with an even head dim"),
    (["--save", "/no/such/folder/out.json"], "compare: --save /no/such/folder/out.json: the folder /no/such/folder "
                                             "does not exist"),
    (["--plot", "/no/such/folder/x.png"], "the folder /no/such/folder does not exist"),
    (["--save", ""], "compare: --save expected a file path, got ''"),
    # the reason after it depends on the build (an extension without CUDA says so: a CPU-only torch; helper 119)
    (["--backend", "cuda"], "compare: --backend 'cuda' is not available for cpu: "),
    (["--save", str(ROOT)], f"compare: --save {ROOT}: is a folder, expected a file path"),
    (["--plot", str(ROOT)], f"compare: --plot {ROOT}: is a folder, expected a file path"),
])
def test_compare_bad_values_are_one_line_errors_before_the_run(capsys, options, message):
    """Each refused before any model is built (the --save / --plot folders had been found missing only after the
    whole run; --device gpu and --lr -1 had ended in tracebacks from torch)."""
    assert cli.main(TINY_COMPARE + options) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_save_in_a_folder_that_cannot_be_written_is_refused_before_the_run(capsys, monkeypatch, tmp_path):
    # --save to a folder without write permission (or a read-only file system) ended the run in a traceback
    import tempfile
    writable = tempfile.NamedTemporaryFile

    def unwritable(*args, dir=None, **kwargs):  # only the folder of --save is unwritable: the probe is made there
        if dir == str(tmp_path):
            raise PermissionError(13, "Permission denied")
        return writable(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", unwritable)
    for command in (TINY_COMPARE, QUICK_BENCH):
        assert cli.main(command + ["--save", str(tmp_path / "out.json")]) == 2
        err = capsys.readouterr().err
        assert f"--save {tmp_path / 'out.json'}: cannot write in the folder {tmp_path} (Permission denied)" in err
        assert "Traceback" not in err


def test_save_to_a_bare_file_name_goes_to_the_current_folder(monkeypatch, tmp_path):
    from lora_kernels import compare
    monkeypatch.chdir(tmp_path)
    assert _config_of(TINY_COMPARE + ["--save", "out.json"], monkeypatch, compare, "run_compare")


def test_bench_save_to_a_folder_is_refused_before_the_run(capsys):
    assert cli.main(QUICK_BENCH + ["--save", str(ROOT)]) == 2
    assert f"bench: --save {ROOT}: is a folder" in capsys.readouterr().err


def test_compare_plot_without_matplotlib_is_a_clear_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert cli.main(TINY_COMPARE + ["--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "needs matplotlib" in err and "pip install" in err
    assert not (tmp_path / "x.png").exists()


def test_compare_json_with_a_plot_prints_only_the_json(capsys, monkeypatch, tmp_path):
    # the "figure: PATH" line goes with the table; after --json it would make stdout unparseable
    import types

    from lora_kernels import compare
    monkeypatch.setitem(sys.modules, "matplotlib", types.ModuleType("matplotlib"))  # passes the up-front check
    plotted = []
    monkeypatch.setattr(compare, "plot_compare", lambda result, path: plotted.append(path))
    plot = str(tmp_path / "c.png")
    assert cli.main(TINY_COMPARE + ["--targets", "q_proj", "--plot", plot, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["targets"] == ["q_proj"] and plotted == [plot]
    assert cli.main(TINY_COMPARE + ["--targets", "q_proj", "--plot", plot]) == 0
    assert capsys.readouterr().out.endswith(f"\nfigure: {plot}\n")


def test_bench_quick_prints_ratio_rows(capsys):
    assert cli.main(QUICK_BENCH) == 0
    out = capsys.readouterr().out
    for section in ("forward / base F.linear", "LoRA fwd+bwd / the two base GEMMs", "unfused torch layer",
                    "LoRA fwd+bwd / full fine-tuning", "grouped prefill", "per-adapter loop",
                    "decode bandwidth", "peak memory of fwd+bwd"):
        assert section in out, section
    rows = [line for line in out.splitlines() if re.match(r"^  (torch|cpu|triton|cuda) ", line)]
    assert rows, out
    assert all(re.search(r"\s(\d+\.\d{3}|n/a)\s", row) for row in rows), rows
    assert "ERROR" not in out


def test_bench_json(capsys):
    assert cli.main(QUICK_BENCH + ["--ms", "1,8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    kinds = {row["kind"] for row in result["rows"]}
    assert {"fwd_decode", "fwd_bwd_vs_gemms", "unfused_vs_ours", "lora_vs_full", "grouped_distinct",
            "grouped_vs_loop", "decode_bandwidth", "memory_vs_unfused", "peak_memory_vs_unfused"} <= kinds
    for row in result["rows"]:
        assert row["baseline"] and row["ours"]
        assert row["meets_target"] is None  # CPU ratios are never judged against the GPU targets
        if row["ratio"] is not None:
            assert row["ratio"] > 0
    assert result["copy_bandwidth_gbs"] > 0
    assert result["config"]["ms"] == [1, 8]


def test_bench_rejects_an_unavailable_backend(capsys):
    assert cli.main(QUICK_BENCH + ["--backends", "cuda"]) == 2
    assert "cuda" in capsys.readouterr().err


def test_gpu_check_script_syntax():
    proc = _run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")])
    assert proc.returncode == 0, proc.stderr


def test_gpu_check_runs_only_the_selected_stages(tmp_path):
    # a lease too short for the whole check splits it over two calls: GPU_CHECK_STAGES names each call's stages
    env = _env()
    env["PYTHON"] = sys.executable
    script = str(ROOT / "scripts" / "gpu_check.sh")
    env["GPU_CHECK_STAGES"] = "tests,bogus"
    proc = subprocess.run(["bash", script, str(tmp_path), "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "unknown stage 'bogus'" in proc.stderr, proc.stderr
    env["GPU_CHECK_STAGES"] = "tests"
    env["GPU_CHECK_ARCHIVE"] = str(tmp_path / "out" / "gc.tgz")
    proc = subprocess.run(["bash", script, str(tmp_path / "out"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "GPU_CHECK_ARCHIVE must lie outside OUTDIR" in proc.stderr, proc.stderr
    # the archive, packed after every stage (a call cut short keeps what ran): here after the last one
    env["GPU_CHECK_ARCHIVE"] = str(tmp_path / "gc.tgz")
    proc = subprocess.run(["bash", script, str(tmp_path / "gc"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== tests (dry run, not run)" in proc.stdout and "== info (limit" in proc.stdout
    for stage in ("train", "grouped", "bench", "compare", "tests-memory", "profile", "crossovers", "sweep",
                  "compare_compiled"):
        assert f"== {stage}: not selected (GPU_CHECK_STAGES)" in proc.stdout, stage
        assert not (tmp_path / "gc" / f"{stage}.log").exists(), stage
    assert "0 stage(s) not ok" in proc.stdout
    with tarfile.open(tmp_path / "gc.tgz") as archive:
        assert {"gc/env.log", "gc/info.log", "gc/summary.txt"} <= set(archive.getnames()), archive.getnames()
    assert not (tmp_path / "gc.tgz.tmp").exists()


def _stand_in_python(tmp_path, cases):
    """A python for gpu_check that answers the shell `case` patterns in `cases` itself and runs the rest for real."""
    stub = tmp_path / "python"
    stub.write_text(f"""#!/bin/sh
case "$*" in
{cases}
esac
exec {sys.executable} "$@"
""")
    stub.chmod(0o755)
    return str(stub)


def _gpu_check_dry_run(tmp_path, **env_vars):
    env = _env()
    env.update(env_vars)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out"), "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_gpu_check_keeps_to_the_selected_stages_when_the_archive_cannot_be_written(tmp_path):
    # record() packs the archive, and not_selected() returned record's status: an archive that could not be written
    # (here its temporary file is a folder; a full disk, or tar's "file changed as we read it") made every stage
    # that GPU_CHECK_STAGES left out run after all, on a lease split over calls. A stand-in python makes each stage
    # instant; the rest runs for real.
    python = _stand_in_python(tmp_path, f"""  *benchmarks/table.py*) exec {sys.executable} "$@" ;;
  *"-m lora_kernels"*|*benchmarks/*) echo "stand-in $*"; exit 0 ;;""")
    (tmp_path / "gc.tgz.tmp").mkdir()  # tar cannot write the archive
    proc = _gpu_check_dry_run(tmp_path, PYTHON=python, GPU_CHECK_STAGES="tests",
                              GPU_CHECK_ARCHIVE=str(tmp_path / "gc.tgz"))
    for stage in ("train", "grouped", "bench", "compare", "profile", "crossovers", "sweep", "compare_compiled"):
        assert f"== {stage}: not selected (GPU_CHECK_STAGES)" in proc.stdout, stage
        assert f"== {stage} (limit" not in proc.stdout, f"{stage} ran although not selected"
    assert "could not write the archive" in proc.stderr, proc.stderr[-2000:]


def test_gpu_check_times_out_a_test_blocked_in_the_driver(tmp_path):
    # pytest-timeout's default method (SIGALRM) fails a test only once its thread returns to Python: a test waiting
    # in the CUDA driver for a kernel that never ends held the tests stage to its limit, unnamed. The thread method
    # ends the worker (xdist replaces it and names the test). A stand-in python has xdist and pytest-timeout.
    python = _stand_in_python(tmp_path, """  *"import xdist"*|*"import pytest_timeout"*) exit 0 ;;""")
    proc = _gpu_check_dry_run(tmp_path, PYTHON=python, GPU_CHECK_STAGES="tests")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("== tests (dry run"))
    assert "-n 14 --timeout 120 --timeout-method thread -m not gpu_memory" in line, line


@pytest.mark.slow
@needs_cpu_backend
def test_gpu_check_reuses_an_extension_built_from_the_same_inputs(tmp_path):
    # A second call of a lease on a warm machine found the extension built and rebuilt it whole (~50 s on the H200).
    # Here a stand-in python answers the CUDA check, pip (so nothing is built) and the extension check; the rest runs
    # for real.
    python = _stand_in_python(tmp_path, """  *"-m pip install"*) echo "stand-in build"; exit 0 ;;
  *torch.cuda.is_available*) exit 0 ;;
  *"extension with CUDA"*) echo "stand-in: the extension with CUDA loads"; exit 0 ;;""")
    stamp = ROOT / "build" / "gpu_check_extension.stamp"
    saved = stamp.read_text() if stamp.exists() else None
    env = _env()
    env.update(PYTHON=python, GPU_CHECK_STAGES="crossovers")
    from lora_kernels import _ext
    reusable = _ext.EXTENSION_WITH_CUDA and _ext.EXTENSION_ERROR is None

    def run():
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout
    try:
        if stamp.exists():
            stamp.unlink()
        assert "== build (limit" in run() and stamp.exists()  # no stamp: built, and the inputs recorded
        second = run()
        if reusable:  # the extension in place has CUDA: reused
            assert "== build: skipped" in second and "ok (reused)" in second, second
        else:  # nothing with CUDA to reuse: built again
            assert "== build (limit" in second, second
        stamp.write_text("other inputs\n")
        assert "== build (limit" in run()  # the inputs changed: built again
    finally:
        if saved is None:
            stamp.unlink(missing_ok=True)
        else:
            stamp.write_text(saved)


@pytest.mark.parametrize("pip_failure", ["time-out", "compiler error", "pip itself"])
def test_gpu_check_builds_in_place_again_only_when_pip_itself_failed(tmp_path, pip_failure):
    """After pip's build failed, setup.py build_ext compiled everything again: after a time-out that took 200 s more
    (every later stage got 38-48 s), after a compiler error it failed the same way. Only a failure of pip itself (an
    old setuptools without editable installs) is worth it. A stand-in python answers the CUDA check, pip, build_ext,
    the extension check and the stages; the crossovers stage fails, and the crossovers.json an earlier call left in
    OUTDIR is gone (the summary showed it as this call's)."""
    pip = {"time-out": "exit 124", "compiler error": 'echo "ninja: build stopped: subcommand failed."; exit 1',
           "pip itself": "echo \"ERROR: build backend is missing the 'build_editable' hook\"; exit 1"}[pip_failure]
    python = _stand_in_python(tmp_path, f"""  *"-m pip install"*) {pip} ;;
  *build_ext*) echo "stand-in build_ext"; exit 0 ;;
  *torch.cuda.is_available*) exit 0 ;;
  *"extension with CUDA"*) exit 0 ;;
  *benchmarks/table.py*) exec {sys.executable} "$@" ;;
  *cuda_crossovers*) exit 1 ;;
  *"-m lora_kernels"*|*benchmarks/*) echo "stand-in $*"; exit 0 ;;""")
    stamp = ROOT / "build" / "gpu_check_extension.stamp"
    saved = stamp.read_text() if stamp.exists() else None
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "crossovers.json").write_text("{}")
    env = _env()
    env.update(PYTHON=python, GPU_CHECK_STAGES="crossovers")
    try:
        stamp.unlink(missing_ok=True)
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        rebuilt = "== build_ext (limit" in proc.stdout
        assert rebuilt == (pip_failure == "pip itself"), proc.stdout[-3000:]
        assert stamp.exists() == rebuilt  # the stamp only for a build that succeeded
        assert "== crossovers (limit" in proc.stdout and proc.returncode == 1, proc.stdout[-3000:]
        assert not (tmp_path / "out" / "crossovers.json").exists()
    finally:
        if saved is None:
            stamp.unlink(missing_ok=True)
        else:
            stamp.write_text(saved)


def test_gpu_check_shows_no_results_of_an_earlier_call_for_a_stage_skipped_for_budget(tmp_path):
    """A stage skipped because the budget is spent kept the crossovers.json an earlier call on the warm machine left
    in OUTDIR, and the summary printed it as this call's (the stage table said "skipped (budget)")."""
    python = _stand_in_python(tmp_path, f"""  *benchmarks/table.py*) exec {sys.executable} "$@" ;;
  *"-m lora_kernels"*|*benchmarks/*) echo "stand-in $*"; exit 0 ;;""")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "crossovers.json").write_text('{"device": "STALE-FROM-AN-EARLIER-CALL", "rows": []}')
    env = _env()
    env.update(PYTHON=python, GPU_CHECK_BUDGET="5")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out"), "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "crossovers: skipped, the time budget (5s) is spent" in proc.stdout, proc.stdout[-3000:]
    assert "STALE" not in proc.stdout and not (tmp_path / "out" / "crossovers.json").exists()


@pytest.mark.slow
@needs_cpu_backend
def test_gpu_check_dry_run(tmp_path):
    env = _env()
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path), "--dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "== build (dry run, not run)" in out and "--no-build-isolation" in out
    assert "== tests (dry run, not run)" in out and "cuda or gpu" in out
    for log in ("env.log", "info.log", "train.log", "bench.log", "grouped.log", "profile.log", "sweep.log",
                "compare.log", "train.json", "bench.json", "grouped.json", "sweep.json", "compare.json", "summary.txt",
                "compare-compiled.log", "compare_compiled.json", "crossovers.log", "crossovers.json"):
        assert (tmp_path / log).exists(), log
    # the short table comes last: the key numbers, then the stages
    tail = out[out.index("what (worst case)"):]
    assert "compare (" in tail and "stage" in tail and "0 stage(s) not ok" in tail
    assert "cuda crossovers (cpu" in tail and "decode forward / its GEMM path: M=1 " in tail
    assert "steps, every decoder layer compiled):" in tail  # the compiled compare's summary, after the eager one
    assert json.loads((tmp_path / "compare.json").read_text())["config"]["model_size"] == "tiny"
    # each stage's log says what else the machine was doing when it started
    head = (tmp_path / "compare.log").read_text().splitlines()[:3]
    assert head[0].startswith("$ ") and "compare" in head[0], head
    assert re.fullmatch(r"# load average: \S+ \S+ \S+; busiest processes:", head[1]), head
    assert head[2].split()[:4] == ["#", "PID", "%CPU", "ELAPSED"], head
    profile = (tmp_path / "profile.log").read_text()
    assert "=== lora_linear fwd+bwd, backend torch" in profile
    assert "=== full fine-tuning layer fwd+bwd (F.linear, dX and dW), M=32, K=N=32" in profile
    assert "=== lora_linear fwd+bwd, backend cpu, M=32, K=N=32 (compare's layer)" in profile
    assert "=== F.linear forward, M=16: the floor" in profile and "=== lora_linear forward, backend cpu, M=1" in profile
    assert "=== lora_linear forward, no grad, backend cpu, M=32, K=88, N=32 (compare's inference)" in profile
    assert "=== ATen, LoRA term first, base GEMM with beta = 1 (lora_fwd_gemm's order), M=32, K=88, N=32" in profile
    # the rounding counts: the torch composition is the "base rounded first" model itself
    assert re.search(r"forward M=32, K=32, N=88, backend torch: of 2816 elements, 0 from base rounded first, \d+ from "
                     r"rounded once", profile), profile[:2000]
    assert "\nERROR: " not in profile  # the script's own failure line (the profiler may log "ERROR:<date>" lines)
    crossovers = json.loads((tmp_path / "crossovers.json").read_text())
    sections = {row["section"] for row in crossovers["rows"]}
    assert sections == {"decode forward", "dY-once backward, float32"}, sections
    assert all(row[key] > 0 for row in crossovers["rows"] for key in row if key.endswith("_ms")), crossovers


def test_a_failed_json_write_leaves_no_temporary_file(tmp_path):
    # _write_json writes a temporary file beside PATH and renames it; a rename that failed (PATH a folder) had left
    # the temporary file behind
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(OSError):
        cli._write_json({"a": 1}, str(target))
    assert os.listdir(tmp_path) == ["out"]


def test_saved_files_get_the_permissions_of_a_plain_open(tmp_path):
    """The atomic writes created their temporary files with tempfile.mkstemp, 0600, which the rename kept, and
    safetensors 0.8's save_file makes its file 0600 too (safetensors issue #782: vLLM running as another user could
    not load a fine-tuned adapter): an adapter saved for a serving container, or a --save JSON in a shared folder,
    could not be read there. Now they get what a plain open() gives, 0666 less the umask, as PEFT's
    adapter_config.json does. A leftover PATH.tmp of another run no longer stops a write (each writer has a name of
    its own)."""
    import torch.nn as nn

    import lora_kernels as lk
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    (tmp_path / "out.json.tmp").mkdir()  # a fixed temporary name had failed here with IsADirectoryError
    cli._write_json({"a": 1}, str(tmp_path / "out.json"))
    model = lk.inject_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], r=2)
    lk.save_peft_adapter(model, tmp_path / "adapter")
    written = [tmp_path / "out.json"] + sorted((tmp_path / "adapter").iterdir())
    assert [p.name for p in written] == ["out.json", "adapter_config.json", "adapter_model.safetensors"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(expected) for p in written}
    assert json.loads((tmp_path / "out.json").read_text()) == {"a": 1}


@pytest.mark.parametrize("command", ["compare", "bench"])
def test_a_save_that_fails_after_the_run_still_prints_the_results(capsys, monkeypatch, tmp_path, command):
    """--save (and --plot) were written before the results were printed: a failure there (a full disk, a path
    changed since the check before the run) ended a run of minutes in a traceback with nothing printed. The results
    are printed first; a failed write is one line on stderr and status 1."""
    from lora_kernels import bench, compare
    result = {"stand-in": True}
    monkeypatch.setattr(compare, "run_compare", lambda config: result)
    monkeypatch.setattr(bench, "run_bench", lambda config, on_update=None: result)
    monkeypatch.setattr(compare, "format_compare", lambda r: "the compare table")
    monkeypatch.setattr(bench, "format_bench", lambda r: "the bench table")

    def disk_full(result, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "_write_json", disk_full)
    base = TINY_COMPARE if command == "compare" else QUICK_BENCH
    saved = str(tmp_path / "r.json")
    assert cli.main(base + ["--save", saved]) == 1
    out, err = capsys.readouterr()
    assert out == f"the {command} table\n"
    assert err == (f"lora-kernels {command}: could not write --save {saved} ([Errno 28] No space left on device); the "
                   f"results are printed above\n")

class _Captured(Exception):
    """Raised by a stand-in run: the test has the config the command built, and nothing was measured."""


def _config_of(command, monkeypatch, module, run_name):
    configs = []

    def capture(config, *args, **kwargs):
        configs.append(config)
        raise _Captured

    monkeypatch.setattr(module, run_name, capture)
    with pytest.raises(_Captured):
        cli.main(command)
    return configs[0]


def test_compare_passes_every_option_to_the_run(monkeypatch):
    from lora_kernels import compare
    options = ["compare", "--model-size", "tiny", "--hidden", "48", "--layers", "3", "--heads", "2",
               "--intermediate", "40", "--vocab", "100", "--rank", "3", "--alpha", "5", "--dropout", "0.1", "--rslora",
               "--targets", "q_proj, v_proj", "--steps", "5", "--warmup", "1", "--batch-size", "3", "--seq-len", "7",
               "--dtype", "bf16", "--device", "cpu", "--backend", "torch", "--lr", "0.01", "--lora-lr", "0.02",
               "--infer-reps", "4", "--seed", "9", "--threads", "1", "--compile", "--no-progress"]
    expected = compare.CompareConfig(
        model_size="tiny", hidden=48, layers=3, heads=2, intermediate=40, vocab=100, rank=3, alpha=5.0, dropout=0.1,
        use_rslora=True, targets=("q_proj", "v_proj"), steps=5, warmup=1, batch_size=3, seq_len=7, dtype="bfloat16",
        device="cpu", backend="torch", lr=0.01, lora_lr=0.02, infer_reps=4, seed=9, threads=1, compile=True,
        progress=False)
    assert _config_of(options, monkeypatch, compare, "run_compare") == expected.resolved()
    # without options: the library's defaults (CompareConfig's), with the progress bar on
    default = compare.CompareConfig(device="cpu", progress=True).resolved()
    assert _config_of(["compare", "--device", "cpu"], monkeypatch, compare, "run_compare") == default


def test_bench_passes_every_option_to_the_run(monkeypatch):
    from lora_kernels import bench
    options = ["bench", "--quick", "--device", "cpu", "--dtype", "fp16", "--backends", "torch", "--hidden", "40",
               "--rank", "3", "--ranks", "2,5", "--ms", "1,3", "--train-m", "6", "--reps", "2", "--warmup", "0",
               "--prefill-tokens", "17", "--copy-mb", "3", "--threads", "1", "--sections", "sweep,host",
               "--sweep-tokens", "8,16", "--sweep-adapters", "1,2", "--seed", "7", "--no-progress"]
    expected = bench.BenchConfig(  # --seed: the JSON recorded a seed that no option could set (helper 258)
        device="cpu", dtype="float16", quick=True, backends=("torch",), hidden=40, rank=3, ranks=(2, 5), ms=(1, 3),
        train_m=6, reps=2, warmup=0, prefill_tokens=17, copy_mb=3, threads=1, sections=("host", "sweep"),
        sweep_tokens=(8, 16), sweep_adapters=(1, 2), seed=7, progress=False)
    assert _config_of(options, monkeypatch, bench, "run_bench") == expected.resolved()
    default = bench.BenchConfig(device="cpu", progress=True).resolved()
    assert _config_of(["bench", "--device", "cpu"], monkeypatch, bench, "run_bench") == default


@pytest.mark.parametrize("options, status, where", [
    (["--batch-size", "2000000000"], 1, "--vocab 128, --batch-size 2000000000"),  # fails in the run
    (["--hidden", "2000000000", "--heads", "1"], 2, "--hidden 2000000000"),  # fails resolving, on meta
])
def test_sizes_this_machine_cannot_allocate_are_one_line_naming_them(capsys, options, status, where):
    """They ended in torch's traceback ("DefaultCPUAllocator: can't allocate memory", "Storage size calculation
    overflowed"), found by a review."""
    assert cli.main(TINY_COMPARE + options) == status
    err = capsys.readouterr().err
    assert err.startswith("lora-kernels compare: cannot allocate the tensors for ") and where in err
    assert err.rstrip().endswith("; choose smaller sizes") and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("option", ["--vocab", "--layers"])
def test_a_model_whose_full_fine_tuning_cannot_fit_is_refused_before_it_is_built(capsys, option):
    """Its weights, gradients and AdamW moments alone past the machine's memory: an allocation failure after the
    build, or (--layers 10**12) minutes in the option checks, which built the model on the meta device per target
    (a review). Refused now while resolving, from one- and two-layer models."""
    assert cli.main(TINY_COMPARE + [option, "2000000000"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"lora-kernels compare: the model of --hidden 64, .*{option} 2000000000.* has [\d,]+ "
                        r"parameters: full fine-tuning's weights, gradients and AdamW moments alone take \S+ GB in "
                        r"float32, more than the \S+ GB of this cpu device; choose smaller sizes\n", err), err


@pytest.mark.parametrize("command, message", [
    (QUICK_BENCH + ["--ms", "1,0"], "argument --ms: expected an integer >= 1, got 0"),
    (QUICK_BENCH + ["--ranks", "8,x"], "argument --ranks: expected an integer, got 'x'"),
    (QUICK_BENCH + ["--backends", " , "], "argument --backends: expected a comma-separated list of names, got ' , '"),
    # had said "a comma-separated list of names"
    (QUICK_BENCH + ["--ms", ""], "argument --ms: expected a comma-separated list of integers, got ''"),
    (QUICK_BENCH + ["--sweep-tokens", ","], "argument --sweep-tokens: expected a comma-separated list of integers, "
                                            "got ','"),
    (QUICK_BENCH + ["--ranks", "0"], "argument --ranks: expected an integer >= 1, got 0"),
    (QUICK_BENCH + ["--sweep-adapters", "-1"], "argument --sweep-adapters: expected an integer >= 1, got -1"),
    (QUICK_BENCH + ["--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
    (QUICK_BENCH + ["--hidden", "0"], "argument --hidden: expected an integer >= 1, got 0"),
    (QUICK_BENCH + ["--rank", "0"], "argument --rank: expected an integer >= 1, got 0"),
    (QUICK_BENCH + ["--train-m", "-1"], "argument --train-m: expected an integer >= 1, got -1"),
    (QUICK_BENCH + ["--warmup", "-1"], "argument --warmup: expected an integer >= 0, got -1"),
    (QUICK_BENCH + ["--warmup", "1.5"], "argument --warmup: expected an integer, got '1.5'"),
    (QUICK_BENCH + ["--prefill-tokens", "0"], "argument --prefill-tokens: expected an integer >= 1, got 0"),
    (QUICK_BENCH + ["--copy-mb", "0"], "argument --copy-mb: expected an integer >= 1, got 0"),
    # past 2**63 torch raised a TypeError from C++ (a traceback); --hidden 10**18 searched heads for a minute first
    (QUICK_BENCH + ["--hidden", "99999999999999999999"], "argument --hidden: expected an integer <= 2147483647, got "
                                                         "99999999999999999999"),
    (QUICK_BENCH + ["--ms", "1,99999999999999999999"], "argument --ms: expected an integer <= 2147483647"),
    (TINY_COMPARE + ["--vocab", "9223372036854775808"], "argument --vocab: expected an integer <= 2147483647"),
    (TINY_COMPARE + ["--hidden", "1000000000000000000"], "argument --hidden: expected an integer <= 2147483647"),
    # torch.set_num_threads took 2**31 - 1 (OpenMP then asked for 463 GB); 3e9 was torch's "Overflow" ValueError
    (TINY_COMPARE + ["--threads", "3000000000"], "argument --threads: expected an integer <= 1024, got 3000000000"),
    (QUICK_BENCH + ["--threads", "1025"], "argument --threads: expected an integer <= 1024, got 1025"),
    (QUICK_BENCH + ["--reps", "x"], "argument --reps: expected an integer, got 'x'"),
    (QUICK_BENCH + ["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (QUICK_BENCH + ["--sections", ""], "argument --sections: expected a comma-separated list of names, got ''"),
    (TINY_COMPARE + ["--targets", ","], "argument --targets: expected a comma-separated list of names, got ','"),
    (TINY_COMPARE + ["--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
    # no abbreviations: "--model" (no such option) had been read as --model-size ("invalid choice: 'x.bin'")
    (["compare", "--model", "x.bin"], "unrecognized arguments: --model x.bin"),
    (["info", "--js"], "unrecognized arguments: --js"),
])
def test_malformed_option_values_are_refused_by_the_parser(capsys, command, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(command)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--device", "gpu"], "bench: --device expected cpu or cuda, got 'gpu'"),
    (["--device", "cpu:1"], "bench: --device expected cpu or cpu:0 (torch has one CPU device), got 'cpu:1'"),
    (["--sections", "fast"], "bench: --sections expected names from host, forward, train, grouped, decode, sweep (or "
                             "all alone), got fast (unknown: fast)"),
    (["--sections", "all,host"], "got all,host (all goes alone)"),
    (["--sections", "sweep", "--sweep-tokens", "2", "--sweep-adapters", "4"],
     "bench: --sweep-adapters 4 expected a count <= one of --sweep-tokens 2"),
    # had been refused as "unknown backend 'auto'; expected one of reference, torch, triton, cuda, cpu or 'auto'"
    (["--backends", "auto"], "bench: --backends expected names from reference, torch, triton, cuda, cpu, got auto"),
    (["--backends", "torch,nope"], "bench: --backends expected names from reference, torch, triton, cuda, cpu, got "
                                   "nope"),
])
def test_bench_bad_values_are_one_line_errors_before_the_run(capsys, monkeypatch, options, message):
    from lora_kernels import bench
    monkeypatch.setattr(bench, "run_bench", lambda *args, **kwargs: pytest.fail("the run started"))
    assert cli.main(QUICK_BENCH + options) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-kernels bench: ") and message in err and len(err.splitlines()) == 1, err


def test_bench_save_holds_the_rows_so_far_then_the_whole_result(monkeypatch, tmp_path):
    """--save is rewritten after every measurement (a run stopped by a timeout keeps its rows) and once more at the
    end with the finished result."""
    from lora_kernels import bench
    saved = tmp_path / "b.json"

    def stopping(config, on_update=None, **kwargs):
        on_update({"rows": [1], "partial": True})
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_bench", stopping)
    assert cli.main(QUICK_BENCH + ["--save", str(saved)]) == 130  # Ctrl-C: one line, status 130
    assert json.loads(saved.read_text()) == {"rows": [1], "partial": True}

    def finishing(config, on_update=None, **kwargs):
        on_update({"rows": [1], "partial": True})
        return {"rows": [1, 2], "partial": False}

    monkeypatch.setattr(bench, "run_bench", finishing)
    assert cli.main(QUICK_BENCH + ["--save", str(saved), "--json"]) == 0
    assert json.loads(saved.read_text()) == {"rows": [1, 2], "partial": False}


def test_save_through_a_link_writes_the_file_it_points_at(tmp_path):
    # _write_json renamed its temporary file over PATH: a link (latest.json -> runs/42.json) became a regular file and
    # the file it pointed at kept its old content
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "42.json").write_text("old")
    link = tmp_path / "latest.json"
    link.symlink_to("runs/42.json")
    cli._write_json({"a": 1}, str(link))
    assert link.is_symlink()
    assert json.loads((tmp_path / "runs" / "42.json").read_text()) == {"a": 1}
    assert sorted(os.listdir(tmp_path / "runs")) == ["42.json"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_save_to_a_fifo_or_device_writes_into_it_and_leaves_it_one(tmp_path):
    # --save /dev/stdout, --save >(jq .), --save /dev/null: the rename had replaced the FIFO or device (as root:
    # /dev/null itself) with a regular file, and a reader of the FIFO got nothing
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()), daemon=True)
    reader.start()
    cli._write_json({"a": 1}, str(fifo))
    reader.join(timeout=10)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert got and json.loads(got[0]) == {"a": 1}
    assert not (tmp_path / "pipe.tmp").exists()


@pytest.mark.skipif(not os.path.exists("/dev/stdout"), reason="no /dev/stdout here")
def test_save_to_dev_stdout_redirected_to_a_file_keeps_what_was_printed(tmp_path):
    """`lora-kernels compare --save /dev/stdout >> log.txt`: /dev/stdout led to the regular file, which was renamed
    over, so the log kept the JSON alone: the printed table and the log's earlier lines were gone (bench's rename
    left a partial result; helper 294). It is written through stdout, after what was printed."""
    log = tmp_path / "log.txt"
    log.write_text("EARLIER\n")
    script = "from lora_kernels import cli; print('TABLE'); cli._write_json({'a': 1}, '/dev/stdout')"
    with open(log, "a") as out:
        subprocess.run([sys.executable, "-c", script], stdout=out, check=True, timeout=300)
    assert log.read_text() == 'EARLIER\nTABLE\n{\n  "a": 1\n}\n'
    assert os.listdir(tmp_path) == ["log.txt"]


def test_a_writable_stream_in_a_folder_that_cannot_be_written_is_accepted(tmp_path, monkeypatch):
    # --save /dev/stdout as a normal user: /dev is not writable, /dev/stdout is; it had been refused with
    # "cannot write in the folder /dev"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def unwritable(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", unwritable)
    assert cli._output_paths_ok("compare", argparse.Namespace(save=str(fifo), plot=None))


def _no_run(*args, **kwargs):
    pytest.fail("the run started")


def test_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch):
    """Ctrl-C during a run ended it in a traceback of 24-36 lines (status 130 already)."""
    from lora_kernels import compare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "run_compare", interrupted)
    try:
        status = cli.main(TINY_COMPARE)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main(): the user sees a traceback")
    assert status == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_reader_that_closes_stdout_gets_no_traceback():
    """`lora-kernels info | head -0`: a BrokenPipeError traceback and status 1 before."""
    proc = subprocess.Popen([sys.executable, "-m", "lora_kernels", "info"], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `| head -0`: the reader is gone before the first write
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 141


@pytest.fixture
def matplotlib_here():
    return pytest.importorskip("matplotlib")


def test_plot_with_an_unknown_format_is_refused_before_the_run(capsys, monkeypatch, tmp_path, matplotlib_here):
    """matplotlib picks the format by the extension: --plot out.txt ended the run in a traceback after it."""
    from lora_kernels import compare
    monkeypatch.setattr(compare, "run_compare", _no_run)
    assert cli.main(TINY_COMPARE + ["--plot", str(tmp_path / "c.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-kernels compare: --plot ") and ".png" in err and len(err.splitlines()) == 1, err


def test_a_pgf_plot_without_its_tex_system_is_refused_before_the_run(capsys, monkeypatch, tmp_path, matplotlib_here):
    """matplotlib writes .pgf by running TeX (xelatex by default): without it the figure failed after the run, in a
    RuntimeError traceback, while the refusal of an unknown format offered .pgf."""
    from lora_kernels import compare
    monkeypatch.setattr(compare, "run_compare", _no_run)
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)
    assert cli.main(TINY_COMPARE + ["--plot", str(tmp_path / "c.pgf")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"lora-kernels compare: --plot \S+c\.pgf: matplotlib writes \.pgf with \w+, which is not "
                        r"installed; choose another format \(\.pdf, \.svg, \.png\)\n", err), err


class _FailingStdout(io.StringIO):
    """A stdout that cannot take the results: a full disk behind a redirect, or a reader that closed the pipe."""

    def __init__(self, error):
        super().__init__()
        self.error = error

    def write(self, text):
        raise self.error


@pytest.mark.parametrize("command", ["compare", "bench"])
@pytest.mark.parametrize("error, status", [(OSError(28, "No space left on device"), 1),
                                           (BrokenPipeError(32, "Broken pipe"), 141)])
def test_results_that_cannot_be_printed_are_still_saved(capsys, monkeypatch, tmp_path, command, error, status):
    """`compare --save r.json > /dev/full` (or `| head -1`) printed the table before writing --save, and the error
    of the print ended the run (a traceback, or quietly for a closed pipe): the measurements of minutes were lost.
    --save is written either way; a full stdout is one line on stderr and status 1, a closed pipe status 141."""
    from lora_kernels import bench, compare
    result = {"stand-in": True}
    monkeypatch.setattr(compare, "run_compare", lambda config: result)
    monkeypatch.setattr(bench, "run_bench", lambda config, on_update=None: result)
    monkeypatch.setattr(compare, "format_compare", lambda r: "the compare table")
    monkeypatch.setattr(bench, "format_bench", lambda r: "the bench table")
    saved = tmp_path / "r.json"
    monkeypatch.setattr(sys, "stdout", _FailingStdout(error))
    assert cli.main((TINY_COMPARE if command == "compare" else QUICK_BENCH) + ["--save", str(saved)]) == status
    assert json.loads(saved.read_text()) == result
    err = capsys.readouterr().err
    assert err == ("" if status == 141 else
                   f"lora-kernels {command}: could not print the results ([Errno 28] No space left on device)\n")


def test_bench_progress_writes_that_fail_do_not_end_the_run(capsys, monkeypatch, tmp_path):
    """bench --save writes the partial results after each measurement: a failure there (the folder removed during
    the run, a full disk) ended the run in a traceback with nothing printed. One line on stderr, the run goes on, the
    table is printed and the final write is tried again."""
    from lora_kernels import bench
    result = {"stand-in": True}

    def run_bench(config, on_update=None):
        for _ in range(3):
            on_update({"partial": True})
        return result

    writes = []

    def write_json(data, path):
        writes.append(data)
        if len(writes) == 1:
            raise OSError(2, "No such file or directory")

    monkeypatch.setattr(bench, "run_bench", run_bench)
    monkeypatch.setattr(bench, "format_bench", lambda r: "the bench table")
    monkeypatch.setattr(cli, "_write_json", write_json)
    saved = str(tmp_path / "b.json")
    assert cli.main(QUICK_BENCH + ["--save", saved]) == 0
    out, err = capsys.readouterr()
    assert out == "the bench table\n" and writes == [{"partial": True}, result]  # one failed progress write, no more
    assert err == (f"lora-kernels bench: could not write --save {saved} during the run ([Errno 2] No such file or "
                   f"directory); the run goes on\n")


def test_save_and_plot_on_one_file_are_refused_before_the_run(capsys, monkeypatch, tmp_path, matplotlib_here):
    """The figure had overwritten the JSON without a word."""
    from lora_kernels import compare
    monkeypatch.setattr(compare, "run_compare", _no_run)
    same = str(tmp_path / "r.png")
    assert cli.main(TINY_COMPARE + ["--save", same, "--plot", same]) == 2
    assert "--save and --plot name the same file" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists("/dev/stdout"), reason="no /dev/stdout here")
@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_plot_to_where_a_standard_stream_writes_is_refused_before_the_run(tmp_path, stream, matplotlib_here):
    """`lora-kernels compare --plot /dev/stdout > fig.png` exited 0 with a PNG no viewer opened: savefig truncated
    the printed table, and the "figure:" line printed after it landed inside the PNG."""
    script = ("import sys; from lora_kernels import cli, compare\n"
              "def refused(*args, **kwargs): raise SystemExit('the run started')\n"
              "compare.run_compare = refused\n"
              f"sys.exit(cli.main({TINY_COMPARE + ['--plot', '/dev/' + stream]!r}))")
    target = tmp_path / "fig.png"
    with open(target, "w") as out:
        other = subprocess.PIPE
        done = subprocess.run([sys.executable, "-c", script], timeout=300, text=True,
                              stdout=out if stream == "stdout" else other, stderr=out if stream == "stderr" else other)
    message = done.stderr if stream == "stdout" else target.read_text()
    assert done.returncode == 2, message
    name = "standard output" if stream == "stdout" else "standard error"
    assert f"--plot /dev/{stream}: is where {name} writes" in message


@pytest.mark.skipif(not os.path.exists("/dev/stdout"), reason="no /dev/stdout here")
@pytest.mark.parametrize("plot", [os.devnull, "/dev/stdout"])
def test_plot_to_the_null_device_that_stdout_writes_to_is_accepted(plot, matplotlib_here):
    """`--plot /dev/null > /dev/null` (a quiet run): nothing written there can be mixed; review 304 found the
    refusal above firing on it (and on `pytest -s > /dev/null` through the tests passing --plot os.devnull)."""
    script = ("import sys; from lora_kernels import cli, compare\n"
              "def started(*args, **kwargs): raise SystemExit(7)\n"
              "compare.run_compare = started\n"
              f"sys.exit(cli.main({TINY_COMPARE + ['--plot', plot]!r}))")
    done = subprocess.run([sys.executable, "-c", script], timeout=300, text=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    assert done.returncode == 7, done.stderr  # the run started: not refused


def test_plot_without_an_extension_writes_the_named_file(capsys, tmp_path, matplotlib_here):
    """savefig wrote PATH.png for a PATH without an extension, while the CLI printed "figure: PATH"."""
    figure = tmp_path / "fig"
    assert cli.main(TINY_COMPARE + ["--targets", "q_proj", "--plot", str(figure)]) == 0
    assert capsys.readouterr().out.endswith(f"\nfigure: {figure}\n")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "fig.png").exists()


def test_compile_with_one_step_names_steps_not_an_untyped_warmup(capsys, monkeypatch):
    """--steps 1 cuts the default warm-up to 0, which --compile then refused as if --warmup 0 had been given (and
    --warmup 1 does not fit one step either)."""
    from lora_kernels import compare
    monkeypatch.setattr(compare, "run_compare", _no_run)
    options = ["compare", "--model-size", "tiny", "--device", "cpu", "--steps", "1", "--threads", "1", "--no-progress"]
    assert cli.main(options + ["--compile"]) == 2
    err = capsys.readouterr().err
    assert "--steps" in err and "--warmup 0" not in err, err


def test_bench_help_gives_the_quick_defaults(capsys):
    """--quick (README's everyday CPU bench) has smaller presets than the help said."""
    from lora_kernels.bench import PRESETS
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    quick = PRESETS["cpu_quick"]
    for option, name in (("--hidden", "hidden"), ("--train-m", "train_m"), ("--warmup", "warmup"),
                         ("--reps", "reps")):
        described = text.split(f"{option} {name.upper()} ", 1)[1]
        assert f"{quick[name]} CPU)" in described[:described.index(")") + 1], option


def test_a_non_fused_backend_column_is_not_labelled_fused(capsys):
    """--backend torch ran the torch composition in a column labelled "(fused)"."""
    assert cli.main(TINY_COMPARE + ["--targets", "q_proj", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "LoRA, torch (unfused)" in out and "(fused)" not in out, out


def test_gpu_check_selects_every_test_with_a_cuda_branch():
    """gpu_check's tests stage selects by -k "cuda or gpu" (names, parameter ids and markers): a test whose CUDA
    assertions sit behind torch.cuda.is_available() / device_count() in its body, with neither word in its name, its
    decorators or a device fixture, ran on the GPU machine nowhere (its CUDA branch was reached by no run at all).
    Such tests carry @pytest.mark.cuda_branch."""
    missed = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        text = path.read_text()
        for node in ast.parse(text).body:
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
                continue
            decorators = [ast.get_source_segment(text, d) for d in node.decorator_list]
            fixtures = {arg.arg for arg in node.args.args}
            markers = [m for d in decorators for m in re.findall(r"pytest\.mark\.(\w+)", d)]
            parametrize = [d for d in decorators if d.startswith("pytest.mark.parametrize")]
            # -k sees the module's and the test's names, its markers' names (not their arguments: a skipif reason
            # saying "cuda" selects nothing) and its parameter ids (a parametrize naming "cuda" stands for them);
            # gpu_check's -k then drops "gpu_check" and "emulation"
            keywords = " ".join([path.stem, node.name, *markers, *parametrize])
            excluded = re.search(r"gpu_check|emulation", " ".join([path.stem, node.name, *markers]), re.IGNORECASE)
            selected = ((re.search(r"cuda|gpu", keywords, re.IGNORECASE) or fixtures & {"device", "cuda_device"})
                        and not excluded)
            calls = {ast.unparse(c.func) for c in ast.walk(node) if isinstance(c, ast.Call)}  # calls, not strings
            if calls & {"torch.cuda.is_available", "torch.cuda.device_count"} and not selected:
                missed.append(f"{path.name}::{node.name}")
    assert not missed, f"CUDA branches gpu_check's -k expression does not select: {missed}"


def test_compare_warmup_0_reaches_the_run(monkeypatch):
    """--warmup 0 (every step timed) is a valid choice the run takes; --steps' parser type (>= 1) would refuse it."""
    from lora_kernels import compare
    assert _config_of(TINY_COMPARE + ["--warmup", "0"], monkeypatch, compare, "run_compare").warmup == 0


def test_a_stream_that_cannot_be_written_is_refused_before_the_run(capsys, monkeypatch, tmp_path):
    """--save to a FIFO or device this process may not write (a read-only one) is refused up front, as an unwritable
    folder is, not after the run's minutes."""
    fifo = str(tmp_path / "pipe")
    os.mkfifo(fifo)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if path == fifo else access(path, mode, **kw))
    assert not cli._output_paths_ok("compare", argparse.Namespace(save=fifo, plot=None))
    assert f"--save {fifo}: cannot be written" in capsys.readouterr().err


def test_plot_with_an_upper_case_extension_is_accepted(monkeypatch, tmp_path, matplotlib_here):
    """matplotlib reads fig.PNG's extension whatever its case: the up-front format check must not refuse it."""
    from lora_kernels import compare
    plot = str(tmp_path / "fig.PNG")
    assert _config_of(TINY_COMPARE + ["--plot", plot], monkeypatch, compare, "run_compare")


def test_save_and_plot_naming_one_file_two_ways_are_refused(capsys, monkeypatch, tmp_path, matplotlib_here):
    """r.png and ./r.png (or a link to it) are one file: the figure would overwrite the JSON all the same."""
    from lora_kernels import compare
    monkeypatch.setattr(compare, "run_compare", _no_run)
    monkeypatch.chdir(tmp_path)
    assert cli.main(TINY_COMPARE + ["--save", "r.png", "--plot", "./r.png"]) == 2
    assert "--save and --plot name the same file" in capsys.readouterr().err


def test_save_and_plot_to_one_stream_are_accepted(monkeypatch, matplotlib_here):
    """/dev/null for both (or a FIFO) is written in place, nothing overwritten: not refused as one file."""
    from lora_kernels import compare
    assert _config_of(TINY_COMPARE + ["--save", os.devnull, "--plot", os.devnull], monkeypatch, compare,
                      "run_compare")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("kind", ["fifo", "stdout's file"])
def test_bench_save_to_a_stream_gets_the_whole_result_once(monkeypatch, tmp_path, kind):
    """A regular --save file is rewritten after each measurement; a stream (a FIFO, /dev/stdout) cannot be rewritten:
    its reader would get a JSON document per measurement, one after another. It gets the finished result alone, as
    does the file stdout is redirected to (each partial result had been renamed over it)."""
    from lora_kernels import bench
    fifo = str(tmp_path / "pipe")
    if kind == "fifo":
        os.mkfifo(fifo)
    else:
        open(fifo, "w").close()
        monkeypatch.setattr(cli, "_standard_stream", lambda path: sys.stdout if path == fifo else None)
    written = []
    monkeypatch.setattr(cli, "_write_json", lambda result, path: written.append((result, path)))

    def run(config, on_update=None, **kwargs):
        if on_update is not None:
            on_update({"rows": [1], "partial": True})
        return {"rows": [1, 2], "partial": False}

    monkeypatch.setattr(bench, "run_bench", run)
    assert cli.main(QUICK_BENCH + ["--save", fifo, "--json"]) == 0
    assert written == [({"rows": [1, 2], "partial": False}, fifo)]


def test_a_json_write_interrupted_by_ctrl_c_leaves_no_temporary_file(monkeypatch, tmp_path):
    """Ctrl-C (KeyboardInterrupt, not an Exception) during the write: PATH.tmp is removed as after any failure."""
    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli._write_json({"a": 1}, str(tmp_path / "out.json"))
    assert os.listdir(tmp_path) == []


def test_a_closed_stdout_still_buffering_the_output_ends_with_status_141(monkeypatch):
    """Output still in stdout's buffer when the command ends meets the closed pipe at main's flush, where it is
    handled (status 141): left to the interpreter's flush at exit, it printed "Exception ignored ... BrokenPipeError"
    and exited with 120."""
    import io

    class Pipe(io.RawIOBase):
        reader_gone = True

        def writable(self):
            return True

        def write(self, data):
            if self.reader_gone:
                raise BrokenPipeError(32, "Broken pipe")
            return len(data)

    pipe = Pipe()
    stdout = io.TextIOWrapper(io.BufferedWriter(pipe, buffer_size=1 << 20))
    monkeypatch.setattr(sys, "stdout", stdout)
    assert cli.main(["info"]) == 141
    pipe.reader_gone = False  # what is left in the buffer goes nowhere when the test's stand-in is closed
    stdout.close()


def test_discarding_stdout_leaves_no_descriptor_open(tmp_path, monkeypatch):
    """After a failed print the CLI points stdout at /dev/null; it left the descriptor it copied from open (one per
    failed print). The file the test's stdout wrote to sees nothing after the switch."""
    target = tmp_path / "stdout.txt"
    with open(target, "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        open_before = len(os.listdir("/proc/self/fd"))
        cli._discard_stdout()
        assert len(os.listdir("/proc/self/fd")) == open_before
        stdout.write("after the switch")
        stdout.flush()
    assert target.read_text() == ""
