"""SwAV: Sinkhorn-Knopp and the swapped-prediction loss against float64 references written
here from the formulas, distributed Sinkhorn against the single-process result, prototype
freezing, and the queue."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from distributed_utils import run_distributed
from seer.methods.swav import SwAV, sinkhorn, swapped_prediction_loss
from seer.models import create


def reference_sinkhorn(scores: np.ndarray, eps: float, iters: int) -> np.ndarray:
    q = np.exp(scores.astype(np.float64) / eps).T  # K x B
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


def reference_loss(scores: list[np.ndarray], assign: dict[int, np.ndarray], temperature: float) -> float:
    total = 0.0
    for crop_id, q in assign.items():
        sub = 0.0
        others = [v for v in range(len(scores)) if v != crop_id]
        for v in others:
            x = scores[v].astype(np.float64) / temperature
            log_p = x - x.max(axis=1, keepdims=True)
            log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
            sub += -(q * log_p).sum(axis=1).mean()
        total += sub / len(others)
    return total / len(assign)


@pytest.mark.parametrize("eps,iters", [(0.05, 3), (0.03, 10)])
def test_sinkhorn_matches_float64_reference(eps, iters):
    g = torch.Generator().manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(32, 16, generator=g), dim=1).mul(0.9)
    q = sinkhorn(scores, eps, iters)
    ref = reference_sinkhorn(scores.numpy(), eps, iters)
    assert np.abs(q.double().numpy() - ref).max() <= 1e-6
    assert torch.allclose(q.sum(1), torch.ones(32), atol=1e-5)  # each sample's assignment sums to 1


def test_sinkhorn_in_fp32_from_bf16():
    scores = torch.rand(8, 5) * 2 - 1
    assert sinkhorn(scores.bfloat16(), 0.05, 3).dtype == torch.float32


def test_swapped_prediction_loss_matches_reference():
    g = torch.Generator().manual_seed(1)
    scores = [torch.randn(8, 10, generator=g) for _ in range(4)]
    assign = {0: sinkhorn(scores[0], 0.05, 3), 1: sinkhorn(scores[1], 0.05, 3)}
    loss = swapped_prediction_loss(scores, assign, 0.1)
    ref = reference_loss([s.numpy() for s in scores], {k: v.double().numpy() for k, v in assign.items()}, 0.1)
    assert abs(loss.item() - ref) <= 1e-6


def _distributed_sinkhorn(rank, world, scores, eps, iters):
    per = scores.shape[0] // world
    return sinkhorn(scores[rank * per:(rank + 1) * per], eps, iters)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_distributed_sinkhorn_equals_single_process(world):
    g = torch.Generator().manual_seed(2)
    scores = torch.nn.functional.normalize(torch.randn(16, 12, generator=g), dim=1)
    parts = run_distributed(_distributed_sinkhorn, world, scores, 0.05, 3)
    single = sinkhorn(scores, 0.05, 3)
    assert (torch.cat(parts) - single).abs().max().item() <= 1e-6
    ref = reference_sinkhorn(scores.numpy(), 0.05, 3)
    assert np.abs(torch.cat(parts).double().numpy() - ref).max() <= 1e-6


def _tiny_swav(**kw):
    return SwAV(create("regnety_tiny"), head_hidden=[32], head_out=16, head_bn=False, n_prototypes=20, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_distributed_swav_loss_equals_single_process(world):
    """BN-free head and eval-mode backbone so per-rank batches give the same features."""
    torch.manual_seed(0)
    model = _tiny_swav()
    model.backbone.eval()
    state = model.state_dict()
    g = torch.Generator().manual_seed(3)
    views = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)] + [torch.randn(8, 3, 16, 16, generator=g)]

    losses = run_distributed(_distributed_swav_loss_eval, world, views, state)
    single = _loss_eval(state, views, 1, 0)
    for loss in losses:
        assert abs(loss - single) <= 1e-5


def _loss_eval(state, views, world, rank):
    model = _tiny_swav()
    model.load_state_dict(state)
    model.backbone.eval()
    per = views[0].shape[0] // world
    return model([v[rank * per:(rank + 1) * per] for v in views])["loss"].item()


def _distributed_swav_loss_eval(rank, world, views, state):
    # each rank's loss is its own batch's mean; the mean over ranks is the global loss
    loss = torch.tensor(_loss_eval(state, views, world, rank), dtype=torch.float64)
    dist.all_reduce(loss)
    return loss.item() / world


def test_prototypes_frozen_then_trained():
    torch.manual_seed(0)
    model = _tiny_swav(freeze_prototypes_steps=2)
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model.head.prototypes.weight.detach().clone()
    for step in range(2):
        opt.zero_grad()
        model(views)["loss"].backward()
        model.on_after_backward(step)
        assert model.head.prototypes.weight.grad is None
        opt.step()
    # normalisation only (already unit rows after the first forward): direction unchanged
    after = torch.nn.functional.normalize(model.head.prototypes.weight.detach(), dim=1)
    assert torch.allclose(after, torch.nn.functional.normalize(before, dim=1), atol=1e-6)
    opt.zero_grad()
    model(views)["loss"].backward()
    model.on_after_backward(2)
    assert model.head.prototypes.weight.grad is not None


def test_queue_fills_then_is_used():
    torch.manual_seed(0)
    model = _tiny_swav(queue_length=8, queue_start_step=0)
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    model(views)
    assert int(model.queue_filled) == 4 and model.queue[:, :4].abs().sum() > 0
    model(views)
    assert int(model.queue_filled) == 8
    loss_with_queue = model(views)["loss"].item()
    assert math.isfinite(loss_with_queue)


def test_collapse_warning_when_loss_sits_at_ln_k():
    model = _tiny_swav(freeze_prototypes_steps=0, collapse_patience=5)
    warnings = [model.check_collapse(math.log(20), step) for step in range(1, 11)]
    assert [i for i, w in enumerate(warnings) if w] == [4, 9]  # after 5 and 10 steps in a row
    assert model.check_collapse(math.log(20) * 0.5, 11) is None  # leaving ln(K) resets the count
    assert all(model.check_collapse(math.log(20), 12 + i) is None for i in range(4))


def _queue_losses_plain_and_sharded(rank, world, state, views_per_step):
    from seer.config import ParallelConfig
    from seer.engine.distributed import DistInfo
    from seer.engine.parallel import parallelize

    models = []
    for shard in (False, True):
        model = _tiny_swav(queue_length=4, queue_start_step=0)
        model.load_state_dict(state)
        if shard:
            model, _ = parallelize(model, DistInfo(rank, world, 0, torch.device("cpu")), ParallelConfig(strategy="fsdp"))
        models.append(model)
    per = views_per_step[0][0].shape[0] // world
    losses = []
    for views in views_per_step:
        local = [v[rank * per:(rank + 1) * per] for v in views]
        with torch.no_grad():
            losses.append([m(local)["loss"].item() for m in models])
    return losses, int(models[1].queue_filled)


@pytest.mark.slow
def test_queue_with_fsdp2_sharded_head_equals_unsharded():
    """Regression: with the head sharded by FSDP2 the first step with a full queue crashed
    ("aten.mm.default got mixed torch.Tensor and DTensor"); now its losses equal the unsharded
    model's, rank by rank, before and after the queue comes into use."""
    torch.manual_seed(0)
    state = _tiny_swav(queue_length=4).state_dict()
    g = torch.Generator().manual_seed(5)
    steps = [[torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)] + [torch.randn(4, 3, 16, 16, generator=g)]
             for _ in range(3)]
    for losses, filled in run_distributed(_queue_losses_plain_and_sharded, 2, state, steps):
        assert filled == 6  # 2 per step: full (4) before the third forward
        for plain, sharded in losses:
            assert abs(plain - sharded) <= 1e-5, losses
        assert losses[2][0] != losses[1][0]
