"""Export a trained model from a checkpoint: one ``model.safetensors`` that timm, torch and the Hub read.

``export_checkpoint(<run>/checkpoints/step-N)`` (or ``python -m tvlars_scale.export RUN_OR_CHECKPOINT
[--out DIR]``) writes ``<run>/export/``:

``model.safetensors``
    the model's ``state_dict`` (parameters and buffers: BatchNorm statistics), tensor for tensor
    what the checkpoint's ``model.pt`` holds, contiguous, no two tensors sharing memory.
``model_ema.safetensors`` (runs with ``run.ema`` only)
    the same tensors from the checkpoint's moving average of the weights (``model_ema.pt``); it
    loads into the same model (``model.json``'s ``"ema_weights"`` names it).
``model.json``
    what it is: timm model name, task, step, classes, input size and channels, the normalisation
    it was trained with (when known), whether it has the CIFAR stem, the keyword arguments and
    ``pretrained_cfg`` block timm needs to rebuild it, and the resolved run config.
``config.json`` (only for architectures that ``timm.create_model`` rebuilds by itself)
    timm's Hub config: the directory loads with ``timm.create_model("local-dir:DIR",
    pretrained=True)``, and once uploaded as a Hub repository with ``"hf-hub:user/repo"``.

Loading it (``M`` = the ``model.json`` dict, ``D`` = the export directory)::

    from tvlars_scale.export import load_exported
    model = load_exported(D)                       # any export; eval mode

    # timm and torch only (any export; digits_cnn needs ``import tvlars_scale.models`` first):
    model = timm.create_model(M["model"], **M["timm_kwargs"])
    if M["cifar_stem"]:  # 3x3 stride-1 stem conv, no max-pool (what tvlars_scale trains <= 64 px)
        model.conv1 = torch.nn.Conv2d(M["in_chans"], model.bn1.num_features, 3, padding=1, bias=False)
        model.maxpool = torch.nn.Identity()
    timm.models.load_checkpoint(model, f"{D}/model.safetensors")  # strict

    # when M["timm_pretrained"] is true (no CIFAR stem, a timm registry model):
    model = timm.create_model(M["model"], pretrained=True, **M["timm_kwargs"],
                              pretrained_cfg_overlay=dict(M["pretrained_cfg"], file=f"{D}/model.safetensors"))

``timm.create_model(..., pretrained=True)`` alone cannot rebuild a CIFAR-stem ResNet (no timm
option makes a single 3x3 stride-1 stem without max-pool; it fails on ``conv1.weight``'s shape), and
``digits_cnn`` has no pretrained entry: for those the first two recipes are the ones to use.

Inputs: images resized to ``input_size``, scaled to 0..1, then ``(x - mean) / std`` per channel with
``M["pretrained_cfg"]["mean"]`` / ``["std"]`` (the training split's statistics, what the training
augmentation used). They are known when the caller passes them (the trainer does), when the
checkpoint's manifest metadata holds ``data_mean`` / ``data_std``, or for data that needs no
download (``digits``; ``synthetic`` when small): they are recomputed from the training split.
Otherwise ``model.json`` says ``"normalisation": null`` and the block has no mean/std.

Barlow Twins: the checkpoint holds ``backbone.*`` and ``projector.*``. What is shipped is the
backbone alone, as the timm model with no classifier (``num_classes=0``: it returns pooled
features, what the linear evaluation trains on); the projector only serves the pretraining loss and
is dropped (``model.json``: ``"exported": "backbone"``, ``"dropped": "projector"``).

The export is written into a temporary directory beside ``out_dir`` and renamed into place, so
``out_dir`` is a whole export or absent (an earlier export it replaces is swapped out only once the
new one is complete). An existing ``out_dir`` that is not an export is never replaced. A missing or
unreadable ``model.pt`` / ``config.yaml``, a file whose size differs from the checkpoint manifest,
or weights that do not fit the model ``config.yaml`` describes raise :class:`ExportError` naming the
file, before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from timm.models import PretrainedCfg, get_pretrained_cfg
from timm.models.resnet import ResNet
from torch import Tensor, nn

from tvlars_scale.checkpoint.checkpointer import CONFIG_FILE, MODEL_EMA_FILE, MODEL_FILE
from tvlars_scale.checkpoint.directory import (
    CHECKPOINTS_DIR,
    MANIFEST,
    complete_checkpoints,
    fsync_path,
    is_temporary,
    replace_directory,
    step_of_name,
    write_durably,
)
from tvlars_scale.config import Config, ConfigError, load_config
from tvlars_scale.data import DATASETS, DataError, load_image_data
from tvlars_scale.models import CIFAR_STEM_MAX_SIZE, ModelError, build_model, use_cifar_stem

__all__ = [
    "EMA_WEIGHTS_FILE",
    "EXPORT_DIR",
    "FORMAT",
    "HUB_CONFIG_FILE",
    "META_FILE",
    "WEIGHTS_FILE",
    "ExportError",
    "export_checkpoint",
    "load_exported",
    "main",
    "resolve_checkpoint",
]

EXPORT_DIR = "export"
WEIGHTS_FILE = "model.safetensors"
EMA_WEIGHTS_FILE = "model_ema.safetensors"
META_FILE = "model.json"
HUB_CONFIG_FILE = "config.json"
FORMAT = "tvlars_scale.export/1"
EXPORT_FILES = frozenset({WEIGHTS_FILE, EMA_WEIGHTS_FILE, META_FILE, HUB_CONFIG_FILE})
# Recompute the synthetic dataset's statistics only up to this many uint8 training bytes.
SYNTHETIC_STATS_MAX_BYTES = 64 << 20
_EXPORTABLE_TASKS = ("classification", "barlow_twins")


class ExportError(ValueError):
    """A checkpoint cannot be exported as asked; the message is one line naming the file."""


# --- which checkpoint ----------------------------------------------------------------------------
def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory ``path`` names: itself for a checkpoint, the newest COMPLETE one
    of a run directory (or of its ``checkpoints/`` directory). Torn ``.tmp-*`` ones are refused."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} does not exist")
    if not path.is_dir():
        raise ExportError(
            f"{path} is not a directory (give a run directory or .../checkpoints/step-N)"
        )
    _refuse_temporary(path)
    if (path / CHECKPOINTS_DIR).is_dir():
        root = path / CHECKPOINTS_DIR
    elif path.name == CHECKPOINTS_DIR:
        root = path
    elif step_of_name(path.name) is not None or (path / MODEL_FILE).exists():
        return path
    else:
        raise ExportError(
            f"{path} is neither a checkpoint (no {MODEL_FILE}) nor a run directory "
            f"(no {CHECKPOINTS_DIR}/)"
        )
    complete = complete_checkpoints(root)
    if not complete:
        raise ExportError(
            f"{root} holds no complete checkpoint (torn or temporary ones are never exported)"
        )
    return complete[-1].path


def _refuse_temporary(path: Path) -> None:
    if is_temporary(path.name):
        raise ExportError(f"{path} is a temporary checkpoint (torn by a crash or being written)")


def _default_out_dir(checkpoint: Path) -> Path:
    """``<run>/export`` for ``<run>/checkpoints/step-N``; beside the checkpoint otherwise."""
    parent = checkpoint.resolve().parent
    run = parent.parent if parent.name == CHECKPOINTS_DIR else parent
    return run / EXPORT_DIR


# --- reading the checkpoint ----------------------------------------------------------------------
def _read_manifest(checkpoint: Path) -> dict | None:
    path = checkpoint / MANIFEST
    if not path.exists():
        return None  # a checkpoint copied without its manifest: the files alone are checked
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' table")
    except (OSError, ValueError, AttributeError) as error:
        raise ExportError(f"{path}: cannot be read ({_one_line(error)})") from None
    return manifest


def _check_size(path: Path, manifest: dict | None) -> None:
    if not path.is_file():
        raise ExportError(f"{path}: missing (a checkpoint holds {path.name}, written by rank 0)")
    expected = (manifest or {}).get("files", {}).get(path.name)
    actual = path.stat().st_size
    if expected is not None and actual != expected:
        raise ExportError(
            f"{path}: {actual} bytes but {MANIFEST} records {expected}: the file was truncated or "
            "changed after the save"
        )


def _load_state(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a torn or foreign file fails in many ways (zip, pickle, EOF...)
        raise ExportError(f"{path}: cannot be read ({_one_line(error)})") from None
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())
    ):
        raise ExportError(f"{path}: not a model state_dict (a non-empty dict of name -> tensor)")
    return state


def _load_run_config(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as error:
        raise ExportError(f"{path}: not a valid run config: {error.key}: {error.problem}") from None


def _step_of(checkpoint: Path, manifest: dict | None) -> int | None:
    if manifest is not None and isinstance(manifest.get("step"), int):
        return manifest["step"]
    return step_of_name(checkpoint.name)


# --- what the weights are ------------------------------------------------------------------------
def _reference_model(
    config: Config, num_classes: int, in_chans: int, image_size: int, headless: bool
) -> nn.Module:
    """The network ``config`` describes, on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        model = build_model(
            config.model.name,
            max(num_classes, 1),
            in_chans=in_chans,
            image_size=image_size,
            cifar_stem=config.model.cifar_stem,
            init="timm",
        )
        if headless:
            model.reset_classifier(0)
    return model


def classifier_name(model: nn.Module) -> str | None:
    get_classifier = getattr(model, "get_classifier", None)
    classifier = get_classifier() if get_classifier is not None else None
    if not isinstance(classifier, nn.Linear):
        return None
    return next((n for n, m in model.named_modules() if m is classifier), None)


def _check_fits(weights: dict[str, Tensor], model: nn.Module, where: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    problems = []
    if missing := sorted(expected.keys() - got.keys()):
        problems.append(f"missing {_few(missing)}")
    if unexpected := sorted(got.keys() - expected.keys()):
        problems.append(f"unexpected {_few(unexpected)}")
    if wrong := sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k]):
        problems.append(
            "shape of " + ", ".join(f"{k} {got[k]} != {expected[k]}" for k in wrong[:3])
        )
    if problems:
        raise ExportError(f"{where}: {'; '.join(problems)}")


def _few(names: list[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def _normalisation(
    config: Config, manifest: dict | None, mean, std
) -> tuple[list[float], list[float], str] | None:
    """(mean, std, where they come from) of the training split on the 0..1 scale, or None."""
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ExportError("pass both mean and std, or neither")
        return [float(m) for m in mean], [float(s) for s in std], "given by the caller"
    metadata = (manifest or {}).get("metadata") or {}
    if metadata.get("data_mean") is not None and metadata.get("data_std") is not None:
        mean, std = metadata["data_mean"], metadata["data_std"]
        return [float(m) for m in mean], [float(s) for s in std], f"{MANIFEST} metadata"
    data = config.data
    info = DATASETS[data.name]
    side = data.image_size or info.image_size
    small = data.num_synthetic * info.in_chans * side * side <= SYNTHETIC_STATS_MAX_BYTES
    if data.name == "digits" or (data.name == "synthetic" and small):
        try:
            loaded = load_image_data(
                data.name,
                num_synthetic=data.num_synthetic,
                image_size=data.image_size,
                seed=config.run.seed,
            )
        except DataError:
            return None
        return list(loaded.mean), list(loaded.std), "recomputed from the training split"
    return None


def _safetensors_ready(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors, each owning exactly its storage (safetensors refuses shared or
    partial storage: tied weights, views)."""
    ready, seen = {}, set()
    for name, tensor in weights.items():
        tensor = tensor.detach().cpu()
        storage = tensor.untyped_storage()
        owns_storage = (
            tensor.is_contiguous()
            and tensor.data_ptr() == storage.data_ptr()
            and tensor.numel() * tensor.element_size() == storage.nbytes()
        )
        if not owns_storage or (storage.nbytes() and storage.data_ptr() in seen):
            tensor = tensor.contiguous().clone()
        if tensor.numel():
            seen.add(tensor.untyped_storage().data_ptr())
        ready[name] = tensor
    return ready


def _describe(
    checkpoint: Path,
    config: Config,
    state: dict[str, Tensor],
    manifest: dict | None,
    mean,
    std,
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any] | None]:
    """(the tensors to ship, model.json, timm's Hub config.json or None)."""
    model_path = checkpoint / MODEL_FILE
    task = config.task.name
    if task not in _EXPORTABLE_TASKS:
        raise ExportError(f"{checkpoint / CONFIG_FILE}: task {task!r} has no export")
    info = DATASETS[config.data.name]
    in_chans, image_size = info.in_chans, config.data.image_size or info.image_size
    headless = task == "barlow_twins"
    extra: dict[str, Any] = {"exported": "classifier"}
    if headless:
        weights = {
            k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
        }
        others = sorted(k for k in state if not k.startswith(("backbone.", "projector.")))
        if not weights or others:
            raise ExportError(
                f"{model_path}: not a Barlow Twins model (backbone.* and projector.* tensors)"
                + (f": unexpected {_few(others)}" if others else "")
            )
        extra = {"exported": "backbone", "dropped": "projector"}
    else:
        weights = state
    try:
        model = _reference_model(config, info.num_classes, in_chans, image_size, headless)
        classifier = None if headless else classifier_name(model)
        saved = weights.get(f"{classifier}.weight") if classifier else None
        if saved is not None and saved.ndim == 2 and saved.shape[0] != info.num_classes:
            # A local data.path subset with fewer classes: the weights say how many.
            model = _reference_model(config, saved.shape[0], in_chans, image_size, headless)
    except ModelError as error:
        raise ExportError(f"{checkpoint / CONFIG_FILE}: {error}") from None
    _check_fits(
        weights, model, f"{model_path} does not fit {config.model.name!r} as config.yaml builds it"
    )

    name = config.model.name
    num_classes = 0 if headless else int(model.num_classes)
    registry_cfg = get_pretrained_cfg(name)
    fixed_size = bool(registry_cfg is not None and registry_cfg.fixed_input_size)
    cifar_stem = config.model.cifar_stem
    if cifar_stem is None:
        cifar_stem = isinstance(model, ResNet) and image_size <= CIFAR_STEM_MAX_SIZE
    timm_pretrained = registry_cfg is not None and not cifar_stem
    timm_kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
    if fixed_size:
        timm_kwargs["img_size"] = image_size
    stats = _normalisation(config, manifest, mean, std)
    # Overlaid on the registry's pretrained_cfg: every ImageNet default that would be wrong here
    # is overwritten (test-time size and crop, pool size, labels).
    pretrained_cfg: dict[str, Any] = {
        "architecture": name,
        "num_classes": num_classes,
        "input_size": [in_chans, image_size, image_size],
        "fixed_input_size": fixed_size,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "test_input_size": None,
        "test_crop_pct": None,
        "pool_size": None,
        "test_pool_size": None,
        "label_offset": None,
        "label_names": None,
        "label_descriptions": None,
    }
    if stats is not None:
        pretrained_cfg["mean"], pretrained_cfg["std"] = stats[0], stats[1]
    known = {field.name for field in dataclasses.fields(PretrainedCfg)}
    assert known >= pretrained_cfg.keys(), sorted(pretrained_cfg.keys() - known)
    step = _step_of(checkpoint, manifest)
    metadata = (manifest or {}).get("metadata") or {}
    meta = {
        "format": FORMAT,
        "model": name,
        "task": task,
        **extra,
        "step": step,
        "epoch": metadata.get("epoch"),
        "num_samples": metadata.get("num_samples"),
        "checkpoint": str(checkpoint.resolve()),
        "dataset": config.data.name,
        "dataset_num_classes": info.num_classes,
        "num_classes": num_classes,
        "num_features": int(getattr(model, "num_features", 0)) or None,
        "in_chans": in_chans,
        "image_size": image_size,
        "input_size": [in_chans, image_size, image_size],
        "normalisation": None
        if stats is None
        else {"mean": stats[0], "std": stats[1], "source": stats[2], "scale": "0..1"},
        "cifar_stem": bool(cifar_stem),
        "timm_pretrained": timm_pretrained,
        "timm_kwargs": timm_kwargs,
        "pretrained_cfg": pretrained_cfg,
        "weights": WEIGHTS_FILE,
        "num_tensors": len(weights),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "config": config.model_dump(mode="json"),
    }
    hub_config = None
    if timm_pretrained:
        hub_cfg = {k: v for k, v in pretrained_cfg.items() if k != "architecture"}
        hub_config = {
            "architecture": name,
            "num_classes": num_classes,
            "num_features": meta["num_features"],
            "model_args": {k: v for k, v in timm_kwargs.items() if k != "num_classes"},
            "pretrained_cfg": hub_cfg,
        }
    return weights, meta, hub_config


# --- writing -------------------------------------------------------------------------------------
def _check_replaceable(out_dir: Path) -> None:
    """Only an empty directory or an earlier export is replaced, never anything else."""
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory: refusing to replace it")
    names = {p.name for p in out_dir.iterdir()}
    if not names:
        return
    try:
        earlier = json.loads((out_dir / META_FILE).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        earlier = None
    if earlier != FORMAT or not names <= EXPORT_FILES:
        raise ExportError(
            f"{out_dir} exists and is not an export ({', '.join(sorted(names)[:3])}...): "
            "refusing to replace it; choose another --out"
        )


def _publish(
    out_dir: Path,
    tensors: dict[str, Tensor],
    meta: dict,
    hub_config: dict | None,
    ema_tensors: dict[str, Tensor] | None = None,
) -> list[Path]:
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=parent))
    try:
        header = {"format": "pt", "model": meta["model"], "tvlars_scale": FORMAT}
        shipped = {
            WEIGHTS_FILE: tensors,
            **({EMA_WEIGHTS_FILE: ema_tensors} if ema_tensors else {}),
        }
        for name, content in shipped.items():
            safetensors.torch.save_file(content, str(staging / name), metadata=header)
            fsync_path(staging / name)
        files = {META_FILE: meta, **({HUB_CONFIG_FILE: hub_config} if hub_config else {})}
        for name, content in files.items():
            write_durably(staging / name, (json.dumps(content, indent=2) + "\n").encode())
        fsync_path(staging)
        replace_directory(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [*(out_dir / name for name in shipped), *(out_dir / name for name in files)]


def export_checkpoint(
    checkpoint_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    mean: tuple[float, ...] | list[float] | None = None,
    std: tuple[float, ...] | list[float] | None = None,
) -> Path:
    """Export checkpoint ``checkpoint_dir`` (``.../checkpoints/step-N``) into ``out_dir``.

    Args:
        checkpoint_dir: a checkpoint directory holding ``model.pt`` and ``config.yaml``.
        out_dir: default ``<run>/export`` (replaced if it holds an earlier export; anything else
            there is refused).
        mean, std: per-channel statistics of the training split on the 0..1 scale (the trainer's
            ``data.mean`` / ``data.std``); recorded so the model's inputs can be normalised as in
            training. Without them see the module docstring.

    Returns the export directory: ``model.safetensors``, ``model.json``, with a moving average
    ``model_ema.safetensors`` and, for models timm rebuilds by itself, ``config.json``. Raises :class:`ExportError` (one line naming the file)
    before writing anything when the checkpoint cannot be exported.
    """
    checkpoint = Path(checkpoint_dir)
    if not checkpoint.is_dir():
        raise ExportError(f"{checkpoint} is not a checkpoint directory")
    _refuse_temporary(checkpoint)
    manifest = _read_manifest(checkpoint)
    for name in (CONFIG_FILE, MODEL_FILE):
        _check_size(checkpoint / name, manifest)
    config = _load_run_config(checkpoint / CONFIG_FILE)
    state = _load_state(checkpoint / MODEL_FILE)
    weights, meta, hub_config = _describe(checkpoint, config, state, manifest, mean, std)
    ema_weights = None
    if (checkpoint / MODEL_EMA_FILE).is_file():  # a run with run.ema: its average beside
        _check_size(checkpoint / MODEL_EMA_FILE, manifest)
        ema_state = _load_state(checkpoint / MODEL_EMA_FILE)
        ema_weights = _safetensors_ready(
            _describe(checkpoint, config, ema_state, manifest, mean, std)[0]
        )
        meta["ema_weights"] = EMA_WEIGHTS_FILE
    out = Path(out_dir) if out_dir is not None else _default_out_dir(checkpoint)
    if out.exists():
        _check_replaceable(out)
    _publish(out, _safetensors_ready(weights), meta, hub_config, ema_weights)
    return out


# --- reading an export back ----------------------------------------------------------------------
def load_exported(export_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The exported model, rebuilt with timm and loaded strictly from ``model.safetensors``, in
    eval mode (the recipe of the module docstring)."""
    export_dir = Path(export_dir)
    meta = json.loads((export_dir / META_FILE).read_text())
    model = timm.create_model(meta["model"], pretrained=False, **meta["timm_kwargs"])
    if meta["cifar_stem"]:
        use_cifar_stem(model)
    timm.models.load_checkpoint(model, str(export_dir / WEIGHTS_FILE), strict=True)
    return model.to(device).eval()


# --- command line --------------------------------------------------------------------------------
class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message over two lines; we print one
        raise ExportError(message)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """``python -m tvlars_scale.export CHECKPOINT [--out DIR]``: 0 done, 2 bad input, 1 I/O error."""
    parser = _ArgumentParser(
        prog="python -m tvlars_scale.export",
        description="Export a checkpoint's model to model.safetensors + model.json.",
    )
    parser.add_argument(
        "checkpoint", help="a checkpoint (.../checkpoints/step-N) or a run directory (its newest)"
    )
    parser.add_argument("--out", default=None, help="export directory (default <run>/export)")
    try:
        args = parser.parse_args(argv)
        out = export_checkpoint(resolve_checkpoint(args.checkpoint), args.out)
    except ExportError as error:
        print(f"export error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"export error: cannot write the export: {_one_line(error)}", file=sys.stderr)
        return 1
    for name in (WEIGHTS_FILE, EMA_WEIGHTS_FILE, META_FILE, HUB_CONFIG_FILE):
        if (out / name).exists():
            print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
