"""Several ab initio attempts, and the run continued from the best (``abinit.attempts``).

Ab initio from few images can end on a wrong map, and which start does is a matter of the seed
(benchmarks/RESULTS.md, "What the collapse is"): a collapsed or stalled attempt fits its
images worse, so its training loss stays high. With ``abinit.attempts=K`` > 1,
:func:`run_attempts` runs K short ab initio runs that differ only in ``train.seed`` (seed,
seed + 1, ...), each ``abinit.attempt_epochs`` epochs of global search in
``output.dir/attempts/K``, and the run then starts from the weights of the attempt whose last
epoch had the lowest loss (``train.load``), searching again from the start of the radius
schedule. ``attempts/chosen.json`` records the losses and the choice.

Each attempt is an ordinary run directory (``run.log``, ``loss.csv``, ``weights.N.pkl``,
``poses.N.pkl``): an interrupted job resumes the attempt it was in when the same command runs
again, and finished attempts are not run again.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Callable

from distdrgn.config import Config
from distdrgn.errors import DistdrgnError
from distdrgn.progress import LossTable, setup_logging

log = logging.getLogger("distdrgn.train")


def attempt_config(cfg: Config, k: int) -> Config:
    """The config of attempt ``k`` (from 0): seed + k, only search epochs, in attempts/k; no
    final analysis, no metrics server (the run's own serves), no sample trace."""
    ab = cfg.abinit
    epochs = ab.attempt_epochs or ab.search_epochs
    return replace(
        cfg,
        output=replace(cfg.output, dir=str(Path(cfg.output.dir) / "attempts" / str(k))),
        train=replace(cfg.train, seed=cfg.train.seed + k, epochs=epochs, analyze=False),
        abinit=replace(ab, attempts=1, search_epochs=epochs),
        metrics=replace(cfg.metrics, port=None),
        debug=replace(cfg.debug, trace_samples=None),
    )


def final_loss(run_dir: Path) -> float:
    """The training loss of the last epoch in ``run_dir/loss.csv`` (+inf when not finite)."""
    rows = LossTable(run_dir).rows()
    if not rows:
        raise DistdrgnError(f"{run_dir}/loss.csv: no epochs recorded")
    value = float(rows[-1]["loss"])
    return value if math.isfinite(value) else math.inf


def choose_attempt(losses: list[float]) -> int:
    """Index of the lowest loss (the first of equal ones); non-finite losses count as +inf."""
    clean = [v if math.isfinite(v) else math.inf for v in losses]
    return min(range(len(clean)), key=lambda i: (clean[i], i))


def run_attempts(cfg: Config, rt, run: Callable[[Config], Path]) -> Config:
    """Run (or resume) the attempts with ``run(config)`` (training with the pose search) and
    return the run's config, starting from the best attempt's weights."""
    out = Path(cfg.output.dir)
    dirs = [run(attempt_config(cfg, k)) for k in range(cfg.abinit.attempts)]
    rt.barrier()  # rank 0 has written the last attempt's loss.csv; every rank reads the same files
    losses = [final_loss(d) for d in dirs]
    best = choose_attempt(losses)
    if rt.is_main:
        record = {"losses": losses, "seeds": [cfg.train.seed + k for k in range(len(dirs))], "chosen": best,
                  "weights": str(dirs[best] / "weights.pkl")}
        (out / "attempts" / "chosen.json").write_text(json.dumps(record, indent=2) + "\n")
    setup_logging(out, rt.is_main)
    log.info("abinit.attempts: final losses %s (train.seed %d..%d); continuing from attempt %d (train.seed %d)",
             ", ".join(f"{v:.5g}" for v in losses), cfg.train.seed, cfg.train.seed + len(dirs) - 1, best,
             cfg.train.seed + best)
    return replace(cfg, train=replace(cfg.train, load=str(dirs[best] / "weights.pkl")))
