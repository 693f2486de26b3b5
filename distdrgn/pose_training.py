"""Where a run's poses come from, epoch by epoch: the store (plain ``train``), the store with
learnable corrections (``model.pose_refine=true``), or the hierarchical search
(``distdrgn abinit``), which later hands over to gradient refinement.

:func:`build_particle_table` makes the :class:`~distdrgn.particle_table.ParticleTable` of a run (None for fixed
poses), :class:`ModelPoseSearch` binds the search of :mod:`distdrgn.pose_search` to the model
being trained, and :func:`pose_phase` is the policy of which epochs search and which refine.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch

from distdrgn.config import AbinitConfig, Config
from distdrgn.errors import DistdrgnError
from distdrgn.model import CryoDRGN
from distdrgn.objective import Batch, Preprocess, masked_freqs_on, prepare_targets
from distdrgn.pose_search import (SearchResult, local_search, radius_subset, search_classes, search_poses,
                                  volume_predictor)
from distdrgn.particle_table import ParticleTable
from distdrgn.so3_grid import base_rotations, grid_spacing, shift_grid
from distdrgn.support_prior import SupportPrior

log = logging.getLogger("distdrgn.train")

POSE_NAMES = {"store": "store (fixed)", "refine": "store, refined (model.pose_refine=true)",
              "search": "pose search (distdrgn abinit)"}


def pose_source(cfg: Config, search: bool) -> str:
    """``search`` (abinit), ``refine`` (model.pose_refine) or ``store`` (fixed poses)."""
    return "search" if search else "refine" if cfg.model.pose_refine else "store"


def pose_phase(cfg: Config, source: str, epoch: int) -> tuple[bool, bool]:
    """(searching, refining) in ``epoch`` (from 1). abinit searches for ``abinit.search_epochs``
    epochs and then refines (``abinit.refine``); pose refinement waits
    ``model.pose_warmup_epochs`` epochs on the store's poses, so that the model first fits them."""
    if source == "search":
        searching = epoch <= cfg.abinit.search_epochs
        return searching, not searching and cfg.abinit.refine
    if source == "refine":
        return False, epoch > cfg.model.pose_warmup_epochs
    return False, False


# a search epoch whose loss is this many times the lowest before it: the sign of a collapse
COLLAPSE_RISE = 1.5


def collapse_epoch(search_losses: list[float], rise: float = COLLAPSE_RISE) -> tuple[int, int] | None:
    """(epoch, best epoch) when the last of the search epochs' training losses (epochs 1, 2,
    ... in order) is the first to exceed ``rise`` x the lowest of the epochs before it; else None.

    In the ab initio runs of benchmarks/RESULTS.md that found the poses no search epoch's loss
    was more than 1.01x the lowest before it; in every collapse it rose 3-5x within a few
    epochs while the viewing directions crowded together. Only the first epoch past the
    threshold counts, so a run is told once (again after a resume only if it resumed that epoch).
    """
    def crossed(j: int) -> bool:
        return j > 0 and search_losses[j] > rise * min(search_losses[:j])

    last = len(search_losses) - 1
    if not crossed(last) or any(crossed(j) for j in range(last)):
        return None
    best = min(range(last), key=search_losses.__getitem__)
    return last + 1, best + 1


def search_radius(cfg: AbinitConfig, epoch: int, D: int) -> float:
    """Frequency marching: the lattice radius the search compares within grows linearly from
    ``radius_start`` (first epoch) to ``radius_end`` (last search epoch), capped at D/2."""
    span = max(cfg.search_epochs - 1, 1)
    frac = min(max(epoch - 1, 0) / span, 1.0)
    return min(cfg.radius_start + frac * (cfg.radius_end - cfg.radius_start), D / 2)


def sample_candidates(errors: torch.Tensor, n_points: int) -> torch.Tensor:
    """One candidate per image drawn from its posterior over the kept candidates: (B, keep)
    summed squared errors over ``n_points`` lattice points -> (B,) indices.

    With Gaussian noise of variance s^2 per point, p(pose | image) ~ exp(-error / (2 s^2)); s^2
    is estimated by the best candidate's mean error. Drawing from it instead of taking the
    best (stochastic EM) lets an early, wrong map be corrected: the hard choice locks each
    image to whatever the map first resembled from its view. Uses torch's global generator,
    which the training loop reseeds before each step (so a resumed run draws the same).
    """
    e = errors.double()
    best = e.min(1, keepdim=True).values  # the first column for one search's sorted candidates
    noise = (best / max(n_points, 1)).clamp_min(1e-12)
    logits = -(e - best) / (2 * noise)
    return torch.multinomial(torch.softmax(logits, dim=1).float(), 1).squeeze(1)


class ModelPoseSearch:
    """A batch's poses by the hierarchical search against the model as it is now.

    Images are compared untranslated (each candidate shift moves the observation, as the
    loss does). ``current``: the images' rotations (B, 3, 3) and shifts (B, 2) so far, in
    fractions of the box (zero shifts before their first search). z, for a heterogeneous
    model, is the autodecoder's row (``z``, (B, zdim)) or else the encoder's mean of the image
    centred by its current shift: the training step encodes the image centred by its pose's
    shift, and the encoder's z of an uncentred image is another z (against a model trained on
    the true poses, z from the uncentred hinge images left the search at 21 degrees median, z
    from the centred ones found 3.6; benchmarks/RESULTS.md). While :attr:`local`, the search
    starts from ``current`` instead of the base grid (:func:`~distdrgn.pose_search.local_search`)
    and returns the best pose. With ``abinit.classes`` = C > 1 the model is conditioned on a
    one-hot class (:func:`class_model_config`): every image is searched against each of the C
    class maps and its class is chosen with its pose, from the posterior over all C x keep
    candidates (or the best). Returns rotations (B, 3, 3) and shifts (B, 2) in fractions of the
    box, and the images' one-hot classes (B, C) (None without classes).
    """

    def __init__(self, model: CryoDRGN, prep: Preprocess, cfg: AbinitConfig, device):
        D = model.lattice.D
        self.model, self.prep, self.cfg = model, prep, cfg
        self.base_rots = base_rotations(cfg.base_rotations).to(device, torch.float32)
        self.base_spacing = grid_spacing(cfg.base_rotations)
        # shifts beyond a quarter box are not shifts of a centred particle
        self.base_shifts = shift_grid(min(cfg.shift_extent_px, D / 4), cfg.shift_step_px).to(device, torch.float32)
        self.radius = min(cfg.radius_start, D / 2)
        self.local = False

    def set_epoch(self, epoch: int) -> None:
        """The radius of ``epoch``'s search, and whether it is the local one (after the search epochs)."""
        self.radius = search_radius(self.cfg, epoch, self.model.lattice.D)
        self.local = self.cfg.local_search and epoch > self.cfg.search_epochs

    @torch.no_grad()
    def __call__(self, batch: Batch, z: torch.Tensor | None = None,
                 current: tuple[torch.Tensor, torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        model, lattice = self.model, self.model.lattice
        unshifted = Batch(batch.indices, batch.images, None, None, batch.ctf)
        with torch.autocast(batch.images.device.type, enabled=False):
            targets = prepare_targets(unshifted, self.prep, lattice)
            classes = self.cfg.classes > 1 and not self.local
            if model.zdim and z is None and not classes:
                shifts = None if current is None else current[1]
                centred = Batch(batch.indices, batch.images, None, shifts, batch.ctf)
                z = model.encode(prepare_targets(centred, self.prep, lattice).y_enc)[0]
            idx, _ = radius_subset(lattice, self.radius)
            idx = idx.to(targets.y.device)
            freqs = masked_freqs_on(lattice.D, targets.y.device, torch.float32)[idx]
            coords = model.slice_coords[idx]
            ctf = None if targets.ctf is None else targets.ctf[:, idx]
            search = dict(base_rots=self.base_rots, base_spacing=self.base_spacing, base_shifts=self.base_shifts,
                          shift_step=self.cfg.shift_step_px, levels=self.cfg.levels, keep=self.cfg.keep)
            if classes:  # one decoded volume per class, each searched as a homogeneous map
                one_hot = torch.eye(self.cfg.classes, device=targets.y.device)
                found, cls = search_classes([volume_predictor(model.decoder, coords, self.radius, lattice.D, c)
                                             for c in one_hot], targets.y[:, idx], ctf, freqs, **search)
                rots, trans, pick = self._pick(found, len(idx))
                return rots, trans, one_hot[cls[torch.arange(len(pick)), pick]]
            # one decoded volume (zdim 0) or one per image at its z; candidates read from them
            predict = volume_predictor(model.decoder, coords, self.radius, lattice.D, z)
            if self.local:
                if current is None:
                    raise ValueError("a local search needs the images' current poses")
                found = local_search(predict, targets.y[:, idx], ctf, freqs, rots=current[0],
                                     shifts_px=current[1] * lattice.D, cell=np.radians(self.cfg.local_cell_deg),
                                     shift_step=self.cfg.shift_step_px, levels=self.cfg.levels, keep=self.cfg.keep)
                return found.rots.float(), found.shifts_px.float() / lattice.D, None
            found = search_poses(predict, targets.y[:, idx], ctf, freqs, shared_base=not model.zdim, **search)
        rots, trans, _ = self._pick(found, len(idx))
        return rots, trans, None

    def _pick(self, found: SearchResult, n_points: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pose each image trains on: a draw from the kept candidates' posterior, or the
        best (``abinit.sample=false``). -> rotations, shifts (box fractions), and the picked
        candidates' indices (B,)."""
        if self.cfg.sample:
            pick = sample_candidates(found.kept_error, n_points)
        else:
            pick = torch.zeros(len(found.error), dtype=torch.int64, device=found.error.device)
        rows = torch.arange(len(pick), device=pick.device)
        return (found.kept_rots[rows, pick].float(), found.kept_shifts_px[rows, pick].float() / self.model.lattice.D,
                pick)


def class_model_config(cfg: Config) -> Config:
    """The config of a multi-class ab initio (``abinit.classes`` = C > 1 with ``model.zdim=0``:
    C homogeneous maps): one decoder that takes a one-hot class as its z (``model.zdim`` = C,
    each particle's row of the autodecoder table, which the search sets and no gradient moves).
    Other configs are returned as they are."""
    C = cfg.abinit.classes
    if C <= 1:
        return cfg
    if cfg.model.zdim not in (0, C) or (cfg.model.zdim == C and cfg.model.encoder != "autodecoder"):
        raise DistdrgnError(f"abinit.classes={C} reconstructs {C} homogeneous maps: it needs model.zdim=0 "
                            f"(got model.zdim={cfg.model.zdim}); for a continuous latent find the poses with "
                            "classes first and train the heterogeneous model on them "
                            "(docs/poses.md, 'Several classes')")
    out = copy.deepcopy(cfg)
    out.model.zdim, out.model.encoder = C, "autodecoder"
    return out


def build_particle_table(cfg: Config, source: str, store, model: CryoDRGN, prep: Preprocess, device,
                         ckpt: dict | None, out_dir: Path) -> ParticleTable | None:
    """The run's per-particle table (None for fixed ``store`` poses and an encoder): the
    store's poses to refine or to hold fixed beside an autodecoder's z, or identities for the
    search to replace; the checkpoint's state when resuming."""
    theirs = ckpt.get("pose_source", "store") if ckpt else source
    autodecoder = cfg.model.encoder == "autodecoder"
    if theirs != source or (ckpt and (source != "store" or autodecoder) and "pose_state" not in ckpt):
        raise DistdrgnError(f"{out_dir}: the run was started with poses from the {POSE_NAMES[theirs]}, this command "
                            f"takes them from the {POSE_NAMES[source]}; use a new output.dir")
    if source == "store" and not autodecoder:
        return None
    n = store.n
    searcher = None
    if source == "search":
        if cfg.train.engine == "deepspeed":  # its bf16 / ZeRO-3 parameters are not the module's to read directly
            raise DistdrgnError("distdrgn abinit runs with train.engine=ddp (the pose search reads the decoder's "
                                "parameters, which DeepSpeed may hold in bf16 or partitioned)")
        rots, trans = torch.eye(3).expand(n, 3, 3).clone(), torch.zeros(n, 2)
        searcher = ModelPoseSearch(model, prep, cfg.abinit, device)
    else:
        if store.poses is None:
            what = "model.pose_refine=true refines" if source == "refine" else "training reads"
            raise DistdrgnError(f"{store.path}: {what} the store's poses, but the store has none; ingest with "
                                "--poses, or find poses with `distdrgn abinit`")
        rots, trans = store.poses
        rots = torch.from_numpy(np.asarray(rots, np.float32))
        trans = torch.zeros(n, 2) if trans is None else torch.from_numpy(np.asarray(trans, np.float32))
    table = ParticleTable(rots, trans, store.D, device, lr_rot=cfg.model.pose_lr_rot, lr_trans=cfg.model.pose_lr_trans,
                          searcher=searcher, poses_learned=source != "store",
                          zdim=cfg.model.zdim if autodecoder else 0, lr_z=cfg.model.z_lr,
                          z_init_std=cfg.model.z_init_std, seed=cfg.train.seed,
                          classes=cfg.abinit.classes if source == "search" else 1)
    if ckpt:
        table.load(out_dir, ckpt["pose_state"])
    return table


def start_epoch(table: ParticleTable | None, cfg: Config, source: str, epoch: int) -> None:
    """Set the table's phase for ``epoch`` and log it."""
    if table is None:
        return
    table.searching, table.refining = pose_phase(cfg, source, epoch)
    table.loss_weight = table.support_prior = None
    local = source == "search" and cfg.abinit.local_search and not table.searching
    if local:
        table.searching = True  # each batch's poses are searched again, near where they are
        table.searcher.set_epoch(epoch)
        log.info("epoch %d: searching poses locally (a %.3g degree cell, %d levels, keep %d) within radius %.1f%s",
                 epoch, cfg.abinit.local_cell_deg, cfg.abinit.levels, cfg.abinit.keep, table.searcher.radius,
                 ", then refining them by gradient" if table.refining else "")
    elif table.searching:
        searcher = table.searcher
        searcher.set_epoch(epoch)
        # the model fits only the frequencies the search compares: with wrong early poses the
        # higher ones are fitted to noise and pull the search into a wrong map (frequency marching)
        lattice = searcher.model.lattice
        table.loss_weight = torch.zeros(lattice.n_masked, device=table.device)
        table.loss_weight[radius_subset(lattice, searcher.radius)[0].to(table.device)] = 1.0
        # and, lest the map grow values where no image is fitted yet, the particle must be compact
        if cfg.abinit.support_weight > 0:
            table.support_prior = SupportPrior(cfg.abinit.support_weight, searcher.radius, lattice.D,
                                               cfg.abinit.support_radius)
        log.info("epoch %d: searching poses (%d rotations x %d shifts, %d levels, keep %d) within radius %.1f%s",
                 epoch, len(table.searcher.base_rots), len(table.searcher.base_shifts), cfg.abinit.levels,
                 cfg.abinit.keep, table.searcher.radius,
                 f", support prior {cfg.abinit.support_weight:g} outside {cfg.abinit.support_radius:g} box"
                 if table.support_prior else "")
    elif table.refining:
        log.info("epoch %d: refining poses by gradient (%.3g rad, %.3g px per epoch)", epoch, cfg.model.pose_lr_rot,
                 cfg.model.pose_lr_trans)
