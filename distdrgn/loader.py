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

Encoding (:class:`GlobalOrder` with ``shuffle=False``, :class:`SegmentSchedule`)
------------------------------------------------------------------------------------
Subsets (``data.ind``, cryoDRGN ``--ind``): with ``keep`` (sorted store positions) each
chunk holds only its kept images; the steps above run unchanged over the kept images (N is
their number), so a chunk without kept images is never read.

Latents are computed in store order through the same reader: with ``shuffle=False`` sigma is
the store order (chunks in order, no shuffle within windows), and :class:`SegmentSchedule`
gives rank ``r`` the contiguous segment ``sigma[N r / W : N (r + 1) / W]`` (sizes differ by
at most one image), cut into batches of B from its start. Each chunk is read whole, once per
rank whose segment it overlaps; the segments gathered in rank order are the store order
(:mod:`distdrgn.encode`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from distdrgn.objective import Batch


@dataclass
class Metadata:
    """Per-particle poses and CTF held in memory (small: 36 + 8 + 36 bytes per particle)."""

    rots: np.ndarray | None  # (n, 3, 3) float32 (None: a store without poses, for abinit)
    trans: np.ndarray | None  # (n, 2) float32
    ctf: np.ndarray | None  # (n, 9) float32

    @classmethod
    def from_store(cls, store, need_poses: bool = True) -> Metadata:
        """``need_poses=False`` (the poses come from elsewhere: abinit) accepts a store without."""
        poses = store.poses
        if poses is None and not need_poses:
            return cls(None, None, store.ctf)
        if poses is None:
            from distdrgn.errors import StoreError

            raise StoreError(f"{store.path}: the store has no poses; training needs poses (ingest with --poses, "
                             "or find them with `distdrgn abinit`)")
        rots, trans = poses
        return cls(np.asarray(rots, np.float32), None if trans is None else np.asarray(trans, np.float32), store.ctf)

    def batch(self, positions: torch.Tensor, images: torch.Tensor) -> Batch:
        idx = positions.numpy()

        def take(a):
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a[idx], dtype=np.float32))

        return Batch(positions, images, take(self.rots), take(self.trans), take(self.ctf))


class GlobalOrder:
    """The epoch's visiting order ``sigma`` of all N images (module docstring, steps 1-3).

    A pure function of ``(seed, epoch)``, the store's chunks and ``window_chunks``. Windows
    are computed on demand (a few are cached), so memory is O(window), not O(N).
    ``shuffle=False`` gives the store order (sigma = 0..N-1, whatever the seed and epoch).
    """

    def __init__(self, chunk_ranges: list[tuple[int, int]], *, seed: int, epoch: int, window_chunks: int = 4,
                 shuffle: bool = True, keep: np.ndarray | None = None):
        self.seed, self.epoch, self.window_chunks = int(seed), int(epoch), int(window_chunks)
        self.shuffle = bool(shuffle)
        self.chunk_ranges = [(int(a), int(b)) for a, b in chunk_ranges]
        n_chunks = len(self.chunk_ranges)
        self.chunks = (np.random.default_rng([self.seed, self.epoch]).permutation(n_chunks) if self.shuffle
                       else np.arange(n_chunks))  # (n_chunks,) the chunks in visiting order
        self.keep = None if keep is None else np.asarray(keep, dtype=np.int64)  # sorted store positions (data.ind)
        sizes = np.array([self._count(c) for c in self.chunks], dtype=np.int64)
        self.chunk_offsets = np.concatenate([[0], np.cumsum(sizes)])  # sigma position of each permuted chunk
        self.n = int(self.chunk_offsets[-1])
        n_windows = -(-len(self.chunks) // self.window_chunks)
        self.window_offsets = self.chunk_offsets[np.minimum(np.arange(n_windows + 1) * self.window_chunks,
                                                            len(self.chunks))]
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _bounds(self, chunk: int) -> tuple[int, int]:
        """[i, j) of ``keep`` inside store chunk ``chunk``."""
        a, b = self.chunk_ranges[chunk]
        return int(np.searchsorted(self.keep, a)), int(np.searchsorted(self.keep, b))

    def _count(self, chunk: int) -> int:
        a, b = self.chunk_ranges[chunk] if self.keep is None else self._bounds(chunk)
        return b - a

    def members(self, chunk: int) -> np.ndarray:
        """Store positions that store chunk ``chunk`` contributes, ascending: all, or the kept ones."""
        if self.keep is None:
            return np.arange(*self.chunk_ranges[chunk], dtype=np.int64)
        i, j = self._bounds(chunk)
        return self.keep[i:j]

    def chunk_start(self, seq: int) -> int:
        """Store position of the first image of the ``seq``-th chunk of the permuted sequence."""
        return self.chunk_ranges[int(self.chunks[seq])][0]

    def window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions (m,), seq (m,)): store positions of window ``w`` in sigma order, and the
        index in the permuted chunk sequence of the chunk holding each."""
        if w not in self._cache:
            first, stop = w * self.window_chunks, min((w + 1) * self.window_chunks, len(self.chunks))
            natural = np.concatenate([self.members(int(self.chunks[q])) for q in range(first, stop)])
            seq = np.repeat(np.arange(first, stop, dtype=np.int64), np.diff(self.chunk_offsets[first : stop + 1]))
            perm = (np.random.default_rng([self.seed, self.epoch, w]).permutation(natural.size) if self.shuffle
                    else np.arange(natural.size))
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


@dataclass(frozen=True)
class SegmentSchedule:
    """Each rank's contiguous segment of sigma, in batches of B (store-order encoding).

    Rank ``r`` takes ``sigma[n r / W : n (r + 1) / W]``; its step ``s`` is the ``s``-th run of
    B images of that segment. Every rank has :attr:`n_steps` steps; a rank whose segment is
    shorter ends with an empty batch. Same interface as :class:`StepSchedule` for
    :func:`plan_reads` and :func:`stream_batches`.
    """

    n: int  # images in sigma
    world_size: int
    batch_size: int  # per rank

    def segment(self, rank: int) -> tuple[int, int]:
        """``[lo, hi)`` of sigma that rank ``rank`` processes."""
        return self.n * rank // self.world_size, self.n * (rank + 1) // self.world_size

    @property
    def n_steps(self) -> int:
        longest = -(-self.n // self.world_size)  # segment sizes are floor or ceil of n / W
        return -(-longest // self.batch_size)

    def rank_slice(self, order: GlobalOrder, step: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions, seq) of rank ``rank``'s images in ``step``, in sigma order."""
        lo, hi = self.segment(rank)
        a = min(lo + step * self.batch_size, hi)
        return order.take(a, min(a + self.batch_size, hi))


class ChunkDataset(Dataset):
    """Item ``j`` = (seq, images (k, D, D) in the stored dtype) of the ``j``-th chunk a rank reads.

    float16 stores stay float16 until the training step converts them on the device: half
    the bytes through worker shared memory and the host-to-GPU copy, and no CPU conversion.

    ``reads`` lists indices into ``order.chunks``. The store is opened lazily in each worker
    process; every item is one whole-chunk read.
    """

    def __init__(self, store_path: str, level: int | None, order: GlobalOrder, reads: list[int],
                 verify_chunks: bool = True):
        self.store_path, self.level, self.order, self.reads = str(store_path), level, order, reads
        self.verify_chunks = verify_chunks  # check each chunk's crc32c (False: data.allow_unverified)
        self._store = None

    def __getstate__(self):
        return {**self.__dict__, "_store": None}

    def __len__(self) -> int:
        return len(self.reads)

    def __getitem__(self, j: int) -> tuple[int, torch.Tensor]:
        if self._store is None:
            from distdrgn.store import ParticleStore

            self._store = ParticleStore.open(self.store_path, level=self.level, verify_chunks=self.verify_chunks)
        seq = self.reads[j]
        return seq, torch.from_numpy(self._store.raw_chunk(int(self.order.chunks[seq])))


def plan_reads(order: GlobalOrder, schedule: StepSchedule | SegmentSchedule, rank: int) -> tuple[list[int], dict[int, int]]:
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
    schedule: StepSchedule | SegmentSchedule,
    rank: int,
    meta: Metadata,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    stats: dict | None = None,
    verify_chunks: bool = True,
    image_size: int | None = None,
) -> Iterator[Batch]:
    """Yield rank ``rank``'s batch of every step of ``schedule`` (``schedule.n_steps`` batches).

    A batch may be empty (the epoch's last step when it has fewer images than ranks).
    ``stats``, if given, receives ``chunks_read``, ``images_read`` and ``max_held_images``.
    The entry points for training and encoding are :func:`training_batches` and
    :func:`encoding_batches`.
    """
    reads, last_step = plan_reads(order, schedule, rank)
    dataset = ChunkDataset(store_path, level, order, reads, verify_chunks)
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                        prefetch_factor=2 if num_workers else None)
    chunks = iter(loader)
    held: dict[int, torch.Tensor] = {}  # seq -> the chunk's images, until its last step
    counts = {"chunks_read": 0, "images_read": 0, "max_held_images": 0}
    D, dtype = None, torch.float32
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
            if held:
                first = next(iter(held.values()))
                D, dtype = first.shape[-1], first.dtype
            else:  # no image on this rank yet (an empty first batch): the box from the caller or the store
                D = image_size or dataset_image_size(store_path, level)
        out = torch.empty((len(pos), D, D), dtype=dtype, pin_memory=pin_memory)
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


# ---- the two entry points: an epoch of training, and encoding in store order ------------


@dataclass(frozen=True)
class StepBatch:
    """One training step of one rank: its batch (on the device) and where the step is in the
    epoch's global order: images ``[lo, hi)`` of sigma, ``loss_weight`` = W / G."""

    step: int
    lo: int
    hi: int
    loss_weight: float
    batch: Batch


class EpochBatches:
    """Rank ``rank``'s steps of one epoch from image ``start`` of its global order on.

    Iterating yields a :class:`StepBatch` per step (``n_steps`` of them, the same number on
    every rank); ``n`` is the number of images of the epoch (the ``keep`` subset or all).
    """

    def __init__(self, store, meta: Metadata, *, seed: int, epoch: int, shuffle_chunks: int, start: int, rank: int,
                 world_size: int, batch_size: int, device: torch.device, keep: np.ndarray | None = None,
                 num_workers: int = 0, verify_chunks: bool = True):
        chunks = [store.chunk_range(c) for c in range(store.n_chunks)]
        self.order = GlobalOrder(chunks, seed=seed, epoch=epoch, window_chunks=shuffle_chunks, keep=keep)
        self.schedule = StepSchedule(self.order.n, start, world_size, batch_size)
        self._batches = DevicePrefetcher(
            stream_batches(str(store.path), store.D, self.order, self.schedule, rank, meta, num_workers=num_workers,
                           pin_memory=device.type == "cuda", verify_chunks=verify_chunks, image_size=store.D),
            device)

    @property
    def n(self) -> int:
        return self.schedule.n

    @property
    def start(self) -> int:
        return self.schedule.start

    @property
    def n_steps(self) -> int:
        return self.schedule.n_steps

    def __iter__(self) -> Iterator[StepBatch]:
        for step in range(self.schedule.n_steps):
            lo, hi = self.schedule.bounds(step)
            yield StepBatch(step, lo, hi, self.schedule.loss_weight(step), next(self._batches))


def training_batches(store, meta: Metadata, *, seed: int, epoch: int, shuffle_chunks: int, start: int, rank: int,
                     world_size: int, batch_size: int, device, keep: np.ndarray | None = None, num_workers: int = 0,
                     verify_chunks: bool = True) -> EpochBatches:
    """The training entry point: this rank's steps of ``epoch`` (module docstring, Training)."""
    return EpochBatches(store, meta, seed=seed, epoch=epoch, shuffle_chunks=shuffle_chunks, start=start, rank=rank,
                        world_size=world_size, batch_size=batch_size, device=torch.device(device), keep=keep,
                        num_workers=num_workers, verify_chunks=verify_chunks)


def encoding_batches(store, meta: Metadata, *, rank: int, world_size: int, batch_size: int, device,
                     keep: np.ndarray | None = None, num_workers: int = 0,
                     verify_chunks: bool = True) -> tuple[int, Iterator[Batch]]:
    """The encoding entry point: (n, batches) of rank ``rank``'s contiguous segment of the
    store order (module docstring, Encoding); n = images encoded over all ranks."""
    chunks = [store.chunk_range(c) for c in range(store.n_chunks)]
    order = GlobalOrder(chunks, seed=0, epoch=0, window_chunks=1, shuffle=False, keep=keep)
    schedule = SegmentSchedule(order.n, world_size, batch_size)
    device = torch.device(device)
    return order.n, DevicePrefetcher(
        stream_batches(str(store.path), store.D, order, schedule, rank, meta, num_workers=num_workers,
                       pin_memory=device.type == "cuda", verify_chunks=verify_chunks, image_size=store.D), device)
