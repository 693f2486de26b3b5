"""Hierarchical search of the pose (rotation and in-plane shift) that best explains each image.

Level 0 scores every rotation of a base grid (:func:`distdrgn.so3_grid.base_rotations`) against
every shift of a base shift grid and keeps the ``keep`` best (rotation, shift) pairs per image;
each further level subdivides the kept rotations and shifts (cells half the size) and scores
every child rotation with every child shift of the same image.

Conventions are training's (:mod:`distdrgn.objective`): values are Hartley values at lattice
points in [half, mirror] order; a candidate shift ``t`` (pixels, (x, y)) is applied to the
*observation*, ``translate_ht(y, freqs, t)`` (training applies ``trans * D``), so a found
shift is directly the ``trans * D`` of ``poses.pkl``. The error of a candidate is
``sum_k (ctf_k pred_k - y_t,k)^2``. ``translate_ht`` is orthogonal on a point set closed under
``k -> -k``, so ``||y_t||^2 = ||y||^2`` for every ``t`` and the error is
``A - 2 C + ||y||^2`` with ``A = sum_k (ctf_k pred_k)^2`` and ``C = <ctf pred, y_t>``: two
matrix products, with no (images x rotations x points) tensor for a shared base grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distdrgn.lattice import Lattice, translate_ht
from distdrgn.model import canonicalize
from distdrgn.so3_grid import subdivide_rotations, subdivide_shifts

Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SearchResult:
    rots: torch.Tensor  # (B, 3, 3) float64 best rotation per image
    shifts_px: torch.Tensor  # (B, 2) float64 best shift (x, y) in pixels, to apply to the observation
    error: torch.Tensor  # (B,) float64 sum over the subset points of (ctf * pred - y_t)^2
    kept_rots: torch.Tensor  # (B, keep, 3, 3) the kept candidates of the last level, best first
    kept_shifts_px: torch.Tensor  # (B, keep, 2)
    kept_error: torch.Tensor  # (B, keep) their errors (as ``error``)


def radius_subset(lattice: Lattice, radius: float) -> tuple[torch.Tensor, int]:
    """Masked lattice points with 0 < |k| <= ``radius`` (lattice steps), as a valid [half, mirror] set.

    Returns ``(indices (K,) int64 into the masked [half, mirror] order, n_half_sub)``:
    ``indices[:n_half_sub]`` are half points in their masked order and
    ``indices[n_half_sub + i]`` is the mirror of ``indices[i]``, so ``slice_coords[indices]``
    goes to ``Decoder.slices_at(coords, n_half_sub, ...)`` and ``freqs[indices]`` to
    ``translate_ht``.
    """
    if radius > lattice.D / 2:
        raise ValueError(f"search radius {radius} is beyond the modelled circle (D/2 = {lattice.D / 2})")
    full_half, _ = lattice.circle_indices()
    sub_half, _ = lattice.circle_indices(radius)
    position = torch.full((lattice.size**2,), -1, dtype=torch.int64)
    position[full_half] = torch.arange(full_half.numel())
    half_pos = position[sub_half]  # half points of the subset keep their relative order
    return torch.cat([half_pos, half_pos + lattice.n_half]), int(half_pos.numel())


def shifted_observations(y: torch.Tensor, freqs: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Observations moved by each candidate shift: y (B, K), freqs (K, 2), shifts (B or 1, S, 2) px -> (B, S, K).

    ``out[b, s] = translate_ht(y[b], freqs, shifts[b, s])`` (the training transform), in y's dtype.
    """
    B, K = y.shape
    S = shifts.shape[1]
    t = shifts.to(y.device, freqs.dtype).expand(B, S, 2).reshape(B * S, 2)
    yy = y[:, None, :].expand(B, S, K).reshape(B * S, K)
    return translate_ht(yy, freqs.to(y.device), t).view(B, S, K).to(y.dtype)


def score_shared(pred: torch.Tensor, y_shifted: torch.Tensor, ctf: torch.Tensor | None) -> torch.Tensor:
    """Errors of rotations shared by all images, up to each image's ``||y||^2``.

    pred (M, K) predictions, y_shifted (B, S, K), ctf (B, K) or None -> (B, M, S):
    ``sum_k (ctf pred_m)^2 - 2 <ctf pred_m, y_s>``.
    """
    p2 = pred * pred
    if ctf is None:
        a = p2.sum(-1)[None, :].expand(y_shifted.shape[0], -1)  # (B, M)
        w = y_shifted
    else:
        a = (ctf * ctf) @ p2.T  # (B, M)
        w = ctf[:, None, :] * y_shifted
    c = torch.matmul(w, pred.T)  # (B, S, M)
    return a[:, :, None] - 2 * c.transpose(1, 2)


def score_per_image(pred: torch.Tensor, y_shifted: torch.Tensor, ctf: torch.Tensor | None) -> torch.Tensor:
    """Errors of per-image rotations, up to each image's ``||y||^2``.

    pred (B, M, K), y_shifted (B, S, K), ctf (B, K) or None -> (B, M, S).
    """
    p2 = pred * pred
    if ctf is None:
        a = p2.sum(-1)  # (B, M)
        w = y_shifted
    else:
        a = torch.bmm(p2, (ctf * ctf)[:, :, None]).squeeze(-1)
        w = ctf[:, None, :] * y_shifted
    return a[:, :, None] - 2 * torch.bmm(pred, w.transpose(1, 2))


def _smallest(err: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest of (B, n) errors per row, ties broken by the lower position.

    -> (values (B, k), positions (B, k)), sorted by (value, position). ``topk`` finds the k-th
    value (its order among equal values is unspecified); only the few entries at or below it
    are then sorted, by position and value with stable sorts: far cheaper than sorting all n.
    NaN counts as +inf.
    """
    B, n = err.shape
    err = torch.nan_to_num(err, nan=float("inf"))
    kth = torch.topk(err, k, dim=1, largest=False, sorted=True).values[:, -1:]  # (B, 1)
    rows, cols = torch.nonzero(err <= kth, as_tuple=True)  # row-major: positions ascending per row
    vals = err[rows, cols]
    order = torch.sort(vals, stable=True).indices
    order = order[torch.sort(rows[order], stable=True).indices]  # by row, then value, then position
    rows, cols, vals = rows[order], cols[order], vals[order]
    counts = torch.bincount(rows, minlength=B)
    rank = torch.arange(rows.numel(), device=err.device) - (torch.cumsum(counts, 0) - counts)[rows]
    first = rank < k
    return vals[first].view(B, k), cols[first].view(B, k)


def _merge_best(best_err, best_idx, err, offset: int, keep: int):
    """Running ``keep`` smallest of (B, n) candidate errors (indices ``offset + j``), ties to
    the lower index.

    The kept candidates (sorted by (error, index)) come first and every new index is larger
    than theirs, so breaking ties by position in the concatenation breaks them by index.
    """
    idx = torch.arange(offset, offset + err.shape[1], device=err.device).expand(err.shape[0], -1)
    if best_err is not None:
        err = torch.cat([best_err, err], 1)
        idx = torch.cat([best_idx, idx], 1)
    vals, pos = _smallest(err, min(keep, err.shape[1]))
    return vals, torch.gather(idx, 1, pos)


def _duplicates(close: torch.Tensor) -> torch.Tensor:
    """(B, n, n) pairwise closeness -> (B, n) True where an earlier candidate is close."""
    n = close.shape[-1]
    earlier = torch.ones(n, n, dtype=torch.bool, device=close.device).tril(-1)
    return (close & earlier).any(-1)


def _close_rotations(rots: torch.Tensor, tol: float) -> torch.Tensor:
    """(B, n, 3, 3) -> (B, n, n) True where the rotation angle between two is <= ``tol``.

    From the trace, ``tr(R1^T R2) = 1 + 2 cos(angle)``, one (B, n, 9) x (B, 9, n) product: no
    (B, n, n, 3, 3) tensor. In float64, cos resolves angles far below the tolerances used here.
    """
    flat = rots.reshape(*rots.shape[:-2], 9).double()
    return flat @ flat.transpose(-1, -2) >= 1 + 2 * math.cos(tol)


def _chunk(max_elements: int, per_rotation: int) -> int:
    return max(1, max_elements // max(per_rotation, 1))


def search_poses(
    predict: Predictor,
    y: torch.Tensor,
    ctf: torch.Tensor | None,
    freqs: torch.Tensor,
    *,
    base_rots: torch.Tensor,
    base_spacing: float,
    base_shifts: torch.Tensor,
    shift_step: float,
    levels: int,
    keep: int,
    shared_base: bool,
    max_elements: int = 2**26,
) -> SearchResult:
    """Best (rotation, shift) per image by hierarchical grid search.

    predict: rotations (M, 3, 3) -> predictions (M, K) (only for the base grid, when
    ``shared_base``) or (B, M, 3, 3) -> (B, M, K), at the subset points (:func:`radius_subset`).
    y (B, K) observations (not translated), ctf (B, K) or None, freqs (K, 2) cycles/pixel of the
    subset; base_rots (M0, 3, 3) with cell side ``base_spacing`` radians; base_shifts (S0, 2)
    pixels on a grid of ``shift_step``. ``levels`` subdivisions after level 0, ``keep`` pairs
    kept per image and level (1 <= keep <= 81, so that the children of one pair fill it).
    ``shared_base``: the base grid's predictions are the same for every image (zdim = 0);
    otherwise ``predict`` gets (B, M0, 3, 3). Scores are computed in y's dtype (float32 for
    training's targets: the ranking needs no more). ``max_elements`` bounds the elements of each
    score and prediction block (chunks over candidate rotations); the shifted observations
    (B, S, K), S = S0 at level 0 and 9 keep after, are held whole, so bound B (images per call)
    with them in mind.

    Children that repeat a rotation (within a quarter of the child spacing) or a shift (within
    a quarter of the child step) of an earlier child of the same image are not scored, so the
    kept pairs are distinct. Deterministic: ties go to the lower candidate index.
    """
    B, K = y.shape
    device = y.device
    M0, S0 = base_rots.shape[0], base_shifts.shape[0]
    if not 1 <= keep <= 81:
        raise ValueError(f"keep must be in [1, 81], got {keep}")
    if keep > M0 * S0:
        raise ValueError(f"keep = {keep} is more than the {M0 * S0} base (rotation, shift) pairs")
    freqs = freqs.to(device)
    ctf = None if ctf is None else ctf.to(y.dtype)
    user_predict = predict

    def predict(r: torch.Tensor) -> torch.Tensor:  # scores in y's dtype
        return user_predict(r).to(y.dtype)

    base_rots = base_rots.to(device, torch.float64)
    base_shifts = base_shifts.to(device, torch.float64)
    y2 = (y.double() ** 2).sum(-1)  # (B,) the constant ||y_t||^2

    # level 0: every base rotation x every base shift
    y_sh = shifted_observations(y, freqs, base_shifts[None])  # (B, S0, K)
    best_err = best_idx = None
    step = _chunk(max_elements, B * max(S0, K))
    for s in range(0, M0, step):
        r = base_rots[s : s + step]
        if shared_base:
            err = score_shared(predict(r), y_sh, ctf)
        else:
            err = score_per_image(predict(r[None].expand(B, -1, -1, -1)), y_sh, ctf)
        best_err, best_idx = _merge_best(best_err, best_idx, err.reshape(B, -1), s * S0, keep)
    rots = base_rots[best_idx // S0]  # (B, keep, 3, 3)
    shifts = base_shifts[best_idx % S0]  # (B, keep, 2)
    return _subdivide(predict, y, ctf, freqs, y2, rots, shifts, best_err, base_spacing, shift_step, levels, keep,
                      max_elements)


def search_classes(predictors: Sequence[Predictor], y: torch.Tensor, ctf: torch.Tensor | None, freqs: torch.Tensor,
                   **search) -> tuple[SearchResult, torch.Tensor]:
    """Best (class, rotation, shift) per image against C maps (multi-class ab initio).

    ``predictors[c]``: class c's predictions for rotations shared by all images ((M, 3, 3) ->
    (M, K)) and per image ((B, M, 3, 3) -> (B, M, K)). Each class is searched as one homogeneous
    map (:func:`search_poses` with ``shared_base``, the other ``search`` arguments as given).
    Returns the result over all C x keep kept candidates, best first (``rots``, ``shifts_px``
    and ``error`` the best of them), and the class of each kept candidate (B, C keep) int64.
    Deterministic; ties go to the lower class.
    """
    found = [search_poses(p, y, ctf, freqs, shared_base=True, **search) for p in predictors]
    keep = found[0].kept_error.shape[1]
    error = torch.cat([f.kept_error for f in found], 1)  # (B, C keep), class-major
    order = torch.sort(error, dim=1, stable=True).indices
    rots = torch.gather(torch.cat([f.kept_rots for f in found], 1), 1, order[:, :, None, None].expand(-1, -1, 3, 3))
    shifts = torch.gather(torch.cat([f.kept_shifts_px for f in found], 1), 1, order[:, :, None].expand(-1, -1, 2))
    error = torch.gather(error, 1, order)
    classes = torch.div(order, keep, rounding_mode="floor")
    return SearchResult(rots=rots[:, 0], shifts_px=shifts[:, 0], error=error[:, 0], kept_rots=rots,
                        kept_shifts_px=shifts, kept_error=error), classes


def local_search(
    predict: Predictor,
    y: torch.Tensor,
    ctf: torch.Tensor | None,
    freqs: torch.Tensor,
    *,
    rots: torch.Tensor,
    shifts_px: torch.Tensor,
    cell: float,
    shift_step: float,
    levels: int,
    keep: int,
    max_elements: int = 2**26,
) -> SearchResult:
    """Best (rotation, shift) per image near a known pose: the levels of :func:`search_poses`
    without its base grid, starting from each image's ``rots`` (B, 3, 3) and ``shifts_px`` (B, 2)
    as the one candidate of a rotation cell of side ``cell`` radians and a shift step of
    ``shift_step`` pixels. The children reach at most ``cell / 2`` (per rotation axis) and
    ``shift_step`` pixels (per axis) from it after many levels; the pose itself is a child at
    every level, so the result is never worse than it. ``predict`` as for per-image rotations
    ((B, M, 3, 3) -> (B, M, K)); ``levels`` >= 1 and ``keep`` in [1, 81].
    """
    if levels < 1 or not 1 <= keep <= 81:
        raise ValueError(f"a local search needs levels >= 1 and keep in [1, 81], got {levels} and {keep}")
    rots = rots.to(y.device, torch.float64)[:, None]
    shifts = shifts_px.to(y.device, torch.float64)[:, None]
    ctf = None if ctf is None else ctf.to(y.dtype)
    freqs = freqs.to(y.device)

    def predict_in_y_dtype(r: torch.Tensor) -> torch.Tensor:
        return predict(r).to(y.dtype)

    err = score_per_image(predict_in_y_dtype(rots), shifted_observations(y, freqs, shifts), ctf)
    y2 = (y.double() ** 2).sum(-1)
    return _subdivide(predict_in_y_dtype, y, ctf, freqs, y2, rots, shifts, err.reshape(-1, 1), cell, shift_step,
                      levels, keep, max_elements)


def _subdivide(predict, y, ctf, freqs, y2, rots, shifts, best_err, spacing, sstep, levels, keep, max_elements):
    """The levels after the first: subdivide the kept (B, k) rotations and shifts (cells of
    ``spacing`` radians and ``sstep`` pixels) ``levels`` times, keeping the ``keep`` best of each."""
    B, K = y.shape
    for _ in range(levels):
        child_rots = subdivide_rotations(rots, spacing)  # (B, 9 keep, 3, 3)
        child_shifts = subdivide_shifts(shifts, sstep)  # (B, 9 keep, 2)
        spacing, sstep = spacing / 2, sstep / 2
        bad_rot = _duplicates(_close_rotations(child_rots, spacing / 4))
        bad_shift = _duplicates(torch.cdist(child_shifts, child_shifts) <= sstep / 4)
        y_sh = shifted_observations(y, freqs, child_shifts)  # (B, Sc, K)
        Mc, Sc = child_rots.shape[1], child_shifts.shape[1]
        best_err = best_idx = None
        step = _chunk(max_elements, B * max(Sc, K))
        for s in range(0, Mc, step):
            err = score_per_image(predict(child_rots[:, s : s + step]), y_sh, ctf)  # (B, m, Sc)
            invalid = bad_rot[:, s : s + step, None] | bad_shift[:, None, :]
            err = err.masked_fill(invalid, float("inf"))
            best_err, best_idx = _merge_best(best_err, best_idx, err.reshape(B, -1), s * Sc, keep)
        rots = torch.gather(child_rots, 1, (best_idx // Sc)[:, :, None, None].expand(-1, -1, 3, 3))
        shifts = torch.gather(child_shifts, 1, (best_idx % Sc)[:, :, None].expand(-1, -1, 2))
    errors = best_err.double() + y2[:, None]
    return SearchResult(rots=rots[:, 0], shifts_px=shifts[:, 0], error=errors[:, 0], kept_rots=rots,
                        kept_shifts_px=shifts, kept_error=errors)


def decoder_predictor(
    decoder, coords: torch.Tensor, n_half_sub: int, z: torch.Tensor | None, max_points: int
) -> Predictor:
    """The ``predict`` of :func:`search_poses` for a :class:`distdrgn.model.Decoder`.

    coords (K, 3) subset coordinates in [half, mirror] order (``slice_coords[indices]``),
    z (B, zdim) or None. ``predict(rots)``: (M, 3, 3) with z None -> (M, K); (B, M, 3, 3) ->
    (B, M, K), each candidate with its image's z. Rotations are evaluated in chunks of at most
    ``max_points`` slice points, without gradients, in float32 (float64 rotations would make
    the decoder run in float64).
    """
    K = coords.shape[0]
    chunk = max(1, max_points // max(K, 1))

    def _slices(rots: torch.Tensor, zz: torch.Tensor | None) -> torch.Tensor:
        out = []
        for s in range(0, rots.shape[0], chunk):
            zc = None if zz is None else zz[s : s + chunk]
            out.append(decoder.slices_at(coords, n_half_sub, rots[s : s + chunk], zc).float())
        return torch.cat(out) if out else torch.zeros(0, K, device=coords.device)

    @torch.no_grad()
    def predict(rots: torch.Tensor) -> torch.Tensor:
        rots = rots.float()
        if rots.dim() == 3:
            if z is not None:
                raise ValueError("rotations shared by all images need z = None (zdim = 0)")
            return _slices(rots, None)
        B, M = rots.shape[:2]
        zz = None if z is None else z.repeat_interleave(M, 0)
        return _slices(rots.reshape(B * M, 3, 3), zz).view(B, M, K)

    return predict


def decoded_ball(decoder, radius: float, D: int, z: torch.Tensor | None, oversample: int = 2,
                 max_points: int = 1 << 18) -> tuple[torch.Tensor, int]:
    """The decoder's Hartley values on a cubic grid ``oversample`` times finer than the lattice,
    within ``radius`` (+ 1.5 lattice steps) of the origin, zero outside: -> (volumes (n_vol, G,
    G, G) float32 indexed [z, y, x], n) with G = 2n + 1 and grid index ``i`` at frequency
    ``(i - n) / (oversample D)`` cycles/pixel on each axis.

    z None: one volume (zdim = 0); z (B, zdim): one per row. The Fourier domain is evaluated on
    half the ball only and the other half filled from ``H(-k) = real + imag`` (the grid is
    symmetric about 0, so -k of flat index i is ``G^3 - 1 - i``). Differentiable with respect to
    the decoder; callers that only read it wrap it in ``torch.no_grad()``.
    """
    n = int(np.ceil((radius + 1) * oversample))
    device = next(decoder.parameters()).device
    axis = torch.arange(-n, n + 1, device=device, dtype=torch.float32) / (oversample * D)
    gz, gy, gx = torch.meshgrid(axis, axis, axis, indexing="ij")
    grid = torch.stack([gx, gy, gz], -1).reshape(-1, 3)  # (G^3, 3) x fastest: volume[z, y, x]
    inside = grid.norm(dim=1) * D <= radius + 1.5
    fourier = decoder.domain == "fourier"
    if fourier:
        inside &= ~canonicalize(grid)[1]  # the canonical half; its mirror is filled below
    inside = torch.nonzero(inside).squeeze(1)
    n_vol = 1 if z is None else z.shape[0]
    values = torch.zeros(n_vol, grid.shape[0], device=device)
    for v in range(n_vol):
        zv = None if z is None else z[v : v + 1]
        for s in range(0, len(inside), max_points):
            part = inside[s : s + max_points]
            if fourier:
                pos, neg = decoder.hartley_pairs(grid[part][None], zv)
                # mirror first: the origin is its own mirror and takes H(0) = real - imag
                values[v, grid.shape[0] - 1 - part] = neg[0].float()
                values[v, part] = pos[0].float()
            else:
                values[v, part] = decoder.hartley(grid[part][None], zv)[0].float()
    G = 2 * n + 1
    return values.view(n_vol, G, G, G), n


def volume_predictor(
    decoder, coords: torch.Tensor, radius: float, D: int, z: torch.Tensor | None, oversample: int = 2,
    max_points: int = 1 << 18,
) -> Predictor:
    """The ``predict`` of :func:`search_poses` from decoded volumes (:func:`decoded_ball`): the
    decoder is evaluated once per volume on a grid ``oversample`` times finer than the lattice,
    within ``radius``, and every candidate slice is read from it by trilinear interpolation. A
    search reads ~10^4 slices per image, so this replaces millions of decoder evaluations per
    image by one small ball of them; twofold oversampling keeps the interpolation error well
    below the noise (RELION pads by 2 for the same reason).

    z None: one volume shared by all images (zdim = 0); z (zdim,): one volume at that z, shared
    by all images (a class of a multi-class search, ``abinit.classes``); z (B, zdim): one volume
    per image, at its own z. Gradient refinement later uses the decoder itself.

    coords (K, 3) subset coordinates (cycles/pixel). ``predict(rots)``: (M, 3, 3) -> (M, K)
    (one shared volume only) or (B, M, 3, 3) -> (B, M, K); float32, no gradients.
    """
    shared = z is None or z.dim() == 1
    with torch.no_grad():
        values, n = decoded_ball(decoder, radius, D, None if z is None else z.reshape(-1, z.shape[-1]), oversample,
                                 max_points)
    n_vol = values.shape[0]
    volumes = values[:, None]  # (n_vol, 1, G, G, G) for grid_sample
    scale = oversample * D / n  # cycles/pixel -> grid_sample's [-1, 1] (align_corners: +-1 are the end points)
    K = coords.shape[0]

    @torch.no_grad()
    def predict(rots: torch.Tensor) -> torch.Tensor:
        lead = rots.shape[:-2]
        if shared:  # every rotation reads the one volume
            pts = (coords.float() @ rots.float().reshape(-1, 3, 3)) * scale  # (M', K, 3), (x, y, z)
            grid_pts = pts.view(1, -1, 1, 1, 3)
        else:
            if rots.dim() != 4 or rots.shape[0] != n_vol:
                raise ValueError(f"per-image volumes need rotations (B={n_vol}, M, 3, 3), got {tuple(rots.shape)}")
            pts = (coords.float() @ rots.float().reshape(n_vol, -1, 1, 3, 3)) * scale  # (B, M, K, 3)
            grid_pts = pts.view(n_vol, -1, 1, 1, 3)
        out = torch.nn.functional.grid_sample(volumes, grid_pts, mode="bilinear", align_corners=True)
        return out.view(*lead, K)

    return predict
