"""Triton building blocks shared by every fused Stiefel kernel (imports triton; load lazily).

Two passes over memory cover every O(np²) operation of the package:

* :func:`gram` — one read of a batch of tall matrices, accumulating p×p Gram blocks
  (XᵀX and GᵀX, or YᵀY for Y = X + V) in fp32;
* :func:`apply` — one read of the same matrices, writing  A·C_A + B·C_B  for p×p coefficient
  matrices computed in torch between the two passes.

Matrices are passed with their strides (a wide matrix is handled as the transposed view of its
tall form, at no cost), inputs may be fp32/bf16/fp16 and all arithmetic is fp32 (``ieee``
dot products, so results match the fp32 torch reference, not TF32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

INTERPRETED = bool(knobs.runtime.interpret)
"""Whether the kernels of this module were built for Triton's CPU interpreter."""

MODE_X_G = 0  # gram: out1 = XᵀX, out2 = GᵀX
MODE_SUM = 1  # gram: Y = X + V, out1 = YᵀY


def block_p(p: int) -> int:
    """Column tile: the next power of two ≥ p, at least 16 (tl.dot's minimum), at most 64."""
    return min(64, max(16, triton.next_power_of_2(p)))


def block_n(n: int) -> int:
    """Row tile: 64 rows, or fewer (≥ 16) for short matrices."""
    return min(64, max(16, triton.next_power_of_2(n)))


@triton.jit
def _gram_kernel(
    a_ptr, b_ptr, out1_ptr, out2_ptr,
    n, p, rows_per_split,
    s_ab, s_an, s_ap, s_bb, s_bn, s_bp,
    s_ob, s_os,
    MODE: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
):
    bid = tl.program_id(0).to(tl.int64)
    sid = tl.program_id(1)
    tid = tl.program_id(2)
    n_tiles = tl.cdiv(p, BP)
    ci = (tid // n_tiles) * BP + tl.arange(0, BP)
    cj = (tid % n_tiles) * BP + tl.arange(0, BP)
    mi = ci < p
    mj = cj < p
    a_base = a_ptr + bid * s_ab
    b_base = b_ptr + bid * s_bb
    acc1 = tl.zeros((BP, BP), dtype=tl.float32)
    acc2 = tl.zeros((BP, BP), dtype=tl.float32)
    row0 = sid * rows_per_split
    row_end = tl.minimum(row0 + rows_per_split, n)
    for r in range(row0, row_end, BN):
        rows = r + tl.arange(0, BN)
        mr = rows < row_end
        off_ai = rows[:, None] * s_an + ci[None, :] * s_ap
        off_aj = rows[:, None] * s_an + cj[None, :] * s_ap
        mask_i = mr[:, None] & mi[None, :]
        mask_j = mr[:, None] & mj[None, :]
        a_i = tl.load(a_base + off_ai, mask=mask_i, other=0.0).to(tl.float32)
        a_j = tl.load(a_base + off_aj, mask=mask_j, other=0.0).to(tl.float32)
        off_bi = rows[:, None] * s_bn + ci[None, :] * s_bp
        b_i = tl.load(b_base + off_bi, mask=mask_i, other=0.0).to(tl.float32)
        if MODE == 0:
            acc1 += tl.dot(tl.trans(a_i), a_j, input_precision="ieee")
            acc2 += tl.dot(tl.trans(b_i), a_j, input_precision="ieee")
        else:
            off_bj = rows[:, None] * s_bn + cj[None, :] * s_bp
            b_j = tl.load(b_base + off_bj, mask=mask_j, other=0.0).to(tl.float32)
            acc1 += tl.dot(tl.trans(a_i + b_i), a_j + b_j, input_precision="ieee")
    out_off = bid * s_ob + sid * s_os + ci[:, None] * p + cj[None, :]
    mask_o = mi[:, None] & mj[None, :]
    tl.store(out1_ptr + out_off, acc1, mask=mask_o)
    if MODE == 0:
        tl.store(out2_ptr + out_off, acc2, mask=mask_o)


@triton.jit
def _apply_kernel(
    a_ptr, b_ptr, ca_ptr, cb_ptr, out_ptr,
    n, p,
    s_ab, s_an, s_ap, s_bb, s_bn, s_bp, s_cb, s_outb, s_outn, s_outp,
    SUM_FIRST: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
):
    bid = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    cols = tl.program_id(2) * BP + tl.arange(0, BP)
    mr = rows < n
    mc = cols < p
    a_base = a_ptr + bid * s_ab
    b_base = b_ptr + bid * s_bb
    acc = tl.zeros((BN, BP), dtype=tl.float32)
    for k in range(0, p, BP):
        ks = k + tl.arange(0, BP)
        mk = ks < p
        mask_in = mr[:, None] & mk[None, :]
        a = tl.load(a_base + rows[:, None] * s_an + ks[None, :] * s_ap, mask=mask_in, other=0.0)
        b = tl.load(b_base + rows[:, None] * s_bn + ks[None, :] * s_bp, mask=mask_in, other=0.0)
        c_off = bid * s_cb + ks[:, None] * p + cols[None, :]
        mask_c = mk[:, None] & mc[None, :]
        c_a = tl.load(ca_ptr + c_off, mask=mask_c, other=0.0)
        if SUM_FIRST:
            acc += tl.dot(a.to(tl.float32) + b.to(tl.float32), c_a, input_precision="ieee")
        else:
            c_b = tl.load(cb_ptr + c_off, mask=mask_c, other=0.0)
            acc += tl.dot(a.to(tl.float32), c_a, input_precision="ieee")
            acc += tl.dot(b.to(tl.float32), c_b, input_precision="ieee")
    out_off = bid * s_outb + rows[:, None] * s_outn + cols[None, :] * s_outp
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mr[:, None] & mc[None, :])


def _splits(batch: int, n: int, bn: int, tiles: int, split: int | None) -> int:
    chunks = triton.cdiv(n, bn)
    if split is None:
        # enough programs to fill a GPU (~1024 in flight), never more than one per row tile
        split = max(1, 1024 // max(1, batch * tiles))
    return max(1, min(chunks, split))


def gram(a: torch.Tensor, b: torch.Tensor, mode: int, *, bn: int | None = None,
         bp: int | None = None, split: int | None = None):
    """p×p Gram blocks of a batch (B, n, p) in fp32: (AᵀA, BᵀA) for MODE_X_G, ((A+B)ᵀ(A+B), None)
    for MODE_SUM. Rows are split over ``split`` programs per matrix, whose partial sums are added
    in torch (deterministic)."""
    batch, n, p = a.shape
    bn = bn or block_n(n)
    bp = bp or block_p(p)
    tiles = triton.cdiv(p, bp) ** 2
    split = _splits(batch, n, bn, tiles, split)
    rows_per_split = triton.cdiv(triton.cdiv(n, bn), split) * bn
    split = triton.cdiv(n, rows_per_split)
    out1 = torch.empty((batch, split, p, p), dtype=torch.float32, device=a.device)
    out2 = torch.empty_like(out1) if mode == MODE_X_G else out1
    _gram_kernel[(batch, split, tiles)](
        a, b, out1, out2, n, p, rows_per_split,
        *a.stride(), *b.stride(), out1.stride(0), out1.stride(1),
        MODE=mode, BN=bn, BP=bp,
    )
    if mode == MODE_X_G:
        return out1.sum(1), out2.sum(1)
    return out1.sum(1), None


def apply(a: torch.Tensor, b: torch.Tensor, c_a: torch.Tensor, c_b: torch.Tensor | None,
          out: torch.Tensor, *, bn: int | None = None, bp: int | None = None) -> torch.Tensor:
    """out = A·C_A + B·C_B for a batch (B, n, p) and fp32 (B, p, p) coefficients; with
    ``c_b=None``, out = (A + B)·C_A. ``out`` may have any strides and dtype."""
    batch, n, p = a.shape
    bn = bn or block_n(n)
    bp = bp or block_p(p)
    sum_first = c_b is None
    c_a = c_a.contiguous()
    c_b = c_a if sum_first else c_b.contiguous()
    grid = (batch, triton.cdiv(n, bn), triton.cdiv(p, bp))
    _apply_kernel[grid](
        a, b, c_a, c_b, out, n, p,
        *a.stride(), *b.stride(), c_a.stride(0), *out.stride(),
        SUM_FIRST=sum_first, BN=bn, BP=bp,
    )
    return out
