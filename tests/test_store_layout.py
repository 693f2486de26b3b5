import pytest

from distdrgn.store import layout as L


@pytest.mark.parametrize("n,D,itemsize", [(1_000_000, 256, 4), (1_000_000, 128, 2), (2_000_000, 64, 4), (5000, 256, 4), (100, 32, 4), (7, 320, 4)])
def test_plan_layout_bounds(n, D, itemsize):
    levels = [d for d in (D, D // 2, D // 4) if d >= 16]
    plan = L.plan_layout(n, D, itemsize, levels)
    full = plan[D]
    image_bytes = D * D * itemsize
    assert full.chunk_images * image_bytes <= L.TARGET_CHUNK_BYTES or full.chunk_images == 1
    assert full.chunk_images * image_bytes >= min(L.TARGET_CHUNK_BYTES // 2, n * image_bytes)
    assert full.shard_images * image_bytes <= L.TARGET_SHARD_BYTES
    n_shards = -(-n // full.shard_images)
    assert n_shards <= 5000  # file count stays small at 1M+ particles
    for d, p in plan.items():
        assert p.shard_images == full.shard_images  # one ingest task writes one shard per level
        assert p.shard_images % p.chunk_images == 0
        assert p.chunk_images * d * d * itemsize <= max(L.TARGET_CHUNK_BYTES, full.chunk_images * d * d * itemsize)


def test_large_dataset_uses_full_size_shards():
    plan = L.plan_layout(1_000_000, 256, 4, [256])
    assert plan[256].shard_images * 256 * 256 * 4 >= 64 * L.MiB


def test_small_dataset_gets_several_shards():
    plan = L.plan_layout(5000, 256, 4, [256])
    assert -(-5000 // plan[256].shard_images) >= L.MIN_SHARDS // 2


def test_parse_levels():
    assert L.parse_levels("64,128") == (64, 128)
    assert L.parse_levels("") == ()
    with pytest.raises(ValueError):
        L.parse_levels("64,abc")


def test_unknown_codec():
    with pytest.raises(ValueError):
        L.compressors_for("lzma-magic", 4)
