"""Fused Triton kernels for the decoder, and the choice between them and plain PyTorch.

The decoder evaluates a ``1024 x 3`` MLP at every half-lattice point of every image, so its
cost is a few large matrix products plus a lot of memory traffic around them: the
positional-encoding features, bias, residual and ReLU passes, the output layer and the
loss. The kernels remove that traffic (docs/conventions.md, "Performance model"):

- :mod:`.frontend`: rotate the lattice by the pose, canonicalise to the half-space, encode
  (sin/cos of the frequency matrix) and feed the first layer, without writing the encoded
  features to memory; backward recomputes them.
- :mod:`.residual`: the hidden ``relu(h + h W^T + b)`` layers: cuBLAS products (bf16 tensor
  cores) with the residual folded into the product and bias + ReLU (forward) and the ReLU
  mask + bias gradient (backward) in one pass each.
- :mod:`.backend`: the output layer, the Hermitian fill of the mirror half, the CTF and the
  squared error in one pass; backward emits the gradient of the last hidden activations.

``model.kernels`` picks them: ``torch`` is the reference path, ``fused`` these kernels,
``compile`` the reference path through ``torch.compile`` (inductor: Triton on CUDA, C++ on
the CPU; :func:`distdrgn.model.compiled_slice_mse`), ``auto`` the kernels when they can run
(a CUDA device, Triton importable, the Fourier domain with a sinusoidal encoding) and the
reference otherwise. Under ``TRITON_INTERPRET=1``
the kernels also run on CPU tensors (slowly), which is how CI tests them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: distdrgn.config imports KERNEL_CHOICES without loading torch
    import torch

KERNEL_CHOICES = ("auto", "fused", "compile", "torch")


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_import_error() -> str | None:
    """None when Triton imports, else why not (one line)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


def fused_unsupported_reason(device: torch.device, pe_type: str, domain: str) -> str | None:
    """Why the fused kernels cannot run this model on ``device`` (None when they can)."""
    if domain != "fourier":
        return f"the fused decoder implements model.domain=fourier, not {domain}"
    if pe_type == "none":
        return "the fused decoder needs a sinusoidal positional encoding (model.pe_type is none)"
    err = triton_import_error()
    if err:
        return err
    if device.type != "cuda" and not interpreting():
        return f"Triton kernels need a CUDA device (this run is on {device.type}; TRITON_INTERPRET=1 runs them on CPU, slowly)"
    return None


def compile_unsupported_reason(device: torch.device) -> str | None:
    """Why ``torch.compile``'s inductor cannot generate code for ``device`` (None when it can)."""
    if device.type == "cuda":
        err = triton_import_error()
        return f"inductor generates Triton code on CUDA: {err}" if err else None
    if device.type == "cpu":
        import shutil

        if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
            return "inductor compiles C++ on the CPU and no C++ compiler (g++, c++, clang++) is on the PATH"
        return None
    return f"torch.compile is not supported here on {device.type}"


def resolve_kernels(choice: str, device: torch.device, pe_type: str, domain: str) -> tuple[str, str]:
    """``model.kernels`` -> ("fused" | "compile" | "torch", the reason, for the log).

    ``fused`` or ``compile`` that cannot run raise ValueError with the reason; ``auto`` falls
    back to torch. Under the interpreter, ``auto`` stays on torch: interpreted kernels are for tests.
    """
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"model.kernels must be one of {', '.join(KERNEL_CHOICES)}, got {choice!r}")
    if choice == "torch":
        return "torch", "model.kernels=torch"
    if choice == "compile":
        reason = compile_unsupported_reason(device)
        if reason:
            raise ValueError(f"model.kernels=compile: {reason}")
        return "compile", "model.kernels=compile (torch.compile of the reference decoder)"
    reason = fused_unsupported_reason(device, pe_type, domain)
    if choice == "fused":
        if reason:
            raise ValueError(f"model.kernels=fused: {reason}")
        return "fused", "model.kernels=fused"
    if reason is None and device.type == "cuda":
        return "fused", "auto: CUDA device and Triton present"
    return "torch", f"auto: {reason or 'interpreted kernels are for tests only'}"


def choose_kernels(model, choice: str, device: torch.device, amp_dtype: torch.dtype | None) -> tuple[str, str, str | None]:
    """``model.kernels`` for ``model`` on ``device`` -> (kernels, why, warning or None).

    Fused kernels must first pass their start-up check on the training device
    (:func:`distdrgn.kernels.check.check_fused`): ``fused`` refuses to train when they fail
    it, ``auto`` falls back to the reference path with a warning.
    """
    from distdrgn.errors import DistdrgnError
    from distdrgn.kernels.check import check_fused

    try:
        kernels, why = resolve_kernels(choice, device, model.info.pe_type, model.info.domain)
    except ValueError as exc:
        raise DistdrgnError(str(exc)) from None
    if kernels == "fused":
        problem = check_fused(model, amp_dtype)
        if problem and choice == "fused":
            raise DistdrgnError(f"model.kernels=fused: the fused decoder failed its start-up check on {device}: "
                                f"{problem} (model.kernels=torch trains with the reference path)")
        if problem:
            return ("torch", f"auto: fused kernels failed their start-up check: {problem}",
                    f"the fused decoder failed its start-up check on {device} ({problem}); training with the "
                    "PyTorch path")
    return kernels, why, None
