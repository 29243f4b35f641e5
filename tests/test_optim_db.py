"""torch's own optimizer inputs (``optim_db``) against the package's twins, on Euclidean parameters.

The single home of the Euclidean parity tests: every CPU kwargs combination that
``torch.testing._internal.common_optimizers.optim_db`` yields for SGD, Adam and AdamW (with torch's
global flags differentiable / fused, plus foreach=True, which torch's helper leaves out on CPU),
float32 and float64, must give bit-identical trajectories (params after every step, optimizer state,
param-group hyperparameters) with the twin:

- ``torch.optim.SGD``   ↔ RiemannianSGD, LandingSGD
- ``torch.optim.Adam``  ↔ RiemannianAdam, LandingAdam
- ``torch.optim.AdamW`` ↔ RiemannianAdam / LandingAdam with ``decoupled_weight_decay=True`` (and
  AdamW's default ``weight_decay=1e-2``),

with and without a Stiefel parameter in another param group (built with the package's defaults, it
must not change the Euclidean trajectory). torch's error inputs raise the same exception type and
match torch's regex; a state_dict of the twin loads into ours and continues bit-identically (torch
Adam → RiemannianAdam is a natural migration), and so does ours into a fresh one of ours.

Manifold-only behaviour (flags rejected on Stiefel groups, geoopt parity) is in test_optim_parity.py.
"""
import copy
import inspect
import itertools
import warnings

import pytest
import torch

import expecttest  # noqa: E402,F401  (the test extra installs it; torch.testing._internal needs it)
from torch.testing._internal.common_optimizers import (  # noqa: E402
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

import stiefel_opt.functional as F  # noqa: E402
from stiefel_opt import LandingAdam, LandingSGD, RiemannianAdam, RiemannianSGD, StiefelParameter  # noqa: E402

DTYPES = (torch.float32, torch.float64)
STEPS = 3
SHAPES = [(4, 3), (4,), (), (2, 2, 3)]  # a matrix, a bias, a 0-d scalar, a 3-d tensor
LATE = 3  # index of the parameter that has no gradient on the first step (lazy state init)


def _adamw_twin(cls):
    """Our class configured as AdamW: decoupled weight decay with AdamW's default weight_decay."""

    def make(params, **kw):
        kw.setdefault("weight_decay", 1e-2)
        return cls(params, decoupled_weight_decay=True, **kw)

    make.__name__ = f"{cls.__name__}(decoupled)"
    make.cls = cls
    return make


TWINS = {
    "SGD": (torch.optim.SGD, [RiemannianSGD, LandingSGD]),
    "Adam": (torch.optim.Adam, [RiemannianAdam, LandingAdam]),
    "AdamW": (torch.optim.AdamW, [_adamw_twin(RiemannianAdam), _adamw_twin(LandingAdam)]),
}
INFOS = {info.optim_cls.__name__: info for info in optim_db if info.optim_cls.__name__ in TWINS}
assert set(INFOS) == set(TWINS), INFOS


def _name(make):
    return make.__name__


def _db_kwargs(name, dtype):
    """torch's inputs with its global flags, plus foreach=True (a valid CPU flag that
    ``_get_optim_inputs_including_global_cliquey_kwargs`` only adds where foreach kernels exist)."""
    info = INFOS[name]
    out = []
    for oi in _get_optim_inputs_including_global_cliquey_kwargs("cpu", dtype, info):
        out.append((oi.desc, oi.kwargs))
    for oi in info.optim_inputs_func("cpu", dtype):
        out.append((f"{oi.desc} & foreach", {**oi.kwargs, "foreach": True}))
    return out


def _kw_id(kw):
    return ",".join(f"{k}={float(v) if torch.is_tensor(v) else v}" for k, v in kw.items()) or "-"


# Product grids beyond optim_db (combinations it does not reach: nesterov without weight decay,
# maximize × amsgrad, foreach × everything, decoupled decay on Adam); float32, with a Stiefel group.
SGD_GRID = [dict(lr=0.1, momentum=m, nesterov=n, dampening=d, weight_decay=w, maximize=x, foreach=f)
            for m, n, d, w, x, f in itertools.product((0.0, 0.9), (False, True), (0.0, 0.3), (0.0, 0.1),
                                                      (False, True), (False, True))
            if not (n and (m == 0 or d != 0))]
ADAM_GRID = [dict(lr=0.01, amsgrad=a, weight_decay=w, maximize=x, foreach=f, decoupled_weight_decay=d)
             for a, w, x, f, d in itertools.product((False, True), (0.0, 0.1), (False, True), (False, True),
                                                    (False, True))]


def _cases():
    cases = []
    for name, (_, ours) in TWINS.items():
        for dtype in DTYPES:
            for desc, kw in _db_kwargs(name, dtype):
                for make in ours:
                    for stiefel in (False, True):
                        cid = f"{name}-{desc}-{_kw_id(kw)}-{str(dtype)[6:]}-{_name(make)}-{'stiefel' if stiefel else 'eucl'}"
                        cases.append(pytest.param(name, make, kw, dtype, stiefel, id=cid))
    for name, grid in (("SGD", SGD_GRID), ("Adam", ADAM_GRID)):
        for kw in grid:
            for make in TWINS[name][1]:
                cid = f"{name}-grid-{_kw_id(kw)}-float32-{_name(make)}-stiefel"
                cases.append(pytest.param(name, make, kw, torch.float32, True, id=cid))
    return cases


def _defaults(make):
    cls = getattr(make, "cls", make)
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _leaves(dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]


def _grads(step, dtype, late=True):
    g = torch.Generator().manual_seed(100 + step)
    gs = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    if late and step == 0:
        gs[LATE] = None
    return gs


def _params(values, differentiable):
    """Parameters holding ``values``. With differentiable=True: non-leaf tensors (torch allows those
    then, and the step is part of the graph) cloned from leaves that require grad."""
    if differentiable:
        leaves = [v.clone().requires_grad_() for v in values]
        return leaves, [v.clone() for v in leaves]
    ps = [torch.nn.Parameter(v.clone()) for v in values]
    return ps, ps


def _stiefel_group(make, kw, dtype):
    """A Stiefel parameter in its own group, with the package's defaults for every key the
    Euclidean group sets (fused/differentiable would be rejected on it)."""
    d = _defaults(make)
    x = StiefelParameter(F.random_point(6, 3, generator=torch.Generator().manual_seed(7), dtype=dtype))
    return {"params": [x], **{k: d[k] for k in kw if k in d}}


def _set_grads(ps, grads, stiefel_group=None, step=0):
    for p, gr in zip(ps, grads):
        p.grad = None if gr is None else gr.clone()
    if stiefel_group is not None:
        x = stiefel_group["params"][0]
        x.grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(200 + step), dtype=x.dtype)


def _run(opt, ps, dtype, steps, start=0, stiefel_group=None, late=True):
    traj = []
    for i in range(start, start + steps):
        _set_grads(ps, _grads(i, dtype, late), stiefel_group, i)
        opt.step()
        traj.append([p.detach().clone() for p in ps])
    return traj


def _same(a, b, what):
    if torch.is_tensor(a) or torch.is_tensor(b):
        assert torch.is_tensor(a) and torch.is_tensor(b), f"{what}: {type(a)} vs {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, \
            f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert a.requires_grad == b.requires_grad, f"{what}: requires_grad {a.requires_grad} vs {b.requires_grad}"
        assert a.layout == b.layout, f"{what}: layout {a.layout} vs {b.layout}"
        if a.is_sparse:
            a, b = a.coalesce().to_dense(), b.coalesce().to_dense()
        assert torch.equal(a.detach(), b.detach()), f"{what}: max |diff| {(a.detach() - b.detach()).abs().max()}"
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b), f"{what}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{what}[{i}]")
    else:
        assert a == b and type(a) is type(b), f"{what}: {a!r} vs {b!r}"


def _assert_same_optimizer(ref, ref_ps, ours, ps):
    for i, (rp, p) in enumerate(zip(ref_ps, ps)):
        assert (rp in ref.state) == (p in ours.state), f"param {i}: state entry present in one only"
        rs, s = ref.state.get(rp, {}), ours.state.get(p, {})
        assert set(rs) == set(s), f"param {i}: state keys {sorted(rs)} vs {sorted(s)}"
        for k in rs:
            _same(rs[k], s[k], f"param {i} state[{k!r}]")
    rg, g = ref.param_groups[0], ours.param_groups[0]
    for k in rg:
        if k != "params":
            assert k in g, f"param group lacks {k!r}"
            _same(rg[k], g[k], f"param_groups[0][{k!r}]")


def _outcome(fn):
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - compared with the twin's
        return None, e


def _assert_same_error(e_ref, e_ours):
    assert e_ref is None or e_ours is not None, f"torch raised {e_ref!r}, ours did not"
    assert e_ours is None or e_ref is not None, f"ours raised {e_ours!r}, torch did not"
    if e_ref is not None:
        assert type(e_ours) is type(e_ref) and str(e_ours) == str(e_ref), f"{e_ours!r} vs torch's {e_ref!r}"


@pytest.mark.parametrize("name,make,kw,dtype,stiefel", _cases())
def test_trajectory_bit_identical(name, make, kw, dtype, stiefel):
    """Params after every step, state and group hyperparameters equal torch's, bit for bit. One
    parameter first gets a gradient on step 2; where torch itself then raises (fused SGD with
    momentum: a None momentum buffer next to existing ones), ours must raise the same, and the
    trajectories are compared again with every gradient present from the first step."""
    if not _trajectory(name, make, kw, dtype, stiefel, late=True):
        _trajectory(name, make, kw, dtype, stiefel, late=False)


def _trajectory(name, make, kw, dtype, stiefel, late):
    """Compare one trajectory; False when both raised during the steps."""
    twin = TWINS[name][0]
    differentiable = bool(kw.get("differentiable"))
    values = _leaves(dtype)

    ref_leaves, ref_ps = _params(values, differentiable)
    ref, e_ref = _outcome(lambda: twin([{"params": ref_ps}], **copy.deepcopy(kw)))
    leaves, ps = _params(values, differentiable)
    sg = _stiefel_group(make, kw, dtype) if stiefel else None
    x0 = sg["params"][0].detach().clone() if stiefel else None
    ours, e_ours = _outcome(lambda: make([{"params": ps}] + ([sg] if sg else []), **copy.deepcopy(kw)))
    _assert_same_error(e_ref, e_ours)
    if e_ref is not None:
        return True

    ref_traj, e_ref = _outcome(lambda: _run(ref, ref_ps, dtype, STEPS, late=late))
    traj, e_ours = _outcome(lambda: _run(ours, ps, dtype, STEPS, stiefel_group=sg, late=late))
    _assert_same_error(e_ref, e_ours)
    if e_ref is not None:
        assert late, f"torch raised {e_ref!r} with every gradient present"
        return False
    for t, (a, b) in enumerate(zip(ref_traj, traj)):
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"step {t} param {i}")
    _assert_same_optimizer(ref, ref_ps, ours, ps)
    if stiefel:  # the Stiefel group was stepped too (and stayed feasible)
        x = sg["params"][0].detach()
        assert not torch.equal(x, x0), "the Stiefel parameter did not move"
        tol = 0.5 if "Landing" in _name(make) else (1e-4 if dtype == torch.float32 else 1e-10)
        assert float(F.distance(x)) < tol
    if differentiable:  # the steps are differentiable the same way (torch's amsgrad raises: so must ours)
        g_ref, e_ref = _outcome(lambda: torch.autograd.grad(sum((p * p).sum() for p in ref_ps), ref_leaves))
        g_ours, e_ours = _outcome(lambda: torch.autograd.grad(sum((p * p).sum() for p in ps), leaves))
        _assert_same_error(e_ref, e_ours)
        for i, (a, b) in enumerate(zip(g_ref or (), g_ours or ())):
            _same(a, b, f"d(sum p²)/d(initial param {i})")
    return True


def _resume_cases():
    cases = []
    for name, (_, ours) in TWINS.items():
        for dtype in DTYPES:
            for desc, kw in _db_kwargs(name, dtype):
                if kw.get("differentiable"):
                    continue  # non-leaf state tensors: not a checkpoint
                for make in ours:
                    cid = f"{name}-{desc}-{_kw_id(kw)}-{str(dtype)[6:]}-{_name(make)}"
                    cases.append(pytest.param(name, make, kw, dtype, id=cid))
    return cases


@pytest.mark.parametrize("name,make,kw,dtype", _resume_cases())
def test_state_dict_from_twin_and_from_ours(name, make, kw, dtype):
    """torch's state_dict (after 2 steps) loads into ours, which continues bit-identically with the
    twin; ours then round-trips into a fresh optimizer of ours, which continues the same way."""
    twin = TWINS[name][0]
    # fused SGD with momentum raises when a parameter's first gradient comes late (see above)
    late = not (name == "SGD" and kw.get("fused") and kw.get("momentum"))
    ref_ps = [torch.nn.Parameter(v) for v in _leaves(dtype)]
    ref = twin(ref_ps, **copy.deepcopy(kw))
    _run(ref, ref_ps, dtype, 2, late=late)

    ps = [torch.nn.Parameter(p.detach().clone()) for p in ref_ps]
    ours = make(ps, **copy.deepcopy(kw))
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    _assert_same_optimizer(ref, ref_ps, ours, ps)

    for t, (a, b) in enumerate(zip(_run(ref, ref_ps, dtype, 2, start=2), _run(ours, ps, dtype, 2, start=2))):
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"after load, step {t} param {i}")
    _assert_same_optimizer(ref, ref_ps, ours, ps)

    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours2 = make(ps2, **copy.deepcopy(kw))
    ours2.load_state_dict(copy.deepcopy(ours.state_dict()))
    for t, (a, b) in enumerate(zip(_run(ref, ref_ps, dtype, 1, start=4), _run(ours2, ps2, dtype, 1, start=4))):
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"after our round trip, step {t} param {i}")
    _assert_same_optimizer(ref, ref_ps, ours2, ps2)


# The package's own group options, set to non-default values: a group loaded from torch's state_dict
# keeps them (issue 14 item 3: "a loaded group keeps (or restores from the current groups) the
# package's keys").
OWN_OPTIONS = {RiemannianSGD: dict(nonfinite="raise", retraction="qr", backend="torch"),
               LandingSGD: dict(nonfinite="raise", lam=2.0, safe_eps=0.25, backend="torch"),
               RiemannianAdam: dict(nonfinite="raise", retraction="qr", second_moment="scalar", backend="torch"),
               LandingAdam: dict(nonfinite="raise", lam=2.0, safe_eps=0.25, second_moment="scalar",
                                 backend="torch")}


@pytest.mark.parametrize("name,make", [pytest.param(n, m, id=f"{n}-{_name(m)}")
                                       for n, (_, ours) in TWINS.items() for m in ours])
def test_group_loaded_from_twin_keeps_package_options(name, make):
    cls = getattr(make, "cls", make)
    ref_ps = [torch.nn.Parameter(v) for v in _leaves(torch.float64)]
    ref = TWINS[name][0](ref_ps, lr=0.01)
    _run(ref, ref_ps, torch.float64, 2)
    ps = [torch.nn.Parameter(p.detach().clone()) for p in ref_ps]
    ours = make(ps, lr=0.01, **OWN_OPTIONS[cls])
    expected = {k: v for k, v in ours.param_groups[0].items() if k != "params"}
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    group = ours.param_groups[0]
    missing = sorted(set(expected) - set(group))
    assert not missing, f"the group loaded from torch's state_dict lacks the package's keys {missing}"
    for k in OWN_OPTIONS[cls]:
        assert group[k] == expected[k], f"{k}: {group[k]!r}, was {expected[k]!r}"
    # and the optimizer still steps a Stiefel parameter in a group added afterwards
    x = StiefelParameter(F.random_point(6, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    ours.add_param_group({"params": [x]})
    x.grad = torch.ones_like(x)
    _run(ours, ps, torch.float64, 1, start=2)
    assert float(F.distance(x.detach())) < 0.5


def _error_cases():
    cases = []
    for name, (_, ours) in TWINS.items():
        for j, ei in enumerate(INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)):
            for make in ours:
                cid = f"{name}-{j}-{ei.error_type.__name__}-{ei.optimizer_error_input.desc}-{_name(make)}"
                cases.append(pytest.param(name, make, ei, id=cid))
    return cases


@pytest.mark.parametrize("name,make,ei", _error_cases())
def test_error_inputs(name, make, ei):
    """As torch's test_errors: the same exception (or warning) type matching torch's regex; and the
    same message as the twin's."""
    oi = ei.optimizer_error_input

    def build(cls):
        return cls(copy.copy(oi.params), **copy.deepcopy(oi.kwargs))

    if ei.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        action, twin_action = (lambda: build(make)), (lambda: build(TWINS[name][0]))
    else:
        ours, ref = build(make), build(TWINS[name][0])
        action, twin_action = ours.step, ref.step
    if issubclass(ei.error_type, Warning):
        with pytest.warns(ei.error_type, match=ei.error_regex):
            action()
        return
    with pytest.raises(ei.error_type, match=ei.error_regex) as info:
        action()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, e_ref = _outcome(twin_action)
    assert type(e_ref) is type(info.value) and str(info.value) == str(e_ref), f"{info.value!r} vs {e_ref!r}"


# Constructor errors torch raises that optim_db's error inputs do not list: the same type and message.
EXTRA_ERRORS = {
    "SGD": [dict(lr=-1.0), dict(weight_decay=-1.0), dict(nesterov=True), dict(momentum=0.9, nesterov=True, dampening=0.1),
            dict(fused=True, foreach=True), dict(fused=True, differentiable=True)],
    "Adam": [dict(lr=-1.0), dict(eps=-1.0), dict(betas=(0.9, 1.0)), dict(fused=True, foreach=True),
             dict(fused=True, differentiable=True)],
}
EXTRA_ERRORS["AdamW"] = EXTRA_ERRORS["Adam"]


@pytest.mark.parametrize("name,make,kw", [pytest.param(n, m, kw, id=f"{n}-{_kw_id(kw)}-{_name(m)}")
                                          for n, (_, ours) in TWINS.items() for m in ours
                                          for kw in EXTRA_ERRORS[n]])
def test_extra_constructor_errors(name, make, kw):
    ps = [torch.nn.Parameter(torch.zeros(3))]
    _, e_ref = _outcome(lambda: TWINS[name][0](ps, **kw))
    assert e_ref is not None
    _, e_ours = _outcome(lambda: make(ps, **kw))
    _assert_same_error(e_ref, e_ours)


FLAGS = [dict(), dict(foreach=True), dict(fused=True)]


@pytest.mark.parametrize("name,make,flags", [pytest.param(n, m, f, id=f"{n}-{_kw_id(f)}-{_name(m)}")
                                             for n, (_, ours) in TWINS.items() for m in ours for f in FLAGS])
def test_complex_and_sparse_gradients(name, make, flags):
    """A complex parameter (Adam views it as real) and a sparse gradient (SGD supports it, Adam
    raises): the same outcome as the twin, bit for bit."""
    kw = dict(flags, lr=0.01, **({"momentum": 0.9} if name == "SGD" else {}))
    for kind in ("complex", "sparse"):
        outs = []
        for cls in (TWINS[name][0], make):
            g = torch.Generator().manual_seed(0)
            if kind == "complex":
                p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64, generator=g))
            else:
                p = torch.nn.Parameter(torch.randn(6, 3, generator=g))
            opt, e = _outcome(lambda: cls([p], **copy.deepcopy(kw)))
            if e is None:
                def steps():
                    for i in range(STEPS):
                        gg = torch.Generator().manual_seed(10 + i)
                        if kind == "complex":
                            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gg)
                        else:
                            idx = torch.tensor([[i % 6, (i + 2) % 6]])
                            p.grad = torch.sparse_coo_tensor(idx, torch.randn(2, 3, generator=gg), p.shape,
                                                             check_invariants=True)
                        opt.step()
                _, e = _outcome(steps)
            outs.append((p.detach().clone(), None if e is not None else opt.state.get(p, {}), e))
        (rp, rs, re), (op, os_, oe) = outs
        _assert_same_error(re, oe)
        _same(rp, op, f"{kind} parameter")
        if rs is not None:
            assert set(rs) == set(os_), f"{kind}: state keys {sorted(rs)} vs {sorted(os_)}"
            for k in rs:
                _same(rs[k], os_[k], f"{kind} state[{k!r}]")
