#!/usr/bin/env bash
# Inlaid's GPU suite in one command (docs/benchmarks.md).
#
#   OUT=/some/dir bench/gpu.sh     on a CUDA machine: build, serve a trace against transformers +
#                                  PEFT, check kernels at full size, time GEMM / SGMV / a
#                                  Llama-2-7B-shaped decode step, GEMM variants and the scheduler's
#                                  step costs; ends within GPU_CALL_S (default 590) seconds of its
#                                  start, the report written, what did not fit named for a 2nd call
#   bench/gpu.sh --dry-run         anywhere: the same script on the CPU (TRITON_INTERPRET=1,
#                                  tiny shapes) -- checks the script, measures nothing
#   bench/gpu.sh --fetch-wheels    on a machine with PyPI: wheels of what the GPU image lacks
#                                  (pyzmq, msgspec; CPython 3.12, manylinux x86_64) into .whl/,
#                                  and the default model's tokenizer into .gpu_carry/tokenizer
#                                  (the serving stage's random-weight model speaks it)
#   bench/gpu.sh --untrack-adapters   before a device call: the tracked adapters (120 MB) leave
#                                  the git index (files stay, ignored through .git/info/exclude),
#                                  so the tree fits a call's 64 MiB; prints what will travel
#   bench/gpu.sh --retrack-adapters   after it: the index and .git/info/exclude as they were
#
# Writes $OUT/gpu_suite.json, gpu_suite.md, gpu_suite.png (default OUT: bench/results/gpu-<time>),
# $OUT/serving_steps.jsonl.gz and $OUT/build.log. Python: $PYTHON, else .venv/bin/python, else
# python3 (the GPU image's).
set -euo pipefail
CALL_STARTED=$(date +%s)
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

MODE=run
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry ;;
  --fetch-wheels) MODE=fetch ;;
  --untrack-adapters) MODE=untrack ;;
  --retrack-adapters) MODE=retrack ;;
  *) echo "usage: bench/gpu.sh [--dry-run | --fetch-wheels | --untrack-adapters | --retrack-adapters]" >&2; exit 2 ;;
esac

ADAPTER_WEIGHTS='adapters/*/adapter_model.safetensors'
EXCLUDE_MARK="# bench/gpu.sh --untrack-adapters (--retrack-adapters removes these two lines)"
if [ "$MODE" = untrack ] || [ "$MODE" = retrack ]; then
  exclude="$(git rev-parse --git-path info/exclude)"
  mkdir -p "$(dirname "$exclude")" && touch "$exclude"
  if [ "$MODE" = untrack ]; then
    git rm -q --cached --ignore-unmatch -- "$ADAPTER_WEIGHTS"
    grep -qxF "$EXCLUDE_MARK" "$exclude" || printf '%s\n%s\n' "$EXCLUDE_MARK" "$ADAPTER_WEIGHTS" >> "$exclude"
    # What a device call copies: tracked files and untracked ones git does not ignore, plus the carry.
    tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | sort -zu \
      | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
    carry=$( (du -sb .whl .gpu_carry 2>/dev/null || true) | awk '{s += $1} END {print s + 0}')
    echo "adapters untracked (commit nothing until --retrack-adapters); a device call carries" \
      "$(( (tree + carry) / 1048576 )) MiB: the tree $(( tree / 1048576 )) MiB + .whl/.gpu_carry" \
      "$(( carry / 1048576 )) MiB (the limit: 64 MiB)"
  else
    grep -vxF -e "$EXCLUDE_MARK" -e "$ADAPTER_WEIGHTS" "$exclude" > "$exclude.new" || true
    mv "$exclude.new" "$exclude"
    git reset -q -- adapters/
    echo "adapters tracked again: $(git ls-files -- "$ADAPTER_WEIGHTS" | wc -l) weight files in the index"
  fi
  exit 0
fi
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
  rm -rf "$ROOT/build"  # setuptools' in-tree build folder: a stale one can package modules since deleted
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
# Progress bars would fill the 12,000 characters of output a device call brings back.
export TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1

args=(--out "$OUT")
# GPU_SUITE_STAGES=decode,step_costs runs those stages alone (a second call of a lease).
if [ -n "${GPU_SUITE_STAGES:-}" ]; then args+=(--stages "$GPU_SUITE_STAGES"); fi
# The suite's budget: what the device call (GPU_CALL_S from this script's start) has left after
# the build, less 30 s to stop servers and write the report. Past it (+20 s) SIGINT ends the
# stage running, which keeps what it saved; 15 s later, SIGKILL.
left=$(( ${GPU_CALL_S:-590} - ($(date +%s) - CALL_STARTED) ))
budget="${GPU_SUITE_BUDGET_S:-$(( left - 30 ))}"
args+=(--budget-s "$budget")
if [ "$MODE" = dry ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  args+=(--dry-run)
fi
status=0
timeout -s INT -k 15 "$(( ${budget%.*} + 20 ))" "$PY" bench/gpu_suite.py "${args[@]}" || status=$?
exit $status
