import numpy as np
import pytest
import torch

from distdrgn.config import ModelConfig
from distdrgn.errors import DistdrgnError
from distdrgn.lattice import Lattice
from distdrgn.model import build_model
from distdrgn.objective import (
    Batch,
    Preprocess,
    hartley_std,
    kl_divergence,
    masked_hartley,
    parse_beta,
    prepare_targets,
    vae_loss,
)

D = 16


def numpy_masked_hartley(img: np.ndarray, invert: bool, window: np.ndarray | None, std: float) -> np.ndarray:
    x = -img if invert else img.copy()
    if window is not None:
        x = x * window
    f = np.fft.fftshift(np.fft.fft2(np.fft.fftshift(x)))
    h = f.real - f.imag
    h = np.concatenate([h, h[:1]], 0)
    h = np.concatenate([h, h[:, :1]], 1)
    return h.ravel()[Lattice(D).mask_indices.numpy()] / std


def numpy_window(D, r_in=0.85, r_out=0.99):
    x = np.arange(D) * 2.0 / D - 1
    r = np.sqrt(x[None] ** 2 + x[:, None] ** 2)
    return np.clip(1 - (r - r_in) / (r_out - r_in), 0, 1)


def test_masked_hartley_matches_numpy():
    rng = np.random.default_rng(0)
    imgs = rng.normal(size=(3, D, D))
    lat = Lattice(D)
    for invert, window in [(True, True), (False, False)]:
        prep = Preprocess(D, invert=invert, window=window, ht_std=7.5)
        got = masked_hartley(torch.from_numpy(imgs), prep, lat).numpy()
        for i in range(3):
            want = numpy_masked_hartley(imgs[i], invert, numpy_window(D) if window else None, 7.5)
            np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-6)  # the window is float32


def test_translation_recentres_a_shifted_image():
    """prepare_targets with trans t equals the Hartley image of the image moved by t*D pixels."""
    rng = np.random.default_rng(1)
    img = torch.from_numpy(rng.normal(size=(1, D, D)))
    lat = Lattice(D)
    prep = Preprocess(D, invert=False, window=False)
    shift_px = (3, -2)  # (x, y) pixels
    trans = torch.tensor([[shift_px[0] / D, shift_px[1] / D]], dtype=torch.float64)
    batch = Batch(torch.zeros(1, dtype=torch.int64), img, torch.eye(3)[None].double(), trans, None)
    got = prepare_targets(batch, prep, lat).y
    moved = torch.roll(img, shifts=(shift_px[1], shift_px[0]), dims=(1, 2))  # rows = y, columns = x
    want = masked_hartley(moved, prep, lat)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def numpy_ctf(freqs_px, row, D):
    D0, apix0, dfu, dfv, dfang, kv, cs, w, ps = row
    apix = apix0 * D0 / D
    s = freqs_px / apix
    volt = kv * 1e3
    lam = 12.2639 / np.sqrt(volt + 0.97845e-6 * volt**2)
    a = np.arctan2(s[:, 1], s[:, 0])
    s2 = (s**2).sum(1)
    df = 0.5 * (dfu + dfv + (dfu - dfv) * np.cos(2 * (a - np.deg2rad(dfang))))
    gamma = 2 * np.pi * (-0.5 * df * lam * s2 + 0.25 * cs * 1e7 * lam**3 * s2**2) - np.deg2rad(ps)
    return np.sqrt(1 - w * w) * np.sin(gamma) - w * np.cos(gamma)


def test_ctf_and_encoder_sign_flip_match_direct_formula():
    rng = np.random.default_rng(2)
    lat = Lattice(D)
    ctf_rows = np.array(
        [[64, 1.1, 15000, 14000, 30.0, 300, 2.7, 0.1, 0.0], [64, 1.1, 25000, 26000, -70.0, 200, 2.0, 0.07, 20.0]]
    )
    imgs = torch.from_numpy(rng.normal(size=(2, D, D)))
    batch = Batch(torch.arange(2), imgs, torch.eye(3).expand(2, 3, 3).double(), None, torch.from_numpy(ctf_rows))
    t = prepare_targets(batch, Preprocess(D), lat)
    freqs = lat.masked_freqs.double().numpy()
    for i in range(2):
        want = numpy_ctf(freqs, ctf_rows[i], D)
        np.testing.assert_allclose(t.ctf[i].numpy(), want, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(t.y_enc.numpy(), (t.y * torch.sign(t.ctf)).numpy())


def test_kl_matches_closed_form():
    mu = torch.randn(5, 3, dtype=torch.float64)
    logvar = torch.randn(5, 3, dtype=torch.float64)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    want = torch.distributions.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(kl_divergence(mu, logvar), want)


def test_loss_terms_and_global_batch_weighting():
    """Per-rank losses weighted by W / B_global, averaged like DDP, equal the global mean."""
    torch.manual_seed(0)
    P = 40
    pred = torch.randn(7, P, dtype=torch.float64, requires_grad=True)
    y = torch.randn(7, P, dtype=torch.float64)
    ctf = torch.randn(7, P, dtype=torch.float64)
    mu, logvar = torch.randn(7, 2, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)

    class T:
        pass

    def targets(sl):
        t = T()
        t.y, t.ctf = y[sl], ctf[sl]
        return t

    beta = 0.3
    full = vae_loss(pred, targets(slice(None)), mu, logvar, beta, weight=1 / 7)
    mse = ((ctf * pred - y) ** 2).mean(-1)
    want = (mse + beta * kl_divergence(mu, logvar) / P).mean()
    torch.testing.assert_close(full.loss, want)
    g_full = torch.autograd.grad(full.loss, pred)[0]
    # two "ranks" with 4 and 3 images; DDP averages their gradients over W = 2
    g = torch.zeros_like(pred)
    for sl in (slice(0, 4), slice(4, 7)):
        part = vae_loss(pred[sl], targets(sl), mu[sl], logvar[sl], beta, weight=2 / 7)
        g += torch.autograd.grad(part.loss, pred)[0] / 2
    torch.testing.assert_close(g, g_full)


def test_gradcheck_decoder_and_objective_float64():
    lat = Lattice(8)
    model = build_model(ModelConfig(zdim=2, enc_dim=6, enc_layers=1, dec_dim=6, dec_layers=2), 8, seed=0).double()
    rng = np.random.default_rng(3)
    imgs = torch.from_numpy(rng.normal(size=(2, 8, 8)))
    rots = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    ctf_rows = torch.tensor([[8, 2.0, 10000, 9000, 10, 300, 2.7, 0.1, 0]] * 2, dtype=torch.float64)
    batch = Batch(torch.arange(2), imgs, rots, torch.tensor([[0.05, -0.1], [0.0, 0.1]], dtype=torch.float64), ctf_rows)
    targets = prepare_targets(batch, Preprocess(8, ht_std=3.0), lat)

    class SliceLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, z):
            pred = self.model.decoder.slices(lat, rots, z)
            return vae_loss(pred, targets, z, torch.zeros_like(z), 0.5, weight=0.5).loss

    wrapper = SliceLoss()

    def f(z, w_out, b_in):
        params = {"model.decoder.mlp.out.weight": w_out, "model.decoder.mlp.inp.bias": b_in}
        return torch.func.functional_call(wrapper, params, (z,))

    z = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    w_out = model.decoder.mlp.out.weight.detach().clone().requires_grad_(True)
    b_in = model.decoder.mlp.inp.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (z, w_out, b_in), eps=1e-6, atol=1e-5)


def test_hartley_std_of_white_noise():
    """Unwindowed white noise of variance s^2 has Hartley variance D^2 s^2."""
    rng = np.random.default_rng(4)
    imgs = torch.from_numpy(rng.normal(scale=2.0, size=(200, D, D)))
    std = hartley_std(imgs, Preprocess(D, window=False))
    assert std == pytest.approx(2.0 * D, rel=0.03)


def test_beta_schedules():
    assert parse_beta(None, 4)(3.0) == 0.25
    assert parse_beta(None, 0)(0.0) == 0.0
    assert parse_beta(0.1, 8)(5.0) == 0.1
    assert parse_beta("0.2", 8)(5.0) == 0.2
    lin = parse_beta("linear:0.0:1.0:4", 8)
    assert [lin(e) for e in (0, 2, 4, 10)] == [0.0, 0.5, 1.0, 1.0]
    for bad in ("cyclic:1", "linear:a:1:2", "linear:0:1:0"):
        with pytest.raises(DistdrgnError, match="train.beta"):
            parse_beta(bad, 8)
