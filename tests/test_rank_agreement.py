"""Rank agreement, meta-device construction and batched norms on real gloo ranks.

One 2-rank launch checks everything that needs two ranks (agreement helpers, the guard's
verdict when only one rank sees a non-finite gradient, under FSDP2 and DDP, one collective for
LARS and for per-layer norms, meta init under FSDP2/DDP); a 4-rank launch checks meta init at
world size 4. Initial full weights must be equal at world size 1, 2 and 4.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distributed_utils import run_distributed

REPO = Path(__file__).resolve().parent.parent
SWAV_TINY = [
    "model.backbone=regnety_tiny",
    "augment.crops=[{size: 32, count: 2, scale: [0.14, 1.0]}, {size: 16, count: 2, scale: [0.05, 0.14]}]",
    "method.swav.head_hidden=[32]",
    "method.swav.head_out=16",
    "method.swav.n_prototypes=10",
    "method.swav.freeze_prototypes_steps=0",
    "optim.name=lars",
    "train.batch_size=4",
    "train.device=cpu",
]


def _cfg(*extra: str):
    from seer.config import load_config

    return load_config(REPO / "configs" / "quickstart.yaml", [*SWAV_TINY, *extra])


def _build(cfg, rank: int, world_size: int, seed: int = 7):
    """The method as ``seer pretrain`` builds it: on meta, then ``parallelize``."""
    from seer.engine.distributed import DistInfo
    from seer.engine.parallel import parallelize
    from seer.methods import build_method

    torch.manual_seed(1000 + rank)  # rank-dependent global RNG, as in pretrain: must not matter
    with torch.device("meta"):
        method = build_method(cfg)
    info = DistInfo(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    return parallelize(method, info, cfg.parallel, cfg.train.precision, seed=seed)[0]


def _moco_cfg():
    from seer.config import load_config

    return load_config(REPO / "configs" / "mocov3_vit_cpu.yaml", ["train.device=cpu"])


def _full_state(model) -> dict[str, torch.Tensor]:
    from seer.collectives import full_value
    from seer.engine.parallel import unwrap

    return {k: full_value(v).detach().clone() for k, v in unwrap(model).state_dict().items()}


def _views(cfg, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(cfg.train.batch_size, 3, c.size, c.size, generator=g)
            for c in cfg.augment.crops for _ in range(c.count)]


class _Counter:
    """Counts calls of ``owner.name`` while installed."""

    def __init__(self, owner, name: str):
        self.owner, self.name, self.calls = owner, name, 0
        self.original = getattr(owner, name)

    def __enter__(self):
        def counted(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        setattr(self.owner, self.name, counted)
        return self

    def __exit__(self, *exc):
        setattr(self.owner, self.name, self.original)


# --------------------------------------------------------------------------------------------- 2 ranks


def _one_rank_fault_run(rank: int, strategy: str) -> dict:
    """Three train_steps; rank 1 alone gets a NaN in its local gradients at steps 1 and 2."""
    from seer.config import GuardConfig
    from seer.collectives import local_part
    from seer.engine.guard import StabilityGuard
    from seer.engine.optim import build_optimizer
    from seer.engine.parallel import Precision, unwrap
    from seer.engine.train import train_step

    cfg = _cfg(f"parallel.strategy={strategy}")
    model = _build(cfg, rank, 2)
    method = unwrap(model)
    optimizer = build_optimizer(method, cfg.optim, cfg.train.batch_size * 2)
    guard = StabilityGuard(GuardConfig(max_bad_steps=2))
    precision = Precision.for_model(model, "fp32", torch.device("cpu"))
    poisoned = next(p for p in method.parameters() if local_part(p).numel() > 0)
    original = method.on_after_backward
    actions, unchanged_on_skip = [], None
    for step in range(3):
        def poison(step_now, _original=original):
            _original(step_now)
            if rank == 1 and step_now >= 1:  # after the gradient reduction: this rank only
                local_part(poisoned.grad).view(-1)[0] = float("nan")

        method.on_after_backward = poison
        # (SwAV's forward re-normalises the prototypes in place: not an update)
        kept = [p for n, p in method.named_parameters() if "prototypes" not in n]
        before = [local_part(p).detach().clone() for p in kept]
        verdict, loss, norm = train_step(model, optimizer, precision, guard, _views(cfg, 10 * step + rank), step)
        actions.append(verdict.action)
        if step == 1:
            unchanged_on_skip = all(torch.equal(b, local_part(p)) for b, p in zip(before, kept))
    return {"actions": actions, "unchanged_on_skip": unchanged_on_skip}


def _two_rank_worker(rank: int, world_size: int, checkpoint_dirs: list[str]) -> dict:
    import torch.distributed as dist
    from seer.collectives import DTensor, all_reduce_sum

    from seer.engine import distributed
    from seer.engine.checkpoint import latest_checkpoint
    from seer.engine.guard import StabilityGuard
    from seer.engine.parallel import unwrap

    out: dict = {}
    # agreement helpers
    out["agree_any"] = [distributed.agree_any(rank == 1), distributed.agree_any(False)]
    out["sum"] = float(all_reduce_sum(torch.tensor(float(rank + 1))))  # data_skipped's reduction
    # each rank "sees" a different checkpoint folder (a network file system out of date): one decides
    seen = distributed.decide_on_main(lambda: latest_checkpoint(Path(checkpoint_dirs[rank])))
    out["latest"] = seen.name
    try:
        distributed.decide_on_main(lambda: latest_checkpoint(Path(checkpoint_dirs[2])))
    except FileNotFoundError as err:  # raised on rank 0, re-raised on every rank
        out["error"] = str(err)
    # the guard's verdict when one rank alone sees a non-finite gradient
    for strategy in ("fsdp", "ddp"):
        out[f"fault_{strategy}"] = _one_rank_fault_run(rank, strategy)
    # meta init: full weights, FSDP2 with activation checkpointing and DDP
    cfg = _cfg("parallel.activation_checkpointing=true")
    model = _build(cfg, rank, world_size)
    out["meta_fsdp_local_fraction"] = sum(p.to_local().numel() for p in model.parameters()) / sum(
        p.numel() for p in model.parameters())
    out["meta_fsdp"] = _full_state(model)
    out["meta_ddp"] = _full_state(_build(_cfg("parallel.strategy=ddp"), rank, world_size))
    out["meta_mocov3"] = _full_state(_build(_moco_cfg(), rank, world_size))
    # one collective for LARS's norms and one for the per-layer gradient norms
    from seer.engine.optim import build_optimizer

    optimizer = build_optimizer(unwrap(model), cfg.optim, 8)
    model(_views(cfg, rank))["loss"].backward()
    adapted_groups = sum(1 for g in optimizer.param_groups if not g["lars_exclude"])
    with _Counter(dist, "all_reduce") as reduces, _Counter(DTensor, "full_tensor") as gathers:
        optimizer.step()
    out["lars_collectives"] = (reduces.calls, gathers.calls, adapted_groups, len(list(model.parameters())))
    with _Counter(dist, "all_reduce") as reduces, _Counter(DTensor, "full_tensor") as gathers:
        out["grad_norms"] = StabilityGuard(cfg.guard).grad_norms(unwrap(model))
    out["grad_norm_collectives"] = (reduces.calls, gathers.calls)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    import torch.distributed.checkpoint as dcp

    from data_pipeline.storage import atomic_write_bytes

    base = tmp_path_factory.mktemp("views")
    dirs = []
    for name, latest in (("rank0_view", "step_00000004"), ("rank1_view", "step_00000002"), ("broken", "step_9")):
        folder = base / name
        for step in ("step_00000002", "step_00000004"):
            (folder / step).mkdir(parents=True)
            if name == "broken" or (name == "rank1_view" and step == "step_00000004"):
                continue  # an empty folder: not a complete checkpoint
            dcp.save({"x": torch.zeros(1)}, checkpoint_id=str(folder / step), no_dist=True)  # a tiny complete one
            torch.save({"step": int(step[5:])}, folder / step / "extra_rank0.pt")
        atomic_write_bytes(folder / "latest", latest.encode())
        dirs.append(str(folder))
    return run_distributed(_two_rank_worker, 2, dirs, timeout=300)


@pytest.mark.slow
def test_agreement_helpers(two_ranks):
    for result in two_ranks:
        assert result["agree_any"] == [True, False]
        assert result["sum"] == 3.0
        assert result["latest"] == "step_00000004"  # rank 0's view, also on rank 1
        assert "not a complete checkpoint" in result["error"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_non_finite_gradient_on_one_rank_every_rank_skips(two_ranks, strategy):
    rank0, rank1 = (r[f"fault_{strategy}"] for r in two_ranks)
    assert rank0["actions"] == rank1["actions"] == ["step", "skip", "rollback"]
    assert rank0["unchanged_on_skip"] and rank1["unchanged_on_skip"]


@pytest.mark.slow
def test_lars_and_layer_norms_use_one_collective(two_ranks):
    for result in two_ranks:
        reduces, gathers, adapted_groups, n_params = result["lars_collectives"]
        assert n_params > 20
        assert (reduces, gathers) == (adapted_groups, 0) == (1, 0)
        assert result["grad_norm_collectives"] == (1, 0)
    a, b = (r["grad_norms"] for r in two_ranks)
    assert a == b and a["total"] > 0 and math.isfinite(a["total"])


def _four_rank_worker(rank: int, world_size: int) -> dict:
    return _full_state(_build(_cfg(), rank, world_size))


@pytest.mark.slow
def test_meta_init_full_weights_equal_at_world_size_1_2_4(two_ranks):
    one = _full_state(_build(_cfg(), 0, 1))
    assert not any(v.is_meta for v in one.values())
    four = run_distributed(_four_rank_worker, 4, timeout=300)[0]
    assert two_ranks[0]["meta_fsdp_local_fraction"] < 0.6  # each rank holds about half
    for other in (two_ranks[0]["meta_fsdp"], two_ranks[1]["meta_fsdp"], two_ranks[0]["meta_ddp"], four):
        assert set(other) == set(one)
        for key, value in one.items():
            assert torch.equal(other[key], value), key
    conv = one["backbone.stem.0.weight"]
    assert conv.std() > 0 and torch.isfinite(conv).all()
    # MoCo v3 on a ViT: the same at 1 and 2 ranks, and the key encoder starts as the query encoder
    moco_one, moco_two = _full_state(_build(_moco_cfg(), 0, 1)), two_ranks[1]["meta_mocov3"]
    assert set(moco_one) == set(moco_two) and all(torch.equal(v, moco_two[k]) for k, v in moco_one.items())
    copies = [k for k in moco_one if k.startswith("momentum_")]
    assert len(copies) > 10
    assert all(torch.equal(moco_one[k], moco_one[k.replace("momentum_", "", 1)]) for k in copies)
    assert moco_one["backbone.cls_token"].abs().max() > 0
    # a different seed gives different weights
    assert not torch.equal(_full_state(_build(_cfg(), 0, 1, seed=8))["backbone.stem.0.weight"], conv)
