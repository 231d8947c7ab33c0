"""seer.engine.optim: parameter groups, LARS (incl. FSDP2 shards), optimizer construction and
the cosine / plateau LR schedules."""

from __future__ import annotations

import copy
import io
import math
import random

import pytest
import torch
from torch import nn

from distributed_utils import run_distributed
from seer.config import GuardConfig, OptimConfig, ScheduleConfig
from seer.engine.guard import StabilityGuard
from seer.engine.optim import (
    LARS,
    CosineSchedule,
    PlateauSchedule,
    build_optimizer,
    build_schedule,
    param_groups,
    scaled_lr,
    set_lr,
)

SEER_BATCH = 8192
SEER_STEPS = 114_890


def _seer_schedule_cfg(**overrides) -> ScheduleConfig:
    # per-256 numbers that give SEER's absolute 0.15 -> 9.6 -> 0.0096 at batch 8192
    values = dict(mode="cosine", warmup_steps=8000, start_lr=0.15 * 256 / SEER_BATCH,
                  final_lr=0.0096 * 256 / SEER_BATCH)
    values.update(overrides)
    return ScheduleConfig(**values)


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ------------------------------------------------------------------------------ schedules


def test_cosine_matches_formula_with_seer_numbers():
    schedule = build_schedule(_seer_schedule_cfg(), OptimConfig(name="lars", lr=0.3), SEER_BATCH, SEER_STEPS)
    assert isinstance(schedule, CosineSchedule)
    assert scaled_lr(0.3, SEER_BATCH) == pytest.approx(9.6)

    def expected(step: int) -> float:
        if step < 8000:
            return 0.15 + (9.6 - 0.15) * step / 8000
        t = min(1.0, (step - 8000) / (SEER_STEPS - 8000))
        return 0.0096 + (9.6 - 0.0096) * 0.5 * (1 + math.cos(math.pi * t))

    checks = {0: 0.15, 4000: (0.15 + 9.6) / 2, 8000: 9.6, 8000 + (SEER_STEPS - 8000) // 2: None,
              SEER_STEPS: 0.0096, SEER_STEPS + 500: 0.0096, 31_337: None}
    for step, value in checks.items():
        assert schedule.lr(step) == pytest.approx(expected(step), rel=1e-12)
        if value is not None:
            assert schedule.lr(step) == pytest.approx(value, rel=1e-12)
    middle = 8000 + (SEER_STEPS - 8000) / 2
    assert CosineSchedule(9.6, SEER_STEPS, warmup_steps=8000, start_lr=0.15, final_lr=0.0096).lr(
        middle) == pytest.approx((9.6 + 0.0096) / 2)
    assert schedule.observe(10, 1.0) is None


def test_cosine_scale_by_and_state_dict():
    schedule = build_schedule(_seer_schedule_cfg(), OptimConfig(lr=0.3), SEER_BATCH, SEER_STEPS)
    before = [schedule.lr(s) for s in (0, 5000, 50_000)]
    schedule.scale_by(0.5)
    assert [schedule.lr(s) for s in (0, 5000, 50_000)] == pytest.approx([v / 2 for v in before])
    restored = build_schedule(_seer_schedule_cfg(), OptimConfig(lr=0.3), SEER_BATCH, SEER_STEPS)
    restored.load_state_dict(_roundtrip(schedule.state_dict()))
    assert restored.lr(50_000) == schedule.lr(50_000)
    with pytest.raises(ValueError, match="plateau"):
        PlateauSchedule(1.0).load_state_dict(schedule.state_dict())
    with pytest.raises(ValueError, match="factor"):
        schedule.scale_by(0.0)


def _plateau(**overrides) -> PlateauSchedule:
    values = dict(mode="plateau", warmup_steps=100, start_lr=0.0, plateau_patience=200,
                  plateau_threshold=0.01, plateau_smoothing=0.99, plateau_factor=0.5, min_lr=0.3 / 8)
    values.update(overrides)
    schedule = build_schedule(ScheduleConfig(**values), OptimConfig(lr=0.3), 512, 10**9)
    assert isinstance(schedule, PlateauSchedule)
    return schedule


def test_plateau_halves_on_flat_noisy_loss_and_respects_min_lr():
    schedule = _plateau()
    rng = random.Random(0)
    base = 0.6  # 0.3 per 256 at batch 512
    assert schedule.lr(0) == 0.0 and schedule.lr(50) == pytest.approx(0.3) and schedule.lr(100) == base
    changes = []
    for step in range(3000):
        message = schedule.observe(step, 4.0 + 0.1 * rng.gauss(0, 1))
        if message:
            changes.append((step, message, schedule.lr(step)))
        if step >= 100:
            assert schedule.lr(step) >= 0.075 - 1e-12  # min_lr 0.3/8 per 256 at batch 512
    first_step = changes[0][0]
    assert 100 + 200 <= first_step <= 100 + 200 + 50, changes  # warmup + patience + slack
    assert "LR" in changes[0][1] and changes[0][2] == pytest.approx(base / 2)
    # halves every `patience` steps until the floor (0.3/8 per 256 -> 0.075 absolute), then stops
    assert [lr for _, _, lr in changes] == pytest.approx([0.3, 0.15, 0.075])
    assert schedule.lr(10_000) == pytest.approx(0.075)


def test_plateau_never_halves_on_falling_loss():
    schedule = _plateau(plateau_patience=1000, warmup_steps=500, min_lr=0.0)
    rng = random.Random(1)
    for step in range(10_000):
        loss = 1.0 + 7.0 * math.exp(-step / 4000) + 0.1 * rng.gauss(0, 1)
        assert schedule.observe(step, loss) is None, step
    assert schedule.lr(10_000) == pytest.approx(0.6)


def test_plateau_ignores_nonfinite_losses():
    schedule = _plateau()
    schedule.observe(0, 3.0)
    for bad in (float("nan"), float("inf"), torch.tensor(float("nan"))):
        assert schedule.observe(1, bad) is None
    assert schedule.ema == 3.0
    schedule.observe(2, torch.tensor(1.0))
    assert schedule.ema == pytest.approx(0.99 * 3.0 + 0.01 * 1.0)


def test_plateau_state_dict_round_trip_resumes_identically():
    rng = random.Random(2)
    losses = [5.0 + 0.05 * rng.gauss(0, 1) for _ in range(2000)]
    original = _plateau()
    for step in range(700):
        original.observe(step, losses[step])
    original.scale_by(0.5)
    resumed = _plateau()
    resumed.load_state_dict(_roundtrip(original.state_dict()))
    for step in range(700, 2000):
        assert original.observe(step, losses[step]) == resumed.observe(step, losses[step])
        assert original.lr(step) == resumed.lr(step)
    assert original.reductions == resumed.reductions >= 2


def test_schedule_config_errors_are_named():
    with pytest.raises(ValueError, match="plateau_factor"):
        _plateau(plateau_factor=1.5)
    with pytest.raises(ValueError, match="schedule.mode"):
        build_schedule(ScheduleConfig(mode="step"), OptimConfig(), 256, 10)
    with pytest.raises(ValueError, match="global batch"):
        scaled_lr(0.3, 0)


# ------------------------------------------------------------------------------ param groups


class LayerNorm2d(nn.Module):  # a custom norm whose weight is 3-D: found by module type
    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x):
        return nn.functional.layer_norm(x, x.shape[1:]) * self.weight


class TinyViTish(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, 8, 4, stride=4)
        self.patch_embed.proj.requires_grad_(False)  # MoCo v3's frozen patch projection
        self.stem_norm = LayerNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.norm = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 4)


def _ids(params):
    return {id(p) for p in params}


@pytest.mark.parametrize("adapt_excluded", [True, False])
def test_param_groups_split(adapt_excluded):
    model = TinyViTish()
    groups = param_groups(model, 0.05, exclude_from_adaptation=adapt_excluded)
    by_name = {g["group_name"]: g for g in groups}
    decay, no_decay = by_name["decay"], by_name["no_decay"]
    assert _ids(decay["params"]) == _ids([model.conv.weight, model.head.weight])
    assert decay["weight_decay"] == 0.05 and decay["lars_exclude"] is False
    expected = [model.cls_token, model.pos_embed, model.stem_norm.weight, model.conv.bias, model.bn.weight,
                model.bn.bias, model.norm.weight, model.norm.bias, model.gn.weight, model.gn.bias, model.head.bias]
    assert _ids(no_decay["params"]) == _ids(expected)
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"] is adapt_excluded
    everything = _ids(decay["params"]) | _ids(no_decay["params"])
    assert id(model.patch_embed.proj.weight) not in everything and id(model.patch_embed.proj.bias) not in everything


def test_build_optimizer_variants():
    model = TinyViTish()
    sgd = build_optimizer(model, OptimConfig(name="sgd", lr=0.3, momentum=0.8, weight_decay=1e-4), 1024)
    assert isinstance(sgd, torch.optim.SGD)
    assert all(g["lr"] == pytest.approx(1.2) and g["momentum"] == 0.8 for g in sgd.param_groups)
    assert sorted(g["weight_decay"] for g in sgd.param_groups) == [0.0, 1e-4]
    lars = build_optimizer(model, OptimConfig(name="lars", lr=0.3, trust_coefficient=0.002), 8192)
    assert isinstance(lars, LARS) and lars.param_groups[0]["lr"] == pytest.approx(9.6)
    assert {g["lars_exclude"] for g in lars.param_groups} == {True, False}
    assert all(g["trust_coefficient"] == 0.002 for g in lars.param_groups)
    adamw = build_optimizer(model, OptimConfig(name="adamw", lr=1.5e-4, betas=[0.9, 0.95], weight_decay=0.1), 4096)
    assert isinstance(adamw, torch.optim.AdamW)
    assert all(g["betas"] == (0.9, 0.95) and g["lr"] == pytest.approx(2.4e-3) for g in adamw.param_groups)
    set_lr(adamw, 0.5)
    assert [g["lr"] for g in adamw.param_groups] == [0.5, 0.5]
    with pytest.raises(ValueError, match="optim.name"):
        build_optimizer(model, OptimConfig(name="lamb"), 256)


# ------------------------------------------------------------------------------ LARS


def _lars_reference_step(weights, grads, buffers, *, lr, momentum, wd, tc, excluded, eps=1e-8):
    """One LARS step in float64 written straight from the formula, per tensor."""
    new_weights, new_buffers = [], []
    for w, g, buf, skip in zip(weights, grads, buffers, excluded):
        w_norm, g_norm = w.norm().item(), g.norm().item()
        if skip or w_norm == 0 or g_norm == 0:
            d = g.clone()  # excluded groups have weight decay 0; zero norms: no decay, no ratio
        else:
            d = (g + wd * w) * tc * w_norm / (g_norm + wd * w_norm + eps)
        buf = momentum * buf + d
        new_buffers.append(buf)
        new_weights.append(w - lr * buf)
    return new_weights, new_buffers


def test_lars_step_equals_float64_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    groups = param_groups(model, 1e-2, exclude_from_adaptation=True)
    optimizer = LARS(groups, lr=2.0, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.05)
    params = [p for g in groups for p in g["params"]]
    excluded = [g["lars_exclude"] for g in groups for _ in g["params"]]
    weights = [p.detach().clone() for p in params]
    initial = [w.clone() for w in weights]
    buffers = [torch.zeros_like(w) for w in weights]
    for step in range(3):
        grads = [torch.randn_like(w) for w in weights]
        if step == 1:
            grads[0].zero_()  # zero gradient: no decay, no trust ratio (the weight stays put
            # apart from momentum)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        weights, buffers = _lars_reference_step(weights, grads, buffers, lr=2.0, momentum=0.9, wd=1e-2,
                                                tc=0.05, excluded=excluded)
        for p, w in zip(params, weights):
            torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-10)
    assert min((p.detach() - w0).abs().max().item() for p, w0 in zip(params, initial)) > 1e-3


def test_lars_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="trust_coefficient"):
        LARS([nn.Parameter(torch.zeros(2))], lr=0.1, trust_coefficient=0.0)
    with pytest.raises(ValueError, match="momentum"):
        LARS([nn.Parameter(torch.zeros(2))], lr=0.1, momentum=1.5)


# ------------------------------------------------------------------------------ LARS on FSDP2 shards


def _mlp() -> nn.Module:
    # 7 and 3 output rows: uneven shards over 2 ranks
    return nn.Sequential(nn.Linear(6, 7), nn.LayerNorm(7), nn.ReLU(), nn.Linear(7, 3))


def _fsdp_lars_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 layout
        from torch.distributed._composable.fsdp import fully_shard

    torch.manual_seed(0)
    reference = _mlp().double()
    model = copy.deepcopy(reference)
    initial = {name: p.detach().clone() for name, p in reference.named_parameters()}
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    hyper = dict(lr=1.0, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02)
    optimizer = LARS(param_groups(model, 1e-3, exclude_from_adaptation=True), **hyper)
    ref_optimizer = LARS(param_groups(reference, 1e-3, exclude_from_adaptation=True), **hyper)
    inputs = torch.randn(3, world_size, 4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    guard = StabilityGuard(GuardConfig())
    for step in range(3):
        model(inputs[step, rank]).pow(2).mean().backward()  # FSDP2 averages gradients over ranks
        sum(reference(inputs[step, r]).pow(2).mean() for r in range(world_size)).div(world_size).backward()
        if step == 0:  # the guard's gradient norms on DTensor gradients are full norms too
            sharded_norms, ref_norms = guard.grad_norms(model), guard.grad_norms(reference)
        optimizer.step()
        optimizer.zero_grad()
        ref_optimizer.step()
        ref_optimizer.zero_grad()
    sharded = {name: p.full_tensor().detach() for name, p in model.named_parameters()}
    ref = dict(reference.named_parameters())
    return {
        "is_dtensor": type(next(model.parameters())).__name__ == "DTensor",
        "max_diff": max((sharded[n] - ref[n].detach()).abs().max().item() for n in ref),
        "min_moved": min((ref[n].detach() - initial[n]).abs().max().item() for n in ref),
        "buffers_are_dtensors": all(
            type(state["momentum_buffer"]).__name__ == "DTensor" for state in optimizer.state.values()
        ),
        "grad_norms": (sharded_norms, ref_norms),
    }


@pytest.mark.slow
def test_lars_on_fsdp2_shards_matches_unsharded():
    results = run_distributed(_fsdp_lars_worker, 2)
    for result in results:
        assert result["is_dtensor"]
        assert result["max_diff"] < 1e-6, result
        assert result["min_moved"] > 1e-3, result  # the steps were large enough to tell
        assert result["buffers_are_dtensors"]
        sharded_norms, ref_norms = result["grad_norms"]
        assert set(sharded_norms) == set(ref_norms) == {"first/0", "last/3", "total"}
        for key, value in ref_norms.items():
            assert sharded_norms[key] == pytest.approx(value, rel=1e-9), key
