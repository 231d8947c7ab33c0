"""seer.engine.syncbn: GroupSyncBatchNorm equals BatchNorm over each group's concatenated
batch (forward, input/weight/bias gradients, running stats) on 4 gloo ranks in groups of 2."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distributed_utils import run_distributed
from seer.engine.syncbn import GroupSyncBatchNorm, convert_group_sync_batchnorm, syncbn_process_group

WORLD, GROUP = 4, 2
CHANNELS = 3
# case -> (per-sample shape after the channel dim, momentum, input dtype)
CASES = {
    "2d": ((5, 4), 0.3, torch.float64),
    "2d_cumulative": ((4, 4), None, torch.float64),
    "1d": ((), 0.1, torch.float64),
    "1d_seq": ((6,), 0.1, torch.float64),
    "2d_bf16_offset": ((4, 4), 0.1, torch.bfloat16),
}
ITERATIONS = 2


def _batch(case: str, iteration: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and upstream gradient of `rank` (batch 2 or 3: unequal within a group)."""
    spatial, _, dtype = CASES[case]
    generator = torch.Generator().manual_seed(1000 * iteration + 10 * rank + len(case))
    shape = (2 + rank % 2, CHANNELS, *spatial)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 0.5
    if dtype == torch.bfloat16:
        x = x + 100.0  # a large mean: naive sum-of-squares statistics in bf16 would be useless
    upstream = torch.randn(shape, generator=generator, dtype=torch.float64)
    return x.to(dtype), upstream.to(dtype).double()  # the gradient reaching y has y's dtype


def _affine() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return (torch.rand(CHANNELS, generator=generator, dtype=torch.float64) + 0.5,
            torch.randn(CHANNELS, generator=generator, dtype=torch.float64))


def _syncbn_worker(rank: int, world_size: int) -> dict:
    with pytest.raises(ValueError, match="world size 4 .* group size 3"):
        syncbn_process_group(3)
    assert syncbn_process_group(0) is None and syncbn_process_group(4) is None
    group = syncbn_process_group(GROUP)
    members = torch.tensor([float(rank)])
    dist.all_reduce(members, group=group)
    out = {"group_rank_sum": members.item()}
    original = GroupSyncBatchNorm(CHANNELS, process_group=group)
    clone = copy.deepcopy(original)  # e.g. MoCo's momentum encoder: shares the group, not the weights
    out["deepcopy_shares_group_only"] = clone.process_group is group and clone.weight is not original.weight
    weight, bias = _affine()
    for case, (_, momentum, dtype) in CASES.items():
        bn = GroupSyncBatchNorm(CHANNELS, momentum=momentum, process_group=group)
        bn = bn.float() if dtype == torch.bfloat16 else bn.double()
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
        records = []
        for iteration in range(ITERATIONS):
            x, upstream = _batch(case, iteration, rank)
            x.requires_grad_(True)
            y = bn(x)
            (y.double() * upstream).sum().backward()
            records.append({"y": y.detach().clone(), "x_grad": x.grad.clone(),
                            "w_grad": bn.weight.grad.clone(), "b_grad": bn.bias.grad.clone()})
            bn.zero_grad()
        out[case] = {"steps": records, "state": {k: v.clone() for k, v in bn.state_dict().items()}}
    return out


def _reference(case: str, ranks: list[int]) -> dict:
    spatial, momentum, dtype = CASES[case]
    bn = (nn.BatchNorm2d if len(spatial) == 2 else nn.BatchNorm1d)(CHANNELS, momentum=momentum).double()
    weight, bias = _affine()
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    steps = []
    for iteration in range(ITERATIONS):
        batches = [_batch(case, iteration, r) for r in ranks]
        x = torch.cat([b[0].double() for b in batches]).requires_grad_(True)  # bf16 values, exactly
        upstream = torch.cat([b[1] for b in batches])
        y = bn(x)
        (y * upstream).sum().backward()
        steps.append({"y": y.detach().split([b[0].shape[0] for b in batches]),
                      "x_grad": x.grad.split([b[0].shape[0] for b in batches]),
                      "w_grad": bn.weight.grad.clone(), "b_grad": bn.bias.grad.clone()})
        bn.zero_grad()
    return {"steps": steps, "state": bn.state_dict()}


@pytest.fixture(scope="module")
def distributed_results() -> list[dict]:
    return run_distributed(_syncbn_worker, WORLD)


@pytest.mark.slow
def test_process_groups_are_consecutive_ranks(distributed_results):
    assert [r["group_rank_sum"] for r in distributed_results] == [1.0, 1.0, 5.0, 5.0]
    assert all(r["deepcopy_shares_group_only"] for r in distributed_results)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_group_sync_batchnorm_equals_batchnorm_on_group_batch(distributed_results, case):
    low_precision = CASES[case][2] == torch.bfloat16
    out_tol = dict(rtol=0, atol=3e-2) if low_precision else dict(rtol=0, atol=1e-5)
    stat_tol = dict(rtol=1e-5, atol=1e-5)
    for first in range(0, WORLD, GROUP):
        ranks = list(range(first, first + GROUP))
        reference = _reference(case, ranks)
        for iteration, ref in enumerate(reference["steps"]):
            got = [distributed_results[r][case]["steps"][iteration] for r in ranks]
            for index, step in enumerate(got):
                assert step["y"].dtype == CASES[case][2]
                torch.testing.assert_close(step["y"].double(), ref["y"][index], **out_tol)
                torch.testing.assert_close(step["x_grad"].double(), ref["x_grad"][index], **out_tol)
            # parameter gradients are local: the data-parallel reduction sums them over ranks
            torch.testing.assert_close(sum(s["w_grad"].double() for s in got), ref["w_grad"], **stat_tol)
            torch.testing.assert_close(sum(s["b_grad"].double() for s in got), ref["b_grad"], **stat_tol)
        for r in ranks:
            state = distributed_results[r][case]["state"]
            assert set(state) == set(reference["state"])
            for key, value in reference["state"].items():
                torch.testing.assert_close(state[key].to(value.dtype), value, **stat_tol)


def test_single_process_is_plain_batchnorm_in_train_and_eval():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4)
    synced = GroupSyncBatchNorm(4)
    synced.load_state_dict(plain.state_dict())
    x = torch.randn(3, 4, 5, 5)
    for mode in ("train", "eval"):
        plain.train(mode == "train")
        synced.train(mode == "train")
        torch.testing.assert_close(synced(x), plain(x))
    torch.testing.assert_close(synced.running_var, plain.running_var)
    with pytest.raises(ValueError, match="5-D"):
        synced(torch.randn(2, 4, 3, 3, 3))
    with pytest.raises(ValueError, match="channels"):
        synced(torch.randn(2, 3, 5, 5))


def test_convert_replaces_batchnorms_and_keeps_state():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 6), nn.BatchNorm1d(6)),
        nn.LayerNorm(6),
    )
    model[1].weight.requires_grad_(False)
    model(torch.randn(4, 3, 8, 8))  # moves running stats away from their defaults
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_group_sync_batchnorm(model, process_group=None)
    assert isinstance(converted[1], GroupSyncBatchNorm) and isinstance(converted[2][2], GroupSyncBatchNorm)
    assert isinstance(converted[3], nn.LayerNorm)
    assert not converted[1].training and converted[1].weight.requires_grad is False
    after = converted.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    root = convert_group_sync_batchnorm(nn.BatchNorm1d(5))
    assert isinstance(root, GroupSyncBatchNorm) and root.num_features == 5


def _failing_worker(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom from rank 1")


@pytest.mark.slow
def test_run_distributed_propagates_worker_failure():
    with pytest.raises(Exception, match="boom from rank 1"):
        run_distributed(_failing_worker, 2)


def _train_regnet(checkpointing: str, syncbn: bool, steps: int = 3) -> dict:
    """A few SGD steps of regnety_tiny; ``checkpointing``: "off", "engine" (parallel's
    checkpoint_blocks) or "naive" (torch's wrapper without the engine's BatchNorm context)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from seer.engine.parallel import checkpoint_blocks, stages_of
    from seer.models import create

    torch.manual_seed(0)
    model = create("regnety_tiny")
    if syncbn:
        model = convert_group_sync_batchnorm(model)
    if checkpointing == "engine":
        assert checkpoint_blocks(model, None) == 4
    elif checkpointing == "naive":
        blocks = {id(b) for stage in stages_of(model) for b in stage}
        apply_activation_checkpointing(model, check_fn=lambda m: id(m) in blocks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 32, 32, generator=g)).square().mean().backward()
        optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("syncbn", [False, True], ids=["batchnorm", "group_syncbn"])
def test_checkpointing_updates_running_stats_once_per_forward(syncbn):
    off, on = _train_regnet("off", syncbn), _train_regnet("engine", syncbn)
    assert on.keys() == off.keys()
    stats = [k for k in off if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(stats) > 20
    for key, value in off.items():
        torch.testing.assert_close(on[key], value, rtol=1e-6, atol=1e-7, msg=key)
    assert all(int(v) == 3 for k, v in on.items() if k.endswith("num_batches_tracked"))
    # the control: checkpointing without the engine's context counts every batch twice
    naive = _train_regnet("naive", syncbn)
    assert all(int(naive[k]) == 6 for k in stats if k.endswith("num_batches_tracked") and "trunk" in k)
    assert not torch.allclose(naive[stats[-2]], off[stats[-2]])


@pytest.mark.parametrize("cls", [nn.BatchNorm2d, GroupSyncBatchNorm])
def test_batchnorm_with_low_precision_weights_computes_with_fp32_weights(cls):
    """What FSDP2 mixed precision hands BatchNorm now that it shares its block's unit: bf16 weights
    beside fp32 statistics. The op gets the weights as fp32 (plain torch refuses the mix), the
    statistics update in fp32, and the result is BatchNorm with those (bf16-rounded) weights."""
    from seer.engine.syncbn import keep_batchnorm_params_fp32

    torch.manual_seed(0)
    bn = cls(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    reference = nn.BatchNorm2d(6)
    reference.load_state_dict(bn.state_dict())
    assert keep_batchnorm_params_fp32(bn) == (1 if cls is nn.BatchNorm2d else 0)
    assert isinstance(bn, nn.BatchNorm2d if cls is nn.BatchNorm2d else GroupSyncBatchNorm)
    assert list(bn.state_dict()) == list(reference.state_dict())
    x = torch.randn(4, 6, 5, 5).bfloat16()
    with torch.no_grad():  # as FSDP2 gathers them: the compute-dtype copy in the module's parameters
        reference.weight.copy_(bn.weight.bfloat16().float())
        reference.bias.copy_(bn.bias.bfloat16().float())
    bn.weight.data, bn.bias.data = bn.weight.data.bfloat16(), bn.bias.data.bfloat16()
    out = bn(x)
    expected = reference(x.float())
    assert out.dtype == torch.bfloat16 and bn.running_mean.dtype == bn.running_var.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)  # bf16 output
    torch.testing.assert_close(bn.running_mean, reference.running_mean, rtol=1e-2, atol=1e-3)
    with pytest.raises(RuntimeError):  # what torch does without it
        nn.functional.batch_norm(x, reference.running_mean, reference.running_var, bn.weight, bn.bias, True)
