"""Validation reconstructions: voxel back-projection of a store (with half-maps) and FSC.

:func:`backproject_store` reads the (selected) images of a store once, chunk by chunk,
and feeds each batch to three streaming :func:`distdrgn.projection.backproject`
reconstructions running in threads: the full set, the even-numbered and the odd-numbered
selected particles (the two half-maps). So the store is read a single time, at most a
few batches are in memory, and the accumulators take 24 * D^3 bytes per map.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distdrgn.errors import DistdrgnError, StoreError

_END = object()


@dataclass(frozen=True)
class Reconstruction:
    """volume, half1, half2: (D, D, D) float32 (halves None without half-maps); apix:
    voxel size in A or None; positions: (n,) store positions used, in reading order."""

    volume: np.ndarray
    half1: np.ndarray | None
    half2: np.ndarray | None
    apix: float | None
    positions: np.ndarray


class _Consumer(threading.Thread):
    """One streaming back-projection fed through a bounded queue of image batches."""

    def __init__(self, name: str, rots, trans, ctf, kwargs: dict):
        super().__init__(name=name, daemon=True)
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.args = (rots, trans, ctf)
        self.kwargs = kwargs
        self.result = None
        self.error: BaseException | None = None

    def _batches(self):
        while True:
            item = self.q.get()
            if item is _END:
                return
            yield item

    def run(self) -> None:
        from distdrgn.projection import backproject

        try:
            self.result = backproject(self._batches(), *self.args, **self.kwargs)
        except BaseException as exc:  # handed to the main thread
            self.error = exc

    def put(self, item) -> None:
        # never block forever on a consumer that has died
        while self.is_alive():
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue


def backproject_store(
    store_path: str | Path,
    ind=None,
    level: int | None = None,
    first: int | None = None,
    invert: bool = True,
    half_maps: bool = True,
    device: str | None = None,
    interpolation: str = "trilinear",
    reg: float = 1e-3,
    progress: bool = True,
) -> Reconstruction:
    """Back-project the posed, CTF-weighted images of a store.

    ind: ind.pkl path or integer array of store positions (default all; used sorted, which
    is the reading order); first: keep only the first N of them; invert: multiply the
    images by -1 first (the cryoDRGN default for extracted stacks with white particles;
    False = ``--uninvert-data``). Half-maps are the even- and odd-numbered particles of
    that list.
    """
    from tqdm import tqdm

    from distdrgn.formats.ind import load_indices
    from distdrgn.store.reader import ParticleStore

    store = ParticleStore.open(store_path, level)
    if store.poses is None:
        raise StoreError(f"{store.path}: the store has no poses to back-project with (ingest it with --poses)")
    positions = np.arange(store.n, dtype=np.int64) if ind is None else np.unique(load_indices(ind, store.n))
    if first is not None:
        if first < 1:
            raise DistdrgnError(f"--first must be >= 1, got {first}")
        positions = positions[:first]
    if half_maps and positions.size < 2:
        raise DistdrgnError(f"half-maps need at least 2 particles, {positions.size} selected")
    rots, trans = store.poses
    ctf = store.ctf
    kwargs = {"interpolation": interpolation, "reg": reg, "device": device}

    def rows(sub: np.ndarray):
        return rots[sub], trans[sub], None if ctf is None else ctf[sub]

    consumers = [_Consumer("full", *rows(positions), kwargs)]
    if half_maps:
        consumers.append(_Consumer("half1", *rows(positions[0::2]), kwargs))
        consumers.append(_Consumer("half2", *rows(positions[1::2]), kwargs))
    for c in consumers:
        c.start()
    sign = -1.0 if invert else 1.0
    batch = store.chunk_images
    try:
        for start in tqdm(range(0, positions.size, batch), desc="backproject", unit="batch", disable=not progress):
            imgs = store.images(positions[start : start + batch])
            if invert:
                imgs *= sign
            consumers[0].put(imgs)
            if half_maps:
                parity = (start + np.arange(len(imgs))) % 2
                for c, p in zip(consumers[1:], (0, 1)):
                    part = imgs[parity == p]
                    if len(part):
                        c.put(part)
            if any(c.error is not None for c in consumers):
                break
    finally:
        for c in consumers:
            c.put(_END)
        for c in consumers:
            c.join()
    for c in consumers:
        if c.error is not None:
            raise c.error
    vols = [c.result.numpy() for c in consumers]
    return Reconstruction(
        volume=vols[0],
        half1=vols[1] if half_maps else None,
        half2=vols[2] if half_maps else None,
        apix=store.apix,
        positions=positions,
    )


def masked_fsc(vol1: np.ndarray, vol2: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """FSC of two (D, D, D) volumes, each multiplied by ``mask`` (same shape) first.

    Returns (freqs (D/2+1,) cycles/pixel, curve (D/2+1,)); see :func:`distdrgn.projection.fsc`.
    """
    from distdrgn.projection import fsc

    if vol1.shape != vol2.shape:
        raise DistdrgnError(f"volumes have different shapes {vol1.shape} and {vol2.shape}")
    if mask is not None:
        if mask.shape != vol1.shape:
            raise DistdrgnError(f"mask shape {mask.shape} differs from the volumes' {vol1.shape}")
        vol1, vol2 = vol1 * mask, vol2 * mask
    return fsc(vol1, vol2)


@dataclass(frozen=True)
class FscSummary:
    """Crossings of an FSC curve: frequencies in cycles/pixel, resolutions in A (None without apix)."""

    freq_05: float
    freq_0143: float
    apix: float | None

    def resolution(self, freq: float) -> float | None:
        return None if self.apix is None or freq <= 0 else self.apix / freq

    def describe(self) -> str:
        parts = []
        for label, f in (("0.5", self.freq_05), ("0.143", self.freq_0143)):
            res = self.resolution(f)
            parts.append(f"FSC={label}: {f:.4f} 1/px" + (f" = {res:.2f} A" if res is not None else f" = {1 / f:.2f} px"))
        return "; ".join(parts)


def summarize_fsc(freqs: np.ndarray, curve: np.ndarray, apix: float | None) -> FscSummary:
    from distdrgn.projection import fsc_resolution

    return FscSummary(fsc_resolution(freqs, curve, 0.5), fsc_resolution(freqs, curve, 0.143), apix)


def write_fsc_txt(path: str | Path, freqs: np.ndarray, curve: np.ndarray, apix: float | None) -> None:
    """Columns: shell frequency (1/px), frequency (1/A, only with apix), FSC."""
    if apix:
        data = np.column_stack([freqs, freqs / apix, curve])
        header = "freq_1/px freq_1/A fsc"
    else:
        data = np.column_stack([freqs, curve])
        header = "freq_1/px fsc"
    np.savetxt(path, data, fmt="%.6g", header=header)


def plot_fsc(path: str | Path, freqs: np.ndarray, curve: np.ndarray, summary: FscSummary, title: str = "FSC") -> Path:
    """FSC curve with the 0.5 and 0.143 thresholds marked, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no backend or window involved

    x = freqs / summary.apix if summary.apix else freqs
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(x, curve, lw=1.5)
    for thr, f, style in ((0.5, summary.freq_05, "--"), (0.143, summary.freq_0143, ":")):
        ax.axhline(thr, color="grey", ls=style, lw=0.8)
        res = summary.resolution(f)
        xf = f / summary.apix if summary.apix else f
        ax.axvline(xf, color="grey", ls=style, lw=0.8)
        ax.text(xf, thr + 0.03, f" {res:.1f} A" if res else f" {f:.3f}", fontsize=8)
    ax.set_xlabel("spatial frequency (1/A)" if summary.apix else "spatial frequency (1/px)")
    ax.set_ylabel("FSC")
    ax.set_ylim(min(-0.05, float(np.min(curve)) - 0.05), 1.05)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)
