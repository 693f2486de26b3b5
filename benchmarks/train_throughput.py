"""Training throughput per device: images/s of the full training step, fused kernels vs PyTorch.

Each row times ``distdrgn.train.train_step`` (image preprocessing to Hartley values, the
CTF, encoder, decoder, loss, backward, the non-finite check and the Adam step) on one
device with the default architecture (encoder and decoder 1024 x 3, zdim 8, gaussian
encoding, bf16 autocast on GPU) on random images and poses already on the device, so the
loader is not in the measurement (``benchmarks/loader_throughput.py`` measures it). The
roofline is docs/conventions.md's performance model: ``6 P MACs`` FLOP per image, P = pi (D/2)^2 / 2
decoded points, at ``--peak-tflops`` (665, a dense bf16 product measured on the H100 lent to
this project).

    python benchmarks/train_throughput.py [--D 64 128 256] [--batch-size 16 64] [--kernels torch fused]
        [--steps 30] [--warmup 5] [--json benchmarks/train_throughput.json]
    distdrgn bench train [same options]

Rows that cannot run are listed with the reason (fused kernels without a GPU, out of
memory). Prints one table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import cpu_model  # noqa: E402
from distdrgn.config import Config, ModelConfig  # noqa: E402
from distdrgn.engine import build_engine  # noqa: E402
from distdrgn.errors import DistdrgnError  # noqa: E402
from distdrgn.model import CryoDRGN, ModelInfo  # noqa: E402
from distdrgn.objective import Batch, Preprocess  # noqa: E402
from distdrgn.lattice import random_rotations  # noqa: E402
from distdrgn.kernels import choose_kernels  # noqa: E402
from distdrgn.runtime import Runtime  # noqa: E402
from distdrgn.train import train_step  # noqa: E402


def decoder_flops_per_image(D: int, model: ModelConfig) -> float:
    """docs/conventions.md: 6 P MACs, MACs = (6 pe_dim + zdim) H + layers H^2 + 2 H per point."""
    H, pe_dim = model.dec_dim, model.pe_dim or D // 2
    points = math.pi * (D / 2) ** 2 / 2
    macs = (6 * pe_dim + model.zdim) * H + model.dec_layers * H * H + 2 * H
    return 6 * points * macs


def random_batch(B: int, D: int, device: torch.device, gen: torch.Generator) -> Batch:
    """Images, poses, shifts and CTF rows (300 kV, 2.7 mm, 1-3 um defocus) on ``device``."""
    rots = random_rotations(B, gen).float()
    dfu = 10000 + 20000 * torch.rand(B, generator=gen)
    ctf = torch.stack([torch.full((B,), float(D)), torch.full((B,), 1.0), dfu, dfu - 200,
                       torch.rand(B, generator=gen) * 180, torch.full((B,), 300.0), torch.full((B,), 2.7),
                       torch.full((B,), 0.1), torch.zeros(B)], 1)
    batch = Batch(indices=torch.arange(B), images=torch.randn(B, D, D, generator=gen), rots=rots,
                  trans=(torch.rand(B, 2, generator=gen) - 0.5) * 0.05, ctf=ctf)
    return batch.to(device)


def measure(D: int, B: int, kernels: str, args, device: torch.device) -> dict:
    cfg = Config()
    cfg.model.kernels = kernels
    cfg.train.batch_size = B
    info = ModelInfo.from_config(cfg.model, D, seed=0)
    row = {"D": D, "batch": B, "kernels": kernels, "images_per_s": None, "roofline_fraction": None,
           "peak_memory_gib": None, "note": ""}
    amp = torch.bfloat16 if device.type == "cuda" else None
    rt = Runtime(rank=0, world_size=1, device=device, amp_dtype=amp)
    model = CryoDRGN(info).to(device)
    try:  # what training does: resolve, then the start-up check of the fused kernels
        model.kernels, why, _ = choose_kernels(model, kernels, rt.device, rt.amp_dtype)
    except DistdrgnError as exc:
        return {**row, "note": str(exc)}
    engine = build_engine(model, cfg, rt)
    prep = Preprocess(D)
    gen = torch.Generator().manual_seed(0)
    batches = [random_batch(B, D, device, gen) for _ in range(4)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for i in range(args.warmup):
            train_step(engine, batches[i % 4], prep, model.lattice, 0.125, 1.0 / B, rt)
        sync()
        t0 = time.perf_counter()
        for i in range(args.steps):
            terms, _ = train_step(engine, batches[i % 4], prep, model.lattice, 0.125, 1.0 / B, rt)
        sync()
        seconds = time.perf_counter() - t0
    except torch.OutOfMemoryError:
        return {**row, "note": "out of GPU memory"}
    rate = B * args.steps / seconds
    row.update(images_per_s=rate, step_ms=1000 * seconds / args.steps, loss=float(terms.loss.detach()), note=why)
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        ceiling = args.peak_tflops * 1e12 / decoder_flops_per_image(D, cfg.model)
        row.update(roofline_images_per_s=ceiling, roofline_fraction=rate / ceiling)
    return row


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads (CPU only)"


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--D", type=int, nargs="+", default=[64, 128, 256], help="box sizes")
    p.add_argument("--batch-size", type=int, nargs="+", default=[16, 64], help="images per step")
    p.add_argument("--kernels", nargs="+", default=["torch", "fused"], choices=["torch", "fused", "compile", "auto"])
    p.add_argument("--steps", type=int, default=30, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (Triton compiles here)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--peak-tflops", type=float, default=665.0, help="dense bf16 peak for the roofline")
    p.add_argument("--json", default=str(REPO / "benchmarks" / "train_throughput.json"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    info = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "device": device_name(device),
            "torch": torch.__version__, "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:])}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    rows = []
    for D in args.D:
        for B in args.batch_size:
            for kernels in args.kernels:
                rows.append(measure(D, B, kernels, args, device))
                r = rows[-1]
                print(f"D={D} batch={B} {kernels}: {fmt(r['images_per_s'], '.1f')} images/s {r['note']}",
                      file=sys.stderr, flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print(f"# training step throughput on {info['device']} ({info['date']}, torch {info['torch']})")
    print("| D | batch | kernels | images/s | step (ms) | roofline images/s | fraction | peak GiB | note |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['D']} | {r['batch']} | {r['kernels']} | {fmt(r['images_per_s'], ',.0f')} | "
              f"{fmt(r.get('step_ms'), '.1f')} | {fmt(r.get('roofline_images_per_s'), ',.0f')} | "
              f"{fmt(r['roofline_fraction'], '.1%')} | {fmt(r['peak_memory_gib'], '.1f')} | {r['note']} |")
    Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
