import csv
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distdrgn.checkpoint import load_weights, load_z
from distdrgn.config import load_config
from distdrgn.errors import DistdrgnError
from distdrgn.train import train

REPO = Path(__file__).resolve().parents[1]


def run_train(overrides):
    return train(load_config(None, overrides))


def read_loss(run: Path) -> list[dict]:
    with open(run / "loss.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def trained_run(small_dataset, tiny_overrides, tmp_path_factory):
    """A 6-epoch run through the CLI entry point (shared by the checks below)."""
    from distdrgn.cli import main

    run = tmp_path_factory.mktemp("run") / "out"
    args = tiny_overrides(small_dataset["store"], run, **{"train.epochs": 6, "train.checkpoint_every": 2})
    assert main(["train", str(REPO / "configs" / "tiny.yaml"), *args]) == 0
    return run


def test_end_to_end_outputs(trained_run, small_dataset):
    run = trained_run
    for name in ("config.yaml", "run.log", "loss.csv", "loss.png", "weights.pkl", "z.pkl",
                 "weights.2.pkl", "weights.4.pkl", "weights.6.pkl", "z.2.pkl", "z.4.pkl", "z.6.pkl"):
        assert (run / name).is_file(), name  # numbered from 1, as cryoDRGN 4.3.1 numbers epochs
    assert not (run / "weights.0.pkl").exists() and not (run / "weights.1.pkl").exists()
    rows = read_loss(run)
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    assert float(rows[-1]["mse"]) < float(rows[0]["mse"])  # it learns
    assert all(int(r["images"]) == 192 for r in rows)
    z_mu, z_logvar = load_z(run / "z.pkl")
    assert z_mu.shape == (192, 2) and z_logvar.shape == (192, 2) and np.isfinite(z_mu).all()
    ck = load_weights(run / "weights.pkl")
    assert ck["epoch"] == 6 and ck["optimizer_state_dict"]["state"]
    assert ck["preprocess"]["ht_std"] > 0 and ck["model_info"]["D"] == 16 and ck["store"]["apix"] > 0
    assert load_config(run / "config.yaml").train.epochs == 6
    log = (run / "run.log").read_text()
    assert "epoch 6/6" in log and "img/s" in log
    assert yaml.safe_load((run / "config.yaml").read_text())["run_format"] == 2
    # z follows the store order: re-encoding the store gives the same latents
    from distdrgn.encode import encode_store
    from distdrgn.store import ParticleStore
    from distdrgn.volumes import load_model

    tm = load_model(run)
    mu2, _ = encode_store(tm.model, tm.prep, ParticleStore.open(small_dataset["store"]), batch_size=50, device="cpu")
    np.testing.assert_allclose(mu2, z_mu, rtol=1e-4, atol=1e-5)


def test_resume_is_identical_to_an_uninterrupted_run(small_dataset, tiny_overrides, tmp_path):
    straight = tmp_path / "straight"
    resumed = tmp_path / "resumed"
    run_train(tiny_overrides(small_dataset["store"], straight, **{"train.epochs": 2}))
    run_train(tiny_overrides(small_dataset["store"], resumed, **{"train.epochs": 1}))
    assert (resumed / "weights.1.pkl").exists()
    run_train(tiny_overrides(small_dataset["store"], resumed, **{"train.epochs": 2}))  # picks up weights.1.pkl
    a, b = load_weights(straight / "weights.pkl"), load_weights(resumed / "weights.pkl")
    assert b["epoch"] == 2
    for k in a["model_state_dict"]:
        assert torch.equal(a["model_state_dict"][k], b["model_state_dict"][k]), k
    np.testing.assert_array_equal(load_z(straight / "z.pkl")[0], load_z(resumed / "z.pkl")[0])
    assert [r["epoch"] for r in read_loss(resumed)] == ["1", "2"]
    assert "resumed from weights.1.pkl" in (resumed / "run.log").read_text()


def test_homogeneous_hartley_run_and_beta_schedule(small_dataset, tiny_overrides, tmp_path):
    run = tmp_path / "homo"
    run_train(tiny_overrides(small_dataset["store"], run, **{"model.zdim": 0, "model.domain": "hartley",
                                                            "train.epochs": 1, "model.pe_type": "geom_lowf"}))
    assert (run / "weights.pkl").exists() and not (run / "z.pkl").exists()
    run2 = tmp_path / "sched"
    run_train(tiny_overrides(small_dataset["store"], run2, **{"train.beta": "linear:0:1:2", "train.epochs": 2}))
    assert [float(r["beta"]) for r in read_loss(run2)] == [0.0, 0.5]


def test_missing_settings_fail_cleanly(small_dataset, tiny_overrides, tmp_path):
    with pytest.raises(DistdrgnError, match="data.store is not set"):
        run_train([f"output.dir={tmp_path / 'x'}"])
    with pytest.raises(DistdrgnError, match="no such particle store"):
        run_train(tiny_overrides(tmp_path / "nope.zarr", tmp_path / "y"))


def test_an_output_dir_that_is_a_file_or_read_only_is_one_line(small_dataset, tiny_overrides, tmp_path):
    import os

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(DistdrgnError, match=f"output.dir={notes}: exists and is not a folder"):
        run_train(tiny_overrides(small_dataset["store"], notes))
    assert notes.read_text() == "mine"
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders: the read-only case needs an ordinary user")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(DistdrgnError, match="is not writable"):
        run_train(tiny_overrides(small_dataset["store"], locked / "run"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_are_scraped_during_training(small_dataset, tiny_overrides, tmp_path):
    port = free_port()
    args = tiny_overrides(small_dataset["store"], tmp_path / "m", **{"metrics.port": port, "train.epochs": 10,
                                                                      "train.log_every": 1})
    errors = []
    thread = threading.Thread(target=lambda: errors.append(None) if run_train(args) else None, daemon=True)
    thread.start()
    text = ""
    deadline = time.time() + 120
    while time.time() < deadline and thread.is_alive():
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except OSError:
            text = ""
        if "distdrgn_images_processed_total" in text and "\ndistdrgn_loss " in text:
            values = {l.split()[0]: float(l.split()[1]) for l in text.splitlines() if l.startswith("distdrgn_")}
            if values.get("distdrgn_images_processed_total", 0) > 0 and values.get("distdrgn_images_per_second", 0) > 0:
                break
        time.sleep(0.05)
    thread.join(timeout=300)
    values = {l.split()[0]: float(l.split()[1]) for l in text.splitlines() if l.startswith("distdrgn_")}
    for name in ("distdrgn_images_processed_total", "distdrgn_images_per_second", "distdrgn_loss", "distdrgn_kl",
                 "distdrgn_step_seconds", "distdrgn_data_wait_seconds", "distdrgn_gpu_memory_bytes",
                 "distdrgn_epoch", "distdrgn_last_checkpoint_timestamp_seconds"):
        assert name in values, name
    assert values["distdrgn_images_processed_total"] > 0 and values["distdrgn_loss"] > 0


def test_two_process_torchrun_gloo(small_dataset, tiny_overrides, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "distdrgn.train", str(REPO / "configs" / "tiny.yaml"),
           *tiny_overrides(small_dataset["store"], run, **{"train.batch_size": 10})]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_loss(run)
    assert [int(r["images"]) for r in rows] == [192, 192]  # each particle once per epoch across both ranks
    z_mu, _ = load_z(run / "z.pkl")
    assert z_mu.shape == (192, 2)
    # gathered in store order: the single-process encoder gives the same latents
    from distdrgn.encode import encode_store
    from distdrgn.store import ParticleStore
    from distdrgn.volumes import load_model

    tm = load_model(run)
    mu2, _ = encode_store(tm.model, tm.prep, ParticleStore.open(small_dataset["store"]), device="cpu")
    np.testing.assert_allclose(mu2, z_mu, rtol=1e-4, atol=1e-5)
    assert "2 process(es)" in (run / "run.log").read_text()


def test_mid_epoch_resume_from_a_step_checkpoint_is_identical(small_dataset, tiny_overrides, tmp_path):
    """A run resumed from checkpoints/step.1.160.pkl ends bitwise where an uninterrupted one does."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(tiny_overrides(small_dataset["store"], straight))
    steps = {"train.checkpoint_every_steps": 5}
    run_train(tiny_overrides(small_dataset["store"], resumed, **steps, **{"train.epochs": 1}))
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step.1.160.pkl", "step.1.80.pkl"]
    for name in ("weights.1.pkl", "weights.pkl", "z.1.pkl", "z.pkl"):  # back to the middle of epoch 1
        (resumed / name).unlink()
    run_train(tiny_overrides(small_dataset["store"], resumed, **steps))
    assert "resumed from checkpoints/step.1.160.pkl: continuing at epoch 1, image 160 of 192" in \
        (resumed / "run.log").read_text()
    a, b = load_weights(straight / "weights.pkl"), load_weights(resumed / "weights.pkl")
    for k in a["model_state_dict"]:
        assert torch.equal(a["model_state_dict"][k], b["model_state_dict"][k]), k
    np.testing.assert_array_equal(load_z(straight / "z.pkl")[0], load_z(resumed / "z.pkl")[0])
    rows_a, rows_b = read_loss(straight), read_loss(resumed)
    assert [r["epoch"] for r in rows_b] == ["1", "2"] and [r["images"] for r in rows_b] == ["192", "192"]
    assert [r["mse"] for r in rows_a] == [r["mse"] for r in rows_b]  # the epoch's totals were carried over


def test_hartley_normalisation_is_the_unwindowed_std_like_cryodrgn(small_dataset):
    """cryoDRGN divides windowed images by the std of the *unwindowed* HT; so must we, with or
    without the store's statistic."""
    from distdrgn.config import load_config
    from distdrgn.objective import Preprocess, hartley_std
    from distdrgn.store import ParticleStore
    from distdrgn.train import choose_ht_std

    store = ParticleStore.open(small_dataset["store"])
    cfg = load_config(None, [f"data.store={small_dataset['store']}", "output.dir=unused", "data.norm_images=100000"])
    value, source = choose_ht_std(store, cfg)
    assert value == pytest.approx(store.norm()["ht_std_nowindow"]) and "nowindow" in source

    class NoStats:  # a store without statistics: estimated on (here) every image
        n, D = store.n, store.D
        images = store.images

        def norm(self):
            return {}

    estimated, _ = choose_ht_std(NoStats(), cfg)
    direct = hartley_std(torch.from_numpy(store.images(np.arange(store.n))), Preprocess(store.D, window=False))
    assert estimated == pytest.approx(direct)
    windowed = hartley_std(torch.from_numpy(store.images(np.arange(store.n))), Preprocess(store.D, window=True))
    assert windowed < 0.95 * estimated  # the window removes power: the two choices really differ


def test_train_step_never_reads_a_device_value_on_the_host(monkeypatch):
    """The DDP step queues work only: a host read (bool, item, float, tolist) would make the
    CPU wait for the GPU every step. The non-finite flag comes back as a tensor."""
    from distdrgn.engine import build_engine
    from distdrgn.model import CryoDRGN, ModelInfo
    from distdrgn.objective import Batch, Preprocess
    from distdrgn.simulate import random_rotations
    from distdrgn.runtime import Runtime
    from distdrgn.train import train_step

    cfg = load_config(None, ["model.zdim=2", "model.enc_dim=16", "model.dec_dim=16", "model.enc_layers=2",
                             "model.dec_layers=2"])
    model = CryoDRGN(ModelInfo.from_config(cfg.model, 16, seed=0))
    rt = Runtime(0, 1, torch.device("cpu"), None)
    engine = build_engine(model, cfg, rt)
    gen = torch.Generator().manual_seed(0)
    ctf = torch.tensor([[16, 1.0, 15000, 14000, 30, 300, 2.7, 0.1, 0]]).repeat(4, 1)
    batch = Batch(torch.arange(4), torch.randn(4, 16, 16, generator=gen), random_rotations(4, gen).float(),
                  torch.zeros(4, 2), ctf)
    prep = Preprocess(16)
    train_step(engine, batch, prep, model.lattice, 0.5, 0.25, rt)  # caches filled, Adam state created

    def host_read(self, *args, **kwargs):
        raise AssertionError("a device value was read on the host inside train_step")

    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ("__bool__", "item", "tolist", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    terms, nonfinite = train_step(engine, batch, prep, model.lattice, 0.5, 0.25, rt)
    monkeypatch.undo()
    assert nonfinite.shape == () and float(nonfinite) == 0.0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the step was taken

    batch.images[1, 3, 3] = float("nan")  # a non-finite step: skipped on the device, parameters untouched
    before = {k: v.clone() for k, v in model.state_dict().items()}
    terms, nonfinite = train_step(engine, batch, prep, model.lattice, 0.5, 0.25, rt)
    assert float(nonfinite) == 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_load_starts_from_another_runs_weights(small_dataset, tiny_overrides, tmp_path):
    """train.load (cryoDRGN --load): the parameters of another run, then training from epoch 1."""
    first, loaded, fresh = tmp_path / "first", tmp_path / "loaded", tmp_path / "fresh"
    run_train(tiny_overrides(small_dataset["store"], first, **{"train.epochs": 3}))
    run_train(tiny_overrides(small_dataset["store"], loaded, **{"train.epochs": 1,
                                                               "train.load": str(first / "weights.3.pkl")}))
    run_train(tiny_overrides(small_dataset["store"], fresh, **{"train.epochs": 1}))
    assert "started from the weights of" in (loaded / "run.log").read_text()
    # one epoch from trained weights fits better than one epoch from scratch
    assert float(read_loss(loaded)[0]["mse"]) < float(read_loss(fresh)[0]["mse"])
    assert [r["epoch"] for r in read_loss(loaded)] == ["1"]
    other = tiny_overrides(small_dataset["store"], tmp_path / "other", **{"train.epochs": 1, "model.dec_layers": 3,
                                                                         "train.load": str(first / "weights.pkl")})
    with pytest.raises(DistdrgnError, match="train.load=.*not the one configured"):
        run_train(other)


def test_training_ends_with_analyze_like_cryodrgn(small_dataset, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    run_train(tiny_overrides(small_dataset["store"], run, **{"train.epochs": 1, "train.analyze": True}))
    assert (run / "analyze.1" / "report.html").is_file()
    assert "running analyze on the final epoch" in (run / "run.log").read_text()


def test_a_distdrgn_0_1_run_directory_is_not_resumed(small_dataset, tiny_overrides, tmp_path):
    """Its weights.0.pkl is epoch 1: reading is fine, continuing it would mix two numberings."""
    run = tmp_path / "old"
    run_train(tiny_overrides(small_dataset["store"], run, **{"train.epochs": 1}))
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text("\n".join(line for line in text.splitlines() if not line.startswith("run_format")))
    with pytest.raises(DistdrgnError, match="distdrgn 0.1.*new output.dir"):
        run_train(tiny_overrides(small_dataset["store"], run, **{"train.epochs": 2}))


def test_data_ind_trains_and_encodes_exactly_the_subset(small_dataset, tiny_overrides, tmp_path):
    """data.ind (cryoDRGN --ind): each selected particle once per epoch, z rows = the subset in store order."""
    from distdrgn.encode import encode_store
    from distdrgn.formats.ind import save_indices
    from distdrgn.store import ParticleStore
    from distdrgn.volumes import load_model

    keep = np.sort(np.random.default_rng(0).choice(192, size=100, replace=False))
    save_indices(tmp_path / "ind.pkl", keep[::-1].copy())  # any order; trained in store order
    run = tmp_path / "run"
    run_train(tiny_overrides(small_dataset["store"], run, **{"data.ind": str(tmp_path / "ind.pkl"),
                                                            "train.checkpoint_every_steps": 2}))
    assert [int(r["images"]) for r in read_loss(run)] == [100, 100]
    z_mu, _ = load_z(run / "z.pkl")
    tm = load_model(run)
    everyone, _ = encode_store(tm.model, tm.prep, ParticleStore.open(small_dataset["store"]), device="cpu")
    np.testing.assert_allclose(z_mu, everyone[keep], rtol=1e-4, atol=1e-5)
    assert "training on 100 of the store's 192 particles" in (run / "run.log").read_text()
    with pytest.raises(DistdrgnError, match="another data.ind subset"):  # resuming needs the same subset
        run_train(tiny_overrides(small_dataset["store"], run, **{"train.epochs": 3}))


def test_a_search_whose_loss_rises_is_warned_of_with_the_best_epochs_files(tmp_path, caplog):
    """abinit's collapse warning as run.log shows it, from loss.csv (so a resumed run reads the
    same rows): the losses of a measured hinge run whose map collapsed (benchmarks/RESULTS.md)."""
    import logging

    from distdrgn.progress import LossTable
    from distdrgn.train import warn_if_collapsing

    losses = LossTable(tmp_path)
    for epoch, loss in enumerate([0.534, 0.179, 0.156, 0.140, 0.136, 0.138, 0.147, 0.177, 0.227], start=1):
        losses.append({"epoch": epoch, "loss": loss, "mse": loss, "kl": 0, "beta": 0, "images": 2000,
                       "seconds": 10, "images_per_second": 200})
        (tmp_path / f"weights.{epoch}.pkl").touch()
        (tmp_path / f"poses.{epoch}.pkl").touch()
    with caplog.at_level(logging.WARNING, logger="distdrgn.train"):
        for epoch in range(1, 10):
            warn_if_collapsing(losses, epoch, tmp_path)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("epoch 9: the training loss 0.227 is more than 1.5x the search's lowest so far "
                                  "(0.136, epoch 5): the map may be collapsing")
    assert "weights.5.pkl and poses.5.pkl hold epoch 5" in warnings[0] and "abinit.attempts" in warnings[0]
