"""Training engines: how the model is wrapped, stepped and checkpointed across processes.

``build_engine(model, cfg, runtime)`` returns an :class:`Engine` for ``train.engine``:

- ``ddp`` (default): :class:`torch.nn.parallel.DistributedDataParallel` (NCCL on GPU, gloo on
  CPU) around the model and a ``torch.optim.Adam``; one process = the model itself.
- ``deepspeed``: ``deepspeed.initialize`` with a config built from ours (ZeRO stage
  ``train.zero_stage``, bf16 on GPU / fp32 on CPU, no gradient clipping, the same Adam and lr).

Both present the same interface to the training loop (``engine(*inputs)``, ``backward(loss)``,
``step()``, ``zero_grad()``, ``module``) and the same checkpoint content: ``state_dict()``
returns the plain model's ``state_dict`` and a ``torch.optim.Adam``-format optimizer state (the
full fp32 master weights and Adam moments gathered from ZeRO partitions), so ``weights.N.pkl``
is identical in form for both engines, loads in ``eval-vol``/``encode``/``analyze`` and a run
can be resumed with either engine. ``state_dict()`` is collective under DeepSpeed (every rank
calls it); ``load_state_dict()`` is called by every rank with the same checkpoint.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distdrgn.errors import DistdrgnError

if TYPE_CHECKING:
    from distdrgn.runtime import Runtime

DEEPSPEED_INSTALL_HINT = 'pip install --no-build-isolation "deepspeed>=0.16,<0.20" (after torch)'


def deepspeed_import_error() -> str | None:
    """None when DeepSpeed imports; else a one-line reason (for errors and test skips)."""
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # ImportError, or a build/ABI problem raised at import time
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def import_deepspeed():
    reason = deepspeed_import_error()
    if reason is not None:
        raise DistdrgnError(f"train.engine=deepspeed: DeepSpeed cannot be imported ({reason}); install it with "
                            f"{DEEPSPEED_INSTALL_HINT}, or use train.engine=ddp")
    import deepspeed

    return deepspeed


class Engine:
    """What the training loop needs: forward, backward, step, zero_grad, checkpoint state."""

    name = "base"
    module: nn.Module

    def __call__(self, *args, **kwargs):
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def step_unless(self, nonfinite: torch.Tensor) -> None:
        """The optimizer step, unless ``nonfinite`` (a 0-d float tensor, 1.0 = skip) is set.

        This default reads the flag on the host, which waits for the step's kernels.
        """
        if not bool(nonfinite):
            self.step()

    def zero_grad(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """``{"model_state_dict", "optimizer_state_dict", "scaler_state_dict"}`` (CPU tensors)."""
        raise NotImplementedError

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        raise NotImplementedError


def build_optimizer(model: nn.Module, cfg, fused: bool = False) -> torch.optim.Adam:
    """Adam; ``fused`` takes torch's single-kernel implementation, which can also skip a step
    on a device-side flag (``found_inf``) without a host synchronisation."""
    return torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                            fused=True if fused else None)


def bf16_allreduce_hook(process_group, bucket):
    """DDP comm hook: all-reduce each gradient bucket in bf16 (half the bytes), mean back in fp32.

    The same arithmetic as torch's ``bf16_compress_hook``, which torch only accepts with NCCL;
    this one also runs on gloo, so CPU tests exercise the path used on GPUs.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(dist.get_world_size(group))
    future = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def decompress(fut):
        buffer.copy_(fut.value()[0])
        return buffer

    return future.then(decompress)


_BUFFER_SYNC = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else "broadcast_buffers")


class DDPEngine(Engine):
    """DistributedDataParallel when there are several processes, else the bare model."""

    name = "ddp"

    def __init__(self, model: nn.Module, cfg, runtime: Runtime):
        self.module = model
        self.optimizer = build_optimizer(model, cfg, fused=True)
        if runtime.world_size > 1:
            device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            # no buffer sync before each forward: the buffers (positional-encoding frequencies,
            # lattice coordinates) are constants built from the seed and D, identical on every
            # rank by construction, so re-sending them would only cost time. torch >= 2.13 calls
            # it forward_sync_buffers (and deprecates broadcast_buffers, which older torch knows)
            self.wrapped = DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=cfg.train.bucket_cap_mb,
                                                   **{_BUFFER_SYNC: False})
            if cfg.train.grad_comm_dtype == "bf16":
                self.wrapped.register_comm_hook(None, bf16_allreduce_hook)
        else:
            self.wrapped = model

    def __call__(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()  # DDP all-reduces gradient buckets while backward runs

    def step(self) -> None:
        self.optimizer.step()

    def step_unless(self, nonfinite: torch.Tensor) -> None:
        # fused Adam skips every update (and the step count) where found_inf is 1, on the device
        self.optimizer.found_inf = nonfinite
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model_state_dict": self.module.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "scaler_state_dict": None,  # bf16 autocast needs no loss scaling
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.module.load_state_dict(ckpt["model_state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer_state_dict"])


def deepspeed_config(cfg, runtime: Runtime) -> dict[str, Any]:
    """The DeepSpeed JSON config equivalent to our training settings."""
    bf16 = runtime.amp_dtype == torch.bfloat16
    zero: dict[str, Any] = {"stage": cfg.train.zero_stage}
    if cfg.train.zero_stage in (1, 2):
        # bucket sizes in elements, the same as DDP's bucket_cap_mb so both engines overlap alike
        bucket = int(cfg.train.bucket_cap_mb * 2**20 / (2 if bf16 else 4))
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket, overlap_comm=runtime.device.type == "cuda")
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.train.batch_size * runtime.world_size,
        "gradient_clipping": 0.0,  # cryoDRGN does not clip
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "communication_data_type": "bf16" if cfg.train.grad_comm_dtype == "bf16" else ("bf16" if bf16 else "fp32"),
        # our torch.optim.Adam with ZeRO: DeepSpeed only "tests" its own optimizers
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` around the model and our Adam.

    With bf16 (GPU) DeepSpeed keeps bf16 parameters and fp32 master weights. Buffers (the
    positional-encoding frequencies, the lattice coordinates) stay float32 whatever the
    DeepSpeed version: before 0.19.2 ``deepspeed.initialize`` casts the whole module with
    ``module.bfloat16()``, buffers included (frequencies of up to ~D rounded to 8 bits), so
    the float32 originals are put back after it (:func:`restore_buffers`). The training step
    still runs under ``torch.autocast`` so fp32 inputs meet bf16 weights as in the DDP path.
    The non-finite skip is decided on the device (:meth:`step_unless`), as in :class:`DDPEngine`.
    """

    name = "deepspeed"

    def __init__(self, model: nn.Module, cfg, runtime: Runtime):
        deepspeed = import_deepspeed()
        self.zero_stage = cfg.train.zero_stage
        self.ds_config = deepspeed_config(cfg, runtime)
        # fused: the Adam that DeepSpeed steps (ours, or ours on the fp32 partitions under ZeRO)
        # can then skip a step on a device-side flag, without a host read (step_unless)
        optimizer = build_optimizer(model, cfg, fused=True)
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        self.module = self.ds.module
        restore_buffers(self.module, buffers)
        self.client_optimizer = optimizer
        self._names = [n for n, _ in self.module.named_parameters()]

    @property
    def _plain(self) -> bool:
        """Stage 0 in fp32: the optimizer stepping is our Adam on the model's own parameters."""
        return self.optimizer is self.client_optimizer

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()

    def step_unless(self, nonfinite: torch.Tensor) -> None:
        # the fused torch Adam that DeepSpeed steps skips every update (and the step count)
        # where found_inf is 1, on the device: no host read of the flag
        base = getattr(self.optimizer, "optimizer", self.optimizer)
        base.found_inf = nonfinite
        try:
            self.ds.step()
        finally:
            del base.found_inf

    def zero_grad(self) -> None:
        self.ds.zero_grad()

    # ---- checkpoint state in torch.optim.Adam form -----------------------------------

    def _param_groups(self) -> list[dict[str, Any]]:
        group = {k: v for k, v in self.client_optimizer.param_groups[0].items() if k != "params"}
        return [{**group, "params": list(range(len(self._names)))}]

    def _adam_step(self) -> float:
        """Adam's step count, read from the (partitioned) base optimizer's state."""
        base = getattr(self.optimizer, "optimizer", self.optimizer)
        steps = [float(s["step"]) for s in base.state.values() if "step" in s]
        return max(steps) if steps else 0.0

    def state_dict(self) -> dict[str, Any]:
        if self._plain:
            model_sd = self.module.state_dict()
            opt_sd = self.optimizer.state_dict()
        else:
            from deepspeed.utils import (
                safe_get_full_fp32_param,
                safe_get_full_optimizer_state,
            )

            model_sd = {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}
            step = self._adam_step()
            state = {}
            for i, (name, p) in enumerate(self.module.named_parameters()):
                model_sd[name] = safe_get_full_fp32_param(p).detach().cpu()  # collective
                if step > 0:
                    state[i] = {
                        "step": torch.tensor(step),
                        "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").detach().cpu(),
                        "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").detach().cpu(),
                    }
            opt_sd = {"state": state, "param_groups": self._param_groups()}
        return {"model_state_dict": model_sd, "optimizer_state_dict": opt_sd, "scaler_state_dict": None}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        model_sd, opt_sd = ckpt["model_state_dict"], ckpt["optimizer_state_dict"]
        if self._plain:
            self.module.load_state_dict(model_sd)
            self.optimizer.load_state_dict(opt_sd)
            return
        from deepspeed.utils import (
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )

        if self.zero_stage == 3:
            raise DistdrgnError("train.engine=deepspeed with train.zero_stage=3 cannot resume from weights.N.pkl; "
                                "use zero_stage 0-2 or a new output.dir")
        # the (replicated) low-precision weights, then the fp32 master copies and Adam moments
        self.module.load_state_dict({k: v.to(self.module.state_dict()[k].dtype) for k, v in model_sd.items()})
        state = opt_sd.get("state", {})
        step = max((float(s["step"]) for s in state.values()), default=0.0)
        if step > 0:
            self._ensure_base_state()
        for i, (name, p) in enumerate(self.module.named_parameters()):
            safe_set_full_fp32_param(p, model_sd[name].to(p.device, torch.float32))
            if i in state:
                safe_set_full_optimizer_state(p, state[i]["exp_avg"].to(p.device), "exp_avg")
                safe_set_full_optimizer_state(p, state[i]["exp_avg_sq"].to(p.device), "exp_avg_sq")
        base = getattr(self.optimizer, "optimizer", self.optimizer)
        for s in base.state.values():
            if "step" in s:
                s["step"] = torch.tensor(step, dtype=torch.float32) if torch.is_tensor(s["step"]) else step

    def _ensure_base_state(self) -> None:
        """Create Adam's moment buffers in the partitioned optimizer (torch.optim creates them lazily)."""
        base = getattr(self.optimizer, "optimizer", self.optimizer)
        for group in base.param_groups:
            for p in group["params"]:
                st = base.state[p]
                if "exp_avg" not in st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        link = getattr(self.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # per-parameter views into the new state (what safe_set_* writes through)
            link()


def restore_buffers(module: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Put back every buffer whose dtype changed (a cast to bf16) from its float32 original,
    on the buffer's current device; the originals are exact, an up-cast of the bf16 would not be."""
    for name, buf in list(module.named_buffers()):
        orig = originals.get(name)
        if orig is not None and buf.dtype != orig.dtype:
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            owner._buffers[attr] = orig.to(buf.device)


def build_engine(model: nn.Module, cfg, runtime: Runtime) -> Engine:
    """The engine named by ``cfg.train.engine`` around ``model`` (already on ``runtime.device``)."""
    if cfg.train.engine == "deepspeed":
        return DeepSpeedEngine(model, cfg, runtime)
    if cfg.train.engine == "ddp":
        return DDPEngine(model, cfg, runtime)
    raise DistdrgnError(f"train.engine must be ddp or deepspeed, got {cfg.train.engine!r}")
