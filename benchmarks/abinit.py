"""Unknown and imperfect poses on simulated data with ground truth: ``distdrgn abinit`` and
``train model.pose_refine=true``. Prints a table and writes JSON.

    python benchmarks/abinit.py --cases refine abinit search-cost --out benchmarks/abinit.json

Cases:
- ``refine``: one homogeneous dataset trained three times for the same epochs: on the true
  poses, on poses perturbed by ``--perturb-deg`` degrees and ``--perturb-px`` pixels (rms), and
  on the perturbed poses with pose refinement. Reports the pose errors and the FSC of each map
  against the ground-truth volume (AUC up to Nyquist, 0.5 and 0.143 crossings), and the share
  of the perturbed-to-true FSC gap that refinement closes.
- ``refine-versus-cryodrgn``: the ``refine`` data and epochs in cryoDRGN 4.3.1's ``train_nn``
  (``--cryodrgn PATH``), with and without ``--do-pose-sgd``, at its default learning rates and
  at distdrgn's model rate: the same pose errors, FSC and share of the gap closed.
- ``abinit``: ab initio from a store without poses: rotation error after the best global
  rotation and hand (``distdrgn.pose_error``), shift error after the best 3D offset, and the FSC
  of the map (rotated into the ground truth's frame) against the ground truth.
- ``versus-cryodrgn``: the ``abinit`` dataset reconstructed ab initio by distdrgn and by
  cryoDRGN 4.3.1's ``cryodrgn abinit`` (``--cryodrgn PATH``: its executable, e.g. in a separate
  venv) with the same schedule (``--search-epochs`` of pose search, then ``--refine-epochs`` of
  gradient updates of the poses), search grid (``--base-rotations``, 4,608 = cryoDRGN's
  ``--base-healpy 2``, 576 = ``--base-healpy 1``; shifts +-4 px on a 1 px grid, 8 kept, 4
  levels), frequency marching and decoder (2 x 64), each with its own batch sizes. The two
  tools run side by side, started together (cryoDRGN with ``--cryodrgn-threads``, distdrgn
  with the benchmark's own threads: set ``OMP_NUM_THREADS``). The same pose-error and FSC
  measures for both, and seconds per epoch.
- ``hinge``: the continuous hinge (``simulate --dist uniform``), heterogeneous (zdim
  ``--hinge-zdim``, z from the encoder or ``--hinge-encoder autodecoder``): ab initio against fixed-pose training on the true poses, for the same
  epochs. Pose errors, PC1 |Spearman| of z against the true conformation and the per-image FSC
  AUC of volumes decoded at each image's z (as ``benchmarks/quality.py`` measures; the ab
  initio volumes rotated into the ground truth's frame first). Also the two-stage route (a
  homogeneous ab initio, then heterogeneous training with pose refinement on its poses), and
  with ``--hinge-classes K`` the same from a K-class ab initio (``abinit.classes``).
- ``hinge-versus-cryodrgn``: the hinge images in cryoDRGN 4.3.1's ``cryodrgn abinit --zdim``
  (its conformation table), with the hinge case's schedule and grid (``--base-rotations``, one
  of cryoDRGN's), scored as the hinge rows are (its volumes from its own ``eval_vol``).
- ``seeds``: ab initio from nothing on a small dataset (``--n``, every one of
  ``--search-epochs`` a search epoch), once per ``--seeds`` and ``--support-weights``: the
  rotation error and pairwise-angle correlation after each epoch.
- ``search-cost``: seconds per batch of the pose search phase and images/s, against the box D
  and the number of candidates kept.
Seconds per epoch come from each run's loss.csv (distdrgn) or run.log (cryoDRGN).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

MODEL = {"model.zdim": 0, "model.dec_dim": 64, "model.dec_layers": 2, "train.batch_size": 16, "train.lr": 2e-3,
         "train.device": "cpu", "train.analyze": False, "train.log_every": 1000}


def overrides(settings: dict) -> list[str]:
    return [f"{k}={v}" for k, v in {**MODEL, **settings}.items()]


def run_cli(argv: list[str]) -> None:
    from distdrgn.cli import main

    if main(argv) != 0:
        raise SystemExit(f"failed: distdrgn {' '.join(map(str, argv))}")


def epoch_seconds(run: Path) -> list[float]:
    with open(run / "loss.csv") as f:
        return [float(r["seconds"]) for r in csv.DictReader(f)]


def fsc_summary(vol: np.ndarray, truth: np.ndarray) -> dict:
    from distdrgn.analysis.validation import fsc_auc
    from distdrgn.projection import fsc, fsc_resolution

    freqs, curve = fsc(vol, truth)
    return {"auc": fsc_auc(freqs, curve), "fsc05_px": 1 / fsc_resolution(freqs, curve, 0.5),
            "fsc0143_px": 1 / fsc_resolution(freqs, curve, 0.143)}


def map_of(run: Path) -> np.ndarray:
    from distdrgn.volumes import eval_volume, load_model

    return eval_volume(load_model(run), None, device="cpu")


def rotate_volume(vol: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """v'(x) = v(x @ frame) for row vectors x = (x, y, z) about the box centre; vol is [z, y, x]."""
    from scipy.ndimage import affine_transform

    D = vol.shape[0]
    rev = np.eye(3)[::-1]  # (x, y, z) <-> (z, y, x)
    matrix = rev @ frame.T @ rev
    centre = np.full(3, D // 2, dtype=np.float64)
    return affine_transform(vol, matrix, offset=centre - matrix @ centre, order=1)


def pairwise_angle_correlation(found: np.ndarray, true: np.ndarray, pairs: int = 5000) -> float:
    """Pearson correlation of the angles between random pairs of poses, found against true: the
    same whatever the global rotation (left or right), hand or R / R^T convention of either
    set, so it says whether poses were found without assuming how a tool writes them (~0 for
    random poses, 1 for exact ones)."""
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(true), pairs), rng.integers(0, len(true), pairs)

    def angles(R):
        cos = (np.einsum("nki,nki->n", R[i].astype(np.float64), R[j].astype(np.float64)) - 1) / 2  # tr(Ri^T Rj)
        return np.arccos(np.clip(cos, -1, 1))

    return float(np.corrcoef(angles(found), angles(true))[0, 1])


def pose_errors(found, true, D) -> dict:
    from distdrgn.pose_error import align_rotations, shift_errors, summary

    aligned = align_rotations(torch.from_numpy(found[0]).double(), torch.from_numpy(true[0]).double())
    shifts = shift_errors(torch.from_numpy(found[1]).double() * D, torch.from_numpy(true[1]).double() * D,
                          torch.from_numpy(found[0]).double())
    return {"rotation_deg": summary(aligned.errors_deg), "shift_px": summary(shifts),
            "pairwise_angle_corr": pairwise_angle_correlation(found[0], true[0]), "flipped": aligned.flipped,
            "side": aligned.side, "transform": aligned.transform.numpy()}


def hinge_errors_by_subunit(found_rots: np.ndarray, true_rots: np.ndarray, subunit: np.ndarray) -> dict:
    """Rotation errors of the hinge images with and without the subunit, and for those without it
    also modulo the particle's near mirror symmetry (median / p90 / fraction under 10 degrees).

    Without its subunit the simulated particle (distdrgn/atoms.py: core and arm centred on z = 0,
    the hinge axis 11 degrees off z) is nearly its own mirror image through z = 0 (volume
    correlation 0.955-0.995 at D = 24, 0.89-0.95 at D = 48), so its images hardly tell a pose R from
    F R F (F = diag(1, 1, -1)): for V(F x) = V(x) the slice at ``k @ R`` equals the slice at
    ``k @ F R F``, as for the hand flip in distdrgn/pose_error.py, with the same shift. For those
    images the smaller of the two errors is the one the data can decide.
    """
    from distdrgn.pose_error import FLIP, align_rotations
    from distdrgn.so3_grid import angle_between

    true = torch.from_numpy(true_rots).double()
    aligned = align_rotations(torch.from_numpy(found_rots).double(), true)
    err = aligned.errors_deg.numpy()
    mirrored = np.degrees(angle_between(aligned.rotations, FLIP @ true @ FLIP).numpy())

    def stats(e: np.ndarray) -> dict:
        return {"median": float(np.median(e)), "p90": float(np.percentile(e, 90)), "under_10": float(np.mean(e < 10))}

    without = ~subunit
    return {"with_subunit": stats(err[subunit]), "without_subunit": stats(err[without]),
            "without_subunit_mirror_modulo": stats(np.minimum(err, mirrored)[without]),
            "all_mirror_modulo": stats(np.where(without, np.minimum(err, mirrored), err))}


def simulate_stores(root: Path, n: int, D: int, snr: float, perturb_deg: float, perturb_px: float) -> dict:
    from distdrgn.formats.poses import load_poses
    from distdrgn.simulate import ground_truth_volume, simulate
    from distdrgn.so3_grid import so3_exp
    from distdrgn.store import ingest

    paths = simulate(root / "sim", n=n, D=D, snr=snr, dist="homogeneous", seed=0, progress=False,
                     write_volumes=False, force=True)
    rots, trans = load_poses(paths["poses.pkl"])
    rng = np.random.default_rng(1)
    w = rng.normal(size=(n, 3)) * np.radians(perturb_deg) / np.sqrt(3)
    perturbed = ((torch.from_numpy(rots).double() @ so3_exp(torch.from_numpy(w))).float().numpy(),
                 (trans + rng.normal(size=trans.shape) * perturb_px / np.sqrt(2) / D).astype(np.float32))
    with open(root / "perturbed.pkl", "wb") as f:
        pickle.dump(perturbed, f)
    stores = {}
    for name, poses in (("true", paths["poses.pkl"]), ("perturbed", root / "perturbed.pkl"), ("none", None)):
        if not (root / name).exists():
            ingest(paths["particles.mrcs"], root / name, poses=poses, ctf=paths["ctf.pkl"], progress=False)
        stores[name] = root / name
    return {"stores": stores, "true": (rots, trans), "perturbed": perturbed,
            "truth": ground_truth_volume(0.5, True, D)}


def case_refine(args, root: Path) -> dict:
    from distdrgn.formats.poses import load_poses

    data = simulate_stores(root / "refine", args.n, args.D, args.snr, args.perturb_deg, args.perturb_px)
    runs = {"true poses": ("true", {}), "perturbed": ("perturbed", {}),
            "perturbed + pose_refine": ("perturbed", {"model.pose_refine": True, "model.pose_warmup_epochs": 2,
                                                       **({"model.pose_lr_rot": args.pose_lr_rot}
                                                          if args.pose_lr_rot is not None else {})})}
    out = {}
    for label, (store, extra) in runs.items():
        # not the store's own name: a run directory in the store is refused
        run = root / "refine" / ("run_" + label.replace(" ", "_").replace("+", "plus"))
        if "pose_refine" in label and args.pose_lr_rot is not None:
            run = run.with_name(f"{run.name}_lr{args.pose_lr_rot:g}")
        if not (run / "weights.pkl").exists():
            run_cli(["train", *overrides({"data.store": data["stores"][store], "output.dir": run,
                                          "train.epochs": args.epochs, **extra})])
        poses = load_poses(run / "poses.pkl") if (run / "poses.pkl").exists() else data[store]
        errs = pose_errors(poses, data["true"], args.D)
        errs.pop("transform")
        out[label] = {"fsc": fsc_summary(map_of(run), data["truth"]), "poses": errs,
                      "seconds_per_epoch": float(np.median(epoch_seconds(run)))}
    t, p, r = (out[k]["fsc"]["auc"] for k in runs)
    out["gap_closed"] = (r - p) / (t - p) if t != p else float("nan")
    return out


def case_refine_versus_cryodrgn(args, root: Path) -> dict:
    """The ``refine`` data and epochs trained by cryoDRGN 4.3.1's ``train_nn`` (homogeneous, a
    2 x 64 decoder, batch 16, ``--domain hartley``, which its pose SGD requires): on the true
    poses, on the perturbed ones, and on the perturbed
    ones with ``--do-pose-sgd`` (``--pretrain`` = distdrgn's 2 warm-up epochs), at cryoDRGN's
    default learning rates (1e-4 for the model and the poses), at distdrgn's model rate (2e-3),
    and at that with ``--pose-lr 1e-3``; the share of cryoDRGN's own true-to-perturbed FSC gap
    each closes.

    ``--checkpoint 0``: only the final weights, map and poses are written. On the CPU cryoDRGN
    4.3.1's ``PoseTracker.save`` divides the shift embedding itself by D (``t =
    weight.data.cpu().numpy(); t /= D``: ``.cpu()`` of a CPU tensor is the tensor, and numpy
    shares its memory), so each per-epoch checkpoint shrinks the shifts being trained D-fold
    (seen: mean |t| 0.072 -> 0.0029 -> 0.00012 box over epochs 3-5 at D = 24); saved once, at
    the end, they are divided once, after training. (On a GPU `.cpu()` copies: no harm there.)
    """
    import subprocess

    from distdrgn.formats.mrc import read_volume

    if args.cryodrgn is None:
        raise SystemExit("refine-versus-cryodrgn needs --cryodrgn PATH (the cryodrgn executable of cryoDRGN 4.3.1)")
    data = simulate_stores(root / "refine", args.n, args.D, args.snr, args.perturb_deg, args.perturb_px)
    sim = root / "refine" / "sim"
    runs = {"true poses": ("true", [], 1e-4), "perturbed": ("perturbed", [], 1e-4),
            "perturbed + --do-pose-sgd": ("perturbed", ["--do-pose-sgd", "--pretrain", 2], 1e-4),
            "true poses, lr 2e-3": ("true", [], 2e-3), "perturbed, lr 2e-3": ("perturbed", [], 2e-3),
            "perturbed + --do-pose-sgd, lr 2e-3": ("perturbed", ["--do-pose-sgd", "--pretrain", 2], 2e-3),
            "perturbed + --do-pose-sgd, lr 2e-3, --pose-lr 1e-3": ("perturbed", ["--do-pose-sgd", "--pretrain", 2,
                                                                                 "--pose-lr", 1e-3], 2e-3)}
    poses_file = {"true": sim / "poses.pkl", "perturbed": root / "refine" / "perturbed.pkl"}
    out = {}
    for label, (poses, extra, lr) in runs.items():
        run = root / "refine" / ("cryodrgn_" + label.replace(" ", "_").replace("+", "plus").replace(",", ""))
        if not (run / "weights.pkl").exists():
            cmd = [args.cryodrgn, "train_nn", sim / "particles.mrcs", "--poses", poses_file[poses], "--ctf",
                   sim / "ctf.pkl", "-o", run, "-n", args.epochs, "-b", 16, "--lr", lr, "--layers", 2, "--dim", 64,
                   "--domain", "hartley", "--seed", 0, "--no-amp", "--checkpoint", 0, *extra]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.cryodrgn_threads)}
            with open(run.with_name(run.name + ".stdout"), "w") as log:
                if subprocess.run([str(c) for c in cmd], env=env, stdout=log, stderr=subprocess.STDOUT).returncode:
                    raise SystemExit(f"cryodrgn train_nn failed; see {log.name}")
        vol = read_volume(run / "reconstruct.mrc")[0].astype(np.float32)
        row = {"fsc": fsc_summary(vol, data["truth"]), "seconds_per_epoch": cryodrgn_epoch_seconds(run / "run.log")}
        if "--do-pose-sgd" in extra:
            with open(run / "pose.pkl", "rb") as f:
                rots, trans = (np.asarray(a, np.float32) for a in pickle.load(f))
            # its shifts' unit (box fraction or pixels) is checked against the truth, not assumed
            fits = {unit: pose_errors((rots, trans / scale), data["true"], args.D)
                    for unit, scale in (("box fraction", 1.0), ("pixels", args.D))}
            unit = min(fits, key=lambda u: fits[u]["shift_px"]["median"])
            row["poses"] = {**fits[unit], "shift_unit": unit}
        else:
            row["poses"] = pose_errors(data[poses], data["true"], args.D)
        row["poses"].pop("transform")
        out[label] = row
    for lr, refined in (("", ""), (", lr 2e-3", ", lr 2e-3"), (", lr 2e-3", ", lr 2e-3, --pose-lr 1e-3")):
        t, p = (out[k + lr]["fsc"]["auc"] for k in ("true poses", "perturbed"))
        r = out["perturbed + --do-pose-sgd" + refined]["fsc"]["auc"]
        out[f"gap_closed{refined}"] = (r - p) / (t - p) if t != p else float("nan")
    return out


def distdrgn_abinit(args, data: dict, run: Path, base_rotations: int) -> None:
    if (run / "weights.pkl").exists():
        return
    # small batches: ab initio needs many model updates per epoch (batch 32 did not converge)
    run_cli(["abinit", *overrides({"data.store": data["stores"]["none"], "output.dir": run,
                                   "train.batch_size": args.abinit_batch, "train.lr": args.abinit_lr,
                                   "train.epochs": args.search_epochs + args.refine_epochs,
                                   "abinit.search_epochs": args.search_epochs, "abinit.base_rotations": base_rotations,
                                   "abinit.keep": 8, "abinit.shift_extent_px": 4, "abinit.shift_step_px": 1,
                                   "abinit.radius_start": args.radius_start, "abinit.radius_end": args.D * 5 // 12,
                                   "abinit.local_search": args.local_search})])


def evaluate_abinit(poses, vol: np.ndarray, data: dict, D: int) -> dict:
    """Pose errors after the best global alignment, and the FSC of ``vol`` rotated into the
    ground truth's frame: V_true(p) = V_found(p G^T) (F G^T with the hand flipped)."""
    from distdrgn.pose_error import FLIP

    errs = pose_errors(poses, data["true"], D)
    G = errs.pop("transform")
    frame = G.T @ FLIP.numpy() if errs["flipped"] else G.T
    fscs = [fsc_summary(rotate_volume(vol, m), data["truth"]) for m in (frame, frame.T)]
    return {"poses": errs, "fsc": max(fscs, key=lambda f: f["auc"])}


def case_abinit(args, root: Path) -> dict:
    from distdrgn.formats.poses import load_poses

    data = simulate_stores(root / "abinit", args.n, args.D, args.snr, args.perturb_deg, args.perturb_px)
    run = root / "abinit" / ("run_local" if args.local_search else "run")
    distdrgn_abinit(args, data, run, base_rotations=1152)
    return {**evaluate_abinit(load_poses(run / "poses.pkl"), map_of(run), data, args.D),
            "seconds_per_epoch": epoch_seconds(run)}


def cryodrgn_epoch_seconds(log: Path) -> list[float]:
    """Seconds of each epoch from a cryoDRGN run.log: 'Epoch: N finished in H:MM:SS.ffffff' (abinit),
    'Epoch: N Average loss = L; Finished in H:MM:SS.ffffff' (train_nn)."""
    import re

    out = []
    pattern = r"Epoch: \d+ (?:Average loss = \S+; )?finished in (\d+):(\d+):([\d.]+)"
    for m in re.finditer(pattern, log.read_text(), flags=re.IGNORECASE):
        h, mi, sec = m.groups()
        out.append(int(h) * 3600 + int(mi) * 60 + float(sec))
    return out


def cryodrgn_healpy(base_rotations: int) -> int:
    """cryoDRGN's ``--base-healpy`` for a base grid of ``base_rotations``: its grid is
    HEALPix-based, 576 rotations at --base-healpy 1, x8 per level above."""
    healpy = {576 * 8**k: k + 1 for k in range(3)}.get(base_rotations)
    if healpy is None:
        raise SystemExit(f"--base-rotations must be one of cryoDRGN's grids (576, 4608, 36864), got {base_rotations}")
    return healpy


def cryodrgn_abinit_command(args, sim: Path, out: Path, zdim: int, *extra) -> list[str]:
    """``cryodrgn abinit`` on ``sim``'s particles with the benchmark's schedule and search
    (``--search-epochs`` + ``--refine-epochs``, radius ``--radius-start`` -> 5D/12, shifts +-4 px
    on a 1 px grid, keep 8, 4 levels, ``--base-rotations``), a 2 x 64 decoder, then ``extra``."""
    cmd = [args.cryodrgn, "abinit", sim / "particles.mrcs", "--ctf", sim / "ctf.pkl", "-o", out, "--zdim", zdim,
           "--num-epochs", args.search_epochs + args.refine_epochs, "--epochs-pose-search", args.search_epochs,
           "--layers", 2, "--dim", 64, "--l-start", int(args.radius_start), "--l-end", args.D * 5 // 12,
           "--t-extent", 4, "--t-ngrid", 9, "--nkeptposes", 8, "--niter", 4,
           "--base-healpy", cryodrgn_healpy(args.base_rotations), "--seed", 0, "--no-amp", "--num-workers", 0,
           "--max-threads", args.cryodrgn_threads, *extra]
    return [str(c) for c in cmd]


def cryodrgn_abinit_poses(path: Path, true, D: int) -> tuple[tuple[np.ndarray, np.ndarray], bool, int]:
    """A cryoDRGN abinit ``pose.N.pkl`` as distdrgn poses (rots, trans in box fractions), with
    the rotation convention (R or R^T: ``transposed``) and shift sign that fit ``true`` best
    (by median rotation, then shift error): cryoDRGN abinit writes its shifts in pixels, and its
    conventions are checked against the ground truth, not assumed. -> (poses, transposed, sign)."""
    with open(path, "rb") as f:
        rots, trans_px = (np.asarray(a, np.float32) for a in pickle.load(f))
    trans = trans_px / D
    read = {(t, sign): (rots.transpose(0, 2, 1) if t else rots, sign * trans) for t in (False, True) for sign in (1, -1)}
    errors = {k: pose_errors(poses, true, D) for k, poses in read.items()}
    t, sign = min(errors, key=lambda k: (errors[k]["rotation_deg"]["median"], errors[k]["shift_px"]["median"]))
    return read[t, sign], t, sign


def case_versus_cryodrgn(args, root: Path) -> dict:
    import subprocess

    from distdrgn.formats.mrc import read_volume
    from distdrgn.formats.poses import load_poses

    if args.cryodrgn is None:
        raise SystemExit("versus-cryodrgn needs --cryodrgn PATH (the cryodrgn executable of a cryoDRGN 4.3.1 install)")
    data = simulate_stores(root / "abinit", args.n, args.D, args.snr, args.perturb_deg, args.perturb_px)
    epochs = args.search_epochs + args.refine_epochs
    cryodrgn_healpy(args.base_rotations)  # one of its grids, before either tool starts
    grid = "" if args.base_rotations == 4608 else f"_b{args.base_rotations}"
    run = root / "abinit" / f"distdrgn_s{args.search_epochs}_e{epochs}{grid}{'_local' if args.local_search else ''}"
    cd = root / "abinit" / f"cryodrgn_s{args.search_epochs}_e{epochs}{grid}"
    sim = root / "abinit" / "sim"
    cryodrgn = None
    if not (cd / f"pose.{epochs}.pkl").exists():
        env = {**os.environ, "OMP_NUM_THREADS": str(args.cryodrgn_threads)}
        # side by side: both tools share the machine for the same stretch of time; its progress
        # lines go to stdout, not to its run.log
        with open(cd.with_name(cd.name + ".stdout"), "w") as log:
            cryodrgn = subprocess.Popen(cryodrgn_abinit_command(args, sim, cd, 0), env=env, stdout=log,
                                        stderr=subprocess.STDOUT)
    try:
        distdrgn_abinit(args, data, run, base_rotations=args.base_rotations)
    except BaseException:  # do not leave cryoDRGN running alone after the benchmark stopped
        if cryodrgn is not None:
            cryodrgn.terminate()
        raise
    out = {"base_rotations": args.base_rotations}
    out["distdrgn"] = {**evaluate_abinit(load_poses(run / "poses.pkl"), map_of(run), data, args.D),
                       "seconds_per_epoch": epoch_seconds(run)}
    if cryodrgn is not None and cryodrgn.wait() != 0:
        raise SystemExit(f"cryodrgn abinit failed (exit {cryodrgn.returncode}); its log: {cd / 'run.log'}")
    poses, transposed, sign = cryodrgn_abinit_poses(cd / f"pose.{epochs}.pkl", data["true"], args.D)
    vol = read_volume(cd / f"reconstruct.{epochs}.mrc")[0].astype(np.float32)
    out["cryodrgn"] = {**evaluate_abinit(poses, vol, data, args.D), "rotations_transposed": transposed,
                       "shift_sign": sign, "seconds_per_epoch": cryodrgn_epoch_seconds(cd / "run.log")}
    return out


def hinge_data(args, root: Path) -> dict:
    """The hinge simulation (``--dist uniform``), its stores with the true poses and without
    poses, and the images whose decoded volumes are compared with their ground truth."""
    from distdrgn.analysis.validation import mismatched_partners, stratified_indices
    from distdrgn.formats.poses import load_poses
    from distdrgn.simulate import load_ground_truth, simulate
    from distdrgn.store import ingest

    base = root / "hinge"
    paths = simulate(base / "sim", n=args.n, D=args.D, snr=args.snr, dist="uniform", seed=0, progress=False,
                     write_volumes=False, force=True)
    for name, poses in (("true", paths["poses.pkl"]), ("none", None)):
        if not (base / name).exists():
            ingest(paths["particles.mrcs"], base / name, poses=poses, ctf=paths["ctf.pkl"], progress=False)
    gt = load_ground_truth(base / "sim")
    idx = stratified_indices(gt.c, args.n_fsc)
    return {"base": base, "paths": paths, "gt": gt, "true": load_poses(paths["poses.pkl"]), "fsc_images": idx,
            "fsc_partners": mismatched_partners(len(idx), seed=1)}


def hinge_quality(found, vols: list[np.ndarray], hinge: dict, D: int) -> dict:
    """Pose errors of ``found`` ((rots, trans) or None for the true poses) and the per-image FSC
    AUC of ``vols`` (decoded at the z of each of ``hinge['fsc_images']``), rotated into the
    truth's frame by the found poses' global alignment."""
    from distdrgn.pose_error import FLIP
    from quality import fsc_metrics

    gt, idx = hinge["gt"], hinge["fsc_images"]
    row, frame = {}, np.eye(3)
    if found is not None:
        errs = pose_errors(found, hinge["true"], D)
        G = errs.pop("transform")
        frame = G.T @ FLIP.numpy() if errs["flipped"] else G.T
        row["poses"] = errs
        row["poses_by_subunit"] = hinge_errors_by_subunit(found[0], hinge["true"][0], gt.subunit)
        # the frame (or its inverse: which one the decoder's axes need) that fits the mean map best
        mean = np.mean(vols, axis=0)
        truth_mean = np.mean([gt.image_volume(int(i)) for i in idx], axis=0)
        frame = max((frame, frame.T), key=lambda m: fsc_summary(rotate_volume(mean, m), truth_mean)["auc"])
    fsc = fsc_metrics([rotate_volume(v, frame) for v in vols], idx, hinge["fsc_partners"], gt, gt.params.pixel_size)
    row["fsc_auc"] = {k: fsc[k]["auc"] for k in ("matched", "mismatched")}
    return row


def case_hinge(args, root: Path) -> dict:
    from distdrgn.analysis.latent import load_z
    from distdrgn.formats.poses import load_poses
    from distdrgn.store import ingest
    from distdrgn.volumes import eval_volume, load_model
    from quality import latent_metrics

    hinge = hinge_data(args, root)
    base, paths, gt = hinge["base"], hinge["paths"], hinge["gt"]
    het = {"model.zdim": args.hinge_zdim, "model.encoder": args.hinge_encoder, "model.enc_dim": 64,
           "model.enc_layers": 2,
           "train.batch_size": args.abinit_batch, "train.lr": args.abinit_lr,
           "train.epochs": args.search_epochs + args.refine_epochs}
    search = {"abinit.search_epochs": args.search_epochs, "abinit.base_rotations": 1152, "abinit.keep": 8,
              "abinit.shift_extent_px": 4, "abinit.shift_step_px": 1, "abinit.radius_start": args.radius_start,
              "abinit.radius_end": args.D * 5 // 12}
    # two stages: a homogeneous ab initio for the poses, then heterogeneous training on them with
    # pose refinement (the workflow of docs/poses.md for heterogeneous data without poses)
    homogeneous = base / "homogeneous_abinit"
    if not (homogeneous / "weights.pkl").exists():
        run_cli(["abinit", *overrides({**search, "data.store": base / "none", "output.dir": homogeneous,
                                       "train.batch_size": args.abinit_batch, "train.lr": args.abinit_lr,
                                       "train.epochs": args.search_epochs + args.refine_epochs})])
    refine = {"model.pose_refine": True, "model.pose_warmup_epochs": 1}
    idx = hinge["fsc_images"]
    suffix = "" if args.hinge_encoder == "resid" else f"_{args.hinge_encoder}"
    rows = [("true poses (fixed)", "true_poses", "train", {"data.store": base / "true"}, None),
            ("abinit", "abinit", "abinit", {"data.store": base / "none", **search}, None),
            ("abinit zdim 0, then train + pose_refine", "two_stage", "train", refine, homogeneous)]
    K = args.hinge_classes
    if K > 1:  # K homogeneous classes for the poses (cryoSPARC's multi-class ab initio), then the same
        S = args.hinge_class_search_epochs or args.search_epochs
        classes = base / f"classes{K}_s{S}"
        rows += [(f"abinit, {K} classes ({S} search epochs)", classes.name, "abinit",
                  {"data.store": base / "none", "model.zdim": 0, "abinit.classes": K, **search,
                   "abinit.search_epochs": S, "train.epochs": S + args.refine_epochs}, None),
                 (f"abinit {K} classes, then train + pose_refine", f"{classes.name}_two_stage", "train", refine, classes)]
    out = {}
    for label, name, cmd, extra, poses_from in rows:
        # the class run has no encoder: one run for either --hinge-encoder
        run = base / (name if "abinit.classes" in extra else name + suffix)
        if poses_from is not None:
            found_store = base / f"found_{poses_from.name}"
            if not found_store.exists():
                ingest(paths["particles.mrcs"], found_store, poses=poses_from / "poses.pkl", ctf=paths["ctf.pkl"],
                       progress=False)
            extra = {"data.store": found_store, **extra}
        if not (run / "weights.pkl").exists():
            run_cli([cmd, *overrides({**het, **extra, "output.dir": run})])
        z = load_z(run / "z.pkl")
        row = {"latent": latent_metrics(z, gt), "seconds_per_epoch": epoch_seconds(run)}
        if poses_from is not None:
            row["seconds_per_epoch"] = epoch_seconds(poses_from) + row["seconds_per_epoch"]
        if extra.get("abinit.classes", 1) > 1:
            members = [z.argmax(1) == k for k in range(K)]
            row["classes"] = [{"images": int(m.sum()), "with_subunit": float(gt.subunit[m].mean()) if m.any() else None,
                               "mean_c": float(gt.c[m].mean()) if m.any() else None} for m in members]
        model = load_model(run, device="cpu")
        with torch.no_grad():
            vols = [eval_volume(model, z[i], device="cpu") for i in idx]
        found = load_poses(run / "poses.pkl") if (run / "poses.pkl").exists() else None
        row.update(hinge_quality(found, vols, hinge, args.D))
        out[label] = row
    return out


def case_hinge_versus_cryodrgn(args, root: Path) -> dict:
    """cryoDRGN 4.3.1's ``abinit`` (cryoDRGN-AI, its conformation table: ``--zdim``) on the
    images of the hinge case, with its settings (5 + 1 epochs, radius 6 -> 5D/12, shifts +-4 px
    on a 1 px grid, keep 8, 4 levels, a 2 x 64 decoder), scored as the hinge rows are."""
    import subprocess

    from distdrgn.formats.mrc import read_volume
    from quality import latent_metrics

    if args.cryodrgn is None:
        raise SystemExit("hinge-versus-cryodrgn needs --cryodrgn PATH (the cryodrgn executable of cryoDRGN 4.3.1)")
    hinge = hinge_data(args, root)
    sim = hinge["base"] / "sim"
    epochs = args.search_epochs + args.refine_epochs
    cd = hinge["base"] / f"cryodrgn_z{args.hinge_zdim}_s{args.search_epochs}_e{epochs}_b{args.base_rotations}"
    if not (cd / f"pose.{epochs}.pkl").exists():
        cmd = cryodrgn_abinit_command(args, sim, cd, args.hinge_zdim, "--checkpoint", 1, "--log-interval", 200)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.cryodrgn_threads)}
        with open(cd.with_name(cd.name + ".stdout"), "w") as log:
            subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    found, transposed, sign = cryodrgn_abinit_poses(cd / f"pose.{epochs}.pkl", hinge["true"], args.D)
    with open(cd / f"z.{epochs}.pkl", "rb") as f:
        z = np.asarray(pickle.load(f), np.float32)
    # its volumes at the compared images' z, by its own eval_vol
    zfile = cd / "fsc_images_z.txt"
    np.savetxt(zfile, z[hinge["fsc_images"]])
    vol_dir = cd / "fsc_images_vols"
    subprocess.run([str(args.cryodrgn), "eval_vol", str(cd / f"weights.{epochs}.pkl"), "-c", str(cd / "config.yaml"),
                    "--zfile", str(zfile), "-o", str(vol_dir)], check=True, stdout=subprocess.DEVNULL)
    vols = [read_volume(vol_dir / f"vol_{j + 1:03d}.mrc")[0].astype(np.float32)
            for j in range(len(hinge["fsc_images"]))]
    return {"base_rotations": args.base_rotations, "rotations_transposed": transposed, "shift_sign": sign,
            "latent": latent_metrics(z, hinge["gt"]), **hinge_quality(found, vols, hinge, args.D),
            "seconds_per_epoch": cryodrgn_epoch_seconds(cd / "run.log")}


def support_prior_seconds(model, D: int) -> float:
    """Seconds of one training step's support prior (forward and backward) at radius D / 4,
    the best of 3 after a warm-up."""
    from distdrgn.support_prior import SupportPrior

    prior = SupportPrior(1.0, D / 4, D, 0.38)
    z = torch.zeros(1, model.zdim) if model.zdim else None
    prior(model.decoder, z).backward()  # warm-up
    seconds = []
    for _ in range(3):
        t0 = time.perf_counter()
        prior(model.decoder, z).backward()
        seconds.append(time.perf_counter() - t0)
    model.zero_grad()
    return min(seconds)


def case_search_cost(args, root: Path) -> list[dict]:
    """The search on random images against an untrained model: its cost does not depend on the map."""
    from distdrgn.config import AbinitConfig, ModelConfig
    from distdrgn.model import build_model
    from distdrgn.objective import Batch, Preprocess
    from distdrgn.pose_training import ModelPoseSearch

    rows = []
    for D in args.cost_boxes:
        for zdim in (0, 8):
            # a heterogeneous search decodes every candidate of every image: fewer images per batch
            B = 16 if zdim == 0 else 4
            model = build_model(ModelConfig(zdim=zdim, enc_dim=256, dec_dim=256, dec_layers=3), D, seed=0)
            prior_sec = support_prior_seconds(model, D)
            for keep in args.cost_keeps:
                cfg = AbinitConfig(keep=keep, base_rotations=args.cost_rotations, radius_start=D / 4)
                search = ModelPoseSearch(model, Preprocess(D), cfg, "cpu")
                g = torch.Generator().manual_seed(0)
                batch = Batch(torch.arange(B), torch.randn(B, D, D, generator=g), None, None, None)
                search(batch)  # warm-up
                t0 = time.perf_counter()
                search(batch)
                sec = time.perf_counter() - t0
                rows.append({"D": D, "zdim": zdim, "keep": keep, "base_rotations": args.cost_rotations, "levels": cfg.levels,
                             "radius": D / 4, "batch": B, "seconds_per_batch": sec, "images_per_s": B / sec,
                             "support_prior_seconds": prior_sec})
                print(f"  search D={D} zdim={zdim} keep={keep}: {sec:.2f} s per {B} images", flush=True)
                if zdim and time.perf_counter() - t0 > 60:  # the CPU's answer is clear; the GPU check measures it
                    break
    return rows


def case_seeds(args, root: Path) -> dict:
    """Ab initio from nothing, once per ``--seeds`` (``train.seed``), every epoch a search epoch:
    the rotation error and pairwise-angle correlation after each epoch, to see whether and when
    the poses are found (a small dataset succeeds or not depending on the seed)."""
    from distdrgn.formats.poses import load_poses
    from distdrgn.simulate import simulate
    from distdrgn.store import ingest

    base = root / "seeds"
    paths = simulate(base / "sim", n=args.n, D=args.D, snr=args.snr, dist="homogeneous", seed=0, progress=False,
                     write_volumes=False, force=True)
    store = base / "none"
    if not store.exists():
        ingest(paths["particles.mrcs"], store, poses=None, ctf=paths["ctf.pkl"], progress=False,
               layout_overrides={"target_chunk_bytes": args.D * args.D * 4 * 64})
    true = load_poses(paths["poses.pkl"])
    out = {}
    for weight in args.support_weights:
        for seed in args.seeds:
            run = base / f"seed{seed}_lr{args.abinit_lr:g}_e{args.search_epochs}_sw{weight:g}"
            if not (run / "weights.pkl").exists():
                run_cli(["abinit", *overrides({"data.store": store, "output.dir": run, "train.seed": seed,
                                               "train.batch_size": args.abinit_batch, "train.lr": args.abinit_lr,
                                               "train.epochs": args.search_epochs,
                                               "abinit.search_epochs": args.search_epochs,
                                               "abinit.base_rotations": 1152, "abinit.keep": 8,
                                               "abinit.shift_extent_px": 4, "abinit.shift_step_px": 1,
                                               "abinit.radius_start": args.radius_start,
                                               "abinit.radius_end": args.D * 5 // 12,
                                               "abinit.support_weight": weight})])
            rows = []
            for epoch in range(1, args.search_epochs + 1):
                errs = pose_errors(load_poses(run / f"poses.{epoch}.pkl"), true, args.D)
                rows.append({"epoch": epoch, "rotation_deg": errs["rotation_deg"],
                             "pairwise_angle_corr": errs["pairwise_angle_corr"]})
            out[f"{seed}, support_weight {weight:g}"] = rows
    return out


CASES = {"refine": case_refine, "refine-versus-cryodrgn": case_refine_versus_cryodrgn, "abinit": case_abinit,
         "versus-cryodrgn": case_versus_cryodrgn,
         "hinge": case_hinge, "hinge-versus-cryodrgn": case_hinge_versus_cryodrgn, "search-cost": case_search_cost,
         "seeds": case_seeds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["refine", "abinit", "search-cost"],
                   choices=list(CASES))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("-D", type=int, default=24)
    p.add_argument("--snr", type=float, default=float("inf"))
    p.add_argument("--epochs", type=int, default=12, help="refine: epochs of each of the three runs")
    p.add_argument("--perturb-deg", type=float, default=5.0)
    p.add_argument("--perturb-px", type=float, default=1.0)
    p.add_argument("--pose-lr-rot", type=float, help="refine: model.pose_lr_rot (default: the config's)")
    p.add_argument("--search-epochs", type=int, default=6)
    p.add_argument("--refine-epochs", type=int, default=2)
    p.add_argument("--radius-start", type=float, default=6)
    p.add_argument("--local-search", action="store_true",
                   help="abinit, versus-cryodrgn: abinit.local_search=true (after the search epochs, a local "
                        "re-search of every batch before the gradient refinement)")
    p.add_argument("--abinit-batch", type=int, default=8)
    p.add_argument("--abinit-lr", type=float, default=5e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="seeds: the train.seed of each run")
    p.add_argument("--support-weights", type=float, nargs="+", default=[1.0],
                   help="seeds: each seed once per abinit.support_weight (0: no support prior)")
    p.add_argument("--hinge-zdim", type=int, default=8)
    p.add_argument("--hinge-encoder", default="resid", choices=["resid", "autodecoder"],
                   help="hinge: z from the encoder (amortised) or a per-particle table (model.encoder)")
    p.add_argument("--hinge-classes", type=int, default=0,
                   help="hinge: > 1 adds ab initio with that many classes (abinit.classes), then train + pose_refine on its poses")
    p.add_argument("--hinge-class-search-epochs", type=int, default=0,
                   help="hinge: search epochs of the --hinge-classes run (0: --search-epochs)")
    p.add_argument("--n-fsc", type=int, default=20, help="hinge: images whose decoded volume is compared")
    p.add_argument("--cryodrgn", type=Path, help="versus-cryodrgn: the cryodrgn executable (cryoDRGN 4.3.1)")
    p.add_argument("--cryodrgn-threads", type=int, default=1)
    p.add_argument("--base-rotations", type=int, default=4608,
                   help="versus-cryodrgn: base grid of both tools (576 or 4608: cryoDRGN's --base-healpy 1 or 2)")
    p.add_argument("--cost-boxes", type=int, nargs="+", default=[32, 48])
    p.add_argument("--cost-keeps", type=int, nargs="+", default=[2, 8])
    p.add_argument("--cost-rotations", type=int, default=4608)
    p.add_argument("--work", type=Path, default=Path("/tmp/distdrgn_abinit_bench"))
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("abinit.json"))
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    results = {"machine": f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU only",
               "date": time.strftime("%Y-%m-%d"), "settings": {k: v for k, v in vars(args).items() if k != "work"}}
    results["settings"]["out"] = str(args.out)
    for case in args.cases:
        t0 = time.perf_counter()
        results[case] = CASES[case](args, args.work)
        print(f"{case}: {time.perf_counter() - t0:.0f} s", flush=True)
    print_table(results)
    args.out.write_text(json.dumps(results, indent=2, default=lambda o: str(o) if isinstance(o, Path) else float(o)))
    print(f"wrote {args.out}")


def hinge_table_row(label: str, v: dict) -> str:
    """One row of the hinge table: pose errors (plain, modulo the mirror), PC1 |Spearman|, the
    per-image FSC AUC (mismatched baseline) and seconds per epoch."""
    rot = v.get("poses", {}).get("rotation_deg")
    rot = f"{rot['median']:.1f} / {rot['p90']:.1f}" if rot else "(true)"
    mirror = v.get("poses_by_subunit", {}).get("all_mirror_modulo")
    mirror = f"{mirror['median']:.1f} / {mirror['p90']:.1f}" if mirror else ""
    f = v["fsc_auc"]
    return (f"| {label} | {rot} | {mirror} | {v['latent']['pc1_abs_spearman_c']:.3f} | {f['matched']['median']:.3f} "
            f"({f['mismatched']['median']:.3f}) | {', '.join(f'{s:.0f}' for s in v['seconds_per_epoch'])} |")


def print_table(results: dict) -> None:
    if "refine" in results:
        r = results["refine"]
        print("\n| run | rotation error median / p90 (deg) | shift error median (px) | FSC AUC | FSC=0.5 (px) | s/epoch |")
        print("|---|---|---|---|---|---|")
        for label, v in r.items():
            if label == "gap_closed":
                continue
            rot, sh, f = v["poses"]["rotation_deg"], v["poses"]["shift_px"], v["fsc"]
            print(f"| {label} | {rot['median']:.2f} / {rot['p90']:.2f} | {sh['median']:.2f} | {f['auc']:.3f} | "
                  f"{f['fsc05_px']:.2f} | {v['seconds_per_epoch']:.1f} |")
        print(f"\nshare of the perturbed -> true FSC AUC gap closed by pose_refine: {r['gap_closed']:.0%}")
    if "refine-versus-cryodrgn" in results:
        r = results["refine-versus-cryodrgn"]
        print("\n| cryoDRGN train_nn | rotation error median / p90 (deg) | shift error median (px) | FSC AUC | "
              "FSC=0.5 (px) | s/epoch |")
        print("|---|---|---|---|---|---|")
        for label, v in r.items():
            if label.startswith("gap_closed"):
                continue
            rot, sh, f = v["poses"]["rotation_deg"], v["poses"]["shift_px"], v["fsc"]
            seconds = f"{np.median(v['seconds_per_epoch']):.1f}" if v["seconds_per_epoch"] else "-"
            print(f"| {label} | {rot['median']:.2f} / {rot['p90']:.2f} | {sh['median']:.2f} | {f['auc']:.3f} | "
                  f"{f['fsc05_px']:.2f} | {seconds} |")
        print(f"\nshare of cryoDRGN's perturbed -> true FSC AUC gap closed by --do-pose-sgd: {r['gap_closed']:.0%} "
              f"(lr 1e-4), {r['gap_closed, lr 2e-3']:.0%} (lr 2e-3), {r['gap_closed, lr 2e-3, --pose-lr 1e-3']:.0%} "
              "(lr 2e-3, --pose-lr 1e-3)")
    if "seeds" in results:
        print("\n| train.seed, abinit.support_weight | last epoch: rotation error median / p90 (deg), pairwise-angle corr | found by epoch (median < 10 deg) |")
        print("|---|---|---|")
        for seed, rows in results["seeds"].items():
            last, found = rows[-1], [r["epoch"] for r in rows if r["rotation_deg"]["median"] < 10]
            print(f"| {seed} | {last['rotation_deg']['median']:.1f} / {last['rotation_deg']['p90']:.1f}, "
                  f"{last['pairwise_angle_corr']:.2f} | {found[0] if found else 'no'} |")
    if "abinit" in results:
        a = results["abinit"]
        rot, sh, f = a["poses"]["rotation_deg"], a["poses"]["shift_px"], a["fsc"]
        print(f"\nabinit: rotation error median {rot['median']:.1f} / p90 {rot['p90']:.1f} deg (flipped={a['poses']['flipped']}), "
              f"shift median {sh['median']:.2f} px, FSC AUC {f['auc']:.3f}, FSC=0.5 at {f['fsc05_px']:.2f} px; "
              f"s/epoch {', '.join(f'{s:.0f}' for s in a['seconds_per_epoch'])}")
    if "versus-cryodrgn" in results:
        print("\n| tool | rotation error median / p90 (deg) | pairwise-angle corr. | shift error median (px) | FSC AUC | "
              "FSC=0.5 (px) | s per epoch |")
        print("|---|---|---|---|---|---|---|")
        for tool in ("distdrgn", "cryodrgn"):
            v = results["versus-cryodrgn"][tool]
            rot, sh, f = v["poses"]["rotation_deg"], v["poses"]["shift_px"], v["fsc"]
            print(f"| {tool} | {rot['median']:.1f} / {rot['p90']:.1f} | {v['poses']['pairwise_angle_corr']:.3f} | "
                  f"{sh['median']:.2f} | {f['auc']:.3f} | "
                  f"{f['fsc05_px']:.2f} | {', '.join(f'{s:.0f}' for s in v['seconds_per_epoch'])} |")
    if "hinge" in results:
        print("\n| hinge | rotation error median / p90 (deg) | the same modulo the mirror (without subunit) | "
              "PC1 abs Spearman | per-image FSC AUC (mismatched) | s per epoch |")
        print("|---|---|---|---|---|---|")
        for label, v in results["hinge"].items():
            print(hinge_table_row(label, v))
            for k, c in enumerate(v.get("classes", [])):
                print(f"|   class {k}: {c['images']} images, {c['with_subunit'] or 0:.0%} with the subunit, "
                      f"mean c {c['mean_c'] or 0:.2f} | | | | | |")
    if "hinge-versus-cryodrgn" in results:
        print("\n(hinge) " + hinge_table_row("cryoDRGN 4.3.1 abinit", results["hinge-versus-cryodrgn"]))
    if "search-cost" in results:
        print("\n| D | zdim | keep | base rotations | images per batch | s per batch | images/s | support prior s |")
        print("|---|---|---|---|---|---|---|---|")
        for row in results["search-cost"]:
            print(f"| {row['D']} | {row['zdim']} | {row['keep']} | {row['base_rotations']} | {row['batch']} | "
                  f"{row['seconds_per_batch']:.2f} | {row['images_per_s']:.1f} | {row['support_prior_seconds']:.3f} |")


if __name__ == "__main__":
    main()
