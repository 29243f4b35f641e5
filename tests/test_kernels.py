"""Fused Triton kernels (stiefel_opt.kernels) against their torch references in functional.

The kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 is set here, at import, before
the kernel module is first loaded (it stays set for this test process: the interpreter reads it
at every launch). Shapes are small and examples few — the interpreter is slow.
"""
import importlib
import os
import subprocess
import sys
import textwrap

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from stiefel_opt import functional as F  # noqa: E402

pytest.importorskip("triton")
K = importlib.import_module("stiefel_opt.kernels")
_core = importlib.import_module("stiefel_opt.kernels._core")
if not _core.INTERPRETED:  # loaded earlier in this process without the interpreter: rebuild
    _core = importlib.reload(_core)

FEW = settings(max_examples=6)
FP32 = dict(rtol=1e-5, atol=1e-5)


@st.composite
def shapes(draw, max_n=40, max_p=20):
    """(batch dims, rows, cols): p = 1, batch 1, n and p off the block sizes, wide matrices."""
    batch = draw(st.sampled_from([(), (1,), (2,), (2, 1)]))
    p = draw(st.integers(1, max_p))
    n = draw(st.integers(p, max_n))
    if draw(st.booleans()) and n > p:
        n, p = p, n  # wide: orthonormal rows
    return (*batch, n, p)


def _point_and_direction(shape, dtype, off=0.05):
    x = F.random_point(*shape) + off * torch.randn(shape)
    g = torch.randn(shape)
    return x.to(dtype), g.to(dtype)


def _close(actual, expected, dtype):
    """fp32: 1e-5. bf16: the kernel and the reference both compute in fp32 and round once, so
    they agree to one bf16 rounding of the result (2⁻⁸ relative)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, **FP32)
    else:
        scale = expected.float().abs().amax().clamp_min(1.0)
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2**-7, atol=2**-8 * scale)


@FEW
@given(shape=shapes(), lam=st.floats(0.1, 2.0), bf16=st.booleans())
def test_landing_field_matches_reference(shape, lam, bf16):
    dtype = torch.bfloat16 if bf16 else torch.float32
    x, g = _point_and_direction(shape, dtype)
    _close(K.landing_field(x, g, lam), F.landing_field(x, g, lam), dtype)


@FEW
@given(shape=shapes(), bf16=st.booleans())
def test_retract_polar_matches_reference(shape, bf16):
    """‖V‖₂ ≤ 1/2 keeps X + V well conditioned (σ_min ≥ 1/2): a nearly square X + 0.2·randn can
    be near-singular, and there the fp32 polar factor itself is ill-determined."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    x, v = _point_and_direction(shape, dtype, off=0.0)
    v = v.float()
    v = (0.5 * v / torch.linalg.matrix_norm(v, ord=2)[..., None, None]).to(dtype)
    y = K.retract_polar(x, v)
    _close(y, F.retract_polar(x, v), dtype)
    if not bf16:
        assert float(F.distance(y).max()) < 1e-5


@FEW
@given(
    b=st.integers(1, 2), n=st.integers(1, 50), p=st.integers(1, 40), split=st.integers(1, 3),
    mode=st.sampled_from([_core.MODE_X_G, _core.MODE_SUM]),
)
def test_gram_and_apply_tiles(b, n, p, split, mode):
    """Small 16×16 tiles so that rows and columns span several tiles with ragged edges."""
    a, c = torch.randn(b, n, p), torch.randn(b, n, p)
    s1, s2 = _core.gram(a, c, mode, bn=16, bp=16, split=split)
    if mode == _core.MODE_X_G:
        torch.testing.assert_close(s1, a.mT @ a, **FP32)
        torch.testing.assert_close(s2, c.mT @ a, **FP32)
    else:
        torch.testing.assert_close(s1, (a + c).mT @ (a + c), **FP32)
        assert s2 is None
    ca, cb = torch.randn(b, p, p), torch.randn(b, p, p)
    out = torch.empty(b, p, n).mT  # a strided (transposed) output
    _core.apply(a, c, ca, cb, out, bn=16, bp=16)
    torch.testing.assert_close(out, a @ ca + c @ cb, **FP32)
    _core.apply(a, c, ca, None, out, bn=16, bp=16)
    torch.testing.assert_close(out, (a + c) @ ca, **FP32)



@FEW
@given(shape=shapes(max_n=30, max_p=12), lr=st.sampled_from([0.05, 5.0]), amsgrad=st.booleans(),
       bf16=st.booleans())
def test_landing_adam_step_matches_reference(shape, lr, amsgrad, bf16):
    """lr = 5 makes the safe step (computed from Gram blocks in the kernel) decide η. bf16 X and
    G with fp32 moments: the kernel's fp32 math equals the reference run on the fp32 values."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    x, g = _point_and_direction(shape, dtype)
    state = [0.1 * torch.randn(shape), 0.1 * torch.rand(shape)] + ([0.2 * torch.rand(shape)] if amsgrad else [None])
    ref_state = [None if t is None else t.clone() for t in state]
    kw = dict(step=3, lr=lr, lam=0.7, beta1=0.8, beta2=0.95, eps=1e-6)
    out = K.landing_adam_update(x, g, *state, **kw)
    ref = F.landing_adam_update(x.float(), g.float(), *ref_state, **kw)
    _close(out, ref.to(dtype), dtype)
    for t, r in zip(state, ref_state):
        if t is not None:
            torch.testing.assert_close(t, r, **FP32)


def test_resolve_backend_auto_is_torch_on_cpu():
    x = torch.randn(4, 2)
    assert K.resolve_backend("auto", x) == "torch"
    assert K.resolve_backend("torch", x) == "torch"
    assert K.resolve_backend("triton", x) == "triton"  # interpreter mode: CPU tensors run
    assert K.resolve_backend("auto", x.double()) == "torch"


def _run_python(code: str, env_drop=("TRITON_INTERPRET",)) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=env, timeout=120,
    )


def test_outside_interpreter_triton_on_cpu_is_a_clear_error_and_auto_falls_back():
    res = _run_python(
        """
        import sys, torch
        import stiefel_opt
        assert "triton" not in sys.modules, "import stiefel_opt must not import triton"
        import stiefel_opt.kernels as K
        assert "triton" not in sys.modules
        x = torch.randn(6, 3)
        assert K.resolve_backend("auto", x) == "torch"
        try:
            K.resolve_backend("triton", x)
        except ValueError as e:
            print("ERR1", e)
        try:
            K.landing_field(x, x)
        except ValueError as e:
            print("ERR2", e)
        """
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("ERR1") and lines[1].startswith("ERR2"), res.stdout
    for line in lines:
        assert "need CUDA tensors" in line and "device 'cpu'" in line and "backend='auto'" in line
        assert "TRITON_INTERPRET=1" in line


def test_without_triton_installed_import_works_and_auto_falls_back():
    res = _run_python(
        """
        import sys
        sys.modules["triton"] = None  # as if triton were not installed
        import torch
        import stiefel_opt
        import stiefel_opt.kernels as K
        assert not K.available()
        x = torch.randn(6, 3)
        assert K.resolve_backend("auto", x) == "torch"
        try:
            K.resolve_backend("triton", x)
        except ImportError as e:
            print("ERR", e)
        """
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ERR") and "triton package is not installed" in res.stdout


def _brockett_run(opt_cls, backend, steps=20, **kw):
    """Brockett on two Stiefel parameters (a batch of three tall 12×3 matrices and one wide 4×9),
    loss = −Σ tr(XᵀAX), `steps` steps; returns the final parameters."""
    from stiefel_opt import StiefelParameter

    gen = torch.Generator().manual_seed(1)
    a = torch.randn(12, 12, generator=gen)
    a = a @ a.T
    x = StiefelParameter(F.random_point(3, 12, 3, generator=gen))
    y = StiefelParameter(F.random_point(4, 9, generator=gen))  # wide: orthonormal rows
    opt = opt_cls([x, y], backend=backend, **kw)
    for _ in range(steps):
        opt.zero_grad()
        loss = -(x.mT @ a @ x).diagonal(dim1=-2, dim2=-1).sum() - (y @ a[:9, :9] @ y.T).trace()
        loss.backward()
        opt.step()
    return [t.detach().clone() for t in (x, y)]


@pytest.mark.parametrize(
    "opt_name, kw",
    [
        ("LandingAdam", dict(lr=0.05, lam=1.0)),
        ("LandingAdam", dict(lr=0.05, lam=0.5, amsgrad=True)),
    ],
)
def test_optimizer_triton_matches_torch_for_20_steps(opt_name, kw):
    import stiefel_opt.optim as optim

    cls = getattr(optim, opt_name)
    ref = _brockett_run(cls, "torch", **kw)
    fused = _brockett_run(cls, "triton", **kw)
    for r, f in zip(ref, fused):
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)
    for f in fused:  # a meaningful run: finite, near the manifold, not collapsed towards 0
        assert torch.isfinite(f).all() and float(F.distance(f).max()) < 1.0


def test_optimizer_auto_uses_torch_on_cpu(monkeypatch):
    """backend='auto' on CPU tensors never calls a kernel, even in interpreter mode."""
    import stiefel_opt.optim as optim

    def boom(*args, **kwargs):
        raise AssertionError("a Triton kernel ran for backend='auto' on CPU")

    monkeypatch.setitem(optim.STEP_FUNCTIONS["triton"], "landing_adam", boom)
    ref = _brockett_run(optim.LandingAdam, "torch", steps=3, lr=0.05)
    auto = _brockett_run(optim.LandingAdam, "auto", steps=3, lr=0.05)
    for r, a in zip(ref, auto):
        torch.testing.assert_close(a, r, rtol=0, atol=0)
