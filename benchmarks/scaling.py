"""Scaling evidence: measured step-time split on CPU (1 and 2 gloo processes; with ``--hosts``
torchrun layouts: one node with 1/2/4 processes, and 1/2/4 "hosts" on this machine) and a
modelled weak-scaling efficiency on H100s with a 200 Gb/s interconnect.

    .venv/bin/python benchmarks/scaling.py [--D 32] [--hidden 256] [--steps 8] [--out benchmarks]
    .venv/bin/python benchmarks/scaling.py --hosts      # the torchrun layouts (root for the netns rows)

``--hosts`` starts, for each layout, either ``torchrun --standalone --nproc_per_node N`` or one
torchrun agent per host (``--nnodes N``, c10d rendezvous on the first host, as
launch/slurm_multinode.sbatch does per node): hosts are addresses 127.0.0.11.. on the loopback
(gloo bound to each address's own ``lo`` label as root), and, when network namespaces can be
made, hosts in their own namespaces joined by veth pairs and a bridge. Every process runs the
measurement below; the table is the mean over processes. All of it is measured; "all-reduce
exposed" is measured as a difference: the DDP forward + backward minus the same forward +
backward with DDP's communication off, per step (distdrgn.train reports data wait and step
time per step, ``distdrgn_data_wait_seconds`` / ``distdrgn_step_seconds``, but not the
all-reduce, hence this loop over the same model, loader and objective).

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
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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

    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = _measure(rank, world, args, store_path, gloo_probe=True)
    if rank == 0:
        Path(result_path).write_text(json.dumps(out))
    dist.destroy_process_group()


def _measure(rank: int, world: int, args, store_path: str, gloo_probe: bool) -> dict:
    """The step-time split of this process (medians over ``args.steps`` steps after warm-up);
    the process group is initialised."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from distdrgn.config import ModelConfig
    from distdrgn.loader import GlobalOrder, Metadata, StepSchedule, stream_batches
    from distdrgn.model import CryoDRGN, ModelInfo
    from distdrgn.objective import Preprocess, loss_terms, prepare_targets
    from distdrgn.store import ParticleStore

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
    rows = {"data": [], "compute": [], "allreduce": [], "synced": [], "optimizer": [], "exposed": []}

    def batches(epoch):  # the training data path: the global order cut into global steps of W x B
        order = GlobalOrder(chunks, seed=0, epoch=epoch, window_chunks=4)
        schedule = StepSchedule(store.n, 0, world, args.batch)
        return schedule, stream_batches(str(store.path), store.D, order, schedule, rank, meta, num_workers=0)

    def loss_of(batch, net):  # what distdrgn.train's step computes (fp32 on CPU)
        t = prepare_targets(batch, prep, model.lattice)
        mse, mu, logvar = net(batch.rots, t.y_enc, sample=True, y=t.y, ctf=t.ctf)
        return loss_terms(mse, mu, logvar, 0.125, model.lattice.n_masked, 1.0 / len(batch.rots)).loss

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
            # exposed all-reduce: the DDP forward + backward minus the same work without communication
            for k, v in (("data", t1 - t0), ("compute", t2 - t1), ("allreduce", t4 - t3), ("synced", t6 - t5),
                         ("optimizer", t7 - t6), ("exposed", (t6 - t5) - (t2 - t1))):
                rows[k].append(v)
    out = {k: float(np.median(v)) for k, v in rows.items()}
    out.update(params=n_params, bytes_per_step=n_params * 4, world_size=world, D=store.D, hidden=args.hidden,
               batch=args.batch, threads=args.threads, steps=args.steps)
    if gloo_probe:
        # gloo's all-reduce time on this machine for the default model's fp32 gradient at D=128
        big = torch.zeros(sum(l["params"] for l in layer_table(128)))
        dist.barrier()
        t = time.perf_counter()
        for _ in range(2):
            dist.all_reduce(big)
        out["gloo_allreduce_s"] = (time.perf_counter() - t) / 2
        out["gloo_allreduce_bytes"] = big.numel() * 4
    return out


def measure_cpu(args, store: Path, world: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        result = fh.name
    mp.spawn(_worker, args=(world, _free_port(), args, str(store), result), nprocs=world, join=True)
    out = json.loads(Path(result).read_text())
    os.unlink(result)
    return out


# ---------------------------------------------------------------------------------------
# Measured on several "hosts" of this machine: one torchrun agent per host
# ---------------------------------------------------------------------------------------
# A host is an address (127.0.0.1N on the loopback, or 10.251.0.1N on an eth0 in its own network
# namespace, whose veth peer is on a bridge in a hub namespace), the interface gloo binds to,
# and optionally the namespace to run in; the agents meet in a c10d rendezvous on the first
# host, as launch/slurm_multinode.sbatch has them do on the first node of an allocation.
# (tests/multihost.py does the same for the tests; a benchmark does not import tests.)


@dataclass(frozen=True)
class BenchHost:
    addr: str
    ifname: str  # GLOO_SOCKET_IFNAME
    netns: str | None = None

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def netns_unavailable() -> str | None:
    """Why network namespaces with veth pairs cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "no ip command (iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"bsprobe{os.getpid()}"
    r = _ip("netns", "add", name, check=False)
    if r.returncode:
        return f"ip netns add failed: {r.stderr.strip()}"
    try:
        r = _ip("-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1", check=False)
        if r.returncode:
            return f"no veth pairs in a namespace: {r.stderr.strip()}"
    finally:
        _ip("netns", "del", name, check=False)
    return None


@contextlib.contextmanager
def loopback_hosts(n: int):
    """127.0.0.11...; as root each address gets its own label on lo (lo:bsN), which gloo binds to."""
    added, hosts = [], []
    try:
        for i in range(1, n + 1):
            addr, label, ifname = f"127.0.0.{10 + i}", f"lo:bs{i}", "lo"
            if os.geteuid() == 0 and shutil.which("ip"):
                if _ip("addr", "add", f"{addr}/32", "dev", "lo", "label", label, check=False).returncode == 0:
                    added.append((addr, label))
                    ifname = label
            hosts.append(BenchHost(addr, ifname))
        yield hosts
    finally:
        for addr, label in added:
            _ip("addr", "del", f"{addr}/32", "dev", "lo", "label", label, check=False)


@contextlib.contextmanager
def netns_hosts(n: int):
    tag = f"bs{os.getpid() % 100000}"
    made = []
    try:
        hub = f"{tag}hub"
        _ip("netns", "add", hub)
        made.append(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        hosts = []
        for i in range(1, n + 1):
            ns, addr = f"{tag}h{i}", f"10.251.0.{10 + i}"
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", hub, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", hub, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            hosts.append(BenchHost(addr, "eth0", ns))
        yield hosts
    finally:
        for ns in reversed(made):
            _ip("netns", "del", ns, check=False)


def _worker_args(args, store: Path, result: Path) -> list[str]:
    return [str(Path(__file__).resolve()), "--worker", str(result), "--store", str(store), "--batch", str(args.batch),
            "--hidden", str(args.hidden), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--threads", str(args.threads)]


def torchrun_worker(args) -> int:
    """One process of a torchrun job (``--worker``): measure, and rank 0 writes every rank's split."""
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = _measure(rank, world, args, str(args.store), gloo_probe=False)
    out.update(rank=rank, host=os.environ.get("GLOO_SOCKET_IFNAME", ""), node_rank=int(os.environ.get("GROUP_RANK", 0)))
    outs = [None] * world
    dist.all_gather_object(outs, out)
    if rank == 0:
        Path(args.worker).write_text(json.dumps(outs))
    dist.destroy_process_group()
    return 0


def run_layout(layout: str, n: int, args, store: Path, tmp: Path) -> dict:
    """Run the measurement as ``n`` hosts x 1 process (``loopback``, ``netns``) or as one node
    with ``n`` processes (``node``: torchrun --standalone); mean over ranks of each column."""
    result, logs = tmp / f"{layout}{n}.json", []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    procs = []
    with contextlib.ExitStack() as stack:
        if layout == "node":
            logs.append(tmp / f"{layout}{n}.log")
            procs.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                           "--nproc_per_node", str(n), *_worker_args(args, store, result)],
                                          env=env, stdout=subprocess.DEVNULL, stderr=open(logs[-1], "wb")))
        else:
            hosts = stack.enter_context(loopback_hosts(n) if layout == "loopback" else netns_hosts(n))
            port = _free_port()
            for i, h in enumerate(hosts):
                logs.append(tmp / f"{layout}{n}.{i}.log")
                cmd = [*h.prefix(), sys.executable, "-m", "torch.distributed.run", "--nnodes", str(n),
                       "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{hosts[0].addr}:{port}",
                       "--rdzv-id", f"bench-{layout}{n}", "--rdzv-conf", f"is_host={int(i == 0)}",
                       "--local-addr", h.addr, *_worker_args(args, store, result)]
                procs.append(subprocess.Popen(cmd, env={**env, "GLOO_SOCKET_IFNAME": h.ifname,
                                                        "TP_SOCKET_IFNAME": h.ifname},
                                              stdout=subprocess.DEVNULL, stderr=open(logs[-1], "wb")))
        try:
            rcs = [p.wait(timeout=600) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    if any(rcs) or not result.exists():
        tails = "\n".join(f"--- {f}:\n{f.read_text(errors='replace')[-2000:]}" for f in logs)
        raise RuntimeError(f"{layout} x {n}: rc {rcs}\n{tails}")
    ranks = json.loads(result.read_text())
    row = {"layout": layout, "hosts": 1 if layout == "node" else n, "procs": n, "ranks": ranks}
    for k in ("data", "compute", "synced", "exposed", "allreduce", "optimizer"):
        row[k] = float(np.mean([r[k] for r in ranks]))
    row["step"] = row["data"] + row["synced"] + row["optimizer"]
    for k in ("params", "bytes_per_step", "D", "hidden", "batch", "threads", "steps"):
        row[k] = ranks[0][k]
    return row


LAYOUT_NAMES = {"node": "1 node x {n} processes", "loopback": "{n} hosts (loopback) x 1", "netns": "{n} hosts (netns+veth) x 1"}


def measure_layouts(args, store: Path) -> tuple[list[dict], list[str]]:
    """1, 2, 4 processes on one node; 1, 2, 4 hosts on loopback addresses; 2, 4 in namespaces."""
    rows, skipped = [], []
    plan = [("node", n) for n in (1, 2, 4)] + [("loopback", n) for n in (1, 2, 4)]
    if why := netns_unavailable():
        skipped.append(f"network namespaces: {why}")
    else:
        plan += [("netns", n) for n in (2, 4)]
    with tempfile.TemporaryDirectory() as tmp:
        for layout, n in plan:
            print(f"measuring {LAYOUT_NAMES[layout].format(n=n)} ...", flush=True)
            rows.append(run_layout(layout, n, args, store, Path(tmp)))
    return rows, skipped


def print_layouts(rows: list[dict]) -> None:
    m0 = rows[0]
    print(f"\nMeasured on this machine ({os.cpu_count()} cores, gloo, torchrun agents), D={m0['D']}, MLPs "
          f"{m0['hidden']}x3, zdim 8, batch {m0['batch']}/process, {m0['threads']} thread(s)/process, median of "
          f"{m0['steps']} steps per process, mean over processes, ms per step (every column measured):")
    print(f"{'layout':<30} {'data wait':>9} {'compute':>8} {'DDP f+b':>8} {'AR exposed':>10} {'AR alone':>8} "
          f"{'optim':>6} {'step':>7}")
    for r in rows:
        print(f"{LAYOUT_NAMES[r['layout']].format(n=r['procs']):<30} {1e3 * r['data']:>9.1f} {1e3 * r['compute']:>8.1f} "
              f"{1e3 * r['synced']:>8.1f} {1e3 * r['exposed']:>10.1f} {1e3 * r['allreduce']:>8.1f} "
              f"{1e3 * r['optimizer']:>6.1f} {1e3 * r['step']:>7.1f}")
    print("  data wait = blocked on the loader; compute = forward + backward with DDP's sync off (no_sync);"
          "\n  DDP f+b = the same forward + backward as an ordinary DDP step; AR exposed = DDP f+b - compute"
          "\n  (per step, then the median: the all-reduce time DDP's overlap does not hide); AR alone = an"
          "\n  explicit all-reduce of every gradient in 25 MB buckets; step = data wait + DDP f+b + optim.")


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
    ap.add_argument("--hosts", action="store_true",
                    help="measure torchrun layouts instead: 1 node x 1/2/4 processes, 1/2/4 hosts on loopback "
                         "addresses, 2/4 hosts in network namespaces (root); the mp.spawn numbers are kept")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a torchrun process of --hosts
    ap.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args(argv)
    if args.worker:
        return torchrun_worker(args)

    json_path = args.out / "scaling.json"
    previous = json.loads(json_path.read_text()) if json_path.exists() else {}
    measured = []
    layouts = {k: previous[k] for k in ("measured_hosts", "measured_hosts_skipped", "measured_hosts_run")
               if k in previous}
    if (args.skip_measure or args.hosts) and previous:
        measured = previous.get("measured_cpu", [])
    if not args.skip_measure:
        with tempfile.TemporaryDirectory() as tmp:
            store = make_store(Path(tmp), args.D, args.n)
            if args.hosts:
                rows, skipped = measure_layouts(args, store)
                layouts = {"measured_hosts": rows, "measured_hosts_skipped": skipped,
                           "measured_hosts_run": {"command": " ".join(["benchmarks/scaling.py", *(argv or sys.argv[1:])]),
                                                  "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                                  "cpus": os.cpu_count()}}
            else:
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

    if layouts.get("measured_hosts"):
        print_layouts(layouts["measured_hosts"])
        for why in layouts.get("measured_hosts_skipped", []):
            print(f"  not measured: {why}")

    rows = build_model_rows(args)
    print(f"\nModelled (not measured) H100 weak scaling (compute at {args.mfu:.0%} of {ROOFLINE_FLOPS / 1e12:.0f} TFLOP/s, "
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
                                     "measured_cpu": measured, **layouts, "model": rows}, indent=1))
    plot(rows, args.out / "scaling.png")
    print(f"\nwrote {json_path} and {args.out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
