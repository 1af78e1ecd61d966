#!/usr/bin/env bash
# Sets up .venv with everything tvlars_scale needs, idempotently.
# torch comes from the registry (not a local +cpu wheel: torchvision and timm fail to import with it);
# DeepSpeed builds from source against that torch, so it is installed without build isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install -U pip setuptools wheel
$PIP install "torch>=2.4,!=2.13.0" torchvision
DS_BUILD_OPS=0 $PIP install --no-build-isolation "deepspeed>=0.16"
$PIP install -e ".[dev]"
