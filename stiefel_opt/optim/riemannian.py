"""RiemannianSGD and RiemannianAdam: ``torch.optim.SGD``/``Adam`` on Euclidean parameters,
Riemannian gradient + retraction + transport by projection on Stiefel parameters."""
from __future__ import annotations

import torch
from torch.optim.optimizer import ParamsT

from .. import functional as F
from ._base import AdamFamily, PackageOptions, SGDFamily
from ._engine import param_manifold
from ._foreign import check_own_manifolds, group_index

__all__ = ["RiemannianSGD", "RiemannianAdam"]



class _Stabilize:
    """geoopt's ``stabilize=k`` (constructor keyword and group key, None or a positive int): after
    every k-th step of a group, each manifold parameter X of it (Stiefel or geoopt) becomes projx(X)
    and its tangent state T (``_TANGENT``) becomes proju(X, T). SGD counts the group's steps
    (``group["stabilize_step"]``); Adam stabilizes when a stepped parameter's ``step`` is a multiple of k.
    """

    _TANGENT = ""

    def _check_options(self, group: dict) -> None:
        super()._check_options(group)
        k = group["stabilize"]
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ValueError(f"{type(self).__name__}: param group {group_index(self, group)}: stabilize must "
                             f"be None or a positive int, got {k!r}")

    def _check_group(self, group: dict) -> None:
        check_own_manifolds(self, group)
        super()._check_group(group)
        k = group["stabilize"]
        where = f"{type(self).__name__}: param group {group_index(self, group)}"
        if k is not None:
            from torch.distributed.tensor import DTensor

            for i, p in enumerate(group["params"]):
                if isinstance(p, DTensor) and param_manifold(group, p) is not None:
                    raise ValueError(f"{where}: stabilize cannot project the sharded (DTensor) parameter {i}")

    def step(self, closure=None):
        """The optimizer's step, then the projections ``stabilize`` asks for (when due)."""
        loss = super().step(closure)
        for group in self.param_groups:
            if group["stabilize"] is not None and self._stabilize_due(group):
                self._stabilize_group(group)
        return loss

    @torch.no_grad()
    def _stabilize_group(self, group: dict) -> None:
        for p in group["params"]:
            m = param_manifold(group, p)
            state = self.state.get(p, {})
            if m is None or not (state or self._TANGENT == "momentum_buffer"):
                continue  # geoopt's Adam leaves never-stepped parameters alone, its SGD does not
            x = state.get("master", p)
            x.copy_(m.projx(x.float() if x.dtype in F._LOW_PRECISION else x))
            if x is not p:
                p.copy_(x)
            t = state.get(self._TANGENT)
            if t is not None:
                t.copy_(m.proju(x, t))


class RiemannianSGD(_Stabilize, SGDFamily, torch.optim.SGD, PackageOptions):
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
        stabilize: None, or k: every k steps project the group's manifold parameters onto their
            manifold and their momentum onto the tangent space (geoopt's option).
    ``fused``, ``differentiable`` are rejected for groups holding Stiefel parameters.

    A geoopt ``ManifoldParameter`` on another manifold (Sphere, PoincareBall, Scaled, EuclideanStiefelExact,
    CanonicalStiefel, ...) is stepped through that manifold's own ``egrad2rgrad`` and ``retr_transp``,
    as ``geoopt.optim.RiemannianSGD`` steps it (see :mod:`stiefel_opt.optim._foreign`); weight decay is
    added to its gradient first.
    """

    _STEP = "riemannian_sgd"
    _TANGENT = "momentum_buffer"

    def __init__(self, params: ParamsT, lr: float = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 retraction: str | None = None, nonfinite: str = "skip", master_weights: bool | None = None,
                 backend: str = "auto",
                 compile: bool = False, stabilize: int | None = None):
        self.defaults = {  # the package's options; PackageOptions adds the twin's
            "manifold": None, "retraction": retraction, "nonfinite": nonfinite,
            "master_weights": master_weights, "backend": backend, "compile": compile, "stabilize": stabilize}
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, foreach=foreach,
                         differentiable=differentiable, fused=fused)

    def _stabilize_due(self, group: dict) -> bool:
        group["stabilize_step"] = group.get("stabilize_step", 0) + 1
        return group["stabilize_step"] % group["stabilize"] == 0

    def _manifold_update(self, group, b, fn, x, g, stacks):
        x_new, buf = fn(x, g, stacks.get("momentum_buffer"), retraction=b.retraction,
                        metric=b.geometry.metric, **self._momentum_kwargs(group))
        self._finish(group, b, stacks, buf)
        return x_new


class RiemannianAdam(_Stabilize, AdamFamily, torch.optim.Adam, PackageOptions):
    """Adam on the Stiefel manifold; exactly ``torch.optim.Adam`` (``AdamW`` with
    ``decoupled_weight_decay=True``) on every other parameter.

    On a Stiefel parameter: ξ = rgrad(X, G); m ← β1·m + (1−β1)·ξ; v ← β2·v + (1−β2)·ξ⊙ξ
    (``second_moment="scalar"``: the mean of ξ² per matrix, so lr transfers from element-wise Adam;
    with the Euclidean metric this is geoopt's ‖ξ‖²_F form with lr and eps divided by √(np), see
    docs/geoopt.md); D = m̂/(√v̂ + eps) projected on
    the tangent space; X ← R_X(−lr·D); m ← P_X(m). ``amsgrad`` and ``maximize`` as in torch. No
    weight decay on Stiefel parameters. Other options (``stabilize``: m is projected) as
    :class:`RiemannianSGD`.

    A geoopt ``ManifoldParameter`` on another manifold is stepped as ``geoopt.optim.RiemannianAdam``
    steps it: v from the manifold's ``component_inner`` (whatever ``second_moment``), L2 weight decay
    (``decoupled_weight_decay`` with a nonzero decay is refused for it).
    """

    _STEP = "riemannian_adam"
    _TANGENT = "exp_avg"

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None, decoupled_weight_decay: bool = False,
                 retraction: str | None = None, second_moment: str = "elementwise", nonfinite: str = "skip",
                 master_weights: bool | None = None, backend: str = "auto",
                 compile: bool = False, stabilize: int | None = None):
        self.defaults = {  # the package's options; PackageOptions adds the twin's
            "manifold": None, "retraction": retraction, "nonfinite": nonfinite,
            "master_weights": master_weights, "backend": backend, "compile": compile,
            "second_moment": second_moment, "stabilize": stabilize}
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=foreach, maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay)

    def _stabilize_due(self, group: dict) -> bool:
        return any(p.grad is not None and "step" in self.state.get(p, {})
                   and int(self.state[p]["step"]) % group["stabilize"] == 0 for p in group["params"])

    def _manifold_update(self, group, b, fn, x, g, stacks):
        return fn(x, g, stacks["exp_avg"], stacks["exp_avg_sq"], stacks.get("max_exp_avg_sq"),
                  retraction=b.retraction, metric=b.geometry.metric, **self._adam_kwargs(group, b))
