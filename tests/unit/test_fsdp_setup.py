"""The FSDP2 plugin the trainer builds from ``accelerate launch``'s variables and run.mixed_precision."""

import pytest
import torch

from tvlars_scale.accelerate_setup import fsdp2_plugin
from tvlars_scale.config import ConfigError


def test_no_fsdp_without_accelerate_asking_for_it(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert fsdp2_plugin("bf16") is None


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_mixed_precision_policy_from_run_mixed_precision(monkeypatch, precision):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    plugin = fsdp2_plugin(precision)
    assert plugin.fsdp_version == 2
    policy = plugin.mixed_precision_policy
    if precision == "no":
        assert policy is None  # Accelerate then passes MixedPrecisionPolicy(): all fp32
    else:
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (
            half,
            torch.float32,
            torch.float32,
        )


def test_fsdp1_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="fsdp_version"):
        fsdp2_plugin("no")
