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
from collections import defaultdict
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim.adamw import adamw as _adamw
from torch.optim.optimizer import _get_scalar_dtype

from .. import distributed as _dist
from .. import functional as F

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
    # The state of each side of a bucket (all A's, or all B's, of equal-shape pairs) is kept in
    # stacked buffers; state[p][key] are views of them, so the hot path neither stacks nor unbinds
    # the moments. The buffers are rebuilt when the views were replaced (load_state_dict, a
    # different bucket composition).

    _SIDE_KEYS = ("step", "exp_avg", "exp_avg_sq", "escaped_mass", "partner_basis")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("clip", 1.0)
        self._stacks = {}

    def _side_state(self, params: list[Tensor], n_long: int, n_partner: int, r: int,
                    cdt: torch.dtype) -> dict[str, Tensor]:
        stacks = self.__dict__.setdefault("_stacks", {})
        key = tuple(id(p) for p in params)
        cached = stacks.get(key)
        if cached is not None and all(
            self.state[p].get("exp_avg") is view for p, view in zip(params, cached["views"])
        ):
            return cached["bufs"]
        device = params[0].device
        for p in params:
            st = self.state[p]
            if "exp_avg" not in st:
                st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                st["exp_avg"] = torch.zeros(n_long, r, dtype=cdt, device=device)
                st["exp_avg_sq"] = torch.zeros(r, r, dtype=cdt, device=device)
                st["escaped_mass"] = torch.zeros((), dtype=cdt, device=device)
                st["partner_basis"] = torch.zeros(n_partner, r, dtype=cdt, device=device)
                st["nonfinite_skips"] = 0
        bufs = {k: torch.stack([self.state[p][k] for p in params]) for k in self._SIDE_KEYS}
        for i, p in enumerate(params):
            for k in self._SIDE_KEYS:
                self.state[p][k] = bufs[k][i]
        for k in list(stacks):  # drop stacks that share a parameter with this one
            if set(k) & set(key):
                del stacks[k]
        stacks[key] = {"bufs": bufs, "views": [self.state[p]["exp_avg"] for p in params]}
        return bufs

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
        buckets = []
        for group in self.param_groups:
            k = group["num_pairs"]
            self._adamw_step(group, group["params"][2 * k :])
            by_shape: dict[tuple, list[tuple]] = defaultdict(list)
            for i, (a, b) in enumerate(zip(group["params"][0 : 2 * k : 2], group["params"][1 : 2 * k : 2])):
                if a.grad is None and b.grad is None:
                    continue
                if (a.grad is not None and a.grad.is_sparse) or (b.grad is not None and b.grad.is_sparse):
                    raise ValueError("LoRARITE: sparse gradients are not supported")
                fa = _dist.factor_parts(a, 1, lambda i=i, f="A", t=a: self._describe(group, i, f, t))
                fb = _dist.factor_parts(b, 0, lambda i=i, f="B", t=b: self._describe(group, i, f, t))
                by_shape[(a.shape, b.shape, a.dtype, a.device, fa[2], fb[2])].append((a, b, fa, fb))
            buckets += [self._prepare(group, items) for items in by_shape.values()]
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

    def _describe(self, group: dict, i: int, factor: str, t: Tensor) -> str:
        gi = next(j for j, g in enumerate(self.param_groups) if g is group)
        return f"LoRARITE: factor {factor} (shape {tuple(t.shape)}) of pair {i} in param group {gi}"

    @staticmethod
    def _stack(parts: list[tuple], layout, cdt: torch.dtype) -> tuple[Tensor, Tensor]:
        """(factors, gradients) of a bucket side as stacks of their local shards (the whole
        factors for a ``gather`` layout: one all-gather of both), in the factor's own layout."""
        xs = torch.stack([t for t, _, _ in parts]).to(cdt)
        gs = torch.stack([torch.zeros_like(t) if g is None else g for t, g, _ in parts]).to(cdt)
        if layout is None or layout.mode != "gather":
            return xs, gs
        both = _dist.gather(torch.stack([xs, gs]), layout)
        return both[0], both[1]

    def _prepare(self, group: dict, items: list[tuple]) -> dict:
        """Stack a bucket of same-shape pairs: QR of both factors, Grams of the unmagnified
        gradients, and the non-finite check (on the Gram diagonals).

        FSDP2 shards (see :mod:`stiefel_opt.distributed`): a factor split along its long side (B's
        rows, A's columns) steps on its rows of the tall form, its n-row Grams all-reduced (r×r);
        a factor split along r (``fully_shard``'s default Shard(0) for A) is all-gathered with its
        gradient, stepped whole on every rank (its moments are kept whole), and each rank keeps its
        rows."""
        a0, b0, (_, _, la), (_, _, lb) = items[0]
        r, n_in, n_out = a0.shape[0], a0.shape[1], b0.shape[0]
        cdt = torch.float32 if a0.dtype in F._LOW_PRECISION else a0.dtype
        a_params = [a for a, *_ in items]
        b_params = [b for _, b, *_ in items]
        xa, ga = self._stack([fa for *_, fa, _ in items], la, cdt)
        xb, gb = self._stack([fb for *_, fb in items], lb, cdt)
        xa, ga = xa.transpose(-1, -2), ga.transpose(-1, -2)  # k×in×r (tall Aᵀ; local rows when sharded)
        side_a = self._side_state(a_params, xa.shape[-2], xb.shape[-2], r, cdt)
        side_b = self._side_state(b_params, xb.shape[-2], xa.shape[-2], r, cdt)
        ua, ra_pinv = F.rite_basis(xa, rows=_dist.reduction(la))
        ub, rb_pinv = F.rite_basis(xb, rows=_dist.reduction(lb))
        gram_b = F.rite_unmagnified_gram(gb, ra_pinv, rows=_dist.reduction(lb))
        gram_a = F.rite_unmagnified_gram(ga, rb_pinv, rows=_dist.reduction(la))
        diag = torch.cat([gram_a.diagonal(dim1=-2, dim2=-1), gram_b.diagonal(dim1=-2, dim2=-1)], -1)
        ok = torch.isfinite(diag).all(-1)
        bad = None
        if not bool(ok.all()):
            bad = (~ok).nonzero().flatten()
            shapes = f"A {tuple(a0.shape)}, B {tuple(b0.shape)}"
            if group["nonfinite"] == "raise":
                raise FloatingPointError(
                    f"LoRARITE: non-finite gradient in {bad.numel()} pair(s) of shapes {shapes}; "
                    "pass nonfinite='skip' to skip those updates"
                )
            warnings.warn(
                f"LoRARITE: non-finite gradient in {bad.numel()} pair(s) of shapes {shapes}; their "
                "update was skipped (counted in state['nonfinite_skips'])",
                RuntimeWarning,
                stacklevel=3,
            )
            for i in bad.tolist():
                self.state[a_params[i]]["nonfinite_skips"] += 1
                self.state[b_params[i]]["nonfinite_skips"] += 1
            keep = ok[:, None, None]
            ga = torch.where(keep, ga, 0.0)
            gb = torch.where(keep, gb, 0.0)
            gram_a = torch.where(keep, gram_a, 0.0)
            gram_b = torch.where(keep, gram_b, 0.0)
        sumsq = (gram_a.diagonal(dim1=-2, dim2=-1).sum() + gram_b.diagonal(dim1=-2, dim2=-1).sum())
        return dict(
            group=group, a_params=a_params, b_params=b_params, bad=bad, layouts=(la, lb),
            locals=([fa[0] for *_, fa, _ in items], [fb[0] for *_, fb in items]), sides=(
                (side_a, xa, ga, gram_a, ub, rb_pinv, n_in, lb),
                (side_b, xb, gb, gram_b, ua, ra_pinv, n_out, la),
            ), sumsq=sumsq,
        )

    def _apply(self, bk: dict, coeff: Tensor | None) -> None:
        group, bad = bk["group"], bk["bad"]
        outs = []
        for side, *args in bk["sides"]:
            saved = None if bad is None else {k: v.index_select(0, bad) for k, v in side.items()}
            outs.append(self._side_update(group, side, *args, coeff))
            if saved is not None:
                for k, v in side.items():
                    v.index_copy_(0, bad, saved[k])
        a_params, b_params = bk["locals"]
        new = [outs[0].transpose(-1, -2), outs[1]]
        for i, (layout, local) in enumerate(zip(bk["layouts"], bk["locals"])):
            if layout is not None and layout.mode == "gather":
                new[i] = _dist.local_block(new[i], layout, local[0].shape[layout.axis])
        new_a = new[0].to(a_params[0].dtype).unbind(0)
        new_b = new[1].to(b_params[0].dtype).unbind(0)
        if bad is not None:
            skip = set(bad.tolist())
            keep = [i for i in range(len(a_params)) if i not in skip]
            a_params, b_params = [a_params[i] for i in keep], [b_params[i] for i in keep]
            new_a, new_b = [new_a[i] for i in keep], [new_b[i] for i in keep]
        if a_params:
            torch._foreach_copy_(a_params, list(new_a))
            torch._foreach_copy_(b_params, list(new_b))

    @staticmethod
    def _side_update(group: dict, side: dict[str, Tensor], x: Tensor, g: Tensor, gram: Tensor,
                     u_partner: Tensor, r_pinv_partner: Tensor, n: int, partner_layout,
                     coeff: Tensor | None) -> Tensor:
        """Update the stacked state of one side of a bucket in place; return the new tall factors
        (n: the factor's long side; the partner's basis may be row-sharded per ``partner_layout``)."""
        beta1, beta2 = group["betas"]
        side["step"].add_(1)
        t = side["step"].to(x.dtype)
        b1 = beta1 * (1 - beta1 ** (t - 1)) / (1 - beta1**t)
        b2 = beta2 * (1 - beta2 ** (t - 1)) / (1 - beta2**t)
        v_old, rho = side["exp_avg_sq"], side["escaped_mass"]
        p, v_moved = F.rite_transport(u_partner, side["partner_basis"], v_old, rows=_dist.reduction(partner_layout))
        if group["escaped_mass"]:
            rho.copy_(b2 * (rho + F.rite_escaped_mass(v_old, v_moved)))
        c2 = 1.0 if coeff is None else coeff.square().to(x.dtype)
        v_old.copy_(b2[:, None, None] * v_moved + ((1 - b2) * c2 / n)[:, None, None] * gram)
        k = F.rite_inv_root(v_old, rho, group["eps"])
        if coeff is not None:
            k = k * coeff.to(x.dtype)
        side["exp_avg"].copy_(F.rite_first_moment(side["exp_avg"], p, g, r_pinv_partner, k, b1))
        side["partner_basis"].copy_(u_partner)
        lr, wd = group["lr"], group["weight_decay"]
        return F.rite_update(x, side["exp_avg"], r_pinv_partner, lr, 1.0 - lr * wd)
