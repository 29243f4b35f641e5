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
]

BACKENDS = ("auto", "torch", "triton")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    """Check same-shape matrices; return their (B, n, p) tall views, a function mapping a (B, n, p)
    result back to the input layout, and an empty output with the input's shape and dtype."""
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

    return [tall3(m) for m in mats], tall3, out


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
