"""``seer plot RUN_DIR``: one PNG of a run from its ``metrics.jsonl``.

Six panels against steps: training loss, learning rate, images/s, where the run was evaluated
(``eval.every_steps``) kNN accuracy (with the features' effective rank on a second axis), and
the training monitor's health numbers (``monitor.every_steps``): the batch's backbone-feature and head-embedding
RankMe with the alarm threshold, and their std of L2-normalised embeddings x sqrt(D) (1: no
collapse), any collapse alarm as a red line; and the method's own (SwAV: prototypes the codes
use; MoCo v3: positive and negative similarity). Written atomically to ``RUN_DIR/run.png`` (or ``out``) at the end of ``seer pretrain``
and on demand. matplotlib runs headless (Agg).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from data_pipeline.storage import atomic_write_bytes


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


RANK_LINES = (("health/rank", "backbone features"), ("health/head_rank", "head embeddings"))
STD_LINES = (("health/std_ratio", "features: std x sqrt(D)"), ("health/head_std_ratio", "head: std x sqrt(D)"))
METHOD_LINES = (("health/swav_prototypes_used", "SwAV: prototypes used by the batch"),
                ("health/mocov3_positive_similarity", "MoCo v3: query-own key cosine"),
                ("health/mocov3_negative_similarity", "MoCo v3: query-other keys cosine"))


def _monitor_config(run_dir: Path) -> dict:
    """The ``monitor`` section of the run's config.yaml (empty if there is none)."""
    import yaml

    try:
        return dict(yaml.safe_load((run_dir / "config.yaml").read_text())["monitor"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return {}


def _health_panels(records: list[dict], monitor: dict, axis, method_axis) -> None:
    """Batch RankMe (left axis) with the alarm threshold, std ratios (right axis), the method's
    numbers, and collapse alarms as red vertical lines."""
    from seer.engine.monitor import rank_threshold

    for ax, title in ((axis, "feature health of the training batch"), (method_axis, "method health")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    drawn = [key for key, _ in RANK_LINES + METHOD_LINES if _series(records, key)[0]]
    for ax, lines in ((axis, RANK_LINES), (method_axis, METHOD_LINES)):
        for key, label in lines:
            if key in drawn:
                ax.plot(*_series(records, key), lw=1, label=label)
    steps, ranks = _series(records, "health/rank")
    if steps and "min_rank" in monitor:
        fractions = _series(records, "health/rank_fraction")[1]
        limit = [rank_threshold(monitor["min_rank"], monitor["min_rank_fraction"], r / f) for r, f in zip(ranks, fractions)]
        axis.plot(steps, limit, ":", color="tab:red", lw=1, label="alarm below")
    axis.set_ylabel("effective rank (RankMe) of the batch")
    if steps:
        twin = axis.twinx()
        for (key, label), color in zip(STD_LINES, ("tab:green", "tab:olive")):
            twin.plot(*_series(records, key), "--", lw=1, color=color, label=label)
        twin.set_ylim(0, 1.1)
        twin.set_ylabel("std of L2-normalised x sqrt(D) (1: no collapse)")
        twin.legend(loc="upper right", fontsize=8)
    alarms = [int(r["step"]) for r in records if "collapse alarm" in str(r.get("event", ""))]
    for step in alarms:
        for ax in (axis, method_axis):
            ax.axvline(step, color="tab:red", lw=1.5)
    if alarms:
        axis.text(alarms[0], 0.95, " collapse alarm", color="tab:red", transform=axis.get_xaxis_transform(), va="top")
    if not drawn:
        axis.text(0.5, 0.5, "no health numbers\n(monitor.every_steps = 0)", ha="center", va="center",
                  transform=axis.transAxes, color="gray")
    for ax in (axis, method_axis):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left" if ax is axis else "best", fontsize=8)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    knn_keys = sorted({k for r in records for k in r if k.startswith("eval/knn")})
    figure, axes = plt.subplots(3, 2, figsize=(11, 10), constrained_layout=True)
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
    _health_panels(records, _monitor_config(run_dir), axes.flat[4], axes.flat[5])
    figure.suptitle(str(run_dir))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    out = Path(out) if out else run_dir / "run.png"
    atomic_write_bytes(out, buffer.getvalue())
    return out
