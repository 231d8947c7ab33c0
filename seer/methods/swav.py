"""SwAV: swapped prediction of Sinkhorn-Knopp cluster assignments between crops.

The method is an ``nn.Module`` around a backbone: ``forward(views) -> {"loss", ...}``. Views are
the augmented crops in crop order (the large ones first); consecutive crops of the same size go
through the backbone together. Assignments are computed from the crops in ``crops_for_assign``
(optionally preceded by a queue of past embeddings) with the distributed Sinkhorn-Knopp
algorithm in float32, and every other crop predicts them. The prototypes are L2-normalised
before each forward and receive no gradient for the first ``freeze_prototypes_steps`` steps.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seer.collectives import all_reduce_, rank_and_world
from seer.eval.health import prototype_usage
from seer.methods.base import Method
from seer.models.heads import SwAVHead

log = logging.getLogger(__name__)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Soft assignments (B, K) of this rank's rows; the sums run over every rank's batch.

    Q = exp(scores / eps)^T normalised to sum 1; then, ``iterations`` times, rows (prototypes)
    are scaled to sum 1/K and columns (samples) to sum 1/B, B being the global batch. Returned
    columns sum to 1. Computed in float32 whatever the input dtype; the global maximum is
    subtracted first, which the normalisation cancels, so exp cannot overflow.
    """
    logits = scores.float() / epsilon
    logits = logits - all_reduce_(logits.max().clone(), dist.ReduceOp.MAX)
    q = torch.exp(logits).t()  # K x B
    n_prototypes = q.shape[0]
    global_batch = q.shape[1] * rank_and_world()[1]
    q /= all_reduce_(q.sum())
    for _ in range(iterations):
        q /= all_reduce_(q.sum(dim=1, keepdim=True))
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= global_batch
    q *= global_batch
    return q.t()


def swapped_prediction_loss(
    scores: list[torch.Tensor], assignments: dict[int, torch.Tensor], temperature: float
) -> torch.Tensor:
    """Mean over assignment crops of the mean cross-entropy of every other crop's prediction."""
    total = scores[0].new_zeros((), dtype=torch.float32)
    for crop_id, q in assignments.items():
        others = [v for v in range(len(scores)) if v != crop_id]
        sub = sum(-(q * F.log_softmax(scores[v].float() / temperature, dim=1)).sum(dim=1).mean() for v in others)
        total = total + sub / len(others)
    return total / len(assignments)


def forward_multicrop(backbone: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Backbone features of all views, one forward per run of same-sized consecutive crops."""
    outputs, start = [], 0
    while start < len(views):
        end = start
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        outputs.append(backbone(torch.cat(views[start:end])))
        start = end
    return torch.cat(outputs)


class SwAV(Method):
    collapse_causes = ("an LR too high for the batch (LARS: lower optim.lr), a queue started too early "
                       "(method.swav.queue_start_step), prototypes not frozen long enough "
                       "(method.swav.freeze_prototypes_steps), too little augmentation (crop scale, colour jitter)")

    def __init__(
        self,
        backbone: nn.Module,
        *,
        head_hidden: list[int],
        head_out: int,
        head_bn: bool,
        n_prototypes: int,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        crops_for_assign: tuple[int, ...] = (0, 1),
        freeze_prototypes_steps: int = 0,
        queue_length: int = 0,
        queue_start_step: int = 0,
        collapse_patience: int = 500,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = SwAVHead(backbone.num_features, list(head_hidden), head_out, n_prototypes, batch_norm=head_bn)
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.crops_for_assign = tuple(crops_for_assign)
        self.freeze_prototypes_steps = freeze_prototypes_steps
        self.queue_start_step = queue_start_step
        self.register_buffer("queue", torch.zeros(len(self.crops_for_assign), queue_length, head_out))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.collapse_threshold = 0.02 * math.log(n_prototypes)
        self.collapse_patience = collapse_patience
        self._steps_at_ln_k = 0

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg) -> "SwAV":
        """SwAV from the ``method.swav`` section."""
        s = cfg.method.swav
        return cls(
            backbone, head_hidden=s.head_hidden, head_out=s.head_out, head_bn=s.head_bn,
            n_prototypes=s.n_prototypes, temperature=s.temperature, epsilon=s.epsilon,
            sinkhorn_iterations=s.sinkhorn_iterations, crops_for_assign=tuple(s.crops_for_assign),
            freeze_prototypes_steps=s.freeze_prototypes_steps, queue_length=s.queue_length,
            queue_start_step=s.queue_start_step, collapse_patience=s.collapse_patience,
        )

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        self.head.normalize_prototypes()
        batch = views[0].shape[0]
        length = self.queue.shape[1]
        use_queue = length > 0 and int(self.step) >= self.queue_start_step
        queue_full = use_queue and int(self.queue_filled) >= length
        features = forward_multicrop(self.backbone, views)
        # the queue's scores come from the head's own forward (a sharded head is whole only then)
        z, scores, *queue_scores = self.head(features, queue=self.queue.flatten(0, 1) if queue_full else None)
        crop_scores = list(scores.split(batch))
        crop_embeddings = z.detach().split(batch)
        queued = queue_scores[0].split(length) if queue_full else None
        assignments = {}
        with torch.no_grad():
            for i, crop_id in enumerate(self.crops_for_assign):
                out = crop_scores[crop_id].detach()
                if queued is not None:
                    out = torch.cat((queued[i].to(out.dtype), out))
                assignments[crop_id] = sinkhorn(out, self.epsilon, self.sinkhorn_iterations)[-batch:]
            if use_queue:
                for i, crop_id in enumerate(self.crops_for_assign):
                    self.queue[i] = torch.cat((crop_embeddings[crop_id].to(self.queue.dtype), self.queue[i][:-batch]))
                self.queue_filled += batch
        loss = swapped_prediction_loss(crop_scores, assignments, self.temperature)
        if self.keep_for_health:  # this rank's batch: the views of the first crops' size, and the codes
            same = next((i for i, v in enumerate(views) if v.shape[-2:] != views[0].shape[-2:]), len(views)) * batch
            self.keep(features=features[:same], embeddings=z[:same], codes=torch.cat(list(assignments.values())))
        return {"loss": loss}

    def method_health(self, kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``swav_prototypes_used`` / ``swav_code_entropy``: prototypes the batch's codes pick."""
        return {f"swav_{name}": value for name, value in prototype_usage(kept["codes"]).items()}

    def on_after_backward(self, step: int) -> None:
        """Prototypes get no update while frozen (the SwAV recipe's first iterations)."""
        if step < self.freeze_prototypes_steps:
            for p in self.head.prototypes.parameters():
                p.grad = None

    def after_step(self, step: int) -> None:
        self.step.fill_(step + 1)

    def check_collapse(self, loss: float, step: int) -> str | None:
        """A loud message when the loss has sat at ln(K) for ``collapse_patience`` steps.

        Early in training the assignments are near uniform and the loss is near ln(K) anyway;
        only a loss that stays there (every sample spread evenly over all prototypes) means the
        representation collapsed. Repeats every ``collapse_patience`` steps while it lasts.
        """
        n_prototypes = self.head.prototypes.weight.shape[0]
        at_ln_k = abs(loss - math.log(n_prototypes)) < self.collapse_threshold
        self._steps_at_ln_k = self._steps_at_ln_k + 1 if at_ln_k and step > self.freeze_prototypes_steps else 0
        if self._steps_at_ln_k and self._steps_at_ln_k % self.collapse_patience == 0:
            return (
                f"SwAV loss {loss:.4f} has sat at ln(K) = {math.log(n_prototypes):.4f} for {self._steps_at_ln_k} "
                "steps: the representation may have collapsed (check LR, queue start, prototype freezing)"
            )
        return None
