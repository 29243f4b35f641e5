"""The landing method (Ablin, Vary, Gao, Absil): the landing field
Λ(X) = ½(G·XᵀX − X·GᵀX) + λ X(XᵀX − I), the safe step that keeps ‖XᵀX − I‖_F ≤ ε, and the landing
update X⁺ = X − ηΛ (:func:`_land`), each product associated as :func:`_landing_association` says."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .coefficients import _frobenius_sq_from_gram, landing_coefficients
from .layout import LOCAL, Rows, _bmm_add, _eye_like, _mm_add_, _mm_scaled, _tall, gram
from .stiefel import skew


@_tall(2)
def landing_field(x: Tensor, g: Tensor, lam: float = 1.0, *, rows: Rows = LOCAL) -> Tensor:
    """Landing field Λ(X) = ½(G·XᵀX − X·GᵀX) + λ X(XᵀX − I)  (Ablin et al.; = skew(GXᵀ)X + λ∇N).

    Thin X: the p×p Grams XᵀX, GᵀX and Λ = G·C_G + X·C_X (:func:`landing_coefficients`); G Xᵀ (n×n)
    is never formed. Nearly square X (:func:`_landing_association`): skew(G Xᵀ)X, cheaper there.
    """
    return _tangent_term(x, g, lam, rows=rows)[0]


@_tall(2)
def relative_tangent(x: Tensor, g: Tensor, *, rows: Rows = LOCAL) -> Tensor:
    """Tangent term of the landing field T = ½(G·XᵀX − X·GᵀX) = skew(G Xᵀ) X (n×n formed only
    for nearly square X, where it is cheaper: :func:`_landing_association`)."""
    return _tangent_term(x, g, rows=rows)[0]


def safe_step(d: Tensor, a: Tensor, lam: float, eps: float = 0.5) -> Tensor:
    """Largest step that keeps ‖XᵀX − I‖_F ≤ ε after X ← X − ηΛ (Ablin et al., Prop. 4).

    η* = min{ [λd(1−d) + √(λ²d²(1−d)² + a²·max(ε−d, 0))] / max(a², tiny), 1/(2λ) }
    with d = ‖XᵀX − I‖_F and a = ‖Λ‖_F, elementwise over batches. The 1/(2λ) cap and the
    clamp of ε − d at 0 are what keep d from blowing past ε.
    """
    return _safe_step_sq(d, a * a, lam, eps)


def _safe_step_sq(d: Tensor, a2: Tensor, lam: float, eps: float, lr: float = math.inf) -> Tensor:
    """min(lr, η*) of :func:`safe_step` from a² = ‖Λ‖²_F (no square root to take, none to undo)."""
    if not 0.0 < eps < 1.0:
        raise ValueError(f"safe_step: eps must lie in (0, 1), got {eps}")
    if lam <= 0:
        raise ValueError(f"safe_step: lam must be > 0, got {lam}")
    lin = d * torch.rsub(d, 1.0)
    if lam != 1:
        lin.mul_(lam)
    num = torch.addcmul(lin * lin, a2, torch.rsub(d, eps).clamp_min_(0.0)).sqrt_().add_(lin)
    eta = num.div_(a2.clamp_min(torch.finfo(a2.dtype).tiny))
    cap = 1.0 / (2.0 * lam)
    if isinstance(lr, (int, float)):  # one clamp; a tensor lr (torch.compile's, or one per matrix) a second
        return eta.clamp_max_(min(lr, cap))
    return eta.clamp_max_(cap).clamp_max_(lr)


def landing_plan(xtx: Tensor, c_a: Tensor, c_x: Tensor, aa: Tensor, xta: Tensor, *, lr: float,
                 lam: float, safe_eps: float) -> tuple[Tensor, Tensor]:
    """p×p (K_X, K_A) with X⁺ = X − ηΛ = X·K_X + A·K_A for Λ = A·C_A + X·C_X, from the Grams XᵀX,
    AᵀA, XᵀA: d = ‖XᵀX − I‖_F, a = ‖Λ‖_F (:func:`frobenius_from_gram`), the per-matrix
    η = min(lr, η*(d, a)) of :func:`safe_step`; K_X = I − ηC_X, K_A = −ηC_A. The fused kernels'
    form of the step (a Gram pass, then an apply pass; no pass over Λ)."""
    eye = _eye_like(xtx)
    dist = torch.linalg.matrix_norm(xtx - eye, keepdim=True)
    a2 = _frobenius_sq_from_gram(c_a, c_x, aa, xta, xtx, keepdim=True)
    neg_eta = _safe_step_sq(dist, a2, lam, safe_eps, lr).neg_()
    return torch.addcmul(eye, neg_eta, c_x), c_a * neg_eta


def _landing_association(n: int, p: int, rows: Rows = LOCAL) -> str:
    """How the landing steps associate their products for a tall n×p X (n ≥ p), by cost:

    - ``"thin"``: p×p Grams XᵀX, GᵀX, DᵀX and Λ = D·C_D + X·C_X formed (‖Λ‖_F and X − ηΛ in two
      passes): 7np² multiply-adds a landing Adam step. At every p it was timed against forming
      X⁺ = X·K_X + D·K_D from the Grams alone (:func:`landing_plan`, the fused kernels' form: no pass
      over Λ, but twice the p×p work and a DᵀD Gram), it was faster, from 4×(512×4) to 16×(4096×32);
    - ``"square"`` (n = p): n×n products, Λ = (skew(DXᵀ) + λ(XXᵀ − I))X, 5n³
      (‖XXᵀ − I‖_F = ‖XᵀX − I‖_F for square X);
    - ``"mid"`` (p < n < 5p/4): skew(GXᵀ)X and skew(DXᵀ)X with XᵀX for the distance and the
      normal term, 4n²p + 2np² < 7np².
    On row shards (``rows.sharded``) always the Gram route (an n×n product would need every shard's rows).
    """
    if rows.sharded or 4 * n >= 5 * p:
        return "thin"
    return "square" if n == p else "mid"


def _tangent_term(x: Tensor, g: Tensor, lam: float = 0.0, *, rows: Rows = LOCAL) -> tuple[Tensor, Tensor | None]:
    """(T + λX(XᵀX − I), XᵀX or None) for T = ½(G·XᵀX − X·GᵀX) = skew(G Xᵀ)X of a tall X
    (λ = 0: the tangent term alone), associated as :func:`_landing_association` says (XᵀX is
    returned on the Gram routes only)."""
    route = _landing_association(*x.shape[-2:], rows)
    if route == "thin":  # no copy of [X G]: two Grams, G·C_G then += X·C_X in place
        xtx = gram(x, x, rows=rows)
        c_g, c_x = landing_coefficients(xtx, gram(g, x, rows=rows), lam)
        return _mm_add_(g @ c_g, x, c_x), xtx
    w = g @ x.transpose(-1, -2)
    w = w - w.transpose(-1, -2)  # 2 skew(G Xᵀ)
    if lam == 0:
        return _mm_scaled(w, x, 0.5), None  # skew(W)X, the ½ in the product
    if route == "square":  # + λ(XXᵀ − I)X = λX(XᵀX − I): the same product
        gap = x @ x.transpose(-1, -2)
        gap.diagonal(dim1=-2, dim2=-1).sub_(1.0)
        return _mm_scaled(w.add_(gap, alpha=2.0 * lam), x, 0.5), None
    gap = gram(x, x, rows=rows)
    gap.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    return _mm_add_(_mm_scaled(w, x, 0.5), x, gap, alpha=lam), None


def _land(x: Tensor, u: Tensor, xtx: Tensor | None, scale: float, *, lr: float, lam: float,
          safe_eps: float, rows: Rows = LOCAL) -> Tensor:
    """X⁺ = X − ηΛ for Λ = R(sU) + λX(XᵀX − I), R(V) = ½(V·XᵀX − X·VᵀX) = skew(V Xᵀ)X,
    s = ``scale``, η = min(lr, η*(d, ‖Λ‖_F)) per matrix (:func:`safe_step`), d = ‖XᵀX − I‖_F.
    ⟨R(V), X(XᵀX − I)⟩ = 0 for any V, which keeps the safe-step bound valid. ``xtx``: XᵀX from
    :func:`_tangent_term` (None on the n×n routes). Associated as :func:`_landing_association` says."""
    route = _landing_association(*x.shape[-2:], rows)
    if route == "thin":
        # Λ = U·(½s XᵀX) + X·(λ(XᵀX − I) − ½s UᵀX) (landing_coefficients): two n×p-by-p×p products
        c_u, c_x = landing_coefficients(xtx, gram(u, x, rows=rows), lam, scale)
        gap = xtx - _eye_like(xtx)
        field = _mm_add_(u @ c_u, x, c_x)
    elif route == "square":
        # X(XᵀX − I) = (XXᵀ − I)X: Λ = λ(XXᵀ − I + (s/2λ)(UXᵀ − XUᵀ))X, one n×n-by-n×n product
        gap = x @ x.transpose(-1, -2)
        gap.diagonal(dim1=-2, dim2=-1).sub_(1.0)
        w = u @ x.transpose(-1, -2)
        if lam > 0:
            field = _mm_scaled(torch.add(gap, w - w.transpose(-1, -2), alpha=0.5 * scale / lam), x, lam)
        else:  # (safe_step rejects λ ≤ 0)
            field = _mm_scaled(w - w.transpose(-1, -2), x, 0.5 * scale)
    else:  # mid: Λ = skew(sUXᵀ)X + X·λ(XᵀX − I)
        gap = gram(x, x, rows=rows)
        gap.diagonal(dim1=-2, dim2=-1).sub_(1.0)
        field = _bmm_add(skew(u @ x.transpose(-1, -2)).mul_(scale) @ x, x, gap, alpha=lam)
    eta = _safe_step_sq(torch.linalg.matrix_norm(gap), rows.frobenius(field).square(), lam, safe_eps, lr)
    if field.stride() == x.stride():  # Λ is ours: X⁺ into its buffer (a fresh large CPU buffer page-faults)
        return torch.addcmul(x, eta[..., None, None], field, value=-1.0, out=field)
    return torch.addcmul(x, eta[..., None, None], field, value=-1.0)
