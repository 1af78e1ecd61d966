#!/usr/bin/env bash
# Reproduces results/fashion_regime/ (README "Results: Fashion-MNIST in the paper's regime"): the
# study of configs/fashion_regime.yaml, in-process, one run at a time, then its table and plot.
#   bash launch/get_fashion_mnist.sh DATA_DIR                # once: the four IDX files
#   bash results/fashion_regime/reproduce.sh DATA_DIR        # the runs this directory's table holds
#   FULL=1 bash results/fashion_regime/reproduce.sh DATA_DIR # every seed at every LR (270 runs)
# Finished runs (runs/fashion_regime/*/metrics.json) are skipped, so an interrupted study resumes:
# run the same command again.
set -euo pipefail
if [ "$#" -ne 1 ]; then
  echo "usage: bash results/fashion_regime/reproduce.sh DATA_DIR (the Fashion-MNIST IDX files)" >&2
  exit 2
fi
data=$(realpath "$1")
cd "$(dirname "$0")/../.."
python=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
study="$python -m tvlars_scale.paper.study"
run="$study run --grid configs/fashion_regime.yaml --set data.path=$data --set batch.micro_batch_size=512"
main="--filter optimizer=tvlars --filter optimizer=lars_warmup --filter optimizer=lamb --filter optimizer=adamw --filter optimizer=sgd_nesterov"

if [ "${FULL:-0}" = 1 ]; then
  $run
else
  # In order of priority: (a) seed 0, the five optimizers, every batch and target LR (each cell's
  # middle LR first), with sharpness; (b) seeds 1-2 at each cell's best LR on seed 0; (c) LARS
  # without warm-up on seed 0.
  # shellcheck disable=SC2086  # $main is a list of arguments
  $run --seeds 0 --middle-lr-first $main
  # shellcheck disable=SC2086
  $run --best-lr-only --seeds 1 2 $main
  $run --seeds 0 --middle-lr-first --filter optimizer=lars
fi
$study summarize runs/fashion_regime --grid configs/fashion_regime.yaml --out results/fashion_regime \
  --test-split "the 10,000 Fashion-MNIST test images (14 px)"
