"""Shapes, dtypes, argument checks and the row reduction: the frame every function of
:mod:`stiefel_opt.functional` works in.

- A *tall or square* matrix (n ≥ p) lives on St(n, p); a *wide* one (n < p) means orthonormal rows:
  every function transposes it (:func:`_tall`, :func:`_tall_all`), works on the tall form and
  transposes the result back.
- Low-precision inputs (bf16/fp16) are computed in fp32 (:func:`_compute_dtype`) and cast back.
- Every sum over the n rows of a matrix — the Gram products AᵀB, Frobenius norms, mean squares —
  goes through a :class:`Rows` object passed as ``rows=``: :data:`LOCAL` (all rows here), or a
  :class:`RowShards` whose rows are split over processes (:mod:`stiefel_opt.distributed`).
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


class Rows:
    """Where the n rows of every matrix argument live; :data:`LOCAL` (this class): all of them here.

    Every function of :mod:`stiefel_opt.functional` whose result sums over n rows takes it as
    ``rows=`` and takes those sums through it: the Gram products AᵀB (:meth:`gram`), Frobenius
    norms (:meth:`frobenius`) and mean squares (:meth:`mean_square`) of n-row matrices; everything
    else is row-local. :class:`RowShards` sums them over row shards."""

    __slots__ = ()

    #: True when the matrices are row blocks of taller ones (then no n×n product may be formed and
    #: the data-dependent shortcuts are skipped, so that the communication of a step is fixed).
    sharded = False

    def sum(self, t: Tensor) -> Tensor:
        """Σ over the row blocks of a per-block partial sum ``t`` (here: ``t`` itself)."""
        return t

    def is_wide(self, x: Tensor) -> bool:
        """True when the matrix has fewer rows than columns (orthonormal rows are meant)."""
        return x.shape[-2] < x.shape[-1]

    def gram(self, a: Tensor, b: Tensor) -> Tensor:
        """AᵀB over the last two dims (p×q for n×p A and n×q B)."""
        return self.sum(a.transpose(-1, -2) @ b)

    def frobenius(self, a: Tensor) -> Tensor:
        """‖A‖_F per matrix."""
        return torch.linalg.matrix_norm(a)

    def mean_square(self, a: Tensor) -> Tensor:
        """mean(A²) per matrix, shape (…, 1, 1)."""
        return (a * a).mean(dim=(-2, -1), keepdim=True)

    def __repr__(self) -> str:
        return "LOCAL"


LOCAL = Rows()
"""All rows of every matrix are here: plain local math (the default of every ``rows=``)."""


class RowShards(Rows):
    """The matrices are this process's row blocks of tall matrices with ``rows`` rows in all.

    A subclass implements :meth:`sum` (e.g. an all-reduce over a process group:
    :func:`stiefel_opt.distributed.row_sum`); the Gram products, norms and means of n-row matrices
    are then sums of the local ones, and no matrix is "wide" (a local block may have fewer rows
    than columns)."""

    __slots__ = ("rows",)
    sharded = True

    def __init__(self, rows: int):
        self.rows = rows

    def sum(self, t: Tensor) -> Tensor:
        """Σ over the row shards of a per-shard partial sum ``t`` (every shard must call it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement sum(t), the sum over the row shards")

    def is_wide(self, x: Tensor) -> bool:
        """Always False: the local row block of a tall matrix may be wide."""
        return False

    def frobenius(self, a: Tensor) -> Tensor:
        """‖A‖_F = √(Σ_shards ‖A_k‖²_F) per matrix."""
        return self.sum(a.square().sum(dim=(-2, -1))).sqrt()

    def mean_square(self, a: Tensor) -> Tensor:
        """mean(A²) over all rows of all shards, shape (…, 1, 1)."""
        return self.sum(a.square().sum(dim=(-2, -1), keepdim=True)) / (self.rows * a.shape[-1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rows={self.rows})"


def is_wide(x: Tensor, *, rows: Rows = LOCAL) -> bool:
    """True when the matrix has fewer rows than columns (orthonormal rows are meant).

    Always False for row shards (:class:`RowShards`): the local row block of a tall matrix may be wide."""
    return rows.is_wide(x)


def gram(a: Tensor, b: Tensor, *, rows: Rows = LOCAL) -> Tensor:
    """AᵀB over the last two dims (p×q for n×p A and n×q B): the one place for n-row products.

    On row shards (:mod:`stiefel_opt.distributed`) A and B are local row blocks and the result is
    Σ_shards A_kᵀB_k, one all-reduce of the p×q matrix."""
    return rows.gram(a, b)


def _mT(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.transpose(-1, -2)


def _eye_like(g: Tensor) -> Tensor:
    return torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)


# --- argument checks -----------------------------------------------------------------------------


def _check_matrices(where: str, names, mats) -> None:
    """TypeError/ValueError naming the argument unless every matrix argument is a floating-point
    tensor with at least 2 dims and the matrix shape (last two dims) of the first; None is skipped."""
    first = mats[0]
    for name, a in zip(names, mats):
        if a is None:
            continue
        if not isinstance(a, Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(a).__name__}")
        if not a.is_floating_point():
            raise TypeError(f"{where}: {name} must be a floating-point tensor, got {a.dtype}")
        if a.dim() < 2:
            raise ValueError(
                f"{where}: expected {name} to be a matrix or a batch of matrices, got a tensor of "
                f"shape {tuple(a.shape)}"
            )
        if a.shape[-2:] != first.shape[-2:]:
            raise ValueError(
                f"{where}: {name} has shape {tuple(a.shape)}, but its matrices must match those of "
                f"{names[0]} {tuple(first.shape)}"
            )


#: Metric name → strategy (:class:`stiefel_opt.functional.stiefel.Metric`), filled by stiefel.py.
_METRIC_REGISTRY: dict = {}


def as_metric(metric):
    """The metric strategy for ``metric``: a strategy is returned as is, a name
    (``"euclidean"``/``"canonical"``, :data:`~stiefel_opt.functional.METRICS`) looked up;
    ValueError for any other name."""
    if not isinstance(metric, str):
        return metric
    try:
        return _METRIC_REGISTRY[metric]
    except KeyError:
        raise ValueError(f"metric must be one of {tuple(_METRIC_REGISTRY)}, got {metric!r}") from None


# --- the tall form -------------------------------------------------------------------------------


def _tall(n_matrix_args: int, returns_matrix: bool = True):
    """Decorator: upcast low precision to fp32 and work on the tall form of the first argument.

    The first ``n_matrix_args`` positional arguments are matrices of the same shape; when the
    first is wide (for the ``rows=`` keyword, :data:`LOCAL` if not given), all are transposed,
    and (if ``returns_matrix``) so is the result. Results that are matrices are cast back to the
    input dtype.
    """

    def wrap(fn):
        names = list(inspect.signature(fn).parameters)[:n_matrix_args]

        @functools.wraps(fn)
        def inner_fn(*args, **kwargs):
            x = args[0]
            _check_matrices(fn.__name__, names, args[:n_matrix_args])
            dtype = x.dtype
            cdtype = _compute_dtype(dtype)
            mats = [a if a is None or a.dtype == cdtype else a.to(cdtype) for a in args[:n_matrix_args]]
            wide = kwargs.get("rows", LOCAL).is_wide(x)
            if wide:
                mats = [_mT(a) for a in mats]
            out = fn(*mats, *args[n_matrix_args:], **kwargs)
            if not returns_matrix:
                return out
            if wide:
                out = _mT(out)
            return out if out.dtype == dtype else out.to(dtype)

        return inner_fn

    return wrap


def _tall_all(x: Tensor, *others: Tensor | None, rows: Rows = LOCAL) -> tuple[bool, list[Tensor | None]]:
    """(wide, [X, *others] in their tall form): all transposed when X is wide."""
    wide = rows.is_wide(x)
    mats = [x, *others]
    return wide, ([_mT(a) for a in mats] if wide else mats)


# --- batched products over flattened leading dims ------------------------------------------------


def _accumulates_slowly(a: Tensor, b: Tensor) -> bool:
    """Whether adding A B into C is faster as a product then an add than as one ``baddbmm``: on CPU
    with a small k×r right factor B (k·r ≤ 16, or ≤ 64 over ≥ 8192 rows in all), where a baddbmm
    with β ≠ 0 was measured 1.05–3× slower than a product + ``add_``, and from k·r ≥ 256 1.3–3.4×
    faster (``python -m benchmarks products``). CUDA keeps the single baddbmm (not timed there)."""
    size = b.shape[-1] * b.shape[-2]
    return a.is_cpu and (size <= 16 or (size <= 64 and a.numel() >= 8192 * a.shape[-1]))


def _as_bmm(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(A, B) as the 3-D operands of one bmm over A's flattened leading dims (B broadcast over them);
    returned as they are when both already are 3-D stacks of the same size (no view to dispatch)."""
    if a.dim() == 3 and b.dim() == 3 and a.shape[0] == b.shape[0]:
        return a, b
    lead = a.shape[:-2]
    return a.reshape(-1, *a.shape[-2:]), b.expand(*lead, *b.shape[-2:]).reshape(-1, *b.shape[-2:])


def _bmm_add(c: Tensor | None, a: Tensor, b: Tensor, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    """beta·C + alpha·A B for batched (…×n×k)(…×k×r), through one baddbmm over flattened batch dims
    (a bmm then an add where that is faster: :func:`_accumulates_slowly`)."""
    a3, b3 = _as_bmm(a, b)
    if c is None:
        return torch.bmm(a3, b3).mul_(alpha).view(*a.shape[:-2], a.shape[-2], b.shape[-1])
    c3 = c if c.dim() == 3 else c.reshape(-1, *c.shape[-2:])
    if _accumulates_slowly(a, b):
        out = torch.baddbmm(c3, a3, b3, beta=0.0, alpha=alpha)
        if not (isinstance(beta, (int, float)) and beta == 0):  # β = 0 ignores C (NaN too), as baddbmm does
            out.add_(c3, alpha=beta)
    else:
        out = torch.baddbmm(c3, a3, b3, beta=beta, alpha=alpha)
    return out if c.dim() == 3 else out.view(c.shape)


def _mm_scaled(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """alpha·A B in one product (baddbmm/addmm with beta = 0: no pass to scale)."""
    if a.dim() == 2 and b.dim() == 2:
        return torch.addmm(a.new_zeros(()), a, b, beta=0.0, alpha=alpha)
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a3 = a.expand(*lead, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b3 = b.expand(*lead, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    out = torch.baddbmm(a3.new_zeros(()), a3, b3, beta=0.0, alpha=alpha)
    return out.reshape(*lead, a.shape[-2], b.shape[-1])


def _mm_add_(out: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """out ← out + alpha·A B in place (one baddbmm_ over flattened batch dims, or a product then an
    add: :func:`_accumulates_slowly`; ``out`` contiguous, freshly computed by the caller), returned."""
    if out.dim() == 2:
        return out.addmm_(a, b, alpha=alpha)
    a3, b3 = _as_bmm(a, b)
    out3 = out if out.dim() == 3 else out.view(-1, *out.shape[-2:])
    if _accumulates_slowly(a, b):
        out3.add_(torch.baddbmm(out3, a3, b3, beta=0.0, alpha=alpha))
    else:
        out3.baddbmm_(a3, b3, alpha=alpha)
    return out
