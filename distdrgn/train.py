"""Train a cryoDRGN VAE (or a homogeneous model, zdim = 0) on a particle store.

    python -m distdrgn.train CONFIG.yaml [section.key=value ...]
    torchrun --nproc_per_node N -m distdrgn.train CONFIG.yaml ...
    distdrgn train CONFIG.yaml ...

Single process, or DDP under torchrun (NCCL on GPU, gloo on CPU). Rank 0 logs and writes
the run directory; an existing run directory is resumed from its newest readable checkpoint
(``weights.N.pkl`` or a mid-epoch ``checkpoints/step.E.C.pkl``), with any number of
processes: the data position is (epoch, images consumed) of a world-size-independent order
(:mod:`distdrgn.loader`). Under ``torchrun --max-restarts K`` a killed worker therefore costs
at most the steps since the last step checkpoint.
Reads top-down: setup, the training step, outputs and checkpoints, the program (resume, epoch
loop, step loop).
"""

from __future__ import annotations

import csv
import json
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
from tqdm import tqdm

from distdrgn.checkpoint import (
    file_offset,
    load_latest,
    load_weights,
    remove_stale_temporaries,
    save_step_checkpoint,
    save_weights,
    save_z,
)
from distdrgn.config import Config, dump_config, load_config
from distdrgn.encode import encode_segment, gather_segments
from distdrgn.engine import (
    Engine,
    build_engine,
    close_process_group,
    init_process_group,
)
from distdrgn.errors import DistdrgnError, Stopped, StoreError
from distdrgn.kernels import resolve_kernels
from distdrgn.kernels.check import check_fused
from distdrgn.loader import (
    DevicePrefetcher,
    GlobalOrder,
    Metadata,
    StepSchedule,
    stream_batches,
)
from distdrgn.metrics import TrainingMetrics
from distdrgn.model import CryoDRGN, ModelInfo
from distdrgn.objective import (
    Batch,
    Preprocess,
    hartley_std,
    loss_terms,
    parse_beta,
    prepare_targets,
)
from distdrgn.preemption import StopRequest

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
    backend = "nccl" if want_cuda else "gloo"
    if world_size > 1 and cfg.train.engine == "ddp" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        init_restartable_process_group(backend, device, world_size)
    init_process_group(cfg.train.engine, backend, device, world_size)  # no-op if the group exists
    rank = dist.get_rank() if world_size > 1 else 0
    amp = str(cfg.train.amp).lower()
    use_amp = amp == "true" or (amp == "auto" and device.type == "cuda")
    return Runtime(rank, world_size, device, torch.bfloat16 if use_amp else None)


def init_restartable_process_group(backend: str, device: torch.device, world_size: int) -> None:
    """Join the group through torchrun's agent store, namespaced by the restart count.

    The agent's store outlives a ``--max-restarts`` restart, and with it the peers' addresses
    that gloo publishes there: a restarted rank could read a dead peer's address and fail to
    connect (seen on CPU). Keys under ``attempt_<restart>`` are fresh in every attempt.
    """
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world_size,
                          is_master=False)
    attempt = dist.PrefixStore(f"distdrgn/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend, store=attempt, rank=int(os.environ["RANK"]), world_size=world_size,
                            device_id=device if backend == "nccl" else None)


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


def choose_kernels(model: CryoDRGN, choice: str, rt: Runtime) -> tuple[str, str]:
    """``model.kernels`` -> ("fused" | "torch", why). Fused kernels must first pass their
    start-up check on this device; ``auto`` falls back to torch when they do not."""
    try:
        kernels, why = resolve_kernels(choice, rt.device, model.info.pe_type, model.info.domain)
    except ValueError as exc:
        raise DistdrgnError(str(exc)) from None
    if kernels == "fused":
        problem = check_fused(model, rt.amp_dtype)
        if problem and choice == "fused":
            raise DistdrgnError(f"model.kernels=fused: the fused decoder failed its start-up check on {rt.device}: "
                                f"{problem} (model.kernels=torch trains with the reference path)")
        if problem:
            log.warning("the fused decoder failed its start-up check on %s (%s); training with the PyTorch path",
                        rt.device, problem)
            return "torch", f"auto: fused kernels failed their start-up check: {problem}"
    return kernels, why


def open_store(cfg: Config):
    from distdrgn.store import ParticleStore

    if not cfg.data.store:
        raise DistdrgnError("data.store is not set (give it in the config or as data.store=PATH)")
    return ParticleStore.open(cfg.data.store, level=cfg.data.level)


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


def seed_step(seed: int, epoch: int, consumed: int, rank: int) -> None:
    """Reseed before each step: the noise is a function of (seed, epoch, data position, rank),
    so a run resumed from any step checkpoint draws what an uninterrupted one would."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, consumed, rank]).generate_state(1)[0]))


@dataclass
class TestHooks:
    """Instrumentation for the fault-tolerance tests, inert unless their env vars are set.

    ``DISTDRGN_TEST_PIDFILE``: each process appends ``PID RANK RESTART`` at start.
    ``DISTDRGN_TEST_SAMPLE_DIR``: each process writes ``samples.PID.jsonl``: its resume
    point and attempt (torchrun run id / restart count), then the ids of every step it trained. ``DISTDRGN_TEST_STEP_SECONDS``: sleep
    after each step (so a test can act mid-epoch).
    """

    samples: object = None  # open file or None
    step_seconds: float = 0.0

    @classmethod
    def from_env(cls, rt: Runtime, epoch: int, consumed: int) -> TestHooks:
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if os.environ.get("DISTDRGN_TEST_PIDFILE"):
            with open(os.environ["DISTDRGN_TEST_PIDFILE"], "a") as fh:
                fh.write(f"{os.getpid()} {rt.rank} {restart}\n")
        samples = None
        if os.environ.get("DISTDRGN_TEST_SAMPLE_DIR"):
            path = Path(os.environ["DISTDRGN_TEST_SAMPLE_DIR"]) / f"samples.{os.getpid()}.jsonl"
            samples = open(path, "a")  # noqa: SIM115 (appended to at every step until the process ends)
            attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', f'pid{os.getpid()}')}/{restart}"
            samples.write(json.dumps({"resume": [epoch, consumed], "time": time.time(), "rank": rt.rank,
                                      "world_size": rt.world_size, "attempt": attempt}) + "\n")
            samples.flush()
        return cls(samples, float(os.environ.get("DISTDRGN_TEST_STEP_SECONDS", "0")))

    def after_step(self, epoch: int, consumed: int, indices: torch.Tensor) -> None:
        if self.samples is not None:
            self.samples.write(json.dumps({"epoch": epoch, "lo": consumed, "ids": indices.tolist()}) + "\n")
            self.samples.flush()
        if self.step_seconds:
            time.sleep(self.step_seconds)


# ---------------------------------------------------------------------------------------
# The training step
# ---------------------------------------------------------------------------------------


def train_step(engine: Engine, batch: Batch, prep: Preprocess, lattice, beta: float, weight: float, rt: Runtime):
    """Forward, backward and (unless a loss or gradient is non-finite on any rank) the optimizer step.

    Returns (loss terms, nonfinite): a 0-d float32 tensor on the device, 1.0 when the step
    was skipped; every rank takes the same decision. Nothing here waits for the device
    (with the DDP engine), so the caller reads the flag a step later.
    """
    targets = prepare_targets(batch, prep, lattice)
    with torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.bfloat16, enabled=rt.amp_dtype is not None):
        mse, mu, logvar = engine(batch.rots, targets.y_enc, sample=True, y=targets.y, ctf=targets.ctf)
    terms = loss_terms(mse, mu, logvar, beta, lattice.n_masked, weight)
    engine.zero_grad()
    engine.backward(terms.loss)
    nonfinite = nonfinite_on_any_rank(terms.loss, engine.module, rt)
    engine.step_unless(nonfinite)
    return terms, nonfinite


def nonfinite_on_any_rank(loss: torch.Tensor, model: torch.nn.Module, rt: Runtime) -> torch.Tensor:
    """1.0 if the loss or any gradient is non-finite on any rank, else 0.0 (0-d, on the device).

    Under DDP the gradients are already averaged, so one rank's NaN image poisons all ranks'
    gradients; the flag is still reduced so that all ranks skip together whatever the engine.
    """
    checks = [torch.isfinite(loss.detach()).all()]
    checks += [torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None]
    bad = (~torch.stack(checks).all()).to(torch.float32)
    if rt.distributed:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad


class NonfiniteSteps:
    """Steps skipped for a non-finite loss or gradient: counted (Prometheus), logged with the
    store positions of their images, and fatal after ``train.max_nonfinite_steps`` in a row."""

    def __init__(self, run: Run):
        self.run = run
        self.streak: list[tuple[int, int, list[int], list[int]]] = []  # (epoch, step, positions, non-finite ones)

    def record(self, epoch: int, step: int, batch: Batch, nonfinite: torch.Tensor) -> None:
        """Book a step by its flag from :func:`train_step` (reading it waits for that step)."""
        if bool(nonfinite):
            self.step_skipped(epoch, step, batch)
        else:
            self.step_taken()

    def step_taken(self) -> None:
        self.streak.clear()

    def step_skipped(self, epoch: int, step: int, batch: Batch) -> None:
        """Every rank calls it (the positions are gathered); raises DistdrgnError at the limit."""
        positions, bad = self.gather(batch)
        self.streak.append((epoch, step, positions, bad))
        if self.run.metrics:
            self.run.metrics.nonfinite_steps.inc()
        log.warning("epoch %d step %d: non-finite loss or gradient, step skipped (%d in a row); images with non-finite "
                    "pixels: %s; the step's images (store positions): %s", epoch, step, len(self.streak),
                    _short(bad), _short(positions))
        limit = self.run.cfg.train.max_nonfinite_steps
        if len(self.streak) >= limit:
            first, last = self.streak[0], self.streak[-1]
            all_bad = sorted({i for *_, b in self.streak for i in b})
            all_positions = sorted({i for _, _, p, _ in self.streak for i in p})
            raise DistdrgnError(
                f"{len(self.streak)} consecutive steps had a non-finite loss or gradient (train.max_nonfinite_steps="
                f"{limit}; epoch {first[0]} step {first[1]} to epoch {last[0]} step {last[1]}): particles with "
                f"non-finite pixels {_short(all_bad)}, all particles of those steps {_short(all_positions)} (store "
                f"positions; see `distdrgn store verify`, or leave them out with ingest --ind)")

    def gather(self, batch: Batch) -> tuple[list[int], list[int]]:
        """(store positions of the step's images on all ranks, those with non-finite pixels), sorted."""
        finite = torch.isfinite(batch.images).flatten(1).all(1)
        mine = (batch.indices.cpu().tolist(), batch.indices[~finite].cpu().tolist())
        parts = [mine]
        if self.run.rt.distributed:
            parts = [None] * self.run.rt.world_size
            dist.all_gather_object(parts, mine)
        return sorted(i for p in parts for i in p[0]), sorted(i for p in parts for i in p[1])


def _short(values: list[int], keep: int = 20) -> str:
    """``[1, 2, 3]``, or the first ``keep`` and a count."""
    if len(values) <= keep:
        return f"[{', '.join(map(str, values))}]"
    return f"[{', '.join(map(str, values[:keep]))}, ... ({len(values)} in all)]"


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
    """loss.png from loss.csv (the analysis module's plot), written atomically."""
    from distdrgn.analysis.plots import plot_loss as draw_loss_curves

    tmp = out_dir / ".loss.png.tmp.png"
    if draw_loss_curves(out_dir / "loss.csv", tmp) is not None:
        os.replace(tmp, out_dir / "loss.png")


def copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


@dataclass
class EpochTotals:
    """Running sums of an epoch over all ranks: carried by a step checkpoint into a resumed run."""

    sums: list[float]  # loss, mse, kl (image-weighted), images
    seconds: float


@dataclass
class Run:
    """Everything one training process holds (built by :func:`_train`)."""

    cfg: Config
    rt: Runtime
    out_dir: Path
    store: object
    meta: Metadata
    prep: Preprocess
    info: ModelInfo
    model: CryoDRGN
    engine: Engine
    beta_at: object
    metrics: TrainingMetrics | None
    hooks: TestHooks
    keep: np.ndarray | None = None  # sorted store positions of data.ind, None = every particle

    @property
    def n_train(self) -> int:
        """Particles trained on (and encoded): the data.ind subset or the whole store."""
        return self.store.n if self.keep is None else len(self.keep)

    @property
    def chunks(self) -> list[tuple[int, int]]:
        return [self.store.chunk_range(c) for c in range(self.store.n_chunks)]

    def payload(self) -> dict | None:
        """The checkpoint dict on rank 0 (None elsewhere); every rank must call it."""
        states = self.engine.state_dict()  # collective under DeepSpeed ZeRO (gathers partitions)
        if not self.rt.is_main:
            return None
        return {
            **states,  # model_state_dict, optimizer_state_dict (Adam form), scaler_state_dict
            "model_info": asdict(self.info),
            "preprocess": asdict(self.prep),
            "config": self.cfg.to_dict(),
            "store": {"path": str(self.store.path), "n": self.store.n, "D": self.store.D, "apix": self.store.apix},
            "subset": None if self.keep is None else {"path": str(self.cfg.data.ind), "n": len(self.keep)},
        }

    def save_epoch(self, epoch: int, zs, final: bool) -> None:
        """weights.N.pkl (+ z.N.pkl); with ``final`` also weights.pkl / z.pkl. Rank 0 writes."""
        payload = self.payload()
        if self.rt.is_main:
            save_weights(self.out_dir / f"weights.{epoch}.pkl", {"epoch": epoch, **payload})
            if zs is not None:
                save_z(self.out_dir / f"z.{epoch}.pkl", *zs)
            if final:
                copy_atomic(self.out_dir / f"weights.{epoch}.pkl", self.out_dir / "weights.pkl")
                if zs is not None:
                    copy_atomic(self.out_dir / f"z.{epoch}.pkl", self.out_dir / "z.pkl")
        if self.metrics:
            self.metrics.checkpoint_written()

    def save_step(self, epoch: int, consumed: int, sums: torch.Tensor, seconds: float) -> None:
        """checkpoints/step.E.C.pkl: model, optimizer, scaler and the data position (every rank calls)."""
        totals = sums.clone()
        if self.rt.distributed:
            dist.all_reduce(totals)
        payload = self.payload()
        if self.rt.is_main:
            path = save_step_checkpoint(self.out_dir, epoch, consumed, {
                **payload, "position": {"sums": totals.tolist(), "seconds": seconds}})
            progress_log.info("epoch %d: %d/%d images, wrote %s", epoch, consumed, self.n_train,
                              path.relative_to(self.out_dir))
        if self.metrics:
            self.metrics.checkpoint_written()


def find_checkpoint(out_dir: Path, rt: Runtime) -> tuple[dict | None, Path | None]:
    """The newest readable checkpoint (rank 0 chooses, falling back past damaged ones)."""
    ckpt = path = None
    if rt.is_main:
        for tmp in remove_stale_temporaries(out_dir):
            log.info("removed %s (left by an interrupted write)", tmp.name)
        ckpt, path = load_latest(out_dir, warn=log.warning)
    if rt.distributed:
        box = [None if path is None else str(path)]
        dist.broadcast_object_list(box, src=0)
        if not rt.is_main and box[0] is not None:
            path = Path(box[0])
            ckpt = load_weights(path)
    return ckpt, path


def resume_position(ckpt: dict | None) -> tuple[int, int, EpochTotals | None]:
    """(epoch, images of it consumed, its running totals) to continue from."""
    if ckpt is None:
        return 1, 0, None
    if "position" in ckpt:
        pos = ckpt["position"]
        return int(pos["epoch"]), int(pos["consumed"]), EpochTotals(list(pos["sums"]), float(pos["seconds"]))
    return int(ckpt["epoch"]) + 1, 0, None


# ---------------------------------------------------------------------------------------
# The program
# ---------------------------------------------------------------------------------------


def train(cfg: Config) -> Path:
    """Run (or resume) training as configured; returns the run directory."""
    if not cfg.output.dir:
        raise DistdrgnError("output.dir is not set (give it in the config or as output.dir=PATH)")
    rt = init_runtime(cfg)
    try:
        with StopRequest(rt.device, rt.distributed) as stop:
            out_dir = _train(cfg, rt, stop)
        if rt.distributed:  # leave together: a gloo rank torn down while its peers still write can abort
            dist.barrier()
    finally:
        close_process_group()  # DeepSpeed makes a group even for one process
    if cfg.train.analyze and cfg.model.zdim and rt.is_main:  # one process, as cryoDRGN's train_vae does
        from distdrgn.analysis.analyze import analyze

        log.info("running analyze on the final epoch (train.analyze=false skips it)")
        log.info("analysis: %s", analyze(out_dir, device=str(rt.device)))
    return out_dir


def _train(cfg: Config, rt: Runtime, stop: StopRequest) -> Path:
    out_dir = Path(cfg.output.dir)
    store = open_store(cfg)
    keep = training_subset(cfg, store)
    unverified = check_verification(store, cfg)
    meta = Metadata.from_store(store)
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if rt.distributed:
        dist.barrier()
    setup_logging(out_dir, rt.is_main)
    if unverified:
        log.warning(unverified)

    # ---- resume or start -------------------------------------------------------------
    ckpt, ckpt_path = find_checkpoint(out_dir, rt)
    start_epoch, start, carried = resume_position(ckpt)
    if ckpt and file_offset(out_dir):
        raise DistdrgnError(f"{out_dir}: written by distdrgn 0.1 (epochs numbered from 0); its files can be read "
                            f"(eval-vol, analyze, encode) but training does not continue it: use a new output.dir, "
                            f"with train.load={ckpt_path} to start from its weights")
    if ckpt:
        prep = Preprocess(**ckpt["preprocess"])
        info = ModelInfo(**ckpt["model_info"])
        if info.D != store.D:
            raise DistdrgnError(f"{out_dir}: the run was trained at box {info.D} but {store.path} gives box {store.D} "
                                f"(data.level={cfg.data.level}); train on a box-{info.D} store or level, or use a new output.dir")
        if info != ModelInfo.from_config(cfg.model, store.D, cfg.train.seed):
            raise DistdrgnError(f"{out_dir}: the run was started with another model or box size; use a new output.dir")
        if (ckpt.get("subset") or {}).get("n") != (None if keep is None else len(keep)):
            raise DistdrgnError(f"{out_dir}: the run was started with another data.ind subset "
                                f"({(ckpt.get('subset') or {}).get('path') or 'none'}); use a new output.dir")
        if int(ckpt["store"]["n"]) != store.n:
            raise DistdrgnError(f"{out_dir}: the run was started on a store of {ckpt['store']['n']} images, "
                                f"{store.path} has {store.n}; use a new output.dir")
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

    model = CryoDRGN(info)
    if not ckpt and cfg.train.load:
        load_initial_weights(model, Path(cfg.train.load))
        log.info("started from the weights of %s", cfg.train.load)
    model = model.to(rt.device)
    model.kernels, why = choose_kernels(model, cfg.model.kernels, rt)
    log.info("decoder kernels: %s (%s)", model.kernels, why)
    engine = build_engine(model, cfg, rt)
    if ckpt:
        engine.load_state_dict(ckpt)
        log.info("resumed from %s: continuing at epoch %d, image %d of %d", ckpt_path.relative_to(out_dir),
                 start_epoch, start, store.n if keep is None else len(keep))
        del ckpt  # the optimizer holds its own copy now
    log.info("engine: %s%s", engine.name, f" (ZeRO stage {cfg.train.zero_stage})" if engine.name == "deepspeed" else "")
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: zdim=%d, encoder %s %dx%d, decoder %dx%d, pe %s (pe_dim %d), domain %s; %d parameters",
             info.zdim, info.encoder, info.enc_layers, info.enc_dim, info.dec_layers, info.dec_dim, info.pe_type,
             info.pe_dim, info.domain, n_params)

    metrics = TrainingMetrics() if rt.is_main and cfg.metrics.port is not None else None
    if metrics:
        metrics.serve(cfg.metrics.port)
        log.info("serving Prometheus metrics on port %d", cfg.metrics.port)
    run = Run(cfg, rt, out_dir, store, meta, prep, info, model, engine, parse_beta(cfg.train.beta, info.zdim),
              metrics, TestHooks.from_env(rt, start_epoch, start), keep)
    if keep is not None:
        log.info("training on %d of the store's %d particles (data.ind=%s); z.N.pkl rows are those particles, "
                 "in store order", len(keep), store.n, cfg.data.ind)
    try:
        if start_epoch > cfg.train.epochs:
            log.info("nothing to do: %d epoch(s) already trained (train.epochs=%d)", start_epoch - 1, cfg.train.epochs)
            if rt.is_main and not (out_dir / "weights.pkl").exists():  # interrupted before the final copy
                copy_atomic(out_dir / f"weights.{start_epoch - 1}.pkl", out_dir / "weights.pkl")
                if (out_dir / f"z.{start_epoch - 1}.pkl").exists():
                    copy_atomic(out_dir / f"z.{start_epoch - 1}.pkl", out_dir / "z.pkl")
        for epoch in range(start_epoch, cfg.train.epochs + 1):  # numbered from 1, as in cryoDRGN
            run_epoch(run, epoch, start if epoch == start_epoch else 0, carried if epoch == start_epoch else None, stop)
            last = epoch == cfg.train.epochs
            if last or epoch % cfg.train.checkpoint_every == 0:
                zs = None
                if info.zdim:
                    mu, logvar = encode_segment(model, prep, store, batch_size=max(64, cfg.train.batch_size),
                                                rank=rt.rank, world_size=rt.world_size, device=rt.device,
                                                amp_dtype=rt.amp_dtype, num_workers=cfg.train.num_workers,
                                                keep=run.keep)
                    zs = gather_segments(mu, logvar, run.n_train, rt.world_size)
                run.save_epoch(epoch, zs, final=last)
                if rt.is_main:
                    plot_loss(out_dir)
                    log.info("epoch %d: wrote weights.%d.pkl%s", epoch, epoch, f" and z.{epoch}.pkl" if zs else "")
    finally:
        if metrics:
            metrics.close()
    return out_dir


def load_initial_weights(model: CryoDRGN, path: Path) -> None:
    """``train.load``: the model parameters of another run's checkpoint, distdrgn's or cryoDRGN's
    (a weights.N.pkl next to its config.yaml); not its optimizer or epoch."""
    from distdrgn import cryodrgn_run

    if cryodrgn_run.is_cryodrgn_run(path):
        theirs_model = cryodrgn_run.load_cryodrgn_run(path, need_encoder=model.zdim > 0).model
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


def run_epoch(run: Run, epoch: int, start: int, carried: EpochTotals | None, stop: StopRequest) -> None:
    """Train on the epoch's global order from image ``start`` on; rank 0 appends the epoch's
    loss.csv row. Writes a step checkpoint every ``train.checkpoint_every_steps`` steps, and
    one before raising :class:`Stopped` when ``stop`` says a signal asked to stop."""
    cfg, rt, store = run.cfg, run.rt, run.store
    order = GlobalOrder(run.chunks, seed=cfg.train.seed, epoch=epoch, window_chunks=cfg.train.shuffle_chunks,
                        keep=run.keep)
    schedule = StepSchedule(order.n, start, rt.world_size, cfg.train.batch_size)
    batches = DevicePrefetcher(stream_batches(str(store.path), store.D, order, schedule, rt.rank, run.meta,
                                              num_workers=cfg.train.num_workers, pin_memory=rt.device.type == "cuda"),
                               rt.device)
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # loss, mse, kl (image-weighted), images
    if carried and rt.is_main:  # the part of the epoch trained before the restart, counted once
        sums += torch.tensor(carried.sums, dtype=torch.float64, device=rt.device)
    seconds_before = carried.seconds if carried else 0.0
    progress = Progress(run, epoch, schedule)
    nonfinite_steps = NonfiniteSteps(run)
    pending = None  # (epoch, step, batch, non-finite flag) of the step before, read after the next is queued
    run.model.train()
    t_epoch = time.perf_counter()
    for step in range(schedule.n_steps):
        lo, hi = schedule.bounds(step)
        t0 = time.perf_counter()
        batch = next(batches)
        t_data = time.perf_counter() - t0
        seed_step(cfg.train.seed, epoch, lo, rt.rank)
        beta = run.beta_at(epoch - 1 + lo / schedule.n)  # the schedule counts epochs trained, from 0
        terms, nonfinite = train_step(run.engine, batch, run.prep, run.model.lattice, beta, schedule.loss_weight(step),
                                      rt)
        # the epoch's totals count the images of the steps taken: masked on the device, no wait
        mse, kl = terms.mse.double(), terms.kl.double()
        per_image = torch.stack([mse + beta * kl / run.model.lattice.n_masked, mse, kl, torch.ones_like(mse)])
        sums += torch.where(nonfinite > 0, 0.0, per_image * len(batch.indices))  # where: NaN * 0 is NaN
        if pending is not None:  # the previous step's flag: its kernels are done by now
            nonfinite_steps.record(*pending)
        pending = (epoch, step, batch, nonfinite)
        run.hooks.after_step(epoch, lo, batch.indices)
        progress.update(step, hi - lo, terms, beta, time.perf_counter() - t0, t_data)
        every = cfg.train.checkpoint_every_steps
        if stop.agreed():  # every rank stops after this same step
            progress.close()
            run.save_step(epoch, hi, sums, seconds_before + time.perf_counter() - t_epoch)
            message = (f"stopped by {stop.name} at epoch {epoch} step {step + 1} (image {hi} of {schedule.n}); "
                       "rerun the same command to resume")
            log.warning(message)
            raise Stopped(message, stop.signum)
        if every and (step + 1) % every == 0 and hi < schedule.n:
            run.save_step(epoch, hi, sums, seconds_before + time.perf_counter() - t_epoch)
    if pending is not None:
        nonfinite_steps.record(*pending)
    progress.close()
    if rt.distributed:
        dist.all_reduce(sums)
    loss, mse, kl, n = (sums / torch.clamp(sums[3], min=1)).tolist()[:3] + [int(sums[3])]
    seconds = seconds_before + time.perf_counter() - t_epoch
    if rt.is_main:
        beta = run.beta_at(epoch - 1)
        log.info("epoch %d/%d: loss %.6g (MSE %.6g, KL %.4g, beta %.4g), %d images in %.1fs = %.1f img/s "
                 "(%.1f per process)", epoch, cfg.train.epochs, loss, mse, kl, beta, n, seconds,
                 n / seconds, n / seconds / rt.world_size)
        append_loss_row(run.out_dir, {"epoch": epoch, "loss": loss, "mse": mse, "kl": kl, "beta": beta, "images": n,
                                      "seconds": round(seconds, 3), "images_per_second": round(n / seconds, 2)})


class Progress:
    """Rank 0's tqdm bar, run.log progress lines and Prometheus gauges during an epoch."""

    def __init__(self, run: Run, epoch: int, schedule: StepSchedule):
        self.run, self.epoch, self.schedule = run, epoch, schedule
        self.bar = tqdm(total=schedule.n, initial=schedule.start, desc=f"epoch {epoch}", unit="img",
                        disable=not run.rt.is_main, dynamic_ncols=True, leave=False)
        self.t_log = time.perf_counter()
        self.images_since_log = 0

    def update(self, step: int, global_images: int, terms, beta: float, step_seconds: float, data_seconds: float):
        run, metrics = self.run, self.run.metrics
        self.images_since_log += global_images
        self.bar.update(global_images)
        if metrics:
            metrics.images.inc(global_images)
            metrics.step_seconds.set(step_seconds)
            metrics.data_wait_seconds.set(data_seconds)
        last = step == self.schedule.n_steps - 1
        if not run.rt.is_main or not ((step + 1) % run.cfg.train.log_every == 0 or last):
            return
        now = time.perf_counter()
        rate = self.images_since_log / max(now - self.t_log, 1e-9)
        loss, kl = float(terms.mse) + beta * float(terms.kl) / run.model.lattice.n_masked, float(terms.kl)
        eta = (self.bar.total - self.bar.n) / max(rate, 1e-9)
        self.bar.set_postfix(loss=f"{loss:.4g}", kl=f"{kl:.3g}", refresh=False)
        progress_log.info("epoch %d step %d/%d: %.1f img/s, loss %.5g, KL %.4g, ETA %.0fs", self.epoch, step + 1,
                          self.schedule.n_steps, rate, loss, kl, eta)
        if metrics:
            metrics.images_per_second.set(rate)
            metrics.loss.set(loss)
            metrics.mse.set(float(terms.mse))
            metrics.kl.set(kl)
            metrics.epoch.set(self.epoch)
            if run.rt.device.type == "cuda":
                metrics.gpu_memory.set(torch.cuda.max_memory_allocated(run.rt.device))
        self.t_log, self.images_since_log = now, 0

    def close(self) -> None:
        self.bar.close()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m distdrgn.train", description=__doc__.splitlines()[0])
    add_args(parser)
    args = parser.parse_args(argv)
    try:
        run_from_args(args)
    except Stopped as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
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
