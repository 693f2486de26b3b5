"""kNN graph, pruning and shortest paths against brute-force references; straight traversals."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from distdrgn.analysis import graph
from distdrgn.analysis.traversal import direct_traversal
from distdrgn.errors import DistdrgnError


def two_loops(n=400, seed=0):
    """Two noisy circles in 5-D, far apart: each connected, not connected to the other."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 2 * np.pi, n)
    comp = np.arange(n) % 2
    z = np.zeros((n, 5))
    z[:, 0], z[:, 1] = np.cos(t), np.sin(t)
    z[:, 2] = 50.0 * comp
    z += 0.02 * rng.normal(size=z.shape)
    return z.astype(np.float32), comp


def brute_knn(z, k):
    d = np.sqrt(((z[:, None, :].astype(np.float64) - z[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, 1), idx


def brute_graph(z, k, avg):
    """Dense adjacency (inf = no edge) built straight from the definition."""
    dist, idx = brute_knn(z, k)
    cut = np.sort(dist.ravel())[round(len(z) * avg) - 1]
    n = len(z)
    adj = np.full((n, n), np.inf)
    for i in range(n):
        for d, j in zip(dist[i], idx[i]):
            if d <= cut:
                adj[i, j] = adj[j, i] = d
    return adj, cut


def brute_dijkstra(adj, src, dst):
    best = {src: 0.0}
    heap = [(0.0, src)]
    done = set()
    while heap:
        d, u = heapq.heappop(heap)
        if u in done:
            continue
        if u == dst:
            return d
        done.add(u)
        for v in np.flatnonzero(np.isfinite(adj[u])):
            nd = d + adj[u, v]
            if nd < best.get(v, np.inf):
                best[v] = nd
                heapq.heappush(heap, (nd, int(v)))
    return np.inf


@pytest.mark.parametrize("backend", ["kdtree", "faiss-flat", "faiss-ivf"])
def test_knn_matches_brute_force_and_excludes_self(backend):
    z, _ = two_loops(300)
    z[7] = z[8]  # a duplicate latent: each must see the other at distance 0, never itself
    dist, idx, used = graph.knn(z, 6, backend=backend)
    assert used == backend and dist.shape == idx.shape == (300, 6)
    ref_d, _ = brute_knn(z, 6)
    np.testing.assert_allclose(dist, ref_d, atol=1e-5)
    assert not (idx == np.arange(300)[:, None]).any()
    assert idx[7, 0] == 8 and idx[8, 0] == 7 and dist[7, 0] == 0.0
    assert (np.diff(dist, axis=1) >= 0).all()


def test_blocked_torch_knn_matches_brute_force():
    # the torch-cuda backend's algorithm, run on the CPU (small blocks: several tiles)
    z, _ = two_loops(300)
    dist, idx = graph._knn_torch(z, 6, block=64, device="cpu")
    ref_d, ref_i = brute_knn(z, 5)
    np.testing.assert_array_equal(idx[:, 0], np.arange(300))  # itself first, distance 0
    np.testing.assert_allclose(dist[:, 1:], ref_d, atol=1e-5)
    np.testing.assert_array_equal(idx[:, 1:], ref_i)


def test_auto_backend_on_cpu():
    if graph._faiss_gpu_available() or graph._torch_cuda_available():
        pytest.skip("a GPU is visible: auto picks a GPU backend")
    assert graph.choose_backend(1_000_000, 8) == "kdtree"
    assert graph.choose_backend(10_000, 64) == "faiss-flat"
    assert graph.choose_backend(1_000_000, 64) == "faiss-ivf"
    with pytest.raises(DistdrgnError, match="unknown kNN backend"):
        graph.choose_backend(10, 2, "annoy")


def test_threshold_keeps_avg_neighbors_and_graph_is_symmetric():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(500, 3)).astype(np.float32)
    dist, idx, _ = graph.knn(z, 10)
    cut = graph.edge_threshold(dist, 4.0)
    assert (dist <= cut).sum() == 500 * 4  # continuous data: no ties at the cut
    assert graph.edge_threshold(dist, 10) == np.inf
    g = graph.pruned_graph(dist, idx, cut)
    assert (g != g.T).nnz == 0
    assert g.data.max() <= cut + 1e-6
    adj, ref_cut = brute_graph(z, 10, 4.0)
    assert cut == pytest.approx(ref_cut, rel=1e-6)
    dense = g.toarray()
    np.testing.assert_array_equal(dense > 0, np.isfinite(adj))
    np.testing.assert_allclose(dense[dense > 0], adj[np.isfinite(adj)], rtol=1e-5)


def test_shortest_paths_match_brute_force_dijkstra():
    rng = np.random.default_rng(2)
    theta = rng.uniform(0, 1.5 * np.pi, 500)  # a bent strip: a 2-D manifold in 3-D
    z = np.stack([3 * np.cos(theta), 3 * np.sin(theta), rng.uniform(0, 2, 500)], 1).astype(np.float32)
    adj, _ = brute_graph(z, 10, 8.0)
    anchors = [int(np.argmin(np.abs(theta - target))) for target in (0.3, 2.0, 4.4)]
    res = graph.graph_traversal(z, anchors, max_neighbors=10, avg_neighbors=8.0)
    assert res.path[0] == anchors[0] and res.path[-1] == anchors[-1] and anchors[1] in res.path
    assert len(res.segments) == 2 and res.hops == len(res.path) - 1
    for a, b, length, hops in res.segments:
        assert length == pytest.approx(brute_dijkstra(adj, a, b), rel=1e-5)
    # every step is an edge of the reference graph and the lengths add up
    steps = adj[res.path[:-1], res.path[1:]]
    assert np.isfinite(steps).all()
    assert steps.sum() == pytest.approx(res.length, rel=1e-5)
    # along the strip: longer than the chord, which cuts through the empty inside of the bend
    assert res.length > 1.3 * np.linalg.norm(z[anchors[-1]] - z[anchors[0]])


def test_disconnected_anchors_error_names_the_fix():
    z, comp = two_loops(400)
    a = int(np.flatnonzero(comp == 0)[0])
    b = int(np.flatnonzero(comp == 1)[0])
    c = int(np.flatnonzero(comp == 0)[5])
    res = graph.graph_traversal(z, [a, c], max_neighbors=10, avg_neighbors=8)
    assert set(res.path.tolist()) <= set(np.flatnonzero(comp == 0).tolist())
    with pytest.raises(DistdrgnError, match=rf"particles {a} and {b} are not connected.*--max-neighbors"):
        graph.graph_traversal(z, [a, b], max_neighbors=10, avg_neighbors=8)
    with pytest.raises(DistdrgnError, match="out of range"):
        graph.graph_traversal(z, [a, 400])
    with pytest.raises(DistdrgnError, match="at least 2 anchors"):
        graph.graph_traversal(z, [a])


def test_explicit_threshold_overrides_avg_neighbors():
    z, comp = two_loops(400)
    a, c = int(np.flatnonzero(comp == 0)[0]), int(np.flatnonzero(comp == 0)[50])
    every = graph.graph_traversal(z, [a, c], max_neighbors=10, threshold=1e6, backend="faiss-flat")
    assert every.threshold == 1e6 and every.backend == "faiss-flat"
    # a threshold above every kNN distance keeps the whole kNN graph, as avg >= k does
    assert every.n_edges == graph.graph_traversal(z, [a, c], max_neighbors=10, avg_neighbors=10).n_edges
    with pytest.raises(DistdrgnError, match="not connected"):
        graph.graph_traversal(z, [a, c], max_neighbors=10, threshold=1e-4)


def test_direct_traversal_points():
    anchors = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]])
    pts = direct_traversal(anchors, n_points=5)
    assert pts.shape == (9, 2) and pts.dtype == np.float32
    np.testing.assert_allclose(pts[:5, 0], [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(pts[4:, 1], [0, 0.5, 1.0, 1.5, 2.0])
    looped = direct_traversal(anchors, n_points=3, loop=True)
    assert looped.shape == (7, 2)
    np.testing.assert_allclose(looped[-1], anchors[0])
    with pytest.raises(DistdrgnError):
        direct_traversal(anchors[:1])
    with pytest.raises(DistdrgnError):
        direct_traversal(anchors, n_points=1)


def noisy_helix(n=2000, seed=0, noise=0.1, zdim=8):
    """A noisy helix in zdim-D (as benchmarks/analysis.py's helix_latents) and its parameter t."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0.0, 1.0, n)
    helix = np.stack([np.cos(6 * np.pi * t), np.sin(6 * np.pi * t), 2.0 * t - 1.0], axis=1)
    basis, _ = np.linalg.qr(rng.normal(size=(zdim, zdim)))
    z = helix @ basis[:3] + noise * rng.normal(size=(n, zdim))
    return z.astype(np.float32), t


def test_pruning_never_strands_a_particle_on_a_noisy_helix():
    z, t = noisy_helix(2000)
    isolated = z[np.argmax(t)] + 0.6  # an isolated-ish particle at the end of the helix
    z = np.vstack([z, isolated[None].astype(np.float32)])
    t = np.append(t, 1.0)
    dist, idx, _ = graph.knn(z, 10)
    cut = graph.edge_threshold(dist, 5.0)
    plain = graph.pruned_graph(dist, idx, cut)
    assert (np.diff(plain.indptr) == 0).sum() > 0  # the cut alone leaves particles with no edge at all
    g = graph.connected_pruned_graph(dist, idx, cut)
    assert (g != g.T).nnz == 0 and np.diff(g.indptr).min() >= 1
    for i in range(len(z)):  # every particle keeps its nearest-neighbour edge
        assert g[i, idx[i, 0]] > 0
    from scipy.sparse.csgraph import connected_components

    assert connected_components(g, directed=False)[0] == connected_components(
        graph.pruned_graph(dist, idx, np.inf), directed=False)[0] == 1
    anchors = [int(np.argmin(t)), int(np.argsort(t)[len(t) // 2]), len(z) - 1]
    res = graph.graph_traversal(z, anchors, max_neighbors=10, avg_neighbors=5.0)
    assert res.path[0] == anchors[0] and res.path[-1] == anchors[-1] and anchors[1] in res.path
    # it follows the helix: the particles' t along the path rise from the first to the last anchor
    assert np.corrcoef(np.arange(len(res.path)), t[res.path])[0, 1] > 0.95


def test_connected_graph_adds_nothing_where_the_cut_graph_is_connected():
    rng = np.random.default_rng(2)
    theta = rng.uniform(0, 1.5 * np.pi, 500)  # a uniformly filled strip: no noise tail
    z = np.stack([3 * np.cos(theta), 3 * np.sin(theta), rng.uniform(0, 2, 500)], 1).astype(np.float32)
    dist, idx, _ = graph.knn(z, 10)
    cut = graph.edge_threshold(dist, 8.0)
    plain = graph.pruned_graph(dist, idx, cut)
    from scipy.sparse.csgraph import connected_components

    assert connected_components(plain, directed=False)[0] == 1
    assert (graph.connected_pruned_graph(dist, idx, cut) != plain).nnz == 0


def test_anchors_in_separate_groups_name_the_components_and_sizes():
    z, comp = two_loops(400)
    a, b = int(np.flatnonzero(comp == 0)[0]), int(np.flatnonzero(comp == 1)[0])
    with pytest.raises(DistdrgnError, match=rf"particles {a} and {b} are not connected in the pruned kNN graph: {a} is "
                                            rf"in a component of 200 particles, {b} in another of 200 \(the graph has 2 "
                                            r"components, the largest 200 of 400 particles\)"):
        graph.graph_traversal(z, [a, b], max_neighbors=10, avg_neighbors=5)
