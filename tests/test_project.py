"""optimizer.project_(): land exactly after training (the package's optimizers and the wrappers).

A landing run under a cosine schedule ending at lr 0 stops ~1e-2 off the manifold; project_() puts
every Stiefel matrix (group-declared or carried by the parameter, batched, wide, fp32 masters) on its
polar factor — d < 1e-6 in fp32 (measured in fp64; the measurement in fp32 itself has ~1e-6 of
rounding), < 1e-12 in fp64 — moves the loss by O(d), leaves the moments tangent, and returns the
distance it removed."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import stiefel_opt as so
from stiefel_opt import functional as F

NATIVE = [so.LandingAdam, so.LandingSGD, so.RiemannianAdam, so.RiemannianSGD]
TANGENT = {"LandingAdam": "exp_avg", "RiemannianAdam": "exp_avg", "LandingSGD": "momentum_buffer",
           "RiemannianSGD": "momentum_buffer", "AdamW": "exp_avg", "SGD": "momentum_buffer"}


def _d(w: torch.Tensor, ndim: int = 2) -> float:
    """‖XᵀX − I‖_F measured in fp64 (largest over a batch; a conv weight as its matrix)."""
    w = w.detach().double()
    return float(F.distance(w.reshape(*w.shape[: w.dim() - ndim], w.shape[w.dim() - ndim], -1)).max())


def _tangent_gap(x: torch.Tensor, m: torch.Tensor) -> float:
    """‖sym(XᵀM)‖_F / ‖M‖_F on the tall form, in fp64 (0 for a tangent vector)."""
    x, m = x.detach().double(), m.detach().double()
    if x.shape[-2] < x.shape[-1]:
        x, m = x.mT, m.mT
    return float(torch.linalg.matrix_norm(F.sym(x.mT @ m)).max() / torch.linalg.matrix_norm(m).max())


def _problem(n=64, p=8, dtype=torch.float32, seed=0):
    """A weighted Brockett loss −tr(WᵀAW N) on a constrained nn.Linear(p, n) weight (n×p)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(p, n, bias=True).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, p, generator=g, dtype=dtype))
    so.constrain(lin, "weight")
    a = torch.randn(n, n, generator=g, dtype=dtype)
    a = a @ a.T / n
    weights = torch.arange(p, 0, -1, dtype=dtype)

    def loss_fn():
        w = lin.weight.to(dtype)
        return -torch.trace(w.T @ a @ w @ torch.diag(weights)) + lin.bias.square().sum()

    return lin, loss_fn


def _train(opt, loss_fn, steps=100):
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def _make(kind, params, lr):
    if kind == "riemannian":
        return so.riemannian(torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
    if kind == "landing":  # the wrappers' plain landing field is not scaled to a safe step: backtrack
        return so.landing(torch.optim.AdamW(params, lr=lr / 10, weight_decay=0.0), safe_eps=0.5)
    if kind == "landing_sgd":
        return so.landing(torch.optim.SGD(params, lr=lr / 10, momentum=0.9), safe_eps=0.5)
    kw = {"momentum": 0.9} if "SGD" in kind.__name__ else {}
    return kind(params, lr=lr, **kw)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("kind", [*NATIVE, "riemannian", "landing", "landing_sgd"],
                         ids=lambda k: k if isinstance(k, str) else k.__name__)
def test_project_lands_exactly_after_a_cosine_schedule(kind, dtype, tol):
    lin, loss_fn = _problem(dtype=dtype)
    landing = kind in ("landing", "landing_sgd") or (not isinstance(kind, str) and "Landing" in kind.__name__)
    opt = _make(kind, lin.parameters(), lr=0.1 if landing else 0.02)
    _train(opt, loss_fn)
    d_before = _d(lin.weight)
    if landing and not isinstance(kind, str):
        assert 1e-3 < d_before < 0.3, d_before  # the schedule stopped the landing off the manifold
    w_before, bias_before = lin.weight.detach().clone(), lin.bias.detach().clone()
    with torch.no_grad():
        loss_before = float(loss_fn())
    w_before.requires_grad_(True)
    grad_norm = float(torch.autograd.grad(loss_fn_at(loss_fn, lin, w_before), w_before)[0].norm())

    returned = opt.project_()

    assert isinstance(returned, float)
    assert returned == pytest.approx(d_before, rel=1e-6, abs=1e-12 if dtype == torch.float64 else 1e-6)
    assert _d(lin.weight) < tol
    assert torch.equal(lin.bias, bias_before)  # Euclidean parameters are left alone
    # the polar factor moves X by at most d: ‖X − polar(X)‖_F = ‖Σ − I‖_F ≤ ‖Σ² − I‖_F
    moved = float((lin.weight.detach().double() - w_before.detach().double()).norm())
    assert moved <= d_before * (1 + 1e-3) + 10 * tol
    with torch.no_grad():
        loss_after = float(loss_fn())
    assert abs(loss_after - loss_before) <= 2 * grad_norm * moved + 100 * moved ** 2 + 1e-4 * abs(loss_before)
    key = TANGENT[type(opt).__name__]
    state = opt.state[lin.weight]
    if key in state:
        assert _tangent_gap(lin.weight, state[key]) < (1e-6 if dtype == torch.float32 else 1e-12)
    # training goes on from the projected point
    loss = loss_fn()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(lin.weight).all()


def loss_fn_at(loss_fn, lin, w):
    """The loss with ``w`` in place of the weight (for its gradient at the pre-projection point)."""
    saved = lin.weight
    try:
        lin._parameters["weight"] = w
        return loss_fn()
    finally:
        lin._parameters["weight"] = saved


def test_project_is_idempotent_and_returns_zero_without_stiefel_parameters():
    lin, loss_fn = _problem()
    opt = so.LandingAdam(lin.parameters(), lr=0.1)
    _train(opt, loss_fn, steps=20)
    opt.project_()
    w = lin.weight.detach().clone()
    assert opt.project_() < 1e-5
    torch.testing.assert_close(lin.weight.detach(), w, atol=1e-6, rtol=0)
    plain = so.LandingAdam(nn.Linear(4, 3).parameters(), lr=0.1)
    assert plain.project_() == 0.0


@pytest.mark.parametrize("master_weights", [None, False])
def test_bf16_parameters_project_their_fp32_master(master_weights):
    torch.manual_seed(0)
    lin = nn.Linear(8, 64).to(torch.bfloat16)
    so.constrain(lin, "weight")
    opt = so.LandingAdam(lin.parameters(), lr=0.1, master_weights=master_weights)
    x = torch.randn(32, 8, dtype=torch.bfloat16)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
    for _ in range(50):
        loss = -(lin(x).float() ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    state = opt.state[lin.weight]
    master = state.get("master")
    assert (master is not None) == (master_weights is None)
    point = master if master is not None else lin.weight.float()
    d_before = _d(point)
    buffer = state["exp_avg"]._base  # the moments are views of the bucket's stacked buffer
    assert opt.project_() == pytest.approx(d_before, rel=1e-5)
    if master is not None:
        assert master.dtype == torch.float32 and state["master"] is master
        assert _d(master) < 1e-6
        assert torch.equal(lin.weight.detach(), master.to(torch.bfloat16))  # parameter = rounded master
    assert _d(lin.weight) < 0.05  # bf16 rounding of an orthonormal matrix
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg"]._base is buffer  # projected in place
    assert _tangent_gap(master if master is not None else lin.weight, state["exp_avg"]) < \
        (1e-6 if master is not None else 1e-2)
    loss = -(lin(x).float() ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(lin.weight.float()).all()


@pytest.mark.parametrize("kind", [so.LandingAdam, so.RiemannianSGD, "landing"],
                         ids=lambda k: k if isinstance(k, str) else k.__name__)
def test_wide_batched_conv_and_group_declared_matrices(kind):
    """Wide (orthonormal rows), a batch of matrices in a "manifold" group, and a conv kernel."""
    torch.manual_seed(0)
    wide = nn.Linear(64, 8, bias=False)  # weight 8×64: orthonormal rows
    so.constrain(wide, "weight")
    conv = nn.Conv2d(4, 8, 3, bias=False)  # 8 × (4·3·3) = 8×36: wide
    so.constrain(conv, "weight")
    stack = nn.Parameter(F.random_point(3, 40, 6))
    params = [{"params": [wide.weight, conv.weight]}, {"params": [stack], "manifold": "stiefel"}]
    opt = _make(kind, params, lr=0.1)
    x = torch.randn(16, 64)
    img = torch.randn(2, 4, 6, 6)
    target = torch.randn(3, 40, 6)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    for _ in range(40):
        loss = -(wide(x) ** 2).mean() - (conv(img) ** 2).mean() + (stack - target).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    before = max(_d(wide.weight), _d(conv.weight, ndim=4), _d(stack))
    assert opt.project_() == pytest.approx(before, rel=1e-5, abs=1e-6)
    for w, ndim in [(wide.weight, 2), (conv.weight, 4), (stack, 2)]:
        assert _d(w, ndim) < 1e-6
    key = TANGENT[type(opt).__name__]
    for w in (wide.weight, stack):
        if key in opt.state[w]:
            assert _tangent_gap(w, opt.state[w][key]) < 1e-6


@pytest.mark.parametrize("kind", [so.LandingAdam, so.RiemannianAdam, "riemannian"],
                         ids=lambda k: k if isinstance(k, str) else k.__name__)
def test_rank_deficient_matrix_raises_naming_the_parameter_and_changes_nothing(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16))
    so.constrain(model[0], "weight")
    so.constrain(model[2], "weight")
    opt = _make(kind, model.named_parameters(), lr=0.05)
    loss = model(torch.randn(4, 8)).square().mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        model[2].weight.copy_(torch.outer(torch.randn(16), torch.randn(32)))  # rank 1
        model[0].weight.mul_(1.01)  # off the manifold: would be projected
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"project_\(\): parameter '2\.weight'.*rank deficient"):
        opt.project_()
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k  # all or nothing


def test_wrapped_project_follows_remove_and_deepcopy():
    lin, loss_fn = _problem()
    opt = so.landing(torch.optim.AdamW(lin.parameters(), lr=0.1, weight_decay=0.0))
    _train(opt, loss_fn, steps=30)
    clone = copy.deepcopy(opt)
    assert clone.project_.args[0] is clone  # bound to the copy
    opt.stiefel_handle.remove()
    assert not hasattr(opt, "project_")
    with pytest.raises(AttributeError):
        opt.project_()


def test_riemannian_wrapper_without_tangent_state_leaves_the_moments():
    lin, loss_fn = _problem()
    opt = so.riemannian(torch.optim.Adam(lin.parameters(), lr=0.02), tangent_state=())
    _train(opt, loss_fn, steps=10)
    with torch.no_grad():
        lin.weight.mul_(1.01)
    m = opt.state[lin.weight]["exp_avg"].clone()
    opt.project_()
    assert torch.equal(opt.state[lin.weight]["exp_avg"], m)
    assert _d(lin.weight) < 1e-6


def test_geoopt_stiefel_parameter_with_a_landing_optimizer():
    geoopt = pytest.importorskip("geoopt")
    torch.manual_seed(0)
    w = geoopt.ManifoldParameter(F.random_point(32, 4), manifold=geoopt.Stiefel())
    opt = so.LandingAdam([w], lr=0.1)
    target = torch.randn(32, 4)
    for _ in range(10):
        loss = (w - target).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert _d(w) > 1e-4
    opt.project_()
    assert _d(w) < 1e-6
