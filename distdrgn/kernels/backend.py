"""Fused decoder back end: the output layer, the Hermitian fill, the CTF and the squared error.

For a half-lattice point ``n`` of image ``b`` with last hidden activations ``h`` (H,), the
output layer gives ``(re, im) = W_out h + b_out`` at the canonical point; ``im`` changes
sign where the point was flipped (``F(-k) = conj F(k)``). The Hartley values are
``re - im`` at k (position n of the [half, mirror] order) and ``re + im`` at -k (position
n_half + n). Each is multiplied by the CTF and compared with the observation:

    sse_b = sum_n (c_n (re - im) - y_n)^2 + (c_n' (re + im) - y_n')^2

The forward kernel returns ``sse`` per image and keeps ``(re, im)`` per point (8 bytes,
against 2 H bytes of activations) for the backward kernel, which writes ``dL/dh`` and the
output layer's weight and bias gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distdrgn.kernels._common import (
    BACKEND_BLOCK_N,
    BLOCK_M,
    canonical_points,
    items_per_program,
    launch_options,
    tiles_per_image,
)


@triton.jit
def _residuals(re, im, y_ptr, ctf_ptr, b, rows, row_ok, flip, P, HAS_CTF: tl.constexpr):
    """Output layer (re, im) at the canonical points -> residuals at k and -k, and the CTF there."""
    im = tl.where(flip, -im, im)
    n_masked = 2 * P
    y_pos = tl.load(y_ptr + b.to(tl.int64) * n_masked + rows, mask=row_ok, other=0.0)
    y_neg = tl.load(y_ptr + b.to(tl.int64) * n_masked + P + rows, mask=row_ok, other=0.0)
    if HAS_CTF:
        c_pos = tl.load(ctf_ptr + b.to(tl.int64) * n_masked + rows, mask=row_ok, other=0.0)
        c_neg = tl.load(ctf_ptr + b.to(tl.int64) * n_masked + P + rows, mask=row_ok, other=0.0)
    else:
        c_pos = tl.where(row_ok, 1.0, 0.0)
        c_neg = c_pos
    r_pos = c_pos * (re - im) - y_pos
    r_neg = c_neg * (re + im) - y_neg
    return r_pos, r_neg, c_pos, c_neg


@triton.jit
def _backend_fwd(h_ptr, w_ptr, bias_ptr, lat_ptr, rot_ptr, y_ptr, ctf_ptr, o_ptr, sse_ptr, P, H, tiles_per_img,
                 HAS_CTF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """o (B P, 2) = h W_out^T (pre-bias); sse partials (B, tiles_per_img)."""
    tile = tl.program_id(0)
    b = tile // tiles_per_img
    rows = (tile % tiles_per_img) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < P
    acc_re = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_im = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_offs = (b * P + rows).to(tl.int64) * H
    for c0 in range(0, H, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < H
        h = tl.load(h_ptr + row_offs[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        w_re = tl.load(w_ptr + cols, mask=col_ok, other=0.0)
        w_im = tl.load(w_ptr + H + cols, mask=col_ok, other=0.0)
        acc_re += tl.sum(h * w_re[None, :], axis=1)
        acc_im += tl.sum(h * w_im[None, :], axis=1)
    o_offs = (b * P + rows).to(tl.int64) * 2
    tl.store(o_ptr + o_offs, acc_re, mask=row_ok)
    tl.store(o_ptr + o_offs + 1, acc_im, mask=row_ok)
    _, _, _, flip = canonical_points(lat_ptr, rot_ptr, b, rows, row_ok)
    re = acc_re + tl.load(bias_ptr)
    im = acc_im + tl.load(bias_ptr + 1)
    r_pos, r_neg, _, _ = _residuals(re, im, y_ptr, ctf_ptr, b, rows, row_ok, flip, P, HAS_CTF)
    sse = tl.sum(tl.where(row_ok, r_pos * r_pos + r_neg * r_neg, 0.0), axis=0)
    tl.store(sse_ptr + tile, sse)


@triton.jit
def _backend_bwd(h_ptr, w_ptr, bias_ptr, lat_ptr, rot_ptr, y_ptr, ctf_ptr, o_ptr, gsse_ptr, gh_ptr, dw_ptr, dbias_ptr,
                 B, P, H, tiles_per_img, imgs_per_prog,
                 HAS_CTF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """grad_h (B P, H); dW partials (groups, 2, H); db partials (groups, 2) from the column-block 0 programs."""
    pid_n = tl.program_id(0)
    grp = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    w_re = tl.load(w_ptr + cols, mask=col_ok, other=0.0)
    w_im = tl.load(w_ptr + H + cols, mask=col_ok, other=0.0)
    b0 = tl.load(bias_ptr)
    b1 = tl.load(bias_ptr + 1)
    dw_re = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dw_im = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_re = tl.zeros((BLOCK_M,), dtype=tl.float32)
    db_im = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for i in range(0, imgs_per_prog):
        b = grp * imgs_per_prog + i
        if b < B:
            gs = tl.load(gsse_ptr + b)
            for t in range(0, tiles_per_img):
                rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
                row_ok = rows < P
                _, _, _, flip = canonical_points(lat_ptr, rot_ptr, b, rows, row_ok)
                o_offs = (b * P + rows).to(tl.int64) * 2
                re = tl.load(o_ptr + o_offs, mask=row_ok, other=0.0) + b0
                im = tl.load(o_ptr + o_offs + 1, mask=row_ok, other=0.0) + b1
                r_pos, r_neg, c_pos, c_neg = _residuals(re, im, y_ptr, ctf_ptr, b, rows, row_ok, flip, P, HAS_CTF)
                d_pos = 2.0 * gs * r_pos * c_pos  # d sse / d (re - im)
                d_neg = 2.0 * gs * r_neg * c_neg  # d sse / d (re + im)
                d_re = tl.where(row_ok, d_pos + d_neg, 0.0)
                d_im = tl.where(row_ok, d_neg - d_pos, 0.0)
                d_im = tl.where(flip, -d_im, d_im)  # through the conjugation
                db_re += d_re
                db_im += d_im
                offs = (b * P + rows).to(tl.int64)[:, None] * H + cols[None, :]
                m = row_ok[:, None] & col_ok[None, :]
                gh = d_re[:, None] * w_re[None, :] + d_im[:, None] * w_im[None, :]
                tl.store(gh_ptr + offs, gh.to(gh_ptr.dtype.element_ty), mask=m)
                h = tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32)
                dw_re += tl.sum(d_re[:, None] * h, axis=0)
                dw_im += tl.sum(d_im[:, None] * h, axis=0)
    base = dw_ptr + grp * 2 * H
    tl.store(base + cols, dw_re, mask=col_ok)
    tl.store(base + H + cols, dw_im, mask=col_ok)
    if pid_n == 0:
        tl.store(dbias_ptr + grp * 2, tl.sum(db_re, axis=0))
        tl.store(dbias_ptr + grp * 2 + 1, tl.sum(db_im, axis=0))


class FusedBackEnd(torch.autograd.Function):
    """(h (B, P, H), w_out (2, H), b_out (2,), lattice (P, 3), rots (B, 3, 3), y (B, 2P), ctf (B, 2P) or None)
    -> per-image sum of squared errors (B,) float32. Gradients flow to h, w_out and b_out."""

    @staticmethod
    def forward(ctx, h, w_out, b_out, lattice, rots, y, ctf):
        B, P, H = h.shape
        h = h.contiguous()
        w = w_out.float().contiguous()
        bias = b_out.float().contiguous()
        lattice, rots, y = lattice.float().contiguous(), rots.float().contiguous(), y.float().contiguous()
        ctf_arg = ctf.float().contiguous() if ctf is not None else y  # unused when HAS_CTF is False
        tpi = tiles_per_image(P)
        o = torch.empty((B * P, 2), device=h.device, dtype=torch.float32)
        sse = torch.empty((B, tpi), device=h.device, dtype=torch.float32)
        _backend_fwd[(B * tpi,)](h, w, bias, lattice, rots, y, ctf_arg, o, sse, P, H, tpi, HAS_CTF=ctf is not None,
                                 BLOCK_M=BLOCK_M, BLOCK_N=BACKEND_BLOCK_N, **launch_options("backend_fwd"))
        ctx.save_for_backward(h, w, bias, lattice, rots, y, ctf_arg, o)
        ctx.has_ctf = ctf is not None
        ctx.dtypes = (w_out.dtype, b_out.dtype)
        return sse.sum(1)

    @staticmethod
    def backward(ctx, grad_sse):
        h, w, bias, lattice, rots, y, ctf_arg, o = ctx.saved_tensors
        B, P, H = h.shape
        tpi = tiles_per_image(P)
        n_blocks = triton.cdiv(H, BACKEND_BLOCK_N)
        per_prog = items_per_program(B, n_blocks)
        groups = triton.cdiv(B, per_prog)
        grad_h = torch.empty_like(h)
        dw = torch.empty((groups, 2, H), device=h.device, dtype=torch.float32)
        db = torch.empty((groups, 2), device=h.device, dtype=torch.float32)
        _backend_bwd[(n_blocks, groups)](h, w, bias, lattice, rots, y, ctf_arg, o, grad_sse.float().contiguous(),
                                         grad_h, dw, db, B, P, H, tpi, per_prog, HAS_CTF=ctx.has_ctf,
                                         BLOCK_M=BLOCK_M, BLOCK_N=BACKEND_BLOCK_N, **launch_options("backend_bwd"))
        return grad_h, dw.sum(0).to(ctx.dtypes[0]), db.sum(0).to(ctx.dtypes[1]), None, None, None, None


def backend_sse(h: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor, lattice: torch.Tensor, rots: torch.Tensor,
                y: torch.Tensor, ctf: torch.Tensor | None) -> torch.Tensor:
    """Per-image sum over the masked lattice of (ctf * predicted Hartley - y)^2, (B,) float32."""
    return FusedBackEnd.apply(h, w_out, b_out, lattice, rots, y, ctf)
