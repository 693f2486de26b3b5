import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distdrgn.errors import StoreError
from distdrgn.store import ParticleStore, ingest
from store_helpers import SMALL_LAYOUT, make_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reader")
    paths, data = make_dataset(tmp, n=150)
    out = ingest(paths["stack"], tmp / "s.zarr", poses=paths["poses"], ctf=paths["ctf"], progress=False,
                 workers=2, layout_overrides=SMALL_LAYOUT, extra_levels=(16,))
    return out, data


def test_images_any_order_duplicates_and_empty(store):
    out, data = store
    s = ParticleStore.open(out)
    idx = np.array([149, 0, 17, 17, 16, 31, 32, 148])
    assert np.array_equal(s.images(idx), data["images"][idx])
    assert s.images([]).shape == (0, 32, 32)
    with pytest.raises(IndexError):
        s.images([150])
    with pytest.raises(IndexError):
        s.chunk_range(s.n_chunks)


def test_levels_have_own_chunks(store):
    out, _ = store
    s16 = ParticleStore.open(out, level=16)
    assert s16.D == 16 and s16.read_chunk(0).shape == (s16.chunk_images, 16, 16)
    assert s16.norm() == ParticleStore.open(out).norm(16)


def test_open_refuses_partial_foreign_and_missing(store, tmp_path):
    out, _ = store
    with pytest.raises(StoreError, match="no such particle store"):
        ParticleStore.open(tmp_path / "nope.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no zarr.json"):
        ParticleStore.open(tmp_path / "empty")
    import zarr

    zarr.open_group(tmp_path / "other.zarr", mode="w").attrs["format"] = "someone-else"
    with pytest.raises(StoreError, match="not a distdrgn-particles store"):
        ParticleStore.open(tmp_path / "other.zarr")
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["complete"] = False
    fake = tmp_path / "fake.zarr"
    fake.mkdir()
    (fake / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="incomplete store"):
        ParticleStore.open(fake)
    meta["attributes"]["complete"] = True
    meta["attributes"]["version"] = 99
    (fake / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="version 99"):
        ParticleStore.open(fake)


def test_concurrent_readers_in_processes(store):
    out, data = store
    code = (
        "import sys, numpy as np\n"
        "from distdrgn.store import ParticleStore\n"
        "s = ParticleStore.open(sys.argv[1])\n"
        "print(float(sum(s.read_chunk(c).sum() for c in range(s.n_chunks))))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(3)]
    sums = [float(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sums == pytest.approx([float(data["images"].sum())] * 3, rel=1e-4)


def _small_store(tmp_path, images=None, **kw):
    import mrcfile

    paths, data = make_dataset(tmp_path, n=100)
    if images is not None:
        with mrcfile.new(paths["stack"], overwrite=True) as m:
            m.set_data(images)
        data["images"] = images
    out = ingest(paths["stack"], tmp_path / "s.zarr", progress=False, workers=1, layout_overrides=SMALL_LAYOUT, **kw)
    return out, data


def test_missing_chunk_file_raises_naming_chunk_and_particles(tmp_path):
    out, data = _small_store(tmp_path, extra_levels=(16,))
    s = ParticleStore.open(out)
    assert s.file_images == 16 and s.chunk_images == 16  # one chunk per shard file in this layout
    assert s.chunk_file(4) == out / "images" / "c" / "4" / "0" / "0"
    s.chunk_file(4).unlink()
    message = r"chunk file images/c/4/0/0 is missing \(chunk 4, particles 64-79, at box 32\)"
    s = ParticleStore.open(out)
    with pytest.raises(StoreError, match=message):
        s.images(np.arange(100))
    with pytest.raises(StoreError, match=message):
        s.images([3, 70])
    with pytest.raises(StoreError, match=message):
        s.raw_chunk(4)
    with pytest.raises(StoreError, match=message):
        s.read_chunk(4)
    keep = np.r_[0:64, 80:100]
    assert np.array_equal(s.images(keep), data["images"][keep])  # the other files still read
    s16 = ParticleStore.open(out, level=16)
    assert s16.images(np.arange(100)).shape == (100, 16, 16)
    s16.chunk_file(0).unlink()
    with pytest.raises(StoreError, match=r"chunk file images_16/c/0/0/0 is missing .*particles 0-15, at box 16"):
        ParticleStore.open(out, level=16).images([5])


def test_unwritten_all_zero_chunk_is_not_missing_and_checked_once(tmp_path, monkeypatch):
    images = np.random.default_rng(1).normal(size=(100, 32, 32)).astype(np.float32)
    images[32:64] = 0  # zarr does not write chunks of fill values
    out, _ = _small_store(tmp_path, images=images)
    s = ParticleStore.open(out)
    assert not s.chunk_file(2).exists()
    calls = []
    real = ParticleStore.chunk_file
    monkeypatch.setattr(ParticleStore, "chunk_file", lambda self, f: (calls.append(f), real(self, f))[1])
    for _ in range(3):
        assert np.array_equal(s.images(np.arange(100)), images)
        for c in range(s.n_chunks):
            s.raw_chunk(c)
    assert sorted(calls) == list(range(-(-100 // s.file_images)))  # each file checked once


def test_damaged_chunk_fails_at_read_naming_chunk_and_particles(tmp_path):
    """Each chunk read for training/encoding is checked against its ingest crc32c; verify_chunks=False reads it as is."""
    from distdrgn.loader import GlobalOrder, Metadata, StepSchedule, stream_batches

    paths, data = make_dataset(tmp_path, n=100)
    out = ingest(paths["stack"], tmp_path / "s.zarr", poses=paths["poses"], ctf=paths["ctf"], progress=False,
                 workers=1, layout_overrides=SMALL_LAYOUT)
    shard = out / "images" / "c" / "1" / "0" / "0"  # chunk 1, images 16-31 (one chunk per shard file)
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0x01
    shard.write_bytes(bytes(raw))
    message = (r"checksum mismatch in chunk 1 \(particles 16-31\) at box 32: these particles \(store positions\) "
               r"are damaged; re-ingest the store, or set data.allow_unverified=true")
    s = ParticleStore.open(out)
    assert s.verify_chunks
    for read in (lambda: s.read_chunk(1), lambda: s.raw_chunk(1), lambda: s.images([20]), lambda: s.images([3, 17])):
        with pytest.raises(StoreError, match=message):
            read()
    assert np.array_equal(s.read_chunk(0), data["images"][:16]) and np.array_equal(s.images([5, 40]), data["images"][[5, 40]])
    order = GlobalOrder([s.chunk_range(c) for c in range(s.n_chunks)], seed=0, epoch=0, window_chunks=2)
    schedule = StepSchedule(s.n, 0, 1, 10)
    with pytest.raises(StoreError, match=message):
        list(stream_batches(str(out), None, order, schedule, 0, Metadata.from_store(s)))
    unchecked = ParticleStore.open(out, verify_chunks=False)
    assert not np.array_equal(unchecked.read_chunk(1), data["images"][16:32])  # the damaged values, as they are
    assert unchecked.images([20]).shape == (1, 32, 32) and unchecked.at_level(32).verify_chunks is False
    batches = list(stream_batches(str(out), None, order, schedule, 0, Metadata.from_store(unchecked), verify_chunks=False))
    assert sum(len(b.indices) for b in batches) == 100


def test_damaged_metadata_fails_when_loaded(tmp_path):
    import zarr

    paths, _ = make_dataset(tmp_path, n=100)
    out = ingest(paths["stack"], tmp_path / "s.zarr", poses=paths["poses"], ctf=paths["ctf"], progress=False,
                 workers=1, layout_overrides=SMALL_LAYOUT)
    assert ParticleStore.open(out).ctf.shape == (100, 9) and ParticleStore.open(out).poses[0].shape == (100, 3, 3)
    arr = zarr.open_array(out / "ctf", mode="r+")
    arr[3, 2] = arr[3, 2] + 1
    rots = zarr.open_array(out / "poses" / "rots", mode="r+")
    rots[7, 0, 0] = 2.0
    with pytest.raises(StoreError, match=r"checksum mismatch in ctf: the store's metadata is damaged; re-ingest"):
        ParticleStore.open(out).ctf
    with pytest.raises(StoreError, match=r"checksum mismatch in poses/rots"):
        ParticleStore.open(out).poses
    assert ParticleStore.open(out, verify_chunks=False).ctf[3, 2] == arr[3, 2]
