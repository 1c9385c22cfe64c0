#!/usr/bin/env bash
# The project's GPU run: one command, at most $BUDGET seconds (540), most valuable stage first.
#   bash bench/gpu_session.sh          # on a machine with a CUDA GPU, from anywhere in the repo
#   bash bench/gpu_session.sh --dry    # the same stages on tiny shapes on the CPU (Triton's
#                                      # interpreter, compiles with the "eager" backend): CI runs it
# Stages (each capped with `timeout -s INT`, skipped once the budget is spent; results are written
# as they arrive and 99_summary.md is rebuilt after every stage, so a cut run keeps what it did):
#   A  install, versions, GPU                                    00_session.txt (+ the stage log)
#   B  the public API against float64 at the bench shapes        10_correct.jsonl, 11_correct.log
#   C  device and wall time: the update, the loss, attention     20_bench.jsonl, 21_bench.log
#   D  the whole step: built-in and timm ViT, MGiT vs peers      20_bench.jsonl, 21_bench.log
#   H  host time per call with real launches (host_overhead.py --gpu)   20_bench.jsonl, 21_bench.log
#   E  pytest -m cuda                                            30_cuda_tests.log
#   F  compute-sanitizer memcheck over one small launch of every kernel path   40_sanitizer.txt
# Knobs (environment): OUT (default bench/results/gpu-<date>; files there are replaced), BUDGET
# (540), STAGES (default "B C D H E F": e.g. STAGES="E F" for a second run), PY (python3),
# MGIT_BENCH_COMPILE_MODES (default "default"), BENCH_K (a pytest -k filter for stage C).
set -uo pipefail
case "${1:-}" in
  "") DRY=0 ;;
  --dry) DRY=1 ;;
  *) echo "usage: bash bench/gpu_session.sh [--dry]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PY=${PY:-python3}
BUDGET=${BUDGET:-540}
STAGES=${STAGES:-B C D H E F}
OUT=${OUT:-bench/results/gpu-$(date +%Y%m%d)}
START=$SECONDS
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/{00_session.txt,10_correct.jsonl,11_correct.log,20_bench.jsonl,21_bench.log,30_cuda_tests.log,40_sanitizer.txt,99_summary.md}
LOG="$OUT/00_session.txt"
unset ${!PYTEST_XDIST@}  # started from a pytest-xdist worker (the tests): the benchmarks are not in one
export PYTHONUNBUFFERED=1 MGIT_BENCH_COMPILE_MODES=${MGIT_BENCH_COMPILE_MODES:-default}
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 MGIT_BENCH_DRY=1
  # timm imports torchvision; where none imports (a CPU-only machine), the tests' stand-in
  $PY -c "import torchvision" >/dev/null 2>&1 || export PYTHONPATH="$PWD/tests/stand_ins${PYTHONPATH:+:$PYTHONPATH}"
fi

summary() { $PY bench/report.py --session "$OUT" >>"$LOG" 2>&1 || echo "(the summary failed, see above)" >>"$LOG"; }

# stage NAME WANT_S OUTPUT_FILE CMD...: CMD with its output appended to OUTPUT_FILE, capped at
# WANT_S seconds or what is left of the budget (10 s are kept for the summary)
stage() {
  local name=$1 want=$2 out=$3; shift 3
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((BUDGET - (SECONDS - START) - 10))
  local cap=$((want < left ? want : left))
  if [ "$cap" -lt 15 ]; then
    echo "stage $name: skipped, ${left} s of the budget left" >>"$LOG"
    return 0
  fi
  local t0=$SECONDS rc
  timeout -s INT -k 15 "$cap" "$@" >>"$out" 2>&1
  rc=$?
  local how="rc $rc"
  [ "$rc" = 124 ] && how="cut at its cap"
  [ "$rc" = 137 ] && how="killed after its cap"
  echo "stage $name: $how, $((SECONDS - t0)) s (cap $cap s)" >>"$LOG"
  summary
}

# --- A: install (editable; else a copy of the package on PYTHONPATH), versions, GPU ---------------
if ! $PY -c "import mgit_fast, os, sys; sys.exit(not os.path.realpath(mgit_fast.__file__).startswith(os.path.realpath('.')))" 2>/dev/null; then
  if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1; then
    copy=$(mktemp -d)
    cp -r mgit_fast "$copy/" && cp -r kernels "$copy/mgit_fast/kernels"
    export PYTHONPATH="$copy${PYTHONPATH:+:$PYTHONPATH}"
    echo "install: pip failed; using a copy of the package on PYTHONPATH" >>"$LOG"
  fi
fi
{
  echo "mode: $([ "$DRY" = 1 ] && echo 'dry run (CPU, tiny shapes, interpreter)' || echo GPU); budget ${BUDGET} s; stages $STAGES"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (with local changes)')"
  $PY - <<'PY'
import platform, torch
import triton
import mgit_fast
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| triton", triton.__version__, "| mgit_fast", mgit_fast.__file__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "| capability", f"{p.major}.{p.minor}", "| SMs", p.multi_processor_count,
          "| memory", f"{p.total_memory / 2**30:.0f} GiB", "| cudnn", torch.backends.cudnn.version())
for name in ("timm", "transformers", "lightning", "liger_kernel", "pynvml", "xdist", "pytest_timeout"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "present"))
    except Exception as error:
        print(name, "missing:", type(error).__name__)
PY
} >>"$LOG" 2>&1
summary

# --- B-F ---------------------------------------------------------------------------------------------
stage B 100 "$OUT/11_correct.log" $PY bench/correctness.py "$OUT/10_correct.jsonl"

export MGIT_BENCH_JSONL="$OUT/20_bench.jsonl"
bench=(-m pytest --benchmark-only -q -rfE -p no:cacheprovider -p no:xdist)  # (benchmarks run serially)
stage C 220 "$OUT/21_bench.log" $PY "${bench[@]}" ${BENCH_K:+-k "$BENCH_K"} \
  bench/test_update.py bench/test_loss.py bench/test_attention.py
stage D 150 "$OUT/21_bench.log" $PY "${bench[@]}" bench/test_step.py
unset MGIT_BENCH_JSONL
host=(--gpu --repeats 30 --inner 20)
[ "$DRY" = 1 ] && host=(--stub binder --repeats 3 --inner 2)
stage H 40 "$OUT/21_bench.log" $PY bench/host_overhead.py "${host[@]}" --json "$OUT/20_bench.jsonl"

cuda=(-m pytest -m cuda -q -rfE -p no:cacheprovider tests/)
$PY -c "import xdist" >/dev/null 2>&1 && [ "$DRY" = 0 ] && cuda+=(-n 16)
$PY -c "import pytest_timeout" >/dev/null 2>&1 && cuda+=(--timeout 150)
stage E 150 "$OUT/30_cuda_tests.log" $PY "${cuda[@]}"

sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
small=(bench/correctness.py "$(mktemp -d)/small.jsonl" --small)
if [ "$DRY" = 1 ] || [ -z "$sanitizer" ]; then
  case " $STAGES " in *" F "*)
    echo "sanitizer: $([ "$DRY" = 1 ] && echo 'dry run' || echo 'compute-sanitizer not found'): the small cases run without it" >>"$OUT/40_sanitizer.txt" ;;
  esac
  stage F 90 "$OUT/40_sanitizer.txt" $PY "${small[@]}"
else
  stage F 90 "$OUT/40_sanitizer.txt" "$sanitizer" --tool memcheck --print-limit 50 $PY "${small[@]}"
fi

echo "done in $((SECONDS - START)) s" >>"$LOG"
summary
cat "$OUT/99_summary.md"
