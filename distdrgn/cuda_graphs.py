"""CUDA graph capture of the sync-free training step (``train.cuda_graphs``).

The DDP step (distdrgn.train.train_step) queues kernels only and never reads a device value
on the host, so it can be captured once into a CUDA graph and replayed: one launch per step
instead of hundreds, which matters where kernels are short (small D, small batches).

- Inputs are copied into static buffers (``Batch`` fields, beta and the loss weight as 0-d
  device tensors); the outputs (loss terms, non-finite flag) are cloned after each replay so
  that a caller holding them a step later (the deferred non-finite read) is not overwritten.
- A batch of another size than the captured one (the ragged last batch of an epoch) runs
  eagerly, on the same parameters and optimizer state; so do the first ``warmup`` steps
  (on a side stream, as torch requires before a capture: caches, cuBLAS workspaces, Triton
  and inductor compilation, Adam's state).
- Randomness: ``torch.cuda.graph`` registers the default CUDA generator; a captured RNG
  kernel reads its philox seed and offset from device memory that each replay refills from
  the generator's current seed and offset. ``torch.manual_seed`` before a replay (train.py's
  per-step ``seed_step``) therefore takes effect, and a replay draws what the eager step
  would after the same seed.
- Adam: the engine's fused Adam, with ``capturable=True`` (step counts on the device); the
  non-finite skip is its device-side ``found_inf``.

Only one process with ``train.engine=ddp`` (no DDP wrapper, no collective in the graph).
"""

from __future__ import annotations

import dataclasses

import torch

from distdrgn.errors import DistdrgnError


def cuda_graphs_unsupported_reason(device: torch.device, engine: str, world_size: int) -> str | None:
    """Why ``train.cuda_graphs=true`` cannot run here (None when it can)."""
    if device.type != "cuda":
        return f"train.cuda_graphs=true needs a CUDA device (this run is on {device.type})"
    if engine != "ddp":
        return f"train.cuda_graphs=true captures the DDP engine's step, not train.engine={engine}"
    if world_size != 1:
        return (f"train.cuda_graphs=true captures a single process's step ({world_size} processes here: "
                "the gradient all-reduce is not captured)")
    return None


def check_cuda_graphs(device: torch.device, engine: str, world_size: int) -> None:
    """Raise DistdrgnError when ``train.cuda_graphs=true`` cannot run (start-up check)."""
    reason = cuda_graphs_unsupported_reason(device, engine, world_size)
    if reason:
        raise DistdrgnError(reason)


def _clone(value):
    if torch.is_tensor(value):
        return value.clone()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _clone(getattr(value, f.name)) for f in dataclasses.fields(value)})
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    return value


class GraphedStep:
    """``step_fn(batch, beta, weight) -> outputs`` captured for batches of ``batch_size`` images.

    ``step_fn`` must queue device work only (no host reads, no host-side decisions that vary
    between steps); ``beta`` and ``weight`` reach it as 0-d float32 device tensors. Call the
    instance as ``outputs = graphed(batch, beta, weight)`` with floats; it replays the graph for
    full batches once captured, and runs ``step_fn`` eagerly otherwise (see :meth:`runs_eagerly`).
    ``optimizer``: the torch Adam the step uses (made capturable here).
    """

    def __init__(self, step_fn, batch_size: int, device: torch.device, optimizer=None, warmup: int = 3):
        if device.type != "cuda":
            raise DistdrgnError(f"train.cuda_graphs=true needs a CUDA device (this run is on {device.type})")
        self.step_fn, self.batch_size, self.device, self.warmup = step_fn, batch_size, torch.device(device), warmup
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["capturable"] = True  # device step counts: nothing in Adam's step reads the host
        self.graph = None
        self.eager_steps = 0  # full-size steps run eagerly so far (the warm-up)
        self.static_batch = None
        self.static_scalars = None
        self.static_out = None
        self.replays = 0

    def runs_eagerly(self, batch) -> bool:
        """Whether this batch runs eagerly: another size than the captured one (the ragged last
        batch), or while warming up."""
        return len(batch.indices) != self.batch_size or self.graph is None and self.eager_steps < self.warmup

    def __call__(self, batch, beta: float, weight: float):
        scalars = torch.tensor([beta, weight], dtype=torch.float32, device=self.device)
        if len(batch.indices) != self.batch_size:
            return self.step_fn(batch, scalars[0], scalars[1])
        if self.graph is None and self.eager_steps < self.warmup:
            self.eager_steps += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self.step_fn(batch, scalars[0], scalars[1])
            torch.cuda.current_stream(self.device).wait_stream(side)
            return out
        if self.graph is None:
            self._capture(batch, scalars)
        else:
            self._fill(batch, scalars)
        self.graph.replay()
        self.replays += 1
        return _clone(self.static_out)

    def _fill(self, batch, scalars) -> None:
        for f in dataclasses.fields(batch):
            src, dst = getattr(batch, f.name), getattr(self.static_batch, f.name)
            if torch.is_tensor(src):
                dst.copy_(src, non_blocking=True)
        self.static_scalars.copy_(scalars)

    def _capture(self, batch, scalars) -> None:
        self.static_batch = dataclasses.replace(batch, **{
            f.name: getattr(batch, f.name).clone() for f in dataclasses.fields(batch) if torch.is_tensor(getattr(batch, f.name))})
        self.static_scalars = scalars.clone()
        self.graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        # thread_local: the loader's prefetch thread may allocate while this thread captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_out = self.step_fn(self.static_batch, self.static_scalars[0], self.static_scalars[1])
