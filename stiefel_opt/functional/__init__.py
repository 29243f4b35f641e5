"""Pure tensor functions for the Stiefel manifold St(n, p) = {X ∈ R^{n×p} : XᵀX = I}.

Every function is batched over leading dimensions and never forms an n×n matrix: the costly
work is an n×p by p×p product or a p×p (2p×2p) factorization, O(np²) in all.

Conventions
- A *tall or square* matrix (n ≥ p) lives on St(n, p): orthonormal columns.
- A *wide* matrix (n < p) means orthonormal rows; every function transposes it, works on the
  tall form and transposes the result back.
- Low-precision inputs (bf16/fp16) are computed in fp32 and cast back to the input dtype.
- Every function whose result sums over the n rows takes ``rows=`` (:data:`LOCAL` by default; a
  :class:`RowShards` on FSDP2 row shards, :func:`stiefel_opt.distributed.row_sum`).
- Every ``metric=`` takes a name of :data:`METRICS` or a strategy (:data:`EUCLIDEAN`,
  :data:`CANONICAL`; :func:`as_metric`).

This package is the one place where the manifold math lives; optimizers, manifolds, kernels and
adapters call it. Where each topic lives:

- ``layout``: tall/wide handling, compute dtype, argument checks, the row reduction (:class:`Rows`).
- ``stiefel``: sym/skew, tangent projection, the metric strategies, transport, infeasibility,
  project, random_point.
- ``retractions``: polar, QR, Cayley, exp, Newton–Schulz; ``RETRACTIONS`` and :func:`retract`.
- ``landing``: the landing field, the safe step and the landing update.
- ``coefficients``: the p×p coefficient forms the fused kernels use.
- ``rite``: LoRA-RITE's per-factor math.
- ``steps``: the optimizer steps, direction rule × geometry update.
"""
from __future__ import annotations

from .layout import (_LOW_PRECISION, LOCAL, Rows, RowShards, _compute_dtype, _mT, _tall,
                     _tall_all, as_metric, gram, is_wide)
from .retractions import (_SERIES_MAX_DEGREE, RETRACTIONS, _binomial_inv_sqrt, _feasibility_tolerance,
                          _inv_sqrt_near_identity, _polar_via_gram, _qr_near_identity, _reorthonormalize_far,
                          _series_degree, _sign_fixed_qr, cholesky_qr, newton_schulz, retract, retract_cayley,
                          retract_exp, retract_newton_schulz, retract_polar, retract_qr)
from .stiefel import (CANONICAL, EUCLIDEAN, METRICS, CanonicalMetric, EuclideanMetric, Metric, canonical_rgrad,
                      distance, egrad2rgrad, gram_identity_gap, infeasibility, inner, proj_tangent, project,
                      random_point, skew, sym, transport)
from .coefficients import (adam_bias_corrections, combination_gram, frobenius_from_gram, landing_coefficients,
                           polar_coefficients, rgrad_coefficient, transport_coefficient)
from .landing import _landing_association, landing_field, landing_plan, relative_tangent, safe_step
from .rite import (rite_basis, rite_escaped_mass, rite_first_moment, rite_inv_root, rite_transport,
                   rite_unmagnified_gram, rite_update)
from .steps import (AdamRule, MomentumRule, land_safely, landing_adam_update, landing_sgd_update, retract_and_transport,
                    riemannian_adam_update, riemannian_sgd_update)

__all__ = [
    "MomentumRule",
    "AdamRule",
    "retract_and_transport",
    "land_safely",
    "sym",
    "skew",
    "is_wide",
    "gram_identity_gap",
    "infeasibility",
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
    "Metric",
    "EuclideanMetric",
    "CanonicalMetric",
    "EUCLIDEAN",
    "CANONICAL",
    "as_metric",
    "Rows",
    "RowShards",
    "LOCAL",
]
