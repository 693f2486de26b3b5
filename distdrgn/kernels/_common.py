"""What the kernels share: dtype mapping, launch sizes and the rotated, canonical lattice point.

Points are processed in tiles of ``BLOCK_M`` points of one image: image ``b`` owns tiles
``b * tiles_per_image ...``, the last one padded past the image's ``P`` points. So a tile
never spans two images: its pose, latent term and loss sum are per tile, and per-image
reductions (the latent gradient, the squared error) need no atomics and are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distdrgn.kernels import interpreting

BLOCK_M = 64  # points per tile
BLOCK_N = 128  # hidden units per program (front end, elementwise kernels)
BLOCK_G = 32  # encoded frequencies per inner step (sin and cos: 2 x 32 of the first layer's K)
BACKEND_BLOCK_N = 64  # hidden units per step of the output layer (memory-bound: a smaller tile, no spills)

# Warps and pipeline stages per kernel. Chosen by compiling for sm_90 without a GPU
# (``python -m distdrgn.kernels.aot``, docs/kernels.md): the largest tiles
# that leave no register spills. Speed on a GPU is still unmeasured.
LAUNCH = {
    "frontend_fwd": {"num_warps": 4, "num_stages": 3},
    "frontend_bwd": {"num_warps": 8, "num_stages": 3},
    "bias_relu": {"num_warps": 4, "num_stages": 3},
    "relu_grad_colsum": {"num_warps": 4, "num_stages": 3},
    "backend_fwd": {"num_warps": 8, "num_stages": 3},
    "backend_bwd": {"num_warps": 8, "num_stages": 3},
}

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_dtype(act_dtype: torch.dtype):
    """The Triton dtype of tensor-core operands for activations of ``act_dtype``.

    Triton's interpreter computes ``tl.dot`` of bfloat16 on the raw bit patterns (triton
    issue #11584), so interpreted kernels multiply in float32; conversions are exact there.
    """
    if interpreting():
        return tl.float32
    return _TL_DTYPES[act_dtype]


def full_fp32(act_dtype: torch.dtype) -> bool:
    """float32 activations get IEEE float32 products (not TF32), like torch's default matmul."""
    return act_dtype == torch.float32


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b on the tensor cores; IEEE float32 when asked (Triton's default is TF32)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


def tiles_per_image(P: int) -> int:
    return triton.cdiv(P, BLOCK_M)


def items_per_program(n: int, other_programs: int, target_programs: int = 264) -> int:
    """How many of ``n`` items (images, row blocks) each program of a reduction kernel walks,
    so that ``other_programs`` x groups fills about two waves of an H100 (132 SMs) without a
    large partial-sum buffer."""
    groups = max(1, min(n, triton.cdiv(target_programs, max(other_programs, 1))))
    return triton.cdiv(n, groups)


def launch_options(kernel: str) -> dict:
    """num_warps / num_stages of ``kernel`` (the interpreter takes none)."""
    return {} if interpreting() else dict(LAUNCH[kernel])


@triton.jit
def canonical_points(lat_ptr, rot_ptr, b, rows, row_ok):
    """Lattice points ``rows`` of image ``b`` rotated by its pose and mapped to the half-space.

    ``k_i = sum_j lat[n, j] R[b, j, i]`` (coords @ rots, docs/conventions.md), then ``k -> -k`` when
    k_z > 0, or k_z = 0 and k_y > 0, or k_z = k_y = 0 and k_x > 0 (model.canonicalize).
    Returns (kx, ky, kz, flip), each (BLOCK_M,).
    """
    lx = tl.load(lat_ptr + rows * 3 + 0, mask=row_ok, other=0.0)
    ly = tl.load(lat_ptr + rows * 3 + 1, mask=row_ok, other=0.0)
    lz = tl.load(lat_ptr + rows * 3 + 2, mask=row_ok, other=0.0)
    r = rot_ptr + b * 9
    kx = lx * tl.load(r + 0) + ly * tl.load(r + 3) + lz * tl.load(r + 6)
    ky = lx * tl.load(r + 1) + ly * tl.load(r + 4) + lz * tl.load(r + 7)
    kz = lx * tl.load(r + 2) + ly * tl.load(r + 5) + lz * tl.load(r + 8)
    flip = (kz > 0) | ((kz == 0) & ((ky > 0) | ((ky == 0) & (kx > 0))))
    sign = tl.where(flip, -1.0, 1.0)
    return kx * sign, ky * sign, kz * sign, flip
