"""Reliability: non-finite steps, the verification record, bad inputs at startup, determinism.

tests/README.md lists every fault / bad-input case, the test that covers it and the message.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from store_helpers import make_dataset

from distdrgn.cli import main as cli
from distdrgn.config import load_config
from distdrgn.errors import DistdrgnError, StoreError
from distdrgn.store import ParticleStore

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
N, D = 64, 16
NAN_IMAGE = 5
# 16 images per chunk; a store this small gets one chunk per shard file (layout.MIN_SHARDS)
LAYOUT_ARGS = {"target_chunk_bytes": 16 * D * D * 4}


def make_store(stack: Path, paths: dict, out: Path, allow_nonfinite: bool = False) -> Path:
    """The Python ingest (the layout is not a CLI option); the CLI's --allow-nonfinite is tested below."""
    from distdrgn.store import ingest

    return ingest(stack, out, poses=paths["poses"], ctf=paths["ctf"], progress=False, workers=1,
                  layout_overrides=LAYOUT_ARGS, allow_nonfinite=allow_nonfinite)


def write_stack(path: Path, images: np.ndarray) -> Path:
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(images.astype(np.float32))
        m.set_image_stack()
        m.voxel_size = 2.0
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A clean store, a store with one NaN image and one whose every image is NaN (64 x 16 px)."""
    tmp = tmp_path_factory.mktemp("reliability")
    paths, arrays = make_dataset(tmp, n=N, D=D)
    clean = make_store(paths["stack"], paths, tmp / "clean.zarr")
    images = arrays["images"].copy()
    images[NAN_IMAGE, 3, 4] = np.nan
    nan_stack = write_stack(tmp / "nan.mrcs", images)
    all_nan = write_stack(tmp / "all_nan.mrcs", np.full_like(images, np.nan))
    return {"tmp": tmp, "paths": paths, "clean": clean, "nan_stack": nan_stack, "all_nan_stack": all_nan,
            "one_nan": make_store(nan_stack, paths, tmp / "one_nan.zarr", allow_nonfinite=True),
            "all_nan": make_store(all_nan, paths, tmp / "all_nan.zarr", allow_nonfinite=True)}


def overrides(tiny_overrides, store, out, **extra):
    return tiny_overrides(store, out, **{"train.epochs": 1, "train.log_every": 1000, **extra})


def run_train(args):
    from distdrgn.train import train

    return train(load_config(None, args))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---- ingest --allow-nonfinite and verify ------------------------------------------------


def test_ingest_allow_nonfinite_records_and_verify_warns(data, tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    assert cli(["ingest", str(data["nan_stack"]), "-o", str(out), "--poses", str(data["paths"]["poses"]),
                "--ctf", str(data["paths"]["ctf"]), "--no-progress"]) == 2
    assert f"particle {NAN_IMAGE} has non-finite" in one_error_line(capsys) and not out.exists()
    assert cli(["ingest", str(data["nan_stack"]), "-o", str(out), "--poses", str(data["paths"]["poses"]),
                "--ctf", str(data["paths"]["ctf"]), "--no-progress", "--allow-nonfinite"]) == 0
    store = ParticleStore.open(out)
    assert store.attrs["allow_nonfinite"] is True and store.nonfinite == {"count": 1, "positions": [NAN_IMAGE]}
    assert np.isfinite(list(store.norm().values())).all()  # the NaN image is left out of the statistics
    capsys.readouterr()
    assert cli(["store", "verify", "--no-progress", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("ok:")
    assert "1 image(s) with non-finite pixels" in captured.err and f"store positions: {NAN_IMAGE}" in captured.err
    assert ParticleStore.open(out).verification["ok"] is True


# ---- non-finite steps -------------------------------------------------------------------


def test_nan_image_step_is_skipped_counted_and_training_continues(data, tiny_overrides, tmp_path, monkeypatch):
    import distdrgn.train as train_mod
    from distdrgn.checkpoint import load_weights

    created = []

    class Recording(train_mod.TrainingMetrics):
        def __init__(self):
            super().__init__()
            created.append(self)

    monkeypatch.setattr(train_mod, "TrainingMetrics", Recording)
    run = tmp_path / "run"
    run_train(overrides(tiny_overrides, data["one_nan"], run, **{"metrics.port": free_port()}))
    assert created[0].registry.get_sample_value("distdrgn_nonfinite_steps_total") == 1
    log = (run / "run.log").read_text()
    assert f"step skipped (1 in a row); images with non-finite pixels: [{NAN_IMAGE}]" in log
    row = (run / "loss.csv").read_text().splitlines()[1].split(",")
    assert int(row[5]) == N - 16 and np.isfinite(float(row[1]))  # the skipped step's 16 images are not counted
    weights = load_weights(run / "weights.pkl")["model_state_dict"]
    assert all(np.isfinite(v.numpy()).all() for v in weights.values())


def test_consecutive_nonfinite_steps_stop_with_the_particles(data, tiny_overrides, tmp_path, capsys):
    args = overrides(tiny_overrides, data["all_nan"], tmp_path / "run", **{"train.max_nonfinite_steps": 1})
    assert cli(["train", TINY, *args]) == 2
    line = one_error_line(capsys)
    assert "1 consecutive steps had a non-finite loss or gradient (train.max_nonfinite_steps=1" in line
    assert "particles with non-finite pixels [" in line and "store positions" in line
    positions = json.loads(line.split("particles with non-finite pixels ")[1].split("]")[0] + "]")
    assert len(positions) == 16 and all(0 <= p < N for p in positions)  # the first step's images


def test_two_processes_skip_together(data, tiny_overrides, tmp_path):
    run = tmp_path / "ddp"
    proc = torchrun(2, overrides(tiny_overrides, data["one_nan"], run, **{"train.batch_size": 8}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run / "run.log").read_text()
    assert log.count("step skipped") == 1 and f"non-finite pixels: [{NAN_IMAGE}]" in log
    assert int((run / "loss.csv").read_text().splitlines()[1].split(",")[5]) == N - 16  # 2 ranks x 8 skipped


# ---- the verification record ------------------------------------------------------------


def test_corrupt_chunk_fails_verify_and_training_refuses_unless_allowed(data, tiny_overrides, tmp_path, capsys):
    store = tmp_path / "corrupt.zarr"
    shutil.copytree(data["clean"], store)
    shard = store / "images" / "c" / "1" / "0" / "0"  # the second shard file: chunk 1, images 16-31
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0x01  # the lowest mantissa bit of a pixel of image 16: training can still read it
    shard.write_bytes(bytes(raw))
    assert cli(["store", "verify", "--no-progress", str(store)]) == 2
    line = one_error_line(capsys)
    assert "checksum mismatch in chunk 1 (images 16-31) at box 16" in line and "re-ingest" in line
    record = ParticleStore.open(store).verification
    assert record["ok"] is False and record["chunk"] == 1 and record["images"] == [16, 31] and record["time"]
    with pytest.raises(StoreError, match=r"last verification \(.*\) failed: chunk 1 \(images 16-31\) at box 16; "
                                         r"re-ingest the store, or set data.allow_unverified=true"):
        run_train(overrides(tiny_overrides, store, tmp_path / "refused"))
    run = tmp_path / "allowed"
    run_train(overrides(tiny_overrides, store, run, **{"data.allow_unverified": "true"}))
    assert (run / "weights.pkl").exists() and "training on it anyway" in (run / "run.log").read_text()
    # a store never verified is accepted (the other tests train on data["clean"])
    assert ParticleStore.open(data["clean"]).verification is None


# ---- bad inputs at startup --------------------------------------------------------------


def test_store_from_a_newer_format_version(data, tiny_overrides, tmp_path, capsys):
    store = tmp_path / "future.zarr"
    shutil.copytree(data["clean"], store)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["version"] = 2
    (store / "zarr.json").write_text(json.dumps(meta))
    assert cli(["train", TINY, *overrides(tiny_overrides, store, tmp_path / "run")]) == 2
    assert one_error_line(capsys) == (f"error: {store}: store format version 2 is newer than this distdrgn reads "
                                      "(up to 1); upgrade distdrgn")


def test_resume_or_encode_with_another_box(data, tiny_overrides, tmp_path, capsys):
    from distdrgn.store import ingest

    run = tmp_path / "run"
    run_train(overrides(tiny_overrides, data["clean"], run))
    small = ingest(data["paths"]["stack"], tmp_path / "box8.zarr", poses=data["paths"]["poses"],
                   ctf=data["paths"]["ctf"], D=8, progress=False, workers=1)
    with pytest.raises(DistdrgnError, match=f"the run was trained at box 16 but {small} gives box 8"):
        run_train(overrides(tiny_overrides, small, run, **{"train.epochs": 2}))
    assert cli(["encode", str(run), str(small), "-o", str(tmp_path / "z.pkl")]) == 2
    line = one_error_line(capsys)
    assert "the store's box is 8 (levels [8])" in line and "was trained at box 16" in line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_port_in_use(data, tiny_overrides, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli(["train", TINY, *overrides(tiny_overrides, data["clean"], tmp_path / "run",
                                         **{"metrics.port": port})]) == 2
    assert one_error_line(capsys).startswith(f"error: metrics.port={port}: cannot serve Prometheus metrics on port "
                                             f"{port} (Address already in use)")


# ---- determinism ------------------------------------------------------------------------


def torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "distdrgn.train", TINY, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)


@pytest.mark.parametrize("nproc", [1, 2])
def test_same_seed_and_world_size_give_identical_z(data, tiny_overrides, tmp_path, nproc):
    """Two fresh runs, same seed and number of processes (CPU): z.pkl byte for byte."""
    outs = []
    for name in ("a", "b"):
        args = overrides(tiny_overrides, data["clean"], tmp_path / name, **{"train.epochs": 2, "train.batch_size": 8})
        if nproc == 1:
            run_train(args)
        else:
            proc = torchrun(nproc, args)
            assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append((tmp_path / name / "z.pkl").read_bytes())
    assert outs[0] == outs[1]
