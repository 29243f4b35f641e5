"""Stiefel manifold object, StiefelParameter, constrain and the shared-Q spectral type."""
import copy
import io
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from stiefel_opt import SharedQSpectral, Stiefel, StiefelParameter, constrain
from stiefel_opt import functional as F
from stiefel_opt._geoopt import geoopt
from stiefel_opt.manifolds import as_stiefel, is_stiefel


def test_import_emits_no_warning():
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import stiefel_opt"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


@given(st.sampled_from(sorted(F.RETRACTIONS)), st.sampled_from(F.METRICS),
       st.sampled_from([(9, 4), (4, 9), (2, 6, 6)]), st.integers(0, 1000))
def test_manifold_methods_keep_points_and_tangents(retraction, metric, shape, seed):
    m = Stiefel(metric=metric, retraction=retraction)
    gen = torch.Generator().manual_seed(seed)
    x = m.random(*shape, dtype=torch.float64, generator=gen)
    assert m.check_point_on_manifold(x)
    g = torch.randn(shape, dtype=torch.float64, generator=gen)
    r = m.egrad2rgrad(x, g)
    assert m.check_vector_on_tangent(x, r)
    y = m.retr(x, 0.3 * r)
    assert m.check_point_on_manifold(y)
    assert m.check_vector_on_tangent(y, m.transp(x, y, r))
    y2, v2 = m.retr_transp(x, 0.3 * r, r)
    assert torch.allclose(y2, y) and m.check_vector_on_tangent(y2, v2)
    assert m.inner(x, r).shape == shape[:-2]
    assert m.component_inner(x, r).shape == (*shape[:-2], 1, 1)


def test_off_manifold_point_and_non_tangent_vector_are_detected():
    m = Stiefel()
    x = m.random(6, 3, dtype=torch.float64)
    ok, reason = m.check_point_on_manifold(1.1 * x, explain=True)
    assert not ok and "XᵀX" in reason
    assert not m.check_vector_on_tangent(x, x)


def test_conv_kernel_is_seen_as_a_flattened_matrix():
    m = Stiefel(ndim=4)
    x = m.random(8, 3, 3, 3, dtype=torch.float64)  # (out, in, kh, kw) → 8 × 27: wide, orthonormal rows
    mat = x.reshape(8, 27)
    assert torch.allclose(mat @ mat.mT, torch.eye(8, dtype=torch.float64), atol=1e-10)
    g = torch.randn_like(x)
    r = m.egrad2rgrad(x, g)
    assert r.shape == x.shape
    assert torch.allclose(r.reshape(8, 27), F.proj_tangent(mat, g.reshape(8, 27)))
    assert m.component_inner(x, r).shape == (1, 1, 1, 1)


def test_geoopt_riemannian_adam_accepts_our_parameters_tall_and_wide():
    torch.manual_seed(0)
    params = [StiefelParameter.random(20, 4), StiefelParameter.random(3, 12),
              StiefelParameter.random(10, 3, manifold=Stiefel(retraction="qr")),
              StiefelParameter.random(2, 9, 3, manifold=Stiefel(metric="canonical", retraction="cayley"))]
    target = [torch.randn(p.shape) for p in params]
    opt = geoopt.optim.RiemannianAdam(params, lr=0.05)
    start = sum(float(((p.detach() - t) ** 2).sum()) for p, t in zip(params, target))
    for _ in range(30):
        opt.zero_grad()
        loss = sum(((p - t) ** 2).sum() for p, t in zip(params, target))
        loss.backward()
        opt.step()
    assert float(loss.detach()) < start
    for p in params:
        assert F.distance(p.detach()).max() <= 1e-5


def test_stiefel_parameter_validates_its_data():
    with pytest.raises(ValueError, match="not orthonormal"):
        StiefelParameter(torch.randn(6, 3))
    with pytest.raises(ValueError, match="matrix"):
        StiefelParameter(torch.ones(5))
    with pytest.raises(ValueError, match="non-finite"):
        StiefelParameter(torch.full((4, 2), float("inf")))
    with pytest.raises(TypeError, match="floating point"):
        StiefelParameter(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="must be a Stiefel or geoopt's EuclideanStiefel, got Sphere"):
        StiefelParameter(torch.eye(3), manifold=geoopt.Sphere())
    p = StiefelParameter(torch.randn(6, 3), check=False)  # landing pulls it back later
    assert isinstance(p, nn.Parameter) and isinstance(p, geoopt.ManifoldParameter)
    assert p.requires_grad and is_stiefel(p.manifold)


def test_stiefel_parameter_survives_deepcopy_pickle_and_state_dict():
    lin = nn.Linear(3, 8, bias=False)
    constrain(lin, "weight")
    clone = copy.deepcopy(lin)
    assert isinstance(clone.weight, StiefelParameter) and torch.equal(clone.weight, lin.weight)
    buf = io.BytesIO()
    torch.save(lin.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = nn.Linear(3, 8, bias=False)
    constrain(fresh, "weight", init="random")
    fresh.load_state_dict(state)
    assert isinstance(fresh.weight, StiefelParameter) and torch.equal(fresh.weight, lin.weight)


@pytest.mark.parametrize("shape", [(8, 3), (3, 8), (4, 4)])
@pytest.mark.parametrize("init", ["project", "keep", "random"])
def test_constrain_linear(shape, init):
    lin = nn.Linear(shape[1], shape[0])
    before = lin.weight.detach().clone()
    p = constrain(lin, "weight", init=init)
    assert lin.weight is p and isinstance(p, StiefelParameter) and p.shape == shape
    if init == "keep":
        assert torch.equal(p.detach(), before)
    else:
        assert F.distance(p.detach()) <= 1e-5
    if init == "project":
        u, _, vh = torch.linalg.svd(before, full_matrices=False)
        assert torch.allclose(p.detach(), u @ vh, atol=1e-5)
    x = torch.randn(2, shape[1])
    lin(x).sum().backward()  # the module still works and gets gradients
    assert p.grad is not None and p.grad.shape == shape


@pytest.mark.parametrize("init", ["project", "random"])
@pytest.mark.parametrize("manifold", [None, Stiefel(metric="canonical", retraction="qr")])
def test_constrain_conv_weight_flattens_to_matrix(init, manifold):
    conv = nn.Conv2d(4, 6, 3)  # (6, 4, 3, 3): the wide 6×36 matrix
    p = constrain(conv, "weight", manifold=manifold, init=init)
    assert p.manifold.ndim == 4  # a given ndim=2 Stiefel is widened, its metric and retraction kept
    if manifold is not None:
        assert (p.manifold.metric, p.manifold.retraction) == ("canonical", "qr")
    m = p.detach().reshape(6, -1)
    assert torch.allclose(m @ m.T, torch.eye(6), atol=1e-5)
    assert conv(torch.randn(1, 4, 5, 5)).shape == (1, 6, 3, 3)
    y = p.manifold.retr(p.detach(), 0.1 * p.manifold.egrad2rgrad(p.detach(), torch.randn(p.shape)))
    assert p.manifold.check_point_on_manifold(y)


def test_constrain_tall_conv_weight():
    conv = nn.Conv1d(2, 12, 2)  # (12, 2, 2): the tall 12×4 matrix, orthonormal columns
    p = constrain(conv, "weight")
    m = p.detach().reshape(12, -1)
    assert torch.allclose(m.T @ m, torch.eye(4), atol=1e-5)


def test_constrain_errors_name_the_parameter():
    lin = nn.Linear(3, 4)
    with pytest.raises(ValueError, match=r"Linear\.bias.*shape \(4,\)"):
        constrain(lin, "bias")
    with pytest.raises(ValueError, match="no parameter 'kernel'.*weight"):
        constrain(lin, "kernel")
    with pytest.raises(ValueError, match="init must be one of"):
        constrain(lin, "weight", init="orthogonal")
    with torch.no_grad():
        lin.weight.zero_()
    with pytest.raises(ValueError, match=r"Linear\.weight.*rank deficient"):
        constrain(lin, "weight")
    assert not isinstance(lin.weight, StiefelParameter)  # a failed call leaves the module untouched
    with torch.no_grad():
        lin.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"Linear\.weight.*non-finite"):
        constrain(lin, "weight")
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        constrain(torch.ones(3, 3), "weight")
    with pytest.raises(TypeError, match="name must be"):
        constrain(lin, 0)
    with pytest.raises(TypeError, match=r"Linear\.weight.*manifold must be a Stiefel"):
        constrain(nn.Linear(3, 4), "weight", manifold="stiefel")
    scalar = nn.Module()
    scalar.scale = nn.Parameter(torch.tensor(2.0))
    with pytest.raises(ValueError, match=r"Module\.scale.*shape \(\)"):  # 0-D
        constrain(scalar, "scale")


def test_manifold_rejects_mismatched_shapes_and_vectors():
    m = Stiefel()
    x = m.random(6, 3, dtype=torch.float64)
    for method in (m.proju, m.egrad2rgrad, m.retr):
        with pytest.raises(ValueError, match=r"shape \(3, 6\) does not match the point's shape \(6, 3\)"):
            method(x, x.mT)
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        m.projx(torch.ones(3))
    with pytest.raises(ValueError, match="rank deficient"):
        m.projx(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="shape \\(\\)"):
        StiefelParameter(torch.tensor(1.0))
    with pytest.raises(TypeError, match="expected a torch.Tensor, got list"):
        StiefelParameter([[1.0, 0.0], [0.0, 1.0]])


def test_manifold_declarations_are_normalized():
    assert as_stiefel(None) is None and as_stiefel("euclidean") is None
    assert isinstance(as_stiefel("stiefel"), Stiefel)
    m = Stiefel(retraction="cayley")
    assert as_stiefel(m) is m
    qr = as_stiefel(geoopt.EuclideanStiefel())
    assert (qr.metric, qr.retraction) == ("euclidean", "qr")
    assert as_stiefel(geoopt.Euclidean()) is None
    # geoopt manifolds our Stiefel does not reproduce exactly are honoured on the parameter only
    for other in (geoopt.CanonicalStiefel(), geoopt.EuclideanStiefelExact(), geoopt.Sphere()):
        assert not is_stiefel(other)
        with pytest.raises(TypeError, match="put a geoopt manifold on the parameter itself"):
            as_stiefel(other)
        with pytest.raises(TypeError, match="geoopt.ManifoldParameter"):
            StiefelParameter(F.random_point(5, 2), manifold=other)
    assert is_stiefel(geoopt.EuclideanStiefel()) and is_stiefel(Stiefel(metric="canonical"))
    with pytest.raises(ValueError, match="unknown manifold"):
        as_stiefel("grassmann")
    with pytest.raises(ValueError, match="retraction must be one of"):
        Stiefel(retraction="svd")


@pytest.mark.parametrize("core", ["diag", "full"])
def test_shared_q_spectral(core):
    torch.manual_seed(0)
    s = SharedQSpectral(10, 3, core=core, init_scale=0.5).double()
    with torch.no_grad():
        s.core.add_(torch.randn_like(s.core))
    mat = s.matrix()
    assert torch.allclose(mat, mat.T)
    assert torch.linalg.matrix_rank(mat) == 3
    b, a = s.factors()
    assert torch.allclose(b @ a, mat)
    x = torch.randn(4, 10, dtype=torch.float64)
    assert torch.allclose(s(x), x @ mat)
    evals = torch.linalg.eigvalsh(mat)
    expected = torch.linalg.eigvalsh(s.core_matrix())
    nonzero = evals[evals.abs() > 1e-9]
    assert torch.allclose(nonzero.sort().values, expected[expected.abs() > 1e-9].sort().values)
    assert isinstance(s.Q, StiefelParameter)
    with pytest.raises(ValueError, match="core"):
        SharedQSpectral(4, 2, core="tri")
    with pytest.raises(ValueError, match="0 < r <= n"):
        SharedQSpectral(4, 5)


def test_off_manifold_parameter_survives_deepcopy_and_pickle():
    """A landing optimizer leaves X slightly off the manifold: copies must not re-check it."""
    p = StiefelParameter(1.01 * F.random_point(6, 2), check=False)
    for clone in (copy.deepcopy(p), _pickled(p)):
        assert type(clone) is StiefelParameter and torch.equal(clone.detach(), p.detach())
        assert clone.requires_grad and is_stiefel(clone.manifold)


def _pickled(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_a_metric_strategy_is_accepted_where_its_name_is():
    m = Stiefel(metric=F.CANONICAL, retraction="exp")
    assert m.metric == "canonical" and m.spec() == Stiefel(metric="canonical", retraction="exp").spec()
    x = m.random(6, 3, generator=torch.Generator().manual_seed(0))
    g = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(m.egrad2rgrad(x, g), g - x @ g.mT @ x, atol=1e-6)
    with pytest.raises(ValueError, match="metric"):
        Stiefel(metric="riemannian")


@pytest.mark.parametrize("spec", [{"manifold": ["x"]}, {"manifold": None}, 3, "grassmann"])
def test_a_malformed_manifold_spec_raises_value_error_naming_where(spec):
    from stiefel_opt.manifolds import manifold_from_spec

    with pytest.raises(ValueError, match="param group 7"):
        manifold_from_spec(spec, "param group 7")


def test_a_second_manifold_class_cannot_take_a_registered_spec_name():
    from stiefel_opt.manifolds import MatrixManifold, as_manifold

    with pytest.raises(ValueError, match="already the name of Stiefel"):
        class Impostor(Stiefel):
            spec_name = "stiefel"
    assert type(as_manifold("stiefel")) is Stiefel
    assert issubclass(Stiefel, MatrixManifold)
