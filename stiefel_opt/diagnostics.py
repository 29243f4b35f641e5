"""Diagnostics for low-rank updates and Stiefel factors.

- ``stable_rank(M)`` = ‖M‖_F² / ‖M‖_2² (1 ≤ sr ≤ rank); for a factored M = B A it is computed
  from the r×r matrix R_B R_Aᵀ (thin QRs of B and Aᵀ), never forming M.
- ``feasibility(X)`` = ‖XᵀX − I‖_F (the distance landing drives to 0).
- ``adapter_report(model)``: one row per adapter layer — any module with ``delta_factors()``
  returning (B, A), ΔW = B A, and ``stiefel_factors()`` returning its Stiefel factors by name.
  A layer with a NaN/Inf factor is reported (``finite`` False, NaN metrics), never raised on.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import functional as F

__all__ = ["stable_rank", "feasibility", "lowrank_norm", "adapter_report", "snapshot", "Report"]


def _fp(t: Tensor) -> Tensor:
    """Detached, in fp32 at least (fp64 stays fp64)."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def _singular_values(b: Tensor, a: Tensor | None) -> Tensor:
    if a is None:
        return torch.linalg.svdvals(_fp(b))
    b, a = _fp(b), _fp(a)
    if b.shape[-1] != a.shape[-2]:
        raise ValueError(f"stable_rank: factors do not chain, B {tuple(b.shape)} and A {tuple(a.shape)}")
    rb = torch.linalg.qr(b).R
    ra = torch.linalg.qr(a.mT).R
    return torch.linalg.svdvals(rb @ ra.mT)


def stable_rank(m: Tensor, a: Tensor | None = None) -> float:
    """sr = ‖M‖_F² / ‖M‖_2² of ``m``, or of ``m @ a`` when the factor ``a`` is given. 0 for M = 0."""
    s = _singular_values(m, a)
    top = float(s.max()) if s.numel() else 0.0
    if top == 0.0:
        return 0.0
    return float((s * s).sum()) / (top * top)


def lowrank_norm(b: Tensor, a: Tensor) -> float:
    """‖B A‖_F from r×r Grams: ‖BA‖_F² = Σ (BᵀB) ⊙ (A Aᵀ)."""
    b, a = _fp(b), _fp(a)
    return float(((b.mT @ b) * (a @ a.mT)).sum().clamp_min(0.0).sqrt())


def feasibility(x: Tensor) -> float:
    """‖XᵀX − I‖_F (largest over a batch); a wide X is read as orthonormal rows."""
    return float(F.infeasibility(x.detach()).max())


class Report(list):
    """A list of dicts (one per adapter) that prints as an aligned table."""

    def __str__(self) -> str:
        if not self:
            return "(no adapters)"
        cols = list(self[0])
        cells = [[_fmt(row.get(c)) for c in cols] for row in self]
        width = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, width))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, width)) for r in cells]
        return "\n".join(lines)

    def summary(self) -> dict[str, float]:
        """Means of stable rank and update norm, the worst feasibility (NaN when a layer's is) and
        the number of layers with non-finite factors."""
        out = {"stable_rank_mean": sum(r["stable_rank"] for r in self) / max(len(self), 1),
               "feasibility_max": _worst(r["feasibility"] for r in self),
               "nonfinite_layers": sum(not r["finite"] for r in self)}
        ups = [r["update_norm"] for r in self if r.get("update_norm") is not None]
        if ups:
            out["update_norm_mean"] = sum(ups) / len(ups)
        return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def adapter_report(model: nn.Module, previous: dict[str, tuple[Tensor, Tensor]] | None = None) -> Report:
    """One row per adapter layer of ``model``: module, method, r, whether its factors are finite,
    ‖ΔW‖_F, stable rank of ΔW, the worst ‖XᵀX − I‖_F over its Stiefel factors (0 if none) and,
    when ``previous`` maps module names to earlier factors (B, A), the update norm
    ‖ΔW − ΔW_prev‖_F. The metrics of a layer with non-finite factors are NaN."""
    rows = Report()
    for name, m in model.named_modules():
        if not callable(getattr(m, "delta_factors", None)):
            continue
        with torch.no_grad():
            b, a = m.delta_factors()
            stiefel = m.stiefel_factors() if callable(getattr(m, "stiefel_factors", None)) else {}
            finite = all(bool(torch.isfinite(t).all()) for t in (b, a, *stiefel.values()))
            nan = float("nan")
            row = {
                "module": name,
                "method": getattr(m, "method", type(m).__name__),
                "r": b.shape[-1],
                "finite": finite,
                "delta_norm": lowrank_norm(b, a) if finite else nan,
                "stable_rank": stable_rank(b, a) if finite else nan,
                "feasibility": _worst(feasibility(x) for x in stiefel.values()),
                "update_norm": None,
            }
            if previous is not None and name in previous:
                b0, a0 = previous[name]
                moved = lowrank_norm(torch.cat([b, -b0.to(b)], -1), torch.cat([a, a0.to(a)], -2))
                row["update_norm"] = moved if finite else nan
        rows.append(row)
    return rows


def _worst(values) -> float:
    """The largest value, NaN if any is NaN (Python's ``max`` skips a NaN that is not first); 0 if none."""
    values = list(values)
    return float("nan") if any(math.isnan(v) for v in values) else max(values, default=0.0)


def snapshot(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """Detached copies of every adapter's (B, A), for the ``previous`` argument of the report."""
    with torch.no_grad():
        return {name: tuple(t.detach().clone() for t in m.delta_factors())
                for name, m in model.named_modules() if callable(getattr(m, "delta_factors", None))}

