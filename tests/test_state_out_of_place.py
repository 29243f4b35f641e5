"""The transactional step's out-of-place path (optim._base._state_outputs): on large stacks of the
torch steps the new state is written into new buffers (functional.steps._INTO) instead of updated in
place after a backup. Bit-identical to the in-place path, and the all-or-nothing guarantees hold on it
(the suite's own stacks are small, so here the threshold is lowered to 0)."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import stiefel_opt as so
import stiefel_opt.optim._base as base
import test_no_silent_loss as nsl
from stiefel_opt import functional as F
from stiefel_opt.functional import steps

CONFIGS = [
    (so.RiemannianAdam, {}), (so.RiemannianAdam, {"amsgrad": True}), (so.RiemannianAdam, {"second_moment": "scalar"}),
    (so.RiemannianAdam, {"retraction": "cayley", "maximize": True}), (so.LandingAdam, {}),
    (so.LandingAdam, {"amsgrad": True, "second_moment": "scalar"}), (so.RiemannianSGD, {"momentum": 0.9}),
    (so.RiemannianSGD, {"momentum": 0.9, "nesterov": True, "retraction": "qr"}), (so.LandingSGD, {"momentum": 0.9}),
    (so.LandingSGD, {}),
]


def _run(cls, kw, shape, dtype, threshold, monkeypatch, steps_=4, nan_at=None):
    monkeypatch.setattr(base, "_OUT_OF_PLACE_MIN", threshold)
    gen = torch.Generator().manual_seed(1)
    n, p = shape
    xs = F.random_point(3, max(n, p), min(n, p), generator=gen).to(dtype)
    ps = [so.StiefelParameter((x if n >= p else x.mT).contiguous(), check=False) for x in xs]
    opt = cls(ps, lr=1e-2, **kw)
    for s in range(steps_):
        for i, prm in enumerate(ps):
            prm.grad = torch.randn(prm.shape, generator=gen, dtype=dtype)
            if nan_at == s and i == 1:
                prm.grad[0, 0] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
    return [prm.detach().clone() for prm in ps], [dict(opt.state[prm]) for prm in ps]


@pytest.mark.parametrize("cls,kw", CONFIGS)
@pytest.mark.parametrize("shape", [(20, 5), (8, 8), (5, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("nan_at", [None, 2])
def test_out_of_place_state_is_bit_identical_to_in_place(cls, kw, shape, dtype, nan_at, monkeypatch):
    xa, sa = _run(cls, kw, shape, dtype, 1 << 60, monkeypatch, nan_at=nan_at)
    xb, sb = _run(cls, kw, shape, dtype, 0, monkeypatch, nan_at=nan_at)
    for a, b in zip(xa, xb):
        assert torch.equal(a, b)
    for a, b in zip(sa, sb):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k


def test_out_of_place_path_runs_and_leaves_the_old_buffers_untouched(monkeypatch):
    monkeypatch.setattr(base, "_OUT_OF_PLACE_MIN", 0)
    calls = []
    for fn, twin in list(steps._INTO.items()):
        monkeypatch.setitem(base._INTO, fn, lambda *a, _t=twin, **k: calls.append(1) or _t(*a, **k))
    w = torch.nn.Parameter(F.random_point(2, 8, 3))
    opt = so.RiemannianAdam([{"params": [w], "manifold": "stiefel"}], lr=0.1)
    for _ in range(2):
        w.grad = torch.randn_like(w)
        opt.step()
    held = opt.state[w]["exp_avg"]
    held_copy = held.clone()
    w.grad = torch.randn_like(w)
    opt.step()
    assert len(calls) == 3
    assert torch.equal(held, held_copy)  # the new moments went into new buffers
    assert not torch.equal(opt.state[w]["exp_avg"], held_copy)
    assert opt.state[w]["exp_avg"]._base is not None  # still views of one stacked buffer


@pytest.mark.parametrize("name", ["riemannian_adam", "landing_adam", "riemannian_sgd", "landing_sgd"])
@pytest.mark.parametrize("shape", [(12, 4), (6, 6), (4, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_into_twins_equal_the_public_steps_and_read_only_their_inputs(name, shape, dtype):
    fn = so.optim.STEP_FUNCTIONS["torch"][name]
    gen = torch.Generator().manual_seed(3)
    n, p = shape
    x = F.random_point(2, max(n, p), min(n, p), dtype=dtype, generator=gen)
    x = x if n >= p else x.mT.contiguous()
    g = torch.randn(x.shape, dtype=dtype, generator=gen)
    if "adam" in name:
        state = [torch.randn(x.shape, dtype=dtype, generator=gen).abs() for _ in range(3)]
        kw = {"step": 3, "lr": 0.05}
    else:
        state = [torch.randn(x.shape, dtype=dtype, generator=gen)]
        kw = {"lr": 0.05, "momentum": 0.9}
    kept = [s.clone() for s in state]
    out = [torch.empty_like(s) for s in state]
    res_twin = steps._INTO[fn](tuple(out), x, g, *state, **kw)
    for s, k in zip(state, kept):
        assert torch.equal(s, k)
    res = fn(x, g, *state, **kw)
    if "sgd" in name:
        assert torch.equal(res_twin[0], res[0]) and torch.equal(res_twin[1], res[1]) and res_twin[1].data_ptr() == out[0].data_ptr()
        return
    assert torch.equal(res_twin, res)
    for o, s in zip(out, state):
        assert torch.equal(o, s)


# --- the all-or-nothing tests of test_no_silent_loss, on the out-of-place path -------------------


@pytest.fixture
def out_of_place(monkeypatch):
    monkeypatch.setattr(base, "_OUT_OF_PLACE_MIN", 0)


@pytest.mark.parametrize("cls", nsl.OPTS)
@pytest.mark.parametrize("scale", [1e21, 1e300])
def test_huge_gradient_raises_with_everything_unchanged(out_of_place, cls, scale):
    nsl.test_huge_gradient_raises_with_everything_unchanged(cls, scale)


@pytest.mark.parametrize("cls", nsl.OPTS)
def test_huge_gradient_skipped_keeps_matrix_and_state(out_of_place, cls):
    nsl.test_huge_gradient_skipped_keeps_matrix_and_state(cls)


def test_linalg_failure_leaves_state_untouched(out_of_place, monkeypatch):
    w, e = nsl._problem()
    opt = so.RiemannianAdam([{"params": [w], "manifold": "stiefel"}, {"params": [e]}], lr=0.1, nonfinite="raise")
    nsl._step(opt, w, e)
    before = nsl._snapshot(opt, [w, e])
    twin = steps._INTO[so.optim.STEP_FUNCTIONS["torch"]["riemannian_adam"]]

    def broken(out, *a, **k):
        twin(out, *a, **k)  # writes its new buffers, then fails
        raise torch.linalg.LinAlgError("eigh failed")

    monkeypatch.setitem(base._INTO, so.optim.STEP_FUNCTIONS["torch"]["riemannian_adam"], broken)
    with pytest.raises(FloatingPointError, match="failed"):
        nsl._step(opt, w, e)
    nsl._assert_same(before, nsl._snapshot(opt, [w, e]))


@pytest.mark.parametrize("cls,key", [(c, k) for c in nsl.OPTS for k in
                                     (("momentum_buffer",) if "SGD" in c.__name__ else ("exp_avg", "exp_avg_sq"))])
def test_state_corrupted_in_memory_is_skipped(out_of_place, cls, key):
    nsl.test_state_corrupted_in_memory_shows_in_the_result_and_is_skipped(cls, key)


@pytest.mark.parametrize("cls", nsl.OPTS)
def test_a_later_bucket_failing_leaves_every_bucket_untouched(out_of_place, cls, monkeypatch):
    """Two buckets (two shapes); the second one's step raises: nothing of the first is written."""
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(F.random_point(2, 8, 3, dtype=torch.float64, generator=gen))
    b = torch.nn.Parameter(F.random_point(2, 9, 4, dtype=torch.float64, generator=gen))
    opt = cls([{"params": [a, b], "manifold": "stiefel"}], lr=0.1, **nsl.KW[cls])
    for _ in range(2):
        for prm in (a, b):
            prm.grad = torch.randn(prm.shape, dtype=prm.dtype, generator=gen)
        opt.step()
    before = nsl._snapshot(opt, [a, b])
    fn = so.optim.STEP_FUNCTIONS["torch"][cls._STEP]
    twin = steps._INTO[fn]

    def fails_on_the_second(out, x, *args, **kw):
        if x.shape[-2:] == (9, 4):
            raise RuntimeError("boom")
        return twin(out, x, *args, **kw)

    monkeypatch.setitem(base._INTO, fn, fails_on_the_second)
    for prm in (a, b):
        prm.grad = torch.randn(prm.shape, dtype=prm.dtype, generator=gen)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    nsl._assert_same(before, nsl._snapshot(opt, [a, b]))
