"""The p×p coefficient forms of the step math, for the fused kernels (:mod:`stiefel_opt.kernels`),
which read the n×p matrices once for their Gram blocks and once to apply p×p coefficients:
each n×p result is written A·C_A + B·C_B with C computed here from Grams alone."""
from __future__ import annotations

import torch
from torch import Tensor

from .layout import _eye_like, as_metric
from .retractions import _inv_sqrt_near_identity, _inv_sqrt_psd
from .stiefel import sym


def landing_coefficients(xtx: Tensor, gtx: Tensor, lam: float = 1.0, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """p×p coefficients (C_G, C_X) of the landing field Λ = R(s·G) + λX(XᵀX − I) = G·C_G + X·C_X,
    R(V) = ½(V·XᵀX − X·VᵀX), from the Gram blocks: C_G = (s/2)XᵀX, C_X = λ(XᵀX − I) − (s/2)GᵀX
    (the two halves of C in :func:`landing_field`; s = ``scale``). λ = 0: the tangent term alone.

    For fused kernels that read [X G] once for the Gram blocks and once to apply C.
    """
    half = 0.5 * scale  # a 0-d tensor under torch.compile (the step's bias corrections): no alpha=
    if lam == 0:
        return half * xtx, -half * gtx
    gap = xtx - _eye_like(xtx)
    return half * xtx, (gap if lam == 1 else lam * gap) - half * gtx


def polar_coefficients(gram: Tensor) -> Tensor:
    """p×p K with polar(Y) = Y·K from the Gram S = YᵀY alone (no second pass over Y).

    K = S^(−1/2) by the certified series of :func:`_inv_sqrt_near_identity` when S is near a
    multiple of I (:func:`retract_polar`'s K); otherwise M = S^(−1/2) by eigh, refined by one
    Newton–Schulz step written on p×p matrices: K = M (3I − M S M)/2, equal in exact arithmetic to
    :func:`retract_polar`'s (YM)(3I − (YM)ᵀ(YM))/2. For fused kernels (Gram pass, then apply pass).
    """
    k = _inv_sqrt_near_identity(gram)
    if k is not None:
        return k
    m = _inv_sqrt_psd(gram)
    return m @ (1.5 * _eye_like(gram) - 0.5 * (m @ gram @ m))


def combination_gram(c_a: Tensor, c_b: Tensor, aa: Tensor, ba: Tensor, bb: Tensor) -> Tensor:
    """(A·C_A + B·C_B)ᵀ(A·C_A + B·C_B) from p×p matrices only, given the Grams AᵀA, BᵀA, BᵀB:
    C_AᵀAᵀA C_A + C_BᵀBᵀA C_A + (…)ᵀ + C_BᵀBᵀB C_B. For fused kernels (e.g. YᵀY of Y = X·A + D·B)."""
    cross = c_b.transpose(-1, -2) @ ba @ c_a
    return c_a.transpose(-1, -2) @ aa @ c_a + cross + cross.transpose(-1, -2) + c_b.transpose(-1, -2) @ bb @ c_b


def adam_bias_corrections(step, beta1: float, beta2: float) -> tuple:
    """Adam's bias corrections (1 − β1ᵗ, √(1 − β2ᵗ)) at step t (an int or a 0-d tensor)."""
    return 1.0 - beta1**step, (1.0 - beta2**step) ** 0.5


def rgrad_coefficient(gtx: Tensor, metric="euclidean") -> Tensor:
    """p×p C with rgrad(X, G) = G + X·C from GᵀX: −sym(GᵀX) (euclidean, :func:`proj_tangent`) or
    −GᵀX (canonical, :func:`canonical_rgrad`); the metric's
    :meth:`~stiefel_opt.functional.stiefel.Metric.rgrad_coefficient` (a name or a strategy)."""
    return as_metric(metric).rgrad_coefficient(gtx)


def transport_coefficient(k: Tensor, ytm: Tensor) -> Tensor:
    """p×p J with P_{X⁺}(M) = M − Y·J for X⁺ = Y·K, from YᵀM: J = K·sym(KᵀYᵀM)
    (:func:`proj_tangent` at X⁺, written on p×p matrices)."""
    return k @ sym(k.transpose(-1, -2) @ ytm)


def frobenius_from_gram(c_a: Tensor, c_b: Tensor, aa: Tensor, ba: Tensor, bb: Tensor) -> Tensor:
    """‖A·C_A + B·C_B‖_F = √tr(:func:`combination_gram`) from p×p matrices only (clamped at 0
    against rounding), one value per matrix: the norm of a field such as Λ = D·C_D + X·C_X without
    a pass over it.
    """
    return _frobenius_sq_from_gram(c_a, c_b, aa, ba, bb).sqrt_()


def _frobenius_sq_from_gram(c_a: Tensor, c_b: Tensor, aa: Tensor, ba: Tensor, bb: Tensor,
                            keepdim: bool = False) -> Tensor:
    """‖A·C_A + B·C_B‖²_F ≥ 0 (:func:`frobenius_from_gram` before its square root)."""
    # tr(MᵀGM') = ⟨M, G·M'⟩ and ⟨C_B, BᵀA·C_A⟩ = ⟨AᵀB·C_B, C_A⟩:
    # ⟨C_A, AᵀA·C_A + 2AᵀB·C_B⟩ + ⟨C_B, BᵀB·C_B⟩, three p×p products
    inner = torch.add(aa @ c_a, ba.transpose(-1, -2) @ c_b, alpha=2.0)
    return torch.addcmul(c_a * inner, c_b, bb @ c_b).sum((-2, -1), keepdim=keepdim).clamp_min_(0.0)
