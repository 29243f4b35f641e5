"""Transcriptions of the official PoLAR and StelLA training steps, written here from the published
formulas (no code copied), shared by tests/test_wrappers_recipes.py and tests/test_recipes.py.

A factor is given as (parameter, transposed): its tall form (n×r, n ≥ r) is the parameter itself,
or its transpose when it is stored wide (PEFT's ``lora_A``, r×in). Each step runs after backward.
"""
import math

import torch


def max_diff(ps, qs) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(ps, qs))


def clip_like_trainer(params, max_norm) -> float:
    """The HF Trainer's clipping: if ``max_norm`` is not None, every gradient is multiplied by
    min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ the 2-norm of all gradients together. Returns ‖g‖."""
    norm = float(torch.sqrt(sum(p.grad.square().sum() for p in params)))
    if max_norm is not None:
        coef = min(1.0, max_norm / (norm + 1e-6))
        for p in params:
            p.grad.mul_(coef)
    return norm


def _tall(p, transposed):
    return p.detach().T if transposed else p.detach()


def _set_grad(p, tall, transposed):
    p.grad = tall.T.contiguous() if transposed else tall


def polar_step(params, factors, opt, lam, max_norm) -> float:
    """PoLAR's step: (1) clip all gradients like the Trainer; (2) each factor's tall form Z with
    gradient G gets the field (G Zᵀ − Z Gᵀ) Z + λ Z (ZᵀZ − I), built with the n×n skew matrix as the
    official callback does; (3) AdamW steps every parameter on its .grad. Returns ‖g‖ before clipping."""
    norm = clip_like_trainer(params, max_norm)
    for p, transposed in factors:
        z, g = _tall(p, transposed), _tall(p.grad, transposed)
        skew = g @ z.T - z @ g.T
        eye = torch.eye(z.shape[1], dtype=z.dtype)
        _set_grad(p, skew @ z + lam * z @ (z.T @ z - eye), transposed)
    opt.step()
    return norm


def stella_step(params, factors, opt, hidden, max_norm=None) -> float:
    """StelLA's step: clip all gradients like the Trainer; each factor's tall form X with gradient G
    gets .grad = G − X GᵀX (canonical metric); AdamW steps every parameter (its moments are left as
    they are); then for each factor Δ = X_after − X, Δ ← Δ / √(n / hidden) (n = rows of the tall
    form; skipped when hidden is None), Δ ← Δ − X sym(XᵀΔ), and X ← U Vᵀ with U Σ Vᵀ the thin SVD of
    X + Δ. Returns ‖g‖ before clipping."""
    norm = clip_like_trainer(params, max_norm)
    old = []
    for p, transposed in factors:
        x, g = _tall(p, transposed), _tall(p.grad, transposed)
        _set_grad(p, g - x @ (g.T @ x), transposed)
        old.append(x.clone())
    opt.step()
    with torch.no_grad():
        for (p, transposed), x in zip(factors, old):
            delta = _tall(p, transposed) - x
            if hidden is not None:
                delta = delta / math.sqrt(x.shape[0] / hidden)
            xtd = x.T @ delta
            delta = delta - x @ ((xtd + xtd.T) / 2)
            u, _, vh = torch.linalg.svd(x + delta, full_matrices=False)
            new = u @ vh
            p.copy_(new.T if transposed else new)
    return norm
