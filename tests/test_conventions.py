"""Pose / translation conventions checked against cryoDRGN's own test data (the "hand" fixture).

``hand.mrcs`` holds 100 clean 64 x 64 projections and ``hand_rot_trans.pkl`` their cryoDRGN
poses. ``hand-vol.mrc`` is NOT the map those images were projected from (see
:func:`test_hand_vol_is_not_the_generating_map`), so projecting it cannot validate anything.
Instead the images are checked against themselves: reconstruct a volume from 4/5 of them with
the stored poses (voxel back-projection), project it into the held-out poses with
:func:`distdrgn.projection.project_volume`, and correlate with the held-out images. Only the
right reading of ``rots`` (slice = ``[x, y, 0] @ R``) and ``trans`` (moving the image by
``+trans * D`` re-centres it), with row = y and column = x, gives consistent reprojections.
"""

import pickle

import numpy as np
import pytest
import torch

from distdrgn.formats.mrc import open_mrc, read_volume
from distdrgn.projection import backproject, project_volume

from fixture_files import FIXTURES
pytestmark = pytest.mark.skipif(
    not (FIXTURES / "hand.mrcs").is_file(), reason=f"format fixtures not found at {FIXTURES}"
)


@pytest.fixture(scope="module")
def hand():
    images = torch.from_numpy(open_mrc(FIXTURES / "hand.mrcs").read(slice(None)).astype(np.float32))
    with open(FIXTURES / "hand_rot_trans.pkl", "rb") as f:
        rots, trans = pickle.load(f)
    return images, torch.from_numpy(np.asarray(rots)), torch.from_numpy(np.asarray(trans))


def _corr(a, b):
    a = a - a.mean(dim=(-2, -1), keepdim=True)
    b = b - b.mean(dim=(-2, -1), keepdim=True)
    return (a * b).sum((-2, -1)) / (a.norm(dim=(-2, -1)) * b.norm(dim=(-2, -1)))


def _cross_validated_corr(images, rots, trans, folds=5):
    """Per-image correlation of each image with the reprojection of a volume built without it."""
    n = images.shape[0]
    out = torch.zeros(n)
    for f in range(folds):
        test = torch.arange(n) % folds == f
        vol = backproject(images[~test], rots[~test], trans[~test])
        out[test] = _corr(project_volume(vol, rots[test], trans[test]), images[test])
    return out


def test_hand_images_are_clean_projections(hand):
    """Every image integrates to the same mass and is non-negative: projections of one positive map."""
    images, rots, trans = hand
    sums = images.double().sum((1, 2))
    assert float((sums.max() - sums.min()) / sums.mean()) < 1e-5
    assert float(images.min()) > -1e-3 * float(images.max())
    assert np.allclose(np.linalg.det(rots.double().numpy()), 1.0, atol=1e-5)
    # The stored shifts re-centre the particles: the centre of mass moves towards (D/2, D/2).
    D = images.shape[-1]
    g = torch.arange(D, dtype=torch.float64)
    m = images.double() / sums[:, None, None]
    com = torch.stack([(m.sum(1) * g).sum(1), (m.sum(2) * g).sum(1)], -1) - D // 2  # (x, y) offsets
    assert float((com + trans * D).norm(dim=1).mean()) < 0.5 * float(com.norm(dim=1).mean())


def test_hand_vol_is_not_the_generating_map(hand):
    """hand-vol.mrc cannot have produced hand.mrcs under any pose convention.

    Its projections have large negative lobes (the images are >= 0) and its integral is 270
    against the images' 1650: it looks like a reconstruction or model output, not the source.
    """
    images, rots, _ = hand
    vol, _ = read_volume(FIXTURES / "hand-vol.mrc")
    assert abs(float(vol.sum()) - float(images[0].sum())) > 0.5 * float(images[0].sum())
    for r in (rots, rots.transpose(1, 2)):
        proj = project_volume(vol, r)
        neg = proj.clamp(max=0).abs().sum((1, 2))
        pos = proj.clamp(min=0).sum((1, 2))
        assert float((neg / pos).min()) > 0.3


def test_hand_reprojections_confirm_pose_conventions(hand):
    images, rots, trans = hand
    good = _cross_validated_corr(images, rots, trans)
    assert float(good.mean()) > 0.93 and float(good.min()) > 0.85, good
    wrong = {
        "transposed rotations": _cross_validated_corr(images, rots.transpose(1, 2), trans),
        "negated shifts": _cross_validated_corr(images, rots, -trans),
        "x/y swapped": _cross_validated_corr(images.transpose(1, 2), rots, trans.flip(1)),
    }
    for name, corr in wrong.items():
        assert float(corr.mean()) < float(good.mean()) - 0.05, name
        assert float((good > corr).float().mean()) >= 0.85, name
    assert float(wrong["negated shifts"].mean()) < 0.75
