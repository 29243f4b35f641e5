"""The landing steps write into their own temporaries instead of new buffers (the Adam denominator into
the tangent term's buffer, X⁺ into Λ's): bit-identical to the fresh-buffer formulas, and nothing the
caller passed is written except the moments."""
from __future__ import annotations

import pytest
import torch

from stiefel_opt import functional as F
from stiefel_opt.functional import landing as L
from stiefel_opt.functional import steps as S

SHAPES = [(40, 6), (40, 36), (24, 20), (16, 16), (6, 40)]  # small, thin, mid, square, wide routes


def _inputs(shape, batch, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, p = shape
    x = F.random_point(*batch, max(n, p), min(n, p), dtype=dtype, generator=gen)
    x = x if n >= p else x.mT.contiguous()
    x = x + 1e-3 * torch.randn(x.shape, dtype=dtype, generator=gen)  # a little off the manifold
    g = torch.randn(x.shape, dtype=dtype, generator=gen)
    m = torch.randn(x.shape, dtype=dtype, generator=gen)
    v = torch.rand(x.shape, dtype=dtype, generator=gen)
    return x, g, m, v


def _fresh_land(x, u, xtx, scale, **kw):
    """_land with X⁺ in a new buffer (the formula before the out= path)."""
    field_holder = {}
    real_addcmul = torch.addcmul

    def addcmul(*args, out=None, **kwargs):
        field_holder["out"] = out
        return real_addcmul(*args, **kwargs)

    torch.addcmul = addcmul
    try:
        return L._land(x, u, xtx, scale, **kw)
    finally:
        torch.addcmul = real_addcmul


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [(), (3,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scalar_v", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_landing_adam_step_is_bit_identical_to_fresh_buffers(shape, batch, dtype, scalar_v, amsgrad):
    x, g, m, v = _inputs(shape, batch, dtype)
    if scalar_v:
        v = v.mean(dim=(-2, -1), keepdim=True)
    vmax = v.clone() if amsgrad else None
    x0, g0 = x.clone(), g.clone()
    state = [m.clone(), v.clone(), None if vmax is None else vmax.clone()]
    kw = dict(step=3, lr=0.05, scalar_v=scalar_v)
    out = F.landing_adam_update(x, g, *state, **kw)
    assert torch.equal(x, x0) and torch.equal(g, g0)  # only the moments are written

    # the same step through the public AdamRule (no scratch: its t is the caller's) and a fresh X⁺
    ref_state = [m.clone(), v.clone(), None if vmax is None else vmax.clone()]
    wide, (xt, gt, *st) = F.layout._tall_all(x, g, *ref_state)
    t, xtx = L._tangent_term(xt, gt)
    t_copy = t.clone()
    rule = F.AdamRule(*st, 3, 0.9, 0.999, 1e-8, scalar_v, F.LOCAL)
    d, s = rule(t)
    assert torch.equal(t, t_copy)  # the public rule leaves its input alone
    ref = _fresh_land(xt, rule.landing_input(gt, t, d), xtx, s, lr=0.05, lam=1.0, safe_eps=0.5)
    ref = ref.mT if wide else ref
    assert torch.equal(out, ref)
    for a, b in zip(state, ref_state):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_rule_writes_the_direction_into_its_input(shape, dtype):
    x, g, m, v = _inputs(shape, (2,), dtype)
    t = L._tangent_term(x if shape[0] >= shape[1] else x.mT, g if shape[0] >= shape[1] else g.mT)[0]
    m1, v1 = (m if shape[0] >= shape[1] else m.mT).clone(), (v if shape[0] >= shape[1] else v.mT).clone()
    m2, v2 = m1.clone(), v1.clone()
    d_pub, s_pub = F.AdamRule(m1, v1, None, 2, 0.9, 0.999, 1e-8, False, F.LOCAL)(t.clone())
    t2 = t.clone()
    d_own, s_own = S._StepAdamRule(m2, v2, None, 2, 0.9, 0.999, 1e-8, False, F.LOCAL)(t2)
    assert torch.equal(d_pub, d_own) and s_pub == s_own
    # no new buffer when t and v share a layout (a transposed v, e.g. a wide state, takes a new one)
    assert (d_own.data_ptr() == t2.data_ptr()) == (t2.stride() == v2.stride())
    assert torch.equal(m1, m2) and torch.equal(v1, v2)


@pytest.mark.parametrize("shape", SHAPES)
def test_land_out_path_matches_a_fresh_result(shape):
    x, g, _, _ = _inputs(shape, (2,), torch.float64, seed=1)
    xt, gt = (x, g) if shape[0] >= shape[1] else (x.mT, g.mT)
    t, xtx = L._tangent_term(xt, gt)
    a = L._land(xt, t.clone(), xtx, 0.7, lr=0.1, lam=1.0, safe_eps=0.5)
    b = _fresh_land(xt, t.clone(), xtx, 0.7, lr=0.1, lam=1.0, safe_eps=0.5)
    assert torch.equal(a, b)
