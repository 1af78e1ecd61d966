#!/usr/bin/env bash
# Reproduces results/digits_regime/ (README "Results: digits in the paper's regime"): the study of
# configs/digits_regime.yaml, in-process, one run at a time, then its table and plot.
#   bash results/digits_regime/reproduce.sh            # the runs this directory's table holds
#   FULL=1 bash results/digits_regime/reproduce.sh     # the issue's whole grid: 5 seeds x every LR
# Finished runs (runs/digits_regime/*/metrics.json) are skipped, so an interrupted study resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
study="$python -m tvlars_scale.paper.study"

if [ "${FULL:-0}" = 1 ]; then
  $study run  # 840 runs, every seed at every LR (about 6 CPU-hours on this machine)
else
  # What fitted ~1 hour of a shared 2-core CPU: seed 0 at every target LR (both tasks, with
  # sharpness), then seeds 1-4 at each (optimizer, batch)'s best LR on seed 0 (both tasks).
  $study run --seeds 0
  $study run --best-lr-only --seeds 1 2 3 4 --filter task=classification
  $study run --best-lr-only --seeds 1 2 3 4 --filter task=barlow_twins
fi
$study summarize runs/digits_regime --out results/digits_regime
