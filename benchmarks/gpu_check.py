"""One prepared GPU check (benchmarks/gpu_check.sh runs it): ceilings, decoder precision,
training throughput, end to end from a store, quality, NCCL/DDP, kNN.

    python benchmarks/gpu_check.py OUT_DIR [--cpu] [--parts ceiling precision train e2e quality ddp knn]

Each part appends one record to ``OUT_DIR/gpu_check.json`` (rewritten after every part, so a
part killed by its timeout leaves the others) and rows to ``OUT_DIR/gpu_check.md``. ``--cpu``
runs every part at tiny sizes on the CPU (what CI checks, tests/test_gpu_check.py); times are
then wall-clock and a part that needs CUDA says "skipped: no CUDA". No number here is a result
unless it was measured on the machine named in the JSON's ``info``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PARTS = ("ceiling", "precision", "train", "e2e", "quality", "ddp", "knn", "search")
H200_NOMINAL_TFLOPS = 790.0  # ../shared/CONVENTIONS.md, used only when the ceiling part did not run


class Timer:
    """Elapsed seconds of queued device work: CUDA events on a GPU, wall time on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


def sizes(cpu: bool) -> dict:
    if cpu:
        return {"matmul": 256, "copy_mb": 8, "precision_D": [8], "net": {"zdim": 2, "enc_dim": 16, "enc_layers": 1,
                "dec_dim": 16, "dec_layers": 1}, "train_D": [8], "train_B": [4], "steps": 2, "warmup": 1,
                "e2e_D": 8, "e2e_n": 64, "quality": ["--n", "200", "-D", "16", "--epochs", "1", "--dim", "16",
                "--layers", "1", "--n-fsc", "20"], "knn_n": 2000,
                "search": [(16, 0, 288, 4), (16, 2, 288, 4)]}
    return {"matmul": 8192, "copy_mb": 4096, "precision_D": [128, 256], "net": {}, "train_D": [64, 128, 256],
            "train_B": [16, 64], "steps": 20, "warmup": 5, "e2e_D": 128, "e2e_n": 8192,
            "quality": ["--n", "8000", "-D", "32", "--epochs", "6"], "knn_n": 1_000_000,
            "search": [(128, 0, 4608, 64), (64, 8, 4608, 64)]}  # (D, zdim, base rotations, images)


# ---- 1. ceilings ----------------------------------------------------------------------------


def part_ceiling(device, S, state) -> dict:
    n = S["matmul"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    reps = 10
    with Timer(device) as t:
        for _ in range(reps):
            a @ b
    tflops = 2 * n**3 * reps / t.seconds / 1e12
    x = torch.empty(S["copy_mb"] << 18, device=device)  # float32: copy_mb MiB
    y = torch.empty_like(x)
    y.copy_(x)
    with Timer(device) as t:
        for _ in range(reps):
            y.copy_(x)
    copy = 2 * x.numel() * 4 * reps / t.seconds / 1e12  # bytes read + written
    state["tflops"] = tflops
    rows = [f"| matmul {n}^3 {str(dtype).replace('torch.', '')} | {tflops:.1f} TFLOP/s |",
            f"| device copy {S['copy_mb']} MiB | {copy:.2f} TB/s (read + written) |"]
    return {"matmul_n": n, "dtype": str(dtype), "tflops": tflops, "copy_tb_per_s": copy, "timer": Timer(device).cuda
            and "cuda events" or "wall time", "md": ["| ceiling | value |", "| --- | --- |", *rows]}


# ---- 2. decoder precision ---------------------------------------------------------------------


def part_precision(device, S, state) -> dict:
    from distdrgn.config import ModelConfig
    from distdrgn.kernels import fused_unsupported_reason
    from distdrgn.kernels.check import mse_and_grads, random_inputs, relative_error
    from distdrgn.model import build_model

    rows, md = [], ["| D | kernels | dtype | MSE rel. err | worst gradient rel. err (tensor) |", "| ---: | --- | --- | ---: | --- |"]
    for D in S["precision_D"]:
        model = build_model(ModelConfig(**S["net"]), D, seed=0).to(device)
        inputs = random_inputs(model, 2, seed=1)
        ref_mse, ref = mse_and_grads(model, inputs, "torch")  # float32 reference
        kernels = ["torch", "compile"]
        if fused_unsupported_reason(device, model.info.pe_type, model.info.domain) is None:
            kernels.append("fused")
        for k in kernels:
            for amp in (None, torch.bfloat16):
                if k == "torch" and amp is None:
                    continue
                mse, grads = mse_and_grads(model, inputs, k, amp)
                errs = {n: relative_error(grads[n], g) for n, g in ref.items()}
                worst = max(errs, key=errs.get)
                row = {"D": D, "kernels": k, "dtype": "bf16" if amp else "fp32", "mse_rel": relative_error(mse, ref_mse),
                       "grad_rel": errs, "worst": worst}
                rows.append(row)
                md.append(f"| {D} | {k} | {row['dtype']} | {row['mse_rel']:.2e} | {errs[worst]:.2e} ({worst}) |")
        model.kernels = "torch"
        del model
    return {"rows": rows, "md": md}


# ---- 3. training throughput -------------------------------------------------------------------


def decoder_flops_per_image(D: int, cfg) -> float:
    """../shared/CONVENTIONS.md: 6 P MACs, MACs = (6 pe_dim + zdim) H + layers H^2 + 2 H per point."""
    H, pe_dim = cfg.dec_dim, cfg.pe_dim or D // 2
    return 6 * math.pi * (D / 2) ** 2 / 2 * ((6 * pe_dim + cfg.zdim) * H + cfg.dec_layers * H * H + 2 * H)


def train_rate(device, D, B, kernels, graphs, S, state) -> dict:
    from benchmarks.train_throughput import random_batch
    from distdrgn.config import Config, ModelConfig
    from distdrgn.cuda_graphs import GraphedStep
    from distdrgn.engine import build_engine
    from distdrgn.model import CryoDRGN, ModelInfo
    from distdrgn.objective import Preprocess
    from distdrgn.kernels import choose_kernels
    from distdrgn.runtime import Runtime
    from distdrgn.train import train_step

    cfg = Config()
    cfg.model = ModelConfig(**{**S["net"], "kernels": kernels})
    cfg.train.batch_size = B
    amp = torch.bfloat16 if device.type == "cuda" else None
    rt = Runtime(0, 1, device, amp)
    model = CryoDRGN(ModelInfo.from_config(cfg.model, D, seed=0)).to(device)
    model.kernels, why, _ = choose_kernels(model, kernels, rt.device, rt.amp_dtype)
    engine = build_engine(model, cfg, rt)
    prep = Preprocess(D)
    gen = torch.Generator().manual_seed(0)
    batches = [random_batch(B, D, device, gen) for _ in range(4)]

    def step(batch, beta, weight):
        return train_step(engine, batch, prep, model.lattice, beta, weight, rt)

    run = GraphedStep(step, B, device, engine.optimizer, warmup=S["warmup"]) if graphs else \
        (lambda batch, beta, weight: step(batch, beta, weight))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(S["warmup"] + 1):
        run(batches[i % 4], 0.125, 1.0 / B)
    with Timer(device) as t:
        for i in range(S["steps"]):
            terms, _ = run(batches[i % 4], 0.125, 1.0 / B)
    rate = B * S["steps"] / t.seconds
    ceiling = state.get("tflops", H200_NOMINAL_TFLOPS) * 1e12 / decoder_flops_per_image(D, cfg.model)
    return {"D": D, "batch": B, "kernels": model.kernels, "cuda_graphs": graphs, "images_per_s": rate,
            "ceiling_images_per_s": ceiling, "fraction": rate / ceiling, "loss": float(terms.loss),
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None, "why": why}


def part_train(device, S, state) -> dict:
    rows = []
    md = ["| D | batch | kernels | CUDA graphs | images/s | fraction of ceiling | peak GiB |",
          "| ---: | ---: | --- | --- | ---: | ---: | ---: |"]
    variants = [("torch", False), ("compile", False), ("fused", False)]
    if device.type == "cuda":
        variants.insert(2, ("compile", True))
    else:  # CUDA graphs are a CUDA feature: the one row that cannot run on the CPU
        rows.append({"kernels": "compile", "cuda_graphs": True, "status": "skipped: no CUDA"})
        md.append("| - | - | compile | True | skipped: no CUDA | | |")
        # inductor's compile takes ~30 s per shape on 2 cores; the precision part compiles already
        variants.remove(("compile", False))
        rows.append({"kernels": "compile", "cuda_graphs": False, "status": "skipped in --cpu: compile time (part precision compiles)"})
    for D in S["train_D"]:
        for B in S["train_B"]:
            for kernels, graphs in variants:
                try:
                    r = train_rate(device, D, B, kernels, graphs, S, state)
                except Exception as exc:  # one row's failure (out of memory, no Triton) is that row's result
                    r = {"D": D, "batch": B, "kernels": kernels, "cuda_graphs": graphs, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                rows.append(r)
                if "error" in r:
                    md.append(f"| {D} | {B} | {kernels} | {graphs} | - | - | - | {r['error']}")
                else:
                    peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
                    md.append(f"| {D} | {B} | {r['kernels']} | {graphs} | {r['images_per_s']:,.1f} | {r['fraction']:.1%} | {peak} |")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    state["train_rows"] = rows
    return {"rows": rows, "cryodrgn": "not run: cryoDRGN 4.3.1 and its dependencies are not among the carried wheels",
            "md": md}


# ---- 4. end to end from a store ---------------------------------------------------------------


def part_e2e(device, S, state, work: Path) -> dict:
    from benchmarks._common import write_random_particles
    from distdrgn.config import load_config
    from distdrgn.store import ingest
    from distdrgn.train import train

    D, n = S["e2e_D"], S["e2e_n"]
    paths = write_random_particles(work / "e2e_src", n, D)
    store = ingest(paths["mrcs"], work / "e2e_store", poses=paths["poses"], ctf=paths["ctf"], progress=False)
    net = [f"model.{k}={v}" for k, v in S["net"].items()]
    out = work / "e2e_run"
    train(load_config(None, [f"data.store={store}", f"output.dir={out}", "train.epochs=1", "train.batch_size=64"
                             if device.type == "cuda" else "train.batch_size=4", "train.analyze=false",
                             f"train.device={device.type}", *net]))
    import csv

    with open(out / "loss.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    rate = float(row["images_per_second"])
    B = 64 if device.type == "cuda" else 4
    same = [r for r in state.get("train_rows", []) if r.get("D") == D and r.get("batch") == B and not r.get("cuda_graphs")
            and "error" not in r and r["kernels"] in ("fused", "torch")]
    on_device = max((r["images_per_s"] for r in same), default=None)
    md = ["| end to end (store on local disk) | images/s |", "| --- | ---: |", f"| D={D}, {n} images, batch {B}, loader + step | {rate:,.1f} |",
          f"| same step, batches already on the device (part train) | {on_device:,.1f} |" if on_device else
          "| same step, batches already on the device | part train has no such row |"]
    return {"D": D, "n": n, "batch": B, "images_per_s": rate, "on_device_images_per_s": on_device, "md": md}


# ---- 5. quality ------------------------------------------------------------------------------------


def part_quality(device, S, state, work: Path) -> dict:
    if device.type != "cuda":  # measured: over 240 s on 2 shared cores even at n = 200, D = 16
        return {"skipped": "skipped in --cpu: quality.py (simulate, train, FSC) takes minutes on a CPU even at tiny "
                           "sizes; benchmarks/QUALITY.md holds its CPU numbers", "md": ["skipped in --cpu (see JSON)"]}
    results = work / "quality_results"
    cmd = [sys.executable, str(REPO / "benchmarks" / "quality.py"), *S["quality"], "--out", str(work / "quality"),
           "--results", str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"quality.py exited {proc.returncode}: {proc.stderr[-500:]}")
    report = json.loads((results / "quality.json").read_text())
    md = ["quality.py (" + " ".join(S["quality"]) + "); the CPU reference is benchmarks/QUALITY.md", "", "```",
          (results / "QUALITY.md").read_text()[-3000:], "```"]
    return {"command": " ".join(cmd), "report": report, "md": md}


# ---- 6. DDP under torchrun ---------------------------------------------------------------------


def ddp_worker(cpu: bool) -> None:
    """One torchrun process: the DDP wrapper forced on at world size 1 (benchmark-only), 5 steps."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from benchmarks.train_throughput import random_batch
    from distdrgn.config import Config, ModelConfig
    from distdrgn.engine import DDPEngine
    from distdrgn.model import CryoDRGN, ModelInfo
    from distdrgn.objective import Preprocess
    from distdrgn.runtime import Runtime
    from distdrgn.train import train_step

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if not cpu else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    S = sizes(cpu)
    cfg = Config()
    cfg.model = ModelConfig(**S["net"], kernels="torch")
    D, B = (8, 4) if cpu else (64, 16)
    rt = Runtime(0, dist.get_world_size(), device, torch.bfloat16 if device.type == "cuda" else None)
    model = CryoDRGN(ModelInfo.from_config(cfg.model, D, seed=0)).to(device)
    engine = DDPEngine(model, cfg, Runtime(0, 1, device, rt.amp_dtype))
    engine.wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                             bucket_cap_mb=cfg.train.bucket_cap_mb, broadcast_buffers=False)
    gen = torch.Generator().manual_seed(0)
    prep = Preprocess(D)
    losses = []
    t0 = time.perf_counter()
    for _ in range(5):
        terms, bad = train_step(engine, random_batch(B, D, device, gen), prep, model.lattice, 0.1, 1.0 / B, rt)
        losses.append(float(terms.loss))
    print(json.dumps({"backend": backend, "world_size": dist.get_world_size(), "steps": 5, "losses": losses,
                      "seconds": time.perf_counter() - t0}))
    dist.destroy_process_group()


def part_ddp(device, S, state) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(Path(__file__).resolve()), "--ddp-worker"] + (["--cpu"] if device.type != "cuda" else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise RuntimeError(f"torchrun exited {proc.returncode}: {proc.stderr[-800:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ok = all(math.isfinite(x) for x in result["losses"])
    return {**result, "finite": ok, "md": [f"DDP ({result['backend']}, world size {result['world_size']}, wrapper forced on): "
                                           f"{result['steps']} steps, losses finite: {ok}, {result['seconds']:.2f} s"]}


# ---- 7. kNN --------------------------------------------------------------------------------------


def part_knn(device, S, state) -> dict:
    import numpy as np

    from distdrgn.analysis.graph import _knn_torch

    n = S["knn_n"]
    z = np.random.default_rng(0).standard_normal((n, 8), dtype=np.float32)
    t0 = time.perf_counter()
    dist_, idx = _knn_torch(z, 11, 65536 if device.type == "cuda" else 512, device=device.type)
    seconds = time.perf_counter() - t0
    probe = np.random.default_rng(1).choice(n, 50, replace=False)
    exact = np.argsort(((z[probe, None, :] - z[None, :, :]) ** 2).sum(-1), axis=1)[:, :11]
    recall = float(np.mean([len(set(a) & set(b)) / 11 for a, b in zip(idx[probe], exact)]))
    try:
        import faiss  # noqa: F401

        faiss_gpu = "faiss imports" + (" with GPUs" if getattr(faiss, "get_num_gpus", lambda: 0)() else " (CPU build)")
    except ImportError:
        faiss_gpu = "faiss not installed (faiss-gpu-cu13-cuvs not carried)"
    return {"n": n, "k": 10, "backend": f"torch-{device.type}", "seconds": seconds, "recall_50_probes": recall,
            "faiss": faiss_gpu, "md": [f"kNN (torch on {device.type}): {n:,} x 8 latents, k = 10: {seconds:.2f} s, "
                                       f"recall on 50 probes {recall:.3f}; {faiss_gpu}"]}


def part_search(device, S, state) -> dict:
    """Images/s of the abinit pose search (4 levels, keep 8, radius D/4) with a default-width model,
    global (the base grid, then the levels) and local (``abinit.local_search``: the levels from
    each image's pose): zdim 0 reads slices from one decoded volume per batch, zdim 8 from one per
    image at its z."""
    from distdrgn.config import AbinitConfig, ModelConfig
    from distdrgn.lattice import random_rotations
    from distdrgn.model import build_model
    from distdrgn.objective import Batch, Preprocess
    from distdrgn.pose_training import ModelPoseSearch

    rows, md = [], []
    for D, zdim, n_rot, B in S["search"]:
        net = S["net"] or {"enc_dim": 1024, "dec_dim": 1024, "dec_layers": 3}
        model = build_model(ModelConfig(**{**net, "zdim": zdim}), D, seed=0).to(device)
        search = ModelPoseSearch(model, Preprocess(D), AbinitConfig(base_rotations=n_rot, radius_start=D / 4), device)
        batch = Batch(torch.arange(B), torch.randn(B, D, D, device=device), None, None, None)
        search(batch)  # warm-up
        with Timer(device) as t:
            search(batch)
        current = (random_rotations(B, torch.Generator().manual_seed(0)).float().to(device), torch.zeros(B, 2, device=device))
        search.local = True
        search(batch, None, current)
        with Timer(device) as t_local:
            search(batch, None, current)
        rows.append({"D": D, "zdim": zdim, "base_rotations": n_rot, "images": B, "seconds": t.seconds,
                     "images_per_s": B / t.seconds, "local_seconds": t_local.seconds,
                     "local_images_per_s": B / t_local.seconds})
        md.append(f"pose search D={D} zdim={zdim}, {n_rot} rotations x {len(search.base_shifts)} shifts, 4 levels, keep 8: "
                  f"{B / t.seconds:.1f} images/s ({t.seconds:.3f} s per {B}); local search "
                  f"{B / t_local.seconds:.1f} images/s")
    return {"rows": rows, "md": md}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?")
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (CI)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args.cpu)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    S = sizes(not cuda)
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/distdrgn_gpu_check"))
    work.mkdir(parents=True, exist_ok=True)
    json_path = out / "gpu_check.json"
    report = json.loads(json_path.read_text()) if json_path.exists() else {"parts": {}}
    report["info"] = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                      "device": torch.cuda.get_device_name(device) if cuda else "CPU (--cpu: tiny sizes, wall time)",
                      "torch": torch.__version__, "cpu_mode": not cuda}
    state = report.setdefault("state", {})
    for name in args.parts:
        t0 = time.perf_counter()
        fn = globals()[f"part_{name}"]
        try:
            rec = fn(device, S, state, work) if name in ("e2e", "quality") else fn(device, S, state)
            rec["status"] = "ok"
        except Exception as exc:
            rec = {"status": f"failed: {type(exc).__name__}: {str(exc)[:500]}", "md": [f"failed: {type(exc).__name__}: {exc}"[:500]]}
        rec["seconds"] = time.perf_counter() - t0
        md = rec.pop("md")
        report["parts"][name] = rec
        json_path.write_text(json.dumps(report, indent=1, default=str))
        with open(out / "gpu_check.md", "a") as fh:
            fh.write(f"\n## {name} ({rec['status']}, {rec['seconds']:.1f} s)\n\n" + "\n".join(md) + "\n")
        print(f"{name}: {rec['status']} ({rec['seconds']:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
