"""Epoch plans and the batch loader over a particle store.

An epoch's visiting order is a pure function of ``(seed, epoch, world_size)``
(:func:`plan_epoch`), so any rank can compute any other rank's batches, and a resumed run
sees exactly the data an uninterrupted one would:

1. The store's chunks are permuted with ``default_rng([seed, epoch])`` and laid end to end
   into one sequence of all N images.
2. That sequence is cut into ``world_size`` contiguous segments of ``floor`` or ``ceil`` of
   ``N / W`` images; rank ``r`` takes segment ``r``. Each rank therefore reads whole chunks
   with large sequential reads (plus at most two partial chunks at its segment ends), and
   every particle is seen exactly once per epoch across ranks. (Dealing chunks out as
   ``r, r + W, ...`` instead would leave ranks with unequal image counts whenever the last
   chunk is partial or W does not divide the number of chunks.)
3. A rank's segment is read in windows of ``window_chunks`` chunks; the images of a window
   are shuffled with ``default_rng([seed, epoch, rank, window])``. Memory is bounded by a
   few windows, never the dataset.
4. Every rank runs the same number of steps ``S = ceil(ceil(N / W) / B)``; rank r's batches
   hold ``B`` images except at the end of its segment (the last one may be smaller, or
   empty on a rank with one image fewer). The training loss weights each rank's summed
   per-image loss by ``W / (images in this step over all ranks)``, so DDP's gradient
   average is exactly the mean over the global batch (:func:`distdrgn.objective.vae_loss`).

Reading is done by a ``torch.utils.data.DataLoader`` over windows (``num_workers``
processes, each opening the store itself); batches are cut from windows in the main
process. :func:`iterate_batches` takes ``start_step`` so a later mid-epoch resume only has
to skip whole windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from distdrgn.objective import Batch


@dataclass(frozen=True)
class Piece:
    """Images ``[start, stop)`` (store positions) of chunk ``chunk``."""

    chunk: int
    start: int
    stop: int


@dataclass(frozen=True)
class EpochPlan:
    """One rank's share of one epoch."""

    seed: int
    epoch: int
    rank: int
    world_size: int
    shuffle: bool
    windows: tuple[tuple[Piece, ...], ...]  # this rank's windows, in visiting order
    batch_sizes: np.ndarray  # (n_steps, world_size) images per step on every rank

    @property
    def n_steps(self) -> int:
        return int(self.batch_sizes.shape[0])

    @property
    def n_images(self) -> int:
        """Images this rank sees in the epoch."""
        return int(self.batch_sizes[:, self.rank].sum())

    def loss_weight(self, step: int) -> float:
        """``W / global batch`` of ``step``: makes DDP's gradient mean the global-batch mean."""
        return self.world_size / max(int(self.batch_sizes[step].sum()), 1)

    def window_positions(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(natural, perm): store positions of window ``w`` in chunk order, and the shuffle.

        The visiting order of the window is ``natural[perm]``.
        """
        natural = np.concatenate([np.arange(p.start, p.stop, dtype=np.int64) for p in self.windows[w]])
        if not self.shuffle:
            return natural, np.arange(natural.size)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, w])
        return natural, rng.permutation(natural.size)

    def order(self) -> np.ndarray:
        """(n_images,) store positions in this rank's visiting order for the epoch."""
        parts = [nat[perm] for nat, perm in (self.window_positions(w) for w in range(len(self.windows)))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def plan_epoch(
    chunk_ranges: list[tuple[int, int]],
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    batch_size: int,
    window_chunks: int = 4,
    shuffle: bool = True,
) -> EpochPlan:
    """Plan rank ``rank``'s batches of ``epoch`` (see the module docstring).

    chunk_ranges: ``[(start, stop)]`` store positions of each chunk (``store.chunk_range``).
    ``shuffle=False`` keeps the store order (for encoding latents).
    """
    n_chunks = len(chunk_ranges)
    perm = np.random.default_rng([seed, epoch]).permutation(n_chunks) if shuffle else np.arange(n_chunks)
    sizes = np.array([chunk_ranges[c][1] - chunk_ranges[c][0] for c in perm], dtype=np.int64)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    n = int(ends[-1]) if n_chunks else 0
    seg = [n * r // world_size for r in range(world_size + 1)]
    a, b = seg[rank], seg[rank + 1]
    pieces = []
    for c, g0, g1 in zip(perm, starts, ends):
        lo, hi = max(a, int(g0)), min(b, int(g1))
        if lo < hi:
            c0 = chunk_ranges[c][0]
            pieces.append(Piece(int(c), c0 + lo - int(g0), c0 + hi - int(g0)))
    windows = tuple(tuple(pieces[i : i + window_chunks]) for i in range(0, len(pieces), window_chunks))
    per_rank = np.diff(seg)
    n_steps = math.ceil(int(per_rank.max()) / batch_size) if n else 0
    steps = np.arange(n_steps)[:, None] * batch_size
    batch_sizes = np.clip(per_rank[None, :] - steps, 0, batch_size).astype(np.int64)
    return EpochPlan(seed, epoch, rank, world_size, shuffle, windows, batch_sizes)


class WindowDataset(Dataset):
    """Item ``w`` = (positions (k,) int64, images (k, D, D) float32) of window ``w``, shuffled.

    The store is opened lazily in each worker process (from its path and level).
    """

    def __init__(self, store_path: str, level: int | None, plan: EpochPlan):
        self.store_path = str(store_path)
        self.level = level
        self.plan = plan
        self._store = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None
        return state

    def __len__(self) -> int:
        return len(self.plan.windows)

    def _open(self):
        if self._store is None:
            from distdrgn.store import ParticleStore

            self._store = ParticleStore.open(self.store_path, level=self.level)
        return self._store

    def image_size(self) -> int:
        return self._open().D

    def __getitem__(self, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        store = self._open()
        blocks = []
        for piece in self.plan.windows[w]:
            c0, _ = store.chunk_range(piece.chunk)
            chunk = store.read_chunk(piece.chunk)
            blocks.append(chunk[piece.start - c0 : piece.stop - c0])
        natural, perm = self.plan.window_positions(w)
        images = np.concatenate(blocks)[perm]
        return torch.from_numpy(natural[perm]), torch.from_numpy(np.ascontiguousarray(images))


@dataclass
class Metadata:
    """Per-particle poses and CTF held in memory (small: 36 + 8 + 36 bytes per particle)."""

    rots: np.ndarray  # (n, 3, 3) float32
    trans: np.ndarray | None  # (n, 2) float32
    ctf: np.ndarray | None  # (n, 9) float32

    @classmethod
    def from_store(cls, store) -> "Metadata":
        poses = store.poses
        if poses is None:
            from distdrgn.errors import StoreError

            raise StoreError(f"{store.path}: the store has no poses; training needs poses (ingest with --poses)")
        rots, trans = poses
        return cls(np.asarray(rots, np.float32), None if trans is None else np.asarray(trans, np.float32), store.ctf)

    def batch(self, positions: torch.Tensor, images: torch.Tensor) -> Batch:
        idx = positions.numpy()

        def take(a):
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a[idx], dtype=np.float32))

        return Batch(positions, images, take(self.rots), take(self.trans), take(self.ctf))


def iterate_batches(
    dataset: WindowDataset, meta: Metadata, *, num_workers: int = 0, pin_memory: bool = False, start_step: int = 0
) -> Iterator[Batch]:
    """Yield the plan's batches on this rank (exactly ``plan.n_steps`` of them, from ``start_step``).

    Windows before the one holding ``start_step``'s first image are not read.
    """
    plan = dataset.plan
    sizes = plan.batch_sizes[:, plan.rank]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    window_sizes = [sum(p.stop - p.start for p in win) for win in plan.windows]
    window_starts = np.concatenate([[0], np.cumsum(window_sizes)]).astype(np.int64)
    first_image = int(offsets[start_step]) if plan.n_steps else 0
    first_window = max(int(np.searchsorted(window_starts, first_image, side="right")) - 1, 0)
    subset = torch.utils.data.Subset(dataset, range(first_window, len(dataset)))
    loader = DataLoader(
        subset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers else None,
    )
    buf_pos = torch.zeros(0, dtype=torch.int64)
    buf_img: torch.Tensor | None = None
    skip = first_image - int(window_starts[first_window]) if len(plan.windows) else 0
    step = start_step
    for pos, img in loader:
        if skip:
            pos, img, skip = pos[skip:], img[skip:], 0
        buf_pos = torch.cat([buf_pos, pos])
        buf_img = img if buf_img is None or len(buf_img) == 0 else torch.cat([buf_img, img])
        while step < plan.n_steps and len(buf_pos) >= sizes[step]:
            k = int(sizes[step])
            yield meta.batch(buf_pos[:k], buf_img[:k])
            buf_pos, buf_img = buf_pos[k:], buf_img[k:]
            step += 1
    while step < plan.n_steps:  # a rank with one image fewer ends with an empty batch
        if buf_img is None:  # this rank got no images at all (N < world size)
            D = dataset.image_size()
            buf_img = torch.zeros((0, D, D), dtype=torch.float32)
        yield meta.batch(buf_pos[:0], buf_img[:0])
        step += 1
