#!/usr/bin/env bash
# Inlaid's GPU suite in one command (docs/benchmarks.md).
#
#   OUT=/some/dir bench/gpu.sh     on a CUDA machine: build, serve a trace against transformers +
#                                  PEFT, check kernels at full size, time GEMM / SGMV / a
#                                  Llama-2-7B-shaped decode step, GEMM variants and the scheduler's
#                                  step costs; ends within GPU_CALL_S (default 590) seconds of its
#                                  start, the report written, what did not fit named for a 2nd call
#                                  (set GPU_CALL_S to the device time the lease has left, less 15)
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

if ! [[ "${GPU_CALL_S:-590}" =~ ^[0-9]+$ ]] || [ "${GPU_CALL_S:-590}" -lt 60 ]; then
  # Checked before the build: a bad value used to fail after it, or skip every stage with exit 0.
  echo "bench/gpu.sh: GPU_CALL_S must be a whole number of seconds, at least 60 (got '${GPU_CALL_S:-}')" >&2
  exit 2
fi
ADAPTER_WEIGHTS='adapters/*/adapter_model.safetensors'  # a gitignore pattern: '*' stops at '/'
ADAPTER_PATHSPEC=":(glob)$ADAPTER_WEIGHTS"                  # the same in git's pathspec (plain '*' crosses '/')
EXCLUDE_MARK="# bench/gpu.sh --untrack-adapters (--retrack-adapters removes these two lines)"
if [ "$MODE" = untrack ] || [ "$MODE" = retrack ]; then
  exclude="$(git rev-parse --git-path info/exclude)"
  mkdir -p "$(dirname "$exclude")" && touch "$exclude"
  if [ "$MODE" = untrack ]; then
    git rm -q --cached --ignore-unmatch -- "$ADAPTER_PATHSPEC"
    grep -qxF "$EXCLUDE_MARK" "$exclude" || printf '%s\n%s\n' "$EXCLUDE_MARK" "$ADAPTER_WEIGHTS" >> "$exclude"
    # What a device call copies: tracked files and untracked ones git does not ignore, plus the carry.
    # (a tracked file deleted from the working tree is skipped: stat failing stopped the script here)
    tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | sort -zu \
      | while IFS= read -r -d '' file; do [ -f "$file" ] && stat -c %s -- "$file"; done \
      | awk '{s += $1} END {print s + 0}')
    carry=$( (du -sb .whl .gpu_carry 2>/dev/null || true) | awk '{s += $1} END {print s + 0}')
    echo "adapters untracked (commit nothing until --retrack-adapters); a device call carries" \
      "$(( (tree + carry) / 1048576 )) MiB: the tree $(( tree / 1048576 )) MiB + .whl/.gpu_carry" \
      "$(( carry / 1048576 )) MiB (the limit: 64 MiB)"
    # What the call's suite will need, checked here (on the device a lack costs its stages).
    compgen -G ".whl/msgspec-*cp312*.whl" > /dev/null && compgen -G ".whl/pyzmq-*cp312*.whl" > /dev/null \
      || echo "WARNING: .whl/ lacks the cp312 msgspec or pyzmq wheel: run bench/gpu.sh --fetch-wheels" >&2
    [ -f .gpu_carry/tokenizer/tokenizer.json ] \
      || echo "WARNING: no .gpu_carry/tokenizer/tokenizer.json: run bench/gpu.sh --fetch-wheels" >&2
  else
    status=0
    grep -vxF -e "$EXCLUDE_MARK" -e "$ADAPTER_WEIGHTS" "$exclude" > "$exclude.new" || status=$?
    if [ "$status" -gt 1 ]; then  # 1: no line left (an empty file); more: grep failed, the file stays
      rm -f "$exclude.new"; echo "gpu.sh: could not read $exclude" >&2; exit 1
    fi
    mv "$exclude.new" "$exclude"
    git reset -q -- "$ADAPTER_PATHSPEC"  # the weights only: other staged changes stay staged
    echo "adapters tracked again: $(git ls-files -- "$ADAPTER_PATHSPEC" | wc -l) weight files in the index"
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
  PYTHONPATH=bench "$PY" -c "from gpu_serving_inputs import CARRIED_TOKENIZER, copy_tokenizer
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
      || echo "the wheels in .whl/ do not install on this Python: the stages needing them are skipped (exit 2)"
  else
    echo "no .whl/ wheels: the stages needing pyzmq/msgspec the image lacks are skipped (exit 2)"
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
# The call ends GPU_CALL_S (default 590) seconds after this script started. The suite's report
# is due 30 s before (--deadline-epoch, on this clock: its own start-up counts); 10 s after that
# SIGINT ends the stage running, which keeps what it saved; 10 s later, SIGKILL.
call_s=${GPU_CALL_S:-590}
args+=(--deadline-epoch "$(( CALL_STARTED + call_s - 30 ))")
if [ -n "${GPU_SUITE_BUDGET_S:-}" ]; then args+=(--budget-s "$GPU_SUITE_BUDGET_S"); fi
if [ "$MODE" = dry ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  args+=(--dry-run)
fi
left=$(( CALL_STARTED + call_s - 20 - $(date +%s) ))
status=0
# --preserve-status: the suite's own exit code (1: a stage interrupted), not timeout's 124
timeout --preserve-status -s INT -k 10 "$(( left > 1 ? left : 1 ))" "$PY" bench/gpu_suite.py "${args[@]}" \
  || status=$?
exit $status
