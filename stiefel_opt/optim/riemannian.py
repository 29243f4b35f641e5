"""RiemannianSGD and RiemannianAdam: ``torch.optim.SGD``/``Adam`` on Euclidean parameters,
Riemannian gradient + retraction + transport by projection on Stiefel parameters."""
from __future__ import annotations

import torch
from torch.optim.optimizer import ParamsT

from ._base import AdamFamily, SGDFamily

__all__ = ["RiemannianSGD", "RiemannianAdam"]


class RiemannianSGD(SGDFamily, torch.optim.SGD):
    """SGD on the Stiefel manifold; exactly ``torch.optim.SGD`` on every other parameter.

    On a Stiefel parameter X with gradient G (−G with ``maximize``): ξ = rgrad(X, G) for the
    manifold's metric; momentum with torch's conventions on ξ (first step buf = ξ; buf ← μ·buf +
    (1 − dampening)·ξ; Nesterov ξ + μ·buf); X ← R_X(−lr·D); buf ← P_X(buf) (transport by
    projection). No weight decay on Stiefel parameters (it is normal to the manifold).

    Args beyond ``torch.optim.SGD``'s (all per param group):
        retraction: None (the manifold's own, ``"polar"`` for ``Stiefel()``), or ``"polar"``,
            ``"qr"``, ``"cayley"``, ``"exp"``, ``"newton_schulz"``.
        nonfinite: ``"skip"`` (a matrix with a non-finite gradient keeps its value and state; a
            RuntimeWarning; ``state["nonfinite_skips"]`` counts) or ``"raise"``.
        master_weights: None/True keeps an fp32 master copy of bf16/fp16 Stiefel parameters;
            False does the fp32 math on upcast copies and rounds the point back each step.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (the fused kernels of
            :mod:`stiefel_opt.kernels`; "auto" = Triton on CUDA tensors when it imports).
        compile: run the torch step through ``torch.compile`` (lr and step enter as 0-d tensors,
            so a schedule does not recompile; the first step pays the compilation).
        manifold: declare every parameter of the group Stiefel (``"stiefel"`` or a ``Stiefel``).
    ``fused``, ``differentiable`` are rejected for groups holding Stiefel parameters.
    """

    _STEP = "riemannian_sgd"

    def __init__(self, params: ParamsT, lr: float = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 retraction: str | None = None, nonfinite: str = "skip", master_weights: bool | None = None,
                 backend: str = "auto",
                 compile: bool = False):
        self._setup({"manifold": None, "retraction": retraction, "nonfinite": nonfinite,
                     "master_weights": master_weights, "backend": backend, "compile": compile})
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, foreach=foreach,
                         differentiable=differentiable, fused=fused)
        self._finish_setup()

    def _manifold_update(self, group, b, fn, x, g, stacks):
        x_new, buf = fn(x, g, stacks.get("momentum_buffer"), retraction=b.retraction,
                        metric=b.manifold.metric, **self._momentum_kwargs(group))
        self._finish(group, b, stacks, buf)
        return x_new


class RiemannianAdam(AdamFamily, torch.optim.Adam):
    """Adam on the Stiefel manifold; exactly ``torch.optim.Adam`` (``AdamW`` with
    ``decoupled_weight_decay=True``) on every other parameter.

    On a Stiefel parameter: ξ = rgrad(X, G); m ← β1·m + (1−β1)·ξ; v ← β2·v + (1−β2)·ξ⊙ξ
    (``second_moment="scalar"``: the mean of ξ² per matrix, the Bécigneul–Ganea/geoopt form
    normalized per entry, so lr transfers from element-wise Adam); D = m̂/(√v̂ + eps) projected on
    the tangent space; X ← R_X(−lr·D); m ← P_X(m). ``amsgrad`` and ``maximize`` as in torch. No
    weight decay on Stiefel parameters. Other options as :class:`RiemannianSGD`.
    """

    _STEP = "riemannian_adam"
    _EXTRA = ("second_moment",)

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None, decoupled_weight_decay: bool = False,
                 retraction: str | None = None, second_moment: str = "elementwise", nonfinite: str = "skip",
                 master_weights: bool | None = None, backend: str = "auto",
                 compile: bool = False):
        self._setup({"manifold": None, "retraction": retraction, "nonfinite": nonfinite,
                     "master_weights": master_weights, "backend": backend, "compile": compile, "second_moment": second_moment})
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=foreach, maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay)
        self._finish_setup()

    def _manifold_update(self, group, b, fn, x, g, stacks):
        return fn(x, g, stacks["exp_avg"], stacks["exp_avg_sq"], stacks.get("max_exp_avg_sq"),
                  retraction=b.retraction, metric=b.manifold.metric, **self._adam_kwargs(group, b))
