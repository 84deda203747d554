#!/usr/bin/env bash
# Quick start: set everything up (venv, CPU torch, a real ComfyUI) and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
TRITON_INTERPRET=${TRITON_INTERPRET:-$(.venv/bin/python -c "import torch; print(0 if torch.cuda.is_available() else 1)")} \
  exec .venv/bin/python scripts/demo.py "$@"
