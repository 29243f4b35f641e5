"""Parity on Stiefel parameters: flags rejected on manifold groups, geoopt's optimizers.

Euclidean parameters (bit-identical to the torch.optim twins over torch's own optim_db inputs and
product grids, the same errors, state_dict migration) are tested in test_optim_db.py.
"""
import pytest
import torch

import stiefel_opt.functional as F
from stiefel_opt import LandingAdam, RiemannianAdam, RiemannianSGD, Stiefel, StiefelParameter
from stiefel_opt._geoopt import geoopt


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
