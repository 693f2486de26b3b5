"""A start-up check of the fused decoder on the device it is about to train on.

Triton compiles for the GPU in hand, so a kernel can fail to compile, or compute wrongly,
on a GPU or Triton version the tests never ran on. Before training, :func:`check_fused`
runs the real model both ways on two random images and compares the per-image MSE and
**every parameter gradient** with the float32 reference path:

- in float32, within :data:`FP32_TOLERANCE` (both paths use IEEE float32 products);
- when training in bf16 (``amp_dtype``), the fused path under autocast against the same
  float32 reference, within :func:`low_precision_bound` of each tensor.

``model.kernels=auto`` falls back to the reference when it fails; ``fused`` stops with the
reason (``distdrgn.train.choose_kernels``).
"""

from __future__ import annotations

import torch

from distdrgn.lattice import random_rotations

FP32_TOLERANCE = 1e-4  # relative, MSE and every gradient (IEEE float32 products on both paths)
# bf16 keeps 8 significant bits: unit roundoff u = 2^-8. A product rounds its two inputs to
# bf16 (relative error up to u each) and its output once more; through the encoder and the
# decoder's 5 layers, forward and backward, these add up to several u per gradient tensor.
# Measured on the CPU (tests/test_kernels.py, a 160-wide decoder, 2 images): the reference
# path's bf16 gradients are 0.5-3.3% off float32, the fused path's 1.5-4.4% (it rounds at
# other places: float32 latent term, residual folded into the product, float32 loss sums).
# 16u = 6.25% is the floor: any bf16 path passes below it; a wrong kernel (a lost term, a
# wrong scale or image) is off by far more, and the float32 check catches subtle errors.
BF16_UNIT_ROUNDOFF = 2.0**-8
BF16_FLOOR = 16 * BF16_UNIT_ROUNDOFF


def low_precision_bound(reference_error: float) -> float:
    """Largest relative error allowed for a fused bf16 tensor: twice the reference path's own
    bf16 error on the same tensor (a network whose bf16 rounding is worse than usual gets a
    proportionally wider margin), and never below :data:`BF16_FLOOR`."""
    return max(2 * reference_error, BF16_FLOOR)


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
    """||a - b|| / ||b|| (||a|| when b = 0)."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def compare(mse, grads, ref_mse, ref_grads, bound, label: str) -> str | None:
    """The first tensor (MSE, then each gradient) whose relative error to the reference
    exceeds ``bound(name)``, as a one-line reason; None when all agree."""
    for name, value, ref in [("MSE", mse, ref_mse)] + [(n, grads.get(n), g) for n, g in ref_grads.items()]:
        if value is None:
            return f"{label}: no gradient for {name} (the reference has one)"
        err, limit = relative_error(value, ref), bound(name)
        if not (err <= limit):  # also catches NaN
            what = "MSE" if name == "MSE" else f"gradient of {name}"
            return f"{label} {what} differs from the float32 reference by {err:.2e} (relative; allowed {limit:.1e})"
    extra = sorted(set(grads) - set(ref_grads))
    return f"{label}: gradients for {', '.join(extra)} that the reference does not have" if extra else None


def check_fused(model, amp_dtype: torch.dtype | None, images: int = 2, seed: int = 0) -> str | None:
    """None if the fused decoder agrees with the reference on ``model``'s device, else why not.

    Forward (per-image MSE) and every parameter gradient, in float32 and, when ``amp_dtype``
    is given, in that dtype. Leaves the parameters, their gradients (cleared) and the random
    state as they were, and ``model.kernels`` as it found it.
    """
    device = model.slice_coords.device
    before = model.kernels
    inputs = random_inputs(model, images, seed)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            ref_mse, ref_grads = mse_and_grads(model, inputs, "torch")
            mse, grads = mse_and_grads(model, inputs, "fused")
            problem = compare(mse, grads, ref_mse, ref_grads, lambda name: FP32_TOLERANCE, "float32")
            if problem or amp_dtype is None:
                return problem
            low_ref_mse, low_ref = mse_and_grads(model, inputs, "torch", amp_dtype)
            low_mse, low = mse_and_grads(model, inputs, "fused", amp_dtype)
            ref_err = {"MSE": relative_error(low_ref_mse, ref_mse)}
            ref_err.update({n: relative_error(low_ref[n], g) for n, g in ref_grads.items() if n in low_ref})
            return compare(low_mse, low, ref_mse, ref_grads, lambda name: low_precision_bound(ref_err.get(name, 0.0)),
                           str(amp_dtype).replace("torch.", ""))
    except Exception as exc:  # a compile or launch failure is a reason to fall back, not to crash
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        model.zero_grad(set_to_none=True)
        model.kernels = before
