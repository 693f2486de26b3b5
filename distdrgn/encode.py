"""Latent encoding: z_mu and z_logvar of every particle of a store, in store order.

Used at training checkpoints (distributed: each rank encodes a contiguous segment of the
store and the segments are gathered in rank order, which is store order) and by
``distdrgn encode`` for any store with poses (the encoder input is the translated image).
Images are read by the training reader in store order (:func:`distdrgn.loader.encoding_batches`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from distdrgn.errors import DistdrgnError
from distdrgn.loader import Metadata, SegmentSchedule, encoding_batches
from distdrgn.model import CryoDRGN
from distdrgn.objective import Preprocess, prepare_targets


@torch.no_grad()
def encode_segment(
    model: CryoDRGN,
    prep: Preprocess,
    store,
    *,
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress=None,
    keep: np.ndarray | None = None,
    meta: Metadata | None = None,
    verify_chunks: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (n_r, zdim) z_mu and z_logvar (float32, on ``device``) of its segment.

    ``keep``: sorted store positions to encode (``data.ind``); the segments then cover those
    particles only, in store order. ``meta``: the store's poses and CTF if already loaded.
    ``amp_dtype``: the training precision; the encoder runs in float32 regardless (autocast off)."""
    device = torch.device(device)
    if model.zdim == 0:
        raise DistdrgnError("the model is homogeneous (zdim = 0): there are no latents to encode")
    if model.encoder is None:
        raise DistdrgnError("the model has no image encoder (model.encoder=autodecoder): each trained particle's z "
                            "is its row of the run's z.pkl, and images it was not trained on have none")
    if store.D != prep.D:
        raise DistdrgnError(f"{store.path}: images are {store.D} px but the model was trained at {prep.D} px (choose the store level)")
    _, batches = encoding_batches(store, meta or Metadata.from_store(store), rank=rank, world_size=world_size,
                                  batch_size=batch_size, device=device, keep=keep, num_workers=num_workers,
                                  verify_chunks=verify_chunks)
    mus, logvars = [], []
    # DeepSpeed's bf16 engine holds bf16 parameters: float32 copies, made once (no copy when
    # they already are float32), so the encoder runs in float32 without autocast
    params = {name: p.float() for name, p in model.encoder.named_parameters()}
    was_training = model.training
    model.eval()
    for batch in batches:
        if len(batch.indices) == 0:  # the last step of a rank whose segment is one image shorter
            continue
        targets = prepare_targets(batch, prep, model.lattice)
        # float32 whatever the training precision: the latents are a result (z.N.pkl), and the
        # encoder is < 0.1% of a training step's work, so bf16 would save nothing worth the rounding
        with torch.autocast(device.type, enabled=False):
            mu, logvar = torch.func.functional_call(model.encoder, params, (targets.y_enc.float(),))
        mus.append(mu.float())
        logvars.append(logvar.float())
        if progress is not None:
            progress.update(len(batch.indices))
    model.train(was_training)
    zdim = model.zdim
    empty = torch.zeros((0, zdim), device=device)
    return (torch.cat(mus) if mus else empty), (torch.cat(logvars) if logvars else empty)


def gather_segments(mu: torch.Tensor, logvar: torch.Tensor, n: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All ranks' segments concatenated in rank order -> (n, zdim) numpy float32 on every rank."""
    if world_size == 1:
        return mu.cpu().numpy(), logvar.cpu().numpy()
    segments = SegmentSchedule(n, world_size, 1)
    counts = [hi - lo for lo, hi in map(segments.segment, range(world_size))]
    width = max(counts)
    both = torch.cat([mu, logvar], 1)
    padded = torch.zeros((width, both.shape[1]), device=both.device, dtype=both.dtype)
    padded[: len(both)] = both
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    full = torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu().numpy()
    zdim = mu.shape[1]
    return full[:, :zdim].copy(), full[:, zdim:].copy()


def encode_store(model: CryoDRGN, prep: Preprocess, store, *, batch_size: int = 64, device=None, num_workers: int = 0,
                 progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(n, zdim) z_mu, z_logvar of every image of ``store`` (single process), store order."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    mu, logvar = encode_segment(model, prep, store, batch_size=batch_size, device=device, amp_dtype=amp,
                                num_workers=num_workers, progress=progress)
    return mu.cpu().numpy(), logvar.cpu().numpy()
