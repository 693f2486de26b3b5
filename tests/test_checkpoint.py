import pickle

import numpy as np
import pytest
import torch

from distdrgn.checkpoint import checkpoint_epochs, load_weights, load_z, save_weights, save_z, weights_path
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
