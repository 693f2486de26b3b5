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
        ("", ["model.kernels=fast"], "model.kernels must be one of auto, fused, compile, torch"),
        ("", ["train.beta=cyclic"], "train.beta must be"),
        ("", ["trainepochs=3"], "expected section.key=value|must be section.key"),
        ("", ["data.invert=yes please"], "'data.invert' must be bool"),
        ("", ["abinit.local_search=true", "abinit.levels=0"], "abinit.local_search needs abinit.levels >= 1"),
        ("", ["abinit.support_radius=0.6"], r"abinit.support_radius in \(0, 0.5\]"),
        ("", ["abinit.support_weight=-1"], "abinit.support_weight must be >= 0"),
        ("- a\n- b\n", [], "top level must be a mapping"),
        ("", ["data.store=st", "output.dir=st"], r"output.dir \(st\) is inside data.store \(st\)"),
        ("", ["data.store=st", "output.dir=st/runs/../run"], "is inside data.store"),
    ],
)
def test_errors_are_one_line_and_name_the_key(tmp_path, text, overrides, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DistdrgnError, match=match) as err:
        load_config(path, overrides)
    assert "\n" not in str(err.value)


def test_a_run_directory_next_to_or_holding_the_store_is_fine(tmp_path):
    for store, run in (("st", "st_run"), ("run/st", "run"), ("st", "../st")):
        cfg = load_config(None, [f"data.store={tmp_path / store}", f"output.dir={tmp_path / run}"])
        assert cfg.output.dir == str(tmp_path / run)


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


def test_packaged_configs_by_name_and_overrides_alone(tmp_path, monkeypatch):
    from distdrgn.config import packaged_configs, split_config_arguments

    assert packaged_configs() == ["default", "large", "tiny"]
    monkeypatch.chdir(tmp_path)  # no configs/ folder here, as for a user who installed the package
    assert load_config("large") == load_config("large.yaml") == load_config(REPO / "configs" / "large.yaml")
    assert load_config("configs/tiny.yaml") == load_config(REPO / "configs" / "tiny.yaml")
    with pytest.raises(DistdrgnError, match="huge: config file not found .named configs: default, large, tiny"):
        load_config("huge")
    assert split_config_arguments(["data.store=s", "output.dir=r"]) == (None, ["data.store=s", "output.dir=r"])
    assert split_config_arguments(["large", "train.epochs=2"]) == ("large", ["train.epochs=2"])
    (tmp_path / "a=b.yaml").write_text("train:\n  epochs: 2\n")  # a file whose name looks like an override
    assert split_config_arguments(["a=b.yaml"]) == ("a=b.yaml", [])


def test_config_command_prints_every_key_with_comments():
    import dataclasses

    proc = subprocess.run([sys.executable, "-m", "distdrgn.cli", "config"], capture_output=True, text=True, check=True)
    printed = yaml.safe_load(proc.stdout)
    assert from_dict(printed) == Config()  # the printed file is the built-in defaults ...
    for section in dataclasses.fields(Config):  # ... with every key of every section, commented
        keys = {f.name for f in dataclasses.fields(getattr(Config(), section.name))}
        assert set(printed[section.name]) == keys, section.name
    assert "# latent dimension" in proc.stdout
    resolved = subprocess.run([sys.executable, "-m", "distdrgn.cli", "config", "tiny", "train.epochs=7"],
                              capture_output=True, text=True, check=True)
    assert yaml.safe_load(resolved.stdout)["train"]["epochs"] == 7


def test_train_help_lists_the_sections_and_overrides_alone_reach_the_data(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "distdrgn.cli", "train", "--help"], capture_output=True,
                               text=True, check=True).stdout
    for section in ("data.", "output.", "model.", "train.", "metrics.", "debug."):
        assert f"\n  {section}" in help_text
    assert "store=''" in help_text and "epochs=20" in help_text
    # no config path: every key has its default, and the overrides alone are used
    proc = subprocess.run([sys.executable, "-m", "distdrgn.cli", "train", f"data.store={tmp_path / 'none.zarr'}",
                           f"output.dir={tmp_path / 'run'}"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "none.zarr" in proc.stderr
    assert "config file not found" not in proc.stderr
