"""The ``debug`` config section at run time: a per-process trace of the samples trained on,
and a delay after each step. Both are off by default and cost nothing then.

``debug.trace_samples=DIR``: each process appends to ``DIR/samples.PID.jsonl`` one line when
it starts (its resume point, rank, world size, the torchrun attempt, host and node rank) and
one line per step it trains (epoch, the data position of the step, the store positions of
its images). From the files of all processes of all attempts, the exactly-once property of
:mod:`distdrgn.loader` can be checked after kills, restarts and lost nodes
(``tests/test_fault_tolerance.py`` does). ``debug.step_delay_s=S`` sleeps S seconds after
every step, so that a fault drill can act on a run mid-epoch.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch

from distdrgn.config import DebugConfig


class DebugHooks:
    def __init__(self, cfg: DebugConfig, *, rank: int, world_size: int, resume: tuple[int, int]):
        self.delay = cfg.step_delay_s
        self.trace = None
        if cfg.trace_samples:
            folder = Path(cfg.trace_samples)
            folder.mkdir(parents=True, exist_ok=True)
            self.trace = open(folder / f"samples.{os.getpid()}.jsonl", "a")  # noqa: SIM115 (written every step)
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            self._write({"resume": list(resume), "time": time.time(), "rank": rank, "world_size": world_size,
                         "attempt": f"{os.environ.get('TORCHELASTIC_RUN_ID', f'pid{os.getpid()}')}/{restart}",
                         "restart": int(restart), "pid": os.getpid(), "host": socket.gethostname(),
                         "group_rank": int(os.environ.get("GROUP_RANK", "0"))})

    def _write(self, record: dict) -> None:
        self.trace.write(json.dumps(record) + "\n")
        self.trace.flush()  # a SIGKILLed process must leave every step it finished

    def after_step(self, epoch: int, consumed: int, indices: torch.Tensor) -> None:
        """``consumed``: the epoch's images before this step (the step's data position)."""
        if self.trace is not None:
            self._write({"epoch": epoch, "lo": consumed, "ids": indices.tolist()})
        if self.delay:
            time.sleep(self.delay)

    def close(self) -> None:
        if self.trace is not None:
            self.trace.close()
            self.trace = None
