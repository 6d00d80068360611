#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the pinned requirements. Safe to rerun:
# it does nothing when requirements.txt has not changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha1
want=$(sha1sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing requirements into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  echo "$want" > "$stamp"
fi
# the project itself, editable: `python -m pipeline` from any folder inside the repository
here=$(pwd -P)
installed=$(cd / && "$here/.venv/bin/python" -c \
  'import os, pipeline; print(os.path.dirname(os.path.dirname(os.path.realpath(pipeline.__file__))))' 2>/dev/null \
  || true)
if [ "$installed" != "$here" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . >/dev/null
fi
.venv/bin/python -c "import torch, mtcnn, dvc; print('environment ready: torch', torch.__version__)" 2>/dev/null \
  || { echo "setup failed: .venv cannot import torch/mtcnn/dvc; delete .venv and rerun scripts/setup.sh" >&2; exit 1; }
