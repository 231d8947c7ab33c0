"""The training monitor: health numbers of the batch every ``monitor.every_steps``, and the
collapse alarm.

Before the forward of a step whose completed-step count will be a multiple of
``monitor.every_steps``, the loop sets ``method.keep_for_health`` (``arm``); that forward keeps
detached references to its batch's backbone features, head embeddings and the method's own
tensors. After the step, ``observe`` asks ``method.health()`` for their numbers
(``seer.eval.health``: RankMe and the std of L2-normalised features against 1/sqrt(D), for the
backbone features and the head embeddings; SwAV's prototype usage; MoCo v3's positive and
negative similarity), reads them to the host in one transfer and returns them as
``health/<name>`` scalars for the step's metrics record (metrics.jsonl, TensorBoard). Other
steps keep and compute nothing.

Each rank measures its own batch (no collective); rank 0's numbers are the ones logged. A
check is bad when the backbone features' batch RankMe is below ``monitor.min_rank`` (or below
``monitor.min_rank_fraction`` of min(N, D) when that is lower: small batches), or their
``std_ratio`` below ``monitor.min_std_ratio`` (every sample at one point);
``monitor.patience`` bad checks in a row raise the alarm: one event in metrics.jsonl and a
warning line with what usually causes it (``Method.collapse_causes``), again only after the
features recovered. With ``monitor.stop_on_collapse`` the loop asks ``should_stop`` at every
check: the ranks agree (one all-reduce, at checks only) and all stop with a checkpoint. The
count of bad checks is not checkpointed: a resumed run counts afresh.
"""

from __future__ import annotations

import logging

import torch

from seer.config import MonitorConfig
from seer.engine import distributed
from seer.methods.base import Method

log = logging.getLogger("seer")


def rank_threshold(min_rank: float, min_rank_fraction: float, max_rank: float) -> float:
    """The batch RankMe below which a check is bad: ``monitor.min_rank``, or
    ``monitor.min_rank_fraction`` of the batch's maximum rank min(N, D) when that is lower (a
    batch of 16 rows cannot reach a rank of 16)."""
    return min(min_rank, min_rank_fraction * max_rank)


class HealthMonitor:
    def __init__(self, cfg: MonitorConfig):
        self.cfg = cfg
        self.bad_in_a_row = 0
        self.first_bad_step: int | None = None
        self.alarmed = False  # the alarm is on (raised and the features have not recovered since)

    def due(self, step: int) -> bool:
        """Is ``step`` (completed steps) a check?"""
        return self.cfg.every_steps > 0 and step > 0 and step % self.cfg.every_steps == 0

    def arm(self, method: Method, step: int) -> None:
        """Before the forward of step ``step`` (0-based): keep its batch when it completes a check."""
        method.keep_for_health = self.due(step + 1)

    def observe(self, method: Method, step: int, event) -> dict[str, float]:
        """After completed step ``step``: the health scalars (empty when not a check); an alarm
        goes to ``event(message, step)``."""
        if not self.due(step):
            return {}
        values = method.health()
        method.keep_for_health = False
        if not values:
            return {}
        names = list(values)
        numbers = torch.stack([values[n].detach().double().reshape(()) for n in names]).tolist()  # one transfer
        scalars = dict(zip(names, numbers))
        message = self.check(scalars, step, method.collapse_causes)
        if message:
            event(message, step)
        return {f"health/{name}": value for name, value in scalars.items()}

    def bad(self, scalars: dict[str, float]) -> list[str]:
        """Which thresholds this check is under (empty: healthy)."""
        reasons = []
        if "rank" in scalars:
            max_rank = scalars["rank"] / scalars["rank_fraction"]  # min(N, D) of the kept batch
            threshold = rank_threshold(self.cfg.min_rank, self.cfg.min_rank_fraction, max_rank)
            if scalars["rank"] < threshold:
                reasons.append(f"feature effective rank {scalars['rank']:.1f} in a batch of {max_rank:.0f} "
                               f"(alarm below {threshold:.1f})")
        if scalars.get("std_ratio", float("inf")) < self.cfg.min_std_ratio:
            reasons.append(f"std of L2-normalised features {scalars['std_ratio']:.3f} x 1/sqrt(D) "
                           f"(no collapse: about 1; alarm below {self.cfg.min_std_ratio:g})")
        return reasons

    def check(self, scalars: dict[str, float], step: int, causes: str) -> str | None:
        """Count bad checks in a row; the alarm message when they reach ``monitor.patience``."""
        reasons = self.bad(scalars)
        if not reasons:
            self.bad_in_a_row, self.first_bad_step, self.alarmed = 0, None, False
            return None
        self.bad_in_a_row += 1
        self.first_bad_step = step if self.first_bad_step is None else self.first_bad_step
        if self.alarmed or self.bad_in_a_row < self.cfg.patience:
            return None
        self.alarmed = True
        stop = ("Stopping (monitor.stop_on_collapse)." if self.cfg.stop_on_collapse
                else "Set monitor.stop_on_collapse=true to stop such runs.")
        return (f"collapse alarm: the features are collapsing ({'; '.join(reasons)}; {self.bad_in_a_row} checks in a "
                f"row since step {self.first_bad_step}). Usual causes: {causes}. {stop}")

    def should_stop(self, step: int) -> bool:
        """At a check with ``monitor.stop_on_collapse``: True on every rank when any rank's alarm is on."""
        if not (self.cfg.stop_on_collapse and self.due(step)):
            return False
        return distributed.agree_any(self.alarmed)
