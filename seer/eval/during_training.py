"""The kNN probe run during pretraining (``eval.every_steps`` with ``eval.data``).

Labelled images are loaded once on rank 0 (seeded subsets of ``eval.train_images`` reference and
``eval.test_images`` scored images). At each probe rank 0 extracts features with the backbone
in eval mode and computes the weighted kNN accuracy (cosine, T = 0.07) and the effective rank
of the reference features, returned for the metrics log (``eval/knn_k<k>``,
``eval/effective_rank``). Under FSDP the backbone's full state dict is first gathered (a
collective every rank joins, offloaded to rank 0's CPU) into a plain copy, so the probe never
calls a sharded module outside its own forward; other ranks return an empty dict.
"""

from __future__ import annotations

import torch
from torch import nn

from seer.config import SeerConfig
from seer.eval.features import compute_features
from seer.eval.probes import effective_rank, knn_accuracy


class TrainingProbe:
    def __init__(self, cfg: SeerConfig, rank: int):
        e = cfg.eval
        self.every = e.every_steps
        self.k = e.k
        self.batch_size = e.batch_size
        self.size = e.size or max(g.size for g in cfg.augment.crops)
        self.mean, self.std = tuple(cfg.augment.mean), tuple(cfg.augment.std)
        self.architecture, self.model_kwargs = cfg.model.backbone, dict(cfg.model.kwargs)
        self.rank = rank
        if rank == 0:
            from seer.eval.runner import train_test_split

            self.train, self.test = train_test_split(e.data, e.test or None, train_limit=e.train_images,
                                                     test_limit=e.test_images, seed=cfg.seed)

    def due(self, step: int, max_steps: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == max_steps)

    def _plain_backbone(self, model: nn.Module, backbone: nn.Module) -> nn.Module | None:
        from seer.engine.parallel import is_fsdp

        if not is_fsdp(model):
            return backbone if self.rank == 0 else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from seer import models

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        plain = models.create(self.architecture, **self.model_kwargs)
        prefix = next(name for name, module in model.named_modules() if module is backbone) + "."
        plain.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        return plain

    @torch.no_grad()
    def run(self, model: nn.Module, backbone: nn.Module, device: torch.device) -> dict[str, float]:
        plain = self._plain_backbone(model, backbone)
        if plain is None:
            return {}
        device = device if plain is backbone else torch.device("cpu")
        features = [compute_features(plain, data, self.size, self.mean, self.std, batch_size=self.batch_size,
                                     device=device) for data in (self.train, self.test)]
        accuracy = knn_accuracy(features[0], self.train.labels, features[1], self.test.labels, ks=(self.k,),
                                num_classes=max(len(self.train.classes), len(self.test.classes)))
        return {f"eval/knn_k{self.k}": accuracy[f"k{min(self.k, len(features[0]))}"],
                "eval/effective_rank": effective_rank(features[0])}
