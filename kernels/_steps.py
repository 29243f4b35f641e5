"""Triton passes of the fused optimizer steps (imports triton; load lazily).

A step on a batch (B, n, p), p ≤ :data:`MAX_P` (one column tile holds a whole row):

* pass A — :func:`stiefel_opt.kernels._core.gram`: XᵀX and GᵀX;
* pass B — :func:`pass_b`: reads G, X and the state once, forms the search term
  T = G·C1 + X·C2 row tile by row tile (the landing tangent term, C1 = ½XᵀX, C2 = −½GᵀX; or the
  Riemannian gradient, C1 = I), updates the state in place (Adam moments or SGD momentum), forms
  the direction D and accumulates the p×p Grams that the step's p×p plan needs (see ``KIND``);
* p×p in torch (``stiefel_opt.kernels``): safe step or polar coefficients, transport;
* pass C — :func:`pass_c`: reads X and the state once (G too where T is needed), re-forms the
  tiles of pass B and writes X⁺ (and, for the Riemannian steps, the transported first moment).

``KIND`` (what pass B accumulates, what pass C writes; M is the first moment or momentum buffer):

* ``LANDING_ADAM``: Grams DᵀX, DᵀD; X⁺ = X·K0 + D·K1.
* ``LANDING_SGD``: U = D − T, Z = T + U·C1 (so Λ = Z + X·(λ(XᵀX − I) − ½UᵀX)); Grams UᵀX, ZᵀX,
  ZᵀZ; X⁺ = X·K0 + Z·K1.
* ``RIEMANNIAN_SGD``: Y = X − lr·D; Grams YᵀY, YᵀM; X⁺ = Y·K0, M ← M − Y·K1.
* ``RIEMANNIAN_ADAM``: Grams DᵀX, DᵀD, MᵀX, MᵀD; X⁺ = X·K0 + D·K1, M ← M + X·K2 + D·K3.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import MAX_FUSED_P as MAX_P  # noqa: F401  (the wrappers fall back to torch above it)
from ._core import _splits, block_n

LANDING_ADAM = 0
LANDING_SGD = 1
RIEMANNIAN_SGD = 2
RIEMANNIAN_ADAM = 3
N_GRAMS = {LANDING_ADAM: 2, LANDING_SGD: 3, RIEMANNIAN_SGD: 2, RIEMANNIAN_ADAM: 4}
"""Number of p×p Grams pass B returns for each kind."""


@triton.jit
def _tile_ptrs(base, bid, s_b, s_n, s_p, rows, cols):
    return base + bid * s_b + rows[:, None] * s_n + cols[None, :] * s_p


@triton.jit
def _load(base, bid, s_b, s_n, s_p, rows, cols, mask):
    return tl.load(_tile_ptrs(base, bid, s_b, s_n, s_p, rows, cols), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(base, bid, s_b, s_n, s_p, rows, cols, mask, val):
    tl.store(_tile_ptrs(base, bid, s_b, s_n, s_p, rows, cols), val.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _mm(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _tmm(a, b):
    """AᵀB of two row tiles (a p×p Gram contribution)."""
    return tl.dot(tl.trans(a), b, input_precision="ieee")


@triton.jit
def _tangent(g, x, c1, c2, KIND: tl.constexpr):
    """Row tile of T = G·C1 + X·C2 (C1 = I for the Riemannian kinds)."""
    if KIND == 2 or KIND == 3:
        return g + _mm(x, c2)
    return _mm(g, c1) + _mm(x, c2)


@triton.jit
def _adam_dir(m, v, bc1, bc2_sqrt, eps):
    return (m / (tl.sqrt(v) / bc2_sqrt + eps)) / bc1


@triton.jit
def _pass_b_kernel(
    g_ptr, x_ptr, c1_ptr, c2_ptr, m_ptr, v_ptr, w_ptr, out_ptr,
    n, p, rows_per_split,
    s_gb, s_gn, s_gp, s_xb, s_xn, s_xp, s_mb, s_mn, s_mp, s_vb, s_vn, s_vp, s_wb, s_wn, s_wp,
    s_ob, s_os, s_ok,
    beta1, beta2, bc1, bc2_sqrt, eps, momentum, dampening, lr,
    KIND: tl.constexpr, MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
    AMSGRAD: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
):
    bid = tl.program_id(0).to(tl.int64)
    sid = tl.program_id(1)
    cols = tl.arange(0, BP)
    mc = cols < p
    c_off = bid * p * p + cols[:, None] * p + cols[None, :]
    c_mask = mc[:, None] & mc[None, :]
    c1 = tl.load(c1_ptr + c_off, mask=c_mask, other=0.0)
    c2 = tl.load(c2_ptr + c_off, mask=c_mask, other=0.0)
    acc0 = tl.zeros((BP, BP), dtype=tl.float32)
    acc1 = tl.zeros((BP, BP), dtype=tl.float32)
    acc2 = tl.zeros((BP, BP), dtype=tl.float32)
    acc3 = tl.zeros((BP, BP), dtype=tl.float32)
    row0 = sid * rows_per_split
    row_end = tl.minimum(row0 + rows_per_split, n)
    for r in range(row0, row_end, BN):
        rows = r + tl.arange(0, BN)
        mask = (rows < row_end)[:, None] & mc[None, :]
        x = _load(x_ptr, bid, s_xb, s_xn, s_xp, rows, cols, mask)
        g = _load(g_ptr, bid, s_gb, s_gn, s_gp, rows, cols, mask)
        t = _tangent(g, x, c1, c2, KIND)
        if KIND == 0 or KIND == 3:  # Adam moments of T (masked entries stay 0: D = 0/(0 + eps))
            m = _load(m_ptr, bid, s_mb, s_mn, s_mp, rows, cols, mask)
            v = _load(v_ptr, bid, s_vb, s_vn, s_vp, rows, cols, mask)
            m = m + (1.0 - beta1) * (t - m)
            v = beta2 * v + (1.0 - beta2) * (t * t)
            _store(m_ptr, bid, s_mb, s_mn, s_mp, rows, cols, mask, m)
            _store(v_ptr, bid, s_vb, s_vn, s_vp, rows, cols, mask, v)
            if AMSGRAD:
                v = tl.maximum(_load(w_ptr, bid, s_wb, s_wn, s_wp, rows, cols, mask), v)
                _store(w_ptr, bid, s_wb, s_wn, s_wp, rows, cols, mask, v)
            d = _adam_dir(m, v, bc1, bc2_sqrt, eps)
        elif MOMENTUM:  # torch.optim.SGD's momentum on T
            if FIRST:
                m = t
            else:
                m = momentum * _load(m_ptr, bid, s_mb, s_mn, s_mp, rows, cols, mask) + (1.0 - dampening) * t
            _store(m_ptr, bid, s_mb, s_mn, s_mp, rows, cols, mask, m)
            if NESTEROV:
                d = t + momentum * m
            else:
                d = m
        else:
            d = t
        if KIND == 0:
            acc0 += _tmm(d, x)
            acc1 += _tmm(d, d)
        elif KIND == 1:
            if MOMENTUM:
                u = d - t
                z = t + _mm(u, c1)
                acc0 += _tmm(u, x)
            else:
                z = t
            acc1 += _tmm(z, x)
            acc2 += _tmm(z, z)
        elif KIND == 2:
            y = x - lr * d
            acc0 += _tmm(y, y)
            if MOMENTUM:
                acc1 += _tmm(y, m)
        else:
            acc0 += _tmm(d, x)
            acc1 += _tmm(d, d)
            acc2 += _tmm(m, x)
            acc3 += _tmm(m, d)
    out = out_ptr + bid * s_ob + sid * s_os + cols[:, None] * p + cols[None, :]
    tl.store(out, acc0, mask=c_mask)
    tl.store(out + s_ok, acc1, mask=c_mask)
    if KIND == 1 or KIND == 3:
        tl.store(out + 2 * s_ok, acc2, mask=c_mask)
    if KIND == 3:
        tl.store(out + 3 * s_ok, acc3, mask=c_mask)


@triton.jit
def _pass_c_kernel(
    g_ptr, x_ptr, c1_ptr, c2_ptr, m_ptr, v_ptr, k_ptr, out_ptr,
    n, p,
    s_gb, s_gn, s_gp, s_xb, s_xn, s_xp, s_mb, s_mn, s_mp, s_vb, s_vn, s_vp, s_ob, s_on, s_op,
    s_kb, s_kk,
    bc1, bc2_sqrt, eps, momentum, lr,
    KIND: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, NEED_T: tl.constexpr,
    BN: tl.constexpr, BP: tl.constexpr,
):
    bid = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    cols = tl.arange(0, BP)
    mc = cols < p
    mask = (rows < n)[:, None] & mc[None, :]
    c_off = bid * p * p + cols[:, None] * p + cols[None, :]
    c_mask = mc[:, None] & mc[None, :]
    k_off = bid * s_kb + cols[:, None] * p + cols[None, :]
    k0 = tl.load(k_ptr + k_off, mask=c_mask, other=0.0)
    k1 = tl.load(k_ptr + k_off + s_kk, mask=c_mask, other=0.0)
    x = _load(x_ptr, bid, s_xb, s_xn, s_xp, rows, cols, mask)
    if KIND == 0 or KIND == 3:
        m = _load(m_ptr, bid, s_mb, s_mn, s_mp, rows, cols, mask)
        d = _adam_dir(m, _load(v_ptr, bid, s_vb, s_vn, s_vp, rows, cols, mask), bc1, bc2_sqrt, eps)
        out = _mm(x, k0) + _mm(d, k1)
        if KIND == 3:  # transport of the first moment onto the tangent space at X⁺
            k2 = tl.load(k_ptr + k_off + 2 * s_kk, mask=c_mask, other=0.0)
            k3 = tl.load(k_ptr + k_off + 3 * s_kk, mask=c_mask, other=0.0)
            _store(m_ptr, bid, s_mb, s_mn, s_mp, rows, cols, mask, m + _mm(x, k2) + _mm(d, k3))
    else:
        c1 = tl.load(c1_ptr + c_off, mask=c_mask, other=0.0)
        if NEED_T:
            c2 = tl.load(c2_ptr + c_off, mask=c_mask, other=0.0)
            t = _tangent(_load(g_ptr, bid, s_gb, s_gn, s_gp, rows, cols, mask), x, c1, c2, KIND)
        if MOMENTUM:
            m = _load(m_ptr, bid, s_mb, s_mn, s_mp, rows, cols, mask)
            if NESTEROV:
                d = t + momentum * m
            else:
                d = m
        else:
            d = t
        if KIND == 1:
            if MOMENTUM:
                z = t + _mm(d - t, c1)
            else:
                z = t
            out = _mm(x, k0) + _mm(z, k1)
        else:
            y = x - lr * d
            out = _mm(y, k0)
            if MOMENTUM:  # transport of the momentum buffer onto the tangent space at X⁺
                _store(m_ptr, bid, s_mb, s_mn, s_mp, rows, cols, mask, m - _mm(y, k1))
    _store(out_ptr, bid, s_ob, s_on, s_op, rows, cols, mask, out)


def block_p(p: int) -> int:
    """The one column tile of a step kernel: next power of two ≥ max(p, 16)."""
    return max(16, triton.next_power_of_2(p))


def _row_tile(n: int, bp: int, bn: int | None) -> int:
    return bn or (32 if bp > 64 else block_n(n))


def pass_b(kind, g, x, c1, c2, m=None, v=None, vmax=None, *, beta1=0.0, beta2=0.0, bc1=1.0,
           bc2_sqrt=1.0, eps=0.0, momentum=0.0, dampening=0.0, nesterov=False, first=False, lr=0.0,
           bn=None, split=None) -> tuple:
    """Pass B: update the state in place (m, v, vmax for the Adam kinds; the momentum buffer m for
    the SGD kinds when ``momentum`` ≠ 0 — written, not read, when ``first``) and return the
    kind's fp32 Grams (see the module docstring), each (B, p, p). ``c1`` is unused (may be None)
    for the Riemannian kinds."""
    batch, n, p = x.shape
    bp = block_p(p)
    bn = _row_tile(n, bp, bn)
    split = _splits(batch, n, bn, 1, split)
    rows_per_split = triton.cdiv(triton.cdiv(n, bn), split) * bn
    split = triton.cdiv(n, rows_per_split)
    k = N_GRAMS[kind]
    out = torch.empty((batch, split, k, p, p), dtype=torch.float32, device=x.device)
    c2 = c2.contiguous()
    c1 = c2 if c1 is None else c1.contiguous()
    m_ = x if m is None else m
    v_ = m_ if v is None else v
    w_ = v_ if vmax is None else vmax
    _pass_b_kernel[(batch, split)](
        g, x, c1, c2, m_, v_, w_, out, n, p, rows_per_split,
        *g.stride(), *x.stride(), *m_.stride(), *v_.stride(), *w_.stride(), *out.stride()[:3],
        beta1, beta2, bc1, bc2_sqrt, eps, momentum, dampening, lr,
        KIND=kind, MOMENTUM=momentum != 0, FIRST=first, NESTEROV=nesterov, AMSGRAD=vmax is not None,
        BN=bn, BP=bp,
    )
    return out.sum(1).unbind(1)


def pass_c(kind, g, x, c1, c2, m, v, coeffs, out, *, bc1=1.0, bc2_sqrt=1.0, eps=0.0, momentum=0.0,
           nesterov=False, lr=0.0, bn=None) -> torch.Tensor:
    """Pass C: ``out`` = X⁺ from the tiles of pass B re-formed from the updated state (and from G
    and X where T is needed), with the p×p coefficients ``coeffs`` = (K0, K1[, K2, K3]) (see the
    module docstring); the Riemannian kinds also transport the state m in place. ``v`` is the
    Adam second moment in use (the running maximum with amsgrad)."""
    batch, n, p = x.shape
    bp = block_p(p)
    bn = _row_tile(n, bp, bn)
    k = torch.stack(torch.broadcast_tensors(*coeffs), dim=1).float().contiguous()
    c2 = x if c2 is None else c2.contiguous()
    c1 = c2 if c1 is None else c1.contiguous()
    m_ = x if m is None else m
    v_ = m_ if v is None else v
    sgd = kind in (LANDING_SGD, RIEMANNIAN_SGD)
    need_t = sgd and (kind == LANDING_SGD or momentum == 0 or nesterov)
    _pass_c_kernel[(batch, triton.cdiv(n, bn))](
        g, x, c1, c2, m_, v_, k, out, n, p,
        *g.stride(), *x.stride(), *m_.stride(), *v_.stride(), *out.stride(), k.stride(0), k.stride(1),
        bc1, bc2_sqrt, eps, momentum, lr,
        KIND=kind, MOMENTUM=sgd and momentum != 0, NESTEROV=nesterov, NEED_T=need_t, BN=bn, BP=bp,
    )
    return out
