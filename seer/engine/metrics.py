"""Where a run's numbers go: ``metrics.jsonl``, TensorBoard events, and a progress display.

Only rank 0 writes. On a terminal, progress is a tqdm bar with step, loss, images/s and ETA;
otherwise (Slurm logs, CI) it is one plain log line every ``log_every`` steps.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("seer")


def setup_logging(run_dir: Path, rank: int) -> None:
    """Log lines to stderr (rank 0) and to ``run.dir/logs/rank<r>.log`` (every rank)."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        if getattr(handler, "_seer", False):
            root.removeHandler(handler)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._seer = True  # type: ignore[attr-defined]
        root.addHandler(handler)


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, start_step: int, max_steps: int, log_every: int):
        self.enabled = enabled
        self.max_steps = max_steps
        self.log_every = log_every
        self.start_step = start_step
        self.started = time.monotonic()
        self.images = 0
        self.first_loss: float | None = None  # of this session's steps (a resumed run: since the resume)
        self.last_loss: float | None = None
        self._bar = None
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def images_per_second(self) -> float:
        return self.images / max(time.monotonic() - self.started, 1e-9)

    def log_step(self, step: int, images: int, scalars: dict[str, float]) -> None:
        """``step`` is the number of completed steps; ``images`` those seen by all ranks this step."""
        self.images += images
        if "loss" in scalars:
            self.last_loss = float(scalars["loss"])
            self.first_loss = self.last_loss if self.first_loss is None else self.first_loss
        if not self.enabled:
            return
        rate = self.images_per_second()
        record = {"step": step, "time": time.time(), "images_per_s": rate, **scalars}
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in scalars.items():
            self._tb.add_scalar(key, value, step)
        self._tb.add_scalar("images_per_s", rate, step)
        steps_done = step - self.start_step
        eta = (self.max_steps - step) * (time.monotonic() - self.started) / max(steps_done, 1)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}", img_s=f"{rate:.1f}")
        elif step % self.log_every == 0 or step == self.max_steps:
            log.info(
                "step %d/%d loss %.4f lr %.4g %.1f img/s eta %s",
                step,
                self.max_steps,
                scalars.get("loss", float("nan")),
                scalars.get("lr", float("nan")),
                rate,
                time.strftime("%H:%M:%S", time.gmtime(eta)),
            )

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Numbers that are not per training step (evaluation): one JSON line and TensorBoard."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        for key, value in scalars.items():
            self._tb.add_scalar(key, value, step)
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))

    def event(self, message: str, step: int) -> None:
        log.warning("step %d: %s", step, message)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, "time": time.time(), "event": message}) + "\n")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
