"""The oblique manifold: matrices with unit-norm columns.

Ob(n, p) = {X ∈ R^{n×p} : diag(XᵀX) = 1} is the product of p spheres S^{n−1}: the geometry of
weight normalisation and of many spectral methods. Each column x_i is a point of St(n, 1), so
:class:`Oblique` only says how an n×p point is seen as p matrices of shape n×1; every optimizer
of the package then steps those columns as Stiefel matrices, batched with the columns of every
other oblique parameter of the same n (the formulas per column, g_i the column's gradient):

- tangent projection and Riemannian gradient: g_i − x_i (x_iᵀg_i), i.e. P_X(G) = G − X diag(diag(XᵀG));
- retraction: x_i + v_i normalised (``polar`` and ``qr``; ``cayley``, ``exp`` and ``newton_schulz``
  are the Stiefel ones on St(n, 1), the exponential map being the great circle);
- transport: projection onto the tangent space at the new point;
- landing field: ½(g_i‖x_i‖² − x_i x_iᵀg_i) + λ x_i(‖x_i‖² − 1), with the safe step per column;
- infeasibility: ‖diag(XᵀX) − 1‖₂, the root sum of the columns' |‖x_i‖² − 1|².

Both metrics of St(n, 1) are the Euclidean one of the sphere, so ``metric`` has no effect here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .manifolds import MatrixManifold

__all__ = ["Oblique"]


class Oblique(MatrixManifold):
    """Ob(n, p): n×p matrices with unit-norm columns (a product of p spheres S^{n−1}).

    Declare it on a param group (``{"params": [...], "manifold": "oblique"}`` or ``Oblique()``) or
    on a parameter (``geoopt.ManifoldParameter(data, manifold=Oblique())``); it runs under
    RiemannianSGD/Adam, LandingSGD/Adam, ``riemannian()``/``landing()`` and FSDP2 (rows sharded).
    ``projx`` normalises the columns (a zero column raises ``ValueError``).

    Args:
        retraction: ``"polar"`` (default; column normalisation), or any Stiefel retraction.
        metric: accepted for a uniform interface; both metrics coincide on St(n, 1).
    """

    name = "Oblique"
    spec_name = "oblique"

    def __init__(self, metric: str = "euclidean", retraction: str = "polar", ndim: int = 2):
        if int(ndim) != 2:
            raise ValueError(f"Oblique: ndim must be 2 (the columns of a matrix), got {ndim}")
        super().__init__(metric, retraction, ndim)  # validates the metric,
        self.metric = "euclidean"  # which St(n, 1) does not tell apart: one geometry, one spec and bucket

    def extra_repr(self) -> str:
        return f"retraction={self.retraction!r}"

    def to_matrix(self, x: Tensor) -> Tensor:
        """(…, p, n, 1): the columns of each n×p point as St(n, 1) matrices."""
        return x.mT.unsqueeze(-1)

    def from_matrix(self, m: Tensor, shape) -> Tensor:
        """The (…, n, p) points whose columns are the (…, p, n, 1) matrices ``m`` (a view when it can)."""
        *lead, n, p = shape
        return m.reshape(*lead, p, n).mT

    def matrix_shape(self, shape) -> torch.Size:
        """(…, p, n, 1) for points of shape (…, n, p)."""
        *lead, n, p = shape
        return torch.Size((*lead, p, n, 1))

    def shard_axis(self, dim: int) -> int | None:
        """Rows (dim 0) split every column's entries (row shards); columns (dim 1) stay whole."""
        return -2 if dim == 0 else None

    def _per_point(self, values: Tensor, how: str) -> Tensor:
        return values.sum(-1) if how == "sum" else torch.linalg.vector_norm(values, dim=-1)
