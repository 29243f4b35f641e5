"""The oblique manifold (unit-norm columns): its geometry, and every optimizer, wrapper and the
batched path on it, against closed forms written here and geoopt's Sphere."""
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stiefel_opt as so
from stiefel_opt import Oblique
from stiefel_opt import functional as F
from stiefel_opt._geoopt import geoopt

shapes = st.sampled_from([(7, 3), (3, 7), (5, 1), (1, 4), (2, 6, 4)])


def _draw(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def _columns_normalised(a):
    return a / torch.linalg.vector_norm(a, dim=-2, keepdim=True)


@pytest.fixture(autouse=True)
def _float64():
    """These tests compare to 1e-12 in float64 (restored after each test: no leak into other files)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@settings(deadline=None)
@given(shapes, st.integers(0, 10_000), st.sampled_from(sorted(F.RETRACTIONS)))
def test_geometry_is_the_product_of_spheres(shape, seed, retraction):
    a, g = _draw(shape, seed)
    ob = Oblique(retraction=retraction)
    x = ob.projx(a)
    assert torch.allclose(x, _columns_normalised(a), atol=1e-12)
    assert float(ob.infeasibility(x).max()) < 1e-12
    # P_X(G) = G − X diag(diag(XᵀG)): each column loses its component along x_i
    along = (x * g).sum(-2, keepdim=True)
    u = ob.proju(x, g)
    assert torch.allclose(u, g - x * along, atol=1e-12)
    assert torch.allclose(ob.egrad2rgrad(x, g), u, atol=1e-12)
    assert float((x * u).sum(-2).abs().max()) < 1e-12  # tangent: x_iᵀu_i = 0
    y = ob.retr(x, 0.3 * u)
    assert float(ob.infeasibility(y).max()) < 1e-10
    if retraction in ("polar", "qr"):
        assert torch.allclose(y, _columns_normalised(x + 0.3 * u), atol=1e-12)
    assert torch.allclose(ob.inner(x, u, g), (u * g).sum((-2, -1)), atol=1e-12)
    assert torch.allclose(ob.from_matrix(ob.to_matrix(a), a.shape), a)
    assert ob.matrix_shape(a.shape) == ob.to_matrix(a).shape
    # infeasibility ‖diag(XᵀX) − 1‖₂ and the landing field per column
    assert torch.allclose(ob.infeasibility(a), torch.linalg.vector_norm((a * a).sum(-2) - 1, dim=-1))
    lam = 0.7
    sq = (a * a).sum(-2, keepdim=True)
    field = 0.5 * (g * sq - a * (a * g).sum(-2, keepdim=True)) + lam * a * (sq - 1)
    assert torch.allclose(ob.landing_field(a, g, lam), field, atol=1e-10)


def test_random_points_and_spec():
    ob = Oblique()
    x = ob.random(6, 4)
    assert x.shape == (6, 4) and x.is_contiguous() and float(ob.infeasibility(x)) < 1e-12
    assert so.manifolds.manifold_from_spec(ob.spec(), "here").spec() == ob.spec()
    assert isinstance(so.manifolds.as_manifold("oblique"), Oblique)
    with pytest.raises(ValueError, match="ndim must be 2"):
        Oblique(ndim=3)
    with pytest.raises(ValueError, match="zero|rank"):
        ob.projx(torch.zeros(3, 2))


def _target():
    m = torch.randn(12, 5, generator=torch.Generator().manual_seed(3))
    return m, _columns_normalised(m)


def _run(make_opt, steps=600):
    """Maximise tr(XᵀM) over Ob(12, 5): the optimum is M with unit columns (closed form)."""
    m, target = _target()
    x = torch.nn.Parameter(Oblique().random(12, 5, generator=torch.Generator().manual_seed(0)))
    opt = make_opt(x)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        (-(x * m).sum()).backward()
        opt.step()
        sched.step()
    return x.detach(), target


OPTIMIZERS = {
    "RiemannianSGD": lambda x: so.RiemannianSGD([{"params": [x], "manifold": "oblique"}], lr=0.2, momentum=0.5),
    "RiemannianAdam": lambda x: so.RiemannianAdam([{"params": [x], "manifold": Oblique()}], lr=0.02),
    "LandingSGD": lambda x: so.LandingSGD([{"params": [x], "manifold": "oblique"}], lr=0.2),
    "LandingAdam": lambda x: so.LandingAdam([{"params": [x], "manifold": "oblique"}], lr=0.02),
    "riemannian(Adam)": lambda x: so.riemannian(torch.optim.Adam([{"params": [x], "manifold": "oblique"}], lr=0.02)),
    "landing(SGD)": lambda x: so.landing(torch.optim.SGD([{"params": [x], "manifold": "oblique"}], lr=0.2)),
    "RiemannianAdam(qr)": lambda x: so.RiemannianAdam([{"params": [x], "manifold": Oblique(retraction="qr")}],
                                                      lr=0.02),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_converges_to_the_closed_form(name):
    x, target = _run(OPTIMIZERS[name])
    assert float((x - target).abs().max()) < 1e-5
    assert float(Oblique().infeasibility(x)) < 1e-5


@pytest.mark.parametrize("cls", [so.RiemannianAdam, so.LandingAdam, so.RiemannianSGD])
def test_batched_equals_one_parameter_at_a_time(cls):
    """Columns of parameters of equal n share one stack with a Stiefel group's matrices elsewhere."""
    gen = torch.Generator().manual_seed(1)
    ob = Oblique()
    data = [ob.random(8, p, generator=gen) for p in (3, 3, 5)]
    grads = [[torch.randn(d.shape, generator=gen) for d in data] for _ in range(4)]
    kw = {"lr": 0.05, **({"momentum": 0.9} if cls is so.RiemannianSGD else {})}

    def run(groups_of):
        ps = [torch.nn.Parameter(d.clone()) for d in data]
        stiefel = torch.nn.Parameter(so.Stiefel().random(8, 3, generator=torch.Generator().manual_seed(2)))
        opts = [cls([{"params": group, "manifold": "oblique"}, {"params": [stiefel], "manifold": "stiefel"}], **kw)
                for group in groups_of(ps)]
        for gs in grads:
            for p, gr in zip(ps, gs):
                p.grad = gr.clone()
            stiefel.grad = gs[0].clone()
            for opt in opts:
                opt.step()
        return ps, opts[0].state_dict()

    together, sd = run(lambda ps: [ps])
    alone = [run(lambda ps, i=i: [[ps[i]]])[0][i] for i in range(3)]
    for a, b in zip(together, alone):
        assert torch.allclose(a, b, rtol=0, atol=1e-14)
    state = sd["state"][0]
    assert state["exp_avg"].shape == (8, 3) if "exp_avg" in state else state["momentum_buffer"].shape == (8, 3)


def test_scalar_second_moment_is_one_value_per_column():
    x = torch.nn.Parameter(Oblique().random(6, 4))
    x0 = x.detach().clone()
    opt = so.RiemannianAdam([{"params": [x], "manifold": "oblique"}], lr=0.01, second_moment="scalar")
    x.grad = torch.randn(6, 4)
    opt.step()
    v = opt.state[x]["exp_avg_sq"]
    assert v.shape == (4, 1, 1)
    xi = x.grad - x0 * (x0 * x.grad).sum(0)  # the first v is (1 − β2)·mean(ξ_i²) of each column
    assert torch.allclose(v.flatten(), 0.001 * (xi * xi).mean(0), rtol=1e-12)


def test_state_dict_round_trip_keeps_the_manifold_and_loads_weights_only():
    x = torch.nn.Parameter(Oblique().random(6, 4))
    opt = so.LandingAdam([{"params": [x], "manifold": "oblique"}], lr=0.01)
    x.grad = torch.randn(6, 4)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["param_groups"][0]["manifold"]["manifold"] == "oblique"
    other = so.LandingAdam([{"params": [x], "manifold": "oblique"}], lr=0.01)
    other.load_state_dict(sd)
    assert isinstance(other.param_groups[0]["manifold"], Oblique)
    assert torch.equal(other.state[x]["exp_avg"], opt.state[x]["exp_avg"])
    wrong = so.LandingAdam([{"params": [x], "manifold": "stiefel"}], lr=0.01)
    with pytest.raises(ValueError, match="saved with manifold Oblique"):
        wrong.load_state_dict(sd)


def test_project_lands_exactly():
    x = torch.nn.Parameter(Oblique().random(6, 4) * 1.1)
    opt = so.LandingSGD([{"params": [x], "manifold": "oblique"}], lr=0.01)
    before = opt.project_()
    assert before == pytest.approx(2 * 0.21)  # four columns at |1.1² − 1| each: √4 · 0.21
    assert float(Oblique().infeasibility(x.detach())) < 1e-12


def test_riemannian_sgd_matches_geoopt_sphere_rows():
    """geoopt's Sphere steps each row of a tensor; Ob on X is Sphere on Xᵀ: the same SGD steps to 1e-10
    (without momentum: geoopt's buffer starts at μ·G + ξ, torch's at ξ)."""
    x0 = Oblique().random(9, 4, generator=torch.Generator().manual_seed(5))
    grads = [torch.randn(9, 4, generator=torch.Generator().manual_seed(10 + k)) for k in range(20)]
    ours = torch.nn.Parameter(x0.clone())
    theirs = geoopt.ManifoldParameter(x0.mT.clone(), manifold=geoopt.Sphere())
    opt_a = so.RiemannianSGD([{"params": [ours], "manifold": "oblique"}], lr=0.1)
    opt_b = geoopt.optim.RiemannianSGD([theirs], lr=0.1)
    for g in grads:
        ours.grad = g.clone()
        theirs.grad = g.mT.clone()
        opt_a.step()
        opt_b.step()
    assert float((ours.detach() - theirs.detach().mT).abs().max()) < 1e-10


def test_the_metric_does_not_split_oblique_geometries():
    """Both metrics of St(n, 1) are the sphere's: one spec, one bucket, and shard-safe retractions stay so."""
    from stiefel_opt.distributed import shard_safe

    a, b = Oblique(metric="canonical", retraction="exp"), Oblique(retraction="exp")
    assert a.spec() == b.spec() and a.metric == "euclidean"
    assert shard_safe(a.retraction, a.metric)
    with pytest.raises(ValueError, match="metric"):
        Oblique(metric="riemannian")
