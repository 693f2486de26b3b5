import pickle

import numpy as np
import pytest
import torch

from distdrgn.checkpoint import (
    DataPosition,
    checkpoint_epochs,
    epoch_file,
    file_offset,
    load_latest,
    load_weights,
    load_z,
    remove_stale_temporaries,
    resume_points,
    save_step_checkpoint,
    save_weights,
    save_z,
    step_checkpoint_path,
    weights_path,
    z_epochs,
)
from distdrgn.errors import DistdrgnError


def test_weights_round_trip_and_atomicity(tmp_path):
    payload = {"epoch": 3, "model_state_dict": {"w": torch.arange(4.0)}, "config": {"a": {"b": 1}},
               "rng": {"torch_cpu": [torch.get_rng_state()]}, "scaler_state_dict": None}
    save_weights(tmp_path / "weights.3.pkl", payload)
    ck = load_weights(tmp_path / "weights.3.pkl")
    assert ck["epoch"] == 3 and torch.equal(ck["model_state_dict"]["w"], torch.arange(4.0))
    assert ck["format"] == "distdrgn-weights"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.3.pkl"]  # no temporary left behind

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(Exception):
        save_weights(tmp_path / "weights.4.pkl", {"x": Boom()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.3.pkl"]


def new_run_dir(path):
    from distdrgn.config import Config, dump_config

    (path / "config.yaml").write_text(dump_config(Config()))
    return path


def test_checkpoint_discovery(tmp_path):
    """Epochs are numbered from 1 (cryoDRGN 4.3.1): weights.1.pkl after the first epoch."""
    run = new_run_dir(tmp_path)
    with pytest.raises(DistdrgnError, match="no weights.pkl"):
        weights_path(run)
    for n in (1, 3, 10):
        save_weights(run / f"weights.{n}.pkl", {"epoch": n})
    assert checkpoint_epochs(run) == [1, 3, 10]
    assert weights_path(run).name == "weights.10.pkl"
    save_weights(run / "weights.pkl", {"epoch": 10})
    assert weights_path(run).name == "weights.pkl"
    assert weights_path(run, 3).name == "weights.3.pkl"
    assert [key for key, _ in resume_points(run)] == [(11, 0), (4, 0), (2, 0)]


def test_distdrgn_0_1_run_directories_are_read_with_their_epoch_numbers(tmp_path):
    """0.1 wrote weights.0.pkl after the first epoch and a config.yaml without run_format."""
    (tmp_path / "config.yaml").write_text("model:\n  zdim: 2\n")
    payload = {"format": "distdrgn-weights", "version": 1, "epoch": 0, "model_state_dict": {}}
    for n in (0, 1):
        torch.save({**payload, "epoch": n}, tmp_path / f"weights.{n}.pkl")
    save_z(tmp_path / "z.1.pkl", np.zeros((2, 2)), np.zeros((2, 2)))
    assert file_offset(tmp_path) == 1 and checkpoint_epochs(tmp_path) == [1, 2] and z_epochs(tmp_path) == [2]
    assert weights_path(tmp_path, 2).name == "weights.1.pkl" and epoch_file(tmp_path, "z", 2).name == "z.1.pkl"
    assert load_weights(tmp_path / "weights.1.pkl")["epoch"] == 2
    assert [key for key, _ in resume_points(tmp_path)] == [(3, 0), (2, 0)]


def test_cryodrgn_run_directories_number_from_1():
    from fixture_files import CRYODRGN_RUNS

    if not CRYODRGN_RUNS.is_dir():
        pytest.skip(f"cryoDRGN run fixtures not found at {CRYODRGN_RUNS}")
    assert file_offset(CRYODRGN_RUNS / "vae") == 0
    assert checkpoint_epochs(CRYODRGN_RUNS / "vae") == [1] and z_epochs(CRYODRGN_RUNS / "vae") == [1, 2]


def test_foreign_and_corrupt_files(tmp_path):
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DistdrgnError, match="junk.pkl: cannot read checkpoint"):
        load_weights(tmp_path / "junk.pkl")
    torch.save({"model_state_dict": {}}, tmp_path / "cryodrgn.pkl")
    with pytest.raises(DistdrgnError, match="not a distdrgn checkpoint"):
        load_weights(tmp_path / "cryodrgn.pkl")


def test_z_pkl_is_two_consecutive_pickles(tmp_path):
    mu = np.random.default_rng(0).normal(size=(5, 3))
    lv = mu * 2
    save_z(tmp_path / "z.pkl", mu, lv)
    with open(tmp_path / "z.pkl", "rb") as fh:
        a, b = pickle.load(fh), pickle.load(fh)
    assert a.dtype == np.float32 and a.shape == (5, 3)
    np.testing.assert_allclose(b, lv.astype(np.float32))
    z_mu, z_lv = load_z(tmp_path / "z.pkl")
    np.testing.assert_array_equal(z_mu, a)



def test_step_checkpoints_keep_the_newest_two_and_order_with_epochs(tmp_path):
    save_weights(tmp_path / "weights.1.pkl", {"epoch": 1})
    for consumed in (32, 64, 96):
        save_step_checkpoint(tmp_path, DataPosition(2, consumed), {"model_state_dict": {}})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step.2.64.pkl", "step.2.96.pkl"]
    assert [key for key, _ in resume_points(tmp_path)] == [(2, 96), (2, 64), (2, 0)]
    ck = load_weights(step_checkpoint_path(tmp_path, 2, 96))
    assert ck["epoch"] == 2 and ck["position"] == {"epoch": 2, "consumed": 96, "sums": [0.0] * 4, "seconds": 0.0}
    assert DataPosition.of_checkpoint(ck) == DataPosition(2, 96)
    save_weights(tmp_path / "weights.2.pkl", {"epoch": 2})  # the epoch's end beats its steps
    assert resume_points(tmp_path)[0][1].name == "weights.2.pkl"


def test_a_truncated_checkpoint_is_detected_and_the_previous_one_used(tmp_path):
    assert load_latest(tmp_path) == (None, None)
    save_weights(tmp_path / "weights.1.pkl", {"epoch": 1})
    save_step_checkpoint(tmp_path, DataPosition(2, 10), {"model_state_dict": {"w": torch.zeros(1000)}})
    newest = save_step_checkpoint(tmp_path, DataPosition(2, 20), {"model_state_dict": {"w": torch.ones(1000)}})
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    warnings = []
    ck, path = load_latest(tmp_path, warn=warnings.append)
    assert path.name == "step.2.10.pkl" and ck["position"]["consumed"] == 10
    assert len(warnings) == 1 and "step.2.20.pkl: cannot read checkpoint" in warnings[0]
    assert (tmp_path / "checkpoints" / "step.2.20.pkl.corrupt").exists() and not newest.exists()
    # the damaged file no longer counts: the next step checkpoint does not delete step.2.10 for it
    save_step_checkpoint(tmp_path, DataPosition(2, 15), {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pkl")) == ["step.2.10.pkl", "step.2.15.pkl"]


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / ".weights.3.pkl.abc123.tmp", tmp_path / "checkpoints" / ".step.1.2.pkl.x.tmp",
             tmp_path / ".loss.png.tmp.png"]
    for p in stale:
        p.write_bytes(b"half")
    save_weights(tmp_path / "weights.2.pkl", {"epoch": 2})
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["weights.2.pkl"]


def test_files_follow_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        save_weights(tmp_path / "weights.1.pkl", {"epoch": 1})
        save_z(tmp_path / "z.1.pkl", np.zeros((2, 2)), np.zeros((2, 2)))
        os.umask(0o077)
        save_weights(tmp_path / "private.pkl", {"epoch": 1})
    finally:
        os.umask(old)
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert mode == {"weights.1.pkl": 0o644, "z.1.pkl": 0o644, "private.pkl": 0o600}


def test_a_full_disk_is_one_line_and_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    save_weights(tmp_path / "weights.1.pkl", {"epoch": 1})
    before = (tmp_path / "weights.1.pkl").read_bytes()

    def short_write(obj, fh):  # what torch.save raises when the disk fills mid-file
        fh.write(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6400 vs 6294")

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(DistdrgnError, match=r"weights.1.pkl: cannot write it .*rerun the same command to resume"):
        save_weights(tmp_path / "weights.1.pkl", {"epoch": 2})

    def enospc(obj, fh):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", enospc)
    with pytest.raises(DistdrgnError, match="no space left on the device"):
        save_weights(tmp_path / "weights.2.pkl", {"epoch": 2})
    assert (tmp_path / "weights.1.pkl").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.1.pkl"]  # no temporaries left
