"""``seer plan``: per-rank memory and FLOPs of a config, with the arithmetic shown.

Nothing here is a rule of thumb where it can be measured. The measured numbers come from
``seer.plan_measure``: one forward of the method on fake tensors (meta storage) of the real crop
shapes gives the bytes autograd saves for backward (activations), what activation checkpointing
keeps and recomputes per block, and the forward FLOPs (``FlopCounterMode``); a step is x3 for
forward + backward, plus the forward FLOPs of the checkpointed blocks recomputed in backward.

Model state follows the sharding of ``parallel``: FSDP2 keeps fp32 parameters, gradients and
optimizer state sharded on dim 0 over the shard group (whole rows per rank, padded); units are
those of ``seer.engine.parallel`` (every block, every head, the root), all-gathered in the
compute dtype. Step times come from MFU measured per backbone family on a GPU (``seer.plan_speed``);
what is measured and what is assumed (other GPUs, sizes, settings; runtime overhead) is printed as such.
"""

from __future__ import annotations

import math

import torch

from seer.config import SeerConfig
from seer.engine.parallel import DTYPES
from seer.plan_measure import checkpointed_blocks, fsdp_units, measure_method
from seer.plan_speed import estimate, format_speed

GIB, MIB = 2**30, 2**20
RUNTIME_OVERHEAD = 2 * GIB  # CUDA context, cuDNN workspace, NCCL buffers, allocator fragmentation


def shard_group(cfg: SeerConfig, world_size: int) -> tuple[str, int]:
    """(strategy as planned, ranks one parameter is sharded over)."""
    p = cfg.parallel
    if world_size == 1:
        return "single process (no FSDP/DDP)", 1
    if p.strategy == "ddp":
        return "DDP (replicated)", 1
    if p.sharding == "full":
        return f"FSDP2 full sharding over {world_size} ranks", world_size
    group = p.shard_group_size or min(8, world_size)
    if group > world_size or world_size % group:
        raise ValueError(f"parallel.shard_group_size {group} must divide world_size {world_size}")
    source = "parallel.shard_group_size" if p.shard_group_size else "assumed: ranks per node, at most 8"
    return f"FSDP2 hybrid sharding in groups of {group} ({source})", group


def shard_elements(params: list[torch.Tensor], group: int) -> int:
    """Largest per-rank shard (rank 0) of FSDP2's dim-0 sharding: ceil(rows / group) rows each."""
    total = 0
    for p in params:
        rows = p.shape[0] if p.ndim else 1
        total += math.ceil(rows / group) * (p.numel() // max(rows, 1))
    return total


def _fmt(n: float) -> str:
    return f"{n / GIB:,.2f} GiB" if abs(n) >= GIB else f"{n / MIB:,.1f} MiB"


def _flop(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n / 1e6:,.2f} MFLOP"


def crops_key(cfg: SeerConfig) -> str:
    """The crops as ``benchmarks/gpu_step.py`` and the calibration table write them: ``2x224+4x96``
    (consecutive groups of one size counted together: MoCo v3's two asymmetric views are 2x224)."""
    runs: list[list[int]] = []
    for g in cfg.augment.crops:
        if runs and runs[-1][1] == g.size:
            runs[-1][0] += g.count
        else:
            runs.append([g.count, g.size])
    return "+".join(f"{count}x{size}" for count, size in runs)


def compute_plan(cfg: SeerConfig, world_size: int, fp32_reference: bool = True) -> dict:
    """Every number of the plan for one rank of ``world_size`` (see the module doc).
    ``fp32_reference``: also measure the forward in fp32, to show what the compute dtype saves."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    strategy, group = shard_group(cfg, world_size)
    precision = cfg.train.precision
    compute = DTYPES[precision]
    cbytes = torch.empty((), dtype=compute).element_size()
    method, prof = measure_method(cfg, compute)
    fp32_saved = prof.saved_bytes if compute == torch.float32 else (
        measure_method(cfg, torch.float32)[1].saved_bytes if fp32_reference else None)
    params = list(method.parameters())
    trainable = [p for p in params if p.requires_grad]
    blocks, heads = fsdp_units(method)
    n_params, n_train = sum(p.numel() for p in params), sum(p.numel() for p in trainable)
    fsdp = world_size > 1 and cfg.parallel.strategy == "fsdp"
    shard_p, shard_t = shard_elements(params, group), shard_elements(trainable, group)
    # AdamW: exp_avg + exp_avg_sq; SGD/LARS: one momentum buffer (none without momentum)
    opt_states = 2 if cfg.optim.name == "adamw" else int(cfg.optim.momentum != 0)
    lines: list[dict] = []

    def add(key: str, what: str, formula: str, value: float) -> None:
        lines.append({"key": key, "quantity": what, "formula": formula, "bytes": int(value)})

    per = f" / {group} ranks (padded rows)" if group > 1 else ""
    master = f"fp32 (master copy; {precision} compute)" if cbytes != 4 else "fp32"
    add("parameters", f"parameters, {master}" + (", sharded" if group > 1 else ""),
        f"{n_params:,} params{per} = {shard_p:,} x 4 B", shard_p * 4)
    add("gradients", "gradients, fp32", f"{n_train:,} trainable{per} = {shard_t:,} x 4 B", shard_t * 4)
    add("optimizer", f"optimizer state ({cfg.optim.name}: {opt_states} buffer(s)/param), fp32",
        f"{opt_states} x {shard_t:,} x 4 B", opt_states * shard_t * 4)
    buffer_bytes = sum(b.numel() * (4 if b.is_floating_point() else b.element_size()) for b in method.buffers())
    add("buffers", "buffers (BN stats, queue; replicated)", "sum over buffers, fp32", buffer_bytes)
    unit_numel = [sum(p.numel() for p in unit.parameters()) for unit in blocks + heads]
    largest = max(unit_numel, default=0)
    root = n_params - sum(unit_numel)
    largest_trainable = max((sum(p.numel() for p in u.parameters() if p.requires_grad) for u in blocks + heads), default=0)
    if fsdp:
        add("all_gather", f"unsharded params in {precision}: root unit + 2 x largest unit (prefetch)",
            f"({root:,} + 2 x {largest:,}) x {cbytes} B", (root + 2 * largest) * cbytes)
        rs = cbytes + (4 if cfg.parallel.reduce_fp32 and cbytes != 4 else 0)
        add("reduce_scatter", "unsharded grads of the largest unit before reduce-scatter",
            f"{largest_trainable:,} x ({cbytes} B {precision}" + (" + 4 B fp32 copy)" if rs != cbytes else ")"),
            largest_trainable * rs)
    else:
        if world_size > 1:
            add("ddp_buckets", "DDP reducer buckets (copy of the gradients)", f"{n_train:,} x 4 B", n_train * 4)
        if cbytes != 4:
            add("autocast_weights", f"autocast's cached {precision} weight copies", f"{n_params:,} x {cbytes} B",
                n_params * cbytes)
    state = sum(line["bytes"] for line in lines)

    ckpt_ids = {id(b) for b in checkpointed_blocks(method, cfg.parallel.checkpoint_stages)}
    ckpt_blocks = {i for i, block in enumerate(blocks) if id(block) in ckpt_ids}
    ck = prof.checkpointed(ckpt_blocks)
    act_full = prof.saved_bytes
    act_ckpt = ck["kept_outside_checkpointed_blocks"] + ck["checkpointed_block_inputs"] + ck["largest_block_recompute"]
    largest_saved = max(prof.storage_bytes.values(), default=0)
    working = 2 * largest_saved  # estimate: gradient of one op's output and of its input
    n_images = cfg.train.batch_size * sum(g.count for g in cfg.augment.crops)
    crops = " + ".join(f"{g.count}x{g.size}px" for g in cfg.augment.crops)

    fwd, step_flops = prof.flops, 3 * prof.flops
    step_flops_ckpt = step_flops + ck["recompute_flops"]
    use_ckpt = cfg.parallel.activation_checkpointing
    flops_used = step_flops_ckpt if use_ckpt else step_flops
    backbone_params = sum(p.numel() for p in getattr(method, "backbone", method).parameters())
    config = {"backbone": cfg.model.backbone, "method": cfg.method.name, "precision": precision,
              "optimizer": cfg.optim.name, "batch_size_per_rank": cfg.train.batch_size, "crops": crops_key(cfg),
              "activation_checkpointing": use_ckpt, "checkpointed_blocks": len(ckpt_blocks)}
    speed = estimate(config, backbone_params, prof.model_step_flops, ck["recompute_flops"] if use_ckpt else 0)
    memory_gb = 32 if precision == "fp16" else 80
    memory = memory_gb * 10**9  # decimal GB: conservative
    total_full = state + act_full + working + RUNTIME_OVERHEAD
    total_ckpt = state + act_ckpt + working + RUNTIME_OVERHEAD
    chosen_total = total_ckpt if use_ckpt else total_full
    notes = [
        f"model state is rank 0's shard (the largest): FSDP2 shards dim 0 in whole rows, padded; "
        f"{n_params:,} / {group} = {n_params / group:,.0f} before padding" if group > 1 else
        "model state is not sharded (one rank or DDP)",
        "FLOPs count matmuls, convolutions and attention (FlopCounterMode); element-wise ops (norms, "
        "activations, SE gating) are not counted; backward = 2 x forward",
        f"runtime overhead is an assumption, not a measurement: {_fmt(RUNTIME_OVERHEAD)}; the backward "
        f"working set is an estimate: 2 x the largest saved tensor ({_fmt(largest_saved)})",
    ]
    if fsdp:
        notes.append(f"FSDP2 units as seer.engine.parallel makes them: {len(blocks)} blocks, {len(heads)} head(s), "
                     f"the root (resident through the step); compute in {precision} through MixedPrecisionPolicy")
    elif cbytes != 4:
        notes.append(f"one process / DDP run under torch.autocast: ops autocast keeps in fp32 (softmax, norms) are "
                     f"counted in {precision} here")
    return {
        "config": {**config, "crops": crops},
        "world_size": world_size,
        "strategy": strategy,
        "shard_group_size": group,
        "parameters": {"total": n_params, "trainable": n_train, "root_unit": root, "largest_block": largest,
                       "blocks": len(blocks), "per_rank_shard": shard_p},
        "model_state": lines,
        "model_state_bytes": state,
        "activations": {
            "images_per_rank": n_images,
            "measured_dtype": precision,
            "saved_bytes": act_full,
            "saved_bytes_fp32": fp32_saved,
            "compute_to_fp32_ratio": act_full / fp32_saved if fp32_saved else None,
            "checkpointing": {**{k: v for k, v in ck.items() if k != "recompute_flops"}, "total": act_ckpt},
            "backward_working_set_estimate": working,
        },
        "flops": {
            "forward": fwd, "recompute": ck["recompute_flops"], "step": step_flops, "step_checkpointed": step_flops_ckpt,
            "step_global": flops_used * world_size, "model_step": prof.model_step_flops,
            "no_grad_forward": prof.no_grad_flops,
        },
        "speed": speed,
        "runtime_overhead_assumed": RUNTIME_OVERHEAD,
        "total_bytes": {"no_checkpointing": total_full, "checkpointing": total_ckpt},
        "device_memory": {"gb": memory_gb, "bytes": memory,
                          "why": "V100-32GB (fp16 preset)" if precision == "fp16" else "80 GB (A100/H100, non-fp16 preset)"},
        "notes": notes,
        "fits": {"no_checkpointing": total_full <= memory, "checkpointing": total_ckpt <= memory,
                 "as_configured": chosen_total <= memory},
    }


def format_plan(plan: dict) -> str:
    """The plan as a table (quantity | arithmetic | bytes per rank) plus the arithmetic lines."""
    c, a, f, d = plan["config"], plan["activations"], plan["flops"], plan["device_memory"]
    ck, totals = a["checkpointing"], plan["total_bytes"]
    rows = [(line["quantity"], line["formula"], line["bytes"]) for line in plan["model_state"]]
    rows += [
        ("= model state and buffers", "", plan["model_state_bytes"]),
        ("activations, no checkpointing (measured)",
         f"saved for backward, {a['images_per_rank']} crops, {a['measured_dtype']}", a["saved_bytes"]),
        ("activations, checkpointing (measured per block)",
         f"{_fmt(ck['kept_outside_checkpointed_blocks'])} + {_fmt(ck['checkpointed_block_inputs'])} + "
         f"{_fmt(ck['largest_block_recompute'])}", ck["total"]),
        ("backward working set (estimate)", "2 x largest saved tensor", a["backward_working_set_estimate"]),
        ("runtime overhead (assumed)", "CUDA context, NCCL, fragmentation", plan["runtime_overhead_assumed"]),
        ("TOTAL without activation checkpointing", "", totals["no_checkpointing"]),
        ("TOTAL with activation checkpointing", "", totals["checkpointing"]),
    ]
    w1, w2 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    rule = "-" * (w1 + w2 + 16)
    table = [f"{q:<{w1}}  {formula:<{w2}}  {_fmt(n):>12}" for q, formula, n in rows]
    table.insert(len(plan["model_state"]) + 1, rule)
    table.insert(len(table) - 2, rule)
    ratio = a["compute_to_fp32_ratio"]
    out = [
        f"seer plan: {c['method']} / {c['backbone']}, {c['precision']}, {c['optimizer']}, "
        f"{c['batch_size_per_rank']} images/rank x ({c['crops']}), world_size {plan['world_size']}",
        f"strategy: {plan['strategy']}; parameters {plan['parameters']['total']:,} "
        f"({plan['parameters']['trainable']:,} trainable), {plan['parameters']['blocks']} blocks + root unit",
        "",
        f"{'per rank':<{w1}}  {'arithmetic':<{w2}}  {'bytes':>12}",
        rule,
        *table,
        "",
        "arithmetic:",
        f"  activations: one forward of fake tensors (meta storage), autograd saved-tensor hooks, one count per storage, "
        f"parameters excluded; params and inputs in {a['measured_dtype']}"
        + ("" if a["measured_dtype"] == "fp32" else " as FSDP2 MixedPrecisionPolicy runs the forward")
        + (f" (the same forward in fp32: {_fmt(a['saved_bytes_fp32'])}, ratio {ratio:.3f})" if ratio and ratio != 1 else ""),
        f"  checkpointing ({c['checkpointed_blocks']} blocks, non-reentrant): kept outside checkpointed blocks "
        f"{_fmt(ck['kept_outside_checkpointed_blocks'])} + block inputs {_fmt(ck['checkpointed_block_inputs'])} "
        f"+ largest block call recomputed in backward {_fmt(ck['largest_block_recompute'])} = {_fmt(ck['total'])}",
        f"  FLOPs per rank: forward {_flop(f['forward'])} x 3 (forward + backward) = {_flop(f['step'])}; "
        f"+ recompute of checkpointed blocks {_flop(f['recompute'])} = {_flop(f['step_checkpointed'])}; "
        f"global (x {plan['world_size']} ranks, as configured) {_flop(f['step_global'])} per step",
        *format_speed(plan["speed"], c["batch_size_per_rank"]),
        *(f"  note: {note}" for note in plan["notes"]),
        "",
        f"device memory: {d['gb']} GB = {d['bytes'] / GIB:.1f} GiB ({d['why']}; decimal GB, conservative)",
    ]
    for label, key in (("without checkpointing", "no_checkpointing"), ("with checkpointing", "checkpointing")):
        verdict = "FITS" if plan["fits"][key] else "DOES NOT FIT"
        out.append(f"verdict {label}: {_fmt(totals[key])} of {d['bytes'] / GIB:.1f} GiB = "
                   f"{totals[key] / d['bytes']:.0%}: {verdict}")
    configured = "on" if c["activation_checkpointing"] else "off"
    out.append(f"as configured (activation checkpointing {configured}): "
               f"{'FITS' if plan['fits']['as_configured'] else 'DOES NOT FIT'}")
    return "\n".join(out)
