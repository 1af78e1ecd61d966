"""run.trackers -> Accelerate's trackers: where each is told to write, what the environment changes,
and the errors of the build phase (nothing is started or written here; the integration test
tests/integration/test_trackers.py runs them)."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

from tvlars_scale import accelerate_setup
from tvlars_scale.accelerate_setup import make_trackers
from tvlars_scale.config import ConfigError, load_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "digits.yaml"
TRACKER_ENV = ("WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in TRACKER_ENV:
        monkeypatch.delenv(name, raising=False)


def trackers_for(tmp_path, trackers: str):
    output_dir = tmp_path / "my-run"
    config = load_config(CONFIG, [f"run.output_dir={output_dir}", f"run.trackers={trackers}"])
    return output_dir, make_trackers(config)


def test_each_tracker_writes_into_the_run_directory(tmp_path):
    output_dir, (tensorboard, wandb, mlflow) = trackers_for(tmp_path, "[tensorboard,wandb,mlflow]")
    assert isinstance(tensorboard, TensorBoardTracker)
    assert (tensorboard.logging_dir_param, tensorboard.run_name) == (output_dir, "tensorboard")
    assert isinstance(wandb, WandBTracker)
    assert wandb.run_name == "tvlars_scale"  # Accelerate passes it as wandb.init's project
    assert wandb.init_kwargs == {"dir": str(output_dir), "name": "my-run"}
    assert isinstance(mlflow, MLflowTracker)
    assert mlflow.tracking_uri == f"sqlite:///{output_dir}/mlflow.db"
    assert (mlflow.experiment_name, mlflow.run_name) == ("tvlars_scale", "my-run")
    assert mlflow.logging_dir == str(output_dir / "mlartifacts")
    assert not output_dir.exists()  # built, not started: nothing written


def test_the_environment_names_the_wandb_project_and_the_mlflow_store(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "team-project")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    _, (wandb, mlflow) = trackers_for(tmp_path, "[wandb,mlflow]")
    assert wandb.run_name == "team-project"
    assert mlflow.tracking_uri == "http://127.0.0.1:5000"
    assert mlflow.logging_dir is None  # the server's artifact store


def test_no_trackers(tmp_path):
    assert trackers_for(tmp_path, "[]")[1] == []


def test_a_tracker_that_is_not_installed_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(accelerate_setup._INSTALLED, "wandb", lambda: False)
    with pytest.raises(ConfigError) as caught:
        trackers_for(tmp_path, "[tensorboard,wandb]")
    assert (caught.value.key, caught.value.problem) == (
        "run.trackers",
        "wandb is not installed (pip install wandb)",
    )


def test_mlflows_default_store_needs_sqlalchemy(tmp_path, monkeypatch):
    monkeypatch.setattr(accelerate_setup, "_installed", lambda *modules: False)
    with pytest.raises(ConfigError, match="needs SQLAlchemy and alembic") as caught:
        trackers_for(tmp_path, "[mlflow]")
    assert caught.value.key == "run.trackers"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # another store: fine
    assert trackers_for(tmp_path, "[mlflow]")[1][0].tracking_uri == "http://127.0.0.1:5000"
