#!/usr/bin/env bash
# scripts/ci-browser-deps.sh — installs the headless browser the dashboard's browser tests
# drive (Debian's chromium + chromium-driver), only when missing. scripts/test.sh runs it.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ci-browser-deps.sh: chromium/chromedriver missing and no apt-get; install them by hand" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "ci-browser-deps.sh: installing chromium and chromium-driver" >&2
$SUDO apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver fonts-dejavu-core >&2
