"""Benchmark (a script, not a test): forward + backward of seer's backbones in channels_last against
contiguous (NCHW) memory, on this machine's device: the measurement behind each backbone's
``preferred_memory_format`` (``train.memory_format=auto``).

Each backbone and layout runs blocks of steps, the layouts interleaved in alternating order;
medians of process CPU time (the CPU; robust to other jobs on a shared machine) or of CUDA time.

    .venv/bin/python benchmarks/memory_format.py                    # ~3 min on 2 shared cores
    python benchmarks/memory_format.py --device cuda --precision bf16 --batch 64 --size 224

Writes benchmarks/results/memory_format_<device>.json and (CPU) the section ``## Memory format``
of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from report import REPO, refresh_doc_section, write_results

HEADING = "## Memory format"
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def measure(name: str, batch: int, size: int, device: torch.device, dtype: torch.dtype, repeats: int, steps: int) -> dict:
    from seer.models import create

    torch.manual_seed(0)
    base = create(name).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    runs = {}
    for layout, fmt in LAYOUTS.items():
        model = create(name).to(device)
        model.load_state_dict(base.state_dict())
        runs[layout] = (model.to(memory_format=fmt), x.contiguous(memory_format=fmt))
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {layout: [] for layout in LAYOUTS}
    for repeat in range(repeats + 1):  # block 0 warms up
        for layout in (list(LAYOUTS) if repeat % 2 == 0 else list(reversed(LAYOUTS))):
            model, inputs = runs[layout]
            sync()
            started = clock()
            for _ in range(steps):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    out = model(inputs)
                out.float().sum().backward()
            sync()
            if repeat:
                times[layout].append((clock() - started) / steps)
    median = {layout: statistics.median(v) for layout, v in times.items()}
    return {"backbone": name, "batch": batch, "size": size, "step_s": times, "median_s": median,
            "channels_last_speedup": median["contiguous"] / median["channels_last"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--backbones", nargs="+", default=["regnety_400mf", "regnety_1_6gf", "regnety_16gf"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    rows = []
    for name in args.backbones:
        rows.append(measure(name, args.batch, args.size, device, dtype, args.repeats, args.steps))
        r = rows[-1]
        print(f"{name}: contiguous {r['median_s']['contiguous'] * 1e3:,.0f} ms, channels_last "
              f"{r['median_s']['channels_last'] * 1e3:,.0f} ms, speedup {r['channels_last_speedup']:.2f}x", flush=True)
    import os
    import subprocess

    result = {"date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
              "torch": torch.__version__, "device": str(device), "precision": args.precision,
              "load_average": os.getloadavg()[0], "command": " ".join(["benchmarks/memory_format.py", *sys.argv[1:]]),
              "rows": rows}
    write_results(REPO / "benchmarks" / "results" / f"memory_format_{device.type}.json", result)
    table = ["| backbone | batch x size | contiguous | channels_last | channels_last speed-up |", "| --- | --- | --- | --- | --- |"]
    table += [f"| {r['backbone']} | {r['batch']} x {r['size']} | {r['median_s']['contiguous'] * 1e3:,.0f} ms | "
              f"{r['median_s']['channels_last'] * 1e3:,.0f} ms | {r['channels_last_speedup']:.2f}x |" for r in rows]
    section = "\n".join([
        HEADING, "",
        f"Measured {result['date']} on the CPU (1 thread, process CPU time, {args.repeats} interleaved blocks of "
        f"{args.steps} steps; a shared 2-core machine, load average {result['load_average']:.1f}), torch "
        f"{result['torch']}, {args.precision}: forward + backward of the backbone alone. Command: "
        f"`.venv/bin/python {result['command']}`.", "", *table, "",
        "On CUDA the RegNet choice (channels_last) is the H200 measurement of issue 18 (RegNetY-16GF, SwAV, SEER "
        "crops, bf16, AC: 248 against 216 img/s); ViTs stay contiguous. `python benchmarks/memory_format.py "
        "--device cuda --precision bf16 --batch 64 --size 224` measures it per backbone on a GPU (not run here: "
        "no GPU).", "",
    ])
    print("\n" + section)
    if device.type == "cpu":
        refresh_doc_section(HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
