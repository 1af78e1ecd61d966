"""run.ema (a moving average of the weights) and optim.grad_clip in one process, against timm's
ModelEmaV3 and torch's clip_grad_norm_; the per-layer checkpoint payload with the average; the keys'
validation. The sharded engines are compared with one process in tests/distributed/test_ema_clip_ranks.py."""

from __future__ import annotations

import copy
import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_config import run_cli, write_yaml
from timm.utils.model_ema import ModelEmaV3
from torch import nn

from tvlars_scale.accelerate_setup import put_plan_into_deepspeed
from tvlars_scale.batching import plan_batches
from tvlars_scale.checkpoint.layer_state import (
    capture_layer_state,
    restore_layer_state,
    unsharded_layout,
)
from tvlars_scale.config import ConfigError, load_config
from tvlars_scale.optim import build_optimizer
from tvlars_scale.training.clip import clip_grad_norm
from tvlars_scale.training.ema import WeightEMA, ema_decay


class SmallNet(nn.Module):
    """Conv + BatchNorm (floating buffers, and an integer one) + Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def trained(num_steps: int, ema_settings: dict, grad_clip: float | None = None):
    """SmallNet trained by TVLARS; the average updated after every step, as the trainer does."""
    torch.manual_seed(0)
    model = SmallNet()
    optimizer = build_optimizer("tvlars", model, lr=1.0, weight_decay=5e-4)
    layout = unsharded_layout(model, optimizer)
    ema = WeightEMA(layout, model, **ema_settings)
    timm_ema = ModelEmaV3(copy.deepcopy(model), **_timm_settings(ema_settings))
    norms = []
    for step in range(1, num_steps + 1):
        x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
        F.cross_entropy(model(x), y).backward()
        if grad_clip is not None:
            norms.append(clip_grad_norm(layout, grad_clip))
        optimizer.step()
        optimizer.zero_grad()
        ema.update(step)
        if step % ema_settings.get("every_steps", 1) == 0:
            timm_step = step // ema_settings.get("every_steps", 1)
            timm_ema.update(model, step=timm_step if ema_settings.get("warmup_steps") else None)
    return model, optimizer, layout, ema, timm_ema, norms


def _timm_settings(settings: dict) -> dict:
    decay, warmup = settings["decay"], settings.get("warmup_steps", 0)
    if not warmup:
        return {"decay": decay}
    gamma = warmup / ((1 - decay) ** -1.5 - 1)
    return {"decay": decay, "use_warmup": True, "warmup_gamma": gamma}


@pytest.mark.parametrize(
    "settings",
    [
        {"decay": 0.9},
        {"decay": 0.99, "warmup_steps": 6},
        {"decay": 0.8, "every_steps": 3},
    ],
    ids=["constant", "warmup", "every_3"],
)
def test_the_average_is_timm_model_ema_v3s(settings):
    model, _, _, ema, timm_ema, _ = trained(12, settings)
    ours = ema.state_dict()
    theirs = timm_ema.module.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-6, atol=1e-7, msg=name)
    # Neither the weights nor a copy of them: the comparison can fail.
    assert not torch.allclose(ours["fc.weight"], model.fc.weight)
    assert not torch.allclose(ours["bn.running_var"], model.bn.running_var)


def test_warm_up_reaches_the_decay_at_warmup_steps():
    decays = [ema_decay(t, 0.999, 100) for t in range(150)]
    assert decays[0] == 0.0  # the first update copies the weights
    assert all(a < b for a, b in itertools.pairwise(decays[:101]))
    assert decays[99] < 0.999 and decays[100] == pytest.approx(0.999, abs=1e-12)
    assert set(decays[101:]) == {0.999}
    assert ema_decay(0, 0.999, 0) == 0.999


def test_swapped_in_evaluates_the_average_and_puts_the_weights_back_bitwise():
    model, _, _, ema, timm_ema, _ = trained(5, {"decay": 0.7})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 6, 6)
    model.eval()
    timm_ema.module.eval()
    with ema.swapped_in():
        inside = model(x)
    torch.testing.assert_close(inside, timm_ema.module(x), rtol=1e-5, atol=1e-6)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not torch.allclose(model(x), inside)


def test_clipping_is_torchs_clip_grad_norm():
    torch.manual_seed(0)
    model = SmallNet()
    F.cross_entropy(model(torch.randn(8, 3, 6, 6)), torch.randint(0, 5, (8,))).backward()
    reference = copy.deepcopy(model)  # (deepcopy leaves the gradients behind)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        q.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    norm = clip_grad_norm(unsharded_layout(model, optimizer), 0.1)
    assert float(norm) > 0.1  # it clips
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(after) == pytest.approx(0.1, rel=1e-5)
    # Below the threshold nothing changes.
    grads = [p.grad.clone() for p in model.parameters()]
    clip_grad_norm(unsharded_layout(model, optimizer), 10.0)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))


def test_the_checkpoint_payload_carries_the_average_and_old_payloads_still_load():
    _, optimizer, layout, ema, _, _ = trained(4, {"decay": 0.8})
    payload = capture_layer_state(optimizer, layout, owner=True, ema=ema.shadows)
    _, optimizer2, layout2, fresh, _, _ = trained(1, {"decay": 0.8})
    assert restore_layer_state(optimizer2, layout2, [payload], ema=fresh.shadows)
    for (t, _), (u, _) in zip(layout.items(), layout2.items(), strict=True):
        assert torch.equal(fresh.shadows[id(u)], ema.shadows[id(t)])
    # A payload written without an average (EMA off, or before it existed) loads; the average is
    # reported absent and left as it was.
    old = capture_layer_state(optimizer, layout, owner=True)
    assert all("ema" not in run for run in old["runs"])
    kept = {k: v.clone() for k, v in fresh.shadows.items()}
    assert not restore_layer_state(optimizer2, layout2, [old], ema=fresh.shadows)
    assert all(torch.equal(kept[k], v) for k, v in fresh.shadows.items())


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("run.ema.decay=1", "run.ema.decay", "less than 1"),
        ("run.ema.decay=0", "run.ema.decay", "greater than 0"),
        ("run.ema.warmup_steps=10", "run.ema.decay", "required"),
        ("run.ema.every_steps=0", "run.ema.decay", "required"),
        ("optim.grad_clip=-1", "optim.grad_clip", "greater than or equal to 0"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, key, fragment):
    config = write_yaml(tmp_path / "c.yaml", "run:\n  ema: null\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config, [override])
    assert (caught.value.key, fragment in caught.value.problem) == (key, True)


def test_the_keys_switch_on_from_the_command_line(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", "run:\n  ema: null\n")  # as a resolved config says
    loaded = load_config(config, ["run.ema.decay=0.9998", "optim.grad_clip=1"])
    assert (loaded.run.ema.decay, loaded.run.ema.warmup_steps, loaded.run.ema.every_steps) == (
        0.9998,
        0,
        1,
    )
    assert loaded.optim.grad_clip == 1
    assert load_config(config).run.ema is None and load_config(config).optim.grad_clip is None


def test_cli_exits_2_with_one_line_naming_the_key(tmp_path):
    run_dir = tmp_path / "run"
    config = write_yaml(tmp_path / "c.yaml", f"run:\n  output_dir: {run_dir}\n")
    result = run_cli("--config", str(config), "run.ema.decay=1.5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config error: run.ema.decay: input should be less than 1 (got 1.5)"
    ]
    assert not run_dir.exists()


def _deepspeed_config_after_plan(ds_config: dict, grad_clip) -> dict:
    plugin = SimpleNamespace(deepspeed_config=ds_config)
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
    put_plan_into_deepspeed(accelerator, plan_batches(512, 32, 2), grad_clip)
    return ds_config


def test_grad_clip_drives_deepspeeds_gradient_clipping():
    assert (
        _deepspeed_config_after_plan({"gradient_clipping": "auto"}, 1.5)["gradient_clipping"] == 1.5
    )
    assert _deepspeed_config_after_plan({}, None)["gradient_clipping"] == 0.0
    # The shipped JSONs' 0.0 (not "auto", which Accelerate alone makes 1.0) is the key's to set.
    assert _deepspeed_config_after_plan({"gradient_clipping": 0.0}, 1.5)["gradient_clipping"] == 1.5
    assert _deepspeed_config_after_plan({"gradient_clipping": 0.0}, None)["gradient_clipping"] == 0
    assert _deepspeed_config_after_plan({"gradient_clipping": 1.5}, 1.5)["gradient_clipping"] == 1.5
    with pytest.raises(ConfigError) as caught:
        _deepspeed_config_after_plan({"gradient_clipping": 2.0}, 1.5)
    assert caught.value.key == "deepspeed.gradient_clipping"
