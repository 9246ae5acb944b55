#!/usr/bin/env bash
# Create .venv with the pinned CPU torch first (an unpinned torch would pull a multi-GB CUDA build), then lingua[dev].
# Idempotent: a stamp file records the hash of pyproject.toml, so a second run costs a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
EXTRAS=${LINGUA_EXTRAS:-dev}
stamp=.venv/.lingua-installed
want="torch==$TORCH_VERSION extras=$EXTRAS $(sha1sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] .venv is up to date"
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==$TORCH_VERSION"
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
echo "$want" > "$stamp"
echo "[setup] .venv ready: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
