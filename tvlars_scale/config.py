"""The run configuration: a typed schema, YAML files, dotted command-line overrides.

A run is described by one YAML file plus ``key=value`` overrides, e.g.::

    accelerate launch -m tvlars_scale.train --config configs/digits.yaml optim.lr=3 run.seed=1

Every field below carries a docstring (it becomes the field's ``description`` and the generated
reference: ``python -m tvlars_scale.config``). Validation happens at load time, strictly (a string
is not a number, unknown keys are refused); every user error becomes a :class:`ConfigError` that
the command line prints as ONE line, ``config error: <dotted.key>: <problem>``, before exiting
with status 2 and before anything is written.

The ``optim``, ``schedule`` and ``task`` sections are unions keyed by their ``name``: each class
holds exactly what that optimizer (its constructor's arguments), schedule or task takes, so a
setting of another one is refused, naming who takes it. ``optim.name=lars`` on the command line
over a file that configures TVLARS switches the whole section: the file's settings LARS shares
(``lr``, ``weight_decay``...) are kept, the others dropped. Extending: append the new class to
``OPTIM_CONFIGS`` / ``SCHEDULE_CONFIGS`` / ``TASK_CONFIGS`` and let :mod:`tvlars_scale.build` build it.

Checks that need the world size or the dataset (batch divisibility over ranks, a global batch
larger than the training set) run in the build phase (:mod:`tvlars_scale.build`) and raise the
same :class:`ConfigError`.
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
    "EMAConfig",
    "LAMBConfig",
    "LARSConfig",
    "ModelConfig",
    "OptimConfig",
    "ProfileConfig",
    "RunConfig",
    "SGDConfig",
    "ScheduleConfig",
    "TVLARSConfig",
    "TVLARSOfficialConfig",
    "config_from_dict",
    "load_config",
    "reference_markdown",
    "resolve_config",
    "shipped_configs",
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


class ProfileConfig(_Section):
    start_step: int = Field(10, ge=0)
    """First optimizer step profiled (counted like the run's steps; after warm-up and compile)."""
    num_steps: int = Field(3, ge=1)
    """Optimizer steps in the trace."""


class EMAConfig(_Section):
    decay: float = Field(gt=0, lt=1)
    """Decay per update: ema = decay * ema + (1 - decay) * weights (timm's ModelEmaV3 lerp)."""
    warmup_steps: int = Field(0, ge=0)
    """Updates over which the decay ramps up to decay (timm ModelEmaV3's warm-up, its gamma
    chosen so the ramp reaches decay here); 0: decay from the first update."""
    every_steps: int = Field(1, ge=1)
    """Update the average every this many optimizer steps."""


class RunConfig(_Section):
    output_dir: str = "runs/default"
    """Run directory: resolved config, tracker logs and metrics.json are written here."""
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
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"]
    )
    """Experiment trackers (Accelerate's) that get every logged scalar and the resolved config as
    hyper-parameters ([]: none): tensorboard writes to output_dir/tensorboard; wandb to
    output_dir/wandb (WANDB_MODE from the environment, e.g. offline; project WANDB_PROJECT or
    tvlars_scale; the run named after output_dir); mlflow to MLFLOW_TRACKING_URI, else
    sqlite:///output_dir/mlflow.db (experiment tvlars_scale). wandb and mlflow are optional
    packages: pip install wandb mlflow."""
    progress_bar: bool = True
    """Show a tqdm progress bar (main process only)."""
    max_nonfinite_steps: int = Field(5, ge=1)
    """An optimizer step whose gradients hold NaN/Inf is skipped (parameters and optimizer state
    unchanged); after this many in a row the run stops with exit status 3, its last checkpoint
    intact. Under fp16 the loss scaler's overflow skips count too."""
    collective_timeout_s: float | None = Field(None, gt=0)
    """Seconds a rank waits in one collective (all-reduce, barrier...) before it raises and the
    launcher ends the job: a hung or lost rank then costs this long, not the whole allocation.
    Given to the process group (torch.distributed / DeepSpeed init); null: torch's default (NCCL
    10 min, gloo 30 min). Keep it above the longest checkpoint save and evaluation."""
    compile: bool = False
    """torch.compile the model (in place: checkpoints and exports keep the eager names); graph
    breaks are counted and printed. Costs compile time at the first steps (minutes for ResNet-50)."""
    compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = "default"
    """torch.compile's mode (run.compile)."""
    compile_regional: bool = False
    """run.compile per repeated block (one graph per block shape: meant for models of many
    identical blocks, such as transformers) where the model has such blocks; false: the whole
    model as one graph. For ResNet-50 whole-model is faster (benchmarks/levers.py: regional steps
    took 1.25-1.33x as long on the CPU, every block boundary a layout change, for no shorter
    compile)."""
    ema: EMAConfig | None = None
    """{decay: 0.9998, warmup_steps: 0, every_steps: 1}: an fp32 exponential moving average of the
    weights (and floating-point buffers), sharded like the master weights, checkpointed per layer,
    evaluated beside them (ema_* metrics) and exported as export/model_ema.safetensors; null: none.
    decay (required, in (0, 1)) applies per update; warmup_steps ramps it up over that many
    updates (timm ModelEmaV3's warm-up; 0: none); every_steps: update every this many optimizer
    steps. On the command line: run.ema.decay=0.9998."""
    profile: ProfileConfig | None = None
    """{start_step: 10, num_steps: 3}: a torch.profiler trace of these optimizer steps, written to
    output_dir/profile/ (TensorBoard's profiler plugin, Perfetto or chrome://tracing open it);
    null: no profiling."""


class DataConfig(_Section):
    name: Literal[
        "digits", "fashion-mnist", "cifar10", "tiny-imagenet", "imagenet", "synthetic"
    ] = "digits"
    """Dataset: digits (scikit-learn's bundled 8x8 digits, no download), fashion-mnist (a
    directory of its four IDX files, e.g. from launch/get_fashion_mnist.sh, or the hub), cifar10,
    tiny-imagenet, imagenet (ImageNet-1k: Hugging Face datasets or an image-folder tree, hub id or local path) or
    synthetic (random images, for benchmarks)."""
    path: str | None = None
    """Hugging Face hub id or local directory (fashion-mnist, cifar10, tiny-imagenet, imagenet);
    null: the default hub id. Streaming also reads an image-folder tree ROOT/train/<class>/* + ROOT/val/<class>/*
    (or validation / valid / test), a save_to_disk directory or a folder of Parquet files."""
    storage: Literal["auto", "memory", "stream"] = "auto"
    """memory: decode the whole dataset once into uint8 tensors (small data); stream: read and
    decode each sample from disk in DataLoader workers (data larger than memory); auto: stream for
    imagenet, memory for the others (digits and synthetic are always in memory)."""
    num_synthetic: int = Field(4096, ge=1)
    """Number of training images of the synthetic dataset."""
    image_size: int | None = Field(None, ge=1)
    """Image side in pixels (in memory: resize to it; streaming: the side of the training and
    evaluation crops); null: the dataset's native size (224 for imagenet)."""
    crop_padding: int = Field(4, ge=0)
    """Training augmentation in memory: zero-pad by this many pixels, then random-crop back (0: no
    crop). Streaming uses a random-resized crop instead (data.crop_scale)."""
    flip: bool = True
    """Training augmentation: random horizontal flip (switch off for digits)."""
    crop_scale: list[float] = Field(default_factory=lambda: [0.08, 1.0], min_length=2, max_length=2)
    """Streaming: area range of the random-resized crop, as a fraction of the image (aspect ratio
    3/4..4/3, as torchvision's RandomResizedCrop)."""
    eval_resize: int | None = Field(None, ge=1)
    """Streaming evaluation: resize the shorter side to this, then centre-crop image_size; null:
    image_size / 0.875 (256 for 224)."""
    num_workers: int = Field(8, ge=0)
    """Streaming: DataLoader worker processes per rank that read and decode images (0: in the
    training process)."""
    prefetch_factor: int = Field(2, ge=1)
    """Streaming: micro batches each worker decodes ahead."""
    bad_images: Literal["error", "skip"] = "error"
    """Streaming: a truncated or unreadable image stops the run with an error naming the file
    (error), or is replaced by the next readable sample of the dataset and counted (skip)."""
    decoder: Literal["cpu", "dali"] = "cpu"
    """Streaming: who decodes, crops, resizes and flips the JPEGs: cpu (libjpeg-turbo in the
    DataLoader workers) or dali (NVIDIA DALI: nvJPEG on the GPU, DALI's CPU decoder without one;
    pip install 'tvlars_scale[dali]'). The same crops, flips, order and resume either way; the
    pixels differ by the decoders' rounding (README, "GPU JPEG decode")."""
    index: str | None = None
    """Streaming an image-folder tree: its index file (the listing of the tree, written once by
    rank 0 or ahead of the job by `tvlars-index ROOT --out FILE`, memory-mapped by every rank;
    rebuilt when the tree changed); null: ROOT/tvlars-index.arrow. Must be readable by every rank."""
    augment: Literal["none", "randaugment", "trivialaugment"] = "none"
    """Training augmentation per sample, torchvision.transforms.v2's RandAugment (2 ops, magnitude
    9) or TrivialAugmentWide, drawn from the sample's own (seed, epoch, index) generator (so a
    resume draws the same): streaming after the crop, in the decode workers; in memory as the
    loader gathers the batch, before the on-device crop and flip (a CPU loop; small data)."""
    mixup_alpha: float = Field(0.0, ge=0)
    """Mixup (timm's semantics, per micro batch): the batch mixed with itself reversed by a weight
    drawn from Beta(alpha, alpha), the targets alike (with task.label_smoothing folded in), a
    soft-target cross-entropy; 0: off. timm's ImageNet recipes use 0.1-0.8."""
    cutmix_alpha: float = Field(0.0, ge=0)
    """CutMix (timm's semantics, per micro batch): a box of the reversed batch pasted in, its area
    from Beta(alpha, alpha) (the weight corrected for clipping at the border); 0: off."""
    mixup_prob: float = Field(1.0, ge=0, le=1)
    """Probability that a micro batch is mixed at all (Mixup or CutMix), as timm's mixup_prob."""
    mixup_switch_prob: float = Field(0.5, ge=0, le=1)
    """With both Mixup and CutMix on: probability of CutMix for a mixed micro batch."""

    def mixes(self) -> bool:
        """Whether Mixup or CutMix is on."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def streams(self) -> bool:
        """Whether this dataset is read from disk while training (data.storage resolved)."""
        if self.storage == "auto":
            return self.name == "imagenet"
        return self.storage == "stream"


STREAMING_KEYS = (
    "crop_scale",
    "eval_resize",
    "num_workers",
    "prefetch_factor",
    "bad_images",
    "decoder",
    "index",
)
"""DataConfig keys that only the streaming path reads."""


class ModelConfig(_Section):
    name: str = "resnet18"
    """Any timm model name, or one of tvlars_scale.models' own (e.g. resnet18 / resnet34)."""
    cifar_stem: bool | None = None
    """ResNet stem for small images (3x3 conv, no max-pool); null: on when images are <= 64 px."""
    sync_batchnorm: bool = False
    """Convert BatchNorm layers to SyncBatchNorm (statistics over all ranks)."""
    init: Literal["kaiming_uniform", "timm"] = "kaiming_uniform"
    """Weight init: Kaiming-uniform as in the paper, or timm's own."""
    channels_last: bool = False
    """NHWC (channels_last) inputs and activations, and weights where the engine keeps their layout
    (one process, DDP; ZeRO and FSDP2 keep them contiguous): faster convolutions on tensor-core
    GPUs (and most CPUs); the results differ from NCHW by float rounding only."""
    init_from: str | None = None
    """Start from existing weights instead of a fresh init: a checkpoint (.../checkpoints/step-N, or
    a run directory: its newest complete one), an export directory (tvlars-export; a Barlow Twins
    export is its backbone) or a weights file (.safetensors / .pth / .bin, e.g. timm's pretrained
    weights copied to an offline cluster). Every tensor of the model but the classifier must be in
    it with its shape; a classifier it lacks or of another class count is freshly initialised (a
    new head). What was and was not loaded is printed once. A resume loads its checkpoint instead."""


class BatchConfig(_Section):
    global_batch_size: int = Field(512, ge=1)
    """Samples per optimizer step over all ranks (the effective batch)."""
    micro_batch_size: int = Field(64, ge=1)
    """The most samples a rank takes per forward/backward; grad_accum_steps is derived from the two
    sizes and the world size (ceil(global / (micro x world))), and where the global batch does not
    divide, micro batches differ by one sample, each weighted by its count."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """Scale optim.lr by global/base batch (linear) or its square root (sqrt, as in the paper)."""
    base_batch_size: int = Field(256, ge=1)
    """Batch size at which optim.lr is given when lr_scaling is not none."""


class _OptimBase(_Section):
    """Fields every optimizer takes (and the step's gradient clipping); each subclass adds exactly
    its constructor's own arguments."""

    lr: float = Field(1.0, gt=0)
    """Target learning rate (at batch.base_batch_size when batch.lr_scaling is not none)."""
    weight_decay: float = Field(5e-4, ge=0)
    """L2 weight decay (not applied to 1-D parameters and biases)."""
    grad_clip: float | None = Field(None, ge=0)
    """Clip the gradients to this global L2 norm over the whole model before the step (torch's
    clip_grad_norm_; under DeepSpeed its gradient_clipping); null or 0: no clipping."""


class TVLARSConfig(_OptimBase):
    name: Literal["tvlars"] = "tvlars"
    """TVLARS as in the paper (Algorithm 1): tvlars_scale.optim.TVLARS(variant="paper")."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """Momentum mu of the m-recursion."""
    eta: float = Field(1e-3, gt=0)
    """Trust coefficient of the layer-wise trust ratio."""
    lmbda: float = Field(1e-4, ge=0)
    """Decay steepness lambda of phi_t (per optimizer step)."""
    alpha: float = Field(1.0, gt=0)
    """alpha in phi_t = 1 / (alpha + exp(lmbda (t - d))) + gamma_min."""
    gamma_min: float = Field(0.0, ge=0)
    """Floor added to phi_t."""
    delay_epochs: float = Field(10.0, ge=0)
    """Delay d in epochs, passed as delay_steps (optimizer steps) from the real steps per epoch."""
    exclude_1d: bool = True
    """1-D parameters (biases, norm layers) get no weight decay and trust ratio 1."""


class TVLARSOfficialConfig(_OptimBase):
    name: Literal["tvlars_official"] = "tvlars_official"
    """TVLARS as in the authors' code that runs (KhoiDOO/tvlars 10bcfd2): TVLARS(variant=
    "official"): plain LARS for delay_epochs, then the ratio times 1 / (0.1 + exp(lmbda (t + 1)))
    with t counted from the start of training; no alpha or gamma_min."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """Heavy-ball momentum."""
    eta: float = Field(1e-3, gt=0)
    """Trust coefficient of the layer-wise trust ratio."""
    lmbda: float = Field(1e-4, ge=0)
    """Decay steepness lambda of phi_t (per optimizer step)."""
    delay_epochs: float = Field(10.0, ge=0)
    """Epochs of plain LARS before phi_t applies (the code's epoch_delay_cnt = 10), passed as
    delay_steps from the real steps per epoch; 0: the no-delay form (KhoiDOO/tvlars 89c3291)."""
    exclude_1d: bool = True
    """1-D parameters (biases, norm layers) get no weight decay and step at the raw lr."""


class LARSConfig(_OptimBase):
    name: Literal["lars"] = "lars"
    """LARS as in Lightning Flash: tvlars_scale.optim.LARS."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """Momentum."""
    eta: float = Field(1e-3, gt=0)
    """Trust coefficient of the layer-wise trust ratio."""
    eps: float = Field(1e-8, ge=0)
    """Added to the trust ratio's denominator."""
    nesterov: bool = False
    """Nesterov momentum."""
    exclude_1d: bool = True
    """1-D parameters (biases, norm layers) get no weight decay and trust ratio 1."""


class LAMBConfig(_OptimBase):
    name: Literal["lamb"] = "lamb"
    """LAMB as in pytorch-optimizer: tvlars_scale.optim.LAMB."""
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2)
    """Adam coefficients (beta1, beta2)."""
    eps: float = Field(1e-6, ge=0)
    """Adam's epsilon."""
    clamp_value: float = Field(10.0, ge=0)
    """The weight norm of the trust ratio is clamped to [0, clamp_value]."""
    exclude_1d: bool = True
    """1-D parameters (biases, norm layers) get no weight decay and trust ratio 1."""


class SGDConfig(_OptimBase):
    name: Literal["sgd"] = "sgd"
    """torch.optim.SGD (no layer-wise adaptation), for comparison."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """Momentum."""
    nesterov: bool = False
    """Nesterov momentum."""


class AdamWConfig(_OptimBase):
    name: Literal["adamw"] = "adamw"
    """torch.optim.AdamW (decoupled weight decay, no layer-wise adaptation), the baseline of Nado
    et al. 2021 (arXiv 2102.06356); give it warm-up + cosine with schedule.name: warmup_cosine."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate (Adam scale)."""
    weight_decay: float = Field(1e-2, ge=0)
    """Decoupled weight decay (w -= lr wd w; torch's default), not applied to 1-D parameters."""
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2)
    """Adam coefficients (beta1, beta2)."""
    eps: float = Field(1e-8, ge=0)
    """Adam's epsilon."""


class ConstantScheduleConfig(_Section):
    name: Literal["constant"] = "constant"
    """The LR stays at its peak (TVLARS: phi_t is the schedule)."""


class WarmupCosineScheduleConfig(_Section):
    name: Literal["warmup_cosine"] = "warmup_cosine"
    """Linear warm-up to the peak, then cosine: lr q + lr_min (1 - q), q = (1 + cos(pi t / T)) / 2."""
    warmup_epochs: float = Field(0.0, ge=0)
    """Warm-up length in epochs, converted to optimizer steps from the real steps per epoch."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Final LR as a fraction of the peak."""


class PolyScheduleConfig(_Section):
    name: Literal["poly"] = "poly"
    """Polynomial decay from the peak: lr_min + (lr - lr_min) (1 - t / T)^power; with a warm-up
    of W steps, linear from 0 to the peak first and t / T counted from W (MLPerf's ResNet-50)."""
    warmup_epochs: float = Field(0.0, ge=0)
    """Linear warm-up length in epochs, converted to optimizer steps (0: no warm-up, decay from
    step 0 as without this key)."""
    power: float = Field(2.0, gt=0)
    """Exponent of the decay."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Final LR as a fraction of the peak."""


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


def _union(variants: tuple[type[_Section], ...]) -> Any:
    """A section that is one of ``variants``, chosen by its ``name`` field (the first when omitted)."""
    default = variants[0].model_fields["name"].default

    def name_of(value: Any) -> str:
        if isinstance(value, dict):
            return value.get("name", default)
        return getattr(value, "name", default)

    tagged = tuple(Annotated[cls, Tag(cls.model_fields["name"].default)] for cls in variants)
    return Annotated[Union[tagged], Discriminator(name_of)]  # noqa: UP007


# Sections that are one of several classes keyed by `name`; a new optimizer, schedule or task
# appends its class (its `name` field's default is its tag; the first is the default).
OPTIM_CONFIGS: tuple[type[_Section], ...] = (
    TVLARSConfig,
    TVLARSOfficialConfig,
    LARSConfig,
    LAMBConfig,
    SGDConfig,
    AdamWConfig,
)
SCHEDULE_CONFIGS: tuple[type[_Section], ...] = (
    ConstantScheduleConfig,
    WarmupCosineScheduleConfig,
    PolyScheduleConfig,
)
TASK_CONFIGS: tuple[type[_Section], ...] = (ClassificationTaskConfig, BarlowTwinsTaskConfig)
UNIONS: dict[str, tuple[tuple[type[_Section], ...], str]] = {
    "optim": (OPTIM_CONFIGS, "optimizer"),
    "schedule": (SCHEDULE_CONFIGS, "schedule"),
    "task": (TASK_CONFIGS, "task"),
}
"""Section -> (its classes, what its name names)."""

OptimConfig = _union(OPTIM_CONFIGS)
ScheduleConfig = _union(SCHEDULE_CONFIGS)
TaskConfig = _union(TASK_CONFIGS)


class CheckpointConfig(_Section):
    every_steps: int = Field(0, ge=0)
    """Save a checkpoint every this many optimizer steps (0: only at the end of training and when a
    SIGTERM / SIGUSR1 asks the run to stop)."""
    keep_last: int = Field(3, ge=1)
    """Complete checkpoints kept in output_dir/checkpoints; older ones are deleted after a save."""
    save_at_end: bool = True
    """Save a checkpoint when training completes and export its model to output_dir/export
    (model.safetensors + model.json, see tvlars_scale.export)."""
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
    optim: OptimConfig = TVLARSConfig()
    schedule: ScheduleConfig = ConstantScheduleConfig()
    task: TaskConfig = ClassificationTaskConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    def to_yaml(self) -> str:
        """The resolved configuration, as written into the run directory."""
        sections = self.model_dump(mode="json")
        return yaml.safe_dump(
            {key: dict(_name_first(values)) for key, values in sections.items()}, sort_keys=False
        )


def _name_first(fields: dict) -> list:
    """A union section's items with its ``name`` first (the shared fields are declared before it)."""
    return sorted(fields.items(), key=lambda item: item[0] != "name")


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``; users write 1e-4) and
    only true / false as booleans, as YAML 1.2 does (1.1 also reads no / yes / on / off, so
    ``run.mixed_precision=no`` would be False)."""


_BOOL = "tag:yaml.org,2002:bool"
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
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
        if node.get(part) is None:  # a section that is off (null) is switched on by its key
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(".".join(parents[: depth + 1]), "is a value, not a section")
    node[leaf] = _parse_yaml(text, key) if text else None


def _sections() -> list[tuple[str, type[BaseModel]]]:
    """(section name, schema) pairs; a union section once per class, in field order."""
    pairs = []
    for name, field in Config.model_fields.items():
        variants = UNIONS[name][0] if name in UNIONS else (field.annotation,)
        pairs += [(name, cls) for cls in variants]
    return pairs


def _known_keys() -> list[str]:
    return sorted(
        {f"{section}.{name}" for section, model in _sections() for name in model.model_fields}
    )


def _variant_names(section: str) -> dict[str, type[_Section]]:
    return {cls.model_fields["name"].default: cls for cls in UNIONS[section][0]}


RETIRED_KEYS = {
    "run.tensorboard": "replaced by run.trackers (true: [tensorboard], the default; false: [])",
}
"""Keys older configs may hold -> what replaced them."""


def _describe(error: dict) -> ConfigError:
    # A list item's index is no key of its own: run.trackers.1 is reported as run.trackers.
    loc = [str(part) for part in error["loc"] if not isinstance(part, int)]
    union = loc[0] if loc and loc[0] in UNIONS else None
    if union and error["type"] == "union_tag_invalid":
        names = ", ".join(_variant_names(union))
        what = UNIONS[union][1]
        return ConfigError(
            f"{union}.name", f"unknown {what} {error['input']['name']!r} (known: {names})"
        )
    variant = None
    if union and len(loc) > 1:
        # A tagged union puts the tag into the location (optim.lars.lr): drop it.
        variant, loc = loc[1], [loc[0], *loc[2:]]
    key = ".".join(loc) or "config"
    if error["type"] == "extra_forbidden":
        if key in RETIRED_KEYS:
            return ConfigError(key, RETIRED_KEYS[key])
        owners = (
            [name for name, cls in _variant_names(union).items() if loc[-1] in cls.model_fields]
            if union
            else []
        )
        if owners:
            return ConfigError(
                key,
                f"unknown key for {union}.name={variant} (a setting of {', '.join(owners)})",
            )
        close = difflib.get_close_matches(key, _known_keys(), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        return ConfigError(key, f"unknown key{hint}")
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
    # Any global batch splits over any world size (batching.plan_batches: micro batches differing
    # by one sample, weighted): no divisibility to check here.
    _check_data(config)
    trackers = config.run.trackers
    for tracker in trackers:
        if trackers.count(tracker) > 1:
            raise ConfigError("run.trackers", f"lists {tracker} twice (got {trackers})")
    for key in config.checkpoint.allow_changes:
        if key not in _known_keys():
            close = difflib.get_close_matches(key, _known_keys(), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError("checkpoint.allow_changes", f"unknown key {key!r}{hint}")


def _differs_from_default(section: _Section, key: str) -> bool:
    # By value, not by "was it written": a resolved config.yaml (every key written) loads back.
    return getattr(section, key) != type(section).model_fields[key].get_default(
        call_default_factory=True
    )


def _check_data(config: Config) -> None:
    """A streaming-only key with in-memory data, or the reverse, would be silently ignored."""
    data = config.data
    if config.task.name != "classification":
        # Barlow Twins draws its own two views; linear evaluation's classifier sees raw features.
        for key in ("augment", "mixup_alpha", "cutmix_alpha"):
            if _differs_from_default(data, key):
                raise ConfigError(f"data.{key}", "is read by task classification only")
        if config.model.init_from is not None:
            raise ConfigError("model.init_from", "starts a classifier (task: classification)")
    if not data.mixes():
        for key in ("mixup_prob", "mixup_switch_prob"):
            if _differs_from_default(data, key):
                raise ConfigError(
                    f"data.{key}", "is read only with data.mixup_alpha or cutmix_alpha > 0"
                )
    if data.streams():
        if data.name in ("digits", "synthetic"):
            raise ConfigError("data.storage", f"{data.name} has no files to stream; use memory")
        if _differs_from_default(data, "crop_padding"):
            raise ConfigError(
                "data.crop_padding", "in-memory augmentation; streaming uses data.crop_scale"
            )
        low, high = data.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(
                "data.crop_scale", f"needs 0 < low <= high <= 1 (got {data.crop_scale})"
            )
        if data.decoder == "dali":
            # DALI decodes the boxes and flips only: the per-sample policies and Barlow Twins'
            # two views are drawn and cut by the CPU decode path.
            if config.task.name == "barlow_twins":
                raise ConfigError("data.decoder", "dali decodes one view: Barlow Twins needs cpu")
            if data.augment != "none":
                raise ConfigError(
                    "data.decoder", f"dali does not apply data.augment={data.augment}"
                )
            if not _dali_installed():
                raise ConfigError(
                    "data.decoder", "dali needs NVIDIA DALI (pip install 'tvlars_scale[dali]')"
                )
        return
    for key in STREAMING_KEYS:
        if _differs_from_default(data, key):
            raise ConfigError(f"data.{key}", "is read by streaming only (data.storage: stream)")


def _dali_installed() -> bool:
    try:
        import nvidia.dali  # noqa: F401  (about a second; only when data.decoder is dali)
    except ImportError:
        return False
    return True


def _switch_variants(raw: dict, overrides: list[str] | tuple[str, ...]) -> None:
    """``optim.name=lars`` on the command line over a file that says ``tvlars`` switches the whole
    section: the file's settings that LARS also takes (lr, weight_decay...) are kept, the TVLARS-only
    ones (lmbda...) dropped. Overrides are still checked strictly."""
    for section in UNIONS:
        chosen = [
            value
            for key, _, value in (o.partition("=") for o in overrides)
            if key == f"{section}.name"
        ]
        node = raw.get(section)
        if not chosen or not isinstance(node, dict):
            continue
        variants = _variant_names(section)
        new = variants.get(_parse_yaml(chosen[-1], f"{section}.name"))
        old = node.get("name", next(iter(variants)))
        if new is not None and new.model_fields["name"].default != old:
            raw[section] = {key: value for key, value in node.items() if key in new.model_fields}


SHIPPED_CONFIGS = Path(__file__).with_name("configs")
"""The experiment YAMLs installed with the package (a clone's ``configs/`` links here)."""


def shipped_configs() -> dict[str, str]:
    """Each YAML shipped in the package by name (a run's ``--config NAME``, or one of the paper's
    grids) -> its first comment line."""
    return {
        path.stem: next(
            (line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#")),
            "",
        )
        for path in sorted(SHIPPED_CONFIGS.glob("*.yaml"))
    }


def resolve_config(name_or_path: str | Path) -> Path:
    """The file ``--config`` names: a path is read as given; a bare name that is no file here
    (``digits``) is the config shipped under that name."""
    path = Path(name_or_path)
    if path.is_file() or len(path.parts) != 1 or path.suffix:
        return path
    shipped = SHIPPED_CONFIGS / f"{path}.yaml"
    if not shipped.is_file():
        raise ConfigError(
            "--config",
            f"no file {str(path)!r} and no shipped config of that name "
            f"(shipped: {', '.join(shipped_configs())})",
        )
    return shipped


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``path`` (YAML, or a shipped config's name: :func:`resolve_config`), apply
    ``key=value`` overrides in order, validate; raise ConfigError."""
    path = resolve_config(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError("--config", f"cannot read {str(path)!r}: {error.strerror}") from None
    raw = _parse_yaml(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(str(path), f"the top level must be a mapping, not {type(raw).__name__}")
    return config_from_dict(raw, overrides)


def config_from_dict(raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A config from its dict form (a run's resolved config as an export's model.json holds it),
    with ``key=value`` overrides applied in order; raise ConfigError."""
    _switch_variants(raw, overrides)
    for override in overrides:
        _apply_override(raw, override)
    return _validate(raw)


def reference_markdown() -> str:
    """Markdown table of every field: key, type, default, meaning (for the README).

    In a union section a field is listed once for all the classes that share it unchanged, its
    meaning prefixed with the names that take it when not all of them do."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    listed: dict[tuple, list[str]] = {}  # (key, type, default, meaning) -> names that take it
    for section, model in _sections():
        for name, field in _name_first(model.model_fields):
            annotation = str(field.annotation).replace("typing.", "")
            annotation = annotation.replace(f"{_Section.__module__}.", "")  # a nested section
            annotation = re.sub(r"<class '(\w+)'>", r"\1", annotation).replace("|", "\\|")
            default = field.get_default(call_default_factory=True)
            meaning = " ".join((field.description or "").split()).replace("|", "\\|")
            row = (f"{section}.{name}", annotation, repr(default), meaning)
            listed.setdefault(row, []).append(
                getattr(model.model_fields.get("name"), "default", "")
            )
    for (key, annotation, default, meaning), names in listed.items():
        section = key.split(".")[0]
        shared_by_some = section in UNIONS and len(names) < len(UNIONS[section][0])
        if shared_by_some and not key.endswith(".name"):
            meaning = f"({section}.name: {', '.join(names)}) {meaning}"
        rows.append(f"| `{key}` | {annotation} | `{default}` | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(reference_markdown() + "\n")
