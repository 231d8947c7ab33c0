"""RegNetY backbones: same structure, parameter counts and state-dict keys as torchvision's,
weights load into torchvision and give the same features; SEER sizes; model registry."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.regnet import BlockParams

from seer.models import TORCHVISION_NAMES, create, list_models
from seer.models.regnet import REGNET_DESIGNS

SMALL_TORCHVISION_SIZES = ["regnety_400mf", "regnety_800mf", "regnety_1_6gf"]
# Exact value for the design depth 27, w_0 640, w_a 230.83, w_m 2.53, group width 373.
REGNETY_256GF_PARAMS = 1_272_156_138


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@contextlib.contextmanager
def torchvision_builds_on_meta() -> Iterator[None]:
    """Let torchvision's regnet_y_* builders run under `torch.device("meta")`: its
    BlockParams.from_init_params computes widths with tensors and `.tolist()`, which needs
    real (CPU) tensors; everything else is built on meta."""
    original = BlockParams.__dict__["from_init_params"]

    def from_init_params_on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return original.__func__(cls, *args, **kwargs)

    BlockParams.from_init_params = classmethod(from_init_params_on_cpu)
    try:
        with torch.device("meta"):
            yield
    finally:
        BlockParams.from_init_params = original


def torchvision_trunk(seer_name: str) -> nn.Module:
    model = getattr(torchvision.models, TORCHVISION_NAMES[seer_name])(weights=None)
    model.fc = nn.Identity()
    return model


def test_torchvision_names_cover_every_torchvision_regnety() -> None:
    shipped = {name for name in torchvision.models.list_models() if name.startswith("regnet_y_")}
    assert set(TORCHVISION_NAMES.values()) == shipped
    assert set(TORCHVISION_NAMES) <= set(REGNET_DESIGNS)


@pytest.mark.parametrize("name", sorted(TORCHVISION_NAMES))
def test_parameter_count_and_keys_match_torchvision(name: str) -> None:
    with torchvision_builds_on_meta():
        reference = torchvision_trunk(name)
        seer_model = create(name)
    assert count_parameters(seer_model) == count_parameters(reference)
    assert set(seer_model.state_dict()) == set(reference.state_dict())
    for key, tensor in seer_model.state_dict().items():
        assert tensor.shape == reference.state_dict()[key].shape, key
    assert seer_model.num_features == reference.trunk_output[-1][-1].f.c[0].out_channels


@pytest.mark.parametrize("name", SMALL_TORCHVISION_SIZES)
def test_state_dict_loads_into_torchvision_strict(name: str) -> None:
    seer_model = create(name)
    reference = torchvision_trunk(name)
    reference.load_state_dict(seer_model.state_dict(), strict=True)
    for key, tensor in reference.state_dict().items():
        assert torch.equal(tensor, seer_model.state_dict()[key]), key


def test_regnety_400mf_features_equal_torchvision() -> None:
    torch.manual_seed(0)
    seer_model = create("regnety_400mf")
    # Non-trivial BatchNorm statistics so eval-mode normalisation is exercised.
    with torch.no_grad():
        for module in seer_model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    reference = torchvision_trunk("regnety_400mf")
    reference.load_state_dict(seer_model.state_dict(), strict=True)
    seer_model.eval()
    reference.eval()
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        features = seer_model(images)
        expected = reference(images)
    assert features.shape == (2, 440) == (2, seer_model.num_features)
    assert (features - expected).abs().max().item() <= 1e-5


def test_regnety_256gf_parameter_count() -> None:
    with torch.device("meta"):
        model = create("regnety_256gf")
    parameters = count_parameters(model)
    print(f"regnety_256gf parameters: {parameters:,}")
    assert 1.2e9 <= parameters <= 1.4e9
    assert parameters == REGNETY_256GF_PARAMS
    assert model.num_features == 10444  # SEER's SwAV head input width
    assert model.stage_depths == [2, 7, 17, 1]
    assert model.stage_widths == [746, 1492, 4103, 10444]


def test_regnety_10b_output_width() -> None:
    with torch.device("meta"):
        model = create("regnety_10b")
    parameters = count_parameters(model)
    print(f"regnety_10b parameters: {parameters:,}")
    assert model.stage_widths == [2020, 4040, 11110, 28280]
    assert 9e9 <= parameters <= 1.1e10


def test_test_model_sizes() -> None:
    tiny, small = create("regnety_tiny"), create("regnety_small")
    assert count_parameters(tiny) < 1_000_000
    assert 1_500_000 <= count_parameters(small) <= 3_000_000


def test_blocks_and_stages_follow_design() -> None:
    model = create("regnety_small")
    stages = model.stages()
    assert [len(stage) for stage in stages] == model.stage_depths
    blocks = model.blocks()
    assert len(blocks) == REGNET_DESIGNS["regnety_small"].depth == sum(model.stage_depths)
    assert all(type(block).__name__ == "ResBottleneckBlock" for block in blocks)
    assert blocks[0] is model.trunk_output.block1[0]
    assert {name for name, _ in model.named_children()} == {"stem", "trunk_output"}


def test_forward_shape_and_gradient() -> None:
    model = create("regnety_tiny")
    images = torch.randn(3, 3, 64, 64)
    features = model(images)
    assert features.shape == (3, model.num_features) == (3, 32)
    features.sum().backward()
    assert model.stem[0].weight.grad is not None
    with pytest.raises(ValueError, match="expects images"):
        model(torch.randn(3, 64, 64))


def test_norm_layer_override() -> None:
    model = create("regnety_tiny", norm_layer=lambda channels: nn.GroupNorm(8, channels))
    norms = [module for module in model.modules() if isinstance(module, (nn.GroupNorm, nn.BatchNorm2d))]
    assert norms and all(isinstance(module, nn.GroupNorm) for module in norms)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_meta_build_materialises_with_init_weights() -> None:
    with torch.device("meta"):
        model = create("regnety_small")
    model.to_empty(device="cpu")
    model.init_weights()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
            assert torch.all(module.running_mean == 0) and torch.all(module.running_var == 1)
    conv = model.trunk_output[-1][0].f.a[0]  # 1x1 conv, fan_out = 304 output channels
    expected_std = math.sqrt(2.0 / (conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels))
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_create_rejects_unknown_names_and_overrides() -> None:
    assert "regnety_256gf" in list_models() and "vit_small_patch16" in list_models()
    with pytest.raises(ValueError, match="regnety_16gf"):
        create("regnety_16g")
    with pytest.raises(TypeError, match="img_size"):
        create("regnety_tiny", img_size=224)
