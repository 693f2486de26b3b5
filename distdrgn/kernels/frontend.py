"""Fused decoder front end: pose rotation, half-space canonicalisation, positional encoding
and the first layer, ``h0 = relu(sin(k F^T) W_s + cos(k F^T) W_c + zb)``.

The encoded features (``2 G`` values per point, G = 3 pe_dim) are never written to memory:
the forward kernel computes each ``BLOCK_G`` slice of them in registers and feeds it
straight to the tensor-core product; the backward kernel recomputes them for the weight
gradient. ``zb = z W_z^T + b`` (the latent's share of the first layer, one row per image)
is computed outside by PyTorch; its gradient is the per-image sum of the pre-activation
gradient, which the backward kernel produces as a by-product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distdrgn.kernels._common import (
    BLOCK_G,
    BLOCK_M,
    BLOCK_N,
    canonical_points,
    dot_dtype,
    full_fp32,
    items_per_program,
    launch_options,
    mma,
    tiles_per_image,
)


@triton.jit
def _frontend_fwd(lat_ptr, rot_ptr, freq_ptr, w_ptr, zb_ptr, out_ptr, P, H, G, tiles_per_img,
                  DOT: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_G: tl.constexpr):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tile // tiles_per_img
    rows = (tile % tiles_per_img) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < P
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    kx, ky, kz, _ = canonical_points(lat_ptr, rot_ptr, b, rows, row_ok)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        g_ok = gs < G
        fx = tl.load(freq_ptr + gs * 3 + 0, mask=g_ok, other=0.0)
        fy = tl.load(freq_ptr + gs * 3 + 1, mask=g_ok, other=0.0)
        fz = tl.load(freq_ptr + gs * 3 + 2, mask=g_ok, other=0.0)
        phase = kx[:, None] * fx[None, :] + ky[:, None] * fy[None, :] + kz[:, None] * fz[None, :]
        w_mask = g_ok[:, None] & col_ok[None, :]
        # w is (2G, H): rows [0, G) multiply sin, rows [G, 2G) cos; padded rows load 0
        w_sin = tl.load(w_ptr + gs[:, None] * H + cols[None, :], mask=w_mask, other=0.0).to(DOT)
        w_cos = tl.load(w_ptr + (G + gs)[:, None] * H + cols[None, :], mask=w_mask, other=0.0).to(DOT)
        acc = mma(tl.sin(phase).to(DOT), w_sin, acc, IEEE)
        acc = mma(tl.cos(phase).to(DOT), w_cos, acc, IEEE)

    zb = tl.load(zb_ptr + b * H + cols, mask=col_ok, other=0.0)
    h = tl.maximum(acc + zb[None, :], 0.0)
    offs = (b * P + rows).to(tl.int64)[:, None] * H + cols[None, :]
    tl.store(out_ptr + offs, h.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _frontend_bwd(lat_ptr, rot_ptr, freq_ptr, h_ptr, gh_ptr, dw_ptr, dzb_ptr, B, P, H, G, tiles_per_img,
                  imgs_per_prog, DOT: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """dW partials (groups, 2G, H) over this program's images; dzb (B, H) from the g-block 0 programs."""
    pid_g = tl.program_id(0)
    pid_n = tl.program_id(1)
    grp = tl.program_id(2)
    gs = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = gs < G
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    fx = tl.load(freq_ptr + gs * 3 + 0, mask=g_ok, other=0.0)
    fy = tl.load(freq_ptr + gs * 3 + 1, mask=g_ok, other=0.0)
    fz = tl.load(freq_ptr + gs * 3 + 2, mask=g_ok, other=0.0)

    acc_sin = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    acc_cos = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    for i in range(0, imgs_per_prog):
        b = grp * imgs_per_prog + i
        if b < B:
            zacc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for t in range(0, tiles_per_img):
                rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
                row_ok = rows < P
                kx, ky, kz, _ = canonical_points(lat_ptr, rot_ptr, b, rows, row_ok)
                phase = kx[:, None] * fx[None, :] + ky[:, None] * fy[None, :] + kz[:, None] * fz[None, :]
                offs = (b * P + rows).to(tl.int64)[:, None] * H + cols[None, :]
                m = row_ok[:, None] & col_ok[None, :]
                h = tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32)
                gh = tl.load(gh_ptr + offs, mask=m, other=0.0).to(tl.float32)
                g = tl.where(h > 0, gh, 0.0)  # through the ReLU; padded rows are 0
                gd = g.to(DOT)
                acc_sin = mma(tl.trans(tl.sin(phase).to(DOT)), gd, acc_sin, IEEE)
                acc_cos = mma(tl.trans(tl.cos(phase).to(DOT)), gd, acc_cos, IEEE)
                zacc += tl.sum(g, axis=0)
            if pid_g == 0:
                tl.store(dzb_ptr + b * H + cols, zacc, mask=col_ok)

    base = dw_ptr + grp.to(tl.int64) * (2 * G * H)
    m = g_ok[:, None] & col_ok[None, :]
    tl.store(base + gs[:, None] * H + cols[None, :], acc_sin, mask=m)
    tl.store(base + (G + gs)[:, None] * H + cols[None, :], acc_cos, mask=m)


class FusedFrontEnd(torch.autograd.Function):
    """(lattice (P, 3), rots (B, 3, 3), freqs (G, 3), w_pe (H, 2G), zb (B, H)) -> h0 (B, P, H).

    ``w_pe`` is the first layer's weight over the [sin, cos] features (any float dtype; the
    product runs in ``act_dtype``), ``zb`` the float32 latent term. Gradients flow to w_pe
    and zb (the lattice, poses and frequencies are constants).
    """

    @staticmethod
    def forward(ctx, lattice, rots, freqs, w_pe, zb, act_dtype):
        B, P, H, G = rots.shape[0], lattice.shape[0], w_pe.shape[0], freqs.shape[0]
        lattice, rots, freqs = (t.float().contiguous() for t in (lattice, rots, freqs))
        zb = zb.float().contiguous()
        w_t = w_pe.t().to(act_dtype).contiguous()  # (2G, H)
        out = torch.empty((B, P, H), device=rots.device, dtype=act_dtype)
        tpi = tiles_per_image(P)
        grid = (B * tpi, triton.cdiv(H, BLOCK_N))
        _frontend_fwd[grid](lattice, rots, freqs, w_t, zb, out, P, H, G, tpi, DOT=dot_dtype(act_dtype),
                            IEEE=full_fp32(act_dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_G=BLOCK_G, **launch_options("frontend_fwd"))
        ctx.save_for_backward(lattice, rots, freqs, out)
        ctx.w_dtype = w_pe.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        lattice, rots, freqs, out = ctx.saved_tensors
        B, P, H = out.shape
        G = freqs.shape[0]
        grad_out = grad_out.to(out.dtype).contiguous()
        tpi = tiles_per_image(P)
        g_blocks, n_blocks = triton.cdiv(G, BLOCK_G), triton.cdiv(H, BLOCK_N)
        per_prog = items_per_program(B, g_blocks * n_blocks)
        groups = triton.cdiv(B, per_prog)
        dw = torch.empty((groups, 2 * G, H), device=out.device, dtype=torch.float32)
        dzb = torch.empty((B, H), device=out.device, dtype=torch.float32)
        _frontend_bwd[(g_blocks, n_blocks, groups)](
            lattice, rots, freqs, out, grad_out, dw, dzb, B, P, H, G, tpi, per_prog, DOT=dot_dtype(out.dtype),
            IEEE=full_fp32(out.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_G=BLOCK_G, **launch_options("frontend_bwd"))
        dw_pe = dw.sum(0).t().to(ctx.w_dtype)  # (H, 2G)
        return None, None, None, dw_pe, dzb, None


def frontend(lattice: torch.Tensor, rots: torch.Tensor, freqs: torch.Tensor, w_pe: torch.Tensor,
             zb: torch.Tensor, act_dtype: torch.dtype) -> torch.Tensor:
    """First hidden activations (B, P, H) of the decoder at the rotated, canonical lattice points."""
    return FusedFrontEnd.apply(lattice, rots, freqs, w_pe, zb, act_dtype)
