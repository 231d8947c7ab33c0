"""Benchmark (a script, not a test): LARS step and per-layer gradient norms on FSDP2 shards, batched
(seer now) against per-tensor (seer before), side by side, on 2 gloo ranks.

Each rank builds the SwAV method on ``--model`` as ``seer pretrain`` does (meta device, FSDP2 per
block + head + root through ``seer.engine.parallel.parallelize``), takes one forward/backward so
every parameter holds a real gradient, then times, in interleaved blocks with rotating order:

- ``per-tensor``: the previous LARS step: for every parameter, the full norms of the weight and
  of the gradient as two DTensor reductions, then the update (kept here as the baseline);
- ``batched``: ``seer.engine.optim.LARS``: foreach norms, ONE all-reduce for all sharded tensors
  of a group, foreach updates;
- the same pair for the guard's per-layer gradient norms (one reduction per parameter before,
  one in all now).

Momentum buffers are created before timing; the weights change a little every step (as in
training). 1 thread per rank. Reports medians over blocks, the ratio, and the collectives per
call (counted on rank 0).

    .venv/bin/python benchmarks/lars_step.py            # ~2 min on 2 cores

Writes benchmarks/results/lars_step.json and refreshes the section ``## LARS step on FSDP2 shards
(CPU, 2 ranks)`` of docs/benchmarks.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# run as ``python benchmarks/lars_step.py``: benchmarks/ is sys.path[0]; importing report puts the repo on it
from report import REPO, publish

RESULTS = REPO / "benchmarks" / "results" / "lars_step.json"
HEADING = "## LARS step on FSDP2 shards (CPU, 2 ranks)"


@torch.no_grad()
def per_tensor_lars_step(optimizer) -> None:
    """The LARS step as seer had it: two full-norm reductions per parameter, one tensor at a time."""
    from seer.collectives import full_value, local_part

    for group in optimizer.param_groups:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        for param in group["params"]:
            if param.grad is None:
                continue
            weight, update = local_part(param), local_part(param.grad)
            if group["lars_exclude"]:
                if weight_decay != 0:
                    update = update.add(weight, alpha=weight_decay)
            else:
                weight_norm = full_value(torch.linalg.vector_norm(param))
                grad_norm = full_value(torch.linalg.vector_norm(param.grad))
                active = (weight_norm > 0) & (grad_norm > 0)
                ratio = group["trust_coefficient"] * weight_norm / (grad_norm + weight_decay * weight_norm + group["eps"])
                trust = torch.where(active, ratio, torch.ones_like(ratio)).to(update.dtype)
                decay = torch.where(active, weight_decay, 0.0).to(update.dtype)
                update = (update + weight * decay) * trust
            if momentum != 0:
                state = optimizer.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = local_part(state["momentum_buffer"])
                buffer.mul_(momentum).add_(update)
                update = buffer
            weight.add_(update, alpha=-lr)


def per_tensor_layer_norms(model) -> float:
    """The guard's per-layer norms as seer had them: one full-norm reduction per gradient."""
    from seer.collectives import full_value

    squares = [float(full_value(torch.linalg.vector_norm(p.grad))) ** 2 for p in model.parameters()
               if p.grad is not None]
    return math.sqrt(sum(squares))


def _rank(rank: int, world_size: int, port: int, args: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    from seer.collectives import DTensor

    from seer.config import load_config
    from seer.engine.distributed import DistInfo
    from seer.engine.guard import StabilityGuard
    from seer.engine.optim import build_optimizer
    from seer.engine.parallel import parallelize, unwrap
    from seer.methods import build_method

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        f"model.backbone={args['model']}", "optim.name=lars", "train.device=cpu", "train.batch_size=2",
        "augment.crops=[{size: 64, count: 2, scale: [0.14, 1.0]}]", "method.swav.freeze_prototypes_steps=0"])
    with torch.device("meta"):
        method = build_method(cfg)
    info = DistInfo(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    model, _ = parallelize(method, info, cfg.parallel, seed=0)
    optimizer = build_optimizer(unwrap(model), cfg.optim, 2 * world_size)
    g = torch.Generator().manual_seed(rank)
    model([torch.randn(2, 3, 64, 64, generator=g) for _ in range(2)])["loss"].backward()
    for group in optimizer.param_groups:
        group["lr"] = 1e-6  # small steps: the weights stay in range over hundreds of steps
    guard = StabilityGuard(cfg.guard)
    variants = {
        "lars_per_tensor": lambda: per_tensor_lars_step(optimizer),
        "lars_batched": optimizer.step,
        "layer_norms_per_tensor": lambda: per_tensor_layer_norms(unwrap(model)),
        "layer_norms_batched": lambda: guard.grad_norms(unwrap(model)),
    }
    optimizer.step()  # momentum buffers exist before timing

    counts = {}
    for name, fn in variants.items():  # collectives per call
        calls = {"all_reduce": 0, "full_tensor": 0}
        originals = (dist.all_reduce, DTensor.full_tensor)

        def reduce(*a, **k):
            calls["all_reduce"] += 1
            return originals[0](*a, **k)

        def gather(self, *a, **k):
            calls["full_tensor"] += 1
            return originals[1](self, *a, **k)

        dist.all_reduce, DTensor.full_tensor = reduce, gather
        try:
            fn()
        finally:
            dist.all_reduce, DTensor.full_tensor = originals
        counts[name] = calls
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for block in range(args["blocks"] + 1):  # block 0 warms up
        order = names[block % len(names):] + names[:block % len(names)]
        for name in order:
            dist.barrier()
            started = time.perf_counter()
            for _ in range(args["steps"]):
                variants[name]()
            elapsed = (time.perf_counter() - started) / args["steps"]
            if block:
                times[name].append(elapsed)
    result = {
        "rank": rank,
        "parameters": len(list(model.parameters())),
        "adapted_parameters": sum(len(g["params"]) for g in optimizer.param_groups if not g["lars_exclude"]),
        "times_s": times,
        "collectives_per_call": counts,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def measure(args: dict, world_size: int = 2) -> list[dict]:
    import torch.multiprocessing as mp

    from cluster.local import free_port

    with tempfile.TemporaryDirectory(prefix="seer_lars_") as out_dir:
        mp.start_processes(_rank, args=(world_size, free_port(), args, out_dir), nprocs=world_size,
                           start_method="spawn")
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world_size)]


def render(result: dict) -> str:
    m, ranks = result["machine"], result["ranks"]
    medians = {name: max(statistics.median(r["times_s"][name]) for r in ranks) for name in ranks[0]["times_s"]}
    counts = ranks[0]["collectives_per_call"]

    def row(what: str, before: str, after: str) -> list[str]:
        b, a = medians[before], medians[after]
        cb, ca = counts[before], counts[after]
        return [f"| {what} | {b * 1e3:,.1f} ms ({cb['all_reduce']} all_reduce + {cb['full_tensor']} full_tensor) | "
                f"{a * 1e3:,.1f} ms ({ca['all_reduce']} all_reduce + {ca['full_tensor']} full_tensor) | {b / a:.1f}x |"]

    return "\n".join([
        HEADING,
        "",
        f"Measured {m['date_utc']} on {m['nproc']} CPU cores, torch {m['torch']}; other jobs shared the machine "
        f"(load average at the end {m['load_average_at_end']:.1f}). Command: `.venv/bin/python {result['command']}` "
        "(raw numbers: `benchmarks/results/lars_step.json`).",
        "",
        f"SwAV on {result['model']} built as `seer pretrain` does (meta device, FSDP2 per block + head + root), "
        f"{ranks[0]['parameters']} parameter tensors ({ranks[0]['adapted_parameters']} with the LARS trust ratio), "
        f"2 gloo ranks, 1 thread each, real gradients from one backward; {result['blocks']} interleaved blocks of "
        f"{result['steps']} calls per variant (rotating order, after a warm-up block); median per call, slower rank. "
        "Before: the per-tensor code seer had (two DTensor norm reductions per parameter), kept in the script "
        "as the baseline. After: foreach norms and ONE all-reduce for all sharded tensors of a group.",
        "",
        "| per step | before (collectives per call) | after (collectives per call) | speed-up |",
        "| --- | --- | --- | --- |",
        *row("LARS `step()`", "lars_per_tensor", "lars_batched"),
        *row("per-layer gradient norms (`StabilityGuard.grad_norms`)", "layer_norms_per_tensor", "layer_norms_batched"),
        "",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="regnety_400mf")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()
    ranks = measure({"model": args.model, "blocks": args.blocks, "steps": args.steps})
    result = {
        "machine": {
            "date_utc": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
            "nproc": os.cpu_count(),
            "torch": torch.__version__,
            "load_average_at_end": os.getloadavg()[0],
        },
        "command": " ".join(["benchmarks/lars_step.py", *sys.argv[1:]]),
        "model": args.model,
        "blocks": args.blocks,
        "steps": args.steps,
        "ranks": ranks,
    }
    publish(RESULTS, result, HEADING, render(result), doc=not args.no_doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
