#!/usr/bin/env bash
# Installs Debian's chromium for the headless browser test (tests/test_browser_workflows.py).
# Playwright drives it through executable_path=/usr/bin/chromium; `playwright install` is never used
# (it downloads its own browser build). Idempotent: does nothing when chromium is already there.
# Needs root (or sudo) and apt-get; on other systems set DIT_QUANT_CHROMIUM to an installed Chromium.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser.sh: no apt-get here; install Chromium yourself and set DIT_QUANT_CHROMIUM" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "chromium installed: $(command -v chromium)"
