"""The training monitor: health numbers of a batch (seer.eval.health), the methods' kept
embeddings, the collapse alarm (seer.engine.monitor), and the loop's use of them end to end:
health numbers at the interval only, the alarm in metrics.jsonl, `seer status` and the plot,
and monitor.stop_on_collapse stopping with a checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from cluster.local import torchrun_command
from conftest import REPO, tiny_overrides
from seer.config import MonitorConfig
from seer.engine.monitor import HealthMonitor
from seer.eval.health import embedding_health, pair_similarity, prototype_usage
from seer.methods.base import Method
from seer.methods.mocov3 import MoCoV3
from seer.methods.swav import SwAV
from seer.models import create


def healthy_batch(n=128, d=64, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def dimensionally_collapsed(n=128, d=64, seed=0):
    """Every sample in a 2-d subspace (plus faint noise): the variance sits in two directions."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g) @ torch.randn(2, d, generator=g) + 1e-3 * torch.randn(n, d, generator=g)


def completely_collapsed(n=128, d=64, seed=0):
    """Every sample at (nearly) the same point."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, d, generator=g) + 1e-3 * torch.randn(n, d, generator=g)


def test_health_numbers_of_healthy_and_collapsed_batches():
    healthy = {k: float(v) for k, v in embedding_health(healthy_batch()).items()}
    assert healthy["rank"] > 45 and healthy["rank_fraction"] > 0.7 and 0.95 < healthy["std_ratio"] < 1.05
    low = {k: float(v) for k, v in embedding_health(dimensionally_collapsed()).items()}
    assert low["rank"] < 2.5 and low["rank_fraction"] < 0.04
    point = {k: float(v) for k, v in embedding_health(completely_collapsed()).items()}
    assert point["std_ratio"] < 0.01  # its centred rank is the noise's: only the std shows it
    # SwAV codes: 128 samples spread over 32 prototypes vs all on one
    spread = prototype_usage(torch.eye(32).repeat(4, 1))
    assert float(spread["prototypes_used"]) == 32 and float(spread["code_entropy"]) == pytest.approx(3.4657, abs=1e-3)
    one = prototype_usage(torch.zeros(128, 32).index_fill_(1, torch.tensor([5]), 1.0))
    assert float(one["prototypes_used"]) == 1 and float(one["code_entropy"]) == 0.0
    keys = healthy_batch(64, 32, seed=1)
    pairs = pair_similarity(keys + 0.1 * healthy_batch(64, 32, seed=2), keys)
    assert float(pairs["positive_similarity"]) > 0.95 and abs(float(pairs["negative_similarity"])) < 0.05
    point = completely_collapsed(64, 32)
    same = pair_similarity(point, point.flip(0))  # every query and key at one point: no contrast left
    assert float(same["negative_similarity"]) > 0.99


class FedMethod(Method):
    """A method whose forward 'computes' the features it is given."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Identity()
        self.next_features = healthy_batch()
        self.forwards = 0

    def forward(self, views):
        self.forwards += 1
        self.keep(features=self.next_features)
        return {}


def run_monitor(monitor, method, batches, start=0):
    """The loop's calls for each step: arm, forward, observe; returns (logged steps, alarms)."""
    logged, alarms = [], []
    for step, features in enumerate(batches, start=start):
        monitor.arm(method, step)
        method.next_features = features
        method([])
        scalars = monitor.observe(method, step + 1, lambda message, at: alarms.append((at, message)))
        if scalars:
            logged.append(step + 1)
    return logged, alarms


def test_alarm_after_patience_bad_checks_once_and_not_on_healthy():
    cfg = MonitorConfig(every_steps=5)  # the default thresholds: rank 12 (a quarter of D = 64 is 16: higher), std 0.1, 3 checks
    method = FedMethod()
    healthy = [healthy_batch(seed=s) for s in range(40)]
    logged, alarms = run_monitor(HealthMonitor(cfg), method, healthy)
    assert logged == [5, 10, 15, 20, 25, 30, 35, 40] and alarms == []  # at the interval only, quiet
    monitor = HealthMonitor(cfg)
    collapsing = healthy[:12] + [dimensionally_collapsed(seed=s) for s in range(28)]  # bad from step 13
    logged, alarms = run_monitor(monitor, method, collapsing)
    assert [at for at, _ in alarms] == [25]  # checks 15, 20, 25 bad: raised at the third, not repeated
    message = alarms[0][1]
    assert "collapse alarm" in message and "in a batch of 64 (alarm below 12.0)" in message and "since step 15" in message
    assert "LR too high" in message
    # a complete collapse (one point) is caught by the std of the normalised features
    _, alarms = run_monitor(HealthMonitor(cfg), method, [completely_collapsed(seed=s) for s in range(15)])
    assert [at for at, _ in alarms] == [15] and "std of L2-normalised" in alarms[0][1]
    # recovery resets; a new collapse raises it again
    _, alarms = run_monitor(monitor, method, healthy[:5] + [dimensionally_collapsed()] * 15, start=40)
    assert [at for at, _ in alarms] == [60]


def test_nothing_kept_or_computed_between_checks():
    monitor = HealthMonitor(MonitorConfig(every_steps=4))
    method = FedMethod()
    monitor.arm(method, 0)  # step 1 is not a check
    method([])
    assert not method.keep_for_health and method.health() == {} and monitor.observe(method, 1, None) == {}
    assert not HealthMonitor(MonitorConfig(every_steps=0)).due(10)


def test_methods_keep_their_batch_only_when_flagged():
    torch.manual_seed(0)  # the models' init: the same whatever ran before
    g = torch.Generator().manual_seed(0)
    swav = SwAV(create("regnety_tiny"), head_hidden=[32], head_out=16, head_bn=True, n_prototypes=20,
                epsilon=0.03, sinkhorn_iterations=10)
    views = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)] + [torch.randn(8, 3, 16, 16, generator=g)]
    swav(views)
    assert swav.health() == {}
    swav.keep_for_health = True
    swav(views)
    health = {k: float(v) for k, v in swav.health().items()}
    assert set(health) == {"rank", "rank_fraction", "std_ratio", "head_rank", "head_rank_fraction", "head_std_ratio",
                           "swav_prototypes_used", "swav_code_entropy"}
    assert 1 <= health["swav_prototypes_used"] <= 16 and health["rank"] <= 16  # the two 32 px views of 8 images
    assert swav.health() == {}  # read once
    moco = MoCoV3(create("regnety_tiny"), total_steps=10, projector_hidden=32, predictor_hidden=32, out_dim=16)
    moco.keep_for_health = True
    moco(views[:2])
    health = {k: float(v) for k, v in moco.health().items()}
    # cosines (the predictor is random at init, so which is larger is not fixed yet)
    assert all(-1 <= health[f"mocov3_{k}_similarity"] <= 1 for k in ("positive", "negative"))
    assert health["head_rank"] <= 16


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_pretrain_logs_health_at_the_interval_and_stops_on_collapse_with_a_checkpoint(tmp_path, shard_dir):
    """One tiny run on 2 gloo ranks: health numbers every 2 steps only, in metrics.jsonl and
    TensorBoard; a threshold every batch is under (rank fraction < 1) makes the alarm certain at
    the 2nd check, and monitor.stop_on_collapse stops both ranks there with a checkpoint of both;
    `seer status` and the plot show it."""
    run = tmp_path / "run"
    extra = {"monitor.every_steps": 2, "monitor.min_rank_fraction": 1.0, "monitor.patience": 2,
             "monitor.stop_on_collapse": "true", "train.max_steps": 20, "checkpoint.every_steps": 100}
    cmd = torchrun_command(2, str(REPO / "configs" / "quickstart.yaml"), tiny_overrides(shard_dir, run, **extra))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "collapse alarm: stopped at step 4 with a checkpoint" in proc.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (run / "checkpoints" / "step_00000004" / "extra_rank1.pt").is_file()  # rank 1 stopped there too
    rows = [r for r in records(run) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["step"] for r in rows if "health/rank" in r] == [2, 4]
    health = rows[1]  # rank 0's batch: 2 views of 4 images
    assert 1.0 <= health["health/rank"] < 8.0 and health["health/rank_fraction"] == pytest.approx(health["health/rank"] / 8)
    assert 0 < health["health/std_ratio"] and 1 <= health["health/swav_prototypes_used"] <= 8
    alarms = [r for r in records(run) if "collapse alarm" in str(r.get("event"))]
    assert [r["step"] for r in alarms] == [4] and "Usual causes" in alarms[0]["event"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("health/rank")] == [2, 4]
    assert (run / "run.png").stat().st_size > 10_000
    from cluster.status import format_health, last_health

    status = last_health(run)
    assert status["collapse_alarm"]["step"] == 4 and status["health"]["step"] == 4
    assert "COLLAPSE ALARM at step 4" in format_health(status)
