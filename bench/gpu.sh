#!/usr/bin/env bash
# Inlaid's GPU suite in one command (docs/benchmarks.md).
#
#   OUT=/some/dir bench/gpu.sh     on a CUDA machine: build, check kernels at full size, time
#                                  GEMM / SGMV / a Llama-2-7B-shaped decode step, measure the
#                                  scheduler's step costs and GEMM variants; < 10 minutes
#   bench/gpu.sh --dry-run         anywhere: the same script on the CPU (TRITON_INTERPRET=1,
#                                  tiny shapes) -- checks the script, measures nothing
#   bench/gpu.sh --fetch-wheels    on a machine with PyPI: wheels of what the GPU image lacks
#                                  (pyzmq, msgspec; CPython 3.12, manylinux x86_64) into .whl/,
#                                  and the default model's tokenizer into .gpu_carry/tokenizer
#                                  (the serving stage's random-weight model speaks it)
#
# Writes $OUT/gpu_suite.json, gpu_suite.md, gpu_suite.png (default OUT: bench/results/gpu-<time>)
# and $OUT/build.log. Python: $PYTHON, else .venv/bin/python, else python3 (the GPU image's).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

MODE=run
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry ;;
  --fetch-wheels) MODE=fetch ;;
  *) echo "usage: bench/gpu.sh [--dry-run | --fetch-wheels]" >&2; exit 2 ;;
esac
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

if [ "$MODE" = fetch ]; then
  # Same versions as requirements.txt pins for this machine.
  specs=$(grep -E '^(pyzmq|msgspec)==' requirements.txt)
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $specs
  ls -l .whl
  PYTHONPATH=bench "$PY" -c "from gpu_serving import CARRIED_TOKENIZER, copy_tokenizer
from inlaid.models.prepare import default_model_dir
copy_tokenizer(default_model_dir(), CARRIED_TOKENIZER)"
  ls -l .gpu_carry/tokenizer
  exit 0
fi

if [ "$MODE" = run ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  # Before anything is written: a suite that measured nothing exited 0 and left an empty OUT.
  echo "bench/gpu.sh: no CUDA device here (torch.cuda.is_available() is false); --dry-run checks the script on the CPU" >&2
  exit 1
fi
OUT="${OUT:-$ROOT/bench/results/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
BUILD="$(mktemp -d "${TMPDIR:-/tmp}/inlaid-gpu-build.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT

# Build: the package (pyproject's layout, inlaid.kernels included) and the wheels brought
# along, into a private folder put first on the path. No network, no resident package touched.
started=$(date +%s)
{
  if ! "$PY" -m pip install --no-deps --no-build-isolation --no-index --target "$BUILD/site" "$ROOT"; then
    # No usable setuptools here: lay the package out by hand, as pyproject's package-dir does.
    echo "pip could not build the package; copying it into place instead"
    rm -rf "$BUILD/site" && mkdir -p "$BUILD/site"
    cp -r inlaid "$BUILD/site/inlaid" && cp -r kernels "$BUILD/site/inlaid/kernels" \
      && cp -r predictor "$BUILD/site/inlaid/predictor"
  fi
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install --no-deps --no-index --target "$BUILD/site" .whl/*.whl \
      || echo "the wheels in .whl/ do not install on this Python: stages needing what they hold may be skipped"
  else
    echo "no .whl/ wheels: stages needing pyzmq/msgspec that the image lacks are skipped"
  fi
} > "$OUT/build.log" 2>&1 || { cat "$OUT/build.log" >&2; echo "gpu.sh: the build failed" >&2; exit 1; }
echo "build: $(( $(date +%s) - started )) s (log: $OUT/build.log)"
export PYTHONPATH="$BUILD/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

args=(--out "$OUT")
# GPU_SUITE_STAGES=decode,step_costs runs those stages alone (a second call of a lease).
if [ -n "${GPU_SUITE_STAGES:-}" ]; then args+=(--stages "$GPU_SUITE_STAGES"); fi
if [ -n "${GPU_SUITE_BUDGET_S:-}" ]; then args+=(--budget-s "$GPU_SUITE_BUDGET_S"); fi
if [ "$MODE" = dry ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  args+=(--dry-run)
fi
status=0
"$PY" bench/gpu_suite.py "${args[@]}" || status=$?
exit $status
