"""Command line: `lora-kernels info` (versions, device, backends and why some are missing), `lora-kernels compare`
(full fine-tuning vs LoRA, unfused and fused, measured here) and `lora-kernels bench` (kernel ratios against the
GPU targets listed in BENCHMARKS.md)."""

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import stat
import sys
import tempfile

import torch

import lora_kernels
from lora_kernels import _ext, backends
from lora_kernels._files import create_temp_file
from lora_kernels import triton as triton_pkg


def info_dict():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    triton_version, triton_tma = None, False
    if triton_pkg.HAS_TRITON:
        import triton

        from lora_kernels.triton import lora_linear as triton_lora_linear
        triton_version = triton.__version__
        triton_tma = triton_lora_linear.USE_TMA
    return {
        "lora_kernels": lora_kernels.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "extension": {"loaded": _ext.HAS_EXTENSION, "with_cuda": _ext.EXTENSION_WITH_CUDA,
                      "cuda_skipped": _ext.EXTENSION_CUDA_SKIPPED, "error": _ext.EXTENSION_ERROR},
        "triton_interpreter": triton_pkg.INTERPRET,
        "triton_tma": triton_tma,
        "backends": {device: {name: backends.unavailable_reason(name, device) or "available"
                              for name in backends.BACKENDS} for device in devices},
        "auto": {device: {"lora_linear": backends.auto_backend(device, "lora_linear"),
                          "grouped": backends.auto_backend(device, "multi_lora_linear"),
                          "lora_linear_bfloat16": backends.auto_backend(device, "lora_linear", torch.bfloat16)}
                 for device in devices},
    }


def print_info(as_json=False):
    info = info_dict()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    print(f"lora_kernels {info['lora_kernels']}  python {info['python']}  torch {info['torch']} "
          f"(CUDA {info['torch_cuda'] or 'none'})  triton {info['triton'] or 'not installed'}")
    print(f"CUDA device: {info['cuda_device'] or 'none'}")
    print("Triton TMA forward/dX kernels (sm_90+; fwd+bwd 1.11-1.12x the pointer kernels' time on the H200): "
          + ("on" if info["triton_tma"] else "off (LORA_KERNELS_TRITON_TMA=1 turns them on)" if info["triton"]
             else "unavailable (triton is not importable)"))
    ext = info["extension"]
    skipped = f" ({ext['cuda_skipped']} when it was built)" if ext.get("cuda_skipped") else ""
    print("C++ extension: " + ("loaded, built " + ("with" if ext["with_cuda"] else "without") + " CUDA" + skipped
                               if ext["loaded"] else f"not loaded ({ext['error']})"))
    for device, table in info["backends"].items():
        auto = info["auto"][device]
        # a bf16 lora_linear on a CPU with bf16 GEMM units: the torch composition (backends.auto_backend)
        bf16 = auto["lora_linear_bfloat16"]
        by_dtype = f" (bfloat16: {bf16})" if bf16 != auto["lora_linear"] else ""
        print(f"backends for {device} tensors (auto -> lora_linear: {auto['lora_linear']}{by_dtype}, "
              f"grouped ops: {auto['grouped']}):")
        for name, status in table.items():
            if name == "triton" and status == "available" and info["triton_interpreter"]:
                status += " (the Triton interpreter, TRITON_INTERPRET=1: for tests, not a compiled kernel)"
            print(f"  {name:10s} {status}")


# The largest size or count an option takes: larger ones cannot be allocated anyway, and past 2**63 torch raised a
# TypeError from C++ (a traceback, not the one-line allocation refusal), or the head search of --hidden 10**18 ran
# for minutes before it.
MAX_OPTION_INT = 2**31 - 1
# torch.set_num_threads took 2**31 - 1 and OpenMP then asked for 463 GB; 3e9 was torch's "Overflow" ValueError
MAX_THREADS = 1024


def _int_in(low, high=MAX_OPTION_INT):
    """An argparse type: an integer in [low, high], refused naming the bound it passes otherwise."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"expected an integer <= {high}, got {value}")
        return value
    return parse


_positive_int = _int_in(1)
_non_negative_int = _int_in(0)
_thread_count = _int_in(1, MAX_THREADS)


def _comma_list(text, kind):
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind}, got {text!r}")
    return items


def _name_list(text):
    return _comma_list(text, "names")


def _int_list(text):  # --ms '' had been refused as "expected a comma-separated list of names"
    return tuple(_positive_int(part) for part in _comma_list(text, "integers"))


def _add_compare_parser(sub):
    from lora_kernels.compare import DEFAULT_TARGETS, DEVICE_DEFAULTS, DTYPES, MODEL_SIZES
    cpu, gpu = DEVICE_DEFAULTS["cpu"], DEVICE_DEFAULTS["cuda"]
    p = sub.add_parser(
        "compare", allow_abbrev=False,
        help="full fine-tuning vs LoRA (unfused torch layer) vs LoRA (fused kernels), measured here",
        description="Trains a Llama-style decoder (built in code, random init, no downloads) on a synthetic "
                    "next-token task for a few steps with full fine-tuning, LoRA with the unfused torch layer "
                    "(PEFT's composition; with --dropout it redraws the mask in backward where PEFT saves it) and "
                    "LoRA with the fastest available fused backend, from the same init on the same "
                    "data, and prints trainable parameters, gradient / optimizer-state / activation / peak memory, "
                    "step time and tokens/s, checkpoint size on disk, inference latency (merged, unmerged unfused, "
                    "unmerged fused) and the loss.")
    model = p.add_argument_group("model")
    model.add_argument("--model-size", choices=sorted(MODEL_SIZES),
                       help=f"preset (default: {cpu['model_size']} on CPU, {gpu['model_size']} on CUDA); "
                            + "; ".join(f"{name}: hidden {v['hidden']}, {v['layers']} layers"
                                        for name, v in MODEL_SIZES.items()))
    model.add_argument("--hidden", type=_positive_int, help="hidden size (overrides the preset; heads and MLP "
                                                            "width follow unless given)")
    model.add_argument("--layers", type=_positive_int, help="decoder layers (overrides the preset)")
    model.add_argument("--heads", type=_positive_int, help="attention heads (overrides the preset)")
    model.add_argument("--intermediate", type=_positive_int, help="SwiGLU MLP width (overrides the preset)")
    model.add_argument("--vocab", type=_positive_int, help="vocabulary size (overrides the preset)")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--rank", "-r", type=_positive_int, default=16, help="LoRA rank r (default 16)")
    lora.add_argument("--alpha", type=float, default=32.0, help="lora_alpha; scaling = alpha / r (default 32)")
    lora.add_argument("--dropout", type=float, default=0.0, help="lora_dropout (default 0)")
    lora.add_argument("--rslora", action="store_true", help="scaling = alpha / sqrt(r)")
    lora.add_argument("--targets", type=_name_list, default=DEFAULT_TARGETS,
                      help=f"comma-separated module names to adapt (default {','.join(DEFAULT_TARGETS)})")
    lora.add_argument("--backend", default="auto",
                      help=f"backend of the fused LoRA run: {', '.join(backends.BACKENDS)} or auto (default auto: "
                           "what backend='auto' picks, except where that is the unfused torch composition and a fused "
                           "backend is available (GPUs; bf16 on CPUs with bf16 GEMM units): then the fastest fused "
                           "one, on GPUs cuda then triton)")
    run = p.add_argument_group("run")
    run.add_argument("--steps", type=_positive_int,
                     help=f"training steps, warm-up included (default {cpu['steps']} CPU / {gpu['steps']} CUDA)")
    run.add_argument("--warmup", type=int, help=f"untimed first steps (default {cpu['warmup']} / {gpu['warmup']}, "
                                                f"at most steps - 1)")
    run.add_argument("--batch-size", type=_positive_int, help=f"sequences per step (default {cpu['batch_size']} / "
                                                              f"{gpu['batch_size']})")
    run.add_argument("--seq-len", type=_positive_int, help=f"tokens per sequence (default {cpu['seq_len']} / "
                                                           f"{gpu['seq_len']})")
    run.add_argument("--dtype", choices=sorted(DTYPES), help=f"default {cpu['dtype']} on CPU, {gpu['dtype']} on CUDA")
    run.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    run.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of full fine-tuning (default 1e-3)")
    run.add_argument("--lora-lr", type=float, default=3e-3, help="AdamW learning rate of LoRA (default 3e-3)")
    run.add_argument("--infer-reps", type=_positive_int, help=f"forward passes per inference latency (median; "
                                                               f"default {cpu['infer_reps']} / {gpu['infer_reps']})")
    run.add_argument("--seed", type=int, default=0, help="seed of the init, the task and the data (default 0)")
    run.add_argument("--threads", type=_thread_count,
                     help=f"torch CPU threads, at most {MAX_THREADS} (default: torch's)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile every decoder layer of the three models (compiled in the warm-up steps): "
                          "steps without Python's per-op host time, which a small model's eager step on a GPU is "
                          "largely made of")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the measurements as JSON instead of the table")
    out.add_argument("--save", metavar="PATH", help="also write the JSON to PATH")
    out.add_argument("--plot", metavar="PATH", help="write a figure to PATH, in the format its extension names (PNG "
                                                          "without one); needs matplotlib")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _add_bench_parser(sub):
    from lora_kernels.bench import PRESETS, ROUNDS
    from lora_kernels.compare import DTYPES
    p = sub.add_parser(
        "bench", allow_abbrev=False,
        help="microbenchmark ratios against the GPU targets (BENCHMARKS.md) for the available backends",
        description="Times the fused LoRA ops against named baselines in one run (base F.linear, the two base "
                    "GEMMs, PEFT's unfused layer with dropout, full fine-tuning, one adapter, the per-adapter loop, "
                    "a copy) and prints the ratios. GPU: bf16, K=N=4096; CPU: fp32, scaled down.")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (seconds on CPU)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help=f"default {PRESETS['cpu']['dtype']} on CPU, "
                                                           f"{PRESETS['cuda']['dtype']} on CUDA")
    p.add_argument("--backends", type=_name_list, help="comma-separated backends (default: all available but "
                                                       "reference, and no Triton interpreter on CPU)")
    def default(name):
        """The presets' value of `name`, as the run takes it: --quick has its own, smaller ones."""
        def text(value):
            return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        return (f"default {text(PRESETS['cuda'][name])} GPU, {text(PRESETS['cpu'][name])} CPU; with --quick "
                f"{text(PRESETS['cuda_quick'][name])} GPU, {text(PRESETS['cpu_quick'][name])} CPU")

    p.add_argument("--hidden", type=_positive_int, help=f"K = N of the layer ({default('hidden')})")
    p.add_argument("--rank", type=_positive_int, help=f"rank of the main rows ({default('rank')})")
    p.add_argument("--ranks", type=_int_list, help=f"ranks of the rank sweep ({default('ranks')}; --rank is always "
                                                      "swept too)")
    p.add_argument("--ms", type=_int_list, help=f"token counts M of the forward rows ({default('ms')})")
    p.add_argument("--train-m", type=_positive_int, help=f"M of the fwd+bwd rows ({default('train_m')})")
    p.add_argument("--reps", type=_positive_int, help=f"timed calls per candidate, median; at least REPS, in "
                                                      f"{ROUNDS} alternating rounds of equal length "
                                                      f"({default('reps')})")
    p.add_argument("--warmup", type=_non_negative_int, help="untimed calls per candidate before the timed ones "
                                                            f"({default('warmup')})")
    p.add_argument("--prefill-tokens", type=_positive_int,
                   help=f"tokens of the grouped prefill rows ({default('prefill_tokens')})")
    p.add_argument("--copy-mb", type=_positive_int, help="MiB copied to measure the bandwidth baseline "
                                                         f"({default('copy_mb')})")
    p.add_argument("--sections", type=_name_list,
                   help="comma-separated parts of the sweep: host, forward, train, grouped, decode, sweep (the grouped "
                        "grid of token counts x adapters and mixed ranks), or all (default: all but sweep)")
    p.add_argument("--sweep-tokens", type=_int_list,
                   help=f"token counts of the grouped sweep ({default('sweep_tokens')})")
    p.add_argument("--sweep-adapters", type=_int_list, help="distinct adapter counts of the grouped sweep (a point "
                                                            "with more adapters than tokens is skipped; "
                                                            f"{default('sweep_adapters')})")
    p.add_argument("--threads", type=_thread_count, help=f"torch CPU threads, at most {MAX_THREADS} (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random operands (default 0; the JSON records it)")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON instead of the table")
    p.add_argument("--save", metavar="PATH", help="also write the JSON to PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _is_stream(path):
    """PATH names something that exists and is neither a regular file nor a folder (a device such as /dev/null or
    /dev/stdout, a FIFO, a process substitution's /dev/fd/N), following links."""
    return os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path)


def _standard_stream(path):
    """sys.stdout or sys.stderr where PATH is the file or device it writes to (/dev/stdout, /dev/fd/2, the file the
    shell redirected it to), else None. Such a file is written through that stream: opened anew it was truncated,
    and renamed over it lost what the stream had printed (the table) and what the shell's `>>` had kept."""
    try:
        target = os.stat(path)
    except (OSError, ValueError):
        return None
    for stream in (sys.stdout, sys.stderr):
        try:
            own = os.fstat(stream.fileno())
        except (AttributeError, OSError, ValueError):  # a stream without a descriptor (replaced, closed)
            continue
        if (own.st_dev, own.st_ino) == (target.st_dev, target.st_ino):
            return stream
    return None


def _is_null_device(path):
    """PATH is the null device (/dev/null, or /dev/stdout while stdout is sent there): what is written there is
    dropped, so nothing written beside it can be spoiled."""
    try:
        target, null = os.stat(path), os.stat(os.devnull)
    except (OSError, ValueError):
        return False
    return stat.S_ISCHR(target.st_mode) and target.st_rdev == null.st_rdev


def _written_in_place(path):
    """PATH is written where it is, never through a temporary file renamed over it (see _is_stream,
    _standard_stream)."""
    return _is_stream(path) or _standard_stream(path) is not None


def _write_json(result, path):
    """Written to a temporary file and renamed, so a run killed mid-write never leaves a truncated file. The rename
    goes to the file a link points at (the link stays), and a device or FIFO is written in place: renaming over it
    had replaced /dev/null (as root) or a link with a regular file. What stdout or stderr writes to is written
    through that stream (see _standard_stream)."""
    from lora_kernels.compare import to_json
    text = to_json(result) + "\n"
    stream = _standard_stream(path)
    if stream is not None:
        stream.write(text)
        stream.flush()
        return
    if _is_stream(path):
        with open(path, "w") as f:
            f.write(text)
        return
    path = os.path.realpath(path)
    tmp = create_temp_file(os.path.dirname(path), f".{os.path.basename(path)}.")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.isfile(tmp):  # no half-written file left next to the target
            os.remove(tmp)
        raise


def _output_paths_ok(command, args):
    """--save / --plot name a file that can be written: checked before a run of minutes, not after it (a folder, a
    missing folder or one this process cannot write in had ended the run in a traceback, its results lost)."""
    for option in ("save", "plot"):
        path = getattr(args, option, None)
        if path is None:
            continue
        folder = os.path.dirname(os.path.realpath(path)) if path else None
        if not path:
            problem = "expected a file path, got ''"
        elif os.path.isdir(path):
            problem = "is a folder, expected a file path"
        elif _written_in_place(path):  # its folder need not be writable
            problem = None if os.access(path, os.W_OK) else "cannot be written"
        elif not os.path.isdir(folder):
            problem = f"the folder {folder} does not exist"
        else:
            try:
                with tempfile.NamedTemporaryFile(dir=folder, prefix=".lora_kernels_"):
                    problem = None
            except OSError as exc:
                problem = f"cannot write in the folder {folder} ({exc.strerror or exc})"
        if problem:
            print(f"lora-kernels {command}: --{option}{' ' + path + ':' if path else ''} {problem}", file=sys.stderr)
            return False
    return True


def _plot_option_ok(args):
    """compare --plot can be written once the run is over: matplotlib importable, a format it knows, not the
    file --save writes nor where stdout or stderr writes (each refused with one line on stderr, before a run of
    minutes)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("lora-kernels compare: --plot needs matplotlib, which is not installed "
              "(pip install matplotlib, or pip install 'lora_kernels[bench]')", file=sys.stderr)
        return False
    # matplotlib picks the format by the extension: an unknown one had ended the run in a traceback after the
    # measurements (and savefig without one writes PATH.png: plot_compare writes PNG to PATH itself)
    extension = os.path.splitext(args.plot)[1][1:].lower()
    try:
        from matplotlib.backend_bases import FigureCanvasBase
        formats = FigureCanvasBase.get_supported_filetypes()
    except (ImportError, AttributeError):  # no list to check against: savefig says it, after the run
        formats = None
    if extension and formats is not None and extension not in formats:
        print(f"lora-kernels compare: --plot {args.plot}: expected a file name ending in one of "
              f"{', '.join('.' + f for f in sorted(formats))}, got .{extension}", file=sys.stderr)
        return False
    if extension == "pgf":  # matplotlib's PGF writer runs TeX: without it the figure failed after the run
        import matplotlib as mpl
        texsystem = mpl.rcParams["pgf.texsystem"]
        if shutil.which(texsystem) is None:
            print(f"lora-kernels compare: --plot {args.plot}: matplotlib writes .pgf with {texsystem}, which is not "
                  f"installed; choose another format (.pdf, .svg, .png)", file=sys.stderr)
            return False
    stream = _standard_stream(args.plot)
    if stream is not None and not _is_null_device(args.plot):
        # `--plot /dev/stdout > fig.png`: savefig truncated the printed table, and the "figure:" line then written
        # at stdout's offset landed inside the PNG, which no viewer opened
        name = "standard output" if stream is sys.stdout else "standard error"
        print(f"lora-kernels compare: --plot {args.plot}: is where {name} writes, whose text the figure would be "
              f"mixed with; name another file for the figure", file=sys.stderr)
        return False
    if args.save and os.path.realpath(args.save) == os.path.realpath(args.plot) and not _is_stream(args.save):
        print(f"lora-kernels compare: --save and --plot name the same file {args.plot}: the figure would "
              f"overwrite the JSON", file=sys.stderr)
        return False
    return True


def run_compare_command(args):
    from lora_kernels import compare
    if not _output_paths_ok("compare", args):
        return 2
    if args.plot and not _plot_option_ok(args):
        return 2
    config = compare.CompareConfig(
        model_size=args.model_size, hidden=args.hidden, layers=args.layers, heads=args.heads,
        intermediate=args.intermediate, vocab=args.vocab, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
        use_rslora=args.rslora, targets=args.targets, steps=args.steps, warmup=args.warmup,
        batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype, device=args.device, backend=args.backend,
        lr=args.lr, lora_lr=args.lora_lr, infer_reps=args.infer_reps, seed=args.seed, threads=args.threads,
        compile=args.compile, progress=not args.no_progress)
    try:  # resolving builds the model on the meta device, where sizes past torch's addressing already fail
        config = _run_sized("compare", config.resolved, _sizes(args, COMPARE_SIZES))
    except ValueError as exc:  # bad option values: the message names the option
        print(f"lora-kernels {exc}", file=sys.stderr)  # the message starts with "compare: <option>"
        return 2
    if config is None:
        return 2
    result = _run_sized("compare", lambda: compare.run_compare(config), _sizes(config, COMPARE_SIZES))
    if result is None:
        return 1
    stdout_error = _print_results(compare.to_json(result) if args.json else compare.format_compare(result))
    failed = _write_outputs("compare", [("--save", args.save, lambda: _write_json(result, args.save)),
                                        ("--plot", args.plot, lambda: compare.plot_compare(result, args.plot))],
                            stdout_error)
    if stdout_error is None and args.plot and "--plot" not in failed and not args.json:
        print(f"figure: {args.plot}")
    return _finish("compare", failed, stdout_error)


def _print_results(text):
    """Prints the results; returns the OSError of a stdout that could not take them (a full disk behind a
    redirect, a reader that closed the pipe), or None. The outputs are written either way: that error had ended the
    run in a traceback (or quietly, for a closed pipe) before --save and --plot were written. What stdout still
    holds goes to /dev/null, so that no later flush raises again."""
    try:
        print(text)
        sys.stdout.flush()
        return None
    except OSError as exc:
        _discard_stdout()
        return exc


def _discard_stdout():
    try:  # the interpreter's own flush at exit would raise again
        stdout_fd = sys.stdout.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError, AttributeError):  # no file descriptor (a test's capture), or none left to open
        return
    try:
        os.dup2(devnull, stdout_fd)
    except OSError:
        pass
    finally:
        os.close(devnull)  # dup2 made a copy; this one would leak a descriptor per call


def _finish(command, failed, stdout_error):
    """The status of a run whose results were printed (or not: stdout_error) and whose outputs were written (or
    not: failed). A closed pipe ends it as main ends any command's (status 141)."""
    if isinstance(stdout_error, BrokenPipeError):
        raise stdout_error
    if stdout_error is not None:
        print(f"lora-kernels {command}: could not print the results ({stdout_error})", file=sys.stderr)
    return 1 if failed or stdout_error is not None else 0


def _write_outputs(command, outputs, stdout_error=None):
    """Calls write() for each (option, path, write) whose path is set, after the results were printed: a failure
    there (a full disk, a path that changed since _output_paths_ok, a figure format matplotlib could not write) had
    ended a run of minutes in a traceback before anything was printed. Each failure is one line on stderr; returns
    the options that failed."""
    failed = []
    for option, path, write in outputs:
        if not path:
            continue
        try:
            write()
        except (OSError, RuntimeError) as exc:
            printed = "; the results are printed above" if stdout_error is None else ""
            print(f"lora-kernels {command}: could not write {option} {path} ({exc}){printed}", file=sys.stderr)
            failed.append(option)
    return failed


def _progress_writer(command, path):
    """bench --save's write after each measurement: a failure there (the folder removed, a full disk) is one line on
    stderr and ends the progress writes, not the run (it had ended it in a traceback with nothing printed); the
    whole result is written once more at the end."""
    failed = []

    def write(partial):
        if failed:
            return
        try:
            _write_json(partial, path)
        except OSError as exc:
            failed.append(exc)
            print(f"lora-kernels {command}: could not write --save {path} during the run ({exc}); the run goes on",
                  file=sys.stderr)
    return write


def run_bench_command(args):
    from lora_kernels import bench, compare
    if not _output_paths_ok("bench", args):
        return 2
    config = bench.BenchConfig(
        device=args.device, dtype=args.dtype, quick=args.quick, backends=args.backends, hidden=args.hidden,
        rank=args.rank, ranks=args.ranks, ms=args.ms, train_m=args.train_m, reps=args.reps, warmup=args.warmup,
        prefill_tokens=args.prefill_tokens, copy_mb=args.copy_mb, threads=args.threads, sections=args.sections,
        sweep_tokens=args.sweep_tokens, sweep_adapters=args.sweep_adapters, seed=args.seed,
        progress=not args.no_progress)
    try:
        config = config.resolved()
    except ValueError as exc:
        print(f"lora-kernels {exc}", file=sys.stderr)
        return 2
    # a stream (/dev/stdout, a FIFO) gets the whole result once, not a document per measurement
    on_update = (_progress_writer("bench", args.save)
                 if args.save and not _written_in_place(args.save) else None)
    result = _run_sized("bench", lambda: bench.run_bench(config, on_update=on_update), _sizes(config, BENCH_SIZES))
    if result is None:
        return 1
    stdout_error = _print_results(compare.to_json(result) if args.json else bench.format_bench(result))
    failed = _write_outputs("bench", [("--save", args.save, lambda: _write_json(result, args.save))], stdout_error)
    return _finish("bench", failed, stdout_error)


# What torch says when a size cannot be allocated (CPU), or not even computed: OutOfMemoryError is CUDA's
_ALLOCATION_FAILURES = ("can't allocate memory", "Storage size calculation overflowed")


COMPARE_SIZES = ("hidden", "layers", "intermediate", "vocab", "batch_size", "seq_len", "rank")
BENCH_SIZES = ("hidden", "rank", "train_m", "prefill_tokens", "copy_mb")


def _sizes(source, names):
    """"--hidden 64, --layers 2, ...": the size options set in `source` (parsed args or a resolved config)."""
    return ", ".join(f"--{name.replace('_', '-')} {getattr(source, name)}" for name in names
                     if getattr(source, name) is not None)


def _run_sized(command, run, sizes):
    """run(); an allocation failure (sizes this machine cannot hold) is one line naming the sizes in effect, and
    None, where it was a traceback from deep inside torch."""
    try:
        return run()
    except (MemoryError, RuntimeError) as exc:
        if not (isinstance(exc, (MemoryError, torch.OutOfMemoryError))
                or any(words in str(exc) for words in _ALLOCATION_FAILURES)):
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"lora-kernels {command}: cannot allocate the tensors for {sizes} ({reason}); choose smaller sizes",
              file=sys.stderr)
        return None


def main(argv=None):
    """The console script's and `python -m lora_kernels`' entry: Ctrl-C ends a run with one line and status 130, and
    a reader that closes stdout early (`| head -1`) ends it quietly, as for any Unix filter."""
    try:
        status = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not as "Exception ignored" at interpreter exit
        return status
    except KeyboardInterrupt:
        print("\nlora-kernels: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _discard_stdout()
        return 141  # 128 + SIGPIPE, what the shell reports for a filter stopped by its reader


def _main(argv=None):
    # no abbreviated options: "--model foo" read as --model-size and failed as "invalid choice", and an option added
    # later would change what an abbreviation in a script means
    parser = argparse.ArgumentParser(prog="lora-kernels", description="Fused LoRA kernels: info, benchmarks, compare.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", allow_abbrev=False, help="versions, device and available backends")
    info.add_argument("--json", action="store_true", help="print JSON")
    _add_compare_parser(sub)
    _add_bench_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "compare":
        return run_compare_command(args)
    if args.command == "bench":
        return run_bench_command(args)
    with contextlib.redirect_stdout(io.StringIO()) as text:
        print_info(args.json)
    return _finish("info", [], _print_results(text.getvalue().rstrip("\n")))


if __name__ == "__main__":
    sys.exit(main())
