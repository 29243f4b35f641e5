"""Make any ``torch.optim.Optimizer`` instance Riemannian or landing with step hooks.

``riemannian(opt)`` (StelLA's recipe): before the step each Stiefel parameter's gradient becomes
its Riemannian gradient; after it the displacement X_new − X_old is projected onto the tangent
space at X_old and retracted, and tangent-like state (``exp_avg``, ``momentum_buffer``,
``grad_avg`` of the parameter's shape) is projected onto the tangent space at the new point.

``landing(opt)`` (PoLAR's recipe): before the step the whole landing field is written into
``.grad``: Λ = ½(G·XᵀX − X·GᵀX) + λX(XᵀX − I) (``field="relative"``, the package's λ) or
(G·XᵀX − X·GᵀX) + λX(XᵀX − I) (``field="polar"``, PoLAR's λ); the optimizer then steps as usual.

Both return the same optimizer, with ``optimizer.stiefel_handle`` set: ``.remove()`` undoes the
wrapping. ``optimizer.project_()`` lands exactly (e.g. after the last step): each Stiefel matrix becomes
its polar factor and its tangent-like state is projected onto the new tangent space, as the
package's optimizers' :meth:`~stiefel_opt.optim._base.StiefelOptimizer.project_`. ``copy.deepcopy`` of a wrapped optimizer gives a wrapped copy. Stiefel parameters are
found as in the package's optimizers (group ``"manifold"``, else the parameter's own manifold).
A matrix with a non-finite gradient keeps its value (its gradient is zeroed for the inner step;
a RuntimeWarning is issued); the inner optimizer's state for it still decays. A Stiefel parameter
with a sparse gradient raises ``ValueError`` before anything is changed.

``state_dict()`` holds a group's ``Stiefel`` as the plain dict ``{"manifold": "stiefel", "metric",
"retraction", "ndim"}`` (loads with ``torch.load(weights_only=True)``); ``load_state_dict`` turns it
back into a ``Stiefel``, keeps the current group's manifold when the loaded group has none, and
re-checks the groups before anything is loaded.

Under FSDP2 the hooks work on the local shards (:mod:`stiefel_opt.distributed`): a matrix split
along its long side gets its Riemannian gradient, landing field, norms, retraction and state
transport from all-reduced p×p Grams; one split along its short side is all-gathered. The inner
optimizer steps on the DTensors as usual.
"""
from __future__ import annotations

import copy
import functools
import math
import warnings

import torch
from torch import Tensor

from .. import distributed as _dist
from .. import functional as F
from ..manifolds import MatrixManifold, manifold_from_spec
from ._base import StiefelOptimizer, plain_manifolds
from ._engine import Bucket, compute_dtype, geometry_key, nonfinite_matrices, nonfinite_message, param_manifold
from ._project import project_stiefel_
from .landing import MAX_LAM

__all__ = ["riemannian", "landing", "TANGENT_STATE_KEYS", "FIELDS"]

TANGENT_STATE_KEYS = ("exp_avg", "momentum_buffer", "grad_avg")
"""Default ``tangent_state`` of :func:`riemannian`: state entries of the parameter's shape are
transported to the new point X⁺ after each step, M ↦ P_{X⁺}(M) = M − X⁺ sym(X⁺ᵀM)
(:func:`~stiefel_opt.functional.proj_tangent`)."""

FIELDS = ("relative", "polar")
"""``field`` conventions of :func:`landing`: ``relative`` Λ = ½(G·XᵀX − X·GᵀX) + λX(XᵀX − I) (the
package's λ, as :class:`~stiefel_opt.LandingAdam`), ``polar`` (G·XᵀX − X·GᵀX) + λX(XᵀX − I) =
(GXᵀ − XGᵀ)X + λX(XᵀX − I) (PoLAR's λ; λ_polar = 2·λ_relative gives twice the relative field)."""


def _group_manifold(group: dict, where: str) -> MatrixManifold | None:
    """The group's declared manifold (or None), normalized in place: accepts what
    :func:`~stiefel_opt.manifolds.as_manifold` does and the plain dict of a state dict."""
    m = manifold_from_spec(group.get("manifold"), where)
    if "manifold" in group:
        group["manifold"] = m
    return m


def _describe(group: dict, gi: int, pi: int, p: Tensor) -> str:
    """How an error names a parameter: its name when the group has ``param_names``, else its index."""
    names = group.get("param_names")
    if names is not None:
        return f"parameter {names[pi]!r} (param group {gi}, shape {tuple(p.shape)})"
    return f"parameter {pi} of param group {gi} (shape {tuple(p.shape)})"


def _stiefel_params(optimizer, kind: str):
    """(group, parameter, manifold) of every Stiefel parameter with a gradient; ``ValueError`` naming
    the parameter for a sparse gradient."""
    out = []
    for gi, group in enumerate(optimizer.param_groups):
        _group_manifold(group, f"{kind}(): param group {gi}")
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            m = param_manifold(group, p)
            if m is None:
                continue
            if p.grad.layout != torch.strided:
                raise ValueError(
                    f"{kind}(): {_describe(group, gi, pi, p)} has a sparse gradient ({p.grad.layout}); Stiefel "
                    "parameters need dense gradients (e.g. nn.Embedding(sparse=False)), or leave this "
                    "parameter out of the Stiefel groups"
                )
            out.append((group, p, m, functools.partial(_describe, group, gi, pi, p)))
    return out


def _buckets(optimizer, wrap: "_Wrap", items: list) -> list[tuple[Bucket, float | None]]:
    """The Stiefel parameters ``items`` (of :func:`_stiefel_params`) as engine buckets (equal geometry,
    local matrix shape, dtype, device, shard layout), each with its displacement scale. The wrapper's
    retraction and metric override the manifold's; a landing wrapper retracts nothing (None)."""
    out: dict = {}
    for group, p, m, where in items:
        geometry = m.with_options(metric=wrap.metric, retraction=wrap.retraction)
        method = geometry.retraction if wrap.kind == "riemannian" else None
        x, g, layout = _dist.local_parts(p, geometry, optimizer, group, method)
        matrices = geometry.matrix_shape(x.shape)
        mshape = tuple(matrices[-2:])
        scale = None if wrap.hidden_size is None else math.sqrt(wrap.hidden_size / max(geometry.matrix_shape(p.shape)[-2:]))
        key = (mshape, p.dtype, p.device, geometry_key(geometry), method, layout, scale)
        if key not in out:
            out[key] = (Bucket(geometry, mshape, compute_dtype(p.dtype), layout=layout, retraction=method), scale)
        out[key][0].add(p, x, g, optimizer.state.get(p, {}), where, matrices)
    return list(out.values())


def _on_shards(fn, layout):
    """``fn(x, y, rows=)`` (two stacks of local matrices → a local stack) run on the shards of ``layout``
    (a ``rows`` layout passes its row reduction as ``rows=``)."""
    return fn if layout is None else _dist.sharded_step(fn, layout, "torch")


class _Wrap:
    """The options and the pre/post step and state-dict hooks of one wrapping (picklable, deep-copyable)."""

    def __init__(self, kind: str, *, retraction: str | None = None, metric: str | None = None,
                 tangent_keys: tuple[str, ...] = (), hidden_size: float | None = None, lam: float = 0.0,
                 field: str = "relative", clip: float | None = None, safe_eps: float | None = None,
                 max_grad_norm: float | None = None, allow_weight_decay: bool = False):
        self.kind = kind
        self.retraction = retraction
        self.metric = metric
        self.tangent_keys = tuple(tangent_keys)
        self.hidden_size = hidden_size
        self.lam = lam
        self.field = field
        self.clip = clip
        self.safe_eps = safe_eps
        self.max_grad_norm = max_grad_norm
        self.allow_weight_decay = allow_weight_decay
        self.handles: list = []
        self._saved: list = []

    def fresh(self) -> "_Wrap":
        """A wrapping with the same options and no hooks attached."""
        new = copy.copy(self)
        new.handles, new._saved = [], []
        return new

    def check_groups(self, groups, where: str = "param group") -> None:
        """Normalize each group's manifold; ``ValueError`` for a landing Stiefel group with weight decay
        unless ``allow_weight_decay``. ``groups``: [(group dict, its parameters)]."""
        for i, (group, params) in enumerate(groups):
            _group_manifold(group, f"{self.kind}(): {where} {i}")
            if self.kind != "landing" or self.allow_weight_decay or not group.get("weight_decay", 0):
                continue
            if any(param_manifold(group, p) is not None for p in params):
                raise ValueError(
                    f"landing(): {where} {i} holds Stiefel parameters and has weight_decay="
                    f"{group['weight_decay']}, which pulls X towards 0 against the landing term; put the "
                    "Stiefel parameters in a group with weight_decay=0, or pass allow_weight_decay=True "
                    "to keep it (PoLAR's GLUE runs decay X and Y)"
                )

    def pre(self, optimizer, args, kwargs):
        self._saved = []
        with torch.no_grad():
            items = _stiefel_params(optimizer, self.kind)
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None], self.max_grad_norm)
            for b, scale in _buckets(optimizer, self, items):
                x = b.stack(b.params)
                g = b.stack(b.grads)
                bad = _dist.agree(nonfinite_matrices(g), b.layout)
                if bool(bad.any()):
                    warnings.warn(nonfinite_message(f"{self.kind}()", "non-finite gradient", b.describe(bad), "skip",
                                                    counted=False), RuntimeWarning, stacklevel=3)
                    g = g.masked_fill(bad[:, None, None], 0.0)
                else:
                    bad = None
                b.unstack_into(b.grads, _on_shards(self._field, b.layout)(x, g, metric=b.geometry.metric))
                self._saved.append((b, scale, x.clone(), bad))

    def _field(self, x: Tensor, g: Tensor, metric: str, rows: F.Rows = F.LOCAL) -> Tensor:
        """The gradient handed to the inner optimizer: rgrad(X, G), or the (clipped) landing field;
        the polar field is 2·Λ_relative(λ/2) (exact: powers of two)."""
        if self.kind == "riemannian":
            return F.egrad2rgrad(x, g, metric, rows=rows)
        if self.field == "polar":
            field = 2.0 * F.landing_field(x, g, self.lam / 2.0, rows=rows)
        else:
            field = F.landing_field(x, g, self.lam, rows=rows)
        if self.clip is not None:
            norm = rows.frobenius(field).clamp_min(torch.finfo(field.dtype).tiny)
            field = field * (self.clip / norm).clamp_max(1.0)[..., None, None]
        return field

    def post(self, optimizer, args, kwargs):
        with torch.no_grad():
            for b, scale, x_old, bad in self._saved:
                xs = [_local(p) for p in b.owners]
                x_new = b.stack(xs)
                if self.kind == "riemannian":
                    x_new = _on_shards(_retract_displacement, b.layout)(
                        x_old, x_new, method=b.retraction, metric=b.geometry.metric, scale=scale)
                elif self.safe_eps is not None:
                    x_new = _on_shards(_backtrack, b.layout)(x_old, x_new, eps=self.safe_eps)
                elif bad is None:
                    continue  # the inner step stands as it is
                else:
                    x_new = x_new.clone()  # a stack of one parameter may be a view of it
                if bad is not None:
                    x_new[bad] = x_old[bad]
                b.unstack_into(xs, x_new)
                if self.kind == "riemannian":
                    self._transport_state(optimizer, b, xs, x_new)
        self._saved = []

    def _transport_state(self, optimizer, b: Bucket, xs: list[Tensor], y: Tensor) -> None:
        for key in self.tangent_keys:
            ts = [optimizer.state.get(p, {}).get(key) for p in b.owners]
            if not all(isinstance(t, Tensor) and t.shape == p.shape for t, p in zip(ts, b.owners)):
                continue
            ts = [_local(t) for t in ts]
            if any(t.shape != x.shape for t, x in zip(ts, xs)):
                continue
            b.unstack_into(ts, _on_shards(F.proj_tangent, b.layout)(y, b.stack(ts)))

    def load_pre(self, optimizer, state_dict):
        """A copy of ``state_dict`` whose groups hold ``Stiefel`` objects (a group without a manifold
        keeps the current group's), checked like the groups at wrapping; the argument is not changed."""
        state_dict = dict(state_dict)
        groups = [dict(g) for g in state_dict["param_groups"]]
        for group, current in zip(groups, optimizer.param_groups):
            if "manifold" not in group and current.get("manifold") is not None:
                group["manifold"] = current["manifold"]
        self.check_groups([(g, cur["params"]) for g, cur in zip(groups, optimizer.param_groups)],
                          "loaded param group")
        state_dict["param_groups"] = groups
        return state_dict


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor, else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _retract_displacement(x_old: Tensor, x_new: Tensor, method: str, metric: str, scale: float | None,
                          rows: F.Rows = F.LOCAL) -> Tensor:
    """R_{X_old}(P_{X_old}(s·(X_new − X_old))), s = ``scale`` or 1: StelLA's projection of the inner
    step, then the retraction."""
    delta = x_new - x_old
    if scale is not None:
        delta = delta * scale
    return F.retract(x_old, F.proj_tangent(x_old, delta, rows=rows), method, metric, rows=rows)


def _backtrack(x_old: Tensor, x_new: Tensor, eps: float, halvings: int = 30, rows: F.Rows = F.LOCAL) -> Tensor:
    """Shrink X_old + tΔ, t ∈ {1, ½, ¼, …}, per matrix until ‖XᵀX − I‖_F ≤ max(eps, d(X_old)).

    d(t)² = ‖E + tS + t²Q‖²_F with E = X_oldᵀX_old − I, S = 2 sym(X_oldᵀΔ), Q = ΔᵀΔ: p×p only."""
    wide = F.is_wide(x_old, rows=rows)
    xo = x_old.mT if wide else x_old
    delta = (x_new - x_old).mT if wide else x_new - x_old
    e = F.gram_identity_gap(xo, rows=rows)
    s = 2.0 * F.sym(F.gram(xo, delta, rows=rows))
    q = F.gram(delta, delta, rows=rows)
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
        """Remove the step and state-dict hooks: the optimizer is the plain one again (its groups keep
        their manifold as the plain-dict spec, so its state dict stays weights_only-safe)."""
        for h in self.wrap.handles:
            h.remove()
        self.wrap.handles = []
        opt = self._optimizer
        for group in opt.param_groups:
            if isinstance(group.get("manifold"), MatrixManifold):
                group["manifold"] = group["manifold"].spec()
        opt.__dict__.pop("stiefel_handle", None)
        opt.__dict__.pop("__deepcopy__", None)
        opt.__dict__.pop("project_", None)


def _deepcopy_wrapped(optimizer, memo):
    wrap = optimizer.stiefel_handle.wrap
    hook = optimizer.__dict__.pop("__deepcopy__")
    handle = optimizer.__dict__.pop("stiefel_handle")
    project = optimizer.__dict__.pop("project_")
    try:
        new = copy.deepcopy(optimizer, memo)
    finally:
        optimizer.__deepcopy__ = hook
        optimizer.stiefel_handle = handle
        optimizer.project_ = project
    return _attach(new, wrap.fresh())


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
    wrap.check_groups([(g, g["params"]) for g in optimizer.param_groups])
    wrap.handles = [optimizer.register_step_pre_hook(wrap.pre), optimizer.register_step_post_hook(wrap.post),
                    optimizer.register_state_dict_post_hook(plain_manifolds, prepend=True),  # others see the spec
                    optimizer.register_load_state_dict_pre_hook(wrap.load_pre)]
    optimizer.stiefel_handle = StiefelHandle(optimizer, wrap)
    optimizer.__deepcopy__ = functools.partial(_deepcopy_wrapped, optimizer)
    optimizer.project_ = functools.partial(_project_wrapped, optimizer)
    return optimizer


def _project_wrapped(optimizer) -> float:
    """``optimizer.project_()`` of a wrapped optimizer: every Stiefel matrix becomes its polar factor
    (:func:`~stiefel_opt.functional.project`, computed in float64) and the state entries of the
    parameter's shape named by ``tangent_state`` (:func:`riemannian`; :data:`TANGENT_STATE_KEYS` for
    :func:`landing`) are projected onto the tangent space there. Rank-deficient matrices raise
    ``ValueError`` naming the parameter, before anything is written. Returns the largest
    ‖XᵀX − I‖_F before the projection."""
    wrap = optimizer.stiefel_handle.wrap
    for gi, group in enumerate(optimizer.param_groups):
        _group_manifold(group, f"{wrap.kind}(): param group {gi}")
    keys = wrap.tangent_keys if wrap.kind == "riemannian" else TANGENT_STATE_KEYS
    return project_stiefel_(optimizer, param_manifold, keys)


def _check_max_grad_norm(kind: str, max_grad_norm) -> None:
    if max_grad_norm is not None and not 0 < max_grad_norm < math.inf:
        raise ValueError(f"{kind}(): max_grad_norm must be None or > 0 and finite, got {max_grad_norm}")


def riemannian(optimizer, retraction: str | None = None, metric: str | None = None,
               tangent_state: tuple[str, ...] = TANGENT_STATE_KEYS, *, hidden_size: float | None = None,
               max_grad_norm: float | None = None):
    """Make ``optimizer`` (any ``torch.optim.Optimizer``) Riemannian on its Stiefel parameters.

    Before each step: G ← rgrad(X, G) (``metric``: euclidean G − X sym(XᵀG), canonical G − X GᵀX).
    After it: X ← R_{X_old}(P_{X_old}(s·(X_new − X_old))), and the state entries named in
    ``tangent_state`` with the parameter's shape are projected onto the tangent space at the new X
    (``()``: the state is left as the optimizer made it). ``hidden_size``: s = √(hidden_size / n),
    n the row count of the matrix's tall form (StelLA's displacement scaling); None: s = 1.
    ``max_grad_norm``: first clip the raw gradients of all the optimizer's parameters to this total
    2-norm (``torch.nn.utils.clip_grad_norm_``). ``retraction``/``metric``: None uses each parameter's
    manifold (``Stiefel()``: polar, euclidean). Decoupled weight decay (AdamW) is normal to the
    manifold and vanishes in the projection; coupled weight decay enters adaptive second moments —
    prefer a group with ``weight_decay=0`` for Stiefel parameters. Returns the same optimizer.
    """
    if retraction is not None and retraction not in F.RETRACTIONS:
        raise ValueError(f"riemannian(): retraction must be one of {tuple(F.RETRACTIONS)}, got {retraction!r}")
    if metric is not None and metric not in F.METRICS:
        raise ValueError(f"riemannian(): metric must be one of {F.METRICS}, got {metric!r}")
    if hidden_size is not None and not 0 < hidden_size < math.inf:
        raise ValueError(f"riemannian(): hidden_size must be None or > 0 and finite, got {hidden_size}")
    _check_max_grad_norm("riemannian", max_grad_norm)
    return _attach(optimizer, _Wrap("riemannian", retraction=retraction, metric=metric, tangent_keys=tangent_state,
                                    hidden_size=hidden_size, max_grad_norm=max_grad_norm))


def landing(optimizer, lam: float = 1.0, clip: float | None = None, safe_eps: float | None = None, *,
            field: str = "relative", max_grad_norm: float | None = None, allow_weight_decay: bool = False):
    """Make ``optimizer`` a landing optimizer on its Stiefel parameters (PoLAR's recipe).

    Before each step, in this order: ``max_grad_norm`` clips the raw gradients of all the optimizer's
    parameters to this total 2-norm (``torch.nn.utils.clip_grad_norm_``, PoLAR's Trainer clipping);
    then G ← Λ, O(np²) (:data:`FIELDS`):

    - ``field="relative"`` (default): Λ = ½(G·XᵀX − X·GᵀX) + λX(XᵀX − I), λ in the package's units;
    - ``field="polar"``: Λ = (G·XᵀX − X·GᵀX) + λX(XᵀX − I) = (GXᵀ − XGᵀ)X + λX(XᵀX − I), λ in
      PoLAR's units (``lam=5e-3`` for LLMs, ``1.0`` for GLUE in the official runs).

    ``clip``: rescale Λ per matrix to Frobenius norm ≤ clip. ``safe_eps``: after the step, shrink each
    matrix's displacement (halving) until ‖XᵀX − I‖_F ≤ max(safe_eps, its value before the step); None
    (default) leaves the step as the optimizer made it. A Stiefel group with ``weight_decay`` > 0 is
    refused unless ``allow_weight_decay=True``. Returns the same optimizer.
    """
    if not 0 < lam <= MAX_LAM:
        raise ValueError(f"landing(): lam must lie in (0, {MAX_LAM:g}], got {lam}")
    if field not in FIELDS:
        raise ValueError(f"landing(): field must be one of {FIELDS}, got {field!r}")
    if clip is not None and not clip > 0:
        raise ValueError(f"landing(): clip must be None or > 0, got {clip}")
    if safe_eps is not None and not 0.0 < safe_eps < 1.0:
        raise ValueError(f"landing(): safe_eps must be None or lie in (0, 1), got {safe_eps}")
    _check_max_grad_norm("landing", max_grad_norm)
    return _attach(optimizer, _Wrap("landing", lam=lam, field=field, clip=clip, safe_eps=safe_eps,
                                    max_grad_norm=max_grad_norm, allow_weight_decay=allow_weight_decay))
