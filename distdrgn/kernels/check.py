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


def _mse_and_grads(model, inputs: dict, kernels: str, amp_dtype: torch.dtype | None):
    device = inputs["rots"].device
    model.kernels = kernels
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        mse, _, _ = model(inputs["rots"], inputs["y_enc"], sample=False, y=inputs["y"], ctf=inputs["ctf"])
    mse.sum().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return mse.detach().float(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_fused(model, amp_dtype: torch.dtype | None, images: int = 2, seed: int = 0) -> str | None:
    """None if the fused decoder agrees with the reference on ``model``'s device, else why not.

    Leaves the parameters, their gradients (cleared) and the random state as they were, and
    ``model.kernels`` as it found it.
    """
    device = model.slice_coords.device
    before = model.kernels
    gen = torch.Generator().manual_seed(seed)
    n = model.lattice.n_masked
    inputs = {"rots": random_rotations(images, gen).float(), "y_enc": torch.randn(images, n, generator=gen) if model.zdim else None,
              "y": torch.randn(images, n, generator=gen), "ctf": torch.randn(images, n, generator=gen)}
    inputs = {k: v.to(device) if v is not None else None for k, v in inputs.items()}
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            ref_mse, ref_grads = _mse_and_grads(model, inputs, "torch", None)
            mse, grads = _mse_and_grads(model, inputs, "fused", None)
            if _rel(mse, ref_mse) > FP32_TOLERANCE:
                return f"float32 MSE differs from the reference by {_rel(mse, ref_mse):.2e} (relative)"
            worst = max(ref_grads, key=lambda k: _rel(grads[k], ref_grads[k]) if k in grads else float("inf"))
            if worst not in grads or _rel(grads[worst], ref_grads[worst]) > FP32_TOLERANCE:
                return f"float32 gradient of {worst} differs from the reference"
            if amp_dtype is not None:
                low, _ = _mse_and_grads(model, inputs, "fused", amp_dtype)
                if not torch.isfinite(low).all() or _rel(low, ref_mse) > BF16_TOLERANCE:
                    return f"{amp_dtype} MSE differs from the float32 reference by {_rel(low, ref_mse):.2e} (relative)"
    except Exception as exc:  # a compile or launch failure is a reason to fall back, not to crash
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        model.zero_grad(set_to_none=True)
        model.kernels = before
    return None
