"""Every equivalence docs/geoopt.md claims, checked against geoopt 0.5.1 itself (float64).

Claims tested here are marked in each test's name. Claims tested elsewhere, not repeated:
- a parameter on any other geoopt manifold (Sphere, PoincareBall, Scaled, EuclideanStiefelExact,
  CanonicalStiefel) is stepped as geoopt steps it, SGD and Adam, weight decay in geoopt's form:
  tests/test_geoopt_manifolds.py::test_sgd_matches_geoopt, ::test_adam_matches_geoopt;
  ``maximize`` honoured there: ::test_maximize_ascends_on_a_foreign_manifold;
- ``stabilize=k`` as geoopt's: ::test_stabilize_matches_geoopt_on_a_drifting_point,
  ::test_stabilize_on_stiefel_parameters_matches_geoopt;
- landing takes any geoopt Stiefel parameter and refuses other manifolds:
  ::test_landing_lands_any_geoopt_stiefel_parameter, ::test_landing_refuses_foreign_manifolds;
- RiemannianSGD (momentum 0) with ``Stiefel(retraction="qr")`` follows geoopt's on EuclideanStiefel:
  tests/test_optim_parity.py::test_geoopt_rsgd_parity_qr.
"""
import math

import pytest
import torch

import stiefel_opt as so
import stiefel_opt.functional as F
from stiefel_opt._geoopt import geoopt

DT = torch.float64
N, P, STEPS = 12, 3, 20


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, N, dtype=DT, generator=g)
    return a + a.T, F.random_point(N, P, dtype=DT, generator=g)


def _run(params_opts, a, steps=STEPS, sign=-1.0):
    """Step each (parameter, optimizer) on sign·tr(XᵀAX) ``steps`` times."""
    for _ in range(steps):
        for x, opt in params_opts:
            opt.zero_grad()
            (sign * torch.trace(x.T @ a @ x)).backward()
            opt.step()


def _gap(x, y):
    return float((x.detach() - y.detach()).abs().max())


def test_claim_stiefel_parameter_is_a_manifold_parameter_and_geoopt_stiefel_is_canonical():
    assert isinstance(so.StiefelParameter.random(6, 2), geoopt.ManifoldParameter)
    assert type(geoopt.Stiefel()) is geoopt.CanonicalStiefel


def test_claim_euclidean_stiefel_is_our_stiefel_with_qr():
    """projx, proju/egrad2rgrad, retr (QR, positive diag(R)), transp (projection), inner agree."""
    g = torch.Generator().manual_seed(1)
    x = F.random_point(N, P, dtype=DT, generator=g)
    e, u, v = (torch.randn(N, P, dtype=DT, generator=g) for _ in range(3))
    theirs, ours = geoopt.EuclideanStiefel(), so.Stiefel(retraction="qr")
    tu = theirs.proju(x, u)
    for name, args in [("projx", (e,)), ("proju", (x, u)), ("egrad2rgrad", (x, u)), ("retr", (x, 0.3 * tu)),
                       ("transp", (x, theirs.retr(x, 0.3 * tu), v)), ("inner", (x, tu, tu))]:
        if name == "transp":  # geoopt's transp(x, y, v) projects v onto the tangent space at y
            got, want = ours.transp(x, args[1], v), theirs.transp(x, args[1], v)
        else:
            got, want = getattr(ours, name)(*args), getattr(theirs, name)(*args)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13, msg=name)


def test_claim_geoopt_checks_shape_only_and_rejects_wide_ours_checks_orthonormality():
    assert geoopt.ManifoldParameter(torch.randn(8, 3), manifold=geoopt.EuclideanStiefel()) is not None
    with pytest.raises(ValueError):
        geoopt.ManifoldParameter(F.random_point(3, 8), manifold=geoopt.EuclideanStiefel())
    with pytest.raises(ValueError):
        so.StiefelParameter(3 * F.random_point(8, 3))
    assert so.feasibility(so.StiefelParameter(F.random_point(3, 8))) < 1e-5  # wide: orthonormal rows


def test_claim_our_adam_steps_a_geoopt_euclidean_stiefel_parameter_as_our_stiefel_qr():
    a, x0 = _problem()
    theirs = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.EuclideanStiefel())
    ours = so.StiefelParameter(x0.clone(), manifold=so.Stiefel(retraction="qr"))
    _run([(theirs, so.RiemannianAdam([theirs], lr=0.05)), (ours, so.RiemannianAdam([ours], lr=0.05))], a)
    assert torch.equal(theirs.detach(), ours.detach())


@pytest.mark.parametrize("amsgrad", [False, True])
def test_claim_geoopt_adam_is_scalar_adam_with_lr_and_eps_over_sqrt_np(amsgrad):
    """geoopt's v is the EMA of ‖ξ‖²_F, ours (scalar) of ‖ξ‖²_F/(np): lr/√(np) and eps/√(np) give
    geoopt's update m̂/(√v̂ + eps) exactly; scaling lr alone leaves eps √(np) times too small."""
    a, x0 = _problem()
    s, lr, eps = math.sqrt(N * P), 0.05, 1e-8
    ref = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.EuclideanStiefel())
    exact = so.StiefelParameter(x0.clone(), manifold=so.Stiefel(retraction="qr"))
    lr_only = so.StiefelParameter(x0.clone(), manifold=so.Stiefel(retraction="qr"))
    _run([(ref, geoopt.optim.RiemannianAdam([ref], lr=lr, eps=eps, amsgrad=amsgrad)),
          (exact, so.RiemannianAdam([exact], lr=lr / s, eps=eps / s, amsgrad=amsgrad, second_moment="scalar")),
          (lr_only, so.RiemannianAdam([lr_only], lr=lr / s, amsgrad=amsgrad, second_moment="scalar"))], a)
    assert _gap(ref, exact) <= 1e-12
    assert _gap(ref, lr_only) > 1e-11


def test_claim_canonical_scalar_adam_is_not_geoopt_canonical_adam():
    """On CanonicalStiefel (geoopt.Stiefel()) geoopt's v is the canonical ⟨ξ, ξ⟩ = ‖ξ‖²_F − ½‖Xᵀξ‖²_F and
    its Cayley map is not ours, so Stiefel(metric="canonical", retraction="cayley") with the scalar
    second moment is another optimizer; a geoopt parameter on geoopt.Stiefel() is reproduced."""
    a, x0 = _problem()
    s = math.sqrt(N * P)
    ref = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.Stiefel())
    native = so.StiefelParameter(x0.clone(), manifold=so.Stiefel(metric="canonical", retraction="cayley"))
    route = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.Stiefel())
    _run([(ref, geoopt.optim.RiemannianAdam([ref], lr=0.05)),
          (native, so.RiemannianAdam([native], lr=0.05 / s, eps=1e-8 / s, second_moment="scalar")),
          (route, so.RiemannianAdam([route], lr=0.05))], a)
    assert _gap(ref, native) > 1e-4
    assert _gap(ref, route) <= 1e-12

    xi = geoopt.Stiefel().egrad2rgrad(x0, torch.randn(N, P, dtype=DT))
    torch.testing.assert_close(geoopt.Stiefel().component_inner(x0, xi).squeeze(),
                               xi.square().sum() - 0.5 * (x0.T @ xi).square().sum(), rtol=0, atol=1e-13)
    assert _gap(geoopt.Stiefel().retr(x0, 0.5 * xi), F.retract(x0, 0.5 * xi, "cayley", "canonical")) > 1e-3


def test_claim_geoopt_ignores_maximize_ours_honours_it():
    a, x0 = _problem()
    g_max = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.EuclideanStiefel())
    g_min = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.EuclideanStiefel())
    ours = so.StiefelParameter(x0.clone())
    _run([(g_max, geoopt.optim.RiemannianAdam([g_max], lr=0.05, maximize=True)),
          (g_min, geoopt.optim.RiemannianAdam([g_min], lr=0.05)),
          (ours, so.RiemannianAdam([ours], lr=0.05, maximize=True))], a, sign=1.0)
    assert torch.equal(g_max.detach(), g_min.detach())          # maximize=True changed nothing
    start = torch.trace(x0.T @ a @ x0)
    assert torch.trace(g_max.T @ a @ g_max) < start < torch.trace(ours.T @ a @ ours)


def test_claim_geoopt_first_momentum_step_is_not_tangent_ours_is():
    a, x0 = _problem()
    lr, mu = 0.05, 0.9
    grad = -2 * a @ x0                                            # ∇ of −tr(XᵀAX)
    rgrad = F.proj_tangent(x0, grad)
    theirs = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.EuclideanStiefel())
    ours = so.StiefelParameter(x0.clone(), manifold=so.Stiefel(retraction="qr"))
    _run([(theirs, geoopt.optim.RiemannianSGD([theirs], lr=lr, momentum=mu)),
          (ours, so.RiemannianSGD([ours], lr=lr, momentum=mu))], a, steps=1)
    assert _gap(theirs, F.retract(x0, -lr * (mu * grad + rgrad), "qr")) <= 1e-13
    assert _gap(ours, F.retract(x0, -lr * rgrad, "qr")) <= 1e-13


@pytest.mark.parametrize("manifold", [geoopt.EuclideanStiefel(), geoopt.CanonicalStiefel()], ids=type)
def test_claim_weight_decay_on_stiefel_is_a_no_op_in_geoopt_and_skipped_by_us(manifold):
    a, x0 = _problem()
    decayed = geoopt.ManifoldParameter(x0.clone(), manifold=manifold)
    plain = geoopt.ManifoldParameter(x0.clone(), manifold=manifold)
    ours_decayed, ours_plain = so.StiefelParameter(x0.clone()), so.StiefelParameter(x0.clone())
    _run([(decayed, geoopt.optim.RiemannianAdam([decayed], lr=0.05, weight_decay=0.1)),
          (plain, geoopt.optim.RiemannianAdam([plain], lr=0.05)),
          (ours_decayed, so.RiemannianAdam([ours_decayed], lr=0.05, weight_decay=0.1)),
          (ours_plain, so.RiemannianAdam([ours_plain], lr=0.05))], a)
    assert _gap(decayed, plain) <= 1e-12
    assert torch.equal(ours_decayed.detach(), ours_plain.detach())


def test_claim_geoopt_qr_retraction_has_no_bf16_cpu_kernel():
    x = F.random_point(N, P).bfloat16()
    with pytest.raises((RuntimeError, NotImplementedError)):
        geoopt.EuclideanStiefel().retr(x, torch.zeros_like(x))


@pytest.mark.parametrize("retraction", ["polar", "qr", "cayley"])
def test_claim_geoopt_optimizers_use_our_retractions(retraction):
    a, x0 = _problem()
    z = so.StiefelParameter(x0.clone(), manifold=so.Stiefel(retraction=retraction))
    _run([(z, geoopt.optim.RiemannianSGD([z], lr=0.01))], a, steps=1)
    expected = F.retract(x0, -0.01 * F.proj_tangent(x0, -2 * a @ x0), retraction)
    assert _gap(z, expected) <= 1e-13
