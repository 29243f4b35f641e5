"""Properties of stiefel_opt.functional over random shapes and dtypes."""
import functools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stiefel_opt import functional as F
from stiefel_opt._geoopt import geoopt

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# ‖XᵀX − I‖_F each dtype must reach after a retraction: the 1e-5 in fp32 for every shape;
# bf16 can only hold its rounding of the result (times √p, see the retraction test).
FEAS = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 8e-2}


@st.composite
def shapes(draw, min_side=1, max_side=12, kinds=("tall", "square", "wide")):
    """(*batch, n, p): a tall, square or wide matrix (kind drawn explicitly), unbatched or batched."""
    batch = draw(st.sampled_from([(), (2,), (2, 3)]))
    kind = draw(st.sampled_from(kinds))
    a = draw(st.integers(min_side, max_side))
    if kind == "square":
        return (*batch, a, a)
    b = draw(st.integers(min_side, max_side).filter(lambda b: b != a))
    lo, hi = min(a, b), max(a, b)
    return (*batch, hi, lo) if kind == "tall" else (*batch, lo, hi)


def _tall(x):
    return x.mT if F.is_wide(x) else x


def point_and_tangent(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = F.random_point(shape, dtype=torch.float64, generator=g)
    u = torch.randn(shape, dtype=torch.float64, generator=g)
    v = F.proj_tangent(x, u)
    v = scale * v / torch.linalg.matrix_norm(v).clamp_min(1e-12)[..., None, None]
    return x.to(dtype), v.to(dtype)


def sym_part(x, v):
    """‖sym(XᵀV)‖_F in the tall form: zero iff V is tangent at X."""
    x, v = _tall(x.double()), _tall(v.double())
    return torch.linalg.matrix_norm(F.sym(x.mT @ v))


seeds = st.integers(0, 2**31 - 1)


@given(shapes(), seeds, st.sampled_from([torch.float64, torch.float32]))
def test_random_point_is_feasible(shape, seed, dtype):
    x = F.random_point(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    assert x.shape == shape and x.dtype == dtype
    assert F.distance(x).max() <= FEAS[dtype]


@given(st.integers(0, 2), st.integers(1, 6), seeds)
def test_sym_and_skew_split_a_square_matrix(batch, p, seed):
    a = torch.randn(*([2] * batch), p, p, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    s, k = F.sym(a), F.skew(a)
    assert torch.equal(s, s.mT) and torch.equal(k, -k.mT)
    assert torch.allclose(s + k, a, atol=1e-15)
    assert torch.allclose((s * k).sum(dim=(-1, -2)), torch.zeros(()).double(), atol=1e-12)  # orthogonal


@given(shapes(), seeds, st.sampled_from(DTYPES))
def test_projection_is_idempotent_and_tangent(shape, seed, dtype):
    x, _ = point_and_tangent(shape, dtype, seed)
    u = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    v = F.proj_tangent(x, u)
    assert v.dtype == dtype and v.shape == shape
    # bf16: the input point is off the manifold by its rounding and the result is rounded again
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    unorm = float(torch.linalg.matrix_norm(u.double()).max())
    assert sym_part(x, v).max() <= tol * (1 + unorm)
    assert torch.allclose(F.proj_tangent(x, v), v, atol=tol * (1 + unorm))


@given(shapes(), seeds)
def test_low_precision_inputs_are_computed_in_fp32(shape, seed):
    x, v = point_and_tangent(shape, torch.bfloat16, seed, scale=0.5)
    u = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    cases = [(F.proj_tangent, (x, u)), (F.canonical_rgrad, (x, u)), (F.landing_field, (x, u)),
             (F.project, (x + v,)), (F.inner, (x, u, v))]
    cases += [(functools.partial(F.retract, method=m, metric=metric), (x, v))
              for m in F.RETRACTIONS for metric in F.METRICS]
    for fn, args in cases:
        out = fn(*args)
        assert out.dtype == torch.bfloat16
        ref = fn(*(a.float() for a in args)).to(torch.bfloat16)
        assert torch.equal(out, ref), fn
    assert F.distance(x).dtype == torch.float32
    assert torch.equal(F.distance(x), F.distance(x.float()))


@given(shapes(), seeds, st.sampled_from(DTYPES), st.sampled_from(sorted(F.RETRACTIONS)),
       st.floats(0.01, 1.0))
def test_retractions_land_on_manifold(shape, seed, dtype, method, scale):
    x, v = point_and_tangent(shape, dtype, seed, scale)
    y = F.retract(x, v, method)
    assert y.shape == shape and y.dtype == dtype
    assert torch.isfinite(y).all()
    bound = FEAS[dtype] * (math.sqrt(min(shape[-2:])) if dtype == torch.bfloat16 else 1.0)
    assert F.distance(y).max() <= bound


def _off_manifold(shape, dtype, seed, offsets):
    """X(I + t·E/‖E‖₂) in the tall form, one offset t per matrix (E a Gaussian p×p): full rank,
    ‖YᵀY − I‖_F ≈ 2t√p for small t."""
    g = torch.Generator().manual_seed(seed)
    x = F.random_point(shape, dtype=torch.float64, generator=g)
    e = torch.randn(*shape[:-2], shape[-1], shape[-1], dtype=torch.float64, generator=g)
    t = torch.tensor(offsets, dtype=torch.float64).reshape(*shape[:-2], 1, 1)
    return (x + t * x @ e / torch.linalg.matrix_norm(e, ord=2)[..., None, None]).to(dtype)


@given(shapes(kinds=("tall", "square")), seeds, st.sampled_from([torch.float64, torch.float32]), st.data())
def test_reorthonormalization_lands_far_matrices_and_keeps_near_ones(shape, seed, dtype, data):
    """Per matrix: d > τ → its polar factor, within τ of the manifold; d ≤ τ → returned bit for bit."""
    count = math.prod(shape[:-2])
    sizes = st.sampled_from([0.0, 1e-9, 1e-7, 1e-6, 1e-5, 1e-3, 0.1, 0.5])
    y = _off_manifold(shape, dtype, seed, data.draw(st.lists(sizes, min_size=count, max_size=count)))
    tol = F._feasibility_tolerance(shape[-1], dtype)
    z = F._reorthonormalize_far(y)
    far = F.distance(y) > tol
    assert z.dtype == dtype and z.shape == shape
    assert torch.equal(z[~far], y[~far])
    assert (F.distance(z) <= tol).all()
    assert torch.allclose(z[far].double(), F.project(y[far].double()), atol=20 * tol, rtol=0)


def test_reorthonormalization_leaves_non_finite_matrices_alone():
    y = _off_manifold((3, 6, 2), torch.float32, 0, [0.1, 0.0, 0.1])
    y[0, 1, 1] = float("nan")
    y[2, 0, 0] = float("inf")
    z = F._reorthonormalize_far(y)
    assert torch.equal(z[1], y[1]) and torch.isnan(z[0]).sum() == 1 and torch.isinf(z[2]).sum() == 1
    assert torch.equal(z[0].nan_to_num(), y[0].nan_to_num()) and torch.equal(z[2].nan_to_num(), y[2].nan_to_num())


@given(shapes(min_side=1, max_side=10), seeds, st.sampled_from([torch.float64, torch.float32]),
       st.sampled_from(sorted(F.RETRACTIONS)), st.sampled_from(F.METRICS), st.floats(1e-6, 1e-2),
       st.floats(0.01, 3.0))
def test_retractions_land_within_tolerance_from_a_point_off_the_manifold(shape, seed, dtype, method, metric,
                                                                         off, scale):
    """Every retraction's result is within τ = 8√p·ε of the manifold, even from an X that carries a
    rounding-like error (which cayley and exp would otherwise keep, and the Euclidean exp amplify)."""
    tall = shape if shape[-2] >= shape[-1] else (*shape[:-2], shape[-1], shape[-2])
    x = _off_manifold(tall, torch.float64, seed, [off] * math.prod(shape[:-2]))
    v = F.proj_tangent(x, torch.randn(tall, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    v = scale * v / torch.linalg.matrix_norm(v).clamp_min(1e-12)[..., None, None]
    if tall != shape:
        x, v = x.mT, v.mT
    y = F.retract(x.to(dtype), v.to(dtype), method, metric)
    assert F.distance(y).max() <= F._feasibility_tolerance(tall[-1], dtype)


@given(shapes(), seeds, st.floats(0.01, 1.0))
def test_qr_retraction_is_the_sign_fixed_q_factor(shape, seed, scale):
    x, v = point_and_tangent(shape, torch.float64, seed, scale)
    q, y = _tall(F.retract_qr(x, v)), _tall(x + v)
    r = q.mT @ y  # the R factor: upper triangular with a positive diagonal
    assert torch.allclose(r, r.triu(), atol=1e-10)
    assert (r.diagonal(dim1=-2, dim2=-1) > 0).all()
    assert torch.allclose(q @ r, y, atol=1e-10)


@given(shapes(), seeds, st.sampled_from(sorted(F.RETRACTIONS)), st.sampled_from(F.METRICS),
       st.sampled_from([torch.float64, torch.float32]))
def test_retractions_agree_with_x_plus_tv_to_first_order(shape, seed, method, metric, dtype):
    x, v = point_and_tangent(shape, dtype, seed)
    # fp32: larger t so that the O(t²) term stands above the rounding of X (≈1e-7·√p)
    ts, noise = ((1e-3, 1e-4), 0.0) if dtype == torch.float64 else ((3e-2, 1e-2), 3e-6)
    for t in ts:
        y = F.retract(x, t * v, method, metric)
        err = torch.linalg.matrix_norm((y - x - t * v).double()).max()
        assert err <= 5 * t * t + noise, (t, float(err))


@given(shapes(), seeds, st.sampled_from(sorted(F.RETRACTIONS)))
def test_zero_step_retracts_to_the_point(shape, seed, method):
    x, v = point_and_tangent(shape, torch.float64, seed)
    assert torch.allclose(F.retract(x, torch.zeros_like(v), method), x, atol=1e-10)


@given(shapes(), seeds, st.floats(0.01, 2.0), st.sampled_from(DTYPES))
def test_transport_gives_tangent_vectors(shape, seed, scale, dtype):
    x, v = point_and_tangent(shape, dtype, seed, scale)
    y = F.retract(x, v)
    w = F.transport(y, v)
    assert w.dtype == dtype and w.shape == shape
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 8e-2}[dtype]
    assert sym_part(y, w).max() <= tol * (1 + scale)


@given(shapes(), seeds)
def test_canonical_rgrad_is_tangent_and_matches_metric(shape, seed):
    x, _ = point_and_tangent(shape, torch.float64, seed)
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    r = F.egrad2rgrad(x, g, "canonical")
    assert sym_part(x, r).max() <= 1e-10
    # defining property: <rgrad, xi>_canonical = <G, xi>_euclidean for every tangent xi
    xi = F.proj_tangent(x, torch.randn_like(g))
    lhs = F.inner(x, r, xi, "canonical")
    rhs = (g * xi).sum(dim=(-1, -2))
    assert torch.allclose(lhs, rhs, atol=1e-9, rtol=1e-9)


@given(shapes(), seeds, st.floats(0.01, 0.3), st.floats(0.1, 10.0))
def test_landing_parts_are_orthogonal(shape, seed, off, lam):
    """⟨skew(GXᵀ)X, X(XᵀX − I)⟩ = tr(ψᵀ X(XᵀX−I)Xᵀ) = 0 for any X: ψ skew, the other symmetric."""
    x, v = point_and_tangent(shape, torch.float64, seed)
    x = x + off * torch.randn_like(x)  # anywhere, not only on the manifold
    g = torch.randn_like(x)
    relative = F.landing_field(x, g, lam=0.0)
    normal = F.landing_field(x, g, lam=lam) - relative
    xt, gt = _tall(x), _tall(g)
    eye = torch.eye(xt.shape[-1], dtype=x.dtype)
    assert torch.allclose(_tall(relative), F.skew(gt @ xt.mT) @ xt, atol=1e-10)
    assert torch.allclose(_tall(normal), lam * xt @ (xt.mT @ xt - eye), atol=1e-9)
    dot = (relative * normal).sum(dim=(-1, -2))
    scale = torch.linalg.matrix_norm(relative) * torch.linalg.matrix_norm(normal)
    assert (dot.abs() <= 1e-12 + 1e-9 * scale).all()


def _adversarial_landing(x, lam, kind, eps, seed, steps=1000):
    """Land X for ``steps`` steps on adversarial gradients with the capped safe step (lr 10);
    yields the distance before and after each step."""
    g = torch.Generator().manual_seed(seed)
    for k in range(steps):
        grad = torch.randn(x.shape, dtype=torch.float64, generator=g).to(x.dtype)
        if kind == "huge":
            grad = grad * 1e6
        elif kind == "tiny":
            grad = grad * 1e-8
        else:
            grad = grad * (1e4 if k % 2 else -1e4)
        field = F.landing_field(x, grad, lam)
        before = F.distance(x)
        eta = F.safe_step(before, torch.linalg.matrix_norm(field), lam, eps).clamp_max(10.0)
        x = x - eta[..., None, None].to(x.dtype) * field
        yield x, before, F.distance(x)


# fp64 tall batches and fp32 wide batches (orthonormal rows; d within fp32 rounding of ε), three λ,
# three kinds of gradient
@pytest.mark.parametrize("dtype,shape,tol", [(torch.float64, (8, 12, 5), 1e-9), (torch.float32, (3, 4, 9), 1e-5)])
@pytest.mark.parametrize("lam", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("kind", ["huge", "tiny", "alternating"])
def test_safe_step_keeps_distance_below_eps_for_1000_adversarial_steps(dtype, shape, tol, lam, kind):
    eps = 0.5
    x = F.random_point(*shape, dtype=dtype, generator=torch.Generator().manual_seed(int(lam * 10)))
    worst = 0.0
    for x, _, after in _adversarial_landing(x, lam, kind, eps, seed=int(lam * 10)):
        worst = max(worst, float(after.max()))
    assert worst <= eps + tol
    assert torch.isfinite(x).all() and float(torch.linalg.matrix_norm(x).min()) > 1.0


@pytest.mark.parametrize("lam", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("kind", ["huge", "tiny", "alternating"])
def test_safe_step_from_outside_the_safe_region_never_moves_away(lam, kind):
    """Start at ε < d < 1 (where max(ε − d, 0) = 0 matters): d never grows past max(d, ε), X stays
    finite, and with a small gradient the normal term lands it."""
    eps = 0.5
    gen = torch.Generator().manual_seed(1)
    x = F.random_point(4, 10, 3, dtype=torch.float64, generator=gen)
    s = F.sym(torch.randn(4, 3, 3, dtype=torch.float64, generator=gen))
    x = x @ (torch.eye(3, dtype=torch.float64) + 0.3 * s / torch.linalg.matrix_norm(s)[..., None, None])
    start = F.distance(x)
    assert (start > eps).all() and (start < 1).all()
    for x, before, after in _adversarial_landing(x, lam, kind, eps, seed=2):
        assert (after <= torch.clamp(before, min=eps) + 1e-12).all()
    assert torch.isfinite(x).all()
    if kind == "tiny":
        assert F.distance(x).max() <= 1e-8


def test_safe_step_formula_and_cap():
    d = torch.tensor([0.0, 0.2, 0.6])
    a = torch.tensor([2.0, 2.0, 2.0])
    eta = F.safe_step(d, a, lam=1.0, eps=0.5)
    lin = d * (1 - d)
    expected = (lin + torch.sqrt(lin**2 + a**2 * (0.5 - d).clamp_min(0))) / a**2
    assert torch.allclose(eta, torch.minimum(expected, torch.tensor(0.5)))
    assert eta[2] < eta[1]  # outside the safe region only the pull back remains
    assert F.safe_step(torch.tensor([0.0]), torch.tensor([1e-12]), lam=4.0) == 1 / 8  # cap 1/(2λ)
    with pytest.raises(ValueError, match="eps"):
        F.safe_step(d, a, 1.0, eps=1.5)


@given(shapes(min_side=1, max_side=10), seeds)
def test_project_is_the_svd_polar_factor(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, generator=g) + 0.1
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    if float((s[..., -1] / s[..., 0]).min()) < 1e-6:
        return
    q = F.project(x)
    assert torch.allclose(q, u @ vh, atol=1e-8)
    assert torch.allclose(F.project(q), q, atol=1e-10)  # idempotent on the manifold


def test_project_rejects_rank_deficient_and_non_finite():
    x = torch.ones(6, 3)
    with pytest.raises(ValueError, match="rank deficient"):
        F.project(x)
    with pytest.raises(ValueError, match="non-finite"):
        F.project(torch.full((4, 2), float("nan")))


@given(shapes(min_side=2, max_side=10), seeds)
def test_newton_schulz_converges_to_polar_factor(shape, seed):
    x, v = point_and_tangent(shape, torch.float64, seed, scale=0.5)
    y = x + v
    assert torch.allclose(F.newton_schulz(y, steps=12), F.project(y), atol=1e-8)


@given(shapes(max_side=8), seeds, st.floats(0.05, 2.0))
def test_cayley_matches_dense_formula(shape, seed, scale):
    x, v = point_and_tangent(shape, torch.float64, seed, scale)
    xt, vt = _tall(x), _tall(v)
    n = xt.shape[-2]
    eye = torch.eye(n, dtype=x.dtype)
    p_ = (eye - 0.5 * xt @ xt.mT) @ vt
    w = p_ @ xt.mT - xt @ p_.mT
    dense = torch.linalg.solve(eye - 0.5 * w, (eye + 0.5 * w) @ xt)
    assert torch.allclose(_tall(F.retract_cayley(x, v)), dense, atol=1e-9)


def test_exp_matches_geoopt_exact_geodesic():
    x, v = point_and_tangent((3, 9, 4), torch.float64, 0, scale=0.7)
    ref = geoopt.EuclideanStiefelExact().expmap(x, v)
    assert torch.allclose(F.retract_exp(x, v, "euclidean"), ref, atol=1e-10)


def test_canonical_geodesic_has_constant_speed_and_starts_along_v():
    x, v = point_and_tangent((2, 10, 3), torch.float64, 1, scale=0.8)
    ts = [0.25, 0.5, 0.75, 1.0]
    ys = [F.retract_exp(x, t * v, "canonical") for t in ts]
    for y in ys:
        assert F.distance(y).max() < 1e-10
    # equal parameter increments travel equal chord lengths along a geodesic
    chords = [torch.linalg.matrix_norm(b - a) for a, b in zip(ys, ys[1:])]
    assert torch.allclose(chords[0], chords[1], rtol=1e-9) and torch.allclose(chords[1], chords[2], rtol=1e-9)


@given(shapes(kinds=("tall", "square")), seeds, st.floats(0.01, 1.0))
def test_agrees_with_geoopt_euclidean_and_canonical_stiefel(shape, seed, scale):
    """geoopt's Stiefel manifolds are defined for n ≥ p (orthonormal columns)."""
    x, _ = point_and_tangent(shape, torch.float64, seed)
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    euc, can = geoopt.EuclideanStiefel(), geoopt.CanonicalStiefel()
    assert torch.allclose(F.proj_tangent(x, g), euc.proju(x, g), atol=1e-12)
    assert torch.allclose(F.egrad2rgrad(x, g, "euclidean"), euc.egrad2rgrad(x, g), atol=1e-12)
    assert torch.allclose(F.egrad2rgrad(x, g, "canonical"), can.egrad2rgrad(x, g), atol=1e-12)
    v = scale * F.proj_tangent(x, g) / torch.linalg.matrix_norm(F.proj_tangent(x, g)).clamp_min(1e-12)[..., None, None]
    assert torch.allclose(F.retract_qr(x, v), euc.retr(x, v), atol=1e-10)
    assert torch.allclose(F.inner(x, v, v, "canonical"), can.inner(x, v, v), atol=1e-12)
    assert torch.allclose(F.inner(x, v, g), euc.inner(x, v, g), atol=1e-12)


def test_wide_matrices_are_treated_by_transposition():
    x, v = point_and_tangent((2, 7, 3), torch.float64, 5, scale=0.5)
    g = torch.randn_like(x)
    fns = [F.proj_tangent, F.canonical_rgrad, F.transport, F.retract_polar, F.retract_qr, F.retract_cayley,
           F.retract_newton_schulz, F.landing_field, F.relative_tangent,
           functools.partial(F.retract_exp, metric="euclidean"), functools.partial(F.retract_exp, metric="canonical")]
    for fn in fns:
        assert torch.allclose(fn(x.mT, v.mT), fn(x, v).mT, atol=1e-12), fn
    for metric in F.METRICS:
        assert torch.allclose(F.inner(x.mT, v.mT, g.mT, metric), F.inner(x, v, g, metric), atol=1e-12)
    assert torch.allclose(F.project(x.mT + g.mT), F.project(x + g).mT, atol=1e-12)
    assert torch.allclose(F.newton_schulz(x.mT + v.mT), F.newton_schulz(x + v).mT, atol=1e-12)
    assert torch.allclose(F.distance(x.mT), F.distance(x))


def test_functions_reject_vectors_with_a_clear_error():
    with pytest.raises(ValueError, match="shape \\(5,\\)"):
        F.proj_tangent(torch.ones(5), torch.ones(5))
    x = F.random_point(6, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="proj_tangent: expected x .*shape \\(\\)"):
        F.proj_tangent(torch.tensor(1.0), torch.tensor(1.0))  # 0-D
    with pytest.raises(ValueError, match="proj_tangent: expected u .*shape \\(3,\\)"):
        F.proj_tangent(x, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="project: expected x .*shape \\(4,\\)"):
        F.project(torch.ones(4))
    with pytest.raises(ValueError, match="inner: expected x"):
        F.inner(torch.ones(3), torch.ones(3), torch.ones(3))
    # mismatched shapes name the argument (a wide/tall mix-up included); no silent broadcasting
    for fn, name in [(F.proj_tangent, "u"), (F.canonical_rgrad, "g"), (F.landing_field, "g"),
                     (F.retract, "v"), (F.transport, "u")]:
        for bad in (torch.ones(6, 1, dtype=torch.float64), x.mT.contiguous()):
            with pytest.raises(ValueError, match=f"{name} has shape {tuple(bad.shape)}".replace("(", "\\(").replace(")", "\\)")):
                fn(x, bad)
    with pytest.raises(ValueError, match="v has shape"):
        F.retract(x, torch.ones(6, 4, dtype=torch.float64), "exp", "canonical")
    with pytest.raises(ValueError, match="inner: v has shape"):
        F.inner(x, x, torch.ones(6, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="proj_tangent: x must be a torch.Tensor, got list"):
        F.proj_tangent([[1.0, 0.0], [0.0, 1.0]], torch.eye(2))
    with pytest.raises(TypeError, match="project: x must be a floating-point tensor"):
        F.project(torch.eye(3, dtype=torch.long))
    with pytest.raises(ValueError, match="retraction must be one of"):
        F.retract(torch.eye(3), torch.zeros(3, 3), "svd")
    with pytest.raises(ValueError, match="metric"):
        F.egrad2rgrad(torch.eye(3), torch.zeros(3, 3), "riemann")


def test_no_function_forms_an_n_by_n_matrix(monkeypatch):
    """Every matmul operand stays O(np): track the largest product for a very tall matrix."""
    n, p = 3000, 4
    x, v = point_and_tangent((n, p), torch.float32, 7, scale=0.5)
    largest = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        out = real(a, b)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    for method in F.RETRACTIONS:
        F.retract(x, v, method)
    F.landing_field(x, v, 1.0)
    F.proj_tangent(x, v)
    F.canonical_rgrad(x, v)
    F.retract_exp(x, v, "canonical")
    assert largest and max(largest) <= n * 2 * p


def test_brockett_pca_by_riemannian_gradient_descent():
    """maximize tr(XᵀAX) on St(200, 5): reaches the sum of the top-5 eigenvalues to 1e-5."""
    g = torch.Generator().manual_seed(0)
    n, p = 200, 5
    q = F.random_point(n, n, dtype=torch.float64, generator=g)
    eig = torch.cat([torch.linspace(10.0, 6.0, p, dtype=torch.float64),
                     4.0 * torch.rand(n - p, dtype=torch.float64, generator=g)])
    a = (q * eig) @ q.mT
    optimum = torch.linalg.eigvalsh(a)[-p:].sum()
    x = F.random_point(n, p, dtype=torch.float64, generator=g)
    step = 1.0 / float(eig.max())
    for _ in range(300):
        rgrad = F.proj_tangent(x, 2 * a @ x)  # ascent direction of tr(XᵀAX)
        x = F.retract(x, 0.5 * step * rgrad)
    value = torch.trace(x.mT @ a @ x)
    assert abs(float(value - optimum)) / float(optimum) <= 1e-5
    assert F.distance(x) <= 1e-10


@given(shape=shapes(min_side=1, max_side=9), metric=st.sampled_from(F.METRICS), seed=st.integers(0, 2**16))
def test_pxp_plans_equal_the_direct_computation(shape, metric, seed):
    """The p×p formulas the fused kernels use (from Grams only) equal the n×p computation."""
    gen = torch.Generator().manual_seed(seed)
    *batch, n, p = shape
    n = max(n, p)
    x = F.random_point(*batch, n, p, generator=gen, dtype=torch.float64)
    d, m = (torch.randn(*batch, n, p, generator=gen, dtype=torch.float64) for _ in range(2))
    c_a, c_b = (torch.randn(*batch, p, p, generator=gen, dtype=torch.float64) for _ in range(2))
    close = dict(rtol=1e-9, atol=1e-9)
    y = x @ c_a + d @ c_b
    grams = (x.mT @ x, d.mT @ x, d.mT @ d)
    torch.testing.assert_close(F.combination_gram(c_a, c_b, *grams), y.mT @ y, **close)
    torch.testing.assert_close(F.frobenius_from_gram(c_a, c_b, *grams), torch.linalg.matrix_norm(y), **close)
    field = d @ c_b + x @ c_a  # Λ = D·C_D + X·C_X, stepped with the capped safe step
    k_x, k_d = F.landing_plan(grams[0], c_b, c_a, grams[2], grams[1].mT, lr=0.3, lam=0.7, safe_eps=0.5)
    eta = F.safe_step(F.distance(x), torch.linalg.matrix_norm(field), 0.7, 0.5).clamp_max(0.3)
    torch.testing.assert_close(x @ k_x + d @ k_d, x - eta[..., None, None] * field, **close)
    torch.testing.assert_close(d + x @ F.rgrad_coefficient(d.mT @ x, metric), F.egrad2rgrad(x, d, metric), **close)
    step = x + 0.3 * d / torch.linalg.matrix_norm(d, ord=2)[..., None, None]  # well conditioned
    k = F.polar_coefficients(step.mT @ step)
    torch.testing.assert_close(step @ k, F.project(step), **close)
    torch.testing.assert_close(m - step @ F.transport_coefficient(k, step.mT @ m),
                               F.proj_tangent(step @ k, m), **close)


@pytest.mark.parametrize("lead,n,k,r", [((4,), 4096, 4, 4), ((32,), 512, 8, 8), ((2, 3), 300, 4, 2),
                                        ((4,), 512, 16, 16), ((4,), 256, 8, 8)])
def test_product_accumulation_is_beta_c_plus_alpha_ab_on_either_path(lead, n, k, r):
    """_bmm_add/_mm_add_ take a bmm then an add for small right factors and one baddbmm otherwise
    (layout._accumulates_slowly); both are βC + αA·B, with B broadcast over the batch."""
    from stiefel_opt.functional.layout import _bmm_add, _mm_add_
    gen = torch.Generator().manual_seed(n + k)
    a = torch.randn(*lead, n, k, generator=gen, dtype=torch.float64)
    c = torch.randn(*lead, n, r, generator=gen, dtype=torch.float64)
    for b in (torch.randn(*lead, k, r, generator=gen, dtype=torch.float64),
              torch.randn(k, r, generator=gen, dtype=torch.float64)):
        want = 0.5 * c - 1.5 * torch.einsum("...ik,...kj->...ij", a, b.expand(*lead, k, r))
        torch.testing.assert_close(_bmm_add(c, a, b, beta=0.5, alpha=-1.5), want, rtol=1e-12, atol=1e-12)
        out = c.clone()
        assert _mm_add_(out, a, b, alpha=-1.5) is out
        torch.testing.assert_close(out, want + 0.5 * c, rtol=1e-12, atol=1e-12)


def test_product_accumulation_with_beta_zero_ignores_c():
    """β = 0 leaves C out entirely (a NaN in C does not reach the result), on both paths."""
    from stiefel_opt.functional.layout import _accumulates_slowly, _bmm_add
    gen = torch.Generator().manual_seed(0)
    for k in (4, 16):
        a, b = torch.randn(6, 50, k, generator=gen), torch.randn(k, k, generator=gen)
        c = torch.randn(6, 50, k, generator=gen)
        c[2, 3, 1] = float("nan")
        out = _bmm_add(c, a, b, beta=0.0, alpha=-0.5)
        assert _accumulates_slowly(a, b) == (k == 4)
        torch.testing.assert_close(out, -0.5 * (a @ b))


def test_coefficient_forms_broadcast_and_promote_like_their_formulas():
    """landing_coefficients and frobenius_from_gram on a p×p XᵀX shared by a batch of GᵀX, in mixed
    dtypes: the formulas' broadcasting and type promotion."""
    gen = torch.Generator().manual_seed(1)
    xtx = F.sym(torch.randn(3, 3, generator=gen)).float()
    gtx = torch.randn(5, 3, 3, generator=gen, dtype=torch.float64)
    c_g, c_x = F.landing_coefficients(xtx, gtx, 0.7, 0.3)
    assert c_x.shape == (5, 3, 3) and c_x.dtype == torch.float64
    torch.testing.assert_close(c_g, 0.15 * xtx)
    torch.testing.assert_close(c_x, 0.7 * (xtx - torch.eye(3)) - 0.15 * gtx)
    a, b = torch.randn(5, 20, 3, generator=gen, dtype=torch.float64), torch.randn(5, 20, 3, generator=gen,
                                                                                dtype=torch.float64)
    a = a[:1].expand(5, 20, 3)  # one A for the whole batch: its Gram and coefficient given 2-D
    c_a, c_b = torch.randn(3, 3, generator=gen, dtype=torch.float64), torch.randn(5, 3, 3, generator=gen,
                                                                                  dtype=torch.float64)
    got = F.frobenius_from_gram(c_a, c_b, a[0].mT @ a[0], b.mT @ a, b.mT @ b)
    torch.testing.assert_close(got, torch.linalg.matrix_norm(a @ c_a + b @ c_b))


def test_landing_step_takes_a_tensor_lr_as_torch_compile_passes_it():
    gen = torch.Generator().manual_seed(2)
    x = F.random_point(3, 40, 5, generator=gen)
    g = torch.randn(3, 40, 5, generator=gen)
    outs = []
    for lr in (0.01, torch.tensor(0.01)):
        m, v = torch.zeros(3, 40, 5), torch.zeros(3, 40, 5)
        outs.append(F.landing_adam_update(x, g, m, v, step=1, lr=lr))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
