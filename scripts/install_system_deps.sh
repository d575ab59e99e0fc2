#!/usr/bin/env bash
# Install the Debian packages EvoTok's offline data comes from. Safe to run again: packages
# that are already installed are left alone, and nothing is fetched when all are present.
#   openclipart-png        public-domain clip art (evotok.data.ClipArtSource)
#   dataset-fashion-mnist  Fashion-MNIST IDX files (evotok.data.FashionMNISTSource)
#   chromium               Debian's browser, driven by Playwright in the browser test (never downloaded)
# Usage: bash scripts/install_system_deps.sh   (as root, or with sudo available)
set -euo pipefail

PACKAGES=(openclipart-png dataset-fashion-mnist chromium)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install_system_deps: all present (${PACKAGES[*]})"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_system_deps: apt-get not found; install these Debian packages by other means: ${missing[*]}" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_system_deps: need root (or sudo) to install: ${missing[*]}" >&2
        exit 1
    fi
fi

echo "install_system_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "install_system_deps: done"
