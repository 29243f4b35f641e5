"""LoRA-RITE (Yen et al., ICLR 2025, arXiv 2410.20625): per-factor step math.

Both LoRA factors are written in their *tall* form, X ∈ R^{n×r} (the long dimension first):
for ΔW = B A (PEFT: A is r×in, B is out×r) the factors are Aᵀ (in×r) and B (out×r), and
ΔW = B (Aᵀ)ᵀ. For a factor X with partner Y = U R (thin QR), ∇_X = Ĝ Y with Ĝ = ∂L/∂ΔW or its
transpose, and the *unmagnified gradient* is ḡ = ∇_X R⁺ (= Ĝ U for full-rank Y). No function
below forms ḡ (n×r): only r×r matrices and one n×r product per moment are computed.
Pass fp32 (or fp64) tensors; rite_basis upcasts low-precision factors itself.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .layout import LOCAL, Rows, _bmm_add, _compute_dtype, _eye_like, gram
from .stiefel import sym


def rite_basis(y: Tensor, rtol: float | None = None, *, rows: Rows = LOCAL) -> tuple[Tensor, Tensor]:
    """Thin QR of a tall factor, Y = U R (U n×r orthonormal), returning (U, R⁺).

    R⁺ is the pseudo-inverse of the r×r factor R with singular values below rtol·σ_max treated as
    zero (rtol defaults to √ε_mach: 1.5e-8 in fp64, 3.5e-4 in fp32). So R⁺ = R⁻¹ for a
    well-conditioned Y, R⁺ = 0 for Y = 0 (the usual LoRA initialisation of B), and a partner of
    numerically lower rank (e.g. B after one step on a gradient of rank < r) gets no rounding
    noise amplified along its null directions. R⁻¹ comes from a triangular solve when
    ‖R‖_F‖R⁻¹‖_F < 1/rtol certifies the conditioning (one host sync), else from an SVD.
    Low precision is computed in fp32. Row-sharded (:mod:`stiefel_opt.distributed`), the basis
    comes from p×p Grams alone: :func:`_rite_basis_gram`.
    """
    y = y.to(_compute_dtype(y.dtype))
    if rtol is None:
        rtol = torch.finfo(y.dtype).eps ** 0.5
    if rows.sharded:
        return _rite_basis_gram(y, rtol, rows=rows)
    u, r = torch.linalg.qr(y)
    eye = _eye_like(r).expand_as(r)
    r_inv = torch.linalg.solve_triangular(r, eye, upper=True)
    cond = torch.linalg.matrix_norm(r) * torch.linalg.matrix_norm(r_inv)
    if bool((cond < 1.0 / rtol).all()):
        return u, r_inv
    return u, torch.linalg.pinv(r, rtol=rtol)


def _rite_basis_gram(y: Tensor, rtol: float, *, rows: Rows = LOCAL) -> tuple[Tensor, Tensor]:
    """(U, R⁺) with Y = U R from Grams of Y only, for row shards (two all-reduces of r×r).

    Pass 1: YᵀY = Q Λ Qᵀ (σ = √λ, largest first); R₁⁺ = Q Σ⁺ drops the directions with
    σ ≤ rtol·σ_max, and U₁ = Y R₁⁺ has exactly zero columns there. Pass 2 (as in CholeskyQR2)
    removes the κ²ε loss of orthogonality of pass 1: R₂ = chol(U₁ᵀU₁ + D)ᵀ with D = 1 on the
    dropped columns (which stay zero), U = U₁ R₂⁻¹, R⁺ = R₁⁺ R₂⁻¹. A kept column of U₁ has norm ≈ 1
    unless its σ sat at the Gram's noise floor √ε·σ_max (the default rtol), where it is ≈ 0: a
    pivot of R₂ below ½ (or a failed one) drops that direction too, then R₂ is recomputed from the
    same Gram. U spans the column space of :func:`rite_basis`'s Householder U (the LoRA-RITE step
    depends on U only through it). If the last Cholesky fails, pass 1's (U₁, R₁⁺) is returned.
    """
    lam, q = torch.linalg.eigh(gram(y, y, rows=rows))
    lam, q = lam.flip(-1), q.flip(-1)
    sigma = lam.clamp_min(0.0).sqrt()
    keep = sigma > rtol * sigma[..., :1]
    r1_pinv = q * torch.where(keep, 1.0 / torch.where(keep, sigma, 1.0), 0.0).unsqueeze(-2)
    u1 = y @ r1_pinv
    g2 = gram(u1, u1, rows=rows)
    eye = _eye_like(g2).expand_as(g2)

    def factor(keep):
        return torch.linalg.cholesky_ex(torch.where(keep.unsqueeze(-1) & keep.unsqueeze(-2), g2, eye), upper=True)

    r2, info = factor(keep)
    done = torch.where(info > 0, info - 1, g2.shape[-1]).unsqueeze(-1)
    cols = torch.arange(g2.shape[-1], device=g2.device)
    keep = keep & (cols < done) & (r2.diagonal(dim1=-2, dim2=-1) >= 0.5)
    r2, info = factor(keep)
    mask = keep.unsqueeze(-2).to(y.dtype)
    u1, r1_pinv = u1 * mask, r1_pinv * mask
    ok = (info == 0)[..., None, None]
    r2_inv = torch.where(ok, torch.linalg.solve_triangular(torch.where(ok, r2, eye), eye, upper=True), eye)
    return u1 @ r2_inv, r1_pinv @ r2_inv


def rite_unmagnified_gram(grad_x: Tensor, r_pinv_y: Tensor, *, rows: Rows = LOCAL) -> Tensor:
    """ḡᵀḡ = R⁺ᵀ (∇_Xᵀ ∇_X) R⁺ (r×r), the Gram matrix of the unmagnified gradient ḡ = ∇_X R⁺.

    It is invariant under Y → Y S (S invertible) up to the rotation of the basis U. Non-finite
    entries of ∇_X show up on its diagonal.
    """
    gg = sym(gram(grad_x, grad_x, rows=rows))
    return sym(r_pinv_y.transpose(-1, -2) @ gg @ r_pinv_y)


def rite_transport(u_new: Tensor, u_old: Tensor, v: Tensor, *, rows: Rows = LOCAL) -> tuple[Tensor, Tensor]:
    """Basis change P = U_newᵀ U_old (r×r, ‖P‖₂ ≤ 1) and the transported second moment sym(P V Pᵀ).

    A statistic V (r×r) expressed in the old basis is expressed in the new one; a first moment M
    (n×r) moves as M Pᵀ (see :func:`rite_first_moment`). U_old = 0 (no history) gives P = 0.
    """
    p = gram(u_new, u_old, rows=rows)
    return p, sym(p @ v @ p.transpose(-1, -2))


def rite_escaped_mass(v_old: Tensor, v_transported: Tensor) -> Tensor:
    """Escaped mass d_λ(V, P V Pᵀ) = max_i (λ_i(V) − λ_i(P V Pᵀ))₊ over eigenvalues sorted alike.

    The smallest ρ ≥ 0 with λ_i(P V Pᵀ + ρI) ≥ λ_i(V) for every i: the spectral mass lost when the
    old statistics are projected onto the new basis. One value per matrix (shape v.shape[:-2]).
    """
    lam = torch.linalg.eigvalsh(torch.stack([v_old, v_transported]))
    return (lam[0] - lam[1]).amax(dim=-1).clamp_min(0.0)


def rite_inv_root(v: Tensor, rho: Tensor | float = 0.0, eps: float = 1e-6) -> Tensor:
    """K = Q diag(1/(√(λ + ρ) + ε)) Qᵀ for V = Q diag(λ) Qᵀ: the preconditioner (V + ρI)^(−1/2), with ε
    added to the roots as in Adam. λ is clamped at 0; ρ is one value per matrix (V.shape[:-2])."""
    lam, q = torch.linalg.eigh(v)
    if isinstance(rho, Tensor):
        rho = rho.unsqueeze(-1)
    scale = 1.0 / ((lam.clamp_min(0.0) + rho).sqrt() + eps)
    return (q * scale.unsqueeze(-2)) @ q.transpose(-1, -2)


def rite_first_moment(m: Tensor, p: Tensor, grad_x: Tensor, r_pinv_y: Tensor, k: Tensor,
                      beta1: Tensor | float) -> Tensor:
    """M_new = β₁ M Pᵀ + (1 − β₁) ḡ K with ḡ = ∇_X R⁺: the first moment of the *preconditioned*
    unmagnified gradient, the old moment transported to the new basis. β₁ may be one value per
    matrix; it is folded into the r×r factors, so the n×r work is two products."""
    if isinstance(beta1, Tensor):
        beta1 = beta1[..., None, None]
    moved = _bmm_add(None, m, beta1 * p.transpose(-1, -2))
    return _bmm_add(moved, grad_x.to(m.dtype), r_pinv_y @ ((1 - beta1) * k))


def rite_update(x: Tensor, m: Tensor, r_pinv_y: Tensor, lr: float, decay: float = 1.0) -> Tensor:
    """X_new = decay·X − lr · M R⁺ᵀ. The product Y Xᵀ then moves by −lr M R⁺ᵀ Rᵀ Uᵀ = −lr M Uᵀ
    (full-rank Y, decay = 1): the step on ΔW depends on the partner only through its column space."""
    return _bmm_add(x, m, r_pinv_y.transpose(-1, -2), beta=decay, alpha=-lr)
