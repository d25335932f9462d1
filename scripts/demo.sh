#!/usr/bin/env bash
# Quick start 1/2: set up, then run the main job (`vlmkit demo`). Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/vlmkit demo "$@"
