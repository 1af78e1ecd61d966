"""The run configuration: a typed schema, YAML files, dotted command-line overrides.

A run is described by one YAML file plus ``key=value`` overrides, e.g.::

    accelerate launch -m tvlars_scale.train --config configs/digits.yaml optim.lr=3 run.seed=1

Every field below carries a docstring (it becomes the field's ``description`` and the generated
reference: ``python -m tvlars_scale.config``). Validation happens at load time, strictly (a string
is not a number, unknown keys are refused); every user error becomes a :class:`ConfigError` that
the command line prints as ONE line, ``config error: <dotted.key>: <problem>``, before exiting
with status 2 and before anything is written.

Checks that need the world size or the dataset (batch divisibility over ranks, a global batch
larger than the training set) run in :meth:`tvlars_scale.trainer.Trainer.setup` and raise the
same :class:`ConfigError`.

Extending: a task adds its own section class to ``TaskConfig`` below (a union keyed by
``task.name``).
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

__all__ = [
    "BarlowTwinsTaskConfig",
    "BatchConfig",
    "CheckpointConfig",
    "ClassificationTaskConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "load_config",
    "reference_markdown",
]


class ConfigError(Exception):
    """A user error in the configuration or the arguments, naming the offending key."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem

    def line(self) -> str:
        """The single line the command line prints before exiting with status 2."""
        return f"config error: {self.key}: {self.problem}"


class _Section(BaseModel):
    # strict: YAML `lr: "0.1"` is a mistake worth reporting, not something to coerce.
    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True
    )


class RunConfig(_Section):
    output_dir: str = "runs/default"
    """Run directory: resolved config, TensorBoard logs and metrics.json are written here."""
    overwrite: bool = False
    """Allow starting in a non-empty run directory (its files are replaced); when resuming from an
    older checkpoint of the same run, discard the newer checkpoints."""
    seed: int = Field(0, ge=0)
    """Seed for model init, data order and augmentation (each rank derives its own stream)."""
    num_epochs: int = Field(30, ge=1)
    """Number of passes over the training set."""
    eval_every: int = Field(1, ge=1)
    """Evaluate on the test split every this many epochs, and always after the last one."""
    log_every: int = Field(10, ge=1)
    """Log loss, lr, phi_t, trust ratios and samples/s every this many optimizer steps."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision; fp16 needs a GPU (Accelerate has no fp16 autocast on CPU)."""
    tensorboard: bool = True
    """Write TensorBoard events (Accelerate's tracker) under output_dir/tensorboard."""
    progress_bar: bool = True
    """Show a tqdm progress bar (main process only)."""
    max_nonfinite_steps: int = Field(5, ge=1)
    """An optimizer step whose gradients hold NaN/Inf is skipped (parameters and optimizer state
    unchanged); after this many in a row the run stops with exit status 3, its last checkpoint
    intact. Under fp16 the loss scaler's overflow skips count too."""


class DataConfig(_Section):
    name: Literal["digits", "cifar10", "tiny-imagenet", "synthetic"] = "digits"
    """Dataset: digits (scikit-learn's bundled 8x8 digits, no download), cifar10, tiny-imagenet
    (Hugging Face datasets, hub id or local path) or synthetic (random images, for benchmarks)."""
    path: str | None = None
    """Hugging Face hub id or local directory (cifar10, tiny-imagenet); null: the default hub id."""
    num_synthetic: int = Field(4096, ge=1)
    """Number of training images of the synthetic dataset."""
    image_size: int | None = Field(None, ge=1)
    """Image side in pixels for synthetic data; null: the dataset's native size."""
    crop_padding: int = Field(4, ge=0)
    """Training augmentation: zero-pad by this many pixels, then random-crop back (0: no crop)."""
    flip: bool = True
    """Training augmentation: random horizontal flip (switch off for digits)."""


class ModelConfig(_Section):
    name: str = "resnet18"
    """Any timm model name, or one of tvlars_scale.models' own (e.g. resnet18 / resnet34)."""
    cifar_stem: bool | None = None
    """ResNet stem for small images (3x3 conv, no max-pool); null: on when images are <= 64 px."""
    sync_batchnorm: bool = False
    """Convert BatchNorm layers to SyncBatchNorm (statistics over all ranks)."""
    init: Literal["kaiming_uniform", "timm"] = "kaiming_uniform"
    """Weight init: Kaiming-uniform as in the paper, or timm's own."""


class BatchConfig(_Section):
    global_batch_size: int = Field(512, ge=1)
    """Samples per optimizer step over all ranks (the effective batch)."""
    micro_batch_size: int = Field(64, ge=1)
    """Samples per forward/backward on one rank; grad_accum_steps is derived from the two sizes."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """Scale optim.lr by global/base batch (linear) or its square root (sqrt, as in the paper)."""
    base_batch_size: int = Field(256, ge=1)
    """Batch size at which optim.lr is given when lr_scaling is not none."""


class OptimConfig(_Section):
    name: Literal["tvlars", "tvlars_official", "lars", "lamb", "sgd"] = "tvlars"
    """Optimizer: tvlars (paper, Algorithm 1), tvlars_official (authors' code), lars, lamb, sgd."""
    lr: float = Field(1.0, gt=0)
    """Target learning rate (at base_batch_size when batch.lr_scaling is not none)."""
    weight_decay: float = Field(5e-4, ge=0)
    """L2 weight decay (excluded for 1-D parameters when exclude_1d)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """Momentum (tvlars, lars, sgd); LAMB uses betas."""
    eta: float = Field(1e-3, gt=0)
    """Trust coefficient of the layer-wise trust ratio (tvlars, lars)."""
    lmbda: float = Field(1e-4, ge=0)
    """TVLARS decay steepness lambda of phi_t (per optimizer step)."""
    alpha: float = Field(1.0, gt=0)
    """TVLARS alpha in phi_t = 1 / (alpha + exp(lmbda (t - d))) + gamma_min."""
    gamma_min: float = Field(0.0, ge=0)
    """TVLARS floor added to phi_t."""
    delay_epochs: float = Field(10.0, ge=0)
    """TVLARS delay d in epochs, converted to optimizer steps from the real steps per epoch."""
    warmup_epochs: float = Field(0.0, ge=0)
    """Linear warm-up length in epochs for schedule warmup_cosine."""
    schedule: Literal["constant", "warmup_cosine", "poly"] = "constant"
    """LR multiplier over optimizer steps: constant, warm-up then cosine, or polynomial decay."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Final LR as a fraction of the peak for warmup_cosine and poly."""
    poly_power: float = Field(2.0, gt=0)
    """Exponent of the poly schedule."""
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2)
    """LAMB's Adam coefficients (beta1, beta2)."""
    exclude_1d: bool = True
    """1-D parameters (biases, norm layers) get no weight decay and trust ratio 1."""


class ClassificationTaskConfig(_Section):
    name: Literal["classification"] = "classification"
    """Supervised image classification with cross-entropy."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """Label smoothing of the cross-entropy."""


class BarlowTwinsTaskConfig(_Section):
    name: Literal["barlow_twins"] = "barlow_twins"
    """Barlow Twins pretraining, scored by linear evaluation of the frozen backbone."""
    projector_dims: list[int] = Field(default_factory=lambda: [2048, 2048, 4096], min_length=1)
    """Projector widths: Linear-BN-ReLU blocks, the last Linear alone (paper: 2048-2048-4096)."""
    off_diagonal_weight: float = Field(0.0051, ge=0)
    """Weight of the loss's off-diagonal (redundancy reduction) term."""
    exact_accumulation: bool = True
    """With accumulation, optimise the loss of the whole effective batch (Gradient Cache: one more
    forward per micro-batch); false: the mean of micro-batch losses, a different objective."""
    linear_eval_epochs: int = Field(100, ge=1)
    """Epochs of the linear classifier trained on frozen features at each evaluation."""
    linear_eval_lr: float = Field(0.1, gt=0)
    """Peak SGD learning rate of the linear classifier (cosine annealed to 0)."""
    linear_eval_batch_size: int = Field(256, ge=1)
    """Batch size of the linear classifier's SGD."""
    linear_eval_weight_decay: float = Field(0.0, ge=0)
    """Weight decay of the linear classifier's SGD."""


def _task_name(value: Any) -> str:
    # `task.name` may be omitted: the task section then means classification.
    if isinstance(value, dict):
        return value.get("name", "classification")
    return getattr(value, "name", "classification")


# Every task's section; a new task appends its class (its `name` field's default is its tag).
TASK_CONFIGS: tuple[type[_Section], ...] = (ClassificationTaskConfig, BarlowTwinsTaskConfig)

TaskConfig = Annotated[
    Union[tuple(Annotated[cls, Tag(cls.model_fields["name"].default)] for cls in TASK_CONFIGS)],  # noqa: UP007
    Discriminator(_task_name),
]


class CheckpointConfig(_Section):
    every_steps: int = Field(0, ge=0)
    """Save a checkpoint every this many optimizer steps (0: only at the end of training and when a
    SIGTERM / SIGUSR1 asks the run to stop)."""
    keep_last: int = Field(3, ge=1)
    """Complete checkpoints kept in output_dir/checkpoints; older ones are deleted after a save."""
    save_at_end: bool = True
    """Save a checkpoint when training completes."""
    resume: str | None = None
    """null: a new run; auto: continue from the newest complete checkpoint in run.output_dir (a new
    run if there is none); or the path of a checkpoint (.../checkpoints/step-N) or of a run
    directory (its newest complete checkpoint)."""
    allow_changes: list[str] = Field(default_factory=list)
    """Config keys that may differ from the checkpoint's when resuming, e.g. [run.num_epochs]; any
    other change of what the run means (batch, optimizer, model, data, seed...) is refused."""


class Config(_Section):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    batch: BatchConfig = BatchConfig()
    optim: OptimConfig = OptimConfig()
    task: TaskConfig = ClassificationTaskConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    def to_yaml(self) -> str:
        """The resolved configuration, as written into the run directory."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``; users write 1e-4)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(source, f"malformed YAML{where}: {problem}") from None


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(override, "expected key=value (e.g. optim.lr=0.1)")
    *parents, leaf = key.split(".")
    node = raw
    for depth, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(".".join(parents[: depth + 1]), "is a value, not a section")
    node[leaf] = _parse_yaml(text, key) if text else None


def _sections() -> list[tuple[str, type[BaseModel]]]:
    """(section name, schema) pairs; the task section once per task."""
    pairs = [
        (name, field.annotation) for name, field in Config.model_fields.items() if name != "task"
    ]
    return pairs + [("task", cls) for cls in TASK_CONFIGS]


def _known_keys() -> list[str]:
    return sorted(
        {f"{section}.{name}" for section, model in _sections() for name in model.model_fields}
    )


def _describe(error: dict) -> ConfigError:
    loc = [str(part) for part in error["loc"]]
    # A tagged union puts the tag into the location (task.classification.x): drop it.
    if loc[:1] == ["task"] and len(loc) > 1 and error["type"] != "union_tag_invalid":
        loc = [loc[0], *loc[2:]]
    key = ".".join(loc) or "config"
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, _known_keys(), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        return ConfigError(key, f"unknown key{hint}")
    if error["type"] == "union_tag_invalid":
        known = ", ".join(cls.model_fields["name"].default for cls in TASK_CONFIGS)
        return ConfigError("task.name", f"unknown task {error['input']['name']!r} (known: {known})")
    message = error["msg"][0].lower() + error["msg"][1:]
    got = repr(error["input"])
    got = got if len(got) <= 60 else got[:57] + "..."
    return ConfigError(key, f"{message} (got {got})")


def _validate(raw: dict) -> Config:
    try:
        config = Config.model_validate(raw)
    except ValidationError as error:
        raise _describe(error.errors()[0]) from None
    _check_consistency(config)
    return config


def _check_consistency(config: Config) -> None:
    """Checks across fields: a setting that would be silently ignored is refused."""
    batch, optim = config.batch, config.optim
    if batch.global_batch_size % batch.micro_batch_size:
        raise ConfigError(
            "batch.global_batch_size",
            f"{batch.global_batch_size} is not a multiple of batch.micro_batch_size "
            f"({batch.micro_batch_size})",
        )
    for key in config.checkpoint.allow_changes:
        if key not in _known_keys():
            close = difflib.get_close_matches(key, _known_keys(), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError("checkpoint.allow_changes", f"unknown key {key!r}{hint}")
    if optim.warmup_epochs and optim.schedule != "warmup_cosine":
        raise ConfigError(
            "optim.warmup_epochs",
            f"only the warmup_cosine schedule warms up, not {optim.schedule!r}",
        )
    if optim.name == "tvlars_official":
        defaults = OptimConfig()
        for key in ("alpha", "gamma_min"):
            if getattr(optim, key) != getattr(defaults, key):
                raise ConfigError(
                    f"optim.{key}",
                    "tvlars_official fixes phi_t = 1 / (0.1 + exp(lmbda (t + 1))); "
                    f"leave {key} at {getattr(defaults, key)}",
                )


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``path`` (YAML), apply ``key=value`` overrides in order, validate; raise ConfigError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError("--config", f"cannot read {str(path)!r}: {error.strerror}") from None
    raw = _parse_yaml(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(str(path), f"the top level must be a mapping, not {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override)
    return _validate(raw)


def reference_markdown() -> str:
    """Markdown table of every field: key, type, default, meaning (for the README)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for section, model in _sections():
        for name, field in model.model_fields.items():
            annotation = str(field.annotation).replace("typing.", "")
            annotation = re.sub(r"<class '(\w+)'>", r"\1", annotation).replace("|", "\\|")
            default = field.get_default(call_default_factory=True)
            meaning = " ".join((field.description or "").split()).replace("|", "\\|")
            rows.append(f"| `{section}.{name}` | {annotation} | `{default!r}` | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(reference_markdown() + "\n")
