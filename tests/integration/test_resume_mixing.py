"""A run with Mixup, CutMix and RandAugment on, SIGKILLed mid-epoch and resumed, equals the
uninterrupted run bitwise: the mixing draws (seed, rank, micro batches mixed) and the per-sample
policy draws (seed, epoch, index) come back with the checkpoint."""

from __future__ import annotations

import pytest
from test_resume import (
    GLOBAL_BATCH,
    KILLED,
    MICRO_BATCH,
    SINGLE,
    ZERO2,
    assert_same_checkpoint,
    checkpoint,
    launch,
    load_file,
    rank_file,
    steps,
    write_config,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MIXING = {"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "augment": "randaugment"}


# One process in the default run (~40 s); ZeRO-2 x 2 (every rank its own mixing stream) with -m long.
@pytest.mark.parametrize(
    "setting", [SINGLE, pytest.param(ZERO2, marks=pytest.mark.long)], ids=lambda s: s.name
)
def test_killed_run_with_mixing_resumes_bitwise(setting, tmp_path):
    runs = {}
    for name in ("reference", "faulty"):
        run_dir = tmp_path / name
        runs[name] = (
            run_dir,
            write_config(tmp_path, run_dir, data=MIXING, task={"label_smoothing": 0.1}),
        )
    reference_dir, reference_config = runs["reference"]
    result = launch(reference_config, setting)
    assert result.returncodes == [0] * setting.world_size, result.describe()
    assert steps(reference_dir) == [4, 8, 12, 16, 20, 22]
    # Every rank saved how many micro batches it mixed: 4 steps x its accumulation steps.
    saved = load_file(checkpoint(reference_dir, 4), rank_file(0))["task"]["mix"]
    assert saved == {"num_mixed": 4 * GLOBAL_BATCH // (MICRO_BATCH * setting.world_size)}

    run_dir, config = runs["faulty"]
    # SIGKILL once step 6 is done, mid-epoch 1 (11 steps per epoch; the last checkpoint is step 4).
    result = launch(config, setting, faults={"TVLARS_FAULT_KILL": "boundary:6"})
    assert result.returncodes == [KILLED] * setting.world_size, result.describe()
    assert steps(run_dir) == [4]
    result = launch(config, setting, "checkpoint.resume=auto")
    assert result.returncodes == [0] * setting.world_size, result.describe()
    assert steps(run_dir) == [4, 8, 12, 16, 20, 22]
    for step in (8, 12, 16, 20, 22):
        assert_same_checkpoint(checkpoint(run_dir, step), checkpoint(reference_dir, step))
