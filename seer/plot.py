"""``seer plot RUN_DIR``: one PNG of a run from its ``metrics.jsonl``.

Four panels against steps: training loss, learning rate, images/s and, where the run was
evaluated (``eval.every_steps``), kNN accuracy (with the features' effective rank on a second
axis). Written atomically to ``RUN_DIR/run.png`` (or ``out``) at the end of ``seer pretrain``
and on demand. matplotlib runs headless (Agg).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from data_pipeline.shards import atomic_write_bytes


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a seer run folder?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut short by a crash
            continue
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = {}
    for record in records:  # a resumed run logs some steps again: the last value wins
        if key in record and "step" in record:
            points[int(record["step"])] = float(record[key])
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    knn_keys = sorted({k for r in records for k in r if k.startswith("eval/knn")})
    figure, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    panels = [("loss", "training loss"), ("lr", "learning rate"), ("images_per_s", "images/s (all ranks)")]
    for axis, (key, title) in zip(axes.flat, panels):
        steps, values = _series(records, key)
        axis.plot(steps, values, lw=1)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axis = axes.flat[3]
    axis.set_title("kNN accuracy on labelled images (%)")
    axis.set_xlabel("step")
    axis.grid(alpha=0.3)
    for key in knn_keys:
        steps, values = _series(records, key)
        axis.plot(steps, values, "o-", label=key.split("/", 1)[1])
    steps, ranks = _series(records, "eval/effective_rank")
    if steps:
        twin = axis.twinx()
        twin.plot(steps, ranks, "s--", color="tab:gray", label="effective rank")
        twin.set_ylabel("effective rank of features")
        twin.legend(loc="lower right")
    if knn_keys:
        axis.legend(loc="upper left")
    else:
        axis.text(0.5, 0.5, "not evaluated\n(set eval.every_steps and eval.data)", ha="center", va="center",
                  transform=axis.transAxes, color="gray")
    figure.suptitle(str(run_dir))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    out = Path(out) if out else run_dir / "run.png"
    atomic_write_bytes(out, buffer.getvalue())
    return out
