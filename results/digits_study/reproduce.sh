#!/usr/bin/env bash
# Reproduces results/digits_study/ (README "Results: digits study"): 24 runs on the CPU
# (~10 minutes on 2 cores), then the table and the figures. Finished runs are skipped on a re-run.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-.venv/bin/python}
out=results/digits_study

OMP_NUM_THREADS=1 nice -n 10 "$python" -m tvlars_scale.paper.grid run --grid configs/digits_study.yaml
"$python" -m tvlars_scale.paper.report runs/digits_study --rows batch > "$out/table.md"
"$python" -m tvlars_scale.paper.plots phi --out "$out/phi_lambda_grid.png"
for task in classification barlow_twins; do
  "$python" -m tvlars_scale.paper.plots layers \
    runs/digits_study/digits-$task-{tvlars,lars_warmup,lars,lamb}-b512-lr*-s0 \
    --out "$out/layers_$task.png"
done

# Reference for the Barlow Twins rows: the same linear evaluation of the backbones at their random
# initialisation (no pretraining), per seed of the study.
"$python" - >> "$out/table.md" <<'PY'
import statistics
from accelerate.utils import set_seed
from tvlars_scale.config import load_config
from tvlars_scale.data import load_image_data
from tvlars_scale.paper.grid import load_grid, parse_filters, select
from tvlars_scale.tasks.barlow_twins import BarlowTwinsTask
from tvlars_scale.tasks.linear_eval import LinearEvalSettings, extract_features, linear_evaluation

runs = select(load_grid("configs/digits_study.yaml").runs(),
              parse_filters(["task=barlow_twins", "optimizer=tvlars"]))
data, accuracies = load_image_data("digits"), []
for run in runs:
    config = load_config(run.config, list(run.overrides))
    set_seed(config.run.seed)  # the trainer's initial model for this seed
    task = BarlowTwinsTask(config, data, rank=0)
    model = task.build_model()
    train = extract_features(model, data.train_images, task.eval_transform)
    test = extract_features(model, data.test_images, task.eval_transform)
    settings = LinearEvalSettings(epochs=config.task.linear_eval_epochs, seed=config.run.seed)
    metrics = linear_evaluation(train, data.train_labels, test, data.test_labels, 10, settings)
    accuracies.append(100 * metrics["linear_test_accuracy"])
print(f"\nRandom-init backbone, same linear evaluation (no pretraining): "
      f"{statistics.fmean(accuracies):.2f} ± {statistics.stdev(accuracies):.2f} ({len(accuracies)})")
PY
