#!/usr/bin/env bash
# Headless Chromium + chromedriver for the review app's browser test (Debian packages; no downloads at test time).
set -euo pipefail
if command -v chromedriver >/dev/null && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then
  echo "browser: $(chromium --version 2>/dev/null || chromium-browser --version)"; exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >/dev/null || true
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null
echo "browser: $(chromium --version)"
