"""Where a training process runs: its rank, the world size, the device, mixed precision and
the process group (torchrun's, DeepSpeed's, or none for one process).

:func:`init_runtime` joins the group from torchrun's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and picks the device; :func:`close_process_group`
leaves it. The engines (:mod:`distdrgn.engine`) take a :class:`Runtime`.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distdrgn.errors import DistdrgnError


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

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in one process)."""
        if self.distributed:
            dist.barrier()


def init_runtime(device: str = "auto", amp: bool | str = "auto", engine: str = "ddp") -> Runtime:
    """Process group from torchrun's env vars (if any), device, mixed precision.

    ``device``: auto | cpu | cuda (``train.device``); ``amp``: auto (bf16 on CUDA) | true |
    false (``train.amp``); ``engine``: ddp | deepspeed (``train.engine``).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise DistdrgnError("train.device=cuda but no CUDA device is available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}") if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    backend = "nccl" if want_cuda else "gloo"
    if world_size > 1 and engine == "ddp" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        warn_about_shared_store_across_nodes()
        init_restartable_process_group(backend, dev, world_size)
    init_process_group(engine, backend, dev, world_size)  # no-op if the group exists
    rank = dist.get_rank() if world_size > 1 else 0
    amp = str(amp).lower()
    use_amp = amp == "true" or (amp == "auto" and dev.type == "cuda")
    return Runtime(rank, world_size, dev, torch.bfloat16 if use_amp else None)


def warn_about_shared_store_across_nodes() -> None:
    """torchrun's shared agent store across nodes with restarts: the agents' restart counts
    can disagree after a lost node (a membership change is not counted as a restart), so the
    attempt namespaces of :func:`init_restartable_process_group` would not match and the
    survivors would dial the lost worker. ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` on every
    agent gives each round a fresh store instead (launch/slurm_multinode.sbatch sets it)."""
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if nodes > 1 and restarts > 0 and os.environ.get("RANK") == "0":
        print("warning: torchrun across nodes with --max-restarts shares its agent store between rounds; a lost "
              "node can then stop the job: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun "
              "(launch/slurm_multinode.sbatch does)", file=sys.stderr)


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(engine: str, backend: str, device: torch.device | None, world_size: int) -> None:
    """Join the process group from torchrun's (or the DeepSpeed launcher's) env vars.

    DeepSpeed gets its own ``deepspeed.init_distributed`` (which wraps torch.distributed) and
    needs a group even for one process, so a single DeepSpeed process gets a 1-rank group
    on a free local port.
    """
    if dist.is_initialized():
        return
    if engine == "deepspeed":
        from distdrgn.engine import import_deepspeed  # optional: imported only when asked for

        deepspeed = import_deepspeed()
        single = {}
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            single = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
            os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed.initialize insists on it
        saved = {k: os.environ.get(k) for k in single}
        os.environ.update(single)
        try:
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        finally:
            for k, v in saved.items():  # the group exists now; leave the environment as it was
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    elif world_size > 1:
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)


def close_process_group() -> None:
    """Leave the process group; also drop DeepSpeed's cached groups so a later run in the same
    process (tests, notebooks) does not use the destroyed ones."""
    if dist.is_initialized():
        dist.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name, value in list(vars(groups).items()):
            if name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS")) and name.isupper():
                setattr(groups, name, {} if isinstance(value, dict) else None)
