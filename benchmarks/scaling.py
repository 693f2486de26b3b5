"""Scaling evidence: measured step-time split on CPU (1 and 2 gloo processes) and a modelled
weak-scaling efficiency on H100s with a 200 Gb/s interconnect.

    .venv/bin/python benchmarks/scaling.py [--D 32] [--hidden 256] [--steps 8] [--out benchmarks]

Measured (CPU, real training step of distdrgn's model and loader, per process):
  data wait   time blocked in the loader for the next batch (store read + preprocessing);
  compute     forward + backward with DDP's gradient synchronisation disabled (``no_sync``);
  all-reduce  an explicit ``all_reduce`` of every gradient in DDP-sized buckets (the
              communication DDP performs, timed on its own);
  synced      an ordinary DDP step (backward with the all-reduce overlapped by DDP buckets);
  bytes       gradient bytes all-reduced per step (parameters x 4 bytes for fp32 gradients).

Modelled (clearly a model, no GPU was measured): compute from the docs/conventions.md performance
model (decoder 6 P MACs per image + the encoder's 6 n_masked H + 6 H^2 (L-1) per image) at
``--mfu`` of the 665 TFLOP/s bf16 roofline; backward = 2/3 of it; a ring all-reduce of each
DDP bucket, ``2 (W-1)/W * bytes / B + 2 (W-1) * alpha``; buckets are issued in reverse
parameter order as their gradients become ready during backward (DDP), so only the part of
the communication that outlasts backward is exposed. Weak-scaling efficiency
E(W) = T_step(1) / T_step(W) at a fixed per-GPU batch. Writes scaling.json and scaling.png.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOFLINE_FLOPS = 665e12  # dense bf16 matmul measured on the H100 (docs/conventions.md)
GBIT = 1e9 / 8


# ---------------------------------------------------------------------------------------
# The model of one GPU's step
# ---------------------------------------------------------------------------------------


def n_masked(D: int) -> int:
    from distdrgn.lattice import Lattice

    return int(Lattice(D).n_masked)


def layer_table(D: int, H: int = 1024, layers: int = 3, zdim: int = 8) -> list[dict]:
    """The default CryoDRGN's linear layers in forward order: name, parameters, forward MACs per image.

    Encoder: n_masked -> H, (layers-1) x H -> H, H -> 2 zdim (one vector per image).
    Decoder: 3D + zdim -> H, (layers-1) x H -> H, H -> 2, evaluated at P = n_masked / 2 points.
    """
    n = n_masked(D)
    P = n // 2
    enc = [(n, H)] + [(H, H)] * (layers - 1) + [(H, 2 * zdim)]
    dec = [(3 * D + zdim, H)] + [(H, H)] * (layers - 1) + [(H, 2)]
    out = []
    for i, (a, b) in enumerate(enc):
        out.append({"name": f"encoder.{i}", "params": a * b + b, "macs": a * b})
    for i, (a, b) in enumerate(dec):
        out.append({"name": f"decoder.{i}", "params": a * b + b, "macs": a * b * P})
    return out


def ddp_buckets(layers: list[dict], cap_bytes: float, bytes_per_param: int, first_cap: float = 1 << 20) -> list[dict]:
    """DDP's buckets: parameters in reverse order, filled up to the cap (the first bucket 1 MiB).

    Each bucket: bytes and ``ready``, the fraction of backward compute done when its last
    gradient is produced (backward visits layers in reverse, cost proportional to MACs).
    """
    total = sum(l["macs"] for l in layers)
    done, buckets, cur, cap = 0.0, [], 0.0, first_cap
    for l in reversed(layers):  # weight and bias of one layer go together
        done += l["macs"] / total
        cur += l["params"] * bytes_per_param
        if cur >= cap:
            buckets.append({"bytes": cur, "ready": done})
            cur, cap = 0.0, cap_bytes
    if cur:
        buckets.append({"bytes": cur, "ready": done})
    return buckets


def ring_allreduce_seconds(nbytes: float, W: int, bw_bytes: float, alpha: float) -> float:
    if W == 1:
        return 0.0
    return 2 * (W - 1) / W * nbytes / bw_bytes + 2 * (W - 1) * alpha


def model_step(D: int, batch: int, W: int, *, mfu: float, link_gbit: float, alpha: float, bucket_mb: float,
               grad_bytes: int, overlap: bool, H: int = 1024, layers: int = 3, zdim: int = 8) -> dict:
    table = layer_table(D, H, layers, zdim)
    flops_image = 6 * sum(l["macs"] for l in table)
    t_compute = batch * flops_image / (ROOFLINE_FLOPS * mfu)
    t_fwd, t_bwd = t_compute / 3, 2 * t_compute / 3
    params = sum(l["params"] for l in table)
    t_opt = params * 4 * 4 / 3.35e12  # Adam reads/writes ~4 fp32 tensors per parameter at HBM3 speed
    buckets = ddp_buckets(table, bucket_mb * 2**20, grad_bytes)
    bw = link_gbit * GBIT
    comm_total, end = 0.0, 0.0
    for b in buckets:
        t = ring_allreduce_seconds(b["bytes"], W, bw, alpha)
        comm_total += t
        start = max(end, b["ready"] * t_bwd if overlap else t_bwd)
        end = start + t
    exposed = max(end - t_bwd, 0.0) if W > 1 else 0.0
    t_step = t_fwd + t_bwd + exposed + t_opt
    t_step1 = t_fwd + t_bwd + t_opt
    return {"D": D, "batch": batch, "W": W, "grad_bytes_per_param": grad_bytes, "overlap": overlap,
            "params": params, "bytes_per_step": params * grad_bytes, "gflop_per_image": flops_image / 1e9,
            "t_compute_ms": 1e3 * t_compute, "t_comm_ms": 1e3 * comm_total, "t_exposed_ms": 1e3 * exposed,
            "t_step_ms": 1e3 * t_step, "efficiency": t_step1 / t_step,
            "images_per_s_per_gpu": batch / t_step}


# ---------------------------------------------------------------------------------------
# CPU measurement
# ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_store(root: Path, D: int, n: int) -> Path:
    from distdrgn.simulate import simulate
    from distdrgn.store import ingest

    paths = simulate(root / "sim", n=n, D=D, snr=1.0, seed=0, progress=False, write_volumes=False)
    return Path(ingest(paths["particles.mrcs"], root / "store", poses=paths["poses.pkl"], ctf=paths["ctf.pkl"],
                       progress=False, layout_overrides={"target_chunk_bytes": D * D * 4 * 64}))


def _worker(rank: int, world: int, port: int, args, store_path: str, result_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from distdrgn.config import ModelConfig
    from distdrgn.loader import GlobalOrder, Metadata, StepSchedule, stream_batches
    from distdrgn.model import CryoDRGN, ModelInfo
    from distdrgn.objective import Preprocess, prepare_targets, vae_loss
    from distdrgn.store import ParticleStore

    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    store = ParticleStore.open(store_path)
    mcfg = ModelConfig(zdim=8, enc_dim=args.hidden, dec_dim=args.hidden, enc_layers=3, dec_layers=3)
    model = CryoDRGN(ModelInfo.from_config(mcfg, store.D, 0))
    ddp = DistributedDataParallel(model, bucket_cap_mb=25)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    prep = Preprocess(store.D, True, True, 0.85, 0.99, 1.0)
    meta = Metadata.from_store(store)
    chunks = [store.chunk_range(c) for c in range(store.n_chunks)]
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    rows = {"data": [], "compute": [], "allreduce": [], "synced": [], "optimizer": []}

    def batches(epoch):  # the training data path: the global order cut into global steps of W x B
        order = GlobalOrder(chunks, seed=0, epoch=epoch, window_chunks=4)
        schedule = StepSchedule(store.n, 0, world, args.batch)
        return schedule, stream_batches(str(store.path), store.D, order, schedule, rank, meta, num_workers=0)

    def loss_of(batch, net):
        t = prepare_targets(batch, prep, model.lattice)
        pred, mu, logvar = net(batch.rots, t.y_enc, sample=True)
        return vae_loss(pred, t, mu, logvar, 0.125).loss

    epoch, (schedule, it), step = 0, batches(0), 0
    for i in range(args.warmup + args.steps):
        if step == schedule.n_steps:
            epoch, step = epoch + 1, 0
            schedule, it = batches(epoch)
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        step += 1
        # compute alone: forward + backward with DDP's all-reduce switched off
        opt.zero_grad(set_to_none=True)
        with ddp.no_sync():
            loss_of(batch, ddp).backward()
        t2 = time.perf_counter()
        # the communication alone: all-reduce every gradient, in 25 MB buckets like DDP
        dist.barrier()
        t3 = time.perf_counter()
        grads = [p.grad for p in params]
        bucket, size = [], 0
        for g in reversed(grads):
            bucket.append(g)
            size += g.numel() * 4
            if size >= 25 * 2**20 or g is grads[0]:
                flat = torch.cat([x.reshape(-1) for x in bucket])
                dist.all_reduce(flat)
                bucket, size = [], 0
        t4 = time.perf_counter()
        # an ordinary DDP step: backward with the bucketed all-reduce overlapped
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        t5 = time.perf_counter()
        loss_of(batch, ddp).backward()
        t6 = time.perf_counter()
        opt.step()
        t7 = time.perf_counter()
        if i >= args.warmup:
            for k, v in (("data", t1 - t0), ("compute", t2 - t1), ("allreduce", t4 - t3), ("synced", t6 - t5),
                         ("optimizer", t7 - t6)):
                rows[k].append(v)
    out = {k: float(np.median(v)) for k, v in rows.items()}
    out.update(params=n_params, bytes_per_step=n_params * 4, world_size=world, D=store.D, hidden=args.hidden,
               batch=args.batch, threads=args.threads, steps=args.steps)
    # gloo's all-reduce time on this machine for the default model's fp32 gradient at D=128
    big = torch.zeros(sum(l["params"] for l in layer_table(128)))
    dist.barrier()
    t = time.perf_counter()
    for _ in range(2):
        dist.all_reduce(big)
    out["gloo_allreduce_s"] = (time.perf_counter() - t) / 2
    out["gloo_allreduce_bytes"] = big.numel() * 4
    if rank == 0:
        Path(result_path).write_text(json.dumps(out))
    dist.destroy_process_group()


def measure_cpu(args, store: Path, world: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        result = fh.name
    mp.spawn(_worker, args=(world, _free_port(), args, str(store), result), nprocs=world, join=True)
    out = json.loads(Path(result).read_text())
    os.unlink(result)
    return out


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

STRATEGIES = [
    ("no overlap, fp32 grads", dict(grad_bytes=4, overlap=False)),
    ("DDP buckets overlap, fp32 grads", dict(grad_bytes=4, overlap=True)),
    ("DDP buckets overlap, bf16 grads", dict(grad_bytes=2, overlap=True)),
]


def build_model_rows(args) -> list[dict]:
    rows = []
    for D in (128, 256):
        for batch in (16, 32, 64):
            for label, kw in STRATEGIES:
                for W in (1, 2, 8, 32, 64, 128, 256):
                    r = model_step(D, batch, W, mfu=args.mfu, link_gbit=args.link_gbit, alpha=args.alpha,
                                   bucket_mb=args.bucket_mb, **kw)
                    rows.append({**r, "strategy": label})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, D in zip(axes, (128, 256)):
        for (label, _), ls in zip(STRATEGIES, (":", "--", "-")):
            for batch, color in zip((16, 32, 64), ("C0", "C1", "C2")):
                sel = [r for r in rows if r["D"] == D and r["batch"] == batch and r["strategy"] == label]
                ax.plot([r["W"] for r in sel], [100 * r["efficiency"] for r in sel], ls, color=color, marker=".",
                        label=f"batch {batch}, {label}")
        ax.axhline(90, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs (W)")
        ax.set_title(f"D = {D} (modelled, 200 Gb/s ring)")
        ax.set_ylim(0, 101)
    axes[0].set_ylabel("weak-scaling efficiency (%)")
    axes[1].legend(fontsize=6.5, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--D", type=int, default=32, help="box of the CPU measurement (default 32)")
    ap.add_argument("--n", type=int, default=512, help="particles in the simulated store")
    ap.add_argument("--hidden", type=int, default=256, help="MLP width of the CPU measurement (default model: 1024)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--mfu", type=float, default=0.5, help="modelled fraction of the bf16 roofline")
    ap.add_argument("--link-gbit", type=float, default=200.0, help="per-GPU interconnect, Gb/s")
    ap.add_argument("--alpha", type=float, default=5e-6, help="latency per ring step, s")
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="DDP bucket_cap_mb")
    ap.add_argument("--skip-measure", action="store_true", help="only the model (reuses measured numbers in --out)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args(argv)

    json_path = args.out / "scaling.json"
    measured = []
    if args.skip_measure and json_path.exists():
        measured = json.loads(json_path.read_text()).get("measured_cpu", [])
    elif not args.skip_measure:
        with tempfile.TemporaryDirectory() as tmp:
            store = make_store(Path(tmp), args.D, args.n)
            measured = [measure_cpu(args, store, w) for w in (1, 2)]
    m0 = measured[0] if measured else {"D": args.D, "hidden": args.hidden, "batch": args.batch, "steps": args.steps}
    print(f"Measured on CPU ({os.cpu_count()} cores, gloo), D={m0['D']}, MLPs {m0['hidden']}x3, zdim 8, "
          f"batch {m0['batch']}/process, median of {m0.get('steps', args.steps)} steps, ms per step:")
    print(f"{'procs':>5} {'params':>9} {'MB/step':>8} {'data':>7} {'compute':>8} {'allreduce':>9} {'synced':>7} "
          f"{'optim':>6} {'gloo all-reduce of the D=128 gradient':>38}")
    for m in measured:
        print(f"{m['world_size']:>5} {m['params']:>9} {m['bytes_per_step'] / 1e6:>8.2f} {1e3 * m['data']:>7.1f} "
              f"{1e3 * m['compute']:>8.1f} {1e3 * m['allreduce']:>9.1f} {1e3 * m['synced']:>7.1f} "
              f"{1e3 * m['optimizer']:>6.1f} {1e3 * m['gloo_allreduce_s']:>10.0f} ms for {m['gloo_allreduce_bytes'] / 1e6:.0f} MB")

    rows = build_model_rows(args)
    print(f"\nModelled H100 weak scaling (compute at {args.mfu:.0%} of {ROOFLINE_FLOPS / 1e12:.0f} TFLOP/s, "
          f"{args.link_gbit:.0f} Gb/s ring, alpha {args.alpha * 1e6:.0f} us, {args.bucket_mb:.0f} MB buckets):")
    print(f"{'D':>4} {'batch':>5} {'strategy':<33} {'MB/step':>8} {'compute ms':>10} {'comm ms@32':>10} "
          f"{'E(32)':>6} {'E(256)':>6}")
    for D in (128, 256):
        for batch in (16, 32, 64):
            for label, _ in STRATEGIES:
                sel = {r["W"]: r for r in rows if r["D"] == D and r["batch"] == batch and r["strategy"] == label}
                r32, r256 = sel[32], sel[256]
                print(f"{D:>4} {batch:>5} {label:<33} {r32['bytes_per_step'] / 1e6:>8.1f} {r32['t_compute_ms']:>10.1f} "
                      f"{r32['t_comm_ms']:>10.1f} {100 * r32['efficiency']:>5.1f}% {100 * r256['efficiency']:>5.1f}%")
    args.out.mkdir(parents=True, exist_ok=True)
    assumptions = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    json_path.write_text(json.dumps({"assumptions": assumptions, "roofline_flops": ROOFLINE_FLOPS,
                                     "measured_cpu": measured, "model": rows}, indent=1))
    plot(rows, args.out / "scaling.png")
    print(f"\nwrote {json_path} and {args.out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
