"""``model.init_from``: start a run from existing weights instead of a fresh initialisation.

The source is a checkpoint (``.../checkpoints/step-N``, or a run directory: its newest complete
one), an export directory (:mod:`tvlars_scale.export`) or a weights file read with timm's
``load_state_dict`` (``.safetensors``, or a torch file holding a state dict, also under a
``state_dict`` / ``model`` key: timm's pretrained weights copied to a cluster without Internet).
A Barlow Twins checkpoint gives its backbone (``backbone.*``; the projector is not loaded); a
Barlow Twins export is its backbone already.

Every tensor of the model but its classifier must come from the source with its shape: a partial
load that silently leaves layers at random would be a different experiment. The classifier
(``model.get_classifier()``) is loaded when the source has it with the same shape; otherwise it
keeps its fresh initialisation (a new head: another class count, or a headless backbone).
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from timm.models import load_state_dict
from torch import Tensor, nn

from tvlars_scale.checkpoint.checkpointer import MODEL_FILE
from tvlars_scale.config import ConfigError
from tvlars_scale.export import (
    META_FILE,
    WEIGHTS_FILE,
    ExportError,
    classifier_name,
    resolve_checkpoint,
)

__all__ = ["load_initial_weights", "read_weights"]

KEY = "model.init_from"
BACKBONE, PROJECTOR = "backbone.", "projector."


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """``(name -> tensor, what the source is)`` from a checkpoint, run, export or weights file."""
    path = Path(path)
    try:
        if path.is_file():
            return load_state_dict(str(path), weights_only=True), f"weights file {path}"
        if (path / META_FILE).is_file():
            return safetensors.torch.load_file(path / WEIGHTS_FILE), f"export {path}"
        checkpoint = resolve_checkpoint(path)
        state = torch.load(checkpoint / MODEL_FILE, map_location="cpu", weights_only=True)
        return state, f"checkpoint {checkpoint}"
    except ExportError as error:
        raise ConfigError(KEY, f"{error}; nor an export directory or a weights file") from None
    except Exception as error:  # a torn or foreign file fails in many ways (zip, pickle, header...)
        first = str(error).strip().splitlines()
        raise ConfigError(
            KEY, f"cannot read {path}: {type(error).__name__}{': ' + first[0] if first else ''}"
        ) from None


def _shape(tensor: Tensor | None) -> str:
    return "absent" if tensor is None else str(list(tensor.shape))


def _few(names: list[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def load_initial_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load ``path`` into ``model`` (see the module docstring); returns the report's lines.

    A model on the meta device (a dry run) is only checked. Raises ConfigError naming the tensors
    that do not fit."""
    source, what = read_weights(path)
    target = model.state_dict()
    if any(k.startswith(BACKBONE) for k in source) and not any(
        k.startswith(BACKBONE) for k in target
    ):  # a Barlow Twins checkpoint: its backbone is the network
        source = {k.removeprefix(BACKBONE): v for k, v in source.items()}
    head = classifier_name(model)
    loaded, new_head, problems = {}, [], []
    for name, tensor in target.items():
        got = source.get(name)
        if got is not None and got.shape == tensor.shape:
            loaded[name] = got
        elif head is not None and name.startswith(f"{head}."):
            new_head.append(f"{name} {list(tensor.shape)} (source: {_shape(got)})")
        else:
            problems.append(f"{name} {list(tensor.shape)} (source: {_shape(got)})")
    if problems:
        raise ConfigError(
            KEY, f"{what} does not fit the model: {len(problems)} tensors, {_few(problems)}"
        )
    if not next(iter(target.values())).is_meta:
        model.load_state_dict(loaded, strict=False)  # what is missing is the new head alone
    unused = sorted(source.keys() - loaded.keys())
    lines = [f"{KEY}: {what}: loaded {len(loaded)} of the model's {len(target)} tensors"]
    if new_head:
        lines.append(f"{KEY}: new head, freshly initialised: {', '.join(new_head)}")
    if unused:
        lines.append(f"{KEY}: not loaded from the source ({len(unused)}): {', '.join(unused)}")
    return lines
