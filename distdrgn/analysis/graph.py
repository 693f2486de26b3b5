"""Latent-space graph traversal: shortest paths between particles on a pruned kNN graph.

The path between two particles should stay where the particles are (on the data
manifold) instead of cutting straight through empty latent space. So the latents are
joined into a graph and the path is the shortest one along its edges:

1. **kNN graph.** Every latent is joined to its ``max_neighbors`` nearest other latents
   (Euclidean). Exact on every backend except ``faiss-ivf``.
2. **Pruning.** Long edges jump across gaps between populated regions, so only edges
   no longer than a distance threshold are kept. By default the threshold is chosen
   from the data so that particles keep ``avg_neighbors`` edges on average: it is the
   ``N * avg_neighbors``-th smallest of all ``N * max_neighbors`` kNN distances (an
   explicit ``threshold`` overrides this). Dense regions keep more edges than sparse ones.
   A cut alone strands particles: on a noisy helix of 200,000 latents in 8-D, 16% of them
   (the noise tail) had no edge left, and an anchor among them reached nothing. So with
   the automatic threshold the graph also keeps the **minimum spanning forest** of the
   whole kNN graph: the shortest edges that keep connected whatever the kNN graph
   connects. It holds every particle's nearest-neighbour edge, and where the cut graph
   is already connected it adds nothing (Kruskal never needs an edge above the cut), so
   paths only leave the cut where there is no other way. An explicit ``threshold`` is
   applied exactly as given.
3. **Symmetrisation.** An edge kept in either direction joins both particles, so the
   graph is undirected.
4. **Dijkstra** (scipy's compiled ``csgraph.dijkstra``) from each anchor to the next;
   the paths are concatenated (a shared anchor appears once).

kNN backends (``backend=``):

- ``faiss-gpu``: exact ``GpuIndexFlatL2`` (a GPU build of faiss and a visible GPU);
- ``torch-cuda``: exact blocked brute force with torch on a CUDA device;
- ``kdtree``: exact ``scipy.spatial.cKDTree`` (multi-threaded query); on a CPU this is
  much faster than faiss' flat index for the low dimensions of latents (1M x 8 in about a
  minute on 2 cores against ~12 min for ``IndexFlatL2``; see benchmarks/RESULTS.md);
- ``faiss-flat``: exact ``IndexFlatL2`` on the CPU;
- ``faiss-ivf``: approximate ``IndexIVFFlat`` (``nlist ~ 4 sqrt(N)``, ``nprobe`` lists
  searched) for large N in high dimension, where neither a tree nor a flat scan scales.

``auto`` picks the first of faiss-gpu, torch-cuda that is available, else ``kdtree`` for
zdim <= 16, else ``faiss-flat`` up to 200,000 latents and ``faiss-ivf`` above.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components, dijkstra, minimum_spanning_tree

from distdrgn.errors import DistdrgnError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss-gpu", "torch-cuda", "kdtree", "faiss-flat", "faiss-ivf")
KDTREE_MAX_DIM = 16
FLAT_MAX_N = 200_000


def _faiss_gpu_available() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    get = getattr(faiss, "get_num_gpus", None)
    return bool(get and get() > 0)


def _torch_cuda_available() -> bool:
    # importing torch costs seconds and ~200 MB: only look when an NVIDIA device exists
    if not (os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")):
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def choose_backend(n: int, zdim: int, backend: str = "auto") -> str:
    """The kNN backend ``auto`` resolves to for n latents of dimension zdim (others returned as given)."""
    if backend not in BACKENDS:
        raise DistdrgnError(f"unknown kNN backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if _faiss_gpu_available():
        return "faiss-gpu"
    if _torch_cuda_available():
        return "torch-cuda"
    if zdim <= KDTREE_MAX_DIM:
        return "kdtree"
    return "faiss-flat" if n <= FLAT_MAX_N else "faiss-ivf"


def _drop_self(dist: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each point from its own (k+1)-neighbour list -> (n, k) arrays.

    The point itself is usually first, but with duplicate latents another index can come
    first; when the point is missing altogether (possible with an approximate index) the
    farthest neighbour is dropped instead.
    """
    n = idx.shape[0]
    is_self = idx == np.arange(n)[:, None]
    first_self = is_self.argmax(axis=1)
    drop = np.where(is_self.any(axis=1), first_self, k)
    keep = np.ones_like(is_self)
    keep[np.arange(n), drop] = False
    return dist[keep].reshape(n, k), idx[keep].reshape(n, k)


def _knn_torch(x: np.ndarray, k1: int, block: int, device: str = "cuda") -> tuple[np.ndarray, np.ndarray]:
    """Exact k1-NN of x (N, d) against itself by blocked brute force on a torch device."""
    import torch

    dev = torch.device(device)
    # float64 and centred: the expanded |q|^2 - 2 q.x + |x|^2 cancels badly in float32 when
    # the latents sit far from the origin relative to their neighbour spacing
    data = torch.from_numpy(x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)).to(dev)
    sq = data.square().sum(1)
    n = data.shape[0]
    n_cand = min(n, k1 + 8)  # spare candidates, re-ranked on exact distances
    # keep one (block, n) float64 distance tile under ~4 GB
    block = max(1, min(block, (1 << 29) // max(n, 1)))
    dist = np.empty((n, k1), dtype=np.float32)
    idx = np.empty((n, k1), dtype=np.int64)
    for s in range(0, n, block):
        q = data[s : s + block]
        d2 = sq[s : s + block, None] - 2.0 * (q @ data.T) + sq[None, :]
        cand = torch.topk(d2, n_cand, dim=1, largest=False).indices
        exact = (data[cand] - q[:, None, :]).square().sum(-1)
        order = exact.argsort(dim=1)[:, :k1]
        dist[s : s + block] = exact.gather(1, order).sqrt().float().cpu().numpy()
        idx[s : s + block] = cand.gather(1, order).cpu().numpy()
    return dist, idx


def _knn_faiss(x: np.ndarray, k1: int, backend: str, nprobe: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    n, d = x.shape
    if backend == "faiss-gpu":
        res = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatL2(res, d)
    elif backend == "faiss-flat":
        index = faiss.IndexFlatL2(d)
    else:
        nlist = max(1, min(n // 39, int(4 * math.sqrt(n))))
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist)
        rng = np.random.default_rng(0)
        train = x if n <= 64 * nlist else x[np.sort(rng.choice(n, 64 * nlist, replace=False))]
        index.train(train)
        index.nprobe = min(nprobe, nlist)
    index.add(x)
    dist = np.empty((n, k1), dtype=np.float32)
    idx = np.empty((n, k1), dtype=np.int64)
    for s in range(0, n, chunk):
        d2, ii = index.search(x[s : s + chunk], k1)
        dist[s : s + chunk] = np.sqrt(np.maximum(d2, 0.0))
        idx[s : s + chunk] = ii
    return dist, idx


def knn(
    z: np.ndarray,
    k: int,
    backend: str = "auto",
    nprobe: int = 16,
    chunk: int = 65_536,
    workers: int = -1,
) -> tuple[np.ndarray, np.ndarray, str]:
    """k nearest other latents of every latent.

    z: (N, zdim). Returns (dist (N, k) float32 Euclidean distances ascending, idx (N, k)
    int64 neighbour indices, the backend used). ``nprobe`` only matters for
    ``faiss-ivf``; ``workers`` is the kd-tree query's thread count (-1 = all cores).
    """
    x = np.ascontiguousarray(z, dtype=np.float32)
    n, zdim = x.shape
    if k < 1:
        raise DistdrgnError(f"--max-neighbors must be >= 1, got {k}")
    if n < k + 1:
        raise DistdrgnError(f"a {k}-nearest-neighbour graph needs at least {k + 1} latents, got {n}")
    backend = choose_backend(n, zdim, backend)
    k1 = k + 1
    if backend == "kdtree":
        from scipy.spatial import cKDTree

        tree = cKDTree(x)
        dist, idx = tree.query(x, k=k1, workers=workers)
        dist = dist.astype(np.float32)
        idx = idx.astype(np.int64)
    elif backend == "torch-cuda":
        if not _torch_cuda_available():
            raise DistdrgnError("kNN backend torch-cuda asked but torch sees no CUDA device")
        dist, idx = _knn_torch(x, k1, block=4096)
    else:
        if backend == "faiss-gpu" and not _faiss_gpu_available():
            raise DistdrgnError("kNN backend faiss-gpu asked but faiss has no GPU (install faiss-gpu-cu12 on a GPU machine)")
        dist, idx = _knn_faiss(x, k1, backend, nprobe, chunk)
    if backend == "faiss-ivf":
        # an approximate search can return -1 (too few candidates) for some slots
        missing = idx < 0
        if missing.any():
            dist = np.where(missing, np.inf, dist).astype(np.float32)
            idx = np.where(missing, np.arange(n)[:, None], idx)
    dist, idx = _drop_self(dist, idx, k)
    return dist, idx, backend


def edge_threshold(dist: np.ndarray, avg_neighbors: float) -> float:
    """Distance below which particles keep ``avg_neighbors`` of their kNN edges on average.

    dist: (N, k) kNN distances. The threshold is the ``N * avg_neighbors``-th smallest of
    them; ``avg_neighbors >= k`` keeps every edge (returns inf).
    """
    n, k = dist.shape
    if avg_neighbors <= 0:
        raise DistdrgnError(f"--avg-neighbors must be > 0, got {avg_neighbors}")
    if avg_neighbors >= k:
        return math.inf
    flat = dist.reshape(-1)
    rank = max(1, min(flat.size, round(n * avg_neighbors)))
    return float(np.partition(flat, rank - 1)[rank - 1])


def pruned_graph(dist: np.ndarray, idx: np.ndarray, threshold: float) -> sp.csr_matrix:
    """Undirected graph of the kNN edges no longer than ``threshold``.

    dist, idx: (N, k) from :func:`knn`. Returns a symmetric (N, N) CSR matrix of edge
    lengths (float64). Zero-length edges (duplicate latents) get the smallest positive
    length, since a sparse matrix cannot hold a zero-weight edge reliably.
    """
    n, k = idx.shape
    keep = (dist <= threshold) & np.isfinite(dist)  # inf: a slot an approximate search left empty
    rows = np.repeat(np.arange(n, dtype=np.int64), k)[keep.reshape(-1)]
    cols = idx[keep]
    w = np.maximum(dist[keep].astype(np.float64), np.finfo(np.float64).tiny)
    g = sp.csr_matrix((w, (rows, cols)), shape=(n, n))
    # an edge found from both ends has the same length both ways: max() keeps one copy
    return g.maximum(g.T).tocsr()


def connected_pruned_graph(dist: np.ndarray, idx: np.ndarray, threshold: float) -> sp.csr_matrix:
    """:func:`pruned_graph` plus the minimum spanning forest of the whole kNN graph.

    dist, idx: (N, k) from :func:`knn`. Returns a symmetric (N, N) CSR matrix whose
    connected components are exactly those of the unpruned kNN graph; every particle keeps
    at least its nearest-neighbour edge (see the module docstring).
    """
    forest = minimum_spanning_tree(pruned_graph(dist, idx, math.inf))  # each edge once
    forest = forest.maximum(forest.T)
    return pruned_graph(dist, idx, threshold).maximum(forest).tocsr()


def check_anchors_connected(graph: sp.csr_matrix, anchors: list[int]) -> None:
    """DistdrgnError naming the components (and their sizes) when consecutive anchors lie in
    different connected components of ``graph``."""
    n_comp, label = connected_components(graph, directed=False)
    if n_comp == 1:
        return
    sizes = np.bincount(label)
    for a, b in itertools.pairwise(anchors):
        if label[a] != label[b]:
            raise DistdrgnError(
                f"particles {a} and {b} are not connected in the pruned kNN graph: {a} is in a component of "
                f"{sizes[label[a]]} particles, {b} in another of {sizes[label[b]]} (the graph has {n_comp} "
                f"components, the largest {sizes.max()} of {graph.shape[0]} particles); the latents form separate "
                "groups: pick anchors in the same group, or use a larger --max-neighbors (or --threshold)"
            )


@dataclass(frozen=True)
class GraphPath:
    """A path through the latent graph.

    path: (P,) int64 particle indices, anchors included; segments: one (start, stop,
    length, hops) per consecutive anchor pair; threshold: the edge-length cut used;
    n_edges: undirected edges in the pruned graph; backend: the kNN backend.
    """

    path: np.ndarray
    segments: list[tuple[int, int, float, int]]
    threshold: float
    n_edges: int
    backend: str

    @property
    def length(self) -> float:
        return float(sum(s[2] for s in self.segments))

    @property
    def hops(self) -> int:
        return int(sum(s[3] for s in self.segments))


def shortest_path(graph: sp.csr_matrix, src: int, dst: int) -> tuple[np.ndarray, float]:
    """Shortest path src -> dst in a symmetric CSR graph -> (node indices (P,) int64, length).

    Raises DistdrgnError when dst cannot be reached from src.
    """
    dist, pred = dijkstra(graph, directed=True, indices=src, return_predecessors=True)
    if not np.isfinite(dist[dst]):
        reachable = int(np.isfinite(dist).sum())
        degree = int(graph.indptr[dst + 1] - graph.indptr[dst])
        raise DistdrgnError(
            f"particles {src} and {dst} are not connected in the pruned kNN graph ({reachable} of "
            f"{graph.shape[0]} particles reachable from {src}; {dst} has {degree} edges); "
            "use a larger --max-neighbors or --avg-neighbors (or --threshold)"
        )
    nodes = [dst]
    while nodes[-1] != src:
        nodes.append(int(pred[nodes[-1]]))
    return np.asarray(nodes[::-1], dtype=np.int64), float(dist[dst])


def graph_traversal(
    z: np.ndarray,
    anchors,
    max_neighbors: int = 10,
    avg_neighbors: float = 5.0,
    threshold: float | None = None,
    backend: str = "auto",
    nprobe: int = 16,
) -> GraphPath:
    """Shortest path through the pruned kNN graph of z (N, zdim) visiting ``anchors`` in order.

    anchors: >= 2 particle indices. ``threshold`` (a distance) overrides the
    ``avg_neighbors`` rule and is applied as given (no spanning forest). See the module
    docstring for the graph. DistdrgnError naming the components and their sizes when
    consecutive anchors are not connected.
    """
    anchors = [int(a) for a in anchors]
    n = z.shape[0]
    if len(anchors) < 2:
        raise DistdrgnError(f"give at least 2 anchors, got {len(anchors)}")
    bad = [a for a in anchors if not 0 <= a < n]
    if bad:
        raise DistdrgnError(f"anchor index {bad[0]} out of range for {n} latents (0-based, 0..{n - 1})")
    dist, idx, used = knn(z, max_neighbors, backend=backend, nprobe=nprobe)
    if threshold is not None:
        cut = float(threshold)
        graph = pruned_graph(dist, idx, cut)
    else:
        cut = edge_threshold(dist, avg_neighbors)
        graph = connected_pruned_graph(dist, idx, cut)
    log.info("kNN graph (%s): %d latents, %d undirected edges after pruning at %.4g%s", used, n, graph.nnz // 2, cut,
             "" if threshold is not None else " (with the kNN graph's minimum spanning forest)")
    check_anchors_connected(graph, anchors)
    path = [anchors[0]]
    segments = []
    for a, b in itertools.pairwise(anchors):
        nodes, length = shortest_path(graph, a, b)
        segments.append((a, b, length, len(nodes) - 1))
        path.extend(nodes[1:].tolist())
    return GraphPath(np.asarray(path, dtype=np.int64), segments, cut, graph.nnz // 2, used)
