"""run.trackers end to end: the digits quick start logs to TensorBoard, Weights & Biases (offline)
and MLflow at once; each is read back with its own reader and must hold the same scalars at the
same steps as the others and as metrics.json, and the resolved config as hyper-parameters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from launching import REPO_ROOT, launch, read_metrics, train_command
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tvlars_scale.config import Config
from tvlars_scale.run_dir import RunDir

QUICK_START = "configs/digits.yaml"
# What the quick start logs: per log step (log_every=1) and per evaluation.
SCALARS = {"train_loss", "lr", "phi_t", "samples_per_second", "test_loss", "test_accuracy"}
SCALARS |= {"trust_ratio/min", "trust_ratio/median", "trust_ratio/max"}
SCALARS |= {"data_wait_fraction", "peak_memory_rss_mib"}  # the run report (CPU: no MFU scalar)
Series = dict[str, dict[int, float]]  # scalar name -> step -> value


def tensorboard_records(run_dir: Path) -> tuple[Series, dict]:
    """The scalars of the events file in tensorboard/, and the hyper-parameters Accelerate's
    tracker wrote with add_hparams (an events file of their own, in a subdirectory)."""
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    series = {
        tag: {event.step: event.value for event in events.Scalars(tag)}
        for tag in events.Tags()["scalars"]
    }
    [hparams_file] = (run_dir / "tensorboard").glob("*/events.out.tfevents.*")
    hparams_events = EventAccumulator(str(hparams_file))
    hparams_events.Reload()
    content = hparams_events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    session = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    hparams = {
        key: getattr(value, value.WhichOneof("kind")) for key, value in session.hparams.items()
    }
    return series, hparams


def wandb_records(run_dir: Path) -> tuple[dict, Series, dict]:
    """The run record, the history and the config of the offline run's .wandb file, read by
    wandb's own reader (``wandb leet inspect --json``: one JSON record per line)."""
    [log] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    printed = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    records = [json.loads(line) for line in printed.splitlines()]
    [run] = [record["run"] for record in records if record["type"] == "run"]
    series: Series = {}
    config: dict = {}
    for record in records:
        if record["type"] == "history":
            step = record["history"]["step"]["num"]
            for key, value in record["history"]["item"].items():
                if not key.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                    series.setdefault(key, {})[step] = value
        elif record["type"] == "config":
            config.update(record["config"].get("update", {}))
    config.pop("_wandb", None)
    return run, series, config


def mlflow_records(run_dir: Path):
    """The run, every metric's history and the params, from the run directory's sqlite store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tvlars_scale")
    [run] = client.search_runs([experiment.experiment_id])
    series = {
        key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        for key in run.data.metrics
    }
    return run, series, run.data.params


def test_tensorboard_wandb_and_mlflow_get_the_same_scalars_and_the_config(tmp_path, monkeypatch):
    for name in ("WANDB_PROJECT", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_NAME", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the run stays in output_dir/wandb
    strays = [REPO_ROOT / name for name in ("wandb", "mlruns", "mlflow.db", "mlartifacts")]
    strays = [path for path in strays if not path.exists()]
    run_dir = tmp_path / "digits-run"
    launch(
        train_command(
            "--config",
            QUICK_START,
            f"run.output_dir={run_dir}",
            "run.num_epochs=2",
            "run.log_every=1",
            "run.progress_bar=false",
            "run.trackers=[tensorboard,wandb,mlflow]",
        )
    )
    metrics = read_metrics(run_dir)
    assert [path for path in strays if path.exists()] == []  # all of it went into output_dir
    num_steps = metrics["num_steps"]
    assert num_steps == 10  # 1437 // 256 = 5 steps per epoch, 2 epochs

    tensorboard, tensorboard_hparams = tensorboard_records(run_dir)
    wandb_run, wandb, wandb_config = wandb_records(run_dir)
    mlflow_run, mlflow, mlflow_params = mlflow_records(run_dir)

    assert set(tensorboard) == set(mlflow) == SCALARS
    # The CPU's MFU is the text "n/a", logged once: TensorBoard keeps it as text, MLflow (numbers
    # only) leaves it out, wandb's history holds it.
    assert set(wandb) == SCALARS | {"mfu"}
    for name in SCALARS:
        # The same steps everywhere; wandb and MLflow keep doubles, TensorBoard float32.
        assert wandb[name] == mlflow[name], name
        assert tensorboard[name] == {
            step: float(np.float32(value)) for step, value in mlflow[name].items()
        }, name
    assert sorted(mlflow["train_loss"]) == list(range(1, num_steps + 1))
    evaluations = {entry["step"]: entry["test_accuracy"] for entry in metrics["history"]}
    assert sorted(evaluations) == [5, 10]
    assert mlflow["test_accuracy"] == evaluations  # exactly what metrics.json holds
    assert wandb["test_accuracy"] == evaluations
    assert metrics["final"]["test_accuracy"] >= 0.5, metrics["history"]  # it did learn

    # The resolved config, flattened, is every tracker's hyper-parameters.
    config = Config.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    hparams = RunDir(config, is_main=False).hparams()
    assert hparams["optim.lr"] == 4.0
    assert wandb_config == hparams
    assert mlflow_params == {key: str(value) for key, value in hparams.items()}
    assert tensorboard_hparams == hparams

    # Where each wrote, and under which names.
    assert (wandb_run["project"], wandb_run["display_name"]) == ("tvlars_scale", "digits-run")
    assert mlflow_run.info.run_name == "digits-run"
    assert mlflow_run.info.status == "FINISHED"
