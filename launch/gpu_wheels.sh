#!/usr/bin/env bash
# bash launch/gpu_wheels.sh      (here, where the package registry is reachable; then carry .gpu_wheels)
#
# Fills .gpu_wheels/ with the wheels benchmarks/gpu_check.py needs on the GPU machine beyond what its
# image holds (the nvidia-h200 image: CPython 3.12 with torch+CUDA, torchvision, timm, accelerate,
# transformers, scikit-learn, tensorboard, ...; no network, so nothing can be installed there from a
# registry). Pinned to the versions of this repository's .venv, where the tests run:
#   - this package (its metadata and the tvlars-train entry point; the check itself runs the
#     repository's tree, which comes first in PYTHONPATH, so a stale wheel is never what runs);
#   - DeepSpeed, pure Python: built without its compiled ops and without build isolation;
#   - DeepSpeed's requirements the image lacks: hjson, pydantic (+ pydantic-core built for CPython
#     3.12 manylinux x86_64, annotated-types, typing-inspection, typing-extensions new enough for it).
# About 5 MiB in all; a call carries at most 64 MiB. torch itself (several GiB with its CUDA
# libraries) cannot be carried: the machine's python3 must hold it.
# More pure-Python packages: EXTRA="name==version ..." bash launch/gpu_wheels.sh
# On the GPU machine (see the top of benchmarks/gpu_check.py for the whole command):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu_wheels/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[[ $PY == /* ]] || PY="$PWD/$PY"  # absolute, not resolved: the venv's python is a symlink
OUT=${OUT:-.gpu_wheels}
GPU_PYTHON=${GPU_PYTHON:-3.12}
EXTRA=${EXTRA:-}
PIP="$PY -m pip --disable-pip-version-check -q"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

rm -rf "$OUT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# This package, built from a copy of the working tree (an in-tree build would leave build/ here).
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
cp -r pyproject.toml README.md tvlars_scale "$src/"
find "$src" -name __pycache__ -prune -exec rm -rf {} +
(cd "$src" && $PIP wheel --no-deps --no-build-isolation -w "$OUT" .)

# DeepSpeed from its source distribution, against the torch of .venv, with no compiled ops.
DS_BUILD_OPS=0 $PIP wheel --no-deps --no-build-isolation -w "$OUT" "deepspeed==$(version deepspeed)"

# Wheels for the GPU machine's Python (pydantic-core is compiled: cp312, manylinux x86_64).
# shellcheck disable=SC2086  # EXTRA is a list of specifiers
$PIP download --no-deps --only-binary=:all: -d "$OUT" \
    --python-version "$GPU_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    "hjson==$(version hjson)" \
    "pydantic==$(version pydantic)" \
    "pydantic-core==$(version pydantic-core)" \
    "annotated-types==$(version annotated-types)" \
    "typing-inspection==$(version typing-inspection)" \
    "typing-extensions==$(version typing-extensions)" \
    $EXTRA

ls -1 "$OUT"
du -sh "$OUT"
if ! git check-ignore -q "$OUT"; then
    echo "note: $OUT is not ignored by git; add '/.gpu_wheels/' to .gitignore (then name it in carry)"
fi
