"""MoCo v3: the symmetric InfoNCE loss against a float64 reference written here from the
formula, 2-rank gloo loss and gradients against one process on the concatenated batch, the
cosine momentum schedule and the EMA update (plain and FSDP2-sharded), and the frozen patch
projection of a model built from the CPU preset."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO
from distributed_utils import run_distributed
from seer.config import load_config
from seer.engine.optim import build_optimizer, set_lr
from seer.methods import build_method
from seer.methods.mocov3 import MoCoV3, contrastive_loss, cosine_momentum
from seer.models import create

TEMPERATURE = 0.2
TOTAL_STEPS = 10


def tiny_mocov3(seed: int = 0) -> MoCoV3:
    """A 2-block ViT at 32 px with small heads; the base encoder is nudged away from the
    momentum copy so that queries and keys come from different weights."""
    torch.manual_seed(seed)
    backbone = create("vit_micro_patch16", img_size=32, stop_grad_conv1=True)
    model = MoCoV3(backbone, total_steps=TOTAL_STEPS, projector_hidden=32, predictor_hidden=32, out_dim=16,
                   temperature=TEMPERATURE, base_momentum=0.99)
    with torch.no_grad():
        for param in [*model.backbone.parameters(), *model.projector.parameters()]:
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    return model


def two_views(batch: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)]


def reference_ctr(q: np.ndarray, k: np.ndarray, temperature: float) -> float:
    """CrossEntropy(normalize(q) @ normalize(k).T / T, arange(N)) * 2T in float64."""
    q = q.astype(np.float64) / np.linalg.norm(q, axis=1, keepdims=True)
    k = k.astype(np.float64) / np.linalg.norm(k, axis=1, keepdims=True)
    logits = q @ k.T / temperature
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    return float(-np.diag(log_p).mean() * 2 * temperature)


def base_grads(model: MoCoV3) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def batchnorm_eval(model: nn.Module) -> nn.Module:
    """Train mode except BatchNorm, which then normalises with its (initial) running stats.

    Train-mode BN statistics depend on how the batch is split over ranks (the engine's
    SyncBatchNorm is what removes that in real runs, and it is tested on its own). With BN in
    eval mode every sample's output depends on that sample alone, so the 2-rank run must give
    exactly the single-process loss and gradients: what is compared is then the key gathering,
    the rank-offset labels and the gradient averaging."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


# ---------------------------------------------------------------------------------------------
# (a) the loss on one process


def test_contrastive_loss_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g)
    loss = contrastive_loss(q, k, TEMPERATURE)
    assert abs(loss.item() - reference_ctr(q.numpy(), k.numpy(), TEMPERATURE)) <= 1e-6
    # a key equal to its query (and far from the others) gives a low loss; shuffled keys a high one
    assert contrastive_loss(q, q * 3.0, TEMPERATURE).item() < reference_ctr(q.numpy(), k.numpy(), TEMPERATURE)


def test_forward_loss_matches_float64_reference():
    model = tiny_mocov3().train()
    x1, x2 = two_views(8)
    loss = model([x1, x2])["loss"]
    with torch.no_grad():  # the encoders applied view by view, as written in the paper
        q1, q2 = (model.predictor(model.projector(model.backbone(x))) for x in (x1, x2))
        k1, k2 = (model.momentum_projector(model.momentum_backbone(x)) for x in (x1, x2))
    expected = reference_ctr(q1.numpy(), k2.numpy(), TEMPERATURE) + reference_ctr(q2.numpy(), k1.numpy(), TEMPERATURE)
    assert abs(loss.item() - expected) <= 1e-5
    assert loss.requires_grad


def test_forward_rejects_wrong_views():
    model = tiny_mocov3()
    with pytest.raises(ValueError, match="exactly 2 views"):
        model(two_views(4) + two_views(4))
    with pytest.raises(ValueError, match="same shape"):
        model([torch.zeros(4, 3, 32, 32), torch.zeros(2, 3, 32, 32)])


# ---------------------------------------------------------------------------------------------
# (b) two gloo ranks against one process on the concatenated batch


def _rank_loss_and_grads(rank, world, state, views):
    model = batchnorm_eval(tiny_mocov3())
    model.load_state_dict(state)
    per_rank = views[0].shape[0] // world
    local = [v[rank * per_rank:(rank + 1) * per_rank] for v in views]
    loss = model(local)["loss"]
    loss.backward()
    return loss.item(), base_grads(model)


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_whole_batch():
    model = batchnorm_eval(tiny_mocov3())
    views = two_views(8, seed=3)
    loss = model(views)["loss"]
    loss.backward()
    single = base_grads(model)
    results = run_distributed(_rank_loss_and_grads, 2, model.state_dict(), views)
    # every rank's loss is the mean over its own queries against all 8 keys: their mean is the
    # whole-batch loss, and (keys carry no gradient) the average of their gradients, which is
    # what DDP/FSDP all-reduce, is the whole-batch gradient
    assert abs(sum(r[0] for r in results) / 2 - loss.item()) <= 1e-5
    assert results[0][0] != results[1][0]
    assert set(results[0][1]) == set(single) and "backbone.patch_embed.proj.weight" not in single
    for name, grad in single.items():
        averaged = (results[0][1][name] + results[1][1][name]) / 2
        assert torch.allclose(averaged, grad, rtol=1e-4, atol=1e-6), name


# ---------------------------------------------------------------------------------------------
# (c) momentum schedule and EMA


def test_momentum_schedule_follows_the_cosine_formula():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99, abs=1e-12)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995, abs=1e-12)
    assert cosine_momentum(25, 100, 0.99) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi / 4)) * 0.01, abs=1e-12)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0, abs=1e-12)
    assert cosine_momentum(150, 100, 0.99) == pytest.approx(1.0, abs=1e-12)
    model = tiny_mocov3()
    assert [model.momentum_at(s) for s in (0, 5, 10)] == pytest.approx([0.99, 0.995, 1.0], abs=1e-12)


def _momentum_state(model: MoCoV3) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("momentum_")}


def test_after_step_applies_the_ema_with_the_next_steps_momentum():
    model = tiny_mocov3()
    before = _momentum_state(model)
    base = {f"momentum_{n}": p.detach().double() for n, p in model.named_parameters()
            if n.startswith(("backbone.", "projector."))}
    assert set(base) == set(before)
    step = 3
    m = cosine_momentum(step + 1, TOTAL_STEPS, 0.99)
    model.after_step(step)
    after = _momentum_state(model)
    moved = 0
    for name, old in before.items():
        expected = m * old.double() + (1 - m) * base[name]
        assert torch.allclose(after[name].double(), expected, rtol=0, atol=1e-7), name
        moved += int(not torch.equal(after[name], old))
    assert moved > len(before) // 2  # the base was nudged away: most momentum weights moved
    # the frozen patch projection is equal in both encoders and stays bit-identical
    assert torch.equal(model.momentum_backbone.patch_embed.proj.weight, model.backbone.patch_embed.proj.weight)
    # after the last optimizer step the momentum is 1: nothing moves
    frozen = _momentum_state(model)
    model.after_step(TOTAL_STEPS - 1)
    assert all(torch.equal(frozen[n], p) for n, p in _momentum_state(model).items())


def test_momentum_encoder_gets_no_gradient_and_is_not_optimised():
    model = tiny_mocov3()
    momentum_params = [p for n, p in model.named_parameters() if n.startswith("momentum_")]
    assert momentum_params and not any(p.requires_grad for p in momentum_params)
    model(two_views(4))["loss"].backward()
    assert all(p.grad is None for p in momentum_params)
    assert model.predictor.mlp[0].weight.grad is not None and model.backbone.cls_token.grad is not None
    cfg = load_config(REPO / "configs" / "mocov3_vit_cpu.yaml")
    optimizer = build_optimizer(model, cfg.optim, global_batch=16)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in momentum_params}
    assert id(model.backbone.patch_embed.proj.weight) not in optimised
    assert id(model.predictor.mlp[0].weight) in optimised


# ---------------------------------------------------------------------------------------------
# (d) FSDP2-sharded momentum update


def _sharded_after_step(rank, world, state, views, step):
    from seer.config import ParallelConfig
    from seer.engine.distributed import DistInfo
    from seer.engine.parallel import is_fsdp, parallelize

    model = batchnorm_eval(tiny_mocov3())
    model.load_state_dict(state)
    # the engine's own wrapping: every block of both encoders, each head, then the root
    model, _ = parallelize(model, DistInfo(rank, world, 0, torch.device("cpu")), ParallelConfig(strategy="fsdp"))
    units = sorted(n for n, m in model.named_modules() if is_fsdp(m))
    assert units == sorted(["", "projector", "predictor", "momentum_projector"]
                           + [f"{enc}.blocks.{i}" for enc in ("backbone", "momentum_backbone") for i in range(2)])
    sharded = [n for n, p in model.named_parameters() if n.startswith("momentum_") and p.to_local().numel() < p.numel()]
    per_rank = views[0].shape[0] // world
    loss = model([v[rank * per_rank:(rank + 1) * per_rank] for v in views])["loss"]  # runs sharded
    loss.backward()
    model.after_step(step)
    momentum = {n: p.full_tensor() for n, p in model.named_parameters() if n.startswith("momentum_")}
    return sharded, loss.item(), momentum


@pytest.mark.slow
def test_fsdp2_sharded_momentum_update_equals_unsharded():
    model = batchnorm_eval(tiny_mocov3())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    views = two_views(8, seed=4)
    with torch.no_grad():
        loss = model(views)["loss"].item()
    ranks = run_distributed(_sharded_after_step, 2, state, views, 2)
    sharded, _, results = ranks[0]
    assert len(sharded) > 10  # the momentum weights really were split over the two ranks
    assert abs((ranks[0][1] + ranks[1][1]) / 2 - loss) <= 1e-5  # the sharded forward gathers keys too
    model.after_step(2)
    expected = _momentum_state(model)
    assert set(results) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(results[name], value, rtol=0, atol=1e-7), name
    assert any(not torch.equal(expected[n], state[n]) for n in expected)


# ---------------------------------------------------------------------------------------------
# (e) the frozen patch projection of the CPU preset


def test_frozen_patch_projection_stays_bit_identical_through_training():
    cfg = load_config(REPO / "configs" / "mocov3_vit_cpu.yaml")
    torch.manual_seed(0)
    model = build_method(cfg).train()
    optimizer = build_optimizer(model, cfg.optim, global_batch=8)
    set_lr(optimizer, 1e-3)
    proj = model.backbone.patch_embed.proj
    frozen = {"weight": proj.weight.detach().clone(), "bias": proj.bias.detach().clone()}
    qkv = model.backbone.blocks[0].attn.qkv.weight.detach().clone()
    key_qkv = model.momentum_backbone.blocks[0].attn.qkv.weight.detach().clone()
    size = cfg.augment.crops[0].size
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        views = [torch.randn(8, 3, size, size, generator=g) for _ in range(2)]
        optimizer.zero_grad(set_to_none=True)
        model(views)["loss"].backward()
        model.on_after_backward(step)
        optimizer.step()
        model.after_step(step)
    assert proj.weight.grad is None and proj.bias.grad is None
    assert torch.equal(proj.weight, frozen["weight"]) and torch.equal(proj.bias, frozen["bias"])
    key_proj = model.momentum_backbone.patch_embed.proj
    assert torch.equal(key_proj.weight, frozen["weight"]) and torch.equal(key_proj.bias, frozen["bias"])
    # while the rest of both encoders did move
    assert not torch.equal(model.backbone.blocks[0].attn.qkv.weight, qkv)
    assert not torch.equal(model.momentum_backbone.blocks[0].attn.qkv.weight, key_qkv)
