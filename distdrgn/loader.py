"""Streaming data over a particle store: the epoch's global order and each rank's batches.

Training (:class:`GlobalOrder`, :class:`StepSchedule`, :func:`stream_batches`)
----------------------------------------------------------------------------------
The order in which an epoch visits the N images is a pure function of ``(seed, epoch)``
(given the store's chunking and ``train.shuffle_chunks`` = K); it does not depend on the
number of processes:

1. the store's chunks are permuted with ``default_rng([seed, epoch])``;
2. the permuted chunks are grouped into windows of K consecutive chunks, and the images of
   window ``w`` are shuffled with ``default_rng([seed, epoch, w])``;
3. the windows laid end to end are the global sequence ``sigma`` (length N).

Training consumes ``sigma`` from the front in global steps. With W processes of B images
each, a step starting at position ``c`` (images of the epoch consumed so far) takes
``G = min(W * B, N - c)`` images ``sigma[c : c + G]``; after it ``c += G``. The state of the
data stream is therefore one integer per epoch: a checkpoint records ``(epoch, c)`` and a
restart with *any* world size (or batch size) continues at ``sigma[c]``, so no image is
repeated or skipped.

Within a step the G images are split between ranks so that each rank reads few chunks: the
step's images are sorted (stably) by their chunk's place in the permuted sequence and rank
``r`` takes the ``[G r / W, G (r + 1) / W)`` slice of that list. Batch sizes are equal (B)
except in the epoch's last step, where they differ by at most one. Which rank processes an
image does not change the gradient: each rank's summed per-image loss is weighted by
``W / G`` (:meth:`StepSchedule.loss_weight`), so DDP's mean is the mean over the step.

Reading (:func:`stream_batches`): a rank knows in advance which chunks it needs and at which
step it needs each for the last time. ``DataLoader`` workers read those chunks whole (one
large sequential read each, in order of first use); the main process keeps a chunk until its
last step and cuts batches from the chunks it holds, into pinned memory on CUDA. Memory is
bounded by about one window plus one step of images and the loader's prefetch, whatever N.
A rank reads every chunk it takes an image from; with shuffling within windows, a chunk at a
boundary between two ranks' slices is read by both, so the bytes read per epoch over all
ranks are about ``1 + W / K`` times the dataset when a window spans several steps (small
``W * B``) and about ``1 + C / B`` (C images per chunk) when a step spans several windows;
``benchmarks/loader_memory.py`` measures it.

:class:`DevicePrefetcher` copies the next batch to the GPU on a side stream while the current
step runs (CUDA; on CPU it only moves batches). The Hartley transform and normalisation run
on the device in :func:`distdrgn.objective.prepare_targets`.

Encoding (:func:`plan_epoch`, :class:`WindowDataset`, :func:`iterate_batches`)
-------------------------------------------------------------------------------
Latents are computed in store order: :func:`plan_epoch` with ``shuffle=False`` cuts the store
into W contiguous segments of ``floor``/``ceil`` of ``N / W`` images, rank ``r`` takes segment
``r`` (read in windows of chunks), and the segments gathered in rank order are the store
order (:mod:`distdrgn.encode`). With ``shuffle=True`` the chunks are first permuted and each
window shuffled (a world-size-dependent order, kept for tests and tools that want a rank's
segment of a shuffled epoch).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

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
    def from_store(cls, store) -> Metadata:
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


# ---------------------------------------------------------------------------------------
# Training: the global order, global steps, and each rank's stream of batches
# ---------------------------------------------------------------------------------------


class GlobalOrder:
    """The epoch's visiting order ``sigma`` of all N images (module docstring, steps 1-3).

    A pure function of ``(seed, epoch)``, the store's chunks and ``window_chunks``. Windows
    are computed on demand (a few are cached), so memory is O(window), not O(N).
    """

    def __init__(self, chunk_ranges: list[tuple[int, int]], *, seed: int, epoch: int, window_chunks: int = 4):
        self.seed, self.epoch, self.window_chunks = int(seed), int(epoch), int(window_chunks)
        self.chunk_ranges = [(int(a), int(b)) for a, b in chunk_ranges]
        self.chunks = np.random.default_rng([self.seed, self.epoch]).permutation(len(chunk_ranges))  # (n_chunks,)
        sizes = np.array([self.chunk_ranges[c][1] - self.chunk_ranges[c][0] for c in self.chunks], dtype=np.int64)
        self.chunk_offsets = np.concatenate([[0], np.cumsum(sizes)])  # sigma position of each permuted chunk
        self.n = int(self.chunk_offsets[-1])
        n_windows = -(-len(self.chunks) // self.window_chunks)
        self.window_offsets = self.chunk_offsets[np.minimum(np.arange(n_windows + 1) * self.window_chunks,
                                                            len(self.chunks))]
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def chunk_start(self, seq: int) -> int:
        """Store position of the first image of the ``seq``-th chunk of the permuted sequence."""
        return self.chunk_ranges[int(self.chunks[seq])][0]

    def window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions (m,), seq (m,)): store positions of window ``w`` in sigma order, and the
        index in the permuted chunk sequence of the chunk holding each."""
        if w not in self._cache:
            first, stop = w * self.window_chunks, min((w + 1) * self.window_chunks, len(self.chunks))
            natural = np.concatenate([np.arange(*self.chunk_ranges[int(self.chunks[q])], dtype=np.int64)
                                      for q in range(first, stop)])
            seq = np.repeat(np.arange(first, stop, dtype=np.int64), np.diff(self.chunk_offsets[first : stop + 1]))
            perm = np.random.default_rng([self.seed, self.epoch, w]).permutation(natural.size)
            if len(self._cache) >= 3:
                self._cache.pop(next(iter(self._cache)))
            self._cache[w] = (natural[perm], seq[perm])
        return self._cache[w]

    def take(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """``sigma[lo:hi]`` as (positions, seq) (see :meth:`window`)."""
        parts_p, parts_s = [], []
        w = max(int(np.searchsorted(self.window_offsets, lo, side="right")) - 1, 0)
        while lo < hi:
            pos, seq = self.window(w)
            a, b = lo - int(self.window_offsets[w]), min(hi, int(self.window_offsets[w + 1])) - int(self.window_offsets[w])
            parts_p.append(pos[a:b])
            parts_s.append(seq[a:b])
            lo = int(self.window_offsets[w + 1])
            w += 1
        if not parts_p:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(parts_p), np.concatenate(parts_s)

    def order(self) -> np.ndarray:
        """(N,) the whole of sigma (store positions); for tests and small stores."""
        return self.take(0, self.n)[0]


@dataclass(frozen=True)
class StepSchedule:
    """Global steps of W x B images over ``sigma[start:n]`` (module docstring)."""

    n: int  # images in the epoch
    start: int  # images of the epoch consumed before the first step (resume position)
    world_size: int
    batch_size: int  # per rank

    @property
    def n_steps(self) -> int:
        return -(-(self.n - self.start) // (self.world_size * self.batch_size))

    def bounds(self, step: int) -> tuple[int, int]:
        """``[lo, hi)`` of sigma consumed by ``step`` (0-based from ``start``)."""
        lo = self.start + step * self.world_size * self.batch_size
        return lo, min(lo + self.world_size * self.batch_size, self.n)

    def global_batch(self, step: int) -> int:
        lo, hi = self.bounds(step)
        return hi - lo

    def rank_count(self, step: int, rank: int) -> int:
        g = self.global_batch(step)
        return g * (rank + 1) // self.world_size - g * rank // self.world_size

    def loss_weight(self, step: int) -> float:
        """``W / G``: makes DDP's gradient mean the mean over the step's G images."""
        return self.world_size / max(self.global_batch(step), 1)

    def rank_slice(self, order: GlobalOrder, step: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions, seq) of the images rank ``rank`` trains on in ``step``: the rank's share
        of the step's images sorted by chunk (so a rank touches few chunks)."""
        lo, hi = self.bounds(step)
        pos, seq = order.take(lo, hi)
        by_chunk = np.argsort(seq, kind="stable")
        g = hi - lo
        mine = by_chunk[g * rank // self.world_size : g * (rank + 1) // self.world_size]
        return pos[mine], seq[mine]


class ChunkDataset(Dataset):
    """Item ``j`` = (seq, images (k, D, D) float32) of the ``j``-th chunk a rank reads.

    ``reads`` lists indices into ``order.chunks``. The store is opened lazily in each worker
    process; every item is one whole-chunk read.
    """

    def __init__(self, store_path: str, level: int | None, order: GlobalOrder, reads: list[int]):
        self.store_path, self.level, self.order, self.reads = str(store_path), level, order, reads
        self._store = None

    def __getstate__(self):
        return {**self.__dict__, "_store": None}

    def __len__(self) -> int:
        return len(self.reads)

    def __getitem__(self, j: int) -> tuple[int, torch.Tensor]:
        if self._store is None:
            from distdrgn.store import ParticleStore

            self._store = ParticleStore.open(self.store_path, level=self.level)
        seq = self.reads[j]
        return seq, torch.from_numpy(self._store.read_chunk(int(self.order.chunks[seq])))


def plan_reads(order: GlobalOrder, schedule: StepSchedule, rank: int) -> tuple[list[int], dict[int, int]]:
    """The chunks (seq indices) ``rank`` needs, in order of first use, and each one's last step.

    O(steps) time, O(chunks) memory.
    """
    reads: list[int] = []
    last_step: dict[int, int] = {}
    for step in range(schedule.n_steps):
        for q in np.unique(schedule.rank_slice(order, step, rank)[1]).tolist():
            if q not in last_step:
                reads.append(q)
            last_step[q] = step
    return reads, last_step


def stream_batches(
    store_path: str,
    level: int | None,
    order: GlobalOrder,
    schedule: StepSchedule,
    rank: int,
    meta: Metadata,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    stats: dict | None = None,
) -> Iterator[Batch]:
    """Yield rank ``rank``'s batch of every step of ``schedule`` (``schedule.n_steps`` batches).

    A batch may be empty (the epoch's last step when it has fewer images than ranks).
    ``stats``, if given, receives ``chunks_read``, ``images_read`` and ``max_held_images``.
    """
    reads, last_step = plan_reads(order, schedule, rank)
    dataset = ChunkDataset(store_path, level, order, reads)
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                        prefetch_factor=2 if num_workers else None)
    chunks = iter(loader)
    held: dict[int, torch.Tensor] = {}  # seq -> the chunk's images, until its last step
    counts = {"chunks_read": 0, "images_read": 0, "max_held_images": 0}
    D = None
    for step in range(schedule.n_steps):
        pos, seq = schedule.rank_slice(order, step, rank)
        needed = np.unique(seq).tolist()
        for q in needed:
            while q not in held:  # chunks arrive in order of first use
                got, images = next(chunks)
                held[int(got)] = images
                counts["chunks_read"] += 1
                counts["images_read"] += len(images)
        counts["max_held_images"] = max(counts["max_held_images"], sum(len(t) for t in held.values()))
        if D is None:
            D = next(iter(held.values())).shape[-1] if held else dataset_image_size(store_path, level)
        out = torch.empty((len(pos), D, D), dtype=torch.float32, pin_memory=pin_memory)
        for q in needed:
            rows = np.flatnonzero(seq == q)
            out[torch.from_numpy(rows)] = held[q][torch.from_numpy(pos[rows] - order.chunk_start(q))]
            if last_step[q] == step:
                del held[q]
        yield meta.batch(torch.from_numpy(pos), out)
    if stats is not None:
        stats.update(counts)


def dataset_image_size(store_path: str, level: int | None) -> int:
    from distdrgn.store import ParticleStore

    return ParticleStore.open(store_path, level=level).D


class DevicePrefetcher:
    """Iterate batches already on ``device``: on CUDA the next batch is copied on a side
    stream (from pinned memory) while the current step runs; on CPU batches pass through."""

    def __init__(self, batches: Iterator[Batch], device: torch.device):
        self.batches = iter(batches)
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._next = self._load()

    def _load(self) -> Batch | None:
        batch = next(self.batches, None)
        if batch is None or self.stream is None:
            return None if batch is None else batch.to(self.device)
        with torch.cuda.stream(self.stream):
            return batch.to(self.device, non_blocking=True)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        batch = self._next
        if batch is None:
            raise StopIteration
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for t in (batch.indices, batch.images, batch.rots, batch.trans, batch.ctf):
                if t is not None:
                    t.record_stream(current)  # the side stream's allocator must not reuse it early
        self._next = self._load()
        return batch
