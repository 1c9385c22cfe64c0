#!/usr/bin/env bash
# The GPU checks in one command (each stage fits the device tool's 10-minute limit):
#   bash bench/gpu_session.sh tests    # install; versions; every `cuda` test
#   bash bench/gpu_session.sh bench    # install; the benchmark suite; BENCHMARKS.md + plot
# Further arguments go to pytest (e.g. `bench -k step` when the whole suite would not fit).
# Results go to $OUT (default bench/results/<date>); commit them with this command line.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
pip install -q -e . --no-deps --no-build-isolation >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python - >"$OUT/versions.txt" <<'PY'
import platform, torch, triton
print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "python", platform.python_version())
PY
cat "$OUT/versions.txt"
case "${1:-tests}" in
  tests)
    timeout 540 python -m pytest -m cuda -q -rf -p no:cacheprovider tests/ "${@:2}" 2>&1 | tee "$OUT/cuda_tests.log" | tail -40 ;;
  bench)
    timeout 540 python -m pytest bench/ --benchmark-only -q -p no:cacheprovider \
      --benchmark-json "$OUT/bench.json" "${@:2}" 2>&1 | tee "$OUT/bench.log" | tail -20
    python bench/report.py "$OUT/bench.json" --out "$OUT/BENCHMARKS.md" && cat "$OUT/BENCHMARKS.md" ;;
  *) echo "usage: $0 tests|bench" >&2; exit 2 ;;
esac
