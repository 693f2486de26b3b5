"""The per-particle table: one Adam step per row from the corrections' (and an autodecoder's z)
gradients, skipped steps, and the sharded state on disk read back whatever the number of ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distdrgn.errors import DistdrgnError
from distdrgn.lattice import random_rotations
from distdrgn.objective import Batch
from distdrgn.particle_table import ParticleTable, prune_states, write_poses_pkl
from distdrgn.so3_grid import angle_between, so3_exp

D = 32


def table(n=10, seed=0, **kw) -> ParticleTable:
    g = torch.Generator().manual_seed(seed)
    rots = random_rotations(n, g).float()
    trans = (torch.rand(n, 2, generator=g) - 0.5) * 0.1
    return ParticleTable(rots, trans, D, "cpu", lr_rot=kw.get("lr_rot", 0.01), lr_trans=kw.get("lr_trans", 0.1),
                         searcher=kw.get("searcher"), zdim=kw.get("zdim", 0), lr_z=kw.get("lr_z", 0.05), seed=seed,
                         classes=kw.get("classes", 1))


def batch_of(rows) -> Batch:
    rows = torch.as_tensor(rows)
    return Batch(rows, torch.zeros(len(rows), D, D), None, None, None)


def test_refinement_moves_each_row_downhill_by_about_lr_and_leaves_the_others():
    t = table()
    target = t.rots[[2, 5]] @ so3_exp(torch.tensor([[0.2, 0.0, 0.0], [0.0, -0.1, 0.05]], dtype=torch.float64)).float()
    target_t = t.trans[[2, 5]] + torch.tensor([[1.0, -1.0], [0.5, 0.5]]) / D
    before_rots, before_trans = t.rots.clone(), t.trans.clone()
    t.refining = True
    b, _ = t.batch(batch_of([2, 5]))
    loss = ((b.rots - target) ** 2).sum() + ((b.trans - target_t) ** 2).sum()
    loss.backward()
    t.step_unless(torch.tensor(0.0))
    err_before = angle_between(before_rots[[2, 5]].double(), target.double())
    err_after = angle_between(t.rots[[2, 5]].double(), target.double())
    # Adam's first step has size lr along each coordinate: the error shrinks by about lr * sqrt(#moving axes)
    assert (err_after < err_before - 0.005).all()
    assert torch.all((t.trans[[2, 5]] - target_t).abs() < (before_trans[[2, 5]] - target_t).abs())
    moved = torch.ones(10, dtype=torch.bool)
    moved[[2, 5]] = False
    assert torch.equal(t.rots[moved], before_rots[moved]) and torch.equal(t.trans[moved], before_trans[moved])
    assert torch.equal(t.count, torch.tensor([0, 0, 1, 0, 0, 1, 0, 0, 0, 0], dtype=torch.float32))
    # still rotations
    eye = torch.eye(3).expand(2, 3, 3)
    torch.testing.assert_close(t.rots[[2, 5]] @ t.rots[[2, 5]].transpose(1, 2), eye, atol=1e-5, rtol=0)


def test_a_skipped_step_changes_nothing():
    t = table()
    before = [x.clone() for x in (t.rots, t.trans, t.m, t.v, t.count)]
    t.refining = True
    b, _ = t.batch(batch_of([1, 3]))
    (b.rots.sum() + b.trans.sum()).backward()
    t.step_unless(torch.tensor(1.0))
    for old, new in zip(before, (t.rots, t.trans, t.m, t.v, t.count)):
        assert torch.equal(old, new)


def test_searched_poses_replace_the_rows_and_restart_their_optimizer():
    found = random_rotations(2, torch.Generator().manual_seed(7)).float()
    t = table(searcher=lambda b, z, current: (found, torch.full((2, 2), 0.01), None))
    t.m[4] = 1.0
    t.count[4] = 3
    t.searching = True
    b, _ = t.batch(batch_of([4, 8]))
    assert torch.equal(b.rots, found) and torch.equal(t.rots[[4, 8]], found)
    assert t.count[4] == 0 and torch.all(t.m[4] == 0)
    assert t.changed[[4, 8]].all() and t.changed.sum() == 2


def test_state_written_by_two_ranks_reads_back_whole_into_any_number(tmp_path):
    """rank 0 writes every row, rank 1 the rows it changed; read in rank order they are the state."""
    rank0, rank1 = table(seed=0), table(seed=0)  # both start from the same rows (an exchange)
    rank0.rots[1] = torch.eye(3)
    rank0.changed[1] = True
    rank1.rots[6] = -torch.eye(3) * torch.tensor([1.0, 1.0, -1.0])
    rank1.trans[6] = torch.tensor([0.02, -0.03])
    rank1.count[6] = 5
    rank1.changed[6] = True
    refs = [t.save(tmp_path, "step.2.64", r, 2, barrier=lambda: None) for r, t in enumerate((rank0, rank1))]
    assert refs[0] == refs[1] == {"folder": "pose_state/step.2.64", "ranks": 2}
    fresh = table(seed=3)  # another process, other rows in memory
    fresh.load(tmp_path, refs[0])
    assert torch.equal(fresh.rots[1], torch.eye(3))
    assert torch.equal(fresh.rots[6], rank1.rots[6]) and torch.equal(fresh.trans[6], rank1.trans[6])
    assert fresh.count[6] == 5
    others = [i for i in range(10) if i not in (1, 6)]
    assert torch.equal(fresh.rots[others], rank0.rots[others])
    assert not fresh.changed.any()


def test_a_missing_shard_is_one_clear_error(tmp_path):
    t = table()
    ref = t.save(tmp_path, "epoch.1", 0, 2, barrier=lambda: None)  # rank 1 never wrote its file
    with pytest.raises(DistdrgnError, match="rank1.npz"):
        table().load(tmp_path, ref)


def test_prune_keeps_the_referenced_states(tmp_path):
    t = table()
    for tag in ("epoch.1", "epoch.2", "step.3.32"):
        t.save(tmp_path, tag, 0, 1, barrier=lambda: None)
    prune_states(tmp_path, {"pose_state/epoch.2", "pose_state/step.3.32"})
    assert sorted(p.name for p in (tmp_path / "pose_state").iterdir()) == ["epoch.2", "step.3.32"]


def test_poses_pkl_is_cryodrgns_layout(tmp_path):
    from distdrgn.formats.poses import load_poses

    t = table()
    write_poses_pkl(tmp_path / "poses.pkl", *t.poses(np.array([0, 3, 4])))
    rots, trans = load_poses(tmp_path / "poses.pkl")
    np.testing.assert_array_equal(rots, t.rots[[0, 3, 4]].numpy())
    np.testing.assert_array_equal(trans, t.trans[[0, 3, 4]].numpy())


def test_an_autodecoders_z_rows_step_downhill_with_the_poses_fixed():
    t = table(zdim=3, lr_z=0.05)
    assert t.z.shape == (10, 3) and 0.02 < float(t.z.std()) < 0.3  # N(0, 0.1^2) draws
    assert torch.equal(t.z, table(zdim=3).z) and not torch.equal(t.z, table(zdim=3, seed=1).z)  # seeded
    z0, rots0 = t.z.clone(), t.rots.clone()
    b, z = t.batch(batch_of([1, 6]))
    assert z.requires_grad and b.rots.requires_grad is False  # not refining: the poses are data
    target = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    ((z - target) ** 2).sum().backward()
    t.step_unless(torch.tensor(0.0))
    moved = t.z[[1, 6]] - z0[[1, 6]]
    assert torch.allclose(moved.abs(), torch.full_like(moved, 0.05), rtol=1e-3)  # Adam's first step: lr
    assert (torch.sign(moved) == torch.sign(target - z0[[1, 6]])).all()
    others = [i for i in range(10) if i not in (1, 6)]
    assert torch.equal(t.z[others], z0[others]) and torch.equal(t.rots, rots0)
    assert torch.equal(t.changed, torch.isin(torch.arange(10), torch.tensor([1, 6])))
    # a skipped step leaves z as it was
    z1 = t.z.clone()
    _, z = t.batch(batch_of([1]))
    z.sum().backward()
    t.step_unless(torch.tensor(1.0))
    assert torch.equal(t.z, z1) and float(t.z_count[1]) == 1


def test_the_search_sees_the_rows_z(tmp_path):
    seen = {}

    def searcher(b, z, current):
        seen["z"] = z
        return torch.eye(3).expand(len(b.indices), 3, 3), torch.zeros(len(b.indices), 2), None

    t = table(zdim=2, searcher=searcher)
    t.searching = True
    t.batch(batch_of([3, 7]))
    assert torch.equal(seen["z"], t.z[[3, 7]]) and not seen["z"].requires_grad


def test_classes_are_one_hot_rows_the_search_sets_and_no_gradient_moves():
    """abinit.classes: each row starts in a random (seeded) class; the search's classes replace
    the batch's rows and are the step's z; the step does not change them."""
    t = table(zdim=3, classes=3, searcher=lambda b, z, current: (
        torch.eye(3).expand(len(b.indices), 3, 3), torch.zeros(len(b.indices), 2), torch.eye(3)[[2, 0]]))
    assert (t.z.sum(1) == 1).all() and set(t.z.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(t.z, table(zdim=3, classes=3).z)
    t.searching = True
    _, z = t.batch(batch_of([4, 8]))
    assert torch.equal(z, torch.eye(3)[[2, 0]]) and torch.equal(t.z[[4, 8]], z) and not z.requires_grad
    before = t.z.clone()
    t.step_unless(torch.tensor(0.0))  # nothing of z to step on
    assert torch.equal(t.z, before)
    with pytest.raises(ValueError):
        table(zdim=2, classes=3)


def test_z_rows_are_part_of_the_sharded_state(tmp_path):
    rank0, rank1 = table(zdim=2), table(zdim=2)
    rank1.z[[4, 5]] = torch.tensor([[9.0, 9.0], [8.0, 8.0]])
    rank1.changed[[4, 5]] = True
    refs = [t.save(tmp_path, "epoch.1", r, 2, barrier=lambda: None) for r, t in enumerate((rank0, rank1))]
    back = table(zdim=2, seed=5)
    back.load(tmp_path, refs[0])
    expected = rank0.z.clone()
    expected[[4, 5]] = rank1.z[[4, 5]]
    assert torch.equal(back.z, expected) and np.array_equal(back.latents([4]), expected[[4]].numpy())
    # an autodecoder cannot resume from a state without z: one clear error
    ref = table(zdim=0).save(tmp_path, "epoch.2", 0, 1, barrier=lambda: None)
    with pytest.raises(DistdrgnError, match="cannot be read"):
        table(zdim=2).load(tmp_path, ref)
