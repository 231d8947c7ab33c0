"""What a method is to the engine: :class:`Method`, an ``nn.Module`` around a backbone.

The engine (``seer.engine``) calls only what is declared here, so a new method is one file with
one subclass registered in ``seer.methods.METHODS``:

- ``from_config(backbone, cfg)``: build from the method's config section (and what else of the
  run's config it needs, e.g. ``train.max_steps`` for a momentum schedule);
- ``backbone``: the module that is exported and probed;
- ``forward(views) -> dict``: ``loss`` plus scalars worth logging;
- ``on_after_backward(step)``: gradient edits before the optimizer (SwAV freezes prototypes);
- ``after_step(step)``: what follows the optimizer step (MoCo v3's momentum update);
- ``check_collapse(loss, step) -> str | None``: a warning to log loudly, or None;
- ``keep_for_health`` / ``health() -> dict``: the loop sets the flag before the forward of a
  step the training monitor reads (every ``monitor.every_steps``); that forward keeps detached
  references to its batch's backbone features and head embeddings (``keep``), and ``health()``
  then returns their health numbers (``seer.eval.health``) plus the method's own, as 0-dim
  tensors on the training device. Other steps keep and compute nothing;
- ``collapse_causes``: what usually makes this method collapse, for the monitor's alarm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from seer.eval.health import embedding_health

if TYPE_CHECKING:
    from seer.config import SeerConfig


class Method(nn.Module):
    backbone: nn.Module
    keep_for_health: bool = False  # set by the training loop on the steps the monitor reads
    collapse_causes: str = "an LR too high for the batch; too little augmentation"

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg: "SeerConfig") -> "Method":
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def on_after_backward(self, step: int) -> None:
        """Nothing to edit by default."""

    def after_step(self, step: int) -> None:
        """Nothing to do by default."""

    def check_collapse(self, loss: float, step: int) -> str | None:
        return None

    def keep(self, **tensors: torch.Tensor) -> None:
        """In ``forward``: hold detached references for ``health()`` when the loop asked for them."""
        if self.keep_for_health:
            self._kept = {name: t.detach() for name, t in tensors.items()}

    def health(self) -> dict[str, torch.Tensor]:
        """Health of the batch the last flagged forward kept (then dropped): the backbone
        features' ``rank``, ``rank_fraction``, ``std_ratio``, the head embeddings' ``head_...``,
        and the method's own (``method_health``). Empty when nothing was kept."""
        kept, self._kept = getattr(self, "_kept", {}), {}
        values: dict[str, torch.Tensor] = {}
        if "features" in kept:
            values.update(embedding_health(kept["features"]))
        if "embeddings" in kept:
            values.update(embedding_health(kept["embeddings"], prefix="head_"))
        if kept:
            values.update(self.method_health(kept))
        return values

    def method_health(self, kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The method's own health numbers from what its forward kept; none by default."""
        return {}
