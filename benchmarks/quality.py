"""Reconstruction quality on simulated data with ground truth (distdrgn, optionally vs cryoDRGN).

Steps (every external step is a command, recorded verbatim in the outputs):

1. ``distdrgn simulate`` (continuous motion: ``--dist uniform``, SNR 0.1, CTF) and ``distdrgn ingest``;
2. ``python -m distdrgn.train configs/default.yaml`` with overrides (architecture, zdim, epochs);
3. evaluation: PCA of z_mu -> |Spearman| of PC1 with the true conformation c; per-image FSC
   between the volume decoded at each evaluated image's z_mu and that image's ground-truth
   volume (a subset stratified over c), summarised by the FSC area under the curve up to
   Nyquist and the 0.5 crossing; the same FSC against a mismatched image's ground truth is the
   baseline that shows the FSC is informative;
4. with ``--cryodrgn PATH``: ``cryodrgn train_vae`` on the same particles, poses and CTF with the
   same architecture, epochs, batch size and learning rate, ``cryodrgn eval_vol`` at the same
   images' z, the same metrics.

Writes ``benchmarks/quality.json`` and ``benchmarks/QUALITY.md`` (device, date, commands, table)
and prints the table. Usage::

    .venv/bin/python benchmarks/quality.py --n 8000 -D 32 --epochs 10 --dim 128 --layers 3 \
        --out /tmp/quality --cryodrgn /tmp/cdrgn/bin/cryodrgn
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import cpu_model  # noqa: E402
from distdrgn.analysis.latent import load_z  # noqa: E402
from distdrgn.analysis.validation import (  # noqa: E402
    fsc_summary,
    mismatched_partners,
    pc_spearman,
    spearman,
    stratified_indices,
    summarise,
)
from distdrgn.projection import fsc  # noqa: E402
from distdrgn.simulate import load_ground_truth  # noqa: E402

SPEARMAN_TARGET = 0.9


CPU_SECONDS: dict[str, float] = {}  # log file name -> CPU seconds (user + system) of that command


def run(cmd: list[str], log: Path, commands: list[str], cwd: Path = REPO) -> float:
    """Run ``cmd`` (output to ``log``), record it, return its wall time in seconds; stop on failure.

    The command's CPU time (user + system, children included) goes to :data:`CPU_SECONDS`:
    on a machine shared with other jobs it compares systems better than the wall time.
    """
    import resource

    commands.append(shlex.join(cmd))
    print(f"$ {shlex.join(cmd)}", flush=True)
    t0 = time.time()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS[log.name] = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n{tail}")
    return wall


def log_number(log: Path, pattern: str) -> int | None:
    """The first integer captured by ``pattern`` in a log file (None if absent)."""
    import re

    m = re.search(pattern, log.read_text()) if log.exists() else None
    return int(m.group(1)) if m else None




def device_description() -> str:
    import torch

    return f"{cpu_model()}, {os.cpu_count()} cores visible, torch {torch.__version__} ({torch.get_num_threads()} threads), CPU only"


# ----------------------------------------------------------------------------- evaluation


def latent_metrics(z: np.ndarray, gt) -> dict:
    """PC1..3 Spearman with c, PC1 Spearman with the subunit flag, explained variance."""
    rho, evr = pc_spearman(z, gt.c, 3)
    rho_sub, _ = pc_spearman(z, gt.subunit.astype(np.float64), 3)
    return {
        "pc_spearman_c": [float(r) for r in rho],
        "pc1_abs_spearman_c": float(abs(rho[0])),
        "pc_spearman_subunit": [float(r) for r in rho_sub],
        "explained_variance_ratio": [float(v) for v in evr],
        "pass_pc1": bool(abs(rho[0]) > SPEARMAN_TARGET),
    }


def fsc_metrics(volumes, idx: np.ndarray, partner: np.ndarray, gt, apix: float) -> dict:
    """Per-image FSC of ``volumes[j]`` (decoded at image idx[j]) with its ground truth and with
    the ground truth of image idx[partner[j]] (the mismatched baseline)."""
    truth_cache: dict[int, np.ndarray] = {}

    def truth(i: int) -> np.ndarray:
        if i not in truth_cache:
            truth_cache[i] = gt.image_volume(int(i))
        return truth_cache[i]

    matched, mismatched, curves = [], [], []
    for j, vol in enumerate(volumes):
        i = int(idx[j])
        freqs, curve = fsc(vol, truth(i))
        matched.append(fsc_summary(freqs, curve, apix))
        curves.append(curve)
        freqs_b, curve_b = fsc(vol, truth(int(idx[partner[j]])))
        mismatched.append(fsc_summary(freqs_b, curve_b, apix))
    out = {}
    for name, rows in (("matched", matched), ("mismatched", mismatched)):
        out[name] = {key: summarise([r[key] for r in rows]) for key in ("auc", "crossing_px", "crossing_A")}
    out["mean_curve"] = {"freqs": [float(f) for f in freqs], "fsc": [float(v) for v in np.mean(curves, axis=0)]}
    auc = np.array([r["auc"] for r in matched])
    out["auc_spearman_with_c"] = spearman(auc, gt.c[idx]) if len(idx) > 2 else float("nan")
    out["per_image"] = [
        {"image": int(idx[j]), "c": float(gt.c[idx[j]]), "subunit": bool(gt.subunit[idx[j]]),
         "auc": matched[j]["auc"], "crossing_px": matched[j]["crossing_px"],
         "baseline_auc": mismatched[j]["auc"]}  # fmt: skip
        for j in range(len(idx))
    ]
    return out


def distdrgn_volumes(run_dir: Path, z: np.ndarray, idx: np.ndarray):
    import torch

    from distdrgn.volumes import eval_volume, load_model

    trained = load_model(run_dir, device="cpu")
    torch.set_grad_enabled(False)
    for i in idx:
        yield eval_volume(trained, z[i])


def cryodrgn_volumes(exe: str, run_dir: Path, z: np.ndarray, idx: np.ndarray, apix: float, commands, logs: Path):
    import mrcfile

    zfile = run_dir / "eval_z.txt"
    np.savetxt(zfile, z[idx])
    out = run_dir / "eval_vols"
    weights, config = cryodrgn_final(run_dir, "weights"), run_dir / "config.yaml"
    wall = run([exe, "eval_vol", str(weights), "-c", str(config), "--zfile", str(zfile), "-o", str(out),
                "--Apix", f"{apix}", "--vol-start-index", "0"], logs / "cryodrgn_eval_vol.log", commands)  # fmt: skip
    vols = []
    for j in range(len(idx)):
        with mrcfile.open(out / f"vol_{j:03d}.mrc", permissive=True) as mrc:
            vols.append(np.array(mrc.data, dtype=np.float32))
    return vols, wall


def cryodrgn_final(run_dir: Path, stem: str) -> Path:
    """``stem.pkl`` if cryoDRGN wrote it, else the highest-numbered ``stem.N.pkl``."""
    final = run_dir / f"{stem}.pkl"
    if final.exists():
        return final
    numbered = sorted(run_dir.glob(f"{stem}.*.pkl"), key=lambda p: int(p.name.split(".")[1]))
    if not numbered:
        raise SystemExit(f"{run_dir}: no {stem}.pkl or {stem}.N.pkl")
    return numbered[-1]


# ----------------------------------------------------------------------------- the benchmark


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8000, help="number of simulated images")
    p.add_argument("-D", type=int, default=32, dest="D", help="box size")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--dim", type=int, default=64, help="encoder and decoder width (both systems)")
    p.add_argument("--layers", type=int, default=3,
                   help="hidden H x H layers of encoder and decoder (cryoDRGN's --enc-layers/--dec-layers and "
                        "distdrgn's model.enc_layers/dec_layers count them alike; the parameter counts of both logs "
                        "are recorded and must agree)")
    p.add_argument("--zdim", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--kernels", default="auto", choices=["auto", "fused", "torch"],
                   help="distdrgn's decoder path (model.kernels): compare fused vs torch quality on a GPU")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--n-fsc", type=int, default=200, help="images (stratified over c) for the per-image FSC")
    p.add_argument("--seed", type=int, default=0, help="simulation seed")
    p.add_argument("--out", default="/tmp/distdrgn_quality", help="work directory (data, runs, logs)")
    p.add_argument("--cryodrgn", help="path to a cryodrgn executable: also train and evaluate cryoDRGN")
    p.add_argument("--results", default=str(REPO / "benchmarks"), help="where quality.json and QUALITY.md go")
    p.add_argument("--reuse", action="store_true", help="reuse the data and finished runs found in --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    commands: list[str] = []
    timings: dict[str, float] = {}

    sim, store = out / "sim", out / "particles.zarr"
    if not (args.reuse and (sim / "simulation.json").exists()):
        timings["simulate_s"] = run([py, "-m", "distdrgn.cli", "simulate", str(sim), "--n", str(args.n), "-D", str(args.D),
                                     "--snr", str(args.snr), "--dist", "uniform", "--seed", str(args.seed), "--force"],
                                    logs / "simulate.log", commands)  # fmt: skip
    if not (args.reuse and (store / "zarr.json").exists()):
        timings["ingest_s"] = run([py, "-m", "distdrgn.cli", "ingest", str(sim / "particles.mrcs"), "--poses",
                                   str(sim / "poses.pkl"), "--ctf", str(sim / "ctf.pkl"), "-o", str(store), "--force",
                                   "--no-progress"], logs / "ingest.log", commands)  # fmt: skip
    gt = load_ground_truth(sim)
    apix = gt.params.pixel_size
    n = len(gt.c)

    systems: dict[str, dict] = {}
    idx = stratified_indices(gt.c, args.n_fsc)
    partner = mismatched_partners(len(idx), seed=1)

    # ---- distdrgn
    run_dir = out / "distdrgn_run"
    if not (args.reuse and (run_dir / "z.pkl").exists()):
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        wall = run([py, "-m", "distdrgn.train", "configs/default.yaml", f"data.store={store}", f"output.dir={run_dir}",
                    f"model.zdim={args.zdim}", f"model.enc_dim={args.dim}", f"model.enc_layers={args.layers}",
                    f"model.dec_dim={args.dim}", f"model.dec_layers={args.layers}", f"train.epochs={args.epochs}",
                    f"train.batch_size={args.batch_size}", f"train.lr={args.lr}", "train.checkpoint_every=1000",
                    f"model.kernels={args.kernels}"],
                   logs / "distdrgn_train.log", commands)  # fmt: skip
        timings["distdrgn_train_s"] = wall
    else:
        commands.append(f"(reused {run_dir})")
    z = load_z(run_dir / "z.pkl")
    res = {"latent": latent_metrics(z, gt), "parameters": log_number(logs / "distdrgn_train.log", r"; (\d+) parameters")}
    t0 = time.time()
    res["fsc"] = fsc_metrics(distdrgn_volumes(run_dir, z, idx), idx, partner, gt, apix)
    res["eval_s"] = time.time() - t0
    if "distdrgn_train_s" in timings:
        res["train_wall_s"] = timings["distdrgn_train_s"]
        res["images_per_s"] = n * args.epochs / timings["distdrgn_train_s"]
        res["train_cpu_s"] = CPU_SECONDS.get("distdrgn_train.log")
    systems["distdrgn"] = res

    # ---- cryoDRGN
    if args.cryodrgn:
        cd_dir = out / "cryodrgn_run"
        version = subprocess.run([args.cryodrgn, "--version"], capture_output=True, text=True).stdout.strip()
        if not (args.reuse and any(cd_dir.glob("z.*pkl"))):
            # cryoDRGN's defaults match distdrgn's (invert data, soft window 0.85-0.99, Hartley
            # normalisation); architecture, pe, zdim, epochs, batch and lr are set explicitly.
            wall = run([args.cryodrgn, "train_vae", str(sim / "particles.mrcs"), "--poses", str(sim / "poses.pkl"),
                        "--ctf", str(sim / "ctf.pkl"), "--zdim", str(args.zdim), "-n", str(args.epochs),
                        "--enc-dim", str(args.dim), "--enc-layers", str(args.layers), "--dec-dim", str(args.dim),
                        "--dec-layers", str(args.layers), "--pe-type", "gaussian", "-b", str(args.batch_size),
                        "--lr", str(args.lr), "--seed", "0", "--no-analysis", "--checkpoint", "1000",
                        "-o", str(cd_dir)],
                       logs / "cryodrgn_train.log", commands)  # fmt: skip
            timings["cryodrgn_train_s"] = wall
        zc = load_z(cryodrgn_final(cd_dir, "z"))
        res = {"version": version, "latent": latent_metrics(zc, gt),
               "parameters": log_number(logs / "cryodrgn_train.log", r"(\d+) parameters in model")}
        vols, wall = cryodrgn_volumes(args.cryodrgn, cd_dir, zc, idx, apix, commands, logs)
        res["fsc"] = fsc_metrics(vols, idx, partner, gt, apix)
        res["eval_s"] = wall
        if "cryodrgn_train_s" in timings:
            res["train_wall_s"] = timings["cryodrgn_train_s"]
            res["images_per_s"] = n * args.epochs / timings["cryodrgn_train_s"]
            res["train_cpu_s"] = CPU_SECONDS.get("cryodrgn_train.log")
        systems["cryodrgn"] = res

    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_description(),
        "settings": {"n": n, "D": args.D, "apix": apix, "snr": args.snr, "dist": "uniform", "ctf": True,
                     "epochs": args.epochs, "zdim": args.zdim, "enc": f"resid {args.layers}x{args.dim}",
                     "dec": f"{args.layers}x{args.dim}", "pe_type": "gaussian", "batch_size": args.batch_size,
                     "lr": args.lr, "n_fsc": len(idx), "fsc_subset": "stratified over c (evenly spaced ranks)",
                     "baseline": "FSC against the ground truth of another evaluated image (random derangement)"},  # fmt: skip
        "spearman_target": SPEARMAN_TARGET,
        "commands": commands,
        "timings": timings,
        "systems": systems,
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "quality.json").write_text(json.dumps(report, indent=1))
    table = markdown_table(report)
    (results / "QUALITY.md").write_text(markdown_report(report, table))
    print(table)
    return 0


def markdown_table(report: dict) -> str:
    names = list(report["systems"])
    header = "| metric | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    rows = []

    def row(label, fn):
        cells = []
        for name in names:
            try:
                cells.append(fn(report["systems"][name]))
            except (KeyError, TypeError):
                cells.append("—")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")

    row("PC1 \\|Spearman\\| with c (target > 0.9)", lambda s: f"{s['latent']['pc1_abs_spearman_c']:.3f}")
    row("PC1..3 Spearman with c", lambda s: ", ".join(f"{v:+.2f}" for v in s["latent"]["pc_spearman_c"]))
    row("PC1..3 Spearman with subunit", lambda s: ", ".join(f"{v:+.2f}" for v in s["latent"]["pc_spearman_subunit"]))
    row("PC1..3 explained variance", lambda s: ", ".join(f"{v:.2f}" for v in s["latent"]["explained_variance_ratio"]))
    row("FSC AUC, mean / median", lambda s: f"{s['fsc']['matched']['auc']['mean']:.3f} / {s['fsc']['matched']['auc']['median']:.3f}")
    row("FSC 0.5 crossing, median (1/px; A)",
        lambda s: f"{s['fsc']['matched']['crossing_px']['median']:.3f}; {s['fsc']['matched']['crossing_A']['median']:.1f} A")  # fmt: skip
    row("FSC 0.5 crossing, mean (1/px)", lambda s: f"{s['fsc']['matched']['crossing_px']['mean']:.3f}")
    row("baseline (mismatched GT): AUC mean / median",
        lambda s: f"{s['fsc']['mismatched']['auc']['mean']:.3f} / {s['fsc']['mismatched']['auc']['median']:.3f}")  # fmt: skip
    row("baseline: 0.5 crossing, median (1/px)", lambda s: f"{s['fsc']['mismatched']['crossing_px']['median']:.3f}")
    row("parameters (encoder + decoder)", lambda s: f"{s['parameters']:,}")
    row("training wall time (s)", lambda s: f"{s['train_wall_s']:.0f}")
    row("training images/s (N x epochs / wall)", lambda s: f"{s['images_per_s']:.1f}")
    row("training CPU time, user + system (s)", lambda s: f"{s['train_cpu_s']:.0f}")
    return header + "\n".join(rows) + "\n"


def markdown_report(report: dict, table: str) -> str:
    s = report["settings"]
    cmds = "\n".join(report["commands"])
    return (
        "# Reconstruction quality on simulated data\n\n"
        f"Date: {report['date']}  \nDevice: {report['device']}\n\n"
        f"Data: `distdrgn simulate`, {s['n']} images, D = {s['D']} ({s['apix']:.2f} A/px), continuous motion "
        f"(`--dist uniform`), SNR {s['snr']}, CTF. Training: {s['epochs']} epochs, zdim {s['zdim']}, encoder "
        f"{s['enc']}, decoder {s['dec']}, gaussian PE, batch {s['batch_size']}, lr {s['lr']} (same for both systems). "
        f"FSC on {s['n_fsc']} images {s['fsc_subset']}; AUC = area under the FSC curve from 0 to Nyquist / 0.5; "
        f"baseline = {s['baseline']}.\n\n" + table + "\n## Commands\n\n```\n" + cmds + "\n.venv/bin/python "
        + " ".join(shlex.quote(a) for a in sys.argv) + "\n```\n"
    )


if __name__ == "__main__":
    sys.exit(main())
