"""tvlars_scale.training: the levers' pieces (blocks, names, layouts) and the report's FLOPs / peaks."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from torch import nn

from tvlars_scale.checkpoint.layer_state import (
    capture_layer_state,
    restore_layer_state,
    unsharded_layout,
)
from tvlars_scale.models import build_model
from tvlars_scale.optim import TVLARS, layerwise_param_groups
from tvlars_scale.train import main as train_main
from tvlars_scale.training.levers import (
    compile_in_place,
    graph_breaks,
    repeated_blocks,
    to_channels_last,
)
from tvlars_scale.training.reporting import peak_bf16_flops, train_flops

REPO = Path(__file__).resolve().parents[2]


def test_regional_compilation_picks_the_residual_blocks():
    resnet = timm.create_model("resnet18", num_classes=10)
    blocks = repeated_blocks(resnet)
    assert len(blocks) == 8 and {type(b).__name__ for b in blocks} == {"BasicBlock"}
    # digits_cnn repeats only leaf layers (conv, norm, ReLU): no block, the whole model compiles.
    assert repeated_blocks(build_model("digits_cnn", 10, in_chans=1, image_size=8)) == []


@pytest.mark.parametrize("regional", [True, False])
def test_compiling_in_place_keeps_the_eager_names(regional):
    resnet = timm.create_model("resnet18", num_classes=10)
    names = list(resnet.state_dict())
    compile_in_place(resnet, regional=regional)  # compiles lazily: nothing runs here
    assert list(resnet.state_dict()) == names
    assert not any("_orig_mod" in name for name in names)


@pytest.mark.parametrize("engine", [None, DistributedType.DEEPSPEED, DistributedType.FSDP])
def test_channels_last_gives_nhwc_inputs_and_activations_and_nhwc_weights_unless_sharded(engine):
    # ZeRO's broadcast at initialize views each weight as bytes and FSDP2 refuses strided
    # parameters: under them the weights stay contiguous, and the NHWC input alone makes the
    # convolutions (and so everything after them) NHWC.
    torch.manual_seed(0)
    model = build_model("resnet18", 10, image_size=32)
    reference = copy.deepcopy(model).eval()
    accelerator = None if engine is None else SimpleNamespace(distributed_type=engine)
    to_channels_last(model, accelerator).eval()
    conv = model.conv1.weight
    if engine is None:
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    else:
        assert all(p.is_contiguous() for p in model.parameters())
    inputs, outputs = [], []
    model.layer1.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    model.layer4.register_forward_hook(lambda module, args, out: outputs.append(out))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=1e-5, atol=1e-5)
    assert inputs[0].is_contiguous(memory_format=torch.channels_last)
    assert outputs[0].is_contiguous(memory_format=torch.channels_last)
    assert not outputs[0].is_contiguous()


def test_layer_state_of_a_channels_last_model_restores_into_nchw():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, image_size=32)
    nchw = copy.deepcopy(model)
    to_channels_last(model)
    optimizer = TVLARS(layerwise_param_groups(model, 5e-4), lr=1.0)
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4)).backward()
    optimizer.step()
    payload = capture_layer_state(optimizer, unsharded_layout(model, optimizer), owner=True)
    target = TVLARS(layerwise_param_groups(nchw, 5e-4), lr=1.0)
    restore_layer_state(target, unsharded_layout(nchw, target), [payload])
    for (name, p), q in zip(model.named_parameters(), nchw.parameters(), strict=True):
        assert torch.equal(p, q), name
        for key in optimizer._buffers:
            assert torch.equal(optimizer.state[p][key], target.state[q][key]), (name, key)
    # ... and back into a channels_last model, whose weights stay NHWC.
    to_channels_last(back := copy.deepcopy(nchw))
    again = TVLARS(layerwise_param_groups(back, 5e-4), lr=1.0)
    restore_layer_state(again, unsharded_layout(back, again), [payload])
    assert torch.equal(back.conv1.weight, model.conv1.weight)
    assert back.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_train_flops_of_a_conv_and_a_linear():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(512, 4)
    )
    conv, linear = 3 * 8 * 9 * 64, 512 * 4  # multiply-adds per sample
    # forward 2 * MACs; backward: both weight gradients, the linear's input gradient (the
    # images need none).
    assert train_flops(model, (3, 8, 8)) == 2 * (conv + linear) + 2 * (conv + 2 * linear)
    assert all(p.device.type == "cpu" and p.grad is None for p in model.parameters())


def test_no_bf16_peak_on_the_cpu():
    assert peak_bf16_flops(torch.device("cpu")) is None


def test_dry_run_accepts_the_levers_and_writes_nothing(tmp_path, capsys):
    argv = ["--config", str(REPO / "configs" / "digits.yaml"), "--dry-run",
            "model.channels_last=true", "run.compile=true", "run.compile_mode=max-autotune",
            f"run.output_dir={tmp_path / 'run'}"]  # fmt: skip
    assert train_main(argv) == 0
    resolved = capsys.readouterr().out.split("--- resolved config ---")[1]
    assert "compile: true" in resolved and "compile_mode: max-autotune" in resolved
    assert "channels_last: true" in resolved
    assert not (tmp_path / "run").exists()


def test_graph_breaks_are_counted_by_the_first_line_of_their_reason():
    from torch._dynamo.utils import counters

    counters.clear()

    @torch.compile(backend="eager")  # dynamo only: no inductor build
    def broken(x):
        torch._dynamo.graph_break()
        return x * 2

    for _ in range(3):  # compiled once: counted once
        broken(torch.ones(2))
    [(reason, count)] = graph_breaks().items()
    assert count == 1 and "\n" not in reason and reason in str(dict(counters["graph_break"]))
