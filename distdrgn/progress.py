"""What a person watching a training run sees: the console, ``run.log``, ``loss.csv`` /
``loss.png`` and the Prometheus gauges.

Rank 0 logs to ``run.log`` and stderr (``distdrgn.train``), and writes the step-level
progress lines to run.log only (``distdrgn.train.progress``). On a terminal the epoch shows a
tqdm bar; when stderr is not a terminal (a batch job's log file) it gets a plain progress
line every ``interval_s`` seconds instead of thousands of bar redraws.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from distdrgn.objective import per_image_loss

log = logging.getLogger("distdrgn.train")
progress_log = logging.getLogger("distdrgn.train.progress")  # run.log only (the console has the bar)


def setup_logging(out_dir: Path, is_main: bool) -> None:
    """Rank 0: ``log`` to run.log and stderr, ``progress_log`` to run.log only; others: warnings."""
    for logger in (log, progress_log):
        logger.setLevel(logging.INFO if is_main else logging.WARNING)
        logger.propagate = False
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
    if is_main:
        fh = logging.FileHandler(out_dir / "run.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        for logger in (log, progress_log):
            logger.addHandler(fh)
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(sh)


class EpochProgress:
    """Rank 0's view of one epoch: the bar (or plain lines), run.log lines every ``log_every``
    steps, and the Prometheus gauges. Other ranks only count into the metrics (none)."""

    def __init__(self, epoch: int, n: int, start: int, n_steps: int, *, is_main: bool, log_every: int, n_masked: int,
                 metrics=None, device: torch.device | None = None, interval_s: float = 30.0):
        self.epoch, self.n, self.n_steps, self.is_main = epoch, n, n_steps, is_main
        self.log_every, self.n_masked, self.metrics, self.device = log_every, n_masked, metrics, device
        self.done = start
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=n, initial=start, desc=f"epoch {epoch}", unit="img", disable=not (is_main and self.tty),
                        dynamic_ncols=True, leave=False)
        self.interval_s = interval_s
        self.t_log = self.t_line = time.perf_counter()
        self.images_since_log = 0

    def update(self, step: int, global_images: int, terms, beta: float, step_seconds: float, data_seconds: float):
        """After step ``step`` (0-based) of ``global_images`` images over all ranks."""
        metrics = self.metrics
        self.images_since_log += global_images
        self.done += global_images
        self.bar.update(global_images)
        if metrics:
            metrics.images.inc(global_images)
            metrics.step_seconds.set(step_seconds)
            metrics.data_wait_seconds.set(data_seconds)
        now = time.perf_counter()
        if self.is_main and not self.tty and now - self.t_line >= self.interval_s:
            print(f"epoch {self.epoch}: {self.done}/{self.n} images ({100 * self.done / max(self.n, 1):.0f}%)",
                  file=sys.stderr, flush=True)
            self.t_line = now
        last = step == self.n_steps - 1
        if not self.is_main or not ((step + 1) % self.log_every == 0 or last):
            return
        rate = self.images_since_log / max(now - self.t_log, 1e-9)
        kl = float(terms.kl)  # a host read, every log_every steps only
        loss = float(per_image_loss(terms.mse, terms.kl, beta, self.n_masked))
        eta = (self.n - self.done) / max(rate, 1e-9)
        self.bar.set_postfix(loss=f"{loss:.4g}", kl=f"{kl:.3g}", refresh=False)
        progress_log.info("epoch %d step %d/%d: %.1f img/s, loss %.5g, KL %.4g, ETA %.0fs", self.epoch, step + 1,
                          self.n_steps, rate, loss, kl, eta)
        if metrics:
            metrics.images_per_second.set(rate)
            metrics.loss.set(loss)
            metrics.mse.set(float(terms.mse))
            metrics.kl.set(kl)
            metrics.epoch.set(self.epoch)
            if self.device is not None and self.device.type == "cuda":
                metrics.gpu_memory.set(torch.cuda.max_memory_allocated(self.device))
        self.t_log, self.images_since_log = now, 0

    def close(self) -> None:
        self.bar.close()


class LossTable:
    """``loss.csv`` (one row per epoch, appended by rank 0) and its plot ``loss.png``."""

    COLUMNS = ["epoch", "loss", "mse", "kl", "beta", "images", "seconds", "images_per_second"]

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / "loss.csv"

    def append(self, row: dict) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as fh:
            w = csv.DictWriter(fh, self.COLUMNS)
            if new:
                w.writeheader()
            w.writerow(row)

    def rows(self) -> list[dict[str, str]]:
        """The rows written so far, as ``csv`` reads them (strings); [] before the first epoch."""
        if not self.path.exists():
            return []
        with open(self.path, newline="") as fh:
            return list(csv.DictReader(fh))

    def truncate(self, last_epoch: int) -> None:
        """Drop rows after ``last_epoch`` (left by an interrupted run) before resuming."""
        if not self.path.exists():
            return
        rows = [r for r in self.rows() if int(r["epoch"]) <= last_epoch]
        with open(self.path, "w", newline="") as fh:
            w = csv.DictWriter(fh, self.COLUMNS)
            w.writeheader()
            w.writerows(rows)

    def plot(self) -> None:
        """loss.png from loss.csv (the analysis module's plot), written atomically."""
        from distdrgn.analysis.plots import plot_loss

        tmp = self.path.with_name(".loss.png.tmp.png")
        if plot_loss(self.path, tmp) is not None:
            os.replace(tmp, self.path.with_name("loss.png"))
