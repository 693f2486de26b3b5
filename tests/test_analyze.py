"""End-to-end ``distdrgn analyze`` on a tiny run directory built from a real (untrained) model."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from distdrgn import cli
from distdrgn.analysis.analyze import analyze, resolve_epoch
from distdrgn.analysis.report import Figure, Section, Table, render_report
from distdrgn.checkpoint import save_weights, save_z
from distdrgn.config import Config, dump_config
from distdrgn.errors import DistdrgnError
from distdrgn.model import build_model
from distdrgn.objective import Preprocess

D = 16
APIX = 3.5
REPO = Path(__file__).resolve().parents[1]


def make_run(run_dir: Path, zdim: int = 3, n: int = 400, epochs: int = 2, seed: int = 0) -> Path:
    """A run directory as training writes it: config.yaml, weights.N.pkl/z.N.pkl, finals, loss.csv."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = Config()
    cfg.model.zdim = zdim
    cfg.model.enc_dim = cfg.model.dec_dim = 16
    cfg.model.enc_layers = cfg.model.dec_layers = 2
    cfg.output.dir = str(run_dir)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    model = build_model(cfg.model, D, seed)
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, max(zdim, 1))) * 3
    for epoch in range(1, epochs + 1):  # numbered from 1, as training numbers them
        payload = {
            "epoch": epoch,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": {},
            "scaler_state_dict": {},
            "model_info": dataclasses.asdict(model.info),
            "preprocess": dataclasses.asdict(Preprocess(D=D)),
            "config": cfg.to_dict(),
            "store": {"path": "none", "n": n, "D": D, "apix": APIX},
        }
        save_weights(run_dir / f"weights.{epoch}.pkl", payload)
        if zdim:
            z = (centres[rng.integers(0, 4, n)] + 0.3 * rng.normal(size=(n, zdim))).astype(np.float32)
            save_z(run_dir / f"z.{epoch}.pkl", z, np.full_like(z, -2.0))
    save_weights(run_dir / "weights.pkl", payload)
    if zdim:
        save_z(run_dir / "z.pkl", z, np.full_like(z, -2.0))
    with open(run_dir / "loss.csv", "w") as f:
        f.write("epoch,loss,mse,kl,beta,images,seconds,images_per_second\n")
        for e in range(1, epochs + 1):
            f.write(f"{e},{1.0 / (e + 1)},{0.9 / (e + 1)},{0.1 * e},0.33,{n},1.5,{n / 1.5}\n")
    (run_dir / "run.log").write_text("synthetic run\n")
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "run")


def test_cli_analyze_writes_every_output(run_dir, tmp_path):
    out = tmp_path / "ana"
    # UMAP is checked in-process below (its numba compilation would dominate a subprocess)
    proc = subprocess.run(
        [sys.executable, "-m", "distdrgn.cli", "analyze", str(run_dir), "--ksample", "5", "--pc", "2",
         "--traversal-points", "4", "--no-umap", "-o", str(out), "--device", "cpu"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"report: {out / 'report.html'}" in proc.stdout

    z_final = pickle.load(open(run_dir / "z.pkl", "rb"))
    n, zdim = z_final.shape
    z_pca = np.load(out / "z_pca.npy")
    assert z_pca.shape == (n, zdim)
    info = json.loads((out / "pc_explained.json").read_text())
    assert len(info["explained_variance_ratio"]) == zdim
    assert abs(sum(info["explained_variance_ratio"]) - 1) < 1e-6

    kdir = out / "kmeans5"
    labels = pickle.load(open(kdir / "labels.pkl", "rb"))
    assert labels.shape == (n,) and set(np.unique(labels)) <= set(range(5))
    ind = np.loadtxt(kdir / "centers_ind.txt", dtype=int)
    centers = np.loadtxt(kdir / "centers.txt")
    assert ind.shape == (5,) and centers.shape == (5, zdim)
    np.testing.assert_allclose(centers, z_final[ind], atol=1e-5)  # on-data centres are real particles
    for i in range(5):
        with mrcfile.open(kdir / f"vol_{i:03d}.mrc") as mrc:
            assert mrc.data.shape == (D, D, D)
            assert np.isfinite(mrc.data).all()
            assert abs(float(mrc.voxel_size.x) - APIX) < 1e-4

    for pc in (1, 2):
        tdir = out / f"pc{pc}_traversal"
        zt = np.loadtxt(tdir / "z_values.txt")
        assert zt.shape == (4, zdim)
        assert sorted(p.name for p in tdir.glob("vol_*.mrc")) == [f"vol_{i:03d}.mrc" for i in range(4)]
    assert not (out / "pc3_traversal").exists()

    assert not (out / "umap.npy").exists()

    pngs = ["z_pca_density.png", "z_pca_kmeans.png", "pc_explained.png", "loss.png", "projections.png"]
    html = (out / "report.html").read_text()
    for name in pngs:
        assert any(out.rglob(name)), name
        assert f'data-file="{name}"' in html, name
    # the figures are embedded, not linked: every <img> is a data URI of a real PNG
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) >= len(pngs) and all(s.startswith("data:image/png;base64,iVBORw0KGgo") for s in srcs)
    assert "kmeans5/vol_004.mrc" in html and "pc2_traversal/vol_003.mrc" in html


def test_default_outdir_and_epoch_selection(run_dir, tmp_path):
    # final z.pkl by default; the checkpoint says it is epoch 2 -> analyze.2
    assert resolve_epoch(run_dir, None).z_path.name == "z.pkl"
    assert resolve_epoch(run_dir, -2).z_path.name == "z.1.pkl"
    report = analyze(run_dir, epoch=1, ksample=3, n_pcs=1, umap=True, umap_max_fit=200, umap_epochs=20,
                     traversal_points=3, device="cpu")
    out = run_dir / "analyze.1"
    assert report == out / "report.html" and report.is_file()
    assert (out / "kmeans3" / "vol_002.mrc").is_file()
    # UMAP fitted on 200 of the 400 particles, the rest transformed
    emb = np.load(out / "umap.npy")
    assert emb.shape == (400, 2) and np.isfinite(emb).all()
    html = report.read_text()
    assert "the other 200 placed with transform" in html
    for name in ("umap_density.png", "umap_kmeans.png"):
        assert (out / name).is_file() and f'data-file="{name}"' in html
    default = analyze(run_dir, ksample=2, n_pcs=0, umap=False, device="cpu")
    assert default == run_dir / "analyze.2" / "report.html"  # the final weights.pkl is epoch 2
    assert "UMAP disabled" in default.read_text()
    with pytest.raises(DistdrgnError, match="saved epochs: 1, 2"):
        resolve_epoch(run_dir, 7)


def test_latent_only_zdim1(tmp_path):
    run = make_run(tmp_path / "z1", zdim=1, n=120, epochs=1)
    report = analyze(run, ksample=4, n_pcs=3, volumes=False, out=tmp_path / "o")
    out = report.parent
    assert report.parent.name == "o"
    assert np.load(out / "z_pca.npy").shape == (120, 1)
    assert (out / "z_hist.png").is_file() and (out / "pc1_traversal" / "z_values.txt").is_file()
    assert not (out / "pc2_traversal").exists()  # only one PC exists
    assert not (out / "umap.npy").exists() and not list(out.rglob("*.mrc"))
    assert "UMAP skipped: zdim is 1" in report.read_text()


def test_homogeneous_run_is_a_one_line_error(tmp_path, capsys):
    run = make_run(tmp_path / "homo", zdim=0, epochs=1)
    assert cli.main(["analyze", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "zdim = 0" in err and "\n" not in err


def test_missing_run_dir_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["analyze", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_loss_plot_draws_only_loss_columns(run_dir, tmp_path, monkeypatch):
    from distdrgn.analysis import plots

    cols = plots.read_loss_csv(run_dir / "loss.csv")
    assert set(cols) == {"epoch", "loss", "mse", "kl", "beta", "images", "seconds", "images_per_second"}
    drawn = []
    real_subplots = plots.plt.subplots

    def spy(nrows, ncols, **kw):
        drawn.append(ncols)
        return real_subplots(nrows, ncols, **kw)

    monkeypatch.setattr(plots.plt, "subplots", spy)
    assert plots.plot_loss(run_dir / "loss.csv", tmp_path / "loss.png").is_file()
    assert drawn == [3]  # loss, mse, kl; not beta, images, seconds, images_per_second
    (tmp_path / "none.csv").write_text("epoch,images\n0,5\n")
    assert plots.plot_loss(tmp_path / "none.csv", tmp_path / "none.png") is None


def test_analyze_a_real_training_run(small_dataset, tiny_overrides, tmp_path):
    """Train the tiny model for 2 epochs with distdrgn.train, then analyze it from the CLI."""
    from distdrgn.config import load_config
    from distdrgn.train import train

    run = train(load_config(None, tiny_overrides(small_dataset["store"], tmp_path / "run")))
    assert cli.main(["analyze", str(run), "--ksample", "4", "--pc", "1", "--traversal-points", "3",
                     "--no-umap", "--device", "cpu"]) == 0
    out = run / "analyze.2"  # 2 epochs: the final weights.pkl / z.pkl are epoch 2
    z = pickle.load(open(run / "z.pkl", "rb"))
    assert z.shape == (192, 2)
    assert np.load(out / "z_pca.npy").shape == (192, 2)
    assert len(list((out / "kmeans4").glob("vol_*.mrc"))) == 4
    assert len(list((out / "pc1_traversal").glob("vol_*.mrc"))) == 3
    html = (out / "report.html").read_text()
    assert 'data-file="loss.png"' in html and 'data-file="z_pca_kmeans.png"' in html


def test_report_escapes_and_embeds(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    png = tmp_path / "a.png"
    fig.savefig(png)
    plt.close(fig)
    html = render_report(
        "t<1>", {"k": "v&w"}, [Section("s", text="x<y", figures=[Figure(png, "cap")], tables=[Table(["a"], [[0.123456]])])]
    )
    assert "t&lt;1&gt;" in html and "v&amp;w" in html and "x&lt;y" in html
    assert 'data-file="a.png"' in html and "<td>0.1235</td>" in html
    assert "src=\"a.png\"" not in html
