"""Per-particle state that training changes: poses found by the pose search (``distdrgn
abinit``) or refined by gradient (``model.pose_refine=true``, cryoDRGN's ``--do-pose-sgd``), and
the z of an autodecoder (``model.encoder=autodecoder``: each particle's z is a learned row, not
the output of an image encoder; cryoDRGN-AI's conformation table), or the one-hot class of a
multi-class ab initio (``abinit.classes``: set by the search, not learned).

The table holds, for every particle of the store, its current rotation and shift (and z) and
the state of its own optimizer. Each epoch every particle is trained on by exactly one rank (the
data order of :mod:`distdrgn.loader`), so a rank only ever reads and writes the rows of the
particles in its own batches: the poses are never all-reduced, and a step costs no
communication beyond the model's gradients.

Refinement is on the manifold: the batch's rotations are ``R @ exp([w]x)`` and its shifts
``t + dt`` with ``w`` (radians) and ``dt`` (pixels) zero-initialised leaves that the loss is
differentiated against; after the model's optimizer step each row takes one Adam step of its
own (moments per particle, as cryoDRGN's sparse pose embedding, with short memories: :data:`BETAS`) and the correction is folded
into ``R`` and ``t``. A particle is updated once per epoch, so Adam's first steps move it by
about ``lr`` per epoch: ``model.pose_lr_rot`` / ``model.pose_lr_trans`` are in radians and
pixels per epoch. An autodecoder's z rows are leaves of the step in the same way (z drawn
from N(0, ``model.z_init_std``^2) at the start, seeded by ``train.seed``), with their own Adam
moments and ``model.z_lr`` per epoch.

State on disk (``pose_state/TAG/rank{r}.npz``, TAG = ``epoch.E`` or ``step.E.C``): rank 0
writes every row, every other rank the rows it changed since the table was last loaded. Read
back in rank order, later files overriding, that is the complete state at the checkpoint,
whatever the number of ranks that wrote it or reads it. The same files carry the rows from
one epoch's owners to the next one's (:meth:`ParticleTable.exchange`).
"""

from __future__ import annotations

import io
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from distdrgn.checkpoint import _atomic_write
from distdrgn.errors import DistdrgnError
from distdrgn.objective import Batch
from distdrgn.so3_grid import so3_exp
from distdrgn.support_prior import SupportPrior

STATE_DIR = "pose_state"
# A particle is updated once per epoch, a few dozen times in a run: moments that remember
# ~2 and ~10 updates (not Adam's usual 10 and 1000) let the first, shift-dominated gradients be
# forgotten; with (0.9, 0.999) the rotations of a 5-degree perturbation did not improve in 10
# updates against a fixed, exact map, with these they went from 4.3 to 1.8 degrees.
BETAS = (0.5, 0.9)
EPS = 1e-8
_POSE_FIELDS = ("rots", "trans", "m", "v", "count")
_Z_FIELDS = ("z", "z_m", "z_v", "z_count")


@dataclass
class StepLeaves:
    """The learnable leaves of one step: rows (B,); pose corrections w (B, 3) radians and dt
    (B, 2) pixels (None unless refining); the rows' z (B, zdim) (None without an autodecoder)."""

    rows: torch.Tensor
    w: torch.Tensor | None
    dt: torch.Tensor | None
    z: torch.Tensor | None


class ParticleTable:
    """Rotations (n, 3, 3), shifts (n, 2) (fractions of the box D, as poses.pkl) and per-row
    Adam moments (n, 5) of all n particles of the store, on ``device``; with ``zdim`` > 0 also
    the autodecoder's z (n, zdim) and their moments.

    ``searcher(batch, z, current) -> (rots (B, 3, 3), trans (B, 2), z (B, zdim) or None)``: the
    pose search (z: the rows' z (B, zdim), None without an autodecoder; current: the rows'
    rotations and shifts; it returns the rows' new z when it chooses them: classes); while
    :attr:`searching`, each batch's poses are searched before its step (and the row's
    optimizer state restarts). ``classes`` = C > 1: z (zdim = C) is each particle's one-hot
    class, drawn at random at the start (seeded by ``seed``), then set by the search only.
    While :attr:`refining`, the batch's poses carry learnable corrections. ``poses_learned``:
    the poses are the run's own (searched or refined), so each epoch writes them as
    ``poses.N.pkl``.
    """

    def __init__(self, rots: torch.Tensor, trans: torch.Tensor, D: int, device, *, lr_rot: float, lr_trans: float,
                 searcher: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None,
                 poses_learned: bool = True, zdim: int = 0, lr_z: float = 0.0, z_init_std: float = 0.1,
                 seed: int = 0, classes: int = 1):
        n = rots.shape[0]
        self.D, self.device = D, torch.device(device)
        self.rots = rots.to(self.device, torch.float32).contiguous()
        self.trans = trans.to(self.device, torch.float32).contiguous()
        self.m = torch.zeros(n, 5, device=self.device)
        self.v = torch.zeros(n, 5, device=self.device)
        self.count = torch.zeros(n, device=self.device)
        self.changed = torch.zeros(n, dtype=torch.bool, device=self.device)  # since the last load
        self.lr = torch.tensor([lr_rot] * 3 + [lr_trans] * 2, device=self.device)
        self.searcher = searcher
        self.poses_learned = poses_learned
        self.searching = False
        self.refining = False
        self.loss_weight: torch.Tensor | None = None  # (n_masked,) 0/1: the lattice points the loss counts
        self.support_prior: SupportPrior | None = None  # added to the loss while searching (distdrgn.support_prior)
        if classes > 1 and zdim != classes:
            raise ValueError(f"{classes} classes need zdim = {classes} (one-hot rows), got {zdim}")
        self.zdim = zdim
        self.z_learned = classes <= 1
        self._fields = _POSE_FIELDS
        if zdim:
            g = torch.Generator().manual_seed(seed)  # the same table on every rank and every start
            if classes > 1:
                self.z = torch.eye(classes)[torch.randint(classes, (n,), generator=g)].to(self.device)
            else:
                self.z = (torch.randn(n, zdim, generator=g) * z_init_std).to(self.device)
            self.z_m = torch.zeros(n, zdim, device=self.device)
            self.z_v = torch.zeros(n, zdim, device=self.device)
            self.z_count = torch.zeros(n, device=self.device)
            self.lr_z = lr_z
            self._fields = _POSE_FIELDS + _Z_FIELDS
        self._leaves: StepLeaves | None = None

    @property
    def n(self) -> int:
        return self.rots.shape[0]

    # ---- the step ----------------------------------------------------------------------

    def batch(self, batch: Batch) -> tuple[Batch, torch.Tensor | None]:
        """(``batch`` with its poses from the table, the rows' z (B, zdim) or None): poses
        searched first while searching, with learnable corrections while refining; z a leaf
        of the step with an autodecoder (then :meth:`step_unless` must follow the backward),
        the search's one-hot class with classes."""
        rows = batch.indices.to(self.device)
        z = self.z[rows].clone() if self.zdim else None
        if self.searching:
            rots, trans, found_z = self.searcher(batch, None if z is None else z.detach(),
                                                 (self.rots[rows], self.trans[rows]))
            self.rots[rows], self.trans[rows] = rots.float(), trans.float()
            if found_z is not None:
                self.z[rows] = z = found_z.to(self.z.dtype)
            for state in (self.m, self.v, self.count):  # a new pose: its optimizer starts afresh
                state[rows] = 0
            self.changed[rows] = True
        rots, trans = self.rots[rows], self.trans[rows]
        w = dt = None
        if self.refining:
            w = torch.zeros(len(rows), 3, device=self.device, requires_grad=True)
            dt = torch.zeros(len(rows), 2, device=self.device, requires_grad=True)
            rots, trans = rots @ so3_exp(w), trans + dt / self.D
        learned_z = z.requires_grad_(True) if z is not None and self.z_learned else None
        if w is not None or learned_z is not None:
            self._leaves = StepLeaves(rows, w, dt, learned_z)
        return Batch(batch.indices, batch.images, rots, trans, batch.ctf), z

    @torch.no_grad()
    def step_unless(self, nonfinite: torch.Tensor) -> None:
        """One Adam step on the rows of the batch from their leaves' gradients, skipped (on the
        device, no wait) when ``nonfinite`` says the step was."""
        leaves, self._leaves = self._leaves, None
        if leaves is None:
            return
        rows, skipped = leaves.rows, nonfinite > 0  # 0-d: the whole step was skipped or not
        if leaves.w is not None:
            g = torch.cat([_grad(leaves.w), _grad(leaves.dt)], 1)  # (B, 5)
            delta, m, v, count = _adam(g, self.m[rows], self.v[rows], self.count[rows], self.lr)
            rots = self.rots[rows] @ so3_exp(delta[:, :3].double()).float()  # radians, then pixels
            trans = self.trans[rows] + delta[:, 3:] / self.D
            for state, new in ((self.rots, rots), (self.trans, trans), (self.m, m), (self.v, v), (self.count, count)):
                state[rows] = torch.where(skipped, state[rows], new)
        if leaves.z is not None:
            delta, m, v, count = _adam(_grad(leaves.z), self.z_m[rows], self.z_v[rows], self.z_count[rows], self.lr_z)
            for state, new in ((self.z, self.z[rows] + delta), (self.z_m, m), (self.z_v, v), (self.z_count, count)):
                state[rows] = torch.where(skipped, state[rows], new)
        self.changed[rows] = True

    # ---- results and state ---------------------------------------------------------------

    def poses(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(rots (N, 3, 3), trans (N, 2)) float32 numpy of ``rows`` (default: all)."""
        rots, trans = self.rots.cpu().numpy(), self.trans.cpu().numpy()
        return (rots, trans) if rows is None else (rots[rows], trans[rows])

    def latents(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The autodecoder's z (N, zdim) float32 numpy of ``rows`` (default: all)."""
        z = self.z.cpu().numpy()
        return z if rows is None else z[rows]

    def save(self, out_dir: Path, tag: str, rank: int, world_size: int, barrier) -> dict:
        """Write this rank's part of the state as ``pose_state/TAG/rank{r}.npz`` (all ranks
        call; returns the checkpoint's reference to it once every rank's file is written)."""
        folder = Path(out_dir) / STATE_DIR / tag
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
        barrier()
        rows = torch.arange(self.n, device=self.device) if rank == 0 else torch.nonzero(self.changed).squeeze(1)
        arrays = {"rows": rows.cpu().numpy(), **{f: getattr(self, f)[rows].cpu().numpy() for f in self._fields}}
        _atomic_write(folder / f"rank{rank}.npz", lambda fh: np.savez(fh, **arrays))
        barrier()
        return {"folder": f"{STATE_DIR}/{tag}", "ranks": world_size}

    def load(self, out_dir: Path, ref: dict) -> None:
        """Replace the state with the one ``ref`` (from :meth:`save`) points to."""
        folder = Path(out_dir) / ref["folder"]
        for r in range(ref["ranks"]):
            path = folder / f"rank{r}.npz"
            try:
                with np.load(path) as data:
                    rows = torch.from_numpy(data["rows"]).to(self.device)
                    for f in self._fields:
                        getattr(self, f)[rows] = torch.from_numpy(data[f]).to(self.device)
            except (OSError, KeyError, ValueError) as exc:
                raise DistdrgnError(f"{path}: the pose state of this checkpoint cannot be read ({exc}); "
                                    "move the run's newest checkpoint aside to resume from an earlier one") from None
        self.changed.zero_()

    def exchange(self, out_dir: Path, tag: str, rank: int, world_size: int, barrier) -> dict:
        """End of an epoch: save, then (several ranks) read back, so that every rank holds
        every row, including those the other ranks changed. Returns the state's reference."""
        ref = self.save(out_dir, tag, rank, world_size, barrier)
        if world_size > 1:
            self.load(out_dir, ref)
        self.changed.zero_()
        return ref


def _grad(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(t) if t.grad is None else t.grad


def _adam(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, count: torch.Tensor, lr):
    """One per-row Adam step with :data:`BETAS`: gradients g (B, k), moments (B, k), counts (B,)
    -> (delta (B, k), new m, new v, new count)."""
    m = BETAS[0] * m + (1 - BETAS[0]) * g
    v = BETAS[1] * v + (1 - BETAS[1]) * g * g
    count = count + 1
    m_hat = m / (1 - BETAS[0] ** count)[:, None]
    v_hat = v / (1 - BETAS[1] ** count)[:, None]
    return -lr * m_hat / (v_hat.sqrt() + EPS), m, v, count


def write_poses_pkl(path: Path, rots: np.ndarray, trans: np.ndarray) -> None:
    """cryoDRGN's ``poses.pkl`` (a pickle of (rots (N, 3, 3), trans (N, 2) fractions)), atomically."""
    buf = io.BytesIO()
    pickle.dump((np.ascontiguousarray(rots, np.float32), np.ascontiguousarray(trans, np.float32)), buf)
    _atomic_write(Path(path), lambda fh: fh.write(buf.getvalue()))


def prune_states(out_dir: Path, keep: set[str]) -> None:
    """Delete the ``pose_state/`` folders no checkpoint refers to (rank 0, after a checkpoint)."""
    root = Path(out_dir) / STATE_DIR
    if not root.is_dir():
        return
    for folder in root.iterdir():
        if folder.is_dir() and f"{STATE_DIR}/{folder.name}" not in keep:
            shutil.rmtree(folder, ignore_errors=True)
