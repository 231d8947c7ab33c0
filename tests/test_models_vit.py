"""ViT backbones: parameter counts and keys equal timm's, weights load into timm and give the
same features, MoCo v3's frozen patch projection, sin-cos table and init."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

from seer.models import create

TIMM_PAIRS = [
    ("vit_tiny_patch16", "vit_tiny_patch16_224"),
    ("vit_small_patch16", "vit_small_patch16_224"),
    ("vit_base_patch16", "vit_base_patch16_224"),
    ("vit_large_patch16", "vit_large_patch16_224"),
    ("vit_huge_patch14", "vit_huge_patch14_224"),
]


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def moco_v3_sincos_numpy(grid: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """MoCo v3's build_2d_sincos_position_embedding, written in numpy float64."""
    grid_w, grid_h = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (np.arange(pos_dim, dtype=np.float64) / pos_dim)
    out_w = np.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = np.einsum("m,d->md", grid_h.flatten(), omega)
    table = np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)], axis=1)
    return np.concatenate([np.zeros((1, dim)), table], axis=0)[None]


@pytest.mark.parametrize(("seer_name", "timm_name"), TIMM_PAIRS)
def test_parameter_count_and_keys_match_timm(seer_name: str, timm_name: str) -> None:
    with torch.device("meta"):
        reference = timm.create_model(timm_name, pretrained=False, num_classes=0)
        model = create(seer_name)
    assert count_parameters(model) == count_parameters(reference)
    reference_state = reference.state_dict()
    assert set(model.state_dict()) == set(reference_state)
    for key, tensor in model.state_dict().items():
        assert tensor.shape == reference_state[key].shape, key
    assert model.num_features == reference.num_features


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_vit_small_loads_into_timm_with_equal_features(global_pool: str) -> None:
    torch.manual_seed(0)
    model = create("vit_small_patch16", global_pool=global_pool, stop_grad_conv1=True).eval()
    reference = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, global_pool=global_pool
    ).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = model(images)
        expected = reference(images)
    assert features.shape == (2, 384)
    assert (features - expected).abs().max().item() <= 1e-5
    norm_key = "fc_norm.weight" if global_pool == "avg" else "norm.weight"
    assert norm_key in model.state_dict()


def test_frozen_patch_projection_stays_bit_identical() -> None:
    torch.manual_seed(0)
    model = create("vit_micro_patch16", img_size=32, stop_grad_conv1=True)
    proj = model.patch_embed.proj
    assert not proj.weight.requires_grad and not proj.bias.requires_grad
    assert not model.pos_embed.requires_grad
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    # Every parameter handed to the optimizer, weight decay and momentum included.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(torch.randn(4, 3, 32, 32)).pow(2).sum()
        loss.backward()
        optimizer.step()
    assert proj.weight.grad is None and proj.bias.grad is None
    after = model.state_dict()
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"):
        assert torch.equal(after[key], initial[key]), key
    assert not torch.equal(after["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])
    assert not torch.equal(after["cls_token"], initial["cls_token"])


def test_patch_projection_trains_without_stop_grad() -> None:
    model = create("vit_micro_patch16", img_size=32, stop_grad_conv1=False)
    assert model.patch_embed.proj.weight.requires_grad
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.patch_embed.proj.weight.grad is not None


@pytest.mark.parametrize(("name", "img_size"), [("vit_micro_patch16", 64), ("vit_small_patch16", 224)])
def test_sincos_table_matches_moco_v3_formula(name: str, img_size: int) -> None:
    model = create(name, img_size=img_size)
    grid = img_size // model.patch_embed.patch_size
    expected = moco_v3_sincos_numpy(grid, model.embed_dim)
    actual = model.pos_embed.detach().double().numpy()
    assert actual.shape == expected.shape == (1, 1 + grid * grid, model.embed_dim)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-7)
    assert np.all(actual[0, 0] == 0)
    assert isinstance(model.pos_embed, nn.Parameter) and not model.pos_embed.requires_grad


def test_learned_position_embedding_option() -> None:
    model = create("vit_micro_patch16", img_size=32, pos_embed="learned")
    assert model.pos_embed.requires_grad
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.3)


def test_moco_v3_initialisation() -> None:
    torch.manual_seed(0)
    model = create("vit_small_patch16")
    dim = 384
    qkv = model.blocks[0].attn.qkv.weight
    qkv_bound = math.sqrt(6.0 / (dim + dim))  # one of the q, k, v blocks, not the fused 3*dim
    assert qkv.abs().max().item() <= qkv_bound
    assert qkv.abs().max().item() > 0.99 * qkv_bound
    fc1 = model.blocks[0].mlp.fc1.weight
    fc1_bound = math.sqrt(6.0 / (dim + 4 * dim))
    assert fc1_bound * 0.99 < fc1.abs().max().item() <= fc1_bound
    proj = model.patch_embed.proj.weight
    proj_bound = math.sqrt(6.0 / (3 * 16 * 16 + dim))
    assert proj_bound * 0.99 < proj.abs().max().item() <= proj_bound
    for name, parameter in model.named_parameters():
        if name.endswith("bias") and "norm" not in name:
            assert torch.all(parameter == 0), name
    assert model.cls_token.std().item() == pytest.approx(1e-6, rel=0.3)


def test_blocks_list_and_meta_materialisation() -> None:
    with torch.device("meta"):
        model = create("vit_micro_patch16", img_size=32)
    blocks = model.blocks()
    assert isinstance(blocks, list) and len(blocks) == 2 and blocks[1] is model.blocks[1]
    model.to_empty(device="cpu")
    model.init_weights()
    expected = moco_v3_sincos_numpy(2, 64)
    np.testing.assert_allclose(model.pos_embed.detach().double().numpy(), expected, atol=1e-7)
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_patch7_variant_and_input_checks() -> None:
    model = create("vit_small_patch7", img_size=28)
    assert model.patch_embed.grid_size == 4 and model.pos_embed.shape == (1, 17, 384)
    assert model(torch.randn(1, 3, 28, 28)).shape == (1, 384)
    with pytest.raises(ValueError, match="28x28"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        create("vit_micro_patch16", img_size=100)
    with pytest.raises(ValueError, match="global_pool"):
        create("vit_micro_patch16", global_pool="max")
    with pytest.raises(TypeError, match="norm_layer"):
        create("vit_micro_patch16", norm_layer=nn.LayerNorm)
