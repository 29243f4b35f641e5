"""Triton passes of the fused landing optimizer steps (imports triton; load lazily).

A step on a batch (B, n, p), p ≤ :data:`MAX_P` (one column tile holds a whole row):

* pass A — :func:`stiefel_opt.kernels._core.gram`: XᵀX and GᵀX;
* pass B — :func:`moments`: reads G, X and the state once, forms the tangent term
  T = G·(½XᵀX) + X·(−½GᵀX) row tile by row tile, updates the state in place (Adam moments, or
  SGD momentum), forms the direction D and accumulates the p×p Grams DᵀX and DᵀD;
* p×p in torch: distance, field coefficients, ‖Λ‖_F from the Grams, per-matrix safe step;
* pass C — :func:`land`: reads X and the state once (G too for Nesterov), re-forms D and
  writes X·C_X + D·C_D.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import MAX_FUSED_P as MAX_P  # noqa: F401  (the wrappers fall back to torch above it)
from ._core import _splits, block_n

ADAM = 0
SGD = 1


@triton.jit
def _tile_ptrs(base, bid, s_b, s_n, s_p, rows, cols):
    return base + bid * s_b + rows[:, None] * s_n + cols[None, :] * s_p


@triton.jit
def _tangent(g_ptr, x_ptr, c1, c2, bid, rows, cols, mask,
             s_gb, s_gn, s_gp, s_xb, s_xn, s_xp):
    """Row tile of T = G·C1 + X·C2, and the X tile (fp32)."""
    g = tl.load(_tile_ptrs(g_ptr, bid, s_gb, s_gn, s_gp, rows, cols), mask=mask, other=0.0)
    x = tl.load(_tile_ptrs(x_ptr, bid, s_xb, s_xn, s_xp, rows, cols), mask=mask, other=0.0)
    x = x.to(tl.float32)
    t = tl.dot(g.to(tl.float32), c1, input_precision="ieee")
    t += tl.dot(x, c2, input_precision="ieee")
    return t, x


@triton.jit
def _adam_dir(m, v, bc1, bc2_sqrt, eps):
    return (m / (tl.sqrt(v) / bc2_sqrt + eps)) / bc1


@triton.jit
def _moments_kernel(
    g_ptr, x_ptr, c1_ptr, c2_ptr, m_ptr, v_ptr, vmax_ptr, dx_ptr, dd_ptr,
    n, p, rows_per_split,
    s_gb, s_gn, s_gp, s_xb, s_xn, s_xp, s_mb, s_mn, s_mp, s_vb, s_vn, s_vp, s_wb, s_wn, s_wp,
    s_ob, s_os,
    beta1, beta2, bc1, bc2_sqrt, eps, momentum, dampening,
    KIND: tl.constexpr, AMSGRAD: tl.constexpr, FIRST: tl.constexpr, STORE: tl.constexpr,
    NESTEROV: tl.constexpr,
    BN: tl.constexpr, BP: tl.constexpr,
):
    bid = tl.program_id(0).to(tl.int64)
    sid = tl.program_id(1)
    cols = tl.arange(0, BP)
    mc = cols < p
    c_off = bid * p * p + cols[:, None] * p + cols[None, :]
    c_mask = mc[:, None] & mc[None, :]
    c1 = tl.load(c1_ptr + c_off, mask=c_mask, other=0.0)
    c2 = tl.load(c2_ptr + c_off, mask=c_mask, other=0.0)
    acc_dx = tl.zeros((BP, BP), dtype=tl.float32)
    acc_dd = tl.zeros((BP, BP), dtype=tl.float32)
    row0 = sid * rows_per_split
    row_end = tl.minimum(row0 + rows_per_split, n)
    for r in range(row0, row_end, BN):
        rows = r + tl.arange(0, BN)
        mask = (rows < row_end)[:, None] & mc[None, :]
        t, x = _tangent(g_ptr, x_ptr, c1, c2, bid, rows, cols, mask,
                        s_gb, s_gn, s_gp, s_xb, s_xn, s_xp)
        m_ptrs = _tile_ptrs(m_ptr, bid, s_mb, s_mn, s_mp, rows, cols)
        if KIND == 0:
            v_ptrs = _tile_ptrs(v_ptr, bid, s_vb, s_vn, s_vp, rows, cols)
            m = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32)
            m = m + (1.0 - beta1) * (t - m)
            v = beta2 * v + (1.0 - beta2) * (t * t)
            tl.store(m_ptrs, m.to(m_ptr.dtype.element_ty), mask=mask)
            tl.store(v_ptrs, v.to(v_ptr.dtype.element_ty), mask=mask)
            if AMSGRAD:
                w_ptrs = _tile_ptrs(vmax_ptr, bid, s_wb, s_wn, s_wp, rows, cols)
                v = tl.maximum(tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32), v)
                tl.store(w_ptrs, v.to(vmax_ptr.dtype.element_ty), mask=mask)
            d = _adam_dir(m, v, bc1, bc2_sqrt, eps)
        else:
            if FIRST:
                buf = t
            else:
                buf = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
                buf = buf * momentum + (1.0 - dampening) * t
            if STORE:
                tl.store(m_ptrs, buf.to(m_ptr.dtype.element_ty), mask=mask)
            if NESTEROV:
                d = t + momentum * buf
            else:
                d = buf
        d = tl.where(mask, d, 0.0)
        acc_dx += tl.dot(tl.trans(d), x, input_precision="ieee")
        acc_dd += tl.dot(tl.trans(d), d, input_precision="ieee")
    out_off = bid * s_ob + sid * s_os + cols[:, None] * p + cols[None, :]
    tl.store(dx_ptr + out_off, acc_dx, mask=c_mask)
    tl.store(dd_ptr + out_off, acc_dd, mask=c_mask)


@triton.jit
def _land_kernel(
    g_ptr, x_ptr, c1_ptr, c2_ptr, m_ptr, v_ptr, cx_ptr, cd_ptr, out_ptr,
    n, p,
    s_gb, s_gn, s_gp, s_xb, s_xn, s_xp, s_mb, s_mn, s_mp, s_vb, s_vn, s_vp, s_ob, s_on, s_op,
    bc1, bc2_sqrt, eps, momentum,
    KIND: tl.constexpr, NESTEROV: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
):
    bid = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    cols = tl.arange(0, BP)
    mc = cols < p
    mask = (rows < n)[:, None] & mc[None, :]
    c_off = bid * p * p + cols[:, None] * p + cols[None, :]
    c_mask = mc[:, None] & mc[None, :]
    m = tl.load(_tile_ptrs(m_ptr, bid, s_mb, s_mn, s_mp, rows, cols), mask=mask, other=0.0)
    m = m.to(tl.float32)
    if KIND == 0:
        v = tl.load(_tile_ptrs(v_ptr, bid, s_vb, s_vn, s_vp, rows, cols), mask=mask, other=0.0)
        d = _adam_dir(m, v.to(tl.float32), bc1, bc2_sqrt, eps)
        x = tl.load(_tile_ptrs(x_ptr, bid, s_xb, s_xn, s_xp, rows, cols), mask=mask, other=0.0)
        x = x.to(tl.float32)
    else:
        if NESTEROV:
            c1 = tl.load(c1_ptr + c_off, mask=c_mask, other=0.0)
            c2 = tl.load(c2_ptr + c_off, mask=c_mask, other=0.0)
            t, x = _tangent(g_ptr, x_ptr, c1, c2, bid, rows, cols, mask,
                            s_gb, s_gn, s_gp, s_xb, s_xn, s_xp)
            d = t + momentum * m
        else:
            d = m
            x = tl.load(_tile_ptrs(x_ptr, bid, s_xb, s_xn, s_xp, rows, cols), mask=mask, other=0.0)
            x = x.to(tl.float32)
    d = tl.where(mask, d, 0.0)
    cx = tl.load(cx_ptr + c_off, mask=c_mask, other=0.0)
    cd = tl.load(cd_ptr + c_off, mask=c_mask, other=0.0)
    out = tl.dot(x, cx, input_precision="ieee") + tl.dot(d, cd, input_precision="ieee")
    tl.store(_tile_ptrs(out_ptr, bid, s_ob, s_on, s_op, rows, cols),
             out.to(out_ptr.dtype.element_ty), mask=mask)


def block_p(p: int) -> int:
    """The one column tile of a step kernel: next power of two ≥ max(p, 16)."""
    return max(16, triton.next_power_of_2(p))


def moments(kind, g, x, c1, c2, m, v=None, vmax=None, *, beta1=0.0, beta2=0.0, bc1=1.0,
            bc2_sqrt=1.0, eps=0.0, momentum=0.0, dampening=0.0, first=False, store=True,
            nesterov=False, bn=None, split=None):
    """Pass B: update the state in place (m, v, vmax for ADAM; the momentum buffer m for SGD,
    untouched when ``store`` is False and ``first`` is True: then D = T) and return the fp32
    Grams (DᵀX, DᵀD) of the direction D, each (B, p, p)."""
    batch, n, p = x.shape
    bp = block_p(p)
    bn = bn or (32 if bp > 64 else block_n(n))
    split = _splits(batch, n, bn, 1, split)
    rows_per_split = triton.cdiv(triton.cdiv(n, bn), split) * bn
    split = triton.cdiv(n, rows_per_split)
    dx = torch.empty((batch, split, p, p), dtype=torch.float32, device=x.device)
    dd = torch.empty_like(dx)
    v_ = m if v is None else v
    w_ = v_ if vmax is None else vmax
    _moments_kernel[(batch, split)](
        g, x, c1.contiguous(), c2.contiguous(), m, v_, w_, dx, dd, n, p, rows_per_split,
        *g.stride(), *x.stride(), *m.stride(), *v_.stride(), *w_.stride(), dx.stride(0), dx.stride(1),
        beta1, beta2, bc1, bc2_sqrt, eps, momentum, dampening,
        KIND=kind, AMSGRAD=vmax is not None, FIRST=first, STORE=store, NESTEROV=nesterov,
        BN=bn, BP=bp,
    )
    return dx.sum(1), dd.sum(1)


def land(kind, g, x, c1, c2, m, v, c_x, c_d, out, *, bc1=1.0, bc2_sqrt=1.0, eps=0.0,
         momentum=0.0, nesterov=False, bn=None):
    """Pass C: out = X·C_X + D·C_D with D re-formed from the updated state (and, for Nesterov
    momentum, from G and X through T = G·C1 + X·C2). ``v`` is the Adam second moment in use
    (the running maximum with amsgrad)."""
    batch, n, p = x.shape
    bp = block_p(p)
    bn = bn or (32 if bp > 64 else block_n(n))
    v_ = m if v is None else v
    _land_kernel[(batch, triton.cdiv(n, bn))](
        g, x, c1.contiguous(), c2.contiguous(), m, v_, c_x.contiguous(), c_d.contiguous(), out, n, p,
        *g.stride(), *x.stride(), *m.stride(), *v_.stride(), *out.stride(),
        bc1, bc2_sqrt, eps, momentum,
        KIND=kind, NESTEROV=nesterov, BN=bn, BP=bp,
    )
    return out
