import math

import torch

from distdrgn.lattice import random_rotations
from distdrgn.so3_grid import (
    angle_between,
    base_rotations,
    grid_spacing,
    shift_grid,
    skew,
    so3_exp,
    subdivide_rotations,
    subdivide_shifts,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_base_grid_is_rotations_and_near_uniform():
    n = 1152
    grid = base_rotations(n)
    assert grid.shape == (n, 3, 3) and grid.dtype == torch.float64
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(grid.transpose(1, 2) @ grid, eye.expand(n, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(grid), torch.ones(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(grid, base_rotations(n))  # deterministic
    h = grid_spacing(n)
    # covering radius: every random rotation is close to the grid (half the cube diagonal
    # is 0.87 h; a random set of n rotations would leave gaps of ~1.5 h)
    targets = random_rotations(2000, _gen(0))
    nearest = angle_between(targets[:, None], grid[None]).min(1).values
    assert nearest.max() < 1.0 * h
    # no duplicates or near-duplicates (q and -q of the double cover give the same rotation)
    pair = angle_between(grid[:, None], grid[None])
    pair.fill_diagonal_(math.pi)
    assert pair.min() > 0.4 * h


def test_grid_spacing_is_cell_side():
    assert math.isclose(grid_spacing(1) ** 3, 8 * math.pi**2)
    assert math.isclose(grid_spacing(8000), grid_spacing(1000) / 2)


def test_so3_exp_matches_matrix_exp_and_is_orthonormal():
    omega = torch.randn(200, 3, generator=_gen(1), dtype=torch.float64) * 1.5
    omega[:5] *= 1e-5  # the Taylor branch
    omega[5] = 0.0
    r = so3_exp(omega)
    assert torch.allclose(r, torch.linalg.matrix_exp(skew(omega)), atol=1e-12)
    eye = torch.eye(3, dtype=torch.float64).expand(200, 3, 3)
    assert torch.allclose(r.transpose(1, 2) @ r, eye, atol=1e-12)
    norm = omega.norm(dim=1)
    inside = norm < math.pi - 1e-3  # below pi the rotation angle is |omega|
    assert inside.sum() > 100
    assert torch.allclose(angle_between(eye, r)[inside], norm[inside], atol=1e-9)
    # float32 near zero and the gradient at zero are finite
    r32 = so3_exp(torch.tensor([[1e-4, -2e-4, 3e-4]]))
    assert torch.allclose(r32, torch.linalg.matrix_exp(skew(torch.tensor([[1e-4, -2e-4, 3e-4]]))), atol=1e-7)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    (so3_exp(w) * torch.arange(9.0, dtype=torch.float64).view(3, 3)).sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_angle_between_small_angles():
    r = random_rotations(10, _gen(2))
    for a in (1e-7, 1e-3, 1.0, 3.0):
        axis = torch.nn.functional.normalize(torch.randn(10, 3, generator=_gen(3), dtype=torch.float64), dim=1)
        got = angle_between(r, r @ so3_exp(axis * a))
        assert torch.allclose(got, torch.full((10,), a, dtype=torch.float64), rtol=1e-6, atol=1e-12)


def test_subdivision_children_near_parent_and_ordered():
    parents = random_rotations(6, _gen(4)).view(2, 3, 3, 3)
    h = 0.3
    children = subdivide_rotations(parents, h)
    assert children.shape == (2, 27, 3, 3)
    grouped = children.view(2, 3, 9, 3, 3)
    assert torch.equal(grouped[:, :, 0], parents)  # the parent first
    dist = angle_between(parents[:, :, None], grouped)
    assert torch.allclose(dist[:, :, 1:], torch.full_like(dist[:, :, 1:], h * math.sqrt(3) / 4), atol=1e-12)
    # the 8 children are distinct
    sib = angle_between(grouped[:, :, 1:, None], grouped[:, :, None, 1:]) + torch.eye(8) * 9
    assert sib.min() > 0.49 * h  # h / 2 in the tangent space, a little less on the curved group


def test_covering_radius_halves_by_level():
    """Refining the 4 grid rotations nearest to a target: the distance to the nearest
    candidate halves with each level (median over targets).

    The base grid's cells are not cubes, so the cubes that subdivision refines leave small gaps
    between neighbours: the worst target's distance shrinks more slowly (the search keeps
    several candidates for this reason); the median and the 90th percentile do halve.
    """
    n = 576
    h = grid_spacing(n)
    target = random_rotations(100, _gen(5))
    grid = base_rotations(n)
    cand = grid[angle_between(target[:, None], grid[None]).topk(4, largest=False).indices]  # (100, 4, 3, 3)
    for level in range(4):
        side = h / 2**level
        e = angle_between(target[:, None], cand).min(1).values / side
        assert e.median() < 0.6, (level, e.median())  # a cube's mean distance to its centre is 0.48 side
        assert torch.quantile(e, 0.9) < 1.25, (level, torch.quantile(e, 0.9))
        cand = subdivide_rotations(cand, side)


def test_shift_grid_and_subdivision():
    g = shift_grid(3.0, 1.0)
    assert g.shape == (49, 2) and g.dtype == torch.float64
    assert torch.equal(g[24], torch.zeros(2, dtype=torch.float64))
    assert g.abs().max() == 3.0 and len({tuple(p) for p in g.tolist()}) == 49
    assert shift_grid(2.5, 1.0).shape == (25, 2)
    s = torch.tensor([[[0.5, -1.0], [2.0, 0.0]]], dtype=torch.float64)  # (1, 2, 2)
    c = subdivide_shifts(s, 1.0)
    assert c.shape == (1, 18, 2)
    c = c.view(1, 2, 9, 2)
    assert torch.equal(c[:, :, 0], s)
    off = (c - s[:, :, None]).view(-1, 2)
    assert set(map(tuple, off.tolist())) == {(dx, dy) for dx in (-0.5, 0.0, 0.5) for dy in (-0.5, 0.0, 0.5)}


def test_so3_exp_gradient():
    # finite differences on both branches (closed form, and the Taylor series at and near 0)
    for omega in (torch.tensor([[0.3, -1.1, 0.7]]), torch.tensor([[2e-4, 1e-4, -3e-4]]), torch.zeros(1, 3)):
        w = omega.double().requires_grad_(True)
        assert torch.autograd.gradcheck(so3_exp, (w,), eps=1e-6, atol=1e-7)
