"""The batching engine (optim/_engine.py): buckets through a geometry's matrix layout, the one rule
for reusing stacked state, and the step registry."""
import pytest
import torch

import stiefel_opt as so
from stiefel_opt import functional as F
from stiefel_opt.optim import STEP_FUNCTIONS, register_step
from stiefel_opt.optim._engine import PLAIN, Bucket


@pytest.mark.parametrize("geometry,shapes", [
    (so.Stiefel(), [(5, 3), (2, 5, 3)]),
    (so.Stiefel(ndim=4), [(4, 2, 3, 3), (4, 2, 3, 3)]),
    (so.Oblique(), [(5, 3), (2, 5, 3)]),
])
def test_stack_and_unstack_are_inverse_through_the_geometry(geometry, shapes):
    ts = [torch.randn(s) for s in shapes]
    mshape = tuple(geometry.matrix_shape(shapes[0])[-2:])
    b = Bucket(geometry, mshape, torch.float32)
    for t in ts:
        b.add(t, t, t, {}, "p")
    stack = b.stack(ts)
    assert stack.shape == (b.size, *mshape)
    assert torch.equal(stack, torch.cat([geometry.to_matrix(t).reshape(-1, *mshape) for t in ts]))
    out = [torch.empty_like(t) for t in ts]
    b.unstack_into(out, stack)
    assert all(torch.equal(a, t) for a, t in zip(out, ts))


class _StoredTransposed(so.Stiefel):
    """Square points whose matrix is their transpose: to_matrix keeps the shape but is not the identity."""

    def to_matrix(self, x):
        return x.mT

    def from_matrix(self, m, shape):
        return m.mT.reshape(shape)


@pytest.mark.parametrize("geometry,whole", [(so.Stiefel(), True), (_StoredTransposed(), False), (so.Oblique(), False)])
def test_a_bucket_stacks_parameters_as_they_are_only_when_the_layout_gives_them_back(geometry, whole):
    """Same-shape 2-D parameters: a whole bucket stacks them as they are; a layout that maps a matrix
    to another tensor of the same shape (here its transpose) still goes through to_matrix/from_matrix."""
    ts = [torch.randn(4, 4) for _ in range(3)]
    b = Bucket(geometry, tuple(geometry.matrix_shape((4, 4))[-2:]), torch.float32)
    for t in ts:
        b.add(t, t, t, {}, "p")
    assert b.whole is whole
    stack = b.stack(ts)
    assert torch.equal(stack, torch.cat([geometry.to_matrix(t).reshape(-1, *b.mshape) for t in ts]))
    out = [torch.empty_like(t) for t in ts]
    b.unstack_into(out, stack)
    assert all(torch.equal(a, t) for a, t in zip(out, ts))


@pytest.mark.parametrize("geometry", [so.Stiefel(), so.Oblique()])
def test_assigned_state_is_a_view_reused_until_an_entry_is_replaced(geometry):
    ts = [torch.randn(6, 3), torch.randn(6, 3)]
    b = Bucket(geometry, tuple(geometry.matrix_shape((6, 3))[-2:]), torch.float32)
    for t in ts:
        b.add(t, t, t, {}, "p")
    buf = b.stack(ts)
    b.assign("m", buf)
    assert all(torch.equal(s["m"], t) for s, t in zip(b.states, ts))  # the parameter's layout
    assert b.stacked("m") is buf and b.viewed("m", buf)  # views in order: no copy
    b.states[1]["m"] = b.states[1]["m"].clone()  # e.g. load_state_dict replaced an entry
    again = b.stacked("m")
    assert again is not buf and torch.equal(again, buf)
    b.states[0]["m"] = torch.zeros(3, 6)
    with pytest.raises(ValueError, match="resized"):
        b.stacked("m")


def test_entries_of_their_own_shape_stack_and_are_reused_through_the_plain_layout():
    ts = [torch.randn(6, 3), torch.randn(6, 3)]
    b = Bucket(PLAIN, (6, 3), torch.float32)
    for t in ts:
        b.add(t, t, t, {"v": torch.randn(3, 3), "rho": torch.randn(())}, "p")
    assert torch.equal(b.stack(ts), torch.stack(ts))  # a plain matrix is its own matrix
    v, rho = b.stacked("v", shape=(3, 3)), b.stacked("rho", shape=())
    assert v.shape == (2, 3, 3) and rho.shape == (2,)
    assert all(torch.equal(v[i], s["v"]) and torch.equal(rho[i], s["rho"]) for i, s in enumerate(b.states))
    b.assign("v", v, shape=(3, 3))
    b.assign("rho", rho, shape=())
    assert [tuple(s["v"].shape) for s in b.states] == [(3, 3)] * 2 and b.states[1]["rho"].shape == ()
    assert b.stacked("v", shape=(3, 3)) is v and b.stacked("rho", shape=()) is rho  # views: reused
    with pytest.raises(ValueError, match="resized"):
        b.stacked("v", shape=(6, 3))


def test_register_step_dispatches_a_new_step_and_refuses_duplicates():
    calls = []

    def doubled_lr_update(x, g, buf, **kw):
        calls.append(kw["lr"])
        return F.riemannian_sgd_update(x, g, buf, **{**kw, "lr": 2 * kw["lr"]})

    register_step("test_doubled_lr_sgd", doubled_lr_update)
    try:
        class Doubled(so.RiemannianSGD):
            _STEP = "test_doubled_lr_sgd"

        x0 = so.Stiefel().random(7, 2)
        a, b = torch.nn.Parameter(x0.clone()), torch.nn.Parameter(x0.clone())
        g = torch.randn(7, 2)
        a.grad, b.grad = g.clone(), g.clone()
        Doubled([{"params": [a], "manifold": "stiefel"}], lr=0.05).step()
        so.RiemannianSGD([{"params": [b], "manifold": "stiefel"}], lr=0.1).step()
        assert calls == [0.05] and torch.equal(a, b)
        with pytest.raises(ValueError, match="already registered"):
            register_step("test_doubled_lr_sgd", doubled_lr_update)
        with pytest.raises(ValueError, match="backend"):
            register_step("x", doubled_lr_update, backend="cuda")
        with pytest.raises(TypeError, match="callable"):
            register_step("y", 3)
    finally:
        del STEP_FUNCTIONS["torch"]["test_doubled_lr_sgd"]


@pytest.mark.parametrize("cls,extra", [(so.RiemannianSGD, {"stabilize": 3}), (so.RiemannianAdam, {"second_moment": "scalar"}),
                                       (so.LandingSGD, {"lam": 0.5}), (so.LandingAdam, {"safe_eps": 0.4})])
def test_optimizers_own_full_defaults_and_groups_take_them(cls, extra):
    """defaults hold the twin's keys and the package's; a group added later gets both from them."""
    x = torch.nn.Parameter(so.Stiefel().random(5, 2))
    w = torch.nn.Parameter(torch.randn(3))
    opt = cls([x], lr=0.1, backend="torch", **extra)
    twin = (torch.optim.SGD if "SGD" in cls.__name__ else torch.optim.Adam)([w], lr=0.1)
    assert set(twin.defaults) < set(opt.defaults)
    for k, v in {"backend": "torch", "nonfinite": "skip", **extra}.items():
        assert opt.defaults[k] == v
    opt.add_param_group({"params": [w]})
    assert {k: opt.param_groups[1][k] for k in opt.defaults} == {**opt.defaults, "manifold": None}


def test_a_missing_state_entry_reinitializes_whatever_the_order_of_the_entries():
    """stacked(): when an entry is missing the stack is re-initialized, before any shape is checked
    (so a mis-shaped entry next to a missing one does not raise, whichever comes first)."""
    ts = [torch.randn(6, 3), torch.randn(6, 3)]
    for states in ([{"m": torch.zeros(2, 2)}, {}], [{}, {"m": torch.zeros(2, 2)}]):
        b = Bucket(so.Stiefel(), (6, 3), torch.float32)
        for t, s in zip(ts, states):
            b.add(t, t, t, s, "p")
        assert b.stacked("m", init=lambda: "fresh") == "fresh"


class _Tagged(so.Stiefel):
    """A Stiefel manifold with one more option, recorded in its spec."""

    def __init__(self, tag: int = 0, **kw):
        super().__init__(**kw)
        self.tag = tag

    def spec(self) -> dict:
        return {**super().spec(), "tag": self.tag}


@pytest.mark.parametrize("make", [lambda ps: so.RiemannianAdam(ps, lr=1e-2),
                                  lambda ps: so.riemannian(torch.optim.Adam(ps, lr=1e-2))],
                         ids=["RiemannianAdam", "riemannian(Adam)"])
def test_parameters_whose_manifolds_differ_in_any_spec_option_step_in_separate_buckets(monkeypatch, make):
    from stiefel_opt.optim import _base, wrappers

    made = []

    class Counted(Bucket):
        __slots__ = ()

        def __init__(self, geometry, *a, **k):
            made.append(geometry)
            super().__init__(geometry, *a, **k)

    monkeypatch.setattr(_base, "Bucket", Counted)
    monkeypatch.setattr(wrappers, "Bucket", Counted)
    ps = [so.StiefelParameter(F.random_point(6, 3), manifold=_Tagged(tag)) for tag in (1, 2)]
    for p in ps:
        p.grad = torch.randn(6, 3)
    make(ps).step()
    assert sorted(m.tag for m in made) == [1, 2]
