"""The wheel stands alone: built offline, installed into a fresh virtual environment that sees the
installed dependencies but not the repository, it runs the quick start from the configs it ships."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from launching import REPO_ROOT, launch, read_metrics, train_command


def run(command: list, *, cwd: Path) -> str:
    """Run offline, without the repository on the path (the suite's PYTHONPATH names it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PIP_NO_INDEX="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.long
def test_wheel_installs_and_runs_the_packaged_quick_start(tmp_path):
    # Build from a copy of what the sdist holds: setuptools writes build/ and *.egg-info next to
    # the sources, which must not land in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source)
    shutil.copytree(
        REPO_ROOT / "tvlars_scale",
        source / "tvlars_scale",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    # --no-isolation: the build backend already installed here, nothing fetched.
    dist = tmp_path / "dist"
    run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, source],
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("tvlars_scale-*.whl")
    assert len(list(dist.glob("tvlars_scale-*.tar.gz"))) == 1

    # A fresh environment: the wheel installed into it first (pip then sees no other copy), and
    # then the dependencies installed here made visible by a .pth: a plain path line, so the
    # repository's editable-install hook in that directory is never run.
    env_dir = tmp_path / "env"
    run([sys.executable, "-m", "venv", "--without-pip", env_dir], cwd=tmp_path)
    python = env_dir / "bin" / "python"
    run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", wheel],
        cwd=tmp_path,
    )
    site_packages = Path(
        run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd=tmp_path,
        ).strip()
    )
    dependencies = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    (site_packages / "installed_dependencies.pth").write_text(
        "\n".join(sorted(dependencies)) + "\n"
    )

    work = tmp_path / "work"  # no repository here, nor on the path
    work.mkdir()
    imported = run([python, "-c", "import tvlars_scale; print(tvlars_scale.__file__)"], cwd=work)
    assert Path(imported.strip()).is_relative_to(site_packages), imported

    listed = run([env_dir / "bin" / "tvlars-train", "--list-configs"], cwd=work)
    assert "digits " in listed and str(site_packages) in listed, listed

    run(
        [env_dir / "bin" / "tvlars-train", "--config", "digits", "run.output_dir=packaged"],
        cwd=work,
    )
    packaged = read_metrics(work / "packaged")
    assert packaged["final"]["test_accuracy"] >= 0.95, packaged["final"]

    # The clone's quick start: the same run, to the bit.
    launch(train_command("--config", "configs/digits.yaml", f"run.output_dir={tmp_path / 'clone'}"))
    assert packaged["final"] == read_metrics(tmp_path / "clone")["final"]
    layer_stats = [
        [json.loads(line) for line in (run_dir / "layer_stats.jsonl").read_text().splitlines()]
        for run_dir in (work / "packaged", tmp_path / "clone")
    ]
    assert layer_stats[0] == layer_stats[1]
