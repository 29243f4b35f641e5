"""Optimizer step math: each public step is one direction rule × one geometry update.

Direction rules (moments updated in place): :class:`MomentumRule` (torch.optim.SGD's momentum) and
:class:`AdamRule` (element-wise or per-matrix scalar second moment, amsgrad). A rule is any object
with ``rule(t) -> (D, s)`` (the direction is s·D), ``tangent`` (True when D stays tangent: no
re-projection), ``moment()`` (the state transported after a retraction, or None) and
``landing_input(g, t, d)`` (the U whose relative projection R(s·U) the landing field uses). Geometry updates:
:func:`retract_and_transport` (ξ = rgrad(X, G), X⁺ = R_X(−lr·D), the first moment moved to
T_{X⁺}) and :func:`land_safely` (T = ½(G·XᵀX − X·GᵀX), X⁺ = X − ηΛ with the safe step).

=============  ============================  =========================
               retract and transport         land with the safe step
=============  ============================  =========================
momentum       :func:`riemannian_sgd_update`   :func:`landing_sgd_update`
Adam           :func:`riemannian_adam_update`  :func:`landing_adam_update`
=============  ============================  =========================

stiefel_opt.optim calls these through its one dispatch table; a fused kernel must keep the same
contract. Batched over leading dims; a wide X (orthonormal rows) is handled by transposing every
matrix argument. Inputs are expected in the compute dtype (fp32 for low-precision parameters: the
optimizers keep fp32 masters and moments). Moment buffers are updated in place; the new point is
returned. Adam conventions follow torch.optim.Adam: bc1 = 1 − β1ᵗ, bc2 = 1 − β2ᵗ,
D = (m / bc1) / (√v / √bc2 + eps). ``rows``: see :class:`~stiefel_opt.functional.layout.Rows`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .coefficients import adam_bias_corrections
from .landing import _land, _tangent_term
from .layout import LOCAL, Rows, _bmm_add, _mm_add_, _mT, _tall_all, gram
from .retractions import _polar_via_gram, retract
from .stiefel import _twice_sym, egrad2rgrad, proj_tangent

# --- direction rules -----------------------------------------------------------------------------


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


def _adam_direction(exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Tensor | None, t: Tensor,
                    step: int, beta1: float, beta2: float, eps: float, scalar_v: bool, *,
                    rows: Rows = LOCAL, scratch: Tensor | None = None) -> tuple[Tensor, float]:
    """Update the moments in place with t and return (D', s) with s·D' = (m/bc1) / (√v̂/√bc2 + eps):
    D' = m / (√v̂ + eps·√bc2) and s = √bc2/bc1, a scalar the caller folds into its p×p coefficients.

    scalar_v: v is one value per matrix (shape (…, 1, 1)), the EMA of mean(t²). ``scratch``: a
    tensor of v's shape, dtype and strides that D' may be written into (e.g. t, once the moments
    have it), instead of a new one (a fresh large CPU buffer page-faults); the same kernels."""
    exp_avg.lerp_(t, 1.0 - beta1)
    if scalar_v:
        exp_avg_sq.mul_(beta2).add_(rows.mean_square(t), alpha=1.0 - beta2)
    else:
        exp_avg_sq.mul_(beta2).addcmul_(t, t, value=1.0 - beta2)
    v = exp_avg_sq
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        v = max_exp_avg_sq
    bc1, bc2_sqrt = adam_bias_corrections(step, beta1, beta2)
    if scratch is not None and not scalar_v and scratch.shape == v.shape and scratch.dtype == v.dtype \
            and scratch.stride() == v.stride():
        denom = torch.sqrt(v, out=scratch).add_(eps * bc2_sqrt)
    else:
        denom = v.sqrt().add_(eps * bc2_sqrt)
    d = exp_avg / denom if scalar_v else torch.div(exp_avg, denom, out=denom)  # no second n×p buffer
    return d, bc2_sqrt / bc1


class MomentumRule:
    """SGD momentum as a direction rule: D = the momentum direction of t (:func:`_momentum`), s = 1.
    A sum of tangent vectors is tangent (no re-projection); landing uses Λ = T + R(D − T)."""

    tangent = True

    def __init__(self, buf: Tensor | None, momentum: float, dampening: float, nesterov: bool):
        self.buf, self.momentum, self.dampening, self.nesterov = buf, momentum, dampening, nesterov

    def __call__(self, t: Tensor) -> tuple[Tensor, float]:
        d, self.buf = _momentum(t, self.buf, self.momentum, self.dampening, self.nesterov)
        return d, 1.0

    def moment(self) -> Tensor | None:
        """The state that lives in the tangent space (transported after a retraction)."""
        return self.buf

    def landing_input(self, g: Tensor, t: Tensor, d: Tensor) -> Tensor:
        """U with R(U) = T + R(D − T) for R(V) = ½(V·XᵀX − X·VᵀX) (R(G) = T; R is linear)."""
        return (d - t).add_(g) if self.momentum else g


class AdamRule:
    """Adam as a direction rule (:func:`_adam_direction`): (D', s) with s·D' the Adam direction.
    Element-wise v makes D' non-tangent (re-projected); landing uses Λ = R(s·D')."""

    _reuse_input = False  # True (the steps' own rule): t is the step's temporary, D' may be written into it

    def __init__(self, exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Tensor | None, step: int,
                 beta1: float, beta2: float, eps: float, scalar_v: bool, rows: Rows):
        self.state = (exp_avg, exp_avg_sq, max_exp_avg_sq)
        self.hyper = (step, beta1, beta2, eps, scalar_v)
        self.tangent = scalar_v
        self.rows = rows

    def __call__(self, t: Tensor) -> tuple[Tensor, float]:
        return _adam_direction(*self.state, t, *self.hyper, rows=self.rows,
                               scratch=t if self._reuse_input else None)

    def moment(self) -> Tensor:
        """The first moment m (transported after a retraction)."""
        return self.state[0]

    def landing_input(self, g: Tensor, t: Tensor, d: Tensor) -> Tensor:
        """U = D': re-projected in the relative form R(s·D')."""
        return d


class _StepAdamRule(AdamRule):
    """:class:`AdamRule` of the landing steps below, whose t is the geometry update's own temporary
    (the tangent term of :func:`land_safely`): D' is written into its buffer."""

    _reuse_input = True


# --- geometry updates ----------------------------------------------------------------------------


def _retract_step(x: Tensor, d: Tensor, alpha: float, retraction: str, metric, project: bool, *,
                  rows: Rows = LOCAL) -> Tensor:
    """R_X(α·V) with V = P_X(D) (``project``) or V = D (already tangent); D is left untouched.

    polar: Y = X + αP_X(D) = αD + X(I − α sym(XᵀD)) in one fused product, then the polar factor of Y
    (:func:`_polar_via_gram`: near the manifold two n×p products and a certified p×p series)."""
    if retraction == "polar":
        if project:
            b = _twice_sym(gram(x, d, rows=rows)).mul_(-0.5 * alpha)
            b.diagonal(dim1=-2, dim2=-1).add_(1.0)
            y = _bmm_add(d, x, b, beta=alpha)
        else:
            y = torch.add(x, d, alpha=alpha)
        return _polar_via_gram(y, rows=rows)
    v = proj_tangent(x, d, rows=rows) if project else d
    return retract(x, v * alpha, retraction, metric, rows=rows)


def _transport_(y: Tensor, m: Tensor, *, rows: Rows = LOCAL) -> None:
    """M ← P_Y(M) = M − Y sym(YᵀM) in place (vector transport by projection onto the tangent space at Y)."""
    c = _twice_sym(gram(y, m, rows=rows))
    if m.is_contiguous():
        _mm_add_(m, y, c, alpha=-0.5)
    else:
        m.copy_(_bmm_add(m, y, c, alpha=-0.5))


def retract_and_transport(x: Tensor, g: Tensor, rule, *, lr: float, retraction: str, metric,
                           rows: Rows) -> Tensor:
    """ξ = rgrad(X, G); (D, s) = rule(ξ); X⁺ = R_X(−lr·s·P_X(D)) (P_X skipped when the rule keeps
    D tangent); the rule's moment ← P_{X⁺}(moment). Tall X."""
    d, scale = rule(egrad2rgrad(x, g, metric, rows=rows))
    x_new = _retract_step(x, d, -lr * scale, retraction, metric, project=not rule.tangent, rows=rows)
    moment = rule.moment()
    if moment is not None:
        _transport_(x_new, moment, rows=rows)
    return x_new


def land_safely(x: Tensor, g: Tensor, rule, *, lr: float, lam: float, safe_eps: float, rows: Rows) -> Tensor:
    """T = ½(G·XᵀX − X·GᵀX); (D, s) = rule(T); X⁺ = X − ηΛ with Λ = R(s·U) + λX(XᵀX − I), U the
    rule's landing input, η = min(lr, η*) per matrix (:func:`_land`). Tall X."""
    t, xtx = _tangent_term(x, g, rows=rows)
    d, scale = rule(t)
    return _land(x, rule.landing_input(g, t, d), xtx, scale, lr=lr, lam=lam, safe_eps=safe_eps, rows=rows)


# --- the four steps: direction rule × geometry update ----------------------------------------------


def _momentum_step(update, x: Tensor, g: Tensor, buf: Tensor | None, momentum: float, dampening: float,
                   nesterov: bool, rows: Rows, **options) -> tuple[Tensor, Tensor | None]:
    """(X⁺, buf) of the geometry ``update`` driven by SGD momentum, on the tall form of every matrix."""
    wide, (x, g, buf) = _tall_all(x, g, buf, rows=rows)
    rule = MomentumRule(buf, momentum, dampening, nesterov)
    x_new = update(x, g, rule, rows=rows, **options)
    if wide:
        return _mT(x_new), _mT(rule.buf)
    return x_new, rule.buf


def _adam_step(update, x: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Tensor | None,
               step: int, beta1: float, beta2: float, eps: float, scalar_v: bool, rows: Rows, **options) -> Tensor:
    """X⁺ of the geometry ``update`` driven by Adam (moments in place), on the tall form of every matrix."""
    wide, (x, g, *state) = _tall_all(x, g, exp_avg, exp_avg_sq, max_exp_avg_sq, rows=rows)
    # landing: t is the update's own tangent term, D' goes into its buffer (measured: no gain for the
    # retraction, whose later temporaries then miss the block t would have freed)
    rule = (_StepAdamRule if update is land_safely else AdamRule)(*state, step, beta1, beta2, eps, scalar_v, rows)
    x_new = update(x, g, rule, rows=rows, **options)
    return _mT(x_new) if wide else x_new


def riemannian_sgd_update(x: Tensor, g: Tensor, buf: Tensor | None, *, lr: float, momentum: float = 0.0,
                          dampening: float = 0.0, nesterov: bool = False, retraction: str = "polar",
                          metric="euclidean", rows: Rows = LOCAL) -> tuple[Tensor, Tensor | None]:
    """One Riemannian SGD step: ξ = rgrad(X, G); momentum as torch.optim.SGD on ξ (buf None on the
    first step → buf = ξ); X⁺ = R_X(−lr·D); buf ← P_{X⁺}(buf) (transport by projection).

    Returns (X⁺, buf) — buf is updated in place when given, created when None and momentum > 0."""
    return _momentum_step(retract_and_transport, x, g, buf, momentum, dampening, nesterov, rows, lr=lr,
                          retraction=retraction, metric=metric)


def riemannian_adam_update(x: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                           max_exp_avg_sq: Tensor | None = None, *, step: int, lr: float,
                           beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                           retraction: str = "polar", metric="euclidean",
                           scalar_v: bool = False, rows: Rows = LOCAL) -> Tensor:
    """One Riemannian Adam step (moments updated in place, X⁺ returned).

    ξ = rgrad(X, G); m ← β1 m + (1−β1) ξ; v ← β2 v + (1−β2) ξ⊙ξ (scalar_v: mean(ξ²) per matrix,
    as Bécigneul & Ganea / geoopt but normalised per entry); D = (m/bc1)/(√v̂/√bc2 + eps), projected
    onto the tangent space at X when v is element-wise; X⁺ = R_X(−lr·D); m ← P_{X⁺}(m)."""
    return _adam_step(retract_and_transport, x, g, exp_avg, exp_avg_sq, max_exp_avg_sq, step, beta1, beta2, eps,
                      scalar_v, rows, lr=lr, retraction=retraction, metric=metric)


def landing_sgd_update(x: Tensor, g: Tensor, buf: Tensor | None, *, lr: float, momentum: float = 0.0,
                       dampening: float = 0.0, nesterov: bool = False, lam: float = 1.0,
                       safe_eps: float = 0.5, rows: Rows = LOCAL) -> tuple[Tensor, Tensor | None]:
    """One landing SGD step. T = ½(G·XᵀX − X·GᵀX); D = T, or torch.optim.SGD's momentum on T;
    Λ = T + R(D − T) + λX(XᵀX − I) with R(V) = ½(V·XᵀX − X·VᵀX) (without momentum D = T and Λ is
    :func:`landing_field`; the relative form keeps the safe-step bound valid for a momentum built
    at earlier points, and Λ vanishes at critical points where T = 0); X⁺ = X − ηΛ with the
    per-matrix η = min(lr, η*) of :func:`safe_step`. O(np²): only p×p Grams. Returns (X⁺, buf)."""
    return _momentum_step(land_safely, x, g, buf, momentum, dampening, nesterov, rows, lr=lr, lam=lam,
                          safe_eps=safe_eps)


def landing_adam_update(x: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                        max_exp_avg_sq: Tensor | None = None, *, step: int, lr: float,
                        beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, lam: float = 1.0,
                        safe_eps: float = 0.5, scalar_v: bool = False, rows: Rows = LOCAL) -> Tensor:
    """One landing Adam step (moments updated in place, X⁺ returned).

    Moments on the tangent term T = ½(G·XᵀX − X·GᵀX), which vanishes exactly at critical points;
    D = (m/bc1)/(√v̂/√bc2 + eps) (scalar_v: v = EMA of mean(T²) per matrix); D re-projected in the
    same relative form, Λ = ½(D·XᵀX − X·DᵀX) + λX(XᵀX − I); X⁺ = X − ηΛ with the per-matrix
    η = min(lr, η*) of :func:`safe_step`. O(np²)."""
    return _adam_step(land_safely, x, g, exp_avg, exp_avg_sq, max_exp_avg_sq, step, beta1, beta2, eps, scalar_v,
                      rows, lr=lr, lam=lam, safe_eps=safe_eps)
