#!/usr/bin/env bash
# Runs the whole test suite on CPU (GPU tests skip without CUDA). Sets the environment up first if needed.
# Extra arguments go to pytest. Fails when no test ran (pytest exit code 5).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "no tests ran: failing" >&2
  exit 1
fi
exit "$status"
