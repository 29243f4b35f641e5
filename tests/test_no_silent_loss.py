"""Issue 14, the optimizer side: a step writes everything or nothing per matrix, a loaded state dict is
adopted or refused at load, and nothing is accepted and then ignored."""
from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch

import stiefel_opt as so
from stiefel_opt import functional as F

OPTS = [so.RiemannianSGD, so.RiemannianAdam, so.LandingSGD, so.LandingAdam]
KW = {so.RiemannianSGD: {"momentum": 0.9}, so.LandingSGD: {"momentum": 0.9}, so.RiemannianAdam: {},
      so.LandingAdam: {}}


def _problem(seed=0, n=8, p=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(F.random_point(2, n, p, dtype=dtype, generator=g))  # two matrices, one parameter
    e = torch.nn.Parameter(torch.randn(5, dtype=dtype, generator=g))
    return w, e


def _snapshot(opt, params):
    return copy.deepcopy(([p.detach().clone() for p in params], opt.state_dict()))


def _assert_same(a, b):
    (pa, sa), (pb, sb) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys()
        for key, v in sa["state"][k].items():
            assert torch.equal(v, sb["state"][k][key]) if isinstance(v, torch.Tensor) else v == sb["state"][k][key]


def _step(opt, w, e, scale=1.0):
    torch.manual_seed(1)
    w.grad = torch.randn_like(w) * scale
    e.grad = torch.randn_like(e)
    opt.step()


# --- item 2: the result is checked before anything is written -------------------------------------
@pytest.mark.parametrize("cls", OPTS)
@pytest.mark.parametrize("scale", [1e19, 1e21, 1e25, 1e300])
def test_huge_gradient_raises_with_everything_unchanged(cls, scale):
    w, e = _problem(dtype=torch.float32)
    w_group = cls([{"params": [w], "manifold": "stiefel"}, {"params": [e]}], lr=0.1, nonfinite="raise", **KW[cls])
    for _ in range(2):
        _step(w_group, w, e)
    before = _snapshot(w_group, [w, e])
    torch.manual_seed(1)
    w.grad = torch.randn_like(w) * scale
    e.grad = torch.randn_like(e)
    try:
        w_group.step()
    except FloatingPointError as err:
        assert "param group 0" in str(err)
        _assert_same(before, _snapshot(w_group, [w, e]))
        _step(w_group, w, e)  # a later ordinary step works
    assert torch.isfinite(w).all()
    assert float(F.distance(w.detach()).max()) < 0.5


@pytest.mark.parametrize("cls", OPTS)
def test_huge_gradient_skipped_keeps_matrix_and_state(cls):
    w, e = _problem(dtype=torch.float32)
    opt = cls([{"params": [w], "manifold": "stiefel"}, {"params": [e]}], lr=0.1, **KW[cls])
    for _ in range(2):
        _step(opt, w, e)
    w0 = w.detach().clone()
    st0 = {k: v.clone() for k, v in opt.state[w].items() if isinstance(v, torch.Tensor)}
    with pytest.warns(RuntimeWarning, match="parameter 0 of param group 0"):
        _step(opt, w, e, scale=1e30)
    assert torch.isfinite(w).all()
    if cls in (so.RiemannianSGD, so.LandingSGD) or torch.equal(w, w0):
        assert torch.equal(w, w0)
        for k, v in st0.items():
            assert torch.equal(opt.state[w][k], v), k
        assert opt.state[w]["nonfinite_skips"] >= 1


def test_linalg_failure_leaves_state_and_euclidean_params_untouched(monkeypatch):
    w, e = _problem()
    opt = so.RiemannianAdam([{"params": [w, e][:1], "manifold": "stiefel"}, {"params": [e]}], lr=0.1,
                            nonfinite="raise")
    _step(opt, w, e)
    before = _snapshot(opt, [w, e])

    def broken(*a, **k):
        raise torch.linalg.LinAlgError("eigh failed")

    monkeypatch.setitem(so.optim.STEP_FUNCTIONS["torch"], "riemannian_adam", broken)
    with pytest.raises(FloatingPointError, match="failed"):
        _step(opt, w, e)
    _assert_same(before, _snapshot(opt, [w, e]))


def test_nan_written_into_parameter_is_skipped_not_linalg_error():
    w, e = _problem()
    opt = so.RiemannianAdam([{"params": [w], "manifold": "stiefel"}], lr=0.1)
    with torch.no_grad():
        w[1, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="1 of 2 matrices of parameter 0"):
        _step(opt, w, e)
    assert torch.isfinite(w[0]).all() and float(F.distance(w[0].detach())) < 1e-12


@pytest.mark.parametrize("lam", [math.inf, 1e30, math.nan, 0.0, -1.0])
@pytest.mark.parametrize("cls", [so.LandingSGD, so.LandingAdam])
def test_bad_lam_rejected(cls, lam):
    w, _ = _problem()
    with pytest.raises(ValueError, match="lam"):
        cls([{"params": [w], "manifold": "stiefel"}], lam=lam)


@pytest.mark.parametrize("cls", [so.RiemannianAdam, so.LandingAdam])
def test_group_betas_validated_at_add_and_after_an_edit(cls):
    w, e = _problem()
    opt = cls([{"params": [e]}])
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        opt.add_param_group({"params": [w], "manifold": "stiefel", "betas": (0.9, 1.0)})
    opt.add_param_group({"params": [w], "manifold": "stiefel"})
    opt.param_groups[1]["betas"] = (0.9, 1.0)
    before = _snapshot(opt, [w, e])
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        _step(opt, w, e)
    _assert_same(before, _snapshot(opt, [w, e]))


@pytest.mark.parametrize("edit", [{"lam": math.inf}, {"fused": True}, {"retraction": "svd"}, {"lr": math.nan}])
def test_param_groups_edit_caught_before_anything_is_written(edit):
    w, e = _problem()
    opt = so.LandingAdam([{"params": [w, e][:1], "manifold": "stiefel"}, {"params": [e]}], lr=0.01)
    _step(opt, w, e)
    opt.param_groups[0].update(edit)
    before = _snapshot(opt, [w, e])
    with pytest.raises(ValueError):
        _step(opt, w, e)
    _assert_same(before, _snapshot(opt, [w, e]))


# --- item 3: state dicts are adopted or refused at load --------------------------------------------
def _torch_adam_resume(param_factory):
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4, dtype=torch.float64)
    w = param_factory(F.random_point(6, 4, dtype=torch.float64))
    ref = torch.optim.Adam([w, lin.weight, lin.bias], lr=0.05)
    for _ in range(3):
        w.grad, lin.weight.grad, lin.bias.grad = torch.randn_like(w), torch.randn_like(lin.weight), \
            torch.randn_like(lin.bias)
        ref.step()
    with torch.no_grad():
        w.copy_(F.project(w))
    return w, lin, ref.state_dict()


@pytest.mark.parametrize("declared", ["group", "parameter"])
def test_torch_adam_state_migrates_into_riemannian_adam_keeping_the_constraint(declared):
    if declared == "group":
        w, lin, sd = _torch_adam_resume(torch.nn.Parameter)
        opt = so.RiemannianAdam([{"params": [w], "manifold": "stiefel"}, {"params": [lin.weight, lin.bias]}],
                                lr=0.05)
        sd["param_groups"] = [{**sd["param_groups"][0], "params": [0]},
                              {**sd["param_groups"][0], "params": [1, 2]}]
    else:
        w, lin, sd = _torch_adam_resume(so.StiefelParameter)
        opt = so.RiemannianAdam([w, lin.weight, lin.bias], lr=0.05)
    opt.load_state_dict(sd)
    for _ in range(20):
        w.grad, lin.weight.grad, lin.bias.grad = torch.randn_like(w), torch.randn_like(lin.weight), \
            torch.randn_like(lin.bias)
        opt.step()
    assert float(F.distance(w.detach())) < 1e-10
    if declared == "group":
        assert opt.param_groups[0]["manifold"] is not None


def test_torch_adam_migration_is_bit_identical_on_euclidean_params():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(a.detach().clone())
    ref = torch.optim.Adam([a], lr=0.01)
    for _ in range(3):
        a.grad = torch.randn_like(a)
        ref.step()
    b.data.copy_(a.data)
    ours = so.RiemannianAdam([b], lr=0.01)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))  # as from disk: torch aliases loaded tensors
    for _ in range(5):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
        ref.step()
        ours.step()
    assert torch.equal(a, b)


@pytest.mark.parametrize("src,dst", [(so.RiemannianSGD, so.RiemannianAdam), (so.RiemannianAdam, so.LandingSGD),
                                     (torch.optim.SGD, so.LandingAdam)])
def test_foreign_optimizer_state_refused_at_load_with_nothing_loaded(src, dst):
    w, e = _problem()
    groups = [{"params": [w], "manifold": "stiefel"} if src.__module__.startswith("stiefel_opt") else
              {"params": [w]}, {"params": [e]}]
    a = src(groups, lr=0.1, momentum=0.9) if "SGD" in src.__name__ else src(groups, lr=0.1)
    w.grad, e.grad = torch.randn_like(w), torch.randn_like(e)
    a.step()
    b = dst([{"params": [w], "manifold": "stiefel"}, {"params": [e]}], lr=0.1, **KW.get(dst, {}))
    sd = a.state_dict()
    before = b.state_dict()
    with pytest.raises(ValueError, match="parameter 0 of param group 0"):
        b.load_state_dict(sd)
    assert b.state_dict() == before


def test_riemannian_adam_state_into_landing_adam_takes_lam_from_the_current_group():
    w, e = _problem()
    a = so.RiemannianAdam([{"params": [w], "manifold": "stiefel"}], lr=0.01)
    _step(a, w, e)
    b = so.LandingAdam([{"params": [w], "manifold": "stiefel"}], lr=0.01, lam=0.5)
    b.load_state_dict(a.state_dict())
    assert b.param_groups[0]["lam"] == 0.5
    _step(b, w, e)


@pytest.mark.parametrize("bad", [{"fused": True}, {"differentiable": True}, {"capturable": True},
                                 {"retraction": "svd"}, {"lam": math.inf}, {"betas": (0.9, 1.0)},
                                 {"manifold": None}])
def test_loaded_group_is_validated(bad):
    w, e = _problem()
    opt = so.LandingAdam([{"params": [w], "manifold": "stiefel"}], lr=0.01)
    _step(opt, w, e)
    sd = opt.state_dict()
    sd["param_groups"][0].update(bad)
    with pytest.raises(ValueError, match="param group 0"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("corrupt", ["nan_exp_avg", "negative_exp_avg_sq"])
def test_corrupted_moments_refused_at_load(corrupt):
    w, e = _problem()
    opt = so.RiemannianAdam([{"params": [w], "manifold": "stiefel"}], lr=0.01)
    _step(opt, w, e)
    sd = opt.state_dict()
    st = sd["state"][0]
    if corrupt == "nan_exp_avg":
        st["exp_avg"] = st["exp_avg"].clone().fill_(float("nan"))
    else:
        st["exp_avg_sq"] = -st["exp_avg_sq"].clone() - 1
    with pytest.raises(ValueError, match="corrupt"):
        opt.load_state_dict(sd)


def test_state_dict_loads_weights_only_and_resumes_bit_identically():
    w, e = _problem()
    opt = so.LandingAdam([{"params": [w], "manifold": "stiefel"}, {"params": [e]}], lr=0.01)
    _step(opt, w, e)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    w2, e2 = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(e.detach().clone())
    opt2 = so.LandingAdam([{"params": [w2], "manifold": "stiefel"}, {"params": [e2]}], lr=0.01)
    opt2.load_state_dict(sd)
    _step(opt, w, e)
    _step(opt2, w2, e2)
    assert torch.equal(w, w2) and torch.equal(e, e2)


# --- item 8: torch's hooks see and act on what they should ------------------------------------------
def test_load_pre_hook_can_repair_a_dict_before_the_package_checks_it():
    w, e = _problem()
    opt = so.RiemannianAdam([{"params": [w], "manifold": "stiefel"}], lr=0.01)
    _step(opt, w, e)
    sd = opt.state_dict()
    good = sd["state"][0]["exp_avg"]
    sd["state"][0]["exp_avg"] = good.reshape(-1)  # a wrong layout that a user's hook repairs

    def repair(_, d):
        d["state"][0]["exp_avg"] = d["state"][0]["exp_avg"].reshape(good.shape)
        return d

    opt.register_load_state_dict_pre_hook(repair)
    opt.load_state_dict(sd)
    assert torch.equal(opt.state[w]["exp_avg"], good)


def test_state_dict_post_hook_sees_a_plain_manifold_spec():
    w, _ = _problem()
    opt = so.RiemannianSGD([{"params": [w], "manifold": "stiefel"}], lr=0.01)
    seen = []
    opt.register_state_dict_post_hook(lambda _, sd: seen.append(sd["param_groups"][0]["manifold"]))
    opt.state_dict()
    assert isinstance(seen[0], dict) and seen[0]["manifold"] == "stiefel"


def test_sgd_without_momentum_keeps_no_state_entry_like_torch():
    w, e = _problem()
    opt = so.RiemannianSGD([{"params": [w], "manifold": "stiefel"}, {"params": [e]}], lr=0.01)
    ref = torch.optim.SGD([torch.nn.Parameter(e.detach().clone())], lr=0.01)
    _step(opt, w, e)
    ref.param_groups[0]["params"][0].grad = e.grad.clone()
    ref.step()
    assert len(opt.state) == len(ref.state) == 0


# --- item 5: landing from outside the region where it can move ---------------------------------------
@pytest.mark.parametrize("cls", [so.LandingSGD, so.LandingAdam])
def test_landing_from_far_outside_projects_with_a_warning(cls):
    w, e = _problem()
    with torch.no_grad():
        w.mul_(5.0)  # ‖XᵀX − I‖_F ≈ 42: the safe step is exactly 0 there
    assert float(F.distance(w.detach()).min()) > 1
    opt = cls([{"params": [w], "manifold": "stiefel"}], lr=0.01)
    with pytest.warns(RuntimeWarning, match="outside the landing region"):
        _step(opt, w, e)
    assert float(F.distance(w.detach()).max()) < 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(opt, w, e)


# --- clear errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", OPTS)
def test_zero_size_stiefel_parameter_rejected(cls):
    with pytest.raises(ValueError, match="no entries"):
        cls([{"params": [torch.nn.Parameter(torch.zeros(0, 3))], "manifold": "stiefel"}])


@pytest.mark.parametrize("cls", [so.RiemannianAdam, so.RiemannianSGD])
def test_resized_parameter_does_not_reuse_reshaped_moments(cls):
    w = torch.nn.Parameter(F.random_point(8, 4, dtype=torch.float64))
    opt = cls([{"params": [w], "manifold": "stiefel"}], lr=0.01, **KW[cls])
    w.grad = torch.randn_like(w)
    opt.step()
    w.data = F.random_point(4, 8, dtype=torch.float64)  # same numel, the wide form of the same matrix shape
    w.grad = torch.randn_like(w)
    with pytest.raises(ValueError, match="resized"):
        opt.step()


@pytest.mark.parametrize("lam", [math.inf, 1e30, math.nan, 0.0])
def test_landing_wrapper_rejects_bad_lam_like_the_optimizers(lam):
    w, _ = _problem()
    with pytest.raises(ValueError, match="lam"):
        so.landing(torch.optim.AdamW([{"params": [w], "manifold": "stiefel", "weight_decay": 0.0}]), lam=lam)


@pytest.mark.parametrize("cls,key", [(c, k) for c in OPTS for k in
                                     (("momentum_buffer",) if "SGD" in c.__name__ else ("exp_avg", "exp_avg_sq"))])
def test_state_corrupted_in_memory_shows_in_the_result_and_is_skipped(cls, key):
    """A NaN/inf written into a moment between steps (not through load_state_dict) never reaches the
    parameter: the matrix is skipped with its state restored, the other matrix steps."""
    w, e = _problem()
    opt = cls([{"params": [w], "manifold": "stiefel"}], lr=0.05, **KW[cls])
    _step(opt, w, e)
    with torch.no_grad():
        opt.state[w][key][1].fill_(float("inf"))
    w0 = w.detach().clone()
    with pytest.warns(RuntimeWarning, match="1 of 2 matrices of parameter 0"):
        _step(opt, w, e)
    assert torch.equal(w[1], w0[1]) and not torch.equal(w[0], w0[0])
    assert torch.isfinite(w).all()


def test_stabilize_edit_caught_before_anything_is_written():
    w, e = _problem()
    opt = so.RiemannianAdam([{"params": [w], "manifold": "stiefel"}, {"params": [e]}], lr=0.01, stabilize=2)
    _step(opt, w, e)
    opt.param_groups[0]["stabilize"] = 0
    before = _snapshot(opt, [w, e])
    with pytest.raises(ValueError, match="stabilize"):
        _step(opt, w, e)
    _assert_same(before, _snapshot(opt, [w, e]))


@pytest.mark.parametrize("spec", [{"manifold": "stiefel", "metric": "euclidean", "bogus": 1},
                                  {"manifold": "sphere"}, {"manifold": "stiefel", "metric": "hyperbolic"}])
def test_malformed_saved_manifold_spec_refused_naming_the_group(spec):
    w, e = _problem()
    opt = so.RiemannianAdam([{"params": [w], "manifold": "stiefel"}], lr=0.01)
    _step(opt, w, e)
    sd = opt.state_dict()
    sd["param_groups"][0]["manifold"] = spec
    before = opt.state_dict()
    with pytest.raises(ValueError, match="param group 0 has manifold"):
        opt.load_state_dict(sd)
    assert opt.state_dict() == before
