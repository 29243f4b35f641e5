"""Pure tensor functions for the Stiefel manifold St(n, p) = {X ∈ R^{n×p} : XᵀX = I}.

Every function is batched over leading dimensions and never forms an n×n matrix: the costly
work is an n×p by p×p product or a p×p (2p×2p) factorization, O(np²) in all.

Conventions
- A *tall or square* matrix (n ≥ p) lives on St(n, p): orthonormal columns.
- A *wide* matrix (n < p) means orthonormal rows; every function transposes it, works on the
  tall form and transposes the result back.
- Low-precision inputs (bf16/fp16) are computed in fp32 and cast back to the input dtype.

This module is the one place where the manifold math lives; optimizers, manifolds, kernels and
adapters call it.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect

import torch
from torch import Tensor

__all__ = [
    "sym",
    "skew",
    "is_wide",
    "gram_identity_gap",
    "distance",
    "proj_tangent",
    "canonical_rgrad",
    "egrad2rgrad",
    "inner",
    "transport",
    "retract",
    "retract_polar",
    "retract_qr",
    "retract_cayley",
    "retract_exp",
    "newton_schulz",
    "retract_newton_schulz",
    "project",
    "landing_field",
    "safe_step",
    "landing_coefficients",
    "polar_coefficients",
    "frobenius_from_gram",
    "combination_gram",
    "landing_plan",
    "adam_bias_corrections",
    "rgrad_coefficient",
    "transport_coefficient",
    "random_point",
    "gram",
    "cholesky_qr",
    "relative_tangent",
    "riemannian_sgd_update",
    "riemannian_adam_update",
    "landing_sgd_update",
    "landing_adam_update",
    "rite_basis",
    "rite_unmagnified_gram",
    "rite_transport",
    "rite_escaped_mass",
    "rite_inv_root",
    "rite_first_moment",
    "rite_update",
    "RETRACTIONS",
    "METRICS",
]

METRICS = ("euclidean", "canonical")
"""The metrics every ``metric=`` argument accepts: euclidean ⟨U, V⟩ = tr(UᵀV), canonical
tr(UᵀV) − ½ tr(UᵀX XᵀV) (see :func:`inner`)."""

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


#: The active row-sharded reduction (set by :func:`stiefel_opt.distributed.row_sharded`), else None.
#: Inside it every matrix argument is the local row block of a tall matrix whose rows are split
#: over processes: the n-row Gram products AᵀB are summed over the shards (:func:`gram`), and so
#: are the Frobenius norms and means of n-row matrices; every other operation is row-local.
_ROW_REDUCE: contextvars.ContextVar = contextvars.ContextVar("stiefel_opt_row_reduce", default=None)


_ROW_REDUCE_DEPTH = 0  # active row-sharded reductions in this process: what torch.compile reads


@contextlib.contextmanager
def _row_reduction(reduce):
    """Make ``reduce`` the active row-sharded reduction inside the block."""
    global _ROW_REDUCE_DEPTH
    token = _ROW_REDUCE.set(reduce)
    _ROW_REDUCE_DEPTH += 1
    try:
        yield
    finally:
        _ROW_REDUCE_DEPTH -= 1
        _ROW_REDUCE.reset(token)


def _row_reduce():
    """The active row-sharded reduction, else None. torch.compile cannot trace a ContextVar: a
    compiled call reads the process-wide depth instead (guarded, so a change recompiles) and
    refuses to run sharded."""
    if torch.compiler.is_compiling():
        if _ROW_REDUCE_DEPTH:
            raise NotImplementedError(
                "row-sharded (FSDP2) Stiefel steps do not run inside torch.compile: compile the "
                "forward and backward, and call optimizer.step() outside the compiled region"
            )
        return None
    return _ROW_REDUCE.get()


def is_wide(x: Tensor) -> bool:
    """True when the matrix has fewer rows than columns (orthonormal rows are meant).

    Always False inside a row-sharded reduction: the local row block of a tall matrix may be wide."""
    return x.shape[-2] < x.shape[-1] and _row_reduce() is None


def gram(a: Tensor, b: Tensor) -> Tensor:
    """AᵀB over the last two dims (p×q for n×p A and n×q B): the one place for n-row products.

    Inside a row-sharded reduction (:mod:`stiefel_opt.distributed`) A and B are local row blocks
    and the result is Σ_shards A_kᵀB_k, one all-reduce of the p×q matrix."""
    out = a.transpose(-1, -2) @ b
    red = _row_reduce()
    return out if red is None else red.sum(out)


def _frobenius(a: Tensor) -> Tensor:
    """‖A‖_F per matrix; under a row-sharded reduction √(Σ_shards ‖A_k‖²_F) (one value per matrix)."""
    red = _row_reduce()
    if red is None:
        return torch.linalg.matrix_norm(a)
    return red.sum(a.square().sum(dim=(-2, -1))).sqrt()


def _mean_square(a: Tensor) -> Tensor:
    """mean(A²) per matrix, shape (…, 1, 1); under a row-sharded reduction over all rows of all shards."""
    red = _row_reduce()
    if red is None:
        return (a * a).mean(dim=(-2, -1), keepdim=True)
    return red.sum(a.square().sum(dim=(-2, -1), keepdim=True)) / (red.rows * a.shape[-1])


def _mT(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.transpose(-1, -2)


def _check_matrices(where: str, names, mats) -> None:
    """TypeError/ValueError naming the argument unless every matrix argument is a floating-point
    tensor with at least 2 dims and the matrix shape (last two dims) of the first; None is skipped."""
    first = mats[0]
    for name, a in zip(names, mats):
        if a is None:
            continue
        if not isinstance(a, Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(a).__name__}")
        if not a.is_floating_point():
            raise TypeError(f"{where}: {name} must be a floating-point tensor, got {a.dtype}")
        if a.dim() < 2:
            raise ValueError(
                f"{where}: expected {name} to be a matrix or a batch of matrices, got a tensor of "
                f"shape {tuple(a.shape)}"
            )
        if a.shape[-2:] != first.shape[-2:]:
            raise ValueError(
                f"{where}: {name} has shape {tuple(a.shape)}, but its matrices must match those of "
                f"{names[0]} {tuple(first.shape)}"
            )


def _tall(n_matrix_args: int, returns_matrix: bool = True):
    """Decorator: upcast low precision to fp32 and work on the tall form of the first argument.

    The first ``n_matrix_args`` positional arguments are matrices of the same shape; when the
    first is wide, all are transposed, and (if ``returns_matrix``) so is the result. Results
    that are matrices are cast back to the input dtype.
    """

    def wrap(fn):
        names = list(inspect.signature(fn).parameters)[:n_matrix_args]

        @functools.wraps(fn)
        def inner_fn(*args, **kwargs):
            x = args[0]
            _check_matrices(fn.__name__, names, args[:n_matrix_args])
            dtype = x.dtype
            cdtype = _compute_dtype(dtype)
            mats = [a if a is None else a.to(cdtype) for a in args[:n_matrix_args]]
            wide = is_wide(x)
            if wide:
                mats = [_mT(a) for a in mats]
            out = fn(*mats, *args[n_matrix_args:], **kwargs)
            if not returns_matrix:
                return out
            if wide:
                out = _mT(out)
            return out.to(dtype)

        return inner_fn

    return wrap


def sym(a: Tensor) -> Tensor:
    """sym(A) = (A + Aᵀ)/2 over the last two dims."""
    return 0.5 * (a + a.transpose(-1, -2))


def skew(a: Tensor) -> Tensor:
    """skew(A) = (A − Aᵀ)/2 over the last two dims."""
    return 0.5 * (a - a.transpose(-1, -2))


def _eye_like(g: Tensor) -> Tensor:
    return torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)


@_tall(1, returns_matrix=False)
def gram_identity_gap(x: Tensor) -> Tensor:
    """XᵀX − I (p×p, in the compute dtype), for tall X or the row form of a wide one."""
    g = gram(x, x)
    return g - _eye_like(g)


def distance(x: Tensor) -> Tensor:
    """Distance to the manifold d(X) = ‖XᵀX − I‖_F, one value per matrix (fp32 for low precision)."""
    return torch.linalg.matrix_norm(gram_identity_gap(x))


@_tall(2)
def proj_tangent(x: Tensor, u: Tensor) -> Tensor:
    """Euclidean-metric tangent projection P_X(U) = U − X sym(XᵀU)."""
    return _bmm_add(u, x, _twice_sym(gram(x, u)), alpha=-0.5)


def _twice_sym(a: Tensor) -> Tensor:
    """A + Aᵀ = 2 sym(A) in one pass (the ½ folded into the product that uses it)."""
    return a + a.transpose(-1, -2)


@_tall(2)
def canonical_rgrad(x: Tensor, g: Tensor) -> Tensor:
    """Canonical-metric Riemannian gradient G − X GᵀX."""
    return _bmm_add(g, x, gram(g, x), alpha=-1.0)


def egrad2rgrad(x: Tensor, g: Tensor, metric: str = "euclidean") -> Tensor:
    """Riemannian gradient of the Euclidean gradient G for the chosen metric."""
    if metric == "euclidean":
        return proj_tangent(x, g)
    if metric == "canonical":
        return canonical_rgrad(x, g)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def inner(x: Tensor, u: Tensor, v: Tensor, metric: str = "euclidean", keepdim: bool = False) -> Tensor:
    """Metric at X: ⟨U, V⟩ = tr(UᵀV) (euclidean) or tr(UᵀV) − ½ tr(UᵀX XᵀV) (canonical)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    _check_matrices("inner", ("x", "u", "v"), (x, u, v))
    dtype = x.dtype
    if dtype in _LOW_PRECISION:
        x, u, v = x.float(), u.float(), v.float()
    if is_wide(x):
        x, u, v = _mT(x), _mT(u), _mT(v)
    out = (u * v).sum(dim=(-1, -2), keepdim=keepdim)
    if metric == "canonical":
        xu = x.transpose(-1, -2) @ u
        xv = x.transpose(-1, -2) @ v
        out = out - 0.5 * (xu * xv).sum(dim=(-1, -2), keepdim=keepdim)
    return out.to(dtype)


def transport(y: Tensor, v: Tensor) -> Tensor:
    """Vector transport by projection onto the tangent space at the new point Y."""
    return proj_tangent(y, v)


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
    """(c, A, δ) for a batch of symmetric S: c = tr(S)/p (shape …×1×1), A = S/c − I and
    δ = ‖A‖_F ≥ ‖A‖₂ per matrix (+inf where c ≤ 0 or S is not finite)."""
    c = torch.diagonal(s, dim1=-2, dim2=-1).mean(-1)[..., None, None]
    a = s / c
    a.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    delta = torch.linalg.matrix_norm(a)
    return c, a, torch.where((c > 0).reshape(delta.shape), delta, torch.inf)  # also NaN


def _inv_sqrt_near_identity(s: Tensor) -> Tensor | None:
    """S^(−1/2) of a batch of symmetric p×p matrices near a multiple of I, by matmuls only; None
    when it cannot be certified (then the caller takes the ``eigh`` route).

    With c = tr(S)/p and A = S/c − I (per matrix), S^(−1/2) = c^(−1/2) Σ_k c_k A^k, the binomial
    series truncated at the degree m of :func:`_series_degree` for δ, the largest over the batch of
    min(‖A‖_F, ‖A²‖_F^½) ≥ ‖A‖₂ (A symmetric): every eigenvalue of the result is then within
    ε_mach/4 (relative) of the exact one. Summed as Σ_j (c_2j I + c_2j+1 A)(A²)^j (Horner in A²):
    ⌊m/2⌋ products of p×p matrices, A² included (m = 2, the usual degree of an Adam step in fp32:
    A² alone). One or two host syncs (the degree); under torch.compile, None (no data-dependent
    branch).
    """
    if torch.compiler.is_compiling() or s.numel() == 0:
        return None
    c, a, delta = _identity_offset(s)
    m = _series_degree(float(delta.max()), s.dtype)
    a2 = None
    if m is None or m >= 2:
        a2 = a @ a
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


def _polar_via_gram(y: Tensor, s: Tensor | None = None) -> Tensor:
    """Polar factor Y (YᵀY)^(−1/2) of a full-rank tall Y. ``s``: the Gram YᵀY when the caller has it.

    Near the manifold (the retraction of a tangent step: YᵀY = I + VᵀV), Y·K with K the certified
    matmul-only series of :func:`_inv_sqrt_near_identity`: two n×p products in all (Gram and Y·K).
    Otherwise through a p×p eigh, refined by one Newton–Schulz step, which squares the residual
    ‖YᵀY − I‖ left by the fp32 eigh of the Gram matrix (:func:`_polar_via_eigh`). Row-sharded
    (:mod:`stiefel_opt.distributed`) always the eigh route, so that a step's communication (its
    all-reduced Grams) does not depend on the data.
    """
    s = gram(y, y) if s is None else s
    k = None if _row_reduce() is not None else _inv_sqrt_near_identity(s)
    if k is None:
        return _polar_via_eigh(y, s)
    return y @ k


def _polar_via_eigh(y: Tensor, s: Tensor) -> Tensor:
    """Y S^(−1/2) by a p×p eigh of the Gram S = YᵀY, then one Newton–Schulz step on the n×p result."""
    return _newton_schulz_step(y @ _inv_sqrt_psd(s))


def _newton_schulz_step(y: Tensor) -> Tensor:
    """One step of the Newton–Schulz polar iteration Y ← Y (3I − YᵀY)/2."""
    g = gram(y, y)
    return y @ (1.5 * _eye_like(g) - 0.5 * g)


def _feasibility_tolerance(p: int, dtype: torch.dtype) -> float:
    """τ = 8√p·ε_mach of ``dtype``: the distance ‖YᵀY − I‖_F beyond which a retraction's result is
    re-orthonormalized (fp32: 1.6e-6 at p = 3, 1.1e-5 at p = 128; fp64 ~1e-14). About ten times
    what a polar factor computed in ``dtype`` is left with."""
    return 8.0 * p**0.5 * torch.finfo(dtype).eps


def _reorthonormalize_far(y: Tensor) -> Tensor:
    """Per matrix of a tall batch: Y ← Y(YᵀY)^(−1/2) (:func:`_polar_via_eigh`) when
    d = ‖YᵀY − I‖_F > τ (:func:`_feasibility_tolerance`); Y unchanged when d ≤ τ or Y is not finite.

    The retractions that are not exact by construction (cayley, exp, newton_schulz) end with it:
    they carry the rounding error of X from step to step (the Euclidean exp amplifies it
    geometrically). One p×p Gram, reused by the polar factor: O(np²); a torch.where over the
    batch, no host sync."""
    s = gram(y, y)
    eye = _eye_like(s)
    d = torch.linalg.matrix_norm(s - eye)
    far = ((d > _feasibility_tolerance(y.shape[-1], y.dtype)) & torch.isfinite(d))[..., None, None]
    return torch.where(far, _polar_via_eigh(y, torch.where(far, s, eye)), y)


@_tall(2)
def retract_polar(x: Tensor, v: Tensor) -> Tensor:
    """Polar retraction R_X(V) = (X + V)(I + VᵀV)^(−1/2) = polar factor of X + V (p×p eigh)."""
    return _polar_via_gram(x + v)


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
def retract_qr(x: Tensor, v: Tensor) -> Tensor:
    """QR retraction: the Q factor of X + V with diag(R) > 0 (row-sharded: :func:`cholesky_qr`).

    Near the manifold one CholeskyQR pass (:func:`_qr_near_identity`), else Householder QR."""
    if _row_reduce() is not None:
        return cholesky_qr(x + v)
    y = x + v
    q = _qr_near_identity(y)
    return _sign_fixed_qr(y) if q is None else q


@_tall(2)
def retract_cayley(x: Tensor, v: Tensor) -> Tensor:
    """Cayley retraction Y = (I − W/2)⁻¹(I + W/2) X with W = P Xᵀ − X Pᵀ, P = (I − XXᵀ/2) V.

    W X = V for tangent V. With W = L Rᵀ, L = [P, X], R = [X, −P] (n×2p), the Woodbury identity
    gives Y = X + L (I − RᵀL/2)⁻¹ RᵀX: one 2p×2p solve, never an n×n matrix (Wen & Yin 2013).
    Y keeps X's distance to the manifold: :func:`_reorthonormalize_far` removes it past τ.
    """
    p_ = v - 0.5 * x @ gram(x, v)
    left = torch.cat([p_, x], dim=-1)
    right = torch.cat([x, -p_], dim=-1)
    rl = gram(right, left)
    eye = _eye_like(rl)
    rhs = gram(right, x)
    return _reorthonormalize_far(x + left @ torch.linalg.solve(eye - 0.5 * rl, rhs))


@_tall(2)
def _retract_exp_euclidean(x: Tensor, v: Tensor) -> Tensor:
    a = gram(x, v)
    s = gram(v, v)
    eye = _eye_like(a).expand_as(a)
    block = torch.cat(
        [torch.cat([a, -s], dim=-1), torch.cat([eye, a], dim=-1)],
        dim=-2,
    )
    e = torch.linalg.matrix_exp(block)[..., :, : a.shape[-1]]
    return _reorthonormalize_far(torch.cat([x, v], dim=-1) @ e @ torch.linalg.matrix_exp(-a))


@_tall(2)
def _retract_exp_canonical(x: Tensor, v: Tensor) -> Tensor:
    if _row_reduce() is not None:
        raise ValueError(
            "retract_exp: the canonical-metric geodesic needs a QR of the whole (I − XXᵀ)V and cannot "
            "run on row shards; use retraction 'polar', 'newton_schulz', 'qr', 'cayley' or metric='euclidean'"
        )
    a = x.transpose(-1, -2) @ v
    a = skew(a)
    q, r = torch.linalg.qr(v - x @ a)
    zero = torch.zeros_like(a)
    block = torch.cat(
        [torch.cat([a, -r.transpose(-1, -2)], dim=-1), torch.cat([r, zero], dim=-1)],
        dim=-2,
    )
    e = torch.linalg.matrix_exp(block)[..., :, : a.shape[-1]]
    return _reorthonormalize_far(torch.cat([x, q], dim=-1) @ e)


def retract_exp(x: Tensor, v: Tensor, metric: str = "euclidean") -> Tensor:
    """Exponential map (geodesic) of Edelman, Arias & Smith (1998), O(np²) via 2p×2p expm.

    euclidean: Y = [X, V] expm([[A, −S], [I, A]])[:, :p] expm(−A), A = XᵀV, S = VᵀV.
    canonical: QR = (I − XXᵀ)V, Y = [X, Q] expm([[A, −Rᵀ], [R, 0]])[:, :p].
    Then :func:`_reorthonormalize_far`: Y carries (euclidean: amplifies) X's rounding error.
    """
    if metric == "euclidean":
        return _retract_exp_euclidean(x, v)
    if metric == "canonical":
        return _retract_exp_canonical(x, v)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


@_tall(1)
def newton_schulz(y: Tensor, steps: int = 8) -> Tensor:
    """Polar factor by the matmul-only Newton–Schulz iteration Y ← Y (3I − YᵀY)/2.

    Y is first scaled by 1/√‖YᵀY‖_F (when that exceeds 1) so that ‖Y‖₂ ≤ 1 < √3, which the
    iteration needs to converge; near-orthonormal Y converges quadratically.
    """
    g = gram(y, y)
    scale = torch.linalg.matrix_norm(g).clamp_min(1.0).rsqrt()
    y = y * scale[..., None, None]
    for _ in range(steps):
        y = _newton_schulz_step(y)
    return y


@_tall(2)
def retract_newton_schulz(x: Tensor, v: Tensor, steps: int = 8) -> Tensor:
    """Polar retraction computed by Newton–Schulz: polar factor of X + V, matmuls only (finished
    by :func:`_reorthonormalize_far` when ``steps`` iterations left it farther than τ)."""
    return _reorthonormalize_far(newton_schulz(x + v, steps))


RETRACTIONS = {
    "polar": retract_polar,
    "qr": retract_qr,
    "cayley": retract_cayley,
    "exp": retract_exp,
    "newton_schulz": retract_newton_schulz,
}
"""Retraction name → function R_X(V), the names :func:`retract` (and every ``retraction=`` option)
accepts; ``exp`` is the euclidean-metric geodesic here, :func:`retract` passes the metric."""


def retract(x: Tensor, v: Tensor, method: str = "polar", metric: str = "euclidean") -> Tensor:
    """R_X(V) by name: one of ``polar``, ``qr``, ``cayley``, ``exp`` or ``newton_schulz``.

    For finite X and V with X + V of full rank, every result has ‖YᵀY − I‖_F ≤ τ = 8√p·ε_mach of
    the compute dtype (bf16/fp16 results are then rounded): polar and qr by construction, the
    others through :func:`_reorthonormalize_far`."""
    if method == "exp":
        return retract_exp(x, v, metric)
    try:
        fn = RETRACTIONS[method]
    except KeyError:
        raise ValueError(f"retraction must be one of {tuple(RETRACTIONS)}, got {method!r}") from None
    return fn(x, v)


@_tall(1)
def project(x: Tensor, rtol: float | None = None) -> Tensor:
    """Nearest point of the manifold: the polar factor U Vᵀ of the thin SVD X = U Σ Vᵀ.

    Raises ``ValueError`` when X is (numerically) rank deficient, σ_min ≤ rtol · σ_max, where
    the nearest orthonormal matrix is not unique.
    """
    if not torch.isfinite(x).all():
        raise ValueError("project: the matrix has non-finite entries")
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    if rtol is None:
        rtol = max(x.shape[-2:]) * torch.finfo(x.dtype).eps
    deficient = s[..., -1] <= rtol * s[..., 0]
    if bool(deficient.any()):
        raise ValueError(
            f"project: a {tuple(x.shape[-2:])} matrix is rank deficient (smallest/largest singular "
            f"value {float((s[..., -1] / s[..., 0].clamp_min(torch.finfo(s.dtype).tiny)).min()):.2e}); its nearest "
            "orthonormal matrix is not unique. Use init='random' or pass a full-rank matrix."
        )
    return u @ vh


@_tall(2)
def landing_field(x: Tensor, g: Tensor, lam: float = 1.0) -> Tensor:
    """Landing field Λ(X) = ½(G·XᵀX − X·GᵀX) + λ X(XᵀX − I)  (Ablin et al.; = skew(GXᵀ)X + λ∇N).

    Thin X: the p×p Grams XᵀX, GᵀX and Λ = G·C_G + X·C_X (:func:`landing_coefficients`); G Xᵀ (n×n)
    is never formed. Nearly square X (:func:`_landing_association`): skew(G Xᵀ)X, cheaper there.
    """
    return _tangent_term(x, g, lam)[0]


#: Largest p for which the thin landing step never forms Λ (``"small"`` in :func:`_landing_association`).
_SMALL_P = 32


def _landing_association(n: int, p: int) -> str:
    """How the landing steps associate their products for a tall n×p X (n ≥ p), by cost:

    - ``"small"`` (p ≤ :data:`_SMALL_P`): p×p Grams XᵀX, GᵀX, DᵀX, DᵀD and X⁺ = X·K_X + D·K_D
      (:func:`landing_plan`), Λ never formed: 8np² multiply-adds a landing Adam step, and no pass
      over Λ, which costs more than its products at small p;
    - ``"thin"``: XᵀX, GᵀX, DᵀX, Λ = D·C_D + X·C_X formed (‖Λ‖_F and X − ηΛ in two passes): 7np²;
    - ``"square"`` (n = p): n×n products, Λ = (skew(DXᵀ) + λ(XXᵀ − I))X, 5n³
      (‖XXᵀ − I‖_F = ‖XᵀX − I‖_F for square X);
    - ``"mid"`` (p < n < 5p/4): skew(GXᵀ)X and skew(DXᵀ)X with XᵀX for the distance and the
      normal term, 4n²p + 2np² < 7np².
    Inside a row-sharded reduction always ``"thin"`` (an n×n product would need every shard's rows).
    """
    if _row_reduce() is not None or 4 * n >= 5 * p:
        return "small" if p <= _SMALL_P else "thin"
    return "square" if n == p else "mid"


def _tangent_term(x: Tensor, g: Tensor, lam: float = 0.0) -> tuple[Tensor, Tensor | None]:
    """(T + λX(XᵀX − I), XᵀX or None) for T = ½(G·XᵀX − X·GᵀX) = skew(G Xᵀ)X of a tall X
    (λ = 0: the tangent term alone), associated as :func:`_landing_association` says (XᵀX is
    returned on the Gram routes only)."""
    route = _landing_association(*x.shape[-2:])
    if route == "small":  # one Gram Xᵀ[X G] and one product [X G]·C: fewest calls at small p
        p = x.shape[-1]
        xg = torch.cat([x, g], dim=-1)
        s = gram(x, xg)
        c_g, c_x = landing_coefficients(s[..., :p], s[..., p:].transpose(-1, -2), lam)
        return xg @ torch.cat([c_x, c_g], dim=-2), s[..., :p]
    if route == "thin":  # no copy of [X G]: two Grams, G·C_G then += X·C_X in place
        xtx = gram(x, x)
        c_g, c_x = landing_coefficients(xtx, gram(g, x), lam)
        return _mm_add_(g @ c_g, x, c_x), xtx
    w = g @ x.transpose(-1, -2)
    w = w - w.transpose(-1, -2)  # 2 skew(G Xᵀ)
    if lam == 0:
        return _mm_scaled(w, x, 0.5), None  # skew(W)X, the ½ in the product
    if route == "square":  # + λ(XXᵀ − I)X = λX(XᵀX − I): the same product
        gap = x @ x.transpose(-1, -2)
        gap.diagonal(dim1=-2, dim2=-1).sub_(1.0)
        return _mm_scaled(w.add_(gap, alpha=2.0 * lam), x, 0.5), None
    gap = gram(x, x)
    gap.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    return _mm_add_(_mm_scaled(w, x, 0.5), x, gap, alpha=lam), None


def _mm_scaled(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """alpha·A B in one product (baddbmm/addmm with beta = 0: no pass to scale)."""
    if a.dim() == 2 and b.dim() == 2:
        return torch.addmm(a.new_zeros(()), a, b, beta=0.0, alpha=alpha)
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a3 = a.expand(*lead, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b3 = b.expand(*lead, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    out = torch.baddbmm(a3.new_zeros(()), a3, b3, beta=0.0, alpha=alpha)
    return out.reshape(*lead, a.shape[-2], b.shape[-1])


def _mm_add_(out: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """out ← out + alpha·A B in place (one baddbmm_ over flattened batch dims; ``out`` contiguous,
    freshly computed by the caller), returned."""
    if out.dim() == 2:
        return out.addmm_(a, b, alpha=alpha)
    lead = a.shape[:-2]
    out.view(-1, *out.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]),
                                           b.expand(*lead, *b.shape[-2:]).reshape(-1, *b.shape[-2:]), alpha=alpha)
    return out


def safe_step(d: Tensor, a: Tensor, lam: float, eps: float = 0.5) -> Tensor:
    """Largest step that keeps ‖XᵀX − I‖_F ≤ ε after X ← X − ηΛ (Ablin et al., Prop. 4).

    η* = min{ [λd(1−d) + √(λ²d²(1−d)² + a²·max(ε−d, 0))] / max(a², tiny), 1/(2λ) }
    with d = ‖XᵀX − I‖_F and a = ‖Λ‖_F, elementwise over batches. The 1/(2λ) cap and the
    clamp of ε − d at 0 are what keep d from blowing past ε.
    """
    if not 0.0 < eps < 1.0:
        raise ValueError(f"safe_step: eps must lie in (0, 1), got {eps}")
    if lam <= 0:
        raise ValueError(f"safe_step: lam must be > 0, got {lam}")
    lin = lam * d * (1.0 - d)
    a2 = a * a
    num = lin + torch.sqrt(lin * lin + a2 * (eps - d).clamp_min(0.0))
    eta = num / a2.clamp_min(torch.finfo(a2.dtype).tiny)
    return eta.clamp_max(1.0 / (2.0 * lam))


def landing_coefficients(xtx: Tensor, gtx: Tensor, lam: float = 1.0) -> tuple[Tensor, Tensor]:
    """p×p coefficients (C_G, C_X) of the landing field Λ = G·C_G + X·C_X from the Gram blocks:
    C_G = ½XᵀX, C_X = λ(XᵀX − I) − ½GᵀX (the two halves of C in :func:`landing_field`).

    For fused kernels that read [X G] once for the Gram blocks and once to apply C.
    """
    return 0.5 * xtx, lam * (xtx - _eye_like(xtx)) - 0.5 * gtx


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


def landing_plan(xtx: Tensor, c_a: Tensor, c_x: Tensor, aa: Tensor, xta: Tensor, *, lr: float,
                 lam: float, safe_eps: float) -> tuple[Tensor, Tensor]:
    """p×p (K_X, K_A) with X⁺ = X − ηΛ = X·K_X + A·K_A for Λ = A·C_A + X·C_X, from the Grams XᵀX,
    AᵀA, XᵀA: d = ‖XᵀX − I‖_F, a = ‖Λ‖_F (:func:`frobenius_from_gram`), the per-matrix
    η = min(lr, η*(d, a)) of :func:`safe_step`; K_X = I − ηC_X, K_A = −ηC_A."""
    eye = _eye_like(xtx)
    dist = torch.linalg.matrix_norm(xtx - eye)
    a = frobenius_from_gram(c_a, c_x, aa, xta, xtx)
    eta = safe_step(dist, a, lam, safe_eps).clamp_max(lr)[..., None, None]
    return eye - eta * c_x, -eta * c_a


def adam_bias_corrections(step, beta1: float, beta2: float) -> tuple:
    """Adam's bias corrections (1 − β1ᵗ, √(1 − β2ᵗ)) at step t (an int or a 0-d tensor)."""
    return 1.0 - beta1**step, (1.0 - beta2**step) ** 0.5


def rgrad_coefficient(gtx: Tensor, metric: str = "euclidean") -> Tensor:
    """p×p C with rgrad(X, G) = G + X·C from GᵀX: −sym(GᵀX) (euclidean, :func:`proj_tangent`) or
    −GᵀX (canonical, :func:`canonical_rgrad`)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return -(sym(gtx) if metric == "euclidean" else gtx)


def transport_coefficient(k: Tensor, ytm: Tensor) -> Tensor:
    """p×p J with P_{X⁺}(M) = M − Y·J for X⁺ = Y·K, from YᵀM: J = K·sym(KᵀYᵀM)
    (:func:`proj_tangent` at X⁺, written on p×p matrices)."""
    return k @ sym(k.transpose(-1, -2) @ ytm)


def frobenius_from_gram(c_a: Tensor, c_b: Tensor, aa: Tensor, ba: Tensor, bb: Tensor) -> Tensor:
    """‖A·C_A + B·C_B‖_F = √tr(:func:`combination_gram`) from p×p matrices only (clamped at 0
    against rounding), one value per matrix: the norm of a field such as Λ = D·C_D + X·C_X without
    a pass over it.
    """
    # tr(MᵀGM') = ⟨M, G·M'⟩: three p×p products instead of combination_gram's six
    sq = (c_a * (aa @ c_a)).sum((-2, -1)) + 2.0 * (c_b * (ba @ c_a)).sum((-2, -1)) + (c_b * (bb @ c_b)).sum((-2, -1))
    return sq.clamp_min(0.0).sqrt()


def random_point(*shape: int, dtype: torch.dtype | None = None, device=None, generator=None) -> Tensor:
    """A Haar-distributed point: sign-fixed Q factor of a Gaussian matrix (wide → orthonormal rows)."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    if len(shape) < 2:
        raise ValueError(f"random_point: need at least two dimensions, got shape {shape}")
    dtype = dtype or torch.get_default_dtype()
    g = torch.randn(*shape, dtype=_compute_dtype(dtype), device=device, generator=generator)
    wide = g.shape[-2] < g.shape[-1]
    if wide:
        g = _mT(g)
    q = _sign_fixed_qr(g)
    if wide:
        q = _mT(q)
    return q.contiguous().to(dtype)


@_tall(1)
def cholesky_qr(y: Tensor) -> Tensor:
    """Q factor of a full-rank tall Y with diag(R) > 0 from its Gram matrix alone (CholeskyQR2).

    R₁ = chol(YᵀY)ᵀ, Q₁ = Y R₁⁻¹, then once more on Q₁ (which squares away the κ(Y)²·ε loss of
    orthogonality of one pass): Q = Q₁ R₂⁻¹. Equal to the sign-fixed Householder Q in exact
    arithmetic; only p×p Grams of Y, so it runs on row shards (one all-reduce per pass). Needs
    κ(Y) ≲ ε^(−1/2), which holds for Y = X + V near the manifold.
    """
    for _ in range(2):
        r = torch.linalg.cholesky(gram(y, y), upper=True)
        y = torch.linalg.solve_triangular(r, y, upper=True, left=False)
    return y


# ---------------------------------------------------------------------------------------------
# LoRA-RITE (Yen et al., ICLR 2025, arXiv 2410.20625): per-factor step math.
#
# Both LoRA factors are written in their *tall* form, X ∈ R^{n×r} (the long dimension first):
# for ΔW = B A (PEFT: A is r×in, B is out×r) the factors are Aᵀ (in×r) and B (out×r), and
# ΔW = B (Aᵀ)ᵀ. For a factor X with partner Y = U R (thin QR), ∇_X = Ĝ Y with Ĝ = ∂L/∂ΔW or its
# transpose, and the *unmagnified gradient* is ḡ = ∇_X R⁺ (= Ĝ U for full-rank Y). No function
# below forms ḡ (n×r): only r×r matrices and one n×r product per moment are computed.
# Pass fp32 (or fp64) tensors; rite_basis upcasts low-precision factors itself.
# ---------------------------------------------------------------------------------------------


def rite_basis(y: Tensor, rtol: float | None = None) -> tuple[Tensor, Tensor]:
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
    if _row_reduce() is not None:
        return _rite_basis_gram(y, rtol)
    u, r = torch.linalg.qr(y)
    eye = _eye_like(r).expand_as(r)
    r_inv = torch.linalg.solve_triangular(r, eye, upper=True)
    cond = torch.linalg.matrix_norm(r) * torch.linalg.matrix_norm(r_inv)
    if bool((cond < 1.0 / rtol).all()):
        return u, r_inv
    return u, torch.linalg.pinv(r, rtol=rtol)


def _rite_basis_gram(y: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
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
    lam, q = torch.linalg.eigh(gram(y, y))
    lam, q = lam.flip(-1), q.flip(-1)
    sigma = lam.clamp_min(0.0).sqrt()
    keep = sigma > rtol * sigma[..., :1]
    r1_pinv = q * torch.where(keep, 1.0 / torch.where(keep, sigma, 1.0), 0.0).unsqueeze(-2)
    u1 = y @ r1_pinv
    g2 = gram(u1, u1)
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


def rite_unmagnified_gram(grad_x: Tensor, r_pinv_y: Tensor) -> Tensor:
    """ḡᵀḡ = R⁺ᵀ (∇_Xᵀ ∇_X) R⁺ (r×r), the Gram matrix of the unmagnified gradient ḡ = ∇_X R⁺.

    It is invariant under Y → Y S (S invertible) up to the rotation of the basis U. Non-finite
    entries of ∇_X show up on its diagonal.
    """
    gg = sym(gram(grad_x, grad_x))
    return sym(r_pinv_y.transpose(-1, -2) @ gg @ r_pinv_y)


def rite_transport(u_new: Tensor, u_old: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Basis change P = U_newᵀ U_old (r×r, ‖P‖₂ ≤ 1) and the transported second moment sym(P V Pᵀ).

    A statistic V (r×r) expressed in the old basis is expressed in the new one; a first moment M
    (n×r) moves as M Pᵀ (see :func:`rite_first_moment`). U_old = 0 (no history) gives P = 0.
    """
    p = gram(u_new, u_old)
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


def _bmm_add(c: Tensor | None, a: Tensor, b: Tensor, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    """beta·C + alpha·A B for batched (…×n×k)(…×k×r), through one baddbmm over flattened batch dims."""
    lead = a.shape[:-2]
    a3 = a.reshape(-1, *a.shape[-2:])
    b3 = b.expand(*lead, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    if c is None:
        return torch.bmm(a3, b3).mul_(alpha).reshape(*lead, a.shape[-2], b.shape[-1])
    c3 = c.reshape(-1, *c.shape[-2:])
    return torch.baddbmm(c3, a3, b3, beta=beta, alpha=alpha).reshape(c.shape)


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



# ---------------------------------------------------------------------------------------------
# Optimizer step math (stiefel_opt.optim calls these through its one dispatch table; a fused
# kernel must keep the same contract). Batched over leading dims; a wide X (orthonormal rows) is
# handled by transposing every matrix argument. Inputs are expected in the compute dtype (fp32
# for low-precision parameters: the optimizers keep fp32 masters and moments). Moment buffers are
# updated in place; the new point is returned. Adam conventions follow torch.optim.Adam:
# bc1 = 1 − β1ᵗ, bc2 = 1 − β2ᵗ, D = (m / bc1) / (√v / √bc2 + eps).
# ---------------------------------------------------------------------------------------------


def _tall_all(x: Tensor, *others: Tensor | None) -> tuple[bool, list[Tensor | None]]:
    wide = is_wide(x)
    mats = [x, *others]
    return wide, ([_mT(a) for a in mats] if wide else mats)


def _land(x: Tensor, u: Tensor, xtx: Tensor | None, scale: float, *, lr: float, lam: float,
          safe_eps: float) -> Tensor:
    """X⁺ = X − ηΛ for Λ = R(sU) + λX(XᵀX − I), R(V) = ½(V·XᵀX − X·VᵀX) = skew(V Xᵀ)X,
    s = ``scale``, η = min(lr, η*(d, ‖Λ‖_F)) per matrix (:func:`safe_step`), d = ‖XᵀX − I‖_F.
    ⟨R(V), X(XᵀX − I)⟩ = 0 for any V, which keeps the safe-step bound valid. ``xtx``: XᵀX from
    :func:`_tangent_term` (None on the n×n routes). Associated as :func:`_landing_association` says."""
    route = _landing_association(*x.shape[-2:])
    if route == "small":  # X⁺ = X·K_X + U·K_U from the Grams UᵀX, UᵀU (landing_plan)
        utx = gram(u, x)
        c_u, c_x = landing_coefficients(xtx, scale * utx, lam)
        k_x, k_u = landing_plan(xtx, scale * c_u, c_x, gram(u, u), utx.transpose(-1, -2), lr=lr, lam=lam,
                                safe_eps=safe_eps)
        return (x @ k_x).add_(u @ k_u)
    if route == "thin":
        # Λ = U·(½s XᵀX) + X·(λ(XᵀX − I) − ½s UᵀX) (landing_coefficients): two n×p-by-p×p products
        c_u, c_x = landing_coefficients(xtx, scale * gram(u, x), lam)
        gap = xtx - _eye_like(xtx)
        field = _mm_add_(u @ (scale * c_u), x, c_x)
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
        gap = gram(x, x)
        gap.diagonal(dim1=-2, dim2=-1).sub_(1.0)
        field = _bmm_add(skew(u @ x.transpose(-1, -2)).mul_(scale) @ x, x, gap, alpha=lam)
    eta = safe_step(torch.linalg.matrix_norm(gap), _frobenius(field), lam, safe_eps).clamp_max(lr)
    return torch.addcmul(x, eta[..., None, None], field, value=-1.0)


@_tall(2)
def relative_tangent(x: Tensor, g: Tensor) -> Tensor:
    """Tangent term of the landing field T = ½(G·XᵀX − X·GᵀX) = skew(G Xᵀ) X (n×n formed only
    for nearly square X, where it is cheaper: :func:`_landing_association`)."""
    return _tangent_term(x, g)[0]


def _retract_step(x: Tensor, d: Tensor, alpha: float, retraction: str, metric: str,
                  project: bool) -> Tensor:
    """R_X(α·V) with V = P_X(D) (``project``) or V = D (already tangent); D is left untouched.

    polar: Y = X + αP_X(D) = αD + X(I − α sym(XᵀD)) in one fused product, then the polar factor of Y
    (:func:`_polar_via_gram`: near the manifold two n×p products and a certified p×p series)."""
    if retraction == "polar":
        if project:
            b = _twice_sym(gram(x, d)).mul_(-0.5 * alpha)
            b.diagonal(dim1=-2, dim2=-1).add_(1.0)
            y = _bmm_add(d, x, b, beta=alpha)
        else:
            y = torch.add(x, d, alpha=alpha)
        return _polar_via_gram(y)
    v = proj_tangent(x, d) if project else d
    return retract(x, v * alpha, retraction, metric)


def _transport_(y: Tensor, m: Tensor) -> None:
    """M ← P_Y(M) = M − Y sym(YᵀM) in place (vector transport by projection onto the tangent space at Y)."""
    c = _twice_sym(gram(y, m))
    if m.is_contiguous():
        _mm_add_(m, y, c, alpha=-0.5)
    else:
        m.copy_(_bmm_add(m, y, c, alpha=-0.5))


def _adam_direction(exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Tensor | None, t: Tensor,
                    step: int, beta1: float, beta2: float, eps: float, scalar_v: bool) -> tuple[Tensor, float]:
    """Update the moments in place with t and return (D', s) with s·D' = (m/bc1) / (√v̂/√bc2 + eps):
    D' = m / (√v̂ + eps·√bc2) and s = √bc2/bc1, a scalar the caller folds into its p×p coefficients.

    scalar_v: v is one value per matrix (shape (…, 1, 1)), the EMA of mean(t²)."""
    exp_avg.lerp_(t, 1.0 - beta1)
    if scalar_v:
        exp_avg_sq.mul_(beta2).add_(_mean_square(t), alpha=1.0 - beta2)
    else:
        exp_avg_sq.mul_(beta2).addcmul_(t, t, value=1.0 - beta2)
    v = exp_avg_sq
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        v = max_exp_avg_sq
    bc1, bc2_sqrt = adam_bias_corrections(step, beta1, beta2)
    denom = v.sqrt().add_(eps * bc2_sqrt)
    d = exp_avg / denom if scalar_v else torch.div(exp_avg, denom, out=denom)  # no second n×p buffer
    return d, bc2_sqrt / bc1


def _momentum(t: Tensor, buf: Tensor | None, momentum: float, dampening: float,
              nesterov: bool) -> tuple[Tensor, Tensor | None]:
    """torch.optim.SGD's momentum on t: buf ← t (first step, buf None) or μ·buf + (1−dampening)·t;
    direction buf, or t + μ·buf with Nesterov. Returns (direction, buf)."""
    if momentum == 0:
        return t, buf
    if buf is None:
        buf = t.clone()
    else:
        buf.mul_(momentum).add_(t, alpha=1.0 - dampening)
    return (t.add(buf, alpha=momentum) if nesterov else buf), buf


def riemannian_sgd_update(x: Tensor, g: Tensor, buf: Tensor | None, *, lr: float, momentum: float = 0.0,
                          dampening: float = 0.0, nesterov: bool = False, retraction: str = "polar",
                          metric: str = "euclidean") -> tuple[Tensor, Tensor | None]:
    """One Riemannian SGD step: ξ = rgrad(X, G); momentum as torch.optim.SGD on ξ (buf None on the
    first step → buf = ξ); X⁺ = R_X(−lr·D); buf ← P_{X⁺}(buf) (transport by projection).

    Returns (X⁺, buf) — buf is updated in place when given, created when None and momentum > 0."""
    wide, (x, g, buf_t) = _tall_all(x, g, buf)
    rg = egrad2rgrad(x, g, metric)
    d, buf_t = _momentum(rg, buf_t, momentum, dampening, nesterov)
    x_new = _retract_step(x, d, -lr, retraction, metric, project=False)
    if buf_t is not None:
        _transport_(x_new, buf_t)
    if wide:
        return _mT(x_new), _mT(buf_t)
    return x_new, buf_t


def riemannian_adam_update(x: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                           max_exp_avg_sq: Tensor | None = None, *, step: int, lr: float,
                           beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                           retraction: str = "polar", metric: str = "euclidean",
                           scalar_v: bool = False) -> Tensor:
    """One Riemannian Adam step (moments updated in place, X⁺ returned).

    ξ = rgrad(X, G); m ← β1 m + (1−β1) ξ; v ← β2 v + (1−β2) ξ⊙ξ (scalar_v: mean(ξ²) per matrix,
    as Bécigneul & Ganea / geoopt but normalised per entry); D = (m/bc1)/(√v̂/√bc2 + eps), projected
    onto the tangent space at X when v is element-wise; X⁺ = R_X(−lr·D); m ← P_{X⁺}(m)."""
    wide, (x, g, exp_avg, exp_avg_sq, max_exp_avg_sq) = _tall_all(x, g, exp_avg, exp_avg_sq, max_exp_avg_sq)
    rg = egrad2rgrad(x, g, metric)
    d, scale = _adam_direction(exp_avg, exp_avg_sq, max_exp_avg_sq, rg, step, beta1, beta2, eps, scalar_v)
    x_new = _retract_step(x, d, -lr * scale, retraction, metric, project=not scalar_v)
    _transport_(x_new, exp_avg)
    return _mT(x_new) if wide else x_new


def landing_sgd_update(x: Tensor, g: Tensor, buf: Tensor | None, *, lr: float, momentum: float = 0.0,
                       dampening: float = 0.0, nesterov: bool = False, lam: float = 1.0,
                       safe_eps: float = 0.5) -> tuple[Tensor, Tensor | None]:
    """One landing SGD step. T = ½(G·XᵀX − X·GᵀX); D = T, or torch.optim.SGD's momentum on T;
    Λ = T + R(D − T) + λX(XᵀX − I) with R(V) = ½(V·XᵀX − X·VᵀX) (without momentum D = T and Λ is
    :func:`landing_field`; the relative form keeps the safe-step bound valid for a momentum built
    at earlier points, and Λ vanishes at critical points where T = 0); X⁺ = X − ηΛ with the
    per-matrix η = min(lr, η*) of :func:`safe_step`. O(np²): only p×p Grams. Returns (X⁺, buf)."""
    wide, (x, g, buf_t) = _tall_all(x, g, buf)
    t, xtx = _tangent_term(x, g)
    d, buf_t = _momentum(t, buf_t, momentum, dampening, nesterov)
    # Λ = R(G) + R(D − T) + λX(XᵀX − I) = R(G + D − T) + λX(XᵀX − I): R is linear
    u = (d - t).add_(g) if momentum else g
    x_new = _land(x, u, xtx, 1.0, lr=lr, lam=lam, safe_eps=safe_eps)
    if wide:
        return _mT(x_new), _mT(buf_t)
    return x_new, buf_t


def landing_adam_update(x: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                        max_exp_avg_sq: Tensor | None = None, *, step: int, lr: float,
                        beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, lam: float = 1.0,
                        safe_eps: float = 0.5, scalar_v: bool = False) -> Tensor:
    """One landing Adam step (moments updated in place, X⁺ returned).

    Moments on the tangent term T = ½(G·XᵀX − X·GᵀX), which vanishes exactly at critical points;
    D = (m/bc1)/(√v̂/√bc2 + eps) (scalar_v: v = EMA of mean(T²) per matrix); D re-projected in the
    same relative form, Λ = ½(D·XᵀX − X·DᵀX) + λX(XᵀX − I); X⁺ = X − ηΛ with the per-matrix
    η = min(lr, η*) of :func:`safe_step`. O(np²)."""
    wide, (x, g, exp_avg, exp_avg_sq, max_exp_avg_sq) = _tall_all(x, g, exp_avg, exp_avg_sq, max_exp_avg_sq)
    t, xtx = _tangent_term(x, g)
    d, scale = _adam_direction(exp_avg, exp_avg_sq, max_exp_avg_sq, t, step, beta1, beta2, eps, scalar_v)
    x_new = _land(x, d, xtx, scale, lr=lr, lam=lam, safe_eps=safe_eps)
    return _mT(x_new) if wide else x_new
