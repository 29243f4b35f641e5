"""Published recipes, reproduced exactly: one function per paper, each returning a ready optimizer for
a model with injected adapters (:func:`~stiefel_opt.adapters.inject_adapters`).

- :func:`polar`: PoLAR (Lion et al. 2025) — clip, landing field in PoLAR's units, stock AdamW.
- :func:`stella`: StelLA (Li et al. 2025) — canonical gradient, AdamW without state transport,
  displacement scaled by √(hidden/n), polar retraction.
- :func:`lora_rite`: LoRA-RITE (Yen et al. 2025) over every LoRA/DoRA pair.
- :func:`symlora`: SymLoRA (Panoutsos et al. 2025), Q diag(λ) Qᵀ with Q kept on St(n, r).
- :func:`cosine_with_warmup`: PoLAR's schedule (cosine, 3% linear warm-up).

The published hyperparameters are in :data:`POLAR_DEFAULTS` and :data:`STELLA_DEFAULTS`
(docs/recipes.md says what differs from the papers' setups at CPU scale).
"""
from __future__ import annotations

import math
from types import MappingProxyType

import torch
from torch import nn

from .adapters import adapter_layers, lora_pairs, param_groups
from .optim import landing, riemannian
from .optim.lora_rite import LoRARITE

__all__ = ["polar", "stella", "lora_rite", "symlora", "cosine_with_warmup", "POLAR_DEFAULTS", "STELLA_DEFAULTS"]

POLAR_DEFAULTS = MappingProxyType({
    "lr": 4e-3,             # LLM runs; 10× LoRA's 4e-4
    "lora_lr": 4e-4,
    "lam": 5e-3,            # LLM runs, PoLAR's units (field="polar"); GLUE: lam_glue
    "lam_glue": 1.0,
    "lora_alpha": 32,       # LLM runs (GLUE: α = r = 8)
    "weight_decay": 0.0,    # LLM runs; the GLUE runs keep torch AdamW's 0.01 on every parameter
    "weight_decay_glue": 0.01,
    "max_grad_norm": 1.0,   # the HF Trainer's clipping, before the field
    "schedule": "cosine",
    "warmup_ratio": 0.03,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
})
"""PoLAR's official hyperparameters (kcc-lion/polar launch scripts): LLM commonsense runs unless
suffixed ``_glue`` (DeBERTa-v3-base GLUE: λ = 1, weight decay 0.01, linear schedule with 6% warm-up)."""

STELLA_DEFAULTS = MappingProxyType({
    "lr": 5e-4,
    "r": 32,
    "lora_alpha": 64,
    "core": "diag",         # AdapterConfig("stella", core="diag"): the published script's diagonal S
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,   # the HF Trainer's default clipping, before the Riemannian gradient
    "schedule": "linear",
    "warmup_steps": 500,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
})
"""StelLA's published commonsense setup (SonyResearch/stella, Llama-3-8B)."""


def _require(model: nn.Module, recipe: str, methods: tuple[str, ...]) -> None:
    """``ValueError`` unless ``model`` has adapters and every one is of ``methods``."""
    layers = adapter_layers(model)
    wrong = {name: layer.method for name, layer in layers.items() if layer.method not in methods}
    if not layers or wrong:
        found = f"adapters {wrong}" if wrong else "no adapters"
        raise ValueError(
            f"recipes.{recipe}: the model has {found}; inject {' or '.join(map(repr, methods))} adapters first, "
            f"e.g. inject_adapters(model, AdapterConfig({methods[0]!r}, r=..., target_modules=...))"
        )


def _groups(model: nn.Module, lr: float, weight_decay: float, stiefel_decay: bool) -> list[dict]:
    """:func:`~stiefel_opt.adapters.param_groups` with ``weight_decay`` on every group, the Stiefel
    group's only when ``stiefel_decay`` (the official scripts decay 1-D parameters too)."""
    groups = param_groups(model, lr)
    for g in groups:
        if stiefel_decay or "manifold" not in g:
            g["weight_decay"] = weight_decay
    return groups


def polar(model: nn.Module, lr: float = 4e-3, lam: float = 5e-3, weight_decay: float = 0.0,
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          max_grad_norm: float | None = 1.0) -> torch.optim.AdamW:
    """PoLAR's official update: AdamW wrapped by :func:`~stiefel_opt.landing` (``field="polar"``).

    Each step: (1) all gradients are clipped to total 2-norm ``max_grad_norm``
    (``clip_grad_norm_``; None: no clipping — leave it None under an HF Trainer, which clips itself);
    (2) the gradient G of each factor Z ∈ {X, Y} (tall) becomes
    Λ = (GZᵀ − ZGᵀ)Z + λZ(ZᵀZ − I), λ = ``lam`` in PoLAR's units, computed in O(nr²);
    (3) AdamW(``lr``, ``betas``, ``eps``, ``weight_decay``) steps every parameter on its ``.grad``;
    no retraction. ``weight_decay`` applies to every trainable parameter, X and Y included (the
    GLUE runs' 0.01; the LLM runs' 0). λ = 5e-3 (LLMs) or 1 (GLUE); the package's relative λ is half.
    """
    _require(model, "polar", ("polar",))
    opt = torch.optim.AdamW(_groups(model, lr, weight_decay, stiefel_decay=True), lr=lr, betas=betas, eps=eps,
                            weight_decay=weight_decay)
    return landing(opt, lam=lam, field="polar", max_grad_norm=max_grad_norm, allow_weight_decay=weight_decay > 0)


def stella(model: nn.Module, lr: float = 5e-4, grad_scaling: bool | float = True,
           betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
           max_grad_norm: float | None = 1.0) -> torch.optim.AdamW:
    """StelLA's official update: AdamW wrapped by :func:`~stiefel_opt.riemannian`.

    Each step: (1) clip all gradients to total 2-norm ``max_grad_norm`` (None: none); (2) the
    gradient of each factor X ∈ {U, V} (tall, n×r) becomes G − XGᵀX (canonical metric); (3) AdamW
    steps, its moments left untouched (no transport); (4) Δ = s·(X_new − X) with s = √(h/n),
    Δ ← Δ − X sym(XᵀΔ), X ← polar factor of X + Δ. ``grad_scaling``: True takes h from
    ``model.config.hidden_size``, a number is h, False gives s = 1. ``weight_decay`` applies to every
    trainable parameter but U and V (StelLA's Trainer takes them out of the decay).
    """
    _require(model, "stella", ("stella",))
    hidden = None
    if grad_scaling is True:
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden is None:
            raise ValueError(
                f"recipes.stella: grad_scaling=True reads model.config.hidden_size, which "
                f"{type(model).__name__} does not have; pass grad_scaling=<hidden size> or grad_scaling=False"
            )
    elif grad_scaling is not False:
        hidden = grad_scaling
    opt = torch.optim.AdamW(_groups(model, lr, weight_decay, stiefel_decay=False), lr=lr, betas=betas, eps=eps,
                            weight_decay=weight_decay)
    return riemannian(opt, retraction="polar", metric="canonical", tangent_state=(), hidden_size=hidden,
                      max_grad_norm=max_grad_norm)


def lora_rite(model: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
              weight_decay: float = 0.0, escaped_mass: bool = True, clip: float | None = 1.0) -> LoRARITE:
    """LoRA-RITE (:class:`~stiefel_opt.LoRARITE`) on every (A, B) pair of the model's LoRA/DoRA
    layers; the other trainable parameters (DoRA magnitudes, saved heads) get AdamW in the same
    optimizer. Per factor X with partner Y = UR: ḡ = ∇_X R⁺, V ← β̂₂PVPᵀ + (1−β̂₂)ḡᵀḡ/n,
    M ← β̂₁MPᵀ + (1−β̂₁)ḡ(V + ρI)^(−1/2), X ← X − η M R⁺ᵀ (P = U_tᵀU_{t−1}). ``clip`` bounds the
    global norm of the unmagnified gradients (the authors clip those instead of the raw gradients).
    """
    _require(model, "lora_rite", ("lora", "dora"))
    pairs = lora_pairs(model)
    paired = {id(p) for pair in pairs for p in pair}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in paired]
    return LoRARITE([{"pairs": pairs, "params": rest}], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                    escaped_mass=escaped_mass, clip=clip)


def symlora(model: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
            weight_decay: float = 0.0, max_grad_norm: float | None = None) -> torch.optim.AdamW:
    """SymLoRA, ΔW = s·Q diag(λ) Qᵀ with Q ∈ St(n, r) and λ ∈ ℝ^r (λ₀ = 0): AdamW wrapped by
    :func:`~stiefel_opt.riemannian` with the package's defaults. Q's gradient becomes
    P_Q(G) = G − Q sym(QᵀG); AdamW steps; Q ← polar factor of Q + P_Q(Q_new − Q); AdamW's first
    moment is projected onto the tangent space at the new Q. λ (and any full core) is plain AdamW.
    The paper fixes only the parametrization; this optimizer is the package's choice.
    """
    _require(model, "symlora", ("symlora",))
    opt = torch.optim.AdamW(param_groups(model, lr, weight_decay=weight_decay), lr=lr, betas=betas, eps=eps,
                            weight_decay=weight_decay)
    return riemannian(opt, retraction="polar", metric="euclidean", max_grad_norm=max_grad_norm)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int,
                       warmup_ratio: float = 0.03) -> torch.optim.lr_scheduler.LambdaLR:
    """PoLAR's schedule: the lr factor rises linearly over w = ⌈warmup_ratio·total_steps⌉ steps, then
    follows ½(1 + cos(π·(t − w)/(total_steps − w))) — transformers' ``get_cosine_schedule_with_warmup``
    when transformers is installed, the same formula in a ``LambdaLR`` otherwise."""
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"cosine_with_warmup: total_steps must be a positive int, got {total_steps!r}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"cosine_with_warmup: warmup_ratio must lie in [0, 1), got {warmup_ratio!r}")
    warmup = math.ceil(total_steps * warmup_ratio)  # as transformers' TrainingArguments.get_warmup_steps
    try:
        from transformers import get_cosine_schedule_with_warmup
    except ImportError:
        def factor(step: int) -> float:
            if step < warmup:
                return step / max(1, warmup)
            progress = (step - warmup) / max(1, total_steps - warmup)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
