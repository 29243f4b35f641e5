"""The rollback backups of large CPU state stacks go into buffers the optimizer keeps from step to step
(optim._base.StiefelOptimizer._backup): bit-identical to clones, and the all-or-nothing guarantees of
test_no_silent_loss hold on that path (the suite's stacks are small: the threshold is lowered to 0)."""
from __future__ import annotations

import copy
import itertools
import pickle
import warnings

import pytest
import torch

import stiefel_opt as so
import stiefel_opt.optim._base as base
import test_no_silent_loss as nsl
from stiefel_opt import functional as F

CONFIGS = [(so.RiemannianAdam, {}), (so.RiemannianAdam, {"amsgrad": True, "second_moment": "scalar"}),
           (so.LandingAdam, {}), (so.RiemannianSGD, {"momentum": 0.9}), (so.LandingSGD, {"momentum": 0.9})]


def _run(cls, kw, shape, dtype, threshold, monkeypatch, nan_at=None):
    monkeypatch.setattr(base, "_BACKUP_REUSE_MIN", threshold)
    gen = torch.Generator().manual_seed(1)
    n, p = shape
    xs = F.random_point(3, max(n, p), min(n, p), generator=gen).to(dtype)
    ps = [so.StiefelParameter((x if n >= p else x.mT).contiguous(), check=False) for x in xs]
    opt = cls(ps, lr=1e-2, **kw)
    for s in range(4):
        for i, prm in enumerate(ps):
            prm.grad = torch.randn(prm.shape, generator=gen, dtype=dtype)
            if nan_at == s and i == 1:
                prm.grad[0, 0] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
    return [prm.detach().clone() for prm in ps], [dict(opt.state[prm]) for prm in ps], opt


@pytest.mark.parametrize("cls,kw", CONFIGS)
@pytest.mark.parametrize("shape", [(20, 5), (8, 8), (5, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nan_at", [None, 2])
def test_pooled_backups_are_bit_identical_to_clones(cls, kw, shape, dtype, nan_at, monkeypatch):
    xa, sa, _ = _run(cls, kw, shape, dtype, 1 << 60, monkeypatch, nan_at)
    xb, sb, opt = _run(cls, kw, shape, dtype, 0, monkeypatch, nan_at)
    for a, b in zip(xa, xb):
        assert torch.equal(a, b)
    for a, b in zip(sa, sb):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k
    pool = opt.__dict__.get("_backup_pool", {})
    if any(isinstance(v, torch.Tensor) and v.dim() >= 2 for v in sb[0].values()):
        assert pool  # the path ran
    size = sum(len(v) for v in pool.values())
    assert size <= 3 * 3  # at most one step's backups: a bucket per parameter, three state stacks
    for prm in opt.param_groups[0]["params"]:
        prm.grad = torch.ones_like(prm)
    for _ in range(3):
        opt.step()
        assert sum(len(v) for v in opt.__dict__["_backup_pool"].values()) <= size  # it does not grow
    assert "_backups_taken" not in opt.__dict__


def test_pool_survives_copy_and_pickle(monkeypatch):
    monkeypatch.setattr(base, "_BACKUP_REUSE_MIN", 0)
    w = torch.nn.Parameter(F.random_point(2, 8, 3))
    opt = so.LandingAdam([{"params": [w], "manifold": "stiefel"}], lr=0.1)
    w.grad = torch.randn_like(w)
    opt.step()
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        p = other.param_groups[0]["params"][0]
        p.grad = torch.randn_like(p)
        other.step()
        assert torch.isfinite(p).all()


@pytest.fixture
def pooled(monkeypatch):
    monkeypatch.setattr(base, "_BACKUP_REUSE_MIN", 0)


@pytest.mark.parametrize("cls", nsl.OPTS)
@pytest.mark.parametrize("scale", [1e21, 1e300])
def test_huge_gradient_raises_with_everything_unchanged(pooled, cls, scale):
    nsl.test_huge_gradient_raises_with_everything_unchanged(cls, scale)


@pytest.mark.parametrize("cls", nsl.OPTS)
def test_huge_gradient_skipped_keeps_matrix_and_state(pooled, cls):
    nsl.test_huge_gradient_skipped_keeps_matrix_and_state(cls)


def test_linalg_failure_leaves_state_untouched(pooled, monkeypatch):
    nsl.test_linalg_failure_leaves_state_and_euclidean_params_untouched(monkeypatch)


@pytest.mark.parametrize("cls,key", [(c, k) for c in nsl.OPTS for k in
                                     (("momentum_buffer",) if "SGD" in c.__name__ else ("exp_avg", "exp_avg_sq"))])
def test_state_corrupted_in_memory_is_skipped(pooled, cls, key):
    nsl.test_state_corrupted_in_memory_shows_in_the_result_and_is_skipped(cls, key)


@pytest.mark.parametrize("cls", nsl.OPTS)
def test_a_later_bucket_failing_restores_every_bucket(pooled, cls, monkeypatch):
    """Two buckets (two shapes), the second one's step raises: the first one's state, updated in place,
    is restored from its pooled backup, and the pool is released."""
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

    def fails_on_the_second(x, *args, **kw):
        if x.shape[-2:] == (9, 4):
            raise RuntimeError("boom")
        return fn(x, *args, **kw)

    monkeypatch.setitem(so.optim.STEP_FUNCTIONS["torch"], cls._STEP, fails_on_the_second)
    for prm in (a, b):
        prm.grad = torch.randn(prm.shape, dtype=prm.dtype, generator=gen)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    nsl._assert_same(before, nsl._snapshot(opt, [a, b]))
    assert "_backups_taken" not in opt.__dict__
    monkeypatch.setitem(so.optim.STEP_FUNCTIONS["torch"], cls._STEP, fn)
    opt.step()  # and steps again
