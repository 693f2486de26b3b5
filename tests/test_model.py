import math
from pathlib import Path

import pytest
import torch

from distdrgn.config import ModelConfig
from distdrgn.lattice import Lattice
from distdrgn.model import (
    CryoDRGN,
    ModelInfo,
    PositionalEncoding,
    build_model,
    canonicalize,
    geometric_frequencies,
)

D = 16


def tiny(**kw) -> CryoDRGN:
    cfg = ModelConfig(**{"zdim": 3, "enc_dim": 24, "enc_layers": 2, "dec_dim": 24, "dec_layers": 3, **kw})
    return build_model(cfg, D, seed=1)


def random_rotations(n, seed=0):
    q = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q = q / q.norm(dim=1, keepdim=True)
    w, x, y, z = q.unbind(1)
    R = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], 1).view(n, 3, 3)
    return R.float()


def test_gaussian_pe_matches_direct_formula():
    pe = PositionalEncoding("gaussian", pe_dim=D // 2, D=D, feat_sigma=0.5, seed=3)
    assert pe.freqs.shape == (3 * D // 2, 3) and pe.out_dim == 3 * D
    # frequencies ~ N(0, 0.5^2) * D/2: their std is ~D/4
    assert 0.6 * D / 4 < pe.freqs.std().item() < 1.4 * D / 4
    coords = torch.rand(5, 7, 3) - 0.5
    out = pe(coords)
    assert out.shape == (5, 7, 3 * D)
    phase = torch.einsum("bpc,fc->bpf", coords, pe.freqs)
    torch.testing.assert_close(out, torch.cat([phase.sin(), phase.cos()], -1))
    # the same seed gives the same buffer
    torch.testing.assert_close(PositionalEncoding("gaussian", D // 2, D, 0.5, seed=3).freqs, pe.freqs)


@pytest.mark.parametrize(
    "pe_type, lo, hi",
    [
        ("geom_ft", 2 * math.pi, math.pi * D),
        ("geom_full", math.pi, math.pi * D),
        ("geom_lowf", 2 * math.pi, math.pi * D / 2),
        ("geom_nohighf", math.pi, math.pi * D / 2),
        ("linear_lowf", math.pi * D / (2 * 8), math.pi * D / 2),
    ],
)
def test_geometric_pe_ladders(pe_type, lo, hi):
    w = geometric_frequencies(pe_type, 8, D)
    assert w.shape == (8,)
    assert w[0].item() == pytest.approx(lo, rel=1e-6) and w[-1].item() == pytest.approx(hi, rel=1e-6)
    ratios = w[1:] / w[:-1]
    diffs = w[1:] - w[:-1]
    if pe_type.startswith("geom"):
        torch.testing.assert_close(ratios, ratios[:1].expand_as(ratios))
    else:
        torch.testing.assert_close(diffs, diffs[:1].expand_as(diffs))
    pe = PositionalEncoding(pe_type, 8, D)
    coords = torch.tensor([[0.1, -0.2, 0.3]])
    out = pe(coords)
    assert out.shape == (1, 48)
    # feature (c, i) = sin(w_i k_c) then cos, c-major
    assert out[0, 1 * 8 + 3].item() == pytest.approx(math.sin(w[3].item() * -0.2), abs=1e-6)
    assert out[0, 24 + 2 * 8 + 5].item() == pytest.approx(math.cos(w[5].item() * 0.3), abs=1e-6)


def test_canonicalize_maps_k_and_minus_k_to_one_point():
    k = torch.randn(500, 3)
    k[:50, 2] = 0  # ties on the k_z = 0 plane
    k[:10, 1] = 0
    a, fa = canonicalize(k)
    b, fb = canonicalize(-k)
    torch.testing.assert_close(a, b)
    assert torch.all(fa != fb)
    assert torch.all(a[:, 2] <= 0)


def test_fourier_decoder_is_hermitian():
    model = tiny()
    k = torch.rand(1, 100, 3) - 0.5
    z = torch.randn(1, 3)
    re1, im1 = model.decoder.fourier(k, z)
    re2, im2 = model.decoder.fourier(-k, z)
    torch.testing.assert_close(re1, re2)
    torch.testing.assert_close(im1, -im2)


@pytest.mark.parametrize("domain", ["fourier", "hartley"])
def test_slices_match_decoding_every_masked_point(domain):
    """The half + conjugate-fill evaluation equals decoding each masked lattice point directly."""
    model = tiny(domain=domain)
    lat = Lattice(D)
    rots = random_rotations(3)
    z = torch.randn(3, 3)
    slices = model.decoder.slices(lat, rots, z)
    assert slices.shape == (3, lat.n_masked)
    coords = lat.coords[lat.mask_indices] @ rots
    direct = model.decoder.hartley(coords, z)
    torch.testing.assert_close(slices, direct, rtol=1e-5, atol=1e-6)


def test_slices_shapes_and_reparameterisation():
    model = tiny()
    lat = model.lattice
    y = torch.randn(4, lat.n_masked)
    rots = random_rotations(4)
    pred, mu, logvar = model.slices(rots, y, sample=False)
    assert pred.shape == (4, lat.n_masked) and mu.shape == (4, 3) and logvar.shape == (4, 3)
    pred_mu = model.decoder.slices(lat, rots, mu)
    torch.testing.assert_close(pred, pred_mu)
    torch.manual_seed(0)
    pred_s, _, _ = model.slices(rots, y, sample=True)
    assert not torch.allclose(pred_s, pred)


def test_forward_is_the_training_loss_of_the_slices():
    """forward (the training path) = slice_mse of slices(), with the same latent draw."""
    from distdrgn.objective import slice_mse

    model = tiny()
    n = model.lattice.n_masked
    gen = torch.Generator().manual_seed(4)
    y_enc, y, ctf = (torch.randn(3, n, generator=gen) for _ in range(3))
    rots = random_rotations(3)
    for sample in (False, True):
        torch.manual_seed(1)
        mse, mu, logvar = model(rots, y_enc, sample=sample, y=y, ctf=ctf)
        torch.manual_seed(1)
        pred, mu2, _ = model.slices(rots, y_enc, sample=sample)
        assert mse.shape == (3,) and mse.dtype == torch.float32
        torch.testing.assert_close(mse, slice_mse(pred, y, ctf))
        torch.testing.assert_close(mu, mu2)
    with pytest.raises(TypeError):
        model(rots, y_enc)  # the observations are required: forward is the training path


def test_slice_coordinates_are_float32_under_bf16_autocast():
    """The pose rotation and the positional-encoding phases run in float32 inside the step's
    bf16 autocast: the coordinates reaching the encoding are within float32 rounding of the
    float64 rotation (bf16 would be off by ~1e-3 at |k| = 0.5)."""
    model = tiny(dec_dim=16)
    rots = random_rotations(5, seed=3)
    seen = []
    model.decoder.pe.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(rots, torch.randn(5, model.lattice.n_masked), sample=False, y=torch.zeros(5, model.lattice.n_masked))
    (coords,) = seen
    exact = model.slice_coords[: model.lattice.n_half].double() @ rots.double()
    exact = canonicalize(exact)[0]
    assert coords.dtype == torch.float32
    assert float((coords.double() - exact).abs().max()) < 1e-6
    # and the phases: float32 sin/cos of k @ F^T, not bf16
    feats = model.decoder.pe(coords)
    phase = coords.double() @ model.decoder.pe.freqs.double().T
    assert feats.dtype == torch.float32
    assert float((feats.double() - torch.cat([phase.sin(), phase.cos()], -1)).abs().max()) < 1e-4


def test_rotate_coords_keeps_float32_and_float64():
    from distdrgn.lattice import rotate_coords

    k = torch.rand(7, 3) - 0.5
    rots = random_rotations(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rotate_coords(k, rots).dtype == torch.float32
        assert rotate_coords(k, rots.double()).dtype == torch.float64
    err = (rotate_coords(k, rots).double() - k.double() @ rots.double()).abs().max()
    assert float(err) < 1e-6
    # what the fix prevents: the bf16 product's error is three orders of magnitude larger
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = k @ rots
    assert float((rounded.double() - k.double() @ rots.double()).abs().max()) > 1e-4


def test_compiled_decoder_matches_the_reference():
    """model.kernels=compile (torch.compile, inductor's CPU backend here): forward and every
    gradient equal the eager reference's to float32 rounding."""
    from distdrgn.kernels.check import mse_and_grads, random_inputs, relative_error

    model = build_model(ModelConfig(zdim=2, enc_dim=16, enc_layers=1, dec_dim=16, dec_layers=1), 8, seed=0)
    inputs = random_inputs(model, 2, seed=5)
    ref_mse, ref = mse_and_grads(model, inputs, "torch")
    mse, grads = mse_and_grads(model, inputs, "compile")
    torch.testing.assert_close(mse, ref_mse, rtol=1e-5, atol=1e-7)
    assert grads.keys() == ref.keys()
    for name in ref:
        assert relative_error(grads[name], ref[name]) < 1e-5, name


def test_layer_structure_is_cryodrgns():
    """Decoder: in -> H, L x H -> H (residual), H -> 2, as cryoDRGN's --dec-layers L builds it."""
    H, L = 24, 3
    model = tiny()
    mlp = model.decoder.mlp
    assert mlp.inp.in_features == 3 * D + 3 and mlp.inp.out_features == H
    assert len(mlp.hidden) == L and mlp.out.out_features == 2
    assert len(model.encoder.mlp.hidden) == 2
    assert tiny(domain="hartley").decoder.mlp.out.out_features == 1
    assert model.encoder.mlp.inp.in_features == model.lattice.n_masked
    assert model.encoder.mlp.out.out_features == 6


def cryodrgn_parameter_count(n_enc_in: int, pe_in: int, zdim: int, H: int, L: int) -> int:
    """cryoDRGN 4.3.1's train_vae network: encoder main = Linear(n_enc_in, H), L ResidLinear(H, H),
    Linear(H, 2 zdim); decoder main = Linear(pe_in + zdim, H), L ResidLinear(H, H), Linear(H, 2)."""
    hidden = L * (H * H + H)
    encoder = n_enc_in * H + H + hidden + H * 2 * zdim + 2 * zdim
    decoder = (pe_in + zdim) * H + H + hidden + H * 2 + 2
    return encoder + decoder


@pytest.mark.parametrize("box, zdim", [(64, 8), (128, 8), (32, 4)])
def test_default_network_has_cryodrgns_parameter_count(box, zdim):
    """configs' defaults (1024 x 3) = cryoDRGN's defaults; the encoder sees the circular enc_mask (D//2)."""
    model = build_model(ModelConfig(zdim=zdim), box, seed=0)
    n_enc_in = model.lattice.n_masked  # cryoDRGN: enc_mask = D // 2 disk of the (D+1)^2 lattice
    expected = cryodrgn_parameter_count(n_enc_in, 6 * (box // 2), zdim, 1024, 3)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "cryodrgn_runs").is_dir(),
                    reason="cryoDRGN run fixtures not found")
def test_layer_shapes_equal_a_real_cryodrgn_run():
    """../shared/fixtures/cryodrgn_runs/vae: --enc-layers 2 --dec-layers 2, 32 wide, zdim 2, box 64."""
    from fixture_files import CRYODRGN_RUNS

    ckpt = torch.load(CRYODRGN_RUNS / "vae" / "weights.pkl", map_location="cpu", weights_only=False)
    theirs = sorted(tuple(v.shape) for k, v in ckpt["model_state_dict"].items() if k != "decoder.rand_freqs")
    model = build_model(ModelConfig(zdim=2, enc_dim=32, enc_layers=2, dec_dim=32, dec_layers=2), 64, seed=0)
    ours = sorted(tuple(p.shape) for p in model.parameters())
    assert ours == theirs


def test_runs_of_distdrgn_0_1_keep_their_layer_count():
    """A checkpoint without layer_convention was written when L counted the input layer."""
    info = ModelInfo.from_config(ModelConfig(zdim=2, enc_dim=8, enc_layers=3, dec_dim=8, dec_layers=3), 16, 0)
    old = ModelInfo(**{k: v for k, v in info.__dict__.items() if k != "layer_convention"})
    assert old.layer_convention == "distdrgn-0.1"
    assert len(CryoDRGN(old).decoder.mlp.hidden) == 2 and len(CryoDRGN(info).decoder.mlp.hidden) == 3


def test_homogeneous_model_has_no_encoder():
    model = tiny(zdim=0)
    assert model.encoder is None
    pred, mu, logvar = model.slices(random_rotations(2))
    assert pred.shape == (2, model.lattice.n_masked) and mu is None and logvar is None
    assert model.decoder.mlp.inp.in_features == 3 * D


def test_same_seed_same_model_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = tiny(), tiny()
    assert torch.equal(torch.get_rng_state(), before)
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), na
    info = ModelInfo.from_config(ModelConfig(), 64, 0)
    assert info.pe_dim == 32 and info.enc_dim == 1024 and info.dec_layers == 3
