"""Parameters on geoopt's other manifolds (Sphere, PoincareBall, Scaled, the exact and canonical
Stiefel) are stepped through their own manifold exactly as geoopt's optimizers step them, or refused;
``stabilize`` is honoured or refused."""
import pytest
import torch

import stiefel_opt.functional as F
from stiefel_opt import LandingAdam, LandingSGD, RiemannianAdam, RiemannianSGD, Stiefel, StiefelParameter
from stiefel_opt._geoopt import geoopt
from stiefel_opt.optim._foreign import is_foreign

DT = torch.float64
STEPS = 20
MAX_DIFF: dict[str, float] = {}  # measured ours-vs-geoopt gaps, printed with -s


def _manifold(kind):
    return {
        "sphere": lambda: geoopt.Sphere(),
        "sphere_exact": lambda: geoopt.SphereExact(),
        "poincare": lambda: geoopt.PoincareBall(c=1.0),
        "scaled_stiefel": lambda: geoopt.Scaled(geoopt.EuclideanStiefel(), 2.0),
        "stiefel_exact": lambda: geoopt.EuclideanStiefelExact(),
        "stiefel_canonical": lambda: geoopt.CanonicalStiefel(),
    }[kind]()


def _start(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if "stiefel" in kind:
        return F.random_point(7, 3, dtype=DT, generator=g)
    x = torch.randn(4, 5, dtype=DT, generator=g)
    if kind == "poincare":
        return 0.5 * x / (1 + x.norm(dim=-1, keepdim=True))
    return x / x.norm(dim=-1, keepdim=True)


def _loss(x):
    g = torch.Generator().manual_seed(11)
    c = torch.randn(x.shape, dtype=DT, generator=g)
    d = torch.rand(x.shape, dtype=DT, generator=g)
    return (c * x).sum() + (d * x**2).sum() + 0.1 * (x**3).sum()


def _rgrad(manifold, x, weight_decay):
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(_loss(x), x)
    return manifold.egrad2rgrad(x.detach(), grad + weight_decay * x.detach())


def _trajectory(param, opt, steps=STEPS):
    out = []
    for _ in range(steps):
        opt.zero_grad()
        _loss(param).backward()
        opt.step()
        out.append(param.detach().clone())
    return torch.stack(out)


def _compare(name, ours, theirs, manifold, tol=1e-10):
    gap = float((ours - theirs).abs().max())
    MAX_DIFF[name] = gap
    assert gap <= tol, f"{name}: max |ours − geoopt| = {gap:.3e}"
    assert manifold.check_point_on_manifold(ours[-1], atol=1e-8, rtol=1e-8), name


KINDS = ["sphere", "sphere_exact", "poincare", "scaled_stiefel", "stiefel_exact", "stiefel_canonical"]
SGD_FLAGS = [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True), dict(momentum=0.8, dampening=0.3),
             dict(momentum=0.5, weight_decay=0.05)]


@pytest.mark.parametrize("flags", SGD_FLAGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "plain")
@pytest.mark.parametrize("kind", KINDS)
def test_sgd_matches_geoopt(kind, flags):
    m = _manifold(kind)
    x0 = _start(kind)
    lr = 0.02
    ours = geoopt.ManifoldParameter(x0.clone(), manifold=m)
    theirs = geoopt.ManifoldParameter(x0.clone(), manifold=_manifold(kind))
    opt = RiemannianSGD([ours], lr=lr, **flags)
    ref = geoopt.optim.RiemannianSGD([theirs], lr=lr, **flags)
    mu, damp = flags.get("momentum", 0), flags.get("dampening", 0)
    if mu:
        # geoopt seeds its buffer with the Euclidean gradient (μ·G + ξ on the first step); seeded with
        # (d/μ)·ξ its first buffer is torch.optim.SGD's ξ, which we follow
        ref.state[theirs]["momentum_buffer"] = damp / mu * _rgrad(m, x0, flags.get("weight_decay", 0))
    _compare(f"sgd {kind} {flags}", _trajectory(ours, opt), _trajectory(theirs, ref), m)
    if mu:
        torch.testing.assert_close(opt.state[ours]["momentum_buffer"], ref.state[theirs]["momentum_buffer"],
                                   rtol=0, atol=1e-10)
    else:
        assert ours not in opt.state  # like torch.optim.SGD: no state without momentum


@pytest.mark.parametrize("flags", [dict(), dict(amsgrad=True), dict(weight_decay=0.05, betas=(0.8, 0.99), eps=1e-6)],
                         ids=["plain", "amsgrad", "wd-betas-eps"])
@pytest.mark.parametrize("kind", KINDS)
def test_adam_matches_geoopt(kind, flags):
    m = _manifold(kind)
    x0 = _start(kind, seed=1)
    ours = geoopt.ManifoldParameter(x0.clone(), manifold=m)
    theirs = geoopt.ManifoldParameter(x0.clone(), manifold=_manifold(kind))
    opt = RiemannianAdam([ours], lr=0.01, **flags)
    ref = geoopt.optim.RiemannianAdam([theirs], lr=0.01, **flags)
    _compare(f"adam {kind} {flags}", _trajectory(ours, opt), _trajectory(theirs, ref), m)
    for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if flags.get("amsgrad") else ()):
        torch.testing.assert_close(opt.state[ours][key], ref.state[theirs][key], rtol=0, atol=1e-10)
    assert int(opt.state[ours]["step"]) == ref.state[theirs]["step"] == STEPS


def test_maximize_ascends_on_a_foreign_manifold():
    x0 = _start("poincare")
    up = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.PoincareBall())
    down = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.PoincareBall())
    opt_up = RiemannianAdam([up], lr=0.01, maximize=True)
    opt_down = RiemannianAdam([down], lr=0.01)
    for _ in range(5):
        for p, o, sign in ((up, opt_up, 1.0), (down, opt_down, -1.0)):
            o.zero_grad()
            (sign * _loss(p)).backward()
            o.step()
    torch.testing.assert_close(up.detach(), down.detach(), rtol=0, atol=1e-12)
    assert _loss(up) > _loss(x0)


@pytest.mark.parametrize("make", [lambda ps: RiemannianSGD(ps, lr=0.02, momentum=0.9),
                                  lambda ps: RiemannianAdam(ps, lr=0.02)], ids=["sgd", "adam"])
def test_group_mixing_foreign_stiefel_and_euclidean(make):
    """Each kind of parameter in one group gets exactly the update it gets alone."""
    sphere0 = _start("sphere")
    stiefel0 = F.random_point(6, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    eucl0 = torch.randn(5, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    mixed = [geoopt.ManifoldParameter(sphere0.clone(), manifold=geoopt.Sphere()),
             StiefelParameter(stiefel0.clone()), torch.nn.Parameter(eucl0.clone())]
    alone = [geoopt.ManifoldParameter(sphere0.clone(), manifold=geoopt.Sphere()),
             StiefelParameter(stiefel0.clone()), torch.nn.Parameter(eucl0.clone())]
    opt = make(mixed)
    singles = [make([p]) for p in alone]
    for _ in range(10):
        opt.zero_grad()
        sum(_loss(p) for p in mixed).backward()
        opt.step()
        for p, o in zip(alone, singles):
            o.zero_grad()
            _loss(p).backward()
            o.step()
    for a, b in zip(mixed, alone):
        assert torch.equal(a.detach(), b.detach())
    assert geoopt.Sphere().check_point_on_manifold(mixed[0], atol=1e-12, rtol=0)
    assert F.distance(mixed[1].detach()) < 1e-12


@pytest.mark.parametrize("make", [LandingSGD, LandingAdam])
@pytest.mark.parametrize("kind", ["sphere", "poincare", "scaled_stiefel"])
def test_landing_refuses_foreign_manifolds(make, kind):
    p = geoopt.ManifoldParameter(_start(kind), manifold=_manifold(kind))
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 .*" + type(_manifold(kind)).__name__):
        make([p], lr=0.01)
    opt = make([StiefelParameter(F.random_point(5, 2))], lr=0.01)
    with pytest.raises(ValueError, match="parameter 1 of param group 1"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3)), p]})


def test_foreign_parameter_options_that_cannot_apply_raise():
    p = geoopt.ManifoldParameter(_start("sphere"), manifold=geoopt.Sphere())
    with pytest.raises(ValueError, match="parameter 0 of param group 0 .*retraction"):
        RiemannianSGD([p], lr=0.1, retraction="cayley")
    with pytest.raises(ValueError, match="parameter 0 of param group 0 .*Sphere.*'manifold'"):
        RiemannianSGD([{"params": [p], "manifold": "stiefel"}], lr=0.1)
    with pytest.raises(ValueError, match="parameter 0 of param group 0 .*decoupled_weight_decay"):
        RiemannianAdam([p], lr=0.1, weight_decay=0.1, decoupled_weight_decay=True)
    with pytest.raises(TypeError, match="Sphere"):
        RiemannianSGD([{"params": [torch.nn.Parameter(torch.ones(3))], "manifold": geoopt.Sphere()}], lr=0.1)
    half = geoopt.ManifoldParameter(_start("sphere").to(torch.bfloat16), manifold=geoopt.Sphere())
    with pytest.raises(ValueError, match="parameter 0 of param group 0 .*bfloat16"):
        RiemannianAdam([half], lr=0.1)
    RiemannianAdam([p], lr=0.1, decoupled_weight_decay=True)  # no decay: nothing to refuse


def test_nonfinite_gradient_on_a_foreign_parameter_is_skipped_or_raises():
    p = geoopt.ManifoldParameter(_start("sphere"), manifold=geoopt.Sphere())
    opt = RiemannianAdam([p], lr=0.1)
    _loss(p).backward()
    opt.step()
    before = p.detach().clone()
    saved = {k: v.clone() for k, v in opt.state[p].items()}
    p.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="parameter 0 of param group 0"):
        opt.step()
    assert torch.equal(p.detach(), before)
    assert all(torch.equal(opt.state[p][k], v) for k, v in saved.items())
    assert opt.state[p]["nonfinite_skips"] == 1
    opt.param_groups[0]["nonfinite"] = "raise"
    with pytest.raises(FloatingPointError, match="parameter 0 of param group 0"):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_stabilize_matches_geoopt_on_a_drifting_point():
    """A point pushed off the sphere stays off under the exponential map; ``stabilize=k`` projects it
    back every k steps, as geoopt does."""
    x0 = 1.5 * _start("sphere_exact")
    runs = {}
    for k in (None, 3):
        ours = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.SphereExact())
        theirs = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.SphereExact())
        opt = RiemannianAdam([ours], lr=0.01, stabilize=k)
        ref = geoopt.optim.RiemannianAdam([theirs], lr=0.01, stabilize=k)
        runs[k] = _trajectory(ours, opt, 7)
        _compare(f"adam sphere_exact stabilize={k}", runs[k], _trajectory(theirs, ref, 7), geoopt.Sphere(),
                 tol=1e-10) if k else None
    norms = runs[3].norm(dim=-1)
    assert torch.allclose(norms[2], torch.ones_like(norms[2]), atol=1e-12)  # projected after step 3
    assert (runs[None].norm(dim=-1) > 1.4).all()                              # never without stabilize


class _CountingStiefel(Stiefel):
    projections = 0

    def projx(self, x):
        type(self).projections += 1
        return super().projx(x)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_stabilize_on_stiefel_parameters_matches_geoopt(kind):
    x0 = F.random_point(8, 3, dtype=DT, generator=torch.Generator().manual_seed(4))
    ours = StiefelParameter(x0.clone(), manifold=_CountingStiefel(retraction="qr"))
    theirs = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.EuclideanStiefel())
    if kind == "sgd":
        opt = RiemannianSGD([ours], lr=0.02, momentum=0.9, stabilize=4)
        ref = geoopt.optim.RiemannianSGD([theirs], lr=0.02, momentum=0.9, stabilize=4)
        ref.state[theirs]["momentum_buffer"] = torch.zeros_like(x0)
    else:
        # geoopt's second moment is ‖ξ‖², ours (scalar) ‖ξ‖²/(n·p): scale lr and eps by √(n·p)
        opt = RiemannianAdam([ours], lr=0.02, eps=1e-8, second_moment="scalar", stabilize=4)
        ref = geoopt.optim.RiemannianAdam([theirs], lr=0.02 * 24**0.5, eps=1e-8 * 24**0.5, stabilize=4)
    _CountingStiefel.projections = 0
    _compare(f"{kind} stiefel stabilize=4", _trajectory(ours, opt), _trajectory(theirs, ref),
             geoopt.EuclideanStiefel())
    assert _CountingStiefel.projections == STEPS // 4


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_stabilize_is_validated(bad):
    p = StiefelParameter(F.random_point(5, 2))
    for make in (RiemannianSGD, RiemannianAdam):
        with pytest.raises(ValueError, match="stabilize must be None or a positive int"):
            make([p], lr=0.1, stabilize=bad)
        opt = make([p], lr=0.1)
        with pytest.raises(ValueError, match="stabilize must be None or a positive int"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "stabilize": bad})


@pytest.mark.parametrize("make", [LandingSGD, LandingAdam])
def test_landing_refuses_stabilize(make):
    p = StiefelParameter(F.random_point(5, 2))
    with pytest.raises(TypeError):
        make([p], lr=0.1, stabilize=2)
    with pytest.raises(ValueError, match="param group 0 .*stabilize"):
        make([{"params": [p], "stabilize": 2}], lr=0.1)


def test_classification():
    for m in (geoopt.Sphere(), geoopt.PoincareBall(), geoopt.EuclideanStiefelExact(), geoopt.CanonicalStiefel(),
              geoopt.Scaled(geoopt.EuclideanStiefel(), 2.0)):
        assert is_foreign(m), m
    for m in (None, geoopt.Euclidean(), geoopt.EuclideanStiefel(), Stiefel(), Stiefel(metric="canonical")):
        assert not is_foreign(m), m


@pytest.mark.parametrize("make", [LandingSGD, LandingAdam])
@pytest.mark.parametrize("manifold", [geoopt.Stiefel(), geoopt.EuclideanStiefelExact()], ids=type)
def test_landing_lands_any_geoopt_stiefel_parameter(make, manifold):
    """Landing retracts nothing: only the point set matters, so geoopt.Stiefel() (canonical by default)
    and EuclideanStiefelExact parameters are landed like ours (same update as a Stiefel of that metric)."""
    torch.manual_seed(0)
    x0 = F.random_point(12, 3, dtype=torch.float64)
    a = geoopt.ManifoldParameter(x0.clone(), manifold=manifold)
    b = StiefelParameter(x0.clone())
    oa, ob = make([a], lr=0.05), make([b], lr=0.05)
    for _ in range(5):
        g = torch.randn_like(x0)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(a, b)


def test_geoopt_geometry_adapter_speaks_the_matrix_manifold_interface():
    """The per-tensor adapter over a geoopt manifold offers the interface the package's manifolds do
    (the per-tensor steps call only these), with infeasibility ‖x − projx(x)‖_F and no landing field."""
    import inspect

    from stiefel_opt import MatrixManifold, Stiefel
    from stiefel_opt.optim._foreign import GeooptGeometry

    geo = GeooptGeometry(geoopt.Sphere())
    for name in ("rgrad", "retract", "retr_transp", "component_inner", "projx", "infeasibility", "landing_field"):
        assert callable(getattr(geo, name)) and callable(getattr(MatrixManifold, name)), name
    x = geoopt.Sphere().projx(torch.randn(5, dtype=torch.float64))
    assert float(geo.infeasibility(x)) < 1e-15
    assert float(geo.infeasibility(3 * x)) == pytest.approx(2.0)
    u = torch.randn(5, dtype=torch.float64)
    assert torch.allclose(geo.rgrad(x, u), u - x * (x @ u))
    with pytest.raises(NotImplementedError, match="Stiefel"):
        geo.landing_field(x, u)
    assert "landing_field" in dict(inspect.getmembers(Stiefel))
