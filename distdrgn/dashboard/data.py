"""The per-particle variables of a run that the dashboard plots, and where its files are.

Row i of every variable is row i of the run's ``z.pkl``. Those rows are the store positions
the run was trained on (``RunData.positions``: every particle, or the ``data.ind`` subset),
so selections are saved as store positions, the layout ``--ind`` options read.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from distdrgn.analysis.analyze import resolve_epoch
from distdrgn.errors import DistdrgnError

log = logging.getLogger(__name__)


@dataclass
class RunData:
    """One epoch of a run, loaded for the dashboard.

    z: (N, zdim) float32; columns: name -> (N,) float32 variable, in display order;
    categorical: the names among them whose values are labels; positions: (N,) int64 store
    position of each row; store: the particle store path (None when unknown).
    """

    run_dir: Path
    epoch_label: str
    epoch: int | None
    z: np.ndarray
    columns: dict[str, np.ndarray]
    categorical: set[str]
    positions: np.ndarray
    store: Path | None
    analyze_dir: Path | None
    landscape_dir: Path | None
    centers_ind: np.ndarray | None  # (K,) rows of the k-means on-data centres
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.z.shape[0]


def _load_config(run_dir: Path) -> dict:
    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _find_analysis(run_dir: Path, prefix: str, label: str) -> Path | None:
    """``RUN/<prefix>.<label>`` if present, else the most recent ``RUN/<prefix>.*`` directory."""
    exact = run_dir / f"{prefix}.{label}"
    if exact.is_dir():
        return exact
    found = sorted((p for p in run_dir.glob(f"{prefix}.*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _kmeans_dir(analyze_dir: Path) -> Path | None:
    found = sorted(analyze_dir.glob("kmeans*/labels.pkl"))
    return found[0].parent if found else None


def store_of_run(run_dir: Path, cfg: dict, store: str | Path | None) -> Path | None:
    """The particle store: ``store`` if given, else ``data.store`` of a distdrgn config (if it exists)."""
    if store is not None:
        path = Path(store)
        if not path.is_dir():
            raise DistdrgnError(f"{path}: no such particle store")
        return path
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    candidate = data.get("store")
    if candidate:
        path = Path(candidate)
        if not path.is_absolute():
            path = run_dir / path
        if path.is_dir():
            return path
    return None


def _positions(cfg: dict, n_rows: int, n_store: int | None) -> np.ndarray:
    """Store position of each z row: the data.ind subset (sorted) or 0..N-1."""
    from distdrgn.formats.ind import load_indices

    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    ind = data.get("ind") or (cfg.get("dataset_args") or {}).get("ind")
    if ind and Path(ind).is_file():
        keep = np.unique(load_indices(ind, n_store if n_store is not None else np.iinfo(np.int64).max))
        if len(keep) == n_rows:
            return keep
    return np.arange(n_rows, dtype=np.int64)


def _source_numeric(store_path: Path, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Numeric columns of the store's source .star/.cs at ``positions`` (text columns skipped)."""
    import zarr

    from distdrgn.store import layout as L

    group = zarr.open_group(store_path, mode="r")
    try:
        src = group[L.SOURCE_GROUP]
    except KeyError:
        return {}
    attrs = dict(src.attrs)
    out: dict[str, np.ndarray] = {}
    if attrs.get("kind") == "star":
        import pandas as pd

        for i, col in enumerate(attrs.get("columns") or []):
            text = np.asarray(src[f"particles/c{i:04d}"][...], dtype=object)[positions]
            values = pd.to_numeric(pd.Series(text), errors="coerce").to_numpy(dtype=np.float64)
            if np.isfinite(values).any() and not np.isnan(values).all() and np.isnan(values).mean() < 0.5:
                out[col] = values.astype(np.float32)
    elif attrs.get("kind") == "cs":
        for i, name in enumerate(attrs.get("fields") or []):
            arr = src[f"cs/c{i:04d}"]
            if arr.attrs.get("stored_as") != "values":
                continue
            values = np.asarray(arr[...])[positions]
            if values.dtype.kind not in "biuf" or name == "uid":
                continue
            values = values.reshape(len(positions), -1)
            if values.shape[1] == 1:
                out[name] = values[:, 0].astype(np.float32)
            elif values.shape[1] <= 4:
                for j in range(values.shape[1]):
                    out[f"{name}[{j}]"] = values[:, j].astype(np.float32)
    return out


def load_run(run_dir: str | Path, epoch: int | None = None, store: str | Path | None = None) -> RunData:
    """Gather the dashboard's variables for one epoch of ``run_dir`` (distdrgn or cryoDRGN run)."""
    from distdrgn.analysis import latent

    which = resolve_epoch(run_dir, epoch)
    run_dir = which.run_dir
    cfg = _load_config(run_dir)
    z = latent.load_z(which.z_path).astype(np.float32)
    n, zdim = z.shape
    cols: dict[str, np.ndarray] = {}
    categorical: set[str] = set()
    notes: list[str] = []

    analyze_dir = _find_analysis(run_dir, "analyze", which.label)
    umap_path = analyze_dir / "umap.npy" if analyze_dir else None
    if umap_path is not None and umap_path.is_file():
        emb = np.load(umap_path)
        if emb.shape == (n, 2):
            cols["UMAP1"], cols["UMAP2"] = emb[:, 0].astype(np.float32), emb[:, 1].astype(np.float32)
    else:
        notes.append("no UMAP (run 'distdrgn analyze' with UMAP to get one)")
    pca_path = analyze_dir / "z_pca.npy" if analyze_dir else None
    if pca_path is not None and pca_path.is_file() and np.load(pca_path, mmap_mode="r").shape == (n, zdim):
        z_pca = np.load(pca_path).astype(np.float32)
    else:  # a streaming PCA of N x zdim takes well under a second even at 1M
        pca = latent.fit_pca(z)
        z_pca = pca.transform(z).astype(np.float32)
    for j in range(min(zdim, 10)):
        cols[f"PC{j + 1}"] = z_pca[:, j]
    for j in range(zdim):
        cols[f"z{j + 1}"] = z[:, j]
    cols["|z|"] = np.linalg.norm(z, axis=1).astype(np.float32)

    centers_ind = None
    kdir = _kmeans_dir(analyze_dir) if analyze_dir else None
    if kdir is not None:
        with open(kdir / "labels.pkl", "rb") as f:
            labels = np.asarray(pickle.load(f))
        if labels.shape == (n,):
            name = f"k-means ({kdir.name[6:]})"
            cols[name] = labels.astype(np.float32)
            categorical.add(name)
            ci = kdir / "centers_ind.txt"
            if ci.is_file():
                centers_ind = np.atleast_1d(np.loadtxt(ci, dtype=np.int64))

    landscape_dir = _find_analysis(run_dir, "landscape", which.label)
    if landscape_dir is not None and (landscape_dir / "z_labels.npy").is_file():
        labels = np.load(landscape_dir / "z_labels.npy")
        if labels.shape == (n,):
            cols["landscape cluster"] = labels.astype(np.float32)
            categorical.add("landscape cluster")

    store_path = store_of_run(run_dir, cfg, store)
    positions = np.arange(n, dtype=np.int64)
    if store_path is not None:
        from distdrgn.formats.poses import rot_to_euler
        from distdrgn.store.reader import ParticleStore

        st = ParticleStore.open(store_path)
        positions = _positions(cfg, n, st.n)
        if len(positions) != st.n and np.array_equal(positions, np.arange(n)) or positions.max(initial=-1) >= st.n:
            # without a data.ind subset the rows of z are the store's particles, one to one
            raise DistdrgnError(f"{store_path}: {st.n} particles, but the run has {n} latents "
                                "(is it the store this run was trained on?)")
        if st.ctf is not None:
            ctf = st.ctf[positions]
            cols["defocus (A)"] = (0.5 * (ctf[:, 2] + ctf[:, 3])).astype(np.float32)
            cols["astigmatism (A)"] = np.abs(ctf[:, 2] - ctf[:, 3]).astype(np.float32)
        if st.poses is not None:
            rots, trans = st.poses
            euler = rot_to_euler(rots[positions]).astype(np.float32)
            cols["rot (deg)"], cols["tilt (deg)"], cols["psi (deg)"] = euler[:, 0], euler[:, 1], euler[:, 2]
            cols["shift x (px)"] = (trans[positions, 0] * st.D).astype(np.float32)
            cols["shift y (px)"] = (trans[positions, 1] * st.D).astype(np.float32)
        for name, values in _source_numeric(store_path, positions).items():
            cols.setdefault(name, values)
    else:
        notes.append("no particle store (give --store): no images, CTF, pose or .star/.cs columns")
    return RunData(run_dir, which.label, which.epoch, z, cols, categorical, positions, store_path,
                   analyze_dir, landscape_dir, centers_ind, notes)
