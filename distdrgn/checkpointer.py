"""The training run's checkpointer: finds the checkpoint to resume from, checks that it
belongs to this run, decides when to save, and saves.

File formats and the data position live in :mod:`distdrgn.checkpoint`; this module adds the
policy and the collective parts: rank 0 reads and writes, the engine's state is gathered from
every rank (DeepSpeed ZeRO partitions), and the epoch's running totals are summed over ranks.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from distdrgn.checkpoint import (
    DataPosition,
    file_offset,
    load_latest,
    load_weights,
    remove_stale_temporaries,
    save_step_checkpoint,
    save_weights,
    save_z,
)
from distdrgn.errors import DistdrgnError
from distdrgn.runtime import Runtime

log = logging.getLogger("distdrgn.train")
progress_log = logging.getLogger("distdrgn.train.progress")


def find_checkpoint(out_dir: Path, rt: Runtime) -> tuple[dict | None, Path | None]:
    """The newest readable checkpoint of ``out_dir`` on every rank (rank 0 chooses, falling
    back past damaged ones, and removes temporaries left by interrupted writes)."""
    ckpt = path = None
    if rt.is_main:
        for tmp in remove_stale_temporaries(out_dir):
            log.info("removed %s (left by an interrupted write)", tmp.name)
        ckpt, path = load_latest(out_dir, warn=log.warning)
    if rt.distributed:
        box = [None if path is None else str(path)]
        dist.broadcast_object_list(box, src=0)
        if not rt.is_main and box[0] is not None:
            path = Path(box[0])
            ckpt = load_weights(path)
    return ckpt, path


def check_resumable(ckpt: dict, path: Path, out_dir: Path, *, model_info, store, keep: np.ndarray | None) -> None:
    """Refuse to continue a run with another model, box, store or ``data.ind`` subset, or a
    distdrgn 0.1 run directory (its epochs are numbered from 0)."""
    from distdrgn.model import ModelInfo

    if file_offset(out_dir):
        raise DistdrgnError(f"{out_dir}: written by distdrgn 0.1 (epochs numbered from 0); its files can be read "
                            f"(eval-vol, analyze, encode) but training does not continue it: use a new output.dir, "
                            f"with train.load={path} to start from its weights")
    theirs = ModelInfo(**ckpt["model_info"])
    if theirs.D != store.D:
        raise DistdrgnError(f"{out_dir}: the run was trained at box {theirs.D} but {store.path} gives box {store.D}; "
                            f"train on a box-{theirs.D} store or level, or use a new output.dir")
    if theirs != model_info:
        raise DistdrgnError(f"{out_dir}: the run was started with another model or box size; use a new output.dir")
    if (ckpt.get("subset") or {}).get("n") != (None if keep is None else len(keep)):
        raise DistdrgnError(f"{out_dir}: the run was started with another data.ind subset "
                            f"({(ckpt.get('subset') or {}).get('path') or 'none'}); use a new output.dir")
    if int(ckpt["store"]["n"]) != store.n:
        raise DistdrgnError(f"{out_dir}: the run was started on a store of {ckpt['store']['n']} images, "
                            f"{store.path} has {store.n}; use a new output.dir")


def copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class Checkpointer:
    """Saves ``weights.N.pkl`` / ``z.N.pkl`` every ``every_epochs`` epochs (and after the
    last), and ``checkpoints/step.E.C.pkl`` every ``every_steps`` steps (0 = never) and when
    a stop is requested. ``contents``: what every checkpoint holds besides the engine's state
    (model_info, preprocess, config, store, subset). With a per-particle table (abinit, pose
    refinement, autodecoder) every checkpoint also points to the table's state
    (``pose_state/``), and each epoch checkpoint of learned poses writes ``poses.N.pkl`` of the
    ``rows`` (the trained particles)."""

    def __init__(self, out_dir: Path, rt: Runtime, engine, contents: dict, *, every_epochs: int, every_steps: int,
                 metrics=None, table=None, rows: np.ndarray | None = None):
        self.out_dir, self.rt, self.engine, self.contents = Path(out_dir), rt, engine, contents
        self.every_epochs, self.every_steps, self.metrics = every_epochs, every_steps, metrics
        self.table, self.rows = table, rows
        self._recent_states: list[str] = []  # table-state folders of the newest checkpoints

    def epoch_due(self, epoch: int, last: bool) -> bool:
        return last or epoch % self.every_epochs == 0

    def step_due(self, step: int, consumed: int, n: int) -> bool:
        """After step ``step`` (0-based), with ``consumed`` of the epoch's ``n`` images done;
        never at the epoch's end, which the epoch checkpoint covers."""
        return bool(self.every_steps) and (step + 1) % self.every_steps == 0 and consumed < n

    def _payload(self, pose_state: dict | None) -> dict | None:
        """The checkpoint dict on rank 0 (None elsewhere); every rank must call it."""
        states = self.engine.state_dict()  # collective under DeepSpeed ZeRO (gathers partitions)
        if not self.rt.is_main:
            return None
        return {**states, **self.contents, **({"pose_state": pose_state} if pose_state else {})}

    def exchange_table(self, epoch: int) -> dict | None:
        """End of every epoch: the per-particle table's rows go to disk and back, so that each
        rank holds the rows the others changed (:meth:`ParticleTable.exchange`). Every rank calls."""
        if self.table is None:
            return None
        return self.table.exchange(self.out_dir, f"epoch.{epoch}", self.rt.rank, self.rt.world_size, self.rt.barrier)

    def save_epoch(self, epoch: int, zs: tuple[np.ndarray, np.ndarray] | None, final: bool,
                   pose_state: dict | None = None) -> None:
        """weights.N.pkl (+ z.N.pkl, poses.N.pkl); with ``final`` also weights.pkl / z.pkl /
        poses.pkl. ``pose_state``: what :meth:`exchange_table` returned. Every rank calls."""
        payload = self._payload(pose_state)
        if self.rt.is_main:
            if pose_state is not None and self.table.poses_learned:
                from distdrgn.particle_table import write_poses_pkl

                write_poses_pkl(self.out_dir / f"poses.{epoch}.pkl", *self.table.poses(self.rows))
            save_weights(self.out_dir / f"weights.{epoch}.pkl", {"epoch": epoch, **payload})
            if zs is not None:
                save_z(self.out_dir / f"z.{epoch}.pkl", *zs)
            self._prune_pose_states(pose_state)
            if final:
                self.finish(epoch)
        if self.metrics:
            self.metrics.checkpoint_written()

    def finish(self, epoch: int) -> None:
        """weights.pkl / z.pkl / poses.pkl: copies of the last epoch's files (rank 0)."""
        copy_atomic(self.out_dir / f"weights.{epoch}.pkl", self.out_dir / "weights.pkl")
        for stem in ("z", "poses"):
            if (self.out_dir / f"{stem}.{epoch}.pkl").exists():
                copy_atomic(self.out_dir / f"{stem}.{epoch}.pkl", self.out_dir / f"{stem}.pkl")

    def save_step(self, epoch: int, consumed: int, sums: torch.Tensor, seconds: float) -> None:
        """checkpoints/step.E.C.pkl at ``consumed`` images of ``epoch``; ``sums``: this rank's
        running totals (summed over ranks here). Every rank calls."""
        totals = sums.clone()
        if self.rt.distributed:
            dist.all_reduce(totals)
        pose_state = None
        if self.table is not None:  # every rank writes its rows before rank 0 writes the checkpoint
            pose_state = self.table.save(self.out_dir, f"step.{epoch}.{consumed}", self.rt.rank, self.rt.world_size,
                                         self.rt.barrier)
        payload = self._payload(pose_state)
        if self.rt.is_main:
            position = DataPosition(epoch, consumed, tuple(totals.tolist()), seconds)
            path = save_step_checkpoint(self.out_dir, position, payload)
            self._prune_pose_states(pose_state)
            progress_log.info("epoch %d: %d images, wrote %s", epoch, consumed, path.relative_to(self.out_dir))
        if self.metrics:
            self.metrics.checkpoint_written()

    def _prune_pose_states(self, pose_state: dict | None) -> None:
        """Keep the pose states of the newest checkpoints (those a resume can fall back to)."""
        if pose_state is None:
            return
        from distdrgn.checkpoint import KEEP_STEP_CHECKPOINTS
        from distdrgn.particle_table import prune_states

        self._recent_states = [s for s in self._recent_states if s != pose_state["folder"]] + [pose_state["folder"]]
        self._recent_states = self._recent_states[-(KEEP_STEP_CHECKPOINTS + 2):]
        prune_states(self.out_dir, set(self._recent_states))
