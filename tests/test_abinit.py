"""``distdrgn abinit`` and ``train model.pose_refine=true`` from the CLI: the search finds the
poses, refinement moves perturbed poses toward the truth, the found poses go back out through
``store export``, and two processes under torchrun survive a killed worker exactly (refined poses
and an autodecoder's z rows both).

Data: a noise-free homogeneous simulation at D = 24 (256 images), ingested three times: with
the true poses, with poses perturbed by 5 degrees and 1 pixel (rms), and without poses.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distdrgn.analysis.latent import load_z
from distdrgn.cli import main as cli
from distdrgn.formats.poses import load_poses
from distdrgn.so3_grid import angle_between, so3_exp

REPO = Path(__file__).resolve().parents[1]
D, N = 24, 256
MODEL = {"model.zdim": 0, "model.dec_dim": 64, "model.dec_layers": 2, "train.batch_size": 16, "train.lr": 1e-3,
         "train.device": "cpu", "train.analyze": False, "train.log_every": 1000}
# a search that runs in seconds per epoch at D = 24 (the defaults are for D >= 64)
SEARCH = {"abinit.base_rotations": 1152, "abinit.levels": 4, "abinit.keep": 8, "abinit.shift_extent_px": 4,
          "abinit.shift_step_px": 1, "abinit.radius_start": 10, "abinit.radius_end": 10}


def args(**settings) -> list[str]:
    return [f"{k}={'null' if v is None else v}" for k, v in {**MODEL, **settings}.items()]


def rotation_errors_deg(found: np.ndarray, true: np.ndarray) -> np.ndarray:
    return np.degrees(angle_between(torch.from_numpy(found).double(), torch.from_numpy(true).double()).numpy())


def shift_errors_px(found: np.ndarray, true: np.ndarray) -> np.ndarray:
    return np.linalg.norm((found - true) * D, axis=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    from distdrgn.simulate import simulate
    from distdrgn.store import ingest

    root = tmp_path_factory.mktemp("abinit")
    paths = simulate(root / "sim", n=N, D=D, snr=float("inf"), dist="homogeneous", seed=0, progress=False,
                     write_volumes=False)
    rots, trans = load_poses(paths["poses.pkl"])
    rng = np.random.default_rng(1)
    w = rng.normal(size=(N, 3)) * np.radians(5.0) / np.sqrt(3)  # 5 degrees rms
    perturbed = (torch.from_numpy(rots).double() @ so3_exp(torch.from_numpy(w))).float().numpy()
    shifted = (trans + rng.normal(size=trans.shape) / np.sqrt(2) / D).astype(np.float32)  # 1 pixel rms
    with open(root / "perturbed.pkl", "wb") as f:
        pickle.dump((perturbed, shifted), f)
    chunk = {"target_chunk_bytes": D * D * 4 * 64}
    stores = {name: ingest(paths["particles.mrcs"], root / name, poses=poses, ctf=paths["ctf.pkl"], progress=False,
                           layout_overrides=chunk)
              for name, poses in (("true", paths["poses.pkl"]), ("perturbed", root / "perturbed.pkl"),
                                  ("no_poses", None))}
    # a map in the frame of the true poses, for the search to find them against
    assert cli(["train", *args(**{"data.store": stores["true"], "output.dir": root / "map", "train.epochs": 16,
                                   "train.lr": 2e-3})]) == 0
    return {"root": root, "rots": rots, "trans": trans, "perturbed_poses": (perturbed, shifted),
            "star": paths["particles.star"], "map": root / "map" / "weights.pkl", **stores}


def test_abinit_finds_the_poses_against_a_map_and_exports_them(data, tmp_path, capsys):
    run = tmp_path / "run"
    rc = cli(["abinit", *args(**{"data.store": data["no_poses"], "output.dir": run, "train.epochs": 3,
                                 "train.load": data["map"], "abinit.search_epochs": 2, "abinit.local_search": True,
                                 "abinit.refine": False, **SEARCH})])
    assert rc == 0
    searched = load_poses(run / "poses.2.pkl")
    assert searched[0].shape == (N, 3, 3) and (run / "poses.1.pkl").exists() and (run / "weights.2.pkl").exists()
    rot_err, shift_err = rotation_errors_deg(searched[0], data["rots"]), shift_errors_px(searched[1], data["trans"])
    # random poses are ~126 degrees off; against the map the search finds them to a few degrees
    assert np.median(rot_err) < 8 and np.percentile(rot_err, 90) < 30, np.percentile(rot_err, [50, 90])
    assert np.median(shift_err) < 0.5, np.median(shift_err)
    log = (run / "run.log").read_text()
    assert "searching poses (1152 rotations x 81 shifts, 4 levels, keep 8) within radius 10.0" in log
    # epoch 3 searches again near each pose (abinit.local_search), in finer cells than the global search's last
    assert "epoch 3: searching poses locally (a 8 degree cell, 4 levels, keep 8) within radius 10.0\n" in log
    rots, trans = load_poses(run / "poses.pkl")
    local_err = rotation_errors_deg(rots, data["rots"])
    # measured: median 3.7 -> 3.2 degrees, p90 9.0 -> 7.2
    assert np.median(local_err) < np.median(rot_err), (np.median(rot_err), np.median(local_err))
    # the found poses back out to RELION: the exported star parses to them
    from distdrgn.formats.poses import parse_poses

    out = tmp_path / "found.star"
    assert cli(["store", "export", str(data["no_poses"]), "-o", str(out), "--new-stack", "--poses",
                str(run / "poses.pkl"), "--no-progress"]) == 0
    star_rots, star_trans = parse_poses(out, D=None)
    np.testing.assert_allclose(star_rots, rots, atol=1e-5)
    np.testing.assert_allclose(star_trans, trans, atol=1e-6)
    # eval-vol reads the result like any run
    assert cli(["eval-vol", str(run), "-o", str(tmp_path / "vol")]) == 0


def test_attempts_run_each_seed_and_the_run_continues_from_the_lowest_loss(data, tmp_path, capsys):
    """``abinit.attempts=2``: two one-epoch searches (train.seed 5 and 6) in attempts/K, then
    the run from the weights of the one whose loss is lower; the same command again resumes
    (here: finds everything done)."""
    from distdrgn.attempts import final_loss

    run = tmp_path / "run"
    command = ["abinit", *args(**{"data.store": data["no_poses"], "output.dir": run, "train.epochs": 2,
                                  "train.seed": 5, "abinit.search_epochs": 1, "abinit.attempts": 2,
                                  "abinit.attempt_epochs": 1, **SEARCH})]
    assert cli(command) == 0
    losses = [final_loss(run / "attempts" / str(k)) for k in (0, 1)]
    assert losses[0] != losses[1]  # different seeds, different searches
    best = int(np.argmin(losses))
    chosen = json.loads((run / "attempts" / "chosen.json").read_text())
    assert chosen["chosen"] == best and chosen["seeds"] == [5, 6] and chosen["losses"] == losses
    for k in (0, 1):
        assert (run / "attempts" / str(k) / "weights.pkl").exists() and (run / "attempts" / str(k) / "poses.1.pkl").exists()
        assert f"seed: {5 + k}" in (run / "attempts" / str(k) / "config.yaml").read_text()
    log = (run / "run.log").read_text()
    assert f"continuing from attempt {best} (train.seed {5 + best})" in log
    assert f"started from the weights of {run / 'attempts' / str(best) / 'weights.pkl'}" in log
    assert (run / "poses.2.pkl").exists() and (run / "weights.pkl").exists()
    # again: the attempts and the run are complete, nothing is trained twice
    before = (run / "weights.pkl").read_bytes()
    assert cli(command) == 0
    assert (run / "weights.pkl").read_bytes() == before
    assert (run / "run.log").read_text().count("nothing to do") == 1
    assert "nothing to do" in (run / "attempts" / "0" / "run.log").read_text()


def test_pose_refinement_moves_perturbed_poses_toward_the_truth(data, tmp_path):
    run = tmp_path / "run"
    rc = cli(["train", *args(**{"data.store": data["perturbed"], "output.dir": run, "train.epochs": 12,
                                "train.lr": 2e-3, "model.pose_refine": True, "model.pose_warmup_epochs": 2})])
    assert rc == 0
    start_rot = np.median(rotation_errors_deg(data["perturbed_poses"][0], data["rots"]))
    start_shift = np.median(shift_errors_px(data["perturbed_poses"][1], data["trans"]))
    rots, trans = load_poses(run / "poses.pkl")
    warm_rots, _ = load_poses(run / "poses.2.pkl")
    np.testing.assert_array_equal(warm_rots, data["perturbed_poses"][0])  # the warm-up epochs keep the store's poses
    end_rot = np.median(rotation_errors_deg(rots, data["rots"]))
    end_shift = np.median(shift_errors_px(trans, data["trans"]))
    assert end_rot < 0.85 * start_rot, (start_rot, end_rot)  # measured: 4.3 -> ~2.8-3.6 degrees
    assert end_shift < 0.6 * start_shift, (start_shift, end_shift)  # measured: 0.87 -> ~0.3 px
    # the pose state of the newest checkpoints only
    assert len(list((run / "pose_state").iterdir())) <= 4
    # a refined run resumes only as one: continuing its directory without refinement is refused
    rc = cli(["train", *args(**{"data.store": data["perturbed"], "output.dir": run, "train.epochs": 13})])
    assert rc == 2


def test_a_store_without_poses_is_refused_by_train_and_pose_refine(data, tmp_path, capsys):
    for extra in ({}, {"model.pose_refine": True}):
        rc = cli(["train", *args(**{"data.store": data["no_poses"], "output.dir": tmp_path / "r", **extra})])
        assert rc == 2
        assert "distdrgn abinit" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Two processes under torchrun, a killed worker
# ---------------------------------------------------------------------------------------


def torchrun(cmd_args: list[str], log: Path, max_restarts: int = 0, module: str = "distdrgn.train") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(max_restarts), "-m", module, *cmd_args]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=open(log, "a"), start_new_session=True)


def trace_heads(trace: Path) -> list[dict]:
    heads = []
    for f in trace.glob("samples.*.jsonl"):
        lines = f.read_text().splitlines()
        if lines and lines[0].endswith("}"):
            head = json.loads(lines[0])
            head["steps"] = sum(1 for line in lines[1:] if line.endswith("}"))
            heads.append(head)
    return heads


def test_pose_refinement_and_an_autodecoder_under_torchrun_resume_exactly_after_a_killed_worker(data, tmp_path):
    # both kinds of per-particle state at once: refined poses and an autodecoder's z rows
    settings = {"data.store": data["perturbed"], "train.epochs": 3, "model.pose_refine": True,
                "model.pose_warmup_epochs": 1, "train.checkpoint_every_steps": 2, "train.num_workers": 0,
                "model.zdim": 2, "model.encoder": "autodecoder"}
    plain = tmp_path / "plain"
    proc = torchrun(args(**settings, **{"output.dir": plain}), tmp_path / "plain.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "plain.log").read_text()[-3000:]

    killed, trace = tmp_path / "killed", tmp_path / "trace"
    proc = torchrun(args(**settings, **{"output.dir": killed, "debug.trace_samples": trace,
                                        "debug.step_delay_s": 0.05}), tmp_path / "killed.log", max_restarts=1)
    try:
        deadline = time.time() + 300
        while True:  # kill one worker of the first attempt once it is inside the second (refining) epoch
            heads = [h for h in trace_heads(trace) if h["restart"] == 0] if trace.is_dir() else []
            if len(heads) == 2 and min(h["steps"] for h in heads) >= 8 + 3:  # 8 steps per epoch and rank
                os.kill(heads[1]["pid"], signal.SIGKILL)
                break
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.02)
        assert proc.wait(timeout=300) == 0, (tmp_path / "killed.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    resumed = [h for h in trace_heads(trace) if h["restart"] == 1]
    assert len(resumed) == 2 and all(tuple(h["resume"]) > (2, 0) for h in resumed), resumed
    # the resumed run ends where the uninterrupted one does, bit for bit
    for name in ("poses.pkl", "poses.2.pkl"):
        a, b = load_poses(plain / name), load_poses(killed / name)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(load_z(plain / "z.pkl"), load_z(killed / "z.pkl"))
    assert not np.array_equal(load_z(plain / "z.1.pkl"), load_z(plain / "z.pkl"))  # the z rows were trained
    wa = torch.load(plain / "weights.pkl", weights_only=False)["model_state_dict"]
    wb = torch.load(killed / "weights.pkl", weights_only=False)["model_state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_abinit_under_torchrun_two_processes(data, tmp_path):
    run = tmp_path / "run"
    proc = torchrun(args(**{"data.store": data["no_poses"], "output.dir": run, "train.epochs": 2,
                            "train.load": data["map"], "abinit.search_epochs": 1, "abinit.local_search": True,
                            "abinit.attempts": 2, "abinit.attempt_epochs": 1, **SEARCH}),
                    tmp_path / "log", module="distdrgn.abinit")
    assert proc.wait(timeout=300) == 0, (tmp_path / "log").read_text()[-3000:]
    rots, trans = load_poses(run / "poses.pkl")
    rot_err = rotation_errors_deg(rots, data["rots"])
    # every particle's pose was found by one of the two ranks and gathered through pose_state/
    assert np.percentile(rot_err, 90) < 30 and np.median(rot_err) < 10, np.percentile(rot_err, [50, 90])
    # epoch 2: each rank re-searches its own particles near their poses, then refines them
    log = (run / "run.log").read_text()
    assert "searching poses locally (a 8 degree cell, 4 levels, keep 8) within radius 10.0, then refining them " \
           "by gradient" in log
    # two attempts (both from the given map), each with 2 processes, then the run from the better one
    chosen = json.loads((run / "attempts" / "chosen.json").read_text())
    assert f"continuing from attempt {chosen['chosen']}" in log and "2 process(es)" in log
    assert "2 process(es)" in (run / "attempts" / "1" / "run.log").read_text()


def test_classes_under_torchrun_write_one_hot_classes_that_eval_vol_reads(data, tmp_path, capsys):
    """``abinit.classes=2`` with two processes: the decoder's z is each particle's one-hot
    class (config.yaml: zdim 2, an autodecoder table), chosen by the search with its pose and
    gathered from both ranks into z.pkl; eval-vol makes the class maps from it. A continuous
    zdim with classes is refused."""
    run = tmp_path / "run"
    proc = torchrun(args(**{"data.store": data["no_poses"], "output.dir": run, "train.epochs": 2,
                            "abinit.search_epochs": 1, "abinit.classes": 2, **SEARCH}),
                    tmp_path / "log", module="distdrgn.abinit")
    assert proc.wait(timeout=300) == 0, (tmp_path / "log").read_text()[-3000:]
    config = (run / "config.yaml").read_text()
    assert "zdim: 2" in config and "encoder: autodecoder" in config and "classes: 2" in config
    z = load_z(run / "z.pkl")
    assert z.shape == (N, 2) and set(np.unique(z)) == {0.0, 1.0} and (z.sum(1) == 1).all()
    assert np.array_equal(z, load_z(run / "z.1.pkl"))  # classes change only while searching
    assert 0 < z[:, 0].sum() < N, z.sum(0)  # rows from both ranks; both classes took images
    assert load_poses(run / "poses.pkl")[0].shape == (N, 3, 3)
    assert "2 process(es)" in (run / "run.log").read_text()
    assert cli(["eval-vol", str(run), "-z", "1", "0", "0", "1", "-o", str(tmp_path / "classes")]) == 0
    assert len(list((tmp_path / "classes").glob("*.mrc"))) == 2
    capsys.readouterr()
    assert cli(["abinit", *args(**{"data.store": data["no_poses"], "output.dir": tmp_path / "bad", "model.zdim": 3,
                                   "abinit.classes": 2, **SEARCH})]) != 0
    assert "abinit.classes=2 reconstructs 2 homogeneous maps: it needs model.zdim=0" in capsys.readouterr().err


def test_heterogeneous_abinit_finds_the_poses_and_writes_latents(data, tmp_path):
    """zdim > 0: each image's candidates are decoded with its own z (the encoder's mean). The
    images are of one state, so this checks the per-image search path, not the latents' use."""
    from distdrgn.checkpoint import load_z

    het = {"model.zdim": 2, "model.enc_dim": 64, "model.enc_layers": 2}
    assert cli(["train", *args(**{"data.store": data["true"], "output.dir": tmp_path / "map", "train.epochs": 16,
                                  "train.lr": 2e-3, **het})]) == 0
    run = tmp_path / "run"
    rc = cli(["abinit", *args(**{"data.store": data["no_poses"], "output.dir": run, "train.epochs": 1,
                                 "train.load": tmp_path / "map" / "weights.pkl", "abinit.search_epochs": 1,
                                 **SEARCH, "abinit.base_rotations": 576, "abinit.radius_start": 6,
                                 "abinit.radius_end": 6, **het})])
    assert rc == 0
    rots, _ = load_poses(run / "poses.pkl")
    rot_err = rotation_errors_deg(rots, data["rots"])
    assert np.median(rot_err) < 12, np.percentile(rot_err, [50, 90])
    z_mu, _ = load_z(run / "z.pkl")
    assert z_mu.shape == (N, 2) and np.isfinite(z_mu).all()


def test_abinit_from_nothing_finds_the_poses(tmp_path):
    """Ab initio from a store without poses and no map: 384 noise-free images, 24 search epochs.

    Without the support prior (``abinit.support_weight=0``) this dataset's map collapsed with
    train.seed 3, 4 and 5 of 0-7; with it every seed found the poses (benchmarks/RESULTS.md).
    """
    from distdrgn.pose_error import align_rotations
    from distdrgn.simulate import simulate
    from distdrgn.store import ingest

    n = 384
    paths = simulate(tmp_path / "sim", n=n, D=D, snr=float("inf"), dist="homogeneous", seed=0, progress=False,
                     write_volumes=False)
    store = ingest(paths["particles.mrcs"], tmp_path / "no_poses", poses=None, ctf=paths["ctf.pkl"], progress=False,
                   layout_overrides={"target_chunk_bytes": D * D * 4 * 64})
    run = tmp_path / "run"
    assert cli(["abinit", *args(**{"data.store": store, "output.dir": run, "train.batch_size": 8, "train.epochs": 24,
                                   "abinit.search_epochs": 24, **SEARCH, "abinit.radius_start": 6,
                                   "abinit.radius_end": 10})]) == 0
    assert "support prior 1 outside 0.38 box" in (run / "run.log").read_text()
    found = load_poses(run / "poses.pkl")[0]
    true = load_poses(paths["poses.pkl"])[0]
    # the map's frame is its own: compare after the best global rotation (and hand)
    errors = align_rotations(torch.from_numpy(found).double(), torch.from_numpy(true).double()).errors_deg.numpy()
    # measured with seeds 0-7: median 2.6-4.6, p90 9-14 degrees; unrelated poses: ~120 and ~170
    assert np.median(errors) < 10 and np.percentile(errors, 90) < 30, np.percentile(errors, [50, 90])
