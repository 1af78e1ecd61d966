#!/usr/bin/env bash
# Reproduces results/fashion_regime/ (README "Results: Fashion-MNIST in the paper's regime"): the
# study of configs/fashion_regime.yaml, in-process, one run at a time, then its table and plot.
#   bash launch/get_fashion_mnist.sh DATA_DIR                # once: the four IDX files
#   bash results/fashion_regime/reproduce.sh DATA_DIR        # the runs this directory's table holds
#   FULL=1 bash results/fashion_regime/reproduce.sh DATA_DIR # every seed at every grid LR (216 runs)
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
claims="--filter optimizer=tvlars --filter optimizer=lars_warmup --filter optimizer=lars --filter optimizer=lamb"
others="--filter optimizer=adamw --filter optimizer=sgd_nesterov"

if [ "${FULL:-0}" = 1 ]; then
  $run
else
  # In order of priority, the order the committed table's runs were made in (each step's "best
  # LR" is the best on seed 0 among the runs finished before it); every step ends with three
  # seeds at each cell's best LR:
  # (a) seed 0, the five optimizers, every batch and target LR (each cell's middle LR first),
  #     with sharpness; (b) seeds 1-2 at each cell's best LR; (c), (d) the same for LARS without
  #     warm-up; (e) edge extensions on seed 0 for the optimizers the paper's claims compare
  #     (TVLARS, LARS with and without warm-up, LAMB): each cell whose best LR is the lowest or
  #     highest it has run gets one more LR outward by the cell's own ratio; (f) seeds 1-2 where
  #     (e) moved the best; (g), (h) the same for AdamW and SGD-Nesterov; (i), (j) below.
  # An interrupted step resumed from the top may add seeds 1-2 at an intermediate best.
  # shellcheck disable=SC2086  # the filters are lists of arguments
  $run --seeds 0 --middle-lr-first $main
  # shellcheck disable=SC2086
  $run --best-lr-only --seeds 1 2 $main
  $run --seeds 0 --middle-lr-first --filter optimizer=lars
  $run --best-lr-only --seeds 1 2 --filter optimizer=lars
  for optimizers in "$claims" "$others"; do
    # shellcheck disable=SC2086
    $run --extend-edges 1 $optimizers
    # shellcheck disable=SC2086
    $run --best-lr-only --seeds 1 2 $optimizers
  done
  # (i), (j) a second round of extensions (two per cell in all) for the compared optimizers, with
  # seeds 1-2 where it moved the best.
  # shellcheck disable=SC2086
  $run --extend-edges 2 $claims
  # shellcheck disable=SC2086
  $run --best-lr-only --seeds 1 2 $claims
fi
$study summarize runs/fashion_regime --grid configs/fashion_regime.yaml --out results/fashion_regime \
  --test-split "the 10,000 Fashion-MNIST test images (14 px)"
