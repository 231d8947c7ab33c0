"""Benchmark (a script, not a test): how long a synchronous checkpoint save takes, and what that
means for ``seer launch --signal-delay`` (the warning signal must leave time for the step in
progress, the stop agreement and a complete synchronous save before Slurm kills the job).

Saves a large RegNetY (``--model``, default regnety_32gf: 145 M parameters) with one fp32
momentum buffer per parameter (what LARS/SGD keep) through seer's own ``Checkpointer`` (extras,
DCP write with fsync, manifest, rename, ``latest``) into ``--dir``, ``--repeats`` times, on one
process; reports bytes, seconds and the write rate. Then takes the SEER preset's checkpoint bytes
from ``seer plan`` (fp32 parameters + one optimizer buffer + buffers, whole and per rank) and turns
them into save times at the measured rate and at assumed shared-file-system rates.

    .venv/bin/python benchmarks/checkpoint_save.py            # ~1 min on 2 cores, ~2.5 GB of disk

Writes benchmarks/results/checkpoint_save.json and refreshes the section ``## Checkpoint save
time and --signal-delay`` of docs/benchmarks.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from report import REPO, publish  # noqa: I001 - puts the repo on sys.path

from cluster.slurm import Layout  # noqa: E402
from seer.config import load_config  # noqa: E402
from seer.engine.checkpoint import Checkpointer  # noqa: E402
from seer.models import create  # noqa: E402
from seer.plan import compute_plan  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "checkpoint_save.json"
HEADING = "## Checkpoint save time and --signal-delay"
SEER_PRESET = REPO / "configs" / "seer_regnety256gf_swav.yaml"
ASSUMED_FS_GB_S = (1.0, 10.0)  # shared file system write rates to translate into times (assumptions)
SIGNAL_DELAY_DEFAULT = Layout().signal_delay_s  # chosen from this measurement


def measure_save(model_name: str, folder: Path, repeats: int) -> dict:
    model = create(model_name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():  # one fp32 buffer per parameter, as after the first step
        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    checkpointer = Checkpointer(folder, rank=0, keep_last=1, model=model, optimizer=optimizer)
    times = []
    for step in range(1, repeats + 1):
        started = time.perf_counter()
        path = checkpointer.save(step)
        times.append(time.perf_counter() - started)
    size = sum(f.stat().st_size for f in path.iterdir())
    return {"model": model_name, "parameters": sum(p.numel() for p in model.parameters()), "bytes": size,
            "times_s": times, "best_gb_s": size / min(times) / 1e9, "median_s": sorted(times)[len(times) // 2]}


def seer_checkpoint_bytes(world_sizes: tuple[int, ...]) -> dict:
    """Whole-checkpoint and per-rank bytes of the SEER preset, from ``seer plan``'s numbers."""
    rows = {}
    for world in world_sizes:
        plan = compute_plan(load_config(str(SEER_PRESET)), world, fp32_reference=False)
        state = {row["key"]: row["bytes"] for row in plan["model_state"]}
        per_rank = state["parameters"] + state["optimizer"] + state["buffers"]  # rank 0's shard, the largest
        buffers_per_param = state["optimizer"] / state["parameters"]
        whole = plan["parameters"]["total"] * 4 * (1 + buffers_per_param) + state["buffers"]
        rows[world] = {"per_rank_bytes": per_rank, "whole_bytes": int(whole)}
    return rows


def render(result: dict) -> str:
    m, save = result["machine"], result["save"]
    lines = [
        HEADING, "",
        f"Measured {m['date_utc']} on {m['nproc']} CPU cores, torch {m['torch']}, to {m['disk']} "
        f"(other jobs shared the machine). Command: `.venv/bin/python {result['command']}` "
        "(raw numbers: `benchmarks/results/checkpoint_save.json`).", "",
        f"A synchronous `Checkpointer.save` of {save['model']} ({save['parameters'] / 1e6:.0f} M parameters + one "
        f"fp32 momentum buffer each, {save['bytes'] / 1e9:.2f} GB on disk, fsynced): median "
        f"{save['median_s']:.1f} s over {len(save['times_s'])} saves, best {save['best_gb_s']:.2f} GB/s.", "",
        "The SEER preset (RegNetY-256GF, LARS) checkpoints fp32 parameters, one optimizer buffer and BN "
        "buffers (`seer plan`'s bytes); every rank writes its shard at once, so the save takes about the "
        "whole checkpoint over the file system's aggregate write rate:", "",
        "| ranks | per rank | whole checkpoint | at the rate measured here (one writer) | "
        + " | ".join(f"at {r:g} GB/s (assumed)" for r in ASSUMED_FS_GB_S) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in ASSUMED_FS_GB_S) + " |",
    ]
    for world, row in result["seer"].items():
        whole = row["whole_bytes"]
        lines.append(f"| {world} | {row['per_rank_bytes'] / 2**20:,.0f} MiB | {whole / 1e9:.1f} GB | "
                     f"{whole / (save['best_gb_s'] * 1e9):.0f} s | "
                     + " | ".join(f"{whole / (r * 1e9):.0f} s" for r in ASSUMED_FS_GB_S) + " |")
    lines += ["", result["verdict"], ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="regnety_32gf")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder under /var/tmp)")
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="seer-ckpt-bench-", dir="/var/tmp"))
    try:
        save = measure_save(args.model, folder / "checkpoints", args.repeats)
        disk = subprocess.run(["df", "--output=source,fstype", str(folder)], capture_output=True, text=True)
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    seer = seer_checkpoint_bytes((64, 512))
    whole = seer[64]["whole_bytes"]
    measured_s = whole / (save["best_gb_s"] * 1e9)
    verdict = (f"`--signal-delay` default {SIGNAL_DELAY_DEFAULT} s: the step in progress (~2 s planned for the SEER "
               f"preset on V100s), one all-reduce to agree, and a synchronous save of {whole / 1e9:.1f} GB, which "
               f"takes {measured_s:.0f} s at the single-writer rate measured here (fsync to this machine's disk) "
               f"and {whole / (ASSUMED_FS_GB_S[0] * 1e9):.0f} s at an assumed 1 GB/s shared file system, plus 30 s "
               f"for the requeue and slack ({2 + measured_s + 30:.0f} s at the slow rate). The assumption is the "
               "file system's aggregate write rate; where it is slower, raise --signal-delay to at least step time "
               "+ checkpoint bytes / write rate + 30 s. GPU-cluster rates were not measured here.")
    result = {
        "machine": {"date_utc": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
                    "nproc": os.cpu_count(), "torch": torch.__version__,
                    "disk": " ".join(disk.stdout.split()[2:]) or "local disk"},
        "command": " ".join(["benchmarks/checkpoint_save.py", *sys.argv[1:]]),
        "save": save, "seer": seer, "verdict": verdict,
    }
    publish(RESULTS, result, HEADING, render(result), doc=not args.no_doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
