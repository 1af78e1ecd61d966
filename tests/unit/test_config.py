"""The run configuration: YAML + dotted overrides, strict validation, one-line errors, exit 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tvlars_scale.batching import plan_batches
from tvlars_scale.config import (
    SHIPPED_CONFIGS,
    Config,
    ConfigError,
    load_config,
    reference_markdown,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def base_yaml(tmp_path) -> Path:
    return write_yaml(
        tmp_path / "base.yaml",
        "run:\n  num_epochs: 3\n"
        "optim:\n  name: tvlars\n  lr: 2.5\n  lmbda: 1e-5\n"
        "batch:\n  global_batch_size: 128\n  micro_batch_size: 16\n",
    )


def test_yaml_values_overrides_and_defaults(base_yaml):
    config = load_config(base_yaml, ["optim.lr=0.5", "data.name=cifar10", "run.seed=7"])
    assert config.optim.name == "tvlars"  # from the file
    assert config.optim.lr == 0.5  # the override wins over the file
    assert config.optim.lmbda == 1e-5  # YAML 1.1 would read "1e-5" as a string
    assert isinstance(config.optim.lmbda, float)
    assert (config.data.name, config.run.seed, config.run.num_epochs) == ("cifar10", 7, 3)
    assert config.optim.weight_decay == Config().optim.weight_decay  # untouched default
    assert config.task.name == "classification"


def test_later_override_wins_and_values_are_parsed_as_yaml(base_yaml):
    config = load_config(
        base_yaml,
        [
            "optim.name=lamb",
            "optim.lr=1",
            "optim.lr=3",
            "optim.betas=[0.8, 0.99]",
            "data.path=null",
        ],
    )
    assert config.optim.lr == 3.0
    assert config.optim.betas == [0.8, 0.99]
    assert config.data.path is None


def test_switching_optimizer_keeps_shared_settings_and_refuses_foreign_ones(base_yaml):
    # The file configures TVLARS (lr 2.5, lmbda 1e-5); switching to LARS keeps lr, drops lmbda.
    config = load_config(base_yaml, ["optim.name=lars"])
    assert (config.optim.name, config.optim.lr) == ("lars", 2.5)
    assert "lmbda" not in config.optim.model_dump()
    assert config.optim.eps == 1e-8  # LARS's own default
    with pytest.raises(ConfigError) as caught:
        load_config(base_yaml, ["optim.name=lars", "optim.lmbda=1e-3"])
    assert caught.value.key == "optim.lmbda"
    assert "a setting of tvlars, tvlars_official" in caught.value.problem
    # Without a switch the file itself is checked strictly.
    with pytest.raises(ConfigError) as caught:
        load_config(base_yaml, ["optim.betas=[0.8, 0.99]"])
    assert (caught.value.key, caught.value.problem) == (
        "optim.betas",
        "unknown key for optim.name=tvlars (a setting of lamb, adamw)",
    )


def test_adamw_and_official_delay_sections(base_yaml):
    adamw = load_config(base_yaml, ["optim.name=adamw", "optim.eps=1e-6"]).optim
    assert (adamw.name, adamw.lr, adamw.betas, adamw.eps) == ("adamw", 2.5, [0.9, 0.999], 1e-6)
    assert adamw.weight_decay == 1e-2  # AdamW's own default (torch's), not the LARS family's
    official = load_config(base_yaml, ["optim.name=tvlars_official"]).optim
    assert official.delay_epochs == 10.0  # the authors' epoch_delay_cnt
    assert load_config(base_yaml, ["optim.name=tvlars_official", "optim.delay_epochs=0"]).optim


def test_only_true_and_false_are_booleans(base_yaml):
    # YAML 1.1 reads `no` as False: run.mixed_precision=no must stay the string "no".
    config = load_config(base_yaml, ["run.mixed_precision=no", "run.progress_bar=false"])
    assert (config.run.mixed_precision, config.run.progress_bar) == ("no", False)
    with pytest.raises(ConfigError) as caught:
        load_config(base_yaml, ["run.progress_bar=yes"])
    assert caught.value.key == "run.progress_bar"


def test_trackers_default_to_tensorboard_and_take_a_list(base_yaml):
    assert load_config(base_yaml).run.trackers == ["tensorboard"]
    config = load_config(base_yaml, ["run.trackers=[wandb, mlflow, tensorboard]"])
    assert config.run.trackers == ["wandb", "mlflow", "tensorboard"]
    assert load_config(base_yaml, ["run.trackers=[]"]).run.trackers == []
    listed = write_yaml(base_yaml.parent / "t.yaml", "run:\n  trackers: [mlflow]\n")
    assert load_config(listed).run.trackers == ["mlflow"]


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("run.trackers=[wandb, comet_ml]", "'tensorboard', 'wandb' or 'mlflow' (got 'comet_ml')"),
        ("run.trackers=[wandb, tensorboard, wandb]", "lists wandb twice"),
        ("run.trackers=wandb", "valid list"),
        ("run.tensorboard=false", "replaced by run.trackers"),
    ],
)
def test_bad_trackers_name_the_key(base_yaml, override, fragment):
    with pytest.raises(ConfigError) as caught:
        load_config(base_yaml, [override])
    assert caught.value.key == override.partition("=")[0]
    assert fragment in caught.value.problem


def test_task_section_without_name_means_classification(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", "task:\n  label_smoothing: 0.1\n")
    assert load_config(path).task.label_smoothing == 0.1


def test_resolved_yaml_round_trips(base_yaml, tmp_path):
    config = load_config(base_yaml, ["run.mixed_precision=bf16", "model.cifar_stem=false"])
    dumped = write_yaml(tmp_path / "resolved.yaml", config.to_yaml())
    assert load_config(dumped) == config


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        (["optim.lrr=3"], "optim.lrr", "unknown key; did you mean optim.lr?"),
        (["bogus.x=1"], "bogus", "unknown key"),
        (["optim.lr=-1"], "optim.lr", "greater than 0"),
        (["optim.lr=fast"], "optim.lr", "valid number"),
        (["run.num_epochs=2.5"], "run.num_epochs", "valid integer"),
        (["run.mixed_precision=fp8"], "run.mixed_precision", "'no', 'bf16' or 'fp16'"),
        (["optim.momentum=1.0"], "optim.momentum", "less than 1"),
        (["optim.lmbda=-1e-4"], "optim.lmbda", "greater than or equal to 0"),
        (["batch.micro_batch_size=0"], "batch.micro_batch_size", "greater than or equal to 1"),
        (["data.name=mnist"], "data.name", "'digits', 'fashion-mnist', 'cifar10'"),
        (["task.name=detection"], "task.name", "unknown task 'detection'"),
        (["task.label_smoothing=1.5"], "task.label_smoothing", "less than 1"),
        (["optim.name=lamb", "optim.betas=[0.9]"], "optim.betas", "at least 2"),
        (["optim.name=adam"], "optim.name", "unknown optimizer 'adam'"),
        (["optim.name=adamw", "optim.betas=[0.9]"], "optim.betas", "at least 2"),
        (["optim.name=adamw", "optim.momentum=0.9"], "optim.momentum", "adamw"),
        (["optim.name=tvlars_official", "optim.delay_epochs=-1"], "optim.delay_epochs", "0"),
        (["schedule.name=poly", "schedule.power=0"], "schedule.power", "greater than 0"),
        (["optim.lr.x=3"], "optim.lr", "is a value, not a section"),
        (["optim.lr"], "optim.lr", "expected key=value"),
        (["schedule.warmup_epochs=5"], "schedule.warmup_epochs", "warmup_cosine"),
        (["optim.name=tvlars_official", "optim.alpha=0.5"], "optim.alpha", "tvlars_official"),
        # The recipe pieces: batch augmentation and init_from.
        (["data.augment=autoaugment"], "data.augment", "input should be 'none', 'randaugment'"),
        (["data.mixup_alpha=-0.2"], "data.mixup_alpha", "greater than or equal to 0"),
        (["data.cutmix_alpha=one"], "data.cutmix_alpha", "valid number"),
        (["data.mixup_prob=1.5"], "data.mixup_prob", "less than or equal to 1"),
        (["data.mixup_switch_prob=0.2"], "data.mixup_switch_prob", "is read only with"),
        (["task.name=barlow_twins", "data.mixup_alpha=0.2"], "data.mixup_alpha", "classification"),
        (["task.name=barlow_twins", "data.augment=randaugment"], "data.augment", "classification"),
        (["task.name=barlow_twins", "model.init_from=x"], "model.init_from", "classification"),
    ],
)
def test_invalid_values_name_the_key(base_yaml, overrides, key, fragment):
    with pytest.raises(ConfigError) as caught:
        load_config(base_yaml, overrides)
    assert caught.value.key == key
    assert fragment in caught.value.problem
    assert "\n" not in caught.value.line()


def test_malformed_and_non_mapping_yaml(tmp_path):
    broken = write_yaml(tmp_path / "broken.yaml", "optim:\n  lr: [1\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line \d+ column \d+"):
        load_config(broken)
    listing = write_yaml(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listing)
    with pytest.raises(ConfigError, match="cannot read") as caught:
        load_config(tmp_path / "missing.yaml")
    assert caught.value.key == "--config"


def test_reference_lists_every_field_with_its_default():
    table = reference_markdown()
    for section, values in Config().model_dump().items():
        for key, default in values.items():
            row = next(
                line for line in table.splitlines() if line.startswith(f"| `{section}.{key}`")
            )
            assert f"`{default!r}`" in row
            assert row.rstrip(" |").split("|")[-1].strip(), f"{section}.{key} has no description"


def run_cli(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tvlars_scale.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


@pytest.mark.parametrize(
    ("args", "line_start"),
    [
        (["optim.lrr=3"], "config error: optim.lrr: unknown key"),
        (["batch.micro_batch_size=-4"], "config error: batch.micro_batch_size: "),
        (["run.mixed_precision=fp8"], "config error: run.mixed_precision: "),
    ],
)
def test_cli_reports_one_line_and_exits_2_without_writing(tmp_path, args, line_start):
    run_dir = tmp_path / "run"
    config = write_yaml(tmp_path / "c.yaml", f"run:\n  output_dir: {run_dir}\n")
    result = run_cli("--config", str(config), *args)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(line_start)
    assert not run_dir.exists()


def test_cli_argument_and_file_errors_are_one_line(tmp_path):
    missing_flag = run_cli("optim.lr=1")
    assert missing_flag.returncode == 2
    assert missing_flag.stderr.strip() == (
        "config error: arguments: one of the arguments --config --list-configs is required"
    )
    broken = write_yaml(tmp_path / "broken.yaml", "run: {output_dir: x\n")
    malformed = run_cli("--config", str(broken))
    assert malformed.returncode == 2
    assert len(malformed.stderr.splitlines()) == 1
    assert malformed.stderr.startswith(f"config error: {broken}: malformed YAML")


@pytest.mark.parametrize("name", ["digits", "cifar10_resnet18", "tiny_imagenet_resnet34"])
def test_shipped_experiment_configs_validate_and_their_batch_comment_holds(name):
    path = REPO_ROOT / "configs" / f"{name}.yaml"
    config = load_config(path)
    # The first "<micro> micro x <accum> accum x <ranks> rank(s) = <global>" comment must agree
    # with the batch section and with the trainer's own arithmetic.
    match = re.search(r"(\d+) micro x (\d+) accum x (\d+) ranks? = (\d+)", path.read_text())
    assert match, f"{path.name} does not show its batch arithmetic"
    micro, accum, ranks, total = map(int, match.groups())
    assert micro * accum * ranks == total == config.batch.global_batch_size
    assert micro == config.batch.micro_batch_size
    assert plan_batches(total, micro, ranks).grad_accum_steps == accum


def test_a_bare_name_is_a_shipped_config_unless_a_file_has_it(tmp_path, monkeypatch):
    assert (REPO_ROOT / "configs").resolve() == SHIPPED_CONFIGS.resolve()  # the clone's link
    assert load_config("digits") == load_config(SHIPPED_CONFIGS / "digits.yaml")
    monkeypatch.chdir(tmp_path)
    write_yaml(tmp_path / "digits", "run:\n  seed: 7\n")  # a file of that name here wins
    assert load_config("digits").run.seed == 7
    with pytest.raises(ConfigError, match=r"no shipped config of that name.*digits_study"):
        load_config("digitz")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config("digitz.yaml")  # a file name is never looked up among the shipped ones


def test_list_configs_names_every_shipped_yaml(tmp_path):
    result = run_cli("--list-configs", cwd=tmp_path)
    assert result.returncode == 0 and not list(tmp_path.iterdir())
    listed = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert listed == sorted(path.stem for path in SHIPPED_CONFIGS.glob("*.yaml"))
    assert "digits" in listed
