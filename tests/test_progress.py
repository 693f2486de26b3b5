"""What a person sees during training (distdrgn.progress): plain lines instead of a bar in a
log file, loss.csv rows, run.log lines."""

import csv
import io
import logging

import torch

from distdrgn.objective import LossTerms
from distdrgn.progress import EpochProgress, LossTable


def terms():
    return LossTerms(loss=torch.tensor(1.0), mse=torch.tensor(0.5), kl=torch.tensor(2.0))


def test_not_a_terminal_gets_plain_lines_not_bar_redraws(monkeypatch):
    err = io.StringIO()  # not a TTY, as a batch job's log file
    monkeypatch.setattr("sys.stderr", err)
    clock = iter(range(0, 10_000, 10))  # each reading of the clock is 10 s later
    monkeypatch.setattr("time.perf_counter", lambda: float(next(clock)))
    p = EpochProgress(1, 1000, 0, 10, is_main=True, log_every=1000, n_masked=100, interval_s=30.0)
    for step in range(10):
        p.update(step, 100, terms(), 0.1, 0.01, 0.0)
    p.close()
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue()
    assert 2 <= len(lines) <= 4 and lines[-1].startswith("epoch 1: ") and lines[-1].endswith("%)")
    assert all(line.startswith("epoch 1: ") and "images" in line for line in lines)


def test_run_log_line_uses_the_objective_and_other_ranks_stay_quiet(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("distdrgn.train.progress")
    handler = Keep()
    monkeypatch.setattr(logger, "handlers", [handler])  # only this test's handler, whatever ran before
    monkeypatch.setattr(logger, "propagate", False)
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not the attribute: it clears the logger's level cache
    try:
        p = EpochProgress(2, 64, 0, 2, is_main=True, log_every=1, n_masked=100)
        p.update(0, 32, terms(), 0.1, 0.01, 0.0)
        quiet = EpochProgress(2, 64, 0, 2, is_main=False, log_every=1, n_masked=100)
        quiet.update(0, 32, terms(), 0.1, 0.01, 0.0)
    finally:
        logger.setLevel(level)
    assert len(records) == 1 and "epoch 2 step 1/2" in records[0]
    assert "loss 0.502" in records[0]  # mse + beta * kl / n_masked = 0.5 + 0.1 * 2 / 100


def test_loss_table_appends_and_truncates(tmp_path):
    table = LossTable(tmp_path)
    for epoch in (1, 2, 3):
        table.append({"epoch": epoch, "loss": 1.0 / epoch, "mse": 0.1, "kl": 1.0, "beta": 0.1, "images": 10,
                      "seconds": 1.0, "images_per_second": 10.0})
    table.truncate(2)
    with open(tmp_path / "loss.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and list(rows[0]) == LossTable.COLUMNS
