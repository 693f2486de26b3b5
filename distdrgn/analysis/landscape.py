"""Volume-space ("landscape") analysis of a trained run, as cryoDRGN's ``analyze_landscape``.

1. **Sketch.** k-means with M clusters on z; the volume of each cluster is decoded at its
   on-data centre (the latent of the particle nearest the centroid).
2. **Mask.** A soft mask of the mean of the M volumes (threshold, dilation, cosine edge:
   :func:`distdrgn.volume_ops.soft_mask`, the ``gen-mask`` function).
3. **PCA** of the masked volumes (each a vector of the voxels inside the mask, weighted by it).
4. **Agglomerative clustering** of the volumes in that PCA space (``pc_dim`` components);
   each particle takes the label of its k-means cluster's volume.

All functions are pure (arrays in, arrays out) except :func:`decode_volumes`, which runs the
decoder, ``batch`` volumes at a time (one z-plane of the lattice for the whole batch per
decoder call), on the model's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distdrgn.errors import DistdrgnError


def sketch(z: np.ndarray, m: int, seed: int = 0, use_gpu: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k-means sketch of z (N, zdim) -> (labels (N,) int64 in [0, M), centers_ind (M,) int64 rows of z).

    M is capped at N. centers_ind[k] is the particle nearest centroid k (its z is decoded).
    """
    from distdrgn.analysis import latent

    m = min(int(m), z.shape[0])
    if m < 2:
        raise DistdrgnError(f"-M must be >= 2 (and at most the number of particles), got {m}")
    labels, centroids = latent.kmeans(z, m, seed=seed, use_gpu=use_gpu)
    return labels.astype(np.int64), latent.nearest_on_data(z, centroids).astype(np.int64)


@torch.no_grad()
def decode_batch(trained, zs: np.ndarray, D: int | None = None) -> np.ndarray:
    """(B, D, D, D) float32 volumes at latents zs (B, zdim); the same values as
    :func:`distdrgn.volumes.eval_volume` row by row, with one decoder call per lattice plane.

    cryoDRGN runs (their own decoder code path) are decoded one volume at a time.
    """
    from distdrgn import volumes
    from distdrgn.fft import iht3_center

    zs = np.asarray(zs, dtype=np.float32).reshape(-1, trained.zdim)
    if trained.config.get("format") == "cryodrgn":
        return np.stack([volumes.eval_volume(trained, z, D=D) for z in zs])
    model = trained.model
    D = trained.D if D is None else int(D)
    if D % 2 or D < 4:
        raise DistdrgnError(f"volume box must be even and >= 4, got {D}")
    device = next(model.parameters()).device
    B = zs.shape[0]
    zt = torch.as_tensor(zs, device=device)
    k = (torch.arange(D + 1, dtype=torch.float32, device=device) - D // 2) / D
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    plane_xy = torch.stack([kx.ravel(), ky.ravel()], -1)
    vol = torch.zeros((B, D + 1, D + 1, D + 1), dtype=torch.float32, device=device)
    for iz in range(D + 1):
        kz = k[iz]
        inside = (plane_xy * plane_xy).sum(-1) + kz * kz <= 0.25
        if not inside.any():
            continue
        pts = torch.cat([plane_xy[inside], kz.expand(int(inside.sum()), 1)], -1)
        with torch.autocast(device.type, enabled=False):
            values = model.decoder.hartley(pts.expand(B, -1, -1), zt)
        plane = torch.zeros((B, (D + 1) ** 2), dtype=torch.float32, device=device)
        plane[:, inside] = values.float()
        vol[:, iz] = plane.view(B, D + 1, D + 1)
    vol = vol[:, :-1, :-1, :-1] * trained.prep.ht_std
    return np.stack([iht3_center(v.double()).float().cpu().numpy() for v in vol])


def decode_volumes(trained, zs: np.ndarray, out: np.ndarray, D: int | None = None, batch: int = 8,
                   progress=None) -> np.ndarray:
    """Decode every row of zs (M, zdim) into ``out`` (M, D, D, D) (e.g. a memory-mapped .npy), ``batch`` at a time."""
    for start in range(0, zs.shape[0], batch):
        stop = min(zs.shape[0], start + batch)
        out[start:stop] = decode_batch(trained, zs[start:stop], D=D)
        if progress is not None:
            progress.update(stop - start)
    return out


def mean_volume(vols: np.ndarray, chunk: int = 32) -> np.ndarray:
    """Mean of (M, D, D, D) volumes -> (D, D, D) float32, accumulated in float64 chunk by chunk."""
    acc = np.zeros(vols.shape[1:], dtype=np.float64)
    for i in range(0, vols.shape[0], chunk):
        acc += vols[i : i + chunk].sum(axis=0, dtype=np.float64)
    return (acc / vols.shape[0]).astype(np.float32)


def landscape_mask(mean_vol: np.ndarray, threshold: float | None, dilate: float, dist: float, apix: float) -> np.ndarray:
    """Soft mask (D, D, D) in [0, 1] of the mean volume (:func:`distdrgn.volume_ops.soft_mask`;
    threshold None = half the 99.99th percentile; dilate/dist in Angstrom)."""
    from distdrgn.volume_ops import soft_mask

    return soft_mask(mean_vol, threshold=threshold, dilate=dilate, dist=dist, apix=apix)


def masked_matrix(vols: np.ndarray, mask: np.ndarray, chunk: int = 32) -> np.ndarray:
    """(M, V) float32: each volume's voxels where mask > 0, multiplied by the mask (V voxels)."""
    sel = mask.reshape(-1) > 0
    w = mask.reshape(-1)[sel].astype(np.float32)
    out = np.empty((vols.shape[0], int(sel.sum())), dtype=np.float32)
    for i in range(0, vols.shape[0], chunk):
        block = np.asarray(vols[i : i + chunk], dtype=np.float32).reshape(-1, sel.size)
        out[i : i + chunk] = block[:, sel] * w
    return out


@dataclass(frozen=True)
class VolumePCA:
    """coords (M, k) of the masked volumes on their first k PCs; explained_variance_ratio (k,)."""

    coords: np.ndarray
    explained_variance_ratio: np.ndarray


def volume_pca(x: np.ndarray, n_components: int = 20, seed: int = 0) -> VolumePCA:
    """PCA of the rows of x (M, V) -> :class:`VolumePCA` with min(n_components, M, V) components."""
    from sklearn.decomposition import PCA

    k = max(1, min(int(n_components), x.shape[0], x.shape[1]))
    pca = PCA(n_components=k, svd_solver="randomized" if k < min(x.shape) // 2 else "full", random_state=seed)
    coords = pca.fit_transform(x.astype(np.float64))
    return VolumePCA(coords.astype(np.float32), pca.explained_variance_ratio_.astype(np.float32))


def cluster_volumes(coords: np.ndarray, n_clusters: int, linkage: str = "average") -> np.ndarray:
    """Agglomerative clustering of the volumes' PCA coordinates (M, k) -> labels (M,) int64.

    Labels are renumbered by decreasing cluster size (0 = the largest), so they are stable
    across runs of the same data.
    """
    from sklearn.cluster import AgglomerativeClustering

    if linkage not in ("ward", "complete", "average", "single"):
        raise DistdrgnError(f"--linkage must be ward, complete, average or single, got {linkage!r}")
    m = coords.shape[0]
    if not 1 <= n_clusters <= m:
        raise DistdrgnError(f"--n-clusters must be in [1, {m}] (the number of volumes), got {n_clusters}")
    raw = AgglomerativeClustering(n_clusters=n_clusters, linkage=linkage).fit_predict(coords.astype(np.float64))
    order = np.argsort(-np.bincount(raw, minlength=n_clusters), kind="stable")
    remap = np.empty(n_clusters, dtype=np.int64)
    remap[order] = np.arange(n_clusters)
    return remap[raw]


def cluster_means(vols: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """(C, D, D, D) float32 mean volume of each volume cluster (labels (M,) in [0, C))."""
    out = np.zeros((n_clusters, *vols.shape[1:]), dtype=np.float64)
    for i in range(vols.shape[0]):
        out[labels[i]] += vols[i]
    counts = np.bincount(labels, minlength=n_clusters).astype(np.float64)
    return (out / np.maximum(counts, 1)[:, None, None, None]).astype(np.float32)


def particle_labels(sketch_labels: np.ndarray, volume_labels: np.ndarray) -> np.ndarray:
    """Each particle's volume cluster: the label of its k-means cluster's volume -> (N,) int64."""
    return np.asarray(volume_labels, dtype=np.int64)[np.asarray(sketch_labels, dtype=np.int64)]


# ---- the pipeline (files in, files out) ----------------------------------------------------


def analyze_landscape(
    run_dir,
    epoch: int | None = None,
    m: int = 500,
    vol_D: int | None = None,
    n_clusters: int = 5,
    linkage: str = "average",
    pc_dim: int = 20,
    threshold: float | None = None,
    dilate: float = 10.0,
    dist: float = 10.0,
    batch: int = 8,
    device: str | None = None,
    out=None,
    seed: int = 0,
):
    """Run the landscape analysis on one epoch of ``run_dir``; returns the output folder.

    Writes into ``out`` (default ``RUN/landscape.EPOCH``): ``volumes.npy`` (M, D, D, D) float32
    (the sketch volumes, memory-mapped), ``kmeansM/labels.pkl`` and ``centers_ind.txt``,
    ``mean.mrc``, ``mask.mrc``, ``volume_pca.npy`` (M, k), ``volume_labels.txt`` (M,),
    ``z_labels.npy`` (N,) (each particle's volume cluster), ``cluster_NN_mean.mrc``, PNG plots,
    ``landscape.json`` (parameters and timings) and ``report.html``; and adds a landscape page to
    ``RUN/analyze.EPOCH/report.html`` when that report exists.
    vol_D: box of the decoded volumes (default the training box, at most 128).
    """
    import json
    import pickle
    import time
    from pathlib import Path

    from tqdm import tqdm

    from distdrgn import volumes
    from distdrgn.analysis import latent, plots
    from distdrgn.analysis.analyze import make_output_dir, resolve_epoch
    from distdrgn.analysis.report import Figure, Section, Table, add_page, write_report
    from distdrgn.formats.mrc import write_mrc

    t_start = time.time()
    timings: dict[str, float] = {}
    if batch < 1:
        raise DistdrgnError(f"--batch must be >= 1, got {batch}")
    if pc_dim < 1:
        raise DistdrgnError(f"--pc-dim must be >= 1, got {pc_dim}")
    which = resolve_epoch(run_dir, epoch)
    run_dir = which.run_dir
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    trained = volumes.load_model(run_dir, epoch=which.epoch, device=device)
    label = str(trained.epoch) if which.epoch is None else which.label
    out = Path(out) if out is not None else run_dir / f"landscape.{label}"
    make_output_dir(out)
    D = int(vol_D) if vol_D is not None else min(trained.D, 128)
    apix = (trained.apix or 1.0) * trained.D / D

    z = latent.load_z(which.z_path).astype(np.float32)
    n = z.shape[0]
    if z.shape[1] != trained.zdim:
        raise DistdrgnError(f"{which.z_path}: latents have zdim {z.shape[1]} but the model has {trained.zdim}")
    t0 = time.time()
    sk_labels, centers_ind = sketch(z, m, seed=seed, use_gpu=None if device != "cpu" else False)
    m = len(centers_ind)
    if n_clusters > m:
        raise DistdrgnError(f"--n-clusters {n_clusters} is more than the {m} volumes")
    kdir = out / f"kmeans{m}"
    kdir.mkdir(exist_ok=True)
    with open(kdir / "labels.pkl", "wb") as f:
        pickle.dump(sk_labels, f)
    np.savetxt(kdir / "centers_ind.txt", centers_ind, fmt="%d")
    np.savetxt(kdir / "centers.txt", z[centers_ind], fmt="%.6g")
    timings["kmeans_s"] = time.time() - t0

    t0 = time.time()
    vols = np.lib.format.open_memmap(out / "volumes.npy", mode="w+", dtype=np.float32, shape=(m, D, D, D))
    with tqdm(total=m, desc="landscape volumes", unit="vol", leave=False) as bar:
        decode_volumes(trained, z[centers_ind], vols, D=D, batch=batch, progress=bar)
    vols.flush()
    timings["volumes_s"] = time.time() - t0

    t0 = time.time()
    mean = mean_volume(vols)
    write_mrc(out / "mean.mrc", mean, apix, is_volume=True)
    mask = landscape_mask(mean, threshold, dilate, dist, apix)
    write_mrc(out / "mask.mrc", mask, apix, is_volume=True)
    x = masked_matrix(vols, mask)
    pca = volume_pca(x, pc_dim, seed=seed)
    del x
    vol_labels = cluster_volumes(pca.coords, n_clusters, linkage)
    z_labels = particle_labels(sk_labels, vol_labels)
    np.save(out / "volume_pca.npy", pca.coords)
    np.savetxt(out / "volume_labels.txt", vol_labels, fmt="%d")
    np.save(out / "z_labels.npy", z_labels)
    means = cluster_means(vols, vol_labels, n_clusters)
    for c in range(n_clusters):
        write_mrc(out / f"cluster_{c:02d}_mean.mrc", means[c], apix, is_volume=True)
    timings["mask_pca_cluster_s"] = time.time() - t0

    # ---- plots and report ---------------------------------------------------------------
    coords2 = pca.coords[:, :2] if pca.coords.shape[1] >= 2 else np.c_[pca.coords[:, 0], np.zeros(m, np.float32)]
    figs = {
        "pca": plots.plot_clusters(coords2, vol_labels, out / "volume_pca.png", "volume PC1", "volume PC2",
                                   f"volume space ({m} volumes)"),
        "explained": plots.plot_explained_variance(pca.explained_variance_ratio, out / "volume_pc_explained.png"),
        "means": plots.plot_projections([v.sum(axis=0) for v in means], [f"cluster {c}" for c in range(n_clusters)],
                                        out / "cluster_means.png", ncols=min(n_clusters, 10)),
    }
    umap_path = run_dir / f"analyze.{label}" / "umap.npy"
    if umap_path.is_file() and np.load(umap_path, mmap_mode="r").shape == (n, 2):
        xy, names = np.load(umap_path), ("UMAP1", "UMAP2")
    elif z.shape[1] >= 2:
        xy, names = latent.fit_pca(z).transform(z, 2), ("PC1", "PC2")
    else:
        xy, names = np.c_[z[:, 0], np.zeros(n, np.float32)], ("z", "")
    figs["z"] = plots.plot_clusters(xy, z_labels, out / "z_landscape.png", names[0], names[1],
                                    "particles by volume cluster")
    counts_vol = np.bincount(vol_labels, minlength=n_clusters)
    counts_z = np.bincount(z_labels, minlength=n_clusters)
    total = time.time() - t_start
    timings["total_s"] = total
    params = {"M": m, "D": D, "apix": apix, "n_clusters": n_clusters, "linkage": linkage, "pc_dim": pc_dim,
              "threshold": threshold, "dilate": dilate, "dist": dist, "batch": batch, "device": str(device),
              "n_particles": n, "mask_voxels": int((mask > 0).sum()), "epoch": label}
    (out / "landscape.json").write_text(json.dumps({"parameters": params, "timings": timings,
                                                    "explained_variance_ratio": pca.explained_variance_ratio.tolist(),
                                                    "volumes_per_cluster": counts_vol.tolist(),
                                                    "particles_per_cluster": counts_z.tolist()}, indent=1))
    sections = [
        Section("Volume space", text=f"{m} volumes decoded at the on-data centres of a k-means sketch of z; PCA of "
                f"the voxels inside a soft mask of their mean ({params['mask_voxels']:,} voxels); agglomerative "
                f"clustering ({linkage} linkage) in the first {pca.coords.shape[1]} PCs.",
                figures=[Figure(figs["pca"], "Volumes on the first two PCs of volume space, coloured by cluster."),
                         Figure(figs["explained"], "Explained variance ratio of the volume PCs.")]),
        Section("Particles", figures=[Figure(figs["z"], "Particles coloured by the cluster of their k-means volume.")]),
        Section("Cluster means", figures=[Figure(figs["means"], "Projections (sum along z) of each cluster's mean volume.")],
                tables=[Table(["cluster", "volumes", "particles", "fraction", "mean volume"],
                              [[c, int(counts_vol[c]), int(counts_z[c]), float(counts_z[c] / n), f"cluster_{c:02d}_mean.mrc"]
                               for c in range(n_clusters)])]),
    ]
    summary = {"run directory": str(run_dir.resolve()), "epoch": label, "particles": n, "volumes (M)": m,
               "box (D)": D, "voxel size (A)": f"{apix:.4g}", "clusters": n_clusters, "device": str(device),
               "volume generation (s)": f"{timings['volumes_s']:.1f}", "total time (s)": f"{total:.1f}",
               "output directory": str(out.resolve())}
    write_report(out / "report.html", f"distdrgn analyze-landscape: {run_dir.name} (epoch {label})", summary, sections)
    analyze_report = run_dir / f"analyze.{label}" / "report.html"
    if analyze_report.is_file():  # the landscape becomes a page of the epoch's analysis report too
        add_page(analyze_report, "landscape", f"Volume landscape (analyze-landscape, M = {m})", sections,
                 out / "report.html")
    return out
