import numpy as np
import pytest
import torch

from distdrgn.loader import Metadata, WindowDataset, iterate_batches, plan_epoch


def ranges(sizes):
    ends = np.cumsum(sizes)
    return [(int(e - s), int(e)) for s, e in zip(sizes, ends)]


@pytest.mark.parametrize("sizes, world, batch", [([32] * 6, 1, 16), ([32] * 6, 2, 16), ([50] * 7 + [13], 3, 16),
                                                  ([10] * 3, 4, 4), ([7], 2, 16), ([64] * 5, 4, 5)])
def test_every_particle_once_and_equal_steps(sizes, world, batch):
    chunks = ranges(sizes)
    n = sum(sizes)
    plans = [plan_epoch(chunks, seed=1, epoch=2, rank=r, world_size=world, batch_size=batch, window_chunks=2)
             for r in range(world)]
    orders = [p.order() for p in plans]
    assert np.array_equal(np.sort(np.concatenate(orders)), np.arange(n))
    assert len({p.n_steps for p in plans}) == 1
    for r, p in enumerate(plans):
        assert np.array_equal(p.batch_sizes, plans[0].batch_sizes)  # every rank knows every rank's sizes
        assert p.n_images == len(orders[r])
        assert p.batch_sizes[:, r].max() <= batch
    counts = [len(o) for o in orders]
    assert max(counts) - min(counts) <= 1
    assert plans[0].batch_sizes.sum(1).min() > 0  # no global step is empty
    # the loss weights make the DDP mean a global-batch mean
    for s in range(plans[0].n_steps):
        assert plans[0].loss_weight(s) == pytest.approx(world / plans[0].batch_sizes[s].sum())


def test_order_is_a_pure_function_of_seed_and_epoch():
    chunks = ranges([32] * 8)
    a = plan_epoch(chunks, seed=0, epoch=1, rank=0, world_size=2, batch_size=16).order()
    b = plan_epoch(chunks, seed=0, epoch=1, rank=0, world_size=2, batch_size=16).order()
    c = plan_epoch(chunks, seed=0, epoch=2, rank=0, world_size=2, batch_size=16).order()
    d = plan_epoch(chunks, seed=5, epoch=1, rank=0, world_size=2, batch_size=16).order()
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, d)
    # shuffled within bounded windows: each window of 4 chunks covers exactly 4 chunks' images
    plan = plan_epoch(chunks, seed=0, epoch=1, rank=0, world_size=1, batch_size=16, window_chunks=4)
    order = plan.order()
    assert len({int(i) // 32 for i in order[:128]}) == 4
    assert not np.array_equal(order, np.sort(order))
    unshuffled = plan_epoch(chunks, seed=0, epoch=1, rank=1, world_size=2, batch_size=16, shuffle=False)
    assert np.array_equal(unshuffled.order(), np.arange(128, 256))


@pytest.fixture(scope="module")
def store(small_dataset):
    from distdrgn.store import ParticleStore

    return ParticleStore.open(small_dataset["store"])


def test_batches_hold_the_right_images_and_metadata(store):
    chunks = [store.chunk_range(c) for c in range(store.n_chunks)]
    assert store.n_chunks >= 4
    plan = plan_epoch(chunks, seed=3, epoch=0, rank=1, world_size=2, batch_size=10, window_chunks=2)
    meta = Metadata.from_store(store)
    batches = list(iterate_batches(WindowDataset(str(store.path), None, plan), meta))
    assert len(batches) == plan.n_steps
    assert [len(b.indices) for b in batches] == list(plan.batch_sizes[:, 1])
    idx = torch.cat([b.indices for b in batches]).numpy()
    assert np.array_equal(idx, plan.order())
    b = batches[1]
    np.testing.assert_array_equal(b.images.numpy(), store.images(b.indices.numpy()))
    rots, trans = store.poses
    np.testing.assert_array_equal(b.rots.numpy(), rots[b.indices.numpy()])
    np.testing.assert_array_equal(b.trans.numpy(), trans[b.indices.numpy()])
    np.testing.assert_array_equal(b.ctf.numpy(), store.ctf[b.indices.numpy()])


def test_start_step_and_workers_give_the_same_batches(store):
    chunks = [store.chunk_range(c) for c in range(store.n_chunks)]
    plan = plan_epoch(chunks, seed=0, epoch=4, rank=0, world_size=1, batch_size=12, window_chunks=2)
    meta = Metadata.from_store(store)
    ds = WindowDataset(str(store.path), None, plan)
    full = [b.indices for b in iterate_batches(ds, meta)]
    tail = [b.indices for b in iterate_batches(ds, meta, start_step=7)]
    assert len(tail) == plan.n_steps - 7
    for x, y in zip(full[7:], tail):
        assert torch.equal(x, y)
    with_workers = [b.indices for b in iterate_batches(ds, meta, num_workers=2)]
    assert all(torch.equal(x, y) for x, y in zip(full, with_workers)) and len(with_workers) == len(full)
