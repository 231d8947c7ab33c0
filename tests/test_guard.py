"""seer.engine.guard: skip / rollback / spike verdicts, their state, and first/last-layer
gradient norms."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from seer.config import GuardConfig
from seer.engine.guard import StabilityGuard, Verdict, first_last_layers

NAN, INF = float("nan"), float("inf")


def _warm(guard: StabilityGuard, steps: int = 30, start: int = 0) -> int:
    for step in range(start, start + steps):
        verdict = guard.check(step, torch.tensor(2.0), 1.0 + 0.1 * ((step % 3) - 1))
        assert verdict == Verdict("step", "")
    return start + steps


def test_nonfinite_loss_or_grad_norm_is_skipped():
    guard = StabilityGuard(GuardConfig(max_bad_steps=3))
    verdict = guard.check(0, torch.tensor(NAN), 1.0)
    assert verdict.action == "skip" and "non-finite loss" in verdict.message and "step 0" in verdict.message
    verdict = guard.check(1, 2.0, torch.tensor(INF))
    assert verdict.action == "skip" and "gradient norm" in verdict.message


def test_k_bad_steps_in_a_row_roll_back_and_reset():
    guard = StabilityGuard(GuardConfig(max_bad_steps=3))
    actions = [guard.check(step, NAN, NAN).action for step in range(7)]
    assert actions == ["skip", "skip", "rollback", "skip", "skip", "rollback", "skip"]
    assert guard.rollbacks == 2


def test_a_good_step_resets_the_bad_streak():
    guard = StabilityGuard(GuardConfig(max_bad_steps=3))
    actions = [guard.check(step, loss, 1.0).action for step, loss in enumerate([NAN, NAN, 1.0, NAN, NAN])]
    assert actions == ["skip", "skip", "step", "skip", "skip"]


def test_skip_disabled_steps_and_zero_never_rolls_back():
    verdict = StabilityGuard(GuardConfig(skip_nonfinite=False, max_bad_steps=5)).check(0, NAN, 1.0)
    assert verdict.action == "step" and "skip_nonfinite" in verdict.message
    guard = StabilityGuard(GuardConfig(max_bad_steps=0))
    assert {guard.check(step, NAN, 1.0).action for step in range(20)} == {"skip"}


def test_gradient_spike_is_reported_but_stepped():
    guard = StabilityGuard(GuardConfig(spike_factor=10.0), spike_warmup=20)
    step = _warm(guard)
    verdict = guard.check(step, 2.0, 20.0)
    assert verdict.action == "step" and "spike" in verdict.message and "20" in verdict.message
    assert guard.check(step + 1, 2.0, 1.0) == Verdict("step", "")
    # the spike entered the running mean clipped, so a second one is still caught
    assert "spike" in guard.check(step + 2, 2.0, 15.0).message
    assert guard.spikes == 2


def test_no_spike_reports_during_warmup():
    guard = StabilityGuard(GuardConfig(spike_factor=10.0), spike_warmup=20)
    _warm(guard, steps=5)
    assert guard.check(5, 2.0, 1000.0) == Verdict("step", "")


def test_state_dict_round_trip():
    guard = StabilityGuard(GuardConfig(max_bad_steps=3))
    step = _warm(guard)
    guard.check(step, NAN, 1.0)
    buffer = io.BytesIO()
    torch.save(guard.state_dict(), buffer)
    buffer.seek(0)
    resumed = StabilityGuard(GuardConfig(max_bad_steps=3))
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.state_dict() == guard.state_dict()
    assert resumed.check(step + 1, NAN, 1.0).action == "skip"
    assert resumed.check(step + 2, NAN, 1.0).action == "rollback"  # the streak carried over
    assert "spike" in resumed.check(step + 3, 2.0, 50.0).message


def test_verdict_rejects_unknown_action():
    with pytest.raises(ValueError, match="action"):
        Verdict("explode")


class FrozenPatchNet(nn.Module):
    """ViT-like: loose root parameters and a frozen patch projection in front."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 4))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Linear(3, 4)
        self.patch_embed.proj.requires_grad_(False)
        self.blocks = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.blocks(self.patch_embed.proj(x) + self.cls_token))


def _backward(model: nn.Module, x: torch.Tensor) -> None:
    model(x).pow(2).sum().backward()


def test_grad_norms_first_last_total_for_sequential():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    _backward(model, torch.randn(5, 4))
    norms = StabilityGuard(GuardConfig()).grad_norms(model)
    assert set(norms) == {"first/0", "last/2", "total"}

    def norm(*params):
        return torch.cat([p.grad.flatten() for p in params]).norm().item()

    assert norms["first/0"] == pytest.approx(norm(model[0].weight, model[0].bias), rel=1e-6)
    assert norms["last/2"] == pytest.approx(norm(model[2].weight, model[2].bias), rel=1e-6)
    assert norms["total"] == pytest.approx(norm(*model.parameters()), rel=1e-6)


def test_grad_norms_skip_a_frozen_first_layer():
    torch.manual_seed(0)
    model = FrozenPatchNet()
    assert first_last_layers(model) == ("blocks.0", "head")
    _backward(model, torch.randn(5, 3))
    norms = StabilityGuard(GuardConfig()).grad_norms(model)
    assert set(norms) == {"first/blocks.0", "last/head", "total"}
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = torch.cat([p.grad.flatten() for p in trainable]).norm().item()
    assert norms["total"] == pytest.approx(total, rel=1e-6)
    assert norms["total"] > norms["first/blocks.0"] > 0
