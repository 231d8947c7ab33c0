"""``make demo``: the whole path on real sample photos, then a summary.

photos shipped in scikit-image/scikit-learn -> ``seer ingest`` -> ``seer pretrain
configs/quickstart.yaml`` (SwAV on RegNetY-400MF) -> ``seer export`` -> summary (with the
path of the run's plot). Each step runs
the same code as its CLI subcommand. The run folder is started afresh each time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from data_pipeline.ingest import ingest
from data_pipeline.sample_corpus import build_sample_corpus
from seer.config import load_config
from seer.engine.train import pretrain
from seer.export import export_backbone

REPO = Path(__file__).resolve().parent.parent


def _mean_loss(metrics: Path, first: bool, n: int = 10) -> float:
    losses = [r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    part = losses[:n] if first else losses[-n:]
    return sum(part) / len(part)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    out = Path(args.out)
    started = time.monotonic()

    photos = build_sample_corpus(out / "photos")
    report = ingest([out / "photos"], out / "shards", shard_max_count=16)
    print(f"[demo] {len(photos)} photos -> {report.accepted} accepted ({report.duplicates} already there), "
          f"{len(report.shards)} new shard(s) in {out / 'shards'}")

    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(args.config, [f"data.shards={out / 'shards'}", f"run.dir={run_dir}", *args.overrides])
    summary = pretrain(cfg)
    export = export_backbone(run_dir, out / "backbone.safetensors", num_classes=1000)

    metrics = run_dir / "metrics.jsonl"
    start_loss, end_loss = _mean_loss(metrics, True), _mean_loss(metrics, False)
    print()
    print("[demo] summary")
    print(f"  images seen        {summary['images_seen']} ({summary['step']} steps)")
    print(f"  loss start -> end  {start_loss:.4f} -> {end_loss:.4f} (mean of the first/last 10 steps)")
    print(f"  throughput         {summary['images_per_s']:.1f} images/s (multi-crop, all ranks)")
    print(f"  checkpoint         {summary['checkpoint']}")
    print(f"  export             {export['out']} (+ {export['sidecar']})")
    print(f"  metrics            {metrics}  (tensorboard --logdir {run_dir / 'tensorboard'})")
    print(f"  plot               {summary['plot']}  (loss, LR, images/s against steps; `seer plot {run_dir}`)")
    print(f"  total time         {time.monotonic() - started:.0f} s")
    if not end_loss < start_loss:
        print("[demo] the loss did not go down")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
