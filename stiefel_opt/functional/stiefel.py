"""Stiefel geometry St(n, p) = {X ∈ R^{n×p} : XᵀX = I}: sym/skew, the tangent projection, the two
metrics as strategies (Riemannian gradient, inner product, geodesic), transport, infeasibility,
the nearest point and a random point."""
from __future__ import annotations

import torch
from torch import Tensor

from .layout import (LOCAL, _LOW_PRECISION, _METRIC_REGISTRY, Rows, _bmm_add, _check_matrices, _compute_dtype,
                     _eye_like, _mT, _tall, as_metric, gram)
from .retractions import _reorthonormalize_far, _sign_fixed_qr


def sym(a: Tensor) -> Tensor:
    """sym(A) = (A + Aᵀ)/2 over the last two dims."""
    return 0.5 * (a + a.transpose(-1, -2))


def skew(a: Tensor) -> Tensor:
    """skew(A) = (A − Aᵀ)/2 over the last two dims."""
    return 0.5 * (a - a.transpose(-1, -2))


def _twice_sym(a: Tensor) -> Tensor:
    """A + Aᵀ = 2 sym(A) in one pass (the ½ folded into the product that uses it)."""
    return a + a.transpose(-1, -2)


@_tall(1, returns_matrix=False)
def gram_identity_gap(x: Tensor, *, rows: Rows = LOCAL) -> Tensor:
    """XᵀX − I (p×p, in the compute dtype), for tall X or the row form of a wide one."""
    g = gram(x, x, rows=rows)
    return g - _eye_like(g)


def infeasibility(x: Tensor, *, rows: Rows = LOCAL) -> Tensor:
    """Distance to the manifold d(X) = ‖XᵀX − I‖_F, one value per matrix (fp32 for low precision)."""
    return torch.linalg.matrix_norm(gram_identity_gap(x, rows=rows))


def distance(x: Tensor, *, rows: Rows = LOCAL) -> Tensor:
    """Alias of :func:`infeasibility`: d(X) = ‖XᵀX − I‖_F per matrix (the name this function had
    first; it is not a geodesic distance between two points)."""
    return infeasibility(x, rows=rows)


@_tall(2)
def proj_tangent(x: Tensor, u: Tensor, *, rows: Rows = LOCAL) -> Tensor:
    """Euclidean-metric tangent projection P_X(U) = U − X sym(XᵀU)."""
    return _bmm_add(u, x, _twice_sym(gram(x, u, rows=rows)), alpha=-0.5)


@_tall(2)
def canonical_rgrad(x: Tensor, g: Tensor, *, rows: Rows = LOCAL) -> Tensor:
    """Canonical-metric Riemannian gradient G − X GᵀX."""
    return _bmm_add(g, x, gram(g, x, rows=rows), alpha=-1.0)


def transport(y: Tensor, v: Tensor, *, rows: Rows = LOCAL) -> Tensor:
    """Vector transport by projection onto the tangent space at the new point Y."""
    return proj_tangent(y, v, rows=rows)


# --- the metrics, as strategies ------------------------------------------------------------------


@_tall(2)
def _exp_euclidean(x: Tensor, v: Tensor, *, rows: Rows = LOCAL) -> Tensor:
    a = gram(x, v, rows=rows)
    s = gram(v, v, rows=rows)
    eye = _eye_like(a).expand_as(a)
    block = torch.cat(
        [torch.cat([a, -s], dim=-1), torch.cat([eye, a], dim=-1)],
        dim=-2,
    )
    e = torch.linalg.matrix_exp(block)[..., :, : a.shape[-1]]
    return _reorthonormalize_far(torch.cat([x, v], dim=-1) @ e @ torch.linalg.matrix_exp(-a), rows=rows)


@_tall(2)
def _exp_canonical(x: Tensor, v: Tensor, *, rows: Rows = LOCAL) -> Tensor:
    if rows.sharded:
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


class Metric:
    """A Riemannian metric on St(n, p) as a strategy: its ``name``, the Riemannian gradient
    :meth:`rgrad` of a Euclidean gradient, the inner product :meth:`inner` and the exponential map
    :meth:`geodesic`. Every ``metric=`` argument of :mod:`stiefel_opt.functional` takes an instance
    (:data:`EUCLIDEAN`, :data:`CANONICAL`) or its name."""

    name = ""

    def rgrad(self, x: Tensor, g: Tensor, *, rows: Rows = LOCAL) -> Tensor:
        """Riemannian gradient of the Euclidean gradient G at X (a tangent vector)."""
        raise NotImplementedError

    def rgrad_coefficient(self, gtx: Tensor) -> Tensor:
        """p×p C with rgrad(X, G) = G + X·C, from GᵀX alone (for fused kernels)."""
        raise NotImplementedError

    def geodesic(self, x: Tensor, v: Tensor, *, rows: Rows = LOCAL) -> Tensor:
        """The exponential map exp_X(V) of this metric (the ``exp`` retraction)."""
        raise NotImplementedError

    def _inner_correction(self, x: Tensor, u: Tensor, v: Tensor, keepdim: bool, rows: Rows) -> Tensor | None:
        return None

    def inner(self, x: Tensor, u: Tensor, v: Tensor, keepdim: bool = False, *, rows: Rows = LOCAL) -> Tensor:
        """⟨U, V⟩_X = tr(UᵀV) minus this metric's correction, one value per matrix (in X's dtype)."""
        _check_matrices("inner", ("x", "u", "v"), (x, u, v))
        dtype = x.dtype
        if dtype in _LOW_PRECISION:
            x, u, v = x.float(), u.float(), v.float()
        if rows.is_wide(x):
            x, u, v = _mT(x), _mT(u), _mT(v)
        out = rows.sum((u * v).sum(dim=(-1, -2), keepdim=keepdim))
        corr = self._inner_correction(x, u, v, keepdim, rows)
        if corr is not None:
            out = out - corr
        return out.to(dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EuclideanMetric(Metric):
    """The metric St(n, p) inherits from R^{n×p}: ⟨U, V⟩ = tr(UᵀV); rgrad = P_X(G) = G − X sym(XᵀG)
    (:func:`proj_tangent`); geodesic Y = [X, V] expm([[A, −S], [I, A]])[:, :p] expm(−A) with
    A = XᵀV, S = VᵀV (Edelman, Arias & Smith 1998), then :func:`_reorthonormalize_far`."""

    name = "euclidean"

    def rgrad(self, x: Tensor, g: Tensor, *, rows: Rows = LOCAL) -> Tensor:
        """P_X(G) = G − X sym(XᵀG) (:func:`proj_tangent`)."""
        return proj_tangent(x, g, rows=rows)

    def rgrad_coefficient(self, gtx: Tensor) -> Tensor:
        """C = −sym(GᵀX): rgrad(X, G) = G + X·C."""
        return -sym(gtx)

    def geodesic(self, x: Tensor, v: Tensor, *, rows: Rows = LOCAL) -> Tensor:
        """Y = [X, V] expm([[A, −S], [I, A]])[:, :p] expm(−A), A = XᵀV, S = VᵀV; O(np²) via 2p×2p expm."""
        return _exp_euclidean(x, v, rows=rows)


class CanonicalMetric(Metric):
    """The canonical metric ⟨U, V⟩ = tr(UᵀV) − ½ tr(UᵀX XᵀV); rgrad = G − X GᵀX
    (:func:`canonical_rgrad`); geodesic, with QR = (I − XXᵀ)V:
    Y = [X, Q] expm([[A, −Rᵀ], [R, 0]])[:, :p], A = skew(XᵀV), then :func:`_reorthonormalize_far`.
    The geodesic needs a QR of a whole n×p matrix: not on row shards."""

    name = "canonical"

    def rgrad(self, x: Tensor, g: Tensor, *, rows: Rows = LOCAL) -> Tensor:
        """G − X GᵀX (:func:`canonical_rgrad`)."""
        return canonical_rgrad(x, g, rows=rows)

    def rgrad_coefficient(self, gtx: Tensor) -> Tensor:
        """C = −GᵀX: rgrad(X, G) = G + X·C."""
        return -gtx

    def geodesic(self, x: Tensor, v: Tensor, *, rows: Rows = LOCAL) -> Tensor:
        """Y = [X, Q] expm([[A, −Rᵀ], [R, 0]])[:, :p] with QR = (I − XXᵀ)V, A = skew(XᵀV)."""
        return _exp_canonical(x, v, rows=rows)

    def _inner_correction(self, x, u, v, keepdim, rows):
        xu = gram(x, u, rows=rows)
        xv = gram(x, v, rows=rows)
        return 0.5 * (xu * xv).sum(dim=(-1, -2), keepdim=keepdim)


EUCLIDEAN = EuclideanMetric()
"""The Euclidean metric strategy (:class:`EuclideanMetric`), name ``"euclidean"``."""
CANONICAL = CanonicalMetric()
"""The canonical metric strategy (:class:`CanonicalMetric`), name ``"canonical"``."""
for _m in (EUCLIDEAN, CANONICAL):
    _METRIC_REGISTRY[_m.name] = _m
del _m

METRICS = tuple(_METRIC_REGISTRY)
"""The metric names every ``metric=`` argument accepts (a strategy is accepted too, see
:func:`as_metric`): euclidean ⟨U, V⟩ = tr(UᵀV), canonical tr(UᵀV) − ½ tr(UᵀX XᵀV) (see :func:`inner`)."""


def egrad2rgrad(x: Tensor, g: Tensor, metric: str | Metric = "euclidean", *, rows: Rows = LOCAL) -> Tensor:
    """Riemannian gradient of the Euclidean gradient G for the chosen metric (:meth:`Metric.rgrad`)."""
    return as_metric(metric).rgrad(x, g, rows=rows)


def inner(x: Tensor, u: Tensor, v: Tensor, metric: str | Metric = "euclidean", keepdim: bool = False, *,
          rows: Rows = LOCAL) -> Tensor:
    """Metric at X: ⟨U, V⟩ = tr(UᵀV) (euclidean) or tr(UᵀV) − ½ tr(UᵀX XᵀV) (canonical)."""
    return as_metric(metric).inner(x, u, v, keepdim, rows=rows)


# --- points ---------------------------------------------------------------------------------------


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
