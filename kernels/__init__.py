"""Fused Triton kernels for the hot ``stiefel_opt.functional`` operations.

Every kernel has the exact contract of a pure torch function in :mod:`stiefel_opt.functional`
(the reference): same arguments, batching over leading dims, wide matrices handled by
transposition, bf16/fp16 inputs computed in fp32 and returned in the input dtype.

The kernels run on CUDA tensors. With ``TRITON_INTERPRET=1`` set before they are first used they
also run on CPU tensors in Triton's interpreter (slow; for tests). Triton is imported lazily, on
the first kernel call: ``import stiefel_opt`` never needs it.

Backend selection (:func:`resolve_backend`): ``"torch"`` → the functional reference;
``"triton"`` → these kernels (an error when they cannot run on the tensors given); ``"auto"`` →
Triton for CUDA tensors of a supported dtype when Triton imports, torch otherwise.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch
from torch import Tensor

from stiefel_opt import functional as F

__all__ = [
    "BACKENDS",
    "SUPPORTED_DTYPES",
    "available",
    "resolve_backend",
    "check_tensors",
    "landing_field",
    "retract_polar",
    "landing_sgd_update",
    "landing_adam_update",
    "riemannian_sgd_update",
    "riemannian_adam_update",
    "auto_dispatch",
    "FUSED_STEPS",
]

BACKENDS = ("auto", "torch", "triton")
"""The values :func:`resolve_backend` accepts (the optimizers' ``backend=`` option): ``"auto"``
picks Triton for supported CUDA tensors, ``"torch"`` / ``"triton"`` force one."""
MAX_FUSED_P = 128
"""Widest p (columns of the tall form) of the fused optimizer steps: one tile holds a whole row."""
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes the Triton kernels take (see :func:`check_tensors`); bf16/fp16 are computed in fp32 and
returned in the input dtype."""


@functools.cache
def available() -> bool:
    """True when the ``triton`` package imports (tried once, on the first call)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _load():
    from . import _core as core

    return core


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _interpreting() -> bool:
    """True when the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 was set when they
    were first used and still is (the interpreter reads it at launch too)."""
    return _env_interpret() and _load().INTERPRETED


def check_tensors(*tensors: Tensor | None, where: str = "backend='triton'") -> None:
    """Raise a clear error unless the Triton kernels can run on every tensor given.

    They need the ``triton`` package, a dtype in :data:`SUPPORTED_DTYPES`, and CUDA tensors (or
    CPU tensors with ``TRITON_INTERPRET=1`` set before the kernels were first used).
    """
    if not available():
        raise ImportError(
            f"{where}: the triton package is not installed; install it (pip install "
            "'stiefel-opt[gpu]') or use backend='torch' / 'auto'"
        )
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{where}: the Triton kernels support {[str(d) for d in SUPPORTED_DTYPES]}, got a "
                f"tensor of dtype {t.dtype} and shape {tuple(t.shape)}; use backend='torch' for it"
            )
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and _interpreting():
            continue
        hint = ""
        if _env_interpret() != _load().INTERPRETED:
            hint = (
                " (TRITON_INTERPRET must be set to 1 before the first kernel call and stay set; it "
                "changed after the kernels were built)"
            )
        raise ValueError(
            f"{where}: the Triton kernels need CUDA tensors, got a tensor of shape "
            f"{tuple(t.shape)} on device '{t.device}'{hint}. Use backend='auto' (torch on CPU) or "
            "backend='torch', or set TRITON_INTERPRET=1 before the first kernel call to run "
            "them in Triton's CPU interpreter (slow, for testing)."
        )


def resolve_backend(backend: str, *tensors: Tensor | None) -> str:
    """``"torch"`` or ``"triton"`` for a backend option and the tensors it will run on.

    ``"auto"`` picks Triton only for CUDA tensors of a supported dtype when triton is installed;
    ``"triton"`` raises (see :func:`check_tensors`) when the kernels cannot run on the tensors.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        eligible = all(
            t is None or (t.device.type == "cuda" and t.dtype in SUPPORTED_DTYPES) for t in tensors
        )
        return "triton" if eligible and available() else "torch"
    check_tensors(*tensors)
    return "triton"


def _tall_batch(fn_name: str, *mats: Tensor) -> tuple[list[Tensor], Callable[[Tensor], Tensor], Tensor]:
    """Check same-shape matrices (the point first, then the gradient, then any state); return the
    (B, n, p) tall forms of the first two, the map from an input-layout tensor to its (B, n, p)
    tall form, and an empty output with the point's shape and dtype."""
    x = mats[0]
    if x.dim() < 2:
        raise ValueError(
            f"{fn_name}: expected a matrix or a batch of matrices, got a tensor of shape {tuple(x.shape)}"
        )
    for m in mats[1:]:
        if m.shape != x.shape:
            raise ValueError(
                f"{fn_name}: all matrices must have the shape of the first, {tuple(x.shape)}; got "
                f"{tuple(m.shape)}"
            )
    check_tensors(*mats, where=f"{fn_name} (Triton)")
    wide = F.is_wide(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)

    def tall3(t: Tensor) -> Tensor:
        if wide:
            t = t.transpose(-1, -2)
        return t.reshape(-1, *t.shape[-2:])

    return [tall3(m) for m in mats[:2]], tall3, out


def landing_field(x: Tensor, g: Tensor, lam: float = 1.0) -> Tensor:
    """Fused :func:`stiefel_opt.functional.landing_field`: Λ = ½(G·XᵀX − X·GᵀX) + λX(XᵀX − I).

    Pass 1 reads X and G once for the Gram blocks XᵀX, GᵀX; the p×p coefficients come from
    :func:`~stiefel_opt.functional.landing_coefficients`; pass 2 reads [G X] once and writes Λ.
    """
    core = _load()
    (x3, g3), tall3, out = _tall_batch("landing_field", x, g)
    xtx, gtx = core.gram(x3, g3, core.MODE_X_G)
    c_g, c_x = F.landing_coefficients(xtx, gtx, lam)
    core.apply(g3, x3, c_g, c_x, tall3(out))
    return out


def retract_polar(x: Tensor, v: Tensor) -> Tensor:
    """Fused :func:`stiefel_opt.functional.retract_polar`: polar factor of Y = X + V.

    Pass 1 reads X and V once for S = YᵀY; K = :func:`~stiefel_opt.functional.polar_coefficients`
    (p×p eigh in torch); pass 2 reads X and V once and writes (X + V)·K.
    """
    core = _load()
    (x3, v3), tall3, out = _tall_batch("retract_polar", x, v)
    s, _ = core.gram(x3, v3, core.MODE_SUM)
    core.apply(x3, v3, F.polar_coefficients(s), None, tall3(out))
    return out


def _state_view(t: Tensor, tall3: Callable[[Tensor], Tensor], copy_back: list) -> Tensor:
    """(B, n, p) tall view of an optimizer state tensor, updated in place by the kernels; a
    layout that cannot be viewed so is worked on as a copy, written back by :func:`_write_back`."""
    v = tall3(t)
    if v.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
        copy_back.append((t, v))
    return v


def _state_views(tall3: Callable[[Tensor], Tensor], *states: Tensor | None) -> tuple[list, list]:
    """([:func:`_state_view` of each state tensor, None kept], the copies to write back)."""
    copy_back: list = []
    return [None if t is None else _state_view(t, tall3, copy_back) for t in states], copy_back


def _write_back(copy_back: list) -> None:
    for t, v in copy_back:
        if F.is_wide(t):
            t.copy_(v.reshape(t.transpose(-1, -2).shape).transpose(-1, -2))
        else:
            t.copy_(v.reshape(t.shape))


def landing_adam_update(x: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                        max_exp_avg_sq: Tensor | None = None, *, step: int, lr: float,
                        beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, lam: float = 1.0,
                        safe_eps: float = 0.5, scalar_v: bool = False) -> Tensor:
    """Fused :func:`stiefel_opt.functional.landing_adam_update` (moments updated in place, X⁺
    returned), three passes over a batch (B, n, p): Gram [X G]; moments of T = ½(G·XᵀX − X·GᵀX)
    with the Grams of D; X⁺ = X − ηΛ. ``scalar_v=True`` or more than :data:`MAX_FUSED_P`
    columns (rows, for a wide matrix) run the torch reference.
    """
    from . import _steps

    (x3, g3), tall3, out = _tall_batch("landing_adam_update", x, g,
                                       *_matrix_state(exp_avg, exp_avg_sq, max_exp_avg_sq, scalar_v))
    if scalar_v or x3.shape[-1] > MAX_FUSED_P:
        return F.landing_adam_update(x, g, exp_avg, exp_avg_sq, max_exp_avg_sq, step=step, lr=lr,
                                     beta1=beta1, beta2=beta2, eps=eps, lam=lam,
                                     safe_eps=safe_eps, scalar_v=scalar_v)
    core = _load()
    (m3, v3, w3), copy_back = _state_views(tall3, exp_avg, exp_avg_sq, max_exp_avg_sq)
    xtx, gtx = core.gram(x3, g3, core.MODE_X_G)
    c1, c2 = F.landing_coefficients(xtx, gtx, 0.0)  # T = G·C1 + X·C2
    bc = _adam_bias(step, beta1, beta2, eps)
    dtx, dd = _steps.pass_b(_steps.LANDING_ADAM, g3, x3, c1, c2, m3, v3, w3, beta1=beta1, beta2=beta2, **bc)
    c_d, c_x = F.landing_coefficients(xtx, dtx, lam)
    plan = F.landing_plan(xtx, c_d, c_x, dd, dtx.mT, lr=lr, lam=lam, safe_eps=safe_eps)
    _steps.pass_c(_steps.LANDING_ADAM, g3, x3, c1, c2, m3, v3 if w3 is None else w3, plan, tall3(out), **bc)
    _write_back(copy_back)
    return out


def _matrix_state(exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Tensor | None,
                  scalar_v: bool) -> tuple[Tensor, ...]:
    """The Adam state tensors shaped like the point (the second moments are (…, 1, 1) when scalar)."""
    if scalar_v:
        return (exp_avg,)
    return (exp_avg, exp_avg_sq) + (() if max_exp_avg_sq is None else (max_exp_avg_sq,))


def _adam_bias(step: int, beta1: float, beta2: float, eps: float) -> dict:
    bc1, bc2_sqrt = F.adam_bias_corrections(step, beta1, beta2)
    return dict(bc1=bc1, bc2_sqrt=bc2_sqrt, eps=eps)


def _momentum_buffer(buf: Tensor | None, momentum: float, x: Tensor, tall3: Callable[[Tensor], Tensor],
                     copy_back: list) -> tuple[Tensor | None, Tensor | None]:
    """(tall (B, n, p) view, tensor to return) of an SGD momentum buffer: the given one (updated in
    place), a new one in the point's layout when ``buf`` is None and ``momentum`` ≠ 0 (fp32 for
    bf16/fp16 points), or (None, buf) without momentum (buf untouched)."""
    if not momentum:
        return None, buf
    if buf is not None:
        return _state_view(buf, tall3, copy_back), buf
    dtype = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    new = torch.empty(x.shape, dtype=dtype, device=x.device)
    return tall3(new), new


def landing_sgd_update(x: Tensor, g: Tensor, buf: Tensor | None, *, lr: float, momentum: float = 0.0,
                       dampening: float = 0.0, nesterov: bool = False, lam: float = 1.0,
                       safe_eps: float = 0.5) -> tuple[Tensor, Tensor | None]:
    """Fused :func:`stiefel_opt.functional.landing_sgd_update`, three passes over a batch
    (B, n, p): Gram [X G]; momentum on T = ½(G·XᵀX − X·GᵀX) with the Grams of U = D − T and
    Z = T + U·½XᵀX; X⁺ = X − ηΛ with Λ = T + R(U) + λX(XᵀX − I) = Z + X·(λ(XᵀX − I) − ½UᵀX).
    Returns (X⁺, buf) as the reference; more than :data:`MAX_FUSED_P` columns run the reference.
    """
    from . import _steps

    (x3, g3), tall3, out = _tall_batch("landing_sgd_update", x, g, *(() if buf is None else (buf,)))
    if x3.shape[-1] > MAX_FUSED_P:
        return F.landing_sgd_update(x, g, buf, lr=lr, momentum=momentum, dampening=dampening,
                                    nesterov=nesterov, lam=lam, safe_eps=safe_eps)
    core = _load()
    copy_back: list = []
    first = buf is None
    m3, buf = _momentum_buffer(buf, momentum, x, tall3, copy_back)
    xtx, gtx = core.gram(x3, g3, core.MODE_X_G)
    c1, c2 = F.landing_coefficients(xtx, gtx, 0.0)  # T = G·C1 + X·C2, and R(U) = U·C1 + X·(…)
    sgd = dict(momentum=momentum, nesterov=nesterov)
    utx, ztx, zz = _steps.pass_b(_steps.LANDING_SGD, g3, x3, c1, c2, m3, dampening=dampening,
                                 first=first, **sgd)
    _, c_x = F.landing_coefficients(xtx, utx, lam)
    eye = torch.eye(xtx.shape[-1], dtype=xtx.dtype, device=xtx.device)
    plan = F.landing_plan(xtx, eye, c_x, zz, ztx.mT, lr=lr, lam=lam, safe_eps=safe_eps)
    _steps.pass_c(_steps.LANDING_SGD, g3, x3, c1, c2, m3, None, plan, tall3(out), **sgd)
    _write_back(copy_back)
    return out, buf


def _fused_polar(retraction: str, metric: str, p: int) -> bool:
    """Whether a Riemannian step runs fused: polar retraction, a known metric and at most
    :data:`MAX_FUSED_P` columns (anything else runs, or is rejected by, the torch reference)."""
    return retraction == "polar" and metric in F.METRICS and p <= MAX_FUSED_P


def riemannian_sgd_update(x: Tensor, g: Tensor, buf: Tensor | None, *, lr: float, momentum: float = 0.0,
                          dampening: float = 0.0, nesterov: bool = False, retraction: str = "polar",
                          metric: str = "euclidean") -> tuple[Tensor, Tensor | None]:
    """Fused :func:`stiefel_opt.functional.riemannian_sgd_update` for ``retraction="polar"`` (either
    metric), three passes over a batch (B, n, p): Gram GᵀX; momentum on ξ = rgrad(X, G) with the
    Grams YᵀY, YᵀM of Y = X − lr·D; X⁺ = Y·K (K from :func:`~stiefel_opt.functional.polar_coefficients`)
    and buf ← P_{X⁺}(buf). Returns (X⁺, buf) as the reference. Other retractions, or more than
    :data:`MAX_FUSED_P` columns, run the torch reference.
    """
    from . import _steps

    (x3, g3), tall3, out = _tall_batch("riemannian_sgd_update", x, g, *(() if buf is None else (buf,)))
    if not _fused_polar(retraction, metric, x3.shape[-1]):
        return F.riemannian_sgd_update(x, g, buf, lr=lr, momentum=momentum, dampening=dampening,
                                       nesterov=nesterov, retraction=retraction, metric=metric)
    core = _load()
    copy_back: list = []
    first = buf is None
    m3, buf = _momentum_buffer(buf, momentum, x, tall3, copy_back)
    _, gtx = core.gram(x3, g3, core.MODE_X_G)
    c2 = F.rgrad_coefficient(gtx, metric)
    sgd = dict(momentum=momentum, nesterov=nesterov, lr=lr)
    yy, ym = _steps.pass_b(_steps.RIEMANNIAN_SGD, g3, x3, None, c2, m3, dampening=dampening, first=first, **sgd)
    k = F.polar_coefficients(yy)
    plan = (k, F.transport_coefficient(k, ym) if m3 is not None else k)
    _steps.pass_c(_steps.RIEMANNIAN_SGD, g3, x3, None, c2, m3, None, plan, tall3(out), **sgd)
    _write_back(copy_back)
    return out, buf


def riemannian_adam_update(x: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                           max_exp_avg_sq: Tensor | None = None, *, step: int, lr: float,
                           beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                           retraction: str = "polar", metric: str = "euclidean",
                           scalar_v: bool = False) -> Tensor:
    """Fused :func:`stiefel_opt.functional.riemannian_adam_update` for ``retraction="polar"`` (either
    metric; moments updated in place, X⁺ returned), three passes over a batch (B, n, p): Gram GᵀX;
    moments of ξ = rgrad(X, G) with the Grams DᵀX, DᵀD, MᵀX, MᵀD; then, with
    Y = X − lr·P_X(D) = X·(I + lr·sym(XᵀD)) − lr·D and X⁺ = Y·K (YᵀY and K in p×p), X⁺ and
    m ← P_{X⁺}(m) written from X and D. ``scalar_v=True``, other retractions, or more than
    :data:`MAX_FUSED_P` columns run the torch reference.
    """
    from . import _steps

    (x3, g3), tall3, out = _tall_batch("riemannian_adam_update", x, g,
                                       *_matrix_state(exp_avg, exp_avg_sq, max_exp_avg_sq, scalar_v))
    if scalar_v or not _fused_polar(retraction, metric, x3.shape[-1]):
        return F.riemannian_adam_update(x, g, exp_avg, exp_avg_sq, max_exp_avg_sq, step=step, lr=lr,
                                        beta1=beta1, beta2=beta2, eps=eps, retraction=retraction,
                                        metric=metric, scalar_v=scalar_v)
    core = _load()
    (m3, v3, w3), copy_back = _state_views(tall3, exp_avg, exp_avg_sq, max_exp_avg_sq)
    xtx, gtx = core.gram(x3, g3, core.MODE_X_G)
    c2 = F.rgrad_coefficient(gtx, metric)
    bc = _adam_bias(step, beta1, beta2, eps)
    dtx, dd, mtx, mtd = _steps.pass_b(_steps.RIEMANNIAN_ADAM, g3, x3, None, c2, m3, v3, w3,
                                      beta1=beta1, beta2=beta2, **bc)
    eye = torch.eye(xtx.shape[-1], dtype=xtx.dtype, device=xtx.device)
    b_x, b_d = eye + lr * F.sym(dtx), -lr * eye  # Y = X·B_X + D·B_D
    k = F.polar_coefficients(F.combination_gram(b_x, b_d, xtx, dtx, dd))
    j = F.transport_coefficient(k, b_x.mT @ mtx.mT + b_d.mT @ mtd.mT)  # from YᵀM
    plan = (b_x @ k, b_d @ k, -b_x @ j, -b_d @ j)  # X⁺ = Y·K, P_{X⁺}(M) = M − Y·J
    _steps.pass_c(_steps.RIEMANNIAN_ADAM, g3, x3, None, c2, m3, v3 if w3 is None else w3, plan,
                  tall3(out), **bc)
    _write_back(copy_back)
    return out


def auto_dispatch(torch_fn: Callable, triton_fn: Callable) -> Callable:
    """A step function for ``backend="auto"``: ``triton_fn`` when :func:`resolve_backend` picks
    Triton for its first two tensor arguments (the point and the gradient), else ``torch_fn``."""

    @functools.wraps(torch_fn)
    def step(x: Tensor, g: Tensor, *args, **kwargs):
        fn = triton_fn if resolve_backend("auto", x, g) == "triton" else torch_fn
        return fn(x, g, *args, **kwargs)

    return step


FUSED_STEPS: dict[str, Callable] = {
    "riemannian_sgd": riemannian_sgd_update,
    "riemannian_adam": riemannian_adam_update,
    "landing_sgd": landing_sgd_update,
    "landing_adam": landing_adam_update,
}
"""Step name → fused batched step function with the contract of its ``stiefel_opt.functional``
twin; the optimizers dispatch to these for ``backend="triton"`` (and ``"auto"`` on CUDA)."""
