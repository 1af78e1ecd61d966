"""Mutation check: do the tests catch realistic one-line bugs in the central claims?

Each mutant below is one small edit of the library (a file, an exact source snippet that must occur
there exactly once, its replacement) and the tests that must fail when it is planted. The script
copies the repository's files (tracked and untracked-but-not-ignored, as they are in the working
tree) to a temporary directory, plants each mutant there in turn, runs its tests against the copy
(``PYTHONPATH`` = the copy, ``OMP_NUM_THREADS=1``, no bytecode written, a timeout per mutant),
restores the file, and prints a table (mutant, caught, by which test, seconds) and one JSON line.
The working tree is never modified.

A snippet that is no longer found (the code moved on) is reported as ERROR for that mutant, and the
others still run: update the mutant rather than drop it. Before the mutants, the union of their
tests runs once on the unmutated copy (``--no-baseline`` skips it): a mutant counts as caught only
if its tests pass without it.

Run by hand, not in CI (several minutes; it runs the distributed FSDP2 tests for the layout and
reduction mutants), at low priority::

    nice -n 10 .venv/bin/python tools/mutants.py            # every mutant
    nice -n 10 .venv/bin/python tools/mutants.py --only lars_eps_dropped hsdp_norms_over_replicas
    .venv/bin/python tools/mutants.py --list

Exit status 0 when every mutant that ran was caught.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

UNIT = "tests/unit"
OPTIM = f"{UNIT}/test_optimizers.py"
CKPT = f"{UNIT}/test_checkpoint.py"
DATA = f"{UNIT}/test_data.py"
FSDP2 = "tests/distributed/test_fsdp2_sharding.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    claim: str
    """What the mutant breaks, in words."""
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    """pytest node ids or files; run in this order with -x (the first failure names the catcher)."""


MUTANTS = (
    # --- optimizer formulas ------------------------------------------------------------------------
    Mutant(
        "phi_delay_sign",
        "TVLARS phi_t: exp(lmbda (t + d)) instead of exp(lmbda (t - d))",
        "tvlars_scale/optim/schedules.py",
        "exponent = lmbda * (step - delay_steps)",
        "exponent = lmbda * (step + delay_steps)",
        (f"{OPTIM}::test_tvlars_paper_three_steps",),
    ),
    Mutant(
        "phi_gamma_min_dropped",
        "TVLARS phi_t without its floor gamma_min",
        "tvlars_scale/optim/schedules.py",
        "return 1.0 / (alpha + math.exp(exponent)) + gamma_min",
        "return 1.0 / (alpha + math.exp(exponent))",
        (f"{OPTIM}::test_tvlars_paper_three_steps",),
    ),
    Mutant(
        "phi_official_step_shift",
        "official phi: exp(lmbda t) instead of exp(lmbda (t + 1))",
        "tvlars_scale/optim/schedules.py",
        "exponent = lmbda * (step + 1)",
        "exponent = lmbda * step",
        (f"{OPTIM}::test_tvlars_official_three_steps",),
    ),
    Mutant(
        "tvlars_eta_dropped",
        "TVLARS trust ratio without the trust coefficient eta",
        "tvlars_scale/optim/tvlars.py",
        '            coefficient = group["eta"]\n',
        "            coefficient = 1.0\n",
        (f"{OPTIM}::test_tvlars_paper_three_steps",),
    ),
    Mutant(
        "tvlars_official_clamp",
        "official variant: ||w|| clamped at 100 instead of 10",
        "tvlars_scale/optim/tvlars.py",
        "weight_norm.clamp(0, 10), update_norm.clamp(0, 10)",
        "weight_norm.clamp(0, 100), update_norm.clamp(0, 10)",
        (f"{OPTIM}::test_tvlars_official_three_steps",),
    ),
    Mutant(
        "tvlars_momentum_sign",
        "TVLARS m-recursion: w = m - mu (m_t+1 - m_t)",
        "tvlars_scale/optim/functional.py",
        "ops.add_(d, velocity, alpha=momentum)",
        "ops.add_(d, velocity, alpha=-momentum)",
        (f"{OPTIM}::test_tvlars_paper_three_steps",),
    ),
    Mutant(
        "weight_decay_sign",
        "d = g - wd w instead of g + wd w",
        "tvlars_scale/optim/functional.py",
        "ops.add_into(out, g, w, alpha=weight_decay)",
        "ops.add_into(out, g, w, alpha=-weight_decay)",
        (f"{OPTIM}::test_tvlars_paper_three_steps", f"{OPTIM}::test_lars_three_steps"),
    ),
    Mutant(
        "lars_eps_dropped",
        "LARS: eps dropped from the trust ratio's denominator (issue 26, row 4)",
        "tvlars_scale/optim/lars.py",
        '/ (grad_norm + group["weight_decay"] * weight_norm + group["eps"])',
        '/ (grad_norm + group["weight_decay"] * weight_norm)',
        (f"{OPTIM}::test_lars_three_steps",),
    ),
    Mutant(
        "lars_wd_norm_dropped",
        "LARS: wd ||w|| dropped from the trust ratio's denominator",
        "tvlars_scale/optim/lars.py",
        '/ (grad_norm + group["weight_decay"] * weight_norm + group["eps"])',
        '/ (grad_norm + group["eps"])',
        (f"{OPTIM}::test_lars_three_steps",),
    ),
    Mutant(
        "nesterov_lookahead_dropped",
        "heavy ball with nesterov=True steps like plain momentum",
        "tvlars_scale/optim/functional.py",
        "        ops.add_(d, buf, alpha=momentum)\n",
        "        ops.add_(d, buf, alpha=0.0)\n",
        (f"{OPTIM}::test_lars_three_steps",),
    ),
    Mutant(
        "lamb_second_moment_beta",
        "LAMB: the second moment decays with beta1",
        "tvlars_scale/optim/functional.py",
        "ops.addcmul_(exp_avg_sq, g, g, value=1.0 - beta2)",
        "ops.addcmul_(exp_avg_sq, g, g, value=1.0 - beta1)",
        (f"{OPTIM}::test_lamb_three_steps",),
    ),
    Mutant(
        "lamb_weight_norm_unclamped",
        "LAMB: ||w|| not clamped at clamp_value",
        "tvlars_scale/optim/lamb.py",
        'weight_norm = weight_norm.clamp(0, group["clamp_value"])',
        "weight_norm = weight_norm",
        (f"{OPTIM}::test_lamb_three_steps",),
    ),
    Mutant(
        "zero_norm_not_guarded",
        "trust ratio taken when only one norm is zero (0/0 or x/0)",
        "tvlars_scale/optim/functional.py",
        "torch.where(torch.minimum(weight_norm, update_norm) > 0, ratio, 1.0)",
        "torch.where(torch.maximum(weight_norm, update_norm) > 0, ratio, 1.0)",
        (f"{OPTIM}::test_zero_weights_and_zero_gradients_stay_finite",),
    ),
    Mutant(
        "one_d_parameters_adapted",
        "exclude_1d: 1-D parameters (norm layers, biases) adapted and decayed",
        "tvlars_scale/optim/base.py",
        'return group["exclude_1d"] and len(shape) <= 1',
        'return group["exclude_1d"] and len(shape) < 1',
        (f"{OPTIM}::test_tvlars_paper_three_steps",),
    ),
    Mutant(
        "warmup_off_by_one",
        "linear warm-up starts at 0 instead of 1 / warmup_steps",
        "tvlars_scale/optim/schedules.py",
        "return (step + 1) / warmup_steps",
        "return step / warmup_steps",
        (f"{UNIT}/test_build.py::test_lr_schedule_is_the_peak_times_the_schedule_of_the_step",),
    ),
    # --- layouts and offsets -----------------------------------------------------------------------
    Mutant(
        "zero12_layer_offset",
        "ZeRO-1/2 pieces: layer offset counted from the window, not the layer",
        "tvlars_scale/optim/zero_layout.py",
        "layer_offset=first - offset)",
        "layer_offset=first - window_start)",
        (f"{UNIT}/test_zero_layout.py",),
    ),
    Mutant(
        "zero3_layer_offset",
        "ZeRO-3 pieces: layer offset = the slot's offset in the partition",
        "tvlars_scale/optim/zero_layout.py",
        "layer_offset=rank * slot_numel)",
        "layer_offset=offset)",
        (f"{UNIT}/test_zero_layout.py",),
    ),
    Mutant(
        "zero3_padding_counted",
        "ZeRO-3 pieces cover one element of the uninitialised tail",
        "tvlars_scale/optim/zero_layout.py",
        "valid = min(slot_numel, max(0, numel - rank * slot_numel))",
        "valid = min(slot_numel, max(0, numel - rank * slot_numel) + 1)",
        (f"{UNIT}/test_zero_layout.py",),
    ),
    Mutant(
        "fsdp_layer_offset_rows",
        "FSDP2 pieces: layer offset in rows, not elements",
        "tvlars_scale/optim/fsdp_layout.py",
        "layer_offset=first * row_numel",
        "layer_offset=first",
        (FSDP2,),
    ),
    # --- the norm reduction ------------------------------------------------------------------------
    Mutant(
        "hsdp_norms_over_replicas",
        "HSDP: norms all-reduced over both replicas (issue 26, row 5)",
        "tvlars_scale/optim/fsdp_layout.py",
        "process_group = mesh.get_group(mesh_dim)",
        "process_group = mesh.get_group(mesh_dim) if mesh.ndim == 1 else None",
        (f"{FSDP2}::test_every_rank_holds_every_layers_statistics",),
    ),
    Mutant(
        "sharded_norms_not_squared",
        "sharded reduction sums piece norms instead of squared norms",
        "tvlars_scale/optim/sharding.py",
        "sums.index_add_(1, piece_to_layer, piece_squares.float())",
        "sums.index_add_(1, piece_to_layer, piece_squares.float().sqrt())",
        (f"{FSDP2}::test_fsdp2_training_matches_one_process",),
    ),
    Mutant(
        "sum_of_squares_blas_path",
        "the CPU BLAS norm path returns the norm, not its square",
        "tvlars_scale/optim/functional.py",
        "        return torch.dot(flat, flat)\n",
        "        return torch.dot(flat, flat).sqrt()\n",
        (f"{OPTIM}::test_sum_of_squares_on_every_path",),
    ),
    # --- checkpoint save and restore ---------------------------------------------------------------
    Mutant(
        "rng_not_restored",
        "resume: global RNG states (Python, NumPy, torch) not restored (issue 26, row 1)",
        "tvlars_scale/checkpoint/checkpointer.py",
        '                restore_rng_state(own_payload["rng"])\n',
        "                pass\n",
        (f"{CKPT}::test_a_restored_checkpoint_continues_every_random_stream",),
    ),
    Mutant(
        "task_state_not_restored",
        "resume: the task's augmentation generators not restored (issue 26, row 3)",
        "tvlars_scale/checkpoint/checkpointer.py",
        '                self.task.load_state_dict(own_payload["task"])\n',
        "                pass\n",
        (f"{CKPT}::test_a_restored_checkpoint_continues_every_random_stream",),
    ),
    Mutant(
        "buffers_not_restored",
        "resume: a rank's own BatchNorm statistics not restored",
        "tvlars_scale/checkpoint/checkpointer.py",
        '                    self._load_buffers(own_payload["buffers"])\n',
        "                    pass\n",
        (f"{CKPT}::test_each_rank_gets_its_own_buffers_back_and_old_checkpoints_still_load",),
    ),
    Mutant(
        "numpy_cached_gaussian_lost",
        "RNG restore drops NumPy's cached Gaussian",
        "tvlars_scale/checkpoint/rng.py",
        '            numpy_state["has_gauss"],\n',
        "            0,\n",
        (f"{CKPT}::test_rng_round_trip_is_exact",),
    ),
    Mutant(
        "saved_run_offset",
        "layer state saved with the piece's offset in the partition, not in the layer",
        "tvlars_scale/checkpoint/layer_state.py",
        '"offset": piece.layer_offset,',
        '"offset": piece.start,',
        (f"{CKPT}::test_state_moves_between_unsharded_and_flat_partitions",),
    ),
    Mutant(
        "restored_run_offset",
        "layer state restored from the wrong place of a saved run",
        "tvlars_scale/checkpoint/layer_state.py",
        'slice(begin - saved["offset"], end - saved["offset"])',
        "slice(begin - first, end - first)",
        (f"{CKPT}::test_state_moves_between_unsharded_and_flat_partitions",),
    ),
    Mutant(
        "restored_buffer_key",
        "every restored optimizer buffer filled from the saved weights",
        "tvlars_scale/checkpoint/layer_state.py",
        "_copy_run(buffers[key], piece, destination, values[source])",
        '_copy_run(buffers[key], piece, destination, saved["weights"][source])',
        (f"{FSDP2}::test_fsdp2_checkpoint_loads_on_one_process",),
    ),
    Mutant(
        "prune_keeps_one_more",
        "keep_last keeps one checkpoint too many",
        "tvlars_scale/checkpoint/directory.py",
        "complete_checkpoints(root)[:-keep_last]",
        "complete_checkpoints(root)[: -keep_last - 1]",
        (f"{CKPT}::test_keep_last_prunes_only_complete_checkpoints",),
    ),
    Mutant(
        "publish_without_every_rank",
        "rank 0 publishes a checkpoint that lacks a rank's file",
        "tvlars_scale/checkpoint/directory.py",
        "missing = [rank_file(r) for r in range(len(records), world_size)]",
        "missing = []",
        (f"{CKPT}::test_rank_zero_refuses_to_publish_without_every_rank_file",),
    ),
    Mutant(
        "optim_change_accepted",
        "resume policy treats optim.* changes as operational",
        "tvlars_scale/checkpoint/policy.py",
        'return key in OPERATIONAL_KEYS or key.startswith("checkpoint.")',
        'return key in OPERATIONAL_KEYS or key.startswith(("checkpoint.", "optim."))',
        (f"{CKPT}::test_meaningful_changes_are_refused_unless_allowed",),
    ),
    # --- data order and augmentation ---------------------------------------------------------------
    Mutant(
        "stream_crops_ignore_epoch",
        "streaming augmentation seed ignores the epoch (issue 26, row 2)",
        "tvlars_scale/data/stream_loader.py",
        "rng = np.random.default_rng([self.seed, epoch, int(index)])",
        "rng = np.random.default_rng([self.seed, 0, int(index)])",
        (f"{UNIT}/test_streaming.py::test_the_epoch_changes_the_crops_of_the_same_samples",),
    ),
    Mutant(
        "shuffle_ignores_epoch",
        "every epoch draws the same permutation",
        "tvlars_scale/data/loader.py",
        "generator = torch.Generator().manual_seed(self.seed + self.epoch)",
        "generator = torch.Generator().manual_seed(self.seed)",
        (f"{DATA}::test_epochs_reshuffle_reproducibly_and_accumulation_trims_to_whole_steps",),
    ),
    Mutant(
        "every_rank_takes_slice_0",
        "every rank takes the first rank's samples of each step",
        "tvlars_scale/data/loader.py",
        "starts.append(round_start + sum(shares[: self.rank]))",
        "starts.append(round_start)",
        (f"{DATA}::test_ranks_get_disjoint_equal_shares_that_cover_all_but_a_short_tail",),
    ),
    Mutant(
        "resume_position_not_converted",
        "a resumed loader takes the saved position in the old split's micro batches",
        "tvlars_scale/data/loader.py",
        "self.start_at(consumed // unit * per_unit)",
        'self.start_at(state["position"])',
        (f"{DATA}::test_resume_under_another_split_of_the_same_global_micro_batch",),
    ),
    Mutant(
        "flip_window_offset",
        "a flipped crop is taken at the wrong offset of the mirrored image",
        "tvlars_scale/data/augment.py",
        "torch.where(flipped, padded_width + 2 * pad - offsets[1], offsets[1])",
        "torch.where(flipped, padded_width + pad - offsets[1], offsets[1])",
        (f"{DATA}::test_crops_are_shifted_windows_of_the_zero_padded_image_and_half_are_mirrored",),
    ),
    Mutant(
        "augment_state_not_loaded",
        "BatchAugment.load_state_dict leaves the generator where it is",
        "tvlars_scale/data/augment.py",
        '        self.generator.set_state(state["generator"])\n',
        "        pass\n",
        (f"{DATA}::test_augmentation_is_reproducible_under_a_seed_and_resumable",),
    ),
    Mutant(
        "ranks_share_augmentation",
        "every rank draws the same crops and flips (the rank left out of the task's seed)",
        "tvlars_scale/tasks/classification.py",
        "seed=config.run.seed + rank,",
        "seed=config.run.seed,",
        (f"{DATA}::test_each_rank_draws_its_own_crops_and_flips",),
    ),
    # --- non-finite skipping -----------------------------------------------------------------------
    Mutant(
        "inf_gradients_pass",
        "the finite check only looks for NaN (Inf passes)",
        "tvlars_scale/nonfinite.py",
        'torch.isfinite(getattr(g, "_local_tensor", g)).all()',
        '(~torch.isnan(getattr(g, "_local_tensor", g))).all()',
        (f"{CKPT}::test_gradients_are_finite",),
    ),
    Mutant(
        "nonfinite_step_applied",
        "the trainer applies a step whose gradients are NaN",
        "tvlars_scale/training/optimizer_step.py",
        "        if not gradients_are_finite(self.model.parameters()):\n",
        "        if False:\n",
        ("tests/integration/test_train.py::test_a_nonfinite_step_is_skipped_and_changes_nothing",),
    ),
    Mutant(
        "nonfinite_streak_not_reset",
        "an applied step does not reset the count of non-finite steps in a row",
        "tvlars_scale/trainer.py",
        "            self.state.nonfinite_in_row = 0\n",
        "            pass\n",
        ("tests/integration/test_train.py::test_a_nonfinite_step_is_skipped_and_changes_nothing",),
    ),
    # --- config validation -------------------------------------------------------------------------
    Mutant(
        "uneven_micro_batches_not_weighted",
        "an uneven plan's micro batches are not weighted by their sample counts",
        "tvlars_scale/batching.py",
        "return 1.0 if share == self.global_batch_size else share / self.global_batch_size",
        "return 1.0",
        (f"{UNIT}/test_batching.py::test_splits_that_leave_a_rest_take_every_sample_once",),
    ),
    Mutant(
        "exchange_pieces_misrouted",
        "resume at another world size: every cut piece sent to rank 0, not the rank holding it",
        "tvlars_scale/checkpoint/reading.py",
        "                    outbox[destination].append(_cut(run, first, end))\n",
        "                    outbox[0].append(_cut(run, first, end))\n",
        (
            f"{UNIT}/test_checkpoint_scale.py::"
            "test_at_another_world_size_each_saved_file_is_read_by_one_rank",
        ),
    ),
    Mutant(
        "channels_last_weights_under_sharding",
        "model.channels_last: NHWC weights under ZeRO / FSDP2 too (both refuse strided weights)",
        "tvlars_scale/training/levers.py",
        "    if not sharded:\n        model.to(memory_format=torch.channels_last)\n",
        "    model.to(memory_format=torch.channels_last)\n",
        (
            f"{UNIT}/test_levers.py::"
            "test_channels_last_gives_nhwc_inputs_and_activations_and_nhwc_weights_unless_sharded",
        ),
    ),
    Mutant(
        "exclude_1d_key_ignored",
        "optim.exclude_1d=false: the trainer's groups exclude 1-D parameters anyway",
        "tvlars_scale/optim/registry.py",
        '        excluded = exclude_1d and (param.ndim <= 1 or name.endswith(".bias"))\n',
        '        excluded = param.ndim <= 1 or name.endswith(".bias")\n',
        (f"{UNIT}/test_build.py::test_exclude_1d_false_decays_and_adapts_the_biases_too",),
    ),
    Mutant(
        "unknown_keys_ignored",
        "config: unknown keys silently ignored",
        "tvlars_scale/config.py",
        'extra="forbid", strict=True',
        'extra="ignore", strict=True',
        (f"{UNIT}/test_config.py::test_invalid_values_name_the_key",),
    ),
)


@dataclass
class Outcome:
    status: str  # caught, SURVIVED, ERROR, TIMEOUT
    by: str
    seconds: float


def tree_files(repo: Path) -> list[str]:
    """Tracked files and untracked ones git does not ignore, as they are in the working tree."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return [
        name
        for name in listed.split("\0")
        if name and ((repo / name).is_file() or (repo / name).is_symlink())
    ]


def copy_tree(repo: Path, destination: Path) -> None:
    for name in tree_files(repo):
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        # A tracked link (configs/ -> tvlars_scale/configs/) stays a link, relative as committed.
        shutil.copy2(repo / name, target, follow_symlinks=False)


def test_env(tree: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(tree),
        "OMP_NUM_THREADS": "1",
        # A restored file may keep the mutant's size and mtime second: never trust bytecode.
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int | None, str, float]:
    """``(pytest exit status or None on timeout, output, seconds)``; stops at the first failure."""
    command = [sys.executable, "-B", "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider"]
    started = time.perf_counter()
    process = subprocess.Popen(
        [*command, *tests],
        cwd=tree,
        env=test_env(tree),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout ends the ranks it spawned too
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        code = None
    return code, output, time.perf_counter() - started


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ", 1)[0]
    return "?"


def run_mutant(tree: Path, mutant: Mutant, timeout: float) -> Outcome:
    path = tree / mutant.path
    if not path.is_file():
        return Outcome("ERROR", f"{mutant.path} does not exist", 0.0)
    original = path.read_text()
    count = original.count(mutant.old)
    if count != 1:
        where = "not found" if count == 0 else f"found {count} times"
        return Outcome("ERROR", f"snippet {where} in {mutant.path}: update the mutant", 0.0)
    path.write_text(original.replace(mutant.old, mutant.new))
    try:
        code, output, seconds = run_tests(tree, mutant.tests, timeout)
    finally:
        path.write_text(original)
    if code is None:
        return Outcome("TIMEOUT", f"after {timeout:.0f} s", seconds)
    if code == 0:
        return Outcome("SURVIVED", "-", seconds)
    if code == 1:  # tests ran and failed
        return Outcome("caught", first_failure(output), seconds)
    # 2: interrupted / collection error, 4: usage, 5: no tests: the mutant or its tests are broken.
    tail = " | ".join(output.strip().splitlines()[-3:])
    return Outcome("ERROR", f"pytest exit {code}: {tail[:160]}", seconds)


def check_imports_from(tree: Path) -> None:
    """The copy, not an installed tvlars_scale, must be what the tests import."""
    found = subprocess.run(
        [sys.executable, "-B", "-c", "import tvlars_scale; print(tvlars_scale.__file__)"],
        cwd=tree,
        env=test_env(tree),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        sys.exit(f"tvlars_scale is imported from {found}, not from the copy {tree}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--tests", nargs="+", help="run these tests instead of each mutant's own")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    args = parser.parse_args(argv)

    mutants = list(MUTANTS)
    if len({m.name for m in mutants}) != len(mutants):
        sys.exit("two mutants share a name")
    if args.only:
        unknown = set(args.only) - {m.name for m in mutants}
        if unknown:
            sys.exit(f"unknown mutants: {', '.join(sorted(unknown))} (see --list)")
        mutants = [m for m in mutants if m.name in args.only]
    if args.tests:
        mutants = [
            Mutant(m.name, m.claim, m.path, m.old, m.new, tuple(args.tests)) for m in mutants
        ]
    if args.list:
        for m in mutants:
            print(f"{m.name:32} {m.path}: {m.claim}\n{'':32} tests: {' '.join(m.tests)}")
        return 0

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tvlars-mutants-") as scratch:
        tree = Path(scratch) / "tree"
        copy_tree(REPO, tree)
        check_imports_from(tree)
        baseline_seconds = 0.0
        if not args.no_baseline:
            union = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            code, output, baseline_seconds = run_tests(tree, union, args.timeout * 2)
            print(
                f"baseline (unmutated, {len(union)} test targets): exit {code}, "
                f"{baseline_seconds:.0f} s",
                flush=True,
            )
            if code != 0:
                print(output[-4000:])
                sys.exit("the tests fail without any mutant: fix that first")
        outcomes = {}
        for mutant in mutants:
            outcome = outcomes[mutant.name] = run_mutant(tree, mutant, args.timeout)
            print(f"  {mutant.name}: {outcome.status} ({outcome.seconds:.0f} s)", flush=True)

    width = max(len(m.name) for m in mutants)
    print(f"\n{'mutant':{width}}  {'caught':8}  {'seconds':>7}  by")
    for mutant in mutants:
        outcome = outcomes[mutant.name]
        print(f"{mutant.name:{width}}  {outcome.status:8}  {outcome.seconds:7.1f}  {outcome.by}")
    caught = [m.name for m in mutants if outcomes[m.name].status == "caught"]
    summary = {
        "mutants": len(mutants),
        "caught": len(caught),
        "survived": [m.name for m in mutants if outcomes[m.name].status == "SURVIVED"],
        "errors": [m.name for m in mutants if outcomes[m.name].status in ("ERROR", "TIMEOUT")],
        "baseline_seconds": round(baseline_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"\n{len(caught)} of {len(mutants)} mutants caught")
    print(json.dumps(summary))
    return 0 if len(caught) == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
