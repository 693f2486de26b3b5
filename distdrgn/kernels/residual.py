"""The decoder's hidden residual layer ``out = relu(h + h W^T + b)`` with fewer memory passes.

Forward: one cuBLAS product with the residual as its accumulator input
(``addmm(h, h, W^T)`` = ``h + h W^T``, rounded once), then bias + ReLU in place (one pass).
Backward: the ReLU mask and the bias gradient in one pass (``g = grad * (out > 0)``,
``db = sum_rows g``), then ``grad_h = addmm(g, g, W)`` (residual again folded in) and
``dW = g^T h``. The reference (``torch.relu(h + linear(h))`` under autocast) needs three
extra elementwise passes forward and three backward over the (B P, H) activations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distdrgn.kernels._common import BLOCK_N, items_per_program, launch_options

BLOCK_ROWS = 32  # rows per inner step of the elementwise kernels


@triton.jit
def _bias_relu_(x_ptr, bias_ptr, M, H, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = (rows < M)[:, None] & (cols < H)[None, :]
    offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=cols < H, other=0.0)
    tl.store(x_ptr + offs, tl.maximum(x + bias[None, :], 0.0).to(x_ptr.dtype.element_ty), mask=m)


@triton.jit
def _relu_grad_colsum(go_ptr, out_ptr, g_ptr, db_ptr, M, H, rows_per_prog,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """g = go * (out > 0) over this program's rows; db partial (groups, H) = column sums of g."""
    pid_n = tl.program_id(0)
    grp = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    start = grp * rows_per_prog
    for r0 in range(0, rows_per_prog, BLOCK_R):
        rows = start + r0 + tl.arange(0, BLOCK_R)
        m = ((rows < M) & (r0 + tl.arange(0, BLOCK_R) < rows_per_prog))[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
        go = tl.load(go_ptr + offs, mask=m, other=0.0).to(tl.float32)
        out = tl.load(out_ptr + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.where(out > 0, go, 0.0)
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=m)
        acc += tl.sum(g, axis=0)
    tl.store(db_ptr + grp * H + cols, acc, mask=col_ok)


def bias_relu_(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """In place: x (M, H) <- relu(x + bias); bias (H,) float32."""
    M, H = x.shape
    grid = (triton.cdiv(M, BLOCK_ROWS), triton.cdiv(H, BLOCK_N))
    _bias_relu_[grid](x, bias.float().contiguous(), M, H, BLOCK_R=BLOCK_ROWS, BLOCK_N=BLOCK_N, **launch_options("bias_relu"))
    return x


def relu_grad_colsum(grad_out: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad (M, H), relu output (M, H)) -> (g = grad * (out > 0) in out's dtype, sum_rows g (H,) float32)."""
    M, H = out.shape
    n_blocks = triton.cdiv(H, BLOCK_N)
    # row groups: about two waves of programs, each a whole number of BLOCK_ROWS rows
    per_prog = items_per_program(triton.cdiv(M, BLOCK_ROWS), n_blocks) * BLOCK_ROWS
    groups = triton.cdiv(M, per_prog)
    g = torch.empty_like(out)
    db = torch.empty((groups, H), device=out.device, dtype=torch.float32)
    _relu_grad_colsum[(n_blocks, groups)](grad_out.contiguous(), out, g, db, M, H, per_prog,
                                          BLOCK_R=BLOCK_ROWS, BLOCK_N=BLOCK_N, **launch_options("relu_grad_colsum"))
    return g, db.sum(0)


class FusedResidual(torch.autograd.Function):
    """h (M, H) in the activation dtype, W (H, H), b (H,) -> relu(h + h W^T + b) (M, H)."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        w = weight.to(h.dtype)
        out = bias_relu_(torch.addmm(h, h, w.t()), bias)
        ctx.save_for_backward(h, w, out)
        ctx.dtypes = (weight.dtype, bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, w, out = ctx.saved_tensors
        g, db = relu_grad_colsum(grad_out.to(out.dtype), out)
        grad_h = torch.addmm(g, g, w)  # g + g W: the residual's gradient folded into the product
        dw = g.t() @ h
        return grad_h, dw.to(ctx.dtypes[0]), db.to(ctx.dtypes[1])


def residual_layer(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``relu(h + h W^T + b)`` for h (M, H) (contiguous, activation dtype)."""
    return FusedResidual.apply(h, weight, bias)
