"""The wrapper options that reproduce published recipes, each checked against a transcription of the
official update rule (tests/_official.py, from the published formulas, no code copied): float64, a Linear
64→48 adapter ΔW = B Θ A with r = 4 in PEFT's layout (B 48×4, A 4×64), 20 steps from identical
tensors, gradients from the same data.

- PoLAR: clip the raw gradients by global norm (optional), write the field (GZᵀ − ZGᵀ)Z + λZ(ZᵀZ − I)
  for Z = B and Z = Aᵀ, stock AdamW on everything  ↔  ``landing(AdamW, lam=λ, field="polar",
  max_grad_norm=..., allow_weight_decay=...)``.
- StelLA: canonical gradient G − X GᵀX, stock AdamW (no state transport), displacement divided by
  √(n/hidden), projected at the old point, polar factor  ↔  ``riemannian(AdamW, metric="canonical",
  tangent_state=(), hidden_size=hidden)``.
"""
import math

import pytest
import torch
from _official import max_diff, polar_step, stella_step

import stiefel_opt.functional as F
from stiefel_opt import landing, riemannian

OUT, IN, R, STEPS = 48, 64, 4, 20
F64 = torch.float64


def _adapter():
    """[A (4×64, orthonormal rows), B (48×4, orthonormal columns), Θ (4×4)] and the frozen W0."""
    g = torch.Generator().manual_seed(0)
    a = F.random_point(R, IN, dtype=F64, generator=g)
    b = F.random_point(OUT, R, dtype=F64, generator=g)
    theta = 0.5 * torch.randn(R, R, dtype=F64, generator=g)
    w0 = torch.randn(OUT, IN, dtype=F64, generator=g) / 8
    return [torch.nn.Parameter(t) for t in (a, b, theta)], w0


def _backward(params, w0, step):
    a, b, theta = params
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, IN, dtype=F64, generator=g)
    y = torch.randn(16, OUT, dtype=F64, generator=g)
    for p in params:
        p.grad = None
    (x @ (w0 + b @ theta @ a).T - y).square().mean().backward()


def _factors(params):
    """(parameter, stored transposed) of the factors: B (tall) and A (wide, tall form Aᵀ)."""
    a, b, _ = params
    return [(b, False), (a, True)]


def _adamw(params, lr, wd_factors, wd_theta):
    """AdamW with the factors in a group declared Stiefel (a key the plain AdamW ignores)."""
    a, b, theta = params
    return torch.optim.AdamW([{"params": [a, b], "manifold": "stiefel", "weight_decay": wd_factors},
                              {"params": [theta], "weight_decay": wd_theta}], lr=lr)


# --- PoLAR -------------------------------------------------------------------------------------------

POLAR_CASES = [(5e-3, None, 0.0), (5e-3, 0.05, 0.0), (1.0, None, 0.01), (1.0, 0.05, 0.01)]


@pytest.mark.parametrize("lam,max_norm,wd", POLAR_CASES,
                         ids=[f"lam={c[0]}-clip={c[1]}-wd={c[2]}" for c in POLAR_CASES])
def test_landing_polar_field_reproduces_the_official_polar_update(lam, max_norm, wd):
    ref, w0 = _adapter()
    ours, _ = _adapter()
    relative, _ = _adapter()
    ref_opt = _adamw(ref, 4e-3, wd, wd)
    kw = dict(max_grad_norm=max_norm, allow_weight_decay=wd > 0)
    our_opt = landing(_adamw(ours, 4e-3, wd, wd), lam=lam, field="polar", **kw)
    rel_opt = landing(_adamw(relative, 4e-3, wd, wd), lam=lam, field="relative", **kw)
    norms, worst = [], 0.0
    for step in range(STEPS):
        _backward(ref, w0, step)
        norms.append(polar_step(ref, _factors(ref), ref_opt, lam, max_norm))
        for params, opt in ((ours, our_opt), (relative, rel_opt)):
            _backward(params, w0, step)
            opt.step()
        worst = max(worst, max_diff(ref, ours))
    assert worst <= 1e-12, worst
    assert max_diff(ref, relative) > 1e-7  # the package's own convention is a different update
    if max_norm is not None:
        assert min(norms) > 2 * max_norm  # the clipping acted at every step


# --- StelLA ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hidden", [None, 32], ids=["no-scaling", "hidden=32"])
def test_riemannian_canonical_reproduces_the_official_stella_update(hidden):
    ref, w0 = _adapter()
    ours, _ = _adapter()
    default, _ = _adapter()
    ref_opt = _adamw(ref, 5e-3, 0.0, 0.01)
    our_opt = riemannian(_adamw(ours, 5e-3, 0.0, 0.01), metric="canonical", tangent_state=(), hidden_size=hidden)
    def_opt = riemannian(_adamw(default, 5e-3, 0.0, 0.01))
    worst = 0.0
    for step in range(STEPS):
        _backward(ref, w0, step)
        stella_step(ref, _factors(ref), ref_opt, hidden)
        for params, opt in ((ours, our_opt), (default, def_opt)):
            _backward(params, w0, step)
            opt.step()
        worst = max(worst, max_diff(ref, ours))
    assert worst <= 1e-12, worst
    assert max_diff(ref, default) > 1e-7  # Euclidean metric + transported moments: another update
    assert max(float(F.distance(p.detach())) for p in ours[:2]) < 1e-12


def test_hidden_size_scales_each_displacement_by_sqrt_hidden_over_rows():
    """One SGD step from X with a tangent gradient: the displacement is −lr·√(hidden/n)·G before
    the retraction, n the tall row count (64 for a 4×64 wide matrix)."""
    for shape in [(48, 4), (4, 64)]:
        x = torch.nn.Parameter(F.random_point(*shape, dtype=F64))
        g = F.proj_tangent(x.detach(), torch.randn(shape, dtype=F64))
        expected = F.retract(x.detach(), -0.01 * math.sqrt(32 / max(shape)) * g)
        opt = riemannian(torch.optim.SGD([{"params": [x], "manifold": "stiefel"}], lr=0.01), hidden_size=32)
        x.grad = g.clone()
        opt.step()
        assert torch.allclose(x.detach(), expected, rtol=0, atol=1e-14)


def test_new_options_are_validated():
    x = torch.nn.Parameter(F.random_point(8, 2))
    with pytest.raises(ValueError, match="field must be one of"):
        landing(torch.optim.SGD([{"params": [x], "manifold": "stiefel"}], lr=0.1), field="paper")
    with pytest.raises(ValueError, match="max_grad_norm must be None or > 0"):
        landing(torch.optim.SGD([{"params": [x], "manifold": "stiefel"}], lr=0.1), max_grad_norm=0.0)
    with pytest.raises(ValueError, match="hidden_size must be None or > 0"):
        riemannian(torch.optim.SGD([{"params": [x], "manifold": "stiefel"}], lr=0.1), hidden_size=-1)
    with pytest.raises(ValueError, match="allow_weight_decay=True"):
        landing(torch.optim.AdamW([{"params": [x], "manifold": "stiefel"}], lr=0.1))
    opt = landing(torch.optim.AdamW([{"params": [x], "manifold": "stiefel"}], lr=0.1), allow_weight_decay=True)
    assert opt.param_groups[0]["weight_decay"] == 0.01


def test_max_grad_norm_clips_every_parameter_like_clip_grad_norm_before_the_field():
    """The landing field / Riemannian gradient is built from the clipped gradients of all the
    optimizer's parameters (a Stiefel factor and a plain one), exactly as
    torch.nn.utils.clip_grad_norm_ followed by the field would."""
    torch.manual_seed(1)
    x = torch.nn.Parameter(F.random_point(12, 3, dtype=F64))
    w = torch.nn.Parameter(torch.randn(5, dtype=F64))
    gx, gw = 3 * torch.randn(12, 3, dtype=F64), 3 * torch.randn(5, dtype=F64)
    holder = [torch.nn.Parameter(torch.zeros(12, 3, dtype=F64)), torch.nn.Parameter(torch.zeros(5, dtype=F64))]
    holder[0].grad, holder[1].grad = gx.clone(), gw.clone()
    torch.nn.utils.clip_grad_norm_(holder, 0.5)
    z, g = x.detach().clone(), holder[0].grad
    expected_x = z - (g @ (z.T @ z) - z @ (g.T @ z) + 0.5 * z @ (z.T @ z - torch.eye(3, dtype=F64)))
    w0 = w.detach().clone()
    expected_w = w0 - holder[1].grad
    opt = landing(torch.optim.SGD([{"params": [x], "manifold": "stiefel"}, {"params": [w]}], lr=1.0),
                  lam=0.5, field="polar", max_grad_norm=0.5)
    x.grad, w.grad = gx.clone(), gw.clone()
    opt.step()
    assert torch.allclose(x.detach(), expected_x, rtol=0, atol=1e-14)
    assert torch.allclose(w.detach(), expected_w, rtol=0, atol=1e-14)

    y = torch.nn.Parameter(z.clone())
    v = torch.nn.Parameter(w0.clone())
    opt = riemannian(torch.optim.SGD([{"params": [y], "manifold": "stiefel"}, {"params": [v]}], lr=1.0),
                     max_grad_norm=0.5)
    y.grad, v.grad = gx.clone(), gw.clone()
    opt.step()
    assert torch.allclose(y.detach(), F.retract(z, -F.proj_tangent(z, g)), rtol=0, atol=1e-14)
    assert torch.allclose(v.detach(), expected_w, rtol=0, atol=1e-14)
