"""Parity: Euclidean parameters bit-identical to torch.optim; Stiefel parameters vs geoopt."""
import itertools

import pytest
import torch

import stiefel_opt.functional as F
from stiefel_opt import LandingAdam, LandingSGD, RiemannianAdam, RiemannianSGD, Stiefel, StiefelParameter
from stiefel_opt._geoopt import geoopt


def _params():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(7, 4, generator=g), torch.randn(5, generator=g), torch.randn(3, 2, 2, generator=g)]


def _run(make, steps=4, with_manifold=False):
    ps = [torch.nn.Parameter(p.clone()) for p in _params()]
    groups = [{"params": ps}]
    if with_manifold:
        groups.append({"params": [StiefelParameter(F.random_point(6, 3))], "lr": 0.01})
    opt = make(groups)
    g = torch.Generator().manual_seed(4)
    gm = torch.Generator().manual_seed(5)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        for p in groups[-1]["params"] if with_manifold else []:
            p.grad = torch.randn(p.shape, generator=gm)
        opt.step()
    return ps, opt


SGD_GRID = [dict(momentum=m, nesterov=n, dampening=d, weight_decay=w, maximize=x, foreach=f)
            for m, n, d, w, x, f in itertools.product((0.0, 0.9), (False, True), (0.0, 0.3), (0.0, 0.1),
                                                      (False, True), (False, True))
            if not (n and (m == 0 or d != 0))]


@pytest.mark.parametrize("cls", [RiemannianSGD, LandingSGD])
@pytest.mark.parametrize("kw", SGD_GRID, ids=str)
def test_sgd_bit_identical(cls, kw):
    ref, _ = _run(lambda groups: torch.optim.SGD(groups[:1], lr=0.1, **kw))
    ours, _ = _run(lambda groups: cls(groups, lr=0.1, **kw), with_manifold=True)
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)


ADAM_GRID = [dict(amsgrad=a, weight_decay=w, maximize=x, foreach=f, decoupled_weight_decay=d)
             for a, w, x, f, d in itertools.product((False, True), (0.0, 0.1), (False, True), (False, True),
                                                    (False, True))]


@pytest.mark.parametrize("cls", [RiemannianAdam, LandingAdam])
@pytest.mark.parametrize("kw", ADAM_GRID, ids=str)
def test_adam_bit_identical(cls, kw):
    ref, _ = _run(lambda groups: torch.optim.Adam(groups[:1], lr=0.01, **kw))
    ours, _ = _run(lambda groups: cls(groups, lr=0.01, **kw), with_manifold=True)
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)


def test_adamw_and_fused_euclidean_group_bit_identical():
    ref, _ = _run(lambda groups: torch.optim.AdamW(groups[:1], lr=0.01, fused=True))
    ours, _ = _run(lambda groups: RiemannianAdam(groups[:1], lr=0.01, fused=True, weight_decay=0.01,
                                                  decoupled_weight_decay=True))
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)


@pytest.mark.parametrize("flag", ["fused", "differentiable"])
def test_unsupported_flags_rejected_on_manifold_groups(flag):
    x = StiefelParameter(F.random_point(6, 3))
    with pytest.raises(ValueError, match=flag):
        RiemannianAdam([x], **{flag: True})


def test_unknown_backend_rejected():
    x = StiefelParameter(F.random_point(6, 3))
    with pytest.raises(ValueError, match="backend"):
        LandingAdam([x], backend="cuda")


def test_geoopt_rsgd_parity_qr():
    """Our RiemannianSGD with Stiefel(retraction='qr') follows geoopt's RiemannianSGD on
    EuclideanStiefel (QR retraction). Momentum 0 only: geoopt's first momentum step uses
    μ·egrad + rgrad, which is not tangent and differs from torch.optim.SGD's convention."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=g, dtype=torch.float64)
    a = a @ a.T
    x0 = F.random_point(30, 4, generator=g, dtype=torch.float64)
    ours = StiefelParameter(x0.clone(), manifold=Stiefel(retraction="qr"))
    theirs = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.EuclideanStiefel())
    opt_a = RiemannianSGD([ours], lr=0.01)
    opt_b = geoopt.optim.RiemannianSGD([theirs], lr=0.01)
    for _ in range(20):
        for p, o in ((ours, opt_a), (theirs, opt_b)):
            o.zero_grad()
            (-torch.trace(p.T @ a @ p)).backward()
            o.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-10, atol=1e-10)


def test_geoopt_manifold_parameter_accepted():
    x = geoopt.ManifoldParameter(F.random_point(20, 3), manifold=geoopt.EuclideanStiefel())
    opt = LandingAdam([x], lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        (x.sum() ** 2).backward()
        opt.step()
    assert float(F.distance(x.detach())) < 0.5
    assert not torch.equal(x.detach(), x.detach() * 0)
