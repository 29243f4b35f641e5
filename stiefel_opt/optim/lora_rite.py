"""LoRA-RITE: a transformation-invariant adaptive optimizer for LoRA factor pairs.

Yen et al., "LoRA Done RITE: Robust Invariant Transformation Equilibration for LoRA
Optimization", ICLR 2025, arXiv 2410.20625. Written from the paper's equations; the per-step
math lives in :mod:`stiefel_opt.functional` (``rite_*``).

For a pair (A, B) with ΔW = B A (PEFT layout: A is r×in, B is out×r) each factor X ∈ {Aᵀ, B}
(tall form, n×r) with partner Y is updated, at step t, by

    Y = U R (thin QR),  ḡ = ∇_X R⁺,  P = U_tᵀ U_{t−1},
    V ← β̂₂ P V Pᵀ + (1 − β̂₂) ḡᵀḡ / n,    ρ ← β̂₂ (ρ + d_λ(V_old, P V_old Pᵀ)),
    S̄ = ḡ (V + ρI)^(−1/2),  M ← β̂₁ M Pᵀ + (1 − β̂₁) S̄,  X ← X − η M R⁺ᵀ,

with the bias-corrected decays β̂_t = β (1 − β^(t−1)) / (1 − β^t) (the EMA then equals Adam's
bias-corrected average; step 1 uses the new statistics alone). Since X Yᵀ moves by −η M Uᵀ and
every quantity above depends on Y only through its column space, replacing (A, B) by
(S⁻¹A, B S) for any invertible S gives the same sequence of ΔW (Adam does not have this property).

At r = 1 the r×r preconditioner is a scalar: each factor takes an Adam step with a *single*
second moment (the mean square of its unmagnified gradient) in the coordinates of the partner's
unit direction, the moments being rescaled by P = cos ∠(u_t, u_{t−1}) when that direction
turns. With β₁ = β₂ = 0 this is normalised gradient descent on ΔW:
B δA = −η √in · u uᵀG / ‖uᵀG‖ with u = B/‖B‖ (and symmetrically for B).
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim.adamw import adamw as _adamw
from torch.optim.optimizer import _get_scalar_dtype

from .. import distributed as _dist
from .. import functional as F
from ._engine import PLAIN, Bucket, compute_dtype, nonfinite_message

__all__ = ["LoRARITE"]


def _is_pair(item: Any) -> bool:
    return (
        isinstance(item, (tuple, list))
        and len(item) == 2
        and all(isinstance(t, Tensor) for t in item)
    )


class LoRARITE(torch.optim.Optimizer):
    r"""LoRA-RITE on (A, B) pairs; other parameters of a group get exactly ``torch.optim.AdamW``.

    Args:
        pairs: an iterable of ``(A, B)`` tuples (A: r×in, B: out×r, as in PEFT, ΔW = B A), or of
            param-group dicts with a ``"pairs"`` key and/or a ``"params"`` key (plain parameters,
            updated by AdamW with the group's ``lr``, ``betas``, ``eps`` and ``weight_decay``).
        lr: step size η.
        betas: (β₁, β₂), decays of the first and of the r×r second moment.
        eps: ε added to the square roots of the preconditioner's eigenvalues.
        weight_decay: decoupled decay X ← X (1 − η·wd) of each factor (as AdamW). It acts on the
            factors, not on ΔW, so a non-zero value breaks transformation invariance.
        escaped_mass: add the damping ρI that keeps the preconditioner from shrinking when the
            partner's basis rotates (the paper's escaped mass); False sets ρ = 0.
        clip: clip the global ℓ2 norm of all unmagnified gradients (over every pair of the
            optimizer) to this value before the moments are updated; None disables. This norm is
            itself transformation invariant (the authors' code clips it to 1.0).
        nonfinite: "skip" (a pair with a non-finite gradient is left untouched, a warning is issued
            and ``state[A]["nonfinite_skips"]`` is incremented) or "raise" (FloatingPointError).

    Same-shape pairs are updated as one batched stack. Low-precision factors are computed in fp32,
    and their optimizer state is kept in fp32. State per factor: the first moment (n×r, in the
    partner's basis), the r×r second moment, the escaped mass ρ, the partner's previous basis
    (n_partner×r) and the step count. Cost per pair O((in + out) r² + r³).

    DDP: unchanged. FSDP2 (``fully_shard``): the pairs are DTensors and every rank must call
    ``step()``. A factor split along its long side (B on dim 0, A on dim 1) steps on its rows with
    four r×r Gram all-reduces per pair; one split along r (A on dim 0, ``fully_shard``'s default)
    is all-gathered with its gradient, stepped whole on every rank and its moments kept whole.
    """

    def __init__(
        self,
        pairs: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        escaped_mass: bool = True,
        clip: float | None = 1.0,
        nonfinite: str = "skip",
    ) -> None:
        if clip is not None and not clip > 0.0:
            raise ValueError(f"LoRARITE: clip must be > 0 or None, got {clip}")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"LoRARITE: nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        self.clip = clip
        items = list(pairs)
        if not items:
            raise ValueError("LoRARITE: got no pairs; pass (A, B) tuples or param-group dicts")
        if all(isinstance(i, dict) for i in items):
            groups = items
        elif all(_is_pair(i) for i in items):
            groups = [{"pairs": items}]
        else:
            raise TypeError(
                "LoRARITE: pairs must be an iterable of (A, B) tensor tuples or of param-group dicts "
                "with a 'pairs' key, not a mix or plain tensors"
            )
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, escaped_mass=escaped_mass,
            nonfinite=nonfinite,
        )
        super().__init__(groups, defaults)
        if not any(g["num_pairs"] for g in self.param_groups):
            raise ValueError(
                "LoRARITE: no (A, B) pair in any param group, so every parameter would get plain AdamW; "
                "pass the pairs, e.g. stiefel_opt.adapters.lora_pairs(model) (the Trainer's "
                "optimizer_cls_and_kwargs route passes only {'params': ...} groups)"
            )

    def add_param_group(self, param_group: dict) -> None:
        """Add a group: ``{"pairs": [(A, B), ...], "params": [...], **hyperparameters}``."""
        group = dict(param_group)
        if "num_pairs" in group:
            raise ValueError("LoRARITE: 'num_pairs' is set by the optimizer; pass 'pairs' instead")
        pairs = list(group.pop("pairs", []))
        plain = group.pop("params", [])
        plain = [plain] if isinstance(plain, Tensor) else list(plain)
        flat: list[Tensor] = []
        where = f"param group {len(self.param_groups)}"
        for i, pair in enumerate(pairs):
            flat += self._check_pair(f"pair {i} of {where}", pair)
        seen = set()
        for p in flat + plain:
            if id(p) in seen:
                raise ValueError(
                    f"LoRARITE: a tensor of shape {tuple(p.shape)} appears twice in one param group; "
                    "each factor must belong to exactly one pair (or be a plain parameter) once"
                )
            seen.add(id(p))
        if not flat and not plain:
            raise ValueError("LoRARITE: a param group needs a non-empty 'pairs' or 'params'")
        group["params"] = flat + plain
        group["num_pairs"] = len(pairs)
        super().add_param_group(group)
        self._check_hyper(self.param_groups[-1])

    @staticmethod
    def _check_hyper(group: dict) -> None:
        lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if not lr >= 0.0:
            raise ValueError(f"LoRARITE: lr must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"LoRARITE: betas must be two values in [0, 1), got {betas}")
        if not eps > 0.0:
            raise ValueError(f"LoRARITE: eps must be > 0 (it keeps (V + ρI)^(-1/2) finite on a zero gradient), got {eps}")
        if not wd >= 0.0:
            raise ValueError(f"LoRARITE: weight_decay must be >= 0, got {wd}")
        if group["nonfinite"] not in ("skip", "raise"):
            raise ValueError(f"LoRARITE: nonfinite must be 'skip' or 'raise', got {group['nonfinite']!r}")

    @staticmethod
    def _check_pair(name: str, pair: Any) -> list[Tensor]:
        if not _is_pair(pair):
            raise TypeError(f"LoRARITE: {name} must be a tuple (A, B) of two tensors, got {type(pair).__name__}")
        a, b = pair
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(
                f"LoRARITE: {name}: A (r×in) and B (out×r) must be 2-D, got shapes "
                f"{tuple(a.shape)} and {tuple(b.shape)}"
            )
        r = a.shape[0]
        if b.shape[1] != r:
            raise ValueError(
                f"LoRARITE: {name}: A has shape {tuple(a.shape)} (r×in) and B has shape "
                f"{tuple(b.shape)} (out×r), but A.shape[0] = {r} != B.shape[1] = {b.shape[1]}. "
                "Pass (A, B) in the PEFT layout, lora_A.weight first."
            )
        if r > a.shape[1] or r > b.shape[0]:
            raise ValueError(
                f"LoRARITE: {name}: rank r = {r} exceeds in = {a.shape[1]} or out = {b.shape[0]}; "
                "LoRA-RITE needs r <= min(in, out)"
            )
        if a.dtype != b.dtype or a.device != b.device:
            raise ValueError(
                f"LoRARITE: {name}: A ({a.dtype}, {a.device}) and B ({b.dtype}, {b.device}) must "
                "share dtype and device"
            )
        if not a.is_floating_point():
            raise TypeError(f"LoRARITE: {name}: factors must be floating point, got {a.dtype}")
        return [a, b]

    # -- state ---------------------------------------------------------------------------------
    #
    # Each side of a bucket (the A's, or the B's, of same-shape pairs) is an engine Bucket: its
    # moments are views of stacked buffers (Bucket.stacked/assign and the engine's one reuse rule);
    # the step count stays per factor, as the native optimizers keep it.

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("clip", 1.0)

    @property
    def nonfinite_skips(self) -> int:
        """Total number of pair updates skipped for a non-finite gradient."""
        total = 0
        for group in self.param_groups:
            for a in group["params"][0 : 2 * group["num_pairs"] : 2]:
                total += self.state[a].get("nonfinite_skips", 0) if a in self.state else 0
        return total

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but the pair state keeps its saved (fp32)
        dtype instead of being cast to the factor's dtype, so a bf16 run resumes bit-identically."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            s.get("num_pairs") != g["num_pairs"] or len(s["params"]) != len(g["params"])
            for s, g in zip(saved_groups, self.param_groups)
        ):
            raise ValueError(
                "LoRARITE.load_state_dict: the saved state has a different layout of param groups, "
                "pairs or plain parameters than this optimizer; build it with the same pairs"
            )
        super().load_state_dict(state_dict)
        for saved, group in zip(saved_groups, self.param_groups):
            n = 2 * group["num_pairs"]
            for pid, p in zip(saved["params"][:n], group["params"][:n]):
                if pid in state_dict["state"]:
                    self.state[p] = {
                        k: v.to(device=p.device, copy=True) if isinstance(v, Tensor) else v
                        for k, v in state_dict["state"][pid].items()
                    }

    # -- step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One LoRA-RITE step on every pair (AdamW on plain parameters). Returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = [self._prepare(group, *sides) for gi, group in enumerate(self.param_groups)
                   for sides in self._buckets(gi, group)]
        for group in self.param_groups:  # after the non-finite checks, which may raise
            self._adamw_step(group, group["params"][2 * group["num_pairs"] :])
        if not buckets:
            return loss
        coeff = None
        if self.clip is not None:
            norm = torch.stack([bk["sumsq"].to(torch.float64) for bk in buckets]).sum().sqrt()
            coeff = (self.clip / (norm + 1e-6)).clamp(max=1.0)
        for bk in buckets:
            self._apply(bk, coeff)
        return loss

    def _adamw_step(self, group: dict, plain: list[Tensor]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in plain:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError("LoRARITE: plain parameters (AdamW) do not support sparse gradients")
            st = self.state[p]
            if not st:
                st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        _adamw(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            has_complex=any(torch.is_complex(p) for p in params),
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )

    def _buckets(self, gi: int, group: dict) -> list[tuple[Bucket, Bucket]]:
        """The group's pairs with a gradient, as (A side, B side) engine buckets of pairs of equal
        shapes, dtype, device and shard layouts (:data:`PLAIN` geometry: each factor's own layout)."""
        k = group["num_pairs"]
        buckets: dict[tuple, tuple[Bucket, Bucket]] = {}
        for i, (a, b) in enumerate(zip(group["params"][0 : 2 * k : 2], group["params"][1 : 2 * k : 2])):
            if a.grad is None and b.grad is None:
                continue
            if any(t.grad is not None and t.grad.is_sparse for t in (a, b)):
                raise ValueError("LoRARITE: sparse gradients are not supported")
            # the names are formatted only when a message needs them
            parts = [_dist.factor_parts(t, dim, lambda f=f, t=t, i=i: f"LoRARITE: factor {f} (shape {tuple(t.shape)}) "
                                                                      f"of pair {i} in param group {gi}")
                     for f, t, dim in (("A", a, 1), ("B", b, 0))]
            key = (a.shape, b.shape, a.dtype, a.device, parts[0][2], parts[1][2])
            if key not in buckets:
                buckets[key] = tuple(Bucket(PLAIN, tuple(local.shape), compute_dtype(a.dtype), layout=layout)
                                     for local, _, layout in parts)
            for side, t, (local, grad, _) in zip(buckets[key], (a, b), parts):
                side.add(t, local, torch.zeros_like(local) if grad is None else grad, self.state[t],
                         lambda i=i, a=a, b=b: f"pair {i} in param group {gi} (A {tuple(a.shape)}, B {tuple(b.shape)})")
        return list(buckets.values())

    @staticmethod
    def _stack(side: Bucket) -> tuple[Tensor, Tensor, Tensor]:
        """(local factors, factors, gradients) of a bucket side as stacks in the factor's own
        layout; for a ``gather`` layout the whole factors and gradients (one all-gather of both)."""
        x, g = side.stack(side.params), side.stack(side.grads)
        if side.layout is None or side.layout.mode != "gather":
            return x, x, g
        both = _dist.gather(torch.stack([x, g]), side.layout)
        return x, both[0], both[1]

    def _prepare(self, group: dict, sa: Bucket, sb: Bucket) -> dict:
        """Stack a bucket of same-shape pairs: QR of both factors, Grams of the unmagnified
        gradients, and the non-finite check (on the Gram diagonals). A pair that fails it raises,
        or is masked (zero gradients and Grams) before anything is written.

        FSDP2 shards (see :mod:`stiefel_opt.distributed`): a factor split along its long side (B's
        rows, A's columns) steps on its rows of the tall form, its n-row Grams all-reduced (r×r);
        a factor split along r (``fully_shard``'s default Shard(0) for A) is all-gathered with its
        gradient, stepped whole on every rank (its moments are kept whole), and each rank keeps its
        rows."""
        la, lb = sa.layout, sb.layout
        (xa_loc, xa, ga), (xb_loc, xb, gb) = self._stack(sa), self._stack(sb)
        xa, ga = xa.transpose(-1, -2), ga.transpose(-1, -2)  # k×in×r (tall Aᵀ; local rows when sharded)
        ua, ra_pinv = F.rite_basis(xa, rows=_dist.reduction(la))
        ub, rb_pinv = F.rite_basis(xb, rows=_dist.reduction(lb))
        gram_b = F.rite_unmagnified_gram(gb, ra_pinv, rows=_dist.reduction(lb))
        gram_a = F.rite_unmagnified_gram(ga, rb_pinv, rows=_dist.reduction(la))
        diag = torch.cat([gram_a.diagonal(dim1=-2, dim2=-1), gram_b.diagonal(dim1=-2, dim2=-1)], -1)
        bad = ~torch.isfinite(diag).all(-1)
        if bool(bad.any()):
            message = nonfinite_message("LoRARITE", "non-finite gradient", sa.describe(bad), group["nonfinite"])
            if group["nonfinite"] == "raise":
                raise FloatingPointError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            ga, gb, gram_a, gram_b = (torch.where(bad[:, None, None], 0.0, t) for t in (ga, gb, gram_a, gram_b))
        else:
            bad = None
        sumsq = (gram_a.diagonal(dim1=-2, dim2=-1).sum() + gram_b.diagonal(dim1=-2, dim2=-1).sum())
        return dict(group=group, bad=bad, sumsq=sumsq, sides=(
            (sa, xa_loc, xa, ga, gram_a, ub, rb_pinv, sa.owners[0].shape[1], lb),
            (sb, xb_loc, xb, gb, gram_b, ua, ra_pinv, sb.owners[0].shape[0], la),
        ))

    def _apply(self, bk: dict, coeff: Tensor | None) -> None:
        """Update both sides of a bucket (the masked pairs keep their factors and moments), then
        their step counts and skip counters."""
        group, bad = bk["group"], bk["bad"]
        news = [self._side_update(group, side, *rest, coeff, bad) for side, _, *rest in bk["sides"]]
        news[0] = news[0].transpose(-1, -2)  # A from its tall form
        for (side, x_loc, *_), new in zip(bk["sides"], news):
            if side.layout is not None and side.layout.mode == "gather":
                new = _dist.local_block(new, side.layout, x_loc.shape[side.layout.axis])
            side.unstack_into(side.params, new if bad is None else torch.where(bad[:, None, None], x_loc, new))
        skips = [0] * len(news[0]) if bad is None else bk["sides"][0][0].per_param(bad)
        moved = []
        for side, *_ in bk["sides"]:
            for st, n_bad in zip(side.states, skips):
                st["nonfinite_skips"] += n_bad
                if not n_bad:
                    moved.append(st["step"])
        if moved:
            torch._foreach_add_(moved, 1.0)

    @staticmethod
    def _side_update(group: dict, side: Bucket, x: Tensor, g: Tensor, gram: Tensor,
                     u_partner: Tensor, r_pinv_partner: Tensor, n: int, partner_layout,
                     coeff: Tensor | None, bad: Tensor | None) -> Tensor:
        """One side of a bucket: tall factors X (n rows), the partner's basis U and R⁺ (row-sharded
        per ``partner_layout``), the clip coefficient c (None: 1):

            V ← β̂₂ P V Pᵀ + (1 − β̂₂) c² ḡᵀḡ / n,  M ← β̂₁ M Pᵀ + (1 − β̂₁) ḡ c (V + ρI)^(−1/2),

        with ρ and P as in the module docstring. The new moments are stored (the old ones kept for
        the ``bad`` pairs); returns X⁺ = (1 − η·wd) X − η M R⁺ᵀ."""
        beta1, beta2 = group["betas"]
        r = x.shape[-1]
        shapes = {"exp_avg": tuple(x.shape[1:]), "exp_avg_sq": (r, r), "escaped_mass": (),
                  "partner_basis": tuple(u_partner.shape[1:])}
        for st in side.states:
            if "exp_avg" not in st:
                st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                st.update({k: x.new_zeros(s) for k, s in shapes.items()}, nonfinite_skips=0)
        old = {k: side.stacked(k, shape=s) for k, s in shapes.items()}
        t = (torch.stack([st["step"] for st in side.states]) + 1).to(x.dtype)
        b1 = beta1 * (1 - beta1 ** (t - 1)) / (1 - beta1**t)
        b2 = beta2 * (1 - beta2 ** (t - 1)) / (1 - beta2**t)
        v_old, rho = old["exp_avg_sq"], old["escaped_mass"]
        p, v_moved = F.rite_transport(u_partner, old["partner_basis"], v_old, rows=_dist.reduction(partner_layout))
        if group["escaped_mass"]:
            rho = b2 * (rho + F.rite_escaped_mass(v_old, v_moved))
        c2 = 1.0 if coeff is None else coeff.square().to(x.dtype)
        v = b2[:, None, None] * v_moved + ((1 - b2) * c2 / n)[:, None, None] * gram
        k = F.rite_inv_root(v, rho, group["eps"])
        if coeff is not None:
            k = k * coeff.to(x.dtype)
        m = F.rite_first_moment(old["exp_avg"], p, g, r_pinv_partner, k, b1)
        lr, wd = group["lr"], group["weight_decay"]
        x_new = F.rite_update(x, m, r_pinv_partner, lr, 1.0 - lr * wd)
        for key, new in {"exp_avg": m, "exp_avg_sq": v, "escaped_mass": rho, "partner_basis": u_partner}.items():
            if bad is not None:
                new = torch.where(bad.view(-1, *[1] * len(shapes[key])), old[key], new)
            if not side.viewed(key, old[key]):
                side.assign(key, new, shape=shapes[key])
            elif new is not old[key]:
                old[key].copy_(new)
        return x_new
