"""Optimizer parameter groups for a model with adapters."""
from __future__ import annotations

from torch import nn

from ..manifolds import is_stiefel

__all__ = ["param_groups"]


def param_groups(model: nn.Module, lr: float, stiefel_lr_scale: float = 1.0,
                 weight_decay: float = 0.0) -> list[dict]:
    """Groups of the trainable parameters of ``model``, ready for any optimizer.

    - Stiefel factors: ``{"manifold": "stiefel", "lr": lr·stiefel_lr_scale, "weight_decay": 0}``
      (decay is normal to the manifold; the key declares the constraint for optimizers that
      read it, e.g. after FSDP2 drops the parameter subclass).
    - Other matrices (LoRA A/B, PoLAR Θ, a full StelLA S, saved heads): ``lr``, ``weight_decay``.
    - 1-D parameters (biases, norm scales, DoRA magnitudes, spectra λ, diagonal cores): ``lr``,
      no weight decay.

    Empty groups are left out.
    """
    if lr <= 0:
        raise ValueError(f"param_groups: lr must be > 0, got {lr}")
    if stiefel_lr_scale <= 0:
        raise ValueError(f"param_groups: stiefel_lr_scale must be > 0, got {stiefel_lr_scale}")
    if weight_decay < 0:
        raise ValueError(f"param_groups: weight_decay must be >= 0, got {weight_decay}")
    stiefel, decay, no_decay = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if is_stiefel(getattr(p, "manifold", None)):
            stiefel.append(p)
        elif p.dim() <= 1:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": stiefel, "lr": lr * stiefel_lr_scale, "weight_decay": 0.0, "manifold": "stiefel"},
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"param_groups: {type(model).__name__} has no trainable parameters")
    return groups
