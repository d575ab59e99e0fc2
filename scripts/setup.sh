#!/usr/bin/env bash
# Everything a fresh machine needs: Debian packages (data sets, Chromium for the browser test)
# and the exact Python pins. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_system_deps.sh
python3 -m pip install --quiet --disable-pip-version-check -r requirements.txt
