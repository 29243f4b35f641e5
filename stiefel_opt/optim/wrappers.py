"""Make any ``torch.optim.Optimizer`` instance Riemannian or landing with step hooks.

``riemannian(opt)`` (StelLA's recipe): before the step each Stiefel parameter's gradient becomes
its Riemannian gradient; after it the displacement X_new − X_old is projected onto the tangent
space at X_old and retracted, and tangent-like state (``exp_avg``, ``momentum_buffer``,
``grad_avg`` of the parameter's shape) is projected onto the tangent space at the new point.

``landing(opt)`` (PoLAR's recipe): before the step the whole landing field
Λ = ½(G·XᵀX − X·GᵀX) + λX(XᵀX − I) is written into ``.grad``; the optimizer then steps as usual.

Both return the same optimizer, with ``optimizer.stiefel_handle`` set: ``.remove()`` undoes the
wrapping. ``copy.deepcopy`` of a wrapped optimizer gives a wrapped copy. Stiefel parameters are
found as in the package's optimizers (group ``"manifold"``, else the parameter's own manifold).
A matrix with a non-finite gradient keeps its value (its gradient is zeroed for the inner step;
a RuntimeWarning is issued); the inner optimizer's state for it still decays.

Under FSDP2 the hooks work on the local shards (:mod:`stiefel_opt.distributed`): a matrix split
along its long side gets its Riemannian gradient, landing field, norms, retraction and state
transport from all-reduced p×p Grams; one split along its short side is all-gathered. The inner
optimizer steps on the DTensors as usual.
"""
from __future__ import annotations

import copy
import functools
import warnings

import torch
from torch import Tensor

from .. import distributed as _dist
from .. import functional as F
from ..manifolds import Stiefel, as_stiefel
from ._base import StiefelOptimizer, nonfinite_matrices, param_manifold, stack_matrices, unstack_into

__all__ = ["riemannian", "landing", "TANGENT_STATE_KEYS"]

TANGENT_STATE_KEYS = ("exp_avg", "momentum_buffer", "grad_avg")
"""Default ``tangent_state`` of :func:`riemannian`: state entries of the parameter's shape are
transported to the new point X⁺ after each step, M ↦ P_{X⁺}(M) = M − X⁺ sym(X⁺ᵀM)
(:func:`~stiefel_opt.functional.proj_tangent`)."""

_LOW = (torch.float16, torch.bfloat16)


def _buckets(optimizer, wrap: "_Wrap") -> dict:
    """Group Stiefel parameters that have a gradient by (local matrix shape, dtype, device, metric,
    retraction, shard layout): {key: (params, local params, local gradients)}. The wrapper's
    retraction and metric override the manifold's; a landing wrapper retracts nothing (None)."""
    out: dict = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            m = param_manifold(group, p)
            if m is None:
                continue
            met = wrap.metric or m.metric
            method = (wrap.retraction or m.retraction) if wrap.kind == "riemannian" else None
            checked = m if met == m.metric else Stiefel(met, m.retraction, m.ndim)  # what local_parts checks
            x, g, layout = _dist.local_parts(p, checked, optimizer, group, method)
            mshape = tuple(m.to_matrix(x).shape[-2:])
            key = (mshape, p.dtype, p.device, met, method, m.ndim, layout)
            ps, xs, gs = out.setdefault(key, ([], [], []))
            ps.append(p)
            xs.append(x)
            gs.append(g)
    return out


def _on_shards(fn, layout):
    """``fn(x, y)`` (two stacks of local matrices → a local stack) run on the shards of ``layout``."""
    return fn if layout is None else _dist.sharded_step(fn, layout, "torch")


def _gather(ts: list[Tensor], mshape) -> Tensor:
    """The stack of ``ts``' matrices, low precision computed in fp32."""
    return stack_matrices(ts, mshape, torch.float32 if ts[0].dtype in _LOW else None)


class _Wrap:
    """The pre/post step hooks of one wrapping (a picklable, deep-copyable object)."""

    def __init__(self, kind: str, retraction: str | None, metric: str | None, lam: float,
                 clip: float | None, safe_eps: float | None, tangent_keys: tuple[str, ...]):
        self.kind = kind
        self.retraction = retraction
        self.metric = metric
        self.lam = lam
        self.clip = clip
        self.safe_eps = safe_eps
        self.tangent_keys = tuple(tangent_keys)
        self.handles: list = []
        self._saved: list = []

    def pre(self, optimizer, args, kwargs):
        self._saved = []
        with torch.no_grad():
            for (mshape, _, _, metric, method, _, layout), (ps, xs, gs) in _buckets(optimizer, self).items():
                x = _gather(xs, mshape)
                g = _gather(gs, mshape)
                bad = _dist.agree(nonfinite_matrices(g), layout)
                if bool(bad.any()):
                    warnings.warn(
                        f"{self.kind}(): non-finite gradient in {int(bad.sum())} Stiefel matrices of shape "
                        f"{mshape}; their update is skipped", RuntimeWarning, stacklevel=3,
                    )
                    g = g.masked_fill(bad[:, None, None], 0.0)
                else:
                    bad = None
                unstack_into(gs, _on_shards(self._field, layout)(x, g, metric=metric))
                self._saved.append((ps, mshape, metric, method, x.clone(), bad, layout))

    def _field(self, x: Tensor, g: Tensor, metric: str) -> Tensor:
        """The gradient handed to the inner optimizer: rgrad(X, G), or the (clipped) landing field."""
        if self.kind == "riemannian":
            return F.egrad2rgrad(x, g, metric)
        field = F.landing_field(x, g, self.lam)
        if self.clip is not None:
            norm = F._frobenius(field).clamp_min(torch.finfo(field.dtype).tiny)
            field = field * (self.clip / norm).clamp_max(1.0)[..., None, None]
        return field

    def post(self, optimizer, args, kwargs):
        with torch.no_grad():
            for ps, mshape, metric, method, x_old, bad, layout in self._saved:
                xs = [_local(p) for p in ps]
                x_new = _gather(xs, mshape)
                if self.kind == "riemannian":
                    x_new = _on_shards(_retract_displacement, layout)(x_old, x_new, method=method, metric=metric)
                elif self.safe_eps is not None:
                    x_new = _on_shards(_backtrack, layout)(x_old, x_new, eps=self.safe_eps)
                if bad is not None:
                    x_new[bad] = x_old[bad]
                unstack_into(xs, x_new)
                if self.kind == "riemannian":
                    self._transport_state(optimizer, ps, xs, mshape, x_new, layout)
        self._saved = []

    def _transport_state(self, optimizer, ps, xs, mshape, y, layout) -> None:
        for key in self.tangent_keys:
            ts = [optimizer.state.get(p, {}).get(key) for p in ps]
            if not all(isinstance(t, Tensor) and t.shape == p.shape for t, p in zip(ts, ps)):
                continue
            ts = [_local(t) for t in ts]
            if any(t.shape != x.shape for t, x in zip(ts, xs)):
                continue
            unstack_into(ts, _on_shards(F.proj_tangent, layout)(y, _gather(ts, mshape)))


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor, else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _retract_displacement(x_old: Tensor, x_new: Tensor, method: str, metric: str) -> Tensor:
    """R_{X_old}(P_{X_old}(X_new − X_old)): StelLA's projection of the inner step, then the retraction."""
    return F.retract(x_old, F.proj_tangent(x_old, x_new - x_old), method, metric)


def _backtrack(x_old: Tensor, x_new: Tensor, eps: float, halvings: int = 30) -> Tensor:
    """Shrink X_old + tΔ, t ∈ {1, ½, ¼, …}, per matrix until ‖XᵀX − I‖_F ≤ max(eps, d(X_old)).

    d(t)² = ‖E + tS + t²Q‖²_F with E = X_oldᵀX_old − I, S = 2 sym(X_oldᵀΔ), Q = ΔᵀΔ: p×p only."""
    wide = F.is_wide(x_old)
    xo = x_old.mT if wide else x_old
    delta = (x_new - x_old).mT if wide else x_new - x_old
    e = F.gram_identity_gap(xo)
    s = 2.0 * F.sym(F.gram(xo, delta))
    q = F.gram(delta, delta)
    bound = torch.linalg.matrix_norm(e).clamp_min(eps)
    t = torch.ones(x_old.shape[0], dtype=x_old.dtype, device=x_old.device)
    for _ in range(halvings):
        tt = t[:, None, None]
        over = torch.linalg.matrix_norm(e + tt * s + tt * tt * q) > bound
        if not bool(over.any()):
            break
        t = torch.where(over, 0.5 * t, t)
    return x_old + t[:, None, None] * (x_new - x_old)


class StiefelHandle:
    """Returned as ``optimizer.stiefel_handle`` by :func:`riemannian`/:func:`landing`."""

    def __init__(self, optimizer, wrap: _Wrap):
        self._optimizer = optimizer
        self.wrap = wrap

    def remove(self) -> None:
        """Remove the hooks: the optimizer is the plain one again."""
        for h in self.wrap.handles:
            h.remove()
        self.wrap.handles = []
        opt = self._optimizer
        opt.__dict__.pop("stiefel_handle", None)
        opt.__dict__.pop("__deepcopy__", None)


def _deepcopy_wrapped(optimizer, memo):
    wrap = optimizer.stiefel_handle.wrap
    hook = optimizer.__dict__.pop("__deepcopy__")
    handle = optimizer.__dict__.pop("stiefel_handle")
    try:
        new = copy.deepcopy(optimizer, memo)
    finally:
        optimizer.__deepcopy__ = hook
        optimizer.stiefel_handle = handle
    return _attach(new, _Wrap(wrap.kind, wrap.retraction, wrap.metric, wrap.lam, wrap.clip, wrap.safe_eps,
                              wrap.tangent_keys))


def _attach(optimizer, wrap: _Wrap):
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{wrap.kind}(): expected a torch.optim.Optimizer instance, got {type(optimizer).__name__}")
    if isinstance(optimizer, StiefelOptimizer):
        raise TypeError(
            f"{wrap.kind}(): {type(optimizer).__name__} already handles Stiefel parameters; wrap a plain "
            "torch optimizer instead"
        )
    if "stiefel_handle" in optimizer.__dict__:
        raise ValueError(
            f"{wrap.kind}(): this optimizer is already wrapped ({optimizer.stiefel_handle.wrap.kind}); call "
            "optimizer.stiefel_handle.remove() first"
        )
    for i, group in enumerate(optimizer.param_groups):
        if group.get("manifold") is not None:
            group["manifold"] = as_stiefel(group["manifold"])
        has_manifold = any(param_manifold(group, p) is not None for p in group["params"])
        if wrap.kind == "landing" and has_manifold and group.get("weight_decay", 0):
            raise ValueError(
                f"landing(): param group {i} holds Stiefel parameters and has weight_decay="
                f"{group['weight_decay']}, which pulls X towards 0 against the landing term; put the "
                "Stiefel parameters in a group with weight_decay=0"
            )
    wrap.handles = [optimizer.register_step_pre_hook(wrap.pre), optimizer.register_step_post_hook(wrap.post)]
    optimizer.stiefel_handle = StiefelHandle(optimizer, wrap)
    optimizer.__deepcopy__ = functools.partial(_deepcopy_wrapped, optimizer)
    return optimizer


def riemannian(optimizer, retraction: str | None = None, metric: str | None = None,
               tangent_state: tuple[str, ...] = TANGENT_STATE_KEYS):
    """Make ``optimizer`` (any ``torch.optim.Optimizer``) Riemannian on its Stiefel parameters.

    Before each step: G ← rgrad(X, G). After it: X ← R_{X_old}(P_{X_old}(X_new − X_old)), and the
    state entries named in ``tangent_state`` with the parameter's shape are projected onto the
    tangent space at the new X. ``retraction``/``metric``: None uses each parameter's manifold
    (``Stiefel()``: polar, euclidean). Decoupled weight decay (AdamW) is normal to the manifold and
    vanishes in the projection; coupled weight decay enters adaptive second moments — prefer a
    group with ``weight_decay=0`` for Stiefel parameters. Returns the same optimizer.
    """
    if retraction is not None and retraction not in F.RETRACTIONS:
        raise ValueError(f"riemannian(): retraction must be one of {tuple(F.RETRACTIONS)}, got {retraction!r}")
    if metric is not None and metric not in F.METRICS:
        raise ValueError(f"riemannian(): metric must be one of {F.METRICS}, got {metric!r}")
    return _attach(optimizer, _Wrap("riemannian", retraction, metric, 0.0, None, None, tangent_state))


def landing(optimizer, lam: float = 1.0, clip: float | None = None, safe_eps: float | None = None):
    """Make ``optimizer`` a landing optimizer on its Stiefel parameters (PoLAR's recipe).

    Before each step: G ← Λ = ½(G·XᵀX − X·GᵀX) + λX(XᵀX − I) (O(np²)); ``clip``: rescale Λ per
    matrix to Frobenius norm ≤ clip. ``safe_eps``: after the step, shrink each matrix's displacement
    (halving) until ‖XᵀX − I‖_F ≤ max(safe_eps, its value before the step); None (default) leaves
    the step as the optimizer made it. Returns the same optimizer.
    """
    if not lam > 0:
        raise ValueError(f"landing(): lam must be > 0, got {lam}")
    if clip is not None and not clip > 0:
        raise ValueError(f"landing(): clip must be None or > 0, got {clip}")
    if safe_eps is not None and not 0.0 < safe_eps < 1.0:
        raise ValueError(f"landing(): safe_eps must be None or lie in (0, 1), got {safe_eps}")
    return _attach(optimizer, _Wrap("landing", None, None, lam, clip, safe_eps, ()))
