"""Run every bad-input case of test_resume.py through the CLI entry function in ONE process.

``python bad_inputs.py WORLD RESULTS.json``: ``WORLD`` holds ``good.yaml`` (a valid config whose
``run.output_dir`` is ``WORLD/run``, an existing run with checkpoints) and the files the cases point
at. For each case this calls ``tvlars_scale.train.main(argv)`` with file descriptors 1 and 2
redirected, so everything printed is seen (library loggers included), and records the exit status,
the output and every path under ``WORLD`` whose presence, size or mtime changed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

from tvlars_scale import train

# (case, config file in WORLD, overrides, the key the one line must name). "{world}" is WORLD.
NEW = "run.output_dir={world}/new"  # checks after the run directory's: start a new run
CASES = [
    ("malformed YAML", "malformed.yaml", [], "{world}/malformed.yaml"),
    ("top level not a mapping", "list.yaml", [], "{world}/list.yaml"),
    ("config file missing", "missing.yaml", [], "--config"),
    ("no --config", None, [], "arguments"),
    ("override without =", "good.yaml", ["optim.lr"], "optim.lr"),
    ("unknown key", "good.yaml", ["optim.lrr=1"], "optim.lrr"),
    ("unknown section", "good.yaml", ["trainer.lr=1"], "trainer"),
    ("value used as a section", "good.yaml", ["run.seed.x=1"], "run.seed"),
    ("wrong type: string for float", "good.yaml", ["optim.lr=fast"], "optim.lr"),
    ("wrong type: quoted int", "good.yaml", ['batch.global_batch_size="64"'], "batch.global_batch_size"),
    ("negative micro batch", "good.yaml", ["batch.micro_batch_size=-4"], "batch.micro_batch_size"),
    ("zero global batch", "good.yaml", ["batch.global_batch_size=0"], "batch.global_batch_size"),
    ("zero epochs", "good.yaml", ["run.num_epochs=0"], "run.num_epochs"),
    ("lmbda < 0", "good.yaml", ["optim.lmbda=-1e-4"], "optim.lmbda"),
    ("momentum = 1", "good.yaml", ["optim.momentum=1.0"], "optim.momentum"),
    ("unknown optimizer", "good.yaml", ["optim.name=adam"], "optim.name"),
    ("unknown dataset", "good.yaml", ["data.name=mnist"], "data.name"),
    ("unknown task", "good.yaml", ["task.name=detection"], "task.name"),
    ("unknown model", "good.yaml", ["model.name=resnet_imaginary", NEW], "model.name"),
    ("missing local dataset path", "good.yaml", ["data.name=cifar10", "data.path={world}/no-cifar", NEW], "data.path"),
    ("global batch larger than the dataset", "good.yaml", ["batch.global_batch_size=4096", NEW], "batch.global_batch_size"),
    ("fp16 without a GPU", "good.yaml", ["run.mixed_precision=fp16", NEW], "run.mixed_precision"),
    ("output_dir is a file", "good.yaml", ["run.output_dir={world}/a-file"], "run.output_dir"),
    ("existing run without resume or overwrite", "good.yaml", [], "run.output_dir"),
    ("resume path does not exist", "good.yaml", ["checkpoint.resume={world}/nowhere/step-4"], "checkpoint.resume"),
    ("resume a torn checkpoint", "good.yaml", ["checkpoint.resume={world}/run/checkpoints/.tmp-step-12"], "checkpoint.resume"),
    ("resume with another lr", "good.yaml", ["checkpoint.resume=auto", "optim.lr=9.0"], "optim.lr"),
    ("resume with another global batch", "good.yaml", ["checkpoint.resume=auto", "batch.global_batch_size=64"], "batch.global_batch_size"),
    ("resume with another model", "good.yaml", ["checkpoint.resume=auto", "model.name=resnet18"], "model.name"),
    ("resume an older checkpoint of the run", "good.yaml", ["checkpoint.resume={world}/run/checkpoints/step-4"], "checkpoint.resume"),
    ("resume into another run's directory", "good.yaml", ["checkpoint.resume={world}/run", "run.output_dir={world}/other"], "run.output_dir"),
    ("allow_changes names an unknown key", "good.yaml", ["checkpoint.allow_changes=[optim.lrr]"], "checkpoint.allow_changes"),
    ("keep_last = 0", "good.yaml", ["checkpoint.keep_last=0"], "checkpoint.keep_last"),
    ("negative every_steps", "good.yaml", ["checkpoint.every_steps=-1"], "checkpoint.every_steps"),
    ("max_nonfinite_steps = 0", "good.yaml", ["run.max_nonfinite_steps=0"], "run.max_nonfinite_steps"),
]  # fmt: skip


def snapshot(root: Path) -> dict[str, list[int]]:
    """Every path under ``root`` with its size and modification time."""
    found = {}
    for directory, names, files in os.walk(root):
        for name in names + files:
            path = Path(directory) / name
            stat = path.stat()
            found[str(path.relative_to(root))] = [stat.st_size, stat.st_mtime_ns]
    return found


def call_main(argv: list[str]) -> tuple[object, str, str]:
    """``train.main(argv)`` with fds 1 and 2 captured; a raised exception becomes its traceback."""
    sys.stdout.flush(), sys.stderr.flush()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
        try:
            code = train.main(argv)
        except BaseException:  # a traceback is exactly what the test must catch
            code = "raised"
            traceback.print_exc()
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
        out.seek(0), err.seek(0)
        return code, out.read().decode(), err.read().decode()


def main(world: str, results_path: str) -> None:
    root = Path(world)
    results = []
    for case, config, overrides, key in CASES:
        argv = [] if config is None else ["--config", str(root / config)]
        argv += [override.replace("{world}", world) for override in overrides]
        before = snapshot(root)
        code, stdout, stderr = call_main(argv)
        after = snapshot(root)
        changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
        results.append(
            {
                "case": case,
                "key": key.replace("{world}", world),
                "code": code,
                "stdout": stdout,
                "stderr": stderr,
                "changed": changed,
            }
        )
    Path(results_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
