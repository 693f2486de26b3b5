"""distdrgn.pose_training and the volume predictor of distdrgn.pose_search: slices read from
decoded volumes against the decoder's own slices; the phase and radius policies."""

import pytest
import torch

from distdrgn.config import AbinitConfig, Config
from distdrgn.errors import DistdrgnError
from distdrgn.lattice import Lattice
from distdrgn.model import Decoder, PositionalEncoding
from distdrgn.pose_search import radius_subset, volume_predictor
from distdrgn.pose_training import collapse_epoch, pose_phase, sample_candidates, search_radius
from distdrgn.so3_grid import so3_exp

D = 16


def _decoder(zdim: int, domain: str) -> Decoder:
    # low positional frequencies: a map smooth on the lattice scale, like an early model
    torch.manual_seed(0)
    pe = PositionalEncoding("geom_lowf", 4, D, seed=0)
    return Decoder(pe, zdim, 32, 2, domain)


def _case(zdim: int, domain: str, radius: float = 6, B: int = 2):
    lattice = Lattice(D)
    idx, n_half = radius_subset(lattice, radius)
    coords = lattice.coords[lattice.mask_indices][idx]
    z = torch.randn(B, zdim, generator=torch.Generator().manual_seed(2)) if zdim else None
    return coords, n_half, _decoder(zdim, domain), z


def _exact(dec, coords, n_half, rots, z, b):
    zb = None if z is None else z[b : b + 1].expand(len(rots), -1)
    with torch.no_grad():
        return dec.slices_at(coords, n_half, rots, zb)


# rotations that take lattice points onto the nodes of the 2x grid, where reading is exact
QUARTER_TURNS = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, -1, 0], [1, 0, 0], [0, 0, 1]],
                              [[1, 0, 0], [0, 0, -1], [0, 1, 0]], [[0, 0, 1], [0, 1, 0], [-1, 0, 0]],
                              [[-1, 0, 0], [0, -1, 0], [0, 0, 1]]], dtype=torch.float32)


@pytest.mark.parametrize("domain", ["fourier", "hartley"])
@pytest.mark.parametrize("zdim", [0, 3])
def test_decoded_volumes_hold_the_decoders_values_including_the_mirrored_half(zdim, domain):
    coords, n_half, dec, z = _case(zdim, domain)
    predict = volume_predictor(dec, coords, 6, D, z, max_points=700)  # several chunks per volume
    got = predict(QUARTER_TURNS[None].expand(2, -1, -1, -1))
    assert got.shape == (2, 5, coords.shape[0]) and got.dtype == torch.float32
    for b in range(2):
        assert torch.allclose(got[b], _exact(dec, coords, n_half, QUARTER_TURNS, z, b), atol=1e-5)
    if zdim:  # each image reads its own volume
        assert not torch.allclose(got[0], got[1], atol=1e-3)
        with pytest.raises(ValueError):
            predict(QUARTER_TURNS)  # shared rotations need one volume for all images
        # z (zdim,): one volume at that z for every image (a class of abinit.classes)
        shared = volume_predictor(dec, coords, 6, D, z[1], max_points=700)
        assert torch.allclose(shared(QUARTER_TURNS), got[1], atol=1e-6)
        assert torch.allclose(shared(QUARTER_TURNS[None].expand(2, -1, -1, -1)), got[1].expand(2, -1, -1), atol=1e-6)
    else:
        assert torch.allclose(predict(QUARTER_TURNS), got[0], atol=1e-6)
    # the origin (not a lattice point, but a neighbour of the lowest ones) is its own mirror
    origin = torch.zeros(1, 3)
    at_origin = volume_predictor(dec, origin, 6, D, z)(torch.eye(3).expand(2, 1, 3, 3))[:, 0, 0]
    with torch.no_grad():
        want = dec.hartley(origin.expand(2, 1, 3), z)[:, 0]
    assert torch.allclose(at_origin, want, atol=1e-6)


@pytest.mark.parametrize("zdim", [0, 3])
def test_trilinear_reading_converges_with_oversampling(zdim):
    # the Hartley-domain decoder is continuous in k, so the interpolation error falls ~4x per
    # doubling of the grid. (The Fourier domain's Hartley values jump across k_z = 0 by 2 imag
    # for an untrained decoder; training makes them continuous, and search only ranks.)
    coords, n_half, dec, z = _case(zdim, "hartley")
    rots = so3_exp(torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2).float()
    errs = []
    for oversample in (1, 2, 4):
        got = volume_predictor(dec, coords, 6, D, z, oversample=oversample)(rots[None].expand(2, -1, -1, -1))
        exact = torch.stack([_exact(dec, coords, n_half, rots, z, b) for b in range(2)])
        errs.append(float((got - exact).norm() / exact.norm()))
    assert errs[1] < 0.08 and errs[2] < errs[1] / 2.5 < errs[0] / 6, errs


def test_search_then_refine_phases_and_frequency_marching():
    cfg = Config()
    cfg.abinit.search_epochs, cfg.abinit.refine = 3, True
    assert [pose_phase(cfg, "search", e) for e in (1, 3, 4)] == [(True, False), (True, False), (False, True)]
    cfg.model.pose_warmup_epochs = 2
    assert [pose_phase(cfg, "refine", e) for e in (2, 3)] == [(False, False), (False, True)]
    assert pose_phase(cfg, "store", 5) == (False, False)
    ab = AbinitConfig(search_epochs=3, radius_start=4, radius_end=10)
    assert [search_radius(ab, e, 64) for e in (1, 2, 3, 9)] == [4, 7, 10, 10]
    assert search_radius(ab, 3, 16) == 8  # capped at Nyquist


def test_posterior_sampling_prefers_the_better_candidates():
    torch.manual_seed(0)
    errors = torch.tensor([[100.0, 100.5, 400.0]]).expand(2000, 3)
    picks = sample_candidates(errors, n_points=100)
    counts = torch.bincount(picks, minlength=3)
    assert counts[2] == 0  # far worse than the best: probability ~ exp(-150)
    assert 0.3 < counts[1] / counts[0] < 1.0  # close to the best: drawn often, less than the best


# training losses of measured ab initio runs (benchmarks/RESULTS.md), one per search epoch
HINGE_COLLAPSE = [0.534, 0.179, 0.156, 0.140, 0.136, 0.138, 0.147, 0.177, 0.227, 0.320, 0.324, 0.347, 0.382]
FOUND = [0.839, 0.530, 0.242, 0.165, 0.134, 0.124, 0.112, 0.106, 0.103, 0.095, 0.087, 0.059, 0.042, 0.038, 0.035]
PLATEAU = [0.534, 0.200, 0.168, 0.159, 0.150]


def test_a_collapse_is_told_once_at_the_first_epoch_past_the_rise():
    told = [collapse_epoch(HINGE_COLLAPSE[:n]) for n in range(1, len(HINGE_COLLAPSE) + 1)]
    # epoch 9's 0.227 is the first above 1.5 x 0.136 (epoch 5); later epochs are not told again
    assert told == [None] * 8 + [(9, 5)] + [None] * 4
    assert all(collapse_epoch(FOUND[:n]) is None for n in range(1, len(FOUND) + 1))
    assert all(collapse_epoch(PLATEAU[:n]) is None for n in range(1, len(PLATEAU) + 1))
    assert collapse_epoch([0.2, 0.1, 0.14], rise=1.3) == (3, 2) and collapse_epoch([0.2, 0.1, 0.14]) is None


def test_a_heterogeneous_search_encodes_the_image_centred_by_its_current_shift():
    """The training step encodes each image centred by its pose's shift, so the search takes z
    from the image centred by its current shift, not from the uncentred image (whose z is
    another z: against a hinge model trained on the true poses that cost 21 against 3.6 degrees
    median, benchmarks/RESULTS.md)."""
    from distdrgn.model import CryoDRGN, ModelInfo
    from distdrgn.objective import Batch, Preprocess, prepare_targets
    from distdrgn.pose_training import ModelPoseSearch

    cfg = Config()
    cfg.model.zdim, cfg.model.enc_dim, cfg.model.enc_layers, cfg.model.dec_dim, cfg.model.dec_layers = 4, 32, 2, 32, 2
    model = CryoDRGN(ModelInfo.from_config(cfg.model, D, seed=0)).eval()
    prep = Preprocess(D)
    search = ModelPoseSearch(model, prep, AbinitConfig(base_rotations=576, levels=1, keep=2, shift_extent_px=2,
                                                       shift_step_px=1, radius_start=5, search_epochs=1, sample=False),
                             torch.device("cpu"))
    search.set_epoch(1)
    gen = torch.Generator().manual_seed(3)
    B = 6
    images = torch.randn(B, D, D, generator=gen)
    rots = torch.eye(3).expand(B, 3, 3)
    shifts = (torch.rand(B, 2, generator=gen) - 0.5) * 6 / D  # up to 3 pixels
    batch = Batch(torch.arange(B), images, None, None, None)

    def encoded(trans):
        with torch.no_grad():
            return model.encode(prepare_targets(Batch(batch.indices, images, None, trans, None), prep,
                                                model.lattice).y_enc)[0]

    found = search(batch, None, (rots, shifts))
    as_centred = search(batch, encoded(shifts), (rots, shifts))
    as_uncentred = search(batch, encoded(None), (rots, shifts))
    assert found[2] is None  # no classes: the search leaves z to the encoder
    assert all(torch.equal(a, b) for a, b in zip(found[:2], as_centred[:2]))
    assert not all(torch.equal(a, b) for a, b in zip(found[:2], as_uncentred[:2]))  # the choice of z matters here


def test_classes_make_a_one_hot_autodecoder_model_and_refuse_a_continuous_latent():
    from distdrgn.pose_training import class_model_config

    cfg = Config()
    cfg.model.zdim, cfg.abinit.classes = 0, 3
    out = class_model_config(cfg)
    assert (out.model.zdim, out.model.encoder) == (3, "autodecoder") and cfg.model.zdim == 0  # a copy
    assert class_model_config(out).model.zdim == 3  # a resumed run's config.yaml passes as it is
    one = Config()
    assert class_model_config(one) is one  # no classes: as given (zdim 8, the encoder)
    cfg.model.zdim = 8
    with pytest.raises(DistdrgnError, match="needs model.zdim=0"):
        class_model_config(cfg)
