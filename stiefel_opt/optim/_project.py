"""``optimizer.project_()``: land exactly on the manifold, once, at the end of training.

One implementation for the package's optimizers (:meth:`StiefelOptimizer.project_
<stiefel_opt.optim._base.StiefelOptimizer.project_>`) and for an optimizer wrapped by
:func:`~stiefel_opt.riemannian`/:func:`~stiefel_opt.landing` (``optimizer.project_()``). The
formulas are :func:`~stiefel_opt.functional.project` (polar factor) and
:func:`~stiefel_opt.functional.proj_tangent` (tangent projection of the state).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .. import functional as F
from ..manifolds import MatrixManifold

__all__ = ["project_stiefel_"]



def _describe(optimizer, group: dict, gi: int, pi: int, p: Tensor) -> str:
    """The parameter as an error names it: its name when the group has ``param_names`` (an optimizer
    built from ``model.named_parameters()``), else its index."""
    names = group.get("param_names")
    what = (f"parameter {names[pi]!r} (param group {gi}, shape {tuple(p.shape)})" if names is not None
            else f"parameter {pi} of param group {gi} (shape {tuple(p.shape)})")
    return f"{type(optimizer).__name__}.project_(): {what}"


@torch.no_grad()
def project_stiefel_(optimizer, manifold_of: Callable[[dict, Tensor], object], tangent_keys: tuple[str, ...]) -> float:
    """Replace every Stiefel matrix of ``optimizer`` by its polar factor and return the largest
    ‖XᵀX − I‖_F before the projection (0.0 when there is none).

    ``manifold_of(group, p)``: the parameter's manifold (a :class:`~stiefel_opt.Stiefel` is projected;
    None or any other manifold is left alone). The point is ``state["master"]`` when the parameter
    has an fp32 master (the parameter is then set to the projected master, rounded), else the
    parameter; everything is computed in float64 and rounded to the tensors' own dtypes. State
    entries named in ``tangent_keys`` with the parameter's shape become P_Y(M) = M − Y sym(YᵀM) at the new point Y. Every matrix is computed
    before anything is written: a rank-deficient or non-finite matrix raises ``ValueError`` naming
    its parameter and changes nothing. DTensor (FSDP2) parameters raise ``NotImplementedError``.
    """
    plan = []  # (parameter, master or None, projected point, [(state tensor, new value)]), in their dtypes
    worst = 0.0
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            m = manifold_of(group, p)
            if not isinstance(m, MatrixManifold):
                continue
            if hasattr(p, "to_local"):
                raise NotImplementedError(
                    f"{_describe(optimizer, group, gi, pi, p)}: a sharded (DTensor) parameter; gather it "
                    "(p.full_tensor()), project it with stiefel_opt.functional.project and redistribute it"
                )
            state = optimizer.state.get(p, {})
            master = state.get("master")
            master = master if isinstance(master, Tensor) else None
            x = master if master is not None else p.detach()
            xc = x.to(_exact_dtype(x))
            xm = m.to_matrix(xc)
            try:  # rank deficient at the precision of the data, not of the float64 copy
                y = F.project(xm, rtol=max(xm.shape[-2:]) * torch.finfo(x.dtype).eps)
            except ValueError as err:
                raise ValueError(f"{_describe(optimizer, group, gi, pi, p)}: {err}") from None
            if xm.numel():
                worst = max(worst, float(m.infeasibility(xc).max()))
            moves = []
            for key in tangent_keys:
                t = state.get(key)
                if isinstance(t, Tensor) and t.shape == p.shape:
                    moves.append((t, m.from_matrix(F.proj_tangent(y, m.to_matrix(t).to(xc.dtype)).to(t.dtype), t.shape)))
            plan.append((p, master, m.from_matrix(y.to(x.dtype), x.shape), moves))
    for p, master, y, moves in plan:
        if master is not None:
            master.copy_(y)
        p.detach().copy_(y)
        for t, v in moves:
            t.copy_(v)
    return worst


def _exact_dtype(x: Tensor) -> torch.dtype:
    """The dtype the projection is computed in: float64 (where the device has it), so that the only
    error left in an fp32/bf16/fp16 result is its rounding (an fp32 SVD's U Vᵀ is ~10× farther from
    the manifold)."""
    if x.dtype == torch.float64 or x.device.type == "mps":
        return x.dtype if x.dtype == torch.float64 else torch.float32
    return torch.float64
