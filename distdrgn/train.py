"""Train a cryoDRGN VAE (or a homogeneous model, zdim = 0) on a particle store.

    python -m distdrgn.train [CONFIG] [section.key=value ...]
    torchrun --nproc_per_node N -m distdrgn.train CONFIG ...
    distdrgn train [CONFIG] ...

CONFIG is a YAML file or a packaged config by name (``tiny``, ``default``, ``large``); without
it every key has its default. Single process, or DDP / DeepSpeed under torchrun (NCCL on GPU,
gloo on CPU). Rank 0 logs and writes the run directory. An existing run directory is resumed
from its newest readable checkpoint with any number of processes: the data position is
(epoch, images consumed) of a world-size-independent order (:mod:`distdrgn.loader`), so a
killed or preempted job costs at most the steps since the last step checkpoint.

Reads top-down: set-up, the training step, the epoch, the program. The components own their
policy: :mod:`distdrgn.checkpointer` (when and what to save, where to resume),
:mod:`distdrgn.loader` (the data order and batches), :mod:`distdrgn.nonfinite` (skipped
steps), :mod:`distdrgn.progress` (console, run.log, loss.csv), :mod:`distdrgn.preemption`
(SIGTERM / SIGINT), :mod:`distdrgn.debug` (the ``debug`` section).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from distdrgn.checkpoint import DataPosition, _atomic_write, load_weights
from distdrgn.checkpointer import Checkpointer, check_resumable, find_checkpoint
from distdrgn.config import Config, describe_keys, dump_config, load_config, split_config_arguments
from distdrgn.debug import DebugHooks
from distdrgn.encode import encode_segment, gather_segments
from distdrgn.engine import Engine, build_engine
from distdrgn.errors import DistdrgnError, Stopped, StoreError
from distdrgn.kernels import choose_kernels
from distdrgn.loader import EpochBatches, Metadata, training_batches
from distdrgn.metrics import TrainingMetrics
from distdrgn.model import CryoDRGN, ModelInfo
from distdrgn.nonfinite import NonfiniteGuard, nonfinite_on_any_rank
from distdrgn.objective import (Batch, Preprocess, hartley_std, loss_terms, parse_beta, per_image_loss, prepare_targets,
                                within)
from distdrgn.output_paths import nearest_existing
from distdrgn.preemption import StopRequest
from distdrgn.particle_table import ParticleTable
from distdrgn.pose_training import (COLLAPSE_RISE, build_particle_table, class_model_config, collapse_epoch,
                                    pose_source, start_epoch)
from distdrgn.progress import EpochProgress, LossTable, setup_logging
from distdrgn.runtime import Runtime, close_process_group, init_runtime

log = logging.getLogger("distdrgn.train")


# ---------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------


def check_run_dir(out_dir: Path) -> None:
    """``output.dir`` must be a folder this process can write, or creatable: every rank checks
    (the same answer on a shared file system) so that none waits for a rank 0 that failed."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DistdrgnError(f"output.dir={out_dir}: exists and is not a folder")
    existing = nearest_existing(out_dir)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DistdrgnError(f"output.dir={out_dir}: {existing} is not writable")


def open_store(cfg: Config):
    from distdrgn.store import ParticleStore

    if not cfg.data.store:
        raise DistdrgnError("data.store is not set (give it in the config or as data.store=PATH)")
    # every chunk read is checked against its ingest checksum unless data.allow_unverified
    return ParticleStore.open(cfg.data.store, level=cfg.data.level, verify_chunks=not cfg.data.allow_unverified)


def training_subset(cfg: Config, store) -> np.ndarray | None:
    """``data.ind``: the sorted store positions to train on (cryoDRGN ``--ind``), or None."""
    if cfg.data.ind is None:
        return None
    from distdrgn.formats.ind import load_indices

    keep = load_indices(cfg.data.ind, store.n)
    unique = np.unique(keep)
    if len(unique) != len(keep):
        raise DistdrgnError(f"data.ind={cfg.data.ind}: {len(keep) - len(unique)} repeated indices; "
                            "each particle can be trained on once per epoch")
    return unique


def check_verification(store, cfg: Config) -> str | None:
    """Refuse a store whose last ``store verify`` failed (a never-verified store is accepted);
    with ``data.allow_unverified`` return the warning to log instead."""
    record = store.verification
    if not record or record.get("ok"):
        return None
    where = (f"chunk {record['chunk']} (images {record['images'][0]}-{record['images'][1]}) at box {record['level']}"
             if "chunk" in record else record.get("error", "unknown problem"))
    problem = f"{store.path}: its last verification ({record.get('time')}) failed: {where}"
    if not cfg.data.allow_unverified:
        raise StoreError(f"{problem}; re-ingest the store, or set data.allow_unverified=true to train on it anyway")
    return f"warning: {problem}; training on it anyway (data.allow_unverified=true)"


def choose_ht_std(store, cfg: Config) -> tuple[float, str]:
    """The Hartley normalisation: std of the symmetrised HT of the images *before* the window.

    cryoDRGN (4.3.1 checked) estimates it on unwindowed images and then divides the windowed
    ones by it; doing the same keeps the balance between the error term and the KL (beta)
    identical. The store's statistic is used when present, else it is estimated.
    """
    try:
        value = store.norm().get("ht_std_nowindow")
    except StoreError:
        value = None
    if value:
        return float(value), "store (ht_std_nowindow)"
    d = cfg.data
    rng = np.random.default_rng(cfg.train.seed)
    idx = np.sort(rng.choice(store.n, size=min(store.n, d.norm_images), replace=False))
    prep = Preprocess(store.D, d.invert, window=False)
    return hartley_std(torch.from_numpy(store.images(idx)), prep), f"estimated on {len(idx)} images"


def preprocessing_and_model(cfg: Config, store, ckpt: dict | None) -> tuple[Preprocess, ModelInfo, str]:
    """(image preprocessing, model description, where the normalisation came from): the
    checkpoint's when resuming, else from the config and the store."""
    if ckpt:
        return Preprocess(**ckpt["preprocess"]), ModelInfo(**ckpt["model_info"]), "checkpoint"
    ht_std, source = choose_ht_std(store, cfg)
    d = cfg.data
    prep = Preprocess(store.D, d.invert, d.window, d.window_inner, d.window_outer, ht_std)
    return prep, ModelInfo.from_config(cfg.model, store.D, cfg.train.seed), source


def load_initial_weights(model: CryoDRGN, path: Path) -> None:
    """``train.load``: the model parameters of another run's checkpoint, distdrgn's or cryoDRGN's
    (a weights.N.pkl next to its config.yaml); not its optimizer or epoch."""
    from distdrgn import cryodrgn_run

    if cryodrgn_run.is_cryodrgn_run(path):
        theirs_model = cryodrgn_run.load_cryodrgn_run(path, need_encoder=model.encoder is not None).model
        theirs, state = theirs_model.info, theirs_model.state_dict()
    else:
        ckpt = load_weights(path)
        theirs, state = ModelInfo(**ckpt["model_info"]), ckpt["model_state_dict"]
    if (theirs.D, theirs.enc_hidden, theirs.dec_hidden) != (model.info.D, model.info.enc_hidden, model.info.dec_hidden):
        raise DistdrgnError(f"train.load={path}: its model (box {theirs.D}, {theirs.enc_hidden} encoder and "
                            f"{theirs.dec_hidden} decoder hidden layers) is not the one configured")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DistdrgnError(f"train.load={path}: weights do not fit the configured model "
                            f"({str(exc).splitlines()[0]})") from None


def build_training_model(cfg: Config, rt: Runtime, info: ModelInfo, ckpt: dict | None) -> tuple[CryoDRGN, Engine]:
    """The model on the device (from ``train.load`` on a fresh start), its kernels, and the
    engine around it with the checkpoint's state when resuming."""
    model = CryoDRGN(info)
    if not ckpt and cfg.train.load:
        load_initial_weights(model, Path(cfg.train.load))
        log.info("started from the weights of %s", cfg.train.load)
    model = model.to(rt.device)
    model.kernels, why, warning = choose_kernels(model, cfg.model.kernels, rt.device, rt.amp_dtype)
    if warning:
        log.warning(warning)
    log.info("decoder kernels: %s (%s)", model.kernels, why)
    engine = build_engine(model, cfg, rt)
    if ckpt:
        engine.load_state_dict(ckpt)
    log.info("engine: %s%s", engine.name, f" (ZeRO stage {cfg.train.zero_stage})" if engine.name == "deepspeed" else "")
    encoder = (f"z table (autodecoder, {info.zdim} per particle)" if info.encoder == "autodecoder"
               else f"{info.encoder} {info.enc_layers}x{info.enc_dim}")
    log.info("model: zdim=%d, encoder %s, decoder %dx%d, pe %s (pe_dim %d), domain %s; %d parameters",
             info.zdim, encoder, info.dec_layers, info.dec_dim, info.pe_type, info.pe_dim, info.domain,
             sum(p.numel() for p in model.parameters()))
    return model, engine


def seed_step(seed: int, epoch: int, consumed: int, rank: int) -> None:
    """Reseed before each step: the noise is a function of (seed, epoch, data position, rank),
    so a run resumed from any step checkpoint draws what an uninterrupted one would."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, consumed, rank]).generate_state(1)[0]))


# ---------------------------------------------------------------------------------------
# The training step
# ---------------------------------------------------------------------------------------


def train_step(engine: Engine, batch: Batch, prep: Preprocess, lattice, beta: float, weight: float, rt: Runtime,
               table: ParticleTable | None = None):
    """Forward, backward and (unless a loss or gradient is non-finite on any rank) the optimizer step.

    Returns (loss terms, nonfinite): a 0-d float32 tensor on the device, 1.0 when the step
    was skipped; every rank takes the same decision. Nothing here waits for the device
    (with the DDP engine), so the caller reads the flag a step later. ``table``: the run's
    per-particle table (abinit, pose refinement, autodecoder), which gives the batch its poses
    (and z) and, when they are learned,
    takes its own step from the same backward.
    """
    z = None  # an autodecoder's rows; otherwise the encoder's
    if table is not None:  # searched now (abinit), or learnable corrections of the table's poses
        batch, z = table.batch(batch)
    targets = prepare_targets(batch, prep, lattice)
    if table is not None and table.loss_weight is not None:  # frequency marching: fit what the search compares
        targets = within(targets, table.loss_weight)
    with torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.bfloat16, enabled=rt.amp_dtype is not None):
        mse, mu, logvar = engine(batch.rots, targets.y_enc, sample=True, y=targets.y, ctf=targets.ctf, z=z)
    terms = loss_terms(mse, mu, logvar, beta, lattice.n_masked, weight)
    if table is not None and table.support_prior is not None:  # abinit: the map must be compact
        # once per step, at the z of one image: weighted as the images' mean is, so the
        # gradient of the step is that of mean(image loss) + prior over all ranks
        z_prior = None if engine.module.zdim == 0 else (z if z is not None else mu)[:1]
        terms.loss = terms.loss + table.support_prior(engine.module.decoder, z_prior) * (weight * len(batch.indices))
    engine.zero_grad()
    engine.backward(terms.loss)
    nonfinite = nonfinite_on_any_rank(terms.loss, engine.module, rt)
    engine.step_unless(nonfinite)
    if table is not None:
        table.step_unless(nonfinite)
    return terms, nonfinite


# ---------------------------------------------------------------------------------------
# One epoch
# ---------------------------------------------------------------------------------------


def run_epoch(epoch: int, batches: EpochBatches, carried: DataPosition, *, step, n_masked: int, beta_at, seed: int,
              rt: Runtime, checkpointer: Checkpointer, guard: NonfiniteGuard, progress: EpochProgress,
              debug: DebugHooks, stop: StopRequest) -> tuple[list[float], float]:
    """Train on ``batches`` (the epoch from image ``batches.start`` on) with ``step(batch, beta,
    weight)`` (:func:`train_step`, or its CUDA-graph replay). Returns the epoch's image-weighted
    (loss, mse, kl, images) over all ranks and its seconds, ``carried`` (the part trained before
    a restart) included. Raises :class:`Stopped` after a step checkpoint when ``stop`` says a
    signal asked to stop."""
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # loss, mse, kl (image-weighted), images
    if rt.is_main:  # the part of the epoch trained before the restart, counted once
        sums += torch.tensor(carried.sums, dtype=torch.float64, device=rt.device)
    pending = None  # (epoch, step, batch, non-finite flag) of the step before, read after the next is queued
    t_epoch, t0 = time.perf_counter(), time.perf_counter()
    for s in batches:
        t_data = time.perf_counter() - t0
        seed_step(seed, epoch, s.lo, rt.rank)
        beta = beta_at(epoch - 1 + s.lo / batches.n)  # the schedule counts epochs trained, from 0
        terms, nonfinite = step(s.batch, beta, s.loss_weight)
        # the epoch's totals count the images of the steps taken: masked on the device, no wait
        mse, kl = terms.mse.double(), terms.kl.double()
        per_image = torch.stack([per_image_loss(mse, kl, beta, n_masked), mse, kl, torch.ones_like(mse)])
        sums += torch.where(nonfinite > 0, 0.0, per_image * len(s.batch.indices))  # where: NaN * 0 is NaN
        if pending is not None:  # the previous step's flag: its kernels are done by now
            guard.record(*pending)
        pending = (epoch, s.step, s.batch, nonfinite)
        debug.after_step(epoch, s.lo, s.batch.indices)
        progress.update(s.step, s.hi - s.lo, terms, beta, time.perf_counter() - t0, t_data)
        seconds = carried.seconds + time.perf_counter() - t_epoch
        if stop.agreed():  # every rank stops after this same step
            progress.close()
            checkpointer.save_step(epoch, s.hi, sums, seconds)
            message = (f"stopped by {stop.name} at epoch {epoch} step {s.step + 1} (image {s.hi} of {batches.n}); "
                       "rerun the same command to resume")
            log.warning(message)
            raise Stopped(message, stop.signum)
        if checkpointer.step_due(s.step, s.hi, batches.n):
            checkpointer.save_step(epoch, s.hi, sums, seconds)
        t0 = time.perf_counter()
    if pending is not None:
        guard.record(*pending)
    progress.close()
    if rt.distributed:
        torch.distributed.all_reduce(sums)
    return sums.tolist(), carried.seconds + time.perf_counter() - t_epoch


# ---------------------------------------------------------------------------------------
# The program
# ---------------------------------------------------------------------------------------


def train(cfg: Config, search: bool = False) -> Path:
    """Run (or resume) training as configured; returns the run directory. ``search``: the
    poses come from the pose search, not the store (``distdrgn abinit``)."""
    if not cfg.output.dir:
        raise DistdrgnError("output.dir is not set (give it in the config or as output.dir=PATH)")
    rt = init_runtime(cfg.train.device, cfg.train.amp, cfg.train.engine)
    try:
        with StopRequest(rt.device, rt.distributed) as stop:
            source = pose_source(cfg, search)
            if source == "search":
                cfg = class_model_config(cfg)  # abinit.classes: the decoder's z is a one-hot class
            if source == "search" and cfg.abinit.attempts > 1:  # several seeds; continue from the best
                from distdrgn.attempts import run_attempts

                cfg = run_attempts(cfg, rt, lambda attempt: run_training(attempt, rt, stop, source))
            out_dir = run_training(cfg, rt, stop, source)
        rt.barrier()  # leave together: a gloo rank torn down while its peers still write can abort
    finally:
        close_process_group()  # DeepSpeed makes a group even for one process
    if cfg.train.analyze and cfg.model.zdim and cfg.abinit.classes > 1 and search and rt.is_main:
        log.info("classes: z.pkl holds each particle's one-hot class (its column of 1); no latent analysis runs "
                 "(docs/poses.md, 'Several classes')")
    elif cfg.train.analyze and cfg.model.zdim and rt.is_main:  # one process, as cryoDRGN's train_vae does
        from distdrgn.analysis.analyze import analyze

        log.info("running analyze on the final epoch (train.analyze=false skips it)")
        log.info("analysis: %s", analyze(out_dir, device=str(rt.device)))
    return out_dir


def run_training(cfg: Config, rt: Runtime, stop: StopRequest, source: str = "store") -> Path:
    # ---- the data and the run directory ----------------------------------------------
    store = open_store(cfg)
    keep = training_subset(cfg, store)
    unverified = check_verification(store, cfg)
    meta = Metadata.from_store(store, need_poses=source != "search")
    out_dir = Path(cfg.output.dir)
    check_run_dir(out_dir)
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    rt.barrier()
    setup_logging(out_dir, rt.is_main)
    if unverified:
        log.warning(unverified)
    n_train = store.n if keep is None else len(keep)

    # ---- resume or start ---------------------------------------------------------------
    ckpt, ckpt_path = find_checkpoint(out_dir, rt)
    position = DataPosition.of_checkpoint(ckpt)
    if ckpt:
        check_resumable(ckpt, ckpt_path, out_dir, model_info=ModelInfo.from_config(cfg.model, store.D, cfg.train.seed),
                        store=store, keep=keep)
    prep, info, norm_source = preprocessing_and_model(cfg, store, ckpt)
    losses = LossTable(out_dir)
    if rt.is_main:
        # atomically: the other ranks read it meanwhile (checkpoint.file_offset), and an empty
        # config.yaml would read as a distdrgn 0.1 run directory
        _atomic_write(out_dir / "config.yaml", lambda fh: fh.write(dump_config(cfg).encode()))
        losses.truncate(position.epoch - 1)
    log.info("store %s: %d images, D=%d, %d chunks of %d; %d process(es) on %s, amp=%s; Hartley std %.5g (%s)",
             store.path, store.n, store.D, store.n_chunks, store.chunk_images, rt.world_size, rt.device,
             rt.amp_dtype, prep.ht_std, norm_source)
    model, engine = build_training_model(cfg, rt, info, ckpt)
    table = build_particle_table(cfg, source, store, model, prep, rt.device, ckpt, out_dir)
    if ckpt:
        log.info("resumed from %s: continuing at epoch %d, image %d of %d", ckpt_path.relative_to(out_dir),
                 position.epoch, position.consumed, n_train)
        del ckpt  # the optimizer holds its own copy now
    if keep is not None:
        log.info("training on %d of the store's %d particles (data.ind=%s); z.N.pkl rows are those particles, "
                 "in store order", len(keep), store.n, cfg.data.ind)

    # ---- the components ----------------------------------------------------------------
    metrics = TrainingMetrics() if rt.is_main and cfg.metrics.port is not None else None
    if metrics:
        metrics.serve(cfg.metrics.port)
        log.info("serving Prometheus metrics on port %d", cfg.metrics.port)
    contents = {"model_info": asdict(info), "preprocess": asdict(prep), "config": cfg.to_dict(),
                "store": {"path": str(store.path), "n": store.n, "D": store.D, "apix": store.apix},
                "subset": None if keep is None else {"path": str(cfg.data.ind), "n": len(keep)}, "pose_source": source}
    checkpointer = Checkpointer(out_dir, rt, engine, contents, every_epochs=cfg.train.checkpoint_every,
                                every_steps=cfg.train.checkpoint_every_steps, metrics=metrics, table=table,
                                rows=keep)
    guard = NonfiniteGuard(rt, cfg.train.max_nonfinite_steps, metrics)
    debug = DebugHooks(cfg.debug, rank=rt.rank, world_size=rt.world_size, resume=(position.epoch, position.consumed))
    beta_at = parse_beta(cfg.train.beta, info.zdim)

    def step(batch: Batch, beta: float, weight: float):
        return train_step(engine, batch, prep, model.lattice, beta, weight, rt, table)

    if cfg.train.cuda_graphs:  # capture the sync-free step once, replay it (the ragged last batch runs eagerly)
        from distdrgn.cuda_graphs import GraphedStep, check_cuda_graphs

        if table is not None:  # the search and the per-particle updates index the table by the batch's ids
            raise DistdrgnError("train.cuda_graphs=true does not capture a step with per-particle state "
                                "(abinit, model.pose_refine=true, model.encoder=autodecoder); "
                                "set train.cuda_graphs=false")
        check_cuda_graphs(rt.device, cfg.train.engine, rt.world_size)
        step = GraphedStep(step, cfg.train.batch_size, rt.device, engine.optimizer)
    model.train()

    # ---- the epochs ----------------------------------------------------------------------
    try:
        if position.epoch > cfg.train.epochs:
            log.info("nothing to do: %d epoch(s) already trained (train.epochs=%d)", position.epoch - 1,
                     cfg.train.epochs)
            if rt.is_main and not (out_dir / "weights.pkl").exists():  # interrupted before the final copy
                checkpointer.finish(position.epoch - 1)
        for epoch in range(position.epoch, cfg.train.epochs + 1):  # numbered from 1, as in cryoDRGN
            carried = position if epoch == position.epoch else DataPosition(epoch)
            start_epoch(table, cfg, source, epoch)
            batches = training_batches(store, meta, seed=cfg.train.seed, epoch=epoch,
                                       shuffle_chunks=cfg.train.shuffle_chunks, start=carried.consumed, rank=rt.rank,
                                       world_size=rt.world_size, batch_size=cfg.train.batch_size, device=rt.device,
                                       keep=keep, num_workers=cfg.train.num_workers,
                                       verify_chunks=store.verify_chunks)
            progress = EpochProgress(epoch, batches.n, batches.start, batches.n_steps, is_main=rt.is_main,
                                     log_every=cfg.train.log_every, n_masked=model.lattice.n_masked, metrics=metrics,
                                     device=rt.device)
            sums, seconds = run_epoch(epoch, batches, carried, step=step, n_masked=model.lattice.n_masked,
                                      beta_at=beta_at, seed=cfg.train.seed, rt=rt, checkpointer=checkpointer,
                                      guard=guard, progress=progress, debug=debug, stop=stop)
            if rt.is_main:
                log_epoch(losses, epoch, cfg.train.epochs, sums, seconds, beta_at(epoch - 1), rt.world_size)
                if source == "search" and epoch <= cfg.abinit.search_epochs:
                    warn_if_collapsing(losses, epoch, out_dir)
            last = epoch == cfg.train.epochs
            pose_state = checkpointer.exchange_table(epoch)  # every epoch: the next one's owners need the rows
            if table is not None:  # encode with the poses as trained (the encoder sees translated images)
                meta = Metadata(*table.poses(), meta.ctf)
            if checkpointer.epoch_due(epoch, last):
                zs = None
                if table is not None and table.zdim:  # the autodecoder's rows (every rank has them all)
                    zs = (table.latents(keep), None)  # a point per particle: no posterior variance
                elif info.zdim:
                    mu, logvar = encode_segment(model, prep, store, batch_size=max(64, cfg.train.batch_size),
                                                rank=rt.rank, world_size=rt.world_size, device=rt.device,
                                                amp_dtype=rt.amp_dtype, num_workers=cfg.train.num_workers,
                                                keep=keep, meta=meta, verify_chunks=store.verify_chunks)
                    zs = gather_segments(mu, logvar, n_train, rt.world_size)
                checkpointer.save_epoch(epoch, zs, final=last, pose_state=pose_state)
                if rt.is_main:
                    losses.plot()
                    log.info("epoch %d: wrote weights.%d.pkl%s%s", epoch, epoch, f", z.{epoch}.pkl" if zs else "",
                             f", poses.{epoch}.pkl" if table is not None and table.poses_learned else "")
    finally:
        debug.close()
        if metrics:
            metrics.close()
    return out_dir


def log_epoch(losses: LossTable, epoch: int, epochs: int, sums: list[float], seconds: float, beta: float,
              world_size: int) -> None:
    """The epoch's line in run.log and its row in loss.csv (rank 0)."""
    n = int(sums[3])
    loss, mse, kl = (v / max(sums[3], 1) for v in sums[:3])
    log.info("epoch %d/%d: loss %.6g (MSE %.6g, KL %.4g, beta %.4g), %d images in %.1fs = %.1f img/s "
             "(%.1f per process)", epoch, epochs, loss, mse, kl, beta, n, seconds, n / seconds, n / seconds / world_size)
    losses.append({"epoch": epoch, "loss": loss, "mse": mse, "kl": kl, "beta": beta, "images": n,
                   "seconds": round(seconds, 3), "images_per_second": round(n / seconds, 2)})


def warn_if_collapsing(losses: LossTable, epoch: int, out_dir: Path) -> None:
    """abinit, rank 0, after search epoch ``epoch``: warn when its loss says the map is collapsing
    (:func:`distdrgn.pose_training.collapse_epoch`, read from loss.csv, so a resumed run judges alike)."""
    rows = [r for r in losses.rows() if int(r["epoch"]) <= epoch]
    found = collapse_epoch([float(r["loss"]) for r in rows], COLLAPSE_RISE)
    if found is None:
        return
    best = found[1]
    kept = [name for name in (f"weights.{best}.pkl", f"poses.{best}.pkl") if (out_dir / name).exists()]
    log.warning("epoch %d: the training loss %.4g is more than %gx the search's lowest so far (%.4g, epoch %d): "
                "the map may be collapsing (docs/poses.md, 'When the search collapses')%s; rerun with another "
                "train.seed, or with abinit.attempts > 1", epoch, float(rows[-1]["loss"]), COLLAPSE_RISE,
                float(rows[best - 1]["loss"]), best, f"; {' and '.join(kept)} hold epoch {best}" if kept else "")


def main(argv: list[str] | None = None, *, search: bool = False, doc: str = __doc__) -> int:
    """The ``python -m distdrgn.train`` program (``search``: ``python -m distdrgn.abinit``)."""
    import argparse

    prog = "python -m distdrgn.abinit" if search else "python -m distdrgn.train"
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    add_args(parser)
    args = parser.parse_args(argv)
    try:
        run_from_args(args, search=search)
    except Stopped as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    except DistdrgnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def add_args(parser) -> None:
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("arguments", nargs="*", metavar="[CONFIG] section.key=value",
                        help="a YAML config or a packaged one (tiny, default, large; default: built-in defaults), "
                             "then overrides, e.g. data.store=particles.zarr output.dir=run train.epochs=3")
    parser.epilog = ("config sections and their most used keys (defaults shown; `distdrgn config` prints every key "
                     "with its comments):\n" + describe_keys())


def run_from_args(args, search: bool = False) -> Path:
    config, overrides = split_config_arguments(args.arguments)
    return train(load_config(config, overrides), search=search)


if __name__ == "__main__":
    sys.exit(main())
