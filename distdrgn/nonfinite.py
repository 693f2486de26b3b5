"""The non-finite guard: a step whose loss or any gradient is NaN/inf on any rank is skipped
by every rank, counted, logged with the store positions of its images, and after
``train.max_nonfinite_steps`` such steps in a row training stops with those particles named.

:func:`nonfinite_on_any_rank` is part of the sync-free step (it returns a device tensor);
:class:`NonfiniteGuard` reads that flag one step later, when the step's kernels are done.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from distdrgn.errors import DistdrgnError
from distdrgn.objective import Batch
from distdrgn.runtime import Runtime

log = logging.getLogger("distdrgn.train")


def nonfinite_on_any_rank(loss: torch.Tensor, model: torch.nn.Module, rt: Runtime) -> torch.Tensor:
    """1.0 if the loss or any gradient is non-finite on any rank, else 0.0 (0-d, on the device).

    Under DDP the gradients are already averaged, so one rank's NaN image poisons all ranks'
    gradients; the flag is still reduced so that all ranks skip together whatever the engine.
    """
    checks = [torch.isfinite(loss.detach()).all()]
    checks += [torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None]
    bad = (~torch.stack(checks).all()).to(torch.float32)
    if rt.distributed:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad


class NonfiniteGuard:
    """Books each step by its flag; every rank calls :meth:`record` for every step."""

    def __init__(self, rt: Runtime, max_in_a_row: int, metrics=None):
        self.rt, self.limit, self.metrics = rt, max_in_a_row, metrics
        self.streak: list[tuple[int, int, list[int], list[int]]] = []  # (epoch, step, positions, non-finite ones)

    def record(self, epoch: int, step: int, batch: Batch, nonfinite: torch.Tensor) -> None:
        """Book a step by its flag from the step (reading it waits for that step)."""
        if bool(nonfinite):
            self.step_skipped(epoch, step, batch)
        else:
            self.streak.clear()

    def step_skipped(self, epoch: int, step: int, batch: Batch) -> None:
        """Every rank calls it (the positions are gathered); raises DistdrgnError at the limit."""
        positions, bad = self.gather(batch)
        self.streak.append((epoch, step, positions, bad))
        if self.metrics:
            self.metrics.nonfinite_steps.inc()
        log.warning("epoch %d step %d: non-finite loss or gradient, step skipped (%d in a row); images with non-finite "
                    "pixels: %s; the step's images (store positions): %s", epoch, step, len(self.streak),
                    _short(bad), _short(positions))
        if len(self.streak) >= self.limit:
            first, last = self.streak[0], self.streak[-1]
            all_bad = sorted({i for *_, b in self.streak for i in b})
            all_positions = sorted({i for _, _, p, _ in self.streak for i in p})
            raise DistdrgnError(
                f"{len(self.streak)} consecutive steps had a non-finite loss or gradient (train.max_nonfinite_steps="
                f"{self.limit}; epoch {first[0]} step {first[1]} to epoch {last[0]} step {last[1]}): particles with "
                f"non-finite pixels {_short(all_bad)}, all particles of those steps {_short(all_positions)} (store "
                f"positions; see `distdrgn store verify`, or leave them out with ingest --ind)")

    def gather(self, batch: Batch) -> tuple[list[int], list[int]]:
        """(store positions of the step's images on all ranks, those with non-finite pixels), sorted."""
        finite = torch.isfinite(batch.images).flatten(1).all(1)
        mine = (batch.indices.cpu().tolist(), batch.indices[~finite].cpu().tolist())
        parts = [mine]
        if self.rt.distributed:
            parts = [None] * self.rt.world_size
            dist.all_gather_object(parts, mine)
        return sorted(i for p in parts for i in p[0]), sorted(i for p in parts for i in p[1])


def _short(values: list[int], keep: int = 20) -> str:
    """``[1, 2, 3]``, or the first ``keep`` and a count."""
    if len(values) <= keep:
        return f"[{', '.join(map(str, values))}]"
    return f"[{', '.join(map(str, values[:keep]))}, ... ({len(values)} in all)]"
