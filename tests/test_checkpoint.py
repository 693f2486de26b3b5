import pickle

import numpy as np
import pytest
import torch

from distdrgn.checkpoint import (
    checkpoint_epochs,
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


def test_checkpoint_discovery(tmp_path):
    with pytest.raises(DistdrgnError, match="no weights.pkl"):
        weights_path(tmp_path)
    for n in (0, 2, 10):
        save_weights(tmp_path / f"weights.{n}.pkl", {"epoch": n})
    assert checkpoint_epochs(tmp_path) == [0, 2, 10]
    assert weights_path(tmp_path).name == "weights.10.pkl"
    save_weights(tmp_path / "weights.pkl", {"epoch": 10})
    assert weights_path(tmp_path).name == "weights.pkl"
    assert weights_path(tmp_path, 2).name == "weights.2.pkl"


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
    save_weights(tmp_path / "weights.0.pkl", {"epoch": 0})
    for consumed in (32, 64, 96):
        save_step_checkpoint(tmp_path, 1, consumed, {"model_state_dict": {}, "position": {"sums": [0.0] * 4}})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step.1.64.pkl", "step.1.96.pkl"]
    assert [key for key, _ in resume_points(tmp_path)] == [(1, 96), (1, 64), (1, 0)]
    ck = load_weights(step_checkpoint_path(tmp_path, 1, 96))
    assert ck["epoch"] == 1 and ck["position"] == {"epoch": 1, "consumed": 96, "sums": [0.0] * 4}
    save_weights(tmp_path / "weights.1.pkl", {"epoch": 1})  # the epoch's end beats its steps
    assert resume_points(tmp_path)[0][1].name == "weights.1.pkl"


def test_a_truncated_checkpoint_is_detected_and_the_previous_one_used(tmp_path):
    assert load_latest(tmp_path) == (None, None)
    save_weights(tmp_path / "weights.0.pkl", {"epoch": 0})
    save_step_checkpoint(tmp_path, 1, 10, {"model_state_dict": {"w": torch.zeros(1000)}})
    newest = save_step_checkpoint(tmp_path, 1, 20, {"model_state_dict": {"w": torch.ones(1000)}})
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    warnings = []
    ck, path = load_latest(tmp_path, warn=warnings.append)
    assert path.name == "step.1.10.pkl" and ck["position"]["consumed"] == 10
    assert len(warnings) == 1 and "step.1.20.pkl: cannot read checkpoint" in warnings[0]
    assert (tmp_path / "checkpoints" / "step.1.20.pkl.corrupt").exists() and not newest.exists()
    # the damaged file no longer counts: the next step checkpoint does not delete step.1.10 for it
    save_step_checkpoint(tmp_path, 1, 15, {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pkl")) == ["step.1.10.pkl", "step.1.15.pkl"]


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / ".weights.3.pkl.abc123.tmp", tmp_path / "checkpoints" / ".step.1.2.pkl.x.tmp",
             tmp_path / ".loss.png.tmp.png"]
    for p in stale:
        p.write_bytes(b"half")
    save_weights(tmp_path / "weights.2.pkl", {"epoch": 2})
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["weights.2.pkl"]
