"""What the SLURM recipe relies on inside the package: the stop marker rank 0 leaves for the batch
script, and fp32 gradient reduction under half-precision DeepSpeed."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
import torch

from tvlars_scale.accelerate_setup import reduce_gradients_in_fp32
from tvlars_scale.preemption import STOP_MARKER_ENV, PreemptionFlag


def test_the_stop_marker_is_left_only_when_the_run_stops_for_a_signal(tmp_path, monkeypatch):
    marker = tmp_path / "stopped"
    monkeypatch.setenv(STOP_MARKER_ENV, str(marker))
    flag = PreemptionFlag()
    assert not flag.requested(torch.device("cpu"))
    assert not marker.exists()  # a run that goes on (or finishes) leaves none
    flag.received = signal.SIGUSR1
    assert flag.requested(torch.device("cpu"))
    assert marker.read_text() == "SIGUSR1\n"


def _accelerator(precision: str, ds_config: dict) -> SimpleNamespace:
    plugin = SimpleNamespace(deepspeed_config=ds_config)
    return SimpleNamespace(
        mixed_precision=precision, state=SimpleNamespace(deepspeed_plugin=plugin)
    )


@pytest.mark.parametrize(
    ("precision", "expected"), [("bf16", "fp32"), ("fp16", "fp32"), ("no", None)]
)
def test_half_precision_deepspeed_reduces_gradients_in_fp32(precision, expected):
    ds_config: dict = {}
    reduce_gradients_in_fp32(_accelerator(precision, ds_config))
    # fp32 training keeps DeepSpeed's own default (fp32 already): its config is left as it was.
    assert ds_config.get("communication_data_type") == expected
    chosen = {"communication_data_type": "bf16"}  # a config file's own choice stays
    reduce_gradients_in_fp32(_accelerator(precision, chosen))
    assert chosen == {"communication_data_type": "bf16"}
