"""Run directories written by cryoDRGN 4.x (``train_vae`` / ``train_nn``) as distdrgn models.

A cryoDRGN run holds ``config.yaml`` (``dataset_args``, ``lattice_args`` with D = box + 1,
``model_args``) and ``weights[.N].pkl`` (``torch.save`` dicts with ``model_state_dict``).
:func:`load_cryodrgn_run` rebuilds the same function as a :class:`~distdrgn.model.CryoDRGN`
(``layer_convention="cryodrgn"``) and :func:`eval_cryodrgn_volume` evaluates it on the grid
cryoDRGN's ``eval_vol`` uses, so the volumes agree with cryoDRGN's own to float32 rounding.
Nothing here reads the particle, pose or CTF files the config names.

What maps onto distdrgn (anything else is refused with a one-line DistdrgnError):

- decoder: a positional-encoding decoder (``pe_type`` gaussian, geom_ft, geom_full,
  geom_lowf, geom_nohighf or linear_lowf; ``none`` is not supported), ``domain`` fourier or
  hartley, ReLU, input width != hidden width and output width != hidden width (cryoDRGN
  then makes those layers residual too). Gaussian frequencies are ``rand_freqs`` of the state
  dict times ``D // 2``; geometric ladders are recomputed as cryoDRGN computes them and the
  input-layer columns permuted from cryoDRGN's feature order ``(coordinate, sin/cos, i)`` to
  distdrgn's ``(sin/cos, coordinate, i)``.
- encoder (train_vae): ``encode_mode`` resid or mlp with ``enc_mask`` = box / 2 (distdrgn's
  lattice mask: the Nyquist circle without DC); its input columns are permuted from
  cryoDRGN's row-major masked order to distdrgn's ``[half, mirror]`` order. Other encoders
  load without an encoder (``model.encoder is None``): volumes still work, encoding does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distdrgn.errors import DistdrgnError

PE_TYPES = ("gaussian", "geom_ft", "geom_full", "geom_lowf", "geom_nohighf", "linear_lowf")


def read_config(path: Path) -> dict | None:
    """The parsed cryoDRGN ``config.yaml`` at ``path``, or None if it is not one."""
    import yaml

    path = Path(path)
    if not path.is_file():
        return None
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None
    if isinstance(cfg, dict) and "model_args" in cfg and "lattice_args" in cfg:
        return cfg
    return None


def find_config(run: Path) -> Path | None:
    """config.yaml of a cryoDRGN run directory or of the directory holding a weights file."""
    run = Path(run)
    cand = run / "config.yaml" if run.is_dir() else run.parent / "config.yaml"
    return cand if read_config(cand) is not None else None


def is_cryodrgn_run(run: str | Path) -> bool:
    return find_config(Path(run)) is not None


def _cryodrgn_geom_freqs(pe_type: str, n: int, D_lat: int) -> torch.Tensor:
    """(n,) float32 angular frequencies in cryoDRGN's order (its formulas, float32 as it does)."""
    D2 = D_lat // 2
    DD = 2 * D2
    if pe_type == "linear_lowf":
        if n != D2:
            raise DistdrgnError(f"cryoDRGN pe_type linear_lowf needs pe_dim = {D2}, got {n}")
        return torch.arange(1, D2 + 1, dtype=torch.float)
    if n < 2:
        raise DistdrgnError(f"cryoDRGN pe_type {pe_type} needs pe_dim >= 2, got {n}")
    t = torch.arange(n, dtype=torch.float) / (n - 1)
    if pe_type == "geom_ft":
        return DD * np.pi * (2.0 / DD) ** t
    if pe_type == "geom_full":
        return DD * np.pi * (1.0 / DD / np.pi) ** t
    if pe_type == "geom_lowf":
        return D2 * (1.0 / D2) ** t
    if pe_type == "geom_nohighf":
        return D2 * (2.0 * np.pi / D2) ** t
    raise DistdrgnError(f"cryoDRGN pe_type {pe_type!r} is not supported (supported: {', '.join(PE_TYPES)})")


def _mlp_state(sd: dict, prefix: str, n_hidden: int, what: str) -> dict:
    """cryoDRGN ResidLinearMLP/MLP keys ``PREFIX.main.{0,2,..}`` -> distdrgn MLP keys."""
    if f"{prefix}main.0.linear.weight" in sd:
        raise DistdrgnError(f"cryoDRGN {what}: a residual input layer (input width = hidden width) is not supported")
    out_i = 2 * (n_hidden + 1)
    if f"{prefix}main.{out_i}.linear.weight" in sd:
        raise DistdrgnError(f"cryoDRGN {what}: a residual output layer (output width = hidden width) is not supported")
    try:
        new = {"inp.weight": sd[f"{prefix}main.0.weight"], "inp.bias": sd[f"{prefix}main.0.bias"]}
        for j in range(n_hidden):
            src = f"{prefix}main.{2 * (j + 1)}"
            lin = f"{src}.linear" if f"{src}.linear.weight" in sd else src
            new[f"hidden.{j}.weight"] = sd[f"{lin}.weight"]
            new[f"hidden.{j}.bias"] = sd[f"{lin}.bias"]
        new["out.weight"] = sd[f"{prefix}main.{out_i}.weight"]
        new["out.bias"] = sd[f"{prefix}main.{out_i}.bias"]
    except KeyError as exc:
        raise DistdrgnError(f"cryoDRGN {what}: weights do not match the config (missing {exc.args[0]})") from None
    if f"{prefix}main.{out_i + 1}.weight" in sd or f"{prefix}main.{out_i + 2}.weight" in sd:
        raise DistdrgnError(f"cryoDRGN {what}: more layers in the weights than the config says")
    return new


def load_cryodrgn_run(run: str | Path, epoch: int | None = None, device=None, config: str | Path | None = None,
                      need_encoder: bool = False):
    """A :class:`~distdrgn.volumes.TrainedModel` from a cryoDRGN run directory or weights file."""
    from distdrgn.checkpoint import weights_path
    from distdrgn.model import CryoDRGN, ModelInfo
    from distdrgn.objective import Preprocess
    from distdrgn.volumes import TrainedModel

    run = Path(run)
    cfg_path = Path(config) if config is not None else find_config(run)
    cfg = read_config(cfg_path) if cfg_path is not None else None
    if cfg is None:
        raise DistdrgnError(f"{cfg_path or run}: not a cryoDRGN config.yaml (needs model_args and lattice_args)")
    path = run if run.is_file() else weights_path(run, epoch)
    if not path.is_file():
        raise DistdrgnError(f"{path}: no such weights file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain containers only
        sd = ckpt["model_state_dict"]
    except Exception as exc:  # torch raises several types for corrupt/foreign pickles
        first = (str(exc).splitlines() or [""])[0]
        raise DistdrgnError(f"{path}: cannot read cryoDRGN weights ({type(exc).__name__}: {first})") from None

    lat, m, ds = cfg["lattice_args"], cfg["model_args"], cfg.get("dataset_args") or {}
    D_lat = int(lat["D"])
    box = D_lat - 1
    if D_lat % 2 != 1 or box < 4:
        raise DistdrgnError(f"{cfg_path}: lattice_args D = {D_lat} must be odd (box + 1)")
    if float(lat.get("extent", 0.5)) != 0.5:
        raise DistdrgnError(f"{cfg_path}: lattice extent {lat.get('extent')} is not supported (only 0.5)")
    if m.get("activation", "relu") != "relu":
        raise DistdrgnError(f"{cfg_path}: activation {m.get('activation')!r} is not supported (only relu)")
    pe_type = m.get("pe_type", "gaussian")
    if pe_type not in PE_TYPES:
        raise DistdrgnError(f"{cfg_path}: cryoDRGN pe_type {pe_type!r} is not supported (supported: {', '.join(PE_TYPES)})")
    domain = m.get("domain", "fourier")
    if domain not in ("fourier", "hartley"):
        raise DistdrgnError(f"{cfg_path}: domain {domain!r} is not supported")
    het = "players" in m
    zdim = int(m.get("zdim") or 0) if het else 0
    pe_dim = int(m["pe_dim"]) if m.get("pe_dim") is not None else D_lat // 2
    if het:
        dec_layers, dec_dim = int(m["players"]), int(m["pdim"])
        enc_layers, enc_dim = int(m["qlayers"]), int(m["qdim"])
        encode_mode = m.get("encode_mode", "resid")
        dprefix = "decoder."
    else:
        dec_layers, dec_dim = int(m["layers"]), int(m["dim"])
        enc_layers, enc_dim, encode_mode = 1, 1, "resid"
        dprefix = ""
    norm = ds.get("norm", ckpt.get("norm") if isinstance(ckpt, dict) else None)
    if norm is None:
        raise DistdrgnError(f"{cfg_path}: dataset_args has no norm")
    norm = [float(norm[0]), float(norm[1])]

    # encoder: only resid / mlp with distdrgn's lattice mask
    encoder_ok = het and zdim > 0
    enc_problem = None
    if encoder_ok:
        if encode_mode not in ("resid", "mlp"):
            enc_problem = f"encode_mode {encode_mode!r}"
        elif int(m.get("enc_mask", -1)) != box // 2 or not lat.get("ignore_DC", True):
            enc_problem = f"enc_mask {m.get('enc_mask')} (distdrgn's encoder sees the circle of radius {box // 2} without DC)"
        if enc_problem and need_encoder:
            raise DistdrgnError(f"{cfg_path}: the cryoDRGN encoder cannot be expressed in distdrgn: {enc_problem}")

    info = ModelInfo(D=box, zdim=zdim, encoder="resid" if encode_mode == "resid" else "mlp",
                     enc_dim=enc_dim, enc_layers=enc_layers, dec_dim=dec_dim, dec_layers=dec_layers,
                     pe_type=pe_type, pe_dim=pe_dim, feat_sigma=float(m.get("feat_sigma") or 0.5),
                     domain=domain, seed=int(cfg.get("seed") or 0), layer_convention="cryodrgn")
    model = CryoDRGN(info)

    new = {f"decoder.mlp.{k}": v for k, v in _mlp_state(sd, f"{dprefix}decoder.", dec_layers, "decoder").items()}
    n_pe = 6 * pe_dim
    w = new["decoder.mlp.inp.weight"]
    if w.shape[1] != n_pe + zdim:
        raise DistdrgnError(f"{path}: decoder input width {w.shape[1]} != 6 * pe_dim + zdim = {n_pe + zdim}")
    if pe_type == "gaussian":
        try:
            rand = sd[f"{dprefix}rand_freqs"]
        except KeyError:
            raise DistdrgnError(f"{path}: gaussian decoder without rand_freqs") from None
        new["decoder.pe.freqs"] = rand.float() * (D_lat // 2)
    else:
        new["decoder.pe.freqs"] = _cryodrgn_geom_freqs(pe_type, pe_dim, D_lat)
        s, c, i = np.meshgrid(np.arange(2), np.arange(3), np.arange(pe_dim), indexing="ij")  # distdrgn order
        src = torch.as_tensor((c * 2 * pe_dim + s * pe_dim + i).ravel())
        new["decoder.mlp.inp.weight"] = torch.cat([w[:, src], w[:, n_pe:]], 1)

    if encoder_ok and not enc_problem:
        enc = _mlp_state(sd, "encoder.", enc_layers, "encoder")
        we = enc["inp.weight"]
        lattice = model.lattice
        if we.shape[1] != lattice.n_masked:
            raise DistdrgnError(f"{path}: encoder input width {we.shape[1]} != {lattice.n_masked} masked lattice points")
        # cryoDRGN column q = q-th masked point in row-major order; distdrgn column p = mask_indices[p]
        mask = torch.zeros(D_lat * D_lat, dtype=torch.bool)
        mask[lattice.mask_indices] = True
        rank = torch.cumsum(mask.long(), 0) - 1
        enc["inp.weight"] = we[:, rank[lattice.mask_indices]]
        new.update({f"encoder.mlp.{k}": v for k, v in enc.items()})
    elif model.encoder is not None:
        model.encoder = None
    try:
        model.load_state_dict({k: v.float() for k, v in new.items()}, strict=model.encoder is not None)
    except RuntimeError as exc:
        raise DistdrgnError(f"{path}: weights do not match the config ({str(exc).splitlines()[0]})") from None
    model.eval()
    if device is not None:
        model.to(device)
    prep = Preprocess(D=box, invert=bool(ds.get("invert_data", True)), window=bool(ds.get("window", True)),
                      window_inner=float(ds.get("window_r", 0.85)), ht_std=norm[1])
    ep = int(ckpt.get("epoch", epoch or 0)) if isinstance(ckpt, dict) else int(epoch or 0)
    meta = {"format": "cryodrgn", "norm": norm, "cryodrgn_config": cfg, "config_path": str(cfg_path)}
    return TrainedModel(model, prep, None, ep, meta, path)


@torch.no_grad()
def eval_cryodrgn_volume(trained, z=None, device=None) -> np.ndarray:
    """(box, box, box) float32 volume as cryoDRGN's ``eval_vol`` computes it.

    The (box+1)^3 grid ``(j - box/2) / box`` (axes z, y, x); the Fourier domain is evaluated
    inside |k| <= 0.5 (zero outside), the Hartley domain everywhere; then ``* norm[1] +
    norm[0]`` on the whole grid, the last plane of each axis dropped, inverse centred HT.
    """
    from distdrgn.fft import iht3_center
    from distdrgn.volumes import latent_tensor

    model = trained.model
    D = trained.D
    mean, std = trained.config["norm"]
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    zt = latent_tensor(model, z, device)
    fourier = model.info.domain == "fourier"
    k = (torch.arange(D + 1, dtype=torch.float32, device=device) - D // 2) / D
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    plane_xy = torch.stack([kx.ravel(), ky.ravel()], -1)
    vol = torch.zeros((D + 1, D + 1, D + 1), dtype=torch.float32, device=device)
    for iz in range(D + 1):
        kz = k[iz]
        pts = torch.cat([plane_xy, kz.expand(plane_xy.shape[0], 1)], -1)
        if fourier:
            inside = (pts * pts).sum(-1) <= 0.25
            if not inside.any():
                continue
            plane = torch.zeros((D + 1) ** 2, dtype=torch.float32, device=device)
            plane[inside] = model.decoder.hartley(pts[inside][None], zt)[0].float()
        else:
            plane = model.decoder.hartley(pts[None], zt)[0].float()
        vol[iz] = plane.view(D + 1, D + 1)
    vol = vol * std + mean
    return iht3_center(vol[:-1, :-1, :-1].double()).float().cpu().numpy()


def trajectory(z_start, z_end, n: int) -> np.ndarray:
    """(n, zdim) float32: n latents evenly from z_start to z_end inclusive (cryoDRGN's --z-start)."""
    a = np.asarray(z_start, dtype=np.float32).reshape(-1)
    b = np.asarray(z_end, dtype=np.float32).reshape(-1)
    if a.shape != b.shape:
        raise DistdrgnError(f"--z-start has {a.size} values but --z-end has {b.size}")
    if n < 2:
        raise DistdrgnError(f"-n must be >= 2 for --z-start/--z-end, got {n}")
    z = np.repeat(np.arange(n, dtype=np.float32), a.size).reshape(n, a.size)
    z *= (b - a) / (n - 1)
    z += a
    return z


def postprocess_volume(vol: np.ndarray, *, flip: bool = False, invert: bool = False, low_pass: float | None = None,
                       apix: float | None = None, crop: int | None = None) -> np.ndarray:
    """cryoDRGN's eval_vol post-processing, in its order: flip (axis 0), invert, low-pass, crop.

    ``low_pass`` (Angstrom) zeroes the centred Hartley transform outside radius apix /
    low_pass cycles/pixel; ``crop`` keeps the central ``crop``^3 voxels (even).
    """
    if flip:
        vol = vol[::-1]
    if invert:
        vol = -vol
    if low_pass:
        from distdrgn.fft import ht3_center, iht3_center

        if not apix:
            raise DistdrgnError("--low-pass needs the voxel size (--apix)")
        D = vol.shape[0]
        t = torch.as_tensor(np.ascontiguousarray(vol), dtype=torch.float64)
        f = torch.fft.fftshift(torch.fft.fftfreq(D, dtype=torch.float64))
        fz, fy, fx = torch.meshgrid(f, f, f, indexing="ij")
        keep = fx * fx + fy * fy + fz * fz <= (apix / low_pass) ** 2
        vol = iht3_center(ht3_center(t) * keep).float().numpy()
    if crop:
        D = vol.shape[0]
        if crop % 2 or crop > D:
            raise DistdrgnError(f"--crop {crop} must be even and <= the box {D}")
        a = int(D / 2 - crop / 2)
        vol = vol[a:a + crop, a:a + crop, a:a + crop]
    return np.ascontiguousarray(vol, dtype=np.float32)
