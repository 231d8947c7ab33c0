"""Benchmark (a script, not a test): seer's step with ``train.compile=off`` against ``blocks`` on the
CPU, interleaved in one process (``benchmarks/gpu_step.py`` measures the variants one after the
other, which a shared machine's load swings; this one alternates blocks of steps and takes
medians). The cases are gpu_step's tiny CPU cases; compiling them takes minutes on 2 cores the
first time (inductor caches it on disk).

    .venv/bin/python benchmarks/compile_cpu.py             # ~5-10 min on 2 shared cores

Writes benchmarks/results/compile_cpu.json and the section ``## Compiled blocks (CPU)`` of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

import gpu_step
import gpu_step_measure as measure
from report import REPO, refresh_doc_section, write_results

HEADING = "## Compiled blocks (CPU)"


def run(case: str, steps: int, repeats: int) -> dict:
    from seer.config import load_config

    preset, overrides = gpu_step.TINY[case]
    cfg = load_config(REPO / "configs" / f"{preset}.yaml", list(overrides))
    device = torch.device("cpu")
    variants = {mode: measure.seer_step(cfg, device, mode)[0] for mode in ("off", "blocks")}
    counters = {mode: 0 for mode in variants}
    compile_s = {}
    for mode, step in variants.items():  # warm-up: compiles
        started = time.perf_counter()
        for _ in range(2):
            step(counters[mode])
            counters[mode] += 1
        compile_s[mode] = time.perf_counter() - started
    cpu: dict[str, list[float]] = {mode: [] for mode in variants}
    for repeat in range(repeats):
        for mode in (list(variants) if repeat % 2 == 0 else list(reversed(variants))):
            started = time.process_time()
            for _ in range(steps):
                variants[mode](counters[mode])
                counters[mode] += 1
            cpu[mode].append((time.process_time() - started) / steps)
    median = {mode: statistics.median(v) for mode, v in cpu.items()}
    return {"case": case, "backbone": cfg.model.backbone, "method": cfg.method.name, "batch": cfg.train.batch_size,
            "crops": [f"{g.count}x{g.size}" for g in cfg.augment.crops],
            "checkpointing": cfg.parallel.activation_checkpointing, "cpu_step_s": cpu, "median_cpu_s": median,
            "first_two_steps_s": compile_s, "speedup": median["off"] / median["blocks"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="+", default=list(gpu_step.TINY))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [run(case, args.steps, args.repeats) for case in args.case]
    result = {"date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
              "torch": torch.__version__, "load_average": os.getloadavg()[0],
              "command": " ".join(["benchmarks/compile_cpu.py", *sys.argv[1:]]), "rows": rows}
    write_results(REPO / "benchmarks" / "results" / "compile_cpu.json", result)
    table = ["| case | model | eager CPU / step | blocks CPU / step | speed-up | first 2 steps eager / compiled |",
             "| --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r['case']} | {r['method']} {r['backbone']}, batch {r['batch']}, {'+'.join(r['crops'])}"
              f"{', AC' if r['checkpointing'] else ''} | {r['median_cpu_s']['off'] * 1e3:,.0f} ms | "
              f"{r['median_cpu_s']['blocks'] * 1e3:,.0f} ms | {r['speedup']:.2f}x | "
              f"{r['first_two_steps_s']['off']:,.2f} s / {r['first_two_steps_s']['blocks']:,.1f} s |" for r in rows]
    section = "\n".join([
        HEADING, "",
        f"Measured {result['date']} on the CPU (1 thread, process CPU time, {args.repeats} alternating blocks of "
        f"{args.steps} steps per variant after 2 warm-up steps; a shared 2-core machine, load average "
        f"{result['load_average']:.1f}: expect noise of tens of percent), torch {result['torch']}, fp32, seer's "
        f"`train_step`. Command: `.venv/bin/python {result['command']}`.", "",
        *table, "",
        "The first two steps include compiling (inductor, C++; cached on disk afterwards). The CPU is not what "
        "`train.compile` is for: the GPU numbers (issue 18's targets) are still to be measured.", "",
    ])
    print("\n" + section)
    refresh_doc_section(HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
