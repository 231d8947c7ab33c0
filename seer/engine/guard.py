"""Training-stability guard: per-step verdicts on the loss and gradient norm (step, skip the
update, or roll back to the last good checkpoint) and the per-layer gradient norms worth
logging (MoCo v3 saw spikes appear first in the patch projection, so the first and last
trainable layers are watched).

Consistency across ranks: ``StabilityGuard.check`` decides from its inputs only, so every
rank reaches the same verdict as long as the caller passes GLOBAL values; :func:`global_inputs`
makes them (the loss averaged over ranks, and a total gradient norm that is non-finite on every
rank when it is on any). :meth:`StabilityGuard.grad_norms` reduces all per-layer norms in one
collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from seer.config import GuardConfig
from seer.collectives import all_reduce_sum, full_norms, full_value, rank_and_world

ACTIONS = ("step", "skip", "rollback")


@dataclass(frozen=True)
class Verdict:
    """What to do with this step: ``action`` in ``ACTIONS``; ``message`` is for the log
    (empty when there is nothing to report)."""

    action: str
    message: str = ""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"Verdict action must be one of {ACTIONS}, got {self.action!r}")


def _trainable_layers(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Trainable parameters grouped by owning module name, in ``named_parameters`` order
    (parameters of ``model`` itself, e.g. a ViT's cls_token, are under ``""``)."""
    layers: dict[str, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            module_name = name.rsplit(".", 1)[0] if "." in name else ""
            layers.setdefault(module_name, []).append(param)
    return layers


def first_last_layers(model: nn.Module) -> tuple[str, str]:
    """Module names of the first and the last trainable parameterised layers, in
    ``named_parameters`` order. Loose parameters of ``model`` itself (cls_token, pos_embed)
    are not layers and are only chosen when nothing else is trainable (name ``""``)."""
    layers = [name for name in _trainable_layers(model) if name] or list(_trainable_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return layers[0], layers[-1]


class StabilityGuard:
    """Counts non-finite steps and watches the gradient norm for spikes (see module doc).

    - non-finite loss or gradient norm: ``skip`` (``step`` if ``cfg.skip_nonfinite`` is off),
      and after ``cfg.max_bad_steps`` such steps in a row ``rollback`` (the counter restarts;
      ``max_bad_steps`` 0 never rolls back);
    - a finite gradient norm above ``cfg.spike_factor`` x its running mean (once
      ``spike_warmup`` finite steps have been seen) is reported but still stepped.

    The running mean is an average of the finite gradient norms that becomes an EMA with
    horizon ``ema_steps``; a spike enters it clipped to the spike threshold so that one spike
    does not hide the next.
    """

    def __init__(self, cfg: GuardConfig, *, spike_warmup: int = 20, ema_steps: int = 100):
        if cfg.max_bad_steps < 0:
            raise ValueError(f"guard.max_bad_steps must be >= 0, got {cfg.max_bad_steps}")
        if spike_warmup < 0 or ema_steps < 1:
            raise ValueError(f"spike_warmup must be >= 0 and ema_steps >= 1, got {spike_warmup}, {ema_steps}")
        self.cfg, self.spike_warmup, self.ema_steps = cfg, spike_warmup, ema_steps
        self.bad_in_a_row = 0
        self.finite_steps = 0
        self.mean_grad_norm = 0.0
        self.spikes = 0
        self.rollbacks = 0

    def grad_norms(self, model: nn.Module) -> dict[str, float]:
        """``{"first/<module>": .., "last/<module>": .., "total": ..}`` (log them under a
        ``grad_norm/`` prefix): L2 norms over trainable parameters with a gradient; first and
        last from :func:`first_last_layers`, each over all of that module's own parameters (a
        layer without gradients reads 0).
        Full norms for FSDP2 DTensor gradients: every rank must call it, in the same order."""
        first, last = first_last_layers(model)
        layers = _trainable_layers(model)
        with_grad = {name: [p.grad for p in params if p.grad is not None] for name, params in layers.items()}
        norms = full_norms([grad for grads in with_grad.values() for grad in grads]).tolist()  # one reduction, one read
        squares, start = {}, 0
        for name, grads in with_grad.items():
            if grads:
                squares[name] = sum(n * n for n in norms[start:start + len(grads)])
            start += len(grads)
        result = {}
        for role, name in (("first", first), ("last", last)):
            result[f"{role}/{name or '<root>'}"] = math.sqrt(squares.get(name, 0.0))
        result["total"] = math.sqrt(sum(squares.values()))
        return result

    def check(self, step: int, loss: float | torch.Tensor, total_grad_norm: float | torch.Tensor) -> Verdict:
        """The verdict for this step from the GLOBAL loss and total gradient norm."""
        loss_value, norm_value = float(loss), float(total_grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.bad_in_a_row += 1
            what = f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'}"
            detail = f"step {step}: {what} (loss {loss_value}, grad norm {norm_value}), {self.bad_in_a_row} in a row"
            if self.cfg.max_bad_steps and self.bad_in_a_row >= self.cfg.max_bad_steps:
                self.bad_in_a_row = 0
                self.rollbacks += 1
                return Verdict("rollback", f"{detail}: rolling back to the last good checkpoint")
            if self.cfg.skip_nonfinite:
                return Verdict("skip", f"{detail}: update skipped")
            return Verdict("step", f"{detail}: stepping anyway (guard.skip_nonfinite is off)")
        self.bad_in_a_row = 0
        message = ""
        entered = norm_value
        threshold = self.cfg.spike_factor * self.mean_grad_norm
        if self.cfg.spike_factor > 0 and self.finite_steps >= self.spike_warmup and norm_value > threshold:
            self.spikes += 1
            entered = threshold
            message = (
                f"step {step}: gradient-norm spike {norm_value:.4g} > {self.cfg.spike_factor:g} x running "
                f"mean {self.mean_grad_norm:.4g}"
            )
        self.finite_steps += 1
        weight = max(1.0 / self.ema_steps, 1.0 / self.finite_steps)
        self.mean_grad_norm += weight * (entered - self.mean_grad_norm)
        return Verdict("step", message)

    def state_dict(self) -> dict[str, Any]:
        return {
            "bad_in_a_row": self.bad_in_a_row,
            "finite_steps": self.finite_steps,
            "mean_grad_norm": self.mean_grad_norm,
            "spikes": self.spikes,
            "rollbacks": self.rollbacks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bad_in_a_row = int(state["bad_in_a_row"])
        self.finite_steps = int(state["finite_steps"])
        self.mean_grad_norm = float(state["mean_grad_norm"])
        self.spikes = int(state["spikes"])
        self.rollbacks = int(state["rollbacks"])


def global_inputs(loss: torch.Tensor, grad_norm: float | torch.Tensor) -> tuple[float, float]:
    """The guard's inputs, equal on every rank: (loss averaged over ranks, total gradient norm).

    ``grad_norm`` is this rank's view of the total norm (``clip_grad_norm_``'s result; the full
    value of a DTensor result is taken explicitly). One all-reduce carries the loss and a flag
    "non-finite norm here", so a fault seen by one rank only (a bit flip in its shard, an old
    torch returning the local part of a DTensor norm) makes every rank read a non-finite norm
    and reach the same skip/rollback verdict instead of some stepping and some not. The flag is
    computed on the device and the three numbers come to the host together: this is the step's
    one host synchronisation.
    """
    norm = full_value(grad_norm) if torch.is_tensor(grad_norm) else torch.tensor(float(grad_norm))
    norm = norm.detach().to(device=loss.device, dtype=torch.float32).reshape(())
    summed = all_reduce_sum(torch.stack([loss.detach().float().reshape(()), (~torch.isfinite(norm)).float()]))
    loss_value, nonfinite_anywhere, norm_value = torch.stack(
        [summed[0] / rank_and_world()[1], summed[1], norm]).tolist()
    if nonfinite_anywhere > 0 and math.isfinite(norm_value):
        norm_value = float("nan")  # another rank's gradients are not finite
    return loss_value, norm_value
