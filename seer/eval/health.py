"""Is the representation collapsing? Health numbers of one training batch's embeddings.

The training monitor (``seer.engine.monitor``) reads them every ``monitor.every_steps`` from what
the method's forward kept of that step's batch (``Method.health``); nothing here runs on other
steps. Every function takes (N, D) tensors on the training device and returns 0-dim tensors on
that device, so a check costs the engine one host transfer for all of them.

- :func:`embedding_health`: RankMe (:func:`seer.eval.probes.effective_rank_tensor`, the
  effective rank of the centred batch), that rank as a fraction of the most it can be
  (``min(N, D)``: a batch of 128 cannot have a rank above 128), and the mean per-dimension
  standard deviation of the L2-normalised embeddings times sqrt(D): about 1 for embeddings
  spread evenly over the sphere, 0 when every sample maps to the same direction (lightly's
  ``std_of_l2_normalized`` against its no-collapse value 1/sqrt(D)).
- :func:`prototype_usage` (SwAV): how many prototypes the batch's codes pick (argmax) and the
  entropy of that choice, ln(used) at most; a collapsed batch sends every sample to one.
- :func:`pair_similarity` (MoCo v3): mean cosine similarity of each query with its own key
  (positive) and with the other samples' keys (negative); collapse makes both approach 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seer.eval.probes import effective_rank_tensor


@torch.no_grad()
def std_ratio(x: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the batch std of L2-normalised rows, times sqrt(D)."""
    z = F.normalize(x.detach().float(), dim=1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[1])


@torch.no_grad()
def embedding_health(x: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{prefix}rank``, ``{prefix}rank_fraction`` and ``{prefix}std_ratio`` of an (N, D) batch."""
    rank = effective_rank_tensor(x)
    return {f"{prefix}rank": rank, f"{prefix}rank_fraction": rank / min(x.shape), f"{prefix}std_ratio": std_ratio(x)}


@torch.no_grad()
def prototype_usage(codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Prototypes picked (argmax) by the (N, K) codes, and the entropy (nats) of that choice."""
    counts = torch.bincount(codes.argmax(dim=1), minlength=codes.shape[1]).double()
    p = counts / counts.sum()
    return {"prototypes_used": (counts > 0).sum().double(), "code_entropy": -torch.special.xlogy(p, p).sum()}


@torch.no_grad()
def pair_similarity(queries: torch.Tensor, keys: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean cosine similarity of query i with key i (positive) and with keys j != i (negative)."""
    q = F.normalize(queries.detach().float(), dim=1)
    k = F.normalize(keys.detach().float(), dim=1)
    similarity = q @ k.t()
    n = similarity.shape[0]
    positive = similarity.diagonal().sum()
    negative = (similarity.sum() - positive) / max(n * (n - 1), 1)
    return {"positive_similarity": positive / n, "negative_similarity": negative}
