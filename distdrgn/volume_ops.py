"""Volume utilities: soft masks, handedness, Fourier cropping, corrected FSC, FSC plots.

Volumes are real ``(D, D, D)`` numpy arrays indexed ``[z, y, x]`` (as
:func:`distdrgn.formats.mrc.read_volume` returns them). The behaviour follows cryoDRGN
4.3.1's ``gen_mask``, ``flip_hand``, ``downsample --is-vol``, ``fsc --corrected`` and
``plot_fsc``; the differences are stated in each docstring.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distdrgn.errors import DistdrgnError
from distdrgn.fft import fft3_center, ht3_center, ifft3_center, iht3_center


def _check_cube(vol: np.ndarray, what: str = "volume") -> None:
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise DistdrgnError(f"{what} must be a cubic (D, D, D) array, got shape {vol.shape}")


# --- gen-mask ---------------------------------------------------------------------------


def default_mask_threshold(vol: np.ndarray) -> float:
    """cryoDRGN's default threshold: half the 99.99th percentile of the density (~ half the max)."""
    return float(np.percentile(vol, 99.99)) / 2.0


def soft_mask(
    vol: np.ndarray,
    threshold: float | None = None,
    dilate: float = 25.0,
    dist: float = 15.0,
    apix: float = 1.0,
) -> np.ndarray:
    """Soft mask (D, D, D) float32 in [0, 1] from a (D, D, D) volume.

    1. binary mask ``vol >= threshold`` (default :func:`default_mask_threshold`);
    2. dilated by ``dilate`` Angstrom: every voxel within ``dilate / apix`` voxels
       (Euclidean distance; cryoDRGN repeats a 6-neighbour dilation ``int(dilate // apix)``
       times, which grows an octahedron instead of a ball) of the thresholded region;
    3. a cosine edge of width ``dist`` Angstrom: at Euclidean distance ``d`` voxels from the
       dilated region the value is ``cos(pi/2 * d / (dist/apix))``, 0 from ``dist/apix`` on.
       ``dist = 0`` gives a hard mask.
    """
    from scipy.ndimage import distance_transform_edt

    vol = np.asarray(vol)
    _check_cube(vol)
    if apix is None or apix <= 0:
        raise DistdrgnError(f"voxel size must be positive, got {apix}")
    if dilate < 0 or dist < 0:
        raise DistdrgnError(f"--dilate and --dist must be >= 0, got {dilate} and {dist}")
    thr = default_mask_threshold(vol) if threshold is None else float(threshold)
    core = vol >= thr
    if not core.any():
        raise DistdrgnError(f"no voxel is at or above the threshold {thr:.5g} (max {float(vol.max()):.5g})")
    dil_px = dilate / apix
    edge_px = dist / apix
    # distance (voxels) of every voxel to the thresholded region (0 inside it)
    d_core = distance_transform_edt(~core)
    region = d_core <= dil_px if dil_px > 0 else core
    if edge_px <= 0:
        return region.astype(np.float32)
    d = distance_transform_edt(~region)
    d = np.minimum(d, edge_px)
    mask = np.cos(0.5 * np.pi * d / edge_px)
    mask[d >= edge_px] = 0.0
    return np.clip(mask, 0.0, 1.0).astype(np.float32)


# --- flip-hand --------------------------------------------------------------------------


def flip_hand(vol: np.ndarray) -> np.ndarray:
    """Mirror (D, D, D) ``[z, y, x]`` along z (cryoDRGN: ``vol[::-1]``), inverting the handedness."""
    vol = np.asarray(vol)
    if vol.ndim != 3:
        raise DistdrgnError(f"volume must be a (D, D, D) array, got shape {vol.shape}")
    return np.ascontiguousarray(vol[::-1])


# --- downsample-vol ---------------------------------------------------------------------


def downsample_volume(vol: np.ndarray, d: int) -> np.ndarray:
    """Fourier-crop a (D, D, D) volume to (d, d, d), d even and <= D (float32).

    As cryoDRGN's ``downsample --is-vol``: the centred Hartley transform is cropped to its
    central d^3 frequencies and inverted with the ``1/d^3`` normalisation, so the
    unnormalised transform coefficients (and the DC term, the map's integral) are kept;
    voxel values therefore scale by (D/d)^3. The voxel size becomes ``apix * D / d``
    (:func:`downsampled_apix`).
    """
    vol = np.asarray(vol)
    _check_cube(vol)
    D = vol.shape[0]
    if d <= 0 or d % 2 or d > D:
        raise DistdrgnError(f"new box {d} must be even, positive and at most the current box {D}")
    if d == D:
        return vol.astype(np.float32)
    start = D // 2 - d // 2
    h = ht3_center(torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float64)))
    h = h[start : start + d, start : start + d, start : start + d]
    return iht3_center(h).numpy().astype(np.float32)


def downsampled_apix(apix: float | None, D: int, d: int) -> float | None:
    """Voxel size after Fourier cropping a box of D to d: ``apix * D / d`` (None stays None)."""
    return None if apix is None else float(apix) * D / d


# --- FSC with phase randomisation --------------------------------------------------------


def randomize_phases(vol: np.ndarray, shell: int, rng: np.random.Generator) -> np.ndarray:
    """Replace the phases of a real (D, D, D) volume at ``round(|k| D) >= shell`` with random ones.

    Amplitudes are kept. The random phases are those of the transform of real white noise,
    so they are Hermitian-symmetric and the result stays real (cryoDRGN draws one phase per
    voxel independently and keeps the complex result). Returns (D, D, D) float64.
    """
    D = vol.shape[0]
    f = fft3_center(torch.from_numpy(np.asarray(vol, dtype=np.float64)))
    noise = torch.from_numpy(rng.standard_normal(vol.shape))
    phase = fft3_center(noise)
    phase = phase / phase.abs().clamp_min(1e-300)
    k = torch.arange(D, dtype=torch.float64) - D // 2
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    sel = torch.round(r) >= shell
    f = torch.where(sel, f.abs() * phase, f)
    return ifft3_center(f).real.numpy()


def corrected_fsc(
    vol1: np.ndarray,
    vol2: np.ndarray,
    mask: np.ndarray | None,
    freq: float,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Mask-corrected FSC by high-resolution noise substitution (Chen et al. 2013; cryoDRGN ``--corrected``).

    ``freq`` is the randomisation frequency in cycles/pixel (0 < freq <= 0.5); phases of both
    half-maps (independently) are randomised from shell ``s0 = int(freq * D)`` on, the
    randomised maps are masked and their FSC ``rand`` is computed. For shells ``s > s0``
    the corrected value is ``clip((fsc - rand) / (1 - rand), 0, 1)`` (0 where rand == 1),
    as cryoDRGN does; shells ``s <= s0`` keep the plain masked FSC.

    Returns (freqs (D/2+1,), plain (D/2+1,), corrected (D/2+1,), s0); shells as
    :func:`distdrgn.projection.fsc`.
    """
    from distdrgn.analysis.reconstruct import masked_fsc

    if not 0 < freq <= 0.5:
        raise DistdrgnError(f"randomisation frequency must be in (0, 0.5] cycles/pixel, got {freq:.4g}")
    freqs, plain = masked_fsc(vol1, vol2, mask)
    D = vol1.shape[0]
    s0 = int(freq * D)
    rng = np.random.default_rng(seed)
    r1 = randomize_phases(vol1, s0, rng)
    r2 = randomize_phases(vol2, s0, rng)
    _, rand = masked_fsc(r1, r2, mask)
    corr = plain.copy()
    for s in range(s0 + 1, len(plain)):
        p = rand[s]
        if p >= 1.0:
            corr[s] = 0.0
        elif np.isfinite(p):
            corr[s] = float(np.clip((plain[s] - p) / (1.0 - p), 0.0, 1.0))
    return freqs, plain, corr, s0


def corrected_freq(value: float, apix: float | None) -> float:
    """cryoDRGN's ``--corrected`` value: >= 1 is a resolution in Angstrom (-> apix / value), < 1 cycles/pixel."""
    if value <= 0:
        raise DistdrgnError(f"--corrected must be positive, got {value}")
    if value >= 1:
        return (apix or 1.0) / value
    return float(value)


# --- FSC curve files and plots ----------------------------------------------------------


def read_fsc_curves(path: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Curves of an FSC text file: (freqs (S,) cycles/pixel, {label: curve (S,)}).

    Reads what ``distdrgn fsc -o`` writes (``# freq_1/px [freq_1/A] fsc [...]``) and
    cryoDRGN's ``pixres fsc`` files; a single unlabelled column is a curve over shells
    ``s / (2 (S - 1))``.
    """
    path = Path(path)
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except OSError as exc:
        raise DistdrgnError(f"{path}: cannot read FSC curve ({exc.strerror})") from None
    if not lines:
        raise DistdrgnError(f"{path}: empty FSC curve file")
    names: list[str] | None = None
    first = lines[0].lstrip("#").split()
    try:
        [float(x) for x in first]
        if lines[0].startswith("#"):
            lines = lines[1:]
    except ValueError:
        names = first
        lines = lines[1:]
    lines = [ln for ln in lines if not ln.startswith("#")]
    try:
        data = np.array([[float(x) for x in ln.split()] for ln in lines], dtype=np.float64)
    except ValueError:
        raise DistdrgnError(f"{path}: FSC curve has a non-numeric row") from None
    if data.ndim != 2 or data.shape[0] < 2:
        raise DistdrgnError(f"{path}: expected rows of numbers (at least two shells)")
    stem = path.stem
    if data.shape[1] == 1:
        n = data.shape[0]
        return np.arange(n) / (2.0 * (n - 1)), {stem: data[:, 0]}
    if names is None or len(names) != data.shape[1]:
        names = ["freq"] + ["fsc"] * (data.shape[1] - 1) if data.shape[1] == 2 else None
        if names is None:
            raise DistdrgnError(f"{path}: {data.shape[1]} unlabelled columns; expected (frequency, FSC)")
    freqs = data[:, 0]
    skip = {"freq_1/a", "freq_1/px", "pixres", "freq"}
    curves = {}
    for name, col in zip(names[1:], data[:, 1:].T):
        if name.lower() in skip:
            continue
        label = stem if name.lower() == "fsc" else f"{stem} {name}"
        curves[label] = col
    if not curves:
        raise DistdrgnError(f"{path}: no FSC column")
    return freqs, curves


def plot_fsc_curves(
    path: str | Path,
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    apix: float | None = None,
    title: str = "FSC",
) -> Path:
    """Several FSC curves ``{label: (freqs (S,) cycles/pixel, curve (S,))}`` on one PNG.

    The 0.5 and 0.143 thresholds are drawn; each label gets its 0.143 resolution appended
    (in Angstrom with ``apix``, else in pixels). The x axis is 1/A with ``apix``.
    """
    from matplotlib.figure import Figure

    from distdrgn.projection import fsc_resolution

    if not curves:
        raise DistdrgnError("no FSC curve to plot")
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    lo = 0.0
    for label, (freqs, curve) in curves.items():
        f143 = fsc_resolution(freqs, curve, 0.143)
        res = f"{apix / f143:.2f} A" if apix and f143 > 0 else (f"{1 / f143:.2f} px" if f143 > 0 else "n/a")
        x = freqs / apix if apix else freqs
        ax.plot(x, curve, lw=1.5, label=f"{label} ({res})")
        lo = min(lo, float(np.nanmin(curve)))
    for thr, style in ((0.5, "--"), (0.143, ":")):
        ax.axhline(thr, color="grey", ls=style, lw=0.8)
    ax.set_xlabel("spatial frequency (1/A)" if apix else "spatial frequency (1/px)")
    ax.set_ylabel("FSC")
    ax.set_ylim(lo - 0.05, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)
