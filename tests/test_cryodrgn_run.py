"""eval-vol of cryoDRGN 4.3.1 run directories reproduces cryoDRGN's own volumes.

Uses the real runs in ../shared/fixtures/cryodrgn_runs (see its README.md); the particle and
pose files their config.yaml names do not exist, as on a user's other machine.
"""

import shutil

import numpy as np
import pytest
import torch
import yaml

from distdrgn import cli
from distdrgn.cryodrgn_run import load_cryodrgn_run, postprocess_volume, trajectory
from distdrgn.errors import DistdrgnError
from fixture_files import CRYODRGN_RUNS, read_mrc_data

needs_runs = pytest.mark.skipif(not CRYODRGN_RUNS.is_dir(), reason=f"cryoDRGN run fixtures not found at {CRYODRGN_RUNS}")


def rel_err(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A copy of the fixture runs (so nothing can write next to the originals)."""
    if not CRYODRGN_RUNS.is_dir():
        pytest.skip(f"cryoDRGN run fixtures not found at {CRYODRGN_RUNS}")
    dst = tmp_path_factory.mktemp("cryodrgn") / "runs"
    shutil.copytree(CRYODRGN_RUNS, dst)
    for sub in ("vae", "nn"):  # the data files the configs name are absent
        cfg = yaml.safe_load((dst / sub / "config.yaml").read_text())
        assert not (dst / sub / cfg["dataset_args"]["particles"]).exists()
    return dst


@needs_runs
def test_eval_vol_vae_final_z(runs, tmp_path):
    out = tmp_path / "v"
    assert cli.main(["eval-vol", str(runs / "vae"), "-z", "0.5", "-0.3", "-o", str(out), "--device", "cpu"]) == 0
    got = read_mrc_data(out / "vol_000.mrc")
    want = read_mrc_data(runs / "eval_vol" / "vae_final_z_0.5_-0.3.mrc")
    assert got.shape == want.shape == (64, 64, 64)
    assert rel_err(got, want) < 1e-4


@needs_runs
def test_eval_vol_vae_epoch1_trajectory(runs, tmp_path):
    out = tmp_path / "traj"
    assert cli.main(["eval-vol", str(runs / "vae"), "--epoch", "1", "--z-start", "-1", "0", "--z-end", "1", "0",
                     "-n", "3", "-o", str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["vol_001.mrc", "vol_002.mrc", "vol_003.mrc"]
    for i in (1, 2, 3):
        want = read_mrc_data(runs / "eval_vol" / "vae_epoch1_traj" / f"vol_00{i}.mrc")
        assert rel_err(read_mrc_data(out / f"vol_00{i}.mrc"), want) < 1e-4


@needs_runs
def test_eval_vol_homogeneous_nn(runs, tmp_path):
    out = tmp_path / "nn"
    # a weights file with an explicit cryoDRGN config, as cryoDRGN's eval_vol takes them
    assert cli.main(["eval-vol", str(runs / "nn" / "weights.pkl"), "-c", str(runs / "nn" / "config.yaml"),
                     "-o", str(out), "--prefix", "rec_", "--device", "cpu"]) == 0
    got = read_mrc_data(out / "rec_000.mrc")
    assert rel_err(got, read_mrc_data(runs / "nn" / "reconstruct.mrc")) < 1e-4


@needs_runs
def test_loaded_model_shape_and_encoder(runs):
    tm = load_cryodrgn_run(runs / "vae", need_encoder=True)
    info = tm.model.info
    assert (info.D, info.zdim, info.enc_layers, info.dec_layers, info.layer_convention) == (64, 2, 2, 2, "cryodrgn")
    assert tm.epoch == 2 and tm.model.encoder is not None
    assert tm.prep.ht_std == pytest.approx(94.45951080322266)
    sd = torch.load(runs / "vae" / "weights.pkl", map_location="cpu", weights_only=False)["model_state_dict"]
    torch.testing.assert_close(tm.model.decoder.pe.freqs, sd["decoder.rand_freqs"] * 32)
    # encoder columns are a permutation of cryoDRGN's
    a = tm.model.encoder.mlp.inp.weight.sort(1).values
    torch.testing.assert_close(a, sd["encoder.main.0.weight"].sort(1).values)
    assert load_cryodrgn_run(runs / "nn").zdim == 0


def _edit_config(runs, tmp_path, sub, **model_args):
    d = tmp_path / sub
    shutil.copytree(runs / sub, d)
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["model_args"].update(model_args)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    return d


@needs_runs
@pytest.mark.parametrize("change, word", [({"pe_type": "none"}, "pe_type"), ({"activation": "leaky_relu"}, "activation")])
def test_unsupported_variants_fail_in_one_line(runs, tmp_path, change, word):
    d = _edit_config(runs, tmp_path, "nn", **change)
    with pytest.raises(DistdrgnError, match=word) as exc:
        load_cryodrgn_run(d)
    assert "\n" not in str(exc.value)


@needs_runs
def test_other_enc_mask_loads_without_encoder(runs, tmp_path):
    d = _edit_config(runs, tmp_path, "vae", enc_mask=16)
    with pytest.raises(DistdrgnError, match="enc_mask"):
        load_cryodrgn_run(d, need_encoder=True)
    assert load_cryodrgn_run(d).model.encoder is None


@needs_runs
def test_geometric_encoding_matches_cryodrgn_feature_order(runs, tmp_path):
    """geom_ft weights: distdrgn's decoder equals cryoDRGN's (c, sin/cos, i) feature layout."""
    d = _edit_config(runs, tmp_path, "nn", pe_type="geom_ft", pe_dim=4)
    g = torch.Generator().manual_seed(0)
    sd = {"decoder.main.0.weight": torch.randn(32, 24, generator=g), "decoder.main.0.bias": torch.randn(32, generator=g)}
    for j in (2, 4):
        sd[f"decoder.main.{j}.linear.weight"] = torch.randn(32, 32, generator=g) / 8
        sd[f"decoder.main.{j}.linear.bias"] = torch.randn(32, generator=g)
    sd["decoder.main.6.weight"], sd["decoder.main.6.bias"] = torch.randn(2, 32, generator=g), torch.randn(2, generator=g)
    torch.save({"epoch": 1, "model_state_dict": sd}, d / "weights.pkl")
    tm = load_cryodrgn_run(d)
    pts = (torch.rand(50, 3, generator=g) - 0.5) * 0.5
    pts[:, 2] = -pts[:, 2].abs()  # the canonical half: no conjugation
    # cryoDRGN's layout written out: freqs 64 pi (2/64)^(i/3), features per coordinate [sin(i..), cos(i..)]
    w = 64 * np.pi * (2.0 / 64) ** (torch.arange(4, dtype=torch.float) / 3)
    k = pts[:, :, None] * w  # (P, 3, 4)
    feats = torch.cat([torch.sin(k), torch.cos(k)], -1).reshape(50, 24)
    h = torch.relu(feats @ sd["decoder.main.0.weight"].T + sd["decoder.main.0.bias"])
    for j in (2, 4):
        h = torch.relu(h + h @ sd[f"decoder.main.{j}.linear.weight"].T + sd[f"decoder.main.{j}.linear.bias"])
    out = h @ sd["decoder.main.6.weight"].T + sd["decoder.main.6.bias"]
    with torch.no_grad():
        real, imag = tm.model.decoder.fourier(pts[None], None)
    torch.testing.assert_close(torch.stack([real[0], imag[0]], -1), out, rtol=1e-4, atol=1e-4)


def test_trajectory_is_evenly_spaced_inclusive():
    z = trajectory([-1, 0], [1, 2], 5)
    assert z.dtype == np.float32 and z.shape == (5, 2)
    np.testing.assert_allclose(z, np.stack([np.linspace(-1, 1, 5), np.linspace(0, 2, 5)], 1), atol=1e-6)
    with pytest.raises(DistdrgnError):
        trajectory([0], [1], 1)


def test_postprocess_flip_invert_crop_low_pass():
    rng = np.random.default_rng(0)
    vol = rng.standard_normal((16, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(postprocess_volume(vol, flip=True, invert=True), -vol[::-1])
    np.testing.assert_array_equal(postprocess_volume(vol, crop=8), vol[4:12, 4:12, 4:12])
    # a cutoff beyond the corner of the lattice keeps everything
    np.testing.assert_allclose(postprocess_volume(vol, low_pass=0.5, apix=1.0), vol, atol=1e-5)
    lp = postprocess_volume(vol, low_pass=4.0, apix=1.0)
    assert np.linalg.norm(lp) < 0.5 * np.linalg.norm(vol)
    with pytest.raises(DistdrgnError):
        postprocess_volume(vol, crop=7)


@needs_runs
@pytest.mark.parametrize("epoch, zname", [(None, "z.pkl"), (1, "z.1.pkl")])
def test_encoder_reproduces_cryodrgn_z(runs, epoch, zname):
    """The mapped encoder (columns permuted to distdrgn's [half, mirror] order) gives cryoDRGN's z.

    cryoDRGN 4.3.1 shifts the images by trans * (box + 1) pixels (its PoseTracker scales the
    pose file's fractional shifts by the lattice size D = box + 1), so that is used here.
    """
    import mrcfile

    from distdrgn.checkpoint import load_z
    from distdrgn.formats.poses import load_poses
    from distdrgn.lattice import translate_ht
    from distdrgn.objective import masked_hartley
    from fixture_files import FIXTURES

    tm = load_cryodrgn_run(runs / "vae", epoch=epoch, need_encoder=True)
    with mrcfile.open(FIXTURES / "hand.mrcs", permissive=True) as m:
        imgs = torch.tensor(np.array(m.data, dtype=np.float32))
    _, trans = load_poses(FIXTURES / "hand_rot_trans.pkl")
    lat = tm.model.lattice
    y = translate_ht(masked_hartley(imgs, tm.prep, lat), lat.masked_freqs, torch.tensor(trans) * (tm.D + 1))
    with torch.no_grad():
        mu, logvar = tm.model.encode(y)
    z_mu, z_logvar = load_z(runs / "vae" / zname)
    assert rel_err(mu.numpy(), z_mu) < 1e-5 and rel_err(logvar.numpy(), z_logvar) < 1e-5


@needs_runs
def test_hartley_domain_is_evaluated_on_the_whole_grid(runs, tmp_path):
    """A hartley-domain (PositionalDecoder) run: cryoDRGN evaluates every grid point, no sphere."""
    from distdrgn.fft import iht3_center
    from distdrgn.volumes import eval_volume

    d = _edit_config(runs, tmp_path, "nn", domain="hartley", pe_dim=2)
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["lattice_args"]["D"] = 9  # box 8
    cfg["dataset_args"]["norm"] = [0.25, 3.0]
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    g = torch.Generator().manual_seed(1)
    sd = {"rand_freqs": torch.randn(6, 3, generator=g) * 0.5,
          "decoder.main.0.weight": torch.randn(32, 12, generator=g), "decoder.main.0.bias": torch.randn(32, generator=g)}
    for j in (2, 4):
        sd[f"decoder.main.{j}.linear.weight"] = torch.randn(32, 32, generator=g) / 8
        sd[f"decoder.main.{j}.linear.bias"] = torch.randn(32, generator=g)
    sd["decoder.main.6.weight"], sd["decoder.main.6.bias"] = torch.randn(1, 32, generator=g), torch.randn(1, generator=g)
    torch.save({"epoch": 3, "model_state_dict": sd}, d / "weights.pkl")
    tm = load_cryodrgn_run(d)
    assert tm.D == 8 and tm.epoch == 3
    k = (torch.arange(9, dtype=torch.float64) - 4) / 8
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    pts = torch.stack([kx, ky, kz], -1).reshape(-1, 3)
    ph = pts @ (sd["rand_freqs"].double() * 4).T
    h = torch.relu(torch.cat([ph.sin(), ph.cos()], -1) @ sd["decoder.main.0.weight"].double().T + sd["decoder.main.0.bias"].double())
    for j in (2, 4):
        h = torch.relu(h + h @ sd[f"decoder.main.{j}.linear.weight"].double().T + sd[f"decoder.main.{j}.linear.bias"].double())
    vals = (h @ sd["decoder.main.6.weight"].double().T + sd["decoder.main.6.bias"].double()).reshape(9, 9, 9)
    want = iht3_center((vals * 3.0 + 0.25)[:-1, :-1, :-1]).numpy()
    assert rel_err(eval_volume(tm), want) < 1e-5


@needs_runs
def test_train_load_starts_from_a_cryodrgn_runs_weights(tmp_path):
    """train.load=vae/weights.pkl (cryoDRGN --load): training starts from cryoDRGN's parameters."""
    from distdrgn.config import load_config
    from distdrgn.store.writer import ingest
    from distdrgn.train import train
    from distdrgn.volumes import load_model

    formats = CRYODRGN_RUNS.parent / "formats"
    store = ingest(formats / "hand.mrcs", tmp_path / "hand.zarr", poses=formats / "hand_rot_trans.pkl", progress=False)
    run = tmp_path / "run"
    train(load_config(None, [f"data.store={store}", f"output.dir={run}", "model.zdim=2", "model.enc_dim=32",
                             "model.enc_layers=2", "model.dec_dim=32", "model.dec_layers=2", "train.epochs=1",
                             "train.batch_size=50", "train.lr=1e-12", "train.device=cpu", "train.analyze=false",
                             f"train.load={CRYODRGN_RUNS / 'vae' / 'weights.pkl'}"]))
    theirs = load_cryodrgn_run(CRYODRGN_RUNS / "vae", need_encoder=True).model.state_dict()
    ours = load_model(run).model.state_dict()
    assert ours.keys() == theirs.keys()
    for k in theirs:  # two Adam steps of lr 1e-12 move nothing measurable
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-9, msg=k)


@needs_runs
def test_analysis_commands_accept_a_cryodrgn_run_directory(tmp_path):
    """analyze RUN EPOCH (positional, as cryoDRGN), pc-traversal and select on cryoDRGN's vae/."""
    run = CRYODRGN_RUNS / "vae"
    assert cli.main(["analyze", str(run), "1", "--ksample", "2", "--pc", "1", "--no-umap",
                     "--traversal-points", "3", "-o", str(tmp_path / "ana")]) == 0
    assert (tmp_path / "ana" / "report.html").is_file() and (tmp_path / "ana" / "kmeans2" / "vol_001.mrc").is_file()
    assert cli.main(["pc-traversal", str(run), "-o", str(tmp_path / "pc")]) == 0
    assert cli.main(["select", str(run), "--random", "10", "-o", str(tmp_path / "ind.pkl")]) == 0
    assert len(np.load(tmp_path / "ind.pkl", allow_pickle=True)) == 10


@needs_runs
def test_encode_a_store_with_a_cryodrgn_run(runs, tmp_path):
    """`distdrgn encode` of cryoDRGN's vae/ over a store of the run's own particles: exactly the
    mapped encoder on the images shifted by fraction x box (distdrgn's shift), and within the
    translation-scale difference of cryoDRGN's z.pkl (its shift is fraction x (box + 1))."""
    from distdrgn.checkpoint import load_z
    from distdrgn.formats.poses import load_poses
    from distdrgn.lattice import translate_ht
    from distdrgn.objective import masked_hartley
    from distdrgn.store import ParticleStore, ingest
    from fixture_files import FIXTURES

    store = ingest(FIXTURES / "hand.mrcs", tmp_path / "hand.zarr", poses=FIXTURES / "hand_rot_trans.pkl",
                   progress=False)
    assert cli.main(["encode", str(runs / "vae"), str(store), "-o", str(tmp_path / "z.pkl"), "--device", "cpu"]) == 0
    mu, logvar = load_z(tmp_path / "z.pkl")
    tm = load_cryodrgn_run(runs / "vae", need_encoder=True)
    imgs = torch.from_numpy(ParticleStore.open(store).images(np.arange(100)).astype(np.float32))
    _, trans = load_poses(FIXTURES / "hand_rot_trans.pkl")
    lat = tm.model.lattice
    y = translate_ht(masked_hartley(imgs, tm.prep, lat), lat.masked_freqs, torch.tensor(trans) * tm.D)
    with torch.no_grad():
        want_mu, want_logvar = tm.model.encode(y)
    assert rel_err(mu, want_mu.numpy()) < 1e-5 and rel_err(logvar, want_logvar.numpy()) < 1e-5
    theirs, _ = load_z(runs / "vae" / "z.pkl")
    assert rel_err(mu, theirs) < 0.01  # 0.40% measured: the (box + 1) / box shift of cryoDRGN
