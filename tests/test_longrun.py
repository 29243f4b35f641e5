"""Long runs in fp32 (issue 14, item 1): 10,000 steps, the iterate stays on (or, for landing, near)
the Stiefel manifold. Small stacks of St(8, 3) matrices keep each run to a few seconds."""
import pytest
import torch

import stiefel_opt as so
from stiefel_opt import functional as F

STEPS = 10_000
SHAPE = (3, 8, 3)  # a stack of three St(8, 3) matrices
FEAS32 = 1e-5  # the fp32 bound on ‖XᵀX − I‖_F for a retraction's result

# every retraction path: the metric matters to `exp` (two geodesics) and picks the gradient's metric
PATHS = [("polar", "euclidean"), ("qr", "canonical"), ("cayley", "canonical"),
         ("newton_schulz", "euclidean"), ("exp", "euclidean"), ("exp", "canonical")]


def test_paths_cover_every_retraction():
    assert {method for method, _ in PATHS} == set(F.RETRACTIONS)


class Regression:
    """Stochastic least squares ½E‖A(X − W)‖² per matrix, W = 3·(a point of St(8, 3)) off the manifold
    so the Riemannian gradient never vanishes; each call draws a fresh minibatch A (12×8)."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)
        self.target = 3.0 * F.random_point(SHAPE, generator=self.gen)

    def start(self):
        return F.random_point(SHAPE, generator=self.gen)

    def grad(self, x):
        a = torch.randn(*SHAPE[:-2], 12, SHAPE[-2], generator=self.gen)
        return a.mT @ (a @ (x - self.target)) / a.shape[-2]


def _check(x, step, bound, what):
    d = F.distance(x)
    assert torch.isfinite(x).all(), f"{what}: non-finite entries at step {step}"
    assert float(d.max()) <= bound, f"{what}: ‖XᵀX − I‖_F = {float(d.max()):.3g} > {bound:g} at step {step}"
    return d


@pytest.mark.parametrize("method,metric", PATHS)
def test_retraction_stays_on_the_manifold_for_10000_steps(method, metric):
    """Riemannian gradient descent x ← R_x(−rgrad) in fp32: long steps (‖rgrad‖_F ≈ 10), the
    regime where the unprotected Euclidean exp turns NaN and the Cayley transform drifts past 1e-5."""
    problem = Regression(seed=len(method))
    x = problem.start()
    for step in range(1, STEPS + 1):
        x = F.retract(x, -F.egrad2rgrad(x, problem.grad(x), metric), method, metric)
        _check(x, step, FEAS32, f"{method}/{metric}")


@pytest.mark.parametrize("opt_cls,kwargs,paths", [
    # the RiemannianSGD(lr=1, momentum=0.9) run (exp: NaN by step 300), and Adam, whose short
    # steps let the rounding error of exp grow (1e-5 by step 50 before the correction); each group is
    # one retraction path
    (so.RiemannianSGD, dict(lr=1.0, momentum=0.9), [("exp", "euclidean")]),
    (so.RiemannianAdam, dict(lr=0.05), [("exp", "euclidean")]),
], ids=["RiemannianSGD", "RiemannianAdam"])
def test_riemannian_optimizer_stays_on_the_manifold_for_10000_steps(opt_cls, kwargs, paths):
    problem = Regression(seed=1)
    params = [torch.nn.Parameter(problem.start()) for _ in paths]
    opt = opt_cls([{"params": [w], "manifold": so.Stiefel(metric=metric, retraction=method)}
                   for w, (method, metric) in zip(params, paths)], **kwargs)
    for step in range(1, STEPS + 1):
        for w in params:
            w.grad = problem.grad(w.detach())
        opt.step()
        for w, (method, metric) in zip(params, paths):
            _check(w.detach(), step, FEAS32, f"{opt_cls.__name__} {method}/{metric}")


def _brockett(seed):
    """Minimize −tr(XᵀAXN) (gradient −2AXN), A symmetric 8×8, N = diag(3, 2, 1): its minimizers are
    the top eigenvectors of A in order."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(SHAPE[-2], SHAPE[-2], generator=gen)
    a = (b + b.mT) / 2
    n = torch.tensor([3.0, 2.0, 1.0])
    x = F.random_point(SHAPE, generator=gen)
    top = torch.linalg.eigvalsh(a).flip(-1)[: SHAPE[-1]]
    return x, lambda x: -2.0 * (a @ x) * n, float(-(top * n).sum())


@pytest.mark.parametrize("opt_cls,kwargs,cosine,end", [
    (so.LandingSGD, dict(lr=0.05, momentum=0.9), False, FEAS32),
    # Adam scales the fp32 rounding noise of the tangent term (≈1e-6 at the minimum) to steps of
    # size lr, so it settles only as a cosine schedule takes lr to 0, at d ≈ 3e-5
    (so.LandingAdam, dict(lr=0.02), True, 1e-4),
], ids=["LandingSGD", "LandingAdam"])
def test_landing_optimizer_stays_in_the_safe_region_for_10000_steps(opt_cls, kwargs, cosine, end):
    """‖XᵀX − I‖_F stays below the safe-region ε for 10,000 fp32 steps and ends small, at the
    Brockett minimum."""
    x0, grad, optimum = _brockett(seed=0)
    w = torch.nn.Parameter(x0)
    safe_eps = 0.5
    opt = opt_cls([{"params": [w], "manifold": "stiefel"}], safe_eps=safe_eps, **kwargs)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS) if cosine else None
    for step in range(1, STEPS + 1):
        w.grad = grad(w.detach())
        opt.step()
        if schedule is not None:
            schedule.step()
        _check(w.detach(), step, safe_eps, opt_cls.__name__)
    x = w.detach()
    _check(x, STEPS, end, f"{opt_cls.__name__} at the end")
    value = (x * (grad(x) / 2)).sum(dim=(-2, -1))  # −tr(XᵀAXN) per matrix
    assert torch.allclose(value, torch.tensor(optimum), rtol=1e-4), (value, optimum)
