"""The adapter contract (:class:`AdapterLayer`) and the open registry of adapter methods.

A method is an ``AdapterLayer`` subclass registered under a name with :func:`register_adapter`;
``AdapterConfig(method=name)``, ``inject_adapters``, ``save_adapters``/``load_adapters``,
``export_peft`` and merging then work for it. The class owns its option schema: the ``init``
values it accepts (``inits``), its ``core`` choices and default (``cores``, ``default_core``), its
constraints (checked in ``__init__``) and how it is built from a config (:meth:`AdapterLayer.from_config`).
A loaded checkpoint only looks a name up here; nothing in a file registers or imports anything.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from types import MappingProxyType

import torch
from torch import Tensor, nn

from ..manifolds import StiefelParameter

__all__ = ["AdapterLayer", "register_adapter", "adapter_class", "LAYERS", "METHODS", "is_conv1d"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (weight stored (in, out), y = x W + b)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


class AdapterLayer(nn.Module):
    """Base class: holds the frozen ``base_layer``, the scaling, the input dropout and merging.

    A subclass defines its parameters in ``__init__`` (after ``super().__init__(...)``, which sets
    ``in_features``, ``out_features``, ``r``, ``scaling``, ``init``, ``core_kind`` and
    ``factory_kwargs``, the device and dtype for adapter parameters) and :meth:`delta_factors`
    (B, A) with ΔW = B A, scaling included; :meth:`delta_forward` may be overridden with a cheaper
    x ↦ x ΔWᵀ. Its option schema: ``inits`` (accepted ``init`` values, ``"default"`` among them),
    ``cores`` (accepted ``core`` values; empty: no core) and ``default_core`` (``core=None``).
    """

    method: str = ""
    inits: tuple[str, ...] = ("default",)
    cores: tuple[str, ...] = ()
    default_core: str | None = None

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, name: str = "", init: str = "default", core: str | None = None):
        super().__init__()
        if not (isinstance(base_layer, nn.Linear) or is_conv1d(base_layer)):
            raise TypeError(
                f"{self.method} adapter on {name or 'module'}: only nn.Linear and transformers Conv1D "
                f"are supported, got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        w = base_layer.weight
        self.out_features, self.in_features = (w.shape[1], w.shape[0]) if self.fan_in_fan_out else w.shape
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"{self.method} adapter on {name or 'module'}: r must be a positive int, got {r!r}")
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = self.lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.module_name = name
        self.merged = False
        self.factory_kwargs = {"device": w.device, "dtype": torch.float32 if w.dtype in _LOW_PRECISION else w.dtype}
        self.check_options(init, core, self.method)
        self.init = init
        self.core_kind = self.default_core if core is None else core

    # --- the option schema ---------------------------------------------------------------------
    @classmethod
    def check_options(cls, init: str, core: str | None, who: str) -> None:
        """``ValueError`` (prefixed ``who``) unless ``init`` is one of ``cls.inits`` and ``core`` is
        None or one of ``cls.cores``."""
        if init not in cls.inits:
            raise ValueError(f"{who}: init for {cls.method!r} must be one of {cls.inits}, got {init!r}")
        if core is None:
            return
        if not cls.cores:
            with_core = "/".join(m for m, c in _REGISTRY.items() if c.cores) or "no method"
            raise ValueError(f"{who}: core applies to {with_core}, not {cls.method!r}")
        if core not in cls.cores:
            raise ValueError(f"{who}: core must be {' or '.join(map(repr, cls.cores))} for {cls.method!r}, "
                             f"got {core!r}")

    @classmethod
    def from_config(cls, base_layer: nn.Module, config, name: str = "", *, shapes_only: bool = False):
        """The layer ``config`` (an ``AdapterConfig``) asks for around ``base_layer``. With
        ``shapes_only`` the init is ``"default"`` (the layer is built for its parameter names and
        shapes, e.g. on the meta device, so no data-dependent init such as an SVD runs)."""
        return cls(base_layer, config.r, config.lora_alpha, lora_dropout=config.lora_dropout,
                   use_rslora=config.use_rslora, name=name, init="default" if shapes_only else config.init,
                   core=config.core)

    # --- shapes and the base weight ------------------------------------------------------------
    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype of the adapter's own parameters (follows ``model.to(...)``)."""
        for name, p in self.named_parameters():
            if not name.startswith("base_layer."):
                return p.dtype
        return self.factory_kwargs["dtype"]

    def base_weight(self) -> Tensor:
        """The frozen base weight in (out, in) orientation (a view; transposed for Conv1D)."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def require_rank(self, limit: int, what: str) -> None:
        """``ValueError`` naming the module and its weight's shape when ``r > limit`` (``what``
        names the limit, e.g. ``"min(out, in)"``): a constraint a subclass checks in ``__init__``."""
        if self.r > limit:
            raise ValueError(
                f"{self.method} adapter on {self.module_name or 'module'} with weight (out={self.out_features}, "
                f"in={self.in_features}): r={self.r} exceeds {what}={limit}; use r <= {limit}"
            )

    # --- the update ----------------------------------------------------------------------------
    def delta_factors(self) -> tuple[Tensor, Tensor]:
        """(B, A), B (out×r), A (r×in), with ΔW = B A, scaling included."""
        raise NotImplementedError

    def delta_forward(self, x: Tensor) -> Tensor:
        """x ↦ x ΔWᵀ = (x Aᵀ) Bᵀ from :meth:`delta_factors`, O(r(in + out)) per row (ΔW never formed)."""
        b, a = self.delta_factors()
        return (x @ a.T) @ b.T

    def stiefel_factors(self) -> dict[str, Tensor]:
        """The Stiefel-constrained factors of this layer, by parameter name."""
        return {n: p for n, p in self.named_parameters() if isinstance(p, StiefelParameter)}

    def delta_weight(self) -> Tensor:
        """ΔW (out×in) in the adapter dtype (materialized: for merging and tests only)."""
        b, a = self.delta_factors()
        return b @ a

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        h = self.lora_dropout(x.to(self.adapter_dtype))
        return result + self.delta_forward(h).to(result.dtype)

    # --- merging -------------------------------------------------------------------------------
    def _merged_weight(self, w: Tensor) -> Tensor:
        """W + ΔW for the (out, in) weight ``w`` (computed in the adapter dtype)."""
        return w.to(self.adapter_dtype) + self.delta_weight()

    def _unmerged_weight(self, w: Tensor) -> Tensor:
        return w.to(self.adapter_dtype) - self.delta_weight()

    def _write_weight(self, new_oi: Tensor) -> None:
        w = self.base_layer.weight
        w.data.copy_((new_oi.T if self.fan_in_fan_out else new_oi).to(w.dtype))

    def _checked_merged_weight(self, safe_merge: bool) -> Tensor:
        new = self._merged_weight(self.base_weight())
        if safe_merge and not bool(torch.isfinite(new).all()):
            raise ValueError(
                f"{self.module_name or self.method}: merging would put NaN/Inf into the base weight; "
                "the adapter's factors are not finite — not merged"
            )
        return new

    @torch.no_grad()
    def check_merge(self) -> None:
        """``ValueError`` when merging would put NaN/Inf into the base weight; nothing is written."""
        self._checked_merged_weight(safe_merge=True)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Add ΔW to the base weight. ``safe_merge`` checks the result is finite before writing."""
        if self.merged:
            raise ValueError(f"{self.module_name or self.method}: the adapter is already merged; unmerge() first")
        self._write_weight(self._checked_merged_weight(safe_merge))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW from the base weight (exact up to fp rounding)."""
        if not self.merged:
            raise ValueError(f"{self.module_name or self.method}: the adapter is not merged")
        self._write_weight(self._unmerged_weight(self.base_weight()))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, merged={self.merged}")


# --- the registry --------------------------------------------------------------------------------
_REGISTRY: dict[str, type[AdapterLayer]] = {}

LAYERS = MappingProxyType(_REGISTRY)
"""The registered layer classes by method name (a read-only live view; add with :func:`register_adapter`)."""


class _Names(Sequence):
    """The registered method names in registration order, read at each use (compares equal to
    the tuple of them)."""

    def __getitem__(self, i):
        return tuple(_REGISTRY)[i]

    def __len__(self):
        return len(_REGISTRY)

    def __eq__(self, other):
        return tuple(self) == (tuple(other) if isinstance(other, (_Names, tuple)) else other)

    __hash__ = None

    def __repr__(self):
        return repr(tuple(_REGISTRY))


METHODS = _Names()
"""The method names ``AdapterConfig(method=...)`` accepts, a live view of the registry: the
built-ins ``("lora", "dora", "polar", "stella", "symlora")``, then those registered since."""


def register_adapter(name_or_cls=None, *, replace: bool = False):
    """Register an :class:`AdapterLayer` subclass as an adapter method; usable as
    ``@register_adapter("name")``, ``@register_adapter`` (the name is the class's ``method``) or
    ``register_adapter(cls)``. Returns the class (its ``method`` set to the name).

    A name already registered raises ``ValueError`` unless ``replace=True``. The class must
    define :meth:`~AdapterLayer.delta_factors`, accept ``init="default"`` and, when it has
    ``cores``, default to one of them."""
    def register(cls, name):
        if not (isinstance(cls, type) and issubclass(cls, AdapterLayer)):
            raise TypeError(f"register_adapter: expected an AdapterLayer subclass, got {cls!r}")
        own = cls.__dict__.get("method")
        name = own if name is None else name
        if not (isinstance(name, str) and name.isidentifier()):
            raise ValueError(f"register_adapter: {cls.__name__}: the method name must be an identifier "
                             f"(pass it, or set the class's `method`), got {name!r}")
        if own and own != name:
            raise ValueError(f"register_adapter: {cls.__name__} has method={own!r}, registered as {name!r}")
        if name in _REGISTRY and not replace:
            raise ValueError(f"register_adapter: method {name!r} is already registered "
                             f"({_REGISTRY[name].__qualname__}); pass replace=True to replace it")
        if cls.delta_factors is AdapterLayer.delta_factors:
            raise TypeError(f"register_adapter: {cls.__name__} must define delta_factors()")
        if "default" not in cls.inits or (cls.cores and cls.default_core not in cls.cores):
            raise ValueError(f"register_adapter: {cls.__name__}: inits must include 'default' (got {cls.inits}) "
                             f"and default_core must be one of cores {cls.cores} (got {cls.default_core!r})")
        cls.method = name
        _REGISTRY[name] = cls
        return cls

    if name_or_cls is None or isinstance(name_or_cls, str):
        return lambda cls: register(cls, name_or_cls)
    return register(name_or_cls, None)


def adapter_class(method, who: str = "AdapterConfig") -> type[AdapterLayer]:
    """The layer class registered as ``method``; ``ValueError`` (prefixed ``who``) naming the
    registered methods otherwise. Only a lookup: nothing is imported or registered."""
    cls = _REGISTRY.get(method) if isinstance(method, str) else None
    if cls is None:
        raise ValueError(f"{who}: method must be one of {METHODS} (register others with "
                         f"register_adapter), got {method!r:.80}")
    return cls
