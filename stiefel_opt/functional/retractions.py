"""Retractions R_X(V) of St(n, p), all O(np²) (never an n×n matrix): polar (certified series, eigh
or Newton–Schulz, with re-orthonormalization), QR (CholeskyQR near the manifold, sign-fixed
Householder, CholeskyQR2 on row shards), Cayley (Woodbury) and exp (the metric's geodesic,
:meth:`~stiefel_opt.functional.stiefel.Metric.geodesic`); :func:`retract` picks one by name."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .layout import LOCAL, Rows, _eye_like, _tall, as_metric, gram

def _inv_sqrt_psd(s: Tensor) -> Tensor:
    """S^(−1/2) of a symmetric positive definite p×p (batched) matrix by eigh."""
    w, q = torch.linalg.eigh(s)
    return (q * w.clamp_min(torch.finfo(w.dtype).tiny).rsqrt().unsqueeze(-2)) @ q.transpose(-1, -2)


#: Largest degree of the binomial series of (I + A)^(−1/2) :func:`_inv_sqrt_near_identity` evaluates
#: (degree m costs ⌊m/2⌋ products of p×p matrices); beyond it the p×p ``eigh`` is used.
_SERIES_MAX_DEGREE = 12


@functools.lru_cache(maxsize=None)
def _binomial_inv_sqrt(m: int) -> tuple[float, ...]:
    """c_0 … c_m of (1 + a)^(−1/2) = Σ c_k a^k: c_0 = 1, c_k = −c_(k−1)(2k − 1)/(2k) (|c_k| decreasing)."""
    c = [1.0]
    for k in range(1, m + 1):
        c.append(-c[-1] * (2 * k - 1) / (2 * k))
    return tuple(c)


def _series_degree(delta: float, dtype: torch.dtype) -> int | None:
    """Smallest degree m whose truncation bound |c_(m+1)| δ^(m+1) / (1 − δ) is at most ε_mach/4 of
    ``dtype`` (the tail of an alternating series with decreasing |c_k|, for ‖A‖₂ ≤ δ < 1), or None
    when that takes a degree above :data:`_SERIES_MAX_DEGREE` (or δ is not finite)."""
    if not 0.0 <= delta < 0.5:  # False for NaN
        return None
    tol = 0.25 * torch.finfo(dtype).eps
    c = _binomial_inv_sqrt(_SERIES_MAX_DEGREE + 1)
    power = 1.0 / (1.0 - delta)
    for m in range(_SERIES_MAX_DEGREE + 1):
        power *= delta  # δ^(m+1)/(1 − δ)
        if abs(c[m + 1]) * power <= tol:
            return m
    return None


def _identity_offset(s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(c, A, δ) for a batch of Gram matrices S = YᵀY: c = tr(S)/p ≥ 0 (shape …×1×1), A = S/c − I
    and δ = ‖A‖_F ≥ ‖A‖₂ per matrix (NaN where c = 0, i.e. Y = 0, or S is not finite: every
    certificate declines it)."""
    c = torch.diagonal(s, dim1=-2, dim2=-1).mean(-1, keepdim=True).unsqueeze_(-1)
    a = s / c
    a.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    return c, a, torch.linalg.matrix_norm(a)


def _inv_sqrt_near_identity(s: Tensor) -> Tensor | None:
    """S^(−1/2) of a batch of p×p Gram matrices near a multiple of I, by matmuls only; None
    when it cannot be certified (then the caller takes the ``eigh`` route).

    With c = tr(S)/p and A = S/c − I (per matrix), S^(−1/2) = c^(−1/2) Σ_k c_k A^k, the binomial
    series truncated at the degree m of :func:`_series_degree` for δ, the largest over the batch of
    min(‖A‖_F, ‖A²‖_F^½) ≥ ‖A‖₂ (A symmetric): every eigenvalue of the result is then within
    ε_mach/4 (relative) of the exact one. Summed as Σ_j (c_2j I + c_2j+1 A)(A²)^j (Horner in A²):
    ⌊m/2⌋ products of p×p matrices, A² included (m = 2, the usual degree of an Adam step in fp32:
    A² alone). ‖A²‖_F^½ is consulted only when ‖A‖_F asks for m > 2 (at m = 2 a lower degree would
    save no product). One or two host syncs (the degree); under torch.compile, None (no
    data-dependent branch).
    """
    if torch.compiler.is_compiling() or s.numel() == 0:
        return None
    c, a, delta = _identity_offset(s)
    m = _series_degree(float(delta.max()), s.dtype)
    a2 = None if m is not None and m < 2 else a @ a
    if m is None or m > 2:
        delta = torch.minimum(delta, torch.linalg.matrix_norm(a2).sqrt())
        m = _series_degree(float(delta.max()), s.dtype)
        if m is None:
            return None
    coef = _binomial_inv_sqrt(m)

    def pair(j):  # c_2j I + c_2j+1 A
        out = coef[2 * j + 1] * a
        out.diagonal(dim1=-2, dim2=-1).add_(coef[2 * j])
        return out

    if m == 0:
        k = _eye_like(a).expand_as(a).clone()
    elif m % 2:  # (c_(m−1) I + c_m A) on top
        k = pair(m // 2)
        for j in range(m // 2 - 1, -1, -1):
            k = a2 @ k
            k += pair(j)
    else:  # c_m I on top: A²·c_m I = c_m A², no product
        k = coef[m] * a2
        k += pair(m // 2 - 1)
        for j in range(m // 2 - 2, -1, -1):
            k = a2 @ k
            k += pair(j)
    return k.mul_(c.rsqrt())


def _polar_via_gram(y: Tensor, s: Tensor | None = None, *, rows: Rows = LOCAL) -> Tensor:
    """Polar factor Y (YᵀY)^(−1/2) of a full-rank tall Y. ``s``: the Gram YᵀY when the caller has it.

    Near the manifold (the retraction of a tangent step: YᵀY = I + VᵀV), Y·K with K the certified
    matmul-only series of :func:`_inv_sqrt_near_identity`: two n×p products in all (Gram and Y·K).
    Otherwise through a p×p eigh, refined by one Newton–Schulz step, which squares the residual
    ‖YᵀY − I‖ left by the fp32 eigh of the Gram matrix (:func:`_polar_via_eigh`). Row-sharded
    (:mod:`stiefel_opt.distributed`) always the eigh route, so that a step's communication (its
    all-reduced Grams) does not depend on the data.
    """
    s = gram(y, y, rows=rows) if s is None else s
    k = None if rows.sharded else _inv_sqrt_near_identity(s)
    if k is None:
        return _polar_via_eigh(y, s, rows=rows)
    return y @ k


def _polar_via_eigh(y: Tensor, s: Tensor, *, rows: Rows = LOCAL) -> Tensor:
    """Y S^(−1/2) by a p×p eigh of the Gram S = YᵀY, then one Newton–Schulz step on the n×p result."""
    return _newton_schulz_step(y @ _inv_sqrt_psd(s), rows=rows)


def _newton_schulz_step(y: Tensor, *, rows: Rows = LOCAL) -> Tensor:
    """One step of the Newton–Schulz polar iteration Y ← Y (3I − YᵀY)/2."""
    g = gram(y, y, rows=rows)
    return y @ (1.5 * _eye_like(g) - 0.5 * g)


def _feasibility_tolerance(p: int, dtype: torch.dtype) -> float:
    """τ = 8√p·ε_mach of ``dtype``: the distance ‖YᵀY − I‖_F beyond which a retraction's result is
    re-orthonormalized (fp32: 1.6e-6 at p = 3, 1.1e-5 at p = 128; fp64 ~1e-14). About ten times
    what a polar factor computed in ``dtype`` is left with."""
    return 8.0 * p**0.5 * torch.finfo(dtype).eps


def _reorthonormalize_far(y: Tensor, *, rows: Rows = LOCAL) -> Tensor:
    """Per matrix of a tall batch: Y ← Y(YᵀY)^(−1/2) (:func:`_polar_via_eigh`) when
    d = ‖YᵀY − I‖_F > τ (:func:`_feasibility_tolerance`); Y unchanged when d ≤ τ or Y is not finite.

    The retractions that are not exact by construction (cayley, exp, newton_schulz) end with it:
    they carry the rounding error of X from step to step (the Euclidean exp amplifies it
    geometrically). One p×p Gram, reused by the polar factor: O(np²); a torch.where over the
    batch, no host sync."""
    s = gram(y, y, rows=rows)
    eye = _eye_like(s)
    d = torch.linalg.matrix_norm(s - eye)
    far = ((d > _feasibility_tolerance(y.shape[-1], y.dtype)) & torch.isfinite(d))[..., None, None]
    return torch.where(far, _polar_via_eigh(y, torch.where(far, s, eye), rows=rows), y)


@_tall(2)
def retract_polar(x: Tensor, v: Tensor, *, rows: Rows = LOCAL) -> Tensor:
    """Polar retraction R_X(V) = (X + V)(I + VᵀV)^(−1/2) = polar factor of X + V (p×p eigh)."""
    return _polar_via_gram(x + v, rows=rows)


def _sign_fixed_qr(y: Tensor) -> Tensor:
    q, r = torch.linalg.qr(y)
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    sign = torch.where(d < 0, -1.0, 1.0).to(q.dtype)
    return q * sign.unsqueeze(-2)


def _qr_near_identity(y: Tensor) -> Tensor | None:
    """Q = Y R⁻¹ with R = chol(YᵀY) (one CholeskyQR pass) when every YᵀY is within δ ≤ ½ of a
    multiple of I (:func:`_identity_offset`), so κ(Y)² ≤ 3 and the pass loses at most a few ε_mach
    of orthogonality; None otherwise (or when a Cholesky fails, or under torch.compile). Equal in
    exact arithmetic to the sign-fixed Householder Q (both have diag(R) > 0). One Gram and, for
    n ≥ 2p, a p×p triangular inverse and one product (else a triangular solve on Y): O(np²), against
    the Householder QR's less efficient 4np²."""
    if torch.compiler.is_compiling() or y.numel() == 0:
        return None
    s = gram(y, y)
    delta = _identity_offset(s)[2]
    r, info = torch.linalg.cholesky_ex(s, upper=True)
    if not bool(((delta <= 0.5) & (info == 0)).all()):
        return None
    n, p = y.shape[-2:]
    if n >= 2 * p:
        return y @ torch.linalg.solve_triangular(r, _eye_like(s).expand_as(s), upper=True)
    return torch.linalg.solve_triangular(r, y, upper=True, left=False)


@_tall(2)
def retract_qr(x: Tensor, v: Tensor, *, rows: Rows = LOCAL) -> Tensor:
    """QR retraction: the Q factor of X + V with diag(R) > 0 (row-sharded: :func:`cholesky_qr`).

    Near the manifold one CholeskyQR pass (:func:`_qr_near_identity`), else Householder QR."""
    if rows.sharded:
        return cholesky_qr(x + v, rows=rows)
    y = x + v
    q = _qr_near_identity(y)
    return _sign_fixed_qr(y) if q is None else q


@_tall(1)
def cholesky_qr(y: Tensor, *, rows: Rows = LOCAL) -> Tensor:
    """Q factor of a full-rank tall Y with diag(R) > 0 from its Gram matrix alone (CholeskyQR2).

    R₁ = chol(YᵀY)ᵀ, Q₁ = Y R₁⁻¹, then once more on Q₁ (which squares away the κ(Y)²·ε loss of
    orthogonality of one pass): Q = Q₁ R₂⁻¹. Equal to the sign-fixed Householder Q in exact
    arithmetic; only p×p Grams of Y, so it runs on row shards (one all-reduce per pass). Needs
    κ(Y) ≲ ε^(−1/2), which holds for Y = X + V near the manifold.
    """
    for _ in range(2):
        r = torch.linalg.cholesky(gram(y, y, rows=rows), upper=True)
        y = torch.linalg.solve_triangular(r, y, upper=True, left=False)
    return y


@_tall(2)
def retract_cayley(x: Tensor, v: Tensor, *, rows: Rows = LOCAL) -> Tensor:
    """Cayley retraction Y = (I − W/2)⁻¹(I + W/2) X with W = P Xᵀ − X Pᵀ, P = (I − XXᵀ/2) V.

    W X = V for tangent V. With W = L Rᵀ, L = [P, X], R = [X, −P] (n×2p), the Woodbury identity
    gives Y = X + L (I − RᵀL/2)⁻¹ RᵀX: one 2p×2p solve, never an n×n matrix (Wen & Yin 2013).
    Y keeps X's distance to the manifold: :func:`_reorthonormalize_far` removes it past τ.
    """
    p_ = v - 0.5 * x @ gram(x, v, rows=rows)
    left = torch.cat([p_, x], dim=-1)
    right = torch.cat([x, -p_], dim=-1)
    rl = gram(right, left, rows=rows)
    eye = _eye_like(rl)
    rhs = gram(right, x, rows=rows)
    return _reorthonormalize_far(x + left @ torch.linalg.solve(eye - 0.5 * rl, rhs), rows=rows)


def retract_exp(x: Tensor, v: Tensor, metric="euclidean", *, rows: Rows = LOCAL) -> Tensor:
    """Exponential map (geodesic) of Edelman, Arias & Smith (1998), O(np²) via 2p×2p expm: the
    metric's :meth:`~stiefel_opt.functional.stiefel.Metric.geodesic` (a name or a strategy).

    euclidean: Y = [X, V] expm([[A, −S], [I, A]])[:, :p] expm(−A), A = XᵀV, S = VᵀV.
    canonical: QR = (I − XXᵀ)V, Y = [X, Q] expm([[A, −Rᵀ], [R, 0]])[:, :p].
    Then :func:`_reorthonormalize_far`: Y carries (euclidean: amplifies) X's rounding error.
    """
    return as_metric(metric).geodesic(x, v, rows=rows)


@_tall(1)
def newton_schulz(y: Tensor, steps: int = 8, *, rows: Rows = LOCAL) -> Tensor:
    """Polar factor by the matmul-only Newton–Schulz iteration Y ← Y (3I − YᵀY)/2.

    Y is first scaled by 1/√‖YᵀY‖_F (when that exceeds 1) so that ‖Y‖₂ ≤ 1 < √3, which the
    iteration needs to converge; near-orthonormal Y converges quadratically.
    """
    g = gram(y, y, rows=rows)
    scale = torch.linalg.matrix_norm(g).clamp_min(1.0).rsqrt()
    y = y * scale[..., None, None]
    for _ in range(steps):
        y = _newton_schulz_step(y, rows=rows)
    return y


@_tall(2)
def retract_newton_schulz(x: Tensor, v: Tensor, steps: int = 8, *, rows: Rows = LOCAL) -> Tensor:
    """Polar retraction computed by Newton–Schulz: polar factor of X + V, matmuls only (finished
    by :func:`_reorthonormalize_far` when ``steps`` iterations left it farther than τ)."""
    return _reorthonormalize_far(newton_schulz(x + v, steps, rows=rows), rows=rows)


RETRACTIONS = {
    "polar": retract_polar,
    "qr": retract_qr,
    "cayley": retract_cayley,
    "exp": retract_exp,
    "newton_schulz": retract_newton_schulz,
}
"""Retraction name → function R_X(V), the names :func:`retract` (and every ``retraction=`` option)
accepts; ``exp`` is the euclidean-metric geodesic here, :func:`retract` passes the metric."""


def retract(x: Tensor, v: Tensor, method: str = "polar", metric="euclidean", *, rows: Rows = LOCAL) -> Tensor:
    """R_X(V) by name: one of ``polar``, ``qr``, ``cayley``, ``exp`` or ``newton_schulz``.

    For finite X and V with X + V of full rank, every result has ‖YᵀY − I‖_F ≤ τ = 8√p·ε_mach of
    the compute dtype (bf16/fp16 results are then rounded): polar and qr by construction, the
    others through :func:`_reorthonormalize_far`. ``metric`` (a name or a strategy) matters for
    ``exp`` only."""
    if method == "exp":
        return retract_exp(x, v, metric, rows=rows)
    try:
        fn = RETRACTIONS[method]
    except KeyError:
        raise ValueError(f"retraction must be one of {tuple(RETRACTIONS)}, got {method!r}") from None
    return fn(x, v, rows=rows)
