import pickle
import subprocess
import sys
import threading
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from distdrgn.errors import FormatError, StoreError
from distdrgn.fft import downsample, ht2_center, symmetrize_ht, window_mask
from distdrgn.store import ParticleStore, ingest
from distdrgn.store import layout as L
from distdrgn.store import writer
from distdrgn.store.norm import sample_positions
from store_helpers import SMALL_LAYOUT, make_dataset

REPO = Path(__file__).resolve().parents[1]


def _ingest(paths, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("workers", 2)
    kw.setdefault("layout_overrides", SMALL_LAYOUT)
    return ingest(paths["stack"], out, poses=paths["poses"], ctf=paths["ctf"], **kw)


def test_roundtrip_images_poses_ctf(tmp_path):
    paths, data = make_dataset(tmp_path, n=200)
    out = _ingest(paths, tmp_path / "s.zarr")
    s = ParticleStore.open(out)
    assert (s.n, s.D, s.dtype, s.levels, s.apix) == (200, 32, np.float32, [32], 2.0)
    assert s.n_chunks == 13 and s.chunk_range(12) == (192, 200)
    assert np.array_equal(np.concatenate([s.read_chunk(c) for c in range(s.n_chunks)]), data["images"])
    idx = np.random.default_rng(1).permutation(200)[:37]
    assert np.array_equal(s.images(idx), data["images"][idx])
    assert np.array_equal(s.poses[0], data["rots"]) and np.array_equal(s.poses[1], data["trans"])
    assert np.array_equal(s.ctf, data["ctf"])
    assert np.array_equal(s.original_index, np.arange(200))
    assert s.attrs["format"] == L.FORMAT_NAME and s.attrs["complete"] is True
    assert not (tmp_path / "s.zarr.partial").exists()
    prov = s.attrs["provenance"]["source_files"][0]
    assert prov["size"] == paths["stack"].stat().st_size and len(prov["crc32c_sampled"]) == 8


def test_norm_matches_direct_computation(tmp_path):
    paths, data = make_dataset(tmp_path, n=200)
    s = ParticleStore.open(_ingest(paths, tmp_path / "s.zarr"))
    sample = data["images"][sample_positions(200)].astype(np.float64)
    x = torch.from_numpy(sample)
    ht = symmetrize_ht(ht2_center(x * window_mask(32).double())).numpy()
    ht_nw = symmetrize_ht(ht2_center(x)).numpy()
    norm = s.norm()
    assert norm["n_sampled"] == 200
    assert norm["mean"] == pytest.approx(sample.mean(), abs=1e-9)
    assert norm["std"] == pytest.approx(sample.std(), rel=1e-9)
    assert norm["ht_std"] == pytest.approx(ht.std(), rel=1e-9)
    assert norm["ht_std_nowindow"] == pytest.approx(ht_nw.std(), rel=1e-9)


def test_downsample_levels_ind_and_float16(tmp_path):
    paths, data = make_dataset(tmp_path, n=120)
    ind = np.array([5, 3, 100, 7] + list(range(20, 60)), dtype=np.int64)
    ind_path = tmp_path / "ind.pkl"
    with open(ind_path, "wb") as f:
        pickle.dump(ind, f)
    out = _ingest(paths, tmp_path / "s.zarr", D=24, extra_levels=(16, 8), ind=ind_path, dtype="float16")
    s = ParticleStore.open(out)
    assert s.levels == [24, 16, 8] and s.n == len(ind) and s.dtype == np.float16
    assert s.apix == pytest.approx(2.0 * 32 / 24)
    assert np.array_equal(s.original_index, ind)
    expect = downsample(data["images"][ind], 24).astype(np.float16).astype(np.float32)
    assert np.array_equal(s.images(np.arange(len(ind))), expect)
    s8 = ParticleStore.open(out, level=8)
    assert s8.D == 8 and s8.apix == pytest.approx(8.0)
    expect8 = downsample(data["images"][ind], 8).astype(np.float16).astype(np.float32)
    assert np.array_equal(s8.images([3, 0, 43]), expect8[[3, 0, 43]])
    assert np.array_equal(s.poses[0], data["rots"][ind]) and np.array_equal(s.ctf, data["ctf"][ind])
    assert set(s.attrs["norm"]) == {"24", "16", "8"}
    with pytest.raises(StoreError, match="no images at box size 12"):
        ParticleStore.open(out, level=12)


def test_failure_keeps_partial_and_resume_reuses_finished_shards(tmp_path, monkeypatch):
    paths, data = make_dataset(tmp_path, n=200)
    out = tmp_path / "s.zarr"
    real = writer._write_shard
    calls, failed = [], []
    lock, first_done = threading.Lock(), threading.Event()

    def failing(job, shard):
        # Whatever order the scheduler runs shards in: the first shard called finishes, the
        # second waits for it and then fails. So one shard is always done and one never is.
        with lock:
            calls.append(shard)
            nth = len(calls)
        if nth == 1:
            try:
                return real(job, shard)
            finally:
                first_done.set()
        if nth == 2:
            assert first_done.wait(120), "the first shard did not finish"
            failed.append(shard)
            raise OSError("disk went away")
        return real(job, shard)

    monkeypatch.setattr(writer, "_write_shard", failing)
    with pytest.raises(OSError):
        _ingest(paths, out, workers=2)
    partial = tmp_path / "s.zarr.partial"
    assert partial.is_dir() and not out.exists()
    with pytest.raises(StoreError, match="incomplete"):
        ParticleStore.open(partial)
    finished = sorted(int(p.stem.split("_")[1]) for p in (partial / L.PROGRESS_DIR).glob("shard_*.json"))
    assert calls[0] in finished and failed and failed[0] not in finished

    # a different command line on the same partial is refused unless --force
    with pytest.raises(StoreError, match="different inputs or options"):
        _ingest(paths, out, dtype="float16")

    calls.clear()
    monkeypatch.setattr(writer, "_write_shard", lambda job, shard: (calls.append(shard), real(job, shard))[1])
    _ingest(paths, out)
    assert set(calls).isdisjoint(finished) and failed[0] in calls
    s = ParticleStore.open(out)
    assert np.array_equal(s.images(np.arange(200)), data["images"])
    assert not partial.exists()


def test_precreated_empty_partial_dir_is_used(tmp_path):
    paths, data = make_dataset(tmp_path, n=40)
    (tmp_path / "s.zarr.partial").mkdir()  # as for `lfs setstripe` before ingest
    _ingest(paths, tmp_path / "s.zarr")
    assert np.array_equal(ParticleStore.open(tmp_path / "s.zarr").images(np.arange(40)), data["images"])


def test_force_discards_different_partial(tmp_path, monkeypatch):
    paths, data = make_dataset(tmp_path, n=100)
    out = tmp_path / "s.zarr"
    monkeypatch.setattr(writer, "_write_shard", lambda job, shard: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        _ingest(paths, out)
    monkeypatch.undo()
    _ingest(paths, out, dtype="float16", force=True)
    assert ParticleStore.open(out).dtype == np.float16


def test_output_exists_refused_unless_force(tmp_path):
    paths, data = make_dataset(tmp_path, n=50)
    out = _ingest(paths, tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="already exists"):
        _ingest(paths, out)
    _ingest(paths, out, force=True, D=16)
    assert ParticleStore.open(out).D == 16
    foreign = tmp_path / "mydata"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    with pytest.raises(StoreError, match="not a distdrgn particle store"):
        _ingest(paths, foreign, force=True)
    assert (foreign / "thesis.tex").exists()


def test_force_never_deletes_an_input_or_a_non_store(tmp_path, capsys):
    import zarr

    from distdrgn.cli import main

    paths, data = make_dataset(tmp_path, n=40)
    stack = paths["stack"]
    original = stack.read_bytes()
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other.zarr"  # a foreign Zarr group, not a distdrgn store
    zarr.open_group(other, mode="w", zarr_format=3).attrs["format"] = "someone-else"
    for target, why in [(stack, "is (or holds) the input"), (notes, "not a distdrgn particle store"),
                        (empty, "not a distdrgn particle store"), (other, "not a distdrgn particle store")]:
        assert main(["ingest", str(stack), "-o", str(target), "--force", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and why in err and err.count("\n") == 1, err
        assert not target.with_name(target.name + L.PARTIAL_SUFFIX).exists()
    assert stack.read_bytes() == original and notes.read_text() == "keep me" and empty.is_dir()
    assert (other / "zarr.json").is_file()

    # a real store that holds an input of this ingest (here: the poses) is not replaced either
    store = _ingest(paths, tmp_path / "s.zarr")
    inside = store / "poses.pkl"
    inside.write_bytes(paths["poses"].read_bytes())
    with pytest.raises(StoreError, match="is \\(or holds\\) the input"):
        ingest(stack, store, poses=inside, ctf=paths["ctf"], force=True, progress=False)
    assert inside.is_file() and ParticleStore.open(store).n == 40

    # a symbolic link to a store is not a store
    link = tmp_path / "link.zarr"
    link.symlink_to(store)
    with pytest.raises(StoreError, match="not a distdrgn particle store"):
        _ingest(paths, link, force=True)
    assert link.is_symlink() and ParticleStore.open(store).n == 40


def test_force_discards_only_a_partial_store(tmp_path):
    paths, data = make_dataset(tmp_path, n=40)
    out = tmp_path / "s.zarr"
    partial = tmp_path / "s.zarr.partial"
    partial.write_text("not a store")
    with pytest.raises(StoreError, match="not a distdrgn particle store"):
        _ingest(paths, out, force=True)
    assert partial.read_text() == "not a store" and not out.exists()
    partial.unlink()
    partial.mkdir()
    (partial / "data.bin").write_bytes(b"x")
    with pytest.raises(StoreError, match="not a distdrgn particle store"):
        _ingest(paths, out, force=True)
    assert (partial / "data.bin").read_bytes() == b"x"


def test_non_finite_pixels_rejected_and_nothing_left(tmp_path):
    paths, data = make_dataset(tmp_path, n=100)
    images = data["images"].copy()
    images[77, 3, 4] = np.nan
    with pytest.warns(RuntimeWarning), mrcfile.new(paths["stack"], overwrite=True) as m:
        m.set_data(images)
    with pytest.raises(FormatError, match="particle 77 has non-finite"):
        _ingest(paths, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "s.zarr.partial").exists()


def test_float16_overflow_rejected(tmp_path):
    paths, data = make_dataset(tmp_path, n=40)
    with mrcfile.new(paths["stack"], overwrite=True) as m:
        m.set_data(data["images"] * 1e5)
    with pytest.raises(FormatError, match="overflow float16"):
        _ingest(paths, tmp_path / "s.zarr", dtype="float16")


@pytest.mark.parametrize("kw,match", [
    ({"D": 33}, "must be even"),
    ({"D": 64}, "at most the box size 32"),
    ({"extra_levels": (40,)}, "level 40"),
    ({"dtype": "int8"}, "--dtype"),
])
def test_bad_options(tmp_path, kw, match):
    paths, _ = make_dataset(tmp_path, n=20)
    with pytest.raises((FormatError, StoreError), match=match):
        _ingest(paths, tmp_path / "s.zarr", **kw)
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "s.zarr.partial").exists()


def test_count_mismatch_poses_ctf_ind(tmp_path):
    paths, data = make_dataset(tmp_path, n=30)
    short = tmp_path / "short.pkl"
    with open(short, "wb") as f:
        pickle.dump((data["rots"][:20], data["trans"][:20]), f)
    with pytest.raises(FormatError, match="different number of particles"):
        ingest(paths["stack"], tmp_path / "a.zarr", poses=short, progress=False)
    with open(short, "wb") as f:
        pickle.dump(data["ctf"][:29], f)
    with pytest.raises(FormatError, match=r"expected \(30, 9\)"):
        ingest(paths["stack"], tmp_path / "a.zarr", ctf=short, progress=False)
    with open(short, "wb") as f:
        pickle.dump(np.array([0, 30]), f)
    with pytest.raises(FormatError, match=r"indices must be in \[0, 30\)"):
        ingest(paths["stack"], tmp_path / "a.zarr", ind=short, progress=False)
    assert not list(tmp_path.glob("a.zarr*"))


def test_odd_box_and_missing_and_unknown_files(tmp_path):
    with mrcfile.new(tmp_path / "odd.mrcs") as m:
        m.set_data(np.zeros((4, 31, 31), np.float32))
    with pytest.raises(FormatError, match="odd"):
        ingest(tmp_path / "odd.mrcs", tmp_path / "s.zarr", progress=False)
    with pytest.raises(FormatError, match="no such file"):
        ingest(tmp_path / "missing.mrcs", tmp_path / "s.zarr", progress=False)
    (tmp_path / "x.h5").write_bytes(b"\0" * 10)
    with pytest.raises(FormatError, match="unknown particle file type"):
        ingest(tmp_path / "x.h5", tmp_path / "s.zarr", progress=False)
    assert not list(tmp_path.glob("s.zarr*"))


def test_peak_rss_independent_of_dataset_size(tmp_path):
    """Ingest a 200 MB stack in a subprocess; its peak RSS must stay far below the data size + baseline."""
    n, D = 800, 256  # 210 MB of float32
    stack = tmp_path / "big.mrcs"
    m = mrcfile.new_mmap(stack, shape=(n, D, D), mrc_mode=2, overwrite=True)
    rng = np.random.default_rng(0)
    for i in range(0, n, 100):
        m.data[i : i + 100] = rng.standard_normal((100, D, D), dtype=np.float32)
    m.close()
    # shards of 16 MiB: the bound below would be exceeded if ingest held the whole stack
    code = (
        "import resource, sys, torch, zarr, dask\n"
        "from distdrgn.store.writer import ingest\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"ingest({str(stack)!r}, {str(tmp_path / 's.zarr')!r}, workers=2, progress=False,\n"
        "       layout_overrides={'target_shard_bytes': 16 << 20})\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(base // 1024, peak // 1024)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    base_mb, peak_mb = map(int, res.stdout.split())
    assert peak_mb - base_mb < 150, (base_mb, peak_mb)
    s = ParticleStore.open(tmp_path / "s.zarr")
    assert np.array_equal(s.read_chunk(s.n_chunks - 1), mrcfile.mmap(stack).data[-(n - (s.n_chunks - 1) * s.chunk_images):])


def test_ingest_relion30_star_needs_and_accepts_pixel_size(tmp_path):
    """toy_projections.star (RELION 3.0) has no pixel size: ingest says so, and takes --apix."""
    from distdrgn.cli import main

    from fixture_files import FIXTURES

    star = FIXTURES / "toy_projections.star"
    if not star.exists():
        pytest.skip("shared fixtures not present")
    out = tmp_path / "toy.zarr"
    assert main(["ingest", str(star), "-o", str(out), "--no-progress"]) == 2
    assert not out.exists()
    assert main(["ingest", str(star), "-o", str(out), "--apix", "1.0", "-w", "0.1", "--no-progress"]) == 0
    from distdrgn.store import ParticleStore

    s = ParticleStore.open(out)
    assert s.n == 1000 and s.D == 30 and s.ctf is not None
    assert np.allclose(s.ctf[:, 1], 1.0) and np.allclose(s.ctf[:, 7], 0.1)


def test_ingest_killed_mid_way_then_rerun_completes_exactly(tmp_path):
    """A real SIGKILL of the ingest process, then the same command again: nothing lost, nothing doubled."""
    import signal
    import time

    paths, data = make_dataset(tmp_path, n=400)
    out = tmp_path / "s.zarr"
    partial = tmp_path / "s.zarr.partial"
    # The real ingest, with each shard slowed down so the kill lands mid-way.
    script = (
        "import sys, time\n"
        "from distdrgn.store import writer\n"
        "real = writer._write_shard\n"
        "writer._write_shard = lambda job, s: (time.sleep(0.3), real(job, s))[1]\n"
        "from distdrgn.store import ingest\n"
        f"ingest({str(paths['stack'])!r}, {str(out)!r}, poses={str(paths['poses'])!r}, ctf={str(paths['ctf'])!r},"
        f" workers=1, progress=False, layout_overrides={SMALL_LAYOUT!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while time.time() < deadline and len(list((partial / L.PROGRESS_DIR).glob("shard_*.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((partial / L.PROGRESS_DIR).glob("shard_*.json")))
    assert 3 <= done_before < 13 and not out.exists()

    _ingest(paths, out, workers=1)  # the same command again
    s = ParticleStore.open(out)
    assert s.n == 400 and np.array_equal(s.images(np.arange(400)), data["images"])
    assert not partial.exists()
