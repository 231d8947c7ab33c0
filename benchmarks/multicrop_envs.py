"""The driver of benchmarks/multicrop.py: one worker process per PIL environment (plain Pillow in
this interpreter, Pillow-SIMD in its venv), the methods of all of them interleaved in one run,
one table, ratios to the reference chain on plain Pillow from the same run.

A worker is ``multicrop.py --worker DIR`` under an environment's interpreter: it reads the JPEGs
the driver wrote to DIR and answers timing commands on a pipe (``multicrop.worker_main``). While
one worker runs a method, the others block reading their pipes: one thing runs at a time.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from multicrop import METHODS, machine, make_images  # benchmarks/ is sys.path[0]
from report import REPO, refresh_doc_section, write_results

HEADING = "## Multi-crop pipeline (CPU)"
BASELINE = ("pillow", "reference")
SCRIPT = Path(__file__).resolve().parent / "multicrop.py"


def target(env: str, method: str) -> float | None:
    """The ratio to the baseline each seer row is held to: the full chain on Pillow-SIMD (with
    simplejpeg) >= 4x, other full chains >= 3x, worker stages >= 5x."""
    if method == "seer full chain" and env == "pillow-simd":
        return 4.0
    if method.startswith("seer full chain"):
        return 3.0
    return 5.0 if method.startswith("seer worker stage") else None


class WorkerError(RuntimeError):
    pass


class Worker:
    """One environment's ``multicrop.py --worker`` process and its pipe."""

    def __init__(self, env: str, python: str, image_dir: Path, batch: int):
        self.env, self.python = env, python
        self.stderr = tempfile.TemporaryFile(mode="w+")
        environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([python, str(SCRIPT), "--worker", str(image_dir), "--batch", str(batch)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, cwd=REPO, env=environ)
        self.ready = self._read()
        self.info = self.ready["decoder_info"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            self.stderr.seek(0)
            lines = [x for x in self.stderr.read().splitlines() if x.strip()]
            raise WorkerError(f"the {self.env} worker ({self.python}) exited with {self.proc.returncode}: "
                              f"{lines[-1] if lines else 'no message'}")
        return json.loads(line)

    def call(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.stderr.close()


def start_workers(args, image_dir: Path) -> list[Worker]:
    """Plain Pillow (this interpreter) and, unless --no-simd, Pillow-SIMD; each checked to be what
    its label says (a wrong baseline would make every ratio wrong)."""
    wanted = [("pillow", sys.executable)]
    if not args.no_simd:
        if not Path(args.simd_python).is_file():
            raise WorkerError(f"no Pillow-SIMD interpreter at {args.simd_python}: run `make simd-venv` first "
                              "(or pass --no-simd)")
        wanted.append(("pillow-simd", os.path.abspath(args.simd_python)))
    workers = []
    try:
        for env, python in wanted:
            workers.append(Worker(env, python, image_dir, args.batch))
            pil = workers[-1].info["pil"]
            if pil.split()[0] != env:
                hint = "make simd-venv" if env == "pillow-simd" else "run the driver from a venv with plain Pillow (make unsimd)"
                raise WorkerError(f"the {env} worker ({python}) imports {pil}: {hint}")
    except BaseException:
        for worker in workers:
            worker.close()
        raise
    return workers


def measure(workers: list[Worker], count: int, rounds: int, batch: int) -> dict[tuple[str, str], list[float]]:
    """Seconds per round of every (environment, method), interleaved batch by batch, order rotating."""
    by_env = {w.env: w for w in workers}
    keys = [(w.env, m) for w in workers for m in METHODS]
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
    turn = 0
    for r in range(rounds):
        spent = dict.fromkeys(keys, 0.0)
        for start in range(0, count, batch):
            first = turn % len(keys)
            for env, method in keys[first:] + keys[:first]:
                command = {"run": method, "start": start, "count": min(batch, count - start), "seed": 1000 * r + start}
                spent[(env, method)] += by_env[env].call(command)["seconds"]
            turn += 1
        for key in keys:
            seconds[key].append(spent[key])
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{env} {method} {count / spent[(env, method)]:.1f}/s"
                                                      for env, method in keys if "PIL draft" not in method), flush=True)
    return seconds


def build_rows(workers: list[Worker], seconds: dict, count: int, megapixels: float) -> list[dict]:
    base = seconds[BASELINE]
    base_rate = count / statistics.median(base)
    rows = []
    for worker in workers:
        for method in METHODS:
            own = seconds[(worker.env, method)]
            rate = count / statistics.median(own)
            per_round = sorted(ref / mine for ref, mine in zip(base, own))
            if method.startswith("seer"):
                decoder = "pil-draft" if "PIL draft" in method else worker.info["decoder"]
                resizer = worker.info["resizer"]
            else:
                decoder, resizer = "PIL full size", "PIL (torchvision)" if method == "reference" else "-"
            row = {"env": worker.env, "pil": worker.info["pil"], "method": method, "decoder": decoder,
                   "resizer": resizer, "images_per_s": rate, "ms_per_image": 1000 / rate,
                   "vs_reference": rate / base_rate,
                   "vs_reference_per_round": [per_round[0], statistics.median(per_round), per_round[-1]],
                   "target": target(worker.env, method)}
            if row["target"] is not None:
                row["met"] = row["vs_reference"] >= row["target"]
            if method == "decode only":
                row["megapixels_per_s"] = megapixels / statistics.median(own)
            rows.append(row)
    return rows


def _cells(row: dict) -> list[str]:
    low, _, high = row["vs_reference_per_round"]
    verdict = "" if row["target"] is None else f">= {row['target']:.0f}x: {'met' if row['met'] else 'NOT met'}"
    if "megapixels_per_s" in row:
        verdict = f"{row['megapixels_per_s']:.0f} MP/s per core"
    ratio = "1.00 (baseline)" if (row["env"], row["method"]) == BASELINE else f"{row['vs_reference']:.2f}"
    return [row["pil"], row["method"], row["decoder"], row["resizer"], f"{row['images_per_s']:.1f}",
            f"{row['ms_per_image']:.2f}", ratio, f"{low:.2f}-{high:.2f}", verdict]


HEADER = ["PIL", "method", "decoder", "resizer", "images/s", "ms/image", "x reference on Pillow", "per-round ratios", "target"]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(_cells(row)) + " |" for row in rows])


def print_table(result: dict) -> None:
    rows = [HEADER] + [_cells(row) for row in result["rows"]]
    widths = [max(len(r[i]) for r in rows) + 2 for i in range(len(HEADER))]
    print(f"\n{result['images']} JPEGs, {result['megapixels_per_image']:.2f} MP each, 1 thread, "
          f"median of {result['rounds']} rounds, interleaved")
    for cells in rows:
        print("".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    print("distribution checks (KS distance, smaller is closer):", json.dumps(result["checks"]))


def doc_section(result: dict) -> str:
    """The generated part of the multi-crop section of docs/benchmarks.md."""
    m, envs = result["machine"], result["envs"]
    pils = "; ".join(f"{e['decoder_info']['pil']} (libjpeg-turbo {e['decoder_info']['libjpeg_turbo']})" for e in envs.values())
    load = ", ".join(f"{x:.1f}" for x in result["load_average"])
    checks = "; ".join(f"{env}: crop area {c['crop_boxes']['ks_area']:.3f}, log aspect {c['crop_boxes']['ks_log_aspect']:.3f}, "
                       f"brightness {c['color']['ks_brightness']:.3f}, contrast {c['color']['ks_contrast']:.3f}, "
                       f"saturation {c['color']['ks_saturation']:.3f}" for env, c in result["checks"].items())
    simd = [r for r in result["rows"] if (r["env"], r["method"]) == ("pillow-simd", "seer full chain")]
    verdict = (f"**Full chain on Pillow-SIMD (simplejpeg decode, SIMD resize): {simd[0]['vs_reference']:.2f}x the "
               f"reference on plain Pillow (per round {simd[0]['vs_reference_per_round'][0]:.2f}-"
               f"{simd[0]['vs_reference_per_round'][2]:.2f}x; target >= 4x {'met' if simd[0]['met'] else 'NOT met'}).**"
               if simd else "Pillow-SIMD was not measured in this run (--no-simd).")
    return f"""{HEADING}

Measured {result['date']} on {m['cores']} CPU cores ({m['cpu']}), Python {m['python']}, torch {m['torch']},
torchvision {m['torchvision']}, simplejpeg {m['simplejpeg']}, numba {m.get('numba')} (CPU color path:
{m.get('color_backend', 'numpy')}); {pils}. Load average before and after
the run: {load} (other jobs share this machine). Command: `{result['command']}` (raw numbers,
per-round seconds, both environments: `benchmarks/results/multicrop.json`).

Setup: {result['images']} real photos (the scikit-image/scikit-learn photos of the sample corpus, cut and
resized to 1100x830 or 830x1100, JPEG quality 90, {result['megapixels_per_image']:.2f} MP each), **one thread**, SwAV's
crops 2x224 (scale 0.14-1) + 6x96 (0.05-0.14). Plain Pillow runs in `.venv`, Pillow-SIMD (AVX2 build,
`make simd-venv`) in `.venv-simd`; each environment is a worker process fed the same JPEG files, and
every round runs every method of both on each batch of {result['batch']} images in turn (the order rotating
batch by batch, the other worker idle): medians over {result['rounds']} rounds; every ratio is to the
reference chain on plain Pillow, per round and median.

- **reference**: SwAV's `MultiCropDataset` chain unchanged (`Image.open().convert("RGB")`, then per crop
  torchvision `RandomResizedCrop`, `RandomHorizontalFlip`, `ColorJitter(0.8, 0.8, 0.8, 0.2)` p 0.8,
  `RandomGrayscale(0.2)`, PIL `GaussianBlur` p 0.5 radius 0.1-2, `ToTensor`, `Normalize`), in each PIL.
- **seer worker stage**: `MultiCrop.from_bytes`: boxes drawn first (RandomResizedCrop's algorithm), JPEG
  decoded at the largest DCT reduction that never upsamples a crop, resized (Pillow-SIMD's
  `resize(box=)` under Pillow-SIMD, torch's uint8 antialiased bilinear under Pillow), flipped, planar uint8.
- **seer full chain**: worker stage + stacking each view into a batch + `color_augment` on the CPU
  (`data_pipeline/color_cpu.py`: numba's fused kernels, `data_pipeline/color_jit.py`, where numba is
  installed; numpy ops otherwise).
- **, PIL draft decode**: the same with simplejpeg switched off (the PIL's draft-mode DCT decode).
- **decode only**: `Image.open().convert("RGB")` at full size.

{markdown_table(result['rows'])}

{verdict} Distribution checks (KS distances; the 0.1% critical value is about 0.06): {checks}.
The same checks, smaller, run in `tests/test_crops_augment.py` (on both PILs in CI).
"""


def run_benchmark(args) -> int:
    """``multicrop.py`` without --worker: measure every environment, print, write JSON and the doc."""
    images = make_images(args.images)
    megapixels = sum(w * h for w, h in (Image.open(io.BytesIO(d)).size for d in images)) / 1e6
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for i, data in enumerate(images):
            (Path(tmp) / f"{i:04d}.jpg").write_bytes(data)
        try:
            workers = start_workers(args, Path(tmp))
        except WorkerError as err:
            print(f"multicrop: error: {err}", file=sys.stderr)
            return 2
        try:
            seconds = measure(workers, len(images), args.rounds, args.batch)
            checks = {w.env: w.call({"checks": True}) for w in workers}
        except WorkerError as err:
            print(f"multicrop: error: {err}", file=sys.stderr)
            return 2
        finally:
            for worker in workers:
                worker.close()
    result = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": " ".join(["benchmarks/multicrop.py", *sys.argv[1:]]), "machine": machine(),
              "envs": {w.env: {"python": w.python, "decoder_info": w.info, "machine": w.ready["machine"]} for w in workers},
              "images": len(images), "megapixels_per_image": megapixels / len(images), "rounds": args.rounds,
              "batch": args.batch, "threads": 1, "load_average": [load_before, os.getloadavg()[0]],
              "baseline": "/".join(BASELINE), "rows": build_rows(workers, seconds, len(images), megapixels),
              "seconds": {f"{env}/{method}": s for (env, method), s in seconds.items()}, "checks": checks}
    print_table(result)
    write_results(args.out, result)
    print(f"wrote {args.out}")
    if not args.no_doc:
        refresh_doc_section(HEADING, doc_section(result))
        print(f"refreshed '{HEADING}' in docs/benchmarks.md")
    return 0

