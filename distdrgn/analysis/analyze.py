"""The ``distdrgn analyze`` pipeline: latent-space analysis of a trained run + HTML report.

For one epoch of a run directory it writes, into ``OUTDIR`` (default ``RUN_DIR/analyze.EPOCH``)::

    z_pca.npy                 (N, zdim) float32 PCA coordinates of z_mu
    pc_explained.json         mean, axes, explained variance (and ratio) of the PCA
    kmeansK/labels.pkl        (N,) int64 cluster of each particle (pickle)
    kmeansK/centers.txt       (K, zdim) on-data centres: z of the particle nearest each centroid
    kmeansK/centers_ind.txt   (K,) index of that particle
    kmeansK/centroids.txt     (K, zdim) the k-means centroids themselves
    kmeansK/vol_000.mrc ...   volume at each on-data centre
    pcN_traversal/z_values.txt, pc_values.txt, vol_000.mrc ...   volumes along PC N, 5th-95th percentile
    umap.npy                  (N, 2) UMAP embedding (unless disabled or degenerate)
    *.png, report.html

Every step is linear in N and chunked, so 1M+ particles analyse without O(N^2) memory.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from distdrgn.analysis import latent, plots
from distdrgn.analysis.report import Figure, Section, Table, write_report
from distdrgn.checkpoint import epoch_file, z_epochs
from distdrgn.errors import DistdrgnError

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class RunEpoch:
    """Which files of a run directory one analysis reads."""

    run_dir: Path
    epoch: int | None  # None: the final z.pkl / weights.pkl
    z_path: Path
    label: str  # used in the default output directory name and the report


def run_zdim(run_dir: Path) -> int:
    """model.zdim from ``run_dir/config.yaml`` (DistdrgnError when the file is missing or bad)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise DistdrgnError(f"{path}: no such file (not a distdrgn training run directory?)")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
        if "model_args" in cfg:  # a cryoDRGN run directory
            return int(cfg["model_args"].get("zdim") or 0)
        return int((cfg.get("model") or {}).get("zdim", 8))
    except (yaml.YAMLError, AttributeError, TypeError, ValueError) as exc:
        raise DistdrgnError(f"{path}: cannot read model.zdim ({exc})") from None


def run_particle_count(run_dir: Path, epoch: int | None) -> tuple[int, str] | None:
    """(particles the run trained on, where that number comes from), from its distdrgn
    checkpoint: the ``data.ind`` subset, else the whole store. None when the run has no
    readable distdrgn checkpoint (a cryoDRGN run, or latents only), so nothing to check."""
    from distdrgn.checkpoint import load_weights, weights_path

    try:
        ckpt = load_weights(weights_path(run_dir, epoch))
    except DistdrgnError:
        return None
    subset, store = ckpt.get("subset"), ckpt.get("store") or {}
    if subset and subset.get("n") is not None:
        return int(subset["n"]), f"the data.ind subset {subset.get('path')}"
    if store.get("n") is not None:
        return int(store["n"]), f"the store {store.get('path')}"
    return None


def resolve_epoch(run_dir: str | Path, epoch: int | None) -> RunEpoch:
    """The latent file for ``epoch`` (from 1, as in ``z.N.pkl``), or the final one.

    With ``epoch=None`` the final ``z.pkl`` is used (a copy of the last epoch's); when a
    run has no final file yet (still training) the highest ``z.N.pkl`` is used. A
    negative epoch counts from the end of the saved epochs (-1 = the last).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DistdrgnError(f"{run_dir}: no such run directory")
    zdim = run_zdim(run_dir)
    if zdim == 0:
        raise DistdrgnError(
            f"{run_dir}: homogeneous run (model.zdim = 0) has no latent space to analyze; use 'distdrgn eval-vol'"
        )
    saved = z_epochs(run_dir)
    if epoch is not None and epoch < 0:
        if len(saved) < -epoch:
            raise DistdrgnError(f"{run_dir}: epoch {epoch} asked but only {len(saved)} epochs saved")
        epoch = saved[epoch]
    if epoch is None:
        final = run_dir / "z.pkl"
        if final.is_file():
            last = saved[-1] if saved else None
            return RunEpoch(run_dir, None, final, str(last) if last is not None else "final")
        if not saved:
            raise DistdrgnError(f"{run_dir}: no z.pkl or z.N.pkl (has training finished an epoch?)")
        epoch = saved[-1]
    path = epoch_file(run_dir, "z", epoch)
    if not path.is_file():
        have = ", ".join(map(str, saved)) or "none"
        raise DistdrgnError(f"{path}: no such file (saved epochs: {have})")
    return RunEpoch(run_dir, epoch, path, str(epoch))


class VolumeWriter:
    """Evaluates a run's decoder (:mod:`distdrgn.volumes`) at latents and writes .mrc volumes."""

    def __init__(self, run_dir: Path, epoch: int | None, device: str | None, D: int | None = None):
        import torch

        from distdrgn import volumes

        self._volumes = volumes
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.trained = volumes.load_model(run_dir, epoch=epoch, device=device)
        self.D = self.trained.D if D is None else int(D)
        # the decoder covers the same frequency extent at any box, so the voxel scales with 1/D
        self.apix = self.trained.apix * self.trained.D / self.D if self.trained.apix else None

    @property
    def epoch(self) -> int:
        return self.trained.epoch

    def write(self, z: np.ndarray, paths: list[Path]) -> list[np.ndarray]:
        """Evaluate one volume per row of z (M, zdim) and write each to its path.

        Returns each volume's projection along z, (D, D), for the report (keeping 40
        volumes of 256^3 in memory would cost 2.7 GB).
        """
        from tqdm import tqdm

        from distdrgn.formats.mrc import write_mrc

        projections = []
        for zi, path in tqdm(list(zip(z, paths)), desc=f"volumes -> {paths[0].parent.name}", unit="vol", leave=False):
            vol = self._volumes.eval_volume(self.trained, zi, D=self.D)
            write_mrc(path, vol, self.apix or 1.0, is_volume=True)
            projections.append(vol.sum(axis=0))
        return projections


def _savetxt(path: Path, array: np.ndarray, fmt: str = "%.6g") -> None:
    np.savetxt(path, np.atleast_2d(array) if array.ndim == 2 else array, fmt=fmt)


def _z_rows(z: np.ndarray) -> list[str]:
    return [" ".join(f"{v:.3f}" for v in row) for row in np.atleast_2d(z)]


def make_output_dir(out: Path) -> None:
    """Create the output directory ``out``; DistdrgnError naming it if it is a file or not writable."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DistdrgnError(f"{out}: output directory exists as a file") from None
    except OSError as exc:
        raise DistdrgnError(f"{out}: cannot create the output directory ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise DistdrgnError(f"{out}: output directory is not writable")


def analyze(
    run_dir: str | Path,
    epoch: int | None = None,
    ksample: int = 20,
    n_pcs: int = 2,
    out: str | Path | None = None,
    device: str | None = None,
    umap: bool = True,
    umap_max_fit: int = 50_000,
    umap_epochs: int | None = None,
    traversal_points: int = 10,
    volumes: bool = True,
    vol_D: int | None = None,
    seed: int = 0,
) -> Path:
    """Analyse the latents of one epoch of ``run_dir``; returns the path of report.html.

    epoch: a saved epoch (from 1, as in ``z.N.pkl``), negative from the end, or None
    for the final ``z.pkl``. ksample: number of k-means clusters (volumes at their on-data
    centres). n_pcs: number of PCs to traverse. volumes=False skips decoding (latent
    analysis only). vol_D: box of the evaluated volumes (None = the training box).
    """
    t_start = time.time()
    if ksample < 1:
        raise DistdrgnError(f"--ksample must be >= 1, got {ksample}")
    if n_pcs < 0:
        raise DistdrgnError(f"--pc must be >= 0, got {n_pcs}")
    if traversal_points < 2:
        raise DistdrgnError(f"--traversal-points must be >= 2, got {traversal_points}")
    which = resolve_epoch(run_dir, epoch)
    run_dir = which.run_dir
    # load the decoder first: a bad checkpoint fails before minutes of latent analysis, and
    # the checkpoint knows which epoch the final weights.pkl / z.pkl are
    writer = VolumeWriter(run_dir, which.epoch, device, D=vol_D) if volumes else None
    label = str(writer.epoch) if writer is not None and which.epoch is None else which.label
    out = Path(out) if out is not None else run_dir / f"analyze.{label}"

    z = latent.load_z(which.z_path)
    n, zdim = z.shape
    expected = run_zdim(run_dir)
    if zdim != expected:
        raise DistdrgnError(f"{which.z_path}: latents have zdim {zdim} but config.yaml says {expected}")
    trained_on = run_particle_count(run_dir, which.epoch)
    if trained_on is not None and trained_on[0] != n:  # k-means labels, selections would index other particles
        raise DistdrgnError(f"{which.z_path}: {n} rows of latents, but the run was trained on {trained_on[0]} "
                            f"particles ({trained_on[1]}); this z.pkl belongs to another run or dataset")
    make_output_dir(out)  # after the checks: a refused analysis leaves no empty folder behind
    if n_pcs > zdim:
        log.info("only %d PCs exist (zdim %d); traversing %d", zdim, zdim, zdim)
        n_pcs = zdim
    k = min(ksample, n)
    log.info("analyzing %s: %d particles, zdim %d", which.z_path, n, zdim)

    # ---- PCA --------------------------------------------------------------------------
    pca = latent.fit_pca(z)
    z_pca = pca.transform(z)
    np.save(out / "z_pca.npy", z_pca)
    ratio = pca.explained_variance_ratio
    (out / "pc_explained.json").write_text(
        json.dumps(
            {
                "n_particles": n,
                "zdim": zdim,
                "mean": pca.mean.tolist(),
                "components": pca.components.tolist(),
                "explained_variance": pca.explained_variance.tolist(),
                "explained_variance_ratio": ratio.tolist(),
            },
            indent=1,
        )
    )

    # ---- k-means + on-data centres ------------------------------------------------------
    kdir = out / f"kmeans{k}"
    kdir.mkdir(exist_ok=True)
    labels, centroids = latent.kmeans(z, k, seed=seed, use_gpu=None if device != "cpu" else False)
    centers_ind = latent.nearest_on_data(z, centroids)
    centers = z[centers_ind]
    counts = np.bincount(labels, minlength=k)
    with open(kdir / "labels.pkl", "wb") as f:
        pickle.dump(labels, f)
    _savetxt(kdir / "centers.txt", centers)
    _savetxt(kdir / "centroids.txt", centroids)
    np.savetxt(kdir / "centers_ind.txt", centers_ind, fmt="%d")

    # ---- PC traversals ------------------------------------------------------------------
    traversals = []  # (pc index 0-based, t, z)
    for pc in range(n_pcs):
        t, zt = latent.pc_traversal(pca, z_pca, pc, n_points=traversal_points)
        tdir = out / f"pc{pc + 1}_traversal"
        tdir.mkdir(exist_ok=True)
        _savetxt(tdir / "z_values.txt", zt)
        np.savetxt(tdir / "pc_values.txt", t, fmt="%.6g")
        traversals.append((pc, t, zt))

    # ---- UMAP ---------------------------------------------------------------------------
    emb = None
    umap_note = "UMAP disabled (--no-umap)."
    if umap:
        t0 = time.time()
        emb = latent.umap_embed(z, max_fit=umap_max_fit, seed=seed, n_epochs=umap_epochs)
        if emb is None:
            umap_note = f"UMAP skipped: {'zdim is 1' if zdim < 2 else f'only {n} particles'}."
        else:
            np.save(out / "umap.npy", emb)
            fitted = min(n, umap_max_fit)
            umap_note = (
                f"UMAP fitted on {fitted:,} particles"
                + (f", the other {n - fitted:,} placed with transform" if fitted < n else "")
                + f" ({time.time() - t0:.0f} s)."
            )
        log.info(umap_note)

    # ---- volumes ------------------------------------------------------------------------
    kmeans_proj: list[np.ndarray] = []  # projections of the volumes
    traversal_proj: list[list[np.ndarray]] = []
    apix = None
    if writer is not None:
        apix = writer.apix
        kmeans_proj = writer.write(centers, [kdir / f"vol_{i:03d}.mrc" for i in range(k)])
        for pc, _, zt in traversals:
            tdir = out / f"pc{pc + 1}_traversal"
            traversal_proj.append(writer.write(zt, [tdir / f"vol_{i:03d}.mrc" for i in range(len(zt))]))

    # ---- plots --------------------------------------------------------------------------
    figs: dict[str, Path] = {}
    if zdim >= 2:
        pc_xy = z_pca[:, :2]
        centers_pca = pca.transform(centers, 2)
        figs["pca_density"] = plots.plot_density(
            pc_xy, out / "z_pca_density.png", "PC1", "PC2", "latent PCA", marks=centers_pca
        )
        figs["pca_kmeans"] = plots.plot_clusters(
            pc_xy, labels, out / "z_pca_kmeans.png", "PC1", "PC2", f"k-means (K={k})", centers=centers_pca
        )
    else:
        figs["pca_density"] = plots.plot_histogram(
            z[:, 0], out / "z_hist.png", "z", "latent distribution", marks=centers[:, 0]
        )
    figs["explained"] = plots.plot_explained_variance(ratio, out / "pc_explained.png")
    loss_csv = run_dir / "loss.csv"
    if loss_csv.is_file():
        loss_png = plots.plot_loss(loss_csv, out / "loss.png")
        if loss_png is not None:
            figs["loss"] = loss_png
    if emb is not None:
        figs["umap_density"] = plots.plot_density(
            emb, out / "umap_density.png", "UMAP1", "UMAP2", "UMAP", marks=emb[centers_ind]
        )
        figs["umap_kmeans"] = plots.plot_clusters(
            emb, labels, out / "umap_kmeans.png", "UMAP1", "UMAP2", f"k-means (K={k})", centers=emb[centers_ind]
        )
    if kmeans_proj:
        figs["kmeans_vols"] = plots.plot_projections(
            kmeans_proj, [f"vol_{i:03d}" for i in range(k)], kdir / "projections.png"
        )
    for (pc, _, _), vols in zip(traversals, traversal_proj):
        figs[f"pc{pc + 1}_vols"] = plots.plot_projections(
            vols, [f"vol_{i:03d}" for i in range(len(vols))], out / f"pc{pc + 1}_traversal" / "projections.png"
        )

    # ---- report -------------------------------------------------------------------------
    sections = []
    if "loss" in figs:
        sections.append(Section("Training", figures=[Figure(figs["loss"], "Loss curves from loss.csv.")]))
    sections.append(
        Section(
            "Latent space (PCA)",
            figures=[
                Figure(figs["pca_density"], "Particle density; x marks the on-data k-means centres."),
                *([Figure(figs["pca_kmeans"], "Particles coloured by k-means cluster.")] if "pca_kmeans" in figs else []),
                Figure(figs["explained"], "Explained variance ratio per principal component."),
            ],
            tables=[
                Table(
                    ["PC", "variance", "ratio", "cumulative"],
                    [[i + 1, float(v), float(r), float(c)] for i, (v, r, c) in
                     enumerate(zip(pca.explained_variance, ratio, np.cumsum(ratio)))],
                    "Explained variance",
                )
            ],
        )
    )
    if emb is not None:
        sections.append(
            Section(
                "Latent space (UMAP)",
                text=umap_note,
                figures=[
                    Figure(figs["umap_density"], "UMAP density; x marks the on-data k-means centres."),
                    Figure(figs["umap_kmeans"], "UMAP coloured by k-means cluster."),
                ],
            )
        )
    else:
        sections.append(Section("Latent space (UMAP)", text=umap_note))
    kmeans_rows = [
        [i, f"kmeans{k}/vol_{i:03d}.mrc" if kmeans_proj else "-", int(counts[i]), int(centers_ind[i]), zr]
        for i, zr in enumerate(_z_rows(centers))
    ]
    sections.append(
        Section(
            f"k-means (K={k})",
            text="Volumes are decoded at the on-data centre of each cluster: the latent of the particle "
            "nearest to the k-means centroid.",
            figures=[Figure(figs["kmeans_vols"], "Projections (sum along z) of the cluster volumes.")]
            if "kmeans_vols" in figs
            else [],
            tables=[Table(["cluster", "volume", "particles", "particle index", "z"], kmeans_rows)],
        )
    )
    for pc, t, zt in traversals:
        rows = [
            [i, f"pc{pc + 1}_traversal/vol_{i:03d}.mrc" if traversal_proj else "-", float(ti), zr]
            for i, (ti, zr) in enumerate(zip(t, _z_rows(zt)))
        ]
        key = f"pc{pc + 1}_vols"
        sections.append(
            Section(
                f"PC{pc + 1} traversal",
                text=f"{len(t)} points along PC{pc + 1} from its 5th to 95th percentile, other PCs at 0.",
                figures=[Figure(figs[key], f"Projections of the PC{pc + 1} traversal volumes.")] if key in figs else [],
                tables=[Table(["point", "volume", f"PC{pc + 1}", "z"], rows)],
            )
        )
    summary = {
        "run directory": str(run_dir.resolve()),
        "latents": which.z_path.name,
        "epoch": label,
        "particles": n,
        "zdim": zdim,
        "k-means clusters": k,
        "voxel size (A)": f"{apix:.4g}" if apix else "-",
        "output directory": str(out.resolve()),
        "analysis time (s)": f"{time.time() - t_start:.1f}",
    }
    report = write_report(out / "report.html", f"distdrgn analyze: {run_dir.name} (epoch {label})", summary, sections)
    log.info("report written to %s", report)
    return report
