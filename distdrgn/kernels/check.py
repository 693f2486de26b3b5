"""A start-up check of the fused decoder on the device it is about to train on.

Triton compiles for the GPU in hand, so a kernel can fail to compile, or compute wrongly,
on a GPU or Triton version the tests never ran on. Before training, :func:`check_fused`
runs the real model's decoder both ways on two random images: float32 against the
reference (tight tolerance) and, when training in bf16, once more in bf16 (loose
tolerance). ``model.kernels=auto`` falls back to the reference when it fails; ``fused``
stops with the reason.
"""

from __future__ import annotations

import torch

from distdrgn.simulate import random_rotations

FP32_TOLERANCE = 1e-4  # relative, MSE and every gradient (IEEE float32 products on both paths)
BF16_TOLERANCE = 5e-2  # relative, MSE only (8-bit mantissa activations)


def random_inputs(model, images: int, seed: int = 0, ctf: bool = True) -> dict:
    """Random poses, encoder input, observations and CTF (each (images, n_masked)) on the model's device."""
    gen = torch.Generator().manual_seed(seed)
    n = model.lattice.n_masked
    inputs = {"rots": random_rotations(images, gen).float(), "y_enc": torch.randn(images, n, generator=gen),
              "y": torch.randn(images, n, generator=gen), "ctf": torch.randn(images, n, generator=gen)}
    inputs["y_enc"] = inputs["y_enc"] if model.zdim else None
    inputs["ctf"] = inputs["ctf"] if ctf else None
    device = model.slice_coords.device
    return {k: v.to(device) if v is not None else None for k, v in inputs.items()}


def mse_and_grads(model, inputs: dict, kernels: str, amp_dtype: torch.dtype | None = None):
    """Per-image MSE (B,) through ``kernels`` and every parameter's gradient of ``sum_i i * mse_i``
    (distinct weights, so that an image's gradient sent to another image shows)."""
    device = inputs["rots"].device
    model.kernels = kernels
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        mse, _, _ = model(inputs["rots"], inputs["y_enc"], sample=False, y=inputs["y"], ctf=inputs["ctf"])
    (mse * torch.arange(1.0, len(mse) + 1, device=device)).sum().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return mse.detach().float(), grads


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def check_fused(model, amp_dtype: torch.dtype | None, images: int = 2, seed: int = 0) -> str | None:
    """None if the fused decoder agrees with the reference on ``model``'s device, else why not.

    Leaves the parameters, their gradients (cleared) and the random state as they were, and
    ``model.kernels`` as it found it.
    """
    device = model.slice_coords.device
    before = model.kernels
    inputs = random_inputs(model, images, seed)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            ref_mse, ref_grads = mse_and_grads(model, inputs, "torch")
            mse, grads = mse_and_grads(model, inputs, "fused")
            if relative_error(mse, ref_mse) > FP32_TOLERANCE:
                return f"float32 MSE differs from the reference by {relative_error(mse, ref_mse):.2e} (relative)"
            for name, ref in ref_grads.items():
                if name not in grads or relative_error(grads[name], ref) > FP32_TOLERANCE:
                    return f"float32 gradient of {name} differs from the reference"
            if amp_dtype is not None:
                low, _ = mse_and_grads(model, inputs, "fused", amp_dtype)
                if not torch.isfinite(low).all() or relative_error(low, ref_mse) > BF16_TOLERANCE:
                    return (f"{amp_dtype} MSE differs from the float32 reference by "
                            f"{relative_error(low, ref_mse):.2e} (relative)")
    except Exception as exc:  # a compile or launch failure is a reason to fall back, not to crash
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        model.zero_grad(set_to_none=True)
        model.kernels = before
    return None
