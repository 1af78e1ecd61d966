"""The throughput levers and the run report through the trainer, one real run per setting.

``model.channels_last`` and ``run.compile`` change how the model is computed, not what: the float
sums run in another order, nothing else. Against eager NCHW on the same backend, after one epoch of
the digits quick start (5 optimizer steps at LR 4) the test loss agrees within ``LOSS_RTOL`` and
every exported weight within ``WEIGHT_RTOL`` of its layer's largest magnitude. Their checkpoints
and exports keep the eager names and load into an eager NCHW model, whose outputs are then those of
the export exactly.

Default run: one process, eager vs channels_last (also the metrics.json / TensorBoard keys and the
profiler trace), and channels_last + compile under ZeRO-2 and FSDP2 with two ranks each.
``pytest -m long``: channels_last + compile on one process and under DDP x 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launching import accelerate_launcher, launch, read_metrics, train_command
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tvlars_scale.export import load_exported
from tvlars_scale.models import build_model

pytestmark = [pytest.mark.slow]

QUICK_START = "configs/digits.yaml"
LOSS_RTOL = 1e-3
WEIGHT_RTOL = 1e-3
LEVERS_ON = ("model.channels_last=true", "run.compile=true")
LAUNCHERS = {
    "one": (),
    "ddp": ("accelerate_node.yaml", "--num_processes", "2"),
    "zero2": ("accelerate_zero2.yaml",),
    "fsdp2": ("accelerate_fsdp2.yaml",),
}


def train(run_dir: Path, backend: str, *overrides: str) -> dict:
    launcher = accelerate_launcher(*LAUNCHERS[backend]) if LAUNCHERS[backend] else ()
    command = train_command(
        "--config",
        QUICK_START,
        f"run.output_dir={run_dir}",
        "run.num_epochs=1",
        "run.log_every=1",
        "run.progress_bar=false",
        *overrides,
        launcher=launcher,
    )
    launch(command, timeout=900)
    return read_metrics(run_dir)


def model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    [checkpoint] = sorted((run_dir / "checkpoints").glob("step-*"))
    return torch.load(checkpoint / "model.pt", map_location="cpu")


def assert_levers_match_eager(eager_dir: Path, levers_dir: Path) -> None:
    eager, levers = read_metrics(eager_dir), read_metrics(levers_dir)
    expected, got = eager["final"]["test_loss"], levers["final"]["test_loss"]
    assert abs(got - expected) <= LOSS_RTOL * expected, (got, expected)

    # The checkpoint keeps the eager names (no _orig_mod.) and loads, strictly, into an eager NCHW
    # model, which then computes exactly what the export computes.
    state = model_state(levers_dir)
    assert set(state) == set(model_state(eager_dir))
    nchw = build_model("digits_cnn", 10, in_chans=1, image_size=8)
    nchw.load_state_dict(state)
    assert all(p.is_contiguous() for p in nchw.parameters())
    exported = load_exported(levers_dir / "export").eval()
    images = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(nchw.eval()(images), exported(images))
    reference = load_exported(eager_dir / "export").state_dict()
    for name, weight in exported.state_dict().items():
        scale = reference[name].abs().max().clamp_min(1e-12)
        error = ((weight - reference[name]).abs().max() / scale).item()
        assert error <= WEIGHT_RTOL, (name, error)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("levers")
    train(root / "eager", "one", "run.profile={start_step: 2, num_steps: 2}")
    train(root / "channels_last", "one", "model.channels_last=true")
    return root


def test_channels_last_matches_eager_nchw(one_process):
    assert_levers_match_eager(one_process / "eager", one_process / "channels_last")


def test_quick_start_reports_mfu_memory_and_data_wait(one_process):
    run_dir = one_process / "eager"
    metrics = read_metrics(run_dir)
    assert metrics["mfu"] == "n/a"  # no bf16 peak on the CPU
    assert metrics["peak_memory_rss_mib"] > 50  # python + torch alone take more
    assert 0 < metrics["data_wait_fraction"] < 1
    # digits_cnn on 1 x 8 x 8: three 3x3 convs (1->32 at 8x8, 32->64 and 64->128 at stride 2)
    # and the 128->10 head; forward 2*MACs, backward twice that minus the first conv's input grad.
    macs = [9 * 1 * 32 * 64, 9 * 32 * 64 * 16, 9 * 64 * 128 * 4, 128 * 10]
    assert metrics["model_flops_per_sample"] == 2 * sum(macs) + 4 * sum(macs) - 2 * macs[0]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"data_wait_fraction", "peak_memory_rss_mib"} <= set(scalars)
    assert len(events.Scalars("data_wait_fraction")) == metrics["num_steps"]
    assert "mfu/text_summary" in events.Tags()["tensors"]  # "n/a", once, as text


def test_profiled_steps_leave_a_trace_that_opens(one_process):
    [trace] = (one_process / "eager" / "profile").glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert len(steps) == 2, steps
    assert any(e.get("name") == "aten::convolution" for e in events)


# ~20-45 s each here. The sharded engines run by default: they are where the layout bites (ZeRO and
# FSDP2 need contiguous weights).
@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("one", marks=pytest.mark.long),
        pytest.param("ddp", marks=pytest.mark.long),
        "zero2",
        "fsdp2",
    ],
)
def test_compiled_channels_last_training_matches_eager(backend, tmp_path):
    train(tmp_path / "eager", backend)
    metrics = train(tmp_path / "levers", backend, *LEVERS_ON)
    # digits_cnn is plain convolutions, norms and ReLUs: dynamo traces it whole on every backend.
    assert metrics["compile_graph_breaks"] == 0
    assert_levers_match_eager(tmp_path / "eager", tmp_path / "levers")
