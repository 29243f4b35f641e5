"""The batching engine under every optimizer of the package.

- :func:`param_manifold`: which geometry a parameter has — its param group's ``"manifold"``, else
  its own (a :class:`~stiefel_opt.manifolds.MatrixManifold`, geoopt's ``EuclideanStiefel``, or
  another geoopt manifold, stepped per tensor by :mod:`._foreign`), else None (Euclidean).
- :class:`Bucket`: parameters of equal geometry, matrix shape, dtype, device and shard layout,
  stepped as one (B, n, p) stack of the geometry's matrices (``to_matrix``/``from_matrix``; :data:`PLAIN`
  for 2-D parameters without a manifold). Their per-parameter state entries (of the parameter's
  shape, or of any per-matrix ``shape``) are views into per-bucket stacked buffers, with one
  invalidation rule (:meth:`Bucket.stacked`): a stack is reused only while every entry still is its
  view, in order.
- :func:`nonfinite_matrices` and :func:`nonfinite_message`: which matrices hold a non-finite value,
  and the one wording of the skip-or-raise policy.
- :data:`STEP_FUNCTIONS` and :func:`step_function`: the backend registry of the batched steps
  (torch functions of :mod:`stiefel_opt.functional`, fused Triton kernels), resolved once per bucket.

Used by the native optimizers (:mod:`._base`), the ``riemannian()``/``landing()`` hooks
(:mod:`.wrappers`) and :class:`~stiefel_opt.optim.LoRARITE`.
"""
from __future__ import annotations

import functools
import math
import weakref
from typing import Callable

import torch
from torch import Tensor

from .. import functional as F
from .. import kernels as _kernels
from .._geoopt import Manifold
from .._geoopt import geoopt as _geoopt
from ..manifolds import MatrixManifold, Stiefel, as_manifold, is_matrix_manifold, is_stiefel

__all__ = ["BACKENDS", "STEP_FUNCTIONS", "register_step", "step_function", "param_manifold", "is_foreign", "Bucket",
           "geometry_key", "PLAIN", "nonfinite_matrices", "nonfinite_message", "compute_dtype"]

BACKENDS = ("auto", "torch", "triton")
"""The values of the optimizers' ``backend=`` option: ``"torch"`` (the :mod:`stiefel_opt.functional`
steps), ``"triton"`` (the fused kernels) or ``"auto"`` (Triton for CUDA tensors when it can run)."""

STEP_FUNCTIONS: dict[str, dict[str, Callable]] = {
    "torch": {
        "riemannian_sgd": F.riemannian_sgd_update,
        "riemannian_adam": F.riemannian_adam_update,
        "landing_sgd": F.landing_sgd_update,
        "landing_adam": F.landing_adam_update,
    },
    # fused kernels (stiefel_opt.kernels; triton is imported on their first call only)
    "triton": _kernels.FUSED_STEPS,
}
"""Backend → {step name → batched step function}: ``"torch"`` holds the ``*_update`` functions of
:mod:`stiefel_opt.functional`, ``"triton"`` is :data:`kernels.FUSED_STEPS` (same contracts)."""


def register_step(name: str, fn: Callable, backend: str = "torch", *, replace: bool = False) -> Callable:
    """Register ``fn`` as the batched step ``name`` of ``backend`` (``"torch"``, or ``"triton"`` for a
    fused kernel with the contract of the torch step of the same name); an optimizer whose ``_STEP``
    is ``name`` then dispatches to it. Re-registering a name raises ``ValueError`` unless ``replace``."""
    if backend not in STEP_FUNCTIONS:
        raise ValueError(f"register_step: backend must be one of {tuple(STEP_FUNCTIONS)}, got {backend!r}")
    if not callable(fn):
        raise TypeError(f"register_step: fn must be callable, got {type(fn).__name__}")
    if name in STEP_FUNCTIONS[backend] and not replace:
        raise ValueError(f"register_step: {name!r} is already registered for backend {backend!r}; pass "
                         "replace=True to replace it")
    STEP_FUNCTIONS[backend][name] = fn
    return fn


def check_backend(backend: str) -> None:
    """``ValueError`` unless ``backend`` is one of :data:`BACKENDS` with registered steps."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto" and backend not in STEP_FUNCTIONS:
        raise ValueError(f"backend={backend!r}: no fused optimizer-step kernels are registered yet; use "
                         "backend='torch' or 'auto'")


@functools.cache
def _compiled(name: str) -> Callable:
    """``torch.compile`` of the torch step ``name``; lr and step are passed as 0-d tensors, so a new
    value is an input of the compiled graph rather than a recompilation."""
    fn = torch.compile(STEP_FUNCTIONS["torch"][name])

    @functools.wraps(STEP_FUNCTIONS["torch"][name])
    def step(*args, **kwargs):
        for k in ("lr", "step"):
            if k in kwargs:
                kwargs[k] = torch.tensor(float(kwargs[k]))
        return fn(*args, **kwargs)

    return step


_PICKS_FUSED: dict[tuple, bool] = {}


def _picks_fused(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``"auto"`` runs the fused kernels on a stack on ``device`` in ``dtype`` (fixed for the
    process: CUDA, a supported dtype, triton installed); asked per bucket per step, so remembered
    (a dict, not functools.cache, which torch.compile warns about when it traces a step)."""
    key = (device, dtype)
    if key not in _PICKS_FUSED:
        like = torch.empty(0, device=device, dtype=dtype)
        _PICKS_FUSED[key] = _kernels.resolve_backend("auto", like, like) == "triton"
    return _PICKS_FUSED[key]


def step_function(name: str, backend: str = "auto", compile: bool = False, like: Tensor | None = None) -> Callable:
    """The batched step function ``name`` for ``backend`` (the optimizers' one dispatch point).

    ``"auto"``: the fused kernel when one is registered for ``name`` and the stack (``like``, a tensor
    of the bucket) is on CUDA in a supported dtype with triton installed, else the torch function;
    without ``like`` the choice is made per call. ``compile``: the torch function through
    ``torch.compile`` (not with ``backend="triton"``).
    """
    check_backend(backend)
    fused = STEP_FUNCTIONS.get("triton", {}).get(name)
    if compile and backend == "triton":
        raise ValueError("compile=True compiles the torch step; it does not combine with backend='triton'")
    if backend == "auto":
        torch_fn = _compiled(name) if compile else STEP_FUNCTIONS["torch"][name]
        if fused is None:
            return torch_fn
        if like is None:
            return _kernels.auto_dispatch(torch_fn, fused)
        return fused if _picks_fused(like.device, like.dtype) else torch_fn
    if backend == "triton" and fused is None:
        raise ValueError(
            f"backend='triton': no fused kernel for the {name!r} step yet (fused: "
            f"{sorted(STEP_FUNCTIONS['triton'])}); use backend='torch' or 'auto'"
        )
    return _compiled(name) if compile else STEP_FUNCTIONS[backend][name]


# --- geometry of a parameter -----------------------------------------------------------------------

_GeooptStiefel = _geoopt.manifolds.stiefel.Stiefel
_GeooptCanonical = _geoopt.manifolds.stiefel.CanonicalStiefel


def is_foreign(manifold) -> bool:
    """True for a geoopt ``Manifold`` the package does not step in batches: neither geoopt's plain
    ``Euclidean``, nor a :class:`~stiefel_opt.manifolds.MatrixManifold`, nor the Stiefel manifold our
    ``Stiefel`` reproduces exactly (:func:`~stiefel_opt.manifolds.is_stiefel`)."""
    return (not is_matrix_manifold(manifold) and isinstance(manifold, Manifold)
            and type(manifold) is not _geoopt.Euclidean and not is_stiefel(manifold))


def param_manifold(group: dict, p: Tensor, point_set: bool = False):
    """The group's manifold, else the parameter's own :class:`~stiefel_opt.manifolds.MatrixManifold`
    (geoopt's ``EuclideanStiefel`` as ``Stiefel(retraction="qr")``), or its own other geoopt manifold
    (:func:`is_foreign`: stepped through geoopt's interface), else None.

    ``point_set``: only the set {XᵀX = I} matters (landing retracts nothing), so every geoopt Stiefel
    manifold (``geoopt.Stiefel()`` is the canonical one) is our ``Stiefel`` with its metric."""
    m = group.get("manifold")
    if m is not None:
        return m
    pm = getattr(p, "manifold", None)
    if pm is None:
        return None
    if is_matrix_manifold(pm):
        return pm
    if (point_set and isinstance(pm, _GeooptStiefel)) or is_stiefel(pm):
        return _ours(pm, point_set)
    return pm if is_foreign(pm) else None


_OURS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _ours(pm, point_set: bool) -> MatrixManifold:
    """Our ``Stiefel`` for a parameter's geoopt Stiefel manifold (see :func:`param_manifold`), made once
    per geoopt manifold object: the optimizers ask for it per parameter per step."""
    made = _OURS.setdefault(pm, {})
    if point_set not in made:
        made[point_set] = (Stiefel(metric="canonical" if isinstance(pm, _GeooptCanonical) else "euclidean",
                                   ndim=pm.ndim) if point_set else as_manifold(pm))
    return made[point_set]


def geometry_key(m: MatrixManifold) -> tuple:
    """What two parameters' geometries must share to step in one bucket: the manifold's class and
    every option its :meth:`~stiefel_opt.manifolds.MatrixManifold.spec` records."""
    return (type(m), *m.spec().values())


compute_dtype = F._compute_dtype  # the dtype a parameter's manifold math runs in (fp32 for bf16/fp16)


# --- buckets ---------------------------------------------------------------------------------------


class _Plain:
    """The identity matrix layout: a 2-D parameter without a manifold (e.g. a LoRA factor) is its
    own matrix. A :class:`Bucket` geometry (``matrix_shape``/``to_matrix``/``from_matrix``) only."""

    @staticmethod
    def matrix_shape(shape) -> torch.Size:
        return torch.Size(shape)

    @staticmethod
    def to_matrix(x: Tensor) -> Tensor:
        return x

    @staticmethod
    def from_matrix(m: Tensor, shape) -> Tensor:
        return m.reshape(shape)


PLAIN = _Plain()
"""The :class:`Bucket` geometry of plain 2-D parameters (no manifold): X is its own matrix."""


class Bucket:
    """Same-geometry, same-shape parameters stepped as one stack of ``size`` matrices.

    ``geometry``: the :class:`~stiefel_opt.manifolds.MatrixManifold` (its ``to_matrix``/``from_matrix``
    map parameters, gradients and state entries to and from the stack); ``mshape``: (n, p) of the
    local matrices; ``cdtype``: the dtype of the stack (fp32 for bf16/fp16 parameters); ``layout``:
    the shard layout of :mod:`stiefel_opt.distributed` (None: whole matrices).
    """

    __slots__ = ("owners", "params", "grads", "states", "counts", "names", "mshape", "geometry", "retraction",
                 "master", "cdtype", "layout", "whole")

    def __init__(self, geometry: MatrixManifold, mshape: tuple, cdtype: torch.dtype, *, layout=None,
                 retraction: str | None = None, master: bool = False):
        self.owners: list[Tensor] = []  # the parameters themselves (keys of optimizer.state)
        self.params: list[Tensor] = []  # their local shards (DTensor parameters, see stiefel_opt.distributed)
        self.grads: list[Tensor] = []
        self.states: list[dict] = []
        self.counts: list[int] = []
        self.names: list[str] = []
        self.geometry = geometry
        self.mshape = mshape
        self.cdtype = cdtype
        self.layout = layout
        self.retraction = retraction
        self.master = master
        self.whole = True  # every parameter is one matrix, its own (to_matrix gives it back as is)

    def add(self, owner: Tensor, local: Tensor, grad: Tensor, state: dict, name, matrices=None) -> None:
        """Add a parameter: its local shard and gradient, its state dict, its ``name`` for messages (a
        string, or a callable giving it: formatted only when a message needs it) and ``matrices``, the
        geometry's matrix shape of ``local`` when the caller has it."""
        self.owners.append(owner)
        self.params.append(local)
        self.grads.append(grad)
        self.states.append(state)
        self.names.append(name)
        matrices = self.geometry.matrix_shape(local.shape) if matrices is None else matrices
        self.counts.append(math.prod(matrices[:-2]))
        self.whole = self.whole and len(matrices) == 2 and self.geometry.to_matrix(local) is local

    def name(self, i: int) -> str:
        """The ``i``-th parameter's name, for messages."""
        n = self.names[i]
        return n() if callable(n) else n

    @property
    def size(self) -> int:
        return sum(self.counts)

    def state_shape(self, i: int, scalar: bool = False, shape: tuple | None = None) -> tuple:
        """Shape of a per-parameter state entry: the parameter's, or one ``shape`` per matrix
        (``scalar``: (1, 1))."""
        p = self.params[i]
        shape = (1, 1) if scalar else shape
        if shape is None:
            return tuple(p.shape)
        return (*self.geometry.matrix_shape(p.shape)[:-2], *shape)

    def stack(self, tensors: list[Tensor], dtype: torch.dtype | None = None) -> Tensor:
        """(B, n, p) stack of the matrices of ``tensors`` (parameters, gradients or parameter-shaped
        state), in ``dtype`` (default: the bucket's compute dtype); plain matrices are stacked
        without reshapes."""
        if len(tensors) == 1:
            stack = self.geometry.to_matrix(tensors[0]).reshape(-1, *self.mshape)
        elif self.whole:
            stack = torch.stack(tensors)
        else:
            stack = torch.cat([self.geometry.to_matrix(t).reshape(-1, *self.mshape) for t in tensors])
        dtype = self.cdtype if dtype is None else dtype
        return stack if stack.dtype == dtype else stack.to(dtype)

    def unstack_into(self, dst: list[Tensor], stack: Tensor) -> None:
        """Copy a (B, n, p) stack back into the tensors it was stacked from (cast to their dtype)."""
        if self.whole:
            torch._foreach_copy_(dst, stack.unbind(0))
            return
        parts = [self.geometry.from_matrix(c.reshape(self.geometry.matrix_shape(t.shape)), t.shape)
                 for c, t in zip(stack.split(self.counts), dst)]
        torch._foreach_copy_(dst, parts)

    def stacked(self, key: str, *, scalar: bool = False, shape: tuple | None = None,
                init: Callable[[], Tensor] | None = None) -> Tensor | None:
        """The (B, *mshape) stack of the entries ``states[i][key]``, read only; (B, *shape) for
        entries of one ``shape`` per matrix (``scalar``: (1, 1)), e.g. an r×r moment of an n×r factor.

        Their base buffer when they already are its views in order (no copy); otherwise a new stack
        (after load_state_dict or deepcopy, or a change in which parameters have gradients). Missing
        entries: ``init()`` (None: return None). An entry whose shape is not the parameter's raises
        ``ValueError`` (a resized parameter must not reuse reshaped moments). Nothing is written
        into the states: :meth:`assign` does that once the step succeeded.
        """
        shape = (1, 1) if scalar else shape
        mshape = self.mshape if shape is None else tuple(shape)
        ts = [s.get(key) for s in self.states]
        if any(t is None for t in ts):
            return None if init is None else init()
        for i, t in enumerate(ts):
            if t.shape != (self.params[i].shape if shape is None else self.state_shape(i, shape=shape)):
                raise ValueError(
                    f"state[{key!r}] of {self.name(i)} has shape {tuple(t.shape)}, but the parameter "
                    f"needs {self.state_shape(i, shape=shape)}: was the parameter resized? Drop its state "
                    "(del optimizer.state[param]) to restart it"
                )
        base = ts[0]._base
        if base is not None and base.dtype == self.cdtype and tuple(base.shape) == (self.size, *mshape) \
                and base.is_contiguous() and self._views_of(ts, base):
            return base
        if shape is not None:
            return torch.cat([t.reshape(-1, *shape).to(self.cdtype) for t in ts])
        return self.stack(ts)

    def _views_of(self, ts, base) -> bool:
        step = base.stride(0) * base.element_size()
        ptr, off = base.data_ptr(), 0
        for t, k in zip(ts, self.counts):
            if t._base is not base or t.data_ptr() != ptr + off * step:
                return False
            off += k
        return True

    def viewed(self, key: str, buf: Tensor) -> bool:
        """Whether the states' ``key`` entries already are views of ``buf`` (see :meth:`stacked`)."""
        first = self.states[0].get(key)
        return first is not None and first._base is buf

    def assign(self, key: str, buf: Tensor, *, scalar: bool = False, shape: tuple | None = None) -> None:
        """Store slices of ``buf`` as views in each parameter's state (in the parameter's layout, or
        of one ``shape`` per matrix as in :meth:`stacked`)."""
        buf = buf.contiguous()
        shape = (1, 1) if scalar else shape
        off = 0
        for i, (s, k) in enumerate(zip(self.states, self.counts)):
            part = buf[off : off + k]
            if shape is not None:
                s[key] = part.view(self.state_shape(i, shape=shape))
            else:
                pshape = self.state_shape(i)
                s[key] = self.geometry.from_matrix(part.view(self.geometry.matrix_shape(pshape)), pshape)
            off += k

    def zeros(self, scalar: bool = False) -> Tensor:
        mshape = (1, 1) if scalar else self.mshape
        return torch.zeros((self.size, *mshape), dtype=self.cdtype, device=self.params[0].device)

    def per_param(self, mask: Tensor) -> list[int]:
        """How many matrices of each parameter a (B,) mask selects."""
        return [int(c) for c in torch.stack([m.sum() for m in mask.split(self.counts)]).tolist()]

    def describe(self, mask: Tensor) -> str:
        """The parameters a (B,) mask touches, for messages (how many of its matrices, when it has several)."""
        hits = [self.name(i) if k == 1 else f"{n} of {k} matrices of {self.name(i)}"
                for i, (n, k) in enumerate(zip(self.per_param(mask), self.counts)) if n]
        return "; ".join(hits)


def nonfinite_matrices(g: Tensor) -> Tensor:
    """(B,) mask of the matrices of a (B, n, p) stack holding a NaN or ±inf, or entries so large that
    their sum overflows (no update survives those either): one reduction, ``~isfinite(Σ g)``."""
    return ~g.sum(dim=(-2, -1)).isfinite()


def nonfinite_message(who: str, what: str, where: str, mode: str, counted: bool = True) -> str:
    """The one wording of the non-finite policy: ``mode`` ``"raise"`` (the text of the
    ``FloatingPointError``) or ``"skip"`` (the text of the ``RuntimeWarning``; ``counted``: the skips
    are counted in ``state["nonfinite_skips"]``)."""
    if mode == "raise":
        return (f"{who}: {what} in {where}; nothing was changed. Pass nonfinite='skip' to skip such "
                "matrices, or fix the loss")
    count = " (counted in state['nonfinite_skips'])" if counted else ""
    return f"{who}: {what} in {where}; their update was skipped{count}"
