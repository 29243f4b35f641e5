"""Manifold parameter types: the Stiefel manifold, Stiefel parameters, ``constrain`` and the
shared-Q spectral type of SymLoRA.

``Stiefel`` implements geoopt's ``Manifold`` interface, so geoopt's optimizers accept our
parameters and our optimizers accept geoopt's ``ManifoldParameter``s (on geoopt's EuclideanStiefel as
on a ``Stiefel``; on any other geoopt manifold through that manifold's own methods).
All math is delegated to :mod:`stiefel_opt.functional`.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from . import functional as F
from ._geoopt import Manifold, ManifoldParameter, geoopt

__all__ = [
    "Stiefel",
    "StiefelParameter",
    "SharedQSpectral",
    "constrain",
    "MatrixManifold",
    "is_stiefel",
    "as_manifold",
    "manifold_from_spec",
]


class MatrixManifold(Manifold):
    """The geometry interface of the package's optimizers, for manifolds whose points are made of
    Stiefel matrices: :meth:`to_matrix` shows a point (its trailing ``ndim`` dims) as k ≥ 1 matrices
    on St(n, p), and every operation — Riemannian gradient, retraction, transport, landing field,
    infeasibility, projection — is the Stiefel formula of :mod:`stiefel_opt.functional` applied to
    them, batched. The optimizers stack the matrices of equal-geometry parameters and step them as
    one (B, n, p) Stiefel stack, so a subclass is a layout: ``spec_name``, :meth:`to_matrix`,
    :meth:`from_matrix`, and :meth:`_per_point` (how per-matrix values combine into one per point).
    Subclasses with a ``name`` are registered (:func:`manifold_from_spec`, a group's ``"manifold"``).

    Args:
        metric: ``"euclidean"`` (tangent projection G − X sym(XᵀG)) or ``"canonical"``
            (Riemannian gradient G − X GᵀX), or a metric of :data:`stiefel_opt.functional.METRICS`.
        retraction: ``"polar"`` (default), ``"qr"``, ``"cayley"``, ``"exp"`` or ``"newton_schulz"``.
        ndim: number of trailing dimensions that form one point.
    """

    name = "MatrixManifold"  # geoopt's display name
    spec_name = ""  # the registered name: a group's "manifold" and the state-dict spec
    reversible = False
    _REGISTRY: dict[str, type] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("spec_name")
        if name:
            known = MatrixManifold._REGISTRY.get(name)
            if known is not None and known.__qualname__ != cls.__qualname__:
                raise ValueError(f"{cls.__qualname__}: spec_name {name!r} is already the name of {known.__qualname__}; "
                                 "choose another name")
            MatrixManifold._REGISTRY[name] = cls

    def __init__(self, metric: str = "euclidean", retraction: str = "polar", ndim: int = 2):
        super().__init__()
        kind = type(self).__name__
        if getattr(metric, "name", metric) not in F.METRICS:
            raise ValueError(f"{kind}: metric must be one of {tuple(F.METRICS)} or their strategies "
                             f"(functional.EUCLIDEAN, CANONICAL), got {metric!r}")
        if retraction not in F.RETRACTIONS:
            raise ValueError(f"{kind}: retraction must be one of {tuple(F.RETRACTIONS)}, got {retraction!r}")
        if int(ndim) < 2:
            raise ValueError(f"{kind}: ndim must be at least 2, got {ndim}")
        self.metric = getattr(metric, "name", metric)  # the name: specs, bucket keys; F.as_metric gives the strategy
        self.retraction = retraction
        self.ndim = int(ndim)

    def extra_repr(self) -> str:
        extra = f", ndim={self.ndim}" if self.ndim != 2 else ""
        return f"metric={self.metric!r}, retraction={self.retraction!r}{extra}"

    def spec(self) -> dict:
        """The plain (weights_only-safe) description a state dict stores; :func:`manifold_from_spec`
        reads it back."""
        return {"manifold": self.spec_name, "metric": self.metric, "retraction": self.retraction, "ndim": self.ndim}

    def with_options(self, metric: str | None = None, retraction: str | None = None) -> "MatrixManifold":
        """This manifold with another metric and/or retraction (None: keep; itself when nothing changes)."""
        metric, retraction = getattr(metric, "name", metric) or self.metric, retraction or self.retraction
        if (metric, retraction) == (self.metric, self.retraction):
            return self
        return type(self)(metric, retraction, self.ndim)

    # --- layout: points ↔ Stiefel matrices ---------------------------------------------------
    def to_matrix(self, x: Tensor) -> Tensor:
        """(…, n, p): the Stiefel matrices of the points ``x`` (leading dims kept)."""
        raise NotImplementedError

    def from_matrix(self, m: Tensor, shape) -> Tensor:
        """The points of ``shape`` whose matrices are ``m`` (the inverse of :meth:`to_matrix`)."""
        raise NotImplementedError

    def matrix_shape(self, shape) -> torch.Size:
        """The shape :meth:`to_matrix` gives for points of ``shape``."""
        return self.to_matrix(torch.empty(tuple(shape), device="meta")).shape

    def shard_axis(self, dim: int) -> int | None:
        """Which axis of the (n, p) matrices a split of the point's ``dim``-th dim (0 ≤ dim < ``ndim``)
        splits: −2 (rows) or −1 (columns), or None when whole matrices stay on each rank;
        ``ValueError`` when the split cuts a matrix in a way the steps cannot run on (FSDP2)."""
        raise NotImplementedError

    def _per_point(self, values: Tensor, how: str) -> Tensor:
        """Per-matrix values (shape of ``to_matrix(x)`` without the last two dims) combined into one
        per point: ``how`` is ``"sum"`` (inner products) or ``"norm"`` (infeasibilities)."""
        return values

    def _map(self, fn, x: Tensor, *others: Tensor) -> Tensor:
        for o in others:
            if isinstance(o, Tensor) and isinstance(x, Tensor) and o.shape[-self.ndim:] != x.shape[-self.ndim:]:
                raise ValueError(
                    f"{self}: a tangent vector of shape {tuple(o.shape)} does not match the point's "
                    f"shape {tuple(x.shape)}"
                )
        return self.from_matrix(fn(self.to_matrix(x), *(self.to_matrix(o) for o in others)), x.shape)

    def _check_shape(self, shape, name):
        if len(shape) < self.ndim:
            return False, f"'{name}' on {self} needs at least {self.ndim} dims, got shape {tuple(shape)}"
        return True, None

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        xm = self.to_matrix(x)
        d = float(F.infeasibility(xm).max()) if x.numel() else 0.0
        ok = d <= atol + rtol * math.sqrt(min(xm.shape[-2:]))
        return ok, None if ok else f"‖XᵀX − I‖_F = {d:.3e} exceeds the tolerance"

    def _check_vector_on_tangent(self, x, u, *, atol=1e-5, rtol=1e-5):
        xm, um = self.to_matrix(x), self.to_matrix(u)
        if F.is_wide(xm):
            xm, um = xm.mT, um.mT
        gap = float(torch.linalg.matrix_norm(F.sym(xm.mT @ um)).max()) if x.numel() else 0.0
        ok = gap <= atol + rtol * float(torch.linalg.matrix_norm(um).max())
        return ok, None if ok else f"‖sym(XᵀU)‖_F = {gap:.3e}: not a tangent vector"

    # --- the geometry (geoopt's Manifold interface) ---------------------------------------------
    def projx(self, x: Tensor) -> Tensor:
        """Nearest point of the manifold: the polar factor U Vᵀ of each matrix X = U Σ Vᵀ
        (:func:`~stiefel_opt.functional.project`; rank-deficient X raises ``ValueError``)."""
        return self._map(F.project, x)

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        """Tangent projection P_X(U) = U − X sym(XᵀU) (:func:`~stiefel_opt.functional.proj_tangent`;
        the tangent space, hence P_X, is the same for both metrics)."""
        return self._map(F.proj_tangent, x, u)

    def egrad2rgrad(self, x: Tensor, u: Tensor) -> Tensor:
        """Riemannian gradient of the Euclidean gradient G for the metric: G − X sym(XᵀG) (euclidean)
        or G − X GᵀX (canonical) (:func:`~stiefel_opt.functional.egrad2rgrad`)."""
        return self._map(lambda a, b: F.egrad2rgrad(a, b, self.metric), x, u)

    rgrad = egrad2rgrad

    def inner(self, x: Tensor, u: Tensor, v: Tensor | None = None, *, keepdim: bool = False) -> Tensor:
        """Metric ⟨U, V⟩_X = tr(UᵀV) (euclidean) or tr(UᵀV) − ½ tr(UᵀX XᵀV) (canonical), V = U if
        omitted; one value per point (:func:`~stiefel_opt.functional.inner`)."""
        v = u if v is None else v
        out = self._per_point(F.inner(self.to_matrix(x), self.to_matrix(u), self.to_matrix(v), self.metric), "sum")
        return out.reshape(*out.shape, *([1] * self.ndim)) if keepdim else out

    def component_inner(self, x: Tensor, u: Tensor, v: Tensor | None = None) -> Tensor:
        """:meth:`inner` with ``keepdim=True``: ⟨U, V⟩_X per point, its ``ndim`` dims kept as size 1
        (geoopt's per-component inner product for a manifold whose points are whole matrices)."""
        return self.inner(x, u, v, keepdim=True)

    def retr(self, x: Tensor, u: Tensor) -> Tensor:
        """Retraction R_X(U) by this manifold's ``retraction`` and ``metric``
        (:func:`~stiefel_opt.functional.retract`)."""
        return self._map(lambda a, b: F.retract(a, b, self.retraction, self.metric), x, u)

    retract = retr

    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        """Exponential map Exp_X(U): the geodesic of this manifold's ``metric`` at t = 1
        (:func:`~stiefel_opt.functional.retract_exp`, whatever ``retraction`` is)."""
        return self._map(lambda a, b: F.retract_exp(a, b, self.metric), x, u)

    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """Vector transport of V from X to Y by projection, P_Y(V) = V − Y sym(YᵀV) (:meth:`proju` at Y,
        as :func:`~stiefel_opt.functional.transport`; ``x`` is unused)."""
        return self.proju(y, v)

    def retr_transp(self, x: Tensor, u: Tensor, v: Tensor):
        """(Y, P_Y(V)) with Y = R_X(U) (:meth:`retr`): the retracted point and V transported to it."""
        y = self.retr(x, u)
        return y, self.transp(x, y, v)

    def expmap_transp(self, x: Tensor, u: Tensor, v: Tensor):
        """(Y, P_Y(V)) with Y = Exp_X(U) (:meth:`expmap`): the geodesic end point and V transported to it."""
        y = self.expmap(x, u)
        return y, self.transp(x, y, v)

    def transp_follow_retr(self, x: Tensor, u: Tensor, v: Tensor) -> Tensor:
        """P_Y(V) with Y = R_X(U) (:meth:`retr`): V transported to the end of the retraction step."""
        return self.transp(x, self.retr(x, u), v)

    def transp_follow_expmap(self, x: Tensor, u: Tensor, v: Tensor) -> Tensor:
        """P_Y(V) with Y = Exp_X(U) (:meth:`expmap`): V transported to the end of the geodesic step."""
        return self.transp(x, self.expmap(x, u), v)

    def landing_field(self, x: Tensor, g: Tensor, lam: float = 1.0) -> Tensor:
        """Landing field Λ = ½(G·XᵀX − X·GᵀX) + λX(XᵀX − I) of each matrix
        (:func:`~stiefel_opt.functional.landing_field`)."""
        return self._map(lambda a, b: F.landing_field(a, b, lam), x, g)

    def random(self, *size, dtype=None, device=None, generator=None) -> Tensor:
        """A random point of the given shape (Haar on each matrix)."""
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
        self._assert_check_shape(shape, "x")
        m = F.random_point(tuple(self.matrix_shape(shape)), dtype=dtype, device=device, generator=generator)
        return self.from_matrix(m, shape).contiguous()

    random_naive = random

    def infeasibility(self, x: Tensor) -> Tensor:
        """How far each point is from the manifold: ‖XᵀX − I‖_F of its matrix (the root sum of squares
        over its matrices) — what the landing optimizers drive to 0."""
        return self._per_point(F.infeasibility(self.to_matrix(x)), "norm")

    distance = infeasibility


class Stiefel(MatrixManifold):
    """St(n, p) = {X : XᵀX = I}; a wide matrix (n < p) means orthonormal rows.

    Args:
        metric: ``"euclidean"`` (tangent projection G − X sym(XᵀG)) or ``"canonical"``
            (Riemannian gradient G − X GᵀX).
        retraction: ``"polar"`` (default), ``"qr"``, ``"cayley"``, ``"exp"`` or ``"newton_schulz"``.
        ndim: number of trailing dimensions that form one matrix. 2 for matrices; a conv weight
            (out, in, kh, kw) uses ``ndim=4`` and is seen as the (out, in·kh·kw) matrix.
    """

    name = "Stiefel"
    spec_name = "stiefel"

    def to_matrix(self, x: Tensor) -> Tensor:
        """View the trailing ``ndim`` dims as one matrix (rows = first of them)."""
        if self.ndim == 2:
            return x
        lead = x.shape[: x.dim() - self.ndim]
        return x.reshape(*lead, x.shape[x.dim() - self.ndim], -1)

    def from_matrix(self, m: Tensor, shape) -> Tensor:
        """``m`` reshaped back to the points' ``shape``."""
        return m.reshape(shape)

    def shard_axis(self, dim: int) -> int | None:
        """Dim 0 splits the rows, dim 1 the columns; a later dim cuts inside the flattened columns."""
        if dim > 1:
            raise ValueError(f"the split cuts inside the flattened columns of the {self.ndim}-dim matrix; shard "
                             "its first dim (rows) or a leading dim")
        return -2 if dim == 0 else -1

    def matrix_shape(self, shape) -> torch.Size:
        """(…, n, ∏ rest): the trailing ``ndim`` dims as one matrix."""
        if self.ndim == 2:
            return torch.Size(shape)
        lead = len(shape) - self.ndim
        return torch.Size((*shape[:lead], shape[lead], math.prod(shape[lead + 1:])))


def manifold_from_spec(spec, where: str) -> MatrixManifold | None:
    """The manifold a (possibly loaded) param group names: what :func:`as_manifold` accepts, or the
    plain dict of :meth:`MatrixManifold.spec`; a malformed spec raises ``ValueError`` naming ``where``."""
    if not isinstance(spec, dict):
        try:
            return as_manifold(spec)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where} has manifold {spec!r}: {err}") from None
    name = spec.get("manifold")
    cls = MatrixManifold._REGISTRY.get(name) if isinstance(name, str) else None
    fields = {k: v for k, v in spec.items() if k != "manifold"}
    if cls is None or set(fields) - {"metric", "retraction", "ndim"}:
        raise ValueError(f"{where} has manifold {spec!r}: expected {{'manifold': one of "
                         f"{sorted(MatrixManifold._REGISTRY)}, 'metric': ..., 'retraction': ..., 'ndim': ...}}")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where} has manifold {spec!r}: {err}") from None


def is_matrix_manifold(manifold) -> bool:
    """``isinstance(manifold, MatrixManifold)`` through the type's MRO: geoopt's manifolds are ABCs,
    whose ``isinstance`` runs Python code, and the optimizers ask this per parameter per step."""
    return MatrixManifold in type(manifold).__mro__


def is_stiefel(manifold) -> bool:
    """True for our ``Stiefel`` and for geoopt's ``EuclideanStiefel``, the one geoopt Stiefel manifold
    ``Stiefel(retraction="qr")`` reproduces exactly (projection P_X, QR retraction, transport by P_Y).

    geoopt's ``CanonicalStiefel`` (its Cayley map moves along V + XΩ, not V) and
    ``EuclideanStiefelExact`` (exponential map) are not: optimizers step them through geoopt.
    """
    return isinstance(manifold, Stiefel) or type(manifold) is geoopt.EuclideanStiefel


def as_manifold(manifold) -> MatrixManifold | None:
    """Normalize a param group's manifold declaration to a :class:`MatrixManifold` (or None).

    Accepts ``None``, ``"euclidean"`` and geoopt's ``Euclidean`` (None), a registered name
    (``"stiefel"``, ``"oblique"``: the manifold with its defaults), a ``MatrixManifold``, and geoopt's
    ``EuclideanStiefel`` (``Stiefel(retraction="qr")``). Any other geoopt manifold raises
    ``TypeError``: it is honoured only on the parameter itself (a ``geoopt.ManifoldParameter``).
    """
    if manifold is None or manifold == "euclidean" or type(manifold) is geoopt.Euclidean:
        return None
    if is_matrix_manifold(manifold):
        return manifold
    if isinstance(manifold, str):
        cls = MatrixManifold._REGISTRY.get(manifold.lower())
        if cls is None:
            raise ValueError(f"unknown manifold {manifold!r}: use one of {sorted(MatrixManifold._REGISTRY)} "
                             "or a manifold object such as Stiefel(...)")
        return cls()
    if is_stiefel(manifold):
        return Stiefel(metric="euclidean", retraction="qr", ndim=manifold.ndim)
    if isinstance(manifold, Manifold):
        raise TypeError(
            f"manifold {manifold!r}: a param group can declare only a manifold of this package (Stiefel, "
            "Oblique); put a geoopt manifold on the parameter itself (geoopt.ManifoldParameter(data, manifold=...))"
        )
    raise TypeError(f"manifold must be None, a manifold name or a MatrixManifold, got {type(manifold).__name__}")


as_stiefel = as_manifold  # its name while Stiefel was the only manifold (kept importable, not in __all__)


def _check_data(data: Tensor, what: str, ndim: int = 2) -> None:
    if not isinstance(data, Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(data).__name__}")
    if data.dim() < ndim or data.dim() < 2:
        raise ValueError(
            f"{what}: a Stiefel parameter must be a matrix (or batch/conv kernel of matrices); "
            f"got shape {tuple(data.shape)}"
        )
    if not data.is_floating_point():
        raise TypeError(f"{what}: a Stiefel parameter must be floating point, got {data.dtype}")
    if data.numel() == 0:
        raise ValueError(f"{what}: the tensor of shape {tuple(data.shape)} is zero-size; a Stiefel "
                         "parameter needs every dimension >= 1")
    if not data.is_meta and not bool(torch.isfinite(data).all()):  # meta tensors have no values
        raise ValueError(f"{what}: the tensor has non-finite entries")


def _tolerance(dtype: torch.dtype, p: int) -> float:
    unit = {torch.bfloat16: 2e-2, torch.float16: 4e-3}.get(dtype, 1e-4)
    return unit * math.sqrt(p)


class StiefelParameter(ManifoldParameter):
    """An ``nn.Parameter`` on St(n, p): a geoopt ``ManifoldParameter`` carrying a ``Stiefel``.

    ``StiefelParameter(data)`` checks that ``data`` is orthonormal (columns if tall, rows if
    wide) and raises ``ValueError`` otherwise; pass ``check=False`` for a point off the manifold
    that a landing optimizer will pull back, or build one with :meth:`random` /
    ``Stiefel().projx(data)``. On the meta device only the shape and dtype are checked.
    """

    def __new__(cls, data: Tensor | None = None, manifold: Stiefel | None = None,
                requires_grad: bool = True, check: bool = True):
        manifold = Stiefel() if manifold is None else manifold
        if not is_stiefel(manifold):
            raise TypeError(
                f"StiefelParameter: manifold must be a Stiefel or geoopt's EuclideanStiefel, got {manifold!r}; "
                "use geoopt.ManifoldParameter for another geoopt manifold"
            )
        if data is None:
            raise ValueError("StiefelParameter: data is required (use StiefelParameter.random(n, p))")
        _check_data(data, "StiefelParameter", getattr(manifold, "ndim", 2))
        if check and isinstance(manifold, Stiefel) and not data.is_meta:
            m = manifold.to_matrix(data.detach())
            d = float(F.infeasibility(m).max())
            tol = _tolerance(data.dtype, min(m.shape[-2:]))
            if d > tol:
                raise ValueError(
                    f"StiefelParameter: data of shape {tuple(data.shape)} is not orthonormal "
                    f"(‖XᵀX − I‖_F = {d:.3e} > {tol:.1e}); project it first with "
                    "Stiefel().projx(data), or pass check=False for a landing optimizer to pull back"
                )
        if isinstance(data, ManifoldParameter):
            data = data.data
        return super().__new__(cls, data, manifold=manifold, requires_grad=requires_grad)

    def __deepcopy__(self, memo):
        """Copy without re-checking orthonormality: a landing run leaves X slightly off the manifold."""
        if id(self) not in memo:
            memo[id(self)] = type(self)(self.data.clone(memory_format=torch.preserve_format),
                                        manifold=copy.deepcopy(self.manifold, memo),
                                        requires_grad=self.requires_grad, check=False)
        return memo[id(self)]

    def __reduce_ex__(self, proto):
        build, args = torch.Tensor.__reduce_ex__(self.data, proto)
        return _rebuild_stiefel_parameter, (build, args, type(self), self.manifold, self.requires_grad)

    @classmethod
    def random(cls, *shape: int, manifold: Stiefel | None = None, dtype=None, device=None,
               generator=None, requires_grad: bool = True) -> "StiefelParameter":
        """A Haar-random Stiefel parameter of the given shape."""
        manifold = Stiefel() if manifold is None else manifold
        data = manifold.random(*shape, dtype=dtype, device=device, generator=generator)
        return cls(data, manifold=manifold, requires_grad=requires_grad, check=False)


def _rebuild_stiefel_parameter(build, args, cls, manifold, requires_grad):
    return cls(build(*args), manifold=manifold, requires_grad=requires_grad, check=False)


_INITS = ("project", "keep", "random")


def constrain(module: nn.Module, name: str = "weight", manifold: Stiefel | None = None,
              init: str = "project") -> StiefelParameter:
    """Put a Stiefel constraint on ``module.<name>`` in place and return the new parameter.

    A conv weight (out, in, *kernel) is seen as the (out, in·∏kernel) matrix (a given ``Stiefel``
    with ``ndim=2`` is widened to the weight's dims, its metric and retraction kept); a wide
    matrix has orthonormal rows. ``init``: ``"project"`` — the nearest orthonormal matrix (polar factor;
    rank-deficient weights raise), ``"keep"`` — the values as they are (a landing optimizer
    pulls them onto the manifold only from inside its safe region ‖XᵀX − I‖_F < safe_eps; PyTorch's
    default initialisation is usually outside it, so prefer "project" there), ``"random"`` — a
    Haar-random point.

    Call it before building the optimizer: the module's parameter is replaced by a new object.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"constrain: module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"constrain: name must be a parameter name (str), got {type(name).__name__}")
    where = f"{type(module).__name__}.{name}"
    if init not in _INITS:
        raise ValueError(f"constrain({where}): init must be one of {_INITS}, got {init!r}")
    param = module._parameters.get(name) if hasattr(module, "_parameters") else None
    if param is None:
        candidates = [n for n, _ in module.named_parameters(recurse=False)]
        raise ValueError(f"constrain: {type(module).__name__} has no parameter {name!r}; it has {candidates}")
    _check_data(param.detach(), f"constrain({where})")
    if manifold is None:
        manifold = Stiefel(ndim=param.dim())
    elif not isinstance(manifold, Stiefel):
        raise TypeError(f"constrain({where}): manifold must be a Stiefel, got {type(manifold).__name__}")
    elif isinstance(module, nn.modules.conv._ConvNd) and name == "weight" and manifold.ndim == 2:
        manifold = Stiefel(metric=manifold.metric, retraction=manifold.retraction, ndim=param.dim())
    elif manifold.ndim > param.dim():
        raise ValueError(
            f"constrain({where}): manifold.ndim={manifold.ndim} exceeds the parameter's {param.dim()} dims"
        )
    with torch.no_grad():
        data = param.detach()
        if init == "project" and not data.is_meta:  # a meta weight has no values to project
            try:
                data = manifold.projx(data)
            except ValueError as err:
                raise ValueError(f"constrain({where}): {err}") from None
        elif init == "random":
            data = manifold.random(data.shape, dtype=data.dtype, device=data.device)
        new = StiefelParameter(data.clone(), manifold=manifold, requires_grad=param.requires_grad,
                               check=False)
    module._parameters[name] = new
    return new


class SharedQSpectral(nn.Module):
    """The SymLoRA-style symmetric low-rank matrix Q diag(λ) Qᵀ (``core="diag"``) or Q S Qᵀ with
    a full symmetric r×r core S (``core="full"``; S is stored free and symmetrized), Q ∈ St(n, r).

    ``forward(x)`` applies x ↦ x Q core Qᵀ without forming the n×n matrix; :meth:`matrix` forms
    it; :meth:`factors` gives the rank-r LoRA pair (B, A) = (Q·core, Qᵀ).
    """

    def __init__(self, n: int, r: int, core: str = "diag", init_scale: float = 0.0,
                 dtype=None, device=None):
        super().__init__()
        if core not in ("diag", "full"):
            raise ValueError(f"SharedQSpectral: core must be 'diag' or 'full', got {core!r}")
        if not 0 < r <= n:
            raise ValueError(f"SharedQSpectral: need 0 < r <= n, got n={n}, r={r}")
        self.core_kind = core
        self.Q = StiefelParameter.random(n, r, dtype=dtype, device=device)
        shape = (r,) if core == "diag" else (r, r)
        init = torch.full(shape, float(init_scale), dtype=dtype, device=device)
        self.core = nn.Parameter(init if core == "diag" else init * torch.eye(r, dtype=dtype, device=device))

    def core_matrix(self) -> Tensor:
        """The r×r core: diag(λ) or sym(S)."""
        return torch.diag_embed(self.core) if self.core_kind == "diag" else F.sym(self.core)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(B, A) with B A = Q core Qᵀ: B = Q·core (n×r), A = Qᵀ (r×n)."""
        b = self.Q * self.core if self.core_kind == "diag" else self.Q @ self.core_matrix()
        return b, self.Q.mT

    def matrix(self) -> Tensor:
        """The n×n matrix Q core Qᵀ = B A of :meth:`factors`, materialized (``forward`` never forms it)."""
        b, a = self.factors()
        return b @ a

    def forward(self, x: Tensor) -> Tensor:
        xq = x @ self.Q
        xq = xq * self.core if self.core_kind == "diag" else xq @ self.core_matrix()
        return xq @ self.Q.mT
