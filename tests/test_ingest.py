import os
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


# ---- concurrent ingests, disk space, output folders --------------------------------------


def test_second_ingest_of_the_same_output_is_refused_naming_the_holder(tmp_path, capsys):
    """The lock is held here (as a running ingest holds it); the second ingest leaves nothing behind."""
    from distdrgn.cli import main as cli
    from distdrgn.store.lock import OutputLock, lock_path

    paths, data = make_dataset(tmp_path, n=60)
    out = tmp_path / "s.zarr"
    with OutputLock(out):
        assert f'"pid": {os.getpid()}' in lock_path(out).read_text()
        with pytest.raises(StoreError, match=r"another ingest is writing this output \(pid \d+ on host .+ since .+; "
                                             r"lock .*s\.zarr\.lock\); wait for it to finish"):
            _ingest(paths, out)
        assert not out.exists() and not (tmp_path / "s.zarr.partial").exists()
        assert cli(["ingest", str(paths["stack"]), "-o", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "another ingest is writing this output" in err[0]
    assert not lock_path(out).exists()  # the holder removes it
    _ingest(paths, out)  # the lock is free again
    assert np.array_equal(ParticleStore.open(out).images(np.arange(60)), data["images"])
    assert not lock_path(out).exists() and sorted(p.name for p in tmp_path.iterdir() if "s.zarr" in p.name) == ["s.zarr"]


def test_a_stale_lock_file_without_a_holder_is_taken_over(tmp_path):
    from distdrgn.store.lock import lock_path

    paths, _ = make_dataset(tmp_path, n=40)
    out = tmp_path / "s.zarr"
    lock_path(out).write_text('{"pid": 1, "host": "gone", "since": "then"}')  # its holder was killed
    _ingest(paths, out)
    assert ParticleStore.open(out).n == 40 and not lock_path(out).exists()


def test_not_enough_free_space_is_refused_up_front(tmp_path, monkeypatch):
    import shutil as _shutil

    paths, _ = make_dataset(tmp_path, n=200)
    out = tmp_path / "s.zarr"
    need = writer.estimated_store_bytes(200, [32, 16], 4, True, True)
    assert need == 200 * (32 * 32 + 16 * 16) * 4 + 200 * (8 + 44 + 36)
    usage = _shutil.disk_usage(tmp_path)
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: usage._replace(free=need - 1))
    with pytest.raises(StoreError, match=r"s\.zarr: not enough free disk space: the store needs about 0\.00 GB "
                                         r"\(200 images at box 32, 16, 4 bytes per pixel, uncompressed\) but .* "
                                         r"has 0\.00 GB free"):
        _ingest(paths, out, extra_levels=(16,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctf.pkl", "p.mrcs", "poses.pkl"]  # nothing written
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: usage._replace(free=need))
    _ingest(paths, out, extra_levels=(16,))
    assert ParticleStore.open(out).levels == [32, 16]


def test_disk_full_during_the_write_is_one_line_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    import errno

    from distdrgn.cli import main as cli

    paths, data = make_dataset(tmp_path, n=200)
    out = tmp_path / "s.zarr"
    real = writer._write_shard
    written = []

    def full(job, shard):
        if shard == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(shard)
        return real(job, shard)

    monkeypatch.setattr(writer, "_write_shard", full)
    with pytest.raises(StoreError) as exc:
        _ingest(paths, out, workers=1)
    assert str(exc.value) == (f"{out}: No space left on device while writing s.zarr.partial; free some space, "
                              "then rerun the same command: it resumes where it stopped")
    assert (tmp_path / "s.zarr.partial").is_dir() and not out.exists() and written
    rerun = []
    monkeypatch.setattr(writer, "_write_shard", lambda job, shard: (rerun.append(shard), real(job, shard))[1])
    _ingest(paths, out, workers=1)
    assert 3 in rerun and set(rerun).isdisjoint(written)  # the shards written before the disk filled are reused
    assert np.array_equal(ParticleStore.open(out).images(np.arange(200)), data["images"])

    # through the CLI: one line, exit 2
    monkeypatch.setattr(writer, "_write_shard", lambda job, shard: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    cli_out = tmp_path / "cli.zarr"
    assert cli(["ingest", str(paths["stack"]), "-o", str(cli_out), "--no-progress", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {cli_out}: No space left on device") and "rerun" in err[0]


def test_output_under_a_file_in_place_of_a_folder_is_one_line(tmp_path, capsys):
    from distdrgn.cli import main as cli

    paths, _ = make_dataset(tmp_path, n=40)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"notes\.txt is a file, not a folder; choose another output path"):
        _ingest(paths, tmp_path / "notes.txt" / "s.zarr")
    assert cli(["ingest", str(paths["stack"]), "-o", str(tmp_path / "notes.txt" / "sub" / "s.zarr"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notes.txt is a file, not a folder" in err[0]
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only directories, so there is no permission error to report")
def test_output_in_a_read_only_folder_is_one_line(tmp_path):
    paths, _ = make_dataset(tmp_path, n=40)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(StoreError, match=r"s\.zarr: the folder .*ro is not writable; choose another output path"):
            _ingest(paths, ro / "s.zarr")
        assert not any(ro.iterdir())
    finally:
        ro.chmod(0o755)


# ---- poses and CTF that have the right count but do not fit the images -------------------


def _rewrite_ctf(paths, box, apix):
    with open(paths["ctf"], "rb") as f:
        ctf = pickle.load(f)
    ctf[:, 0], ctf[:, 1] = box, apix
    with open(paths["ctf"], "wb") as f:
        pickle.dump(ctf, f)


def test_ctf_of_another_dataset_is_refused_naming_both(tmp_path, capsys):
    from distdrgn.cli import main as cli

    paths, _ = make_dataset(tmp_path, n=40, D=32, apix=6.0)
    _rewrite_ctf(paths, 180, 2.95)  # same count, another dataset's box and pixel size
    out = tmp_path / "s.zarr"
    with pytest.raises(FormatError, match=r"ctf\.pkl: the CTF rows are for box 180 px at 2\.95 A/px \(531 A across\) "
                                          r"but the images .*p\.mrcs are 32 px at 6 A/px \(192 A\): these CTF "
                                          r"parameters are not for these images"):
        _ingest(paths, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctf.pkl", "p.mrcs", "poses.pkl"]
    assert cli(["ingest", str(paths["stack"]), "-o", str(out), "--poses", str(paths["poses"]), "--ctf",
                str(paths["ctf"]), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "box 180 px at 2.95 A/px" in err[0]


def test_ctf_pixel_size_slightly_off_warns_and_fourier_cropped_images_pass(tmp_path, capsys):
    paths, _ = make_dataset(tmp_path, n=40, D=32, apix=2.0)
    _rewrite_ctf(paths, 32, 2.1)  # 5% off: a rounded header or another dataset; say so, go on
    _ingest(paths, tmp_path / "a.zarr")
    err = capsys.readouterr().err
    assert "warning: " in err and "the CTF rows are for box 32 px at 2.1 A/px (67.2 A across) but the images" in err
    assert ParticleStore.open(tmp_path / "a.zarr").n == 40
    _rewrite_ctf(paths, 64, 1.0)  # the CTF of the 64 px originals of these 32 px images: the same extent
    _ingest(paths, tmp_path / "b.zarr")
    assert "warning" not in capsys.readouterr().err


def test_translations_in_pixels_are_refused_naming_the_cause(tmp_path):
    paths, _ = make_dataset(tmp_path, n=40, D=32)
    with open(paths["poses"], "rb") as f:
        rots, trans = pickle.load(f)
    with open(paths["poses"], "wb") as f:
        pickle.dump((rots, trans * 32), f)  # pixels: parsed without dividing by the box
    worst = int(np.argmax(np.abs(trans * 32).max(axis=1)))
    with pytest.raises(FormatError, match=r"poses\.pkl: translations must be fractions of the box \(\|t\| <= 0\.5\), "
                                          rf"but \d+ of 40 exceed it, up to [\d.]+ \(at box 32: [\d.]+ px\) at row "
                                          rf"{worst} .*they look like pixels: were the poses parsed without dividing "
                                          r"by the box size\?"):
        _ingest(paths, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "s.zarr.partial").exists()


def test_progress_bar_counts_images_as_shards_finish(tmp_path, monkeypatch):
    import tqdm as tqdm_module

    updates = []

    class Recording(tqdm_module.tqdm):
        def update(self, n=1):
            updates.append(n)
            return super().update(n)

    monkeypatch.setattr(tqdm_module, "tqdm", Recording)
    paths, _ = make_dataset(tmp_path, n=200)
    _ingest(paths, tmp_path / "s.zarr", progress=True, workers=1)
    layout = ParticleStore.open(tmp_path / "s.zarr").attrs["layout"]["32"]
    n_shards = -(-200 // layout["shard_images"])
    assert n_shards > 1 and len(updates) == n_shards  # one step per finished shard, not all at the end
    assert sum(updates) == 200 and max(updates) == layout["shard_images"]
