"""The training configuration: typed dataclasses loaded from YAML with dotted overrides.

A config file has the sections ``data``, ``output``, ``model``, ``train``, ``abinit``,
``metrics`` and ``debug``; any key left out takes the default below (cryoDRGN's defaults). The named configs
``tiny``, ``default`` and ``large`` ship inside the package (``distdrgn/configs/``) and are
found by name; ``distdrgn config NAME`` prints one with its comments. Command-line overrides are
``section.key=value`` with the value parsed as YAML (``train.epochs=3``, ``data.level=64``,
``metrics.port=null``). Unknown keys and values of the wrong type are reported as one-line
:class:`~distdrgn.errors.DistdrgnError` messages naming the file or override.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distdrgn.errors import DistdrgnError
from distdrgn.kernels import KERNEL_CHOICES  # the decoder paths are defined once, where they are chosen

PE_TYPES = ("gaussian", "geom_ft", "geom_full", "geom_lowf", "geom_nohighf", "linear_lowf", "none")
DOMAINS = ("fourier", "hartley")
ENCODERS = ("resid", "mlp", "autodecoder")
ENGINES = ("ddp", "deepspeed")
AMP_MODES = ("auto", "true", "false")


@dataclass
class DataConfig:
    store: str = ""  # path to the particle store (distdrgn ingest output)
    level: int | None = None  # box size of a downsampled copy in the store; None = full size
    invert: bool = True  # multiply images by -1 (cryoDRGN default; false = --uninvert-data)
    window: bool = True  # soft circular real-space window before the transform
    window_inner: float = 0.85  # fraction of the half box where the window starts to fall
    window_outer: float = 0.99  # fraction of the half box where the window reaches 0
    norm_images: int = 1000  # images used to estimate the Hartley std when the store has none
    allow_unverified: bool = False  # train on a store whose last `store verify` failed
    ind: str | None = None  # ind.pkl of store positions: train on that subset only (cryoDRGN --ind)


@dataclass
class OutputConfig:
    dir: str = ""  # run directory: config.yaml, weights.N.pkl, z.N.pkl, run.log, loss.csv


@dataclass
class ModelConfig:
    zdim: int = 8  # latent dimension; 0 = homogeneous reconstruction (no encoder)
    encoder: str = "resid"  # resid | mlp | autodecoder (a learned z per particle, no image encoder)
    enc_dim: int = 1024
    enc_layers: int = 3  # hidden H -> H layers after the input layer (cryoDRGN --enc-layers)
    dec_dim: int = 1024
    dec_layers: int = 3  # residual H -> H layers after the input layer (cryoDRGN --dec-layers)
    pe_type: str = "gaussian"
    pe_dim: int | None = None  # None = D/2
    feat_sigma: float = 0.5  # std of the gaussian frequencies, in units of D/2
    domain: str = "fourier"  # fourier (real, imag outputs; Hermitian) | hartley (one output)
    kernels: str = "auto"  # auto (fused on CUDA with Triton) | fused (Triton kernels) | compile (torch.compile) | torch (the reference)
    pose_refine: bool = False  # learn per-particle pose corrections from the store's poses (cryoDRGN --do-pose-sgd)
    pose_lr_rot: float = 0.01  # pose refinement: Adam step of each particle's rotation, radians per epoch
    pose_lr_trans: float = 0.2  # pose refinement: Adam step of each particle's shift, pixels per epoch
    pose_warmup_epochs: int = 1  # pose refinement starts after this many epochs on the fixed poses
    z_lr: float = 0.05  # autodecoder: Adam step of each particle's z per epoch
    z_init_std: float = 0.1  # autodecoder: the z table starts as N(0, z_init_std^2) draws


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 16  # images per process per step
    lr: float = 1e-4
    weight_decay: float = 0.0
    seed: int = 0
    engine: str = "ddp"  # ddp | deepspeed
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3 (engine=deepspeed only; resume needs 0-2)
    bucket_cap_mb: float = 25.0  # gradient all-reduce bucket size (DDP bucket_cap_mb; ZeRO 1-2 reduce buckets)
    grad_comm_dtype: str = "fp32"  # fp32 | bf16: dtype of the gradient all-reduce (bf16 halves the bytes)
    checkpoint_every: int = 1  # epochs between weights.N.pkl / z.N.pkl
    checkpoint_every_steps: int = 0  # steps between mid-epoch checkpoints/step.E.C.pkl (0 = none)
    amp: bool | str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | true | false
    beta: float | str | None = None  # None = 1/zdim; a number; or "linear:START:END:EPOCHS"
    num_workers: int = 0  # DataLoader worker processes per rank
    shuffle_chunks: int = 4  # images are shuffled within windows of this many store chunks
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 50  # steps between progress log lines in run.log
    max_nonfinite_steps: int = 20  # stop after this many consecutive steps with a NaN/inf loss or gradient
    load: str | None = None  # start from these weights (a weights.N.pkl of a distdrgn run; cryoDRGN --load)
    cuda_graphs: bool = False  # capture the training step in a CUDA graph (one GPU process, train.engine=ddp)
    analyze: bool = True  # run `distdrgn analyze` on the final epoch when training ends (as cryoDRGN 4.3.1)


@dataclass
class AbinitConfig:
    """``distdrgn abinit``: poses from a hierarchical search instead of the store (train ignores it)."""

    search_epochs: int = 2  # epochs whose batches get their poses from the global search; then model.pose_* refine them
    refine: bool = True  # after the search epochs, refine the found poses by gradient (model.pose_lr_*)
    base_rotations: int = 4608  # rotations of the coarse SO(3) grid (4608: ~15 degree cells)
    levels: int = 4  # subdivisions of the kept candidates (each halves the rotation and shift steps)
    keep: int = 8  # (rotation, shift) candidates kept per image from one level to the next
    sample: bool = True  # train on a pose drawn from the kept candidates' posterior (false: the best one)
    classes: int = 1  # > 1: multi-class ab initio: that many maps (a one-hot z, model.zdim = classes), class chosen with the pose
    attempts: int = 1  # > 1: that many searches from train.seed, seed + 1, ... (output.dir/attempts/K); the lowest loss goes on
    attempt_epochs: int = 0  # search epochs of each attempt (0: abinit.search_epochs)
    local_search: bool = False  # after the search epochs, re-search each batch's poses near their current values first
    local_cell_deg: float = 8.0  # the local search's first cell: it reaches +-cell/2 per axis (and +-shift_step_px)
    shift_extent_px: float = 10.0  # the coarse shift grid covers [-extent, extent] pixels in x and y
    shift_step_px: float = 2.0  # step of the coarse shift grid, pixels
    radius_start: float = 12.0  # lattice radius (pixels of the box) the search compares within, first search epoch
    radius_end: float = 32.0  # ... and in the last search epoch (frequency marching; capped at D/2)
    support_weight: float = 1.0  # while searching, weight of the prior against density outside support_radius (0: off)
    support_radius: float = 0.38  # the particle lies within this many box widths of the box centre


@dataclass
class MetricsConfig:
    port: int | None = None  # rank 0 serves Prometheus metrics on this port when set


@dataclass
class DebugConfig:
    """Instrumentation for fault drills and exactly-once checks; inert at the defaults."""

    trace_samples: str | None = None  # folder: each process appends samples.PID.jsonl (resume point, each step's ids)
    step_delay_s: float = 0.0  # sleep after every step (slows a run down so that a drill can act mid-epoch)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    abinit: AbinitConfig = field(default_factory=AbinitConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
PACKAGED = Path(__file__).resolve().parent / "configs"  # tiny.yaml, default.yaml, large.yaml

_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits annotation ``tp``; returns (ok, value converted where lossless)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, conv = _type_ok(value, arg)
            if ok:
                return True, conv
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        # YAML 1.1 (PyYAML) reads exponents without a dot, like 1e-3, as strings
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    if section not in SECTIONS:
        raise DistdrgnError(f"{source}: unknown config section '{section}' (expected {', '.join(SECTIONS)})")
    sub = getattr(cfg, section)
    hints = typing.get_type_hints(type(sub))
    if key not in hints:
        raise DistdrgnError(f"{source}: unknown key '{section}.{key}' (known: {', '.join(hints)})")
    ok, conv = _type_ok(value, hints[key])
    if not ok:
        raise DistdrgnError(
            f"{source}: '{section}.{key}' must be {_type_name(hints[key])}, got {value!r} ({type(value).__name__})"
        )
    setattr(sub, key, conv)


def validate(cfg: Config, source: str = "config") -> Config:
    """Check value ranges and choices; raises DistdrgnError with the offending key."""
    checks = [
        (cfg.model.pe_type in PE_TYPES, f"model.pe_type must be one of {', '.join(PE_TYPES)}"),
        (cfg.model.domain in DOMAINS, f"model.domain must be one of {', '.join(DOMAINS)}"),
        (cfg.model.kernels in KERNEL_CHOICES, f"model.kernels must be one of {', '.join(KERNEL_CHOICES)}"),
        (cfg.model.encoder in ENCODERS, f"model.encoder must be one of {', '.join(ENCODERS)}"),
        (cfg.train.engine in ENGINES, f"train.engine must be one of {', '.join(ENGINES)}"),
        (cfg.train.zero_stage in (0, 1, 2, 3), "train.zero_stage must be 0, 1, 2 or 3"),
        (cfg.train.bucket_cap_mb > 0, "train.bucket_cap_mb must be > 0"),
        (cfg.train.grad_comm_dtype in ("fp32", "bf16"), "train.grad_comm_dtype must be fp32 or bf16"),
        (str(cfg.train.amp).lower() in AMP_MODES, "train.amp must be auto, true or false"),
        (cfg.train.device in ("auto", "cpu", "cuda"), "train.device must be auto, cpu or cuda"),
        (not (cfg.train.cuda_graphs and cfg.train.device == "cpu"),
         "train.cuda_graphs=true needs a CUDA device (train.device=cpu); set train.cuda_graphs=false"),
        (cfg.model.zdim >= 0, "model.zdim must be >= 0"),
        (cfg.model.enc_dim > 0 and cfg.model.dec_dim > 0, "model.enc_dim and model.dec_dim must be > 0"),
        (cfg.model.enc_layers >= 0 and cfg.model.dec_layers >= 0, "model.enc_layers and model.dec_layers must be >= 0"),
        (cfg.model.pe_dim is None or cfg.model.pe_dim >= 1, "model.pe_dim must be >= 1"),
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.train.lr > 0, "train.lr must be > 0"),
        (cfg.train.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
        (cfg.train.checkpoint_every_steps >= 0, "train.checkpoint_every_steps must be >= 0"),
        (cfg.train.num_workers >= 0, "train.num_workers must be >= 0"),
        (cfg.train.shuffle_chunks >= 1, "train.shuffle_chunks must be >= 1"),
        (cfg.train.max_nonfinite_steps >= 1, "train.max_nonfinite_steps must be >= 1"),
        (cfg.model.pose_lr_rot > 0 and cfg.model.pose_lr_trans >= 0,
         "model.pose_lr_rot must be > 0 and model.pose_lr_trans >= 0"),
        (cfg.model.pose_warmup_epochs >= 0, "model.pose_warmup_epochs must be >= 0"),
        (cfg.model.encoder != "autodecoder" or cfg.model.zdim > 0,
         "model.encoder=autodecoder learns a z per particle: it needs model.zdim > 0"),
        (cfg.model.encoder != "autodecoder" or cfg.train.engine == "ddp",
         "model.encoder=autodecoder runs with train.engine=ddp (its z table is updated outside the DeepSpeed engine)"),
        (cfg.model.z_lr > 0 and cfg.model.z_init_std >= 0, "model.z_lr must be > 0 and model.z_init_std >= 0"),
        (cfg.abinit.search_epochs >= 1, "abinit.search_epochs must be >= 1"),
        (cfg.abinit.classes >= 1, "abinit.classes must be >= 1"),
        (cfg.abinit.attempts >= 1 and cfg.abinit.attempt_epochs >= 0,
         "abinit.attempts must be >= 1 and abinit.attempt_epochs >= 0"),
        (cfg.abinit.base_rotations >= 1 and cfg.abinit.keep >= 1 and cfg.abinit.levels >= 0,
         "abinit.base_rotations and abinit.keep must be >= 1, abinit.levels >= 0"),
        (cfg.abinit.shift_extent_px >= 0 and cfg.abinit.shift_step_px > 0,
         "abinit.shift_extent_px must be >= 0 and abinit.shift_step_px > 0"),
        (0 < cfg.abinit.radius_start <= cfg.abinit.radius_end, "abinit needs 0 < radius_start <= radius_end"),
        (cfg.abinit.support_weight >= 0 and 0 < cfg.abinit.support_radius <= 0.5,
         "abinit.support_weight must be >= 0 and abinit.support_radius in (0, 0.5] (box widths from the centre)"),
        (not cfg.abinit.local_search or (cfg.abinit.levels >= 1 and cfg.abinit.local_cell_deg > 0),
         "abinit.local_search needs abinit.levels >= 1 and abinit.local_cell_deg > 0"),
        (cfg.debug.step_delay_s >= 0, "debug.step_delay_s must be >= 0"),
        (cfg.data.level is None or (cfg.data.level >= 4 and cfg.data.level % 2 == 0), "data.level must be even and >= 4"),
        (0 < cfg.data.window_inner < cfg.data.window_outer, "data.window_inner must be in (0, data.window_outer)"),
        (cfg.metrics.port is None or 1 <= cfg.metrics.port <= 65535,
         f"metrics.port must be null or in 1..65535, got {cfg.metrics.port}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise DistdrgnError(f"{source}: {msg}")
    _check_run_dir_outside_store(cfg, source)
    if cfg.train.beta is not None and not isinstance(cfg.train.beta, float):
        from distdrgn.objective import parse_beta  # validates the schedule syntax

        parse_beta(cfg.train.beta, cfg.model.zdim, source=source)
    return cfg


def _check_run_dir_outside_store(cfg: Config, source: str) -> None:
    """A run directory in the particle store would mix config.yaml, weights.N.pkl and the
    checkpoints' pruning into the store's own files."""
    if not (cfg.data.store and cfg.output.dir):
        return
    store, run = Path(cfg.data.store).resolve(), Path(cfg.output.dir).resolve()
    if run == store or store in run.parents:
        raise DistdrgnError(f"{source}: output.dir ({cfg.output.dir}) is inside data.store ({cfg.data.store}); "
                            "the run's files do not belong in the store: choose another output.dir")


def from_dict(data: dict[str, Any] | None, source: str = "config") -> Config:
    """Build a Config from a nested mapping; unknown sections/keys and bad types raise."""
    cfg = Config()
    if data is None:
        return cfg
    if not isinstance(data, dict):
        raise DistdrgnError(f"{source}: top level must be a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if section == "run_format":  # written by dump_config: how the run directory numbers its files
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            raise DistdrgnError(f"{source}: section '{section}' must be a mapping, got {values!r}")
        for key, value in values.items():
            _apply(cfg, str(section), str(key), value, source)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (value parsed as YAML) in order."""
    for item in overrides:
        if "=" not in item:
            raise DistdrgnError(f"override '{item}': expected section.key=value")
        dotted, raw = item.split("=", 1)
        if dotted.count(".") != 1:
            raise DistdrgnError(f"override '{item}': key must be section.key, e.g. train.epochs=3")
        section, key = dotted.split(".")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise DistdrgnError(f"override '{item}': cannot parse value ({exc.__class__.__name__})") from None
        _apply(cfg, section, key, value, f"override '{item}'")
    return cfg


def packaged_configs() -> list[str]:
    """Names of the configs shipped in the package (``tiny``, ``default``, ``large``)."""
    return sorted(p.stem for p in PACKAGED.glob("*.yaml"))


def config_path(name_or_path: str | Path) -> Path:
    """A config file: an existing path, else a packaged config by name (``large`` or
    ``large.yaml``, as ``configs/large.yaml`` in a checkout)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = PACKAGED / f"{path.stem}.yaml"
    if path.parent in (Path("."), Path("configs")) and path.suffix in ("", ".yaml") and packaged.is_file():
        return packaged
    raise DistdrgnError(f"{name_or_path}: config file not found (named configs: {', '.join(packaged_configs())})")


def split_config_arguments(args: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [section.key=value ...]`` -> (config or None, overrides): the first argument is
    the config unless it is an override (``section.key=...`` and no file of that name)."""
    if args and not ("=" in args[0] and not Path(args[0]).is_file()):
        return args[0], list(args[1:])
    return None, list(args)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or defaults when ``path`` is None), apply overrides, validate.

    ``path`` may name a packaged config (:func:`config_path`). Relative ``data.store`` and
    ``output.dir`` paths in a file are taken relative to the current directory (as on the
    command line), not to the file.
    """
    data = None
    source = "config"
    if path is not None:
        path = config_path(path)
        source = str(path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise DistdrgnError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    cfg = from_dict(data, source)
    apply_overrides(cfg, overrides or [])
    return validate(cfg, source)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text (what config.yaml in a run directory holds).

    ``run_format`` comes first (:data:`distdrgn.checkpoint.RUN_FORMAT`): 2 = epochs numbered
    from 1 and layers counted as cryoDRGN counts them; a config.yaml without it is read as
    distdrgn 0.1 wrote it.
    """
    from distdrgn.checkpoint import RUN_FORMAT

    return yaml.safe_dump({"run_format": RUN_FORMAT, **cfg.to_dict()}, sort_keys=False)


# what `train --help` shows of each section: the keys most runs set
MOST_USED = {
    "data": ("store", "level", "ind", "invert"),
    "output": ("dir",),
    "model": ("zdim", "enc_dim", "enc_layers", "dec_dim", "dec_layers", "kernels", "pose_refine"),
    "train": ("epochs", "batch_size", "lr", "engine", "amp", "checkpoint_every_steps", "num_workers", "load"),
    "abinit": ("search_epochs", "base_rotations", "levels"),
    "metrics": ("port",),
    "debug": ("trace_samples", "step_delay_s"),
}


def describe_keys() -> str:
    """The sections and their most used keys with defaults, for ``train --help``."""
    lines = []
    for section in SECTIONS:
        sub = getattr(Config(), section)
        names = [f.name for f in dataclasses.fields(sub)]
        shown = [k for k in MOST_USED.get(section, ()) if k in names]
        text = " ".join(f"{k}={yaml.safe_dump(getattr(sub, k), default_flow_style=True).strip().removesuffix('...').strip()}"
                        for k in shown)
        more = f" (+{len(names) - len(shown)} more)" if len(names) > len(shown) else ""
        lines.append(f"  {section + '.':9s}{text}{more}")
    return "\n".join(lines)
