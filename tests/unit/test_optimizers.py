"""The optimizers against the formulas, computed independently here (float64, plain tensor math)."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from torch import nn

import tvlars_scale  # noqa: F401  (registers with timm)
from tvlars_scale.optim import LAMB, LARS, TVLARS, layerwise_param_groups
from tvlars_scale.optim.functional import sum_of_squares

WD, LR, MU, ETA = 5e-4, 2.0, 0.9, 1e-3


def make_problem(seed=0, shape=(3, 4)):
    """A 2-D weight (adapted) and a bias (excluded by exclude_1d), with three steps of gradients."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(*shape, generator=gen, dtype=torch.float64)
    bias = torch.randn(shape[-1], generator=gen, dtype=torch.float64)
    grads = [
        (
            torch.randn(*shape, generator=gen, dtype=torch.float64),
            torch.randn(shape[-1], generator=gen, dtype=torch.float64),
        )
        for _ in range(3)
    ]
    return weight, bias, grads


def run_ours(optimizer_factory, weight, bias, grads):
    w, b = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())
    optimizer = optimizer_factory([w, b])
    for gw, gb in grads:
        w.grad, b.grad = gw.clone(), gb.clone()
        optimizer.step()
    return w.detach(), b.detach()


def norm(x):
    return math.sqrt(float((x * x).sum()))


def phi_paper(t, lmbda, alpha, delay, gamma_min):
    return 1.0 / (alpha + math.exp(lmbda * (t - delay))) + gamma_min


# (64, 512): a layer large enough for the CPU's BLAS norm path (functional.SMALL_TENSOR_NUMEL).
@pytest.mark.parametrize("shape", [(3, 4), (64, 512)])
@pytest.mark.parametrize("foreach", [True, False])
def test_tvlars_paper_three_steps(foreach, shape):
    weight, bias, grads = make_problem(shape=shape)
    lmbda, alpha, delay, gmin = 0.3, 1.0, 1, 0.05
    got = run_ours(
        lambda p: TVLARS(
            p,
            lr=LR,
            momentum=MU,
            weight_decay=WD,
            eta=ETA,
            lmbda=lmbda,
            alpha=alpha,
            delay_steps=delay,
            gamma_min=gmin,
            foreach=foreach,
        ),
        weight,
        bias,
        grads,
    )

    # Algorithm 1 in its m-form: m_{t+1} = w_t - gamma d; w_{t+1} = m_{t+1} + mu (m_{t+1} - m_t), m_0 = w_0.
    expected = []
    for w0, adapted, index in ((weight, True, 0), (bias, False, 1)):
        w, m = w0.clone(), w0.clone()
        for t, step_grads in enumerate(grads):
            g = step_grads[index]
            d = g + WD * w if adapted else g
            trust = ETA * norm(w) / norm(d) if adapted else 1.0
            gamma = LR * phi_paper(t, lmbda, alpha, delay, gmin) * trust
            m_next = w - gamma * d
            w = m_next + MU * (m_next - m)
            m = m_next
        expected.append(w)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-12)


# delay 2: steps 0 and 1 are plain LARS, step 2 decays (t counted from the start of training);
# delay 0: the no-delay form (every step decays).
@pytest.mark.parametrize("delay", [2, 0])
@pytest.mark.parametrize("foreach", [True, False])
def test_tvlars_official_three_steps(foreach, delay):
    weight, bias, grads = make_problem(1)
    weight *= 8.0  # ||w|| > 10: the official code clamps it
    lmbda = 0.2
    optimizers = []

    def build(p):
        optimizers.append(
            TVLARS(
                p,
                lr=LR,
                momentum=MU,
                weight_decay=WD,
                eta=ETA,
                lmbda=lmbda,
                delay_steps=delay,
                variant="official",
                foreach=foreach,
            )
        )
        return optimizers[-1]

    got = run_ours(build, weight, bias, grads)

    expected, phases = [], []
    for w0, adapted, index in ((weight, True, 0), (bias, False, 1)):
        w, buf = w0.clone(), torch.zeros_like(w0)
        for t, step_grads in enumerate(grads):
            g = step_grads[index]
            d = g + WD * w if adapted else g
            if adapted:
                wn, dn = min(norm(w), 10.0), min(norm(d), 10.0)
                # KhoiDOO/tvlars 10bcfd2: plain LARS while int(step_cnt / steps_per_epoch) < delay
                # epochs, then eta / (0.1 + exp(lmbda (step_cnt + 1))), step_cnt from the start.
                in_delay = t < delay
                phi = 1.0 if in_delay else 1.0 / (0.1 + math.exp(lmbda * (t + 1)))
                phases.append("delay" if in_delay else "decay")
                ratio = ETA * phi * wn / dn
            else:
                ratio = 1.0
            buf = MU * buf + ratio * d
            w = w - LR * buf
        expected.append(w)
    assert norm(weight) > 10
    assert phases == (["delay", "delay", "decay"] if delay else ["decay"] * 3)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-12)
    # The factor of the last step: after the delay it is already 1 / (0.1 + e^(3 lmbda)).
    assert optimizers[-1].last_phi == pytest.approx(1.0 / (0.1 + math.exp(3 * lmbda)))


# eps 0.5 against ||g|| + wd ||w|| of about 3.5: dropping or misplacing eps moves the weights by
# ~1e-3, far over the tolerance (at eps 1e-8 the difference would hide under it).
@pytest.mark.parametrize("eps", [0.0, 0.5])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("foreach", [True, False])
def test_lars_three_steps(foreach, nesterov, eps):
    weight, bias, grads = make_problem(2)
    got = run_ours(
        lambda p: LARS(
            p,
            lr=LR,
            momentum=MU,
            weight_decay=WD,
            eta=ETA,
            eps=eps,
            nesterov=nesterov,
            foreach=foreach,
        ),
        weight,
        bias,
        grads,
    )

    expected = []
    for w0, adapted, index in ((weight, True, 0), (bias, False, 1)):
        w, buf = w0.clone(), None
        for step_grads in grads:
            g = step_grads[index]
            if adapted:
                trust = ETA * norm(w) / (norm(g) + WD * norm(w) + eps)
                d = (g + WD * w) * trust
            else:
                d = g
            buf = d.clone() if buf is None else MU * buf + d  # Flash: first buffer is the direction
            w = w - LR * (d + MU * buf if nesterov else buf)
        expected.append(w)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("foreach", [True, False])
def test_lamb_three_steps(foreach):
    weight, bias, grads = make_problem(3)
    weight *= 6.0  # ||w|| > clamp_value
    beta1, beta2, eps, wd, lr = 0.9, 0.99, 1e-6, 0.01, 0.05
    got = run_ours(
        lambda p: LAMB(p, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, foreach=foreach),
        weight,
        bias,
        grads,
    )

    expected = []
    for w0, adapted, index in ((weight, True, 0), (bias, False, 1)):
        w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
        for step_grads in grads:
            g = step_grads[index]
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            u = m / (v.sqrt() + eps) + (wd * w if adapted else 0)
            trust = min(norm(w), 10.0) / norm(u) if adapted else 1.0
            w = w - lr * trust * u
        expected.append(w)
    assert norm(weight) > 10
    torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-12)


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


FACTORIES = {
    "tvlars": lambda groups, foreach: TVLARS(
        groups, lr=3.0, lmbda=0.1, delay_steps=2, foreach=foreach
    ),
    "tvlars_official": lambda groups, foreach: TVLARS(
        groups, lr=3.0, lmbda=0.1, variant="official", foreach=foreach
    ),
    "lars": lambda groups, foreach: LARS(groups, lr=3.0, nesterov=True, foreach=foreach),
    "lamb": lambda groups, foreach: LAMB(groups, lr=0.01, weight_decay=0.01, foreach=foreach),
}


def train(model, optimizer, num_steps=4, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(num_steps):
        x = torch.randn(6, 3, 4, 4, generator=gen).to(dtype)
        y = torch.randint(0, 5, (6,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_loop_and_foreach_paths_agree_bitwise(name, dtype):
    # The two executors run the same arithmetic, also where torch._foreach_mul_ would round a
    # Python scalar to bf16 on the CPU (LAMB's betas): the weights agree bit for bit.
    torch.manual_seed(0)
    reference = SmallNet().to(dtype)
    results = []
    for foreach in (True, False):
        model = copy.deepcopy(reference)
        optimizer = FACTORIES[name](layerwise_param_groups(model, 5e-4), foreach)
        train(model, optimizer, dtype=dtype)
        results.append(model.state_dict())
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key
    moved = [k for k in results[0] if not torch.equal(results[0][k], reference.state_dict()[k])]
    assert "conv.weight" in moved and "bn.bias" in moved and "fc.bias" in moved


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("foreach", [True, False])
def test_zero_weights_and_zero_gradients_stay_finite(name, foreach):
    params = [
        nn.Parameter(torch.zeros(4, 3)),
        nn.Parameter(torch.zeros(3)),
        nn.Parameter(torch.randn(2, 2)),
    ]
    optimizer = FACTORIES[name](params, foreach)
    for step in range(3):
        for p in params:
            p.grad = torch.zeros_like(p) if step != 1 else torch.randn_like(p)
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in params)
    # ||w|| = 0 gives trust 1, not 0: a zero-initialised layer still trains.
    assert params[0].abs().sum() > 0
    stats = optimizer.layer_stats()
    assert all(math.isfinite(v) for layer in stats.values() for v in layer.values())


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_step_counter_advances_once_per_step_and_round_trips(name):
    torch.manual_seed(0)
    model = SmallNet()
    optimizer = FACTORIES[name](layerwise_param_groups(model, 5e-4), None)
    train(model, optimizer, num_steps=3)
    assert {optimizer.state[p]["step"] for p in model.parameters()} == {3}

    # Continue a copy from the state_dict; both must then take identical steps.
    clone = copy.deepcopy(model)
    restored = FACTORIES[name](layerwise_param_groups(clone, 5e-4), None)
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert {restored.state[p]["step"] for p in clone.parameters()} == {3}
    train(model, optimizer, num_steps=3, seed=1)
    train(clone, restored, num_steps=3, seed=1)
    for (key, a), b in zip(model.state_dict().items(), clone.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_phi_continues_from_restored_step():
    p = nn.Parameter(torch.randn(3, 3))
    optimizer = TVLARS([p], lr=1.0, lmbda=0.5, delay_steps=1)
    for _ in range(4):
        p.grad = torch.randn(3, 3)
        optimizer.step()
    restored = TVLARS([nn.Parameter(p.detach().clone())], lr=1.0, lmbda=0.5, delay_steps=1)
    restored.load_state_dict(optimizer.state_dict())
    restored.param_groups[0]["params"][0].grad = torch.randn(3, 3)
    restored.step()
    assert restored.last_phi == pytest.approx(phi_paper(4, 0.5, 1.0, 1, 0.0))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_converges_on_a_quadratic(name):
    target = torch.linspace(-2, 2, 12).reshape(3, 4)
    w = nn.Parameter(torch.zeros(3, 4) + 0.1)
    optimizer = {
        "tvlars": lambda: TVLARS([w], lr=200.0, weight_decay=0.0, lmbda=0.01, delay_steps=100),
        "tvlars_official": lambda: TVLARS(
            [w], lr=200.0, weight_decay=0.0, lmbda=0.001, variant="official"
        ),
        "lars": lambda: LARS([w], lr=50.0, weight_decay=0.0),
        "lamb": lambda: LAMB([w], lr=0.05),
    }[name]()
    for _ in range(500):
        optimizer.zero_grad()
        loss = ((w - target) ** 2).sum()
        loss.backward()
        optimizer.step()
    assert ((w - target) ** 2).sum().item() < 1e-2 * (target**2).sum().item()


@pytest.mark.parametrize("name", ["tvlars", "lars", "lamb"])
def test_converges_on_rosenbrock(name):
    xy = nn.Parameter(torch.tensor([[-1.5, 2.0]]))  # one 2-D "layer": adapted
    optimizer = {
        "tvlars": lambda: TVLARS([xy], lr=20.0, weight_decay=0.0, lmbda=0.002, delay_steps=1000),
        "lars": lambda: LARS([xy], lr=5.0, weight_decay=0.0),
        "lamb": lambda: LAMB([xy], lr=0.02, betas=(0.9, 0.999)),
    }[name]()
    # LAMB's step has length lr * ||w|| whatever the gradient, so at a constant lr it circles the
    # minimum at that radius (+-0.1 here); it converges, as used in practice, with a decaying lr.
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 3000) if name == "lamb" else None
    for _ in range(3000):
        optimizer.zero_grad()
        x, y = xy[0, 0], xy[0, 1]
        loss = (1 - x) ** 2 + 100 * (y - x**2) ** 2
        loss.backward()
        optimizer.step()
        if decay is not None:
            decay.step()
    assert torch.allclose(xy.detach(), torch.tensor([[1.0, 1.0]]), atol=0.1), xy


def test_tvlars_without_adaptation_is_nesterov_sgd():
    """With adaptation off and a constant phi (lmbda = 0), TVLARS is SGD with Nesterov momentum at lr*phi."""
    torch.manual_seed(0)
    model = SmallNet()
    twin = copy.deepcopy(model)
    alpha, gamma_min = 0.5, 0.1
    phi = 1.0 / (alpha + 1.0) + gamma_min
    ours = TVLARS(
        [{"params": model.parameters(), "adapt": False}],
        lr=0.3,
        lmbda=0.0,
        alpha=alpha,
        gamma_min=gamma_min,
        weight_decay=1e-3,
        exclude_1d=False,
    )
    reference = torch.optim.SGD(
        twin.parameters(), lr=0.3 * phi, momentum=0.9, nesterov=True, weight_decay=1e-3
    )
    train(model, ours, num_steps=5)
    train(twin, reference, num_steps=5)
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=key)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda g: [torch.randn(64, 512, generator=g)], id="large-fp32"),
        pytest.param(lambda g: [torch.randn(64, 512, generator=g).double()], id="large-fp64"),
        pytest.param(
            lambda g: [
                torch.randn(64, 32, 4, 4, generator=g).to(memory_format=torch.channels_last)
            ],
            id="large-channels-last",
        ),
        pytest.param(lambda g: [torch.randn(64, 512, generator=g).bfloat16()], id="large-bf16"),
        pytest.param(lambda g: [torch.randn(n, generator=g) for n in (1, 7, 300)], id="small"),
        pytest.param(
            lambda g: [torch.randn(300, generator=g), torch.randn(64, 512, generator=g)],
            id="mixed-sizes",
        ),
        pytest.param(lambda g: [torch.zeros(64, 512)], id="zeros"),
    ],
)
def test_sum_of_squares_on_every_path(make):
    tensors = make(torch.Generator().manual_seed(0))
    got = sum_of_squares(tensors)
    expected = torch.tensor([float((t.double() ** 2).sum()) for t in tensors], dtype=torch.float64)
    assert got.dtype in (torch.float32, torch.float64)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0.0)


def test_layer_stats_are_the_layer_norms():
    torch.manual_seed(0)
    model = SmallNet()
    optimizer = TVLARS(layerwise_param_groups(model, WD), lr=1.0)
    x = torch.randn(6, 3, 4, 4)
    model(x).square().mean().backward()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    optimizer.step()
    stats = optimizer.layer_stats()
    w, g = before["conv.weight"]
    d = g + WD * w
    assert stats["conv.weight"]["weight_norm"] == pytest.approx(w.norm().item(), rel=1e-5)
    assert stats["conv.weight"]["update_norm"] == pytest.approx(d.norm().item(), rel=1e-5)
    assert stats["conv.weight"]["trust_ratio"] == pytest.approx(
        ETA * w.norm().item() / d.norm().item(), rel=1e-5
    )
    assert stats["bn.weight"]["trust_ratio"] == 1.0
    assert set(stats) == set(before)


def test_step_makes_no_host_sync(monkeypatch):
    """No .item(), no Python branch on a tensor value inside step()."""
    torch.manual_seed(0)
    model = SmallNet()
    optimizers = [
        factory(layerwise_param_groups(model, WD), True) for factory in FACTORIES.values()
    ]
    model(torch.randn(2, 3, 4, 4)).sum().backward()

    def refuse(*_args, **_kwargs):
        raise AssertionError("host sync inside step()")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    for optimizer in optimizers:
        optimizer.step()


def test_timm_factory_builds_ours():
    model = SmallNet()
    paper = timm.optim.create_optimizer_v2(model, "tvlars", lr=2.0, weight_decay=5e-4)
    official = timm.optim.create_optimizer_v2(model, "tvlars_official", lr=2.0, weight_decay=5e-4)
    assert isinstance(paper, TVLARS) and paper.defaults["variant"] == "paper"
    assert isinstance(official, TVLARS) and official.defaults["variant"] == "official"
    assert {g["weight_decay"] for g in paper.param_groups} == {0.0, 5e-4}


def test_timm_registration_is_idempotent_and_public(caplog):
    from tvlars_scale.optim import register_with_timm

    before = {name: timm.optim.get_optimizer_info(name) for name in ("tvlars", "tvlars_official")}
    with caplog.at_level("WARNING"):
        register_with_timm()
    assert not caplog.records  # timm warns when a name is registered again
    for name, info in before.items():
        assert timm.optim.get_optimizer_info(name) is info
        assert info.opt_class is TVLARS
    assert before["tvlars_official"].defaults == {"variant": "official"}
    official = timm.optim.get_optimizer_class("tvlars_official")(
        [nn.Parameter(torch.ones(2))], lr=1
    )
    assert official.defaults["variant"] == "official"


def test_flags_are_keyword_only():
    params = [nn.Parameter(torch.ones(2, 2))]
    with pytest.raises(TypeError):
        TVLARS(params, 1.0, 0.9, 5e-4, 1e-3, 1e-4, 1.0, 0, 0.0, "official")
    with pytest.raises(TypeError):
        LARS(params, 1.0, 0.9, 5e-4, 1e-3, 1e-8, False, True)
    with pytest.raises(TypeError):
        LAMB(params, 1e-3, (0.9, 0.999), 1e-6, 0.0, 10.0, True)
    assert LARS(params, 1.0, 0.9, 5e-4, 1e-3, 1e-8, True).defaults["nesterov"]  # as torch SGD


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-1.0),
        dict(lr=1.0, momentum=-0.1),
        dict(lr=1.0, lmbda=-1e-4),
        dict(lr=1.0, alpha=0.0),
        dict(lr=1.0, variant="nope"),
        dict(lr=1.0, variant="official", alpha=0.5),
        dict(lr=1.0, variant="official", gamma_min=0.1),
        dict(lr=1.0, variant="official", delay_steps=-1),
        dict(lr=float("nan")),
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        TVLARS([nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_flat_partition_without_layout_is_refused():
    """Under ZeRO the optimizer steps flat partitions it was not given: it must not guess norms."""
    weight = nn.Parameter(torch.randn(4, 4))
    optimizer = TVLARS([weight], lr=1.0)
    flat = nn.Parameter(torch.randn(16))  # what DeepSpeed puts into param_groups
    flat.grad = torch.randn(16)
    optimizer.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="bind_zero"):
        optimizer.step()
