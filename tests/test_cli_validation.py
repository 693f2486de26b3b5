"""``distdrgn backproject`` and ``distdrgn fsc`` on a simulated homogeneous dataset."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from distdrgn import cli
from distdrgn.analysis.reconstruct import backproject_store, masked_fsc
from distdrgn.errors import DistdrgnError
from distdrgn.formats.mrc import read_volume, write_mrc
from distdrgn.projection import backproject, fsc

D = 16
N = 400


@pytest.fixture(scope="module")
def homogeneous(tmp_path_factory):
    """400 noiseless images of one state, stored in chunks of 48 images (9 chunks)."""
    from distdrgn.simulate import load_ground_truth, simulate
    from distdrgn.store import ingest

    root = tmp_path_factory.mktemp("homog")
    paths = simulate(root / "sim", n=N, D=D, snr=float("inf"), dist="homogeneous", seed=3, progress=False,
                     write_volumes=False)
    store = ingest(paths["particles.mrcs"], root / "store", poses=paths["poses.pkl"], ctf=paths["ctf.pkl"],
                   progress=False, layout_overrides={"target_chunk_bytes": D * D * 4 * 48})
    gt = load_ground_truth(root / "sim").image_volume(0)
    return {"root": root, "store": Path(store), "gt": gt, **paths}


def corr(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_backproject_cli_writes_map_and_half_maps(homogeneous, tmp_path):
    out = tmp_path / "vol.mrc"
    code = cli.main(["backproject", str(homogeneous["store"]), "-o", str(out), "--no-progress"])
    assert code == 0
    vol, apix = read_volume(out)
    h1, _ = read_volume(tmp_path / "vol_half1.mrc")
    h2, _ = read_volume(tmp_path / "vol_half2.mrc")
    assert vol.shape == h1.shape == h2.shape == (D, D, D)
    assert apix == pytest.approx(192 / D, rel=1e-5)
    # the CTF-weighted, inverted back-projection recovers the positive ground-truth density
    assert corr(vol, homogeneous["gt"]) > 0.8
    assert corr(h1, h2) > 0.8
    _freqs, curve = fsc(h1, h2)
    assert curve[1:4].min() > 0.9


def test_full_map_equals_direct_backprojection_and_halves_split_even_odd(homogeneous):
    from distdrgn.store.reader import ParticleStore

    store = ParticleStore.open(homogeneous["store"])
    ind = np.arange(5, 300, 3)
    rec = backproject_store(homogeneous["store"], ind=ind, first=60, progress=False)
    pos = ind[:60]
    np.testing.assert_array_equal(rec.positions, pos)
    rots, trans = store.poses
    imgs = -store.images(pos)
    ref = backproject(imgs, rots[pos], trans[pos], store.ctf[pos]).numpy()
    np.testing.assert_allclose(rec.volume, ref, atol=1e-5 * np.abs(ref).max())
    half2 = backproject(imgs[1::2], rots[pos[1::2]], trans[pos[1::2]], store.ctf[pos[1::2]]).numpy()
    np.testing.assert_allclose(rec.half2, half2, atol=1e-5 * np.abs(half2).max())
    # without inversion the map is the negative density
    flipped = backproject_store(homogeneous["store"], ind=ind, first=60, invert=False, half_maps=False,
                                progress=False)
    assert flipped.half1 is None
    np.testing.assert_allclose(flipped.volume, -rec.volume, atol=1e-5 * np.abs(ref).max())


def test_backproject_cli_with_ind_and_errors(homogeneous, tmp_path, capsys):
    ind_file = tmp_path / "ind.pkl"
    with open(ind_file, "wb") as f:
        pickle.dump(np.arange(0, N, 2, dtype=np.int64), f)
    out = tmp_path / "sub.mrc"
    assert cli.main(["backproject", str(homogeneous["store"]), "--ind", str(ind_file), "--first", "50",
                     "--no-half-maps", "-o", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "back-projected 50 particles" in text and "FSC" not in text
    assert not (tmp_path / "sub_half1.mrc").exists()
    assert cli.main(["backproject", str(homogeneous["store"]), "-o", str(tmp_path / "v.map")]) == 2
    assert cli.main(["backproject", str(tmp_path / "nope.zarr"), "-o", str(tmp_path / "v.mrc")]) == 2
    with pytest.raises(DistdrgnError, match="half-maps need at least 2"):
        backproject_store(homogeneous["store"], first=1, progress=False)


def test_fsc_cli_resolutions_plot_and_text(homogeneous, tmp_path, capsys):
    gt = homogeneous["gt"]
    apix = 2.0
    a, b = tmp_path / "a.mrc", tmp_path / "b.mrc"
    write_mrc(a, gt, apix, is_volume=True)
    write_mrc(b, gt, apix, is_volume=True)
    assert cli.main(["fsc", str(a), str(b)]) == 0
    # identical maps correlate to Nyquist: 0.5 1/px = 2 * apix
    assert capsys.readouterr().out.strip() == "FSC=0.5: 0.5000 1/px = 4.00 A; FSC=0.143: 0.5000 1/px = 4.00 A"
    # a low-passed copy: the curve falls where the filter cuts
    f = np.fft.fftshift(np.fft.fftn(gt))
    k = np.arange(D) - D // 2
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    noise = np.random.default_rng(0).normal(size=f.shape) * np.abs(f).mean() * (r > 4)
    lowpassed = np.fft.ifftn(np.fft.ifftshift(f * (r <= 4) + noise)).real.astype(np.float32)
    write_mrc(b, lowpassed, apix, is_volume=True)
    txt, png = tmp_path / "fsc.txt", tmp_path / "fsc.png"
    assert cli.main(["fsc", str(a), str(b), "--plot", str(png), "-o", str(txt)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    freqs, curve = masked_fsc(gt, lowpassed)
    data = np.loadtxt(txt)
    np.testing.assert_allclose(data[:, 0], freqs)
    np.testing.assert_allclose(data[:, 1], freqs / apix)
    np.testing.assert_allclose(data[:, 2], curve, atol=1e-5)
    assert np.all(curve[:4] > 0.99) and curve[6] < 0.5
    res05 = float(line.split("FSC=0.5: ")[1].split(" 1/px")[0])
    assert 4 / D <= res05 <= 6 / D
    assert png.stat().st_size > 1000
    # the header voxel size is overridden by --apix; a mask multiplies both maps
    mask = tmp_path / "mask.mrc"
    write_mrc(mask, np.ones_like(gt), apix, is_volume=True)
    assert cli.main(["fsc", str(a), str(a), "--mask", str(mask), "--apix", "1.5"]) == 0
    assert "= 3.00 A" in capsys.readouterr().out
    small = tmp_path / "small.mrc"
    write_mrc(small, gt[:8, :8, :8], apix, is_volume=True)
    assert cli.main(["fsc", str(a), str(small)]) == 2
