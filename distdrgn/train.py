"""Train a cryoDRGN VAE (or a homogeneous model, zdim = 0) on a particle store.

    python -m distdrgn.train CONFIG.yaml [section.key=value ...]
    torchrun --nproc_per_node N -m distdrgn.train CONFIG.yaml ...
    distdrgn train CONFIG.yaml ...

Single process, or DDP under torchrun (NCCL on GPU, gloo on CPU). Rank 0 logs and writes
the run directory; an existing run directory is resumed from its latest ``weights.N.pkl``.
Reads top-down: setup, resume, the training step, the epoch loop, checkpoints.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from distdrgn.checkpoint import checkpoint_epochs, load_weights, save_weights, save_z
from distdrgn.config import Config, dump_config, load_config
from distdrgn.encode import encode_segment, gather_segments
from distdrgn.errors import DistdrgnError, StoreError
from distdrgn.loader import Metadata, WindowDataset, iterate_batches, plan_epoch
from distdrgn.metrics import TrainingMetrics
from distdrgn.model import CryoDRGN, ModelInfo
from distdrgn.objective import Batch, Preprocess, hartley_std, parse_beta, prepare_targets, vae_loss

log = logging.getLogger("distdrgn.train")
progress_log = logging.getLogger("distdrgn.train.progress")  # run.log only (the console has the tqdm bar)


# ---------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None = full fp32

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_runtime(cfg: Config) -> Runtime:
    """Process group from torchrun's env vars (if any), device, mixed precision."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise DistdrgnError("train.device=cuda but no CUDA device is available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo", device_id=device if want_cuda else None)
    rank = dist.get_rank() if world_size > 1 else 0
    amp = str(cfg.train.amp).lower()
    use_amp = amp == "true" or (amp == "auto" and device.type == "cuda")
    return Runtime(rank, world_size, device, torch.bfloat16 if use_amp else None)


def check_engine(cfg: Config) -> None:
    if cfg.train.engine == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise DistdrgnError("train.engine=deepspeed: DeepSpeed is not installed (and not supported yet); use train.engine=ddp") from None
        raise DistdrgnError("train.engine=deepspeed is not supported yet; use train.engine=ddp")


def setup_logging(out_dir: Path, is_main: bool) -> None:
    """Rank 0: ``log`` to run.log and stderr, ``progress_log`` to run.log only; others: warnings."""
    for logger in (log, progress_log):
        logger.setLevel(logging.INFO if is_main else logging.WARNING)
        logger.propagate = False
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
    if is_main:
        fh = logging.FileHandler(out_dir / "run.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        for logger in (log, progress_log):
            logger.addHandler(fh)
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(sh)


def open_store(cfg: Config):
    from distdrgn.store import ParticleStore

    if not cfg.data.store:
        raise DistdrgnError("data.store is not set (give it in the config or as data.store=PATH)")
    return ParticleStore.open(cfg.data.store, level=cfg.data.level)


def choose_ht_std(store, cfg: Config) -> tuple[float, str]:
    """The Hartley normalisation: the store's statistic when it matches the window, else estimated."""
    d = cfg.data
    default_window = (d.window_inner, d.window_outer) == (0.85, 0.99)
    try:
        norm = store.norm()
    except StoreError:
        norm = {}
    key = "ht_std" if d.window else "ht_std_nowindow"
    if (default_window or not d.window) and norm.get(key):
        return float(norm[key]), f"store ({key})"
    rng = np.random.default_rng(cfg.train.seed)
    idx = np.sort(rng.choice(store.n, size=min(store.n, d.norm_images), replace=False))
    prep = Preprocess(store.D, d.invert, d.window, d.window_inner, d.window_outer)
    return hartley_std(torch.from_numpy(store.images(idx)), prep), f"estimated on {len(idx)} images"


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """The RNG (reparameterisation noise) is a function of (seed, epoch, rank): resumable."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))


# ---------------------------------------------------------------------------------------
# The training step
# ---------------------------------------------------------------------------------------


def train_step(model, optimizer, batch: Batch, prep: Preprocess, lattice, beta: float, weight: float, rt: Runtime):
    targets = prepare_targets(batch, prep, lattice)
    with torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.bfloat16, enabled=rt.amp_dtype is not None):
        pred, mu, logvar = model(batch.rots, targets.y_enc, sample=True)
    terms = vae_loss(pred, targets, mu, logvar, beta, weight)
    optimizer.zero_grad(set_to_none=True)
    terms.loss.backward()
    optimizer.step()
    return terms


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------

LOSS_COLUMNS = ["epoch", "loss", "mse", "kl", "beta", "images", "seconds", "images_per_second"]


def append_loss_row(out_dir: Path, row: dict) -> None:
    path = out_dir / "loss.csv"
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, LOSS_COLUMNS)
        if new:
            w.writeheader()
        w.writerow(row)


def truncate_loss_rows(out_dir: Path, last_epoch: int) -> None:
    """Drop rows after ``last_epoch`` (left by an interrupted run) before resuming."""
    path = out_dir / "loss.csv"
    if not path.exists():
        return
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) <= last_epoch]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, LOSS_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def plot_loss(out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out_dir / "loss.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(epochs, [float(r["loss"]) for r in rows], "o-", label="loss")
    ax[0].plot(epochs, [float(r["mse"]) for r in rows], "s--", label="MSE")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    ax[1].plot(epochs, [float(r["kl"]) for r in rows], "o-", color="C2")
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("KL per image")
    fig.tight_layout()
    tmp = out_dir / ".loss.png.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_dir / "loss.png")


def copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def write_checkpoint(epoch, cfg, model, optimizer, info, prep, store, out_dir, rt, zs, final: bool) -> None:
    """weights.N.pkl (+ z.N.pkl); with ``final`` also weights.pkl / z.pkl. Rank 0 writes."""
    rng_cpu = torch.get_rng_state()
    rng_all = [None] * rt.world_size
    if rt.distributed:
        dist.all_gather_object(rng_all, rng_cpu)
    else:
        rng_all = [rng_cpu]
    if not rt.is_main:
        return
    payload = {
        "epoch": epoch,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "scaler_state_dict": None,  # bf16 autocast needs no loss scaling
        "model_info": asdict(info),
        "preprocess": asdict(prep),
        "config": cfg.to_dict(),
        "rng": {"torch_cpu": rng_all, "world_size": rt.world_size},
        "store": {"path": str(store.path), "n": store.n, "D": store.D, "apix": store.apix},
    }
    save_weights(out_dir / f"weights.{epoch}.pkl", payload)
    if zs is not None:
        save_z(out_dir / f"z.{epoch}.pkl", *zs)
    if final:
        copy_atomic(out_dir / f"weights.{epoch}.pkl", out_dir / "weights.pkl")
        if zs is not None:
            copy_atomic(out_dir / f"z.{epoch}.pkl", out_dir / "z.pkl")


# ---------------------------------------------------------------------------------------
# The program
# ---------------------------------------------------------------------------------------


def train(cfg: Config) -> Path:
    """Run (or resume) training as configured; returns the run directory."""
    check_engine(cfg)
    if not cfg.output.dir:
        raise DistdrgnError("output.dir is not set (give it in the config or as output.dir=PATH)")
    rt = init_runtime(cfg)
    try:
        return _train(cfg, rt)
    finally:
        if rt.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: Config, rt: Runtime) -> Path:
    out_dir = Path(cfg.output.dir)
    store = open_store(cfg)
    meta = Metadata.from_store(store)
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if rt.distributed:
        dist.barrier()
    setup_logging(out_dir, rt.is_main)

    # ---- resume or start -------------------------------------------------------------
    done = checkpoint_epochs(out_dir)
    ckpt = load_weights(out_dir / f"weights.{done[-1]}.pkl") if done else None
    start_epoch = ckpt["epoch"] + 1 if ckpt else 0
    if ckpt:
        prep = Preprocess(**ckpt["preprocess"])
        info = ModelInfo(**ckpt["model_info"])
        if info != ModelInfo.from_config(cfg.model, store.D, cfg.train.seed):
            raise DistdrgnError(f"{out_dir}: the run was started with another model or box size; use a new output.dir")
        norm_source = "checkpoint"
    else:
        ht_std, norm_source = choose_ht_std(store, cfg)
        prep = Preprocess(store.D, cfg.data.invert, cfg.data.window, cfg.data.window_inner, cfg.data.window_outer, ht_std)
        info = ModelInfo.from_config(cfg.model, store.D, cfg.train.seed)
    if rt.is_main:
        (out_dir / "config.yaml").write_text(dump_config(cfg))
        truncate_loss_rows(out_dir, start_epoch - 1)
    log.info(
        "store %s: %d images, D=%d, %d chunks of %d; %d process(es) on %s, amp=%s; Hartley std %.5g (%s)",
        store.path, store.n, store.D, store.n_chunks, store.chunk_images, rt.world_size, rt.device,
        rt.amp_dtype, prep.ht_std, norm_source,
    )

    model = CryoDRGN(info).to(rt.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if ckpt:
        model.load_state_dict(ckpt["model_state_dict"])
        optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        log.info("resumed from weights.%d.pkl: continuing at epoch %d", ckpt["epoch"], start_epoch)
    ddp_model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None) if rt.distributed else model
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: zdim=%d, encoder %s %dx%d, decoder %dx%d, pe %s (pe_dim %d), domain %s; %d parameters",
             info.zdim, info.encoder, info.enc_layers, info.enc_dim, info.dec_layers, info.dec_dim, info.pe_type,
             info.pe_dim, info.domain, n_params)

    metrics = TrainingMetrics() if rt.is_main and cfg.metrics.port is not None else None
    if metrics:
        metrics.serve(cfg.metrics.port)
        log.info("serving Prometheus metrics on port %d", cfg.metrics.port)
    beta_at = parse_beta(cfg.train.beta, info.zdim)
    chunks = [store.chunk_range(c) for c in range(store.n_chunks)]
    try:
        if start_epoch >= cfg.train.epochs:
            log.info("nothing to do: %d epoch(s) already trained (train.epochs=%d)", start_epoch, cfg.train.epochs)
            if rt.is_main and not (out_dir / "weights.pkl").exists():  # interrupted before the final copy
                copy_atomic(out_dir / f"weights.{start_epoch - 1}.pkl", out_dir / "weights.pkl")
                if (out_dir / f"z.{start_epoch - 1}.pkl").exists():
                    copy_atomic(out_dir / f"z.{start_epoch - 1}.pkl", out_dir / "z.pkl")
        for epoch in range(start_epoch, cfg.train.epochs):
            plan = plan_epoch(chunks, seed=cfg.train.seed, epoch=epoch, rank=rt.rank, world_size=rt.world_size,
                              batch_size=cfg.train.batch_size, window_chunks=cfg.train.shuffle_chunks)
            run_epoch(epoch, plan, ddp_model, model, optimizer, prep, store, meta, cfg, rt, beta_at, metrics, out_dir)
            last = epoch == cfg.train.epochs - 1
            if last or (epoch + 1) % cfg.train.checkpoint_every == 0:
                zs = None
                if info.zdim:
                    mu, logvar = encode_segment(model, prep, store, batch_size=max(64, cfg.train.batch_size),
                                                rank=rt.rank, world_size=rt.world_size, device=rt.device,
                                                amp_dtype=rt.amp_dtype, num_workers=cfg.train.num_workers)
                    zs = gather_segments(mu, logvar, store.n, rt.world_size)
                write_checkpoint(epoch, cfg, model, optimizer, info, prep, store, out_dir, rt, zs, final=last)
                if rt.is_main:
                    plot_loss(out_dir)
                    log.info("epoch %d: wrote weights.%d.pkl%s", epoch, epoch, f" and z.{epoch}.pkl" if zs else "")
                if metrics:
                    metrics.checkpoint_written()
    finally:
        if metrics:
            metrics.close()
    return out_dir


def run_epoch(epoch, plan, ddp_model, model, optimizer, prep, store, meta, cfg, rt, beta_at, metrics, out_dir):
    """One pass over the data; rank 0 shows progress and appends the epoch's row to loss.csv."""
    seed_epoch(cfg.train.seed, epoch, rt.rank)
    model.train()
    dataset = WindowDataset(str(store.path), store.D, plan)
    batches = iterate_batches(dataset, meta, num_workers=cfg.train.num_workers, pin_memory=rt.device.type == "cuda")
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # loss, mse, kl (image-weighted), images
    bar = tqdm(total=int(plan.batch_sizes.sum()), desc=f"epoch {epoch}", unit="img", disable=not rt.is_main,
               dynamic_ncols=True, leave=False)
    t_epoch = t_log = time.perf_counter()
    images_since_log = 0
    for step in range(plan.n_steps):
        t0 = time.perf_counter()
        batch = next(batches).to(rt.device, non_blocking=True)
        t_data = time.perf_counter() - t0
        beta = beta_at(epoch + step / max(plan.n_steps, 1))
        terms = train_step(ddp_model, optimizer, batch, prep, model.lattice, beta, plan.loss_weight(step), rt)
        b = len(batch.indices)
        sums += torch.stack([terms.mse.double() * b + beta * terms.kl.double() * b / model.lattice.n_masked,
                             terms.mse.double() * b, terms.kl.double() * b,
                             torch.tensor(float(b), dtype=torch.float64, device=rt.device)])
        global_images = int(plan.batch_sizes[step].sum())
        images_since_log += global_images
        bar.update(global_images)
        if metrics:
            metrics.images.inc(global_images)
            metrics.step_seconds.set(time.perf_counter() - t0)
            metrics.data_wait_seconds.set(t_data)
        if rt.is_main and ((step + 1) % cfg.train.log_every == 0 or step == plan.n_steps - 1):
            now = time.perf_counter()
            rate = images_since_log / max(now - t_log, 1e-9)
            loss, kl = float(terms.mse) + beta * float(terms.kl) / model.lattice.n_masked, float(terms.kl)
            eta = (bar.total - bar.n) / max(rate, 1e-9)
            bar.set_postfix(loss=f"{loss:.4g}", kl=f"{kl:.3g}", refresh=False)
            progress_log.info("epoch %d step %d/%d: %.1f img/s, loss %.5g, KL %.4g, ETA %.0fs", epoch, step + 1,
                      plan.n_steps, rate, loss, kl, eta)
            if metrics:
                metrics.images_per_second.set(rate)
                metrics.loss.set(loss)
                metrics.mse.set(float(terms.mse))
                metrics.kl.set(kl)
                metrics.epoch.set(epoch)
                if rt.device.type == "cuda":
                    metrics.gpu_memory.set(torch.cuda.max_memory_allocated(rt.device))
            t_log, images_since_log = now, 0
    bar.close()
    if rt.distributed:
        dist.all_reduce(sums)
    loss, mse, kl, n = (sums / torch.clamp(sums[3], min=1)).tolist()[:3] + [int(sums[3])]
    seconds = time.perf_counter() - t_epoch
    if rt.is_main:
        beta = beta_at(epoch)
        log.info("epoch %d/%d: loss %.6g (MSE %.6g, KL %.4g, beta %.4g), %d images in %.1fs = %.1f img/s "
                 "(%.1f per process)", epoch, cfg.train.epochs - 1, loss, mse, kl, beta, n, seconds,
                 n / seconds, n / seconds / rt.world_size)
        append_loss_row(out_dir, {"epoch": epoch, "loss": loss, "mse": mse, "kl": kl, "beta": beta, "images": n,
                                  "seconds": round(seconds, 3), "images_per_second": round(n / seconds, 2)})


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m distdrgn.train", description=__doc__.splitlines()[0])
    add_args(parser)
    args = parser.parse_args(argv)
    try:
        run_from_args(args)
    except DistdrgnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def add_args(parser) -> None:
    parser.add_argument("config", help="YAML config file (configs/default.yaml documents every key)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.epochs=3")


def run_from_args(args) -> Path:
    return train(load_config(args.config, args.overrides))


if __name__ == "__main__":
    sys.exit(main())
