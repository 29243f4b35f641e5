"""Stiefel parameters under ``torch.distributed``: DDP unchanged, FSDP2 shards with p×p communication.

DDP: gradients are all-reduced before ``step()``; every optimizer of the package runs unchanged on
the replicated parameters (nothing here is needed).

FSDP2 (``fully_shard``): parameters become DTensors sharded on dim 0 and tensor subclasses
(``StiefelParameter``) are dropped — declare the manifold in the param group
(``{"params": [...], "manifold": "stiefel"}``), or record it before sharding with
:func:`stiefel_names` and build the groups after with :func:`manifold_param_groups`. The optimizers
then step on the local shards (``to_local()``), in one of three layouts per parameter:

- ``rows``: the long side of the matrix is split (a tall n×p weight sharded on dim 0). Every n-row
  Gram product AᵀB of the step (XᵀX, GᵀX, DᵀX, VᵀV, …) is the sum of the local products, so it is
  computed locally and all-reduced (p×p); the Frobenius norms of the safe step and the scalar
  second moment are summed the same way (one value per matrix); everything else is row-local.
  This runs the landing steps, the polar, Newton–Schulz, Cayley (Woodbury: 2p×2p Grams) and
  euclidean ``exp`` retractions, and QR through CholeskyQR2 (R from chol of the Gram matrix).
  The canonical-metric ``exp`` needs a QR of an n×p residual that need not be full rank: it raises.
- ``gather``: the short side is split (a wide r×in weight such as PEFT's ``lora_A`` sharded on
  dim 0). Its Gram products couple rows held by different ranks, so the step all-gathers the
  (small) matrix, its gradient and its moments, runs unsharded on every rank (the same inputs give
  the same result everywhere), and keeps the local rows: O(n·p) bytes per step, not O(p²).
- ``local``: a leading (batch) dim is split — every rank owns whole matrices; no communication.

The same layouts serve the ``riemannian(opt)``/``landing(opt)`` hooks (the inner optimizer steps
the DTensors) and :class:`~stiefel_opt.optim.lora_rite.LoRARITE`, whose factors are laid out by
their tall form (A r×in: ``rows`` when split on ``in``, ``gather`` when split on r; B out×r:
``rows`` when split on ``out``); its Grams are r×r.

Every rank must call ``step()`` (collectives); the non-finite check agrees over the shards (a
B-flag all-reduce). :func:`count_communication` counts the bytes of the collectives issued here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as F
from .manifolds import MatrixManifold, as_manifold, is_stiefel

__all__ = [
    "row_sum",
    "count_communication",
    "CommCount",
    "shard_safe",
    "SHARD_SAFE_RETRACTIONS",
    "stiefel_names",
    "manifold_param_groups",
]

SHARD_SAFE_RETRACTIONS = ("polar", "newton_schulz", "qr", "cayley", "exp")
"""Retractions that run on row shards with p×p all-reduces only (``exp``: euclidean metric only;
see :func:`shard_safe`)."""


def shard_safe(retraction: str, metric: str = "euclidean") -> bool:
    """True when the retraction runs on row shards from p×p Grams (every one but canonical ``exp``)."""
    return retraction in SHARD_SAFE_RETRACTIONS and not (retraction == "exp" and metric == "canonical")


# --- communication counter -----------------------------------------------------------------------


@dataclasses.dataclass
class CommCount:
    """Collectives issued by this module: ``calls`` [(kind, bytes sent by this rank)]."""

    calls: list = dataclasses.field(default_factory=list)

    @property
    def bytes(self) -> int:
        """Total bytes sent by this rank over every recorded collective: Σ bytes of ``calls``."""
        return sum(b for _, b in self.calls)

    def bytes_of(self, kind: str) -> int:
        """Bytes sent by this rank in the collectives of one ``kind`` (``"all_reduce"`` or ``"all_gather"``)."""
        return sum(b for k, b in self.calls if k == kind)


_COUNTERS: list[CommCount] = []


@contextlib.contextmanager
def count_communication() -> Iterator[CommCount]:
    """Count the all-reduces/all-gathers issued by the Stiefel optimizers inside the block."""
    c = CommCount()
    _COUNTERS.append(c)
    try:
        yield c
    finally:
        _COUNTERS.remove(c)


def _record(kind: str, t: Tensor) -> None:
    for c in _COUNTERS:
        c.calls.append((kind, t.numel() * t.element_size()))


def _all_reduce(t: Tensor, group, op=dist.ReduceOp.SUM) -> Tensor:
    t = t.contiguous()
    _record("all_reduce", t)
    dist.all_reduce(t, op=op, group=group)
    return t


# --- the row-sharded reduction -------------------------------------------------------------------


class _RowSum(F.RowShards):
    """The row reduction of a ``rows`` layout: n-row sums all-reduced (SUM) over the process group."""

    __slots__ = ("group",)

    def __init__(self, rows: int, group):
        super().__init__(rows)
        self.group = group

    def sum(self, t: Tensor) -> Tensor:
        """Σ over the ranks of the group of the local partial sums ``t`` (one all-reduce). Not
        inside torch.compile (the counted all-reduce does not trace)."""
        if torch.compiler.is_compiling():
            raise NotImplementedError(
                "row-sharded (FSDP2) Stiefel steps do not run inside torch.compile: compile the "
                "forward and backward, and call optimizer.step() outside the compiled region"
            )
        return _all_reduce(t, self.group)


def row_sum(rows: int, group=None) -> F.Rows:
    """The row reduction to pass as ``rows=`` to :mod:`stiefel_opt.functional` when every matrix is
    the local row block of a tall matrix with ``rows`` rows in all, split over the process
    ``group``: n-row Gram products (:func:`~stiefel_opt.functional.gram`), Frobenius norms and means
    are all-reduced (SUM) over the group, and no matrix is transposed as "wide" (a local block may
    have fewer rows than columns). Every rank of the group must run the same calls."""
    return _RowSum(rows, group)


# --- shard layouts of DTensor parameters ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a parameter's matrices are split: ``mode`` rows|gather, the split matrix ``axis`` (−2/−1)
    of length ``full``, over ``group`` (``world`` ranks, this one ``rank``), global matrix ``gshape``."""

    mode: str
    axis: int
    full: int
    gshape: tuple
    group: object = dataclasses.field(compare=False)
    group_key: tuple = ()
    world: int = 1
    rank: int = 0


def _describe(optimizer, group: dict, p: Tensor) -> str:
    gi = next(i for i, g in enumerate(optimizer.param_groups) if g is group)
    pi = next(i for i, q in enumerate(group["params"]) if q is p)
    return f"{type(optimizer).__name__}: parameter {pi} of param group {gi} (shape {tuple(p.shape)})"


def _split(p: Tensor, describe: Callable[[], str]) -> tuple[Tensor, Tensor | None, tuple[int, int] | None]:
    """(local shard, local gradient, (mesh dim, tensor dim) of the split or None) of a DTensor.

    A gradient whose placements differ from the parameter's is first redistributed to them (and
    stored back as ``p.grad``, so writes into the local gradient reach it)."""
    grad = p.grad
    if grad is not None and grad.placements != p.placements:
        grad = p.grad = grad.redistribute(p.device_mesh, p.placements)
    shards = [(i, pl.dim % p.dim()) for i, pl in enumerate(p.placements) if pl.is_shard()]
    bad = [pl for pl in p.placements if not (pl.is_shard() or pl.is_replicate())]
    if bad or len(shards) > 1:
        raise ValueError(
            f"{describe()} has placements {p.placements}: it must be sharded on at most one mesh dim "
            "(the rest Replicate), e.g. fully_shard's Shard(0)"
        )
    return p.to_local(), None if grad is None else grad.to_local(), shards[0] if shards else None


def _layout(p: Tensor, mode: str, mesh_dim: int, axis: int, gshape: tuple) -> _Layout:
    pg = p.device_mesh.get_group(mesh_dim)
    return _Layout(mode, axis, gshape[axis], gshape, pg, tuple(dist.get_process_group_ranks(pg)),
                   dist.get_world_size(pg), dist.get_rank(pg))


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor; without importing ``torch.distributed.tensor`` (nothing is a
    DTensor before that module is imported), so that the per-step check of a plain tensor is one lookup."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_parts(p: Tensor, manifold: MatrixManifold, optimizer, group: dict,
                retraction: str | None) -> tuple[Tensor, Tensor, _Layout | None]:
    """(local parameter, local gradient, layout or None) for the optimizers' buckets.

    A plain tensor gives (p, p.grad, None). A DTensor gives its local shard and the layout of the
    split (:meth:`~stiefel_opt.manifolds.MatrixManifold.shard_axis` says which matrix axis a split
    dim cuts); ``retraction`` (None for landing steps) is checked against what row shards allow."""
    if not is_dtensor(p):
        return p, p.grad, None
    local, local_grad, split = _split(p, lambda: _describe(optimizer, group, p))
    if split is None:
        return local, local_grad, None
    mesh_dim, dim = split
    lead = p.dim() - manifold.ndim
    if dim < lead:  # whole matrices on every rank
        return local, local_grad, None
    try:
        axis = manifold.shard_axis(dim - lead)
    except ValueError as err:
        raise ValueError(f"{_describe(optimizer, group, p)} is sharded on dim {dim}: {err}") from None
    if axis is None:  # the geometry's matrices are whole on every rank
        return local, local_grad, None
    rows, cols = manifold.matrix_shape(p.shape)[-2:]
    long_axis = -2 if rows >= cols else -1
    mode = "rows" if axis == long_axis else "gather"
    if mode == "rows" and retraction is not None and not shard_safe(retraction, manifold.metric):
        raise ValueError(
            f"{_describe(optimizer, group, p)}: retraction {retraction!r} with metric "
            f"{manifold.metric!r} needs the whole matrix and cannot run on FSDP2 row shards; use "
            "retraction 'polar', 'newton_schulz', 'qr' (CholeskyQR2) or 'cayley', metric='euclidean' "
            "for 'exp', or a landing optimizer"
        )
    return local, local_grad, _layout(p, mode, mesh_dim, axis, (rows, cols))


def factor_parts(p: Tensor, long_dim: int, describe: Callable[[], str]) -> tuple[Tensor, Tensor | None, _Layout | None]:
    """(local factor, local gradient, layout or None) of a 2-D LoRA factor whose tall form has its
    rows on dim ``long_dim`` (A: r×in → 1, B: out×r → 0): ``rows`` when that dim is split, ``gather``
    when the rank dim r is split. A plain or replicated tensor gives layout None."""
    if not is_dtensor(p):
        return p, p.grad, None
    local, local_grad, split = _split(p, describe)
    if split is None:
        return local, local_grad, None
    mesh_dim, dim = split
    return local, local_grad, _layout(p, "rows" if dim == long_dim else "gather", mesh_dim, dim - 2,
                                      tuple(p.shape))


def reduction(layout: _Layout | None) -> F.Rows:
    """The row reduction of ``layout`` for the ``rows=`` of :mod:`stiefel_opt.functional`:
    :func:`row_sum` for a ``rows`` layout, :data:`~stiefel_opt.functional.LOCAL` otherwise."""
    if layout is None or layout.mode != "rows":
        return F.LOCAL
    return row_sum(layout.full, layout.group)


def agree(bad: Tensor, layout: _Layout | None) -> Tensor:
    """A per-matrix flag made the same on every rank of the split (logical or; one B-flag all-reduce)."""
    if layout is None:
        return bad
    return _all_reduce(bad.to(torch.uint8), layout.group, dist.ReduceOp.MAX).bool()


def gather(t: Tensor, layout: _Layout) -> Tensor:
    """The whole stack from the local blocks along ``layout.axis`` (torch.chunk split, padded)."""
    chunk = -(-layout.full // layout.world)
    n = t.shape[layout.axis]
    if n < chunk:
        pad = list(t.shape)
        pad[layout.axis] = chunk - n
        t = torch.cat([t, t.new_zeros(pad)], dim=layout.axis)
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(layout.world)]
    _record("all_gather", t)
    dist.all_gather(parts, t, group=layout.group)
    return torch.cat(parts, dim=layout.axis).narrow(layout.axis, 0, layout.full)


def local_block(t: Tensor, layout: _Layout, n: int) -> Tensor:
    """This rank's ``n`` rows (or columns) of a whole stack along ``layout.axis`` (torch.chunk split)."""
    chunk = -(-layout.full // layout.world)
    return t.narrow(layout.axis, min(layout.rank * chunk, layout.full), n)


def sharded_step(fn: Callable, layout: _Layout, backend: str) -> Callable:
    """Wrap a batched step function of :mod:`stiefel_opt.functional` (``fn(x, g, *state, rows=, **kw)``,
    moments updated in place, X⁺ or (X⁺, buf) returned) to run on the local blocks of ``layout``:
    a ``rows`` layout passes its row reduction as ``rows=`` (:func:`reduction`), a ``gather``
    layout runs ``fn`` on the whole matrices (``rows`` left at its default)."""
    if backend == "triton":
        raise ValueError(
            "backend='triton': the fused kernels do not run on FSDP2 shards; use backend='auto' or "
            "'torch' (the sharded step uses the torch functions with p×p all-reduces)"
        )
    return functools.wraps(fn)((_rows_step if layout.mode == "rows" else _gather_step)(fn, layout))


def _rows_step(fn: Callable, layout: _Layout) -> Callable:
    rows = reduction(layout)

    def step(x, g, *state, **kw):
        mshape = x.shape
        flip = layout.axis == -1  # columns are the long side: the tall form is the transpose

        def tall(t):
            return t.transpose(-1, -2) if flip and t is not None and t.shape == mshape else t

        out = fn(tall(x), tall(g), *(tall(t) for t in state), rows=rows, **kw)
        if isinstance(out, tuple):
            return tuple(t.transpose(-1, -2) if flip and t is not None else t for t in out)
        return out.transpose(-1, -2) if flip else out

    return step


def _gather_step(fn: Callable, layout: _Layout) -> Callable:
    def step(x, g, *state, **kw):
        n = x.shape[layout.axis]

        def is_mat(t):
            return t is not None and t.shape == x.shape

        full_state = [gather(t, layout) if is_mat(t) else t for t in state]
        out = fn(gather(x, layout), gather(g, layout), *full_state, **kw)
        for t, ft in zip(state, full_state):
            if is_mat(t):
                t.copy_(local_block(ft, layout, n))
        if not isinstance(out, tuple):
            return local_block(out, layout, n)
        x_new, *rest = out
        kept = []
        for i, r in enumerate(rest):  # (X⁺, buf): the buffer given in place, or a new one
            given = state[i] if i < len(state) else None
            kept.append(given if is_mat(given) else (None if r is None else local_block(r, layout, n).contiguous()))
        return (local_block(x_new, layout, n), *kept)

    return step


# --- recording manifolds across fully_shard --------------------------------------------------------


def stiefel_names(module: torch.nn.Module) -> dict[str, MatrixManifold]:
    """Names (as ``named_parameters``) of the parameters that carry a manifold of the package
    (``StiefelParameter``, geoopt ``ManifoldParameter`` on a Stiefel, an ``Oblique``, …). Call before
    ``fully_shard``, which drops the tensor subclasses, and pass the result to
    :func:`manifold_param_groups` after."""
    out = {}
    for name, p in module.named_parameters():
        m = getattr(p, "manifold", None)
        if isinstance(m, MatrixManifold) or is_stiefel(m):
            out[name] = as_manifold(m)
    return out


def manifold_param_groups(module: torch.nn.Module, manifolds: dict[str, MatrixManifold], **options) -> list[dict]:
    """Param groups for the package's optimizers: one ``{"params", "manifold"}`` group per distinct
    manifold of ``manifolds`` (from :func:`stiefel_names`), then one group of the other parameters;
    ``options`` are added to every group. Groups with no parameters are left out."""
    params = dict(module.named_parameters())
    missing = sorted(set(manifolds) - set(params))
    if missing:
        raise ValueError(f"manifold_param_groups: no parameters named {missing} in the module; record the "
                         "names with stiefel_names on the same module before fully_shard")
    by_manifold: dict[tuple, dict] = {}
    for name, m in manifolds.items():
        key = tuple(m.spec().values())
        by_manifold.setdefault(key, {"params": [], "manifold": m, **options})["params"].append(params[name])
    rest = [p for name, p in params.items() if name not in manifolds]
    groups = list(by_manifold.values())
    if rest:
        groups.append({"params": rest, **options})
    return groups
