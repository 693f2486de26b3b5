import numpy as np
import pytest
import torch

from distdrgn.loader import (
    DevicePrefetcher,
    GlobalOrder,
    Metadata,
    SegmentSchedule,
    StepSchedule,
    plan_reads,
    stream_batches,
)


def ranges(sizes):
    ends = np.cumsum(sizes)
    return [(int(e - s), int(e)) for s, e in zip(sizes, ends)]


@pytest.fixture(scope="module")
def store(small_dataset):
    from distdrgn.store import ParticleStore

    return ParticleStore.open(small_dataset["store"])


# ---- training: the world-size-independent global order and each rank's stream ----------



def consume(order, n, start, world, batch, stop=None):
    """Run the schedule from ``start``; returns [(lo, hi, [rank positions...])] up to ``stop``."""
    sched = StepSchedule(n, start, world, batch)
    out = []
    for s in range(sched.n_steps):
        lo, hi = sched.bounds(s)
        if stop is not None and lo >= stop:
            break
        out.append((lo, hi, [sched.rank_slice(order, s, r)[0] for r in range(world)]))
    return out


@pytest.mark.parametrize("sizes, window", [([50] * 7 + [13], 2), ([32] * 6, 4), ([7], 1), ([64] * 5, 3)])
def test_global_order_does_not_depend_on_the_world_size(sizes, window):
    chunks = ranges(sizes)
    n = sum(sizes)
    order = GlobalOrder(chunks, seed=1, epoch=2, window_chunks=window)
    sigma = order.order()
    assert np.array_equal(np.sort(sigma), np.arange(n))
    assert np.array_equal(sigma, GlobalOrder(chunks, seed=1, epoch=2, window_chunks=window).order())
    if len(sizes) > 2:
        assert not np.array_equal(sigma, GlobalOrder(chunks, seed=1, epoch=3, window_chunks=window).order())
        assert not np.array_equal(sigma, GlobalOrder(chunks, seed=2, epoch=2, window_chunks=window).order())
    # shuffled within windows: the first window holds exactly its chunks' images
    first = order.window_offsets[1]
    assert {int(np.searchsorted(np.cumsum(sizes), p, side="right")) for p in sigma[:first]} == \
        set(order.chunks[:window].tolist())
    for world, batch in [(1, 16), (2, 16), (3, 7), (4, 5), (5, 100)]:
        steps = consume(order, n, 0, world, batch)
        for lo, hi, parts in steps:
            # each step consumes exactly sigma[lo:hi], split between ranks with sizes differing by <= 1
            assert np.array_equal(np.sort(np.concatenate(parts)), np.sort(sigma[lo:hi]))
            counts = [len(p) for p in parts]
            assert max(counts) - min(counts) <= 1 and (hi - lo < world * batch or counts == [batch] * world)
        assert steps[-1][1] == n and [s[0] for s in steps] == list(range(0, n, world * batch))


def test_resume_mid_epoch_with_another_world_size_repeats_and_skips_nothing():
    chunks = ranges([40] * 9 + [17])
    n = 377
    order = GlobalOrder(chunks, seed=7, epoch=0, window_chunks=3)
    before = consume(order, n, 0, 2, 10, stop=120)  # W=2: 6 steps, 120 images
    c = before[-1][1]
    after = consume(order, n, c, 3, 4)  # resumed with W=3, B=4 at image c
    seen = np.concatenate([p for _, _, parts in before + after for p in parts])
    assert len(seen) == n and np.array_equal(np.sort(seen), np.arange(n))
    assert np.array_equal(np.sort(np.concatenate([p for *_, parts in before for p in parts])),
                          np.sort(order.order()[:c]))
    assert after[0][0] == c


def test_a_rank_reads_each_chunk_once_and_few_of_them():
    chunks = ranges([64] * 32)
    order = GlobalOrder(chunks, seed=0, epoch=0, window_chunks=8)
    sched = StepSchedule(64 * 32, 0, 4, 16)
    reads = [plan_reads(order, sched, r)[0] for r in range(4)]
    for r in reads:
        assert len(r) == len(set(r))
    # sorting each step by chunk keeps a rank to about its quarter of each window, not all of it
    assert sum(len(r) for r in reads) <= 2.5 * 32


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_batches_hold_the_right_images_and_metadata(store, workers):
    chunks = [store.chunk_range(c) for c in range(store.n_chunks)]
    order = GlobalOrder(chunks, seed=3, epoch=1, window_chunks=2)
    meta = Metadata.from_store(store)
    rots, trans = store.poses
    seen = []
    for start in (0, 50):
        sched = StepSchedule(store.n, start, 2, 10)
        for rank in range(2):
            stats = {}
            batches = list(stream_batches(str(store.path), None, order, sched, rank, meta, num_workers=workers,
                                          stats=stats))
            assert len(batches) == sched.n_steps
            for s, b in enumerate(batches):
                assert np.array_equal(b.indices.numpy(), sched.rank_slice(order, s, rank)[0])
                np.testing.assert_array_equal(b.images.numpy(), store.images(b.indices.numpy()))
                np.testing.assert_array_equal(b.rots.numpy(), rots[b.indices.numpy()])
                np.testing.assert_array_equal(b.trans.numpy(), trans[b.indices.numpy()])
                np.testing.assert_array_equal(b.ctf.numpy(), store.ctf[b.indices.numpy()])
            assert stats["chunks_read"] <= store.n_chunks
            assert stats["max_held_images"] <= 3 * 2 * store.chunk_images  # about a window, never the dataset
            if start == 50:
                seen += [b.indices for b in batches]
    assert np.array_equal(np.sort(torch.cat(seen).numpy()), np.sort(order.order()[50:]))


def test_float16_store_batches_stay_float16_until_the_step(small_dataset, tmp_path):
    """Half the bytes through workers and the host-to-device copy; the step converts them."""
    from distdrgn.lattice import Lattice
    from distdrgn.objective import Preprocess, masked_hartley
    from distdrgn.store import ParticleStore, ingest

    path = ingest(small_dataset["particles.mrcs"], tmp_path / "f16.zarr", poses=small_dataset["poses.pkl"],
                  ctf=small_dataset["ctf.pkl"], dtype="float16", progress=False)
    store = ParticleStore.open(path)
    order = GlobalOrder([store.chunk_range(c) for c in range(store.n_chunks)], seed=0, epoch=0)
    batch = next(iter(stream_batches(str(path), None, order, StepSchedule(store.n, 0, 1, 8), 0,
                                     Metadata.from_store(store), num_workers=1)))
    assert batch.images.dtype == torch.float16
    np.testing.assert_array_equal(batch.images.float().numpy(), store.images(batch.indices.numpy()))
    prep, lattice = Preprocess(store.D), Lattice(store.D)
    torch.testing.assert_close(masked_hartley(batch.images, prep, lattice), masked_hartley(batch.images.float(), prep, lattice))


def test_device_prefetcher_on_cpu_passes_batches_through(store):
    chunks = [store.chunk_range(c) for c in range(store.n_chunks)]
    order = GlobalOrder(chunks, seed=0, epoch=0)
    sched = StepSchedule(store.n, 0, 1, 64)
    meta = Metadata.from_store(store)
    plain = list(stream_batches(str(store.path), None, order, sched, 0, meta))
    fetched = list(DevicePrefetcher(stream_batches(str(store.path), None, order, sched, 0, meta), torch.device("cpu")))
    assert len(plain) == len(fetched) == 3
    for a, b in zip(plain, fetched):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)


# ---- encoding: the store order, each rank a contiguous segment --------------------------


@pytest.mark.parametrize("sizes, world, batch", [([32] * 6, 1, 16), ([32] * 6, 2, 16), ([50] * 7 + [13], 3, 16),
                                                  ([10] * 3, 4, 4), ([7], 2, 16), ([3], 5, 2), ([64] * 5, 4, 5)])
def test_segments_cover_the_store_order_once_in_rank_order(sizes, world, batch):
    chunks = ranges(sizes)
    n = sum(sizes)
    order = GlobalOrder(chunks, seed=4, epoch=9, window_chunks=2, shuffle=False)
    assert np.array_equal(order.order(), np.arange(n))  # store order whatever the seed and epoch
    sched = SegmentSchedule(n, world, batch)
    segments = []
    for r in range(world):
        parts = [sched.rank_slice(order, s, r)[0] for s in range(sched.n_steps)]
        lo, hi = sched.segment(r)
        # full batches from the segment's start, then the rest, then (a shorter segment) an empty one
        expected = np.clip(hi - lo - batch * np.arange(sched.n_steps), 0, batch)
        assert [len(p) for p in parts] == expected.tolist()
        segments.append(np.concatenate(parts))
        assert np.array_equal(segments[-1], np.arange(lo, hi))  # contiguous, in store order
    assert np.array_equal(np.concatenate(segments), np.arange(n))  # every position once, ranks in order
    counts = [len(s) for s in segments]
    assert max(counts) - min(counts) <= 1
    # every chunk a rank touches is read once, and only the chunks its segment overlaps
    for r in range(world):
        reads = plan_reads(order, sched, r)[0]
        lo, hi = sched.segment(r)
        assert reads == [q for q, (a, b) in enumerate(chunks) if max(a, lo) < min(b, hi)]


@pytest.mark.parametrize("world", [1, 3])
def test_segment_stream_reads_whole_chunks_in_store_order(store, world):
    chunks = [store.chunk_range(c) for c in range(store.n_chunks)]
    order = GlobalOrder(chunks, seed=0, epoch=0, shuffle=False)
    sched = SegmentSchedule(store.n, world, 16)
    meta = Metadata.from_store(store)
    rots, trans = store.poses
    seen = []
    for rank in range(world):
        stats = {}
        batches = list(stream_batches(str(store.path), None, order, sched, rank, meta, num_workers=2 if rank == 0 else 0,
                                      stats=stats))
        assert len(batches) == sched.n_steps
        idx = torch.cat([b.indices for b in batches]).numpy()
        assert np.array_equal(idx, np.arange(*sched.segment(rank)))
        for b in batches[:2]:
            np.testing.assert_array_equal(b.images.numpy(), store.images(b.indices.numpy()))
            np.testing.assert_array_equal(b.rots.numpy(), rots[b.indices.numpy()])
            np.testing.assert_array_equal(b.trans.numpy(), trans[b.indices.numpy()])
            np.testing.assert_array_equal(b.ctf.numpy(), store.ctf[b.indices.numpy()])
        lo, hi = sched.segment(rank)
        assert stats["chunks_read"] == (hi - 1) // store.chunk_images - lo // store.chunk_images + 1  # each once
        assert stats["max_held_images"] <= 16 + 2 * store.chunk_images  # a batch and the chunks it spans
        seen.append(idx)
    assert np.array_equal(np.concatenate(seen), np.arange(store.n))
