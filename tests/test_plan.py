"""`seer plan`: the numbers measured on fake (meta-storage) tensors equal those of real tensors,
checkpointing and sharding change them as the real machinery does, and the CLI prints/JSON."""

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO
from seer.config import load_config
from seer.engine.parallel import checkpoint_blocks
from seer.methods import build_method
from seer.plan import compute_plan, format_plan
from seer.plan_measure import fsdp_units, measure_method, profile_forward

TINY = [
    "model.backbone=regnety_tiny",
    "augment.crops=[{size: 32, count: 2, scale: [0.14, 1.0]}, {size: 16, count: 2, scale: [0.05, 0.14]}]",
    "method.swav.head_hidden=[32]",
    "method.swav.head_out=16",
    "method.swav.n_prototypes=10",
    "train.batch_size=4",
]
SEER_OVERRIDES = [  # the SEER recipe as overrides, for when the preset is not there
    "model.backbone=regnety_256gf", "method.swav.head_hidden=[8192,8192]", "method.swav.head_out=256",
    "method.swav.head_bn=false", "method.swav.n_prototypes=16000", "train.batch_size=16", "train.precision=fp16",
    "optim.name=lars", "parallel.activation_checkpointing=true",
    "augment.crops=[{size: 224, count: 2, scale: [0.14, 1.0]}, {size: 96, count: 4, scale: [0.05, 0.14]}]",
]


def tiny_cfg(*extra):
    return load_config(REPO / "configs" / "quickstart.yaml", [*TINY, *extra])


def real_views(cfg):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(cfg.train.batch_size, 3, c.size, c.size, generator=g) for c in cfg.augment.crops
            for _ in range(c.count)]


def test_parameter_count_is_that_of_the_real_model():
    cfg = tiny_cfg()
    plan = compute_plan(cfg, 1)
    real = build_method(cfg)
    assert plan["parameters"]["total"] == sum(p.numel() for p in real.parameters()) > 10_000
    assert plan["model_state"][0]["bytes"] == 4 * plan["parameters"]["total"]


def test_fake_forward_measures_what_real_tensors_measure():
    cfg = tiny_cfg()
    _, fake = measure_method(cfg, torch.float32)
    _, real = measure_method(cfg, torch.float32, real=True)
    assert fake.saved_bytes == real.saved_bytes > 100_000
    assert sorted(fake.storage_bytes.values()) == sorted(real.storage_bytes.values())
    assert [(c["block"], c["input_bytes"], c["flops"]) for c in fake.calls] == [
        (c["block"], c["input_bytes"], c["flops"]) for c in real.calls]
    everything = set(range(len(fake.calls)))
    assert fake.checkpointed(everything) == real.checkpointed(everything)
    # FLOPs: FlopCounterMode on a plain real forward, no hooks of ours
    torch.manual_seed(0)
    method = build_method(cfg)
    with FlopCounterMode(display=False) as counter:
        method(real_views(cfg))
    assert fake.flops == counter.get_total_flops() > 1_000_000


def test_checkpointing_keeps_what_real_checkpointing_keeps():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    method = build_method(cfg)
    blocks = fsdp_units(method)[0]
    plain = profile_forward(method, blocks, lambda: method(real_views(cfg)))
    estimate = plain.checkpointed(set(range(len(blocks))))
    checkpoint_blocks(method, None)  # the wrapper seer's training uses
    wrapped = profile_forward(method, [], lambda: method(real_views(cfg)))
    # outside the checkpointed blocks autograd now saves exactly what the estimate keeps
    assert wrapped.saved_bytes == estimate["kept_outside_checkpointed_blocks"] + estimate["checkpointed_block_inputs"]
    plan = compute_plan(cfg, 1)
    act = plan["activations"]
    assert act["checkpointing"]["total"] < act["saved_bytes"]
    assert plan["total_bytes"]["checkpointing"] < plan["total_bytes"]["no_checkpointing"]
    assert plan["flops"]["step_checkpointed"] > plan["flops"]["step"] == 3 * plan["flops"]["forward"]


def test_fp16_halves_activations_not_the_fp32_master_state():
    fp32, fp16 = compute_plan(tiny_cfg(), 4), compute_plan(tiny_cfg("train.precision=fp16"), 4)
    ratio = fp16["activations"]["compute_to_fp32_ratio"]
    assert 0.5 <= ratio < 0.55  # BN keeps fp32 mean/invstd
    assert fp16["activations"]["saved_bytes_fp32"] == fp32["activations"]["saved_bytes"]
    state = lambda plan: {line["key"]: line["bytes"] for line in plan["model_state"]}
    assert state(fp16)["parameters"] == state(fp32)["parameters"]
    assert state(fp16)["all_gather"] * 2 == state(fp32)["all_gather"]
    assert fp16["device_memory"]["gb"] == 32 and fp32["device_memory"]["gb"] == 80


def test_sharded_state_scales_as_one_over_world_size():
    cfg = tiny_cfg()
    state = {n: {line["key"]: line["bytes"] for line in compute_plan(cfg, n)["model_state"]} for n in (1, 2, 4, 8)}
    for n in (2, 4, 8):
        for key in ("parameters", "gradients", "optimizer"):
            assert state[1][key] / n <= state[n][key] <= 1.05 * state[1][key] / n  # whole rows per rank
        assert state[n]["all_gather"] == state[2]["all_gather"]  # unsharded buffers do not shrink
    hybrid = compute_plan(tiny_cfg("parallel.sharding=hybrid", "parallel.shard_group_size=2"), 8)
    assert hybrid["model_state"][0]["bytes"] == state[2]["parameters"]
    ddp = compute_plan(tiny_cfg("parallel.strategy=ddp"), 8)
    assert ddp["model_state"][0]["bytes"] == state[1]["parameters"]
    with pytest.raises(ValueError, match="shard_group_size 3 must divide world_size 8"):
        compute_plan(tiny_cfg("parallel.sharding=hybrid", "parallel.shard_group_size=3"), 8)


def test_seer_preset_fits_a_32gb_v100_with_checkpointing_at_512_ranks():
    preset = REPO / "configs" / "seer_regnety256gf_swav.yaml"
    cfg = load_config(preset) if preset.is_file() else load_config(REPO / "configs" / "quickstart.yaml", SEER_OVERRIDES)
    plan = compute_plan(cfg, 512, fp32_reference=False)
    assert 1.25e9 < plan["parameters"]["total"] < 1.5e9  # RegNetY-256GF (~1.3B) + SwAV head
    assert plan["device_memory"]["gb"] == 32 and plan["config"]["activation_checkpointing"]
    assert plan["fits"]["checkpointing"] and plan["fits"]["as_configured"]
    assert plan["activations"]["checkpointing"]["total"] < plan["activations"]["saved_bytes"] / 3
    text = format_plan(plan)
    assert "verdict with checkpointing" in text and "MFU MEASURED for regnety_256gf" in text
    assert "V100  peak 125 TFLOP/s (datasheet) x 10.4% MFU" in text and "[ASSUMED: MFU measured on H200" in text


def test_cli_prints_the_table_and_json(capsys):
    args = [str(REPO / "configs" / "quickstart.yaml"), "world_size=4", *TINY]
    command = [sys.executable, "-m", "seer", "plan", *args]
    runs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
            for c in (command, command + ["--json"])]  # concurrently: each pays the torch import
    (text, text_err), (as_json, json_err) = [run.communicate(timeout=120) for run in runs]
    assert runs[0].returncode == 0, text_err
    assert "FSDP2 full sharding over 4 ranks" in text and "TOTAL with activation checkpointing" in text
    assert runs[1].returncode == 0, json_err
    plan = json.loads(as_json)
    assert plan["world_size"] == 4 and plan["parameters"]["total"] == sum(
        p.numel() for p in build_method(tiny_cfg()).parameters())
    from seer.cli import main

    assert main(["plan", args[0], "world_size=6", "parallel.sharding=hybrid", "parallel.shard_group_size=4", *TINY]) == 2
    assert "seer plan: error: parallel.shard_group_size 4 must divide world_size 6" in capsys.readouterr().err
