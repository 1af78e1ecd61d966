"""The run directory: start / refuse / overwrite / resume-and-trim, and the files the loop writes."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

from tvlars_scale.checkpoint import CHECKPOINTS_DIR, complete_checkpoints, save_checkpoint
from tvlars_scale.config import Config, ConfigError
from tvlars_scale.run_dir import RunDir


def config(path, **checkpoint) -> Config:
    return Config.model_validate({"run": {"output_dir": str(path)}, "checkpoint": checkpoint})


def checkpoint_at(run, step: int) -> None:
    save_checkpoint(
        run,
        step,
        rank=0,
        world_size=1,
        rank_payload={},
        shared_payloads={"config.yaml": config(run).to_yaml()},
        metadata={},
        keep_last=10,
    )


def test_new_run_writes_its_resolved_config(tmp_path):
    run = RunDir(config(tmp_path / "run"), is_main=True)
    assert run.resolve_start() is None
    run.start(None, step=0)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == yaml.safe_load(
        run.config.to_yaml()
    )


def test_an_existing_run_is_refused_untouched_and_overwrite_clears_only_run_files(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    (path / "metrics.json").write_text("{}")
    (path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError) as caught:
        RunDir(config(path), is_main=True).resolve_start()
    assert caught.value.key == "run.output_dir"
    assert (path / "metrics.json").read_text() == "{}"

    overwrite = Config.model_validate({"run": {"output_dir": str(path), "overwrite": True}})
    run = RunDir(overwrite, is_main=True)
    run.start(run.resolve_start(), step=0)
    assert not (path / "metrics.json").exists()
    assert (path / "notes.txt").read_text() == "mine"
    assert (path / "config.yaml").exists()


def test_resuming_its_own_run_trims_what_came_after_the_step(tmp_path):
    path = tmp_path / "run"
    for step in (4, 8):
        checkpoint_at(path, step)
    (path / CHECKPOINTS_DIR / ".tmp-step-12").mkdir()  # torn by the crash
    run = RunDir(config(path, resume=str(path / CHECKPOINTS_DIR / "step-4")), is_main=True)
    for step in (2, 4, 6, 8):
        run.append_layer_stats({"step": step, "layers": {}})
    (path / "config.yaml").write_text(run.config.to_yaml())
    with pytest.raises(ConfigError, match="would fork the run"):
        run.resolve_start()  # step-8 is newer: refused without run.overwrite

    forked = Config.model_validate(
        {**run.config.model_dump(), "run": {"output_dir": str(path), "overwrite": True}}
    )
    run = RunDir(forked, is_main=True)
    info = run.resolve_start()
    assert info.step == 4
    run.start(info, step=info.step)
    assert [c.step for c in complete_checkpoints(path / CHECKPOINTS_DIR)] == [4]
    assert not (path / CHECKPOINTS_DIR / ".tmp-step-12").exists()
    lines = (path / "layer_stats.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4]


def test_tracker_files_belong_to_the_run(tmp_path):
    path = tmp_path / "run"
    checkpoint_at(path, 4)
    (path / "wandb" / "offline-run-1").mkdir(parents=True)
    (path / "mlflow.db").write_text("store")
    (path / "config.yaml").write_text(config(path).to_yaml())
    resumed = RunDir(config(path, resume="auto"), is_main=True)
    info = resumed.resolve_start()
    resumed.start(info, step=info.step)
    assert (path / "wandb" / "offline-run-1").is_dir()  # a resumed run keeps its trackers' runs
    assert (path / "mlflow.db").read_text() == "store"

    (path / "config.yaml").unlink()
    shutil.rmtree(path / CHECKPOINTS_DIR)
    with pytest.raises(ConfigError, match=r"holds outputs \(wandb, mlflow.db\)"):
        RunDir(config(path, resume="auto"), is_main=True).resolve_start()
    overwrite = Config.model_validate({"run": {"output_dir": str(path), "overwrite": True}})
    replaced = RunDir(overwrite, is_main=True)
    replaced.start(replaced.resolve_start(), step=0)
    assert not (path / "wandb").exists() and not (path / "mlflow.db").exists()


def test_only_the_main_process_writes(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    worker = RunDir(config(path), is_main=False)
    worker.start(None, step=0)
    worker.append_layer_stats({"step": 1})
    worker.write_metrics({"final": {}})
    assert list(path.iterdir()) == []
    main = RunDir(config(path), is_main=True)
    main.write_metrics({"final": {"test_accuracy": 0.5}})
    assert json.loads((path / "metrics.json").read_text()) == {"final": {"test_accuracy": 0.5}}


def test_hparams_are_flat_scalars(tmp_path):
    hparams = RunDir(config(tmp_path), is_main=True).hparams()
    assert hparams["optim.name"] == "tvlars"
    assert hparams["optim.lr"] == 1.0
    assert hparams["data.path"] == "None"  # TensorBoard takes no None
    assert hparams["checkpoint.allow_changes"] == "[]"
    assert all(isinstance(value, (int, float, str, bool)) for value in hparams.values())


def test_one_writer_per_run_directory(tmp_path):
    path = tmp_path / "run"
    first = RunDir(config(path), is_main=True)
    assert first.lock() is None
    first.start(None, step=0)
    second = RunDir(config(path, resume="auto"), is_main=True)
    held = second.lock()  # flock is per open file: a second open conflicts even in one process
    assert held is not None and f"pid {os.getpid()} on " in held and "in use" in held
    first.unlock()  # what the OS does when the holder dies
    assert second.lock() is None
    second.unlock()
    assert (path / "config.yaml").exists()  # a started run keeps its directory


def test_a_directory_made_for_a_refused_start_goes_again(tmp_path):
    path = tmp_path / "new"
    run = RunDir(config(path), is_main=True)
    assert run.lock() is None
    assert path.is_dir()
    run.unlock()  # the start was refused (e.g. an unknown model) before anything was written
    assert not path.exists()
    worker = RunDir(config(path), is_main=False)
    worker.unlock()  # never locked: nothing to do
    assert not path.exists()
