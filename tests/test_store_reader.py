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
