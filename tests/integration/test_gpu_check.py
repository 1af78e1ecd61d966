"""benchmarks/gpu_check.py in its CPU dry run, so that the GPU check cannot rot between GPU sessions.

The dry run hides any GPU and runs every part at a tiny size on the CPU: loop == foreach, the digits
quick start killed and resumed (real processes, a real SIGKILL), the optimizer step timings and the
three trainer-throughput processes (bare loop, plain trainer, trainer under DeepSpeed ZeRO-2) and the
levers' settings (channels_last, compile, a streamed JPEG tree with CPU and, where installed, DALI
decode). The CUDA-only checks must say they were skipped, never that they passed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from launching import REPO_ROOT, trainer_env

# The dry run starts six trainer processes (~80 s here): `pytest -m long` runs it.
pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.long]

OPTIMIZERS = ("tvlars", "tvlars_official", "lars", "lamb")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_check")
    completed = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_check.py",
            "--dry-run",
            "--out",
            str(root / "out"),
            "--workdir",
            str(root / "runs"),
        ],
        cwd=REPO_ROOT,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = completed.stdout.strip().splitlines()
    assert lines, completed.stderr[-3000:]
    try:
        report = json.loads(lines[-1])
    except json.JSONDecodeError:
        pytest.fail(
            f"no JSON line at the end:\n{completed.stdout[-3000:]}{completed.stderr[-3000:]}"
        )
    return completed, report, root


def test_prints_a_table_and_one_json_line_also_written_to_out(dry_run):
    completed, report, root = dry_run
    assert report["benchmark"] == "gpu_check"
    assert (report["device"], report["gpu"], report["dry_run"]) == ("cpu", None, True)
    assert json.loads((root / "out" / "gpu_check.json").read_text()) == report
    header = next(line for line in completed.stdout.splitlines() if line.startswith("check "))
    assert "status" in header
    # Nothing fails on the CPU, nothing errors: exit status 0.
    assert report["failed"] == [], json.dumps(report, indent=1)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert report["all_passed"] is True


def test_loop_and_foreach_agree_on_cpu(dry_run):
    entries = dry_run[1]["entries"]
    for name in OPTIMIZERS:
        for dtype in ("fp32", "bf16"):
            key = f"correctness/loop_vs_foreach/{name}/{dtype}"
            entry = entries[key]
            assert entry["device"] == "cpu"
            assert entry["status"] == "pass" and entry["bitwise"] is True, (key, entry)


def test_cuda_only_checks_say_skipped(dry_run):
    report = dry_run[1]
    sync = [key for key in report["entries"] if key.startswith("correctness/no_host_sync/")]
    assert len(sync) == 4 * 2 * 2 + 1  # optimizer x path x dtype, and the detector's control
    assert all(report["entries"][key]["status"] == "skipped: no CUDA" for key in sync)
    assert set(sync) <= set(report["skipped"])
    assert not any(report["entries"][key]["status"].startswith("pass") for key in sync)


def test_killed_and_resumed_digits_run_is_bitwise_equal(dry_run):
    resume = dry_run[1]["entries"]["correctness/resume_bitwise/digits"]
    assert resume["status"] == "pass", resume
    assert resume["device"] == "cpu" and resume["cuda_rng_in_checkpoint"] is False
    # 2 epochs of 5 steps, a checkpoint every 3, SIGKILL after step 4: resumed from step 3.
    assert (resume["resumed_from_step"], resume["compared_steps"]) == (3, [6, 9, 10])


def test_optimizer_step_speed_is_measured(dry_run):
    entries = dry_run[1]["entries"]
    for name in ("tvlars_foreach", "tvlars_loop", "sgd_foreach", "sgd_fused", "timm_lars"):
        entry = entries[f"optimizer_step/{name}"]
        assert entry["status"] == "measured (dry run)", entry
        assert entry["median_ms"] > 0 and entry["GBps"] >= 0 and entry["fraction_of_copy"] > 0
    assert entries["optimizer_step/copy_bandwidth"]["GBps"] > 0
    summary = entries["optimizer_step/summary"]
    assert summary["timer"] == "perf_counter" and summary["bytes_per_step"] == (
        5 * 4 * summary["num_params"]
    )


def test_trainer_throughput_runs_all_three_settings(dry_run):
    entries = dry_run[1]["entries"]
    for name in ("bare", "trainer_plain", "trainer_zero2"):
        entry = entries[f"trainer_throughput/{name}"]
        assert entry["status"] == "measured (dry run)", entry
        assert entry["images_per_s"] > 0 and entry["grad_accum_steps"] == 4
        assert 0 < entry["input_fraction_of_step"] < 1
    assert entries["trainer_throughput/trainer_zero2"]["distributed_type"].endswith("DEEPSPEED")
    assert entries["trainer_throughput/trainer_plain"]["distributed_type"].endswith("NO")
    summary = entries["trainer_throughput/summary"]
    assert "trainer_plain/bare" in summary and "trainer_zero2/bare" in summary
    assert summary["effective_batch"] == "effective batch 32 = 8 micro x 4 accumulation x 1 rank"


def test_levers_run_every_setting_and_each_installed_decoder(dry_run):
    entries = dry_run[1]["entries"]
    settings = ["synthetic/eager_nchw", "synthetic/channels_last", "synthetic/compile"]
    settings += ["synthetic/both", "jpeg/both_cpu_decode"]
    dali = importlib.util.find_spec("nvidia.dali") is not None
    if dali:  # DALI's CPU pipeline in the dry run
        settings.append("jpeg/both_dali_decode")
    else:
        status = entries["levers/jpeg/both_dali_decode"]["status"]
        assert status.startswith("skipped: DALI is not installed"), status
    for name in settings:
        entry = entries[f"levers/{name}"]
        assert entry["status"] == "measured (dry run)", (name, entry)
        assert entry["images_per_s"] > 0 and entry["mfu"] == "n/a", (name, entry)
        assert 0 <= entry["data_wait_fraction"] < 1, (name, entry)
    summary = entries["levers/summary"]
    ratios = ["channels_last_ratio", "compile_ratio", "both_ratio", "jpeg_cpu_decode_vs_synthetic"]
    ratios += ["jpeg_dali_decode_vs_synthetic", "dali_vs_cpu_decode"] if dali else []
    assert all(summary[key] > 0 for key in ratios), summary
