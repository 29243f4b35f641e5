"""Shape-aware steps (issue 16): every association and the matmul-only polar factor equal the
previous formulas to rounding.

The references below are the formulas the optimizer steps used before the shape-aware version (p×p
Grams whatever the shape, an n×p-by-2p×p product for the tangent term, the landing step from the
Grams UᵀX, UᵀU through ``landing_plan``, the polar factor through a p×p ``eigh`` refined by one
Newton–Schulz step on the n×p result). Tolerances: fp64 1e-12, fp32 2e-5, relative to 1 + the largest
entry of the reference (observed: 2e-15 and 7e-7).
"""
import math
from decimal import Decimal, getcontext

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stiefel_opt import functional as F

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


# ------------------------------------------------------------------ the previous formulas
def ref_polar(y):
    w, q = torch.linalg.eigh(y.mT @ y)
    m = (q * w.clamp_min(torch.finfo(w.dtype).tiny).rsqrt().unsqueeze(-2)) @ q.mT
    y = y @ m
    return y @ (1.5 * torch.eye(y.shape[-1], dtype=y.dtype) - 0.5 * (y.mT @ y))


def ref_proj(x, u):
    return u - x @ F.sym(x.mT @ u)


def ref_rgrad(x, g, metric):
    return ref_proj(x, g) if metric == "euclidean" else g - x @ (g.mT @ x)


def ref_retract(x, v, retraction, metric):
    if retraction == "polar":
        return ref_polar(x + v)
    return F.retract(x, v, retraction, metric)


def ref_tangent(x, g):
    p = x.shape[-1]
    xg = torch.cat([x, g], -1)
    s = x.mT @ xg
    c_g, c_x = F.landing_coefficients(s[..., :p], s[..., p:].mT, 0.0)
    return xg @ torch.cat([c_x, c_g], -2), s[..., :p]


def ref_land(x, u, xtx, scale, lr, lam, safe_eps):
    utx = u.mT @ x
    c_u, c_x = F.landing_coefficients(xtx, scale * utx, lam)
    k_x, k_u = F.landing_plan(xtx, scale * c_u, c_x, u.mT @ u, utx.mT, lr=lr, lam=lam, safe_eps=safe_eps)
    return x @ k_x + u @ k_u


def adam_dir(m, v, t, step, b1, b2, eps, scalar_v):
    m.lerp_(t, 1 - b1)
    if scalar_v:
        v.mul_(b2).add_((t * t).mean((-2, -1), keepdim=True), alpha=1 - b2)
    else:
        v.mul_(b2).addcmul_(t, t, value=1 - b2)
    bc1, bc2 = 1 - b1**step, math.sqrt(1 - b2**step)
    return (m / bc1) / (v.sqrt() / bc2 + eps)


def ref_step(name, x, g, m, v, *, lr, retraction="polar", metric="euclidean", momentum=0.0,
             nesterov=False, scalar_v=False, lam=1.0, safe_eps=0.5, step=3):
    """Tall inputs; returns the new point and the state tensors (updated copies)."""
    m = None if m is None else m.clone()
    v = None if v is None else v.clone()
    if name == "riemannian_sgd":
        rg = ref_rgrad(x, g, metric)
        d = rg
        if momentum:
            m.mul_(momentum).add_(rg)
            d = rg + momentum * m if nesterov else m
        y = ref_retract(x, -lr * d, retraction, metric)
        return y, (ref_proj(y, m),) if momentum else ()
    if name == "riemannian_adam":
        d = adam_dir(m, v, ref_rgrad(x, g, metric), step, 0.9, 0.999, 1e-8, scalar_v)
        if not scalar_v:
            d = ref_proj(x, d)
        y = ref_retract(x, -lr * d, retraction, metric)
        return y, (ref_proj(y, m), v)
    t, xtx = ref_tangent(x, g)
    if name == "landing_sgd":
        u = g
        if momentum:
            m.mul_(momentum).add_(t)
            d = t + momentum * m if nesterov else m
            u = d - t + g
        return ref_land(x, u, xtx, 1.0, lr, lam, safe_eps), (m,) if momentum else ()
    d = adam_dir(m, v, t, step, 0.9, 0.999, 1e-8, scalar_v)
    return ref_land(x, d, xtx, 1.0, lr, lam, safe_eps), (m, v)


# ------------------------------------------------------------------ shapes
@st.composite
def shapes(draw):
    """(*batch, n, p) of every route: thin (n ≥ 5p/4, small and larger p), mid (p < n < 5p/4),
    square, and their wide transposes; unbatched or batched."""
    batch = draw(st.sampled_from([(), (2,), (2, 2)]))
    kind = draw(st.sampled_from(["thin", "mid", "square"]))
    small = st.integers(1, 12)
    p = draw({"mid": st.integers(5, 14), "square": small}.get(kind, st.one_of(small, st.integers(33, 40))))
    if kind == "square":
        n = p
    elif kind == "mid":
        n = draw(st.integers(p + 1, max(p + 1, (5 * p - 1) // 4)))
    else:
        n = draw(st.integers(max(p + 1, -(-5 * p // 4)), 3 * p + 3))
    wide = draw(st.booleans()) and n != p
    return (*batch, p, n) if wide else (*batch, n, p)


def _tall(a):
    return a.mT if a.shape[-2] < a.shape[-1] else a


STEPS = {
    "riemannian_sgd": [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                       dict(retraction="qr", momentum=0.9), dict(metric="canonical"),
                       dict(retraction="cayley", metric="canonical")],
    "riemannian_adam": [dict(), dict(scalar_v=True), dict(metric="canonical"), dict(retraction="qr"),
                        dict(retraction="exp")],
    "landing_sgd": [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True)],
    "landing_adam": [dict(), dict(scalar_v=True), dict(lam=5.0)],
}
CASES = [(name, kw) for name, kws in STEPS.items() for kw in kws]


@given(shapes(), st.sampled_from(CASES), st.sampled_from([torch.float64, torch.float32]),
       st.integers(0, 2**31 - 1), st.sampled_from([1e-3, 0.05, 0.5]))
def test_steps_equal_the_previous_formulas(shape, case, dtype, seed, lr):
    name, kw = case
    gen = torch.Generator().manual_seed(seed)
    x = F.random_point(shape, dtype=torch.float64, generator=gen)
    if name.startswith("landing"):  # landing runs off the manifold
        x = x + 1e-2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    g, m = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.rand(shape, generator=gen, dtype=torch.float64)
    if kw.get("scalar_v"):
        v = v.mean((-2, -1), keepdim=True)
    x, g, m, v = (a.to(dtype) for a in (x, g, m, v))
    tall = [_tall(a) for a in (x, g, m)] + [v if kw.get("scalar_v") else _tall(v)]
    if name.startswith("riemannian"):
        tall[2] = ref_proj(tall[0], tall[2])  # the moment is tangent (transported by projection)
        m = tall[2].mT if F.is_wide(x) else tall[2]
        m = m.contiguous()
    sgd = name.endswith("sgd")
    has_m = not sgd or kw.get("momentum")
    want_x, want_state = ref_step(name, tall[0], tall[1], tall[2] if has_m else None, tall[3], lr=lr, **kw)
    fn = getattr(F, f"{name}_update")
    extra = {k: v_ for k, v_ in kw.items() if k != "scalar_v" or not sgd}
    m_in, v_in = m.clone(), v.clone()
    if sgd:
        got_x, buf = fn(x, g, m_in if has_m else None, lr=lr, **extra)
        got_state = (buf,) if has_m else ()
    else:
        got_x = fn(x, g, m_in, v_in, step=3, lr=lr, **extra)
        got_state = (m_in, v_in)
    if F.is_wide(x):
        want_x = want_x.mT
        want_state = tuple(s if s.shape[-2:] == (1, 1) else s.mT for s in want_state)
    for got, want in zip((got_x, *got_state), (want_x, *want_state)):
        assert got.shape == want.shape and got.dtype == dtype
        err = float((got - want).abs().max()) / (1 + float(want.abs().max()))
        assert err <= TOL[dtype], (name, kw, shape, err)


def test_landing_association_by_shape():
    assert F._landing_association(4096, 4) == "thin"
    assert F._landing_association(4096, 33) == "thin"
    assert F._landing_association(640, 512) == "thin"      # 4n = 5p: equal cost, thin kept
    assert F._landing_association(600, 512) == "mid"
    assert F._landing_association(512, 512) == "square"
    assert F._landing_association(1, 1) == "square"


@pytest.mark.parametrize("route,shape", [("thin", (3, 9, 4)), ("mid", (2, 11, 10)), ("square", (2, 7, 7)),
                                         ("square", (6, 6)), ("thin", (4, 2)), ("thin", (2, 50, 40)),
                                         ("thin", (40, 90))])
def test_landing_field_and_relative_tangent_on_every_route(route, shape):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    n, p = _tall(x).shape[-2:]
    assert F._landing_association(n, p) == route
    xt, gt = _tall(x), _tall(g)
    dense_t = F.skew(gt @ xt.mT) @ xt
    dense = dense_t + 0.7 * xt @ (xt.mT @ xt - torch.eye(p, dtype=x.dtype))
    wide = x.shape[-2] < x.shape[-1]
    back = (lambda a: a.mT) if wide else (lambda a: a)
    torch.testing.assert_close(F.relative_tangent(x, g), back(dense_t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F.landing_field(x, g, 0.7), back(dense), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ the matmul-only polar factor
def _exact_inv_sqrt(a: float) -> Decimal:
    getcontext().prec = 50
    return 1 / (1 + Decimal(a)).sqrt()


@given(st.floats(0.0, 0.49), st.sampled_from([torch.float64, torch.float32]))
def test_series_degree_bounds_the_truncation_error(delta, dtype):
    """On every eigenvalue a ∈ [−δ, δ], |(1 + a)^(−1/2) − Σ_{k≤m} c_k a^k| ≤ ε_mach/4 for the m
    _series_degree returns (checked in 50-digit decimal arithmetic), and m is the smallest such
    degree allowed by the bound."""
    m = F._series_degree(delta, dtype)
    tol = Decimal(torch.finfo(dtype).eps) / 4
    if m is None:  # the bound needs more than the largest degree: the eigh route is taken
        c = F._binomial_inv_sqrt(F._SERIES_MAX_DEGREE + 1)
        assert abs(c[-1]) * delta ** (F._SERIES_MAX_DEGREE + 1) / (1 - delta) > float(tol) * 0.999
        return
    c = [Decimal(v) for v in F._binomial_inv_sqrt(m)]
    for a in [delta * t / 8 for t in range(-8, 9)]:
        poly = sum(ck * (Decimal(a) ** k if k else Decimal(1)) for k, ck in enumerate(c))
        assert abs(_exact_inv_sqrt(a) - poly) <= tol
    if m > 0:  # the smallest degree the bound certifies
        lower = F._binomial_inv_sqrt(m)[m]
        assert abs(lower) * delta**m / (1 - delta) > float(tol)


@given(st.integers(1, 40), st.sampled_from([(), (3,)]), st.floats(1e-6, 0.3), st.floats(0.1, 10.0),
       st.sampled_from([torch.float64, torch.float32]), st.integers(0, 2**31 - 1))
def test_matmul_inverse_square_root_near_a_multiple_of_identity(p, batch, spread, scale, dtype, seed):
    """S = c·Q diag(1 + a_i) Qᵀ with |a_i| ≤ spread: the series equals Q diag((c(1 + a_i))^(−1/2)) Qᵀ
    to a few ε_mach (or declines, returning None, and the eigh route is used)."""
    gen = torch.Generator().manual_seed(seed)
    q = F.random_point(*batch, p, p, dtype=torch.float64, generator=gen)
    a = spread * (2 * torch.rand(*batch, p, generator=gen, dtype=torch.float64) - 1)
    s = scale * (q * (1 + a).unsqueeze(-2)) @ q.mT
    want = (q * (scale * (1 + a)).rsqrt().unsqueeze(-2)) @ q.mT
    k = F._inv_sqrt_near_identity(F.sym(s).to(dtype))
    if k is None:  # declines only when even p^(1/4)‖A‖₂ ≥ its δ needs more than _SERIES_MAX_DEGREE
        lam = 1 + a
        a_norm = float((lam / lam.mean(-1, keepdim=True) - 1).abs().max())
        assert F._series_degree(min(p**0.25 * a_norm * (1 + 1e-6), 0.5), dtype) is None
        return
    err = float(torch.linalg.matrix_norm(k.double() - want, ord=2).max() * math.sqrt(scale))
    assert err <= 8 * p * torch.finfo(dtype).eps


def _point_and_step(p, extra, batch, size, dtype, seed):
    """X on St(p + extra, p) and a tangent V with ‖V‖₂ = size (drawn in float64, cast to dtype)."""
    n = p + extra
    gen = torch.Generator().manual_seed(seed)
    x = F.random_point(*batch, n, p, dtype=torch.float64, generator=gen)
    v = F.proj_tangent(x, torch.randn(*batch, n, p, generator=gen, dtype=torch.float64))
    v = size * v / torch.linalg.matrix_norm(v, ord=2)[..., None, None].clamp_min(1e-300)
    return x.to(dtype), v.to(dtype)


@given(st.integers(1, 24), st.integers(0, 24), st.sampled_from([(), (2,)]), st.floats(1e-4, 2.0),
       st.sampled_from([torch.float64, torch.float32]), st.integers(0, 2**31 - 1))
def test_polar_retraction_equals_the_eigh_route(p, extra, batch, size, dtype, seed):
    """retract_polar (series near the manifold, eigh otherwise) equals the previous eigh route to
    rounding, and lands within τ = 8√p·ε_mach; polar_coefficients likewise (the fused kernels' K)."""
    x, v = _point_and_step(p, extra, batch, size, dtype, seed)
    got = F.retract_polar(x, v)
    want = ref_polar(x + v)
    tol = TOL[dtype]
    assert float((got - want).abs().max()) <= tol
    tau = 8 * math.sqrt(p) * torch.finfo(dtype).eps
    assert float(F.distance(got).max()) <= tau
    y = x + v
    torch.testing.assert_close(y @ F.polar_coefficients(y.mT @ y), want, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 512, 512), (2, 256, 256), (1, 2048, 128), (3, 300, 256)])
def test_polar_retraction_of_an_adam_sized_step_at_large_p(shape, dtype):
    """The series route (polar) and the CholeskyQR route (qr) are the ones taken for a step of lr 1e-3
    (|entries| ≈ 1e-3) and stay equal to the eigh / Householder routes and within τ at p up to 512."""
    gen = torch.Generator().manual_seed(0)
    x = F.random_point(shape, dtype=torch.float64, generator=gen).to(dtype)
    v = F.proj_tangent(x, 1e-3 * torch.randn(shape, generator=gen, dtype=torch.float64).sign().to(dtype))
    y = x + v
    assert F._inv_sqrt_near_identity(y.mT @ y) is not None
    got = F.retract_polar(x, v)
    assert float((got - ref_polar(y)).abs().max()) <= TOL[dtype]
    assert float(F.distance(got).max()) <= 8 * math.sqrt(shape[-1]) * torch.finfo(dtype).eps
    assert F._qr_near_identity(y) is not None
    got = F.retract_qr(x, v)
    assert float((got - F._sign_fixed_qr(y)).abs().max()) <= TOL[dtype]
    assert float(F.distance(got).max()) <= 8 * math.sqrt(shape[-1]) * torch.finfo(dtype).eps


def test_polar_falls_back_to_eigh_far_from_the_manifold_and_on_non_finite_input():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(3, 30, 6, generator=gen, dtype=torch.float64)  # YᵀY far from a multiple of I
    assert F._inv_sqrt_near_identity(y.mT @ y) is None
    torch.testing.assert_close(F._polar_via_gram(y), ref_polar(y), rtol=0, atol=1e-12)
    bad = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    bad[1, 0, 0] = float("nan")
    assert F._inv_sqrt_near_identity(bad) is None
    assert F._inv_sqrt_near_identity(torch.zeros(2, 3, 3)) is None  # c = 0


@given(st.integers(1, 24), st.integers(0, 30), st.sampled_from([(), (2,)]), st.floats(1e-4, 2.0),
       st.sampled_from([torch.float64, torch.float32]), st.integers(0, 2**31 - 1))
def test_qr_retraction_equals_householder(p, extra, batch, size, dtype, seed):
    """retract_qr (one CholeskyQR pass near the manifold, Householder otherwise) equals the sign-fixed
    Householder Q factor to rounding and lands within τ."""
    x, v = _point_and_step(p, extra, batch, size, dtype, seed)
    got = F.retract_qr(x, v)
    want = F._sign_fixed_qr(x + v)
    assert float((got - want).abs().max()) <= TOL[dtype]
    assert float(F.distance(got).max()) <= 8 * math.sqrt(p) * torch.finfo(dtype).eps
    if size <= 0.1:  # ‖V‖₂ ≤ 0.1: ‖VᵀV‖_F ≤ 0.01·√p ≤ 0.05, far inside the δ ≤ ½ of the Cholesky route
        assert F._qr_near_identity(x + v) is not None
