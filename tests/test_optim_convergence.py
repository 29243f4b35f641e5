"""Every optimizer and wrapped optimizer reaches the closed-form optimum (1e-4 relative) on
Brockett/PCA St(200, 5) and orthogonal Procrustes (tall and wide)."""
import pytest
import torch

import stiefel_opt.functional as F
from stiefel_opt import LandingAdam, LandingSGD, RiemannianAdam, RiemannianSGD, StiefelParameter, landing, riemannian


def _brockett(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.random_point(200, 200, generator=g, dtype=torch.float64)
    evals = torch.linspace(0.0, 1.0, 200, dtype=torch.float64)
    a = (q * evals) @ q.T
    best = -float(evals[-5:].sum())
    return a.float(), (lambda x: -torch.trace(x.T @ a.float() @ x)), best


def _procrustes(wide, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(200, 5, generator=g, dtype=torch.float64)
    if wide:
        m = m.T
    best_x = F.project(m)
    best = 0.5 * float(((best_x - m) ** 2).sum())
    mf = m.float()
    return mf, (lambda x: 0.5 * ((x - mf) ** 2).sum()), best


def _make(kind, x):
    if kind == "RiemannianSGD":
        return RiemannianSGD([x], lr=0.5, momentum=0.9), 150
    if kind == "RiemannianSGD-nesterov-qr":
        return RiemannianSGD([x], lr=0.5, momentum=0.9, nesterov=True, retraction="qr"), 150
    if kind == "RiemannianAdam":
        return RiemannianAdam([x], lr=0.05), 250
    if kind == "RiemannianAdam-scalar":
        return RiemannianAdam([x], lr=0.05, second_moment="scalar"), 250
    if kind == "LandingSGD":
        return LandingSGD([x], lr=0.5, momentum=0.9), 300
    if kind == "LandingAdam":
        return LandingAdam([x], lr=0.1), 300
    if kind == "LandingAdam-scalar":
        return LandingAdam([x], lr=0.1, second_moment="scalar"), 300
    if kind == "riemannian(AdamW)":
        return riemannian(torch.optim.AdamW([x], lr=0.05)), 250
    if kind == "riemannian(SGD)":
        return riemannian(torch.optim.SGD([x], lr=0.5, momentum=0.9)), 150
    if kind == "landing(SGD)":
        return landing(torch.optim.SGD([x], lr=0.5, momentum=0.9), clip=1.0), 300
    if kind == "landing(Adam)":
        return landing(torch.optim.Adam([x], lr=0.05)), 300
    raise AssertionError(kind)


KINDS = ["RiemannianSGD", "RiemannianSGD-nesterov-qr", "RiemannianAdam", "RiemannianAdam-scalar", "LandingSGD",
         "LandingAdam", "LandingAdam-scalar", "riemannian(AdamW)", "riemannian(SGD)", "landing(SGD)",
         "landing(Adam)"]


def _solve(kind, problem, x0):
    x = StiefelParameter(x0.clone())
    opt, steps = _make(kind, x)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=0.1 * opt.param_groups[0]["lr"])
    _, f, _ = problem
    for _ in range(steps):
        opt.zero_grad()
        f(x).backward()
        opt.step()
        sched.step()
    return x.detach()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("problem_name", ["brockett", "procrustes-tall", "procrustes-wide"])
def test_reaches_closed_form_optimum(kind, problem_name):
    if problem_name == "brockett":
        problem = _brockett()
        shape = (200, 5)
    else:
        wide = problem_name.endswith("wide")
        problem = _procrustes(wide)
        shape = (5, 200) if wide else (200, 5)
    x0 = F.random_point(*shape, generator=torch.Generator().manual_seed(1))
    x = _solve(kind, problem, x0)
    _, f, best = problem
    value = float(f(x.double().float()))
    assert abs(value - best) <= 1e-4 * abs(best), (value, best)
    # landing(SGD) ends where its momentum and the decayed lr leave it: over start seeds 1-6 its final
    # ‖XᵀX − I‖_F spreads over 4e-6 … 1.6e-4 (rounding decides where in that range; project_() lands)
    assert float(F.distance(x)) <= (5e-4 if kind == "landing(SGD)" else 1e-4)
