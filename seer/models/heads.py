"""Projection heads for the SSL methods: SwAV's projection MLP + prototypes, MoCo v3's
projector and predictor MLPs. Plain nn.Modules; the loss lives in `seer.methods`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def build_mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int,
    last_bn: bool = True,
) -> nn.Sequential:
    """MoCo v3 MLP: `num_layers` bias-free Linears; every hidden one is followed by
    BatchNorm1d + ReLU, the last one by BatchNorm1d(affine=False) when `last_bn`."""
    if num_layers < 1:
        raise ValueError(f"MLP num_layers must be >= 1, got {num_layers}")
    layers: list[nn.Module] = []
    for index in range(num_layers):
        layer_in = in_dim if index == 0 else hidden_dim
        is_last = index == num_layers - 1
        layer_out = out_dim if is_last else hidden_dim
        layers.append(nn.Linear(layer_in, layer_out, bias=False))
        if not is_last:
            layers.append(nn.BatchNorm1d(layer_out))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            # MoCo v3 follows SimCLR: the output BN has no learnable affine parameters.
            layers.append(nn.BatchNorm1d(layer_out, affine=False))
    return nn.Sequential(*layers)


class SwAVHead(nn.Module):
    """SwAV projection MLP followed by L2 normalisation and a bias-free prototype layer.

    hidden_dims=[] gives a single Linear in_dim -> out_dim. SEER's 256GF head is
    SwAVHead(10444, [8192, 8192], 256, 16000, batch_norm=False); SwAV's ResNet-50 default is
    SwAVHead(2048, [2048], 128, 3000, batch_norm=True).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dims: list[int],
        out_dim: int,
        n_prototypes: int,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("n_prototypes", n_prototypes)):
            if value < 1:
                raise ValueError(f"SwAVHead {name} must be >= 1, got {value}")
        layers: list[nn.Module] = []
        previous = in_dim
        for width in hidden_dims:
            if width < 1:
                raise ValueError(f"SwAVHead hidden width must be >= 1, got {hidden_dims}")
            layers.append(nn.Linear(previous, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU(inplace=True))
            previous = width
        layers.append(nn.Linear(previous, out_dim))
        self.projection = nn.Sequential(*layers)
        self.prototypes = nn.Linear(out_dim, n_prototypes, bias=False)
        self.out_dim = out_dim
        self.n_prototypes = n_prototypes

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """L2-normalise each prototype row in place (SwAV does this before every forward).

        `copy_` of `F.normalize` of the same tensor is used rather than assigning `.data`, so
        this also works when FSDP2 has made the weight a DTensor sharded on dim 0: each rank
        holds whole rows and normalising along dim 1 is then a local op.
        """
        weight = self.prototypes.weight
        weight.copy_(F.normalize(weight, dim=1, p=2))

    def forward(self, features: torch.Tensor, queue: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Return (z, scores): unit-norm embeddings (B, out_dim), prototype scores (B, K).

        With ``queue`` (N, out_dim), past embeddings, also their prototype scores (N, K),
        without gradient: (z, scores, queue_scores). They are computed here, inside the head's
        forward, because a sharded head (FSDP2) holds its full weights only during its forward.
        """
        z = F.normalize(self.projection(features), dim=1, p=2)
        scores = self.prototypes(z)
        if queue is None:
            return z, scores
        with torch.no_grad():
            return z, scores, self.prototypes(queue.to(z.dtype))


class MoCoProjector(nn.Module):
    """MoCo v3 projector: in -> hidden -> ... -> out, bias-free Linears, BN + ReLU between
    them and an affine-free BN at the end (in_dim -> 4096 -> 4096 -> 256 by default)."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, num_layers: int = 3) -> None:
        super().__init__()
        self.mlp = build_mlp(in_dim, hidden_dim, out_dim, num_layers, last_bn=True)
        self.out_dim = out_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


class MoCoPredictor(nn.Module):
    """MoCo v3 predictor: dim -> hidden -> dim, with the final affine-free BN used for ViT."""

    def __init__(self, dim: int = 256, hidden_dim: int = 4096, num_layers: int = 2) -> None:
        super().__init__()
        self.mlp = build_mlp(dim, hidden_dim, dim, num_layers, last_bn=True)
        self.out_dim = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)
