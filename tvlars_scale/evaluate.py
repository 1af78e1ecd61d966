"""Evaluate a trained classifier on its test split: ``tvlars-eval PATH [--out FILE] [key=value ...]``.

``PATH`` is a checkpoint (``.../checkpoints/step-N``), a run directory (its newest complete
checkpoint; its ``export/`` when no checkpoint is left) or an export directory
(:mod:`tvlars_scale.export`). The dataset, image size, batch and normalisation are the run's (the
checkpoint's ``config.yaml``, the export's ``model.json``), so the result is the run's own final
``test_accuracy`` bit for bit; ``data.*`` and ``batch.micro_batch_size`` overrides point it
elsewhere (``data.path=/local/copy``, ``data.num_workers=4``).

Any world size: ``accelerate launch -m tvlars_scale.evaluate PATH`` shards the test split over the
ranks (each loads the whole model), gathers the per-sample results once and counts each sample
once. Top-1 and top-5 accuracy and the mean cross-entropy go to ``--out`` (JSON, default
``eval.json``) and stdout, on the main process. A bad argument or path prints one line,
``config error: <key>: <problem>``, and exits 2 before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from tvlars_scale.config import Config, ConfigError, config_from_dict, load_config

__all__ = ["evaluate", "main", "resolve_source"]

TOP_K = 5
OVERRIDABLE = ("data.", "batch.micro_batch_size")
"""What a ``key=value`` may change: where the data is and how it is read, not what is scored."""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message over two lines; we print one
        raise ConfigError("arguments", message)


def resolve_source(path: str | Path) -> tuple[str, Path]:
    """``("checkpoint" | "export", directory)`` that ``path`` names (see the module docstring)."""
    from tvlars_scale.export import EXPORT_DIR, META_FILE, ExportError, resolve_checkpoint

    path = Path(path)
    if (path / META_FILE).is_file():
        return "export", path
    try:
        return "checkpoint", resolve_checkpoint(path)
    except ExportError as error:
        if (path / EXPORT_DIR / META_FILE).is_file():
            return "export", path / EXPORT_DIR
        raise ConfigError("PATH", f"{error}; nor an export directory") from None


def _config(kind: str, source: Path, overrides: list[str]) -> tuple[Config, dict | None]:
    from tvlars_scale.checkpoint.policy import CONFIG_FILE
    from tvlars_scale.export import META_FILE

    for override in overrides:
        key = override.partition("=")[0]
        if not key.startswith(OVERRIDABLE):
            raise ConfigError(key, "tvlars-eval takes data.* and batch.micro_batch_size only")
    quiet = ["run.trackers=[]", "run.progress_bar=false"]
    if kind == "checkpoint":
        config = load_config(source / CONFIG_FILE, [*overrides, *quiet])
        if config.task.name != "classification":
            raise ConfigError(
                "PATH", f"{source} is a {config.task.name} checkpoint: no classifier to score"
            )
        return config, None
    meta = json.loads((source / META_FILE).read_text())
    if meta.get("exported") != "classifier":
        raise ConfigError(
            "PATH",
            f"{source} holds a {meta.get('task')} {meta.get('exported')} without a classifier: "
            "fine-tune it first (model.init_from)",
        )
    return config_from_dict(meta["config"], [*overrides, *quiet]), meta


def _model(kind: str, source: Path, config: Config, data) -> torch.nn.Module:
    from tvlars_scale.checkpoint.checkpointer import MODEL_FILE
    from tvlars_scale.export import load_exported
    from tvlars_scale.tasks import build_configured_model

    if kind == "export":
        return load_exported(source)
    model = build_configured_model(config, data)
    state = torch.load(source / MODEL_FILE, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ConfigError("PATH", f"{source / MODEL_FILE}: {str(error).splitlines()[0]}") from None
    return model.eval()


@torch.no_grad()
def evaluate(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Score the model ``path`` names on its test split (every rank its shard); the result dict is
    the same on every rank."""
    from tvlars_scale import build
    from tvlars_scale.accelerate_setup import make_accelerator
    from tvlars_scale.checkpoint.directory import read_manifest
    from tvlars_scale.tasks.classification import ClassificationTask

    kind, source = resolve_source(path)
    config, meta = _config(kind, source, list(overrides))
    accelerator = make_accelerator(config)
    plan = build.batch_plan(config, accelerator.num_processes)
    data = build.image_data(config, accelerator)
    _, loader = build.loaders(data, plan, accelerator, config.run.seed, config.data)
    # The trainer's own scoring (its eval transform, loss and top-1), so the numbers are its own.
    task = ClassificationTask(config, data, accelerator.process_index)
    model = _model(kind, source, config, data).to(accelerator.device)
    if config.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    k = min(TOP_K, data.num_classes)
    local: dict[str, list[torch.Tensor]] = {}
    loader.start_at(0)
    with accelerator.autocast():
        for images, labels in loader:
            logits = model(task.eval_transform(images)).float()
            outputs = task.score(logits, labels)
            outputs["correct_k"] = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
            for key, value in outputs.items():
                local.setdefault(key, []).append(value)
    # collective: all_gather of each per-sample output tensor (padding masked by "valid").
    gathered = accelerator.gather_for_metrics({key: torch.cat(v) for key, v in local.items()})
    metrics = task.eval_metrics(gathered)
    valid = gathered["valid"]
    # host sync: the counts, once.
    num_samples = int(valid.sum())
    top_k_accuracy = float(gathered["correct_k"][valid].sum().double() / num_samples)
    info = read_manifest(source) if kind == "checkpoint" else None
    step = meta.get("step") if meta else (info.step if info else None)
    return {
        "source": str(source.resolve()),
        "kind": kind,
        "step": step,
        "dataset": config.data.name,
        "split": "test",
        "num_samples": num_samples,
        "world_size": accelerator.num_processes,
        "top1": metrics["test_accuracy"],
        f"top{k}": top_k_accuracy,
        "test_loss": metrics["test_loss"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = _ArgumentParser(prog="tvlars-eval", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a checkpoint, a run directory or an export directory")
    parser.add_argument("--out", default="eval.json", help="JSON file of the metrics (eval.json)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="data.* / batch.micro_batch_size"
    )
    try:
        args = parser.parse_args(argv)
        out = Path(args.out)
        if out.is_dir() or not out.parent.is_dir():
            raise ConfigError("--out", f"{out} is a directory or its parent does not exist")
        from tvlars_scale.data.stream_loader import UnreadableImageError

        try:
            result = evaluate(args.path, args.overrides)
        except UnreadableImageError as error:
            print("data error: " + " ".join(str(error).split()), file=sys.stderr)
            return 4
    except ConfigError as error:
        if os.environ.get("RANK", "0") == "0":  # every rank fails alike: say it once
            print(error.line(), file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        from tvlars_scale.checkpoint.directory import write_durably

        text = json.dumps(result, indent=2) + "\n"
        write_durably(out, text.encode())
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
