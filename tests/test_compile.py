"""``train.compile=blocks``: per-block ``torch.compile`` (inductor, on the CPU here) trains the same
as eager, a block dynamo refuses runs eagerly after one warning naming it, and a compiled run
killed with SIGKILL and resumed ends bitwise equal to an uninterrupted one.

Compiling costs minutes of CPU on a cold cache, so every compiled test uses the same tiny SwAV
with the same shapes, strides and settings (``COMPILED``): inductor's on-disk cache then compiles
once for all of them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import REPO, sigkill_after_checkpoint, tiny_overrides
from seer.config import ConfigError, load_config
from seer.engine.compiling import compiled_forward_of
from seer.engine.parallel import compile_blocks

QUICKSTART = REPO / "configs" / "quickstart.yaml"
# one crop size: one backbone call per step, fewer graphs to compile; a small LR: the loss moves
# (4.88 -> 4.36 in 10 steps) without amplifying float rounding chaotically (a 4-sample BatchNorm is
# ill-conditioned: eager and compiled gradients differ by ~1e-4 relative in some layers)
COMPILED = {"augment.crops": "[{size: 32, count: 2, scale: [0.14, 1.0]}]", "optim.lr": 0.003,
            "train.deterministic": True, "train.compile": "blocks"}


def _losses(cfg, mode: str, steps: int) -> list[float]:
    from seer.engine.distributed import DistInfo
    from seer.engine.guard import StabilityGuard
    from seer.engine.optim import build_optimizer, build_schedule, set_lr
    from seer.engine.parallel import parallelize, resolve_memory_format, unwrap
    from seer.engine.train import train_step
    from seer.methods import build_method

    with torch.device("meta"):
        method = build_method(cfg)
    layout = resolve_memory_format(cfg.train.memory_format, method.backbone, torch.device("cpu"))
    model, precision = parallelize(method, DistInfo(0, 1, 0, torch.device("cpu")), cfg.parallel, "fp32", seed=0,
                                   compile_mode=mode, memory_format=layout)
    optimizer = build_optimizer(unwrap(model), cfg.optim, cfg.train.batch_size)
    schedule = build_schedule(cfg.schedule, cfg.optim, cfg.train.batch_size, steps)
    guard = StabilityGuard(cfg.guard)
    losses = []
    for step in range(steps):
        set_lr(optimizer, schedule.lr(step))
        g = torch.Generator().manual_seed(step)
        views = [torch.randn(cfg.train.batch_size, 3, 32, 32, generator=g).contiguous(memory_format=layout)
                 for _ in range(2)]
        verdict, loss, _ = train_step(model, optimizer, precision, guard, views, step)
        assert verdict.action == "step"
        losses.append(loss)
    if mode == "blocks":
        compiled = [compiled_forward_of(m) for m in unwrap(model).modules() if compiled_forward_of(m)]
        assert len(compiled) >= 5 and not any(c.failed for c in compiled), [c.failed for c in compiled]
    return losses


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_for_ten_fp32_steps(tmp_path):
    cfg = load_config(QUICKSTART, tiny_overrides("unused", tmp_path, **COMPILED))
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # as the resume test's runs: the same compiled graphs
    try:
        eager, compiled = _losses(cfg, "off", 10), _losses(cfg, "blocks", 10)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert eager[-1] < eager[0] - 0.3  # it trains
    assert compiled == pytest.approx(eager, rel=1e-4)


class Refuses(nn.Module):
    """A block dynamo cannot capture as one graph (an explicit graph break)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return self.linear(x).relu()


class Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Refuses(), Refuses()])

    def blocks(self) -> list[nn.Module]:
        return list(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


class Method(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = Trunk()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def test_a_block_that_cannot_compile_runs_eagerly_after_one_warning(caplog):
    torch.manual_seed(0)
    model = Method()
    reference = Method()
    reference.load_state_dict(model.state_dict())
    assert compile_blocks(model, "blocks") == 2
    x = torch.randn(3, 4)
    with caplog.at_level(logging.WARNING, logger="seer.engine.compiling"):
        for _ in range(3):
            out = model(x)
            out.sum().backward()
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 2  # one per block, not one per call
    assert "backbone.layers.0" in warnings[0] and "backbone.layers.1" in warnings[1]
    assert all(compiled_forward_of(b).failed for b in model.backbone.layers)
    torch.testing.assert_close(out, reference(x), rtol=0, atol=0)  # eager: the same numbers
    assert model.backbone.layers[0].linear.weight.grad is not None
    assert list(model.state_dict()) == list(reference.state_dict())  # keys unchanged


def test_compile_and_memory_format_settings_are_validated():
    assert load_config(QUICKSTART, ["train.compile=blocks", "train.memory_format=channels_last"]).train.compile == "blocks"
    for bad in ("train.compile=yes", "train.memory_format=nhwc"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(QUICKSTART, [bad])
    for preset in ("seer_regnety256gf_swav", "mocov3_vit_b16", "mocov3_vit_s16"):  # GPU presets compile blocks
        assert load_config(REPO / "configs" / f"{preset}.yaml").train.compile == "blocks"


@pytest.mark.slow
def test_compiled_run_killed_and_resumed_is_bitwise_equal(tmp_path, shard_dir):
    from seer.engine.checkpoint import load_model_weights, resolve_checkpoint
    from seer.methods import build_method

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # SEER_TEST_DEVICE=cuda runs it on a GPU (issue 18's deterministic CUDA resume check)
    common = {**COMPILED, "train.max_steps": 6, "checkpoint.every_steps": 2,
              "train.device": os.environ.get("SEER_TEST_DEVICE", "cpu")}

    def command(run_dir):
        return [sys.executable, "-m", "seer", "pretrain", str(QUICKSTART), *tiny_overrides(shard_dir, run_dir, **common)]

    straight = subprocess.run(command(tmp_path / "straight"), capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "torch.compile failed" not in straight.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    sigkill_after_checkpoint(proc, killed, 2, timeout=900)
    assert (killed / "checkpoints" / "latest").read_text().strip() < "step_00000006"
    resumed = subprocess.run(command(killed), capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]

    cfg = load_config(QUICKSTART, tiny_overrides(shard_dir, killed, **common))
    states = []
    for run in (tmp_path / "straight", killed):
        model = build_method(cfg)
        load_model_weights(resolve_checkpoint(run), model)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
