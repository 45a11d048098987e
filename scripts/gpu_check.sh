#!/usr/bin/env bash
# The whole GPU verification in one command, for a CUDA machine without network whose Python already has torch
# (>= 2.11), triton (>= 3.6), pytest, pytest-benchmark, peft, transformers and ninja (hypothesis is optional: the
# property tests, CPU-only anyway, are skipped without it):
#
#   bash scripts/gpu_check.sh OUTDIR            # build with CUDA, GPU tests, bench, compare, profile,
#                                               # crossovers, sweep, compare --compile
#   bash scripts/gpu_check.sh OUTDIR --dry-run  # any machine: checks the steps (bench --quick and compare tiny on
#                                               # CPU), prints the build and test commands instead of running them
#
# Every stage runs under `timeout` inside one time budget (GPU_CHECK_BUDGET seconds, default 520: every stage ends
# by then, and the summary and archive take ~5 s more, within a 540 s call); each stage's output goes to
# OUTDIR/<stage>.log; the bench parts, both compares, the grouped sweep and the crossovers also write OUTDIR/train.json,
# bench.json, grouped.json, compare.json, sweep.json, crossovers.json and compare_compiled.json. The key numbers and
# a table of the stages come last (also in OUTDIR/summary.txt). Exit status: 0 when every stage ran and passed (a
# stage skipped because the budget is spent counts as not ok).
# Environment: PYTHON (default: python, else python3), MAX_JOBS (default 16), GPU_CHECK_BUDGET, GPU_CHECK_STAGES
# (the stages to run after env, build, info and extension, by their names in the stage table, space- or
# comma-separated; default all: a lease too short for the whole check can split it over two calls; a second call on
# the still-warm machine reuses the first one's build).
# GPU_CHECK_ARCHIVE=FILE.tgz packs OUTDIR into that archive after every stage, so a call cut short at its time
# limit still leaves what had run. Through this workplace's device tool, which returns few files from $OUT (and,
# from a call cut short, only what is already there):
#   GPU_CHECK_ARCHIVE="$OUT/gc.tgz" bash scripts/gpu_check.sh /tmp/gc
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: bash scripts/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 2; }
OUTDIR="" DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    -*) usage ;;
    *) [ -z "$OUTDIR" ] || usage; OUTDIR=$arg ;;
  esac
done
[ -n "$OUTDIR" ] || usage
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
ARCHIVE=${GPU_CHECK_ARCHIVE:-}
if [ -n "$ARCHIVE" ]; then
  mkdir -p "$(dirname "$ARCHIVE")" && ARCHIVE="$(cd "$(dirname "$ARCHIVE")" && pwd)/$(basename "$ARCHIVE")" || exit 2
  [[ "$ARCHIVE" != "$OUTDIR"/* ]] || { echo "gpu_check: GPU_CHECK_ARCHIVE must lie outside OUTDIR" >&2; exit 2; }
fi

PY=${PYTHON:-$(command -v python || command -v python3)}
[ -n "$PY" ] || { echo "gpu_check: no python found (set PYTHON)" >&2; exit 2; }
BUDGET=${GPU_CHECK_BUDGET:-520}
OPTIONAL_STAGES="tests train grouped bench compare tests-memory profile crossovers sweep compare_compiled"
SELECTED=${GPU_CHECK_STAGES:-$OPTIONAL_STAGES}
SELECTED=" ${SELECTED//,/ } "
for stage in $SELECTED; do
  [[ " $OPTIONAL_STAGES " == *" $stage "* ]] || {
    echo "gpu_check: unknown stage '$stage' in GPU_CHECK_STAGES (known: $OPTIONAL_STAGES)" >&2; exit 2; }
done
# not_selected NAME: true (and recorded) when GPU_CHECK_STAGES leaves out that optional stage
not_selected() {
  [[ " $OPTIONAL_STAGES " == *" $1 "* && "$SELECTED" != *" $1 "* ]] || return 1
  echo "== $1: not selected (GPU_CHECK_STAGES)"
  record "$1" "not selected" 0 "-"
  return 0  # not record's status (the archive's): the stage stays not run whatever pack met
}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout itself, also after build_ext --inplace
export PYTHONUNBUFFERED=1
START=$(date +%s)

STAGES=() STATUSES=() SECONDS_TAKEN=() LOGS=()
record() { STAGES+=("$1"); STATUSES+=("$2"); SECONDS_TAKEN+=("$3"); LOGS+=("$4"); pack; }
# pack: OUTDIR into GPU_CHECK_ARCHIVE (when set), replaced whole (a reader never sees half an archive)
pack() {
  [ -n "$ARCHIVE" ] || return 0
  tar czf "$ARCHIVE.tmp" -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")" 2> /dev/null &&
    mv -f "$ARCHIVE.tmp" "$ARCHIVE" && return 0
  echo "gpu_check: could not write the archive $ARCHIVE (the logs stay in $OUTDIR)" >&2
  return 0
}
remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }

# What else the machine is doing, at the head of each stage's log: the H200 run's compare had one column's steps
# rise from 38 to 62 ms while another's held (load average 2-4.6 on an otherwise idle machine), and nothing in the
# logs said what ran beside it.
machine_state() {
  echo "# load average: $(cut -d' ' -f1-3 /proc/loadavg 2> /dev/null || echo unknown); busiest processes:"
  ps -eo pid,pcpu,etimes,args --sort=-pcpu 2> /dev/null | head -6 | cut -c1-160 | sed 's/^/#   /'
}

# run_stage NAME LIMIT_S LOGFILE CMD...: runs CMD under timeout (the smaller of LIMIT_S and the budget left).
run_stage() {
  local name=$1 limit=$2 log=$3
  shift 3
  not_selected "$name" && return 0
  # its results file (OUTDIR/<stage>.json, where it writes one) from an earlier call on a warm machine would pass for
  # this run's in the summary if the stage is skipped or fails before saving (one not selected keeps its own: a
  # lease split over two calls sums up both)
  rm -f "$OUTDIR/$name.json"
  local left
  left=$(remaining)
  if (( left < 20 )); then
    echo "== $name: skipped, the time budget (${BUDGET}s) is spent"
    record "$name" "skipped (budget)" 0 "-"
    return 1
  fi
  (( limit > left - 10 )) && limit=$(( left - 10 ))
  echo "== $name (limit ${limit}s): $*"
  { echo "\$ $*"; machine_state; } > "$OUTDIR/$log"
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$OUTDIR/$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT (${limit}s)" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  local took=$(( $(date +%s) - t0 ))
  record "$name" "$status" "$took" "$log"
  echo "   $status in ${took}s, log: $OUTDIR/$log"
  if (( rc != 0 )); then tail -n 15 "$OUTDIR/$log" | sed 's/^/   | /'; fi
  return $rc
}

# dry_stage NAME CMD...: what a real run would do, without running it.
dry_stage() {
  local name=$1
  shift
  not_selected "$name" && return 0
  echo "== $name (dry run, not run): $*"
  record "$name" "dry run: not run" 0 "-"
}

have_matplotlib() { "$PY" -c "import matplotlib" > /dev/null 2>&1; }

echo "gpu_check: $(date -Is), $( (( DRY_RUN )) && echo "dry run" || echo "GPU run"), python $PY, budget ${BUDGET}s, logs in $OUTDIR"

# 1. environment
run_stage env 60 env.log bash -c "
  date -Is; uname -a; command -v nvidia-smi > /dev/null && nvidia-smi; command -v nvcc > /dev/null && nvcc --version
  '$PY' -c 'import sys, torch; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"device\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
  '$PY' -c 'import triton; print(\"triton\", triton.__version__)' || true
  '$PY' -m pip list 2>/dev/null | grep -iE '^(torch|triton|pytest|pytest-benchmark|pytest-xdist|peft|transformers|ninja|numpy|safetensors|matplotlib|setuptools) ' || true
  git rev-parse HEAD 2>/dev/null && git status --porcelain 2>/dev/null | head -20
  # which code ran, also where the copy has no .git: compare with the same line run on a checkout
  echo \"source hash: \$(find lora_kernels csrc benchmarks scripts setup.py -type f \\( -name '*.py' -o -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.sh' \\) | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)\""

if (( ! DRY_RUN )) && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA device; run with --dry-run to check the steps on a CPU machine" >&2
  exit 2
fi

# 2. build the extension in place (CPU + CUDA sources), in parallel
BUILD=(env "MAX_JOBS=$MAX_JOBS" LORA_KERNELS_BUILD_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e .)
FALLBACK=(env "MAX_JOBS=$MAX_JOBS" LORA_KERNELS_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace)
if (( DRY_RUN )); then
  command -v nvcc > /dev/null || echo "   (no nvcc on this machine: a real run needs the CUDA toolkit for this stage)"
  dry_stage build "${BUILD[@]}" "(if that fails: ${FALLBACK[*]})"
else
  # A second call on a still-warm machine keeps the built extension (ignored files stay), but pip rebuilds it whole
  # (~50 s on the H200, in a fresh temporary build folder): the build is skipped when its inputs (the C++/CUDA
  # sources, setup.py, python and torch) hash as when the extension in place was built with CUDA.
  BUILD_STAMP=build/gpu_check_extension.stamp
  build_inputs=$( { find csrc setup.py -type f | LC_ALL=C sort | xargs sha256sum
                    "$PY" -c 'import sys, torch; print(sys.version, torch.__version__)'; } | sha256sum | cut -c1-16)
  if [ -f "$BUILD_STAMP" ] && [ "$(cat "$BUILD_STAMP")" = "$build_inputs" ] &&
      "$PY" -c "import sys, lora_kernels._ext as e
sys.exit(0 if e.EXTENSION_WITH_CUDA and e.EXTENSION_ERROR is None else 1)" 2> /dev/null; then
    echo "== build: skipped, the extension in place was built with CUDA from these inputs ($build_inputs)"
    record build "ok (reused)" 0 "-"
  else
    run_stage build 240 build.log "${BUILD[@]}"
    build_rc=$?
    # pip itself may be what failed (e.g. an old setuptools without editable installs): build in place instead. Not
    # after a time-out or a compiler error: that compile again took 200 s of the budget from every later stage.
    if (( build_rc != 0 && build_rc != 124 && build_rc != 137 )) && (( $(remaining) > 200 )) &&
        ! grep -qE "ninja: build stopped|nvcc fatal|error: command .*(nvcc|c\+\+|g\+\+|gcc).* failed" \
          "$OUTDIR/build.log"; then
      run_stage build_ext 200 build_ext.log "${FALLBACK[@]}"
      build_rc=$?
    fi
    if (( build_rc == 0 )); then
      mkdir -p build && echo "$build_inputs" > "$BUILD_STAMP"
    fi
  fi
fi

# 3. what the package sees; on a GPU run, whether the extension with its CUDA kernels loads: without it every cuda
# test skips (the tests stage then passes) and the timings hold no cuda kernel, so say so as a failed stage
run_stage info 60 info.log "$PY" -m lora_kernels info
if (( ! DRY_RUN )); then
  run_stage extension 60 extension.log "$PY" -c "import sys, lora_kernels._ext as e
print('extension with CUDA:', e.EXTENSION_WITH_CUDA, '| error:', e.EXTENSION_ERROR)
sys.exit(0 if e.EXTENSION_WITH_CUDA and e.EXTENSION_ERROR is None else 1)"
fi

# 4. tests: every CUDA case, before the timings (correctness first): the gpu-marked tests and the
# normal suite's cuda-device cases ("-k" matches marker names too). With pytest-xdist a test that crashes its
# process (a segfault in a kernel) fails alone instead of ending the run (seen on the first H100 run: one segfault
# hid every later result). LORA_KERNELS_AUTOTUNE=0: the first config each Triton kernel's prune keeps, untimed, so
# many test shapes do not spend minutes autotuning (the H200 run: 1259 tests in 122 s with 14 workers). "not
# gpu_check": test_cli's tests of this script match "gpu" by name but run on the CPU (the dry run took 19 s of CPU
# on 2 cores); "not emulation": test_cuda_emulation.py matches "cuda" but runs the CUDA sources on the CPU (80 s of
# CPU on 2 cores).
PYTEST_OPTIONS=()
"$PY" -c "import xdist" > /dev/null 2>&1 && PYTEST_OPTIONS=(-n 14)
# a test that hangs (a kernel that never ends) fails alone after 120 s instead of holding the stage to its limit.
# The thread method: pytest-timeout's default (signal) raises only when the test's thread is back in Python, never
# while it waits in the CUDA driver for a kernel that does not end; the thread method dumps the stacks and ends the
# worker, which xdist replaces, naming the test.
"$PY" -c "import pytest_timeout" > /dev/null 2>&1 && PYTEST_OPTIONS+=(--timeout 120 --timeout-method thread)
# -v: each result is logged as it happens, so a stage killed by its time limit still names what passed and failed
# (-q prints names and counts only at the end).
TESTS=(env LORA_KERNELS_AUTOTUNE=0 "$PY" -m pytest -v --tb=short -p no:cacheprovider
       -k "(cuda or gpu) and not gpu_check and not emulation" -rfE)
# The tests marked gpu_memory (tens of GB each, past-2^31-element operands) run later in a stage of their own, one
# at a time: several at once on one GPU would run out of memory (20 tests since session 61; the 18 before took 20 s
# on the H200). They come after compare: edge cases of sizes few users reach, where the §8 rows decide more. 270 s
# for the rest: 152 s on the H200 (2026-11-30) for 1707 tests; 2222 in session 60 (collected with
# torch.cuda.is_available() stood in, which gives 1707 at that run's commit): ~200 s at the H200's rate, ~253 s at
# the H100's (606 tests in 69 s, 12 workers).
MEMORY_TESTS=("${TESTS[@]}" -m gpu_memory)
if (( DRY_RUN )); then
  dry_stage tests "${TESTS[@]}" "${PYTEST_OPTIONS[@]}" -m "not gpu_memory"
else
  run_stage tests 270 tests.log "${TESTS[@]}" "${PYTEST_OPTIONS[@]}" -m "not gpu_memory"
fi

# 5. benchmarks and the main comparison (GPU sizes; CPU sizes in a dry run)
PLOT=()
have_matplotlib && PLOT=(--plot "$OUTDIR/compare.png")
if (( DRY_RUN )); then
  # one thread: a dry run checks the plumbing, and one thread is the fastest way through on a busy shared CPU
  run_stage train 120 train.log "$PY" -m lora_kernels bench --quick --device cpu --threads 1 --no-progress \
    --sections train --save "$OUTDIR/train.json"
  run_stage grouped 120 grouped.log "$PY" -m lora_kernels bench --quick --device cpu --threads 1 --no-progress \
    --sections host,grouped,decode --save "$OUTDIR/grouped.json"
  run_stage bench 120 bench.log "$PY" -m lora_kernels bench --quick --device cpu --threads 1 --no-progress \
    --sections forward --save "$OUTDIR/bench.json"
  run_stage compare 120 compare.log "$PY" -m lora_kernels compare --model-size tiny --device cpu --steps 6 --warmup 2 \
    --seq-len 32 --infer-reps 3 --threads 1 --no-progress --save "$OUTDIR/compare.json" "${PLOT[@]}"
  dry_stage tests-memory "${MEMORY_TESTS[@]}"
  run_stage profile 120 profile.log "$PY" benchmarks/profile_kernels.py --device cpu --quick
  run_stage crossovers 120 crossovers.log "$PY" benchmarks/cuda_crossovers.py --device cpu --quick \
    --save "$OUTDIR/crossovers.json"
  run_stage sweep 120 sweep.log "$PY" -m lora_kernels bench --quick --device cpu --threads 1 --sections sweep \
    --no-progress --save "$OUTDIR/sweep.json"
  run_stage compare_compiled 120 compare-compiled.log "$PY" -m lora_kernels compare --compile --model-size tiny \
    --device cpu --steps 4 --warmup 1 --seq-len 32 --infer-reps 3 --threads 1 --no-progress \
    --save "$OUTDIR/compare_compiled.json"
else
  # the bench in three parts with their own limits, the most §8 rows first, so a slow part (autotuning on a cold
  # Triton cache) cannot cost the others: train (4 rows: fwd+bwd vs the GEMMs, vs PEFT, vs full FT, memory), then
  # grouped (4 rows; fixed tiles, no autotuning; the host rows time launches, not tiles), then forward (2 rows; it
  # also autotunes per power-of-two M bucket and times the opt-in TMA kernels and the split against the default ones).
  run_stage train 100 train.log "$PY" -m lora_kernels bench --sections train --no-progress \
    --save "$OUTDIR/train.json"
  run_stage grouped 70 grouped.log env LORA_KERNELS_AUTOTUNE=0 "$PY" -m lora_kernels bench \
    --sections host,grouped,decode --no-progress --save "$OUTDIR/grouped.json"
  run_stage bench 110 bench.log "$PY" -m lora_kernels bench --sections forward --no-progress \
    --save "$OUTDIR/bench.json"
  if ! run_stage compare 90 compare.log "$PY" -m lora_kernels compare --no-progress --save "$OUTDIR/compare.json" \
      "${PLOT[@]}"; then
    # a fused backend that fails must not cost the full-FT vs LoRA numbers: again with the torch backend only
    (( $(remaining) > 100 )) && run_stage compare_torch 80 compare_torch.log "$PY" -m lora_kernels compare \
      --backend torch --no-progress --save "$OUTDIR/compare.json"
  fi
  run_stage tests-memory 90 tests-memory.log "${MEMORY_TESTS[@]}"
  # where the cuda backend's own kernels beat cuBLAS (decode forward over M = 1..16, dY-once backward over M x r):
  # the data for its dispatch bounds (kDecodeMaxM, CUDA_BWD_DY_KERNEL_MAX_WORK); CUDA-graph replays, not yet timed on
  # a GPU, so before the profile
  run_stage crossovers 90 crossovers.log "$PY" benchmarks/cuda_crossovers.py --save "$OUTDIR/crossovers.json"
  # per-kernel GPU time of the key calls (which kernel takes the time; with compare's layer, host time against
  # kernel time; 12 s on the H200 before that layer's tables, whose Triton autotuning is new; since session 27 also
  # compare's three inference shapes, without Triton), then, last, the lowest priority: the grouped grid (token
  # counts x adapters, mixed ranks), CUDA-graph timed
  run_stage profile 80 profile.log "$PY" benchmarks/profile_kernels.py
  run_stage sweep 90 sweep.log "$PY" -m lora_kernels bench --sections sweep --no-progress --save "$OUTDIR/sweep.json"
  # last, with what the budget leaves: the same comparison with every decoder layer compiled (no Python host time
  # per op, which an eager step of this model is largely made of); its compile time here is unmeasured
  run_stage compare_compiled 150 compare-compiled.log "$PY" -m lora_kernels compare --compile --no-progress \
    --save "$OUTDIR/compare_compiled.json"
fi

# 6. the short table, last
{
  echo
  "$PY" benchmarks/table.py --summary "$OUTDIR" || echo "(no summary: benchmarks/table.py failed)"
  echo
  printf '%-16s %-22s %6s  %s\n' stage status seconds log
  failed=0
  for i in "${!STAGES[@]}"; do
    printf '%-16s %-22s %6s  %s\n' "${STAGES[$i]}" "${STATUSES[$i]}" "${SECONDS_TAKEN[$i]}" "${LOGS[$i]}"
    case "${STATUSES[$i]}" in ok|ok\ *|dry\ run*|not\ selected) ;; *) failed=$((failed + 1)) ;; esac
  done
  echo "gpu_check: $failed stage(s) not ok; total $(( $(date +%s) - START ))s; logs in $OUTDIR"
  echo "$failed" > "$OUTDIR/.failed"
} | tee "$OUTDIR/summary.txt"
failed=$(cat "$OUTDIR/.failed")
rm -f "$OUTDIR/.failed"
pack
(( failed == 0 ))
