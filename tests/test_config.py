import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distdrgn.config import Config, dump_config, from_dict, load_config
from distdrgn.errors import DistdrgnError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_cryodrgn_defaults():
    cfg = Config()
    assert (cfg.model.enc_dim, cfg.model.enc_layers, cfg.model.dec_dim, cfg.model.dec_layers) == (1024, 3, 1024, 3)
    assert cfg.model.pe_type == "gaussian" and cfg.model.pe_dim is None and cfg.model.domain == "fourier"
    assert cfg.train.lr == 1e-4 and cfg.train.batch_size == 16 and cfg.train.beta is None
    assert cfg.data.invert is True and cfg.data.window is True


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  store: s.zarr\nmodel:\n  zdim: 4\ntrain:\n  lr: 1\n")
    cfg = load_config(path, ["train.epochs=3", "data.level=64", "train.beta=linear:0:1:2", "metrics.port=9100",
                             "data.invert=false", "train.amp=true"])
    assert cfg.data.store == "s.zarr" and cfg.model.zdim == 4
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # int accepted for a float
    assert cfg.train.epochs == 3 and cfg.data.level == 64 and cfg.metrics.port == 9100
    assert cfg.train.beta == "linear:0:1:2" and cfg.data.invert is False and cfg.train.amp is True
    # the dump round-trips
    assert from_dict(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize(
    "text, overrides, match",
    [
        ("model:\n  zdm: 4\n", [], "unknown key 'model.zdm'"),
        ("modle:\n  zdim: 4\n", [], "unknown config section 'modle'"),
        ("model:\n  zdim: four\n", [], "'model.zdim' must be int"),
        ("", ["train.epochs=2.5"], "'train.epochs' must be int"),
        ("", ["train.amp=maybe"], "train.amp must be"),
        ("", ["model.pe_type=fourier"], "model.pe_type must be one of"),
        ("", ["model.kernels=fast"], "model.kernels must be one of auto, fused, torch"),
        ("", ["train.beta=cyclic"], "train.beta must be"),
        ("", ["trainepochs=3"], "expected section.key=value|must be section.key"),
        ("", ["data.invert=yes please"], "'data.invert' must be bool"),
        ("- a\n- b\n", [], "top level must be a mapping"),
    ],
)
def test_errors_are_one_line_and_name_the_key(tmp_path, text, overrides, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DistdrgnError, match=match) as err:
        load_config(path, overrides)
    assert "\n" not in str(err.value)


def test_shipped_configs_load():
    for name in ("default", "tiny", "large"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.train.engine == "ddp"
    default = load_config(REPO / "configs" / "default.yaml")
    assert default.model == Config().model and default.train == Config().train


def test_cli_reports_config_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epoch: 3\n")
    proc = subprocess.run([sys.executable, "-m", "distdrgn.cli", "train", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {path}: unknown key 'train.epoch' (known: " +
                                                 proc.stderr.split("(known: ")[1].strip()]
    proc = subprocess.run([sys.executable, "-m", "distdrgn.train", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "config file not found" in proc.stderr


def test_exponent_floats_without_a_dot_are_floats():
    """PyYAML reads 1e-3 as a string (YAML 1.1); float keys accept it, other strings stay errors."""
    from distdrgn.config import load_config
    from distdrgn.errors import DistdrgnError

    cfg = load_config(None, ["train.lr=1e-3", "data.store=x", "output.dir=y"])
    assert cfg.train.lr == 1e-3
    with pytest.raises(DistdrgnError, match="train.lr"):
        load_config(None, ["train.lr=fast", "data.store=x", "output.dir=y"])
