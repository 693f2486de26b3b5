"""gen-mask, flip-hand, downsample-vol and fsc --corrected / multi-curve plots, through the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from distdrgn.analysis.reconstruct import masked_fsc
from distdrgn.cli import main
from distdrgn.formats.mrc import read_volume, write_mrc
from distdrgn.volume_ops import corrected_fsc, read_fsc_curves, soft_mask

D = 32


def _grid(n=D):
    k = np.arange(n) - n // 2
    return np.meshgrid(k, k, k, indexing="ij")  # z, y, x


def _chiral(n=D):
    """Three blobs of different sizes on the +x, +y, +z axes: not mirror-symmetric."""
    z, y, x = _grid(n)
    vol = np.zeros((n, n, n))
    for (cz, cy, cx), s in (((0, 0, 6), 1.5), ((0, 7, 0), 2.0), ((8, 0, 0), 2.5), ((3, 2, 1), 1.0)):
        vol += np.exp(-((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) / (2 * s * s))
    return vol.astype(np.float32)


def _rotations(v):
    """The 24 proper rotations of a cube about its centre voxel (axis permutations and flips, det +1)."""
    import itertools

    out = []
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((1, -1), repeat=3):
            sign = np.linalg.det(np.eye(3)[list(perm)]) * np.prod(flips)
            if sign < 0:
                continue
            w = np.transpose(v, perm)
            for ax, fl in enumerate(flips):
                if fl < 0:  # mirror about the centre voxel c: index i -> 2c - i (wraps index 0)
                    w = np.roll(np.flip(w, ax), 1, axis=ax)
            out.append(w)
    assert len(out) == 24
    return out


def _fft(v):
    return np.fft.fftshift(np.fft.fftn(np.fft.fftshift(v)))


def test_flip_hand_twice_is_identity_and_mirrors_z(tmp_path, capsys):
    vol = _chiral()
    src, once, twice = tmp_path / "v.mrc", tmp_path / "f.mrc", tmp_path / "ff.mrc"
    write_mrc(src, vol, 1.7, is_volume=True)
    assert main(["flip-hand", str(src), "-o", str(once)]) == 0
    assert main(["flip-hand", str(once), "-o", str(twice)]) == 0
    f, apix = read_volume(once)
    ff, _ = read_volume(twice)
    assert apix == pytest.approx(1.7)
    np.testing.assert_array_equal(ff, vol)
    np.testing.assert_array_equal(f, vol[::-1])
    assert not np.allclose(f, vol)  # the test volume is chiral
    # the mirror image is no rotation of the original (none of the 24 axis-aligned rotations)
    # (compared about the centre voxel, as the rotations are: vol[::-1] mirrors about D/2 - 1/2)
    centred = np.roll(f, 1, axis=0)
    assert all(not np.allclose(centred, rot, atol=1e-3) for rot in _rotations(vol))
    assert sum(np.allclose(vol, rot) for rot in _rotations(vol)) == 1  # (the identity is among them)
    # default output name
    assert main(["flip-hand", str(src)]) == 0
    assert (tmp_path / "v_flipped.mrc").exists()


def test_downsample_vol_keeps_low_frequencies_and_scales_apix(tmp_path, capsys):
    rng = np.random.default_rng(0)
    vol = rng.standard_normal((D, D, D)).astype(np.float32)
    src, out = tmp_path / "v.mrc", tmp_path / "v16.mrc"
    write_mrc(src, vol, 1.5, is_volume=True)
    assert main(["downsample-vol", str(src), "-D", "16", "-o", str(out)]) == 0
    small, apix = read_volume(out)
    assert small.shape == (16, 16, 16)
    assert apix == pytest.approx(3.0)
    big_f, small_f = _fft(vol.astype(np.float64)), _fft(small.astype(np.float64))
    s = D // 2 - 8
    crop = big_f[s : s + 16, s : s + 16, s : s + 16]
    # interior frequencies (all but the -Nyquist planes of the small box) are kept exactly
    np.testing.assert_allclose(small_f[1:, 1:, 1:], crop[1:, 1:, 1:], rtol=1e-4, atol=1e-3)
    assert small.sum() == pytest.approx(vol.sum(), abs=1e-2)  # DC term kept
    assert main(["downsample-vol", str(src), "-D", "15", "-o", str(out)]) == 2
    assert main(["downsample-vol", str(src), "-D", "64", "-o", str(out)]) == 2
    assert "even" in capsys.readouterr().err


def test_gen_mask_of_sphere(tmp_path, capsys):
    z, y, x = _grid()
    r = np.sqrt(z**2 + y**2 + x**2)
    sphere = (r <= 5).astype(np.float32)
    apix = 2.0
    src, out = tmp_path / "s.mrc", tmp_path / "m.mrc"
    write_mrc(src, sphere, apix, is_volume=True)
    # dilate 4 A = 2 px, cosine edge 8 A = 4 px
    assert main(["gen-mask", str(src), "-o", str(out), "--threshold", "0.5", "--dilate", "4", "--dist", "8"]) == 0
    mask, mapix = read_volume(out)
    assert mapix == pytest.approx(apix)
    assert mask.min() >= 0 and mask.max() <= 1
    assert np.all(mask[r <= 6.5] == 1.0)  # sphere + dilation (less lattice slack)
    assert np.all(mask[r >= 11.5] == 0.0)  # beyond sphere + dilation + edge (+ lattice slack)
    # the edge along +x: monotone, from 1 to 0 over about 4 px, cosine-shaped
    prof = mask[D // 2, D // 2, D // 2 :]
    assert np.all(np.diff(prof) <= 1e-6)
    edge = (prof > 0) & (prof < 1)
    assert 3 <= edge.sum() <= 4
    np.testing.assert_allclose(prof[7:12], np.cos(np.pi / 2 * np.arange(5) / 4), atol=1e-6)
    # default threshold (half the 99.99th percentile) on a smooth blob; hard mask with --dist 0
    blob = np.exp(-(r**2) / (2 * 3.0**2)).astype(np.float32)
    write_mrc(src, blob, 1.0, is_volume=True)
    assert main(["gen-mask", str(src), "-o", str(out), "--dilate", "0", "--dist", "0"]) == 0
    hard, _ = read_volume(out)
    np.testing.assert_array_equal(hard, (blob >= np.percentile(blob, 99.99) / 2).astype(np.float32))
    assert main(["gen-mask", str(src), "-o", str(out), "--threshold", "5"]) == 2
    assert "threshold" in capsys.readouterr().err


def _band(v, r, keep):
    return np.fft.ifftshift(np.fft.ifftn(np.fft.ifftshift(_fft(v) * keep))).real


def _half_maps(seed=0):
    """Half-maps: a signal low-passed to shell 6, plus independent noise above shell 6 only.

    Beyond shell 6 the two maps are independent (unmasked FSC ~ 0), but a tight hard mask
    cut from the signal gives both the same sharp edge, which correlates them there.
    """
    rng = np.random.default_rng(seed)
    z, y, x = _grid()
    r = np.sqrt(z**2 + y**2 + x**2)
    sig = _band(_chiral(), r, r <= 6)
    amp = 0.05 * float(np.abs(sig).max())
    h1 = sig + amp * _band(rng.standard_normal(sig.shape), r, r > 6)
    h2 = sig + amp * _band(rng.standard_normal(sig.shape), r, r > 6)
    return sig.astype(np.float32), h1.astype(np.float32), h2.astype(np.float32), r


def test_corrected_fsc_equals_plain_below_threshold_and_is_lower_with_tight_mask(tmp_path, capsys):
    sig, h1, h2, r = _half_maps()
    # a tight hard mask around the signal: its sharp edge correlates the masked noise-free parts
    tight = soft_mask(sig, threshold=0.3 * float(sig.max()), dilate=0, dist=0, apix=1.0)
    assert np.abs(masked_fsc(h1, h2)[1][8:]).max() < 0.15  # unmasked: no correlation beyond shell 7
    freqs, plain, corr, s0 = corrected_fsc(h1, h2, tight, 0.25, seed=0)
    assert s0 == 8
    np.testing.assert_array_equal(corr[: s0 + 1], plain[: s0 + 1])  # unchanged up to the randomisation shell
    assert plain[s0 + 1 :].min() > 0.5  # the tight mask's spurious correlation
    assert corr[s0 + 1 :].max() < 0.15  # removed by the correction
    assert np.all(corr[s0 + 1 :] <= plain[s0 + 1 :])
    # through the CLI: the text file has both curves; the plain one matches `fsc` without --corrected
    a, b, m = tmp_path / "a.mrc", tmp_path / "b.mrc", tmp_path / "m.mrc"
    write_mrc(a, h1, 2.0, is_volume=True)
    write_mrc(b, h2, 2.0, is_volume=True)
    write_mrc(m, tight, 2.0, is_volume=True)
    txt, png = tmp_path / "fsc.txt", tmp_path / "fsc.png"
    # 8 A at 2 A/px = 0.25 1/px
    assert main(["fsc", str(a), str(b), "--mask", str(m), "--corrected", "8", "-o", str(txt), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "shell 8" in out and "corrected:" in out
    data = np.loadtxt(txt)
    assert data.shape == (D // 2 + 1, 4)  # freq_1/px freq_1/A fsc fsc_corrected
    _, plain_m = masked_fsc(h1, h2, tight)
    np.testing.assert_allclose(data[:, 2], plain_m, atol=1e-5)
    np.testing.assert_allclose(data[:, 3], corr, atol=1e-5)
    assert png.stat().st_size > 1000
    # the fraction form (cycles/pixel) gives the same curve
    assert main(["fsc", str(a), str(b), "--mask", str(m), "--corrected", "0.25", "-o", str(txt)]) == 0
    np.testing.assert_allclose(np.loadtxt(txt)[:, 3], corr, atol=1e-5)


def test_fsc_several_pairs_and_curve_files_in_one_plot(tmp_path, capsys):
    sig, h1, h2, _ = _half_maps()
    paths = {}
    for name, v in (("a", h1), ("b", h2), ("s", sig)):
        paths[name] = tmp_path / f"{name}.mrc"
        write_mrc(paths[name], v, 1.0, is_volume=True)
    # one pair: the output is as before (a single summary line)
    assert main(["fsc", str(paths["a"]), str(paths["b"])]) == 0
    single = capsys.readouterr().out.strip()
    assert single.startswith("FSC=0.5:") and "\n" not in single
    txt1 = tmp_path / "ab.txt"
    assert main(["fsc", str(paths["a"]), str(paths["b"]), "-o", str(txt1)]) == 0
    capsys.readouterr()
    png, txt = tmp_path / "multi.png", tmp_path / "multi.txt"
    argv = ["fsc", str(paths["a"]), str(paths["b"]), str(paths["a"]), str(paths["s"]), "--plot", str(png), "-o", str(txt)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count(" vs ") == 2
    data = np.loadtxt(txt)
    np.testing.assert_allclose(data[:, 2], masked_fsc(h1, h2)[1], atol=1e-5)  # after freq_1/px, freq_1/A
    np.testing.assert_allclose(data[:, 3], masked_fsc(h1, sig)[1], atol=1e-5)
    assert png.stat().st_size > 1000
    freqs, curves = read_fsc_curves(txt)
    assert len(curves) == 2 and len(freqs) == D // 2 + 1
    # a plot of curve files only (ours and cryoDRGN's 'pixres fsc' layout)
    cdrgn = tmp_path / "cdrgn.txt"
    f, c = masked_fsc(h1, sig)
    cdrgn.write_text("pixres fsc\n" + "".join(f"{a:.6f} {b:.6f}\n" for a, b in zip(f[:-1], c[:-1])))
    png2 = tmp_path / "curves.png"
    assert main(["fsc", "--curves", str(txt1), str(txt), str(cdrgn), "--plot", str(png2)]) == 0
    assert png2.stat().st_size > 1000
    _, cc = read_fsc_curves(cdrgn)
    np.testing.assert_allclose(cc["cdrgn"], c[:-1], atol=1e-5)
    assert main(["fsc", str(paths["a"])]) == 2
    assert main(["fsc", "--curves", str(txt1)]) == 2
