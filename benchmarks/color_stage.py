"""Benchmark (a script, not a test): the color stage's kernels per view and its time, before and after
issue 18's rewrite of the batched path.

- **Kernels per view** (``seer.profiling.DeviceWork``: ATen operators that do work, on the CPU;
  each is a kernel launch on a GPU) of the device side of one view, the per-sample parameters
  already drawn (drawing them is CPU work on any device, the same before and after): ``before``
  is the masked-index implementation seer had (kept below as :func:`batched_before`, the
  reference), ``after`` is ``data_pipeline.color_batched.apply_batched``. Also the operators
  that wait for the device (boolean-mask indexing, ``nonzero``) and host reads.
- **Time per view** on this machine's device (``--device``; the CPU by default): ``per_sample``
  (what the CPU uses), ``before``, ``after``, and ``compiled`` (``--compiled``; inductor; on a
  CPU compiling takes minutes).

    .venv/bin/python benchmarks/color_stage.py                       # ~1 min on 2 shared cores
    python benchmarks/color_stage.py --device cuda --compiled        # on a GPU box

Writes benchmarks/results/color_stage_<device>.json and (CPU) the section ``## Color stage:
kernels per view`` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from report import REPO, refresh_doc_section, write_results

HEADING = "## Color stage: kernels per view"
SPECS = {  # the views of the presets: SEER's (both crop sizes), MoCo v3's second view (blur 0.1, solarize 0.2)
    "seer": dict(jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5, solarize_p=0.0),
    "mocov3_view2": dict(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.1, solarize_p=0.2),
}


def batched_before(images: torch.Tensor, spec, p) -> torch.Tensor:
    """seer's batched color stage before issue 18 (the reference): per (position, op) a boolean
    selection, an indexed copy out and back; per-sample blur kernels built in a Python loop."""
    from data_pipeline.augment import (
        _gray, _normaliser, adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, gaussian_blur)

    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    device = images.device
    x = images.float()
    jitter, factors, order = p.jitter.to(device), p.factors.to(device), p.order.to(device)
    for position in range(4):
        for op_index, op in enumerate(ops):
            idx = torch.nonzero(jitter & (order[:, position] == op_index)).flatten()
            if idx.numel():
                x[idx] = op(x[idx], factors[idx, op_index], 255.0)
    gray = p.gray.to(device)
    if bool(p.gray.any()):
        x[gray] = _gray(x[gray]).expand(-1, 3, -1, -1)
    if bool(p.blur.any()):
        blur = p.blur.to(device)
        x[blur] = gaussian_blur(x[blur], p.sigma[p.blur])
    if bool(p.solarize.any()):
        solarize = p.solarize.to(device)
        s = x[solarize]
        x[solarize] = torch.where(s >= 127.5, 255.0 - s, s)
    scale, shift = _normaliser(spec, device)
    return (x * scale - shift).contiguous()


def implementations(compiled: bool) -> dict:
    from data_pipeline.color_batched import apply_batched
    from data_pipeline.color_cpu import apply_per_sample

    impls = {"before": batched_before, "after": apply_batched}
    if compiled:
        impls["compiled"] = lambda images, spec, p: apply_batched(images, spec, p, compiled=True)
    impls["per_sample"] = apply_per_sample  # numba's fused kernels where installed, else numpy
    return impls


def count(spec_name: str, batch: int, size: int, device: str = "cpu") -> dict:
    """Kernels, waits and host reads of one view's device side, before and after."""
    from data_pipeline.augment import ColorAugmentSpec, sample_color_params
    from seer.profiling import DeviceWork

    spec = ColorAugmentSpec(**SPECS[spec_name])
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    params = sample_color_params(batch, spec, torch.Generator().manual_seed(1))
    out = {}
    for name, fn in implementations(False).items():
        if name == "per_sample":
            continue
        with DeviceWork() as work:
            fn(images.to(device), spec, params)
        out[name] = {"kernels": work.kernel_count, "waits": sum(work.waits.values()), "host_reads": len(work.host_reads)}
    out["ratio"] = out["before"]["kernels"] / out["after"]["kernels"]
    return out


def time_views(spec_name: str, batch: int, size: int, device: str, repeats: int, compiled: bool) -> dict:
    from data_pipeline.augment import ColorAugmentSpec, sample_color_params

    spec = ColorAugmentSpec(**SPECS[spec_name])
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8).to(device)
    params = sample_color_params(batch, spec, torch.Generator().manual_seed(1))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    result = {}
    for name, fn in implementations(compiled).items():
        if name == "per_sample" and device != "cpu":
            continue
        fn(images, spec, params)  # warm-up (and compile)
        sync()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn(images, spec, params)
            sync()
            times.append(time.perf_counter() - started)
        result[name] = {"ms_per_view": statistics.median(times) * 1e3,
                        "images_per_s": batch / statistics.median(times)}
    return result


def render(result: dict) -> str:
    rows = ["| view spec | batch x size | kernels before | kernels after | ratio | waits before / after | "
            "reads of the host-side parameters before / after |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["counts"]:
        c = r["counts"]
        rows.append(f"| {r['spec']} | {r['batch']} x {r['size']} | {c['before']['kernels']} | {c['after']['kernels']} | "
                    f"{c['ratio']:.1f}x | {c['before']['waits']} / {c['after']['waits']} | "
                    f"{c['before']['host_reads']} / {c['after']['host_reads']} |")
    trows = ["| view spec | batch x size | " + " | ".join(result["timed_variants"]) + " |",
             "| --- | --- | " + " | ".join("---" for _ in result["timed_variants"]) + " |"]
    for r in result["times"]:
        trows.append(f"| {r['spec']} | {r['batch']} x {r['size']} | " + " | ".join(
            f"{r['times'][n]['ms_per_view']:,.1f} ms ({r['times'][n]['images_per_s']:,.0f} img/s)"
            for n in result["timed_variants"]) + " |")
    return "\n".join([
        HEADING, "",
        f"Measured {result['date']} on the CPU ({result['threads']} thread, a shared 2-core machine), torch "
        f"{result['torch']}. Command: `.venv/bin/python {result['command']}`. Kernels are counted on the device side "
        "of one view (ATen operators that do work: each is a launch on a GPU; the per-sample parameters are drawn "
        "first, on the CPU, the same before and after). `before`: the masked-index batched path seer had; `after`: "
        "`data_pipeline.color_batched` (whole-batch ops, one parameter table). Waits: operators whose output size "
        "depends on the data (`nonzero`, boolean indexing): each stops the host until the GPU catches up. The "
        "reads are of the per-sample parameters, which live on the host: no wait on a GPU.", "",
        *rows, "", "Time per view on the CPU (medians; the CPU path of a run is `per_sample`, here with "
        f"`data_pipeline.color_cpu` on {result.get('cpu_backend', 'numpy')}; the batched ones are for GPUs and shown for reference; "
        "no GPU was available, GPU times are still to be measured):", "",
        *trows, "", "On a CPU the new batched path is slower than the old one: it runs every jitter slot over "
        "every sample (identity where a sample skips it) where the old one touched only the selected samples, so it "
        "moves more bytes; what it saves is launches and waits, which a CPU does not pay. Whether it beats the old "
        "path on a GPU in eager mode, and what the compiled form (`--compiled`, a few fused kernels) gives, is "
        "still to be measured there.", "",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compiled", action="store_true", help="also time the compiled batched path")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    shapes = [("seer", 32, 224), ("seer", 64, 96), ("seer", 128, 96), ("mocov3_view2", 128, 224)]
    counts = [{"spec": s, "batch": b, "size": n, "counts": count(s, b, n, args.device)} for s, b, n in shapes]
    for r in counts:
        print(r, flush=True)
    timed = [("seer", 32, 96), ("seer", 32, 224)] if args.device == "cpu" else [("seer", 64, 224), ("seer", 64, 96),
                                                                               ("mocov3_view2", 128, 224)]
    times = [{"spec": s, "batch": b, "size": n, "times": time_views(s, b, n, args.device, args.repeats, args.compiled)}
             for s, b, n in timed]
    for r in times:
        print(r, flush=True)
    import subprocess

    from data_pipeline import color_cpu

    result = {"cpu_backend": color_cpu.BACKEND, "date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
              "command": " ".join(["benchmarks/color_stage.py", *sys.argv[1:]]), "counts": counts, "times": times,
              "timed_variants": list(times[0]["times"])}
    write_results(REPO / "benchmarks" / "results" / f"color_stage_{args.device}.json", result)
    section = render(result)
    print("\n" + section)
    if args.device == "cpu" and not args.no_doc:
        refresh_doc_section(HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
