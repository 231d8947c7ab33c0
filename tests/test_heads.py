"""SSL heads: SwAV projection + prototypes, MoCo v3 projector and predictor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from distributed_utils import run_distributed
from torch import nn

from seer.models.heads import MoCoPredictor, MoCoProjector, SwAVHead, build_mlp


def linears(module: nn.Module) -> list[nn.Linear]:
    return [child for child in module.modules() if isinstance(child, nn.Linear)]


def batch_norms(module: nn.Module) -> list[nn.BatchNorm1d]:
    return [child for child in module.modules() if isinstance(child, nn.BatchNorm1d)]


def test_swav_head_shapes_and_normalisation() -> None:
    torch.manual_seed(0)
    head = SwAVHead(in_dim=32, hidden_dims=[64], out_dim=16, n_prototypes=30, batch_norm=True)
    z, scores = head(torch.randn(8, 32))
    assert z.shape == (8, 16) and scores.shape == (8, 30)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(8))
    torch.testing.assert_close(scores, z @ head.prototypes.weight.T)
    assert head.prototypes.bias is None
    assert [type(layer) for layer in head.projection] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]


def test_normalize_prototypes_gives_unit_rows_in_place() -> None:
    head = SwAVHead(in_dim=8, hidden_dims=[], out_dim=4, n_prototypes=10)
    weight_before = head.prototypes.weight
    with torch.no_grad():
        head.prototypes.weight.mul_(7.0)
    assert not torch.allclose(head.prototypes.weight.norm(dim=1), torch.ones(10))
    expected = F.normalize(head.prototypes.weight.detach().clone(), dim=1)
    head.normalize_prototypes()
    assert head.prototypes.weight is weight_before  # same Parameter: optimizer state stays valid
    torch.testing.assert_close(head.prototypes.weight.norm(dim=1), torch.ones(10))
    torch.testing.assert_close(head.prototypes.weight.detach(), expected)
    assert head.prototypes.weight.grad is None


def test_swav_head_without_hidden_layers_is_one_linear() -> None:
    head = SwAVHead(in_dim=12, hidden_dims=[], out_dim=6, n_prototypes=5)
    assert len(head.projection) == 1 and isinstance(head.projection[0], nn.Linear)
    assert head.projection[0].in_features == 12 and head.projection[0].out_features == 6


def test_seer_256gf_head_structure_and_size() -> None:
    with torch.device("meta"):
        head = SwAVHead(in_dim=10444, hidden_dims=[8192, 8192], out_dim=256, n_prototypes=16000, batch_norm=False)
    assert not batch_norms(head)
    assert [(layer.in_features, layer.out_features) for layer in linears(head.projection)] == [
        (10444, 8192),
        (8192, 8192),
        (8192, 256),
    ]
    expected = (10444 * 8192 + 8192) + (8192 * 8192 + 8192) + (8192 * 256 + 256) + 256 * 16000
    assert sum(parameter.numel() for parameter in head.parameters()) == expected


def test_swav_head_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="n_prototypes"):
        SwAVHead(in_dim=8, hidden_dims=[], out_dim=4, n_prototypes=0)
    with pytest.raises(ValueError, match="hidden width"):
        SwAVHead(in_dim=8, hidden_dims=[0], out_dim=4, n_prototypes=3)


def test_moco_projector_layers() -> None:
    projector = MoCoProjector(in_dim=48, hidden_dim=96, out_dim=32)
    assert [(layer.in_features, layer.out_features) for layer in linears(projector)] == [(48, 96), (96, 96), (96, 32)]
    assert all(layer.bias is None for layer in linears(projector))
    norms = batch_norms(projector)
    assert len(norms) == 3
    assert all(norm.affine for norm in norms[:-1])
    last = list(projector.mlp)[-1]
    assert last is norms[-1] and not last.affine and last.weight is None and last.bias is None
    output = projector(torch.randn(10, 48))
    assert output.shape == (10, 32)
    # Training-mode affine-free BN: each output feature has zero mean over the batch.
    torch.testing.assert_close(output.mean(dim=0), torch.zeros(32), atol=1e-5, rtol=0)


def test_moco_predictor_layers() -> None:
    predictor = MoCoPredictor(dim=32, hidden_dim=64)
    assert [(layer.in_features, layer.out_features) for layer in linears(predictor)] == [(32, 64), (64, 32)]
    assert all(layer.bias is None for layer in linears(predictor))
    modules = list(predictor.mlp)
    assert [type(module) for module in modules] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert modules[1].affine and not modules[-1].affine
    assert predictor(torch.randn(6, 32)).shape == (6, 32)


def test_default_moco_sizes() -> None:
    with torch.device("meta"):
        projector = MoCoProjector(in_dim=384)
        predictor = MoCoPredictor()
    assert [layer.out_features for layer in linears(projector)] == [4096, 4096, 256]
    assert [layer.out_features for layer in linears(predictor)] == [4096, 256]
    with pytest.raises(ValueError, match="num_layers"):
        build_mlp(8, 8, 8, num_layers=0)


def _sharded_normalize_worker(rank: int, world_size: int) -> float:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)  # same initial weights on every rank
    head = SwAVHead(in_dim=16, hidden_dims=[32], out_dim=8, n_prototypes=10)
    with torch.no_grad():
        head.prototypes.weight.mul_(3.0)
    expected = F.normalize(head.prototypes.weight.detach().clone(), dim=1)
    fully_shard(head)
    assert type(head.prototypes.weight).__name__ == "DTensor"
    assert head.prototypes.weight.to_local().shape == (10 // world_size, 8)
    head.normalize_prototypes()
    return (head.prototypes.weight.full_tensor() - expected).abs().max().item()


@pytest.mark.slow
def test_normalize_prototypes_on_fsdp2_sharded_weight() -> None:
    max_errors = run_distributed(_sharded_normalize_worker, 2)
    assert max(max_errors) <= 1e-6
