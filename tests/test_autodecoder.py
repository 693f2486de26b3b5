"""``model.encoder=autodecoder`` from the CLI: each particle's z is a learned row of the
per-particle table (no image encoder), written as z.pkl; the z of two states separate; the
commands that read a run work on it, and the one that would encode images says why it cannot.

Data: a noise-free two-state simulation (``--dist discrete``) at D = 16, 300 images, with poses.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from distdrgn.analysis.latent import load_z
from distdrgn.cli import main as cli

N, D = 300, 16


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    from distdrgn.simulate import load_ground_truth, simulate
    from distdrgn.store import ingest

    root = tmp_path_factory.mktemp("autodecoder")
    paths = simulate(root / "sim", n=N, D=D, snr=float("inf"), dist="discrete", n_states=2, seed=0, progress=False,
                     write_volumes=False)
    store = ingest(paths["particles.mrcs"], root / "store", poses=paths["poses.pkl"], ctf=paths["ctf.pkl"],
                   progress=False)
    return {"root": root, "store": store, "state": load_ground_truth(root / "sim").state}


def train(data, run, *extra) -> int:
    return cli(["train", f"data.store={data['store']}", f"output.dir={run}", "model.zdim=1",
                "model.encoder=autodecoder", "model.dec_dim=64", "model.dec_layers=2", "train.batch_size=16",
                "train.lr=2e-3", "train.epochs=8", "train.device=cpu", "train.analyze=false", "train.log_every=1000",
                *extra])


def test_the_z_table_separates_two_states_and_the_run_reads_like_any(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(data, run) == 0
    z = load_z(run / "z.pkl")
    assert z.shape == (N, 1) and (run / "z.4.pkl").exists()
    # the rows start as N(0, 0.1^2) draws, unrelated to the state; trained, they separate the two
    # (|Spearman| of a perfect split of two equal halves is sqrt(3)/2 = 0.87)
    rho = abs(spearmanr(z[:, 0], data["state"]).correlation)
    assert rho > 0.7, rho
    assert not (run / "poses.pkl").exists()  # the store's poses were used as they are
    log = (run / "run.log").read_text()
    assert "encoder z table (autodecoder, 1 per particle)" in log
    # volumes at the learned z differ between the states' centres
    lo, hi = (float(np.median(z[data["state"] == s, 0])) for s in (0, 1))
    zfile = tmp_path / "two.txt"
    np.savetxt(zfile, [[lo], [hi]])
    assert cli(["eval-vol", str(run), "--zfile", str(zfile), "-o", str(tmp_path / "vols")]) == 0
    # there is no encoder to encode images with: one clear error
    capsys.readouterr()
    assert cli(["encode", str(run), str(data["store"]), "-o", str(tmp_path / "z_new.pkl")]) != 0
    assert "no image encoder (model.encoder=autodecoder)" in capsys.readouterr().err


def test_an_autodecoder_needs_a_latent_space_and_the_ddp_engine(data, tmp_path, capsys):
    assert train(data, tmp_path / "a", "model.zdim=0") != 0
    assert "model.encoder=autodecoder learns a z per particle: it needs model.zdim > 0" in capsys.readouterr().err
    assert train(data, tmp_path / "b", "train.engine=deepspeed") != 0
    assert "model.encoder=autodecoder runs with train.engine=ddp" in capsys.readouterr().err
