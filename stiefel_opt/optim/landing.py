"""LandingSGD and LandingAdam: retraction-free updates on Stiefel parameters (Ablin et al.), the
``torch.optim.SGD``/``Adam`` update on every other parameter."""
from __future__ import annotations

import torch
from torch.optim.optimizer import ParamsT

from ._base import AdamFamily, PackageOptions, SGDFamily
from ._engine import is_foreign, param_manifold
from ._foreign import check_own_manifolds, group_index

__all__ = ["LandingSGD", "LandingAdam", "MAX_LAM"]

MAX_LAM = 1e6
"""Largest accepted landing weight λ: the safe step is capped at 1/(2λ) = 5e-7 there."""


class _LandingChecks:
    _UPDATE = "land"
    _POINT_SET = True

    def _check_group(self, group: dict) -> None:
        check_own_manifolds(self, group)
        name, gi = type(self).__name__, group_index(self, group)
        for i, p in enumerate(group["params"]):
            m = param_manifold(group, p, point_set=True)
            if is_foreign(m):
                raise ValueError(
                    f"{name}: parameter {i} of param group {gi} lies on geoopt's {type(m).__name__} ({m!r}); "
                    "landing lands on the Stiefel manifold only (a Stiefel, or geoopt's EuclideanStiefel): "
                    "step it with RiemannianSGD/RiemannianAdam"
                )
        if group.get("stabilize") is not None:
            raise ValueError(f"{name}: param group {gi} sets stabilize, which landing has no use for (it "
                             "converges to the manifold by itself); remove it")
        super()._check_group(group)

    def _check_options(self, group: dict) -> None:
        super()._check_options(group)
        name = type(self).__name__
        if not 0 < group["lam"] <= MAX_LAM:
            raise ValueError(
                f"{name}: lam must lie in (0, {MAX_LAM:g}], got {group['lam']}: beyond it the safe step's cap "
                "1/(2λ) stops all progress and λ²d² overflows fp32"
            )
        if not 0.0 < group["safe_eps"] < 1.0:
            raise ValueError(f"{name}: safe_eps must lie in (0, 1), got {group['safe_eps']}")


class LandingSGD(_LandingChecks, SGDFamily, torch.optim.SGD, PackageOptions):
    """Landing SGD on Stiefel parameters; exactly ``torch.optim.SGD`` on every other parameter.

    On a Stiefel parameter X (n×p, or a wide matrix with orthonormal rows): T = ½(G·XᵀX − X·GᵀX);
    D = T, or torch's momentum on T; Λ = T + R(D − T) + λX(XᵀX − I), R(V) = ½(V·XᵀX − X·VᵀX)
    (without momentum, the landing field); X ← X − ηΛ with the per-matrix safe step
    η = min(lr, η*(‖XᵀX − I‖_F, ‖Λ‖_F)) capped at 1/(2λ), which keeps ‖XᵀX − I‖_F ≤ safe_eps.
    No retraction, no n×n matrix: O(np²). X need not start on the manifold (‖XᵀX − I‖_F < safe_eps).

    Args beyond ``torch.optim.SGD``'s: ``lam`` (λ > 0), ``safe_eps`` (ε ∈ (0, 1)), and
    ``nonfinite``, ``master_weights``, ``backend``, ``compile``, group ``manifold`` as in
    :class:`~stiefel_opt.optim.RiemannianSGD`. No weight decay on Stiefel parameters.
    """

    _STEP = "landing_sgd"

    def __init__(self, params: ParamsT, lr: float = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 lam: float = 1.0, safe_eps: float = 0.5, nonfinite: str = "skip",
                 master_weights: bool | None = None, backend: str = "auto",
                 compile: bool = False):
        self.defaults = {  # the package's options; PackageOptions adds the twin's
            "manifold": None, "retraction": None, "nonfinite": nonfinite, "master_weights": master_weights,
            "backend": backend, "compile": compile, "lam": lam, "safe_eps": safe_eps}
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, foreach=foreach,
                         differentiable=differentiable, fused=fused)

    def _manifold_update(self, group, b, fn, x, g, stacks):
        x_new, buf = fn(x, g, stacks.get("momentum_buffer"), lam=group["lam"], safe_eps=group["safe_eps"],
                        **self._momentum_kwargs(group))
        self._finish(group, b, stacks, buf)
        return x_new


class LandingAdam(_LandingChecks, AdamFamily, torch.optim.Adam, PackageOptions):
    """Landing Adam on Stiefel parameters; exactly ``torch.optim.Adam`` (``AdamW`` with
    ``decoupled_weight_decay=True``) on every other parameter.

    Moments on the tangent term T = ½(G·XᵀX − X·GᵀX), which vanishes exactly at the critical points
    (Adam on the raw gradient G stalls at an ~11% gap on Brockett); D = m̂/(√v̂ + eps), element-wise
    v or (``second_moment="scalar"``) the mean of T² per matrix; D re-projected in the same relative
    form and landed: Λ = ½(D·XᵀX − X·DᵀX) + λX(XᵀX − I); X ← X − ηΛ with the capped per-matrix safe
    step. The PoLAR recipe (the whole field fed to a stock Adam) is :func:`stiefel_opt.landing`.
    Other options as :class:`LandingSGD`.
    """

    _STEP = "landing_adam"

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None, decoupled_weight_decay: bool = False,
                 lam: float = 1.0, safe_eps: float = 0.5, second_moment: str = "elementwise",
                 nonfinite: str = "skip", master_weights: bool | None = None, backend: str = "auto",
                 compile: bool = False):
        self.defaults = {  # the package's options; PackageOptions adds the twin's
            "manifold": None, "retraction": None, "nonfinite": nonfinite, "master_weights": master_weights,
            "backend": backend, "compile": compile, "lam": lam, "safe_eps": safe_eps,
            "second_moment": second_moment}
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=foreach, maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay)

    def _manifold_update(self, group, b, fn, x, g, stacks):
        return fn(x, g, stacks["exp_avg"], stacks["exp_avg_sq"], stacks.get("max_exp_avg_sq"),
                  lam=group["lam"], safe_eps=group["safe_eps"], **self._adam_kwargs(group, b))
