#!/usr/bin/env bash
# Creates .venv in the checkout and installs the project into it, with the test tools and the
# training stack (extras dev and training). Run it again to update; it keeps the existing .venv.
# PyTorch: a CUDA build when an NVIDIA GPU is visible, else the CPU build (a few hundred MB
# instead of several GB). Set TORCH_SPEC to choose yourself, e.g. TORCH_SPEC="torch==2.6.0".
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ -n "${TORCH_SPEC:-}" ]; then
    python -m pip install -q "$TORCH_SPEC"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.4"
else
    python -m pip install -q "torch==2.13.0+cpu" 2>/dev/null \
        || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
python -m pip install -q -e ".[dev,training]"
