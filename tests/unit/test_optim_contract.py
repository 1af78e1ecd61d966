"""The contracts users of timm's and PyTorch's optimizers rely on, checked for ours.

What timm's ``tests/test_optim.py`` and PyTorch's optimizer tests check of a first-order optimizer:
built by timm's factory under every name we register (with and without ``lr``, with per-group
settings), the loss of a weight and a bias goes down, a ``state_dict`` taken mid-run continues
bitwise in a fresh optimizer, Rosenbrock, closures, hooks, ``add_param_group``, a tensor ``lr``,
``torch.compile(step, fullgraph=True)``, and sparse or complex gradients refused. The formulas
themselves are checked in test_optimizers.py.
"""

from __future__ import annotations

import copy
import inspect
import io
import itertools

import pytest
import timm
import torch
from torch import nn
from torch.nn import Parameter
from torch.optim.optimizer import register_optimizer_step_post_hook

import tvlars_scale  # noqa: F401  (registers with timm)
from tvlars_scale.optim import LAMB, LARS, OPTIMIZERS, TVLARS

NAMES = sorted(OPTIMIZERS)  # tvlars, tvlars_official, lars, lamb: built with their defaults
CLASSES = (TVLARS, LARS, LAMB)
TIMM_NAMES = sorted(
    name
    for name in timm.optim.list_optimizers()
    if timm.optim.get_optimizer_info(name).opt_class in CLASSES
)


def default_lr(cls) -> float:
    return inspect.signature(cls).parameters["lr"].default


def weight_bias_problem(seed=0, contiguous=True):
    """timm's basic case: a weight and a bias, ``loss = ||W x + b||^2``."""
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        weight, bias = torch.randn(10, 5, generator=gen), torch.randn(10, generator=gen)
    else:  # every other element of a larger tensor
        weight = torch.randn(10, 5, 2, generator=gen)[..., 0]
        bias = torch.randn(10, 2, generator=gen)[..., 0]
    return Parameter(weight), Parameter(bias), torch.randn(5, generator=gen)


def loss_closure(optimizer, weight, bias, x):
    def closure():
        optimizer.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    return closure


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1), nn.Sigmoid())


def test_every_registered_name_is_found():
    # 'official' is the alias timm's name parsing needs ('a_b' reads as option 'a' for 'b').
    assert TIMM_NAMES == ["official", "tvlars", "tvlars_official"]


@pytest.mark.parametrize("cls", CLASSES)
def test_lr_has_a_default(cls):
    lr = default_lr(cls)
    assert isinstance(lr, float) and lr > 0
    assert cls([Parameter(torch.ones(2, 2))]).defaults["lr"] == lr


@pytest.mark.parametrize("lr", [None, 0.5])
@pytest.mark.parametrize("name", TIMM_NAMES)
def test_timm_factory_builds_and_steps(name, lr):
    """``create_optimizer_v2(params, name)``: ``lr=None`` means the optimizer's default."""
    model = small_model()
    before = copy.deepcopy(model.state_dict())
    optimizer = timm.optim.create_optimizer_v2(model.parameters(), name, lr=lr)
    info = timm.optim.get_optimizer_info(name)
    assert type(optimizer) is info.opt_class
    assert optimizer.defaults["variant"] == (info.defaults or {}).get("variant", "paper")
    assert optimizer.defaults["lr"] == (default_lr(info.opt_class) if lr is None else lr)
    assert optimizer.defaults["momentum"] == 0.9  # timm's momentum for has_momentum
    model(torch.ones(4, 2)).sum().backward()
    optimizer.step()
    after = model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_timm_factory_passes_its_arguments(name):
    """A model (timm splits off the 1-D parameters from weight decay), momentum, foreach."""
    model = small_model()
    optimizer = timm.optim.create_optimizer_v2(
        model, name, lr=0.3, weight_decay=1e-4, momentum=0.8, foreach=False
    )
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 1e-4}
    assert {g["momentum"] for g in optimizer.param_groups} == {0.8}
    assert optimizer.foreach is False


@pytest.mark.parametrize("lr", [None, 1e-3])
@pytest.mark.parametrize("name", TIMM_NAMES)
def test_timm_factory_keeps_per_group_settings(name, lr):
    weight, bias, x = weight_bias_problem()
    groups = [{"params": [weight]}, {"params": [bias], "lr": 1e-2, "momentum": 0.5}]
    optimizer = timm.optim.create_optimizer_v2(groups, name, lr=lr)
    base = default_lr(TVLARS) if lr is None else lr
    assert [g["lr"] for g in optimizer.param_groups] == [base, 1e-2]
    assert [g["momentum"] for g in optimizer.param_groups] == [0.9, 0.5]
    closure = loss_closure(optimizer, weight, bias, x)
    initial = closure().item()
    for _ in range(50):
        optimizer.step(closure)
    assert closure().item() < initial


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_timm_model_loss_decreases_every_step(name):
    """timm's model check: a two-layer sigmoid net, built by the factory at the default lr."""
    model = small_model()
    optimizer = timm.optim.create_optimizer_v2(model, name)
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]).reshape(3, 2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = model(x).sum()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert all(a > b for a, b in itertools.pairwise(losses)), losses


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_weight_and_bias_loss_goes_down(name, foreach, contiguous):
    """At the defaults (lr included), on contiguous and strided parameters."""
    weight, bias, x = weight_bias_problem(contiguous=contiguous)
    optimizer = OPTIMIZERS[name]([weight, bias], foreach=foreach)
    assert type(optimizer).__name__ in repr(optimizer)
    closure = loss_closure(optimizer, weight, bias, x)
    initial = closure().item()
    for _ in range(200):
        optimizer.step(closure)
    assert closure().item() < 0.5 * initial


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_mid_run_continues_bitwise(name, foreach):
    weight, bias, x = weight_bias_problem()
    optimizer = OPTIMIZERS[name]([weight, bias], lr=0.01, foreach=foreach)
    closure = loss_closure(optimizer, weight, bias, x)
    for _ in range(10):
        optimizer.step(closure)
    # Through bytes, as a checkpoint is: torch.load's default weights_only must accept it.
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    weight_c, bias_c = (Parameter(p.detach().clone()) for p in (weight, bias))
    resumed = OPTIMIZERS[name]([weight_c, bias_c], lr=0.01, foreach=foreach)
    resumed.load_state_dict(saved)
    closure_c = loss_closure(resumed, weight_c, bias_c, x)
    for _ in range(10):
        optimizer.step(closure)
        resumed.step(closure_c)
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    state, state_c = optimizer.state_dict(), resumed.state_dict()
    assert state["param_groups"] == state_c["param_groups"]
    for index, values in state["state"].items():
        for key, value in values.items():
            assert torch.equal(
                torch.as_tensor(value), torch.as_tensor(state_c["state"][index][key])
            )


# (name, exclude_1d) -> lr: the 1-D point is a plain momentum step (excluded) or an adapted layer.
ROSENBROCK_LR = {
    ("tvlars", True): 2e-3,
    ("tvlars_official", True): 1e-3,
    ("lars", True): 1e-3,
    ("lamb", True): 0.1,
    ("tvlars", False): 0.2,
    ("tvlars_official", False): 0.1,
    ("lars", False): 0.1,
    ("lamb", False): 1e-3,
}


@pytest.mark.parametrize("exclude_1d", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_rosenbrock_converges(name, exclude_1d):
    """From (1.5, 1.5) to the minimum at (1, 1), stepping with a closure (timm's setup)."""
    point = Parameter(torch.tensor([1.5, 1.5]))
    optimizer = OPTIMIZERS[name](
        [point], lr=ROSENBROCK_LR[name, exclude_1d], exclude_1d=exclude_1d, weight_decay=0.0
    )

    def closure():
        optimizer.zero_grad()
        x, y = point
        loss = (1 - x) ** 2 + 100 * (y - x**2) ** 2
        loss.backward()
        return loss

    for _ in range(1000):
        optimizer.step(closure)
    assert point.detach().dist(torch.tensor([1.0, 1.0])) < 0.05, point


def run_weight_bias(name, *, use_closure, num_steps=3):
    """The basic case stepped with a closure or after a backward; the closure's calls recorded."""
    weight, bias, x = weight_bias_problem()
    optimizer = OPTIMIZERS[name]([weight, bias], lr=0.01)
    closure = loss_closure(optimizer, weight, bias, x)
    grad_enabled_in_closure = []

    def recorded():
        grad_enabled_in_closure.append(torch.is_grad_enabled())
        return closure()

    returned = []
    for _ in range(num_steps):
        if not use_closure:
            closure()
        returned.append(optimizer.step(recorded if use_closure else None))
    return (weight.detach(), bias.detach()), returned, grad_enabled_in_closure


@pytest.mark.parametrize("name", NAMES)
def test_closure_is_called_once_with_grad_enabled_and_its_loss_returned(name):
    params, returned, calls = run_weight_bias(name, use_closure=True)
    assert calls == [True] * 3
    assert all(torch.is_tensor(loss) and loss.requires_grad for loss in returned)
    reference, returned, calls = run_weight_bias(name, use_closure=False)
    assert returned == [None] * 3 and not calls
    assert all(torch.equal(a, b) for a, b in zip(params, reference, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_step_and_state_dict_hooks(name):
    weight, bias, x = weight_bias_problem()
    optimizer = OPTIMIZERS[name]([weight, bias], lr=0.01)
    seen = []

    def pre(opt, args, kwargs):
        assert opt is optimizer
        seen.append(("pre", weight.detach().clone()))

    def post(opt, args, kwargs):
        seen.append(("post", weight.detach().clone()))

    handles = [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]
    global_handle = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: seen.append(("global", None))
    )
    closure = loss_closure(optimizer, weight, bias, x)
    try:
        optimizer.step(closure)
    finally:
        global_handle.remove()
    assert [kind for kind, _ in seen] == ["pre", "post", "global"]
    assert not torch.equal(seen[0][1], seen[1][1])  # the step ran between the hooks
    for handle in handles:
        handle.remove()
    optimizer.step(closure)
    assert len(seen) == 3

    def tag_state(opt, state_dict):
        state_dict["tag"] = "hooked"

    optimizer.register_state_dict_post_hook(tag_state)
    state_dict = optimizer.state_dict()
    assert state_dict["tag"] == "hooked"
    loaded = []
    resumed = OPTIMIZERS[name](
        [Parameter(weight.detach().clone()), Parameter(bias.detach().clone())]
    )
    resumed.register_load_state_dict_pre_hook(lambda opt, sd: loaded.append(sd.pop("tag")))
    resumed.load_state_dict(state_dict)
    assert loaded == ["hooked"]


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group(name):
    """The new group takes the defaults it does not set and its own lr, and steps like a fresh
    optimizer of that group alone (the update of a layer depends on that layer only)."""
    weight, bias, x = weight_bias_problem()
    optimizer = OPTIMIZERS[name]([weight], lr=0.01)
    closure = loss_closure(optimizer, weight, bias, x)
    optimizer.step(closure)
    lone_bias = Parameter(bias.detach().clone())
    optimizer.add_param_group({"params": [bias], "lr": 0.003})
    added = optimizer.param_groups[-1]
    assert added["lr"] == 0.003
    assert {k: v for k, v in added.items() if k not in ("params", "lr")} == {
        k: v for k, v in optimizer.defaults.items() if k != "lr"
    }
    alone = OPTIMIZERS[name]([lone_bias], lr=0.003)
    for _ in range(3):
        optimizer.step(closure)  # the closure's gradient is taken where lone_bias still is
        lone_bias.grad = bias.grad.clone()
        alone.step()
    assert torch.equal(bias, lone_bias)
    with pytest.raises(ValueError, match="more than one parameter group"):
        optimizer.add_param_group({"params": [weight]})
    assert len(optimizer.param_groups) == 2


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr(name, foreach):
    """A 0-dim tensor lr steps as the float does, and a scheduler's in-place change reaches it."""
    results = []
    for as_tensor in (False, True):
        weight, bias, x = weight_bias_problem()
        lr = torch.tensor(0.01) if as_tensor else 0.01
        optimizer = OPTIMIZERS[name]([weight, bias], lr=lr, foreach=foreach)
        closure = loss_closure(optimizer, weight, bias, x)
        for step in range(6):
            if step == 3:
                scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
            optimizer.step(closure)
            if step >= 3:
                scheduler.step()
        assert torch.is_tensor(optimizer.param_groups[0]["lr"]) is as_tensor
        results.append((weight.detach(), bias.detach()))
    for ours, reference in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference)
    with pytest.raises(ValueError, match="one element"):
        OPTIMIZERS[name]([Parameter(torch.ones(2, 2))], lr=torch.tensor([0.1, 0.2]))


def compiled_and_eager(name, backend, num_steps=4):
    """Parameters after ``num_steps`` (beyond the official variant's delay) eager and compiled."""
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        weight, bias, x = weight_bias_problem()
        kwargs = {"delay_steps": 2} if name == "tvlars_official" else {}
        optimizer = OPTIMIZERS[name]([weight, bias], lr=0.01, **kwargs)
        closure = loss_closure(optimizer, weight, bias, x)
        step = (
            torch.compile(optimizer.step, fullgraph=True, backend=backend)
            if compiled
            else optimizer.step
        )
        for _ in range(num_steps):
            closure()
            step()
        results.append((weight.detach(), bias.detach()))
    torch._dynamo.reset()
    return results


@pytest.mark.parametrize("name", NAMES)
def test_compiled_step_is_one_graph_with_the_eager_result(name):
    """fullgraph=True fails on any graph break; the captured graphs run eagerly (no C++ build)."""
    eager, compiled = compiled_and_eager(name, backend="eager")
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled, strict=True))


@pytest.mark.long
@pytest.mark.parametrize("name", NAMES)
def test_inductor_compiled_step_matches_eager(name):
    """Inductor's fused CPU kernels: equal to rounding (minutes of C++ compilation here)."""
    eager, compiled = compiled_and_eager(name, backend="inductor")
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradients_are_refused(name):
    embedding = nn.Embedding(10, 4, sparse=True)
    optimizer = OPTIMIZERS[name](embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        optimizer.step()


@pytest.mark.parametrize("name", NAMES)
def test_complex_parameters_are_refused(name):
    real, complex_ = Parameter(torch.ones(2, 2)), Parameter(torch.ones(2, 2, dtype=torch.cfloat))
    with pytest.raises(ValueError, match="complex"):
        OPTIMIZERS[name]([real, complex_])
    optimizer = OPTIMIZERS[name]([real])
    with pytest.raises(ValueError, match="view_as_real"):
        optimizer.add_param_group({"params": [complex_]})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("name", NAMES)
def test_parameters_without_gradients_are_left_alone(name):
    weight, bias, x = weight_bias_problem()
    frozen = Parameter(torch.randn(3, 3))
    optimizer = OPTIMIZERS[name]([weight, frozen, bias], lr=0.01)
    closure = loss_closure(optimizer, weight, bias, x)
    before = frozen.detach().clone()
    for _ in range(3):
        optimizer.step(closure)
    assert torch.equal(frozen, before) and frozen not in optimizer.state
