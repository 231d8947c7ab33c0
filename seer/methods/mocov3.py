"""MoCo v3: a query encoder (backbone + projector + predictor) learns to pick out, among the keys
of every image in the global batch, the key a momentum encoder (an EMA copy of backbone +
projector) computed from another view of the same image.

Owns the symmetric InfoNCE loss ``ctr(q1, k2) + ctr(q2, k1)`` with keys gathered from every rank
(no gradient through keys), the cosine momentum schedule ``m(t) = 1 - (1 + cos(pi t / T)) / 2
* (1 - m0)``, and the EMA update of the momentum encoder, which also works when FSDP2 has
sharded the parameters into DTensors. ``backbone`` is the query encoder's: it is what gets
exported. Follows the reference code (facebookresearch/moco-v3, ``moco/builder.py``).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from seer.collectives import all_gather_no_grad, is_dtensor, rank_and_world
from seer.eval.health import pair_similarity
from seer.methods.base import Method
from seer.models.heads import MoCoPredictor, MoCoProjector

def cosine_momentum(step: int, total_steps: int, base_momentum: float) -> float:
    """MoCo v3's momentum at ``step``: ``base_momentum`` at 0, rising to 1 at ``total_steps``
    (held at 1 after)."""
    progress = min(max(step, 0), total_steps) / total_steps
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - base_momentum)


def contrastive_loss(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """``CrossEntropy(normalize(q) @ gather(normalize(k)).T / T, arange(N) + N * rank) * 2T``.

    ``queries`` and ``keys`` are this rank's (N, D); the keys of every rank are gathered without
    gradient, so query i of rank r must pick key N * r + i among all of them. Computed in
    float32 whatever the autocast dtype.
    """
    rank, _ = rank_and_world()
    with torch.autocast(queries.device.type, enabled=False):
        q = F.normalize(queries.float(), dim=1)
        k = all_gather_no_grad(F.normalize(keys.detach().float(), dim=1))
        logits = q @ k.t() / temperature
        labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
        return F.cross_entropy(logits, labels) * (2.0 * temperature)


def _matching_shards(momentum: torch.Tensor, base: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's storage of a momentum parameter and the matching values of its base
    parameter (plain tensors, the first an alias so in-place updates reach the parameter).

    FSDP2 shards both encoders the same way (dim 0 over the same mesh), so the EMA is then a
    purely local elementwise update; differing placements are redistributed first.
    """
    momentum_is_dtensor, base_is_dtensor = is_dtensor(momentum), is_dtensor(base)
    if not momentum_is_dtensor and not base_is_dtensor:
        return momentum, base
    if not momentum_is_dtensor:  # momentum encoder left whole, base sharded
        return momentum, base.full_tensor()
    if not base_is_dtensor:
        raise ValueError(
            f"MoCo v3 momentum parameter {name!r} is sharded but its base parameter is not: "
            "shard the base and momentum encoders alike (fully_shard the whole method module)"
        )
    if base.device_mesh != momentum.device_mesh:
        raise ValueError(f"MoCo v3 parameter {name!r}: base and momentum copies live on different device meshes")
    if base.placements != momentum.placements:
        base = base.redistribute(momentum.device_mesh, momentum.placements)
    return momentum.to_local(), base.to_local()


class MoCoV3(Method):
    """MoCo v3 around a backbone with ``num_features``. ``forward([x1, x2])`` takes the two
    views; call ``after_step(step)`` after each optimizer step to move the momentum encoder."""

    collapse_causes = ("an LR too high for the batch (LARS: lower optim.lr), too little augmentation (crop scale, "
                       "colour jitter), a momentum too low for the batch (method.mocov3.momentum)")

    def __init__(
        self,
        backbone: nn.Module,
        *,
        total_steps: int,
        projector_hidden: int = 4096,
        predictor_hidden: int = 4096,
        out_dim: int = 256,
        temperature: float = 0.2,
        base_momentum: float = 0.99,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"MoCo v3 temperature must be > 0, got {temperature}")
        if not 0.0 <= base_momentum <= 1.0:
            raise ValueError(f"MoCo v3 momentum must be in [0, 1], got {base_momentum}")
        if total_steps < 1:
            raise ValueError(f"MoCo v3 total_steps (train.max_steps) must be >= 1, got {total_steps}")
        for what, value in (("projector_hidden", projector_hidden), ("predictor_hidden", predictor_hidden),
                            ("out_dim", out_dim)):
            if value < 1:
                raise ValueError(f"MoCo v3 {what} must be >= 1, got {value}")
        self.backbone = backbone
        self.projector = MoCoProjector(backbone.num_features, projector_hidden, out_dim, num_layers=3)
        self.predictor = MoCoPredictor(out_dim, predictor_hidden, num_layers=2)
        # The key encoder starts as an exact copy and is only ever moved by the EMA.
        self.momentum_backbone = copy.deepcopy(backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for param in self._momentum_parameters():
            param.requires_grad_(False)
        self.temperature = temperature
        self.base_momentum = base_momentum
        self.total_steps = total_steps
        # Without BatchNorm every sample's features are independent of the rest of the batch
        # (ViT: LayerNorm only), so both views can share one backbone call (one FSDP all-gather).
        # With BatchNorm each view gets its own call, as in the reference code.
        self.views_share_backbone_call = not any(
            isinstance(module, nn.modules.batchnorm._BatchNorm) for module in backbone.modules()
        )

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg) -> "MoCoV3":
        """MoCo v3 from the ``method.mocov3`` section; the momentum reaches 1 at ``train.max_steps``."""
        m = cfg.method.mocov3
        return cls(backbone, total_steps=cfg.train.max_steps, projector_hidden=m.projector_hidden,
                   predictor_hidden=m.predictor_hidden, out_dim=m.out_dim, temperature=m.temperature,
                   base_momentum=m.momentum)

    def _base_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [*self.backbone.named_parameters(), *self.projector.named_parameters()]

    def _momentum_parameters(self) -> list[nn.Parameter]:
        return [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]

    def momentum_at(self, step: int) -> float:
        return cosine_momentum(step, self.total_steps, self.base_momentum)

    def _encode(self, backbone: nn.Module, projector: nn.Module,
                views: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Backbone features and projector outputs of each view; the heads' BatchNorm always
        sees one view at a time."""
        if self.views_share_backbone_call:
            features = list(backbone(torch.cat(views)).split(views[0].shape[0]))
        else:
            features = [backbone(view) for view in views]
        return features, [projector(f) for f in features]

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(views) != 2:
            raise ValueError(f"MoCo v3 takes exactly 2 views per image (two crop groups of count 1), got {len(views)}")
        if views[0].shape != views[1].shape:
            raise ValueError(
                f"MoCo v3 views must have the same shape, got {tuple(views[0].shape)} and {tuple(views[1].shape)}"
            )
        features, projected = self._encode(self.backbone, self.projector, views)
        q1, q2 = (self.predictor(z) for z in projected)
        with torch.no_grad():
            k1, k2 = self._encode(self.momentum_backbone, self.momentum_projector, views)[1]
        loss = contrastive_loss(q1, k2, self.temperature) + contrastive_loss(q2, k1, self.temperature)
        if self.keep_for_health:  # this rank's batch; pairs as the loss forms them: (q1, k2), (q2, k1)
            self.keep(features=torch.cat(features), embeddings=torch.cat((q1, q2)), queries=torch.cat((q1, q2)),
                      keys=torch.cat((k2, k1)))
        return {"loss": loss}

    def method_health(self, kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``mocov3_positive_similarity`` / ``mocov3_negative_similarity``: cosine of each query
        with its own key and with the batch's other keys (this rank's; no gather)."""
        n = kept["queries"].shape[0] // 2
        halves = [pair_similarity(kept["queries"][i * n:(i + 1) * n], kept["keys"][i * n:(i + 1) * n]) for i in (0, 1)]
        return {f"mocov3_{name}": (halves[0][name] + halves[1][name]) / 2 for name in halves[0]}

    @torch.no_grad()
    def update_momentum_encoder(self, momentum: float) -> None:
        """``momentum_param = momentum * momentum_param + (1 - momentum) * base_param``, written
        as ``lerp`` so that equal values (a frozen layer) stay bit-identical."""
        base = self._base_parameters()
        moving = self._momentum_parameters()
        if len(base) != len(moving):
            raise ValueError(f"MoCo v3: {len(base)} base parameters but {len(moving)} momentum parameters")
        targets, sources = [], []
        for (name, base_param), momentum_param in zip(base, moving):
            if base_param.shape != momentum_param.shape:
                raise ValueError(
                    f"MoCo v3 parameter {name!r}: base shape {tuple(base_param.shape)} != momentum shape "
                    f"{tuple(momentum_param.shape)}"
                )
            target, source = _matching_shards(momentum_param, base_param, name)
            targets.append(target)
            sources.append(source.to(target.dtype))
        if targets:
            torch._foreach_lerp_(targets, sources, 1.0 - momentum)

    def after_step(self, step: int) -> None:
        """EMA update after optimizer step ``step`` (0-based) with ``m(step + 1)``.

        The reference code updates at the start of iteration ``i`` with ``m(i)``, from the
        weights after ``i`` optimizer steps; doing it here with ``m(step + 1)`` is the same
        sequence (its update at iteration 0 is a no-op, ours after the last step uses m = 1).
        """
        momentum = self.momentum_at(step + 1)
        if momentum < 1.0:
            self.update_momentum_encoder(momentum)
