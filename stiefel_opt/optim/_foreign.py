"""Parameters on geoopt manifolds the package does not reproduce ("foreign": Sphere, PoincareBall,
Scaled(...), EuclideanStiefelExact, CanonicalStiefel, ...), stepped one tensor at a time through the
manifold's own geoopt interface, as ``geoopt.optim.RiemannianSGD``/``RiemannianAdam`` step them.

With x the point, G its gradient (−G with ``maximize``), wd the weight decay:

- ξ = egrad2rgrad(x, G + wd·x)  (the L2 decay of geoopt and torch, before the projection)
- SGD: buf = ξ on the first step (``torch.optim.SGD``'s convention; geoopt starts from the Euclidean
  gradient), then buf ← μ·buf + (1 − dampening)·ξ; D = ξ + μ·buf (Nesterov) or buf;
  (x, buf) ← retr_transp(x, −lr·D, buf); without momentum x ← retr(x, −lr·ξ).
- Adam: m ← β1·m + (1−β1)·ξ; v ← β2·v + (1−β2)·component_inner(x, ξ) (one value per manifold
  component, geoopt's form, whatever ``second_moment`` says); v̂ = max over steps with ``amsgrad``;
  D = (m/(1−β1ᵗ)) / (√(v̂/(1−β2ᵗ)) + eps); (x, m) ← retr_transp(x, −lr·D, m).

The manifold is seen through :class:`GeooptGeometry`, the geometry interface of
:class:`~stiefel_opt.manifolds.MatrixManifold` (rgrad, retract, retr_transp, component_inner,
infeasibility) over geoopt's own methods: exact, per tensor, unbatched. ``retr_transp`` is the
manifold's own, so ``EuclideanStiefelExact`` follows its exponential map.
The new point and state are computed aside and written by a commit callable, which the optimizer runs
once every update of the step succeeded; a non-finite gradient or result skips the tensor
(``nonfinite="skip"``: a RuntimeWarning, ``state["nonfinite_skips"]`` counts) or raises
``FloatingPointError`` (``nonfinite="raise"``) before anything is written.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
from torch import Tensor

from .. import functional as F
from ._engine import is_foreign

__all__ = ["GeooptGeometry", "check_foreign", "check_own_manifolds", "foreign_updates", "group_index"]



class GeooptGeometry:
    """The package's geometry interface over any geoopt manifold, one tensor at a time (its points are
    whole tensors, not stacks of Stiefel matrices): rgrad = ``egrad2rgrad``, retract = ``retr``,
    ``retr_transp``, ``component_inner`` and ``projx`` are geoopt's own; infeasibility is
    ‖x − projx(x)‖_F. There is no landing field: landing is defined for the Stiefel constraint only."""

    def __init__(self, manifold):
        self.manifold = manifold

    def __repr__(self) -> str:
        return f"GeooptGeometry({self.manifold!r})"

    def rgrad(self, x: Tensor, g: Tensor) -> Tensor:
        return self.manifold.egrad2rgrad(x, g)

    def retract(self, x: Tensor, u: Tensor) -> Tensor:
        return self.manifold.retr(x, u)

    def retr_transp(self, x: Tensor, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.manifold.retr_transp(x, u, v)

    def component_inner(self, x: Tensor, u: Tensor) -> Tensor:
        return self.manifold.component_inner(x, u)

    def projx(self, x: Tensor) -> Tensor:
        return self.manifold.projx(x)

    def infeasibility(self, x: Tensor) -> Tensor:
        """‖x − projx(x)‖_F: 0 exactly on the manifold."""
        return torch.linalg.vector_norm(x - self.manifold.projx(x))

    def landing_field(self, x: Tensor, g: Tensor, lam: float = 1.0) -> Tensor:
        raise NotImplementedError(f"{self.manifold!r}: the landing field is defined for the Stiefel constraint only")


def group_index(opt, group: dict) -> int:
    """Index of ``group`` in ``opt.param_groups`` (the next index while it is being added)."""
    return next((k for k, g in enumerate(opt.param_groups) if g is group), len(opt.param_groups))


def _where(opt, gi: int, i: int, m) -> str:
    return f"{type(opt).__name__}: parameter {i} of param group {gi} (on geoopt's {type(m).__name__}, {m!r})"


def check_own_manifolds(opt, group: dict) -> None:
    """A group declaring ``"manifold"`` must not hold a parameter carrying another (foreign) manifold."""
    if group.get("manifold") is None:
        return
    for i, p in enumerate(group["params"]):
        if is_foreign(getattr(p, "manifold", None)):
            raise ValueError(f"{_where(opt, group_index(opt, group), i, p.manifold)} carries its own manifold; "
                             "it cannot be in a param group declaring 'manifold'")


def check_foreign(opt, group: dict, i: int, p: Tensor) -> None:
    """Refuse the group options that cannot apply to the foreign parameter ``group["params"][i]``."""
    where = _where(opt, group_index(opt, group), i, p.manifold)
    if group.get("retraction") is not None:
        raise ValueError(
            f"{where} is retracted by its own manifold; the group's retraction={group['retraction']!r} names "
            "a Stiefel retraction: move the parameter to a group with retraction=None"
        )
    if group.get("decoupled_weight_decay") and group.get("weight_decay"):
        raise ValueError(
            f"{where}: decoupled_weight_decay scales the point off its manifold; use weight_decay with "
            "decoupled_weight_decay=False (decay added to the gradient, as geoopt does)"
        )
    if p.dtype in F._LOW_PRECISION or not p.is_floating_point() or p.is_complex():
        raise ValueError(f"{where}: dtype {p.dtype} is not supported on a geoopt manifold; keep it in "
                         "float32 or float64")


def foreign_updates(opt, gi: int, group: dict, items: list) -> tuple[list[Callable[[], None]], list]:
    """Split ``items`` ((index, parameter, manifold) of group ``gi``, all with a gradient): compute the
    update of the foreign ones (SGD or Adam according to ``opt._RULE``) without writing it. Returns
    (one commit callable per foreign parameter, the other items)."""
    kind = {"sgd": _sgd, "adam": _adam}[opt._RULE] if opt._UPDATE == "retract" else None
    commits, rest = [], []
    for i, p, m in items:
        if not is_foreign(m):
            rest.append((i, p, m))
            continue
        where = _where(opt, gi, i, m)
        if kind is None:
            raise ValueError(f"{where}: a landing optimizer lands on the Stiefel manifold only")
        check_foreign(opt, group, i, p)
        if p.grad.is_sparse:
            raise ValueError(f"{where}: sparse gradients are not supported")
        x = p.detach()
        g = -p.grad if group["maximize"] else p.grad
        if group["weight_decay"]:
            g = g.add(x, alpha=group["weight_decay"])
        if not bool(torch.isfinite(g).all()):
            commits.append(_skip(opt, group, p, f"{where}: non-finite gradient"))
            continue
        geometry = GeooptGeometry(m)
        x_new, new_state = kind(group, geometry, x, geometry.rgrad(x, g), opt.state.get(p, {}))
        if not all(bool(torch.isfinite(t).all()) for t in (x_new, *new_state.values())):
            commits.append(_skip(opt, group, p, f"{where}: non-finite update"))
            continue
        commits.append(functools.partial(_commit, opt, p, x_new, new_state))
    return commits, rest


def _commit(opt, p: Tensor, x_new: Tensor, new_state: dict) -> None:
    p.copy_(x_new)
    if not new_state:
        return  # like torch.optim.SGD without momentum: no state entry
    state = opt.state[p]
    for k, v in new_state.items():
        if isinstance(state.get(k), Tensor):
            state[k].copy_(v)
        else:
            state[k] = v


def _skip(opt, group: dict, p: Tensor, msg: str) -> Callable[[], None]:
    if group["nonfinite"] == "raise":
        raise FloatingPointError(f"{msg}; nothing was changed. Pass nonfinite='skip' to skip such steps, "
                                 "or fix the loss")
    warnings.warn(f"{msg}; its update was skipped (counted in state['nonfinite_skips'])", RuntimeWarning,
                  stacklevel=5)

    def count():
        opt.state[p]["nonfinite_skips"] = opt.state[p].get("nonfinite_skips", 0) + 1

    return count


def _sgd(group: dict, geometry: GeooptGeometry, x: Tensor, xi: Tensor, state: dict) -> tuple[Tensor, dict]:
    mu, lr = group["momentum"], float(group["lr"])
    if not mu:
        return geometry.retract(x, -lr * xi), {}
    buf = state.get("momentum_buffer")
    buf = xi.clone() if buf is None else buf.mul(mu).add_(xi, alpha=1 - group["dampening"])
    d = xi.add(buf, alpha=mu) if group["nesterov"] else buf
    x_new, buf = geometry.retr_transp(x, -lr * d, buf)
    return x_new, {"momentum_buffer": buf}


def _adam(group: dict, geometry: GeooptGeometry, x: Tensor, xi: Tensor, state: dict) -> tuple[Tensor, dict]:
    beta1, beta2 = group["betas"]
    step = float(state["step"]) + 1 if "step" in state else 1.0
    zero = torch.zeros_like(x)
    m = state.get("exp_avg", zero).mul(beta1).add_(xi, alpha=1 - beta1)
    v = state.get("exp_avg_sq", zero).mul(beta2).add_(geometry.component_inner(x, xi), alpha=1 - beta2)
    new = {"step": torch.tensor(step, dtype=torch.float32), "exp_avg": m, "exp_avg_sq": v}
    if group["amsgrad"]:
        v = new["max_exp_avg_sq"] = torch.maximum(state.get("max_exp_avg_sq", zero), v)
    denom = (v / (1 - beta2**step)).sqrt_().add_(group["eps"])
    x_new, new["exp_avg"] = geometry.retr_transp(x, -float(group["lr"]) * (m / (1 - beta1**step)) / denom, m)
    return x_new, new
